//! Accounts, keys and campaigns as the admin side manages them: their items and the key id pointers.

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
use time::OffsetDateTime;

use super::keys::key_record_of;
use super::{account_pk, campaign_pk, doc_of, get_s, key, key_id_pk, key_pk, n, s, sdk_error, to_doc, DynamoStore, Item};
use crate::adapters::record::rfc3339;
use crate::domain::{Account, AccountId, ApiKeyRecord, Campaign, CampaignId, KeyId, RateLimit};
use crate::ports::{CampaignReader, AdminStore, Conflict, StoreError};

#[async_trait]
impl AdminStore for DynamoStore {
    async fn create_account(&self, account: &Account) -> Result<(), StoreError> {
        let mut item = key(account_pk(account.id));
        item.insert("doc".into(), to_doc(account)?);
        self.put(item, Some("attribute_not_exists(pk)")).await
    }

    async fn get_account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        self.get(account_pk(id), true).await?.as_ref().map(doc_of).transpose()
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        let mut start = None;
        loop {
            let out = self.scan_accounts(start, false).await?;
            if out.count > 0 {
                return Ok(false);
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(true);
            }
        }
    }

    async fn create_key(&self, record: &ApiKeyRecord) -> Result<(), StoreError> {
        let mut item = key(key_pk(record.hash.as_str()));
        item.insert("doc".into(), to_doc(record)?);
        item.insert("gsi1pk".into(), s(format!("{}#KEYS", account_pk(record.account_id))));
        item.insert("gsi1sk".into(), s(format!("{}#{}", rfc3339(record.created_at), record.key_id)));
        let put = Put::builder().table_name(&self.table).set_item(Some(item)).condition_expression("attribute_not_exists(pk)").build().map_err(StoreError::other)?;
        let mut pointer = key(key_id_pk(record.key_id));
        pointer.insert("hash".into(), s(record.hash.as_str()));
        let put_pointer = Put::builder().table_name(&self.table).set_item(Some(pointer)).condition_expression("attribute_not_exists(pk)").build().map_err(StoreError::other)?;
        self.transact(
            vec![TransactWriteItem::builder().put(put).build(), TransactWriteItem::builder().put(put_pointer).build()],
            &[Conflict::Version, Conflict::Version],
        )
        .await
    }

    async fn revoke_key(&self, id: KeyId, now: OffsetDateTime) -> Result<bool, StoreError> {
        let Some(pointer) = self.get(key_id_pk(id), true).await? else { return Ok(false) };
        let pk = key_pk(&get_s(&pointer, "hash")?);
        let Some(mut item) = self.get(pk, true).await? else { return Ok(false) };
        let mut record: ApiKeyRecord = doc_of(&item)?;
        record.revoked_at.get_or_insert(now);
        item.insert("doc".into(), to_doc(&record)?);
        self.put(item, None).await?;
        Ok(true)
    }

    async fn list_keys(&self, account: AccountId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.query_gsi(format!("{}#KEYS", account_pk(account))).await?.iter().map(key_record_of).collect()
    }

    async fn set_rate_limit(&self, id: KeyId, limit: Option<RateLimit>) -> Result<bool, StoreError> {
        let Some(pointer) = self.get(key_id_pk(id), true).await? else { return Ok(false) };
        let pk = key_pk(&get_s(&pointer, "hash")?);
        let Some(item) = self.get(pk.clone(), true).await? else { return Ok(false) };
        let mut record: ApiKeyRecord = doc_of(&item)?;
        record.rate_limit = limit;
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(pk)))
            .update_expression("SET doc = :doc")
            .expression_attribute_values(":doc", to_doc(&record)?)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(true)
    }

    async fn create_campaign(&self, campaign: &Campaign, make_default: bool) -> Result<(), StoreError> {
        let mut item = key(campaign_pk(campaign.id));
        item.insert("doc".into(), to_doc(campaign)?);
        item.insert("sv".into(), n(campaign.sending_version));
        item.insert("gsi1pk".into(), s(format!("{}#CAMPAIGNS", account_pk(campaign.account_id))));
        item.insert("gsi1sk".into(), s(format!("{}#{}", rfc3339(campaign.created_at), campaign.id)));
        self.put(item, Some("attribute_not_exists(pk)")).await?;
        if make_default {
            let mut account = self
                .get_account(campaign.account_id)
                .await?
                .ok_or_else(|| StoreError::other("campaign's account does not exist"))?;
            account.default_campaign_id = Some(campaign.id);
            self.create_or_replace_account(&account).await?;
        }
        Ok(())
    }

    async fn list_campaigns(&self, account: AccountId) -> Result<Vec<Campaign>, StoreError> {
        self.query_gsi(format!("{}#CAMPAIGNS", account_pk(account))).await?.iter().map(doc_of).collect()
    }

    async fn replace_campaign(&self, campaign: &Campaign, expected_version: u64) -> Result<bool, StoreError> {
        let condition = if expected_version == 0 {
            "attribute_exists(pk) AND (attribute_not_exists(sv) OR sv = :expected)"
        } else {
            "sv = :expected"
        };
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(campaign_pk(campaign.id))))
            .update_expression("SET doc = :doc, sv = :v")
            .condition_expression(condition)
            .expression_attribute_values(":doc", to_doc(campaign)?)
            .expression_attribute_values(":v", n(campaign.sending_version))
            .expression_attribute_values(":expected", n(expected_version))
            .send()
            .await;
        match result {
            Ok(_) => {}
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => return Ok(false),
            Err(e) => return Err(sdk_error(e)),
        }
        if !campaign.active {
            if let Some(mut account) = self.get_account(campaign.account_id).await? {
                if account.default_campaign_id == Some(campaign.id) {
                    account.default_campaign_id = None;
                    self.create_or_replace_account(&account).await?;
                }
            }
        }
        Ok(true)
    }

    async fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        let mut accounts: Vec<Account> = Vec::new();
        let mut start = None;
        loop {
            let out = self.scan_accounts(start, true).await?;
            for item in out.items() {
                accounts.push(doc_of(item)?);
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        accounts.sort_by_key(|a| a.created_at);
        Ok(accounts)
    }
}

impl DynamoStore {
    /// One page of a scan for the account items, from `start`.
    async fn scan_accounts(
        &self,
        start: Option<Item>,
        consistent: bool,
    ) -> Result<aws_sdk_dynamodb::operation::scan::ScanOutput, StoreError> {
        self.client
            .scan()
            .table_name(&self.table)
            .filter_expression("begins_with(pk, :a)")
            .expression_attribute_values(":a", s("ACCOUNT#"))
            .consistent_read(consistent)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(sdk_error)
    }

    async fn create_or_replace_account(&self, account: &Account) -> Result<(), StoreError> {
        let mut item = key(account_pk(account.id));
        item.insert("doc".into(), to_doc(account)?);
        self.put(item, None).await
    }
}

#[async_trait]
impl CampaignReader for DynamoStore {
    async fn get_campaign(&self, id: CampaignId) -> Result<Option<Campaign>, StoreError> {
        self.get(campaign_pk(id), true).await?.as_ref().map(doc_of).transpose()
    }
}
