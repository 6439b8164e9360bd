//! The history store, against a real PostgreSQL (scripts/test.sh starts one;
//! each test makes its own database) and the local control plane: messages
//! recorded as deliveries happen and read back through Knock's Messages API.

mod api_support;
mod common;
mod receivers;

use std::time::Duration;

use api_support::Herald;
use common::wait_for;
use herald::resources::{Channel, TriggerRun};
use kube::api::PostParams;
use receivers::{HttpReceiver, Reply};
use serde_json::{json, Value};

/// herald with a history store in a database of its own.
async fn herald_with_history() -> Herald {
    let url = common::database().await;
    Herald::start_with(move |s| s.database_url = Some(url)).await
}

async fn channel(h: &Herald, name: &str, url: &str, max_attempts: i32) {
    let channel: Channel = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": name},
        "spec": {"type": "http", "url": url, "retry": {"maxAttempts": max_attempts, "initialBackoffMs": 10}},
    }))
    .unwrap();
    h.api::<Channel>().create(&PostParams::default(), &channel).await.expect("creating a Channel");
}

/// Triggers `workflow` through the API; the workflow run id.
async fn trigger(h: &Herald, workflow: &str, body: Value) -> String {
    let a = h.call("POST", &format!("/v1/workflows/{workflow}/trigger"), Some(body)).await;
    assert_eq!(a.status, 200, "{a:?}");
    a.body["workflow_run_id"].as_str().unwrap().to_string()
}

/// Waits until the run with this id is finished in the cluster.
async fn finished(h: &Herald, run_id: &str) {
    wait_for("the run to finish", Duration::from_secs(60), || async {
        let runs = h.api::<TriggerRun>().list(&Default::default()).await.ok()?;
        let run = runs.items.into_iter().find(|r| r.status.as_ref().and_then(|s| s.workflow_run_id.as_deref()) == Some(run_id))?;
        run.status.as_ref().and_then(|s| s.completion_time.as_ref()).map(|_| ())
    })
    .await;
}

/// Lists messages until `count` are there (the writer batches, so they land a moment after the run).
async fn messages(h: &Herald, query: &str, count: usize) -> Value {
    wait_for(&format!("{count} messages for {query}"), Duration::from_secs(20), || async {
        let a = h.call("GET", &format!("/v1/messages?{query}"), None).await;
        assert_eq!(a.status, 200, "{a:?}");
        (a.body["items"].as_array().map(Vec::len) == Some(count)).then_some(a.body)
    })
    .await
}

#[tokio::test]
async fn messages_are_recorded_with_statuses_and_attempts() {
    let h = herald_with_history().await;
    let receiver = HttpReceiver::start().await;
    receiver.script("/flaky", vec![Reply::status(503), Reply::status(200)]);
    receiver.always("/down", Reply::status(500));
    channel(&h, "flaky", &receiver.url("/flaky"), 3).await;
    channel(&h, "down", &receiver.url("/down"), 2).await;
    h.workflow(
        "alert",
        json!({"steps": [
            {"ref": "first", "type": "channel", "channel": "flaky", "template": {"body": "{\"to\": \"{{ recipient.id }}\", \"n\": {{ data.n }}}"}},
            {"ref": "second", "type": "channel", "channel": "down", "template": {"body": "{}"}},
        ]}),
    )
    .await;
    // A Channel that is not ready (not an http URL): its messages are never attempted.
    channel(&h, "broken", "ftp://example.invalid/hook", 2).await;
    h.workflow("ghost", json!({"steps": [{"ref": "nowhere", "type": "channel", "channel": "broken", "template": {"body": "{}"}}]})).await;

    let run = trigger(&h, "alert", json!({"recipients": [{"id": "u1", "name": "U1"}], "data": {"n": 7}, "tenant": "acme", "actor": "boss"})).await;
    finished(&h, &run).await;
    let ghost = trigger(&h, "ghost", json!({"recipients": [{"id": "u2", "name": "U2"}]})).await;
    finished(&h, &ghost).await;

    // Both of u1's channel steps are messages: the first sent after a retry, the second undelivered.
    let body = messages(&h, &format!("workflow_run_id={run}"), 2).await;
    let items = body["items"].as_array().unwrap();
    let by_step = |step: &str| items.iter().find(|m| m["source"]["step_ref"] == step).unwrap_or_else(|| panic!("no message of step {step}: {body:#}")).clone();
    let first = by_step("first");
    assert_eq!(first["__typename"], "Message");
    assert_eq!(first["status"], "sent", "{first:#}");
    assert_eq!(first["recipient"], "u1");
    assert_eq!(first["channel_id"], "flaky");
    assert_eq!(first["workflow"], "alert");
    assert_eq!(first["tenant"], "acme");
    assert_eq!(first["actors"], json!(["boss"]));
    assert_eq!(first["data"]["n"], 7);
    assert_eq!(first["content"]["body"], "{\"to\": \"u1\", \"n\": 7}");
    let attempts = first["attempts"].as_array().unwrap();
    assert_eq!(attempts.iter().map(|a| a["status_code"].as_i64()).collect::<Vec<_>>(), vec![Some(503), Some(200)], "{first:#}");
    let second = by_step("second");
    assert_eq!(second["status"], "undelivered", "{second:#}");
    assert_eq!(second["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(second["metadata"]["workflow_run_id"], run);

    // A message never attempted is not_sent.
    let body = messages(&h, &format!("workflow_run_id={ghost}"), 1).await;
    assert_eq!(body["items"][0]["status"], "not_sent", "{body:#}");
    assert_eq!(body["items"][0]["reason"], "ChannelNotReady");

    // Filters.
    messages(&h, "status=sent", 1).await;
    messages(&h, "status[]=undelivered&status[]=not_sent", 2).await;
    messages(&h, "channel_id=down", 1).await;
    messages(&h, "tenant=acme", 2).await;
    messages(&h, "source=ghost", 1).await;
    let recipient_run = first["metadata"]["workflow_recipient_run_id"].as_str().unwrap().to_string();
    messages(&h, &format!("workflow_recipient_run_id={recipient_run}"), 2).await;
    messages(&h, "inserted_at.gte=2000-01-01T00:00:00Z", 3).await;
    messages(&h, "inserted_at.lt=2000-01-01T00:00:00Z", 0).await;
    let a = h.call("GET", "/v1/messages?status=lost&page_size=500", None).await;
    a.assert_error(422, "invalid_params");
    assert_eq!(a.fields(), vec!["status", "page_size"]);

    // By recipient, and one by id.
    let a = h.call("GET", "/v1/users/u2/messages", None).await;
    assert_eq!(a.body["items"].as_array().map(Vec::len), Some(1), "{a:?}");
    let id = first["id"].as_str().unwrap();
    let a = h.call("GET", &format!("/v1/messages/{id}"), None).await;
    assert_eq!((a.status, &a.body["status"]), (200, &json!("sent")), "{a:?}");
    h.call("GET", &format!("/v1/messages/{}", uuid::Uuid::new_v4()), None).await.assert_error(404, "resource_missing");
    h.call("GET", "/v1/messages/not-a-uuid", None).await.assert_error(422, "invalid_params");

    // Cursor pages: one at a time, newest first, and back.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(c) => format!("/v1/messages?page_size=1&after={c}"),
            None => "/v1/messages?page_size=1".to_string(),
        };
        let a = h.call("GET", &path, None).await;
        assert_eq!(a.status, 200, "{a:?}");
        seen.extend(a.body["items"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()));
        match a.body["page_info"]["after"].as_str() {
            Some(c) => after = Some(c.to_string()),
            None => break,
        }
        assert!(seen.len() <= 3, "pages go on past the messages: {seen:?}");
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let all = messages(&h, "", 3).await;
    let ids: Vec<String> = all["items"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(seen, ids, "pages follow the list's order");
    let last_cursor = all["items"][2]["__cursor"].as_str().unwrap();
    let a = h.call("GET", &format!("/v1/messages?before={last_cursor}"), None).await;
    let before: Vec<&str> = a.body["items"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(before, ids[..2].iter().map(String::as_str).collect::<Vec<_>>(), "{a:?}");
}

#[tokio::test]
async fn without_a_database_the_messages_api_says_so() {
    let h = Herald::start().await;
    h.call("GET", "/v1/messages", None).await.assert_error(404, "history_store_disabled");
}
