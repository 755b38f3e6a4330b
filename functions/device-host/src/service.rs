//! The host's core: the device registry, the idempotent send path, image resolution, and the
//! writers that put provider events (status, receipts) into PostgreSQL.
//!
//! A send for a message id goes through the durable record in `host_sends`: the provider message
//! id is generated and recorded before the provider is called; a repeated request for a message
//! already sent answers "duplicate" and sends nothing; a request for an attempt that died with a
//! previous process asks the provider whether it went out before trying again with the same id.

use crate::inbox::{InboundStop, Inbox};
use crate::provider::{DeviceRef, Outbound, Provider, ProviderError, ProviderEvent, ResolvedImage};
use shared::domain::{reason, DeviceStatus, PhoneE164, ProviderKind};
use shared::host_api::{code, SendRequest, SendResponse};
use shared::media::{ImageFetcher, ImageSource};
use shared::repo::{self, host_sends::HostSendState, messages::Receipt, RepoError};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{error, info, warn};
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
    relaxed_pool: PgPool,
    pub host_id: String,
    providers: HashMap<ProviderKind, Arc<dyn Provider>>,
    devices: RwLock<HashMap<Uuid, DeviceRef>>,
    /// Message ids whose send is under way here, or whose outcome is still to be recorded.
    in_flight: Arc<Mutex<HashSet<i64>>>,
    /// Outcomes the database did not take yet, written again in the background.
    unrecorded: Arc<AtomicUsize>,
    fetcher: ImageFetcher,
    images: Mutex<HashMap<String, (Instant, ResolvedImage)>>,
    /// How long a device lease lasts without renewal (renewed every third of it).
    pub lease_ttl: Duration,
    /// At most this many devices on this host (acquisition stops there).
    pub max_devices: usize,
    /// Whether this host is back from an outage of the database (see [`Recovery`]).
    recovery: Mutex<Recovery>,
    /// How long an outcome write refused for another reason than the database being away is
    /// tried again ([`OUTCOME_RETRY_MAX`]).
    outcome_retry_max: Duration,
}

/// A host's lease rounds through an outage of the database. While it lasts no host can renew
/// a lease, so every lease runs out; whichever host's round came first afterwards used to take
/// every device it had room for, and devices hopped between live hosts (each a session closed
/// on one host and opened on another address, for every device of the others). A host whose
/// rounds failed therefore renews its own leases first and takes no lease another host let run
/// out, in its rounds or on demand, until a whole lease after its first round that succeeded:
/// by then every live host has renewed its own (each renews every third of a lease). Devices
/// nobody ever held it takes at once; those of a host that did not come back, after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    Steady,
    /// The latest lease round failed.
    Failing,
    /// Rounds succeed again; lapsed leases are left alone until then.
    Settling(Instant),
}

/// What one lease round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LeaseReport {
    pub kept: usize,
    pub released: usize,
    pub acquired: usize,
}

/// A validated request waiting to be sent.
struct Pending {
    index: usize,
    device: DeviceRef,
    provider: Arc<dyn Provider>,
    to: PhoneE164,
    provider_message_id: String,
}

/// How one send attempt ended at the provider.
enum Attempt {
    Sent {
        provider_message_id: String,
        at: chrono::DateTime<chrono::Utc>,
    },
    Refused(ProviderError),
    ImageError(SendError),
    /// Not attempted: an earlier message of the same device failed transiently.
    HeldBack,
}

impl Attempt {
    /// The send record's state and reason.
    fn record(&self) -> (&'static str, Option<String>) {
        match self {
            Self::Sent { .. } => ("sent", None),
            Self::Refused(ProviderError::NotOnWhatsapp) => {
                ("failed", Some(reason::NOT_ON_WHATSAPP.into()))
            }
            Self::Refused(ProviderError::Rejected(_)) => {
                ("failed", Some(reason::INVALID_PAYLOAD.into()))
            }
            Self::Refused(ProviderError::Failed { reason, .. }) => {
                ("failed", Some(reason.to_string()))
            }
            Self::Refused(e) => ("aborted", Some(e.to_string())),
            Self::ImageError(e) if e.retryable => ("aborted", Some(e.message.clone())),
            Self::ImageError(_) => ("failed", Some(reason::BAD_IMAGE.into())),
            Self::HeldBack => ("aborted", Some(code::HELD_BACK.into())),
        }
    }

    fn into_result(self) -> Result<SendResponse, SendError> {
        match self {
            Self::Sent {
                provider_message_id,
                at,
            } => Ok(SendResponse {
                provider_message_id,
                duplicate: false,
                accepted_at: at,
            }),
            Self::Refused(ProviderError::NotOnWhatsapp) => Err(SendError::permanent(
                422,
                code::NOT_ON_WHATSAPP,
                "the number is not on WhatsApp",
            )),
            Self::Refused(ProviderError::Rejected(m)) => {
                Err(SendError::permanent(422, code::INVALID_PAYLOAD, m))
            }
            Self::Refused(ProviderError::Failed { reason, detail }) => {
                Err(SendError::permanent(422, permanent_code(reason), detail))
            }
            Self::Refused(ProviderError::Offline(m)) => {
                Err(SendError::transient(503, code::DEVICE_OFFLINE, m))
            }
            Self::Refused(ProviderError::RateLimited) => Err(SendError::transient(
                429,
                code::RATE_LIMITED,
                "rate limited",
            )),
            Self::Refused(other) => Err(SendError::transient(
                503,
                code::PROVIDER_ERROR,
                other.to_string(),
            )),
            Self::ImageError(e) => Err(e),
            Self::HeldBack => Err(SendError::transient(
                503,
                code::HELD_BACK,
                "not attempted: an earlier message of this device failed transiently",
            )),
        }
    }
}

/// Removes a message id from the in-flight set however the send ends (or, when its outcome is
/// written again in the background, once that is done).
struct InFlight(Arc<Mutex<HashSet<i64>>>, i64);
impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            s.remove(&self.1);
        }
    }
}

/// (message id, tenant, `sent` | `failed` | `aborted`, reason or detail) of one attempt.
type Outcome = (i64, Uuid, &'static str, Option<String>);

/// A refused outcome write is tried again after this, then after twice as long each time, up
/// to [`OUTCOME_RETRY_EVERY`] apart: while the database is away, until it is back; refused
/// for another reason, for [`OUTCOME_RETRY_MAX`].
const OUTCOME_RETRY_FIRST: Duration = Duration::from_millis(200);
const OUTCOME_RETRY_EVERY: Duration = Duration::from_secs(5);
/// As long as the rescuer takes an `attempting` record for a live attempt
/// ([`repo::messages::LIVE_ATTEMPT_MAX_S`]); it reconciles the row after that anyway.
pub const OUTCOME_RETRY_MAX: Duration =
    Duration::from_secs(repo::messages::LIVE_ATTEMPT_MAX_S as u64);

/// One statement, run again when PostgreSQL aborts it as a deadlock victim.
async fn write_outcomes(
    pool: &PgPool,
    owner: Option<&str>,
    finished: &[Outcome],
) -> Result<(), RepoError> {
    if finished.is_empty() {
        return Ok(());
    }
    let rows: Vec<repo::host_sends::FinishedAttempt<'_>> = finished
        .iter()
        .map(|(id, t, s, e)| (*id, *t, *s, e.as_deref()))
        .collect();
    repo::retry_aborted(repo::ABORTED_ATTEMPTS, "record outcomes", || async {
        let mut conn = pool.acquire().await?;
        repo::host_sends::finish_host_sends(&mut conn, owner, &rows).await
    })
    .await
}

const IMAGE_CACHE_TTL: Duration = Duration::from_secs(600);
const IMAGE_CACHE_MAX: usize = 64;

impl Host {
    /// `pool` commits durably (the attempt records); `relaxed_pool` may not wait for the WAL
    /// flush (outcomes, statuses, receipts: each recovered elsewhere if lost). Tests may pass
    /// the same pool twice.
    pub fn new(
        pool: PgPool,
        relaxed_pool: PgPool,
        host_id: String,
        providers: Vec<Arc<dyn Provider>>,
        fetcher: ImageFetcher,
    ) -> Self {
        Self {
            pool,
            relaxed_pool,
            host_id,
            providers: providers.into_iter().map(|p| (p.kind(), p)).collect(),
            devices: RwLock::new(HashMap::new()),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
            unrecorded: Arc::new(AtomicUsize::new(0)),
            fetcher,
            images: Mutex::new(HashMap::new()),
            lease_ttl: Duration::from_secs(30),
            max_devices: usize::MAX,
            recovery: Mutex::new(Recovery::Steady),
            outcome_retry_max: OUTCOME_RETRY_MAX,
        }
    }

    /// Sets how long a refused outcome write is tried again when the database is not away
    /// (before the host is shared).
    pub fn with_outcome_retry_max(mut self, max: Duration) -> Self {
        self.outcome_retry_max = max;
        self
    }

    /// Sets the lease length and the device limit (before the host is shared).
    pub fn with_leases(mut self, ttl: Duration, max_devices: usize) -> Self {
        self.lease_ttl = ttl;
        self.max_devices = max_devices;
        self
    }

    pub fn provider(&self, kind: ProviderKind) -> Option<&Arc<dyn Provider>> {
        self.providers.get(&kind)
    }

    pub fn device_count(&self) -> usize {
        self.devices.read().map(|d| d.len()).unwrap_or(0)
    }

    /// Takes the leases of every device it can (no owner, or an owner that stopped renewing)
    /// and restores their sessions.
    pub async fn restore_sessions(&self) -> anyhow::Result<usize> {
        let r = self.lease_round().await?;
        info!(sessions = r.kept + r.acquired, "sessions restored");
        Ok(r.kept + r.acquired)
    }

    /// One round of device leases: renews this host's, closes the sessions of devices another
    /// host took over (this one was too slow to renew), and takes unowned or expired devices up
    /// to the limit, restoring their sessions.
    pub async fn lease_round(&self) -> anyhow::Result<LeaseReport> {
        let round = self.lease_round_once().await;
        if round.is_err() {
            self.set_recovery(Recovery::Failing);
        }
        round
    }

    fn set_recovery(&self, to: Recovery) {
        if let Ok(mut r) = self.recovery.lock() {
            *r = to;
        }
    }

    /// Whether this host may take a lease another host let run out now (see [`Recovery`]).
    fn lapsed_leases(&self) -> repo::hosts::Lapsed {
        let settled = match self.recovery.lock().map(|r| *r) {
            Ok(Recovery::Steady) => true,
            Ok(Recovery::Settling(until)) => Instant::now() >= until,
            Ok(Recovery::Failing) | Err(_) => false,
        };
        if settled {
            repo::hosts::Lapsed::Take
        } else {
            repo::hosts::Lapsed::Leave
        }
    }

    async fn lease_round_once(&self) -> anyhow::Result<LeaseReport> {
        let ttl = self.lease_ttl.as_secs_f64();
        let kept: HashSet<Uuid> = repo::hosts::renew_leases(&self.pool, &self.host_id, ttl)
            .await?
            .into_iter()
            .collect();
        // This host's own leases are renewed: an outage of the database, if there was one, is
        // over for it.
        match self.recovery.lock().map(|r| *r) {
            Ok(Recovery::Failing) => {
                self.set_recovery(Recovery::Settling(Instant::now() + self.lease_ttl));
                info!(
                    kept = kept.len(),
                    "lease round succeeded again: this host's leases renewed; lapsed leases of \
                     other hosts are left for one lease"
                );
            }
            Ok(Recovery::Settling(until)) if Instant::now() >= until => {
                self.set_recovery(Recovery::Steady)
            }
            _ => {}
        }
        let lost: Vec<DeviceRef> = self
            .devices
            .read()
            .map(|m| {
                m.values()
                    .filter(|d| !kept.contains(&d.id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for d in &lost {
            if let Some(p) = self.providers.get(&d.provider) {
                p.release(d).await;
            }
            if let Ok(mut m) = self.devices.write() {
                m.remove(&d.id);
            }
            info!(device_id = %d.id, "device lease lost: session closed here");
        }
        let room = self.max_devices.saturating_sub(kept.len());
        let mut acquired = 0;
        if room > 0 {
            let kinds: Vec<&str> = self.providers.keys().map(|k| k.as_str()).collect();
            let limit = i64::try_from(room).unwrap_or(i64::MAX);
            for (id, tenant_id, provider) in repo::hosts::acquire_devices(
                &self.pool,
                &self.host_id,
                &kinds,
                ttl,
                limit,
                self.lapsed_leases(),
            )
            .await?
            {
                let Ok(provider) = provider.parse::<ProviderKind>() else {
                    continue;
                };
                self.connect(&DeviceRef {
                    id,
                    tenant_id,
                    provider,
                })
                .await;
                acquired += 1;
            }
        }
        Ok(LeaseReport {
            kept: kept.len(),
            released: lost.len(),
            acquired,
        })
    }

    /// Renews and takes leases every third of the lease, until the task is dropped.
    pub async fn run_leases(self: Arc<Self>, url: String) {
        let every = self.lease_ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = repo::hosts::register_host(
                &self.pool,
                &self.host_id,
                &url,
                self.lease_ttl.as_secs_f64(),
            )
            .await
            {
                warn!(error = %e, "could not refresh the host record");
            }
            match self.lease_round().await {
                Ok(r) if r.released + r.acquired > 0 => {
                    info!(
                        kept = r.kept,
                        released = r.released,
                        acquired = r.acquired,
                        "device leases"
                    )
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "device lease round failed"),
            }
        }
    }

    /// Gives every device back (a graceful stop), closing their sessions.
    pub async fn release_all(&self) -> anyhow::Result<u64> {
        let devices: Vec<DeviceRef> = self
            .devices
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for d in &devices {
            if let Some(p) = self.providers.get(&d.provider) {
                p.release(d).await;
            }
        }
        Ok(repo::hosts::release_all(&self.pool, &self.host_id).await?)
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
        let owned = repo::hosts::acquire_device(
            &self.pool,
            &self.host_id,
            tenant,
            id,
            self.lease_ttl.as_secs_f64(),
            self.lapsed_leases(),
        )
        .await?;
        if owned.is_none() {
            let owner = repo::hosts::device_owner(&self.pool, tenant, id)
                .await?
                .map(|(h, _)| h)
                .unwrap_or_else(|| "another host".into());
            return Err(SendError::transient(
                503,
                code::WRONG_HOST,
                format!("the device is served by {owner}"),
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
        self.send_batch(std::slice::from_ref(req))
            .await
            .pop()
            .unwrap_or_else(|| Err(SendError::internal("empty batch result")))
    }

    /// Sends a batch, each message at most once per message id; one result per request, in
    /// order. The attempt records of the whole batch are written (durably) in one statement
    /// before any provider call, the outcomes in one statement after. Messages of one device are
    /// sent in order; after a transient error the rest of that device's messages are held back.
    pub async fn send_batch(&self, reqs: &[SendRequest]) -> Vec<Result<SendResponse, SendError>> {
        let mut results: Vec<Option<Result<SendResponse, SendError>>> = vec![None; reqs.len()];
        let mut work: Vec<Pending> = Vec::new();
        let mut seen = HashSet::new();
        for (index, req) in reqs.iter().enumerate() {
            match self.prepare(index, req, &mut seen).await {
                Ok(p) => work.push(p),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let guards = self.claim_in_flight(reqs, &mut work, &mut results);
        if let Err(e) = self.begin(reqs, &mut work, &mut results).await {
            for p in work.drain(..) {
                results[p.index] = Some(Err(e.clone()));
            }
        }

        // Send: devices concurrently, each device's messages in order.
        let mut by_device: Vec<Vec<Pending>> = Vec::new();
        let mut slot: HashMap<Uuid, usize> = HashMap::new();
        for p in work {
            let k = *slot.entry(p.device.id).or_insert_with(|| {
                by_device.push(Vec::new());
                by_device.len() - 1
            });
            by_device[k].push(p);
        }
        let sent =
            futures::future::join_all(by_device.into_iter().map(|g| self.send_device(reqs, g)))
                .await;
        let outcomes: Vec<(usize, Attempt)> = sent.into_iter().flatten().collect();

        let finished: Vec<Outcome> = outcomes
            .iter()
            .map(|(i, a)| {
                let (state, error) = a.record();
                (reqs[*i].message_id, reqs[*i].tenant_id, state, error)
            })
            .collect();
        if let Err(e) = self.finish(Some(&self.host_id), &finished).await {
            // The provider already answered: report what it said, and write the outcomes
            // again until the database takes them, their messages in flight here meanwhile.
            warn!(error = ?e, outcomes = finished.len(),
                  "could not record send outcomes; writing them again in the background");
            let ids: HashSet<i64> = finished.iter().map(|f| f.0).collect();
            let held = guards.into_iter().filter(|g| ids.contains(&g.1)).collect();
            self.finish_later(finished, held);
        }
        for (i, a) in outcomes {
            results[i] = Some(a.into_result());
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(SendError::internal("no result"))))
            .collect()
    }

    /// Validates one request and finds its device and provider.
    async fn prepare(
        &self,
        index: usize,
        req: &SendRequest,
        seen: &mut HashSet<i64>,
    ) -> Result<Pending, SendError> {
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
        if let Some(t) = &req.template {
            let fits = t.params.len() <= 10
                && t.params
                    .iter()
                    .all(|p| !p.trim().is_empty() && p.len() <= 1024)
                && shared::render::WaTemplate::new(&t.name, &t.language, Vec::new()).is_ok();
            if !fits {
                return Err(SendError::permanent(
                    422,
                    code::INVALID_PAYLOAD,
                    "template: a valid name and language and at most 10 non-empty parameters of \
                     up to 1024 bytes",
                ));
            }
        }
        if !seen.insert(req.message_id) {
            return Err(SendError::permanent(
                422,
                code::INVALID_PAYLOAD,
                "message_id appears twice in the batch",
            ));
        }
        let device = self.device(req.tenant_id, req.device_id).await?;
        let provider = self.provider_for(&device)?.clone();
        Ok(Pending {
            index,
            device,
            provider,
            to,
            provider_message_id: String::new(),
        })
    }

    /// Marks the batch's messages in flight here; one already in flight answers 409.
    fn claim_in_flight(
        &self,
        reqs: &[SendRequest],
        work: &mut Vec<Pending>,
        results: &mut [Option<Result<SendResponse, SendError>>],
    ) -> Vec<InFlight> {
        let mut guards = Vec::new();
        let mut kept = Vec::new();
        for p in work.drain(..) {
            let id = reqs[p.index].message_id;
            let inserted = self.in_flight.lock().map(|mut s| s.insert(id));
            match inserted {
                Ok(true) => {
                    guards.push(InFlight(self.in_flight.clone(), id));
                    kept.push(p);
                }
                Ok(false) => {
                    results[p.index] = Some(Err(SendError::transient(
                        409,
                        code::IN_PROGRESS,
                        "this message is being sent",
                    )))
                }
                Err(_) => {
                    results[p.index] = Some(Err(SendError::internal("in-flight lock poisoned")))
                }
            }
        }
        *work = kept;
        guards
    }

    /// Records the attempts (durably, before any provider call) and settles the messages that
    /// already have a record: sent (duplicate), failed, or an attempt that died with a previous
    /// process (resolved through the provider). Leaves in `work` only what must be sent now.
    async fn begin(
        &self,
        reqs: &[SendRequest],
        work: &mut Vec<Pending>,
        results: &mut [Option<Result<SendResponse, SendError>>],
    ) -> Result<(), SendError> {
        if work.is_empty() {
            return Ok(());
        }
        let attempts: Vec<repo::host_sends::NewAttempt> = work
            .iter()
            .map(|p| {
                let r = &reqs[p.index];
                (
                    r.message_id,
                    r.tenant_id,
                    p.device.id,
                    p.provider.new_message_id(),
                )
            })
            .collect();
        // One statement in autocommit on the durable pool: committed, WAL flushed, before any
        // provider call (one round trip instead of begin, insert, commit). Run again when
        // PostgreSQL aborts it as a deadlock victim (it meets a rescuer's fences on the
        // records' key): an aborted statement recorded nothing, and giving up would send the
        // whole batch back to its worker as a transient failure.
        let mut states = repo::retry_aborted(repo::ABORTED_ATTEMPTS, "record attempts", || async {
            let mut conn = self.pool.acquire().await?;
            repo::host_sends::begin_host_sends(&mut conn, &self.host_id, &attempts).await
        })
        .await?;
        // An attempt starts only on a device whose lease this host holds: of the ids with
        // neither an attempt started nor one recorded, those of a device it no longer holds are
        // another host's now (a rare path: one more read).
        let unstarted: Vec<Uuid> = work
            .iter()
            .filter(|p| !states.contains_key(&reqs[p.index].message_id))
            .map(|p| p.device.id)
            .collect();
        let held = if unstarted.is_empty() {
            HashSet::new()
        } else {
            repo::hosts::held_devices(&self.pool, &self.host_id, &unstarted).await?
        };
        let mut kept = Vec::new();
        for mut p in work.drain(..) {
            let r = &reqs[p.index];
            match states.remove(&r.message_id) {
                None if !held.contains(&p.device.id) => results[p.index] = Some(Err(lease_lost())),
                None => results[p.index] = Some(Err(not_in_flight())),
                Some(HostSendState::Owned {
                    provider_message_id,
                }) => {
                    p.provider_message_id = provider_message_id;
                    kept.push(p);
                }
                Some(HostSendState::Existing {
                    provider_message_id,
                    state,
                    error,
                    updated_at,
                    live,
                }) => match state.as_str() {
                    "sent" => {
                        results[p.index] = Some(Ok(SendResponse {
                            provider_message_id,
                            duplicate: true,
                            accepted_at: updated_at,
                        }))
                    }
                    "failed" => {
                        let reason = error.unwrap_or_else(|| "provider_refused".into());
                        results[p.index] = Some(Err(SendError::permanent(
                            422,
                            permanent_code(&reason),
                            reason,
                        )));
                    }
                    // An unfinished attempt of a row no longer `sending`: not this request's
                    // to settle (the rescuer has the row).
                    _ if !live => results[p.index] = Some(Err(not_in_flight())),
                    _ => {
                        // An attempt that died with a previous process (it is not in flight here).
                        let known = p.provider.was_sent(&p.device, &provider_message_id).await;
                        if known.is_none() {
                            // The provider cannot tell: a resend could be a second send.
                            self.finish(
                                None,
                                &[(
                                    r.message_id,
                                    r.tenant_id,
                                    "failed",
                                    Some(reason::OUTCOME_UNKNOWN.into()),
                                )],
                            )
                            .await?;
                            results[p.index] = Some(Err(SendError::permanent(
                                422,
                                code::OUTCOME_UNKNOWN,
                                "the host died during this send and the provider cannot say \
                                 whether it went out; not resent (retry it deliberately)",
                            )));
                        } else if known == Some(true) {
                            self.finish(None, &[(r.message_id, r.tenant_id, "sent", None)])
                                .await?;
                            results[p.index] = Some(Ok(SendResponse {
                                provider_message_id,
                                duplicate: true,
                                accepted_at: chrono::Utc::now(),
                            }));
                        } else {
                            let mut tx = self.pool.begin().await.map_err(SendError::internal)?;
                            let retaken = repo::host_sends::retake_host_send(
                                &mut tx,
                                r.tenant_id,
                                r.message_id,
                                &self.host_id,
                            )
                            .await?;
                            tx.commit().await.map_err(SendError::internal)?;
                            if retaken {
                                p.provider_message_id = provider_message_id;
                                kept.push(p);
                            } else {
                                results[p.index] = Some(Err(not_in_flight()));
                            }
                        }
                    }
                },
            }
        }
        *work = kept;
        Ok(())
    }

    /// Sends one device's messages in order; after a transient error the rest are held back.
    async fn send_device(
        &self,
        reqs: &[SendRequest],
        group: Vec<Pending>,
    ) -> Vec<(usize, Attempt)> {
        let mut out = Vec::with_capacity(group.len());
        let mut blocked = false;
        for p in group {
            let req = &reqs[p.index];
            if blocked {
                out.push((p.index, Attempt::HeldBack));
                continue;
            }
            let image = match &req.image {
                None => None,
                Some(src) => match self.resolve_image(req.tenant_id, src).await {
                    Ok(img) => Some(img),
                    Err(e) => {
                        out.push((p.index, Attempt::ImageError(e)));
                        continue;
                    }
                },
            };
            let outbound = Outbound {
                message_id: req.message_id,
                tenant_id: req.tenant_id,
                provider_message_id: p.provider_message_id.clone(),
                to: p.to.clone(),
                text: req.text.clone(),
                image,
                template: req.template.clone(),
            };
            let result = match self.number_known_absent(&p).await {
                Ok(true) => Err(ProviderError::NotOnWhatsapp),
                Ok(false) => p.provider.send(&p.device, &outbound).await,
                Err(e) => Err(e),
            };
            let attempt = match result {
                Ok(()) => Attempt::Sent {
                    provider_message_id: p.provider_message_id,
                    at: chrono::Utc::now(),
                },
                Err(e) => {
                    if !matches!(e, ProviderError::NotOnWhatsapp | ProviderError::Rejected(_)) {
                        blocked = true;
                    }
                    Attempt::Refused(e)
                }
            };
            out.push((p.index, attempt));
        }
        out
    }

    /// For providers that check numbers: the lead's cached answer, or a check now (cached on the
    /// lead, for every later message to it). True when the number is known not to be on WhatsApp.
    async fn number_known_absent(&self, p: &Pending) -> Result<bool, ProviderError> {
        if !p.provider.checks_numbers() {
            return Ok(false);
        }
        let db = |e: RepoError| ProviderError::Transient(format!("lead lookup failed: {e}"));
        let cached =
            repo::leads::cached_on_whatsapp(&self.pool, p.device.tenant_id, p.device.id, &p.to)
                .await
                .map_err(db)?;
        let on = match cached {
            Some(on) => on,
            None => {
                let on = p.provider.check_number(&p.device, &p.to).await?;
                repo::leads::cache_on_whatsapp(
                    &self.pool,
                    p.device.tenant_id,
                    p.device.id,
                    &p.to,
                    on,
                )
                .await
                .map_err(db)?;
                on
            }
        };
        Ok(!on)
    }

    /// Records outcomes in one statement on the relaxed pool: a lost
    /// `sent` is found again through the provider's was_sent, a lost `failed`/`aborted` only
    /// means one more attempt. Run again when PostgreSQL aborts it as a deadlock victim: a
    /// record left `attempting` says a send may be under way, so the worker's retry or
    /// `failed` for its claim leaves the row `sending`, and the rescuer keeps renewing it
    /// (`LIVE_ATTEMPT_MAX_S`) while this host holds the device. `owner`: see
    /// [`repo::host_sends::finish_host_sends`].
    async fn finish(&self, owner: Option<&str>, finished: &[Outcome]) -> Result<(), SendError> {
        Ok(write_outcomes(&self.relaxed_pool, owner, finished).await?)
    }

    /// Writes this host's outcomes that the database did not take (unreachable, failing over)
    /// again in the background, every few seconds, until it takes them: without end while the
    /// database is away (an outage longer than [`OUTCOME_RETRY_MAX`] used to leave a message
    /// sent through the Cloud API `failed / outcome_unknown`), for at most that long when it
    /// refuses them for another reason. Their messages stay in flight here meanwhile (`guards`): a
    /// repeated request is answered `in_progress` instead of being settled through the
    /// provider, which may not be able to tell (the Cloud API cannot) and would then fail a
    /// message that went out as `outcome_unknown`. Left `attempting`, the records keep the
    /// rows `sending` (the rescuer renews a live attempt's row) and, once the database is back,
    /// the rescuer finds them `sent` instead of taking them for hung after ten minutes.
    fn finish_later(&self, finished: Vec<Outcome>, guards: Vec<InFlight>) {
        let pool = self.relaxed_pool.clone();
        let host_id = self.host_id.clone();
        let unrecorded = self.unrecorded.clone();
        let give_up_after = self.outcome_retry_max;
        unrecorded.fetch_add(finished.len(), Ordering::Relaxed);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut wait = OUTCOME_RETRY_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                match write_outcomes(&pool, Some(&host_id), &finished).await {
                    Ok(()) => {
                        info!(
                            outcomes = finished.len(),
                            after_s = started.elapsed().as_secs_f64(),
                            "send outcomes recorded"
                        );
                        break;
                    }
                    Err(e) if started.elapsed() >= give_up_after && !repo_away(&e) => {
                        error!(error = %e, outcomes = finished.len(),
                               "gave up recording send outcomes: their records stay \
                                `attempting`, resolved through the provider on a repeat request");
                        break;
                    }
                    Err(_) => wait = (wait * 2).min(OUTCOME_RETRY_EVERY),
                }
            }
            unrecorded.fetch_sub(finished.len(), Ordering::Relaxed);
            drop(guards);
        });
    }

    /// How many send outcomes are waiting to be written again (see [`Host::finish_later`]).
    pub fn unrecorded_outcomes(&self) -> usize {
        self.unrecorded.load(Ordering::Relaxed)
    }

    /// Waits up to `within` for the outcomes being written again to land (a host stopping
    /// hands its devices over after this). Returns how many are still unwritten.
    pub async fn outcomes_recorded(&self, within: Duration) -> usize {
        let until = Instant::now() + within;
        loop {
            let left = self.unrecorded_outcomes();
            if left == 0 || Instant::now() >= until {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
            link: src.starts_with("https://").then(|| src.to_string()),
        };
        if let Ok(mut cache) = self.images.lock() {
            if cache.len() >= IMAGE_CACHE_MAX {
                cache.clear();
            }
            cache.insert(key, (Instant::now(), img.clone()));
        }
        Ok(img)
    }

    /// Connects the tenant's device again (new credentials, or a person resolved what stopped it).
    /// A person connects the device again (`wabcast device connect`, `device cloud-api`), having
    /// dealt with what stopped it: its restriction, if any, is lifted first (it outlives the
    /// session otherwise: `repo::devices::set_device_status_until`), then the session opens.
    /// A restriction the session still meets is recorded again by the session.
    pub async fn reconnect(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<(DeviceStatus, Option<String>), SendError> {
        let device = self.device(tenant, id).await?;
        let provider = self.provider_for(&device)?.clone();
        let mut tx = self.pool.begin().await.map_err(RepoError::from)?;
        if repo::devices::lift_restriction(&mut tx, tenant, id).await? {
            info!(device_id = %id, "restriction lifted by a person");
        }
        tx.commit().await.map_err(RepoError::from)?;
        provider.connect(&device).await;
        Ok(provider.status(&device).await)
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

/// This host's lease on the device ran out (another host may hold it now): nothing was sent,
/// and the worker's next claim routes the message to the device's owner.
fn lease_lost() -> SendError {
    SendError::transient(
        503,
        code::WRONG_HOST,
        "this host no longer holds the device's lease; nothing was sent",
    )
}

/// The answer for a message this host may not send: its row is not `sending` for the request's
/// tenant and device, or the rescuer withdrew the claim the row is in (see
/// [`repo::host_sends::begin_host_sends`]).
fn not_in_flight() -> SendError {
    SendError::permanent(
        409,
        code::NOT_IN_FLIGHT,
        "no message with this id is being sent for this tenant and device; nothing was sent",
    )
}

fn permanent_code(reason: &str) -> &'static str {
    match reason {
        reason::NOT_ON_WHATSAPP => code::NOT_ON_WHATSAPP,
        reason::BAD_IMAGE => code::BAD_IMAGE,
        reason::TEMPLATE_REQUIRED => code::TEMPLATE_REQUIRED,
        reason::PROVIDER_REJECTED => code::PROVIDER_REJECTED,
        reason::OUTCOME_UNKNOWN => code::OUTCOME_UNKNOWN,
        _ => code::INVALID_PAYLOAD,
    }
}

/// What the event writer writes with.
pub struct EventWriter {
    /// Statuses, receipts, acks and nacks, linked numbers: may commit without waiting for the
    /// WAL flush (`Durability::Relaxed`).
    pub pool: PgPool,
    /// Inbound text that may be an opt-out.
    pub opt_outs: OptOuts,
    /// To unlink a session whose account another device of the tenant already is.
    pub providers: Vec<Arc<dyn Provider>>,
    /// This host: a device's status is recorded only while its lease names this host.
    pub host_id: String,
}

/// The host's handling of a contact's text, whichever provider it came through: an opt-out
/// keyword is kept in the inbox (synced to disk), then written to PostgreSQL in the background
/// until it is (see [`record_opt_out`]). The web provider calls [`OptOuts::keep`] before
/// WhatsApp is told the message arrived, so a STOP is acknowledged only once it is on disk.
#[derive(Clone)]
pub struct OptOuts {
    /// Committed durably, because the inbox forgets a STOP once it is written.
    pub pool: PgPool,
    /// The opt-out keywords, as [`is_opt_out`] reads them.
    pub keywords: Vec<String>,
    /// Every inbound STOP is kept here until PostgreSQL has it.
    pub inbox: Arc<Inbox>,
}

impl OptOuts {
    /// Keeps `text` from `from` if it is an opt-out keyword: `Ok(true)` once it is in the inbox,
    /// `Ok(false)` for any other text, which is a reply ([`OptOuts::replied`]). Either way of a STOP, its write to PostgreSQL is started
    /// in the background; `Err` says that the inbox could not hold it, so that a caller who can
    /// have the message delivered again (the web provider, by not acknowledging it) does.
    pub async fn keep(
        &self,
        device: &DeviceRef,
        from: &PhoneE164,
        text: &str,
    ) -> anyhow::Result<bool> {
        if !is_opt_out(&self.keywords, text) {
            self.replied(device, from);
            return Ok(false);
        }
        let stop = InboundStop {
            id: Uuid::new_v4(),
            tenant_id: device.tenant_id,
            device_id: device.id,
            from: from.as_str().to_string(),
            received_at: chrono::Utc::now(),
        };
        let kept = self.inbox.record(&stop).await;
        if let Err(e) = &kept {
            // Not lost yet: it is written below, and tried again while the host runs.
            tracing::error!(device_id = %device.id, phone = %from, error = %e, path = %self.inbox.path().display(),
                "could not keep an inbound opt-out in the inbox; it is lost if the host stops before it is recorded");
        }
        let (pool, inbox, from) = (self.pool.clone(), self.inbox.clone(), from.clone());
        tokio::spawn(async move {
            if !try_opt_out(&pool, &inbox, &stop, &from).await {
                record_opt_out(pool, inbox, stop, Duration::from_secs(1)).await;
            }
        });
        kept.map(|()| true)
    }

    /// `from` wrote something that is not an opt-out: a reply, which ends their enrollments in
    /// the tenant's sequences that stop on a reply (`repo::sequences::end_replied_enrollments`),
    /// written in the background and tried a few times. Unlike a STOP it is not kept in the
    /// inbox: a reply lost to a long database outage costs the lead the next step of a drip
    /// they would have had without the setting, never a message against an opt-out.
    pub fn replied(&self, device: &DeviceRef, from: &PhoneE164) {
        let (pool, tenant, device_id, from) =
            (self.pool.clone(), device.tenant_id, device.id, from.clone());
        tokio::spawn(async move {
            let mut pause = Duration::from_secs(1);
            for attempt in 1..=REPLY_ATTEMPTS {
                match repo::sequences::end_replied_enrollments(&pool, tenant, &from).await {
                    Ok(ended) => {
                        if ended.enrollments > 0 {
                            tracing::info!(%device_id, enrollments = ended.enrollments,
                                messages = ended.messages, "a reply ended enrollments");
                        }
                        return;
                    }
                    Err(e) if attempt < REPLY_ATTEMPTS => {
                        tracing::warn!(%device_id, error = %e, attempt,
                            "could not end a replying lead's enrollments; trying again");
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                    }
                    Err(e) => tracing::error!(%device_id, error = %e,
                        "could not end a replying lead's enrollments; its sequences go on"),
                }
            }
        });
    }
}

/// How many times [`OptOuts::replied`] writes a reply before it gives up (1 + 2 + 4 + 8 s apart).
const REPLY_ATTEMPTS: u32 = 5;

/// Writes provider events to PostgreSQL: statuses as they come, receipts in batches, acks and
/// nacks of accepted messages, opt-out keywords of inbound text (through the inbox, see
/// [`record_opt_out`]), the number a session is linked to (unlinking a session whose account
/// another device of the tenant already is).
pub async fn run_event_writer(w: EventWriter, mut events: mpsc::UnboundedReceiver<ProviderEvent>) {
    let mut receipts: Vec<Receipt> = Vec::new();
    let mut backlog = Backlog::default();
    loop {
        let first = if receipts.is_empty() && backlog.is_empty() {
            events.recv().await
        } else {
            match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                Ok(ev) => ev,
                Err(_) => {
                    flush_receipts(&w.pool, &mut receipts).await;
                    backlog.retry(&w, &mut receipts, false).await;
                    continue;
                }
            }
        };
        let Some(ev) = first else {
            backlog.retry(&w, &mut receipts, true).await;
            flush_receipts(&w.pool, &mut receipts).await;
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
                ProviderEvent::Inbound { device, from, text } => {
                    // A failure to keep it is logged by `keep`, and its write goes ahead.
                    let _ = w.opt_outs.keep(&device, &from, &text).await;
                }
                other => backlog.write(&w, other, &mut receipts).await,
            }
        }
        backlog.retry(&w, &mut receipts, false).await;
        if receipts.len() >= 2_000 {
            flush_receipts(&w.pool, &mut receipts).await;
        }
    }
}

/// At most this many events wait for the database (a device's statuses count once); past it
/// the oldest is dropped, logged.
const BACKLOG_MAX: usize = 100_000;
/// The database is tried again after this, then after twice as long each time, up to
/// [`BACKLOG_RETRY_EVERY`] apart.
const BACKLOG_RETRY_FIRST: Duration = Duration::from_millis(200);
const BACKLOG_RETRY_EVERY: Duration = Duration::from_secs(5);

/// What the event writer could not write because the database was away (unreachable, failing
/// over, read-only for a moment; see [`repo::is_unavailable`]): a device's status (the latest
/// only), acks and nacks, receipts by provider id, linked numbers. Dropped, as they were, a
/// device that went offline or was logged out during a failover stayed `online` (its messages
/// were claimed and failed), and a message WhatsApp refused stayed `sent`. Kept in order and
/// written again every few seconds; while the database is away a new event waits behind the
/// others instead of being tried (each try may wait for the pool's timeout). An error of the
/// write itself (the database answered) is logged and the event dropped, as before: it would
/// fail the same way again.
///
/// Written again in the order they came, statuses among the other events: a device's latest
/// status goes where it came, not after everything else. (After the others, a status kept
/// before a write that sets a status itself, such as a session linked to another device's
/// number logged out in place, overwrote that write with the older status.)
#[derive(Default)]
struct Backlog {
    /// The latest status of each device, by device id, with its place in the order.
    statuses: HashMap<Uuid, (u64, ProviderEvent)>,
    /// The other events, in order, each with its place.
    events: std::collections::VecDeque<(u64, ProviderEvent)>,
    /// The next event's place.
    next: u64,
    /// When to try the database again; `None` while it is taken to be there.
    retry_at: Option<Instant>,
    pause: Duration,
    /// Since when it has been away.
    since: Option<Instant>,
    dropped: u64,
}

impl Backlog {
    fn is_empty(&self) -> bool {
        self.statuses.is_empty() && self.events.is_empty()
    }

    /// Writes an event, or keeps it when the database is away (or found away now).
    async fn write(&mut self, w: &EventWriter, ev: ProviderEvent, receipts: &mut Vec<Receipt>) {
        if let ProviderEvent::Status { device, .. } = &ev {
            // A newer status of the device supersedes one still waiting.
            self.statuses.remove(&device.id);
        }
        if self.retry_at.is_some() {
            self.keep(ev);
            return;
        }
        if let Err(e) = write_event(w, &ev, receipts).await {
            if database_away(&e) {
                warn!(error = %e, "the database is away: provider events kept, written again once it is back");
                self.keep(ev);
                self.since = Some(Instant::now());
                self.pause = BACKLOG_RETRY_FIRST;
                self.retry_at = Some(Instant::now() + self.pause);
            } else {
                warn!(error = %e, event = ?ev, "could not record a provider event");
            }
        }
    }

    fn keep(&mut self, ev: ProviderEvent) {
        let place = self.next;
        self.next += 1;
        self.keep_at(place, ev);
    }

    /// Keeps an event at its place in the order (an event that was kept before keeps its own).
    fn keep_at(&mut self, place: u64, ev: ProviderEvent) {
        match ev {
            ProviderEvent::Status { ref device, .. } => {
                self.statuses.insert(device.id, (place, ev));
            }
            other => {
                self.events.push_back((place, other));
                if self.events.len() > BACKLOG_MAX {
                    if let Some((_, old)) = self.events.pop_front() {
                        self.dropped += 1;
                        if self.dropped == 1 || self.dropped.is_multiple_of(1_000) {
                            error!(dropped = self.dropped, oldest = ?old,
                                   "the database has been away too long: provider events dropped");
                        }
                    }
                }
            }
        }
    }

    /// Writes what waits, in order, once it is time to try again (`now`: at once); stops at
    /// the first write that finds the database still away.
    async fn retry(&mut self, w: &EventWriter, receipts: &mut Vec<Receipt>, now: bool) {
        match self.retry_at {
            Some(at) if now || Instant::now() >= at => {}
            _ => return,
        }
        let mut waiting: Vec<(u64, ProviderEvent)> =
            self.statuses.drain().map(|(_, e)| e).collect();
        waiting.extend(std::mem::take(&mut self.events));
        waiting.sort_by_key(|(place, _)| *place);
        let mut waiting = std::collections::VecDeque::from(waiting);
        while let Some((place, ev)) = waiting.pop_front() {
            match write_event(w, &ev, receipts).await {
                Ok(()) => {}
                Err(e) if database_away(&e) => {
                    waiting.push_front((place, ev));
                    for (place, ev) in waiting {
                        self.keep_at(place, ev);
                    }
                    self.pause = (self.pause * 2).clamp(BACKLOG_RETRY_FIRST, BACKLOG_RETRY_EVERY);
                    self.retry_at = Some(Instant::now() + self.pause);
                    return;
                }
                Err(e) => warn!(error = %e, event = ?ev, "could not record a provider event"),
            }
        }
        info!(
            away_s = self.since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0),
            dropped = self.dropped,
            "the database is back: the provider events kept meanwhile are written"
        );
        *self = Self::default();
    }
}

/// Whether a data-layer error says the database was away (see [`repo::is_unavailable`]).
fn repo_away(e: &RepoError) -> bool {
    matches!(e, RepoError::Db(db) if repo::is_unavailable(db))
}

/// Whether an event writer's error says the database was away (see [`repo::is_unavailable`]).
fn database_away(e: &anyhow::Error) -> bool {
    e.chain().any(|c| match c.downcast_ref::<RepoError>() {
        Some(RepoError::Db(db)) => repo::is_unavailable(db),
        Some(_) => false,
        None => c
            .downcast_ref::<sqlx::Error>()
            .is_some_and(repo::is_unavailable),
    })
}

/// Writes one provider event (not a receipt by message id or inbound text: the caller's).
async fn write_event(
    w: &EventWriter,
    ev: &ProviderEvent,
    receipts: &mut Vec<Receipt>,
) -> anyhow::Result<()> {
    let pool = &w.pool;
    match ev {
        ProviderEvent::Status {
            device,
            status,
            reason,
            restricted_until,
        } => {
            if !write_status(
                pool,
                &w.host_id,
                device,
                (*status, reason.as_deref()),
                *restricted_until,
            )
            .await?
            {
                info!(device_id = %device.id, status = %status,
                      "status of a device another host serves now: not recorded");
            }
        }
        ProviderEvent::ReceiptByProviderId {
            device,
            provider_message_ids,
            read,
            at,
        } => {
            let found = repo::cloud_api::find_sends_by_provider_ids(
                pool,
                device.tenant_id,
                device.id,
                provider_message_ids,
            )
            .await?;
            receipts.extend(found.into_iter().map(|(_, message_id)| Receipt {
                tenant_id: device.tenant_id,
                message_id,
                read: *read,
                at: *at,
            }));
        }
        ProviderEvent::Accepted {
            device,
            provider_message_id,
        } => write_accepted(pool, device, provider_message_id).await?,
        ProviderEvent::Refused {
            device,
            provider_message_id,
            code,
        } => write_refused(pool, device, provider_message_id, code).await?,
        ProviderEvent::Linked { device, phone } => {
            let provider = w.providers.iter().find(|p| p.kind() == device.provider);
            write_linked(pool, &w.host_id, provider, device, phone).await?;
        }
        ProviderEvent::Receipt { .. } | ProviderEvent::Inbound { .. } => {}
    }
    Ok(())
}

/// Words a person puts around an opt-out ("Stop please", "tolong berhenti", "unsubscribe, tq",
/// "请停止"): they neither make a message an opt-out nor keep it from being one. Chinese
/// characters are words of one character each ([`opt_out_words`]): 请 is "please", 谢 (谢谢) "thanks".
const COURTESY_WORDS: &[&str] = &[
    "please", "pls", "plz", "now", "thanks", "thank", "you", "thx", "ty", "tq", "tolong", "terima",
    "kasih", "请", "谢",
];

/// A text's words for matching an opt-out: runs of letters and digits, in lower case. What
/// people type around a keyword falls away: punctuation ("Stop." and "停止！"), emoji,
/// WhatsApp's `*bold*` and `_italic_` marks, and line breaks. Chinese and Japanese are written
/// without spaces, so each of their characters is a word of its own: "请停止" is 请 停 止, which
/// the keyword 停止 (停 止) matches with 请 as a courtesy word.
fn opt_out_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if is_unspaced_script(c) {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            words.push(c.to_string());
        } else if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
        } else if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// A character of a script written without spaces between words: CJK ideographs (with
/// extension A and the compatibility block), hiragana and katakana.
fn is_unspaced_script(c: char) -> bool {
    matches!(c, '\u{3040}'..='\u{30ff}' | '\u{3400}'..='\u{4dbf}' | '\u{4e00}'..='\u{9fff}' | '\u{f900}'..='\u{faff}')
}

/// Whether inbound text is an opt-out: its words, in any case and whatever punctuation, emoji or
/// formatting is around them, are one keyword (or the same few said again, "STOP STOP"),
/// with at most some [`COURTESY_WORDS`] around them. Any other word makes it a conversation,
/// not an opt-out: "stop it please", "don't stop", "when does the promo stop?". A keyword with
/// no letters or digits (an emoji) matches only the whole message as typed, trimmed.
pub fn is_opt_out(keywords: &[String], text: &str) -> bool {
    let said = opt_out_words(text);
    if said.is_empty() {
        let t = text.trim();
        return !t.is_empty() && keywords.iter().any(|k| k.trim() == t);
    }
    let keywords: Vec<Vec<String>> = keywords
        .iter()
        .map(|k| opt_out_words(k))
        .filter(|k| !k.is_empty())
        .collect();
    // reached[i]: the first i words are keywords and courtesy words, with (1) or without (0)
    // a keyword among them
    let mut reached = vec![[false; 2]; said.len() + 1];
    reached[0][0] = true;
    for i in 0..said.len() {
        for with in 0..2 {
            if !reached[i][with] {
                continue;
            }
            if COURTESY_WORDS.contains(&said[i].as_str()) {
                reached[i + 1][with] = true;
            }
            for k in keywords.iter().filter(|k| said[i..].starts_with(k)) {
                reached[i + k.len()][1] = true;
            }
        }
    }
    reached[said.len()][1]
}

async fn message_of(
    pool: &PgPool,
    device: &DeviceRef,
    provider_message_id: &str,
) -> anyhow::Result<Option<i64>> {
    Ok(repo::cloud_api::find_sends_by_provider_ids(
        pool,
        device.tenant_id,
        device.id,
        &[provider_message_id.to_string()],
    )
    .await?
    .first()
    .map(|(_, m)| *m))
}

async fn write_accepted(
    pool: &PgPool,
    device: &DeviceRef,
    provider_message_id: &str,
) -> anyhow::Result<()> {
    if let Some(message_id) = message_of(pool, device, provider_message_id).await? {
        let mut tx = pool.begin().await?;
        repo::cloud_api::confirm_host_sends(&mut tx, device.tenant_id, &[message_id]).await?;
        tx.commit().await?;
    }
    Ok(())
}

async fn write_refused(
    pool: &PgPool,
    device: &DeviceRef,
    provider_message_id: &str,
    nack: &str,
) -> anyhow::Result<()> {
    let Some(message_id) = message_of(pool, device, provider_message_id).await? else {
        return Ok(());
    };
    let detail = match nack {
        "463" => format!("WhatsApp refused the message (nack {nack}: reach-out restriction)"),
        "475" => format!("WhatsApp refused the message (nack {nack}: new-chat limit)"),
        other => format!("WhatsApp refused the message (nack {other})"),
    };
    let mut tx = pool.begin().await?;
    repo::cloud_api::fail_accepted_message(
        &mut tx,
        device.tenant_id,
        message_id,
        reason::PROVIDER_REJECTED,
        &detail,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// After how long an opt-out still not recorded is logged as an error (it is tried for as long
/// as the host runs, and again by the next host started on the same inbox).
const OPT_OUT_PATIENCE: Duration = Duration::from_secs(30 * 60);

/// Writes one inbox STOP to PostgreSQL (durably) and marks it done in the inbox. Returns whether
/// it was written; a failure is logged.
async fn try_opt_out(
    pool: &PgPool,
    inbox: &Arc<Inbox>,
    stop: &InboundStop,
    from: &PhoneE164,
) -> bool {
    match repo::leads::opt_out_number(
        pool,
        stop.tenant_id,
        from,
        repo::leads::ConsentSource::InboundMessage,
    )
    .await
    {
        Ok(n) => {
            info!(tenant = %stop.tenant_id, device_id = %stop.device_id, leads = n, "opt-out keyword received");
            if let Err(e) = inbox.done(stop.id).await {
                // The STOP is recorded; a host restarted on this inbox writes it again, which
                // changes nothing unless an operator opted the number back in meanwhile.
                warn!(error = %e, path = %inbox.path().display(), "could not mark an inbox opt-out done");
            }
            true
        }
        Err(e) => {
            warn!(device_id = %stop.device_id, error = %e, "could not record an opt-out; trying again in the background");
            false
        }
    }
}

/// An inbox STOP not recorded yet (the database unreachable or failing, or the host stopped
/// before it was): written again after `pause`, the pause doubling up to a minute, until it is.
/// The other events wait for nothing meanwhile. Past [`OPT_OUT_PATIENCE`] it logs an error
/// naming the number once, for an operator who would rather not wait (`wabcast leads opt-out`;
/// the later write then changes nothing).
pub async fn record_opt_out(
    pool: PgPool,
    inbox: Arc<Inbox>,
    stop: InboundStop,
    mut pause: Duration,
) {
    let from = match PhoneE164::parse(&stop.from) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(phone = %stop.from, error = %e, path = %inbox.path().display(),
                "an inbox opt-out names no valid number; record it by hand with `wabcast leads opt-out`");
            return;
        }
    };
    let started = Instant::now();
    let mut told = false;
    loop {
        tokio::time::sleep(pause).await;
        if try_opt_out(&pool, &inbox, &stop, &from).await {
            info!(tenant = %stop.tenant_id, waited_s = started.elapsed().as_secs(), received_at = %stop.received_at,
                "opt-out recorded on a later attempt");
            return;
        }
        if !told && started.elapsed() >= OPT_OUT_PATIENCE {
            told = true;
            tracing::error!(
                tenant = %stop.tenant_id,
                device_id = %stop.device_id,
                phone = %from,
                received_at = %stop.received_at,
                "an inbound opt-out is still not recorded after 30 minutes; still trying (record it by hand with `wabcast leads opt-out`)"
            );
        }
        pause = (pause * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    }
}

/// The inbox's STOPs left by a previous run of this host, each written again in the background
/// (at once, then as [`record_opt_out`] retries).
pub fn replay_opt_outs(pool: &PgPool, inbox: &Arc<Inbox>, pending: Vec<InboundStop>) {
    if !pending.is_empty() {
        info!(count = pending.len(), path = %inbox.path().display(), "writing the inbound opt-outs a previous run left in the inbox");
    }
    for stop in pending {
        tokio::spawn(record_opt_out(
            pool.clone(),
            inbox.clone(),
            stop,
            Duration::ZERO,
        ));
    }
}

/// Records the account a session is linked to; a session whose number another live device of
/// the tenant already is gets logged out (unlinked), with a reason naming that device: one
/// WhatsApp number paced as two devices would send at both paces.
async fn write_linked(
    pool: &PgPool,
    host_id: &str,
    provider: Option<&Arc<dyn Provider>>,
    device: &DeviceRef,
    phone: &PhoneE164,
) -> anyhow::Result<()> {
    match repo::devices::record_linked_number(pool, device.tenant_id, device.id, phone).await? {
        repo::devices::LinkedNumber::Recorded { previous, released } => {
            if let Some(previous) = previous {
                info!(device_id = %device.id, %previous, now = %phone, "the device is linked to another number than it said; recorded");
            }
            for other in released {
                info!(device_id = %device.id, %other, %phone, "another device had typed this number; its session proves it is this one's");
            }
        }
        repo::devices::LinkedNumber::Gone => {}
        repo::devices::LinkedNumber::OtherDevice { id, label } => {
            let why = crate::provider::linked_elsewhere(phone, &label, id);
            warn!(device_id = %device.id, other = %id, "a session linked to another device's number; logging it out");
            match provider {
                // A web logout deregisters at WhatsApp, a network call: off the writer's loop,
                // which every device's statuses and receipts go through.
                Some(p) => {
                    let (p, device) = (p.clone(), device.clone());
                    tokio::spawn(async move {
                        if let Err(e) = p.linked_elsewhere(&device, &why).await {
                            warn!(device_id = %device.id, error = %e, "could not log out a session linked to another device's number");
                        }
                    });
                }
                None => {
                    write_status(
                        pool,
                        host_id,
                        device,
                        (DeviceStatus::LoggedOut, Some(&why)),
                        None,
                    )
                    .await?;
                }
            }
        }
    }
    Ok(())
}

/// The device's status, if this host still holds its lease (see
/// [`repo::devices::set_device_status`]); false when another host serves it now.
async fn write_status(
    pool: &PgPool,
    host_id: &str,
    device: &DeviceRef,
    (status, reason): (DeviceStatus, Option<&str>),
    restricted_until: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let written = repo::devices::set_device_status_until(
        &mut tx,
        Some(host_id),
        device.tenant_id,
        device.id,
        status,
        reason,
        restricted_until,
    )
    .await?;
    tx.commit().await?;
    Ok(written)
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

#[cfg(test)]
mod tests {
    use super::is_opt_out;

    fn keywords(list: &[&str]) -> Vec<String> {
        list.iter().map(|k| k.to_string()).collect()
    }

    /// What people really answer when they want no more messages is an opt-out; a message
    /// that merely has the keyword in it is a conversation, and must not lose the business a
    /// customer.
    #[test]
    fn an_opt_out_is_the_keyword_however_it_is_typed_and_nothing_more() {
        let k = keywords(&[
            "STOP",
            "UNSUBSCRIBE",
            "BERHENTI",
            "opt-out",
            "🛑",
            "停止",
            "退订",
        ]);
        for text in [
            "STOP",
            " stop ",
            "Stop.",
            "stop!!!",
            "*STOP*",
            "_Stop_",
            "Stop 🙏",
            "🙏🙏 STOP",
            "STOP STOP STOP",
            "stop\nstop",
            "Stop please",
            "pls stop",
            "STOP NOW",
            "Unsubscribe, thank you",
            "tolong berhenti",
            "Berhenti, terima kasih",
            "stop, tq",
            "OPT OUT",
            "opt-out please",
            "Stop unsubscribe",
            "🛑",
            " 🛑 ",
            "停止",
            "请停止。",
            "退订，谢谢",
            "Stop 停止",
        ] {
            assert!(is_opt_out(&k, text), "{text:?} is an opt-out");
        }
        for text in [
            "",
            "  ",
            "🙏",
            "thank you",
            "please",
            "stop it please",
            "don't stop",
            "When does the promo stop?",
            "stopped",
            "s t o p",
            "nonstop deals?",
            "unsubscribe me from the other list but keep this one",
            "opt",
            "🛑🛑",
            "stop 2",
            "不要停止",
            "什么时候停止？",
            "谢谢",
        ] {
            assert!(!is_opt_out(&k, text), "{text:?} is not an opt-out");
        }
        assert!(!is_opt_out(&[], "STOP"), "no keywords, no opt-outs");
    }
}
