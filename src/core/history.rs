//! Messages, as herald's history keeps them: one per channel step a
//! recipient reached, in Knock's shape (its statuses and fields). Pure: the
//! id derivation, the status a delivery outcome becomes, the record built
//! from a delivery or from a finished step, and the opaque list cursors.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::execution::{DeliveryOutcome, Message, RecipientContext, RunContext};
use super::model::RecipientKey;
use super::status::{AttemptRecord, StepState, StepStatus};

/// Knock's message delivery statuses that herald sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// The receiver accepted it (a 2xx answer, or the SMTP server took it).
    Sent,
    /// Stored where its recipient reads it: an in-app feed message.
    Delivered,
    /// Every attempt failed: the receiver refused it or could not be reached.
    Undelivered,
    /// Never attempted: the channel was not ready, or the message could not be built.
    NotSent,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Undelivered => "undelivered",
            MessageStatus::NotSent => "not_sent",
        }
    }

    /// Knock's statuses a filter may name; herald never stores the others
    /// (`queued`, `delivered`, `delivery_attempted`, `bounced`), so they match nothing.
    pub const KNOCK: &'static [&'static str] = &["queued", "sent", "delivered", "delivery_attempted", "undelivered", "not_sent", "bounced"];

    /// The status of a delivery that ended this way.
    pub fn of(ok: bool, attempts: i32) -> Self {
        match (ok, attempts) {
            (true, _) => MessageStatus::Sent,
            (false, 0) => MessageStatus::NotSent,
            (false, _) => MessageStatus::Undelivered,
        }
    }
}

/// A message's id: the same for every attempt, replica and restart (a UUID v5
/// of the recipient run id and the step), so writing it twice is one message.
pub fn message_id(recipient_run_id: Uuid, step_ref: &str) -> Uuid {
    Uuid::new_v5(&recipient_run_id, format!("message:{step_ref}").as_bytes())
}

/// Where a message came from: the run and recipient it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageSource {
    pub namespace: String,
    pub workflow: String,
    pub workflow_run_id: Uuid,
    pub recipient_run_id: Uuid,
    pub recipient: RecipientKey,
    pub tenant: Option<String>,
    pub actor: Option<RecipientKey>,
    pub data: Value,
    /// The workflow's categories (the feed filters on them).
    pub categories: Vec<String>,
}

impl MessageSource {
    /// The source of a recipient's messages in a run.
    pub fn of(namespace: &str, run: &RunContext, recipient: &RecipientContext) -> Self {
        let actor = run.actor.as_ref().and_then(|a| {
            let id = a.get("id")?.as_str()?.to_string();
            Some(match a.get("collection").and_then(Value::as_str) {
                Some(collection) => RecipientKey::object(collection, id),
                None => RecipientKey::User(id),
            })
        });
        MessageSource {
            namespace: namespace.to_string(),
            workflow: run.workflow_key.to_string(),
            workflow_run_id: run.workflow_run_id,
            recipient_run_id: recipient.recipient_run_id,
            recipient: recipient.key.clone(),
            tenant: run.tenant.map(|t| t.id.clone()),
            actor,
            data: Value::Object(run.data.clone()),
            categories: run.categories.to_vec(),
        }
    }
}

/// One message, ready to be stored.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageRecord {
    pub id: Uuid,
    pub namespace: String,
    pub workflow: String,
    pub workflow_run_id: Uuid,
    pub recipient_run_id: Uuid,
    pub recipient: RecipientKey,
    pub tenant: Option<String>,
    pub actor: Option<RecipientKey>,
    pub step_ref: String,
    pub channel: String,
    pub channel_type: String,
    pub status: MessageStatus,
    /// Why, in herald's words (CamelCase), e.g. Delivered, DeliveryFailed, ChannelNotReady.
    pub reason: String,
    /// The rendered template fields (None when the message is rebuilt from a step record).
    pub content: Option<Map<String, Value>>,
    pub attempts: Vec<AttemptRecord>,
    pub data: Value,
    pub categories: Vec<String>,
    pub engagement: Engagement,
    pub inserted_at: Timestamp,
    pub updated_at: Timestamp,
}

/// When a recipient last engaged with a message, by kind (None: not set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Engagement {
    pub seen_at: Option<Timestamp>,
    pub read_at: Option<Timestamp>,
    pub archived_at: Option<Timestamp>,
    pub interacted_at: Option<Timestamp>,
    pub clicked_at: Option<Timestamp>,
    pub link_clicked_at: Option<Timestamp>,
}

impl Engagement {
    /// Knock's `engagement_statuses`: the kinds that are set.
    pub fn statuses(&self) -> Vec<&'static str> {
        [("seen", self.seen_at), ("read", self.read_at), ("archived", self.archived_at), ("interacted", self.interacted_at), ("link_clicked", self.link_clicked_at)]
            .into_iter()
            .filter_map(|(name, at)| at.map(|_| name))
            .collect()
    }
}

/// An engagement change, as Knock's routes name them (`PUT /v1/messages/{id}/read`,
/// `POST /v1/messages/batch/unread`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngagementAction {
    Seen,
    Unseen,
    Read,
    Unread,
    Archived,
    Unarchived,
    Interacted,
}

impl EngagementAction {
    /// The action a route's status segment names; `set` is false for DELETE
    /// (which unsets: `DELETE /v1/messages/{id}/read` is unread).
    pub fn parse(segment: &str, set: bool) -> Option<Self> {
        use EngagementAction::*;
        Some(match (segment, set) {
            ("seen", true) | ("unseen", false) => Seen,
            ("seen", false) | ("unseen", true) => Unseen,
            ("read", true) | ("unread", false) => Read,
            ("read", false) | ("unread", true) => Unread,
            ("archived" | "archive", true) | ("unarchived" | "unarchive", false) => Archived,
            ("archived" | "archive", false) | ("unarchived" | "unarchive", true) => Unarchived,
            ("interacted", true) => Interacted,
            _ => return None,
        })
    }

    /// The engagement column it sets (to the time) or clears (to null).
    pub fn column(self) -> (&'static str, bool) {
        use EngagementAction::*;
        match self {
            Seen => ("seen_at", true),
            Unseen => ("seen_at", false),
            Read => ("read_at", true),
            Unread => ("read_at", false),
            Archived => ("archived_at", true),
            Unarchived => ("archived_at", false),
            Interacted => ("interacted_at", true),
        }
    }
}

impl MessageRecord {
    /// The message of a delivery that just ended.
    pub fn delivered(source: &MessageSource, message: &Message, outcome: &DeliveryOutcome, now: Timestamp) -> Self {
        let started = outcome.history.first().and_then(|a| a.time.parse().ok()).unwrap_or(now);
        MessageRecord {
            id: message_id(source.recipient_run_id, &message.step_ref),
            step_ref: message.step_ref.clone(),
            channel: message.channel.clone(),
            channel_type: message.channel_type.to_string(),
            status: MessageStatus::of(outcome.ok, outcome.attempts),
            reason: outcome.reason.clone(),
            content: Some(message.fields.clone()),
            attempts: outcome.history.clone(),
            inserted_at: started,
            updated_at: now,
            ..MessageRecord::from_source(source)
        }
    }

    /// The message a finished channel step stands for, when the delivery's
    /// own record was lost (a crash before it was written): no content.
    /// None for steps that are not deliveries (skipped, delays, ...).
    pub fn from_step(source: &MessageSource, step: &StepStatus, channel: &str, channel_type: &str) -> Option<Self> {
        let ok = match step.state {
            StepState::Completed => true,
            StepState::Failed => false,
            _ => return None,
        };
        let attempts = step.attempts?;
        let time = step.time.as_deref().and_then(|t| t.parse().ok()).unwrap_or_else(Timestamp::now);
        let mut history = step.attempt_history.clone();
        if history.is_empty() && attempts > 0 {
            history.push(AttemptRecord { attempt: attempts, time: time.to_string(), status_code: step.status_code, error: None });
        }
        Some(MessageRecord {
            id: message_id(source.recipient_run_id, &step.step_ref),
            step_ref: step.step_ref.clone(),
            channel: channel.to_string(),
            channel_type: channel_type.to_string(),
            status: MessageStatus::of(ok, attempts),
            reason: step.reason.clone().unwrap_or_default(),
            content: None,
            attempts: history,
            inserted_at: time,
            updated_at: time,
            ..MessageRecord::from_source(source)
        })
    }

    fn from_source(source: &MessageSource) -> Self {
        MessageRecord {
            id: Uuid::nil(),
            namespace: source.namespace.clone(),
            workflow: source.workflow.clone(),
            workflow_run_id: source.workflow_run_id,
            recipient_run_id: source.recipient_run_id,
            recipient: source.recipient.clone(),
            tenant: source.tenant.clone(),
            actor: source.actor.clone(),
            step_ref: String::new(),
            channel: String::new(),
            channel_type: String::new(),
            status: MessageStatus::NotSent,
            reason: String::new(),
            content: None,
            attempts: Vec::new(),
            data: source.data.clone(),
            categories: source.categories.clone(),
            engagement: Engagement::default(),
            inserted_at: Timestamp::UNIX_EPOCH,
            updated_at: Timestamp::UNIX_EPOCH,
        }
    }
}

/// The stored status and engagement statuses of a recipient's messages, by step ref.
pub type StoredStatuses = std::collections::BTreeMap<String, (String, Vec<String>)>;

/// What `refs.<step>` conditions see of a recipient's earlier steps:
/// `delivery_status` (Knock's message status, or `skipped`) and
/// `engagement_status` (seen, read, ... as stored). A step's stored message
/// wins over its record (it knows `delivered` and the engagement).
pub fn refs(steps: &[StepStatus], stored: Option<&StoredStatuses>) -> Value {
    let mut out = Map::new();
    for step in steps {
        let from_record = match step.state {
            StepState::Skipped => Some("skipped"),
            StepState::Completed if step.attempts.is_some() => Some("sent"),
            StepState::Failed if step.attempts == Some(0) => Some("not_sent"),
            StepState::Failed if step.attempts.is_some() => Some("undelivered"),
            _ => None,
        };
        let stored = stored.and_then(|s| s.get(&step.step_ref));
        let delivery = stored.map(|(s, _)| s.as_str()).or(from_record);
        if let Some(delivery) = delivery {
            let engagement = stored.map(|(_, e)| e.clone()).unwrap_or_default();
            out.insert(step.step_ref.clone(), serde_json::json!({"delivery_status": delivery, "engagement_status": engagement}));
        }
    }
    Value::Object(out)
}

/// A position in a list ordered newest first: (inserted_at, id), both
/// descending. Opaque to clients: `<microseconds>.<uuid>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub inserted_at: Timestamp,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}.{}", self.inserted_at.as_microsecond(), self.id.simple())
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        let (micros, id) = text.split_once('.')?;
        let inserted_at = Timestamp::from_microsecond(micros.parse().ok()?).ok()?;
        Some(Cursor { inserted_at, id: Uuid::parse_str(id).ok()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source() -> MessageSource {
        MessageSource {
            namespace: "ns".into(),
            workflow: "welcome".into(),
            workflow_run_id: Uuid::new_v4(),
            recipient_run_id: Uuid::new_v4(),
            recipient: RecipientKey::user("u1"),
            tenant: Some("acme".into()),
            actor: None,
            data: json!({"project": "p1"}),
            categories: vec![],
        }
    }

    #[test]
    fn statuses_follow_the_outcome() {
        assert_eq!(MessageStatus::of(true, 1), MessageStatus::Sent);
        assert_eq!(MessageStatus::of(true, 3), MessageStatus::Sent);
        assert_eq!(MessageStatus::of(false, 0), MessageStatus::NotSent);
        assert_eq!(MessageStatus::of(false, 5), MessageStatus::Undelivered);
        assert!(MessageStatus::KNOCK.contains(&MessageStatus::NotSent.as_str()));
    }

    #[test]
    fn ids_are_stable_per_recipient_run_and_step() {
        let run = Uuid::new_v4();
        assert_eq!(message_id(run, "email"), message_id(run, "email"));
        assert_ne!(message_id(run, "email"), message_id(run, "sms"));
        assert_ne!(message_id(run, "email"), message_id(Uuid::new_v4(), "email"));
    }

    #[test]
    fn a_delivery_and_its_step_are_the_same_message() {
        let s = source();
        let message = Message {
            step_ref: "hook".into(),
            channel: "hooks".into(),
            channel_type: "http",
            fields: Map::from_iter([("body".to_string(), json!("hi"))]),
            channel_data: None,
            email: None,
            idempotency_key: format!("{}:hook", s.recipient_run_id),
        };
        let attempts = vec![
            AttemptRecord { attempt: 1, time: "2026-01-01T00:00:00Z".into(), status_code: Some(503), error: Some("busy".into()) },
            AttemptRecord { attempt: 2, time: "2026-01-01T00:00:01Z".into(), status_code: Some(200), error: None },
        ];
        let outcome = DeliveryOutcome { ok: true, reason: "Delivered".into(), message: "200".into(), attempts: 2, status_code: Some(200), history: attempts.clone() };
        let now: Timestamp = "2026-01-01T00:00:02Z".parse().unwrap();
        let record = MessageRecord::delivered(&s, &message, &outcome, now);
        assert_eq!(record.status, MessageStatus::Sent);
        assert_eq!(record.inserted_at.to_string(), "2026-01-01T00:00:00Z", "inserted when the first attempt started");
        assert_eq!(record.attempts, attempts);
        assert_eq!(record.content.as_ref().unwrap()["body"], "hi");
        assert_eq!((record.tenant.as_deref(), record.workflow.as_str()), (Some("acme"), "welcome"));

        let step = StepStatus {
            step_ref: "hook".into(),
            state: StepState::Completed,
            reason: Some("Delivered".into()),
            attempts: Some(2),
            status_code: Some(200),
            time: Some(now.to_string()),
            attempt_history: attempts,
            ..Default::default()
        };
        let rebuilt = MessageRecord::from_step(&s, &step, "hooks", "http").unwrap();
        assert_eq!(rebuilt.id, record.id, "the same message");
        assert_eq!((rebuilt.status, rebuilt.content.is_none()), (MessageStatus::Sent, true));
        let skipped = StepStatus { step_ref: "hook".into(), state: StepState::Skipped, ..Default::default() };
        assert!(MessageRecord::from_step(&s, &skipped, "hooks", "http").is_none());
        let refused = StepStatus { step_ref: "hook".into(), state: StepState::Failed, attempts: Some(0), ..Default::default() };
        assert_eq!(MessageRecord::from_step(&s, &refused, "hooks", "http").unwrap().status, MessageStatus::NotSent);
    }

    #[test]
    fn engagement_routes_name_their_change() {
        use EngagementAction::*;
        assert_eq!(EngagementAction::parse("read", true), Some(Read));
        assert_eq!(EngagementAction::parse("read", false), Some(Unread), "DELETE .../read is unread");
        assert_eq!(EngagementAction::parse("unseen", true), Some(Unseen), "the batch route names unseen");
        assert_eq!(EngagementAction::parse("archive", true), Some(Archived), "the bulk route says archive");
        assert_eq!(EngagementAction::parse("interacted", false), None, "interacted cannot be removed");
        assert_eq!(EngagementAction::parse("deleted", true), None);
        assert_eq!(Read.column(), ("read_at", true));
        let t = Timestamp::now();
        let e = Engagement { seen_at: Some(t), read_at: Some(t), ..Default::default() };
        assert_eq!(e.statuses(), vec!["seen", "read"]);
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor { inserted_at: "2026-01-01T00:00:00.123456Z".parse().unwrap(), id: Uuid::new_v4() };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in ["", "abc", "1.2", "x.00000000000000000000000000000000", "99999999999999999999.00000000000000000000000000000000"] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn refs_come_from_the_records_and_the_store() {
        let step = |r: &str, state: StepState, attempts: Option<i32>| StepStatus { step_ref: r.into(), state, attempts, ..Default::default() };
        let steps = vec![
            step("feed", StepState::Completed, Some(1)),
            step("hook", StepState::Failed, Some(3)),
            step("never", StepState::Failed, Some(0)),
            step("maybe", StepState::Skipped, None),
            step("wait", StepState::Completed, None),
        ];
        let stored: StoredStatuses = [("feed".to_string(), ("delivered".to_string(), vec!["seen".to_string()]))].into();
        let refs = refs(&steps, Some(&stored));
        assert_eq!(refs["feed"], json!({"delivery_status": "delivered", "engagement_status": ["seen"]}));
        assert_eq!(refs["hook"]["delivery_status"], "undelivered");
        assert_eq!(refs["never"]["delivery_status"], "not_sent");
        assert_eq!(refs["maybe"]["delivery_status"], "skipped");
        assert!(refs.get("wait").is_none(), "a delay is no message");
        assert_eq!(super::refs(&steps, None)["feed"], json!({"delivery_status": "sent", "engagement_status": []}));
    }
}
