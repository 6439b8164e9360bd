//! Trust under hostile input (issue 9): what one trigger, object or name may
//! do must cost only itself, and never misdirect anyone's notifications.

mod common;
mod receivers;

use std::time::Duration;

use common::runs::{by_id, condition, finished, recipients, trigger, user, wait_for_event, workflow};
use common::{create, wait_for, TestNamespace};
use herald::core::status::{RecipientState, RunState};
use herald::resources::{Channel, Object, RecipientPage, TriggerRun, User, Workflow};
use herald::settings::Settings;
use kube::api::ListParams;
use kube::ResourceExt;
use serde_json::{json, Value};

/// The `hooks` Channel, delivering to `receiver` (path `/`).
async fn hooks_channel(ns: &TestNamespace, receiver: &receivers::HttpReceiver) {
    create::<Channel>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/")}})).await;
}

/// An operator for `ns`, a receiver behind the `hooks` Channel, and the Workflow `hello`.
async fn hello(ns: &TestNamespace, settings: Settings) -> (herald::operator::Operator, receivers::HttpReceiver) {
    let op = common::operator_with(&ns.client, settings).await;
    let receiver = receivers::HttpReceiver::start().await;
    hooks_channel(ns, &receiver).await;
    create::<Workflow>(ns, workflow("hello", json!({}))).await;
    (op, receiver)
}

async fn users_by_id(ns: &TestNamespace) -> Vec<(String, User)> {
    ns.api::<User>().list(&ListParams::default()).await.unwrap().items.into_iter().map(|u| (u.spec.id.clone(), u)).collect()
}

fn named(id: &str, email: &str, hook: &str) -> Value {
    json!({"id": id, "email": email, "channelData": {"hooks": {"url": hook}}})
}

#[tokio::test]
async fn inline_identify_never_rewrites_a_resource_with_another_id() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    // Even where TriggerRuns may overwrite, identify goes by id only.
    let mut settings = Settings::for_namespace(&ns.name);
    settings.identify_overwrite_namespaces = vec![ns.name.clone()];
    let (_op, receiver) = hello(&ns, settings).await;
    // The README's own shape: User `user-1` holds id `user_1`.
    create::<User>(&ns, user("user-1", named("user_1", "ada@example.com", &receiver.url("/ada")))).await;
    let objects = [("team-a", "ops"), ("team", "a-ops")];

    let run: TriggerRun = create(
        &ns,
        trigger(json!({"workflow": "hello", "recipients": [
            "user_1",
            {"id": "user-1", "name": "M", "email": "m@evil.example", "channel_data": {"hooks": {"url": receiver.url("/evil")}}},
            {"id": "ops", "collection": "team-a", "name": "Team A ops"},
            {"id": "a-ops", "collection": "team", "name": "Team a-ops"},
        ]})),
    )
    .await;
    let run = finished(&ns, &run.name_any()).await;
    assert_eq!(run.status.as_ref().unwrap().state, RunState::Completed, "{:?}", run.status);

    let users = users_by_id(&ns).await;
    let (_, ada) = users.iter().find(|(id, _)| id == "user_1").expect("user_1 is still there");
    assert_eq!(ada.name_any(), "user-1");
    assert_eq!(ada.spec.email.as_deref(), Some("ada@example.com"), "user_1's email was rewritten");
    assert_eq!(ada.spec.channel_data["hooks"]["url"], json!(receiver.url("/ada")));
    let (_, newcomer) = users.iter().find(|(id, _)| id == "user-1").expect("a User for id `user-1` was created");
    assert_ne!(newcomer.name_any(), "user-1");
    assert_eq!(newcomer.spec.email.as_deref(), Some("m@evil.example"));
    // Each delivery went to its own recipient's URL.
    assert_eq!(receiver.received_at("/ada").len(), 1);
    assert_eq!(receiver.received_at("/evil").len(), 1);

    let stored: Vec<Object> = ns.api::<Object>().list(&ListParams::default()).await.unwrap().items;
    assert_eq!(stored.len(), 2, "(team-a, ops) and (team, a-ops) are two objects");
    for (collection, id) in objects {
        let o = stored.iter().find(|o| o.spec.collection == collection && o.spec.id == id).unwrap_or_else(|| panic!("no object {collection}/{id}"));
        assert_eq!(o.spec.properties["name"], json!(if collection == "team-a" { "Team A ops" } else { "Team a-ops" }));
    }
}

#[tokio::test]
async fn a_kubectl_trigger_creates_users_but_does_not_overwrite_them() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let (_op, receiver) = hello(&ns, Settings::for_namespace(&ns.name)).await;
    create::<User>(&ns, user("user-1", named("user_1", "ada@example.com", &receiver.url("/ada")))).await;

    let run: TriggerRun = create(
        &ns,
        trigger(json!({"workflow": "hello", "recipients": [
            {"id": "user_1", "email": "m@evil.example", "channel_data": {"hooks": {"url": receiver.url("/evil")}}},
            {"id": "user_2", "name": "Grace", "email": "grace@example.com"},
        ]})),
    )
    .await;
    let name = run.name_any();
    let run = finished(&ns, &name).await;
    assert_eq!(run.status.as_ref().unwrap().state, RunState::Completed, "{:?}", run.status);
    let (status, reason, message) = condition(&run, "Identified");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "OverwriteRefused"));
    assert!(message.contains("User `user-1`") && message.contains("--identify-overwrite-namespaces"), "{message}");
    wait_for_event(&ns, &name, "Warning", "OverwriteRefused").await;

    let users = users_by_id(&ns).await;
    let ada = &users.iter().find(|(id, _)| id == "user_1").unwrap().1;
    assert_eq!(ada.spec.email.as_deref(), Some("ada@example.com"));
    assert_eq!(ada.spec.channel_data["hooks"]["url"], json!(receiver.url("/ada")));
    let grace = &users.iter().find(|(id, _)| id == "user_2").expect("a new inline user is created").1;
    assert_eq!(grace.spec.name.as_deref(), Some("Grace"));
    // user_1's notification went where user_1 said, not where the trigger said.
    assert_eq!(receiver.received_at("/ada").len(), 1);
    assert!(receiver.received_at("/evil").is_empty());
}

#[tokio::test]
async fn a_namespace_that_opts_in_lets_kubectl_triggers_overwrite() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let mut settings = Settings::for_namespace(&ns.name);
    settings.identify_overwrite_namespaces = vec!["*".into()];
    let (_op, receiver) = hello(&ns, settings).await;
    create::<User>(&ns, user("user-1", named("user_1", "ada@example.com", &receiver.url("/old")))).await;
    let run: TriggerRun =
        create(&ns, trigger(json!({"workflow": "hello", "recipients": [{"id": "user_1", "email": "ada@new.example", "channel_data": {"hooks": {"url": receiver.url("/new")}}}]})))
            .await;
    let run = finished(&ns, &run.name_any()).await;
    assert!(run.status.as_ref().unwrap().conditions.iter().all(|c| c.type_ != "Identified"), "{:?}", run.status);
    let ada = ns.api::<User>().get("user-1").await.unwrap();
    assert_eq!(ada.spec.email.as_deref(), Some("ada@new.example"));
    assert_eq!(receiver.received_at("/new").len(), 1);
}

#[tokio::test]
async fn every_legal_run_name_runs_and_is_cleaned_up() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let (_op, _receiver) = hello(&ns, Settings::for_namespace(&ns.name)).await;
    create::<User>(&ns, user("user-1", json!({"id": "user_1"}))).await;
    // 64 characters (one over a label value), and the longest name Kubernetes allows.
    let names = ["r".repeat(64), format!("{}.{}", "a".repeat(126), "b".repeat(126))];
    for name in &names {
        let mut run = trigger(json!({"workflow": "hello", "recipients": ["user_1"], "ttlSecondsAfterFinished": 2}));
        run["metadata"] = json!({"name": name});
        create::<TriggerRun>(&ns, run).await;
    }
    for name in &names {
        let run = finished(&ns, name).await;
        let status = run.status.as_ref().unwrap();
        assert_eq!(status.state, RunState::Completed, "{name}: {status:?}");
        let got = recipients(&ns, &run).await;
        assert_eq!(by_id(&got)["user_1"].state, RecipientState::Completed);
    }
    // After their TTL, the runs and their pages (found by label) are deleted.
    wait_for("the runs and their pages to be deleted", Duration::from_secs(60), || async {
        let runs = ns.api::<TriggerRun>().list(&ListParams::default()).await.ok()?.items.len();
        let pages = ns.api::<RecipientPage>().list(&ListParams::default()).await.ok()?.items.len();
        (runs == 0 && pages == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_object_herald_cannot_read_costs_only_itself() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    // Admitted by the CRD schema (a preference entry is "any value" to it), but not a preference.
    common::apply_yaml(&ns, &user("broken", json!({"id": "broken", "preferences": {"default": {"workflows": {"deploy": "false"}}}})).to_string()).await;
    create::<User>(&ns, user("user-1", json!({"id": "user_1"}))).await;
    // Present before herald starts: the first list of the watch holds it.
    let op = common::operator(&client, &ns.name).await;
    let receiver = receivers::HttpReceiver::start().await;
    hooks_channel(&ns, &receiver).await;
    create::<Workflow>(&ns, workflow("hello", json!({}))).await;
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "hello", "recipients": ["user_1", "broken"]}))).await;
    let run = finished(&ns, &run.name_any()).await;
    let got = by_id(&recipients(&ns, &run).await);
    assert_eq!(got["user_1"].state, RecipientState::Completed);
    assert_eq!(got["broken"].state, RecipientState::Failed);
    assert_eq!(got["broken"].reason.as_deref(), Some("RecipientNotFound"));

    let base = format!("http://{}", op.addr);
    assert_eq!(reqwest::get(format!("{base}/readyz")).await.unwrap().status(), 200);
    let event = wait_for_event(&ns, "broken", "Warning", "Unreadable").await;
    assert!(event.note.as_deref().unwrap_or_default().contains("deploy"), "{event:?}");
    wait_for("herald_invalid_resources{kind=\"User\"} to be 1", Duration::from_secs(20), || async {
        let text = reqwest::get(format!("{base}/metrics")).await.ok()?.text().await.ok()?;
        text.lines().any(|l| l == "herald_invalid_resources{kind=\"User\"} 1").then_some(())
    })
    .await;
}

fn cancellation(workflow: &str, key: &str) -> Value {
    json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Cancellation", "metadata": {"generateName": "cancel-"}, "spec": {"workflow": workflow, "cancellationKey": key}})
}

#[tokio::test]
async fn a_cancel_stops_a_run_in_progress() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let mut settings = Settings::for_namespace(&ns.name);
    settings.run_concurrency = 2;
    let (_op, receiver) = hello(&ns, settings).await;
    receiver.slow("/", Duration::from_millis(500));
    let ids: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    for id in &ids {
        create::<User>(&ns, user(id, json!({"id": id}))).await;
    }
    // 100 recipients, two at a time, half a second each: 25 s if nothing stops it.
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "hello", "recipients": ids, "cancellationKey": "c-1"}))).await;
    wait_for("a few deliveries", Duration::from_secs(30), || async { (receiver.arrived() >= 4).then_some(()) }).await;
    create::<herald::resources::Cancellation>(&ns, cancellation("hello", "c-1")).await;
    let at_cancel = receiver.arrived();

    let run = finished(&ns, &run.name_any()).await;
    let got = recipients(&ns, &run).await;
    let delivered = got.iter().filter(|r| r.state == RecipientState::Completed).count();
    let cancelled = got.iter().filter(|r| r.state == RecipientState::Cancelled).count();
    assert_eq!(delivered + cancelled, 100, "every recipient is delivered or cancelled");
    // What was in flight finishes; nothing new starts once the Cancellation is stored
    // (the margin is for a slow watch on a loaded machine: 10 more would take 2.5 s).
    assert!(receiver.arrived() <= at_cancel + 10, "{} deliveries after the cancel at {at_cancel}", receiver.arrived());
    assert_eq!(delivered, receiver.count());
}

#[tokio::test]
async fn a_cancel_stored_before_its_trigger_applies() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let (_op, receiver) = hello(&ns, Settings::for_namespace(&ns.name)).await;
    create::<User>(&ns, user("user-1", json!({"id": "user_1"}))).await;
    for i in 0..5 {
        let key = format!("early-{i}");
        create::<herald::resources::Cancellation>(&ns, cancellation("hello", &key)).await;
        let run: TriggerRun = create(&ns, trigger(json!({"workflow": "hello", "recipients": ["user_1"], "cancellationKey": key}))).await;
        let run = finished(&ns, &run.name_any()).await;
        assert_eq!(run.status.as_ref().unwrap().state, RunState::Cancelled, "{:?}", run.status);
    }
    assert_eq!(receiver.count(), 0);
}
