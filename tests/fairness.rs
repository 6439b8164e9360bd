//! Fairness (issue 13, item 5): one namespace's huge fan-out to a slow
//! receiver must not starve another namespace. Namespace A gets a run to an
//! Audience of every one of its (by default 100,000) Users, plus a few runs
//! of 1,000 listed recipients, all against a receiver that answers after a
//! second; A alone would take every delivery slot and every reconcile for
//! hours. Meanwhile namespace B gets single triggers, one after another, to
//! a few Users each; each one's first delivery must arrive within 1 s of
//! its trigger (the bound), and its last soon after: it asks for
//! more slots than A leaves free, so its later deliveries need slots given
//! back (its own, or A's) before A's queued deliveries get them.
//!
//! On a control plane of its own: herald watches every namespace there, as
//! the chart does by default (one controller, one reconcile bound, for
//! everyone), and the Users do not stay behind for the other tests (this
//! apiserver has no namespace controller to delete them).
//!
//! `HERALD_FAIRNESS_USERS` sets A's audience size (default 100,000).

mod common;
mod receivers;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{create, wait_for, TestNamespace};
use futures::StreamExt;
use herald::core::status::RunState;
use herald::resources::{Audience, Channel, TriggerRun, User, Workflow};
use herald::settings::Settings;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use receivers::HttpReceiver;
use serde_json::json;

/// A's audience size, unless `HERALD_FAIRNESS_USERS` says otherwise.
const USERS: usize = 100_000;
/// Users created at once while setting up.
const CREATE_CONCURRENCY: usize = 48;
/// How long A's receiver takes to answer each delivery.
const SLOW: Duration = Duration::from_secs(1);
/// herald's delivery slots (`--max-deliveries`), fewer than one run may ask
/// for (`--run-concurrency` 64), so that A alone fills them.
const MAX_DELIVERIES: usize = 32;
/// herald's reconcile slots (`--max-concurrent-runs`), fewer than A's runs.
const MAX_RUNS: u16 = 4;
/// A's runs besides the big one, each to 1,000 listed Users.
const LISTED_RUNS: usize = 4;
/// B's single triggers, one after another...
const B_TRIGGERS: usize = 5;
/// ...each to this many Users: more than the slots A leaves free.
const B_USERS: usize = MAX_DELIVERIES / 4;
/// The bound on B's first delivery after its trigger.
const BOUND: Duration = Duration::from_secs(1);
/// How long to wait for one of B's deliveries before calling it starved.
const GIVE_UP: Duration = Duration::from_secs(30);

fn users() -> usize {
    std::env::var("HERALD_FAIRNESS_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(USERS)
}

/// A control plane of this test's own, stopped when dropped (and by the
/// watchdog `start_control_plane_in` leaves, should the test process die).
struct ControlPlane {
    dir: PathBuf,
}

impl ControlPlane {
    fn start() -> ControlPlane {
        let dir = std::env::temp_dir().join(format!("herald-cp-fairness-{}", std::process::id()));
        common::start_control_plane_in(&dir).unwrap_or_else(|e| panic!("{e}"));
        ControlPlane { dir }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).unwrap();
        Client::try_from(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap()).unwrap()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(common::repo_path("scripts/controlplane.sh")).arg("stop").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates Users u-0..u-<n> labelled `load: a` in `ns`, `CREATE_CONCURRENCY` at a time.
async fn create_users(ns: &TestNamespace, n: usize) {
    let api: Api<User> = ns.api();
    let made = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let id = format!("u-{i}");
                let user: User = serde_json::from_value(json!({
                    "apiVersion": "herald.dev/v1alpha1", "kind": "User",
                    "metadata": {"name": id, "labels": {"load": "a"}}, "spec": {"id": id}
                }))
                .unwrap();
                // A create that failed on the way may have been stored: 409 then means done.
                for attempt in 1.. {
                    match api.create(&PostParams::default(), &user).await {
                        Ok(_) => break,
                        Err(kube::Error::Api(s)) if s.code == 409 => break,
                        Err(e) if attempt < 5 => eprintln!("creating {id} (attempt {attempt}): {e}"),
                        Err(e) => panic!("creating {id}: {e}"),
                    }
                }
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .count()
        .await;
    assert_eq!(made, n);
}

fn slot_metric(text: &str, name: &str, pool: &str, namespace: &str) -> f64 {
    common::metric_value(text, &format!("{name}{{pool=\"{pool}\",namespace=\"{namespace}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_slow_fan_out_in_one_namespace_does_not_delay_another_namespaces_first_delivery() {
    let n = users();
    assert!(n >= LISTED_RUNS * 1000, "HERALD_FAIRNESS_USERS must be at least {}", LISTED_RUNS * 1000);
    let cp = ControlPlane::start();
    let client = cp.client().await;
    common::install_crds(client.clone()).await;
    let a = TestNamespace::new_on(&client, cp.kubeconfig()).await;
    let b = TestNamespace::new_on(&client, cp.kubeconfig()).await;

    let setup = Instant::now();
    create_users(&a, n).await;
    let setup = setup.elapsed();
    eprintln!("created {n} Users in {:.1} s ({:.0}/s)", setup.as_secs_f64(), n as f64 / setup.as_secs_f64());

    let slow = HttpReceiver::start().await;
    slow.slow("/a", SLOW);
    let fast = HttpReceiver::start().await;
    let channel = |url: String| json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": url}});
    let workflow = |body: &str| {
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "notify"},
               "spec": {"steps": [{"ref": "send", "type": "channel", "channel": "hooks", "template": {"body": body}}]}})
    };
    create::<Channel>(&a, channel(slow.url("/a"))).await;
    create::<Workflow>(&a, workflow("{{ recipient.id }}")).await;
    create::<Audience>(
        &a,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Audience", "metadata": {"name": "everyone"}, "spec": {"key": "everyone", "selector": {"matchLabels": {"load": "a"}}}}),
    )
    .await;
    create::<Channel>(&b, channel(fast.url("/b"))).await;
    create::<Workflow>(&b, workflow("{{ data.n }}/{{ recipient.id }}")).await;
    let b_users: Vec<String> = (0..B_USERS).map(|i| format!("bea-{i}")).collect();
    for id in &b_users {
        create::<User>(&b, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id}, "spec": {"id": id}})).await;
    }

    // herald as the chart runs it by default: every namespace, one replica.
    let mut settings = Settings::for_namespace("unused");
    settings.namespaces.clear();
    settings.leader_election = false;
    settings.max_deliveries = MAX_DELIVERIES;
    settings.run_concurrency = 64;
    settings.max_concurrent_runs = MAX_RUNS;
    settings.shutdown_grace_seconds = 1;
    let op = common::operator_with(&client, settings).await;

    let trigger = |spec: serde_json::Value| json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "run-"}, "spec": spec});
    let triggered = Instant::now();
    let big: TriggerRun = create(&a, trigger(json!({"workflow": "notify", "audiences": ["everyone"]}))).await;
    let runs = a.api::<TriggerRun>();
    // Accepted with its first page; the rest of the audience is expanded
    // into pages as the first ones deliver (streaming fan-out).
    wait_for("A's big run to be accepted", Duration::from_secs(300), || async {
        let run = runs.get(&big.name_any()).await.ok()?;
        let status = run.status?;
        (status.state == RunState::Running && status.expanding && !status.pages.is_empty()).then_some(())
    })
    .await;
    let accepted = triggered.elapsed();
    // Then more runs than A may reconcile at once, so that A holds reconciles too.
    for r in 0..LISTED_RUNS {
        let listed: Vec<String> = (r * 1000..(r + 1) * 1000).map(|i| format!("u-{i}")).collect();
        create::<TriggerRun>(&a, trigger(json!({"workflow": "notify", "recipients": listed}))).await;
    }

    // A takes what it can: its whole share of delivery slots (every slot but
    // the eighth kept for others; all of them before fair scheduling), and of
    // reconciles (all but one; all of them before).
    let share = MAX_DELIVERIES - MAX_DELIVERIES / 8;
    let in_flight = || slow.arrived() - slow.count();
    // Then its slots turned over at least once: B comes in the steady state, not at A's start.
    wait_for("A to fill its delivery slots and reconciles", Duration::from_secs(120), || async {
        let reconciling = op.context.metrics.reconciles_in_flight.get();
        (in_flight() >= share && slow.count() >= share && reconciling >= i64::from(MAX_RUNS) - 1).then_some(())
    })
    .await;
    eprintln!(
        "A: a run for {n} recipients accepted {:.1} s after the trigger; {} deliveries and {} reconciles in flight",
        accepted.as_secs_f64(),
        in_flight(),
        op.context.metrics.reconciles_in_flight.get()
    );

    let mut latencies = Vec::new();
    for i in 0..B_TRIGGERS {
        // A still holds its share at each of B's triggers.
        wait_for("A to hold its delivery slots", Duration::from_secs(10), || async { (in_flight() >= share).then_some(()) }).await;
        let sent = SystemTime::now();
        create::<TriggerRun>(&b, trigger(json!({"workflow": "notify", "recipients": b_users, "data": {"n": i}}))).await;
        let arrived = wait_for_deliveries(&fast, &format!("{i}/"), B_USERS).await;
        let after = |at: SystemTime| at.duration_since(sent).unwrap_or_default();
        let first = arrived.iter().min().map(|t| after(*t));
        let last = if arrived.len() == B_USERS { arrived.iter().max().map(|t| after(*t)) } else { None };
        let ms = |d: Option<Duration>| d.map_or(format!("none within {GIVE_UP:?}"), |d| format!("{} ms", d.as_millis()));
        eprintln!("B's trigger {i}: first delivery after {}, all {B_USERS} after {}", ms(first), ms(last));
        latencies.push((first, last));
        let shown: Vec<String> = latencies.iter().map(|(f, l)| format!("{} / {}", ms(*f), ms(*l))).collect();
        assert!(first.is_some_and(|f| f <= BOUND), "B's first deliveries must come within {BOUND:?} of their triggers while A is busy; got (first / all) {shown:?}");
        // B's deliveries beyond the free slots wait for slots given back: B's own (in ms) or A's (held about SLOW).
        assert!(last.is_some_and(|l| l <= SLOW + BOUND), "B's deliveries must get the slots A gives back before A's queue does; got (first / all) {shown:?}");
    }
    // A was busy throughout: its big run is far from done, with deliveries queued behind its share.
    let text = op.context.metrics.render();
    let queued = slot_metric(&text, "herald_slot_waiters", "deliveries", &a.name);
    eprintln!(
        "A: {} deliveries answered, {queued} queued for a slot; B waited for delivery slots {:.3} s in all",
        slow.count(),
        slot_metric(&text, "herald_slot_wait_seconds_sum", "deliveries", &b.name)
    );
    assert!(queued > 0.0, "A had deliveries waiting for slots while B was served");
    let big_now = runs.get(&big.name_any()).await.unwrap();
    assert_eq!(big_now.status.unwrap().state, RunState::Running);
    op.abort();
}

/// When the deliveries whose body starts with `prefix` reached `receiver`,
/// once `count` have (or [`GIVE_UP`] passed).
async fn wait_for_deliveries(receiver: &HttpReceiver, prefix: &str, count: usize) -> Vec<SystemTime> {
    let deadline = Instant::now() + GIVE_UP;
    loop {
        let arrived: Vec<SystemTime> = receiver.received_at("/b").into_iter().filter(|r| r.body.starts_with(prefix.as_bytes())).map(|r| r.at).collect();
        if arrived.len() >= count || Instant::now() > deadline {
            return arrived;
        }
        // Polls the receiver's record; the times measured are the receiver's own.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
