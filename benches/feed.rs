//! In-app feed reads at scale: 1,000,000 feed messages for 10,000 users in
//! PostgreSQL, then `GET /v1/users/{id}/feeds/{channel}` at a steady rate
//! (open loop: requests start on schedule whether or not earlier ones are
//! done). Prints p50/p99/max latency and the rate achieved; asserts nothing.
//!
//!   cargo bench --bench feed
//!
//! Settings (environment): HERALD_BENCH_MESSAGES (default 1,000,000),
//! HERALD_BENCH_USERS (10,000), HERALD_BENCH_RATE (requests/s, 200),
//! HERALD_BENCH_SECONDS (30). Needs a control plane (HERALD_TEST_KUBECONFIG,
//! or one started for the run) and PostgreSQL (HERALD_TEST_DATABASE_URL, e.g.
//! from `scripts/postgres.sh start DIR`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::resources::Channel;
use herald::settings::Settings;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::Api;
use serde_json::json;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (messages, users, rate, seconds) =
        (env("HERALD_BENCH_MESSAGES", 1_000_000), env("HERALD_BENCH_USERS", 10_000), env("HERALD_BENCH_RATE", 200), env("HERALD_BENCH_SECONDS", 30));
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    let url = common::database().await;
    let mut settings = Settings::for_namespace(&ns.name);
    settings.database_url = Some(url.clone());
    let op = common::operator_with(&client, settings).await;
    let key = format!("sk_bench_{}", uuid::Uuid::new_v4().simple());
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "herald-api-key", "labels": {"herald.dev/api-key": "true"}}, "stringData": {"key": key}})).unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &secret).await.unwrap();
    let channel: Channel =
        serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "feed"}, "spec": {"type": "in_app_feed"}})).unwrap();
    Api::<Channel>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &channel).await.unwrap();

    // Seed the messages straight into the store (herald applied the schema at start).
    let started = Instant::now();
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let seed = format!(
        "INSERT INTO herald_messages (id, namespace, workflow, workflow_run_id, recipient_run_id, recipient_id, tenant, step_ref, channel, channel_type, status, reason, content, attempts, data, inserted_at, updated_at, seen_at, read_at)
         SELECT gen_random_uuid(), '{ns}', 'new-comment', gen_random_uuid(), gen_random_uuid(), 'user-' || (i % {users}), NULL, 'in_app', 'feed', 'in_app_feed', 'delivered', 'Delivered',
                jsonb_build_object('markdownBody', 'Comment ' || i, 'blocks', jsonb_build_array(jsonb_build_object('type', 'markdown', 'name', 'body', 'content', 'Comment ' || i, 'rendered', '<p>Comment ' || i || '</p>'))),
                '[]', jsonb_build_object('page', i), now() - (i || ' seconds')::interval, now(),
                CASE WHEN i % 3 = 0 THEN now() END, CASE WHEN i % 5 = 0 THEN now() END
         FROM generate_series(1, {messages}) i",
        ns = ns.name
    );
    db.batch_execute(&seed).await.expect("seeding messages");
    db.batch_execute("ANALYZE herald_messages").await.unwrap();
    println!("seeded {messages} feed messages for {users} users in {:.1} s", started.elapsed().as_secs_f64());

    let base = format!("http://{}", op.addr);
    let http = reqwest::Client::new();
    // Wait until the key and the Channel are known.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http.get(format!("{base}/v1/users/user-1/feeds/feed")).bearer_auth(&key).send().await;
        if r.as_ref().is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "herald did not serve the feed: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let run_started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        ticker.tick().await;
        let (http, base, key, latencies, errors) = (http.clone(), base.clone(), key.clone(), latencies.clone(), errors.clone());
        let user = (i * 7919) % users;
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = http.get(format!("{base}/v1/users/user-{user}/feeds/feed?page_size=50&mode=compact")).bearer_auth(&key).send().await;
            let ok = match r {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            if ok {
                latencies.lock().unwrap().push(t.elapsed());
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = run_started.elapsed();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    println!(
        "feed GET at {rate}/s for {seconds} s: {} ok, {} errors, {:.0} req/s achieved; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        l.len(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
        l.len() as f64 / elapsed.as_secs_f64(),
        percentile(&l, 0.5).as_secs_f64() * 1000.0,
        percentile(&l, 0.99).as_secs_f64() * 1000.0,
        l.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
    drop(op);
}
