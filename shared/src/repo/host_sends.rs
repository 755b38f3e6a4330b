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
    Existing {
        provider_message_id: String,
        state: String,
        error: Option<String>,
        updated_at: chrono::DateTime<chrono::Utc>,
    },
}

/// (message id, provider message id, state, error, updated at) of a recorded attempt.
type ExistingRow = (
    i64,
    String,
    String,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
);

/// One attempt to start: (message id, tenant, device, a fresh provider message id).
pub type NewAttempt = (i64, Uuid, Uuid, String);

/// Starts attempts for a batch of message ids in one statement, or reports the ones already
/// recorded. An `aborted` attempt (certainly not sent) is taken over, keeping its provider
/// message id, so a retry reuses the id the provider may already know; a `retry` (a person
/// retried a failed message) starts over with a fresh id. The caller must commit
/// this durably before calling the provider: it is what stops a second send.
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
        "INSERT INTO host_sends (message_id, tenant_id, device_id, provider_message_id, state, host_id)
         SELECT id, t, d, p, 'attempting', $5
         FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::text[]) AS u(id, t, d, p)
         ORDER BY id
         ON CONFLICT (message_id) DO UPDATE
             SET state = 'attempting', host_id = EXCLUDED.host_id, updated_at = now(), error = NULL,
                 provider_message_id = CASE WHEN host_sends.state = 'retry'
                     THEN EXCLUDED.provider_message_id ELSE host_sends.provider_message_id END
             WHERE host_sends.state IN ('aborted', 'retry')
               AND host_sends.tenant_id = EXCLUDED.tenant_id
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
        let existing: Vec<ExistingRow> = sqlx::query_as(
            "SELECT h.message_id, h.provider_message_id, h.state, h.error, h.updated_at
                 FROM host_sends h JOIN unnest($1::bigint[], $2::uuid[]) AS u(id, t)
                   ON h.message_id = u.id AND h.tenant_id = u.t
                 WHERE h.message_id = ANY($1)",
        )
        .bind(&rest_ids)
        .bind(&rest_tenants)
        .fetch_all(&mut *tx)
        .await?;
        for (id, provider_message_id, state, error, updated_at) in existing {
            out.insert(
                id,
                HostSendState::Existing {
                    provider_message_id,
                    state,
                    error,
                    updated_at,
                },
            );
        }
    }
    Ok(out)
}

/// One attempt: see [`begin_host_sends`].
pub async fn begin_host_send(
    tx: &mut PgConnection,
    tenant: Uuid,
    device: Uuid,
    message_id: i64,
    provider_message_id: &str,
    host_id: &str,
) -> Result<HostSendState, RepoError> {
    let mut states = begin_host_sends(
        tx,
        host_id,
        &[(message_id, tenant, device, provider_message_id.to_string())],
    )
    .await?;
    states
        .remove(&message_id)
        .ok_or(RepoError::NotFound("send record of this tenant"))
}

/// How one attempt ended: (message id, tenant, `sent` | `failed` | `aborted`, reason or detail).
pub type FinishedAttempt<'a> = (i64, Uuid, &'a str, Option<&'a str>);

/// Records how a batch of attempts ended: `sent`, `failed` (with a reason) or `aborted` (not sent).
pub async fn finish_host_sends(
    tx: &mut PgConnection,
    finished: &[FinishedAttempt<'_>],
) -> Result<(), RepoError> {
    let ids: Vec<i64> = finished.iter().map(|f| f.0).collect();
    let tenants: Vec<Uuid> = finished.iter().map(|f| f.1).collect();
    let states: Vec<&str> = finished.iter().map(|f| f.2).collect();
    let errors: Vec<Option<&str>> = finished.iter().map(|f| f.3).collect();
    sqlx::query(
        "UPDATE host_sends h SET state = u.s, error = u.e, updated_at = now()
         FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[]) AS u(id, t, s, e)
         WHERE h.message_id = ANY($1) AND h.message_id = u.id AND h.tenant_id = u.t",
    )
    // Planned at every call, for the table's current size: a cached generic plan is chosen
    // once, while the table is still nearly empty (a scan), and kept as the table grows.
    .persistent(false)
    .bind(&ids)
    .bind(&tenants)
    .bind(&states)
    .bind(&errors)
    .execute(tx)
    .await?;
    Ok(())
}

/// Takes over an `attempting` record whose attempt died with its process (the provider said it
/// never saw the message): it becomes owned again with the same provider message id.
pub async fn retake_host_send(
    tx: &mut PgConnection,
    tenant: Uuid,
    message_id: i64,
    host_id: &str,
) -> Result<bool, RepoError> {
    let res = sqlx::query(
        "UPDATE host_sends SET host_id = $3, updated_at = now()
         WHERE message_id = $1 AND tenant_id = $2 AND state = 'attempting'",
    )
    .bind(message_id)
    .bind(tenant)
    .bind(host_id)
    .execute(tx)
    .await?;
    Ok(res.rows_affected() == 1)
}
