//! Identify: find a User, Object or Tenant by its id and create or update it.
//! This is the one implementation of identify: the TriggerRun reconciler
//! (inline recipients, actor and tenant) and every write route of the HTTP
//! API use it.
//!
//! Safety rules, each tested:
//! * A resource is found by the id in its spec, never by assuming that its
//!   name is the id: the watch cache names it, else the names derived from
//!   the id are read from the apiserver, and a resource found under one of
//!   those names is used only if its spec carries exactly this id (and
//!   collection). So a trigger for id `user-1` never rewrites the User named
//!   `user-1` whose id is `user_1`; the new user gets the next derived name.
//! * Every write is conditional (the resourceVersion read, or a create), and
//!   retried on conflict, so concurrent identifies never lose an update.
//! * [`Overwrite::CreateOnly`] creates what is missing but never changes an
//!   existing resource: runs created with kubectl identify that way, because
//!   creating a TriggerRun does not imply permission to rewrite Users
//!   (see [`crate::settings::Settings::identify_overwrite`]).

use std::collections::BTreeMap;

use kube::api::PostParams;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::core::ids;
use crate::core::model::{InlineRecipient, JsonObject, PreferenceSet, RecipientKey, TenantInput};
use crate::resources::{Object, ObjectSpec, Tenant, TenantSpec, User, UserSpec};

use super::lenient::Lenient;
use super::Stores;

/// The field manager of identify writes.
const IDENTIFY_MANAGER: &str = "herald-identify";
/// Conflicting writers are retried this many times before giving up.
const ATTEMPTS: usize = 5;

/// Why identify could not store a resource.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("every name derived from {what} is taken by a resource with another id")]
    NamesTaken { what: String },
    #[error("{what} kept changing concurrently; retry")]
    Contended { what: String },
    #[error("the stored {kind} `{name}` cannot be read by herald ({error}); fix or delete it")]
    Unreadable { kind: String, name: String, error: String },
}

/// Whether identify may change a resource that exists already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    Allowed,
    /// Create what is missing; leave what exists as it is.
    CreateOnly,
}

/// What identify did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Created,
    Updated,
    /// The resource already said everything the change says: nothing written.
    Unchanged,
    /// The change would have rewritten an existing resource under
    /// [`Overwrite::CreateOnly`]: nothing written.
    Refused,
}

impl Written {
    /// Whether the apiserver was written to.
    pub fn wrote(self) -> bool {
        matches!(self, Written::Created | Written::Updated)
    }
}

/// A resource as identify left it.
#[derive(Clone, Debug)]
pub struct Identified<K> {
    pub object: K,
    pub written: Written,
}

/// How to find one resource by id, and how to make it when it is missing.
pub struct Target<'a, K> {
    /// For messages: "user `user_1`".
    pub what: String,
    /// Its name in the watch cache, if the cache has it.
    cached: Option<String>,
    /// Names derived from the id, in the order new resources take them.
    derived: Vec<String>,
    is_it: Box<dyn Fn(&K) -> bool + Send + Sync + 'a>,
    fresh: Box<dyn Fn(&str) -> K + Send + Sync + 'a>,
}

impl<'a> Target<'a, User> {
    pub fn user(stores: &Stores, namespace: &str, id: &'a str) -> Self {
        Target {
            what: format!("user `{id}`"),
            cached: user_name(stores, namespace, id),
            derived: user_names(id),
            is_it: Box::new(move |u: &User| u.spec.id == id),
            fresh: Box::new(move |name| User::new(name, UserSpec { id: id.to_string(), ..Default::default() })),
        }
    }
}

impl<'a> Target<'a, Object> {
    pub fn object(stores: &Stores, namespace: &str, collection: &'a str, id: &'a str) -> Self {
        Target {
            what: format!("object `{collection}/{id}`"),
            cached: object_name(stores, namespace, collection, id),
            derived: object_names(collection, id),
            is_it: Box::new(move |o: &Object| o.spec.collection == collection && o.spec.id == id),
            fresh: Box::new(move |name| Object::new(name, ObjectSpec { collection: collection.to_string(), id: id.to_string(), ..Default::default() })),
        }
    }
}

impl<'a> Target<'a, Tenant> {
    pub fn tenant(stores: &Stores, namespace: &str, id: &'a str) -> Self {
        Target {
            what: format!("tenant `{id}`"),
            cached: tenant_name(stores, namespace, id),
            derived: tenant_names(id),
            is_it: Box::new(move |t: &Tenant| t.spec.id == id),
            fresh: Box::new(move |name| Tenant::new(name, TenantSpec { id: id.to_string(), ..Default::default() })),
        }
    }
}

/// Names a new user may get: the id itself when it is a valid name, else a
/// readable hashed name; then a second, always hashed candidate for when the
/// first is taken by a resource with another id.
pub fn user_names(id: &str) -> Vec<String> {
    vec![ids::name_for_id(id), ids::resource_name(&["user", id])]
}

/// Names a new object may get (`<collection>-<id>` collides across
/// collections, e.g. (`team-a`, `ops`) and (`team`, `a-ops`): hence the
/// hashed second candidate).
pub fn object_names(collection: &str, id: &str) -> Vec<String> {
    vec![ids::name_for_object(collection, id), ids::resource_name(&["object", collection, id])]
}

/// Names a new tenant may get.
pub fn tenant_names(id: &str) -> Vec<String> {
    vec![ids::name_for_id(id), ids::resource_name(&["tenant", id])]
}

/// A resource found by id, or the first free derived name to create it under.
pub struct Located<K> {
    pub object: Option<K>,
    free: Option<String>,
}

/// Finds the resource `target` describes: each candidate name is read from
/// the apiserver (so a write made just before is seen) and must carry the id.
pub async fn locate<K>(api: &Api<K>, target: &Target<'_, K>) -> Result<Located<K>, IdentifyError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
{
    // Read leniently: a stored object herald cannot read is an error naming it, not a failed request.
    let lenient: Api<Lenient<K>> = Api::namespaced(api.clone().into_client(), api.namespace().unwrap_or_default());
    let mut free = None;
    let mut tried: Vec<&String> = Vec::new();
    for name in target.cached.iter().chain(target.derived.iter()) {
        if tried.contains(&name) {
            continue;
        }
        tried.push(name);
        match lenient.get_opt(name).await? {
            Some(Lenient::Valid(object)) if (target.is_it)(&object) => return Ok(Located { object: Some((*object).clone()), free: None }),
            Some(Lenient::Valid(_)) => {}
            Some(Lenient::Invalid { error, .. }) => return Err(IdentifyError::Unreadable { kind: K::kind(&()).to_string(), name: name.clone(), error }),
            None if free.is_none() && target.derived.contains(name) => free = Some(name.clone()),
            None => {}
        }
    }
    Ok(Located { object: None, free })
}

fn same<K: Serialize>(a: &K, b: &K) -> bool {
    matches!((serde_json::to_value(a), serde_json::to_value(b)), (Ok(x), Ok(y)) if x == y)
}

/// Creates or updates the resource `target` describes: `change` is applied to
/// the stored object (or to a fresh one), which is then written
/// conditionally, retrying when another writer got there first. A change that
/// changes nothing writes nothing.
pub async fn upsert<K, E>(api: &Api<K>, target: &Target<'_, K>, overwrite: Overwrite, change: &(dyn Fn(&mut K) -> Result<(), E> + Send + Sync)) -> Result<Identified<K>, E>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    E: From<IdentifyError>,
{
    let pp = PostParams { field_manager: Some(IDENTIFY_MANAGER.into()), ..Default::default() };
    for _ in 0..ATTEMPTS {
        let found = locate(api, target).await?;
        let written = match found.object {
            Some(existing) => {
                let mut changed = existing.clone();
                change(&mut changed)?;
                if same(&existing, &changed) {
                    return Ok(Identified { object: existing, written: Written::Unchanged });
                }
                if overwrite == Overwrite::CreateOnly {
                    return Ok(Identified { object: existing, written: Written::Refused });
                }
                // `existing` carries its resourceVersion: a replace is refused (409) if anyone wrote since.
                api.replace(&changed.name_any(), &pp, &changed).await.map(|object| Identified { object, written: Written::Updated })
            }
            None => {
                let name = found.free.ok_or_else(|| IdentifyError::NamesTaken { what: target.what.clone() })?;
                let mut object = (target.fresh)(&name);
                change(&mut object)?;
                api.create(&pp, &object).await.map(|object| Identified { object, written: Written::Created })
            }
        };
        match written {
            Ok(identified) => return Ok(identified),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(IdentifyError::from(e).into()),
        }
    }
    Err(IdentifyError::Contended { what: target.what.clone() }.into())
}

fn take_string(map: &mut JsonObject, key: &str) -> Option<String> {
    match map.get(key) {
        Some(Value::String(_)) => map.remove(key).and_then(|v| v.as_str().map(str::to_string)),
        _ => None,
    }
}

/// The name of the User with this id, from the index.
fn user_name(stores: &Stores, namespace: &str, id: &str) -> Option<String> {
    stores.users.named(namespace, &id.to_string()).map(|(name, _)| name)
}

/// The name of the Object, from the index.
fn object_name(stores: &Stores, namespace: &str, collection: &str, id: &str) -> Option<String> {
    stores.objects.named(namespace, &(collection.to_string(), id.to_string())).map(|(name, _)| name)
}

/// The name of the Tenant with this id, from the index.
fn tenant_name(stores: &Stores, namespace: &str, id: &str) -> Option<String> {
    stores.tenants.named(namespace, &id.to_string()).map(|(name, _)| name)
}

/// Merges Knock-shaped user properties into a user spec: the typed fields
/// (name, email, phone_number, timezone) go to their fields, the rest to properties.
pub fn merge_user(spec: &mut UserSpec, properties: &JsonObject, channel_data: &JsonObject, preferences: &BTreeMap<String, PreferenceSet>) {
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

/// Merges an inline object's properties, channel data and preferences.
pub fn merge_object(spec: &mut ObjectSpec, inline: &InlineRecipient) {
    spec.properties.extend(inline.properties.clone());
    spec.channel_data.extend(inline.channel_data.clone());
    spec.preferences.extend(inline.preferences.clone());
}

/// A recipient as stored after identify.
pub enum Recipient {
    User(Identified<User>),
    Object(Identified<Object>),
}

impl Recipient {
    pub fn written(&self) -> Written {
        match self {
            Recipient::User(u) => u.written,
            Recipient::Object(o) => o.written,
        }
    }
}

/// Creates or updates the User or Object an inline recipient describes.
pub async fn identify_recipient(client: &Client, stores: &Stores, namespace: &str, inline: &InlineRecipient, overwrite: Overwrite) -> Result<Recipient, IdentifyError> {
    match &inline.key {
        RecipientKey::User(id) => {
            let api: Api<User> = Api::namespaced(client.clone(), namespace);
            let target = Target::user(stores, namespace, id);
            let change = |u: &mut User| -> Result<(), IdentifyError> {
                merge_user(&mut u.spec, &inline.properties, &inline.channel_data, &inline.preferences);
                Ok(())
            };
            upsert(&api, &target, overwrite, &change).await.map(Recipient::User)
        }
        RecipientKey::Object { collection, id } => {
            let api: Api<Object> = Api::namespaced(client.clone(), namespace);
            let target = Target::object(stores, namespace, collection, id);
            let change = |o: &mut Object| -> Result<(), IdentifyError> {
                merge_object(&mut o.spec, inline);
                Ok(())
            };
            upsert(&api, &target, overwrite, &change).await.map(Recipient::Object)
        }
    }
}

/// Merges an inline tenant into a tenant spec.
fn merge_tenant(spec: &mut TenantSpec, properties: &JsonObject, preference_set: &Option<PreferenceSet>) {
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
}

/// Creates or updates the Tenant an inline tenant describes (a bare id: None).
pub async fn identify_tenant(client: &Client, stores: &Stores, namespace: &str, tenant: &TenantInput, overwrite: Overwrite) -> Result<Option<Identified<Tenant>>, IdentifyError> {
    let TenantInput::Inline { id, properties, preference_set } = tenant else { return Ok(None) };
    let api: Api<Tenant> = Api::namespaced(client.clone(), namespace);
    let target = Target::tenant(stores, namespace, id);
    let change = |t: &mut Tenant| -> Result<(), IdentifyError> {
        merge_tenant(&mut t.spec, properties, preference_set);
        Ok(())
    };
    upsert(&api, &target, overwrite, &change).await.map(Some)
}

/// The actor as templates see it: `{id, collection?, ...properties}`.
pub fn actor_view(directory: &dyn crate::core::expansion::Directory, key: &RecipientKey) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colliding_object_names_have_distinct_fallbacks() {
        let a = object_names("team-a", "ops");
        let b = object_names("team", "a-ops");
        assert_eq!(a[0], b[0], "the readable names collide; the fallback must not");
        assert_ne!(a[1], b[1]);
        assert_ne!(user_names("user_1")[0], user_names("user-1")[0]);
    }

    #[test]
    fn merging_the_same_inline_user_twice_changes_nothing() {
        let mut spec = UserSpec { id: "u".into(), ..Default::default() };
        let props = serde_json::from_value::<JsonObject>(json!({"name": "Ada", "email": "a@x", "plan": "pro"})).unwrap();
        merge_user(&mut spec, &props, &JsonObject::new(), &BTreeMap::new());
        let once = spec.clone();
        merge_user(&mut spec, &props, &JsonObject::new(), &BTreeMap::new());
        assert_eq!(spec, once);
        assert_eq!(spec.email.as_deref(), Some("a@x"));
        assert_eq!(spec.properties.get("plan"), Some(&json!("pro")));
    }
}
