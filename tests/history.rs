//! The history store, against a real PostgreSQL (scripts/test.sh starts one;
//! each test makes its own database) and the local control plane: messages
//! recorded as deliveries happen and read back through Knock's Messages API.

mod api_support;
mod common;
mod receivers;

use std::time::Duration;

use api_support::Herald;
use common::wait_for;
use herald::resources::TriggerRun;
use kube::api::PostParams;
use receivers::{HttpReceiver, Reply};
use serde_json::{json, Value};

/// Triggers `workflow` through the API; the workflow run id.
async fn trigger(h: &Herald, workflow: &str, body: Value) -> String {
    let a = h.call("POST", &format!("/v1/workflows/{workflow}/trigger"), Some(body)).await;
    assert_eq!(a.status, 200, "{a:?}");
    a.body["workflow_run_id"].as_str().unwrap().to_string()
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
    let h = Herald::start_with_history().await;
    let receiver = HttpReceiver::start().await;
    receiver.script("/flaky", vec![Reply::status(503), Reply::status(200)]);
    receiver.always("/down", Reply::status(500));
    h.http_channel("flaky", &receiver.url("/flaky"), 3).await;
    h.http_channel("down", &receiver.url("/down"), 2).await;
    h.workflow(
        "alert",
        json!({"steps": [
            {"ref": "first", "type": "channel", "channel": "flaky", "template": {"body": "{\"to\": \"{{ recipient.id }}\", \"n\": {{ data.n }}}"}},
            {"ref": "second", "type": "channel", "channel": "down", "template": {"body": "{}"}},
        ]}),
    )
    .await;
    // A Channel that is not ready (not an http URL): its messages are never attempted.
    h.http_channel("broken", "ftp://example.invalid/hook", 2).await;
    h.workflow("ghost", json!({"steps": [{"ref": "nowhere", "type": "channel", "channel": "broken", "template": {"body": "{}"}}]})).await;

    let run = trigger(&h, "alert", json!({"recipients": [{"id": "u1", "name": "U1"}], "data": {"n": 7}, "tenant": "acme", "actor": "boss"})).await;
    h.wait_finished(&run).await;
    let ghost = trigger(&h, "ghost", json!({"recipients": [{"id": "u2", "name": "U2"}]})).await;
    h.wait_finished(&ghost).await;

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

/// herald with a history store whose finished runs leave the cluster after `ttl` seconds.
async fn herald_archiving(url: String, ttl: i64) -> Herald {
    Herald::start_with(move |s| {
        s.database_url = Some(url);
        s.finished_ttl_seconds = ttl;
    })
    .await
}

/// Waits until no TriggerRun of this workflow run id is left in the cluster.
async fn gone(h: &Herald, run_id: &str, within: Duration) {
    wait_for("the run to leave the cluster", within, || async {
        let runs = h.api::<TriggerRun>().list(&Default::default()).await.ok()?;
        // By uid (the workflow run id): a run not accepted yet has no status to say it.
        (!runs.items.iter().any(|r| r.metadata.uid.as_deref() == Some(run_id))).then_some(())
    })
    .await;
}

fn users(count: usize) -> Vec<Value> {
    (0..count).map(|i| json!({"id": format!("user-{i}"), "name": format!("User {i}")})).collect()
}

#[tokio::test]
async fn finished_runs_are_archived_and_still_readable() {
    let h = herald_archiving(common::database().await, 1).await;
    let receiver = HttpReceiver::start().await;
    h.http_channel("hooks", &receiver.url("/hook"), 1).await;
    h.workflow("ping", json!({"steps": [{"ref": "hook", "type": "channel", "channel": "hooks", "template": {"body": "{\"to\": \"{{ recipient.id }}\"}"}}]})).await;

    // A small run (records inline) and one with pages (more than 10
    // recipients; 510 take two pages, archived one at a time).
    let small = trigger(&h, "ping", json!({"recipients": users(2)})).await;
    let large = trigger(&h, "ping", json!({"recipients": users(510)})).await;
    // A run created with kubectl keeps its explicit TTL.
    let kept: TriggerRun = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": "kept"},
        "spec": {"workflow": "ping", "recipients": [{"id": "user-0"}], "ttlSecondsAfterFinished": 3600}
    }))
    .unwrap();
    h.api::<TriggerRun>().create(&PostParams::default(), &kept).await.unwrap();
    gone(&h, &small, Duration::from_secs(60)).await;
    gone(&h, &large, Duration::from_secs(60)).await;
    assert!(h.api::<herald::resources::RecipientPage>().list(&Default::default()).await.unwrap().items.is_empty(), "the pages left with their run");
    let kept = h.api::<TriggerRun>().get("kept").await.expect("a run with its own ttlSecondsAfterFinished stays");
    assert_eq!(kept.status.as_ref().map(|s| format!("{:?}", s.state)).as_deref(), Some("Completed"));
    assert_eq!(receiver.count(), 513);

    // Read back from the store: the run, its recipients' runs page by page, one recipient's run, the messages.
    let a = h.call("GET", &format!("/v1/workflow_runs/{small}"), None).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!((a.body["status"].as_str(), a.body["workflow"].as_str()), (Some("completed"), Some("ping")));
    assert_eq!(a.body["recipient_runs"]["entries"].as_array().map(Vec::len), Some(2), "{a:?}");
    let mut ids = Vec::new();
    let mut path = format!("/v1/workflow_runs/{large}?page_size=50");
    loop {
        let a = h.call("GET", &path, None).await;
        assert_eq!(a.status, 200, "{a:?}");
        ids.extend(a.body["recipient_runs"]["entries"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()));
        match a.body["recipient_runs"]["page_info"]["after"].as_str() {
            Some(after) => path = format!("/v1/workflow_runs/{large}?page_size=50&after={after}"),
            None => break,
        }
    }
    assert_eq!(ids.len(), 510, "every recipient once, in order");
    assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 510);
    let a = h.call("GET", &format!("/v1/workflow_recipient_runs/{}", ids[509]), None).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!((a.body["recipient"].as_str(), a.body["state"].as_str(), a.body["workflow_run_id"].as_str()), (Some("user-509"), Some("Completed"), Some(large.as_str())));
    assert_eq!(a.body["steps"][0]["reason"], "Delivered");
    // The messages list reads in pages of 50 (Knock's default): the first is full.
    messages(&h, &format!("workflow_run_id={large}"), 50).await;
    assert!(h.metrics().await.lines().any(|l| l.starts_with("herald_runs_archived_total") && !l.ends_with(" 0")), "{}", h.metrics().await);
    h.call("GET", &format!("/v1/workflow_runs/{}", uuid::Uuid::new_v4()), None).await.assert_error(404, "resource_missing");
}

#[tokio::test]
async fn idempotency_keys_hold_after_the_run_left_the_cluster() {
    let h = herald_archiving(common::database().await, 1).await;
    h.workflow("w", api_support::delay_workflow("1ms")).await;
    let body = json!({"recipients": [{"id": "u1"}], "data": {"n": 1}});
    let keyed = |key: &str| vec![("idempotency-key".to_string(), key.to_string())];
    let send = |key: String, body: Value| {
        let h = &h;
        async move {
            let mut headers = api_support::json_headers(&h.key);
            headers.extend(keyed(&key));
            h.raw("POST", "/v1/workflows/w/trigger", &headers, Some(body.to_string().into_bytes())).await
        }
    };
    let first = send("key-1".into(), body.clone()).await;
    assert_eq!(first.status, 200, "{first:?}");
    let run = first.body["workflow_run_id"].as_str().unwrap().to_string();
    h.wait_finished(&run).await;
    gone(&h, &run, Duration::from_secs(60)).await;

    // The same key after the run left: the same run, replayed; nothing new in the cluster.
    let again = send("key-1".into(), body.clone()).await;
    assert_eq!((again.status, again.body["workflow_run_id"].as_str()), (200, Some(run.as_str())), "{again:?}");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert!(h.names::<TriggerRun>().await.is_empty(), "no second run");
    // Other parameters with that key: refused.
    send("key-1".into(), json!({"recipients": [{"id": "u2"}]})).await.assert_error(422, "idempotency_key_mismatch");

    // Parallel requests with one new key: one run.
    let answers = futures::future::join_all((0..8).map(|_| send("key-2".into(), body.clone()))).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 200, "{a:?}");
            a.body["workflow_run_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(h.names::<TriggerRun>().await.len(), 1, "exactly one run for eight parallel requests");
}

/// A PostgreSQL server of a test's own, to stop and start (scripts/postgres.sh).
struct OwnPostgres {
    dir: std::path::PathBuf,
}

impl OwnPostgres {
    fn start() -> OwnPostgres {
        let pg = OwnPostgres { dir: std::env::temp_dir().join(format!("herald-pg-{}", uuid::Uuid::new_v4().simple())) };
        pg.script("start");
        pg
    }

    fn script(&self, verb: &str) {
        let status = std::process::Command::new("bash").arg(common::repo_path("scripts/postgres.sh")).arg(verb).arg(&self.dir).status().expect("running scripts/postgres.sh");
        assert!(status.success(), "scripts/postgres.sh {verb} failed");
    }

    fn url(&self) -> String {
        std::fs::read_to_string(self.dir.join("url")).unwrap().trim().to_string()
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.script("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Counts the messages of a run through the API, page by page (None while the store does not answer).
async fn count_messages(h: &Herald, run: &str) -> Option<usize> {
    let mut count = 0;
    let mut path = format!("/v1/messages?workflow_run_id={run}");
    loop {
        let a = h.call("GET", &path, None).await;
        if a.status != 200 {
            return None;
        }
        count += a.body["items"].as_array()?.len();
        match a.body["page_info"]["after"].as_str() {
            Some(after) => path = format!("/v1/messages?workflow_run_id={run}&after={after}"),
            None => return Some(count),
        }
    }
}

#[tokio::test]
async fn postgresql_down_mid_run_loses_nothing() {
    let pg = OwnPostgres::start();
    let h = herald_archiving(pg.url(), 1).await;
    let receiver = HttpReceiver::start().await;
    receiver.slow("/hook", Duration::from_millis(100));
    h.http_channel("hooks", &receiver.url("/hook"), 1).await;
    h.workflow("ping", json!({"steps": [{"ref": "hook", "type": "channel", "channel": "hooks", "template": {"body": "{}"}}]})).await;
    let run = trigger(&h, "ping", json!({"recipients": users(30)})).await;

    // Stop PostgreSQL once deliveries are under way.
    wait_for("deliveries to start", Duration::from_secs(30), || async { (receiver.count() >= 3).then_some(()) }).await;
    pg.script("stop");
    // The run goes on and finishes; history reads say the store is down; the run stays in the cluster.
    h.wait_finished(&run).await;
    assert_eq!(receiver.count(), 30);
    let a = h.call("GET", "/v1/messages", None).await;
    a.assert_error(503, "service_unavailable");
    assert!(a.header("retry-after").is_some(), "{a:?}");
    wait_for("an archive attempt to fail", Duration::from_secs(30), || async {
        h.metrics().await.lines().any(|l| l.starts_with("herald_reconcile_errors_total") && l.contains("error=\"store\"")).then_some(())
    })
    .await;
    assert!(
        h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items.iter().any(|r| r.status.as_ref().and_then(|s| s.workflow_run_id.as_deref()) == Some(run.as_str())),
        "the run waits in the cluster"
    );
    // Unkeyed triggers are still acknowledged (stored as TriggerRuns).
    let during = trigger(&h, "ping", json!({"recipients": [{"id": "late"}]})).await;

    // PostgreSQL back: the runs are archived and leave; every message is there.
    pg.script("resume");
    gone(&h, &run, Duration::from_secs(90)).await;
    gone(&h, &during, Duration::from_secs(90)).await;
    wait_for("all 30 messages", Duration::from_secs(30), || async { (count_messages(&h, &run).await == Some(30)).then_some(()) }).await;
    let a = h.call("GET", &format!("/v1/workflow_runs/{run}?page_size=50"), None).await;
    assert_eq!(a.body["recipient_runs"]["entries"].as_array().map(Vec::len), Some(30), "{a:?}");
}

#[tokio::test]
async fn herald_starts_and_runs_while_postgresql_is_down() {
    let pg = OwnPostgres::start();
    pg.script("stop");
    let h = herald_archiving(pg.url(), 1).await;
    let receiver = HttpReceiver::start().await;
    h.http_channel("hooks", &receiver.url("/hook"), 1).await;
    h.workflow("ping", json!({"steps": [{"ref": "hook", "type": "channel", "channel": "hooks", "template": {"body": "{}"}}]})).await;
    let run = trigger(&h, "ping", json!({"recipients": users(3)})).await;
    h.wait_finished(&run).await;
    assert_eq!(receiver.count(), 3);
    h.call("GET", "/v1/messages", None).await.assert_error(503, "service_unavailable");

    // Once PostgreSQL answers, the schema is applied and the run archived.
    pg.script("resume");
    gone(&h, &run, Duration::from_secs(90)).await;
    wait_for("the run's messages", Duration::from_secs(30), || async { (count_messages(&h, &run).await == Some(3)).then_some(()) }).await;
}

#[tokio::test]
async fn retention_purges_old_history_in_batches_and_keeps_the_rest() {
    use herald::store::{retention, Store};
    let url = common::database().await;
    let store = Store::connect(&url).await.expect("the store");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // 25,000 old messages (more than two batches) and 10 recent ones; an old and a new run with records; old and new keys.
    client
        .batch_execute(
            "INSERT INTO herald_messages (id, namespace, workflow, workflow_run_id, recipient_run_id, recipient_id, step_ref, channel, channel_type, status, reason, attempts, inserted_at, updated_at)
             SELECT gen_random_uuid(), 'ns', 'w', gen_random_uuid(), gen_random_uuid(), 'u' || i, 's', 'c', 'http', 'sent', 'Delivered', '[]', now() - interval '40 days', now() - interval '40 days' FROM generate_series(1, 25000) i;
             INSERT INTO herald_messages (id, namespace, workflow, workflow_run_id, recipient_run_id, recipient_id, step_ref, channel, channel_type, status, reason, attempts, inserted_at, updated_at)
             SELECT gen_random_uuid(), 'ns', 'w', gen_random_uuid(), gen_random_uuid(), 'u' || i, 's', 'c', 'http', 'sent', 'Delivered', '[]', now(), now() FROM generate_series(1, 10) i;
             INSERT INTO herald_workflow_runs (id, namespace, name, workflow, state, run, inserted_at, archived_at) VALUES
               ('00000000-0000-0000-0000-000000000001', 'ns', 'old', 'w', 'Completed', '{}', now() - interval '41 days', now() - interval '40 days'),
               ('00000000-0000-0000-0000-000000000002', 'ns', 'new', 'w', 'Completed', '{}', now(), now());
             INSERT INTO herald_recipient_runs (id, workflow_run_id, position, record, updated_at) VALUES
               (gen_random_uuid(), '00000000-0000-0000-0000-000000000001', 0, '{}', now()),
               (gen_random_uuid(), '00000000-0000-0000-0000-000000000002', 0, '{}', now());
             INSERT INTO herald_idempotency_keys (namespace, run_name, fingerprint, created_at) VALUES ('ns', 'old', 'f', now() - interval '41 days'), ('ns', 'new', 'f', now());",
        )
        .await
        .unwrap();
    let purged = retention::purge(&store, retention::cutoff(jiff::Timestamp::now(), 30)).await.unwrap();
    assert_eq!((purged.messages, purged.runs, purged.keys), (25_000, 1, 1));
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM herald_messages").await, 10);
    assert_eq!(count("SELECT count(*) FROM herald_workflow_runs").await, 1);
    assert_eq!(count("SELECT count(*) FROM herald_recipient_runs").await, 1, "an old run's records go with it");
    assert_eq!(count("SELECT count(*) FROM herald_idempotency_keys").await, 1);
    // A second purge finds nothing.
    assert_eq!(retention::purge(&store, retention::cutoff(jiff::Timestamp::now(), 30)).await.unwrap(), retention::Purged::default());
}
