//! `leads list`: a tenant's leads, filtered, one line each or as a CSV that `leads import`
//! reads back (its first six columns are the import's). Read-only, in keyset pages along
//! `leads_tenant_id`, so a tenant of any size lists in bounded memory.

use crate::listing::{csv_time, each_page, fit, print_tail, spreadsheet_text, Csv, Paging};
use crate::{printable, resolve_device, tenant_zone};
use anyhow::Result;
use shared::domain::{LeadStatus, Token};
use shared::repo;
use sqlx::PgPool;
use uuid::Uuid;

/// What `leads list` shows, and how.
#[derive(clap::Args)]
pub(crate) struct LeadListArgs {
    /// The tenant, by email or id.
    #[arg(long)]
    pub(crate) tenant: String,
    /// Only one device's leads, by label or id.
    #[arg(long)]
    device: Option<String>,
    /// Only leads whose niche set holds this exact token.
    #[arg(long)]
    niche: Option<String>,
    /// Only prospects or only customers.
    #[arg(long)]
    status: Option<LeadStatus>,
    /// `true`: only the leads that opted out; `false`: only those who can be messaged.
    #[arg(long)]
    opted_out: Option<bool>,
    #[command(flatten)]
    paging: Paging,
    /// Comma-separated values that `leads import` reads back (device,name,phone,niches,status,
    /// triggers), then lead_id, device_id, opted_out_at, last_contacted_at and created_at (UTC,
    /// RFC 3339); a name or label that a spreadsheet would run as a formula gets a leading `'`,
    /// which the import takes off again.
    #[arg(long)]
    csv: bool,
}

pub(crate) async fn run(pool: &PgPool, tenant: Uuid, args: LeadListArgs) -> Result<()> {
    let device = match &args.device {
        Some(d) => Some(resolve_device(pool, tenant, d).await?),
        None => None,
    };
    let niche = args.niche.as_deref().map(Token::parse).transpose()?;
    let (after, limit) = args.paging.resolve(args.csv)?;
    let filter = repo::leads::LeadFilter {
        device,
        niche,
        status: args.status,
        opted_out: args.opted_out,
    };
    let fetch = |after: i64, n: i64| {
        let filter = &filter;
        async move { Ok(repo::leads::list_leads(pool, tenant, filter, after, n).await?) }
    };
    let key = |l: &repo::leads::ListedLead| l.id;
    if args.csv {
        let mut w = Csv::stdout();
        w.row([
            "device",
            "name",
            "phone",
            "niches",
            "status",
            "triggers",
            "lead_id",
            "device_id",
            "opted_out_at",
            "last_contacted_at",
            "created_at",
        ])?;
        each_page(after, limit, fetch, key, |l| {
            w.row([
                spreadsheet_text(&l.device_label),
                spreadsheet_text(&l.name),
                l.phone.clone(),
                l.niches.join("|"),
                l.target_status.clone(),
                l.triggers.join("|"),
                l.id.to_string(),
                l.device_id.to_string(),
                csv_time(l.opted_out_at),
                csv_time(l.last_contacted_at),
                csv_time(Some(l.created_at)),
            ])
        })
        .await?;
        w.finish();
        return Ok(());
    }
    let zone = tenant_zone(pool, tenant).await?;
    out!("leads in the order they were added, times in {zone}");
    out!(
        "{:>9} {:<16} {:<16} {:<20} {:<9} {:<24} {:<16} opted out",
        "lead",
        "device",
        "number",
        "name",
        "status",
        "niches",
        "triggers"
    );
    let mut shown = 0u64;
    let (more, last) = each_page(after, limit, fetch, key, |l| {
        let device = if l.device_deleted {
            format!("{} (deleted)", printable(&l.device_label))
        } else {
            printable(&l.device_label)
        };
        let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
        out!(
            "{:>9} {:<16} {:<16} {:<20} {:<9} {:<24} {:<16} {}",
            l.id,
            fit(&device, 16),
            l.phone,
            fit(&dash(printable(&l.name)), 20),
            l.target_status,
            fit(&dash(l.niches.join("|")), 24),
            fit(&dash(l.triggers.join("|")), 16),
            l.opted_out_at
                .map(|t| t.with_timezone(&zone).format("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_else(|| "-".into())
        );
        shown += 1;
        Ok(())
    })
    .await?;
    print_tail(shown, more, last, "no lead matches", "lead");
    Ok(())
}
