//! Account safety, enforced in the processor's claim: a daily cap per tenant-local day, the
//! warm-up ramp of a newly paired number, quiet hours in the tenant's time zone. Held messages
//! stay pending (never skipped or failed) and go out in the next allowed window.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{Duration as ChronoDuration, Timelike, Utc};
use shared::domain::LeadStatus;
use shared::repo;
use shared::repo::devices::SafetySettings;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;
use wabcast_tests::*;

async fn drain(p: &Pipeline) {
    for _ in 0..5 {
        p.tick().await;
        while p.deliver().await > 0 {}
    }
}

async fn set_safety(pool: &PgPool, tenant: Uuid, device: Uuid, s: SafetySettings) {
    let mut tx = pool.begin().await.unwrap();
    repo::devices::set_safety_settings(&mut tx, tenant, device, &s)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

fn none() -> SafetySettings {
    SafetySettings {
        daily_cap: None,
        warmup_days: 14,
        warmup_start: 20,
        quiet_hours: None,
    }
}

/// Moves the device's cap counter to yesterday: the next tenant-local day begins.
async fn next_day(pool: &PgPool, device: Uuid) {
    sqlx::query("UPDATE devices SET cap_day = cap_day - 1 WHERE id = $1")
        .bind(device)
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_daily_cap_holds_the_rest_until_the_next_local_day(pool: PgPool) {
    let tenant = seed_tenant(&pool, "cap@example.com").await;
    let device = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    let other = seed_device(&pool, tenant, "d2", 0.0, 0.0).await;
    seed_leads(&pool, tenant, device, 0, 12, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, other, 100, 12, "cars", LeadStatus::Prospect).await;
    set_safety(
        &pool,
        tenant,
        device,
        SafetySettings {
            daily_cap: Some(5),
            ..none()
        },
    )
    .await;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    // A second campaign on the same device counts against the same cap.
    let second = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.trigger().await;
    drain(&p).await;
    let sent_on = |d: Uuid| {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM broadcast_messages WHERE device_id = $1 AND status = 'sent'",
            )
            .bind(d)
            .fetch_one(&pool)
            .await
            .unwrap();
            n
        }
    };
    assert_eq!(sent_on(device).await, 5, "the cap holds across campaigns");
    assert_eq!(sent_on(other).await, 24, "an uncapped device is not slowed");
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM broadcast_messages WHERE device_id = $1 AND status = 'pending'",
    )
    .bind(device)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(pending, 19, "held, not skipped or failed");

    next_day(&pool, device).await;
    drain(&p).await;
    assert_eq!(sent_on(device).await, 10, "the next day's allowance");
    let _ = (campaign, second);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_newly_paired_number_warms_up_doubling_each_day(pool: PgPool) {
    let tenant = seed_tenant(&pool, "warm@example.com").await;
    let device = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    seed_leads(&pool, tenant, device, 0, 40, "cars", LeadStatus::Prospect).await;
    set_safety(
        &pool,
        tenant,
        device,
        SafetySettings {
            warmup_start: 4,
            warmup_days: 7,
            ..none()
        },
    )
    .await;
    // Paired just now: day 0 of the ramp.
    sqlx::query("UPDATE devices SET paired_at = now() WHERE id = $1")
        .bind(device)
        .execute(&pool)
        .await
        .unwrap();
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.trigger().await;
    let mut sent_per_day = Vec::new();
    for day in 0..4 {
        drain(&p).await;
        let sent = status_counts(&pool, tenant, campaign)
            .await
            .get("sent")
            .copied()
            .unwrap_or(0);
        sent_per_day.push(sent);
        // One day later: the ramp moves on and a new local day begins.
        sqlx::query(
            "UPDATE devices SET paired_at = paired_at - interval '1 day', cap_day = cap_day - 1
             WHERE id = $1",
        )
        .bind(device)
        .execute(&pool)
        .await
        .unwrap();
        let _ = day;
    }
    // 4, then 8, 16, 32 a day: cumulative 4, 12, 28, 40 (all sent by day 3).
    assert_eq!(sent_per_day, vec![4, 12, 28, 40]);
    // A simulator device is never "paired": no ramp for it (the other tests rely on that too).
    let sim_paired: Option<chrono::DateTime<Utc>> = {
        let d2 = seed_device(&pool, tenant, "sim", 0.0, 0.0).await;
        sqlx::query_scalar("SELECT paired_at FROM devices WHERE id = $1")
            .bind(d2)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert!(sim_paired.is_none());
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn quiet_hours_in_the_tenants_zone_hold_messages_until_they_end(pool: PgPool) {
    let tenant = seed_tenant(&pool, "quiet@example.com").await;
    let device = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    seed_leads(&pool, tenant, device, 0, 6, "cars", LeadStatus::Prospect).await;
    // Quiet from an hour ago to an hour from now, in Kuala Lumpur time (the tenant's zone).
    let kl = shared::tz::parse_zone("Asia/Kuala_Lumpur").unwrap();
    let local = Utc::now().with_timezone(&kl);
    let around = |h: i64| {
        (local + ChronoDuration::hours(h))
            .time()
            .with_second(0)
            .unwrap()
            .with_nanosecond(0)
            .unwrap()
    };
    set_safety(
        &pool,
        tenant,
        device,
        SafetySettings {
            quiet_hours: Some((around(-1), around(1))),
            ..none()
        },
    )
    .await;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.trigger().await;
    drain(&p).await;
    assert_eq!(
        status_counts(&pool, tenant, campaign).await.get("pending"),
        Some(&6),
        "nothing goes out in quiet hours, nothing is skipped"
    );
    // The same hours, but already over: everything goes.
    set_safety(
        &pool,
        tenant,
        device,
        SafetySettings {
            quiet_hours: Some((around(-3), around(-1))),
            ..none()
        },
    )
    .await;
    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    assert_eq!(
        status_counts(&pool, tenant, campaign).await.get("sent"),
        Some(&6)
    );
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn safety_settings_are_validated_and_tenant_scoped(pool: PgPool) {
    let a = seed_tenant(&pool, "a@example.com").await;
    let b = seed_tenant(&pool, "b@example.com").await;
    let db = seed_device(&pool, b, "b1", 0.0, 0.0).await;
    let t = |h| chrono::NaiveTime::from_hms_opt(h, 0, 0).unwrap();
    let mut tx = pool.begin().await.unwrap();
    for (tenant, s, want) in [
        (
            a,
            SafetySettings {
                daily_cap: Some(10),
                ..none()
            },
            "not found",
        ),
        (
            b,
            SafetySettings {
                daily_cap: Some(0),
                ..none()
            },
            "positive",
        ),
        (
            b,
            SafetySettings {
                quiet_hours: Some((t(9), t(9))),
                ..none()
            },
            "differ",
        ),
        (
            b,
            SafetySettings {
                warmup_days: 400,
                ..none()
            },
            "days",
        ),
    ] {
        let err = repo::devices::set_safety_settings(&mut tx, tenant, db, &s)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_lead_frequency_cap_spaces_messages_to_one_lead_across_campaigns(pool: PgPool) {
    let tenant = seed_tenant(&pool, "freq@example.com").await;
    let device = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    seed_leads(&pool, tenant, device, 0, 5, "cars", LeadStatus::Prospect).await;
    let mut tx = pool.begin().await.unwrap();
    repo::tenants::set_lead_min_gap(&mut tx, tenant, 3600.0)
        .await
        .unwrap();
    assert!(repo::tenants::set_lead_min_gap(&mut tx, tenant, -1.0)
        .await
        .is_err());
    tx.commit().await.unwrap();
    let first = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let second = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.trigger().await;
    drain(&p).await;
    // Each lead got exactly one of its two messages; the other waits.
    let per_lead: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT lead_id, count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status = 'pending')
         FROM broadcast_messages WHERE tenant_id = $1 GROUP BY lead_id",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(per_lead.len(), 5);
    assert!(
        per_lead.iter().all(|(_, s, p)| (*s, *p) == (1, 1)),
        "{per_lead:?}"
    );
    // Two hours later (every stored instant moved back) the rest goes out.
    sqlx::query("UPDATE leads SET last_contacted_at = last_contacted_at - interval '2 hours' WHERE tenant_id = $1")
        .bind(tenant)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE broadcast_messages SET due_at = due_at - interval '2 hours'
         WHERE tenant_id = $1 AND status = 'pending'",
    )
    .bind(tenant)
    .execute(&pool)
    .await
    .unwrap();
    p.run_until_done(
        &[(tenant, first), (tenant, second)],
        Duration::from_secs(30),
    )
    .await;
    let sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM broadcast_messages WHERE tenant_id = $1 AND status = 'sent'",
    )
    .bind(tenant)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(sent, 10);
}

/// Rows of leads inside the frequency cap wait out of the claim's way: due when the cap ends,
/// so claims and idle ticks do not read them over and over (before, every due row of a capped
/// lead was read and passed over by every claim: with two overlapping campaigns to the same
/// leads, one campaign's whole backlog per tick). Both ways a row meets the cap: its lead
/// reached by another campaign's row (the claim defers the lead's other rows), and a campaign
/// fanned out while its leads are inside the cap. Lowering the cap releases them at once.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn capped_leads_rows_wait_out_of_the_claims_way_until_the_cap_ends(pool: PgPool) {
    let tenant = seed_tenant(&pool, "freq-defer@example.com").await;
    for i in 0..2 {
        let d = seed_device(&pool, tenant, &format!("d{i}"), 0.0, 0.0).await;
        seed_leads(
            &pool,
            tenant,
            d,
            i * 10_000,
            1_000,
            "cars",
            LeadStatus::Prospect,
        )
        .await;
    }
    let mut tx = pool.begin().await.unwrap();
    repo::tenants::set_lead_min_gap(&mut tx, tenant, 3600.0)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let mut p = Pipeline::new(&pool, test_queue(5).await, &host);
    // one claim reaches every lead
    p.processor.settings.per_device_burst = 5_000;
    p.processor.settings.max_messages_per_claim = 10_000;
    p.trigger().await;
    assert_eq!(p.tick().await.queued, 2_000, "one message per lead");
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    // (pending, due within 50 minutes, due later: at the cap's end)
    let due = |pool: PgPool| async move {
        sqlx::query_as::<_, (i64, i64, i64)>(
            "SELECT count(*), count(*) FILTER (WHERE due_at < now() + interval '3000 s'),
                    count(*) FILTER (WHERE due_at >= now() + interval '3000 s')
             FROM broadcast_messages WHERE tenant_id = $1 AND status = 'pending'",
        )
        .bind(tenant)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(
        due(pool.clone()).await,
        (2_000, 0, 2_000),
        "the other campaign's rows wait out the cap"
    );
    // the first campaign's rows sent, as the worker would (nothing in flight left to look at)
    sqlx::query(
        "UPDATE broadcast_messages SET status = 'sent', reason = 'accepted', finished_at = now()
         WHERE tenant_id = $1 AND status = 'queued'",
    )
    .bind(tenant)
    .execute(&pool)
    .await
    .unwrap();

    let mut tx = pool.begin().await.unwrap();
    let before = rows_visited(&mut tx).await;
    let claimed = repo::messages::claim_ready_messages(
        &mut tx,
        repo::messages::ClaimSize {
            max_devices: 100,
            per_device: 50,
            max_messages: 5_000,
        },
        60.0,
        0.0,
        &[],
    )
    .await
    .unwrap();
    let after = rows_visited(&mut tx).await;
    tx.rollback().await.unwrap();
    assert!(claimed.items.is_empty());
    assert!(
        after - before <= 10,
        "a claim with 2,000 capped rows pending visited {} rows",
        after - before
    );

    // A campaign fanned out now: every lead is inside the cap.
    seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    p.trigger().await;
    assert_eq!(due(pool.clone()).await, (4_000, 0, 4_000));

    // Switching the cap off releases them.
    let mut tx = pool.begin().await.unwrap();
    repo::tenants::set_lead_min_gap(&mut tx, tenant, 0.0)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let released: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM broadcast_messages
         WHERE tenant_id = $1 AND status = 'pending' AND due_at <= now()",
    )
    .bind(tenant)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(released, 4_000);
    assert_eq!(
        p.tick().await.queued,
        4_000,
        "with the cap off, both of every lead's rows"
    );
}
