//! Leads: the people a device messages. Owns the `leads` table. A lead belongs to one device of
//! its tenant (the composite foreign key makes the database refuse anything else).

use super::RepoError;
use crate::domain::{LeadStatus, PhoneE164, Token};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct NewLead {
    pub device_id: Uuid,
    pub name: String,
    pub phone: PhoneE164,
    pub niches: Vec<Token>,
    pub status: LeadStatus,
    pub triggers: Vec<Token>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpsertCount {
    pub inserted: u64,
    pub updated: u64,
    /// Of both, the leads that are opted out (they receive nothing).
    pub opted_out: u64,
}

/// Inserts leads, or updates name, niches, status and triggers of a lead already known by
/// (device, phone). Refuses the whole batch if any device is not the tenant's, or if it names
/// one (device, phone) twice: which of the two should win is the caller's call. Holds the
/// tenant's opt-out lock shared until the transaction ends (see [`lock_opt_out_list`]).
pub async fn upsert_leads(
    tx: &mut PgConnection,
    tenant: Uuid,
    leads: &[NewLead],
) -> Result<UpsertCount, RepoError> {
    let mut seen = std::collections::HashSet::with_capacity(leads.len());
    if let Some(twice) = leads
        .iter()
        .find(|l| !seen.insert((l.device_id, l.phone.as_str())))
    {
        return Err(crate::domain::InvalidInput::new(
            "phone",
            format!(
                "{} appears twice for device {}",
                twice.phone.as_str(),
                twice.device_id
            ),
        )
        .into());
    }
    lock_opt_out_list(tx, tenant, LockMode::Shared).await?;
    let mut count = UpsertCount::default();
    for chunk in leads.chunks(5_000) {
        let devices: Vec<Uuid> = chunk.iter().map(|l| l.device_id).collect();
        let names: Vec<&str> = chunk.iter().map(|l| l.name.trim()).collect();
        let phones: Vec<&str> = chunk.iter().map(|l| l.phone.as_str()).collect();
        // Postgres has no array of arrays of varying length; join tokens and split in SQL.
        let niches: Vec<String> = chunk.iter().map(|l| join_tokens(&l.niches)).collect();
        let statuses: Vec<&str> = chunk.iter().map(|l| l.status.as_str()).collect();
        let triggers: Vec<String> = chunk.iter().map(|l| join_tokens(&l.triggers)).collect();
        let foreign: Option<Uuid> = sqlx::query_scalar(
            "SELECT d FROM unnest($1::uuid[]) AS d
             WHERE NOT EXISTS (SELECT 1 FROM devices WHERE id = d AND tenant_id = $2 AND deleted_at IS NULL)
             LIMIT 1",
        )
        .bind(&devices)
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(d) = foreign {
            return Err(crate::domain::InvalidInput::new(
                "device_id",
                format!("{d} is not a live device of this tenant"),
            )
            .into());
        }
        // A number on the tenant's opt-out list comes in opted out, on whichever device; an
        // update never clears an opt-out. The list is probed per row (its primary key) rather
        // than joined: a join may hand the rows to the insert in another order, and leads get
        // their ids, and so their place in a device's sending order, in the order of the file.
        let rows: Vec<(bool, bool)> = sqlx::query_as(
            "INSERT INTO leads (tenant_id, device_id, name, phone, niches, target_status, triggers,
                                opted_out_at)
             SELECT $1, d, n, p, string_to_array(ni, ' '), s, string_to_array(tr, ' '),
                    (SELECT o.opted_out_at FROM opt_outs o WHERE o.tenant_id = $1 AND o.phone = u.p)
             FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
                  AS u(d, n, p, ni, s, tr)
             ON CONFLICT (device_id, phone) DO UPDATE SET
                 name = EXCLUDED.name, niches = EXCLUDED.niches,
                 target_status = EXCLUDED.target_status, triggers = EXCLUDED.triggers,
                 opted_out_at = COALESCE(leads.opted_out_at, EXCLUDED.opted_out_at)
             RETURNING (xmax = 0), (opted_out_at IS NOT NULL)",
        )
        .bind(tenant)
        .bind(&devices)
        .bind(&names)
        .bind(&phones)
        .bind(&niches)
        .bind(&statuses)
        .bind(&triggers)
        .fetch_all(&mut *tx)
        .await?;
        for (inserted, opted_out) in rows {
            count.opted_out += u64::from(opted_out);
            if inserted {
                count.inserted += 1;
            } else {
                count.updated += 1;
            }
        }
    }
    if leads.len() >= 10_000 {
        // A large import changes the table's shape; fresh statistics keep the fan-out's plan good.
        sqlx::query("ANALYZE leads").execute(&mut *tx).await?;
    }
    Ok(count)
}

fn join_tokens(tokens: &[Token]) -> String {
    tokens
        .iter()
        .map(Token::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

enum LockMode {
    Shared,
    Exclusive,
}

/// Orders imports and opt-outs of one tenant: imports take this lock shared (they run side by
/// side), an opt-out exclusive, each until its transaction ends. Without it an opt-out that
/// commits while an import of the same number is open misses the import's new lead: the import
/// read the list before the opt-out wrote to it, and the opt-out's update cannot see a row not
/// yet committed, so the lead came in not opted out and was messaged. An opt-out now waits for
/// the imports under way (and an import for the opt-out), so one of the two sees the other.
/// A transaction-level advisory lock (namespace 1, the tenant's hash): it needs no row, so it
/// covers numbers that are no lead yet; a hash shared by two tenants only makes one wait.
async fn lock_opt_out_list(
    tx: &mut PgConnection,
    tenant: Uuid,
    mode: LockMode,
) -> Result<(), RepoError> {
    let sql = match mode {
        LockMode::Shared => "SELECT pg_advisory_xact_lock_shared(1, hashtext($1::uuid::text))",
        LockMode::Exclusive => "SELECT pg_advisory_xact_lock(1, hashtext($1::uuid::text))",
    };
    sqlx::query(sql).bind(tenant).execute(&mut *tx).await?;
    Ok(())
}

/// Who changed a number's place on the opt-out list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentSource {
    /// The person, by an opt-out keyword sent to one of the tenant's devices.
    InboundMessage,
    /// The person, by turning off marketing messages from the business in WhatsApp (Cloud
    /// API numbers: the webhook's `user_preferences`).
    MarketingPreference,
    /// An operator, through the CLI.
    Operator,
}

impl ConsentSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InboundMessage => "inbound_message",
            Self::MarketingPreference => "marketing_preference",
            Self::Operator => "operator",
        }
    }
}

async fn log_opt_out_change(
    tx: &mut PgConnection,
    tenant: Uuid,
    phone: &PhoneE164,
    action: &str,
    source: ConsentSource,
) -> Result<(), RepoError> {
    sqlx::query(
        "INSERT INTO opt_out_log (tenant_id, phone, action, source) VALUES ($1, $2, $3, $4)",
    )
    .bind(tenant)
    .bind(phone.as_str())
    .bind(action)
    .bind(source.as_str())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Takes a number off the tenant's opt-out list (an opt-out made by mistake, or the person
/// asking to hear from the tenant again) and clears the mark on its leads, so later campaigns
/// reach them; messages the opt-out skipped stay skipped. The change is logged with the
/// opt-out it undoes. Refused for a number that is not on the list. Returns how many leads
/// were cleared.
pub async fn opt_in_number(
    tx: &mut PgConnection,
    tenant: Uuid,
    phone: &PhoneE164,
    source: ConsentSource,
) -> Result<u64, RepoError> {
    lock_opt_out_list(tx, tenant, LockMode::Exclusive).await?;
    let removed = sqlx::query("DELETE FROM opt_outs WHERE tenant_id = $1 AND phone = $2")
        .bind(tenant)
        .bind(phone.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if removed == 0 {
        return Err(RepoError::Conflict(format!(
            "{phone} is not on the tenant's opt-out list"
        )));
    }
    log_opt_out_change(tx, tenant, phone, "opt_in", source).await?;
    let cleared = sqlx::query(
        "UPDATE leads SET opted_out_at = NULL
         WHERE tenant_id = $1 AND phone = $2 AND opted_out_at IS NOT NULL",
    )
    .bind(tenant)
    .bind(phone.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(cleared)
}

/// A number's opt-out history, oldest first: (when, `opt_out` or `opt_in`, source).
pub async fn list_opt_out_log(
    pool: &PgPool,
    tenant: Uuid,
    phone: &PhoneE164,
) -> Result<Vec<(DateTime<Utc>, String, String)>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT at, action, source FROM opt_out_log
         WHERE tenant_id = $1 AND phone = $2 ORDER BY at, id",
    )
    .bind(tenant)
    .bind(phone.as_str())
    .fetch_all(pool)
    .await?)
}

/// Puts a number on the tenant's opt-out list, marks its leads (on any of the tenant's devices)
/// opted out and skips their unsent messages. Returns how many leads matched; with none, the
/// number is still on the list for the leads that may come with it later. Waits for the
/// tenant's imports under way (see [`lock_opt_out_list`]).
pub async fn opt_out_lead(
    tx: &mut PgConnection,
    tenant: Uuid,
    phone: &PhoneE164,
    source: ConsentSource,
) -> Result<u64, RepoError> {
    lock_opt_out_list(tx, tenant, LockMode::Exclusive).await?;
    // The number stays on the tenant's list: a lead imported with it later comes in opted out.
    let added = sqlx::query(
        "INSERT INTO opt_outs (tenant_id, phone) VALUES ($1, $2)
         ON CONFLICT (tenant_id, phone) DO NOTHING",
    )
    .bind(tenant)
    .bind(phone.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if added > 0 {
        log_opt_out_change(tx, tenant, phone, "opt_out", source).await?;
    }
    let ids: Vec<i64> = sqlx::query_scalar(
        "UPDATE leads SET opted_out_at = COALESCE(opted_out_at, now())
         WHERE tenant_id = $1 AND phone = $2 RETURNING id",
    )
    .bind(tenant)
    .bind(phone.as_str())
    .fetch_all(&mut *tx)
    .await?;
    // Found by (campaign, lead), one probe of the unique index per running or paused campaign
    // of the tenant (`campaigns_tenant_active`): only those can hold unsent rows (a scheduled
    // campaign has none yet, a cancel cancels them in its own transaction, a campaign completes
    // once none is left). By lead alone no index qualifies (the whole table, or the whole
    // (campaign, lead) index, read); through the lead's device, every pending row of the
    // device was read to skip the lead's few (scale-bench: 188 ms at 10,000 pending per device).
    sqlx::query(
        "UPDATE broadcast_messages bm
         SET status = 'skipped', reason = 'lead_opted_out', finished_at = now()
         FROM leads l, campaigns c
         WHERE l.tenant_id = $1 AND l.id = ANY($2)
           AND c.tenant_id = $1 AND c.status IN ('running', 'paused')
           AND bm.campaign_id = c.id AND bm.lead_id = l.id
           AND bm.tenant_id = l.tenant_id AND bm.device_id = l.device_id
           AND bm.status IN ('pending', 'queued')",
    )
    .bind(tenant)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    Ok(ids.len() as u64)
}

/// How many times in all [`opt_out_number`] runs an opt-out that PostgreSQL keeps aborting:
/// more than [`super::ABORTED_ATTEMPTS`], because an opt-out that gives up loses a STOP (the
/// device host has nothing to redeliver it), which costs far more than a wait.
pub const OPT_OUT_ATTEMPTS: u32 = 8;

/// [`opt_out_lead`] in a transaction of its own, run again while PostgreSQL aborts it as a
/// deadlock victim: it skips one lead's rows in several campaigns, and a worker's claim may
/// hold two of them locked in the other order. Every write in it is conditional or `ON
/// CONFLICT DO NOTHING`, so a run whose commit succeeded but whose answer was lost changes
/// nothing when run again. What the device host, the Cloud API webhook and the CLI call.
pub async fn opt_out_number(
    pool: &PgPool,
    tenant: Uuid,
    phone: &PhoneE164,
    source: ConsentSource,
) -> Result<u64, RepoError> {
    super::retry_aborted(OPT_OUT_ATTEMPTS, "opt-out", || async {
        let mut tx = pool.begin().await?;
        let n = opt_out_lead(&mut tx, tenant, phone, source).await?;
        tx.commit().await?;
        Ok(n)
    })
    .await
}

/// The tenant's leads with this number (one per device that has it).
pub async fn find_leads_by_phone(
    pool: &PgPool,
    tenant: Uuid,
    phone: &PhoneE164,
) -> Result<Vec<i64>, RepoError> {
    Ok(
        sqlx::query_scalar("SELECT id FROM leads WHERE tenant_id = $1 AND phone = $2 ORDER BY id")
            .bind(tenant)
            .bind(phone.as_str())
            .fetch_all(pool)
            .await?,
    )
}

/// The cached answer to "is this lead's number on WhatsApp?" (`None`: never checked).
pub async fn cached_on_whatsapp(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
    phone: &PhoneE164,
) -> Result<Option<bool>, RepoError> {
    Ok(sqlx::query_scalar(
        "SELECT on_whatsapp FROM leads WHERE tenant_id = $1 AND device_id = $2 AND phone = $3",
    )
    .bind(tenant)
    .bind(device)
    .bind(phone.as_str())
    .fetch_optional(pool)
    .await?
    .flatten())
}

/// Caches a number check on the lead.
pub async fn cache_on_whatsapp(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
    phone: &PhoneE164,
    on_whatsapp: bool,
) -> Result<(), RepoError> {
    sqlx::query(
        "UPDATE leads SET on_whatsapp = $4, wa_checked_at = now()
         WHERE tenant_id = $1 AND device_id = $2 AND phone = $3",
    )
    .bind(tenant)
    .bind(device)
    .bind(phone.as_str())
    .bind(on_whatsapp)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn count_leads(pool: &PgPool, tenant: Uuid) -> Result<i64, RepoError> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM leads WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(pool)
            .await?,
    )
}

/// When the number went on the tenant's opt-out list, if it is on it.
pub async fn get_opt_out(
    pool: &PgPool,
    tenant: Uuid,
    phone: &PhoneE164,
) -> Result<Option<DateTime<Utc>>, RepoError> {
    Ok(
        sqlx::query_scalar("SELECT opted_out_at FROM opt_outs WHERE tenant_id = $1 AND phone = $2")
            .bind(tenant)
            .bind(phone.as_str())
            .fetch_optional(pool)
            .await?,
    )
}

/// A lead as an operator looks it up by its number.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LeadView {
    pub id: i64,
    pub device_id: Uuid,
    pub device_label: String,
    pub device_deleted: bool,
    pub name: String,
    pub niches: Vec<String>,
    pub target_status: String,
    pub triggers: Vec<String>,
    pub opted_out_at: Option<DateTime<Utc>>,
    pub on_whatsapp: Option<bool>,
    pub last_contacted_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// The tenant's leads with this number, one per device that has it, by device label.
pub async fn list_leads_with_phone(
    pool: &PgPool,
    tenant: Uuid,
    phone: &PhoneE164,
) -> Result<Vec<LeadView>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT l.id, l.device_id, d.label AS device_label, d.deleted_at IS NOT NULL AS device_deleted,
                l.name, l.niches, l.target_status, l.triggers, l.opted_out_at, l.on_whatsapp,
                l.last_contacted_at, l.created_at
         FROM leads l JOIN devices d ON d.id = l.device_id AND d.tenant_id = l.tenant_id
         WHERE l.tenant_id = $1 AND l.phone = $2
         ORDER BY d.label, l.id",
    )
    .bind(tenant)
    .bind(phone.as_str())
    .fetch_all(pool)
    .await?)
}

/// Which of a tenant's leads `leads list` shows; `None` is any.
#[derive(Debug, Clone, Default)]
pub struct LeadFilter {
    /// Only this device's leads; without it, only live devices' leads.
    pub device: Option<Uuid>,
    /// Leads whose niche set holds this exact token.
    pub niche: Option<Token>,
    pub status: Option<LeadStatus>,
    /// `Some(true)`: only opted-out leads; `Some(false)`: only those who can be messaged.
    pub opted_out: Option<bool>,
}

/// A lead as `leads list` shows and exports it: the columns `leads import` reads, and more.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ListedLead {
    pub id: i64,
    pub device_id: Uuid,
    pub device_label: String,
    pub device_deleted: bool,
    pub name: String,
    pub phone: String,
    pub niches: Vec<String>,
    pub target_status: String,
    pub triggers: Vec<String>,
    pub opted_out_at: Option<DateTime<Utc>>,
    pub last_contacted_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// Up to `limit` of the tenant's leads with ids above `after`, in id order, that match the
/// filter. A deleted device's leads (it sends nothing more) are left out unless the filter
/// names that device. The page is read along `leads_tenant_id` and its devices are looked up per row, so a
/// page costs the same for a tenant of any size among tenants of any size.
pub async fn list_leads(
    pool: &PgPool,
    tenant: Uuid,
    filter: &LeadFilter,
    after: i64,
    limit: i64,
) -> Result<Vec<ListedLead>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT l.id, l.device_id, d.label AS device_label,
                d.deleted_at IS NOT NULL AS device_deleted, l.name, l.phone, l.niches,
                l.target_status, l.triggers, l.opted_out_at, l.last_contacted_at, l.created_at
         FROM (SELECT * FROM leads l
               WHERE l.tenant_id = $1 AND l.id > $2
                 -- a deleted device's leads only when that device is asked for
                 AND CASE WHEN $3::uuid IS NULL
                          THEN (SELECT d.deleted_at IS NULL FROM devices d
                                WHERE d.id = l.device_id AND d.tenant_id = l.tenant_id)
                          ELSE l.device_id = $3 END
                 AND ($4::text IS NULL OR l.niches @> ARRAY[$4::text])
                 AND ($5::text IS NULL OR l.target_status = $5)
                 AND ($6::bool IS NULL OR (l.opted_out_at IS NOT NULL) = $6)
               ORDER BY l.tenant_id, l.id
               LIMIT $7) l
         CROSS JOIN LATERAL (SELECT d.label, d.deleted_at FROM devices d
                             WHERE d.id = l.device_id AND d.tenant_id = l.tenant_id) d
         ORDER BY l.id",
    )
    .bind(tenant)
    .bind(after)
    .bind(filter.device)
    .bind(filter.niche.as_ref().map(Token::as_str))
    .bind(filter.status.map(LeadStatus::as_str))
    .bind(filter.opted_out)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
