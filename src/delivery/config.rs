//! Whether a Channel can be used: its settings, and the Secret it references.
//! The Channel reconciler reports the verdict as the `Ready` condition; the
//! Deliverer refuses to send through a channel that fails it, with the same message.

use std::time::Duration;

use lettre::message::Mailbox;

use super::retry::RetryPolicy;
use super::secrets::SecretData;
use crate::resources::channel::{ChannelSpec, ChannelType, SmtpSettings, SmtpTls};

/// The Secret key that signs http and chat requests.
pub const SIGNING_KEY: &str = "signingKey";
/// The Secret keys that log in to SMTP.
pub const USERNAME: &str = "username";
pub const PASSWORD: &str = "password";

/// Seconds an attempt may take when the Channel does not say.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 10;

/// What is wrong with a Channel, with a message that names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelProblem {
    /// The spec is incomplete or malformed (email without smtp, a bad url...).
    #[error("{0}")]
    InvalidConfig(String),
    /// The referenced Secret does not exist.
    #[error("Secret `{0}` not found")]
    SecretNotFound(String),
    /// The Secret lacks a key the channel needs.
    #[error("Secret `{secret}` has no key `{key}` ({why})")]
    SecretKeyMissing { secret: String, key: &'static str, why: &'static str },
    /// The Secret could not be read (RBAC, API errors).
    #[error("cannot read Secret `{secret}`: {message}")]
    SecretUnreadable { secret: String, message: String },
}

impl ChannelProblem {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ChannelProblem::InvalidConfig(_) => "InvalidConfig",
            ChannelProblem::SecretNotFound(_) => "SecretNotFound",
            ChannelProblem::SecretKeyMissing { .. } => "SecretKeyMissing",
            ChannelProblem::SecretUnreadable { .. } => "SecretUnreadable",
        }
    }

    /// Whether the problem lies in the Secret (which herald cannot watch, so
    /// the reconciler looks again after a while).
    pub fn is_about_the_secret(&self) -> bool {
        !matches!(self, ChannelProblem::InvalidConfig(_))
    }
}

/// The SMTP server of an email channel, with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpServer {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
}

impl SmtpServer {
    fn from_settings(smtp: &SmtpSettings) -> Result<Self, ChannelProblem> {
        let host = smtp.host.trim();
        if host.is_empty() {
            return Err(ChannelProblem::InvalidConfig("smtp.host is empty".into()));
        }
        if host.contains("://") || host.contains('/') || host.chars().any(char::is_whitespace) {
            return Err(ChannelProblem::InvalidConfig(format!("smtp.host `{host}` must be a host name or IP address, not a URL")));
        }
        let default_port = match smtp.tls {
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        };
        let port = match smtp.port {
            None => default_port,
            Some(p) => u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| ChannelProblem::InvalidConfig(format!("smtp.port {p} is not a port (1-65535)")))?,
        };
        Ok(SmtpServer { host: host.to_string(), port, tls: smtp.tls })
    }
}

/// Checks the spec alone (no Secret): what every delivery through the
/// channel relies on. Returns the SMTP server of an email channel.
pub fn check_spec(spec: &ChannelSpec) -> Result<Option<SmtpServer>, ChannelProblem> {
    if let Some(t) = spec.timeout_seconds {
        if t < 1 {
            return Err(ChannelProblem::InvalidConfig(format!("timeoutSeconds must be at least 1, not {t}")));
        }
    }
    if let Some(m) = spec.retry.max_attempts {
        if !(1..=20).contains(&m) {
            return Err(ChannelProblem::InvalidConfig(format!("retry.maxAttempts must be between 1 and 20, not {m}")));
        }
    }
    if let Some(b) = spec.retry.initial_backoff_ms {
        if b < 1 {
            return Err(ChannelProblem::InvalidConfig(format!("retry.initialBackoffMs must be at least 1, not {b}")));
        }
    }
    match spec.channel_type {
        ChannelType::Http | ChannelType::Chat => {
            if let Some(url) = &spec.url {
                parse_webhook_url(url).map_err(|e| ChannelProblem::InvalidConfig(format!("url: {e}")))?;
            }
            Ok(None)
        }
        ChannelType::Email => {
            let smtp = spec.smtp.as_ref().ok_or_else(|| ChannelProblem::InvalidConfig("an email channel needs `smtp` (host, port, tls)".into()))?;
            let server = SmtpServer::from_settings(smtp)?;
            if let Some(from) = &spec.from {
                from.parse::<Mailbox>().map_err(|e| ChannelProblem::InvalidConfig(format!("from `{from}` is not an email address: {e}")))?;
            }
            Ok(Some(server))
        }
        // Stored, not sent: nothing to reach.
        ChannelType::InAppFeed => Ok(None),
    }
}

/// The Secret keys a channel of this type needs when it references a Secret.
pub fn required_keys(channel_type: ChannelType) -> &'static [(&'static str, &'static str)] {
    match channel_type {
        ChannelType::Http | ChannelType::Chat => &[(SIGNING_KEY, "it signs the requests")],
        ChannelType::Email => &[(USERNAME, "the SMTP login"), (PASSWORD, "the SMTP login")],
        ChannelType::InAppFeed => &[],
    }
}

/// Checks the referenced Secret (`None`: it does not exist) has every key the channel needs.
pub fn check_secret(spec: &ChannelSpec, secret_name: &str, secret: Option<&SecretData>) -> Result<(), ChannelProblem> {
    let secret = secret.ok_or_else(|| ChannelProblem::SecretNotFound(secret_name.to_string()))?;
    for (key, why) in required_keys(spec.channel_type) {
        if secret.get(key).is_none_or(|v| v.is_empty()) {
            return Err(ChannelProblem::SecretKeyMissing { secret: secret_name.to_string(), key, why });
        }
    }
    Ok(())
}

/// The retry policy and per-attempt timeout of a channel.
pub fn limits(spec: &ChannelSpec) -> (RetryPolicy, Duration) {
    let timeout = spec.timeout_seconds.and_then(|t| u64::try_from(t).ok()).filter(|t| *t > 0).unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    (RetryPolicy::for_channel(&spec.retry), Duration::from_secs(timeout))
}

/// One line describing a usable channel, for its Ready condition.
pub fn summary(spec: &ChannelSpec, smtp: Option<&SmtpServer>) -> String {
    let (policy, timeout) = limits(spec);
    let target = match (spec.channel_type, smtp) {
        (ChannelType::Email, Some(s)) => format!("email via {}:{} ({})", s.host, s.port, tls_name(s.tls)),
        (ChannelType::InAppFeed, _) => return "in-app feed: messages are stored in the history store for Knock's feed clients".into(),
        (t, _) => match &spec.url {
            Some(url) => format!("{} webhook, default url {url}", t.preference_name()),
            None => format!("{} webhook, url from the step or the recipient's channel_data", t.preference_name()),
        },
    };
    let secret = match (&spec.secret_ref, spec.channel_type) {
        (Some(r), ChannelType::Email) => format!("; logs in with Secret `{}`", r.name),
        (Some(r), _) => format!("; requests signed with Secret `{}`", r.name),
        (None, _) => String::new(),
    };
    format!("{target}{secret}; up to {} attempts, {}s timeout", policy.max_attempts, timeout.as_secs())
}

fn tls_name(tls: SmtpTls) -> &'static str {
    match tls {
        SmtpTls::Starttls => "starttls",
        SmtpTls::Tls => "tls",
        SmtpTls::None => "no tls",
    }
}

/// Parses a webhook URL: absolute, http or https, with a host.
pub fn parse_webhook_url(url: &str) -> Result<reqwest::Url, String> {
    let trimmed = url.trim();
    let parsed = reqwest::Url::parse(trimmed).map_err(|e| format!("`{trimmed}` is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("`{trimmed}` is not an http or https URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{trimmed}` has no host"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::channel::{RetrySettings, SecretReference};
    use std::collections::BTreeMap;

    fn spec(value: serde_json::Value) -> ChannelSpec {
        serde_json::from_value(value).expect("channel spec")
    }

    #[test]
    fn webhook_urls_must_be_absolute_http() {
        assert!(check_spec(&spec(serde_json::json!({"type": "http", "url": "https://example.com/hook"}))).is_ok());
        assert!(check_spec(&spec(serde_json::json!({"type": "chat"}))).is_ok(), "the url may come from the step or the recipient");
        for bad in ["not a url", "ftp://example.com/x", "/relative", "http://"] {
            let err = check_spec(&spec(serde_json::json!({"type": "http", "url": bad}))).expect_err(bad);
            assert_eq!(err.reason(), "InvalidConfig");
            assert!(err.to_string().starts_with("url: "), "{err}");
        }
    }

    #[test]
    fn email_needs_smtp_and_valid_addresses() {
        let err = check_spec(&spec(serde_json::json!({"type": "email"}))).unwrap_err();
        assert!(err.to_string().contains("needs `smtp`"), "{err}");
        let ok = check_spec(&spec(serde_json::json!({"type": "email", "smtp": {"host": "smtp.example.com"}}))).unwrap().unwrap();
        assert_eq!((ok.port, ok.tls), (587, SmtpTls::Starttls));
        let ok = check_spec(&spec(serde_json::json!({"type": "email", "smtp": {"host": "mx", "tls": "tls"}}))).unwrap().unwrap();
        assert_eq!(ok.port, 465);
        let err = check_spec(&spec(serde_json::json!({"type": "email", "smtp": {"host": "smtp://x"}}))).unwrap_err();
        assert!(err.to_string().contains("not a URL"), "{err}");
        let err = check_spec(&spec(serde_json::json!({"type": "email", "smtp": {"host": "x", "port": 70000}}))).unwrap_err();
        assert!(err.to_string().contains("70000"), "{err}");
        let err = check_spec(&spec(serde_json::json!({"type": "email", "smtp": {"host": "x"}, "from": "not an address"}))).unwrap_err();
        assert!(err.to_string().contains("from `not an address`"), "{err}");
    }

    #[test]
    fn secrets_need_the_keys_of_the_channel_type() {
        let http = ChannelSpec { secret_ref: Some(SecretReference { name: "s".into() }), ..Default::default() };
        assert_eq!(check_secret(&http, "s", None), Err(ChannelProblem::SecretNotFound("s".into())));
        let empty = SecretData::new("1", BTreeMap::new());
        let err = check_secret(&http, "s", Some(&empty)).unwrap_err();
        assert_eq!(err.to_string(), "Secret `s` has no key `signingKey` (it signs the requests)");
        let signed = SecretData::new("1", BTreeMap::from([(SIGNING_KEY.to_string(), b"k".to_vec())]));
        assert!(check_secret(&http, "s", Some(&signed)).is_ok());
        let email = ChannelSpec { channel_type: ChannelType::Email, ..http.clone() };
        let err = check_secret(&email, "s", Some(&SecretData::new("1", BTreeMap::from([(USERNAME.to_string(), b"u".to_vec())])))).unwrap_err();
        assert_eq!(err.reason(), "SecretKeyMissing");
        assert!(err.to_string().contains("`password`"), "{err}");
    }

    #[test]
    fn limits_have_defaults_and_bounds() {
        let (policy, timeout) = limits(&ChannelSpec::default());
        assert_eq!((policy.max_attempts, timeout), (5, Duration::from_secs(10)));
        let custom = ChannelSpec { timeout_seconds: Some(2), retry: RetrySettings { max_attempts: Some(3), initial_backoff_ms: Some(50) }, ..Default::default() };
        let (policy, timeout) = limits(&custom);
        assert_eq!((policy.max_attempts, policy.initial_backoff, timeout), (3, Duration::from_millis(50), Duration::from_secs(2)));
        assert!(check_spec(&ChannelSpec { retry: RetrySettings { max_attempts: Some(0), ..Default::default() }, ..Default::default() }).is_err());
    }
}
