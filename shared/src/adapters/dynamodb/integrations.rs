//! Webhook endpoints (`INTEGRATION#` items, listed by account through `gsi1`) and the events
//! received through them: an event taken (applied, unmatched, ignored) is one `EVENT#` item
//! whose key names it, so a delivery of it again is found with one read; any other receipt
//! (a duplicate, a rejection) is a `RECEIVED#` item of its own. Both are listed by account
//! through `gsi1`, newest first, and expire after [`EVENT_RETENTION`].

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use sha2::{Digest, Sha256};

use super::{account_pk, doc_of, key, n, s, sdk_error, to_doc, DynamoStore};
use crate::adapters::record::rfc3339;
use crate::domain::{AccountId, EndpointId, Integration, Provider, ReceivedEvent};
use crate::ports::{IntegrationStore, StoreError, EVENT_RETENTION};

fn integration_pk(id: &EndpointId) -> String {
    format!("INTEGRATION#{id}")
}

fn account_part(account: Option<AccountId>) -> String {
    account.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

fn taken_pk(provider: Provider, account: Option<AccountId>, event_id: &str) -> String {
    format!("EVENT#{provider}#{}#{}", account_part(account), hex::encode(Sha256::digest(event_id.as_bytes())))
}

fn events_gsi(account: Option<AccountId>) -> String {
    format!("EVENTS#{}", account_part(account))
}

#[async_trait]
impl IntegrationStore for DynamoStore {
    async fn create_integration(&self, integration: &Integration) -> Result<(), StoreError> {
        let mut item = key(integration_pk(&integration.id));
        item.insert("doc".into(), to_doc(integration)?);
        item.insert("gsi1pk".into(), s(format!("{}#INTEGRATIONS", account_pk(integration.account_id))));
        item.insert("gsi1sk".into(), s(format!("{}#{}", rfc3339(integration.created_at), integration.id)));
        self.put(item, Some("attribute_not_exists(pk)")).await
    }

    async fn find_integration(&self, id: &EndpointId) -> Result<Option<Integration>, StoreError> {
        self.get(integration_pk(id), true).await?.as_ref().map(doc_of).transpose()
    }

    async fn list_integrations(&self, account: AccountId) -> Result<Vec<Integration>, StoreError> {
        self.query_gsi(format!("{}#INTEGRATIONS", account_pk(account))).await?.iter().map(doc_of).collect()
    }

    async fn delete_integration(&self, account: AccountId, id: &EndpointId) -> Result<bool, StoreError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(integration_pk(id))))
            .condition_expression("gsi1pk = :owner")
            .expression_attribute_values(":owner", s(format!("{}#INTEGRATIONS", account_pk(account))))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => Ok(false),
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn event_taken(&self, provider: Provider, account: Option<AccountId>, event_id: &str) -> Result<bool, StoreError> {
        Ok(self.get(taken_pk(provider, account, event_id), true).await?.is_some())
    }

    async fn record_event(&self, event: &ReceivedEvent) -> Result<(), StoreError> {
        let receipt = uuid::Uuid::new_v4().simple().to_string();
        let pk = if event.outcome.is_final() {
            taken_pk(event.provider, event.account_id, &event.event_id)
        } else {
            format!("RECEIVED#{receipt}")
        };
        let received_ms = event.received_at.unix_timestamp_nanos() / 1_000_000;
        // Events received in the same millisecond keep the order they arrived in.
        let arrival = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let mut item = key(pk);
        item.insert("doc".into(), to_doc(event)?);
        item.insert("gsi1pk".into(), s(events_gsi(event.account_id)));
        item.insert("gsi1sk".into(), s(format!("{received_ms:015}#{arrival:020}#{receipt}")));
        item.insert("expires_at".into(), n((event.received_at + EVENT_RETENTION).unix_timestamp()));
        self.put(item, None).await
    }

    async fn list_events(&self, account: Option<AccountId>, limit: u32) -> Result<Vec<ReceivedEvent>, StoreError> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.query_gsi_with(events_gsi(account), true, limit).await?.iter().map(doc_of).collect()
    }
}
