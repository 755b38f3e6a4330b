//! Stored images (from `data:` URLs), validated before they get here. Owns the `media` table.
//! Messages refer to them as `media:<id>`.

use super::RepoError;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Stores an image once per tenant and content; returns its id (the existing one for a repeat).
pub async fn insert_media(
    tx: &mut PgConnection,
    tenant: Uuid,
    mime: &str,
    bytes: &[u8],
) -> Result<Uuid, RepoError> {
    let sha = hex::encode(Sha256::digest(bytes));
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO media (id, tenant_id, sha256, mime, bytes) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, sha256) DO UPDATE SET sha256 = EXCLUDED.sha256
         RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(tenant)
    .bind(sha)
    .bind(mime)
    .bind(bytes)
    .fetch_one(tx)
    .await?;
    Ok(id)
}

pub async fn get_media(
    pool: &PgPool,
    tenant: Uuid,
    id: Uuid,
) -> Result<(String, Vec<u8>), RepoError> {
    sqlx::query_as("SELECT mime, bytes FROM media WHERE id = $1 AND tenant_id = $2")
        .bind(id)
        .bind(tenant)
        .fetch_optional(pool)
        .await?
        .ok_or(RepoError::NotFound("media"))
}
