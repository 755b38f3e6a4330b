//! device-host entry point: load config, connect, serve until stopped. `device-host --healthcheck`
//! asks the running host's `/healthz` on its bind port and exits 0 or 1 (the container's health
//! check, so the image needs no curl).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--healthcheck") {
        let bind: std::net::SocketAddr = shared::config::parsed_or(
            "HOST_BIND",
            std::net::SocketAddr::from(([127, 0, 0, 1], 8700)),
        )?;
        let healthy = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/healthz", bind.port()))
            .timeout(std::time::Duration::from_secs(3))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        std::process::exit(if healthy { 0 } else { 1 });
    }
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
        _ = stop_signal() => {
            // Hand the devices over at once instead of after their leases run out, once the
            // outcomes still being written again have landed (or ten seconds have passed).
            running.leases.abort();
            let left = running.host.outcomes_recorded(std::time::Duration::from_secs(10)).await;
            if left > 0 {
                tracing::warn!(outcomes = left, "stopping with send outcomes unrecorded: \
                    their records stay `attempting`, resolved through the provider");
            }
            match running.host.release_all().await {
                Ok(n) => tracing::info!(devices = n, "stopping: devices released"),
                Err(e) => tracing::warn!(error = %e, "stopping: could not release devices"),
            }
        }
    }
    Ok(())
}

/// SIGINT (a terminal) or SIGTERM (ECS, systemd, `docker stop`).
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
