//! Idempotency records: the `IDEM#` items.

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use time::OffsetDateTime;

use super::{get_n, get_s, key, n, s, sdk_error, DynamoStore};
use crate::domain::{AccountId, IdempotencyBegin, IdempotencyKey, StoredResponse, IDEMPOTENCY_TTL, IN_FLIGHT_LEASE};
use crate::ports::{IdempotencyStore, StoreError};

fn epoch_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn idempotency_pk(account: AccountId, key: &IdempotencyKey) -> String {
    format!("IDEM#{account}#{}", key.hash())
}

#[async_trait]
impl IdempotencyStore for DynamoStore {
    async fn begin(
        &self,
        account: AccountId,
        key: &IdempotencyKey,
        fingerprint: &str,
        now: OffsetDateTime,
    ) -> Result<IdempotencyBegin, StoreError> {
        let pk = idempotency_pk(account, key);
        let mut item = self::key(&pk);
        item.insert("fingerprint".into(), s(fingerprint));
        item.insert("lease_until".into(), n(epoch_ms(now + IN_FLIGHT_LEASE)));
        item.insert("expires_at".into(), n((now + IDEMPOTENCY_TTL).unix_timestamp()));
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(
                "attribute_not_exists(pk) OR expires_at <= :now_s OR (attribute_not_exists(#status) AND lease_until <= :now_ms)",
            )
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":now_s", n(now.unix_timestamp()))
            .expression_attribute_values(":now_ms", n(epoch_ms(now)))
            .return_values_on_condition_check_failure(aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        let old = match result {
            Ok(_) => return Ok(IdempotencyBegin::Started),
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => match se.err() {
                aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(e) => e.item().cloned(),
                _ => None,
            },
            Err(e) => return Err(sdk_error(e)),
        };
        let old = match old {
            Some(item) => item,
            None => match self.get(pk, true).await? {
                Some(item) => item,
                None => return Ok(IdempotencyBegin::InFlight),
            },
        };
        if get_s(&old, "fingerprint")? != fingerprint {
            return Ok(IdempotencyBegin::Mismatch);
        }
        match old.get("status") {
            None => Ok(IdempotencyBegin::InFlight),
            Some(_) => Ok(IdempotencyBegin::Replay(StoredResponse { status: get_n(&old, "status")?, body: get_s(&old, "body")? })),
        }
    }

    async fn finish(&self, account: AccountId, key: &IdempotencyKey, response: &StoredResponse, now: OffsetDateTime) -> Result<(), StoreError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self::key(idempotency_pk(account, key))))
            .update_expression("SET #status = :st, body = :b, expires_at = :exp")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":st", n(response.status))
            .expression_attribute_values(":b", s(&response.body))
            .expression_attribute_values(":exp", n((now + IDEMPOTENCY_TTL).unix_timestamp()))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    async fn abandon(&self, account: AccountId, key: &IdempotencyKey) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self::key(idempotency_pk(account, key))))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}
