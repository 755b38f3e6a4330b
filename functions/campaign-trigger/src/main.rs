//! Lambda entry point: load config, build the pool once, serve `handle`.

use campaign_trigger::{handle, Deps};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use shared::config;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let database_url = config::secret("DATABASE_URL")?;
    let deps = Deps {
        pool: shared::db::connect(
            database_url.expose(),
            config::parsed_or("DB_MAX_CONNECTIONS", 2)?,
        )
        .await?,
        max_campaigns: config::parsed_or("TRIGGER_MAX_CAMPAIGNS", 50)?,
    };
    let deps = &deps;
    run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            handle(event.payload, deps).await.map_err(Error::from)
        },
    ))
    .await
}
