//! Where runs and recipient runs are, by id, for the run routes: an
//! in-memory index fed by metadata-only watches of TriggerRuns and
//! RecipientPages in the watched namespaces. A recipient run is on a page,
//! or in its run for a run that keeps its records inline.
//!
//! Why: a workflow run id is a TriggerRun's uid, which no selector can find,
//! and a recipient run id is a hash (UUID v5) that cannot be reversed;
//! finding either by listing reads every run, or every page with its
//! status, on each call. Here a lookup is a map read; the route then `get`s
//! what it names, and checks it.
//!
//! Cost, on every replica: two watches per watched namespace (one for all
//! namespaces when herald watches them all), metadata only: an initial list
//! of the runs' and pages' metadata, then an event for each write. A page's
//! metadata carries its recipients' run ids ([`RECIPIENT_RUN_IDS_ANNOTATION`],
//! 32 bytes a recipient), and so does a small run's that has no pages. Memory: about 150 bytes a run and 50 bytes a
//! recipient (hash map entries of 64 and 32 bytes, the maps' spare room,
//! names), for what the namespaces keep (finished runs live until their
//! TTL, 7 days by default): a million recipients take about 50 MB.
//!
//! The index trails the apiserver by the watch's delay (milliseconds): a run
//! is found as soon as this replica created it ([`RunIndex::remember`]);
//! one created elsewhere, or a page just written, a moment later.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::sync::watch;
use uuid::Uuid;

use crate::controller::{scope_api, scopes, WatchBackoff};
use crate::resources::recipient_page::{decode_recipient_run_ids, RECIPIENT_RUN_IDS_ANNOTATION};
use crate::resources::{RecipientPage, TriggerRun};
use crate::settings::Settings;

/// An object by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub namespace: String,
    pub name: String,
}

/// Runs by uid and recipient runs by id, as the watches of one scope saw them.
#[derive(Default)]
struct Maps {
    runs: HashMap<Uuid, Location>,
    /// The page (or, fed by the runs' watch, the run) holding the recipient,
    /// and the recipient's position in it.
    recipients: HashMap<Uuid, (Arc<Location>, u32)>,
}

/// What holds a recipient run's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The RecipientPage of this name.
    Page(String),
    /// The TriggerRun of this name (a run that keeps its records inline).
    Run(String),
}

/// What a watch event says about the index.
#[derive(Clone, Debug, PartialEq)]
enum Change {
    /// A run (uid) is at this location, holding these recipient run ids
    /// inline, in order (none when its records are on pages).
    Run(Uuid, Location, Vec<Uuid>),
    /// A page at this location holds these recipient run ids, in order.
    Page(Location, Vec<Uuid>),
}

impl Maps {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Run(uid, at, ids) => {
                self.holds(at.clone(), ids);
                self.runs.insert(uid, at);
            }
            Change::Page(at, ids) => self.holds(at, ids),
        }
    }

    /// Records that the page or run `at` holds the recipient runs `ids`.
    fn holds(&mut self, at: Location, ids: Vec<Uuid>) {
        // A holder's ids never change: events of its later writes are skipped.
        let known = ids.first().and_then(|id| self.recipients.get(id)).is_some_and(|(holder, _)| **holder == at);
        if known || ids.is_empty() {
            return;
        }
        let holder = Arc::new(at);
        for (position, id) in ids.into_iter().enumerate() {
            self.recipients.insert(id, (holder.clone(), u32::try_from(position).unwrap_or(u32::MAX)));
        }
    }

    fn delete(&mut self, change: Change) {
        match change {
            Change::Run(uid, at, ids) => {
                self.forget(&at, ids);
                if self.runs.get(&uid) == Some(&at) {
                    self.runs.remove(&uid);
                }
            }
            Change::Page(at, ids) => self.forget(&at, ids),
        }
    }

    fn forget(&mut self, at: &Location, ids: Vec<Uuid>) {
        for id in ids {
            if self.recipients.get(&id).is_some_and(|(holder, _)| **holder == *at) {
                self.recipients.remove(&id);
            }
        }
    }
}

/// Maps behind a lock. A panic while holding it leaves plain maps, still
/// usable: the lock is taken through poisoning.
#[derive(Default)]
struct Shared(RwLock<Maps>);

impl Shared {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One watch scope: its runs (fed by the TriggerRun watch) and recipients
/// (fed by the RecipientPage watch).
#[derive(Default)]
struct ScopeIndex {
    namespace: Option<String>,
    runs: Arc<Shared>,
    pages: Arc<Shared>,
}

impl ScopeIndex {
    fn covers(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }
}

/// The API's index of runs and recipient runs (see the module docs).
pub struct RunIndex {
    scopes: Vec<Arc<ScopeIndex>>,
    /// True once every watch has had its first full list.
    ready: watch::Receiver<bool>,
}

fn location(meta: &kube::core::ObjectMeta) -> Option<Location> {
    Some(Location { namespace: meta.namespace.clone()?, name: meta.name.clone()? })
}

/// The recipient run ids an object's annotation lists (none when it has none or it is malformed).
fn recipient_run_ids(meta: &kube::core::ObjectMeta) -> Option<Vec<Uuid>> {
    let annotation = meta.annotations.as_ref()?.get(RECIPIENT_RUN_IDS_ANNOTATION)?;
    let ids = decode_recipient_run_ids(annotation);
    if ids.is_none() {
        tracing::debug!(name = ?meta.name, "malformed recipient run ids annotation; ignored");
    }
    ids
}

fn run_change(run: &PartialObjectMeta<TriggerRun>) -> Option<Change> {
    let uid = Uuid::parse_str(run.metadata.uid.as_deref()?).ok()?;
    Some(Change::Run(uid, location(&run.metadata)?, recipient_run_ids(&run.metadata).unwrap_or_default()))
}

fn page_change(page: &PartialObjectMeta<RecipientPage>) -> Option<Change> {
    Some(Change::Page(location(&page.metadata)?, recipient_run_ids(&page.metadata)?))
}

/// Feeds `maps` from a watch: changes apply at once, except during a
/// relist, whose objects replace the maps when it is complete.
async fn follow<K, S>(maps: Arc<Shared>, stream: S, change: fn(&PartialObjectMeta<K>) -> Option<Change>, listed: watch::Sender<bool>)
where
    K: kube::Resource,
    K::DynamicType: Default,
    S: futures::Stream<Item = Result<Event<PartialObjectMeta<K>>, watcher::Error>>,
{
    futures::pin_mut!(stream);
    let mut relist: Option<Maps> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => relist = Some(Maps::default()),
            Ok(Event::InitApply(object)) => {
                if let (Some(fresh), Some(c)) = (relist.as_mut(), change(&object)) {
                    fresh.apply(c);
                }
            }
            Ok(Event::InitDone) => {
                if let Some(fresh) = relist.take() {
                    *maps.write() = fresh;
                }
                let _ = listed.send(true);
            }
            Ok(Event::Apply(object)) => {
                if let Some(c) = change(&object) {
                    maps.write().apply(c);
                }
            }
            Ok(Event::Delete(object)) => {
                if let Some(c) = change(&object) {
                    maps.write().delete(c);
                }
            }
            Err(e) => tracing::warn!(error = %e, kind = %K::kind(&Default::default()), "run index watch error; retrying"),
        }
    }
}

impl RunIndex {
    /// Starts the watches (one task each; they end with the runtime).
    pub fn start(client: &Client, settings: &Settings) -> RunIndex {
        let mut scope_indexes = Vec::new();
        let mut listed = Vec::new();
        for scope in scopes(settings) {
            let index = Arc::new(ScopeIndex { namespace: scope.clone(), ..Default::default() });
            let (runs_listed, runs_ready) = watch::channel(false);
            let runs = watcher::watcher(scope_api::<PartialObjectMeta<TriggerRun>>(client, &scope), watcher::Config::default()).backoff(WatchBackoff::default());
            tokio::spawn(follow(index.runs.clone(), runs, run_change, runs_listed));
            // Page metadata carries up to 16 KB of ids: list them in smaller chunks.
            let (pages_listed, pages_ready) = watch::channel(false);
            let pages = watcher::watcher(scope_api::<PartialObjectMeta<RecipientPage>>(client, &scope), watcher::Config::default().page_size(100)).backoff(WatchBackoff::default());
            tokio::spawn(follow(index.pages.clone(), pages, page_change, pages_listed));
            listed.extend([runs_ready, pages_ready]);
            scope_indexes.push(index);
        }
        let (all_listed, ready) = watch::channel(false);
        tokio::spawn(async move {
            for mut l in listed {
                if l.wait_for(|done| *done).await.is_err() {
                    return;
                }
            }
            let _ = all_listed.send(true);
        });
        RunIndex { scopes: scope_indexes, ready }
    }

    /// Waits (at most `timeout`) until every watch has had its first full
    /// list; false if it has not: then a miss may not mean "no such run".
    pub async fn wait_until_ready(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        let listed = tokio::time::timeout(timeout, ready.wait_for(|r| *r)).await;
        matches!(listed, Ok(Ok(_)))
    }

    /// Records a run this replica just created (its stored metadata), before its watch event comes.
    pub fn remember(&self, meta: &kube::core::ObjectMeta) {
        let (Some(at), Some(uid)) = (location(meta), meta.uid.as_deref().and_then(|u| Uuid::parse_str(u).ok())) else { return };
        if let Some(scope) = self.scopes.iter().find(|s| s.covers(&at.namespace)) {
            scope.runs.write().apply(Change::Run(uid, at, Vec::new()));
        }
    }

    /// The name of the TriggerRun whose uid is `uid`, in `namespace`.
    pub fn run(&self, namespace: &str, uid: &Uuid) -> Option<String> {
        self.scopes.iter().filter(|s| s.covers(namespace)).find_map(|s| s.runs.read().runs.get(uid).filter(|at| at.namespace == namespace).map(|at| at.name.clone()))
    }

    /// The page or run that holds the recipient run `id` in `namespace`, and its position there.
    pub fn recipient(&self, namespace: &str, id: &Uuid) -> Option<(Holder, usize)> {
        let find = |maps: &Shared| maps.read().recipients.get(id).filter(|(at, _)| at.namespace == namespace).map(|(at, position)| (at.name.clone(), *position as usize));
        self.scopes
            .iter()
            .filter(|s| s.covers(namespace))
            .find_map(|s| find(&s.pages).map(|(name, position)| (Holder::Page(name), position)).or_else(|| find(&s.runs).map(|(name, position)| (Holder::Run(name), position))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(namespace: &str, name: &str) -> Location {
        Location { namespace: namespace.into(), name: name.into() }
    }

    /// An index of one scope: `runs` as the runs' watch fed it, `pages` as the pages'.
    fn index(runs: Maps, pages: Maps) -> RunIndex {
        let scope = ScopeIndex { namespace: None, ..Default::default() };
        *scope.runs.write() = runs;
        *scope.pages.write() = pages;
        RunIndex { scopes: vec![Arc::new(scope)], ready: watch::channel(true).1 }
    }

    #[test]
    fn finds_runs_and_recipients_in_their_namespace_only() {
        let (run, ids) = (Uuid::new_v4(), [Uuid::new_v4(), Uuid::new_v4()]);
        let (mut runs, mut pages) = (Maps::default(), Maps::default());
        runs.apply(Change::Run(run, at("team-a", "run-1"), vec![]));
        pages.apply(Change::Page(at("team-a", "run-1-p0"), ids.to_vec()));
        let index = index(runs, pages);
        assert_eq!(index.run("team-a", &run).as_deref(), Some("run-1"));
        assert_eq!(index.run("team-b", &run), None, "another namespace's run is not found");
        assert_eq!(index.recipient("team-a", &ids[1]), Some((Holder::Page("run-1-p0".into()), 1)));
        assert_eq!(index.recipient("team-b", &ids[1]), None);
        assert_eq!(index.recipient("team-a", &run), None);
    }

    #[test]
    fn a_small_run_holds_its_recipient_runs_itself() {
        let (run, ids) = (Uuid::new_v4(), vec![Uuid::new_v4(), Uuid::new_v4()]);
        let mut runs = Maps::default();
        // Known first without its ids (created by this replica), then with them (acceptance).
        runs.apply(Change::Run(run, at("ns", "small"), vec![]));
        runs.apply(Change::Run(run, at("ns", "small"), ids.clone()));
        let index = index(runs, Maps::default());
        assert_eq!(index.run("ns", &run).as_deref(), Some("small"));
        assert_eq!(index.recipient("ns", &ids[1]), Some((Holder::Run("small".into()), 1)));
        assert_eq!(index.recipient("other", &ids[1]), None);
        let mut runs = Maps::default();
        runs.apply(Change::Run(run, at("ns", "small"), ids.clone()));
        runs.delete(Change::Run(run, at("ns", "small"), ids));
        assert!(runs.runs.is_empty() && runs.recipients.is_empty());
    }

    #[test]
    fn deletes_remove_only_what_they_name() {
        let (run, ids) = (Uuid::new_v4(), vec![Uuid::new_v4(), Uuid::new_v4()]);
        let mut maps = Maps::default();
        maps.apply(Change::Run(run, at("ns", "run-1"), vec![]));
        maps.apply(Change::Page(at("ns", "run-1-p0"), ids.clone()));
        // A run of the same name deleted earlier (another uid) leaves this one.
        maps.delete(Change::Run(Uuid::new_v4(), at("ns", "run-1"), vec![]));
        maps.delete(Change::Run(run, at("ns", "other"), vec![]));
        assert!(maps.runs.contains_key(&run));
        maps.delete(Change::Page(at("ns", "run-1-p0"), ids.clone()));
        maps.delete(Change::Run(run, at("ns", "run-1"), vec![]));
        assert!(maps.runs.is_empty() && maps.recipients.is_empty());
        // A page's later writes do not re-insert its ids.
        maps.apply(Change::Page(at("ns", "p"), ids.clone()));
        let first = maps.recipients[&ids[0]].0.clone();
        maps.apply(Change::Page(at("ns", "p"), ids.clone()));
        assert!(Arc::ptr_eq(&first, &maps.recipients[&ids[1]].0));
    }
}
