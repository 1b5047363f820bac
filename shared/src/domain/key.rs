//! API keys: generated once, shown once, stored only as a SHA-256 hash.

use rand::RngCore;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{AccountId, KeyId, RateLimit};

/// Every key starts with this, so secret scanners can recognise a leaked one.
pub const KEY_PREFIX: &str = "chq_";
/// How many leading characters of a key are kept to help a person tell keys apart.
const DISPLAY_PREFIX_CHARS: usize = 12;

/// A raw secret key. Exists only between creation and the one time it is printed, and in the
/// header of a request; never stored, never logged (its `Debug` is redacted).
pub struct ApiKey(String);

impl ApiKey {
    /// A new random key: `chq_` followed by 48 hex digits (192 bits).
    #[must_use]
    pub fn generate() -> Self {
        let mut bytes = [0u8; 24];
        rand::rng().fill_bytes(&mut bytes);
        Self(format!("{KEY_PREFIX}{}", super::hex_lower(&bytes)))
    }

    /// Wraps a key as presented by a client or a test fixture.
    #[must_use]
    pub fn from_raw(raw: &str) -> Self {
        Self(raw.to_owned())
    }

    /// The secret itself, for printing once at creation.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The hash under which the key is stored and looked up.
    #[must_use]
    pub fn hash(&self) -> KeyHash {
        Self::hash_of(&self.0)
    }

    /// The hash of a key as presented, without copying it first.
    #[must_use]
    pub fn hash_of(raw: &str) -> KeyHash {
        KeyHash(super::hex_lower(&Sha256::digest(raw.as_bytes())))
    }

    /// The first characters of the key, safe to store and show in listings.
    #[must_use]
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(DISPLAY_PREFIX_CHARS).collect()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Hex SHA-256 of a raw key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KeyHash(String);

impl KeyHash {
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Rebuilds a hash read back from storage.
    #[must_use]
    pub fn from_stored(hex: String) -> Self {
        Self(hex)
    }
}

/// What is stored about a key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApiKeyRecord {
    pub key_id: KeyId,
    pub account_id: AccountId,
    pub hash: KeyHash,
    pub prefix: String,
    pub label: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub revoked_at: Option<OffsetDateTime>,
    /// When a request last used the key (written at most once a minute).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_used_at: Option<OffsetDateTime>,
    /// A per-key override of [`RateLimit::DEFAULT`].
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

impl ApiKeyRecord {
    /// A record for a freshly generated key.
    #[must_use]
    pub fn new(key: &ApiKey, account_id: AccountId, label: Option<String>, now: OffsetDateTime) -> Self {
        Self {
            key_id: KeyId::new(),
            account_id,
            hash: key.hash(),
            prefix: key.display_prefix(),
            label,
            created_at: now,
            revoked_at: None,
            last_used_at: None,
            rate_limit: None,
        }
    }

    #[must_use]
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }

    /// The limit that applies to this key.
    #[must_use]
    pub fn effective_rate_limit(&self) -> RateLimit {
        self.rate_limit.unwrap_or(RateLimit::DEFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_carry_the_scanner_prefix_and_differ() {
        let (a, b) = (ApiKey::generate(), ApiKey::generate());
        assert!(a.expose().starts_with(KEY_PREFIX));
        assert_eq!(a.expose().len(), KEY_PREFIX.len() + 48);
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn stored_record_holds_no_secret() {
        let key = ApiKey::generate();
        let record = ApiKeyRecord::new(&key, AccountId::new(), None, OffsetDateTime::UNIX_EPOCH);
        let json = serde_json::to_string(&record).unwrap();
        assert!(!json.contains(key.expose()));
        assert_eq!(record.hash, ApiKey::from_raw(key.expose()).hash());
    }

    #[test]
    fn debug_output_is_redacted() {
        assert_eq!(format!("{:?}", ApiKey::generate()), "ApiKey(<redacted>)");
    }
}
