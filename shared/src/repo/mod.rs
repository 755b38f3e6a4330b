//! The data layer: every SQL statement of the system, one async fn per statement, named
//! verb_noun. Tenant-facing functions take the tenant and filter on it; the few system-wide
//! statements run by the scheduled functions (claims, sweeps, rescues) are marked "system scope"
//! and join on `tenant_id` so a row's lead, device and campaign always share one tenant.
//! Writes take `&mut PgConnection` (the caller owns the transaction); reads take the pool.
//!
//! Plans must not depend on fresh statistics: the hot tables change faster than any analyze
//! (and the local stack runs without autovacuum), and a connection keeps a prepared
//! statement's generic plan, chosen while a table was still small, as the table grows. Sweeps
//! therefore find their few devices or stale rows first, and the host's outcome update is
//! planned at every call (it had settled on a scan of all of `host_sends` per batch: 8 ms,
//! the largest cost of a 100,000-message run).

pub mod campaigns;
pub mod cloud_api;
mod copy_rows;
pub mod devices;
pub mod host_sends;
pub mod hosts;
pub mod leads;
pub mod media;
pub mod messages;
pub mod sequences;
pub mod tenants;

/// Lets the caller's transaction commit without waiting for its WAL flush
/// (`synchronous_commit = off`). Only for writes whose loss in a database crash is recovered
/// elsewhere: the caller says which recovery path covers it.
pub async fn relax_durability(tx: &mut sqlx::PgConnection) -> Result<(), RepoError> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(tx)
        .await?;
    Ok(())
}

/// Errors the data layer's callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Invalid(#[from] crate::domain::InvalidInput),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}
