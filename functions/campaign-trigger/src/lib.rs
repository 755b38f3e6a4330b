//! campaign-trigger: every minute, claims due campaigns and materialises one `broadcast_messages`
//! row per matching lead, rendered for that lead, in one transaction with the campaign's
//! `scheduled → running`. Running it twice, or twice at once, creates nothing new: claims skip
//! locked campaigns and the database refuses a second row per (campaign, lead).
//!
//! Then the sequences: enrolls the leads whose triggers name an active sequence (consuming the
//! token), materialises the next due step of each enrollment (only that one: no sequence ever
//! writes its future up front) and advances it, and completes finished enrollments, chaining
//! the lead into the next sequence by adding its next trigger. Due instants come from the
//! tenant's local date and the sequence's time of day through chrono-tz.

use rand::SeedableRng;
use serde::Serialize;
use shared::domain::{InvalidInput, TargetStatus};
use shared::render::{Recipient, Template};
use shared::repo::{self, campaigns::RenderedMessage};
use sqlx::PgPool;
use tracing::{info, instrument};

pub struct Deps {
    pub pool: PgPool,
    /// Campaigns fanned out per invocation at most (each in its own transaction).
    pub max_campaigns: usize,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct TriggerReport {
    pub campaigns_started: usize,
    pub rows_created: u64,
    pub leads_enrolled: u64,
    pub step_rows_created: u64,
    pub enrollments_completed: u64,
}

/// Enrollments materialised per transaction at most.
const STEP_CHUNK: i64 = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("malformed event: {0}")]
    InvalidEvent(String),
    #[error("campaign {campaign} cannot be fanned out: {problem}")]
    InvalidCampaign {
        campaign: uuid::Uuid,
        problem: InvalidInput,
    },
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Accepts any JSON object (EventBridge Scheduler passes its configured input through) and an
/// optional `max_campaigns` override.
fn parse_event(event: &serde_json::Value, default: usize) -> Result<usize, TriggerError> {
    match event {
        serde_json::Value::Object(map) => match map.get("max_campaigns") {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=10_000).contains(n))
                .map(|n| n as usize)
                .ok_or_else(|| {
                    TriggerError::InvalidEvent(format!(
                        "max_campaigns must be an integer from 1 to 10000, got {v}"
                    ))
                }),
        },
        serde_json::Value::Null => Ok(default),
        other => Err(TriggerError::InvalidEvent(format!(
            "expected a JSON object, got {other}"
        ))),
    }
}

#[instrument(skip_all)]
pub async fn handle(event: serde_json::Value, deps: &Deps) -> Result<TriggerReport, TriggerError> {
    use anyhow::Context;
    let max = parse_event(&event, deps.max_campaigns)?;
    let mut report = TriggerReport::default();
    while report.campaigns_started < max {
        let mut tx = deps.pool.begin().await.context("failed to begin")?;
        let claimed = repo::campaigns::claim_due_campaigns(&mut tx, 1)
            .await
            .context("failed to claim due campaigns")?;
        let Some(campaign) = claimed.into_iter().next() else {
            break;
        };
        let created = fan_out(&mut tx, &campaign).await?;
        tx.commit().await.context("failed to commit fan-out")?;
        info!(campaign_id = %campaign.id, rows = created, "campaign started");
        report.campaigns_started += 1;
        report.rows_created += created;
    }
    run_sequences(deps, &mut report).await?;
    Ok(report)
}

/// Enrollment, lazy materialisation and completion of sequences (see the module docs).
async fn run_sequences(deps: &Deps, report: &mut TriggerReport) -> Result<(), TriggerError> {
    use anyhow::Context;
    let now = chrono::Utc::now();
    let sequences = {
        let mut conn = deps.pool.acquire().await.context("failed to connect")?;
        repo::sequences::list_active_sequences(&mut conn)
            .await
            .context("failed to list active sequences")?
    };
    for seq in &sequences {
        let zone = match shared::tz::parse_zone(&seq.time_zone) {
            Ok(z) => z,
            Err(e) => {
                tracing::warn!(sequence_id = %seq.id, error = %e, "tenant time zone invalid; sequence skipped");
                continue;
            }
        };
        let today = now.with_timezone(&zone).date_naive();
        let first_due =
            shared::tz::resolve_days_after(zone, today, seq.first_day_offset, seq.send_time)
                .map_err(|problem| TriggerError::InvalidCampaign {
                    campaign: seq.id,
                    problem,
                })?;
        let mut tx = deps.pool.begin().await.context("failed to begin")?;
        let n = repo::sequences::enroll_triggered_leads(&mut tx, seq, today, first_due)
            .await
            .context("failed to enroll leads")?;
        tx.commit().await.context("failed to commit enrollments")?;
        if n > 0 {
            info!(sequence_id = %seq.id, enrolled = n, "leads enrolled");
        }
        report.leads_enrolled += n;
    }
    loop {
        let groups = {
            let mut conn = deps.pool.acquire().await.context("failed to connect")?;
            repo::sequences::list_due_groups(&mut conn, 100)
                .await
                .context("failed to list due steps")?
        };
        if groups.is_empty() {
            break;
        }
        let mut progressed = 0u64;
        for group in &groups {
            progressed += materialise_group(deps, group, report).await?;
        }
        if progressed == 0 {
            // Everything due is locked by a concurrent trigger.
            break;
        }
    }
    let mut tx = deps.pool.begin().await.context("failed to begin")?;
    report.enrollments_completed += repo::sequences::complete_finished_enrollments(&mut tx)
        .await
        .context("failed to complete enrollments")?;
    tx.commit().await.context("failed to commit completions")?;
    Ok(())
}

/// Materialises one group's step (same sequence, step and local enrollment date) and advances
/// its enrollments, in one transaction. Returns how many enrollments it moved.
async fn materialise_group(
    deps: &Deps,
    group: &repo::sequences::DueGroup,
    report: &mut TriggerReport,
) -> Result<u64, TriggerError> {
    use anyhow::Context;
    let invalid = |problem| TriggerError::InvalidCampaign {
        campaign: group.campaign_id,
        problem,
    };
    let zone = shared::tz::parse_zone(&group.time_zone).map_err(invalid)?;
    let template = Template::parse(&group.template).map_err(invalid)?;
    // The instant this step was due for the whole group (it may lie in the past: a sequence
    // resumed after a pause sends what fell due meanwhile at once).
    let due =
        shared::tz::resolve_days_after(zone, group.enrolled_on, group.day_offset, group.send_time)
            .map_err(invalid)?;
    let mut tx = deps.pool.begin().await.context("failed to begin")?;
    let due_rows = repo::sequences::claim_due_enrollments(&mut tx, group, STEP_CHUNK)
        .await
        .context("failed to claim due enrollments")?;
    if due_rows.is_empty() {
        return Ok(0);
    }
    let (opted_out, live): (Vec<_>, Vec<_>) = due_rows.iter().partition(|e| e.opted_out);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let rows: Vec<repo::sequences::StepMessage<'_>> = live
        .iter()
        .map(|e| repo::sequences::StepMessage {
            enrollment_id: e.id,
            lead_id: e.lead_id,
            device_id: e.device_id,
            recipient: &e.phone,
            body: template.render(
                &Recipient {
                    name: &e.name,
                    phone: &e.phone,
                },
                &mut rng,
            ),
        })
        .collect();
    let created = repo::sequences::insert_step_messages(
        &mut tx,
        group.tenant_id,
        group.campaign_id,
        group.image.as_deref(),
        due,
        &rows,
    )
    .await
    .context("failed to insert step messages")?;
    repo::messages::defer_capped_campaign_messages(&mut tx, group.tenant_id, group.campaign_id)
        .await
        .context("failed to defer capped leads' messages")?;
    let next = match (group.next_position, group.next_day_offset) {
        (Some(p), Some(offset)) => Some((
            p,
            shared::tz::resolve_days_after(zone, group.enrolled_on, offset, group.send_time)
                .map_err(invalid)?,
        )),
        _ => None,
    };
    let live_ids: Vec<i64> = live.iter().map(|e| e.id).collect();
    let moved = repo::sequences::advance_enrollments(&mut tx, group.tenant_id, &live_ids, next)
        .await
        .context("failed to advance enrollments")?;
    let out_ids: Vec<i64> = opted_out.iter().map(|e| e.id).collect();
    let cancelled = repo::sequences::cancel_enrollments(&mut tx, group.tenant_id, &out_ids)
        .await
        .context("failed to cancel opted-out enrollments")?;
    tx.commit().await.context("failed to commit step")?;
    report.step_rows_created += created;
    Ok(moved + cancelled)
}

/// Renders and inserts one campaign's rows, then marks it running; all in the caller's transaction.
async fn fan_out(
    tx: &mut sqlx::PgConnection,
    campaign: &repo::campaigns::Campaign,
) -> Result<u64, TriggerError> {
    use anyhow::Context;
    let invalid = |problem| TriggerError::InvalidCampaign {
        campaign: campaign.id,
        problem,
    };
    let started = std::time::Instant::now();
    let template = Template::parse(&campaign.template).map_err(invalid)?;
    let target: TargetStatus = campaign.target_status.parse().map_err(invalid)?;
    let recipients = repo::campaigns::select_campaign_recipients(
        tx,
        campaign.tenant_id,
        &campaign.niche,
        target,
    )
    .await
    .context("failed to select recipients")?;
    let selected = started.elapsed();
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let rows: Vec<RenderedMessage<'_>> = recipients
        .iter()
        .map(|r| RenderedMessage {
            lead_id: r.lead_id,
            device_id: r.device_id,
            recipient: &r.phone,
            body: template.render(
                &Recipient {
                    name: &r.name,
                    phone: &r.phone,
                },
                &mut rng,
            ),
        })
        .collect();
    let rendered = started.elapsed();
    let created = repo::campaigns::insert_campaign_messages(
        tx,
        campaign.tenant_id,
        campaign.id,
        campaign.image.as_deref(),
        &rows,
    )
    .await
    .context("failed to insert campaign messages")?;
    repo::messages::defer_capped_campaign_messages(tx, campaign.tenant_id, campaign.id)
        .await
        .context("failed to defer capped leads' messages")?;
    tracing::debug!(
        campaign_id = %campaign.id,
        rows = created,
        select_ms = selected.as_millis() as u64,
        render_ms = (rendered - selected).as_millis() as u64,
        insert_ms = (started.elapsed() - rendered).as_millis() as u64,
        "fan-out timing"
    );
    repo::campaigns::mark_campaign_running(tx, campaign.tenant_id, campaign.id)
        .await
        .context("failed to mark campaign running")?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_any_object_with_an_optional_override() {
        assert_eq!(parse_event(&serde_json::json!({}), 5).unwrap(), 5);
        assert_eq!(
            parse_event(&serde_json::json!({"source": "aws.scheduler"}), 5).unwrap(),
            5
        );
        assert_eq!(
            parse_event(&serde_json::json!({"max_campaigns": 2}), 5).unwrap(),
            2
        );
        assert_eq!(parse_event(&serde_json::Value::Null, 5).unwrap(), 5);
        assert!(parse_event(&serde_json::json!({"max_campaigns": "lots"}), 5).is_err());
        assert!(parse_event(&serde_json::json!({"max_campaigns": 0}), 5).is_err());
        assert!(parse_event(&serde_json::json!([1, 2]), 5).is_err());
    }
}
