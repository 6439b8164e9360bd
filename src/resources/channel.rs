//! The `Channel` kind: how messages leave herald (HTTP webhook, chat webhook,
//! SMTP email), or reach a user's in-app feed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A delivery channel that workflow steps send through.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A delivery channel that workflow steps send through: an HTTP webhook, a Slack-compatible chat webhook, SMTP email, or an in-app feed (needs the history store).",
    version = "v1alpha1",
    kind = "Channel",
    namespaced,
    status = "ChannelStatus",
    shortname = "ch",
    category = "herald",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ChannelSpec {
    /// `http` (webhook), `chat` (Slack-compatible incoming webhook), `email` (SMTP) or
    /// `in_app_feed` (messages stored in the history store and read by Knock's feed clients).
    #[serde(rename = "type")]
    pub channel_type: ChannelType,
    /// http and chat: a default URL, used when neither the step nor the recipient's channel_data gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// email: the SMTP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpSettings>,
    /// email: the default sender address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// A Secret in the same namespace: key `signingKey` signs http requests;
    /// keys `username` and `password` log in to SMTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
    /// Delivery retries.
    #[serde(default)]
    pub retry: RetrySettings,
    /// Seconds before an attempt times out (default 10, at most an hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<i32>,
}

/// The kind of channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChannelType {
    #[default]
    Http,
    Chat,
    Email,
    /// Knock's in-app feed: the message is stored for its recipient to read.
    #[serde(rename = "in_app_feed")]
    InAppFeed,
}

impl ChannelType {
    /// The Knock channel type name used in preference sets.
    pub fn preference_name(self) -> &'static str {
        match self {
            ChannelType::Http => "http",
            ChannelType::Chat => "chat",
            ChannelType::Email => "email",
            ChannelType::InAppFeed => "in_app_feed",
        }
    }
}

/// An SMTP server.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SmtpSettings {
    /// Host name.
    pub host: String,
    /// Port (default 587 for starttls, 465 for tls, 25 for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// `starttls` (default), `tls` (implicit TLS) or `none`.
    #[serde(default)]
    pub tls: SmtpTls,
}

/// SMTP transport security.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    #[default]
    Starttls,
    Tls,
    None,
}

/// A reference to a Secret in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SecretReference {
    /// The Secret's name.
    pub name: String,
}

/// The most attempts a Channel may allow a delivery (`retry.maxAttempts`).
pub const MAX_ATTEMPTS: i32 = 20;

/// Delivery retry settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySettings {
    /// Attempts in all, first included (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_ATTEMPTS))]
    pub max_attempts: Option<i32>,
    /// The first backoff in milliseconds, doubled each attempt, with jitter (default 500; waits are capped at 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 30000))]
    pub initial_backoff_ms: Option<i64>,
}

/// The observed state of a Channel.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the settings are complete and the referenced Secret has the keys needed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::conditions")]
    pub conditions: Vec<Condition>,
}
