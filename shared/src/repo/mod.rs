//! The data layer: every SQL statement of the system, one async fn per statement, named
//! verb_noun. Tenant-facing functions take the tenant and filter on it; the few system-wide
//! statements run by the scheduled functions (claims, sweeps, rescues) are marked "system scope"
//! and join on `tenant_id` so a row's lead, device and campaign always share one tenant.
//! Writes take `&mut PgConnection` (the caller owns the transaction); reads take the pool.

pub mod campaigns;
pub mod devices;
pub mod host_sends;
pub mod leads;
pub mod media;
pub mod messages;
pub mod tenants;

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
