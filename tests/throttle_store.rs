//! Throttle steps' durable state (issue 10) against the real local control
//! plane: many recipient runs asking at once, from one process or two, are
//! admitted exactly up to the limit; an admitted run asking again passes
//! without counting twice; ended windows are swept; a broken Throttle is
//! started afresh.

mod common;

use std::collections::BTreeSet;

use common::TestNamespace;
use herald::controller::throttle::{pass, sweep, ThrottleGate};
use herald::core::model::RecipientKey;
use herald::core::throttle::{ThrottleDecision, ThrottleGroup, ThrottleRequest, ThrottleWindow};
use herald::resources::Throttle;
use jiff::{SignedDuration, Timestamp};
use kube::api::{DynamicObject, PostParams};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use serde_json::json;
use uuid::Uuid;

fn request(key: &str, limit: u32) -> ThrottleRequest {
    ThrottleRequest {
        group: ThrottleGroup::new("deploy", "throttle_1", &RecipientKey::user("u1"), key),
        window: ThrottleWindow::For(SignedDuration::from_hours(1)),
        limit,
        recipient_run_id: Uuid::new_v4(),
    }
}

/// `count` requests for one gate, each with its own recipient run id.
fn runs(base: &ThrottleRequest, count: usize) -> Vec<ThrottleRequest> {
    (0..count).map(|_| ThrottleRequest { recipient_run_id: Uuid::new_v4(), ..base.clone() }).collect()
}

/// Runs every request at once on `gate` (None: the process-wide `pass`),
/// returning each request with its decision.
fn spawn_all(
    client: &Client,
    ns: &str,
    gate: Option<std::sync::Arc<ThrottleGate>>,
    requests: Vec<ThrottleRequest>,
    now: Timestamp,
) -> Vec<tokio::task::JoinHandle<(ThrottleRequest, ThrottleDecision)>> {
    requests
        .into_iter()
        .map(|req| {
            let (client, ns, gate) = (client.clone(), ns.to_string(), gate.clone());
            tokio::spawn(async move {
                let decision = match gate {
                    Some(gate) => gate.pass(&client, &ns, &req, now).await,
                    None => pass(&client, &ns, &req, now).await,
                };
                (req, decision.expect("pass"))
            })
        })
        .collect()
}

async fn join(handles: Vec<tokio::task::JoinHandle<(ThrottleRequest, ThrottleDecision)>>) -> Vec<(ThrottleRequest, ThrottleDecision)> {
    futures::future::join_all(handles).await.into_iter().map(|r| r.expect("task")).collect()
}

fn admitted_ids(results: &[(ThrottleRequest, ThrottleDecision)]) -> BTreeSet<String> {
    results.iter().filter(|(_, d)| *d == ThrottleDecision::Admitted).map(|(r, _)| r.recipient_run_id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_at_once_admit_exactly_the_limit_and_repeats_do_not_count() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let base = request("alert-42", 3);
    let now = Timestamp::now();
    let results = join(spawn_all(&client, &ns.name, None, runs(&base, 50), now)).await;

    let admitted = admitted_ids(&results);
    assert_eq!(admitted.len(), 3, "{results:?}");
    let window_end = now + SignedDuration::from_hours(1);
    let throttled = results.iter().filter(|(_, d)| *d == ThrottleDecision::Throttled { window_end }).count();
    assert_eq!(throttled, 47, "{results:?}");

    let stored = ns.api::<Throttle>().get(&base.group.name()).await.expect("the Throttle");
    assert_eq!(stored.spec.state.admitted.iter().cloned().collect::<BTreeSet<_>>(), admitted);
    assert_eq!((stored.spec.admitted_count, stored.spec.limit), (3, 3));
    assert_eq!((stored.spec.state.window_start, stored.spec.state.window_end), (now, window_end));
    assert_eq!(stored.spec.group(), base.group);
    assert_eq!(stored.metadata.labels.as_ref(), Some(&base.group.labels()));

    // An admitted run asking again (after a restart, later on) passes, and nothing is written.
    let (again, _) = results.iter().find(|(_, d)| *d == ThrottleDecision::Admitted).unwrap();
    assert_eq!(pass(&client, &ns.name, again, now + SignedDuration::from_mins(5)).await.unwrap(), ThrottleDecision::Admitted);
    let (refused, _) = results.iter().find(|(_, d)| *d != ThrottleDecision::Admitted).unwrap();
    assert_eq!(pass(&client, &ns.name, refused, now + SignedDuration::from_mins(5)).await.unwrap(), ThrottleDecision::Throttled { window_end });
    let after = ns.api::<Throttle>().get(&base.group.name()).await.unwrap();
    assert_eq!(after.metadata.resource_version, stored.metadata.resource_version, "no write for a repeat or a throttled run");

    // Another key is another gate.
    let other = request("alert-43", 3);
    assert_eq!(pass(&client, &ns.name, &other, now).await.unwrap(), ThrottleDecision::Admitted);

    // Once the window has ended, the next run opens a new one.
    let later = window_end + SignedDuration::from_secs(1);
    let next = ThrottleRequest { recipient_run_id: Uuid::new_v4(), ..base.clone() };
    assert_eq!(pass(&client, &ns.name, &next, later).await.unwrap(), ThrottleDecision::Admitted);
    let renewed = ns.api::<Throttle>().get(&base.group.name()).await.unwrap();
    assert_eq!(renewed.spec.state.admitted, vec![next.recipient_run_id.to_string()]);
    assert_eq!(renewed.spec.state.window_start, later);

    // An invalid request is an error naming the problem, not a decision.
    let invalid = ThrottleRequest { window: ThrottleWindow::For(SignedDuration::from_hours(24 * 32)), ..request("alert-44", 1) };
    let error = pass(&client, &ns.name, &invalid, now).await.unwrap_err();
    assert!(matches!(error, herald::controller::Error::Throttle(_)) && error.to_string().contains("31 days"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_racing_stay_exact() {
    // Conflicts are logged at debug: shown when the test fails.
    let _ = tracing_subscriber::fmt().with_env_filter("herald=debug").with_test_writer().try_init();
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    // A second process: its own client (own connections) and its own in-process turns.
    let other_client = common::client_from(&common::kubeconfig()).await;
    let (first, second) = (std::sync::Arc::new(ThrottleGate::new()), std::sync::Arc::new(ThrottleGate::new()));
    let base = request("", 5);
    let now = Timestamp::now();
    let all = runs(&base, 50);
    let mut handles = spawn_all(&client, &ns.name, Some(first.clone()), all[..25].to_vec(), now);
    handles.extend(spawn_all(&other_client, &ns.name, Some(second.clone()), all[25..].to_vec(), now));
    let results = join(handles).await;

    let admitted = admitted_ids(&results);
    assert_eq!(admitted.len(), 5, "{results:?}");
    let stored = ns.api::<Throttle>().get(&base.group.name()).await.unwrap();
    assert_eq!(stored.spec.state.admitted.len(), 5);
    assert_eq!(stored.spec.state.admitted.iter().cloned().collect::<BTreeSet<_>>(), admitted);
    // Both processes' turn-taking entries are gone once nobody uses them.
    assert_eq!((first.entries(), second.entries()), (0, 0));

    // Ten processes of five calls each: conditional writes alone keep it exact.
    let base = request("ten", 5);
    let all = runs(&base, 50);
    let mut handles = Vec::new();
    for (i, chunk) in all.chunks(5).enumerate() {
        let client = if i % 2 == 0 { &client } else { &other_client };
        handles.extend(spawn_all(client, &ns.name, Some(std::sync::Arc::new(ThrottleGate::new())), chunk.to_vec(), now));
    }
    let results = join(handles).await;
    let admitted = admitted_ids(&results);
    assert_eq!(admitted.len(), 5, "{results:?}");
    let stored = ns.api::<Throttle>().get(&base.group.name()).await.unwrap();
    assert_eq!(stored.spec.state.admitted.iter().cloned().collect::<BTreeSet<_>>(), admitted);
}

#[tokio::test]
async fn sweep_deletes_ended_windows_and_a_broken_throttle_starts_afresh() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let now = Timestamp::now();
    // One window that ended an hour ago, one still open.
    let ended = request("old", 1);
    assert_eq!(pass(&client, &ns.name, &ended, now - SignedDuration::from_hours(2)).await.unwrap(), ThrottleDecision::Admitted);
    let open = request("new", 1);
    assert_eq!(pass(&client, &ns.name, &open, now).await.unwrap(), ThrottleDecision::Admitted);

    assert_eq!(sweep(&client, Some(&ns.name), now).await.unwrap(), 1);
    let api = ns.api::<Throttle>();
    assert!(api.get_opt(&ended.group.name()).await.unwrap().is_none());
    assert!(api.get_opt(&open.group.name()).await.unwrap().is_some());
    assert_eq!(sweep(&client, Some(&ns.name), now).await.unwrap(), 0);

    // A Throttle the schema takes but herald cannot read (a windowEnd whose offset is out of range):
    // the next run overwrites it with a fresh window instead of failing forever.
    let broken = request("broken", 1);
    let resource = ApiResource::erase::<Throttle>(&());
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &resource);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "Throttle", "metadata": {"name": broken.group.name()},
        "spec": {"workflow": "deploy", "stepRef": "throttle_1", "recipient": "user:u1", "key": "broken", "limit": 1,
                 "state": {"windowStart": "2024-05-01T10:00:00Z", "windowEnd": "2024-05-01T11:00:00+99:00", "admitted": ["someone"]}}
    }))
    .unwrap();
    dynamic.create(&PostParams::default(), &object).await.expect("creating a broken Throttle");
    assert!(matches!(api.get(&broken.group.name()).await, Err(kube::Error::SerdeError(_))), "herald's type refuses it");
    assert_eq!(pass(&client, &ns.name, &broken, now).await.unwrap(), ThrottleDecision::Admitted);
    let fixed = api.get(&broken.group.name()).await.expect("the Throttle, readable again");
    assert_eq!(fixed.spec.state.admitted, vec![broken.recipient_run_id.to_string()]);
    assert_eq!(fixed.spec.state.window_end, now + SignedDuration::from_hours(1));
    // And a broken one is swept like an ended one.
    dynamic.create(&PostParams::default(), &DynamicObject { metadata: kube::api::ObjectMeta { name: Some("thr-broken".into()), ..Default::default() }, ..object }).await.unwrap();
    assert_eq!(sweep(&client, Some(&ns.name), now).await.unwrap(), 1);
    assert!(dynamic.get_opt("thr-broken").await.unwrap().is_none());
}
