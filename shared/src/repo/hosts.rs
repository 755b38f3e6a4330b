//! Device hosts and their device leases. A device is owned by one host at a time: the owner
//! renews its leases every few seconds; a lease that runs out (its host died) is taken by the
//! next host that looks. These are system-scope statements (a host serves every tenant), except
//! the on-demand acquisition, which takes the device's tenant.

use super::RepoError;
use sqlx::PgPool;
use uuid::Uuid;

/// Records (or refreshes) a host and the URL the worker reaches it at.
pub async fn register_host(pool: &PgPool, host: &str, url: &str) -> Result<(), RepoError> {
    sqlx::query(
        "INSERT INTO hosts (id, url, seen_at) VALUES ($1, $2, now())
         ON CONFLICT (id) DO UPDATE SET url = EXCLUDED.url, seen_at = now()",
    )
    .bind(host)
    .bind(url)
    .execute(pool)
    .await?;
    Ok(())
}

/// Extends the leases of every live device this host owns; returns those devices. A device whose
/// lease another host took is not returned (the caller releases its session).
pub async fn renew_leases(pool: &PgPool, host: &str, ttl_s: f64) -> Result<Vec<Uuid>, RepoError> {
    Ok(sqlx::query_scalar(
        "UPDATE devices SET host_lease_until = now() + make_interval(secs => $2)
         WHERE host_id = $1 AND deleted_at IS NULL
         RETURNING id",
    )
    .bind(host)
    .bind(ttl_s)
    .fetch_all(pool)
    .await?)
}

/// A device taken over: (device, tenant, provider).
pub type Acquired = (Uuid, Uuid, String);

/// Takes up to `limit` live devices of these providers that nobody owns or whose lease ran out.
/// Concurrent hosts never take the same device (row locks, skip locked).
pub async fn acquire_devices(
    pool: &PgPool,
    host: &str,
    providers: &[&str],
    ttl_s: f64,
    limit: i64,
) -> Result<Vec<Acquired>, RepoError> {
    Ok(sqlx::query_as(
        "UPDATE devices d SET host_id = $1, host_lease_until = now() + make_interval(secs => $3)
         FROM (SELECT id FROM devices
               WHERE deleted_at IS NULL AND provider = ANY($2)
                 AND (host_id IS NULL OR host_lease_until IS NULL OR host_lease_until < now())
               ORDER BY id LIMIT $4
               FOR UPDATE SKIP LOCKED) f
         WHERE d.id = f.id
         RETURNING d.id, d.tenant_id, d.provider",
    )
    .bind(host)
    .bind(providers)
    .bind(ttl_s)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The tenant's device for this host, if nobody else holds a live lease on it: `Ok(None)` when
/// another host owns it (or it is unknown, deleted, or another tenant's).
pub async fn acquire_device(
    pool: &PgPool,
    host: &str,
    tenant: Uuid,
    device: Uuid,
    ttl_s: f64,
) -> Result<Option<String>, RepoError> {
    Ok(sqlx::query_scalar(
        "UPDATE devices SET host_id = $1, host_lease_until = now() + make_interval(secs => $4)
         WHERE id = $3 AND tenant_id = $2 AND deleted_at IS NULL
           AND (host_id IS NULL OR host_id = $1 OR host_lease_until IS NULL
                OR host_lease_until < now())
         RETURNING provider",
    )
    .bind(host)
    .bind(tenant)
    .bind(device)
    .bind(ttl_s)
    .fetch_optional(pool)
    .await?)
}

/// Gives every device of this host back at once (a graceful stop): the next host takes them
/// without waiting for the leases to run out.
pub async fn release_all(pool: &PgPool, host: &str) -> Result<u64, RepoError> {
    Ok(
        sqlx::query(
            "UPDATE devices SET host_id = NULL, host_lease_until = NULL WHERE host_id = $1",
        )
        .bind(host)
        .execute(pool)
        .await?
        .rows_affected(),
    )
}

/// Who owns the tenant's device now: (host id, its URL), if a live lease exists.
pub async fn device_owner(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
) -> Result<Option<(String, String)>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT h.id, h.url FROM devices d JOIN hosts h ON h.id = d.host_id
         WHERE d.id = $2 AND d.tenant_id = $1 AND d.host_lease_until > now()",
    )
    .bind(tenant)
    .bind(device)
    .fetch_optional(pool)
    .await?)
}
