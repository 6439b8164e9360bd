//! Run and recipient states, and the per-recipient status shapes: plain data
//! that the core plans and the resources store.

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
    /// Why (CamelCase): PreferenceOptOut, ConditionNotMet, Delivered, DeliveryFailed, RenderFailed, ...
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
    /// Every attempt of a delivery that needed more than one or failed, in
    /// order (a first-time success is the step itself: statusCode, time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempt_history: Vec<AttemptRecord>,
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
        } += 1;
    }
    t
}

/// How a finished run ended: its state, the `Succeeded` condition's status
/// and reason, and a message. None while recipients are unfinished.
pub fn run_outcome(t: &RecipientTotals) -> Option<(RunState, bool, &'static str, String)> {
    let finished = t.completed + t.skipped + t.cancelled + t.failed;
    if finished < t.recipients {
        return None;
    }
    let summary = format!("{} recipients: {} completed, {} skipped, {} cancelled, {} failed", t.recipients, t.completed, t.skipped, t.cancelled, t.failed);
    Some(if t.failed > 0 {
        (RunState::Failed, false, "RecipientsFailed", summary)
    } else if t.recipients > 0 && t.cancelled == t.recipients {
        (RunState::Cancelled, false, "Cancelled", summary)
    } else {
        (RunState::Completed, true, "Completed", summary)
    })
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

    #[test]
    fn keys_come_back_from_status() {
        let mut s = r(RecipientState::Queued);
        assert_eq!(s.key(), crate::core::model::RecipientKey::user("u"));
        s.collection = Some("teams".into());
        assert_eq!(s.key(), crate::core::model::RecipientKey::object("teams", "u"));
    }
}
