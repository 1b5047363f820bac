//! Campaigns: an ordered list of email steps, each sent a delay after the previous one.
//! Defined by a JSON file given to `cadenhq campaigns create` (format in the README).

use time::OffsetDateTime;

use super::{AccountId, CampaignId};

/// Upper bounds that keep a definition sane.
const MAX_STEPS: usize = 50;
const MAX_DELAY_SECONDS: u64 = 365 * 24 * 3600;
const MAX_TEMPLATE_CHARS: usize = 100_000;

/// Why a campaign definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CampaignError {
    #[error("campaign file is not valid JSON: {0}")]
    Json(String),
    #[error("campaign {0}")]
    Invalid(String),
}

/// One step: wait `delay_seconds` after the previous step (or enrollment), then send.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub delay_seconds: u64,
    pub subject: String,
    pub body: String,
}

/// The campaign file as written by a person.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignDefinition {
    pub name: String,
    pub steps: Vec<Step>,
}

impl CampaignDefinition {
    /// Parses and checks a campaign file.
    ///
    /// # Errors
    /// [`CampaignError`] naming the first problem found.
    pub fn parse(json: &str) -> Result<Self, CampaignError> {
        let def: Self = serde_json::from_str(json).map_err(|e| CampaignError::Json(e.to_string()))?;
        if def.name.trim().is_empty() || def.name.chars().count() > 255 {
            return Err(CampaignError::Invalid("name must be 1 to 255 characters".into()));
        }
        if def.steps.is_empty() || def.steps.len() > MAX_STEPS {
            return Err(CampaignError::Invalid(format!("must have 1 to {MAX_STEPS} steps")));
        }
        for (i, step) in def.steps.iter().enumerate() {
            let n = i + 1;
            if step.delay_seconds > MAX_DELAY_SECONDS {
                return Err(CampaignError::Invalid(format!("step {n}: delay_seconds is over one year")));
            }
            if step.subject.trim().is_empty() || step.body.trim().is_empty() {
                return Err(CampaignError::Invalid(format!("step {n}: subject and body are required")));
            }
            if step.subject.len() + step.body.len() > MAX_TEMPLATE_CHARS {
                return Err(CampaignError::Invalid(format!("step {n}: templates are too long")));
            }
        }
        Ok(def)
    }
}

/// A stored campaign.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Campaign {
    pub id: CampaignId,
    pub account_id: AccountId,
    pub name: String,
    pub active: bool,
    pub steps: Vec<Step>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl Campaign {
    #[must_use]
    pub fn new(account_id: AccountId, def: CampaignDefinition, now: OffsetDateTime) -> Self {
        Self { id: CampaignId::new(), account_id, name: def.name, active: true, steps: def.steps, created_at: now }
    }

    /// Whether a key of `account` may enroll prospects in this campaign.
    #[must_use]
    pub fn is_usable_by(&self, account: AccountId) -> bool {
        self.active && self.account_id == account
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_file_parses() {
        let def = CampaignDefinition::parse(
            r#"{"name":"Welcome","steps":[{"delay_seconds":0,"subject":"Hi","body":"Hello"}]}"#,
        )
        .unwrap();
        assert_eq!(def.steps.len(), 1);
    }

    #[test]
    fn a_campaign_without_steps_is_refused() {
        assert!(matches!(
            CampaignDefinition::parse(r#"{"name":"x","steps":[]}"#),
            Err(CampaignError::Invalid(_))
        ));
    }

    #[test]
    fn unknown_fields_in_a_file_are_refused() {
        assert!(matches!(
            CampaignDefinition::parse(r#"{"name":"x","stepz":[]}"#),
            Err(CampaignError::Json(_))
        ));
    }
}
