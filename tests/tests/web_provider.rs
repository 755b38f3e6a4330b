//! The host's side of the web multi-device provider, without WhatsApp (unreachable from here):
//! what its events do to PostgreSQL (acks, nacks, receipts by our message id, opt-out keywords),
//! and the number check cached on the lead, with a fake provider in the web provider's place.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use device_host::provider::{DeviceRef, Outbound, Provider, ProviderError, ProviderEvent};
use device_host::service::{Host, OptOuts};
use shared::domain::{DeviceStatus, LeadStatus, PhoneE164, ProviderKind};
use shared::host_api::{PairingBody, SendRequest};
use shared::repo;
use sqlx::PgPool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;
use wabcast_tests::*;

/// Stands in for the web provider: numbers ending in 0 are not on WhatsApp.
#[derive(Default)]
struct FakeWeb {
    checks: AtomicUsize,
    sent: Mutex<Vec<String>>,
}

#[async_trait]
impl Provider for FakeWeb {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Web
    }
    fn new_message_id(&self) -> String {
        device_host_web::new_message_id()
    }
    async fn connect(&self, _device: &DeviceRef) -> DeviceStatus {
        DeviceStatus::Online
    }
    async fn status(&self, _device: &DeviceRef) -> (DeviceStatus, Option<String>) {
        (DeviceStatus::Online, None)
    }
    async fn start_pairing(
        &self,
        _device: &DeviceRef,
        _phone: Option<&PhoneE164>,
    ) -> Result<PairingBody, ProviderError> {
        Err(ProviderError::Offline("fake".into()))
    }
    async fn send(&self, _device: &DeviceRef, m: &Outbound) -> Result<(), ProviderError> {
        self.sent.lock().unwrap().push(m.to.as_str().to_string());
        Ok(())
    }
    async fn was_sent(&self, _device: &DeviceRef, _id: &str) -> Option<bool> {
        Some(false)
    }
    fn checks_numbers(&self) -> bool {
        true
    }
    async fn check_number(&self, _d: &DeviceRef, to: &PhoneE164) -> Result<bool, ProviderError> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        Ok(!to.as_str().ends_with('0'))
    }
}

fn opt_outs(pool: &PgPool, keywords: &[&str], dir: &std::path::Path) -> OptOuts {
    OptOuts {
        pool: pool.clone(),
        keywords: keywords.iter().map(|k| k.to_string()).collect(),
        inbox: device_host::inbox::Inbox::open(dir).unwrap().0,
    }
}

/// A host's event writer on its own, with no provider to act through: the sender of its events,
/// its task, and the directory of its inbox (kept for as long as the writer runs).
fn event_writer(
    pool: &PgPool,
    keywords: &[&str],
    host: &str,
) -> (
    mpsc::UnboundedSender<ProviderEvent>,
    tokio::task::JoinHandle<()>,
    tempfile::TempDir,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let inbox_dir = tempfile::tempdir().unwrap();
    let writer = tokio::spawn(device_host::service::run_event_writer(
        device_host::service::EventWriter {
            pool: pool.clone(),
            opt_outs: opt_outs(pool, keywords, inbox_dir.path()),
            providers: Vec::new(),
            host_id: host.into(),
        },
        rx,
    ));
    (tx, writer, inbox_dir)
}

/// An opt-out is written in the background once it is in the inbox: waits (up to 10 s) until
/// some lead with this number is opted out.
async fn opted_out_soon(pool: &PgPool, phone: &str) {
    for _ in 0..100 {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM leads WHERE phone = $1 AND opted_out_at IS NOT NULL",
        )
        .bind(phone)
        .fetch_one(pool)
        .await
        .unwrap();
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{phone} was never opted out");
}

async fn web_device(pool: &PgPool, tenant: Uuid) -> Uuid {
    let device = seed_device(pool, tenant, "web-1", 0.0, 0.0).await;
    sqlx::query("UPDATE devices SET provider = 'web', status = 'online' WHERE id = $1")
        .bind(device)
        .execute(pool)
        .await
        .unwrap();
    device
}

fn fake_host(pool: &PgPool, fake: &Arc<FakeWeb>) -> Host {
    Host::new(
        pool.clone(),
        pool.clone(),
        "h1".into(),
        vec![fake.clone() as Arc<dyn Provider>],
        shared::media::ImageFetcher::new().unwrap(),
    )
}

/// A campaign to every lead of the tenant, materialised.
async fn new_campaign(pool: &PgPool, tenant: Uuid) -> (Uuid, Vec<repo::messages::MessageRow>) {
    let campaign = seed_campaign(pool, tenant, &CampaignSpec::default()).await;
    fan_out(pool).await;
    let rows = repo::messages::list_campaign_messages(pool, tenant, campaign)
        .await
        .unwrap();
    (campaign, rows)
}

async fn pending_rows(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
    n: u64,
) -> (Uuid, Vec<repo::messages::MessageRow>) {
    seed_leads(pool, tenant, device, 0, n, "cars", LeadStatus::Prospect).await;
    let (campaign, rows) = new_campaign(pool, tenant).await;
    assert_eq!(rows.len() as u64, n);
    (campaign, rows)
}

fn request(r: &repo::messages::MessageRow) -> SendRequest {
    SendRequest {
        message_id: r.id,
        tenant_id: r.tenant_id,
        device_id: r.device_id,
        to: r.recipient.clone(),
        text: r.body.clone(),
        image: None,
        template: None,
    }
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_number_check_runs_once_per_lead_and_skips_absent_numbers(pool: PgPool) {
    let tenant = seed_tenant(&pool, "web@example.com").await;
    let device = web_device(&pool, tenant).await;
    let (_, rows) = pending_rows(&pool, tenant, device, 20).await;
    mark_sending(&pool, &rows.iter().map(|r| r.id).collect::<Vec<_>>()).await;
    let fake = Arc::new(FakeWeb::default());
    let host = fake_host(&pool, &fake);
    let results = host
        .send_batch(&rows.iter().map(request).collect::<Vec<_>>())
        .await;
    let absent: Vec<&repo::messages::MessageRow> =
        rows.iter().filter(|r| r.recipient.ends_with('0')).collect();
    assert!(!absent.is_empty());
    for (r, res) in rows.iter().zip(&results) {
        match res {
            Ok(_) => assert!(!r.recipient.ends_with('0')),
            Err(e) => {
                assert!(r.recipient.ends_with('0'));
                assert_eq!(e.code, "not_on_whatsapp");
                assert!(!e.retryable);
            }
        }
    }
    assert_eq!(fake.checks.load(Ordering::SeqCst), 20, "one check per lead");
    assert_eq!(
        fake.sent.lock().unwrap().len(),
        20 - absent.len(),
        "absent numbers are never sent to"
    );
    let cached: Vec<(Option<bool>, String)> =
        sqlx::query_as("SELECT on_whatsapp, phone FROM leads WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(cached
        .iter()
        .all(|(on, phone)| *on == Some(!phone.ends_with('0'))));

    // A second campaign to the same leads: answered from the lead, no new checks.
    let (_, rows2) = new_campaign(&pool, tenant).await;
    mark_sending(&pool, &rows2.iter().map(|r| r.id).collect::<Vec<_>>()).await;
    let results = host
        .send_batch(&rows2.iter().map(request).collect::<Vec<_>>())
        .await;
    assert_eq!(fake.checks.load(Ordering::SeqCst), 20, "cached on the lead");
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), absent.len());
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn acks_nacks_receipts_and_opt_outs_land_by_message_id(pool: PgPool) {
    let tenant = seed_tenant(&pool, "events@example.com").await;
    let device = web_device(&pool, tenant).await;
    let (campaign, rows) = pending_rows(&pool, tenant, device, 6).await;
    // Rows 0..4 go out through the host (sending → sent as the worker would record them).
    let fake = Arc::new(FakeWeb::default());
    let host = fake_host(&pool, &fake);
    let present: Vec<_> = rows
        .iter()
        .filter(|r| !r.recipient.ends_with('0'))
        .take(4)
        .cloned()
        .collect();
    assert_eq!(present.len(), 4);
    sqlx::query("UPDATE broadcast_messages SET status = 'sending' WHERE id = ANY($1)")
        .bind(present.iter().map(|r| r.id).collect::<Vec<_>>())
        .execute(&pool)
        .await
        .unwrap();
    let results = host
        .send_batch(&present.iter().map(request).collect::<Vec<_>>())
        .await;
    let ids: Vec<String> = results
        .iter()
        .map(|r| r.as_ref().unwrap().provider_message_id.clone())
        .collect();
    sqlx::query(
        "UPDATE broadcast_messages
         SET status = 'sent', reason = 'accepted', sent_at = now(), finished_at = now()
         WHERE id = ANY($1)",
    )
    .bind(present[..3].iter().map(|r| r.id).collect::<Vec<_>>())
    .execute(&pool)
    .await
    .unwrap();

    let (tx, writer, _inbox_dir) = event_writer(&pool, &["STOP", "UNSUBSCRIBE", "BERHENTI"], "h");
    let dref = DeviceRef {
        id: device,
        tenant_id: tenant,
        provider: ProviderKind::Web,
    };
    let at = chrono::Utc::now();
    // A read before delivered (receipts name our ids, whoever the recipient JID was).
    tx.send(ProviderEvent::ReceiptByProviderId {
        device: dref.clone(),
        provider_message_ids: vec![ids[0].clone()],
        read: true,
        at,
    })
    .unwrap();
    tx.send(ProviderEvent::ReceiptByProviderId {
        device: dref.clone(),
        provider_message_ids: vec![ids[0].clone(), ids[1].clone(), "3EB0UNKNOWN".into()],
        read: false,
        at,
    })
    .unwrap();
    // A nack of a message the server had not yet refused: it fails with the code.
    tx.send(ProviderEvent::Refused {
        device: dref.clone(),
        provider_message_id: ids[2].clone(),
        code: "463".into(),
    })
    .unwrap();
    // A nack still in `sending` (the worker had not recorded it yet) fails too.
    tx.send(ProviderEvent::Refused {
        device: dref.clone(),
        provider_message_id: ids[3].clone(),
        code: "475".into(),
    })
    .unwrap();
    // STOP from the lead of an unsent row, in another case and with spaces.
    let unsent = rows
        .iter()
        .find(|r| !present.iter().any(|p| p.id == r.id))
        .unwrap()
        .clone();
    tx.send(ProviderEvent::Inbound {
        device: dref.clone(),
        from: PhoneE164::parse(&unsent.recipient).unwrap(),
        text: "  stop ".into(),
    })
    .unwrap();
    // Chit-chat is not an opt-out.
    tx.send(ProviderEvent::Inbound {
        device: dref.clone(),
        from: PhoneE164::parse(&present[0].recipient).unwrap(),
        text: "please stop by tomorrow".into(),
    })
    .unwrap();
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .unwrap()
        .unwrap();
    opted_out_soon(&pool, &unsent.recipient).await;

    let rows = repo::messages::list_campaign_messages(&pool, tenant, campaign)
        .await
        .unwrap();
    let by_id = |id: i64| rows.iter().find(|r| r.id == id).unwrap();
    let r0 = by_id(present[0].id);
    assert!(
        r0.read_at.is_some() && r0.delivered_at.is_some(),
        "read implies delivered"
    );
    let r1 = by_id(present[1].id);
    assert!(r1.delivered_at.is_some() && r1.read_at.is_none());
    for (p, code) in [(&present[2], "463"), (&present[3], "475")] {
        let r = by_id(p.id);
        assert_eq!(
            (r.status.as_str(), r.reason.as_deref()),
            ("failed", Some("provider_rejected"))
        );
        assert!(r.last_error.as_deref().unwrap_or("").contains(code));
    }
    let u = by_id(unsent.id);
    assert_eq!(
        (u.status.as_str(), u.reason.as_deref()),
        ("skipped", Some("lead_opted_out"))
    );
    let opted: Vec<String> = sqlx::query_scalar(
        "SELECT phone FROM leads WHERE tenant_id = $1 AND opted_out_at IS NOT NULL",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(opted, vec![unsent.recipient.clone()]);
}

/// A nack that arrives while the database is away (a failover) is kept and written once it is
/// back: the refused message ends `failed`. Only logged, as it was, the message stayed `sent`.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_nack_heard_while_the_database_is_away_is_written_once_it_is_back(pool: PgPool) {
    let tenant = seed_tenant(&pool, "nack-away@example.com").await;
    let device = web_device(&pool, tenant).await;
    let (_, rows) = pending_rows(&pool, tenant, device, 2).await;
    // The fake has numbers ending in 0 off WhatsApp.
    let row = rows.iter().find(|r| !r.recipient.ends_with('0')).unwrap();
    let fake = Arc::new(FakeWeb::default());
    let host = fake_host(&pool, &fake);
    mark_sending(&pool, &[row.id]).await;
    let sent = host.send_batch(&[request(row)]).await;
    let pid = sent[0].as_ref().unwrap().provider_message_id.clone();
    sqlx::query(
        "UPDATE broadcast_messages SET status = 'sent', reason = 'accepted', sent_at = now(),
             finished_at = now() WHERE status = 'sending'",
    )
    .execute(&pool)
    .await
    .unwrap();
    database_away_for(&pool, "UPDATE", "broadcast_messages", "true").await;
    let (tx, writer, _inbox_dir) = event_writer(&pool, &["STOP"], "h1");
    tx.send(ProviderEvent::Refused {
        device: DeviceRef {
            id: device,
            tenant_id: tenant,
            provider: ProviderKind::Web,
        },
        provider_message_id: pid,
        code: "463".into(),
    })
    .unwrap();
    let state = || async {
        let r = repo::messages::get_message(&pool, tenant, row.id)
            .await
            .unwrap();
        (r.status, r.reason)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state().await, ("sent".into(), Some("accepted".into())));
    database_back(&pool).await;
    let failed = tokio::time::timeout(Duration::from_secs(20), async {
        while state().await.0 != "failed" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(failed.is_ok(), "{:?}", state().await);
    assert_eq!(
        state().await,
        ("failed".into(), Some("provider_rejected".into()))
    );
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .unwrap()
        .unwrap();
}

/// Events kept while the database is away are written again in the order they came, a
/// device's statuses among the rest. Here a session comes online and then reports that it is
/// linked to a number another device of the tenant has proven, which logs it out in place (no
/// provider to log it out through). Written after everything else, as the backlog did, the
/// older `online` landed over that `logged_out`.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn events_kept_while_the_database_is_away_are_written_in_their_order(pool: PgPool) {
    let tenant = seed_tenant(&pool, "kept-order@example.com").await;
    let first = web_device(&pool, tenant).await;
    let second = seed_device(&pool, tenant, "web-2", 0.0, 0.0).await;
    let phone = PhoneE164::parse("+60123456789").unwrap();
    sqlx::query("UPDATE devices SET phone = $2, phone_linked_at = now() WHERE id = $1")
        .bind(first)
        .bind(phone.as_str())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE devices SET provider = 'web', status = 'connecting' WHERE id = $1")
        .bind(second)
        .execute(&pool)
        .await
        .unwrap();
    repo::hosts::register_host(&pool, "h1", "http://127.0.0.1:1", 30.0)
        .await
        .unwrap();
    hold_device(&pool, second, "h1").await;
    let status = || async {
        sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT status, status_reason FROM devices WHERE id = $1",
        )
        .bind(second)
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    database_away_for(&pool, "UPDATE", "devices", "true").await;
    let (tx, writer, _inbox_dir) = event_writer(&pool, &["STOP"], "h1");
    let device = DeviceRef {
        id: second,
        tenant_id: tenant,
        provider: ProviderKind::Web,
    };
    tx.send(ProviderEvent::Status {
        device: device.clone(),
        status: DeviceStatus::Online,
        reason: None,
        restricted_until: None,
    })
    .unwrap();
    tx.send(ProviderEvent::Linked {
        device,
        phone: phone.clone(),
    })
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status().await.0, "connecting");

    database_back(&pool).await;
    let written = tokio::time::timeout(Duration::from_secs(20), async {
        while status().await.0 == "connecting" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(written.is_ok());
    // Whatever was still kept is written before the writer ends.
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .unwrap()
        .unwrap();
    let (now, why) = status().await;
    assert_eq!(now, "logged_out", "{why:?}");
    assert!(why.is_some_and(|w| w.contains("+60123456789")));
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn an_opt_out_never_crosses_tenants(pool: PgPool) {
    let a = seed_tenant(&pool, "a@example.com").await;
    let b = seed_tenant(&pool, "b@example.com").await;
    let da = web_device(&pool, a).await;
    let db = web_device(&pool, b).await;
    // The same numbers are leads of both tenants.
    seed_leads(&pool, a, da, 0, 3, "cars", LeadStatus::Prospect).await;
    seed_leads(&pool, b, db, 0, 3, "cars", LeadStatus::Prospect).await;
    let phone: String = sqlx::query_scalar("SELECT phone FROM leads WHERE tenant_id = $1 LIMIT 1")
        .bind(a)
        .fetch_one(&pool)
        .await
        .unwrap();
    let (tx, writer, _inbox_dir) = event_writer(&pool, &["BERHENTI"], "h");
    tx.send(ProviderEvent::Inbound {
        device: DeviceRef {
            id: da,
            tenant_id: a,
            provider: ProviderKind::Web,
        },
        from: PhoneE164::parse(&phone).unwrap(),
        text: "Berhenti".into(),
    })
    .unwrap();
    drop(tx);
    writer.await.unwrap();
    opted_out_soon(&pool, &phone).await;
    let opted: Vec<Uuid> = sqlx::query_scalar(
        "SELECT tenant_id FROM leads WHERE phone = $1 AND opted_out_at IS NOT NULL",
    )
    .bind(&phone)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(opted, vec![a]);
}

/// What the web sessions' durability hook relies on (`device_host::web::KeepOptOuts`): when
/// `OptOuts::keep` returns, a STOP is in the inbox on disk, whatever PostgreSQL does, so the
/// session may acknowledge it to WhatsApp; the write follows in the background.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_stop_is_in_the_inbox_when_keep_returns(pool: PgPool) {
    let tenant = seed_tenant(&pool, "keep@example.com").await;
    let device = web_device(&pool, tenant).await;
    seed_leads(&pool, tenant, device, 0, 1, "cars", LeadStatus::Prospect).await;
    let dref = DeviceRef {
        id: device,
        tenant_id: tenant,
        provider: ProviderKind::Web,
    };
    let from = PhoneE164::parse("+60199990001").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inbox_file = dir.path().join("inbox.jsonl");

    // A database nobody answers for: the STOP is kept all the same.
    let unreachable = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(200))
        .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
        .unwrap();
    let keep = OptOuts {
        pool: unreachable,
        keywords: vec!["STOP".into()],
        inbox: device_host::inbox::Inbox::open(dir.path()).unwrap().0,
    };
    assert!(!keep.keep(&dref, &from, "see you").await.unwrap());
    assert!(device_host::inbox::Inbox::read(&inbox_file)
        .unwrap()
        .is_empty());
    assert!(keep.keep(&dref, &from, " Stop ").await.unwrap());
    let kept = device_host::inbox::Inbox::read(&inbox_file).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        (kept[0].tenant_id, kept[0].device_id, kept[0].from.as_str()),
        (tenant, device, "+60199990001")
    );
    drop(keep);

    // With PostgreSQL answering, the STOP is written and marked done in the inbox.
    let keep = OptOuts {
        pool: pool.clone(),
        keywords: vec!["STOP".into()],
        inbox: device_host::inbox::Inbox::open(dir.path()).unwrap().0,
    };
    let lead: String = sqlx::query_scalar("SELECT phone FROM leads WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&pool)
        .await
        .unwrap();
    let other = PhoneE164::parse(&lead).unwrap();
    assert!(keep.keep(&dref, &other, "STOP").await.unwrap());
    opted_out_soon(&pool, other.as_str()).await;
    for _ in 0..50 {
        let left = device_host::inbox::Inbox::read(&inbox_file).unwrap();
        if left.iter().all(|s| s.from != other.as_str()) {
            // The first STOP (from the unreachable run) is still there: only a restart replays it.
            assert_eq!(left.len(), 1);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the recorded STOP was never marked done in the inbox");
}

/// The web sessions' keeper: only a STOP from a known number for a known device waits for the
/// inbox; a STOP it could not keep fails (the session then does not acknowledge it). Other text
/// from a known number is a reply.
#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_web_keeper_keeps_stops_of_known_devices_before_the_ack(pool: PgPool) {
    use device_host_web::{InboundKeeper, InboundText};
    let tenant = seed_tenant(&pool, "keeper@example.com").await;
    let device = web_device(&pool, tenant).await;
    let dir = tempfile::tempdir().unwrap();
    let devices = Arc::new(std::sync::RwLock::new(std::collections::HashMap::new()));
    let keeper =
        device_host::web::KeepOptOuts::new(devices.clone(), opt_outs(&pool, &["STOP"], dir.path()));
    let text = |from: Option<&str>, text: &str| InboundText {
        device,
        from: from.map(str::to_string),
        text: text.into(),
    };
    let inbox = || device_host::inbox::Inbox::read(&dir.path().join("inbox.jsonl")).unwrap();

    // Not yet a device of this host: chit-chat is acknowledged, a STOP is not.
    keeper.keep(text(Some("60199990003"), "hi")).await.unwrap();
    let err = keeper
        .keep(text(Some("60199990003"), "stop"))
        .await
        .unwrap_err();
    assert!(err.contains("does not know"), "{err}");
    devices.write().unwrap().insert(
        device,
        DeviceRef {
            id: device,
            tenant_id: tenant,
            provider: ProviderKind::Web,
        },
    );
    // A sender whose number cannot be told cannot be opted out: acknowledged, nothing kept.
    keeper.keep(text(None, "STOP")).await.unwrap();
    assert!(inbox().is_empty());
    keeper
        .keep(text(Some("60199990003"), "STOP"))
        .await
        .unwrap();
    let kept = inbox();
    // Any other text from a known number is a reply: it ends the lead's enrollment in a
    // sequence that stops on a reply (written in the background, not kept in the inbox).
    let lead_phone = seed_leads(&pool, tenant, device, 0, 1, "cars", LeadStatus::Prospect).await;
    let seq = seed_drip(&pool, tenant, "cold", 1, true, false).await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO enrollments (tenant_id, sequence_id, lead_id, enrolled_on, next_position, next_due_at)
         SELECT tenant_id, $2, id, current_date, 1, now() + interval '1 day' FROM leads
         WHERE tenant_id = $1",
    )
    .bind(tenant)
    .bind(seq)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    keeper
        .keep(text(
            Some(lead_phone[0].as_str().trim_start_matches('+')),
            "Ok, what is the price?",
        ))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while repo::sequences::count_enrollments(&pool, tenant, seq)
        .await
        .unwrap()
        != vec![("replied".to_string(), 1)]
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the reply never ended the enrollment"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(inbox().iter().all(|s| s.from != lead_phone[0].as_str()));
    // kept at once; marked done only once PostgreSQL has it (no lead has this number, the
    // opt-out list does)
    assert!(
        kept.iter().any(|s| s.from == "+60199990003") || {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM opt_out_log WHERE tenant_id = $1")
                    .bind(tenant)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            n > 0
        },
        "the STOP was neither in the inbox nor recorded"
    );
}
