//! The `Schedule` kind: a workflow run on a schedule for its recipients
//! (Knock's schedules), each occurrence in each recipient's time zone. The
//! rules are `core::schedule`, the controller `controller::schedule`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::model::JsonObject;
pub use crate::core::schedule::{Frequency, RepeatRule};

/// The catch-up window when a Schedule sets none: one hour.
pub const DEFAULT_CATCH_UP_SECONDS: i64 = 3600;
/// The most recipients one Schedule may list.
pub const MAX_RECIPIENTS: usize = 1000;
/// How many of the latest runs `status.lastRuns` keeps.
pub const MAX_LAST_RUNS: usize = 10;
/// The label on every TriggerRun a Schedule creates: the Schedule's name.
pub const SCHEDULE_LABEL: &str = "herald.dev/schedule";
/// The annotation on such a run: the occurrence it is for (RFC 3339).
pub const OCCURRENCE_ANNOTATION: &str = "herald.dev/occurrence";

/// Runs a workflow for each recipient at each occurrence: once at
/// `scheduledAt`, or on `repeats` (Knock's rules), in the recipient's
/// `timezone`. Each occurrence for each recipient creates one TriggerRun,
/// named after (schedule, recipient, occurrence), so it fires once.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "Runs a Workflow for its recipients on a schedule (Knock's schedules): once at scheduledAt or on repeat rules, in each recipient's time zone; each occurrence and recipient becomes one TriggerRun.",
    version = "v1alpha1",
    kind = "Schedule",
    namespaced,
    status = "ScheduleStatus",
    shortname = "sched",
    category = "herald",
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".spec.workflow"}"#,
    printcolumn = r#"{"name":"Next","type":"string","format":"date-time","jsonPath":".status.nextOccurrenceAt"}"#,
    printcolumn = r#"{"name":"Last","type":"string","format":"date-time","jsonPath":".status.lastOccurrenceAt"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// The key of the Workflow to run, in this namespace.
    pub workflow: String,
    /// Who it runs for, at most 1,000: user ids, or object references `{id, collection}`
    /// (the object itself runs; its subscribers do not, as in Knock).
    #[schemars(schema_with = "recipients_schema")]
    pub recipients: Vec<Value>,
    /// Who performed the action: a user id or `{id, collection}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub actor: Option<Value>,
    /// The tenant id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The data of every run (a JSON object; default empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub data: Option<JsonObject>,
    /// When it runs once (without repeats), or the earliest occurrence (with repeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<Time>,
    /// Knock's repeat rules; several rules fire at the earliest match of any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub repeats: Vec<RepeatRule>,
    /// No occurrence after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ending_at: Option<Time>,
    /// After downtime, a missed occurrence still fires if it is at most this many
    /// seconds old (only the latest; older ones are skipped and counted). Default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 604800))]
    pub catch_up_seconds: Option<i64>,
}

fn recipients_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 1000,
        "items": {"x-kubernetes-preserve-unknown-fields": true},
    })
}

/// The observed state of a Schedule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    /// The earliest next occurrence of any recipient; none when the schedule has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_occurrence_at: Option<Time>,
    /// The latest occurrence that fired for any recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_occurrence_at: Option<Time>,
    /// Each recipient's schedule, in the order of spec.recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<RecipientSchedule>,
    /// The latest runs created, newest first (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_runs: Vec<ScheduledRun>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: reasons Scheduled, Ended, InvalidSpec, WorkflowNotFound, WorkflowInactive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// One recipient's schedule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipientSchedule {
    /// The recipient: a user id, or `collection/id` for an object.
    pub recipient: String,
    /// Its schedule id in Knock's API (UUID v5 of the recipient under this Schedule's uid).
    pub id: String,
    /// The time zone its occurrences are computed in.
    pub timezone: String,
    /// The last occurrence that fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_occurrence_at: Option<Time>,
    /// The next occurrence; none when it has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_occurrence_at: Option<Time>,
    /// Occurrences skipped because they were missed by more than the catch-up window.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_occurrences: i64,
    /// The latest occurrence skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skipped_at: Option<Time>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// A run a Schedule created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledRun {
    /// The TriggerRun's name.
    pub name: String,
    /// The recipient it runs for.
    pub recipient: String,
    /// The occurrence it is for.
    pub occurrence_at: Time,
}

/// What a scheduled TriggerRun carries about its schedule; templates see it
/// as `recipient.schedule` (Knock's `{id, last_occurrence_at, next_occurrence_at}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleRef {
    /// The schedule id (Knock's API id of this recipient's schedule).
    pub id: String,
    /// The Schedule's name.
    pub name: String,
    /// This occurrence (Knock updates last_occurrence_at when it runs).
    pub last_occurrence_at: String,
    /// The occurrence after this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_occurrence_at: Option<String>,
}
