//! Throttle steps against the cluster: each gate's state lives in a
//! `Throttle` resource, read, decided on by `core::throttle::decide` and
//! written back only if nobody wrote it in between (create, or replace
//! carrying the resourceVersion read; a conflict means re-read and decide
//! again). So decisions stay exact across processes, e.g. two replicas
//! during a leadership handover: with limit N exactly N runs are admitted per
//! window however many ask at once.
//!
//! Inside one process, calls for the same gate take turns (a keyed async
//! mutex), so a process does not lose conflicts against itself.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Api, Client, Resource};

use super::lenient::Lenient;
use super::Error;
use crate::core::throttle::{decide, ThrottleDecision, ThrottleRequest};
use crate::resources::{Throttle, ThrottleSpec};

/// Conflicting writes in a row before `pass` gives up (each one means another
/// writer changed the gate meanwhile, so it made progress).
pub const MAX_ATTEMPTS: u32 = 16;

/// One process's view of the throttle gates: its in-process turn-taking.
/// [`pass`] uses one shared gate; a separate `ThrottleGate` behaves as
/// another process would (the tests race two).
#[derive(Default)]
pub struct ThrottleGate {
    /// A mutex per `namespace/name` in use. Weak, so an entry nobody holds
    /// is dead and removed (when its last holder lets go, or at the next
    /// insertion for holders that were cancelled while waiting).
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

/// Holds one gate's turn; gives it up, and removes the entry if unused, when dropped.
struct Turn<'a> {
    gate: &'a ThrottleGate,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // The guard holds the only Arc this turn has: after it goes, a count of
        // zero (checked under the map's lock, where all upgrades happen) means nobody waits.
        drop(self.guard.take());
        let mut locks = self.gate.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if locks.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
            locks.remove(&self.key);
        }
    }
}

impl ThrottleGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many gates have an entry (in use, or waiting to be removed).
    pub fn entries(&self) -> usize {
        self.locks.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    async fn turn(&self, key: String) -> Turn<'_> {
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            match locks.get(&key).and_then(Weak::upgrade) {
                Some(mutex) => mutex,
                None => {
                    locks.retain(|_, w| w.strong_count() > 0);
                    let mutex = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key.clone(), Arc::downgrade(&mutex));
                    mutex
                }
            }
        };
        let guard = mutex.lock_owned().await;
        Turn { gate: self, key, guard: Some(guard) }
    }

    /// Whether `request`'s recipient run passes its throttle step at `now`
    /// (see [`pass`]).
    pub async fn pass(&self, client: &Client, namespace: &str, request: &ThrottleRequest, now: Timestamp) -> Result<ThrottleDecision, Error> {
        let name = request.group.name();
        let _turn = self.turn(format!("{namespace}/{name}")).await;
        // Read leniently (a broken object must not stop the gate); write typed.
        let api: Api<Lenient<Throttle>> = Api::namespaced(client.clone(), namespace);
        let writer: Api<Throttle> = Api::namespaced(client.clone(), namespace);
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                // A little jitter so two processes that collided do not collide again in step.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=10) * u64::from(attempt.min(5)))).await;
            }
            // A plain GET reads from etcd (quorum), never from the apiserver's watch cache.
            let current = api.get_opt(&name).await?;
            let state = match &current {
                Some(Lenient::Valid(throttle)) => Some(&throttle.spec.state),
                Some(Lenient::Invalid { error, .. }) => {
                    // herald's own object: overwrite it rather than failing every run forever.
                    tracing::warn!(%namespace, %name, %error, "a Throttle herald cannot read; starting it afresh");
                    None
                }
                None => None,
            };
            let (decision, next) = decide(state, request, now)?;
            let Some(next) = next else { return Ok(decision) };
            let spec = ThrottleSpec::new(&request.group, request.limit, next);
            let written = match current {
                None => writer.create(&PostParams::default(), &Throttle::for_group(&request.group, request.limit, spec.state)).await,
                Some(current) => {
                    // Everything as read (labels, annotations, resourceVersion), with the new spec:
                    // the resourceVersion makes the replace fail if anyone wrote since.
                    let mut object = match current {
                        Lenient::Valid(throttle) => Arc::unwrap_or_clone(throttle),
                        Lenient::Invalid { metadata, .. } => Throttle { metadata: *metadata, spec: ThrottleSpec::default() },
                    };
                    object.spec = spec;
                    object.metadata.labels.get_or_insert_default().extend(request.group.labels());
                    writer.replace(&name, &PostParams::default(), &object).await
                }
            };
            match written {
                Ok(_) => return Ok(decision),
                // 409: another writer created or changed it; 404: swept since it was read.
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                    tracing::debug!(%namespace, %name, attempt, reason = %status.reason, "Throttle changed since it was read; deciding again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Stale(format!("Throttle {namespace}/{name}: {MAX_ATTEMPTS} conflicting writes in a row")))
    }
}

static GATE: LazyLock<ThrottleGate> = LazyLock::new(ThrottleGate::new);

/// Whether `request`'s recipient run passes its throttle step at `now`:
/// reads the gate's Throttle in `namespace`, decides, and writes the new
/// state if it changed (only when a run is admitted), retrying on conflicts
/// up to [`MAX_ATTEMPTS`] times (then [`Error::Stale`]). A run admitted
/// before is admitted again without a write. An invalid request is
/// [`Error::Throttle`]. Calls for one gate take turns within this process.
pub async fn pass(client: &Client, namespace: &str, request: &ThrottleRequest, now: Timestamp) -> Result<ThrottleDecision, Error> {
    GATE.pass(client, namespace, request, now).await
}

/// Deletes the Throttles (in `namespace`, or all namespaces) whose window
/// ended by `now`, and those herald cannot read; returns how many. Each
/// delete is conditional on the version listed, so a Throttle a run renewed
/// meanwhile stays. Pass an earlier `now` to keep ended windows for a while
/// (a run admitted just before the end that asks again after its Throttle is
/// gone is admitted again, in a new window).
pub async fn sweep(client: &Client, namespace: Option<&str>, now: Timestamp) -> Result<usize, Error> {
    let api: Api<Lenient<Throttle>> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut params = ListParams::default().limit(500);
    let mut deleted = 0;
    loop {
        let page = api.list(&params).await?;
        for item in &page.items {
            let ended = match item {
                Lenient::Valid(throttle) => throttle.spec.state.expired(now),
                Lenient::Invalid { .. } => true,
            };
            let meta = item.meta();
            let (true, Some(ns), Some(name)) = (ended, meta.namespace.as_deref(), meta.name.as_deref()) else { continue };
            let params = DeleteParams { preconditions: Some(Preconditions { resource_version: meta.resource_version.clone(), uid: meta.uid.clone() }), ..DeleteParams::default() };
            match Api::<Lenient<Throttle>>::namespaced(client.clone(), ns).delete(name, &params).await {
                Ok(_) => deleted += 1,
                // 409: renewed since listed; 404: already gone.
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_per_gate_and_entries_go_when_unused() {
        let gate = ThrottleGate::new();
        let a = gate.turn("ns/a".into()).await;
        let b = gate.turn("ns/b".into()).await; // another gate: no waiting
        assert_eq!(gate.entries(), 2);
        // A second turn for `a` waits until the first ends.
        let mut waiting = Box::pin(gate.turn("ns/a".into()));
        assert!(futures::poll!(&mut waiting).is_pending());
        drop(a);
        let again = waiting.await;
        assert_eq!(gate.entries(), 2, "still in use");
        drop(again);
        drop(b);
        assert_eq!(gate.entries(), 0);
        // A waiter cancelled while waiting leaves a dead entry, removed at the next insertion.
        let held = gate.turn("ns/c".into()).await;
        let mut cancelled = Box::pin(gate.turn("ns/c".into()));
        assert!(futures::poll!(&mut cancelled).is_pending());
        drop(held);
        drop(cancelled);
        let _e = gate.turn("ns/e".into()).await;
        assert_eq!(gate.entries(), 1);
    }
}
