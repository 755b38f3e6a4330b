//! Sequences (drip campaigns) end to end on real PostgreSQL and Redis: enrollment by trigger
//! (idempotent, concurrent-safe, tenant-scoped), lazy materialisation one step at a time, a
//! COLD → WARM → HOT chain run to the end on the simulator with a fast clock, pause / resume /
//! edit / cancel on unsent rows, reports that add up at any moment, the transition log, and
//! retry of failed messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::NaiveTime;
use shared::domain::{DelayRange, LeadStatus, SequenceStatus, TargetStatus, Token};
use shared::repo;
use shared::repo::sequences::{NewSequence, NewStep};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;
use wabcast_tests::*;

async fn seed_sequence(
    pool: &PgPool,
    tenant: Uuid,
    name: &str,
    trigger: &str,
    next: Option<&str>,
    steps: &[(i32, &str)],
) -> Uuid {
    let niche = Token::parse("cars").unwrap();
    let trigger = Token::parse(trigger).unwrap();
    let next = next.map(|n| Token::parse(n).unwrap());
    let steps: Vec<NewStep<'_>> = steps
        .iter()
        .map(|(day_offset, template)| NewStep {
            day_offset: *day_offset,
            template,
            image: None,
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let id = repo::sequences::insert_sequence(
        &mut tx,
        tenant,
        &NewSequence {
            name,
            niche: &niche,
            target: TargetStatus::All,
            trigger: &trigger,
            // Midnight local: today's step is already due whenever the test runs.
            send_time: NaiveTime::from_hms_opt(0, 0, 0).unwrap(),
            delay: DelayRange::new(0.0, 0.0).unwrap(),
            next_trigger: next.as_ref(),
            steps: &steps,
            stop_on_reply: false,
        },
    )
    .await
    .unwrap();
    repo::sequences::change_sequence_status(&mut tx, tenant, id, SequenceStatus::Active)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id
}

async fn set_triggers(pool: &PgPool, tenant: Uuid, triggers: &[&str]) {
    sqlx::query("UPDATE leads SET triggers = $2 WHERE tenant_id = $1")
        .bind(tenant)
        .bind(triggers)
        .execute(pool)
        .await
        .unwrap();
}

/// The fast clock: everything of the tenant happens `days` earlier (enrollment dates, due
/// instants), so the next day's step falls due now.
async fn time_travel(pool: &PgPool, days: i32) {
    sqlx::query(
        "UPDATE enrollments SET enrolled_on = enrolled_on - $1,
             next_due_at = next_due_at - make_interval(days => $1)",
    )
    .bind(days)
    .execute(pool)
    .await
    .unwrap();
}

async fn enrollments(pool: &PgPool, tenant: Uuid, seq: Uuid) -> Vec<(String, i64)> {
    repo::sequences::count_enrollments(pool, tenant, seq)
        .await
        .unwrap()
}

async fn step_campaign(pool: &PgPool, tenant: Uuid, seq: Uuid, position: i32) -> Uuid {
    let mut conn = pool.acquire().await.unwrap();
    repo::sequences::list_steps(&mut conn, tenant, seq)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.position == position)
        .unwrap()
        .campaign_id
}

async fn count_rows(pool: &PgPool, tenant: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM broadcast_messages WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn enrollment_is_idempotent_concurrent_safe_and_consumes_the_trigger(pool: PgPool) {
    let tenant = seed_tenant(&pool, "seq@example.com").await;
    let device = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    seed_leads(&pool, tenant, device, 0, 50, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, device, 100, 5, "boats", LeadStatus::Prospect).await;
    set_triggers(&pool, tenant, &["cold", "other"]).await;
    let seq = seed_sequence(
        &pool,
        tenant,
        "Cold",
        "cold",
        None,
        &[(0, "Hi {name}"), (2, "Still there?")],
    )
    .await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    let (a, b) = tokio::join!(p.trigger(), p.trigger());
    let c = p.trigger().await;
    assert_eq!(a.leads_enrolled + b.leads_enrolled + c.leads_enrolled, 50);
    assert_eq!(
        enrollments(&pool, tenant, seq).await,
        vec![("active".into(), 50)]
    );
    // Only the first step exists: nothing of the future is written up front.
    assert_eq!(count_rows(&pool, tenant).await, 50);
    assert_eq!(
        a.step_rows_created + b.step_rows_created + c.step_rows_created,
        50
    );
    let left: Vec<Vec<String>> = sqlx::query_scalar(
        "SELECT triggers FROM leads WHERE tenant_id = $1 AND niches @> ARRAY['cars']",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        left.iter().all(|t| t == &vec!["other".to_string()]),
        "{left:?}"
    );
    // The boats leads do not match the niche: not enrolled, token kept.
    let boats: Vec<Vec<String>> = sqlx::query_scalar(
        "SELECT triggers FROM leads WHERE tenant_id = $1 AND niches @> ARRAY['boats']",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(boats.iter().all(|t| t.contains(&"cold".to_string())));
    // An explicit enrollment of an already enrolled lead changes nothing.
    let lead: i64 = sqlx::query_scalar("SELECT min(id) FROM leads WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&pool)
        .await
        .unwrap();
    let active = repo::sequences::get_active_sequence(&pool, tenant, seq)
        .await
        .unwrap()
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let again = repo::sequences::enroll_lead(
        &mut tx,
        &active,
        lead,
        chrono::Utc::now().date_naive(),
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(!again);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn no_cross_tenant_enrollment_or_trigger_consumption(pool: PgPool) {
    let a = seed_tenant(&pool, "a@example.com").await;
    let b = seed_tenant(&pool, "b@example.com").await;
    let da = seed_device(&pool, a, "a1", 0.0, 0.0).await;
    let db = seed_device(&pool, b, "b1", 0.0, 0.0).await;
    seed_leads(&pool, a, da, 0, 3, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, b, db, 100, 4, "cars", LeadStatus::Prospect).await;
    set_triggers(&pool, a, &["cold"]).await;
    set_triggers(&pool, b, &["cold"]).await;
    let seq = seed_sequence(&pool, a, "A cold", "cold", None, &[(0, "Hi")]).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.trigger().await;
    // One step, materialised: the enrollments wait for it to finish.
    assert_eq!(
        enrollments(&pool, a, seq).await,
        vec![("finishing".into(), 3)]
    );
    assert_eq!(count_rows(&pool, b).await, 0, "B's leads got nothing");
    let b_triggers: Vec<Vec<String>> =
        sqlx::query_scalar("SELECT triggers FROM leads WHERE tenant_id = $1")
            .bind(b)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        b_triggers.iter().all(|t| t == &vec!["cold".to_string()]),
        "B's tokens untouched"
    );
    // Nor can A enroll B's lead explicitly.
    let b_lead: i64 = sqlx::query_scalar("SELECT min(id) FROM leads WHERE tenant_id = $1")
        .bind(b)
        .fetch_one(&pool)
        .await
        .unwrap();
    let active = repo::sequences::get_active_sequence(&pool, a, seq)
        .await
        .unwrap()
        .unwrap();
    // B cannot even look up A's sequence.
    assert!(repo::sequences::get_active_sequence(&pool, b, seq)
        .await
        .unwrap()
        .is_none());
    let mut tx = pool.begin().await.unwrap();
    let err = repo::sequences::enroll_lead(
        &mut tx,
        &active,
        b_lead,
        chrono::Utc::now().date_naive(),
        chrono::Utc::now(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_cold_warm_hot_chain_runs_to_the_end_with_a_fast_clock(pool: PgPool) {
    let tenant = seed_tenant(&pool, "chain@example.com").await;
    let d1 = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    let d2 = seed_device(&pool, tenant, "d2", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d1, 0, 4, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, tenant, d2, 100, 3, "cars", LeadStatus::Customer).await;
    set_triggers(&pool, tenant, &["cold"]).await;
    let cold = seed_sequence(
        &pool,
        tenant,
        "COLD",
        "cold",
        Some("warm"),
        &[(0, "cold 1 {name}"), (1, "cold 2")],
    )
    .await;
    let warm = seed_sequence(
        &pool,
        tenant,
        "WARM",
        "warm",
        Some("hot"),
        &[(0, "warm 1"), (2, "warm 2")],
    )
    .await;
    let hot = seed_sequence(
        &pool,
        tenant,
        "HOT",
        "hot",
        None,
        &[(0, "hot 1"), (1, "hot 2")],
    )
    .await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    for day in 0..12 {
        p.trigger().await;
        for _ in 0..3 {
            p.tick().await;
            while p.deliver().await > 0 {}
        }
        p.trigger().await; // completes finished enrollments (and chains them)
        if enrollments(&pool, tenant, hot).await == vec![("completed".to_string(), 7)] {
            break;
        }
        assert!(day < 11, "the chain did not finish");
        time_travel(&pool, 1).await;
    }
    for seq in [cold, warm] {
        assert_eq!(
            enrollments(&pool, tenant, seq).await,
            vec![("completed".into(), 7)]
        );
    }
    // Six messages per lead, each sent once, in chain order.
    let sends = host.sends();
    assert_eq!(sends.len(), 42);
    assert!(sends_per_message(&sends).values().all(|n| *n == 1));
    let order: Vec<(String, String)> = sqlx::query_as(
        "SELECT recipient, string_agg(split_part(body, ' ', 1) || split_part(body, ' ', 2), ',' ORDER BY sent_at, id)
         FROM broadcast_messages WHERE tenant_id = $1 GROUP BY recipient",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(order.len(), 7);
    for (who, seq) in order {
        assert_eq!(seq, "cold1,cold2,warm1,warm2,hot1,hot2", "{who}");
    }
    // The chain consumed every token: nothing would enroll again.
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM leads WHERE tenant_id = $1 AND cardinality(triggers) > 0",
    )
    .bind(tenant)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn pause_resume_edit_and_cancel_act_on_unsent_rows_at_once(pool: PgPool) {
    let tenant = seed_tenant(&pool, "ctl@example.com").await;
    let device = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    seed_leads(&pool, tenant, device, 0, 10, "cars", LeadStatus::Prospect).await;
    set_triggers(&pool, tenant, &["cold"]).await;
    let seq = seed_sequence(
        &pool,
        tenant,
        "Cold",
        "cold",
        None,
        &[(0, "Hello {name:friend}"), (1, "Day two")],
    )
    .await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.trigger().await;
    let step1 = step_campaign(&pool, tenant, seq, 1).await;

    // Pause: nothing is claimed, nothing new is materialised.
    let mut tx = pool.begin().await.unwrap();
    repo::sequences::change_sequence_status(&mut tx, tenant, seq, SequenceStatus::Paused)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    p.tick().await;
    assert_eq!(
        status_counts(&pool, tenant, step1).await.get("pending"),
        Some(&10)
    );
    time_travel(&pool, 1).await;
    p.trigger().await;
    assert_eq!(
        count_rows(&pool, tenant).await,
        10,
        "a paused sequence materialises nothing"
    );

    // Edit: every unsent row of the step is re-rendered at once. An edit of the text alone
    // keeps the step's image (for its unsent rows and for every later enrollment); an edit
    // with an image replaces it.
    let first = seed_image(&pool, tenant, shared::media::TINY_PNG).await;
    let second = [shared::media::TINY_PNG, &[0][..]].concat();
    let second = seed_image(&pool, tenant, &second).await;
    let (first, second) = (first.as_str(), second.as_str());
    sqlx::query("UPDATE campaigns SET image = $1 WHERE id = $2")
        .bind(first)
        .bind(step1)
        .execute(&pool)
        .await
        .unwrap();
    for (template, new_image, want_image) in [
        ("Edited {name:friend}", None, first),
        ("Again {name:friend}", Some(second), second),
    ] {
        let mut tx = pool.begin().await.unwrap();
        let (campaign, image) =
            repo::sequences::update_step(&mut tx, tenant, seq, 1, template, new_image)
                .await
                .unwrap();
        assert_eq!((campaign, image.as_deref()), (step1, Some(want_image)));
        let t = shared::render::Template::parse(template).unwrap();
        let changed =
            repo::messages::rerender_unsent_messages(&mut tx, tenant, step1, &t, image.as_deref())
                .await
                .unwrap();
        assert_eq!(changed, 10);
        tx.commit().await.unwrap();
        let step = repo::campaigns::get_campaign(&pool, tenant, step1)
            .await
            .unwrap();
        assert_eq!(
            (step.template.as_str(), step.image.as_deref()),
            (template, Some(want_image))
        );
        let rows = repo::messages::list_campaign_messages(&pool, tenant, step1)
            .await
            .unwrap();
        let prefix = template.split(' ').next().unwrap();
        assert!(rows
            .iter()
            .all(|r| r.body.starts_with(prefix) && r.image.as_deref() == Some(want_image)));
    }

    // Resume: the held rows go out, and the step that fell due during the pause follows.
    let mut tx = pool.begin().await.unwrap();
    repo::sequences::change_sequence_status(&mut tx, tenant, seq, SequenceStatus::Active)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    p.tick().await;
    while p.deliver().await > 0 {}
    assert_eq!(
        status_counts(&pool, tenant, step1).await.get("sent"),
        Some(&10)
    );
    p.trigger().await;
    let step2 = step_campaign(&pool, tenant, seq, 2).await;
    assert_eq!(
        status_counts(&pool, tenant, step2).await.get("pending"),
        Some(&10)
    );

    // Cancel: what is unsent is cancelled at once; enrollments end. A send under way at the
    // cancel that then fails transiently ends cancelled too, not pending under the cancel.
    let in_flight: i64 = sqlx::query_scalar(
        "UPDATE broadcast_messages SET status = 'sending'
         WHERE id = (SELECT min(id) FROM broadcast_messages WHERE campaign_id = $1)
         RETURNING id",
    )
    .bind(step2)
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    repo::sequences::change_sequence_status(&mut tx, tenant, seq, SequenceStatus::Cancelled)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let moved = repo::messages::mark_message_retry(
        &mut tx,
        tenant,
        in_flight,
        0, // the claim the update above stands for: `attempts` untouched
        chrono::Utc::now(),
        "transient",
        true,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(moved);
    let rows = repo::messages::list_campaign_messages(&pool, tenant, step2)
        .await
        .unwrap();
    assert!(rows
        .iter()
        .all(|r| r.status == "cancelled" && r.reason.as_deref() == Some("sequence_cancelled")));
    assert_eq!(
        enrollments(&pool, tenant, seq).await,
        vec![("cancelled".into(), 10)]
    );
    // A step's campaign cannot be resumed behind its sequence's back.
    let mut tx = pool.begin().await.unwrap();
    assert!(repo::campaigns::change_campaign_status(
        &mut tx,
        tenant,
        step2,
        shared::domain::CampaignStatus::Running
    )
    .await
    .is_err());
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn reports_add_up_at_any_moment_of_a_running_campaign(pool: PgPool) {
    let tenant = seed_tenant(&pool, "rep@example.com").await;
    let mut devices = Vec::new();
    for i in 0..4 {
        let d = seed_device(&pool, tenant, &format!("d{i}"), 0.0, 0.0).await;
        seed_leads(
            &pool,
            tenant,
            d,
            i * 1000,
            150,
            "cars",
            LeadStatus::Prospect,
        )
        .await;
        devices.push(d);
    }
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(
        &pool,
        SimConfig {
            not_on_whatsapp_rate: 0.1,
            transient_rate: 0.1,
            ..quiet_sim()
        },
    )
    .await;
    let p = std::sync::Arc::new(Pipeline::new(&pool, test_queue(5).await, &host));
    let runner = {
        let p = p.clone();
        tokio::spawn(async move {
            p.run_until_done(&[(tenant, campaign)], Duration::from_secs(60))
                .await;
        })
    };
    let mut snapshots = 0;
    let mut saw_mixed = false;
    loop {
        let r = repo::campaigns::get_campaign_progress(&pool, tenant, campaign)
            .await
            .unwrap();
        assert_eq!(
            r.by_status.values().sum::<i64>(),
            r.total,
            "states add up: {r:?}"
        );
        let per_device: i64 = r.by_device.values().flat_map(|m| m.values()).sum();
        assert_eq!(per_device, r.total, "devices add up");
        for (status, n) in &r.by_status {
            let reasons: i64 = r
                .by_reason
                .iter()
                .filter(|((s, _), _)| s == status)
                .map(|(_, v)| v)
                .sum();
            if ["sent", "failed", "skipped", "cancelled"].contains(&status.as_str()) {
                assert_eq!(reasons, *n, "every {status} row has a reason");
            }
        }
        if r.total > 0 && r.by_status.len() > 2 {
            saw_mixed = true;
        }
        snapshots += 1;
        if runner.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    runner.await.unwrap();
    assert!(
        saw_mixed,
        "a snapshot caught the campaign mid-run ({snapshots} taken)"
    );
    let done = repo::campaigns::get_campaign_progress(&pool, tenant, campaign)
        .await
        .unwrap();
    assert_eq!(done.total, 600);
    assert!(done
        .by_reason
        .contains_key(&("skipped".into(), "not_on_whatsapp".into())));
    let _ = devices;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn every_transition_is_logged_and_a_retried_failure_keeps_its_history(pool: PgPool) {
    let tenant = seed_tenant(&pool, "hist@example.com").await;
    let device = seed_device(&pool, tenant, "d1", 0.0, 0.0).await;
    // 90 leads: the queue hands the worker one device's messages 10 at a time, and the first
    // transient failure in a batch holds back the rest of it, so a batch whose first send fails
    // has no row sent at its first try. With 30 leads (3 batches) that happened in 0.3³ ≈ 3 % of
    // runs (CI, 12-02); with 9 batches 0.3⁹ ≈ 2e-5 (provider ids, hence outcomes, are random).
    seed_leads(&pool, tenant, device, 0, 90, "cars", LeadStatus::Prospect).await;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = TestHost::start(
        &pool,
        SimConfig {
            transient_rate: 0.3,
            ..quiet_sim()
        },
    )
    .await;
    // One attempt only: a transient failure fails the message (attempts_exhausted), which a
    // person may retry.
    let mut p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.worker.settings.max_attempts = 1;
    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    let rows = repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap();
    // A row sent at the first try has exactly `want`; one held back behind a transient failure
    // of its device first logs `held_back` once per hold, then `want`.
    let want = [
        ("pending", "queued"),
        ("queued", "sending"),
        ("sending", "sent"),
    ];
    let held_back = [
        ("pending", "queued"),
        ("queued", "sending"),
        ("sending", "pending"),
    ];
    let mut found = false;
    for sent in rows.iter().filter(|r| r.status == "sent") {
        let transitions = repo::campaigns::list_message_transitions(&pool, tenant, sent.id)
            .await
            .unwrap();
        let path: Vec<(&str, &str)> = transitions
            .iter()
            .map(|(_, f, t, _)| (f.as_str(), t.as_str()))
            .collect();
        assert!(path.len() >= 3 && path.len().is_multiple_of(3), "{path:?}");
        let (holds, last) = path.split_at(path.len() - 3);
        assert_eq!(last, want, "{path:?}");
        assert!(holds.chunks(3).all(|h| h == held_back), "{path:?}");
        found |= holds.is_empty();
    }
    assert!(found, "some row was sent at its first try");
    let failed: Vec<_> = rows.iter().filter(|r| r.status == "failed").collect();
    // Follow a row that failed at its first try (not one held back first).
    let mut first_try = None;
    for f in &failed {
        let states: Vec<String> = repo::campaigns::list_message_transitions(&pool, tenant, f.id)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, _, t, _)| t)
            .collect();
        if states == ["queued", "sending", "failed"] {
            first_try = Some(*f);
            break;
        }
    }
    let followed = first_try.expect("a row that failed at its first try");
    assert!(!failed.is_empty());
    let provider_before: String =
        sqlx::query_scalar("SELECT provider_message_id FROM host_sends WHERE message_id = $1")
            .bind(followed.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        repo::campaigns::get_campaign(&pool, tenant, campaign)
            .await
            .unwrap()
            .status,
        "completed"
    );

    // Retry the campaign's failures: they go through pacing and the host again.
    let mut tx = pool.begin().await.unwrap();
    let n = repo::campaigns::retry_failed_messages(
        &mut tx,
        tenant,
        repo::campaigns::RetryScope {
            campaign: Some(campaign),
            device: None,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(n as usize, failed.len());
    assert_eq!(
        repo::campaigns::get_campaign(&pool, tenant, campaign)
            .await
            .unwrap()
            .status,
        "running"
    );
    p.run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    let path: Vec<(String, String, Option<String>)> =
        repo::campaigns::list_message_transitions(&pool, tenant, followed.id)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, f, t, r)| (f, t, r))
            .collect();
    let states: Vec<&str> = path.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(
        states[..6],
        ["queued", "sending", "failed", "pending", "queued", "sending"],
        "{path:?}"
    );
    // Then it ends again (a retried send may be held back behind another's failure first).
    assert!(
        states.len() >= 7 && ["sent", "failed"].contains(states.last().unwrap()),
        "{path:?}"
    );
    assert_eq!(path[2].2.as_deref(), Some("attempts_exhausted"));
    let provider_after: String =
        sqlx::query_scalar("SELECT provider_message_id FROM host_sends WHERE message_id = $1")
            .bind(followed.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_ne!(
        provider_before, provider_after,
        "the host made a fresh attempt, not a replay of its record"
    );
    // Another tenant's retry touches nothing here.
    let other = seed_tenant(&pool, "other@example.com").await;
    let mut tx = pool.begin().await.unwrap();
    let n = repo::campaigns::retry_failed_messages(
        &mut tx,
        other,
        repo::campaigns::RetryScope {
            campaign: Some(campaign),
            device: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(n, 0);
}

/// A lead who writes back to a sequence that stops on a reply gets none of its next steps: the
/// enrollment ends (`replied` in the report), the step waiting to go out ends `skipped /
/// lead_replied`, and no later step is written. The same lead's enrollment in a sequence that
/// goes on, the other leads, and another tenant's lead with the same number are untouched; a
/// STOP is an opt-out, not a reply.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_reply_ends_the_leads_enrollment_in_a_sequence_that_stops_on_reply(pool: PgPool) {
    let tenant = seed_tenant(&pool, "replies@example.com").await;
    let other = seed_tenant(&pool, "replies-other@example.com").await;
    let d = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    let od = seed_device(&pool, other, "d", 0.0, 0.0).await;
    let phones = seed_leads(&pool, tenant, d, 0, 3, "cars", LeadStatus::Prospect).await;
    let theirs = seed_leads(&pool, other, od, 0, 1, "cars", LeadStatus::Prospect).await;
    assert_eq!(theirs[0], phones[0], "the same number in both tenants");
    set_triggers(&pool, tenant, &["cold", "news"]).await;
    set_triggers(&pool, other, &["cold"]).await;
    let steps = [(0, "cold 1"), (2, "cold 2")];
    let cold = seed_sequence(&pool, tenant, "COLD", "cold", None, &steps).await;
    let news = seed_sequence(
        &pool,
        tenant,
        "NEWS",
        "news",
        None,
        &[(0, "news 1"), (2, "news 2")],
    )
    .await;
    let their_cold = seed_sequence(&pool, other, "COLD", "cold", None, &steps).await;
    for (t, s) in [(tenant, cold), (other, their_cold)] {
        let mut tx = pool.begin().await.unwrap();
        repo::sequences::set_stop_on_reply(&mut tx, t, s, true)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let mut tx = pool.begin().await.unwrap();
    let refused = repo::sequences::set_stop_on_reply(&mut tx, tenant, their_cold, false).await;
    assert!(
        matches!(refused, Err(repo::RepoError::NotFound(_))),
        "{refused:?}"
    );
    drop(tx);

    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    p.trigger().await;
    assert_eq!(
        count_rows(&pool, tenant).await,
        6,
        "day 0 of both sequences"
    );
    let c = &host.client;
    c.simulate_inbound(tenant, d, phones[0].as_str(), "Yes! How much is it?")
        .await
        .unwrap();
    c.simulate_inbound(tenant, d, phones[1].as_str(), "STOP")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while enrollments(&pool, tenant, cold).await
        != vec![("active".to_string(), 2), ("replied".to_string(), 1)]
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the reply was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = |campaign: Uuid, phone: &str| {
        let (pool, phone) = (pool.clone(), phone.to_string());
        async move {
            let row: (String, Option<String>) = sqlx::query_as(
                "SELECT status, reason FROM broadcast_messages
                 WHERE campaign_id = $1 AND recipient = $2",
            )
            .bind(campaign)
            .bind(&phone)
            .fetch_one(&pool)
            .await
            .unwrap();
            row
        }
    };
    let cold_1 = step_campaign(&pool, tenant, cold, 1).await;
    let news_1 = step_campaign(&pool, tenant, news, 1).await;
    assert_eq!(
        state(cold_1, phones[0].as_str()).await,
        ("skipped".into(), Some("lead_replied".into()))
    );
    assert_eq!(
        state(news_1, phones[0].as_str()).await,
        ("pending".into(), None)
    );
    assert_eq!(
        state(cold_1, phones[2].as_str()).await,
        ("pending".into(), None)
    );
    // lead 1 said STOP: opted out, which is not a reply
    let opted: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT opted_out_at FROM leads WHERE tenant_id = $1 AND phone = $2")
            .bind(tenant)
            .bind(phones[1].as_str())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(opted.is_some());
    assert_eq!(
        enrollments(&pool, tenant, news).await,
        vec![("active".to_string(), 3)]
    );
    assert_eq!(
        enrollments(&pool, other, their_cold).await,
        vec![("active".to_string(), 1)]
    );

    // Two days on: the reply's lead gets no second COLD step; NEWS goes on for it.
    time_travel(&pool, 2).await;
    p.trigger().await;
    let cold_2 = step_campaign(&pool, tenant, cold, 2).await;
    let news_2 = step_campaign(&pool, tenant, news, 2).await;
    let written = |campaign: Uuid| {
        let pool = pool.clone();
        async move {
            let r: Vec<String> = sqlx::query_scalar(
                "SELECT recipient FROM broadcast_messages WHERE campaign_id = $1 ORDER BY recipient",
            )
            .bind(campaign)
            .fetch_all(&pool)
            .await
            .unwrap();
            r
        }
    };
    assert!(!written(cold_2)
        .await
        .contains(&phones[0].as_str().to_string()));
    assert!(written(news_2)
        .await
        .contains(&phones[0].as_str().to_string()));

    // The same reply again ends nothing more.
    let again = repo::sequences::end_replied_enrollments(&pool, tenant, &phones[0])
        .await
        .unwrap();
    assert_eq!(again, repo::sequences::RepliesEnded::default());
}
