//! Deliveries against the real local control plane and real receivers: an
//! HTTP server started in the test, a real SMTP server (aiosmtpd), and for the
//! crash test the real `herald` binary, killed with SIGKILL mid-run.

mod common;
mod receivers;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use common::{wait_for, TestNamespace};
use herald::core::status::{RecipientState, RecipientStatus, RunState, StepState};
use herald::resources::{Channel, RecipientPage, TriggerRun, User, Workflow};
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::ResourceExt;
use receivers::{HttpReceiver, Received, Reply, SmtpReceiver};
use serde_json::{json, Value};
use sha2::Sha256;

use common::create;
use common::runs::channel_ready;

async fn channel(ns: &TestNamespace, name: &str, spec: Value) {
    create::<Channel>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": name}, "spec": spec})).await;
}

async fn secret(ns: &TestNamespace, name: &str, data: Value) {
    create::<Secret>(ns, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data})).await;
}

async fn workflow(ns: &TestNamespace, key: &str, steps: Value) {
    create::<Workflow>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": key}, "spec": {"key": key, "steps": steps}})).await;
}

async fn user(ns: &TestNamespace, id: &str, spec: Value) {
    let mut spec = spec;
    spec["id"] = json!(id);
    create::<User>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id.replace('_', "-")}, "spec": spec})).await;
}

async fn trigger(ns: &TestNamespace, spec: Value) -> String {
    let run: TriggerRun = create(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "run-"}, "spec": spec})).await;
    run.name_any()
}

async fn finished(ns: &TestNamespace, name: &str, timeout: Duration) -> TriggerRun {
    let api = ns.api::<TriggerRun>();
    wait_for(&format!("TriggerRun {name} to finish"), timeout, || async {
        let run = api.get(name).await.ok()?;
        run.status.as_ref().filter(|s| s.state.is_finished())?;
        Some(run)
    })
    .await
}

async fn recipients(ns: &TestNamespace, run: &TriggerRun) -> HashMap<String, RecipientStatus> {
    let api = ns.api::<RecipientPage>();
    // A small run keeps its records inline; a large one on pages.
    let mut out: HashMap<String, RecipientStatus> = run.status.as_ref().unwrap().recipients.iter().map(|r| (r.recipient.clone(), r.clone())).collect();
    for page in &run.status.as_ref().unwrap().pages {
        for r in api.get(page).await.unwrap().status.unwrap_or_default().recipients {
            out.insert(r.recipient.clone(), r);
        }
    }
    out
}

fn run_state(run: &TriggerRun) -> RunState {
    run.status.as_ref().unwrap().state
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Verifies a request's signature the way a receiver would (see the README):
/// HMAC-SHA256 over `<X-Herald-Timestamp>.<raw body>`, and a recent timestamp.
fn verify_signature(key: &[u8], request: &Received) {
    let timestamp = request.header("X-Herald-Timestamp").expect("timestamp header");
    let signature = request.header("X-Herald-Signature").expect("signature header");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    assert_eq!(signature, format!("v1={}", hex(&mac.finalize().into_bytes())), "signature over {timestamp}.<body>");
    let sent: u64 = timestamp.parse().expect("unix seconds");
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    assert!(now.abs_diff(sent) < 120, "timestamp {sent} is recent (now {now})");
}

fn step<'a>(r: &'a RecipientStatus, step_ref: &str) -> &'a herald::core::status::StepStatus {
    r.steps.iter().find(|s| s.step_ref == step_ref).unwrap_or_else(|| panic!("no step `{step_ref}` in {r:?}"))
}

/// A metric's value from the operator's /metrics text (0 when absent).
fn metric(op: &herald::operator::Operator, line_prefix: &str) -> f64 {
    op.context.metrics.render().lines().find(|l| l.starts_with(line_prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn http_delivers_the_rendered_body_with_a_verifiable_signature() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let op = common::operator(&client, &ns.name).await;
    secret(&ns, "hooks-signing", json!({"signingKey": "s3cret-key"})).await;
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/default"), "secretRef": {"name": "hooks-signing"}})).await;
    user(&ns, "user_1", json!({"name": "Ann", "channelData": {"hooks": {"url": receiver.url("/ann")}}})).await;
    user(&ns, "user_2", json!({"name": "Bob"})).await;
    workflow(
        &ns,
        "incident",
        json!([{
            "ref": "page", "type": "channel", "channel": "hooks",
            "template": {
                "method": "POST",
                "url": "{{ recipient.channel_data.hooks.url }}",
                "headers": {"X-Team": "ops"},
                "body": "{\"text\": {{ recipient.name | append: \": \" | append: data.service | append: \" is down\" | json }}, \"data\": {{ data | json }}}"
            }
        }]),
    )
    .await;

    let data = json!({"service": "api \"v2\"", "severity": "high"});
    let name = trigger(&ns, json!({"workflow": "incident", "recipients": ["user_1", "user_2"], "data": data})).await;
    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Completed, "{:?}", run.status);
    let statuses = recipients(&ns, &run).await;

    // user_1's URL came from its channel_data; user_2 has none: the Channel's url.
    for (id, path, who) in [("user_1", "/ann", "Ann"), ("user_2", "/default", "Bob")] {
        let got = receiver.received_at(path);
        assert_eq!(got.len(), 1, "{path}: {got:?}");
        let request = &got[0];
        assert_eq!(request.method, "POST");
        assert_eq!(request.json(), json!({"text": format!("{who}: api \"v2\" is down"), "data": data}));
        assert_eq!(request.header("X-Team"), Some("ops"));
        assert_eq!(request.header("Content-Type"), Some("application/json"));
        let status = &statuses[id];
        assert_eq!(request.header("Idempotency-Key"), Some(format!("{}:page", status.recipient_run_id).as_str()));
        verify_signature(b"s3cret-key", request);
        let s = step(status, "page");
        assert_eq!((s.state, s.reason.as_deref(), s.attempts, s.status_code), (StepState::Completed, Some("Delivered"), Some(1), Some(200)), "{s:?}");
        assert!(s.message.as_deref().unwrap_or("").contains(path), "{s:?}");
    }

    let (reason, message) = channel_ready(&ns, "hooks", "True", Duration::from_secs(20)).await;
    assert_eq!(reason, "Ready");
    assert!(message.contains("signed with Secret `hooks-signing`"), "{message}");
    assert_eq!(metric(&op, "herald_deliveries_total{channel_type=\"http\",outcome=\"Delivered\"}"), 2.0);
}

#[tokio::test]
async fn chat_and_email_deliver() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let smtp = SmtpReceiver::start(Some(("mailer", "hunter2")));
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, "slack", json!({"type": "chat", "url": receiver.url("/slack")})).await;
    secret(&ns, "smtp-login", json!({"username": "mailer", "password": "hunter2"})).await;
    channel(
        &ns,
        "mail",
        json!({"type": "email", "from": "Herald <herald@example.com>",
        "smtp": {"host": "127.0.0.1", "port": smtp.port, "tls": "none"}, "secretRef": {"name": "smtp-login"}}),
    )
    .await;
    user(&ns, "user_1", json!({"name": "Ann", "email": "ann@example.com"})).await;
    workflow(
        &ns,
        "incident",
        json!([
            {"ref": "chat", "type": "channel", "channel": "slack", "template": {
                "text": "{{ data.service }} is down",
                "blocks": "[{\"type\": \"section\", \"text\": {\"type\": \"mrkdwn\", \"text\": {{ data.service | prepend: \"*\" | append: \"*\" | json }}}}]"
            }},
            {"ref": "mail", "type": "channel", "channel": "mail", "template": {
                "subject": "{{ data.service }} incident",
                "text": "Hello {{ recipient.name }}, {{ data.service }} is down.",
                "html": "<p>Hello <b>{{ recipient.name }}</b></p>"
            }}
        ]),
    )
    .await;

    let name = trigger(&ns, json!({"workflow": "incident", "recipients": ["user_1"], "data": {"service": "billing"}})).await;
    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    let statuses = recipients(&ns, &run).await;
    assert_eq!(run_state(&run), RunState::Completed, "{statuses:?}");
    let rrid = statuses["user_1"].recipient_run_id.clone();

    let chat = receiver.received_at("/slack");
    assert_eq!(chat.len(), 1);
    assert_eq!(chat[0].json(), json!({"text": "billing is down", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*billing*"}}]}));
    assert_eq!(chat[0].header("Idempotency-Key"), Some(format!("{rrid}:chat").as_str()));
    assert!(chat[0].header("X-Herald-Signature").is_none(), "no Secret, no signature");

    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let mail = &mails[0];
    assert!(mail.authenticated && mail.login.as_deref() == Some("mailer"), "logged in with the Secret's credentials: {mail:?}");
    assert_eq!(mail.mail_from, "herald@example.com");
    assert_eq!(mail.rcpt_tos, ["ann@example.com"]);
    assert_eq!(mail.header("Subject").as_deref(), Some("billing incident"));
    assert_eq!(mail.header("To").as_deref(), Some("ann@example.com"));
    assert_eq!(mail.header("Idempotency-Key"), Some(format!("{rrid}:mail")));
    assert!(mail.data.contains("Hello Ann, billing is down."), "{}", mail.data);
    assert!(mail.data.contains("<b>Ann</b>") && mail.data.contains("multipart/alternative"), "{}", mail.data);
    let s = step(&statuses["user_1"], "mail");
    assert_eq!((s.reason.as_deref(), s.attempts, s.status_code), (Some("Delivered"), Some(1), Some(250)), "{s:?}");

    let (_, message) = channel_ready(&ns, "mail", "True", Duration::from_secs(20)).await;
    assert!(message.contains(&format!("127.0.0.1:{}", smtp.port)), "{message}");
}

#[tokio::test]
async fn a_condition_skips_a_step() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/always")})).await;
    user(&ns, "user_1", json!({"name": "Ann"})).await;
    workflow(
        &ns,
        "alerts",
        json!([
            {"ref": "page", "type": "channel", "channel": "hooks", "conditions": [{"variable": "data.severity", "operator": "equal_to", "argument": "high"}],
             "template": {"url": receiver.url("/page"), "body": "page {{ data.severity }}"}},
            {"ref": "log", "type": "channel", "channel": "hooks", "template": {"body": "log {{ data.severity }}"}}
        ]),
    )
    .await;

    let low = trigger(&ns, json!({"workflow": "alerts", "recipients": ["user_1"], "data": {"severity": "low"}})).await;
    let run = finished(&ns, &low, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Completed);
    let r = &recipients(&ns, &run).await["user_1"];
    assert_eq!((step(r, "page").state, step(r, "page").reason.as_deref()), (StepState::Skipped, Some("ConditionNotMet")));
    assert_eq!(step(r, "log").state, StepState::Completed);
    assert!(receiver.received_at("/page").is_empty());
    assert_eq!(receiver.received_at("/always").len(), 1);

    let high = trigger(&ns, json!({"workflow": "alerts", "recipients": ["user_1"], "data": {"severity": "high"}})).await;
    let run = finished(&ns, &high, Duration::from_secs(60)).await;
    assert_eq!(step(&recipients(&ns, &run).await["user_1"], "page").state, StepState::Completed);
    let paged = receiver.received_at("/page");
    assert_eq!(paged.len(), 1);
    assert_eq!(String::from_utf8_lossy(&paged[0].body), "page high");
    assert_eq!(paged[0].header("Content-Type"), Some("text/plain; charset=utf-8"));
}

#[tokio::test]
async fn a_delay_survives_an_operator_restart_and_resumes_on_time() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let op = common::operator(&client, &ns.name).await;
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/after")})).await;
    user(&ns, "user_1", json!({"name": "Ann"})).await;
    workflow(
        &ns,
        "later",
        json!([
            {"ref": "wait", "type": "delay", "delay": {"duration": "8s"}},
            {"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{{ recipient.id }}"}}
        ]),
    )
    .await;
    let name = trigger(&ns, json!({"workflow": "later", "recipients": ["user_1"]})).await;

    // The wake time is in the saved status before anything is sent.
    let runs = ns.api::<TriggerRun>();
    let wake_at: jiff::Timestamp = wait_for("the delay's wakeAt in status", Duration::from_secs(30), || async {
        let status = runs.get(&name).await.ok()?.status?;
        // One recipient: its record is inline in the run.
        assert!(status.pages.is_empty(), "a one-recipient run has no pages");
        let r = status.recipients.into_iter().next()?;
        (r.state == RecipientState::Waiting).then_some(())?;
        r.wake_at?.parse().ok()
    })
    .await;
    // Killed while waiting (tasks dropped where they stand), down for 5s, started again.
    op.abort();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(receiver.received().is_empty(), "nothing is sent before the delay ends");
    let restarted = jiff::Timestamp::now();
    let _op = common::operator(&client, &ns.name).await;

    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Completed);
    let got = receiver.received();
    assert_eq!(got.len(), 1, "sent once: {got:?}");
    let sent_at = jiff::Timestamp::try_from(got[0].at).unwrap();
    let late = sent_at.duration_since(wake_at);
    // On time: not before wakeAt, and not a fresh 8s delay counted from the
    // restart (wakeAt is about 3s after it; the rest is slack for a slow start).
    assert!(late >= jiff::SignedDuration::from_millis(-50), "sent {late:?} before wakeAt");
    let after_restart = sent_at.duration_since(restarted);
    assert!(after_restart < jiff::SignedDuration::from_millis(6500), "sent {after_restart:?} after the restart: the delay started over");
    let r = &recipients(&ns, &run).await["user_1"];
    assert_eq!((step(r, "wait").state, step(r, "wait").reason.as_deref()), (StepState::Completed, Some("DelayElapsed")));
    assert_eq!(step(r, "notify").attempts, Some(1));
}

#[tokio::test]
async fn a_run_follows_its_workflow_as_accepted_when_the_workflow_is_edited_mid_run() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/hook")})).await;
    user(&ns, "user_1", json!({"name": "Ann"})).await;
    workflow(
        &ns,
        "edited",
        json!([
            {"ref": "wait", "type": "delay", "delay": {"duration": "3s"}},
            {"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "v1 {{ recipient.name }}"}}
        ]),
    )
    .await;
    let before = trigger(&ns, json!({"workflow": "edited", "recipients": ["user_1"]})).await;
    let runs = ns.api::<TriggerRun>();
    wait_for("the run to be waiting on its delay", Duration::from_secs(30), || async { (runs.get(&before).await.ok()?.status?.totals?.waiting == 1).then_some(()) }).await;

    // Edited while the run waits: a step inserted before `notify`, a new body.
    let edited = json!({"spec": {"steps": [
        {"ref": "wait", "type": "delay", "delay": {"duration": "3s"}},
        {"ref": "first", "type": "channel", "channel": "hooks", "template": {"body": "inserted"}},
        {"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "v2 {{ recipient.name }}"}}
    ]}});
    ns.api::<Workflow>().patch("edited", &PatchParams::default(), &Patch::Merge(&edited)).await.unwrap();
    let after = trigger(&ns, json!({"workflow": "edited", "recipients": ["user_1"]})).await;

    let run = finished(&ns, &before, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Completed);
    let snapshot = run.status.as_ref().unwrap().workflow_spec.clone().expect("the run records the workflow it was accepted with");
    assert_eq!(snapshot.generation, 1);
    let r = &recipients(&ns, &run).await["user_1"];
    assert_eq!(r.steps.iter().map(|s| s.step_ref.as_str()).collect::<Vec<_>>(), ["wait", "notify"], "the accepted steps, not the edited ones");
    let run = finished(&ns, &after, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Completed);
    assert_eq!(run.status.as_ref().unwrap().workflow_spec.as_ref().unwrap().generation, 2);

    let mut bodies: Vec<String> = receiver.received().iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    bodies.sort();
    assert_eq!(bodies, ["inserted", "v1 Ann", "v2 Ann"], "the first run sent v1 only; the run triggered after the edit sent the new steps");
}

#[tokio::test]
async fn a_receiver_failing_twice_then_succeeding_completes_with_three_attempts() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/flaky"), "retry": {"maxAttempts": 4, "initialBackoffMs": 100}})).await;
    user(&ns, "user_1", json!({"name": "Ann"})).await;
    workflow(&ns, "retry", json!([{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{\"n\": 1}"}}])).await;
    receiver.script("/flaky", vec![Reply::status(503).body("busy"), Reply::status(429).retry_after("1")]);

    let name = trigger(&ns, json!({"workflow": "retry", "recipients": ["user_1"]})).await;
    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Completed);
    let r = &recipients(&ns, &run).await["user_1"];
    let s = step(r, "notify");
    assert_eq!((s.state, s.attempts, s.status_code), (StepState::Completed, Some(3), Some(200)), "{s:?}");
    assert!(s.message.as_deref().unwrap_or("").contains("after 3 attempts"), "{s:?}");
    // Each attempt's outcome is recorded on the step.
    let history: Vec<(i32, Option<i32>, bool)> = s.attempt_history.iter().map(|a| (a.attempt, a.status_code, a.error.is_some())).collect();
    assert_eq!(history, [(1, Some(503), true), (2, Some(429), true), (3, Some(200), false)], "{s:?}");

    let got = receiver.received_at("/flaky");
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), [503, 429, 200]);
    let key = format!("{}:notify", r.recipient_run_id);
    assert!(got.iter().all(|g| g.header("Idempotency-Key") == Some(key.as_str())), "the same key on every attempt");
    let gap = got[2].at.duration_since(got[1].at).unwrap();
    assert!(gap >= Duration::from_millis(950), "Retry-After: 1 was honoured (waited {gap:?})");
}

#[tokio::test]
async fn permanent_failures_fail_the_step_at_once_with_the_code() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/gone"), "retry": {"initialBackoffMs": 50}})).await;
    receiver.always("/gone", Reply::status(422).body("no such hook"));
    user(&ns, "user_1", json!({"name": "Ann"})).await;
    // A URL from data that is not a URL fails that recipient alone, with a message.
    user(&ns, "user_2", json!({"name": "Bob", "channelData": {"hooks": {"url": "not a url"}}})).await;
    user(&ns, "user_3", json!({"name": "Cy", "channelData": {"hooks": {"url": receiver.url("/fine")}}})).await;
    workflow(&ns, "strict", json!([{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "x"}}])).await;

    let name = trigger(&ns, json!({"workflow": "strict", "recipients": ["user_1", "user_2", "user_3"]})).await;
    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Failed);
    let statuses = recipients(&ns, &run).await;

    let r = &statuses["user_1"];
    assert_eq!(r.state, RecipientState::Failed);
    let s = step(r, "notify");
    assert_eq!((s.state, s.reason.as_deref(), s.attempts, s.status_code), (StepState::Failed, Some("Rejected"), Some(1), Some(422)), "{s:?}");
    // The code, not the receiver's answer (which goes to herald's log only).
    assert!(s.message.as_deref().unwrap_or("").contains("HTTP 422") && !format!("{r:?}").contains("no such hook"), "{r:?}");
    assert_eq!(receiver.received_at("/gone").len(), 1, "a 4xx is not retried");

    let s = step(&statuses["user_2"], "notify");
    assert_eq!((s.reason.as_deref(), s.attempts), (Some("InvalidMessage"), Some(0)), "{s:?}");
    assert!(s.message.as_deref().unwrap_or("").contains("`not a url` is not a URL"), "{s:?}");

    assert_eq!(statuses["user_3"].state, RecipientState::Completed);
}

#[tokio::test]
async fn a_workflow_with_a_broken_template_is_not_ready_and_its_runs_fail_clearly() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/x")})).await;
    user(&ns, "user_1", json!({"name": "Ann"})).await;
    workflow(
        &ns,
        "broken",
        json!([
            {"ref": "fine", "type": "channel", "channel": "hooks", "template": {"body": "ok"}},
            {"ref": "page", "type": "channel", "channel": "hooks", "template": {"body": "{\"text\": {{ data.service | json }"}}
        ]),
    )
    .await;
    let api = ns.api::<Workflow>();
    let message = wait_for("Workflow Ready=False", Duration::from_secs(20), || async {
        let c = api.get("broken").await.ok()?.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")?;
        Some(c.message)
    })
    .await;
    assert!(message.contains("step `page` template.body"), "{message}");

    let name = trigger(&ns, json!({"workflow": "broken", "recipients": ["user_1"], "data": {"service": "api"}})).await;
    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Failed);
    let c = run.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Succeeded").unwrap();
    assert_eq!(c.reason, "WorkflowInvalid");
    assert!(c.message.contains("step `page` template.body"), "{}", c.message);
    assert!(receiver.received().is_empty(), "nothing is sent for a broken workflow, not even its good steps");
}

#[tokio::test]
async fn template_loops_are_bounded_per_workflow_and_per_recipient() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/stars")})).await;
    // Would allocate ten billion items before looping: refused when applied.
    workflow(&ns, "huge", json!([{"ref": "n", "type": "channel", "channel": "hooks", "template": {"body": "{% for i in (1..10000000000) %}*{% endfor %}"}}])).await;
    let api = ns.api::<Workflow>();
    let message = wait_for("Workflow huge Ready=False", Duration::from_secs(20), || async {
        let c = api.get("huge").await.ok()?.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")?;
        Some(c.message)
    })
    .await;
    assert!(message.contains("step `n` template.body: the range `(1..10000000000)` has 10000000000 items"), "{message}");

    // Sized by each recipient's data: checked before rendering, failing only that recipient.
    workflow(&ns, "stars", json!([{"ref": "n", "type": "channel", "channel": "hooks", "template": {"body": "{% for i in (1..data.stars) %}*{% endfor %}"}}])).await;
    let name = trigger(
        &ns,
        json!({"workflow": "stars", "data": {"stars": 3}, "recipients": [
            {"id": "modest", "name": "M"},
            {"id": "greedy", "name": "G", "$trigger_data": {"stars": 10000000000i64}}
        ]}),
    )
    .await;
    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    let by_id = recipients(&ns, &run).await;
    assert_eq!(by_id["modest"].state, RecipientState::Completed);
    assert_eq!(by_id["greedy"].state, RecipientState::Failed);
    let failed = step(&by_id["greedy"], "n");
    assert!(failed.message.as_deref().unwrap_or_default().contains("has 10000000000 items; at most 1000"), "{failed:?}");
    let bodies: Vec<String> = receiver.received().iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    assert_eq!(bodies, ["***"]);
}

#[tokio::test]
async fn channels_report_ready_with_a_message_naming_the_problem() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    channel(&ns, "no-smtp", json!({"type": "email", "from": "a@example.com"})).await;
    channel(&ns, "bad-url", json!({"type": "http", "url": "htp:/nowhere"})).await;
    channel(&ns, "no-secret", json!({"type": "http", "url": receiver.url("/s"), "secretRef": {"name": "missing"}})).await;
    secret(&ns, "wrong-keys", json!({"token": "x"})).await;
    channel(&ns, "no-key", json!({"type": "http", "url": receiver.url("/k"), "secretRef": {"name": "wrong-keys"}})).await;
    secret(&ns, "half-login", json!({"username": "u"})).await;
    channel(&ns, "no-password", json!({"type": "email", "smtp": {"host": "127.0.0.1", "port": 2525, "tls": "none"}, "secretRef": {"name": "half-login"}})).await;

    let wait = Duration::from_secs(20);
    let (reason, message) = channel_ready(&ns, "no-smtp", "False", wait).await;
    assert_eq!(reason, "InvalidConfig");
    assert!(message.contains("needs `smtp`"), "{message}");
    let (reason, message) = channel_ready(&ns, "bad-url", "False", wait).await;
    assert_eq!(reason, "InvalidConfig");
    assert!(message.contains("htp:/nowhere"), "{message}");
    let (reason, message) = channel_ready(&ns, "no-secret", "False", wait).await;
    assert_eq!((reason.as_str(), message.as_str()), ("SecretNotFound", "Secret `missing` not found"));
    let (reason, message) = channel_ready(&ns, "no-key", "False", wait).await;
    assert_eq!(reason, "SecretKeyMissing");
    assert!(message.contains("`signingKey`"), "{message}");
    let (reason, message) = channel_ready(&ns, "no-password", "False", wait).await;
    assert_eq!(reason, "SecretKeyMissing");
    assert!(message.contains("`password`"), "{message}");

    // Sending through a channel that is not ready fails the step with the same message, without an attempt.
    user(&ns, "user_1", json!({"name": "Ann"})).await;
    workflow(&ns, "wf", json!([{"ref": "notify", "type": "channel", "channel": "no-secret", "template": {"body": "x"}}])).await;
    let name = trigger(&ns, json!({"workflow": "wf", "recipients": ["user_1"]})).await;
    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    let s = step(&recipients(&ns, &run).await["user_1"], "notify").clone();
    assert_eq!((s.reason.as_deref(), s.attempts), (Some("ChannelNotReady"), Some(0)), "{s:?}");
    assert!(s.message.as_deref().unwrap_or("").contains("Secret `missing` not found"), "{s:?}");
    assert!(receiver.received().is_empty());

    // Fixing the Secret makes the channel Ready without touching it: herald looks again.
    let fixed: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "missing"}, "stringData": {"signingKey": "k"}})).unwrap();
    ns.api::<Secret>().patch("missing", &PatchParams::apply("herald-tests"), &Patch::Apply(&fixed)).await.unwrap();
    channel_ready(&ns, "no-secret", "True", Duration::from_secs(40)).await;
}

#[tokio::test]
async fn a_slow_receiver_does_not_hold_up_other_runs() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let mut settings = herald::settings::Settings::for_namespace(&ns.name);
    settings.run_concurrency = 4;
    let _op = common::operator_with(&client, settings).await;
    receiver.slow("/slow", Duration::from_millis(1500));
    channel(&ns, "slow", json!({"type": "http", "url": receiver.url("/slow")})).await;
    channel(&ns, "fast", json!({"type": "http", "url": receiver.url("/fast")})).await;
    let ids: Vec<String> = (0..40).map(|i| format!("user_{i:02}")).collect();
    for id in &ids {
        user(&ns, id, json!({"name": id})).await;
    }
    workflow(&ns, "to-slow", json!([{"ref": "n", "type": "channel", "channel": "slow", "template": {"body": "x"}}])).await;
    workflow(&ns, "to-fast", json!([{"ref": "n", "type": "channel", "channel": "fast", "template": {"body": "x"}}])).await;

    // 40 recipients, 4 at a time, 1.5s each: the slow run takes about 15s.
    let slow = trigger(&ns, json!({"workflow": "to-slow", "recipients": ids})).await;
    wait_for("the slow receiver to answer", Duration::from_secs(30), || async { (receiver.count() > 0).then_some(()) }).await;
    let started = std::time::Instant::now();
    let fast = trigger(&ns, json!({"workflow": "to-fast", "recipients": ids})).await;
    let fast_run = finished(&ns, &fast, Duration::from_secs(60)).await;
    let fast_took = started.elapsed();
    assert_eq!(run_state(&fast_run), RunState::Completed);
    let slow_run = ns.api::<TriggerRun>().get(&slow).await.unwrap();
    assert!(!run_state(&slow_run).is_finished(), "the fast run finished first ({fast_took:?}), while the slow one was still running");
    assert_eq!(run_state(&finished(&ns, &slow, Duration::from_secs(60)).await), RunState::Completed);
}

#[tokio::test]
async fn a_slow_recipient_holds_up_no_other_page_of_its_run() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let _op = common::operator(&client, &ns.name).await;
    // The first recipient's endpoint answers after 12 s; pages hold 500 recipients.
    receiver.slow("/user-0000", Duration::from_secs(12));
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/"), "timeoutSeconds": 60})).await;
    let url = receiver.url("/{{ recipient.id }}");
    workflow(&ns, "each", json!([{"ref": "n", "type": "channel", "channel": "hooks", "template": {"url": url, "body": "x"}}])).await;
    let ids: Vec<String> = (0..510).map(|i| format!("user-{i:04}")).collect();
    create_users(&ns, &ids).await;

    let name = trigger(&ns, json!({"workflow": "each", "recipients": ids})).await;
    let runs = ns.api::<TriggerRun>();
    let pages = ns.api::<RecipientPage>();
    wait_for("the second page to finish", Duration::from_secs(30), || async {
        let second = runs.get(&name).await.ok()?.status?.pages.get(1).cloned()?;
        let recipients = pages.get(&second).await.ok()?.status?.recipients;
        recipients.iter().all(|r| r.state == RecipientState::Completed).then_some(())
    })
    .await;
    assert!(receiver.received_at("/user-0000").is_empty(), "the second page waited for the slow recipient of the first");
    assert!(!run_state(&runs.get(&name).await.unwrap()).is_finished());
    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Completed);
    assert_eq!(run.status.as_ref().unwrap().totals.as_ref().unwrap().completed, 510);
}

/// Creates a User for each id (named after it), 16 at a time.
async fn create_users(ns: &TestNamespace, ids: &[String]) {
    let users = ns.api::<User>();
    futures::stream::iter(ids.iter())
        .for_each_concurrent(16, |id| {
            let users = users.clone();
            async move {
                let u: User = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id}, "spec": {"id": id}})).unwrap();
                users.create(&PostParams::default(), &u).await.expect("create user");
            }
        })
        .await;
}

/// A page always fits etcd's request limit (1.5 MiB), whatever its
/// recipients' deliveries recorded: here 500 recipients whose every delivery
/// fails 20 times with a long HTML error, about 3 MB recorded in full.
/// herald keeps the first and last attempts (with a count of the ones left
/// out) and shorter messages, and the run finishes.
#[tokio::test]
async fn a_page_of_500_recipients_retried_20_times_each_still_fits() {
    const N: usize = 500;
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    // `<`, `>` and `&` take 6 bytes each in what the apiserver stores (\u003c).
    receiver.always("/down", Reply::status(503).retry_after("0").body(&"<p>down for maintenance &amp; upgrades</p>".repeat(8)));
    let op = common::operator(&client, &ns.name).await;
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/down"), "retry": {"maxAttempts": 20, "initialBackoffMs": 1}})).await;
    workflow(&ns, "flood", json!([{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{}"}}])).await;
    let ids: Vec<String> = (0..N).map(|i| format!("user-{i:03}")).collect();
    create_users(&ns, &ids).await;
    wait_for("the users in herald's cache", Duration::from_secs(30), || async { (op.context.stores.users.len(&ns.name) == N).then_some(()) }).await;

    let name = trigger(&ns, json!({"workflow": "flood", "recipients": ids})).await;
    let run = finished(&ns, &name, Duration::from_secs(120)).await;
    assert_eq!(run_state(&run), RunState::Failed);
    assert_eq!(receiver.received_at("/down").len(), N * 20);
    let statuses = recipients(&ns, &run).await;
    assert_eq!(statuses.len(), N);
    for status in statuses.values() {
        let notify = step(status, "notify");
        assert_eq!((notify.reason.as_deref(), notify.attempts, notify.status_code), (Some("RetriesExhausted"), Some(20), Some(503)), "{status:?}");
        // The attempts listed and those left out add up; the first and the last are kept.
        let listed = notify.attempt_history.len() as i32;
        assert_eq!(listed + notify.omitted_attempts.unwrap_or(0), 20, "{notify:?}");
        if listed > 0 {
            assert_eq!(notify.attempt_history.first().map(|a| a.attempt), Some(1));
            assert_eq!(notify.attempt_history.last().map(|a| a.attempt), Some(20));
        }
    }
    for page in &run.status.as_ref().unwrap().pages {
        let stored = ns.api::<RecipientPage>().get(page).await.unwrap();
        let size = serde_json::to_string(&stored).unwrap().len();
        assert!(size < 1024 * 1024 + 64 * 1024, "page {page} is {size} bytes");
    }
}

#[tokio::test]
async fn sigterm_cuts_a_stuck_delivery_short_after_the_grace_and_the_next_leader_finishes_it() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    // Answers long after herald's shutdown grace (1 s), well within the channel's timeout.
    receiver.slow("/stuck", Duration::from_secs(30));
    channel(&ns, "stuck", json!({"type": "http", "url": receiver.url("/stuck"), "timeoutSeconds": 60})).await;
    workflow(&ns, "stuck", json!([{"ref": "notify", "type": "channel", "channel": "stuck", "template": {"body": "x"}}])).await;
    user(&ns, "ada", json!({})).await;

    let mut herald = common::HeraldProcess::start(&ns.name, &["--shutdown-grace-seconds", "1"]);
    let name = trigger(&ns, json!({"workflow": "stuck", "recipients": ["ada"]})).await;
    wait_for("the delivery to reach the receiver", Duration::from_secs(60), || async { (receiver.arrived() == 1).then_some(()) }).await;
    herald.sigterm();
    herald.exits_cleanly("herald to exit after its shutdown grace").await;
    assert!(herald.logs.lock().unwrap().iter().any(|l| l.contains("cutting them short")), "herald said it cut the reconcile short");
    assert!(!run_state(&ns.api::<TriggerRun>().get(&name).await.unwrap()).is_finished());

    // The next leader (at once: the Lease was released) delivers again: at least once.
    receiver.slow("/stuck", Duration::ZERO);
    let _next = common::HeraldProcess::start(&ns.name, &[]);
    let run = finished(&ns, &name, Duration::from_secs(60)).await;
    assert_eq!(run_state(&run), RunState::Completed);
    assert_eq!(receiver.arrived(), 2, "the attempt cut short, then the redelivery");
    let key = format!("{}:notify", recipients(&ns, &run).await["ada"].recipient_run_id);
    assert_eq!(receiver.received_at("/stuck").last().and_then(|r| r.header("Idempotency-Key")), Some(key.as_str()));
}

/// Kills the real `herald` binary with SIGKILL during a 1,000-recipient
/// fan-out and starts it again: every recipient is delivered at least once,
/// and every duplicate carries the same Idempotency-Key.
#[tokio::test]
async fn sigkill_during_a_fan_out_loses_no_recipient_and_duplicates_keep_their_key() {
    const N: usize = 1000;
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    // Slow enough that the run is well under way, not over, when it is killed.
    receiver.slow("/fan", Duration::from_millis(150));
    channel(&ns, "hooks", json!({"type": "http", "url": receiver.url("/fan")})).await;
    workflow(&ns, "fan", json!([{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{\"to\": {{ recipient.id | json }}}"}}])).await;
    let ids: Vec<String> = (0..N).map(|i| format!("user_{i:04}")).collect();
    let users = ns.api::<User>();
    futures::stream::iter(ids.iter())
        .for_each_concurrent(16, |id| {
            let users = users.clone();
            async move {
                let u: User =
                    serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id.replace('_', "-")}, "spec": {"id": id}})).unwrap();
                users.create(&PostParams::default(), &u).await.expect("create user");
            }
        })
        .await;

    let log = std::env::temp_dir().join(format!("herald-sigkill-{}.log", ns.name));
    let start = || {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["run", "--namespace", &ns.name, "--api-addr", "127.0.0.1:0"])
            .env("KUBECONFIG", common::kubeconfig())
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting herald")
    };
    let mut herald = start();
    let name = trigger(&ns, json!({"workflow": "fan", "recipients": ids})).await;
    wait_for("400 deliveries before the kill", Duration::from_secs(120), || async { (receiver.count() >= 400).then_some(()) }).await;
    // SIGKILL: no shutdown, no last write.
    herald.kill().expect("SIGKILL");
    herald.wait().unwrap();
    let before_kill = receiver.count();
    let progress = {
        let run = ns.api::<TriggerRun>().get(&name).await.unwrap();
        let mut saved = 0;
        for page in &run.status.unwrap().pages {
            saved += ns.api::<RecipientPage>().get(page).await.unwrap().status.unwrap_or_default().recipients.iter().filter(|r| r.state.is_finished()).count();
        }
        saved
    };

    let mut herald = start();
    let run = finished(&ns, &name, Duration::from_secs(180)).await;
    herald.kill().ok();
    herald.wait().ok();
    assert_eq!(run_state(&run), RunState::Completed, "log: {}", log.display());
    let statuses = recipients(&ns, &run).await;
    assert_eq!(statuses.len(), N);

    let got = receiver.received_at("/fan");
    let mut keys: HashMap<String, HashSet<String>> = HashMap::new();
    for request in &got {
        let to = request.json()["to"].as_str().unwrap().to_string();
        keys.entry(to).or_default().insert(request.header("Idempotency-Key").unwrap_or("").to_string());
    }
    for id in &ids {
        let status = &statuses[id];
        assert_eq!(status.state, RecipientState::Completed, "{status:?}");
        let expected = HashSet::from([format!("{}:notify", status.recipient_run_id)]);
        assert_eq!(keys.get(id), Some(&expected), "{id}: delivered, and every copy with its one key");
    }
    let duplicates = got.len() - N;
    println!(
        "SIGKILL fan-out: {N} recipients, {before_kill} delivered before the kill, {progress} saved as finished at the kill, \
         {} requests in all, {duplicates} duplicates (re-sent with the same Idempotency-Key)",
        got.len()
    );
    // Checkpoints every 100 recipients / 500 ms bound what a crash re-sends:
    // far fewer than the 400+ delivered before the kill.
    assert!(duplicates < 300, "{duplicates} duplicates");
    let _ = std::fs::remove_file(&log);
}

use futures::StreamExt;
