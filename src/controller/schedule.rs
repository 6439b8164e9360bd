//! The Schedule reconciler (leader only): for each recipient, asks
//! `core::schedule` what is due, creates the TriggerRun of a due occurrence
//! under a name derived from (schedule uid, recipient, occurrence), writes
//! status, and comes back at the next occurrence.
//!
//! Exactly once: two replicas, a restart between the create and the status
//! write, or a retry all derive the same run name, and the Kubernetes API
//! stores one object per name; AlreadyExists means the occurrence has fired.

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};

use super::{conditions, directory, Context, Error, MANAGER};
use crate::core::ids;
use crate::core::model::{parse_recipient, RecipientInput, RecipientKey};
use crate::core::schedule::{self as rules, Plan};
use crate::resources::schedule::{
    RecipientSchedule, Schedule, ScheduleRef, ScheduleSpec, ScheduleStatus, ScheduledRun, DEFAULT_CATCH_UP_SECONDS, MAX_LAST_RUNS, MAX_RECIPIENTS, OCCURRENCE_ANNOTATION,
    SCHEDULE_LABEL,
};
use crate::resources::{TriggerRun, TriggerRunSpec};

/// How often a waiting Schedule looks again even when nothing is due
/// (recipients' time zones and the Workflow may change meanwhile).
pub const RECHECK: Duration = Duration::from_secs(300);
/// How soon a Schedule whose Workflow is missing or inactive looks again.
pub const WORKFLOW_RECHECK: Duration = Duration::from_secs(15);
/// The value of `app.kubernetes.io/created-by` on scheduled runs.
pub const CREATED_BY: &str = "herald-schedule";

/// A Schedule's spec, checked.
pub struct Checked {
    pub plan: Plan,
    pub recipients: Vec<RecipientKey>,
    pub catch_up: SignedDuration,
}

/// Checks a spec; the error names the field. `created` is the Schedule's creation time.
pub fn check(spec: &ScheduleSpec, created: Timestamp) -> Result<Checked, String> {
    if spec.workflow.is_empty() {
        return Err("workflow: must not be empty".into());
    }
    if spec.recipients.is_empty() {
        return Err("recipients: at least one is needed".into());
    }
    if spec.recipients.len() > MAX_RECIPIENTS {
        return Err(format!("recipients: {} listed; at most {MAX_RECIPIENTS}", spec.recipients.len()));
    }
    let mut recipients = Vec::new();
    for (i, value) in spec.recipients.iter().enumerate() {
        match parse_recipient(value) {
            Ok(RecipientInput::Reference(key)) if !recipients.contains(&key) => recipients.push(key),
            Ok(RecipientInput::Reference(_)) => return Err(format!("recipients[{i}]: listed twice")),
            Ok(RecipientInput::Inline(_)) => {
                return Err(format!("recipients[{i}]: a schedule names recipients by reference (a user id or {{id, collection}}); identify them first"))
            }
            Err(e) => return Err(format!("recipients[{i}]: {e}")),
        }
    }
    if let Some(actor) = &spec.actor {
        match parse_recipient(actor) {
            Ok(RecipientInput::Reference(_)) => {}
            Ok(RecipientInput::Inline(_)) => return Err("actor: a schedule names its actor by reference (a user id or {id, collection})".into()),
            Err(e) => return Err(format!("actor: {e}")),
        }
    }
    let catch_up = spec.catch_up_seconds.unwrap_or(DEFAULT_CATCH_UP_SECONDS);
    if !(0..=604_800).contains(&catch_up) {
        return Err(format!("catchUpSeconds: must be 0 to 604800, not {catch_up}"));
    }
    let plan = Plan::new(&spec.repeats, spec.scheduled_at.as_ref().map(|t| t.0), spec.ending_at.as_ref().map(|t| t.0), created)?;
    Ok(Checked { plan, recipients, catch_up: SignedDuration::from_secs(catch_up) })
}

/// A recipient as status and the API name it: a user id, or `collection/id`.
pub fn recipient_label(key: &RecipientKey) -> String {
    match key {
        RecipientKey::User(id) => id.clone(),
        RecipientKey::Object { collection, id } => format!("{collection}/{id}"),
    }
}

/// A recipient reference as a run's spec lists it.
pub fn recipient_reference(key: &RecipientKey) -> Value {
    match key {
        RecipientKey::User(id) => json!(id),
        RecipientKey::Object { collection, id } => json!({"id": id, "collection": collection}),
    }
}

/// The recipient's `timezone` (a User's field, an Object's property), from the watch caches.
pub fn recipient_timezone(ctx: &Context, namespace: &str, key: &RecipientKey) -> Option<String> {
    match key {
        RecipientKey::User(id) => directory::user(&ctx.stores, namespace, id).and_then(|u| u.properties.get("timezone").and_then(Value::as_str).map(str::to_string)),
        RecipientKey::Object { collection, id } => {
            directory::object(&ctx.stores, namespace, collection, id).and_then(|o| o.properties.get("timezone").and_then(Value::as_str).map(str::to_string))
        }
    }
}

/// The zone of a recipient: its own, the namespace default, UTC.
pub fn zone_of(ctx: &Context, namespace: &str, key: &RecipientKey) -> (TimeZone, String) {
    let own = recipient_timezone(ctx, namespace, key);
    rules::zone_for(own.as_deref(), ctx.settings.default_timezone(namespace))
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

/// Creates the run of one occurrence; true when this call created it, false
/// when it existed (fired before, by this replica or another).
async fn fire(ctx: &Context, schedule: &Schedule, namespace: &str, key: &RecipientKey, id: &str, occurrence: Timestamp, next: Option<Timestamp>) -> Result<(String, bool), Error> {
    let spec = &schedule.spec;
    let schedule_name = schedule.name_any();
    let uid = schedule.uid().unwrap_or_default();
    let name = rules::run_name(&schedule_name, &uid, &key.canonical(), occurrence);
    let mut run = TriggerRun::new(
        &name,
        TriggerRunSpec {
            workflow: spec.workflow.clone(),
            actor: spec.actor.clone(),
            recipients: vec![recipient_reference(key)],
            data: Some(spec.data.clone().unwrap_or_default()),
            tenant: spec.tenant.clone().map(Value::String),
            schedule: Some(ScheduleRef {
                id: id.to_string(),
                name: schedule_name.clone(),
                last_occurrence_at: occurrence.to_string(),
                next_occurrence_at: next.map(|n| n.to_string()),
            }),
            ..Default::default()
        },
    );
    run.metadata.labels = Some([(SCHEDULE_LABEL.to_string(), ids::label_value(&schedule_name)), ("app.kubernetes.io/created-by".to_string(), CREATED_BY.to_string())].into());
    run.metadata.annotations = Some([(OCCURRENCE_ANNOTATION.to_string(), occurrence.to_string())].into());
    let api: Api<TriggerRun> = Api::namespaced(ctx.client.clone(), namespace);
    let pp = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    if !ctx.fence.holds() {
        return Err(Error::Fenced);
    }
    match api.create(&pp, &run).await {
        Ok(_) => {
            ctx.metrics.write("TriggerRun");
            tracing::info!(schedule = %schedule_name, %namespace, run = %name, recipient = %recipient_label(key), %occurrence, "scheduled occurrence fired");
            Ok((name, true))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok((name, false)),
        Err(e) => Err(e.into()),
    }
}

pub async fn reconcile(schedule: Arc<Schedule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = schedule.namespace().ok_or(Error::MissingMetadata)?;
    if schedule.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let generation = schedule.metadata.generation;
    let current = schedule.status.clone().unwrap_or_default();
    let mut status = ScheduleStatus { observed_generation: generation, conditions: current.conditions.clone(), last_runs: current.last_runs.clone(), ..Default::default() };
    let created = schedule.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or_else(|| ctx.settings.schedule_now());
    let checked = match check(&schedule.spec, created) {
        Ok(c) => c,
        Err(message) => {
            status.recipients = current.recipients.clone();
            conditions::set(&mut status.conditions, "Ready", conditions::FALSE, "InvalidSpec", &message, generation);
            write_status(&ctx, &schedule, &namespace, &current, &status).await?;
            return Ok(Action::await_change());
        }
    };
    let workflow = super::workflow::find_by_key(&ctx, &namespace, &schedule.spec.workflow);
    let blocked = match &workflow {
        None => Some(("WorkflowNotFound", format!("no Workflow with key `{}` in this namespace; occurrences wait (within the catch-up window)", schedule.spec.workflow))),
        Some(w) if !w.spec.active => Some(("WorkflowInactive", format!("Workflow `{}` is inactive; occurrences wait (within the catch-up window)", schedule.spec.workflow))),
        Some(_) => None,
    };

    let now = ctx.settings.schedule_now();
    let uid = schedule.uid().unwrap_or_default();
    let mut fired_runs: Vec<ScheduledRun> = Vec::new();
    let mut skipped_total = 0i64;
    for key in &checked.recipients {
        let label = recipient_label(key);
        let previous = current.recipients.iter().find(|r| r.recipient == label).cloned().unwrap_or_default();
        let (zone, zone_name) = zone_of(&ctx, &namespace, key);
        let id = rules::schedule_id(&uid, &key.canonical());
        let mut entry = RecipientSchedule { recipient: label.clone(), id: id.clone(), timezone: zone_name, ..previous.clone() };
        let through = [previous.last_occurrence_at.as_ref(), previous.last_skipped_at.as_ref()].into_iter().flatten().map(|t| t.0).max();
        if blocked.is_some() {
            // Nothing fires; nothing is passed over either: within the catch-up window it still can.
            entry.next_occurrence_at =
                rules::due(&checked.plan, &zone, through, now, checked.catch_up).next.or_else(|| checked.plan.next_after(through.unwrap_or(now), &zone)).map(time);
            status.recipients.push(entry);
            continue;
        }
        let due = rules::due(&checked.plan, &zone, through, now, checked.catch_up);
        if let Some(occurrence) = due.fire {
            let next = checked.plan.next_after(occurrence, &zone);
            let (name, _created) = fire(&ctx, &schedule, &namespace, key, &id, occurrence, next).await?;
            entry.last_occurrence_at = Some(time(occurrence));
            fired_runs.push(ScheduledRun { name, recipient: label.clone(), occurrence_at: time(occurrence) });
        }
        if due.skipped > 0 {
            entry.skipped_occurrences += due.skipped as i64;
            entry.last_skipped_at = due.last_skipped.map(time);
            skipped_total += due.skipped as i64;
        }
        entry.next_occurrence_at = due.next.map(time);
        status.recipients.push(entry);
    }

    status.next_occurrence_at = status.recipients.iter().filter_map(|r| r.next_occurrence_at.as_ref().map(|t| t.0)).min().map(time);
    status.last_occurrence_at = status.recipients.iter().filter_map(|r| r.last_occurrence_at.as_ref().map(|t| t.0)).max().map(time);
    for run in fired_runs.into_iter().rev() {
        status.last_runs.retain(|r| r.name != run.name);
        status.last_runs.insert(0, run);
    }
    status.last_runs.truncate(MAX_LAST_RUNS);
    match (&blocked, &status.next_occurrence_at) {
        (Some((reason, message)), _) => conditions::set(&mut status.conditions, "Ready", conditions::FALSE, reason, message, generation),
        (None, Some(next)) => conditions::set(&mut status.conditions, "Ready", conditions::TRUE, "Scheduled", &format!("next occurrence at {}", next.0), generation),
        (None, None) => conditions::set(&mut status.conditions, "Ready", conditions::TRUE, "Ended", "no occurrences are left", generation),
    }
    if skipped_total > 0 {
        let note = format!("{skipped_total} occurrence(s) were missed by more than the catch-up window ({}s) and skipped", checked.catch_up.as_secs());
        tracing::warn!(schedule = %schedule.name_any(), %namespace, skipped = skipped_total, "scheduled occurrences skipped");
        let event = Event { type_: EventType::Warning, reason: "OccurrencesSkipped".into(), note: Some(note), action: "Schedule".into(), secondary: None };
        if let Err(e) = ctx.recorder.publish(&event, &schedule.object_ref(&())).await {
            tracing::debug!(error = %e, "could not publish an OccurrencesSkipped event");
        }
    }
    write_status(&ctx, &schedule, &namespace, &current, &status).await?;

    if blocked.is_some() {
        return Ok(Action::requeue(WORKFLOW_RECHECK));
    }
    Ok(match status.next_occurrence_at {
        Some(next) => {
            let wait = match ctx.settings.schedule_clock {
                Some(clock) => clock.real_until(next.0),
                None => Duration::try_from(next.0.duration_since(Timestamp::now())).unwrap_or_default(),
            };
            // A little after the occurrence, never before it.
            Action::requeue((wait + Duration::from_millis(10)).min(RECHECK))
        }
        None => Action::await_change(),
    })
}

async fn write_status(ctx: &Context, schedule: &Schedule, namespace: &str, current: &ScheduleStatus, status: &ScheduleStatus) -> Result<(), Error> {
    if status == current {
        return Ok(());
    }
    if !ctx.fence.holds() {
        return Err(Error::Fenced);
    }
    let api: Api<Schedule> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Schedule", "status": status});
    api.patch_status(&schedule.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.metrics.write("Schedule");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::schedule::RepeatRule;

    fn spec(v: Value) -> ScheduleSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn specs_are_checked() {
        let created: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let ok =
            check(&spec(json!({"workflow": "w", "recipients": ["u1", {"id": "p1", "collection": "projects"}], "repeats": [{"frequency": "daily", "hours": 9}]})), created).unwrap();
        assert_eq!(ok.recipients, vec![RecipientKey::user("u1"), RecipientKey::object("projects", "p1")]);
        assert_eq!(ok.catch_up, SignedDuration::from_hours(1));
        let bad = [
            (json!({"workflow": "w", "recipients": [], "scheduledAt": "2026-03-02T00:00:00Z"}), "recipients"),
            (json!({"workflow": "w", "recipients": ["u1", "u1"], "scheduledAt": "2026-03-02T00:00:00Z"}), "recipients[1]"),
            (json!({"workflow": "w", "recipients": [{"id": "u1", "email": "a@b"}], "scheduledAt": "2026-03-02T00:00:00Z"}), "recipients[0]"),
            (json!({"workflow": "w", "recipients": ["u1"]}), "scheduledAt"),
            (json!({"workflow": "w", "recipients": ["u1"], "repeats": [{"frequency": "daily", "hours": 25}]}), "repeats[0]"),
            (json!({"workflow": "w", "recipients": ["u1"], "scheduledAt": "2026-03-02T00:00:00Z", "catchUpSeconds": -1}), "catchUpSeconds"),
            (json!({"workflow": "w", "recipients": ["u1"], "scheduledAt": "2026-03-02T00:00:00Z", "actor": {"id": "a", "name": "x"}}), "actor"),
        ];
        for (value, field) in bad {
            let error = check(&spec(value.clone()), created).err().unwrap_or_else(|| panic!("{value} passed"));
            assert!(error.contains(field), "{value}: {error}");
        }
        let _ = RepeatRule::default();
    }
}
