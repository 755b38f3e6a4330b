//! The queue on Amazon SQS FIFO (aws-sdk-sqs). SQS keeps the semantics itself: message group =
//! device id, content-independent deduplication ids, visibility timeout, receive count, and the
//! dead-letter queue through the queue's redrive policy (so `max_receives` is a property of the
//! queue, set in the template, not of this client). In the cloud the Lambda event source mapping
//! does the receiving and deleting; this client sends (processor), and receives/deletes where the
//! local emulator plays the event source against SQS or moto.
//!
//! TLS goes through rustls on ring (the provider reqwest already brings), not aws-lc, so the
//! workspace builds without a C crypto library and cross-compiles with cargo-lambda's zig.

use super::{OutgoingMessage, Queue, QueueError, QueueStats, ReceivedMessage};
use async_trait::async_trait;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use std::collections::HashMap;
use std::time::Duration;

/// Where the queue is and how to reach it. Credentials and region come from the standard AWS
/// chain (environment, profile, container or instance role).
#[derive(Debug, Clone)]
pub struct SqsQueueConfig {
    /// The FIFO queue (`…/name.fifo`).
    pub queue_url: String,
    /// Its dead-letter queue, for the dead-letter count in `stats` (optional: SQS moves messages
    /// there by itself; without it the count reads 0).
    pub dlq_url: Option<String>,
    /// Endpoint override for local emulation (moto, LocalStack); `None` in the cloud.
    pub endpoint_url: Option<String>,
    /// Region when the environment names none; else taken from the queue URL's host.
    pub region: Option<String>,
    /// Long-poll wait of `receive` (0–20 s).
    pub wait_time: Duration,
    /// Sign with fixed placeholder credentials: for an emulator (moto accepts any), never for AWS.
    pub emulator_credentials: bool,
    /// `SendMessageBatch` calls in flight at once in `send_batch` (at least 1; see there).
    pub send_concurrency: usize,
}

/// The default of [`SqsQueueConfig::send_concurrency`].
pub const DEFAULT_SEND_CONCURRENCY: usize = 16;

/// The queue on SQS FIFO.
#[derive(Clone)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    config: SqsQueueConfig,
}

/// SQS takes at most ten entries per batch call.
const SQS_BATCH: usize = 10;

impl SqsQueue {
    /// Builds a client from the standard AWS configuration chain.
    pub async fn connect(config: SqsQueueConfig) -> Result<Self, QueueError> {
        if !config.queue_url.ends_with(".fifo") {
            return Err(QueueError::Unavailable(format!(
                "SQS queue {} is not a FIFO queue (its name must end in .fifo)",
                config.queue_url
            )));
        }
        let client = client(&config, region_of(&config.queue_url)).await?;
        Ok(Self { client, config })
    }

    /// Creates (or finds) the FIFO queue `name` with its FIFO dead-letter queue `name-dlq` and a
    /// redrive policy of `max_receives`, as the cloud template does. For local emulation and tests;
    /// in AWS the template owns the queues. Returns the configuration that reaches them.
    pub async fn create_fifo_with_dlq(
        mut config: SqsQueueConfig,
        name: &str,
        max_receives: u32,
        visibility: Duration,
    ) -> Result<SqsQueueConfig, QueueError> {
        let name = name.trim_end_matches(".fifo");
        let client = client(&config, None).await?;
        let fifo = |n: String| {
            client
                .create_queue()
                .queue_name(n)
                .attributes(QueueAttributeName::FifoQueue, "true")
        };
        let dlq_url = fifo(format!("{name}-dlq.fifo"))
            .send()
            .await
            .map_err(sdk_error)?
            .queue_url()
            .ok_or_else(|| QueueError::Protocol("create_queue returned no URL".into()))?
            .to_string();
        let dlq_arn = client
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(sdk_error)?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .ok_or_else(|| QueueError::Protocol("dead-letter queue without ARN".into()))?;
        let redrive = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": max_receives,
        })
        .to_string();
        let queue_url = fifo(format!("{name}.fifo"))
            .attributes(QueueAttributeName::RedrivePolicy, redrive)
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                seconds(visibility).to_string(),
            )
            .send()
            .await
            .map_err(sdk_error)?
            .queue_url()
            .ok_or_else(|| QueueError::Protocol("create_queue returned no URL".into()))?
            .to_string();
        config.queue_url = queue_url;
        config.dlq_url = Some(dlq_url);
        Ok(config)
    }

    async fn depth(&self, url: &str) -> Result<(u64, u64), QueueError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(sdk_error)?;
        let attrs = out.attributes();
        let get = |k: QueueAttributeName| -> Result<u64, QueueError> {
            attrs
                .and_then(|a| a.get(&k))
                .map(|v| v.parse::<u64>())
                .transpose()
                .map_err(|e| QueueError::Protocol(format!("queue attribute {k}: {e}")))
                .map(|v| v.unwrap_or(0))
        };
        Ok((
            get(QueueAttributeName::ApproximateNumberOfMessages)?,
            get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?,
        ))
    }
}

/// One SQS client: rustls on ring, the standard credential chain (or the emulator's placeholder
/// credentials), the region from the environment, else the configuration, else `fallback_region`.
async fn client(
    config: &SqsQueueConfig,
    fallback_region: Option<String>,
) -> Result<aws_sdk_sqs::Client, QueueError> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
    if let Some(endpoint) = &config.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    if config.emulator_credentials {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "emulator",
            "emulator",
            None,
            None,
            "wabcast-emulator",
        ));
        // An emulator has no instance metadata to ask: with the region known, the default
        // chain would still try IMDS (a second's timeout and a warning) before falling back.
        if let Some(region) = config.region.clone().or_else(|| fallback_region.clone()) {
            loader = loader.region(aws_sdk_sqs::config::Region::new(region));
        }
    }
    let sdk = loader.load().await;
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .or_else(|| config.region.clone())
        .or(fallback_region)
        .ok_or_else(|| QueueError::Unavailable("no AWS region: set AWS_REGION".to_string()))?;
    let conf = aws_sdk_sqs::config::Builder::from(&sdk)
        .region(aws_sdk_sqs::config::Region::new(region))
        .build();
    Ok(aws_sdk_sqs::Client::from_conf(conf))
}

/// `https://sqs.eu-west-1.amazonaws.com/123/q.fifo` → `eu-west-1`.
fn region_of(queue_url: &str) -> Option<String> {
    let host = url::Url::parse(queue_url).ok()?.host_str()?.to_string();
    let mut parts = host.split('.');
    match (parts.next(), parts.next()) {
        (Some("sqs"), Some(region)) if region.contains('-') => Some(region.to_string()),
        _ => None,
    }
}

/// Whole seconds, as SQS takes them, rounded up so a short timeout never becomes zero.
fn seconds(d: Duration) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s).unwrap_or(i32::MAX)
}

impl SqsQueue {
    /// One lane of [`Queue::send_batch`]: its calls of ten, one after the other.
    async fn send_lane(&self, lane: &[&OutgoingMessage]) -> Result<usize, QueueError> {
        let mut accepted = 0usize;
        for chunk in lane.chunks(SQS_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(&m.body)
                        .message_group_id(&m.group_id)
                        .message_deduplication_id(&m.dedup_id)
                        .build()
                        .map_err(|e| QueueError::Protocol(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .send_message_batch()
                .queue_url(&self.config.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sdk_error)?;
            if let Some(f) = out.failed().first() {
                return Err(QueueError::Protocol(format!(
                    "SQS refused a message ({}): {}",
                    f.code(),
                    f.message().unwrap_or("")
                )));
            }
            accepted += out.successful().len();
        }
        Ok(accepted)
    }
}

/// Splits messages into `n` lanes by a hash of their group id, keeping their order within each
/// lane (and so within each group).
fn lanes_by_group(messages: &[OutgoingMessage], n: usize) -> Vec<Vec<&OutgoingMessage>> {
    use std::hash::{Hash, Hasher};
    let mut lanes: Vec<Vec<&OutgoingMessage>> = vec![Vec::new(); n];
    for m in messages {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        m.group_id.hash(&mut h);
        lanes[(h.finish() % n as u64) as usize].push(m);
    }
    lanes
}

fn sdk_error<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
    e: SdkError<E, R>,
) -> QueueError {
    match &e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            QueueError::Protocol(format!(
                "{}: {}",
                err.code().unwrap_or("unknown error"),
                err.message().unwrap_or("")
            ))
        }
        other => QueueError::Unavailable(format!("{other:?}")),
    }
}

/// A service error that says the receipt no longer names an in-flight message.
fn is_stale_receipt<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    match e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("");
            let message = s.err().message().unwrap_or("");
            code.ends_with("MessageNotInflight")
                || (code.ends_with("InvalidParameterValue")
                    && (message.contains("expired") || message.contains("not available")))
        }
        _ => false,
    }
}

#[async_trait]
impl Queue for SqsQueue {
    /// Sends in calls of ten, `send_concurrency` calls in flight at once: one claim of a thousand
    /// devices is a hundred calls, a round trip each, which one after the other would hold the
    /// processor's pass for a second or more. Each message group goes to one lane (by a hash of
    /// its id) and a lane sends its calls in order, so a group's messages reach SQS, and are
    /// delivered, in the order given.
    ///
    /// An error fails the whole send (the calls still in flight are dropped): the processor
    /// has committed its claim already, so the rows stay `queued` and the rescuer enqueues them
    /// again after their lease; what did reach SQS is deduplicated on the resend by its id.
    async fn send_batch(&self, messages: &[OutgoingMessage]) -> Result<usize, QueueError> {
        let lanes = lanes_by_group(messages, self.config.send_concurrency.max(1));
        let sent = futures::future::try_join_all(
            lanes
                .iter()
                .filter(|lane| !lane.is_empty())
                .map(|lane| self.send_lane(lane)),
        )
        .await?;
        Ok(sent.into_iter().sum())
    }

    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.config.queue_url)
            .max_number_of_messages(max.clamp(1, SQS_BATCH) as i32)
            .visibility_timeout(seconds(visibility))
            .wait_time_seconds(seconds(self.config.wait_time).min(20))
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(sdk_error)?;
        out.messages()
            .iter()
            .map(|m| {
                let empty = HashMap::new();
                let attrs = m.attributes().unwrap_or(&empty);
                let text = |k: MessageSystemAttributeName| attrs.get(&k).cloned();
                let number = |k: MessageSystemAttributeName| -> i64 {
                    text(k).and_then(|v| v.parse().ok()).unwrap_or(0)
                };
                Ok(ReceivedMessage {
                    message_id: m.message_id().unwrap_or_default().to_string(),
                    receipt_handle: m
                        .receipt_handle()
                        .ok_or_else(|| QueueError::Protocol("message without receipt".into()))?
                        .to_string(),
                    body: m.body().unwrap_or_default().to_string(),
                    group_id: text(MessageSystemAttributeName::MessageGroupId).ok_or_else(
                        || QueueError::Protocol("message without group (not FIFO?)".into()),
                    )?,
                    dedup_id: text(MessageSystemAttributeName::MessageDeduplicationId)
                        .unwrap_or_default(),
                    receive_count: number(MessageSystemAttributeName::ApproximateReceiveCount)
                        as u32,
                    sent_timestamp_ms: number(MessageSystemAttributeName::SentTimestamp),
                    first_receive_timestamp_ms: number(
                        MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
                    ),
                })
            })
            .collect()
    }

    async fn delete(&self, receipt_handle: &str) -> Result<(), QueueError> {
        self.client
            .delete_message()
            .queue_url(&self.config.queue_url)
            .receipt_handle(receipt_handle)
            .send()
            .await
            .map(|_| ())
            .map_err(sdk_error)
    }

    async fn delete_batch(&self, receipt_handles: &[String]) -> Result<(), QueueError> {
        for chunk in receipt_handles.chunks(SQS_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .map_err(|e| QueueError::Protocol(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&self.config.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sdk_error)?;
            if let Some(f) = out.failed().first() {
                return Err(QueueError::Protocol(format!(
                    "SQS did not delete a message ({}): {}",
                    f.code(),
                    f.message().unwrap_or("")
                )));
            }
        }
        Ok(())
    }

    async fn change_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        match self
            .client
            .change_message_visibility()
            .queue_url(&self.config.queue_url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(seconds(timeout))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // The message is no longer ours (deleted, or visible again): nothing to change.
            Err(e) if is_stale_receipt(&e) => Ok(()),
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let (visible, in_flight) = self.depth(&self.config.queue_url).await?;
        let dead_letter = match &self.config.dlq_url {
            Some(dlq) => {
                let (v, f) = self.depth(dlq).await?;
                v + f
            }
            None => 0,
        };
        Ok(QueueStats {
            visible,
            in_flight,
            dead_letter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_comes_from_an_aws_queue_url() {
        assert_eq!(
            region_of("https://sqs.ap-southeast-1.amazonaws.com/123456789012/wabcast.fifo")
                .as_deref(),
            Some("ap-southeast-1")
        );
        assert_eq!(region_of("http://127.0.0.1:5000/123/q.fifo"), None);
    }

    #[test]
    fn lanes_keep_each_groups_order_and_every_message() {
        let messages: Vec<OutgoingMessage> = (0..200)
            .map(|i| OutgoingMessage {
                group_id: format!("device-{}", i % 37),
                dedup_id: format!("m{i}"),
                body: format!("{i}"),
            })
            .collect();
        for n in [1, 4, 16] {
            let lanes = lanes_by_group(&messages, n);
            assert_eq!(lanes.len(), n);
            assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 200);
            if n > 1 {
                assert!(lanes.iter().filter(|l| !l.is_empty()).count() > 1, "spread");
            }
            for g in 0..37 {
                let group = format!("device-{g}");
                let holding: Vec<&Vec<&OutgoingMessage>> = lanes
                    .iter()
                    .filter(|l| l.iter().any(|m| m.group_id == group))
                    .collect();
                assert_eq!(holding.len(), 1, "a group in one lane");
                let order: Vec<usize> = holding[0]
                    .iter()
                    .filter(|m| m.group_id == group)
                    .map(|m| m.body.parse().unwrap())
                    .collect();
                let want: Vec<usize> = (0..200).filter(|i| i % 37 == g).collect();
                assert_eq!(order, want, "group {g} in order");
            }
        }
    }

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(seconds(Duration::ZERO), 0);
        assert_eq!(seconds(Duration::from_millis(1)), 1);
        assert_eq!(seconds(Duration::from_secs(30)), 30);
    }
}
