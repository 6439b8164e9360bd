//! Test harness: one real control plane (etcd + kube-apiserver) per test run,
//! the CRDs installed once, and a fresh namespace per test.
//!
//! Where the control plane comes from, in order:
//! * `HERALD_TEST_KUBECONFIG`: a kubeconfig for a running control plane
//!   (scripts/test.sh starts one and sets it);
//! * `HERALD_TEST_USE_KUBECONFIG=1`: the cluster `KUBECONFIG` points at (a real cluster);
//! * otherwise this process starts one with scripts/controlplane.sh and stops
//!   it when the process exits.
//!
//! When none can be had, tests fail with a message saying what is missing.
#![allow(dead_code)]

pub mod runs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use herald::operator::Operator;
use herald::settings::Settings;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

static KUBECONFIG: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static CRDS: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn start_control_plane() -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("HERALD_TEST_KUBECONFIG") {
        return Ok(PathBuf::from(path));
    }
    if std::env::var("HERALD_TEST_USE_KUBECONFIG").as_deref() == Ok("1") {
        let path = std::env::var("KUBECONFIG").map_err(|_| "HERALD_TEST_USE_KUBECONFIG=1 but KUBECONFIG is not set".to_string())?;
        return Ok(PathBuf::from(path));
    }
    let dir = std::env::temp_dir().join(format!("herald-cp-{}", std::process::id()));
    start_control_plane_in(&dir)?;
    Ok(dir.join("kubeconfig"))
}

/// Starts a control plane in `dir` with scripts/controlplane.sh, stopped (and
/// `dir` removed) when this test process exits.
pub fn start_control_plane_in(dir: &Path) -> Result<(), String> {
    let script = repo().join("scripts/controlplane.sh");
    let out = Command::new("bash").arg(&script).arg("start").arg(dir).output().map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "could not start the local control plane ({}):\n{}\nInstall it with `scripts/controlplane.sh install`, or run the tests with scripts/test.sh",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Stop the control plane when this test process exits.
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; bash '{script}' stop '{dir}'; rm -rf '{dir}'",
        pid = std::process::id(),
        script = script.display(),
        dir = dir.display()
    );
    Command::new("setsid").arg("sh").arg("-c").arg(watchdog).spawn().map_err(|e| format!("starting the watchdog: {e}"))?;
    Ok(())
}

/// The kubeconfig of the test control plane.
pub fn kubeconfig() -> PathBuf {
    match KUBECONFIG.get_or_init(start_control_plane) {
        Ok(path) => path.clone(),
        Err(message) => panic!("no Kubernetes control plane for the tests: {message}"),
    }
}

/// A client for the test control plane (one per test: clients belong to a runtime).
pub async fn client() -> Client {
    let path = kubeconfig();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig");
    let client = Client::try_from(config).expect("client");
    CRDS.get_or_init(|| install_crds(client.clone())).await;
    client
}

/// Installs (or updates) herald's CRDs and waits until they are established.
pub async fn install_crds(client: Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in herald::crds::all() {
        let name = crd.metadata.name.clone().unwrap();
        for attempt in 0..5 {
            let result = match api.get_opt(&name).await.expect("reading CRDs") {
                Some(existing) => {
                    let mut crd = crd.clone();
                    crd.metadata.resource_version = existing.metadata.resource_version;
                    api.replace(&name, &PostParams::default(), &crd).await
                }
                None => api.create(&PostParams::default(), &crd).await,
            };
            match result {
                Ok(_) => break,
                Err(kube::Error::Api(s)) if s.code == 409 && attempt < 4 => continue,
                Err(e) => panic!("installing CRD {name}: {e}"),
            }
        }
    }
    herald::operator::wait_for_crds(&client, Duration::from_secs(60)).await.expect("CRDs established");
}

/// A token of a ServiceAccount, from the TokenRequest API.
pub async fn token_for(client: &Client, namespace: &str, service_account: &str) -> String {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let request: TokenRequest = serde_json::from_value(serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 3600}})).unwrap();
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let answer: TokenRequest = api.create_subresource("token", service_account, &PostParams::default(), &request).await.expect("TokenRequest");
    answer.status.expect("a token").token
}

/// A kubeconfig for the test control plane that authenticates with `token` alone.
pub fn kubeconfig_with_token(token: &str, path: &Path) {
    let admin: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(kubeconfig()).unwrap()).unwrap();
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "herald", "user": {"token": token}}],
        "contexts": [{"name": "herald", "context": {"cluster": "local", "user": "herald"}}],
        "current-context": "herald",
    });
    std::fs::write(path, serde_yaml::to_string(&config).unwrap()).unwrap();
}

/// A client that uses the kubeconfig at `path`.
pub async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    Client::try_from(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap()).unwrap()
}

/// A fresh namespace for one test, deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
    /// The control plane it lives on.
    kubeconfig: PathBuf,
}

impl TestNamespace {
    pub async fn new(client: &Client) -> TestNamespace {
        Self::new_on(client, kubeconfig()).await
    }

    /// A namespace on the control plane of `kubeconfig` (a test's own one).
    pub async fn new_on(client: &Client, kubeconfig: PathBuf) -> TestNamespace {
        let name = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"herald.dev/test": "true"}}
        }))
        .unwrap();
        api.create(&PostParams::default(), &ns).await.expect("creating the test namespace");
        TestNamespace { name, client: client.clone(), kubeconfig }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Best effort, off the test's runtime (which may be shutting down).
        let name = self.name.clone();
        let path = self.kubeconfig.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let Ok(kc) = Kubeconfig::read_from(&path) else { return };
                let Ok(config) = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await else { return };
                let Ok(client) = Client::try_from(config) else { return };
                let _ = Api::<Namespace>::all(client).delete(&name, &DeleteParams::default()).await;
            });
        })
        .join();
    }
}

/// Starts an operator watching only `namespace`, in this process.
pub async fn operator(client: &Client, namespace: &str) -> Operator {
    operator_with(client, Settings::for_namespace(namespace)).await
}

pub async fn operator_with(client: &Client, settings: Settings) -> Operator {
    // Logs go through libtest's capture: shown for failing tests only.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    herald::operator::start(client.clone(), settings).await.expect("starting the operator")
}

/// Polls `check` until it returns Some, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies a YAML file of the examples/ folder (one or more documents) into `ns`.
pub async fn apply_yaml(ns: &TestNamespace, yaml: &str) {
    use kube::api::{DynamicObject, Patch, PatchParams};
    use kube::discovery::ApiResource;
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(value.clone()).expect("object");
        let types = obj.types.clone().expect("apiVersion and kind");
        let (group, version) = types.api_version.split_once('/').unwrap_or(("", &types.api_version));
        let plural = format!("{}s", types.kind.to_lowercase());
        let ar = ApiResource { group: group.into(), version: version.into(), api_version: types.api_version.clone(), kind: types.kind.clone(), plural };
        let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
        let name = obj.metadata.name.clone().expect("name");
        api.patch(&name, &PatchParams::apply("herald-tests").force(), &Patch::Apply(&value)).await.unwrap_or_else(|e| panic!("applying {name}: {e}"));
    }
}

pub fn read_example(name: &str) -> String {
    std::fs::read_to_string(repo().join("examples").join(name)).unwrap()
}

pub fn repo_path(rel: &str) -> PathBuf {
    repo().join(rel)
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// A `herald run` process (the real binary), killed when dropped.
pub struct HeraldProcess {
    pub child: std::process::Child,
    /// The HTTP address it logged.
    pub addr: String,
    /// Every log line so far (JSON).
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl HeraldProcess {
    /// Starts `herald run --namespace <ns> --api-addr 127.0.0.1:0 --log-format json <extra>`
    /// and waits until it logs that it is serving.
    pub fn start(namespace: &str, extra: &[&str]) -> HeraldProcess {
        Self::start_as(namespace, extra, &kubeconfig())
    }

    /// Like [`HeraldProcess::start`], with the credentials of another kubeconfig.
    pub fn start_as(namespace: &str, extra: &[&str], kubeconfig: &Path) -> HeraldProcess {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["run", "--namespace", namespace, "--api-addr", "127.0.0.1:0", "--log-format", "json"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting herald");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = logs.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line.clone());
                if !sent {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["message"] == "herald is serving" {
                            let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                            sent = true;
                        }
                    }
                }
                if std::env::var("HERALD_TEST_SHOW_LOGS").is_ok() {
                    eprintln!("{line}");
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("herald logged that it is serving");
        HeraldProcess { child, addr, logs }
    }

    /// Asks it to stop, with SIGTERM.
    pub fn sigterm(&self) {
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("running kill");
        assert!(sent.success(), "kill -TERM failed");
    }

    /// Waits at most 20 s for it to exit (`what` names the wait), and asserts it exited with 0.
    pub async fn exits_cleanly(&mut self, what: &str) {
        let child = &mut self.child;
        let status = wait_for(what, Duration::from_secs(20), || {
            let status = child.try_wait().expect("checking on herald");
            async move { status }
        })
        .await;
        assert!(status.success(), "exit status {status:?}");
    }

    /// Kills it with SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }

    /// The value of a metric (summed over its label sets), from /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.addr)).await.expect("GET /metrics").text().await.unwrap();
        metric_value(&text, name)
    }
}

/// Sums a metric's samples (`name` or `name{...}`) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{'])).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

impl Drop for HeraldProcess {
    fn drop(&mut self) {
        // A failing test shows what herald logged (unless it was shown already).
        if std::thread::panicking() && std::env::var("HERALD_TEST_SHOW_LOGS").is_err() {
            eprintln!("--- herald's log ---");
            for line in self.logs.lock().map(|l| l.clone()).unwrap_or_default() {
                eprintln!("{line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a resource in the test namespace from its JSON form.
pub async fn create<K>(ns: &TestNamespace, value: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let object: K = serde_json::from_value(value).expect("test object");
    ns.api::<K>().create(&PostParams::default(), &object).await.expect("create")
}

/// A fresh, empty database on the test run's PostgreSQL server
/// (`HERALD_TEST_DATABASE_URL`, started by scripts/test.sh); its URL.
pub async fn database() -> String {
    let admin = std::env::var("HERALD_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "HERALD_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh, which starts PostgreSQL (or start one with scripts/postgres.sh start DIR and export DIR/url)"
        )
    });
    let name = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
    let task = tokio::spawn(connection);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("creating the test database");
    drop(client);
    let _ = task.await;
    match admin.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("HERALD_TEST_DATABASE_URL must end with /<database>: {admin}"),
    }
}
