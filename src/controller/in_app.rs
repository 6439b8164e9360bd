//! In-app feed steps: the message is the notification, so "delivering" it
//! is storing it in the history store (straight to `delivered`) and
//! announcing it to the replicas whose sockets show that user's feed.
//! Attempts and backoff follow the Channel's retry settings, as a webhook's
//! do; the fence is checked before each, as for every delivery.

use jiff::Timestamp;

use super::delivery::Fenced;
use super::Context;
use crate::core::execution::{DeliveryOutcome, Message};
use crate::core::feed;
use crate::core::history::{MessageRecord, MessageSource, MessageStatus};
use crate::core::model::RecipientKey;
use crate::core::status::AttemptRecord;
use crate::core::truncate;
use crate::delivery::retry::RetryPolicy;
use crate::store::messages::{self, Conflict};

/// Why an in-app step could not be stored.
pub const STORE_REQUIRED: &str = "HistoryStoreRequired";
pub const STORE_UNAVAILABLE: &str = "StoreUnavailable";

/// Stores one in-app message; the outcome is recorded on the recipient's step.
pub async fn deliver(ctx: &Context, namespace: &str, source: &MessageSource, message: &Message) -> Result<DeliveryOutcome, Fenced> {
    let Some(history) = &ctx.history else {
        return Ok(failed(STORE_REQUIRED, "an in_app_feed channel needs the history store (--database-url)".into(), 0, Vec::new()));
    };
    let policy =
        ctx.stores.channels.get(namespace, &message.channel).map(|c| RetryPolicy::for_channel(&c.spec.retry)).unwrap_or_else(|| RetryPolicy::for_channel(&Default::default()));
    let mut content = message.fields.clone();
    content.insert("blocks".into(), serde_json::Value::Array(feed::blocks(&message.fields)));
    let mut history_records = Vec::new();
    let mut attempt = 0;
    loop {
        attempt += 1;
        if !ctx.fence.holds() {
            return Err(Fenced);
        }
        let now = Timestamp::now();
        let record = MessageRecord {
            status: MessageStatus::Delivered,
            reason: "Delivered".into(),
            content: Some(content.clone()),
            attempts: history_records.clone(),
            ..MessageRecord::delivered(source, message, &DeliveryOutcome { ok: true, attempts: attempt as i32, ..Default::default() }, now)
        };
        let stored = messages::insert(&history.store, std::slice::from_ref(&record), Conflict::Update).await;
        history_records.push(AttemptRecord {
            attempt: attempt as i32,
            time: now.to_string(),
            status_code: None,
            error: stored.as_ref().err().map(|e| truncate(&e.to_string(), 200)),
        });
        match stored {
            Ok(()) => {
                if let RecipientKey::User(user) = &source.recipient {
                    // Best effort: a missed announcement only delays the badge until the next fetch.
                    if let Err(e) = crate::store::feed::notify(&history.store, namespace, &message.channel, user).await {
                        tracing::debug!(error = %e, "announcing a feed message");
                    }
                }
                return Ok(DeliveryOutcome {
                    ok: true,
                    reason: "Delivered".into(),
                    message: "stored in the in-app feed".into(),
                    attempts: attempt as i32,
                    status_code: None,
                    history: if attempt > 1 { history_records } else { Vec::new() },
                });
            }
            Err(e) if attempt < policy.max_attempts => {
                tracing::debug!(error = %e, attempt, "storing a feed message; retrying");
                tokio::time::sleep(policy.wait(attempt, None)).await;
            }
            Err(e) => return Ok(failed(STORE_UNAVAILABLE, format!("the history store did not take the message after {attempt} attempts: {e}"), attempt as i32, history_records)),
        }
    }
}

fn failed(reason: &str, message: String, attempts: i32, history: Vec<AttemptRecord>) -> DeliveryOutcome {
    DeliveryOutcome { ok: false, reason: reason.into(), message: truncate(&message, 400), attempts, status_code: None, history }
}
