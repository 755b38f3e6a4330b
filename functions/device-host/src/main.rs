//! device-host entry point: load config, connect, serve until stopped.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init();
    let config = device_host::Config::from_env()?;
    let database_url = shared::config::secret("DATABASE_URL")?;
    let size = shared::config::parsed_or("DB_MAX_CONNECTIONS", 16)?;
    let pool = shared::db::connect(database_url.expose(), size).await?;
    let relaxed =
        shared::db::connect_with(database_url.expose(), size, shared::db::Durability::Relaxed)
            .await?;
    let running = device_host::start(config, pool, relaxed).await?;
    println!("device-host listening on http://{}", running.addr);
    tokio::select! {
        r = running.server => r?,
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
    }
    Ok(())
}
