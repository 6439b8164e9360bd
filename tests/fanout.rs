//! Streaming fan-out with the real `herald` binary: a large run delivers
//! while its RecipientPages are still being created, and an operator
//! SIGKILLed mid-expansion is resumed by the next one without losing a
//! recipient; a recipient sent to twice is sent with the same Idempotency-Key.

mod api_support;
mod common;
mod receivers;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{create, wait_for, HeraldProcess, TestNamespace};
use herald::controller::trigger_run::{PAGES_IN_FLIGHT, PAGES_UNSAVED};
use herald::resources::{Channel, MemberSlice, Object, RecipientPage, TriggerRun, User, Workflow};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use receivers::HttpReceiver;
use serde_json::json;

/// Short leases: the next process takes over a few seconds after a SIGKILL.
const LEASE: &[&str] = &["--leader-election-lease-seconds", "4"];
/// Subscribers of the object: with the object itself, 41 pages of up to 500...
const SUBSCRIBERS: usize = 20_000;
/// ...of whom every 13th exists as a User (the rest are RecipientNotFound at
/// once): each page has some to deliver, so the run holds pages back while
/// the ones before deliver.
const STRIDE: usize = 13;

fn id(i: usize) -> String {
    format!("u{i:05}")
}

/// The Channel `hooks` to the receiver's `/fan`, and the Workflow `fan` that sends each recipient's id there.
async fn fan_workflow(ns: &TestNamespace, receiver: &HttpReceiver) {
    create::<Channel>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/fan")}}))
        .await;
    create::<Workflow>(
        ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "fan"},
               "spec": {"steps": [{"ref": "send", "type": "channel", "channel": "hooks", "template": {"body": "{{ recipient.id }}"}}]}}),
    )
    .await;
}

#[tokio::test]
async fn a_large_run_delivers_before_its_pages_exist_and_resumes_after_sigkill_mid_expansion() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    // Slow enough that the first pages are still delivering when the operator dies.
    receiver.slow("/fan", Duration::from_millis(200));
    fan_workflow(&ns, &receiver).await;
    let users = ns.api::<User>();
    let existing: Vec<usize> = (0..SUBSCRIBERS).step_by(STRIDE).collect();
    futures::future::join_all(existing.chunks(100).map(|chunk| {
        let users = users.clone();
        let chunk = chunk.to_vec();
        async move {
            for i in chunk {
                let user: User = serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id(i)}, "spec": {"id": id(i)}})).unwrap();
                users.create(&PostParams::default(), &user).await.unwrap();
            }
        }
    }))
    .await;
    // The object and its subscribers, declared directly as MemberSlices (as from Git).
    create::<Object>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Object", "metadata": {"name": "all"}, "spec": {"collection": "teams", "id": "all"}})).await;
    for s in 0..SUBSCRIBERS / 1000 {
        let members: Vec<_> = (s * 1000..(s + 1) * 1000).map(|i| json!({"recipient": id(i)})).collect();
        create::<MemberSlice>(
            &ns,
            json!({"apiVersion": "herald.dev/v1alpha1", "kind": "MemberSlice", "metadata": {"name": format!("all-{s:02}")},
                   "spec": {"object": {"collection": "teams", "id": "all"}, "members": members}}),
        )
        .await;
    }

    // The controllers start once the watch indexes hold a full list, slices included.
    let mut first = HeraldProcess::start(&ns.name, LEASE);
    let run: TriggerRun =
        create(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": "fan-1"}, "spec": {"workflow": "fan", "recipients": [{"id": "all", "collection": "teams"}]}}))
            .await;
    let runs = ns.api::<TriggerRun>();
    let pages = ns.api::<RecipientPage>();

    // Deliveries start while the run's recipients are still being expanded into pages.
    wait_for("the first deliveries", Duration::from_secs(120), || async { (receiver.arrived() >= 20).then_some(()) }).await;
    let created = pages.list(&ListParams::default()).await.unwrap().items.len();
    assert!(created < SUBSCRIBERS / 500, "deliveries began with {created} pages created");
    let expanding =
        wait_for("the run to list its first page", Duration::from_secs(10), || async { runs.get(&run.name_any()).await.ok()?.status.filter(|s| !s.pages.is_empty()) }).await;
    assert!(expanding.expanding, "the run says it is still expanding: {expanding:?}");
    // Killed mid-expansion.
    first.kill9();
    let delivered_before = receiver.arrived();
    let second = HeraldProcess::start(&ns.name, LEASE);

    // What the run holds in memory stays a few pages (sampled while it goes).
    let most_held = std::sync::atomic::AtomicU64::new(0);
    let done = wait_for("the run to finish", Duration::from_secs(300), || async {
        most_held.fetch_max(second.metric("herald_run_pages_held").await as u64, std::sync::atomic::Ordering::Relaxed);
        runs.get(&run.name_any()).await.ok().filter(|r| r.status.as_ref().is_some_and(|s| s.state.is_finished()))
    })
    .await;
    let most_held = most_held.into_inner() as usize;
    assert!(most_held <= PAGES_IN_FLIGHT + PAGES_UNSAVED, "the run held {most_held} pages at once");
    wait_for("the finished run to let go of its pages", Duration::from_secs(10), || async { (second.metric("herald_run_pages_held").await == 0.0).then_some(()) }).await;
    let status = done.status.unwrap();
    let resumed = second.logs.lock().unwrap().iter().any(|l| l.contains("resuming the expansion"));
    assert!(resumed, "the second operator went on expanding where the first stopped");
    assert!(!status.expanding);
    assert_eq!(status.pages.len(), SUBSCRIBERS / 500 + 1, "{:?}", status.pages);
    assert_eq!(pages.list(&ListParams::default()).await.unwrap().items.len(), status.pages.len(), "every page exists in the end, and is listed");
    let totals = status.totals.unwrap();
    assert_eq!(totals.recipients as usize, SUBSCRIBERS + 1, "{totals:?}");
    assert_eq!(totals.completed as usize, existing.len() + 1, "{totals:?}");

    // Every existing recipient got its message; one sent twice (lost in the crash) had the same key.
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in receiver.received_at("/fan") {
        keys.entry(String::from_utf8_lossy(&r.body).into_owned()).or_default().push(r.header("Idempotency-Key").unwrap_or_default().to_string());
    }
    assert_eq!(keys.len(), existing.len() + 1, "every User and the object itself");
    for (recipient, sent) in &keys {
        assert!(sent.iter().all(|k| !k.is_empty() && *k == sent[0]), "{recipient} was sent with different keys: {sent:?}");
    }
    println!("{delivered_before} deliveries before the SIGKILL; {} repeated after it", keys.values().map(|k| k.len() - 1).sum::<usize>());
}

/// A page's records are written by its first save. A page created but never
/// saved (every page save refused here) is cut again by the next reconcile
/// and its recipients are driven again, each with the same Idempotency-Key,
/// until a save goes through: nobody is lost, nobody gets a new key.
#[tokio::test]
async fn a_page_whose_saves_fail_is_cut_again_and_sent_with_the_same_keys() {
    const RECIPIENTS: usize = 30;
    let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let refusing = refuse.clone();
    let client = api_support::mapping_client(move |mut request| {
        // A page's records go to its status subresource: sent instead to a resource that does not exist (404).
        let path = request.uri().path();
        if refusing.load(std::sync::atomic::Ordering::Relaxed) && request.method() == "PATCH" && path.contains("/recipientpages/") && path.ends_with("/status") {
            let elsewhere = request.uri().to_string().replace("/recipientpages/", "/recipientpagez/");
            *request.uri_mut() = elsewhere.parse().unwrap();
        }
        request
    })
    .await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    fan_workflow(&ns, &receiver).await;
    let ids: Vec<String> = (0..RECIPIENTS).map(id).collect();
    for i in &ids {
        create::<User>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": i}, "spec": {"id": i}})).await;
    }
    let _op = common::operator(&client, &ns.name).await;
    let run: TriggerRun =
        create(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": "fan-1"}, "spec": {"workflow": "fan", "recipients": ids}})).await;

    // Driven, not saved, driven again.
    wait_for("every recipient sent to twice", Duration::from_secs(60), || async { (receiver.received_at("/fan").len() >= 2 * RECIPIENTS).then_some(()) }).await;
    let runs = ns.api::<TriggerRun>();
    let pages = ns.api::<RecipientPage>();
    let listed = runs.get(&run.name_any()).await.unwrap().status.unwrap().pages;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(pages.get(&listed[0]).await.unwrap().status.is_none_or(|s| s.recipients.is_empty()), "no save went through yet");
    refuse.store(false, std::sync::atomic::Ordering::Relaxed);

    let done = wait_for("the run to finish", Duration::from_secs(60), || async {
        runs.get(&run.name_any()).await.ok().filter(|r| r.status.as_ref().is_some_and(|s| s.state.is_finished()))
    })
    .await;
    let status = done.status.unwrap();
    assert_eq!(status.pages, listed, "the same page, cut again");
    assert_eq!(status.totals.as_ref().map(|t| t.completed as usize), Some(RECIPIENTS), "{status:?}");
    let records = pages.get(&listed[0]).await.unwrap().status.unwrap().recipients;
    assert_eq!(records.iter().map(|r| r.recipient.clone()).collect::<Vec<_>>(), ids);
    assert!(records.iter().all(|r| r.state == herald::core::status::RecipientState::Completed), "{records:?}");
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in receiver.received_at("/fan") {
        keys.entry(String::from_utf8_lossy(&r.body).into_owned()).or_default().push(r.header("Idempotency-Key").unwrap_or_default().to_string());
    }
    assert_eq!(keys.keys().cloned().collect::<Vec<_>>(), ids);
    for (recipient, sent) in &keys {
        assert!(sent.len() >= 2, "{recipient} was sent {} times", sent.len());
        assert!(sent.iter().all(|k| !k.is_empty() && *k == sent[0]), "{recipient} was sent with different keys: {sent:?}");
    }
}

/// A run that had finished expanding, stopped before its last page's first
/// save, goes on expanding from that page: the recipients on the pages
/// before it are skipped even though the run does not hold their records
/// (it lets go of finished pages as it reads them), so nobody is put on a
/// page twice.
#[tokio::test]
async fn a_run_stopped_before_its_last_page_was_saved_cuts_only_that_page_again() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    // The one User's delivery is still going when the operator is stopped.
    receiver.slow("/fan", Duration::from_secs(3));
    fan_workflow(&ns, &receiver).await;
    create::<User>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "late"}, "spec": {"id": "late"}})).await;
    // A first page of 500 recipients not found (finished at once), and a second with the User.
    let mut recipients: Vec<String> = (0..500).map(|i| format!("ghost-{i:03}")).collect();
    recipients.push("late".into());

    let mut first = HeraldProcess::start(&ns.name, LEASE);
    let run: TriggerRun =
        create(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": {"name": "fan-1"}, "spec": {"workflow": "fan", "recipients": recipients}})).await;
    let runs = ns.api::<TriggerRun>();
    let pages = ns.api::<RecipientPage>();
    let saved = |name: String| {
        let pages = pages.clone();
        async move { pages.get(&name).await.ok()?.status.filter(|s| !s.recipients.is_empty()).map(|_| ()) }
    };
    let listed = wait_for("the run to finish expanding and save both pages", Duration::from_secs(60), || async {
        let status = runs.get(&run.name_any()).await.ok()?.status?;
        (!status.expanding && status.pages.len() == 2).then_some(())?;
        saved(status.pages[0].clone()).await?;
        saved(status.pages[1].clone()).await?;
        Some(status.pages)
    })
    .await;
    first.kill9();
    // As if the operator had stopped before the second page's first save.
    pages.patch_status(&listed[1], &PatchParams::default(), &Patch::Merge(json!({"status": {"recipients": []}}))).await.unwrap();

    let second = HeraldProcess::start(&ns.name, LEASE);
    let done = wait_for("the run to finish", Duration::from_secs(60), || async {
        runs.get(&run.name_any()).await.ok().filter(|r| r.status.as_ref().is_some_and(|s| s.state.is_finished()))
    })
    .await;
    let status = done.status.unwrap();
    assert!(second.logs.lock().unwrap().iter().any(|l| l.contains("resuming the expansion")), "the second operator cut the page again");
    assert_eq!(status.pages, listed, "the same two pages");
    assert_eq!(pages.list(&ListParams::default()).await.unwrap().items.len(), 2, "no third page");
    let totals = status.totals.unwrap();
    assert_eq!((totals.recipients, totals.completed, totals.failed), (501, 1, 500), "{totals:?}");
    let last = pages.get(&listed[1]).await.unwrap().status.unwrap().recipients;
    assert_eq!(last.iter().map(|r| r.recipient.as_str()).collect::<Vec<_>>(), ["late"]);
    let sent: Vec<String> = receiver.received_at("/fan").iter().map(|r| r.header("Idempotency-Key").unwrap_or_default().to_string()).collect();
    assert!(!sent.is_empty() && sent.iter().all(|k| !k.is_empty() && *k == sent[0]), "sent with one key: {sent:?}");
}
