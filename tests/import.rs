//! `herald import knock` (the real binary) on fixtures laid out as Knock's
//! CLI writes them (tests/fixtures/knock): strict imports list every problem
//! and write nothing; --lossy warns and writes; the output reads as herald
//! Workflows; and, on the real local control plane, every imported Workflow
//! becomes Ready and a run of one delivers what the Knock template would.

mod common;
mod receivers;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{create, wait_for, TestNamespace};
use herald::resources::{Channel, TriggerRun, User, Workflow};
use kube::ResourceExt;
use receivers::{HttpReceiver, Reply};
use serde_json::json;

const CHANNELS: &[&str] = &["--channel", "slack_ci=slack", "--channel", "postmark=mail"];

fn fixture(rel: &str) -> PathBuf {
    common::repo_path("tests/fixtures/knock").join(rel)
}

fn herald(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald")).args(["import", "knock"]).arg(dir).args(args).output().expect("running herald")
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr).lines().map(str::to_string).collect()
}

/// The Workflows of a multi-document YAML stream.
fn workflows(yaml: &str) -> Vec<Workflow> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("a YAML document"))
        .filter(|v: &serde_json::Value| !v.is_null())
        .map(|v| {
            assert_eq!(v["apiVersion"], "herald.dev/v1alpha1");
            assert_eq!(v["kind"], "Workflow");
            serde_json::from_value(v).expect("a herald Workflow")
        })
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-import-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every problem of the unsupported fixtures, one line each, in order.
const UNSUPPORTED: &[&str] = &[
    "error: workflow `kitchen-sink` step `email_2`: `template.text_body@`: `../../secret.txt` points outside the workflow's directory (dropped)",
    "error: workflow `kitchen-sink`: `settings.is_commercial`: herald has no commercial (unsubscribe) handling (dropped)",
    "error: workflow `kitchen-sink` step `email_1`: template.subject: uses translations (`{% t %}` or the `t` filter); herald has none (the default-locale text is kept)",
    "error: workflow `kitchen-sink` step `email_1`: email `visual_blocks`: herald has no visual blocks (dropped; write the HTML in html_body)",
    "error: workflow `kitchen-sink` step `email_2`: template.html: uses partials (`render 'footer', name: recipient.name`); herald has no partials (removed)",
    "error: workflow `kitchen-sink` step `email_2`: template.html: uses translations (`{% t %}` or the `t` filter); herald has none (the default-locale text is kept)",
    "error: workflow `kitchen-sink` step `push_1`: channel `apns` is a `push` channel: herald has no `push` channels (step dropped)",
    "error: workflow `kitchen-sink` step `in_app_feed_1`: template.actionUrl: `vars.app_url`: herald has no environment variables (`vars`; it renders empty)",
    "error: workflow `kitchen-sink` step `batch_1`: `batch_order: desc` (render the newest activities): herald renders the oldest (asc kept)",
    "error: workflow `kitchen-sink` step `wait_1`: step type `wait_for_event`: herald has no such step (step dropped)",
    "error: workflow `kitchen-sink` step `fetch_1`: condition on `data.plan`: the argument `recipient.plan` names a value of the run (a dynamic argument); herald compares with the text as written (kept)",
    "error: workflow `kitchen-sink` step `fetch_1`: `signing_key`: herald signs fetches with a Secret (`fetch.secretRef`) and its own X-Herald-Signature header, not Knock's x-knock-signature (dropped)",
    "error: workflow `new-comment` step `sms_1`: channel `sms-provider` is a `sms` channel: herald has no `sms` channels (step dropped)",
    "error: workflow `new-comment` step `email_1`: email layout `default`: not found beside the workflows (pull it with `knock layout pull --all` and import the Knock directory); the body is sent without it",
    "error: workflow `new-comment` step `email_2`: email layout `default`: not found beside the workflows (pull it with `knock layout pull --all` and import the Knock directory); the body is sent without it",
    "error: workflow `new-comment` step `email_3`: email layout `default`: not found beside the workflows (pull it with `knock layout pull --all` and import the Knock directory); the body is sent without it",
    "16 problem(s) in 2 workflow(s); nothing written (--lossy imports anyway, dropping what herald cannot reproduce)",
];

#[test]
fn strict_import_lists_every_problem_and_writes_nothing() {
    let out_dir = temp_dir("strict");
    let out = herald(&["-o", out_dir.to_str().unwrap()], &fixture("unsupported"));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stderr_lines(&out), UNSUPPORTED);
    assert!(out.stdout.is_empty());
    assert!(!out_dir.exists(), "nothing may be written");
    // Printing to stdout: likewise nothing.
    let out = herald(&[], &fixture("unsupported/workflows/new-comment"));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(stderr_lines(&out).len(), 5, "{:?}", stderr_lines(&out));
}

#[test]
fn lossy_import_warns_and_writes_what_it_can() {
    let out_dir = temp_dir("lossy");
    let out = herald(&["--lossy", "-o", out_dir.to_str().unwrap()], &fixture("unsupported"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = stderr_lines(&out);
    let warnings: Vec<String> = lines.iter().filter(|l| l.starts_with("warning: ")).map(|l| l.replacen("warning: ", "error: ", 1)).collect();
    assert_eq!(warnings, UNSUPPORTED[..UNSUPPORTED.len() - 1]);
    let mut files: Vec<String> = std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, vec!["kitchen-sink.yaml", "new-comment.yaml"]);
    let wf = workflows(&std::fs::read_to_string(out_dir.join("new-comment.yaml")).unwrap()).remove(0);
    let refs: Vec<&str> = herald::core::path::all_steps(&wf.spec.steps).iter().map(|s| s.step_ref.as_str()).collect();
    assert_eq!(refs, vec!["delay_1", "email_1", "branch_1", "email_2", "email_3"], "the sms step is dropped");
    assert!(!wf.spec.active, "Knock's __readonly.active is kept");
    let ks = workflows(&std::fs::read_to_string(out_dir.join("kitchen-sink.yaml")).unwrap()).remove(0);
    let refs: Vec<&str> = ks.spec.steps.iter().map(|s| s.step_ref.as_str()).collect();
    assert_eq!(refs, vec!["email_1", "email_2", "in_app_feed_1", "batch_1", "fetch_1"]);
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn a_clean_knock_project_imports_from_any_of_its_directories() {
    let root = herald(CHANNELS, &fixture("project"));
    assert!(root.status.success(), "{}", String::from_utf8_lossy(&root.stderr));
    assert!(root.stderr.is_empty(), "{}", String::from_utf8_lossy(&root.stderr));
    let yaml = String::from_utf8(root.stdout.clone()).unwrap();
    for dir in ["project/knock", "project/knock/workflows"] {
        assert_eq!(herald(CHANNELS, &fixture(dir)).stdout, root.stdout, "{dir}");
    }
    let all = workflows(&yaml);
    let keys: Vec<String> = all.iter().map(Workflow::key).collect();
    assert_eq!(keys, vec!["build-finished", "new-comment", "weekly_digest"]);
    let names: Vec<String> = all.iter().map(|w| w.name_any()).collect();
    assert_eq!(names, vec!["build-finished".to_string(), "new-comment".into(), herald::core::ids::name_for_id("weekly_digest")]);
    for wf in &all {
        herald::controller::workflow::compile(&wf.spec).unwrap_or_else(|e| panic!("{}: {e}", wf.key()));
    }
    // One workflow's directory finds the layouts two levels up.
    let one = herald(CHANNELS, &fixture("project/knock/workflows/new-comment"));
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    let new_comment = workflows(&String::from_utf8(one.stdout).unwrap()).remove(0);
    assert_eq!(json!(new_comment), json!(all[1]));
    let html = new_comment.spec.steps[2].template.as_ref().unwrap().html.clone().unwrap();
    assert!(html.starts_with("{% capture content %}<p>Hi {{ recipient.name }},</p>") && html.contains("<div class=\"content\">{{ content }}</div>"), "{html}");

    // Without the channel map, Knock's `slack_ci` is no Channel name.
    let unmapped = herald(&[], &fixture("project"));
    assert_eq!(unmapped.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&unmapped)[..2],
        [
            "error: workflow `build-finished` step `chat_1`: channel `slack_ci` is not a valid Channel name; map it with --channel slack_ci=NAME (kept as is)",
            "error: workflow `weekly_digest` step `chat_1`: channel `slack_ci` is not a valid Channel name; map it with --channel slack_ci=NAME (kept as is)",
        ]
    );
    // -o writes one file per workflow.
    let out_dir = temp_dir("project");
    let mut args = CHANNELS.to_vec();
    args.extend(["-o", out_dir.to_str().unwrap()]);
    assert!(herald(&args, &fixture("project")).status.success());
    let mut written: Vec<Workflow> = Vec::new();
    for name in ["build-finished", "new-comment", &herald::core::ids::name_for_id("weekly_digest")] {
        written.extend(workflows(&std::fs::read_to_string(out_dir.join(format!("{name}.yaml"))).unwrap()));
    }
    assert_eq!(json!(written), json!(all));
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// Every imported Workflow becomes Ready under a real operator, and a run of
/// `build-finished` fetches the build, takes the `Failed` branch and calls
/// the webhook with the body, header and query Knock's template would send.
#[tokio::test]
async fn imported_workflows_become_ready_and_deliver_what_knock_would() {
    let out = herald(CHANNELS, &fixture("project"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout).unwrap();

    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let mut settings = herald::settings::Settings::for_namespace(&ns.name);
    // The in-app step and once-per-recipient need the history store.
    settings.database_url = Some(common::database().await);
    let _op = common::operator_with(&client, settings).await;

    for (name, spec) in [
        ("ci-hooks", json!({"type": "http"})),
        ("slack", json!({"type": "chat", "url": receiver.url("/slack")})),
        ("mail", json!({"type": "email", "smtp": {"host": "127.0.0.1", "port": 2525, "tls": "none"}, "from": "herald@example.com"})),
        ("in-app", json!({"type": "in_app_feed"})),
    ] {
        create::<Channel>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": name}, "spec": spec})).await;
    }
    common::apply_yaml(&ns, &yaml).await;
    let api = ns.api::<Workflow>();
    for wf in workflows(&yaml) {
        let name = wf.name_any();
        wait_for(&format!("Workflow {name} to be Ready"), Duration::from_secs(30), || async {
            let wf = api.get(&name).await.ok()?;
            let ready = wf.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
            assert_ne!(ready.reason, "InvalidWorkflow", "{name}: {}", ready.message);
            (ready.status == "True").then_some(())
        })
        .await;
    }

    create::<User>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "user-1"}, "spec": {"id": "user_1", "name": "Ada"}})).await;
    receiver.always("/status", Reply::status(200).body(r#"{"status": "failed", "summary": "2 tests \"failed\"", "retries": 1}"#));
    let run: TriggerRun = create(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "build-"}, "spec": {
            "workflow": "build-finished", "recipients": ["user_1"],
            "data": {"build_id": "b-1", "callback_url": receiver.url("/hook"), "status_url": receiver.url("/status")}}}),
    )
    .await;
    let run = common::runs::finished(&ns, &run.name_any()).await;
    let status = run.status.clone().unwrap();
    assert_eq!(format!("{:?}", status.state), "Completed", "{status:?}");

    let fetched = receiver.received_at("/status");
    assert_eq!(fetched.len(), 1);
    assert_eq!((fetched[0].method.as_str(), fetched[0].query.as_str(), fetched[0].header("accept")), ("GET", "build=b-1", Some("application/json")));
    let hooks = receiver.received_at("/hook");
    assert_eq!(hooks.len(), 1, "the Failed branch calls the webhook once");
    let hook = &hooks[0];
    assert_eq!(hook.method, "POST");
    assert_eq!(hook.query, "source=knock+import");
    assert_eq!(hook.header("x-build"), Some("b-1"));
    // What Knock's template renders for this data, field by field.
    assert_eq!(hook.json(), json!({"text": "2 tests \"failed\"", "build": "b-1", "status": "FAILED", "recipient": "user_1"}));
    assert!(receiver.received_at("/slack").is_empty(), "the Default branch is not taken");
}
