//! Accounts, keys and campaigns as the admin side manages them (`accounts`, `api_keys`, `campaigns`).

use async_trait::async_trait;
use rusqlite::params;
use time::OffsetDateTime;

use super::{db_error, execute, get_doc, json_error, list_docs, query_row, to_i64, SqliteStore};
use crate::domain::{Account, AccountId, ApiKeyRecord, Campaign, CampaignId, KeyId, RateLimit};
use crate::ports::{CampaignReader, AdminStore, StoreError};

#[async_trait]
impl AdminStore for SqliteStore {
    async fn create_account(&self, account: &Account) -> Result<(), StoreError> {
        let (id, doc) = (account.id.to_string(), serde_json::to_string(account).map_err(json_error)?);
        self.write(move |conn| {
            execute(conn, "INSERT INTO accounts (id, doc) VALUES (?1, ?2)", params![id, doc]).map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn get_account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        self.read(|conn| get_doc(conn, "SELECT doc FROM accounts WHERE id = ?1", id.to_string()))
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        self.read(|conn| {
            let n: i64 = query_row(conn, "SELECT COUNT(*) FROM accounts", [], |r| r.get(0)).map_err(db_error)?;
            Ok(n == 0)
        })
    }

    async fn create_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let doc = serde_json::to_string(key).map_err(json_error)?;
        let (id, hash, account) = (key.key_id.to_string(), key.hash.as_str().to_owned(), key.account_id.to_string());
        self.write(move |conn| {
            execute(
                conn,
                "INSERT INTO api_keys (key_id, hash, account_id, doc) VALUES (?1, ?2, ?3, ?4)",
                params![id, hash, account, doc],
            )
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn revoke_key(&self, id: KeyId, now: OffsetDateTime) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let Some(mut key) = get_doc::<ApiKeyRecord>(conn, "SELECT doc FROM api_keys WHERE key_id = ?1", id.to_string())? else {
                return Ok(false);
            };
            key.revoked_at.get_or_insert(now);
            let doc = serde_json::to_string(&key).map_err(json_error)?;
            execute(conn, "UPDATE api_keys SET doc = ?2 WHERE key_id = ?1", params![id.to_string(), doc]).map_err(db_error)?;
            Ok(true)
        })
        .await
    }

    async fn list_keys(&self, account: AccountId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.read(|conn| list_docs(conn, "SELECT doc FROM api_keys WHERE account_id = ?1 ORDER BY rowid", account.to_string()))
    }

    async fn set_rate_limit(&self, id: KeyId, limit: Option<RateLimit>) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let Some(mut key) = get_doc::<ApiKeyRecord>(conn, "SELECT doc FROM api_keys WHERE key_id = ?1", id.to_string())? else {
                return Ok(false);
            };
            key.rate_limit = limit;
            let doc = serde_json::to_string(&key).map_err(json_error)?;
            execute(conn, "UPDATE api_keys SET doc = ?2 WHERE key_id = ?1", params![id.to_string(), doc]).map_err(db_error)?;
            Ok(true)
        })
        .await
    }

    async fn create_campaign(&self, campaign: &Campaign, make_default: bool) -> Result<(), StoreError> {
        let doc = serde_json::to_string(campaign).map_err(json_error)?;
        let (id, account, version) = (campaign.id, campaign.account_id, to_i64(campaign.sending_version));
        self.write(move |conn| {
            execute(
                conn,
                "INSERT INTO campaigns (id, account_id, doc, sending_version) VALUES (?1, ?2, ?3, ?4)",
                params![id.to_string(), account.to_string(), doc, version],
            )
            .map_err(db_error)?;
            if make_default {
                let mut acc: Account = get_doc(conn, "SELECT doc FROM accounts WHERE id = ?1", account.to_string())?
                    .ok_or_else(|| StoreError::other("campaign's account does not exist"))?;
                acc.default_campaign_id = Some(id);
                let doc = serde_json::to_string(&acc).map_err(json_error)?;
                execute(conn, "UPDATE accounts SET doc = ?2 WHERE id = ?1", params![account.to_string(), doc]).map_err(db_error)?;
            }
            Ok(())
        })
        .await
    }

    async fn list_campaigns(&self, account: AccountId) -> Result<Vec<Campaign>, StoreError> {
        self.read(|conn| list_docs(conn, "SELECT doc FROM campaigns WHERE account_id = ?1 ORDER BY rowid", account.to_string()))
    }

    async fn replace_campaign(&self, campaign: &Campaign, expected_version: u64) -> Result<bool, StoreError> {
        let doc = serde_json::to_string(campaign).map_err(json_error)?;
        let (id, account, active) = (campaign.id, campaign.account_id, campaign.active);
        let (expected, version) = (to_i64(expected_version), to_i64(campaign.sending_version));
        self.write(move |conn| {
            let changed = execute(
                conn,
                "UPDATE campaigns SET doc = ?2, sending_version = ?4 WHERE id = ?1 AND sending_version = ?3",
                params![id.to_string(), doc, expected, version],
            )
            .map_err(db_error)?;
            if changed == 0 {
                return Ok(false);
            }
            if !active {
                if let Some(mut acc) = get_doc::<Account>(conn, "SELECT doc FROM accounts WHERE id = ?1", account.to_string())? {
                    if acc.default_campaign_id == Some(id) {
                        acc.default_campaign_id = None;
                        let doc = serde_json::to_string(&acc).map_err(json_error)?;
                        execute(conn, "UPDATE accounts SET doc = ?2 WHERE id = ?1", params![acc.id.to_string(), doc]).map_err(db_error)?;
                    }
                }
            }
            Ok(true)
        })
        .await
    }

    async fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        let mut accounts: Vec<Account> = self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT doc FROM accounts ORDER BY rowid").map_err(db_error)?;
            let docs = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(db_error)?;
            docs.map(|d| serde_json::from_str(&d.map_err(db_error)?).map_err(json_error)).collect()
        })?;
        accounts.sort_by_key(|a| a.created_at);
        Ok(accounts)
    }
}

#[async_trait]
impl CampaignReader for SqliteStore {
    async fn get_campaign(&self, id: CampaignId) -> Result<Option<Campaign>, StoreError> {
        self.read(|conn| get_doc(conn, "SELECT doc FROM campaigns WHERE id = ?1", id.to_string()))
    }
}
