//! Workflow function steps and conditions on the real local control plane
//! with a real HTTP receiver: branches taken per recipient and shown in
//! status, fetch merges and failures, trigger-workflow child runs, workflow
//! conditions, and condition groups.

mod common;
mod receivers;

use std::collections::HashMap;
use std::time::Duration;

use common::{create, wait_for, TestNamespace};
use herald::core::status::{RecipientState, RecipientStatus, StepState};
use herald::resources::{Channel, RecipientPage, TriggerRun, User, Workflow};
use kube::api::ListParams;
use kube::ResourceExt;
use receivers::{HttpReceiver, Reply};
use serde_json::{json, Value};

async fn channel(ns: &TestNamespace, receiver: &HttpReceiver) {
    create::<Channel>(
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/default")}}),
    )
    .await;
}

async fn workflow(ns: &TestNamespace, key: &str, spec: Value) {
    let mut spec = spec;
    spec["key"] = json!(key);
    create::<Workflow>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": key}, "spec": spec})).await;
}

async fn user(ns: &TestNamespace, id: &str, spec: Value) {
    let mut spec = spec;
    spec["id"] = json!(id);
    create::<User>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id}, "spec": spec})).await;
}

async fn trigger(ns: &TestNamespace, spec: Value) -> String {
    let run: TriggerRun = create(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "run-"}, "spec": spec})).await;
    run.name_any()
}

async fn finished(ns: &TestNamespace, name: &str) -> HashMap<String, RecipientStatus> {
    let api = ns.api::<TriggerRun>();
    let run = wait_for(&format!("TriggerRun {name} to finish"), Duration::from_secs(60), || async {
        let run = api.get(name).await.ok()?;
        run.status.as_ref().filter(|s| s.state.is_finished())?;
        Some(run)
    })
    .await;
    let status = run.status.unwrap();
    let mut out: HashMap<String, RecipientStatus> = status.recipients.iter().map(|r| (r.recipient.clone(), r.clone())).collect();
    for page in &status.pages {
        for r in ns.api::<RecipientPage>().get(page).await.unwrap().status.unwrap_or_default().recipients {
            out.insert(r.recipient.clone(), r);
        }
    }
    out
}

fn refs(r: &RecipientStatus) -> Vec<&str> {
    r.steps.iter().map(|s| s.step_ref.as_str()).collect()
}

fn hook(step_ref: &str, path: &str, receiver: &HttpReceiver, body: &str) -> Value {
    json!({"ref": step_ref, "type": "channel", "channel": "hooks", "template": {"url": receiver.url(path), "body": body}})
}

#[tokio::test]
async fn each_recipient_takes_its_branch_and_the_status_shows_the_path() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, &receiver).await;
    user(&ns, "ann", json!({"properties": {"oncall": true}})).await;
    user(&ns, "bob", json!({"properties": {"oncall": false}})).await;
    let urgent = json!({"any": [
        {"variable": "data.severity", "operator": "equal_to", "argument": "critical"},
        {"all": [{"variable": "data.severity", "operator": "equal_to", "argument": "high"}, {"variable": "recipient.oncall", "operator": "equal_to", "argument": true}]}
    ]});
    workflow(
        &ns,
        "incident",
        json!({"steps": [
            {"ref": "route", "type": "branch", "branches": [
                {"name": "urgent", "conditions": urgent, "terminates": true, "steps": [hook("page", "/page", &receiver, "page {{ recipient.id }}")]},
                {"name": "default", "steps": [hook("mail", "/mail", &receiver, "mail {{ recipient.id }}")]}
            ]},
            hook("after", "/after", &receiver, "after {{ recipient.id }}")
        ]}),
    )
    .await;
    let name = trigger(&ns, json!({"workflow": "incident", "recipients": ["ann", "bob"], "data": {"severity": "high"}})).await;
    let records = finished(&ns, &name).await;
    let (ann, bob) = (&records["ann"], &records["bob"]);
    assert_eq!(refs(ann), ["route", "page"], "{ann:?}");
    assert_eq!(ann.steps[0].branch.as_deref(), Some("urgent"));
    assert_eq!(refs(bob), ["route", "mail", "after"], "{bob:?}");
    assert_eq!(bob.steps[0].branch.as_deref(), Some("default"));
    assert!(records.values().all(|r| r.state == RecipientState::Completed));
    let bodies = |path: &str| receiver.received_at(path).iter().map(|r| String::from_utf8_lossy(&r.body).to_string()).collect::<Vec<_>>();
    assert_eq!(bodies("/page"), ["page ann"]);
    assert_eq!(bodies("/mail"), ["mail bob"]);
    assert_eq!(bodies("/after"), ["after bob"], "the terminating branch ended ann's run");
}

#[tokio::test]
async fn fetch_merges_the_answer_for_later_steps_and_stops_on_failures() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, &receiver).await;
    user(&ns, "ann", json!({})).await;
    receiver.always("/builds/7", Reply::status(200).body(r#"{"status": "green", "commit": {"sha": "abc123"}}"#));
    receiver.always("/builds/404", Reply::status(404).body(r#"{"error": "no such build"}"#));
    // A 503 first, then the answer: retried.
    receiver.script("/builds/flaky", vec![Reply::status(503)]);
    receiver.always("/builds/flaky", Reply::status(200).body(r#"{"status": "red"}"#));
    let url = format!("{}/builds/{{{{ data.build_id }}}}", receiver.url(""));
    workflow(
        &ns,
        "build",
        json!({"steps": [
            {"ref": "enrich", "type": "fetch", "fetch": {"url": url, "headers": {"X-Build": "{{ data.build_id }}"}, "query": {"who": "{{ recipient.id }}"}}},
            {"ref": "details", "type": "fetch", "fetch": {"url": url, "responsePath": "build"}},
            hook("tell", "/tell", &receiver, "{{ data.build_id }} is {{ data.status }} at {{ data.commit.sha }} ({{ data.build.status }})")
        ]}),
    )
    .await;

    let ok = trigger(&ns, json!({"workflow": "build", "recipients": ["ann"], "data": {"build_id": "7"}})).await;
    let records = finished(&ns, &ok).await;
    assert_eq!(records["ann"].state, RecipientState::Completed, "{:?}", records["ann"]);
    let told: Vec<String> = receiver.received_at("/tell").iter().map(|r| String::from_utf8_lossy(&r.body).to_string()).collect();
    assert_eq!(told, ["7 is green at abc123 (green)"]);
    let fetched = receiver.received_at("/builds/7");
    assert_eq!(fetched[0].header("X-Build"), Some("7"));
    assert_eq!(fetched[0].query, "who=ann");

    let missing = trigger(&ns, json!({"workflow": "build", "recipients": ["ann"], "data": {"build_id": "404"}})).await;
    let ann = &finished(&ns, &missing).await["ann"];
    assert_eq!(ann.state, RecipientState::Failed);
    let enrich = &ann.steps[0];
    assert_eq!((enrich.state, enrich.reason.as_deref(), enrich.status_code, enrich.attempts), (StepState::Failed, Some("HttpStatus404"), Some(404), Some(1)), "{enrich:?}");
    assert_eq!(ann.steps.len(), 1, "nothing after a failed fetch");

    let flaky = trigger(&ns, json!({"workflow": "build", "recipients": ["ann"], "data": {"build_id": "flaky"}})).await;
    let ann = &finished(&ns, &flaky).await["ann"];
    assert_eq!(ann.state, RecipientState::Completed, "{ann:?}");
    assert_eq!(ann.steps[0].attempts, Some(2), "a 503 is retried");
}

#[tokio::test]
async fn trigger_workflow_starts_one_child_run_and_records_it() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, &receiver).await;
    user(&ns, "ann", json!({})).await;
    workflow(&ns, "escalation", json!({"steps": [hook("escalate", "/escalate", &receiver, "escalated {{ data.alert }} for {{ recipient.id }} by {{ actor.id }}")]})).await;
    workflow(
        &ns,
        "alert",
        json!({"steps": [
            hook("notify", "/notify", &receiver, "{{ data.alert }}"),
            {"ref": "follow-up", "type": "trigger_workflow", "triggerWorkflow": {"workflow": "escalation", "data": "{\"alert\": {{ data.alert | json }}}"}}
        ]}),
    )
    .await;
    let name = trigger(&ns, json!({"workflow": "alert", "recipients": ["ann"], "actor": "ann", "data": {"alert": "disk full"}})).await;
    let ann = finished(&ns, &name).await["ann"].clone();
    let step = &ann.steps[1];
    assert_eq!((step.state, step.reason.as_deref()), (StepState::Completed, Some("WorkflowTriggered")), "{step:?}");
    let child = step.run.clone().expect("the child run's name");
    finished(&ns, &child).await;
    let uid = ns.api::<TriggerRun>().get(&child).await.unwrap().metadata.uid.unwrap();
    assert!(step.message.as_deref().is_some_and(|m| m.contains(&uid)), "the step names the new workflow run id: {step:?}");
    wait_for("the escalation", Duration::from_secs(30), || async { (!receiver.received_at("/escalate").is_empty()).then_some(()) }).await;
    let bodies: Vec<String> = receiver.received_at("/escalate").iter().map(|r| String::from_utf8_lossy(&r.body).to_string()).collect();
    assert_eq!(bodies, ["escalated disk full for ann by ann"]);
    let children = ns.api::<TriggerRun>().list(&ListParams::default().labels(&format!("herald.dev/parent-run={name}"))).await.unwrap();
    assert_eq!(children.items.len(), 1);
}

#[tokio::test]
async fn workflow_conditions_skip_recipients_and_bad_shapes_are_named() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, &receiver).await;
    user(&ns, "pro", json!({"properties": {"plan": "pro"}})).await;
    user(&ns, "free", json!({"properties": {"plan": "free"}})).await;
    workflow(
        &ns,
        "upsell",
        json!({
            "conditions": {"all": [{"variable": "recipient.plan", "operator": "equal_to", "argument": "pro"}]},
            "steps": [hook("tell", "/tell", &receiver, "{{ recipient.id }}")]
        }),
    )
    .await;
    let name = trigger(&ns, json!({"workflow": "upsell", "recipients": ["pro", "free"]})).await;
    let records = finished(&ns, &name).await;
    assert_eq!(records["pro"].state, RecipientState::Completed);
    assert_eq!((records["free"].state, records["free"].reason.as_deref()), (RecipientState::Skipped, Some("ConditionNotMet")));
    assert!(records["free"].steps.is_empty());

    // Groups nested two deep, and a default branch that is not last: Ready=False naming the problem.
    workflow(
        &ns,
        "too-deep",
        json!({"steps": [{"ref": "a", "type": "channel", "channel": "hooks", "conditions": {"all": [{"any": [{"all": [{"variable": "data.x", "operator": "exists"}]}]}]}, "template": {"body": "x"}}]}),
    )
    .await;
    workflow(
        &ns,
        "unreachable",
        json!({"steps": [{"ref": "route", "type": "branch", "branches": [{"name": "default", "steps": []}, {"name": "never", "conditions": [{"variable": "data.x", "operator": "exists"}], "steps": []}]}]}),
    )
    .await;
    for (key, says) in [("too-deep", "nest one level"), ("unreachable", "not the last")] {
        let api = ns.api::<Workflow>();
        let message = wait_for(&format!("{key} Ready=False"), Duration::from_secs(30), || async {
            let w = api.get(key).await.ok()?;
            let c = w.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")?;
            Some(c.message)
        })
        .await;
        assert!(message.contains(says), "{key}: {message}");
    }
}

#[tokio::test]
async fn once_per_recipient_runs_a_workflow_once_for_each_recipient() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let mut settings = herald::settings::Settings::for_namespace(&ns.name);
    settings.database_url = Some(common::database().await);
    let _op = common::operator_with(&client, settings).await;
    channel(&ns, &receiver).await;
    user(&ns, "ann", json!({})).await;
    user(&ns, "bob", json!({})).await;
    workflow(&ns, "welcome", json!({"triggerFrequency": "oncePerRecipient", "steps": [hook("hello", "/hello", &receiver, "{{ recipient.id }}")]})).await;
    let first = trigger(&ns, json!({"workflow": "welcome", "recipients": ["ann"]})).await;
    assert_eq!(finished(&ns, &first).await["ann"].state, RecipientState::Completed);
    // Two more at once: ann has had hers; bob gets his once.
    let (a, b) = tokio::join!(trigger(&ns, json!({"workflow": "welcome", "recipients": ["ann", "bob"]})), trigger(&ns, json!({"workflow": "welcome", "recipients": ["bob"]})));
    let (a, b) = (finished(&ns, &a).await, finished(&ns, &b).await);
    assert_eq!((a["ann"].state, a["ann"].reason.as_deref()), (RecipientState::Skipped, Some("TriggerFrequency")));
    let bob = [a["bob"].state, b["bob"].state];
    assert_eq!(bob.iter().filter(|s| **s == RecipientState::Completed).count(), 1, "{bob:?}");
    let mut bodies: Vec<String> = receiver.received_at("/hello").iter().map(|r| String::from_utf8_lossy(&r.body).to_string()).collect();
    bodies.sort();
    assert_eq!(bodies, ["ann", "bob"]);
}

#[tokio::test]
async fn a_throttle_lets_exactly_its_limit_through_under_concurrent_triggers() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, &receiver).await;
    user(&ns, "ann", json!({})).await;
    workflow(
        &ns,
        "page",
        json!({"steps": [
            {"ref": "limit", "type": "throttle", "throttle": {"window": "1h", "limit": 2, "key": "{{ data.alert_id }}"}},
            hook("send", "/page", &receiver, "{{ data.alert_id }} {{ data.n }}")
        ]}),
    )
    .await;
    let names = futures::future::join_all((0..30).map(|n| {
        let ns = &ns;
        async move { trigger(ns, json!({"workflow": "page", "recipients": ["ann"], "data": {"alert_id": if n % 3 == 0 { "b" } else { "a" }, "n": n}})).await }
    }))
    .await;
    let mut states = HashMap::<(String, String), usize>::new();
    for name in &names {
        let ann = finished(&ns, name).await["ann"].clone();
        *states.entry((format!("{:?}", ann.state), ann.reason.unwrap_or_default())).or_default() += 1;
    }
    assert_eq!(states.get(&("Completed".into(), "WorkflowCompleted".into())), Some(&4), "{states:?}");
    assert_eq!(states.get(&("Throttled".into(), "Throttled".into())), Some(&26), "{states:?}");
    let sent: Vec<String> = receiver.received_at("/page").iter().map(|r| String::from_utf8_lossy(&r.body).split(' ').next().unwrap().to_string()).collect();
    assert_eq!((sent.iter().filter(|k| *k == "a").count(), sent.iter().filter(|k| *k == "b").count()), (2, 2), "{sent:?}");
}

#[tokio::test]
async fn a_batch_gathers_triggers_into_one_delivery() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, &receiver).await;
    user(&ns, "ann", json!({})).await;
    user(&ns, "bob", json!({})).await;
    workflow(
        &ns,
        "comments",
        json!({"steps": [
            {"ref": "digest", "type": "batch", "batch": {"window": "4s", "key": "{{ data.project }}", "renderLimit": 3}},
            hook("send", "/digest", &receiver, "{{ total_activities }} new on {{ data.project }} by {{ total_actors }}: {% for a in activities %}{{ a.text }};{% endfor %}")
        ]}),
    )
    .await;
    let names = futures::future::join_all((0..40).map(|n| {
        let ns = &ns;
        async move {
            trigger(
                ns,
                json!({"workflow": "comments", "recipients": ["ann"], "actor": if n % 2 == 0 { "ann" } else { "bob" }, "data": {"project": "one", "text": format!("c{n}")}}),
            )
            .await
        }
    }))
    .await;
    let mut carried = 0;
    let mut batched = 0;
    for name in &names {
        let ann = finished(&ns, name).await["ann"].clone();
        match ann.state {
            RecipientState::Completed => carried += 1,
            RecipientState::Batched => {
                batched += 1;
                assert!(ann.steps[0].run.is_some(), "{ann:?}");
            }
            other => panic!("{other:?}: {ann:?}"),
        }
    }
    assert_eq!((carried, batched), (1, 39));
    let bodies: Vec<String> = receiver.received_at("/digest").iter().map(|r| String::from_utf8_lossy(&r.body).to_string()).collect();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert!(bodies[0].starts_with("40 new on one by 2: "), "{}", bodies[0]);
    assert_eq!(bodies[0].matches(';').count(), 3, "renderLimit activities: {}", bodies[0]);
}
