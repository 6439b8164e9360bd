//! Run and recipient states, and the per-recipient status shapes: plain data
//! that the core plans and the resources store. Also where a run keeps its
//! recipients' records (inline in the run when it is small, else in pages),
//! and how they are compacted when saved, so that a page always fits etcd's
//! request limit.

use std::ops::Range;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The state of a whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RunState {
    #[default]
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn is_finished(self) -> bool {
        matches!(self, RunState::Completed | RunState::Failed | RunState::Cancelled)
    }
}

/// Recipient counts by state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipientTotals {
    /// Recipients in the run, after expansion.
    pub recipients: i64,
    /// Recipients not started yet.
    pub queued: i64,
    /// Recipients being processed.
    pub running: i64,
    /// Recipients waiting on a delay.
    pub waiting: i64,
    /// Recipients that went through every step.
    pub completed: i64,
    /// Recipients for whom nothing was sent (preferences or conditions).
    pub skipped: i64,
    /// Recipients stopped by a cancellation.
    pub cancelled: i64,
    /// Recipients that failed (not found, delivery or template errors).
    pub failed: i64,
    /// Recipients whose run joined another run's batch.
    #[serde(default)]
    pub batched: i64,
    /// Recipients stopped by a throttle step.
    #[serde(default)]
    pub throttled: i64,
}

/// One recipient's workflow run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipientStatus {
    /// The recipient's id: a user id, or an object's id (with `collection`).
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
    /// Delays: when the recipient resumes (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<String>,
    /// The outcome of each step reached so far, in the order they ran (a branch's
    /// steps follow the branch step that took it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepStatus>,
    /// What earlier steps added for later ones: `data` merged by fetch steps, and a
    /// closed batch's `activities`, `actors`, `total_activities` and `total_actors`
    /// (at most 32 KiB as stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
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
    /// Joined another run's batch, which sends for it.
    Batched,
    /// Stopped by a throttle step.
    Throttled,
}

impl RecipientState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RecipientState::Completed | RecipientState::Skipped | RecipientState::Cancelled | RecipientState::Failed | RecipientState::Batched | RecipientState::Throttled
        )
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
    /// Why (CamelCase): PreferenceOptOut, ConditionNotMet, Delivered, DeliveryFailed, RenderFailed, RenderBudgetExceeded, ...
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
    /// When the outcome was recorded (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The attempts of a delivery that needed more than one or failed, in
    /// order (a first-time success is the step itself: statusCode, time):
    /// the first and the last ones, when there were many.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempt_history: Vec<AttemptRecord>,
    /// Attempts left out of attemptHistory (those between the first and the
    /// last listed), so that the page stays small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omitted_attempts: Option<i32>,
    /// Branch steps: the branch taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Trigger-workflow steps: the TriggerRun started; batch steps: the run that carries the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

/// One delivery attempt.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    /// The attempt's number, from 1.
    pub attempt: i32,
    /// When it started (RFC 3339).
    pub time: String,
    /// The receiver's HTTP status code, if it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
    /// What went wrong, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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

impl RecipientStatus {
    /// The recipient's key.
    pub fn key(&self) -> crate::core::model::RecipientKey {
        match &self.collection {
            Some(collection) => crate::core::model::RecipientKey::object(collection.clone(), self.recipient.clone()),
            None => crate::core::model::RecipientKey::user(self.recipient.clone()),
        }
    }
}

/// Counts recipients by state.
pub fn totals<'a>(recipients: impl IntoIterator<Item = &'a RecipientStatus>) -> RecipientTotals {
    let mut t = RecipientTotals::default();
    for r in recipients {
        t.recipients += 1;
        *match r.state {
            RecipientState::Queued => &mut t.queued,
            RecipientState::Running => &mut t.running,
            RecipientState::Waiting => &mut t.waiting,
            RecipientState::Completed => &mut t.completed,
            RecipientState::Skipped => &mut t.skipped,
            RecipientState::Cancelled => &mut t.cancelled,
            RecipientState::Failed => &mut t.failed,
            RecipientState::Batched => &mut t.batched,
            RecipientState::Throttled => &mut t.throttled,
        } += 1;
    }
    t
}

impl RecipientTotals {
    /// Adds `other`'s counts (a page's) to these.
    pub fn add(&mut self, other: &RecipientTotals) {
        self.recipients += other.recipients;
        self.queued += other.queued;
        self.running += other.running;
        self.waiting += other.waiting;
        self.completed += other.completed;
        self.skipped += other.skipped;
        self.cancelled += other.cancelled;
        self.failed += other.failed;
        self.batched += other.batched;
        self.throttled += other.throttled;
    }
}

/// How a finished run ended: its state, the `Succeeded` condition's status
/// and reason, and a message. None while recipients are unfinished.
pub fn run_outcome(t: &RecipientTotals) -> Option<(RunState, bool, &'static str, String)> {
    let finished = t.completed + t.skipped + t.cancelled + t.failed + t.batched + t.throttled;
    if finished < t.recipients {
        return None;
    }
    let mut summary = format!("{} recipients: {} completed, {} skipped, {} cancelled, {} failed", t.recipients, t.completed, t.skipped, t.cancelled, t.failed);
    for (n, what) in [(t.batched, "batched"), (t.throttled, "throttled")] {
        if n > 0 {
            summary.push_str(&format!(", {n} {what}"));
        }
    }
    Some(if t.failed > 0 {
        (RunState::Failed, false, "RecipientsFailed", summary)
    } else if t.recipients > 0 && t.cancelled == t.recipients {
        (RunState::Cancelled, false, "Cancelled", summary)
    } else {
        (RunState::Completed, true, "Completed", summary)
    })
}

/// The most a RecipientPage's recipients may take as the apiserver stores
/// them (JSON). etcd refuses requests over 1.5 MiB by default; the rest is
/// left for the page's metadata (the recipient run ids annotation: 32 bytes
/// a recipient; managed fields).
pub const PAGE_BUDGET: usize = 1024 * 1024;

/// Reasons and times are herald's own and short: longer ones are cut, so
/// that [`minimal_bound`] holds whatever a record says.
const MAX_REASON_BYTES: usize = 40;
const MAX_TIME_BYTES: usize = 40;
/// Branch names and run names in step records are cut to this.
const MAX_NAME_BYTES: usize = 64;
/// The most a recipient's `context` (fetched data, a batch's activities) may take as stored.
pub const MAX_CONTEXT_BYTES: usize = 32 * 1024;
/// The recipient's message at [`Detail::Minimal`].
const MINIMAL_MESSAGE_BYTES: usize = 128;

/// How much of a recipient's record a saved page keeps. A page is saved at
/// the most detailed level that fits [`PAGE_BUDGET`]; pages are planned so
/// that [`Detail::Minimal`] always fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Detail {
    /// Everything, but at most the first 2 and the last 3 attempts of a step.
    Full,
    /// The first and the last attempt; shorter messages and errors.
    Reduced,
    /// No attempt history (attempts counted); short messages.
    Brief,
    /// States, reasons, counts and times; no step messages.
    Minimal,
}

/// What a [`Detail`] keeps: attempts listed (the first `first`, the last
/// `last`) and the bytes (as stored) of errors and messages.
struct Limits {
    first: usize,
    last: usize,
    error: usize,
    step_message: usize,
    message: usize,
}

impl Detail {
    pub const ALL: [Detail; 4] = [Detail::Full, Detail::Reduced, Detail::Brief, Detail::Minimal];

    fn limits(self) -> Limits {
        match self {
            Detail::Full => Limits { first: 2, last: 3, error: 1024, step_message: 2048, message: 2048 },
            Detail::Reduced => Limits { first: 1, last: 1, error: 160, step_message: 320, message: 512 },
            Detail::Brief => Limits { first: 0, last: 0, error: 0, step_message: 96, message: 256 },
            Detail::Minimal => Limits { first: 0, last: 0, error: 0, step_message: 0, message: MINIMAL_MESSAGE_BYTES },
        }
    }
}

/// The bytes `c` takes in a JSON string as the apiserver stores it. Go's
/// encoder escapes more than serde_json: `<`, `>`, `&`, U+2028 and U+2029
/// become `\u003c` and the like, control characters other than `\n`, `\r`
/// and `\t` `\u00XX`.
fn stored_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' => 2,
        '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => 6,
        c if u32::from(c) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The size of `value` as the apiserver stores it (see [`stored_len`]).
pub fn stored_size<T: Serialize>(value: &T) -> usize {
    // Status types always serialize; were one not to, no budget would hold it.
    let Ok(json) = serde_json::to_string(value) else { return usize::MAX };
    let mut size = json.len();
    let mut chars = json.chars();
    while let Some(c) = chars.next() {
        match c {
            // serde_json writes `\b` and `\f`; Go writes `\u0008` and `\u000c`.
            '\\' => {
                if let Some('b' | 'f') = chars.next() {
                    size += 4;
                }
            }
            '<' | '>' | '&' => size += 5,
            '\u{2028}' | '\u{2029}' => size += 3,
            _ => {}
        }
    }
    size
}

/// `s` cut to at most `max` bytes as stored, marked with `…`; None when
/// `max` leaves no room.
fn clip(s: &str, max: usize) -> Option<String> {
    if s.chars().map(stored_len).sum::<usize>() <= max {
        return Some(s.to_string());
    }
    let room = max.checked_sub('…'.len_utf8()).filter(|r| *r > 0)?;
    let mut used = 0;
    let mut end = 0;
    for (i, c) in s.char_indices() {
        used += stored_len(c);
        if used > room {
            break;
        }
        end = i + c.len_utf8();
    }
    Some(format!("{}…", &s[..end]))
}

fn clip_opt(s: &Option<String>, max: usize) -> Option<String> {
    s.as_deref().and_then(|s| clip(s, max))
}

/// A step as a page saved at `limits` keeps it.
fn compact_step(step: &StepStatus, limits: &Limits) -> StepStatus {
    let listed = step.attempt_history.len();
    let omitted = listed.saturating_sub(limits.first + limits.last);
    let kept = step.attempt_history.iter().enumerate().filter(|(i, _)| omitted == 0 || *i < limits.first || *i >= listed - limits.last);
    StepStatus {
        step_ref: step.step_ref.clone(),
        state: step.state,
        reason: clip_opt(&step.reason, MAX_REASON_BYTES),
        message: clip_opt(&step.message, limits.step_message),
        attempts: step.attempts,
        status_code: step.status_code,
        time: clip_opt(&step.time, MAX_TIME_BYTES),
        branch: clip_opt(&step.branch, MAX_NAME_BYTES),
        run: clip_opt(&step.run, MAX_NAME_BYTES),
        attempt_history: kept
            .map(|(_, a)| AttemptRecord {
                attempt: a.attempt,
                time: clip(&a.time, MAX_TIME_BYTES).unwrap_or_default(),
                status_code: a.status_code,
                error: clip_opt(&a.error, limits.error),
            })
            .collect(),
        omitted_attempts: match omitted {
            0 => step.omitted_attempts,
            n => Some(step.omitted_attempts.unwrap_or(0).saturating_add(i32::try_from(n).unwrap_or(i32::MAX))),
        },
    }
}

/// `recipient`'s record as a page saved at `detail` keeps it. Compacting
/// again keeps the count of attempts: listed + omittedAttempts = all.
pub fn compact(recipient: &RecipientStatus, detail: Detail) -> RecipientStatus {
    let limits = detail.limits();
    RecipientStatus {
        recipient: recipient.recipient.clone(),
        collection: recipient.collection.clone(),
        recipient_run_id: recipient.recipient_run_id.clone(),
        state: recipient.state,
        reason: clip_opt(&recipient.reason, MAX_REASON_BYTES),
        message: clip_opt(&recipient.message, limits.message),
        via: recipient.via.clone(),
        wake_at: clip_opt(&recipient.wake_at, MAX_TIME_BYTES),
        steps: recipient.steps.iter().map(|s| compact_step(s, &limits)).collect(),
        // Later steps render with it: kept whole (it is bounded when recorded).
        context: recipient.context.clone(),
    }
}

/// A page's recipients as they are saved: at the most detailed level whose
/// stored size fits `budget`, else at [`Detail::Minimal`] (which fits when
/// the page was planned by [`plan_pages`] with the same budget).
pub fn fit_page(recipients: &[RecipientStatus], budget: usize) -> (Vec<RecipientStatus>, Detail) {
    let mut detail = Detail::Full;
    loop {
        let saved: Vec<RecipientStatus> = recipients.iter().map(|r| compact(r, detail)).collect();
        let next = Detail::ALL.iter().copied().find(|d| *d > detail);
        match next {
            Some(next) if stored_size(&saved) > budget => detail = next,
            _ => return (saved, detail),
        }
    }
}

/// The widest a step's record can be at [`Detail::Minimal`]: every field
/// that compaction bounds, at its bound.
fn widest_minimal_step(step_ref: &str) -> StepStatus {
    StepStatus {
        step_ref: step_ref.to_string(),
        state: StepState::Completed,
        reason: Some("x".repeat(MAX_REASON_BYTES)),
        message: None,
        attempts: Some(i32::MIN),
        status_code: Some(i32::MIN),
        time: Some("x".repeat(MAX_TIME_BYTES)),
        attempt_history: Vec::new(),
        omitted_attempts: Some(i32::MIN),
        // Counted by [`extra_bound`], for the steps that record names.
        branch: None,
        run: None,
    }
}

/// The widest `recipient`'s record can be at [`Detail::Minimal`], without steps.
fn widest_minimal(recipient: &RecipientStatus) -> RecipientStatus {
    RecipientStatus {
        recipient: recipient.recipient.clone(),
        collection: recipient.collection.clone(),
        recipient_run_id: recipient.recipient_run_id.clone(),
        state: RecipientState::Completed,
        reason: Some("x".repeat(MAX_REASON_BYTES)),
        message: Some("x".repeat(MINIMAL_MESSAGE_BYTES)),
        via: recipient.via.clone(),
        wake_at: Some("x".repeat(MAX_TIME_BYTES)),
        steps: Vec::new(),
        context: None,
    }
}

/// The most `recipient`'s record can take, saved at [`Detail::Minimal`],
/// once it has gone through steps with these refs.
pub fn minimal_bound(recipient: &RecipientStatus, step_refs: &[&str]) -> usize {
    let steps: Vec<StepStatus> = step_refs.iter().map(|r| widest_minimal_step(r)).collect();
    stored_size(&RecipientStatus { steps, ..widest_minimal(recipient) })
}

/// What a workflow's steps can add to a record beyond [`minimal_bound`]:
/// with fetch or batch steps, a `context` of up to [`MAX_CONTEXT_BYTES`];
/// and each branch, batch or trigger-workflow step (`named_steps`) may name
/// a branch and a run on its record.
pub fn extra_bound(adds_context: bool, named_steps: usize) -> usize {
    let context = if adds_context { r#","context":"#.len() + MAX_CONTEXT_BYTES } else { 0 };
    let names = r#","branch":"""#.len() + r#","run":"""#.len() + 2 * MAX_NAME_BYTES;
    context + named_steps * names
}

/// Splits a run's recipients (in order) into pages of at most `max`, so
/// that the page saved at [`Detail::Minimal`] always fits `budget`, however
/// much its deliveries recorded: each record counts at its
/// [`minimal_bound`] for steps with these refs. Many steps (or long ids)
/// make pages smaller. Every page holds at least one recipient.
pub fn plan_pages(recipients: &[RecipientStatus], step_refs: &[&str], extra: usize, max: usize, budget: usize) -> Vec<Range<usize>> {
    let mut cutter = PageCutter::new(step_refs, extra, max, budget);
    let mut pages = Vec::new();
    let mut start = 0;
    for (i, r) in recipients.iter().enumerate() {
        if cutter.starts_page(r) && i > start {
            pages.push(start..i);
            start = i;
        }
    }
    if start < recipients.len() {
        pages.push(start..recipients.len());
    }
    pages
}

/// [`plan_pages`]'s rule one record at a time, for records that are still
/// being expanded: the same records in the same order give the same pages.
#[derive(Clone, Debug)]
pub struct PageCutter {
    steps_size: usize,
    extra: usize,
    max: usize,
    budget: usize,
    count: usize,
    size: usize,
}

impl PageCutter {
    pub fn new(step_refs: &[&str], extra: usize, max: usize, budget: usize) -> Self {
        // The steps are the same for every recipient: measured once. `steps`
        // is a record's last field, so it adds `,"steps":[...]` to the rest.
        let steps: Vec<StepStatus> = step_refs.iter().map(|r| widest_minimal_step(r)).collect();
        let steps_size = if steps.is_empty() { 0 } else { r#","steps":"#.len() + stored_size(&steps) };
        PageCutter { steps_size, extra, max: max.max(1), budget, count: 0, size: 2 }
    }

    /// `record`'s [`minimal_bound`] in a list (with its comma).
    fn bound(&self, record: &RecipientStatus) -> usize {
        stored_size(&widest_minimal(record)) + self.steps_size + self.extra + 1
    }

    /// Adds `record` to the page being cut; true when it does not fit there
    /// and starts the next page (the first record starts none: every page
    /// holds at least one).
    pub fn starts_page(&mut self, record: &RecipientStatus) -> bool {
        let bound = self.bound(record);
        let next = self.count > 0 && (self.count >= self.max || self.size + bound > self.budget);
        if next {
            self.count = 0;
            self.size = 2; // []
        }
        self.count += 1;
        self.size += bound;
        next
    }
}

/// Each record's [`minimal_bound`] in a list (with its comma).
/// `extra`: what else a record may hold ([`extra_bound`]).
fn minimal_bounds<'a>(recipients: &'a [RecipientStatus], step_refs: &[&str], extra: usize) -> impl Iterator<Item = usize> + 'a {
    let cutter = PageCutter::new(step_refs, extra, 1, 0);
    recipients.iter().map(move |r| cutter.bound(r))
}

/// Recipients a run keeps inline, in its own status, at most: a small run
/// needs no RecipientPage (and none of its writes).
pub const INLINE_RECIPIENTS: usize = 10;
/// The most a run's inline records may take as stored (they share the
/// run's object with its spec and the Workflow it was accepted with).
pub const INLINE_BUDGET: usize = 64 * 1024;

/// Where a run keeps its recipients' records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// In the run's own status, saved with the run's status writes.
    Inline,
    /// In RecipientPages holding these ranges of the recipients, in order.
    Pages(Vec<Range<usize>>),
}

/// Plans where a run's recipients are kept. Inline when there are at most
/// [`INLINE_RECIPIENTS`], their records fit [`INLINE_BUDGET`] at
/// [`Detail::Minimal`] whatever their deliveries record (as pages are
/// planned), and the run's other content (`run_size`: its spec and status
/// without records, as stored) leaves that budget room under
/// [`PAGE_BUDGET`]; in pages of at most `page_max` otherwise.
pub fn plan_layout(recipients: &[RecipientStatus], step_refs: &[&str], extra: usize, run_size: usize, page_max: usize) -> Layout {
    let inline = recipients.len() <= INLINE_RECIPIENTS
        && run_size.saturating_add(INLINE_BUDGET) <= PAGE_BUDGET
        && 2 + minimal_bounds(recipients, step_refs, extra).sum::<usize>() <= INLINE_BUDGET;
    if inline {
        Layout::Inline
    } else {
        Layout::Pages(plan_pages(recipients, step_refs, extra, page_max, PAGE_BUDGET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(state: RecipientState) -> RecipientStatus {
        RecipientStatus { recipient: "u".into(), state, ..Default::default() }
    }

    #[test]
    fn totals_and_outcomes() {
        let running = [r(RecipientState::Completed), r(RecipientState::Waiting)];
        assert_eq!(totals(&running).waiting, 1);
        assert!(run_outcome(&totals(&running)).is_none());
        let done = [r(RecipientState::Completed), r(RecipientState::Skipped), r(RecipientState::Cancelled)];
        let (state, ok, reason, message) = run_outcome(&totals(&done)).unwrap();
        assert_eq!((state, ok, reason), (RunState::Completed, true, "Completed"));
        assert!(message.contains("1 skipped"));
        let failed = [r(RecipientState::Completed), r(RecipientState::Failed)];
        assert_eq!(run_outcome(&totals(&failed)).unwrap().0, RunState::Failed);
        let cancelled = [r(RecipientState::Cancelled)];
        assert_eq!(run_outcome(&totals(&cancelled)).unwrap().0, RunState::Cancelled);
        assert_eq!(run_outcome(&totals(&[])).unwrap().0, RunState::Completed);
    }

    /// Characters that take the most room as stored (6 bytes each).
    fn widest(n: usize) -> String {
        "<".repeat(n)
    }

    fn attempts(n: i32, error: &str) -> Vec<AttemptRecord> {
        (1..=n).map(|attempt| AttemptRecord { attempt, time: "2026-01-02T03:04:05.123456789Z".into(), status_code: Some(503), error: Some(error.into()) }).collect()
    }

    /// The largest record the settings allow: ids of 256 characters (the
    /// API's limit), an object reached through an object, every step a
    /// delivery that failed its 20 attempts, messages of 400 characters and
    /// errors of 200 (delivery.rs's cuts), all of the widest characters.
    fn worst_record(step_refs: &[String]) -> RecipientStatus {
        let id = widest(256);
        let message = widest(400);
        RecipientStatus {
            recipient: id.clone(),
            collection: Some(id.clone()),
            recipient_run_id: "6ba7b810-9dad-11d1-80b4-00c04fd430c8".into(),
            state: RecipientState::Failed,
            reason: Some("DeliveryFailed".into()),
            message: Some(format!("step `{}`: {message}", step_refs[0])),
            via: Some(format!("object:{id}/{id}")),
            wake_at: None,
            steps: step_refs
                .iter()
                .map(|r| StepStatus {
                    step_ref: r.clone(),
                    state: StepState::Failed,
                    reason: Some("RetriesExhausted".into()),
                    message: Some(message.clone()),
                    attempts: Some(crate::resources::channel::MAX_ATTEMPTS),
                    status_code: Some(503),
                    time: Some("2026-01-02T03:04:05.123456789Z".into()),
                    attempt_history: attempts(crate::resources::channel::MAX_ATTEMPTS, &widest(200)),
                    omitted_attempts: None,
                    branch: None,
                    run: None,
                })
                .collect(),
            context: None,
        }
    }

    #[test]
    fn stored_size_counts_what_the_apiserver_escapes() {
        let s = "<>&\u{2028}\u{8}\u{c}\u{1}\"\\\na\u{e9}";
        // As Go writes it: `\u003c` `\u003e` `\u0026` `\u2028` `\u0008` `\u000c` `\u0001` `\"` `\\` `\n` a é, quoted.
        assert_eq!(stored_size(&s), 6 * 7 + 2 * 3 + 1 + 2 + 2);
        assert_eq!(s.chars().map(stored_len).sum::<usize>() + 2, stored_size(&s));
        for max in [0, 1, 3, 4, 5, 6, 7, 10, 50] {
            for text in [s.to_string(), widest(30), "plain ascii text".into(), "ééééé".into()] {
                match clip(&text, max) {
                    Some(cut) => assert!(stored_size(&cut) - 2 <= max, "{text:?} cut to {max}: {cut:?}"),
                    None => assert!(max < 4),
                }
            }
        }
        assert_eq!(clip("short", 5).as_deref(), Some("short"));
        assert_eq!(clip("longer", 5).as_deref(), Some("lo…"));
    }

    #[test]
    fn compaction_keeps_the_first_and_last_attempts_and_counts_the_rest() {
        let mut r = worst_record(&["a".to_string()]);
        r.steps[0].attempt_history = attempts(20, "boom");
        let full = compact(&r, Detail::Full);
        let listed: Vec<i32> = full.steps[0].attempt_history.iter().map(|a| a.attempt).collect();
        assert_eq!(listed, vec![1, 2, 18, 19, 20]);
        assert_eq!(full.steps[0].omitted_attempts, Some(15));
        assert_eq!(compact(&full, Detail::Full), full, "compacting again changes nothing");
        let reduced = compact(&full, Detail::Reduced);
        assert_eq!(reduced.steps[0].attempt_history.iter().map(|a| a.attempt).collect::<Vec<_>>(), vec![1, 20]);
        assert_eq!(reduced.steps[0].omitted_attempts, Some(18));
        assert_eq!(compact(&reduced, Detail::Brief).steps[0].omitted_attempts, Some(20));
        let minimal = compact(&r, Detail::Minimal);
        assert_eq!((minimal.steps[0].message.as_ref(), minimal.steps[0].attempts, minimal.steps[0].omitted_attempts), (None, Some(20), Some(20)));
        assert!(stored_size(&minimal) <= minimal_bound(&r, &["a"]));
        // A record with a few attempts and short messages is kept as it is.
        let mut small = r.clone();
        small.message = Some("step `a`: gave up".into());
        small.steps[0].message = Some("HTTP 503".into());
        small.steps[0].attempt_history = attempts(3, "HTTP 503");
        assert_eq!(compact(&small, Detail::Full), small);
    }

    #[test]
    fn the_largest_records_the_settings_allow_fit_a_page() {
        use crate::resources::workflow::{MAX_STEPS, MAX_STEP_REF_CHARS};
        let refs: Vec<String> = (0..MAX_STEPS).map(|i| format!("{i:02}{}", widest(MAX_STEP_REF_CHARS - 2))).collect();
        let step_refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let worst = worst_record(&refs);
        assert!(stored_size(&worst) > PAGE_BUDGET, "one such record in full is larger than a page may be");
        let recipients = vec![worst; 60];
        let pages = plan_pages(&recipients, &step_refs, 0, 500, PAGE_BUDGET);
        assert!(pages.len() > 1 && pages.iter().all(|p| !p.is_empty()) && pages.last().unwrap().end == 60);
        assert!(pages[0].len() >= 10, "{} recipients a page", pages[0].len());
        for page in &pages {
            let (saved, detail) = fit_page(&recipients[page.clone()], PAGE_BUDGET);
            let json = serde_json::to_string(&saved).unwrap();
            assert!(stored_size(&saved) <= PAGE_BUDGET, "{} bytes at {detail:?}", stored_size(&saved));
            assert!(json.len() <= stored_size(&saved));
            // With its recipient run ids annotation (32 bytes each), far from etcd's 1.5 MiB.
            assert!(stored_size(&saved) + 32 * page.len() < 1536 * 1024);
        }
        // Steps a delay rendered 1 MiB for are cut too.
        let mut huge = recipients[0].clone();
        huge.steps[0].message = Some("x".repeat(1 << 20));
        let (saved, _) = fit_page(&[huge], PAGE_BUDGET);
        assert!(stored_size(&saved) <= PAGE_BUDGET);
    }

    #[test]
    fn a_one_step_workflow_keeps_500_recipients_a_page_in_full() {
        let mut r = worst_record(&["notify".to_string()]);
        r.recipient = "user_0001".into();
        r.collection = None;
        r.via = Some("direct".into());
        let message = format!("HTTP 200 from POST https://hooks.example.com/notify {}", "x".repeat(330));
        r.message = None;
        r.state = RecipientState::Completed;
        r.steps[0].message = Some(message);
        r.steps[0].attempt_history = attempts(3, "HTTP 503 from POST https://hooks.example.com/notify: busy");
        let recipients = vec![r; 1200];
        let pages = plan_pages(&recipients, &["notify"], 0, 500, PAGE_BUDGET);
        assert_eq!(pages, vec![0..500, 500..1000, 1000..1200]);
        let (saved, detail) = fit_page(&recipients[0..500], PAGE_BUDGET);
        assert_eq!(detail, Detail::Full);
        assert_eq!(saved, recipients[0..500].to_vec());
    }

    #[test]
    fn plans_count_each_record_at_its_minimal_bound() {
        let r = worst_record(&["a".to_string(), "b".to_string()]);
        let bound = minimal_bound(&r, &["a", "b"]);
        assert!(stored_size(&compact(&r, Detail::Minimal)) <= bound);
        // Exactly n records fit a budget of n bounds (and commas, brackets).
        let budget = 2 + 3 * (bound + 1);
        assert_eq!(plan_pages(&vec![r.clone(); 7], &["a", "b"], 0, 500, budget), vec![0..3, 3..6, 6..7]);
        assert_eq!(plan_pages(&vec![r.clone(); 7], &["a", "b"], 0, 2, PAGE_BUDGET), vec![0..2, 2..4, 4..6, 6..7]);
        assert_eq!(plan_pages(&[r], &["a", "b"], 0, 500, 10), vec![0..1], "a page holds at least one recipient");
        assert!(plan_pages(&[], &["a"], 0, 500, PAGE_BUDGET).is_empty());
        // The widest states are the ones the bound assumes.
        for state in [RecipientState::Queued, RecipientState::Running, RecipientState::Waiting, RecipientState::Skipped, RecipientState::Cancelled, RecipientState::Failed] {
            assert!(stored_size(&state) <= stored_size(&RecipientState::Completed));
        }
        for state in [StepState::Running, StepState::Waiting, StepState::Skipped, StepState::Failed, StepState::Cancelled] {
            assert!(stored_size(&state) <= stored_size(&StepState::Completed));
        }
    }

    #[test]
    fn small_runs_keep_their_records_inline() {
        let mut one = worst_record(&["notify".to_string()]);
        one.recipient = "user_1".into();
        one.collection = None;
        one.via = Some("direct".into());
        let refs = ["notify"];
        let one_page = |n: usize| Layout::Pages(std::iter::once(0..n).collect());
        assert_eq!(plan_layout(std::slice::from_ref(&one), &refs, 0, 2048, 500), Layout::Inline);
        assert_eq!(plan_layout(&vec![one.clone(); INLINE_RECIPIENTS], &refs, 0, 2048, 500), Layout::Inline);
        // One more recipient, or a run whose spec and workflow leave no room: pages.
        assert_eq!(plan_layout(&vec![one.clone(); INLINE_RECIPIENTS + 1], &refs, 0, 2048, 500), one_page(INLINE_RECIPIENTS + 1));
        assert_eq!(plan_layout(std::slice::from_ref(&one), &refs, 0, PAGE_BUDGET - INLINE_BUDGET + 1, 500), one_page(1));
        // Records that could outgrow the budget (the widest ids and steps the limits allow): pages.
        use crate::resources::workflow::{MAX_STEPS, MAX_STEP_REF_CHARS};
        let long: Vec<String> = (0..MAX_STEPS).map(|i| format!("{i:02}{}", widest(MAX_STEP_REF_CHARS - 2))).collect();
        let long_refs: Vec<&str> = long.iter().map(String::as_str).collect();
        let worst = worst_record(&long);
        assert!(matches!(plan_layout(&vec![worst; 3], &long_refs, 0, 2048, 500), Layout::Pages(_)));
        // Whatever inline records recorded, saved at the budget they fit it.
        let mut busy = one.clone();
        busy.steps[0].message = Some(widest(1 << 16));
        let (saved, _) = fit_page(&vec![busy; INLINE_RECIPIENTS], INLINE_BUDGET);
        assert!(stored_size(&saved) <= INLINE_BUDGET);
    }

    #[test]
    fn keys_come_back_from_status() {
        let mut s = r(RecipientState::Queued);
        assert_eq!(s.key(), crate::core::model::RecipientKey::user("u"));
        s.collection = Some("teams".into());
        assert_eq!(s.key(), crate::core::model::RecipientKey::object("teams", "u"));
    }

    #[test]
    fn names_on_step_records_are_within_the_extra_bound() {
        let mut r = worst_record(&["route".to_string(), "next".to_string()]);
        for step in &mut r.steps {
            step.branch = Some(widest(300));
            step.run = Some(widest(300));
        }
        let minimal = compact(&r, Detail::Minimal);
        assert!(stored_size(&minimal) <= minimal_bound(&r, &["route", "next"]) + extra_bound(false, 2));
        assert!(stored_size(&minimal) > minimal_bound(&r, &["route", "next"]), "the names need the extra room");
    }
}
