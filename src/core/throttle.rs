//! Throttle steps (Knock's `throttle` function): a gate per workflow step,
//! recipient and rendered key that lets at most `limit` recipient runs through
//! per window. The window opens at the first admitted run and lasts a fixed
//! duration, or until a timestamp resolved from the run's data (`windowFrom`).
//! Once the limit is reached inside the window further runs stop (not an error).
//!
//! This module decides; `controller::throttle` stores the state in a
//! `Throttle` resource and makes the decision exact across writers.
//!
//! Rules, in order:
//! 1. A recipient run already admitted (it asks again after a restart) is
//!    admitted again, with nothing written, whatever the window: it never
//!    counts twice and never flips to throttled.
//! 2. The request must be valid: `limit` at least 1, the window longer than
//!    zero and at most 31 days (Knock's limit), the key short enough.
//! 3. An open window (now < end) admits while it holds fewer than `limit`
//!    runs, then throttles until its end. Its end never moves once open.
//! 4. No window, or an ended one (now >= end): a new window opens now with
//!    this run as its first.

use jiff::{SignedDuration, Timestamp};
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ids::{label_value, short_hash};
use super::model::RecipientKey;

/// The longest window Knock allows.
pub const MAX_WINDOW: SignedDuration = SignedDuration::from_hours(31 * 24);

/// The highest limit herald takes: the admitted run ids are kept in the
/// Throttle resource (about 40 bytes each), which must stay well under etcd's
/// 1.5 MiB request limit. Knock documents no upper limit.
pub const MAX_LIMIT: u32 = 10_000;

/// Knock: the key must be shorter than this after JSON and URL encoding.
pub const MAX_KEY_LEN: usize = 64;

/// Label keys on Throttle resources, for `kubectl get thr -l ...`.
pub const WORKFLOW_LABEL: &str = "herald.dev/workflow";
pub const STEP_LABEL: &str = "herald.dev/step";
pub const RECIPIENT_LABEL: &str = "herald.dev/recipient";

/// What one throttle counts: a step of a workflow, for one recipient and key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ThrottleGroup {
    /// The workflow key.
    pub workflow: String,
    /// The throttle step's `ref`.
    pub step_ref: String,
    /// The recipient, as [`RecipientKey::canonical`] (`user:u1`,
    /// `object:projects:p1`): unlike the display form it never confuses a user
    /// id containing `/` with an object. [`ThrottleGroup::new`] fills it.
    pub recipient: String,
    /// The rendered `key`; empty when the step has none.
    pub key: String,
}

impl ThrottleGroup {
    pub fn new(workflow: impl Into<String>, step_ref: impl Into<String>, recipient: &RecipientKey, key: impl Into<String>) -> Self {
        ThrottleGroup { workflow: workflow.into(), step_ref: step_ref.into(), recipient: recipient.canonical(), key: key.into() }
    }

    /// The Throttle resource's name: `thr-` and a hash of every part, so it is
    /// a valid DNS-1123 name whatever the ids, and stable across replicas.
    /// 128 bits of hash: two groups of one namespace never share a name.
    pub fn name(&self) -> String {
        // Joined with NUL, which ids and keys do not hold, so ("a-b", "c") and ("a", "b-c") differ.
        let joined = [self.workflow.as_str(), &self.step_ref, &self.recipient, &self.key].join("\u{0}");
        format!("thr-{}", short_hash(&joined, 32))
    }

    /// Labels for selection with kubectl (`-l herald.dev/workflow=deploy`);
    /// values that do not fit a label are shortened and hashed.
    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        [(WORKFLOW_LABEL, &self.workflow), (STEP_LABEL, &self.step_ref), (RECIPIENT_LABEL, &self.recipient)].into_iter().map(|(k, v)| (k.to_string(), label_value(v))).collect()
    }
}

/// How long a window lasts once it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThrottleWindow {
    /// A fixed length from the window's first admitted run (`window: 1h`).
    For(SignedDuration),
    /// Until this instant, resolved from the run's data (`windowFrom`). Only
    /// the run that opens a window sets its end; later runs' values are
    /// checked but do not move it.
    Until(Timestamp),
}

/// One recipient run asking to pass a throttle step.
#[derive(Clone, Debug, PartialEq)]
pub struct ThrottleRequest {
    pub group: ThrottleGroup,
    pub window: ThrottleWindow,
    /// Runs admitted per window, at least 1.
    pub limit: u32,
    /// The asking recipient run: the same id asking again gets the same answer.
    pub recipient_run_id: Uuid,
}

/// The answer for one recipient run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThrottleDecision {
    /// The run continues with the next step.
    Admitted,
    /// The run stops here: the window holding `limit` runs ends at `window_end`.
    Throttled { window_end: Timestamp },
}

/// Why a request cannot be decided (Knock logs it and skips the step).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ThrottleError {
    #[error("throttle limit must be at least 1")]
    ZeroLimit,
    #[error("throttle limit {0} is above the 10000 herald allows")]
    LimitTooHigh(u32),
    #[error("throttle window must be longer than zero, got {0}")]
    EmptyWindow(String),
    #[error("throttle window ends at {end}, which is not after now ({now})")]
    WindowEndPassed { end: Timestamp, now: Timestamp },
    #[error("throttle window of {0} is longer than the 31 days allowed")]
    WindowTooLong(String),
    #[error("throttle key is {0} characters after JSON and URL encoding; it must be shorter than 64")]
    KeyTooLong(usize),
}

/// A throttle's durable state: the current window and who it admitted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleState {
    /// When the current window opened: the first admitted run's time (RFC 3339).
    #[schemars(schema_with = "date_time")]
    pub window_start: Timestamp,
    /// When the current window ends (RFC 3339); from then on the next run opens a new window.
    #[schemars(schema_with = "date_time")]
    pub window_end: Timestamp,
    /// The recipient run ids admitted in the current window, in order.
    #[serde(default)]
    pub admitted: Vec<String>,
}

fn date_time(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "format": "date-time"})
}

impl ThrottleState {
    /// Whether `id` is among the admitted runs (entries compared as UUIDs,
    /// so a hand-edited upper-case id still matches).
    pub fn has_admitted(&self, id: &Uuid) -> bool {
        self.admitted.iter().any(|a| Uuid::try_parse(a).is_ok_and(|a| a == *id))
    }

    /// Whether the window is over at `now`.
    pub fn expired(&self, now: Timestamp) -> bool {
        now >= self.window_end
    }
}

impl ThrottleRequest {
    /// The end of a window opening at `now`, or why the request is invalid.
    pub fn check(&self, now: Timestamp) -> Result<Timestamp, ThrottleError> {
        if self.limit == 0 {
            return Err(ThrottleError::ZeroLimit);
        }
        if self.limit > MAX_LIMIT {
            return Err(ThrottleError::LimitTooHigh(self.limit));
        }
        let encoded = encoded_key_len(&self.group.key);
        if encoded >= MAX_KEY_LEN {
            return Err(ThrottleError::KeyTooLong(encoded));
        }
        let end = match self.window {
            ThrottleWindow::For(length) => {
                if length <= SignedDuration::ZERO {
                    return Err(ThrottleError::EmptyWindow(format!("{length:#}")));
                }
                if length > MAX_WINDOW {
                    return Err(ThrottleError::WindowTooLong(format!("{length:#}")));
                }
                // Cannot fail for a window of at most 31 days unless now is at the end of time.
                now.checked_add(length).map_err(|_| ThrottleError::WindowTooLong(format!("{length:#}")))?
            }
            ThrottleWindow::Until(end) => {
                if end <= now {
                    return Err(ThrottleError::WindowEndPassed { end, now });
                }
                let length = end.duration_since(now);
                if length > MAX_WINDOW {
                    return Err(ThrottleError::WindowTooLong(format!("{length:#}")));
                }
                end
            }
        };
        Ok(end)
    }
}

/// The key's length as Knock measures it: JSON string escaping, then URL
/// (percent) encoding of every byte outside the unreserved set. Knock does not
/// say whether the JSON quotes count; they are left out (the lenient reading).
fn encoded_key_len(key: &str) -> usize {
    let json = serde_json::to_string(key).unwrap_or_default();
    let inner = json.strip_prefix('"').and_then(|j| j.strip_suffix('"')).unwrap_or(&json);
    inner.bytes().map(|b| if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') { 1 } else { 3 }).sum()
}

/// Decides whether `req`'s run passes, given the stored state (None: none yet)
/// and the time. Returns the decision and the state to store, None when
/// nothing changes (so a throttled or repeated run costs no write). See the
/// module docs for the rules.
pub fn decide(state: Option<&ThrottleState>, req: &ThrottleRequest, now: Timestamp) -> Result<(ThrottleDecision, Option<ThrottleState>), ThrottleError> {
    if state.is_some_and(|s| s.has_admitted(&req.recipient_run_id)) {
        return Ok((ThrottleDecision::Admitted, None));
    }
    let window_end = req.check(now)?;
    let id = req.recipient_run_id.to_string();
    match state {
        Some(open) if !open.expired(now) => {
            // usize::try_from cannot fail on the platforms herald runs on; saturate anyway.
            let limit = usize::try_from(req.limit).unwrap_or(usize::MAX);
            if open.admitted.len() < limit {
                let mut next = open.clone();
                next.admitted.push(id);
                Ok((ThrottleDecision::Admitted, Some(next)))
            } else {
                Ok((ThrottleDecision::Throttled { window_end: open.window_end }, None))
            }
        }
        _ => Ok((ThrottleDecision::Admitted, Some(ThrottleState { window_start: now, window_end, admitted: vec![id] }))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn request(limit: u32, window: ThrottleWindow) -> ThrottleRequest {
        ThrottleRequest { group: ThrottleGroup::new("deploy", "throttle_1", &RecipientKey::user("u1"), "alert-42"), window, limit, recipient_run_id: Uuid::new_v4() }
    }

    fn hour() -> ThrottleWindow {
        ThrottleWindow::For(SignedDuration::from_hours(1))
    }

    /// Asks for a new run id; panics on an invalid request.
    fn ask(state: Option<&ThrottleState>, req: &ThrottleRequest, now: Timestamp) -> (ThrottleDecision, Option<ThrottleState>) {
        let req = ThrottleRequest { recipient_run_id: Uuid::new_v4(), ..req.clone() };
        decide(state, &req, now).unwrap()
    }

    #[test]
    fn the_first_run_is_admitted_and_opens_the_window() {
        let req = request(1, hour());
        let now = t("2024-05-01T10:00:00Z");
        let (decision, state) = decide(None, &req, now).unwrap();
        assert_eq!(decision, ThrottleDecision::Admitted);
        let state = state.expect("a new state to store");
        assert_eq!(state.window_start, now);
        assert_eq!(state.window_end, t("2024-05-01T11:00:00Z"));
        assert_eq!(state.admitted, vec![req.recipient_run_id.to_string()]);
    }

    #[test]
    fn a_full_window_throttles_until_its_end_without_a_write() {
        let req = request(1, hour());
        let (_, state) = decide(None, &req, t("2024-05-01T10:00:00Z")).unwrap();
        let state = state.unwrap();
        for now in ["2024-05-01T10:00:00Z", "2024-05-01T10:30:00Z", "2024-05-01T10:59:59.999Z"] {
            let (decision, next) = ask(Some(&state), &req, t(now));
            assert_eq!(decision, ThrottleDecision::Throttled { window_end: t("2024-05-01T11:00:00Z") }, "{now}");
            assert_eq!(next, None, "{now}");
        }
    }

    #[test]
    fn an_admitted_run_asking_again_is_admitted_and_not_counted_twice() {
        let req = request(2, hour());
        let (_, state) = decide(None, &req, t("2024-05-01T10:00:00Z")).unwrap();
        let state = state.unwrap();
        assert_eq!(decide(Some(&state), &req, t("2024-05-01T10:05:00Z")).unwrap(), (ThrottleDecision::Admitted, None));
        // Still a free place for another run: the repeat took none.
        let (decision, full) = ask(Some(&state), &req, t("2024-05-01T10:06:00Z"));
        assert_eq!(decision, ThrottleDecision::Admitted);
        let full = full.unwrap();
        assert_eq!(full.admitted.len(), 2);
        // Once full, and once the window has ended, the admitted run still passes.
        assert_eq!(decide(Some(&full), &req, t("2024-05-01T10:07:00Z")).unwrap(), (ThrottleDecision::Admitted, None));
        assert_eq!(decide(Some(&full), &req, t("2024-05-01T12:00:00Z")).unwrap(), (ThrottleDecision::Admitted, None));
        // Even when its own window setting has become invalid since (an end resolved from data now passed).
        let late = ThrottleRequest { window: ThrottleWindow::Until(t("2024-05-01T10:30:00Z")), ..req.clone() };
        assert_eq!(decide(Some(&full), &late, t("2024-05-01T12:00:00Z")).unwrap(), (ThrottleDecision::Admitted, None));
        // Stored ids compare as UUIDs.
        let upper = ThrottleState { admitted: vec![req.recipient_run_id.to_string().to_uppercase()], ..state.clone() };
        assert_eq!(decide(Some(&upper), &req, t("2024-05-01T10:05:00Z")).unwrap(), (ThrottleDecision::Admitted, None));
    }

    #[test]
    fn an_ended_window_is_replaced_by_one_opening_now() {
        let req = request(1, hour());
        let (_, state) = decide(None, &req, t("2024-05-01T10:00:00Z")).unwrap();
        let state = state.unwrap();
        let now = t("2024-05-01T11:00:00Z"); // exactly the end: over
        let other = ThrottleRequest { recipient_run_id: Uuid::new_v4(), ..req.clone() };
        let (decision, next) = decide(Some(&state), &other, now).unwrap();
        assert_eq!(decision, ThrottleDecision::Admitted);
        let next = next.unwrap();
        assert_eq!((next.window_start, next.window_end), (now, t("2024-05-01T12:00:00Z")));
        assert_eq!(next.admitted, vec![other.recipient_run_id.to_string()]);
    }

    #[test]
    fn a_limit_above_one_admits_that_many_per_window() {
        let req = request(3, hour());
        let mut state: Option<ThrottleState> = None;
        let now = t("2024-05-01T10:00:00Z");
        for i in 0..3 {
            let (decision, next) = ask(state.as_ref(), &req, now + SignedDuration::from_mins(i));
            assert_eq!(decision, ThrottleDecision::Admitted, "run {i}");
            state = Some(next.unwrap());
        }
        let state = state.unwrap();
        assert_eq!(state.admitted.len(), 3);
        assert_eq!(state.window_start, now, "later admissions do not move the window");
        assert_eq!(state.window_end, t("2024-05-01T11:00:00Z"));
        assert_eq!(ask(Some(&state), &req, t("2024-05-01T10:10:00Z")), (ThrottleDecision::Throttled { window_end: state.window_end }, None));
        // A lowered limit applies at once; a raised one admits more in the same window.
        assert!(matches!(ask(Some(&state), &ThrottleRequest { limit: 2, ..req.clone() }, t("2024-05-01T10:10:00Z")).0, ThrottleDecision::Throttled { .. }));
        assert_eq!(ask(Some(&state), &ThrottleRequest { limit: 4, ..req.clone() }, t("2024-05-01T10:10:00Z")).0, ThrottleDecision::Admitted);
    }

    #[test]
    fn an_explicit_end_sets_the_window_and_later_ends_do_not_move_it() {
        let end = t("2024-05-03T09:00:00Z");
        let req = request(1, ThrottleWindow::Until(end));
        let now = t("2024-05-01T10:00:00Z");
        let (decision, state) = decide(None, &req, now).unwrap();
        assert_eq!(decision, ThrottleDecision::Admitted);
        let state = state.unwrap();
        assert_eq!((state.window_start, state.window_end), (now, end));
        let later = ThrottleRequest { window: ThrottleWindow::Until(t("2024-05-04T09:00:00Z")), ..req.clone() };
        assert_eq!(ask(Some(&state), &later, t("2024-05-02T00:00:00Z")), (ThrottleDecision::Throttled { window_end: end }, None));
        // After the end the next run opens a window until its own resolved end.
        let (decision, next) = ask(Some(&state), &later, end);
        assert_eq!(decision, ThrottleDecision::Admitted);
        assert_eq!(next.unwrap().window_end, t("2024-05-04T09:00:00Z"));
    }

    #[test]
    fn invalid_requests_are_refused_naming_the_problem() {
        let now = t("2024-05-01T10:00:00Z");
        let check = |req: ThrottleRequest| decide(None, &req, now).unwrap_err();
        assert_eq!(check(request(0, hour())), ThrottleError::ZeroLimit);
        assert_eq!(check(request(MAX_LIMIT + 1, hour())), ThrottleError::LimitTooHigh(MAX_LIMIT + 1));
        assert!(decide(None, &request(MAX_LIMIT, hour()), now).is_ok());
        assert!(matches!(check(request(1, ThrottleWindow::For(SignedDuration::ZERO))), ThrottleError::EmptyWindow(_)));
        assert!(matches!(check(request(1, ThrottleWindow::For(SignedDuration::from_secs(-5)))), ThrottleError::EmptyWindow(_)));
        let too_long = check(request(1, ThrottleWindow::For(MAX_WINDOW + SignedDuration::from_secs(1))));
        assert!(matches!(too_long, ThrottleError::WindowTooLong(_)), "{too_long:?}");
        assert!(too_long.to_string().contains("31 days"), "{too_long}");
        assert!(decide(None, &request(1, ThrottleWindow::For(MAX_WINDOW)), now).is_ok(), "31 days exactly is allowed");
        assert!(matches!(check(request(1, ThrottleWindow::Until(t("2024-06-02T10:00:01Z")))), ThrottleError::WindowTooLong(_)));
        assert_eq!(check(request(1, ThrottleWindow::Until(now))), ThrottleError::WindowEndPassed { end: now, now });
        let mut long_key = request(1, hour());
        long_key.group.key = "k".repeat(64);
        assert_eq!(check(long_key.clone()), ThrottleError::KeyTooLong(64));
        long_key.group.key = "k".repeat(63);
        assert!(decide(None, &long_key, now).is_ok());
        long_key.group.key = "é".repeat(11); // 2 bytes each, 6 characters encoded
        assert_eq!(check(long_key), ThrottleError::KeyTooLong(66));
        // An invalid request is refused even while a window is open.
        let (_, state) = decide(None, &request(1, hour()), now).unwrap();
        assert_eq!(decide(state.as_ref(), &request(0, hour()), now).unwrap_err(), ThrottleError::ZeroLimit);
    }

    #[test]
    fn names_are_valid_stable_and_distinct() {
        let g = ThrottleGroup::new("deploy", "throttle_1", &RecipientKey::user("u1"), "");
        let name = g.name();
        assert!(crate::core::ids::is_dns_subdomain(&name) && name.len() <= 63 && name.starts_with("thr-"), "{name}");
        assert_eq!(name, g.clone().name());
        let variants = [
            ThrottleGroup { key: "a".into(), ..g.clone() },
            ThrottleGroup { workflow: "deploy2".into(), ..g.clone() },
            ThrottleGroup { step_ref: "throttle_2".into(), ..g.clone() },
            ThrottleGroup::new("deploy", "throttle_1", &RecipientKey::user("u2"), ""),
            // A user whose id looks like an object's display form is another recipient.
            ThrottleGroup::new("deploy", "throttle_1", &RecipientKey::user("projects/p1"), ""),
            ThrottleGroup::new("deploy", "throttle_1", &RecipientKey::object("projects", "p1"), ""),
        ];
        let mut names: Vec<String> = variants.iter().map(ThrottleGroup::name).collect();
        names.push(name);
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count);
        // Parts never run into each other.
        let a = ThrottleGroup { workflow: "a".into(), step_ref: "b-c".into(), ..g.clone() };
        let b = ThrottleGroup { workflow: "a-b".into(), step_ref: "c".into(), ..g.clone() };
        assert_ne!(a.name(), b.name());
    }

    #[test]
    fn labels_fit_kubernetes_whatever_the_ids() {
        let g = ThrottleGroup::new("deploy", "throttle_1", &RecipientKey::object("projects", "P 1"), "x");
        let labels = g.labels();
        assert_eq!(labels[WORKFLOW_LABEL], "deploy");
        assert_eq!(labels[STEP_LABEL], "throttle_1");
        let recipient = &labels[RECIPIENT_LABEL];
        assert!(recipient.len() <= 63 && recipient.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')), "{recipient}");
        let long = ThrottleGroup { workflow: "w".repeat(300), ..g };
        assert!(long.labels()[WORKFLOW_LABEL].len() <= 63);
    }

    #[test]
    fn state_round_trips_in_camel_case() {
        let state = ThrottleState { window_start: t("2024-05-01T10:00:00Z"), window_end: t("2024-05-01T11:00:00Z"), admitted: vec![Uuid::nil().to_string()] };
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["windowStart"], "2024-05-01T10:00:00Z");
        assert_eq!(json["windowEnd"], "2024-05-01T11:00:00Z");
        assert_eq!(serde_json::from_value::<ThrottleState>(json).unwrap(), state);
    }
}
