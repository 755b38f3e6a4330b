//! Campaigns: one message to every matching lead. Owns the `campaigns` table and the fan-out of a
//! campaign into `broadcast_messages` (one row per lead, unique (campaign_id, lead_id)).

use super::copy_rows::copy_in;
use super::RepoError;
use crate::domain::{CampaignStatus, DelayRange, TargetStatus, Token};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Campaign {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub title: String,
    pub template: String,
    pub image: Option<String>,
    pub niche: String,
    pub target_status: String,
    pub scheduled_at: DateTime<Utc>,
    pub min_delay_s: f64,
    pub max_delay_s: f64,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// What Cloud API devices send instead of the text.
    pub wa_template: Option<sqlx::types::Json<crate::render::WaTemplate>>,
}

const CAMPAIGN_COLUMNS: &str = "id, tenant_id, title, template, image, niche, target_status, \
    scheduled_at, min_delay_s, max_delay_s, status, created_at, started_at, finished_at, \
    wa_template";

pub struct NewCampaign<'a> {
    pub title: &'a str,
    /// Already parsed by `render::Template::parse`.
    pub template: &'a str,
    /// `https://…` (already checked) or `media:<id>`.
    pub image: Option<&'a str>,
    pub niche: &'a Token,
    pub target: TargetStatus,
    pub scheduled_at: DateTime<Utc>,
    pub delay: DelayRange,
    /// Sent instead of the text by Cloud API devices (already checked by `WaTemplate::new`).
    pub wa_template: Option<&'a crate::render::WaTemplate>,
}

pub async fn insert_campaign(
    tx: &mut PgConnection,
    tenant: Uuid,
    new: &NewCampaign<'_>,
) -> Result<Uuid, RepoError> {
    check_title(new.title)?;
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO campaigns (id, tenant_id, title, template, image, niche, target_status,
                                scheduled_at, min_delay_s, max_delay_s, wa_template)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(id)
    .bind(tenant)
    .bind(new.title.trim())
    .bind(new.template)
    .bind(new.image)
    .bind(new.niche.as_str())
    .bind(new.target.as_str())
    .bind(new.scheduled_at)
    .bind(new.delay.min_s)
    .bind(new.delay.max_s)
    .bind(new.wa_template.map(sqlx::types::Json))
    .execute(tx)
    .await?;
    Ok(id)
}

/// What an edit changes; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct CampaignEdit<'a> {
    pub title: Option<&'a str>,
    /// Already parsed by `render::Template::parse`.
    pub template: Option<&'a str>,
    /// `https://…` (already checked) or `media:<id>`.
    pub image: Option<&'a str>,
    /// Only before the campaign has started (been fanned out).
    pub scheduled_at: Option<DateTime<Utc>>,
    pub delay: Option<DelayRange>,
    /// `Some(Some(t))` sets the Cloud API template, `Some(None)` removes it (Cloud API devices
    /// then send the text). It is read when a message is claimed for its send, so an edit
    /// reaches every message not yet sending.
    pub wa_template: Option<Option<&'a crate::render::WaTemplate>>,
}

/// Edits a campaign that has not finished: its title, text, image, Cloud API template and
/// delays at any time (new delays pace the gaps drawn from now on), its schedule only until it
/// has started. A step of a sequence is edited through the sequence. Returns the campaign as it
/// is now; the caller re-renders the unsent rows of a started campaign in the same transaction
/// (`messages::rerender_unsent_messages`). Holds the campaign row, so an edit and the fan-out
/// see each other whole: an edit waiting on a fan-out finds the campaign started.
pub async fn update_campaign(
    tx: &mut PgConnection,
    tenant: Uuid,
    id: Uuid,
    edit: &CampaignEdit<'_>,
) -> Result<Campaign, RepoError> {
    if let Some(title) = edit.title {
        check_title(title)?;
    }
    let (status, started_at) =
        lock_campaign(tx, tenant, id, "edit it with `sequence edit-step`").await?;
    if matches!(
        status,
        CampaignStatus::Completed | CampaignStatus::Cancelled
    ) {
        return Err(RepoError::Conflict(format!(
            "the campaign is {}: nothing of it is left to send",
            status.as_str()
        )));
    }
    if let (Some(_), Some(started)) = (edit.scheduled_at, started_at) {
        return Err(RepoError::Conflict(format!(
            "the campaign started at {}: its schedule can no longer change",
            started.to_rfc3339()
        )));
    }
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE campaigns SET title = COALESCE($3, title), template = COALESCE($4, template),
                image = COALESCE($5, image), scheduled_at = COALESCE($6, scheduled_at),
                min_delay_s = COALESCE($7, min_delay_s), max_delay_s = COALESCE($8, max_delay_s),
                wa_template = CASE WHEN $9 THEN $10 ELSE wa_template END
         WHERE id = $1 AND tenant_id = $2
         RETURNING {CAMPAIGN_COLUMNS}"
    )))
    .bind(id)
    .bind(tenant)
    .bind(edit.title.map(str::trim))
    .bind(edit.template)
    .bind(edit.image)
    .bind(edit.scheduled_at)
    .bind(edit.delay.map(|d| d.min_s))
    .bind(edit.delay.map(|d| d.max_s))
    .bind(edit.wa_template.is_some())
    .bind(edit.wa_template.flatten().map(sqlx::types::Json))
    .fetch_one(&mut *tx)
    .await?)
}

/// Locks a campaign of the tenant for a change of its own; returns its status and when it
/// started. A sequence's step is refused, with `instead` saying what to do.
async fn lock_campaign(
    tx: &mut PgConnection,
    tenant: Uuid,
    id: Uuid,
    instead: &str,
) -> Result<(CampaignStatus, Option<DateTime<Utc>>), RepoError> {
    let current: Option<(String, Option<DateTime<Utc>>, Option<Uuid>)> = sqlx::query_as(
        "SELECT status, started_at, sequence_id FROM campaigns
         WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?;
    let (status, started_at, sequence) = current.ok_or(RepoError::NotFound("campaign"))?;
    if let Some(sequence) = sequence {
        return Err(RepoError::Conflict(format!(
            "this is a step of sequence {sequence}: {instead}"
        )));
    }
    Ok((status.parse()?, started_at))
}

fn check_title(title: &str) -> Result<(), RepoError> {
    if title.trim().is_empty() || title.len() > 200 {
        return Err(
            crate::domain::InvalidInput::new("title", "must be 1 to 200 characters").into(),
        );
    }
    Ok(())
}

pub async fn get_campaign(pool: &PgPool, tenant: Uuid, id: Uuid) -> Result<Campaign, RepoError> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1 AND tenant_id = $2"
    )))
    .bind(id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?
    .ok_or(RepoError::NotFound("campaign"))
}

/// The tenant's campaigns (not its sequences' steps), newest first, in one state or in any.
pub async fn list_campaigns(
    pool: &PgPool,
    tenant: Uuid,
    status: Option<CampaignStatus>,
) -> Result<Vec<Campaign>, RepoError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CAMPAIGN_COLUMNS} FROM campaigns
         WHERE tenant_id = $1 AND sequence_id IS NULL AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, id"
    )))
    .bind(tenant)
    .bind(status.map(|s| s.as_str()))
    .fetch_all(pool)
    .await?)
}

/// System scope: locks up to `limit` due scheduled campaigns for this transaction. Concurrent
/// triggers skip each other's locked rows, so each campaign is fanned out by exactly one.
pub async fn claim_due_campaigns(
    tx: &mut PgConnection,
    limit: i64,
) -> Result<Vec<Campaign>, RepoError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CAMPAIGN_COLUMNS} FROM campaigns
         WHERE status = 'scheduled' AND scheduled_at <= now()
         ORDER BY scheduled_at LIMIT $1 FOR UPDATE SKIP LOCKED"
    )))
    .bind(limit)
    .fetch_all(tx)
    .await?)
}

/// A lead a campaign will reach.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Recipient {
    pub lead_id: i64,
    pub device_id: Uuid,
    pub name: String,
    pub phone: String,
}

/// Who a campaign goes to, for the fan-out and for the count shown when it is created:
/// the tenant's leads matching a niche token exactly ($2) and a target status ($3), not opted
/// out, on the tenant's live devices ($4).
const RECIPIENTS: &str = "FROM leads
     WHERE tenant_id = $1 AND niches @> ARRAY[$2]::text[]
       AND ($3 = 'all' OR target_status = $3)
       AND opted_out_at IS NULL AND device_id = ANY($4)";

/// The tenant's live devices: a small set fetched first, so the lead scan needs no per-row join
/// whatever the planner's statistics say.
async fn live_devices(conn: &mut PgConnection, tenant: Uuid) -> Result<Vec<Uuid>, RepoError> {
    Ok(
        sqlx::query_scalar("SELECT id FROM devices WHERE tenant_id = $1 AND deleted_at IS NULL")
            .bind(tenant)
            .fetch_all(conn)
            .await?,
    )
}

/// A campaign's recipients at its fan-out (see [`RECIPIENTS`]).
pub async fn select_campaign_recipients(
    tx: &mut PgConnection,
    tenant: Uuid,
    niche: &str,
    target: TargetStatus,
) -> Result<Vec<Recipient>, RepoError> {
    let live = live_devices(&mut *tx, tenant).await?;
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id AS lead_id, device_id, name, phone {RECIPIENTS}"
    )))
    .bind(tenant)
    .bind(niche)
    .bind(target.as_str())
    .bind(&live)
    .fetch_all(tx)
    .await?)
}

/// How many leads, on how many devices, a campaign with this niche and target would reach if
/// it were fanned out now.
pub async fn count_campaign_recipients(
    pool: &PgPool,
    tenant: Uuid,
    niche: &str,
    target: TargetStatus,
) -> Result<(i64, i64), RepoError> {
    let mut conn = pool.acquire().await?;
    let live = live_devices(&mut conn, tenant).await?;
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*), count(DISTINCT device_id) {RECIPIENTS}"
    )))
    .bind(tenant)
    .bind(niche)
    .bind(target.as_str())
    .bind(&live)
    .fetch_one(&mut *conn)
    .await?)
}

/// A lead a campaign would reach, as a preview shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SampleRecipient {
    pub lead_id: i64,
    pub name: String,
    pub phone: String,
    pub device_label: String,
}

/// The first `limit` leads (by id) a campaign with this niche and target would reach if it were
/// fanned out now: the same selection as [`select_campaign_recipients`].
pub async fn sample_campaign_recipients(
    pool: &PgPool,
    tenant: Uuid,
    niche: &str,
    target: TargetStatus,
    limit: i64,
) -> Result<Vec<SampleRecipient>, RepoError> {
    let mut conn = pool.acquire().await?;
    let live = live_devices(&mut conn, tenant).await?;
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT r.lead_id, r.name, r.phone, d.label AS device_label
         FROM (SELECT id AS lead_id, device_id, name, phone {RECIPIENTS}
               ORDER BY id LIMIT $5) r
         JOIN devices d ON d.id = r.device_id AND d.tenant_id = $1
         ORDER BY r.lead_id"
    )))
    .bind(tenant)
    .bind(niche)
    .bind(target.as_str())
    .bind(&live)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?)
}

/// One rendered row of a campaign's fan-out.
pub struct RenderedMessage<'a> {
    pub lead_id: i64,
    pub device_id: Uuid,
    pub recipient: &'a str,
    pub body: String,
}

/// Inserts a campaign's rows with a binary `COPY` (about twice the rate of a multi-row INSERT).
/// Call it only inside the transaction that holds the campaign locked and still `scheduled`
/// (see `claim_due_campaigns`): then none of its rows can exist yet. The unique (campaign_id,
/// lead_id) index still enforces one row per recipient: a violating COPY aborts the whole
/// transaction, so nothing is ever duplicated. Returns how many rows were inserted.
pub async fn insert_campaign_messages(
    tx: &mut PgConnection,
    tenant: Uuid,
    campaign: Uuid,
    image: Option<&str>,
    rows: &[RenderedMessage<'_>],
) -> Result<u64, RepoError> {
    Ok(copy_in(
        tx,
        "COPY broadcast_messages (tenant_id, campaign_id, image, lead_id, device_id, recipient, body)
         FROM STDIN (FORMAT binary)",
        7,
        rows,
        |data, r| {
            data.uuid(tenant);
            data.uuid(campaign);
            data.opt_text(image);
            data.int8(r.lead_id);
            data.uuid(r.device_id);
            data.text(r.recipient);
            data.text(&r.body);
        },
    )
    .await?)
}

/// `scheduled → running`, in the fan-out's transaction.
pub async fn mark_campaign_running(
    tx: &mut PgConnection,
    tenant: Uuid,
    campaign: Uuid,
) -> Result<bool, RepoError> {
    let res = sqlx::query(
        "UPDATE campaigns SET status = 'running', started_at = now()
         WHERE id = $1 AND tenant_id = $2 AND status = 'scheduled'",
    )
    .bind(campaign)
    .bind(tenant)
    .execute(tx)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// [`change_campaign_status`] in a transaction of its own, run again while PostgreSQL aborts it
/// as a deadlock victim: a pause or a cancel writes every unsent row of the campaign, in an
/// order of its own that a worker's or the processor's claim of some of the same rows need not
/// share. Run again, a change that did commit finds the campaign already in that status and
/// changes nothing. What the CLI calls.
pub async fn set_campaign_status(
    pool: &PgPool,
    tenant: Uuid,
    campaign: Uuid,
    to: CampaignStatus,
) -> Result<CampaignStatus, RepoError> {
    super::retry_aborted(
        super::ABORTED_ATTEMPTS,
        "change a campaign's status",
        || async {
            let mut tx = pool.begin().await?;
            let now = change_campaign_status(&mut tx, tenant, campaign, to).await?;
            tx.commit().await?;
            Ok(now)
        },
    )
    .await
}

/// Changes a campaign's status the way a user asks (pause, resume, cancel). Cancelling also
/// cancels every unsent row in the same transaction. Returns the new status.
pub async fn change_campaign_status(
    tx: &mut PgConnection,
    tenant: Uuid,
    campaign: Uuid,
    to: CampaignStatus,
) -> Result<CampaignStatus, RepoError> {
    let (current, started_at) =
        lock_campaign(tx, tenant, campaign, "pause, resume or cancel the sequence").await?;
    use CampaignStatus as S;
    let next = match (current, to) {
        (S::Scheduled | S::Running, S::Paused) => S::Paused,
        // Resume returns to where the campaign was: not yet fanned out, or running.
        (S::Paused, S::Running) if started_at.is_none() => S::Scheduled,
        (S::Paused, S::Running) => S::Running,
        (S::Scheduled | S::Running | S::Paused, S::Cancelled) => S::Cancelled,
        (a, b) if a == b => return Ok(a),
        (a, b) => {
            return Err(RepoError::Conflict(format!(
                "a {a} campaign cannot become {b}"
            )))
        }
    };
    sqlx::query(
        "UPDATE campaigns SET status = $3,
             finished_at = CASE WHEN $3 = 'cancelled' THEN now() ELSE finished_at END
         WHERE id = $1 AND tenant_id = $2",
    )
    .bind(campaign)
    .bind(tenant)
    .bind(next.as_str())
    .execute(&mut *tx)
    .await?;
    match next {
        S::Paused => set_messages_held(tx, tenant, &[campaign], true).await?,
        S::Running => set_messages_held(tx, tenant, &[campaign], false).await?,
        _ => 0,
    };
    if next == S::Cancelled {
        sqlx::query(
            "UPDATE broadcast_messages SET status = 'cancelled', reason = 'campaign_cancelled', finished_at = now()
             WHERE campaign_id = $1 AND tenant_id = $2 AND status IN ('pending', 'queued')",
        )
        .bind(campaign)
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    }
    Ok(next)
}

/// Takes the pending rows of paused campaigns out of the processor's claim index (`held`,
/// see the migration `held_messages`), or puts every held row back on resume. Only in the
/// transaction that changes the campaigns' status, under their row locks, so that a pause and a
/// resume cannot interleave: a row left held under a running campaign would never be claimed.
/// Returns how many rows changed.
pub(crate) async fn set_messages_held(
    tx: &mut PgConnection,
    tenant: Uuid,
    campaigns: &[Uuid],
    held: bool,
) -> Result<u64, RepoError> {
    let res = sqlx::query(
        "UPDATE broadcast_messages SET held = $3
         WHERE campaign_id = ANY($1) AND tenant_id = $2 AND held <> $3
           AND (NOT $3 OR status = 'pending')",
    )
    .bind(campaigns)
    .bind(tenant)
    .bind(held)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// System scope: running campaigns with no row left unfinished become `completed`.
pub async fn complete_finished_campaigns(tx: &mut PgConnection) -> Result<u64, RepoError> {
    let res = sqlx::query(
        "UPDATE campaigns c SET status = 'completed', finished_at = now()
         WHERE c.status = 'running' AND c.sequence_id IS NULL AND NOT EXISTS (
             SELECT 1 FROM broadcast_messages m
             WHERE m.campaign_id = c.id AND m.status IN ('pending', 'queued', 'sending'))",
    )
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// Counts for one campaign: per state, per (state, reason) and per device.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub total: i64,
    pub by_status: BTreeMap<String, i64>,
    pub by_reason: BTreeMap<(String, String), i64>,
    pub by_device: BTreeMap<Uuid, BTreeMap<String, i64>>,
    pub delivered: i64,
    pub read: i64,
}

pub async fn get_campaign_progress(
    pool: &PgPool,
    tenant: Uuid,
    campaign: Uuid,
) -> Result<Progress, RepoError> {
    // The campaign lookup is the tenant check; the counts then use the progress index.
    get_campaign(pool, tenant, campaign).await?;
    Ok(progress_of(pool, tenant, &[campaign])
        .await?
        .remove(&campaign)
        .unwrap_or_default())
}

/// (campaign, status, reason, device, count, delivered, read)
type ProgressRow = (Uuid, String, Option<String>, Uuid, i64, i64, i64);

/// The one definition of every count a report shows (total, per state, per state and reason,
/// per device, delivered, read), per campaign, in one statement, so the parts of a report always
/// add up to its total even while the campaign runs. A sequence's steps are campaigns.
pub async fn progress_of(
    pool: &PgPool,
    tenant: Uuid,
    campaigns: &[Uuid],
) -> Result<BTreeMap<Uuid, Progress>, RepoError> {
    let rows: Vec<ProgressRow> = sqlx::query_as(
        "SELECT campaign_id, status, reason, device_id, count(*),
                count(delivered_at), count(read_at)
         FROM broadcast_messages WHERE campaign_id = ANY($1) AND tenant_id = $2
         GROUP BY campaign_id, status, reason, device_id",
    )
    .bind(campaigns)
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    let mut out: BTreeMap<Uuid, Progress> = campaigns
        .iter()
        .map(|c| (*c, Progress::default()))
        .collect();
    for (campaign, status, reason, device, n, delivered, read) in rows {
        out.entry(campaign).or_default().add(
            &status,
            reason.as_deref(),
            device,
            n,
            delivered,
            read,
        );
    }
    Ok(out)
}

impl Progress {
    fn add(
        &mut self,
        status: &str,
        reason: Option<&str>,
        device: Uuid,
        n: i64,
        delivered: i64,
        read: i64,
    ) {
        self.total += n;
        self.delivered += delivered;
        self.read += read;
        *self.by_status.entry(status.to_string()).or_default() += n;
        if let Some(r) = reason {
            *self
                .by_reason
                .entry((status.to_string(), r.to_string()))
                .or_default() += n;
        }
        *self
            .by_device
            .entry(device)
            .or_default()
            .entry(status.to_string())
            .or_default() += n;
    }

    /// Sums another report into this one (a sequence's total over its steps).
    pub fn merge(&mut self, other: &Progress) {
        self.total += other.total;
        self.delivered += other.delivered;
        self.read += other.read;
        for (k, v) in &other.by_status {
            *self.by_status.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.by_reason {
            *self.by_reason.entry(k.clone()).or_default() += v;
        }
        for (d, m) in &other.by_device {
            let mine = self.by_device.entry(*d).or_default();
            for (k, v) in m {
                *mine.entry(k.clone()).or_default() += v;
            }
        }
    }
}

/// Which failed messages to retry: all of a tenant's, narrowed by campaign (or sequence step)
/// and by device.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryScope {
    pub campaign: Option<Uuid>,
    pub device: Option<Uuid>,
}

/// `failed → pending`, due now, attempts reset: the rows go through pacing again, their history
/// stays in `message_transitions`, the host's record is marked for a fresh attempt, and a
/// completed campaign runs again until they finish. The rows of leads who have opted out, and
/// of cancelled campaigns or sequences, stay `failed`. Returns how many rows were retried.
pub async fn retry_failed_messages(
    tx: &mut PgConnection,
    tenant: Uuid,
    scope: RetryScope,
) -> Result<u64, RepoError> {
    let n: i64 = sqlx::query_scalar(concat!(
        "WITH r AS (
             UPDATE broadcast_messages bm
             SET status = 'pending', reason = NULL, finished_at = NULL, attempts = 0,
                 due_at = now(), lease_until = NULL, held = ",
        held_if_campaign_paused!(),
        "
             WHERE tenant_id = $1 AND status = 'failed'
               AND ($2::uuid IS NULL OR campaign_id = $2)
               AND ($3::uuid IS NULL OR device_id = $3)
               -- a lead who opted out after the failure is not messaged again: nothing on the
               -- way to the provider checks the lead, only the fan-out and the opt-out itself
               AND NOT EXISTS (SELECT 1 FROM leads l
                               WHERE l.id = bm.lead_id AND l.tenant_id = bm.tenant_id
                                 AND l.opted_out_at IS NOT NULL)
               -- nor a cancelled campaign's (or sequence's): nothing would claim or end them.
               -- Share-locked: a cancel under way is waited for and then seen, and a later
               -- cancel waits for this statement and then finds the rows pending
               AND EXISTS (SELECT 1 FROM campaigns c
                           WHERE c.id = bm.campaign_id AND c.tenant_id = bm.tenant_id
                             AND c.status <> 'cancelled' FOR SHARE)
             RETURNING id, campaign_id
         ), h AS (
             UPDATE host_sends SET state = 'retry', updated_at = now()
             WHERE tenant_id = $1 AND message_id IN (SELECT id FROM r)
               AND state IN ('failed', 'aborted', 'attempting')
         ), c AS (
             UPDATE campaigns SET status = 'running', finished_at = NULL
             WHERE tenant_id = $1 AND id IN (SELECT campaign_id FROM r) AND status = 'completed'
         )
         SELECT count(*) FROM r"
    ))
    .bind(tenant)
    .bind(scope.campaign)
    .bind(scope.device)
    .fetch_one(tx)
    .await?;
    Ok(n as u64)
}

/// A message's transitions, oldest first: (at, from, to, reason).
pub async fn list_message_transitions(
    pool: &PgPool,
    tenant: Uuid,
    message: i64,
) -> Result<Vec<(DateTime<Utc>, String, String, Option<String>)>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT at, from_status, to_status, reason FROM message_transitions
         WHERE message_id = $1 AND tenant_id = $2 ORDER BY at",
    )
    .bind(message)
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}
