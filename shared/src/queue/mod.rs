//! The work queue between the processor and the worker. It carries ids only ([`WorkItem`]);
//! PostgreSQL holds every message's state. The [`Queue`] trait is shaped like SQS FIFO (message
//! groups, deduplication ids, visibility timeout, receive count, dead-letter after N receives) so
//! that the implementations are interchangeable by configuration ([`QueueConfig`]) and nothing
//! else in the code knows which one runs:
//! - [`sqs`]: Amazon SQS FIFO (the cloud; moto locally);
//! - [`redis`]: the same semantics on Redis in Lua (the local stack and most tests).

mod redis;
mod sqs;

pub use self::redis::{RedisQueue, RedisQueueConfig};
pub use self::sqs::{SqsQueue, SqsQueueConfig, DEFAULT_SEND_CONCURRENCY};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

/// What the processor enqueues for one message: ids only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    pub message_id: i64,
    pub tenant_id: Uuid,
    pub device_id: Uuid,
}

impl WorkItem {
    /// FIFO group: one device sends one message at a time, in order.
    pub fn group_id(&self) -> String {
        self.device_id.to_string()
    }

    /// Deduplication id: the message id plus how many times it was enqueued, so a rescue
    /// re-enqueue is a new message while a repeated send of the same enqueue is dropped.
    pub fn dedup_id(&self, enqueue_count: i32) -> String {
        format!("{}-{}", self.message_id, enqueue_count)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub group_id: String,
    pub dedup_id: String,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: String,
    pub group_id: String,
    pub dedup_id: String,
    pub receive_count: u32,
    pub sent_timestamp_ms: i64,
    pub first_receive_timestamp_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueStats {
    /// Messages waiting to be received.
    pub visible: u64,
    /// Messages received and neither deleted nor past their visibility timeout.
    pub in_flight: u64,
    /// Messages moved to the dead-letter queue.
    pub dead_letter: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("queue answered unexpectedly: {0}")]
    Protocol(String),
}

#[async_trait]
pub trait Queue: Send + Sync {
    /// Enqueues messages (an implementation batches as its backend allows). A message whose
    /// deduplication id was seen within the window is acknowledged and dropped, as SQS does.
    /// Returns how many the backend acknowledged; SQS acknowledges a dropped duplicate like a new
    /// message, so no caller may read the count as "new messages".
    async fn send_batch(&self, messages: &[OutgoingMessage]) -> Result<usize, QueueError>;
    /// Receives up to `max` (at most 10) messages, hiding them for `visibility`.
    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError>;
    /// Deletes a received message. A stale receipt (the message was received again since) is ignored.
    async fn delete(&self, receipt_handle: &str) -> Result<(), QueueError>;
    /// Deletes several received messages in one call (SQS `DeleteMessageBatch`, up to 10).
    async fn delete_batch(&self, receipt_handles: &[String]) -> Result<(), QueueError> {
        for r in receipt_handles {
            self.delete(r).await?;
        }
        Ok(())
    }
    /// Makes a received message visible again after `timeout` (0 = now).
    async fn change_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), QueueError>;
    async fn stats(&self) -> Result<QueueStats, QueueError>;
}

/// Enqueues work items with their FIFO group and deduplication id.
pub async fn enqueue_items(
    queue: &dyn Queue,
    items: &[(WorkItem, i32)],
) -> Result<usize, QueueError> {
    let messages: Vec<OutgoingMessage> = items
        .iter()
        .map(|(item, enqueue_count)| {
            Ok(OutgoingMessage {
                group_id: item.group_id(),
                dedup_id: item.dedup_id(*enqueue_count),
                body: serde_json::to_string(item)
                    .map_err(|e| QueueError::Protocol(e.to_string()))?,
            })
        })
        .collect::<Result<_, QueueError>>()?;
    queue.send_batch(&messages).await
}

/// Which queue backend runs, chosen by configuration only (`QUEUE_BACKEND`).
#[derive(Debug, Clone)]
pub enum QueueConfig {
    Redis(RedisQueueConfig),
    Sqs(SqsQueueConfig),
}

impl QueueConfig {
    /// `QUEUE_BACKEND` = `redis` (default) or `sqs`.
    /// - redis: `REDIS_URL`, `QUEUE_PREFIX` (default `wabcast`), `QUEUE_MAX_RECEIVES` (default 5);
    /// - sqs: `SQS_QUEUE_URL` (required, a `.fifo` queue), `SQS_DLQ_URL` (for the dead-letter
    ///   count), `SQS_ENDPOINT_URL` (local emulation only), `SQS_WAIT_SECONDS` (default 0);
    ///   region and credentials from the standard AWS chain (`AWS_REGION`, …).
    pub fn from_env() -> Result<Self, crate::config::ConfigError> {
        use crate::config;
        let optional = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let backend = config::string_or("QUEUE_BACKEND", "redis");
        match backend.as_str() {
            "redis" => Ok(Self::Redis(RedisQueueConfig {
                url: config::string_or("REDIS_URL", "redis://127.0.0.1:6379"),
                prefix: config::string_or("QUEUE_PREFIX", "wabcast"),
                max_receives: config::parsed_or("QUEUE_MAX_RECEIVES", 5u32)?,
                dedup_window: Duration::from_secs(300),
            })),
            "sqs" => Ok(Self::Sqs(SqsQueueConfig {
                queue_url: config::required("SQS_QUEUE_URL")?,
                dlq_url: optional("SQS_DLQ_URL"),
                endpoint_url: optional("SQS_ENDPOINT_URL"),
                region: optional("AWS_REGION").or_else(|| optional("AWS_DEFAULT_REGION")),
                wait_time: Duration::from_secs(
                    config::parsed_or("SQS_WAIT_SECONDS", 0u64)?.min(20),
                ),
                // An emulator endpoint without credentials in the environment: sign with
                // placeholders (moto accepts any). Never applies without an endpoint override.
                emulator_credentials: optional("SQS_ENDPOINT_URL").is_some()
                    && optional("AWS_ACCESS_KEY_ID").is_none()
                    && optional("AWS_PROFILE").is_none(),
                send_concurrency: config::count_or(
                    "SQS_SEND_CONCURRENCY",
                    DEFAULT_SEND_CONCURRENCY as i64,
                )? as usize,
            })),
            other => Err(config::ConfigError::Invalid {
                name: "QUEUE_BACKEND",
                value: other.to_string(),
                problem: "supported: redis, sqs".into(),
            }),
        }
    }

    pub async fn connect(&self) -> Result<std::sync::Arc<dyn Queue>, QueueError> {
        match self {
            Self::Redis(c) => Ok(std::sync::Arc::new(RedisQueue::connect(c.clone()).await?)),
            Self::Sqs(c) => Ok(std::sync::Arc::new(SqsQueue::connect(c.clone()).await?)),
        }
    }
}

/// Turns received queue messages into the `SqsEvent` that the SQS event source would hand the
/// worker (the local emulator and tests play the event source with this).
pub fn to_sqs_event(
    messages: &[ReceivedMessage],
    queue_arn: &str,
) -> aws_lambda_events::event::sqs::SqsEvent {
    use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
    let records = messages
        .iter()
        .map(|m| {
            let mut r = SqsMessage::default();
            r.message_id = Some(m.message_id.clone());
            r.receipt_handle = Some(m.receipt_handle.clone());
            r.body = Some(m.body.clone());
            r.event_source = Some("aws:sqs".into());
            r.event_source_arn = Some(queue_arn.to_string());
            r.aws_region = Some("local".into());
            for (k, v) in [
                ("MessageGroupId", m.group_id.clone()),
                ("MessageDeduplicationId", m.dedup_id.clone()),
                ("ApproximateReceiveCount", m.receive_count.to_string()),
                ("SentTimestamp", m.sent_timestamp_ms.to_string()),
                (
                    "ApproximateFirstReceiveTimestamp",
                    m.first_receive_timestamp_ms.to_string(),
                ),
            ] {
                r.attributes.insert(k.to_string(), v);
            }
            r
        })
        .collect();
    let mut event = SqsEvent::default();
    event.records = records;
    event
}
