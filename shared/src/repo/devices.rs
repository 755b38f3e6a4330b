//! Devices (WhatsApp numbers). Owns the `devices` table: identity, status, pacing cursor.
//! A device's id is immutable; its label is only a label.

use super::RepoError;
use crate::domain::{DelayRange, DeviceStatus, PhoneE164, ProviderKind};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Device {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub label: String,
    pub phone: Option<String>,
    pub provider: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub status_changed_at: DateTime<Utc>,
    pub min_delay_s: f64,
    pub max_delay_s: f64,
    pub next_send_at: DateTime<Utc>,
    pub daily_cap: Option<i32>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// The device's restriction, if one was recorded (in force or ended: see
    /// [`Device::restricted`]).
    pub restriction: Option<String>,
    pub restricted_until: Option<DateTime<Utc>>,
}

impl Device {
    /// Whether a restriction is in force now: then the device is `restricted` whatever its
    /// session's status says.
    pub fn restricted(&self, now: DateTime<Utc>) -> bool {
        self.restriction.is_some() && self.restricted_until.is_none_or(|until| until > now)
    }
}

pub struct NewDevice<'a> {
    pub label: &'a str,
    pub phone: Option<&'a PhoneE164>,
    pub provider: ProviderKind,
    pub delay: DelayRange,
    pub daily_cap: Option<i32>,
}

const DEVICE_COLUMNS: &str = "id, tenant_id, label, phone, provider, status, status_reason, \
    status_changed_at, min_delay_s, max_delay_s, next_send_at, daily_cap, deleted_at, \
    restriction, restricted_until";

pub async fn insert_device(
    tx: &mut PgConnection,
    tenant: Uuid,
    new: &NewDevice<'_>,
) -> Result<Uuid, RepoError> {
    let label = crate::domain::parse_device_label(new.label)?;
    let id = Uuid::new_v4();
    let res = sqlx::query(
        "INSERT INTO devices (id, tenant_id, label, phone, provider, min_delay_s, max_delay_s, daily_cap)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(tenant)
    .bind(&label)
    .bind(new.phone.map(PhoneE164::as_str))
    .bind(new.provider.as_str())
    .bind(new.delay.min_s)
    .bind(new.delay.max_s)
    .bind(new.daily_cap)
    .execute(tx)
    .await;
    match res {
        Ok(_) => Ok(id),
        // `devices_tenant_phone`: one WhatsApp account is one device, paced once.
        Err(sqlx::Error::Database(e))
            if e.is_unique_violation() && e.constraint() == Some("devices_tenant_phone") =>
        {
            Err(RepoError::Conflict(format!(
                "the tenant already has a device with the number {}; one WhatsApp number is one \
                 device (two would each keep their own gaps and cap, and the number would send at \
                 both paces)",
                new.phone.map(PhoneE164::as_str).unwrap_or_default()
            )))
        }
        // `devices_tenant_label`: a lead CSV names devices by label, so two live devices of a
        // tenant never share one.
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(label_taken(&label)),
        Err(e) => Err(e.into()),
    }
}

fn label_taken(label: &str) -> RepoError {
    RepoError::Conflict(format!(
        "the tenant already has a device labelled {label:?}; choose another label"
    ))
}

/// What recording the number a device's session is linked to found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkedNumber {
    /// The device's phone now is the number (`previous` is what it said before, if another
    /// number); `released` names the devices that had only typed the number and lost it.
    Recorded {
        previous: Option<String>,
        released: Vec<Uuid>,
    },
    /// Another live device of the tenant is this number, proven by its own session: nothing
    /// was changed.
    OtherDevice { id: Uuid, label: String },
    /// The device is deleted or not the tenant's.
    Gone,
}

/// Records that a device's session is linked to the WhatsApp account of `phone` (what pairing
/// or a connection reports, which may differ from what a person typed). A proven number
/// outranks a typed one: another live device of the tenant that only typed the number loses
/// it; one whose session proved it (`phone_linked_at`) keeps it, and this device learns which
/// device that is. The unique index `devices_tenant_phone` decides a race between two sessions
/// of one account: exactly one records it.
pub async fn record_linked_number(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
    phone: &PhoneE164,
) -> Result<LinkedNumber, RepoError> {
    // A session reports its number at every connection: the row is written only when something
    // changes (the processor's claim locks device rows).
    let current: Option<(Option<String>, bool)> = sqlx::query_as(
        "SELECT phone, phone_linked_at IS NOT NULL FROM devices
         WHERE id = $2 AND tenant_id = $1 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .bind(device)
    .fetch_optional(pool)
    .await?;
    let previous = match current {
        None => return Ok(LinkedNumber::Gone),
        Some((Some(p), true)) if p == phone.as_str() => {
            return Ok(LinkedNumber::Recorded {
                previous: None,
                released: Vec::new(),
            })
        }
        Some((p, _)) => p.filter(|p| p != phone.as_str()),
    };
    let mut tx = pool.begin().await?;
    let released: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE devices SET phone = NULL
         WHERE tenant_id = $1 AND phone = $3 AND id <> $2 AND deleted_at IS NULL
           AND phone_linked_at IS NULL
         RETURNING id",
    )
    .bind(tenant)
    .bind(device)
    .bind(phone.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let res = sqlx::query(
        "UPDATE devices SET phone = $3, phone_linked_at = now()
         WHERE id = $2 AND tenant_id = $1 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .bind(device)
    .bind(phone.as_str())
    .execute(&mut *tx)
    .await;
    match res {
        Ok(r) if r.rows_affected() == 1 => {
            tx.commit().await?;
            Ok(LinkedNumber::Recorded { previous, released })
        }
        Ok(_) => Ok(LinkedNumber::Gone),
        Err(sqlx::Error::Database(e))
            if e.is_unique_violation() && e.constraint() == Some("devices_tenant_phone") =>
        {
            drop(tx);
            let other: Option<(Uuid, String)> = sqlx::query_as(
                "SELECT id, label FROM devices
                 WHERE tenant_id = $1 AND phone = $2 AND deleted_at IS NULL AND id <> $3",
            )
            .bind(tenant)
            .bind(phone.as_str())
            .bind(device)
            .fetch_optional(pool)
            .await?;
            match other {
                Some((id, label)) => Ok(LinkedNumber::OtherDevice { id, label }),
                // The other device was deleted in between: the number is free now.
                None => Box::pin(record_linked_number(pool, tenant, device, phone)).await,
            }
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn get_device(pool: &PgPool, tenant: Uuid, device: Uuid) -> Result<Device, RepoError> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1 AND tenant_id = $2"
    )))
    .bind(device)
    .bind(tenant)
    .fetch_optional(pool)
    .await?
    .ok_or(RepoError::NotFound("device"))
}

/// A tenant's live device by its label (labels are unique among a tenant's live devices; a
/// deleted device's label may belong to a newer device, which is the one found).
pub async fn find_live_device_by_label(
    pool: &PgPool,
    tenant: Uuid,
    label: &str,
) -> Result<Device, RepoError> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DEVICE_COLUMNS} FROM devices
         WHERE tenant_id = $1 AND label = $2 AND deleted_at IS NULL"
    )))
    .bind(tenant)
    .bind(label.trim())
    .fetch_optional(pool)
    .await?
    .ok_or(RepoError::NotFound("device"))
}

pub async fn list_devices(pool: &PgPool, tenant: Uuid) -> Result<Vec<Device>, RepoError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE tenant_id = $1 ORDER BY label, id"
    )))
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}

/// System scope: the live devices a host serves for the given providers.
pub async fn list_live_devices(
    pool: &PgPool,
    providers: &[&str],
) -> Result<Vec<Device>, RepoError> {
    let providers: Vec<String> = providers.iter().map(|p| p.to_string()).collect();
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DEVICE_COLUMNS} FROM devices
         WHERE deleted_at IS NULL AND provider = ANY($1) ORDER BY tenant_id, id"
    )))
    .bind(&providers)
    .fetch_all(pool)
    .await?)
}

/// Sets a device's status; `status_changed_at` moves only when the status really changes, so
/// the offline grace period counts from the moment the device went offline.
///
/// `holder`: the device host writing it, which records it only while the device's lease names
/// it (renewed or run out, not taken over): a host that lost the device to another host closes
/// its session there, and that session's `offline, host stopped` would otherwise land over the
/// new owner's `online`. `Ok(false)`: not written, another host serves the device (or it is
/// gone). `None` (an operator, a test) writes it whoever serves the device.
///
/// A `restricted` status also records the restriction itself (see
/// [`set_device_status_until`]), which outlives the session: nothing but its end or
/// [`lift_restriction`] ends it.
pub async fn set_device_status(
    tx: &mut PgConnection,
    holder: Option<&str>,
    tenant: Uuid,
    device: Uuid,
    status: DeviceStatus,
    reason: Option<&str>,
) -> Result<bool, RepoError> {
    set_device_status_until(tx, holder, tenant, device, status, reason, None).await
}

/// [`set_device_status`], with when a `restricted` status ends (`until`; `None`: when a person
/// lifts it, [`lift_restriction`]). The restriction is kept apart from the status
/// (`restricted_until`, `restriction`): the session that serves the device rewrites its
/// status (a host that takes the device over writes `connecting`, then `online`), while the
/// processor claims no device whose restriction has not ended. Another status leaves the
/// restriction as it is.
pub async fn set_device_status_until(
    tx: &mut PgConnection,
    holder: Option<&str>,
    tenant: Uuid,
    device: Uuid,
    status: DeviceStatus,
    reason: Option<&str>,
    until: Option<DateTime<Utc>>,
) -> Result<bool, RepoError> {
    let res = sqlx::query(
        "UPDATE devices SET
             status_changed_at = CASE WHEN status <> $3 THEN now() ELSE status_changed_at END,
             status = $3, status_reason = $4,
             restricted_until = CASE WHEN $3 = 'restricted' THEN $6 ELSE restricted_until END,
             restriction = CASE WHEN $3 = 'restricted' THEN COALESCE($4, 'restricted')
                                ELSE restriction END,
             -- the warm-up ramp starts the first time a real WhatsApp number comes online
             paired_at = CASE WHEN paired_at IS NULL AND $3 = 'online' AND provider <> 'simulator'
                              THEN now() ELSE paired_at END
         WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL
           AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM device_leases l
                                            WHERE l.device_id = devices.id AND l.host_id = $5))",
    )
    .bind(device)
    .bind(tenant)
    .bind(status.as_str())
    .bind(reason)
    .bind(holder)
    .bind(until)
    .execute(tx)
    .await?;
    if res.rows_affected() == 0 && holder.is_none() {
        return Err(RepoError::NotFound("device"));
    }
    Ok(res.rows_affected() == 1)
}

/// A person lifts the device's restriction (`wabcast device connect`, once they have dealt
/// with what caused it): the processor may claim for it again once its session is online.
/// Returns whether there was one.
pub async fn lift_restriction(
    tx: &mut PgConnection,
    tenant: Uuid,
    device: Uuid,
) -> Result<bool, RepoError> {
    let res = sqlx::query(
        "UPDATE devices SET restricted_until = NULL, restriction = NULL
         WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL
           AND restriction IS NOT NULL
           AND (restricted_until IS NULL OR restricted_until > now())",
    )
    .bind(device)
    .bind(tenant)
    .execute(tx)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// A device's account-safety settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SafetySettings {
    pub daily_cap: Option<i32>,
    pub warmup_days: i32,
    pub warmup_start: i32,
    /// Local (start, end) in the tenant's zone; may wrap past midnight.
    pub quiet_hours: Option<(chrono::NaiveTime, chrono::NaiveTime)>,
}

/// (daily_cap, warmup_days, warmup_start, quiet_start, quiet_end)
type SafetyRow = (
    Option<i32>,
    i32,
    i32,
    Option<chrono::NaiveTime>,
    Option<chrono::NaiveTime>,
);

pub async fn get_safety_settings(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
) -> Result<SafetySettings, RepoError> {
    let row: Option<SafetyRow> = sqlx::query_as(
        "SELECT daily_cap, warmup_days, warmup_start, quiet_start, quiet_end FROM devices
             WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL",
    )
    .bind(device)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    let (daily_cap, warmup_days, warmup_start, qs, qe) =
        row.ok_or(RepoError::NotFound("device"))?;
    Ok(SafetySettings {
        daily_cap,
        warmup_days,
        warmup_start,
        quiet_hours: qs.zip(qe),
    })
}

pub async fn set_safety_settings(
    tx: &mut PgConnection,
    tenant: Uuid,
    device: Uuid,
    s: &SafetySettings,
) -> Result<(), RepoError> {
    if s.daily_cap.is_some_and(|c| c <= 0) {
        return Err(crate::domain::InvalidInput::new("daily_cap", "must be positive").into());
    }
    if !(0..=365).contains(&s.warmup_days) || !(1..=100_000).contains(&s.warmup_start) {
        return Err(crate::domain::InvalidInput::new(
            "warm-up",
            "days 0 to 365, start 1 to 100000 messages",
        )
        .into());
    }
    if s.quiet_hours.is_some_and(|(a, b)| a == b) {
        return Err(
            crate::domain::InvalidInput::new("quiet_hours", "start and end must differ").into(),
        );
    }
    let res = sqlx::query(
        "UPDATE devices SET daily_cap = $3, warmup_days = $4, warmup_start = $5,
             quiet_start = $6, quiet_end = $7
         WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL",
    )
    .bind(device)
    .bind(tenant)
    .bind(s.daily_cap)
    .bind(s.warmup_days)
    .bind(s.warmup_start)
    .bind(s.quiet_hours.map(|q| q.0))
    .bind(s.quiet_hours.map(|q| q.1))
    .execute(tx)
    .await?;
    if res.rows_affected() == 0 {
        return Err(RepoError::NotFound("device"));
    }
    Ok(())
}

/// What the processor resolves each tick for a device with limits: its tenant's zone and
/// quiet hours (capped devices need the local day too).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LimitedDevice {
    pub id: Uuid,
    pub time_zone: String,
    pub quiet_start: Option<chrono::NaiveTime>,
    pub quiet_end: Option<chrono::NaiveTime>,
}

/// System scope: online devices with a daily cap, a warm-up or quiet hours.
pub async fn list_limited_devices(
    conn: &mut PgConnection,
) -> Result<Vec<LimitedDevice>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT d.id, t.time_zone, d.quiet_start, d.quiet_end
         FROM devices d JOIN tenants t ON t.id = d.tenant_id
         WHERE d.status = 'online' AND d.deleted_at IS NULL
           AND (d.daily_cap IS NOT NULL OR d.quiet_start IS NOT NULL
                OR (d.paired_at IS NOT NULL AND d.warmup_days > 0
                    AND d.paired_at > now() - make_interval(days => d.warmup_days)))",
    )
    .fetch_all(conn)
    .await?)
}

/// Deletes a device: it keeps its id and history but sends nothing more. The processor ends its
/// unsent messages as `skipped / device_deleted`.
pub async fn delete_device(
    tx: &mut PgConnection,
    tenant: Uuid,
    device: Uuid,
) -> Result<(), RepoError> {
    let res = sqlx::query(
        "UPDATE devices SET deleted_at = now(), status = 'deleted', status_changed_at = now(),
                status_reason = 'deleted by user'
         WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL",
    )
    .bind(device)
    .bind(tenant)
    .execute(tx)
    .await?;
    if res.rows_affected() == 0 {
        return Err(RepoError::NotFound("device"));
    }
    Ok(())
}

/// What `device edit` changes; `None` keeps the current value.
#[derive(Debug, Default)]
pub struct DeviceEdit<'a> {
    pub label: Option<&'a str>,
    /// The device's floor: a campaign or sequence never paces it faster. Gaps drawn from now
    /// on use it; the gap already drawn (the cursor `next_send_at`) stands.
    pub delay: Option<DelayRange>,
}

/// Renames a live device or changes its delay floor. Its id, leads, messages and history stay;
/// a lead file names it by the new label from now on. A label another live device of the tenant
/// has is a conflict, and nothing changes.
pub async fn update_device(
    tx: &mut PgConnection,
    tenant: Uuid,
    device: Uuid,
    edit: &DeviceEdit<'_>,
) -> Result<Device, RepoError> {
    let label = edit
        .label
        .map(crate::domain::parse_device_label)
        .transpose()?;
    let res = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE devices SET label = COALESCE($3, label),
                min_delay_s = COALESCE($4, min_delay_s), max_delay_s = COALESCE($5, max_delay_s)
         WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL
         RETURNING {DEVICE_COLUMNS}"
    )))
    .bind(device)
    .bind(tenant)
    .bind(label.as_deref())
    .bind(edit.delay.map(|d| d.min_s))
    .bind(edit.delay.map(|d| d.max_s))
    .fetch_optional(tx)
    .await;
    match res {
        Ok(Some(d)) => Ok(d),
        Ok(None) => Err(RepoError::NotFound("device")),
        Err(sqlx::Error::Database(e))
            if e.is_unique_violation() && e.constraint() == Some("devices_tenant_label") =>
        {
            Err(label_taken(label.as_deref().unwrap_or_default()))
        }
        Err(e) => Err(e.into()),
    }
}

/// One device's line in the system status view.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeviceLoad {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub label: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub next_send_at: DateTime<Utc>,
    pub pending: i64,
    pub queued: i64,
    pub sending: i64,
    /// The host that holds (or last held) the device's lease, and until when: a lease in the
    /// past means no host serves the device (its host died, or every host is full), and its
    /// messages wait until one takes it.
    pub host_id: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    /// Since when the workers have failed to reach that host, if they have.
    pub host_unreachable_since: Option<DateTime<Utc>>,
    /// The lease ran out during an outage of the database and its host is renewing it
    /// (`hosts::LAPSED_IN_OUTAGE`): not yet a device nobody serves.
    pub lease_renewing: bool,
    /// A restriction in force, whatever the session's status says: why, and until when
    /// (`None`: until a person connects the device again).
    pub restriction: Option<String>,
    pub restricted_until: Option<DateTime<Utc>>,
}

/// A device `d`'s restriction is in force (see [`set_device_status_until`]).
pub const RESTRICTION_IN_FORCE: &str =
    "(d.restriction IS NOT NULL AND (d.restricted_until IS NULL OR d.restricted_until > now()))";

/// The status view for one tenant, or every tenant for an operator (`None`).
///
/// Each device's counts come from its own entries of the partial indexes (`bm_claim` for the
/// pending rows, `bm_device_in_flight` for the others): a join of devices to the messages read
/// the whole table, history included (a sequential scan of all 10 million rows in
/// scale-bench). The rows are named by their device alone, which belongs to the tenant: a
/// message's tenant is always its device's (the fan-out takes both from one lead row, which
/// references the device by (id, tenant)), and naming it again would take the count off the index.
pub async fn list_device_load(
    pool: &PgPool,
    tenant: Option<Uuid>,
) -> Result<Vec<DeviceLoad>, RepoError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT d.id, d.tenant_id, d.label, d.status, d.status_reason, d.next_send_at,
                p.pending, f.queued, f.sending,
                l.host_id, l.lease_until, h.unreachable_since AS host_unreachable_since,
                COALESCE({}, false) AS lease_renewing,
                CASE WHEN {RESTRICTION_IN_FORCE} THEN d.restriction END AS restriction,
                CASE WHEN {RESTRICTION_IN_FORCE} THEN d.restricted_until END AS restricted_until
         FROM devices d
         LEFT JOIN device_leases l ON l.device_id = d.id
         LEFT JOIN hosts h ON h.id = l.host_id
         CROSS JOIN LATERAL (SELECT count(*) AS pending FROM broadcast_messages m
                             WHERE m.device_id = d.id AND m.status = 'pending') p
         CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE m.status = 'queued') AS queued,
                                    count(*) FILTER (WHERE m.status = 'sending') AS sending
                             FROM broadcast_messages m
                             WHERE m.device_id = d.id AND m.status IN ('queued', 'sending')) f
         WHERE ($1::uuid IS NULL OR d.tenant_id = $1)
         ORDER BY d.tenant_id, d.label, d.id",
        super::hosts::LAPSED_IN_OUTAGE
    )))
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}
