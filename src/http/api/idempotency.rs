//! Idempotent triggers, stored in the cluster so they hold across replicas and
//! restarts: a trigger with a key becomes the TriggerRun named after a hash of
//! (API, namespace, key), so the Kubernetes API itself refuses a second one
//! (409), however many replicas race. The run carries a fingerprint of the
//! request's parameters (an annotation), which tells a replay (same
//! parameters: the original response again) from a misuse (422). Runs with a
//! key are kept at least 7 days by the TriggerRun reconciler.

use axum::http::HeaderMap;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::errors::ApiError;
use crate::core::ids::short_hash;

/// The request header of Knock's idempotent trigger.
pub const HEADER: &str = "idempotency-key";
/// The response header marking a replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
pub use crate::resources::trigger_run::FINGERPRINT_ANNOTATION;
/// Longest key accepted (Knock's limit).
pub const MAX_KEY_CHARS: usize = 255;

/// Which API a key belongs to: the header of the trigger API and the body
/// field of the older notify API are separate key spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Trigger,
    Notify,
}

impl Scope {
    fn label(self) -> &'static str {
        match self {
            Scope::Trigger => "trigger",
            Scope::Notify => "notify",
        }
    }
}

/// The name of the TriggerRun that holds `key` in `namespace`.
pub fn run_name(scope: Scope, namespace: &str, key: &str) -> String {
    format!("idem-{}-{}", scope.label(), short_hash(&format!("{}\u{0}{namespace}\u{0}{key}", scope.label()), 40))
}

/// Checks a key: 1 to 255 characters, no control characters.
pub fn check_key(field: &str, key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        Err(ApiError::invalid(field, "must not be empty"))
    } else if key.chars().count() > MAX_KEY_CHARS {
        Err(ApiError::invalid(field, format!("must be at most {MAX_KEY_CHARS} characters")))
    } else if key.chars().any(char::is_control) {
        Err(ApiError::invalid(field, "must not contain control characters"))
    } else {
        Ok(())
    }
}

/// The `Idempotency-Key` header, if sent.
pub fn header_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(HEADER) else { return Ok(None) };
    let key = value.to_str().map_err(|_| ApiError::invalid("Idempotency-Key", "must be visible ASCII text"))?.to_string();
    check_key("Idempotency-Key", &key)?;
    Ok(Some(key))
}

/// A fingerprint of a request's parameters: the SHA-256 of their canonical
/// JSON (object keys sorted at every level), so key order does not matter.
pub fn fingerprint(params: &Value) -> String {
    let mut canonical = String::new();
    write_canonical(params, &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_valid_distinct_and_stable() {
        let a = run_name(Scope::Trigger, "ns", "k1");
        assert_eq!(a, run_name(Scope::Trigger, "ns", "k1"));
        assert!(crate::core::ids::is_dns_subdomain(&a), "{a}");
        assert_ne!(a, run_name(Scope::Trigger, "ns", "k2"));
        assert_ne!(a, run_name(Scope::Trigger, "ns2", "k1"));
        assert_ne!(a, run_name(Scope::Notify, "ns", "k1"));
        assert!(crate::core::ids::is_dns_subdomain(&run_name(Scope::Notify, "ns", &"é".repeat(255))));
    }

    #[test]
    fn fingerprints_ignore_key_order_only() {
        let a = fingerprint(&json!({"a": 1, "b": {"x": [1, 2], "y": null}}));
        assert_eq!(a, fingerprint(&json!({"b": {"y": null, "x": [1, 2]}, "a": 1})));
        assert_ne!(a, fingerprint(&json!({"a": 1, "b": {"x": [2, 1], "y": null}})));
        assert_ne!(a, fingerprint(&json!({"a": 2, "b": {"x": [1, 2], "y": null}})));
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("k", "abc").is_ok());
        assert!(check_key("k", "").is_err());
        assert!(check_key("k", &"a".repeat(256)).is_err());
        assert!(check_key("k", &"a".repeat(255)).is_ok());
    }
}
