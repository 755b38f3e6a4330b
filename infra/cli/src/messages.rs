//! `campaign messages` and `sequence messages`: who got a campaign's (or a step's) message, who
//! did not, and why, one line per recipient or as a CSV. Read-only: it writes no row, and reads
//! in pages along the (campaign, lead) unique index so that a campaign of any size lists in
//! bounded memory.

use crate::listing::{csv_time, each_page, fit, print_tail, spreadsheet_text, Csv, Paging};
use crate::{printable, resolve_device, tenant_zone};
use anyhow::{bail, Result};
use shared::domain::MessageStatus;
use shared::repo;
use sqlx::PgPool;
use uuid::Uuid;

/// What `campaign messages` and `sequence messages` list, and how.
#[derive(clap::Args)]
pub(crate) struct ListArgs {
    /// Only messages in this state: pending, queued, sending, sent, failed, skipped or
    /// cancelled.
    #[arg(long)]
    status: Option<MessageStatus>,
    /// Only messages that ended for this reason (e.g. `not_on_whatsapp`, `lead_opted_out`).
    #[arg(long)]
    reason: Option<String>,
    /// Only one device's messages, by label or id.
    #[arg(long)]
    device: Option<String>,
    #[command(flatten)]
    paging: Paging,
    /// Comma-separated values with a header row: ids, times in UTC (RFC 3339, to the
    /// microsecond), the provider's message id; text that a spreadsheet would run as a
    /// formula gets a leading `'`.
    #[arg(long)]
    csv: bool,
}

/// `campaign messages` and `sequence messages`: the campaign's (or step's) messages as `list`
/// asks, under `title`.
pub(crate) async fn list_messages(
    pool: &PgPool,
    tenant: Uuid,
    campaign: Uuid,
    title: &str,
    list: ListArgs,
) -> Result<()> {
    let device = match &list.device {
        Some(d) => Some(resolve_device(pool, tenant, d).await?),
        None => None,
    };
    if let Some(r) = &list.reason {
        let word = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_';
        if r.is_empty() || r.len() > 64 || !r.chars().all(word) {
            bail!(
                "--reason {r:?}: a reason is a word of a-z, 0-9 and _ (as `campaign progress` \
                 shows them)"
            );
        }
    }
    let (after, limit) = list.paging.resolve(list.csv)?;
    let recipients = Recipients {
        tenant,
        campaign,
        filter: repo::messages::RecipientFilter {
            status: list.status,
            reason: list.reason,
            device,
        },
        after,
        limit,
    };
    if list.csv {
        recipients.print_csv(pool).await
    } else {
        recipients.print_table(pool, title).await
    }
}

/// A listing of a campaign's messages (`campaign messages`), read in pages along the
/// (campaign, lead) index so that a campaign of any size prints in bounded memory.
struct Recipients {
    tenant: Uuid,
    campaign: Uuid,
    filter: repo::messages::RecipientFilter,
    after: i64,
    /// `None`: all.
    limit: Option<u64>,
}

impl Recipients {
    /// Calls `each` for every message listed, in lead order; returns whether more were left
    /// past the limit, and the last lead listed.
    async fn each(
        &self,
        pool: &PgPool,
        each: impl FnMut(&repo::messages::RecipientMessage) -> Result<()>,
    ) -> Result<(bool, i64)> {
        let fetch = |after: i64, n: i64| async move {
            Ok(repo::messages::list_campaign_recipients(
                pool,
                self.tenant,
                self.campaign,
                &self.filter,
                after,
                n,
            )
            .await?)
        };
        each_page(self.after, self.limit, fetch, |m| m.lead_id, each).await
    }

    async fn print_table(&self, pool: &PgPool, title: &str) -> Result<()> {
        let zone = tenant_zone(pool, self.tenant).await?;
        let local = |t: chrono::DateTime<chrono::Utc>| {
            t.with_timezone(&zone)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        };
        out!("{title}: messages in lead order, times in {zone}");
        out!(
            "{:>10} {:>9} {:<16} {:<20} {:<16} {:<9} {:<18} {:>5} {:<19} {:<9} last error",
            "message",
            "lead",
            "number",
            "name",
            "device",
            "status",
            "reason",
            "tries",
            "sent",
            "receipt"
        );
        let mut shown = 0u64;
        let (more, last) = self
            .each(pool, |m| {
                let receipt = if m.read_at.is_some() {
                    "read"
                } else if m.delivered_at.is_some() {
                    "delivered"
                } else {
                    "-"
                };
                let name = if m.lead_name.is_empty() {
                    "-".to_string()
                } else {
                    fit(&printable(&m.lead_name), 20)
                };
                out!(
                    "{:>10} {:>9} {:<16} {:<20} {:<16} {:<9} {:<18} {:>5} {:<19} {:<9} {}",
                    m.id,
                    m.lead_id,
                    m.recipient,
                    name,
                    fit(&printable(&m.device_label), 16),
                    m.status,
                    m.reason.as_deref().unwrap_or("-"),
                    m.attempts,
                    m.sent_at.map(local).unwrap_or_else(|| "-".into()),
                    receipt,
                    m.last_error.as_deref().map(printable).unwrap_or_default()
                );
                shown += 1;
                Ok(())
            })
            .await?;
        print_tail(shown, more, last, "no message matches", "lead");
        Ok(())
    }

    async fn print_csv(&self, pool: &PgPool) -> Result<()> {
        let mut w = Csv::stdout();
        w.row([
            "message_id",
            "lead_id",
            "phone",
            "name",
            "device_id",
            "device",
            "status",
            "reason",
            "attempts",
            "created_at",
            "queued_at",
            "sent_at",
            "delivered_at",
            "read_at",
            "finished_at",
            "provider_message_id",
            "last_error",
        ])?;
        let at = csv_time;
        self.each(pool, |m| {
            w.row([
                m.id.to_string(),
                m.lead_id.to_string(),
                m.recipient.clone(),
                spreadsheet_text(&m.lead_name),
                m.device_id.to_string(),
                spreadsheet_text(&m.device_label),
                m.status.clone(),
                m.reason.clone().unwrap_or_default(),
                m.attempts.to_string(),
                at(Some(m.created_at)),
                at(m.queued_at),
                at(m.sent_at),
                at(m.delivered_at),
                at(m.read_at),
                at(m.finished_at),
                m.provider_message_id.clone().unwrap_or_default(),
                spreadsheet_text(m.last_error.as_deref().unwrap_or_default()),
            ])
        })
        .await?;
        w.finish();
        Ok(())
    }
}
