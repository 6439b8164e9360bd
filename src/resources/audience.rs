//! The `Audience` kind: a named list of recipients (the notify API's `lists`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A named list of recipients, e.g. `project.123.followers`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A named list of recipients (the notify API's lists), reached by key from a TriggerRun's audiences.",
    version = "v1alpha1",
    kind = "Audience",
    namespaced,
    category = "herald",
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".spec.key"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","priority":1,"jsonPath":".spec.selector"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AudienceSpec {
    /// The audience key triggers name (any string).
    pub key: String,
    /// Members: user id strings or object references `{id, collection}`.
    #[serde(default)]
    #[schemars(schema_with = "crate::resources::schema::recipient_list")]
    pub members: Vec<Value>,
    /// A dynamic audience: every User in the namespace whose labels match
    /// (`{matchLabels: {plan: pro}}`, and/or `matchExpressions`), evaluated
    /// when a run expands the audience. Listed `members` are added to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}
