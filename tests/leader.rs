//! Several replicas: only the Lease holder reconciles; killing it with
//! SIGKILL hands over within the lease duration, and the run in progress
//! completes with no recipient lost.

mod common;

use std::time::{Duration, Instant};

use common::{wait_for, HeraldProcess, TestNamespace};
use herald::core::status::{RecipientState, RunState};
use herald::resources::{RecipientPage, TriggerRun};
use kube::ResourceExt;
use serde_json::json;

const LEASE_SECONDS: u64 = 4;

use common::create;

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
    let subscribers: Vec<_> = (0..300).map(|i| json!({"recipient": format!("u{i}")})).collect();
    for i in 0..300 {
        create::<herald::resources::User>(
            &ns,
            json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": format!("u{i}")}, "spec": {"id": format!("u{i}")}}),
        )
        .await;
    }
    create::<herald::resources::Object>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Object", "metadata": {"name": "all"}, "spec": {"collection": "g", "id": "all", "subscribers": subscribers}}),
    )
    .await;
    let run: TriggerRun = create(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "run-"},
        "spec": {"workflow": "slow", "recipients": [{"id": "all", "collection": "g"}]}}),
    )
    .await;

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
