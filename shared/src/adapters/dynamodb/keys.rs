//! API keys as the request path reads them: key items by hash, and their last use.

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use time::OffsetDateTime;

use super::{doc_of, get_s, key, key_pk, s, sdk_error, DynamoStore, Item};
use crate::adapters::record::rfc3339;
use crate::domain::{ApiKeyRecord, KeyHash};
use crate::ports::{KeyStore, StoreError};

/// A key item: its document, with `last_used_at` kept as its own attribute (so recording a
/// use is one small update).
pub(super) fn key_record_of(item: &Item) -> Result<ApiKeyRecord, StoreError> {
    let mut record: ApiKeyRecord = doc_of(item)?;
    if let Ok(t) = get_s(item, "last_used_at") {
        record.last_used_at = Some(crate::adapters::record::parse_rfc3339(&t)?);
    }
    Ok(record)
}

#[async_trait]
impl KeyStore for DynamoStore {
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.get(key_pk(hash.as_str()), false).await?.as_ref().map(key_record_of).transpose()
    }

    async fn touch_key(&self, hash: &KeyHash, now: OffsetDateTime) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(key_pk(hash.as_str()))))
            .update_expression("SET last_used_at = :t")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":t", s(rfc3339(now)))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => Ok(()),
            Err(e) => Err(sdk_error(e)),
        }
    }
}
