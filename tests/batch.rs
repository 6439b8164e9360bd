//! Batch and throttle steps under faults and concurrency, with the real
//! `herald` binary: a batch of 200 triggers survives the operator's SIGKILL
//! while its window is open and is delivered once; a throttle stays exact
//! when triggers come through two API replicas at once.

mod api_support;
mod common;
mod receivers;

use std::time::Duration;

use common::{create, wait_for, HeraldProcess, TestNamespace};
use herald::core::status::{RecipientState, RecipientStatus};
use herald::resources::{Batch, Channel, TriggerRun, User, Workflow};
use kube::api::{ListParams, PostParams};
use kube::ResourceExt;
use receivers::HttpReceiver;
use serde_json::{json, Value};

/// Short leases: the next process takes over a few seconds after a SIGKILL.
const LEASE: &[&str] = &["--leader-election-lease-seconds", "4"];

async fn setup(ns: &TestNamespace, receiver: &HttpReceiver, workflow: &str, steps: Value) {
    create::<Channel>(
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/default")}}),
    )
    .await;
    create::<User>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "ann"}, "spec": {"id": "ann"}})).await;
    create::<Workflow>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": workflow}, "spec": {"key": workflow, "steps": steps}})).await;
}

/// Every run's only recipient, once all `count` runs in the namespace have finished.
async fn all_finished(ns: &TestNamespace, count: usize, timeout: Duration) -> Vec<RecipientStatus> {
    let api = ns.api::<TriggerRun>();
    wait_for(&format!("{count} runs to finish"), timeout, || async {
        let runs = api.list(&ListParams::default()).await.ok()?.items;
        let done: Vec<RecipientStatus> = runs.iter().filter_map(|r| r.status.as_ref().filter(|s| s.state.is_finished())).filter_map(|s| s.recipients.first().cloned()).collect();
        (runs.len() == count && done.len() == count).then_some(done)
    })
    .await
}

fn bodies(receiver: &HttpReceiver, path: &str) -> Vec<String> {
    receiver.received_at(path).iter().map(|r| String::from_utf8_lossy(&r.body).to_string()).collect()
}

#[tokio::test]
async fn a_batch_of_200_is_delivered_once_even_when_the_operator_is_killed_mid_window() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let steps = json!([
        {"ref": "digest", "type": "batch", "batch": {"window": "20s", "key": "{{ data.project }}"}},
        {"ref": "send", "type": "channel", "channel": "hooks", "template": {"url": receiver.url("/digest"), "body": "{{ total_activities }} by {{ total_actors }}"}}
    ]);
    setup(&ns, &receiver, "comments", steps).await;
    let mut first = HeraldProcess::start(&ns.name, LEASE);
    // 200 triggers within a few seconds, all for one batch key.
    let api = ns.api::<TriggerRun>();
    futures::future::join_all((0..200).map(|n| {
        let api = api.clone();
        async move {
            let run: TriggerRun = serde_json::from_value(json!({
                "apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": format!("c-{n}")},
                "spec": {"workflow": "comments", "recipients": ["ann"], "actor": if n % 4 == 0 { "ann" } else { "bob" }, "data": {"project": "one", "n": n}}
            }))
            .unwrap();
            api.create(&PostParams::default(), &run).await.expect("creating a run");
        }
    }))
    .await;
    // Kill the operator while the window is open and the batch is filling.
    let batches = ns.api::<Batch>();
    wait_for("the batch to gather activities", Duration::from_secs(30), || async {
        let listed = batches.list(&ListParams::default()).await.ok()?.items;
        listed.iter().any(|b| b.spec.state.total_activities >= 50 && !b.spec.state.closed).then_some(())
    })
    .await;
    first.kill9();
    let _second = HeraldProcess::start(&ns.name, LEASE);
    let records = all_finished(&ns, 200, Duration::from_secs(120)).await;
    let carried = records.iter().filter(|r| r.state == RecipientState::Completed).count();
    let batched = records.iter().filter(|r| r.state == RecipientState::Batched).count();
    assert_eq!((carried, batched), (1, 199), "{:?}", records.iter().filter(|r| !matches!(r.state, RecipientState::Completed | RecipientState::Batched)).collect::<Vec<_>>());
    assert_eq!(bodies(&receiver, "/digest"), ["200 by 2"]);
}

#[tokio::test]
async fn a_throttle_is_exact_when_triggers_come_through_two_api_replicas() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let steps = json!([
        {"ref": "limit", "type": "throttle", "throttle": {"window": "1h", "limit": 3, "key": "{{ data.alert_id }}"}},
        {"ref": "page", "type": "channel", "channel": "hooks", "template": {"url": receiver.url("/page"), "body": "{{ data.n }}"}}
    ]);
    setup(&ns, &receiver, "page", steps).await;
    let key = api_support::new_key();
    api_support::create_key(&client, &ns.name, "herald-api-key", &key).await;
    let replicas = [HeraldProcess::start(&ns.name, LEASE), HeraldProcess::start(&ns.name, LEASE)];
    let http = reqwest::Client::new();
    let post = |addr: String, n: usize| {
        let http = http.clone();
        let key = key.clone();
        async move {
            let url = format!("http://{addr}/v1/workflows/page/trigger");
            let body = json!({"recipients": ["ann"], "data": {"alert_id": "disk", "n": n}});
            // The key is read from a watch: a 401 means the replica has not seen it yet.
            wait_for("a trigger to be accepted", Duration::from_secs(30), || async {
                let answer = http.post(&url).bearer_auth(&key).header("content-type", "application/json").body(body.to_string()).send().await.ok()?;
                answer.status().is_success().then_some(())
            })
            .await;
        }
    };
    futures::future::join_all((0..50).map(|n| post(replicas[n % 2].addr.clone(), n))).await;
    let records = all_finished(&ns, 50, Duration::from_secs(120)).await;
    let passed = records.iter().filter(|r| r.state == RecipientState::Completed).count();
    let throttled = records.iter().filter(|r| r.state == RecipientState::Throttled).count();
    assert_eq!((passed, throttled), (3, 47));
    assert_eq!(bodies(&receiver, "/page").len(), 3);
    let runs = ns.api::<TriggerRun>().list(&ListParams::default()).await.unwrap().items;
    assert_eq!(runs.len(), 50, "{:?}", runs.iter().map(|r| r.name_any()).collect::<Vec<_>>());
}
