//! Soak: triggers through herald's HTTP API at a steady rate, with the
//! history store (PostgreSQL) and without it. Prints figures; asserts nothing.
//!
//!   HERALD_SOAK_SECONDS=60 cargo bench --bench soak
//!
//! Phase A, "soak": HERALD_SOAK_RATE triggers/s (default 20) for
//! HERALD_SOAK_SECONDS (default 600, issue 11's ten minutes) with the store
//! and a short finished TTL (HERALD_SOAK_FINISHED_TTL, default 30 s), then
//! the same rate without the store for HERALD_SOAK_PLAIN_SECONDS (default
//! half as long). Every HERALD_SOAK_SAMPLE_SECONDS (10) it counts herald's
//! objects in the namespace (TriggerRuns, RecipientPages, Events: what herald
//! keeps in etcd); at the end it waits for the backlog to drain and checks in
//! PostgreSQL that every acknowledged workflow_run_id was archived, and its
//! message recorded.
//! Phase B, "ramp": steps of HERALD_SOAK_STEP_SECONDS (20) at the rates of
//! HERALD_SOAK_RATES (10,20,40,...,640), with and without the store
//! alternately (a fresh namespace and herald for each series); a step fails
//! when its trigger-to-webhook p99 is 250 ms or more or it had errors, and is
//! tried again (HERALD_SOAK_STEP_TRIES in all, default 2: on a shared machine
//! a spike from another process is not saturation); a series stops at a rate
//! that failed every try. HERALD_SOAK_PHASES=soak or =ramp runs one phase only.
//!
//! Each trigger has one recipient (a pre-created User) and one http channel
//! step to a receiver in this process, which notes when each
//! workflow_run_id arrives; latency is from sending the trigger to that.
//! Requests carry an Idempotency-Key, as Knock's SDKs send on every request
//! (HERALD_SOAK_IDEMPOTENCY=0: none). herald runs in-process, the full
//! operator (API, controllers, leader election), with default settings;
//! writes are every write request herald's Kubernetes client sent (Lease
//! renewals left out), next to the sum of herald_api_writes_total.
//!
//! Needs the control plane of tests/common (HERALD_TEST_KUBECONFIG, or one
//! started for the run) and PostgreSQL: HERALD_TEST_DATABASE_URL (a server
//! URL ending in /<database>; each herald gets a fresh database), else one is
//! started with scripts/postgres.sh for the run (install it with
//! `scripts/postgres.sh install`). RUST_LOG filters herald's logs (default warn).
//!
//! Measured on a 2-core machine shared with other builds (load average 3 to 7)
//! on 2026-11-30, HERALD_SOAK_SECONDS=120 HERALD_SOAK_PLAIN_SECONDS=120
//! HERALD_SOAK_FINISHED_TTL=20 HERALD_SOAK_STEP_SECONDS=15, idempotency keys on:
//!
//! | | store (TTL 20 s) | no store |
//! |---|---|---|
//! | apiserver writes per trigger | 4.00 for its whole life (POST run, PATCH run, PATCH status, DELETE) | 3.00 until finished (+1 DELETE after 7 days) |
//! | trigger to webhook at 20/s | p50 13.5 ms, p99 233 ms | p50 14.7 ms, p99 306 ms |
//! | trigger answer at 20/s | p50 6.0 ms, p99 107 ms | p50 5.5 ms, p99 131 ms |
//! | TriggerRuns in the cluster at 20/s | ~388 from 20 s on (TTL x rate), 0 once drained | +20/s: 2403 after 124 s (2.09 KB of JSON each) |
//! | in the store after the soak | 2400 of 2400 runs archived, 2400 messages `sent`, ~4.1 KB per trigger | - |
//! | highest rate with p99 < 250 ms (15 s steps) | 40/s (80/s: p99 725 ms, then 18 s) | 40/s (80/s: p99 622 ms, then 5.6 s) |
//!
//! The p99s swing with the machine's load (the same 20/s gave p99 56 ms
//! (store) and 42 ms (no store) in a 15 s ramp step at load 2.7); compare
//! modes within one run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::operator::Operator;
use herald::resources::{RecipientPage, TriggerRun};
use herald::settings::Settings;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{json, Value};

/// The trigger-to-webhook p99 a sustained rate must stay under.
const P99_BUDGET: Duration = Duration::from_millis(250);

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The machine's 1-minute load average (0 where /proc/loadavg is not there).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

// ---------------------------------------------------------------------------
// The webhook receiver: notes when each workflow_run_id first arrives.

#[derive(Clone, Default)]
struct Receiver {
    url: String,
    arrived: Arc<Mutex<HashMap<String, Instant>>>,
    duplicates: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start() -> Receiver {
        use axum::routing::post;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver { url: format!("http://{}/hook", listener.local_addr().unwrap()), ..Default::default() };
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let at = Instant::now();
                    let run = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["run"].as_str().map(str::to_string)).unwrap_or_default();
                    let mut arrived = state.arrived.lock().unwrap();
                    match arrived.entry(run) {
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(at);
                        }
                        std::collections::hash_map::Entry::Occupied(_) => {
                            state.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    "ok"
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver
    }

    fn arrival(&self, run: &str) -> Option<Instant> {
        self.arrived.lock().unwrap().get(run).copied()
    }
}

// ---------------------------------------------------------------------------
// herald's writes to the Kubernetes API, from a client that records them.

#[derive(Clone, Default)]
struct Writes(Arc<Mutex<BTreeMap<String, u64>>>);

impl Writes {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap().clone()
    }

    /// `METHOD resource[/subresource]` of a write request; None for reads and Lease renewals.
    fn key(method: &str, uri: &str) -> Option<String> {
        if !matches!(method, "POST" | "PUT" | "PATCH" | "DELETE") || uri.starts_with("/apis/coordination.k8s.io/") {
            return None;
        }
        let path = uri.split('?').next().unwrap_or(uri);
        let rest: Vec<&str> = path.split("/namespaces/").nth(1).map(|r| r.split('/').skip(1).collect()).unwrap_or_else(|| vec![path]);
        let resource = match rest.as_slice() {
            [resource, _, sub, ..] => format!("{resource}/{sub}"),
            [resource, ..] => resource.to_string(),
            [] => path.to_string(),
        };
        Some(format!("{method} {resource}"))
    }
}

fn diff(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).filter(|(_, v)| *v > 0).collect()
}

async fn recording_client() -> (Client, Writes) {
    let kubeconfig = Kubeconfig::read_from(common::kubeconfig()).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    // As herald's own client (herald::operator::client): no built-in retries, 5 s connects.
    config.default_retry = false;
    config.connect_timeout = Some(Duration::from_secs(5));
    let writes = Writes::default();
    let sink = writes.clone();
    let record = tower::util::MapRequestLayer::new(move |request: axum::http::Request<kube::client::Body>| {
        if let Some(key) = Writes::key(request.method().as_str(), &request.uri().to_string()) {
            *sink.0.lock().unwrap().entry(key).or_default() += 1;
        }
        request
    });
    (kube::client::ClientBuilder::try_from(config).unwrap().with_layer(&record).build(), writes)
}

/// herald_api_writes_total, by kind.
fn metric_writes(op: &Operator) -> BTreeMap<String, u64> {
    op.context
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("herald_api_writes_total"))
        .filter_map(|l| {
            let kind = l.split("kind=\"").nth(1)?.split('"').next()?.to_string();
            Some((kind, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// One herald, in a namespace of its own.

struct Herald {
    ns: common::TestNamespace,
    op: Option<Operator>,
    base: String,
    key: String,
    http: reqwest::Client,
    writes: Writes,
    /// The history store's database, when it has one.
    database: Option<String>,
    idempotency: bool,
}

#[derive(Clone, Default)]
struct Counts {
    recorded: BTreeMap<String, u64>,
    metric: BTreeMap<String, u64>,
}

impl Herald {
    async fn start(client: &Client, receiver: &Receiver, store: bool, ttl: i64) -> Herald {
        let ns = common::TestNamespace::new(client).await;
        let hooks = receiver.url.clone();
        common::create::<herald::resources::Channel>(
            &ns,
            json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": hooks}}),
        )
        .await;
        common::create::<herald::resources::Workflow>(
            &ns,
            json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "soak"},
                "spec": {"key": "soak", "steps": [{"ref": "notify", "type": "channel", "channel": "hooks",
                    "template": {"body": "{\"run\": \"{{ workflow_run_id }}\", \"to\": {{ recipient.id | json }}, \"n\": {{ data.n | json }}}"}}]}}),
        )
        .await;
        common::create::<herald::resources::User>(
            &ns,
            json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "user-1"}, "spec": {"id": "user_1", "name": "Soak"}}),
        )
        .await;
        let key = format!("sk_soak_{}", uuid::Uuid::new_v4().simple());
        common::create::<k8s_openapi::api::core::v1::Secret>(
            &ns,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "herald-api-key", "labels": {"herald.dev/api-key": "true"}}, "stringData": {"key": key}}),
        )
        .await;

        let database = if store { Some(common::database().await) } else { None };
        let mut settings = Settings::for_namespace(&ns.name);
        settings.database_url = database.clone();
        settings.finished_ttl_seconds = ttl;
        settings.shutdown_grace_seconds = 2;
        let (herald_client, writes) = recording_client().await;
        let op = herald::operator::start(herald_client, settings).await.expect("starting herald");
        let http = reqwest::Client::builder().pool_max_idle_per_host(512).timeout(Duration::from_secs(30)).build().unwrap();
        let h = Herald { base: format!("http://{}", op.addr), op: Some(op), ns, key, http, writes, database, idempotency: env("HERALD_SOAK_IDEMPOTENCY", 1) != 0 };
        // The key and the user known, then a few triggers delivered end to end.
        common::wait_for("herald to know the API key and the user", Duration::from_secs(60), || async {
            let r = h.http.get(format!("{}/v1/users/user_1", h.base)).bearer_auth(&h.key).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        let mut warm = Vec::new();
        for i in 0..3 {
            warm.push(h.trigger(i).await.expect("a warm-up trigger"));
        }
        common::wait_for("the warm-up webhooks", Duration::from_secs(60), || async { warm.iter().all(|id| receiver.arrival(id).is_some()).then_some(()) }).await;
        h.settle().await;
        h
    }

    fn op(&self) -> &Operator {
        self.op.as_ref().unwrap()
    }

    fn counts(&self) -> Counts {
        Counts { recorded: self.writes.snapshot(), metric: metric_writes(self.op()) }
    }

    /// Waits until no reconcile is running (at most 30 s).
    async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let text = self.op().context.metrics.render();
            if common::metric_value(&text, "herald_reconciles_in_flight") == 0.0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if common::metric_value(&self.op().context.metrics.render(), "herald_reconciles_in_flight") == 0.0 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One trigger through the API: its workflow_run_id, or what went wrong.
    async fn trigger(&self, n: usize) -> Result<String, String> {
        let body = json!({"recipients": ["user_1"], "data": {"n": n}});
        let mut request = self.http.post(format!("{}/v1/workflows/soak/trigger", self.base)).bearer_auth(&self.key).header("content-type", "application/json");
        if self.idempotency {
            request = request.header("idempotency-key", uuid::Uuid::new_v4().to_string());
        }
        let response = request.body(serde_json::to_vec(&body).unwrap()).send().await.map_err(|e| format!("transport: {e}"))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| format!("reading the answer: {e}"))?;
        if status != 200 {
            return Err(format!("HTTP {status}"));
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("answer: {e}"))?;
        v["workflow_run_id"].as_str().map(str::to_string).ok_or_else(|| "no workflow_run_id".into())
    }

    /// herald's objects in the namespace: TriggerRuns, RecipientPages, Events.
    async fn objects(&self) -> (usize, usize, usize) {
        let lp = ListParams::default();
        let count = |n: Result<usize, kube::Error>| n.unwrap_or(usize::MAX);
        let runs = self.ns.api::<TriggerRun>().list_metadata(&lp).await.map(|l| l.items.len());
        let pages = self.ns.api::<RecipientPage>().list_metadata(&lp).await.map(|l| l.items.len());
        let events = self.ns.api::<Event>().list_metadata(&lp).await.map(|l| l.items.len());
        (count(runs), count(pages), count(events))
    }

    /// The runs in the cluster and the bytes of their JSON (about what etcd holds of custom resources).
    async fn run_bytes(&self) -> (usize, usize) {
        match self.ns.api::<TriggerRun>().list(&ListParams::default()).await {
            Ok(list) => {
                let bytes = list
                    .items
                    .iter()
                    .map(|r| {
                        let mut r = r.clone();
                        r.metadata.managed_fields = None;
                        serde_json::to_vec(&r).map(|b| b.len()).unwrap_or(0)
                    })
                    .sum();
                (list.items.len(), bytes)
            }
            Err(_) => (0, 0),
        }
    }

    async fn postgres(&self) -> Option<tokio_postgres::Client> {
        let url = self.database.as_ref()?;
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connecting to the history store");
        tokio::spawn(connection);
        Some(client)
    }

    /// Stops herald and empties the namespace (this control plane has no
    /// namespace controller, so a deleted namespace would keep its objects).
    async fn stop(mut self) {
        if let Some(op) = self.op.take() {
            op.shutdown().await;
        }
        let dp = DeleteParams::default();
        let lp = ListParams::default();
        let _ = self.ns.api::<TriggerRun>().delete_collection(&dp, &lp).await;
        let _ = self.ns.api::<RecipientPage>().delete_collection(&dp, &lp).await;
        let _ = self.ns.api::<Event>().delete_collection(&dp, &lp).await;
    }
}

// ---------------------------------------------------------------------------
// Load.

struct Sent {
    at: Instant,
    ack: Duration,
    result: Result<String, String>,
}

/// Triggers at `rate` per second for `secs` seconds, open loop (each on its
/// own task, whatever the answers take); returns once every answer is in.
async fn drive(h: &Arc<Herald>, rate: f64, secs: f64, acked: Arc<AtomicUsize>) -> (Vec<Sent>, Duration) {
    let n = (rate * secs).round() as usize;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    let mut lag = Duration::ZERO;
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        lag = lag.max(tokio::time::Instant::now() - due);
        let h = h.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            let result = h.trigger(i).await;
            if result.is_ok() {
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Sent { at, ack: at.elapsed(), result }
        }));
    }
    let mut sent = Vec::with_capacity(n);
    for t in tasks {
        sent.push(t.await.unwrap());
    }
    (sent, lag)
}

/// Trigger-to-webhook latencies of the acknowledged triggers, once every
/// webhook arrived or `timeout` passed; and how many did not arrive.
async fn deliveries(receiver: &Receiver, sent: &[Sent], timeout: Duration) -> (Vec<Duration>, usize) {
    let deadline = Instant::now() + timeout;
    loop {
        let (mut latencies, mut missing) = (Vec::new(), 0);
        {
            let arrived = receiver.arrived.lock().unwrap();
            for s in sent {
                if let Ok(id) = &s.result {
                    match arrived.get(id) {
                        Some(at) => latencies.push(at.saturating_duration_since(s.at)),
                        None => missing += 1,
                    }
                }
            }
        }
        if missing == 0 || Instant::now() > deadline {
            latencies.sort();
            return (latencies, missing);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn error_summary(sent: &[Sent]) -> String {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for s in sent {
        if let Err(e) = &s.result {
            *by.entry(e.as_str()).or_default() += 1;
        }
    }
    by.iter().map(|(e, n)| format!("{n} x {e}")).collect::<Vec<_>>().join(", ")
}

// ---------------------------------------------------------------------------
// Phase A: soak.

#[derive(Clone)]
struct Sample {
    t: f64,
    acked: usize,
    delivered: usize,
    runs: usize,
    pages: usize,
    events: usize,
    archived: Option<i64>,
    load: f64,
}

/// Samples the namespace every `every` until `stop` is set.
fn sampler(h: Arc<Herald>, receiver: Receiver, acked: Arc<AtomicUsize>, every: Duration, stop: Arc<AtomicBool>, label: &'static str) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let pg = h.postgres().await;
        let base = receiver.arrived.lock().unwrap().len();
        let mut samples = Vec::new();
        loop {
            let (runs, pages, events) = h.objects().await;
            let archived = match &pg {
                Some(pg) => pg.query_one("SELECT count(*) FROM herald_workflow_runs", &[]).await.ok().map(|r| r.get::<_, i64>(0)),
                None => None,
            };
            let s = Sample {
                t: start.elapsed().as_secs_f64(),
                acked: acked.load(Ordering::Relaxed),
                delivered: receiver.arrived.lock().unwrap().len() - base,
                runs,
                pages,
                events,
                archived,
                load: load_average(),
            };
            println!(
                "  [{label} {:>5.0}s] acked {:>6}  delivered {:>6}  TriggerRuns {:>6}  RecipientPages {:>4}  Events {:>4}  load {:>4.1}{}",
                s.t,
                s.acked,
                s.delivered,
                s.runs,
                s.pages,
                s.events,
                s.load,
                s.archived.map(|a| format!("  archived {a:>6}")).unwrap_or_default()
            );
            samples.push(s);
            // Sleep in small steps, so that a stop is seen at once.
            let next = start + every.mul_f64(samples.len() as f64);
            while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if stop.load(Ordering::Relaxed) {
                return samples;
            }
        }
    })
}

/// What the history store holds of a soak's acknowledged triggers.
struct StoreCounts {
    /// Acknowledged workflow_run_ids found in herald_workflow_runs.
    archived: i64,
    /// Distinct runs in herald_messages.
    runs_with_messages: i64,
    messages: i64,
    by_status: BTreeMap<String, i64>,
    /// Bytes of herald's tables and their indexes.
    bytes: i64,
}

struct SoakReport {
    label: &'static str,
    secs: f64,
    rate: f64,
    sent: usize,
    acked: usize,
    errors: String,
    lag: Duration,
    ack_p50: Duration,
    ack_p99: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    after_p50: Duration,
    after_p99: Duration,
    missing: usize,
    samples: Vec<Sample>,
    /// Writes until every run finished.
    finished_writes: Counts,
    /// With the store: writes until every run left the cluster too.
    deleted_writes: Option<Counts>,
    drain: Duration,
    leave: Option<Duration>,
    store: Option<StoreCounts>,
    /// Finished runs kept in the cluster: count and JSON bytes.
    kept: (usize, usize),
}

async fn soak(client: &Client, receiver: &Receiver, store: bool, rate: f64, secs: f64, ttl: i64, every: Duration) -> SoakReport {
    let label = if store { "store" } else { "no store" };
    println!("\nsoak {label}: {rate}/s for {secs}s{}", if store { format!(", finished TTL {ttl}s") } else { String::new() });
    let h = Arc::new(Herald::start(client, receiver, store, ttl).await);
    let before = h.counts();
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let samples = sampler(h.clone(), receiver.clone(), acked.clone(), every, stop.clone(), if store { "store" } else { "plain" });
    let (sent, lag) = drive(&h, rate, secs, acked.clone()).await;
    let load_end = Instant::now();
    let (latencies, missing) = deliveries(receiver, &sent, Duration::from_secs(180)).await;
    let drain = load_end.elapsed();
    // From the answer to the webhook: herald's controller and the delivery, without the create.
    let mut after: Vec<Duration> = {
        let arrived = receiver.arrived.lock().unwrap();
        sent.iter().filter_map(|s| Some(arrived.get(s.result.as_ref().ok()?)?.saturating_duration_since(s.at + s.ack))).collect()
    };
    after.sort();
    h.settle().await;
    let finished_writes = h.counts();
    let ids: Vec<uuid::Uuid> = sent.iter().filter_map(|s| s.result.as_ref().ok()).filter_map(|id| uuid::Uuid::parse_str(id).ok()).collect();

    // With the store: wait until every run is archived and has left the cluster.
    let (mut deleted_writes, mut leave, mut store_counts) = (None, None, None);
    let mut kept = (0, 0);
    if let Some(pg) = h.postgres().await {
        let deadline = Instant::now() + Duration::from_secs(ttl.max(0) as u64 + 180);
        loop {
            let archived: i64 = pg.query_one("SELECT count(*) FROM herald_workflow_runs WHERE id = ANY($1)", &[&ids]).await.unwrap().get(0);
            let (runs, pages, _) = h.objects().await;
            if (archived as usize >= ids.len() && runs == 0 && pages == 0) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        leave = Some(load_end.elapsed());
        h.settle().await;
        deleted_writes = Some(h.counts());
        let archived: i64 = pg.query_one("SELECT count(*) FROM herald_workflow_runs WHERE id = ANY($1)", &[&ids]).await.unwrap().get(0);
        let row = pg.query_one("SELECT count(DISTINCT workflow_run_id), count(*) FROM herald_messages WHERE workflow_run_id = ANY($1)", &[&ids]).await.unwrap();
        let by_status = pg
            .query("SELECT status, count(*) FROM herald_messages WHERE workflow_run_id = ANY($1) GROUP BY status", &[&ids])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect();
        let bytes: i64 = pg
            .query_one(
                "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname LIKE 'herald_%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        store_counts = Some(StoreCounts { archived, runs_with_messages: row.get(0), messages: row.get(1), by_status, bytes });
    } else {
        kept = h.run_bytes().await;
    }
    stop.store(true, Ordering::Relaxed);
    let samples = samples.await.unwrap();

    let mut acks: Vec<Duration> = sent.iter().filter(|s| s.result.is_ok()).map(|s| s.ack).collect();
    acks.sort();
    let report = SoakReport {
        label,
        secs,
        rate,
        sent: sent.len(),
        acked: ids.len(),
        errors: error_summary(&sent),
        lag,
        ack_p50: percentile(&acks, 0.5),
        ack_p99: percentile(&acks, 0.99),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        after_p50: percentile(&after, 0.5),
        after_p99: percentile(&after, 0.99),
        missing,
        samples,
        finished_writes: Counts { recorded: diff(&finished_writes.recorded, &before.recorded), metric: diff(&finished_writes.metric, &before.metric) },
        deleted_writes: deleted_writes.map(|c| Counts { recorded: diff(&c.recorded, &before.recorded), metric: diff(&c.metric, &before.metric) }),
        drain,
        leave,
        store: store_counts,
        kept,
    };
    Arc::into_inner(h).expect("the sampler is done").stop().await;
    report
}

fn per(counts: &BTreeMap<String, u64>, n: usize) -> f64 {
    counts.values().sum::<u64>() as f64 / n.max(1) as f64
}

fn breakdown(counts: &BTreeMap<String, u64>, n: usize) -> String {
    counts.iter().map(|(k, v)| format!("{k} {:.2}", *v as f64 / n.max(1) as f64)).collect::<Vec<_>>().join(", ")
}

fn print_soak(r: &SoakReport) {
    println!("\n== soak, {}: {}/s for {:.0}s", r.label, r.rate, r.secs);
    println!(
        "  triggers sent {}, acknowledged {}{}; the sender fell behind its schedule by at most {:.0} ms",
        r.sent,
        r.acked,
        if r.errors.is_empty() { String::new() } else { format!(" (errors: {})", r.errors) },
        ms(r.lag)
    );
    println!("  trigger answer:     p50 {:>7.1} ms  p99 {:>7.1} ms", ms(r.ack_p50), ms(r.ack_p99));
    println!("  trigger to webhook: p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  ({} never arrived)", ms(r.p50), ms(r.p99), ms(r.max), r.missing);
    println!("  answer to webhook:  p50 {:>7.1} ms  p99 {:>7.1} ms  (herald's reconcile and the delivery)", ms(r.after_p50), ms(r.after_p99));
    println!("  last webhook {:.1}s after the last trigger", r.drain.as_secs_f64());
    let w = &r.finished_writes;
    println!(
        "  apiserver writes per trigger, load until every run finished{}: {:.2} recorded ({}); herald_api_writes_total {:.2}",
        if r.deleted_writes.is_some() { " (deletes of runs whose TTL passed meanwhile included)" } else { "" },
        per(&w.recorded, r.acked),
        breakdown(&w.recorded, r.acked),
        per(&w.metric, r.acked)
    );
    if let Some(w) = &r.deleted_writes {
        println!(
            "  apiserver writes per trigger, until every run was archived and deleted (a trigger's whole life): {:.2} recorded ({}); herald_api_writes_total {:.2}",
            per(&w.recorded, r.acked),
            breakdown(&w.recorded, r.acked),
            per(&w.metric, r.acked)
        );
    }
    if let (Some(leave), Some(StoreCounts { archived, runs_with_messages, messages, by_status, bytes })) = (r.leave, &r.store) {
        println!("  every run archived and gone from the cluster {:.1}s after the last trigger", leave.as_secs_f64());
        println!(
            "  store: acknowledged {}, archived {archived} (missing {}), runs with messages {runs_with_messages}, messages {messages} {by_status:?}",
            r.acked,
            r.acked as i64 - archived
        );
        println!(
            "  store size: {:.1} MB for herald's tables, about {:.2} KB per archived trigger (warm-up included)",
            *bytes as f64 / 1e6,
            *bytes as f64 / 1e3 / (*archived).max(1) as f64
        );
    }
    if r.kept.0 > 0 {
        println!(
            "  kept in the cluster: {} TriggerRuns, {:.1} MB of JSON ({:.2} KB each, without managedFields)",
            r.kept.0,
            r.kept.1 as f64 / 1e6,
            r.kept.1 as f64 / 1e3 / r.kept.0 as f64
        );
    }
    println!("  herald objects in the namespace (sampled):");
    println!("  {:>6} {:>8} {:>9} {:>11} {:>14} {:>7} {:>9} {:>5}", "t (s)", "acked", "delivered", "TriggerRuns", "RecipientPages", "Events", "archived", "load");
    for s in &r.samples {
        println!(
            "  {:>6.0} {:>8} {:>9} {:>11} {:>14} {:>7} {:>9} {:>5.1}",
            s.t,
            s.acked,
            s.delivered,
            s.runs,
            s.pages,
            s.events,
            s.archived.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            s.load
        );
    }
}

// ---------------------------------------------------------------------------
// Phase B: ramp.

struct Step {
    rate: f64,
    sent: usize,
    errors: usize,
    missing: usize,
    delivered: usize,
    p50: Duration,
    p99: Duration,
    writes: f64,
    runs_after: usize,
    detail: String,
    /// The machine's 1-minute load average at the end of the step.
    load: f64,
}

impl Step {
    fn ok(&self) -> bool {
        self.errors == 0 && self.missing == 0 && self.p99 < P99_BUDGET
    }
}

async fn step(h: &Arc<Herald>, receiver: &Receiver, rate: f64, secs: f64) -> Step {
    let before = h.counts();
    let (sent, _) = drive(h, rate, secs, Arc::new(AtomicUsize::new(0))).await;
    let (latencies, missing) = deliveries(receiver, &sent, Duration::from_secs(60)).await;
    h.settle().await;
    let writes = diff(&h.counts().recorded, &before.recorded);
    let acked = sent.iter().filter(|s| s.result.is_ok()).count();
    let (runs_after, _, _) = h.objects().await;
    let s = Step {
        rate,
        sent: sent.len(),
        errors: sent.len() - acked,
        missing,
        delivered: latencies.len(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        writes: per(&writes, acked),
        runs_after,
        detail: error_summary(&sent),
        load: load_average(),
    };
    println!(
        "  [{} {:>4}/s] p50 {:>8.1} ms  p99 {:>8.1} ms  errors {}{}  missing {}  writes/trigger {:.2}  TriggerRuns {}  load {:.1}",
        if h.database.is_some() { "store" } else { "plain" },
        rate,
        ms(s.p50),
        ms(s.p99),
        s.errors,
        if s.detail.is_empty() { String::new() } else { format!(" ({})", s.detail) },
        s.missing,
        s.writes,
        s.runs_after,
        s.load
    );
    s
}

async fn ramp(client: &Client, receiver: &Receiver, rates: &[f64], secs: f64, ttl: i64, tries: usize) -> [Vec<Step>; 2] {
    println!("\nramp: steps of {secs}s at {rates:?}/s, with and without the store alternately; a failed step is tried {tries} times in all");
    let mut series: [Option<Arc<Herald>>; 2] =
        [Some(Arc::new(Herald::start(client, receiver, true, ttl).await)), Some(Arc::new(Herald::start(client, receiver, false, ttl).await))];
    let mut steps: [Vec<Step>; 2] = [Vec::new(), Vec::new()];
    for &rate in rates {
        for i in 0..2 {
            let Some(h) = series[i].clone() else { continue };
            // A step that fails is tried again (up to `tries` in all): on a
            // shared machine a spike from another process is not saturation.
            let mut ok = false;
            for _ in 0..tries.max(1) {
                let s = step(&h, receiver, rate, secs).await;
                ok = s.ok();
                steps[i].push(s);
                if ok {
                    break;
                }
            }
            if !ok {
                drop(h);
                if let Some(h) = series[i].take() {
                    Arc::into_inner(h).expect("one owner").stop().await;
                }
            }
        }
        if series.iter().all(Option::is_none) {
            break;
        }
    }
    for h in series.into_iter().flatten() {
        Arc::into_inner(h).expect("one owner").stop().await;
    }
    steps
}

fn print_ramp(steps: &[Vec<Step>; 2], secs: f64) {
    println!("\n== ramp: {secs}s per step; a series stops at a rate whose every try had p99 >= {} ms or errors", P99_BUDGET.as_millis());
    println!(
        "  {:>9} | {:>9} {:>8} {:>6} {:>9} {:>6} {:>6} {:>5} | {:>9} {:>8} {:>6} {:>9} {:>6} {:>6} {:>5}",
        "", "store p50", "p99 ms", "errors", "delivered", "writes", "runs", "load", "plain p50", "p99 ms", "errors", "delivered", "writes", "runs", "load"
    );
    let rates: Vec<f64> = steps.iter().flat_map(|s| s.iter().map(|x| x.rate)).fold(Vec::new(), |mut v, r| {
        if !v.contains(&r) {
            v.push(r);
        }
        v
    });
    let cell = |s: Option<&&Step>| match s {
        Some(s) => format!("{:>9.1} {:>8.1} {:>6} {:>9} {:>6.2} {:>6} {:>5.1}", ms(s.p50), ms(s.p99), s.errors + s.missing, s.delivered, s.writes, s.runs_after, s.load),
        None => format!("{:>9} {:>8} {:>6} {:>9} {:>6} {:>6} {:>5}", "-", "-", "-", "-", "-", "-", "-"),
    };
    for r in rates {
        let tries: [Vec<&Step>; 2] = [steps[0].iter().filter(|s| s.rate == r).collect(), steps[1].iter().filter(|s| s.rate == r).collect()];
        for t in 0..tries[0].len().max(tries[1].len()) {
            let label = if t == 0 { format!("{r}/s") } else { format!("again {}", t + 1) };
            println!("  {label:>9} | {} | {}", cell(tries[0].get(t)), cell(tries[1].get(t)));
        }
    }
    for (i, name) in ["store", "no store"].iter().enumerate() {
        let best = steps[i].iter().filter(|s| s.ok()).map(|s| s.rate).fold(None::<f64>, |_, r| Some(r));
        let sent: usize = steps[i].iter().map(|s| s.sent).sum();
        match best {
            Some(rate) => println!("  highest rate with p99 < {} ms, {name}: {rate}/s ({sent} triggers in the series)", P99_BUDGET.as_millis()),
            None => println!("  highest rate with p99 < {} ms, {name}: none of the rates tried", P99_BUDGET.as_millis()),
        }
    }
    println!("  (\"writes\" is per trigger during the step: with the store, deletes of earlier steps' runs whose TTL passed land in later steps; \"runs\" is TriggerRuns in the cluster after the step)");
}

// ---------------------------------------------------------------------------

/// A PostgreSQL server started for this run (stopped on drop).
struct Postgres(PathBuf);

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash").arg(common::repo_path("scripts/postgres.sh")).arg("stop").arg(&self.0).output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn postgres() -> Option<Postgres> {
    if std::env::var("HERALD_TEST_DATABASE_URL").is_ok() {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("herald-soak-pg-{}", std::process::id()));
    let out = std::process::Command::new("bash").arg(common::repo_path("scripts/postgres.sh")).arg("start").arg(&dir).output().expect("running scripts/postgres.sh");
    if !out.status.success() {
        panic!(
            "HERALD_TEST_DATABASE_URL is not set and PostgreSQL could not be started with scripts/postgres.sh ({}):\n{}\nInstall it with `scripts/postgres.sh install`, or start one with `scripts/postgres.sh start DIR` and export HERALD_TEST_DATABASE_URL=$(cat DIR/url)",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let url = std::fs::read_to_string(dir.join("url")).expect("scripts/postgres.sh wrote DIR/url");
    std::env::set_var("HERALD_TEST_DATABASE_URL", url.trim());
    Some(Postgres(dir))
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let pg = postgres();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench());
    drop(runtime);
    drop(pg);
}

async fn bench() {
    let rate: f64 = env("HERALD_SOAK_RATE", 20.0);
    let secs: f64 = env("HERALD_SOAK_SECONDS", 600.0);
    let plain_secs: f64 = env("HERALD_SOAK_PLAIN_SECONDS", secs / 2.0);
    let ttl: i64 = env("HERALD_SOAK_FINISHED_TTL", 30);
    let every = Duration::from_secs_f64(env("HERALD_SOAK_SAMPLE_SECONDS", 10.0));
    let step_secs: f64 = env("HERALD_SOAK_STEP_SECONDS", 20.0);
    let rates: Vec<f64> = env("HERALD_SOAK_RATES", "10,20,40,80,160,320,640".to_string()).split(',').filter_map(|r| r.trim().parse().ok()).collect();
    let phases = env("HERALD_SOAK_PHASES", "soak,ramp".to_string());
    println!(
        "soak benchmark: {} cores, idempotency keys {}, herald with default settings (max concurrent runs 16)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        if env("HERALD_SOAK_IDEMPOTENCY", 1) != 0 { "on" } else { "off" }
    );

    let client = common::client().await;
    let receiver = Receiver::start().await;
    let mut soaks = Vec::new();
    if phases.contains("soak") {
        soaks.push(soak(&client, &receiver, true, rate, secs, ttl, every).await);
        if plain_secs > 0.0 {
            soaks.push(soak(&client, &receiver, false, rate, plain_secs, ttl, every).await);
        }
    }
    let ramp_steps = if phases.contains("ramp") { Some(ramp(&client, &receiver, &rates, step_secs, ttl, env("HERALD_SOAK_STEP_TRIES", 2)).await) } else { None };

    println!("\n================ report ================");
    for r in &soaks {
        print_soak(r);
    }
    if let [with, without] = soaks.as_slice() {
        let whole = with.deleted_writes.as_ref().map_or(0.0, |c| per(&c.recorded, with.acked));
        let most = |r: &SoakReport| r.samples.iter().map(|s| s.runs).max().unwrap_or(0);
        let last = |r: &SoakReport| r.samples.last().map_or(0, |s| s.runs);
        println!("\n== side by side at {rate}/s");
        println!(
            "  writes per trigger: store {whole:.2} for its whole life (the delete included); no store {:.2} until finished (its delete comes after 7 days)",
            per(&without.finished_writes.recorded, without.acked)
        );
        println!("  trigger to webhook: p50 {:.1} ms (store) vs {:.1} ms (no store); p99 {:.1} vs {:.1} ms", ms(with.p50), ms(without.p50), ms(with.p99), ms(without.p99));
        println!(
            "  TriggerRuns in the cluster: with the store at most {} over {:.0}s ({} once drained); without it {} after {:.0}s, growing by {rate}/s for 7 days",
            most(with),
            with.secs,
            last(with),
            last(without),
            without.samples.last().map_or(0.0, |s| s.t),
        );
    }
    if let Some(steps) = &ramp_steps {
        print_ramp(steps, step_secs);
    }
    println!("  duplicate webhooks: {}", receiver.duplicates.load(Ordering::Relaxed));
    println!("  load average (1 min) at the end: {:.1} on {} cores", load_average(), std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
}
