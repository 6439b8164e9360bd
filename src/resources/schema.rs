//! Schema helpers shared by the resource types: free-form JSON fields and
//! condition lists in the shapes Kubernetes' structural schemas expect.

use schemars::{json_schema, Schema, SchemaGenerator};

/// A free-form JSON object kept as written (`x-kubernetes-preserve-unknown-fields`).
pub fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// A list of free-form JSON objects.
pub fn free_form_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
    })
}

/// Any JSON value: a structural schema cannot say "string or object", so such
/// fields (recipient identifiers, tenants) are checked by herald itself, which
/// reports a clear error naming the bad entry.
pub fn any_value(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Standard Kubernetes conditions, as a map-list keyed by `type`.
pub fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["type"]));
    schema
}

/// A list of recipient identifiers (strings or objects, checked by herald).
pub fn recipient_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"x-kubernetes-preserve-unknown-fields": true},
    })
}
