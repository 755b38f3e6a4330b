//! Test and benchmark harness: seeds tenants, devices, leads and campaigns through the data
//! layer, starts a device host on port 0 with a private data directory, gives each test its own
//! Redis key prefix, and drives the pipeline in process exactly as the local emulator does over
//! HTTP (trigger, processor tick, queue receive, `SqsEvent` to the worker, delete what succeeded).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod graph;
pub mod migration_lint;
pub mod process;
pub mod queue_contract;
pub mod relay;

use chrono::Utc;
use shared::config::Secret;
use shared::domain::{
    DelayRange, DeviceStatus, LeadStatus, PhoneE164, ProviderKind, TargetStatus, Token,
};
use shared::host_api::HostClient;
use shared::queue::{to_sqs_event, Queue, RedisQueue, RedisQueueConfig, SqsQueue, SqsQueueConfig};
use shared::repo;
use sqlx::PgPool;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub use device_host::simulator::{SendLog, SendLogEntry, SimConfig};

pub const TOKEN: &str = "test-token";

/// `DATABASE_URL` (infra/local-stack.sh exports it), else the local default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A queue with its own key prefix, so tests share one Redis safely.
pub async fn test_queue(max_receives: u32) -> Arc<RedisQueue> {
    Arc::new(
        RedisQueue::connect(RedisQueueConfig {
            url: redis_url(),
            prefix: format!("test:{}", Uuid::new_v4().simple()),
            max_receives,
            dedup_window: Duration::from_secs(300),
        })
        .await
        .expect("Redis must be reachable (infra/local-stack.sh starts it)"),
    )
}

/// `devices` devices `d0`, `d1`, … of the tenant, delays in [`min_s`, `max_s`], each with
/// `per_device` prospect leads in niche `cars` (device `i`'s numbers from `i * 1000`).
pub async fn seed_devices_with_leads(
    pool: &PgPool,
    tenant: Uuid,
    devices: u64,
    per_device: u64,
    (min_s, max_s): (f64, f64),
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..devices {
        let d = seed_device(pool, tenant, &format!("d{i}"), min_s, max_s).await;
        seed_leads(
            pool,
            tenant,
            d,
            i * 1_000,
            per_device,
            "cars",
            LeadStatus::Prospect,
        )
        .await;
        ids.push(d);
    }
    ids
}

/// A queue that refuses to take messages while `refuse` is set (as SQS does when throttled or
/// unreachable), and is the queue it wraps otherwise.
pub struct RefusingQueue {
    pub inner: Arc<RedisQueue>,
    pub refuse: std::sync::atomic::AtomicBool,
}

impl RefusingQueue {
    pub fn new(inner: Arc<RedisQueue>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            refuse: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn refuse(&self, refuse: bool) {
        self.refuse
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl Queue for RefusingQueue {
    async fn send_batch(
        &self,
        messages: &[shared::queue::OutgoingMessage],
    ) -> Result<usize, shared::queue::QueueError> {
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(shared::queue::QueueError::Unavailable(
                "refused (injected by the test)".into(),
            ));
        }
        self.inner.send_batch(messages).await
    }
    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<shared::queue::ReceivedMessage>, shared::queue::QueueError> {
        self.inner.receive(max, visibility).await
    }
    async fn delete(&self, receipt_handle: &str) -> Result<(), shared::queue::QueueError> {
        self.inner.delete(receipt_handle).await
    }
    async fn change_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), shared::queue::QueueError> {
        self.inner.change_visibility(receipt_handle, timeout).await
    }
    async fn stats(&self) -> Result<shared::queue::QueueStats, shared::queue::QueueError> {
        self.inner.stats().await
    }
}

/// The moto server (SQS API) for this test process: `WABCAST_MOTO_URL` when set (infra/test.sh
/// starts one on a free loopback port), else one started here from the project venv on a free
/// port and stopped by a watchdog when this process exits.
pub async fn moto_url() -> String {
    static URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    URL.get_or_init(|| async {
        if let Ok(url) = std::env::var("WABCAST_MOTO_URL") {
            return url;
        }
        let root = workspace_root();
        let bin = root.join(".local/venv/bin/moto_server");
        if !bin.exists() {
            let ok = std::process::Command::new("bash")
                .arg(root.join("infra/tools.sh"))
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "infra/tools.sh could not install moto");
        }
        let port = process::free_port();
        let log = std::env::temp_dir().join(format!("wabcast-moto-{port}.log"));
        let script = format!(
            "{} -H 127.0.0.1 -p {port} >{} 2>&1 & m=$!; while kill -0 {} 2>/dev/null; do sleep 1; done; kill $m",
            bin.display(),
            log.display(),
            std::process::id()
        );
        // The watchdog shell lives as long as this process and stops moto when it ends; nobody
        // waits for it by design.
        #[allow(clippy::zombie_processes)]
        std::process::Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start moto_server");
        process::wait_for_port(port, Duration::from_secs(30)).await;
        format!("http://127.0.0.1:{port}")
    })
    .await
    .clone()
}

/// A fresh FIFO queue with its FIFO dead-letter queue on moto, redrive after `max_receives`.
pub async fn sqs_test_queue(max_receives: u32) -> Arc<SqsQueue> {
    let config = SqsQueue::create_fifo_with_dlq(
        moto_sqs_config(moto_url().await),
        &format!("t{}", Uuid::new_v4().simple()),
        max_receives,
        Duration::from_secs(30),
    )
    .await
    .expect("create the queue on moto");
    Arc::new(SqsQueue::connect(config).await.expect("connect to moto"))
}

/// How a client reaches moto: its endpoint, placeholder credentials, a fixed region.
pub fn moto_sqs_config(endpoint: String) -> SqsQueueConfig {
    SqsQueueConfig {
        queue_url: String::new(),
        dlq_url: None,
        endpoint_url: Some(endpoint),
        region: Some("us-east-1".into()),
        wait_time: Duration::ZERO,
        emulator_credentials: true,
        send_concurrency: shared::queue::DEFAULT_SEND_CONCURRENCY,
    }
}

pub async fn seed_tenant(pool: &PgPool, email: &str) -> Uuid {
    let mut tx = pool.begin().await.unwrap();
    let id = repo::tenants::insert_tenant(&mut tx, email, "$argon2id$test", "Asia/Kuala_Lumpur")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id
}

/// A simulator device, online, with the given floor delays.
pub async fn seed_device(pool: &PgPool, tenant: Uuid, label: &str, min_s: f64, max_s: f64) -> Uuid {
    let mut tx = pool.begin().await.unwrap();
    let id = repo::devices::insert_device(
        &mut tx,
        tenant,
        &repo::devices::NewDevice {
            label,
            phone: None,
            provider: ProviderKind::Simulator,
            delay: DelayRange::new(min_s, max_s).unwrap(),
            daily_cap: None,
        },
    )
    .await
    .unwrap();
    repo::devices::set_device_status(&mut tx, None, tenant, id, DeviceStatus::Online, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id
}

/// A Cloud API device with its credentials (not connected yet: the host connects it).
pub async fn seed_cloud_device(
    pool: &PgPool,
    tenant: Uuid,
    label: &str,
    phone_number_id: &str,
    token: &str,
) -> Uuid {
    let mut tx = pool.begin().await.unwrap();
    let id = repo::devices::insert_device(
        &mut tx,
        tenant,
        &repo::devices::NewDevice {
            label,
            phone: None,
            provider: ProviderKind::CloudApi,
            delay: DelayRange::new(0.0, 0.0).unwrap(),
            daily_cap: None,
        },
    )
    .await
    .unwrap();
    repo::cloud_api::set_cloud_credentials(
        &mut tx,
        tenant,
        id,
        phone_number_id,
        &Secret::new(token),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

/// `n` leads on one device with numbers +60 1<device-index><i>, niche tokens and a status.
pub async fn seed_leads(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
    base: u64,
    n: u64,
    niches: &str,
    status: LeadStatus,
) -> Vec<PhoneE164> {
    let niches = Token::parse_set(niches).unwrap();
    let leads: Vec<repo::leads::NewLead> = (0..n)
        .map(|i| repo::leads::NewLead {
            device_id: device,
            name: if i % 5 == 0 {
                String::new()
            } else {
                format!("Lead {}", base + i)
            },
            phone: PhoneE164::parse(&format!("+601{:09}", base + i)).unwrap(),
            niches: niches.clone(),
            status,
            triggers: vec![],
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    repo::leads::upsert_leads(&mut tx, tenant, &leads)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    leads.into_iter().map(|l| l.phone).collect()
}

pub struct CampaignSpec<'a> {
    pub niche: &'a str,
    pub target: TargetStatus,
    pub template: &'a str,
    pub image: Option<&'a str>,
    pub min_s: f64,
    pub max_s: f64,
    pub wa_template: Option<&'a shared::render::WaTemplate>,
}

impl Default for CampaignSpec<'_> {
    fn default() -> Self {
        Self {
            niche: "cars",
            target: TargetStatus::All,
            template: "{Hi|Hello} {name}!",
            image: None,
            min_s: 0.0,
            max_s: 0.0,
            wa_template: None,
        }
    }
}

/// Runs the trigger once: every due campaign is fanned out.
pub async fn fan_out(pool: &PgPool) -> campaign_trigger::TriggerReport {
    campaign_trigger::handle(
        serde_json::json!({}),
        &campaign_trigger::Deps {
            pool: pool.clone(),
            max_campaigns: 10,
        },
    )
    .await
    .unwrap()
}

/// A campaign due now.
/// Stores a PNG (`bytes`, e.g. `shared::media::TINY_PNG`) for the tenant; returns the image
/// reference a campaign or message carries (`media:<id>`).
pub async fn seed_image(pool: &PgPool, tenant: Uuid, bytes: &[u8]) -> String {
    let mut tx = pool.begin().await.unwrap();
    let id = repo::media::insert_media(&mut tx, tenant, "image/png", bytes)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    format!("media:{id}")
}

/// A one-step sequence of the tenant for leads of niche `cars` with the trigger `trigger`,
/// its step `day_offset` days after enrollment at midnight local, without gaps; `active` when
/// asked (else a draft). Returns its id.
pub async fn seed_drip(
    pool: &PgPool,
    tenant: Uuid,
    trigger: &str,
    day_offset: i32,
    stop_on_reply: bool,
    active: bool,
) -> Uuid {
    let (niche, trigger) = (
        shared::domain::Token::parse("cars").unwrap(),
        shared::domain::Token::parse(trigger).unwrap(),
    );
    let mut tx = pool.begin().await.unwrap();
    let seq = repo::sequences::insert_sequence(
        &mut tx,
        tenant,
        &repo::sequences::NewSequence {
            name: "drip",
            niche: &niche,
            target: TargetStatus::All,
            trigger: &trigger,
            send_time: chrono::NaiveTime::from_hms_opt(0, 0, 0).unwrap(),
            delay: DelayRange::new(0.0, 0.0).unwrap(),
            next_trigger: None,
            steps: &[repo::sequences::NewStep {
                day_offset,
                template: "still thinking?",
                image: None,
            }],
            stop_on_reply,
        },
    )
    .await
    .unwrap();
    if active {
        repo::sequences::change_sequence_status(
            &mut tx,
            tenant,
            seq,
            shared::domain::SequenceStatus::Active,
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    seq
}

pub async fn seed_campaign(pool: &PgPool, tenant: Uuid, spec: &CampaignSpec<'_>) -> Uuid {
    shared::render::Template::parse(spec.template).unwrap();
    let niche = Token::parse(spec.niche).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let id = repo::campaigns::insert_campaign(
        &mut tx,
        tenant,
        &repo::campaigns::NewCampaign {
            title: "test campaign",
            template: spec.template,
            image: spec.image,
            niche: &niche,
            target: spec.target,
            scheduled_at: Utc::now() - chrono::Duration::seconds(1),
            delay: DelayRange::new(spec.min_s, spec.max_s).unwrap(),
            wa_template: spec.wa_template,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

/// A device host on port 0 with a private data directory.
pub struct TestHost {
    pub running: device_host::Running,
    pub client: HostClient,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl TestHost {
    pub async fn start(pool: &PgPool, sim: SimConfig) -> Self {
        Self::start_with(pool, sim, no_cloud_api()).await
    }

    pub async fn start_with(
        pool: &PgPool,
        sim: SimConfig,
        cloud_api: device_host::cloud_api::CloudApiConfig,
    ) -> Self {
        Self::start_full(pool, "test-host", Duration::from_secs(30), sim, cloud_api).await
    }

    /// A test host whose refused outcome writes (other than for the database being away) are
    /// given up on after `max` instead of ten minutes.
    pub async fn start_with_outcome_retry_max(
        pool: &PgPool,
        sim: SimConfig,
        max: Duration,
    ) -> Self {
        let mut config = Self::config("test-host", Duration::from_secs(30), sim, no_cloud_api());
        config.0.outcome_retry_max = max;
        Self::start_config(pool, config).await
    }

    /// One of several hosts: its own id and lease length (its own data directory; give the
    /// simulators one `log_path` to play one WhatsApp behind them).
    pub async fn start_as(pool: &PgPool, host_id: &str, lease: Duration, sim: SimConfig) -> Self {
        Self::start_full(pool, host_id, lease, sim, no_cloud_api()).await
    }

    async fn start_full(
        pool: &PgPool,
        host_id: &str,
        lease_ttl: Duration,
        sim: SimConfig,
        cloud_api: device_host::cloud_api::CloudApiConfig,
    ) -> Self {
        Self::start_config(pool, Self::config(host_id, lease_ttl, sim, cloud_api)).await
    }

    /// A test host's configuration, with the data directory it names.
    fn config(
        host_id: &str,
        lease_ttl: Duration,
        sim: SimConfig,
        cloud_api: device_host::cloud_api::CloudApiConfig,
    ) -> (device_host::Config, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = device_host::Config {
            bind: "127.0.0.1:0".parse().unwrap(),
            token: Secret::new(TOKEN),
            host_id: host_id.into(),
            public_url: None,
            lease_ttl,
            max_devices: usize::MAX,
            outcome_retry_max: device_host::service::OUTCOME_RETRY_MAX,
            data_dir: dir.path().to_path_buf(),
            simulator: sim,
            cloud_api,
            web: {
                // Never WhatsApp's servers from a test: a loopback port nobody listens on.
                let mut w = device_host_web::WebConfig::new(dir.path());
                w.ws_url = Some("ws://127.0.0.1:9/ws/chat".into());
                w
            },
        };
        (config, dir)
    }

    async fn start_config(
        pool: &PgPool,
        (config, dir): (device_host::Config, tempfile::TempDir),
    ) -> Self {
        let running = device_host::start(config, pool.clone(), pool.clone())
            .await
            .unwrap();
        let url = format!("http://{}", running.addr);
        let client = HostClient::new(&url, Secret::new(TOKEN), Duration::from_secs(10)).unwrap();
        Self {
            running,
            client,
            url,
            dir,
        }
    }

    /// Every send the simulator accepted, from its durable log.
    pub fn sends(&self) -> Vec<SendLogEntry> {
        SendLog::read(self.running.simulator.log().path()).unwrap()
    }
}

/// A Cloud API base URL where nothing listens: tests that use the Cloud API pass a fake Graph
/// API instead.
fn no_cloud_api() -> device_host::cloud_api::CloudApiConfig {
    device_host::cloud_api::CloudApiConfig {
        base_url: "http://127.0.0.1:9/v21.0".into(),
        ..Default::default()
    }
}

/// `host` holds `device`'s lease for the next 20 s (as a live host renews it).
pub async fn hold_device(pool: &PgPool, device: Uuid, host: &str) {
    sqlx::query(
        "INSERT INTO device_leases (device_id, host_id, lease_until)
         VALUES ($1, $2, now() + interval '20 s')",
    )
    .bind(device)
    .bind(host)
    .execute(pool)
    .await
    .unwrap();
}

/// Simulator settings for fast tests: no latency, no failures, no receipts.
pub fn quiet_sim() -> SimConfig {
    SimConfig {
        delivered_after: None,
        read_after: None,
        ..SimConfig::default()
    }
}

/// The three functions wired together in process.
pub struct Pipeline {
    pub pool: PgPool,
    pub queue: Arc<RedisQueue>,
    pub trigger: campaign_trigger::Deps,
    pub processor: broadcast_processor::Deps,
    pub worker: message_worker::Deps,
}

impl Pipeline {
    pub fn new(pool: &PgPool, queue: Arc<RedisQueue>, host: &TestHost) -> Self {
        let processor_settings = broadcast_processor::Settings {
            tick: Duration::from_millis(50),
            run_for: Duration::ZERO,
            ..Default::default()
        };
        Self {
            pool: pool.clone(),
            queue: queue.clone(),
            trigger: campaign_trigger::Deps {
                pool: pool.clone(),
                max_campaigns: 50,
            },
            processor: broadcast_processor::Deps {
                pool: pool.clone(),
                queue: queue.clone() as Arc<dyn Queue>,
                settings: processor_settings,
            },
            worker: message_worker::Deps {
                pool: pool.clone(),
                host: host.client.clone(),
                settings: message_worker::Settings {
                    retry_base: Duration::from_millis(200),
                    retry_cap: Duration::from_secs(1),
                    ..Default::default()
                },
            },
        }
    }

    pub async fn trigger(&self) -> campaign_trigger::TriggerReport {
        campaign_trigger::handle(serde_json::json!({}), &self.trigger)
            .await
            .unwrap()
    }

    pub async fn tick(&self) -> broadcast_processor::Report {
        let mut report = broadcast_processor::Report::default();
        broadcast_processor::tick(&self.processor, &self.processor.settings, &mut report)
            .await
            .unwrap();
        report
    }

    /// Plays the SQS event source once: receive up to 10, invoke the worker, delete successes.
    /// Returns how many records were handed to the worker.
    pub async fn deliver(&self) -> usize {
        deliver_once(self.queue.as_ref(), &self.worker).await
    }

    /// Runs trigger, processor and worker until every row of the campaigns is terminal.
    pub async fn run_until_done(&self, campaigns: &[(Uuid, Uuid)], timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.trigger().await;
            self.tick().await;
            while self.deliver().await > 0 {}
            let mut open = 0;
            for (tenant, campaign) in campaigns {
                let p = repo::campaigns::get_campaign_progress(&self.pool, *tenant, *campaign)
                    .await
                    .unwrap();
                open += ["pending", "queued", "sending"]
                    .iter()
                    .map(|s| p.by_status.get(*s).copied().unwrap_or(0))
                    .sum::<i64>();
                if p.total == 0 {
                    open += 1;
                }
            }
            if open == 0 {
                // One more tick marks finished campaigns completed.
                self.tick().await;
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pipeline did not finish in {timeout:?}: {open} rows open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the SQS event source does once: receive up to 10 records, hand them to the worker as an
/// `SqsEvent`, delete the ones it did not report as failures (those reappear after the
/// visibility timeout). Returns how many records the worker got.
pub async fn deliver_once(queue: &dyn Queue, worker: &message_worker::Deps) -> usize {
    deliver_batch(queue, worker, 10).await.0
}

/// Plays the SQS event source once with batches of up to `max`: receive, invoke the worker,
/// delete what succeeded. Returns the records delivered and the worker's duration.
pub async fn deliver_batch(
    queue: &dyn Queue,
    worker: &message_worker::Deps,
    max: usize,
) -> (usize, Duration) {
    let msgs = queue.receive(max, Duration::from_secs(60)).await.unwrap();
    if msgs.is_empty() {
        return (0, Duration::ZERO);
    }
    let event = to_sqs_event(&msgs, "arn:aws:sqs:local:000000000000:test.fifo");
    let started = std::time::Instant::now();
    let response = message_worker::handle(event, worker).await;
    let took = started.elapsed();
    queue
        .delete_batch(&succeeded(&msgs, response))
        .await
        .unwrap();
    (msgs.len(), took)
}

/// The receipt handles of the records the worker did not report as failures: what the SQS
/// event source deletes.
pub fn succeeded(
    msgs: &[shared::queue::ReceivedMessage],
    response: aws_lambda_events::sqs::SqsBatchResponse,
) -> Vec<String> {
    let failed: std::collections::HashSet<String> = response
        .batch_item_failures
        .into_iter()
        .map(|f| f.item_identifier)
        .collect();
    msgs.iter()
        .filter(|m| !failed.contains(&m.message_id))
        .map(|m| m.receipt_handle.clone())
        .collect()
}

/// What a worker asks the host for a claimed message (text only).
pub fn send_request(job: &repo::messages::SendJob) -> shared::host_api::SendRequest {
    shared::host_api::SendRequest {
        message_id: job.id,
        tenant_id: job.tenant_id,
        device_id: job.device_id,
        to: job.recipient.clone(),
        text: job.body.clone(),
        image: None,
        template: None,
    }
}

/// Moves rows to `sending` as a worker's claim does: a host sends only a message whose row is
/// `sending` (`repo::host_sends::begin_host_sends`).
pub async fn mark_sending(pool: &PgPool, ids: &[i64]) {
    sqlx::query(
        "UPDATE broadcast_messages
         SET status = 'sending', attempts = attempts + 1, sending_at = now(),
             lease_until = now() + interval '2 minutes'
         WHERE id = ANY($1) AND status IN ('pending', 'queued')",
    )
    .bind(ids)
    .execute(pool)
    .await
    .unwrap();
}

/// The attempt record a host process leaves when it dies after recording an attempt and
/// before the provider answered (`attempting`, owned by `host`).
pub async fn record_dead_attempt(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
    message_id: i64,
    provider_message_id: &str,
    host: &str,
) {
    sqlx::query(
        "INSERT INTO host_sends (message_id, tenant_id, device_id, provider_message_id, state, host_id)
         VALUES ($1, $2, $3, $4, 'attempting', $5)",
    )
    .bind(message_id)
    .bind(tenant)
    .bind(device)
    .bind(provider_message_id)
    .bind(host)
    .execute(pool)
    .await
    .unwrap();
}

/// Waits until the host has written this status for the device.
pub async fn wait_for_status(pool: &PgPool, tenant: Uuid, device: Uuid, want: &str) {
    // Up to 10 s: the host writes status through its event writer, which a loaded CI machine
    // may hold up well past the usual few milliseconds.
    for _ in 0..500 {
        if repo::devices::get_device(pool, tenant, device)
            .await
            .unwrap()
            .status
            == want
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("device never became {want}");
}

/// Ends a test's "within the grace" phase: checks that it really ran within `grace` of `since`
/// (else its assertions proved nothing), then sleeps until just past the grace.
pub async fn sleep_past_grace(since: std::time::Instant, grace: Duration) {
    assert!(
        since.elapsed() < grace,
        "the first phase outlasted the grace; its assertions proved nothing"
    );
    tokio::time::sleep((grace + Duration::from_millis(100)).saturating_sub(since.elapsed())).await;
}

/// Status counts of a campaign, as a map.
pub async fn status_counts(pool: &PgPool, tenant: Uuid, campaign: Uuid) -> HashMap<String, i64> {
    let p = repo::campaigns::get_campaign_progress(pool, tenant, campaign)
        .await
        .unwrap();
    p.by_status.into_iter().collect()
}

/// Sends per message id in a send log (a value above 1 is a double send).
pub fn sends_per_message(entries: &[SendLogEntry]) -> HashMap<i64, usize> {
    let mut m = HashMap::new();
    for e in entries {
        *m.entry(e.message_id).or_insert(0) += 1;
    }
    m
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A debug binary of the workspace, as `infra/test.sh` builds them before the tests.
pub fn built_binary(name: &str) -> PathBuf {
    let bin = workspace_root().join("target/debug").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` (infra/test.sh builds them)",
        bin.display()
    );
    bin
}

/// Rows of `broadcast_messages` this transaction has visited so far: those its index scans
/// fetched from the table plus those its sequential scans read.
pub async fn rows_visited(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT (pg_stat_get_xact_tuples_returned('broadcast_messages'::regclass)
                 + (SELECT sum(pg_stat_get_xact_tuples_fetched(indexrelid)) FROM pg_index
                    WHERE indrelid = 'broadcast_messages'::regclass))::int8",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// The URL of the database behind `pool` (a `#[sqlx::test]` database), for child processes.
pub async fn database_url_of(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").unwrap();
    format!("{}/{name}", base.rsplit_once('/').unwrap().0)
}

/// A fresh, migrated database `name` next to `base` (benchmarks): its URL and a pool of 40.
pub async fn fresh_database(base: &str, name: &str) -> (String, PgPool) {
    let admin = shared::db::connect(base, 2).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    let pool = shared::db::connect(&url, 40).await.unwrap();
    shared::db::migrate(&pool).await.unwrap();
    (url, pool)
}

/// The database away for some writes, as during a failover: `BEFORE {writes} ON {table}`
/// (`writes` e.g. `UPDATE`, `UPDATE OF status`; `when` a trigger condition, `true` for all)
/// fails with `57P01` (a server shutting down) until [`database_back`].
pub async fn database_away_for(pool: &PgPool, writes: &str, table: &str, when: &str) {
    for sql in [
        "CREATE TABLE IF NOT EXISTS outage (since timestamptz)".to_string(),
        "INSERT INTO outage VALUES (now())".to_string(),
        "CREATE OR REPLACE FUNCTION refuse_writes() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM outage) THEN
                 RAISE EXCEPTION 'terminating connection: failing over (injected by the test)'
                     USING ERRCODE = '57P01';
             END IF;
             RETURN NEW;
         END $$"
            .to_string(),
        format!(
            "CREATE TRIGGER refuse_writes_{table} BEFORE {writes} ON {table}
             FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION refuse_writes()"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .unwrap();
    }
}

/// The database is back (see [`database_away_for`]).
pub async fn database_back(pool: &PgPool) {
    sqlx::query("DELETE FROM outage")
        .execute(pool)
        .await
        .unwrap();
}
