//! message-worker: the SQS-triggered sender (DESIGN.md §1).
//!
//! For a batch of records it claims every row `queued → sending` in one conditional statement (a
//! record whose row is not `queued` is a duplicate delivery: acknowledged, never sent; one whose
//! lead has opted out ends `skipped`; one of a paused campaign goes back to `pending`), asks the
//! device host to send each one with the message id as the idempotency key, and records `sent`,
//! a retry with backoff, or `failed` with its reason. Records of one message group (one device)
//! are sent in order (the host keeps each device's order within the batch). It returns partial batch failures: only records
//! whose outcome could not be recorded are reported, and, as FIFO requires, every later record
//! of the same group with them. Transient send errors are not batch failures: the row goes back
//! to `pending` with a due time and the processor queues it again through pacing. A request
//! that got no answer is no outcome: its row stays `sending` for the rescuer, which asks the
//! host's send record after the lease.

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use chrono::Utc;
use rand::SeedableRng;
use shared::domain::reason;
use shared::host_api::{HostClient, SendOutcome, SendRequest};
use shared::pacing::retry_delay;
use shared::queue::WorkItem;
use shared::repo::{self, messages::SendJob, RepoError};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tracing::{info, instrument, warn};

#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a `sending` row is ours before the rescuer reconciles it; longer than the host timeout.
    pub lease: Duration,
    pub max_attempts: i32,
    pub retry_base: Duration,
    pub retry_cap: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(120),
            max_attempts: 5,
            retry_base: Duration::from_secs(30),
            retry_cap: Duration::from_secs(1800),
        }
    }
}

pub struct Deps {
    /// Every write of the worker is recoverable, so production gives it a `Durability::Relaxed`
    /// pool: a claim lost in a database crash leaves the row `queued` (redelivered or
    /// re-enqueued; the host's record answers "duplicate" if it went out); a lost outcome
    /// leaves it `sending`, reconciled with the host's send record by the rescuer.
    pub pool: PgPool,
    pub host: HostClient,
    pub settings: Settings,
}

/// One parsed record, in batch order.
struct Record {
    sqs_id: String,
    group: String,
    item: Option<WorkItem>,
}

/// How one claimed job ended with the host.
enum Outcome {
    Sent(String, chrono::DateTime<Utc>),
    Failed {
        reason: String,
        detail: String,
    },
    /// `tried = false`: never offered to a provider (held back behind an earlier transient error
    /// of its group, refused for another host's device, no host reached): the attempt is given
    /// back (`code::never_offered`).
    Retry {
        reason: String,
        detail: String,
        tried: bool,
    },
}

#[instrument(skip_all, fields(records = event.records.len()))]
pub async fn handle(event: SqsEvent, deps: &Deps) -> SqsBatchResponse {
    let records: Vec<Record> = event.records.iter().map(parse_record).collect();
    let mut failed: HashSet<String> = HashSet::new();
    for r in records.iter().filter(|r| r.item.is_none()) {
        // A malformed record can never succeed; reporting it lets SQS dead-letter it where an
        // operator sees it, instead of dropping it silently.
        warn!(sqs_message_id = %r.sqs_id, "malformed record body; reported as a failure");
        failed.insert(r.sqs_id.clone());
    }
    let items: Vec<WorkItem> = records.iter().filter_map(|r| r.item.clone()).collect();
    match process(&items, deps).await {
        Ok(unrecorded) => failed.extend(
            records
                .iter()
                .filter(|r| {
                    r.item
                        .as_ref()
                        .is_some_and(|i| unrecorded.contains(&i.message_id))
                })
                .map(|r| r.sqs_id.clone()),
        ),
        Err(e) => {
            warn!(
                error = format!("{e:#}"),
                "batch could not be processed; every record is reported"
            );
            failed.extend(records.iter().map(|r| r.sqs_id.clone()));
        }
    }
    let mut response = SqsBatchResponse::default();
    response.batch_item_failures = fifo_failures(&records, &failed)
        .into_iter()
        .map(|id| {
            let mut f = BatchItemFailure::default();
            f.item_identifier = id;
            f
        })
        .collect();
    response
}

fn parse_record(m: &SqsMessage) -> Record {
    let item = m
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str::<WorkItem>(b).ok());
    let group = m
        .attributes
        .get("MessageGroupId")
        .cloned()
        .or_else(|| item.as_ref().map(WorkItem::group_id))
        .unwrap_or_default();
    Record {
        sqs_id: m.message_id.clone().unwrap_or_default(),
        group,
        item,
    }
}

/// FIFO rule: once a record of a group failed, every later record of that group is reported too,
/// so that SQS redelivers them in order.
fn fifo_failures(records: &[Record], failed: &HashSet<String>) -> Vec<String> {
    let mut broken: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for r in records {
        if broken.contains(r.group.as_str()) || failed.contains(&r.sqs_id) {
            broken.insert(r.group.as_str());
            out.push(r.sqs_id.clone());
        }
    }
    out
}

/// Claims, sends and records. Returns the message ids whose outcome could not be recorded.
async fn process(items: &[WorkItem], deps: &Deps) -> anyhow::Result<HashSet<i64>> {
    use anyhow::Context;
    if items.is_empty() {
        return Ok(HashSet::new());
    }
    let started = std::time::Instant::now();
    // Single statements in autocommit (an implicit transaction each) on the worker's pool.
    let lease_s = deps.settings.lease.as_secs_f64();
    let jobs = repo::retry_aborted(repo::ABORTED_ATTEMPTS, "claim for send", || async {
        let mut conn = deps.pool.acquire().await?;
        repo::messages::claim_messages_for_send(&mut conn, items, lease_s).await
    })
    .await
    .context("failed to claim messages for send")?;
    if jobs.len() < items.len() {
        let claimed: HashSet<i64> = jobs.iter().map(|j| j.id).collect();
        let rest: Vec<WorkItem> = items
            .iter()
            .filter(|i| !claimed.contains(&i.message_id))
            .cloned()
            .collect();
        let mut conn = deps
            .pool
            .acquire()
            .await
            .context("failed to get a connection")?;
        // Opted out first: a paused campaign's row to a lead who said STOP is skipped, not
        // held for the resume.
        let opted_out = repo::messages::skip_opted_out_messages(&mut conn, &rest)
            .await
            .context("failed to skip opted-out leads' messages")?;
        let held = repo::messages::hold_paused_messages(&mut conn, &rest)
            .await
            .context("failed to hold paused messages")?;
        let restricted = repo::messages::hold_restricted_messages(&mut conn, &rest)
            .await
            .context("failed to hold restricted devices' messages")?;
        info!(
            duplicates = rest.len() as u64 - held - opted_out - restricted,
            held, opted_out, restricted, "records not sent"
        );
    }

    // One request to the host for the whole batch, in batch order: the host keeps each
    // device's order and holds back a device's later messages after a transient error.
    let order: HashMap<i64, usize> = items
        .iter()
        .enumerate()
        .map(|(i, w)| (w.message_id, i))
        .collect();
    let mut jobs = jobs;
    jobs.sort_by_key(|j| order.get(&j.id).copied().unwrap_or(usize::MAX));
    let claimed = started.elapsed();
    let results = send_all(jobs, deps).await;
    let sent = started.elapsed();
    let unrecorded = record(results, deps).await;
    tracing::debug!(
        records = items.len(),
        claim_ms = claimed.as_secs_f64() * 1e3,
        host_ms = (sent - claimed).as_secs_f64() * 1e3,
        record_ms = (started.elapsed() - sent).as_secs_f64() * 1e3,
        "batch timing"
    );
    unrecorded
}

async fn send_all(jobs: Vec<SendJob>, deps: &Deps) -> Vec<(SendJob, Outcome)> {
    if jobs.is_empty() {
        return Vec::new();
    }
    let requests: Vec<SendRequest> = jobs
        .iter()
        .map(|job| SendRequest {
            message_id: job.id,
            tenant_id: job.tenant_id,
            device_id: job.device_id,
            to: job.recipient.clone(),
            text: job.body.clone(),
            image: job.image.clone(),
            template: job.wa_template.as_ref().and_then(|t| {
                let to = shared::render::Recipient {
                    name: job.lead_name.as_deref().unwrap_or(""),
                    phone: &job.recipient,
                };
                // Checked when the campaign was created; a row that no longer renders sends
                // the text instead of failing.
                t.0.render(&to, job.id.unsigned_abs()).ok()
            }),
        })
        .collect();
    // Each device's owner host (its lease), the default host for devices without a live lease;
    // hosts concurrently, each with its share of the batch in order.
    let mut groups: Vec<(Option<&str>, Vec<usize>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let url = job.host_url.as_deref();
        match groups.iter_mut().find(|(u, _)| *u == url) {
            Some((_, idx)) => idx.push(i),
            None => groups.push((url, vec![i])),
        }
    }
    let mut outcomes: Vec<Option<SendOutcome>> = vec![None; jobs.len()];
    let sent = futures::future::join_all(groups.iter().map(|(url, idx)| {
        let reqs: Vec<SendRequest> = idx.iter().map(|&i| requests[i].clone()).collect();
        let client = match url {
            Some(u) if *u != deps.host.base() => deps.host.at(u),
            _ => deps.host.clone(),
        };
        async move { client.send_batch(&reqs).await }
    }))
    .await;
    let (mut unreachable, mut reachable) = (Vec::new(), Vec::new());
    for ((url, idx), results) in groups.iter().zip(sent) {
        if url.is_some() {
            note_reachability(&jobs, idx, &results, &mut unreachable, &mut reachable);
        }
        for (&i, r) in idx.iter().zip(results) {
            outcomes[i] = Some(r);
        }
    }
    record_reachability(&unreachable, &reachable, deps).await;
    let outcomes: Vec<SendOutcome> = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(SendOutcome::Transient {
                reason: shared::host_api::code::PROVIDER_ERROR.into(),
                detail: "no answer from the host for this message".into(),
            })
        })
        .collect();
    jobs.into_iter()
        .zip(outcomes)
        .map(|(job, outcome)| {
            let o = match outcome {
                SendOutcome::Sent {
                    provider_message_id,
                    accepted_at,
                    ..
                } => Outcome::Sent(provider_message_id, accepted_at),
                SendOutcome::Permanent { reason, detail } => Outcome::Failed { reason, detail },
                SendOutcome::Transient { reason, detail } => {
                    let tried = !shared::host_api::code::never_offered(&reason);
                    Outcome::Retry {
                        reason,
                        detail,
                        tried,
                    }
                }
            };
            (job, o)
        })
        .collect()
}

/// What one request to the owners of these jobs' devices says of their reachability: a
/// request that could not connect at all marks them unreachable; any answer marks those that
/// were recorded unreachable reachable again (the others need no write).
fn note_reachability(
    jobs: &[SendJob],
    idx: &[usize],
    results: &[SendOutcome],
    unreachable: &mut Vec<String>,
    reachable: &mut Vec<String>,
) {
    let refused = !results.is_empty()
        && results.iter().all(|r| {
            matches!(r, SendOutcome::Transient { reason, .. }
                if reason == shared::host_api::code::UNREACHABLE)
        });
    for &i in idx {
        let job = &jobs[i];
        let Some(host) = &job.host_id else { continue };
        let list = if refused {
            &mut *unreachable
        } else if job.host_unreachable_since.is_some() {
            &mut *reachable
        } else {
            continue;
        };
        if !list.contains(host) {
            list.push(host.clone());
        }
    }
}

/// Records hosts found unreachable or reachable again. Best effort: a lost write delays giving
/// up on an unreachable host's messages by one more round (or, for a reachable one, until its
/// next answer), and changes nothing about any message.
async fn record_reachability(unreachable: &[String], reachable: &[String], deps: &Deps) {
    if !unreachable.is_empty() {
        if let Err(e) = repo::hosts::mark_unreachable(&deps.pool, unreachable).await {
            warn!(error = %e, hosts = ?unreachable, "could not record unreachable hosts");
        }
    }
    if !reachable.is_empty() {
        if let Err(e) = repo::hosts::mark_reachable(&deps.pool, reachable).await {
            warn!(error = %e, hosts = ?reachable, "could not record hosts reachable again");
        }
    }
}

/// Writes every outcome: all `sent` rows in one statement, failures and retries one each.
async fn record(results: Vec<(SendJob, Outcome)>, deps: &Deps) -> anyhow::Result<HashSet<i64>> {
    let mut unrecorded = HashSet::new();
    let sent: Vec<repo::messages::SentRecord> = results
        .iter()
        .filter_map(|(j, o)| match o {
            Outcome::Sent(pid, at) => Some((j.id, j.tenant_id, pid.clone(), *at)),
            _ => None,
        })
        .collect();
    if !sent.is_empty() {
        if let Err(e) = write_sent(&sent, deps).await {
            // The host's send record still says sent: the rescuer reconciles these rows.
            warn!(
                error = format!("{e:#}"),
                count = sent.len(),
                "could not record sent rows"
            );
            unrecorded.extend(sent.iter().map(|s| s.0));
        }
    }
    let mut rng = rand::rngs::StdRng::from_os_rng();
    for (job, outcome) in &results {
        let res = match outcome {
            Outcome::Sent(..) => continue,
            // The host found the row no longer `sending` and sent nothing: the rescuer moved it
            // on after its lease (this request came that late), and it may be another claim's
            // by now, which a write here would end.
            Outcome::Failed { reason, detail }
                if reason == shared::host_api::code::NOT_IN_FLIGHT =>
            {
                warn!(
                    message_id = job.id,
                    detail, "the device host found this row no longer sending; nothing recorded"
                );
                continue;
            }
            Outcome::Failed { reason, detail } => {
                write_failed(job, &permanent_reason(reason), detail, deps).await
            }
            // No outcome for this claim: the request left and no answer came back (a timeout,
            // a reset), so the host may have sent it or be sending it still; or the host is
            // sending the message for an earlier request (`in_progress`: a late one of a
            // previous claim). The row stays `sending`, and once no host is on it
            // (`HOST_TIMEOUT_S` after its claim, or past its lease) the rescuer reconciles it
            // with the host's send record (DESIGN §2): `sent` if it went out, else back to
            // `pending`. Put back to `pending` now, a cancel, an opt-out or an offline skip in
            // the meantime would end a message that did go out as `cancelled` or `skipped`.
            Outcome::Retry { reason, detail, .. }
                if reason == shared::host_api::code::NO_ANSWER
                    || reason == shared::host_api::code::IN_PROGRESS =>
            {
                warn!(
                    message_id = job.id,
                    reason,
                    detail,
                    "no outcome from the device host for this claim; the rescuer reconciles the row with its send record"
                );
                continue;
            }
            Outcome::Retry {
                reason,
                detail,
                tried: true,
            } if job.attempts >= deps.settings.max_attempts => {
                let detail = format!("{reason}: {detail}");
                write_failed(job, reason::ATTEMPTS_EXHAUSTED, &detail, deps).await
            }
            Outcome::Retry {
                reason,
                detail,
                tried,
            } => {
                let due = retry_due(job, reason, &deps.settings, &mut rng);
                write_retry(job, due, &format!("{reason}: {detail}"), *tried, deps).await
            }
        };
        if let Err(e) = res {
            warn!(
                message_id = job.id,
                error = format!("{e:#}"),
                "could not record outcome"
            );
            unrecorded.insert(job.id);
        }
    }
    Ok(unrecorded)
}

/// When a message that met a transient error is due again. Its device's owner could not be
/// reached: no host can take the device over before the owner's lease ends, and one can right
/// after (the default host on the next request, any host on its next lease round), so the
/// message comes back then, with a little jitter, whatever its backoff would say. Waiting
/// longer delayed every message of a dead host's devices by a backoff after the takeover (the
/// paced benchmark's killed host); coming back sooner only finds the dead host again. Else:
/// exponential backoff with jitter.
fn retry_due(
    job: &SendJob,
    reason: &str,
    settings: &Settings,
    rng: &mut impl rand::Rng,
) -> chrono::DateTime<Utc> {
    let now = Utc::now();
    if reason == shared::host_api::code::UNREACHABLE {
        if let Some(until) = job.host_lease_until {
            let jitter = chrono::Duration::milliseconds(rng.random_range(0..=TAKEOVER_JITTER_MS));
            return until.max(now) + jitter;
        }
    }
    let delay = retry_delay(job.attempts, settings.retry_base, settings.retry_cap, rng);
    now + chrono::Duration::from_std(delay).unwrap_or_default()
}

/// Spread of the retries that wait for a dead host's lease to end (see [`retry_due`]).
const TAKEOVER_JITTER_MS: i64 = 2_000;

/// Host error codes become the row's machine-readable reason.
fn permanent_reason(code: &str) -> String {
    use shared::host_api::code;
    match code {
        code::NOT_ON_WHATSAPP => reason::NOT_ON_WHATSAPP.into(),
        code::BAD_IMAGE => reason::BAD_IMAGE.into(),
        code::INVALID_PAYLOAD | code::UNKNOWN_DEVICE => reason::INVALID_PAYLOAD.into(),
        other => other.to_string(),
    }
}

// The outcome writes are whole transactions (a conditional statement in autocommit, or the
// retry's own begin … commit): one that PostgreSQL aborted as a deadlock victim is run again
// (`repo::retry_aborted`) instead of leaving its rows to the rescuer, which would find them only
// after the lease (`LEASE_S`).

async fn write_sent(sent: &[repo::messages::SentRecord], deps: &Deps) -> Result<(), RepoError> {
    repo::retry_aborted(repo::ABORTED_ATTEMPTS, "record sent", || async {
        let mut conn = deps.pool.acquire().await?;
        repo::messages::mark_messages_sent(&mut conn, sent).await
    })
    .await?;
    Ok(())
}

async fn write_failed(
    job: &SendJob,
    reason: &str,
    detail: &str,
    deps: &Deps,
) -> Result<(), RepoError> {
    repo::retry_aborted(repo::ABORTED_ATTEMPTS, "record failed", || async {
        let mut conn = deps.pool.acquire().await?;
        repo::messages::mark_message_failed(
            &mut conn,
            job.tenant_id,
            job.id,
            job.attempts,
            reason,
            detail,
        )
        .await
    })
    .await?;
    Ok(())
}

async fn write_retry(
    job: &SendJob,
    due: chrono::DateTime<Utc>,
    error: &str,
    tried: bool,
    deps: &Deps,
) -> Result<(), RepoError> {
    // One transaction: the row's campaign is locked, the row goes back to `pending`, and on to
    // `cancelled` if the campaign was cancelled while it was sending.
    repo::retry_aborted(repo::ABORTED_ATTEMPTS, "record retry", || async {
        let mut tx = deps.pool.begin().await?;
        repo::messages::mark_message_retry(
            &mut tx,
            job.tenant_id,
            job.id,
            job.attempts,
            due,
            error,
            tried,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, group: &str) -> Record {
        Record {
            sqs_id: id.into(),
            group: group.into(),
            item: None,
        }
    }

    #[test]
    fn fifo_reports_the_rest_of_a_failed_group() {
        let records = vec![
            rec("1", "a"),
            rec("2", "b"),
            rec("3", "a"),
            rec("4", "b"),
            rec("5", "a"),
        ];
        let failed: HashSet<String> = ["3".to_string()].into();
        assert_eq!(fifo_failures(&records, &failed), vec!["3", "5"]);
        assert!(fifo_failures(&records, &HashSet::new()).is_empty());
    }
}
