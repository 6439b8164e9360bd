//! Batch steps: the durable state of one batch and the decisions taken when a
//! recipient run reaches the step (pure; the store is `controller::batch`).
//!
//! A batch groups the recipient runs of one workflow step that share a
//! recipient and a rendered key ([`BatchGroup`]). The first run to arrive
//! opens it and carries it: it waits until the window closes, then continues
//! with the batch's variables ([`BatchSummary`]). Later runs join as
//! activities and end. With `flushLeading` the first arrival continues at once
//! and the second one carries.
//!
//! One Kubernetes object per group (named [`BatchGroup::name`]) holds the
//! group's current batch. When a closed batch still has a carrier to continue
//! and a new run arrives, the store first copies the closed batch to an
//! archive named after its carrier ([`BatchGroup::archive_name`]) and then
//! replaces the group's object with the new batch: so there is at most one
//! open batch per group (every writer goes through the one object, with
//! optimistic concurrency), and a carrier always finds its own batch again.
//!
//! Size: a batch holds at most [`MAX_ACTIVITIES`] activities, every stored
//! string is bounded, and trigger data and actor views share a budget of
//! [`MAX_STORED_BYTES`], so a Batch object always fits etcd's request limit.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ids::{label_value, short_hash};
use super::model::JsonObject;

/// Most activities a batch holds; reaching its `maxActivities` (at most this) closes it.
pub const MAX_ACTIVITIES: u32 = 1000;
/// Most activities rendered (`renderLimit`).
pub const MAX_RENDER_LIMIT: u32 = 100;
/// The default `renderLimit`.
pub const DEFAULT_RENDER_LIMIT: u32 = 10;
/// At least this many unique actors are rendered in `actors` (more when `renderLimit` is higher).
pub const ACTORS_RENDERED: usize = 10;
/// The budget of a batch for trigger data and actor views, in bytes of JSON:
/// beyond it activities are stored without them (marked `dataOmitted`).
pub const MAX_STORED_BYTES: i64 = 256 * 1024;
/// A closed batch whose carrier has not finished it after this long is abandoned (its run is gone).
pub const ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Longest stored id or key (actor ids, cancellation keys, group parts): longer
/// ones are kept as a prefix and a hash, which still tells them apart.
const MAX_ID_BYTES: usize = 128;
/// Longest stored group key (it is also shown by kubectl).
const MAX_KEY_BYTES: usize = 256;

/// Label: the group's hash (every Batch of a group, the current one and archives).
pub const GROUP_LABEL: &str = "herald.dev/batch-group";
/// Label: the workflow key.
pub const WORKFLOW_LABEL: &str = "herald.dev/workflow";
/// Label: the batch step's ref.
pub const STEP_LABEL: &str = "herald.dev/step";
/// Label: the recipient.
pub const RECIPIENT_LABEL: &str = "herald.dev/recipient";
/// Label on archived batches (a closed batch kept for its carrier): `"true"`.
pub const ARCHIVE_LABEL: &str = "herald.dev/batch-archive";

/// `s` when it is at most `max` bytes, else its first characters, `…#` and a
/// hash of the whole: bounded, and different strings stay different.
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let hash = short_hash(s, 16);
    let keep = max.saturating_sub(hash.len() + 4);
    let mut end = keep.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…#{hash}", &s[..end])
}

/// The form a cancellation key is stored and compared in.
pub fn stored_key(key: &str) -> String {
    bounded(key, MAX_ID_BYTES)
}

/// What a batch is grouped by: the workflow, the batch step, the recipient and the rendered key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchGroup {
    /// The workflow key.
    pub workflow: String,
    /// The batch step's ref.
    pub step_ref: String,
    /// The recipient: a user id (`u1`) or `collection:id` for an object.
    pub recipient: String,
    /// The rendered batch key (empty without one). Long keys are kept as a prefix and a hash.
    pub key: String,
}

impl BatchGroup {
    /// A group; long parts are bounded (prefix and hash) so that they can be stored.
    pub fn new(workflow: &str, step_ref: &str, recipient: &str, key: &str) -> Self {
        BatchGroup {
            workflow: bounded(workflow, MAX_KEY_BYTES),
            step_ref: bounded(step_ref, MAX_ID_BYTES),
            recipient: bounded(recipient, MAX_KEY_BYTES),
            key: bounded(key, MAX_KEY_BYTES),
        }
    }

    /// 16 hex digits identifying the group (64 bits: names of different groups
    /// do not meet in practice; the store still checks the stored group).
    pub fn hash(&self) -> String {
        short_hash(&[self.workflow.as_str(), &self.step_ref, &self.recipient, &self.key].join("\u{0}"), 16)
    }

    /// The name of the group's current Batch: readable parts and the hash, a DNS-1123 subdomain.
    pub fn name(&self) -> String {
        let readable = super::ids::readable_part(&format!("{}-{}-{}", self.workflow, self.step_ref, self.recipient), 40);
        if readable.is_empty() {
            format!("batch-{}", self.hash())
        } else {
            format!("{readable}-{}", self.hash())
        }
    }

    /// The name a closed batch carried by `carrier_recipient_run_id` is archived under.
    pub fn archive_name(&self, carrier_recipient_run_id: &str) -> String {
        format!("{}-c{}", self.name(), short_hash(carrier_recipient_run_id, 16))
    }

    /// The labels of the group's Batches (label values always valid).
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (GROUP_LABEL.to_string(), self.hash()),
            (WORKFLOW_LABEL.to_string(), label_value(&self.workflow)),
            (STEP_LABEL.to_string(), label_value(&self.step_ref)),
            (RECIPIENT_LABEL.to_string(), label_value(&self.recipient)),
        ])
    }
}

/// When a batch closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchWindow {
    /// At open + the window.
    Fixed(Duration),
    /// At the last arrival + `window`, at most open + `max`.
    Sliding { window: Duration, max: Duration },
    /// At this time (a window taken from the trigger's data), fixed once open.
    Until(Timestamp),
}

/// A batch step's settings, resolved by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSettings {
    pub window: BatchWindow,
    /// 2..=1000 (clamped): reaching it closes the batch at once.
    pub max_activities: u32,
    /// 1..=100 (clamped): how many activities are rendered.
    pub render_limit: u32,
    /// `mode: flushLeading`.
    pub flush_leading: bool,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings { window: BatchWindow::Fixed(Duration::from_secs(30)), max_activities: MAX_ACTIVITIES, render_limit: DEFAULT_RENDER_LIMIT, flush_leading: false }
    }
}

/// One recipient run in a batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    /// The recipient run's id (what a re-visit is recognised by).
    pub recipient_run_id: String,
    /// Its workflow run id (the TriggerRun's uid).
    pub workflow_run_id: String,
    /// Its TriggerRun's name.
    pub trigger_run: String,
    /// The actor's id, if the trigger had an actor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    /// The actor as templates see it; kept only where it may be rendered, within the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub actor: Option<Value>,
    /// The trigger's data; kept only for the activities that may be rendered, within the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub data: Option<JsonObject>,
    /// True when the data was not stored (the batch's budget was spent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_omitted: bool,
    /// When it joined (RFC 3339); set by [`visit`].
    pub inserted_at: String,
    /// The trigger's cancellation key, in [`stored_key`] form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancellation_key: Option<String>,
}

impl Activity {
    /// True when this activity was triggered with `key`.
    pub fn has_cancellation_key(&self, key: &str) -> bool {
        self.cancellation_key.as_deref() == Some(stored_key(key).as_str())
    }
}

/// The run that carries a batch: it waits for the close and then continues.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Carrier {
    /// Its TriggerRun's name.
    pub trigger_run: String,
    /// Its recipient run id.
    pub recipient_run_id: String,
}

/// The settings a batch was opened with (a Workflow edited meanwhile does not change an open batch).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredSettings {
    /// `fixed`, `sliding` or `until`.
    pub window_type: String,
    /// The sliding window in milliseconds (what each arrival moves the close to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_millis: Option<i64>,
    /// The sliding window's cap: the batch closes at this time at the latest (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_closes_at: Option<String>,
    /// Reaching this many activities closes the batch.
    pub max_activities: i32,
    /// How many activities are rendered.
    pub render_limit: i32,
    /// The first arrival continued at once (`mode: flushLeading`).
    #[serde(default)]
    pub flush_leading: bool,
}

/// One batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchState {
    /// The batch's id: the recipient run id of its first arrival.
    pub id: String,
    /// The run that carries it (none yet for a flush-leading batch before its second arrival).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<Carrier>,
    /// The flush-leading arrival (continued at once, not an activity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leading_recipient_run_id: Option<String>,
    /// When it opened (RFC 3339).
    pub opened_at: String,
    /// When it closes (RFC 3339); moved by arrivals in a sliding window.
    pub closes_at: String,
    /// True once closed early (maxActivities) or seen closed by its carrier.
    #[serde(default)]
    pub closed: bool,
    /// The settings it was opened with.
    pub settings: StoredSettings,
    /// Activities, oldest first (the carrier's is the first).
    #[serde(default)]
    pub activities: Vec<Activity>,
    /// How many activities it holds (cancelled ones included).
    #[serde(default)]
    pub total_activities: i32,
    /// How many unique actors they have (cancelled ones included).
    #[serde(default)]
    pub total_actors: i32,
    /// Bytes of the data and actor budget used.
    #[serde(default)]
    pub stored_bytes: i64,
    /// The archive of the batch this one replaced in its group, checked so a
    /// run that joined that one and asks again is not added twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// How long after a batch opened a run that asks again is looked for in the
/// batch it replaced: a run asks again after a lost status write, within
/// moments of its first ask, which came before this batch opened.
pub const PREVIOUS_CHECKED_FOR: Duration = Duration::from_secs(600);

fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl BatchState {
    /// When it closes; an unreadable time counts as closed long ago (a stored
    /// batch must never keep its group from batching).
    pub fn closes_at(&self) -> Timestamp {
        parse_time(&self.closes_at).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    /// Closed early, or its window has passed.
    pub fn is_closed(&self, now: Timestamp) -> bool {
        self.closed || self.closes_at() <= now
    }

    /// Whether `recipient_run_id` is in this batch: its carrier, its leading arrival or an activity.
    pub fn contains(&self, recipient_run_id: &str) -> bool {
        self.carrier.as_ref().is_some_and(|c| c.recipient_run_id == recipient_run_id)
            || self.leading_recipient_run_id.as_deref() == Some(recipient_run_id)
            || self.activities.iter().any(|a| a.recipient_run_id == recipient_run_id)
    }

    /// The archive of the batch this one replaced, while a run that joined it may still ask again.
    pub fn previous_to_check(&self, now: Timestamp) -> Option<&str> {
        let opened = parse_time(&self.opened_at)?;
        self.previous.as_deref().filter(|_| now < add(opened, PREVIOUS_CHECKED_FOR))
    }

    /// Whether `recipient_run_id` carries this batch.
    pub fn is_carrier(&self, recipient_run_id: &str) -> bool {
        self.carrier.as_ref().is_some_and(|c| c.recipient_run_id == recipient_run_id)
    }

    /// Can be deleted: a flush-leading batch nobody carries once its window
    /// has passed, or a closed batch whose carrier has not finished it after
    /// [`ABANDONED_AFTER`] (its run is gone). Batches that a carrier finishes
    /// are deleted by it (`controller::batch::finish`).
    pub fn abandoned(&self, now: Timestamp) -> bool {
        let closes_at = self.closes_at();
        if self.carrier.is_none() {
            return closes_at <= now;
        }
        self.is_closed(now) && add(closes_at.min(now), ABANDONED_AFTER) <= now
    }
}

/// A recipient run reaching the batch step (or its carrier waking up).
#[derive(Clone, Debug, PartialEq)]
pub struct Visit {
    pub group: BatchGroup,
    pub settings: BatchSettings,
    /// The run's activity (`inserted_at` is set to the arrival time).
    pub activity: Activity,
    /// The cancellation keys cancelled for this workflow and recipient: their
    /// activities are left out of the summary.
    pub cancelled_keys: BTreeSet<String>,
    /// The run was told `Open` or `Wait` before (its status says it carries a
    /// batch): if the group's current batch is another one, the store looks
    /// for this run's archived batch instead of treating it as a new arrival.
    pub carrying: bool,
}

impl Visit {
    /// Whether `activity` is cancelled by one of [`Visit::cancelled_keys`].
    pub fn is_cancelled(&self, activity: &Activity) -> bool {
        activity.cancellation_key.as_ref().is_some_and(|k| self.cancelled_keys.iter().any(|c| &stored_key(c) == k))
    }
}

/// What a visiting run does.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchDecision {
    /// It opened the batch and carries it: wait until `closes_at`, then visit again.
    Open { closes_at: Timestamp },
    /// It joined the batch carried by another run, and ends (`Batched`).
    Joined {
        carrier_run: String,
        carrier_recipient_run_id: String,
        /// The batch is closed (it became full): wake the carrier now instead of at its window's end.
        wake_carrier: bool,
    },
    /// Flush-leading first arrival: continue at once, nothing batched.
    FlushLeading,
    /// The carrier is early (a sliding window moved): wait until `closes_at`, then visit again.
    Wait { closes_at: Timestamp },
    /// The carrier at or after the close: continue with these variables.
    Closed(BatchSummary),
}

/// The batch variables a carrier continues with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchSummary {
    /// Up to the render limit, oldest first: the trigger's data keys at top level plus `id`, `inserted_at`, `actor`.
    pub activities: Vec<Value>,
    /// Up to 10 unique actors (more when the render limit is higher), in order of first appearance.
    pub actors: Vec<Value>,
    pub total_activities: i64,
    pub total_actors: i64,
}

impl BatchSummary {
    /// Nothing to send: every activity was cancelled (the carrier ends, e.g. `BatchEmpty`).
    pub fn is_empty(&self) -> bool {
        self.total_activities == 0
    }

    /// The template variables: `activities`, `actors`, `total_activities`, `total_actors`.
    pub fn variables(&self) -> JsonObject {
        let mut vars = JsonObject::new();
        vars.insert("activities".into(), Value::Array(self.activities.clone()));
        vars.insert("actors".into(), Value::Array(self.actors.clone()));
        vars.insert("total_activities".into(), json!(self.total_activities));
        vars.insert("total_actors".into(), json!(self.total_actors));
        vars
    }
}

/// The batch variables of `state`, leaving out the activities `is_cancelled` names (from every count too).
pub fn summarize(state: &BatchState, is_cancelled: impl Fn(&Activity) -> bool) -> BatchSummary {
    let live: Vec<&Activity> = state.activities.iter().filter(|a| !is_cancelled(a)).collect();
    // An actor's view may be stored on any of its activities (cancelled ones too: it is the same actor).
    let mut views: HashMap<&str, &Value> = HashMap::new();
    for a in &state.activities {
        if let (Some(id), Some(view)) = (a.actor_id.as_deref(), a.actor.as_ref()) {
            views.entry(id).or_insert(view);
        }
    }
    let view_of = |a: &Activity| -> Value {
        match (a.actor.as_ref(), a.actor_id.as_deref()) {
            (Some(view), _) => view.clone(),
            (None, Some(id)) => views.get(id).map(|v| (*v).clone()).unwrap_or_else(|| json!({"id": id})),
            (None, None) => Value::Null,
        }
    };
    let render_limit = usize::try_from(state.settings.render_limit.clamp(1, MAX_RENDER_LIMIT as i32)).unwrap_or(DEFAULT_RENDER_LIMIT as usize);
    let activities = live
        .iter()
        .take(render_limit)
        .map(|a| {
            let mut item = a.data.clone().unwrap_or_default();
            item.insert("id".into(), json!(a.recipient_run_id));
            item.insert("inserted_at".into(), json!(a.inserted_at));
            item.insert("actor".into(), view_of(a));
            Value::Object(item)
        })
        .collect();
    let mut seen = HashSet::new();
    let mut actors = Vec::new();
    let actors_rendered = ACTORS_RENDERED.max(render_limit);
    for a in &live {
        if let Some(id) = a.actor_id.as_deref() {
            if seen.insert(id) && actors.len() < actors_rendered {
                actors.push(view_of(a));
            }
        }
    }
    BatchSummary { activities, actors, total_activities: live.len() as i64, total_actors: seen.len() as i64 }
}

/// A new batch opened by `visit`, the first arrival.
fn open(visit: &Visit, now: Timestamp, previous: Option<String>) -> (BatchDecision, Option<BatchState>) {
    let s = &visit.settings;
    let (window_type, window_millis, max_closes_at, closes_at) = match s.window {
        BatchWindow::Fixed(d) => ("fixed", None, None, add(now, d)),
        BatchWindow::Sliding { window, max } => {
            let cap = add(now, max);
            ("sliding", Some(millis(window)), Some(cap), add(now, window).min(cap))
        }
        BatchWindow::Until(t) => ("until", None, None, t),
    };
    let mut state = BatchState {
        id: visit.activity.recipient_run_id.clone(),
        carrier: None,
        leading_recipient_run_id: None,
        opened_at: now.to_string(),
        closes_at: closes_at.to_string(),
        closed: false,
        settings: StoredSettings {
            window_type: window_type.into(),
            window_millis,
            max_closes_at: max_closes_at.map(|t| t.to_string()),
            max_activities: s.max_activities.clamp(2, MAX_ACTIVITIES) as i32,
            render_limit: s.render_limit.clamp(1, MAX_RENDER_LIMIT) as i32,
            flush_leading: s.flush_leading,
        },
        activities: Vec::new(),
        total_activities: 0,
        total_actors: 0,
        stored_bytes: 0,
        previous,
    };
    if s.flush_leading {
        if closes_at <= now {
            // No window: nothing can join, so there is nothing to store.
            return (BatchDecision::FlushLeading, None);
        }
        state.leading_recipient_run_id = Some(visit.activity.recipient_run_id.clone());
        return (BatchDecision::FlushLeading, Some(state));
    }
    carry(visit, now, state)
}

/// `visit` becomes the carrier of `state` (accumulating, or a flush-leading batch's second arrival).
fn carry(visit: &Visit, now: Timestamp, mut state: BatchState) -> (BatchDecision, Option<BatchState>) {
    state.carrier = Some(Carrier { trigger_run: visit.activity.trigger_run.clone(), recipient_run_id: visit.activity.recipient_run_id.clone() });
    push(&mut state, visit, now);
    if state.closes_at() <= now {
        // A window that is already over (an `until` in the past, a zero window): closed at once.
        state.closed = true;
        return (BatchDecision::Closed(summarize(&state, |a| visit.is_cancelled(a))), Some(state));
    }
    (BatchDecision::Open { closes_at: state.closes_at() }, Some(state))
}

fn json_size<T: Serialize>(value: &T) -> i64 {
    serde_json::to_vec(value).map(|v| v.len() as i64).unwrap_or(i64::MAX)
}

/// Adds `visit`'s activity to `state`: bounded strings, data and actor view
/// only where they may be rendered and within the budget; moves a sliding
/// window; closes the batch when it is full.
fn push(state: &mut BatchState, visit: &Visit, now: Timestamp) {
    let input = &visit.activity;
    let index = state.activities.len();
    let render_limit = usize::try_from(state.settings.render_limit).unwrap_or(DEFAULT_RENDER_LIMIT as usize).clamp(1, MAX_RENDER_LIMIT as usize);
    // Data is kept for twice the render limit so that cancelled activities
    // leave room for later ones; actor views for twice the actors rendered.
    let keeps_data = index < 2 * render_limit;
    let actor_id = input.actor_id.as_deref().map(|id| bounded(id, MAX_ID_BYTES));
    let new_actor = actor_id.as_deref().is_some_and(|id| !state.activities.iter().any(|a| a.actor_id.as_deref() == Some(id)));
    let actors_with_views = state.activities.iter().filter(|a| a.actor.is_some()).count();
    let keeps_actor = keeps_data || (new_actor && actors_with_views < 2 * ACTORS_RENDERED.max(render_limit));

    let mut activity = Activity {
        recipient_run_id: bounded(&input.recipient_run_id, MAX_ID_BYTES),
        workflow_run_id: bounded(&input.workflow_run_id, MAX_ID_BYTES),
        trigger_run: bounded(&input.trigger_run, 253),
        actor_id: actor_id.clone(),
        actor: None,
        data: None,
        data_omitted: false,
        inserted_at: now.to_string(),
        cancellation_key: input.cancellation_key.as_deref().map(stored_key),
    };
    if let Some(view) = input.actor.as_ref().filter(|_| keeps_actor) {
        let size = json_size(view);
        if state.stored_bytes.saturating_add(size) <= MAX_STORED_BYTES {
            state.stored_bytes += size;
            activity.actor = Some(view.clone());
        }
    }
    if let Some(data) = input.data.as_ref() {
        let size = json_size(data);
        if keeps_data && state.stored_bytes.saturating_add(size) <= MAX_STORED_BYTES {
            state.stored_bytes += size;
            activity.data = Some(data.clone());
        } else {
            activity.data_omitted = true;
        }
    }
    if new_actor {
        state.total_actors = state.total_actors.saturating_add(1);
    }
    state.activities.push(activity);
    state.total_activities = state.activities.len() as i32;

    if state.settings.window_type == "sliding" && index > 0 {
        let window = Duration::from_millis(u64::try_from(state.settings.window_millis.unwrap_or(0)).unwrap_or(0));
        let cap = state.settings.max_closes_at.as_deref().and_then(parse_time).unwrap_or(Timestamp::UNIX_EPOCH);
        state.closes_at = add(now, window).min(cap).to_string();
    }
    if state.total_activities >= state.settings.max_activities.clamp(2, MAX_ACTIVITIES as i32) {
        state.closed = true;
        state.closes_at = now.to_string();
    }
}

/// What `visit` does given its group's current batch (`state`, None when
/// there is none), and the batch to write in its place (None: no write).
///
/// A carrier that restarted and visits again gets the same answer; a run
/// already in the batch is not added again. When the current batch is closed
/// the visitor opens a new one: the new state's [`BatchState::id`] differs, and
/// if the closed one has a carrier the store must archive it first
/// ([`needs_archive`]).
pub fn visit(state: Option<&BatchState>, visit: &Visit, now: Timestamp) -> (BatchDecision, Option<BatchState>) {
    let me = visit.activity.recipient_run_id.as_str();
    let Some(state) = state else { return open(visit, now, None) };
    if state.is_carrier(me) {
        if state.is_closed(now) {
            let summary = summarize(state, |a| visit.is_cancelled(a));
            let write = (!state.closed).then(|| BatchState { closed: true, ..state.clone() });
            return (BatchDecision::Closed(summary), write);
        }
        return (BatchDecision::Wait { closes_at: state.closes_at() }, None);
    }
    if state.leading_recipient_run_id.as_deref() == Some(me) {
        return (BatchDecision::FlushLeading, None);
    }
    if let (Some(carrier), true) = (&state.carrier, state.activities.iter().any(|a| a.recipient_run_id == me)) {
        return (joined(carrier, state.is_closed(now)), None);
    }
    if state.is_closed(now) {
        let previous = state.carrier.as_ref().map(|c| visit.group.archive_name(&c.recipient_run_id));
        return open(visit, now, previous);
    }
    match &state.carrier {
        None => carry(visit, now, state.clone()),
        Some(carrier) => {
            let mut next = state.clone();
            push(&mut next, visit, now);
            (joined(carrier, next.is_closed(now)), Some(next))
        }
    }
}

fn joined(carrier: &Carrier, closed: bool) -> BatchDecision {
    BatchDecision::Joined { carrier_run: carrier.trigger_run.clone(), carrier_recipient_run_id: carrier.recipient_run_id.clone(), wake_carrier: closed }
}

/// Whether writing `next` over `current` needs `current` archived first: it
/// is a different batch, and `current` has a carrier that has yet to read it.
pub fn needs_archive(current: &BatchState, next: &BatchState) -> bool {
    current.carrier.is_some() && current.id != next.id
}

/// The archived form of a closed batch: marked closed, so it reads the same whatever the time.
pub fn archived(state: &BatchState) -> BatchState {
    BatchState { closed: true, ..state.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::is_dns_subdomain;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn group() -> BatchGroup {
        BatchGroup::new("new-comment", "digest", "u1", "p1")
    }

    fn settings(window: BatchWindow) -> BatchSettings {
        BatchSettings { window, ..BatchSettings::default() }
    }

    fn fixed(secs: u64) -> BatchSettings {
        settings(BatchWindow::Fixed(Duration::from_secs(secs)))
    }

    fn arrival(n: usize, s: BatchSettings) -> Visit {
        arrival_by(n, &format!("actor-{}", n % 3), s)
    }

    fn arrival_by(n: usize, actor: &str, s: BatchSettings) -> Visit {
        let mut data = JsonObject::new();
        data.insert("n".into(), json!(n));
        Visit {
            group: group(),
            settings: s,
            activity: Activity {
                recipient_run_id: format!("rr-{n}"),
                workflow_run_id: format!("wr-{n}"),
                trigger_run: format!("run-{n}"),
                actor_id: Some(actor.into()),
                actor: Some(json!({"id": actor, "name": actor.to_uppercase()})),
                data: Some(data),
                cancellation_key: Some(format!("key-{n}")),
                ..Activity::default()
            },
            cancelled_keys: BTreeSet::new(),
            carrying: false,
        }
    }

    /// Visits in order, writing each new state; returns the decisions and the last state.
    fn run(visits: &[(Visit, Timestamp)], mut state: Option<BatchState>) -> (Vec<BatchDecision>, Option<BatchState>) {
        let mut decisions = Vec::new();
        for (v, now) in visits {
            let (d, write) = visit(state.as_ref(), v, *now);
            if write.is_some() {
                state = write;
            }
            decisions.push(d);
        }
        (decisions, state)
    }

    fn summary(d: &BatchDecision) -> &BatchSummary {
        match d {
            BatchDecision::Closed(s) => s,
            other => panic!("not closed: {other:?}"),
        }
    }

    #[test]
    fn the_first_arrival_opens_and_carries_and_later_ones_join() {
        let s = fixed(30);
        let (d, state) = run(&[(arrival(0, s), t(0)), (arrival(1, s), t(5)), (arrival(2, s), t(29))], None);
        assert_eq!(d[0], BatchDecision::Open { closes_at: t(30) });
        for j in &d[1..] {
            assert_eq!(j, &BatchDecision::Joined { carrier_run: "run-0".into(), carrier_recipient_run_id: "rr-0".into(), wake_carrier: false });
        }
        let state = state.unwrap();
        assert_eq!((state.total_activities, state.total_actors, state.closes_at(), state.id.as_str()), (3, 3, t(30), "rr-0"));
        // The carrier early waits; at the close it continues with the batch, oldest first.
        let (early, write) = visit(Some(&state), &arrival(0, s), t(10));
        assert_eq!((early, write), (BatchDecision::Wait { closes_at: t(30) }, None));
        let (closed, write) = visit(Some(&state), &arrival(0, s), t(30));
        let sum = summary(&closed);
        assert_eq!(sum.total_activities, 3);
        assert_eq!(sum.total_actors, 3);
        let ids: Vec<&str> = sum.activities.iter().map(|a| a["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["rr-0", "rr-1", "rr-2"]);
        assert_eq!(sum.activities[1]["n"], json!(1), "data keys at top level");
        assert_eq!(sum.activities[1]["actor"], json!({"id": "actor-1", "name": "ACTOR-1"}));
        assert_eq!(sum.activities[1]["inserted_at"], json!(t(5).to_string()));
        assert!(write.as_ref().unwrap().closed, "the close is recorded");
        // Asking again (a restart) gives the same summary, with no write.
        let (again, write) = visit(write.as_ref(), &arrival(0, s), t(400));
        assert_eq!((summary(&again), write), (sum, None));
        let vars = sum.variables();
        assert_eq!(vars["total_activities"], json!(3));
        assert_eq!(vars["actors"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn a_run_that_asks_again_is_not_added_twice() {
        let s = fixed(30);
        let (_, state) = run(&[(arrival(0, s), t(0)), (arrival(1, s), t(1))], None);
        let state = state.unwrap();
        let (d, write) = visit(Some(&state), &arrival(1, s), t(2));
        assert!(matches!(d, BatchDecision::Joined { .. }) && write.is_none(), "{d:?}");
        // The opener asking again before the close waits (it is still the carrier).
        let (d, write) = visit(Some(&state), &arrival(0, s), t(2));
        assert_eq!((d, write), (BatchDecision::Wait { closes_at: t(30) }, None));
        // A joiner asking after the close is still told it joined (and that the carrier may go).
        let (d, _) = visit(Some(&state), &arrival(1, s), t(31));
        assert!(matches!(d, BatchDecision::Joined { wake_carrier: true, .. }), "{d:?}");
    }

    #[test]
    fn render_limit_and_actor_limit() {
        let s = BatchSettings { render_limit: 3, ..fixed(30) };
        let visits: Vec<_> = (0..25).map(|n| (arrival_by(n, &format!("a{n}"), s), t(n as i64))).collect();
        let (_, state) = run(&visits, None);
        let state = state.unwrap();
        let sum = summarize(&state, |_| false);
        assert_eq!((sum.total_activities, sum.total_actors, sum.activities.len(), sum.actors.len()), (25, 25, 3, 10));
        assert_eq!(sum.actors[9]["id"], json!("a9"));
        // Data is stored only where it may be rendered (twice the limit, for cancellations).
        assert_eq!(state.activities.iter().filter(|a| a.data.is_some()).count(), 6);
        let raised = BatchSettings { render_limit: 15, ..fixed(30) };
        let visits: Vec<_> = (0..25).map(|n| (arrival_by(n, &format!("a{n}"), raised), t(n as i64))).collect();
        let sum = summarize(&run(&visits, None).1.unwrap(), |_| false);
        assert_eq!((sum.activities.len(), sum.actors.len()), (15, 15), "actors follow a raised render limit");
        // Settings are clamped.
        let wild = BatchSettings { render_limit: 1000, max_activities: 1, ..fixed(30) };
        let st = run(&[(arrival(0, wild), t(0))], None).1.unwrap();
        assert_eq!((st.settings.render_limit, st.settings.max_activities), (100, 2));
    }

    #[test]
    fn actors_are_unique_and_counted() {
        let s = fixed(30);
        let visits: Vec<_> = ["bob", "ann", "bob", "cy", "ann"].iter().enumerate().map(|(n, a)| (arrival_by(n, a, s), t(n as i64))).collect();
        let (_, state) = run(&visits, None);
        let sum = summarize(&state.unwrap(), |_| false);
        let names: Vec<&str> = sum.actors.iter().map(|a| a["id"].as_str().unwrap()).collect();
        assert_eq!(names, ["bob", "ann", "cy"]);
        assert_eq!((sum.total_actors, sum.total_activities), (3, 5));
    }

    #[test]
    fn fixed_windows_do_not_move() {
        let s = fixed(30);
        let (_, state) = run(&[(arrival(0, s), t(0)), (arrival(1, s), t(20)), (arrival(2, s), t(29))], None);
        assert_eq!(state.unwrap().closes_at(), t(30));
    }

    #[test]
    fn sliding_windows_move_with_each_arrival_up_to_the_cap() {
        let s = settings(BatchWindow::Sliding { window: Duration::from_secs(30), max: Duration::from_secs(60) });
        let (d, state) = run(&[(arrival(0, s), t(0))], None);
        assert_eq!(d[0], BatchDecision::Open { closes_at: t(30) });
        let (_, state) = run(&[(arrival(1, s), t(25))], state);
        assert_eq!(state.as_ref().unwrap().closes_at(), t(55));
        // The carrier waking at its first close time waits for the moved one.
        let (d, _) = visit(state.as_ref(), &arrival(0, s), t(30));
        assert_eq!(d, BatchDecision::Wait { closes_at: t(55) });
        let (_, state) = run(&[(arrival(2, s), t(50))], state);
        assert_eq!(state.as_ref().unwrap().closes_at(), t(60), "capped at open + maxWindow");
        // Past the cap the batch is closed: an arrival opens a new one.
        let (d, next) = visit(state.as_ref(), &arrival(3, s), t(61));
        assert_eq!(d, BatchDecision::Open { closes_at: t(91) });
        let next = next.unwrap();
        assert_eq!((next.id.as_str(), next.previous.clone()), ("rr-3", Some(group().archive_name("rr-0"))));
        assert!(needs_archive(state.as_ref().unwrap(), &next));
        // A cap shorter than the window closes the batch at the cap.
        let short = settings(BatchWindow::Sliding { window: Duration::from_secs(30), max: Duration::from_secs(10) });
        assert_eq!(visit(None, &arrival(0, short), t(0)).0, BatchDecision::Open { closes_at: t(10) });
    }

    #[test]
    fn a_window_from_data_is_fixed_once_open() {
        let s = settings(BatchWindow::Until(t(100)));
        let (d, state) = run(&[(arrival(0, s), t(0))], None);
        assert_eq!(d[0], BatchDecision::Open { closes_at: t(100) });
        let later = settings(BatchWindow::Until(t(500)));
        let (_, state) = run(&[(arrival(1, later), t(10))], state);
        assert_eq!(state.unwrap().closes_at(), t(100));
        // A time already passed closes the batch at once: the opener continues alone.
        let past = settings(BatchWindow::Until(t(-5)));
        let (d, write) = visit(None, &arrival(0, past), t(0));
        assert_eq!(summary(&d).total_activities, 1);
        assert!(write.unwrap().closed);
    }

    #[test]
    fn max_activities_closes_the_batch_at_once() {
        let s = BatchSettings { max_activities: 3, ..fixed(300) };
        let (d, state) = run(&[(arrival(0, s), t(0)), (arrival(1, s), t(1)), (arrival(2, s), t(2))], None);
        assert!(matches!(d[1], BatchDecision::Joined { wake_carrier: false, .. }));
        assert!(matches!(d[2], BatchDecision::Joined { wake_carrier: true, .. }), "the last joiner wakes the carrier: {:?}", d[2]);
        let state = state.unwrap();
        assert!(state.closed && state.closes_at() == t(2));
        // The carrier continues now; the next arrival starts a new batch.
        assert_eq!(summary(&visit(Some(&state), &arrival(0, s), t(2)).0).total_activities, 3);
        assert_eq!(visit(Some(&state), &arrival(3, s), t(3)).0, BatchDecision::Open { closes_at: t(303) });
    }

    #[test]
    fn an_arrival_after_the_close_opens_a_new_batch() {
        let s = fixed(30);
        let (_, state) = run(&[(arrival(0, s), t(0)), (arrival(1, s), t(1))], None);
        let old = state.unwrap();
        // Closed by time even though the carrier has not woken yet.
        let (d, new) = visit(Some(&old), &arrival(2, s), t(30));
        assert_eq!(d, BatchDecision::Open { closes_at: t(60) });
        let new = new.unwrap();
        assert!(needs_archive(&old, &new));
        assert_eq!(new.carrier.as_ref().unwrap().recipient_run_id, "rr-2");
        // The old carrier reads its batch from the archive: closed, whatever the time.
        let archive = archived(&old);
        let (d, write) = visit(Some(&archive), &arrival(0, s), t(0));
        assert_eq!(summary(&d).total_activities, 2);
        assert!(write.is_none());
    }

    #[test]
    fn flush_leading_continues_the_first_and_carries_the_second() {
        let s = BatchSettings { flush_leading: true, ..fixed(30) };
        let (d, state) = run(&[(arrival(0, s), t(0))], None);
        assert_eq!(d[0], BatchDecision::FlushLeading);
        let st = state.clone().unwrap();
        assert_eq!((st.carrier.as_ref(), st.total_activities, st.leading_recipient_run_id.as_deref()), (None, 0, Some("rr-0")));
        // The leading run asking again still continues, and is not made the carrier.
        assert_eq!(visit(Some(&st), &arrival(0, s), t(1)), (BatchDecision::FlushLeading, None));
        let (d, state) = run(&[(arrival(1, s), t(5)), (arrival(2, s), t(6))], state);
        assert_eq!(d[0], BatchDecision::Open { closes_at: t(30) }, "the second arrival carries until the first one's window ends");
        assert!(matches!(&d[1], BatchDecision::Joined { carrier_recipient_run_id, .. } if carrier_recipient_run_id == "rr-1"));
        let sum = summary(&visit(state.as_ref(), &arrival(1, s), t(30)).0).clone();
        let ids: Vec<&str> = sum.activities.iter().map(|a| a["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["rr-1", "rr-2"], "the leading arrival is not an activity");
        // With no second arrival the close does nothing: the batch is abandoned, and the next arrival leads again.
        assert!(st.abandoned(t(30)) && !st.abandoned(t(29)));
        assert_eq!(visit(Some(&st), &arrival(5, s), t(31)).0, BatchDecision::FlushLeading);
        assert!(!needs_archive(&st, &visit(Some(&st), &arrival(5, s), t(31)).1.unwrap()));
    }

    #[test]
    fn cancelled_activities_leave_the_summary_but_not_the_window() {
        let s = BatchSettings { render_limit: 2, ..fixed(30) };
        let visits: Vec<_> = (0..4).map(|n| (arrival_by(n, &format!("a{}", n % 2), s), t(n as i64))).collect();
        let state = run(&visits, None).1.unwrap();
        let mut carrier = arrival(0, s);
        carrier.cancelled_keys = BTreeSet::from(["key-1".to_string(), "key-3".to_string()]);
        // Cancelling does not close the window, not even the opener's.
        assert_eq!(visit(Some(&state), &carrier, t(10)).0, BatchDecision::Wait { closes_at: t(30) });
        let (d, _) = visit(Some(&state), &carrier, t(30));
        let sum = summary(&d);
        let ids: Vec<&str> = sum.activities.iter().map(|a| a["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["rr-0", "rr-2"], "a cancelled activity's place goes to the next one, which still has its data");
        assert_eq!(sum.activities[1]["n"], json!(2));
        assert_eq!((sum.total_activities, sum.total_actors), (2, 1), "a1 only acted in cancelled activities");
        // Every activity cancelled: nothing to send.
        let all = summarize(&state, |_| true);
        assert!(all.is_empty() && all.actors.is_empty() && all.total_actors == 0);
        // The carrier's own cancellation removes its activity too.
        carrier.cancelled_keys = BTreeSet::from(["key-0".to_string()]);
        assert_eq!(summary(&visit(Some(&state), &carrier, t(30)).0).activities[0]["id"], json!("rr-1"));
    }

    #[test]
    fn long_cancellation_keys_are_compared_in_stored_form() {
        let long = "k".repeat(5000);
        let mut v = arrival(0, fixed(30));
        v.activity.cancellation_key = Some(long.clone());
        let state = visit(None, &v, t(0)).1.unwrap();
        let stored = &state.activities[0];
        assert!(stored.cancellation_key.as_ref().unwrap().len() <= MAX_ID_BYTES);
        assert!(stored.has_cancellation_key(&long) && !stored.has_cancellation_key(&"k".repeat(4999)));
        v.cancelled_keys = BTreeSet::from([long]);
        assert!(v.is_cancelled(stored));
    }

    #[test]
    fn names_are_dns_subdomains_distinct_per_group() {
        let g = group();
        assert!(g.name().starts_with("new-comment-digest-u1-"), "{}", g.name());
        let odd = BatchGroup::new("Wf_X", "Step.1", "projects:P 1", &"{".repeat(2000));
        for name in [g.name(), odd.name(), g.archive_name("rr-0"), BatchGroup::new("", "", "", "").name(), BatchGroup::new(&"w".repeat(300), "s", "r", "").name()] {
            assert!(is_dns_subdomain(&name) && name.len() <= 63 + 18, "{name}");
        }
        assert_ne!(g.name(), BatchGroup::new("new-comment", "digest", "u1", "p2").name(), "the key is part of the name");
        assert_ne!(BatchGroup::new("a", "b-c", "d", "").name(), BatchGroup::new("a-b", "c", "d", "").name());
        assert_ne!(g.archive_name("rr-0"), g.archive_name("rr-1"));
        assert!(odd.key.len() <= MAX_KEY_BYTES);
        for (k, v) in odd.labels() {
            assert!(v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)), "{k}={v}");
        }
        assert_eq!(g.labels()[GROUP_LABEL], g.hash());
    }

    #[test]
    fn a_full_batch_always_fits_etcd() {
        // Every field as large as a trigger can make it; 100 rendered activities with large data.
        let s = BatchSettings { render_limit: 100, max_activities: 1000, ..fixed(30) };
        let big = "x".repeat(100_000);
        let mut state = None;
        for n in 0..1000 {
            let mut v = arrival_by(n, &format!("{n}{}", "a".repeat(10_000)), s);
            v.group = BatchGroup::new(&"w".repeat(10_000), &"s".repeat(10_000), &"r".repeat(10_000), &"k".repeat(10_000));
            v.activity.trigger_run = "t".repeat(253);
            v.activity.recipient_run_id = format!("{n}-{}", "0".repeat(1000));
            v.activity.cancellation_key = Some("c".repeat(10_000));
            v.activity.actor = Some(json!({"name": big}));
            v.activity.data.as_mut().unwrap().insert("big".into(), json!(big[..20_000]));
            let (_, write) = visit(state.as_ref(), &v, t(0));
            state = write;
        }
        let state = state.unwrap();
        assert_eq!(state.total_activities, 1000);
        assert!(state.closed, "maxActivities reached");
        assert!(state.stored_bytes <= MAX_STORED_BYTES);
        assert!(state.activities.iter().any(|a| a.data_omitted));
        let spec = json!({"group": BatchGroup::new(&"w".repeat(10_000), &"s".repeat(10_000), &"r".repeat(10_000), &"k".repeat(10_000)), "state": state});
        let size = serde_json::to_vec(&spec).unwrap().len();
        assert!(size < 1_200_000, "a full batch is {size} bytes");
        // Activities without stored data still render (without the data keys).
        let sum = summarize(&state, |_| false);
        assert_eq!(sum.activities.len(), 100);
        assert!(sum.activities.iter().all(|a| a.get("id").is_some()));
    }

    #[test]
    fn unreadable_times_do_not_wedge_a_group() {
        let s = fixed(30);
        let mut state = visit(None, &arrival(0, s), t(0)).1.unwrap();
        state.closes_at = "not a time".into();
        assert!(state.is_closed(t(0)));
        assert_eq!(visit(Some(&state), &arrival(1, s), t(1)).0, BatchDecision::Open { closes_at: t(31) });
    }

    #[test]
    fn a_replaced_batch_is_checked_for_runs_asking_again_for_a_while() {
        let s = fixed(30);
        let old = visit(None, &arrival(0, s), t(0)).1.unwrap();
        let new = visit(Some(&old), &arrival(1, s), t(30)).1.unwrap();
        let archive = group().archive_name("rr-0");
        assert_eq!(new.previous_to_check(t(31)), Some(archive.as_str()));
        assert_eq!(new.previous_to_check(t(30 + PREVIOUS_CHECKED_FOR.as_secs() as i64)), None);
        assert_eq!(old.previous_to_check(t(1)), None);
    }

    #[test]
    fn abandoned_batches() {
        let s = fixed(30);
        let state = visit(None, &arrival(0, s), t(0)).1.unwrap();
        assert!(!state.abandoned(t(31)), "its carrier may still come for it");
        let day = ABANDONED_AFTER.as_secs() as i64;
        assert!(!state.abandoned(t(30 + day - 1)));
        assert!(state.abandoned(t(30 + day)));
    }
}
