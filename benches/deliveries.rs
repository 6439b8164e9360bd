//! Deliveries per second for a 10,000-recipient fan-out to a local HTTP
//! receiver, and the Kubernetes API writes it took. Prints figures; asserts
//! only that every recipient was delivered.
//!
//!     cargo bench --bench deliveries
//!
//! Uses the control plane the tests use (HERALD_TEST_KUBECONFIG, or one it
//! starts with scripts/controlplane.sh). HERALD_BENCH_RECIPIENTS changes the size.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/receivers/mod.rs"]
mod receivers;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald::core::status::RunState;
use herald::resources::{Channel, TriggerRun, Workflow};
use kube::api::PostParams;
use kube::ResourceExt;
use serde_json::{json, Value};

async fn create<K>(ns: &common::TestNamespace, value: Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let object: K = serde_json::from_value(value).expect("bench object");
    ns.api::<K>().create(&PostParams::default(), &object).await.expect("create")
}

/// API writes by kind, from the operator's metrics.
fn api_writes(op: &herald::operator::Operator) -> BTreeMap<String, u64> {
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

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let n: usize = std::env::var("HERALD_BENCH_RECIPIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    let receiver = receivers::HttpReceiver::start().await;
    create::<Channel>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/hook")}}))
        .await;
    create::<Workflow>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "fan"},
        "spec": {"key": "fan", "steps": [{"ref": "notify", "type": "channel", "channel": "hooks",
            "template": {"body": "{\"to\": {{ recipient.id | json }}, \"message\": {{ data.message | json }}}"}}]}}),
    )
    .await;

    let setup = Instant::now();
    let ids: Vec<String> = (0..n).map(|i| format!("user_{i:05}")).collect();
    common::runs::users_subscribed_to_everyone(&ns, &ids).await;
    println!("setup: {n} users and one object subscribed to them in {:.1}s", setup.elapsed().as_secs_f64());

    let op = common::operator(&client, &ns.name).await;
    // Let the watch caches fill before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes_before = api_writes(&op);
    let started = Instant::now();
    let run: TriggerRun = create(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "bench-"},
        "spec": {"workflow": "fan", "recipients": [{"id": "everyone", "collection": "groups"}], "data": {"message": "hello"}}}),
    )
    .await;
    let runs = ns.api::<TriggerRun>();
    let done = common::wait_for("the fan-out to finish", Duration::from_secs(900), || async {
        let r = runs.get(&run.name_any()).await.ok()?;
        r.status.as_ref().filter(|s| s.state.is_finished())?;
        Some(r)
    })
    .await;
    let elapsed = started.elapsed();
    let writes_after = api_writes(&op);
    let status = done.status.clone().unwrap();
    assert_eq!(status.state, RunState::Completed, "{:?}", status.conditions);

    let delivered = receiver.count();
    let recipients = n + 1; // the object itself is a recipient too
    assert!(delivered >= recipients, "{delivered} deliveries for {recipients} recipients");
    let by_kind: BTreeMap<&str, u64> = writes_after.iter().map(|(k, v)| (k.as_str(), v - writes_before.get(k).copied().unwrap_or(0))).filter(|(_, v)| *v > 0).collect();
    let writes: u64 = by_kind.values().sum();
    let settings = &op.context.settings;
    println!("fan-out to a local HTTP receiver: {recipients} recipients, {delivered} deliveries in {:.2}s", elapsed.as_secs_f64());
    println!("  {:.0} deliveries/s (run concurrency {}, max deliveries {})", delivered as f64 / elapsed.as_secs_f64(), settings.run_concurrency, settings.max_deliveries);
    println!("  {writes} API writes ({:.4} per recipient): {by_kind:?}", writes as f64 / recipients as f64);
    println!("  {} pages", status.pages.len());
    op.shutdown().await;
}
