//! Delivery of rendered messages.
//!
//! Until real channels land (HTTP, chat, SMTP), a channel step records the
//! message it would send, so the flow can be followed end to end.

use crate::core::execution::{DeliveryOutcome, Message};

use super::conditions::truncate;

/// Sends messages through channels.
#[derive(Default)]
pub struct Deliverer {}

impl Deliverer {
    pub fn new() -> Self {
        Deliverer {}
    }

    /// Delivers one message; the outcome is recorded on the recipient's step.
    pub async fn deliver(&self, _namespace: &str, message: &Message) -> DeliveryOutcome {
        let summary = serde_json::to_string(&message.fields).unwrap_or_default();
        DeliveryOutcome {
            ok: true,
            reason: "WouldSend".into(),
            message: truncate(&format!("would send via {} ({}): {summary}", message.channel, message.channel_type), 400),
            attempts: 0,
            status_code: None,
        }
    }
}
