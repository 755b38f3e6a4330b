//! `broadcast_messages`: the state machine of DESIGN.md §2. Every transition is one conditional
//! `UPDATE … WHERE status = <expected>`; a transition that matches no row did not happen.
//! Nothing here deletes a row.
//!
//! **Rows named by id are found by primary key only.** A statement given message ids compares
//! the expected status in the "C" collation (`status = 'sending' COLLATE "C"`: the same equality
//! for these ASCII words). In the default collation `status = 'sending'` implies the predicate
//! of the partial in-flight indexes (`status IN ('queued', 'sending')`), and `'pending'` that of
//! `bm_claim`, and the planner may then AND the primary key with a scan of the whole partial
//! index, or walk it and join the ids against it: 10,000 index entries read to update 10 rows.
//! In the 100,000-message benchmark that was 38 % of PostgreSQL's CPU (`perf`, 2026-12-01) in
//! `mark_messages_sent` alone. Scans that *want* a partial index (the processor's per-device
//! read of `bm_claim`, the rescuer's lease scans) keep the default.

use super::RepoError;
use crate::domain::reason;
use crate::queue::WorkItem;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A claimed item and how many times its row has been enqueued (for the deduplication id).
pub type ClaimedItem = (WorkItem, i32);

/// A device's limits as resolved for this tick in its tenant's zone (chrono-tz): the local day
/// its daily cap counts in, and whether it is inside its quiet hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimit {
    pub device: Uuid,
    pub local_day: NaiveDate,
    pub quiet: bool,
}

/// System scope: the processor's claim. For every online device whose pacing cursor has passed
/// and which has no paced message in flight, takes its next due pending message of a running
/// campaign, marks it `queued` with a lease, draws its gap uniformly in the effective range
/// with its top lowered by the claimant's tick `tick_s` (the rules of `pacing::effective_range`
/// and `pacing::draw_range`, written again here in SQL: campaign's range with the device's as a
/// floor; the tick is the longest a due cursor waits for the next claim, so that real gaps stay
/// within the range), stores it on the row and moves the device's cursor to now + gap.
/// [`mark_messages_sent`] moves the cursor again to acceptance + gap, so consecutive *sends* are
/// spaced by the gap even when the queue delivers late. While the drawn
/// gaps are zero a device takes up to `per_device` messages at once, so a zero gap never caps
/// throughput at one per tick. A claim takes at most about `max_messages` rows in all: each
/// ready device's share is `max_messages / ready devices` (at least one), so that a zero-gap
/// campaign over a thousand devices makes several short claims instead of one long one that
/// holds back every paced device's drain (one claim of 1,000 devices × 33 messages took 3.9 s).
/// Concurrent processors skip each other's locked devices and rows, so a message is queued once.
///
/// The claim is `full` when it took `max_devices` devices or some device took its whole share:
/// there may be more to claim at once.
///
/// Account safety is enforced here too, so no path reaches the queue around it: a device inside
/// its quiet hours is not claimed; a device with a daily cap (or in its warm-up ramp: the cap
/// starts at `warmup_start` on the day it was paired and doubles daily for `warmup_days`) takes
/// at most what is left of its tenant-local day's allowance, counted as messages are queued.
/// With a per-lead frequency cap (the tenant's `lead_min_gap_s`), a lead contacted within the
/// gap is skipped over (its message waits) and is contacted at most once per claim. Held
/// messages simply stay `pending`.
pub async fn claim_ready_messages(
    tx: &mut PgConnection,
    size: ClaimSize,
    lease_s: f64,
    tick_s: f64,
    limits: &[DeviceLimit],
) -> Result<Claim, RepoError> {
    let lim_ids: Vec<Uuid> = limits.iter().map(|l| l.device).collect();
    let lim_days: Vec<NaiveDate> = limits.iter().map(|l| l.local_day).collect();
    let lim_quiet: Vec<bool> = limits.iter().map(|l| l.quiet).collect();
    let rows: Vec<(i64, Uuid, Uuid, i32, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH lim AS (
             SELECT * FROM unnest($4::uuid[], $5::date[], $6::bool[]) AS l(id, day, quiet)
         ), ready AS (
             SELECT d.id, d.tenant_id, d.min_delay_s, d.max_delay_s, lim.day, t.lead_min_gap_s,
                    CASE WHEN a.cap IS NULL THEN $2::bigint
                         ELSE LEAST($2::bigint, a.cap - CASE WHEN d.cap_day = lim.day
                                                             THEN d.cap_used ELSE 0 END)
                    END AS allow
             FROM devices d
             JOIN tenants t ON t.id = d.tenant_id
             LEFT JOIN lim ON lim.id = d.id
             CROSS JOIN LATERAL (SELECT CASE
                 WHEN d.paired_at IS NOT NULL AND d.warmup_days > 0
                      AND d.paired_at > now() - make_interval(days => d.warmup_days)
                 THEN LEAST(COALESCE(d.daily_cap, 2147483647)::float8,
                            d.warmup_start * power(2::float8,
                                floor(extract(epoch FROM now() - d.paired_at) / 86400)))::bigint
                 ELSE d.daily_cap::bigint END AS cap) a
             -- Only devices with a message the claim may take (the conditions of `cand`'s
             -- read below). A cursor moves only on a send, so ready devices with nothing to
             -- take (none due, only a paused campaign's, only leads inside the frequency cap)
             -- keep the oldest cursors: once more of them were ready than one claim takes,
             -- they filled every claim and the other devices never sent (seen with 3,000
             -- devices). A lateral with a LIMIT, so that it stays one probe of `bm_claim` per
             -- device and is not turned into a join over every pending message.
             CROSS JOIN LATERAL (
                 SELECT 1 FROM broadcast_messages p
                 WHERE p.device_id = d.id AND p.tenant_id = d.tenant_id
                   AND p.status = 'pending' AND NOT p.held AND p.due_at <= now()
                   AND (SELECT c.status = 'running' FROM campaigns c
                        WHERE c.id = p.campaign_id AND c.tenant_id = p.tenant_id)
                   AND (t.lead_min_gap_s = 0 OR NOT EXISTS (
                        SELECT 1 FROM leads l
                        WHERE l.id = p.lead_id AND l.tenant_id = p.tenant_id
                          AND l.last_contacted_at > now() - make_interval(secs => t.lead_min_gap_s)))
                 LIMIT 1
             ) w
             WHERE d.status = 'online' AND d.deleted_at IS NULL AND d.next_send_at <= now()
               -- a restriction outlives the session: not before it ends, whatever the
               -- session says (`devices::RESTRICTION_IN_FORCE`, `set_device_status_until`)
               AND NOT {in_force}
               AND NOT COALESCE(lim.quiet, false)
               -- a capped device is claimed only with its local day resolved, and while the
               -- day's allowance lasts
               AND (a.cap IS NULL OR (lim.day IS NOT NULL
                    AND a.cap > CASE WHEN d.cap_day = lim.day THEN d.cap_used ELSE 0 END))
               AND NOT EXISTS (SELECT 1 FROM broadcast_messages f
                               WHERE f.device_id = d.id AND f.status IN ('queued', 'sending')
                                 AND f.gap_s > 0)
             ORDER BY d.next_send_at LIMIT $1
             FOR UPDATE OF d SKIP LOCKED
         ), sized AS (
             -- each device's share of the claim's $9 messages (a window function cannot sit
             -- beside FOR UPDATE, hence a CTE of its own)
             SELECT r.*, LEAST(r.allow, GREATEST(1, $9::bigint / count(*) OVER ())) AS take
             FROM ready r
         ), cand AS (
             SELECT r.id AS device_id, r.tenant_id, m.id, m.lead_id, r.lead_min_gap_s,
                    row_number() OVER (PARTITION BY r.id ORDER BY m.due_at, m.id) AS rn,
                    row_number() OVER (PARTITION BY m.lead_id ORDER BY m.due_at, m.id) AS lead_rn,
                    GREATEST(r.min_delay_s, c.min_delay_s) AS gmin,
                    GREATEST(r.max_delay_s, c.max_delay_s, r.min_delay_s, c.min_delay_s) AS gmax
             FROM sized r
             -- The device's due messages in order, straight from `bm_claim` (the conditions
             -- of `ready`'s probe above, which must stay the same): the campaign is
             -- looked up per row (a scalar subquery the planner cannot reorder), not joined. As
             -- a join, with statistics that said nothing was pending, the planner read each
             -- device's whole backlog through `bm_progress` and sorted it, every tick.
             CROSS JOIN LATERAL (
                 SELECT bm.id, bm.lead_id, bm.due_at, bm.campaign_id
                 FROM broadcast_messages bm
                 WHERE bm.device_id = r.id AND bm.tenant_id = r.tenant_id
                   AND bm.status = 'pending' AND NOT bm.held AND bm.due_at <= now()
                   AND (SELECT c.status = 'running' FROM campaigns c
                        WHERE c.id = bm.campaign_id AND c.tenant_id = bm.tenant_id)
                   -- the per-lead frequency cap (off at 0): no lead contacted within the gap
                   AND (r.lead_min_gap_s = 0 OR NOT EXISTS (
                        SELECT 1 FROM leads l
                        WHERE l.id = bm.lead_id AND l.tenant_id = bm.tenant_id
                          AND l.last_contacted_at > now() - make_interval(secs => r.lead_min_gap_s)))
                 ORDER BY bm.due_at, bm.id
                 LIMIT r.take
                 FOR UPDATE OF bm SKIP LOCKED
             ) m
             -- the campaign's delays, one probe of its key per row (a lateral with a LIMIT,
             -- which the planner keeps as such): as a join, it hashed all of the tenant's
             -- campaigns once per device, a cost that grew with the tenant's history (913
             -- campaigns × 100 devices at 10 M rows: 88,100 buffer reads of 123,000 per claim;
             -- 43,000 in all without it). Only a big table's estimates lead the planner there.
             CROSS JOIN LATERAL (
                 SELECT c.min_delay_s, c.max_delay_s FROM campaigns c
                 WHERE c.id = m.campaign_id AND c.tenant_id = r.tenant_id
                 LIMIT 1
             ) c
         ), gapped AS (
             SELECT device_id, tenant_id, id, lead_id, lead_min_gap_s, rn,
                    -- `pacing::draw_range`: the top lowered by the claimant's tick ($7), a
                    -- paced range never below MIN_PACED_GAP_S ($8; zero means unpaced)
                    lo + random() * (GREATEST(lo, gmax - $7::float8) - lo) AS gap
             FROM (SELECT *, CASE WHEN gmax > 0 THEN GREATEST(gmin, $8::float8) ELSE gmin END AS lo
                   FROM cand) c
             -- with a frequency cap, one message per lead per claim
             WHERE lead_min_gap_s = 0 OR lead_rn = 1
         ), kept AS (
             SELECT device_id, tenant_id, id, lead_id, lead_min_gap_s, gap FROM (
                 SELECT device_id, tenant_id, id, lead_id, lead_min_gap_s, gap,
                        COALESCE(sum(gap) OVER (PARTITION BY device_id ORDER BY rn
                                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
                 FROM gapped) k
             WHERE before = 0
         ), upd AS (
             UPDATE broadcast_messages bm
             SET status = 'queued', queued_at = now(), enqueue_count = bm.enqueue_count + 1,
                 lease_until = now() + make_interval(secs => $3), gap_s = kept.gap
             -- found by primary key only (see the module's note): with statistics taken while
             -- nothing was pending, the planner walked every pending row through `bm_claim`
             -- once per claimed message (4 min 27 s for 12,700 of 102,700, measured)
             FROM kept WHERE bm.id = kept.id AND bm.status = 'pending' COLLATE \"C\"
             RETURNING bm.id, bm.tenant_id, bm.device_id, bm.enqueue_count
         ), contacted AS (
             UPDATE leads l SET last_contacted_at = now()
             FROM kept k
             WHERE k.lead_min_gap_s > 0 AND l.id = k.lead_id AND l.tenant_id = k.tenant_id
         ), cursor AS (
             UPDATE devices d SET next_send_at = now() + make_interval(secs => g.total),
                 cap_day = COALESCE(g.day, d.cap_day),
                 cap_used = CASE WHEN g.day IS NULL THEN d.cap_used
                                 WHEN d.cap_day = g.day THEN d.cap_used + g.n
                                 ELSE g.n END
             FROM (SELECT k.device_id, k.total, k.n, r.day
                   -- aggregated before the join: kept has a row per message, ready per device
                   FROM (SELECT device_id, sum(gap) AS total, count(*) AS n
                         FROM kept GROUP BY device_id) k
                   JOIN ready r ON r.id = k.device_id) g
             WHERE d.id = g.device_id
         )
         SELECT u.id, u.tenant_id, u.device_id, u.enqueue_count,
                count(*) OVER (PARTITION BY u.device_id) >= s.take AS took_share
         FROM upd u JOIN sized s ON s.id = u.device_id",
        in_force = super::devices::RESTRICTION_IN_FORCE
    )))
    .bind(size.max_devices)
    .bind(size.per_device)
    .bind(lease_s)
    .bind(&lim_ids)
    .bind(&lim_days)
    .bind(&lim_quiet)
    .bind(tick_s)
    .bind(crate::pacing::MIN_PACED_GAP_S)
    .bind(size.max_messages)
    .fetch_all(tx)
    .await?;
    let some_share_taken = rows.iter().any(|r| r.4);
    let items = to_items(
        rows.into_iter()
            .map(|(m, t, d, n, _)| (m, t, d, n))
            .collect(),
    );
    let mut devices: Vec<Uuid> = items.iter().map(|(i, _)| i.device_id).collect();
    devices.sort_unstable();
    devices.dedup();
    Ok(Claim {
        full: some_share_taken || devices.len() as i64 >= size.max_devices,
        items,
    })
}

/// How much one processor claim may take: `max_devices` devices, `per_device` messages of a
/// zero-gap device, about `max_messages` in all (see [`claim_ready_messages`]).
#[derive(Debug, Clone, Copy)]
pub struct ClaimSize {
    pub max_devices: i64,
    pub per_device: i64,
    pub max_messages: i64,
}

/// What one processor claim took.
#[derive(Debug, Default)]
pub struct Claim {
    pub items: Vec<ClaimedItem>,
    /// More may be ready at once: the claim took `max_devices` devices, or some device its
    /// whole share.
    pub full: bool,
}

fn to_items(rows: Vec<(i64, Uuid, Uuid, i32)>) -> Vec<ClaimedItem> {
    rows.into_iter()
        .map(|(message_id, tenant_id, device_id, n)| {
            (
                WorkItem {
                    message_id,
                    tenant_id,
                    device_id,
                },
                n,
            )
        })
        .collect()
}

/// The per-lead frequency cap, kept out of the claim's way: a row whose lead is inside the cap
/// is due again only when the cap ends, so it is not read again by every claim until then.
/// Without this, every due row of a capped lead stayed due, and each claim, and every idle
/// tick's probe of every ready device, read all of them and passed over them (scale-bench:
/// 4,000 capped rows made an idle tick 222 ms against 12 ms; with two overlapping campaigns
/// to the same leads, which is what the cap is for, one campaign's whole backlog).
///
/// For the rows a claim just queued (`claimed`), in the claim's transaction: each of their
/// leads' other pending rows, in the tenant's running and paused campaigns, becomes due at the
/// end of the cap (found per campaign through the unique (campaign, lead) index). Tenants
/// without a cap cost one lookup of their row. The claim still checks the cap on every row it
/// takes, so a row deferred too early only waits there again. Returns how many rows moved.
pub async fn defer_capped_messages(
    tx: &mut PgConnection,
    claimed: &[WorkItem],
) -> Result<u64, RepoError> {
    let mut tenants: Vec<Uuid> = claimed.iter().map(|i| i.tenant_id).collect();
    tenants.sort_unstable();
    tenants.dedup();
    let capped: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM tenants WHERE id = ANY($1) AND lead_min_gap_s > 0")
            .bind(&tenants)
            .fetch_all(&mut *tx)
            .await?;
    if capped.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = claimed
        .iter()
        .filter(|i| capped.contains(&i.tenant_id))
        .map(|i| i.message_id)
        .collect();
    let res = sqlx::query(
        "UPDATE broadcast_messages bm SET due_at = x.until
         FROM (SELECT o.id, now() + make_interval(secs => t.lead_min_gap_s) AS until
               FROM broadcast_messages k
               JOIN tenants t ON t.id = k.tenant_id
               JOIN campaigns c ON c.tenant_id = k.tenant_id AND c.status IN ('running', 'paused')
               -- a probe of the unique (campaign, lead) index per campaign: at most one row
               CROSS JOIN LATERAL (
                   SELECT o.id FROM broadcast_messages o
                   WHERE o.campaign_id = c.id AND o.lead_id = k.lead_id
                     AND o.tenant_id = k.tenant_id AND o.id <> k.id
                     AND o.status = 'pending'
                   LIMIT 1) o
               WHERE k.id = ANY($1)) x
         WHERE bm.id = x.id AND bm.status = 'pending' COLLATE \"C\" AND bm.due_at < x.until",
    )
    .bind(&ids)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// The other half of [`defer_capped_messages`], for rows created while their lead is already
/// inside the cap (a campaign fanned out, a sequence step materialised, after another campaign
/// reached the lead): due when the cap ends. In the fan-out's transaction; nothing for tenants
/// without a cap. Returns how many rows moved.
pub async fn defer_capped_campaign_messages(
    tx: &mut PgConnection,
    tenant: Uuid,
    campaign: Uuid,
) -> Result<u64, RepoError> {
    let gap: Option<f64> = sqlx::query_scalar(
        "SELECT lead_min_gap_s FROM tenants WHERE id = $1 AND lead_min_gap_s > 0",
    )
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(gap) = gap else {
        return Ok(0);
    };
    let res = sqlx::query(
        "UPDATE broadcast_messages bm
         SET due_at = l.last_contacted_at + make_interval(secs => $3)
         FROM leads l
         WHERE bm.campaign_id = $2 AND bm.tenant_id = $1 AND bm.status = 'pending'
           AND l.id = bm.lead_id AND l.tenant_id = bm.tenant_id
           AND l.last_contacted_at > now() - make_interval(secs => $3)
           AND bm.due_at < l.last_contacted_at + make_interval(secs => $3)",
    )
    .bind(tenant)
    .bind(campaign)
    .bind(gap)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// What the worker needs to send one message.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SendJob {
    pub id: i64,
    pub tenant_id: Uuid,
    pub device_id: Uuid,
    pub recipient: String,
    pub body: String,
    pub image: Option<String>,
    pub attempts: i32,
    /// The host that holds the device's live lease (`None`: no live lease; the worker's
    /// default host takes it), and the URL it is reached at.
    pub host_id: Option<String>,
    pub host_url: Option<String>,
    /// When that lease ends unless its host renews it: the earliest moment another host may
    /// take the device over if this one cannot be reached.
    pub host_lease_until: Option<DateTime<Utc>>,
    /// Since when the workers have failed to reach that host, if they have (see
    /// `hosts::mark_unreachable`): a worker that reaches it clears this.
    pub host_unreachable_since: Option<DateTime<Utc>>,
    /// The campaign's Cloud API template, with the lead's name to render it (both only when the
    /// campaign has one).
    pub wa_template: Option<sqlx::types::Json<crate::render::WaTemplate>>,
    pub lead_name: Option<String>,
}

/// The worker's claim: `queued → sending` for the given items whose campaign is running, whose
/// device is live and not restricted, and whose lead has not opted out. Items not returned
/// were not `queued` (a duplicate delivery, or a row already finished), or are to be held or
/// skipped (see [`hold_paused_messages`], [`hold_restricted_messages`],
/// [`skip_opted_out_messages`]), and must not be sent.
///
/// The rows are found by primary key and nothing else: campaign and device are looked up per
/// row (scalar subqueries, which the planner never reorders) instead of joined. As a join,
/// without statistics (a bulk load outruns autoanalyze), the planner started from every device
/// and walked each one's in-flight rows: 0.4-1 s per batch of 10 with 25,000 rows queued, seen
/// in the benchmark with `auto_explain`. Without the join it still ANDed the primary key with a
/// scan of the whole in-flight index (see the module's note on the "C" collation). The
/// statements below that take ids from an `unnest` also name them with `bm.id = ANY($1)`.
/// What the send needs besides the row (the device's owner, its lease and reachability, the
/// campaign's template) is looked up per claimed row, after the update.
pub async fn claim_messages_for_send(
    tx: &mut PgConnection,
    items: &[WorkItem],
    lease_s: f64,
) -> Result<Vec<SendJob>, RepoError> {
    let ids: Vec<i64> = items.iter().map(|i| i.message_id).collect();
    let tenants: Vec<Uuid> = items.iter().map(|i| i.tenant_id).collect();
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH upd AS (
             UPDATE broadcast_messages bm
             SET status = 'sending', sending_at = now(), attempts = bm.attempts + 1,
                 lease_until = now() + make_interval(secs => $3)
             FROM unnest($1::bigint[], $2::uuid[]) AS w(id, tenant)
             WHERE bm.id = ANY($1) AND bm.id = w.id AND bm.tenant_id = w.tenant
               AND bm.status = 'queued' COLLATE \"C\"
               AND (SELECT c.status = 'running' FROM campaigns c
                    WHERE c.id = bm.campaign_id AND c.tenant_id = bm.tenant_id)
               -- the device is live and no restriction of it is in force (a row queued
               -- before the restriction: see `hold_restricted_messages`)
               AND (SELECT d.deleted_at IS NULL AND NOT {in_force}
                    FROM devices d
                    WHERE d.id = bm.device_id AND d.tenant_id = bm.tenant_id)
               -- the lead has not opted out (see `skip_opted_out_messages`)
               AND (SELECT l.opted_out_at FROM leads l
                    WHERE l.id = bm.lead_id AND l.tenant_id = bm.tenant_id) IS NULL
             RETURNING bm.id, bm.tenant_id, bm.device_id, bm.recipient, bm.body, bm.image,
                       bm.attempts, bm.campaign_id, bm.lead_id
         )
         SELECT u.id, u.tenant_id, u.device_id, u.recipient, u.body, u.image, u.attempts,
                o.host_id, o.url AS host_url, o.lease_until AS host_lease_until,
                o.unreachable_since AS host_unreachable_since, t.wa_template, t.lead_name
         FROM upd u
         -- one probe of the device's lease and one of its host per row (laterals: never a
         -- join the planner could start from the other side)
         LEFT JOIN LATERAL (
             SELECT dl.host_id, dl.lease_until, h.url, h.unreachable_since
             FROM device_leases dl
             LEFT JOIN LATERAL (SELECT h.url, h.unreachable_since FROM hosts h
                                WHERE h.id = dl.host_id) h ON true
             WHERE dl.device_id = u.device_id AND dl.lease_until > now()
         ) o ON true
         LEFT JOIN LATERAL (
             SELECT c.wa_template,
                    CASE WHEN c.wa_template IS NOT NULL THEN
                        (SELECT l.name FROM leads l
                         WHERE l.id = u.lead_id AND l.tenant_id = u.tenant_id)
                    END AS lead_name
             FROM campaigns c WHERE c.id = u.campaign_id AND c.tenant_id = u.tenant_id
         ) t ON true",
        in_force = super::devices::RESTRICTION_IN_FORCE
    )))
    .bind(&ids)
    .bind(&tenants)
    .bind(lease_s)
    .fetch_all(tx)
    .await?)
}

/// `queued → skipped` (reason `lead_opted_out`) for items whose lead has opted out. Returns how
/// many were skipped.
///
/// The claim before the send is the last place a STOP can be honoured, and the only one every
/// row passes: an opt-out skips the rows it can see, but a fan-out or a sequence step that read
/// the leads before the opt-out committed commits its rows after it (its campaign still
/// `scheduled` to the opt-out), and those rows would otherwise be sent.
pub async fn skip_opted_out_messages(
    tx: &mut PgConnection,
    items: &[WorkItem],
) -> Result<u64, RepoError> {
    let ids: Vec<i64> = items.iter().map(|i| i.message_id).collect();
    let tenants: Vec<Uuid> = items.iter().map(|i| i.tenant_id).collect();
    let res = sqlx::query(
        "UPDATE broadcast_messages bm
         SET status = 'skipped', reason = 'lead_opted_out', finished_at = now(), lease_until = NULL
         FROM unnest($1::bigint[], $2::uuid[]) AS w(id, tenant)
         WHERE bm.id = ANY($1) AND bm.id = w.id AND bm.tenant_id = w.tenant
           AND bm.status = 'queued' COLLATE \"C\"
           AND (SELECT l.opted_out_at FROM leads l
                WHERE l.id = bm.lead_id AND l.tenant_id = bm.tenant_id) IS NOT NULL",
    )
    .bind(&ids)
    .bind(&tenants)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// `queued → pending` for items whose campaign was paused after they were queued: they wait,
/// in order, for the campaign to resume. Returns how many were held.
pub async fn hold_paused_messages(
    tx: &mut PgConnection,
    items: &[WorkItem],
) -> Result<u64, RepoError> {
    let ids: Vec<i64> = items.iter().map(|i| i.message_id).collect();
    let tenants: Vec<Uuid> = items.iter().map(|i| i.tenant_id).collect();
    let res = sqlx::query(concat!(
        "UPDATE broadcast_messages bm SET status = 'pending', lease_until = NULL, held = true
             FROM unnest($1::bigint[], $2::uuid[]) AS w(id, tenant)
             WHERE bm.id = ANY($1) AND bm.id = w.id AND bm.tenant_id = w.tenant
               AND bm.status = 'queued' COLLATE \"C\" AND ",
        held_if_campaign_paused!()
    ))
    .bind(&ids)
    .bind(&tenants)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// `queued → pending` for items whose device has a restriction in force
/// (`devices::RESTRICTION_IN_FORCE`): rows queued before the restriction was recorded, or
/// before a host that took the device over reconnected it. They wait with the device's other
/// messages, which the processor claims again once the restriction has ended (or a person
/// lifted it). Returns how many were held.
pub async fn hold_restricted_messages(
    tx: &mut PgConnection,
    items: &[WorkItem],
) -> Result<u64, RepoError> {
    let ids: Vec<i64> = items.iter().map(|i| i.message_id).collect();
    let tenants: Vec<Uuid> = items.iter().map(|i| i.tenant_id).collect();
    let res = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE broadcast_messages bm SET status = 'pending', lease_until = NULL
         FROM unnest($1::bigint[], $2::uuid[]) AS w(id, tenant)
         WHERE bm.id = ANY($1) AND bm.id = w.id AND bm.tenant_id = w.tenant
           AND bm.status = 'queued' COLLATE \"C\"
           AND (SELECT {} FROM devices d
                WHERE d.id = bm.device_id AND d.tenant_id = bm.tenant_id)",
        super::devices::RESTRICTION_IN_FORCE
    )))
    .bind(&ids)
    .bind(&tenants)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// One accepted send: message, tenant, provider message id, when the provider accepted it.
pub type SentRecord = (i64, Uuid, String, DateTime<Utc>);

/// `sending → sent` for a batch, with each send's acceptance time; each device's pacing cursor
/// moves to (its latest acceptance + that message's gap) if that is later and still ahead. A
/// cursor that would land in the past changes nothing the claim can see (`next_send_at <=
/// now()` holds either way), so the device row is not written: with zero gaps that would be a
/// write per batch to one small, hot row that the processor's claim locks too.
///
/// Unlike the other outcomes, `sent` is written onto whichever claim the row is in: the host
/// sends a message id at most once and answers every later request for it with that first
/// send, so a `sent` is the message's outcome, not one claim's, and a later claim would only
/// be told the same.
pub async fn mark_messages_sent(
    tx: &mut PgConnection,
    sent: &[SentRecord],
) -> Result<u64, RepoError> {
    let ids: Vec<i64> = sent.iter().map(|s| s.0).collect();
    let tenants: Vec<Uuid> = sent.iter().map(|s| s.1).collect();
    let provider_ids: Vec<&str> = sent.iter().map(|s| s.2.as_str()).collect();
    let ats: Vec<DateTime<Utc>> = sent.iter().map(|s| s.3).collect();
    let n: i64 = sqlx::query_scalar(
        "WITH upd AS (
             UPDATE broadcast_messages bm
             SET status = 'sent', reason = 'accepted', sent_at = w.at, finished_at = now(),
                 provider_message_id = w.pid, lease_until = NULL
             FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::timestamptz[]) AS w(id, tenant, pid, at)
             WHERE bm.id = ANY($1) AND bm.id = w.id AND bm.tenant_id = w.tenant
               AND bm.status = 'sending' COLLATE \"C\"
             RETURNING bm.device_id, bm.tenant_id, w.at + make_interval(secs => COALESCE(bm.gap_s, 0)) AS next_at
         ), cursor AS (
             UPDATE devices d SET next_send_at = n.next_at
             FROM (SELECT device_id, tenant_id, max(next_at) AS next_at FROM upd GROUP BY 1, 2) n
             WHERE d.id = n.device_id AND d.tenant_id = n.tenant_id
               AND n.next_at > d.next_send_at AND n.next_at > now()
         )
         SELECT count(*) FROM upd",
    )
    .bind(&ids)
    .bind(&tenants)
    .bind(&provider_ids)
    .bind(&ats)
    .fetch_one(tx)
    .await?;
    Ok(n as u64)
}

/// `sending → failed` with a machine-readable reason and the provider's detail; a number that is
/// not on WhatsApp ends `skipped` instead (nothing was wrong with the send, there is no one to
/// send to).
///
/// Only onto the claim the outcome belongs to: `attempt` is the row's `attempts` as that claim
/// left it (`SendJob::attempts`). A worker's answer that comes after the rescuer moved its row
/// on and another worker claimed it again would otherwise end that claim, whose send may be
/// under way. (`sent` needs no such check, see [`mark_messages_sent`].)
///
/// The claim is fenced at the host's send record first, and the row is left `sending` if a
/// send of this claim was started after all (see [`NO_SEND_OF_THIS_CLAIM`]).
pub async fn mark_message_failed(
    tx: &mut PgConnection,
    tenant: Uuid,
    id: i64,
    attempt: i32,
    reason: &str,
    detail: &str,
) -> Result<bool, RepoError> {
    super::host_sends::fence_unattempted_claims(tx, Some(tenant), &[id], Some(attempt)).await?;
    let res = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE broadcast_messages bm
         SET status = CASE WHEN $3 = 'not_on_whatsapp' THEN 'skipped' ELSE 'failed' END,
             reason = $3, last_error = $4, finished_at = now(), lease_until = NULL
         WHERE id = $1 AND tenant_id = $2 AND status = 'sending' COLLATE \"C\"
           AND attempts = $5 AND {NO_SEND_OF_THIS_CLAIM}"
    )))
    .bind(id)
    .bind(tenant)
    .bind(reason)
    .bind(detail)
    .bind(attempt)
    .execute(tx)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// `sending → pending` after a transient error, due again at `due_at` (backoff chosen by caller).
/// `tried = false` (the message was held back, never offered to the provider) gives the claim's
/// attempt back, so only real attempts count towards the limit.
///
/// A row whose campaign (or sequence) was cancelled while it was `sending` then goes on
/// `pending → cancelled` in the same transaction (see [`cancel_retried_messages`]): the cancel
/// left it alone, and nothing else would ever end it. The caller must commit both together.
///
/// Only onto the claim `attempt` (the row's `attempts` as that claim left it), as
/// [`mark_message_failed`]: put back to `pending` under a later claim whose send is under way,
/// the row could be cancelled or skipped while that send goes out. Fenced, and left `sending`
/// if a send of this claim was started after all, as [`mark_message_failed`].
#[allow(clippy::too_many_arguments)]
pub async fn mark_message_retry(
    tx: &mut PgConnection,
    tenant: Uuid,
    id: i64,
    attempt: i32,
    due_at: DateTime<Utc>,
    error: &str,
    tried: bool,
) -> Result<bool, RepoError> {
    lock_campaigns_of_messages(tx, Some(tenant), &[id]).await?;
    super::host_sends::fence_unattempted_claims(tx, Some(tenant), &[id], Some(attempt)).await?;
    let res = sqlx::query(sqlx::AssertSqlSafe(format!(
        concat!(
            "UPDATE broadcast_messages bm
             SET status = 'pending', due_at = $3, last_error = $4, lease_until = NULL,
                 attempts = CASE WHEN $5 THEN attempts ELSE attempts - 1 END,
                 held = ",
            held_if_campaign_paused!(),
            "
             WHERE id = $1 AND tenant_id = $2 AND status = 'sending' COLLATE \"C\"
               AND attempts = $6 AND {}"
        ),
        NO_SEND_OF_THIS_CLAIM
    )))
    .bind(id)
    .bind(tenant)
    .bind(due_at)
    .bind(error)
    .bind(tried)
    .bind(attempt)
    .execute(&mut *tx)
    .await?;
    if res.rows_affected() == 0 {
        return Ok(false);
    }
    cancel_retried_messages(tx, &[id]).await?;
    Ok(true)
}

/// A `sending` row `bm` for which no send of its current claim was started: a worker's answer
/// for its claim (a transient error, a refusal) can come from a request that never recorded an
/// attempt (refused before it, or the host's records failed), while a late request of an
/// earlier claim, which found the row `sending`, started one for this claim. That send decides:
/// the row stays `sending`, and the rescuer reconciles it with the host's record. Checked after
/// the claim was fenced, which waits for an attempt being recorded at that moment.
const NO_SEND_OF_THIS_CLAIM: &str = "NOT EXISTS (
    SELECT 1 FROM host_sends h
    WHERE h.message_id = bm.id AND h.tenant_id = bm.tenant_id AND h.claim = bm.enqueue_count
      AND h.state IN ('attempting', 'sent'))";

/// Share-locks the campaigns of these rows, in id order, for a transaction that is about to put
/// `sending` rows back to `pending`. A cancel locks its campaign (or a sequence its steps)
/// before it cancels the `pending` and `queued` rows, and leaves `sending` ones alone: with the
/// lock taken first, a cancel under way is waited for and its status seen, and a cancel that
/// comes later waits for this transaction and then finds the rows `pending`. Checked without
/// the lock, a cancel committing in between would leave a row `pending` under a cancelled
/// campaign for good. `tenant` is `None` for the system-scope rescuer.
async fn lock_campaigns_of_messages(
    tx: &mut PgConnection,
    tenant: Option<Uuid>,
    ids: &[i64],
) -> Result<(), RepoError> {
    sqlx::query(
        "SELECT c.id FROM campaigns c
         WHERE c.id IN (SELECT bm.campaign_id FROM broadcast_messages bm
                        WHERE bm.id = ANY($1) AND bm.tenant_id = c.tenant_id
                          AND ($2::uuid IS NULL OR bm.tenant_id = $2))
         ORDER BY c.id
         FOR SHARE",
    )
    .bind(ids)
    .bind(tenant)
    .execute(tx)
    .await?;
    Ok(())
}

/// `pending → cancelled` for rows just put back to `pending` whose campaign is cancelled, with
/// the cancel's own reason (`sequence_cancelled` for a sequence's step). Only after
/// [`lock_campaigns_of_messages`] in the same transaction.
async fn cancel_retried_messages(tx: &mut PgConnection, ids: &[i64]) -> Result<u64, RepoError> {
    let res = sqlx::query(
        "UPDATE broadcast_messages bm
         SET status = 'cancelled', finished_at = now(), lease_until = NULL,
             reason = CASE WHEN c.sequence_id IS NULL THEN $2 ELSE $3 END
         FROM campaigns c
         WHERE bm.id = ANY($1) AND bm.status = 'pending' COLLATE \"C\"
           AND c.id = bm.campaign_id AND c.tenant_id = bm.tenant_id AND c.status = 'cancelled'",
    )
    .bind(ids)
    .bind(reason::CAMPAIGN_CANCELLED)
    .bind(reason::SEQUENCE_CANCELLED)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// System scope: rows `queued` past their lease were lost between the processor's commit and
/// the queue (or in the queue). They are enqueued again with a fresh lease; the worker's
/// conditional claim makes a late original delivery harmless.
pub async fn requeue_stale_queued(
    tx: &mut PgConnection,
    limit: i64,
    lease_s: f64,
) -> Result<Vec<ClaimedItem>, RepoError> {
    let rows: Vec<(i64, Uuid, Uuid, i32)> = sqlx::query_as(
        "UPDATE broadcast_messages bm
         SET lease_until = now() + make_interval(secs => $2), enqueue_count = bm.enqueue_count + 1
         WHERE bm.id IN (
             SELECT id FROM broadcast_messages
             WHERE status = 'queued' AND lease_until < now()
             ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED)
           AND bm.status = 'queued' COLLATE \"C\"
         RETURNING bm.id, bm.tenant_id, bm.device_id, bm.enqueue_count",
    )
    .bind(limit)
    .bind(lease_s)
    .fetch_all(tx)
    .await?;
    Ok(to_items(rows))
}

/// System scope: the queue refused these items right after their claim or requeue: the rows
/// still `queued` in that enqueue (`enqueue_count`) become the rescuer's after `after_s`
/// instead of their whole lease ([`requeue_stale_queued`] enqueues them then). A row enqueued
/// again meanwhile, or claimed by a worker (the refusal may have been an answer lost after the
/// queue took it), is left alone. Returns how many rows were cut short.
pub async fn retry_enqueue_after(
    conn: &mut PgConnection,
    items: &[ClaimedItem],
    after_s: f64,
) -> Result<u64, RepoError> {
    let ids: Vec<i64> = items.iter().map(|(i, _)| i.message_id).collect();
    let tenants: Vec<Uuid> = items.iter().map(|(i, _)| i.tenant_id).collect();
    let counts: Vec<i32> = items.iter().map(|(_, n)| *n).collect();
    let res = sqlx::query(
        "UPDATE broadcast_messages bm
         SET lease_until = LEAST(bm.lease_until, now() + make_interval(secs => $4))
         FROM unnest($1::bigint[], $2::uuid[], $3::int[]) AS w(id, tenant, n)
         WHERE bm.id = ANY($1) AND bm.id = w.id AND bm.tenant_id = w.tenant
           AND bm.enqueue_count = w.n AND bm.status = 'queued' COLLATE \"C\"",
    )
    .bind(&ids)
    .bind(&tenants)
    .bind(&counts)
    .bind(after_s)
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// What the rescuer did with rows stuck in `sending`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub sent: u64,
    pub failed: u64,
    pub retried: u64,
    pub exhausted: u64,
    /// Of the `retried`, those whose campaign (or sequence) was cancelled meanwhile: they went
    /// on from `pending` to `cancelled`.
    pub cancelled: u64,
    /// Of all the rows above, those taken before their lease because no host was on them (see
    /// [`reconcile_stale_sending`]).
    pub host_lost: u64,
    /// Rows past their lease that their host is still sending: left `sending`, with a new
    /// lease (see [`reconcile_stale_sending`]).
    pub renewed: u64,
}

/// How long a host may be on one attempt and still be taken for sending it (10 minutes): more
/// than any send takes (typing for at most a few seconds, an upload of at most 5 MB, the
/// provider's own timeouts). The rescuer leaves a `sending` row past its lease to a live host's
/// attempt this long; an attempt older than that is taken for hung, and its row is reconciled
/// as one whose host gave no outcome.
pub const LIVE_ATTEMPT_MAX_S: f64 = 600.0;

/// When the rescuer may reconcile a `sending` row before its own lease ends (see
/// [`reconcile_stale_sending`]).
#[derive(Debug, Clone, Copy)]
pub struct HostLost {
    /// The worker's host timeout (`HOST_TIMEOUT_S`): a row claimed longer ago than this has had
    /// its answer, or will never get one.
    pub settled_s: f64,
}

/// System scope: rows `sending` past their lease are reconciled with the host's send record:
/// sent there → `sent` (no second send); failed there → `failed`; otherwise back to `pending`
/// with a backoff (and on to `cancelled` if its campaign was cancelled meanwhile, as in
/// [`mark_message_retry`]), or `failed / attempts_exhausted` once `max_attempts` were spent. At most
/// `limit` rows per call, the longest overdue first.
///
/// Except a row its host is still sending: the attempt is recorded (`attempting`) by the host
/// that holds the device's lease now, and began less than [`LIVE_ATTEMPT_MAX_S`] ago. The host
/// runs a send to its end whether or not the worker still waits (a long upload, a slow
/// network), so that row gets a new lease of `lease_s` and stays `sending`, which a cancel
/// leaves alone; the host's record then says how it ended. Put back to `pending`, it could be
/// cancelled, or end `attempts_exhausted`, and then go out all the same.
///
/// So is, before its own lease, a row claimed longer ago than the worker waits for an answer
/// (`host_lost.settled_s`: its worker got no answer, or the row would not be `sending`) that no
/// host is sending: the host's record says how the send ended, or the attempt was recorded by a
/// host that no longer holds the device's lease (it died, or stopped renewing, and nobody or
/// another host holds the device now), which cannot be sending it any more, or no host recorded
/// an attempt at all (the request never got that far: a host that died, or hung, before it).
/// The row's own lease is the worker's (two minutes), and a paced device sends nothing while a
/// row of it is in flight: waiting for that lease stalled the device of every request a killed
/// host had in flight for two minutes instead of the device lease (the paced benchmark with
/// 1.5 s sends: 160 rows, stalls up to 150 s).
///
/// Whichever pass moves a row on, a request of its claim that reaches a host afterwards sends
/// nothing: a claim with no attempt recorded is fenced at the host's send record in this
/// transaction (`host_sends::fence_unattempted_claims`), and any other record already stops
/// that claim from starting an attempt.
///
/// The stale rows are found first, through the in-flight lease index, and every update is
/// then restricted to their ids: the common case (nothing stale) costs one index probe, and no
/// plan can start from `host_sends` or from every message (a join the planner chose with
/// stale statistics, and paid a second per call for at 100,000 rows).
pub async fn reconcile_stale_sending(
    tx: &mut PgConnection,
    max_attempts: i32,
    retry_after_s: f64,
    limit: i64,
    lease_s: f64,
    host_lost: Option<HostLost>,
) -> Result<Reconciled, RepoError> {
    let stale: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM broadcast_messages
         WHERE status = 'sending' AND lease_until < now()
         ORDER BY lease_until LIMIT $1
         FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    // Through the in-flight lease index too: a row's lease ends `lease_s` after its claim, so
    // the rows claimed more than `settled_s` ago are a range of it (few live ones, unless hosts
    // are lost; `None` skips this). Judged by this statement's snapshot too, so that rows a host
    // is on do not fill the `LIMIT`; judged again below.
    let candidates: Vec<i64> = match host_lost {
        Some(host_lost) if (stale.len() as i64) < limit => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT bm.id FROM broadcast_messages bm
                 WHERE bm.status = 'sending' AND bm.lease_until >= now()
                   AND bm.lease_until < now() + make_interval(secs => $2 - $3)
                   AND bm.sending_at < now() - make_interval(secs => $3)
                   AND {NO_HOST_ON_IT}
                 ORDER BY bm.lease_until LIMIT $1
                 FOR UPDATE SKIP LOCKED"
            )))
            .bind(limit - stale.len() as i64)
            .bind(lease_s)
            .bind(host_lost.settled_s)
            .fetch_all(&mut *tx)
            .await?
        }
        _ => Vec::new(),
    };
    // Every row about to be judged is fenced at the host's send record first: a request of
    // its claim that reaches a host after this transaction starts nothing. A host recording
    // an attempt for one of them right now is waited for (the two meet on `host_sends`' key),
    // and the statements below, each with a snapshot taken after this one, see that attempt:
    // such a row stays `sending` (renewed, or left to its host).
    let locked: Vec<i64> = stale.iter().chain(&candidates).copied().collect();
    super::host_sends::fence_unattempted_claims(tx, None, &locked, None).await?;
    let renewed = renew_live_attempts(tx, &stale, lease_s).await?;
    let mut stale: Vec<i64> = stale
        .into_iter()
        .filter(|id| !renewed.contains(id))
        .collect();
    let renewed = renewed.len() as u64;
    let lost: Vec<i64> = if candidates.is_empty() {
        Vec::new()
    } else {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT bm.id FROM broadcast_messages bm
             WHERE bm.id = ANY($1) AND bm.status = 'sending' COLLATE \"C\" AND {NO_HOST_ON_IT}"
        )))
        .bind(&candidates)
        .fetch_all(&mut *tx)
        .await?
    };
    let host_lost = lost.len() as u64;
    stale.extend(lost);
    let done = reconcile_sending(tx, stale, max_attempts, retry_after_s, host_lost).await?;
    Ok(Reconciled { renewed, ..done })
}

/// A `sending` row `bm` that no host is on: no attempt of it is recorded `attempting` by the
/// host that holds its device's lease (see [`reconcile_stale_sending`]).
const NO_HOST_ON_IT: &str = "NOT EXISTS (
    SELECT 1 FROM host_sends h
    WHERE h.message_id = bm.id AND h.tenant_id = bm.tenant_id AND h.state = 'attempting'
      AND EXISTS (SELECT 1 FROM device_leases dl
                  WHERE dl.device_id = bm.device_id AND dl.host_id = h.host_id
                    AND dl.lease_until > now()))";

/// Of the `sending` rows `stale` (locked by the caller), those whose attempt their host is
/// still on (see [`reconcile_stale_sending`]) get a lease of `lease_s` from now. Returns them.
async fn renew_live_attempts(
    tx: &mut PgConnection,
    stale: &[i64],
    lease_s: f64,
) -> Result<Vec<i64>, RepoError> {
    if stale.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "UPDATE broadcast_messages bm SET lease_until = now() + make_interval(secs => $2)
         FROM host_sends h
         WHERE bm.id = ANY($1) AND h.message_id = ANY($1)
           AND h.message_id = bm.id AND h.tenant_id = bm.tenant_id
           AND bm.status = 'sending' COLLATE \"C\"
           AND h.state = 'attempting'
           AND h.updated_at > now() - make_interval(secs => $3)
           AND EXISTS (SELECT 1 FROM device_leases dl
                       WHERE dl.device_id = bm.device_id AND dl.host_id = h.host_id
                         AND dl.lease_until > now())
         RETURNING bm.id",
    )
    .bind(stale)
    .bind(lease_s)
    .bind(LIVE_ATTEMPT_MAX_S)
    .fetch_all(tx)
    .await?)
}

/// [`reconcile_stale_sending`]'s writes, for the rows it locked.
async fn reconcile_sending(
    tx: &mut PgConnection,
    stale: Vec<i64>,
    max_attempts: i32,
    retry_after_s: f64,
    host_lost: u64,
) -> Result<Reconciled, RepoError> {
    if stale.is_empty() {
        return Ok(Reconciled::default());
    }
    // Before any row goes back to `pending`: see `lock_campaigns_of_messages`.
    lock_campaigns_of_messages(tx, None, &stale).await?;
    let sent = sqlx::query(
        "UPDATE broadcast_messages bm
         SET status = 'sent', reason = 'accepted', sent_at = h.updated_at, finished_at = now(),
             provider_message_id = h.provider_message_id, lease_until = NULL
         FROM host_sends h
         WHERE bm.id = ANY($1) AND h.message_id = bm.id AND h.tenant_id = bm.tenant_id
           AND h.state = 'sent' AND bm.status = 'sending' COLLATE \"C\"",
    )
    .bind(&stale)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let failed = sqlx::query(
        "UPDATE broadcast_messages bm
         SET status = CASE WHEN h.error = 'not_on_whatsapp' THEN 'skipped' ELSE 'failed' END,
             reason = COALESCE(h.error, 'provider_refused'), finished_at = now(),
             lease_until = NULL
         FROM host_sends h
         WHERE bm.id = ANY($1) AND h.message_id = bm.id AND h.tenant_id = bm.tenant_id
           AND h.state = 'failed' AND bm.status = 'sending' COLLATE \"C\"",
    )
    .bind(&stale)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let exhausted = sqlx::query(
        "UPDATE broadcast_messages bm
         SET status = 'failed', reason = 'attempts_exhausted', finished_at = now(), lease_until = NULL,
             last_error = COALESCE(bm.last_error, 'no answer from the device host')
         WHERE bm.id = ANY($1) AND bm.status = 'sending' COLLATE \"C\" AND bm.attempts >= $2",
    )
    .bind(&stale)
    .bind(max_attempts)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let retried = sqlx::query(concat!(
        "UPDATE broadcast_messages bm
             SET status = 'pending', due_at = now() + make_interval(secs => $2),
                 lease_until = NULL,
                 last_error = 'no outcome recorded for the send; reconciled with the host',
                 held = ",
        held_if_campaign_paused!(),
        "
             WHERE bm.id = ANY($1) AND bm.status = 'sending' COLLATE \"C\""
    ))
    .bind(&stale)
    .bind(retry_after_s)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let cancelled = if retried > 0 {
        cancel_retried_messages(tx, &stale).await?
    } else {
        0
    };
    Ok(Reconciled {
        cancelled,
        sent,
        failed,
        retried,
        exhausted,
        host_lost,
        renewed: 0,
    })
}

/// The sweeps below find their devices first and name them on the messages themselves
/// (`bm.device_id = ANY(…)`), so that every index the planner may pick holds the device,
/// whatever its statistics say, and a sweep with no device to act on costs one small query.
/// Joined to the devices instead, a planner with stale statistics walked every pending message
/// of the running campaigns and looked each device up: 8 s per sweep at 100,000 pending rows,
/// once per tick.
///
/// A device is offline by its own status (since it last changed), or because no host serves it:
/// a lease that ran out and nobody took over (its host died, or stopped, and every other host is
/// full or there is none), counted from the moment the lease ran out. The status such a device
/// shows is the last one its host wrote (often `online`): nobody is left to write another, so
/// the lease is the only witness. A device that never had a host has no lease and is judged by
/// its status alone (a host writes every status, and a new device starts `offline`).
///
/// A lease that ran out while the processors could not reach the database (an outage, a
/// failover) is no witness either: no host could renew it. Its end counts only from the
/// processors' return ([`note_processor_tick`]) plus the settling time (`settle_s`, the hosts'
/// longest device lease), time for every live host to renew its leases. Before, the first tick after an
/// outage longer than the grace skipped every due message of every device.
const OFFLINE_PAST_GRACE: &str = "d.deleted_at IS NULL
    AND ((d.status IN ('offline', 'connecting', 'reconnecting', 'awaiting_pairing', 'logged_out', 'stopped')
          AND d.status_changed_at <= now() - make_interval(secs => $1))
         OR d.id IN (SELECT device_id FROM device_leases
                     WHERE GREATEST(lease_until,
                                    (SELECT resumed_at + make_interval(secs => settle_s)
                                     FROM processor_liveness))
                           <= now() - make_interval(secs => $1)))";

/// The gaps between processor ticks that [`note_processor_tick`] marks, and what follows them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TickGaps {
    /// Longer than this, an outage: the rescuer settles. Two thirds of the shortest device
    /// lease a host holds devices by, and three ticks: a host renews its leases every third of
    /// a lease, so a shorter outage cannot make a live host's lease run out; and nothing else
    /// stops every processor (an invocation runs a little longer than the schedule's minute, so
    /// they overlap).
    pub outage_s: f64,
    /// Longer than this (at least `outage_s`), an outage longer than the offline grace: the
    /// offline judgement settles too. Only such a gap can make a live host's lease look run out
    /// for longer than the grace (it was renewed before the outage, so it ran out less than the
    /// outage ago).
    pub past_grace_s: f64,
    /// How long either settles: the longest device lease a host holds devices by. Every live
    /// host renews within a third of its lease, and a host back from an outage takes no other
    /// host's device for a whole lease.
    pub settle_s: f64,
}

impl TickGaps {
    /// The gaps for processors that tick every `tick_s` and judge devices offline after
    /// `offline_grace_s`, whose hosts hold their devices by leases from `shortest_lease_s` to
    /// `longest_lease_s` (as the hosts record them: `hosts::device_lease_span`).
    pub fn new(
        tick_s: f64,
        offline_grace_s: f64,
        shortest_lease_s: f64,
        longest_lease_s: f64,
    ) -> Self {
        let outage_s = (shortest_lease_s * 2.0 / 3.0).max(3.0 * tick_s);
        Self {
            outage_s,
            past_grace_s: outage_s.max(offline_grace_s),
            settle_s: longest_lease_s.max(shortest_lease_s),
        }
    }
}

/// What a processor tick learnt of the processors' continuity ([`note_processor_tick`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// No processor had reached the database for longer than the offline grace before this
    /// tick: an outage that long ended.
    pub resumed: bool,
    /// Within the settling time after the latest such return (`TickGaps::settle_s`): device
    /// leases may have run out for longer than the grace only because no host could renew
    /// them. The offline judgement by lease waits.
    pub settling: bool,
    /// No processor had reached the database for `TickGaps::outage_s` before this tick: an
    /// outage of any length ended (true also when `resumed` is).
    pub back: bool,
    /// Within the settling time after the latest return from any outage, however short: a
    /// `sending` row's host may not have renewed its lease yet. The rescuer leaves such rows.
    pub rescue_settling: bool,
}

/// System scope: one processor tick reached the database. A tick after no tick for
/// `gaps.outage_s` marks the processors' return from an outage (`back_at`), after no tick for
/// `gaps.past_grace_s` from one longer than the grace (`resumed_at` too); the first tick ever
/// marks none. Run it in autocommit, not inside a sweep: concurrent processors wait for this
/// row only as long as it takes to write. The settling time is stored with the marks, for
/// the offline judgement ([`OFFLINE_PAST_GRACE`]) to read.
pub async fn note_processor_tick(
    conn: &mut PgConnection,
    gaps: TickGaps,
) -> Result<Liveness, RepoError> {
    let (resumed, settling, back, rescue_settling): (bool, bool, bool, bool) = sqlx::query_as(
        "INSERT INTO processor_liveness (last_tick_at, resumed_at, back_at, settle_s)
         VALUES (now(), '-infinity', '-infinity', $3)
         ON CONFLICT (id) DO UPDATE SET
             resumed_at = CASE
                 WHEN processor_liveness.last_tick_at < now() - make_interval(secs => $1)
                 THEN now() ELSE processor_liveness.resumed_at END,
             back_at = CASE
                 WHEN processor_liveness.last_tick_at < now() - make_interval(secs => $2)
                 THEN now() ELSE processor_liveness.back_at END,
             last_tick_at = GREATEST(processor_liveness.last_tick_at, now()),
             settle_s = $3
         RETURNING resumed_at = now(),
                   resumed_at + make_interval(secs => settle_s) > now(),
                   back_at = now(),
                   back_at + make_interval(secs => settle_s) > now()",
    )
    .bind(gaps.past_grace_s.max(gaps.outage_s))
    .bind(gaps.outage_s)
    .bind(gaps.settle_s)
    .fetch_one(conn)
    .await?;
    Ok(Liveness {
        resumed,
        settling,
        back,
        rescue_settling,
    })
}

/// System scope: while the processors are settling after a return from an outage of the
/// database ([`note_processor_tick`]), when they came back and until when a device lease that
/// ran out before that says nothing of its host (`back_at` plus the settling time: the hosts
/// are renewing). `None` outside that time.
pub async fn outage_settling(
    pool: &PgPool,
) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT back_at, back_at + make_interval(secs => settle_s) FROM processor_liveness
         WHERE back_at + make_interval(secs => settle_s) > now()",
    )
    .fetch_optional(pool)
    .await?)
}

/// System scope: unsent rows of deleted devices end `skipped / device_deleted`.
pub async fn skip_deleted_device_messages(tx: &mut PgConnection) -> Result<u64, RepoError> {
    let devices: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM devices WHERE deleted_at IS NOT NULL")
            .fetch_all(&mut *tx)
            .await?;
    if devices.is_empty() {
        return Ok(0);
    }
    let res = sqlx::query(
        "UPDATE broadcast_messages bm
         SET status = 'skipped', reason = 'device_deleted', finished_at = now(), lease_until = NULL
         FROM devices d
         WHERE bm.device_id = ANY($1) AND d.id = bm.device_id AND d.tenant_id = bm.tenant_id
           AND d.deleted_at IS NOT NULL
           -- OR, not IN: each arm implies a partial index (`bm_claim`, `bm_device_in_flight`);
           -- as IN, no index qualifies and this read the whole table every tick
           AND (bm.status = 'pending' OR bm.status = 'queued')",
    )
    .bind(&devices)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// System scope: due rows of running campaigns whose device has been disconnected, or left
/// without a host, for longer than `grace_s` end `skipped / device_offline`. Within the grace
/// they simply wait. A `restricted` device is not offline while a host serves it: its messages
/// wait for the restriction to end.
pub async fn skip_offline_device_messages(
    tx: &mut PgConnection,
    grace_s: f64,
) -> Result<u64, RepoError> {
    let devices: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM devices d WHERE {OFFLINE_PAST_GRACE}"
    )))
    .bind(grace_s)
    .fetch_all(&mut *tx)
    .await?;
    if devices.is_empty() {
        return Ok(0);
    }
    // The device's condition is checked again here: it may have come online meanwhile.
    let res = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE broadcast_messages bm
         SET status = 'skipped', reason = 'device_offline', finished_at = now()
         FROM devices d, campaigns c
         WHERE bm.device_id = ANY($2) AND d.id = bm.device_id AND d.tenant_id = bm.tenant_id
           AND {OFFLINE_PAST_GRACE}
           AND bm.status = 'pending' AND NOT bm.held AND bm.due_at <= now()
           AND c.id = bm.campaign_id AND c.tenant_id = bm.tenant_id AND c.status = 'running'"
    )))
    .bind(grace_s)
    .bind(&devices)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// System scope: a host the workers have failed to reach for longer than `grace_s` while it
/// still holds its devices' leases (it renews them, so no other host may take the devices over).
/// Its devices' pending messages of running campaigns that themselves found it unreachable
/// (their last error) end `skipped / host_unreachable`; a message not yet tried waits for its
/// own attempt, so a host that became reachable again meanwhile is not given up on unseen.
/// The outage is the workers' record (`hosts::mark_unreachable`); any answer ends it.
pub async fn skip_unreachable_host_messages(
    tx: &mut PgConnection,
    grace_s: f64,
) -> Result<u64, RepoError> {
    let devices: Vec<Uuid> = sqlx::query_scalar(
        "SELECT dl.device_id FROM hosts h JOIN device_leases dl ON dl.host_id = h.id
         WHERE h.unreachable_since <= now() - make_interval(secs => $1)
           AND dl.lease_until > now()",
    )
    .bind(grace_s)
    .fetch_all(&mut *tx)
    .await?;
    if devices.is_empty() {
        return Ok(0);
    }
    // The host's condition is checked again here: a worker may have reached it meanwhile.
    let res = sqlx::query(
        "UPDATE broadcast_messages bm
         SET status = 'skipped', reason = 'host_unreachable', finished_at = now()
         FROM device_leases dl, hosts h, campaigns c
         WHERE bm.device_id = ANY($2) AND dl.device_id = bm.device_id AND dl.lease_until > now()
           AND h.id = dl.host_id AND h.unreachable_since <= now() - make_interval(secs => $1)
           AND bm.status = 'pending' AND NOT bm.held AND bm.last_error LIKE 'host_unreachable%'
           AND c.id = bm.campaign_id AND c.tenant_id = bm.tenant_id AND c.status = 'running'",
    )
    .bind(grace_s)
    .bind(&devices)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// A delivery or read receipt from a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    pub tenant_id: Uuid,
    pub message_id: i64,
    pub read: bool,
    pub at: DateTime<Utc>,
}

/// Applies receipts as a monotone max: the earliest time of each kind wins, a read implies
/// delivered, and a late or repeated receipt never moves a time backwards or clears it.
pub async fn apply_receipts(tx: &mut PgConnection, receipts: &[Receipt]) -> Result<u64, RepoError> {
    let tenants: Vec<Uuid> = receipts.iter().map(|r| r.tenant_id).collect();
    let ids: Vec<i64> = receipts.iter().map(|r| r.message_id).collect();
    let reads: Vec<bool> = receipts.iter().map(|r| r.read).collect();
    let ats: Vec<DateTime<Utc>> = receipts.iter().map(|r| r.at).collect();
    let res = sqlx::query(
        "UPDATE broadcast_messages bm
         SET delivered_at = LEAST(COALESCE(bm.delivered_at, r.delivered), r.delivered),
             read_at = CASE WHEN r.read IS NULL THEN bm.read_at
                            ELSE LEAST(COALESCE(bm.read_at, r.read), r.read) END
         FROM (SELECT t, id, min(at) AS delivered, min(at) FILTER (WHERE is_read) AS read
               FROM unnest($1::uuid[], $2::bigint[], $3::bool[], $4::timestamptz[]) AS u(t, id, is_read, at)
               GROUP BY t, id) r
         WHERE bm.id = ANY($2) AND bm.id = r.id AND bm.tenant_id = r.t",
    )
    .bind(&tenants)
    .bind(&ids)
    .bind(&reads)
    .bind(&ats)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// One message's row, for tests, reports and the CLI.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub id: i64,
    pub tenant_id: Uuid,
    pub device_id: Uuid,
    pub lead_id: i64,
    pub campaign_id: Uuid,
    pub recipient: String,
    pub body: String,
    pub image: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub attempts: i32,
    pub enqueue_count: i32,
    pub created_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub provider_message_id: Option<String>,
    pub queued_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

const MESSAGE_COLUMNS: &str = "id, tenant_id, device_id, lead_id, campaign_id, recipient, body,
    image, status, reason, attempts, enqueue_count, created_at, due_at, provider_message_id,
    queued_at, sent_at, delivered_at, read_at, last_error";

pub async fn list_campaign_messages(
    pool: &PgPool,
    tenant: Uuid,
    campaign: Uuid,
) -> Result<Vec<MessageRow>, RepoError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {MESSAGE_COLUMNS}
         FROM broadcast_messages WHERE campaign_id = $1 AND tenant_id = $2 ORDER BY id"
    )))
    .bind(campaign)
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}

/// One recipient's message in a campaign's listing (`wabcast campaign messages`): who, through
/// which device, what became of it and why.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RecipientMessage {
    pub id: i64,
    pub lead_id: i64,
    pub recipient: String,
    pub lead_name: String,
    pub device_id: Uuid,
    pub device_label: String,
    pub status: String,
    pub reason: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub provider_message_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Which of a campaign's messages [`list_campaign_recipients`] returns; `None` is any.
#[derive(Debug, Clone, Default)]
pub struct RecipientFilter {
    pub status: Option<crate::domain::MessageStatus>,
    pub reason: Option<String>,
    pub device: Option<Uuid>,
}

/// A page of a campaign's messages in lead order: those of leads after `after_lead`, at most
/// `limit`. The page is read along the (campaign, lead) unique index, so a page costs what it
/// returns (plus the rows a filter passes over), however large the table; lead and device are
/// looked up per row of the page, never joined before the limit.
pub async fn list_campaign_recipients(
    pool: &PgPool,
    tenant: Uuid,
    campaign: Uuid,
    filter: &RecipientFilter,
    after_lead: i64,
    limit: i64,
) -> Result<Vec<RecipientMessage>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT bm.id, bm.lead_id, bm.recipient, COALESCE(l.name, '') AS lead_name, bm.device_id,
                COALESCE(d.label, '') AS device_label, bm.status, bm.reason, bm.attempts,
                bm.last_error, bm.provider_message_id, bm.created_at, bm.queued_at, bm.sent_at,
                bm.delivered_at, bm.read_at, bm.finished_at
         FROM (SELECT m.id, m.tenant_id, m.lead_id, m.recipient, m.device_id, m.status, m.reason,
                      m.attempts, m.last_error, m.provider_message_id, m.created_at, m.queued_at,
                      m.sent_at, m.delivered_at, m.read_at, m.finished_at
               FROM broadcast_messages m
               WHERE m.campaign_id = $1 AND m.tenant_id = $2 AND m.lead_id > $3
                 AND ($4::text IS NULL OR m.status = $4)
                 AND ($5::text IS NULL OR m.reason = $5)
                 AND ($6::uuid IS NULL OR m.device_id = $6)
               ORDER BY m.lead_id
               LIMIT $7) bm
         LEFT JOIN LATERAL (SELECT l.name FROM leads l
                            WHERE l.id = bm.lead_id AND l.tenant_id = bm.tenant_id) l ON true
         LEFT JOIN LATERAL (SELECT d.label FROM devices d
                            WHERE d.id = bm.device_id AND d.tenant_id = bm.tenant_id) d ON true
         ORDER BY bm.lead_id",
    )
    .bind(campaign)
    .bind(tenant)
    .bind(after_lead)
    .bind(filter.status.map(|s| s.as_str()))
    .bind(filter.reason.as_deref())
    .bind(filter.device)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// One message of the tenant; another tenant's id is not found.
pub async fn get_message(pool: &PgPool, tenant: Uuid, id: i64) -> Result<MessageRow, RepoError> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {MESSAGE_COLUMNS} FROM broadcast_messages WHERE id = $1 AND tenant_id = $2"
    )))
    .bind(id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?
    .ok_or(RepoError::NotFound("message"))
}

/// A message to a number, with what names its campaign and device.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NumberMessage {
    pub id: i64,
    pub created_at: DateTime<Utc>,
    pub campaign_id: Uuid,
    pub campaign_title: String,
    pub device_label: String,
    pub status: String,
    pub reason: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
}

/// The newest `limit` messages of the tenant to a number, on any of its devices (what answers
/// "I said STOP and still got a message"). No index has rows by lead alone, so each of the
/// tenant's campaigns is probed through the (campaign, lead) unique index for the number's few
/// leads: a lateral, never a join the planner could start from the message table.
pub async fn list_messages_to_number(
    pool: &PgPool,
    tenant: Uuid,
    phone: &crate::domain::PhoneE164,
    limit: i64,
) -> Result<Vec<NumberMessage>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT m.id, m.created_at, c.id AS campaign_id, c.title AS campaign_title,
                d.label AS device_label, m.status, m.reason, m.sent_at, m.delivered_at, m.read_at
         FROM leads l
         JOIN devices d ON d.id = l.device_id AND d.tenant_id = l.tenant_id
         CROSS JOIN campaigns c
         CROSS JOIN LATERAL (
             SELECT bm.id, bm.created_at, bm.status, bm.reason, bm.sent_at, bm.delivered_at,
                    bm.read_at
             FROM broadcast_messages bm
             WHERE bm.campaign_id = c.id AND bm.lead_id = l.id AND bm.tenant_id = l.tenant_id
             -- at most one row (unique (campaign, lead)); the LIMIT keeps the planner from
             -- pulling the subquery up into a join it may start from the table's whole scan
             LIMIT 1
         ) m
         WHERE l.tenant_id = $1 AND l.phone = $2 AND c.tenant_id = $1
         ORDER BY m.created_at DESC, m.id DESC
         LIMIT $3",
    )
    .bind(tenant)
    .bind(phone.as_str())
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Re-renders every unsent message of a campaign (a campaign of its own or a sequence's step)
/// with `template` (spintax drawn anew per recipient) and sets its image; call it in the
/// transaction that changed the campaign (`campaigns::update_campaign`) or the step
/// (`sequences::update_step`). Returns how many rows changed.
pub async fn rerender_unsent_messages(
    tx: &mut PgConnection,
    tenant: Uuid,
    campaign: Uuid,
    template: &crate::render::Template,
    image: Option<&str>,
) -> Result<u64, RepoError> {
    let unsent = list_unsent_messages(tx, tenant, campaign).await?;
    let mut rng = rand::rng();
    let bodies: Vec<(i64, String)> = unsent
        .iter()
        .map(|u| {
            let to = crate::render::Recipient {
                name: &u.name,
                phone: &u.phone,
            };
            (u.id, template.render(&to, &mut rng))
        })
        .collect();
    update_message_bodies(tx, tenant, image, &bodies).await
}

/// A campaign's rows not yet handed to the provider, with what rendering needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnsentMessage {
    pub id: i64,
    pub name: String,
    pub phone: String,
}

/// A campaign's unsent rows, locked until the transaction ends.
pub async fn list_unsent_messages(
    tx: &mut PgConnection,
    tenant: Uuid,
    campaign: Uuid,
) -> Result<Vec<UnsentMessage>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT bm.id, l.name, l.phone FROM broadcast_messages bm
         JOIN leads l ON l.id = bm.lead_id AND l.tenant_id = bm.tenant_id
         WHERE bm.campaign_id = $1 AND bm.tenant_id = $2 AND bm.status IN ('pending', 'queued')
         FOR UPDATE OF bm",
    )
    .bind(campaign)
    .bind(tenant)
    .fetch_all(tx)
    .await?)
}

/// New bodies (and image) for rows still unsent; a row that started sending meanwhile keeps its
/// text. Returns how many changed.
pub async fn update_message_bodies(
    tx: &mut PgConnection,
    tenant: Uuid,
    image: Option<&str>,
    bodies: &[(i64, String)],
) -> Result<u64, RepoError> {
    let ids: Vec<i64> = bodies.iter().map(|b| b.0).collect();
    let texts: Vec<&str> = bodies.iter().map(|b| b.1.as_str()).collect();
    let res = sqlx::query(
        "UPDATE broadcast_messages bm SET body = u.body, image = $3
         FROM unnest($1::bigint[], $2::text[]) AS u(id, body)
         WHERE bm.id = ANY($1) AND bm.id = u.id AND bm.tenant_id = $4
           AND bm.status IN ('pending', 'queued')",
    )
    .bind(&ids)
    .bind(&texts)
    .bind(image)
    .bind(tenant)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::TickGaps;

    #[test]
    fn tick_gaps_follow_the_hosts_lease() {
        // The defaults: a 1 s tick, a 300 s grace, 30 s leases.
        let g = TickGaps::new(1.0, 300.0, 30.0, 30.0);
        assert_eq!(
            (g.outage_s, g.past_grace_s, g.settle_s),
            (20.0, 300.0, 30.0)
        );
        // Short leases mark short gaps; the grace never falls below the outage's gap.
        let g = TickGaps::new(0.05, 0.0, 1.5, 1.5);
        assert_eq!((g.outage_s, g.past_grace_s, g.settle_s), (1.0, 1.0, 1.5));
        // A slow tick is no outage: three ticks at least.
        let g = TickGaps::new(10.0, 60.0, 30.0, 30.0);
        assert_eq!((g.outage_s, g.past_grace_s), (30.0, 60.0));
        // Hosts with different leases: the shortest says what an outage is (its host's leases
        // run out first), the longest how long the hosts need to renew after one.
        let g = TickGaps::new(1.0, 300.0, 6.0, 45.0);
        assert_eq!((g.outage_s, g.settle_s), (4.0, 45.0));
    }
}
