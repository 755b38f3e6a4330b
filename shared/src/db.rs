//! Connecting to PostgreSQL and applying migrations. Migrations are applied by the CLI and by
//! tests, never by a Lambda.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// The versioned migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Whether a pool's commits wait for the WAL flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is durable before it returns.
    Full,
    /// Commits return before the WAL flush (`synchronous_commit = off`): a database crash may
    /// lose the last fraction of a second of them, never corrupt anything. Only for writers
    /// whose every write is recovered elsewhere (see DESIGN notes in the README).
    Relaxed,
}

/// A pool sized for one function instance, with full durability.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_with(url, max_connections, Durability::Full).await
}

pub async fn connect_with(
    url: &str,
    max_connections: u32,
    durability: Durability,
) -> anyhow::Result<PgPool> {
    use anyhow::Context;
    let mut options = PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?
        .application_name("wabcast")
        // No JIT compilation: its cost threshold is met by estimates, not work, and the
        // claim's estimate over a big table crossed it (10 M rows: 151 ms of JIT compiling in a
        // claim of 323 ms, which ran in 134 ms without it). Every statement here is short.
        .options([("jit", "off")]);
    if durability == Durability::Relaxed {
        options = options.options([("synchronous_commit", "off")]);
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("failed to connect to PostgreSQL")
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    use anyhow::Context;
    MIGRATOR
        .run(pool)
        .await
        .context("failed to apply migrations")
}
