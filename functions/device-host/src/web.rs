//! The web multi-device provider: [`device_host_web::WebSessions`] (whatsapp-rust) behind the
//! host's [`Provider`] trait. Its events become [`ProviderEvent`]s: statuses, acks and nacks and
//! receipts by our message id. Contacts' text goes to the host's opt-outs ([`KeepOptOuts`]) before
//! the session acknowledges it.

use crate::provider::{DeviceRef, Outbound, Provider, ProviderError, ProviderEvent};
use crate::service::OptOuts;
use async_trait::async_trait;
use device_host_web::{
    digits, InboundKeeper, InboundText, PairingKind, WebConfig, WebError, WebEvent, WebSessions,
};
use shared::domain::{reason, DeviceStatus, PhoneE164, ProviderKind};
use shared::host_api::PairingBody;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;
use uuid::Uuid;

pub struct WebProvider {
    sessions: Arc<WebSessions>,
    devices: Arc<RwLock<HashMap<Uuid, DeviceRef>>>,
    events: mpsc::UnboundedSender<ProviderEvent>,
}

impl WebProvider {
    /// Starts the provider and the task that turns its events into host events. Contacts' text
    /// goes to `opt_outs` before WhatsApp is told it arrived ([`KeepOptOuts`]).
    pub fn start(
        config: WebConfig,
        events: mpsc::UnboundedSender<ProviderEvent>,
        opt_outs: OptOuts,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let devices = Arc::new(RwLock::new(HashMap::new()));
        let keeper = Arc::new(KeepOptOuts::new(devices.clone(), opt_outs));
        let provider = Arc::new(Self {
            sessions: Arc::new(WebSessions::new(config, tx, keeper)),
            devices,
            events: events.clone(),
        });
        tokio::spawn(forward(provider.devices.clone(), rx, events));
        provider
    }

    pub fn sessions(&self) -> &Arc<WebSessions> {
        &self.sessions
    }

    fn remember(&self, device: &DeviceRef) {
        if let Ok(mut m) = self.devices.write() {
            m.insert(device.id, device.clone());
        }
    }
}

/// The web sessions' [`InboundKeeper`]: a STOP is in the host's inbox, synced, before the
/// session acknowledges it to WhatsApp. Other text is a reply (`OptOuts::replied`, written in
/// the background) and is acknowledged at once. A STOP whose sender's
/// number cannot be told is logged as an error and acknowledged (a redelivery would not tell it
/// either); one for a device this host does not know is not acknowledged.
pub struct KeepOptOuts {
    devices: Arc<RwLock<HashMap<Uuid, DeviceRef>>>,
    opt_outs: OptOuts,
}

impl KeepOptOuts {
    /// `devices`: the devices whose sessions this host runs, by id.
    pub fn new(devices: Arc<RwLock<HashMap<Uuid, DeviceRef>>>, opt_outs: OptOuts) -> Self {
        Self { devices, opt_outs }
    }
}

#[async_trait]
impl InboundKeeper for KeepOptOuts {
    async fn keep(&self, inbound: InboundText) -> Result<(), String> {
        let stop = crate::service::is_opt_out(&self.opt_outs.keywords, &inbound.text);
        let from = inbound
            .from
            .as_deref()
            .and_then(|d| PhoneE164::parse(&format!("+{d}")).ok());
        let device = self
            .devices
            .read()
            .ok()
            .and_then(|m| m.get(&inbound.device).cloned());
        // Any other text is a reply, kept on a best effort (`OptOuts::replied`): one that
        // cannot be told whose it is ends nothing.
        let sender_known = from.is_some();
        let (Some(from), Some(device)) = (from, device) else {
            if !stop {
                return Ok(());
            }
            if !sender_known {
                tracing::error!(device_id = %inbound.device, sender = ?inbound.from,
                    "an opt-out keyword from a sender whose phone number cannot be told; not recorded");
                return Ok(());
            }
            return Err(format!(
                "an opt-out for device {}, which this host does not know",
                inbound.device
            ));
        };
        self.opt_outs
            .keep(&device, &from, &inbound.text)
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }
}

fn to_provider_error(e: WebError) -> ProviderError {
    match e {
        WebError::Offline(m) => ProviderError::Offline(m),
        WebError::NotOnWhatsapp => ProviderError::NotOnWhatsapp,
        WebError::Invalid(m) => ProviderError::Rejected(m),
        WebError::Transient(m) | WebError::Store(m) => ProviderError::Transient(m),
    }
}

async fn forward(
    devices: Arc<RwLock<HashMap<Uuid, DeviceRef>>>,
    mut rx: mpsc::UnboundedReceiver<WebEvent>,
    events: mpsc::UnboundedSender<ProviderEvent>,
) {
    while let Some(ev) = rx.recv().await {
        let id = match &ev {
            WebEvent::Status { device, .. }
            | WebEvent::Acked { device, .. }
            | WebEvent::Nacked { device, .. }
            | WebEvent::Receipt { device, .. }
            | WebEvent::Linked { device, .. } => *device,
        };
        let Some(device) = devices.read().ok().and_then(|m| m.get(&id).cloned()) else {
            warn!(device_id = %id, "event of a device this host does not know");
            continue;
        };
        let out = match ev {
            WebEvent::Status {
                status,
                reason,
                until,
                ..
            } => ProviderEvent::Status {
                device,
                status,
                reason,
                restricted_until: until,
            },
            WebEvent::Acked { id, .. } => ProviderEvent::Accepted {
                device,
                provider_message_id: id,
            },
            WebEvent::Nacked { id, code, .. } => ProviderEvent::Refused {
                device,
                provider_message_id: id,
                code,
            },
            WebEvent::Receipt { ids, read, at, .. } => ProviderEvent::ReceiptByProviderId {
                device,
                provider_message_ids: ids,
                read,
                at,
            },
            WebEvent::Linked { phone, .. } => match PhoneE164::parse(&format!("+{phone}")) {
                Ok(phone) => ProviderEvent::Linked { device, phone },
                Err(e) => {
                    warn!(device_id = %id, error = %e, "the session's own number is not E.164");
                    continue;
                }
            },
        };
        if events.send(out).is_err() {
            return;
        }
    }
}

#[async_trait]
impl Provider for WebProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Web
    }

    fn new_message_id(&self) -> String {
        device_host_web::new_message_id()
    }

    /// Restores the device's stored session; a device never paired waits for pairing instead of
    /// opening a socket (which would start burning QR codes nobody looks at).
    async fn connect(&self, device: &DeviceRef) -> DeviceStatus {
        self.remember(device);
        if !self.sessions.has_store(device.id) && self.sessions.status(device.id).is_none() {
            let _ = self.events.send(ProviderEvent::Status {
                device: device.clone(),
                status: DeviceStatus::AwaitingPairing,
                reason: Some("not paired: run `wabcast device pair`".into()),
                restricted_until: None,
            });
            return DeviceStatus::AwaitingPairing;
        }
        match self.sessions.open(device.id, None).await {
            Ok(s) => s,
            Err(e) => {
                warn!(device_id = %device.id, error = %e, "could not open the web session");
                DeviceStatus::Stopped
            }
        }
    }

    async fn status(&self, device: &DeviceRef) -> (DeviceStatus, Option<String>) {
        match self.sessions.status(device.id) {
            Some(s) => s,
            None if self.sessions.has_store(device.id) => (
                DeviceStatus::Offline,
                Some("stored session not opened on this host".into()),
            ),
            None => (
                DeviceStatus::AwaitingPairing,
                Some("not paired: start pairing".into()),
            ),
        }
    }

    /// QR pairing: opens a fresh session and answers with the first QR code (text and SVG); the
    /// code rotates, and asking again returns the current one. Pair-code pairing: the 8-character
    /// code for the phone number.
    async fn start_pairing(
        &self,
        device: &DeviceRef,
        phone: Option<&PhoneE164>,
    ) -> Result<PairingBody, ProviderError> {
        self.remember(device);
        let want = if phone.is_some() {
            PairingKind::Code
        } else {
            PairingKind::Qr
        };
        let current = self.sessions.prompt(device.id).filter(|p| p.kind == want);
        if current.is_none() {
            let terminal_or_absent = !matches!(
                self.sessions.status(device.id).map(|s| s.0),
                Some(DeviceStatus::Connecting | DeviceStatus::AwaitingPairing)
            );
            if terminal_or_absent || phone.is_some() {
                self.sessions
                    .open(device.id, phone.map(|p| digits(p.as_str())))
                    .await
                    .map_err(to_provider_error)?;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(p) = self.sessions.prompt(device.id).filter(|p| p.kind == want) {
                let expires_in_s = (p.expires_at - chrono::Utc::now()).num_seconds().max(0);
                return Ok(PairingBody {
                    device_id: device.id,
                    method: match want {
                        PairingKind::Qr => "qr".into(),
                        PairingKind::Code => "code".into(),
                    },
                    svg: match want {
                        PairingKind::Qr => shared::qr::svg(&p.code).ok(),
                        PairingKind::Code => None,
                    },
                    code: p.code,
                    expires_in_s: u64::try_from(expires_in_s).unwrap_or(0),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                let (status, why) = self.status(device).await;
                return Err(ProviderError::Offline(format!(
                    "no pairing code from WhatsApp yet (device is {status}{}); ask again",
                    why.map(|w| format!(": {w}")).unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn send(&self, device: &DeviceRef, message: &Outbound) -> Result<(), ProviderError> {
        let msg = device_host_web::WebMessage {
            id: message.provider_message_id.clone(),
            to: digits(message.to.as_str()),
            text: message.text.clone(),
            image: message.image.as_ref().map(|i| device_host_web::WebImage {
                key: i.key.clone(),
                mime: i.mime.clone(),
                bytes: i.bytes.clone(),
            }),
        };
        self.sessions
            .send(device.id, &msg)
            .await
            .map_err(to_provider_error)
    }

    /// The message id was chosen and recorded before the send and every retry reuses it, and
    /// WhatsApp keys a message by (chat, sender, id): a resend after a crash is the same message,
    /// which the recipient's devices do not show twice. So an unconfirmed attempt may be resent.
    async fn was_sent(&self, _device: &DeviceRef, _provider_message_id: &str) -> Option<bool> {
        Some(false)
    }

    fn checks_numbers(&self) -> bool {
        true
    }

    async fn check_number(
        &self,
        device: &DeviceRef,
        to: &PhoneE164,
    ) -> Result<bool, ProviderError> {
        self.sessions
            .check_number(device.id, &digits(to.as_str()))
            .await
            .map_err(to_provider_error)
    }

    async fn logout(&self, device: &DeviceRef, why: &str) -> Result<(), ProviderError> {
        self.remember(device);
        self.sessions.logout(device.id, why).await;
        Ok(())
    }

    async fn release(&self, device: &DeviceRef) {
        self.sessions.close(device.id).await;
    }
}

/// The reason a nack code gives a failed message.
pub fn nack_reason(code: &str) -> (&'static str, String) {
    match code {
        "463" => (
            reason::PROVIDER_REJECTED,
            "WhatsApp refused the message (nack 463: this number may not reach out to new contacts for now)".into(),
        ),
        "475" => (
            reason::PROVIDER_REJECTED,
            "WhatsApp refused the message (nack 475: new-chat limit reached)".into(),
        ),
        other => (
            reason::PROVIDER_REJECTED,
            format!("WhatsApp refused the message (nack {other})"),
        ),
    }
}
