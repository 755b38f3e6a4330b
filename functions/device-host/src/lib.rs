//! device-host: the long-running service that owns the WhatsApp sessions (one per device) behind
//! one [`provider::Provider`] trait, sends on request (idempotent by message id), and writes
//! device status and receipts back to PostgreSQL.
//!
//! - [`provider`]: the trait and the events providers report;
//! - [`simulator`]: the deterministic simulator provider and its durable send log;
//! - [`service`]: the send path over the durable send record, images, event writers;
//! - [`inbox`]: the durable journal of inbound opt-outs not yet in PostgreSQL;
//! - [`http`]: the authenticated HTTP API.

pub mod cloud_api;
pub mod http;
pub mod inbox;
pub mod provider;
pub mod service;
pub mod simulator;
#[cfg(feature = "web")]
pub mod web;

use shared::config::{self, Secret};
use shared::media::ImageFetcher;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything the host needs, loaded once.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind: SocketAddr,
    pub token: Secret,
    pub host_id: String,
    /// The URL the worker reaches this host at (`None`: `http://<bound address>`).
    pub public_url: Option<String>,
    /// Device lease length; the host renews every third of it.
    pub lease_ttl: Duration,
    /// At most this many devices on this host.
    pub max_devices: usize,
    /// How long an outcome write the database refuses for another reason than being away is
    /// tried again (`service::OUTCOME_RETRY_MAX`; not configurable from the environment).
    pub outcome_retry_max: Duration,
    pub data_dir: PathBuf,
    pub simulator: simulator::SimConfig,
    pub cloud_api: cloud_api::CloudApiConfig,
    #[cfg(feature = "web")]
    pub web: device_host_web::WebConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, config::ConfigError> {
        let ms = |name: &'static str, default: u64| -> Result<Duration, config::ConfigError> {
            Ok(Duration::from_millis(config::parsed_or(name, default)?))
        };
        let receipts: bool = config::parsed_or("SIM_RECEIPTS", true)?;
        let data_dir = PathBuf::from(config::string_or("HOST_DATA_DIR", ".local/host"));
        #[cfg(feature = "web")]
        let web = {
            let mut w = device_host_web::WebConfig::new(&data_dir);
            w.ws_url = std::env::var("WEB_WS_URL").ok().filter(|s| !s.is_empty());
            w.typing_per_char = ms("WEB_TYPING_MS_PER_CHAR", 60)?;
            w.typing_min = ms("WEB_TYPING_MIN_MS", 800)?;
            w.typing_max = ms("WEB_TYPING_MAX_MS", 6_000)?;
            w.restriction_hold =
                chrono::Duration::hours(config::parsed_or("WEB_RESTRICTION_HOLD_H", 24)?);
            w
        };
        Ok(Self {
            bind: config::parsed_or("HOST_BIND", SocketAddr::from(([127, 0, 0, 1], 8700)))?,
            token: config::secret("HOST_TOKEN")?,
            host_id: config::string_or("HOST_ID", &default_host_id()),
            public_url: std::env::var("HOST_PUBLIC_URL")
                .ok()
                .filter(|s| !s.is_empty()),
            lease_ttl: Duration::from_secs(config::count_or("DEVICE_LEASE_S", 30)? as u64),
            max_devices: match config::parsed_or::<usize>("HOST_MAX_DEVICES", 0)? {
                0 => usize::MAX,
                n => n,
            },
            outcome_retry_max: service::OUTCOME_RETRY_MAX,
            data_dir,
            simulator: simulator::SimConfig {
                seed: config::parsed_or("SIM_SEED", 42)?,
                latency: ms("SIM_LATENCY_MS", 0)?,
                latency_jitter: ms("SIM_LATENCY_JITTER_MS", 0)?,
                not_on_whatsapp_rate: config::parsed_or("SIM_NOT_ON_WHATSAPP_RATE", 0.0)?,
                transient_rate: config::parsed_or("SIM_TRANSIENT_RATE", 0.0)?,
                delivered_after: receipts.then_some(ms("SIM_DELIVERED_AFTER_MS", 500)?),
                read_after: receipts.then_some(ms("SIM_READ_AFTER_MS", 2_000)?),
                read_rate: config::parsed_or("SIM_READ_RATE", 0.5)?,
                log_path: std::env::var("SIM_LOG_PATH")
                    .ok()
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from),
            },
            cloud_api: cloud_api::CloudApiConfig {
                base_url: config::string_or(
                    "CLOUD_API_BASE_URL",
                    "https://graph.facebook.com/v21.0",
                ),
                app_secret: std::env::var("CLOUD_API_APP_SECRET")
                    .ok()
                    .filter(|s| !s.is_empty())
                    .map(Secret::new),
                verify_token: std::env::var("CLOUD_API_VERIFY_TOKEN")
                    .ok()
                    .filter(|s| !s.is_empty())
                    .map(Secret::new),
                timeout: Duration::from_secs(config::parsed_or("CLOUD_API_TIMEOUT_S", 20)?),
                opt_out_keywords: {
                    let list =
                        config::string_or("OPT_OUT_KEYWORDS", cloud_api::DEFAULT_OPT_OUT_KEYWORDS);
                    list.split(',')
                        .map(|k| k.trim().to_uppercase())
                        .filter(|k| !k.is_empty())
                        .collect()
                },
            },
            #[cfg(feature = "web")]
            web,
        })
    }
}

/// One id per host: the machine's (or container's) host name, which differs between tasks.
fn default_host_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .map(|h| format!("host-{h}"))
        .unwrap_or_else(|| "host-1".into())
}

/// The bound address as others reach it: a wildcard bind becomes this machine's outbound
/// address (a UDP "connect" picks the route; nothing is sent).
fn reachable(addr: SocketAddr) -> SocketAddr {
    if !addr.ip().is_unspecified() {
        return addr;
    }
    let ip = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("10.255.255.254:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, addr.port())
}

/// A running host: its address, its simulator, and the task serving it.
pub struct Running {
    pub addr: SocketAddr,
    pub simulator: Arc<simulator::Simulator>,
    pub host: Arc<service::Host>,
    pub server: tokio::task::JoinHandle<()>,
    /// The lease renewal task: aborting it (and the server) is a crash as other hosts see it.
    pub leases: tokio::task::JoinHandle<()>,
}

/// Starts the host: providers, restored sessions, event writer, HTTP server.
/// `pool` must commit durably; `relaxed_pool` may use `Durability::Relaxed` (see `service::Host::new`).
pub async fn start(
    config: Config,
    pool: sqlx::PgPool,
    relaxed_pool: sqlx::PgPool,
) -> anyhow::Result<Running> {
    use anyhow::Context;
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let events_tx_cloud = events_tx.clone();
    #[cfg(feature = "web")]
    let events_tx_web = events_tx.clone();
    let simulator = Arc::new(simulator::Simulator::new(
        config.simulator.clone(),
        &config.data_dir,
        events_tx,
    )?);
    let cloud = Arc::new(cloud_api::CloudApi::new(
        config.cloud_api.clone(),
        pool.clone(),
        events_tx_cloud,
    )?);
    #[allow(unused_mut)]
    let mut providers = vec![
        simulator.clone() as Arc<dyn provider::Provider>,
        cloud.clone() as Arc<dyn provider::Provider>,
    ];
    // The inbox before any provider: the web sessions keep STOPs in it before acknowledging them.
    let (inbox, left) = inbox::Inbox::open(&config.data_dir)?;
    let opt_outs = service::OptOuts {
        pool: pool.clone(),
        keywords: config.cloud_api.opt_out_keywords.clone(),
        inbox,
    };
    service::replay_opt_outs(&pool, &opt_outs.inbox, left);
    #[cfg(feature = "web")]
    providers.push(
        web::WebProvider::start(config.web.clone(), events_tx_web, opt_outs.clone())
            as Arc<dyn provider::Provider>,
    );
    let host = Arc::new(
        service::Host::new(
            pool.clone(),
            relaxed_pool.clone(),
            config.host_id.clone(),
            providers.clone(),
            ImageFetcher::new()?,
        )
        .with_leases(config.lease_ttl, config.max_devices)
        .with_outcome_retry_max(config.outcome_retry_max),
    );
    tokio::spawn(service::run_event_writer(
        service::EventWriter {
            pool: relaxed_pool,
            opt_outs,
            providers,
            host_id: config.host_id.clone(),
        },
        events_rx,
    ));
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("failed to bind {}", config.bind))?;
    let addr = listener.local_addr()?;
    let url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", reachable(addr)));
    shared::repo::hosts::register_host(
        &pool,
        &config.host_id,
        &url,
        config.lease_ttl.as_secs_f64(),
    )
    .await?;
    host.restore_sessions().await?;
    let leases = tokio::spawn(host.clone().run_leases(url));
    let app = http::router(http::AppState {
        host: host.clone(),
        simulator: Some(simulator.clone()),
        cloud: Some(cloud.clone()),
        token: config.token,
    });
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "device host server stopped");
        }
    });
    tracing::info!(%addr, host_id = %config.host_id, "device host listening");
    Ok(Running {
        addr,
        simulator,
        host,
        server,
        leases,
    })
}
