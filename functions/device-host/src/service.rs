//! The host's core: the device registry, the idempotent send path, image resolution, and the
//! writers that put provider events (status, receipts) into PostgreSQL.
//!
//! A send for a message id goes through the durable record in `host_sends`: the provider message
//! id is generated and recorded before the provider is called; a repeated request for a message
//! already sent answers "duplicate" and sends nothing; a request for an attempt that died with a
//! previous process asks the provider whether it went out before trying again with the same id.

use crate::provider::{DeviceRef, Outbound, Provider, ProviderError, ProviderEvent, ResolvedImage};
use shared::domain::{reason, DeviceStatus, PhoneE164, ProviderKind};
use shared::host_api::{code, SendRequest, SendResponse};
use shared::media::{ImageFetcher, ImageSource};
use shared::repo::{self, host_sends::HostSendState, messages::Receipt, RepoError};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};
use uuid::Uuid;

/// An error the API turns into a status code and an `ErrorBody`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

impl SendError {
    fn permanent(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retryable: false,
        }
    }
    fn transient(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retryable: true,
        }
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        warn!(error = %e, "internal error");
        Self::transient(500, code::INTERNAL, "internal error")
    }
}

impl From<RepoError> for SendError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::NotFound(what) => {
                Self::permanent(404, code::UNKNOWN_DEVICE, format!("{what} not found"))
            }
            other => Self::internal(other),
        }
    }
}

pub struct Host {
    pub pool: PgPool,
    pub host_id: String,
    providers: HashMap<ProviderKind, Arc<dyn Provider>>,
    devices: RwLock<HashMap<Uuid, DeviceRef>>,
    in_flight: Mutex<HashSet<i64>>,
    fetcher: ImageFetcher,
    images: Mutex<HashMap<String, (Instant, ResolvedImage)>>,
}

/// Removes a message id from the in-flight set however the send ends.
struct InFlight<'a>(&'a Host, i64);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.in_flight.lock() {
            s.remove(&self.1);
        }
    }
}

const IMAGE_CACHE_TTL: Duration = Duration::from_secs(600);
const IMAGE_CACHE_MAX: usize = 64;

impl Host {
    pub fn new(
        pool: PgPool,
        host_id: String,
        providers: Vec<Arc<dyn Provider>>,
        fetcher: ImageFetcher,
    ) -> Self {
        Self {
            pool,
            host_id,
            providers: providers.into_iter().map(|p| (p.kind(), p)).collect(),
            devices: RwLock::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            fetcher,
            images: Mutex::new(HashMap::new()),
        }
    }

    pub fn provider(&self, kind: ProviderKind) -> Option<&Arc<dyn Provider>> {
        self.providers.get(&kind)
    }

    pub fn device_count(&self) -> usize {
        self.devices.read().map(|d| d.len()).unwrap_or(0)
    }

    /// Restores a session for every live device of the providers this host serves.
    pub async fn restore_sessions(&self) -> anyhow::Result<usize> {
        let kinds: Vec<&str> = self.providers.keys().map(|k| k.as_str()).collect();
        let devices = repo::devices::list_live_devices(&self.pool, &kinds).await?;
        let mut n = 0;
        for d in devices {
            let Ok(provider) = d.provider.parse::<ProviderKind>() else {
                continue;
            };
            let device = DeviceRef {
                id: d.id,
                tenant_id: d.tenant_id,
                provider,
            };
            self.connect(&device).await;
            n += 1;
        }
        info!(sessions = n, "sessions restored");
        Ok(n)
    }

    async fn connect(&self, device: &DeviceRef) {
        if let Some(p) = self.providers.get(&device.provider) {
            p.connect(device).await;
            if let Ok(mut map) = self.devices.write() {
                map.insert(device.id, device.clone());
            }
        }
    }

    /// The device, if it is the tenant's and live; a device added after start is connected now.
    pub async fn device(&self, tenant: Uuid, id: Uuid) -> Result<DeviceRef, SendError> {
        let known = self.devices.read().ok().and_then(|m| m.get(&id).cloned());
        if let Some(d) = known {
            return if d.tenant_id == tenant {
                Ok(d)
            } else {
                Err(SendError::permanent(
                    404,
                    code::UNKNOWN_DEVICE,
                    "device not found",
                ))
            };
        }
        let row = repo::devices::get_device(&self.pool, tenant, id).await?;
        if row.deleted_at.is_some() {
            return Err(SendError::permanent(
                404,
                code::UNKNOWN_DEVICE,
                "device was deleted",
            ));
        }
        let provider: ProviderKind = row
            .provider
            .parse()
            .map_err(|_| SendError::permanent(422, code::UNKNOWN_DEVICE, "unknown provider"))?;
        if !self.providers.contains_key(&provider) {
            return Err(SendError::permanent(
                422,
                code::UNKNOWN_DEVICE,
                format!("this host does not serve {provider} devices"),
            ));
        }
        let device = DeviceRef {
            id,
            tenant_id: tenant,
            provider,
        };
        self.connect(&device).await;
        Ok(device)
    }

    fn provider_for(&self, device: &DeviceRef) -> Result<&Arc<dyn Provider>, SendError> {
        self.providers
            .get(&device.provider)
            .ok_or_else(|| SendError::permanent(422, code::UNKNOWN_DEVICE, "provider not served"))
    }

    /// Sends one message at most once per message id.
    pub async fn send(&self, req: &SendRequest) -> Result<SendResponse, SendError> {
        let to = PhoneE164::parse(&req.to)
            .map_err(|e| SendError::permanent(422, code::INVALID_PAYLOAD, e.to_string()))?;
        if req.text.trim().is_empty() || req.text.len() > 4096 {
            return Err(SendError::permanent(
                422,
                code::INVALID_PAYLOAD,
                "text must be 1 to 4096 bytes",
            ));
        }
        if req.message_id <= 0 {
            return Err(SendError::permanent(
                422,
                code::INVALID_PAYLOAD,
                "message_id must be positive",
            ));
        }
        let device = self.device(req.tenant_id, req.device_id).await?;
        let provider = self.provider_for(&device)?.clone();

        let claimed = {
            let mut set = self.in_flight.lock().map_err(SendError::internal)?;
            set.insert(req.message_id)
        };
        if !claimed {
            return Err(SendError::transient(
                409,
                code::IN_PROGRESS,
                "this message is being sent",
            ));
        }
        let _guard = InFlight(self, req.message_id);

        let mut tx = self.pool.begin().await.map_err(SendError::internal)?;
        let state = repo::host_sends::begin_host_send(
            &mut tx,
            req.tenant_id,
            device.id,
            req.message_id,
            &provider.new_message_id(),
            &self.host_id,
        )
        .await?;
        tx.commit().await.map_err(SendError::internal)?;
        let provider_message_id = match state {
            HostSendState::Owned {
                provider_message_id,
            } => provider_message_id,
            HostSendState::Existing {
                provider_message_id,
                state,
                error,
                updated_at,
            } => match state.as_str() {
                "sent" => {
                    return Ok(SendResponse {
                        provider_message_id,
                        duplicate: true,
                        accepted_at: updated_at,
                    })
                }
                "failed" => {
                    let reason = error.unwrap_or_else(|| "provider_refused".into());
                    return Err(SendError::permanent(422, permanent_code(&reason), reason));
                }
                _ => {
                    // An attempt that died with a previous process (not in flight here).
                    if provider.was_sent(&device, &provider_message_id).await == Some(true) {
                        self.finish(req, "sent", None).await?;
                        return Ok(SendResponse {
                            provider_message_id,
                            duplicate: true,
                            accepted_at: chrono::Utc::now(),
                        });
                    }
                    let mut tx = self.pool.begin().await.map_err(SendError::internal)?;
                    repo::host_sends::retake_host_send(
                        &mut tx,
                        req.tenant_id,
                        req.message_id,
                        &self.host_id,
                    )
                    .await?;
                    tx.commit().await.map_err(SendError::internal)?;
                    provider_message_id
                }
            },
        };

        let image = match &req.image {
            None => None,
            Some(src) => match self.resolve_image(req.tenant_id, src).await {
                Ok(img) => Some(img),
                Err(e) if e.retryable => {
                    self.finish(req, "aborted", Some(&e.message)).await?;
                    return Err(e);
                }
                Err(e) => {
                    self.finish(req, "failed", Some(reason::BAD_IMAGE)).await?;
                    return Err(e);
                }
            },
        };
        let outbound = Outbound {
            message_id: req.message_id,
            tenant_id: req.tenant_id,
            provider_message_id: provider_message_id.clone(),
            to,
            text: req.text.clone(),
            image,
        };
        match provider.send(&device, &outbound).await {
            Ok(()) => {
                let accepted_at = chrono::Utc::now();
                self.finish(req, "sent", None).await?;
                Ok(SendResponse {
                    provider_message_id,
                    duplicate: false,
                    accepted_at,
                })
            }
            Err(ProviderError::NotOnWhatsapp) => {
                self.finish(req, "failed", Some(reason::NOT_ON_WHATSAPP))
                    .await?;
                Err(SendError::permanent(
                    422,
                    code::NOT_ON_WHATSAPP,
                    "the number is not on WhatsApp",
                ))
            }
            Err(ProviderError::Rejected(m)) => {
                self.finish(req, "failed", Some(reason::INVALID_PAYLOAD))
                    .await?;
                Err(SendError::permanent(422, code::INVALID_PAYLOAD, m))
            }
            Err(e) => {
                self.finish(req, "aborted", Some(&e.to_string())).await?;
                Err(match e {
                    ProviderError::Offline(m) => SendError::transient(503, code::DEVICE_OFFLINE, m),
                    ProviderError::RateLimited => {
                        SendError::transient(429, code::RATE_LIMITED, "rate limited")
                    }
                    other => SendError::transient(503, code::PROVIDER_ERROR, other.to_string()),
                })
            }
        }
    }

    async fn finish(
        &self,
        req: &SendRequest,
        state: &str,
        error: Option<&str>,
    ) -> Result<(), SendError> {
        let mut tx = self.pool.begin().await.map_err(SendError::internal)?;
        repo::host_sends::finish_host_send(&mut tx, req.tenant_id, req.message_id, state, error)
            .await?;
        tx.commit().await.map_err(SendError::internal)
    }

    /// `media:<id>` from PostgreSQL (the tenant's only) or an https URL through the guarded
    /// fetcher; both checked by content and cached for a while.
    async fn resolve_image(&self, tenant: Uuid, src: &str) -> Result<ResolvedImage, SendError> {
        let key = format!("{tenant}/{src}");
        if let Ok(cache) = self.images.lock() {
            if let Some((at, img)) = cache.get(&key) {
                if at.elapsed() < IMAGE_CACHE_TTL {
                    return Ok(img.clone());
                }
            }
        }
        let bad = |m: String| SendError::permanent(422, code::BAD_IMAGE, m);
        let (mime, bytes) = if let Some(id) = src.strip_prefix("media:") {
            let id: Uuid = id
                .parse()
                .map_err(|_| bad(format!("{src:?} is not a media id")))?;
            let (mime, bytes) = repo::media::get_media(&self.pool, tenant, id)
                .await
                .map_err(|e| match e {
                    RepoError::NotFound(_) => bad("image not found for this tenant".into()),
                    other => SendError::internal(other),
                })?;
            if shared::media::sniff(&bytes) != Some(mime.as_str()) {
                return Err(bad("stored image does not match its type".into()));
            }
            (mime, bytes)
        } else {
            let url = match ImageSource::parse(src) {
                Ok(ImageSource::Remote(url)) => url,
                Ok(ImageSource::Inline { .. }) => {
                    return Err(bad("inline images must be stored as media first".into()))
                }
                Err(e) => return Err(bad(e.to_string())),
            };
            match self.fetcher.fetch(&url).await {
                Ok((mime, bytes)) => (mime.to_string(), bytes),
                Err(shared::media::MediaError::Fetch(m)) => {
                    return Err(SendError::transient(
                        503,
                        code::PROVIDER_ERROR,
                        format!("image fetch: {m}"),
                    ))
                }
                Err(e) => return Err(bad(e.to_string())),
            }
        };
        let img = ResolvedImage {
            mime,
            bytes: Arc::new(bytes),
            key: src.to_string(),
        };
        if let Ok(mut cache) = self.images.lock() {
            if cache.len() >= IMAGE_CACHE_MAX {
                cache.clear();
            }
            cache.insert(key, (Instant::now(), img.clone()));
        }
        Ok(img)
    }

    pub async fn status(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<(DeviceStatus, Option<String>), SendError> {
        let device = self.device(tenant, id).await?;
        Ok(self.provider_for(&device)?.status(&device).await)
    }
}

fn permanent_code(reason: &str) -> &'static str {
    match reason {
        reason::NOT_ON_WHATSAPP => code::NOT_ON_WHATSAPP,
        reason::BAD_IMAGE => code::BAD_IMAGE,
        _ => code::INVALID_PAYLOAD,
    }
}

/// Writes provider events to PostgreSQL: statuses as they come, receipts in batches.
pub async fn run_event_writer(pool: PgPool, mut events: mpsc::UnboundedReceiver<ProviderEvent>) {
    let mut receipts: Vec<Receipt> = Vec::new();
    loop {
        let first = if receipts.is_empty() {
            events.recv().await
        } else {
            match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                Ok(ev) => ev,
                Err(_) => {
                    flush_receipts(&pool, &mut receipts).await;
                    continue;
                }
            }
        };
        let Some(ev) = first else {
            flush_receipts(&pool, &mut receipts).await;
            return;
        };
        let mut batch = vec![ev];
        while batch.len() < 5_000 {
            match events.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        for ev in batch {
            match ev {
                ProviderEvent::Status {
                    device,
                    status,
                    reason,
                } => {
                    if let Err(e) = write_status(&pool, &device, status, reason.as_deref()).await {
                        warn!(device_id = %device.id, error = %e, "could not record device status");
                    }
                }
                ProviderEvent::Receipt {
                    tenant_id,
                    message_id,
                    read,
                    at,
                } => receipts.push(Receipt {
                    tenant_id,
                    message_id,
                    read,
                    at,
                }),
            }
        }
        if receipts.len() >= 2_000 {
            flush_receipts(&pool, &mut receipts).await;
        }
    }
}

async fn write_status(
    pool: &PgPool,
    device: &DeviceRef,
    status: DeviceStatus,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    repo::devices::set_device_status(&mut tx, device.tenant_id, device.id, status, reason).await?;
    tx.commit().await?;
    Ok(())
}

async fn flush_receipts(pool: &PgPool, receipts: &mut Vec<Receipt>) {
    if receipts.is_empty() {
        return;
    }
    let res: anyhow::Result<()> = async {
        let mut tx = pool.begin().await?;
        repo::messages::apply_receipts(&mut tx, receipts).await?;
        tx.commit().await?;
        Ok(())
    }
    .await;
    match res {
        Ok(()) => receipts.clear(),
        Err(e) => {
            warn!(error = %e, pending = receipts.len(), "could not record receipts; will retry")
        }
    }
}
