//! Memory of the device host's sessions:
//! 1. the host (in this process) with 3,000 simulator devices restored: resident memory before
//!    and after, target ≤ 200 MB in all;
//! 2. 100 web multi-device sessions opened offline (each with its SQLite store, the websocket
//!    pointed at a closed port, so each backs off as `reconnecting`): resident memory per session.
//!
//! `cargo run --release -p wabcast-tests --bin host-rss-bench` (needs PostgreSQL: DATABASE_URL or
//! the local default). Prints its figures; asserts nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

fn rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() {
    let base = wabcast_tests::database_url();
    let devices: usize = std::env::var("BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let web_sessions: usize = std::env::var("BENCH_WEB_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);

    let (_, pool) = wabcast_tests::fresh_database(&base, "wabcast_rss_bench").await;
    let tenant = wabcast_tests::seed_tenant(&pool, "rss@example.com").await;
    for i in 0..devices {
        wabcast_tests::seed_device(&pool, tenant, &format!("sim-{i}"), 1.0, 2.0).await;
    }

    // 1. The host with every simulator session restored.
    let dir = tempfile::tempdir().unwrap();
    let before = rss_mb();
    let started = Instant::now();
    let mut web = device_host_web::WebConfig::new(dir.path());
    web.ws_url = Some("ws://127.0.0.1:9/ws/chat".into());
    let running = device_host::start(
        device_host::Config {
            bind: "127.0.0.1:0".parse().unwrap(),
            token: shared::config::Secret::new("bench"),
            host_id: "rss-bench".into(),
            public_url: None,
            lease_ttl: Duration::from_secs(30),
            max_devices: usize::MAX,
            outcome_retry_max: device_host::service::OUTCOME_RETRY_MAX,
            data_dir: dir.path().to_path_buf(),
            simulator: device_host::simulator::SimConfig::default(),
            cloud_api: device_host::cloud_api::CloudApiConfig {
                base_url: "http://127.0.0.1:9".into(),
                app_secret: None,
                verify_token: None,
                timeout: Duration::from_secs(5),
                opt_out_keywords: vec!["STOP".into()],
            },
            web,
        },
        pool.clone(),
        pool.clone(),
    )
    .await
    .unwrap();
    let restore = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_mb();
    println!(
        "device host: {} simulator sessions restored in {:.2} s; process RSS {:.1} MB \
         (before the host {:.1} MB, +{:.1} MB for host and sessions; target <= 200 MB)",
        running.host.device_count(),
        restore.as_secs_f64(),
        after,
        before,
        after - before
    );

    // 2. Web multi-device sessions opened with no network.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let mut cfg = device_host_web::WebConfig::new(dir.path().join("webbench"));
    cfg.ws_url = Some("ws://127.0.0.1:9/ws/chat".into());
    let sessions = Arc::new(device_host_web::WebSessions::new(
        cfg,
        tx,
        Arc::new(NoInbound),
    ));
    // One session first, so one-time costs (library statics, the first SQLite connection) are
    // not counted per session.
    sessions.open(uuid::Uuid::new_v4(), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_mb();
    for _ in 0..web_sessions {
        sessions.open(uuid::Uuid::new_v4(), None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_mb();
    let reconnecting = sessions.open_count();
    println!(
        "web sessions: {web_sessions} opened offline ({reconnecting} open in all); RSS {before:.1} -> {after:.1} MB, \
         {:.2} MB per idle session",
        (after - before) / web_sessions as f64
    );
    sessions.close_all().await;
    running.server.abort();
}

/// No contact writes to the benchmark's sessions (they never connect).
struct NoInbound;

#[async_trait::async_trait]
impl device_host_web::InboundKeeper for NoInbound {
    async fn keep(&self, _inbound: device_host_web::InboundText) -> Result<(), String> {
        Ok(())
    }
}
