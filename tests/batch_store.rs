//! The batch store against a real apiserver: concurrent visitors land exactly
//! once (in one process and across two), carriers find their batch again,
//! windows move and close, abandoned batches are swept. Time is injected
//! (`now`), never waited for.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::TestNamespace;
use herald::controller::batch::{self, BatchStore};
use herald::core::batch::{Activity, BatchDecision, BatchGroup, BatchSettings, BatchState, BatchSummary, BatchWindow, Visit};
use herald::resources::Batch;
use jiff::Timestamp;
use kube::api::{DynamicObject, ListParams, PostParams};
use kube::discovery::ApiResource;
use kube::{Api, Resource};
use serde_json::json;

fn group(key: &str) -> BatchGroup {
    BatchGroup::new("new-comment", "digest", "u1", key)
}

fn at(t0: Timestamp, secs: i64) -> Timestamp {
    t0.checked_add(jiff::SignedDuration::from_secs(secs)).unwrap()
}

fn arrival(key: &str, n: usize, settings: BatchSettings) -> Visit {
    let mut data = serde_json::Map::new();
    data.insert("n".into(), json!(n));
    Visit {
        group: group(key),
        settings,
        activity: Activity {
            recipient_run_id: format!("00000000-0000-4000-8000-{n:012}"),
            workflow_run_id: format!("10000000-0000-4000-8000-{n:012}"),
            trigger_run: format!("run-{n}"),
            actor_id: Some(format!("actor-{}", n % 7)),
            actor: Some(json!({"id": format!("actor-{}", n % 7)})),
            data: Some(data),
            ..Activity::default()
        },
        cancelled_keys: BTreeSet::new(),
        carrying: false,
    }
}

fn carrying(mut v: Visit) -> Visit {
    v.carrying = true;
    v
}

fn fixed(secs: u64) -> BatchSettings {
    BatchSettings { window: BatchWindow::Fixed(Duration::from_secs(secs)), ..BatchSettings::default() }
}

async fn stored(ns: &TestNamespace, g: &BatchGroup) -> BatchState {
    ns.api::<Batch>().get(&g.name()).await.expect("the group's Batch").spec.state
}

fn closed(d: BatchDecision) -> BatchSummary {
    match d {
        BatchDecision::Closed(s) => s,
        other => panic!("expected Closed, got {other:?}"),
    }
}

fn ids(s: &BatchSummary) -> Vec<String> {
    s.activities.iter().map(|a| a["id"].as_str().unwrap().to_string()).collect()
}

/// Runs `visits` concurrently, each through its store; the decisions in input order.
async fn concurrently(ns: &str, visits: Vec<(BatchStore, Visit)>, now: Timestamp) -> Vec<BatchDecision> {
    let tasks: Vec<_> = visits
        .into_iter()
        .map(|(store, v)| {
            let ns = ns.to_string();
            tokio::spawn(async move { store.visit(&ns, &v, now).await })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap().expect("visit"));
    }
    out
}

fn count(decisions: &[BatchDecision]) -> (usize, usize) {
    let opened = decisions.iter().filter(|d| matches!(d, BatchDecision::Open { .. })).count();
    let joined = decisions.iter().filter(|d| matches!(d, BatchDecision::Joined { .. })).count();
    (opened, joined)
}

fn assert_each_once(state: &BatchState, n: usize) {
    assert_eq!(state.total_activities as usize, n);
    assert_eq!(state.activities.len(), n);
    let unique: HashSet<&str> = state.activities.iter().map(|a| a.recipient_run_id.as_str()).collect();
    assert_eq!(unique.len(), n, "a run was added twice");
}

#[tokio::test]
async fn two_hundred_concurrent_visitors_land_exactly_once() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let t0 = Timestamp::now();
    let s = fixed(60);
    let g = group("p1");

    let visits = (0..200).map(|n| (BatchStore::shared(client.clone()), arrival("p1", n, s))).collect();
    let decisions = concurrently(&ns.name, visits, t0).await;
    assert_eq!(count(&decisions), (1, 199), "one opener, everyone else joined");
    let opener = decisions.iter().position(|d| matches!(d, BatchDecision::Open { .. })).unwrap();
    assert_eq!(decisions[opener], BatchDecision::Open { closes_at: at(t0, 60) });
    let carrier = format!("run-{opener}");
    for d in &decisions {
        if let BatchDecision::Joined { carrier_run, wake_carrier, .. } = d {
            assert_eq!((carrier_run, *wake_carrier), (&carrier, false));
        }
    }
    let state = stored(&ns, &g).await;
    assert_each_once(&state, 200);
    assert_eq!(state.activities[0].trigger_run, carrier, "the carrier's activity is the first");
    // Visits queued while a round writes are decided and written together by the next one.
    let writes = ns.api::<Batch>().get(&g.name()).await.unwrap().metadata.generation.unwrap_or_default();
    assert!(writes < 50, "200 visits in one process took {writes} writes of their Batch");
    eprintln!("200 concurrent visits: {writes} writes of their Batch");

    // A joiner asking again (its status write lost) is not counted twice.
    let again = batch::visit(&client, &ns.name, &arrival("p1", (opener + 1) % 200, s), at(t0, 1)).await.unwrap();
    assert!(matches!(again, BatchDecision::Joined { .. }), "{again:?}");
    assert_each_once(&stored(&ns, &g).await, 200);

    // The carrier early waits; at the close it gets the batch: all 200, the first renderLimit oldest first.
    let early = batch::visit(&client, &ns.name, &carrying(arrival("p1", opener, s)), at(t0, 30)).await.unwrap();
    assert_eq!(early, BatchDecision::Wait { closes_at: at(t0, 60) });
    let summary = closed(batch::visit(&client, &ns.name, &carrying(arrival("p1", opener, s)), at(t0, 60)).await.unwrap());
    assert_eq!((summary.total_activities, summary.total_actors, summary.activities.len(), summary.actors.len()), (200, 7, 10, 7));
    let first_ten: Vec<String> = state.activities[..10].iter().map(|a| a.recipient_run_id.clone()).collect();
    assert_eq!(ids(&summary), first_ten);
    assert!(stored(&ns, &g).await.closed, "the close is recorded");

    // A carrier restarting after the close gets the same summary.
    let restarted = closed(batch::visit(&client, &ns.name, &carrying(arrival("p1", opener, s)), at(t0, 90)).await.unwrap());
    assert_eq!(restarted, summary);

    // A visit after the close opens a new batch; the old carrier still finds its own (archived).
    let next = batch::visit(&client, &ns.name, &arrival("p1", 500, s), at(t0, 61)).await.unwrap();
    assert_eq!(next, BatchDecision::Open { closes_at: at(t0, 121) });
    assert_eq!(stored(&ns, &g).await.id, arrival("p1", 500, s).activity.recipient_run_id);
    let from_archive = closed(batch::visit(&client, &ns.name, &carrying(arrival("p1", opener, s)), at(t0, 62)).await.unwrap());
    assert_eq!(from_archive, summary);
    // A joiner of the old batch asking again now is still not added to the new one.
    let late = batch::visit(&client, &ns.name, &arrival("p1", (opener + 2) % 200, s), at(t0, 63)).await.unwrap();
    assert!(matches!(&late, BatchDecision::Joined { carrier_run, .. } if carrier_run == &carrier), "{late:?}");
    assert_eq!(stored(&ns, &g).await.total_activities, 1);

    // The carrier done, its archive goes; the new batch stays.
    batch::finish(&client, &ns.name, &g, &arrival("p1", opener, s).activity.recipient_run_id).await.unwrap();
    batch::finish(&client, &ns.name, &g, &arrival("p1", opener, s).activity.recipient_run_id).await.unwrap();
    let names: Vec<String> = ns.api::<Batch>().list(&ListParams::default()).await.unwrap().items.iter().map(|b| b.meta().name.clone().unwrap()).collect();
    assert_eq!(names, [g.name()]);
    // Finishing an open batch does nothing; finishing it once closed deletes it.
    let new_carrier = arrival("p1", 500, s).activity.recipient_run_id;
    batch::finish(&client, &ns.name, &g, &new_carrier).await.unwrap();
    assert!(ns.api::<Batch>().get_opt(&g.name()).await.unwrap().is_some());
    closed(batch::visit(&client, &ns.name, &carrying(arrival("p1", 500, s)), at(t0, 121)).await.unwrap());
    batch::finish(&client, &ns.name, &g, &new_carrier).await.unwrap();
    assert!(ns.api::<Batch>().get_opt(&g.name()).await.unwrap().is_none());
}

#[tokio::test]
async fn two_clients_racing_stay_exact() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    // Two clients with their own lock tables: two replicas.
    let a = BatchStore::new(common::client().await);
    let b = BatchStore::new(common::client().await);
    let t0 = Timestamp::now();
    let s = fixed(60);
    let visits = (0..120).map(|n| (if n % 2 == 0 { a.clone() } else { b.clone() }, arrival("race", n, s))).collect();
    let decisions = concurrently(&ns.name, visits, t0).await;
    assert_eq!(count(&decisions), (1, 119));
    assert_each_once(&stored(&ns, &group("race")).await, 120);
    // Racing into a closed batch: exactly one opens the next one.
    let visits = (1000..1040).map(|n| (if n % 2 == 0 { a.clone() } else { b.clone() }, arrival("race", n, s))).collect();
    let decisions = concurrently(&ns.name, visits, at(t0, 61)).await;
    assert_eq!(count(&decisions), (1, 39));
    assert_each_once(&stored(&ns, &group("race")).await, 40);
}

#[tokio::test]
async fn sliding_windows_move_and_cap_and_full_batches_close_early() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let t0 = Timestamp::now();
    let sliding = BatchSettings { window: BatchWindow::Sliding { window: Duration::from_secs(30), max: Duration::from_secs(60) }, ..BatchSettings::default() };
    let visit = |n: usize, secs: i64| {
        let client = client.clone();
        let ns = ns.name.clone();
        async move { batch::visit(&client, &ns, &arrival("slide", n, sliding), at(t0, secs)).await.unwrap() }
    };
    assert_eq!(visit(0, 0).await, BatchDecision::Open { closes_at: at(t0, 30) });
    visit(1, 25).await;
    assert_eq!(stored(&ns, &group("slide")).await.closes_at(), at(t0, 55));
    let early = batch::visit(&client, &ns.name, &carrying(arrival("slide", 0, sliding)), at(t0, 30)).await.unwrap();
    assert_eq!(early, BatchDecision::Wait { closes_at: at(t0, 55) });
    visit(2, 50).await;
    assert_eq!(stored(&ns, &group("slide")).await.closes_at(), at(t0, 60), "capped at open + maxWindow");
    assert_eq!(visit(3, 61).await, BatchDecision::Open { closes_at: at(t0, 91) }, "past the cap: a new batch");
    assert_eq!(closed(batch::visit(&client, &ns.name, &carrying(arrival("slide", 0, sliding)), at(t0, 62)).await.unwrap()).total_activities, 3);

    let full = BatchSettings { max_activities: 3, ..fixed(600) };
    let visit = |n: usize| {
        let client = client.clone();
        let ns = ns.name.clone();
        async move { batch::visit(&client, &ns, &arrival("full", n, full), at(t0, n as i64)).await.unwrap() }
    };
    assert!(matches!(visit(0).await, BatchDecision::Open { .. }));
    assert!(matches!(visit(1).await, BatchDecision::Joined { wake_carrier: false, .. }));
    assert!(matches!(visit(2).await, BatchDecision::Joined { wake_carrier: true, .. }));
    let summary = closed(batch::visit(&client, &ns.name, &carrying(arrival("full", 0, full)), at(t0, 3)).await.unwrap());
    assert_eq!(summary.total_activities, 3);
    assert!(matches!(visit(4).await, BatchDecision::Open { .. }), "the next arrival opens a new batch");
}

#[tokio::test]
async fn flush_leading_and_cancellation() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let t0 = Timestamp::now();
    let s = BatchSettings { flush_leading: true, ..fixed(30) };
    let v = |n: usize| arrival("lead", n, s);
    assert_eq!(batch::visit(&client, &ns.name, &v(0), t0).await.unwrap(), BatchDecision::FlushLeading);
    assert_eq!(batch::visit(&client, &ns.name, &v(0), at(t0, 1)).await.unwrap(), BatchDecision::FlushLeading, "asking again changes nothing");
    assert_eq!(batch::visit(&client, &ns.name, &v(1), at(t0, 2)).await.unwrap(), BatchDecision::Open { closes_at: at(t0, 30) });
    let mut third = v(2);
    third.activity.cancellation_key = Some("cancel-me".into());
    assert!(matches!(batch::visit(&client, &ns.name, &third, at(t0, 3)).await.unwrap(), BatchDecision::Joined { .. }));
    let mut carrier = carrying(v(1));
    carrier.cancelled_keys = BTreeSet::from(["cancel-me".to_string()]);
    assert_eq!(batch::visit(&client, &ns.name, &carrier, at(t0, 10)).await.unwrap(), BatchDecision::Wait { closes_at: at(t0, 30) }, "cancelling never closes the window");
    let summary = closed(batch::visit(&client, &ns.name, &carrier, at(t0, 30)).await.unwrap());
    assert_eq!((ids(&summary), summary.total_activities), (vec![v(1).activity.recipient_run_id], 1));

    // A flush-leading batch nobody carried is swept once its window ends; open ones are kept.
    let g = group("lonely");
    assert_eq!(batch::visit(&client, &ns.name, &arrival("lonely", 9, s), t0).await.unwrap(), BatchDecision::FlushLeading);
    assert_eq!(batch::sweep(&client, Some(&ns.name), at(t0, 29)).await.unwrap(), 0);
    assert_eq!(batch::sweep(&client, Some(&ns.name), at(t0, 30)).await.unwrap(), 1);
    assert!(ns.api::<Batch>().get_opt(&g.name()).await.unwrap().is_none());
    // A closed batch whose carrier never finished goes after a day.
    let day = 24 * 3600;
    assert_eq!(batch::sweep(&client, Some(&ns.name), at(t0, 30 + day - 1)).await.unwrap(), 0);
    assert_eq!(batch::sweep(&client, Some(&ns.name), at(t0, 30 + day)).await.unwrap(), 1);
    assert!(ns.api::<Batch>().list(&ListParams::default()).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn a_batch_herald_cannot_read_does_not_wedge_its_group() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let g = group("broken");
    let ar = ApiResource::erase::<Batch>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &ar);
    // Valid for the CRD's schema, not for herald's types (the count does not fit an i32).
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "Batch", "metadata": {"name": g.name()},
        "spec": {"group": g, "state": {"id": "x", "openedAt": "2020-01-01T00:00:00Z", "closesAt": "2999-01-01T00:00:00Z",
                 "settings": {"windowType": "fixed", "maxActivities": 10, "renderLimit": 10}, "totalActivities": 99_999_999_999_i64}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &bad).await.expect("the apiserver takes it");
    assert!(ns.api::<Batch>().get(&g.name()).await.is_err(), "herald's types refuse it");
    let t0 = Timestamp::now();
    let d = batch::visit(&client, &ns.name, &arrival("broken", 0, fixed(30)), t0).await.unwrap();
    assert_eq!(d, BatchDecision::Open { closes_at: at(t0, 30) });
    assert_each_once(&stored(&ns, &g).await, 1);
}
