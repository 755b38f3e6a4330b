//! broadcast-processor: drains due pending rows into the queue, paced per device.
//!
//! One invocation loops with a short tick for `run_for` (cloud schedules fire once a minute, so
//! the loop is what makes drain latency about one tick). Each tick: sweeps (deleted devices,
//! devices offline past the grace, finished campaigns), rescues rows stuck past their lease
//! (re-enqueue `queued`; reconcile `sending` with the host's send record), then claims and
//! enqueues. A claim that came back full runs again at once, so the tick never caps
//! throughput. Pacing lives in PostgreSQL (`repo::messages::claim_ready_messages`); this
//! function never sleeps per device. Any number of processors may run at once.

use anyhow::Context;
use serde::Serialize;
use shared::queue::{enqueue_items, Queue};
use shared::repo;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, instrument, warn};

#[derive(Debug, Clone)]
pub struct Settings {
    pub tick: Duration,
    pub run_for: Duration,
    /// How long a device may be disconnected (or its host unreachable while holding its lease)
    /// before its due messages end `skipped`.
    pub offline_grace: Duration,
    /// How long a `queued` or `sending` row may stay so before the rescuer acts (`LEASE_S`, the
    /// worker's too).
    pub lease: Duration,
    /// How long a device lease lasts unrenewed, for hosts that did not record their own
    /// (`DEVICE_LEASE_S` of an earlier version's hosts), and when no host holds a device. The
    /// hosts' leases tell how long an outage of the database must be for them to run out, and
    /// how long after one the hosts need to renew them (`repo::messages::TickGaps`); each host
    /// records its own (`repo::hosts::register_host`), so a processor needs no setting that
    /// must match the hosts'.
    pub device_lease: Duration,
    /// The worker's `HOST_TIMEOUT_S`: a `sending` row claimed longer ago that no host is on (its
    /// record is final, its host lost the device, or no attempt was recorded) is reconciled
    /// before its lease (`repo::messages::HostLost`).
    pub host_timeout: Duration,
    pub max_devices_per_claim: i64,
    /// Messages one device may take in one claim while its gaps are zero.
    pub per_device_burst: i64,
    /// Messages one claim takes in all (about): each ready device's share is this divided by
    /// the ready devices (at least one), so a zero-gap campaign makes several short claims
    /// instead of one long pass. The devices a claim takes are bounded by
    /// `max_devices_per_claim`.
    pub max_messages_per_claim: i64,
    pub max_attempts: i32,
    /// How soon the rescuer enqueues again the rows the queue refused, and how long the claims
    /// wait after a refusal (see `enqueue`).
    pub enqueue_retry: Duration,
    /// Delay before a reconciled, unsent row is due again.
    pub rescue_retry_after: Duration,
    pub rescue_batch: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            run_for: Duration::from_secs(64),
            offline_grace: Duration::from_secs(300),
            lease: Duration::from_secs(120),
            host_timeout: Duration::from_secs(30),
            device_lease: Duration::from_secs(30),
            max_devices_per_claim: 1_000,
            per_device_burst: 50,
            max_messages_per_claim: 5_000,
            max_attempts: 5,
            enqueue_retry: Duration::from_secs(5),
            rescue_retry_after: Duration::from_secs(5),
            rescue_batch: 1_000,
        }
    }
}

pub struct Deps {
    pub pool: PgPool,
    pub queue: Arc<dyn Queue>,
    pub settings: Settings,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    pub ticks: u64,
    pub queued: u64,
    pub requeued: u64,
    pub reconciled_sent: u64,
    pub reconciled_retry: u64,
    pub reconciled_failed: u64,
    /// Of `reconciled_retry`, rows whose campaign was cancelled while they were sending: they
    /// ended `cancelled` instead of waiting for a retry.
    pub reconciled_cancelled: u64,
    /// Of the reconciled rows, those taken before their lease because no host was on them
    /// (`repo::messages::HostLost`).
    pub reconciled_host_lost: u64,
    /// `sending` rows past their lease whose host was still sending them: left to it with a
    /// new lease (`repo::messages::reconcile_stale_sending`).
    pub sending_leases_renewed: u64,
    pub skipped_offline: u64,
    pub skipped_deleted: u64,
    /// Messages of a device whose host held its lease but could not be reached past the grace.
    pub skipped_unreachable: u64,
    pub campaigns_completed: u64,
    pub enqueue_errors: u64,
    /// The longest pass of the loop (housekeeping when due, claim, enqueue), in milliseconds:
    /// drain latency is one tick plus this, so it tells a slow pass from a late tick.
    pub slowest_pass_ms: u64,
    /// Passes that took longer than the tick (each also logged as a warning).
    pub slow_passes: u64,
    /// Ticks that found no processor had reached the database for longer than the offline
    /// grace (an outage that long): device leases that ran out meanwhile are not yet taken for
    /// devices nobody serves (`repo::messages::note_processor_tick`).
    pub resumed: u64,
    /// Ticks that found no processor had reached the database for an outage's gap of any
    /// length (`repo::messages::TickGaps`: two thirds of a device lease, three ticks): the
    /// rescuer leaves `sending` rows to their hosts for the settling time after it.
    pub back: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("malformed event: {0}")]
    InvalidEvent(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Optional overrides from the event: `run_for_seconds` (0 = a single tick) and `tick_ms`.
fn settings_for(event: &serde_json::Value, base: &Settings) -> Result<Settings, ProcessorError> {
    let mut s = base.clone();
    let map = match event {
        serde_json::Value::Object(m) => m,
        serde_json::Value::Null => return Ok(s),
        other => {
            return Err(ProcessorError::InvalidEvent(format!(
                "expected a JSON object, got {other}"
            )))
        }
    };
    let number = |key: &str, max: u64| -> Result<Option<u64>, ProcessorError> {
        match map.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_u64().filter(|n| *n <= max).map(Some).ok_or_else(|| {
                ProcessorError::InvalidEvent(format!(
                    "{key} must be an integer from 0 to {max}, got {v}"
                ))
            }),
        }
    };
    if let Some(secs) = number("run_for_seconds", 900)? {
        s.run_for = Duration::from_secs(secs);
    }
    if let Some(ms) = number("tick_ms", 60_000)? {
        s.tick = Duration::from_millis(ms.max(10));
    }
    Ok(s)
}

#[instrument(skip_all)]
pub async fn handle(event: serde_json::Value, deps: &Deps) -> Result<Report, ProcessorError> {
    let settings = settings_for(&event, &deps.settings)?;
    let deadline = Instant::now() + settings.run_for;
    let total = run(deps, &settings, deadline, &AtomicBool::new(false)).await?;
    info!(?total, "processor run finished");
    Ok(total)
}

/// The invocation's loop until `deadline`, or until `stop` is set (at least one tick always
/// runs). Claims run back to back while they come back full; the housekeeping
/// (sweeps and rescues) runs once per `tick` at most, whatever the claim rate, so that a busy
/// queue is not slowed by work that only has to happen about once a second.
pub async fn run(
    deps: &Deps,
    settings: &Settings,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<Report, ProcessorError> {
    let done = || Instant::now() >= deadline || stop.load(Ordering::Relaxed);
    let mut report = Report::default();
    let mut housekept: Option<Instant> = None;
    let mut lost_scanned: Option<Instant> = None;
    // When the queue last refused an enqueue: claims wait `enqueue_retry` after it, so that a
    // queue that is down does not have every device's messages claimed into `queued` rows it
    // cannot take (the rescuer's retries of the refused rows probe it meanwhile).
    let mut refused: Option<Instant> = None;
    loop {
        let tick_started = Instant::now();
        if housekept.is_none_or(|at| at.elapsed() >= settings.tick) {
            // See `HOST_LOST_SCAN_EVERY`.
            let scan_lost = lost_scanned
                .is_none_or(|at| at.elapsed() >= settings.host_timeout / HOST_LOST_SCAN_EVERY);
            if scan_lost {
                lost_scanned = Some(Instant::now());
            }
            let (errors, requeued) = (report.enqueue_errors, report.requeued);
            housekeeping(deps, settings, &mut report, scan_lost).await?;
            if report.enqueue_errors > errors {
                refused = Some(Instant::now());
            } else if report.requeued > requeued {
                refused = None;
            }
            housekept = Some(Instant::now());
            report.ticks += 1;
        }
        let saturated = if refused.is_some_and(|at| at.elapsed() < settings.enqueue_retry) {
            false
        } else {
            let errors = report.enqueue_errors;
            let (_, saturated) = claim_and_enqueue(deps, settings, &mut report).await?;
            if report.enqueue_errors > errors {
                refused = Some(Instant::now());
            }
            saturated
        };
        note_pass(&mut report, tick_started.elapsed(), settings.tick);
        if done() {
            return Ok(report);
        }
        if !saturated {
            let rest = settings.tick.saturating_sub(tick_started.elapsed());
            tokio::time::sleep(rest.min(deadline.saturating_duration_since(Instant::now()))).await;
            if done() {
                return Ok(report);
            }
        }
    }
}

fn note_pass(report: &mut Report, took: Duration, tick: Duration) {
    let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    report.slowest_pass_ms = report.slowest_pass_ms.max(ms);
    if took > tick {
        report.slow_passes += 1;
        warn!(
            pass_ms = ms,
            tick_ms = tick.as_millis() as u64,
            "a processor pass took longer than its tick: drain latency grows by the excess"
        );
    }
}

/// One tick: housekeeping, then one claim. Returns true when the claim came back full (more is
/// ready right now).
pub async fn tick(
    deps: &Deps,
    settings: &Settings,
    report: &mut Report,
) -> Result<bool, ProcessorError> {
    let started = Instant::now();
    housekeeping(deps, settings, report, true).await?;
    let (_, saturated) = claim_and_enqueue(deps, settings, report).await?;
    note_pass(report, started.elapsed(), settings.tick);
    Ok(saturated)
}

/// How often, per `host_timeout`, the rescuer looks for `sending` rows that no host is on
/// before their lease (`repo::messages::HostLost`): every 10 s by default, not every tick.
/// Its index range holds the entries of every row version claimed in the 90 s before, dead
/// ones included until a vacuum (a bitmap scan never marks them dead): 20 ms for the 200,000
/// of a 100,000-message run, measured; at a steady 3,000 msg/s some 540,000, about 50 ms by
/// that measure, which every tick would have paid. A row is then reconciled up to 10 s later, instead of the 90 s its lease would add.
const HOST_LOST_SCAN_EVERY: u32 = 3;

async fn housekeeping(
    deps: &Deps,
    settings: &Settings,
    report: &mut Report,
    scan_lost: bool,
) -> Result<(), ProcessorError> {
    let mut conn = deps.pool.acquire().await.context("failed to connect")?;
    let (shortest, longest) =
        repo::hosts::device_lease_span(&mut conn, settings.device_lease.as_secs_f64())
            .await
            .context("failed to read the hosts' device leases")?;
    let gaps = repo::messages::TickGaps::new(
        settings.tick.as_secs_f64(),
        settings.offline_grace.as_secs_f64(),
        shortest,
        longest,
    );
    let liveness = repo::messages::note_processor_tick(&mut conn, gaps)
        .await
        .context("failed to note the tick")?;
    drop(conn);
    if liveness.back {
        report.back += 1;
        warn!(
            gap_s = gaps.outage_s,
            "no processor reached the database for a while: the rescuer leaves rows in \
             `sending` to their hosts until the hosts have had time to renew their leases"
        );
    }
    if liveness.resumed {
        report.resumed += 1;
        warn!(
            gap_s = gaps.past_grace_s,
            "no processor reached the database for longer than the offline grace: device \
             leases that ran out meanwhile are no witness until the hosts have had time to \
             renew them"
        );
    }
    sweep(deps, settings, report).await?;
    rescue(deps, settings, report, scan_lost, liveness.rescue_settling).await
}

async fn sweep(
    deps: &Deps,
    settings: &Settings,
    report: &mut Report,
) -> Result<(), ProcessorError> {
    let mut tx = deps.pool.begin().await.context("failed to begin")?;
    report.skipped_deleted += repo::messages::skip_deleted_device_messages(&mut tx)
        .await
        .context("failed to skip deleted devices' messages")?;
    report.skipped_offline +=
        repo::messages::skip_offline_device_messages(&mut tx, settings.offline_grace.as_secs_f64())
            .await
            .context("failed to skip offline devices' messages")?;
    report.skipped_unreachable += repo::messages::skip_unreachable_host_messages(
        &mut tx,
        settings.offline_grace.as_secs_f64(),
    )
    .await
    .context("failed to skip unreachable hosts' messages")?;
    // Every tick, not only when idle: other campaigns' traffic must not keep a finished one
    // `running`. An index probe per running campaign.
    report.campaigns_completed += repo::campaigns::complete_finished_campaigns(&mut tx)
        .await
        .context("failed to complete campaigns")?;
    tx.commit().await.context("failed to commit sweep")?;
    Ok(())
}

async fn rescue(
    deps: &Deps,
    settings: &Settings,
    report: &mut Report,
    scan_lost: bool,
    settling: bool,
) -> Result<(), ProcessorError> {
    let mut tx = deps.pool.begin().await.context("failed to begin")?;
    let stale = repo::messages::requeue_stale_queued(
        &mut tx,
        settings.rescue_batch,
        settings.lease.as_secs_f64(),
    )
    .await
    .context("failed to requeue stale rows")?;
    // Right after an outage every host's lease looks lapsed until the host renews it, and a
    // `sending` row its host is still on would be taken for one nobody is on: back to
    // `pending`, an attempt spent, and its record (`attempting`) resolved on the next attempt
    // through the provider, which the Cloud API cannot do (`outcome_unknown`). Rows in
    // `sending` wait for the settling time instead.
    let reconciled = if settling {
        repo::messages::Reconciled::default()
    } else {
        repo::messages::reconcile_stale_sending(
            &mut tx,
            settings.max_attempts,
            settings.rescue_retry_after.as_secs_f64(),
            settings.rescue_batch,
            settings.lease.as_secs_f64(),
            scan_lost.then_some(repo::messages::HostLost {
                settled_s: settings.host_timeout.as_secs_f64(),
            }),
        )
        .await
        .context("failed to reconcile stale sending rows")?
    };
    tx.commit().await.context("failed to commit rescue")?;
    if !stale.is_empty() {
        warn!(
            count = stale.len(),
            "re-enqueueing rows lost past their lease"
        );
        enqueue(deps, settings, &stale, report).await;
        report.requeued += stale.len() as u64;
    }
    report.reconciled_sent += reconciled.sent;
    report.reconciled_retry += reconciled.retried;
    report.reconciled_cancelled += reconciled.cancelled;
    report.reconciled_failed += reconciled.failed + reconciled.exhausted;
    report.reconciled_host_lost += reconciled.host_lost;
    report.sending_leases_renewed += reconciled.renewed;
    Ok(())
}

async fn claim_and_enqueue(
    deps: &Deps,
    settings: &Settings,
    report: &mut Report,
) -> Result<(usize, bool), ProcessorError> {
    // A claim lost in a database crash leaves rows `pending` while their items may be in the
    // queue: the worker's claim then finds them not `queued` and acknowledges; they are claimed again.
    let mut tx = deps.pool.begin().await.context("failed to begin")?;
    repo::relax_durability(&mut tx)
        .await
        .context("failed to relax durability")?;
    let limits = device_limits(
        &repo::devices::list_limited_devices(&mut tx)
            .await
            .context("failed to list device limits")?,
        chrono::Utc::now(),
    );
    let claim = repo::messages::claim_ready_messages(
        &mut tx,
        repo::messages::ClaimSize {
            max_devices: settings.max_devices_per_claim,
            per_device: settings.per_device_burst,
            max_messages: settings.max_messages_per_claim,
        },
        settings.lease.as_secs_f64(),
        settings.tick.as_secs_f64(),
        &limits,
    )
    .await
    .context("failed to claim ready messages")?;
    if !claim.items.is_empty() {
        let queued: Vec<shared::queue::WorkItem> =
            claim.items.iter().map(|(i, _)| i.clone()).collect();
        repo::messages::defer_capped_messages(&mut tx, &queued)
            .await
            .context("failed to defer capped leads' messages")?;
    }
    tx.commit().await.context("failed to commit claim")?;
    if claim.items.is_empty() {
        return Ok((0, false));
    }
    let enqueued = enqueue(deps, settings, &claim.items, report).await;
    report.queued += claim.items.len() as u64;
    // A queue that refuses is not asked again at once: the next claim waits for the tick.
    Ok((claim.items.len(), claim.full && enqueued))
}

/// Resolves each limited device's local day and quiet hours in its tenant's zone (chrono-tz).
/// A device whose zone cannot be resolved is held (quiet) rather than sent without its limits.
fn device_limits(
    devices: &[repo::devices::LimitedDevice],
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<repo::messages::DeviceLimit> {
    devices
        .iter()
        .map(|d| match shared::tz::parse_zone(&d.time_zone) {
            Ok(zone) => {
                let local = now.with_timezone(&zone);
                let quiet = match (d.quiet_start, d.quiet_end) {
                    (Some(a), Some(b)) => shared::pacing::in_quiet_hours(local.time(), a, b),
                    _ => false,
                };
                repo::messages::DeviceLimit {
                    device: d.id,
                    local_day: local.date_naive(),
                    quiet,
                }
            }
            Err(e) => {
                warn!(device = %d.id, error = %e, "time zone unresolved: device held");
                repo::messages::DeviceLimit {
                    device: d.id,
                    local_day: now.date_naive(),
                    quiet: true,
                }
            }
        })
        .collect()
}

/// Enqueues after the claim (or the rescuer's requeue) committed. If the queue refuses, the
/// rows stay `queued` and the rescuer enqueues them again: delayed, never lost. Not after their
/// whole lease (`LEASE_S`, two minutes), as a row lost on its way would be: the refusal is
/// known, so their lease is cut to `enqueue_retry` (a paced device sends nothing while a row of
/// it is in flight, so a blip of the queue stalled every device it touched for the whole
/// lease). Returns whether the queue took them; `run` claims nothing more for `enqueue_retry`
/// after a refusal.
async fn enqueue(
    deps: &Deps,
    settings: &Settings,
    items: &[repo::messages::ClaimedItem],
    report: &mut Report,
) -> bool {
    let Err(e) = enqueue_items(deps.queue.as_ref(), items).await else {
        return true;
    };
    report.enqueue_errors += 1;
    let retry_s = settings.enqueue_retry.as_secs_f64();
    let cut = match deps.pool.acquire().await {
        Ok(mut conn) => repo::messages::retry_enqueue_after(&mut conn, items, retry_s).await,
        Err(err) => Err(err.into()),
    };
    match cut {
        Ok(_) => warn!(
            error = %e,
            count = items.len(),
            retry_s,
            "enqueue failed; the rescuer enqueues them again"
        ),
        Err(db) => warn!(
            error = %e,
            count = items.len(),
            db_error = %db,
            "enqueue failed; the rescuer enqueues them again after their lease"
        ),
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_overrides() {
        let base = Settings::default();
        let s = settings_for(
            &serde_json::json!({"run_for_seconds": 0, "tick_ms": 200}),
            &base,
        )
        .unwrap();
        assert_eq!(s.run_for, Duration::ZERO);
        assert_eq!(s.tick, Duration::from_millis(200));
        let s = settings_for(
            &serde_json::json!({"detail-type": "Scheduled Event"}),
            &base,
        )
        .unwrap();
        assert_eq!(s.run_for, base.run_for);
        assert!(settings_for(&serde_json::json!({"run_for_seconds": -1}), &base).is_err());
        assert!(settings_for(&serde_json::json!({"tick_ms": "fast"}), &base).is_err());
        assert!(settings_for(&serde_json::json!("x"), &base).is_err());
    }

    #[test]
    fn passes_longer_than_the_tick_are_counted_and_the_slowest_kept() {
        let mut r = Report::default();
        let tick = Duration::from_secs(1);
        note_pass(&mut r, Duration::from_millis(40), tick);
        note_pass(&mut r, Duration::from_millis(1_500), tick);
        note_pass(&mut r, Duration::from_millis(1_000), tick);
        note_pass(&mut r, Duration::from_millis(1_200), tick);
        assert_eq!(r.slowest_pass_ms, 1_500);
        assert_eq!(r.slow_passes, 2, "a pass of exactly one tick is on time");
    }
}
