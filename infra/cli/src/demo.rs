//! `wabcast demo`: seeds a demo tenant and watches a campaign drain, ending with a table per
//! device of what was sent, failed and skipped, and the gaps measured between its sends against
//! the configured delays.

use anyhow::{bail, Result};
use clap::Subcommand;
use shared::domain::{DelayRange, LeadStatus, PhoneE164, ProviderKind, TargetStatus, Token};
use shared::repo;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;
use uuid::Uuid;

#[derive(Subcommand)]
pub enum DemoCmd {
    /// Seed a demo tenant: simulator devices, leads across niches, a campaign due now. Prints JSON.
    Seed {
        #[arg(long, default_value = "demo@wabcast.local")]
        email: String,
        #[arg(long, default_value_t = 20)]
        devices: usize,
        #[arg(long, default_value_t = 2000)]
        leads: usize,
        #[arg(long, default_value_t = 0.5)]
        min_delay: f64,
        #[arg(long, default_value_t = 1.0)]
        max_delay: f64,
    },
    /// Show a progress bar until the campaign finishes, then the per-device table.
    Watch {
        /// The tenant, by email or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        campaign: Uuid,
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
}

const NICHES: [&str; 4] = ["cars", "property", "loans", "insurance"];

pub async fn run(pool: &PgPool, cmd: DemoCmd) -> Result<()> {
    match cmd {
        DemoCmd::Seed {
            email,
            devices,
            leads,
            min_delay,
            max_delay,
        } => {
            seed(
                pool,
                &email,
                devices,
                leads,
                DelayRange::new(min_delay, max_delay)?,
            )
            .await
        }
        DemoCmd::Watch {
            tenant,
            campaign,
            timeout_s,
        } => {
            let tenant = crate::resolve_tenant(pool, &tenant).await?;
            watch(pool, tenant, campaign, Duration::from_secs(timeout_s)).await
        }
    }
}

async fn seed(
    pool: &PgPool,
    email: &str,
    n_devices: usize,
    n_leads: usize,
    delay: DelayRange,
) -> Result<()> {
    if n_devices == 0 || n_leads == 0 {
        bail!("need at least one device and one lead");
    }
    let tenant =
        crate::create_tenant(pool, email, "demo-password", shared::tz::DEFAULT_TIME_ZONE).await?;
    let mut tx = pool.begin().await?;
    let mut device_ids = Vec::new();
    for i in 0..n_devices {
        let phone = PhoneE164::parse(&format!("+6011{:08}", i + 1))?;
        let id = repo::devices::insert_device(
            &mut tx,
            tenant,
            &repo::devices::NewDevice {
                label: &format!("phone-{:02}", i + 1),
                phone: Some(&phone),
                provider: ProviderKind::Simulator,
                delay: DelayRange::new(0.0, 0.0)?,
                daily_cap: None,
            },
        )
        .await?;
        device_ids.push(id);
    }
    let cars = Token::parse("cars")?;
    let leads: Vec<repo::leads::NewLead> = (0..n_leads)
        .map(|i| {
            // Niches vary within each device's leads, so every device gets its share.
            let k = i / n_devices;
            let mut niches = vec![Token::parse(NICHES[k % NICHES.len()])?];
            if k.is_multiple_of(3) && !niches.contains(&cars) {
                niches.push(cars.clone());
            }
            Ok(repo::leads::NewLead {
                device_id: device_ids[i % n_devices],
                name: if i % 7 == 0 {
                    String::new()
                } else {
                    format!("{} {}", FIRST[i % FIRST.len()], LAST[i % LAST.len()])
                },
                phone: PhoneE164::parse(&format!("+6012{:07}", i + 1))?,
                niches,
                status: if i % 5 == 0 {
                    LeadStatus::Customer
                } else {
                    LeadStatus::Prospect
                },
                triggers: vec![],
            })
        })
        .collect::<Result<_>>()?;
    repo::leads::upsert_leads(&mut tx, tenant, &leads).await?;
    tx.commit().await?;
    let image = crate::store_image(pool, tenant, &shared::media::tiny_png_data_url()).await?;
    let template = "{Hi|Hello|Hey} {first_name}! {Our|This week's} {promo|offer} on cars is live. Reply STOP to opt out.";
    shared::render::Template::parse(template)?;
    let mut tx = pool.begin().await?;
    let campaign = repo::campaigns::insert_campaign(
        &mut tx,
        tenant,
        &repo::campaigns::NewCampaign {
            title: "Demo: car promo",
            template,
            image: Some(&image),
            niche: &cars,
            target: TargetStatus::All,
            scheduled_at: chrono::Utc::now(),
            delay,
            wa_template: None,
        },
    )
    .await?;
    tx.commit().await?;
    let offline = device_ids[n_devices - 1];
    out!(
        "{}",
        serde_json::json!({ "tenant_id": tenant, "campaign_id": campaign, "offline_device_id": offline, "devices": n_devices, "leads": n_leads })
    );
    Ok(())
}

const FIRST: [&str; 8] = [
    "Aisyah", "Wei Ling", "Ravi", "Nurul", "Jason", "Siti", "Arjun", "Mei",
];
const LAST: [&str; 6] = ["Rahman", "Tan", "Kumar", "Lim", "Abdullah", "Wong"];

async fn watch(pool: &PgPool, tenant: Uuid, campaign: Uuid, timeout: Duration) -> Result<()> {
    let started = std::time::Instant::now();
    let mut err = std::io::stderr();
    loop {
        let c = repo::campaigns::get_campaign(pool, tenant, campaign).await?;
        let p = repo::campaigns::get_campaign_progress(pool, tenant, campaign).await?;
        let get = |s: &str| p.by_status.get(s).copied().unwrap_or(0);
        let done = get("sent") + get("failed") + get("skipped") + get("cancelled");
        let width = 40usize;
        let elapsed = started.elapsed().as_secs_f64();
        let line = if c.status == "scheduled" && p.total == 0 {
            // Before the trigger's first run (cargo lambda watch starts a function on its
            // first invocation) there is nothing to count yet.
            format!(
                "[{}] waiting for campaign-trigger to fan the campaign out | {elapsed:>4.0}s",
                ".".repeat(width)
            )
        } else {
            let filled = if p.total > 0 {
                (done as usize * width) / p.total as usize
            } else {
                0
            };
            format!(
                "[{}{}] {done}/{} done | sent {} failed {} skipped {} | pending {} queued {} sending {} | {elapsed:>4.0}s",
                "#".repeat(filled),
                ".".repeat(width - filled),
                p.total,
                get("sent"),
                get("failed"),
                get("skipped"),
                get("pending"),
                get("queued"),
                get("sending"),
            )
        };
        // padded so that a shorter line overwrites a longer one
        let _ = write!(err, "\r{line:<120} ");
        let _ = err.flush();
        if matches!(c.status.as_str(), "completed" | "cancelled") && p.total > 0 {
            let _ = writeln!(err);
            break;
        }
        if started.elapsed() > timeout {
            let _ = writeln!(err);
            bail!("campaign did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    out!(
        "campaign finished in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    print_device_table(pool, tenant, campaign).await
}

/// Sent/failed/skipped per device and the measured gaps between consecutive sends of each
/// device (from `sent_at`), against the configured delay range.
pub async fn print_device_table(pool: &PgPool, tenant: Uuid, campaign: Uuid) -> Result<()> {
    let c = repo::campaigns::get_campaign(pool, tenant, campaign).await?;
    let devices = repo::devices::list_devices(pool, tenant).await?;
    let rows = repo::messages::list_campaign_messages(pool, tenant, campaign).await?;
    #[derive(Default)]
    struct Line {
        sent: u64,
        failed: u64,
        skipped: u64,
        times: Vec<chrono::DateTime<chrono::Utc>>,
        reasons: BTreeMap<String, u64>,
    }
    let mut lines: BTreeMap<Uuid, Line> = BTreeMap::new();
    for r in &rows {
        let l = lines.entry(r.device_id).or_default();
        match r.status.as_str() {
            "sent" => {
                l.sent += 1;
                if let Some(t) = r.sent_at {
                    l.times.push(t);
                }
            }
            "failed" => l.failed += 1,
            "skipped" => l.skipped += 1,
            _ => {}
        }
        if r.status != "sent" {
            if let Some(reason) = &r.reason {
                *l.reasons.entry(reason.clone()).or_default() += 1;
            }
        }
    }
    out!(
        "{:<10} {:>5} {:>6} {:>7}  {:>7} {:>7} {:>7}  {:<12} reasons",
        "device",
        "sent",
        "failed",
        "skipped",
        "gap min",
        "median",
        "max",
        "configured"
    );
    for d in &devices {
        let Some(l) = lines.get_mut(&d.id) else {
            continue;
        };
        l.times.sort();
        let gaps: Vec<f64> = l
            .times
            .windows(2)
            .map(|w| (w[1] - w[0]).num_milliseconds() as f64 / 1000.0)
            .collect();
        let range = shared::pacing::effective_range(
            DelayRange {
                min_s: d.min_delay_s,
                max_s: d.max_delay_s,
            },
            DelayRange {
                min_s: c.min_delay_s,
                max_s: c.max_delay_s,
            },
        );
        let (a, b, m) = match shared::pacing::gap_summary(gaps) {
            Some((a, b, m)) => (format!("{a:.2}s"), format!("{b:.2}s"), format!("{m:.2}s")),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let reasons: Vec<String> = l.reasons.iter().map(|(r, n)| format!("{r}={n}")).collect();
        out!(
            "{:<10} {:>5} {:>6} {:>7}  {:>7} {:>7} {:>7}  {:<12} {}",
            d.label,
            l.sent,
            l.failed,
            l.skipped,
            a,
            b,
            m,
            format!("{:.1}-{:.1}s", range.min_s, range.max_s),
            reasons.join(" ")
        );
    }
    let p = repo::campaigns::get_campaign_progress(pool, tenant, campaign).await?;
    out!(
        "total {} | delivered {} | read {}",
        p.total,
        p.delivered,
        p.read
    );
    Ok(())
}
