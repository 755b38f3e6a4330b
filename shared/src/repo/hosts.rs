//! Device hosts and their device leases. A device is owned by one host at a time: the owner
//! renews its leases every few seconds; a lease that runs out (its host died) is taken by the
//! next host that looks, except a host back from an outage of the database ([`Lapsed`]). These are system-scope statements (a host serves every tenant), except
//! the on-demand acquisition and the owner lookup, which take the device's tenant.
//!
//! Leases live in `device_leases`, never in `devices`: a renewal rewrites every lease of a host
//! at once, and the `devices` rows are the ones the processor's claim locks and the worker's
//! outcome update moves; in one table the two deadlocked at 3,000 devices (see the migration).
//! Nothing here locks a `devices` row, except [`release_all`] at a graceful stop. Where several
//! lease rows are locked at once, they are locked in device id order, so two hosts never
//! deadlock on them either.

use super::RepoError;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Records (or refreshes) a host, the URL the worker reaches it at, and the device lease it
/// holds its devices by (`device_lease_s`, which the processors read: [`device_lease_span`]). A
/// new URL ends an outage the workers recorded at the old one (see [`mark_unreachable`]).
pub async fn register_host(
    pool: &PgPool,
    host: &str,
    url: &str,
    device_lease_s: f64,
) -> Result<(), RepoError> {
    sqlx::query(
        "INSERT INTO hosts (id, url, seen_at, device_lease_s) VALUES ($1, $2, now(), $3)
         ON CONFLICT (id) DO UPDATE SET url = EXCLUDED.url, seen_at = now(),
             device_lease_s = EXCLUDED.device_lease_s,
             unreachable_since = CASE WHEN hosts.url = EXCLUDED.url
                                      THEN hosts.unreachable_since END,
             unreachable_at = CASE WHEN hosts.url = EXCLUDED.url THEN hosts.unreachable_at END",
    )
    .bind(host)
    .bind(url)
    .bind(device_lease_s)
    .execute(pool)
    .await?;
    Ok(())
}

/// The shortest and the longest device lease the hosts hold devices by: those of every host
/// named on a lease, run out or not (a host that died still has its devices until another takes
/// them). A host that did not record its lease (an earlier version), and the case of no host at
/// all, count as `fallback_s` (the processor's own `DEVICE_LEASE_S`). System scope.
pub async fn device_lease_span(
    conn: &mut sqlx::PgConnection,
    fallback_s: f64,
) -> Result<(f64, f64), RepoError> {
    Ok(sqlx::query_as(
        "SELECT COALESCE(min(COALESCE(h.device_lease_s, $1)), $1),
                COALESCE(max(COALESCE(h.device_lease_s, $1)), $1)
         FROM hosts h
         WHERE EXISTS (SELECT 1 FROM device_leases dl WHERE dl.host_id = h.id)",
    )
    .bind(fallback_s)
    .fetch_one(conn)
    .await?)
}

/// Extends the leases of every live device this host owns; returns those devices. A device whose
/// lease another host took is not returned (the caller releases its session).
pub async fn renew_leases(pool: &PgPool, host: &str, ttl_s: f64) -> Result<Vec<Uuid>, RepoError> {
    Ok(sqlx::query_scalar(
        "UPDATE device_leases l SET lease_until = now() + make_interval(secs => $2)
         FROM (SELECT device_id FROM device_leases WHERE host_id = $1
               ORDER BY device_id FOR UPDATE) o
         WHERE l.device_id = o.device_id AND l.host_id = $1
           AND EXISTS (SELECT 1 FROM devices d WHERE d.id = l.device_id AND d.deleted_at IS NULL)
         RETURNING l.device_id",
    )
    .bind(host)
    .bind(ttl_s)
    .fetch_all(pool)
    .await?)
}

/// A device taken over: (device, tenant, provider).
pub type Acquired = (Uuid, Uuid, String);

/// Whether a host may take a device whose lease another host held and let run out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lapsed {
    /// Yes: that host died, or stopped renewing.
    Take,
    /// No, only devices nobody ever held: this host is back from an outage of the database,
    /// during which no host could renew, and the others are renewing theirs now.
    Leave,
}

/// Takes up to `limit` live devices of these providers that nobody owns or (with
/// [`Lapsed::Take`]) whose lease ran out. Concurrent hosts never take the same device: a lease
/// row is taken by an insert, or by an update that checks again, under the row's lock, that the
/// lease is still out.
pub async fn acquire_devices(
    pool: &PgPool,
    host: &str,
    providers: &[&str],
    ttl_s: f64,
    limit: i64,
    lapsed: Lapsed,
) -> Result<Vec<Acquired>, RepoError> {
    Ok(sqlx::query_as(
        "WITH taken AS (
             INSERT INTO device_leases (device_id, host_id, lease_until)
             SELECT d.id, $1, now() + make_interval(secs => $3)
             FROM devices d LEFT JOIN device_leases l ON l.device_id = d.id
             WHERE d.deleted_at IS NULL AND d.provider = ANY($2)
               AND (l.device_id IS NULL OR ($5 AND l.lease_until < now()))
             ORDER BY d.id LIMIT $4
             ON CONFLICT (device_id) DO UPDATE
                 SET host_id = EXCLUDED.host_id, lease_until = EXCLUDED.lease_until
                 WHERE $5 AND device_leases.lease_until < now()
             RETURNING device_id
         )
         SELECT d.id, d.tenant_id, d.provider FROM taken t JOIN devices d ON d.id = t.device_id",
    )
    .bind(host)
    .bind(providers)
    .bind(ttl_s)
    .bind(limit)
    .bind(lapsed == Lapsed::Take)
    .fetch_all(pool)
    .await?)
}

/// The tenant's device for this host, if nobody else holds a live lease on it (nor, with
/// [`Lapsed::Leave`], one that ran out): `Ok(None)` when another host owns it (or it is
/// unknown, deleted, or another tenant's).
pub async fn acquire_device(
    pool: &PgPool,
    host: &str,
    tenant: Uuid,
    device: Uuid,
    ttl_s: f64,
    lapsed: Lapsed,
) -> Result<Option<String>, RepoError> {
    Ok(sqlx::query_scalar(
        "WITH taken AS (
             INSERT INTO device_leases (device_id, host_id, lease_until)
             SELECT id, $1, now() + make_interval(secs => $4) FROM devices
             WHERE id = $3 AND tenant_id = $2 AND deleted_at IS NULL
             ON CONFLICT (device_id) DO UPDATE
                 SET host_id = EXCLUDED.host_id, lease_until = EXCLUDED.lease_until
                 WHERE device_leases.host_id = EXCLUDED.host_id
                    OR ($5 AND device_leases.lease_until < now())
             RETURNING device_id
         )
         SELECT d.provider FROM taken t JOIN devices d ON d.id = t.device_id AND d.tenant_id = $2",
    )
    .bind(host)
    .bind(tenant)
    .bind(device)
    .bind(ttl_s)
    .bind(lapsed == Lapsed::Take)
    .fetch_optional(pool)
    .await?)
}

/// Gives every device of this host back at once (a graceful stop): the next host takes them
/// without waiting for the leases to run out. The leases are ended, not deleted: an ended lease
/// is what tells the processor, once the offline grace has passed with no host taking the
/// device over, that nobody serves it (see `messages::skip_offline_device_messages`).
///
/// The devices whose sessions were connected or connecting are marked `offline, host stopped`
/// in the same transaction: the host closes their sessions as it stops, and the status its
/// sessions report on closing is written by a task that a stopping process does not wait
/// for (most devices were left showing their last `online`). Other statuses (a restriction, a
/// logout, awaiting pairing) stay: they are the device's, not the session's.
///
/// In a transaction of its own, run again while PostgreSQL aborts it as a deadlock victim: the
/// device rows are locked in id order, but a worker's `sent` write moves the pacing cursors of
/// its batch's devices in an order of its own. Run again after a commit whose answer was lost,
/// it finds no live lease and changes nothing.
pub async fn release_all(pool: &PgPool, host: &str) -> Result<u64, RepoError> {
    super::retry_aborted(
        super::ABORTED_ATTEMPTS,
        "release a stopping host's devices",
        || async {
            let mut tx = pool.begin().await?;
            let released = release_devices(&mut tx, host).await?;
            tx.commit().await?;
            Ok(released)
        },
    )
    .await
}

/// [`release_all`]'s writes: the host's connected devices `offline, host stopped` and its live
/// leases ended; returns how many leases.
async fn release_devices(tx: &mut PgConnection, host: &str) -> Result<u64, RepoError> {
    sqlx::query(
        "UPDATE devices d SET status = 'offline', status_reason = 'host stopped',
                status_changed_at = now()
         FROM (SELECT d.id FROM devices d
               JOIN device_leases l ON l.device_id = d.id
               WHERE l.host_id = $1 AND l.lease_until > now()
                 AND d.status IN ('connecting', 'online', 'reconnecting')
               ORDER BY d.id FOR UPDATE OF d) s
         WHERE d.id = s.id",
    )
    .bind(host)
    .execute(&mut *tx)
    .await?;
    Ok(sqlx::query(
        "UPDATE device_leases SET lease_until = now() WHERE host_id = $1 AND lease_until > now()",
    )
    .bind(host)
    .execute(&mut *tx)
    .await?
    .rows_affected())
}

/// Who owns the tenant's device now: (host id, its URL), if a live lease exists.
pub async fn device_owner(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
) -> Result<Option<(String, String)>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT h.id, h.url FROM devices d
         JOIN device_leases l ON l.device_id = d.id
         JOIN hosts h ON h.id = l.host_id
         WHERE d.id = $2 AND d.tenant_id = $1 AND l.lease_until > now()",
    )
    .bind(tenant)
    .bind(device)
    .fetch_optional(pool)
    .await?)
}

/// Of these devices, those this host holds a live lease on.
pub async fn held_devices(
    pool: &PgPool,
    host: &str,
    devices: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>, RepoError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT device_id FROM device_leases
         WHERE device_id = ANY($1) AND host_id = $2 AND lease_until > now()",
    )
    .bind(devices)
    .bind(host)
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().collect())
}

/// Whether the lease `l` (a `device_leases` row) ran out before the processors' latest return
/// from an outage of the database and they are still settling after it
/// (`messages::outage_settling`): no host could renew it then, and its host is renewing now.
/// Such a lease says nothing yet of whether a host serves the device.
pub(crate) const LAPSED_IN_OUTAGE: &str = "(l.lease_until <= now()
    AND EXISTS (SELECT 1 FROM processor_liveness p
                WHERE l.lease_until < p.back_at
                  AND p.back_at + make_interval(secs => p.settle_s) > now()))";

/// The tenant's devices a host serves now: a live lease, or one that ran out during an outage
/// of the database while its host is renewing it ([`LAPSED_IN_OUTAGE`]).
pub async fn list_served_devices(
    pool: &PgPool,
    tenant: Uuid,
) -> Result<std::collections::HashSet<Uuid>, RepoError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT d.id FROM devices d
         JOIN device_leases l ON l.device_id = d.id
         WHERE d.tenant_id = $1 AND (l.lease_until > now() OR {LAPSED_IN_OUTAGE})"
    )))
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().collect())
}

/// Failures further apart than this belong to different outages: a host that nobody tried to
/// reach for this long may have been reachable meanwhile, so its outage starts again.
pub const OUTAGE_GAP_S: f64 = 600.0;

/// A worker could not connect to these hosts (their devices' owners): the outage starts now,
/// unless one is already under way (a failure within [`OUTAGE_GAP_S`]). Only a failure to
/// connect counts: a request that left may have been served.
pub async fn mark_unreachable(pool: &PgPool, hosts: &[String]) -> Result<(), RepoError> {
    sqlx::query(
        "UPDATE hosts SET
             unreachable_since = CASE
                 WHEN unreachable_since IS NULL
                      OR unreachable_at < now() - make_interval(secs => $2)
                 THEN now() ELSE unreachable_since END,
             unreachable_at = now()
         WHERE id = ANY($1)",
    )
    .bind(hosts)
    .bind(OUTAGE_GAP_S)
    .execute(pool)
    .await?;
    Ok(())
}

/// These hosts answered a worker: whatever outage was recorded is over.
pub async fn mark_reachable(pool: &PgPool, hosts: &[String]) -> Result<(), RepoError> {
    sqlx::query(
        "UPDATE hosts SET unreachable_since = NULL, unreachable_at = NULL
         WHERE id = ANY($1) AND unreachable_since IS NOT NULL",
    )
    .bind(hosts)
    .execute(pool)
    .await?;
    Ok(())
}
