//! Dynamic audiences on the real local control plane: an Audience with a
//! label selector is every User whose labels match when a run expands it.

mod common;
mod receivers;

use std::time::Duration;

use common::{create, wait_for, TestNamespace};
use herald::core::status::RecipientState;
use herald::resources::{Audience, Channel, TriggerRun, User, Workflow};
use kube::api::{Patch, PatchParams};
use kube::ResourceExt;
use receivers::HttpReceiver;
use serde_json::json;

async fn user(ns: &TestNamespace, id: &str, labels: serde_json::Value) {
    create::<User>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id, "labels": labels}, "spec": {"id": id}})).await;
}

async fn run_to(ns: &TestNamespace) -> Vec<String> {
    let run: TriggerRun =
        create(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "run-"}, "spec": {"workflow": "news", "audiences": ["pros"]}}))
            .await;
    let api = ns.api::<TriggerRun>();
    let name = run.name_any();
    let done =
        wait_for("the run to finish", Duration::from_secs(60), || async { api.get(&name).await.ok().filter(|r| r.status.as_ref().is_some_and(|s| s.state.is_finished())) }).await;
    let records = done.status.unwrap().recipients;
    assert!(records.iter().all(|r| r.state == RecipientState::Completed), "{records:?}");
    let mut ids: Vec<String> = records.into_iter().map(|r| r.recipient).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_selector_audience_is_every_user_whose_labels_match_when_the_run_expands_it() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    create::<Channel>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/news")}}))
        .await;
    create::<Workflow>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "news"}, "spec": {"steps": [{"ref": "send", "type": "channel", "channel": "hooks", "template": {"body": "{{ recipient.id }}"}}]}}),
    )
    .await;
    user(&ns, "ann", json!({"plan": "pro"})).await;
    user(&ns, "bob", json!({"plan": "free"})).await;
    user(&ns, "cat", json!({"plan": "pro", "region": "eu"})).await;
    create::<Audience>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Audience", "metadata": {"name": "pros"}, "spec": {"key": "pros", "members": ["dan"], "selector": {"matchLabels": {"plan": "pro"}}}}),
    )
    .await;
    user(&ns, "dan", json!({})).await;
    // The operator's caches see new Users within moments: a run then reaches every match.
    wait_for("the pros", Duration::from_secs(30), || async { (run_to(&ns).await == ["ann", "cat", "dan"]).then_some(()) }).await;
    // Relabel bob: the next run includes him, without touching the Audience.
    ns.api::<User>().patch("bob", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"plan": "pro"}}}))).await.unwrap();
    let expected = ["ann", "bob", "cat", "dan"];
    wait_for("bob to be in the audience", Duration::from_secs(30), || async { (run_to(&ns).await == expected).then_some(()) }).await;
}
