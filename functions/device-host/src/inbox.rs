//! The host's durable inbox of inbound opt-outs (`HOST_DATA_DIR/inbox.jsonl`).
//!
//! WhatsApp drops a contact's message from its server once a session acknowledges it. The host
//! appends a STOP here, synced to disk, before the web session acknowledges it (the session's
//! durability hook waits for [`crate::service::OptOuts::keep`]) and before it writes the opt-out
//! to PostgreSQL, and marks it done, synced too, once that write has committed durably. When the database is failing, the STOP waits here: the event writer keeps
//! trying in the background, and a host that stops meanwhile (a deploy, a crash, SIGKILL) writes
//! it again when it starts on the same data directory ([`Inbox::open`] returns what is left).
//!
//! Replaying a STOP is harmless: an opt-out of a number already on the list changes nothing
//! (`repo::leads::opt_out_lead`). A done mark is synced all the same, so that a STOP recorded,
//! then reversed by an operator's opt-in, is not replayed over the opt-in.
//!
//! What this cannot cover: a host whose disk is gone for good (its replacement starts with an
//! empty inbox). A web session's STOP that never reached the inbox was never acknowledged, and
//! WhatsApp delivers it again. Nothing
//! here ever drops an entry it read: a line it cannot parse is logged as an error, whole, and kept
//! out of the compacted file only once it has been logged.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// An inbound opt-out as the inbox keeps it until it is recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundStop {
    /// The entry's own id (its done mark names it).
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub device_id: Uuid,
    /// The sender, E.164.
    pub from: String,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Stop(InboundStop),
    Done { id: Uuid },
}

/// The journal file, opened for appending.
pub struct Inbox {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Inbox {
    /// Opens (creating) `dir/inbox.jsonl` and returns it with the STOPs it holds that were never
    /// marked done, oldest first. The file is compacted to those entries first (written beside
    /// it, synced, renamed over it), so that it does not grow with every STOP ever received.
    pub fn open(dir: &Path) -> anyhow::Result<(Arc<Self>, Vec<InboundStop>)> {
        use anyhow::Context;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let path = dir.join("inbox.jsonl");
        let pending = Self::read(&path)?;
        let tmp = dir.join("inbox.jsonl.tmp");
        {
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("failed to write {}", tmp.display()))?;
            for stop in &pending {
                f.write_all(&to_line(&Line::Stop(stop.clone()))?)?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("failed to replace {}", path.display()))?;
        // the rename itself is durable once the directory is synced
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("failed to sync {}", dir.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        Ok((
            Arc::new(Self {
                path,
                file: Mutex::new(file),
            }),
            pending,
        ))
    }

    /// The STOPs of a journal file without a done mark, in the order they came (a missing file
    /// holds none). A torn last line (a crash mid-append) was never acknowledged as written and
    /// is skipped; any other line that does not parse is logged whole as an error.
    pub fn read(path: &Path) -> anyhow::Result<Vec<InboundStop>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let torn_tail = !text.is_empty() && !text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        let mut pending: Vec<InboundStop> = Vec::new();
        for (i, raw) in lines.iter().enumerate() {
            if raw.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Line>(raw) {
                Ok(Line::Stop(stop)) => pending.push(stop),
                Ok(Line::Done { id }) => pending.retain(|s| s.id != id),
                Err(_) if torn_tail && i + 1 == lines.len() => {
                    tracing::warn!(path = %path.display(), "ignoring the inbox's torn last line (a crash while appending it)");
                }
                Err(e) => tracing::error!(
                    path = %path.display(),
                    line = i + 1,
                    content = %raw,
                    error = %e,
                    "an inbox line does not parse; if it is a STOP, record it by hand with `wabcast leads opt-out`"
                ),
            }
        }
        Ok(pending)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a STOP and syncs it; returns once it is on disk.
    pub async fn record(self: &Arc<Self>, stop: &InboundStop) -> anyhow::Result<()> {
        self.append(Line::Stop(stop.clone())).await
    }

    /// Marks a STOP recorded in PostgreSQL (durably committed), synced.
    pub async fn done(self: &Arc<Self>, id: Uuid) -> anyhow::Result<()> {
        self.append(Line::Done { id }).await
    }

    async fn append(self: &Arc<Self>, line: Line) -> anyhow::Result<()> {
        let bytes = to_line(&line)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut file = me
                .file
                .lock()
                .map_err(|_| anyhow::anyhow!("inbox lock poisoned"))?;
            file.write_all(&bytes)?;
            file.sync_data()?;
            Ok(())
        })
        .await?
    }
}

fn to_line(line: &Line) -> anyhow::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(line)?;
    bytes.push(b'\n');
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn stop(from: &str) -> InboundStop {
        InboundStop {
            id: Uuid::new_v4(),
            tenant_id: Uuid::new_v4(),
            device_id: Uuid::new_v4(),
            from: from.into(),
            received_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn what_was_not_marked_done_comes_back_after_a_restart_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, pending) = Inbox::open(dir.path()).unwrap();
        assert!(pending.is_empty());
        let (a, b, c) = (
            stop("+60121111111"),
            stop("+60122222222"),
            stop("+60123333333"),
        );
        for s in [&a, &b, &c] {
            inbox.record(s).await.unwrap();
        }
        inbox.done(b.id).await.unwrap();
        drop(inbox);
        let (inbox, pending) = Inbox::open(dir.path()).unwrap();
        assert_eq!(pending, vec![a.clone(), c.clone()]);
        // compacted: only what is left, and a done mark written after reopening still counts
        let text = std::fs::read_to_string(inbox.path()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        inbox.done(a.id).await.unwrap();
        drop(inbox);
        let (_, pending) = Inbox::open(dir.path()).unwrap();
        assert_eq!(pending, vec![c]);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_skipped_and_a_corrupt_line_does_not_hide_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = Inbox::open(dir.path()).unwrap();
        let (a, b) = (stop("+60121111111"), stop("+60122222222"));
        inbox.record(&a).await.unwrap();
        let path = inbox.path().to_path_buf();
        drop(inbox);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"op\":\"stop\",\"garbage\n").unwrap();
        f.write_all(&to_line(&Line::Stop(b.clone())).unwrap())
            .unwrap();
        f.write_all(b"{\"op\":\"done\",\"id\":\"").unwrap();
        drop(f);
        let (_, pending) = Inbox::open(dir.path()).unwrap();
        assert_eq!(pending, vec![a, b]);
    }
}
