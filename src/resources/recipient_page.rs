//! The `RecipientPage` kind: a page of a TriggerRun's per-recipient status.
//! Keeping recipients in pages owned by the run keeps the run itself small
//! (Tekton's answer to status outgrowing etcd's request limit).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Per-recipient status for part of a TriggerRun's recipients.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "RecipientPage",
    namespaced,
    status = "RecipientPageStatus",
    shortname = "rp",
    category = "herald",
    printcolumn = r#"{"name":"Run","type":"string","jsonPath":".spec.triggerRun"}"#,
    printcolumn = r#"{"name":"Page","type":"integer","jsonPath":".spec.index"}"#,
    printcolumn = r#"{"name":"Recipients","type":"integer","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RecipientPageSpec {
    /// The TriggerRun this page belongs to.
    pub trigger_run: String,
    /// The page's position, from 0.
    pub index: i32,
    /// How many recipients the page holds.
    pub size: i32,
}

/// The recipients of one page.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipientPageStatus {
    /// One entry per recipient, in the run's order.
    #[serde(default)]
    pub recipients: Vec<RecipientStatus>,
}

/// One recipient's workflow run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipientStatus {
    /// The recipient: a user id, or `collection/id` for an object.
    pub recipient: String,
    /// The object collection, for object recipients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// The workflow recipient run id (UUID v5 of the recipient under the workflow run id).
    pub recipient_run_id: String,
    /// Queued, Running, Waiting, Completed, Skipped, Cancelled or Failed.
    pub state: RecipientState,
    /// Why the recipient is in this state (CamelCase), e.g. RecipientNotFound, PreferenceOptOut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How the recipient was reached: `direct`, `object:<collection>/<id>`, `audience:<key>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Delays: when the recipient resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<Time>,
    /// The outcome of each step reached so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepStatus>,
}

/// A recipient's run state (Knock's recipient run states, with herald's names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RecipientState {
    #[default]
    Queued,
    Running,
    Waiting,
    Completed,
    Skipped,
    Cancelled,
    Failed,
}

impl RecipientState {
    pub fn is_finished(self) -> bool {
        matches!(self, RecipientState::Completed | RecipientState::Skipped | RecipientState::Cancelled | RecipientState::Failed)
    }
}

/// The outcome of one step for one recipient.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    /// The step's `ref`.
    #[serde(rename = "ref")]
    pub step_ref: String,
    /// Completed, Skipped, Failed, Waiting or Running.
    pub state: StepState,
    /// Why (CamelCase): PreferenceOptOut, ConditionNotMet, Delivered, WouldSend, RenderFailed, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Detail: the error, or a summary of what was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Delivery attempts made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// The receiver's last HTTP status code, for http and chat channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
    /// When the outcome was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// A step's state for one recipient.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StepState {
    #[default]
    Running,
    Waiting,
    Completed,
    Skipped,
    Failed,
    Cancelled,
}
