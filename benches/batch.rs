//! Triggers per second into one batch, and the Kubernetes API writes each
//! batched trigger costs (every request the operator sends is recorded).
//! Prints figures; asserts only that the batch was delivered once with every
//! activity.
//!
//!     cargo bench --bench batch
//!
//! Uses the control plane the tests use (HERALD_TEST_KUBECONFIG, or one it
//! starts with scripts/controlplane.sh). HERALD_BENCH_TRIGGERS changes the size.

#[path = "../tests/api_support/mod.rs"]
mod api_support;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/receivers/mod.rs"]
mod receivers;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald::resources::{Channel, TriggerRun, User, Workflow};
use kube::api::{ListParams, PostParams};
use serde_json::json;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    // At most 1000: a batch holds at most 1000 activities.
    let n: usize = std::env::var("HERALD_BENCH_TRIGGERS").ok().and_then(|v| v.parse().ok()).unwrap_or(500).clamp(2, 1000);
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    let receiver = receivers::HttpReceiver::start().await;
    let (recording, log) = api_support::recording_client().await;
    let _op = common::operator(&recording, &ns.name).await;
    common::create::<Channel>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/hook")}}),
    )
    .await;
    common::create::<User>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "ann"}, "spec": {"id": "ann"}})).await;
    // A long window that closes when the last trigger joins (maxActivities):
    // the figure is how fast triggers join, whatever the machine.
    common::create::<Workflow>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "digest"}, "spec": {"key": "digest", "steps": [
            {"ref": "batch", "type": "batch", "batch": {"window": "30m", "maxActivities": n, "key": "{{ data.project }}"}},
            {"ref": "send", "type": "channel", "channel": "hooks", "template": {"body": "{{ total_activities }}"}}
        ]}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // the caches see the Workflow
    log.take();

    let api = ns.api::<TriggerRun>();
    let started = Instant::now();
    let create = |i: usize| {
        let api = api.clone();
        async move {
            let run: TriggerRun = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": format!("t-{i}")},
                "spec": {"workflow": "digest", "recipients": ["ann"], "data": {"project": "one", "i": i}}}))
            .unwrap();
            api.create(&PostParams::default(), &run).await.expect("create");
        }
    };
    futures::future::join_all((0..n).map(create)).await;
    let created = started.elapsed();
    // Joined: every run but the carrier ended Batched.
    let joined = common::wait_for("every trigger to join the batch", Duration::from_secs(600), || async {
        let runs = api.list(&ListParams::default()).await.ok()?.items;
        let batched = runs.iter().filter(|r| r.status.as_ref().is_some_and(|s| s.state.is_finished())).count();
        (batched >= n - 1).then(|| started.elapsed())
    })
    .await;
    let writes_joining: Vec<(String, String)> = log.take().into_iter().filter(|(m, _)| m != "GET").collect();
    common::wait_for("the batch's delivery", Duration::from_secs(600), || async { (receiver.count() == 1).then_some(()) }).await;
    let body = String::from_utf8_lossy(&receiver.received()[0].body).to_string();
    assert_eq!(body, n.to_string(), "one delivery with every activity");
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for (method, path) in &writes_joining {
        // /apis/<group>/<version>/namespaces/<ns>/<kind>[/<name>[/status]]
        let segments: Vec<&str> = path.split('?').next().unwrap_or_default().split('/').collect();
        let at = segments.iter().position(|s| *s == "namespaces").map_or(0, |i| i + 2);
        let kind = format!("{}{}", segments.get(at).unwrap_or(&"?"), if segments.last() == Some(&"status") { "/status" } else { "" });
        *by_kind.entry(format!("{method} {kind}")).or_default() += 1;
    }
    println!("batch: {n} triggers for one batch key");
    println!("  created in {:.2} s; all joined after {:.2} s: {:.0} triggers/s into the batch", created.as_secs_f64(), joined.as_secs_f64(), n as f64 / joined.as_secs_f64());
    println!("  operator API writes until every trigger joined: {} ({:.2} per batched trigger): {by_kind:?}", writes_joining.len(), writes_joining.len() as f64 / n as f64);
}
