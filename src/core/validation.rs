//! Trigger data validation against a workflow's `dataSchema` (JSON Schema,
//! draft 2020-12 unless `$schema` says otherwise).
//!
//! Schemas come from users, so compiling one never touches the network or the
//! file system: every external `$ref` (and unknown `$schema` meta-schema) is a
//! compile error.

use std::fmt::Write as _;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{Retrieve, Uri, Validator};
use serde_json::Value;

use super::truncate;

/// At most this many errors are listed by [`summarize`]; the rest are counted.
const SUMMARY_ENTRIES: usize = 20;
/// Error messages echo the failing instance, which may be a large part of the
/// trigger's data; they are cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// A compiled `dataSchema`, shareable across tasks.
#[derive(Debug)]
pub struct DataSchema {
    validator: Validator,
}

/// One way the data breaks the schema.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DataError {
    /// JSON pointer of the failing location, `/` for the root. For a missing
    /// `required` property it points at the missing property itself
    /// (`/comment_text`), which is what a user has to add.
    pub pointer: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("dataSchema does not compile: {0}")]
    Invalid(String),
}

/// Refuses every external resource, so that a schema can neither make the
/// operator fetch a URL nor read a local file. Set explicitly (rather than
/// relying on jsonschema's default features being off) so that a feature
/// enabled elsewhere in the dependency graph cannot turn retrieval back on.
struct NoExternalRefs;

impl Retrieve for NoExternalRefs {
    fn retrieve(&self, uri: &Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("external references are not allowed in dataSchema (cannot resolve {uri})").into())
    }
}

impl DataSchema {
    /// Compiles `schema`. The schema itself is validated against its
    /// meta-schema, so e.g. `{"type": 12}` or `{"type": "strin"}` is an error.
    pub fn compile(schema: &Value) -> Result<Self, SchemaError> {
        let validator = jsonschema::options().with_retriever(NoExternalRefs).build(schema).map_err(|e| {
            let at = e.instance_path();
            let message = if at.is_empty() { e.to_string() } else { format!("at {at}: {e}") };
            SchemaError::Invalid(truncate(&message, MAX_MESSAGE_CHARS))
        })?;
        Ok(DataSchema { validator })
    }

    /// Every way `data` breaks the schema, sorted by pointer then message (and
    /// deduplicated) so that statuses and Events do not flap between runs.
    /// Empty when `data` is valid.
    pub fn validate(&self, data: &Value) -> Vec<DataError> {
        let mut errors: Vec<DataError> = self
            .validator
            .iter_errors(data)
            .map(|e| {
                let mut pointer = e.instance_path().as_str().to_string();
                if let ValidationErrorKind::Required { property: Value::String(name) } = e.kind() {
                    pointer.push('/');
                    pointer.push_str(&escape_pointer_segment(name));
                }
                if pointer.is_empty() {
                    pointer.push('/');
                }
                DataError { pointer, message: truncate(&e.to_string(), MAX_MESSAGE_CHARS) }
            })
            .collect();
        errors.sort_by(|a, b| a.pointer.cmp(&b.pointer).then_with(|| a.message.cmp(&b.message)));
        errors.dedup();
        errors
    }
}

/// Knock requires a trigger's `data` to be a JSON object.
pub fn require_object(data: &Value) -> Result<(), DataError> {
    let got = match data {
        Value::Object(_) => return Ok(()),
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
    };
    Err(DataError { pointer: "/".into(), message: format!("data must be a JSON object, got {got}") })
}

/// A one-line summary, `"/a: msg; /b: msg"`, listing at most 20 errors and
/// then `… and N more`: it goes into status conditions and Events, which must
/// stay small. Empty for no errors.
pub fn summarize(errors: &[DataError]) -> String {
    let mut out = String::new();
    for (i, e) in errors.iter().take(SUMMARY_ENTRIES).enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        // Messages may contain newlines (from echoed strings); keep one line.
        let message = e.message.split_whitespace().collect::<Vec<_>>().join(" ");
        let _ = write!(out, "{}: {message}", e.pointer);
    }
    if errors.len() > SUMMARY_ENTRIES {
        let _ = write!(out, "; … and {} more", errors.len() - SUMMARY_ENTRIES);
    }
    out
}

/// RFC 6901 escaping of one reference token.
fn escape_pointer_segment(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn comment_schema() -> DataSchema {
        DataSchema::compile(&json!({
            "type": "object",
            "required": ["comment_text", "count"],
            "properties": {
                "comment_text": {"type": "string"},
                "count": {"type": "integer", "minimum": 0},
                "author": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}
                }
            }
        }))
        .expect("schema compiles")
    }

    #[test]
    fn valid_data_gives_no_errors() {
        let errors = comment_schema().validate(&json!({"comment_text": "hi", "count": 2, "author": {"name": "A"}}));
        assert_eq!(errors, vec![]);
    }

    #[test]
    fn missing_required_property_points_at_the_property() {
        let errors = comment_schema().validate(&json!({"count": 1}));
        assert_eq!(errors, vec![DataError { pointer: "/comment_text".into(), message: "\"comment_text\" is a required property".into() }]);
    }

    #[test]
    fn wrong_type_at_a_nested_pointer() {
        let errors = comment_schema().validate(&json!({"comment_text": "x", "count": 1, "author": {"tags": ["a", 5]}}));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].pointer, "/author/tags/1");
        assert!(errors[0].message.contains("is not of type \"string\""), "{}", errors[0].message);
    }

    #[test]
    fn every_error_is_reported_sorted() {
        let errors = comment_schema().validate(&json!({"count": -1, "author": {"name": 3}}));
        let pointers: Vec<&str> = errors.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(pointers, vec!["/author/name", "/comment_text", "/count"], "{errors:?}");
        assert!(errors[2].message.contains("minimum") || errors[2].message.contains("less than"), "{errors:?}");
    }

    #[test]
    fn root_errors_use_slash() {
        let errors = comment_schema().validate(&json!("nope"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].pointer, "/");
    }

    #[test]
    fn bad_schemas_fail_to_compile_with_a_message() {
        for schema in [json!({"type": 12}), json!({"type": "strin"}), json!({"properties": {"a": {"minimum": "x"}}})] {
            let err = DataSchema::compile(&schema).expect_err(&schema.to_string()).to_string();
            assert!(err.starts_with("dataSchema does not compile: "), "{err}");
            assert!(err.len() > "dataSchema does not compile: ".len(), "{err}");
        }
    }

    #[test]
    fn external_refs_are_compile_errors_not_fetches() {
        for schema in [
            json!({"$ref": "https://example.com/schema.json"}),
            json!({"properties": {"a": {"$ref": "http://127.0.0.1:9/x.json"}}}),
            json!({"$ref": "file:///etc/passwd"}),
            json!({"$schema": "https://example.com/my-meta-schema", "type": "object"}),
        ] {
            let err = DataSchema::compile(&schema).expect_err(&schema.to_string()).to_string();
            assert!(err.starts_with("dataSchema does not compile: "), "{err}");
        }
        // Local references still work.
        let s = DataSchema::compile(&json!({
            "$defs": {"name": {"type": "string"}},
            "properties": {"a": {"$ref": "#/$defs/name"}}
        }))
        .expect("local $ref compiles");
        assert_eq!(s.validate(&json!({"a": 1}))[0].pointer, "/a");
    }

    #[test]
    fn require_object_rejects_non_objects() {
        assert_eq!(require_object(&json!({})), Ok(()));
        assert_eq!(require_object(&json!("x")), Err(DataError { pointer: "/".into(), message: "data must be a JSON object, got a string".into() }));
        assert_eq!(require_object(&json!([1])).unwrap_err().message, "data must be a JSON object, got an array");
        assert_eq!(require_object(&Value::Null).unwrap_err().message, "data must be a JSON object, got null");
    }

    #[test]
    fn summary_is_one_line_and_bounded() {
        assert_eq!(summarize(&[]), "");
        let two = vec![
            DataError { pointer: "/comment_text".into(), message: "\"comment_text\" is a required property".into() },
            DataError { pointer: "/count".into(), message: "a\nb".into() },
        ];
        assert_eq!(summarize(&two), "/comment_text: \"comment_text\" is a required property; /count: a b");

        let many: Vec<DataError> = (0..25).map(|i| DataError { pointer: format!("/{i}"), message: "bad".into() }).collect();
        let s = summarize(&many);
        assert!(s.starts_with("/0: bad; /1: bad"), "{s}");
        assert!(s.contains("/19: bad") && !s.contains("/20: bad"), "{s}");
        assert!(s.ends_with("; … and 5 more"), "{s}");
    }

    #[test]
    fn long_messages_are_truncated() {
        let schema = DataSchema::compile(&json!({"properties": {"a": {"type": "number"}}})).expect("compiles");
        let big = "x".repeat(10_000);
        let errors = schema.validate(&json!({"a": big}));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert!(errors[0].message.ends_with('…'));
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hé", 2), "hé");
    }

    #[test]
    fn compiled_schema_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<DataSchema>();
    }
}
