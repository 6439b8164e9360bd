//! Several replicas: only the Lease holder reconciles; killing it with
//! SIGKILL hands over within the lease duration, and the run in progress
//! completes with no recipient lost.

mod common;
mod receivers;

use std::time::{Duration, Instant};

use common::{wait_for, HeraldProcess, TestNamespace};
use herald::core::status::{RecipientState, RunState};
use herald::resources::{RecipientPage, TriggerRun};
use kube::ResourceExt;
use serde_json::json;

const LEASE_SECONDS: u64 = 4;

use common::create;

/// Triggers `workflow` for an Object with 300 subscribing Users: 301 recipients.
async fn fan_out(ns: &TestNamespace, workflow: &str) -> TriggerRun {
    let subscribers: Vec<_> = (0..300).map(|i| json!({"recipient": format!("u{i}")})).collect();
    for i in 0..300 {
        create::<herald::resources::User>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": format!("u{i}")}, "spec": {"id": format!("u{i}")}}))
            .await;
    }
    create::<herald::resources::Object>(
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Object", "metadata": {"name": "all"}, "spec": {"collection": "g", "id": "all", "subscribers": subscribers}}),
    )
    .await;
    create(
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "run-"},
        "spec": {"workflow": workflow, "recipients": [{"id": "all", "collection": "g"}]}}),
    )
    .await
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_killed_leader_hands_over() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let lease = LEASE_SECONDS.to_string();
    let args = ["--leader-election-lease-seconds", lease.as_str()];

    let mut first = HeraldProcess::start(&ns.name, &args);
    wait_for("the first replica to lead", Duration::from_secs(30), || async { (first.metric("herald_leader").await == 1.0).then_some(()) }).await;
    let second = HeraldProcess::start(&ns.name, &args);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(second.metric("herald_leader").await, 0.0, "two leaders");

    create::<herald::resources::Channel>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": "http://127.0.0.1:9/"}}),
    )
    .await;
    create::<herald::resources::Workflow>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "slow"}, "spec": {"steps": [
            {"ref": "wait", "type": "delay", "delay": {"duration": "3s"}},
            {"ref": "done", "type": "delay", "delay": {"duration": "1s"}}
        ]}}),
    )
    .await;
    let run = fan_out(&ns, "slow").await;

    let runs = ns.api::<TriggerRun>();
    wait_for("the run to be waiting on its delay", Duration::from_secs(30), || async {
        let r = runs.get(&run.name_any()).await.ok()?;
        (r.status?.totals?.waiting == 301).then_some(())
    })
    .await;
    assert!(first.metric("herald_reconciles_total").await > 0.0);
    assert_eq!(second.metric("herald_reconciles_total").await, 0.0, "a follower reconciled");

    let killed = Instant::now();
    first.kill9();
    wait_for("the second replica to take over", Duration::from_secs(LEASE_SECONDS * 3 + 10), || async { (second.metric("herald_leader").await == 1.0).then_some(()) }).await;
    let handover = killed.elapsed();
    let done = wait_for("the run to finish under the new leader", Duration::from_secs(60), || async {
        let r = runs.get(&run.name_any()).await.ok()?;
        r.status.as_ref().filter(|s| s.state.is_finished())?;
        Some(r)
    })
    .await;
    let status = done.status.unwrap();
    assert_eq!(status.state, RunState::Completed);
    let pages = ns.api::<RecipientPage>();
    let mut recipients = Vec::new();
    for page in &status.pages {
        recipients.extend(pages.get(page).await.unwrap().status.unwrap().recipients);
    }
    assert_eq!(recipients.len(), 301);
    assert!(recipients.iter().all(|r| r.state == RecipientState::Completed && r.steps.len() == 2), "every recipient went through both steps once");
    assert!(second.metric("herald_reconciles_total").await > 0.0);
    // Structured logs carry the workflow run id (the run's uid) in their span.
    let uid = run.uid().unwrap();
    let accepted: Vec<serde_json::Value> =
        first.logs.lock().unwrap().iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|v| v["message"] == "run accepted").collect();
    assert_eq!(accepted.len(), 1, "one acceptance logged");
    assert_eq!(accepted[0]["span"]["workflow_run_id"], uid.as_str(), "{}", accepted[0]);
    assert_eq!(accepted[0]["recipients"], 301);
    println!("handover after SIGKILL took {:.1}s (lease {LEASE_SECONDS}s)", handover.as_secs_f64());
    assert!(handover < Duration::from_secs(LEASE_SECONDS * 2 + 2), "handover took {handover:?}");
}

/// Sends a signal to a herald process.
fn signal(herald: &HeraldProcess, sig: &str) {
    let sent = std::process::Command::new("kill").args([sig, &herald.child.id().to_string()]).status().expect("running kill");
    assert!(sent.success(), "kill {sig} failed");
}

#[tokio::test]
async fn a_paused_leader_is_fenced_and_its_late_writes_lose() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let lease = LEASE_SECONDS.to_string();
    let args = ["--leader-election-lease-seconds", lease.as_str(), "--run-concurrency", "4"];
    let receiver = receivers::HttpReceiver::start().await;
    receiver.slow("/", Duration::from_millis(100));
    let first = HeraldProcess::start(&ns.name, &args);
    wait_for("the first replica to lead", Duration::from_secs(30), || async { (first.metric("herald_leader").await == 1.0).then_some(()) }).await;
    let second = HeraldProcess::start(&ns.name, &args);

    create::<herald::resources::Channel>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/")}}),
    )
    .await;
    create::<herald::resources::Workflow>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "fanout"}, "spec": {"steps": [
            {"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{{ recipient.id }}"}}
        ]}}),
    )
    .await;
    let run = fan_out(&ns, "fanout").await;

    // Mid fan-out (300 recipients, 4 at a time, 100 ms each: about 8 s), pause the leader past its lease.
    wait_for("the fan-out to be under way", Duration::from_secs(30), || async { (receiver.arrived() >= 40).then_some(()) }).await;
    signal(&first, "-STOP");
    let paused_at = receiver.arrived();
    wait_for("the second replica to take over", Duration::from_secs(LEASE_SECONDS * 4 + 10), || async { (second.metric("herald_leader").await == 1.0).then_some(()) }).await;
    wait_for("the new leader to deliver", Duration::from_secs(30), || async { (receiver.arrived() >= paused_at + 20).then_some(()) }).await;
    signal(&first, "-CONT");
    let resumed_deliveries = first.metric("herald_deliveries_total").await;

    let runs = ns.api::<TriggerRun>();
    let done = wait_for("the run to finish", Duration::from_secs(60), || async {
        let r = runs.get(&run.name_any()).await.ok()?;
        r.status.as_ref().filter(|s| s.state.is_finished())?;
        Some(r)
    })
    .await;
    // The former leader learns it lost, and stops reconciling.
    wait_for("the former leader to step down", Duration::from_secs(30), || async {
        (first.metric("herald_leader").await == 0.0 && first.metric("herald_reconciles_in_flight").await == 0.0).then_some(())
    })
    .await;
    // Once resumed it started nothing: at most the attempts in flight when it was paused finish.
    assert!(first.metric("herald_deliveries_total").await - resumed_deliveries <= 4.0, "the paused leader went on delivering after it resumed");

    let status = done.status.unwrap();
    assert_eq!(status.state, RunState::Completed, "{status:?}");
    let pages = ns.api::<RecipientPage>();
    let mut recipients = Vec::new();
    for page in &status.pages {
        recipients.extend(pages.get(page).await.unwrap().status.unwrap().recipients);
    }
    assert_eq!(recipients.len(), 301);
    // One consistent record per recipient: the late writes of the former leader did not roll anything back.
    for r in &recipients {
        assert_eq!(r.state, RecipientState::Completed, "{r:?}");
        assert_eq!(r.steps.iter().filter(|s| s.step_ref == "notify").count(), 1, "{r:?}");
    }
    // Every recipient was delivered; a repeated delivery carries the same Idempotency-Key.
    let mut keys: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for request in receiver.received() {
        *keys.entry(request.header("idempotency-key").expect("an Idempotency-Key").to_string()).or_default() += 1;
    }
    assert_eq!(keys.len(), 301, "one key per recipient (the object itself and its 300 subscribers)");
    println!("{} requests for 301 recipients across the handover", receiver.received().len());
}
