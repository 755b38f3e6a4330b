//! campaign-trigger: every minute, claims due campaigns and materialises one `broadcast_messages`
//! row per matching lead, rendered for that lead, in one transaction with the campaign's
//! `scheduled → running`. Running it twice, or twice at once, creates nothing new: claims skip
//! locked campaigns and the database refuses a second row per (campaign, lead).

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
}

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
    Ok(report)
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
