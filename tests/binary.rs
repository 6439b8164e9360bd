//! The `herald` binary: `herald crds` and `herald run` (JSON logs, health,
//! readiness, graceful shutdown on SIGTERM) against the real control plane.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

#[test]
fn crds_prints_every_kind() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald")).arg("crds").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            v["spec"]["names"]["kind"].as_str().unwrap().to_string()
        })
        .collect();
    for kind in ["Workflow", "TriggerRun", "RecipientPage", "User", "Object", "Tenant", "Audience", "Channel", "Cancellation"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing from {kinds:?}");
    }
}

#[tokio::test]
async fn run_serves_health_logs_json_and_stops_on_sigterm() {
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    // HeraldProcess reads the JSON log lines and fails unless one says where it serves.
    let mut herald = common::HeraldProcess::start(&ns.name, &[]);
    let get = |path: &str| reqwest::get(format!("http://{}{path}", herald.addr));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    common::wait_for("readiness", Duration::from_secs(30), || async { (get("/readyz").await.ok()?.status() == 200).then_some(()) }).await;
    common::wait_for("leadership", Duration::from_secs(30), || async { (herald.metric("herald_leader").await == 1.0).then_some(()) }).await;
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains("# TYPE herald_leader gauge") && metrics.contains("# TYPE herald_work_queue_depth gauge"), "{metrics}");

    // Graceful stop on SIGTERM, with a zero exit code.
    herald.sigterm();
    herald.exits_cleanly("herald to exit after SIGTERM").await;
    // It gave up the leader Lease on the way out, so another replica need not wait for it to expire.
    let lease = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), &ns.name).get("herald-controller").await.unwrap();
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), None, "the Lease is still held after a graceful stop");
}

#[tokio::test]
async fn sigterm_as_the_controllers_start_still_stops_herald() {
    // kube-runtime's controllers used to hang on a shutdown that came before
    // their watch caches were ready; herald drops them then (nothing runs yet).
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    for _ in 0..3 {
        let mut herald = common::HeraldProcess::start(&ns.name, &[]);
        // Watch the log closely: the window is the first few milliseconds.
        let started = std::time::Instant::now();
        while !herald.logs.lock().unwrap().iter().any(|l| l.contains("leading: starting controllers")) {
            assert!(started.elapsed() < Duration::from_secs(30), "herald never started its controllers");
            std::thread::sleep(Duration::from_millis(2));
        }
        herald.sigterm();
        herald.exits_cleanly("herald to exit after SIGTERM").await;
    }
}

#[tokio::test]
async fn after_sigterm_it_reports_not_ready_and_serves_on_for_the_shutdown_delay() {
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    let mut herald = common::HeraldProcess::start(&ns.name, &["--shutdown-delay-seconds", "6"]);
    let addr = herald.addr.clone();
    let get = |path: &str| reqwest::get(format!("http://{addr}{path}"));
    common::wait_for("readiness", Duration::from_secs(30), || async { (get("/readyz").await.ok()?.status() == 200).then_some(()) }).await;

    herald.sigterm();
    // Within the delay: not ready, yet still answering.
    let answer = common::wait_for("/readyz to answer 503", Duration::from_secs(5), || async {
        let response = get("/readyz").await.ok()?;
        (response.status() == 503).then_some(response.text().await.ok()?)
    })
    .await;
    assert_eq!(answer, "not ready: starting or stopping");
    assert_eq!(get("/healthz").await.expect("still serving during the delay").status(), 200);
    assert!(herald.child.try_wait().unwrap().is_none(), "herald exited before its shutdown delay");
    herald.exits_cleanly("herald to exit after the delay").await;
    assert!(get("/healthz").await.is_err(), "the listener is closed after the delay");
}

#[tokio::test]
async fn sigterm_stops_herald_whose_watch_caches_never_fill() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    // A ServiceAccount that may read the CRDs and use every herald kind but Audiences.
    let who = json!([{"kind": "ServiceAccount", "name": "partial", "namespace": ns.name}]);
    let cluster_name = format!("herald-test-partial-{}", ns.name);
    common::create::<ServiceAccount>(&ns, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "partial"}})).await;
    let cluster_roles: kube::Api<ClusterRole> = kube::Api::all(client.clone());
    let cluster_bindings: kube::Api<ClusterRoleBinding> = kube::Api::all(client.clone());
    let post = kube::api::PostParams::default();
    cluster_roles
        .create(
            &post,
            &serde_json::from_value(json!({"metadata": {"name": cluster_name},
        "rules": [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["get", "list"]}]}))
            .unwrap(),
        )
        .await
        .unwrap();
    cluster_bindings
        .create(
            &post,
            &serde_json::from_value(json!({"metadata": {"name": cluster_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name}, "subjects": who}))
            .unwrap(),
        )
        .await
        .unwrap();
    let kinds = [
        "workflows",
        "triggerruns",
        "triggerruns/status",
        "recipientpages",
        "recipientpages/status",
        "users",
        "objects",
        "tenants",
        "channels",
        "channels/status",
        "workflows/status",
        "cancellations",
    ];
    common::create::<Role>(
        &ns,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "partial"}, "rules": [
            {"apiGroups": ["herald.dev"], "resources": kinds, "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "patch"]},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}
        ]}),
    )
    .await;
    common::create::<RoleBinding>(
        &ns,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "partial"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "partial"}, "subjects": who}),
    )
    .await;
    let kubeconfig = std::env::temp_dir().join(format!("herald-partial-{}.kubeconfig", ns.name));
    common::kubeconfig_with_token(&common::token_for(&client, &ns.name, "partial").await, &kubeconfig);

    let mut herald = common::HeraldProcess::start_as(&ns.name, &[], &kubeconfig);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = reqwest::get(format!("http://{}/readyz", herald.addr)).await.unwrap();
    assert_eq!(ready.status(), 503, "the Audience cache cannot fill, so herald is not ready");
    herald.sigterm();
    herald.exits_cleanly("herald to exit after SIGTERM").await;
    let _ = std::fs::remove_file(&kubeconfig);
    let delete = kube::api::DeleteParams::default();
    let _ = cluster_bindings.delete(&cluster_name, &delete).await;
    let _ = cluster_roles.delete(&cluster_name, &delete).await;
}

#[test]
fn run_logs_are_json_lines() {
    // `herald run` against an unreachable apiserver fails, and says so in a JSON log line or on stderr.
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["run", "--log-format", "json", "--api-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connecting to Kubernetes"), "{stderr}");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let _: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}
