//! Verification of the messages Amazon SNS POSTs to an HTTP/HTTPS subscription: the topic is
//! one configured, the message is fresh, its signing certificate is an SNS one (fetched over
//! HTTPS from an SNS endpoint host, or configured by the operator) and its RSA signature over
//! the signed text verifies with that certificate's key ([`SnsVerifier::verify`]); and the GET
//! that confirms a subscription ([`SnsVerifier::confirm`]).
//!
//! No certificate chain is checked: as AWS describes the check, the trust is the HTTPS fetch
//! (with the system's roots) from an `sns.<region>.amazonaws.com` host; a certificate in the
//! configured folder is trusted because the operator put it there.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{alg_id, AlgorithmIdentifier, CertificateDer, InvalidSignature, SignatureVerificationAlgorithm};
use time::OffsetDateTime;

use crate::domain::{is_sns_cert_file_name, is_stale, CertUrl, SignatureVersion, SnsError, SnsKind, SnsMessage, SubscribeUrl};

/// Comma-separated ARNs of the topics whose messages are accepted; unset or empty accepts none.
pub const TOPIC_ARNS: &str = "CADENHQ_SNS_TOPIC_ARNS";
/// A folder of `SimpleNotificationService-*.pem` certificates to use instead of fetching them
/// (deployments without egress, and tests). Optional.
pub const CERT_DIR: &str = "CADENHQ_SNS_CERT_DIR";

/// Longest wait for one GET (a certificate, a subscription confirmation).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest body a GET may answer with; a certificate is under 2 KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The outbound HTTPS GET the verifier needs: certificates and subscription confirmations.
#[async_trait]
pub trait HttpsGet: Send + Sync {
    /// The body of a successful (2xx) answer to a GET of `url`.
    ///
    /// # Errors
    /// A description of the failure (no connection, timeout, a non-2xx status, a body over
    /// [`MAX_BODY_BYTES`], a URL that is not HTTPS): safe to log, naming no secret.
    async fn get(&self, url: &str) -> Result<Vec<u8>, String>;
}

/// [`HttpsGet`] over reqwest: HTTPS only, no redirects, [`FETCH_TIMEOUT`], bodies capped at
/// [`MAX_BODY_BYTES`].
#[derive(Debug, Clone)]
pub struct ReqwestGet {
    client: reqwest::Client,
}

impl ReqwestGet {
    /// # Errors
    /// The client could not be built (no TLS roots, for one).
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(FETCH_TIMEOUT)
            .build()?;
        Ok(Self { client })
    }
}

#[async_trait]
impl HttpsGet for ReqwestGet {
    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("unreadable URL: {e}"))?;
        if url.scheme() != "https" {
            return Err("not an HTTPS URL".to_owned());
        }
        let host = url.host_str().unwrap_or_default().to_owned();
        let mut response = self.client.get(url).send().await.map_err(|e| format!("GET from {host} failed: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET from {host} answered {status}"));
        }
        if response.content_length().is_some_and(|length| length > MAX_BODY_BYTES as u64) {
            return Err(format!("GET from {host}: body over {MAX_BODY_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("GET from {host}: body failed: {e}"))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(format!("GET from {host}: body over {MAX_BODY_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// A message whose topic, freshness and signature were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifiedSns {
    /// A published message: apply it (idempotently: `message_id` is the same on every retry).
    Notification { message_id: String, topic_arn: String, message: String },
    /// SNS waits for a GET of `subscribe_url` ([`SnsVerifier::confirm`]) before it delivers.
    SubscriptionConfirmation { topic_arn: String, subscribe_url: SubscribeUrl },
    /// The subscription was deleted; nothing is needed.
    UnsubscribeConfirmation { topic_arn: String },
}

/// Checks SNS messages; cheap to clone (one shared certificate cache).
///
/// Certificates are cached by file name for the life of the process, and only once fetched and
/// parsed: the names that can enter the cache are those of certificates SNS hosts serve.
/// Two messages arriving together under a certificate not yet cached may both fetch it.
#[derive(Clone)]
pub struct SnsVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    topics: Vec<String>,
    fetcher: Arc<dyn HttpsGet>,
    certs: Mutex<HashMap<String, Arc<CertificateDer<'static>>>>,
}

impl std::fmt::Debug for SnsVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.inner.certs.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("SnsVerifier").field("topics", &self.inner.topics).field("cached_certs", &cached).finish_non_exhaustive()
    }
}

/// Why [`SnsVerifier::from_env`] or [`SnsVerifier::with_cert_dir`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SnsConfigError {
    #[error("cannot read the SNS certificate folder {path} (CADENHQ_SNS_CERT_DIR): {source}")]
    CertDir { path: String, source: std::io::Error },
    #[error("{path} (in CADENHQ_SNS_CERT_DIR) is not a PEM X.509 certificate")]
    NotACertificate { path: String },
    #[error("cannot build the HTTPS client for SNS: {0}")]
    Client(#[from] reqwest::Error),
}

impl SnsVerifier {
    /// A verifier accepting messages of `topics` (exact ARNs), fetching certificates with
    /// `fetcher`.
    #[must_use]
    pub fn new(topics: Vec<String>, fetcher: Arc<dyn HttpsGet>) -> Self {
        Self { inner: Arc::new(Inner { topics, fetcher, certs: Mutex::new(HashMap::new()) }) }
    }

    /// This verifier with every `SimpleNotificationService-*.pem` file of `dir` in its cache,
    /// under its file name; other files are skipped.
    ///
    /// # Errors
    /// [`SnsConfigError::CertDir`] when the folder or one of those files cannot be read,
    /// [`SnsConfigError::NotACertificate`] for one that is not a PEM certificate.
    pub fn with_cert_dir(self, dir: impl AsRef<Path>) -> Result<Self, SnsConfigError> {
        let dir = dir.as_ref();
        let io_error = |path: &Path| {
            let path = path.display().to_string();
            move |source: std::io::Error| SnsConfigError::CertDir { path, source }
        };
        let mut loaded = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
            let path = entry.map_err(io_error(dir))?.path();
            let Some(name) = path.file_name().and_then(|name| name.to_str()).filter(|name| is_sns_cert_file_name(name)) else {
                continue;
            };
            let name = name.to_owned();
            let pem = std::fs::read(&path).map_err(io_error(&path))?;
            let cert = parse_certificate(&pem).ok_or_else(|| SnsConfigError::NotACertificate { path: path.display().to_string() })?;
            loaded.push((name, Arc::new(cert)));
        }
        self.inner.certs.lock().unwrap_or_else(PoisonError::into_inner).extend(loaded);
        Ok(self)
    }

    /// A verifier from [`TOPIC_ARNS`] and [`CERT_DIR`], fetching with [`ReqwestGet`].
    ///
    /// # Errors
    /// [`SnsConfigError`] from [`with_cert_dir`](Self::with_cert_dir) or the HTTPS client.
    pub fn from_env() -> Result<Self, SnsConfigError> {
        let topics = std::env::var(TOPIC_ARNS).unwrap_or_default();
        let topics = topics.split(',').map(str::trim).filter(|arn| !arn.is_empty()).map(str::to_owned).collect();
        let verifier = Self::new(topics, Arc::new(ReqwestGet::new()?));
        match std::env::var_os(CERT_DIR).filter(|dir| !dir.is_empty()) {
            Some(dir) => verifier.with_cert_dir(dir),
            None => Ok(verifier),
        }
    }

    /// Checks the HTTP request body of an SNS delivery received at `now`: parsed, of an allowed
    /// topic, fresh ([`is_stale`]), with a certificate URL on an SNS host, and signed by that
    /// certificate.
    ///
    /// # Errors
    /// [`SnsError::Malformed`], [`SnsError::UnsupportedSignatureVersion`],
    /// [`SnsError::CertUrlRejected`] and [`SnsError::SubscribeUrlRejected`] from
    /// [`SnsMessage::parse`]; [`SnsError::TopicNotAllowed`]; [`SnsError::Stale`];
    /// [`SnsError::CertificateUnavailable`] when the certificate is neither cached nor can be
    /// fetched and parsed; [`SnsError::BadSignature`].
    ///
    /// Every error but `CertificateUnavailable` is final: the same body will never verify, so
    /// answer 4xx (SNS does not retry an HTTP/S delivery refused with a 4xx). We recommend a
    /// 5xx for `CertificateUnavailable`: it is our side failing to reach SNS, and SNS's retries
    /// (by default three, 20 seconds apart) may then get through.
    pub async fn verify(&self, body: &[u8], now: OffsetDateTime) -> Result<VerifiedSns, SnsError> {
        let message = SnsMessage::parse(body)?;
        if !self.inner.topics.iter().any(|topic| topic == message.topic_arn()) {
            return Err(SnsError::TopicNotAllowed);
        }
        if is_stale(message.timestamp(), now) {
            return Err(SnsError::Stale);
        }
        let cert = self.certificate(message.signing_cert_url()).await?;
        verify_signature(&cert, message.signature_version(), message.string_to_sign().as_bytes(), message.signature())?;
        let message_id = message.message_id().to_owned();
        let topic_arn = message.topic_arn().to_owned();
        let text = message.message().to_owned();
        Ok(match message.into_kind() {
            SnsKind::Notification { .. } => VerifiedSns::Notification { message_id, topic_arn, message: text },
            SnsKind::SubscriptionConfirmation { subscribe_url, .. } => VerifiedSns::SubscriptionConfirmation { topic_arn, subscribe_url },
            SnsKind::UnsubscribeConfirmation { .. } => VerifiedSns::UnsubscribeConfirmation { topic_arn },
        })
    }

    /// Confirms a subscription: a GET of its `SubscribeURL` (from a verified message).
    ///
    /// # Errors
    /// [`SnsError::ConfirmationFailed`] when the GET fails or is not answered 2xx.
    pub async fn confirm(&self, url: &SubscribeUrl) -> Result<(), SnsError> {
        self.inner.fetcher.get(url.as_str()).await.map(drop).map_err(SnsError::ConfirmationFailed)
    }

    async fn certificate(&self, url: &CertUrl) -> Result<Arc<CertificateDer<'static>>, SnsError> {
        if let Some(cert) = self.inner.certs.lock().unwrap_or_else(PoisonError::into_inner).get(url.file_name()) {
            return Ok(Arc::clone(cert));
        }
        tracing::info!(cert = url.file_name(), "fetching an SNS signing certificate");
        let pem = self.inner.fetcher.get(url.as_str()).await.map_err(SnsError::CertificateUnavailable)?;
        let cert = Arc::new(parse_certificate(&pem).ok_or_else(|| {
            SnsError::CertificateUnavailable(format!("{} is not a PEM X.509 certificate", url.file_name()))
        })?);
        self.inner.certs.lock().unwrap_or_else(PoisonError::into_inner).insert(url.file_name().to_owned(), Arc::clone(&cert));
        Ok(cert)
    }
}

/// The first certificate of a PEM document, when it is an X.509 certificate webpki can read.
fn parse_certificate(pem: &[u8]) -> Option<CertificateDer<'static>> {
    let cert = CertificateDer::from_pem_slice(pem).ok()?;
    webpki::EndEntityCert::try_from(&cert).ok()?;
    Some(cert)
}

fn verify_signature(cert: &CertificateDer<'_>, version: SignatureVersion, signed: &[u8], signature: &[u8]) -> Result<(), SnsError> {
    let cert = webpki::EndEntityCert::try_from(cert).map_err(|_| SnsError::BadSignature)?;
    let algorithm: &dyn SignatureVerificationAlgorithm = match version {
        SignatureVersion::Sha1WithRsa => &RsaPkcs1Sha1,
        SignatureVersion::Sha256WithRsa => webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    };
    cert.verify_signature(algorithm, signed, signature).map_err(|_| SnsError::BadSignature)
}

/// SHA1withRSA (PKCS #1 v1.5, 2048 to 8192-bit keys), which webpki does not offer: SNS's
/// signature version 1.
#[derive(Debug)]
struct RsaPkcs1Sha1;

/// The contents of the `sha1WithRSAEncryption` AlgorithmIdentifier (RFC 3279): OID
/// 1.2.840.113549.1.1.5, NULL parameters.
const SHA1_WITH_RSA_ENCRYPTION: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05, 0x05, 0x00];

impl SignatureVerificationAlgorithm for RsaPkcs1Sha1 {
    fn verify_signature(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), InvalidSignature> {
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY, public_key)
            .verify(message, signature)
            .map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::RSA_ENCRYPTION
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        AlgorithmIdentifier::from_slice(SHA1_WITH_RSA_ENCRYPTION)
    }
}

/// The fixtures are a self-signed test certificate (RSA 2048, CN=sns.amazonaws.com) named as
/// SNS names its certificates, and messages of each type signed with its key, with signature
/// versions 1 and 2, over the text SNS signs; the key itself is not kept.
#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use base64::Engine as _;
    use time::format_description::well_known::Rfc3339;

    use super::*;

    const CERT_FILE: &str = "SimpleNotificationService-7506a1e35b36ef5a444dd1a8e7cc3ed8.pem";
    const CERT_PEM: &str = include_str!("sns_http_fixtures/SimpleNotificationService-7506a1e35b36ef5a444dd1a8e7cc3ed8.pem");
    const NOTIFICATION_SUBJECT_V1: &str = include_str!("sns_http_fixtures/notification-subject-v1.json");
    const NOTIFICATION_SUBJECT_V2: &str = include_str!("sns_http_fixtures/notification-subject-v2.json");
    const NOTIFICATION_V1: &str = include_str!("sns_http_fixtures/notification-v1.json");
    const NOTIFICATION_V2: &str = include_str!("sns_http_fixtures/notification-v2.json");
    const SUBSCRIPTION_CONFIRMATION_V1: &str = include_str!("sns_http_fixtures/subscription-confirmation-v1.json");
    const SUBSCRIPTION_CONFIRMATION_V2: &str = include_str!("sns_http_fixtures/subscription-confirmation-v2.json");
    const UNSUBSCRIBE_CONFIRMATION_V2: &str = include_str!("sns_http_fixtures/unsubscribe-confirmation-v2.json");
    const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:cadenhq-feedback";
    const CERT_URL: &str = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-7506a1e35b36ef5a444dd1a8e7cc3ed8.pem";

    /// A fake HTTPS: answers each URL from a map, and counts the GETs.
    #[derive(Default)]
    struct FakeGet {
        answers: HashMap<String, Result<Vec<u8>, String>>,
        calls: AtomicUsize,
        urls: Mutex<Vec<String>>,
    }

    impl FakeGet {
        fn serving_cert() -> Arc<Self> {
            Arc::new(Self { answers: HashMap::from([(CERT_URL.to_owned(), Ok(CERT_PEM.as_bytes().to_vec()))]), ..Self::default() })
        }

        fn answering(url: &str, answer: Result<Vec<u8>, String>) -> Arc<Self> {
            Arc::new(Self { answers: HashMap::from([(url.to_owned(), answer)]), ..Self::default() })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl HttpsGet for FakeGet {
        async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.urls.lock().unwrap().push(url.to_owned());
            self.answers.get(url).cloned().unwrap_or_else(|| Err("404".to_owned()))
        }
    }

    fn verifier(fetcher: &Arc<FakeGet>) -> SnsVerifier {
        SnsVerifier::new(vec!["arn:aws:sns:eu-west-1:123456789012:other".to_owned(), TOPIC.to_owned()], Arc::clone(fetcher) as Arc<dyn HttpsGet>)
    }

    /// A minute after the fixtures were signed.
    fn now() -> OffsetDateTime {
        OffsetDateTime::parse("2026-03-02T10:16:30.123Z", &Rfc3339).unwrap()
    }

    fn edited(fixture: &str, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
        let mut body: serde_json::Value = serde_json::from_str(fixture).unwrap();
        edit(body.as_object_mut().unwrap());
        body.to_string().into_bytes()
    }

    fn fixture_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/adapters/sns_http_fixtures")
    }

    /// A fresh folder under the system's temporary folder, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!("cadenhq-sns-{tag}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
            std::fs::create_dir(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn every_fixture_verifies_with_both_signature_versions() {
        let fetcher = FakeGet::serving_cert();
        let verifier = verifier(&fetcher);
        let fixtures = [
            NOTIFICATION_SUBJECT_V1,
            NOTIFICATION_SUBJECT_V2,
            NOTIFICATION_V1,
            NOTIFICATION_V2,
            SUBSCRIPTION_CONFIRMATION_V1,
            SUBSCRIPTION_CONFIRMATION_V2,
            UNSUBSCRIBE_CONFIRMATION_V2,
        ];

        for fixture in fixtures {
            let verified = verifier.verify(fixture.as_bytes(), now()).await;
            assert!(verified.is_ok(), "{verified:?} for {fixture}");
        }
    }

    #[tokio::test]
    async fn a_verified_notification_carries_its_id_topic_and_message() {
        let verifier = verifier(&FakeGet::serving_cert());

        let verified = verifier.verify(NOTIFICATION_V2.as_bytes(), now()).await.unwrap();

        let VerifiedSns::Notification { message_id, topic_arn, message } = verified else { panic!("{verified:?}") };
        assert_eq!(message_id, "5b2c1f0e-4a1d-5e6f-9a7b-0c1d2e3f4a5b");
        assert_eq!(topic_arn, TOPIC);
        let ses: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(ses["notificationType"], "Bounce");
        assert_eq!(ses["note"], "línea\nsegunda \"citada\"");
    }

    #[tokio::test]
    async fn a_verified_subscription_confirmation_carries_its_subscribe_url() {
        let verifier = verifier(&FakeGet::serving_cert());

        let verified = verifier.verify(SUBSCRIPTION_CONFIRMATION_V1.as_bytes(), now()).await.unwrap();

        let VerifiedSns::SubscriptionConfirmation { topic_arn, subscribe_url } = verified else { panic!("{verified:?}") };
        assert_eq!(topic_arn, TOPIC);
        assert!(subscribe_url.as_str().starts_with("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&"));
    }

    #[tokio::test]
    async fn a_verified_unsubscribe_confirmation_carries_its_topic() {
        let verifier = verifier(&FakeGet::serving_cert());

        let verified = verifier.verify(UNSUBSCRIBE_CONFIRMATION_V2.as_bytes(), now()).await.unwrap();

        assert_eq!(verified, VerifiedSns::UnsubscribeConfirmation { topic_arn: TOPIC.to_owned() });
    }

    #[tokio::test]
    async fn a_tampered_field_breaks_the_signature() {
        let verifier = verifier(&FakeGet::serving_cert());
        let tampered: [(&str, &str, serde_json::Value); 6] = [
            (NOTIFICATION_V2, "Message", "{\"notificationType\": \"Complaint\"}".into()),
            (NOTIFICATION_V1, "MessageId", "5b2c1f0e-4a1d-5e6f-9a7b-0c1d2e3f4a5c".into()),
            (NOTIFICATION_SUBJECT_V2, "Subject", "Amazon SES Email Event Notification!".into()),
            (NOTIFICATION_V2, "Subject", "added".into()),
            (NOTIFICATION_V1, "Timestamp", "2026-03-02T10:15:31.123Z".into()),
            (SUBSCRIPTION_CONFIRMATION_V2, "Token", "0000".into()),
        ];

        for (fixture, field, value) in tampered {
            let body = edited(fixture, |m| {
                m.insert(field.to_owned(), value);
            });
            assert_eq!(verifier.verify(&body, now()).await, Err(SnsError::BadSignature), "{field}");
        }
    }

    #[tokio::test]
    async fn one_changed_byte_of_the_message_breaks_the_signature() {
        let verifier = verifier(&FakeGet::serving_cert());
        let body = NOTIFICATION_SUBJECT_V1.replacen("Permanent", "Permanenu", 1);
        assert_ne!(body, NOTIFICATION_SUBJECT_V1);

        assert_eq!(verifier.verify(body.as_bytes(), now()).await, Err(SnsError::BadSignature));
    }

    #[tokio::test]
    async fn a_removed_subject_or_a_swapped_signature_version_breaks_the_signature() {
        let verifier = verifier(&FakeGet::serving_cert());
        let no_subject = edited(NOTIFICATION_SUBJECT_V2, |m| {
            m.remove("Subject");
        });
        let v1_as_v2 = edited(NOTIFICATION_V1, |m| {
            m.insert("SignatureVersion".to_owned(), "2".into());
        });
        let v2_as_v1 = edited(NOTIFICATION_V2, |m| {
            m.insert("SignatureVersion".to_owned(), "1".into());
        });
        let truncated = edited(NOTIFICATION_V2, |m| {
            let signature = base64::engine::general_purpose::STANDARD.decode(m["Signature"].as_str().unwrap()).unwrap();
            m.insert("Signature".to_owned(), base64::engine::general_purpose::STANDARD.encode(&signature[1..]).into());
        });

        for body in [no_subject, v1_as_v2, v2_as_v1, truncated] {
            assert_eq!(verifier.verify(&body, now()).await, Err(SnsError::BadSignature));
        }
    }

    #[tokio::test]
    async fn another_topic_is_refused_before_any_fetch() {
        let fetcher = FakeGet::serving_cert();
        let verifier = SnsVerifier::new(vec!["arn:aws:sns:us-east-1:123456789012:cadenhq".to_owned()], Arc::clone(&fetcher) as Arc<dyn HttpsGet>);

        assert_eq!(verifier.verify(NOTIFICATION_V2.as_bytes(), now()).await, Err(SnsError::TopicNotAllowed));
        assert_eq!(fetcher.calls(), 0);
    }

    #[tokio::test]
    async fn no_topic_configured_refuses_everything() {
        let fetcher = FakeGet::serving_cert();
        let verifier = SnsVerifier::new(Vec::new(), Arc::clone(&fetcher) as Arc<dyn HttpsGet>);

        assert_eq!(verifier.verify(SUBSCRIPTION_CONFIRMATION_V2.as_bytes(), now()).await, Err(SnsError::TopicNotAllowed));
    }

    #[tokio::test]
    async fn stale_and_future_messages_are_refused_before_any_fetch() {
        let fetcher = FakeGet::serving_cert();
        let verifier = verifier(&fetcher);
        let signed = OffsetDateTime::parse("2026-03-02T10:15:30.123Z", &Rfc3339).unwrap();

        for at in [signed + time::Duration::minutes(61), signed - time::Duration::minutes(6)] {
            assert_eq!(verifier.verify(NOTIFICATION_V2.as_bytes(), at).await, Err(SnsError::Stale), "{at}");
        }
        assert_eq!(fetcher.calls(), 0);
        assert!(verifier.verify(NOTIFICATION_V2.as_bytes(), signed + time::Duration::minutes(59)).await.is_ok());
    }

    #[tokio::test]
    async fn a_certificate_url_off_sns_is_refused_without_a_fetch() {
        let fetcher = FakeGet::serving_cert();
        let verifier = verifier(&fetcher);
        let urls = [
            format!("http://sns.us-east-1.amazonaws.com/{CERT_FILE}"),
            format!("https://sns.us-east-1.amazonaws.com.evil.com/{CERT_FILE}"),
            format!("https://sns.us-east-1.amazonaws.com@evil.com/{CERT_FILE}"),
            format!("https://sns.us-east-1.amazonaws.com:8443/{CERT_FILE}"),
            format!("https://evil.com/{CERT_FILE}"),
            "https://sns.us-east-1.amazonaws.com/cert.pem".to_owned(),
        ];

        for url in urls {
            let body = edited(NOTIFICATION_V2, |m| {
                m.insert("SigningCertURL".to_owned(), url.clone().into());
            });
            assert_eq!(verifier.verify(&body, now()).await, Err(SnsError::CertUrlRejected), "{url}");
        }
        assert_eq!(fetcher.calls(), 0);
    }

    #[tokio::test]
    async fn garbage_bodies_are_refused_without_a_panic() {
        let verifier = verifier(&FakeGet::serving_cert());
        let bodies: [&[u8]; 6] = [b"", b"\x00\xff", b"{}", b"[1,2]", b"{\"Type\":\"Notification\"}", &[b'{'; 10_000]];

        for body in bodies {
            assert!(matches!(verifier.verify(body, now()).await, Err(SnsError::Malformed(_))));
        }
    }

    #[tokio::test]
    async fn a_certificate_is_fetched_once_then_cached() {
        let fetcher = FakeGet::serving_cert();
        let verifier = verifier(&fetcher);

        for fixture in [NOTIFICATION_V1, NOTIFICATION_V2, SUBSCRIPTION_CONFIRMATION_V2] {
            verifier.clone().verify(fixture.as_bytes(), now()).await.unwrap();
        }

        assert_eq!(fetcher.calls(), 1);
        assert_eq!(*fetcher.urls.lock().unwrap(), [CERT_URL]);
    }

    #[tokio::test]
    async fn a_failed_fetch_is_unavailable_and_not_cached() {
        let fetcher = FakeGet::answering(CERT_URL, Err("timed out".to_owned()));
        let verifier = verifier(&fetcher);

        for _ in 0..2 {
            let result = verifier.verify(NOTIFICATION_V2.as_bytes(), now()).await;
            assert!(matches!(result, Err(SnsError::CertificateUnavailable(_))), "{result:?}");
        }
        assert_eq!(fetcher.calls(), 2);
    }

    #[tokio::test]
    async fn a_fetched_body_that_is_no_certificate_is_unavailable() {
        let fetcher = FakeGet::answering(CERT_URL, Ok(b"<html>Service Unavailable</html>".to_vec()));
        let verifier = verifier(&fetcher);

        let result = verifier.verify(NOTIFICATION_V2.as_bytes(), now()).await;

        assert!(matches!(result, Err(SnsError::CertificateUnavailable(_))), "{result:?}");
    }

    #[tokio::test]
    async fn a_seeded_certificate_folder_is_used_without_fetching() {
        let fetcher = Arc::new(FakeGet::default());
        let verifier = verifier(&fetcher).with_cert_dir(fixture_dir()).unwrap();

        for fixture in [NOTIFICATION_V1, SUBSCRIPTION_CONFIRMATION_V2] {
            assert!(verifier.verify(fixture.as_bytes(), now()).await.is_ok());
        }
        assert_eq!(fetcher.calls(), 0);
    }

    #[tokio::test]
    async fn a_certificate_folder_loads_only_sns_certificate_names() {
        let dir = TempDir::new("names");
        std::fs::write(dir.0.join("SimpleNotificationService-other.pem"), CERT_PEM).unwrap();
        std::fs::write(dir.0.join(CERT_FILE.replace(".pem", ".pem.bak")), CERT_PEM).unwrap();
        std::fs::write(dir.0.join("README"), "not a certificate").unwrap();
        let fetcher = Arc::new(FakeGet::default());

        let verifier = verifier(&fetcher).with_cert_dir(&dir.0).unwrap();

        let result = verifier.verify(NOTIFICATION_V2.as_bytes(), now()).await;
        assert!(matches!(result, Err(SnsError::CertificateUnavailable(_))), "{result:?}");
        assert_eq!(fetcher.calls(), 1);
        let other = edited(NOTIFICATION_V2, |m| {
            m.insert("SigningCertURL".to_owned(), "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-other.pem".into());
        });
        assert!(verifier.verify(&other, now()).await.is_ok(), "cached under its file name, whatever the region");
        assert_eq!(fetcher.calls(), 1);
    }

    #[test]
    fn a_certificate_folder_with_a_bad_certificate_is_an_error() {
        let dir = TempDir::new("bad");
        std::fs::write(dir.0.join(CERT_FILE), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();

        let result = SnsVerifier::new(Vec::new(), Arc::new(FakeGet::default())).with_cert_dir(&dir.0);

        assert!(matches!(result, Err(SnsConfigError::NotACertificate { .. })), "{result:?}");
    }

    #[test]
    fn a_missing_certificate_folder_is_an_error() {
        let dir = TempDir::new("missing");
        let missing = dir.0.join("absent");

        let result = SnsVerifier::new(Vec::new(), Arc::new(FakeGet::default())).with_cert_dir(missing);

        assert!(matches!(result, Err(SnsConfigError::CertDir { .. })), "{result:?}");
    }

    #[tokio::test]
    async fn confirm_gets_the_subscribe_url() {
        let subscribe = SubscribeUrl::parse("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=abc").unwrap();
        let fetcher = FakeGet::answering(subscribe.as_str(), Ok(b"<ConfirmSubscriptionResponse/>".to_vec()));
        let verifier = verifier(&fetcher);

        verifier.confirm(&subscribe).await.unwrap();

        assert_eq!(*fetcher.urls.lock().unwrap(), [subscribe.as_str()]);
    }

    #[tokio::test]
    async fn a_failed_confirmation_is_an_error() {
        let subscribe = SubscribeUrl::parse("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=abc").unwrap();
        let verifier = verifier(&FakeGet::answering(subscribe.as_str(), Err("403 Forbidden".to_owned())));

        assert!(matches!(verifier.confirm(&subscribe).await, Err(SnsError::ConfirmationFailed(_))));
    }

    #[test]
    fn sha1_with_rsa_identifier_is_the_sha256_one_with_the_oid_ending_in_5() {
        let sha256 = alg_id::RSA_PKCS1_SHA256;
        let sha1 = RsaPkcs1Sha1.signature_alg_id();

        assert_eq!(sha1.as_ref().len(), sha256.as_ref().len());
        assert_eq!(sha1.as_ref()[..10], sha256.as_ref()[..10]);
        assert_eq!(sha256.as_ref()[10], 0x0b);
        assert_eq!(sha1.as_ref()[10], 0x05);
        assert_eq!(sha1.as_ref()[11..], sha256.as_ref()[11..]);
    }
}
