//! What herald keeps of Users, Objects, Tenants, Audiences and MemberSlices
//! (their [`Indexed`] records), and the core's [`Directory`] over those
//! indexes for one namespace: lookups by id, nothing copied per run.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use super::index::Indexed;
use super::Stores;
use crate::core::execution::TenantRecord;
use crate::core::expansion::{parse_reference, Directory, Members, MemoryDirectory, ObjectRecord, Selector, SubscriberRecord, UserRecord};
use crate::core::model::RecipientKey;
use crate::resources::{Audience, MemberSlice, MemberTarget, Object, Subscription, Tenant, User, UserSpec};

/// What herald keeps of a User: its spec as compact JSON (a few hundred
/// bytes, where the parsed maps took several times that), read into a record
/// when a run or a call looks it up, and its labels for dynamic audiences.
pub struct UserEntry {
    packed: Box<[u8]>,
    pub labels: BTreeMap<String, String>,
}

impl UserEntry {
    pub fn new(spec: &UserSpec, labels: BTreeMap<String, String>) -> Self {
        UserEntry { packed: serde_json::to_vec(spec).unwrap_or_default().into_boxed_slice(), labels }
    }

    /// The user's record (a spec that read once always reads again).
    pub fn record(&self) -> Arc<UserRecord> {
        Arc::new(user_record(&serde_json::from_slice(&self.packed).unwrap_or_default()))
    }
}

/// What herald keeps of an Audience.
pub struct AudienceEntry {
    /// Members listed in the Audience itself.
    pub members: Arc<Members>,
    /// A dynamic audience's selector over the namespace's Users.
    pub selector: Option<Selector>,
}

/// A user's record: the typed fields join the free-form properties, as Knock shows them.
pub fn user_record(spec: &UserSpec) -> UserRecord {
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

/// Subscriptions as the core reads them; entries that do not name a
/// recipient (malformed) are left out.
fn subscriber_records(subscriptions: &[Subscription]) -> Vec<SubscriberRecord> {
    subscriptions.iter().filter_map(|s| parse_reference(&s.recipient).ok().map(|recipient| SubscriberRecord { recipient, properties: s.properties.clone() })).collect()
}

/// An object's record.
pub fn object_record(object: &Object) -> ObjectRecord {
    let spec = &object.spec;
    ObjectRecord {
        collection: spec.collection.clone(),
        id: spec.id.clone(),
        properties: spec.properties.clone(),
        channel_data: spec.channel_data.clone(),
        preferences: spec.preferences.clone(),
        subscribers: Arc::new(Members::listed(subscriber_records(&spec.subscribers))),
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

impl Indexed for User {
    type Key = String;
    type Record = UserEntry;
    fn index(&self) -> Option<(String, UserEntry)> {
        Some((self.spec.id.clone(), UserEntry::new(&self.spec, self.metadata.labels.clone().unwrap_or_default())))
    }
}

impl Indexed for Object {
    type Key = (String, String);
    type Record = ObjectRecord;
    fn index(&self) -> Option<(Self::Key, ObjectRecord)> {
        Some(((self.spec.collection.clone(), self.spec.id.clone()), object_record(self)))
    }
}

impl Indexed for Tenant {
    type Key = String;
    type Record = TenantRecord;
    fn index(&self) -> Option<(String, TenantRecord)> {
        Some((self.spec.id.clone(), tenant_record(self)))
    }
}

impl Indexed for Audience {
    type Key = String;
    type Record = AudienceEntry;
    fn index(&self) -> Option<(String, AudienceEntry)> {
        let members = self.spec.members.iter().filter_map(|m| parse_reference(m).ok()).map(|recipient| SubscriberRecord { recipient, properties: Default::default() }).collect();
        Some((self.spec.key.clone(), AudienceEntry { members: Arc::new(Members::listed(members)), selector: self.spec.selector.as_ref().map(selector) }))
    }
}

impl Indexed for MemberSlice {
    type Key = MemberTarget;
    type Record = Members;
    fn index(&self) -> Option<(MemberTarget, Members)> {
        Some((self.spec.target()?, Members::sorted(subscriber_records(&self.spec.members))))
    }
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
    stores.tenants.get(namespace, &id.to_string()).map(|t| (*t).clone())
}

/// The user with this id in the namespace.
pub fn user(stores: &Stores, namespace: &str, id: &str) -> Option<Arc<UserRecord>> {
    stores.users.get(namespace, &id.to_string()).map(|u| u.record())
}

/// The object with this collection and id in the namespace.
pub fn object(stores: &Stores, namespace: &str, collection: &str, id: &str) -> Option<Arc<ObjectRecord>> {
    stores.objects.get(namespace, &(collection.to_string(), id.to_string()))
}

/// One namespace's directory, read from the indexes when asked, with what a
/// run identified itself (`overlay`) taking precedence: the watch may not
/// have delivered those yet.
pub struct LiveDirectory {
    stores: Stores,
    namespace: String,
    pub overlay: MemoryDirectory,
}

impl LiveDirectory {
    pub fn new(stores: &Stores, namespace: &str) -> Self {
        LiveDirectory { stores: stores.clone(), namespace: namespace.to_string(), overlay: MemoryDirectory::default() }
    }

    fn slices(&self, target: MemberTarget) -> Vec<Arc<Members>> {
        self.stores.member_slices.all(&self.namespace, &target)
    }

    /// The Users a selector picks, in id order (expansion is deterministic).
    fn selected(&self, selector: &Selector) -> Members {
        let mut picked = Vec::new();
        self.stores.users.for_each(&self.namespace, |id, user| {
            if selector.matches(&user.labels) {
                picked.push(SubscriberRecord { recipient: RecipientKey::user(id.clone()), properties: Default::default() });
            }
        });
        Members::sorted(picked)
    }
}

impl Directory for LiveDirectory {
    fn user(&self, id: &str) -> Option<Arc<UserRecord>> {
        self.overlay.user(id).or_else(|| user(&self.stores, &self.namespace, id))
    }

    /// Without reading records: expansion asks this of every recipient.
    fn contains(&self, key: &RecipientKey) -> bool {
        match key {
            RecipientKey::User(id) => self.overlay.has_user(id) || self.stores.users.contains(&self.namespace, id),
            RecipientKey::Object { collection, id } => self.object(collection, id).is_some(),
        }
    }

    fn object(&self, collection: &str, id: &str) -> Option<Arc<ObjectRecord>> {
        self.overlay.object(collection, id).or_else(|| object(&self.stores, &self.namespace, collection, id))
    }

    fn subscribers(&self, collection: &str, id: &str) -> Vec<Arc<Members>> {
        let own = self.object(collection, id).map(|o| o.subscribers.clone());
        own.into_iter().chain(self.slices(MemberTarget::Object { collection: collection.into(), id: id.into() })).collect()
    }

    /// The Audience's own members, then the Users its selector picks, then its
    /// MemberSlices. Members added through the API alone (slices, no
    /// Audience resource) are an audience too, as in Knock.
    fn audience(&self, key: &str) -> Option<Vec<Arc<Members>>> {
        let entry = self.stores.audiences.get(&self.namespace, &key.to_string());
        let slices = self.slices(MemberTarget::Audience(key.into()));
        if entry.is_none() && slices.is_empty() {
            return None;
        }
        let mut chunks = Vec::new();
        if let Some(entry) = entry {
            chunks.push(entry.members.clone());
            if let Some(selector) = &entry.selector {
                chunks.push(Arc::new(self.selected(selector)));
            }
        }
        chunks.extend(slices);
        Some(chunks)
    }

    /// Without building the audience: the user's labels against the selector.
    fn is_audience_member(&self, key: &str, id: &str) -> bool {
        let user = RecipientKey::user(id);
        if let Some(entry) = self.stores.audiences.get(&self.namespace, &key.to_string()) {
            if entry.members.contains(&user) {
                return true;
            }
            if let Some(selector) = &entry.selector {
                if self.stores.users.get(&self.namespace, &id.to_string()).is_some_and(|u| selector.matches(&u.labels)) {
                    return true;
                }
            }
        }
        self.slices(MemberTarget::Audience(key.into())).iter().any(|s| s.contains(&user))
    }
}
