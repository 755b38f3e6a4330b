//! The web sessions of one host: one whatsapp-rust client per device, each with its own session
//! store (a SQLite file under the host's data directory), its connection supervisor, its pairing
//! prompt and its uploaded-media cache. What happens on the wire comes back as [`WebEvent`]s.

use crate::mapping::{map_event, map_inbound, Signal};
use crate::supervisor::{Action, Input, PairingKind, Supervisor};
use chrono::{DateTime, Utc};
use rand::Rng;
use shared::domain::DeviceStatus;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};
use uuid::Uuid;
use whatsapp_rust::pair_code::PairCodeOptions;
use whatsapp_rust::prelude::*;
use whatsapp_rust::upload::{UploadOptions, UploadResponse};
use whatsapp_rust::wacore::download::MediaType;
use whatsapp_rust::wacore::store::traits::Backend;
use whatsapp_rust::wacore::store::InMemoryBackend;
use whatsapp_rust::InboundDurabilityHook;
use whatsapp_rust_tokio_transport::TokioWebSocketTransportFactory;

#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Session stores live in `<data_dir>/web/<device id>.sqlite`.
    pub data_dir: PathBuf,
    /// The WhatsApp websocket; `None` = the library's default (WhatsApp's servers).
    pub ws_url: Option<String>,
    /// Keep session stores in memory (tests and benchmarks; nothing survives a restart).
    pub in_memory: bool,
    /// Typing presence before a send: this long per character of text, within [min, max].
    pub typing_per_char: Duration,
    pub typing_min: Duration,
    pub typing_max: Duration,
    /// How long a reach-out nack (463, 475) pauses the device.
    pub restriction_hold: chrono::Duration,
    /// How often the supervisor reads the connection's state.
    pub poll: Duration,
}

impl WebConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ws_url: None,
            in_memory: false,
            typing_per_char: Duration::from_millis(60),
            typing_min: Duration::from_millis(800),
            typing_max: Duration::from_secs(6),
            restriction_hold: chrono::Duration::hours(24),
            poll: Duration::from_millis(500),
        }
    }

    /// How long to show "typing…" before sending `text`.
    pub fn typing_for(&self, text: &str) -> Duration {
        let chars = u32::try_from(text.chars().count()).unwrap_or(u32::MAX);
        (self.typing_per_char.saturating_mul(chars)).clamp(self.typing_min, self.typing_max)
    }
}

/// What the sessions report to the host.
#[derive(Debug, Clone, PartialEq)]
pub enum WebEvent {
    Status {
        device: Uuid,
        status: DeviceStatus,
        reason: Option<String>,
        /// With `restricted`: when the restriction ends (`None`: when a person lifts it).
        until: Option<DateTime<Utc>>,
    },
    /// The server accepted one of our messages (by the id we gave it).
    Acked { device: Uuid, id: String },
    /// The server refused one of our messages after the send returned.
    Nacked {
        device: Uuid,
        id: String,
        code: String,
    },
    Receipt {
        device: Uuid,
        ids: Vec<String>,
        read: bool,
        at: DateTime<Utc>,
    },
    /// The session is connected as this WhatsApp account (its phone number, digits): sent at
    /// every connection, so after pairing and after a restore.
    Linked { device: Uuid, phone: String },
}

/// Text from a contact, as the host's [`InboundKeeper`] gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundText {
    pub device: Uuid,
    /// The sender's phone number (digits), when it could be told.
    pub from: Option<String>,
    pub text: String,
}

/// What the host keeps of a contact's message before WhatsApp is told that it arrived (the host:
/// an opt-out keyword, in its durable inbox).
///
/// Registered as the client's inbound durability hook ([`KeepBeforeAck`]): the library buffers
/// each decrypted message in the session store and sends its ack (the delivery receipt that
/// makes WhatsApp's server drop it) only once `keep` returned `Ok` for it. On `Err`, or a crash
/// before `keep` returned, the message stays unacknowledged and WhatsApp delivers it again at
/// the next connection, where `keep` runs again: `keep` must be idempotent.
#[async_trait::async_trait]
pub trait InboundKeeper: Send + Sync {
    async fn keep(&self, inbound: InboundText) -> Result<(), String>;
}

/// The session's durability hook: every one-to-one text of a batch goes to the keeper, in
/// order, before the batch is acknowledged.
struct KeepBeforeAck {
    device: Uuid,
    keeper: Arc<dyn InboundKeeper>,
}

#[async_trait::async_trait]
impl InboundDurabilityHook for KeepBeforeAck {
    async fn on_messages(
        &self,
        client: Arc<Client>,
        batch: &[InboundMessage],
    ) -> anyhow::Result<()> {
        for m in batch {
            if let Signal::Inbound {
                sender,
                sender_alt,
                text,
            } = map_inbound(m)
            {
                // A store lookup at most, never a send: the hook runs under the sender's lock.
                let from = phone_of(&client, &sender, sender_alt.as_ref()).await;
                self.keeper
                    .keep(InboundText {
                        device: self.device,
                        from,
                        text,
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("inbound text not kept: {e}"))?;
            }
        }
        Ok(())
    }
}

/// The sender's phone number: from the JID, its alternate, or the session's LID↔phone map.
async fn phone_of(client: &Client, sender: &Jid, alt: Option<&Jid>) -> Option<String> {
    if sender.is_pn() {
        return Some(sender.user.to_string());
    }
    if let Some(a) = alt.filter(|a| a.is_pn()) {
        return Some(a.user.to_string());
    }
    match client.get_lid_pn_entry(sender).await {
        Ok(Some(entry)) => Some(entry.phone_number.to_string()),
        _ => None,
    }
}

/// The pairing prompt on show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub kind: PairingKind,
    pub code: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebError {
    #[error("the device is not connected ({0})")]
    Offline(String),
    #[error("the number is not on WhatsApp")]
    NotOnWhatsapp,
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("transient WhatsApp error: {0}")]
    Transient(String),
    #[error("could not open the session store: {0}")]
    Store(String),
}

/// One image to send.
#[derive(Debug, Clone)]
pub struct WebImage {
    /// Stable key of the image's content: uploaded once per device, reused for every recipient.
    pub key: String,
    pub mime: String,
    pub bytes: Arc<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct WebMessage {
    /// Generated (and recorded) before the send; a retry reuses it.
    pub id: String,
    /// Phone number, digits only.
    pub to: String,
    pub text: String,
    pub image: Option<WebImage>,
}

struct Session {
    client: Arc<Client>,
    handle: tokio::sync::Mutex<Option<BotHandle>>,
    state: Mutex<(Supervisor, Option<Prompt>)>,
    media: tokio::sync::Mutex<HashMap<String, UploadResponse>>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

pub struct WebSessions {
    config: WebConfig,
    sessions: RwLock<HashMap<Uuid, Arc<Session>>>,
    events: mpsc::UnboundedSender<WebEvent>,
    keeper: Arc<dyn InboundKeeper>,
    uploads: std::sync::atomic::AtomicU64,
}

/// Forwards the library's events to the session's task (never blocks the dispatch path).
struct Forward(mpsc::UnboundedSender<Arc<Event>>);

impl EventHandler for Forward {
    fn handle_event(&self, event: Arc<Event>) {
        let _ = self.0.send(event);
    }

    fn interest(&self) -> EventInterest {
        EventInterest::of(&[
            EventKind::Connected,
            EventKind::Disconnected,
            EventKind::PairingQrCode,
            EventKind::PairingCode,
            EventKind::PairingQrCodesExhausted,
            EventKind::PairSuccess,
            EventKind::PairError,
            EventKind::PairingCodeError,
            EventKind::LoggedOut,
            EventKind::StreamReplaced,
            EventKind::TemporaryBan,
            EventKind::ClientOutdated,
            EventKind::ConnectFailure,
            EventKind::ServerAck,
            EventKind::Receipt,
            EventKind::Messages,
        ])
    }
}

/// A WhatsApp-Web-shaped message id ("3EB0" + 18 hex digits), ours to generate before the send.
pub fn new_message_id() -> String {
    let mut bytes = [0u8; 9];
    rand::rng().fill(&mut bytes);
    let mut id = String::from("3EB0");
    for b in bytes {
        id.push_str(&format!("{b:02X}"));
    }
    id
}

/// Digits of a phone number in E.164 ("+60123…" → "60123…").
pub fn digits(e164: &str) -> String {
    e164.chars().filter(char::is_ascii_digit).collect()
}

impl WebSessions {
    /// `keeper` gets every contact's text before it is acknowledged (see [`InboundKeeper`]).
    pub fn new(
        config: WebConfig,
        events: mpsc::UnboundedSender<WebEvent>,
        keeper: Arc<dyn InboundKeeper>,
    ) -> Self {
        Self {
            config,
            sessions: RwLock::new(HashMap::new()),
            events,
            keeper,
            uploads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &WebConfig {
        &self.config
    }

    /// Where the device's session store lives.
    pub fn store_path(&self, device: Uuid) -> PathBuf {
        self.config
            .data_dir
            .join("web")
            .join(format!("{device}.sqlite"))
    }

    /// Whether the device has a stored (paired) session to restore.
    pub fn has_store(&self, device: Uuid) -> bool {
        !self.config.in_memory && self.store_path(device).exists()
    }

    /// Devices with a stored session under the data directory.
    pub fn stored_devices(&self) -> Vec<Uuid> {
        let Ok(dir) = std::fs::read_dir(self.config.data_dir.join("web")) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".sqlite")?.parse().ok()
            })
            .collect()
    }

    fn session(&self, device: Uuid) -> Option<Arc<Session>> {
        self.sessions.read().ok()?.get(&device).cloned()
    }

    pub fn open_count(&self) -> usize {
        self.sessions.read().map(|s| s.len()).unwrap_or(0)
    }

    /// How many images were uploaded (each image once per device).
    pub fn upload_count(&self) -> u64 {
        self.uploads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The device's status as its supervisor sees it; `None` when no session is open.
    pub fn status(&self, device: Uuid) -> Option<(DeviceStatus, Option<String>)> {
        let s = self.session(device)?;
        let st = s.state.lock().ok()?;
        Some((st.0.status(), st.0.reason().map(str::to_string)))
    }

    /// The pairing prompt on show, if it has not expired.
    pub fn prompt(&self, device: Uuid) -> Option<Prompt> {
        let s = self.session(device)?;
        let st = s.state.lock().ok()?;
        st.1.clone().filter(|p| p.expires_at > Utc::now())
    }

    /// Opens the device's session (restoring its store if there is one) unless one is already
    /// open and not stopped. `pair_phone` (digits) asks for a phone-number pair code once the
    /// socket is up; without it an unpaired session shows rotating QR codes.
    pub async fn open(
        self: &Arc<Self>,
        device: Uuid,
        pair_phone: Option<String>,
    ) -> Result<DeviceStatus, WebError> {
        if let Some(s) = self.session(device) {
            let (status, terminal) = match s.state.lock() {
                Ok(st) => (st.0.status(), st.0.is_terminal()),
                Err(_) => (DeviceStatus::Offline, true),
            };
            if !terminal && pair_phone.is_none() {
                return Ok(status);
            }
            self.close(device).await;
        }
        let backend: Arc<dyn Backend> = if self.config.in_memory {
            Arc::new(InMemoryBackend::new())
        } else {
            let path = self.store_path(device);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| WebError::Store(e.to_string()))?;
            }
            let url = path
                .to_str()
                .ok_or_else(|| WebError::Store("data directory is not valid UTF-8".into()))?;
            Arc::new(
                SqliteStore::new(url)
                    .await
                    .map_err(|e| WebError::Store(e.to_string()))?,
            )
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut transport = TokioWebSocketTransportFactory::new();
        if let Some(url) = &self.config.ws_url {
            transport = transport.with_url(url.clone());
        }
        let mut builder = Bot::builder()
            .with_backend_arc(backend)
            .with_transport_factory(transport)
            .with_event_handler(Forward(tx))
            .with_inbound_durability_hook(KeepBeforeAck {
                device,
                keeper: self.keeper.clone(),
            })
            .skip_history_sync();
        if let Some(phone) = pair_phone {
            builder = builder.with_pair_code(PairCodeOptions {
                phone_number: phone,
                ..Default::default()
            });
        }
        let bot = builder
            .build()
            .await
            .map_err(|e| WebError::Store(e.to_string()))?;
        let client = bot.client();
        let paired = client.pn().is_some();
        let mut supervisor = Supervisor::new(self.config.restriction_hold);
        let first = supervisor.on(Input::Open { paired }, Utc::now());
        let session = Arc::new(Session {
            client: client.clone(),
            handle: tokio::sync::Mutex::new(None),
            state: Mutex::new((supervisor, None)),
            media: tokio::sync::Mutex::new(HashMap::new()),
            worker: Mutex::new(None),
        });
        if let Ok(mut map) = self.sessions.write() {
            map.insert(device, session.clone());
        }
        // Events wait in the channel until the worker (started after the session is findable)
        // reads them, so an early QR code is not lost.
        *session.handle.lock().await = Some(bot.spawn());
        let worker = tokio::spawn(run_session(
            Arc::downgrade(self),
            device,
            rx,
            self.config.poll,
        ));
        if let Ok(mut w) = session.worker.lock() {
            *w = Some(worker);
        }
        self.perform(device, &session, first, None);
        info!(device_id = %device, paired, "web session opened");
        Ok(DeviceStatus::Connecting)
    }

    /// Feeds one input to the device's supervisor and carries out what it says.
    fn apply(&self, device: Uuid, input: Input) {
        let Some(session) = self.session(device) else {
            return;
        };
        let (actions, until) = match session.state.lock() {
            Ok(mut st) => (st.0.on(input, Utc::now()), st.0.restriction_end_to_record()),
            Err(_) => return,
        };
        self.perform(device, &session, actions, until);
    }

    /// `until`: the supervisor's restriction end to record with a `restricted` status (`None`:
    /// until a person acts).
    fn perform(
        &self,
        device: Uuid,
        session: &Arc<Session>,
        actions: Vec<Action>,
        until: Option<DateTime<Utc>>,
    ) {
        let mut disconnect = false;
        let mut delete = false;
        for a in actions {
            match a {
                Action::Record(status, reason) => {
                    let _ = self.events.send(WebEvent::Status {
                        device,
                        status,
                        reason,
                        until: until.filter(|_| status == DeviceStatus::Restricted),
                    });
                }
                Action::Disconnect => disconnect = true,
                Action::DeleteSession => delete = true,
            }
        }
        if disconnect || delete {
            let session = session.clone();
            let path = (!self.config.in_memory).then(|| self.store_path(device));
            tokio::spawn(async move {
                if let Some(handle) = session.handle.lock().await.take() {
                    handle.shutdown().await;
                } else {
                    session.client.disconnect().await;
                }
                if delete {
                    if let Some(path) = path {
                        delete_store(&path);
                    }
                }
            });
        }
    }

    /// Logs the device out: unlinks it at WhatsApp (best effort), deletes its session store, and
    /// nothing reconnects until a person pairs it again.
    pub async fn logout(&self, device: Uuid, why: &str) {
        match self.session(device) {
            Some(s) => {
                // Terminal first, so the library's own "logged out" event finds nothing to do;
                // the store is deleted once the client has deregistered and stopped.
                let actions = match s.state.lock() {
                    Ok(mut st) => st.0.on(
                        Input::ManualLogout {
                            reason: why.to_string(),
                        },
                        Utc::now(),
                    ),
                    Err(_) => Vec::new(),
                };
                s.client.logout().await;
                self.perform(device, &s, actions, None);
            }
            None => {
                if !self.config.in_memory {
                    delete_store(&self.store_path(device));
                }
                let _ = self.events.send(WebEvent::Status {
                    device,
                    status: DeviceStatus::LoggedOut,
                    reason: Some(why.to_string()),
                    until: None,
                });
            }
        }
    }

    /// Closes the device's session (the host stops or hands it over); the store is kept.
    pub async fn close(&self, device: Uuid) {
        let Some(s) = self.session(device) else {
            return;
        };
        self.apply(device, Input::Shutdown);
        if let Some(handle) = s.handle.lock().await.take() {
            handle.shutdown().await;
        }
        if let Some(w) = s.worker.lock().ok().and_then(|mut w| w.take()) {
            w.abort();
        }
        if let Ok(mut map) = self.sessions.write() {
            map.remove(&device);
        }
    }

    pub async fn close_all(&self) {
        let ids: Vec<Uuid> = self
            .sessions
            .read()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        for id in ids {
            self.close(id).await;
        }
    }

    /// A phone-number pair code for an open, connected, unpaired session.
    pub async fn pair_code(&self, device: Uuid, phone: &str) -> Result<String, WebError> {
        let s = self
            .session(device)
            .ok_or_else(|| WebError::Offline("no session is open".into()))?;
        if !s.client.is_connected() {
            return Err(WebError::Offline(
                "not connected to WhatsApp yet; ask again in a moment".into(),
            ));
        }
        s.client
            .pair_with_code(PairCodeOptions {
                phone_number: phone.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|e| WebError::Transient(e.to_string()))
    }

    fn ready(&self, device: Uuid) -> Result<Arc<Session>, WebError> {
        let s = self
            .session(device)
            .ok_or_else(|| WebError::Offline("no session is open".into()))?;
        let (status, reason) = match s.state.lock() {
            Ok(st) => (st.0.status(), st.0.reason().map(str::to_string)),
            Err(_) => return Err(WebError::Offline("session state unavailable".into())),
        };
        if status != DeviceStatus::Online || !s.client.is_connected() {
            return Err(WebError::Offline(
                reason.unwrap_or_else(|| status.to_string()),
            ));
        }
        Ok(s)
    }

    /// Whether the number (digits) has WhatsApp.
    pub async fn check_number(&self, device: Uuid, phone: &str) -> Result<bool, WebError> {
        let s = self.ready(device)?;
        let found = s
            .client
            .contacts()
            .is_on_whatsapp(&[Jid::pn(phone)])
            .await
            .map_err(|e| WebError::Transient(e.to_string()))?;
        Ok(found.first().is_some_and(|r| r.is_registered))
    }

    /// Writes the message to the socket, after typing presence for a time proportional to its
    /// length. `Ok` means written, not accepted: the server's ack or nack arrives as an event.
    pub async fn send(&self, device: Uuid, msg: &WebMessage) -> Result<(), WebError> {
        if msg.id.is_empty() || msg.to.is_empty() || !msg.to.chars().all(|c| c.is_ascii_digit()) {
            return Err(WebError::Invalid(
                "message id and digits-only number required".into(),
            ));
        }
        let s = self.ready(device)?;
        let to = Jid::pn(msg.to.as_str());
        if s.client.chatstate().send_composing(&to).await.is_ok() {
            tokio::time::sleep(self.config.typing_for(&msg.text)).await;
        }
        let message = match &msg.image {
            None => wa::Message::text(msg.text.clone()),
            Some(img) => {
                let upload = self.upload_once(&s, img).await?;
                whatsapp_rust::media::image_message(
                    upload,
                    whatsapp_rust::media::ImageOptions {
                        caption: (!msg.text.is_empty()).then(|| msg.text.clone()),
                        mimetype: Some(img.mime.clone()),
                        ..Default::default()
                    },
                )
            }
        };
        s.client
            .send_message_with_options(
                to,
                message,
                SendOptions::default().with_message_id(msg.id.clone()),
            )
            .await
            .map(|_| ())
            .map_err(|e| match e {
                SendError::NotLoggedIn => WebError::Offline("not logged in".into()),
                SendError::InvalidRequest(m) => WebError::Invalid(m),
                other if !s.client.is_connected() => WebError::Offline(other.to_string()),
                other => WebError::Transient(other.to_string()),
            })
    }

    async fn upload_once(&self, s: &Session, img: &WebImage) -> Result<UploadResponse, WebError> {
        let mut media = s.media.lock().await;
        if let Some(u) = media.get(&img.key) {
            return Ok(u.clone());
        }
        let u = s
            .client
            .upload(img.bytes.to_vec(), MediaType::Image, UploadOptions::new())
            .await
            .map_err(|e| WebError::Transient(format!("image upload failed: {e}")))?;
        self.uploads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if media.len() >= 32 {
            media.clear();
        }
        media.insert(img.key.clone(), u.clone());
        Ok(u)
    }

    /// Acts on one library event of the device.
    async fn on_event(&self, device: Uuid, event: &Event) {
        let signals = match event {
            // The hook kept every other message before it was acknowledged; placeholder
            // recoveries bypass it (the library acks them on their own path) and are kept here.
            Event::Messages(batch) => batch
                .messages
                .iter()
                .filter(|m| m.info.unavailable_request_id.is_some())
                .map(map_inbound)
                .collect(),
            other => vec![map_event(other, Utc::now())],
        };
        for signal in signals {
            self.on_signal(device, signal).await;
        }
    }

    async fn on_signal(&self, device: Uuid, signal: Signal) {
        match signal {
            Signal::Ignore => {}
            Signal::Supervisor(input) => {
                let connected = input == Input::Connected;
                if connected {
                    // Which account this is, before the status says online: the host unlinks a
                    // session whose number another device of the tenant already is.
                    if let Some(pn) = self.session(device).and_then(|s| s.client.pn()) {
                        let _ = self.events.send(WebEvent::Linked {
                            device,
                            phone: pn.user.to_string(),
                        });
                    }
                }
                self.apply(device, input);
                if connected {
                    if let Some(s) = self.session(device) {
                        // Available presence, so "typing…" shows to the recipient.
                        if let Err(e) = s.client.presence().set_available().await {
                            warn!(device_id = %device, error = %e, "could not set presence");
                        }
                    }
                }
            }
            Signal::Prompt {
                kind,
                code,
                valid_for,
            } => {
                if let Some(s) = self.session(device) {
                    if let Ok(mut st) = s.state.lock() {
                        st.1 = Some(Prompt {
                            kind,
                            code,
                            expires_at: Utc::now()
                                + chrono::Duration::from_std(valid_for)
                                    .unwrap_or(chrono::Duration::seconds(20)),
                        });
                    }
                }
                self.apply(device, Input::PairingShown { kind });
            }
            Signal::Ack { id, nack } => match nack {
                None => {
                    let _ = self.events.send(WebEvent::Acked { device, id });
                }
                Some(code) => {
                    warn!(device_id = %device, message = %id, code = %code, "message nacked");
                    let _ = self.events.send(WebEvent::Nacked {
                        device,
                        id,
                        code: code.clone(),
                    });
                    self.apply(device, Input::Nack { code });
                }
            },
            Signal::Receipt { ids, read, at } => {
                let _ = self.events.send(WebEvent::Receipt {
                    device,
                    ids,
                    read,
                    at,
                });
            }
            Signal::Inbound {
                sender,
                sender_alt,
                text,
            } => {
                let Some(s) = self.session(device) else {
                    return;
                };
                let from = phone_of(&s.client, &sender, sender_alt.as_ref()).await;
                if let Err(e) = self.keeper.keep(InboundText { device, from, text }).await {
                    warn!(device_id = %device, error = %e, "could not keep a recovered inbound message");
                }
            }
        }
    }

    fn poll(&self, device: Uuid) {
        let Some(s) = self.session(device) else {
            return;
        };
        if !s.client.is_connected() {
            let attempts = s.client.stats().reconnect_errors;
            if attempts > 0 {
                self.apply(device, Input::ConnectFailing { attempts });
            }
        }
        self.apply(device, Input::Tick);
    }
}

fn delete_store(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = ?p, error = %e, "could not delete the session store"),
        }
    }
}

/// The session's task: library events in arrival order, and a periodic look at the connection.
async fn run_session(
    sessions: std::sync::Weak<WebSessions>,
    device: Uuid,
    mut events: mpsc::UnboundedReceiver<Arc<Event>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { return };
                let Some(s) = sessions.upgrade() else { return };
                s.on_event(device, &ev).await;
            }
            _ = tick.tick() => {
                let Some(s) = sessions.upgrade() else { return };
                s.poll(device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use whatsapp_rust::wacore::types::message::MessageSource;

    /// Records what it is given; refuses text equal to `refuse`.
    #[derive(Default)]
    struct Recorder {
        kept: Mutex<Vec<InboundText>>,
        refuse: Option<&'static str>,
    }

    #[async_trait::async_trait]
    impl InboundKeeper for Recorder {
        async fn keep(&self, inbound: InboundText) -> Result<(), String> {
            if self.refuse == Some(inbound.text.as_str()) {
                return Err("disk full".into());
            }
            self.kept.lock().unwrap().push(inbound);
            Ok(())
        }
    }

    fn message(sender: Jid, group: bool, text: &str) -> InboundMessage {
        let info = MessageInfo {
            source: MessageSource {
                chat: sender.clone(),
                sender,
                is_group: group,
                ..Default::default()
            },
            id: "3A00000000000001".into(),
            ..Default::default()
        };
        InboundMessage::builder()
            .message(Arc::new(wa::Message {
                conversation: Some(text.to_string()),
                ..Default::default()
            }))
            .info(Arc::new(info))
            .build()
    }

    /// A client that never connects: the hook only reads its store.
    async fn client() -> Arc<Client> {
        let bot = Bot::builder()
            .with_backend_arc(Arc::new(InMemoryBackend::new()))
            .with_transport_factory(
                TokioWebSocketTransportFactory::new().with_url("ws://127.0.0.1:9/ws/chat"),
            )
            .build()
            .await
            .unwrap();
        bot.client()
    }

    #[tokio::test]
    async fn the_hook_keeps_contacts_text_before_the_ack_and_fails_the_batch_it_cannot_keep() {
        let device = Uuid::new_v4();
        let recorder = Arc::new(Recorder::default());
        let hook = KeepBeforeAck {
            device,
            keeper: recorder.clone(),
        };
        let batch = [
            message(Jid::pn("60123456789"), false, "STOP"),
            // a group's text is no contact's answer to us
            message(Jid::pn("60123456780"), true, "stop"),
            message(Jid::pn("60123456781"), false, "hello"),
        ];
        hook.on_messages(client().await, &batch).await.unwrap();
        assert_eq!(
            *recorder.kept.lock().unwrap(),
            vec![
                InboundText {
                    device,
                    from: Some("60123456789".into()),
                    text: "STOP".into()
                },
                InboundText {
                    device,
                    from: Some("60123456781".into()),
                    text: "hello".into()
                },
            ]
        );

        // One message that cannot be kept fails the whole batch: none of it is acknowledged,
        // and WhatsApp delivers it again.
        let refusing = Arc::new(Recorder {
            refuse: Some("STOP"),
            ..Default::default()
        });
        let hook = KeepBeforeAck {
            device,
            keeper: refusing.clone(),
        };
        let batch = [
            message(Jid::pn("60123456781"), false, "hello"),
            message(Jid::pn("60123456789"), false, "STOP"),
        ];
        let err = hook.on_messages(client().await, &batch).await.unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
    }
}
