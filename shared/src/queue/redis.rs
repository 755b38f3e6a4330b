//! The queue on Redis with SQS FIFO semantics, for the local stack and tests. One Lua script per
//! operation, so each operation is atomic however many processors, emulators or tests share the
//! Redis:
//! - `g:<group>` lists the group's undeleted messages in order; a group with messages in flight
//!   is locked (its score in `ready` lies in the future) until they are deleted or their
//!   visibility timeout passes, which gives per-group order like SQS FIFO;
//! - a message received more than `max_receives` times goes to the dead-letter list instead;
//! - `dedup:<id>` remembers a deduplication id for five minutes, as SQS does (and, unlike moto,
//!   after the message is deleted too).

use super::{OutgoingMessage, Queue, QueueError, QueueStats, ReceivedMessage};
use async_trait::async_trait;
use serde::Deserialize;
use std::time::Duration;

/// Settings that SQS keeps on the queue itself (redrive policy, deduplication window).
#[derive(Debug, Clone)]
pub struct RedisQueueConfig {
    pub url: String,
    /// Key prefix: one queue per prefix, so tests can share a Redis.
    pub prefix: String,
    /// Receives after which a message goes to the dead-letter list (SQS `maxReceiveCount`).
    pub max_receives: u32,
    pub dedup_window: Duration,
}

const ENQUEUE: &str = r#"
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local accepted = 0
for i = 3, #ARGV, 3 do
  local group, dedup, body = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('SET', p .. ':dedup:' .. dedup, '1', 'NX', 'PX', ARGV[2]) then
    local id = redis.call('INCR', p .. ':seq')
    redis.call('HSET', p .. ':m:' .. id, 'body', body, 'group', group, 'dedup', dedup, 'rc', 0, 'sent', now, 'first', 0)
    redis.call('RPUSH', p .. ':g:' .. group, id)
    redis.call('ZADD', p .. ':ready', 'NX', now, group)
    redis.call('INCR', p .. ':count')
    accepted = accepted + 1
  end
end
return accepted
"#;

const RECEIVE: &str = r#"
local p, max, vis, maxrc = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local groups = redis.call('ZRANGEBYSCORE', p .. ':ready', '-inf', now, 'LIMIT', 0, max)
for _, g in ipairs(groups) do
  if #out >= max then break end
  local glist = p .. ':g:' .. g
  local taken, idx = 0, 0
  while #out < max do
    local id = redis.call('LINDEX', glist, idx)
    if not id then break end
    local mk = p .. ':m:' .. id
    local h = redis.call('HMGET', mk, 'rc', 'body', 'dedup', 'sent', 'first')
    local rc = tonumber(h[1])
    if rc >= maxrc then
      redis.call('LREM', glist, 1, id)
      redis.call('RPUSH', p .. ':dlq', cjson.encode({id = id, group = g, body = h[2], dedup = h[3], receive_count = rc, at = now}))
      redis.call('DEL', mk)
      redis.call('ZREM', p .. ':ifl', id)
      redis.call('DECR', p .. ':count')
    else
      rc = rc + 1
      local first = tonumber(h[5])
      if rc == 1 then
        first = now
        redis.call('HSET', mk, 'rc', rc, 'first', now)
      else
        redis.call('HSET', mk, 'rc', rc)
      end
      redis.call('ZADD', p .. ':ifl', now + vis, id)
      table.insert(out, {id = id, receipt = id .. ':' .. rc, body = h[2], group = g, dedup = h[3],
        rc = rc, sent = tonumber(h[4]), first = first})
      taken = taken + 1
      idx = idx + 1
    end
  end
  if taken > 0 then
    redis.call('ZADD', p .. ':ready', now + vis, g)
    redis.call('HSET', p .. ':gin', g, taken)
  elseif redis.call('LLEN', glist) == 0 then
    redis.call('ZREM', p .. ':ready', g)
    redis.call('HDEL', p .. ':gin', g)
  end
end
if #out == 0 then return '[]' end
return cjson.encode(out)
"#;

/// Deletes every receipt in ARGV[2..]; returns -1 if one is malformed (nothing is deleted then).
const DELETE: &str = r#"
local p = ARGV[1]
for i = 2, #ARGV do
  if not string.match(ARGV[i], '^(%d+):(%d+)$') then return -1 end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deleted = 0
for i = 2, #ARGV do
  local id, rc = string.match(ARGV[i], '^(%d+):(%d+)$')
  local mk = p .. ':m:' .. id
  local h = redis.call('HMGET', mk, 'rc', 'group')
  if h[1] and h[1] == rc then
    local g = h[2]
    local glist = p .. ':g:' .. g
    redis.call('LREM', glist, 1, id)
    redis.call('DEL', mk)
    redis.call('ZREM', p .. ':ifl', id)
    redis.call('DECR', p .. ':count')
    deleted = deleted + 1
    local n = redis.call('HINCRBY', p .. ':gin', g, -1)
    if n <= 0 then
      redis.call('HDEL', p .. ':gin', g)
      if redis.call('LLEN', glist) > 0 then
        redis.call('ZADD', p .. ':ready', now, g)
      else
        redis.call('ZREM', p .. ':ready', g)
      end
    end
  end
end
return deleted
"#;

const CHANGE_VISIBILITY: &str = r#"
local p = ARGV[1]
local id, rc = string.match(ARGV[2], '^(%d+):(%d+)$')
if not id then return -1 end
local mk = p .. ':m:' .. id
local cur = redis.call('HGET', mk, 'rc')
if (not cur) or cur ~= rc then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at = now + tonumber(ARGV[3])
local g = redis.call('HGET', mk, 'group')
redis.call('ZADD', p .. ':ifl', at, id)
redis.call('ZADD', p .. ':ready', 'XX', at, g)
return 1
"#;

const STATS: &str = r#"
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = tonumber(redis.call('GET', p .. ':count') or '0')
local ifl = redis.call('ZCOUNT', p .. ':ifl', '(' .. now, '+inf')
local dlq = redis.call('LLEN', p .. ':dlq')
return {total, ifl, dlq}
"#;

/// The queue on Redis, with SQS FIFO semantics.
#[derive(Clone)]
pub struct RedisQueue {
    conn: redis::aio::ConnectionManager,
    config: RedisQueueConfig,
    enqueue: redis::Script,
    receive: redis::Script,
    delete: redis::Script,
    change_visibility: redis::Script,
    stats: redis::Script,
}

#[derive(Deserialize)]
struct LuaReceived {
    id: String,
    receipt: String,
    body: String,
    group: String,
    dedup: String,
    rc: u32,
    sent: i64,
    first: i64,
}

fn unavailable(e: redis::RedisError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

impl RedisQueue {
    pub async fn connect(config: RedisQueueConfig) -> Result<Self, QueueError> {
        let client = redis::Client::open(config.url.as_str()).map_err(unavailable)?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(unavailable)?;
        Ok(Self {
            conn,
            config,
            enqueue: redis::Script::new(ENQUEUE),
            receive: redis::Script::new(RECEIVE),
            delete: redis::Script::new(DELETE),
            change_visibility: redis::Script::new(CHANGE_VISIBILITY),
            stats: redis::Script::new(STATS),
        })
    }

    /// Runs a script that acts on one received message (delete, change visibility).
    async fn on_receipt(
        &self,
        script: &redis::Script,
        receipt_handle: &str,
        arg: Option<u64>,
    ) -> Result<(), QueueError> {
        let mut inv = script.prepare_invoke();
        inv.arg(&self.config.prefix).arg(receipt_handle);
        if let Some(a) = arg {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        let r: i64 = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        if r < 0 {
            return Err(QueueError::Protocol(format!(
                "malformed receipt handle {receipt_handle:?}"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Queue for RedisQueue {
    async fn send_batch(&self, messages: &[OutgoingMessage]) -> Result<usize, QueueError> {
        let mut accepted = 0usize;
        for chunk in messages.chunks(500) {
            let mut inv = self.enqueue.prepare_invoke();
            inv.arg(&self.config.prefix)
                .arg(self.config.dedup_window.as_millis() as u64);
            for m in chunk {
                inv.arg(&m.group_id).arg(&m.dedup_id).arg(&m.body);
            }
            let mut conn = self.conn.clone();
            let n: usize = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
            accepted += n;
        }
        Ok(accepted)
    }

    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let max = max.clamp(1, 10);
        let mut conn = self.conn.clone();
        let raw: String = self
            .receive
            .prepare_invoke()
            .arg(&self.config.prefix)
            .arg(max)
            .arg(visibility.as_millis() as u64)
            .arg(self.config.max_receives)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let parsed: Vec<LuaReceived> =
            serde_json::from_str(&raw).map_err(|e| QueueError::Protocol(e.to_string()))?;
        Ok(parsed
            .into_iter()
            .map(|m| ReceivedMessage {
                message_id: m.id,
                receipt_handle: m.receipt,
                body: m.body,
                group_id: m.group,
                dedup_id: m.dedup,
                receive_count: m.rc,
                sent_timestamp_ms: m.sent,
                first_receive_timestamp_ms: m.first,
            })
            .collect())
    }

    async fn delete(&self, receipt_handle: &str) -> Result<(), QueueError> {
        self.on_receipt(&self.delete, receipt_handle, None).await
    }

    async fn delete_batch(&self, receipt_handles: &[String]) -> Result<(), QueueError> {
        if receipt_handles.is_empty() {
            return Ok(());
        }
        let mut inv = self.delete.prepare_invoke();
        inv.arg(&self.config.prefix);
        for r in receipt_handles {
            inv.arg(r);
        }
        let mut conn = self.conn.clone();
        let n: i64 = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        if n < 0 {
            return Err(QueueError::Protocol(
                "malformed receipt handle in batch".into(),
            ));
        }
        Ok(())
    }

    async fn change_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        self.on_receipt(
            &self.change_visibility,
            receipt_handle,
            Some(timeout.as_millis() as u64),
        )
        .await
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let mut conn = self.conn.clone();
        let (total, in_flight, dead_letter): (u64, u64, u64) = self
            .stats
            .prepare_invoke()
            .arg(&self.config.prefix)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(QueueStats {
            visible: total.saturating_sub(in_flight),
            in_flight,
            dead_letter,
        })
    }
}
