//! Memberships beyond etcd's object limit, on the real local control plane:
//! an Object's subscribers and an Audience's members live in MemberSlices of
//! at most 1000, written by herald's API (concurrent calls for one target
//! are combined, never refused with a conflict) and read by runs.

mod api_support;
mod common;
mod receivers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_support::Herald;
use common::wait_for;
use futures::StreamExt;
use herald::resources::{MemberSlice, TriggerRun, User};
use kube::api::{ListParams, PostParams};
use receivers::HttpReceiver;
use serde_json::json;

/// More subscribers than one Object can hold (etcd refused an Object with 70,000).
const SUBSCRIBERS: usize = 75_000;
/// Of them, this many exist as Users and get a delivery; the rest are RecipientNotFound.
const EXISTING: usize = 200;
const CLIENTS: usize = 8;
const PER_CALL: usize = 100;

fn id(i: usize) -> String {
    format!("user-{i:05}")
}

async fn slices(h: &Herald, label: &str) -> Vec<MemberSlice> {
    h.api::<MemberSlice>().list(&ListParams::default().labels(label)).await.unwrap().items
}

#[tokio::test]
async fn an_object_with_75000_subscribers_from_parallel_clients_reaches_every_one() {
    let h = Arc::new(Herald::start().await);
    let receiver = HttpReceiver::start().await;
    h.http_channel("hooks", &receiver.url("/wide"), 3).await;
    h.workflow("wide", json!({"steps": [{"ref": "send", "type": "channel", "channel": "hooks", "template": {"body": "{{ recipient.id }}"}}]})).await;
    let users = h.api::<User>();
    futures::stream::iter(0..EXISTING)
        .for_each_concurrent(16, |i| {
            let users = users.clone();
            async move {
                let user: User = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id(i)}, "spec": {"id": id(i)}})).unwrap();
                users.create(&PostParams::default(), &user).await.unwrap();
            }
        })
        .await;

    // 750 calls of 100 from 8 clients at once, all to one object.
    let started = Instant::now();
    let calls: Vec<Vec<String>> = (0..SUBSCRIBERS).collect::<Vec<_>>().chunks(PER_CALL).map(|c| c.iter().map(|i| id(*i)).collect()).collect();
    let answers: Vec<u16> = futures::stream::iter(calls)
        .map(|recipients| {
            let h = h.clone();
            async move { h.call("POST", "/v1/objects/teams/big/subscriptions", Some(json!({"recipients": recipients, "properties": {"digest": "weekly"}}))).await.status }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await;
    let elapsed = started.elapsed();
    println!("{SUBSCRIBERS} subscriptions in {elapsed:?}: {:.0}/s", SUBSCRIBERS as f64 / elapsed.as_secs_f64());
    assert!(answers.iter().all(|s| *s == 200), "every call is accepted: {:?}", answers.iter().filter(|s| **s != 200).collect::<Vec<_>>());

    // Stored in bounded slices, each subscriber once.
    let stored = slices(&h, "herald.dev/object=teams.big").await;
    assert!(stored.len() >= SUBSCRIBERS / 1000, "{} slices", stored.len());
    assert!(stored.iter().all(|s| s.spec.members.len() <= 1000));
    let members: Vec<String> = stored.iter().flat_map(|s| s.spec.members.iter().map(|m| m.recipient.as_str().unwrap().to_string())).collect();
    let distinct: BTreeSet<&String> = members.iter().collect();
    assert_eq!((members.len(), distinct.len()), (SUBSCRIBERS, SUBSCRIBERS));
    assert!(stored.iter().flat_map(|s| &s.spec.members).all(|m| m.properties["digest"] == "weekly"));

    // Listed back through the API, a page at a time.
    let page = h.call("GET", "/v1/objects/teams/big/subscriptions?page_size=50", None).await;
    assert_eq!(page.body["entries"].as_array().unwrap().len(), 50);
    assert!(page.body["page_info"]["after"].is_string());

    // Unsubscribing the last 10 leaves the rest.
    let gone: Vec<String> = (SUBSCRIBERS - 10..SUBSCRIBERS).map(id).collect();
    let removed = h.call("DELETE", "/v1/objects/teams/big/subscriptions", Some(json!({"recipients": gone}))).await;
    assert_eq!(removed.status, 200, "{removed:?}");
    assert_eq!(removed.body.as_array().unwrap().len(), 10);
    let left: usize = slices(&h, "herald.dev/object=teams.big").await.iter().map(|s| s.spec.members.len()).sum();
    assert_eq!(left, SUBSCRIBERS - 10);

    // A trigger for the object reaches it and every subscriber once.
    let stores = &h.op.as_ref().unwrap().context.stores;
    let ns = h.ns.name.clone();
    wait_for("every slice in herald's index", Duration::from_secs(60), || async {
        let indexed: usize = stores.member_slices.all(&ns, &herald::resources::MemberTarget::Object { collection: "teams".into(), id: "big".into() }).iter().map(|m| m.len()).sum();
        (indexed == SUBSCRIBERS - 10).then_some(())
    })
    .await;
    let trigger = h.call("POST", "/v1/workflows/wide/trigger", Some(json!({"recipients": [{"id": "big", "collection": "teams"}]}))).await;
    assert_eq!(trigger.status, 200, "{trigger:?}");
    let run_id = trigger.body["workflow_run_id"].as_str().unwrap().to_string();
    let runs = h.api::<TriggerRun>();
    let run = wait_for("the run to finish", Duration::from_secs(300), || async {
        let runs = runs.list(&ListParams::default()).await.ok()?;
        runs.items.into_iter().find(|r| r.status.as_ref().is_some_and(|s| s.workflow_run_id.as_deref() == Some(run_id.as_str()) && s.completion_time.is_some()))
    })
    .await;
    let totals = run.status.unwrap().totals.unwrap();
    assert_eq!(totals.recipients as usize, 1 + SUBSCRIBERS - 10);
    assert_eq!(totals.completed as usize, 1 + EXISTING, "{totals:?}");
    assert_eq!(totals.failed as usize, SUBSCRIBERS - 10 - EXISTING, "the rest are not Users: RecipientNotFound");
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for r in receiver.received_at("/wide") {
        *got.entry(String::from_utf8_lossy(&r.body).into_owned()).or_default() += 1;
    }
    assert_eq!(got.len(), 1 + EXISTING);
    assert!(got.values().all(|n| *n == 1), "each delivered once");
    assert!(got.contains_key("big") && got.contains_key(&id(0)) && got.contains_key(&id(EXISTING - 1)));
}

#[tokio::test]
async fn audience_members_through_knocks_api_are_slices_that_runs_and_conditions_read() {
    let h = Herald::start().await;
    let receiver = HttpReceiver::start().await;
    h.http_channel("hooks", &receiver.url("/aud"), 3).await;
    // Only members of `beta` get the message; the run goes to `everyone`.
    h.workflow(
        "news",
        json!({"steps": [{"ref": "send", "type": "channel", "channel": "hooks", "template": {"body": "{{ recipient.id }}"},
            "conditions": {"all": [{"variable": "recipient.id", "operator": "is_audience_member", "argument": "beta"}]}}]}),
    )
    .await;
    let add = |key: &str, ids: &[&str]| {
        let members: Vec<_> = ids.iter().map(|id| json!({"user": {"id": id}})).collect();
        let (path, h) = (format!("/v1/audiences/{key}/members"), &h);
        async move { h.call("POST", &path, Some(json!({"members": members}))).await }
    };
    // Users given with properties are identified.
    let a = h.call("POST", "/v1/audiences/everyone/members", Some(json!({"members": [{"user": {"id": "ann", "name": "Ann"}, "tenant": "acme"}]}))).await;
    assert_eq!(a.status, 204, "{a:?}");
    for id in ["bob", "cat"] {
        h.create::<User>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id}, "spec": {"id": id}})).await;
    }
    assert_eq!(add("everyone", &["bob", "cat"]).await.status, 204);
    assert_eq!(add("beta", &["ann", "cat"]).await.status, 204);
    // Errors name the field.
    h.call("POST", "/v1/audiences/everyone/members", Some(json!({"members": [{"user": {}}]}))).await.assert_error(422, "invalid_params");
    h.call("POST", "/v1/audiences/everyone/members", Some(json!({"members": [{"usr": {"id": "x"}}]}))).await.assert_error(422, "invalid_params");
    h.call("GET", "/v1/audiences/nobody/members", None).await.assert_error(404, "resource_missing");

    let listed = h.call("GET", "/v1/audiences/everyone/members", None).await;
    assert_eq!(listed.status, 200, "{listed:?}");
    let entries = listed.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    let ann = entries.iter().find(|e| e["user_id"] == "ann").unwrap();
    assert_eq!((ann["__typename"].as_str(), ann["tenant"].as_str(), ann["user"]["name"].as_str()), (Some("AudienceMember"), Some("acme"), Some("Ann")));
    assert_eq!(slices(&h, "herald.dev/audience=everyone").await.len(), 1);

    // A run to the audience: everyone is reached, beta members get the message.
    h.cached(&["ann", "bob", "cat"]).await;
    let trigger = h.call("POST", "/v1/notify", Some(json!({"name": "news", "lists": ["everyone"], "data": {}}))).await;
    assert_eq!(trigger.status, 200, "{trigger:?}");
    h.wait_finished(trigger.body["workflow_run_id"].as_str().unwrap()).await;
    let mut got: Vec<String> = receiver.received_at("/aud").into_iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    got.sort();
    assert_eq!(got, ["ann", "cat"]);

    // Removing a member: the slice shrinks, and an emptied slice goes.
    let removed = h.call("DELETE", "/v1/audiences/beta/members", Some(json!({"members": [{"user": {"id": "ann"}}, {"user": {"id": "cat"}}]}))).await;
    assert_eq!(removed.status, 204, "{removed:?}");
    assert!(slices(&h, "herald.dev/audience=beta").await.is_empty());
}

/// herald starts a slice's next change from the copy it last wrote (no read
/// before every write). A slice changed by someone else in between must
/// still come out right: the stale copy's write is refused and the slice
/// read again, and a change the stale copy says is already there is checked
/// against what is stored.
#[tokio::test]
async fn a_slice_changed_by_someone_else_after_herald_wrote_it_keeps_both_changes() {
    let h = Herald::start().await;
    let subscribe = |ids: &[&str]| {
        let (h, recipients) = (&h, ids.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        async move { h.call("POST", "/v1/objects/teams/small/subscriptions", Some(json!({"recipients": recipients}))).await }
    };
    let stored = || async {
        let mut ids: Vec<String> =
            slices(&h, "herald.dev/object=teams.small").await.iter().flat_map(|s| s.spec.members.iter().map(|m| m.recipient.as_str().unwrap().to_string())).collect();
        ids.sort();
        ids
    };
    assert_eq!(subscribe(&["ann"]).await.status, 200);
    let slices_api = h.api::<MemberSlice>();
    // Someone else adds `ext` to the slice herald just wrote.
    let mut slice = slices(&h, "herald.dev/object=teams.small").await.remove(0);
    slice.spec.members.push(serde_json::from_value(json!({"recipient": "ext"})).unwrap());
    let name = slice.metadata.name.clone().unwrap();
    slices_api.replace(&name, &PostParams::default(), &slice).await.unwrap();
    assert_eq!(subscribe(&["bob"]).await.status, 200);
    assert_eq!(stored().await, ["ann", "bob", "ext"], "herald's write from its stale copy was refused and redone on the stored slice");

    // Someone else removes `ann`; subscribing her again must add her back,
    // though herald's copy from its last write still lists her.
    let mut slice = slices_api.get(&name).await.unwrap();
    slice.spec.members.retain(|m| m.recipient != "ann");
    slices_api.replace(&name, &PostParams::default(), &slice).await.unwrap();
    assert_eq!(subscribe(&["ann"]).await.status, 200);
    assert_eq!(stored().await, ["ann", "bob", "ext"]);
}
