//! Mailer adapters against real peers: SMTP against the local server `scripts/test` starts
//! (read back from its maildir) and against scripted peers for each kind of reply, SES against
//! the emulator (read back from moto's model dump).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use shared::adapters::ses::SesMailer;
use shared::adapters::smtp::SmtpMailer;
use shared::domain::{AccountId, ClaimOwner, EmailReference, EnrollmentId, ProspectId, SendKey};
use shared::ports::{Delivered, MailError, Mailer, OutgoingEmail, SendClaim};

use crate::helpers::emulator_sdk_config;

/// Set by `scripts/test`: the URL of its local SMTP server, and the maildir that server fills.
const SMTP_URL: &str = "CADENHQ_TEST_SMTP_URL";
const MAILDIR: &str = "CADENHQ_TEST_MAILDIR";

fn required_env(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{name} is not set: run the suite with scripts/test, which starts a local SMTP server"))
}

fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// An email whose recipient, subject, bodies and unsubscribe URL all carry `token`.
fn email(from: &str, token: &str) -> OutgoingEmail {
    OutgoingEmail {
        to: format!("prospect-{token}@example.com"),
        from: from.to_owned(),
        subject: format!("Welcome {token}"),
        text_body: format!("Hi there, {token}"),
        html_body: format!("<p>Hi there, {token}</p>"),
        unsubscribe_url: format!("https://api.cadenhq.test/unsubscribe?token={token}"),
    }
}

/// A MIME entity as received: unfolded headers and the raw body.
struct Entity {
    headers: Vec<(String, String)>,
    body: String,
}

impl Entity {
    fn parse(raw: &str) -> Self {
        let raw = raw.replace("\r\n", "\n");
        let (head, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in head.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = headers.last_mut() {
                    value.push(' ');
                    value.push_str(line.trim());
                }
            } else if let Some((name, value)) = line.split_once(':') {
                headers.push((name.to_owned(), value.trim().to_owned()));
            }
        }
        Self { headers, body: body.to_owned() }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn parts(&self) -> Vec<Entity> {
        let content_type = self.header("Content-Type").unwrap_or_default();
        let boundary = content_type
            .split("boundary=")
            .nth(1)
            .and_then(|b| b.split(';').next())
            .unwrap_or_else(|| panic!("no boundary in {content_type:?}"))
            .trim_matches('"');
        let delimiter = format!("--{boundary}");
        self.body
            .split(delimiter.as_str())
            .skip(1)
            .take_while(|part| !part.starts_with("--"))
            .map(|part| Entity::parse(part.trim_start_matches('\n')))
            .collect()
    }
}

/// Checks what every campaign email must carry, as the recipient's server received it.
fn assert_campaign_email(received: &Entity, sent: &OutgoingEmail) {
    assert_eq!(received.header("To"), Some(sent.to.as_str()));
    assert_eq!(received.header("Subject"), Some(sent.subject.as_str()));
    assert_eq!(received.header("List-Unsubscribe"), Some(format!("<{}>", sent.unsubscribe_url).as_str()));
    assert_eq!(received.header("List-Unsubscribe-Post"), Some("List-Unsubscribe=One-Click"));
    let content_type = received.header("Content-Type").unwrap_or_default();
    assert!(content_type.starts_with("multipart/alternative;"), "{content_type}");
    let parts = received.parts();
    assert_eq!(parts.len(), 2, "a text and an HTML part");
    assert!(parts[0].header("Content-Type").unwrap_or_default().starts_with("text/plain"));
    assert_eq!(parts[0].body.trim_end(), sent.text_body);
    assert!(parts[1].header("Content-Type").unwrap_or_default().starts_with("text/html"));
    assert_eq!(parts[1].body.trim_end(), sent.html_body);
}

/// The one message in the maildir's `new/` folder that contains `token`.
fn delivered(maildir: &Path, token: &str) -> Entity {
    let new = maildir.join("new");
    let found: Vec<String> = std::fs::read_dir(&new)
        .unwrap_or_else(|e| panic!("read {}: {e}", new.display()))
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|text| text.contains(token))
        .collect();
    assert_eq!(found.len(), 1, "messages in {} carrying {token}", new.display());
    Entity::parse(&found[0])
}

#[tokio::test]
async fn smtp_mailer_delivers_text_and_html_with_one_click_unsubscribe_headers() {
    // Arrange
    let (url, maildir) = (required_env(SMTP_URL), required_env(MAILDIR));
    let token = token();
    let email = email("CadenHQ <hello@cadenhq.test>", &token);
    let mailer = SmtpMailer::from_url(&url).expect("valid SMTP URL");
    let claim = claim();

    // Act
    let result = mailer.send(&email, &claim).await;

    // Assert
    let delivered_id = result.expect("sent").message_id;
    let received = delivered(Path::new(&maildir), &token);
    assert_eq!(received.header("X-RcptTo"), Some(email.to.as_str()), "envelope recipient");
    assert_eq!(received.header("X-MailFrom"), Some("hello@cadenhq.test"), "envelope sender");
    assert_eq!(received.header("From"), Some("CadenHQ <hello@cadenhq.test>"));
    assert_eq!(received.header("Message-ID"), Some(format!("<{delivered_id}>").as_str()), "the id the send log keeps");
    assert!(delivered_id.ends_with("@cadenhq.test"), "of the sender's domain: {delivered_id}");
    assert_eq!(EmailReference::from_message_id(&delivered_id), Some(claim.reference), "names the prospect and step");
    assert_campaign_email(&received, &email);
}

/// A one-connection SMTP server on loopback that accepts every command except those named in
/// `replies`, which it answers as given; `"."` names the end of the message, and the answer
/// `"CLOSE"` drops the connection instead of answering. Returns its port.
fn scripted_smtp_peer(replies: &'static [(&'static str, &'static str)]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let port = listener.local_addr().expect("local address").port();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else { return };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let Ok(read_half) = stream.try_clone() else { return };
        let mut reader = BufReader::new(read_half);
        let mut writer = stream;
        let mut say = |reply: &str| writer.write_all(format!("{reply}\r\n").as_bytes()).is_ok();
        say("220 scripted.test ESMTP");
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let verb = line.split_whitespace().next().unwrap_or_default().to_ascii_uppercase();
            let default = match verb.as_str() {
                "EHLO" => "250-scripted.test\r\n250 AUTH PLAIN LOGIN",
                "AUTH" => "235 2.7.0 Authentication successful",
                "DATA" => "354 End data with <CR><LF>.<CR><LF>",
                "QUIT" => "221 2.0.0 Bye",
                _ => "250 2.0.0 Ok",
            };
            let reply = replies.iter().find(|(v, _)| *v == verb).map_or(default, |(_, r)| *r);
            if !say(reply) || verb == "QUIT" {
                return;
            }
            if reply.starts_with("354") {
                while reader.read_line(&mut line).unwrap_or(0) > 0 && !line.ends_with("\r\n.\r\n") {}
                let end = replies.iter().find(|(v, _)| *v == ".").map_or("250 2.0.0 Ok: queued", |(_, r)| *r);
                if end == "CLOSE" || !say(end) {
                    return;
                }
            }
        }
    });
    port
}

/// What a mailer is told about the step it sends for: the outbox records the send with it, and
/// every mailer names the step in the email.
fn claim() -> SendClaim {
    let reference = EmailReference { account: AccountId::new(), prospect: ProspectId::new(), send: SendKey { enrollment: EnrollmentId::new(), step: 0 } };
    SendClaim { reference, owner: ClaimOwner::new(), now: time::OffsetDateTime::now_utc() }
}

async fn send_through_peer(replies: &'static [(&'static str, &'static str)]) -> Result<Delivered, MailError> {
    let port = scripted_smtp_peer(replies);
    let mailer = SmtpMailer::from_url(&format!("smtp://cadenhq:secret@127.0.0.1:{port}")).expect("valid SMTP URL");
    mailer.send(&email("hello@cadenhq.test", &token()), &claim()).await
}

#[tokio::test]
async fn smtp_mailer_sends_through_an_authenticating_relay() {
    let result = send_through_peer(&[]).await;

    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn smtp_mailer_reports_a_refused_recipient_as_rejected_without_naming_it() {
    let result = send_through_peer(&[("RCPT", "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown")]).await;

    let Err(MailError::Rejected(reason)) = result else { panic!("expected Rejected, got {result:?}") };
    assert!(reason.contains("550"), "{reason}");
    assert!(!reason.contains('@'), "{reason}");
}

#[tokio::test]
async fn smtp_mailer_reports_answers_that_refuse_the_message_as_not_accepted() {
    let cases: [&'static [(&'static str, &'static str)]; 4] = [
        &[("RCPT", "451 4.7.1 <nobody@example.com>: Recipient address rejected: greylisted")],
        &[("AUTH", "535 5.7.8 Error: authentication failed")],
        &[("MAIL", "501 5.1.7 Bad sender address syntax")],
        &[("DATA", "421 4.3.0 Service shutting down")],
    ];

    for replies in cases {
        let result = send_through_peer(replies).await;

        let Err(MailError::NotAccepted(source)) = result else { panic!("{replies:?}: expected NotAccepted, got {result:?}") };
        assert!(!source.to_string().contains('@'), "{source}");
    }
}

#[tokio::test]
async fn smtp_mailer_reports_a_connection_lost_after_the_message_as_unknown() {
    let result = send_through_peer(&[(".", "CLOSE")]).await;

    assert!(matches!(result, Err(MailError::Unknown(_))), "the relay may have taken it: {result:?}");
}

#[tokio::test]
async fn smtp_mailer_reports_an_unreachable_server_as_not_accepted() {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let mailer = SmtpMailer::from_url(&format!("smtp://127.0.0.1:{port}")).expect("valid SMTP URL");

    let result = mailer.send(&email("hello@cadenhq.test", &token()), &claim()).await;

    assert!(matches!(result, Err(MailError::NotAccepted(_))), "{result:?}");
}

/// Every raw email the emulator's SES accepted whose MIME text contains `token`, as moto's
/// model dump shows them: `{id, source, destinations, raw_data}`.
async fn ses_sent_raw_messages(token: &str) -> Vec<Value> {
    let endpoint = required_env("AWS_ENDPOINT_URL");
    // The dump walks every model of the emulator while other tests change them, which now and
    // then fails on the emulator's side: it is asked again.
    let mut dump = Value::Null;
    for _ in 0..5 {
        let response = reqwest::get(format!("{endpoint}/moto-api/data.json")).await.expect("moto model dump");
        if let Ok(value) = response.json::<Value>().await {
            dump = value;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let messages = dump["ses"]["RawMessage"].as_array().expect("moto's dump lists SES raw messages");
    messages.iter().filter(|m| m["raw_data"].as_str().is_some_and(|raw| raw.contains(token))).cloned().collect()
}

#[tokio::test]
async fn ses_mailer_sends_raw_mime_with_one_click_unsubscribe_headers() {
    // Arrange
    let sdk = emulator_sdk_config().await;
    let client = aws_sdk_sesv2::Client::new(&sdk);
    let token = token();
    let domain = format!("{token}.cadenhq.test");
    client.create_email_identity().email_identity(&domain).send().await.expect("create the sending identity");
    let email = email(&format!("CadenHQ <hello@{domain}>"), &token);
    let configuration_set = format!("cadenhq-{token}");
    client.create_configuration_set().configuration_set_name(&configuration_set).send().await.expect("create the configuration set");
    let mailer = SesMailer::from_sdk_config(&sdk).with_configuration_set(Some(configuration_set));

    // Act
    let result = mailer.send(&email, &claim()).await;
    drop(client);

    // Assert
    let message_id = result.expect("sent").message_id;
    assert!(!message_id.is_empty(), "SES's message id is kept");
    let sent = ses_sent_raw_messages(&token).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["source"], format!("hello@{domain}"));
    let destinations = sent[0]["destinations"].as_array().expect("destinations");
    assert!(!destinations.is_empty() && destinations.iter().all(|d| d == email.to.as_str()), "{destinations:?}");
    let raw = sent[0]["raw_data"].as_str().unwrap_or_default();
    assert_eq!(Entity::parse(raw).header("From"), Some(email.from.as_str()));
    assert_campaign_email(&Entity::parse(raw), &email);
}

#[tokio::test]
async fn ses_mailer_reports_an_unverified_sender_as_not_accepted() {
    // Arrange
    let sdk = emulator_sdk_config().await;
    let token = token();
    let email = email(&format!("hello@{token}.unverified.test"), &token);

    // Act
    let result = SesMailer::from_sdk_config(&sdk).send(&email, &claim()).await;

    // Assert
    assert!(matches!(result, Err(MailError::NotAccepted(_))), "{result:?}");
    assert!(ses_sent_raw_messages(&token).await.is_empty());
}
