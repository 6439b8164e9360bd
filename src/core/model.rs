//! herald's domain model, free of Kubernetes and HTTP types: how recipients,
//! objects, tenants and preference sets are identified and parsed.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A JSON object.
pub type JsonObject = Map<String, Value>;

/// Who a recipient (or actor) is: a user, or an object in a collection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RecipientKey {
    /// An object, `{id, collection}`.
    Object { collection: String, id: String },
    /// A user id.
    User(String),
}

impl RecipientKey {
    pub fn user(id: impl Into<String>) -> Self {
        RecipientKey::User(id.into())
    }
    pub fn object(collection: impl Into<String>, id: impl Into<String>) -> Self {
        RecipientKey::Object { collection: collection.into(), id: id.into() }
    }
    /// The canonical key a recipient run id is derived from: `user:<id>` or
    /// `object:<collection>:<id>` (ids may contain `:`, so the collection never
    /// does in practice; the prefix keeps users and objects apart).
    pub fn canonical(&self) -> String {
        match self {
            RecipientKey::User(id) => format!("user:{id}"),
            RecipientKey::Object { collection, id } => format!("object:{collection}:{id}"),
        }
    }
    pub fn is_object(&self) -> bool {
        matches!(self, RecipientKey::Object { .. })
    }
    pub fn id(&self) -> &str {
        match self {
            RecipientKey::User(id) | RecipientKey::Object { id, .. } => id,
        }
    }
}

impl fmt::Display for RecipientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecipientKey::User(id) => write!(f, "{id}"),
            RecipientKey::Object { collection, id } => write!(f, "{collection}/{id}"),
        }
    }
}

/// A recipient as written in a trigger, before it is resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum RecipientInput {
    /// A reference to a user or object identified earlier.
    Reference(RecipientKey),
    /// A complete recipient, identified (created or updated) before the run.
    Inline(InlineRecipient),
}

impl RecipientInput {
    pub fn key(&self) -> &RecipientKey {
        match self {
            RecipientInput::Reference(k) => k,
            RecipientInput::Inline(i) => &i.key,
        }
    }
}

/// An inline user or object: its identity plus what to set on it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct InlineRecipient {
    pub key: RecipientKey,
    /// Every other property (name, email, ...), set on the user or object.
    pub properties: JsonObject,
    pub channel_data: JsonObject,
    pub preferences: BTreeMap<String, PreferenceSet>,
    /// Merged over the trigger's data for this recipient only.
    pub trigger_data: JsonObject,
}

impl Default for RecipientKey {
    fn default() -> Self {
        RecipientKey::User(String::new())
    }
}

/// Why a recipient identifier could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    #[error("a recipient must be a user id string or an object with an `id`, got {0}")]
    WrongType(&'static str),
    #[error("a recipient's `id` must be a non-empty string")]
    MissingId,
    #[error("a recipient's `collection` must be a non-empty string")]
    BadCollection,
    #[error("`{field}` must be a JSON object")]
    NotAnObject { field: &'static str },
    #[error("preference set `{id}` is invalid: {message}")]
    BadPreferences { id: String, message: String },
}

/// "a string", "an object", ...: how error messages name a JSON value's type.
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn take_object(map: &mut JsonObject, field: &'static str) -> Result<JsonObject, IdentifierError> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(JsonObject::new()),
        Some(Value::Object(o)) => Ok(o),
        Some(_) => Err(IdentifierError::NotAnObject { field }),
    }
}

/// Reads a recipient identifier in Knock's shapes: `"user_1"`,
/// `{"id", "collection"}`, or an inline user/object with more properties.
pub fn parse_recipient(value: &Value) -> Result<RecipientInput, IdentifierError> {
    match value {
        Value::String(s) if !s.is_empty() => Ok(RecipientInput::Reference(RecipientKey::User(s.clone()))),
        Value::String(_) => Err(IdentifierError::MissingId),
        Value::Object(map) => {
            let mut map = map.clone();
            let id = match map.remove("id") {
                Some(Value::String(s)) if !s.is_empty() => s,
                _ => return Err(IdentifierError::MissingId),
            };
            let key = match map.remove("collection") {
                None | Some(Value::Null) => RecipientKey::User(id),
                Some(Value::String(c)) if !c.is_empty() => RecipientKey::Object { collection: c, id },
                Some(_) => return Err(IdentifierError::BadCollection),
            };
            if map.is_empty() {
                return Ok(RecipientInput::Reference(key));
            }
            let channel_data = take_object(&mut map, "channel_data")?;
            let trigger_data = take_object(&mut map, "$trigger_data")?;
            let preferences = parse_preference_sets(&take_object(&mut map, "preferences")?)?;
            Ok(RecipientInput::Inline(InlineRecipient { key, properties: map, channel_data, preferences, trigger_data }))
        }
        other => Err(IdentifierError::WrongType(json_type_name(other))),
    }
}

/// Reads a map of preference-set id → PreferenceSet.
pub fn parse_preference_sets(map: &JsonObject) -> Result<BTreeMap<String, PreferenceSet>, IdentifierError> {
    map.iter()
        .map(|(id, v)| {
            serde_json::from_value::<PreferenceSet>(v.clone()).map(|set| (id.clone(), set)).map_err(|e| IdentifierError::BadPreferences { id: id.clone(), message: e.to_string() })
        })
        .collect()
}

/// A tenant as written in a trigger: an id, or an inline tenant.
#[derive(Clone, Debug, PartialEq)]
pub enum TenantInput {
    Reference(String),
    Inline { id: String, properties: JsonObject, preference_set: Option<PreferenceSet> },
}

impl TenantInput {
    pub fn id(&self) -> &str {
        match self {
            TenantInput::Reference(id) | TenantInput::Inline { id, .. } => id,
        }
    }
}

/// Reads a tenant: `"acme"` or `{"id": "acme", "name": ..., "settings": {"preference_set": ...}}`.
pub fn parse_tenant(value: &Value) -> Result<TenantInput, IdentifierError> {
    match value {
        Value::String(s) if !s.is_empty() => Ok(TenantInput::Reference(s.clone())),
        Value::Object(map) => {
            let mut map = map.clone();
            let id = match map.remove("id") {
                Some(Value::String(s)) if !s.is_empty() => s,
                _ => return Err(IdentifierError::MissingId),
            };
            if map.is_empty() {
                return Ok(TenantInput::Reference(id));
            }
            let mut settings = take_object(&mut map, "settings")?;
            let preference_set = match settings.remove("preference_set").or_else(|| settings.remove("preferenceSet")) {
                None | Some(Value::Null) => None,
                Some(v) => Some(serde_json::from_value(v).map_err(|e| IdentifierError::BadPreferences { id: "tenant".into(), message: e.to_string() })?),
            };
            if !settings.is_empty() {
                map.insert("settings".into(), Value::Object(settings));
            }
            Ok(TenantInput::Inline { id, properties: map, preference_set })
        }
        Value::String(_) => Err(IdentifierError::MissingId),
        other => Err(IdentifierError::WrongType(json_type_name(other))),
    }
}

/// A Knock PreferenceSet. Unset entries allow; a message is sent only if every
/// applicable setting allows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreferenceSet {
    /// Per workflow key: `true`/`false`, or `{channel_types: {email: false, ...}}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub workflows: BTreeMap<String, PreferenceSetting>,
    /// Per workflow category: `true`/`false`, or `{channel_types: {...}}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub categories: BTreeMap<String, PreferenceSetting>,
    /// Per channel type (email, chat, http, sms, push, in_app_feed): `true`/`false`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub channel_types: BTreeMap<String, bool>,
}

/// A workflow or category preference: a boolean, or per-channel-type booleans.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PreferenceSetting {
    Enabled(bool),
    PerChannelType {
        #[serde(default)]
        channel_types: BTreeMap<String, bool>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_recipient_shape() {
        assert_eq!(parse_recipient(&json!("user_1")).unwrap(), RecipientInput::Reference(RecipientKey::user("user_1")));
        assert_eq!(parse_recipient(&json!({"id": "p1", "collection": "projects"})).unwrap(), RecipientInput::Reference(RecipientKey::object("projects", "p1")));
        assert_eq!(parse_recipient(&json!({"id": "u"})).unwrap(), RecipientInput::Reference(RecipientKey::user("u")));
        let RecipientInput::Inline(inline) = parse_recipient(&json!({
            "id": "user_9", "name": "Nine", "channel_data": {"hooks": {"url": "http://x"}},
            "$trigger_data": {"extra": 1}, "preferences": {"default": {"channel_types": {"email": false}}}
        }))
        .unwrap() else {
            panic!("expected inline")
        };
        assert_eq!(inline.key, RecipientKey::user("user_9"));
        assert_eq!(inline.properties, json!({"name": "Nine"}).as_object().unwrap().clone());
        assert_eq!(inline.trigger_data["extra"], 1);
        assert!(!inline.preferences["default"].channel_types["email"]);
        assert!(inline.channel_data.contains_key("hooks"));
    }

    #[test]
    fn rejects_bad_identifiers_with_a_reason() {
        assert_eq!(parse_recipient(&json!(5)).unwrap_err(), IdentifierError::WrongType("a number"));
        assert_eq!(parse_recipient(&json!("")).unwrap_err(), IdentifierError::MissingId);
        assert_eq!(parse_recipient(&json!({"name": "x"})).unwrap_err(), IdentifierError::MissingId);
        assert_eq!(parse_recipient(&json!({"id": "x", "collection": 3})).unwrap_err(), IdentifierError::BadCollection);
        assert_eq!(parse_recipient(&json!({"id": "x", "channel_data": []})).unwrap_err(), IdentifierError::NotAnObject { field: "channel_data" });
        assert!(matches!(parse_recipient(&json!({"id": "x", "preferences": {"default": {"bogus": 1}}})).unwrap_err(), IdentifierError::BadPreferences { .. }));
    }

    #[test]
    fn canonical_keys_keep_users_and_objects_apart() {
        assert_ne!(RecipientKey::user("a").canonical(), RecipientKey::object("user", "a").canonical());
        assert_eq!(RecipientKey::object("projects", "p1").canonical(), "object:projects:p1");
    }

    #[test]
    fn parses_tenants() {
        assert_eq!(parse_tenant(&json!("acme")).unwrap(), TenantInput::Reference("acme".into()));
        let TenantInput::Inline { id, properties, preference_set } =
            parse_tenant(&json!({"id": "acme", "name": "Acme", "settings": {"preference_set": {"channel_types": {"email": false}}}})).unwrap()
        else {
            panic!()
        };
        assert_eq!(id, "acme");
        assert_eq!(properties["name"], "Acme");
        assert!(!preference_set.unwrap().channel_types["email"]);
        assert!(parse_tenant(&json!(1)).is_err());
    }
}
