//! Taking one recipient through a workflow's steps.
//!
//! [`advance`] is a pure state machine over a recipient's status: it runs
//! conditions, preferences, delays, branches, send windows and template
//! rendering, and stops when something outside must be done: a message
//! delivered ([`Next::Deliver`], reported back with [`record_delivery`]), or a
//! function step's call (fetch, throttle, batch, trigger-workflow, the trigger
//! frequency check; see [`super::functions`]), when a wait is pending, or when
//! the recipient is done. Because every outcome is written into the status
//! before the next step, a restart resumes exactly where the last saved status
//! left off.

use jiff::Timestamp;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::conditions::{self, AudienceMembers};
use super::expansion::{ObjectRecord, UserRecord};
use super::functions::{self, BatchCall, FetchCall, FrequencyCheck, ThrottleCall, TriggerCall};
use super::model::{JsonObject, PreferenceSet, RecipientKey};
use super::path::{self, Position};
use super::preferences::{self, PreferenceDecision, PreferenceQuery};
use super::status::{AttemptRecord, RecipientState, RecipientStatus, StepState, StepStatus};
use super::templates::{CompiledTemplates, TemplateError};
use super::windows;
use crate::resources::workflow::{Conditions, Step, StepType, TriggerFrequency};

/// A tenant as the core sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TenantRecord {
    pub id: String,
    pub properties: JsonObject,
    pub preference_set: Option<PreferenceSet>,
}

/// What is the same for every recipient of a run.
pub struct RunContext<'a> {
    pub workflow_key: &'a str,
    pub categories: &'a [String],
    pub override_preferences: bool,
    pub steps: &'a [Step],
    pub templates: &'a CompiledTemplates,
    pub workflow_run_id: Uuid,
    pub data: &'a JsonObject,
    /// The actor as templates see it (`{id, ...properties}`), if any.
    pub actor: Option<Value>,
    pub tenant: Option<&'a TenantRecord>,
    /// The Workflow's own conditions, checked before any step.
    pub conditions: &'a Conditions,
    pub trigger_frequency: TriggerFrequency,
    /// The run's cancellation key (a batch activity carries it).
    pub cancellation_key: Option<&'a str>,
    /// For `is_audience_member` conditions.
    pub audiences: &'a (dyn AudienceMembers + Sync),
    /// A run a Schedule created: `recipient.schedule` (`{id, last_occurrence_at, next_occurrence_at}`).
    pub schedule: Option<Value>,
}

/// The recipient a step is decided for.
#[derive(Clone, Copy)]
pub struct RecipientContext<'a> {
    pub key: &'a RecipientKey,
    pub recipient_run_id: Uuid,
    pub user: Option<&'a UserRecord>,
    pub object: Option<&'a ObjectRecord>,
    pub trigger_data: Option<&'a JsonObject>,
    pub subscription: Option<&'a JsonObject>,
    /// The stored statuses of this recipient's earlier messages, by step ref
    /// (for `refs.<step>` conditions); None when none were read.
    pub messages: Option<&'a crate::core::history::StoredStatuses>,
    /// A batch this recipient carries may have closed before its window's end
    /// (it filled up): look now rather than at the window's end.
    pub poll_batch: bool,
}

/// Resolves a channel step's channel name to its type name (`http`, `chat`, `email`),
/// or None when there is no such Channel.
pub trait ChannelTypes {
    fn channel_type(&self, channel: &str) -> Option<&'static str>;
}

/// A rendered message for the caller to deliver.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub step_ref: String,
    pub channel: String,
    pub channel_type: &'static str,
    /// Rendered template fields, e.g. `body`, `url`, `headers.X-Team`, `subject`.
    pub fields: Map<String, Value>,
    /// The recipient's channel data for this channel (e.g. a webhook `url`).
    pub channel_data: Option<Value>,
    /// The recipient's email address, if any (the default `to`).
    pub email: Option<String>,
    /// `<recipient run id>:<step ref>`: the same on every attempt and after restarts.
    pub idempotency_key: String,
}

/// What the caller must do next for a recipient.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Nothing: the recipient is finished.
    Done,
    /// Deliver this message, then call [`record_delivery`].
    Deliver(Message),
    /// Come back at this time (a delay, a batch window, a send window).
    WaitUntil(Timestamp),
    /// Check the workflow's trigger frequency, then call [`functions::record_frequency`].
    CheckFrequency(FrequencyCheck),
    /// Make the request, then call [`functions::record_fetch`].
    Fetch(FetchCall),
    /// Ask the throttle, then call [`functions::record_throttle`].
    Throttle(ThrottleCall),
    /// Visit the batch, then call [`functions::record_batch`].
    Batch(BatchCall),
    /// Start the run, then call [`functions::record_trigger`].
    TriggerWorkflow(TriggerCall),
}

/// The result of a delivery.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryOutcome {
    pub ok: bool,
    /// CamelCase: Delivered, DeliveryFailed, InvalidMessage, ChannelNotReady, ...
    pub reason: String,
    pub message: String,
    pub attempts: i32,
    pub status_code: Option<i32>,
    /// Each attempt, in order.
    pub history: Vec<AttemptRecord>,
}

/// The merged data a recipient's templates and conditions see: the trigger's
/// `data` with the recipient's `$trigger_data` over it (the recipient's keys win).
pub fn merged_data(data: &JsonObject, trigger_data: Option<&JsonObject>) -> JsonObject {
    let mut merged = data.clone();
    if let Some(extra) = trigger_data {
        merged.extend(extra.clone());
    }
    merged
}

/// The `recipient` object templates see: id, collection, properties, channel_data, subscription.
pub fn recipient_view(recipient: &RecipientContext) -> Value {
    let mut view = Map::new();
    let (properties, channel_data) = match (recipient.user, recipient.object) {
        (Some(u), _) => (Some(&u.properties), Some(&u.channel_data)),
        (None, Some(o)) => (Some(&o.properties), Some(&o.channel_data)),
        _ => (None, None),
    };
    if let Some(p) = properties {
        view.extend(p.clone());
    }
    view.insert("id".into(), json!(recipient.key.id()));
    if let RecipientKey::Object { collection, .. } = recipient.key {
        view.insert("collection".into(), json!(collection));
    }
    view.insert("channel_data".into(), Value::Object(channel_data.cloned().unwrap_or_default()));
    if let Some(s) = recipient.subscription {
        view.insert("subscription".into(), Value::Object(s.clone()));
    }
    Value::Object(view)
}

/// The whole context of a recipient's templates and conditions, with what
/// earlier steps added (fetched data, a closed batch): see [`functions::apply_context`].
pub fn step_context(run: &RunContext, recipient: &RecipientContext, status: &RecipientStatus) -> Value {
    let mut context = template_context(run, recipient);
    functions::apply_context(&mut context, status.context.as_ref());
    context
}

/// The context of a recipient's templates and conditions, as the trigger gave it.
pub fn template_context(run: &RunContext, recipient: &RecipientContext) -> Value {
    let tenant = run.tenant.map(|t| {
        let mut v = t.properties.clone();
        v.insert("id".into(), json!(t.id));
        Value::Object(v)
    });
    let mut recipient_view = recipient_view(recipient);
    if let (Some(schedule), Value::Object(view)) = (&run.schedule, &mut recipient_view) {
        view.insert("schedule".into(), schedule.clone());
    }
    json!({
        "data": merged_data(run.data, recipient.trigger_data),
        "recipient": recipient_view,
        "actor": run.actor.clone().unwrap_or(Value::Null),
        "tenant": tenant.unwrap_or(Value::Null),
        "workflow": {"key": run.workflow_key, "categories": run.categories},
        "workflow_run_id": run.workflow_run_id.to_string(),
        "recipient_run_id": recipient.recipient_run_id.to_string(),
    })
}

/// The preference sets that apply, highest precedence first: the recipient's
/// tenant-specific set, the tenant's defaults, the recipient's default set.
pub fn preference_sets<'a>(recipient: &RecipientContext<'a>, tenant: Option<&'a TenantRecord>) -> Vec<&'a PreferenceSet> {
    let mut sets = Vec::new();
    if let (Some(user), Some(t)) = (recipient.user, tenant) {
        sets.extend(user.tenant_preferences.get(&t.id));
    }
    if let Some(t) = tenant {
        sets.extend(t.preference_set.as_ref());
    }
    let defaults = match (recipient.user, recipient.object) {
        (Some(u), _) => u.preferences.get("default"),
        (None, Some(o)) => o.preferences.get("default"),
        _ => None,
    };
    sets.extend(defaults);
    sets
}

fn now_string(now: Timestamp) -> String {
    now.to_string()
}

pub(super) fn finish(status: &mut RecipientStatus, state: RecipientState, reason: &str, message: Option<String>) -> Next {
    status.state = state;
    status.reason = Some(reason.to_string());
    status.message = message;
    status.wake_at = None;
    Next::Done
}

pub(super) fn push_step(status: &mut RecipientStatus, step_ref: &str, state: StepState, reason: &str, message: Option<String>, now: Timestamp) {
    status.steps.push(StepStatus { step_ref: step_ref.to_string(), state, reason: Some(reason.to_string()), message, time: Some(now_string(now)), ..Default::default() });
}

/// Records a waiting step (a delay, a batch window, a send window) and
/// returns the wait.
pub(super) fn wait(status: &mut RecipientStatus, step_ref: &str, reason: &str, until: Timestamp, now: Timestamp) -> Next {
    match status.steps.last_mut() {
        // Still waiting on the same step (a batch window that moved): one record.
        Some(last) if last.state == StepState::Waiting && last.step_ref == step_ref => {
            last.reason = Some(reason.to_string());
            last.message = Some(format!("until {until}"));
        }
        _ => push_step(status, step_ref, StepState::Waiting, reason, Some(format!("until {until}")), now),
    }
    status.wake_at = Some(until.to_string());
    status.state = RecipientState::Waiting;
    Next::WaitUntil(until)
}

/// Fails the recipient at a step.
pub(super) fn fail_step(status: &mut RecipientStatus, step_ref: &str, reason: &str, message: String, now: Timestamp) -> Next {
    push_step(status, step_ref, StepState::Failed, reason, Some(message.clone()), now);
    finish(status, RecipientState::Failed, "StepFailed", Some(format!("step `{step_ref}`: {message}")))
}

/// Advances a recipient as far as it can go without calling out (see the
/// module docs). `cancelled` stops an unfinished recipient before its next step.
pub fn advance(run: &RunContext, recipient: &RecipientContext, channels: &dyn ChannelTypes, status: &mut RecipientStatus, cancelled: bool, now: Timestamp) -> Next {
    if status.state.is_finished() {
        return Next::Done;
    }
    let waiting = status.steps.last().filter(|s| s.state == StepState::Waiting).and_then(|s| path::find(run.steps, &s.step_ref));
    // A cancel stops what is left to do; a recipient whose every step is done
    // (its last delivery just came back) is concluded, not cancelled. A batch's
    // carrier goes on: a cancel removes only its own activity (Knock's rule).
    let carrying = waiting.is_some_and(|s| s.step_type == StepType::Batch);
    if cancelled && !carrying && (waiting.is_some() || matches!(path::position(run.steps, &status.steps), Position::Next(_))) {
        if let Some(last) = status.steps.last_mut() {
            if last.state == StepState::Waiting {
                last.state = StepState::Cancelled;
                last.time = Some(now_string(now));
            }
        }
        return finish(status, RecipientState::Cancelled, "Cancelled", Some("cancelled by cancellation key".into()));
    }
    let mut context = step_context(run, recipient, status);
    // Resume a pending wait.
    if let Some(step) = waiting {
        let wake = status.wake_at.as_deref().and_then(|w| w.parse::<Timestamp>().ok()).unwrap_or(now);
        let polled = recipient.poll_batch && step.step_type == StepType::Batch;
        if wake > now && !polled {
            status.state = RecipientState::Waiting;
            return Next::WaitUntil(wake);
        }
        status.wake_at = None;
        match step.step_type {
            // The carrier asks the batch whether it closed.
            StepType::Batch => {
                status.state = RecipientState::Running;
                return match functions::batch_call(run, recipient, step, &context, true, now) {
                    Ok(call) => Next::Batch(call),
                    Err(refusal) => refusal.apply(status, step, now).unwrap_or(Next::WaitUntil(now)),
                };
            }
            // A send window opened: the step runs again from the start.
            StepType::Channel => {
                status.steps.pop();
            }
            _ => {
                let last = status.steps.last_mut().expect("a waiting step");
                last.state = StepState::Completed;
                last.reason = Some("DelayElapsed".into());
                last.time = Some(now_string(now));
            }
        }
    }
    if status.steps.is_empty() && status.state == RecipientState::Queued {
        // The workflow's own conditions, then its trigger frequency, before any step.
        match conditions::hold(run.conditions, &context, now, run.audiences) {
            Ok(true) => {}
            Ok(false) => return finish(status, RecipientState::Skipped, "ConditionNotMet", Some("the workflow's conditions do not hold".into())),
            Err(e) => return finish(status, RecipientState::Failed, "InvalidCondition", Some(format!("workflow conditions: {e}"))),
        }
        if run.trigger_frequency != TriggerFrequency::EveryTrigger {
            return Next::CheckFrequency(functions::frequency_check(run));
        }
    }
    status.state = RecipientState::Running;
    loop {
        let step = match path::position(run.steps, &status.steps) {
            Position::Next(step) => step,
            Position::End => return conclude(run, status),
            Position::Terminated => return conclude(run, status),
        };
        // Message-status conditions see the earlier steps as they are now.
        if step.conditions.leaves().iter().any(|c| c.variable.starts_with("refs.")) {
            context["refs"] = crate::core::history::refs(&status.steps, recipient.messages);
        }
        match conditions::hold(&step.conditions, &context, now, run.audiences) {
            Ok(true) => {}
            Ok(false) => {
                push_step(status, &step.step_ref, StepState::Skipped, "ConditionNotMet", None, now);
                continue;
            }
            Err(e) => {
                push_step(status, &step.step_ref, StepState::Failed, "InvalidCondition", Some(e.to_string()), now);
                return finish(status, RecipientState::Failed, "StepFailed", Some(format!("step `{}`: {e}", step.step_ref)));
            }
        }
        let zone = windows::recipient_zone(&context["recipient"]);
        match step.step_type {
            StepType::Delay => match delay_until(run, step, &context, &zone, now) {
                Ok(wake) if wake > now => return wait(status, &step.step_ref, "Delaying", wake, now),
                Ok(_) => push_step(status, &step.step_ref, StepState::Completed, "DelayElapsed", None, now),
                Err(DelayError::OverBudget(e)) => {
                    let message = e.to_string();
                    push_step(status, &step.step_ref, StepState::Failed, RENDER_BUDGET_EXCEEDED, Some(message.clone()), now);
                    return finish(status, RecipientState::Failed, "StepFailed", Some(message));
                }
                // Knock skips a delay whose window from the data is missing or invalid.
                Err(DelayError::InvalidWindow(message)) => push_step(status, &step.step_ref, StepState::Skipped, functions::INVALID_WINDOW, Some(message), now),
                Err(DelayError::Invalid(message)) => {
                    push_step(status, &step.step_ref, StepState::Failed, "InvalidDelay", Some(message.clone()), now);
                    return finish(status, RecipientState::Failed, "StepFailed", Some(format!("step `{}`: {message}", step.step_ref)));
                }
            },
            StepType::Channel => {
                let channel = step.channel.clone().unwrap_or_default();
                let Some(channel_type) = channels.channel_type(&channel) else {
                    let message = format!("Channel `{channel}` does not exist");
                    push_step(status, &step.step_ref, StepState::Failed, "ChannelNotFound", Some(message.clone()), now);
                    return finish(status, RecipientState::Failed, "StepFailed", Some(message));
                };
                if !run.override_preferences {
                    let sets = preference_sets(recipient, run.tenant);
                    let query = PreferenceQuery { workflow_key: run.workflow_key, categories: run.categories, channel_type };
                    if let PreferenceDecision::OptedOut { setting } = preferences::evaluate(&sets, &query) {
                        push_step(status, &step.step_ref, StepState::Skipped, "PreferenceOptOut", Some(format!("opted out by {setting}")), now);
                        continue;
                    }
                }
                match windows::next_send_time(&step.send_windows, now, &zone) {
                    Ok(at) if at > now => return wait(status, &step.step_ref, "OutsideSendWindow", at, now),
                    Ok(_) => {}
                    Err(message) => return fail_step(status, &step.step_ref, "InvalidSendWindow", message, now),
                }
                match render_message(run, recipient, step, &channel, channel_type, &context) {
                    Ok(message) => return Next::Deliver(message),
                    Err(e) => {
                        let reason = if e.over_budget { RENDER_BUDGET_EXCEEDED } else { "RenderFailed" };
                        let message = e.to_string();
                        push_step(status, &step.step_ref, StepState::Failed, reason, Some(message.clone()), now);
                        return finish(status, RecipientState::Failed, "StepFailed", Some(message));
                    }
                }
            }
            StepType::Branch => {
                let mut taken = None;
                for branch in &step.branches {
                    match conditions::hold(&branch.conditions, &context, now, run.audiences) {
                        Ok(true) => {
                            taken = Some(branch);
                            break;
                        }
                        Ok(false) => {}
                        Err(e) => return fail_step(status, &step.step_ref, "InvalidCondition", format!("branch `{}`: {e}", branch.name), now),
                    }
                }
                match taken {
                    Some(branch) => {
                        push_step(status, &step.step_ref, StepState::Completed, "BranchTaken", Some(format!("took branch `{}`", branch.name)), now);
                        if let Some(record) = status.steps.last_mut() {
                            record.branch = Some(branch.name.clone());
                        }
                    }
                    None => push_step(status, &step.step_ref, StepState::Skipped, "NoBranchMatched", None, now),
                }
            }
            StepType::Fetch | StepType::Throttle | StepType::Batch | StepType::TriggerWorkflow => {
                let call = match step.step_type {
                    StepType::Fetch => functions::fetch_call(run, recipient, step, &context).map(Next::Fetch),
                    StepType::Throttle => functions::throttle_call(run, recipient, step, &context, now).map(Next::Throttle),
                    StepType::Batch => functions::batch_call(run, recipient, step, &context, false, now).map(Next::Batch),
                    _ => functions::trigger_call(run, recipient, step, &context).map(Next::TriggerWorkflow),
                };
                match call {
                    Ok(next) => return next,
                    Err(refusal) => {
                        if let Some(next) = refusal.apply(status, step, now) {
                            return next;
                        }
                    }
                }
            }
        }
    }
}

/// The end of the steps: Completed if anything was sent (or there was nothing
/// to send), Skipped when every channel step was skipped.
fn conclude(run: &RunContext, status: &mut RecipientStatus) -> Next {
    let is_channel = |record: &&StepStatus| path::find(run.steps, &record.step_ref).is_some_and(|step| step.step_type == StepType::Channel);
    let channel_steps: Vec<&StepStatus> = status.steps.iter().filter(is_channel).collect();
    let all_skipped = !channel_steps.is_empty() && channel_steps.iter().all(|s| s.state == StepState::Skipped);
    if all_skipped {
        let opted_out = channel_steps.iter().all(|s| s.reason.as_deref() == Some("PreferenceOptOut"));
        let reason = if opted_out { "PreferenceOptOut" } else { "NothingToSend" };
        return finish(status, RecipientState::Skipped, reason, None);
    }
    finish(status, RecipientState::Completed, "WorkflowCompleted", None)
}

/// Records the outcome of the delivery [`advance`] asked for.
pub fn record_delivery(status: &mut RecipientStatus, message: &Message, outcome: &DeliveryOutcome, now: Timestamp) {
    let state = if outcome.ok { StepState::Completed } else { StepState::Failed };
    status.steps.push(StepStatus {
        step_ref: message.step_ref.clone(),
        state,
        reason: Some(outcome.reason.clone()),
        message: Some(outcome.message.clone()),
        attempts: Some(outcome.attempts),
        status_code: outcome.status_code,
        time: Some(now_string(now)),
        // One successful attempt says nothing the step does not; keep pages small.
        attempt_history: if outcome.ok && outcome.attempts <= 1 { Vec::new() } else { outcome.history.clone() },
        ..Default::default()
    });
    if !outcome.ok {
        finish(status, RecipientState::Failed, "DeliveryFailed", Some(format!("step `{}`: {}", message.step_ref, outcome.message)));
    }
}

/// A step's reason when rendering one of its fields ran out of its CPU budget
/// (the template is fine; this recipient's data makes it too costly).
pub const RENDER_BUDGET_EXCEEDED: &str = "RenderBudgetExceeded";

/// Why a delay has no wake time.
enum DelayError {
    Invalid(String),
    /// A window from the data that is missing or invalid: the step is skipped.
    InvalidWindow(String),
    OverBudget(TemplateError),
}

impl From<String> for DelayError {
    fn from(message: String) -> Self {
        DelayError::Invalid(message)
    }
}

fn delay_until(run: &RunContext, step: &Step, context: &Value, zone: &jiff::tz::TimeZone, now: Timestamp) -> Result<Timestamp, DelayError> {
    let delay = step.delay.as_ref().ok_or("delay step has no `delay`".to_string())?;
    if let Some(path) = &delay.window_from {
        return functions::window_from(context, path, zone, now).map_err(DelayError::InvalidWindow);
    }
    if let Some(duration) = &delay.duration {
        let span = windows::duration(duration)?;
        return Ok(now.checked_add(span).map_err(|e| e.to_string())?);
    }
    if delay.until.is_some() {
        let rendered = match run.templates.render(&step.step_ref, "delay.until", context) {
            Ok(rendered) => rendered.unwrap_or_default(),
            Err(e) if e.over_budget => return Err(DelayError::OverBudget(e)),
            Err(e) => return Err(e.to_string().into()),
        };
        return Ok(rendered.trim().parse::<Timestamp>().map_err(|e| format!("delay.until rendered `{rendered}`, not an RFC 3339 time: {e}"))?);
    }
    Err("delay needs `duration`, `until` or `windowFrom`".to_string().into())
}

const TEMPLATE_FIELDS: [&str; 11] = ["method", "url", "body", "text", "blocks", "from", "to", "subject", "html", "markdownBody", "actionUrl"];

fn render_message(run: &RunContext, recipient: &RecipientContext, step: &Step, channel: &str, channel_type: &'static str, context: &Value) -> Result<Message, TemplateError> {
    let mut fields = Map::new();
    let render = |field: &str| run.templates.render(&step.step_ref, field, context);
    for field in TEMPLATE_FIELDS {
        if let Some(value) = render(&format!("template.{field}"))? {
            fields.insert(field.to_string(), Value::String(value));
        }
    }
    if let Some(template) = &step.template {
        let mut headers = Map::new();
        for name in template.headers.keys() {
            if let Some(value) = render(&format!("template.headers.{name}"))? {
                headers.insert(name.clone(), Value::String(value));
            }
        }
        if !headers.is_empty() {
            fields.insert("headers".into(), Value::Object(headers));
        }
    }
    let channel_data = match (recipient.user, recipient.object) {
        (Some(u), _) => u.channel_data.get(channel).cloned(),
        (None, Some(o)) => o.channel_data.get(channel).cloned(),
        _ => None,
    };
    let email = recipient.user.and_then(|u| u.properties.get("email")).and_then(Value::as_str).map(str::to_string);
    Ok(Message {
        step_ref: step.step_ref.clone(),
        channel: channel.to_string(),
        channel_type,
        fields,
        channel_data,
        email,
        idempotency_key: format!("{}:{}", recipient.recipient_run_id, step.step_ref),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::workflow::{Delay, DurationValue, StepCondition, StepTemplate};
    use std::collections::BTreeMap;

    struct Channels;
    impl ChannelTypes for Channels {
        fn channel_type(&self, channel: &str) -> Option<&'static str> {
            (channel == "hooks").then_some("http")
        }
    }

    fn channel_step(r: &str, body: &str) -> Step {
        Step {
            step_ref: r.into(),
            step_type: StepType::Channel,
            channel: Some("hooks".into()),
            template: Some(StepTemplate { body: Some(body.into()), ..Default::default() }),
            ..Default::default()
        }
    }

    fn delay_step(r: &str, duration: &str) -> Step {
        Step {
            step_ref: r.into(),
            step_type: StepType::Delay,
            delay: Some(Delay { duration: Some(DurationValue::Text(duration.into())), ..Default::default() }),
            ..Default::default()
        }
    }

    struct Fixture {
        steps: Vec<Step>,
        templates: CompiledTemplates,
        data: JsonObject,
        user: UserRecord,
        key: RecipientKey,
        conditions: Conditions,
    }

    impl Fixture {
        fn new(steps: Vec<Step>) -> Self {
            let templates = CompiledTemplates::compile(&steps).unwrap();
            let mut user = UserRecord { id: "u1".into(), ..Default::default() };
            user.properties.insert("name".into(), json!("Ada"));
            user.properties.insert("email".into(), json!("ada@example.com"));
            Fixture { steps, templates, data: json!({"n": 1, "who": "all"}).as_object().unwrap().clone(), user, key: RecipientKey::user("u1"), conditions: Conditions::default() }
        }

        fn run(&self) -> RunContext<'_> {
            RunContext {
                workflow_key: "wf",
                categories: &[],
                override_preferences: false,
                steps: &self.steps,
                templates: &self.templates,
                workflow_run_id: Uuid::nil(),
                data: &self.data,
                actor: Some(json!({"id": "actor"})),
                tenant: None,
                conditions: &self.conditions,
                trigger_frequency: TriggerFrequency::EveryTrigger,
                cancellation_key: None,
                audiences: &conditions::NoAudiences,
                schedule: None,
            }
        }

        fn recipient<'a>(&'a self, trigger_data: Option<&'a JsonObject>) -> RecipientContext<'a> {
            RecipientContext {
                key: &self.key,
                recipient_run_id: Uuid::nil(),
                user: Some(&self.user),
                object: None,
                trigger_data,
                subscription: None,
                messages: None,
                poll_batch: false,
            }
        }
    }

    fn ok() -> DeliveryOutcome {
        DeliveryOutcome { ok: true, reason: "Delivered".into(), message: "200".into(), attempts: 1, status_code: Some(200), ..Default::default() }
    }

    #[test]
    fn renders_delivers_and_completes() {
        let f = Fixture::new(vec![channel_step("a", "{{ recipient.name }} {{ data.who }} {{ actor.id }}")]);
        let extra = json!({"who": "just you"}).as_object().unwrap().clone();
        let mut status = RecipientStatus::default();
        let now = Timestamp::now();
        let Next::Deliver(message) = advance(&f.run(), &f.recipient(Some(&extra)), &Channels, &mut status, false, now) else { panic!() };
        assert_eq!(message.fields["body"], "Ada just you actor");
        assert_eq!(message.idempotency_key, format!("{}:a", Uuid::nil()));
        assert_eq!(message.email.as_deref(), Some("ada@example.com"));
        record_delivery(&mut status, &message, &ok(), now);
        assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, now), Next::Done);
        assert_eq!(status.state, RecipientState::Completed);
        assert_eq!(status.steps[0].attempts, Some(1));
        assert!(status.steps[0].attempt_history.is_empty(), "a first-time success needs no history");
        // Finished recipients stay finished.
        assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, true, now), Next::Done);
        assert_eq!(status.state, RecipientState::Completed);
    }

    #[test]
    fn a_cancel_after_the_last_delivery_does_not_undo_it() {
        let f = Fixture::new(vec![channel_step("a", "x"), channel_step("b", "y")]);
        let mut status = RecipientStatus::default();
        let now = Timestamp::now();
        let Next::Deliver(first) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, now) else { panic!() };
        record_delivery(&mut status, &first, &ok(), now);
        let Next::Deliver(last) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, now) else { panic!() };
        record_delivery(&mut status, &last, &ok(), now);
        // The cancel arrived while the last delivery was in flight: that delivery happened.
        assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, true, now), Next::Done);
        assert_eq!(status.state, RecipientState::Completed);

        // One step left: cancelled before it.
        let mut status = RecipientStatus::default();
        let Next::Deliver(first) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, now) else { panic!() };
        record_delivery(&mut status, &first, &ok(), now);
        assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, true, now), Next::Done);
        assert_eq!(status.state, RecipientState::Cancelled);
        assert_eq!(status.steps.len(), 1);
    }

    #[test]
    fn a_failed_delivery_fails_the_recipient() {
        let f = Fixture::new(vec![channel_step("a", "x"), channel_step("b", "y")]);
        let mut status = RecipientStatus::default();
        let now = Timestamp::now();
        let Next::Deliver(m) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, now) else { panic!() };
        let history = vec![AttemptRecord { attempt: 1, time: now.to_string(), status_code: Some(400), error: Some("HTTP 400".into()) }];
        let failed = DeliveryOutcome { ok: false, reason: "DeliveryFailed".into(), message: "HTTP 400".into(), attempts: 1, status_code: Some(400), history };
        record_delivery(&mut status, &m, &failed, now);
        assert_eq!(status.state, RecipientState::Failed);
        assert_eq!(status.steps[0].attempt_history.len(), 1, "a failed delivery keeps its attempts");
        assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, now), Next::Done);
        assert_eq!(status.steps.len(), 1, "no step after a failure");
    }

    #[test]
    fn delays_wait_resume_and_can_be_cancelled() {
        let f = Fixture::new(vec![delay_step("wait", "30s"), channel_step("a", "x")]);
        let mut status = RecipientStatus::default();
        let t0 = Timestamp::now();
        let Next::WaitUntil(wake) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, t0) else { panic!() };
        assert_eq!(wake, t0.checked_add(jiff::SignedDuration::from_secs(30)).unwrap());
        assert_eq!(status.state, RecipientState::Waiting);
        // Before the wake time: still waiting, the same wake time (it is stored).
        let mut again = status.clone();
        assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut again, false, t0), Next::WaitUntil(wake));
        // After it: the delay completes and the next step delivers.
        let later = wake.checked_add(jiff::SignedDuration::from_secs(1)).unwrap();
        let mut resumed = status.clone();
        assert!(matches!(advance(&f.run(), &f.recipient(None), &Channels, &mut resumed, false, later), Next::Deliver(_)));
        assert_eq!(resumed.steps[0].state, StepState::Completed);
        // Cancelled while waiting: the delay step and the recipient end Cancelled.
        advance(&f.run(), &f.recipient(None), &Channels, &mut status, true, t0);
        assert_eq!(status.state, RecipientState::Cancelled);
        assert_eq!(status.steps[0].state, StepState::Cancelled);
    }

    #[test]
    fn conditions_and_preferences_skip_steps() {
        let mut gated = channel_step("gated", "x");
        gated.conditions = vec![StepCondition { variable: "data.n".into(), operator: "greater_than".into(), argument: Some(json!(5)) }].into();
        let mut f = Fixture::new(vec![gated, channel_step("b", "y")]);
        let set = PreferenceSet { channel_types: BTreeMap::from([("http".to_string(), false)]), ..Default::default() };
        f.user.preferences.insert("default".into(), set);
        let mut status = RecipientStatus::default();
        assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, Timestamp::now()), Next::Done);
        assert_eq!(status.steps[0].reason.as_deref(), Some("ConditionNotMet"));
        assert_eq!(status.steps[1].reason.as_deref(), Some("PreferenceOptOut"));
        assert_eq!(status.state, RecipientState::Skipped);
        assert_eq!(status.reason.as_deref(), Some("NothingToSend"));
    }

    #[test]
    fn every_channel_step_opted_out_is_a_preference_skip() {
        let mut f = Fixture::new(vec![channel_step("a", "x")]);
        let mut set = PreferenceSet::default();
        set.workflows.insert("wf".into(), crate::core::model::PreferenceSetting::Enabled(false));
        f.user.preferences.insert("default".into(), set);
        let mut status = RecipientStatus::default();
        advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, Timestamp::now());
        assert_eq!((status.state, status.reason.as_deref()), (RecipientState::Skipped, Some("PreferenceOptOut")));
    }

    #[test]
    fn a_render_over_budget_fails_the_step_naming_the_field() {
        let loops = "{% for a in (1..data.n) %}{% for b in (1..data.n) %}{% for c in (1..data.n) %}{% endfor %}{% endfor %}{% endfor %}";
        let until = Step { delay: Some(Delay { until: Some(format!("{loops}2030-01-01T00:00:00Z")), ..Default::default() }), ..delay_step("wait", "1s") };
        for (steps, field) in [(vec![channel_step("notify", loops)], "notify` template.body"), (vec![until], "wait` delay.until")] {
            let mut f = Fixture::new(steps);
            f.data.insert("n".into(), json!(100));
            let mut status = RecipientStatus::default();
            assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, Timestamp::now()), Next::Done);
            assert_eq!((status.state, status.reason.as_deref()), (RecipientState::Failed, Some("StepFailed")));
            assert_eq!(status.steps[0].reason.as_deref(), Some(RENDER_BUDGET_EXCEEDED));
            let message = status.steps[0].message.clone().unwrap_or_default();
            assert!(message.starts_with(&format!("step `{field}: rendering exceeded its budget of ")), "{message}");
            assert_eq!(status.message.as_deref(), Some(message.as_str()));
        }
        // Other render failures keep their reason.
        let f = Fixture::new(vec![channel_step("notify", "{{ 1 | divided_by: 0 }}")]);
        let mut status = RecipientStatus::default();
        advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, Timestamp::now());
        assert_eq!(status.steps[0].reason.as_deref(), Some("RenderFailed"));
    }

    #[test]
    fn a_missing_channel_fails_the_step() {
        let mut step = channel_step("a", "x");
        step.channel = Some("nope".into());
        let f = Fixture::new(vec![step]);
        let mut status = RecipientStatus::default();
        advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, Timestamp::now());
        assert_eq!(status.state, RecipientState::Failed);
        assert_eq!(status.steps[0].reason.as_deref(), Some("ChannelNotFound"));
    }

    #[test]
    fn preference_sets_are_ordered_by_precedence() {
        let f = Fixture::new(vec![]);
        let mut user = f.user.clone();
        let tenant_specific = PreferenceSet { channel_types: BTreeMap::from([("http".into(), true)]), ..Default::default() };
        let default = PreferenceSet { channel_types: BTreeMap::from([("http".into(), false)]), ..Default::default() };
        user.tenant_preferences.insert("acme".into(), tenant_specific.clone());
        user.preferences.insert("default".into(), default.clone());
        let tenant_defaults = PreferenceSet { channel_types: BTreeMap::from([("email".into(), false)]), ..Default::default() };
        let tenant = TenantRecord { id: "acme".into(), properties: JsonObject::new(), preference_set: Some(tenant_defaults.clone()) };
        let recipient = RecipientContext {
            key: &f.key,
            recipient_run_id: Uuid::nil(),
            user: Some(&user),
            object: None,
            trigger_data: None,
            subscription: None,
            messages: None,
            poll_batch: false,
        };
        assert_eq!(preference_sets(&recipient, Some(&tenant)), vec![&tenant_specific, &tenant_defaults, &default]);
        assert_eq!(preference_sets(&recipient, None), vec![&default]);
    }

    fn branch_step(branches: Vec<crate::resources::workflow::Branch>) -> Step {
        Step { step_ref: "route".into(), step_type: StepType::Branch, branches, ..Default::default() }
    }

    fn when(variable: &str, argument: Value) -> Conditions {
        vec![StepCondition { variable: variable.into(), operator: "equal_to".into(), argument: Some(argument) }].into()
    }

    #[test]
    fn a_branch_runs_the_first_matching_branch_and_records_it() {
        use crate::resources::workflow::Branch;
        let steps = vec![
            branch_step(vec![
                Branch { name: "urgent".into(), conditions: when("data.severity", json!("critical")), terminates: true, steps: vec![channel_step("page", "P")] },
                Branch { name: "default".into(), steps: vec![channel_step("mail", "M")], ..Default::default() },
            ]),
            channel_step("after", "A"),
        ];
        for (severity, path) in [("critical", vec!["route", "page"]), ("low", vec!["route", "mail", "after"])] {
            let mut f = Fixture::new(steps.clone());
            f.data.insert("severity".into(), json!(severity));
            let mut status = RecipientStatus::default();
            loop {
                match advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, Timestamp::now()) {
                    Next::Deliver(m) => record_delivery(&mut status, &m, &ok(), Timestamp::now()),
                    Next::Done => break,
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(status.steps.iter().map(|s| s.step_ref.as_str()).collect::<Vec<_>>(), path, "{severity}");
            assert_eq!(status.steps[0].branch.as_deref(), Some(if severity == "critical" { "urgent" } else { "default" }));
            assert_eq!(status.state, RecipientState::Completed);
        }
    }

    #[test]
    fn workflow_conditions_skip_the_recipient_before_any_step() {
        let mut f = Fixture::new(vec![channel_step("a", "x")]);
        f.conditions = Conditions::Any(crate::resources::workflow::AnyOf {
            any: vec![crate::resources::workflow::ConditionItem::Condition(StepCondition {
                variable: "recipient.plan".into(),
                operator: "equal_to".into(),
                argument: Some(json!("pro")),
            })],
        });
        let mut status = RecipientStatus::default();
        assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, Timestamp::now()), Next::Done);
        assert_eq!((status.state, status.reason.as_deref(), status.steps.len()), (RecipientState::Skipped, Some("ConditionNotMet"), 0));
        f.user.properties.insert("plan".into(), json!("pro"));
        let mut status = RecipientStatus::default();
        assert!(matches!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, Timestamp::now()), Next::Deliver(_)));
    }

    #[test]
    fn a_once_only_workflow_asks_before_its_first_step() {
        let f = Fixture::new(vec![channel_step("a", "x")]);
        let run = RunContext { trigger_frequency: TriggerFrequency::OncePerRecipient, ..f.run() };
        let mut status = RecipientStatus::default();
        let Next::CheckFrequency(check) = advance(&run, &f.recipient(None), &Channels, &mut status, false, Timestamp::now()) else { panic!("no check") };
        functions::record_frequency(&mut status, &check, Ok(true));
        assert!(matches!(advance(&run, &f.recipient(None), &Channels, &mut status, false, Timestamp::now()), Next::Deliver(_)));
    }

    #[test]
    fn a_message_outside_its_send_window_waits_for_the_opening() {
        use crate::resources::workflow::SendWindow;
        let mut step = channel_step("a", "x");
        step.send_windows = vec![SendWindow { day: "monday".into(), window_type: "send".into(), from: Some("09:00".into()), until: Some("17:00".into()) }];
        let f = Fixture::new(vec![step]);
        let monday_early: Timestamp = "2026-03-02T07:00:00Z".parse().unwrap();
        let mut status = RecipientStatus::default();
        let opening: Timestamp = "2026-03-02T09:00:00Z".parse().unwrap();
        assert_eq!(advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, monday_early), Next::WaitUntil(opening));
        assert_eq!((status.state, status.steps[0].reason.as_deref()), (RecipientState::Waiting, Some("OutsideSendWindow")));
        // At the opening the step runs from the start: one record, the delivery's.
        let Next::Deliver(m) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, opening) else { panic!("not delivered") };
        record_delivery(&mut status, &m, &ok(), opening);
        assert_eq!(status.steps.len(), 1);
        assert_eq!(status.steps[0].reason.as_deref(), Some("Delivered"));
    }

    #[test]
    fn a_window_from_the_data_waits_or_skips() {
        let step = Step { delay: Some(Delay { window_from: Some("data.until".into()), ..Default::default() }), ..delay_step("wait", "1s") };
        let now: Timestamp = "2026-03-02T10:00:00Z".parse().unwrap();
        for (value, expected) in
            [(json!("2026-03-02T11:00:00Z"), Some("Delaying")), (json!({"unit": "minutes", "value": 5}), Some("Delaying")), (json!("soon"), None), (Value::Null, None)]
        {
            let mut f = Fixture::new(vec![step.clone(), channel_step("a", "x")]);
            f.data.insert("until".into(), value.clone());
            let mut status = RecipientStatus::default();
            let next = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, now);
            match expected {
                Some(reason) => {
                    assert!(matches!(next, Next::WaitUntil(_)), "{value}");
                    assert_eq!(status.steps[0].reason.as_deref(), Some(reason));
                }
                // Missing or invalid: the step is skipped and the run goes on.
                None => {
                    assert!(matches!(next, Next::Deliver(_)), "{value}");
                    assert_eq!((status.steps[0].state, status.steps[0].reason.as_deref()), (StepState::Skipped, Some(functions::INVALID_WINDOW)));
                }
            }
        }
    }

    #[test]
    fn function_steps_become_calls() {
        use crate::resources::workflow::{BatchStep, ThrottleStep, TriggerWorkflowStep};
        let throttle = Step {
            step_ref: "limit".into(),
            step_type: StepType::Throttle,
            throttle: Some(ThrottleStep { window: Some("1h".into()), limit: 2, key: Some("{{ data.who }}".into()), ..Default::default() }),
            ..Default::default()
        };
        let batch = Step {
            step_ref: "digest".into(),
            step_type: StepType::Batch,
            batch: Some(BatchStep { window: Some("30s".into()), key: Some("{{ data.n }}".into()), ..Default::default() }),
            ..Default::default()
        };
        let trigger = Step {
            step_ref: "next".into(),
            step_type: StepType::TriggerWorkflow,
            trigger_workflow: Some(TriggerWorkflowStep { workflow: "escalation".into(), data: Some("{\"from\": \"{{ recipient.id }}\"}".into()), ..Default::default() }),
            ..Default::default()
        };
        let f = Fixture::new(vec![throttle, batch, trigger]);
        let now = Timestamp::now();
        let mut status = RecipientStatus::default();
        let Next::Throttle(call) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, now) else { panic!("no throttle") };
        assert_eq!((call.key.as_str(), call.limit, call.window), ("all", 2, functions::Window::For(jiff::SignedDuration::from_hours(1))));
        functions::record_throttle(&mut status, &call, &functions::ThrottleOutcome::Admitted, now);
        let Next::Batch(call) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, now) else { panic!("no batch") };
        assert_eq!((call.key.as_str(), call.carrier, call.render_limit), ("1", false, 10));
        functions::record_batch(&mut status, &call, &functions::BatchOutcome::Opened { closes_at: now + jiff::SignedDuration::from_secs(30) }, now);
        // The carrier wakes at the close and asks again, as the carrier.
        let later = now + jiff::SignedDuration::from_secs(31);
        let Next::Batch(call) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, later) else { panic!("no wake") };
        assert!(call.carrier);
        functions::record_batch(&mut status, &call, &functions::BatchOutcome::Closed { summary: Map::new() }, later);
        let Next::TriggerWorkflow(call) = advance(&f.run(), &f.recipient(None), &Channels, &mut status, false, later) else { panic!("no trigger") };
        assert_eq!((call.workflow.as_str(), call.data.get("from"), call.actor.as_deref()), ("escalation", Some(&json!("u1")), Some("actor")));
        let again = functions::trigger_call(&f.run(), &f.recipient(None), &f.steps[2], &json!({"data": {}, "recipient": {"id": "u1"}})).unwrap();
        assert_eq!(call.name, again.name, "the child run's name is the step's own");
    }
}
