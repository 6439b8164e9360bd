//! Helpers of the HTTP API tests: an in-process operator with an API key in a
//! fresh namespace, a small HTTP client, workflows, and a TCP proxy that can
//! cut herald off from the Kubernetes API.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::operator::Operator;
use herald::settings::Settings;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{json, Value};

use crate::common::{self, wait_for, TestNamespace};

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The Knock error code.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or_default()
    }

    /// Asserts a Knock error body with this status and code.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["code"], code, "{self:?}");
        assert_eq!(self.body["status"], status, "{self:?}");
        assert!(self.body["message"].as_str().is_some_and(|m| !m.is_empty()), "{self:?}");
        assert!(self.body["type"].as_str().is_some_and(|t| !t.is_empty()), "{self:?}");
    }

    /// The fields named in a 422's error list.
    pub fn fields(&self) -> Vec<String> {
        self.body["errors"].as_array().into_iter().flatten().filter_map(|e| e["field"].as_str().map(str::to_string)).collect()
    }
}

/// A running herald with an API key, in a fresh namespace.
pub struct Herald {
    pub ns: TestNamespace,
    pub op: Option<Operator>,
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

pub const KEY_SECRET: &str = "herald-api-key";

pub fn new_key() -> String {
    format!("sk_test_{}", uuid::Uuid::new_v4().simple())
}

/// Creates an API key Secret in `namespace`.
pub async fn create_key(client: &Client, namespace: &str, name: &str, key: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"herald.dev/api-key": "true"}},
        "stringData": {"key": key},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), namespace).create(&PostParams::default(), &secret).await.expect("creating the API key Secret");
}

impl Herald {
    pub async fn start() -> Herald {
        Herald::start_with(|_| {}).await
    }

    /// Starts herald with settings adjusted by `adjust`, creates an API key and
    /// waits until herald knows it.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Herald {
        Herald::start_on(common::client().await, adjust).await
    }

    /// Like [`Herald::start_with`], with the operator talking to the
    /// Kubernetes API through `client` (say, a [`recording_client`]).
    pub async fn start_on(client: Client, adjust: impl FnOnce(&mut Settings)) -> Herald {
        let ns = TestNamespace::new(&common::client().await).await;
        let mut settings = Settings::for_namespace(&ns.name);
        adjust(&mut settings);
        let op = common::operator_with(&client, settings).await;
        Herald::around(ns, op).await
    }

    /// Wraps a started operator: creates the key and waits for it.
    pub async fn around(ns: TestNamespace, op: Operator) -> Herald {
        let key = new_key();
        create_key(&ns.client, &ns.name, KEY_SECRET, &key).await;
        let herald = Herald { base: format!("http://{}", op.addr), op: Some(op), ns, key, http: reqwest::Client::new() };
        herald.wait_for_key(&herald.key.clone()).await;
        herald
    }

    /// Waits until `key` is accepted (the key watch has seen its Secret).
    pub async fn wait_for_key(&self, key: &str) {
        wait_for("the API key to be known", Duration::from_secs(30), || async {
            let a = self.call_as(key, "GET", "/v1/users/nobody-at-all", None).await;
            (a.status == 404).then_some(())
        })
        .await;
    }

    pub fn client(&self) -> Client {
        self.ns.client.clone()
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        self.ns.api::<K>()
    }

    /// Sends a request with herald's key.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.call_as(&self.key, method, path, body).await
    }

    /// Sends a request with another bearer token.
    pub async fn call_as(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
        let mut headers = vec![("authorization".to_string(), format!("Bearer {token}"))];
        let bytes = body.map(|b| {
            headers.push(("content-type".into(), "application/json".into()));
            serde_json::to_vec(&b).unwrap()
        });
        self.raw(method, path, &headers, bytes).await
    }

    /// Sends a request exactly as given.
    pub async fn raw(&self, method: &str, path: &str, headers: &[(String, String)], body: Option<Vec<u8>>) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("request to {path} failed: {e}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer { status, headers, text, body }
    }

    /// Creates a Workflow from a spec.
    pub async fn workflow(&self, key: &str, spec: Value) {
        let mut spec = spec;
        spec["key"] = json!(key);
        let name = format!("wf-{}", key.to_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
        let value = json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": name}, "spec": spec});
        let wf: herald::resources::Workflow = serde_json::from_value(value).unwrap();
        self.api::<herald::resources::Workflow>().create(&PostParams::default(), &wf).await.expect("creating a Workflow");
        // The API checks workflows against its cache: wait until it has this one.
        let op = self.op.as_ref().expect("operator running");
        let ns = self.ns.name.clone();
        wait_for("the workflow in herald's cache", Duration::from_secs(20), || async { herald::controller::workflow::find_by_key(&op.context, &ns, key).map(|_| ()) }).await;
    }

    /// Waits until herald's caches hold these users and objects (`collection/id`):
    /// the reconciler reads recipients from its caches.
    pub async fn cached(&self, recipients: &[&str]) {
        let op = self.op.as_ref().expect("operator running");
        let ns = self.ns.name.clone();
        for r in recipients {
            wait_for(&format!("{r} in herald's cache"), Duration::from_secs(20), || async {
                let stores = &op.context.stores;
                let found = match r.split_once('/') {
                    Some((collection, id)) => herald::controller::directory::object(stores, &ns, collection, id).is_some(),
                    None => herald::controller::directory::user(stores, &ns, r).is_some(),
                };
                found.then_some(())
            })
            .await;
        }
    }

    /// Names of the objects of kind `K` in the namespace.
    pub async fn names<K>(&self) -> Vec<String>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        self.api::<K>().list(&ListParams::default()).await.unwrap().items.iter().map(|o| kube::ResourceExt::name_any(o)).collect()
    }

    /// Starts herald with a history store in a fresh database of its own.
    pub async fn start_with_history() -> Herald {
        let url = common::database().await;
        Herald::start_with(move |s| s.database_url = Some(url)).await
    }

    /// Creates a namespaced object from its JSON.
    pub async fn create<K>(&self, value: Value)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let object: K = serde_json::from_value(value).unwrap();
        self.api::<K>().create(&PostParams::default(), &object).await.expect("creating an object");
    }

    /// Creates an http Channel with quick retries.
    pub async fn http_channel(&self, name: &str, url: &str, max_attempts: i32) {
        self.create::<herald::resources::Channel>(json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": name},
            "spec": {"type": "http", "url": url, "retry": {"maxAttempts": max_attempts, "initialBackoffMs": 10}},
        }))
        .await;
    }

    /// Waits until the TriggerRun with this workflow run id is finished in the cluster.
    pub async fn wait_finished(&self, run_id: &str) {
        wait_for("the run to finish", Duration::from_secs(60), || async {
            let runs = self.api::<herald::resources::TriggerRun>().list(&ListParams::default()).await.ok()?;
            let run = runs.items.into_iter().find(|r| r.status.as_ref().and_then(|s| s.workflow_run_id.as_deref()) == Some(run_id))?;
            run.status.as_ref().and_then(|s| s.completion_time.as_ref()).map(|_| ())
        })
        .await;
    }

    /// The metrics text.
    pub async fn metrics(&self) -> String {
        self.raw("GET", "/metrics", &[], None).await.text
    }
}

/// A workflow whose recipients wait `duration`, then are done (no delivery involved).
pub fn delay_workflow(duration: &str) -> Value {
    json!({"steps": [{"ref": "wait", "type": "delay", "delay": {"duration": duration}}]})
}

/// The requests a [`recording_client`] sent: method, and path with query.
#[derive(Clone, Default)]
pub struct RequestLog(Arc<Mutex<Vec<(String, String)>>>);

impl RequestLog {
    /// The requests recorded since the last call.
    pub fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A client of the test control plane that records every request it sends
/// (the real client, with one more tower layer).
pub async fn recording_client() -> (Client, RequestLog) {
    let log = RequestLog::default();
    let sink = log.clone();
    let client = mapping_client(move |request| {
        sink.0.lock().unwrap().push((request.method().to_string(), request.uri().to_string()));
        request
    })
    .await;
    (client, log)
}

/// A client of the test control plane that passes every request through
/// `map` before sending it (the real client, with one more tower layer).
pub async fn mapping_client<F>(map: F) -> Client
where
    F: Fn(axum::http::Request<kube::client::Body>) -> axum::http::Request<kube::client::Body> + Clone + Send + Sync + 'static,
{
    common::client().await; // installs the CRDs
    let kubeconfig = Kubeconfig::read_from(common::kubeconfig()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    kube::client::ClientBuilder::try_from(config).unwrap().with_layer(&tower::util::MapRequestLayer::new(map)).build()
}

/// A client of the test control plane through `url` (e.g. a proxy).
pub async fn client_via(url: &str) -> Client {
    let path = common::kubeconfig();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    config.cluster_url = url.parse().unwrap();
    config.accept_invalid_certs = true;
    Client::try_from(config).unwrap()
}

/// The apiserver's URL.
pub async fn apiserver_url() -> String {
    let path = common::kubeconfig();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    config.cluster_url.to_string()
}

/// A TCP proxy to the apiserver that can be cut: then it closes every
/// connection and refuses new ones, as an unreachable apiserver would.
pub struct Proxy {
    pub url: String,
    cut: Arc<AtomicBool>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        let target = apiserver_url().await;
        let target = target.trim_start_matches("https://").trim_end_matches('/').to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let flag = cut.clone();
        tokio::spawn(async move {
            loop {
                let mut stopped_accept = stopped.clone();
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped_accept.wait_for(|s| *s) => return,
                };
                let Ok((mut inbound, _)) = accepted else { continue };
                let target = target.clone();
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
                if flag.load(Ordering::SeqCst) {
                    return;
                }
            }
        });
        Proxy { url, cut, stop }
    }

    /// Cuts every connection and stops listening.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
    }
}

/// A TCP proxy to the apiserver with a switch: while it is off, every
/// connection is closed and new ones are dropped at once (an apiserver
/// outage); switched on again, it forwards as before, on the same address.
pub struct Switch {
    pub url: String,
    off: Arc<AtomicBool>,
    /// Bumped on every switch-off: connections in flight watch it and close.
    outages: tokio::sync::watch::Sender<u64>,
}

impl Switch {
    pub async fn start() -> Switch {
        let target = apiserver_url().await;
        let target = target.trim_start_matches("https://").trim_end_matches('/').to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let off = Arc::new(AtomicBool::new(false));
        let (outages, _) = tokio::sync::watch::channel(0u64);
        let (flag, watch) = (off.clone(), outages.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut outage = watch.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = outage.changed() => {}
                    }
                });
            }
        });
        Switch { url, off, outages }
    }

    /// The apiserver becomes unreachable through this proxy.
    pub fn off(&self) {
        self.off.store(true, Ordering::SeqCst);
        self.outages.send_modify(|n| *n += 1);
    }

    /// It is reachable again.
    pub fn on(&self) {
        self.off.store(false, Ordering::SeqCst);
    }
}

/// Headers of a JSON request with a bearer key.
pub fn json_headers(key: &str) -> Vec<(String, String)> {
    vec![("authorization".into(), format!("Bearer {key}")), ("content-type".into(), "application/json".into())]
}

/// Counts of each kind of resource the API writes, in the namespace.
pub async fn resource_counts(h: &Herald) -> BTreeMap<&'static str, usize> {
    use herald::resources::*;
    BTreeMap::from([
        ("TriggerRun", h.names::<TriggerRun>().await.len()),
        ("Cancellation", h.names::<Cancellation>().await.len()),
        ("User", h.names::<User>().await.len()),
        ("Object", h.names::<Object>().await.len()),
        ("Tenant", h.names::<Tenant>().await.len()),
    ])
}
