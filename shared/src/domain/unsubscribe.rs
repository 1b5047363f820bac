//! Unsubscribe tokens: an HMAC-SHA256 signature over (account, prospect) with a secret from
//! configuration, so the link in an email needs no API key and cannot be forged or moved to
//! another prospect.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{AccountId, ProspectId};

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted, in bytes.
pub const SECRET_MIN_BYTES: usize = 32;
const DOMAIN_TAG: &[u8] = b"cadenhq-unsubscribe-v1:";

/// A token that is malformed or whose signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid unsubscribe token")]
pub struct InvalidToken;

/// A secret too short to sign with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the unsubscribe secret must be at least {SECRET_MIN_BYTES} bytes")]
pub struct WeakSecret;

/// The signing secret. Its `Debug` is redacted.
#[derive(Clone)]
pub struct UnsubscribeSecret(Vec<u8>);

impl std::fmt::Debug for UnsubscribeSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnsubscribeSecret(<redacted>)")
    }
}

impl UnsubscribeSecret {
    /// # Errors
    /// [`WeakSecret`] under [`SECRET_MIN_BYTES`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, WeakSecret> {
        let bytes = bytes.into();
        if bytes.len() < SECRET_MIN_BYTES {
            return Err(WeakSecret);
        }
        Ok(Self(bytes))
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        // HMAC takes keys of any length; this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(DOMAIN_TAG);
        mac.update(payload.as_bytes());
        mac
    }

    /// The token for one prospect: 128 hex digits (account, prospect, signature).
    #[must_use]
    pub fn sign(&self, account: AccountId, prospect: ProspectId) -> String {
        let payload = format!("{}{}", simple(&account.to_string()), simple(&prospect.to_string()));
        let signature = super::hex_lower(&self.mac(&payload).finalize().into_bytes());
        format!("{payload}{signature}")
    }

    /// The (account, prospect) a token was signed for.
    ///
    /// # Errors
    /// [`InvalidToken`] for anything but an untampered token signed with this secret.
    pub fn verify(&self, token: &str) -> Result<(AccountId, ProspectId), InvalidToken> {
        if token.len() != 128 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidToken);
        }
        let (payload, signature) = token.split_at(64);
        let signature = hex::decode(signature).map_err(|_| InvalidToken)?;
        self.mac(payload).verify_slice(&signature).map_err(|_| InvalidToken)?;
        let account = AccountId::parse(&payload[..32]).map_err(|_| InvalidToken)?;
        let prospect = ProspectId::parse(&payload[32..]).map_err(|_| InvalidToken)?;
        Ok((account, prospect))
    }
}

fn simple(hyphenated: &str) -> String {
    hyphenated.replace('-', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> UnsubscribeSecret {
        UnsubscribeSecret::new(vec![byte; 32]).unwrap()
    }

    #[test]
    fn a_signed_token_verifies_to_its_prospect() {
        let (account, prospect) = (AccountId::new(), ProspectId::new());
        assert_eq!(secret(1).verify(&secret(1).sign(account, prospect)), Ok((account, prospect)));
    }

    #[test]
    fn a_tampered_or_foreign_token_is_rejected() {
        let token = secret(1).sign(AccountId::new(), ProspectId::new());
        let mut tampered = token.clone().into_bytes();
        tampered[10] = if tampered[10] == b'a' { b'b' } else { b'a' };
        assert_eq!(secret(1).verify(&String::from_utf8(tampered).unwrap()), Err(InvalidToken));
        assert_eq!(secret(2).verify(&token), Err(InvalidToken));
        assert_eq!(secret(1).verify("short"), Err(InvalidToken));
        assert_eq!(secret(1).verify(&"é".repeat(64)), Err(InvalidToken));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(UnsubscribeSecret::new(b"short".to_vec()).unwrap_err(), WeakSecret);
    }
}
