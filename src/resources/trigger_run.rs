//! The `TriggerRun` kind: one trigger of a workflow, and what became of it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::model::JsonObject;
use crate::core::status::{RecipientTotals, RunState};

/// The annotation holding the fingerprint of the API request that created a
/// run with an idempotency key (a replay must carry the same parameters).
pub const FINGERPRINT_ANNOTATION: &str = "herald.dev/request-fingerprint";

/// One trigger of a workflow for a set of recipients (Knock's trigger call).
/// The spec is immutable once created; status records each recipient's run.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "One trigger of a Workflow (Knock's trigger call): who did it, who to notify, the data. status records the run; per-recipient status is in status.recipients for small runs (up to 10 recipients), else in its RecipientPages.",
    version = "v1alpha1",
    kind = "TriggerRun",
    namespaced,
    status = "TriggerRunStatus",
    shortname = "tr",
    category = "herald",
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".spec.workflow"}"#,
    printcolumn = r#"{"name":"Recipients","type":"integer","jsonPath":".status.totals.recipients"}"#,
    printcolumn = r#"{"name":"Completed","type":"integer","jsonPath":".status.totals.completed"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.totals.failed"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TriggerRunSpec {
    /// The key of the Workflow to run, in this namespace.
    pub workflow: String,
    /// Who performed the action: a user id, `{id, collection}`, or an inline user or object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub actor: Option<Value>,
    /// Who to notify, at most 1,000 entries: user id strings, object references
    /// `{id, collection}`, or inline users and objects (Knock's shape: `id`,
    /// `collection`, `channel_data`, `preferences`, `$trigger_data` and any other properties).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "recipients_schema")]
    pub recipients: Vec<Value>,
    /// Keys of Audiences (the notify API's `lists`) whose members are notified too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The trigger data: a JSON object, validated against the workflow's dataSchema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub data: Option<JsonObject>,
    /// A key that cancels this run (with the workflow key) before it finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancellation_key: Option<String>,
    /// The tenant: an id, or an inline tenant `{id, name, settings}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub tenant: Option<Value>,
    /// The idempotency key this run was created with, if any (set by the HTTP API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Set by herald on the runs a Schedule creates: the schedule and occurrence,
    /// visible to templates as `recipient.schedule` (`id`, `last_occurrence_at`, `next_occurrence_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::resources::schedule::ScheduleRef>,
    /// Seconds to keep the run after it finishes; default: the operator's (7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
}

fn recipients_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 1000,
        "items": {"x-kubernetes-preserve-unknown-fields": true},
    })
}

/// The observed state of a TriggerRun. Per-recipient detail is in
/// `recipients` for a small run, else in the RecipientPage objects listed in
/// `pages` (owned by this run); never both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerRunStatus {
    /// The workflow run id (this object's metadata.uid), as Knock returns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_run_id: Option<String>,
    /// Pending, Running, Completed, Failed or Cancelled.
    #[serde(default)]
    pub state: RunState,
    /// The actor, as resolved (`user_2` or `collection/id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The tenant id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Recipient counts by state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<RecipientTotals>,
    /// Names of the RecipientPage objects holding every recipient's status, in order (runs of more than 10 recipients).
    /// While `expanding`, the pages created so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<String>,
    /// True while the run's recipients are still being expanded into pages: the first pages
    /// deliver while the next ones (`<run>-p<N>`) are cut; `totals` counts the pages so far.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expanding: bool,
    /// Every recipient's status, in order, for a run small enough to keep them here (up to 10 recipients; no pages then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<crate::core::status::RecipientStatus>,
    /// The Workflow as the run was accepted with it: the run follows these
    /// steps to the end, even if the Workflow is edited meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_spec: Option<WorkflowSnapshot>,
    /// When the controller started the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (the trigger was valid) and `Succeeded` (the run finished well), with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// What a run takes from its Workflow when it is accepted (as Tekton keeps a
/// PipelineRun's pipelineSpec): editing a Workflow mid-run must not shift a
/// waiting recipient onto different steps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowSnapshot {
    /// The Workflow's metadata.generation when the run was accepted.
    pub generation: i64,
    /// The Workflow's categories then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// The Workflow's overridePreferences then.
    #[serde(default)]
    pub override_preferences: bool,
    /// The Workflow's steps then.
    #[serde(default)]
    pub steps: Vec<crate::resources::workflow::Step>,
    /// The Workflow's conditions then.
    #[serde(default, skip_serializing_if = "crate::resources::workflow::Conditions::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub conditions: crate::resources::workflow::Conditions,
    /// The Workflow's triggerFrequency then.
    #[serde(default)]
    pub trigger_frequency: crate::resources::workflow::TriggerFrequency,
}

impl WorkflowSnapshot {
    /// The snapshot of a Workflow as it is now.
    pub fn of(workflow: &crate::resources::Workflow) -> Self {
        WorkflowSnapshot {
            generation: workflow.metadata.generation.unwrap_or_default(),
            categories: workflow.spec.categories.clone(),
            override_preferences: workflow.spec.override_preferences,
            steps: workflow.spec.steps.clone(),
            conditions: workflow.spec.conditions.clone(),
            trigger_frequency: workflow.spec.trigger_frequency,
        }
    }
}
