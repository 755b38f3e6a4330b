//! The pipeline benchmark (`cargo run --release -p wabcast-tests --bin pipeline-bench`).
//!
//! In one run, on a fresh database:
//! 1. the floor: the bare PostgreSQL writes a message needs (insert, then two status updates,
//!    batched by 1,000) into a copy of `broadcast_messages` with the same indexes; and, for
//!    comparison, the same writes with the last update in batches of 10, the size of an SQS
//!    batch, which is what the worker's outcome update gets;
//! 2. in process: a campaign of `--messages` over `--devices` simulator devices with zero delays
//!    and zero latency, the handlers called directly (trigger, processor loop, worker pollers
//!    playing the SQS event source on the Redis queue), the device host as its own process over
//!    HTTP. Prints end-to-end messages/s (trigger start to all `sent`), the fan-out rate, and the
//!    ratio to the floor;
//! 3. the processor's drain latency: messages falling due at random moments over 10 s on idle
//!    devices, latency = queued_at − due_at with the default 1 s tick (p50, p99);
//! 4. through `cargo lambda watch` and the local emulator (`--watch-messages`, 0 to skip);
//!
//! 5. sequences: `--messages` leads enrolled by their trigger and their first step materialised
//!    in one trigger run;
//! 6. the worker's cost per message: one poller alone (as one Lambda instance), records per batch
//!    and the handler's duration, which the README's cost model uses;
//! 7. pacing at scale (`--paced-devices`, 3,000; 0 skips): every device with a short paced
//!    backlog (1–3 s gaps), one run per claim size in `--paced-claims` (`CLAIM_MAX_DEVICES`;
//!    1000,300,100): the rate, how late ready devices are claimed, whether the real gaps between
//!    a device's sends stay within the range, the processor's slowest pass. With
//!    `--paced-hosts N` the devices are shared among N device hosts (`HOST_MAX_DEVICES`), and
//!    with `--paced-kill` one more host stands by and the first is killed (SIGKILL, no goodbye)
//!    once a third of the messages are sent: the standby takes its devices over after their
//!    lease, and the run shows what that costs and that nothing was sent twice;
//! 8. the processor's enqueue on SQS: one claim of 1,000 devices sent in one lane and in the
//!    default lanes, against a stub of SQS that answers each call after 10 ms.
//!
//! It also prints the peak RSS of the host and of the functions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::domain::{DelayRange, LeadStatus, PhoneE164, ProviderKind, TargetStatus, Token};
use shared::queue::{Queue, RedisQueue, RedisQueueConfig};
use shared::repo;
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;
use wabcast_tests::process::{free_port, spawn, wait_for_port, Group};

struct Args {
    messages: usize,
    devices: usize,
    pollers: usize,
    watch_messages: usize,
    /// Messages one (zero-gap) device may take per claim in the 100k run.
    burst: i64,
    /// Messages one claim takes in all (shared among its ready devices) in the 100k run.
    claim_messages: i64,
    /// Devices of the paced run (0 skips it).
    paced_devices: usize,
    /// The `CLAIM_MAX_DEVICES` values the paced run compares, one run each.
    paced_claims: Vec<i64>,
    /// Device hosts sharing the paced run's devices.
    paced_hosts: usize,
    /// Kill the first paced host a third of the way through (a standby host takes over).
    paced_kill: bool,
    /// The paced hosts' simulated send latency (`SIM_LATENCY_MS`), so that a killed host dies
    /// with requests in flight, as a web session's typing pause makes them.
    paced_latency_ms: u64,
}

fn args() -> Args {
    let mut a = Args {
        messages: 100_000,
        devices: 100,
        pollers: 16,
        watch_messages: 2_000,
        // the production defaults (`CLAIM_PER_DEVICE`, `CLAIM_MAX_MESSAGES`)
        burst: 50,
        claim_messages: 5_000,
        paced_devices: 3_000,
        paced_claims: vec![1_000, 300, 100],
        paced_hosts: 1,
        paced_kill: false,
        paced_latency_ms: 0,
    };
    const USAGE: &str = "usage: pipeline-bench [--messages N] [--devices N] [--pollers N] [--watch-messages N] [--burst N] [--claim-messages N] [--paced-devices N] [--paced-claims N,N,…] [--paced-hosts N] [--paced-kill] [--paced-latency-ms N]";
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        if argv[i] == "--help" || argv[i] == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if argv[i] == "--paced-claims" {
            let list: Option<Vec<i64>> = argv
                .get(i + 1)
                .and_then(|l| l.split(',').map(|n| n.trim().parse().ok()).collect());
            a.paced_claims = list.unwrap_or_else(|| bad_argument("--paced-claims", USAGE));
            i += 2;
            continue;
        }
        if argv[i] == "--paced-kill" {
            a.paced_kill = true;
            i += 1;
            continue;
        }
        let v = argv.get(i + 1).and_then(|s| s.parse().ok());
        match (argv[i].as_str(), v) {
            ("--messages", Some(n)) => a.messages = n,
            ("--devices", Some(n)) => a.devices = n,
            ("--pollers", Some(n)) => a.pollers = n,
            ("--watch-messages", Some(n)) => a.watch_messages = n,
            ("--burst", Some(n)) => a.burst = n as i64,
            ("--claim-messages", Some(n)) => a.claim_messages = n as i64,
            ("--paced-devices", Some(n)) => a.paced_devices = n,
            ("--paced-hosts", Some(n)) if n > 0 => a.paced_hosts = n,
            ("--paced-latency-ms", Some(n)) => a.paced_latency_ms = n as u64,
            (other, _) => bad_argument(other, USAGE),
        }
        i += 2;
    }
    a
}

/// Checks, before minutes of measuring, that what the later phases start is there: the release
/// device host (every phase), and for the `cargo lambda watch` phase the release local emulator
/// and cargo-lambda. Exits with status 2 and the command that provides what is missing.
fn preflight(bin: &Path, watch: bool) {
    let mut missing = Vec::new();
    let mut wanted = vec!["device-host"];
    if watch {
        wanted.push("local-emulator");
    }
    for name in wanted {
        if !bin.join(name).is_file() {
            missing.push(format!(
                "{} (cargo build --release --workspace --bins)",
                bin.join(name).display()
            ));
        }
    }
    if watch
        && !Command::new("cargo")
            .args(["lambda", "--version"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    {
        missing.push("cargo-lambda on PATH (PATH=\"$(infra/tools.sh):$PATH\")".to_string());
    }
    if !missing.is_empty() {
        eprintln!(
            "pipeline-bench needs, and did not find:\n  {}\n(--watch-messages 0 skips the cargo lambda watch phase)",
            missing.join("\n  ")
        );
        std::process::exit(2)
    }
}

/// Says which argument is wrong and how to call the benchmark, and exits with status 2.
fn bad_argument(arg: &str, usage: &str) -> ! {
    eprintln!("unknown or incomplete argument {arg}\n{usage}");
    std::process::exit(2)
}

/// Peak resident set (VmHWM) of a process, in MB.
fn peak_rss_mb(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The floor's rate: inserts and the `queued` update in batches of 1,000, the `sent` update in
/// batches of `sent_batch`, committed without waiting for the WAL flush as the worker commits
/// its outcomes (with a flush per commit, batches of 10 would measure the disk, not the writes).
async fn floor(pool: &PgPool, n: usize, sent_batch: usize) -> f64 {
    sqlx::query("DROP TABLE IF EXISTS floor_messages")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE floor_messages (LIKE broadcast_messages INCLUDING DEFAULTS INCLUDING INDEXES INCLUDING CONSTRAINTS)")
        .execute(pool)
        .await
        .unwrap();
    let tenant = Uuid::new_v4();
    let campaign = Uuid::new_v4();
    let devices: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let started = Instant::now();
    for chunk_start in (0..n).step_by(1000) {
        let ids: Vec<i64> = (chunk_start..(chunk_start + 1000).min(n))
            .map(|i| i as i64)
            .collect();
        let leads: Vec<i64> = ids.clone();
        let devs: Vec<Uuid> = ids.iter().map(|i| devices[*i as usize % 100]).collect();
        let phones: Vec<String> = ids.iter().map(|i| format!("+6012{:07}", i)).collect();
        let bodies: Vec<String> = ids
            .iter()
            .map(|i| format!("Hello Lead {i}, our promo is live"))
            .collect();
        let mut tx = pool.begin().await.unwrap();
        let inserted: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO floor_messages (id, tenant_id, campaign_id, lead_id, device_id, recipient, body)
             OVERRIDING SYSTEM VALUE
             SELECT i, $1, $2, l, d, r, b FROM unnest($3::bigint[], $4::bigint[], $5::uuid[], $6::text[], $7::text[]) AS u(i, l, d, r, b)
             RETURNING id",
        )
        .bind(tenant)
        .bind(campaign)
        .bind(&ids)
        .bind(&leads)
        .bind(&devs)
        .bind(&phones)
        .bind(&bodies)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        for (status, batch) in [("queued", 1000), ("sent", sent_batch)] {
            for inserted in inserted.chunks(batch) {
                let mut tx = pool.begin().await.unwrap();
                if status == "sent" {
                    // committed as the worker commits its outcome (see message_worker::Deps)
                    repo::relax_durability(&mut tx).await.unwrap();
                }
                sqlx::query(
                    "UPDATE floor_messages SET status = $2,
                         reason = CASE WHEN $2 = 'sent' THEN 'accepted' END,
                         finished_at = CASE WHEN $2 = 'sent' THEN now() END,
                         queued_at = COALESCE(queued_at, now()), sent_at = CASE WHEN $2 = 'sent' THEN now() END
                     WHERE id = ANY($1)",
                )
                // Planned per call: a generic plan made while the table held its first rows
                // scans the whole table per batch later (seen: batches of 10 at 2,500 msg/s in
                // one run, 10,000 in the next).
                .persistent(false)
                .bind(inserted)
                .bind(status)
                .execute(&mut *tx)
                .await
                .unwrap();
                tx.commit().await.unwrap();
            }
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn seed(
    pool: &PgPool,
    devices: usize,
    messages: usize,
    niche: &str,
    min_s: f64,
    max_s: f64,
) -> (Uuid, Uuid, Vec<Uuid>) {
    let mut tx = pool.begin().await.unwrap();
    let tenant = repo::tenants::insert_tenant(
        &mut tx,
        &format!("{niche}@bench.local"),
        "x",
        "Asia/Kuala_Lumpur",
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..devices {
        let id = repo::devices::insert_device(
            &mut tx,
            tenant,
            &repo::devices::NewDevice {
                label: &format!("bench-{i:03}"),
                phone: None,
                provider: ProviderKind::Simulator,
                delay: DelayRange::new(0.0, 0.0).unwrap(),
                daily_cap: None,
            },
        )
        .await
        .unwrap();
        repo::devices::set_device_status(
            &mut tx,
            None,
            tenant,
            id,
            shared::domain::DeviceStatus::Online,
            None,
        )
        .await
        .unwrap();
        ids.push(id);
    }
    let niche_t = Token::parse(niche).unwrap();
    let leads: Vec<repo::leads::NewLead> = (0..messages)
        .map(|i| repo::leads::NewLead {
            device_id: ids[i % devices],
            name: format!("Lead {i}"),
            phone: PhoneE164::parse(&format!("+6013{:08}", i)).unwrap(),
            niches: vec![niche_t.clone()],
            status: LeadStatus::Prospect,
            triggers: vec![],
        })
        .collect();
    repo::leads::upsert_leads(&mut tx, tenant, &leads)
        .await
        .unwrap();
    let campaign = repo::campaigns::insert_campaign(
        &mut tx,
        tenant,
        &repo::campaigns::NewCampaign {
            title: "bench",
            template: "{Hi|Hello|Hey} {name}, {our|this week's} promo is live!",
            image: None,
            niche: &niche_t,
            target: TargetStatus::All,
            scheduled_at: chrono::Utc::now(),
            delay: DelayRange::new(min_s, max_s).unwrap(),
            wa_template: None,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    (tenant, campaign, ids)
}

/// Waits until the host owns every device of the tenant, and a moment for their sessions. The
/// host takes new devices every third of its lease (10 s); before that, a send to one takes the
/// first-contact path (the device read, its lease taken, its session started). Without this
/// wait the worker's cost figure over 3,000 devices, where each of the 2,000 records goes to a
/// device of its own, measured that path: 18.3 ms per batch of 10 against 3.9–4.5 at 100.
async fn wait_owned(pool: &PgPool, tenant: Uuid) {
    let started = Instant::now();
    loop {
        let unowned: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM devices d WHERE d.tenant_id = $1
             AND NOT EXISTS (SELECT 1 FROM device_leases l WHERE l.device_id = d.id)",
        )
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap();
        if unowned == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{unowned} devices still without a host after 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Whether any row of the campaign is still on its way (pending, queued or sending).
async fn unfinished(pool: &PgPool, campaign: Uuid) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM broadcast_messages WHERE campaign_id = $1
                        AND status IN ('pending', 'queued', 'sending'))",
    )
    .bind(campaign)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn count_status(pool: &PgPool, campaign: Uuid, status: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM broadcast_messages WHERE campaign_id = $1 AND status = $2",
    )
    .bind(campaign)
    .bind(status)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A Redis queue of its own (a fresh key prefix) with the production settings.
async fn redis_queue(url: &str, label: &str) -> Arc<RedisQueue> {
    Arc::new(
        RedisQueue::connect(RedisQueueConfig {
            url: url.to_string(),
            prefix: format!("{label}:{}", Uuid::new_v4().simple()),
            max_receives: 5,
            dedup_window: Duration::from_secs(300),
        })
        .await
        .unwrap(),
    )
}

/// The device host as its own process (so its RSS is its own), receipts off.
async fn spawn_host(bin: &Path, db_url: &str, dir: &Path) -> (Group, String) {
    spawn_host_with(bin, db_url, dir, 0, 32, &dir.join("sim-sends.jsonl"), 0).await
}

/// A device host that takes at most `max_devices` devices (0: no limit), opens at most
/// `connections` PostgreSQL connections and takes `latency_ms` per simulated send.
async fn spawn_host_with(
    bin: &Path,
    db_url: &str,
    dir: &Path,
    max_devices: usize,
    connections: usize,
    sim_log: &Path,
    latency_ms: u64,
) -> (Group, String) {
    let port = free_port();
    let host = spawn(
        Command::new(bin.join("device-host"))
            .env("DATABASE_URL", db_url)
            .env("HOST_TOKEN", TOKEN)
            .env("HOST_BIND", format!("127.0.0.1:{port}"))
            .env("HOST_DATA_DIR", dir)
            // unique per host (the default is the machine's name, shared by every host here)
            .env("HOST_ID", format!("bench-{port}"))
            .env("HOST_MAX_DEVICES", max_devices.to_string())
            .env("SIM_LOG_PATH", sim_log)
            .env("SIM_RECEIPTS", "false")
            .env("SIM_LATENCY_MS", latency_ms.to_string())
            .env("DB_MAX_CONNECTIONS", connections.to_string())
            .env("RUST_LOG", "warn"),
        &dir.with_extension("log"),
    );
    wait_for_port(port, Duration::from_secs(30)).await;
    (host, format!("http://127.0.0.1:{port}"))
}

const TOKEN: &str = "bench-token";

fn worker_deps(pool: &PgPool, host_url: &str, token: &str) -> Arc<message_worker::Deps> {
    Arc::new(message_worker::Deps {
        pool: pool.clone(),
        host: shared::host_api::HostClient::new(
            host_url,
            shared::config::Secret::new(token),
            Duration::from_secs(30),
        )
        .unwrap(),
        settings: message_worker::Settings::default(),
    })
}

async fn run_trigger(pool: &PgPool) -> campaign_trigger::TriggerReport {
    let deps = campaign_trigger::Deps {
        pool: pool.clone(),
        max_campaigns: 10,
    };
    campaign_trigger::handle(serde_json::json!({}), &deps)
        .await
        .unwrap()
}

/// The processor's own loop in a task (a deadline beyond the benchmark) until the flag is set.
fn spawn_processor(
    deps: Arc<broadcast_processor::Deps>,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<broadcast_processor::Report>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(3600);
            broadcast_processor::run(&deps, &deps.settings, deadline, &stop)
                .await
                .unwrap()
        })
    };
    (stop, task)
}

/// Worker pollers playing the SQS event source until `stop`.
fn start_pollers(
    n: usize,
    queue: Arc<RedisQueue>,
    deps: Arc<message_worker::Deps>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (queue, deps, stop) = (queue.clone(), deps.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if wabcast_tests::deliver_once(queue.as_ref(), &deps).await == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY-free: set before any thread reads the environment.
        std::env::set_var("RUST_LOG", "warn");
    }
    shared::telemetry::init();
    wabcast_tests::process::kill_groups_on_signal();
    let a = args();
    let base = wabcast_tests::database_url();
    let redis = wabcast_tests::redis_url();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    let bin = root.join("target/release");
    preflight(&bin, a.watch_messages > 0);
    let work = tempfile::tempdir().unwrap();
    println!(
        "wabcast pipeline benchmark: {} messages over {} devices, {} worker pollers, claims of up to {} messages ({} per device), {} cores",
        a.messages,
        a.devices,
        a.pollers,
        a.claim_messages,
        a.burst,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let (_, floor_pool) = wabcast_tests::fresh_database(&base, "wabcast_bench_floor").await;
    let floor_rate = floor(&floor_pool, a.messages, 1000).await;
    println!("floor (insert + 2 status updates, batches of 1,000): {floor_rate:>10.0} messages/s");
    let floor10_rate = floor(&floor_pool, a.messages, 10).await;
    floor_pool.close().await;
    println!(
        "floor, the sent update in batches of 10 (SQS's):     {floor10_rate:>10.0} messages/s"
    );

    // Sequences: 100,000 leads enrolled by their trigger and their first step materialised in
    // one trigger run (issue: enrollment must not be a bottleneck).
    {
        let (_, seq_pool) = wabcast_tests::fresh_database(&base, "wabcast_bench_seq").await;
        let (tenant, campaign, _) = seed(&seq_pool, a.devices, a.messages, "seq", 0.0, 0.0).await;
        let mut tx = seq_pool.begin().await.unwrap();
        repo::campaigns::change_campaign_status(
            &mut tx,
            tenant,
            campaign,
            shared::domain::CampaignStatus::Cancelled,
        )
        .await
        .unwrap();
        sqlx::query("UPDATE leads SET triggers = ARRAY['cold'] WHERE tenant_id = $1")
            .bind(tenant)
            .execute(&mut *tx)
            .await
            .unwrap();
        let niche = Token::parse("seq").unwrap();
        let trigger = Token::parse("cold").unwrap();
        let next = Token::parse("warm").unwrap();
        let steps = [
            repo::sequences::NewStep {
                day_offset: 0,
                template: "{Hi|Hello} {name}, welcome!",
                image: None,
            },
            repo::sequences::NewStep {
                day_offset: 1,
                template: "Day two, {name}",
                image: None,
            },
            repo::sequences::NewStep {
                day_offset: 3,
                template: "Last call, {name}",
                image: None,
            },
        ];
        let seq = repo::sequences::insert_sequence(
            &mut tx,
            tenant,
            &repo::sequences::NewSequence {
                name: "bench",
                niche: &niche,
                target: TargetStatus::All,
                trigger: &trigger,
                send_time: chrono::NaiveTime::from_hms_opt(0, 0, 0).unwrap(),
                delay: DelayRange::new(0.0, 0.0).unwrap(),
                next_trigger: Some(&next),
                steps: &steps,
                stop_on_reply: false,
            },
        )
        .await
        .unwrap();
        repo::sequences::change_sequence_status(
            &mut tx,
            tenant,
            seq,
            shared::domain::SequenceStatus::Active,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let t = Instant::now();
        let r = run_trigger(&seq_pool).await;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "sequence enrollment (one trigger run): {} leads enrolled, {} first-step rows in {:.2}s ({:.0} leads/s)",
            r.leads_enrolled,
            r.step_rows_created,
            secs,
            r.leads_enrolled as f64 / secs
        );
        seq_pool.close().await;
    }

    let (db_url, pool) = wabcast_tests::fresh_database(&base, "wabcast_bench").await;
    if std::env::var("BENCH_WITHOUT_TRANSITION_LOG").is_ok() {
        // Diagnostics only: what the transition log costs.
        sqlx::query(
            "ALTER TABLE broadcast_messages DISABLE TRIGGER broadcast_messages_transitions",
        )
        .execute(&pool)
        .await
        .unwrap();
        println!("(transition log disabled)");
    }
    let (tenant, campaign, _) = seed(&pool, a.devices, a.messages, "bench", 0.0, 0.0).await;
    if std::env::var("BENCH_WITHOUT_STATISTICS").is_err() {
        // Statistics as a live database at rest has them: autovacuum analyzed the tables while
        // no message was pending, and 100,000 new rows in a big table will not make it analyze
        // again before they are sent. (Without statistics the planner guesses instead; both
        // states must give good plans, `BENCH_WITHOUT_STATISTICS=1` runs the other one.)
        sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    } else {
        println!("(no statistics)");
    }
    // The worker's pool as in production (see message_worker::Deps::pool).
    let relaxed = shared::db::connect_with(&db_url, 40, shared::db::Durability::Relaxed)
        .await
        .unwrap();
    let (host, host_url) = spawn_host(&bin, &db_url, &work.path().join("host")).await;
    let token = TOKEN;
    let queue = redis_queue(&redis, "bench").await;

    // Trigger, processor loop, worker pollers.
    let started = Instant::now();
    let trig = run_trigger(&pool).await;
    let fanout_s = started.elapsed().as_secs_f64();
    let processor = Arc::new(broadcast_processor::Deps {
        pool: pool.clone(),
        queue: queue.clone() as Arc<dyn Queue>,
        settings: broadcast_processor::Settings {
            run_for: Duration::from_secs(3600),
            per_device_burst: a.burst,
            max_messages_per_claim: a.claim_messages,
            max_devices_per_claim: 1000,
            ..Default::default()
        },
    });
    let (stop, proc_task) = spawn_processor(processor.clone());
    let poll_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pollers = start_pollers(
        a.pollers,
        queue.clone(),
        worker_deps(&relaxed, &host_url, token),
        poll_stop.clone(),
    );
    // Polled with an index probe, not a count: counting 100,000 rows five times a second cost
    // the measured pipeline a tenth of the machine.
    while unfinished(&pool, campaign).await {
        if started.elapsed() > Duration::from_secs(1800) {
            panic!("not finished after 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e2e_s = started.elapsed().as_secs_f64();
    let e2e = a.messages as f64 / e2e_s;
    let failed = count_status(&pool, campaign, "failed").await;
    let sent = count_status(&pool, campaign, "sent").await;
    assert_eq!(
        sent + failed,
        a.messages as i64,
        "every message ends sent or failed"
    );
    let sends = shared_send_log(&work.path().join("host/sim-sends.jsonl"));
    println!(
        "fan-out (campaign-trigger):        {:>10.0} rows/s ({} rows in {:.2}s)",
        trig.rows_created as f64 / fanout_s,
        trig.rows_created,
        fanout_s
    );
    println!(
        "end to end (trigger to all sent):  {:>10.0} messages/s ({} in {:.1}s, {} failed)",
        e2e, a.messages, e2e_s, failed
    );
    println!(
        "ratio to the floor:                {:>10.2}  (to the floor with SQS-sized outcome updates: {:.2})",
        e2e / floor_rate,
        e2e / floor10_rate
    );
    println!(
        "simulator log: {} sends, {} message ids sent more than once",
        sends.0, sends.1
    );

    // Drain latency: 200 messages falling due at random moments over 10 s, default 1 s tick,
    // with a processor of its own so that its report tells this phase's slowest pass.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let bulk_report = proc_task.await.unwrap();
    let (stop, proc_task) = spawn_processor(Arc::new(broadcast_processor::Deps {
        pool: pool.clone(),
        queue: queue.clone() as Arc<dyn Queue>,
        settings: broadcast_processor::Settings {
            run_for: Duration::from_secs(3600),
            ..Default::default()
        },
    }));
    let (t2, c2, _) = seed(&pool, a.devices, 200, "latency", 0.0, 0.0).await;
    run_trigger(&pool).await;
    sqlx::query("UPDATE broadcast_messages SET due_at = now() + random() * interval '10 seconds' WHERE campaign_id = $1")
        .bind(c2)
        .execute(&pool)
        .await
        .unwrap();
    while count_status(&pool, c2, "sent").await < 200 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut lat: Vec<f64> = sqlx::query_scalar("SELECT extract(epoch FROM queued_at - due_at)::float8 FROM broadcast_messages WHERE campaign_id = $1")
        .bind(c2)
        .fetch_all(&pool)
        .await
        .unwrap();
    lat.sort_by(f64::total_cmp);
    let _ = t2;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let latency_report = proc_task.await.unwrap();
    println!(
        "processor drain latency (1 s tick): p50 {:.3}s  p99 {:.3}s  max {:.3}s; slowest pass {} ms ({} over the tick)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        latency_report.slowest_pass_ms,
        latency_report.slow_passes
    );
    println!(
        "processor during the 100k run:     {} messages queued, slowest pass {} ms, {} passes over the tick",
        bulk_report.queued, bulk_report.slowest_pass_ms, bulk_report.slow_passes
    );
    // Read after the drain phase's 10 s: the host's connections report their statistics when
    // idle, a second or more after their last statement.
    for table in ["host_sends", "broadcast_messages"] {
        let (upd, hot): (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = $1",
        )
        .bind(table)
        .fetch_one(&pool)
        .await
        .unwrap();
        println!(
            "updates of {table} (100k run and drain phase): {upd}, {hot} of them HOT ({:.1} %, no index entry written)",
            100.0 * hot as f64 / upd.max(1) as f64
        );
    }
    let (stop, proc_task) = spawn_processor(processor.clone());
    // Worker cost per message (for the README's cost model): one poller alone, as one Lambda
    // instance would run, so the handler's duration is not inflated by 16 pollers on 2 cores.
    poll_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pollers {
        let _ = p.await;
    }
    let deps = worker_deps(&relaxed, &host_url, token);
    for (batch, n) in [(10usize, 2_000usize), (1, 500)] {
        let (t3, c3, _) = seed(&pool, a.devices, n, &format!("cost{batch}"), 0.0, 0.0).await;
        wait_owned(&pool, t3).await;
        run_trigger(&pool).await;
        let (mut durations, mut records) = (Vec::new(), 0usize);
        while count_status(&pool, c3, "sent").await < n as i64 {
            let (got, took) = wabcast_tests::deliver_batch(queue.as_ref(), &deps, batch).await;
            if got == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            durations.push(took.as_secs_f64() * 1000.0);
            records += got;
        }
        let mean_ms = durations.iter().sum::<f64>() / durations.len() as f64;
        let per_batch = records as f64 / durations.len() as f64;
        durations.sort_by(f64::total_cmp);
        println!(
            "worker invocation (one poller, batches of {batch}, zero host latency): {:.1} records per batch, {:.2} ms mean, p50 {:.2} ms, p99 {:.2} ms; {:.3} ms per message",
            per_batch,
            mean_ms,
            percentile(&durations, 0.5),
            percentile(&durations, 0.99),
            mean_ms / per_batch
        );
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = proc_task.await;
    let host_rss = peak_rss_mb(&host.pid().to_string());
    let self_rss = peak_rss_mb("self");
    println!("peak RSS: device host {:.0} MB; functions in process (trigger + processor + {} worker pollers) {:.0} MB", host_rss.unwrap_or(f64::NAN), a.pollers, self_rss.unwrap_or(f64::NAN));
    drop(host);
    let _ = tenant;
    // The paced runs open pools of their own: PostgreSQL's 100 connections do not hold both.
    pool.close().await;
    relaxed.close().await;

    sqs_send_lanes(1_000, Duration::from_millis(10)).await;

    for max_devices in a.paced_claims.iter().copied() {
        if a.paced_devices > 0 {
            paced_run(
                &base,
                &redis,
                &bin,
                work.path(),
                a.paced_devices,
                a.pollers,
                max_devices,
                a.paced_hosts,
                a.paced_kill,
                a.paced_latency_ms,
            )
            .await;
        }
    }

    if a.watch_messages > 0 {
        watch_run(&base, &redis, &bin, &root, a.watch_messages, work.path()).await;
    }
}

/// Pacing at scale: `devices` devices, each with `PACED_PER_DEVICE` messages of a campaign paced
/// at [1 s, 3 s], drained by one processor (default settings, 1 s tick) whose claims take at
/// most `max_devices` devices. Most devices are ready at every moment, so this is where a
/// claim's length shows: a device ready while a long claim runs waits for the next one.
/// Prints the rate, the claim lateness (queued_at − the moment the device could take the
/// message: its cursor passed, its previous message out of flight, the message due), the real
/// gaps between a device's sends against [min, max], and the processor's slowest pass.
///
/// The devices are shared among `hosts` device hosts (each `HOST_MAX_DEVICES` = its share),
/// behind one simulated WhatsApp (one send log). With `kill`, one more host with room for a
/// share stands by, and the first host is killed with SIGKILL once a third of the messages are
/// sent: its devices wait for their lease to run out, the standby takes them, and the rows the
/// dead host left in flight are rescued.
#[allow(clippy::too_many_arguments)]
async fn paced_run(
    base: &str,
    redis: &str,
    bin: &Path,
    work: &Path,
    devices: usize,
    pollers: usize,
    max_devices: i64,
    hosts: usize,
    kill: bool,
    latency_ms: u64,
) {
    const PACED_PER_DEVICE: usize = 5;
    let (min_s, max_s) = (1.0, 3.0);
    let n = devices * PACED_PER_DEVICE;
    let (db_url, pool) = wabcast_tests::fresh_database(base, "wabcast_bench_paced").await;
    let (tenant, campaign, _) = seed(&pool, devices, n, "paced", min_s, max_s).await;
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    let relaxed = shared::db::connect_with(&db_url, 40, shared::db::Durability::Relaxed)
        .await
        .unwrap();
    let dir = work.join(format!("paced-{max_devices}-{hosts}"));
    std::fs::create_dir_all(&dir).unwrap();
    let sim_log = dir.join("whatsapp.jsonl");
    let spawned = hosts + usize::from(kill);
    let share = if spawned > 1 {
        devices.div_ceil(hosts)
    } else {
        0
    };
    // PostgreSQL's 100 connections: the worker's 40, the processor's pool, the hosts' share.
    let connections = (32 / spawned).max(8);
    let mut procs: Vec<(Group, String)> = Vec::new();
    for h in 0..hosts {
        let hdir = dir.join(format!("host-{h}"));
        procs.push(
            spawn_host_with(
                bin,
                &db_url,
                &hdir,
                share,
                connections,
                &sim_log,
                latency_ms,
            )
            .await,
        );
    }
    wait_owned(&pool, tenant).await;
    if kill {
        // Started once the others own every device, so it owns nothing until one dies.
        let hdir = dir.join("standby");
        procs.push(
            spawn_host_with(
                bin,
                &db_url,
                &hdir,
                share,
                connections,
                &sim_log,
                latency_ms,
            )
            .await,
        );
    }
    // Devices without a live lease go to the worker's default host: the last one started.
    let default_url = procs.last().map(|p| p.1.clone()).unwrap_or_default();
    let queue = redis_queue(redis, "benchp").await;
    let started = Instant::now();
    run_trigger(&pool).await;
    let (stop, proc_task) = spawn_processor(Arc::new(broadcast_processor::Deps {
        pool: pool.clone(),
        queue: queue.clone() as Arc<dyn Queue>,
        settings: broadcast_processor::Settings {
            run_for: Duration::from_secs(3600),
            max_devices_per_claim: max_devices,
            ..Default::default()
        },
    }));
    let poll_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = start_pollers(
        pollers,
        queue.clone(),
        worker_deps(&relaxed, &default_url, TOKEN),
        poll_stop.clone(),
    );
    // (seconds into the run, the wall clock) of the kill
    let mut killed_at: Option<(f64, chrono::DateTime<chrono::Utc>)> = None;
    while unfinished(&pool, campaign).await {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "paced run not finished after 15 minutes"
        );
        if kill
            && killed_at.is_none()
            && count_status(&pool, campaign, "sent").await * 3 >= n as i64
        {
            procs[0].0.kill_now();
            killed_at = Some((started.elapsed().as_secs_f64(), chrono::Utc::now()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let report = proc_task.await.unwrap();
    poll_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let sent = count_status(&pool, campaign, "sent").await;
    // Per device, in send order: when each message could have been claimed and when it was.
    let rows: Vec<(f64, Option<f64>)> = sqlx::query_as(
        "SELECT extract(epoch FROM queued_at - GREATEST(due_at, prev_finished,
                    prev_sent + make_interval(secs => prev_gap)))::float8,
                extract(epoch FROM sent_at - prev_sent)::float8
         FROM (SELECT queued_at, due_at, sent_at,
                      lag(finished_at) OVER w AS prev_finished, lag(sent_at) OVER w AS prev_sent,
                      lag(gap_s) OVER w AS prev_gap
               FROM broadcast_messages WHERE campaign_id = $1 AND status = 'sent'
               WINDOW w AS (PARTITION BY device_id ORDER BY sent_at)) m",
    )
    .bind(campaign)
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut late: Vec<f64> = rows.iter().map(|r| r.0.max(0.0)).collect();
    late.sort_by(f64::total_cmp);
    let gaps: Vec<f64> = rows.iter().filter_map(|r| r.1).collect();
    let below = gaps.iter().filter(|g| **g < min_s).count();
    let within = gaps.iter().filter(|g| **g >= min_s && **g <= max_s).count();
    let (_, twice) = shared_send_log(&sim_log);
    let per_send = if latency_ms > 0 {
        format!(", {latency_ms} ms per send")
    } else {
        String::new()
    };
    let on_hosts = if spawned > 1 {
        // Which host recorded each send (the host's send record), per host in start order.
        let per_host: Vec<(String, i64)> = sqlx::query_as(
            "SELECT h.url, count(*) FROM host_sends s JOIN hosts h ON h.id = s.host_id
             WHERE s.state = 'sent' GROUP BY h.url",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let counts: Vec<String> = procs
            .iter()
            .map(|(_, url)| {
                per_host
                    .iter()
                    .find(|(u, _)| u == url)
                    .map_or(0, |(_, c)| *c)
                    .to_string()
            })
            .collect();
        let killed = match killed_at {
            Some((t, wall)) => {
                // The takeover: the standby's first send after the kill.
                let standby = procs.last().map(|p| p.1.clone()).unwrap_or_default();
                // (A send record's creation is no measure: a host that takes over an attempt
                // the dead host left keeps the record, created before the kill.)
                let first: Option<f64> = sqlx::query_scalar(
                    "SELECT extract(epoch FROM min(s.updated_at) - $2)::float8
                     FROM host_sends s JOIN hosts h ON h.id = s.host_id
                     WHERE h.url = $1 AND s.state = 'sent'",
                )
                .bind(&standby)
                .bind(wall)
                .fetch_one(&pool)
                .await
                .unwrap();
                // How long each of the dead host's devices stopped sending: its longest gap,
                // for the devices whose longest gap is beyond anything pacing draws.
                let mut stalls: Vec<f64> = sqlx::query_scalar(
                    "SELECT max(gap) FROM (
                         SELECT device_id, extract(epoch FROM sent_at - lag(sent_at)
                             OVER (PARTITION BY device_id ORDER BY sent_at))::float8 AS gap
                         FROM broadcast_messages WHERE campaign_id = $1 AND status = 'sent') g
                     GROUP BY device_id HAVING max(gap) > $2",
                )
                .bind(campaign)
                .bind(2.0 * max_s)
                .fetch_all(&pool)
                .await
                .unwrap();
                stalls.sort_by(f64::total_cmp);
                let lease = std::env::var("DEVICE_LEASE_S").unwrap_or_else(|_| "30".into());
                format!(
                    ", the first killed at {t:.1}s, the last standing by; device lease {lease} s, the standby's first send {} after the kill; {} devices stalled, for p50 {:.1}s p90 {:.1}s max {:.1}s",
                    first.map_or("never".into(), |f| format!("{f:.1}s")),
                    stalls.len(),
                    percentile(&stalls, 0.5),
                    percentile(&stalls, 0.9),
                    percentile(&stalls, 1.0),
                )
            }
            None => String::new(),
        };
        format!(
            " on {spawned} hosts (sends per host {}{killed}; {} rescued, {} of them before their lease as their host lost the device)",
            counts.join(" / "),
            report.requeued
                + report.reconciled_sent
                + report.reconciled_retry
                + report.reconciled_failed,
            report.reconciled_host_lost
        )
    } else {
        String::new()
    };
    println!(
        "paced: {devices} devices × {PACED_PER_DEVICE} at 1–3 s{per_send}, claims of ≤ {max_devices:>4} devices{on_hosts}: {:>5.0} msg/s ({sent} sent in {secs:.1}s); claim lateness p50 {:.2}s p99 {:.2}s max {:.2}s; gaps within [1 s, 3 s] {:.1} %, below 1 s {below}; slowest pass {} ms ({} over the tick); {twice} sent twice",
        sent as f64 / secs,
        percentile(&late, 0.5),
        percentile(&late, 0.99),
        percentile(&late, 1.0),
        100.0 * within as f64 / gaps.len().max(1) as f64,
        report.slowest_pass_ms,
        report.slow_passes,
    );
    drop(procs);
    pool.close().await;
    relaxed.close().await;
}

/// The processor's enqueue on SQS: one claim of `n` messages over `n` message groups (a claim of
/// `n` devices) through `SqsQueue::send_batch`, with one lane (calls one after the other) and
/// with the default lanes, against a stub of SQS's `SendMessageBatch` that answers each call
/// after `rtt` (a call's round trip and service time in a region). Not moto: moto's FIFO send
/// grows with the messages already in the queue (22 ms for the first batch of 10, 93 ms for the
/// fifth, measured 2026-12-03) and answers one call at a time, so against it a thousand
/// messages took 78 s with one lane and 87 s with sixteen: moto's figure, not the client's.
async fn sqs_send_lanes(n: usize, rtt: Duration) {
    use shared::queue::{OutgoingMessage, SqsQueue, DEFAULT_SEND_CONCURRENCY};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    #[derive(Default)]
    struct Stub {
        messages: AtomicUsize,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }
    let stub = Arc::new(Stub::default());
    let app = axum::Router::new()
        .fallback(
            move |axum::extract::State(stub): axum::extract::State<Arc<Stub>>,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| async move {
                let target = headers
                    .get("x-amz-target")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                assert_eq!(target, "AmazonSQS.SendMessageBatch", "the stub only sends");
                let now = stub.in_flight.fetch_add(1, SeqCst) + 1;
                stub.most_in_flight.fetch_max(now, SeqCst);
                tokio::time::sleep(rtt).await;
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let entries = req["Entries"].as_array().unwrap();
                stub.messages.fetch_add(entries.len(), SeqCst);
                let ok: Vec<serde_json::Value> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "Id": e["Id"],
                            "MessageId": Uuid::new_v4().to_string(),
                            "MD5OfMessageBody": "0",
                            "SequenceNumber": "1",
                        })
                    })
                    .collect();
                stub.in_flight.fetch_sub(1, SeqCst);
                (
                    [("content-type", "application/x-amz-json-1.0")],
                    serde_json::json!({"Successful": ok, "Failed": []}).to_string(),
                )
            },
        )
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut figures = Vec::new();
    for lanes in [1, DEFAULT_SEND_CONCURRENCY] {
        let mut config = wabcast_tests::moto_sqs_config(endpoint.clone());
        config.queue_url = format!("{endpoint}/000000000000/bench.fifo");
        config.send_concurrency = lanes;
        let queue = SqsQueue::connect(config).await.unwrap();
        let messages: Vec<OutgoingMessage> = (0..n)
            .map(|i| OutgoingMessage {
                group_id: Uuid::new_v4().to_string(),
                dedup_id: format!("{i}-1"),
                body: format!(r#"{{"id":{i},"tenant":"{}"}}"#, Uuid::new_v4()),
            })
            .collect();
        stub.messages.store(0, SeqCst);
        stub.most_in_flight.store(0, SeqCst);
        let t = Instant::now();
        assert_eq!(queue.send_batch(&messages).await.unwrap(), n);
        figures.push((
            lanes,
            t.elapsed().as_secs_f64() * 1000.0,
            stub.most_in_flight.load(SeqCst),
        ));
        assert_eq!(
            stub.messages.load(SeqCst),
            n,
            "every message reached the stub"
        );
    }
    println!(
        "SQS send of one {n}-device claim (stub SQS, {} ms per call): {}; {:.1}× faster",
        rtt.as_millis(),
        figures
            .iter()
            .map(|(l, ms, most)| format!(
                "{l} lane{} {ms:.0} ms ({most} calls in flight at most)",
                if *l == 1 { "" } else { "s" }
            ))
            .collect::<Vec<_>>()
            .join(", "),
        figures[0].1 / figures[1].1
    );
}

/// (sends, message ids sent more than once) from the simulator's durable log.
fn shared_send_log(path: &Path) -> (usize, usize) {
    let entries = device_host::simulator::SendLog::read(path).unwrap();
    let per = wabcast_tests::sends_per_message(&entries);
    (entries.len(), per.values().filter(|n| **n > 1).count())
}

/// The same pipeline through `cargo lambda watch` (release builds) and the local emulator.
async fn watch_run(base: &str, redis: &str, bin: &Path, root: &Path, messages: usize, work: &Path) {
    let devices = 20;
    let (db_url, pool) = wabcast_tests::fresh_database(base, "wabcast_bench_watch").await;
    let (_, campaign, _) = seed(&pool, devices, messages, "watch", 0.0, 0.0).await;
    let (host, host_url) = spawn_host(bin, &db_url, &work.join("watch-host")).await;
    let token = TOKEN;
    let prefix = format!("benchw:{}", Uuid::new_v4().simple());
    let env_file = work.join("functions.env");
    std::fs::write(&env_file, format!("DATABASE_URL={db_url}\nREDIS_URL={redis}\nQUEUE_PREFIX={prefix}\nHOST_URL={host_url}\nHOST_TOKEN={token}\nRUST_LOG=warn\nCLAIM_PER_DEVICE=100\n")).unwrap();
    let port = free_port();
    let watch_log = work.join("watch.log");
    let mut watch = spawn(
        Command::new("cargo")
            .current_dir(root)
            .args([
                "lambda",
                "watch",
                "--release",
                "--ignore-changes",
                "--concurrency",
                "4",
                "--invoke-port",
                &port.to_string(),
                "--env-file",
            ])
            .arg(&env_file),
        &watch_log,
    );
    // Build and warm every function before timing (the first invocation compiles it).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .build()
        .unwrap();
    watch
        .wait_listening(port, Duration::from_secs(120), &watch_log)
        .await;
    // The trigger is warmed with an event it refuses before touching the database, so that
    // the campaign is not fanned out before the clock starts (its build used to be timed).
    for (f, body, ok) in [
        (
            "broadcast-processor",
            serde_json::json!({"run_for_seconds": 0}),
            true,
        ),
        ("message-worker", serde_json::json!({"Records": []}), true),
        ("campaign-trigger", serde_json::json!([]), false),
    ] {
        let r = http
            .post(format!(
                "http://127.0.0.1:{port}/2015-03-31/functions/{f}/invocations"
            ))
            .json(&body)
            .send()
            .await
            .unwrap();
        let text = r.text().await.unwrap_or_default();
        assert!(!ok || !text.contains("errorType"), "warming {f}: {text}");
        assert!(
            ok || text.contains("malformed event"),
            "warming {f}: expected the refusal of a malformed event, got {text}"
        );
    }
    let started = Instant::now();
    let emulator = spawn(
        Command::new(bin.join("local-emulator"))
            .args([
                "--invoke-url",
                &format!("http://127.0.0.1:{port}"),
                "--processor-run-for",
                "30",
                "--processor-tick-ms",
                "200",
                "--pollers",
                "4",
            ])
            .env("REDIS_URL", redis)
            .env("QUEUE_PREFIX", &prefix)
            .env("RUST_LOG", "warn"),
        &work.join("emulator.log"),
    );
    while count_status(&pool, campaign, "sent").await < messages as i64 {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "watch run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = started.elapsed().as_secs_f64();
    // The functions' own processes, children of cargo lambda watch.
    let mut rss = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            let name = exe
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if ["campaign-trigger", "broadcast-processor", "message-worker"]
                .contains(&name.as_str())
                && exe.starts_with(root)
            {
                if let Some(mb) = peak_rss_mb(&pid) {
                    rss.push(format!("{name} {mb:.0} MB"));
                }
            }
        }
    }
    rss.sort();
    println!("through cargo lambda watch + emulator: {:>6.0} messages/s ({messages} over {devices} devices in {s:.1}s)", messages as f64 / s);
    println!("peak RSS per function process (watch): {}", rss.join(", "));
    drop(emulator);
    drop(watch);
    drop(host);
}
