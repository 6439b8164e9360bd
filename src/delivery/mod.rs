//! How messages leave herald: HTTP webhooks, Slack-compatible chat webhooks
//! and SMTP email, with request signatures, retries and the checks that decide
//! whether a Channel is usable.
//!
//! The pieces are protocol-level and know nothing of reconciles; the
//! [`Deliverer`](crate::controller::delivery::Deliverer) puts them together for
//! one rendered message, and the Channel reconciler reports [`config`]'s
//! verdict as the Channel's `Ready` condition.

pub mod config;
pub mod egress;
pub mod email;
pub mod http;
pub mod retry;
pub mod secrets;
pub mod signing;

use std::time::Duration;

pub use config::ChannelProblem;

/// Why one delivery attempt (or the preparation before any attempt) failed.
/// [`DeliveryError::is_retryable`] decides whether another attempt may help.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The Channel's settings or its Secret are wrong: no attempt can succeed
    /// until someone fixes them.
    #[error(transparent)]
    Channel(#[from] ChannelProblem),
    /// The rendered message cannot be sent as it is: a bad URL, method,
    /// header or address from a template, or nowhere to send it.
    #[error("{0}")]
    InvalidMessage(String),
    /// The egress policy refuses every address the host resolves to (or the
    /// IP address the URL names): no attempt can succeed.
    #[error(transparent)]
    EgressDenied(#[from] egress::EgressDenied),
    /// The receiver refused the message for good: an HTTP 4xx other than 408
    /// and 429 (or a redirect, which herald does not follow), or an SMTP 5xx.
    #[error("{0}")]
    Rejected(Failure),
    /// A failure that may pass: connection errors, timeouts, HTTP 408, 429
    /// and 5xx, SMTP 4xx, and Kubernetes API errors while reading the Secret.
    #[error("{0}")]
    Transient(Failure),
}

/// What a receiver (or the network) said when an attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The HTTP status or SMTP reply code, when the receiver answered.
    pub status: Option<i32>,
    pub message: String,
    /// The receiver's Retry-After, for HTTP 429 and 503 (and any other retryable answer).
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Failure {
    pub fn new(status: Option<i32>, message: impl Into<String>) -> Self {
        Failure { status, message: message.into(), retry_after: None }
    }
}

impl DeliveryError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DeliveryError::Transient(_))
    }

    /// The receiver's status code, if it answered.
    pub fn status_code(&self) -> Option<i32> {
        match self {
            DeliveryError::Rejected(f) | DeliveryError::Transient(f) => f.status,
            _ => None,
        }
    }

    /// The step's reason (CamelCase) when this error ends the delivery.
    /// `Transient` only ends it once the attempts are used up.
    pub fn reason(&self) -> &'static str {
        match self {
            DeliveryError::Channel(_) => "ChannelNotReady",
            DeliveryError::InvalidMessage(_) => "InvalidMessage",
            DeliveryError::EgressDenied(_) => "EgressDenied",
            DeliveryError::Rejected(_) => "Rejected",
            DeliveryError::Transient(_) => "RetriesExhausted",
        }
    }

    /// How long the receiver asked to wait before the next attempt.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Transient(f) => f.retry_after,
            _ => None,
        }
    }
}

/// What a successful attempt reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    /// The HTTP status or SMTP reply code.
    pub status: Option<i32>,
    /// One line for the recipient's step status: where it went and a preview of what.
    pub summary: String,
}

/// An error with its sources, on one line: reqwest and lettre put the useful
/// part ("connection refused", "invalid peer certificate") in the sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A short, single-line preview of content for status messages.
pub fn preview(text: &str, max_chars: usize) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max_chars {
        return one_line;
    }
    let cut: String = one_line.chars().take(max_chars).collect();
    format!("{cut}...")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_short_single_lines() {
        assert_eq!(preview("a\n  b\tc", 10), "a b c");
        assert_eq!(preview("héllo wörld", 5), "héllo...");
    }

    #[test]
    fn only_transient_errors_retry() {
        assert!(DeliveryError::Transient(Failure::new(Some(503), "busy")).is_retryable());
        assert!(!DeliveryError::Rejected(Failure::new(Some(404), "gone")).is_retryable());
        assert!(!DeliveryError::InvalidMessage("bad url".into()).is_retryable());
        assert_eq!(DeliveryError::Rejected(Failure::new(Some(404), "gone")).status_code(), Some(404));
        let denied = egress::EgressPolicy::default().check_every("169.254.169.254", ["169.254.169.254:80".parse().unwrap()]).unwrap_err();
        let denied = DeliveryError::from(denied);
        assert!(!denied.is_retryable());
        assert_eq!(denied.reason(), "EgressDenied");
    }
}
