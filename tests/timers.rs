//! Timers (issue 13, item 7): a recipient waiting on a delay resumes within
//! 5 s of its time, even when the apiserver was unreachable at that time or
//! the operator was killed and replaced while it waited. The outages below
//! are the scenario itself (held for a set time); every other wait is on a
//! condition.

mod api_support;
mod common;
mod receivers;

use std::time::{Duration, Instant, SystemTime};

use common::{create, wait_for, HeraldProcess, TestNamespace};
use herald::core::status::RecipientState;
use herald::resources::{Channel, TriggerRun, User, Workflow};
use receivers::HttpReceiver;
use serde_json::json;

async fn setup(ns: &TestNamespace, receiver: &HttpReceiver, delay: &str) {
    create::<Channel>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/late")}}))
        .await;
    create::<User>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "ann"}, "spec": {"id": "ann"}})).await;
    create::<Workflow>(
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "remind"}, "spec": {"steps": [
            {"ref": "wait", "type": "delay", "delay": {"duration": delay}},
            {"ref": "send", "type": "channel", "channel": "hooks", "template": {"body": "now"}}
        ]}}),
    )
    .await;
}

/// Triggers the reminder and waits until ann is Waiting on the delay.
async fn waiting(ns: &TestNamespace) {
    create::<TriggerRun>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": "r1"}, "spec": {"workflow": "remind", "recipients": ["ann"]}}))
        .await;
    let api = ns.api::<TriggerRun>();
    wait_for("ann to wait on the delay", Duration::from_secs(30), || async {
        let run = api.get("r1").await.ok()?;
        run.status?.recipients.first().filter(|r| r.state == RecipientState::Waiting).map(|_| ())
    })
    .await;
}

async fn delivered(receiver: &HttpReceiver) -> SystemTime {
    wait_for("the reminder", Duration::from_secs(60), || async { receiver.received_at("/late").first().map(|r| r.at) }).await
}

#[tokio::test]
async fn a_delay_that_ends_during_an_apiserver_outage_resumes_within_5s_of_its_return() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let switch = api_support::Switch::start().await;
    let via_switch = api_support::client_via(&switch.url).await;
    let _op = common::operator(&via_switch, &ns.name).await;
    setup(&ns, &receiver, "3s").await;
    waiting(&ns).await;
    // The apiserver is gone from before the wake time until well after it.
    switch.off();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(receiver.received_at("/late").is_empty(), "nothing is sent while the run cannot be read or recorded");
    switch.on();
    let back = SystemTime::now();
    let at = delivered(&receiver).await;
    let late = at.duration_since(back).unwrap_or_default();
    assert!(late <= Duration::from_secs(5), "resumed {late:?} after the apiserver came back");
}

#[tokio::test]
async fn a_delay_that_ends_while_the_operator_is_down_resumes_within_5s_of_the_next_one() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    setup(&ns, &receiver, "3s").await;
    let lease = ["--leader-election-lease-seconds", "2"];
    let mut first = HeraldProcess::start(&ns.name, &lease);
    waiting(&ns).await;
    first.kill9();
    // Down past the wake time.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(receiver.received_at("/late").is_empty());
    let started = Instant::now();
    let _next = HeraldProcess::start(&ns.name, &lease);
    let up = SystemTime::now() - started.elapsed();
    let at = delivered(&receiver).await;
    let late = at.duration_since(up).unwrap_or_default();
    // The next operator waits out the dead one's Lease (2 s), then resumes overdue waits at once.
    assert!(late <= Duration::from_secs(5), "resumed {late:?} after the next operator started");
}
