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

/// Applies the migrations that are not applied yet, after repairing the indexes a failed
/// concurrent build left behind (see [`repair_invalid_indexes`]). Returns those repairs.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<Vec<IndexRepair>> {
    use anyhow::Context;
    let repairs = repair_invalid_indexes(pool).await?;
    MIGRATOR
        .run(pool)
        .await
        .context("failed to apply migrations")?;
    Ok(repairs)
}

/// What [`repair_invalid_indexes`] did to one index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexRepair {
    /// A failed `CREATE INDEX CONCURRENTLY` (or an interrupted `REINDEX`) left it invalid: it
    /// was rebuilt, without blocking writes.
    Rebuilt(String),
    /// The transient copy of a failed `REINDEX … CONCURRENTLY` (`…_ccnew`, `…_ccold`): dropped.
    Dropped(String),
}

/// Indexes on the big tables are built with `CREATE INDEX CONCURRENTLY` (see the README,
/// "Migrations on a live database"): a plain build blocks every write to its table for as long
/// as it runs, which on `broadcast_messages` stops the sending. A concurrent build that fails
/// or is interrupted (a timeout, a cancelled deploy, a lost connection) leaves its index in the
/// catalog, marked invalid: never used for reads, yet updated by every write. Its migration is
/// not recorded as applied, and when it runs again, `IF NOT EXISTS` skips the invalid index;
/// so before migrating, every invalid index of this schema is rebuilt with `REINDEX INDEX
/// CONCURRENTLY` (which keeps its definition), and the leftovers of a failed concurrent reindex
/// are dropped, as PostgreSQL's documentation prescribes. Indexes of a table with an index build
/// in progress (another migrator, an operator's reindex) are left to that build.
pub async fn repair_invalid_indexes(pool: &PgPool) -> anyhow::Result<Vec<IndexRepair>> {
    use anyhow::Context;
    let invalid: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, format('%I.%I', n.nspname, c.relname)
         FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT i.indisvalid AND n.nspname = current_schema()
           AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                           WHERE p.relid = i.indrelid)
         ORDER BY c.relname",
    )
    .fetch_all(pool)
    .await
    .context("failed to look for invalid indexes")?;
    let mut done = Vec::with_capacity(invalid.len());
    for (name, qualified) in invalid {
        let transient = ["_ccnew", "_ccold"].iter().any(|suffix| {
            name.rfind(suffix).is_some_and(|at| {
                name[at + suffix.len()..]
                    .chars()
                    .all(|c| c.is_ascii_digit())
            })
        });
        // Not in a transaction: neither statement may run inside one. The name is quoted by
        // PostgreSQL's own `format('%I')`.
        let (sql, repair) = if transient {
            (
                format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}"),
                IndexRepair::Dropped(name),
            )
        } else {
            (
                format!("REINDEX INDEX CONCURRENTLY {qualified}"),
                IndexRepair::Rebuilt(name),
            )
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(pool)
            .await
            .with_context(|| format!("failed to repair an invalid index: {sql}"))?;
        done.push(repair);
    }
    Ok(done)
}
