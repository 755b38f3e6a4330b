//! Lambda entry point: load config, build the pool and the queue once, serve `handle`.

use broadcast_processor::{handle, Deps, Settings};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use shared::config;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let d = Settings::default();
    let settings = Settings {
        tick: Duration::from_millis(config::parsed_or(
            "PROCESSOR_TICK_MS",
            d.tick.as_millis() as u64,
        )?),
        run_for: Duration::from_secs(config::parsed_or(
            "PROCESSOR_RUN_FOR_S",
            d.run_for.as_secs(),
        )?),
        offline_grace: Duration::from_secs(config::parsed_or(
            "OFFLINE_GRACE_S",
            d.offline_grace.as_secs(),
        )?),
        lease: Duration::from_secs(config::parsed_or("LEASE_S", d.lease.as_secs())?),
        host_timeout: Duration::from_secs(config::parsed_or(
            "HOST_TIMEOUT_S",
            d.host_timeout.as_secs(),
        )?),
        device_lease: Duration::from_secs(config::count_or(
            "DEVICE_LEASE_S",
            d.device_lease.as_secs() as i64,
        )? as u64),
        max_devices_per_claim: config::count_or("CLAIM_MAX_DEVICES", d.max_devices_per_claim)?,
        per_device_burst: config::count_or("CLAIM_PER_DEVICE", d.per_device_burst)?,
        max_messages_per_claim: config::count_or("CLAIM_MAX_MESSAGES", d.max_messages_per_claim)?,
        max_attempts: config::parsed_or("MAX_ATTEMPTS", d.max_attempts)?,
        enqueue_retry: d.enqueue_retry,
        rescue_retry_after: d.rescue_retry_after,
        rescue_batch: d.rescue_batch,
    };
    let database_url = config::secret("DATABASE_URL")?;
    let deps = Deps {
        pool: shared::db::connect(
            database_url.expose(),
            config::parsed_or("DB_MAX_CONNECTIONS", 4)?,
        )
        .await?,
        queue: shared::queue::QueueConfig::from_env()?.connect().await?,
        settings,
    };
    let deps = &deps;
    run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            handle(event.payload, deps).await.map_err(Error::from)
        },
    ))
    .await
}
