//! Several device hosts: each device is owned by one host through a lease in PostgreSQL, the
//! worker sends to the owner, and when a host dies mid-campaign another takes its devices over
//! after the lease, and every message still ends exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Utc};
use device_host::simulator::{SendLog, SimConfig};
use shared::domain::LeadStatus;
use shared::host_api::code;
use shared::repo;
use sqlx::PgPool;
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;
use wabcast_tests::*;

/// Each device's owner: the host holding a live lease on it.
async fn owners(pool: &PgPool) -> HashMap<Uuid, Option<String>> {
    sqlx::query_as::<_, (Uuid, Option<String>)>(
        "SELECT d.id, l.host_id FROM devices d
         LEFT JOIN device_leases l ON l.device_id = d.id AND l.lease_until > now()",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Every one of the campaign's `total` messages ended `sent` with exactly one accepted send in
/// the simulator's log, whichever host sent it, and its provider id is that send's.
async fn every_message_sent_once(
    pool: &PgPool,
    tenant: Uuid,
    campaign: Uuid,
    total: usize,
    log_path: &std::path::Path,
) {
    let rows = repo::messages::list_campaign_messages(pool, tenant, campaign)
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
    let log = SendLog::read(log_path).unwrap();
    let per_message = sends_per_message(&log);
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
}

/// The device lease of [`two_hosts_one_whatsapp`]'s hosts.
const TWO_HOSTS_LEASE: Duration = Duration::from_millis(1_500);

/// Hosts `host-a`, started first, and `host-b` (leases of 1.5 s), with one simulated WhatsApp
/// behind both: one send log, `whatsapp.jsonl` in the returned directory.
async fn two_hosts_one_whatsapp(
    pool: &PgPool,
    latency: Duration,
) -> (TestHost, TestHost, tempfile::TempDir) {
    let whatsapp = tempfile::tempdir().unwrap();
    let sim = SimConfig {
        latency,
        log_path: Some(whatsapp.path().join("whatsapp.jsonl")),
        ..quiet_sim()
    };
    let a = TestHost::start_as(pool, "host-a", TWO_HOSTS_LEASE, sim.clone()).await;
    let b = TestHost::start_as(pool, "host-b", TWO_HOSTS_LEASE, sim).await;
    (a, b, whatsapp)
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
    let (a, b, whatsapp) = two_hosts_one_whatsapp(&pool, Duration::from_millis(5)).await;
    let log_path = whatsapp.path().join("whatsapp.jsonl");
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
    every_message_sent_once(&pool, tenant, campaign, total, &log_path).await;
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

/// A device's status as recorded.
async fn device_status(pool: &PgPool, device: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM devices WHERE id = $1")
        .bind(device)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits (up to 10 s) for a device's recorded status to be `want`.
async fn until_status(pool: &PgPool, device: Uuid, want: &str) {
    let reached = tokio::time::timeout(Duration::from_secs(10), async {
        while device_status(pool, device).await != want {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{device}: {} instead of {want}",
        device_status(pool, device).await
    );
}

/// A host that lost a device to another host (it was too slow to renew: a stalled process, a
/// database failing over) closes its session there, and a session closing says `offline, host
/// stopped`. That status is not the host's to write any more: written over the new owner's
/// `online`, it left a served device looking offline, its messages waiting and, past the
/// offline grace, skipped as `device_offline`, until the new owner's session changed status
/// again.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_host_that_lost_a_device_does_not_write_its_status(pool: PgPool) {
    let tenant = seed_tenant(&pool, "lost@example.com").await;
    let moved = seed_device(&pool, tenant, "moved", 0.0, 0.0).await;
    let kept = seed_device(&pool, tenant, "kept", 0.0, 0.0).await;
    let a = TestHost::start_as(&pool, "host-a", Duration::from_secs(30), quiet_sim()).await;
    let b = TestHost::start_as(&pool, "host-b", Duration::from_secs(30), quiet_sim()).await;
    // The lease rounds are run by hand below.
    a.running.leases.abort();
    b.running.leases.abort();
    assert!(owners(&pool)
        .await
        .values()
        .all(|h| h.as_deref() == Some("host-a")));

    // A stalls past its lease on one device, and B takes that device over and connects it.
    let mut tx = pool.begin().await.unwrap();
    repo::devices::set_device_status(
        &mut tx,
        None,
        tenant,
        moved,
        shared::domain::DeviceStatus::Reconnecting,
        None,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    sqlx::query(
        "UPDATE device_leases SET lease_until = now() - interval '1 s' WHERE device_id = $1",
    )
    .bind(moved)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(b.running.host.lease_round().await.unwrap().acquired, 1);
    until_status(&pool, moved, "online").await;

    // A comes back, finds the device gone and closes its session there.
    let r = a.running.host.lease_round().await.unwrap();
    assert_eq!((r.kept, r.released), (1, 1), "{r:?}");
    // A's events are written in order: once its later one is, the closing one was handled.
    let kept_ref = device_host::provider::DeviceRef {
        id: kept,
        tenant_id: tenant,
        provider: shared::domain::ProviderKind::Simulator,
    };
    a.running.simulator.set_online(&kept_ref, false).unwrap();
    until_status(&pool, kept, "offline").await;
    assert_eq!(device_status(&pool, moved).await, "online");
    assert_eq!(
        owners(&pool)
            .await
            .get(&moved)
            .cloned()
            .flatten()
            .as_deref(),
        Some("host-b")
    );
}

/// Lease renewals never wait for a device row. The processor's claim holds the rows of the
/// devices it claims (up to a second at 1,000 devices) and the worker's outcome update moves
/// their pacing cursors; when leases lived in `devices`, a host's renewal of all its devices
/// waited behind the claim and deadlocked with the worker (3,000 devices, 2026-12-03). With one
/// device row locked as a claim locks it, a renewal, a takeover and the owner lookup all answer.
const TAKE: repo::hosts::Lapsed = repo::hosts::Lapsed::Take;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn lease_renewal_does_not_wait_for_a_claimed_device(pool: PgPool) {
    let tenant = seed_tenant(&pool, "leases@example.com").await;
    let a = seed_device(&pool, tenant, "a", 1.0, 2.0).await;
    let b = seed_device(&pool, tenant, "b", 1.0, 2.0).await;
    repo::hosts::register_host(&pool, "h1", "http://127.0.0.1:1", 30.0)
        .await
        .unwrap();
    let taken = repo::hosts::acquire_devices(&pool, "h1", &["simulator"], 30.0, 10, TAKE)
        .await
        .unwrap();
    assert_eq!(taken.len(), 2);

    let mut claim = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM devices WHERE id = $1 FOR UPDATE")
        .bind(a)
        .execute(&mut *claim)
        .await
        .unwrap();
    sqlx::query("UPDATE devices SET next_send_at = now() + interval '1 second' WHERE id = $1")
        .bind(a)
        .execute(&mut *claim)
        .await
        .unwrap();

    let mut kept = tokio::time::timeout(
        Duration::from_secs(5),
        repo::hosts::renew_leases(&pool, "h1", 30.0),
    )
    .await
    .expect("the renewal waited for the locked device row")
    .unwrap();
    kept.sort();
    let mut both = vec![a, b];
    both.sort();
    assert_eq!(kept, both, "both leases renewed, the locked device's too");
    let owner = tokio::time::timeout(
        Duration::from_secs(5),
        repo::hosts::device_owner(&pool, tenant, a),
    )
    .await
    .expect("the owner lookup waited")
    .unwrap();
    assert_eq!(owner.map(|o| o.0).as_deref(), Some("h1"));
    // another host cannot take a live lease, and does not wait to find that out
    let other = tokio::time::timeout(
        Duration::from_secs(5),
        repo::hosts::acquire_device(&pool, "h2", tenant, a, 30.0, TAKE),
    )
    .await
    .expect("the takeover attempt waited")
    .unwrap();
    assert_eq!(other, None);
    claim.commit().await.unwrap();

    // once the lease has run out, the other host takes it; the first one's renewal no longer
    // returns it (its session is closed there)
    sqlx::query(
        "UPDATE device_leases SET lease_until = now() - interval '1 second' WHERE device_id = $1",
    )
    .bind(a)
    .execute(&pool)
    .await
    .unwrap();
    // (not by a host back from an outage of the database: it leaves the lease to its holder
    // for a while, in its rounds and on demand)
    let leave = repo::hosts::Lapsed::Leave;
    let none = repo::hosts::acquire_devices(&pool, "h2", &["simulator"], 30.0, 10, leave);
    assert!(none.await.unwrap().is_empty());
    let none = repo::hosts::acquire_device(&pool, "h2", tenant, a, 30.0, leave);
    assert_eq!(none.await.unwrap(), None);
    let moved = repo::hosts::acquire_devices(&pool, "h2", &["simulator"], 30.0, 10, TAKE)
        .await
        .unwrap();
    assert_eq!(moved.iter().map(|m| m.0).collect::<Vec<_>>(), vec![a]);
    assert_eq!(moved[0].1, tenant);
    let kept = repo::hosts::renew_leases(&pool, "h1", 30.0).await.unwrap();
    assert_eq!(kept, vec![b]);
    assert_eq!(repo::hosts::release_all(&pool, "h2").await.unwrap(), 1);
    assert_eq!(owners(&pool).await[&a], None);
}

/// A device whose host died and that no other host takes over (every host is full, or there is
/// no other) is offline from the moment its lease ran out, whatever status its host last wrote:
/// its due messages wait through the offline grace and then end `skipped / device_offline`, as
/// a disconnected device's do, instead of waiting without end. A graceful stop ends its leases
/// the same way (it used to delete them, which left its devices looking served by nobody and
/// never offline).
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_device_no_host_serves_is_skipped_past_the_offline_grace(pool: PgPool) {
    let tenant = seed_tenant(&pool, "orphan@example.com").await;
    let orphan = seed_device(&pool, tenant, "orphan", 0.0, 0.0).await;
    seed_leads(&pool, tenant, orphan, 0, 5, "cars", LeadStatus::Prospect).await;
    // Its host takes it, reports it online, and dies without a goodbye.
    let dead = TestHost::start_as(&pool, "host-dead", Duration::from_secs(30), quiet_sim()).await;
    wait_for_status(&pool, tenant, orphan, "online").await;
    dead.running.server.abort();
    dead.running.leases.abort();
    // The other host serves the other device and takes nothing more (no lease rounds: full).
    let served = seed_device(&pool, tenant, "served", 0.0, 0.0).await;
    seed_leads(&pool, tenant, served, 100, 5, "cars", LeadStatus::Prospect).await;
    let live = TestHost::start_as(&pool, "host-live", Duration::from_secs(30), quiet_sim()).await;
    live.running.leases.abort();
    assert_eq!(
        owners(&pool).await,
        HashMap::from([
            (orphan, Some("host-dead".to_string())),
            (served, Some("host-live".to_string()))
        ])
    );
    // The dead host's lease runs out.
    sqlx::query("UPDATE device_leases SET lease_until = now() WHERE device_id = $1")
        .bind(orphan)
        .execute(&pool)
        .await
        .unwrap();
    let lease_ran_out = std::time::Instant::now();
    let grace = Duration::from_secs(4);
    // The worker's default host is the dead one: nothing reaches the orphan.
    let mut p = Pipeline::new(&pool, test_queue(5).await, &dead);
    p.processor.settings.offline_grace = grace;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.trigger().await;
    for _ in 0..5 {
        p.tick().await;
        while p.deliver().await > 0 {}
        sqlx::query("UPDATE broadcast_messages SET due_at = now() WHERE status = 'pending'")
            .execute(&pool)
            .await
            .unwrap();
    }
    let counts = status_counts(&pool, tenant, campaign).await;
    assert_eq!(counts.get("sent"), Some(&5), "{counts:?}");
    assert_eq!(
        counts.get("pending"),
        Some(&5),
        "within the grace the orphan's messages wait: {counts:?}"
    );
    sleep_past_grace(lease_ran_out, grace).await;
    p.tick().await;
    let rows = repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap();
    let orphaned: Vec<_> = rows.iter().filter(|r| r.device_id == orphan).collect();
    assert_eq!(orphaned.len(), 5);
    for r in orphaned {
        assert_eq!(
            (r.status.as_str(), r.reason.as_deref(), r.attempts),
            ("skipped", Some("device_offline"), 0),
            "{r:?}"
        );
    }
    // Its status is still the last its host wrote: only the lease tells.
    assert_eq!(
        repo::devices::get_device(&pool, tenant, orphan)
            .await
            .unwrap()
            .status,
        "online"
    );
    assert!(dead.sends().is_empty());
    assert!(live.sends().iter().all(|e| e.device_id == served));

    // A graceful stop: the served device's lease ends, and with a grace of 0 ("skip offline
    // devices at once") its next messages are skipped like the orphan's.
    assert_eq!(live.running.host.release_all().await.unwrap(), 1);
    p.processor.settings.offline_grace = Duration::ZERO;
    let second = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.trigger().await;
    p.tick().await;
    assert_eq!(
        status_counts(&pool, tenant, second).await.get("skipped"),
        Some(&10)
    );
    assert_eq!(live.sends().len(), 5);
}

/// A database outage longer than the offline grace: no host could renew a lease meanwhile, so
/// every lease ran out long before the database came back. Those ends say nothing of the
/// devices: the first processor tick after it skipped every due message of every device as
/// `device_offline` before any host could renew. A lease's end now counts from the processors'
/// return plus a settling time; a device whose host did not come back is skipped after that.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn leases_that_ran_out_while_the_database_was_away_skip_nothing(pool: PgPool) {
    let tenant = seed_tenant(&pool, "outage@example.com").await;
    let d = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 5, "cars", LeadStatus::Prospect).await;
    let host = TestHost::start_as(&pool, "host-a", Duration::from_secs(30), quiet_sim()).await;
    wait_for_status(&pool, tenant, d, "online").await;
    host.running.leases.abort();
    let mut p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.processor.settings.offline_grace = Duration::from_secs(60);
    assert_eq!(
        p.tick().await.resumed,
        0,
        "the first tick ever marks no return"
    );
    let outage = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    // A gap shorter than the grace marks none either: no lease can have run out for longer.
    outage("UPDATE processor_liveness SET last_tick_at = now() - interval '50 seconds'").await;
    assert_eq!(p.tick().await.resumed, 0);
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.trigger().await;
    // Ten minutes without the database: no processor ticked, the lease ran out 9.5 minutes ago.
    outage("UPDATE processor_liveness SET last_tick_at = now() - interval '10 minutes'").await;
    outage("UPDATE device_leases SET lease_until = now() - interval '570 seconds'").await;

    let r = p.tick().await;
    assert_eq!((r.resumed, r.skipped_offline), (1, 0), "{r:?}");
    // The host renews its lease (its first round after the outage), and the campaign goes out.
    let round = host.running.host.lease_round().await.unwrap();
    assert_eq!(round.kept, 1);
    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    assert_eq!(
        status_counts(&pool, tenant, campaign).await,
        HashMap::from([("sent".to_string(), 5)])
    );
    assert_eq!(host.sends().len(), 5);

    // Another outage, and this time the host does not come back: within the settling time
    // after the processors' return its device's messages wait (even with a grace of 0), past
    // it they are skipped as a device nobody serves. (Its pacing cursor is far ahead, so that
    // no claim takes them meanwhile: its status still says `online`.)
    p.processor.settings.offline_grace = Duration::ZERO;
    let second = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.trigger().await;
    outage("UPDATE devices SET next_send_at = now() + interval '1 hour'").await;
    outage("UPDATE processor_liveness SET last_tick_at = now() - interval '10 minutes'").await;
    outage("UPDATE device_leases SET lease_until = now() - interval '570 seconds'").await;
    let r = p.tick().await;
    assert_eq!((r.resumed, r.skipped_offline), (1, 0), "{r:?}");
    let r = p.tick().await;
    assert_eq!((r.resumed, r.skipped_offline), (0, 0), "{r:?}");
    outage("UPDATE processor_liveness SET resumed_at = now() - interval '31 seconds'").await;
    let r = p.tick().await;
    assert_eq!((r.resumed, r.skipped_offline), (0, 5), "{r:?}");
    let counts = status_counts(&pool, tenant, second).await;
    assert_eq!(counts.get("skipped"), Some(&5), "{counts:?}");
}

/// One message of a device served by `host-a` (its lease round stopped), claimed three minutes
/// ago and past its lease, its attempt recorded by `host-a`, with a processor that has ticked
/// once.
async fn a_send_of_host_a_past_its_lease(pool: &PgPool, email: &str) -> (TestHost, Pipeline) {
    let tenant = seed_tenant(pool, email).await;
    let d = seed_device(pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(pool, tenant, d, 0, 1, "cars", LeadStatus::Prospect).await;
    let host = TestHost::start_as(pool, "host-a", Duration::from_secs(30), quiet_sim()).await;
    wait_for_status(pool, tenant, d, "online").await;
    host.running.leases.abort();
    let p = Pipeline::new(pool, test_queue(5).await, &host);
    p.tick().await;
    seed_campaign(pool, tenant, &CampaignSpec::default()).await;
    p.trigger().await;
    sqlx::query(
        "UPDATE broadcast_messages SET status = 'sending', attempts = 1, enqueue_count = 1,
             sending_at = now() - interval '3 minutes', lease_until = now() - interval '1 s'",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO host_sends
             (message_id, tenant_id, device_id, provider_message_id, state, host_id, claim)
         SELECT id, tenant_id, device_id, 'p-1', 'attempting', 'host-a', 1
         FROM broadcast_messages",
    )
    .execute(pool)
    .await
    .unwrap();
    (host, p)
}

/// A send its host was on when the database went away: right after the outage the host's
/// lease looks lapsed until it renews it, and the rescuer would take the row for one whose host
/// is lost (back to `pending`, an attempt spent, its record resolved through the provider on
/// the next attempt). Within the settling time after the processors' return it waits; then its
/// host, which renewed the lease, keeps it.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_send_under_way_across_an_outage_is_left_to_its_host(pool: PgPool) {
    let (host, p) = a_send_of_host_a_past_its_lease(&pool, "outage-send@example.com").await;
    let run = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    // Ten minutes without the database.
    run("UPDATE processor_liveness SET last_tick_at = now() - interval '10 minutes'").await;
    run("UPDATE device_leases SET lease_until = now() - interval '570 seconds'").await;
    let status = || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM broadcast_messages")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let r = p.tick().await;
    assert_eq!(
        (r.resumed, r.reconciled_retry, r.reconciled_host_lost),
        (1, 0, 0),
        "{r:?}"
    );
    assert_eq!(status().await, "sending");
    // The host renews its lease; past the settling time the row is its host's still.
    assert_eq!(host.running.host.lease_round().await.unwrap().kept, 1);
    run("UPDATE processor_liveness
         SET resumed_at = now() - interval '31 seconds', back_at = now() - interval '31 seconds'")
    .await;
    let r = p.tick().await;
    assert_eq!(
        (r.reconciled_retry, r.sending_leases_renewed),
        (0, 1),
        "{r:?}"
    );
    assert_eq!(status().await, "sending");
}

/// A failover of a minute under the default grace of five minutes: not long enough to hold back
/// the offline judgement, but every lease ran out meanwhile all the same, and until the hosts
/// renew, the rescuer took a `sending` row whose host was still on it for one whose host was
/// lost (back to `pending`, an attempt spent). It waits for the settling time after any gap of
/// an outage's length; a gap of a few ticks is no outage and holds nothing back.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_send_under_way_across_a_short_failover_is_left_to_its_host(pool: PgPool) {
    let (host, p) = a_send_of_host_a_past_its_lease(&pool, "failover-send@example.com").await;
    assert_eq!(p.processor.settings.offline_grace, Duration::from_secs(300));
    let run = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    let status = || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM broadcast_messages")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // A minute without the database; the device's lease ran out 40 s ago.
    run("UPDATE processor_liveness SET last_tick_at = now() - interval '1 minute'").await;
    run("UPDATE device_leases SET lease_until = now() - interval '40 seconds'").await;
    let r = p.tick().await;
    assert_eq!(
        (
            r.back,
            r.resumed,
            r.reconciled_retry,
            r.reconciled_host_lost
        ),
        (1, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!(status().await, "sending");
    // The host renews its lease; past the settling time the row is its host's still.
    assert_eq!(host.running.host.lease_round().await.unwrap().kept, 1);
    run("UPDATE processor_liveness SET back_at = now() - interval '31 seconds'").await;
    let r = p.tick().await;
    assert_eq!(
        (r.back, r.reconciled_retry, r.sending_leases_renewed),
        (0, 0, 1),
        "{r:?}"
    );
    assert_eq!(status().await, "sending");

    // A gap of a few seconds is no outage: a row whose host did lose the device is taken back
    // at once.
    run("UPDATE broadcast_messages SET lease_until = now() - interval '1 s'").await;
    run("UPDATE device_leases SET lease_until = now() - interval '40 seconds'").await;
    run("UPDATE processor_liveness SET last_tick_at = now() - interval '5 seconds'").await;
    let r = p.tick().await;
    assert_eq!((r.back, r.reconciled_retry), (0, 1), "{r:?}");
    assert_eq!(status().await, "pending");
}

/// The processors judge an outage by the device leases the hosts record, not by a setting of
/// their own that must match the hosts'. A deployment that set `DEVICE_LEASE_S` on its hosts
/// alone left the processors at 30 s: with 6 s host leases, a 5 s gap went unmarked although
/// it let the leases run out, and the rescuer could take a row whose host was still sending it.
/// The shortest lease a host holds devices by sets the outage's gap, the longest the settling
/// time; a host that holds none counts for nothing, one of an earlier version (no lease
/// recorded) as the processor's own setting.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_processors_judge_an_outage_by_the_leases_the_hosts_record(pool: PgPool) {
    let tenant = seed_tenant(&pool, "recorded-lease@example.com").await;
    let d1 = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    let d2 = seed_device(&pool, tenant, "d2", 0.0, 0.0).await;
    for (host, lease_s) in [("fast", 6.0), ("slow", 45.0), ("idle", 1.0)] {
        repo::hosts::register_host(&pool, host, "http://127.0.0.1:1", lease_s)
            .await
            .unwrap();
    }
    for (host, device) in [("fast", d1), ("slow", d2)] {
        let taken = repo::hosts::acquire_device(&pool, host, tenant, device, 30.0, TAKE)
            .await
            .unwrap();
        assert!(taken.is_some(), "{host}");
    }
    let span = |fallback_s: f64| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            repo::hosts::device_lease_span(&mut conn, fallback_s)
                .await
                .unwrap()
        }
    };
    assert_eq!(span(30.0).await, (6.0, 45.0));

    let processor = broadcast_processor::Deps {
        pool: pool.clone(),
        queue: test_queue(3).await,
        settings: broadcast_processor::Settings::default(),
    };
    assert_eq!(processor.settings.device_lease, Duration::from_secs(30));
    let tick = || async {
        let mut r = broadcast_processor::Report::default();
        broadcast_processor::tick(&processor, &processor.settings, &mut r)
            .await
            .unwrap();
        r
    };
    let gap = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    let settle_s = || async {
        sqlx::query_scalar::<_, f64>("SELECT settle_s FROM processor_liveness")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    tick().await; // the first tick marks nothing
                  // 5 s without a processor: more than two thirds of the fast host's 6 s lease.
    gap("UPDATE processor_liveness SET last_tick_at = now() - interval '5 seconds'").await;
    let r = tick().await;
    assert_eq!(r.back, 1, "{r:?}");
    assert_eq!(settle_s().await, 45.0);
    // 3 s is no outage for any of them.
    gap("UPDATE processor_liveness SET last_tick_at = now() - interval '3 seconds'").await;
    assert_eq!(tick().await.back, 0);

    // The fast host of an earlier version, which recorded no lease: it counts as the
    // processor's 30 s, and 5 s is no outage any more.
    gap("UPDATE hosts SET device_lease_s = NULL WHERE id = 'fast'").await;
    assert_eq!(span(30.0).await, (30.0, 45.0));
    gap("UPDATE processor_liveness SET last_tick_at = now() - interval '5 seconds'").await;
    assert_eq!(tick().await.back, 0);
    // With no host holding a device, the processor's own setting stands.
    gap("DELETE FROM device_leases").await;
    assert_eq!(span(12.0).await, (12.0, 12.0));
    tick().await;
    assert_eq!(settle_s().await, 30.0);
}

/// An outage of the database longer than the lease: no host could renew, so every lease ran
/// out, and whichever host's round came first afterwards took every device it had room for
/// (web sessions closed on one host and opened on another's address, for every device of the
/// others). A host whose rounds failed renews its own leases and leaves the others' lapsed
/// leases alone, in its rounds and on demand, for one lease after its first round that
/// succeeds; after that it takes the devices of a host that did not come back.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn after_a_database_outage_each_host_keeps_its_own_devices(pool: PgPool) {
    let tenant = seed_tenant(&pool, "failover@example.com").await;
    let d1 = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    let d2 = seed_device(&pool, tenant, "d2", 0.0, 0.0).await;
    let a = TestHost::start_as(&pool, "host-a", Duration::from_secs(30), quiet_sim()).await;
    wait_for_status(&pool, tenant, d1, "online").await;
    wait_for_status(&pool, tenant, d2, "online").await;
    let lease = Duration::from_millis(1_500);
    let b = TestHost::start_as(&pool, "host-b", lease, quiet_sim()).await;
    a.running.leases.abort();
    b.running.leases.abort();
    let all_a = HashMap::from([
        (d1, Some("host-a".to_string())),
        (d2, Some("host-a".to_string())),
    ]);
    assert_eq!(owners(&pool).await, all_a);

    // The outage: every lease ran out while no host could write one.
    sqlx::query("UPDATE device_leases SET lease_until = now() - interval '1 minute'")
        .execute(&pool)
        .await
        .unwrap();
    database_away_for(&pool, "INSERT OR UPDATE", "device_leases", "true").await;
    assert!(b.running.host.lease_round().await.is_err());
    assert!(a.running.host.lease_round().await.is_err());
    database_back(&pool).await;

    // B's round comes first: it takes nothing, and nothing on demand either.
    let r = b.running.host.lease_round().await.unwrap();
    assert_eq!((r.kept, r.acquired), (0, 0), "{r:?}");
    let asked = b.running.host.device(tenant, d1).await.map(|d| d.id);
    assert_eq!(asked.map_err(|e| e.code), Err(code::WRONG_HOST));
    // A renews its own.
    let r = a.running.host.lease_round().await.unwrap();
    assert_eq!((r.kept, r.released, r.acquired), (2, 0, 0), "{r:?}");
    assert_eq!(owners(&pool).await, all_a);
    assert_eq!(a.running.host.device_count(), 2);
    assert_eq!(b.running.host.device_count(), 0);

    // A dies after all; once B has been back for a whole lease it takes A's devices over.
    sqlx::query("UPDATE device_leases SET lease_until = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    let r = b.running.host.lease_round().await.unwrap();
    assert_eq!(r.acquired, 0, "{r:?}");
    tokio::time::sleep(lease).await;
    let r = b.running.host.lease_round().await.unwrap();
    assert_eq!(r.acquired, 2, "{r:?}");
    assert_eq!(
        owners(&pool).await,
        HashMap::from([
            (d1, Some("host-b".to_string())),
            (d2, Some("host-b".to_string())),
        ])
    );
}

/// A host whose lease ran out may not have noticed yet that another host took the device (it
/// stalled, or could not reach the database to renew): a request routed to it before the
/// takeover must not send through the device beside its new host. It answers `wrong_host`
/// (retried; the next claim routes the message to the owner) and records nothing, and the
/// owner sends the message once.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_host_that_lost_the_device_unnoticed_sends_nothing_through_it(pool: PgPool) {
    let tenant = seed_tenant(&pool, "unnoticed@example.com").await;
    let d = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 1, "cars", LeadStatus::Prospect).await;
    let a = TestHost::start_as(&pool, "host-a", Duration::from_secs(30), quiet_sim()).await;
    wait_for_status(&pool, tenant, d, "online").await;
    let b = TestHost::start_as(&pool, "host-b", Duration::from_secs(30), quiet_sim()).await;
    a.running.leases.abort();
    b.running.leases.abort();
    let p = Pipeline::new(&pool, test_queue(5).await, &a);
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.trigger().await;
    p.tick().await;
    // The worker's claim, routed to A while A held the device; then B takes it over.
    sqlx::query(
        "UPDATE broadcast_messages SET status = 'sending', attempts = 1, sending_at = now(),
             lease_until = now() + interval '2 minutes'",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE device_leases SET host_id = 'host-b' WHERE device_id = $1")
        .bind(d)
        .execute(&pool)
        .await
        .unwrap();
    let row = &repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap()[0];
    let request = shared::host_api::SendRequest {
        message_id: row.id,
        tenant_id: tenant,
        device_id: d,
        to: row.recipient.clone(),
        text: row.body.clone(),
        image: None,
        template: None,
    };
    let err = a.running.host.send(&request).await.unwrap_err();
    assert_eq!(
        (err.code, err.retryable),
        (code::WRONG_HOST, true),
        "{err:?}"
    );
    assert!(a.sends().is_empty());
    let records: i64 = sqlx::query_scalar("SELECT count(*) FROM host_sends")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(records, 0);
    let sent = b.running.host.send(&request).await.unwrap();
    assert!(!sent.duplicate);
    assert_eq!(b.sends().len(), 1);
    assert!(a.sends().is_empty());
}

/// The host's record of an outage the workers met: (since, latest failure).
async fn outage(pool: &PgPool, host: &str) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    sqlx::query_as("SELECT unreachable_since, unreachable_at FROM hosts WHERE id = $1")
        .bind(host)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_host_the_workers_cannot_reach_is_given_up_on_past_the_offline_grace(pool: PgPool) {
    let tenant = seed_tenant(&pool, "hidden@example.com").await;
    let d = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 5, "cars", LeadStatus::Prospect).await;
    let host = TestHost::start_as(&pool, "host-hidden", Duration::from_secs(30), quiet_sim()).await;
    wait_for_status(&pool, tenant, d, "online").await;
    // The host keeps the device's lease (as a host that renews it does: no other host may take
    // the device) but advertises an address where nothing answers.
    host.running.leases.abort();
    let real_url: String = sqlx::query_scalar("SELECT url FROM hosts WHERE id = 'host-hidden'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let nowhere = format!("http://127.0.0.1:{}", wabcast_tests::process::free_port());
    sqlx::query("UPDATE hosts SET url = $1 WHERE id = 'host-hidden'")
        .bind(&nowhere)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE device_leases SET lease_until = now() + interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();
    let grace = Duration::from_secs(4);
    let mut p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.processor.settings.offline_grace = grace;
    let first = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.trigger().await;
    p.tick().await;
    while p.deliver().await > 0 {}
    let first_failure = std::time::Instant::now();
    let (since, at) = outage(&pool, "host-hidden").await;
    assert!(since.is_some() && since == at, "{since:?} {at:?}");
    // Within the grace the messages come back (brought due at once: the lease's end is an hour
    // away) and find the host unreachable again, with no attempt used; the outage keeps its
    // start.
    for _ in 0..3 {
        sqlx::query("UPDATE broadcast_messages SET due_at = now() WHERE status = 'pending'")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(p.tick().await.skipped_unreachable, 0);
        while p.deliver().await > 0 {}
    }
    for r in repo::messages::list_campaign_messages(&pool, tenant, first)
        .await
        .unwrap()
    {
        assert_eq!((r.status.as_str(), r.attempts), ("pending", 0), "{r:?}");
        assert!(
            r.last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("host_unreachable")),
            "{r:?}"
        );
    }
    let (since_later, at_later) = outage(&pool, "host-hidden").await;
    assert_eq!(since_later, since);
    assert!(at_later > at);

    // Past the grace: the messages that found the host unreachable are skipped. A new
    // campaign's messages, not tried yet, are not: each gets its own attempt first.
    sleep_past_grace(first_failure, grace).await;
    let second = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.trigger().await;
    assert_eq!(p.tick().await.skipped_unreachable, 5);
    for r in repo::messages::list_campaign_messages(&pool, tenant, first)
        .await
        .unwrap()
    {
        assert_eq!(
            (r.status.as_str(), r.reason.as_deref(), r.attempts),
            ("skipped", Some("host_unreachable"), 0),
            "{r:?}"
        );
    }
    assert_eq!(
        status_counts(&pool, tenant, second).await.get("queued"),
        Some(&5)
    );
    assert_eq!(
        repo::devices::get_device(&pool, tenant, d)
            .await
            .unwrap()
            .status,
        "online"
    );
    assert!(host.sends().is_empty());

    // The address is fixed: the next answer ends the outage, and the new campaign goes out.
    sqlx::query("UPDATE hosts SET url = $1 WHERE id = 'host-hidden'")
        .bind(&real_url)
        .execute(&pool)
        .await
        .unwrap();
    p.run_until_done(&[(tenant, second)], Duration::from_secs(30))
        .await;
    assert_eq!(
        status_counts(&pool, tenant, second).await.get("sent"),
        Some(&5)
    );
    assert_eq!(host.sends().len(), 5);
    assert_eq!(outage(&pool, "host-hidden").await, (None, None));
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_outage_starts_again_after_a_quiet_gap_or_a_new_address(pool: PgPool) {
    repo::hosts::register_host(&pool, "h", "http://10.0.0.1:8080", 30.0)
        .await
        .unwrap();
    let hosts = ["h".to_string()];
    repo::hosts::mark_unreachable(&pool, &hosts).await.unwrap();
    let (since, at) = outage(&pool, "h").await;
    assert!(since.is_some() && since == at);
    // A failure within the gap continues the outage.
    sqlx::query(
        "UPDATE hosts SET unreachable_since = now() - interval '1 hour',
                          unreachable_at = now() - interval '5 minutes'",
    )
    .execute(&pool)
    .await
    .unwrap();
    repo::hosts::mark_unreachable(&pool, &hosts).await.unwrap();
    let continued: bool = sqlx::query_scalar(
        "SELECT unreachable_since < now() - interval '59 minutes'
                AND unreachable_at > now() - interval '1 minute' FROM hosts",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(continued);
    // Nobody tried for longer than the gap: the host may have been reachable meanwhile, so a
    // new failure starts a new outage.
    sqlx::query("UPDATE hosts SET unreachable_at = now() - make_interval(secs => $1 + 1)")
        .bind(repo::hosts::OUTAGE_GAP_S)
        .execute(&pool)
        .await
        .unwrap();
    repo::hosts::mark_unreachable(&pool, &hosts).await.unwrap();
    let restarted: bool =
        sqlx::query_scalar("SELECT unreachable_since > now() - interval '1 minute' FROM hosts")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(restarted);
    // Re-registering at the same address keeps the record; a new address ends it.
    repo::hosts::register_host(&pool, "h", "http://10.0.0.1:8080", 30.0)
        .await
        .unwrap();
    assert!(outage(&pool, "h").await.0.is_some());
    repo::hosts::register_host(&pool, "h", "http://10.0.0.2:8080", 30.0)
        .await
        .unwrap();
    assert_eq!(outage(&pool, "h").await, (None, None));
    // An answer ends it too.
    repo::hosts::mark_unreachable(&pool, &hosts).await.unwrap();
    repo::hosts::mark_reachable(&pool, &hosts).await.unwrap();
    assert_eq!(outage(&pool, "h").await, (None, None));
}

/// The whole of an outage, end to end: PostgreSQL goes away (every connection closed, new
/// ones refused) for longer than the device leases while a campaign runs through two hosts, the
/// processor and the workers, and comes back. Nothing is sent while it is away (no attempt can
/// be recorded), every message then ends `sent`, each sent once, and no device changes host:
/// the standby takes nothing although every lease ran out. Records the workers could not
/// claim meanwhile are received again until the dead-letter queue takes them; their rows stay
/// `queued`, and the rescuer enqueues them again after their lease.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_campaign_runs_through_a_whole_outage_of_the_database(pool: PgPool) {
    whole_outage(pool, Duration::from_millis(5)).await;
}

/// The same with every send taking 400 ms at the provider (a web session's typing pause), so
/// that the outage begins with sends under way: their hosts finish them, and the outcomes
/// neither host nor worker could write are written once the database is back.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_whole_outage_of_the_database_with_sends_under_way(pool: PgPool) {
    whole_outage(pool, Duration::from_millis(400)).await;
}

async fn whole_outage(pool: PgPool, latency: Duration) {
    use shared::queue::Queue;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let tenant = seed_tenant(&pool, "whole-outage@example.com").await;
    let devices = seed_devices_with_leads(&pool, tenant, 4, 20, (0.15, 0.25)).await;
    let total = 4 * 20;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;

    // Everything but the test's own checks reaches PostgreSQL through the relay.
    let relay = wabcast_tests::relay::Relay::to_database(&pool).await;
    let through = relay.pool(20, Duration::from_secs(1));
    let (a, b, whatsapp) = two_hosts_one_whatsapp(&through, latency).await;
    let log_path = whatsapp.path().join("whatsapp.jsonl");
    let all_a = owners(&pool).await;
    assert_eq!(all_a.len(), devices.len());
    assert!(all_a.values().all(|h| h.as_deref() == Some("host-a")));

    // The worker's default host is B: A's devices reach A only through the routing. Short
    // leases and visibility, and few receives, so that the rescuer and the dead-letter queue
    // play their part within the test.
    let mut p = Pipeline::new(&through, test_queue(2).await, &b);
    p.processor.settings.lease = Duration::from_secs(3);
    p.worker.settings.lease = Duration::from_secs(3);
    // The processor is not told the hosts' lease (its own `device_lease` stays at 30 s): each
    // host records its own, and a gap of two thirds of it is an outage, after which the
    // processor waits a lease for the hosts to renew.
    assert!(p.processor.settings.device_lease > 10 * TWO_HOSTS_LEASE);
    let p = Arc::new(p);
    let stop = Arc::new(AtomicBool::new(false));
    let runner = tokio::spawn({
        let p = p.clone();
        let stop = stop.clone();
        async move {
            while !stop.load(Ordering::SeqCst) {
                // Any step may fail while the database is away; the next round tries again.
                let _ = campaign_trigger::handle(serde_json::json!({}), &p.trigger).await;
                let mut report = broadcast_processor::Report::default();
                let _ = broadcast_processor::tick(&p.processor, &p.processor.settings, &mut report)
                    .await;
                while let Ok(msgs) = p.queue.receive(10, Duration::from_secs(1)).await {
                    if msgs.is_empty() {
                        break;
                    }
                    let event = shared::queue::to_sqs_event(&msgs, "arn:aws:sqs:local:0:t.fifo");
                    let response = message_worker::handle(event, &p.worker).await;
                    let _ = p.queue.delete_batch(&succeeded(&msgs, response)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let sent = || SendLog::read(&log_path).unwrap().len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // With slow sends, the outage begins while some are under way: recorded by their host, not
    // yet accepted by the provider (not in its log).
    let under_way = || async {
        let attempting: Vec<String> = sqlx::query_scalar(
            "SELECT provider_message_id FROM host_sends WHERE state = 'attempting'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let log = SendLog::read(&log_path).unwrap();
        attempting
            .iter()
            .filter(|p| !log.iter().any(|e| &e.provider_message_id == *p))
            .count()
    };
    let slow = latency >= Duration::from_millis(100);
    while sent() < total / 4 || (slow && under_way().await == 0) {
        assert!(tokio::time::Instant::now() < deadline, "sent {}", sent());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The outage, longer than two leases.
    let open = relay.cut();
    let sent_at_cut = sent();
    assert!(open > 0, "no connection was open through the relay");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let finished_in_the_outage = sent() - sent_at_cut;
    if slow {
        assert!(
            finished_in_the_outage > 0,
            "no send was under way when the database went away"
        );
    }
    let sent_at_cut = sent();
    assert!(sent_at_cut < total, "the campaign ended before the outage");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        sent(),
        sent_at_cut,
        "a message went out while no attempt could be recorded"
    );
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM device_leases WHERE lease_until > now()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(live, 0, "every lease ran out");
    relay.restore();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM broadcast_messages
             WHERE campaign_id = $1 AND status IN ('pending', 'queued', 'sending')",
        )
        .bind(campaign)
        .fetch_one(&pool)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} rows still open after the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    runner.await.unwrap();

    every_message_sent_once(&pool, tenant, campaign, total, &log_path).await;
    // No device changed host, and the standby sent nothing.
    assert_eq!(owners(&pool).await, all_a);
    let hosts: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT host_id FROM host_sends WHERE state <> 'withdrawn'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(hosts, ["host-a"]);
    // The outage cost no attempt: a send the host could not record was never offered.
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT DISTINCT attempts FROM broadcast_messages")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, [1]);
    let stats = p.queue.stats().await.unwrap();
    eprintln!(
        "outage: {open} connections cut, {sent_at_cut} of {total} sent before it \
         ({finished_in_the_outage} of them under way at the cut); dead-lettered {}",
        stats.dead_letter
    );
    drop((a, b));
}

/// A restriction outlives the session that learned it. Host A's sessions record two devices
/// `restricted` (as a web session does on a nack 463: one until a time, one until a person acts,
/// as a Cloud API restriction is); A stops and B takes the devices over, its sessions writing
/// `online`. The processor still claims nothing for them: the timed one only once its time has
/// passed, the other only once a person has connected it again. Before, B's `online` ended
/// both restrictions, and the processor sent to new contacts inside them.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_restriction_outlives_the_host_that_recorded_it(pool: PgPool) {
    let tenant = seed_tenant(&pool, "restricted@example.com").await;
    let held = seed_device(&pool, tenant, "held", 0.0, 0.0).await;
    let timed = seed_device(&pool, tenant, "timed", 0.0, 0.0).await;
    let free = seed_device(&pool, tenant, "free", 0.0, 0.0).await;
    for (i, d) in [held, timed, free].into_iter().enumerate() {
        seed_leads(
            &pool,
            tenant,
            d,
            10 * i as u64,
            2,
            "cars",
            LeadStatus::Prospect,
        )
        .await;
    }
    let a = TestHost::start_as(&pool, "host-a", Duration::from_secs(30), quiet_sim()).await;
    let why = "WhatsApp refused a message (nack 463: reach-out restriction)";
    // (to the microsecond, as PostgreSQL keeps it)
    let ends =
        DateTime::from_timestamp_micros((Utc::now().timestamp_micros()) + 4_000_000).unwrap();
    for (d, until) in [(held, None), (timed, Some(ends))] {
        let mut tx = pool.begin().await.unwrap();
        let written = repo::devices::set_device_status_until(
            &mut tx,
            Some("host-a"),
            tenant,
            d,
            shared::domain::DeviceStatus::Restricted,
            Some(why),
            until,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert!(written);
    }
    // A stops; B takes the devices over, and its sessions come online.
    a.running.leases.abort();
    a.running.host.release_all().await.unwrap();
    let b = TestHost::start_as(&pool, "host-b", Duration::from_secs(30), quiet_sim()).await;
    for d in [held, timed] {
        until_status(&pool, d, "online").await;
    }
    let load = repo::devices::list_device_load(&pool, Some(tenant))
        .await
        .unwrap();
    for l in &load {
        let restricted = l.id != free;
        assert_eq!(l.restriction.is_some(), restricted, "{l:?}");
    }
    assert!(load
        .iter()
        .any(|l| l.id == held && l.restricted_until.is_none()));
    assert!(load
        .iter()
        .any(|l| l.id == timed && l.restricted_until == Some(ends)));

    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &b);
    assert_eq!(p.trigger().await.rows_created, 6);
    let claimed = || {
        let pool = pool.clone();
        async move {
            let rows: Vec<(Uuid, i64)> = sqlx::query_as(
                "SELECT device_id, count(*) FROM broadcast_messages
                 WHERE status <> 'pending' GROUP BY device_id",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.into_iter().collect::<HashMap<_, _>>()
        }
    };
    for _ in 0..3 {
        p.tick().await;
    }
    assert_eq!(claimed().await, HashMap::from([(free, 2)]));

    // The timed restriction ends on its own; the other holds.
    while Utc::now() <= ends {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        p.tick().await;
    }
    assert_eq!(claimed().await, HashMap::from([(free, 2), (timed, 2)]));

    // A person connects the device again: its restriction is lifted, and it sends.
    b.client.connect_device(tenant, held).await.unwrap();
    for _ in 0..3 {
        p.tick().await;
    }
    assert_eq!(
        claimed().await,
        HashMap::from([(free, 2), (timed, 2), (held, 2)])
    );
    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
}

/// A graceful stop marks the devices whose sessions it closes `offline, host stopped` with the
/// leases it ends, in one transaction: the sessions' own closing statuses are written by a task
/// a stopping process does not wait for, and left most devices showing `online` with nobody
/// serving them. A restriction and a device awaiting pairing keep their status; another
/// host's device is not touched.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_graceful_stop_marks_the_sessions_it_closes_offline(pool: PgPool) {
    use shared::domain::DeviceStatus;
    let tenant = seed_tenant(&pool, "stop@example.com").await;
    let on = seed_device(&pool, tenant, "on", 0.0, 0.0).await;
    let held = seed_device(&pool, tenant, "held", 0.0, 0.0).await;
    let new = seed_device(&pool, tenant, "new", 0.0, 0.0).await;
    let elsewhere = seed_device(&pool, tenant, "elsewhere", 0.0, 0.0).await;
    let mut tx = pool.begin().await.unwrap();
    for (d, status) in [
        (held, DeviceStatus::Restricted),
        (new, DeviceStatus::AwaitingPairing),
    ] {
        repo::devices::set_device_status(&mut tx, None, tenant, d, status, Some("why"))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    for d in [on, held, new] {
        hold_device(&pool, d, "host-a").await;
    }
    hold_device(&pool, elsewhere, "host-b").await;

    assert_eq!(repo::hosts::release_all(&pool, "host-a").await.unwrap(), 3);
    let rows: Vec<(Uuid, String, Option<String>)> =
        sqlx::query_as("SELECT id, status, status_reason FROM devices")
            .fetch_all(&pool)
            .await
            .unwrap();
    let of = |d: Uuid| {
        let r = rows.iter().find(|r| r.0 == d).unwrap();
        (r.1.as_str(), r.2.as_deref())
    };
    assert_eq!(of(on), ("offline", Some("host stopped")));
    assert_eq!(of(held), ("restricted", Some("why")));
    assert_eq!(of(new), ("awaiting_pairing", Some("why")));
    assert_eq!(of(elsewhere).0, "online");
    assert_eq!(
        owners(&pool).await.get(&elsewhere),
        Some(&Some("host-b".into()))
    );
}

/// A message queued before its device's restriction was recorded (or before a host that took
/// the device over reconnected it) is not sent when its record arrives: the worker puts it back
/// to `pending`, where it waits for the restriction to end like the device's other messages.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_message_queued_before_a_restriction_waits_for_its_end(pool: PgPool) {
    let tenant = seed_tenant(&pool, "queued@example.com").await;
    let d = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 1, "cars", LeadStatus::Prospect).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.trigger().await;
    p.tick().await;
    assert_eq!(
        status_counts(&pool, tenant, campaign).await.get("queued"),
        Some(&1)
    );

    let mut tx = pool.begin().await.unwrap();
    repo::devices::set_device_status(
        &mut tx,
        None,
        tenant,
        d,
        shared::domain::DeviceStatus::Restricted,
        Some("Meta restricted the number (131048)"),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(p.deliver().await, 1);
    assert_eq!(
        status_counts(&pool, tenant, campaign).await.get("pending"),
        Some(&1)
    );
    for _ in 0..3 {
        p.tick().await;
    }
    assert_eq!(
        status_counts(&pool, tenant, campaign).await.get("pending"),
        Some(&1)
    );
    assert!(host.sends().is_empty());

    // A person connects it again: the message goes, once.
    host.client.connect_device(tenant, d).await.unwrap();
    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    assert_eq!(host.sends().len(), 1);
}
