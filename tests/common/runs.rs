//! Helpers for tests that create TriggerRuns with kubectl's shapes and read
//! their outcome from status.

use std::collections::HashMap;
use std::time::Duration;

use herald::core::status::RecipientStatus;
use herald::resources::{Channel, RecipientPage, TriggerRun, User};
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::Api;
use serde_json::{json, Value};

use super::{create, wait_for, TestNamespace};

/// A Workflow named and keyed `name` with one `notify` step on the `hooks`
/// Channel; `extra` adds or replaces spec fields.
pub fn workflow(name: &str, extra: Value) -> Value {
    let mut spec = json!({
        "key": name,
        "steps": [{"ref": "notify", "type": "channel", "channel": "hooks",
                   "template": {"body": "{{ recipient.name }}|{{ data.message }}|{{ actor.id }}|{{ tenant.id }}"}}]
    });
    spec.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": name}, "spec": spec})
}

pub fn user(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": name}, "spec": spec})
}

/// Creates Users `ids` (32 creates in flight; named after the id, `_` as
/// `-`) and an Object `groups/everyone` that lists every one of them as a
/// subscriber: a fan-out of `ids.len() + 1` recipients.
pub async fn users_subscribed_to_everyone(ns: &TestNamespace, ids: &[String]) {
    use futures::StreamExt;
    let api = ns.api::<User>();
    futures::stream::iter(ids.iter())
        .for_each_concurrent(32, |id| {
            let api = api.clone();
            async move {
                let u: User = serde_json::from_value(user(&id.replace('_', "-"), json!({"id": id, "name": id}))).unwrap();
                api.create(&kube::api::PostParams::default(), &u).await.expect("create user");
            }
        })
        .await;
    let subscribers: Vec<Value> = ids.iter().map(|id| json!({"recipient": id})).collect();
    create::<herald::resources::Object>(
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Object", "metadata": {"name": "everyone"},
        "spec": {"collection": "groups", "id": "everyone", "subscribers": subscribers}}),
    )
    .await;
}

pub fn trigger(spec: Value) -> Value {
    json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"generateName": "run-"}, "spec": spec})
}

/// Creates users user_1..=n with a name each.
pub async fn users(ns: &TestNamespace, ids: &[&str]) {
    for id in ids {
        create::<User>(ns, user(&id.replace('_', "-"), json!({"id": id, "name": format!("Name of {id}"), "email": format!("{id}@example.com")}))).await;
    }
}

/// Waits until the run is finished and returns it.
pub async fn finished(ns: &TestNamespace, name: &str) -> TriggerRun {
    let api = ns.api::<TriggerRun>();
    wait_for(&format!("TriggerRun {name} to finish"), Duration::from_secs(60), || async {
        let run = api.get(name).await.ok()?;
        run.status.as_ref().filter(|s| s.state.is_finished())?;
        Some(run)
    })
    .await
}

/// Every recipient's status, in order: inline in the run (small runs), else from its pages.
pub async fn recipients(ns: &TestNamespace, run: &TriggerRun) -> Vec<RecipientStatus> {
    let api = ns.api::<RecipientPage>();
    let mut out = run.status.as_ref().unwrap().recipients.clone();
    for page in &run.status.as_ref().unwrap().pages {
        out.extend(api.get(page).await.unwrap().status.unwrap().recipients);
    }
    out
}

pub fn by_id(recipients: &[RecipientStatus]) -> HashMap<String, RecipientStatus> {
    recipients.iter().map(|r| (r.recipient.clone(), r.clone())).collect()
}

pub fn condition(run: &TriggerRun, type_: &str) -> (String, String, String) {
    let c = run.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// What a delivered step recorded (it includes a preview of the body sent).
pub fn sent(r: &RecipientStatus) -> String {
    r.steps.iter().find(|s| s.step_ref == "notify").and_then(|s| s.message.clone()).unwrap_or_default()
}

/// Waits for an Event of `type_` and `reason` about the object `name` (herald
/// records Events just after the status write they describe).
pub async fn wait_for_event(ns: &TestNamespace, name: &str, type_: &str, reason: &str) -> Event {
    let api: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(&format!("a {type_} Event {reason} on {name}"), Duration::from_secs(20), || async {
        api.list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name) && e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some(type_))
    })
    .await
}

/// Waits for the Channel's Ready condition to have `status`; returns (reason, message).
pub async fn channel_ready(ns: &TestNamespace, name: &str, status: &str, timeout: Duration) -> (String, String) {
    let api = ns.api::<Channel>();
    wait_for(&format!("Channel {name} Ready={status}"), timeout, || async {
        let c = api.get(name).await.ok()?;
        let cond = c.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == status)?;
        Some((cond.reason, cond.message))
    })
    .await
}
