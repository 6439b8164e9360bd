//! Templates written to exhaust the operator, against the real local control
//! plane and a real HTTP receiver: what can be known from the template alone
//! is refused when the Workflow is applied; what depends on the data fails
//! that recipient's step on its render budget, while other recipients and
//! other runs go on.

mod common;
mod receivers;

use std::collections::HashMap;
use std::time::Duration;

use common::{create, wait_for, TestNamespace};
use herald::core::status::{RecipientState, RecipientStatus, RunState, StepState};
use herald::resources::{Channel, RecipientPage, TriggerRun, Workflow};
use kube::ResourceExt;
use receivers::HttpReceiver;
use serde_json::{json, Value};

/// Three counted loops, nested: a billion iterations at 1,000 items each.
fn three_deep(bound: &str) -> String {
    format!("{{% for a in (1..{bound}) %}}{{% for b in (1..{bound}) %}}{{% for c in (1..{bound}) %}}{{% endfor %}}{{% endfor %}}{{% endfor %}}")
}

async fn workflow(ns: &TestNamespace, key: &str, body: &str) {
    let steps = json!([{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": body}}]);
    create::<Workflow>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": key}, "spec": {"key": key, "steps": steps}})).await;
}

async fn hooks(ns: &TestNamespace, receiver: &HttpReceiver) {
    let spec = json!({"type": "http", "url": receiver.url("/hooks")});
    create::<Channel>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": spec})).await;
}

async fn trigger(ns: &TestNamespace, spec: Value) -> String {
    let run: TriggerRun = create(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "run-"}, "spec": spec})).await;
    run.name_any()
}

/// The run once it finished, and its recipients by id.
async fn finished(ns: &TestNamespace, name: &str) -> (TriggerRun, HashMap<String, RecipientStatus>) {
    let runs = ns.api::<TriggerRun>();
    let run = wait_for(&format!("TriggerRun {name} to finish"), Duration::from_secs(60), || async {
        let run = runs.get(name).await.ok()?;
        run.status.as_ref().filter(|s| s.state.is_finished())?;
        Some(run)
    })
    .await;
    let pages = ns.api::<RecipientPage>();
    // A small run keeps its records inline; a large one on pages.
    let mut recipients: HashMap<String, RecipientStatus> = run.status.as_ref().unwrap().recipients.iter().map(|r| (r.recipient.clone(), r.clone())).collect();
    for page in &run.status.as_ref().unwrap().pages {
        for r in pages.get(page).await.unwrap().status.unwrap_or_default().recipients {
            recipients.insert(r.recipient.clone(), r);
        }
    }
    (run, recipients)
}

#[tokio::test]
async fn loops_known_to_exceed_the_budget_are_refused_when_applied() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let _op = common::operator(&client, &ns.name).await;
    workflow(&ns, "nested", &three_deep("1000")).await;
    let api = ns.api::<Workflow>();
    let (reason, message) = wait_for("Workflow nested Ready=False", Duration::from_secs(20), || async {
        let c = api.get("nested").await.ok()?.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")?;
        Some((c.reason, c.message))
    })
    .await;
    assert_eq!(reason, "InvalidWorkflow");
    assert!(message.starts_with("step `notify` template.body: its loops would run 1001001000 iterations"), "{message}");
    assert!(message.contains("a render may run at most 100000"), "{message}");
}

// Multi-threaded, as `herald run` is: rendering must leave the async workers to the other runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_render_over_budget_fails_its_recipient_and_everything_else_goes_on() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    hooks(&ns, &receiver).await;
    // Compiles: the loop sizes come from the data.
    workflow(&ns, "hostile", &format!("{}done {{{{ recipient.id }}}}", three_deep("data.n"))).await;
    workflow(&ns, "ordinary", "hello {{ recipient.name }}").await;

    // One recipient's data makes the loops run a billion iterations, the other's eight.
    let hostile = trigger(
        &ns,
        json!({"workflow": "hostile", "data": {"n": 2}, "recipients": [
            {"id": "greedy", "name": "G", "$trigger_data": {"n": 1000}},
            {"id": "modest", "name": "M"}
        ]}),
    )
    .await;
    let ordinary = trigger(&ns, json!({"workflow": "ordinary", "recipients": [{"id": "reader", "name": "Ann"}]})).await;

    let (run, recipients) = finished(&ns, &hostile).await;
    assert_eq!(run.status.as_ref().unwrap().state, RunState::Failed);
    let greedy = &recipients["greedy"];
    assert_eq!(greedy.state, RecipientState::Failed);
    let step = greedy.steps.iter().find(|s| s.step_ref == "notify").expect("the notify step");
    assert_eq!((step.state, step.reason.as_deref()), (StepState::Failed, Some("RenderBudgetExceeded")));
    let message = step.message.clone().unwrap_or_default();
    assert!(message.starts_with("step `notify` template.body: rendering exceeded its budget of "), "{message}");
    assert_eq!(recipients["modest"].state, RecipientState::Completed);

    let (run, recipients) = finished(&ns, &ordinary).await;
    assert_eq!(run.status.as_ref().unwrap().state, RunState::Completed);
    assert_eq!(recipients["reader"].state, RecipientState::Completed);

    let mut bodies: Vec<String> = receiver.received().iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    bodies.sort();
    assert_eq!(bodies, ["done modest", "hello Ann"]);
}
