//! Compatibility with Knock's official Node SDK (`@knocklabs/node`, pinned in
//! tests/sdk/package.json and installed by scripts/test.sh): the SDK, pointed
//! at herald with its own `KNOCK_BASE_URL`, identifies a user, sets objects and
//! tenants, triggers, cancels and reads the outcome (tests/sdk/compat.mjs);
//! with a history store it reads the messages back (tests/sdk/messages.mjs).

mod api_support;
mod common;
mod receivers;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use api_support::Herald;
use herald::resources::{Cancellation, Schedule, TriggerRun, User};
use kube::ResourceExt;
use receivers::{HttpReceiver, Reply};
use serde_json::{json, Value};

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

/// Installs the SDK from the lock file when scripts/test.sh has not.
fn ensure_sdk() {
    let dir = sdk_dir();
    if dir.join("node_modules/@knocklabs/node/package.json").exists() {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .unwrap_or_else(|e| panic!("the SDK test needs Node.js and npm (scripts/test.sh installs them): {e}"));
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

/// Runs `script` (in tests/sdk) with the SDK pointed at herald; the JSON summary it prints last.
async fn run_script(h: &Herald, script: &str) -> Value {
    let child = tokio::process::Command::new("node")
        .arg(script)
        .current_dir(sdk_dir())
        .env("KNOCK_BASE_URL", &h.base)
        .env("HERALD_API_KEY", &h.key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running node (scripts/test.sh installs Node.js)");
    let output = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output()).await.expect("the SDK script timed out").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script} failed:\n{stderr}\n{stdout}");
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn step<'a>(summary: &'a Value, name: &str) -> &'a Value {
    &summary["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no step {name}: {summary}"))["value"]
}

#[tokio::test]
async fn the_official_knock_node_sdk_works_against_herald() {
    ensure_sdk();
    let h = Herald::start().await;
    h.workflow(
        "sdk-flow",
        json!({
            "dataSchema": {"type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}},
            "steps": [{"ref": "pause", "type": "delay", "delay": {"duration": "1s"}}]
        }),
    )
    .await;
    h.workflow("sdk-slow", api_support::delay_workflow("1h")).await;

    let summary = run_script(&h, "compat.mjs").await;

    // Identify and the other writes: the SDK got Knock's shapes back...
    let user = step(&summary, "users.update");
    assert_eq!(user["__typename"], "User");
    assert_eq!(user["id"], "sdk-user-1");
    assert_eq!(user["email"], "sam@example.com");
    assert_eq!(step(&summary, "users.get")["plan"], "team");
    assert_eq!(step(&summary, "users.getPreferences")["workflows"]["sdk-flow"], true);
    assert_eq!(step(&summary, "users.getChannelData")["data"]["url"], "http://127.0.0.1:9/hook");
    assert_eq!(step(&summary, "objects.set")["properties"]["name"], "SDK project");
    assert_eq!(step(&summary, "objects.addSubscriptions")[0]["properties"]["role"], "watcher");
    assert_eq!(step(&summary, "tenants.get")["settings"]["branding"]["primary_color"], "#123456");
    // ...and the cluster has the resources.
    let users = h.api::<User>().list(&Default::default()).await.unwrap().items;
    let sam = users.iter().find(|u| u.spec.id == "sdk-user-1").expect("the identified user");
    assert_eq!(sam.spec.name.as_deref(), Some("Sam Dee"));
    assert!(sam.spec.preferences["default"].channel_types["email"]);
    assert!(!users.iter().any(|u| u.spec.id == "sdk-user-2"), "users.delete removed the User");

    // Trigger: the run id is the TriggerRun's uid; the outcome is read through the SDK.
    let run_id = step(&summary, "workflows.trigger")["workflow_run_id"].as_str().unwrap().to_string();
    let runs = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items;
    let run = runs.iter().find(|r| r.uid().as_deref() == Some(run_id.as_str())).expect("the triggered run");
    assert_eq!(run.spec.workflow, "sdk-flow");
    assert_eq!(run.spec.tenant, Some(json!("sdk-tenant")));
    // The SDK sends an Idempotency-Key with every write; herald stores it.
    assert!(run.spec.idempotency_key.as_deref().is_some_and(|k| k.starts_with("stainless-node-retry-")), "{:?}", run.spec.idempotency_key);
    let outcome = step(&summary, "workflowRecipientRuns.get");
    assert_eq!(outcome["status"], "completed");
    assert_eq!(outcome["workflow_run_id"], run_id.as_str());
    assert_eq!(outcome["recipient"], "sdk-user-1");
    assert_eq!(outcome["tenant"], "sdk-tenant");
    assert_eq!(outcome["actor"], "sdk-user-2");

    // Cancel.
    assert_eq!(step(&summary, "cancelled")["status"], "cancelled");
    let cancellations = h.api::<Cancellation>().list(&Default::default()).await.unwrap().items;
    assert_eq!(cancellations.len(), 1);
    assert_eq!(cancellations[0].spec.cancellation_key, "sdk-ck-2");

    // Errors reach the SDK as its own error classes, with Knock's codes.
    assert_eq!(step(&summary, "trigger unknown workflow"), &json!({"status": 404, "code": "workflow_missing", "type": "invalid_request_error", "class": "NotFoundError"}));
    assert_eq!(summary["missing_is_not_found"], true);
    assert_eq!(step(&summary, "trigger invalid data")["code"], "invalid_params");
    assert_eq!(summary["invalid_is_unprocessable"], true);
    assert_eq!(summary["invalid_errors"][0]["field"], "/data/message");
    assert_eq!(step(&summary, "get deleted user")["status"], 404);
    assert_eq!(step(&summary, "wrong key")["status"], 401);
    assert_eq!(step(&summary, "wrong key")["code"], "authentication_required");
}

/// The ids of a list of messages (or a list of ids, as messages.mjs prints some).
fn ids(messages: &Value) -> Vec<&str> {
    let list = messages.as_array().unwrap_or_else(|| panic!("not a list: {messages}"));
    list.iter().map(|m| m.as_str().or_else(|| m["id"].as_str()).unwrap_or_else(|| panic!("not a message: {m}"))).collect()
}

#[tokio::test]
async fn the_knock_node_sdk_reads_messages_back_from_the_history_store() {
    ensure_sdk();
    let h = Herald::start_with_history().await;
    let receiver = HttpReceiver::start().await;
    receiver.always("/hook", Reply::status(200));
    receiver.always("/down", Reply::status(500));
    h.http_channel("sdk-hook", &receiver.url("/hook"), 1).await;
    h.http_channel("sdk-down", &receiver.url("/down"), 2).await;
    let body = r#"{"to": "{{ recipient.id }}", "n": {{ data.n }}}"#;
    h.workflow("sdk-notify", json!({"steps": [{"ref": "hook", "type": "channel", "channel": "sdk-hook", "template": {"body": body}}]})).await;
    h.workflow("sdk-alarm", json!({"steps": [{"ref": "alarm", "type": "channel", "channel": "sdk-down", "template": {"body": "{}"}}]})).await;

    let s = run_script(&h, "messages.mjs").await;
    let run_id = s["run_id"].as_str().unwrap();
    let alarm_id = s["alarm_run_id"].as_str().unwrap();

    // The SDK's cursor pages, one message each, follow page_info.after to the end,
    // in the order of one big page, and its iterator yields the same messages.
    let pages: Vec<Vec<&str>> = s["pages"].as_array().unwrap().iter().map(ids).collect();
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1], "{pages:?}");
    let one_page = ids(&s["one_page"]);
    assert_eq!(pages.concat(), one_page);
    assert_eq!(ids(&s["paged"]), one_page);

    // What the SDK parsed: Knock's Message, with herald's detail beside it.
    let paged = s["paged"].as_array().unwrap();
    let mut recipients: Vec<String> = paged.iter().map(|m| m["recipient"].to_string()).collect();
    recipients.sort();
    assert_eq!(recipients, vec![r#""sdk-a""#, r#""sdk-b""#, r#"{"collection":"projects","id":"sdk-p1"}"#]);
    for m in paged {
        assert_eq!(m["__typename"], "Message", "{m:#}");
        assert_eq!(m["status"], "sent", "{m:#}");
        assert_eq!(m["workflow"], "sdk-notify");
        assert_eq!(m["source"]["key"], "sdk-notify");
        assert_eq!(m["source"]["step_ref"], "hook");
        assert_eq!(m["source"]["workflow_run_id"], run_id);
        assert_eq!(m["metadata"]["workflow_run_id"], run_id);
        assert_eq!(m["channel_id"], "sdk-hook");
        assert_eq!(m["channel"]["type"], "http");
        assert_eq!(m["tenant"], "sdk-tenant");
        assert_eq!(m["data"]["n"], 7);
        assert_eq!(m["attempts"].as_array().map(Vec::len), Some(1), "{m:#}");
        assert_eq!(m["attempts"][0]["status_code"], 200);
        assert!(m["inserted_at"].as_str().is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()), "{m:#}");
    }
    let to_a = paged.iter().find(|m| m["recipient"] == "sdk-a").unwrap();
    assert_eq!(to_a["content"]["body"], r#"{"to": "sdk-a", "n": 7}"#);
    assert_eq!(receiver.received_at("/hook").len(), 3);

    // Filters as the SDK encodes them (`status[]=`, `inserted_at[gte]=`, `message_ids[]=`).
    let f = &s["filtered"];
    let undelivered = f["undelivered"].as_array().unwrap();
    assert_eq!(undelivered.len(), 1, "{f:#}");
    assert_eq!(undelivered[0]["status"], "undelivered");
    assert_eq!(undelivered[0]["recipient"], "sdk-a");
    assert_eq!(undelivered[0]["metadata"]["workflow_run_id"], alarm_id);
    assert_eq!(undelivered[0]["reason"], "RetriesExhausted");
    assert_eq!(undelivered[0]["attempts"].as_array().map(Vec::len), Some(2));
    let alarm_message = undelivered[0]["id"].as_str().unwrap();
    let mut everything = one_page.clone();
    everything.insert(0, alarm_message);
    let mut sent_or_undelivered = ids(&f["sent_or_undelivered"]);
    let mut expected = everything.clone();
    sent_or_undelivered.sort();
    expected.sort();
    assert_eq!(sent_or_undelivered, expected, "two pages of two");
    assert_eq!(ids(&f["channel"]), vec![alarm_message]);
    assert_eq!(ids(&f["source"]), one_page);
    assert_eq!(ids(&f["tenant"]), one_page);
    assert_eq!(ids(&f["since_2000"]), one_page);
    assert!(ids(&f["before_2000"]).is_empty());
    assert_eq!(ids(&f["recipient_run"]), vec![one_page[0]]);
    let mut by_id = ids(&f["message_ids"]);
    by_id.sort();
    let mut first_two = one_page[..2].to_vec();
    first_two.sort();
    assert_eq!(by_id, first_two);

    // One by id; by recipient.
    assert_eq!(s["get"], paged[0]);
    let user_a = &s["user_a"];
    assert_eq!(user_a.as_array().map(Vec::len), Some(2), "{user_a:#}");
    assert!(user_a.as_array().unwrap().iter().all(|m| m["recipient"] == "sdk-a"));
    assert_eq!(ids(&s["user_a_sent"]), vec![to_a["id"].as_str().unwrap()]);
    assert_eq!(s["user_b"].as_array().map(Vec::len), Some(1));
    assert_eq!(s["user_b"][0]["recipient"], "sdk-b");
    assert_eq!(s["object"].as_array().map(Vec::len), Some(1));
    assert_eq!(s["object"][0]["recipient"], json!({"id": "sdk-p1", "collection": "projects"}));

    // Errors reach the SDK as its own classes.
    assert_eq!(s["missing"], json!({"status": 404, "code": "resource_missing", "expected_class": true, "fields": []}));
    assert_eq!(s["engagement"], json!({"status": 422, "code": "invalid_params", "expected_class": true, "fields": ["engagement_status[]"]}));
}

#[tokio::test]
async fn the_knock_node_sdk_manages_schedules() {
    ensure_sdk();
    let h = Herald::start().await;
    h.workflow("sdk-sched", api_support::delay_workflow("0s")).await;

    let s = run_script(&h, "schedules.mjs").await;

    // Create: one schedule per recipient, in Knock's shape; the inline recipient was identified.
    let created = s["created"].as_array().unwrap();
    assert_eq!(created.len(), 2, "{s:#}");
    for (schedule, recipient) in created.iter().zip(["sch-1", "sch-2"]) {
        assert_eq!(schedule["__typename"], "Schedule");
        assert_eq!(schedule["workflow"], "sdk-sched");
        assert_eq!(schedule["recipient"]["id"], recipient);
        assert_eq!(schedule["recipient"]["__typename"], "User");
        assert_eq!(schedule["tenant"], "sdk-tenant");
        assert_eq!(schedule["data"], json!({"digest": true}));
        assert_eq!(
            schedule["repeats"],
            json!([{"__typename": "ScheduleRepeat", "frequency": "weekly", "interval": 1, "days": ["mon", "wed"], "day_of_month": null, "hours": 9, "minutes": 30}])
        );
        assert_eq!(schedule["last_occurrence_at"], Value::Null);
        assert!(schedule["inserted_at"].as_str().is_some() && schedule["updated_at"].as_str().is_some(), "{schedule:#}");
    }
    // Next occurrence: Monday or Wednesday 09:30 in each recipient's zone.
    for (schedule, zone) in created.iter().zip(["America/New_York", "Europe/Paris"]) {
        let next: jiff::Timestamp = schedule["next_occurrence_at"].as_str().unwrap().parse().unwrap();
        let local = next.to_zoned(jiff::tz::TimeZone::get(zone).unwrap());
        assert_eq!((local.hour(), local.minute()), (9, 30), "{schedule:#}");
        assert!(matches!(local.weekday(), jiff::civil::Weekday::Monday | jiff::civil::Weekday::Wednesday), "{schedule:#}");
    }
    let users = h.api::<User>().list(&Default::default()).await.unwrap().items;
    assert_eq!(users.iter().find(|u| u.spec.id == "sch-2").and_then(|u| u.spec.timezone.as_deref()), Some("Europe/Paris"));

    // Listing: pages of two, followed to the end; newest first.
    let all: Vec<&str> = s["all"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(all.len(), 3, "{s:#}");
    assert_eq!(s["first_page"].as_array().unwrap().len(), 2);
    assert_eq!(s["first_has_next"], true);
    assert_eq!(all[0], s["once"]["id"], "newest first");
    assert_eq!(s["other_workflow"], 0);

    // Update: what the SDK got back and what the cluster holds.
    assert_eq!(s["updated"][0]["repeats"][0]["frequency"], "daily");
    assert_eq!(s["updated"][0]["data"], json!({"digest": false}));
    assert_eq!(s["updated"][0]["id"], created[0]["id"]);
    let schedules = h.api::<Schedule>().list(&Default::default()).await.unwrap().items;
    assert_eq!(schedules.len(), 2, "one deleted");
    let sch1 = schedules.iter().find(|x| x.spec.recipients == vec![json!("sch-1")] && x.spec.scheduled_at.is_none()).expect("sch-1's recurring Schedule");
    assert_eq!(sch1.spec.repeats[0].frequency, herald::resources::schedule::Frequency::Daily);
    assert_eq!(sch1.spec.repeats[0].hours, Some(18));

    // A user's schedules; the one-off fired once, and its run carries the schedule.
    assert_eq!(s["sch2"].as_array().unwrap().len(), 1);
    assert_eq!(s["sch2"][0]["id"], created[1]["id"]);
    assert_eq!(s["fired"]["last_occurrence_at"], s["once_at"]);
    assert_eq!(s["fired"]["next_occurrence_at"], Value::Null);
    let runs = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0].spec.schedule.as_ref().map(|r| r.id.as_str()), s["once"]["id"].as_str());
    assert_eq!(runs[0].spec.data, Some(json!({"once": true}).as_object().unwrap().clone()));

    // Delete answers the deleted schedule; it is gone from the list.
    assert_eq!(s["deleted"][0]["id"], created[1]["id"]);
    let remaining: Vec<&str> = s["after_delete"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(remaining.len(), 2);
    assert!(!remaining.contains(&created[1]["id"].as_str().unwrap()));

    assert_eq!(s["missing"], json!({"status": 404, "code": "workflow_missing"}));
    assert_eq!(s["unknown_id"], json!({"status": 404, "code": "resource_missing"}));
}
