//! The Helm chart (charts/herald), with real Helm: Helm v4's Go SDK through the
//! PyPI package helm-python-sdk (tests/helm/helm_tool.py), so no helm binary.
//!
//! * lint, render with default and other values, the values schema;
//! * the chart's crds/ are the repository's crds/;
//! * install, upgrade and uninstall against the local control plane, checking
//!   what the ServiceAccount may do with SubjectAccessReviews;
//! * the operator binary run with the chart's Deployment settings and nothing
//!   but the chart's ServiceAccount token (TokenRequest API): a run through
//!   kubectl and through the HTTP API completes, and what the chart does not
//!   grant is refused.
//!
//! The local control plane has no kubelet, so the Deployment's pods never
//! start; the test runs the binary itself as the pod would.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_for, TestNamespace};
use herald::resources::{Channel, RecipientPage, Tenant, TriggerRun, User, Workflow};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

const RELEASE: &str = "herald";
/// The Lease the chart names for release `herald` (its full name).
const LEASE: &str = "herald";

// ---------------------------------------------------------------------------
// Helm through tests/helm/helm_tool.py

fn chart() -> PathBuf {
    common::repo_path("charts/herald")
}

/// Helm refused (lint findings are data, not refusals).
#[derive(Debug)]
struct Refusal {
    kind: String,
    message: String,
}

/// Runs `helm_tool.py COMMAND ARGS --values VALUES`: its `ok` answer, or Helm's refusal.
fn helm(command: &str, args: &[&str], values: &Value) -> Result<Value, Refusal> {
    let script = common::repo_path("tests/helm/helm_tool.py");
    let out = Command::new("python3").arg(&script).arg(command).args(args).arg("--values").arg(values.to_string()).output().unwrap_or_else(|e| {
        panic!("cannot run python3 ({e}); the Helm tests need Python 3 and helm-python-sdk: `python3 -m pip install helm-python-sdk==0.2.2` (scripts/test.sh does)")
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!("{}", stderr.trim());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("helm_tool.py {command} {args:?} answered no JSON ({e}, {}):\nstdout: {stdout}\nstderr: {stderr}", out.status));
    match answer.get("ok") {
        Some(ok) => Ok(ok.clone()),
        None => {
            Err(Refusal { kind: answer["error"]["type"].as_str().unwrap_or_default().to_string(), message: answer["error"]["message"].as_str().unwrap_or_default().to_string() })
        }
    }
}

/// `helm` off the async runtime (Helm talks to the apiserver for seconds).
async fn helm_async(command: &'static str, args: Vec<String>, values: Value) -> Result<Value, Refusal> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        helm(command, &args, &values)
    })
    .await
    .expect("helm task")
}

/// Uninstalls the release when dropped (a failed test leaves no cluster-wide RBAC behind).
struct Installed {
    namespace: String,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let args = ["--name", RELEASE, "--namespace", &self.namespace, "--kubeconfig", &kubeconfig_arg(), "--ignore-not-found"];
        let _ = helm("uninstall", &args, &json!({}));
    }
}

async fn install(namespace: &str, values: Value) -> (Value, Installed) {
    let args = vec![chart_arg(), "--name".into(), RELEASE.into(), "--namespace".into(), namespace.into(), "--kubeconfig".into(), kubeconfig_arg(), "--skip-crds".into()];
    let release = helm_async("install", args, values).await.unwrap_or_else(|r| panic!("helm install refused: {r:?}"));
    (release, Installed { namespace: namespace.to_string() })
}

async fn upgrade(namespace: &str, values: Value) -> Value {
    let args = vec![chart_arg(), "--name".into(), RELEASE.into(), "--namespace".into(), namespace.into(), "--kubeconfig".into(), kubeconfig_arg()];
    helm_async("upgrade", args, values).await.unwrap_or_else(|r| panic!("helm upgrade refused: {r:?}"))
}

async fn uninstall(namespace: &str) -> Value {
    let args = vec!["--name".into(), RELEASE.into(), "--namespace".into(), namespace.into(), "--kubeconfig".into(), kubeconfig_arg()];
    helm_async("uninstall", args, json!({})).await.unwrap_or_else(|r| panic!("helm uninstall refused: {r:?}"))
}

fn chart_arg() -> String {
    chart().display().to_string()
}

fn kubeconfig_arg() -> String {
    common::kubeconfig().display().to_string()
}

/// The chart's manifests, rendered offline, as objects.
struct Rendered {
    objects: Vec<Value>,
    notes: String,
}

impl Rendered {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.of_kind(kind);
        assert_eq!(all.len(), 1, "expected one {kind}, rendered {}", all.len());
        all[0]
    }

    fn container(&self) -> &Value {
        &self.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    }

    /// The container's environment: name to value (or to `fieldRef:<path>`).
    fn env(&self) -> BTreeMap<String, String> {
        env_of(self.container())
    }
}

fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let from = &e["valueFrom"];
            let value = match (from["fieldRef"]["fieldPath"].as_str(), from["secretKeyRef"]["name"].as_str()) {
                (Some(path), _) => format!("fieldRef:{path}"),
                (None, Some(secret)) => format!("secretKeyRef:{secret}/{}", from["secretKeyRef"]["key"].as_str().unwrap_or_default()),
                _ => e["value"].as_str().unwrap_or_default().to_string(),
            };
            (e["name"].as_str().unwrap().to_string(), value)
        })
        .collect()
}

fn try_render(values: Value, namespace: &str) -> Result<Rendered, Refusal> {
    let files = helm("render", &[&chart_arg(), "--name", RELEASE, "--namespace", namespace], &values)?;
    let mut objects = Vec::new();
    let mut notes = String::new();
    for (path, text) in files.as_object().expect("a map of template to manifest") {
        let text = text.as_str().unwrap();
        if path.ends_with("NOTES.txt") {
            notes = text.to_string();
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{path} renders invalid YAML: {e}\n{text}"));
            if !value.is_null() {
                objects.push(value);
            }
        }
    }
    Ok(Rendered { objects, notes })
}

fn render(values: Value, namespace: &str) -> Rendered {
    try_render(values, namespace).unwrap_or_else(|r| panic!("rendering refused: {r:?}"))
}

// ---------------------------------------------------------------------------
// RBAC as (apiGroup, resource, verb) triples

type Grant = (String, String, String);

fn grants(rules: &Value) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in rules.as_array().expect("rules") {
        for list in ["apiGroups", "resources", "verbs"] {
            assert!(!rule[list].as_array().unwrap().iter().any(|v| v == "*"), "a wildcard in {list}: {rule}");
        }
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    out.insert((group.as_str().unwrap().into(), resource.as_str().unwrap().into(), verb.as_str().unwrap().into()));
                }
            }
        }
    }
    out
}

fn triples(entries: &[(&str, &[&str], &[&str])]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for (group, resources, verbs) in entries {
        for resource in *resources {
            for verb in *verbs {
                out.insert((group.to_string(), resource.to_string(), verb.to_string()));
            }
        }
    }
    out
}

/// What the operator does in a namespace it watches — exactly this, no more.
fn namespace_grants() -> BTreeSet<Grant> {
    triples(&[
        ("herald.dev", &["workflows", "audiences", "channels"], &["get", "list", "watch"]),
        ("herald.dev", &["triggerruns"], &["get", "list", "watch", "create", "patch", "delete"]),
        ("herald.dev", &["cancellations"], &["get", "list", "watch", "create", "delete"]),
        ("herald.dev", &["recipientpages"], &["get", "list", "watch", "create", "patch", "delete", "deletecollection"]),
        ("herald.dev", &["batches"], &["get", "list", "watch", "create", "update", "delete"]),
        ("herald.dev", &["throttles"], &["get", "list", "watch", "create", "update", "patch", "delete"]),
        ("herald.dev", &["schedules"], &["get", "list", "watch", "create", "update", "patch", "delete"]),
        ("herald.dev", &["memberslices"], &["get", "list", "watch", "create", "update", "delete"]),
        ("herald.dev", &["users", "objects", "tenants"], &["get", "list", "watch", "create", "update", "patch", "delete"]),
        ("herald.dev", &["workflows/status", "triggerruns/status", "recipientpages/status", "channels/status", "schedules/status"], &["get", "patch", "update"]),
        ("events.k8s.io", &["events"], &["create", "patch"]),
        ("", &["events"], &["create", "patch"]),
        ("", &["secrets"], &["get"]),
    ])
}

/// API keys: the labelled Secrets of the key namespace (only there may herald list Secrets).
fn api_key_grants() -> BTreeSet<Grant> {
    triples(&[("", &["secrets"], &["get", "list", "watch"])])
}

/// Cluster-scoped needs, whatever the scope.
fn cluster_grants() -> BTreeSet<Grant> {
    triples(&[
        ("authentication.k8s.io", &["tokenreviews"], &["create"]),
        ("authorization.k8s.io", &["subjectaccessreviews"], &["create"]),
        ("apiextensions.k8s.io", &["customresourcedefinitions"], &["get", "list", "watch"]),
    ])
}

fn lease_grants() -> BTreeSet<Grant> {
    triples(&[("coordination.k8s.io", &["leases"], &["create", "get", "update", "patch"])])
}

fn union(a: BTreeSet<Grant>, b: BTreeSet<Grant>) -> BTreeSet<Grant> {
    a.into_iter().chain(b).collect()
}

/// The names of the CRDs in a folder of CRD files.
fn crd_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            let crd: Value = serde_yaml::from_str(&text).unwrap();
            crd["metadata"]["name"].as_str().unwrap().to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Offline: lint, render, schema, files

#[test]
fn lint_is_clean() {
    for values in
        [json!({}), json!({"replicaCount": 3, "rbac": {"scope": "namespaced", "watchNamespaces": ["team-a"]}, "ingress": {"enabled": true}, "serviceMonitor": {"enabled": true}})]
    {
        let report = helm("lint", &[&chart_arg(), "--namespace", "herald-system"], &values).unwrap_or_else(|r| panic!("lint refused: {r:?}"));
        assert_eq!(report["total_charts_linted"], 1, "{report}");
        assert_eq!(report["errors"], json!([]), "lint errors with {values}: {report}");
        // Severity 1 is information (Helm recommends an icon); 2 warnings, 3 errors.
        let findings: Vec<&Value> = report["messages"].as_array().unwrap().iter().filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2).collect();
        assert!(findings.is_empty(), "lint warnings with {values}: {findings:?}");
    }
}

#[test]
fn renders_defaults() {
    let chart_yaml: Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart_yaml["apiVersion"], "v2");
    let app_version = chart_yaml["appVersion"].as_str().unwrap();
    assert_eq!(app_version, env!("CARGO_PKG_VERSION"), "the chart's appVersion is the crate's version");

    let r = render(json!({}), "herald-system");
    let deployment = r.one("Deployment");
    assert_eq!(deployment["metadata"]["namespace"], "herald-system");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "herald");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");

    let c = r.container();
    assert_eq!(c["image"], format!("ghcr.io/herald-dev/herald:{app_version}"));
    assert_eq!(c["args"], json!(["run"]), "the image's entrypoint is herald; the chart runs `herald run`");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["ports"], json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]));
    assert_eq!(c["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "http"}));
    assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "http"}));
    assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["limits"]["memory"].is_string(), "{}", c["resources"]);

    let env = r.env();
    assert_eq!(env["HERALD_API_ADDR"], "0.0.0.0:8080");
    assert_eq!(env["HERALD_LOG_FORMAT"], "json");
    assert!(!env.contains_key("HERALD_NAMESPACE"), "cluster scope watches every namespace");
    assert_eq!(env["HERALD_LEADER_ELECTION"], "true");
    assert_eq!(env["HERALD_LEASE_SECONDS"], "15");
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert_eq!(env["HERALD_SHUTDOWN_GRACE_SECONDS"], "20", "reconciles get the pod's grace period less 10 s");
    assert_eq!(env["HERALD_SHUTDOWN_DELAY_SECONDS"], "5");
    assert_eq!(env["HERALD_LEASE_NAME"], LEASE);
    assert_eq!(env["HERALD_POD_NAME"], "fieldRef:metadata.name");
    assert_eq!(env["HERALD_LEASE_NAMESPACE"], "fieldRef:metadata.namespace");
    assert!(!env.contains_key("HERALD_EGRESS_DENY_CIDRS") && !env.contains_key("HERALD_EGRESS_ALLOW_CIDRS"), "only the built-in egress rules");
    assert!(!env.contains_key("HERALD_DATABASE_URL"), "no history store unless asked for");
    assert!(!env.contains_key("HERALD_CORS_ALLOWED_ORIGINS"), "no CORS unless origins are named");

    // RBAC: one ClusterRole with everything, the Lease Role in the release's namespace.
    let cluster_role = r.one("ClusterRole");
    assert_eq!(cluster_role["metadata"]["name"], "herald-herald-system");
    assert_eq!(grants(&cluster_role["rules"]), union(cluster_grants(), namespace_grants()));
    let binding = r.one("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], "herald-herald-system");
    assert_eq!(binding["subjects"], json!([{"kind": "ServiceAccount", "name": "herald", "namespace": "herald-system"}]));
    let roles = r.of_kind("Role");
    assert_eq!(roles.len(), 2, "the API-key Role and the leader-election Role");
    assert!(roles.iter().all(|r| r["metadata"]["namespace"] == "herald-system"), "{roles:?}");
    let role = |name: &str| roles.iter().find(|r| r["metadata"]["name"] == name).unwrap_or_else(|| panic!("Role {name}"));
    assert_eq!(grants(&role("herald-leader-election")["rules"]), lease_grants());
    assert_eq!(grants(&role("herald-api-keys")["rules"]), api_key_grants());
    assert_eq!(env["HERALD_API_KEY_NAMESPACE"], "herald-system", "API keys live in the release's namespace by default");
    assert_eq!(r.of_kind("RoleBinding").len(), 2);
    assert_eq!(r.one("ServiceAccount")["metadata"]["name"], "herald");

    let service = r.one("Service");
    assert_eq!(service["spec"]["ports"], json!([{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]));
    assert!(r.of_kind("PodDisruptionBudget").is_empty(), "one replica: no PodDisruptionBudget");
    assert!(r.of_kind("Ingress").is_empty() && r.of_kind("ServiceMonitor").is_empty());

    // Every HERALD_* variable the chart sets is one `herald run` reads.
    let help = Command::new(env!("CARGO_BIN_EXE_herald")).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for name in env.keys().filter(|n| n.starts_with("HERALD_")) {
        assert!(help.contains(&format!("env: {name}=")), "the chart sets {name}, which `herald run --help` does not list:\n{help}");
    }

    assert!(r.notes.contains("kubectl") && r.notes.contains("curl") && r.notes.contains("/v1/workflows/welcome/trigger"), "NOTES tell how to trigger: {}", r.notes);
}

#[test]
fn renders_other_values() {
    let values = json!({
        "replicaCount": 3,
        "image": {"digest": format!("sha256:{}", "a".repeat(64))},
        "operator": {
            "logFormat": "text", "port": 9090, "shutdownDelaySeconds": 0, "rateLimit": {"perSecond": 50, "burst": 100}, "extraArgs": ["--workflow-grace-seconds=5"],
            "egress": {"denyCidrs": ["10.0.0.0/8", "fd00::/8"], "allowCidrs": ["10.96.0.10"]},
            "corsAllowedOrigins": ["https://app.example.com", "http://localhost:5173"], "maxSockets": 500,
        },
        "leaderElection": {"leaseSeconds": 30},
        "terminationGracePeriodSeconds": 5,
        "rbac": {"scope": "namespaced", "watchNamespaces": ["team-a"]},
        "apiKeys": {"namespace": "herald-keys"},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
        "ingress": {"enabled": true, "className": "nginx", "hosts": [{"host": "herald.example.org", "paths": [{"path": "/v1", "pathType": "Prefix"}]}]},
        "serviceMonitor": {"enabled": true, "interval": "15s"},
        "podDisruptionBudget": {"maxUnavailable": 1},
        "history": {"enabled": true, "databaseUrlSecret": {"name": "herald-db-app"}, "finishedTtlSeconds": 60, "retentionDays": 14},
    });
    let r = render(values, "herald-system");
    let deployment = r.one("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let c = r.container();
    assert_eq!(c["image"], format!("ghcr.io/herald-dev/herald@sha256:{}", "a".repeat(64)));
    assert_eq!(c["args"], json!(["run", "--workflow-grace-seconds=5"]));
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(c["resources"]["limits"], json!({"cpu": 1, "memory": "1Gi"}));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let env = r.env();
    assert_eq!(env["HERALD_API_ADDR"], "0.0.0.0:9090");
    assert_eq!(env["HERALD_LOG_FORMAT"], "text");
    assert_eq!(env["HERALD_NAMESPACE"], "team-a");
    assert_eq!(env["HERALD_LEASE_SECONDS"], "30");
    assert_eq!(env["HERALD_SHUTDOWN_GRACE_SECONDS"], "1", "never less than a second");
    assert_eq!(env["HERALD_SHUTDOWN_DELAY_SECONDS"], "0");
    assert_eq!(env["HERALD_RATE_LIMIT_PER_SECOND"], "50");
    assert_eq!(env["HERALD_RATE_LIMIT_BURST"], "100");
    assert_eq!(env["HERALD_EGRESS_DENY_CIDRS"], "10.0.0.0/8,fd00::/8");
    assert_eq!(env["HERALD_EGRESS_ALLOW_CIDRS"], "10.96.0.10");
    assert_eq!(env["HERALD_CORS_ALLOWED_ORIGINS"], "https://app.example.com,http://localhost:5173");
    assert_eq!(env["HERALD_MAX_SOCKETS"], "500");
    assert_eq!(env["HERALD_API_KEY_NAMESPACE"], "herald-keys");
    assert_eq!(env["HERALD_DATABASE_URL"], "secretKeyRef:herald-db-app/uri", "the URL comes from a Secret (CloudNativePG's app Secret has it under `uri`)");
    assert_eq!(env["HERALD_FINISHED_TTL_SECONDS"], "60");
    assert_eq!(env["HERALD_HISTORY_RETENTION_DAYS"], "14");

    // Namespaced RBAC: herald's permissions only in team-a; cluster-scoped needs
    // in the ClusterRole; the Lease in the release's namespace.
    let cluster_role = r.one("ClusterRole");
    assert_eq!(grants(&cluster_role["rules"]), cluster_grants());
    let crd_rule = cluster_role["rules"].as_array().unwrap().iter().find(|r| r["apiGroups"][0] == "apiextensions.k8s.io").unwrap();
    let named: BTreeSet<String> = crd_rule["resourceNames"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    assert_eq!(named, crd_names(&common::repo_path("crds")), "the CRD rule names exactly herald's CRDs");
    let roles = r.of_kind("Role");
    assert_eq!(roles.len(), 3, "a Role in team-a, the API-key Role and the leader-election Role");
    let keys = roles.iter().find(|r| r["metadata"]["namespace"] == "herald-keys").expect("the API-key Role in herald-keys");
    assert_eq!(grants(&keys["rules"]), api_key_grants());
    let watched = roles.iter().find(|r| r["metadata"]["namespace"] == "team-a").expect("a Role in team-a");
    assert_eq!(grants(&watched["rules"]), namespace_grants());
    let lease = roles.iter().find(|r| r["metadata"]["namespace"] == "herald-system").expect("the leader-election Role");
    assert_eq!(grants(&lease["rules"]), lease_grants());
    let named_lease = lease["rules"].as_array().unwrap().iter().find(|r| r["verbs"].as_array().unwrap().iter().any(|v| v == "update")).unwrap();
    assert_eq!(named_lease["resourceNames"], json!([LEASE]));
    let bindings = r.of_kind("RoleBinding");
    assert_eq!(bindings.len(), 3);
    for b in bindings {
        assert_eq!(b["subjects"], json!([{"kind": "ServiceAccount", "name": "herald", "namespace": "herald-system"}]), "{b}");
    }

    let pdb = r.one("PodDisruptionBudget");
    assert_eq!(pdb["apiVersion"], "policy/v1", "policy/v1 where the cluster serves it (policy/v1beta1 before Kubernetes 1.21)");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(pdb["spec"].get("minAvailable").is_none());
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    let ingress = r.one("Ingress");
    assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
    assert_eq!(ingress["spec"]["rules"][0]["host"], "herald.example.org");
    assert_eq!(ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"], json!({"name": "herald", "port": {"name": "http"}}));
    let monitor = r.one("ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"], json!([{"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}]));
    assert_eq!(r.one("Service")["spec"]["ports"][0]["port"], 8080);
    assert!(r.notes.contains("team-a"), "{}", r.notes);

    // Namespaced without a list: the release's namespace.
    let r = render(json!({"rbac": {"scope": "namespaced"}}), "herald-system");
    assert_eq!(r.env()["HERALD_NAMESPACE"], "herald-system");
    assert!(r.of_kind("Role").iter().all(|role| role["metadata"]["namespace"] == "herald-system"));
    assert_eq!(r.of_kind("Role").len(), 3, "herald's, the API-key and the leader-election Role");
}

#[test]
fn schema_and_templates_refuse_bad_values() {
    let cases = [
        (json!({"replicaCount": "two"}), "/replicaCount", "want integer"),
        (json!({"operator": {"logFormat": "yaml"}}), "/operator/logFormat", "'json', 'text'"),
        (json!({"rbac": {"scope": "everywhere"}}), "/rbac/scope", "'cluster', 'namespaced'"),
        (json!({"rbac": {"watchNamespaces": ["Not_A_Namespace"]}}), "/rbac/watchNamespaces/0", ""),
        (json!({"leaderElection": {"leaseSeconds": 1}}), "/leaderElection/leaseSeconds", "minimum"),
        (json!({"replicas": 2}), "'replicas' not allowed", ""),
        (json!({"image": {"pullPolicy": "Sometimes"}}), "/image/pullPolicy", ""),
        (json!({"operator": {"egress": {"denyCidrs": ["metadata.google.internal"]}}}), "/operator/egress/denyCidrs/0", ""),
        (json!({"operator": {"egress": {"allowCidrs": "10.0.0.0/8"}}}), "/operator/egress/allowCidrs", "want array"),
        (json!({"history": {"retentionDays": 3}}), "/history/retentionDays", "minimum"),
    ];
    for (values, at, says) in cases {
        let refusal = helm("validate", &[&chart_arg()], &values).expect_err(&format!("the schema accepts {values}"));
        assert_eq!(refusal.kind, "HelmValuesError", "{refusal:?}");
        assert!(refusal.message.contains(at) && refusal.message.contains(says), "refusing {values}, Helm should say `{at}` and `{says}`: {}", refusal.message);
        // Rendering (as install does) refuses them the same way.
        let refusal = try_render(values.clone(), "herald-system").err().unwrap_or_else(|| panic!("rendered {values}"));
        assert!(refusal.message.contains(at), "{}", refusal.message);
    }
    assert!(helm("validate", &[&chart_arg()], &json!({"replicaCount": 2, "operator": {"logFormat": "text"}})).is_ok());

    // Several watched namespaces: a Role and RoleBinding in each, and herald told all of them.
    let r = render(json!({"rbac": {"scope": "namespaced", "watchNamespaces": ["team-a", "team-b"]}}), "x");
    assert_eq!(r.env()["HERALD_NAMESPACE"], "team-a,team-b");
    for ns in ["team-a", "team-b"] {
        assert!(r.of_kind("Role").iter().any(|m| m["metadata"]["namespace"] == ns), "a Role in {ns}");
        assert!(r.of_kind("RoleBinding").iter().any(|m| m["metadata"]["namespace"] == ns), "a RoleBinding in {ns}");
    }
    let refusal = try_render(json!({"history": {"enabled": true}}), "x").err().expect("a history store without its URL Secret");
    assert!(refusal.message.contains("history.databaseUrlSecret.name"), "{}", refusal.message);
    let refusal = try_render(json!({"replicaCount": 2, "leaderElection": {"enabled": false}}), "x").err().expect("replicas without a leader");
    assert!(refusal.message.contains("leaderElection.enabled"), "{}", refusal.message);
}

#[test]
fn chart_crds_are_the_repository_crds() {
    let top = common::repo_path("crds");
    let ours = chart().join("crds");
    let names = |dir: &Path| -> BTreeSet<String> { std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect() };
    assert_eq!(names(&ours), names(&top), "charts/herald/crds/ must hold the same files as crds/ (cp crds/*.yaml charts/herald/crds/)");
    for name in names(&top) {
        let a = std::fs::read(top.join(&name)).unwrap();
        let b = std::fs::read(ours.join(&name)).unwrap();
        assert!(a == b, "charts/herald/crds/{name} differs from crds/{name}: copy it again (cp crds/*.yaml charts/herald/crds/)");
    }
}

#[test]
fn dockerfile_builds_the_image_the_chart_runs() {
    let dockerfile = std::fs::read_to_string(common::repo_path("Dockerfile")).unwrap();
    let froms: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].contains("rust:") && froms[0].contains(" AS build"), "{froms:?}");
    assert!(froms[1].contains("distroless") && froms[1].contains("nonroot"), "{froms:?}");
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/herald\"]"), "the chart's args are `run`: the entrypoint is herald");
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap();
    let uid = values["podSecurityContext"]["runAsUser"].as_i64().unwrap();
    assert!(dockerfile.contains(&format!("USER {uid}:{uid}")), "the image's user is the chart's runAsUser ({uid})");
    let ignore = std::fs::read_to_string(common::repo_path(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"), ".dockerignore keeps target/ out of the build context");
}

// ---------------------------------------------------------------------------
// Against the local control plane

/// Asks the apiserver whether the chart's ServiceAccount may do something.
async fn may(client: &Client, sa_namespace: &str, verb: &str, group: &str, resource: &str, namespace: Option<&str>, name: Option<&str>) -> bool {
    let (resource, subresource) = resource.split_once('/').map(|(r, s)| (r, Some(s))).unwrap_or((resource, None));
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": format!("system:serviceaccount:{sa_namespace}:{RELEASE}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{sa_namespace}"), "system:authenticated"],
            "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "subresource": subresource, "namespace": namespace, "name": name},
        }
    }))
    .unwrap();
    let reviewed = Api::<SubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await.expect("SubjectAccessReview");
    reviewed.status.is_some_and(|s| s.allowed)
}

/// Waits until the ServiceAccount may (or may not) do each thing: RBAC
/// changes reach the apiserver's authorizer through a watch, a moment later.
async fn expect_access(client: &Client, sa_namespace: &str, checks: &[(bool, &str, &str, &str, Option<&str>)]) {
    for (allowed, verb, group, resource, namespace) in checks {
        let what = format!("{} to {verb} {resource}.{group} in {:?}", if *allowed { "permission" } else { "no permission" }, namespace);
        wait_for(&what, Duration::from_secs(20), || async { (may(client, sa_namespace, verb, group, resource, *namespace, None).await == *allowed).then_some(()) }).await;
    }
}

/// The release's PodDisruptionBudget, as policy/v1 or (Kubernetes < 1.21) policy/v1beta1.
async fn pdb(client: &Client, namespace: &str) -> Option<Value> {
    use kube::api::DynamicObject;
    use kube::discovery::ApiResource;
    for version in ["v1", "v1beta1"] {
        let ar = ApiResource {
            group: "policy".into(),
            version: version.into(),
            api_version: format!("policy/{version}"),
            kind: "PodDisruptionBudget".into(),
            plural: "poddisruptionbudgets".into(),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
        match api.get(RELEASE).await {
            Ok(found) => return Some(serde_json::to_value(found).unwrap()),
            // Not there, or this version is not served.
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => panic!("reading the PodDisruptionBudget: {e}"),
        }
    }
    None
}

async fn exists<K>(api: &Api<K>, name: &str) -> bool
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.expect("reading").is_some()
}

#[tokio::test]
async fn install_upgrade_uninstall() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let other = TestNamespace::new(&client).await;
    let cluster_name = format!("{RELEASE}-{}", ns.name);

    // Install, cluster-wide.
    let (release, _installed) = install(&ns.name, json!({})).await;
    assert_eq!(release["status"], "deployed", "{release}");
    assert_eq!(release["revision"], 1);
    let deployments: Api<Deployment> = ns.api();
    let deployment = deployments.get(RELEASE).await.expect("the Deployment");
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(1));
    assert!(exists(&ns.api::<ServiceAccount>(), RELEASE).await);
    assert!(exists(&ns.api::<Service>(), RELEASE).await);
    assert!(exists(&ns.api::<Role>(), "herald-leader-election").await);
    assert!(exists(&Api::<ClusterRole>::all(client.clone()), &cluster_name).await);
    assert!(exists(&Api::<ClusterRoleBinding>::all(client.clone()), &cluster_name).await);
    assert!(pdb(&client, &ns.name).await.is_none());

    let o = Some(other.name.as_str());
    let home = Some(ns.name.as_str());
    expect_access(
        &client,
        &ns.name,
        &[
            (true, "list", "herald.dev", "triggerruns", None),
            (true, "patch", "herald.dev", "triggerruns/status", o),
            (true, "deletecollection", "herald.dev", "recipientpages", o),
            (true, "get", "", "secrets", o),
            (false, "watch", "", "secrets", o),
            (false, "list", "", "secrets", o),
            (true, "watch", "", "secrets", home),
            (true, "create", "events.k8s.io", "events", o),
            (true, "create", "authentication.k8s.io", "tokenreviews", None),
            (true, "create", "authorization.k8s.io", "subjectaccessreviews", None),
            (true, "create", "coordination.k8s.io", "leases", home),
            (false, "create", "coordination.k8s.io", "leases", o),
            (false, "update", "herald.dev", "workflows", o),
            (false, "create", "", "secrets", o),
            (false, "delete", "", "namespaces", None),
            (false, "list", "", "pods", o),
        ],
    )
    .await;
    assert!(may(&client, &ns.name, "get", "apiextensions.k8s.io", "customresourcedefinitions", None, Some("triggerruns.herald.dev")).await);
    assert!(!may(&client, &ns.name, "get", "apiextensions.k8s.io", "customresourcedefinitions", None, Some("someone-elses.example.com")).await);
    assert!(may(&client, &ns.name, "update", "coordination.k8s.io", "leases", home, Some(LEASE)).await);
    assert!(!may(&client, &ns.name, "update", "coordination.k8s.io", "leases", home, Some("another-lease")).await);

    // Upgrade: two replicas, only `other` watched.
    let values = json!({"replicaCount": 2, "rbac": {"scope": "namespaced", "watchNamespaces": [other.name]}, "leaderElection": {"leaseSeconds": 20}});
    let release = upgrade(&ns.name, values).await;
    assert_eq!(release["status"], "deployed", "{release}");
    assert_eq!(release["revision"], 2);
    let deployment = deployments.get(RELEASE).await.unwrap();
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(2));
    let env = env_of(&serde_json::to_value(&deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]).unwrap());
    assert_eq!(env["HERALD_NAMESPACE"], other.name);
    assert_eq!(env["HERALD_LEASE_SECONDS"], "20");
    let budget = pdb(&client, &ns.name).await.expect("a PodDisruptionBudget with two replicas");
    assert_eq!(budget["spec"]["minAvailable"], 1, "{budget}");
    assert!(exists(&other.api::<Role>(), RELEASE).await);
    assert!(exists(&other.api::<RoleBinding>(), RELEASE).await);
    expect_access(
        &client,
        &ns.name,
        &[
            (false, "list", "herald.dev", "triggerruns", None),
            (true, "list", "herald.dev", "triggerruns", o),
            (false, "list", "herald.dev", "triggerruns", home),
            (true, "patch", "herald.dev", "triggerruns/status", o),
            (false, "list", "", "secrets", o),
            (true, "get", "", "secrets", o),
            (true, "list", "", "secrets", home),
            (true, "create", "authentication.k8s.io", "tokenreviews", None),
            (true, "create", "coordination.k8s.io", "leases", home),
        ],
    )
    .await;

    // Uninstall: everything the release made is gone; the CRDs stay.
    let removed = uninstall(&ns.name).await;
    assert_eq!(removed["release"]["status"], "uninstalled", "{removed}");
    assert!(!exists(&deployments, RELEASE).await);
    assert!(!exists(&ns.api::<ServiceAccount>(), RELEASE).await);
    assert!(!exists(&ns.api::<Service>(), RELEASE).await);
    assert!(pdb(&client, &ns.name).await.is_none());
    assert!(!exists(&ns.api::<Role>(), "herald-leader-election").await);
    assert!(!exists(&other.api::<Role>(), RELEASE).await);
    assert!(!exists(&other.api::<RoleBinding>(), RELEASE).await);
    assert!(!exists(&Api::<ClusterRole>::all(client.clone()), &cluster_name).await);
    assert!(!exists(&Api::<ClusterRoleBinding>::all(client.clone()), &cluster_name).await);
    let helm_secrets = ns.api::<Secret>().list(&ListParams::default().labels("owner=helm")).await.unwrap();
    assert!(helm_secrets.items.is_empty(), "Helm's release records are gone");
    assert!(exists(&Api::<CustomResourceDefinition>::all(client.clone()), "triggerruns.herald.dev").await, "Helm never deletes CRDs");
    expect_access(&client, &ns.name, &[(false, "create", "authentication.k8s.io", "tokenreviews", None), (false, "list", "herald.dev", "triggerruns", o)]).await;
}

// ---------------------------------------------------------------------------
// The operator under the chart's ServiceAccount

fn is_forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(ref s)) if s.code == 403)
}

/// What the receiver got: each request's headers (names lowercased) and body.
type Deliveries = Arc<Mutex<Vec<(BTreeMap<String, String>, String)>>>;

/// An HTTP receiver for deliveries, on 127.0.0.1.
struct Receiver {
    addr: std::net::SocketAddr,
    received: Deliveries,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let received: Deliveries = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = received.clone();
        let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: String| {
            let store = store.clone();
            async move {
                let headers = headers.iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string())).collect();
                store.lock().unwrap().push((headers, body));
                "ok"
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, received, task }
    }

    fn bodies(&self) -> Vec<String> {
        self.received.lock().unwrap().iter().map(|(_, b)| b.clone()).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The herald binary, run as the chart's pod would run it; killed when dropped.
struct Operator {
    child: Child,
    addr: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Log lines that say the Kubernetes API refused herald something.
    fn refusals(&self) -> Vec<String> {
        self.logs().into_iter().filter(|l| l.to_ascii_lowercase().contains("forbidden")).collect()
    }

    fn tail(&self) -> String {
        let logs = self.logs();
        logs[logs.len().saturating_sub(40)..].join("\n")
    }
}

/// Starts `herald` with the container's args and environment from the
/// Deployment Helm installed (downward-API fields resolved as the kubelet
/// would), the kubeconfig at `kubeconfig`, and the HTTP server on an ephemeral port.
fn start_like_the_pod(deployment: &Deployment, pod_name: &str, kubeconfig: &Path) -> Operator {
    let pod = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    let namespace = deployment.namespace().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.args(container.args.clone().unwrap_or_default()).args(["--api-addr", "127.0.0.1:0"]);
    command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("KUBECONFIG", kubeconfig).env("HOSTNAME", pod_name);
    for var in container.env.clone().unwrap_or_default() {
        let value = match (&var.value, var.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
            (Some(v), _) => v.clone(),
            (None, Some(field)) => match field.field_path.as_str() {
                "metadata.name" => pod_name.to_string(),
                "metadata.namespace" => namespace.clone(),
                other => panic!("the test does not resolve fieldRef {other}"),
            },
            (None, None) => panic!("env {} has neither a value nor a fieldRef", var.name),
        };
        command.env(&var.name, value);
    }
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starting herald");
    let logs: Arc<Mutex<Vec<String>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for stream in [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())] {
        let logs = logs.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("herald: {line}");
                logs.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let addr = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("herald did not log `herald is serving` within 90 s:\n{}", logs.lock().unwrap().join("\n"))
        });
        // The chart asks for JSON logs.
        let parsed: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
        if parsed["message"] == "herald is serving" {
            break parsed["addr"].as_str().expect("the addr field").to_string();
        }
    };
    Operator { child, addr, logs }
}

async fn apply(client: &Client, namespace: &str, manifest: Value) {
    use kube::api::DynamicObject;
    use kube::discovery::ApiResource;
    let kind = manifest["kind"].as_str().unwrap();
    let (group, version) = manifest["apiVersion"].as_str().unwrap().split_once('/').unwrap_or(("", manifest["apiVersion"].as_str().unwrap()));
    let plural = format!("{}s", kind.to_lowercase());
    let ar = ApiResource { group: group.into(), version: version.into(), api_version: manifest["apiVersion"].as_str().unwrap().into(), kind: kind.into(), plural };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
    let name = manifest["metadata"]["name"].as_str().unwrap();
    api.patch(name, &PatchParams::apply("herald-helm-test").force(), &Patch::Apply(&manifest)).await.unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
}

async fn finished_run(api: &Api<TriggerRun>, name: &str, operator: &Operator) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = api.get_opt(name).await.ok().flatten().and_then(|r| r.status) {
            let status = serde_json::to_value(&status).unwrap();
            if matches!(status["state"].as_str(), Some("Completed" | "Failed" | "Cancelled")) {
                return status;
            }
        }
        if tokio::time::Instant::now() > deadline {
            panic!("TriggerRun {name} did not finish within 90 s; herald's last logs:\n{}", operator.tail());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn operator_runs_under_the_chart_service_account() {
    let admin = common::client().await;
    let home = TestNamespace::new(&admin).await; // the release's namespace
    let watched = TestNamespace::new(&admin).await; // the one herald watches
    let keys = TestNamespace::new(&admin).await; // where the API keys live
    let values = json!({"rbac": {"scope": "namespaced", "watchNamespaces": [watched.name]}, "apiKeys": {"namespace": keys.name}, "leaderElection": {"leaseSeconds": 10}});
    let _installed = install(&home.name, values).await;
    let deployment = home.api::<Deployment>().get(RELEASE).await.expect("the installed Deployment");
    let env = env_of(&serde_json::to_value(&deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]).unwrap());
    assert_eq!(env["HERALD_NAMESPACE"], watched.name);
    assert_eq!(env["HERALD_LOG_FORMAT"], "json");
    let (w, h) = (Some(watched.name.as_str()), Some(home.name.as_str()));
    expect_access(
        &admin,
        &home.name,
        &[
            (true, "list", "herald.dev", "triggerruns", w),
            (true, "create", "events.k8s.io", "events", w),
            (true, "create", "coordination.k8s.io", "leases", h),
            (true, "create", "authentication.k8s.io", "tokenreviews", None),
        ],
    )
    .await;

    // The ServiceAccount's token, and a kubeconfig holding only it.
    let dir = std::env::temp_dir().join(format!("herald-helm-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let sa_kubeconfig = dir.join("kubeconfig");
    common::kubeconfig_with_token(&common::token_for(&admin, &home.name, RELEASE).await, &sa_kubeconfig);
    let sa = common::client_from(&sa_kubeconfig).await;

    // What the chart does not grant is refused.
    assert!(is_forbidden(Api::<Namespace>::all(sa.clone()).delete(&watched.name, &DeleteParams::default()).await), "deleting a Namespace");
    assert!(
        is_forbidden(Api::<Secret>::namespaced(sa.clone(), &home.name).list(&ListParams::default()).await),
        "listing Secrets (Helm's release records) in the release's namespace"
    );
    assert!(is_forbidden(Api::<Secret>::namespaced(sa.clone(), "default").list(&ListParams::default()).await), "listing Secrets in another namespace");
    assert!(
        is_forbidden(Api::<Secret>::namespaced(sa.clone(), &watched.name).list(&ListParams::default()).await),
        "listing Secrets where it watches (it only gets those Channels name)"
    );
    Api::<Secret>::namespaced(sa.clone(), &keys.name).list(&ListParams::default()).await.expect("listing the API key Secrets");
    assert!(is_forbidden(Api::<TriggerRun>::all(sa.clone()).list(&ListParams::default()).await), "listing TriggerRuns in every namespace");
    assert!(is_forbidden(Api::<TriggerRun>::namespaced(sa.clone(), &home.name).list(&ListParams::default()).await), "TriggerRuns outside the watched namespace");
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "planted"}, "stringData": {"x": "y"}})).unwrap();
    assert!(is_forbidden(Api::<Secret>::namespaced(sa.clone(), &watched.name).create(&PostParams::default(), &secret).await), "creating a Secret");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": LEASE}})).unwrap();
    assert!(is_forbidden(Api::<Lease>::namespaced(sa.clone(), &watched.name).create(&PostParams::default(), &lease).await), "a Lease outside the release's namespace");
    Api::<TriggerRun>::namespaced(sa.clone(), &watched.name).list(&ListParams::default()).await.expect("reading TriggerRuns where it watches");

    // As an admin: a receiver, a signing Secret, a Channel, a Workflow, a User, an API key,
    // and a pipeline ServiceAccount allowed to trigger through the API.
    let receiver = Receiver::start().await;
    let ns = &watched.name;
    apply(&admin, ns, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hooks-signing"}, "stringData": {"signingKey": "0123456789abcdef0123456789abcdef"}})).await;
    apply(
        &admin,
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"},
        "spec": {"type": "http", "url": format!("http://{}/hook", receiver.addr), "secretRef": {"name": "hooks-signing"}}}),
    )
    .await;
    apply(
        &admin,
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "welcome"},
        "spec": {"key": "welcome", "steps": [{"ref": "notify", "type": "channel", "channel": "hooks",
            "template": {"body": "{\"text\": \"Welcome, {{ recipient.name }}\", \"run\": \"{{ workflow_run_id }}\"}"}}]}}),
    )
    .await;
    apply(
        &admin,
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "user-1"},
        "spec": {"id": "user_1", "name": "Ada Lovelace", "email": "ada@example.com"}}),
    )
    .await;
    let api_key = format!("sk_test_{}", uuid::Uuid::new_v4().simple());
    apply(
        &admin,
        &keys.name,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "herald-api-key", "labels": {"herald.dev/api-key": "true"}, "annotations": {"herald.dev/namespace": ns}},
               "stringData": {"key": api_key}}),
    )
    .await;
    apply(&admin, ns, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "pipeline"}})).await;
    apply(
        &admin,
        ns,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "trigger"},
        "rules": [{"apiGroups": ["herald.dev"], "resources": ["triggerruns"], "verbs": ["create", "get"]}]}),
    )
    .await;
    apply(
        &admin,
        ns,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "pipeline-trigger"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "trigger"},
        "subjects": [{"kind": "ServiceAccount", "name": "pipeline", "namespace": ns}]}),
    )
    .await;
    apply(&admin, ns, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bystander"}})).await;
    let pipeline_token = common::token_for(&admin, ns, "pipeline").await;
    let bystander_token = common::token_for(&admin, ns, "bystander").await;

    // herald, as the pod would run it, with nothing but the chart's ServiceAccount.
    let pod_name = format!("{RELEASE}-7d9f8b6c5-{}", &uuid::Uuid::new_v4().simple().to_string()[..5]);
    let operator = start_like_the_pod(&deployment, &pod_name, &sa_kubeconfig);

    // A run created with kubectl: an inline user and an inline tenant to identify.
    let runs: Api<TriggerRun> = watched.api();
    let run: TriggerRun = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": "welcome-1"},
        "spec": {"workflow": "welcome", "recipients": ["user_1", {"id": "user_9", "name": "Inline User", "email": "u9@example.com"}],
                 "tenant": {"id": "acme", "name": "Acme"}, "data": {}, "ttlSecondsAfterFinished": 3600}
    }))
    .unwrap();
    runs.create(&PostParams::default(), &run).await.expect("creating the TriggerRun");
    let status = finished_run(&runs, "welcome-1", &operator).await;
    assert_eq!(status["state"], "Completed", "{status:#}\n{}", operator.tail());
    assert_eq!(status["totals"]["completed"], 2, "{status:#}");
    // Two recipients: their records are inline in the run, without a RecipientPage.
    assert!(status["pages"].is_null(), "{status:#}");
    let recipients = status["recipients"].as_array().expect("inline records");
    assert_eq!(recipients.len(), 2, "{status:#}");
    for r in recipients {
        assert_eq!(r["state"], "Completed", "{r:#}");
        assert_eq!(r["steps"][0]["reason"], "Delivered", "{r:#}");
    }
    let delivered = receiver.received.lock().unwrap().clone();
    assert_eq!(delivered.len(), 2, "two deliveries: {delivered:?}");
    for (headers, body) in &delivered {
        assert!(headers.get("x-herald-signature").is_some_and(|s| s.starts_with("v1=")), "signed with the Channel's Secret: {headers:?}");
        assert!(body.contains(status["workflowRunId"].as_str().unwrap()), "{body}");
    }
    assert!(receiver.bodies().iter().any(|b| b.contains("Inline User")));
    // Identify wrote the inline user and tenant; status went to Workflow and Channel.
    let users = watched.api::<User>().list(&ListParams::default()).await.unwrap();
    assert!(users.items.iter().any(|u| u.spec.id == "user_9"), "the inline user was identified");
    let tenants = watched.api::<Tenant>().list(&ListParams::default()).await.unwrap();
    assert!(tenants.items.iter().any(|t| t.spec.id == "acme"), "the inline tenant was identified");
    let ready = |status: Value| status["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Ready" && c["status"] == "True");
    let workflow = watched.api::<Workflow>().get("welcome").await.unwrap();
    assert!(ready(serde_json::to_value(&workflow.status).unwrap()), "Workflow status: {:?}", workflow.status);
    let channel = watched.api::<Channel>().get("hooks").await.unwrap();
    assert!(ready(serde_json::to_value(&channel.status).unwrap()), "Channel status: {:?}", channel.status);
    // Events are for failures (a successful run has none): a run for an
    // unknown user fails, and its Warning Event goes through (a refused Event
    // is only a warning in herald's log).
    let ghost: TriggerRun = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": "welcome-ghost"},
        "spec": {"workflow": "welcome", "recipients": ["nobody"], "data": {}, "ttlSecondsAfterFinished": 3600}
    }))
    .unwrap();
    runs.create(&PostParams::default(), &ghost).await.expect("creating the TriggerRun");
    assert_eq!(finished_run(&runs, "welcome-ghost", &operator).await["state"], "Failed");
    let events = wait_for("a RecipientsFailed Event on the failed run", Duration::from_secs(20), || async {
        let list = Api::<k8s_openapi::api::events::v1::Event>::namespaced(admin.clone(), ns).list(&ListParams::default()).await.ok()?;
        let reasons: BTreeSet<String> = list
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()).is_some_and(|n| n.starts_with("welcome-")))
            .filter_map(|e| e.reason.clone())
            .collect();
        reasons.contains("RecipientsFailed").then_some(reasons)
    })
    .await;
    assert!(!events.contains("Completed") && !events.contains("Accepted"), "no Events for success: {events:?}");
    // This replica leads, through the Lease in the release's namespace, under its pod name.
    let lease = home.api::<Lease>().get(LEASE).await.expect("the Lease in the release's namespace");
    assert_eq!(lease.spec.and_then(|s| s.holder_identity).as_deref(), Some(pod_name.as_str()));

    // Through the HTTP API: with an API key (herald watches the labelled Secrets of the key namespace) ...
    let http = reqwest::Client::new();
    let base = format!("http://{}", operator.addr);
    let trigger = |token: String, namespace: Option<String>, body: Value| {
        let http = http.clone();
        let url = format!("{base}/v1/workflows/welcome/trigger");
        async move {
            let mut request = http.post(url).bearer_auth(token).header("content-type", "application/json").body(body.to_string());
            if let Some(ns) = namespace {
                request = request.header("x-herald-namespace", ns);
            }
            let response = request.send().await.expect("calling herald's API");
            let status = response.status().as_u16();
            let body: Value = serde_json::from_slice(&response.bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
            (status, body)
        }
    };
    let by_key = wait_for("the API to accept the API key", Duration::from_secs(30), || async {
        let (status, body) = trigger(api_key.clone(), None, json!({"recipients": ["user_1"], "data": {}})).await;
        (status == 200).then_some(body)
    })
    .await;
    let run_id = by_key["workflow_run_id"].as_str().expect("a workflow_run_id").to_string();
    let answer = wait_for("the API-triggered run to complete", Duration::from_secs(60), || async {
        let response = http.get(format!("{base}/v1/workflow_runs/{run_id}")).bearer_auth(&api_key).send().await.ok()?;
        let body: Value = serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
        (body["status"] == "completed").then_some(body)
    })
    .await;
    assert_eq!(answer["recipient_runs"]["entries"].as_array().map(Vec::len), Some(1), "{answer:#}");

    // ... and with a ServiceAccount token (herald's TokenReview and SubjectAccessReview).
    let (status, body) = trigger(pipeline_token, Some(ns.clone()), json!({"recipients": ["user_1"], "data": {}})).await;
    assert_eq!(status, 200, "a ServiceAccount allowed to create triggerruns: {body}\n{}", operator.tail());
    let (status, body) = trigger(bystander_token, Some(ns.clone()), json!({"recipients": ["user_1"], "data": {}})).await;
    assert_eq!(status, 403, "a ServiceAccount without RBAC for triggerruns: {body}");
    wait_for("four deliveries in all", Duration::from_secs(60), || async { (receiver.received.lock().unwrap().len() >= 4).then_some(()) }).await;

    // The API's other writes: a user created, updated and deleted; a cancel.
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = http.request(method, format!("{base}{path}")).bearer_auth(&api_key);
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        async move {
            let response = request.send().await.expect("calling herald's API");
            let status = response.status().as_u16();
            (status, String::from_utf8_lossy(&response.bytes().await.unwrap_or_default()).to_string())
        }
    };
    for (method, path, body, expected) in [
        (reqwest::Method::PUT, "/v1/users/user_2", Some(json!({"name": "Grace Hopper"})), 200),
        (reqwest::Method::PUT, "/v1/users/user_2", Some(json!({"email": "grace@example.com"})), 200),
        (reqwest::Method::DELETE, "/v1/users/user_2", None, 204),
        (reqwest::Method::POST, "/v1/workflows/welcome/cancel", Some(json!({"cancellation_key": "c-1"})), 204),
    ] {
        let (status, answer) = call(method.clone(), path, body).await;
        assert_eq!(status, expected, "{method} {path}: {answer}\n{}", operator.tail());
    }

    // Retention: a run whose TTL is over is deleted, with its pages.
    let run: TriggerRun = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": "welcome-ttl"},
        "spec": {"workflow": "welcome", "recipients": ["user_1"], "data": {}, "ttlSecondsAfterFinished": 0}
    }))
    .unwrap();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let pages: Api<RecipientPage> = watched.api();
    wait_for("the expired run and its pages to be deleted", Duration::from_secs(60), || async {
        let run_gone = runs.get_opt("welcome-ttl").await.ok()?.is_none();
        let left = pages.list(&ListParams::default().labels("herald.dev/trigger-run=welcome-ttl")).await.ok()?.items.len();
        (run_gone && left == 0).then_some(())
    })
    .await;

    // herald was never refused anything it tried.
    let refused = operator.refusals();
    assert!(
        refused.is_empty(),
        "the chart's RBAC refused herald {} time(s) (a permission is missing from charts/herald/templates/_helpers.tpl):\n{}",
        refused.len(),
        refused.join("\n")
    );

    drop(operator);
    uninstall(&home.name).await;
    let _ = std::fs::remove_dir_all(&dir);
}
