//! `GET /api/v1/prospects`: the query string parsed into a listing query, and the opaque
//! cursor that carries a page's end to the next request.

use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::ApiError;
use crate::domain::{AccountId, CampaignId, ListPosition, ListQuery, NormalizedEmail, ProspectStatus, DEFAULT_PAGE, MAX_PAGE};

/// A parsed listing request.
#[derive(Debug)]
pub(super) struct ListRequest {
    pub query: ListQuery,
    pub email: Option<NormalizedEmail>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

fn time_param(name: &str, raw: &str) -> Result<OffsetDateTime, ApiError> {
    OffsetDateTime::parse(raw, &Rfc3339).map_err(|_| bad(format!("{name} must be an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z")))
}

/// Parses the query string of a listing for `account`. Unknown parameters are ignored, as a
/// parameter given twice is refused.
pub(super) fn parse(account: AccountId, raw_query: Option<&str>) -> Result<ListRequest, ApiError> {
    let mut query = ListQuery {
        account,
        limit: DEFAULT_PAGE,
        before: None,
        status: None,
        campaign: None,
        created_after: None,
        updated_after: None,
    };
    let mut email = None;
    let mut seen = Vec::new();
    for (name, value) in form_urlencoded::parse(raw_query.unwrap_or_default().as_bytes()) {
        if seen.contains(&name) {
            return Err(bad(format!("{name} is given more than once")));
        }
        seen.push(name.clone());
        match name.as_ref() {
            "limit" => {
                query.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| bad(format!("limit must be an integer from 1 to {MAX_PAGE}")))?;
            }
            "cursor" => query.before = Some(open_cursor(account, &value)?),
            "email" => email = Some(NormalizedEmail::parse(&value).map_err(|_| bad("email must be an email address"))?),
            "status" => query.status = Some(ProspectStatus::parse(&value).map_err(|e| bad(e.to_string()))?),
            "campaign_id" => query.campaign = Some(CampaignId::parse(&value).map_err(|_| bad("campaign_id must be a campaign id"))?),
            "created_after" => query.created_after = Some(time_param("created_after", &value)?),
            "updated_after" => query.updated_after = Some(time_param("updated_after", &value)?),
            _ => {}
        }
    }
    Ok(ListRequest { query, email })
}

/// The integrity check of a cursor: binds it to its account, so a cursor that was changed,
/// or is another account's, is refused.
fn check(account: AccountId, position: &str) -> String {
    let digest = Sha256::new().chain_update(b"cadenhq-cursor-v1\0").chain_update(account.to_string()).chain_update(b"\0").chain_update(position).finalize();
    hex::encode(&digest[..12])
}

/// The cursor naming the end of a page (the position of its last prospect).
pub(super) fn cursor(account: AccountId, last: ListPosition) -> String {
    let position = last.key();
    format!("{}.{}", hex::encode(&position), check(account, &position))
}

fn open_cursor(account: AccountId, raw: &str) -> Result<ListPosition, ApiError> {
    let invalid = || bad("cursor is not one this API gave for this account");
    let (position, mac) = raw.split_once('.').ok_or_else(invalid)?;
    let position = String::from_utf8(hex::decode(position).map_err(|_| invalid())?).map_err(|_| invalid())?;
    if check(account, &position) != mac {
        return Err(invalid());
    }
    ListPosition::parse_key(&position).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ProspectId;

    #[test]
    fn a_cursor_opens_for_its_account_only_and_not_once_changed() {
        let (account, other) = (AccountId::new(), AccountId::new());
        let position = ListPosition { created_ms: 1_767_225_600_123, id: ProspectId::new() };
        let cursor = cursor(account, position);
        assert_eq!(open_cursor(account, &cursor).unwrap(), position);
        assert!(open_cursor(other, &cursor).is_err(), "foreign");
        let mut tampered = cursor.into_bytes();
        tampered[3] = if tampered[3] == b'1' { b'2' } else { b'1' };
        assert!(open_cursor(account, &String::from_utf8(tampered).unwrap()).is_err(), "tampered");
        for junk in ["", ".", "zz.zz", "ab", "\u{1F600}.x"] {
            assert!(open_cursor(account, junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn parameters_are_checked() {
        let account = AccountId::new();
        let ok = parse(account, Some("limit=100&status=bounced&email=Ann%40Example.com&created_after=2026-01-01T00:00:00Z&other=1")).unwrap();
        assert_eq!((ok.query.limit, ok.query.status), (100, Some(ProspectStatus::Bounced)));
        assert_eq!(ok.email.unwrap().as_str(), "ann@example.com");
        assert_eq!(parse(account, None).unwrap().query.limit, DEFAULT_PAGE);
        for bad in ["limit=0", "limit=101", "limit=x", "status=won", "email=nope", "campaign_id=1", "created_after=yesterday", "updated_after=", "limit=1&limit=2", "cursor=abc"] {
            assert!(parse(account, Some(bad)).is_err(), "{bad}");
        }
    }
}
