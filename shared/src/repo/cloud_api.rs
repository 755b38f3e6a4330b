//! The Cloud API's per-device credentials and the statements its webhook needs: finding the
//! device Meta names by phone-number id, the send records a status names, and the provider's
//! late failures of messages it had accepted.

use super::RepoError;
use crate::config::Secret;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A Cloud API device's credentials. The token is a [`Secret`]: it never prints.
#[derive(Debug, Clone)]
pub struct CloudCredentials {
    pub phone_number_id: String,
    pub access_token: Secret,
}

/// Sets (or replaces) a Cloud API device's credentials. The device must be the tenant's, live,
/// and of the `cloud_api` provider; another tenant's phone-number id is refused as a conflict.
pub async fn set_cloud_credentials(
    tx: &mut PgConnection,
    tenant: Uuid,
    device: Uuid,
    phone_number_id: &str,
    access_token: &Secret,
) -> Result<(), RepoError> {
    if phone_number_id.is_empty()
        || phone_number_id.len() > 32
        || !phone_number_id.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(RepoError::Conflict(
            "a phone-number id is 1 to 32 digits (Meta's WhatsApp Manager shows it)".into(),
        ));
    }
    let token = access_token.expose();
    if token.len() < 16 || token.len() > 2048 || token.chars().any(char::is_whitespace) {
        return Err(RepoError::Conflict(
            "an access token is 16 to 2048 characters without spaces".into(),
        ));
    }
    let res = sqlx::query(
        "INSERT INTO device_cloud_credentials (device_id, tenant_id, phone_number_id, access_token)
         SELECT d.id, d.tenant_id, $3, $4 FROM devices d
         WHERE d.id = $1 AND d.tenant_id = $2 AND d.provider = 'cloud_api' AND d.deleted_at IS NULL
         ON CONFLICT (device_id) DO UPDATE
         SET phone_number_id = EXCLUDED.phone_number_id, access_token = EXCLUDED.access_token,
             updated_at = now()",
    )
    .bind(device)
    .bind(tenant)
    .bind(phone_number_id)
    .bind(token)
    .execute(tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            RepoError::Conflict("this phone-number id already belongs to another device".into())
        }
        _ => RepoError::Db(e),
    })?;
    if res.rows_affected() == 0 {
        return Err(RepoError::NotFound("Cloud API device"));
    }
    Ok(())
}

pub async fn get_cloud_credentials(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
) -> Result<Option<CloudCredentials>, RepoError> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT phone_number_id, access_token FROM device_cloud_credentials
         WHERE device_id = $1 AND tenant_id = $2",
    )
    .bind(device)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(phone_number_id, token)| CloudCredentials {
        phone_number_id,
        access_token: Secret::new(token),
    }))
}

/// System scope: the live device (and its tenant) that Meta names by its phone-number id in a
/// webhook. Everything the webhook then does is scoped to that tenant.
pub async fn find_cloud_device(
    pool: &PgPool,
    phone_number_id: &str,
) -> Result<Option<(Uuid, Uuid)>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT c.tenant_id, c.device_id FROM device_cloud_credentials c
         JOIN devices d ON d.id = c.device_id AND d.tenant_id = c.tenant_id
         WHERE c.phone_number_id = $1 AND d.deleted_at IS NULL",
    )
    .bind(phone_number_id)
    .fetch_optional(pool)
    .await?)
}

/// The message ids of the device's send records with these provider message ids.
pub async fn find_sends_by_provider_ids(
    pool: &PgPool,
    tenant: Uuid,
    device: Uuid,
    provider_ids: &[String],
) -> Result<Vec<(String, i64)>, RepoError> {
    Ok(sqlx::query_as(
        "SELECT provider_message_id, message_id FROM host_sends
         WHERE tenant_id = $1 AND device_id = $2 AND provider_message_id = ANY($3)",
    )
    .bind(tenant)
    .bind(device)
    .bind(provider_ids)
    .fetch_all(pool)
    .await?)
}

/// The provider confirmed these messages went out: an `attempting` record (its host died before
/// the answer) becomes `sent`, so a retried request answers "already sent" instead of sending.
pub async fn confirm_host_sends(
    tx: &mut PgConnection,
    tenant: Uuid,
    message_ids: &[i64],
) -> Result<u64, RepoError> {
    let res = sqlx::query(
        "UPDATE host_sends SET state = 'sent', updated_at = now()
         WHERE tenant_id = $1 AND message_id = ANY($2) AND state = 'attempting'",
    )
    .bind(tenant)
    .bind(message_ids)
    .execute(tx)
    .await?;
    Ok(res.rows_affected())
}

/// The provider failed a message after accepting it (a webhook `failed` status): `sending` or
/// `sent` → `failed` with the provider's reason. A row already failed, skipped or cancelled is
/// left alone, so a repeated webhook changes nothing.
pub async fn fail_accepted_message(
    tx: &mut PgConnection,
    tenant: Uuid,
    message_id: i64,
    reason: &str,
    detail: &str,
) -> Result<bool, RepoError> {
    sqlx::query(
        "UPDATE host_sends SET state = 'failed', error = $3, updated_at = now()
         WHERE tenant_id = $1 AND message_id = $2 AND state IN ('attempting', 'sent')",
    )
    .bind(tenant)
    .bind(message_id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    let res = sqlx::query(
        "UPDATE broadcast_messages
         SET status = CASE WHEN $3 = 'not_on_whatsapp' THEN 'skipped' ELSE 'failed' END,
             reason = $3, last_error = $4, finished_at = now(), lease_until = NULL
         WHERE id = $2 AND tenant_id = $1 AND status IN ('sending', 'sent')",
    )
    .bind(tenant)
    .bind(message_id)
    .bind(reason)
    .bind(detail)
    .execute(tx)
    .await?;
    Ok(res.rows_affected() == 1)
}
