//! The `Object` kind: a Knock object (a project, a team, a channel...) that
//! can receive notifications itself and fan out to its subscribers.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::model::{JsonObject, PreferenceSet};

/// An object in a collection, with subscribers that a trigger for it fans out to.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A Knock object (a project, a team, a chat channel...) that can receive notifications itself and fans out to its subscribers.",
    version = "v1alpha1",
    kind = "Object",
    plural = "objects",
    namespaced,
    shortname = "hobj",
    category = "herald",
    printcolumn = r#"{"name":"Collection","type":"string","jsonPath":".spec.collection"}"#,
    printcolumn = r#"{"name":"ID","type":"string","jsonPath":".spec.id"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ObjectSpec {
    /// The collection the object belongs to, e.g. `projects`.
    pub collection: String,
    /// The object's id within its collection.
    pub id: String,
    /// Any properties, visible to templates as `recipient.<key>`.
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub properties: JsonObject,
    /// Per channel (a Channel name): channel-specific data, e.g. a chat webhook `{chat: {url: ...}}`.
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub channel_data: JsonObject,
    /// Preference sets by id; `default` applies everywhere.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub preferences: BTreeMap<String, PreferenceSet>,
    /// Who is subscribed: users or other objects (nested at most two levels).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribers: Vec<Subscription>,
}

/// A subscription of a recipient to an object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Subscription {
    /// The subscriber: a user id string, or an object reference `{id, collection}`.
    #[schemars(schema_with = "crate::resources::schema::any_value")]
    pub recipient: Value,
    /// Properties of the subscription, visible to templates as `recipient.subscription`.
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub properties: JsonObject,
}
