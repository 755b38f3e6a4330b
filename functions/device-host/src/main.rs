//! device-host entry point: load config, connect, serve until stopped.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init();
    let config = device_host::Config::from_env()?;
    let database_url = shared::config::secret("DATABASE_URL")?;
    let pool = shared::db::connect(
        database_url.expose(),
        shared::config::parsed_or("DB_MAX_CONNECTIONS", 16)?,
    )
    .await?;
    let running = device_host::start(config, pool).await?;
    println!("device-host listening on http://{}", running.addr);
    tokio::select! {
        r = running.server => r?,
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
    }
    Ok(())
}
