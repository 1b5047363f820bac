//! API keys as the request path reads them: lookups by hash, cached, and their last use.

use std::collections::HashMap;
use std::sync::PoisonError;

use async_trait::async_trait;
use rusqlite::params;
use time::OffsetDateTime;

use super::{db_error, execute, get_doc, query_row, SqliteStore};
use crate::adapters::record::rfc3339;
use crate::domain::{ApiKeyRecord, KeyHash};
use crate::ports::{KeyStore, StoreError};

/// Key records kept in memory at most (the cache is emptied when full).
const KEY_CACHE_MAX: usize = 10_000;

#[async_trait]
impl KeyStore for SqliteStore {
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.read(|conn| {
            // The version first: a key changed after it is read gets a newer version, so a record
            // is never cached under a version newer than itself.
            let version: i64 = query_row(conn, "SELECT keys_version FROM meta WHERE id = 1", [], |r| r.get(0)).map_err(db_error)?;
            let cached = |keys: &HashMap<String, (i64, ApiKeyRecord)>| keys.get(hash.as_str()).filter(|(v, _)| *v == version).map(|(_, r)| r.clone());
            if let Some(record) = cached(&self.inner.keys.lock().unwrap_or_else(PoisonError::into_inner)) {
                return Ok(Some(record));
            }
            let record: Option<ApiKeyRecord> = get_doc(conn, "SELECT doc FROM api_keys WHERE hash = ?1", hash.as_str().to_owned())?;
            if let Some(r) = &record {
                let mut keys = self.inner.keys.lock().unwrap_or_else(PoisonError::into_inner);
                if keys.len() >= KEY_CACHE_MAX {
                    keys.clear();
                }
                keys.insert(hash.as_str().to_owned(), (version, r.clone()));
            }
            Ok(record)
        })
    }

    async fn touch_key(&self, hash: &KeyHash, now: OffsetDateTime) -> Result<(), StoreError> {
        let (hash, at) = (hash.as_str().to_owned(), rfc3339(now));
        self.write(move |conn| {
            execute(conn, "UPDATE api_keys SET doc = json_set(doc, '$.last_used_at', ?2) WHERE hash = ?1", params![hash, at])
                .map(drop)
                .map_err(db_error)
        })
        .await
    }
}
