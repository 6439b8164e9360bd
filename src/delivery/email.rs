//! Email over SMTP (`email` channels), with lettre: building the message from
//! a rendered step, pooled transports per Channel, and one attempt at sending.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::Value;

use super::config::SmtpServer;
use super::egress::EgressPolicy;
use super::signing::IDEMPOTENCY_HEADER;
use super::{error_chain, preview, DeliveryError, Failure, Sent};
use crate::core::execution::Message;
use crate::resources::channel::SmtpTls;

pub type Transport = AsyncSmtpTransport<Tokio1Executor>;

/// SMTP connections kept per Channel.
const POOL_SIZE: u32 = 16;

/// An email ready to send (the same on every attempt).
#[derive(Debug, Clone)]
pub struct Email {
    pub message: lettre::Message,
    pub preview: String,
}

fn field<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    message.fields.get(name).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty())
}

/// Builds the email of a step: `from` (the step's, else the Channel's), `to`
/// (the step's, else the recipient's channel_data `to`, else the recipient's
/// email; several addresses may be comma-separated), `subject`, and `text`
/// and/or `html` (both: multipart/alternative). The Message-ID and an
/// `Idempotency-Key` header carry the idempotency key, the same on every
/// attempt, so that receivers can drop duplicates.
pub fn build(message: &Message, channel_from: Option<&str>) -> Result<Email, DeliveryError> {
    let invalid = DeliveryError::InvalidMessage;
    let from_text = field(message, "from")
        .or(channel_from.map(str::trim).filter(|s| !s.is_empty()))
        .ok_or_else(|| invalid(format!("no sender: the step has no template.from and Channel `{}` has no `from`", message.channel)))?;
    let from: Mailbox = from_text.parse().map_err(|e| invalid(format!("from `{from_text}` is not an email address: {e}")))?;
    let to_text = field(message, "to")
        .map(str::to_string)
        .or_else(|| message.channel_data.as_ref().and_then(|d| d.get("to")).and_then(Value::as_str).map(str::to_string))
        .or_else(|| message.email.clone())
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| invalid("no recipient address: the step has no template.to and the recipient has no email".into()))?;
    let to: Mailboxes = to_text.parse().map_err(|e| invalid(format!("to `{to_text}` is not a list of email addresses: {e}")))?;
    if to.iter().next().is_none() {
        return Err(invalid(format!("to `{to_text}` names no address")));
    }
    let subject = field(message, "subject").unwrap_or_default();
    let text = message.fields.get("text").and_then(Value::as_str).filter(|s| !s.trim().is_empty());
    let html = message.fields.get("html").and_then(Value::as_str).filter(|s| !s.trim().is_empty());

    let mut builder = lettre::Message::builder().from(from.clone()).subject(subject).message_id(Some(message_id(&message.idempotency_key, &from)));
    builder = builder.mailbox(lettre::message::header::To::from(to.clone()));
    builder = builder.raw_header(HeaderValue::new(HeaderName::new_from_ascii_str(IDEMPOTENCY_HEADER), message.idempotency_key.clone()));
    let built = match (text, html) {
        (Some(t), Some(h)) => builder.multipart(MultiPart::alternative_plain_html(t.to_string(), h.to_string())),
        (Some(t), None) => builder.singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(t.to_string())),
        (None, Some(h)) => builder.singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(h.to_string())),
        (None, None) => return Err(invalid("the email is empty: template.text and template.html rendered nothing".into())),
    };
    let email = built.map_err(|e| invalid(format!("cannot build the email: {e}")))?;
    Ok(Email { message: email, preview: format!("to {to_text}; subject: {}", preview(subject, 120)) })
}

/// `<recipient-run-id.step-ref@sender-domain>`: stable across attempts and
/// restarts. Characters a Message-ID cannot hold become `-`.
fn message_id(idempotency_key: &str, from: &Mailbox) -> String {
    let local: String = idempotency_key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) {
                c
            } else if c == ':' {
                '.'
            } else {
                '-'
            }
        })
        .collect();
    format!("<{local}@{}>", from.email.domain())
}

/// A Channel's transport with the fingerprint of the settings it was built from.
type Cached = (String, Arc<Transport>);

/// Pooled SMTP transports, one per Channel (namespace, name), rebuilt when
/// the Channel or its Secret changes.
#[derive(Default)]
pub struct Transports {
    cache: Mutex<HashMap<(String, String), Cached>>,
}

impl Transports {
    /// The transport of Channel `namespace/name`; `fingerprint` changes
    /// whenever its settings or credentials do.
    pub fn get(
        &self,
        key: (String, String),
        fingerprint: &str,
        server: &SmtpServer,
        credentials: Option<(String, String)>,
        timeout: Duration,
    ) -> Result<Arc<Transport>, DeliveryError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((f, transport)) = cache.get(&key) {
            if f == fingerprint {
                return Ok(transport.clone());
            }
        }
        let tls = match server.tls {
            SmtpTls::None => Tls::None,
            // Required, not opportunistic: a server that does not offer
            // STARTTLS fails the delivery rather than getting credentials in clear.
            SmtpTls::Starttls => Tls::Required(tls_parameters(&server.host)?),
            SmtpTls::Tls => Tls::Wrapper(tls_parameters(&server.host)?),
        };
        let mut builder = Transport::builder_dangerous(server.host.as_str())
            .port(server.port)
            .tls(tls)
            .timeout(Some(timeout))
            .pool_config(PoolConfig::new().max_size(POOL_SIZE).idle_timeout(Duration::from_secs(60)));
        if let Some((user, password)) = credentials {
            builder = builder.credentials(Credentials::new(user, password));
        }
        let transport = Arc::new(builder.build());
        cache.insert(key, (fingerprint.to_string(), transport.clone()));
        Ok(transport)
    }
}

fn tls_parameters(host: &str) -> Result<TlsParameters, DeliveryError> {
    // lettre uses the installed rustls provider (ring, as for HTTP).
    let _ = rustls::crypto::ring::default_provider().install_default();
    TlsParameters::new(host.to_string()).map_err(|e| DeliveryError::Channel(super::ChannelProblem::InvalidConfig(format!("smtp TLS setup for `{host}`: {}", error_chain(&e)))))
}

/// Resolves the SMTP host and checks every address against the egress policy,
/// before an attempt. Every address, not just one: lettre connects by name
/// and may use any of them.
///
/// TOCTOU: lettre resolves the name again when it opens a connection, so a
/// name whose DNS answer changes in between (DNS rebinding) could still reach
/// a refused address. The host comes from the Channel alone (never from
/// recipients' data), which limits who can try. Pinning the checked address
/// would close the gap but lose lettre's failover across a host's addresses.
pub async fn check_egress(egress: &EgressPolicy, server: &SmtpServer) -> Result<(), DeliveryError> {
    let resolved = tokio::net::lookup_host((server.host.as_str(), server.port))
        .await
        .map_err(|e| DeliveryError::Transient(Failure::new(None, format!("SMTP {}:{}: cannot resolve the host: {e}", server.host, server.port))))?;
    Ok(egress.check_every(&server.host, resolved)?)
}

/// One attempt: hands the email to the SMTP server. SMTP 5xx replies fail at
/// once; 4xx replies, network errors and timeouts may pass.
pub async fn send(transport: &Transport, email: &Email, server: &SmtpServer, timeout: Duration) -> Result<Sent, DeliveryError> {
    // lettre's timeout applies to each command; bound the whole exchange too.
    let whole = timeout.saturating_mul(4);
    let result = match tokio::time::timeout(whole, transport.send(email.message.clone())).await {
        Ok(r) => r,
        Err(_) => return Err(DeliveryError::Transient(Failure::new(None, format!("SMTP {}:{} did not finish within {}s", server.host, server.port, whole.as_secs())))),
    };
    match result {
        Ok(response) => {
            let code = u16::from(response.code());
            Ok(Sent { status: Some(i32::from(code)), summary: format!("SMTP {code} from {}:{}; {}", server.host, server.port, email.preview) })
        }
        Err(e) => {
            let code = e.status().map(|c| i32::from(u16::from(c)));
            let message = format!("SMTP {}:{}: {}", server.host, server.port, error_chain(&e));
            if e.is_permanent() || e.is_client() || e.is_tls() {
                // 5xx, or something no retry changes (no STARTTLS offered, no
                // common AUTH mechanism, a certificate that does not verify).
                Err(DeliveryError::Rejected(Failure::new(code, message)))
            } else {
                Err(DeliveryError::Transient(Failure::new(code, message)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(fields: Value, email: Option<&str>) -> Message {
        Message {
            step_ref: "mail".into(),
            channel: "mail".into(),
            channel_type: "email",
            fields: fields.as_object().cloned().unwrap_or_default(),
            channel_data: None,
            email: email.map(str::to_string),
            idempotency_key: "0b6e-11:mail".into(),
        }
    }

    fn formatted(email: &Email) -> String {
        String::from_utf8(email.message.formatted()).unwrap()
    }

    #[test]
    fn builds_from_the_step_the_channel_and_the_recipient() {
        let email = build(&message(json!({"subject": "Hello", "text": "plain"}), Some("jane@example.com")), Some("Ops <ops@example.com>")).unwrap();
        let raw = formatted(&email);
        assert!(raw.contains("From: Ops <ops@example.com>"), "{raw}");
        assert!(raw.contains("To: jane@example.com"), "{raw}");
        assert!(raw.contains("Subject: Hello"), "{raw}");
        assert!(raw.contains("Message-ID: <0b6e-11.mail@example.com>"), "{raw}");
        assert!(raw.contains("Idempotency-Key: 0b6e-11:mail"), "{raw}");
        assert!(raw.contains("plain"));
        let email = build(&message(json!({"from": "a@x.org", "to": "b@y.org, c@z.org", "text": "t", "html": "<b>h</b>"}), None), None).unwrap();
        let raw = formatted(&email);
        assert!(raw.contains("multipart/alternative") && raw.contains("<b>h</b>"), "{raw}");
        assert!(raw.contains("b@y.org") && raw.contains("c@z.org"), "{raw}");
    }

    #[tokio::test]
    async fn smtp_hosts_are_checked_on_every_address_they_resolve_to() {
        let server = |host: &str| SmtpServer { host: host.into(), port: 25, tls: SmtpTls::None };
        let deny_loopback = EgressPolicy::new(&"127.0.0.0/8,::1".parse::<crate::delivery::egress::CidrList>().unwrap().0, &[]);
        let err = check_egress(&deny_loopback, &server("localhost")).await.unwrap_err();
        assert_eq!(err.reason(), "EgressDenied");
        assert!(err.to_string().starts_with("`localhost` resolves to "), "{err}");
        let err = check_egress(&EgressPolicy::default(), &server("169.254.169.254")).await.unwrap_err();
        assert_eq!(err.to_string(), "169.254.169.254 is refused by the egress policy (default: cloud metadata)");
        assert!(check_egress(&EgressPolicy::default(), &server("localhost")).await.is_ok());
    }

    #[test]
    fn rendered_line_breaks_cannot_inject_headers() {
        let mut m = message(json!({"subject": "hi\r\nBcc: evil@x.org", "text": "t"}), Some("j@x.org"));
        m.idempotency_key = "rr:step\r\nBcc: evil@x.org".into();
        let raw = formatted(&build(&m, Some("a@x.org")).unwrap());
        assert!(!raw.contains("\r\nBcc:"), "{raw}");
        assert_eq!(build(&m, Some("a@x.org")).unwrap().message.envelope().to().len(), 1);
    }

    #[test]
    fn bad_addresses_and_empty_emails_fail_with_a_message() {
        for (fields, email, from, expected) in [
            (json!({"text": "t"}), Some("j@x.org"), None, "no sender"),
            (json!({"text": "t", "from": "not an address"}), Some("j@x.org"), None, "from `not an address`"),
            (json!({"text": "t"}), None, Some("a@x.org"), "no recipient address"),
            (json!({"text": "t", "to": "nobody"}), None, Some("a@x.org"), "to `nobody`"),
            (json!({"subject": "s"}), Some("j@x.org"), Some("a@x.org"), "the email is empty"),
        ] {
            let err = build(&message(fields, email), from).expect_err(expected);
            assert_eq!(err.reason(), "InvalidMessage");
            assert!(err.to_string().contains(expected), "{err}");
        }
    }
}
