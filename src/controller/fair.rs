//! Fairly shared slots for async work: delivery attempts (the Deliverer) and
//! TriggerRun reconciles. [`crate::core::fair::FairQueue`] decides who gets a
//! freed slot; this wakes them, and keeps the `herald_slot_*` metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::core::fair::{FairQueue, Grant};
use crate::metrics::{Metrics, SlotLabels};

/// A pool of `capacity` slots named `pool` in metrics, whose namespaces each
/// keep an eighth free for the others unless herald watches a single namespace.
pub fn pool(pool: &'static str, capacity: usize, settings: &crate::settings::Settings, metrics: &Arc<Metrics>) -> Arc<FairSlots> {
    let cap = crate::core::fair::tenant_cap(capacity, settings.namespaces.len() == 1);
    FairSlots::new(pool, capacity, cap, Some(metrics.clone()))
}

/// A pool of slots shared fairly among namespaces (tenants) and, within one,
/// among runs (flows).
pub struct FairSlots {
    /// The pool's name in metrics.
    pool: &'static str,
    state: Mutex<State>,
    metrics: Option<Arc<Metrics>>,
}

struct State {
    queue: FairQueue<u64>,
    /// How to wake each waiter, and since when it waits.
    wake: HashMap<u64, (oneshot::Sender<()>, Instant)>,
    next: u64,
    closed: bool,
}

impl FairSlots {
    /// `capacity` slots, at most `tenant_cap` of them per tenant (see [`crate::core::fair::tenant_cap`]).
    pub fn new(pool: &'static str, capacity: usize, tenant_cap: usize, metrics: Option<Arc<Metrics>>) -> Arc<Self> {
        let state = State { queue: FairQueue::new(capacity, tenant_cap), wake: HashMap::new(), next: 0, closed: false };
        Arc::new(FairSlots { pool, state: Mutex::new(state), metrics })
    }

    /// Waits for a slot for `tenant`'s `flow`; it is given back when the
    /// [`Slot`] is dropped. None once the pool is closed. Cancel-safe: a
    /// waiter dropped before or after being given a slot leaves nothing held.
    pub async fn acquire(self: &Arc<Self>, tenant: &str, flow: &str) -> Option<Slot> {
        let (id, granted) = {
            let mut state = self.lock();
            if state.closed {
                return None;
            }
            let id = state.next;
            state.next += 1;
            let (tx, rx) = oneshot::channel();
            state.wake.insert(id, (tx, Instant::now()));
            let grants = state.queue.request(tenant, flow, id);
            self.wake(&mut state, grants);
            self.report(&state, tenant);
            (id, rx)
        };
        let mut waiting = Waiting { slots: self, tenant, flow, id, settled: false };
        // Err: the pool was closed; `waiting` then leaves the queue as it drops.
        granted.await.ok()?;
        waiting.settled = true;
        Some(Slot { slots: self.clone(), tenant: tenant.to_string(), flow: flow.to_string() })
    }

    /// Closes the pool: waiters and later callers of [`acquire`](Self::acquire) get None
    /// (a stopping controller must not start the reconciles still queued).
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        // Dropping the senders wakes every waiter with an error.
        state.wake.clear();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock; if something did, the counts are still whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, tenant: &str, flow: &str) {
        let mut state = self.lock();
        let grants = state.queue.release(tenant, flow);
        self.wake(&mut state, grants);
        self.report(&state, tenant);
    }

    fn wake(&self, state: &mut State, grants: Vec<Grant<u64>>) {
        for grant in grants {
            // A waiter dropped meanwhile gives its slot back itself (see `Waiting`).
            if let Some((tx, since)) = state.wake.remove(&grant.waiter) {
                if let Some(m) = &self.metrics {
                    m.slot_wait_seconds.get_or_create(&self.labels(&grant.tenant)).observe(since.elapsed().as_secs_f64());
                }
                let _ = tx.send(());
            }
            self.report(state, &grant.tenant);
        }
    }

    fn labels(&self, tenant: &str) -> SlotLabels {
        SlotLabels { pool: self.pool.to_string(), namespace: tenant.to_string() }
    }

    /// Sets a namespace's gauges; a namespace holding and awaiting nothing
    /// has none (its series end), so namespaces come and go without the
    /// metrics growing with every namespace ever served. The wait histogram
    /// is cumulative and stays.
    fn report(&self, state: &State, tenant: &str) {
        if let Some(m) = &self.metrics {
            let labels = self.labels(tenant);
            let (waiting, in_use) = (state.queue.waiting(tenant), state.queue.in_use_by(tenant));
            if waiting == 0 && in_use == 0 {
                m.slot_waiters.remove(&labels);
                m.slots_in_use.remove(&labels);
            } else {
                m.slot_waiters.get_or_create(&labels).set(waiting as i64);
                m.slots_in_use.get_or_create(&labels).set(in_use as i64);
            }
        }
    }
}

/// An [`FairSlots::acquire`] in progress: dropped unsettled (the caller gave
/// up, or the pool closed), it leaves the queue, or gives back the slot it
/// was given but never took.
struct Waiting<'a> {
    slots: &'a Arc<FairSlots>,
    tenant: &'a str,
    flow: &'a str,
    id: u64,
    settled: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut state = self.slots.lock();
        state.wake.remove(&self.id);
        if !state.queue.cancel(self.tenant, self.flow, &self.id) {
            let grants = state.queue.release(self.tenant, self.flow);
            self.slots.wake(&mut state, grants);
        }
        self.slots.report(&state, self.tenant);
    }
}

/// A slot held; given back (to the fairest waiter) when dropped.
pub struct Slot {
    slots: Arc<FairSlots>,
    tenant: String,
    flow: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(&self.tenant, &self.flow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_other_namespace_before_the_queue_of_the_busy_one() {
        let metrics = Arc::new(Metrics::default());
        let slots = FairSlots::new("test", 2, 2, Some(metrics.clone()));
        let mut held = vec![slots.acquire("a", "r").await.unwrap(), slots.acquire("a", "r").await.unwrap()];
        let mut queued_a: Vec<_> = (0..10).map(|_| Box::pin(slots.acquire("a", "r"))).collect();
        for q in &mut queued_a {
            assert!(q.as_mut().now_or_never().is_none(), "no slot is free");
        }
        let mut b = Box::pin(slots.acquire("b", "r"));
        assert!(b.as_mut().now_or_never().is_none());
        let text = metrics.render();
        assert!(text.contains(r#"herald_slot_waiters{pool="test",namespace="a"} 10"#), "{text}");
        drop(held.pop());
        let b = b.await.expect("b gets the freed slot");
        assert!(queued_a[0].as_mut().now_or_never().is_none(), "a's waiters are still waiting");
        assert!(metrics.render().contains(r#"herald_slots_in_use{pool="test",namespace="b"} 1"#));
        drop(b);
        assert!(queued_a[0].as_mut().now_or_never().is_some(), "then a's first waiter goes");
        let text = metrics.render();
        assert!(!text.contains(r#"herald_slots_in_use{pool="test",namespace="b"}"#), "a namespace holding nothing has no gauge: {text}");
    }

    #[tokio::test]
    async fn waiters_that_give_up_leave_nothing_held() {
        let slots = FairSlots::new("test", 1, 1, None);
        let held = slots.acquire("a", "r").await.unwrap();
        // Given up while waiting.
        let mut gone = Box::pin(slots.acquire("b", "r"));
        assert!(gone.as_mut().now_or_never().is_none());
        drop(gone);
        // Given up after being granted, before taking it.
        let mut late = Box::pin(slots.acquire("c", "r"));
        assert!(late.as_mut().now_or_never().is_none());
        drop(held);
        drop(late);
        // The slot is free again: an acquire gets it at once.
        let again = slots.acquire("d", "r").now_or_never();
        assert!(matches!(again, Some(Some(_))), "the slot was passed on");
        assert_eq!(slots.lock().queue.in_use(), 1);
    }

    #[tokio::test]
    async fn closing_wakes_waiters_with_nothing_and_refuses_new_ones() {
        let slots = FairSlots::new("test", 1, 1, None);
        let held = slots.acquire("a", "r").await.unwrap();
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire("b", "r").await.is_none() }
        });
        // Wait (not sleep) until the spawned waiter is queued.
        while slots.lock().queue.waiting("b") == 0 {
            tokio::task::yield_now().await;
        }
        slots.close();
        assert!(waiter.await.unwrap());
        assert!(slots.acquire("c", "r").await.is_none());
        drop(held);
        assert_eq!(slots.lock().queue.in_use(), 0);
        assert_eq!(slots.lock().queue.waiting("b"), 0);
    }
}
