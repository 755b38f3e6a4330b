//! The simulator provider: per-device sessions that connect, can be set offline, accept sends
//! with configurable latency and failure rates, emit delivered/read receipts, and append every
//! accepted send to a durable log (JSON lines) that tests and benchmarks read to prove that no
//! message was sent twice. Its decisions are deterministic: whether a number "is on WhatsApp"
//! depends only on the seed and the number; whether a send fails transiently, only on the seed
//! and the provider message id and attempt.

use crate::provider::{DeviceRef, Outbound, Provider, ProviderError, ProviderEvent};
use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use shared::domain::{DeviceStatus, PhoneE164, ProviderKind};
use shared::host_api::PairingBody;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub latency: Duration,
    /// Extra latency drawn uniformly in [0, jitter].
    pub latency_jitter: Duration,
    /// Share of numbers that are not on WhatsApp (by number, deterministic).
    pub not_on_whatsapp_rate: f64,
    /// Share of send attempts that fail transiently (deterministic per id and attempt).
    pub transient_rate: f64,
    /// Emit a delivered receipt this long after a send (`None`: no receipts).
    pub delivered_after: Option<Duration>,
    pub read_after: Option<Duration>,
    pub read_rate: f64,
    /// The send log ("what the simulated WhatsApp has accepted"); `None`: `sim-sends.jsonl` in
    /// the host's data directory. Hosts that share one file play one WhatsApp: a host taking
    /// over a device sees what the previous owner sent.
    pub log_path: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            not_on_whatsapp_rate: 0.0,
            transient_rate: 0.0,
            delivered_after: Some(Duration::from_millis(500)),
            read_after: Some(Duration::from_secs(2)),
            read_rate: 0.5,
            log_path: None,
        }
    }
}

/// One line of the durable send log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendLogEntry {
    pub at_ms: i64,
    pub device_id: Uuid,
    pub tenant_id: Uuid,
    pub message_id: i64,
    pub provider_message_id: String,
    pub to: String,
    pub text: String,
    pub image: Option<String>,
}

/// Append-only log of accepted sends; a line is written before the send is acknowledged.
pub struct SendLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    known: Mutex<HashSet<String>>,
}

impl SendLog {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
        }
        let known = Self::read(path)?
            .into_iter()
            .map(|e| e.provider_message_id)
            .collect();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("failed to open send log {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            known: Mutex::new(known),
        })
    }

    /// Every entry of a log file (missing file = empty). A torn last line is ignored.
    pub fn read(path: &Path) -> anyhow::Result<Vec<SendLogEntry>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, entry: &SendLogEntry) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(entry)?;
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .map_err(|_| anyhow::anyhow!("send log lock poisoned"))?;
        file.write_all(&line)?;
        drop(file);
        if let Ok(mut k) = self.known.lock() {
            k.insert(entry.provider_message_id.clone());
        }
        Ok(())
    }

    /// Whether the log holds this id; on a miss the file is read again, since another host may
    /// share it (only the crash-recovery path asks about ids this process did not write).
    fn contains(&self, provider_message_id: &str) -> bool {
        let known = self
            .known
            .lock()
            .map(|k| k.contains(provider_message_id))
            .unwrap_or(false);
        if known {
            return true;
        }
        match Self::read(&self.path) {
            Ok(entries) => {
                let found = entries
                    .iter()
                    .any(|e| e.provider_message_id == provider_message_id);
                if let Ok(mut k) = self.known.lock() {
                    k.extend(entries.into_iter().map(|e| e.provider_message_id));
                }
                found
            }
            Err(_) => false,
        }
    }
}

struct SimSession {
    online: bool,
    paired: bool,
    attempts: HashMap<String, u32>,
}

pub struct Simulator {
    config: SimConfig,
    log: SendLog,
    events: mpsc::UnboundedSender<ProviderEvent>,
    sessions: Mutex<HashMap<Uuid, SimSession>>,
    /// Devices set offline by hand survive a host restart.
    offline_file: PathBuf,
}

/// A deterministic fraction in [0, 1) from a seed and a key (SplitMix64 over FNV-1a).
fn fraction(seed: u64, key: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

impl Simulator {
    pub fn new(
        config: SimConfig,
        data_dir: &Path,
        events: mpsc::UnboundedSender<ProviderEvent>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            log: SendLog::open(
                &config
                    .log_path
                    .clone()
                    .unwrap_or_else(|| data_dir.join("sim-sends.jsonl")),
            )?,
            offline_file: data_dir.join("sim-offline.json"),
            config,
            events,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    pub fn log(&self) -> &SendLog {
        &self.log
    }

    /// Whether the simulated WhatsApp knows this number.
    pub fn is_on_whatsapp(&self, phone: &str) -> bool {
        fraction(self.config.seed, phone) >= self.config.not_on_whatsapp_rate
    }

    fn offline_set(&self) -> HashSet<Uuid> {
        std::fs::read_to_string(&self.offline_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn save_offline_set(&self, set: &HashSet<Uuid>) -> anyhow::Result<()> {
        let tmp = self.offline_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(set)?)?;
        std::fs::rename(&tmp, &self.offline_file)?;
        Ok(())
    }

    /// A contact writes to the device: the text reaches the host's event writer as a web
    /// session's inbound message would (an opt-out keyword opts the number out). Refused
    /// while the device is offline: a phone without a connection receives nothing.
    pub fn receive_text(
        &self,
        device: &DeviceRef,
        from: PhoneE164,
        text: String,
    ) -> anyhow::Result<()> {
        if self.offline_set().contains(&device.id) {
            anyhow::bail!("the device is offline (simulated disconnect)");
        }
        self.events
            .send(ProviderEvent::Inbound {
                device: device.clone(),
                from,
                text,
            })
            .map_err(|_| anyhow::anyhow!("the host's event writer has stopped"))
    }

    /// Takes a device offline or brings it back, as a user unplugging a phone would.
    pub fn set_online(&self, device: &DeviceRef, online: bool) -> anyhow::Result<DeviceStatus> {
        let mut set = self.offline_set();
        if online {
            set.remove(&device.id);
        } else {
            set.insert(device.id);
        }
        self.save_offline_set(&set)?;
        let status = {
            let mut sessions = self
                .sessions
                .lock()
                .map_err(|_| anyhow::anyhow!("sessions lock poisoned"))?;
            let s = sessions.entry(device.id).or_insert(SimSession {
                online,
                paired: true,
                attempts: HashMap::new(),
            });
            s.online = online;
            if online {
                DeviceStatus::Online
            } else {
                DeviceStatus::Offline
            }
        };
        let reason = if online {
            None
        } else {
            Some("simulated disconnect".to_string())
        };
        let _ = self.events.send(ProviderEvent::Status {
            device: device.clone(),
            status,
            reason,
            restricted_until: None,
        });
        Ok(status)
    }

    fn schedule_receipts(&self, message: &Outbound) {
        let Some(delivered_after) = self.config.delivered_after else {
            return;
        };
        let read = self.config.read_after.filter(|_| {
            fraction(self.config.seed ^ 0x5eed, &message.provider_message_id)
                < self.config.read_rate
        });
        let events = self.events.clone();
        let (tenant_id, message_id) = (message.tenant_id, message.message_id);
        tokio::spawn(async move {
            tokio::time::sleep(delivered_after).await;
            let _ = events.send(ProviderEvent::Receipt {
                tenant_id,
                message_id,
                read: false,
                at: Utc::now(),
            });
            if let Some(read_after) = read {
                tokio::time::sleep(read_after.saturating_sub(delivered_after)).await;
                let _ = events.send(ProviderEvent::Receipt {
                    tenant_id,
                    message_id,
                    read: true,
                    at: Utc::now(),
                });
            }
        });
    }
}

#[async_trait]
impl Provider for Simulator {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Simulator
    }

    fn new_message_id(&self) -> String {
        format!("SIM{}", Uuid::new_v4().simple()).to_uppercase()
    }

    async fn connect(&self, device: &DeviceRef) -> DeviceStatus {
        let online = !self.offline_set().contains(&device.id);
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(
                device.id,
                SimSession {
                    online,
                    paired: true,
                    attempts: HashMap::new(),
                },
            );
        }
        let status = if online {
            DeviceStatus::Online
        } else {
            DeviceStatus::Offline
        };
        let _ = self.events.send(ProviderEvent::Status {
            device: device.clone(),
            status,
            reason: (!online).then(|| "simulated disconnect".to_string()),
            restricted_until: None,
        });
        status
    }

    async fn status(&self, device: &DeviceRef) -> (DeviceStatus, Option<String>) {
        let sessions = match self.sessions.lock() {
            Ok(s) => s,
            Err(_) => return (DeviceStatus::Stopped, Some("host error".into())),
        };
        match sessions.get(&device.id) {
            Some(s) if s.online && s.paired => (DeviceStatus::Online, None),
            Some(s) if !s.paired => (DeviceStatus::AwaitingPairing, None),
            Some(_) => (DeviceStatus::Offline, Some("simulated disconnect".into())),
            None => (
                DeviceStatus::Stopped,
                Some("no session on this host".into()),
            ),
        }
    }

    async fn start_pairing(
        &self,
        device: &DeviceRef,
        phone: Option<&PhoneE164>,
    ) -> Result<PairingBody, ProviderError> {
        // The simulated phone "scans" at once: the session is paired and online afterwards.
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(
                device.id,
                SimSession {
                    online: true,
                    paired: true,
                    attempts: HashMap::new(),
                },
            );
        }
        let _ = self.events.send(ProviderEvent::Status {
            device: device.clone(),
            status: DeviceStatus::Online,
            reason: Some("paired (simulated)".into()),
            restricted_until: None,
        });
        // Paired by phone: the simulated account is that number (a QR code could be scanned by
        // any phone, so the simulator names no account for it).
        if let Some(phone) = phone {
            let _ = self.events.send(ProviderEvent::Linked {
                device: device.clone(),
                phone: phone.clone(),
            });
        }
        let nonce = Uuid::new_v4().simple().to_string();
        Ok(match phone {
            Some(_) => PairingBody {
                device_id: device.id,
                method: "code".into(),
                code: nonce[..8].to_uppercase(),
                expires_in_s: 180,
                svg: None,
            },
            None => {
                let code = format!("2@SIM{},{}", &nonce[..16], device.id.simple());
                PairingBody {
                    device_id: device.id,
                    method: "qr".into(),
                    svg: shared::qr::svg(&code).ok(),
                    code,
                    expires_in_s: 20,
                }
            }
        })
    }

    async fn send(&self, device: &DeviceRef, message: &Outbound) -> Result<(), ProviderError> {
        let attempt = {
            let mut sessions = self
                .sessions
                .lock()
                .map_err(|_| ProviderError::Transient("sessions lock poisoned".into()))?;
            let s = sessions
                .get_mut(&device.id)
                .ok_or_else(|| ProviderError::Offline("no session".into()))?;
            if !s.online {
                return Err(ProviderError::Offline("simulated disconnect".into()));
            }
            let n = s
                .attempts
                .entry(message.provider_message_id.clone())
                .or_insert(0);
            *n += 1;
            let attempt = *n;
            if s.attempts.len() > 100_000 {
                s.attempts.clear();
            }
            attempt
        };
        let mut latency = self.config.latency;
        if !self.config.latency_jitter.is_zero() {
            let f = fraction(self.config.seed ^ 0x1a7e, &message.provider_message_id);
            latency += self.config.latency_jitter.mul_f64(f);
        }
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if !self.is_on_whatsapp(message.to.as_str()) {
            return Err(ProviderError::NotOnWhatsapp);
        }
        if fraction(
            self.config.seed,
            &format!("{}#{attempt}", message.provider_message_id),
        ) < self.config.transient_rate
        {
            return Err(ProviderError::Transient("simulated network error".into()));
        }
        self.log
            .append(&SendLogEntry {
                at_ms: Utc::now().timestamp_millis(),
                device_id: device.id,
                tenant_id: device.tenant_id,
                message_id: message.message_id,
                provider_message_id: message.provider_message_id.clone(),
                to: message.to.to_string(),
                text: message.text.clone(),
                image: message.image.as_ref().map(|i| i.key.clone()),
            })
            .map_err(|e| ProviderError::Transient(format!("send log: {e}")))?;
        self.schedule_receipts(message);
        Ok(())
    }

    async fn was_sent(&self, _device: &DeviceRef, provider_message_id: &str) -> Option<bool> {
        Some(self.log.contains(provider_message_id))
    }

    /// Closes the device's simulated session on this host (another host serves the device now,
    /// or this one is stopping), saying so as a web session closing does.
    async fn release(&self, device: &DeviceRef) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.remove(&device.id);
        }
        let _ = self.events.send(ProviderEvent::Status {
            device: device.clone(),
            status: DeviceStatus::Offline,
            reason: Some("host stopped".into()),
            restricted_until: None,
        });
    }

    /// The simulated link is forgotten: the device needs pairing again.
    async fn logout(&self, device: &DeviceRef, why: &str) -> Result<(), ProviderError> {
        if let Ok(mut sessions) = self.sessions.lock() {
            if let Some(s) = sessions.get_mut(&device.id) {
                s.online = false;
                s.paired = false;
            }
        }
        let _ = self.events.send(ProviderEvent::Status {
            device: device.clone(),
            status: DeviceStatus::LoggedOut,
            reason: Some(why.into()),
            restricted_until: None,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_is_deterministic_and_spread() {
        assert_eq!(fraction(1, "a"), fraction(1, "a"));
        assert_ne!(fraction(1, "a"), fraction(2, "a"));
        let below: usize = (0..10_000)
            .filter(|i| fraction(7, &format!("+6012{i:07}")) < 0.1)
            .count();
        assert!((800..1200).contains(&below), "{below}");
    }

    #[test]
    fn send_log_survives_reopen_and_ignores_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let log = SendLog::open(&path).unwrap();
        let entry = SendLogEntry {
            at_ms: 1,
            device_id: Uuid::nil(),
            tenant_id: Uuid::nil(),
            message_id: 7,
            provider_message_id: "P7".into(),
            to: "+60123456789".into(),
            text: "hi".into(),
            image: None,
        };
        log.append(&entry).unwrap();
        drop(log);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"torn")
            .unwrap();
        let reopened = SendLog::open(&path).unwrap();
        assert!(reopened.contains("P7"));
        assert_eq!(SendLog::read(&path).unwrap(), vec![entry]);
    }
}
