//! The Cloud API provider end to end: campaigns through the real pipeline and device host to a
//! local server that speaks the Graph API's documented shapes (tests/src/graph.rs), and the
//! statuses/inbound webhook with its signature check, driven by `events/device-host/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use device_host::cloud_api::{sign, CloudApiConfig};
use shared::domain::LeadStatus;
use shared::repo;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;
use wabcast_tests::graph::FakeGraph;
use wabcast_tests::*;

const PNID: &str = "106540352242922";
const TOKEN_A: &str = "EAAGm0PX4ZCpsBAKZAtest0token0for0device0a";
const APP_SECRET: &str = "app-secret-for-tests";
const VERIFY: &str = "verify-me";

async fn host(pool: &PgPool, graph: &FakeGraph) -> TestHost {
    TestHost::start_with(
        pool,
        quiet_sim(),
        CloudApiConfig {
            base_url: graph.base_url.clone(),
            app_secret: Some(shared::config::Secret::new(APP_SECRET)),
            verify_token: Some(shared::config::Secret::new(VERIFY)),
            ..Default::default()
        },
    )
    .await
}

async fn messages(pool: &PgPool, tenant: Uuid, campaign: Uuid) -> Vec<repo::messages::MessageRow> {
    repo::messages::list_campaign_messages(pool, tenant, campaign)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_campaign_goes_out_through_the_cloud_api_with_each_error_classified(pool: PgPool) {
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    let tenant = seed_tenant(&pool, "cloud@example.com").await;
    let device = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    let phones = seed_leads(&pool, tenant, device, 0, 6, "cars", LeadStatus::Prospect).await;
    graph.fail_next(phones[1].as_str(), &[131026]); // not on WhatsApp
    graph.fail_next(phones[2].as_str(), &[131047]); // 24-hour window closed
    graph.fail_next(phones[3].as_str(), &[130429]); // rate limited once, then accepted
    let image = seed_image(&pool, tenant, shared::media::TINY_PNG).await;
    let campaign = seed_campaign(
        &pool,
        tenant,
        &CampaignSpec {
            image: Some(&image),
            ..Default::default()
        },
    )
    .await;
    let host = host(&pool, &graph).await;
    let status = host.client.connect_device(tenant, device).await.unwrap();
    assert_eq!(status.status, "online", "{status:?}");
    // The host writes the status asynchronously.
    wait_for_device_status(&pool, tenant, device, "online").await;

    let pipeline = Pipeline::new(&pool, test_queue(5).await, &host);
    pipeline
        .run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;

    let rows = messages(&pool, tenant, campaign).await;
    let by_phone = |p: &shared::domain::PhoneE164| {
        rows.iter()
            .find(|r| r.recipient == p.as_str())
            .unwrap()
            .clone()
    };
    assert_eq!(
        (
            by_phone(&phones[1]).status.as_str(),
            by_phone(&phones[1]).reason.as_deref()
        ),
        ("skipped", Some("not_on_whatsapp"))
    );
    let closed = by_phone(&phones[2]);
    assert_eq!(
        (closed.status.as_str(), closed.reason.as_deref()),
        ("failed", Some("template_required"))
    );
    assert!(closed.last_error.unwrap().contains("template"));
    let limited = by_phone(&phones[3]);
    assert_eq!(limited.status, "sent");
    assert_eq!(limited.attempts, 2, "retried once after the rate limit");
    for p in [&phones[0], &phones[4], &phones[5]] {
        assert_eq!(by_phone(p).status, "sent");
    }

    // Requests: bearer token, digits-only recipient, our id as biz_opaque_callback_data, the
    // image uploaded once for the device and sent by media id with the text as caption.
    let requests = graph.requests();
    let sends: Vec<_> = requests
        .iter()
        .filter(|r| r.path.ends_with("/messages"))
        .collect();
    assert_eq!(sends.len(), 7, "6 messages + 1 retry");
    assert_eq!(graph.sent(), 4);
    assert_eq!(graph.uploads(), 1, "one upload per image per device");
    for r in &sends {
        assert_eq!(r.authorization, format!("Bearer {TOKEN_A}"));
        assert!(r.body["to"].as_str().unwrap().starts_with("601"));
        assert_eq!(r.body["type"], "image");
        assert_eq!(r.body["image"]["id"], "media-1");
        assert!(r.body["image"]["caption"].as_str().unwrap().len() > 3);
    }
    let upload = requests
        .iter()
        .find(|r| r.path.ends_with("/media"))
        .unwrap();
    assert_eq!(upload.body["type"], "image/png");
    assert_eq!(upload.body["file_content_type"], "image/png");
    let sent_row = by_phone(&phones[0]);
    let send_of_row = sends
        .iter()
        .find(|r| r.body["to"] == phones[0].as_str().trim_start_matches('+'))
        .unwrap();
    assert_eq!(
        send_of_row.body["biz_opaque_callback_data"].as_str(),
        sent_row.provider_message_id.as_deref()
    );
    // The token is a secret: no row, reason or error text carries it.
    for r in &rows {
        assert!(!format!("{r:?}").contains(TOKEN_A));
    }
}

async fn wait_for_device_status(pool: &PgPool, tenant: Uuid, device: Uuid, want: &str) {
    for _ in 0..100 {
        let d = repo::devices::get_device(pool, tenant, device)
            .await
            .unwrap();
        if d.status == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = repo::devices::get_device(pool, tenant, device)
        .await
        .unwrap();
    panic!(
        "device is {} ({:?}), expected {want}",
        d.status, d.status_reason
    );
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_spam_restriction_stops_the_device_until_a_person_reconnects_it(pool: PgPool) {
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    let tenant = seed_tenant(&pool, "restricted@example.com").await;
    let device = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    let phones = seed_leads(&pool, tenant, device, 0, 4, "cars", LeadStatus::Prospect).await;
    graph.fail_next(phones[0].as_str(), &[131048]);
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = host(&pool, &graph).await;
    host.client.connect_device(tenant, device).await.unwrap();
    wait_for_device_status(&pool, tenant, device, "online").await;
    let pipeline = Pipeline::new(&pool, test_queue(5).await, &host);

    pipeline.trigger().await;
    for _ in 0..5 {
        pipeline.tick().await;
        while pipeline.deliver().await > 0 {}
    }
    wait_for_device_status(&pool, tenant, device, "restricted").await;
    let d = repo::devices::get_device(&pool, tenant, device)
        .await
        .unwrap();
    assert!(d.status_reason.unwrap().contains("131048"));
    let rows = messages(&pool, tenant, campaign).await;
    assert!(
        rows.iter().all(|r| r.status == "pending"),
        "nothing more goes out while restricted, and nothing is lost: {:?}",
        rows.iter().map(|r| &r.status).collect::<Vec<_>>()
    );
    assert_eq!(graph.sent(), 0);
    // The offline grace does not apply: a restriction holds messages, it does not skip them.
    sqlx::query("UPDATE devices SET status_changed_at = now() - interval '1 hour' WHERE id = $1")
        .bind(device)
        .execute(&pool)
        .await
        .unwrap();
    pipeline.tick().await;
    assert!(messages(&pool, tenant, campaign)
        .await
        .iter()
        .all(|r| r.status == "pending"));

    // A person resolves it and reconnects the device: the rest goes out.
    let s = host.client.connect_device(tenant, device).await.unwrap();
    assert_eq!(s.status, "online");
    wait_for_device_status(&pool, tenant, device, "online").await;
    pipeline
        .run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    assert_eq!(
        status_counts(&pool, tenant, campaign).await.get("sent"),
        Some(&4)
    );
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_revoked_token_logs_the_device_out(pool: PgPool) {
    let graph = FakeGraph::start().await;
    let tenant = seed_tenant(&pool, "revoked@example.com").await;
    let device = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    let host = host(&pool, &graph).await;
    let s = host.client.connect_device(tenant, device).await.unwrap();
    assert_eq!(s.status, "logged_out");
    assert!(s.reason.unwrap().contains("190"));
    graph.allow(PNID, TOKEN_A);
    assert_eq!(
        host.client
            .connect_device(tenant, device)
            .await
            .unwrap()
            .status,
        "online"
    );
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn credentials_are_validated_and_tenant_scoped(pool: PgPool) {
    let a = seed_tenant(&pool, "a@example.com").await;
    let b = seed_tenant(&pool, "b@example.com").await;
    let da = seed_cloud_device(&pool, a, "a-1", PNID, TOKEN_A).await;
    let db = seed_cloud_device(&pool, b, "b-1", "2000000000", TOKEN_A).await;
    let sim = seed_device(&pool, a, "sim", 0.0, 0.0).await;
    let token = shared::config::Secret::new(TOKEN_A);
    let mut tx = pool.begin().await.unwrap();
    for (tenant, device, pnid, want) in [
        (a, db, "3000000000", "not found"),  // another tenant's device
        (a, sim, "3000000000", "not found"), // not a Cloud API device
        (a, da, "12ab", "digits"),           // malformed id
        (b, db, PNID, "already belongs"),    // another tenant's number
    ] {
        let err = repo::cloud_api::set_cloud_credentials(&mut tx, tenant, device, pnid, &token)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    let short = shared::config::Secret::new("short");
    assert!(
        repo::cloud_api::set_cloud_credentials(&mut tx, a, da, PNID, &short)
            .await
            .is_err()
    );
    drop(tx);
    let creds = repo::cloud_api::get_cloud_credentials(&pool, a, da)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(creds.phone_number_id, PNID);
    assert!(
        !format!("{creds:?}").contains(TOKEN_A),
        "Debug hides the token"
    );
    assert!(repo::cloud_api::get_cloud_credentials(&pool, b, da)
        .await
        .unwrap()
        .is_none());
}

/// The sample webhook delivery, with the sample's ids replaced by the ones this test created.
fn sample_delivery(replace: &[(&str, String)]) -> String {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../events/device-host/cloud-api-webhook.json");
    let mut s = std::fs::read_to_string(path).unwrap();
    for (from, to) in replace {
        assert!(s.contains(from), "the sample has no {from}");
        s = s.replace(from, to);
    }
    s
}

async fn post_webhook(host: &TestHost, body: &str, signature: Option<String>) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/webhooks/cloud-api", host.url))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(s) = signature {
        req = req.header("x-hub-signature-256", s);
    }
    req.send().await.unwrap()
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_webhook_applies_signed_statuses_and_opt_outs_and_refuses_the_rest(pool: PgPool) {
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    let tenant = seed_tenant(&pool, "hook@example.com").await;
    let device = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    let phones = seed_leads(&pool, tenant, device, 0, 3, "cars", LeadStatus::Prospect).await;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = host(&pool, &graph).await;
    host.client.connect_device(tenant, device).await.unwrap();
    wait_for_device_status(&pool, tenant, device, "online").await;
    let pipeline = Pipeline::new(&pool, test_queue(5).await, &host);
    pipeline
        .run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    let rows = messages(&pool, tenant, campaign).await;
    let id_of = |i: usize| {
        rows.iter()
            .find(|r| r.recipient == phones[i].as_str())
            .unwrap()
            .provider_message_id
            .clone()
            .unwrap()
    };
    // A later campaign's message to lead 2, still pending when lead 2 writes STOP.
    let later = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    pipeline.trigger().await;

    let body = sample_delivery(&[
        ("wbc.sample0000000000000000000000001", id_of(0)),
        ("wbc.sample0000000000000000000000002", id_of(1)),
        (
            "60100000002",
            phones[2].as_str().trim_start_matches('+').to_string(),
        ),
    ]);

    // Verification handshake.
    let verify = |token: &str| {
        reqwest::Client::new()
            .get(format!("{}/v1/webhooks/cloud-api", host.url))
            .query(&[
                ("hub.mode", "subscribe"),
                ("hub.verify_token", token),
                ("hub.challenge", "1158201444"),
            ])
            .send()
    };
    let ok = verify(VERIFY).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "1158201444");
    assert_eq!(verify("wrong").await.unwrap().status(), 403);

    // Unsigned, wrongly signed, or signed over other bytes: refused, nothing changes.
    for sig in [
        None,
        Some("sha256=00".to_string()),
        Some(sign("not-the-secret", body.as_bytes())),
        Some(sign(APP_SECRET, format!("{body} ").as_bytes())),
    ] {
        assert_eq!(post_webhook(&host, &body, sig).await.status(), 401);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let unchanged = messages(&pool, tenant, campaign).await;
    assert!(unchanged
        .iter()
        .all(|r| r.delivered_at.is_none() && r.status == "sent"));

    // Signed: lead 0 read (the read arrives before the delivered), lead 1 failed 131047 after
    // it was accepted, lead 2 wrote STOP.
    let resp = post_webhook(&host, &body, Some(sign(APP_SECRET, body.as_bytes()))).await;
    assert_eq!(resp.status(), 200);
    let report: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(report["failed"], 1, "{report}");
    assert_eq!(report["opt_outs"], 1, "{report}");
    // Receipts are written in batches by the host's event writer.
    let mut read = None;
    for _ in 0..50 {
        let rows = messages(&pool, tenant, campaign).await;
        let r0 = rows
            .iter()
            .find(|r| r.recipient == phones[0].as_str())
            .unwrap()
            .clone();
        if r0.read_at.is_some() && r0.delivered_at.is_some() {
            read = Some(r0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r0 = read.expect("read and delivered applied");
    assert!(r0.delivered_at.unwrap() <= r0.read_at.unwrap());
    let rows = messages(&pool, tenant, campaign).await;
    let r1 = rows
        .iter()
        .find(|r| r.recipient == phones[1].as_str())
        .unwrap();
    assert_eq!(
        (r1.status.as_str(), r1.reason.as_deref()),
        ("failed", Some("template_required"))
    );
    let later_rows = messages(&pool, tenant, later).await;
    let r2 = later_rows
        .iter()
        .find(|r| r.recipient == phones[2].as_str())
        .unwrap();
    assert_eq!(
        (r2.status.as_str(), r2.reason.as_deref()),
        ("skipped", Some("lead_opted_out"))
    );

    // The same delivery again (Meta retries): nothing changes twice.
    let again = post_webhook(&host, &body, Some(sign(APP_SECRET, body.as_bytes()))).await;
    let report: serde_json::Value = again.json().await.unwrap();
    assert_eq!(
        (report["failed"].as_u64(), report["opt_outs"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(
        status_counts(&pool, tenant, campaign).await.get("failed"),
        Some(&1)
    );
}

/// A person stops a Cloud API number's messages without typing a keyword: by tapping a
/// template's quick-reply button (Meta's marketing opt-out button says "Stop promotions"), by
/// choosing an interactive reply that is a keyword, or by turning the business's marketing
/// messages off in WhatsApp (the `user_preferences` webhook field). Each puts the number on
/// the tenant's opt-out list, logged with what the person did; a reply that is no keyword, a
/// message of another kind, and turning marketing messages on again opt nobody out (the reply
/// ends its lead's enrollment in a sequence that stops on a reply).
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_tapped_stop_button_or_a_marketing_setting_turned_off_opts_the_number_out(pool: PgPool) {
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    let tenant = seed_tenant(&pool, "taps@example.com").await;
    let device = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    let phones = seed_leads(&pool, tenant, device, 0, 5, "cars", LeadStatus::Prospect).await;
    let wa = |i: usize| phones[i].as_str().trim_start_matches('+').to_string();
    let host = host(&pool, &graph).await;
    // Lead 1 is in a drip that stops on a reply: its answer by button ends it.
    sqlx::query("UPDATE leads SET triggers = '{cold}' WHERE tenant_id = $1 AND phone = $2")
        .bind(tenant)
        .bind(phones[1].as_str())
        .execute(&pool)
        .await
        .unwrap();
    let seq = seed_drip(&pool, tenant, "cold", 3, true, true).await;
    Pipeline::new(&pool, test_queue(5).await, &host)
        .trigger()
        .await;
    let body = serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "102290129340398",
            "changes": [
                {
                    "field": "messages",
                    "value": {
                        "messaging_product": "whatsapp",
                        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PNID},
                        "contacts": [{"profile": {"name": "Aminah"}, "wa_id": wa(0)}],
                        "messages": [
                            {"context": {"from": "15550783881", "id": "wamid.promo0"},
                             "from": wa(0), "id": "wamid.tap0", "timestamp": "1739321024",
                             "type": "button",
                             "button": {"payload": "Stop promotions", "text": "Stop promotions"}},
                            {"from": wa(1), "id": "wamid.tap1", "timestamp": "1739321025",
                             "type": "interactive",
                             "interactive": {"type": "button_reply",
                                             "button_reply": {"id": "more", "title": "Tell me more"}}},
                            {"from": wa(3), "id": "wamid.tap3", "timestamp": "1739321026",
                             "type": "interactive",
                             "interactive": {"type": "list_reply",
                                             "list_reply": {"id": "unsub-all", "title": "Unsubscribe",
                                                            "description": "no more offers"}}},
                            {"from": wa(4), "id": "wamid.react4", "timestamp": "1739321027",
                             "type": "reaction",
                             "reaction": {"message_id": "wamid.promo0", "emoji": "👍"}}
                        ]
                    }
                },
                {
                    "field": "user_preferences",
                    "value": {
                        "messaging_product": "whatsapp",
                        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PNID},
                        "contacts": [{"profile": {"name": "Ravi"}, "wa_id": wa(2)}],
                        "user_preferences": [
                            {"wa_id": wa(2), "detail": "User requested to stop marketing messages",
                             "category": "marketing_messages", "value": "stop",
                             "timestamp": 1731705721},
                            {"wa_id": wa(0), "detail": "User requested to resume marketing messages",
                             "category": "marketing_messages", "value": "resume",
                             "timestamp": 1731705722}
                        ]
                    }
                }
            ]
        }]
    })
    .to_string();
    let resp = post_webhook(&host, &body, Some(sign(APP_SECRET, body.as_bytes()))).await;
    assert_eq!(resp.status(), 200);
    let report: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(report["opt_outs"], 3, "{report}");
    assert_eq!(report["replies_ended"], 1, "{report}");
    assert_eq!(
        repo::sequences::count_enrollments(&pool, tenant, seq)
            .await
            .unwrap(),
        vec![("replied".to_string(), 1)]
    );

    let opted: Vec<(String, bool)> = sqlx::query_as(
        "SELECT phone, opted_out_at IS NOT NULL FROM leads WHERE tenant_id = $1 ORDER BY phone",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    let out: Vec<bool> = phones
        .iter()
        .map(|p| opted.iter().find(|(q, _)| q == p.as_str()).unwrap().1)
        .collect();
    assert_eq!(out, [true, false, true, true, false], "{opted:?}");
    let log: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT phone, action, source FROM opt_out_log WHERE tenant_id = $1 ORDER BY phone",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut want = vec![
        (
            phones[0].as_str().to_string(),
            "opt_out".into(),
            "inbound_message".into(),
        ),
        (
            phones[2].as_str().to_string(),
            "opt_out".into(),
            "marketing_preference".into(),
        ),
        (
            phones[3].as_str().to_string(),
            "opt_out".into(),
            "inbound_message".into(),
        ),
    ];
    want.sort();
    assert_eq!(log, want);
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_webhook_cannot_touch_another_tenants_messages(pool: PgPool) {
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    graph.allow("2000000000", TOKEN_A);
    let a = seed_tenant(&pool, "a@example.com").await;
    let b = seed_tenant(&pool, "b@example.com").await;
    let da = seed_cloud_device(&pool, a, "a-1", PNID, TOKEN_A).await;
    let db = seed_cloud_device(&pool, b, "b-1", "2000000000", TOKEN_A).await;
    seed_leads(&pool, a, da, 0, 1, "cars", LeadStatus::Prospect).await;
    let phones_b = seed_leads(&pool, b, db, 500, 1, "cars", LeadStatus::Prospect).await;
    let ca = seed_campaign(&pool, a, &CampaignSpec::default()).await;
    let cb = seed_campaign(&pool, b, &CampaignSpec::default()).await;
    let host = host(&pool, &graph).await;
    host.client.connect_device(a, da).await.unwrap();
    host.client.connect_device(b, db).await.unwrap();
    wait_for_device_status(&pool, a, da, "online").await;
    wait_for_device_status(&pool, b, db, "online").await;
    let pipeline = Pipeline::new(&pool, test_queue(5).await, &host);
    pipeline
        .run_until_done(&[(a, ca), (b, cb)], Duration::from_secs(30))
        .await;
    let b_id = messages(&pool, b, cb).await[0]
        .provider_message_id
        .clone()
        .unwrap();
    // Tenant A's number names tenant B's message and B's lead: nothing of B changes.
    let body = sample_delivery(&[
        ("wbc.sample0000000000000000000000001", b_id.clone()),
        ("wbc.sample0000000000000000000000002", b_id),
        (
            "60100000002",
            phones_b[0].as_str().trim_start_matches('+').to_string(),
        ),
    ]);
    let resp = post_webhook(&host, &body, Some(sign(APP_SECRET, body.as_bytes()))).await;
    let report: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(report["unknown_messages"], 3, "{report}");
    assert_eq!(report["opt_outs"], 0, "{report}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rb = &messages(&pool, b, cb).await[0];
    assert_eq!(rb.status, "sent");
    assert!(rb.delivered_at.is_none() && rb.read_at.is_none());
    let lead_opted_out: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT opted_out_at FROM leads WHERE tenant_id = $1")
            .bind(b)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(lead_opted_out.is_none());
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_send_whose_host_died_is_never_resent_blindly(pool: PgPool) {
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    let tenant = seed_tenant(&pool, "crash@example.com").await;
    let device = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    let phones = seed_leads(&pool, tenant, device, 0, 2, "cars", LeadStatus::Prospect).await;
    let campaign = seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    let host = host(&pool, &graph).await;
    host.client.connect_device(tenant, device).await.unwrap();
    let pipeline = Pipeline::new(&pool, test_queue(5).await, &host);
    pipeline.trigger().await;
    let rows = messages(&pool, tenant, campaign).await;
    // Both messages have an attempt record left by a host that died during the call.
    let attempts: Vec<(i64, String)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id, format!("wbc.died{i}")))
        .collect();
    for (id, pid) in &attempts {
        record_dead_attempt(&pool, tenant, device, *id, pid, "dead-host").await;
    }
    // The provider's statuses webhook confirms the first one went out.
    let confirm = serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "1", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "60123456789", "phone_number_id": PNID },
            "statuses": [{ "id": "wamid.X", "status": "sent", "timestamp": "1764028800",
                           "recipient_id": "60100000000", "biz_opaque_callback_data": "wbc.died0" }]
        }}]}]
    })
    .to_string();
    let r = post_webhook(&host, &confirm, Some(sign(APP_SECRET, confirm.as_bytes()))).await;
    assert_eq!(r.status(), 200);

    pipeline
        .run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    let rows = messages(&pool, tenant, campaign).await;
    let first = rows.iter().find(|r| r.id == attempts[0].0).unwrap();
    let second = rows.iter().find(|r| r.id == attempts[1].0).unwrap();
    assert_eq!(
        first.status, "sent",
        "confirmed by the provider: sent, not resent"
    );
    assert_eq!(first.provider_message_id.as_deref(), Some("wbc.died0"));
    assert_eq!(
        (second.status.as_str(), second.reason.as_deref()),
        ("failed", Some("outcome_unknown")),
        "unknown outcome: failed for a person to retry, never sent a second time"
    );
    assert_eq!(graph.sent(), 0, "nothing was sent again");
    let _ = phones;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_template_campaign_sends_the_approved_template_with_per_lead_parameters(pool: PgPool) {
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    let tenant = seed_tenant(&pool, "tpl@example.com").await;
    let device = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    seed_leads(&pool, tenant, device, 0, 4, "cars", LeadStatus::Prospect).await;
    let template = shared::render::WaTemplate::new(
        "november_promo",
        "ms",
        vec!["{name:Tuan/Puan}".into(), "{RM50|RM80}".into()],
    )
    .unwrap();
    let image = seed_image(&pool, tenant, shared::media::TINY_PNG).await;
    let campaign = seed_campaign(
        &pool,
        tenant,
        &CampaignSpec {
            image: Some(&image),
            wa_template: Some(&template),
            ..Default::default()
        },
    )
    .await;
    let host = host(&pool, &graph).await;
    host.client.connect_device(tenant, device).await.unwrap();
    wait_for_device_status(&pool, tenant, device, "online").await;
    Pipeline::new(&pool, test_queue(5).await, &host)
        .run_until_done(&[(tenant, campaign)], Duration::from_secs(30))
        .await;
    let rows = messages(&pool, tenant, campaign).await;
    assert!(rows.iter().all(|r| r.status == "sent"));
    let sends: Vec<_> = graph
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/messages"))
        .collect();
    assert_eq!(sends.len(), 4);
    for r in &sends {
        let t = &r.body["template"];
        assert_eq!(r.body["type"], "template");
        assert_eq!(t["name"], "november_promo");
        assert_eq!(t["language"]["code"], "ms");
        // The image is the template's header; the body parameters are rendered per lead.
        assert_eq!(t["components"][0]["type"], "header");
        assert_eq!(
            t["components"][0]["parameters"][0]["image"]["id"],
            "media-1"
        );
        let params = &t["components"][1]["parameters"];
        let row = rows
            .iter()
            .find(|m| m.recipient.trim_start_matches('+') == r.body["to"].as_str().unwrap())
            .unwrap();
        let name = params[0]["text"].as_str().unwrap();
        assert!(
            row.body.contains(name) || name == "Tuan/Puan",
            "{name} vs {}",
            row.body
        );
        assert!(["RM50", "RM80"].contains(&params[1]["text"].as_str().unwrap()));
    }
    assert_eq!(graph.uploads(), 1);
}

/// A running campaign's Cloud API template is edited like its text: a template put on a
/// campaign after its fan-out is what its unsent messages go out as, and one taken off sends the
/// text again; a campaign already finished refuses the edit.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_template_set_or_removed_by_an_edit_reaches_the_unsent_messages(pool: PgPool) {
    use shared::repo::campaigns::CampaignEdit;
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    let tenant = seed_tenant(&pool, "tpl-edit@example.com").await;
    let device = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    seed_leads(&pool, tenant, device, 0, 3, "cars", LeadStatus::Prospect).await;
    let old = shared::render::WaTemplate::new("old_promo", "en", vec![]).unwrap();
    let new =
        shared::render::WaTemplate::new("december_promo", "ms", vec!["{name}".into()]).unwrap();
    let with_template = seed_campaign(
        &pool,
        tenant,
        &CampaignSpec {
            template: "Plain text {name}",
            wa_template: Some(&old),
            ..Default::default()
        },
    )
    .await;
    fan_out(&pool).await;
    let edit = |id, wa_template| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let r = repo::campaigns::update_campaign(
                &mut tx,
                tenant,
                id,
                &CampaignEdit {
                    wa_template,
                    ..CampaignEdit::default()
                },
            )
            .await;
            tx.commit().await.unwrap();
            r
        }
    };
    let c = edit(with_template, Some(None)).await.unwrap();
    assert_eq!(c.status, "running");
    assert!(c.wa_template.is_none());

    let host = host(&pool, &graph).await;
    host.client.connect_device(tenant, device).await.unwrap();
    wait_for_device_status(&pool, tenant, device, "online").await;
    let pipeline = Pipeline::new(&pool, test_queue(5).await, &host);
    pipeline
        .run_until_done(&[(tenant, with_template)], Duration::from_secs(30))
        .await;
    let sends = |graph: &FakeGraph| -> Vec<serde_json::Value> {
        graph
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/messages"))
            .map(|r| r.body)
            .collect()
    };
    let first = sends(&graph);
    assert_eq!(first.len(), 3);
    for b in &first {
        assert_eq!(b["type"], "text", "{b}");
        assert!(b["text"]["body"]
            .as_str()
            .unwrap()
            .starts_with("Plain text "));
    }

    let without = seed_campaign(
        &pool,
        tenant,
        &CampaignSpec {
            template: "Plain text {name}",
            ..Default::default()
        },
    )
    .await;
    fan_out(&pool).await;
    let c = edit(without, Some(Some(&new))).await.unwrap();
    assert_eq!(
        c.wa_template.as_ref().map(|t| t.0.name.as_str()),
        Some("december_promo")
    );
    pipeline
        .run_until_done(&[(tenant, without)], Duration::from_secs(30))
        .await;
    let second = sends(&graph);
    assert_eq!(second.len(), 6);
    for b in &second[3..] {
        assert_eq!(b["type"], "template", "{b}");
        assert_eq!(b["template"]["name"], "december_promo");
        assert_eq!(b["template"]["language"]["code"], "ms");
    }
    let err = edit(without, Some(None)).await.unwrap_err();
    assert!(
        matches!(&err, repo::RepoError::Conflict(m) if m.contains("completed")),
        "{err}"
    );
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_image_with_a_public_link_is_sent_by_link_without_an_upload(pool: PgPool) {
    use device_host::provider::{DeviceRef, Outbound, Provider, ResolvedImage};
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    let tenant = seed_tenant(&pool, "link@example.com").await;
    let device = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let cloud = device_host::cloud_api::CloudApi::new(
        CloudApiConfig {
            base_url: graph.base_url.clone(),
            ..Default::default()
        },
        pool.clone(),
        tx,
    )
    .unwrap();
    let dref = DeviceRef {
        id: device,
        tenant_id: tenant,
        provider: shared::domain::ProviderKind::CloudApi,
    };
    cloud.connect(&dref).await;
    let image = ResolvedImage {
        mime: "image/png".into(),
        bytes: std::sync::Arc::new(shared::media::TINY_PNG.to_vec()),
        key: "https://cdn.example.com/promo.png".into(),
        link: Some("https://cdn.example.com/promo.png".into()),
    };
    for (i, to) in ["+60123000001", "+60123000002"].iter().enumerate() {
        cloud
            .send(
                &dref,
                &Outbound {
                    message_id: i as i64 + 1,
                    tenant_id: tenant,
                    provider_message_id: format!("wbc.{i}"),
                    to: shared::domain::PhoneE164::parse(to).unwrap(),
                    text: "Promo!".into(),
                    image: Some(image.clone()),
                    template: None,
                },
            )
            .await
            .unwrap();
    }
    let sends: Vec<_> = graph
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/messages"))
        .collect();
    assert_eq!(sends.len(), 2);
    for r in sends {
        assert_eq!(r.body["type"], "image");
        assert_eq!(r.body["image"]["link"], "https://cdn.example.com/promo.png");
        assert_eq!(r.body["image"]["caption"], "Promo!");
    }
    assert_eq!(graph.uploads(), 0, "a public link needs no upload");
}

/// A Cloud API number is one device: connecting reads the number of the phone-number id from
/// the Graph API ("+60 12-345 6789" → +60123456789). While another live device of the tenant is
/// that number, proven by its own session (the phone it was moved from, say), the Cloud API
/// device stays logged out with a reason naming it, however often it is connected (as two
/// devices the number would send at both paces); once that device is deleted, it connects and
/// the number is recorded on it.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_cloud_number_already_another_device_is_not_connected_twice(pool: PgPool) {
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    let tenant = seed_tenant(&pool, "one-number@example.com").await;
    let phone = seed_device(&pool, tenant, "phone-01", 0.0, 0.0).await;
    // A web device whose own session proved the number (a number only typed would yield).
    sqlx::query("UPDATE devices SET phone = '+60123456789', phone_linked_at = now() WHERE id = $1")
        .bind(phone)
        .execute(&pool)
        .await
        .unwrap();
    let cloud = seed_cloud_device(&pool, tenant, "biz-1", PNID, TOKEN_A).await;
    let host = host(&pool, &graph).await;
    for _ in 0..2 {
        let s = host.client.connect_device(tenant, cloud).await.unwrap();
        assert_eq!(s.status, "logged_out");
        let why = s.reason.unwrap();
        assert!(
            why.contains("+60123456789 is already device \"phone-01\"")
                && why.contains(&phone.to_string()),
            "{why}"
        );
    }
    wait_for_device_status(&pool, tenant, cloud, "logged_out").await;
    let d = repo::devices::get_device(&pool, tenant, cloud)
        .await
        .unwrap();
    assert_eq!(d.phone, None);
    let pipeline = Pipeline::new(&pool, test_queue(5).await, &host);
    seed_leads(&pool, tenant, cloud, 0, 2, "cars", LeadStatus::Prospect).await;
    seed_campaign(&pool, tenant, &CampaignSpec::default()).await;
    pipeline.trigger().await;
    pipeline.tick().await;
    while pipeline.deliver().await > 0 {}
    assert_eq!(graph.sent(), 0, "nothing goes out through it");

    let mut tx = pool.begin().await.unwrap();
    repo::devices::delete_device(&mut tx, tenant, phone)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let s = host.client.connect_device(tenant, cloud).await.unwrap();
    assert_eq!(s.status, "online");
    let d = repo::devices::get_device(&pool, tenant, cloud)
        .await
        .unwrap();
    assert_eq!(d.phone.as_deref(), Some("+60123456789"));
}

/// The database away when a Cloud API device connects (a failover, right after its host took
/// it): its number could not be recorded, and the device came online without it, so the check
/// that one number is one device never ran for it (the number already another device's, both
/// would send at their own paces). The host's event writer now records it once the database is
/// back, and logs the device out then if the number is another device's.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_cloud_number_the_database_could_not_take_is_recorded_once_it_is_back(pool: PgPool) {
    const PNID_B: &str = "106540352242999";
    const TOKEN_B: &str = "EAAGm0PX4ZCpsBAKZAtest0token0for0device0b";
    let graph = FakeGraph::start().await;
    graph.allow(PNID, TOKEN_A);
    graph.allow(PNID_B, TOKEN_B);
    // Tenant A: the number is nobody's. Tenant B: a web device's session proved it already.
    let a = seed_tenant(&pool, "number-a@example.com").await;
    let cloud_a = seed_cloud_device(&pool, a, "biz-a", PNID, TOKEN_A).await;
    let b = seed_tenant(&pool, "number-b@example.com").await;
    let phone = seed_device(&pool, b, "phone-01", 0.0, 0.0).await;
    sqlx::query("UPDATE devices SET phone = '+60123456789', phone_linked_at = now() WHERE id = $1")
        .bind(phone)
        .execute(&pool)
        .await
        .unwrap();
    let cloud_b = seed_cloud_device(&pool, b, "biz-b", PNID_B, TOKEN_B).await;
    database_away_for(&pool, "UPDATE OF phone", "devices", "true").await;
    let host = host(&pool, &graph).await;
    for (tenant, device) in [(a, cloud_a), (b, cloud_b)] {
        let s = host.client.connect_device(tenant, device).await.unwrap();
        assert_eq!(s.status, "online", "{s:?}");
    }
    let number = |tenant: Uuid, device: Uuid| {
        let pool = pool.clone();
        async move {
            repo::devices::get_device(&pool, tenant, device)
                .await
                .unwrap()
                .phone
        }
    };
    assert_eq!(number(a, cloud_a).await, None);

    database_back(&pool).await;
    wait_for_device_status(&pool, a, cloud_a, "online").await;
    wait_for_device_status(&pool, b, cloud_b, "logged_out").await;
    let why = repo::devices::get_device(&pool, b, cloud_b)
        .await
        .unwrap()
        .status_reason
        .unwrap();
    assert!(why.contains("is already device \"phone-01\""), "{why}");
    assert_eq!(number(b, cloud_b).await, None);
    let seen = host.client.device_status(b, cloud_b).await.unwrap();
    assert_eq!(seen.status, "logged_out", "{seen:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while number(a, cloud_a).await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "A's number never recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(number(a, cloud_a).await.as_deref(), Some("+60123456789"));
    assert_eq!(
        host.client.device_status(a, cloud_a).await.unwrap().status,
        "online"
    );
}
