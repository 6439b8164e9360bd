//! Kubernetes conditions, written so that a reconcile that changes nothing
//! writes nothing: lastTransitionTime only moves when the status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::core::truncate;

/// Condition statuses.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// Sets (or replaces) the condition of `type_`, keeping its lastTransitionTime
/// when its status does not change. Conditions stay sorted by type.
pub fn set(conditions: &mut Vec<Condition>, type_: &str, status: &str, reason: &str, message: &str, generation: Option<i64>) {
    let existing = conditions.iter().find(|c| c.type_ == type_);
    let last_transition_time = match existing {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(Timestamp::now()),
    };
    let condition = Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: truncate(message, 4000),
        observed_generation: generation,
        last_transition_time,
    };
    conditions.retain(|c| c.type_ != type_);
    conditions.push(condition);
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// Removes the condition of `type_`.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// Finds the condition of `type_`.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let mut conditions = Vec::new();
        set(&mut conditions, "Ready", FALSE, "Invalid", "bad", Some(1));
        let first = conditions[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        set(&mut conditions, "Ready", FALSE, "Invalid", "still bad", Some(2));
        assert_eq!(conditions[0].last_transition_time, first);
        assert_eq!(conditions[0].message, "still bad");
        set(&mut conditions, "Ready", TRUE, "Valid", "", Some(2));
        assert_ne!(conditions[0].last_transition_time, first);
        set(&mut conditions, "Accepted", TRUE, "Valid", "", Some(2));
        assert_eq!(conditions.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(), ["Accepted", "Ready"]);
    }
}
