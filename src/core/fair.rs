//! Fair sharing of a fixed number of slots (delivery attempts, reconciles)
//! among tenants (namespaces) and, within a tenant, among its flows (runs).
//!
//! A FIFO queue serves whoever asked first, so one namespace that asks for
//! thousands of slots makes every other namespace wait behind all of them
//! (Knock's May 2026 incident). Here each freed slot goes to the waiting
//! tenant holding the fewest slots, ties to the one served longest ago, and
//! within it to the waiting flow holding the fewest, likewise: a namespace
//! with one waiting delivery gets the next free slot however many another
//! has queued, and shares converge to equal as slots turn over.
//!
//! Turnover alone is not enough when slots are held long (a reconcile of a
//! 100,000-recipient run holds its slot for minutes; a hung receiver holds a
//! delivery slot for its whole timeout): one tenant may then hold at most
//! `tenant_cap` slots, leaving the rest for a newcomer ([`tenant_cap`]).
//!
//! The queue only decides; the caller wakes the waiters it names.

use std::collections::{HashMap, VecDeque};

/// Slots one tenant may hold at once out of `capacity`: all of them when
/// there can be no other tenant, else all but an eighth (at least one), so
/// that another namespace finds a free slot at once even while one
/// namespace holds its share for a long time.
pub fn tenant_cap(capacity: usize, single_tenant: bool) -> usize {
    if single_tenant || capacity < 2 {
        capacity
    } else {
        capacity - (capacity / 8).max(1)
    }
}

/// A waiter that was given a slot: the caller wakes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant<W> {
    pub tenant: String,
    pub waiter: W,
}

#[derive(Debug)]
struct Flow<W> {
    in_use: usize,
    /// When it last got a slot (a tick of [`FairQueue::clock`]; 0: never).
    served: u64,
    waiters: VecDeque<W>,
}

#[derive(Debug)]
struct Tenant<W> {
    in_use: usize,
    served: u64,
    /// Waiters over all its flows.
    waiting: usize,
    /// Only flows that hold a slot or wait for one (idle ones are dropped).
    flows: HashMap<String, Flow<W>>,
}

/// The slots and who waits for them.
#[derive(Debug)]
pub struct FairQueue<W> {
    capacity: usize,
    tenant_cap: usize,
    in_use: usize,
    /// Only tenants that hold a slot or wait for one (idle ones are dropped).
    tenants: HashMap<String, Tenant<W>>,
    clock: u64,
}

impl<W: PartialEq> FairQueue<W> {
    /// `capacity` slots (at least one), at most `tenant_cap` (at least one) per tenant.
    pub fn new(capacity: usize, tenant_cap: usize) -> Self {
        let capacity = capacity.max(1);
        FairQueue { capacity, tenant_cap: tenant_cap.clamp(1, capacity), in_use: 0, tenants: HashMap::new(), clock: 0 }
    }

    /// `waiter` of `tenant`'s `flow` asks for a slot; returns the waiters
    /// given one now (it, if a slot is free and its tenant is below its cap).
    pub fn request(&mut self, tenant: &str, flow: &str, waiter: W) -> Vec<Grant<W>> {
        let t = self.tenants.entry(tenant.to_string()).or_insert_with(|| Tenant { in_use: 0, served: 0, waiting: 0, flows: HashMap::new() });
        t.flows.entry(flow.to_string()).or_insert_with(|| Flow { in_use: 0, served: 0, waiters: VecDeque::new() }).waiters.push_back(waiter);
        t.waiting += 1;
        self.dispatch()
    }

    /// A slot of `tenant`'s `flow` is given back; returns the waiters given a slot now.
    pub fn release(&mut self, tenant: &str, flow: &str) -> Vec<Grant<W>> {
        let Some(t) = self.tenants.get_mut(tenant) else { return Vec::new() };
        let Some(f) = t.flows.get_mut(flow).filter(|f| f.in_use > 0) else { return Vec::new() };
        f.in_use -= 1;
        t.in_use -= 1;
        self.in_use -= 1;
        self.forget_if_idle(tenant, flow);
        self.dispatch()
    }

    /// `waiter` stops waiting. False if it was not waiting: it was given a
    /// slot already (which the caller must then [`release`](Self::release)).
    pub fn cancel(&mut self, tenant: &str, flow: &str, waiter: &W) -> bool {
        let Some(t) = self.tenants.get_mut(tenant) else { return false };
        let Some(f) = t.flows.get_mut(flow) else { return false };
        let Some(at) = f.waiters.iter().position(|w| w == waiter) else { return false };
        f.waiters.remove(at);
        t.waiting -= 1;
        self.forget_if_idle(tenant, flow);
        true
    }

    /// Slots held now, by everyone.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Slots `tenant` holds now.
    pub fn in_use_by(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.in_use)
    }

    /// Waiters of `tenant` now.
    pub fn waiting(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.waiting)
    }

    /// Gives free slots to waiters, fairest first, while there are both.
    fn dispatch(&mut self) -> Vec<Grant<W>> {
        let mut grants = Vec::new();
        while self.in_use < self.capacity {
            // Linear in the tenants holding or wanting slots: few, and bounded by capacity plus those waiting.
            let cap = self.tenant_cap;
            let next = self.tenants.iter().filter(|(_, t)| t.waiting > 0 && t.in_use < cap).min_by_key(|(name, t)| (t.in_use, t.served, *name)).map(|(name, _)| name.clone());
            let Some(name) = next else { break };
            self.clock += 1;
            let t = self.tenants.get_mut(&name).expect("chosen from the map");
            let flow = t.flows.iter().filter(|(_, f)| !f.waiters.is_empty()).min_by_key(|(name, f)| (f.in_use, f.served, *name)).map(|(name, _)| name.clone());
            let f = t.flows.get_mut(&flow.expect("a tenant with waiters has a flow with waiters")).expect("chosen from the map");
            let waiter = f.waiters.pop_front().expect("chosen for its waiters");
            f.in_use += 1;
            f.served = self.clock;
            t.in_use += 1;
            t.served = self.clock;
            t.waiting -= 1;
            self.in_use += 1;
            grants.push(Grant { tenant: name, waiter });
        }
        grants
    }

    /// Drops a flow, and its tenant, that neither hold nor want a slot: the
    /// maps stay as small as the work in progress, however many runs and
    /// namespaces come and go.
    fn forget_if_idle(&mut self, tenant: &str, flow: &str) {
        let Some(t) = self.tenants.get_mut(tenant) else { return };
        if t.flows.get(flow).is_some_and(|f| f.in_use == 0 && f.waiters.is_empty()) {
            t.flows.remove(flow);
        }
        if t.flows.is_empty() {
            self.tenants.remove(tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiters(grants: Vec<Grant<u32>>) -> Vec<u32> {
        grants.into_iter().map(|g| g.waiter).collect()
    }

    #[test]
    fn free_slots_are_given_at_once() {
        let mut q = FairQueue::new(2, 2);
        assert_eq!(waiters(q.request("a", "r", 1)), [1]);
        assert_eq!(waiters(q.request("a", "r", 2)), [2]);
        assert_eq!(waiters(q.request("a", "r", 3)), Vec::<u32>::new());
        assert_eq!((q.in_use(), q.in_use_by("a"), q.waiting("a")), (2, 2, 1));
        assert_eq!(waiters(q.release("a", "r")), [3]);
        assert_eq!((q.in_use(), q.waiting("a")), (2, 0));
    }

    #[test]
    fn a_namespace_with_one_waiter_gets_the_next_free_slot_however_many_another_queued() {
        let mut q = FairQueue::new(4, 4);
        for w in 0..1000 {
            q.request("big", "run", w);
        }
        assert_eq!(q.in_use_by("big"), 4);
        assert!(q.request("small", "run", 5000).is_empty());
        // A FIFO queue would serve the 996 waiters queued before it first.
        assert_eq!(waiters(q.release("big", "run")), [5000]);
        assert_eq!(waiters(q.release("big", "run")), [4]);
    }

    #[test]
    fn busy_namespaces_take_turns_and_their_shares_converge() {
        let mut q = FairQueue::new(6, 6);
        for w in 0..100 {
            q.request("a", "r", w);
        }
        for w in 100..200 {
            q.request("b", "r", w);
            q.request("c", "r", w + 100);
        }
        assert_eq!((q.in_use_by("a"), q.in_use_by("b"), q.in_use_by("c")), (6, 0, 0));
        // Every slot `a` gives back goes to whoever holds the fewest, in turn, until all hold two.
        let mut given = Vec::new();
        for _ in 0..4 {
            given.extend(q.release("a", "r").into_iter().map(|g| g.tenant));
        }
        assert_eq!(given, ["b", "c", "b", "c"]);
        assert_eq!((q.in_use_by("a"), q.in_use_by("b"), q.in_use_by("c")), (2, 2, 2));
        // A slot given back then returns to its holder, the one below the others.
        assert_eq!(q.release("c", "r")[0].tenant, "c");
    }

    #[test]
    fn among_equals_the_least_recently_served_goes_first() {
        let mut q = FairQueue::new(1, 1);
        q.request("a", "r", 0);
        for w in 1..10 {
            q.request("a", "r", w);
            q.request("b", "r", w + 10);
            q.request("c", "r", w + 20);
        }
        let mut order = vec!["a".to_string()];
        for _ in 0..6 {
            let holder = order.last().unwrap().clone();
            order.extend(q.release(&holder, "r").into_iter().map(|g| g.tenant));
        }
        assert_eq!(order, ["a", "b", "c", "a", "b", "c", "a"]);
    }

    #[test]
    fn within_a_namespace_runs_share_alike() {
        let mut q = FairQueue::new(2, 2);
        for w in 0..100 {
            q.request("a", "huge", w);
        }
        assert!(q.request("a", "small", 1000).is_empty());
        // The small run's one waiter goes before the huge run's 98.
        assert_eq!(waiters(q.release("a", "huge")), [1000]);
        assert_eq!(waiters(q.release("a", "small")), [2]);
    }

    #[test]
    fn one_namespace_holds_at_most_its_cap_and_the_rest_waits_for_others() {
        let mut q = FairQueue::new(8, tenant_cap(8, false));
        for w in 0..20 {
            q.request("a", "r", w);
        }
        assert_eq!((q.in_use(), q.in_use_by("a")), (7, 7));
        // The slot kept free is taken by another namespace at once, without a release.
        assert_eq!(waiters(q.request("b", "r", 100)), [100]);
        // A release by `a` goes back to `a` only while it is below its cap.
        assert_eq!(waiters(q.release("b", "r")), Vec::<u32>::new());
        assert_eq!(waiters(q.release("a", "r")), [7]);
    }

    #[test]
    fn the_cap_leaves_an_eighth_for_other_namespaces_unless_there_are_none() {
        assert_eq!(tenant_cap(256, false), 224);
        assert_eq!(tenant_cap(16, false), 14);
        assert_eq!(tenant_cap(4, false), 3);
        assert_eq!(tenant_cap(2, false), 1);
        assert_eq!(tenant_cap(1, false), 1);
        assert_eq!(tenant_cap(16, true), 16);
        // A cap above the capacity, or of zero, is clamped.
        let mut q = FairQueue::new(2, 5);
        assert_eq!(waiters(q.request("a", "r", 1)).len() + waiters(q.request("a", "r", 2)).len() + waiters(q.request("a", "r", 3)).len(), 2);
        let mut q = FairQueue::new(2, 0);
        assert_eq!(waiters(q.request("a", "r", 1)), [1]);
    }

    #[test]
    fn a_cancelled_waiter_leaves_the_queue_and_a_granted_one_must_give_its_slot_back() {
        let mut q = FairQueue::new(1, 1);
        assert_eq!(waiters(q.request("a", "r", 1)), [1]);
        q.request("b", "r", 2);
        q.request("b", "r", 3);
        assert!(q.cancel("b", "r", &2));
        assert!(!q.cancel("b", "r", &2), "not waiting any more");
        assert_eq!(q.waiting("b"), 1);
        assert_eq!(waiters(q.release("a", "r")), [3]);
        // 3 holds the slot: cancelling it says so, and the caller releases.
        assert!(!q.cancel("b", "r", &3));
        assert!(q.release("b", "r").is_empty());
        assert_eq!(q.in_use(), 0);
    }

    #[test]
    fn idle_namespaces_and_runs_are_forgotten_and_stray_releases_change_nothing() {
        let mut q = FairQueue::new(3, 3);
        for (i, run) in ["r1", "r2", "r3"].iter().enumerate() {
            q.request("a", run, i as u32);
        }
        for run in ["r1", "r2", "r3"] {
            q.release("a", run);
        }
        assert!(q.tenants.is_empty(), "{:?}", q.tenants);
        assert!(q.release("a", "r1").is_empty());
        assert!(q.release("nobody", "r").is_empty());
        assert_eq!(q.in_use(), 0);
        q.request("b", "r", 9);
        q.cancel("b", "r", &9);
        assert!(q.tenants.contains_key("b"), "9 holds a slot");
        q.release("b", "r");
        assert!(q.tenants.is_empty());
    }

    #[test]
    fn slots_are_never_over_given_whatever_the_order_of_calls() {
        // A deterministic shuffle of requests, releases and cancels over three namespaces.
        let mut q = FairQueue::new(5, tenant_cap(5, false));
        let mut held: Vec<(String, String)> = Vec::new();
        let mut waiting: Vec<(String, String, u32)> = Vec::new();
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for w in 0..5000u32 {
            let tenant = ["a", "b", "c"][next() % 3].to_string();
            let flow = ["x", "y"][next() % 2].to_string();
            let mut grants = match next() % 3 {
                0 => {
                    waiting.push((tenant.clone(), flow.clone(), w));
                    q.request(&tenant, &flow, w)
                }
                1 if !held.is_empty() => {
                    let (t, f) = held.swap_remove(next() % held.len());
                    q.release(&t, &f)
                }
                _ if !waiting.is_empty() => {
                    let (t, f, id) = waiting.swap_remove(next() % waiting.len());
                    assert!(q.cancel(&t, &f, &id), "{id} was waiting");
                    Vec::new()
                }
                _ => Vec::new(),
            };
            for g in grants.drain(..) {
                let at = waiting.iter().position(|(_, _, id)| *id == g.waiter).expect("only waiters are granted");
                let (t, f, _) = waiting.swap_remove(at);
                assert_eq!(t, g.tenant);
                held.push((t, f));
            }
            assert_eq!(q.in_use(), held.len());
            assert!(q.in_use() <= 5);
            for t in ["a", "b", "c"] {
                assert!(q.in_use_by(t) <= 4);
                assert_eq!(q.waiting(t), waiting.iter().filter(|(wt, _, _)| wt == t).count());
            }
            // Work-conserving up to the cap: a free slot and an eligible waiter never coexist.
            if q.in_use() < 5 {
                assert!(["a", "b", "c"].iter().all(|t| q.waiting(t) == 0 || q.in_use_by(t) == 4), "an eligible waiter left waiting");
            }
        }
    }
}
