//! The WhatsApp Cloud API provider (Meta Graph API over HTTPS, reqwest) and its webhook.
//!
//! A Cloud API "device" is a business phone number: its phone-number id and access token live in
//! `device_cloud_credentials` (set with `wabcast device cloud-api`); there is nothing to pair.
//! Sends are `POST /{phone-number-id}/messages`; our provider message id travels as
//! `biz_opaque_callback_data`, so the statuses webhook names our send record directly. Images are
//! uploaded once per image per device (`POST /{phone-number-id}/media`) and sent by media id.
//!
//! Errors are classified from Meta's documented codes: rate limits retry later, 131047 (the
//! 24-hour window closed) fails with `template_required`, 131026 is `not_on_whatsapp`, and spam or
//! quality restrictions (131048, 131049, 368) put the device in `restricted`, which stops the
//! processor from giving it new messages until a person acts.
//!
//! The webhook checks `X-Hub-Signature-256` (HMAC-SHA256 of the raw body with the app secret) in
//! constant time before it parses anything; a bad signature is refused and changes nothing. Every
//! change it applies is scoped to the tenant of the device Meta names. It must never log a token.

use crate::provider::{DeviceRef, Outbound, Provider, ProviderError, ProviderEvent, ResolvedImage};
use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use shared::config::Secret;
use shared::domain::{reason, DeviceStatus, PhoneE164, ProviderKind};
use shared::host_api::PairingBody;
use shared::repo;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};
use uuid::Uuid;

/// Host-wide Cloud API settings (per-device credentials are in the database).
#[derive(Debug, Clone)]
pub struct CloudApiConfig {
    /// Graph API base, version included (`https://graph.facebook.com/v21.0`).
    pub base_url: String,
    /// The Meta app's secret: signs webhook deliveries. Without it the webhook refuses everything.
    pub app_secret: Option<Secret>,
    /// The token Meta echoes when it verifies the webhook URL.
    pub verify_token: Option<Secret>,
    pub timeout: Duration,
    /// Inbound texts that opt a lead out (compared trimmed, case-insensitively).
    pub opt_out_keywords: Vec<String>,
}

impl Default for CloudApiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://graph.facebook.com/v21.0".into(),
            app_secret: None,
            verify_token: None,
            timeout: Duration::from_secs(20),
            opt_out_keywords: default_opt_out_keywords(),
        }
    }
}

/// `OPT_OUT_KEYWORDS` unless set: English, Malay and Chinese (停止 "stop", 退订 "unsubscribe"),
/// and the label of Meta's marketing opt-out quick-reply button ("Stop promotions").
pub const DEFAULT_OPT_OUT_KEYWORDS: &str = "STOP,UNSUBSCRIBE,BERHENTI,停止,退订,STOP PROMOTIONS";

pub fn default_opt_out_keywords() -> Vec<String> {
    DEFAULT_OPT_OUT_KEYWORDS
        .split(',')
        .map(|s| s.to_string())
        .collect()
}

/// What a Graph API error means for the message and the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub error: ProviderError,
    /// Set when the device must stop sending (`restricted`, `logged_out`) until a person acts.
    pub device: Option<(DeviceStatus, String)>,
}

/// Classifies a Graph API error by its documented code (HTTP status when there is none).
pub fn classify(http_status: u16, code: Option<i64>, message: &str) -> Classified {
    let detail = match code {
        Some(c) => format!("Cloud API {c}: {message}"),
        None => format!("Cloud API HTTP {http_status}: {message}"),
    };
    let plain = |error| Classified {
        error,
        device: None,
    };
    match code {
        // Throughput, pair rate and app/account rate limits: later.
        Some(130429 | 131056 | 4 | 80007) => plain(ProviderError::RateLimited),
        Some(131047) => plain(ProviderError::Failed {
            reason: reason::TEMPLATE_REQUIRED,
            detail: format!("{detail} (the 24-hour window is closed: send a template message)"),
        }),
        Some(131026) => plain(ProviderError::NotOnWhatsapp),
        // Spam rate limit, quality/ecosystem restriction, temporary block.
        Some(131048 | 131049 | 368) => Classified {
            error: ProviderError::Offline(format!("restricted: {detail}")),
            device: Some((DeviceStatus::Restricted, detail)),
        },
        // The access token expired or was revoked.
        Some(190) => Classified {
            error: ProviderError::Offline(format!("logged out: {detail}")),
            device: Some((DeviceStatus::LoggedOut, detail)),
        },
        // Meta's side is unavailable or timed out.
        Some(1 | 2 | 131000 | 131016) => plain(ProviderError::Transient(detail)),
        _ if http_status == 401 => Classified {
            error: ProviderError::Offline(format!("logged out: {detail}")),
            device: Some((DeviceStatus::LoggedOut, detail)),
        },
        _ if http_status == 429 => plain(ProviderError::RateLimited),
        _ if http_status >= 500 => plain(ProviderError::Transient(detail)),
        // Invalid parameters, unsupported media, recipient problems: this message will not go.
        _ => plain(ProviderError::Failed {
            reason: reason::PROVIDER_REJECTED,
            detail,
        }),
    }
}

#[derive(Debug, Deserialize)]
struct GraphErrorBody {
    error: GraphError,
}

#[derive(Debug, Deserialize)]
struct GraphError {
    #[serde(default)]
    message: String,
    code: Option<i64>,
    #[serde(default)]
    error_data: Option<serde_json::Value>,
}

fn classify_response(status: u16, body: &str) -> Classified {
    match serde_json::from_str::<GraphErrorBody>(body) {
        Ok(b) => {
            let extra = b
                .error
                .error_data
                .as_ref()
                .and_then(|d| d.get("details"))
                .and_then(|d| d.as_str())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            classify(status, b.error.code, &format!("{}{extra}", b.error.message))
        }
        Err(_) => classify(status, None, "unexpected response"),
    }
}

pub struct CloudApi {
    http: reqwest::Client,
    config: CloudApiConfig,
    pool: PgPool,
    statuses: RwLock<HashMap<Uuid, (DeviceStatus, Option<String>)>>,
    /// (device, sha256 of the image's source) → media id: one upload per image per device.
    media: Mutex<HashMap<(Uuid, String), String>>,
    events: mpsc::UnboundedSender<ProviderEvent>,
}

impl CloudApi {
    pub fn new(
        config: CloudApiConfig,
        pool: PgPool,
        events: mpsc::UnboundedSender<ProviderEvent>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            config,
            pool,
            statuses: RwLock::new(HashMap::new()),
            media: Mutex::new(HashMap::new()),
            events,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.config.base_url.trim_end_matches('/'))
    }

    async fn credentials(
        &self,
        device: &DeviceRef,
    ) -> Result<repo::cloud_api::CloudCredentials, ProviderError> {
        repo::cloud_api::get_cloud_credentials(&self.pool, device.tenant_id, device.id)
            .await
            .map_err(|e| ProviderError::Transient(format!("credentials unavailable: {e}")))?
            .ok_or_else(|| {
                ProviderError::Offline(
                    "no Cloud API credentials (wabcast device cloud-api sets them)".into(),
                )
            })
    }

    fn set_status(&self, device: &DeviceRef, status: DeviceStatus, reason: Option<String>) {
        let changed = self
            .statuses
            .write()
            .map(|mut m| {
                let new = (status, reason.clone());
                m.insert(device.id, new.clone()) != Some(new)
            })
            .unwrap_or(true);
        if changed {
            let _ = self.events.send(ProviderEvent::Status {
                device: device.clone(),
                status,
                reason,
                restricted_until: None,
            });
        }
    }

    /// A phone-number id the Graph API knows: its number is recorded on the device, unless
    /// another live device of the tenant already is that number (one number is one device, paced
    /// once), which leaves this one logged out with a reason naming the other. A number the
    /// database did not take (away) comes back third: the caller hands it to the event writer
    /// once the status is set, and the writer records it once the database is back (logging
    /// the device out then if it is another device's number, see [`Provider::linked_elsewhere`]).
    async fn linked(
        &self,
        device: &DeviceRef,
        resp: reqwest::Response,
    ) -> (DeviceStatus, Option<String>, Option<PhoneE164>) {
        let shown = resp
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["display_phone_number"].as_str().map(str::to_string));
        // "+60 12-345 6789" (or without the plus): its digits with a plus.
        let phone = shown.as_deref().and_then(|s| {
            let digits: String = s.chars().filter(char::is_ascii_digit).collect();
            PhoneE164::parse(&format!("+{digits}")).ok()
        });
        let Some(phone) = phone else {
            warn!(device_id = %device.id, shown = ?shown, "the Graph API gave no usable display_phone_number");
            return (DeviceStatus::Online, None, None);
        };
        match repo::devices::record_linked_number(&self.pool, device.tenant_id, device.id, &phone)
            .await
        {
            Ok(repo::devices::LinkedNumber::OtherDevice { id, label }) => (
                DeviceStatus::LoggedOut,
                Some(crate::provider::linked_elsewhere(&phone, &label, id)),
                None,
            ),
            Ok(_) => (DeviceStatus::Online, None, None),
            Err(e) => {
                warn!(device_id = %device.id, error = %e,
                      "could not record the device's number; the event writer will");
                (DeviceStatus::Online, None, Some(phone))
            }
        }
    }

    /// Uploads the image for this device once; later sends reuse the media id.
    async fn media_id(
        &self,
        device: &DeviceRef,
        creds: &repo::cloud_api::CloudCredentials,
        image: &ResolvedImage,
    ) -> Result<String, Classified> {
        let key = (device.id, hex::encode(Sha256::digest(image.key.as_bytes())));
        if let Some(id) = self.media.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(id);
        }
        let ext = image.mime.rsplit('/').next().unwrap_or("bin");
        let part = reqwest::multipart::Part::bytes(image.bytes.as_ref().clone())
            .file_name(format!("image.{ext}"))
            .mime_str(&image.mime)
            .map_err(|e| classify(400, None, &e.to_string()))?;
        let form = reqwest::multipart::Form::new()
            .text("messaging_product", "whatsapp")
            .text("type", image.mime.clone())
            .part("file", part);
        let resp = self
            .http
            .post(self.url(&format!("{}/media", creds.phone_number_id)))
            .bearer_auth(creds.access_token.expose())
            .multipart(form)
            .send()
            .await
            .map_err(|e| classify(503, None, &format!("media upload: {}", e.without_url())))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            return Err(classify_response(status, &body));
        }
        let id = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(String::from))
            .ok_or_else(|| classify(502, None, "media upload answered without an id"))?;
        if let Ok(mut m) = self.media.lock() {
            m.insert(key, id.clone());
        }
        Ok(id)
    }

    fn apply(&self, device: &DeviceRef, c: Classified) -> ProviderError {
        if let Some((status, why)) = c.device {
            warn!(device = %device.id, status = %status, reason = %why, "Cloud API device stopped");
            self.set_status(device, status, Some(why));
        }
        c.error
    }

    /// `GET /?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…`: the challenge when the
    /// token matches, else `None`.
    pub fn verify_subscription(&self, mode: &str, token: &str, challenge: &str) -> Option<String> {
        let want = self.config.verify_token.as_ref()?;
        (mode == "subscribe" && want.matches(token)).then(|| challenge.to_string())
    }

    /// Checks the signature of a webhook delivery; only then parses and applies it.
    pub async fn handle_webhook(
        &self,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<WebhookReport, WebhookError> {
        let secret = self
            .config
            .app_secret
            .as_ref()
            .ok_or(WebhookError::NotConfigured)?;
        let given = signature
            .and_then(|s| s.strip_prefix("sha256="))
            .and_then(|h| hex::decode(h).ok())
            .ok_or(WebhookError::BadSignature)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .map_err(|_| WebhookError::NotConfigured)?;
        mac.update(body);
        mac.verify_slice(&given)
            .map_err(|_| WebhookError::BadSignature)?;
        let delivery: Delivery =
            serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(e.to_string()))?;
        if delivery.object != "whatsapp_business_account" {
            return Err(WebhookError::Malformed(format!(
                "unexpected object {:?}",
                delivery.object
            )));
        }
        let mut report = WebhookReport::default();
        for change in delivery.entry.iter().flat_map(|e| e.changes.iter()) {
            self.apply_change(&change.value, &mut report)
                .await
                .map_err(|e| WebhookError::Unavailable(e.to_string()))?;
        }
        Ok(report)
    }

    async fn apply_change(
        &self,
        value: &ChangeValue,
        report: &mut WebhookReport,
    ) -> Result<(), repo::RepoError> {
        let Some(meta) = &value.metadata else {
            return Ok(());
        };
        let Some((tenant, device_id)) =
            repo::cloud_api::find_cloud_device(&self.pool, &meta.phone_number_id).await?
        else {
            report.unknown_numbers += 1;
            return Ok(());
        };
        let device = DeviceRef {
            id: device_id,
            tenant_id: tenant,
            provider: ProviderKind::CloudApi,
        };
        // Statuses: our provider message id came back as biz_opaque_callback_data; `id` (the
        // wamid) is only a fallback we never issued, so it finds nothing.
        let ids: Vec<String> = value
            .statuses
            .iter()
            .map(|s| {
                s.biz_opaque_callback_data
                    .clone()
                    .unwrap_or_else(|| s.id.clone())
            })
            .collect();
        let known: HashMap<String, i64> = if ids.is_empty() {
            HashMap::new()
        } else {
            repo::cloud_api::find_sends_by_provider_ids(&self.pool, tenant, device_id, &ids)
                .await?
                .into_iter()
                .collect()
        };
        let mut confirmed = Vec::new();
        for (s, id) in value.statuses.iter().zip(&ids) {
            let Some(message_id) = known.get(id).copied() else {
                report.unknown_messages += 1;
                continue;
            };
            let at = s
                .timestamp
                .parse::<i64>()
                .ok()
                .and_then(|t| Utc.timestamp_opt(t, 0).single())
                .unwrap_or_else(Utc::now);
            match s.status.as_str() {
                "sent" => confirmed.push(message_id),
                "delivered" | "read" => {
                    confirmed.push(message_id);
                    let _ = self.events.send(ProviderEvent::Receipt {
                        tenant_id: tenant,
                        message_id,
                        read: s.status == "read",
                        at,
                    });
                    report.receipts += 1;
                }
                "failed" => {
                    let first = s.errors.first();
                    let c = classify(
                        400,
                        first.and_then(|e| e.code),
                        first
                            .map(|e| e.title.as_str())
                            .unwrap_or("failed without an error"),
                    );
                    let (why, detail) = match &c.error {
                        ProviderError::NotOnWhatsapp => (
                            reason::NOT_ON_WHATSAPP,
                            "the number is not on WhatsApp".to_string(),
                        ),
                        ProviderError::Failed { reason, detail } => (*reason, detail.clone()),
                        other => (reason::PROVIDER_REJECTED, other.to_string()),
                    };
                    let mut tx = self.pool.begin().await?;
                    let changed = repo::cloud_api::fail_accepted_message(
                        &mut tx, tenant, message_id, why, &detail,
                    )
                    .await?;
                    tx.commit().await?;
                    if changed {
                        report.failed += 1;
                    }
                    let _ = self.apply(&device, c);
                }
                _ => report.ignored += 1,
            }
        }
        if !confirmed.is_empty() {
            let mut tx = self.pool.begin().await?;
            repo::cloud_api::confirm_host_sends(&mut tx, tenant, &confirmed).await?;
            tx.commit().await?;
        }
        // Inbound messages: an opt-out keyword, typed or tapped (a template's quick-reply
        // button such as Meta's "Stop promotions", an interactive reply), opts the lead out in
        // this tenant only.
        // Any other message with words in it is a reply: it ends the sender's enrollments in
        // the tenant's sequences that stop on a reply.
        for m in &value.messages {
            let mut said = m.said().peekable();
            if said.peek().is_none() {
                continue;
            }
            if !said.any(|text| crate::service::is_opt_out(&self.config.opt_out_keywords, text)) {
                let Ok(phone) = PhoneE164::parse(&format!("+{}", m.from.trim_start_matches('+')))
                else {
                    continue;
                };
                report.replies_ended +=
                    repo::sequences::end_replied_enrollments(&self.pool, tenant, &phone)
                        .await?
                        .enrollments;
                continue;
            }
            report.opt_outs += self
                .opt_out(tenant, &m.from, repo::leads::ConsentSource::InboundMessage)
                .await?;
        }
        // The person turned this business's marketing messages off in WhatsApp itself (the
        // `user_preferences` field). Turning them on again opts nobody back in: a STOP they
        // typed still stands, and an operator can take the number off the list (`leads
        // opt-in`).
        for p in &value.user_preferences {
            if p.category != "marketing_messages" {
                continue;
            }
            if p.value.eq_ignore_ascii_case("stop") {
                report.opt_outs += self
                    .opt_out(
                        tenant,
                        &p.wa_id,
                        repo::leads::ConsentSource::MarketingPreference,
                    )
                    .await?;
            } else {
                info!(tenant = %tenant, value = %p.value,
                    "marketing messages preference changed; the opt-out list is left as it is");
            }
        }
        Ok(())
    }

    /// Puts the sender (`from`, as the webhook gives it: digits, no `+`) on the tenant's opt-out
    /// list; returns how many of its leads that opted out. A sender that is no phone number
    /// changes nothing.
    async fn opt_out(
        &self,
        tenant: Uuid,
        from: &str,
        source: repo::leads::ConsentSource,
    ) -> Result<u64, repo::RepoError> {
        let Ok(phone) = PhoneE164::parse(&format!("+{}", from.trim_start_matches('+'))) else {
            warn!(tenant = %tenant, "an opt-out from a sender that is no phone number; ignored");
            return Ok(0);
        };
        let n = repo::leads::opt_out_number(&self.pool, tenant, &phone, source).await?;
        info!(tenant = %tenant, leads = n, source = source.as_str(), "opt-out received");
        Ok(n)
    }
}

#[async_trait]
impl Provider for CloudApi {
    fn kind(&self) -> ProviderKind {
        ProviderKind::CloudApi
    }

    fn new_message_id(&self) -> String {
        format!("wbc.{}", Uuid::new_v4().simple())
    }

    /// Checks the credentials against the Graph API (`GET /{phone-number-id}`).
    async fn connect(&self, device: &DeviceRef) -> DeviceStatus {
        let creds = match self.credentials(device).await {
            Ok(c) => c,
            Err(e) => {
                self.set_status(device, DeviceStatus::AwaitingPairing, Some(e.to_string()));
                return DeviceStatus::AwaitingPairing;
            }
        };
        let resp = self
            .http
            .get(self.url(&creds.phone_number_id))
            .query(&[("fields", "id,display_phone_number")])
            .bearer_auth(creds.access_token.expose())
            .send()
            .await;
        let (status, why, unrecorded) = match resp {
            Ok(r) if r.status().is_success() => self.linked(device, r).await,
            Ok(r) => {
                let code = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                match classify_response(code, &body).device {
                    Some((s, why)) => (s, Some(why), None),
                    None => (
                        DeviceStatus::Reconnecting,
                        Some(format!("Cloud API answered HTTP {code}")),
                        None,
                    ),
                }
            }
            Err(e) => (
                DeviceStatus::Reconnecting,
                Some(format!("Cloud API unreachable: {}", e.without_url())),
                None,
            ),
        };
        self.set_status(device, status, why);
        // After the status: a logout the writer decides on lands after this `online`.
        if let Some(phone) = unrecorded {
            let _ = self.events.send(ProviderEvent::Linked {
                device: device.clone(),
                phone,
            });
        }
        status
    }

    /// Logged out here (sends refused) and in PostgreSQL, until a person connects it again:
    /// the Graph API has no session to end.
    async fn linked_elsewhere(&self, device: &DeviceRef, why: &str) -> Result<(), ProviderError> {
        self.set_status(device, DeviceStatus::LoggedOut, Some(why.to_string()));
        Ok(())
    }

    async fn status(&self, device: &DeviceRef) -> (DeviceStatus, Option<String>) {
        self.statuses
            .read()
            .ok()
            .and_then(|m| m.get(&device.id).cloned())
            .unwrap_or((DeviceStatus::Offline, None))
    }

    async fn start_pairing(
        &self,
        _device: &DeviceRef,
        _phone: Option<&PhoneE164>,
    ) -> Result<PairingBody, ProviderError> {
        Err(ProviderError::Failed {
            reason: reason::PROVIDER_REJECTED,
            detail: "a Cloud API number is not paired: set its phone-number id and access token \
                     with `wabcast device cloud-api`"
                .into(),
        })
    }

    async fn send(&self, device: &DeviceRef, message: &Outbound) -> Result<(), ProviderError> {
        let (status, _) = self.status(device).await;
        if matches!(status, DeviceStatus::Restricted | DeviceStatus::LoggedOut) {
            return Err(ProviderError::Offline(format!("device is {status}")));
        }
        let creds = self.credentials(device).await?;
        let to = message.to.as_str().trim_start_matches('+');
        let mut body = serde_json::json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "biz_opaque_callback_data": message.provider_message_id,
        });
        // An image goes by its public link when it has one (Meta fetches and caches it), else
        // by the media id of its one upload to this number.
        let media = match &message.image {
            None => None,
            Some(image) => Some(match &image.link {
                Some(link) => serde_json::json!({ "link": link }),
                None => {
                    let id = self
                        .media_id(device, &creds, image)
                        .await
                        .map_err(|c| self.apply(device, c))?;
                    serde_json::json!({ "id": id })
                }
            }),
        };
        match (&message.template, media) {
            (Some(t), media) => {
                let mut components = Vec::new();
                if let Some(m) = media {
                    components.push(serde_json::json!({
                        "type": "header",
                        "parameters": [{ "type": "image", "image": m }],
                    }));
                }
                if !t.params.is_empty() {
                    let params: Vec<serde_json::Value> = t
                        .params
                        .iter()
                        .map(|p| serde_json::json!({ "type": "text", "text": p }))
                        .collect();
                    components.push(serde_json::json!({ "type": "body", "parameters": params }));
                }
                body["type"] = "template".into();
                body["template"] = serde_json::json!({
                    "name": t.name,
                    "language": { "code": t.language },
                    "components": components,
                });
            }
            (None, Some(mut m)) => {
                m["caption"] = message.text.clone().into();
                body["type"] = "image".into();
                body["image"] = m;
            }
            (None, None) => {
                body["type"] = "text".into();
                body["text"] = serde_json::json!({ "preview_url": false, "body": message.text });
            }
        }
        let resp = self
            .http
            .post(self.url(&format!("{}/messages", creds.phone_number_id)))
            .bearer_auth(creds.access_token.expose())
            .json(&body)
            .send()
            .await
            .map_err(|e| ProviderError::Transient(format!("Cloud API: {}", e.without_url())))?;
        let code = resp.status().as_u16();
        if (200..300).contains(&code) {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        Err(self.apply(device, classify_response(code, &text)))
    }

    /// The Graph API cannot be asked whether a message id went out; the statuses webhook
    /// confirms sends into the send record instead (see `confirm_host_sends`).
    async fn was_sent(&self, _device: &DeviceRef, _provider_message_id: &str) -> Option<bool> {
        None
    }
}

/// What one webhook delivery changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WebhookReport {
    pub receipts: u64,
    pub failed: u64,
    pub opt_outs: u64,
    /// Enrollments that a lead's reply ended (sequences that stop on a reply).
    pub replies_ended: u64,
    pub ignored: u64,
    pub unknown_numbers: u64,
    pub unknown_messages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the Cloud API webhook is not configured on this host")]
    NotConfigured,
    #[error("bad or missing X-Hub-Signature-256")]
    BadSignature,
    #[error("malformed webhook delivery: {0}")]
    Malformed(String),
    #[error("could not apply the delivery: {0}")]
    Unavailable(String),
}

#[derive(Debug, Deserialize)]
struct Delivery {
    object: String,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    #[serde(default)]
    changes: Vec<Change>,
}

#[derive(Debug, Deserialize)]
struct Change {
    value: ChangeValue,
}

#[derive(Debug, Deserialize)]
struct ChangeValue {
    metadata: Option<Metadata>,
    #[serde(default)]
    statuses: Vec<Status>,
    #[serde(default)]
    messages: Vec<Inbound>,
    #[serde(default)]
    user_preferences: Vec<UserPreference>,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    phone_number_id: String,
}

#[derive(Debug, Deserialize)]
struct Status {
    id: String,
    status: String,
    #[serde(default)]
    timestamp: String,
    biz_opaque_callback_data: Option<String>,
    #[serde(default)]
    errors: Vec<StatusError>,
}

#[derive(Debug, Deserialize)]
struct StatusError {
    code: Option<i64>,
    #[serde(default)]
    title: String,
}

/// An inbound message, of the kinds that carry words: typed text, an image's caption, a
/// template's quick-reply button (`type: button`) and an interactive reply (`type:
/// interactive`). Every field the webhook may leave out has a default, so that a message of
/// another kind is passed over, never a reason to refuse the delivery.
#[derive(Debug, Deserialize)]
struct Inbound {
    from: String,
    text: Option<InboundText>,
    image: Option<InboundImage>,
    button: Option<InboundButton>,
    interactive: Option<InboundInteractive>,
}

impl Inbound {
    /// What the person said, in each form the message carries it: a button's label and its
    /// payload (which is the label unless the business set one), a reply's title and id.
    fn said(&self) -> impl Iterator<Item = &str> {
        let text = self.text.as_ref().map(|t| t.body.as_str());
        let caption = self.image.as_ref().and_then(|i| i.caption.as_deref());
        let button = self
            .button
            .iter()
            .flat_map(|b| [b.text.as_str(), b.payload.as_str()]);
        let reply = self.interactive.iter().flat_map(|i| {
            [i.button_reply.as_ref(), i.list_reply.as_ref()]
                .into_iter()
                .flatten()
                .flat_map(|r| [r.title.as_str(), r.id.as_str()])
        });
        text.into_iter()
            .chain(caption)
            .chain(button)
            .chain(reply)
            .filter(|s| !s.is_empty())
    }
}

#[derive(Debug, Deserialize)]
struct InboundText {
    body: String,
}

#[derive(Debug, Deserialize)]
struct InboundImage {
    caption: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InboundButton {
    #[serde(default)]
    text: String,
    #[serde(default)]
    payload: String,
}

#[derive(Debug, Deserialize)]
struct InboundInteractive {
    button_reply: Option<InboundReply>,
    list_reply: Option<InboundReply>,
}

#[derive(Debug, Deserialize)]
struct InboundReply {
    #[serde(default)]
    id: String,
    #[serde(default)]
    title: String,
}

/// A change of the person's marketing messages setting for this business (the webhook's
/// `user_preferences` field): `value` is `stop` or `resume`.
#[derive(Debug, Deserialize)]
struct UserPreference {
    #[serde(default)]
    wa_id: String,
    #[serde(default)]
    category: String,
    #[serde(default)]
    value: String,
}

/// The signature Meta puts in `X-Hub-Signature-256` for `body` (tests and the sample event use it).
pub fn sign(app_secret: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_codes_are_classified() {
        assert_eq!(
            classify(400, Some(130429), "x").error,
            ProviderError::RateLimited
        );
        assert_eq!(
            classify(400, Some(131056), "x").error,
            ProviderError::RateLimited
        );
        assert_eq!(
            classify(400, Some(131026), "x").error,
            ProviderError::NotOnWhatsapp
        );
        assert!(matches!(
            classify(400, Some(131047), "x").error,
            ProviderError::Failed {
                reason: "template_required",
                ..
            }
        ));
        for code in [131048, 131049, 368] {
            let c = classify(400, Some(code), "x");
            assert!(matches!(c.error, ProviderError::Offline(_)));
            assert_eq!(c.device.map(|d| d.0), Some(DeviceStatus::Restricted));
        }
        assert_eq!(
            classify(401, Some(190), "expired").device.map(|d| d.0),
            Some(DeviceStatus::LoggedOut)
        );
        assert!(matches!(
            classify(500, None, "x").error,
            ProviderError::Transient(_)
        ));
        assert!(matches!(
            classify(400, Some(100), "invalid parameter").error,
            ProviderError::Failed {
                reason: "provider_rejected",
                ..
            }
        ));
    }

    #[test]
    fn a_signature_is_an_hmac_of_the_exact_body() {
        let s = sign("secret", b"{}");
        assert!(s.starts_with("sha256="));
        assert_eq!(s.len(), 7 + 64);
        assert_ne!(s, sign("secret", b"{ }"));
        assert_ne!(s, sign("other", b"{}"));
    }
}
