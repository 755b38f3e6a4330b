//! Tenants (the users of wabcast). Owns the `tenants` table.

use super::RepoError;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Tenant {
    pub id: Uuid,
    pub email: String,
    pub time_zone: String,
}

pub async fn insert_tenant(
    tx: &mut PgConnection,
    email: &str,
    password_hash: &str,
    time_zone: &str,
) -> Result<Uuid, RepoError> {
    let id = Uuid::new_v4();
    let res = sqlx::query(
        "INSERT INTO tenants (id, email, password_hash, time_zone) VALUES ($1, lower($2), $3, $4)",
    )
    .bind(id)
    .bind(email.trim())
    .bind(password_hash)
    .bind(time_zone)
    .execute(tx)
    .await;
    match res {
        Ok(_) => Ok(id),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(RepoError::Conflict(
            format!("a tenant with email {email} already exists"),
        )),
        Err(sqlx::Error::Database(e)) if e.is_check_violation() => Err(RepoError::Conflict(
            format!("{email:?} is not an email address"),
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn get_tenant(pool: &PgPool, tenant: Uuid) -> Result<Tenant, RepoError> {
    sqlx::query_as("SELECT id, email, time_zone FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_optional(pool)
        .await?
        .ok_or(RepoError::NotFound("tenant"))
}

pub async fn find_tenant_by_email(pool: &PgPool, email: &str) -> Result<Tenant, RepoError> {
    sqlx::query_as("SELECT id, email, time_zone FROM tenants WHERE email = lower($1)")
        .bind(email.trim())
        .fetch_optional(pool)
        .await?
        .ok_or(RepoError::NotFound("tenant"))
}

/// Sets the tenant's per-lead frequency cap: at most one message per lead per `gap_s` seconds
/// across all campaigns and sequences (0 = off; at most 31 days).
pub async fn set_lead_min_gap(
    tx: &mut PgConnection,
    tenant: Uuid,
    gap_s: f64,
) -> Result<(), RepoError> {
    if !(0.0..=31.0 * 86400.0).contains(&gap_s) {
        return Err(
            crate::domain::InvalidInput::new("lead_min_gap", "must be 0 (off) to 31 days").into(),
        );
    }
    let res = sqlx::query("UPDATE tenants SET lead_min_gap_s = $2 WHERE id = $1")
        .bind(tenant)
        .bind(gap_s)
        .execute(tx)
        .await?;
    if res.rows_affected() == 0 {
        return Err(RepoError::NotFound("tenant"));
    }
    Ok(())
}
