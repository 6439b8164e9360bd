//! The store of batch steps: `Batch` objects read and written with optimistic
//! concurrency around the rules of `core::batch`.
//!
//! Every visit to a group goes through the group's one current object
//! ([`BatchGroup::name`]): read, decide, then create it or replace it at the
//! resourceVersion read. A write that loses (409) reads again and decides
//! again, so concurrent visitors, in this process or others, each land
//! exactly once. In one process visits of a group are combined
//! ([`Combiner`]): a round decides every visit queued meanwhile and writes
//! once, so they never conflict with each other, and the last object written
//! is reused as the next round's read.
//!
//! A closed batch with a carrier is archived (copied under
//! [`BatchGroup::archive_name`]) before a new batch replaces it, so its
//! carrier still finds it; [`finish`] deletes it once the carrier has
//! continued, [`sweep`] what was abandoned.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Api, Client};

use super::combine::Combiner;
use super::lenient::Lenient;
use super::Error;
use crate::core::batch::{self as rules, BatchDecision, BatchGroup, BatchState, BatchSummary, Visit, ABANDONED_AFTER, ARCHIVE_LABEL};
use crate::resources::{Batch, BatchSpec};

/// How many times a visit reads and writes again after losing a write.
const MAX_ATTEMPTS: u32 = 40;
/// Batches listed per page by [`sweep`] (a Batch may be up to about a megabyte).
const SWEEP_PAGE: u32 = 50;

/// What one process knows of a group between visits.
#[derive(Default)]
struct Slot {
    /// The group's object as last written or read here: (state, resourceVersion).
    /// Only a base for writes (which the resourceVersion checks) and
    /// re-read before an answer that writes nothing.
    last: Option<(Option<BatchState>, Option<String>)>,
    /// The recipient run ids of an archive (immutable once written), by name.
    previous: Option<(String, Arc<HashSet<String>>)>,
}

/// A visit waiting for its group's next round, and when it was made.
type Pending = (Visit, Timestamp);

/// One group in this process: its slot (held by the round writing, or by a
/// finish) and the visits queued for the next round.
#[derive(Default)]
struct Group {
    slot: tokio::sync::Mutex<Slot>,
    visits: Combiner<Pending, Result<BatchDecision, String>>,
}

type Slots = std::sync::Mutex<HashMap<String, Weak<Group>>>;

/// The lock table of this process, shared by the free functions.
static SHARED: LazyLock<Arc<Slots>> = LazyLock::new(Arc::default);

/// A store of batches: a client and the lock table visits queue on.
#[derive(Clone)]
pub struct BatchStore {
    client: Client,
    slots: Arc<Slots>,
}

/// Visits `visit.group` through the process-wide store (see [`BatchStore::visit`]).
pub async fn visit(client: &Client, namespace: &str, visit: &Visit, now: Timestamp) -> Result<BatchDecision, Error> {
    BatchStore::shared(client.clone()).visit(namespace, visit, now).await
}

/// See [`BatchStore::finish`].
pub async fn finish(client: &Client, namespace: &str, group: &BatchGroup, carrier_recipient_run_id: &str) -> Result<(), Error> {
    BatchStore::shared(client.clone()).finish(namespace, group, carrier_recipient_run_id).await
}

/// See [`BatchStore::sweep`].
pub async fn sweep(client: &Client, namespace: Option<&str>, now: Timestamp) -> Result<usize, Error> {
    BatchStore::shared(client.clone()).sweep(namespace, now).await
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// A state as read: None when absent, or stored in a form herald cannot read
/// (logged; overwritten by the next write, so it never wedges its group).
struct Read {
    state: Option<BatchState>,
    group: Option<BatchGroup>,
    resource_version: Option<String>,
}

impl BatchStore {
    /// A store with its own lock table (as another replica would have).
    pub fn new(client: Client) -> Self {
        BatchStore { client, slots: Arc::default() }
    }

    /// A store sharing this process's lock table.
    pub fn shared(client: Client) -> Self {
        BatchStore { client, slots: SHARED.clone() }
    }

    fn api(&self, namespace: &str) -> Api<Batch> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The group's entry in this process's table.
    fn group(&self, namespace: &str, name: &str) -> Arc<Group> {
        let key = format!("{namespace}/{name}");
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.get(&key).and_then(Weak::upgrade) {
            Some(group) => group,
            None => {
                if slots.len() >= 1024 {
                    slots.retain(|_, s| s.strong_count() > 0);
                }
                let group = Arc::new(Group::default());
                slots.insert(key, Arc::downgrade(&group));
                group
            }
        }
    }

    async fn read(&self, namespace: &str, name: &str) -> Result<Read, Error> {
        let api: Api<Lenient<Batch>> = Api::namespaced(self.client.clone(), namespace);
        Ok(match api.get_opt(name).await? {
            None => Read { state: None, group: None, resource_version: None },
            Some(Lenient::Valid(batch)) => {
                Read { state: Some(batch.spec.state.clone()), group: Some(batch.spec.group.clone()), resource_version: batch.metadata.resource_version.clone() }
            }
            Some(Lenient::Invalid { metadata, error }) => {
                tracing::warn!(%namespace, %name, %error, "a Batch herald cannot read; it is replaced by the next visit");
                Read { state: None, group: None, resource_version: metadata.resource_version.clone() }
            }
        })
    }

    /// What `visit` does: it opens a batch and carries it, joins the one open
    /// (and ends), continues at once (flush-leading), waits, or continues
    /// with the closed batch's summary. Asking again gives the same answer
    /// and changes nothing.
    ///
    /// Visitors of one group in this process commit together ([`Combiner`]):
    /// each queues its visit, and a round decides every queued visit in
    /// arrival order and writes the result once, so a burst of joiners costs
    /// a few writes of the (growing) object, not one each.
    pub async fn visit(&self, namespace: &str, visit: &Visit, now: Timestamp) -> Result<BatchDecision, Error> {
        let name = visit.group.name();
        let group = self.group(namespace, &name);
        let (store, round_group, round_namespace, round_name) = (self.clone(), group.clone(), namespace.to_string(), name.clone());
        let decided = group
            .visits
            .submit((visit.clone(), now), move |pending| async move {
                let mut slot = round_group.slot.lock().await;
                store.visit_all(&mut slot, &round_namespace, &round_name, pending).await
            })
            .await;
        match decided {
            Some(decision) => decision.map_err(Error::Stale),
            None => Err(Error::Stale(format!("Batch {namespace}/{name}: the visit was not decided"))),
        }
    }

    /// Decides queued visits, in order, one answer each: runs of ordinary
    /// ones together (one write), the others (a carrier whose batch was
    /// replaced, a run to look for in the previous batch, a close that
    /// archives) one at a time.
    async fn visit_all(&self, slot: &mut Slot, namespace: &str, name: &str, pending: Vec<Pending>) -> Vec<Result<BatchDecision, String>> {
        let mut answers = Vec::with_capacity(pending.len());
        while answers.len() < pending.len() {
            let rest = &pending[answers.len()..];
            match self.visit_together(slot, namespace, name, rest).await {
                Ok(decisions) if !decisions.is_empty() => answers.extend(decisions.into_iter().map(Ok)),
                Ok(_) => {
                    let (visit, now) = &rest[0];
                    answers.push(self.visit_one(slot, namespace, visit, *now).await.map_err(|e| e.to_string()));
                }
                Err(e) => {
                    let message = e.to_string();
                    answers.resize(pending.len(), Err(message));
                }
            }
        }
        answers
    }

    /// Decides the longest run of ordinary visits from the front of
    /// `pending` against one read, and writes once. Empty when the first
    /// visit needs [`Self::visit_one`].
    async fn visit_together(&self, slot: &mut Slot, namespace: &str, name: &str, pending: &[Pending]) -> Result<Vec<BatchDecision>, Error> {
        let group = &pending[0].0.group;
        for attempt in 0..MAX_ATTEMPTS {
            let (from_cache, (current, resource_version)) = match slot.last.take() {
                Some(last) => (true, last),
                None => {
                    let read = self.read(namespace, name).await?;
                    if read.group.as_ref().is_some_and(|g| g != group) {
                        return Err(Error::Stale(format!("Batch {namespace}/{name} belongs to another group (a name collision); not touching it")));
                    }
                    (false, (read.state, read.resource_version))
                }
            };
            let mut state = current.clone();
            let mut decisions = Vec::new();
            let mut changed = false;
            for (visit, now) in pending {
                let me = visit.activity.recipient_run_id.as_str();
                let known = state.as_ref().is_some_and(|s| s.contains(me));
                if !known && (visit.carrying || state.as_ref().and_then(|s| s.previous_to_check(*now)).is_some()) {
                    break;
                }
                let (decision, next) = rules::visit(state.as_ref(), visit, *now);
                if let Some(next) = next {
                    if state.as_ref().is_some_and(|c| rules::needs_archive(c, &next)) {
                        break;
                    }
                    state = Some(next);
                    changed = true;
                }
                decisions.push(decision);
            }
            if decisions.is_empty() || !changed {
                if from_cache && !decisions.is_empty() {
                    // Answers that write nothing come from a fresh read.
                    continue;
                }
                slot.last = Some((current, resource_version));
                return Ok(decisions);
            }
            let Some(next) = state else { return Ok(Vec::new()) };
            match self.write(namespace, group, name, next, resource_version).await {
                Ok(written) => {
                    slot.last = Some(written);
                    return Ok(decisions);
                }
                Err(e) if is_conflict(&e) || is_not_found(&e) => {
                    tracing::debug!(%namespace, %name, attempt, visits = decisions.len(), "batch write lost; reading again");
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=(5 * u64::from(attempt + 1)).min(100)))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Stale(format!("Batch {namespace}/{name} kept changing; gave up after {MAX_ATTEMPTS} attempts")))
    }

    /// One visit on its own (see [`Self::visit`]).
    async fn visit_one(&self, slot: &mut Slot, namespace: &str, visit: &Visit, now: Timestamp) -> Result<BatchDecision, Error> {
        let name = visit.group.name();
        let me = visit.activity.recipient_run_id.as_str();
        for attempt in 0..MAX_ATTEMPTS {
            let (from_cache, (current, resource_version)) = match slot.last.take() {
                Some(last) => (true, last),
                None => {
                    let read = self.read(namespace, &name).await?;
                    if read.group.as_ref().is_some_and(|g| g != &visit.group) {
                        return Err(Error::Stale(format!("Batch {namespace}/{name} belongs to another group (a name collision); not touching it")));
                    }
                    (false, (read.state, read.resource_version))
                }
            };
            let known = current.as_ref().is_some_and(|s| s.contains(me));
            if !known {
                if visit.carrying {
                    // The batch this run carries was archived when a newer one replaced it.
                    slot.last = Some((current, resource_version));
                    return self.carried(namespace, visit, now).await;
                }
                if let Some(previous) = current.as_ref().and_then(|s| s.previous_to_check(now)) {
                    if let Some(decision) = self.in_previous(slot, namespace, previous, visit, now).await? {
                        slot.last = Some((current, resource_version));
                        return Ok(decision);
                    }
                }
            }
            let (decision, next) = rules::visit(current.as_ref(), visit, now);
            let Some(next) = next else {
                if from_cache {
                    // Answers that write nothing come from a fresh read.
                    continue;
                }
                slot.last = Some((current, resource_version));
                return Ok(decision);
            };
            if let Some(current) = current.as_ref().filter(|c| rules::needs_archive(c, &next)) {
                self.archive(namespace, &visit.group, current).await?;
            }
            match self.write(namespace, &visit.group, &name, next, resource_version).await {
                Ok(written) => {
                    slot.last = Some(written);
                    return Ok(decision);
                }
                Err(e) if is_conflict(&e) || is_not_found(&e) => {
                    // Another writer (or a sweep) came first: read again and decide again.
                    tracing::debug!(%namespace, %name, attempt, "batch write lost; reading again");
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=(5 * u64::from(attempt + 1)).min(100)))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Stale(format!("Batch {namespace}/{name} kept changing; gave up after {MAX_ATTEMPTS} attempts")))
    }

    /// The decision for a carrier whose batch is no longer its group's current one.
    async fn carried(&self, namespace: &str, visit: &Visit, now: Timestamp) -> Result<BatchDecision, Error> {
        let archive = visit.group.archive_name(&visit.activity.recipient_run_id);
        match self.read(namespace, &archive).await?.state {
            Some(state) if state.is_carrier(&visit.activity.recipient_run_id) => Ok(rules::visit(Some(&rules::archived(&state)), visit, now).0),
            _ => {
                // Deleted by hand or swept as abandoned: nothing is left to send.
                tracing::warn!(%namespace, group = %visit.group.name(), run = %visit.activity.recipient_run_id, "the batch this run carries is gone; it continues with an empty batch");
                Ok(BatchDecision::Closed(BatchSummary::default()))
            }
        }
    }

    /// The decision for a run found in the archive `previous` (it joined that batch and asks again), if it is there.
    async fn in_previous(&self, slot: &mut Slot, namespace: &str, previous: &str, visit: &Visit, now: Timestamp) -> Result<Option<BatchDecision>, Error> {
        let me = visit.activity.recipient_run_id.as_str();
        if let Some((name, members)) = &slot.previous {
            if name == previous && !members.contains(me) {
                return Ok(None);
            }
        }
        let Some(state) = self.read(namespace, previous).await?.state else {
            slot.previous = Some((previous.to_string(), Arc::default()));
            return Ok(None);
        };
        let members: HashSet<String> = state.activities.iter().map(|a| a.recipient_run_id.clone()).chain(state.carrier.iter().map(|c| c.recipient_run_id.clone())).collect();
        let found = members.contains(me);
        slot.previous = Some((previous.to_string(), Arc::new(members)));
        Ok(found.then(|| rules::visit(Some(&rules::archived(&state)), visit, now).0))
    }

    /// Copies a closed batch to its carrier's archive (already there: done before by a visit that then lost).
    async fn archive(&self, namespace: &str, group: &BatchGroup, state: &BatchState) -> Result<(), Error> {
        let Some(carrier) = &state.carrier else { return Ok(()) };
        let name = group.archive_name(&carrier.recipient_run_id);
        let mut batch = Batch::new(&name, BatchSpec { group: group.clone(), state: rules::archived(state) });
        let mut labels = group.labels();
        labels.insert(ARCHIVE_LABEL.into(), "true".into());
        batch.metadata.labels = Some(labels);
        match self.api(namespace).create(&PostParams::default(), &batch).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the group's object (no resourceVersion) or replaces it at `resource_version`.
    async fn write(
        &self,
        namespace: &str,
        group: &BatchGroup,
        name: &str,
        state: BatchState,
        resource_version: Option<String>,
    ) -> Result<(Option<BatchState>, Option<String>), kube::Error> {
        let mut batch = Batch::new(name, BatchSpec { group: group.clone(), state });
        batch.metadata.labels = Some(group.labels());
        let api = self.api(namespace);
        let written = match resource_version {
            Some(rv) => {
                batch.metadata.resource_version = Some(rv);
                api.replace(name, &PostParams::default(), &batch).await?
            }
            None => api.create(&PostParams::default(), &batch).await?,
        };
        Ok((Some(written.spec.state), written.metadata.resource_version))
    }

    /// Deletes the batch `carrier_recipient_run_id` carried, once it has
    /// continued with it (and recorded so): its archive, and the group's
    /// object if that is still its batch and closed. Idempotent.
    pub async fn finish(&self, namespace: &str, group: &BatchGroup, carrier_recipient_run_id: &str) -> Result<(), Error> {
        let name = group.name();
        let entry = self.group(namespace, &name);
        let mut slot = entry.slot.lock().await;
        slot.last = None;
        match self.api(namespace).delete(&group.archive_name(carrier_recipient_run_id), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        for _ in 0..MAX_ATTEMPTS {
            let read = self.read(namespace, &name).await?;
            let Some(state) = read.state else { return Ok(()) };
            if read.group.as_ref() != Some(group) || !state.is_carrier(carrier_recipient_run_id) {
                return Ok(());
            }
            if !state.closed {
                // Only a carrier told `Closed` finishes; an open batch still collects joiners.
                tracing::warn!(%namespace, %name, "finish of a batch that is not closed; kept");
                return Ok(());
            }
            match self.delete_at(namespace, &name, read.resource_version).await {
                Ok(()) => return Ok(()),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Stale(format!("Batch {namespace}/{name} kept changing while being finished")))
    }

    /// Deletes `name` if it is still at `resource_version` (gone already is fine).
    async fn delete_at(&self, namespace: &str, name: &str, resource_version: Option<String>) -> Result<(), kube::Error> {
        let params = DeleteParams { preconditions: Some(Preconditions { resource_version, uid: None }), ..DeleteParams::default() };
        match self.api(namespace).delete(name, &params).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes abandoned batches in `namespace` (every namespace: None): see
    /// [`BatchState::abandoned`]; ones herald cannot read once they are older
    /// than [`ABANDONED_AFTER`]. A batch changed meanwhile is kept. Returns how many were deleted.
    pub async fn sweep(&self, namespace: Option<&str>, now: Timestamp) -> Result<usize, Error> {
        let api: Api<Lenient<Batch>> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let mut deleted = 0;
        let mut params = ListParams::default().limit(SWEEP_PAGE);
        loop {
            let page = api.list(&params).await?;
            for batch in &page.items {
                let (metadata, abandoned) = match batch {
                    Lenient::Valid(b) => (&b.metadata, b.spec.state.abandoned(now)),
                    Lenient::Invalid { metadata, .. } => {
                        let created = metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
                        (metadata.as_ref(), created.checked_add(ABANDONED_AFTER).is_ok_and(|t| t <= now))
                    }
                };
                let (Some(ns), Some(name)) = (metadata.namespace.as_deref(), metadata.name.as_deref()) else { continue };
                if !abandoned {
                    continue;
                }
                match self.delete_at(ns, name, metadata.resource_version.clone()).await {
                    Ok(()) => deleted += 1,
                    Err(e) if is_conflict(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(deleted),
            }
        }
    }
}
