//! The in-app feed at scale, two figures; asserts nothing:
//!
//! 1. reads: 1,000,000 feed messages for 10,000 users in PostgreSQL, then
//!    `GET /v1/users/{id}/feeds/{channel}` at a steady rate (open loop:
//!    requests start on schedule whether or not earlier ones are done);
//!    prints p50/p99/max latency and the rate achieved;
//! 2. real time: 1,000 users each with an open socket (Knock's Phoenix
//!    protocol, a publishable key and an RS256 user token), one trigger of an
//!    in-app workflow for all of them; prints, per user, the time from the
//!    message being stored (its `inserted_at`) to its `new-message` push.
//!
//!   cargo bench --bench feed
//!
//! Settings (environment): HERALD_BENCH_MESSAGES (default 1,000,000),
//! HERALD_BENCH_USERS (10,000), HERALD_BENCH_RATE (requests/s, 200),
//! HERALD_BENCH_SECONDS (30), HERALD_BENCH_SOCKETS (1,000). Needs openssl,
//! a control plane (HERALD_TEST_KUBECONFIG,
//! or one started for the run) and PostgreSQL (HERALD_TEST_DATABASE_URL, e.g.
//! from `scripts/postgres.sh start DIR`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use herald::resources::{Channel, Workflow};
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

    sockets(&client, &ns.name, &base, &http, &key, &db, env("HERALD_BENCH_SOCKETS", 1000)).await;
    drop(op);
}

/// Runs openssl (a key pair for user tokens, as the README tells customers).
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl").args(args).output().expect("running openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Part 2: `count` users with an open socket each, one trigger for all of them.
async fn sockets(client: &kube::Client, namespace: &str, base: &str, http: &reqwest::Client, key: &str, db: &tokio_postgres::Client, count: usize) {
    let dir = std::env::temp_dir().join(format!("herald-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let private_path = dir.join("private.pem");
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", private_path.to_str().unwrap()]);
    let public = openssl(&["pkey", "-in", private_path.to_str().unwrap(), "-pubout"]);
    let private = std::fs::read(&private_path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let pk = format!("pk_bench_{}", uuid::Uuid::new_v4().simple());
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "herald-client-key", "labels": {"herald.dev/api-key": "true"}},
        "stringData": {"publishableKey": pk, "userTokenPublicKey": String::from_utf8(public).unwrap()},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), namespace).create(&PostParams::default(), &secret).await.unwrap();
    let workflow: Workflow = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "ping"},
        "spec": {"key": "ping", "steps": [{"ref": "in_app", "type": "channel", "channel": "feed", "template": {"markdownBody": "ping {{ recipient.id }}"}}]}}))
    .unwrap();
    Api::<Workflow>::namespaced(client.clone(), namespace).create(&PostParams::default(), &workflow).await.unwrap();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let encoding = jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap();
    let token =
        |user: &str| jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256), &json!({"sub": user, "iat": now, "exp": now + 3600}), &encoding).unwrap();
    let ws_base = base.replacen("http", "ws", 1);

    // Connect and join, a few at a time; each socket then waits for its push.
    let started = Instant::now();
    let (joined_tx, mut joined_rx) = tokio::sync::mpsc::channel::<()>(count);
    let mut waiting = Vec::with_capacity(count);
    for i in 0..count {
        let user = format!("sock-{i}");
        let url = format!("{ws_base}/ws/v1/websocket?user_token={}&api_key={pk}&vsn=2.0.0", token(&user));
        let joined = joined_tx.clone();
        waiting.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut socket = loop {
                match tokio_tungstenite::connect_async(url.as_str()).await {
                    Ok((socket, _)) => break socket,
                    // The key may not be known yet: herald answers 403 until its watch has it.
                    Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                    Err(e) => panic!("connecting a socket: {e}"),
                }
            };
            let topic = format!("feeds:feed:{user}");
            socket.send(Message::Text(json!(["1", "1", topic, "phx_join", {"c1": {"archived": "exclude"}}]).to_string().into())).await.unwrap();
            let mut announced = false;
            while let Some(Ok(frame)) = socket.next().await {
                let Message::Text(text) = frame else { continue };
                let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                match frame[3].as_str() {
                    Some("phx_reply") if !announced => {
                        announced = true;
                        let _ = joined.send(()).await;
                    }
                    Some("new-message") => return Some((user, SystemTime::now())),
                    _ => {}
                }
            }
            None
        }));
        if i % 50 == 49 {
            tokio::task::yield_now().await;
        }
    }
    drop(joined_tx);
    for _ in 0..count {
        joined_rx.recv().await.expect("every socket joins");
    }
    println!("{count} sockets connected and joined in {:.1} s", started.elapsed().as_secs_f64());

    let recipients: Vec<String> = (0..count).map(|i| format!("sock-{i}")).collect();
    let users: Vec<serde_json::Value> = recipients.iter().map(|id| json!({"id": id, "name": id})).collect();
    let a = http
        .post(format!("{base}/v1/workflows/ping/trigger"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(json!({"recipients": users}).to_string())
        .send()
        .await
        .unwrap();
    assert!(a.status().is_success(), "trigger: {}", a.status());
    let triggered = Instant::now();
    let mut arrivals = BTreeMap::new();
    for w in waiting {
        if let Ok(Ok(Some((user, at)))) = tokio::time::timeout(Duration::from_secs(120), w).await {
            arrivals.insert(user, at);
        }
    }
    let all_in = triggered.elapsed();
    let rows = db.query("SELECT recipient_id, inserted_at FROM herald_messages WHERE workflow = 'ping' AND namespace = $1", &[&namespace]).await.unwrap();
    let mut delays: Vec<Duration> = rows
        .iter()
        .filter_map(|r| {
            let user: String = r.get(0);
            let stored: jiff::Timestamp = r.get(1);
            let stored = SystemTime::UNIX_EPOCH + Duration::from_micros(stored.as_microsecond().max(0) as u64);
            arrivals.get(&user).map(|at| at.duration_since(stored).unwrap_or_default())
        })
        .collect();
    delays.sort();
    println!(
        "real time, {count} open sockets, one trigger for all: {} pushes received ({} messages stored) within {:.1} s of the trigger; stored → new-message p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        arrivals.len(),
        rows.len(),
        all_in.as_secs_f64(),
        percentile(&delays, 0.5).as_secs_f64() * 1000.0,
        percentile(&delays, 0.99).as_secs_f64() * 1000.0,
        delays.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
}
