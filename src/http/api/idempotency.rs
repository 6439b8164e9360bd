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
/// The canonical text is hashed as it is written, never held whole: a trigger
/// computes this on every request.
pub fn fingerprint(params: &Value) -> String {
    let mut hasher = Sha256::new();
    write_canonical(params, &mut hasher);
    let mut hex = String::with_capacity(64);
    for b in hasher.finalize() {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    hex
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Canonical JSON into the hash: compact, object keys sorted; strings and
/// numbers as serde_json writes them (stored fingerprints must not change).
fn write_canonical(value: &Value, out: &mut Sha256) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.update(b"{");
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.update(b",");
                }
                write_json(key, out);
                out.update(b":");
                write_canonical(&map[key], out);
            }
            out.update(b"}");
        }
        Value::Array(items) => {
            out.update(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.update(b",");
                }
                write_canonical(item, out);
            }
            out.update(b"]");
        }
        other => write_json(other, out),
    }
}

/// A scalar or a key as compact JSON, straight into the hash.
fn write_json<T: serde::Serialize + ?Sized>(value: &T, out: &mut Sha256) {
    struct Sink<'a>(&'a mut Sha256);
    impl std::io::Write for Sink<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // Strings and scalars always serialize; the sink never fails.
    let _ = serde_json::to_writer(Sink(out), value);
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

    /// The text hashed before fingerprints were streamed: runs keep their
    /// fingerprint in an annotation, so the bytes must stay the same.
    fn reference(value: &Value, out: &mut String) {
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
                    reference(&map[key], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    reference(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }

    #[test]
    fn fingerprints_hash_the_same_text_as_before() {
        let params = json!({
            "workflow": "w", "recipients": ["u1", {"id": "p", "collection": "c", "name": "Ünïcødé \"q\" \\ \n\t\u{1}"}],
            "audiences": [], "actor": null, "tenant": {"id": "t", "settings": {"z": 1, "a": [true, false, null]}},
            "data": {"b": [1, -2, 2.5, 1e300, 12345678901234567890u64, "x\"y"], "a": {"é": true, "z": null, "": ""}},
            "cancellation_key": "k",
        });
        let mut text = String::new();
        reference(&params, &mut text);
        let expected: String = Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(fingerprint(&params), expected);
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("k", "abc").is_ok());
        assert!(check_key("k", "").is_err());
        assert!(check_key("k", &"a".repeat(256)).is_err());
        assert!(check_key("k", &"a".repeat(255)).is_ok());
    }
}
