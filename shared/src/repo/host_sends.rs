//! The device host's durable send record (`host_sends`), one row per message id. It is what
//! makes a repeated send request answer "already sent" instead of sending twice, and what the
//! rescuer reconciles `sending` rows with after a crash.

use super::RepoError;
use sqlx::PgConnection;
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

/// Starts an attempt for `message_id`, or reports the one already recorded. An `aborted`
/// attempt (certainly not sent) is taken over, keeping its provider message id, so a retry
/// reuses the id the provider may already know.
pub async fn begin_host_send(
    tx: &mut PgConnection,
    tenant: Uuid,
    device: Uuid,
    message_id: i64,
    provider_message_id: &str,
    host_id: &str,
) -> Result<HostSendState, RepoError> {
    let owned: Option<(String,)> = sqlx::query_as(
        "INSERT INTO host_sends (message_id, tenant_id, device_id, provider_message_id, state, host_id)
         VALUES ($1, $2, $3, $4, 'attempting', $5)
         ON CONFLICT (message_id) DO UPDATE
             SET state = 'attempting', host_id = EXCLUDED.host_id, updated_at = now(), error = NULL
             WHERE host_sends.state = 'aborted' AND host_sends.tenant_id = EXCLUDED.tenant_id
         RETURNING provider_message_id",
    )
    .bind(message_id)
    .bind(tenant)
    .bind(device)
    .bind(provider_message_id)
    .bind(host_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((pid,)) = owned {
        return Ok(HostSendState::Owned {
            provider_message_id: pid,
        });
    }
    let existing: Option<(
        String,
        String,
        Option<String>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT provider_message_id, state, error, updated_at FROM host_sends
         WHERE message_id = $1 AND tenant_id = $2",
    )
    .bind(message_id)
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?;
    let (provider_message_id, state, error, updated_at) =
        existing.ok_or(RepoError::NotFound("send record of this tenant"))?;
    Ok(HostSendState::Existing {
        provider_message_id,
        state,
        error,
        updated_at,
    })
}

/// Records how an attempt ended: `sent`, `failed` (with a reason) or `aborted` (not sent).
pub async fn finish_host_send(
    tx: &mut PgConnection,
    tenant: Uuid,
    message_id: i64,
    state: &str,
    error: Option<&str>,
) -> Result<(), RepoError> {
    sqlx::query(
        "UPDATE host_sends SET state = $3, error = $4, updated_at = now()
         WHERE message_id = $1 AND tenant_id = $2",
    )
    .bind(message_id)
    .bind(tenant)
    .bind(state)
    .bind(error)
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
