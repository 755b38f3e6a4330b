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
    let host = TestHost::start(&pool, quiet_sim()).await;
    let mut tx = pool.begin().await.unwrap();
    let b_media = repo::media::insert_media(&mut tx, b, "image/png", shared::media::TINY_PNG)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let base = SendRequest {
        message_id: 1,
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
                message_id: 2,
                text: "  ".into(),
                ..base.clone()
            },
            code::INVALID_PAYLOAD,
        ),
        (
            SendRequest {
                message_id: 3,
                image: Some("https://127.0.0.1/x.png".into()),
                ..base.clone()
            },
            code::BAD_IMAGE,
        ),
        (
            SendRequest {
                message_id: 4,
                image: Some("https://169.254.169.254/latest".into()),
                ..base.clone()
            },
            code::BAD_IMAGE,
        ),
        (
            SendRequest {
                message_id: 5,
                image: Some("file:///etc/passwd".into()),
                ..base.clone()
            },
            code::BAD_IMAGE,
        ),
        (
            SendRequest {
                message_id: 6,
                image: Some(format!("media:{b_media}")),
                ..base.clone()
            },
            code::BAD_IMAGE,
        ),
        (
            SendRequest {
                message_id: 7,
                device_id: Uuid::new_v4(),
                ..base.clone()
            },
            code::UNKNOWN_DEVICE,
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
            message_id: 8,
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
    sqlx::query("DROP INDEX devices_tenant_label")
        .execute(&pool)
        .await
        .unwrap();
    let third = seed_device(&pool, tenant, "phone-01", 0.0, 0.0).await;
    sqlx::query("UPDATE devices SET created_at = now() + interval '1 minute' WHERE id = $1")
        .bind(third)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(include_str!(
        "../../migrations/20261205000003_device_label_unique.sql"
    ))
    .execute(&pool)
    .await
    .unwrap();
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
