//! Several device hosts: each device is owned by one host through a lease in PostgreSQL, the
//! worker sends to the owner, and when a host dies mid-campaign another takes its devices over
//! after the lease, and every message still ends exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use device_host::simulator::{SendLog, SimConfig};
use shared::domain::LeadStatus;
use shared::repo;
use sqlx::PgPool;
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;
use wabcast_tests::*;

async fn owners(pool: &PgPool) -> HashMap<Uuid, Option<String>> {
    sqlx::query_as::<_, (Uuid, Option<String>)>("SELECT id, host_id FROM devices")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_host_dies_mid_campaign_and_every_message_still_ends_once(pool: PgPool) {
    let tenant = seed_tenant(&pool, "hosts@example.com").await;
    let mut devices = Vec::new();
    for i in 0..6u64 {
        let d = seed_device(&pool, tenant, &format!("d{i}"), 0.02, 0.05).await;
        seed_leads(
            &pool,
            tenant,
            d,
            i * 1_000,
            40,
            "cars",
            LeadStatus::Prospect,
        )
        .await;
        devices.push(d);
    }
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    // One simulated WhatsApp behind both hosts: one send log.
    let whatsapp = tempfile::tempdir().unwrap();
    let log_path = whatsapp.path().join("whatsapp.jsonl");
    let sim = SimConfig {
        latency: Duration::from_millis(5),
        log_path: Some(log_path.clone()),
        ..quiet_sim()
    };
    let lease = Duration::from_millis(1_500);
    let a = TestHost::start_as(&pool, "host-a", lease, sim.clone()).await;
    let b = TestHost::start_as(&pool, "host-b", lease, sim).await;
    // A came first and holds every device; B waits.
    assert!(owners(&pool)
        .await
        .values()
        .all(|h| h.as_deref() == Some("host-a")));

    // The worker's default host is B: A's devices reach A only through the routing.
    let mut p = Pipeline::new(&pool, test_queue(50).await, &b);
    p.worker.settings.lease = Duration::from_secs(3);
    let total = 240;
    let mut sent_before = 0;
    for _ in 0..400 {
        p.trigger().await;
        p.tick().await;
        while p.deliver().await > 0 {}
        sent_before = SendLog::read(&log_path).unwrap().len();
        if sent_before >= total / 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sent_before >= total / 3, "A sent {sent_before}");
    assert!(sent_before < total);

    // A dies: it stops serving and stops renewing its leases (no goodbye).
    a.running.server.abort();
    a.running.leases.abort();

    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(90))
        .await;

    // B took every device over.
    assert!(owners(&pool)
        .await
        .values()
        .all(|h| h.as_deref() == Some("host-b")));
    let rows = repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap();
    assert_eq!(rows.len(), total);
    assert!(
        rows.iter().all(|r| r.status == "sent"),
        "{:?}",
        rows.iter()
            .filter(|r| r.status != "sent")
            .map(|r| (&r.status, &r.reason))
            .collect::<Vec<_>>()
    );
    // Exactly one accepted send per message, whichever host sent it.
    let log = SendLog::read(&log_path).unwrap();
    let mut per_message: HashMap<i64, usize> = HashMap::new();
    for e in &log {
        *per_message.entry(e.message_id).or_default() += 1;
    }
    assert_eq!(per_message.len(), total);
    assert!(
        per_message.values().all(|&n| n == 1),
        "sent twice: {:?}",
        per_message
            .iter()
            .filter(|(_, &n)| n > 1)
            .collect::<Vec<_>>()
    );
    for r in &rows {
        assert!(log
            .iter()
            .any(|e| Some(&e.provider_message_id) == r.provider_message_id.as_ref()));
    }
    // Both hosts did part of the work.
    let hosts: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT host_id FROM host_sends ORDER BY host_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(hosts, ["host-a", "host-b"]);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_host_refuses_a_device_another_host_holds(pool: PgPool) {
    let tenant = seed_tenant(&pool, "lease@example.com").await;
    let device = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    let a = TestHost::start_as(&pool, "host-a", Duration::from_secs(30), quiet_sim()).await;
    let b = TestHost::start_as(&pool, "host-b", Duration::from_secs(30), quiet_sim()).await;
    // Status through the owner works; through the other host it is refused, retryably.
    a.client.device_status(tenant, device).await.unwrap();
    let err = b
        .client
        .device_status(tenant, device)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wrong_host") && err.contains("host-a"),
        "{err}"
    );
    // A graceful stop hands the device over at once.
    a.running.leases.abort();
    assert_eq!(a.running.host.release_all().await.unwrap(), 1);
    b.client.device_status(tenant, device).await.unwrap();
    assert_eq!(
        owners(&pool)
            .await
            .get(&device)
            .cloned()
            .flatten()
            .as_deref(),
        Some("host-b")
    );
}
