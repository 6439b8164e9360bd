//! The `Workflow` kind: a notification workflow, declared in Git.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::model::JsonObject;

/// The most steps a workflow may have: every recipient's record holds one
/// entry per step, and a page must fit etcd's request limit.
pub const MAX_STEPS: usize = 50;
/// The longest step `ref`, in characters.
pub const MAX_STEP_REF_CHARS: usize = 64;

/// A notification workflow: its key, the schema its trigger data must follow,
/// and the steps each recipient goes through.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A notification workflow: its key, categories, the JSON Schema its trigger data must follow, and the steps (channel messages, delays) each recipient goes through.",
    version = "v1alpha1",
    kind = "Workflow",
    namespaced,
    status = "WorkflowStatus",
    shortname = "wf",
    category = "herald",
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".status.key"}"#,
    printcolumn = r#"{"name":"Active","type":"boolean","jsonPath":".spec.active"}"#,
    printcolumn = r#"{"name":"Steps","type":"integer","jsonPath":".status.steps"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowSpec {
    /// The workflow key that triggers name (Knock's workflow key). Defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Whether the workflow runs. Triggers of an inactive workflow fail with WorkflowInactive.
    #[serde(default = "default_true")]
    pub active: bool,
    /// Categories the workflow belongs to; recipients' preferences can opt out of a category.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// A JSON Schema (draft 2020-12 unless `$schema` says otherwise) that every trigger's `data` must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub data_schema: Option<JsonObject>,
    /// What to do with trigger data that fails `dataSchema`.
    #[serde(default)]
    pub validation: ValidationSettings,
    /// When true, recipients' preferences are ignored and every step is sent (for transactional messages).
    #[serde(default)]
    pub override_preferences: bool,
    /// The ordered steps every recipient goes through (at most 50).
    #[serde(default)]
    #[schemars(schema_with = "steps_schema")]
    pub steps: Vec<Step>,
}

fn default_true() -> bool {
    true
}

/// A Workflow's steps, with their limits. Only here: a TriggerRun keeps the
/// steps it was accepted with (`status.workflowSpec`), whatever they were.
fn steps_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Step>>();
    schema.insert("maxItems".into(), MAX_STEPS.into());
    if let Some(step_ref) = schema.get_mut("items").and_then(|items| items.pointer_mut("/properties/ref")).and_then(Value::as_object_mut) {
        step_ref.insert("minLength".into(), 1.into());
        step_ref.insert("maxLength".into(), MAX_STEP_REF_CHARS.into());
    }
    schema
}

/// Trigger data validation settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationSettings {
    /// `Reject` (the default) fails a run whose data breaks `dataSchema` and sends nothing;
    /// `Warn` runs it anyway with a warning condition and Event.
    #[serde(default)]
    pub on_invalid: OnInvalid,
}

/// What to do with invalid trigger data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnInvalid {
    #[default]
    Reject,
    Warn,
}

/// One step of a workflow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// The step's reference (at most 64 characters), unique within the workflow; shown in per-recipient status.
    #[serde(rename = "ref")]
    pub step_ref: String,
    /// `channel` sends a message through a Channel; `delay` waits.
    #[serde(rename = "type")]
    pub step_type: StepType,
    /// Channel steps: the name of a Channel in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Conditions that must all hold for the step to run; otherwise it is skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<StepCondition>,
    /// Channel steps: the message template (Liquid), fields per channel type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<StepTemplate>,
    /// Delay steps: how long, or until when, to wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
}

/// The kind of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepType {
    #[default]
    Channel,
    Delay,
}

/// A step condition (Knock's shape): `variable` `operator` `argument`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepCondition {
    /// A path into the run's context: `data.severity`, `recipient.plan`, `actor.id`, `tenant.id`.
    pub variable: String,
    /// equal_to, not_equal_to, greater_than, less_than, greater_than_or_equal_to,
    /// less_than_or_equal_to, contains, not_contains, empty, not_empty, exists, not_exists.
    pub operator: String,
    /// The value to compare with (not used by empty, not_empty, exists, not_exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub argument: Option<Value>,
}

/// A channel step's message template. Each field is a Liquid template; which
/// fields apply depends on the channel's type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepTemplate {
    /// http: the request method (default POST).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// http and chat: the URL to call (defaults to the channel's or the recipient's channel_data `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// http: extra request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// http: the request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// chat: the message text; email: the plain-text body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// chat: Slack-style blocks, a template that renders to a JSON array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<String>,
    /// email: the sender (defaults to the channel's `from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// email: the recipient address (defaults to the recipient's email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// email: the subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// email: the HTML body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// in_app_feed: the message, in Markdown (shown as the feed item's body, rendered to HTML).
    #[serde(default, rename = "markdownBody", skip_serializing_if = "Option::is_none")]
    pub markdown_body: Option<String>,
    /// in_app_feed: where clicking the feed item goes.
    #[serde(default, rename = "actionUrl", skip_serializing_if = "Option::is_none")]
    pub action_url: Option<String>,
}

/// A delay: a fixed duration, or until a time rendered from a template.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Delay {
    /// A duration such as `30s`, `5m`, `1h30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// A Liquid template that renders an RFC 3339 time, e.g. `{{ data.remind_at }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// The observed state of a Workflow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStatus {
    /// The effective workflow key (spec.key or metadata.name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The number of steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<i32>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the data schema compiles and every step is well formed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::conditions")]
    pub conditions: Vec<Condition>,
}

impl Workflow {
    /// The workflow key: spec.key, else metadata.name.
    pub fn key(&self) -> String {
        self.spec.key.clone().unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }
}
