//! Watch-fed indexes of what herald reads of Users, Objects, Tenants,
//! Audiences and MemberSlices: each object reduced to its core record when
//! its watch event arrives and found by id, so that a reconcile or an API
//! call looks up what it needs without copying or scanning a namespace.
//!
//! Why not kube's reflector `Store`: it keeps every object whole (metadata,
//! spec as written) and finds by name only, so herald scanned every User to
//! find one by id and copied a namespace's directory per run. An index keeps
//! a few hundred bytes per User and answers by id.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::lenient::Lenient;
use super::{scope_api, scopes, CacheStopped, Unreadable, WatchBackoff};
use crate::settings::Settings;

/// A kind herald indexes: how one object becomes its key and record.
pub trait Indexed: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static {
    /// What the object is found by within its namespace (an id, a collection and id, ...).
    type Key: Eq + Hash + Clone + Send + Sync + 'static;
    /// What herald keeps of it.
    type Record: Send + Sync + 'static;
    /// Its key and record; None leaves it out (e.g. a MemberSlice naming no target).
    fn index(&self) -> Option<(Self::Key, Self::Record)>;
}

/// The records filed under one key, by resource name, in name order
/// (nearly always one: a Vec costs far less than a map).
type Named<R> = Vec<(String, Arc<R>)>;
/// One scope's part of an index, shared by its watch task and readers.
type SharedPart<K> = Arc<RwLock<Part<K>>>;

/// One namespace's entries.
struct Space<K: Indexed> {
    /// Every object with a key, by name (two resources may claim one id;
    /// lookups take the first name).
    by_key: HashMap<K::Key, Named<K::Record>>,
    /// The key each object is filed under, to move or remove it (None:
    /// herald cannot read it, or it names nothing to index).
    by_name: HashMap<String, Option<K::Key>>,
    /// Objects herald cannot read, by name.
    invalid: std::collections::HashSet<String>,
}

impl<K: Indexed> Default for Space<K> {
    fn default() -> Self {
        Space { by_key: HashMap::new(), by_name: HashMap::new(), invalid: Default::default() }
    }
}

/// One watch scope's entries, by namespace (each namespace string kept once).
struct Part<K: Indexed> {
    spaces: HashMap<String, Space<K>>,
}

impl<K: Indexed> Default for Part<K> {
    fn default() -> Self {
        Part { spaces: HashMap::new() }
    }
}

impl<K: Indexed> Part<K> {
    fn space(&self, namespace: &str) -> Option<&Space<K>> {
        self.spaces.get(namespace)
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        let Some(space) = self.spaces.get_mut(namespace) else { return };
        space.invalid.remove(name);
        if let Some(Some(key)) = space.by_name.remove(name) {
            if let Some(names) = space.by_key.get_mut(&key) {
                names.retain(|(n, _)| n != name);
                if names.is_empty() {
                    space.by_key.remove(&key);
                }
            }
        }
        if space.by_name.is_empty() {
            self.spaces.remove(namespace);
        }
    }

    fn apply(&mut self, object: &K) {
        let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
        self.remove(&namespace, &name);
        let space = self.spaces.entry(namespace).or_default();
        let indexed = object.index();
        let key = indexed.as_ref().map(|(k, _)| k.clone());
        if let Some((key, record)) = indexed {
            let names = space.by_key.entry(key).or_default();
            let at = names.partition_point(|(n, _)| *n < name);
            names.insert(at, (name.clone(), Arc::new(record)));
            names.shrink_to_fit();
        }
        space.by_name.insert(name, key);
    }

    fn mark_invalid(&mut self, namespace: &str, name: &str) {
        self.remove(namespace, name);
        let space = self.spaces.entry(namespace.to_string()).or_default();
        space.by_name.insert(name.to_string(), None);
        space.invalid.insert(name.to_string());
    }
}

/// A watch-fed index of kind `K` over every watched namespace.
pub struct Index<K: Indexed> {
    /// One part per watch scope (Kubernetes has no multi-namespace watch).
    parts: Vec<(Option<String>, SharedPart<K>)>,
    listed: Vec<tokio::sync::watch::Receiver<bool>>,
}

impl<K: Indexed> Clone for Index<K> {
    fn clone(&self) -> Self {
        Index { parts: self.parts.clone(), listed: self.listed.clone() }
    }
}

impl<K: Indexed> Index<K> {
    fn part(&self, namespace: &str) -> Option<&Arc<RwLock<Part<K>>>> {
        self.parts.iter().find(|(scope, _)| scope.as_deref().is_none_or(|s| s == namespace)).map(|(_, p)| p)
    }

    fn read<T>(&self, namespace: &str, f: impl FnOnce(&Part<K>) -> T) -> Option<T> {
        self.part(namespace).map(|p| f(&p.read().unwrap_or_else(|e| e.into_inner())))
    }

    /// The record with this key (of the first name, when several claim it).
    pub fn get(&self, namespace: &str, key: &K::Key) -> Option<Arc<K::Record>> {
        self.named(namespace, key).map(|(_, r)| r)
    }

    /// The name and record with this key.
    pub fn named(&self, namespace: &str, key: &K::Key) -> Option<(String, Arc<K::Record>)> {
        self.read(namespace, |p| p.space(namespace)?.by_key.get(key)?.first().map(|(n, r)| (n.clone(), r.clone()))).flatten()
    }

    /// Whether anything is filed under this key (no clone of its name or record).
    pub fn contains(&self, namespace: &str, key: &K::Key) -> bool {
        self.read(namespace, |p| p.space(namespace).is_some_and(|s| s.by_key.contains_key(key))).unwrap_or(false)
    }

    /// Every record with this key, in name order (a target's MemberSlices).
    pub fn all(&self, namespace: &str, key: &K::Key) -> Vec<Arc<K::Record>> {
        // Without cloning the names: a run asks this for each recipient reached through an object.
        self.filed(namespace, key, |named| named.iter().map(|(_, r)| r.clone()).collect())
    }

    /// Every record with this key and its name, in name order.
    pub fn all_named(&self, namespace: &str, key: &K::Key) -> Vec<(String, Arc<K::Record>)> {
        self.filed(namespace, key, |named| named.clone())
    }

    /// `f` of what is filed under this key (nothing: an empty list).
    fn filed<T>(&self, namespace: &str, key: &K::Key, f: impl FnOnce(&Named<K::Record>) -> Vec<T>) -> Vec<T> {
        self.read(namespace, |p| p.space(namespace).and_then(|s| s.by_key.get(key)).map(f)).flatten().unwrap_or_default()
    }

    /// Calls `f` with every record of `namespace` (in no particular order).
    pub fn for_each(&self, namespace: &str, mut f: impl FnMut(&K::Key, &K::Record)) {
        self.read(namespace, |p| {
            for (key, names) in p.space(namespace).iter().flat_map(|s| s.by_key.iter()) {
                if let Some((_, record)) = names.first() {
                    f(key, record);
                }
            }
        });
    }

    /// How many objects of `namespace` are indexed (any key).
    pub fn len(&self, namespace: &str) -> usize {
        self.read(namespace, |p| p.space(namespace).map_or(0, |s| s.by_name.len())).unwrap_or(0)
    }

    /// How many objects are indexed, in every namespace.
    pub fn total(&self) -> usize {
        self.parts.iter().map(|(_, p)| p.read().unwrap_or_else(|e| e.into_inner()).spaces.values().map(|s| s.by_name.len()).sum::<usize>()).sum()
    }

    /// How many watched objects herald cannot read.
    pub fn invalid_count(&self) -> usize {
        self.parts.iter().map(|(_, p)| p.read().unwrap_or_else(|e| e.into_inner()).spaces.values().map(|s| s.invalid.len()).sum::<usize>()).sum()
    }

    /// Waits until every namespace's first full list is in (any number of waiters).
    pub async fn wait_until_ready(&self) -> Result<(), CacheStopped> {
        for listed in &self.listed {
            listed.clone().wait_for(|l| *l).await.map_err(|_| CacheStopped)?;
        }
        Ok(())
    }

    /// Starts the watches; the tasks end with the runtime. Objects herald
    /// cannot read go to `unreadable` (dropped if the reporter lags).
    pub fn start(client: &Client, settings: &Settings, unreadable: &tokio::sync::mpsc::Sender<Unreadable>) -> Self {
        let mut parts = Vec::new();
        let mut listed = Vec::new();
        for scope in scopes(settings) {
            let part: Arc<RwLock<Part<K>>> = Arc::default();
            let (ready, ready_rx) = tokio::sync::watch::channel(false);
            let stream = watcher(scope_api::<Lenient<K>>(client, &scope), watcher::Config::default()).backoff(WatchBackoff::default());
            let unreadable = unreadable.clone();
            let writer = part.clone();
            tokio::spawn(async move {
                futures::pin_mut!(stream);
                // A re-list builds a fresh part and swaps it in when complete,
                // so lookups never see a half-listed namespace.
                let mut relist: Option<Part<K>> = None;
                while let Some(item) = stream.next().await {
                    let event = match item {
                        Ok(event) => event,
                        Err(e) => {
                            tracing::warn!(error = %e, kind = %K::kind(&()), "watch error; retrying");
                            continue;
                        }
                    };
                    match event {
                        watcher::Event::Init => {
                            // A list after the first: the watch lost its place (e.g. 410 Gone). The
                            // old index serves until the new one is complete (both are held meanwhile).
                            if *ready.borrow() {
                                tracing::info!(kind = %K::kind(&()), "re-listing");
                            }
                            relist = Some(Part::default());
                        }
                        watcher::Event::InitApply(object) => {
                            if let Some(fresh) = relist.as_mut() {
                                file(fresh, &object, &unreadable);
                            }
                        }
                        watcher::Event::InitDone => {
                            if let Some(fresh) = relist.take() {
                                *writer.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                            }
                            ready.send_replace(true);
                        }
                        watcher::Event::Apply(object) => file(&mut writer.write().unwrap_or_else(|e| e.into_inner()), &object, &unreadable),
                        watcher::Event::Delete(object) => {
                            let mut part = writer.write().unwrap_or_else(|e| e.into_inner());
                            part.remove(&object.namespace().unwrap_or_default(), &object.name_any());
                        }
                    }
                }
            });
            parts.push((scope, part));
            listed.push(ready_rx);
        }
        Index { parts, listed }
    }
}

/// Files one watched object: its record, or (unreadable) its absence and a report.
fn file<K: Indexed>(part: &mut Part<K>, object: &Lenient<K>, unreadable: &tokio::sync::mpsc::Sender<Unreadable>) {
    match object.valid() {
        Some(valid) => part.apply(valid),
        None => {
            let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
            part.mark_invalid(&namespace, &name);
            let reference = object.object_ref(&());
            let error = object.error().unwrap_or_default().to_string();
            tracing::warn!(kind = %K::kind(&()), %namespace, %name, %error, "skipping an object herald cannot read");
            let _ = unreadable.try_send(Unreadable { kind: K::kind(&()).to_string(), reference, error });
        }
    }
}
