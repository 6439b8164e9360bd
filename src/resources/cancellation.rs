//! The `Cancellation` kind: cancels the runs of a workflow that carry a
//! cancellation key (Knock's cancel call), with kubectl alone.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Cancels unfinished TriggerRuns of `workflow` whose `cancellationKey` matches:
/// their unfinished recipients stop before their next step and end Cancelled.
/// It stays in force for the operator's cancellation retention window (default
/// one hour), so a cancel that arrives before its trigger still applies.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "Cancels the unfinished runs of a workflow carrying a cancellation key (all recipients, or some), for a retention window.",
    version = "v1alpha1",
    kind = "Cancellation",
    namespaced,
    category = "herald",
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".spec.workflow"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".spec.cancellationKey"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CancellationSpec {
    /// The workflow key.
    pub workflow: String,
    /// The cancellation key the runs were triggered with.
    pub cancellation_key: String,
    /// Only these recipients (user ids or `{id, collection}`); empty cancels every recipient.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::recipient_list")]
    pub recipients: Vec<Value>,
}
