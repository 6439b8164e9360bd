//! The Knock-compatible HTTP API against the real local control plane, over
//! real HTTP to an in-process operator: every route, every error, idempotency,
//! limits and the HTTP plumbing. Authentication has its own file (api_auth.rs),
//! and so does the bad-input corpus (api_corpus.rs).

mod api_support;
mod common;

use std::time::Duration;

use api_support::{delay_workflow, json_headers, resource_counts, Herald, Proxy};
use common::{wait_for, TestNamespace};
use herald::resources::{Audience, Cancellation, MemberSlice, Object, Tenant, TriggerRun, User};
use kube::api::{ListParams, PostParams};
use kube::ResourceExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits until the run with this id has finished, through the API.
async fn finished_run(h: &Herald, run_id: &str) -> Value {
    wait_for(&format!("run {run_id} to finish"), Duration::from_secs(60), || async {
        let a = h.call("GET", &format!("/v1/workflow_runs/{run_id}"), None).await;
        assert_eq!(a.status, 200, "{a:?}");
        ["completed", "failed", "cancelled"].contains(&a.body["status"].as_str().unwrap_or_default()).then_some(a.body)
    })
    .await
}

#[tokio::test]
async fn trigger_stores_a_run_whose_uid_is_the_workflow_run_id() {
    let h = Herald::start().await;
    h.workflow("welcome", delay_workflow("1s")).await;
    assert_eq!(h.call("PUT", "/v1/users/user_1", Some(json!({"name": "One"}))).await.status, 200);
    assert_eq!(h.call("PUT", "/v1/objects/projects/p1", Some(json!({"name": "P1"}))).await.status, 200);
    h.cached(&["user_1", "projects/p1"]).await;
    let body = json!({
        "recipients": ["user_1", {"id": "user_2", "name": "Two", "email": "two@example.com"}, {"id": "p1", "collection": "projects"}],
        "actor": "user_1",
        "data": {"message": "hi", "nested": {"n": [1, 2, 3]}},
        "cancellation_key": "ck-1",
        "tenant": "acme",
    });
    let a = h.call("POST", "/v1/workflows/welcome/trigger", Some(body.clone())).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.header("idempotent-replayed").is_none());
    let keys: Vec<&String> = a.body.as_object().unwrap().keys().collect();
    assert_eq!(keys, vec!["workflow_run_id"], "Knock's response shape");
    let run_id = a.body["workflow_run_id"].as_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&run_id).unwrap().get_version_num(), 4);

    // Acknowledged after persist: the run is there now, with the request as its spec.
    let runs = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items;
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run.uid().as_deref(), Some(run_id.as_str()));
    assert_eq!(run.spec.workflow, "welcome");
    assert_eq!(json!(run.spec.recipients), body["recipients"]);
    assert_eq!(run.spec.actor, Some(json!("user_1")));
    assert_eq!(json!(run.spec.data), body["data"]);
    assert_eq!(run.spec.cancellation_key.as_deref(), Some("ck-1"));
    assert_eq!(run.spec.tenant, Some(json!("acme")));
    assert_eq!(run.labels().get("app.kubernetes.io/created-by").map(String::as_str), Some("herald-api"));
    assert!(run.annotations().get("herald.dev/api-caller").unwrap().starts_with("apikey:"));

    // The run goes on as any TriggerRun, and the API reads its outcome.
    let outcome = finished_run(&h, &run_id).await;
    assert_eq!(outcome["id"], run_id.as_str());
    assert_eq!(outcome["workflow"], "welcome");
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(outcome["tenant"], "acme");
    assert_eq!(outcome["actor"], "user_1");
    let recipient_runs = outcome["recipient_runs"]["entries"].as_array().unwrap();
    assert_eq!(recipient_runs.len(), 3, "{outcome}");
    let one = recipient_runs.iter().find(|r| r["recipient"] == "user_2").unwrap();
    let rr = h.call("GET", &format!("/v1/workflow_recipient_runs/{}", one["id"].as_str().unwrap()), None).await;
    assert_eq!(rr.status, 200, "{rr:?}");
    assert_eq!(rr.body["__typename"], "WorkflowRecipientRun");
    assert_eq!(rr.body["workflow_run_id"], run_id.as_str());
    assert_eq!(rr.body["workflow"], "welcome");
    assert_eq!(rr.body["status"], "completed");
    assert_eq!(rr.body["trigger_source"]["cancellation_key"], "ck-1");
    assert_eq!(rr.body["events"][0]["event"], "step.wait");
    // Knock's documented derivation of recipient run ids holds.
    let derived = uuid::Uuid::new_v5(&uuid::Uuid::parse_str(&run_id).unwrap(), b"user:user_2");
    assert_eq!(rr.body["id"], derived.to_string());
    // Inline recipients were identified.
    let users = h.api::<User>().list(&Default::default()).await.unwrap().items;
    assert!(users.iter().any(|u| u.spec.id == "user_2" && u.spec.email.as_deref() == Some("two@example.com")));

    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"herald_http_triggers_accepted_total{api="trigger"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"route="/v1/workflows/{key}/trigger",status="200""#), "{metrics}");
    assert!(metrics.contains("herald_http_request_duration_seconds_bucket"), "{metrics}");
}

#[tokio::test]
async fn triggers_are_validated_at_the_door_and_nothing_is_created_on_error() {
    let h = Herald::start().await;
    let schema = json!({"type": "object", "required": ["message", "count"],
        "properties": {"message": {"type": "string"}, "count": {"type": "integer", "minimum": 0}, "tags": {"type": "array", "items": {"type": "string"}}}});
    h.workflow("strict", json!({"dataSchema": schema, "steps": []})).await;
    h.workflow("lenient", json!({"dataSchema": schema, "validation": {"onInvalid": "Warn"}, "steps": []})).await;
    h.workflow("paused", json!({"active": false, "steps": []})).await;
    h.workflow("broken", json!({"steps": [{"ref": "a", "type": "delay"}]})).await;
    let ok = json!({"recipients": ["u1"], "data": {"message": "m", "count": 1}});

    let a = h.call("POST", "/v1/workflows/nope/trigger", Some(ok.clone())).await;
    a.assert_error(404, "workflow_missing");
    let a = h.call("POST", "/v1/workflows/paused/trigger", Some(ok.clone())).await;
    a.assert_error(422, "workflow_inactive");
    let a = h.call("POST", "/v1/workflows/broken/trigger", Some(ok.clone())).await;
    a.assert_error(422, "workflow_invalid");

    // Every schema error is listed, with a pointer into the body.
    let a = h.call("POST", "/v1/workflows/strict/trigger", Some(json!({"recipients": ["u1"], "data": {"count": -1, "tags": ["a", 3]}}))).await;
    a.assert_error(422, "invalid_params");
    assert_eq!(a.fields(), vec!["/data/count", "/data/message", "/data/tags/1"], "{a:?}");
    // No data at all is validated as {}.
    let a = h.call("POST", "/v1/workflows/strict/trigger", Some(json!({"recipients": ["u1"]}))).await;
    a.assert_error(422, "invalid_params");
    assert_eq!(a.fields(), vec!["/data/count", "/data/message"]);

    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let cases = [
        (json!({"recipients": too_many}), vec!["/recipients"]),
        (json!({"recipients": []}), vec!["/recipients"]),
        (json!({"data": {}}), vec!["/recipients"]),
        (json!({"recipients": "u1"}), vec!["/recipients"]),
        (
            json!({"recipients": ["u1", 5, "", {"name": "no id"}, {"id": "p", "collection": 3}, {"id": "x", "channel_data": []}]}),
            vec!["/recipients/1", "/recipients/2", "/recipients/3", "/recipients/4", "/recipients/5"],
        ),
        (json!({"recipients": ["u1"], "data": [1, 2]}), vec!["/data"]),
        (json!({"recipients": ["u1"], "data": "text"}), vec!["/data"]),
        (json!({"recipients": ["u1"], "actor": 12}), vec!["/actor"]),
        (json!({"recipients": ["u1"], "tenant": 12}), vec!["/tenant"]),
        (json!({"recipients": ["u1"], "cancellation_key": 7}), vec!["/cancellation_key"]),
        (json!({"recipients": ["u1"], "cancellation_key": ""}), vec!["/cancellation_key"]),
        (json!({"recipients": ["u1"], "workflow": "other", "settings": {}}), vec!["/settings", "/workflow"]),
        (json!({"recipients": [{"id": "x".repeat(257)}]}), vec!["/recipients/0/id"]),
        (json!({"recipients": 1, "actor": [], "data": 2}), vec!["/actor", "/data", "/recipients"]),
    ];
    for (body, fields) in cases {
        let a = h.call("POST", "/v1/workflows/lenient/trigger", Some(body.clone())).await;
        a.assert_error(422, "invalid_params");
        let mut got = a.fields();
        got.sort();
        assert_eq!(got, fields, "{body}: {a:?}");
    }
    let a = h.call("POST", "/v1/workflows/lenient/trigger", Some(json!([1]))).await;
    a.assert_error(422, "invalid_params");
    assert!(resource_counts(&h).await.values().all(|n| *n == 0), "nothing may be created: {:?}", resource_counts(&h).await);

    // Warn mode runs invalid data anyway (the reconciler warns); valid data passes everywhere.
    let a = h.call("POST", "/v1/workflows/lenient/trigger", Some(json!({"recipients": ["u1"], "data": {"count": "x"}}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = h.call("POST", "/v1/workflows/strict/trigger", Some(ok)).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(h.names::<TriggerRun>().await.len(), 2);
}

#[tokio::test]
async fn cancel_stores_a_cancellation_that_stops_the_runs() {
    let h = Herald::start().await;
    h.workflow("reminder", delay_workflow("1h")).await;
    for path in ["/v1/users/u1", "/v1/users/u2", "/v1/objects/projects/p"] {
        assert_eq!(h.call("PUT", path, Some(json!({}))).await.status, 200);
    }
    h.cached(&["u1", "u2", "projects/p"]).await;
    let a = h.call("POST", "/v1/workflows/reminder/trigger", Some(json!({"recipients": ["u1", "u2", {"id": "p", "collection": "projects"}], "cancellation_key": "order-7"}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let run_id = a.body["workflow_run_id"].as_str().unwrap().to_string();
    let other = h.call("POST", "/v1/workflows/reminder/trigger", Some(json!({"recipients": ["u1"], "cancellation_key": "order-8"}))).await;
    let other_id = other.body["workflow_run_id"].as_str().unwrap().to_string();
    // Wait until the recipients wait on the delay.
    wait_for("recipients to wait", Duration::from_secs(30), || async {
        let r = h.call("GET", &format!("/v1/workflow_runs/{run_id}"), None).await;
        let runs = r.body["recipient_runs"]["entries"].as_array().cloned().unwrap_or_default();
        (runs.len() == 3 && runs.iter().all(|r| r["state"] == "Waiting")).then_some(())
    })
    .await;

    // Errors first: nothing is created.
    h.call("POST", "/v1/workflows/reminder/cancel", Some(json!({}))).await.assert_error(422, "invalid_params");
    h.call("POST", "/v1/workflows/reminder/cancel", Some(json!({"cancellation_key": 5}))).await.assert_error(422, "invalid_params");
    let a = h.call("POST", "/v1/workflows/reminder/cancel", Some(json!({"cancellation_key": "order-7", "recipients": [{"id": "u9", "name": "inline"}, 4]}))).await;
    a.assert_error(422, "invalid_params");
    assert_eq!(a.fields(), vec!["/recipients/0", "/recipients/1"]);
    h.call("POST", "/v1/workflows/nope/cancel", Some(json!({"cancellation_key": "order-7"}))).await.assert_error(404, "workflow_missing");
    assert!(h.names::<Cancellation>().await.is_empty());

    // Cancel u1 only, then everyone.
    let a = h.call("POST", "/v1/workflows/reminder/cancel", Some(json!({"cancellation_key": "order-7", "recipients": ["u1"]}))).await;
    assert_eq!(a.status, 204, "{a:?}");
    assert!(a.text.is_empty());
    let cancellations = h.api::<Cancellation>().list(&Default::default()).await.unwrap().items;
    assert_eq!(cancellations.len(), 1);
    assert_eq!(cancellations[0].spec.workflow, "reminder");
    assert_eq!(cancellations[0].spec.cancellation_key, "order-7");
    assert_eq!(cancellations[0].spec.recipients, vec![json!("u1")]);
    wait_for("u1 to be cancelled", Duration::from_secs(30), || async {
        let r = h.call("GET", &format!("/v1/workflow_runs/{run_id}"), None).await;
        let runs = r.body["recipient_runs"]["entries"].as_array().cloned().unwrap_or_default();
        let u1 = runs.iter().find(|r| r["recipient"] == "u1")?;
        (u1["status"] == "cancelled").then_some(())
    })
    .await;
    let r = h.call("GET", &format!("/v1/workflow_runs/{run_id}"), None).await;
    assert!(r.body["recipient_runs"]["entries"].as_array().unwrap().iter().filter(|r| r["recipient"] != "u1").all(|r| r["state"] == "Waiting"), "{r:?}");

    let a = h.call("POST", "/v1/workflows/reminder/cancel", Some(json!({"cancellation_key": "order-7"}))).await;
    assert_eq!(a.status, 204, "{a:?}");
    let outcome = finished_run(&h, &run_id).await;
    assert_eq!(outcome["status"], "cancelled", "{outcome}");
    // Another key is untouched.
    let r = h.call("GET", &format!("/v1/workflow_runs/{other_id}"), None).await;
    assert_eq!(r.body["status"], "running", "{r:?}");
}

#[tokio::test]
async fn notify_is_the_older_trigger_api_with_lists_and_body_idempotency_keys() {
    let h = Herald::start().await;
    h.workflow("new-comment", json!({"steps": []})).await;
    let audience: Audience = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Audience",
        "metadata": {"name": "followers"}, "spec": {"key": "project.1.followers", "members": ["f1", "f2"]}}))
    .unwrap();
    h.api::<Audience>().create(&PostParams::default(), &audience).await.unwrap();

    h.call("POST", "/v1/notify", Some(json!({"name": "new-comment", "data": {}}))).await.assert_error(422, "invalid_params");
    h.call("POST", "/v1/notify", Some(json!({"name": "new-comment", "data": {}, "recipients": [], "lists": []}))).await.assert_error(422, "invalid_params");
    let a = h.call("POST", "/v1/notify", Some(json!({"recipients": ["u1"], "lists": [3]}))).await;
    a.assert_error(422, "invalid_params");
    assert_eq!(a.fields(), vec!["/name", "/lists/0", "/data"]);
    h.call("POST", "/v1/notify", Some(json!({"name": "ghost", "data": {}, "recipients": ["u1"]}))).await.assert_error(404, "workflow_missing");
    h.call("POST", "/v1/notify", Some(json!({"name": "new-comment", "data": {}, "recipients": ["u1"], "idempotencyKey": "k".repeat(256)})))
        .await
        .assert_error(422, "invalid_params");
    assert!(h.names::<TriggerRun>().await.is_empty());

    // Lists only: they become the run's audiences.
    let a = h.call("POST", "/v1/notify", Some(json!({"name": "new-comment", "actor": "u0", "lists": ["project.1.followers"], "data": {"x": 1}, "cancellationKey": "c1"}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let id = a.body["workflow_run_id"].as_str().unwrap().to_string();
    let run = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items.into_iter().find(|r| r.uid().as_deref() == Some(id.as_str())).unwrap();
    assert_eq!(run.spec.audiences, vec!["project.1.followers"]);
    assert_eq!(run.spec.cancellation_key.as_deref(), Some("c1"));
    let outcome = finished_run(&h, &id).await;
    let reached: Vec<&str> = outcome["recipient_runs"]["entries"].as_array().unwrap().iter().map(|r| r["recipient"].as_str().unwrap()).collect();
    assert_eq!(reached, vec!["f1", "f2"], "{outcome}");

    // idempotencyKey: a later call with a key whose call succeeded fails with 409 naming the run.
    let body = json!({"name": "new-comment", "recipients": ["u1"], "data": {}, "idempotencyKey": "legacy-1"});
    let first = h.call("POST", "/v1/notify", Some(body.clone())).await;
    assert_eq!(first.status, 200, "{first:?}");
    let again = h.call("POST", "/v1/notify", Some(body)).await;
    again.assert_error(409, "idempotency_key_used");
    assert_eq!(again.body["workflow_run_id"], first.body["workflow_run_id"]);
    assert!(again.body["message"].as_str().unwrap().contains(first.body["workflow_run_id"].as_str().unwrap()));
    let different = h.call("POST", "/v1/notify", Some(json!({"name": "new-comment", "recipients": ["u2"], "data": {}, "idempotencyKey": "legacy-1"}))).await;
    different.assert_error(409, "idempotency_key_used");
    assert_eq!(h.names::<TriggerRun>().await.len(), 2);
    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"herald_http_triggers_accepted_total{api="notify"} 2"#), "{metrics}");
}

#[tokio::test]
async fn idempotency_keys_replay_the_first_response_and_hold_under_concurrency() {
    let h = Herald::start().await;
    h.workflow("digest", json!({"dataSchema": {"type": "object", "required": ["n"]}, "steps": []})).await;
    let path = "/v1/workflows/digest/trigger";
    let h = &h;
    let post = |key: &'static str, body: Value| {
        let mut headers = json_headers(&h.key);
        headers.push(("idempotency-key".into(), key.to_string()));
        let bytes = serde_json::to_vec(&body).unwrap();
        async move { h.raw("POST", path, &headers, Some(bytes)).await }
    };

    // Failures are not remembered.
    post("k1", json!({"recipients": ["u1"], "data": {}})).await.assert_error(422, "invalid_params");
    let first = post("k1", json!({"recipients": ["u1"], "data": {"n": 1}})).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.header("idempotent-replayed").is_none());
    // A repeat replays, even with keys in another order.
    let replay = post("k1", json!({"data": {"n": 1}, "recipients": ["u1"]})).await;
    assert_eq!(replay.status, 200, "{replay:?}");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
    // Same key, different parameters.
    let misuse = post("k1", json!({"recipients": ["u2"], "data": {"n": 1}})).await;
    misuse.assert_error(422, "idempotency_key_mismatch");
    assert_eq!(misuse.body["workflow_run_id"], first.body["workflow_run_id"]);
    let run = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items.remove(0);
    assert_eq!(run.spec.idempotency_key.as_deref(), Some("k1"));
    assert!(run.annotations().contains_key("herald.dev/request-fingerprint"));

    // Keys: at most 255 characters.
    let mut headers = json_headers(&h.key);
    headers.push(("idempotency-key".into(), "x".repeat(256)));
    h.raw("POST", path, &headers, Some(br#"{"recipients":["u1"],"data":{"n":1}}"#.to_vec())).await.assert_error(422, "invalid_params");

    // 20 concurrent requests with one key: exactly one run, 19 replays.
    let answers = futures::future::join_all((0..20).map(|_| post("burst", json!({"recipients": ["u1", "u2"], "data": {"n": 2}})))).await;
    assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
    let ids: std::collections::BTreeSet<&str> = answers.iter().map(|a| a.body["workflow_run_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let replayed = answers.iter().filter(|a| a.header("idempotent-replayed") == Some("true")).count();
    assert_eq!(replayed, 19);
    let runs = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items;
    assert_eq!(runs.iter().filter(|r| r.spec.idempotency_key.as_deref() == Some("burst")).count(), 1);
    assert_eq!(runs.len(), 2);
    let metrics = h.metrics().await;
    assert!(metrics.contains("herald_http_idempotent_replays_total 20"), "{metrics}");

    // The key is stored in the cluster: a second herald (another replica) replays it too.
    let client = common::client().await;
    let mut settings = herald::settings::Settings::for_namespace(&h.ns.name);
    settings.api_addr = "127.0.0.1:0".parse().unwrap();
    let replica = common::operator_with(&client, settings).await;
    let base = format!("http://{}", replica.addr);
    let mut headers = json_headers(&h.key);
    headers.push(("idempotency-key".into(), "k1".into()));
    let a = wait_for("the replica to know the key", Duration::from_secs(20), || async {
        let mut req = h.http.post(format!("{base}{path}")).body(r#"{"recipients":["u1"],"data":{"n":1}}"#);
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = req.send().await.ok()?;
        (resp.status() == 200).then_some(resp)
    })
    .await;
    assert_eq!(a.headers()["idempotent-replayed"], "true");
    let body: Value = serde_json::from_slice(&a.bytes().await.unwrap()).unwrap();
    assert_eq!(body, first.body);
    replica.shutdown().await;

    // A used key replays even when the request would be refused today.
    let wf = h.names::<herald::resources::Workflow>().await.remove(0);
    let patch = json!({"spec": {"active": false}});
    h.api::<herald::resources::Workflow>().patch(&wf, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    let op = h.op.as_ref().unwrap();
    wait_for("the workflow to be inactive in the cache", Duration::from_secs(20), || async {
        herald::controller::workflow::find_by_key(&op.context, &h.ns.name, "digest").filter(|w| !w.spec.active).map(|_| ())
    })
    .await;
    let again = post("k1", json!({"recipients": ["u1"], "data": {"n": 1}})).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    post("k-new", json!({"recipients": ["u1"], "data": {"n": 1}})).await.assert_error(422, "workflow_inactive");
}

#[tokio::test]
async fn users_preferences_and_channel_data() {
    let h = Herald::start().await;
    let a = h
        .call(
            "PUT",
            "/v1/users/user_1",
            Some(json!({"name": "Ada", "email": "ada@example.com", "plan": "pro", "timezone": "Europe/Paris",
        "channel_data": {"hooks": {"url": "http://x"}}, "preferences": {"default": {"channel_types": {"email": false}}}})),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["__typename"], "User");
    assert_eq!(a.body["id"], "user_1");
    assert_eq!(a.body["name"], "Ada");
    assert_eq!(a.body["plan"], "pro");
    assert!(a.body["created_at"].is_string() && a.body["updated_at"].is_string());
    // Stored as a User (named after the id in a valid form), found by id.
    let users = h.api::<User>().list(&Default::default()).await.unwrap().items;
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].spec.email.as_deref(), Some("ada@example.com"));
    assert_eq!(users[0].spec.channel_data["hooks"]["url"], "http://x");
    // A second PUT merges; null removes.
    let a = h.call("PUT", "/v1/users/user_1", Some(json!({"plan": null, "name": "Ada L.", "extra": 1}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let got = h.call("GET", "/v1/users/user_1", None).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["name"], "Ada L.");
    assert_eq!(got.body["email"], "ada@example.com");
    assert_eq!(got.body["extra"], 1);
    assert!(got.body.get("plan").is_none(), "{got:?}");

    // Ids that are not valid names, and users whose name is not their id.
    let a = h.call("PUT", "/v1/users/Jane.Doe%40Example", Some(json!({"name": "Jane"}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["id"], "Jane.Doe@Example");
    let odd: User =
        serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "someone-else"}, "spec": {"id": "bob", "name": "Bob"}})).unwrap();
    h.api::<User>().create(&PostParams::default(), &odd).await.unwrap();
    let squatter: User = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "carol"}, "spec": {"id": "not-carol"}})).unwrap();
    h.api::<User>().create(&PostParams::default(), &squatter).await.unwrap();
    wait_for("bob in the cache", Duration::from_secs(10), || async { (h.call("GET", "/v1/users/bob", None).await.status == 200).then_some(()) }).await;
    let a = h.call("PUT", "/v1/users/bob", Some(json!({"email": "bob@example.com"}))).await;
    assert_eq!(a.body["name"], "Bob");
    assert_eq!(h.api::<User>().get("someone-else").await.unwrap().spec.email.as_deref(), Some("bob@example.com"));
    // `carol` is taken by another id: the new user gets another name, found by id.
    h.call("GET", "/v1/users/carol", None).await.assert_error(404, "resource_missing");
    let a = h.call("PUT", "/v1/users/carol", Some(json!({"name": "Carol"}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(h.call("GET", "/v1/users/carol", None).await.body["name"], "Carol");
    assert_eq!(h.api::<User>().get("carol").await.unwrap().spec.id, "not-carol");

    // Preferences.
    let prefs = json!({"channel_types": {"email": false}, "workflows": {"digest": false, "alerts": {"channel_types": {"sms": true}}}, "categories": {"marketing": false}});
    let a = h.call("PUT", "/v1/users/user_1/preferences/default", Some(prefs.clone())).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["__typename"], "PreferenceSet");
    assert_eq!(a.body["id"], "default");
    let got = h.call("GET", "/v1/users/user_1/preferences/default", None).await;
    assert_eq!(got.body["workflows"], prefs["workflows"]);
    assert_eq!(got.body["channel_types"], prefs["channel_types"]);
    let a = h.call("PUT", "/v1/users/user_1/preferences/default?tenant=acme", Some(json!({"channel_types": {"chat": false}}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let user = h.api::<User>().list(&Default::default()).await.unwrap().items.into_iter().find(|u| u.spec.id == "user_1").unwrap();
    assert!(!user.spec.tenant_preferences["acme"].channel_types["chat"]);
    assert_eq!(h.call("GET", "/v1/users/user_1/preferences/default?tenant=acme", None).await.body["channel_types"]["chat"], false);
    assert_eq!(h.call("GET", "/v1/users/user_1/preferences/other", None).await.body["workflows"], json!({}));
    let a = h.call("PUT", "/v1/users/user_1/preferences/default", Some(json!({"__persistence_strategy__": "merge", "channel_types": {"sms": false}}))).await;
    assert_eq!(a.body["channel_types"], json!({"email": false, "sms": false}), "{a:?}");
    assert_eq!(a.body["workflows"], prefs["workflows"]);
    let a = h
        .call("PUT", "/v1/users/user_1/preferences/default", Some(json!({"channel_types": {"email": false}, "workflows": {"digest": false}, "categories": {"marketing": false}})))
        .await;
    assert_eq!(a.body["workflows"], json!({"digest": false}), "replace is the default: {a:?}");
    h.call("PUT", "/v1/users/user_1/preferences/default", Some(json!({"__persistence_strategy__": "sometimes"}))).await.assert_error(422, "invalid_params");
    assert_eq!(h.call("PUT", "/v1/users/user_1/preferences/default", Some(prefs.clone())).await.status, 200);
    h.call("PUT", "/v1/users/user_1/preferences/default", Some(json!({"channel_types": {"email": "no"}}))).await.assert_error(422, "invalid_params");
    h.call("PUT", "/v1/users/user_1/preferences/default", Some(json!({"bogus": 1}))).await.assert_error(422, "invalid_params");
    h.call("PUT", "/v1/users/user_1/preferences/other?tenant=acme", Some(json!({}))).await.assert_error(422, "invalid_params");
    h.call("GET", "/v1/users/ghost/preferences/default", None).await.assert_error(404, "resource_missing");

    // Channel data.
    let a = h.call("PUT", "/v1/users/user_1/channel_data/chat", Some(json!({"data": {"url": "https://chat.example/hook"}}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body, json!({"__typename": "ChannelData", "channel_id": "chat", "data": {"url": "https://chat.example/hook"}}));
    assert_eq!(h.call("GET", "/v1/users/user_1/channel_data/chat", None).await.body["data"]["url"], "https://chat.example/hook");
    h.call("PUT", "/v1/users/user_1/channel_data/chat", Some(json!({"url": "x"}))).await.assert_error(422, "invalid_params");
    h.call("PUT", "/v1/users/user_1/channel_data/chat", Some(json!({"data": "x"}))).await.assert_error(422, "invalid_params");
    assert_eq!(h.call("DELETE", "/v1/users/user_1/channel_data/chat", None).await.status, 204);
    h.call("GET", "/v1/users/user_1/channel_data/chat", None).await.assert_error(404, "resource_missing");
    h.call("DELETE", "/v1/users/user_1/channel_data/chat", None).await.assert_error(404, "resource_missing");
    h.call("GET", "/v1/users/ghost/channel_data/chat", None).await.assert_error(404, "resource_missing");

    // Type errors.
    let a = h.call("PUT", "/v1/users/user_1", Some(json!({"email": 5, "channel_data": [], "id": "other"}))).await;
    a.assert_error(422, "invalid_params");
    let mut fields = a.fields();
    fields.sort();
    assert_eq!(fields, vec!["/channel_data", "/email", "/id"]);

    // Delete.
    assert_eq!(h.call("DELETE", "/v1/users/user_1", None).await.status, 204);
    h.call("GET", "/v1/users/user_1", None).await.assert_error(404, "resource_missing");
    h.call("DELETE", "/v1/users/user_1", None).await.assert_error(404, "resource_missing");
    assert_eq!(h.call("DELETE", "/v1/users/bob", None).await.status, 204);
    assert!(h.api::<User>().get_opt("someone-else").await.unwrap().is_none());
}

#[tokio::test]
async fn objects_and_subscriptions() {
    let h = Herald::start().await;
    let a = h.call("PUT", "/v1/objects/projects/p1", Some(json!({"name": "Apollo", "channel_data": {"chat": {"url": "http://c"}}}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["__typename"], "Object");
    assert_eq!(a.body["collection"], "projects");
    assert_eq!(a.body["properties"]["name"], "Apollo");
    let objects = h.api::<Object>().list(&Default::default()).await.unwrap().items;
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].spec.channel_data["chat"]["url"], "http://c");
    let a = h.call("PUT", "/v1/objects/projects/p1", Some(json!({"name": null, "stage": 2}))).await;
    assert_eq!(a.body["properties"], json!({"stage": 2}));
    assert_eq!(h.call("GET", "/v1/objects/projects/p1", None).await.body["properties"]["stage"], 2);
    h.call("GET", "/v1/objects/projects/p2", None).await.assert_error(404, "resource_missing");
    h.call("PUT", "/v1/objects/projects/p1", Some(json!({"collection": "teams"}))).await.assert_error(422, "invalid_params");

    // Subscriptions: users, objects, inline recipients (identified first).
    let a = h
        .call(
            "POST",
            "/v1/objects/projects/p1/subscriptions",
            Some(json!({
        "recipients": ["u1", {"id": "t1", "collection": "teams"}, {"id": "u2", "name": "Two"}], "properties": {"role": "watcher"}})),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let subs = a.body.as_array().unwrap();
    assert_eq!(subs.len(), 3);
    assert!(subs.iter().all(|s| s["__typename"] == "Subscription" && s["properties"]["role"] == "watcher" && s["object"]["id"] == "p1"));
    assert!(subs.iter().any(|s| s["recipient"] == json!({"__typename": "Object", "id": "t1", "collection": "teams"})));
    // The API's subscriptions live in the object's MemberSlices, not in the Object.
    let slice_members = |h: &Herald| {
        let api = h.api::<MemberSlice>();
        async move {
            let slices = api.list(&ListParams::default().labels("herald.dev/object=projects.p1")).await.unwrap().items;
            slices.iter().flat_map(|s| s.spec.members.clone()).collect::<Vec<_>>()
        }
    };
    assert_eq!(slice_members(&h).await.len(), 3);
    assert!(h.api::<Object>().get("projects-p1").await.unwrap().spec.subscribers.is_empty());
    assert!(h.api::<User>().list(&Default::default()).await.unwrap().items.iter().any(|u| u.spec.id == "u2" && u.spec.name.as_deref() == Some("Two")));
    // Subscribing again updates the properties, not the count.
    let a = h.call("POST", "/v1/objects/projects/p1/subscriptions", Some(json!({"recipients": ["u1"], "properties": {"role": "owner"}}))).await;
    assert_eq!(a.body[0]["properties"]["role"], "owner");
    let members = slice_members(&h).await;
    assert_eq!(members.len(), 3);
    assert_eq!(members.iter().find(|m| m.recipient == json!("u1")).unwrap().properties["role"], "owner");
    // Listed back, in pages.
    let listed = h.call("GET", "/v1/objects/projects/p1/subscriptions?page_size=2", None).await;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_eq!(listed.body["entries"].as_array().unwrap().len(), 2);
    let after = listed.body["page_info"]["after"].as_str().unwrap().to_string();
    let rest = h.call("GET", &format!("/v1/objects/projects/p1/subscriptions?page_size=2&after={after}"), None).await;
    assert_eq!(rest.body["entries"].as_array().unwrap().len(), 1);
    assert!(rest.body["page_info"]["after"].is_null());
    // Errors.
    h.call("POST", "/v1/objects/projects/p1/subscriptions", Some(json!({"recipients": [{"id": "p1", "collection": "projects"}]}))).await.assert_error(422, "invalid_params");
    h.call("POST", "/v1/objects/projects/p1/subscriptions", Some(json!({"recipients": []}))).await.assert_error(422, "invalid_params");
    h.call("POST", "/v1/objects/projects/p1/subscriptions", Some(json!({"properties": {}}))).await.assert_error(422, "invalid_params");
    h.call("DELETE", "/v1/objects/projects/p1/subscriptions", Some(json!({"recipients": [{"id": "u3", "email": "x"}]}))).await.assert_error(422, "invalid_params");
    h.call("DELETE", "/v1/objects/projects/zzz/subscriptions", Some(json!({"recipients": ["u1"]}))).await.assert_error(404, "resource_missing");
    // Unsubscribe.
    let a = h.call("DELETE", "/v1/objects/projects/p1/subscriptions", Some(json!({"recipients": ["u1", {"id": "t1", "collection": "teams"}, "never"]}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body.as_array().unwrap().len(), 2);
    let members = slice_members(&h).await;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].recipient, json!("u2"));

    assert_eq!(h.call("DELETE", "/v1/objects/projects/p1", None).await.status, 204);
    h.call("GET", "/v1/objects/projects/p1", None).await.assert_error(404, "resource_missing");
    h.call("DELETE", "/v1/objects/projects/p1", None).await.assert_error(404, "resource_missing");
}

#[tokio::test]
async fn tenants() {
    let h = Herald::start().await;
    let a = h
        .call(
            "PUT",
            "/v1/tenants/acme",
            Some(json!({"name": "Acme", "region": "eu",
        "settings": {"branding": {"primary_color": "#f00"}, "preference_set": {"channel_types": {"email": false}}}})),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["__typename"], "Tenant");
    assert_eq!(a.body["name"], "Acme");
    assert_eq!(a.body["region"], "eu");
    assert_eq!(a.body["settings"]["branding"]["primary_color"], "#f00");
    let tenant = h.api::<Tenant>().get("acme").await.unwrap();
    assert!(!tenant.spec.settings.preference_set.unwrap().channel_types["email"]);
    let a = h.call("PUT", "/v1/tenants/acme", Some(json!({"settings": {"preference_set": null, "branding": {"logo": "l.png"}}}))).await;
    assert_eq!(a.body["name"], "Acme");
    assert_eq!(a.body["settings"]["preference_set"], Value::Null);
    assert_eq!(a.body["settings"]["branding"], json!({"primary_color": "#f00", "logo": "l.png"}));
    assert_eq!(h.call("GET", "/v1/tenants/acme", None).await.body["region"], "eu");
    let a = h.call("PUT", "/v1/tenants/acme", Some(json!({"settings": {"colour": 1, "preference_set": {"nope": 1}}, "name": 3}))).await;
    a.assert_error(422, "invalid_params");
    let mut fields = a.fields();
    fields.sort();
    assert_eq!(fields, vec!["/name", "/settings/colour", "/settings/preference_set"]);
    h.call("PUT", "/v1/tenants/acme", Some(json!({"channel_data": {}}))).await.assert_error(422, "invalid_params");
    h.call("GET", "/v1/tenants/other", None).await.assert_error(404, "resource_missing");
    assert_eq!(h.call("DELETE", "/v1/tenants/acme", None).await.status, 204);
    h.call("GET", "/v1/tenants/acme", None).await.assert_error(404, "resource_missing");
    h.call("DELETE", "/v1/tenants/acme", None).await.assert_error(404, "resource_missing");
}

#[tokio::test]
async fn run_lookups_check_their_ids() {
    let h = Herald::start().await;
    h.call("GET", "/v1/workflow_runs/not-a-uuid", None).await.assert_error(422, "invalid_params");
    h.call("GET", "/v1/workflow_recipient_runs/not-a-uuid", None).await.assert_error(422, "invalid_params");
    let unknown = uuid::Uuid::new_v4();
    h.call("GET", &format!("/v1/workflow_runs/{unknown}"), None).await.assert_error(404, "resource_missing");
    h.call("GET", &format!("/v1/workflow_recipient_runs/{unknown}"), None).await.assert_error(404, "resource_missing");
}

#[tokio::test]
async fn http_plumbing_request_ids_metrics_openapi_and_unknown_routes() {
    let h = Herald::start().await;
    for path in ["/healthz", "/metrics", "/openapi.json", "/v1/users/x", "/nope"] {
        let a = h.raw("GET", path, &[], None).await;
        let id = a.header("x-request-id").unwrap_or_else(|| panic!("no x-request-id on {path}: {a:?}"));
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    }
    let a = h.raw("GET", "/healthz", &[("x-request-id".into(), "my-trace-1".into())], None).await;
    assert_eq!(a.header("x-request-id"), Some("my-trace-1"));

    let a = h.raw("GET", "/openapi.json", &[], None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["openapi"], "3.0.3");
    for (method, path) in herald::http::api::ROUTES {
        assert!(a.body["paths"][path][method].is_object(), "{method} {path} undocumented");
    }

    h.call("GET", "/v1/nope", None).await.assert_error(404, "route_not_found");
    h.call("PATCH", "/v1/users/u1", None).await.assert_error(405, "method_not_allowed");
    h.call("GET", "/v1/workflows/x/trigger", None).await.assert_error(405, "method_not_allowed");

    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"herald_http_requests_total{method="GET",route="/v1/users/{user_id}",status="404"}"#), "{metrics}");
    assert!(metrics.contains(r#"route="unmatched""#), "{metrics}");
    assert!(!metrics.contains("/v1/nope"), "raw paths must not become labels");
}

#[tokio::test]
async fn body_limit_and_rate_limit_are_configurable() {
    let h = Herald::start_with(|s| {
        s.max_body_bytes = 2048;
        s.rate_limit_per_second = 1.0;
        s.rate_limit_burst = Some(25);
    })
    .await;
    h.workflow("w", json!({"steps": []})).await;
    let big = json!({"recipients": ["u1"], "data": {"blob": "x".repeat(4096)}});
    h.call("POST", "/v1/workflows/w/trigger", Some(big.clone())).await.assert_error(413, "payload_too_large");
    // Without a Content-Length (chunked), the limit holds while reading.
    let data = serde_json::to_vec(&big).unwrap();
    let mut stream = tokio::net::TcpStream::connect(h.op.as_ref().unwrap().addr).await.unwrap();
    let head = format!("POST /v1/workflows/w/trigger HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n", h.key);
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in data.chunks(1000) {
        stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.unwrap();
        stream.write_all(chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.expect("no answer").unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
    assert!(h.names::<TriggerRun>().await.is_empty());
    // Spend the burst; then 429 with Retry-After.
    let mut limited = None;
    for _ in 0..40 {
        let a = h.call("GET", "/v1/users/u1", None).await;
        if a.status == 429 {
            limited = Some(a);
            break;
        }
    }
    let a = limited.expect("the rate limit never applied");
    a.assert_error(429, "rate_limit_exceeded");
    assert!(a.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn an_unreachable_apiserver_is_a_503_with_retry_after_and_never_a_200() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let proxy = Proxy::start().await;
    let proxied = api_support::client_via(&proxy.url).await;
    let op = common::operator_with(&proxied, herald::settings::Settings::for_namespace(&ns.name)).await;
    let h = Herald::around(ns, op).await;
    h.workflow("w", json!({"steps": []})).await;
    assert_eq!(h.call("POST", "/v1/workflows/w/trigger", Some(json!({"recipients": ["u1"]}))).await.status, 200);

    proxy.cut();
    for (method, path, body) in [
        ("POST", "/v1/workflows/w/trigger", Some(json!({"recipients": ["u1"]}))),
        ("POST", "/v1/workflows/w/cancel", Some(json!({"cancellation_key": "k"}))),
        ("PUT", "/v1/users/u1", Some(json!({"name": "x"}))),
        ("GET", "/v1/tenants/t", None),
    ] {
        let a = h.call(method, path, body).await;
        a.assert_error(503, "service_unavailable");
        assert_eq!(a.header("retry-after"), Some("1"), "{a:?}");
    }
    let mut headers = json_headers(&h.key);
    headers.push(("idempotency-key".into(), "during-outage".into()));
    h.raw("POST", "/v1/workflows/w/trigger", &headers, Some(br#"{"recipients":["u1"]}"#.to_vec())).await.assert_error(503, "service_unavailable");
    assert_eq!(h.names::<TriggerRun>().await.len(), 1, "only the run acknowledged before the outage");
    assert_eq!(h.names::<Cancellation>().await.len(), 0);
    h.op.unwrap().abort();
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_slow_clients_time_out() {
    let mut h = Herald::start_with(|s| {
        s.header_timeout_seconds = 1;
        s.request_timeout_seconds = 3;
    })
    .await;
    h.workflow("w", json!({"steps": []})).await;
    let addr = h.op.as_ref().unwrap().addr;
    let body = br#"{"recipients": ["u1", "u2"], "data": {"in": "flight"}}"#;
    let head = |len: usize| {
        format!("POST /v1/workflows/w/trigger HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n", h.key)
    };

    // Headers never finished: the connection is closed.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/notify HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server kept a connection whose headers never came");

    // A body that never comes: 408 after the request timeout.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(head(body.len()).as_bytes()).await.unwrap();
    stalled.write_all(&body[..10]).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf)).await.expect("no answer").unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");

    // A request in flight when shutdown starts is finished, and its run stored.
    let metrics = h.op.as_ref().unwrap().context.metrics.clone();
    let serving = || common::metric_value(&metrics.render(), "herald_http_requests_in_flight");
    let before = serving();
    let mut in_flight = tokio::net::TcpStream::connect(addr).await.unwrap();
    in_flight.write_all(head(body.len()).as_bytes()).await.unwrap();
    in_flight.write_all(&body[..10]).await.unwrap();
    wait_for("the request to be in flight", Duration::from_secs(10), || async { (serving() > before).then_some(()) }).await;
    let op = h.op.take().unwrap();
    let stopping = tokio::spawn(op.shutdown());
    // Shutdown has begun once the listener is closed.
    wait_for("the listener to close", Duration::from_secs(10), || async move { tokio::net::TcpStream::connect(addr).await.is_err().then_some(()) }).await;
    in_flight.write_all(&body[10..]).await.unwrap();
    let mut response = Vec::new();
    let mut chunk = vec![0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("workflow_run_id") {
        let n = tokio::time::timeout(Duration::from_secs(10), in_flight.read(&mut chunk)).await.expect("no answer").unwrap();
        assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(&response));
        response.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    tokio::time::timeout(Duration::from_secs(20), stopping).await.expect("shutdown finishes").unwrap();
    let runs = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items;
    assert_eq!(runs.len(), 1);
    assert!(text.contains(&runs[0].uid().unwrap()));
    // The listener is closed.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
