//! Schedules against a real control plane: a one-off fires once (and its
//! templates see `recipient.schedule`); a repeating schedule fires each
//! occurrence in each recipient's time zone, across a daylight-saving change
//! (on a clock running thousands of times faster than real time); operators
//! racing, killed and restarted fire no occurrence twice.

mod api_support;
mod common;
mod receivers;

use std::collections::BTreeMap;
use std::time::Duration;

use api_support::Herald;
use common::wait_for;
use herald::core::schedule::Clock;
use herald::resources::schedule::{OCCURRENCE_ANNOTATION, SCHEDULE_LABEL};
use herald::resources::{Schedule, TriggerRun};
use jiff::{SignedDuration, Timestamp};
use kube::api::ListParams;
use kube::ResourceExt;
use receivers::{HttpReceiver, Reply};
use serde_json::{json, Value};

/// The runs of a Schedule: occurrence (RFC 3339) per recipient, in order, with duplicates kept.
async fn occurrences(h: &Herald, schedule: &str) -> BTreeMap<String, Vec<String>> {
    let runs = h.api::<TriggerRun>().list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={schedule}"))).await.unwrap().items;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for run in runs {
        let recipient = run.spec.recipients[0].as_str().map(str::to_string).unwrap_or_else(|| run.spec.recipients[0].to_string());
        out.entry(recipient).or_default().push(run.annotations()[OCCURRENCE_ANNOTATION].clone());
    }
    for list in out.values_mut() {
        list.sort();
    }
    out
}

async fn schedule(h: &Herald, name: &str, spec: Value) {
    h.create::<Schedule>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Schedule", "metadata": {"name": name}, "spec": spec})).await;
}

async fn user(h: &Herald, id: &str, timezone: Option<&str>) {
    let body = match timezone {
        Some(tz) => json!({"name": id, "timezone": tz}),
        None => json!({"name": id}),
    };
    let answer = h.call("PUT", &format!("/v1/users/{id}"), Some(body)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
}

#[tokio::test]
async fn a_one_off_schedule_fires_once_and_templates_see_recipient_schedule() {
    let h = Herald::start().await;
    let receiver = HttpReceiver::start().await;
    receiver.always("/hook", Reply::status(200));
    h.http_channel("hook", &receiver.url("/hook"), 1).await;
    let body = r#"{"schedule": "{{ recipient.schedule.id }}", "at": "{{ recipient.schedule.last_occurrence_at }}", "next": "{{ recipient.schedule.next_occurrence_at }}", "n": {{ data.n }}}"#;
    h.workflow("reminder", json!({"steps": [{"ref": "hook", "type": "channel", "channel": "hook", "template": {"body": body}}]})).await;
    user(&h, "u1", Some("Asia/Tokyo")).await;
    h.cached(&["u1"]).await;

    let at = Timestamp::from_second(Timestamp::now().as_second() + 3).unwrap();
    schedule(&h, "once", json!({"workflow": "reminder", "recipients": ["u1"], "scheduledAt": at.to_string(), "data": {"n": 7}})).await;
    // Before its time: scheduled, nothing fired.
    let status = wait_for("the schedule's status", Duration::from_secs(20), || async { h.api::<Schedule>().get("once").await.ok()?.status }).await;
    assert_eq!(status.next_occurrence_at.as_ref().map(|t| t.0), Some(at), "{status:?}");
    assert_eq!(status.recipients[0].timezone, "Asia/Tokyo");

    wait_for("the delivery", Duration::from_secs(30), || async { (!receiver.received_at("/hook").is_empty()).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hooks = receiver.received_at("/hook");
    assert_eq!(hooks.len(), 1, "fired once");
    let runs = occurrences(&h, "once").await;
    assert_eq!(runs, BTreeMap::from([("u1".to_string(), vec![at.to_string()])]));

    let s = h.api::<Schedule>().get("once").await.unwrap();
    let status = s.status.unwrap();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Ended"), "{ready:?}");
    assert_eq!(status.last_occurrence_at.map(|t| t.0), Some(at));
    assert_eq!(status.next_occurrence_at, None);
    assert_eq!(status.last_runs.len(), 1);
    let sent = hooks[0].json();
    assert_eq!(sent["schedule"], status.recipients[0].id.as_str());
    assert_eq!(sent["at"], at.to_string());
    assert_eq!(sent["next"], "");
    assert_eq!(sent["n"], 7);
}

#[tokio::test]
async fn a_daily_schedule_fires_at_nine_local_in_each_zone_across_a_daylight_saving_change() {
    // 4 hours a second: a day passes in 6 seconds. New York springs forward on 2026-03-08.
    let origin: Timestamp = "2026-03-05T12:00:00Z".parse().unwrap();
    let clock = Clock::fast(origin, 4 * 3600);
    let h = Herald::start_with(move |s| {
        s.schedule_clock = Some(clock);
        s.default_timezone = vec!["Europe/Paris".into()];
    })
    .await;
    h.workflow("digest", api_support::delay_workflow("0s")).await;
    user(&h, "ny", Some("America/New_York")).await;
    user(&h, "tokyo", Some("Asia/Tokyo")).await;
    user(&h, "paris", None).await;
    h.cached(&["ny", "tokyo", "paris"]).await;
    schedule(
        &h,
        "digest",
        json!({"workflow": "digest", "recipients": ["ny", "tokyo", "paris"], "scheduledAt": origin.to_string(),
               "repeats": [{"frequency": "daily", "hours": 9}], "catchUpSeconds": 86400}),
    )
    .await;
    let end: Timestamp = "2026-03-09T15:00:00Z".parse().unwrap();
    tokio::time::sleep(clock.real_until(end)).await;
    let got = occurrences(&h, "digest").await;
    let last3 = |r: &str| got.get(r).map(|l| l[l.len().saturating_sub(3)..].to_vec()).unwrap_or_default();
    // 09:00 EST is 14:00Z, 09:00 EDT 13:00Z.
    assert_eq!(last3("ny"), ["2026-03-07T14:00:00Z", "2026-03-08T13:00:00Z", "2026-03-09T13:00:00Z"], "{got:?}");
    assert_eq!(last3("tokyo"), ["2026-03-07T00:00:00Z", "2026-03-08T00:00:00Z", "2026-03-09T00:00:00Z"], "{got:?}");
    // No timezone: the namespace default (--default-timezone), Paris (CET, 08:00Z).
    assert_eq!(last3("paris"), ["2026-03-07T08:00:00Z", "2026-03-08T08:00:00Z", "2026-03-09T08:00:00Z"], "{got:?}");
    for (recipient, list) in &got {
        let mut unique = list.clone();
        unique.dedup();
        assert_eq!(&unique, list, "{recipient} fired an occurrence twice");
    }
    let status = h.api::<Schedule>().get("digest").await.unwrap().status.unwrap();
    let ny = status.recipients.iter().find(|r| r.recipient == "ny").unwrap();
    assert_eq!(ny.timezone, "America/New_York");
    assert_eq!(ny.next_occurrence_at.as_ref().map(|t| t.0.to_string()).as_deref(), Some("2026-03-10T13:00:00Z"));
    assert_eq!(status.recipients.iter().find(|r| r.recipient == "paris").unwrap().timezone, "Europe/Paris");
}

#[tokio::test]
async fn racing_killed_and_restarted_operators_fire_each_occurrence_once() {
    // An hour every two seconds. Two operators without leader election race on
    // every occurrence; one is killed mid-flight and a third starts cold.
    let origin: Timestamp = "2026-03-02T00:00:30Z".parse().unwrap();
    let clock = Clock::fast(origin, 1800);
    let adjust = move |s: &mut herald::settings::Settings| {
        s.schedule_clock = Some(clock);
        s.leader_election = false;
    };
    let h = Herald::start_with(adjust).await;
    let client = h.client();
    let second = {
        let mut settings = herald::settings::Settings::for_namespace(&h.ns.name);
        adjust(&mut settings);
        common::operator_with(&client, settings).await
    };
    h.workflow("tick", api_support::delay_workflow("0s")).await;
    user(&h, "a", None).await;
    user(&h, "b", Some("Asia/Kolkata")).await;
    h.cached(&["a", "b"]).await;
    schedule(&h, "tick", json!({"workflow": "tick", "recipients": ["a", "b"], "scheduledAt": origin.to_string(), "repeats": [{"frequency": "hourly"}], "catchUpSeconds": 86400}))
        .await;

    tokio::time::sleep(Duration::from_secs(8)).await;
    // Kill the first operator where it stands, and start another in its place.
    let mut h = h;
    h.op.take().unwrap().abort();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let third = {
        let mut settings = herald::settings::Settings::for_namespace(&h.ns.name);
        adjust(&mut settings);
        common::operator_with(&client, settings).await
    };
    tokio::time::sleep(Duration::from_secs(7)).await;
    let now = clock.now();
    second.shutdown().await;
    third.shutdown().await;

    let got = occurrences(&h, "tick").await;
    for (recipient, list) in &got {
        let mut unique = list.clone();
        unique.dedup();
        assert_eq!(&unique, list, "{recipient} fired an occurrence twice");
        // Every hour from the first to the last: none lost either.
        let times: Vec<Timestamp> = list.iter().map(|t| t.parse().unwrap()).collect();
        for pair in times.windows(2) {
            assert_eq!(pair[1].duration_since(pair[0]), SignedDuration::from_hours(1), "{recipient}: {list:?}");
        }
        assert!(list.len() >= 7, "{recipient}: {list:?}");
        assert!(now.duration_since(*times.last().unwrap()) <= SignedDuration::from_hours(2), "{recipient}: {list:?} (now {now})");
    }
    // Kolkata is UTC+05:30: its hours start at :30.
    assert!(got["b"].iter().all(|t| t.ends_with(":30:00Z")), "{got:?}");
    assert!(got["a"].iter().all(|t| t.ends_with(":00:00Z")), "{got:?}");
    let status = h.api::<Schedule>().get("tick").await.unwrap().status.unwrap();
    let mut names: Vec<&str> = status.last_runs.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), status.last_runs.len(), "lastRuns lists a run twice");
}

/// The real binary, killed with SIGKILL while an occurrence is due: the next
/// leader finds that occurrence's run (or creates it, once) and nothing fires twice.
#[tokio::test]
async fn a_leader_killed_as_an_occurrence_fires_leaves_exactly_one_run() {
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    let receiver = HttpReceiver::start().await;
    let lease = ["--leader-election-lease-seconds", "2"];
    common::create::<herald::resources::Channel>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hook"}, "spec": {"type": "http", "url": receiver.url("/hook")}}),
    )
    .await;
    common::create::<herald::resources::User>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "u1"}, "spec": {"id": "u1"}})).await;
    common::create::<herald::resources::Workflow>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "ping"}, "spec": {"steps": [{"ref": "hook", "type": "channel", "channel": "hook", "template": {"body": "ping"}}]}}),
    )
    .await;
    let mut first = common::HeraldProcess::start(&ns.name, &lease);
    // Whole seconds: the status keeps times to the second.
    let at = Timestamp::from_second(Timestamp::now().as_second() + 3).unwrap();
    common::create::<Schedule>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Schedule", "metadata": {"name": "once"}, "spec": {"workflow": "ping", "recipients": ["u1"], "scheduledAt": at.to_string()}}))
        .await;
    // Killed the moment the occurrence's run exists (its status and the delivery may not).
    let runs = ns.api::<TriggerRun>();
    let selector = ListParams::default().labels(&format!("{SCHEDULE_LABEL}=once"));
    wait_for("the occurrence's run", Duration::from_secs(30), || async { (!runs.list(&selector).await.ok()?.items.is_empty()).then_some(()) }).await;
    first.kill9();
    let _second = common::HeraldProcess::start(&ns.name, &lease);
    wait_for("the delivery", Duration::from_secs(60), || async { (receiver.count() >= 1).then_some(()) }).await;
    // The next leader has reconciled the Schedule (it shows the occurrence as its last).
    let schedules = ns.api::<Schedule>();
    wait_for("the schedule's status to show the occurrence", Duration::from_secs(30), || async {
        let s = schedules.get("once").await.ok()?;
        let status = serde_json::to_value(s.status?).ok()?;
        status.get("lastOccurrenceAt").and_then(Value::as_str).filter(|t| t.parse::<Timestamp>().ok() == Some(at)).map(|_| ())
    })
    .await;
    assert_eq!(runs.list(&selector).await.unwrap().items.len(), 1, "one run for the occurrence");
    // A delivery the killed leader made but did not record is made again, with the same Idempotency-Key.
    let keys: std::collections::BTreeSet<String> = receiver.received().iter().filter_map(|r| r.header("idempotency-key").map(str::to_string)).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
}
