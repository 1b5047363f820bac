//! `NormalizedEmail`: the only way to turn client input into the upsert key.

use sha2::{Digest, Sha256};

/// The longest address accepted (RFC 5321's path limit less the angle brackets).
pub const EMAIL_MAX_CHARS: usize = 254;

/// Why a string is not an acceptable email address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    #[error("email is required")]
    Blank,
    #[error("email must be at most {EMAIL_MAX_CHARS} characters")]
    TooLong,
    #[error("email is not a valid email address")]
    Invalid,
}

/// An email address as sent (trimmed) together with its normalized form
/// (trimmed and lowercased), which is what prospects are upserted by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedEmail {
    normalized: String,
    original: String,
    /// [`NormalizedEmail::key_hash`], computed once: every request needs it for a storage key,
    /// a log field or a job, often more than once.
    key_hash: String,
}

impl NormalizedEmail {
    /// Trims, checks and lowercases an address.
    ///
    /// # Errors
    /// [`EmailError::Blank`] for an empty or all-whitespace string, [`EmailError::TooLong`] over
    /// [`EMAIL_MAX_CHARS`], [`EmailError::Invalid`] when it is not `local@domain.tld` without
    /// spaces or control characters.
    pub fn parse(raw: &str) -> Result<Self, EmailError> {
        let original = raw.trim();
        if original.is_empty() {
            return Err(EmailError::Blank);
        }
        if super::more_chars_than(original, EMAIL_MAX_CHARS) {
            return Err(EmailError::TooLong);
        }
        let (local, domain) = original.rsplit_once('@').ok_or(EmailError::Invalid)?;
        if !(local_part_ok(local) && domain_ok(domain)) {
            return Err(EmailError::Invalid);
        }
        Ok(Self::from_parts(lowercase(original), original.to_owned()))
    }

    /// The normalized address: the upsert key.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.normalized
    }

    /// The address as the client sent it, trimmed.
    #[must_use]
    pub fn original(&self) -> &str {
        &self.original
    }

    /// Hex SHA-256 of the normalized address: used in storage keys and log lines, so that
    /// neither ever carries the raw address.
    #[must_use]
    pub fn key_hash(&self) -> &str {
        &self.key_hash
    }

    /// Rebuilds a stored address without re-validating the rules of today.
    #[must_use]
    pub fn from_stored(original: String) -> Self {
        Self::from_parts(lowercase(original.trim()), original)
    }

    fn from_parts(normalized: String, original: String) -> Self {
        let key_hash = super::hex_lower(&Sha256::digest(normalized.as_bytes()));
        Self { normalized, original, key_hash }
    }
}

/// `str::to_lowercase`, through the ASCII case mapping when that is the same thing.
fn lowercase(s: &str) -> String {
    if s.is_ascii() {
        s.to_ascii_lowercase()
    } else {
        s.to_lowercase()
    }
}

/// 1 to 64 bytes, none of them `@`, `<`, `>`, whitespace or a control character.
fn local_part_ok(local: &str) -> bool {
    !local.is_empty()
        && local.len() <= 64
        && local.chars().all(|c| !matches!(c, '@' | '<' | '>') && !c.is_whitespace() && !c.is_control())
}

/// At least two dot-separated labels, each non-empty, of letters, digits and inner hyphens.
fn domain_ok(domain: &str) -> bool {
    let mut labels = 0;
    for label in domain.split('.') {
        let ok = !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_alphanumeric() || c == '-');
        if !ok {
            return false;
        }
        labels += 1;
    }
    labels >= 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The address rules as first written, one check at a time.
    fn reference_ok(address: &str) -> bool {
        let Some((local, domain)) = address.rsplit_once('@') else { return false };
        let domain_ok = domain.split('.').count() >= 2
            && domain.split('.').all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'))
            && domain.chars().all(|c| c.is_alphanumeric() || c == '-' || c == '.');
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.contains('@')
            && local.chars().all(|c| !c.is_whitespace() && !c.is_control() && c != '<' && c != '>');
        domain_ok && local_ok
    }

    proptest! {
        #[test]
        fn the_rules_are_those_first_written(address in "[a-zA-Z0-9.@<> \t_+é\u{7f}\u{3000}-]{1,20}") {
            let trimmed = address.trim();
            prop_assume!(!trimmed.is_empty());
            prop_assert_eq!(NormalizedEmail::parse(&address).is_ok(), reference_ok(trimmed));
        }
    }

    #[test]
    fn uppercase_email_is_normalized_and_original_is_kept() {
        let e = NormalizedEmail::parse("  Jane.Doe@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "jane.doe@example.com");
        assert_eq!(e.original(), "Jane.Doe@Example.COM");
    }

    #[test]
    fn same_address_in_other_case_has_same_key() {
        let a = NormalizedEmail::parse("A@B.io").unwrap();
        let b = NormalizedEmail::parse("a@b.IO").unwrap();
        assert_eq!(a.key_hash(), b.key_hash());
        // The lowercase hex SHA-256 of the normalized address, as stored keys were written.
        assert_eq!(a.key_hash(), "0f3306f460edf2294d6c3acba4b0e24d19173d2f0a4a545ec55166767d5e83a4");
        assert_eq!(NormalizedEmail::from_stored("A@B.io".into()).key_hash(), a.key_hash());
    }

    #[test]
    fn blank_email_is_missing() {
        assert_eq!(NormalizedEmail::parse("   "), Err(EmailError::Blank));
    }

    #[test]
    fn malformed_addresses_are_invalid() {
        for bad in ["plain", "a@b", "@b.com", "a@.com", "a b@c.com", "a@b..com", "a@-b.com"] {
            assert_eq!(NormalizedEmail::parse(bad), Err(EmailError::Invalid), "{bad}");
        }
    }

    #[test]
    fn address_over_254_characters_is_too_long() {
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(NormalizedEmail::parse(&long), Err(EmailError::TooLong));
    }
}
