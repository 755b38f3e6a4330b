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
    let old: f64 =
        sqlx::query_scalar("SELECT lead_min_gap_s FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(RepoError::NotFound("tenant"))?;
    sqlx::query("UPDATE tenants SET lead_min_gap_s = $2 WHERE id = $1")
        .bind(tenant)
        .bind(gap_s)
        .execute(&mut *tx)
        .await?;
    if gap_s < old {
        // Rows the old cap deferred (`messages::defer_capped_messages`: due exactly when it
        // ended for their lead) are due when the new one ends: lowering or switching off the
        // cap releases them now, not when the old cap would have ended.
        sqlx::query(
            "UPDATE broadcast_messages bm
             SET due_at = l.last_contacted_at + make_interval(secs => $3)
             FROM campaigns c, leads l
             WHERE c.tenant_id = $1 AND c.status IN ('running', 'paused')
               AND bm.campaign_id = c.id AND bm.tenant_id = c.tenant_id
               AND bm.status = 'pending' AND bm.due_at > now()
               AND l.id = bm.lead_id AND l.tenant_id = bm.tenant_id
               AND bm.due_at = l.last_contacted_at + make_interval(secs => $2)",
        )
        .bind(tenant)
        .bind(old)
        .bind(gap_s)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
