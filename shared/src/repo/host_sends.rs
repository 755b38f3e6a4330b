//! The device host's durable send record (`host_sends`), one row per message id. It is what
//! makes a repeated send request answer "already sent" instead of sending twice, and what the
//! rescuer reconciles `sending` rows with after a crash.

use super::RepoError;
use sqlx::PgConnection;
use std::collections::HashMap;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSendState {
    /// This caller owns the attempt and must send with `provider_message_id`.
    Owned { provider_message_id: String },
    /// Another attempt is recorded; `state` says how it ended (or that it is still under way).
    /// `live`: the message's row was `sending` when read (advisory: only
    /// [`retake_host_send`] may act on an unfinished attempt, and it checks again under a lock).
    Existing {
        provider_message_id: String,
        state: String,
        error: Option<String>,
        updated_at: chrono::DateTime<chrono::Utc>,
        live: bool,
    },
}

/// (message id, provider message id, state, error, updated at, row `sending`) of a recorded
/// attempt.
type ExistingRow = (
    i64,
    String,
    String,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
    bool,
);

/// One attempt to start: (message id, tenant, device, a fresh provider message id).
pub type NewAttempt = (i64, Uuid, Uuid, String);

/// Starts attempts for a batch of message ids in one statement, or reports the ones already
/// recorded. An `aborted` attempt (certainly not sent) is taken over, keeping its provider
/// message id, so a retry reuses the id the provider may already know; a `retry` (a person
/// retried a failed message) starts over with a fresh id. The caller must commit
/// this durably before calling the provider: it is what stops a second send.
///
/// An attempt starts only for a message whose row is `sending`, of the attempt's tenant and
/// device, and only once per claim: a record is taken over (`aborted`, `retry`, or the
/// rescuer's `withdrawn` fence) only by a later claim than the one it was written for. A
/// request that reached the host late, after the rescuer moved its row on (back to `pending`,
/// where a cancel may end it), would otherwise send a message its row says was not sent. The
/// row is read, not locked: the rescuer fences the claim of every row it moves on with no
/// attempt recorded ([`fence_unattempted_claims`]), in the transaction that moves it, and this
/// insert meets that fence on the primary key: it waits for an uncommitted one and sees a
/// committed one, whatever its snapshot said of the row. An id missing from the answer has
/// neither an attempt started nor one recorded: nothing may be sent for it.
///
/// And only by the host that holds the device's lease, live: a host whose lease ran out (it
/// stalled, or could not reach the database) may not have noticed yet that another host took
/// the device, and a request routed to it before the takeover would otherwise send through the
/// device beside its new host. The rescuer takes an attempt recorded by a host that no longer
/// holds the lease for one nobody is on; this keeps that true for every attempt begun since.
pub async fn begin_host_sends(
    tx: &mut PgConnection,
    host_id: &str,
    attempts: &[NewAttempt],
) -> Result<HashMap<i64, HostSendState>, RepoError> {
    let ids: Vec<i64> = attempts.iter().map(|a| a.0).collect();
    let tenants: Vec<Uuid> = attempts.iter().map(|a| a.1).collect();
    let devices: Vec<Uuid> = attempts.iter().map(|a| a.2).collect();
    let pids: Vec<&str> = attempts.iter().map(|a| a.3.as_str()).collect();
    let owned: Vec<(i64, String)> = sqlx::query_as(
        "INSERT INTO host_sends
             (message_id, tenant_id, device_id, provider_message_id, state, host_id, claim)
         SELECT bm.id, bm.tenant_id, bm.device_id, u.p, 'attempting', $5, bm.enqueue_count
         FROM broadcast_messages bm
         JOIN unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::text[]) AS u(id, t, d, p)
           ON bm.id = u.id AND bm.tenant_id = u.t AND bm.device_id = u.d
         WHERE bm.id = ANY($1) AND bm.status = 'sending' COLLATE \"C\"
           AND EXISTS (SELECT 1 FROM device_leases dl
                       WHERE dl.device_id = bm.device_id AND dl.host_id = $5
                         AND dl.lease_until > now())
         ORDER BY bm.id
         ON CONFLICT (message_id) DO UPDATE
             SET state = 'attempting', host_id = EXCLUDED.host_id, updated_at = now(), error = NULL,
                 claim = EXCLUDED.claim,
                 provider_message_id = CASE
                     WHEN host_sends.state = 'retry' OR host_sends.provider_message_id IS NULL
                     THEN EXCLUDED.provider_message_id ELSE host_sends.provider_message_id END
             WHERE host_sends.state IN ('aborted', 'retry', 'withdrawn')
               AND host_sends.tenant_id = EXCLUDED.tenant_id
               AND host_sends.claim < EXCLUDED.claim
         RETURNING message_id, provider_message_id",
    )
    .bind(&ids)
    .bind(&tenants)
    .bind(&devices)
    .bind(&pids)
    .bind(host_id)
    .fetch_all(&mut *tx)
    .await?;
    let mut out: HashMap<i64, HostSendState> = owned
        .into_iter()
        .map(|(id, provider_message_id)| {
            (
                id,
                HostSendState::Owned {
                    provider_message_id,
                },
            )
        })
        .collect();
    if out.len() < attempts.len() {
        let rest: Vec<(i64, Uuid)> = attempts
            .iter()
            .filter(|a| !out.contains_key(&a.0))
            .map(|a| (a.0, a.1))
            .collect();
        let rest_ids: Vec<i64> = rest.iter().map(|r| r.0).collect();
        let rest_tenants: Vec<Uuid> = rest.iter().map(|r| r.1).collect();
        // A `withdrawn` fence is no attempt: its id stays out of the answer (nothing to send).
        let existing: Vec<ExistingRow> = sqlx::query_as(
            "SELECT h.message_id, h.provider_message_id, h.state, h.error, h.updated_at,
                    EXISTS (SELECT 1 FROM broadcast_messages bm
                            WHERE bm.id = h.message_id AND bm.tenant_id = h.tenant_id
                              AND bm.status = 'sending' COLLATE \"C\") AS live
                 FROM host_sends h JOIN unnest($1::bigint[], $2::uuid[]) AS u(id, t)
                   ON h.message_id = u.id AND h.tenant_id = u.t
                 WHERE h.message_id = ANY($1) AND h.state <> 'withdrawn'",
        )
        .bind(&rest_ids)
        .bind(&rest_tenants)
        .fetch_all(&mut *tx)
        .await?;
        for (id, provider_message_id, state, error, updated_at, live) in existing {
            out.insert(
                id,
                HostSendState::Existing {
                    provider_message_id,
                    state,
                    error,
                    updated_at,
                    live,
                },
            );
        }
    }
    Ok(out)
}

/// How one attempt ended: (message id, tenant, `sent` | `failed` | `aborted`, reason or detail).
pub type FinishedAttempt<'a> = (i64, Uuid, &'a str, Option<&'a str>);

/// Records how a batch of attempts ended: `sent`, `failed` (with a reason) or `aborted` (not sent).
///
/// `owner`: the host whose own attempts these are; a record is then written only while it is
/// still that host's `attempting` one. An outcome written late (the host writes it again until
/// the database takes it) must not end an attempt that has changed hands meanwhile: another
/// host that took the device retakes a record its provider says was not sent, and an `aborted`
/// written over that live attempt would let a later claim start a second one. `None` settles a
/// record whoever recorded it (an attempt that died with another process, resolved through the
/// provider).
pub async fn finish_host_sends(
    tx: &mut PgConnection,
    owner: Option<&str>,
    finished: &[FinishedAttempt<'_>],
) -> Result<(), RepoError> {
    let ids: Vec<i64> = finished.iter().map(|f| f.0).collect();
    let tenants: Vec<Uuid> = finished.iter().map(|f| f.1).collect();
    let states: Vec<&str> = finished.iter().map(|f| f.2).collect();
    let errors: Vec<Option<&str>> = finished.iter().map(|f| f.3).collect();
    sqlx::query(
        "UPDATE host_sends h SET state = u.s, error = u.e, updated_at = now()
         FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[]) AS u(id, t, s, e)
         WHERE h.message_id = ANY($1) AND h.message_id = u.id AND h.tenant_id = u.t
           AND ($5::text IS NULL OR (h.host_id = $5 AND h.state = 'attempting'))",
    )
    // Planned at every call, for the table's current size: a cached generic plan is chosen
    // once, while the table is still nearly empty (a scan), and kept as the table grows.
    .persistent(false)
    .bind(&ids)
    .bind(&tenants)
    .bind(&states)
    .bind(&errors)
    .bind(owner)
    .execute(tx)
    .await?;
    Ok(())
}

/// Takes over an `attempting` record whose attempt died with its process (the provider said it
/// never saw the message): it becomes owned again with the same provider message id, for the
/// row's current claim. Only while the message's row is `sending`, share-locked: the rescuer
/// moves a row with an `attempting` record on without a fence (that record already stops
/// [`begin_host_sends`]), so the lock is what orders the two here. A rare path (a host died
/// mid-send); the common one locks nothing. False when nothing was taken over, and then
/// nothing may be sent. Only by the host holding the device's lease, as in [`begin_host_sends`].
pub async fn retake_host_send(
    tx: &mut PgConnection,
    tenant: Uuid,
    message_id: i64,
    host_id: &str,
) -> Result<bool, RepoError> {
    let res = sqlx::query(
        "WITH live AS (
             SELECT bm.id, bm.enqueue_count FROM broadcast_messages bm
             WHERE bm.id = $1 AND bm.tenant_id = $2 AND bm.status = 'sending' COLLATE \"C\"
               AND EXISTS (SELECT 1 FROM device_leases dl
                           WHERE dl.device_id = bm.device_id AND dl.host_id = $3
                             AND dl.lease_until > now())
             FOR SHARE OF bm
         )
         UPDATE host_sends h SET host_id = $3, updated_at = now(), claim = live.enqueue_count
         FROM live
         WHERE h.message_id = $1 AND h.tenant_id = $2 AND h.state = 'attempting'
           AND h.message_id = live.id",
    )
    .bind(message_id)
    .bind(tenant)
    .bind(host_id)
    .execute(tx)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Fences claims at the host's send record, in the transaction that moves these `sending` rows
/// on (every row this fences must then be moved on in it): a `withdrawn` record for the row's
/// current claim where that claim has no attempt recorded, or where the message's record is one
/// a later claim may take over (`aborted`, `retry`, `withdrawn` of an earlier claim). A request
/// of that claim reaching a host afterwards then starts nothing (see [`begin_host_sends`]); a
/// later claim takes the fence over.
///
/// The rescuer fences the rows it locked (`tenant` and `attempt` `None`: system scope); a
/// worker the one row of its claim, `attempt` being the row's `attempts` as its claim left it
/// (a row no longer in that claim is not fenced, and the worker's write then matches nothing).
/// Either way the rows are locked here before their records, the rescuer's order.
///
/// A host inserting an attempt for one of these rows at the same moment is waited for on the
/// primary key; its attempt is then recorded and the row is not fenced. A record of an attempt
/// already there is read, not locked. The caller must judge
/// the rows after this statement (a fresh snapshot sees that attempt) and leave a row with a
/// live attempt `sending`.
pub async fn fence_unattempted_claims(
    tx: &mut PgConnection,
    tenant: Option<Uuid>,
    message_ids: &[i64],
    attempt: Option<i32>,
) -> Result<u64, RepoError> {
    if message_ids.is_empty() {
        return Ok(0);
    }
    let res = sqlx::query(
        "INSERT INTO host_sends
             (message_id, tenant_id, device_id, provider_message_id, state, host_id, claim)
         SELECT bm.id, bm.tenant_id, bm.device_id, NULL, 'withdrawn', 'rescuer', bm.enqueue_count
         FROM broadcast_messages bm
         WHERE bm.id = ANY($1) AND bm.status = 'sending' COLLATE \"C\"
           AND ($2::uuid IS NULL OR bm.tenant_id = $2)
           AND ($3::integer IS NULL OR bm.attempts = $3)
           -- not a message with an attempt (or its end) recorded: nothing to fence, and the
           -- conflict below would lock that record until this transaction ends, across the
           -- host's finishing write of its batch (rows in another order: a deadlock)
           AND NOT EXISTS (SELECT 1 FROM host_sends r WHERE r.message_id = bm.id
                             AND r.state IN ('attempting', 'sent', 'failed'))
         ORDER BY bm.id
         -- the message row before its record, as the rescuer locks them (a worker's fence
         -- taking the record first could deadlock with a rescuer holding the row)
         FOR UPDATE OF bm
         ON CONFLICT (message_id) DO UPDATE
             SET state = 'withdrawn', host_id = EXCLUDED.host_id, updated_at = now(), error = NULL,
                 claim = EXCLUDED.claim,
                 -- a person's retry starts over with a fresh id; an aborted attempt's id is
                 -- kept for the claim that takes the fence over (the provider may know it)
                 provider_message_id = CASE WHEN host_sends.state = 'retry' THEN NULL
                     ELSE host_sends.provider_message_id END
             WHERE host_sends.state IN ('aborted', 'retry', 'withdrawn')
               AND host_sends.tenant_id = EXCLUDED.tenant_id
               AND host_sends.claim < EXCLUDED.claim",
    )
    .bind(message_ids)
    .bind(tenant)
    .bind(attempt)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}
