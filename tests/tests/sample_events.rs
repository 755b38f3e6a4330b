//! Every handler invoked once with its sample event from `events/` (the same files work with
//! `cargo lambda invoke --data-file`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use aws_lambda_events::event::sqs::SqsEvent;
use sqlx::PgPool;
use std::path::PathBuf;
use wabcast_tests::*;

fn event(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../events")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn campaign_trigger_takes_its_scheduler_event(pool: PgPool) {
    let ev: serde_json::Value =
        serde_json::from_str(&event("campaign-trigger/scheduler.json")).unwrap();
    let report = campaign_trigger::handle(
        ev,
        &campaign_trigger::Deps {
            pool,
            max_campaigns: 5,
        },
    )
    .await
    .unwrap();
    assert_eq!(report, campaign_trigger::TriggerReport::default());
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn broadcast_processor_takes_its_scheduler_events(pool: PgPool) {
    let deps = broadcast_processor::Deps {
        pool,
        queue: test_queue(5).await,
        settings: broadcast_processor::Settings {
            run_for: std::time::Duration::ZERO,
            ..Default::default()
        },
    };
    for file in [
        "broadcast-processor/scheduler.json",
        "broadcast-processor/single-tick.json",
    ] {
        let ev: serde_json::Value = serde_json::from_str(&event(file)).unwrap();
        let report = broadcast_processor::handle(ev, &deps).await.unwrap();
        assert_eq!(report.ticks, 1, "{file}");
    }
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn message_worker_takes_its_sqs_fifo_batch(pool: PgPool) {
    let host = TestHost::start(&pool, quiet_sim()).await;
    let queue = test_queue(5).await;
    let p = Pipeline::new(&pool, queue, &host);
    let ev: SqsEvent = serde_json::from_str(&event("message-worker/sqs-fifo-batch.json")).unwrap();
    assert_eq!(ev.records.len(), 2);
    // The sample's rows do not exist here: both records are acknowledged as duplicates, nothing sent.
    let response = message_worker::handle(ev, &p.worker).await;
    assert!(response.batch_item_failures.is_empty());
    assert!(host.sends().is_empty());
}
