//! Reading runs through the HTTP API, against the real local control plane:
//! a run's recipients page by page with Knock's `page_info` cursors, one
//! recipient's run by id, 404s, and proof from every request herald sent to
//! the Kubernetes API that neither route lists the namespace.

mod api_support;
mod common;

use std::collections::HashSet;
use std::time::Duration;

use api_support::{recording_client, Answer, Herald};
use common::wait_for;
use herald::resources::TriggerRun;
use serde_json::{json, Value};
use uuid::Uuid;

const RECIPIENTS: usize = 120;

/// 50 delay steps with long refs: records with this many steps need room,
/// so the run's recipients take more than one RecipientPage.
fn long_workflow() -> Value {
    let steps: Vec<Value> = (0..50).map(|i| json!({"ref": format!("step-{i:02}-{}", "x".repeat(50)), "type": "delay", "delay": {"duration": "0s"}})).collect();
    json!({"steps": steps})
}

fn ids() -> Vec<String> {
    (0..RECIPIENTS).map(|i| format!("u-{i:03}")).collect()
}

/// Triggers the 120-recipient run (three recipients exist and go through the
/// 50 steps; the others fail RecipientNotFound) and waits until it is over.
async fn finished_run(h: &Herald) -> String {
    h.workflow("long", long_workflow()).await;
    for id in ["u-000", "u-070", "u-119"] {
        assert_eq!(h.call("PUT", &format!("/v1/users/{id}"), Some(json!({"name": id}))).await.status, 200);
    }
    h.cached(&["u-000", "u-070", "u-119"]).await;
    let a = h.call("POST", "/v1/workflows/long/trigger", Some(json!({"recipients": ids()}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    let run_id = a.body["workflow_run_id"].as_str().unwrap().to_string();
    wait_for("the run to finish", Duration::from_secs(60), || async {
        let a = h.call("GET", &format!("/v1/workflow_runs/{run_id}"), None).await;
        assert_eq!(a.status, 200, "{a:?}");
        (a.body["status"] == "failed").then_some(())
    })
    .await;
    run_id
}

fn entries(a: &Answer) -> Vec<Value> {
    a.body["recipient_runs"]["entries"].as_array().cloned().unwrap_or_default()
}

fn cursor(a: &Answer, which: &str) -> Option<String> {
    a.body["recipient_runs"]["page_info"][which].as_str().map(str::to_string)
}

/// A request that lists herald's runs or pages (a GET of a collection, not a watch).
fn is_list(method: &str, uri: &str) -> bool {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let collection = ["triggerruns", "recipientpages"].iter().any(|kind| path.starts_with("/apis/herald.dev/") && path.ends_with(&format!("/{kind}")));
    method == "GET" && collection && !query.split('&').any(|p| p == "watch=true" || p == "watch=1")
}

#[tokio::test]
async fn a_run_reads_in_pages_of_50_and_recipient_runs_by_id_without_listing_the_namespace() {
    let (client, log) = recording_client().await;
    let h = Herald::start_on(client, |_| {}).await;
    // Other runs in the namespace, which a lookup must not wade through.
    h.workflow("other", json!({"steps": [{"ref": "wait", "type": "delay", "delay": {"duration": "1h"}}]})).await;
    for _ in 0..3 {
        assert_eq!(h.call("POST", "/v1/workflows/other/trigger", Some(json!({"recipients": ["u-000"]}))).await.status, 200);
    }
    let run_id = finished_run(&h).await;
    let run_uuid = Uuid::parse_str(&run_id).unwrap();
    log.take();

    // Everything a reader does, recorded: page through at the default size...
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = after.as_ref().map(|c| format!("?after={c}")).unwrap_or_default();
        let a = h.call("GET", &format!("/v1/workflow_runs/{run_id}{query}"), None).await;
        assert_eq!(a.status, 200, "{a:?}");
        after = cursor(&a, "after");
        pages.push(a);
        if after.is_none() || pages.len() > RECIPIENTS {
            break;
        }
    }
    // ...go back one page, read recipients' runs by id, and miss.
    let back = match pages.last().and_then(|last| cursor(last, "before")) {
        Some(c) => Some(h.call("GET", &format!("/v1/workflow_runs/{run_id}?before={c}"), None).await),
        None => None,
    };
    let id_of = |user: &str| Uuid::new_v5(&run_uuid, format!("user:{user}").as_bytes()).to_string();
    let mut by_id = Vec::new();
    for user in ["u-000", "u-070", "u-100"] {
        by_id.push((user, h.call("GET", &format!("/v1/workflow_recipient_runs/{}", id_of(user)), None).await));
    }
    let unknown = Uuid::new_v4();
    let missing_run = h.call("GET", &format!("/v1/workflow_runs/{unknown}"), None).await;
    let missing_recipient = h.call("GET", &format!("/v1/workflow_recipient_runs/{unknown}"), None).await;
    let requests = log.take();

    // No route listed runs or pages: each read what it needs by name.
    let lists: Vec<&(String, String)> = requests.iter().filter(|(m, u)| is_list(m, u)).collect();
    assert!(lists.is_empty(), "the routes listed the namespace: {lists:#?}");
    let herald_gets = requests.iter().filter(|(m, u)| m == "GET" && u.starts_with("/apis/herald.dev/") && !u.contains("watch=")).count();
    // A run: itself and the (at most two) pages its entries are on; a recipient run: its page and run.
    let calls = pages.len() + usize::from(back.is_some()) + by_id.len() + 2;
    assert!(herald_gets <= 2 * calls, "{herald_gets} reads for {calls} calls: {requests:#?}");

    // Pages of 50 following page_info.after until null: every recipient once, in order.
    let sizes: Vec<usize> = pages.iter().map(|a| entries(a).len()).collect();
    assert_eq!(sizes, vec![50, 50, 20], "{:#?}", pages.last());
    for a in &pages {
        let info = &a.body["recipient_runs"]["page_info"];
        assert_eq!(info["__typename"], "PageInfo");
        assert_eq!(info["page_size"], 50);
        assert_eq!(a.body["id"], run_id.as_str());
        assert_eq!(a.body["status"], "failed");
        assert_eq!(a.body["totals"]["recipients"], RECIPIENTS);
    }
    assert!(cursor(&pages[0], "before").is_none(), "the first page has nothing before it");
    let read: Vec<Value> = pages.iter().flat_map(entries).collect();
    let recipients: Vec<String> = read.iter().map(|r| r["recipient"].as_str().unwrap().to_string()).collect();
    assert_eq!(recipients, ids());
    let run_ids: HashSet<&str> = read.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(run_ids.len(), RECIPIENTS);
    for r in &read {
        assert_eq!(r["id"], id_of(r["recipient"].as_str().unwrap()).as_str());
        assert_eq!(r["workflow_run_id"], run_id.as_str());
    }
    // `before` the last page is the page before it.
    let back = back.expect("the last page has a before cursor");
    assert_eq!(back.status, 200, "{back:?}");
    assert_eq!(entries(&back), entries(&pages[1]));
    assert_eq!(cursor(&back, "after"), cursor(&pages[1], "after"));

    // One recipient's run by id, on either RecipientPage.
    for (user, a) in &by_id {
        assert_eq!(a.status, 200, "{user}: {a:?}");
        assert_eq!(a.body["__typename"], "WorkflowRecipientRun");
        assert_eq!(a.body["id"], id_of(user).as_str());
        assert_eq!(a.body["recipient"], *user);
        assert_eq!(a.body["workflow_run_id"], run_id.as_str());
        assert_eq!(a.body["workflow"], "long");
    }
    assert_eq!(by_id[0].1.body["state"], "Completed");
    assert_eq!(by_id[0].1.body["steps"].as_array().map(Vec::len), Some(50));
    assert_eq!(by_id[2].1.body["reason"], "RecipientNotFound");
    missing_run.assert_error(404, "resource_missing");
    missing_recipient.assert_error(404, "resource_missing");

    // The 50-step records need room: the run's recipients span two pages,
    // and the API pages above crossed from one to the next.
    let runs = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items;
    let run = runs.iter().find(|r| r.metadata.uid.as_deref() == Some(run_id.as_str())).unwrap();
    assert_eq!(run.status.as_ref().unwrap().pages.len(), 2, "{:?}", run.status);
}

#[tokio::test]
async fn page_size_and_cursors_are_checked() {
    let h = Herald::start().await;
    let run_id = finished_run(&h).await;
    let base = format!("/v1/workflow_runs/{run_id}");

    // Smaller pages: every recipient once, in order.
    let mut read = Vec::new();
    let mut after: Option<String> = None;
    let mut calls = 0;
    loop {
        let query = after.as_ref().map(|c| format!("&after={c}")).unwrap_or_default();
        let a = h.call("GET", &format!("{base}?page_size=7{query}"), None).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.body["recipient_runs"]["page_info"]["page_size"], 7);
        calls += 1;
        let page = entries(&a);
        assert!(page.len() <= 7);
        read.extend(page.iter().map(|r| r["recipient"].as_str().unwrap().to_string()));
        after = cursor(&a, "after");
        if after.is_none() || calls > RECIPIENTS {
            break;
        }
    }
    assert_eq!(read, ids());
    assert_eq!(calls, RECIPIENTS.div_ceil(7));

    for bad in ["page_size=0", "page_size=51", "page_size=x", "after=nope", "before=7.7.7", "after=0.1&before=0.5", "after=9.0"] {
        h.call("GET", &format!("{base}?{bad}"), None).await.assert_error(422, "invalid_params");
    }
}
