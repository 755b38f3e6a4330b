//! Smoke test of the local stack as a user runs it: the three functions served by
//! `cargo lambda watch`, driven by the local emulator (EventBridge and the SQS event source),
//! against a device host and PostgreSQL, once on the Redis queue and once on the SQS API (moto),
//! chosen by configuration only. `infra/test.sh` installs cargo-lambda and moto and builds the
//! binaries first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::domain::LeadStatus;
use sqlx::PgPool;
use std::process::Command;
use std::time::{Duration, Instant};
use wabcast_tests::process::{free_port, spawn};
use wabcast_tests::*;

#[derive(Clone, Copy)]
enum Backend {
    Redis,
    Sqs,
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_campaign_drains_through_cargo_lambda_watch_and_the_emulator(pool: PgPool) {
    drains_through_watch(pool, Backend::Redis).await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_same_stack_drains_on_the_sqs_api(pool: PgPool) {
    drains_through_watch(pool, Backend::Sqs).await;
}

async fn drains_through_watch(pool: PgPool, backend: Backend) {
    let root = workspace_root();
    let emulator = built_binary("local-emulator");
    let database_url = database_url_of(&pool).await;

    let tenant = seed_tenant(&pool, "smoke@example.com").await;
    let d1 = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    let d2 = seed_device(&pool, tenant, "d2", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d1, 0, 6, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, d2, 100, 6, "cars", LeadStatus::Customer).await;
    let campaign = seed_campaign(
        &pool,
        tenant,
        &CampaignSpec {
            min_s: 0.2,
            max_s: 0.4,
            ..Default::default()
        },
    )
    .await;
    let host = TestHost::start(&pool, quiet_sim()).await;

    let dir = tempfile::tempdir().unwrap();
    let queue_env = match backend {
        Backend::Redis => format!(
            "QUEUE_BACKEND=redis\nREDIS_URL={}\nQUEUE_PREFIX=smoke:{}\n",
            redis_url(),
            uuid::Uuid::new_v4().simple()
        ),
        Backend::Sqs => {
            let endpoint = moto_url().await;
            let q = shared::queue::SqsQueue::create_fifo_with_dlq(
                moto_sqs_config(endpoint.clone()),
                &format!("smoke{}", uuid::Uuid::new_v4().simple()),
                5,
                Duration::from_secs(30),
            )
            .await
            .unwrap();
            format!(
                "QUEUE_BACKEND=sqs\nSQS_QUEUE_URL={}\nSQS_DLQ_URL={}\nSQS_ENDPOINT_URL={endpoint}\n\
                 AWS_REGION=us-east-1\nAWS_ACCESS_KEY_ID=emulator\nAWS_SECRET_ACCESS_KEY=emulator\n",
                q.queue_url,
                q.dlq_url.unwrap()
            )
        }
    };
    let env_file = dir.path().join("functions.env");
    std::fs::write(
        &env_file,
        format!(
            "DATABASE_URL={database_url}\n{queue_env}HOST_URL={}\nHOST_TOKEN={TOKEN}\nRUST_LOG=warn\n",
            host.url
        ),
    )
    .unwrap();
    let port = free_port();
    let watch_log = dir.path().join("watch.log");
    let mut watch = spawn(
        Command::new("cargo")
            .current_dir(&root)
            .args([
                "lambda",
                "watch",
                "--ignore-changes",
                "--concurrency",
                "2",
                "--invoke-port",
                &port.to_string(),
                "--env-file",
            ])
            .arg(&env_file),
        &watch_log,
    );
    watch
        .wait_listening(port, Duration::from_secs(120), &watch_log)
        .await;
    let _emulator = spawn(
        Command::new(&emulator)
            .args([
                "--invoke-url",
                &format!("http://127.0.0.1:{port}"),
                "--processor-run-for",
                "5",
                "--processor-tick-ms",
                "100",
            ])
            .envs(queue_env.lines().filter_map(|l| l.split_once('=')))
            .env("RUST_LOG", "warn"),
        &dir.path().join("emulator.log"),
    );

    let started = Instant::now();
    loop {
        let c = shared::repo::campaigns::get_campaign(&pool, tenant, campaign)
            .await
            .unwrap();
        if c.status == "completed" {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let watch_log =
                std::fs::read_to_string(dir.path().join("watch.log")).unwrap_or_default();
            let emu_log =
                std::fs::read_to_string(dir.path().join("emulator.log")).unwrap_or_default();
            panic!(
                "campaign still {} after 300 s: {:?}\n--- watch.log (tail)\n{}\n--- emulator.log (tail)\n{}",
                c.status,
                status_counts(&pool, tenant, campaign).await,
                tail(&watch_log),
                tail(&emu_log)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        status_counts(&pool, tenant, campaign).await.get("sent"),
        Some(&12)
    );
    let sends = host.sends();
    assert_eq!(sends.len(), 12);
    assert!(sends_per_message(&sends).values().all(|n| *n == 1));
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
