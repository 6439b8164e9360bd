//! The in-app feed (issue 12): an `in_app_feed` Channel stores each message
//! in the history store (real PostgreSQL), and Knock's feed and engagement
//! routes read and change them.

mod api_support;
mod common;
mod receivers;

use std::time::Duration;

use api_support::Herald;
use common::wait_for;
use herald::resources::{Channel, User, Workflow};
use receivers::HttpReceiver;
use serde_json::{json, Value};

/// herald with a history store, an in-app Channel `feed`, users and a workflow `comment` with one in-app step.
async fn feed_herald() -> Herald {
    let h = Herald::start_with_history().await;
    h.create::<Channel>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "feed"}, "spec": {"type": "in_app_feed"}})).await;
    for (name, id, display) in [("jane", "jane", "Jane Doe"), ("u1", "u1", "User One"), ("u2", "u2", "User Two")] {
        h.create::<User>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": name}, "spec": {"id": id, "name": display, "properties": {"avatar": "https://img.example/a.png"}}})).await;
    }
    h.cached(&["jane", "u1", "u2"]).await;
    wait_for("the Channel in herald's cache", Duration::from_secs(20), || async { h.op.as_ref().unwrap().context.stores.channels.get(&h.ns.name, "feed").map(|_| ()) }).await;
    h.workflow(
        "comment",
        json!({"categories": ["collaboration"], "steps": [{"ref": "in_app", "type": "channel", "channel": "feed",
            "template": {"markdownBody": "**{{ actor.name }}** commented on {{ data.page }}: {{ data.text }}", "actionUrl": "https://app.example/p/{{ data.page }}"}}]}),
    )
    .await;
    h
}

async fn trigger(h: &Herald, body: Value) -> String {
    let a = h.call("POST", "/v1/workflows/comment/trigger", Some(body)).await;
    assert_eq!(a.status, 200, "{a:?}");
    let run = a.body["workflow_run_id"].as_str().unwrap().to_string();
    h.wait_finished(&run).await;
    run
}

async fn feed(h: &Herald, user: &str, query: &str) -> Value {
    let a = h.call("GET", &format!("/v1/users/{user}/feeds/feed?{query}"), None).await;
    assert_eq!(a.status, 200, "{a:?}");
    a.body
}

fn counts(body: &Value) -> (i64, i64, i64) {
    let m = &body["meta"];
    (m["total_count"].as_i64().unwrap(), m["unread_count"].as_i64().unwrap(), m["unseen_count"].as_i64().unwrap())
}

#[tokio::test]
async fn in_app_messages_reach_the_feed_with_counts_filters_and_engagement() {
    let h = feed_herald().await;
    trigger(&h, json!({"recipients": ["u1", "u2"], "actor": "jane", "data": {"page": "p1", "text": "<script>alert(1)</script>", "n": 1, "nested": {"x": 1}}})).await;
    trigger(&h, json!({"recipients": ["u1"], "actor": "jane", "tenant": "acme", "data": {"page": "p2", "text": "second", "n": 2}})).await;
    trigger(&h, json!({"recipients": ["u1"], "actor": "jane", "data": {"page": "p3", "text": "third", "n": 3}})).await;

    // The feed, newest first, as Knock shapes it.
    let body = feed(&h, "u1", "mode=compact").await;
    assert_eq!(counts(&body), (3, 3, 3), "{body:#}");
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["data"]["page"], "p3", "newest first");
    let oldest = &entries[2];
    assert_eq!(oldest["__typename"], "FeedItem");
    assert!(oldest["__cursor"].is_string());
    let body_block = &oldest["blocks"][0];
    assert_eq!(body_block["name"], "body");
    assert_eq!(body_block["content"], "**Jane Doe** commented on p1: <script>alert(1)</script>");
    let html = body_block["rendered"].as_str().unwrap();
    assert!(html.starts_with("<p><strong>Jane Doe</strong> commented on p1: ") && html.contains("&lt;script&gt;") && !html.contains("<script"), "{html}");
    assert_eq!(oldest["blocks"][1], json!({"type": "text", "name": "action_url", "content": "https://app.example/p/p1", "rendered": "https://app.example/p/p1"}));
    assert_eq!(oldest["actors"][0]["name"], "Jane Doe");
    assert_eq!(oldest["actors"][0]["avatar"], "https://img.example/a.png");
    assert_eq!(oldest["source"]["key"], "comment");
    assert_eq!(oldest["source"]["categories"], json!(["collaboration"]));
    assert!(oldest["data"].get("nested").is_none(), "compact mode keeps scalar data only: {}", oldest["data"]);
    assert_eq!(oldest["read_at"], Value::Null);

    // The same feed by the Channel's uid (Knock's feed ids are UUIDs).
    let uid = h.api::<Channel>().get("feed").await.unwrap().metadata.uid.unwrap();
    let a = h.call("GET", &format!("/v1/users/u1/feeds/{uid}"), None).await;
    assert_eq!(a.body["entries"].as_array().map(Vec::len), Some(3), "{a:?}");
    h.call("GET", "/v1/users/u1/feeds/no-such-feed", None).await.assert_error(404, "resource_missing");
    assert_eq!(counts(&feed(&h, "nobody", "").await), (0, 0, 0), "an unknown user has an empty feed");

    // Filters.
    assert_eq!(feed(&h, "u1", "tenant=acme").await["entries"].as_array().unwrap().len(), 3, "a tenant's items and those without one");
    assert_eq!(feed(&h, "u1", "tenant=acme&has_tenant=true").await["entries"].as_array().unwrap().len(), 1);
    assert_eq!(feed(&h, "u1", "source=other").await["entries"].as_array().unwrap().len(), 0);
    assert_eq!(feed(&h, "u1", "workflow_categories[]=collaboration").await["entries"].as_array().unwrap().len(), 3);
    assert_eq!(feed(&h, "u1", "trigger_data=%7B%22n%22%3A2%7D").await["entries"].as_array().unwrap().len(), 1);
    h.call("GET", "/v1/users/u1/feeds/feed?status=new", None).await.assert_error(422, "invalid_params");

    // Pages.
    let first = feed(&h, "u1", "page_size=2").await;
    assert_eq!(first["entries"].as_array().unwrap().len(), 2);
    let after = first["page_info"]["after"].as_str().expect("an after cursor").to_string();
    let second = feed(&h, "u1", &format!("page_size=2&after={after}")).await;
    assert_eq!(second["entries"][0]["data"]["page"], "p1");
    assert_eq!(second["page_info"]["after"], Value::Null);

    // Engagement: each status changes the counts at once.
    let id = |e: &Value| e["id"].as_str().unwrap().to_string();
    let (newest, middle, old) = (id(&entries[0]), id(&entries[1]), id(&entries[2]));
    let a = h.call("PUT", &format!("/v1/messages/{newest}/seen"), None).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["engagement_statuses"], json!(["seen"]));
    assert_eq!(a.body["status"], "delivered");
    assert_eq!(counts(&feed(&h, "u1", "").await), (3, 3, 2));
    h.call("PUT", &format!("/v1/messages/{newest}/read"), None).await;
    assert_eq!(counts(&feed(&h, "u1", "").await), (3, 2, 2));
    assert_eq!(feed(&h, "u1", "status=unread").await["entries"].as_array().unwrap().len(), 2);
    assert_eq!(feed(&h, "u1", "status=read").await["entries"][0]["id"], newest.as_str());
    h.call("DELETE", &format!("/v1/messages/{newest}/read"), None).await;
    assert_eq!(counts(&feed(&h, "u1", "").await), (3, 3, 2), "unread again");
    let a = h.call("POST", "/v1/messages/batch/archived", Some(json!({"message_ids": [middle, old]}))).await;
    assert_eq!(a.body.as_array().map(Vec::len), Some(2), "{a:?}");
    assert_eq!(counts(&feed(&h, "u1", "").await), (1, 1, 0));
    assert_eq!(feed(&h, "u1", "archived=only").await["entries"].as_array().unwrap().len(), 2);
    let a = h.call("PUT", &format!("/v1/messages/{newest}/interacted"), Some(json!({"metadata": {"type": "cell_click"}}))).await;
    assert!(a.body["interacted_at"].is_string(), "{a:?}");
    assert!(a.body["read_at"].is_string() && a.body["seen_at"].is_string(), "a click is a read, as Knock's client takes it: {a:?}");
    h.call("PUT", &format!("/v1/messages/{newest}/deleted"), None).await.assert_error(404, "route_not_found");
    h.call("PUT", &format!("/v1/messages/{}/seen", uuid::Uuid::new_v4()), None).await.assert_error(404, "resource_missing");

    // Mark all as read for u2 (the client's markAllAsRead).
    assert_eq!(counts(&feed(&h, "u2", "").await), (1, 1, 1));
    let a = h.call("POST", "/v1/channels/feed/messages/bulk/read", Some(json!({"user_ids": ["u2"], "archived": "exclude"}))).await;
    assert_eq!((a.status, &a.body["status"], &a.body["success_count"]), (200, &json!("completed"), &json!(1)), "{a:?}");
    assert_eq!(counts(&feed(&h, "u2", "").await), (1, 0, 1));

    // The Messages API sees feed messages too, delivered.
    let a = h.call("GET", "/v1/users/u1/messages", None).await;
    assert!(a.body["items"].as_array().unwrap().iter().all(|m| m["status"] == "delivered"), "{a:?}");
}

#[tokio::test]
async fn without_a_history_store_in_app_steps_are_not_ready() {
    let h = Herald::start().await;
    h.create::<Channel>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "feed"}, "spec": {"type": "in_app_feed"}})).await;
    wait_for("the Channel in herald's cache", Duration::from_secs(20), || async { h.op.as_ref().unwrap().context.stores.channels.get(&h.ns.name, "feed").map(|_| ()) }).await;
    h.create::<Workflow>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "comment"},
               "spec": {"key": "comment", "steps": [{"ref": "in_app", "type": "channel", "channel": "feed", "template": {"markdownBody": "hi"}}]}}))
        .await;
    let ready = wait_for("the Workflow's Ready condition", Duration::from_secs(30), || async {
        let w = h.api::<Workflow>().get("comment").await.ok()?;
        w.status?.conditions.into_iter().find(|c| c.type_ == "Ready")
    })
    .await;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "HistoryStoreRequired"), "{ready:?}");
    assert!(ready.message.contains("--database-url") && ready.message.contains("in_app"), "{}", ready.message);
    h.call("GET", "/v1/users/u1/feeds/feed", None).await.assert_error(404, "history_store_disabled");
}

/// Knock's pattern: in-app first, then after a delay a webhook only for those
/// who have not seen the in-app message (`refs.in_app.engagement_status not_contains $message.seen`).
#[tokio::test]
async fn a_later_step_sees_whether_the_in_app_message_was_seen() {
    let h = feed_herald().await;
    let receiver = HttpReceiver::start().await;
    h.create::<Channel>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/hook")}}))
        .await;
    wait_for("the hooks Channel in herald's cache", Duration::from_secs(20), || async { h.op.as_ref().unwrap().context.stores.channels.get(&h.ns.name, "hooks").map(|_| ()) })
        .await;
    h.workflow(
        "nudge",
        json!({"steps": [
            {"ref": "in_app", "type": "channel", "channel": "feed", "template": {"markdownBody": "You have a comment"}},
            {"ref": "wait", "type": "delay", "delay": {"duration": "15s"}},
            {"ref": "fallback", "type": "channel", "channel": "hooks", "template": {"body": "{\"to\": \"{{ recipient.id }}\"}"},
             "conditions": [{"variable": "refs.in_app.engagement_status", "operator": "not_contains", "argument": "$message.seen"}]},
        ]}),
    )
    .await;
    let a = h.call("POST", "/v1/workflows/nudge/trigger", Some(json!({"recipients": ["u1", "u2"]}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let run = a.body["workflow_run_id"].as_str().unwrap().to_string();
    // u1 sees the message during the delay (15 s: room for a loaded machine); u2 does not.
    let item = wait_for("u1's feed message", Duration::from_secs(30), || async {
        let body = feed(&h, "u1", "").await;
        body["entries"].as_array()?.first().cloned()
    })
    .await;
    let a = h.call("PUT", &format!("/v1/messages/{}/seen", item["id"].as_str().unwrap()), None).await;
    assert_eq!(a.status, 200, "{a:?}");
    h.wait_finished(&run).await;
    let bodies: Vec<String> = receiver.received().iter().map(|r| String::from_utf8_lossy(&r.body).to_string()).collect();
    assert_eq!(bodies, vec!["{\"to\": \"u2\"}".to_string()], "only the recipient who had not seen it");
}

/// Preferences apply to in-app steps (`channel_types.in_app_feed`).
#[tokio::test]
async fn a_user_who_opted_out_of_in_app_gets_no_feed_message() {
    let h = feed_herald().await;
    h.create::<User>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "quiet"},
               "spec": {"id": "quiet", "name": "Quiet", "preferences": {"default": {"channel_types": {"in_app_feed": false}}}}}))
        .await;
    h.cached(&["quiet"]).await;
    let run = trigger(&h, json!({"recipients": ["u1", "quiet"], "actor": "jane", "data": {"page": "p1", "text": "hi"}})).await;
    assert_eq!(counts(&feed(&h, "u1", "").await), (1, 1, 1));
    assert_eq!(counts(&feed(&h, "quiet", "").await), (0, 0, 0), "opted out");
    let a = h.call("GET", &format!("/v1/workflow_runs/{run}"), None).await;
    let quiet = a.body["recipient_runs"]["entries"].as_array().unwrap().iter().find(|e| e["recipient"] == "quiet").cloned().unwrap();
    assert_eq!(quiet["state"], "Skipped", "{quiet:#}");
}
