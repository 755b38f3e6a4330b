//! The scale benchmark (`cargo run --release -p wabcast-tests --bin scale-bench`): does the
//! pipeline stay as cheap with ten million rows in `broadcast_messages` as with none? Issue #2
//! asks for "indexes that make the processor's claim and the progress counts cheap at 10 M rows".
//!
//! One database, one tenant, `--devices` simulator devices with 1,000 leads each (a fifth of
//! them in the measured niche), a device host in process. The same measurements run twice, in
//! the same command, so that each figure is reported as a ratio:
//! 1. on the empty table;
//! 2. after `--history` rows are added (default 10,000,000): finished campaigns of 10,000
//!    messages each (90 % sent with random provider ids, 4 % failed, 5 % skipped, 1 %
//!    cancelled), each with its host send record and its transitions, as a system that has run for
//!    months holds them; and `--paused` of them (default 1,000,000) still `pending`, due long
//!    ago, in paused campaigns of every lead, so that on every device they come *before* the
//!    measured campaign in the processor's claim order. Then `VACUUM ANALYZE` (a database at rest).
//!
//! Each run: a campaign over the niche (fan-out rate), the processor's ticks until it is all
//! queued (time per 1,000 queued), one worker playing the SQS event source until it is all
//! sent (time per batch of 10: claim, the host's two records, the outcome), then the reports
//! (campaign progress, the status view's device load, one message's history, a page of
//! `campaign messages` and its `--status failed`), a lead's opt-out
//! and an idle processor tick, each the median of 9 calls; last, one device's failed messages
//! retried (one call: it changes what is pending).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::domain::{LeadStatus, TargetStatus};
use shared::repo;
use sqlx::PgPool;
use std::future::Future;
use std::time::{Duration, Instant};
use uuid::Uuid;
use wabcast_tests::{
    fresh_database, quiet_sim, seed_campaign, seed_device, seed_leads, seed_tenant, status_counts,
    test_queue, CampaignSpec, Pipeline, TestHost,
};

const LEADS_PER_DEVICE: u64 = 1_000;
const HISTORY_CAMPAIGN: i64 = 10_000;

struct Args {
    devices: usize,
    history: i64,
    paused: i64,
}

fn args() -> Args {
    let mut a = Args {
        devices: 100,
        history: 10_000_000,
        paused: 1_000_000,
    };
    const USAGE: &str =
        "usage: scale-bench [--devices N] [--history N] [--paused N] (--paused at most --history)";
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        if argv[i] == "--help" || argv[i] == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v: Option<i64> = argv.get(i + 1).and_then(|s| s.parse().ok());
        match (argv[i].as_str(), v) {
            ("--devices", Some(n)) if n > 0 => a.devices = n as usize,
            ("--history", Some(n)) if n >= 0 => a.history = n,
            ("--paused", Some(n)) if n >= 0 => a.paused = n,
            (other, _) => {
                eprintln!("unknown or incomplete argument {other}\n{USAGE}");
                std::process::exit(2)
            }
        }
        i += 2;
    }
    if a.paused > a.history {
        eprintln!("--paused is a part of --history, so at most as large\n{USAGE}");
        std::process::exit(2)
    }
    a
}

/// One run's figures.
#[derive(Default)]
struct Figures {
    fan_out_rows_s: f64,
    claim_ms_per_1000: f64,
    worker_ms_per_batch: f64,
    progress_ms: f64,
    device_load_ms: f64,
    history_ms: f64,
    page_ms: f64,
    failed_page_ms: f64,
    idle_tick_ms: f64,
    opt_out_ms: f64,
    retry_ms: f64,
    retried: u64,
}

/// The median of 9 calls, in ms.
async fn median_ms<F, Fut>(mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut v = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        f().await;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v.sort_by(f64::total_cmp);
    v[4]
}

async fn run(p: &Pipeline, tenant: Uuid, expected: i64) -> Figures {
    let mut f = Figures::default();
    let campaign = seed_campaign(
        &p.pool,
        tenant,
        &CampaignSpec {
            niche: "cars",
            target: TargetStatus::All,
            template: "{Hi|Hello} {name}, our promo is live",
            ..Default::default()
        },
    )
    .await;
    let t = Instant::now();
    let fanned = p.trigger().await;
    f.fan_out_rows_s = expected as f64 / t.elapsed().as_secs_f64();
    assert_eq!(fanned.rows_created as i64, expected, "fan-out row count");

    let (mut queued, mut claiming) = (0u64, Duration::ZERO);
    loop {
        let t = Instant::now();
        let r = p.tick().await;
        claiming += t.elapsed();
        queued += r.queued;
        if r.queued == 0 {
            break;
        }
    }
    assert_eq!(queued as i64, expected, "every message queued once");
    f.claim_ms_per_1000 = claiming.as_secs_f64() * 1000.0 / (expected as f64 / 1000.0);

    let (mut batches, t) = (0u64, Instant::now());
    while p.deliver().await > 0 {
        batches += 1;
    }
    f.worker_ms_per_batch = t.elapsed().as_secs_f64() * 1000.0 / batches as f64;
    let counts = status_counts(&p.pool, tenant, campaign).await;
    assert_eq!(
        counts.get("sent").copied().unwrap_or(0),
        expected,
        "all sent: {counts:?}"
    );
    p.tick().await;

    f.progress_ms = median_ms(|| async {
        repo::campaigns::get_campaign_progress(&p.pool, tenant, campaign)
            .await
            .unwrap();
    })
    .await;
    f.device_load_ms = median_ms(|| async {
        repo::devices::list_device_load(&p.pool, Some(tenant))
            .await
            .unwrap();
    })
    .await;
    let message: i64 =
        sqlx::query_scalar("SELECT min(id) FROM broadcast_messages WHERE campaign_id = $1")
            .bind(campaign)
            .fetch_one(&p.pool)
            .await
            .unwrap();
    f.history_ms = median_ms(|| async {
        let h = repo::campaigns::list_message_transitions(&p.pool, tenant, message)
            .await
            .unwrap();
        assert_eq!(h.len(), 3, "pending → queued → sending → sent");
    })
    .await;
    // `campaign messages`: a page of 100 from the middle of the campaign, and its failed ones
    // (none: the filter passes over the whole campaign).
    let middle: i64 = sqlx::query_scalar(
        "SELECT lead_id FROM broadcast_messages WHERE campaign_id = $1
         ORDER BY lead_id OFFSET $2 LIMIT 1",
    )
    .bind(campaign)
    .bind(expected / 2)
    .fetch_one(&p.pool)
    .await
    .unwrap();
    f.page_ms = median_ms(|| async {
        let page = repo::messages::list_campaign_recipients(
            &p.pool,
            tenant,
            campaign,
            &repo::messages::RecipientFilter::default(),
            middle,
            100,
        )
        .await
        .unwrap();
        assert_eq!(page.len(), 100);
    })
    .await;
    f.failed_page_ms = median_ms(|| async {
        let failed = repo::messages::RecipientFilter {
            status: Some(shared::domain::MessageStatus::Failed),
            ..Default::default()
        };
        let page =
            repo::messages::list_campaign_recipients(&p.pool, tenant, campaign, &failed, 0, 100)
                .await
                .unwrap();
        assert!(page.is_empty());
    })
    .await;
    // A lead's "STOP" (the host's inbound path calls the same function), a different lead each
    // call: its unsent rows are skipped.
    let phones: Vec<String> = sqlx::query_scalar(
        "SELECT phone FROM leads WHERE tenant_id = $1 AND opted_out_at IS NULL
         ORDER BY id DESC LIMIT 9",
    )
    .bind(tenant)
    .fetch_all(&p.pool)
    .await
    .unwrap();
    let next = std::sync::atomic::AtomicUsize::new(0);
    f.opt_out_ms = median_ms(|| async {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let phone = shared::domain::PhoneE164::parse(&phones[i]).unwrap();
        let mut tx = p.pool.begin().await.unwrap();
        repo::leads::opt_out_lead(
            &mut tx,
            tenant,
            &phone,
            repo::leads::ConsentSource::Operator,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    f.idle_tick_ms = median_ms(|| async {
        let r = p.tick().await;
        assert_eq!(r.queued, 0, "nothing is due");
    })
    .await;
    // Last, since it changes what is pending: one device's failed messages retried (none
    // on the empty table; the history's on the big one), one call.
    let device: Uuid =
        sqlx::query_scalar("SELECT id FROM devices WHERE tenant_id = $1 ORDER BY label LIMIT 1")
            .bind(tenant)
            .fetch_one(&p.pool)
            .await
            .unwrap();
    let t = Instant::now();
    let mut tx = p.pool.begin().await.unwrap();
    f.retried = repo::campaigns::retry_failed_messages(
        &mut tx,
        tenant,
        repo::campaigns::RetryScope {
            campaign: None,
            device: Some(device),
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    f.retry_ms = t.elapsed().as_secs_f64() * 1000.0;
    f
}

/// Adds `history` rows to `broadcast_messages` in campaigns of 10,000, `paused` of them pending
/// in paused campaigns of every lead and the rest finished, with the host's send records and the
/// transitions such rows have. Returns (rows, transitions, host records).
async fn add_history(pool: &PgPool, tenant: Uuid, history: i64, paused: i64) -> (i64, i64, i64) {
    sqlx::raw_sql(
        "CREATE UNLOGGED TABLE scale_leads AS
           SELECT id, device_id, phone, name, (row_number() OVER (ORDER BY id) - 1)::int AS rn
           FROM leads;
         CREATE UNIQUE INDEX ON scale_leads (rn);
         ANALYZE scale_leads;",
    )
    .execute(pool)
    .await
    .unwrap();
    let leads: i64 = sqlx::query_scalar("SELECT count(*) FROM scale_leads")
        .fetch_one(pool)
        .await
        .unwrap();
    // A paused campaign takes every lead once (unique (campaign, lead)).
    let paused_campaigns = (paused + leads - 1) / leads;
    let finished_campaigns = (history - paused.min(history)) / HISTORY_CAMPAIGN;
    let mut ids = Vec::new();
    let mut tx = pool.begin().await.unwrap();
    for i in 0..paused_campaigns + finished_campaigns {
        let niche = shared::domain::Token::parse("cars").unwrap();
        let id = repo::campaigns::insert_campaign(
            &mut tx,
            tenant,
            &repo::campaigns::NewCampaign {
                title: &format!("history {i}"),
                template: "Hello {name}",
                image: None,
                niche: &niche,
                target: TargetStatus::All,
                scheduled_at: chrono::Utc::now() - chrono::Duration::days(90),
                delay: shared::domain::DelayRange::new(0.0, 0.0).unwrap(),
                wa_template: None,
            },
        )
        .await
        .unwrap();
        ids.push(id);
    }
    let (paused_ids, finished_ids) = ids.split_at(paused_campaigns as usize);
    // Set before the trigger runs again, so it never fans them out. The paused ones are
    // paused through the data layer once their rows are written, as a user pauses.
    sqlx::query(
        "UPDATE campaigns SET status = CASE WHEN id = ANY($1) THEN 'running' ELSE 'completed' END,
             started_at = scheduled_at, finished_at = CASE WHEN id = ANY($1) THEN NULL
                                                          ELSE scheduled_at + interval '1 day' END
         WHERE id = ANY($2)",
    )
    .bind(paused_ids)
    .bind(&ids)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // Paused: every lead, due long ago, so that each device's paused backlog comes before the
    // measured campaign in `bm_claim`'s order.
    for (k, c) in paused_ids.iter().enumerate() {
        let n = (paused - k as i64 * leads).min(leads);
        sqlx::query(
            "INSERT INTO broadcast_messages (tenant_id, device_id, lead_id, campaign_id, recipient,
                                             body, due_at, created_at)
             SELECT $1, l.device_id, l.id, $2, l.phone, 'Hello ' || l.name,
                    now() - interval '2 days', now() - interval '2 days'
             FROM scale_leads l WHERE l.rn < $3",
        )
        .bind(tenant)
        .bind(c)
        .bind(n as i32)
        .execute(pool)
        .await
        .unwrap();
    }
    for c in paused_ids {
        let mut tx = pool.begin().await.unwrap();
        repo::campaigns::change_campaign_status(
            &mut tx,
            tenant,
            *c,
            shared::domain::CampaignStatus::Paused,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    // Finished, 100 campaigns (a million rows) per statement.
    for (chunk_no, chunk) in finished_ids.chunks(100).enumerate() {
        let started = Instant::now();
        let ks: Vec<i32> = (0..chunk.len() as i32)
            .map(|k| k + chunk_no as i32 * 100)
            .collect();
        sqlx::query(
            "INSERT INTO broadcast_messages (tenant_id, device_id, lead_id, campaign_id, recipient,
                 body, status, reason, attempts, enqueue_count, due_at, gap_s, provider_message_id,
                 created_at, queued_at, sending_at, sent_at, delivered_at, read_at, finished_at)
             SELECT $1, l.device_id, l.id, c.id, l.phone, 'Hello ' || l.name, s.status, s.reason,
                    1, 1, t.at, 0,
                    CASE WHEN s.status = 'sent' THEN upper('SIM' || md5(c.k || '-' || i)) END,
                    t.at, t.at + interval '1 s', t.at + interval '2 s',
                    CASE WHEN s.status = 'sent' THEN t.at + interval '3 s' END,
                    CASE WHEN s.status = 'sent' AND s.h < 72 THEN t.at + interval '10 s' END,
                    CASE WHEN s.status = 'sent' AND s.h < 45 THEN t.at + interval '60 s' END,
                    t.at + interval '3 s'
             FROM unnest($2::uuid[], $3::int[]) AS c(id, k)
             CROSS JOIN generate_series(0, $4 - 1) AS i
             JOIN scale_leads l ON l.rn = (c.k * 7919 + i) % $5
             CROSS JOIN LATERAL (SELECT now() - make_interval(days => 3 + c.k % 87,
                                                              secs => i) AS at) t
             CROSS JOIN LATERAL (SELECT h,
                     CASE WHEN h < 90 THEN 'sent' WHEN h < 94 THEN 'failed'
                          WHEN h < 99 THEN 'skipped' ELSE 'cancelled' END AS status,
                     CASE WHEN h < 90 THEN 'accepted' WHEN h < 92 THEN 'attempts_exhausted'
                          WHEN h < 94 THEN 'provider_refused' WHEN h < 99 THEN 'not_on_whatsapp'
                          ELSE 'campaign_cancelled' END AS reason
                 FROM (SELECT ((i::bigint * 2654435761 + c.k) % 100)::int AS h) x) s",
        )
        .bind(tenant)
        .bind(chunk)
        .bind(&ks)
        .bind(HISTORY_CAMPAIGN as i32)
        .bind(leads as i32)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO host_sends (message_id, tenant_id, device_id, provider_message_id, state,
                                     error, host_id, created_at, updated_at)
             SELECT id, tenant_id, device_id,
                    COALESCE(provider_message_id, upper('SIM' || md5(id::text))),
                    CASE WHEN status = 'sent' THEN 'sent' ELSE 'failed' END,
                    CASE WHEN status = 'sent' THEN NULL ELSE reason END,
                    'history-host', sending_at, finished_at
             FROM broadcast_messages
             WHERE campaign_id = ANY($1) AND status IN ('sent', 'failed')",
        )
        .bind(chunk)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO message_transitions (tenant_id, message_id, at, from_status, to_status,
                                              reason)
             SELECT m.tenant_id, m.id, v.at, v.f, v.t, v.reason
             FROM broadcast_messages m
             CROSS JOIN LATERAL (VALUES
                 (m.queued_at, 'pending', 'queued', NULL),
                 (m.sending_at, 'queued', 'sending', NULL),
                 (m.finished_at, 'sending', m.status, m.reason)) AS v(at, f, t, reason)
             WHERE m.campaign_id = ANY($1) AND m.status IN ('sent', 'failed')
             UNION ALL
             SELECT m.tenant_id, m.id, m.finished_at, 'pending', m.status, m.reason
             FROM broadcast_messages m
             WHERE m.campaign_id = ANY($1) AND m.status IN ('skipped', 'cancelled')",
        )
        .bind(chunk)
        .execute(pool)
        .await
        .unwrap();
        eprintln!(
            "  history: {} of {} finished campaigns written ({:.1} s for this million)",
            (chunk_no * 100 + chunk.len()),
            finished_ids.len(),
            started.elapsed().as_secs_f64()
        );
    }
    sqlx::raw_sql("DROP TABLE scale_leads")
        .execute(pool)
        .await
        .unwrap();
    let count = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    (
        count("SELECT count(*) FROM broadcast_messages").await,
        count("SELECT count(*) FROM message_transitions").await,
        count("SELECT count(*) FROM host_sends").await,
    )
}

/// Rows of `broadcast_messages` read by sequential scans so far (every backend's, parallel
/// workers' included), after waiting for the backends' statistics to be flushed.
async fn seq_rows_read(pool: &PgPool) -> i64 {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query_scalar(
        "SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'broadcast_messages'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn size_mb(pool: &PgPool) -> f64 {
    let bytes: i64 = sqlx::query_scalar(
        "SELECT sum(pg_total_relation_size(c))::bigint
         FROM unnest(ARRAY['broadcast_messages', 'host_sends', 'message_transitions']::regclass[]) c",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    bytes as f64 / 1_048_576.0
}

#[tokio::main]
async fn main() {
    let a = args();
    let base = wabcast_tests::database_url();
    let (_, pool) = fresh_database(&base, "wabcast_bench_scale").await;
    let tenant = seed_tenant(&pool, "scale@bench.local").await;
    for d in 0..a.devices {
        let device = seed_device(&pool, tenant, &format!("scale-{d:04}"), 0.0, 0.0).await;
        let base = d as u64 * LEADS_PER_DEVICE;
        let cars = LEADS_PER_DEVICE / 5;
        seed_leads(
            &pool,
            tenant,
            device,
            base,
            cars,
            "cars,boats",
            LeadStatus::Prospect,
        )
        .await;
        seed_leads(
            &pool,
            tenant,
            device,
            base + cars,
            LEADS_PER_DEVICE - cars,
            "boats",
            LeadStatus::Prospect,
        )
        .await;
    }
    sqlx::raw_sql("ANALYZE").execute(&pool).await.unwrap();
    let expected = (a.devices as u64 * LEADS_PER_DEVICE / 5) as i64;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    println!(
        "scale: {} devices, {} leads; each run a campaign of {} messages (one worker, serial)",
        a.devices,
        a.devices as u64 * LEADS_PER_DEVICE,
        expected
    );

    let empty = run(&p, tenant, expected).await;
    let empty_mb = size_mb(&pool).await;

    let t = Instant::now();
    let (rows, transitions, host_rows) = add_history(&pool, tenant, a.history, a.paused).await;
    let seeded_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    sqlx::raw_sql("VACUUM ANALYZE")
        .execute(&pool)
        .await
        .unwrap();
    println!(
        "history: {rows} message rows ({} pending in paused campaigns, due before the run's), \
         {transitions} transitions, {host_rows} host records, {:.0} MB with indexes; \
         written in {seeded_s:.0} s, VACUUM ANALYZE {:.0} s",
        a.paused,
        size_mb(&pool).await,
        t.elapsed().as_secs_f64()
    );
    let scanned_before = seq_rows_read(&pool).await;
    let full = run(&p, tenant, expected).await;
    let scanned = seq_rows_read(&pool).await - scanned_before;

    println!(
        "{:<52} {:>12} {:>12} {:>8}",
        "figure",
        "empty",
        format!("{:.1}M rows", rows as f64 / 1e6),
        "ratio"
    );
    let line = |name: &str, e: f64, f: f64| {
        println!("{name:<52} {e:>12.2} {f:>12.2} {:>8.2}", f / e);
    };
    line(
        "fan-out (rows/s)",
        empty.fan_out_rows_s,
        full.fan_out_rows_s,
    );
    line(
        "processor ticks (ms per 1,000 queued)",
        empty.claim_ms_per_1000,
        full.claim_ms_per_1000,
    );
    line(
        "worker batch of 10, host included (ms)",
        empty.worker_ms_per_batch,
        full.worker_ms_per_batch,
    );
    line(
        "idle processor tick (ms, median of 9)",
        empty.idle_tick_ms,
        full.idle_tick_ms,
    );
    line(
        "campaign progress (ms, median of 9)",
        empty.progress_ms,
        full.progress_ms,
    );
    line(
        "status: device load (ms, median of 9)",
        empty.device_load_ms,
        full.device_load_ms,
    );
    line(
        "one message's history (ms, median of 9)",
        empty.history_ms,
        full.history_ms,
    );
    line(
        "campaign messages: a page of 100 (ms, median of 9)",
        empty.page_ms,
        full.page_ms,
    );
    line(
        "campaign messages --status failed, none (ms, median of 9)",
        empty.failed_page_ms,
        full.failed_page_ms,
    );
    line(
        "a lead's opt-out (ms, median of 9)",
        empty.opt_out_ms,
        full.opt_out_ms,
    );
    println!(
        "{:<52} {:>12.2} {:>12.2}   ({} and {} rows retried)",
        "one device's retry-failed (ms, one call)",
        empty.retry_ms,
        full.retry_ms,
        empty.retried,
        full.retried
    );
    println!("tables with indexes (MB): empty {empty_mb:.0}");
    // Any statement of the run that read the table whole shows here as millions.
    println!(
        "rows of broadcast_messages read by sequential scans during the {:.1}M-row run: {scanned}",
        rows as f64 / 1e6
    );
    // The largest reports the history holds, without a baseline: a paused campaign of every
    // lead, and a finished campaign of 10,000.
    for (what, status) in [("paused", "paused"), ("finished", "completed")] {
        let c: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM campaigns WHERE status = $1 AND title LIKE 'history %' LIMIT 1",
        )
        .bind(status)
        .fetch_optional(&pool)
        .await
        .unwrap();
        if let Some(c) = c {
            let total = repo::campaigns::get_campaign_progress(&pool, tenant, c)
                .await
                .unwrap()
                .total;
            let ms = median_ms(|| async {
                repo::campaigns::get_campaign_progress(&pool, tenant, c)
                    .await
                    .unwrap();
            })
            .await;
            println!(
                "progress of a {what} history campaign of {total} rows: {ms:.2} ms (median of 9)"
            );
            let failed = repo::messages::RecipientFilter {
                status: Some(shared::domain::MessageStatus::Failed),
                ..Default::default()
            };
            for (which, filter) in [
                ("a page of 100", Default::default()),
                ("failed, 100", failed),
            ] {
                let ms = median_ms(|| async {
                    repo::messages::list_campaign_recipients(&pool, tenant, c, &filter, 0, 100)
                        .await
                        .unwrap();
                })
                .await;
                println!("  its messages, {which}: {ms:.2} ms (median of 9)");
            }
        }
    }
    // A campaign whose every lead was contacted within the tenant's frequency cap: its rows
    // are due but none may go, on every device, for as long as the cap lasts.
    sqlx::query("UPDATE tenants SET lead_min_gap_s = 86400 WHERE id = $1")
        .bind(tenant)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE leads SET last_contacted_at = now() WHERE tenant_id = $1")
        .bind(tenant)
        .execute(&pool)
        .await
        .unwrap();
    seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let capped = p.trigger().await.rows_created;
    sqlx::raw_sql("ANALYZE").execute(&pool).await.unwrap();
    let ms = median_ms(|| async {
        let r = p.tick().await;
        assert_eq!(r.queued, 0, "every lead is inside the cap");
    })
    .await;
    println!(
        "idle processor tick with {capped} due rows held by the per-lead frequency cap: {ms:.2} ms (median of 9)"
    );
    host.running.server.abort();
    host.running.leases.abort();
}
