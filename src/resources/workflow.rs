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
    /// The ordered steps every recipient goes through (at most 50, branches included).
    #[serde(default)]
    #[schemars(schema_with = "steps_schema")]
    pub steps: Vec<Step>,
    /// Workflow conditions (Knock's trigger conditions): checked for each recipient before
    /// any step; when they do not hold the recipient ends Skipped (reason ConditionNotMet).
    /// A list (all must hold), `{all: [...]}` or `{any: [...]}`, one nested group deep.
    #[serde(default, skip_serializing_if = "Conditions::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub conditions: Conditions,
    /// How often one recipient may run this workflow: `everyTrigger` (the default),
    /// `oncePerRecipient` (ever), or `oncePerRecipientPerTenant`. The once-only
    /// modes remember recipients in the history store (--database-url).
    #[serde(default, skip_serializing_if = "TriggerFrequency::is_default")]
    pub trigger_frequency: TriggerFrequency,
}

/// How often one recipient may run a workflow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TriggerFrequency {
    #[default]
    EveryTrigger,
    OncePerRecipient,
    OncePerRecipientPerTenant,
}

impl TriggerFrequency {
    fn is_default(&self) -> bool {
        *self == TriggerFrequency::EveryTrigger
    }
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
    /// `channel` sends a message through a Channel; `delay` waits; `batch` gathers runs into
    /// one; `throttle` lets at most `limit` runs through per window; `fetch` calls an HTTP
    /// API and merges the answer into `data`; `branch` takes the first branch whose
    /// conditions hold; `trigger_workflow` starts another workflow for the recipient.
    #[serde(rename = "type")]
    pub step_type: StepType,
    /// Channel steps: the name of a Channel in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Conditions for the step to run; otherwise it is skipped. A list (all must hold),
    /// `{all: [...]}` or `{any: [...]}`, whose items are conditions or one nested group.
    #[serde(default, skip_serializing_if = "Conditions::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub conditions: Conditions,
    /// Channel steps: the message template (Liquid), fields per channel type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<StepTemplate>,
    /// Delay steps: how long, or until when, to wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    /// Channel steps: when messages may go out, per weekday, in the recipient's `timezone`
    /// (else UTC). A message due outside every window waits for the next opening.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub send_windows: Vec<SendWindow>,
    /// Batch steps: how runs are gathered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchStep>,
    /// Throttle steps: how many runs may pass per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleStep>,
    /// Fetch steps: the request (every field is Liquid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchStep>,
    /// Branch steps: the branches, in order; the first whose conditions hold runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "branches_schema")]
    pub branches: Vec<Branch>,
    /// Trigger-workflow steps: the workflow to start for this recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_workflow: Option<TriggerWorkflowStep>,
}

/// The kind of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepType {
    #[default]
    Channel,
    Delay,
    Batch,
    Throttle,
    /// Knock calls it `http_fetch`; both names are accepted.
    #[serde(alias = "http_fetch")]
    Fetch,
    Branch,
    TriggerWorkflow,
}

/// Step conditions: a flat list (every condition must hold), or Knock's
/// `{all: [...]}` / `{any: [...]}` whose items are conditions or one nested group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Conditions {
    List(Vec<ConditionItem>),
    All(AllOf),
    Any(AnyOf),
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions::List(Vec::new())
    }
}

impl Conditions {
    pub fn is_empty(&self) -> bool {
        match self {
            Conditions::List(items) => items.is_empty(),
            Conditions::All(_) | Conditions::Any(_) => false,
        }
    }

    /// Every condition, at any depth.
    pub fn leaves(&self) -> Vec<&StepCondition> {
        fn walk<'a>(items: &'a [ConditionItem], out: &mut Vec<&'a StepCondition>) {
            for item in items {
                match item {
                    ConditionItem::Condition(c) => out.push(c),
                    ConditionItem::All(g) => walk(&g.all, out),
                    ConditionItem::Any(g) => walk(&g.any, out),
                }
            }
        }
        let mut out = Vec::new();
        match self {
            Conditions::List(items) => walk(items, &mut out),
            Conditions::All(g) => walk(&g.all, &mut out),
            Conditions::Any(g) => walk(&g.any, &mut out),
        }
        out
    }
}

impl From<Vec<StepCondition>> for Conditions {
    fn from(conditions: Vec<StepCondition>) -> Self {
        Conditions::List(conditions.into_iter().map(ConditionItem::Condition).collect())
    }
}

/// One item of a condition list or group: a condition, or a nested group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConditionItem {
    Condition(StepCondition),
    All(AllOf),
    Any(AnyOf),
}

/// `{all: [...]}`: every item holds (an empty group holds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllOf {
    pub all: Vec<ConditionItem>,
}

/// `{any: [...]}`: at least one item holds (an empty group does not).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnyOf {
    pub any: Vec<ConditionItem>,
}

/// A length of time: `30s`, `5m`, `1h30m`, `2d`, or Knock's `{unit, value}`
/// (unit seconds, minutes, hours, days or weeks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Text(String),
    Unit { unit: String, value: i64 },
}

impl From<&str> for DurationValue {
    fn from(text: &str) -> Self {
        DurationValue::Text(text.to_string())
    }
}

/// How a batch window moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WindowType {
    /// Closes `window` after the batch opened.
    #[default]
    Fixed,
    /// Each new activity moves the close to now + `window`, up to `maxWindow` after opening.
    Sliding,
}

/// What a batch does with its first activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BatchMode {
    /// The first run waits for the window and sends everything gathered.
    #[default]
    Accumulate,
    /// The first run goes on at once; the rest are gathered and sent when the window closes.
    FlushLeading,
}

/// A batch step: runs for the same recipient and key within a window become one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchStep {
    /// The window: `30s`, `10m` or `{unit, value}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub window: Option<DurationValue>,
    /// A path into the run's context (`data.digest_until`) holding the window: a timestamp,
    /// a duration, or a window rule (`{frequency: daily, hours: 9}`). A missing or invalid
    /// value skips the step (reason InvalidWindow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_from: Option<String>,
    /// The batch key (Liquid), e.g. `{{ data.project_id }}`: runs are grouped by recipient and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `fixed` (the default) or `sliding`.
    #[serde(default)]
    pub window_type: WindowType,
    /// Sliding windows: the longest a batch stays open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub max_window: Option<DurationValue>,
    /// A batch closes at once when it holds this many activities (2 to 1000; default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 1000))]
    pub max_activities: Option<i32>,
    /// How many activities templates see in `activities` (1 to 100; default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub render_limit: Option<i32>,
    /// `accumulate` (the default) or `flushLeading`.
    #[serde(default)]
    pub mode: BatchMode,
}

/// A throttle step: at most `limit` runs per recipient and key in a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleStep {
    /// The window: `1h` or `{unit, value}` (at most 31 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub window: Option<DurationValue>,
    /// A path into the run's context holding the window (a timestamp, a duration or a
    /// window rule). A missing or invalid value skips the step (reason InvalidWindow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_from: Option<String>,
    /// Runs let through per window (default 1).
    #[serde(default = "default_limit")]
    #[schemars(range(min = 1, max = 10000))]
    pub limit: i32,
    /// The throttle key (Liquid), e.g. `{{ data.alert_id }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

fn default_limit() -> i32 {
    1
}

/// A fetch step's request. Every field is Liquid.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FetchStep {
    /// GET (the default), POST, PUT, PATCH or DELETE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The URL (http or https; the egress policy applies).
    pub url: String,
    /// Request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Query parameters, added to the URL.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
    /// The request body (POST, PUT, PATCH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Where the JSON answer goes in `data` (`build`, `a.b`); without it the answer's
    /// keys are merged into `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_path: Option<String>,
    /// A Secret in the same namespace whose `signingKey` signs the request as http channels do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<crate::resources::channel::SecretReference>,
}

/// One branch of a branch step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Branch {
    /// The branch's name, shown in the recipient's status.
    pub name: String,
    /// When the branch is taken; a branch without conditions is the default (last).
    #[serde(default, skip_serializing_if = "Conditions::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub conditions: Conditions,
    /// End the recipient's run after this branch's steps.
    #[serde(default)]
    pub terminates: bool,
    /// The branch's steps (refs unique across the whole workflow; branches nest at most 5 deep).
    #[serde(default)]
    #[schemars(schema_with = "crate::resources::schema::free_form_list")]
    pub steps: Vec<Step>,
}

/// A trigger-workflow step: starts a run of another workflow for this recipient.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerWorkflowStep {
    /// The key of the workflow to trigger (same namespace).
    pub workflow: String,
    /// The new run's data: Liquid rendering a JSON object (default `{{ data | json }}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The actor's id (Liquid; default this run's actor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The tenant's id (Liquid; default this run's tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The new run's cancellation key (Liquid; default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancellation_key: Option<String>,
}

/// When a channel step may send on one weekday (Knock's send window).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendWindow {
    /// monday ... sunday.
    pub day: String,
    /// `send` (within from..until) or `do_not_send` (not that day).
    #[serde(rename = "type", default = "default_send")]
    pub window_type: String,
    /// Opening time, `HH:MM` or `HH:MM:SS` (default 00:00).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Closing time (default the end of the day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

fn default_send() -> String {
    "send".into()
}

/// Branches' steps are checked by herald (a structural schema cannot recurse).
fn branches_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Branch>>();
    schema.insert("maxItems".into(), 10.into());
    schema
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

/// A delay: a fixed duration, until a time rendered from a template, or a window from the data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delay {
    /// A duration such as `30s`, `5m`, `1h30m`, or `{unit, value}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub duration: Option<DurationValue>,
    /// A Liquid template that renders an RFC 3339 time, e.g. `{{ data.remind_at }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// A path into the run's context (`data.remind_at`) holding a timestamp, a duration or a
    /// window rule (`{frequency: daily, hours: 9}`). A missing or invalid value skips the
    /// step (reason InvalidWindow), as Knock does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_from: Option<String>,
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
