//! Campaigns: an ordered list of email steps, each sent a delay after the previous one.
//! Defined by a JSON file given to `cadenhq campaigns create` (format in the README).

use minijinja::{Environment, UndefinedBehavior, Value};
use time::{Duration, OffsetDateTime};

use super::{AccountId, CampaignId, Prospect};

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

/// A step's email with the prospect's fields filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedEmail {
    pub subject: String,
    pub text_body: String,
    pub html_body: String,
}

/// The template environment: variables that are missing render empty (also nested ones such
/// as `{{ metadata.company.name }}`), so a missing field never fails a send.
fn template_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            '\n' => out.push_str("<br>\n"),
            c => out.push(c),
        }
    }
    out
}

impl Step {
    /// Renders this step for a prospect. Variables: `email`, `external_id`, every text field
    /// (`first_name`, `display_name`, ... see [`TEXT_FIELDS`](super::TEXT_FIELDS)), `metadata` (an object: use
    /// `{{ metadata.plan }}`), `unsubscribe_url`. The subject and text body carry values as
    /// they are; the HTML body is the text body HTML-escaped, followed by the unsubscribe link.
    ///
    /// # Errors
    /// [`CampaignError::Invalid`] if a template fails at render time (its syntax was checked
    /// when the campaign was created, so this is rare: e.g. a filter applied to a wrong type).
    pub fn render(&self, prospect: &Prospect, unsubscribe_url: &str) -> Result<RenderedEmail, CampaignError> {
        let mut ctx = std::collections::BTreeMap::<&str, Value>::new();
        for (name, value) in prospect.fields.iter() {
            ctx.insert(name, Value::from(value));
        }
        ctx.insert("email", Value::from(prospect.email.original()));
        if let Some(ext) = &prospect.external_id {
            ctx.insert("external_id", Value::from(ext.as_str()));
        }
        ctx.insert("metadata", Value::from_serialize(&prospect.metadata));
        ctx.insert("unsubscribe_url", Value::from(unsubscribe_url));
        let env = template_env();
        let render = |source: &str| {
            env.render_str(source, &ctx).map_err(|e| CampaignError::Invalid(format!("template failed to render: {e}")))
        };
        let subject = render(&self.subject)?.replace(['\r', '\n'], " ");
        let body = render(&self.body)?;
        Ok(RenderedEmail {
            subject,
            text_body: format!("{body}\n\n--\nUnsubscribe: {unsubscribe_url}\n"),
            html_body: format!(
                "<!DOCTYPE html><html><body><p>{}</p><hr><p><a href=\"{}\">Unsubscribe</a></p></body></html>",
                html_escape(&body),
                html_escape(unsubscribe_url)
            ),
        })
    }
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
            let env = template_env();
            for (what, source) in [("subject", &step.subject), ("body", &step.body)] {
                env.template_from_str(source)
                    .map_err(|e| CampaignError::Invalid(format!("step {n}: {what} is not a valid template: {e}")))?;
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
    /// Every pause, oldest first; the last one is open while the campaign is paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pauses: Vec<Pause>,
    /// Bumped by every pause, resume and deactivation: a send is claimed only at the version
    /// the scheduler read, so none slips out after such a change is acknowledged.
    #[serde(default)]
    pub sending_version: u64,
}

/// One pause of a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pause {
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub until: Option<OffsetDateTime>,
}

/// Where a campaign stands for sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignState {
    /// Sends every due step and takes new enrollments.
    Active,
    /// Sends nothing until resumed; takes new enrollments, whose steps wait too.
    Paused,
    /// Deactivated: ends every running enrollment and takes no new ones.
    Inactive,
}

impl CampaignState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Inactive => "inactive",
        }
    }
}

/// A change of a campaign's sending state (`cadenhq campaigns pause|resume|deactivate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendingChange {
    Pause,
    Resume,
    Deactivate,
}

impl Campaign {
    #[must_use]
    pub fn new(account_id: AccountId, def: CampaignDefinition, now: OffsetDateTime) -> Self {
        Self {
            id: CampaignId::new(),
            account_id,
            name: def.name,
            active: true,
            steps: def.steps,
            created_at: now,
            pauses: Vec::new(),
            sending_version: 0,
        }
    }

    /// Whether the campaign sends, is paused, or was deactivated.
    #[must_use]
    pub fn state(&self) -> CampaignState {
        if !self.active {
            CampaignState::Inactive
        } else if self.pauses.last().is_some_and(|p| p.until.is_none()) {
            CampaignState::Paused
        } else {
            CampaignState::Active
        }
    }

    /// Applies a sending change at `now`, bumping [`Self::sending_version`].
    ///
    /// # Errors
    /// [`CampaignError::Invalid`] when the change does not apply (pausing a paused campaign,
    /// resuming one that is not paused, changing a deactivated one).
    pub fn apply(&mut self, change: SendingChange, now: OffsetDateTime) -> Result<(), CampaignError> {
        match (change, self.state()) {
            (_, CampaignState::Inactive) => return Err(CampaignError::Invalid("is deactivated".into())),
            (SendingChange::Pause, CampaignState::Paused) => return Err(CampaignError::Invalid("is already paused".into())),
            (SendingChange::Resume, CampaignState::Active) => return Err(CampaignError::Invalid("is not paused".into())),
            (SendingChange::Pause, CampaignState::Active) => self.pauses.push(Pause { from: now, until: None }),
            (SendingChange::Resume, CampaignState::Paused) => {
                if let Some(open) = self.pauses.last_mut() {
                    open.until = Some(now.max(open.from));
                }
            }
            (SendingChange::Deactivate, _) => {
                if let Some(open) = self.pauses.last_mut().filter(|p| p.until.is_none()) {
                    open.until = Some(now.max(open.from));
                }
                self.active = false;
            }
        }
        self.sending_version += 1;
        Ok(())
    }

    /// When step `step` of an enrollment made at `enrolled_at` is due, counting pauses: a
    /// step that was not yet due when a pause began is due the time it had left after the
    /// pause ended (a step overdue at the pause stays due, so it goes at once on resume).
    /// `None` past the last step, and while the campaign is paused.
    #[must_use]
    pub fn due_with_pauses(&self, enrolled_at: OffsetDateTime, step: u32) -> Option<OffsetDateTime> {
        let mut due = self.due_at(enrolled_at, step)?;
        for pause in &self.pauses {
            let Some(until) = pause.until else { return None };
            if due > pause.from {
                due += until - pause.from;
            }
        }
        Some(due)
    }

    /// When step `step` of an enrollment made at `enrolled_at` is due: after the delays of
    /// steps `0..=step`. `None` past the last step.
    #[must_use]
    pub fn due_at(&self, enrolled_at: OffsetDateTime, step: u32) -> Option<OffsetDateTime> {
        let last = usize::try_from(step).ok()?;
        let steps = self.steps.get(..=last)?;
        let seconds: u64 = steps.iter().map(|s| s.delay_seconds).sum();
        Some(enrolled_at + Duration::seconds(i64::try_from(seconds).ok()?))
    }

    /// Whether `step` is the campaign's last step.
    #[must_use]
    pub fn is_last_step(&self, step: u32) -> bool {
        usize::try_from(step).is_ok_and(|s| s + 1 >= self.steps.len())
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
    fn a_template_with_bad_syntax_is_refused_at_creation() {
        let r = CampaignDefinition::parse(r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"{{ oops","body":"b"}]}"#);
        assert!(matches!(r, Err(CampaignError::Invalid(_))), "{r:?}");
    }

    fn prospect() -> Prospect {
        let email = crate::domain::NormalizedEmail::parse("Jo@Example.com").unwrap();
        let mut p = Prospect::new(AccountId::new(), email, OffsetDateTime::UNIX_EPOCH);
        p.fields.set("first_name", Some("<Jo & Co>".into()));
        p.metadata.insert("plan".into(), serde_json::json!("pro"));
        p
    }

    #[test]
    fn fields_render_and_missing_ones_render_empty() {
        let step = Step { delay_seconds: 0, subject: "Hi {{first_name}}{{last_name}}".into(), body: "Plan {{ metadata.plan }}{{ metadata.company.name }}, {{ email }}".into() };
        let email = step.render(&prospect(), "https://x/unsubscribe/t").unwrap();
        assert_eq!(email.subject, "Hi <Jo & Co>");
        assert!(email.text_body.starts_with("Plan pro, Jo@Example.com"));
        assert!(email.text_body.contains("https://x/unsubscribe/t"));
    }

    #[test]
    fn html_body_escapes_prospect_values_and_links_the_unsubscribe_url() {
        let step = Step { delay_seconds: 0, subject: "s".into(), body: "Hello {{first_name}}".into() };
        let email = step.render(&prospect(), "https://x/unsubscribe/t").unwrap();
        assert!(email.html_body.contains("Hello &lt;Jo &amp; Co&gt;"), "{}", email.html_body);
        assert!(email.html_body.contains(r#"<a href="https://x/unsubscribe/t">"#));
    }

    #[test]
    fn steps_are_due_after_the_sum_of_their_delays() {
        let def = CampaignDefinition::parse(
            r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"a","body":"a"},{"delay_seconds":60,"subject":"b","body":"b"},{"delay_seconds":86400,"subject":"c","body":"c"}]}"#,
        ).unwrap();
        let c = Campaign::new(AccountId::new(), def, OffsetDateTime::UNIX_EPOCH);
        let t0 = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(c.due_at(t0, 0), Some(t0));
        assert_eq!(c.due_at(t0, 2), Some(t0 + Duration::seconds(86_460)));
        assert_eq!(c.due_at(t0, 3), None);
        assert!(c.is_last_step(2) && !c.is_last_step(1));
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
