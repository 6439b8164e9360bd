//! The function steps' calls and records: what [`super::execution::advance`]
//! asks the caller to do for a fetch, throttle, batch or trigger-workflow step
//! (and the trigger frequency check), resolved from the step's settings and
//! the recipient's context, and how each answer is recorded in the
//! recipient's status. The calls carry only plain values: the caller (the
//! controller) does the I/O and keeps the durable state.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde_json::{json, Map, Value};

use super::execution::{fail_step, finish, push_step, wait, Next, RecipientContext, RunContext, RENDER_BUDGET_EXCEEDED};
use super::model::{JsonObject, RecipientKey};
use super::status::{stored_size, RecipientState, RecipientStatus, StepState, MAX_CONTEXT_BYTES};
use super::templates::TemplateError;
use super::windows;
use crate::resources::workflow::{BatchMode, Step, TriggerFrequency, WindowType};

/// A step skipped because its window from the data is missing or invalid (as Knock does).
pub const INVALID_WINDOW: &str = "InvalidWindow";
/// The longest throttle window (Knock's limit).
pub const MAX_THROTTLE_WINDOW: SignedDuration = SignedDuration::from_hours(31 * 24);
/// A batch's defaults and limits (Knock's).
pub const DEFAULT_MAX_ACTIVITIES: u32 = 1000;
pub const DEFAULT_RENDER_LIMIT: u32 = 10;
/// The longest rendered throttle or batch key.
pub const MAX_KEY_CHARS: usize = 256;

/// Why a function step's call could not be made.
#[derive(Debug)]
pub enum Refusal {
    /// Skip the step and go on (a missing or invalid window).
    Skip(&'static str, String),
    /// Fail the recipient at the step.
    Fail(&'static str, String),
}

impl From<TemplateError> for Refusal {
    fn from(e: TemplateError) -> Self {
        Refusal::Fail(if e.over_budget { RENDER_BUDGET_EXCEEDED } else { "RenderFailed" }, e.to_string())
    }
}

impl Refusal {
    /// Records the refusal at `step`: None to go on with the next step, or
    /// what the caller does next (the recipient failed).
    pub fn apply(self, status: &mut RecipientStatus, step: &Step, now: Timestamp) -> Option<Next> {
        match self {
            Refusal::Skip(reason, message) => {
                push_step(status, &step.step_ref, StepState::Skipped, reason, Some(message), now);
                None
            }
            Refusal::Fail(reason, message) => Some(fail_step(status, &step.step_ref, reason, message, now)),
        }
    }
}

/// The end of a window read from the data at `path`.
pub fn window_from(context: &Value, path: &str, zone: &TimeZone, now: Timestamp) -> Result<Timestamp, String> {
    let value = windows::lookup(context, path).ok_or_else(|| format!("`{path}` is missing"))?;
    windows::window_end(value, now, zone).map_err(|e| format!("`{path}`: {e}"))
}

/// Adds what earlier steps stored (`status.context`) to a recipient's context:
/// fetched `data` keys over the trigger's, and a closed batch's variables at
/// the top level (`activities`, `actors`, `total_activities`, `total_actors`)
/// and under `run` for conditions.
pub fn apply_context(context: &mut Value, stored: Option<&Map<String, Value>>) {
    let Some(stored) = stored else { return };
    if let (Some(Value::Object(fetched)), Some(Value::Object(data))) = (stored.get("data"), context.get_mut("data")) {
        data.extend(fetched.clone());
    }
    if let (Some(Value::Object(batch)), Value::Object(top)) = (stored.get("batch"), context) {
        if let (Some(Value::Array(activities)), Some(Value::Object(data))) = (batch.get("activities"), top.get_mut("data")) {
            data.extend(merged_activity_data(activities));
        }
        top.extend(batch.clone());
        top.insert("run".into(), json!({"total_activities": batch.get("total_activities"), "total_actors": batch.get("total_actors")}));
    }
}

/// Knock's `data` after a batch: the rendered activities' data merged in
/// arrival order (the last value wins), scalars only, strings cut at 256
/// characters. An activity's own keys (`id`, `inserted_at`, `actor`, ...) are not data.
fn merged_activity_data(activities: &[Value]) -> Map<String, Value> {
    const OWN: [&str; 5] = ["id", "inserted_at", "updated_at", "actor", "recipient"];
    let mut merged = Map::new();
    for activity in activities.iter().filter_map(Value::as_object) {
        for (key, value) in activity.iter().filter(|(k, _)| !OWN.contains(&k.as_str())) {
            let kept = match value {
                Value::String(s) => Value::String(s.chars().take(256).collect()),
                Value::Object(_) | Value::Array(_) => continue,
                scalar => scalar.clone(),
            };
            merged.insert(key.clone(), kept);
        }
    }
    merged
}

/// Stores `value` under `key` of the recipient's context, if the context still fits.
fn store_context(status: &mut RecipientStatus, key: &str, value: Value) -> Result<(), String> {
    let mut context = status.context.clone().unwrap_or_default();
    context.insert(key.into(), value);
    let size = stored_size(&context);
    if size > MAX_CONTEXT_BYTES {
        return Err(format!("the data kept for later steps would take {size} bytes, over the limit of {MAX_CONTEXT_BYTES}"));
    }
    status.context = Some(context);
    Ok(())
}

fn render(run: &RunContext, step: &Step, field: &str, context: &Value) -> Result<Option<String>, Refusal> {
    Ok(run.templates.render(&step.step_ref, field, context)?)
}

fn rendered_key(run: &RunContext, step: &Step, field: &str, context: &Value) -> Result<String, Refusal> {
    let key = render(run, step, field, context)?.unwrap_or_default().trim().to_string();
    if key.chars().count() > MAX_KEY_CHARS {
        return Err(Refusal::Fail("InvalidKey", format!("the rendered {field} is longer than {MAX_KEY_CHARS} characters")));
    }
    Ok(key)
}

// ---- Trigger frequency ----

/// Has this recipient run this workflow before (in this tenant)?
#[derive(Clone, Debug, PartialEq)]
pub struct FrequencyCheck {
    pub workflow: String,
    /// `oncePerRecipientPerTenant`: the run's tenant ("" without one).
    pub tenant: Option<String>,
}

pub fn frequency_check(run: &RunContext) -> FrequencyCheck {
    let tenant = (run.trigger_frequency == TriggerFrequency::OncePerRecipientPerTenant).then(|| run.tenant.map(|t| t.id.clone()).unwrap_or_default());
    FrequencyCheck { workflow: run.workflow_key.to_string(), tenant }
}

/// `first`: this recipient run is the first (or the same one asking again);
/// an error when the store could not say.
pub fn record_frequency(status: &mut RecipientStatus, check: &FrequencyCheck, first: Result<bool, String>) {
    let first = match first {
        Ok(first) => first,
        Err(message) => {
            finish(status, RecipientState::Failed, "HistoryStoreUnavailable", Some(format!("checking the trigger frequency: {message}")));
            return;
        }
    };
    if first {
        status.state = RecipientState::Running;
    } else {
        let scope = if check.tenant.is_some() { "in this tenant " } else { "" };
        finish(status, RecipientState::Skipped, "TriggerFrequency", Some(format!("already ran for this recipient {scope}(the workflow runs once per recipient)")));
    }
}

// ---- Fetch ----

/// An HTTP request whose JSON answer later steps see in `data`.
#[derive(Clone, Debug, PartialEq)]
pub struct FetchCall {
    pub step_ref: String,
    pub method: String,
    pub url: String,
    pub headers: BTreeMap<String, String>,
    pub query: BTreeMap<String, String>,
    pub body: Option<String>,
    /// The Secret whose `signingKey` signs the request.
    pub secret: Option<String>,
    pub idempotency_key: String,
}

pub fn fetch_call(run: &RunContext, recipient: &RecipientContext, step: &Step, context: &Value) -> Result<FetchCall, Refusal> {
    let fetch = step.fetch.as_ref().ok_or_else(|| Refusal::Fail("InvalidStep", "a fetch step needs `fetch`".into()))?;
    let method = render(run, step, "fetch.method", context)?.unwrap_or_else(|| "GET".into()).trim().to_ascii_uppercase();
    if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method.as_str()) {
        return Err(Refusal::Fail("InvalidRequest", format!("method `{method}` is not GET, POST, PUT, PATCH or DELETE")));
    }
    Ok(FetchCall {
        step_ref: step.step_ref.clone(),
        method,
        url: render(run, step, "fetch.url", context)?.unwrap_or_default().trim().to_string(),
        headers: run.templates.render_map(&step.step_ref, "fetch.headers", context)?,
        query: run.templates.render_map(&step.step_ref, "fetch.query", context)?,
        body: render(run, step, "fetch.body", context)?,
        secret: fetch.secret_ref.as_ref().map(|s| s.name.clone()),
        idempotency_key: format!("{}:{}", recipient.recipient_run_id, step.step_ref),
    })
}

/// What a fetch came back with.
#[derive(Clone, Debug, PartialEq)]
pub struct FetchOutcome {
    /// The decoded answer (None for an empty body), or why it failed.
    pub result: Result<Option<Value>, FetchFailure>,
    pub attempts: i32,
    pub status_code: Option<i32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FetchFailure {
    /// CamelCase: HttpStatus, Timeout, InvalidResponse, EgressDenied, ...
    pub reason: String,
    pub message: String,
}

/// Merges a fetch's answer into the recipient's data (or places it at the
/// step's `responsePath`); a failure stops the recipient.
pub fn record_fetch(status: &mut RecipientStatus, step: &Step, outcome: &FetchOutcome, data: &Value, now: Timestamp) {
    let answer = match &outcome.result {
        Ok(answer) => answer.clone(),
        Err(failure) => {
            push_step(status, &step.step_ref, StepState::Failed, &failure.reason, Some(failure.message.clone()), now);
            if let Some(last) = status.steps.last_mut() {
                last.attempts = Some(outcome.attempts);
                last.status_code = outcome.status_code;
            }
            finish(status, RecipientState::Failed, "StepFailed", Some(format!("step `{}`: {}", step.step_ref, failure.message)));
            return;
        }
    };
    let path = step.fetch.as_ref().and_then(|f| f.response_path.as_deref()).filter(|p| !p.is_empty());
    let mut fetched = status.context.as_ref().and_then(|c| c.get("data")).and_then(Value::as_object).cloned().unwrap_or_default();
    match (answer, path) {
        (None, _) => {}
        (Some(answer), Some(path)) => {
            // Nested keys are created; the top-level key replaces the trigger's whole.
            let mut segments = path.split('.');
            let top = segments.next().unwrap_or_default().to_string();
            let mut root = fetched.get(&top).cloned().or_else(|| data.get(&top).cloned()).filter(Value::is_object).unwrap_or_else(|| json!({}));
            let rest: Vec<&str> = segments.collect();
            if rest.is_empty() {
                root = answer;
            } else {
                let mut at = &mut root;
                for (i, segment) in rest.iter().enumerate() {
                    if !at.is_object() {
                        *at = json!({});
                    }
                    let map = at.as_object_mut().expect("made an object above");
                    if i + 1 == rest.len() {
                        map.insert(segment.to_string(), answer.clone());
                        break;
                    }
                    at = map.entry(segment.to_string()).or_insert_with(|| json!({}));
                }
            }
            fetched.insert(top, root);
        }
        (Some(Value::Object(answer)), None) => fetched.extend(answer),
        (Some(other), None) => {
            let message = format!("the answer is {}, not a JSON object (set responsePath to keep it)", crate::core::model::json_type_name(&other));
            fail_step(status, &step.step_ref, "InvalidResponse", message, now);
            return;
        }
    }
    if let Err(message) = store_context(status, "data", Value::Object(fetched)) {
        fail_step(status, &step.step_ref, "ResponseTooLarge", message, now);
        return;
    }
    push_step(status, &step.step_ref, StepState::Completed, "Fetched", Some(format!("{} attempt(s)", outcome.attempts)), now);
    if let Some(last) = status.steps.last_mut() {
        last.attempts = Some(outcome.attempts);
        last.status_code = outcome.status_code;
    }
}

// ---- Throttle and batch windows ----

/// A window: so long from its opening, or until a time read from the data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Window {
    For(SignedDuration),
    Until(Timestamp),
}

fn step_window(window: &Option<crate::resources::workflow::DurationValue>, window_from: &Option<String>, context: &Value, now: Timestamp) -> Result<Window, Refusal> {
    if let Some(path) = window_from {
        let zone = windows::recipient_zone(&context["recipient"]);
        return window_from_path(context, path, &zone, now).map(Window::Until).map_err(|m| Refusal::Skip(INVALID_WINDOW, m));
    }
    match window {
        Some(d) => windows::duration(d).map(Window::For).map_err(|m| Refusal::Skip(INVALID_WINDOW, m)),
        None => Err(Refusal::Skip(INVALID_WINDOW, "the step has no window".into())),
    }
}

fn window_from_path(context: &Value, path: &str, zone: &TimeZone, now: Timestamp) -> Result<Timestamp, String> {
    let end = window_from(context, path, zone, now)?;
    if end <= now {
        return Err(format!("`{path}` is in the past ({end})"));
    }
    Ok(end)
}

// ---- Throttle ----

/// May this recipient run pass the throttle?
#[derive(Clone, Debug, PartialEq)]
pub struct ThrottleCall {
    pub step_ref: String,
    pub workflow: String,
    pub recipient: RecipientKey,
    pub key: String,
    pub window: Window,
    pub limit: u32,
    pub recipient_run_id: uuid::Uuid,
}

pub fn throttle_call(run: &RunContext, recipient: &RecipientContext, step: &Step, context: &Value, now: Timestamp) -> Result<ThrottleCall, Refusal> {
    let throttle = step.throttle.as_ref().ok_or_else(|| Refusal::Fail("InvalidStep", "a throttle step needs `throttle`".into()))?;
    let window = step_window(&throttle.window, &throttle.window_from, context, now)?;
    let too_long = match window {
        Window::For(d) => d > MAX_THROTTLE_WINDOW,
        Window::Until(t) => t.duration_since(now) > MAX_THROTTLE_WINDOW,
    };
    if too_long {
        return Err(Refusal::Skip(INVALID_WINDOW, "a throttle window lasts at most 31 days".into()));
    }
    Ok(ThrottleCall {
        step_ref: step.step_ref.clone(),
        workflow: run.workflow_key.to_string(),
        recipient: recipient.key.clone(),
        key: rendered_key(run, step, "throttle.key", context)?,
        window,
        limit: u32::try_from(throttle.limit.max(1)).unwrap_or(1),
        recipient_run_id: recipient.recipient_run_id,
    })
}

/// The throttle's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum ThrottleOutcome {
    Admitted,
    Throttled { window_end: Timestamp },
}

/// The throttle refused the request itself (`why`: a window, limit or key out of its bounds): the step is skipped.
pub fn skip_throttle(status: &mut RecipientStatus, call: &ThrottleCall, why: String, now: Timestamp) {
    push_step(status, &call.step_ref, StepState::Skipped, INVALID_WINDOW, Some(why), now);
}

pub fn record_throttle(status: &mut RecipientStatus, call: &ThrottleCall, outcome: &ThrottleOutcome, now: Timestamp) {
    match outcome {
        ThrottleOutcome::Admitted => push_step(status, &call.step_ref, StepState::Completed, "Admitted", None, now),
        ThrottleOutcome::Throttled { window_end } => {
            let message = format!("at most {} run(s) per window; this window ends at {window_end}", call.limit);
            push_step(status, &call.step_ref, StepState::Completed, "Throttled", Some(message.clone()), now);
            finish(status, RecipientState::Throttled, "Throttled", Some(message));
        }
    }
}

// ---- Batch ----

/// How a batch's window closes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BatchWindow {
    Fixed(SignedDuration),
    Sliding { window: SignedDuration, max: SignedDuration },
    Until(Timestamp),
}

/// A recipient run reaching a batch step (or its carrier waking up).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchCall {
    pub step_ref: String,
    pub workflow: String,
    pub recipient: RecipientKey,
    pub key: String,
    pub window: BatchWindow,
    pub max_activities: u32,
    pub render_limit: u32,
    pub flush_leading: bool,
    /// The carrier waking up (it opened the batch and waits for its close).
    pub carrier: bool,
    pub recipient_run_id: uuid::Uuid,
    pub workflow_run_id: uuid::Uuid,
    /// This run's activity: its data and actor.
    pub data: JsonObject,
    pub actor: Value,
    pub cancellation_key: Option<String>,
}

pub fn batch_call(run: &RunContext, recipient: &RecipientContext, step: &Step, context: &Value, carrier: bool, now: Timestamp) -> Result<BatchCall, Refusal> {
    let batch = step.batch.as_ref().ok_or_else(|| Refusal::Fail("InvalidStep", "a batch step needs `batch`".into()))?;
    // The carrier's batch is open already: its window no longer matters.
    let window = if carrier { Ok(Window::For(SignedDuration::ZERO)) } else { step_window(&batch.window, &batch.window_from, context, now) };
    let window = match window? {
        Window::Until(t) => BatchWindow::Until(t),
        Window::For(d) => match batch.window_type {
            WindowType::Fixed => BatchWindow::Fixed(d),
            WindowType::Sliding => {
                let max = batch.max_window.as_ref().map(windows::duration).transpose().map_err(|m| Refusal::Skip(INVALID_WINDOW, m))?.unwrap_or(d);
                BatchWindow::Sliding { window: d, max }
            }
        },
    };
    Ok(BatchCall {
        step_ref: step.step_ref.clone(),
        workflow: run.workflow_key.to_string(),
        recipient: recipient.key.clone(),
        key: rendered_key(run, step, "batch.key", context)?,
        window,
        max_activities: batch.max_activities.map_or(DEFAULT_MAX_ACTIVITIES, |n| n.clamp(2, 1000) as u32),
        render_limit: batch.render_limit.map_or(DEFAULT_RENDER_LIMIT, |n| n.clamp(1, 100) as u32),
        flush_leading: batch.mode == BatchMode::FlushLeading,
        carrier,
        recipient_run_id: recipient.recipient_run_id,
        workflow_run_id: run.workflow_run_id,
        data: context.get("data").and_then(Value::as_object).cloned().unwrap_or_default(),
        actor: run.actor.clone().unwrap_or(Value::Null),
        cancellation_key: run.cancellation_key.map(str::to_string),
    })
}

/// The batch's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchOutcome {
    /// This run opened the batch and carries it: wait for the close.
    Opened { closes_at: Timestamp },
    /// The carrier woke before the close (a sliding window moved): wait on.
    Wait { closes_at: Timestamp },
    /// This run joined the batch carried by another run, which sends for it.
    Joined { carrier: String },
    /// flushLeading: the first run goes on at once.
    Continue,
    /// The batch closed: the carrier goes on with these variables
    /// (`activities`, `actors`, `total_activities`, `total_actors`).
    Closed { summary: Map<String, Value> },
    /// Every activity was cancelled: nothing to send.
    Empty,
}

pub fn record_batch(status: &mut RecipientStatus, call: &BatchCall, outcome: &BatchOutcome, now: Timestamp) {
    let step_ref = call.step_ref.as_str();
    match outcome {
        BatchOutcome::Opened { closes_at } | BatchOutcome::Wait { closes_at } => {
            wait(status, step_ref, "BatchOpen", *closes_at, now);
        }
        BatchOutcome::Joined { carrier } => {
            push_step(status, step_ref, StepState::Completed, "Batched", Some(format!("joined the batch carried by run {carrier}")), now);
            if let Some(last) = status.steps.last_mut() {
                last.run = Some(carrier.clone());
            }
            finish(status, RecipientState::Batched, "Batched", Some(format!("in the batch carried by run {carrier}")));
        }
        BatchOutcome::Continue => push_step(status, step_ref, StepState::Completed, "FlushedLeading", Some("the first of its batch: sent at once".into()), now),
        BatchOutcome::Closed { summary } => {
            let mut summary = summary.clone();
            // Fit the kept context: fewer rendered activities, never the totals.
            while store_context(status, "batch", Value::Object(summary.clone())).is_err() {
                match summary.get_mut("activities").and_then(Value::as_array_mut) {
                    Some(activities) if !activities.is_empty() => {
                        activities.pop();
                    }
                    _ => {
                        summary.remove("activities");
                        summary.remove("actors");
                        if store_context(status, "batch", Value::Object(summary.clone())).is_err() {
                            fail_step(status, step_ref, "BatchTooLarge", "the batch's totals do not fit the recipient's record".into(), now);
                            return;
                        }
                        break;
                    }
                }
            }
            let total = summary.get("total_activities").and_then(Value::as_i64).unwrap_or_default();
            close_waiting(status, step_ref, "BatchClosed", format!("{total} activities"), now);
        }
        BatchOutcome::Empty => {
            close_waiting(status, step_ref, "BatchEmpty", "every activity was cancelled".into(), now);
            finish(status, RecipientState::Cancelled, "BatchEmpty", Some("every activity of the batch was cancelled".into()));
        }
    }
}

/// Completes the step's waiting record (or adds a completed one).
fn close_waiting(status: &mut RecipientStatus, step_ref: &str, reason: &str, message: String, now: Timestamp) {
    match status.steps.last_mut() {
        Some(last) if last.step_ref == step_ref && last.state == StepState::Waiting => {
            last.state = StepState::Completed;
            last.reason = Some(reason.into());
            last.message = Some(message);
            last.time = Some(now.to_string());
        }
        _ => push_step(status, step_ref, StepState::Completed, reason, Some(message), now),
    }
    status.wake_at = None;
    status.state = RecipientState::Running;
}

// ---- Trigger workflow ----

/// Start a run of another workflow for this recipient.
#[derive(Clone, Debug, PartialEq)]
pub struct TriggerCall {
    pub step_ref: String,
    pub workflow: String,
    pub recipient: RecipientKey,
    pub data: JsonObject,
    pub actor: Option<String>,
    pub tenant: Option<String>,
    pub cancellation_key: Option<String>,
    /// The TriggerRun's name: derived from the recipient run and the step, so a
    /// retry or a restart cannot start the run twice.
    pub name: String,
}

pub fn trigger_call(run: &RunContext, recipient: &RecipientContext, step: &Step, context: &Value) -> Result<TriggerCall, Refusal> {
    let t = step.trigger_workflow.as_ref().ok_or_else(|| Refusal::Fail("InvalidStep", "a trigger_workflow step needs `triggerWorkflow`".into()))?;
    let data = match render(run, step, "triggerWorkflow.data", context)? {
        None => context.get("data").and_then(Value::as_object).cloned().unwrap_or_default(),
        Some(rendered) => match serde_json::from_str::<Value>(&rendered) {
            Ok(Value::Object(map)) => map,
            Ok(other) => return Err(Refusal::Fail("InvalidData", format!("triggerWorkflow.data rendered {}, not a JSON object", crate::core::model::json_type_name(&other)))),
            Err(e) => return Err(Refusal::Fail("InvalidData", format!("triggerWorkflow.data did not render JSON: {e}"))),
        },
    };
    let nonempty = |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let actor = match t.actor {
        Some(_) => nonempty(render(run, step, "triggerWorkflow.actor", context)?),
        None => run.actor.as_ref().and_then(|a| a.get("id")).and_then(Value::as_str).map(str::to_string),
    };
    let tenant = match t.tenant {
        Some(_) => nonempty(render(run, step, "triggerWorkflow.tenant", context)?),
        None => run.tenant.map(|t| t.id.clone()),
    };
    let key = format!("{}:{}", recipient.recipient_run_id, step.step_ref);
    Ok(TriggerCall {
        step_ref: step.step_ref.clone(),
        workflow: t.workflow.clone(),
        recipient: recipient.key.clone(),
        data,
        actor,
        tenant,
        cancellation_key: nonempty(render(run, step, "triggerWorkflow.cancellationKey", context)?),
        name: format!("{}-{}", super::ids::resource_name(&[&t.workflow]).chars().take(40).collect::<String>().trim_end_matches(['-', '.']), super::ids::short_hash(&key, 16)),
    })
}

/// What starting the run came to.
#[derive(Clone, Debug, PartialEq)]
pub enum TriggerOutcome {
    /// Started (or found started by an earlier attempt): the new run's
    /// workflow run id, when it could be read.
    Started {
        workflow_run_id: Option<String>,
    },
    /// The target workflow is inactive: the step is skipped (Knock's rule).
    Skipped {
        reason: String,
        message: String,
    },
    Failed {
        reason: String,
        message: String,
    },
}

pub fn record_trigger(status: &mut RecipientStatus, call: &TriggerCall, outcome: &TriggerOutcome, now: Timestamp) {
    match outcome {
        TriggerOutcome::Started { workflow_run_id } => {
            let id = workflow_run_id.as_deref().map(|id| format!(", workflow run {id}")).unwrap_or_default();
            push_step(status, &call.step_ref, StepState::Completed, "WorkflowTriggered", Some(format!("started `{}` as TriggerRun {}{id}", call.workflow, call.name)), now);
            if let Some(last) = status.steps.last_mut() {
                last.run = Some(call.name.clone());
            }
        }
        TriggerOutcome::Skipped { reason, message } => push_step(status, &call.step_ref, StepState::Skipped, reason, Some(message.clone()), now),
        TriggerOutcome::Failed { reason, message } => {
            fail_step(status, &call.step_ref, reason, message.clone(), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::workflow::{FetchStep, StepType};

    fn fetch_step(path: Option<&str>) -> Step {
        Step {
            step_ref: "enrich".into(),
            step_type: StepType::Fetch,
            fetch: Some(FetchStep { url: "http://x".into(), response_path: path.map(str::to_string), ..Default::default() }),
            ..Default::default()
        }
    }

    fn ok(answer: Value) -> FetchOutcome {
        FetchOutcome { result: Ok(Some(answer)), attempts: 1, status_code: Some(200) }
    }

    fn now() -> Timestamp {
        "2026-03-02T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_fetch_answer_is_merged_into_data_or_placed_at_its_path() {
        let data = json!({"build_id": 7, "build": {"keep": true}});
        let mut status = RecipientStatus::default();
        record_fetch(&mut status, &fetch_step(None), &ok(json!({"status": "green", "build_id": 8})), &data, now());
        assert_eq!(status.steps[0].reason.as_deref(), Some("Fetched"));
        let mut context = json!({"data": data.clone()});
        apply_context(&mut context, status.context.as_ref());
        assert_eq!(context["data"], json!({"build_id": 8, "status": "green", "build": {"keep": true}}), "the answer wins, shallowly");

        let mut status = RecipientStatus::default();
        record_fetch(&mut status, &fetch_step(Some("build.details")), &ok(json!({"sha": "abc"})), &data, now());
        let mut context = json!({"data": data.clone()});
        apply_context(&mut context, status.context.as_ref());
        assert_eq!(context["data"]["build"], json!({"keep": true, "details": {"sha": "abc"}}));
        assert_eq!(context["data"]["build_id"], json!(7));
    }

    #[test]
    fn a_failed_or_unusable_fetch_stops_the_recipient() {
        let data = json!({});
        let failure = FetchOutcome { result: Err(FetchFailure { reason: "HttpStatus404".into(), message: "HTTP 404".into() }), attempts: 1, status_code: Some(404) };
        let mut status = RecipientStatus::default();
        record_fetch(&mut status, &fetch_step(None), &failure, &data, now());
        assert_eq!((status.state, status.steps[0].reason.as_deref(), status.steps[0].status_code), (RecipientState::Failed, Some("HttpStatus404"), Some(404)));

        let mut status = RecipientStatus::default();
        record_fetch(&mut status, &fetch_step(None), &ok(json!([1, 2])), &data, now());
        assert_eq!((status.state, status.steps[0].reason.as_deref()), (RecipientState::Failed, Some("InvalidResponse")));

        let mut status = RecipientStatus::default();
        record_fetch(&mut status, &fetch_step(None), &ok(json!({"blob": "x".repeat(MAX_CONTEXT_BYTES)})), &data, now());
        assert_eq!((status.state, status.steps[0].reason.as_deref()), (RecipientState::Failed, Some("ResponseTooLarge")));
        assert!(status.context.is_none());

        // An empty answer (204) merges nothing and goes on.
        let mut status = RecipientStatus::default();
        record_fetch(&mut status, &fetch_step(None), &FetchOutcome { result: Ok(None), attempts: 1, status_code: Some(204) }, &data, now());
        assert_eq!(status.steps[0].state, StepState::Completed);
    }

    fn throttle_call(limit: u32) -> ThrottleCall {
        ThrottleCall {
            step_ref: "limit".into(),
            workflow: "wf".into(),
            recipient: RecipientKey::user("u1"),
            key: "a1".into(),
            window: Window::For(SignedDuration::from_hours(1)),
            limit,
            recipient_run_id: uuid::Uuid::nil(),
        }
    }

    #[test]
    fn a_throttled_run_ends_throttled() {
        let mut status = RecipientStatus::default();
        record_throttle(&mut status, &throttle_call(1), &ThrottleOutcome::Admitted, now());
        assert_eq!((status.steps[0].reason.as_deref(), status.state.is_finished()), (Some("Admitted"), false));
        let mut status = RecipientStatus::default();
        record_throttle(&mut status, &throttle_call(2), &ThrottleOutcome::Throttled { window_end: now() }, now());
        assert_eq!((status.state, status.reason.as_deref()), (RecipientState::Throttled, Some("Throttled")));
    }

    fn batch_call() -> BatchCall {
        BatchCall {
            step_ref: "digest".into(),
            workflow: "wf".into(),
            recipient: RecipientKey::user("u1"),
            key: "p1".into(),
            window: BatchWindow::Fixed(SignedDuration::from_secs(30)),
            max_activities: 1000,
            render_limit: 10,
            flush_leading: false,
            carrier: false,
            recipient_run_id: uuid::Uuid::nil(),
            workflow_run_id: uuid::Uuid::nil(),
            data: JsonObject::new(),
            actor: Value::Null,
            cancellation_key: None,
        }
    }

    #[test]
    fn batch_outcomes_are_recorded() {
        let call = batch_call();
        let closes: Timestamp = "2026-03-02T10:00:30Z".parse().unwrap();
        // The opener waits on one record, whose close may move.
        let mut status = RecipientStatus::default();
        record_batch(&mut status, &call, &BatchOutcome::Opened { closes_at: closes }, now());
        record_batch(&mut status, &call, &BatchOutcome::Wait { closes_at: closes + SignedDuration::from_secs(5) }, now());
        assert_eq!(status.steps.len(), 1);
        assert_eq!((status.state, status.steps[0].state), (RecipientState::Waiting, StepState::Waiting));
        assert_eq!(status.wake_at.as_deref(), Some("2026-03-02T10:00:35Z"));
        // It closes with the batch's variables, which later steps see.
        let summary = json!({"total_activities": 3, "total_actors": 2, "activities": [{"n": 1}, {"n": 2}, {"n": 3}], "actors": [{"id": "a"}, {"id": "b"}]});
        record_batch(&mut status, &call, &BatchOutcome::Closed { summary: summary.as_object().unwrap().clone() }, now());
        assert_eq!((status.state, status.steps[0].state, status.steps[0].reason.as_deref()), (RecipientState::Running, StepState::Completed, Some("BatchClosed")));
        let mut context = json!({"data": {"own": true, "n": 0}});
        apply_context(&mut context, status.context.as_ref());
        assert_eq!((context["total_activities"].clone(), context["run"]["total_actors"].clone()), (json!(3), json!(2)));
        // Knock's merged data: the last activity's values win.
        assert_eq!(context["data"], json!({"own": true, "n": 3}));
        // A joiner ends Batched, naming the carrier.
        let mut status = RecipientStatus::default();
        record_batch(&mut status, &call, &BatchOutcome::Joined { carrier: "run-1".into() }, now());
        assert_eq!((status.state, status.steps[0].run.as_deref()), (RecipientState::Batched, Some("run-1")));
        // Every activity cancelled: nothing to send.
        let mut status = RecipientStatus::default();
        record_batch(&mut status, &call, &BatchOutcome::Opened { closes_at: closes }, now());
        record_batch(&mut status, &call, &BatchOutcome::Empty, now());
        assert_eq!((status.state, status.reason.as_deref()), (RecipientState::Cancelled, Some("BatchEmpty")));
    }

    #[test]
    fn a_huge_batch_summary_keeps_its_totals() {
        let big: Vec<Value> = (0..100).map(|i| json!({"i": i, "text": "x".repeat(1000)})).collect();
        let summary = json!({"total_activities": 100, "total_actors": 1, "activities": big, "actors": []});
        let mut status = RecipientStatus::default();
        record_batch(&mut status, &batch_call(), &BatchOutcome::Closed { summary: summary.as_object().unwrap().clone() }, now());
        let kept = status.context.as_ref().unwrap()["batch"].clone();
        assert_eq!(kept["total_activities"], json!(100));
        let rendered = kept["activities"].as_array().unwrap().len();
        assert!(rendered > 0 && rendered < 100, "{rendered}");
        assert!(stored_size(status.context.as_ref().unwrap()) <= MAX_CONTEXT_BYTES);
    }

    #[test]
    fn frequency_and_trigger_records() {
        let check = FrequencyCheck { workflow: "wf".into(), tenant: None };
        let mut status = RecipientStatus::default();
        record_frequency(&mut status, &check, Ok(true));
        assert_eq!(status.state, RecipientState::Running);
        record_frequency(&mut status, &check, Ok(false));
        assert_eq!((status.state, status.reason.as_deref()), (RecipientState::Skipped, Some("TriggerFrequency")));
        let mut status = RecipientStatus::default();
        record_frequency(&mut status, &check, Err("down".into()));
        assert_eq!(status.state, RecipientState::Failed);

        let call = TriggerCall {
            step_ref: "follow-up".into(),
            workflow: "escalation".into(),
            recipient: RecipientKey::user("u1"),
            data: JsonObject::new(),
            actor: None,
            tenant: None,
            cancellation_key: None,
            name: "escalation-abc".into(),
        };
        let mut status = RecipientStatus::default();
        record_trigger(&mut status, &call, &TriggerOutcome::Started { workflow_run_id: Some("0f0e".into()) }, now());
        assert!(status.steps[0].message.as_deref().is_some_and(|m| m.ends_with("workflow run 0f0e")));
        assert_eq!((status.steps[0].reason.as_deref(), status.steps[0].run.as_deref()), (Some("WorkflowTriggered"), Some("escalation-abc")));
        record_trigger(&mut status, &call, &TriggerOutcome::Skipped { reason: "WorkflowInactive".into(), message: String::new() }, now());
        assert_eq!(status.steps[1].state, StepState::Skipped);
        assert!(!status.state.is_finished());
    }
}
