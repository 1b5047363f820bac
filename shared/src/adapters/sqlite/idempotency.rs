//! Idempotency records: the `idempotency` table.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use time::OffsetDateTime;

use super::{db_error, execute, query_row, unix_ms, SqliteStore};
use crate::domain::{AccountId, IdempotencyBegin, IdempotencyKey, StoredResponse, IDEMPOTENCY_TTL, IN_FLIGHT_LEASE};
use crate::ports::{IdempotencyStore, StoreError};

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn begin(
        &self,
        account: AccountId,
        key: &IdempotencyKey,
        fingerprint: &str,
        now: OffsetDateTime,
    ) -> Result<IdempotencyBegin, StoreError> {
        let (account, key, fingerprint) = (account.to_string(), key.hash().to_owned(), fingerprint.to_owned());
        let (now_ms, lease, expires) = (unix_ms(now), unix_ms(now + IN_FLIGHT_LEASE), unix_ms(now + IDEMPOTENCY_TTL));
        self.write(move |conn| {
            let existing: Option<(String, Option<u16>, Option<String>, i64, i64)> = query_row(
                conn,
                "SELECT fingerprint, status, body, lease_until_ms, expires_at_ms FROM idempotency WHERE account_id = ?1 AND key_hash = ?2",
                params![account, key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(db_error)?;
            let outcome = match existing {
                Some((_, _, _, _, expires_at)) if expires_at <= now_ms => None,
                Some((_, None, _, lease_until, _)) if lease_until <= now_ms => None,
                Some((stored, _, _, _, _)) if stored != fingerprint => Some(IdempotencyBegin::Mismatch),
                Some((_, None, _, _, _)) => Some(IdempotencyBegin::InFlight),
                Some((_, Some(status), body, _, _)) => {
                    Some(IdempotencyBegin::Replay(StoredResponse { status, body: body.unwrap_or_default() }))
                }
                None => None,
            };
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            execute(
                conn,
                "INSERT OR REPLACE INTO idempotency (account_id, key_hash, fingerprint, status, body, lease_until_ms, expires_at_ms)
                 VALUES (?1, ?2, ?3, NULL, NULL, ?4, ?5)",
                params![account, key, fingerprint, lease, expires],
            )
            .map_err(db_error)?;
            Ok(IdempotencyBegin::Started)
        })
        .await
    }

    async fn finish(&self, account: AccountId, key: &IdempotencyKey, response: &StoredResponse, now: OffsetDateTime) -> Result<(), StoreError> {
        let (account, key, status, body) = (account.to_string(), key.hash().to_owned(), response.status, response.body.clone());
        let expires = unix_ms(now + IDEMPOTENCY_TTL);
        self.write(move |conn| {
            execute(
                conn,
                "UPDATE idempotency SET status = ?3, body = ?4, expires_at_ms = ?5 WHERE account_id = ?1 AND key_hash = ?2",
                params![account, key, status, body, expires],
            )
            .map(drop)
            .map_err(db_error)
        })
        .await
    }

    async fn abandon(&self, account: AccountId, key: &IdempotencyKey) -> Result<(), StoreError> {
        let (account, key) = (account.to_string(), key.hash().to_owned());
        self.write(move |conn| {
            execute(conn, "DELETE FROM idempotency WHERE account_id = ?1 AND key_hash = ?2", params![account, key])
                .map(drop)
                .map_err(db_error)
        })
        .await
    }
}
