//! Identify: create or update the User, Object or Tenant an inline recipient,
//! actor or tenant describes, before the workflow runs for it (Knock's rule).
//! The resource is found by id (any metadata.name); a new one gets a name
//! derived from the id.

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

use crate::core::ids;
use crate::core::model::{InlineRecipient, JsonObject, RecipientKey, TenantInput};
use crate::resources::{Object, ObjectSpec, Tenant, TenantSpec, User, UserSpec};

use super::Stores;

const IDENTIFY_MANAGER: &str = "herald-identify";

fn take_string(map: &mut JsonObject, key: &str) -> Option<String> {
    match map.get(key) {
        Some(Value::String(_)) => map.remove(key).and_then(|v| v.as_str().map(str::to_string)),
        _ => None,
    }
}

/// The existing User with this id, from the cache.
pub fn find_user(stores: &Stores, namespace: &str, id: &str) -> Option<std::sync::Arc<User>> {
    stores.users.find(|u| u.namespace().as_deref() == Some(namespace) && u.spec.id == id)
}

/// The existing Object, from the cache.
pub fn find_object(stores: &Stores, namespace: &str, collection: &str, id: &str) -> Option<std::sync::Arc<Object>> {
    stores.objects.find(|o| o.namespace().as_deref() == Some(namespace) && o.spec.collection == collection && o.spec.id == id)
}

/// The existing Tenant, from the cache.
pub fn find_tenant(stores: &Stores, namespace: &str, id: &str) -> Option<std::sync::Arc<Tenant>> {
    stores.tenants.find(|t| t.namespace().as_deref() == Some(namespace) && t.spec.id == id)
}

/// Merges Knock-shaped user properties into a user spec: the typed fields
/// (name, email, phone_number, timezone) go to their fields, the rest to properties.
pub fn merge_user(spec: &mut UserSpec, properties: &JsonObject, channel_data: &JsonObject, preferences: &std::collections::BTreeMap<String, crate::core::model::PreferenceSet>) {
    let mut properties = properties.clone();
    if let Some(v) = take_string(&mut properties, "name") {
        spec.name = Some(v);
    }
    if let Some(v) = take_string(&mut properties, "email") {
        spec.email = Some(v);
    }
    if let Some(v) = take_string(&mut properties, "phone_number") {
        spec.phone_number = Some(v);
    }
    if let Some(v) = take_string(&mut properties, "timezone") {
        spec.timezone = Some(v);
    }
    spec.properties.extend(properties);
    spec.channel_data.extend(channel_data.clone());
    spec.preferences.extend(preferences.clone());
}

async fn apply<K>(client: &Client, namespace: &str, name: &str, object: &K) -> Result<K, kube::Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(name, &PatchParams::apply(IDENTIFY_MANAGER).force(), &Patch::Apply(object)).await
}

/// A recipient as stored after identify.
pub enum Identified {
    User(User),
    Object(Object),
}

/// Creates or updates the User or Object an inline recipient describes.
pub async fn identify_recipient(client: &Client, stores: &Stores, namespace: &str, inline: &InlineRecipient) -> Result<Identified, kube::Error> {
    match &inline.key {
        RecipientKey::User(id) => {
            let existing = find_user(stores, namespace, id);
            let name = existing.as_ref().map(|u| u.name_any()).unwrap_or_else(|| ids::name_for_id(id));
            let mut spec = existing.map(|u| u.spec.clone()).unwrap_or_else(|| UserSpec { id: id.clone(), ..Default::default() });
            merge_user(&mut spec, &inline.properties, &inline.channel_data, &inline.preferences);
            Ok(Identified::User(apply(client, namespace, &name, &User::new(&name, spec)).await?))
        }
        RecipientKey::Object { collection, id } => {
            let existing = find_object(stores, namespace, collection, id);
            let name = existing.as_ref().map(|o| o.name_any()).unwrap_or_else(|| ids::name_for_object(collection, id));
            let mut spec = existing.map(|o| o.spec.clone()).unwrap_or_else(|| ObjectSpec { collection: collection.clone(), id: id.clone(), ..Default::default() });
            spec.properties.extend(inline.properties.clone());
            spec.channel_data.extend(inline.channel_data.clone());
            spec.preferences.extend(inline.preferences.clone());
            Ok(Identified::Object(apply(client, namespace, &name, &Object::new(&name, spec)).await?))
        }
    }
}

/// Creates or updates the Tenant an inline tenant describes (a bare id: None).
pub async fn identify_tenant(client: &Client, stores: &Stores, namespace: &str, tenant: &TenantInput) -> Result<Option<Tenant>, kube::Error> {
    let TenantInput::Inline { id, properties, preference_set } = tenant else { return Ok(None) };
    let existing = find_tenant(stores, namespace, id);
    let name = existing.as_ref().map(|t| t.name_any()).unwrap_or_else(|| ids::name_for_id(id));
    let mut spec = existing.map(|t| t.spec.clone()).unwrap_or_else(|| TenantSpec { id: id.clone(), ..Default::default() });
    let mut properties = properties.clone();
    if let Some(v) = take_string(&mut properties, "name") {
        spec.name = Some(v);
    }
    if let Some(Value::Object(mut settings)) = properties.remove("settings") {
        if let Some(Value::Object(branding)) = settings.remove("branding") {
            spec.settings.branding.extend(branding);
        }
    }
    spec.properties.extend(properties);
    if preference_set.is_some() {
        spec.settings.preference_set = preference_set.clone();
    }
    Ok(Some(apply(client, namespace, &name, &Tenant::new(&name, spec)).await?))
}

/// The actor as templates see it: `{id, collection?, ...properties}`.
pub fn actor_view(directory: &crate::core::expansion::Directory, key: &RecipientKey) -> Value {
    let mut view = match key {
        RecipientKey::User(id) => directory.user(id).map(|u| u.properties.clone()).unwrap_or_default(),
        RecipientKey::Object { collection, id } => directory.object(collection, id).map(|o| o.properties.clone()).unwrap_or_default(),
    };
    view.insert("id".into(), json!(key.id()));
    if let RecipientKey::Object { collection, .. } = key {
        view.insert("collection".into(), json!(collection));
    }
    Value::Object(view)
}
