//! Tenant isolation and bad input: a clear error, and nothing changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::domain::{CampaignStatus, LeadStatus, PhoneE164, Token};
use shared::host_api::{code, SendOutcome, SendRequest};
use shared::repo::{self, RepoError};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;
use wabcast_tests::*;

async fn lead_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM leads")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_tenant_never_sees_or_sends_to_another_tenants_leads(pool: PgPool) {
    let a = seed_tenant(&pool, "a@example.com").await;
    let b = seed_tenant(&pool, "b@example.com").await;
    let da = seed_device(&pool, a, "a-phone", 0.0, 0.0).await;
    let db = seed_device(&pool, b, "b-phone", 0.0, 0.0).await;
    seed_leads(&pool, a, da, 0, 10, "cars", LeadStatus::Prospect).await;
    // B has leads with the same numbers and niche.
    seed_leads(&pool, b, db, 0, 10, "cars", LeadStatus::Prospect).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    let ca = seed_campaign(&pool, a, &CampaignSpec::default()).await;
    p.run_until_done(&[(a, ca)], Duration::from_secs(30)).await;
    let sends = host.sends();
    assert_eq!(sends.len(), 10);
    assert!(sends.iter().all(|e| e.tenant_id == a && e.device_id == da));

    // B cannot read, count or change A's campaign.
    assert!(matches!(
        repo::campaigns::get_campaign(&pool, b, ca).await,
        Err(RepoError::NotFound(_))
    ));
    assert!(matches!(
        repo::campaigns::get_campaign_progress(&pool, b, ca).await,
        Err(RepoError::NotFound(_))
    ));
    assert!(repo::messages::list_campaign_messages(&pool, b, ca)
        .await
        .unwrap()
        .is_empty());
    let mut tx = pool.begin().await.unwrap();
    assert!(matches!(
        repo::campaigns::change_campaign_status(&mut tx, b, ca, CampaignStatus::Cancelled).await,
        Err(RepoError::NotFound(_))
    ));
    drop(tx);
    // A cannot put leads on B's device, and the refused batch changes nothing.
    let before = lead_count(&pool).await;
    let mut tx = pool.begin().await.unwrap();
    let lead = repo::leads::NewLead {
        device_id: db,
        name: "x".into(),
        phone: PhoneE164::parse("+60199999999").unwrap(),
        niches: vec![Token::parse("cars").unwrap()],
        status: LeadStatus::Prospect,
        triggers: vec![],
    };
    assert!(
        repo::leads::upsert_leads(&mut tx, a, std::slice::from_ref(&lead))
            .await
            .is_err()
    );
    drop(tx);
    assert_eq!(lead_count(&pool).await, before);
    // One number twice for one device in a batch: refused whole, with a clear error.
    let twice = repo::leads::NewLead {
        device_id: da,
        ..lead
    };
    let mut tx = pool.begin().await.unwrap();
    let err = repo::leads::upsert_leads(&mut tx, a, &[twice.clone(), twice])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RepoError::Invalid(_))
            && err.to_string().contains("+60199999999 appears twice"),
        "{err}"
    );
    drop(tx);
    assert_eq!(lead_count(&pool).await, before);
    // Opting a number out in A leaves B's lead with the same number alone.
    let mut tx = pool.begin().await.unwrap();
    repo::leads::opt_out_lead(
        &mut tx,
        a,
        &PhoneE164::parse("+601000000001").unwrap(),
        repo::leads::ConsentSource::Operator,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let opted: Vec<(Uuid,)> =
        sqlx::query_as("SELECT tenant_id FROM leads WHERE opted_out_at IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(opted, vec![(a,)]);
    // The host refuses a send that names A as tenant but B's device.
    let out = host
        .client
        .send(&SendRequest {
            message_id: 77,
            tenant_id: a,
            device_id: db,
            to: "+60123456789".into(),
            text: "hi".into(),
            image: None,
            template: None,
        })
        .await;
    assert!(
        matches!(&out, SendOutcome::Permanent { reason, .. } if reason == code::UNKNOWN_DEVICE),
        "{out:?}"
    );
    assert_eq!(host.sends().len(), 10);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_host_refuses_bad_sends_with_clear_errors(pool: PgPool) {
    let a = seed_tenant(&pool, "a@example.com").await;
    let b = seed_tenant(&pool, "b@example.com").await;
    let da = seed_device(&pool, a, "a-phone", 0.0, 0.0).await;
    // Eight messages of A's, claimed for sending: what a worker asks the host to send.
    seed_leads(&pool, a, da, 0, 8, "cars", LeadStatus::Prospect).await;
    let campaign = seed_campaign(&pool, a, &CampaignSpec::default()).await;
    fan_out(&pool).await;
    let ids: Vec<i64> = repo::messages::list_campaign_messages(&pool, a, campaign)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    mark_sending(&pool, &ids).await;
    let host = TestHost::start(&pool, quiet_sim()).await;
    let mut tx = pool.begin().await.unwrap();
    let b_media = repo::media::insert_media(&mut tx, b, "image/png", shared::media::TINY_PNG)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let base = SendRequest {
        message_id: ids[0],
        tenant_id: a,
        device_id: da,
        to: "+60123456789".into(),
        text: "hi".into(),
        image: None,
        template: None,
    };
    let cases = [
        (
            SendRequest {
                to: "not a phone".into(),
                ..base.clone()
            },
            code::INVALID_PAYLOAD,
        ),
        (
            SendRequest {
                message_id: ids[1],
                text: "  ".into(),
                ..base.clone()
            },
            code::INVALID_PAYLOAD,
        ),
        (
            SendRequest {
                message_id: ids[2],
                image: Some("https://127.0.0.1/x.png".into()),
                ..base.clone()
            },
            code::BAD_IMAGE,
        ),
        (
            SendRequest {
                message_id: ids[3],
                image: Some("https://169.254.169.254/latest".into()),
                ..base.clone()
            },
            code::BAD_IMAGE,
        ),
        (
            SendRequest {
                message_id: ids[4],
                image: Some("file:///etc/passwd".into()),
                ..base.clone()
            },
            code::BAD_IMAGE,
        ),
        (
            SendRequest {
                message_id: ids[5],
                image: Some(format!("media:{b_media}")),
                ..base.clone()
            },
            code::BAD_IMAGE,
        ),
        (
            SendRequest {
                message_id: ids[6],
                device_id: Uuid::new_v4(),
                ..base.clone()
            },
            code::UNKNOWN_DEVICE,
        ),
        // No message with this id is being sent: nothing is sent for it.
        (
            SendRequest {
                message_id: ids.iter().max().unwrap() + 1,
                ..base.clone()
            },
            code::NOT_IN_FLIGHT,
        ),
    ];
    for (req, want) in cases {
        let out = host.client.send(&req).await;
        assert!(
            matches!(&out, SendOutcome::Permanent { reason, .. } if reason == want),
            "{req:?} -> {out:?}"
        );
    }
    assert!(host.sends().is_empty());
    // Without the token nothing is accepted; a malformed body is a clear 400.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/send", host.url))
        .json(&base)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{}/v1/send", host.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{\"message_id\": \"x\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: shared::host_api::ErrorBody = r.json().await.unwrap();
    assert_eq!(
        (body.error.as_str(), body.retryable),
        (code::INVALID_PAYLOAD, false)
    );
    // A valid inline image of the tenant's own goes through.
    let mut tx = pool.begin().await.unwrap();
    let a_media = repo::media::insert_media(&mut tx, a, "image/png", shared::media::TINY_PNG)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ok = host
        .client
        .send(&SendRequest {
            message_id: ids[7],
            image: Some(format!("media:{a_media}")),
            ..base
        })
        .await;
    assert!(matches!(ok, SendOutcome::Sent { .. }), "{ok:?}");
    assert_eq!(
        host.sends()[0].image.as_deref(),
        Some(format!("media:{a_media}").as_str())
    );
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn malformed_events_get_clear_errors_and_change_nothing(pool: PgPool) {
    let tenant = seed_tenant(&pool, "t@example.com").await;
    let d = seed_device(&pool, tenant, "d", 0.0, 0.0).await;
    seed_leads(&pool, tenant, d, 0, 3, "cars", LeadStatus::Prospect).await;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let trig = campaign_trigger::Deps {
        pool: pool.clone(),
        max_campaigns: 5,
    };
    let err = campaign_trigger::handle(serde_json::json!([1, 2]), &trig)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expected a JSON object"), "{err}");
    let err = campaign_trigger::handle(serde_json::json!({"max_campaigns": -3}), &trig)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_campaigns"), "{err}");
    let proc = broadcast_processor::Deps {
        pool: pool.clone(),
        queue: test_queue(5).await,
        settings: Default::default(),
    };
    let err = broadcast_processor::handle(serde_json::json!({"run_for_seconds": "soon"}), &proc)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("run_for_seconds"), "{err}");
    assert_eq!(
        repo::campaigns::get_campaign(&pool, tenant, campaign)
            .await
            .unwrap()
            .status,
        "scheduled"
    );
    // A worker record with a garbage body is reported (so SQS dead-letters it); a good record
    // of another group in the same batch is unaffected.
    let host = TestHost::start(&pool, quiet_sim()).await;
    let p = Pipeline::new(&pool, test_queue(5).await, &host);
    let mut ev: aws_lambda_events::event::sqs::SqsEvent = serde_json::from_value(serde_json::json!({"Records": [
        {"messageId": "bad-1", "body": "{not json", "attributes": {"MessageGroupId": "g-bad"}},
        {"messageId": "ok-1", "body": "{\"message_id\": 1, \"tenant_id\": \"00000000-0000-0000-0000-000000000000\", \"device_id\": \"00000000-0000-0000-0000-000000000001\"}", "attributes": {"MessageGroupId": "g-ok"}}
    ]})).unwrap();
    let response = message_worker::handle(ev.clone(), &p.worker).await;
    let ids: Vec<String> = response
        .batch_item_failures
        .into_iter()
        .map(|f| f.item_identifier)
        .collect();
    assert_eq!(ids, ["bad-1"]);
    ev.records.clear();
    assert!(message_worker::handle(ev, &p.worker)
        .await
        .batch_item_failures
        .is_empty());
    assert!(host.sends().is_empty());
}

/// A message's recipient is its lead's phone (E.164: parsed at the edge and checked by a regular
/// expression on `leads`); the database still refuses a message row whose recipient has not even
/// the shape of one (a `+` and 7 to 15 more characters), whoever writes it.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_database_refuses_a_message_to_a_recipient_without_the_shape_of_a_number(pool: PgPool) {
    let insert = |recipient: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO broadcast_messages (tenant_id, device_id, lead_id, campaign_id, recipient, body)
                 VALUES (gen_random_uuid(), gen_random_uuid(), 1, gen_random_uuid(), $1, 'hi')",
            )
            .bind(recipient)
            .execute(&pool)
            .await
        }
    };
    for bad in [
        "60123456789",
        "+6012",
        "+601234567890123456",
        "",
        "0060123456789",
    ] {
        let err = insert(bad).await.expect_err(bad);
        assert!(
            err.to_string()
                .contains("broadcast_messages_recipient_shape"),
            "{bad:?}: {err}"
        );
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM broadcast_messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
    insert("+60123456789").await.unwrap();
}

/// A database from before a uniqueness rule: its index is gone, so a duplicate can be added.
async fn drop_index(pool: &PgPool, index: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {index}")))
        .execute(pool)
        .await
        .unwrap();
}

/// Makes `later` the newest device, then runs a uniqueness migration over the duplicates.
async fn migrate_with_later_duplicate(pool: &PgPool, later: Uuid, migration: &'static str) {
    sqlx::query("UPDATE devices SET created_at = now() + interval '1 minute' WHERE id = $1")
        .bind(later)
        .execute(pool)
        .await
        .unwrap();
    sqlx::raw_sql(migration).execute(pool).await.unwrap();
}

/// A device label names one live device of the tenant: a lead CSV maps leads to devices by
/// label, and with two "phone-01" an import gave that label's leads to whichever came last. A
/// second live device with the label is refused and nothing is added; another tenant, and the
/// tenant after deleting the first, may use it. The migration renames duplicates a database
/// already has (the oldest keeps the label) before it makes labels unique.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_device_label_names_one_live_device_of_the_tenant(pool: PgPool) {
    let tenant = seed_tenant(&pool, "labels@example.com").await;
    let other = seed_tenant(&pool, "labels-other@example.com").await;
    let first = seed_device(&pool, tenant, "phone-01", 0.0, 0.0).await;
    let new = |label| repo::devices::NewDevice {
        label,
        phone: None,
        provider: shared::domain::ProviderKind::Simulator,
        delay: shared::domain::DelayRange::new(0.0, 0.0).unwrap(),
        daily_cap: None,
    };
    let mut tx = pool.begin().await.unwrap();
    let err = repo::devices::insert_device(&mut tx, tenant, &new(" phone-01 "))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RepoError::Conflict(m) if m.contains("already has a device labelled \"phone-01\"")),
        "{err}"
    );
    drop(tx);
    let count = |t: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM devices WHERE tenant_id = $1")
                .bind(t)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count(tenant).await, 1);
    seed_device(&pool, other, "phone-01", 0.0, 0.0).await;
    let mut tx = pool.begin().await.unwrap();
    repo::devices::delete_device(&mut tx, tenant, first)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let second = seed_device(&pool, tenant, "phone-01", 0.0, 0.0).await;

    // A database from before the rule: duplicates get their id's start appended, oldest first.
    drop_index(&pool, "devices_tenant_label").await;
    let third = seed_device(&pool, tenant, "phone-01", 0.0, 0.0).await;
    migrate_with_later_duplicate(
        &pool,
        third,
        include_str!("../../migrations/20261205000003_device_label_unique.sql"),
    )
    .await;
    let labels: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, label FROM devices WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY created_at",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        labels,
        vec![
            (second, "phone-01".to_string()),
            (third, format!("phone-01-{}", &third.to_string()[..8])),
        ]
    );
    let mut tx = pool.begin().await.unwrap();
    assert!(matches!(
        repo::devices::insert_device(&mut tx, tenant, &new("phone-01")).await,
        Err(RepoError::Conflict(_))
    ));
}

/// One WhatsApp number is one device. Two live devices of a tenant with one number would each
/// keep their own gaps and daily cap, and the account would send at both paces: `device add`
/// refuses a number the tenant's live devices already have, and nothing is added; another
/// tenant, a deleted device's number and devices without a number are not constrained. The
/// migration first takes the number off the later of existing duplicates (the oldest keeps it).
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_phone_number_is_one_live_device_of_the_tenant(pool: PgPool) {
    let tenant = seed_tenant(&pool, "numbers@example.com").await;
    let other = seed_tenant(&pool, "numbers-other@example.com").await;
    let phone = PhoneE164::parse("+60123456781").unwrap();
    let add = |t: Uuid, label: &'static str, phone: Option<PhoneE164>| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let res = repo::devices::insert_device(
                &mut tx,
                t,
                &repo::devices::NewDevice {
                    label,
                    phone: phone.as_ref(),
                    provider: shared::domain::ProviderKind::Web,
                    delay: shared::domain::DelayRange::new(0.0, 0.0).unwrap(),
                    daily_cap: None,
                },
            )
            .await;
            if res.is_ok() {
                tx.commit().await.unwrap();
            }
            res
        }
    };
    let first = add(tenant, "phone-01", Some(phone.clone())).await.unwrap();
    let err = add(tenant, "phone-02", Some(phone.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RepoError::Conflict(m) if m.contains("already has a device with the number +60123456781")),
        "{err}"
    );
    let live = |t: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM devices WHERE tenant_id = $1 AND deleted_at IS NULL",
            )
            .bind(t)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(live(tenant).await, 1, "nothing added");
    // Devices without a number, and another tenant's device with it, are fine.
    add(tenant, "no-number-1", None).await.unwrap();
    add(tenant, "no-number-2", None).await.unwrap();
    add(other, "theirs", Some(phone.clone())).await.unwrap();
    // A deleted device's number may be used again.
    let mut tx = pool.begin().await.unwrap();
    repo::devices::delete_device(&mut tx, tenant, first)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let second = add(tenant, "phone-02", Some(phone.clone())).await.unwrap();

    // A database from before the rule: the oldest keeps the number, later ones lose it.
    drop_index(&pool, "devices_tenant_phone").await;
    let third = add(tenant, "phone-03", Some(phone.clone())).await.unwrap();
    migrate_with_later_duplicate(
        &pool,
        third,
        include_str!("../../migrations/20261205000004_device_phone_unique.sql"),
    )
    .await;
    let phones: Vec<(Uuid, Option<String>)> = sqlx::query_as(
        "SELECT id, phone FROM devices
         WHERE tenant_id = $1 AND deleted_at IS NULL AND phone IS NOT NULL OR id = $2
         ORDER BY created_at",
    )
    .bind(tenant)
    .bind(third)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        phones,
        vec![(second, Some(phone.as_str().to_string())), (third, None)]
    );
    let theirs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM devices WHERE tenant_id = $1 AND phone = $2")
            .bind(other)
            .bind(phone.as_str())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(theirs, 1, "another tenant's device keeps its number");
}

/// The number a session is linked to is recorded on its device (what pairing reports wins over
/// what a person typed), and a second device linked to an account the tenant already has as a
/// device is logged out (unlinked) by the host, with a reason naming that device. Driven
/// through the device host's HTTP pairing on the simulator, whose pairing by phone links that
/// number.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_session_linked_to_another_devices_number_is_unlinked(pool: PgPool) {
    let tenant = seed_tenant(&pool, "linked@example.com").await;
    let other = seed_tenant(&pool, "linked-other@example.com").await;
    let a = seed_device(&pool, tenant, "phone-a", 0.0, 0.0).await;
    let b = seed_device(&pool, tenant, "phone-b", 0.0, 0.0).await;
    let c = seed_device(&pool, other, "phone-c", 0.0, 0.0).await;
    sqlx::query("UPDATE devices SET phone = '+60111111111' WHERE id = $1")
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
    let host = TestHost::start(&pool, quiet_sim()).await;
    let device = |id: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (Option<String>, String, Option<String>)>(
                "SELECT phone, status, status_reason FROM devices WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let settled = |id: Uuid, want: &'static str| async move {
        for _ in 0..200 {
            let d = device(id).await;
            if d.1 == want {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("device {id} never reached {want}: {:?}", device(id).await);
    };
    // The number pairing linked has reached the device row.
    let linked = |id: Uuid, number: &'static str| async move {
        for _ in 0..200 {
            if device(id).await.0.as_deref() == Some(number) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };

    // A pairs with another number than it was given: the paired account wins.
    host.client
        .start_pairing(tenant, a, Some("+60122222222".into()))
        .await
        .unwrap();
    linked(a, "+60122222222").await;
    assert_eq!(device(a).await.0.as_deref(), Some("+60122222222"));
    assert_eq!(settled(a, "online").await.1, "online");

    // B pairs with A's account: unlinked, A untouched.
    host.client
        .start_pairing(tenant, b, Some("+60122222222".into()))
        .await
        .unwrap();
    let (phone, _, reason) = settled(b, "logged_out").await;
    assert_eq!(phone, None, "B did not take the number");
    let reason = reason.unwrap();
    assert!(
        reason.contains("+60122222222 is already device \"phone-a\"")
            && reason.contains(&a.to_string()),
        "{reason}"
    );
    // It stays logged out (no reconnect), and A still has its number and is online.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(device(b).await.1, "logged_out");
    assert_eq!(
        device(a).await,
        (
            Some("+60122222222".into()),
            "online".into(),
            Some("paired (simulated)".into())
        )
    );

    // Another tenant's device may be that account (the tenants do not see each other).
    host.client
        .start_pairing(other, c, Some("+60122222222".into()))
        .await
        .unwrap();
    linked(c, "+60122222222").await;
    assert_eq!(device(c).await.0.as_deref(), Some("+60122222222"));
    assert_eq!(settled(c, "online").await.1, "online");

    // Once A is deleted, B may pair with the number.
    let mut tx = pool.begin().await.unwrap();
    repo::devices::delete_device(&mut tx, tenant, a)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    host.client
        .start_pairing(tenant, b, Some("+60122222222".into()))
        .await
        .unwrap();
    linked(b, "+60122222222").await;
    assert_eq!(device(b).await.0.as_deref(), Some("+60122222222"));
    assert_eq!(settled(b, "online").await.1, "online");

    // A number only typed on a device does not outrank a session that proves it: E typed
    // +60133333333 (wrongly, say), F's session is that account; F keeps its link and takes the
    // number, E loses the typed claim (and is not unlinked).
    let e = seed_device(&pool, tenant, "phone-e", 0.0, 0.0).await;
    let f = seed_device(&pool, tenant, "phone-f", 0.0, 0.0).await;
    sqlx::query("UPDATE devices SET phone = '+60133333333' WHERE id = $1")
        .bind(e)
        .execute(&pool)
        .await
        .unwrap();
    host.client
        .start_pairing(tenant, f, Some("+60133333333".into()))
        .await
        .unwrap();
    linked(f, "+60133333333").await;
    assert_eq!(device(f).await.0.as_deref(), Some("+60133333333"));
    assert_eq!(settled(f, "online").await.1, "online");
    assert_eq!(device(e).await, (None, "online".into(), None));
}
