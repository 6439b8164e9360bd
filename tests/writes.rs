//! What one trigger costs the Kubernetes API, counted from every request
//! herald sent (a recording client, against the real local control plane).
//!
//! Counted: every write (POST, PUT, PATCH, DELETE) herald makes from the
//! trigger request until the run is finished and its reconcile is over —
//! the TriggerRun's create by the API included, Events included. Not counted:
//! Lease renewals (one replica's, whatever the triggers), and what the test
//! itself writes (the Workflow, Channel and User, before counting starts).

mod api_support;
mod common;
mod receivers;

use std::time::Duration;

use api_support::{recording_client, Herald, RequestLog};
use common::{metric_value, wait_for};
use herald::core::status::{RecipientState, RunState};
use herald::resources::{Channel, RecipientPage, TriggerRun, User, Workflow};
use kube::api::PostParams;
use serde_json::json;

/// The writes a trigger may cost (issue 11): its TriggerRun, the recipient
/// run ids the API finds its records by (an annotation), one status write.
const MAX_WRITES: usize = 3;

fn is_write(method: &str) -> bool {
    matches!(method, "POST" | "PUT" | "PATCH" | "DELETE")
}

/// Writes not caused by triggers: the leader's Lease renewals.
fn per_trigger(uri: &str) -> bool {
    !uri.starts_with("/apis/coordination.k8s.io/")
}

fn writes(log: &RequestLog) -> Vec<(String, String)> {
    log.take().into_iter().filter(|(m, u)| is_write(m) && per_trigger(u)).collect()
}

/// A Channel to a receiver that answers 200, a one-step workflow, a user;
/// returns once herald's caches hold them (so their own writes are done).
async fn setup(h: &Herald, receiver: &receivers::HttpReceiver) {
    let channel: Channel =
        serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/")}}))
            .unwrap();
    h.api::<Channel>().create(&PostParams::default(), &channel).await.unwrap();
    h.workflow("ping", json!({"steps": [{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{\"to\": \"{{ recipient.id }}\"}"}}]})).await;
    let user: User = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "user-1"}, "spec": {"id": "user_1"}})).unwrap();
    h.api::<User>().create(&PostParams::default(), &user).await.unwrap();
    h.cached(&["user_1"]).await;
    // The Workflow's and Channel's own status writes come before counting.
    wait_for("the Workflow and Channel ready", Duration::from_secs(20), || async {
        let ready = |conditions: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>| {
            conditions.unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True")
        };
        let wf = h.api::<Workflow>().get("wf-ping").await.ok()?;
        let ch = h.api::<Channel>().get("hooks").await.ok()?;
        (ready(wf.status.map(|s| s.conditions)) && ready(ch.status.map(|s| s.conditions))).then_some(())
    })
    .await;
}

/// Waits until the run `uid` is finished and no reconcile is in flight: all
/// the writes its reconciles make (Events after status) are then recorded.
async fn finished(h: &Herald, uid: &str) -> TriggerRun {
    let run = wait_for("the run to finish", Duration::from_secs(30), || async {
        let runs = h.api::<TriggerRun>().list(&Default::default()).await.ok()?.items;
        runs.into_iter().find(|r| r.metadata.uid.as_deref() == Some(uid)).filter(|r| r.status.as_ref().is_some_and(|s| s.state.is_finished()))
    })
    .await;
    wait_for("herald's reconciles to end", Duration::from_secs(30), || async { (metric_value(&h.metrics().await, "herald_reconciles_in_flight") == 0.0).then_some(()) }).await;
    run
}

fn describe(writes: &[(String, String)]) -> String {
    writes.iter().map(|(m, u)| format!("  {m} {u}")).collect::<Vec<_>>().join("\n")
}

#[tokio::test]
async fn a_single_recipient_one_step_trigger_costs_at_most_three_writes() {
    let (client, log) = recording_client().await;
    let h = Herald::start_on(client, |_| {}).await;
    let receiver = receivers::HttpReceiver::start().await;
    setup(&h, &receiver).await;
    log.take();

    let a = h.call("POST", "/v1/workflows/ping/trigger", Some(json!({"recipients": ["user_1"]}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let uid = a.body["workflow_run_id"].as_str().unwrap().to_string();
    let run = finished(&h, &uid).await;
    let writes = writes(&log);

    let status = run.status.clone().unwrap();
    assert_eq!(status.state, RunState::Completed, "{status:#?}");
    assert_eq!(receiver.received().len(), 1, "delivered once");
    assert!(writes.len() <= MAX_WRITES, "{} writes for one trigger (at most {MAX_WRITES}):\n{}", writes.len(), describe(&writes));
    let created = |(m, u): &(String, String)| m == "POST" && u.split('?').next().is_some_and(|path| path.ends_with("/triggerruns"));
    assert!(writes.iter().any(created), "the count includes the TriggerRun's create:\n{}", describe(&writes));

    // The recipient's record is in the run itself, and every route reads it.
    assert_eq!(status.recipients.len(), 1, "{status:#?}");
    assert_eq!(status.recipients[0].state, RecipientState::Completed);
    assert!(status.pages.is_empty() && h.names::<RecipientPage>().await.is_empty(), "a small run needs no RecipientPage");
    let read = h.call("GET", &format!("/v1/workflow_runs/{uid}"), None).await;
    assert_eq!(read.status, 200, "{read:?}");
    let entries = read.body["recipient_runs"]["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), 1, "{read:?}");
    assert_eq!(entries[0]["recipient"], "user_1");
    assert_eq!(entries[0]["status"], "completed");
    let recipient_run_id = status.recipients[0].recipient_run_id.clone();
    let one = wait_for("the recipient run in the API's index", Duration::from_secs(10), || async {
        let a = h.call("GET", &format!("/v1/workflow_recipient_runs/{recipient_run_id}"), None).await;
        (a.status == 200).then_some(a)
    })
    .await;
    assert_eq!(one.body["workflow_run_id"], uid.as_str());
    assert_eq!(one.body["state"], "Completed");
    assert_eq!(one.body["steps"][0]["reason"], "Delivered");
}

#[tokio::test]
async fn a_failed_run_costs_one_write_more_its_warning_event() {
    let (client, log) = recording_client().await;
    let h = Herald::start_on(client, |_| {}).await;
    let receiver = receivers::HttpReceiver::start().await;
    receiver.always("/", receivers::Reply::status(400));
    setup(&h, &receiver).await;
    log.take();

    let a = h.call("POST", "/v1/workflows/ping/trigger", Some(json!({"recipients": ["user_1"]}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let uid = a.body["workflow_run_id"].as_str().unwrap().to_string();
    let run = finished(&h, &uid).await;
    let writes = writes(&log);
    assert_eq!(run.status.as_ref().unwrap().state, RunState::Failed);
    let events: Vec<&(String, String)> = writes.iter().filter(|(_, u)| u.contains("/events")).collect();
    assert_eq!(events.len(), 1, "one Warning Event for the failure:\n{}", describe(&writes));
    // The failure's Event is the one write over the budget of a run that succeeded.
    assert!(writes.len() <= MAX_WRITES + 1, "{} writes:\n{}", writes.len(), describe(&writes));
    let name = kube::ResourceExt::name_any(&run);
    let event = common::runs::wait_for_event(&h.ns, &name, "Warning", "RecipientsFailed").await;
    assert!(event.note.unwrap_or_default().contains("1 failed"));
}

/// A page is created with its recipients' run ids (what the API finds them
/// by) and its records are written once, when its recipients are done: two
/// writes a page, however many recipients it holds. (Its records were
/// written a first time as it was created, all Queued: a third write, about
/// a quarter of a fan-out's apiserver work.)
#[tokio::test]
async fn a_page_is_written_twice_created_then_its_records_once_done() {
    let (client, log) = recording_client().await;
    let h = Herald::start_on(client, |_| {}).await;
    let receiver = receivers::HttpReceiver::start().await;
    setup(&h, &receiver).await;
    log.take();

    // More recipients than a run keeps inline: one real User, the rest RecipientNotFound.
    let mut recipients = vec!["user_1".to_string()];
    recipients.extend((0..herald::core::status::INLINE_RECIPIENTS * 2).map(|i| format!("ghost_{i}")));
    let a = h.call("POST", "/v1/workflows/ping/trigger", Some(json!({"recipients": recipients}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let uid = a.body["workflow_run_id"].as_str().unwrap().to_string();
    let run = finished(&h, &uid).await;
    let writes = writes(&log);
    let status = run.status.clone().unwrap();
    assert_eq!(status.pages.len(), 1, "{status:#?}");
    assert_eq!(receiver.received().len(), 1, "delivered once");

    let page_writes: Vec<(String, String)> = writes.iter().filter(|(_, u)| u.contains("/recipientpages/")).cloned().collect();
    assert_eq!(page_writes.len(), 2, "the page's create and one save of its records:\n{}", describe(&page_writes));
    let page = h.api::<RecipientPage>().get(&status.pages[0]).await.unwrap();
    let records = page.status.unwrap().recipients;
    assert_eq!(records.len(), recipients.len());
    assert_eq!(records[0].state, RecipientState::Completed);
    assert!(records[1..].iter().all(|r| r.state == RecipientState::Failed && r.reason.as_deref() == Some("RecipientNotFound")), "{records:?}");
    // The API reads the saved records.
    let read = h.call("GET", &format!("/v1/workflow_runs/{uid}"), None).await;
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(read.body["recipient_runs"]["entries"].as_array().map(Vec::len), Some(recipients.len()), "{read:?}");
}
