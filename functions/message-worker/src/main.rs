//! Lambda entry point: load config, build the pool and the host client once, serve `handle`.

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use message_worker::{handle, Deps, Settings};
use shared::config;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let d = Settings::default();
    let settings = Settings {
        lease: Duration::from_secs(config::parsed_or("LEASE_S", d.lease.as_secs())?),
        max_attempts: config::parsed_or("MAX_ATTEMPTS", d.max_attempts)?,
        retry_base: Duration::from_secs(config::parsed_or("RETRY_BASE_S", d.retry_base.as_secs())?),
        retry_cap: Duration::from_secs(config::parsed_or("RETRY_CAP_S", d.retry_cap.as_secs())?),
    };
    let host_timeout = Duration::from_secs(config::parsed_or("HOST_TIMEOUT_S", 30u64)?);
    if host_timeout >= settings.lease {
        return Err(format!(
            "HOST_TIMEOUT_S ({host_timeout:?}) must be shorter than LEASE_S ({:?})",
            settings.lease
        )
        .into());
    }
    let database_url = config::secret("DATABASE_URL")?;
    let deps = Deps {
        pool: shared::db::connect_with(
            database_url.expose(),
            config::parsed_or("DB_MAX_CONNECTIONS", 4)?,
            shared::db::Durability::Relaxed,
        )
        .await?,
        host: shared::host_api::HostClient::new(
            &config::required("HOST_URL")?,
            config::secret("HOST_TOKEN")?,
            host_timeout,
        )?,
        settings,
    };
    let deps = &deps;
    run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<_, Error>(handle(event.payload, deps).await)
    }))
    .await
}
