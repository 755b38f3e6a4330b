//! The device host's HTTP contract (request and response bodies, error codes) and a client for
//! it. The worker sends through it; the CLI uses it for status, pairing and simulator control.
//! Every call carries the bearer token; the message id is the idempotency key of a send.

use crate::config::Secret;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    pub message_id: i64,
    pub tenant_id: Uuid,
    pub device_id: Uuid,
    pub to: String,
    pub text: String,
    #[serde(default)]
    pub image: Option<String>,
    /// A Cloud API template to send instead of the text (other providers send the text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<crate::render::TemplateMessage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResponse {
    pub provider_message_id: String,
    /// True when this message id had already been sent: nothing was sent this time.
    pub duplicate: bool,
    /// When the provider accepted the message (the first time, for a duplicate).
    pub accepted_at: chrono::DateTime<chrono::Utc>,
}

/// Up to [`MAX_BATCH`] sends in one request. Each message id is its own idempotency key; the
/// host keeps the order of messages of one device and sends different devices concurrently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendBatchRequest {
    pub messages: Vec<SendRequest>,
}

pub const MAX_BATCH: usize = 100;

/// One result per request message, in request order: `sent` or `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendItemResult {
    pub message_id: i64,
    #[serde(default)]
    pub sent: Option<SendResponse>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendBatchResponse {
    pub results: Vec<SendItemResult>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable: see [`code`].
    pub error: String,
    pub message: String,
    pub retryable: bool,
}

/// Error codes of the host API.
pub mod code {
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const INVALID_PAYLOAD: &str = "invalid_payload";
    pub const UNKNOWN_DEVICE: &str = "unknown_device";
    pub const NOT_ON_WHATSAPP: &str = "not_on_whatsapp";
    pub const BAD_IMAGE: &str = "bad_image";
    pub const DEVICE_OFFLINE: &str = "device_offline";
    pub const RATE_LIMITED: &str = "rate_limited";
    /// This host is sending the message right now, for an earlier request (a late request of a
    /// previous claim of the row, which found it `sending` again). The caller records nothing:
    /// the send under way decides, and its record settles the row.
    pub const IN_PROGRESS: &str = "in_progress";
    /// Not attempted: an earlier message of the same device in the batch failed transiently.
    pub const HELD_BACK: &str = "held_back";
    pub const PROVIDER_ERROR: &str = "provider_error";
    pub const TEMPLATE_REQUIRED: &str = "template_required";
    pub const PROVIDER_REJECTED: &str = "provider_rejected";
    pub const OUTCOME_UNKNOWN: &str = "outcome_unknown";
    pub const INTERNAL: &str = "internal";
    /// No connection to the host could be made (refused, or no answer to the connect): the
    /// request never reached a host, so no provider saw the message.
    pub const UNREACHABLE: &str = "host_unreachable";
    /// The request left but no answer came back (timeout, connection reset): the host may have
    /// sent it, and its send record decides.
    pub const NO_ANSWER: &str = "host_no_answer";
    /// Another host holds the device's lease: retry (the next claim routes to the owner).
    pub const WRONG_HOST: &str = "wrong_host";
    /// No message with this id is being sent (its row is not `sending` for this tenant and
    /// device: a request that arrived after its row's lease, when the rescuer had moved the row
    /// on, or a stray id). Nothing was sent, and the caller records nothing: the row is not its
    /// own any more.
    pub const NOT_IN_FLIGHT: &str = "not_in_flight";

    /// Whether a transient error left the message untouched by any provider (it was never
    /// offered to WhatsApp), so that the retry does not use up one of its attempts: held back
    /// behind its device's earlier error, refused for another host's device, or a host that
    /// could not be reached at all (a host that died, until its leases run out and another
    /// takes its devices over).
    pub fn never_offered(code: &str) -> bool {
        matches!(code, HELD_BACK | WRONG_HOST | UNREACHABLE)
    }
}

/// The transient outcome of a request that failed in transport.
fn transport_error(e: &reqwest::Error) -> (String, String) {
    let reason = if e.is_connect() {
        code::UNREACHABLE
    } else {
        code::NO_ANSWER
    };
    (reason.into(), e.to_string())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatusBody {
    pub device_id: Uuid,
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// What a user scans (QR) or types (pair code) to link a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingBody {
    pub device_id: Uuid,
    /// `qr` or `code`.
    pub method: String,
    pub code: String,
    pub expires_in_s: u64,
    /// The QR code as an SVG image (QR pairing only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svg: Option<String>,
}

/// Simulator only: a contact's text to a device (`POST /v1/sim/devices/{id}/inbound`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimInboundRequest {
    pub tenant_id: Uuid,
    /// The sender's number, as a person would type it; the host normalises it (E.164).
    pub from: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairRequest {
    pub tenant_id: Uuid,
    /// Present for a phone-number pair code; absent for a QR code.
    #[serde(default)]
    pub phone: Option<String>,
}

/// How a send ended, as the worker branches on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Sent {
        provider_message_id: String,
        duplicate: bool,
        accepted_at: chrono::DateTime<chrono::Utc>,
    },
    /// Retrying cannot help (`reason` is a machine code).
    Permanent { reason: String, detail: String },
    /// Retrying later may help.
    Transient { reason: String, detail: String },
}

#[derive(Clone)]
pub struct HostClient {
    http: reqwest::Client,
    base: String,
    token: Secret,
}

impl HostClient {
    pub fn new(base_url: &str, token: Secret, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(3))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The same client (connection pool, token, timeouts) for another host.
    pub fn at(&self, base_url: &str) -> Self {
        Self {
            http: self.http.clone(),
            base: base_url.trim_end_matches('/').to_string(),
            token: self.token.clone(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn send(&self, req: &SendRequest) -> SendOutcome {
        let resp = self
            .http
            .post(format!("{}/v1/send", self.base))
            .bearer_auth(self.token.expose())
            .json(req)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let (reason, detail) = transport_error(&e);
                return SendOutcome::Transient { reason, detail };
            }
        };
        let status = resp.status();
        if status.is_success() {
            return match resp.json::<SendResponse>().await {
                Ok(b) => SendOutcome::Sent {
                    provider_message_id: b.provider_message_id,
                    duplicate: b.duplicate,
                    accepted_at: b.accepted_at,
                },
                // The host accepted but its answer was lost: the send record decides later.
                Err(e) => SendOutcome::Transient {
                    reason: code::PROVIDER_ERROR.into(),
                    detail: format!("unreadable success body: {e}"),
                },
            };
        }
        match resp.json::<ErrorBody>().await {
            Ok(b) if b.retryable => SendOutcome::Transient {
                reason: b.error,
                detail: b.message,
            },
            Ok(b) => SendOutcome::Permanent {
                reason: b.error,
                detail: b.message,
            },
            Err(_) if status.is_server_error() || status.as_u16() == 429 => {
                SendOutcome::Transient {
                    reason: code::PROVIDER_ERROR.into(),
                    detail: format!("HTTP {status}"),
                }
            }
            Err(_) => SendOutcome::Permanent {
                reason: code::INVALID_PAYLOAD.into(),
                detail: format!("HTTP {status}"),
            },
        }
    }

    /// Sends a batch; one outcome per request, in order. A transport failure makes every
    /// outcome transient (the send records decide later what really happened).
    pub async fn send_batch(&self, messages: &[SendRequest]) -> Vec<SendOutcome> {
        let every = |reason: &str, detail: String| {
            messages
                .iter()
                .map(|_| SendOutcome::Transient {
                    reason: reason.to_string(),
                    detail: detail.clone(),
                })
                .collect::<Vec<_>>()
        };
        let body = SendBatchRequest {
            messages: messages.to_vec(),
        };
        let resp = match self
            .http
            .post(format!("{}/v1/send-batch", self.base))
            .bearer_auth(self.token.expose())
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let (reason, detail) = transport_error(&e);
                return every(&reason, detail);
            }
        };
        if !resp.status().is_success() {
            let status = resp.status();
            return match resp.json::<ErrorBody>().await {
                Ok(b) if !b.retryable => messages
                    .iter()
                    .map(|_| SendOutcome::Permanent {
                        reason: b.error.clone(),
                        detail: b.message.clone(),
                    })
                    .collect(),
                Ok(b) => every(&b.error, b.message),
                Err(_) => every(code::NO_ANSWER, format!("HTTP {status}")),
            };
        }
        let parsed = match resp.json::<SendBatchResponse>().await {
            Ok(p) => p,
            Err(e) => return every(code::NO_ANSWER, format!("unreadable batch response: {e}")),
        };
        let mut by_id: std::collections::HashMap<i64, SendItemResult> = parsed
            .results
            .into_iter()
            .map(|r| (r.message_id, r))
            .collect();
        messages
            .iter()
            .map(|m| match by_id.remove(&m.message_id) {
                Some(SendItemResult { sent: Some(s), .. }) => SendOutcome::Sent {
                    provider_message_id: s.provider_message_id,
                    duplicate: s.duplicate,
                    accepted_at: s.accepted_at,
                },
                Some(SendItemResult { error: Some(e), .. }) if e.retryable => {
                    SendOutcome::Transient {
                        reason: e.error,
                        detail: e.message,
                    }
                }
                Some(SendItemResult { error: Some(e), .. }) => SendOutcome::Permanent {
                    reason: e.error,
                    detail: e.message,
                },
                _ => SendOutcome::Transient {
                    reason: code::PROVIDER_ERROR.into(),
                    detail: "no result for this message".into(),
                },
            })
            .collect()
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let resp = req.bearer_auth(self.token.expose()).send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        match resp.json::<ErrorBody>().await {
            Ok(b) => anyhow::bail!("device host: {} ({})", b.message, b.error),
            Err(_) => anyhow::bail!("device host answered HTTP {status}"),
        }
    }

    pub async fn device_status(
        &self,
        tenant: Uuid,
        device: Uuid,
    ) -> anyhow::Result<DeviceStatusBody> {
        self.call(
            self.http
                .get(format!("{}/v1/devices/{device}/status", self.base))
                .query(&[("tenant_id", tenant.to_string())]),
        )
        .await
    }

    /// Asks the host to (re)connect the device now: after its credentials changed, or when a
    /// person has resolved what stopped it (restriction, logout).
    pub async fn connect_device(
        &self,
        tenant: Uuid,
        device: Uuid,
    ) -> anyhow::Result<DeviceStatusBody> {
        self.call(
            self.http
                .post(format!("{}/v1/devices/{device}/connect", self.base))
                .query(&[("tenant_id", tenant.to_string())]),
        )
        .await
    }

    /// Logs the device out: unlinked, session deleted, nothing reconnects until it is paired again.
    pub async fn logout_device(
        &self,
        tenant: Uuid,
        device: Uuid,
    ) -> anyhow::Result<DeviceStatusBody> {
        self.call(
            self.http
                .post(format!("{}/v1/devices/{device}/logout", self.base))
                .query(&[("tenant_id", tenant.to_string())]),
        )
        .await
    }

    pub async fn start_pairing(
        &self,
        tenant: Uuid,
        device: Uuid,
        phone: Option<String>,
    ) -> anyhow::Result<PairingBody> {
        self.call(
            self.http
                .post(format!("{}/v1/devices/{device}/pair", self.base))
                .json(&PairRequest {
                    tenant_id: tenant,
                    phone,
                }),
        )
        .await
    }

    /// Simulator only: take a device offline or bring it back.
    pub async fn simulate_connection(
        &self,
        tenant: Uuid,
        device: Uuid,
        online: bool,
    ) -> anyhow::Result<DeviceStatusBody> {
        let action = if online { "online" } else { "offline" };
        self.call(
            self.http
                .post(format!("{}/v1/sim/devices/{device}/{action}", self.base))
                .query(&[("tenant_id", tenant.to_string())]),
        )
        .await
    }

    /// Simulator only: a contact writes `text` to the device from `from`. The host handles it
    /// as a web session's inbound message (an opt-out keyword opts the number out), after it
    /// answered.
    pub async fn simulate_inbound(
        &self,
        tenant: Uuid,
        device: Uuid,
        from: &str,
        text: &str,
    ) -> anyhow::Result<serde_json::Value> {
        self.call(
            self.http
                .post(format!("{}/v1/sim/devices/{device}/inbound", self.base))
                .json(&SimInboundRequest {
                    tenant_id: tenant,
                    from: from.to_string(),
                    text: text.to_string(),
                }),
        )
        .await
    }

    pub async fn health(&self) -> anyhow::Result<serde_json::Value> {
        self.call(self.http.get(format!("{}/healthz", self.base)))
            .await
    }
}
