//! End-to-end behaviour of the campaign pipeline on real PostgreSQL and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::domain::{LeadStatus, TargetStatus};
use shared::repo;
use sqlx::PgPool;
use std::time::Duration;
use wabcast_tests::SimConfig;
use wabcast_tests::*;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_campaign_reaches_every_matching_lead_once(pool: PgPool) {
    let tenant = seed_tenant(&pool, "a@example.com").await;
    let d1 = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    let d2 = seed_device(&pool, tenant, "d2", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d1, 0, 30, "cars,loans", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, d2, 1000, 20, "cars", LeadStatus::Customer).await;
    // Not matching: wrong niche (a substring of the niche must not match), wrong status.
    seed_leads(&pool, tenant, d2, 2000, 5, "carpets", LeadStatus::Prospect).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let queue = test_queue(5).await;
    let p = Pipeline::new(&pool, queue, &host);
    let campaign = seed_campaign(
        &pool,
        tenant,
        &CampaignSpec {
            target: TargetStatus::Prospect,
            ..Default::default()
        },
    )
    .await;
    let other = seed_campaign(
        &pool,
        tenant,
        &CampaignSpec {
            target: TargetStatus::Customer,
            template: "Hey {first_name:boss}",
            ..Default::default()
        },
    )
    .await;
    p.run_until_done(
        &[(tenant, campaign), (tenant, other)],
        Duration::from_secs(60),
    )
    .await;

    assert_eq!(
        status_counts(&pool, tenant, campaign).await.get("sent"),
        Some(&30)
    );
    assert_eq!(
        status_counts(&pool, tenant, other).await.get("sent"),
        Some(&20)
    );
    let sends = host.sends();
    assert_eq!(sends.len(), 50);
    assert!(sends_per_message(&sends).values().all(|n| *n == 1));
    // Each message went out through its lead's own device, rendered for that lead.
    let rows = shared::repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap();
    for r in &rows {
        assert_eq!(r.device_id, d1);
        assert!(
            r.body == format!("Hi {}!", name_of(r)) || r.body == format!("Hello {}!", name_of(r)),
            "{}",
            r.body
        );
        assert_eq!(r.reason.as_deref(), Some("accepted"));
        assert!(r.provider_message_id.is_some());
    }
    for e in sends
        .iter()
        .filter(|e| rows.iter().any(|r| r.id == e.message_id))
    {
        assert_eq!(e.device_id, d1);
    }
    let c = shared::repo::campaigns::get_campaign(&pool, tenant, campaign)
        .await
        .unwrap();
    assert_eq!(c.status, "completed");
}

fn name_of(r: &shared::repo::messages::MessageRow) -> String {
    // Leads with index divisible by 5 have no name: the fallback "there" is used.
    let idx: u64 = r.recipient[4..].parse().unwrap();
    if idx.is_multiple_of(5) {
        "there".into()
    } else {
        format!("Lead {idx}")
    }
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn fan_out_keeps_bodies_byte_for_byte(pool: PgPool) {
    let tenant = seed_tenant(&pool, "a@example.com").await;
    let d = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 3, "cars", LeadStatus::Prospect).await;
    let template = "Line one\\nTab\there\tback\\\\slash \\N {first_name:friend}\r\nend";
    let campaign = seed_campaign(
        &pool,
        tenant,
        &CampaignSpec {
            template,
            image: Some("https://cdn.example.com/a.png"),
            ..Default::default()
        },
    )
    .await;
    let deps = campaign_trigger::Deps {
        pool: pool.clone(),
        max_campaigns: 5,
    };
    assert_eq!(
        campaign_trigger::handle(serde_json::json!({}), &deps)
            .await
            .unwrap()
            .rows_created,
        3
    );
    let rows = shared::repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap();
    for r in rows {
        let first = if name_of(&r) == "there" {
            "friend".to_string()
        } else {
            "Lead".to_string()
        };
        assert_eq!(
            r.body,
            format!("Line one\\nTab\there\tback\\\\slash \\N {first}\r\nend")
        );
        assert_eq!(r.image.as_deref(), Some("https://cdn.example.com/a.png"));
    }
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn receipts_are_written_back_and_never_move_backwards(pool: PgPool) {
    let tenant = seed_tenant(&pool, "a@example.com").await;
    let d = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 20, "cars", LeadStatus::Prospect).await;
    let sim = SimConfig {
        delivered_after: Some(Duration::from_millis(50)),
        read_after: Some(Duration::from_millis(100)),
        read_rate: 1.0,
        ..quiet_sim()
    };
    let host = TestHost::start(&pool, sim).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = shared::repo::messages::list_campaign_messages(&pool, tenant, campaign)
            .await
            .unwrap();
        if rows.iter().all(|r| r.read_at.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in &rows {
        let (sent, delivered, read) = (
            r.sent_at.unwrap(),
            r.delivered_at.unwrap(),
            r.read_at.unwrap(),
        );
        assert!(
            sent <= delivered && delivered <= read,
            "{sent} {delivered} {read}"
        );
    }
    // A late or repeated receipt never clears a time or moves it.
    let r = &rows[0];
    let mut tx = pool.begin().await.unwrap();
    let late = r.read_at.unwrap() + chrono::Duration::hours(1);
    shared::repo::messages::apply_receipts(
        &mut tx,
        &[
            shared::repo::messages::Receipt {
                tenant_id: tenant,
                message_id: r.id,
                read: false,
                at: late,
            },
            shared::repo::messages::Receipt {
                tenant_id: tenant,
                message_id: r.id,
                read: true,
                at: late,
            },
        ],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let after = shared::repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap();
    let a = after.iter().find(|x| x.id == r.id).unwrap();
    assert_eq!((a.delivered_at, a.read_at), (r.delivered_at, r.read_at));
    // Another tenant's receipt for this message id changes nothing.
    let other = seed_tenant(&pool, "b@example.com").await;
    let mut tx = pool.begin().await.unwrap();
    let n = shared::repo::messages::apply_receipts(
        &mut tx,
        &[shared::repo::messages::Receipt {
            tenant_id: other,
            message_id: rows[1].id,
            read: true,
            at: chrono::Utc::now() - chrono::Duration::days(1),
        }],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(n, 0);
}

/// The host's outcome record is written as a HOT update (no new entry in any index): it changes
/// no indexed column. An index on a column the outcome writes (`state`, `updated_at`, `error`)
/// would make every outcome write an entry in every index of `host_sends`. Checked on records
/// whose page has room for their second version, so that the answer does not depend on when
/// old versions are pruned (which transactions open anywhere on the server delay: a test of
/// 2,000 records in the hosts' pattern saw 1,988 HOT alone and as few as 80 under CI's load).
/// How many are HOT in the running pipeline is `pipeline-bench`'s figure: 88–91 % on 12-07.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_hosts_outcome_records_are_written_without_index_entries(pool: PgPool) {
    let tenant = seed_tenant(&pool, "a@example.com").await;
    let d = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 10, "cars", LeadStatus::Prospect).await;
    seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    fan_out(&pool).await;
    let ids: Vec<i64> = sqlx::query_scalar(
        "UPDATE broadcast_messages SET status = 'sending', enqueue_count = 1, attempts = 1
         RETURNING id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(ids.len(), 10);
    // Host `h` holds the device (only the lease holder starts an attempt).
    sqlx::query(
        "INSERT INTO device_leases (device_id, host_id, lease_until)
         VALUES ($1, 'h', now() + interval '1 minute')",
    )
    .bind(d)
    .execute(&pool)
    .await
    .unwrap();
    // One connection for every write, so that its statistics can be flushed at once.
    let mut conn = pool.acquire().await.unwrap();
    let attempts: Vec<repo::host_sends::NewAttempt> = ids
        .iter()
        .map(|id| (*id, tenant, d, format!("SIM{id:012}")))
        .collect();
    let begun = repo::host_sends::begin_host_sends(&mut conn, "h", &attempts)
        .await
        .unwrap();
    assert_eq!(begun.len(), 10);
    let rows: Vec<repo::host_sends::FinishedAttempt<'_>> =
        ids.iter().map(|id| (*id, tenant, "sent", None)).collect();
    repo::host_sends::finish_host_sends(&mut conn, Some("h"), &rows)
        .await
        .unwrap();
    // Reported at the end of the next transaction, then read in a fresh snapshot.
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (updates, hot, pages): (i64, i64, i64) = sqlx::query_as(
        "SELECT n_tup_upd, n_tup_hot_upd, pg_relation_size('host_sends') / 8192
         FROM pg_stat_user_tables WHERE relname = 'host_sends'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(pages, 1, "the records and their outcomes share one page");
    assert_eq!(
        (updates, hot),
        (10, 10),
        "outcome records written as HOT updates"
    );
}
