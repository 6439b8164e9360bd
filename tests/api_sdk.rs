//! Compatibility with Knock's official Node SDK (`@knocklabs/node`, pinned in
//! tests/sdk/package.json and installed by scripts/test.sh): the SDK, pointed
//! at herald with its own `KNOCK_BASE_URL`, identifies a user, sets objects and
//! tenants, triggers, cancels and reads the outcome (tests/sdk/compat.mjs).

mod api_support;
mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use api_support::Herald;
use herald::resources::{Cancellation, TriggerRun, User};
use kube::ResourceExt;
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

    let child = tokio::process::Command::new("node")
        .arg("compat.mjs")
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
    assert!(output.status.success(), "compat.mjs failed:\n{stderr}\n{stdout}");
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"));

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
