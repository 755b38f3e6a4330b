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

/// SQL, for an update of `broadcast_messages bm` that puts a row back to `pending`: its new
/// `held` flag, true while its campaign (or sequence step) is paused, so that the row waits out of
/// the claim's index like the rest of the paused backlog (see `set_messages_held`). The paused
/// campaign is share-locked: a resume waits for this statement's transaction and then clears the
/// flag, and a resume that commits first is seen (the lock rereads the newest version), so no row
/// is left held under a running campaign, where the claim would never find it. A campaign that is
/// not paused is not locked (only a pause or a resume could wait for it).
macro_rules! held_if_campaign_paused {
    () => {
        "EXISTS (SELECT 1 FROM campaigns c WHERE c.id = bm.campaign_id
                   AND c.tenant_id = bm.tenant_id AND c.status = 'paused' FOR SHARE)"
    };
}

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

/// Whether the database was away rather than the statement wrong, so that the same write may
/// well succeed later: a connection lost, refused or timed out, a server shutting down or
/// failing over (`08…`, `57P0…`, `53…`; a primary turned standby answers `25006`, read-only),
/// or an abort (`40…`).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            ["08", "57P", "53", "40"].iter().any(|p| c.starts_with(p)) || c == "25006"
        }),
        _ => false,
    }
}

/// How many times in all [`retry_aborted`] runs a statement that PostgreSQL keeps aborting.
pub const ABORTED_ATTEMPTS: u32 = 3;

/// Whether PostgreSQL aborted the statement to break a deadlock (`40P01`) or for a
/// serialization failure (`40001`): nothing of it happened, and the same statement run again
/// may well succeed.
pub fn is_aborted(e: &RepoError) -> bool {
    match e {
        RepoError::Db(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

/// Runs `op` again, after a short random pause, while PostgreSQL aborts it as a deadlock victim
/// or a serialization failure, `attempts` times in all; any other error, or the last abort,
/// is returned. `op` must be a whole transaction (one statement in autocommit, or its own
/// begin … commit), so that an aborted attempt left nothing behind, and its writes must be
/// conditional, so that an attempt whose commit succeeded but whose answer was lost changes
/// nothing when run again.
pub async fn retry_aborted<T, F, Fut>(attempts: u32, what: &str, mut op: F) -> Result<T, RepoError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RepoError>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < attempts && is_aborted(&e) => {
                // The other transaction won and goes on; a pause of a few milliseconds, drawn at
                // random, keeps two retrying victims from meeting again in step.
                let pause_ms = rand::random_range(5..=25) * u64::from(attempt);
                tracing::warn!(
                    what,
                    attempt,
                    pause_ms,
                    error = %e,
                    "aborted by PostgreSQL (deadlock or serialization failure); running it again"
                );
                tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}
