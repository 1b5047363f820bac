//! Idempotency keys: a client may send `Idempotency-Key` with a POST or PATCH; the first
//! response is kept for 24 hours and replayed for a retry of the same request.

use sha2::{Digest, Sha256};
use time::Duration;

/// How long a response is kept for replay.
pub const IDEMPOTENCY_TTL: Duration = Duration::hours(24);
/// How long a request holding a key may run before the key is free again (its worker died).
pub const IN_FLIGHT_LEASE: Duration = Duration::seconds(60);
/// Longest key accepted.
pub const IDEMPOTENCY_KEY_MAX_CHARS: usize = 255;

/// A key that is empty, too long or not visible ASCII.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX_CHARS} visible ASCII characters")]
pub struct InvalidIdempotencyKey;

/// A checked key, kept only as its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// # Errors
    /// [`InvalidIdempotencyKey`].
    pub fn parse(raw: &str) -> Result<Self, InvalidIdempotencyKey> {
        if raw.is_empty() || raw.len() > IDEMPOTENCY_KEY_MAX_CHARS || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidIdempotencyKey);
        }
        Ok(Self(super::hex_lower(&Sha256::digest(raw.as_bytes()))))
    }

    /// Hex SHA-256 of the key.
    #[must_use]
    pub fn hash(&self) -> &str {
        &self.0
    }
}

/// Hex SHA-256 of what identifies a request: method, path and body.
#[must_use]
pub fn request_fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(method.as_bytes());
    hasher.update(b" ");
    hasher.update(path.as_bytes());
    hasher.update(b"\n");
    hasher.update(body);
    super::hex_lower(&hasher.finalize())
}

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
}

/// What starting a request under a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// The key is now held by this request.
    Started,
    /// The same key is held by a request still running.
    InFlight,
    /// The key was used with a different request.
    Mismatch,
    /// The same request finished before: its response.
    Replay(StoredResponse),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_over_255_characters_or_empty_are_refused() {
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert_eq!(IdempotencyKey::parse(&"k".repeat(256)), Err(InvalidIdempotencyKey));
        assert_eq!(IdempotencyKey::parse(""), Err(InvalidIdempotencyKey));
    }

    #[test]
    fn keys_of_visible_ascii_only_are_accepted() {
        assert!(IdempotencyKey::parse("!signup-7f3a9c~").is_ok());
        for bad in ["signup 7f3a9c", " signup", "signup\t", "sign\u{7f}up", "signup-\u{e9}"] {
            assert_eq!(IdempotencyKey::parse(bad), Err(InvalidIdempotencyKey), "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_differ_by_body_and_path() {
        let a = request_fingerprint("POST", "/a", b"{}");
        assert_ne!(a, request_fingerprint("POST", "/a", b"{ }"));
        assert_ne!(a, request_fingerprint("POST", "/b", b"{}"));
        assert_eq!(a, request_fingerprint("POST", "/a", b"{}"));
    }
}
