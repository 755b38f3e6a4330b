//! The provider trait every WhatsApp backend implements (simulator, Cloud API; web multi-device
//! next), and the events providers report back (status changes, receipts).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use shared::domain::{DeviceStatus, PhoneE164, ProviderKind};
use shared::host_api::PairingBody;
use uuid::Uuid;

/// A device as the host knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRef {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub provider: ProviderKind,
}

/// An image ready to send: type checked by content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    pub mime: String,
    pub bytes: std::sync::Arc<Vec<u8>>,
    /// Stable key for "upload once per image per device".
    pub key: String,
    /// The public https URL it came from, when it did (a provider may send it by link).
    pub link: Option<String>,
}

/// One message to send. `provider_message_id` was generated and recorded before the send, so a
/// retry after a crash reuses it.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub message_id: i64,
    pub tenant_id: Uuid,
    pub provider_message_id: String,
    pub to: PhoneE164,
    pub text: String,
    pub image: Option<ResolvedImage>,
    /// A Cloud API template to send instead of the text; other providers send the text.
    pub template: Option<shared::render::TemplateMessage>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("the number is not on WhatsApp")]
    NotOnWhatsapp,
    #[error("the provider refused the message: {0}")]
    Rejected(String),
    #[error("the device is not connected ({0})")]
    Offline(String),
    #[error("rate limited by the provider")]
    RateLimited,
    #[error("transient provider error: {0}")]
    Transient(String),
    /// The provider will not send this message, for a reason with its own machine code.
    #[error("{detail}")]
    Failed {
        reason: &'static str,
        detail: String,
    },
}

/// What providers report to the host, which writes it to PostgreSQL.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderEvent {
    Status {
        device: DeviceRef,
        status: DeviceStatus,
        reason: Option<String>,
        /// With `restricted`: when the restriction ends (`None`: when a person lifts it with
        /// `wabcast device connect`). It outlives the session: see
        /// `repo::devices::set_device_status_until`.
        restricted_until: Option<chrono::DateTime<chrono::Utc>>,
    },
    Receipt {
        tenant_id: Uuid,
        message_id: i64,
        read: bool,
        at: DateTime<Utc>,
    },
    /// Receipts naming our provider message ids (the host finds the rows).
    ReceiptByProviderId {
        device: DeviceRef,
        provider_message_ids: Vec<String>,
        read: bool,
        at: DateTime<Utc>,
    },
    /// The server accepted a message after the send returned: its attempt record becomes `sent`.
    Accepted {
        device: DeviceRef,
        provider_message_id: String,
    },
    /// The server refused a message after the send returned (a nack): the row fails with it.
    Refused {
        device: DeviceRef,
        provider_message_id: String,
        code: String,
    },
    /// The device's session is linked to the WhatsApp account of this number (a web session
    /// reports it each time it connects, so after pairing and after a restore; the simulator
    /// when paired by phone). The host records it on the device, and unlinks the session when
    /// another live device of the tenant already is that number.
    Linked { device: DeviceRef, phone: PhoneE164 },
    /// Text a contact sent to the device (opt-out keywords act on it): the simulator's. The web
    /// provider hands its sessions' text to the host's `OptOuts` itself, before acknowledging it.
    Inbound {
        device: DeviceRef,
        from: PhoneE164,
        text: String,
    },
}

/// The status reason of a device whose session is linked to a number another live device of
/// the tenant already is (the host unlinks it).
pub fn linked_elsewhere(phone: &PhoneE164, label: &str, other: Uuid) -> String {
    format!(
        "unlinked: {phone} is already device {label:?} ({other}); one WhatsApp number is one \
         device (as two it would send at both paces). Use this device for another number"
    )
}

#[async_trait]
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;
    /// A fresh provider message id (recorded before the send).
    fn new_message_id(&self) -> String;
    /// Opens or restores the device's session; reports the resulting status.
    async fn connect(&self, device: &DeviceRef) -> DeviceStatus;
    async fn status(&self, device: &DeviceRef) -> (DeviceStatus, Option<String>);
    async fn start_pairing(
        &self,
        device: &DeviceRef,
        phone: Option<&PhoneE164>,
    ) -> Result<PairingBody, ProviderError>;
    /// Sends; `Ok` means the provider accepted the message.
    async fn send(&self, device: &DeviceRef, message: &Outbound) -> Result<(), ProviderError>;
    /// After a crash mid-send: does the provider know this message id as sent? `None` = cannot
    /// tell, and the host then fails the message (`outcome_unknown`) rather than risk a second send.
    async fn was_sent(&self, device: &DeviceRef, provider_message_id: &str) -> Option<bool>;
    /// Whether the host should check a lead's number (once, cached on the lead) before the first
    /// send to it.
    fn checks_numbers(&self) -> bool {
        false
    }
    /// Is this number on WhatsApp? Only called when [`Provider::checks_numbers`] is true.
    async fn check_number(
        &self,
        _device: &DeviceRef,
        _to: &PhoneE164,
    ) -> Result<bool, ProviderError> {
        Ok(true)
    }
    /// Logs the device out: unlinks it, forgets its session, and nothing reconnects on its own.
    /// `why` becomes the status reason.
    async fn logout(&self, device: &DeviceRef, why: &str) -> Result<(), ProviderError> {
        let _ = why;
        Err(ProviderError::Rejected(format!(
            "{} devices have no session to log out of",
            device.provider
        )))
    }
    /// The device's session turned out to be linked to another device's number (one number is
    /// one device, paced once): log it out, `why` naming the other. A network call for web
    /// sessions; a provider with no session to log out of keeps the device logged out until a
    /// person connects it again.
    async fn linked_elsewhere(&self, device: &DeviceRef, why: &str) -> Result<(), ProviderError> {
        self.logout(device, why).await
    }
    /// Closes the device's session on this host without logging it out (another host takes it).
    async fn release(&self, _device: &DeviceRef) {}
}
