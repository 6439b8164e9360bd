//! Builds the core's view of users, objects, audiences and tenants from the
//! watch caches, one namespace at a time.

use kube::ResourceExt;
use serde_json::{json, Value};

use crate::core::execution::TenantRecord;
use crate::core::expansion::{parse_reference, Directory, ObjectRecord, Selector, SubscriberRecord, UserRecord};
use crate::resources::{Audience, Object, Tenant, User};

use super::Stores;

/// A user's record: the typed fields join the free-form properties, as Knock shows them.
pub fn user_record(user: &User) -> UserRecord {
    let spec = &user.spec;
    let mut properties = spec.properties.clone();
    for (key, value) in [("name", &spec.name), ("email", &spec.email), ("phone_number", &spec.phone_number), ("timezone", &spec.timezone)] {
        if let Some(v) = value {
            properties.insert(key.into(), json!(v));
        }
    }
    UserRecord {
        id: spec.id.clone(),
        properties,
        channel_data: spec.channel_data.clone(),
        preferences: spec.preferences.clone(),
        tenant_preferences: spec.tenant_preferences.clone(),
    }
}

/// An object's record; subscriptions that do not name a recipient
/// (malformed entries) are left out.
pub fn object_record(object: &Object) -> ObjectRecord {
    let spec = &object.spec;
    ObjectRecord {
        collection: spec.collection.clone(),
        id: spec.id.clone(),
        properties: spec.properties.clone(),
        channel_data: spec.channel_data.clone(),
        preferences: spec.preferences.clone(),
        subscribers: spec
            .subscribers
            .iter()
            .filter_map(|s| parse_reference(&s.recipient).ok().map(|recipient| SubscriberRecord { recipient, properties: s.properties.clone() }))
            .collect(),
    }
}

/// A tenant's record.
pub fn tenant_record(tenant: &Tenant) -> TenantRecord {
    let mut properties = tenant.spec.properties.clone();
    if let Some(name) = &tenant.spec.name {
        properties.insert("name".into(), json!(name));
    }
    if !tenant.spec.settings.branding.is_empty() {
        properties.insert("settings".into(), json!({"branding": tenant.spec.settings.branding}));
    }
    TenantRecord { id: tenant.spec.id.clone(), properties, preference_set: tenant.spec.settings.preference_set.clone() }
}

fn audience_members(audience: &Audience) -> Vec<crate::core::model::RecipientKey> {
    audience.spec.members.iter().filter_map(|m: &Value| parse_reference(m).ok()).collect()
}

/// Everything one namespace holds, for expansion and execution.
pub fn build(stores: &Stores, namespace: &str) -> Directory {
    let mut directory = Directory::default();
    let in_ns = |ns: Option<String>| ns.as_deref() == Some(namespace);
    for user in stores.users.state() {
        if in_ns(user.namespace()) {
            directory.insert_user(user_record(&user));
        }
    }
    for object in stores.objects.state() {
        if in_ns(object.namespace()) {
            directory.insert_object(object_record(&object));
        }
    }
    let users = stores.users.state();
    for audience in stores.audiences.state() {
        if in_ns(audience.namespace()) {
            let mut members = audience_members(&audience);
            // A dynamic audience: the namespace's Users whose labels match, now.
            if let Some(selector) = audience.spec.selector.as_ref().map(selector) {
                members.extend(
                    users
                        .iter()
                        .filter(|u| in_ns(u.namespace()) && selector.matches(u.metadata.labels.as_ref().unwrap_or(&Default::default())))
                        .map(|u| crate::core::model::RecipientKey::user(u.spec.id.clone())),
                );
            }
            directory.insert_audience(audience.spec.key.clone(), members);
        }
    }
    directory
}

/// A Kubernetes label selector as the core's [`Selector`].
fn selector(s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> Selector {
    Selector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: s.match_expressions.iter().flatten().map(|e| (e.key.clone(), e.operator.clone(), e.values.clone().unwrap_or_default())).collect(),
    }
}

/// The tenant with this id in the namespace.
pub fn tenant(stores: &Stores, namespace: &str, id: &str) -> Option<TenantRecord> {
    stores.tenants.state().iter().find(|t| t.namespace().as_deref() == Some(namespace) && t.spec.id == id).map(|t| tenant_record(t))
}
