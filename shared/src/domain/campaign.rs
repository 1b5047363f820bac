//! Campaigns: an ordered list of email steps, each sent a delay after the previous one.
//! Defined by a JSON file given to `cadenhq campaigns create` (format in the README).

use minijinja::{Environment, UndefinedBehavior, Value};
use time::{Duration, OffsetDateTime};

use super::{AccountId, CampaignId, ExternalId, NormalizedEmail, Prospect, TEXT_FIELDS};

/// Upper bounds that keep a definition sane.
const MAX_STEPS: usize = 50;
const MAX_DELAY_SECONDS: u64 = 365 * 24 * 3600;
const MAX_TEMPLATE_CHARS: usize = 100_000;

/// Why a campaign definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CampaignError {
    #[error("campaign file is not valid JSON: {0}")]
    Json(String),
    /// Valid JSON that is not a campaign: the field named is missing, unknown or of the wrong
    /// type.
    #[error("campaign file: {0}")]
    Schema(String),
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

/// The template environment every step is rendered with, at send time, in a preview and when a
/// campaign is checked at creation: variables that are missing render empty (also nested ones
/// such as `{{ metadata.company.name }}`), so a missing field never fails a send.
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
    /// [`CampaignError::Invalid`] naming the subject or body if a template fails at render time
    /// (every template was rendered for a prospect with every variable set and for one with
    /// none set when the campaign was created, so this is rare: e.g. a filter that fails on
    /// one particular value).
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
        let render = |what: &str, source: &str| {
            env.render_str(source, &ctx).map_err(|e| CampaignError::Invalid(format!("{what} cannot be rendered: {e}")))
        };
        let subject = render("subject", &self.subject)?.replace(['\r', '\n'], " ");
        let body = render("body", &self.body)?;
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
        let def: Self = parse_json(json)?;
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
            // What can only fail when rendered (an unknown filter, test or function, a filter
            // applied to a wrong type) fails here, through the renderer the sender uses.
            for prospect in [sample_prospect(AccountId::new()), bare_prospect(AccountId::new())] {
                step.render(&prospect, SAMPLE_UNSUBSCRIBE_URL).map_err(|e| match e {
                    CampaignError::Invalid(why) => CampaignError::Invalid(format!("step {n}: {why}")),
                    other => other,
                })?;
            }
        }
        Ok(def)
    }
}

/// Reads the file's JSON; a value that is not a campaign names the field at fault, e.g.
/// `step 2, delay_seconds: invalid type: string "soon", expected u64`.
fn parse_json(json: &str) -> Result<CampaignDefinition, CampaignError> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let def = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let inner = e.inner();
        if !inner.is_data() {
            return CampaignError::Json(inner.to_string());
        }
        let mut at = Vec::new();
        let mut in_steps = false;
        for segment in e.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } if in_steps => at.push(format!("step {}", index + 1)),
                serde_path_to_error::Segment::Map { key } => {
                    in_steps = at.is_empty() && key == "steps";
                    at.push(key.clone());
                }
                other => at.push(other.to_string()),
            }
        }
        // "steps" then "step 2" says the same twice.
        if at.len() > 1 && at[0] == "steps" {
            at.remove(0);
        }
        match at.join(", ") {
            path if path.is_empty() => CampaignError::Schema(inner.to_string()),
            path => CampaignError::Schema(format!("{path}: {inner}")),
        }
    })?;
    deserializer.end().map_err(|e| CampaignError::Json(e.to_string()))?;
    Ok(def)
}

/// The unsubscribe URL templates are rendered with when checked at creation.
const SAMPLE_UNSUBSCRIBE_URL: &str = "https://example.com/unsubscribe/sample";

/// A prospect with every template variable set: every text field, `external_id` and some
/// metadata. What `campaigns preview --sample` renders, and one of the two prospects every
/// template is rendered for when a campaign is created.
#[must_use]
pub fn sample_prospect(account: AccountId) -> Prospect {
    let mut prospect = bare_prospect(account);
    for name in TEXT_FIELDS {
        let value = match name {
            "display_name" => "Jane Doe",
            "first_name" => "Jane",
            "last_name" => "Doe",
            "phone" => "+1 555 0100",
            "address" => "1 Main Street",
            "city" => "Springfield",
            "state" => "OR",
            "zip" => "97403",
            "country" => "US",
            "source" => "landing_page",
            "utm_source" => "google",
            "utm_medium" => "cpc",
            "utm_campaign" => "spring_launch",
            "utm_term" => "crm software",
            "utm_content" => "hero_button",
            other => other,
        };
        prospect.fields.set(name, Some(value.to_owned()));
    }
    prospect.external_id = ExternalId::parse("crm-1001").ok();
    if let serde_json::Value::Object(metadata) = serde_json::json!({"plan": "trial", "company": {"name": "Acme"}}) {
        prospect.metadata = metadata;
    }
    prospect
}

/// A prospect with nothing set but its address.
fn bare_prospect(account: AccountId) -> Prospect {
    let email = NormalizedEmail::parse("jane.doe@example.com").unwrap_or_else(|_| unreachable!("a valid address"));
    Prospect::new(account, email, OffsetDateTime::UNIX_EPOCH)
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
    /// When the campaign was deactivated (unknown for one deactivated by an earlier version).
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub deactivated_at: Option<OffsetDateTime>,
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
            deactivated_at: None,
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
                self.deactivated_at = Some(now);
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
            let until = pause.until?;
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

    fn three_steps(now: OffsetDateTime) -> Campaign {
        let def = CampaignDefinition {
            name: "c".into(),
            steps: [0, 600, 259_200].map(|d| Step { delay_seconds: d, subject: "s".into(), body: "b".into() }).to_vec(),
        };
        Campaign::new(AccountId::new(), def, now)
    }

    #[test]
    fn a_pause_shifts_the_steps_it_held_back_by_its_length_and_no_others() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let mut c = three_steps(t0);
        c.apply(SendingChange::Pause, t0 + Duration::minutes(1)).unwrap();
        assert_eq!(c.state(), CampaignState::Paused);
        assert_eq!(c.due_with_pauses(t0, 1), None, "nothing is due while paused");
        c.apply(SendingChange::Resume, t0 + Duration::minutes(4)).unwrap();

        assert_eq!(c.due_with_pauses(t0, 0), Some(t0), "due before the pause: unchanged");
        assert_eq!(c.due_with_pauses(t0, 1), Some(t0 + Duration::minutes(13)));
        assert_eq!(c.sending_version, 2);
        assert!(c.apply(SendingChange::Resume, t0).is_err(), "not paused");
        c.apply(SendingChange::Deactivate, t0).unwrap();
        assert_eq!(c.state(), CampaignState::Inactive);
        assert!(c.apply(SendingChange::Pause, t0).is_err(), "deactivated");
    }

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
    fn unknown_fields_in_a_file_are_refused_by_name() {
        let r = CampaignDefinition::parse(r#"{"name":"x","stepz":[]}"#);
        assert!(matches!(&r, Err(CampaignError::Schema(m)) if m.contains("stepz")), "{r:?}");
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named_with_its_step() {
        let r = CampaignDefinition::parse(
            r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"a","body":"a"},{"delay_seconds":"soon","subject":"b","body":"b"}]}"#,
        );
        let Err(CampaignError::Schema(message)) = r else { panic!("{r:?}") };
        assert!(message.starts_with("step 2, delay_seconds: invalid type"), "{message}");
    }

    #[test]
    fn malformed_json_is_called_not_valid_json() {
        let r = CampaignDefinition::parse(r#"{"name":"x","#);
        assert!(matches!(r, Err(CampaignError::Json(_))), "{r:?}");
    }

    #[test]
    fn an_unknown_filter_is_refused_at_creation_naming_the_step_and_field() {
        let r = CampaignDefinition::parse(
            r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"a","body":"a"},{"delay_seconds":0,"subject":"x {{ first_name | nosuchfilter }}","body":"b"}]}"#,
        );
        let Err(CampaignError::Invalid(message)) = r else { panic!("{r:?}") };
        assert!(message.starts_with("step 2: subject cannot be rendered"), "{message}");
        assert!(message.contains("nosuchfilter"), "{message}");
    }

    #[test]
    fn a_template_that_fails_only_for_a_prospect_without_values_is_refused_at_creation() {
        // `length` of a missing value fails; the sample prospect has it, a bare one does not.
        let r = CampaignDefinition::parse(r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"s","body":"{{ metadata.company.name | length }}"}]}"#);
        assert!(matches!(&r, Err(CampaignError::Invalid(m)) if m.starts_with("step 1: body cannot be rendered")), "{r:?}");
    }

    #[test]
    fn an_unknown_function_is_refused_and_fallbacks_are_accepted() {
        let r = CampaignDefinition::parse(r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"s","body":"{{ unknown_fn() }}"}]}"#);
        assert!(matches!(&r, Err(CampaignError::Invalid(m)) if m.starts_with("step 1: body cannot be rendered")), "{r:?}");
        let ok = CampaignDefinition::parse(r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"{{ first_name | default('there') | upper }}","body":"{{ metadata.company.name }}"}]}"#);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn the_sample_prospect_sets_every_text_field() {
        let p = sample_prospect(AccountId::new());
        for name in TEXT_FIELDS {
            assert!(p.fields.get(name).is_some_and(|v| !v.is_empty()), "{name}");
        }
        assert!(p.external_id.is_some());
    }
}
