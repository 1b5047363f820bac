//! Webhook endpoints (`integrations`) and the events received through them
//! (`received_events`, kept [`EVENT_RETENTION`]).

use async_trait::async_trait;
use rusqlite::params;

use super::{db_error, execute, get_doc, json_error, list_docs, query_row, unix_ms, SqliteStore};
use crate::domain::{AccountId, EndpointId, Integration, Provider, ReceivedEvent};
use crate::ports::{IntegrationStore, StoreError, EVENT_RETENTION};

/// The `account_id` column of an event that names no account.
const NO_ACCOUNT: &str = "";

fn account_column(account: Option<AccountId>) -> String {
    account.map_or_else(|| NO_ACCOUNT.to_owned(), |a| a.to_string())
}

#[async_trait]
impl IntegrationStore for SqliteStore {
    async fn create_integration(&self, integration: &Integration) -> Result<(), StoreError> {
        let doc = serde_json::to_string(integration).map_err(json_error)?;
        let (id, account) = (integration.id.to_string(), integration.account_id.to_string());
        self.write(move |conn| {
            execute(conn, "INSERT INTO integrations (id, account_id, doc) VALUES (?1, ?2, ?3)", params![id, account, doc]).map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn find_integration(&self, id: &EndpointId) -> Result<Option<Integration>, StoreError> {
        self.read(|conn| get_doc(conn, "SELECT doc FROM integrations WHERE id = ?1", id.to_string()))
    }

    async fn list_integrations(&self, account: AccountId) -> Result<Vec<Integration>, StoreError> {
        self.read(|conn| list_docs(conn, "SELECT doc FROM integrations WHERE account_id = ?1 ORDER BY rowid", account.to_string()))
    }

    async fn delete_integration(&self, account: AccountId, id: &EndpointId) -> Result<bool, StoreError> {
        let (id, account) = (id.to_string(), account.to_string());
        self.write(move |conn| {
            let deleted = execute(conn, "DELETE FROM integrations WHERE id = ?1 AND account_id = ?2", params![id, account]).map_err(db_error)?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn event_taken(&self, provider: Provider, account: Option<AccountId>, event_id: &str) -> Result<bool, StoreError> {
        let account = account_column(account);
        self.read(|conn| {
            query_row(
                conn,
                "SELECT EXISTS (SELECT 1 FROM received_events
                    WHERE provider = ?1 AND account_id = ?2 AND event_id = ?3 AND outcome IN ('applied', 'unmatched', 'ignored'))",
                params![provider.as_str(), account, event_id],
                |r| r.get(0),
            )
            .map_err(db_error)
        })
    }

    async fn record_event(&self, event: &ReceivedEvent) -> Result<(), StoreError> {
        let doc = serde_json::to_string(event).map_err(json_error)?;
        let (provider, account, event_id, outcome) =
            (event.provider.as_str(), account_column(event.account_id), event.event_id.clone(), event.outcome.as_str());
        let (received_ms, expired_ms) = (unix_ms(event.received_at), unix_ms(event.received_at - EVENT_RETENTION));
        self.write(move |conn| {
            execute(conn, "DELETE FROM received_events WHERE received_ms < ?1", [expired_ms]).map_err(db_error)?;
            execute(
                conn,
                "INSERT INTO received_events (provider, account_id, event_id, outcome, received_ms, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![provider, account, event_id, outcome, received_ms, doc],
            )
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn list_events(&self, account: Option<AccountId>, limit: u32) -> Result<Vec<ReceivedEvent>, StoreError> {
        let account = account_column(account);
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT doc FROM received_events WHERE account_id = ?1 ORDER BY seq DESC LIMIT ?2")
                .map_err(db_error)?;
            let docs = stmt.query_map(params![account, limit], |r| r.get::<_, String>(0)).map_err(db_error)?;
            docs.map(|d| serde_json::from_str(&d.map_err(db_error)?).map_err(json_error)).collect()
        })
    }
}
