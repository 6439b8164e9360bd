//! The egress policy and what the API shows of failed deliveries, against the
//! real local control plane, an in-process operator and real HTTP receivers:
//! metadata and link-local URLs are refused before any connection, names are
//! checked on the addresses they resolve to, the allow list wins over the
//! deny list, and a receiver's answer is never readable through the API.

mod api_support;
mod common;
mod receivers;

use std::collections::HashMap;
use std::time::Duration;

use api_support::Herald;
use common::{create, wait_for, TestNamespace};
use herald::core::status::{RecipientState, RecipientStatus, RunState, StepState, StepStatus};
use herald::operator::Operator;
use herald::resources::{Channel, RecipientPage, TriggerRun, User, Workflow};
use herald::settings::Settings;
use kube::ResourceExt;
use receivers::{HttpReceiver, Reply};
use serde_json::{json, Value};

/// Creates a Channel and waits until the operator's deliverer can see it.
async fn channel(ns: &TestNamespace, op: &Operator, name: &str, spec: Value) {
    create::<Channel>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": name}, "spec": spec})).await;
    wait_for(&format!("Channel {name} in herald's cache"), Duration::from_secs(20), || async { op.context.stores.channels.get(&ns.name, name).map(|_| ()) }).await;
}

/// Creates a User and waits until the operator's cache has it (a run started
/// before then would fail the recipient with RecipientNotFound).
async fn user(ns: &TestNamespace, op: &Operator, id: &str, spec: Value) {
    let mut spec = spec;
    spec["id"] = json!(id);
    create::<User>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id.replace('_', "-")}, "spec": spec})).await;
    wait_for(&format!("User {id} in herald's cache"), Duration::from_secs(20), || async { herald::controller::directory::user(&op.context.stores, &ns.name, id).map(|_| ()) })
        .await;
}

/// One http step through Channel `hooks`.
async fn workflow(ns: &TestNamespace, key: &str) {
    let steps = json!([{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{\"hello\": {{ recipient.id | json }}}"}}]);
    create::<Workflow>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": key}, "spec": {"key": key, "steps": steps}})).await;
}

/// Triggers `workflow` for `recipients` and returns each recipient's status once the run finished.
async fn run(ns: &TestNamespace, workflow: &str, recipients: &[&str]) -> (TriggerRun, HashMap<String, RecipientStatus>) {
    let created: TriggerRun = create(
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "run-"}, "spec": {"workflow": workflow, "recipients": recipients}}),
    )
    .await;
    let name = created.name_any();
    let api = ns.api::<TriggerRun>();
    let run = wait_for(&format!("TriggerRun {name} to finish"), Duration::from_secs(60), || async {
        let run = api.get(&name).await.ok()?;
        run.status.as_ref().filter(|s| s.state.is_finished())?;
        Some(run)
    })
    .await;
    let pages = ns.api::<RecipientPage>();
    // A small run keeps its records inline; a large one on pages.
    let mut out: HashMap<String, RecipientStatus> = run.status.as_ref().unwrap().recipients.iter().map(|r| (r.recipient.clone(), r.clone())).collect();
    for page in &run.status.as_ref().unwrap().pages {
        for r in pages.get(page).await.unwrap().status.unwrap_or_default().recipients {
            out.insert(r.recipient.clone(), r);
        }
    }
    (run, out)
}

fn step(r: &RecipientStatus) -> &StepStatus {
    r.steps.iter().find(|s| s.step_ref == "notify").unwrap_or_else(|| panic!("no step `notify` in {r:?}"))
}

/// Asserts the recipient failed at once (one attempt, no answer) with EgressDenied and this message.
#[track_caller]
fn assert_denied(r: &RecipientStatus, message: &str) {
    assert_eq!(r.state, RecipientState::Failed, "{r:?}");
    let s = step(r);
    assert_eq!((s.state, s.reason.as_deref(), s.attempts, s.status_code), (StepState::Failed, Some("EgressDenied"), Some(1), None), "{s:?}");
    assert_eq!(s.message.as_deref(), Some(message), "{s:?}");
}

/// A metric's value from the operator's /metrics text (0 when absent).
fn metric(op: &Operator, line_prefix: &str) -> f64 {
    op.context.metrics.render().lines().find(|l| l.starts_with(line_prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

fn settings(ns: &TestNamespace, deny: &str, allow: &str) -> Settings {
    let mut settings = Settings::for_namespace(&ns.name);
    settings.egress_deny_cidrs = deny.parse().expect("deny list");
    settings.egress_allow_cidrs = allow.parse().expect("allow list");
    settings
}

#[tokio::test]
async fn metadata_urls_are_refused_by_default_without_retries() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let op = common::operator(&client, &ns.name).await;
    // One attempt and a short timeout: were the policy missing, the run would
    // still end quickly (the address does not answer here), just not with EgressDenied.
    channel(&ns, &op, "hooks", json!({"type": "http", "url": "http://169.254.169.254/latest/meta-data/", "retry": {"maxAttempts": 1}, "timeoutSeconds": 2})).await;
    user(&ns, &op, "user_1", json!({"name": "Ann"})).await;
    // From a recipient's channel_data, which API callers write: the IPv4-mapped form.
    user(&ns, &op, "user_2", json!({"name": "Bob", "channelData": {"hooks": {"url": "http://[::ffff:169.254.169.254]/latest/meta-data/iam/"}}})).await;
    user(&ns, &op, "user_3", json!({"name": "Cy", "channelData": {"hooks": {"url": receiver.url("/fine")}}})).await;
    workflow(&ns, "wf").await;

    let (run, statuses) = run(&ns, "wf", &["user_1", "user_2", "user_3"]).await;
    assert_eq!(run.status.as_ref().unwrap().state, RunState::Failed);
    assert_denied(&statuses["user_1"], "169.254.169.254 is refused by the egress policy (default: cloud metadata)");
    assert_denied(&statuses["user_2"], "::ffff:169.254.169.254 is refused by the egress policy (default: cloud metadata)");
    // The others go on.
    assert_eq!(statuses["user_3"].state, RecipientState::Completed, "{:?}", statuses["user_3"]);
    assert_eq!(receiver.received_at("/fine").len(), 1);
    assert_eq!(metric(&op, "herald_deliveries_total{channel_type=\"http\",outcome=\"EgressDenied\"}"), 2.0);
}

#[tokio::test]
async fn names_are_checked_on_the_addresses_they_resolve_to() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let op = common::operator_with(&client, settings(&ns, "127.0.0.0/8,::1", "")).await;
    channel(&ns, &op, "hooks", json!({"type": "http"})).await;
    // `localhost` resolves to 127.0.0.1, where the receiver listens: refused
    // after resolution. The IP literal is refused before any connection.
    let port = receiver.addr.port();
    user(&ns, &op, "user_1", json!({"name": "Ann", "channelData": {"hooks": {"url": format!("http://localhost:{port}/by-name")}}})).await;
    user(&ns, &op, "user_2", json!({"name": "Bob", "channelData": {"hooks": {"url": format!("http://127.0.0.1:{port}/literal")}}})).await;
    workflow(&ns, "wf").await;

    let (_, statuses) = run(&ns, "wf", &["user_1", "user_2"]).await;
    assert_denied(&statuses["user_1"], "`localhost` resolves to 127.0.0.1, which is refused by the egress policy (--egress-deny-cidrs 127.0.0.0/8)");
    assert_denied(&statuses["user_2"], "127.0.0.1 is refused by the egress policy (--egress-deny-cidrs 127.0.0.0/8)");
    assert_eq!(receiver.arrived(), 0, "nothing reached the receiver");
    assert_eq!(metric(&op, "herald_deliveries_total{channel_type=\"http\",outcome=\"EgressDenied\"}"), 2.0);
}

#[tokio::test]
async fn the_allow_list_wins_over_the_deny_list() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let op = common::operator_with(&client, settings(&ns, "127.0.0.0/8,::1", "127.0.0.1/32")).await;
    channel(&ns, &op, "hooks", json!({"type": "http"})).await;
    let port = receiver.addr.port();
    user(&ns, &op, "user_1", json!({"name": "Ann", "channelData": {"hooks": {"url": format!("http://localhost:{port}/by-name")}}})).await;
    // 127.0.0.2 is loopback too, but only 127.0.0.1 is allowed.
    user(&ns, &op, "user_2", json!({"name": "Bob", "channelData": {"hooks": {"url": format!("http://127.0.0.2:{port}/other")}}})).await;
    workflow(&ns, "wf").await;

    let (_, statuses) = run(&ns, "wf", &["user_1", "user_2"]).await;
    let s = step(&statuses["user_1"]);
    assert_eq!((s.state, s.reason.as_deref(), s.status_code), (StepState::Completed, Some("Delivered"), Some(200)), "{s:?}");
    assert_eq!(receiver.received_at("/by-name").len(), 1);
    assert_denied(&statuses["user_2"], "127.0.0.2 is refused by the egress policy (--egress-deny-cidrs 127.0.0.0/8)");
}

#[tokio::test]
async fn the_api_does_not_echo_what_a_receiver_answered() {
    const SECRET: &str = "AKIA-internal-token-4242";
    let receiver = HttpReceiver::start().await;
    receiver.always("/reject", Reply::status(400).body(&format!("{{\"error\": \"bad request\", \"leaked\": \"{SECRET}\"}}")));
    let h = Herald::start().await;
    channel(&h.ns, h.op.as_ref().unwrap(), "hooks", json!({"type": "http"})).await;
    h.workflow("wf", json!({"steps": [{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{}"}}]})).await;
    // An API caller points its user's webhook wherever it likes...
    assert_eq!(h.call("PUT", "/v1/users/user_1", Some(json!({"name": "Ann"}))).await.status, 200);
    let data = h.call("PUT", "/v1/users/user_1/channel_data/hooks", Some(json!({"data": {"url": receiver.url("/reject")}}))).await;
    assert_eq!(data.status, 200, "{data:?}");
    h.cached(&["user_1"]).await;
    let wait_for_data = || async {
        let stores = &h.op.as_ref().unwrap().context.stores;
        let user = herald::controller::directory::user(stores, &h.ns.name, "user_1")?;
        user.channel_data.get("hooks").map(|_| ())
    };
    wait_for("user_1's channel_data in herald's cache", Duration::from_secs(20), wait_for_data).await;

    let trigger = h.call("POST", "/v1/workflows/wf/trigger", Some(json!({"recipients": ["user_1"]}))).await;
    assert_eq!(trigger.status, 200, "{trigger:?}");
    let run_id = trigger.body["workflow_run_id"].as_str().unwrap().to_string();
    let run = wait_for("the run to finish", Duration::from_secs(60), || async {
        let a = h.call("GET", &format!("/v1/workflow_runs/{run_id}"), None).await;
        (a.status == 200 && ["completed", "failed", "cancelled"].contains(&a.body["status"].as_str().unwrap_or_default())).then_some(a)
    })
    .await;
    assert_eq!(receiver.received_at("/reject").len(), 1, "the receiver was reached");
    let rr_id = run.body["recipient_runs"]["entries"][0]["id"].as_str().unwrap_or_else(|| panic!("{}", run.text)).to_string();
    let rr = h.call("GET", &format!("/v1/workflow_recipient_runs/{rr_id}"), None).await;
    assert_eq!(rr.status, 200, "{rr:?}");

    // ...and reads the code, never the answer.
    let s = &rr.body["steps"][0];
    assert_eq!((&s["reason"], &s["statusCode"], &s["attempts"]), (&json!("Rejected"), &json!(400), &json!(1)), "{}", rr.text);
    assert!(s["message"].as_str().unwrap_or_default().contains("HTTP 400"), "{}", rr.text);
    assert_eq!(rr.body["events"][0]["data"]["status_code"], 400, "{}", rr.text);
    assert!(!rr.text.contains(SECRET) && !rr.text.contains("bad request"), "the recipient run echoes the receiver's body: {}", rr.text);
    assert!(!run.text.contains(SECRET), "the workflow run echoes the receiver's body: {}", run.text);
    // Nor is it kept in status for kubectl readers (inline in a small run, or on pages).
    for page in h.api::<RecipientPage>().list(&Default::default()).await.unwrap().items {
        let text = serde_json::to_string(&page).unwrap();
        assert!(!text.contains(SECRET), "RecipientPage {} keeps the receiver's body: {text}", page.name_any());
    }
    for run in h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items {
        let text = serde_json::to_string(&run.status).unwrap();
        assert!(!text.contains(SECRET), "TriggerRun {} keeps the receiver's body: {text}", run.name_any());
    }
}
