//! Trigger ingest: herald's HTTP API against raw apiserver creates of the same
//! TriggerRun, in the same process, on the same control plane. Prints both
//! throughputs, their ratio, p50/p99 latencies and what herald adds to them,
//! and the CPU this process spends per request; asserts nothing.
//!
//!   cargo bench --bench ingest
//!
//! Settings (environment): HERALD_BENCH_REQUESTS per round (default 100),
//! HERALD_BENCH_CONCURRENCY (default 16), HERALD_BENCH_ROUNDS (default 30).
//! The control plane comes from tests/common (HERALD_TEST_KUBECONFIG, or a
//! local one started for the run). Only herald's HTTP layer and watch caches
//! run (no controllers), so both sides measure ingest alone.
//!
//! Rounds are short and rotate which side goes first: on a shared machine the
//! load from other processes drifts over seconds, and with a few long rounds
//! that drift, not herald, decided the ratio (the same build measured 0.7 to
//! 1.8 with 3 rounds of 1,000). The CPU figure (utime + stime of this
//! process, which holds herald, its watches and both clients) moves much less
//! with that load: the herald rows minus the raw row are what herald's HTTP
//! layer, handler and the HTTP client calling it cost per trigger.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald::controller::{Context, Stores};
use herald::resources::{TriggerRun, TriggerRunSpec, Workflow};
use herald::settings::Settings;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::Api;
use serde_json::{json, Value};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The trigger every request sends.
fn trigger(i: usize) -> Value {
    json!({
        "recipients": ["user_1", "user_2", {"id": "p1", "collection": "projects"}],
        "actor": "user_3",
        "data": {"message": "deployed", "build": i, "tags": ["a", "b"], "url": "https://ci.example/builds/1234"},
        "cancellation_key": format!("build-{i}"),
    })
}

/// The same TriggerRun, as herald would store it (labels and annotations included).
fn run_object(i: usize) -> TriggerRun {
    let body = trigger(i);
    let spec = TriggerRunSpec {
        workflow: "bench".into(),
        recipients: body["recipients"].as_array().unwrap().clone(),
        actor: Some(body["actor"].clone()),
        data: body["data"].as_object().cloned(),
        cancellation_key: body["cancellation_key"].as_str().map(str::to_string),
        ..Default::default()
    };
    let mut run = TriggerRun::new(&format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]), spec);
    run.metadata.labels = Some(BTreeMap::from([("app.kubernetes.io/created-by".to_string(), "herald-api".to_string())]));
    run.metadata.annotations = Some(BTreeMap::from([
        ("herald.dev/request-fingerprint".to_string(), "0".repeat(64)),
        ("herald.dev/api-caller".to_string(), "apikey:bench/herald-api-key".to_string()),
        ("herald.dev/api".to_string(), "trigger".to_string()),
    ]));
    run
}

struct Round {
    elapsed: Duration,
    latencies: Vec<Duration>,
    errors: usize,
    /// CPU time of this process during the round (None where /proc is not).
    cpu: Option<Duration>,
}

/// User + system CPU time of this process, every thread (Linux).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ: 100 on every Linux architecture herald runs on.
    Some(Duration::from_millis(ticks * 10))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs `n` operations, `concurrency` at a time, timing each.
async fn drive<F, Fut>(n: usize, concurrency: usize, op: F) -> Round
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let cpu_before = process_cpu();
    let started = Instant::now();
    let results: Vec<(Duration, bool)> = futures::stream::iter(0..n)
        .map(|i| {
            let fut = op(i);
            async move {
                let t = Instant::now();
                let ok = fut.await;
                (t.elapsed(), ok)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let cpu = process_cpu().zip(cpu_before).map(|(after, before)| after.saturating_sub(before));
    let errors = results.iter().filter(|(_, ok)| !ok).count();
    let latencies = results.into_iter().filter(|(_, ok)| *ok).map(|(d, _)| d).collect();
    Round { elapsed, latencies, errors, cpu }
}

struct Side {
    name: &'static str,
    rounds: Vec<Round>,
}

struct Summary {
    rate: f64,
    p50: Duration,
    p99: Duration,
    ok: usize,
    errors: usize,
    /// This process's CPU per request, in milliseconds.
    cpu_ms: Option<f64>,
}

impl Side {
    fn summary(&self) -> Summary {
        let total: Duration = self.rounds.iter().map(|r| r.elapsed).sum();
        let mut all: Vec<Duration> = self.rounds.iter().flat_map(|r| r.latencies.iter().copied()).collect();
        all.sort();
        let ok = all.len();
        let errors = self.rounds.iter().map(|r| r.errors).sum();
        let requests = ok + errors;
        let cpu: Option<Duration> = self.rounds.iter().map(|r| r.cpu).sum();
        let cpu_ms = cpu.filter(|_| requests > 0).map(|c| ms(c) / requests as f64);
        Summary { rate: ok as f64 / total.as_secs_f64(), p50: percentile(&all, 0.5), p99: percentile(&all, 0.99), ok, errors, cpu_ms }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let requests = env("HERALD_BENCH_REQUESTS", 100);
    let concurrency = env("HERALD_BENCH_CONCURRENCY", 16);
    let rounds = env("HERALD_BENCH_ROUNDS", 30);
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;

    let workflow: Workflow = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow",
        "metadata": {"name": "bench"}, "spec": {"key": "bench", "dataSchema": {"type": "object", "required": ["message"]}, "steps": []}}))
    .unwrap();
    ns.api::<Workflow>().create(&PostParams::default(), &workflow).await.unwrap();
    let key = format!("sk_bench_{}", uuid::Uuid::new_v4().simple());
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "herald-api-key", "labels": {"herald.dev/api-key": "true"}}, "stringData": {"key": key}})).unwrap();
    ns.api::<Secret>().create(&PostParams::default(), &secret).await.unwrap();

    // Herald's HTTP layer and watch caches, without the controllers.
    let settings = Settings::for_namespace(&ns.name);
    let stores = Stores::start(&client, &settings);
    let context = Context::new(client.clone(), settings, stores, Default::default(), None);
    context.stores.wait_until_ready().await.expect("caches");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = herald::http::State { context: context.clone(), ready: Arc::new(AtomicBool::new(true)) };
    let server = tokio::spawn(herald::http::serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency * 2).build().unwrap();
    let url = format!("{base}/v1/workflows/bench/trigger");
    let herald_trigger = |i: usize, idempotency: bool| {
        let mut request = http.post(&url).header("authorization", format!("Bearer {key}")).header("content-type", "application/json");
        if idempotency {
            request = request.header("idempotency-key", uuid::Uuid::new_v4().to_string());
        }
        let request = request.body(serde_json::to_vec(&trigger(i)).unwrap());
        async move { request.send().await.is_ok_and(|r| r.status() == 200) }
    };
    let runs: Api<TriggerRun> = ns.api();
    let pp = PostParams::default();
    let raw_create = |i: usize| {
        let runs = runs.clone();
        let pp = pp.clone();
        async move { runs.create(&pp, &run_object(i)).await.is_ok() }
    };

    // Wait for the key and the workflow in herald's caches, then warm up both paths.
    for _ in 0..200 {
        if herald_trigger(0, false).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drive(200, concurrency, |i| herald_trigger(i, false)).await;
    drive(200, concurrency, raw_create).await;

    #[derive(Clone, Copy)]
    enum Kind {
        Raw,
        Api,
        Keyed,
    }
    let mut raw = Side { name: "raw apiserver create", rounds: Vec::new() };
    let mut api = Side { name: "herald POST /v1/workflows/{key}/trigger", rounds: Vec::new() };
    let mut keyed = Side { name: "herald, with Idempotency-Key", rounds: Vec::new() };
    let order = [Kind::Raw, Kind::Api, Kind::Keyed];
    for round in 0..rounds {
        // Each side goes first, second and third equally often.
        for k in 0..order.len() {
            match order[(round + k) % order.len()] {
                Kind::Raw => raw.rounds.push(drive(requests, concurrency, raw_create).await),
                Kind::Api => api.rounds.push(drive(requests, concurrency, |i| herald_trigger(i, false)).await),
                Kind::Keyed => keyed.rounds.push(drive(requests, concurrency, |i| herald_trigger(i, true)).await),
            }
        }
        if (round + 1) % 10 == 0 || round + 1 == rounds {
            let (r, a, k) = (raw.summary(), api.summary(), keyed.summary());
            println!("after {} rounds: raw {:.0}/s, herald {:.0}/s, herald+key {:.0}/s", round + 1, r.rate, a.rate, k.rate);
        }
    }

    println!();
    println!("trigger ingest: {rounds} rounds x {requests} requests, {concurrency} in flight, one TriggerRun per request");
    println!("{:<42} {:>10} {:>10} {:>10} {:>8} {:>7} {:>14}", "", "per second", "p50 ms", "p99 ms", "ok", "errors", "CPU ms/request");
    let base = raw.summary();
    for side in [&raw, &api, &keyed] {
        let s = side.summary();
        let cpu = s.cpu_ms.map_or_else(|| "n/a".to_string(), |c| format!("{c:.3}"));
        println!("{:<42} {:>10.0} {:>10.2} {:>10.2} {:>8} {:>7} {:>14}", side.name, s.rate, ms(s.p50), ms(s.p99), s.ok, s.errors, cpu);
    }
    for (label, side) in [("herald", &api), ("herald with Idempotency-Key", &keyed)] {
        let s = side.summary();
        let cpu = s.cpu_ms.zip(base.cpu_ms).map_or_else(String::new, |(c, b)| format!(", CPU in this process {:+.3} ms/request", c - b));
        println!("{label} / raw: throughput ratio {:.3}; latency p50 {:+.2} ms, p99 {:+.2} ms{cpu}", s.rate / base.rate, ms(s.p50) - ms(base.p50), ms(s.p99) - ms(base.p99));
    }

    let _ = stop.send(());
    let _ = server.await;
}
