//! Identifiers: UUID newtypes that can only be built from a valid UUID.

use std::fmt;
use std::str::FromStr;

/// A string that is not a UUID where one was required.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} must be a UUID")]
pub struct IdError(pub &'static str);

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $label:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(uuid::Uuid);

        impl $name {
            /// A fresh random identifier.
            #[must_use]
            pub fn new() -> Self {
                Self(uuid::Uuid::new_v4())
            }

            /// Appends the JSON string this id serializes to (a UUID never needs escaping).
            #[allow(dead_code, reason = "not every kind of id is written by hand")]
            pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
                let mut buf = [0; uuid::fmt::Hyphenated::LENGTH];
                out.push(b'"');
                out.extend_from_slice(self.0.hyphenated().encode_lower(&mut buf).as_bytes());
                out.push(b'"');
            }

            /// The id of these 16 bytes (a digest's, say: an id derived from a name).
            #[must_use]
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(uuid::Uuid::from_bytes(bytes))
            }

            /// The id's 16 bytes.
            #[must_use]
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// Parses the textual form of a UUID.
            ///
            /// # Errors
            /// [`IdError`] when `raw` is not a UUID.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                uuid::Uuid::parse_str(raw.trim()).map(Self).map_err(|_| IdError($label))
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

uuid_id!(/** An account (tenant). */ AccountId, "account_id");
uuid_id!(/** A prospect, as CadenHQ names it. */ ProspectId, "prospect_id");
uuid_id!(/** A campaign. */ CampaignId, "campaign_id");
uuid_id!(/** An API key's public identifier (never the secret). */ KeyId, "key_id");
uuid_id!(/** One enrollment of one prospect in one campaign. */ EnrollmentId, "enrollment_id");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_their_text() {
        let id = ProspectId::new();
        assert_eq!(ProspectId::parse(&id.to_string()), Ok(id));
    }

    #[test]
    fn write_json_is_the_serde_form() {
        let id = EnrollmentId::new();
        let mut out = Vec::new();
        id.write_json(&mut out);
        assert_eq!(out, serde_json::to_vec(&id).unwrap());
    }

    #[test]
    fn non_uuid_is_rejected_with_the_field_name() {
        assert_eq!(CampaignId::parse("nope").unwrap_err().to_string(), "campaign_id must be a UUID");
    }
}
