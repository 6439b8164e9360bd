//! The `User` kind: a Knock user, a person who receives notifications.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::model::{JsonObject, PreferenceSet};

/// A user who can receive notifications. Identified by `id` (any string);
/// metadata.name may be anything, herald always looks users up by id.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A user who can receive notifications, identified by spec.id (any string).",
    version = "v1alpha1",
    kind = "User",
    namespaced,
    category = "herald",
    printcolumn = r#"{"name":"ID","type":"string","jsonPath":".spec.id"}"#,
    printcolumn = r#"{"name":"Name","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Email","type":"string","jsonPath":".spec.email"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    /// The user's id, as your application knows it (e.g. `user_1`).
    pub id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Email address, the default `to` of email steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Phone number (E.164).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    /// IANA time zone, e.g. `Europe/Paris`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Any other properties, visible to templates as `recipient.<key>`.
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub properties: JsonObject,
    /// Per channel (a Channel name): channel-specific data, e.g. `{hooks: {url: ...}}`.
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub channel_data: JsonObject,
    /// Preference sets by id; `default` applies everywhere.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub preferences: BTreeMap<String, PreferenceSet>,
    /// Tenant-specific preference sets, by tenant id; they win over the tenant's defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenant_preferences: BTreeMap<String, PreferenceSet>,
}
