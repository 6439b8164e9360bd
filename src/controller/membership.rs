//! Writing memberships: adding and removing an Object's subscribers or an
//! Audience's members in its MemberSlices.
//!
//! Calls for one target are combined ([`Combiner`]): a round writes every
//! change queued while the previous round was written, so eight clients
//! subscribing to one object cost about one slice write per round, not
//! eight competing ones, and none of them sees a conflict. Another
//! replica writing the same slice makes a replace fail with 409; the slice is
//! then read again and the change re-applied.
//!
//! Where members go: a member already in a slice stays there; new members
//! fill the first slice with room (by name), then new slices. A slice holds
//! at most [`MAX_MEMBERS`] members and [`MAX_SLICE_BYTES`] of JSON, so it
//! always fits etcd's request limit; a slice left empty is deleted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

use super::combine::Combiner;
use super::Stores;
use crate::core::expansion::{Members, SubscriberRecord};
use crate::core::model::{JsonObject, RecipientKey};
use crate::metrics::Metrics;
use crate::resources::member_slice::MAX_MEMBERS;
use crate::resources::{MemberSlice, MemberTarget, Subscription};

/// A slice's members at most take this much JSON (etcd takes 1.5 MiB a request).
pub const MAX_SLICE_BYTES: usize = 512 * 1024;
/// One member's properties at most take this much JSON.
pub const MAX_PROPERTIES_BYTES: usize = 4 * 1024;
/// Conflicting writes of one slice retried at most this often.
const ATTEMPTS: usize = 10;

/// Errors writing memberships.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{what} kept changing while herald wrote it; try again")]
    Contended { what: String },
    /// The writer of this target stopped before answering (it failed; the change may or may not be stored).
    #[error("the membership writer stopped before answering")]
    Dropped,
}

/// A membership change.
#[derive(Clone, Debug)]
pub enum Change {
    /// Add these members, or give existing ones these properties.
    Add(Vec<(RecipientKey, JsonObject)>),
    Remove(Vec<RecipientKey>),
}

/// What a change did, per member named: its properties now (added or kept),
/// or for a removal, its properties before (None: it was not a member).
pub type Outcome = Vec<(RecipientKey, Option<JsonObject>)>;

/// One target's changes waiting to be written.
type Queue = Combiner<Change, Result<Outcome, Arc<MembershipError>>>;

/// Writes memberships for the API (one per process).
pub struct Membership {
    queues: Mutex<HashMap<(String, MemberTarget), Arc<Queue>>>,
    slices: Arc<Slices>,
}

/// What writes the slices, shared by the rounds (which run on their own tasks).
struct Slices {
    client: Client,
    stores: Stores,
    metrics: Arc<Metrics>,
    /// The last few slices this process wrote, as written (with their
    /// resourceVersion), by namespace and name: the next change to one starts
    /// from it instead of reading it again. A copy someone else wrote since
    /// makes the write fail with 409, and the slice is then read fresh.
    written: Mutex<VecDeque<((String, String), MemberSlice)>>,
    /// Slices this process wrote lately, by target: the watch may not have
    /// brought them to the index yet, and a removal right after an add must
    /// still find the member.
    recent: Mutex<HashMap<(String, MemberTarget), Recent>>,
}

/// When a target's slices were last written here, and their members then, by slice name.
type Recent = (std::time::Instant, BTreeMap<String, Arc<Members>>);

/// How long written slices are remembered beside the index.
const RECENT: std::time::Duration = std::time::Duration::from_secs(60);
/// How many written slices are kept whole to start the next change from (a
/// target being filled writes to one or two at a time).
const KEPT_SLICES: usize = 8;

impl Membership {
    pub fn new(client: Client, stores: Stores, metrics: Arc<Metrics>) -> Self {
        Membership { queues: Mutex::default(), slices: Arc::new(Slices { client, stores, metrics, recent: Mutex::default(), written: Mutex::default() }) }
    }

    /// Applies `change` to `target`'s slices in `namespace`, combined with
    /// whatever other calls queued for the same target meanwhile.
    pub async fn apply(&self, namespace: &str, target: &MemberTarget, change: Change) -> Result<Outcome, Arc<MembershipError>> {
        let slot = (namespace.to_string(), target.clone());
        let queue = self.queues.lock().unwrap_or_else(|e| e.into_inner()).entry(slot.clone()).or_default().clone();
        let (slices, ns, tg) = (self.slices.clone(), namespace.to_string(), target.clone());
        let outcome = queue
            .submit(change, |changes| async move {
                match slices.write(&ns, &tg, &changes).await {
                    Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
                    Err(e) => {
                        let e = Arc::new(e);
                        changes.iter().map(|_| Err(e.clone())).collect()
                    }
                }
            })
            .await;
        // Idle queues go (a caller that raced in just now writes on its own: still correct).
        {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            if Arc::strong_count(&queue) == 2 && queue.is_idle() {
                queues.remove(&slot);
            }
        }
        outcome.unwrap_or_else(|| Err(Arc::new(MembershipError::Dropped)))
    }
}

impl Slices {
    /// Writes several calls' changes to the target's slices; one outcome per change.
    async fn write(&self, namespace: &str, target: &MemberTarget, changes: &[Change]) -> Result<Vec<Outcome>, MembershipError> {
        let api: Api<MemberSlice> = Api::namespaced(self.client.clone(), namespace);
        // The net effect per member, in call order (a later call wins).
        let mut wanted: BTreeMap<RecipientKey, Option<JsonObject>> = BTreeMap::new();
        for change in changes {
            match change {
                Change::Add(members) => wanted.extend(members.iter().map(|(k, p)| (k.clone(), Some(p.clone())))),
                Change::Remove(keys) => wanted.extend(keys.iter().map(|k| (k.clone(), None))),
            }
        }
        // What each member was before (for removals' answers).
        let mut before: HashMap<RecipientKey, JsonObject> = HashMap::new();

        // 1. Slices that hold any member named (as the index knows them): read fresh, change, write.
        let known: Vec<(String, Vec<Arc<Members>>)> = self.slices(namespace, target);
        let mut placed: std::collections::HashSet<RecipientKey> = std::collections::HashSet::new();
        for (name, members) in &known {
            if !wanted.keys().any(|k| members.iter().any(|m| m.contains(k))) {
                continue;
            }
            let (found, was) = self
                .edit(&api, namespace, target, name, |slice| {
                    let (mut found, mut was) = (Vec::new(), Vec::new());
                    for s in slice.spec.members.iter_mut() {
                        let Some(key) = key_of(s) else { continue };
                        if let Some(want) = wanted.get(&key) {
                            was.push((key.clone(), s.properties.clone()));
                            if let Some(properties) = want {
                                s.properties = properties.clone();
                            }
                            found.push(key);
                        }
                    }
                    slice.spec.members.retain(|s| key_of(s).is_none_or(|k| !matches!(wanted.get(&k), Some(None))));
                    (found, was)
                })
                .await?;
            placed.extend(found);
            for (key, properties) in was {
                before.entry(key).or_insert(properties);
            }
        }

        // 2. New members fill slices with room, then new slices.
        let mut new: Vec<(RecipientKey, JsonObject)> =
            wanted.iter().filter(|(k, w)| w.is_some() && !placed.contains(*k)).map(|(k, w)| (k.clone(), w.clone().unwrap_or_default())).collect();
        let mut names: Vec<String> = known.iter().filter(|(_, m)| m.iter().all(|m| m.len() < MAX_MEMBERS)).map(|(n, _)| n.clone()).collect();
        let taken: std::collections::HashSet<String> = known.iter().map(|(n, _)| n.clone()).collect();
        let mut fresh_names = (0..).map(|n| target.slice_name(n)).filter(|n| !taken.contains(n));
        while !new.is_empty() {
            let name = if names.is_empty() { fresh_names.next().expect("endless names") } else { names.remove(0) };
            let input = &new;
            let rest = self
                .edit(&api, namespace, target, &name, |slice| {
                    let mut bytes = serde_json::to_vec(&slice.spec.members).map(|v| v.len()).unwrap_or(0);
                    // Where each member already stands (the index may not have seen it yet).
                    let at: HashMap<RecipientKey, usize> = slice.spec.members.iter().enumerate().filter_map(|(i, s)| key_of(s).map(|k| (k, i))).collect();
                    let mut rest = Vec::new();
                    for (key, properties) in input {
                        if let Some(i) = at.get(key) {
                            slice.spec.members[*i].properties = properties.clone();
                            continue;
                        }
                        let entry = Subscription { recipient: reference(key), properties: properties.clone() };
                        let size = serde_json::to_vec(&entry).map(|v| v.len() + 1).unwrap_or(0);
                        if slice.spec.members.len() < MAX_MEMBERS && bytes + size <= MAX_SLICE_BYTES {
                            bytes += size;
                            slice.spec.members.push(entry);
                        } else {
                            rest.push((key.clone(), properties.clone()));
                        }
                    }
                    rest
                })
                .await?;
            new = rest;
        }

        // One outcome per change, as the member stands after this write.
        Ok(changes
            .iter()
            .map(|change| match change {
                Change::Add(members) => members.iter().map(|(k, _)| (k.clone(), wanted.get(k).cloned().flatten())).collect(),
                Change::Remove(keys) => keys.iter().map(|k| (k.clone(), before.get(k).cloned())).collect(),
            })
            .collect())
    }

    /// The target's slices, in name order: as the index knows them, and as
    /// this process lately wrote them (either may be the newer).
    fn slices(&self, namespace: &str, target: &MemberTarget) -> Vec<(String, Vec<Arc<Members>>)> {
        let mut out: BTreeMap<String, Vec<Arc<Members>>> = BTreeMap::new();
        for (name, members) in self.stores.member_slices.all_named(namespace, target) {
            out.entry(name).or_default().push(members);
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|_, (at, _)| at.elapsed() < RECENT);
        if let Some((_, written)) = recent.get(&(namespace.to_string(), target.clone())) {
            for (name, members) in written {
                out.entry(name.clone()).or_default().push(members.clone());
            }
        }
        out.into_iter().collect()
    }

    fn remember(&self, namespace: &str, target: &MemberTarget, slice: &MemberSlice) {
        let members =
            Arc::new(Members::sorted(slice.spec.members.iter().filter_map(|s| key_of(s).map(|recipient| SubscriberRecord { recipient, properties: JsonObject::new() })).collect()));
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let entry = recent.entry((namespace.to_string(), target.clone())).or_insert_with(|| (std::time::Instant::now(), BTreeMap::new()));
        entry.0 = std::time::Instant::now();
        entry.1.insert(slice.name_any(), members);
    }

    /// Takes the slice as this process last wrote it, if it is among the
    /// last few (the edit keeps what it writes next, so no copy is made).
    fn take_kept(&self, namespace: &str, name: &str) -> Option<MemberSlice> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let at = written.iter().position(|((ns, n), _)| ns == namespace && n == name)?;
        written.remove(at).map(|(_, slice)| slice)
    }

    /// Keeps `slice` as written (None: forgets it, e.g. deleted or stale).
    fn keep(&self, namespace: &str, name: &str, slice: Option<MemberSlice>) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.retain(|((ns, n), _)| !(ns == namespace && n == name));
        if let Some(slice) = slice {
            written.push_back(((namespace.to_string(), name.to_string()), slice));
            if written.len() > KEPT_SLICES {
                written.pop_front();
            }
        }
    }

    /// Reads slice `name` (or starts it), applies `change`, and writes it
    /// back conditionally, again from a fresh read if another writer won.
    /// `change` may run more than once, each time on a fresh read; what the
    /// attempt that was written returned is returned. The first attempt
    /// starts from the copy this process last wrote, when it kept one: a
    /// stale copy costs a 409 and a fresh read, and a change that would
    /// change nothing in it is checked against a fresh read before nothing
    /// is written.
    async fn edit<T>(
        &self,
        api: &Api<MemberSlice>,
        namespace: &str,
        target: &MemberTarget,
        name: &str,
        mut change: impl FnMut(&mut MemberSlice) -> T,
    ) -> Result<T, MembershipError> {
        let mut kept = self.take_kept(namespace, name);
        for _ in 0..ATTEMPTS {
            let from_kept = kept.is_some();
            let existing = match kept.take() {
                Some(slice) => Some(slice),
                None => api.get_opt(name).await?,
            };
            let mut slice = existing.clone().unwrap_or_else(|| MemberSlice::for_target(target, name));
            if slice.spec.target().as_ref() != Some(target) {
                // A slice of that name belongs to something else (declared by hand): never touch it.
                return Err(MembershipError::Contended { what: format!("MemberSlice `{name}` (it names another target)") });
            }
            let out = change(&mut slice);
            let written = match &existing {
                // Nothing to write, as far as the kept copy knows: make sure with a fresh read.
                Some(old) if old.spec == slice.spec && from_kept => continue,
                Some(old) if old.spec == slice.spec => return Ok(out),
                Some(_) if slice.spec.members.is_empty() => {
                    let dp = DeleteParams { preconditions: Some(Preconditions { resource_version: slice.resource_version(), uid: None }), ..Default::default() };
                    api.delete(name, &dp).await.map(|_| None)
                }
                Some(_) => api.replace(name, &PostParams::default(), &slice).await.map(Some),
                None if slice.spec.members.is_empty() => return Ok(out),
                None => api.create(&PostParams::default(), &slice).await.map(Some),
            };
            match written {
                Ok(stored) => {
                    self.metrics.write("MemberSlice");
                    self.remember(namespace, target, &slice);
                    self.keep(namespace, name, stored);
                    return Ok(out);
                }
                Err(kube::Error::Api(s)) if s.code == 409 || (s.code == 404 && existing.is_some()) => {
                    self.keep(namespace, name, None);
                    continue;
                }
                Err(e) => {
                    self.keep(namespace, name, None);
                    return Err(e.into());
                }
            }
        }
        Err(MembershipError::Contended { what: format!("MemberSlice `{name}`") })
    }
}

/// The recipient a stored entry names.
fn key_of(s: &Subscription) -> Option<RecipientKey> {
    crate::core::expansion::parse_reference(&s.recipient).ok()
}

/// A recipient reference as slices store it.
pub fn reference(key: &RecipientKey) -> Value {
    match key {
        RecipientKey::User(id) => Value::String(id.clone()),
        RecipientKey::Object { collection, id } => serde_json::json!({"id": id, "collection": collection}),
    }
}
