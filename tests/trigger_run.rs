//! TriggerRun reconciliation against the real local control plane: every
//! rule of the trigger model, observed through the resources' status.

mod common;
mod receivers;

use std::time::Duration;

use common::{wait_for, TestNamespace};
use herald::core::status::{RecipientState, RunState};
use herald::resources::{Cancellation, Channel, Object, RecipientPage, Tenant, TriggerRun, User, Workflow};
use kube::api::ListParams;
use kube::ResourceExt;
use serde_json::{json, Value};

use common::create;
use common::runs::{by_id, channel_ready, condition, finished, recipients, sent, trigger, user, users, users_subscribed_to_everyone, wait_for_event, workflow};

/// The `hooks` Channel, delivering to a real HTTP receiver that answers 200
/// (it lives as long as the test's runtime). Returns its URL.
async fn hooks_channel(ns: &TestNamespace) -> String {
    let receiver: &'static receivers::HttpReceiver = Box::leak(Box::new(receivers::HttpReceiver::start().await));
    let url = receiver.url("/");
    create::<Channel>(ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": url}})).await;
    url
}

#[tokio::test]
async fn data_is_validated_against_the_schema_reject_and_warn() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let _op = common::operator(&client, &ns.name).await;
    hooks_channel(&ns).await;
    users(&ns, &["user_1"]).await;
    let schema = json!({"type": "object", "required": ["message", "count"], "properties": {"message": {"type": "string"}, "count": {"type": "integer"}}});
    create::<Workflow>(&ns, workflow("strict", json!({"dataSchema": schema}))).await;
    create::<Workflow>(&ns, workflow("lenient", json!({"dataSchema": schema, "validation": {"onInvalid": "Warn"}}))).await;

    let bad = json!({"message": 5});
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "strict", "recipients": ["user_1"], "data": bad}))).await;
    let run = finished(&ns, &run.name_any()).await;
    let status = run.status.clone().unwrap();
    assert_eq!(status.state, RunState::Failed);
    let (s, reason, message) = condition(&run, "Accepted");
    assert_eq!((s.as_str(), reason.as_str()), ("False", "InvalidData"));
    // Every error, with its JSON pointer.
    assert!(message.contains("/message") && message.contains("count"), "{message}");
    assert!(status.pages.is_empty(), "nothing may be sent for rejected data");
    wait_for_event(&ns, &run.name_any(), "Warning", "InvalidData").await;

    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "lenient", "recipients": ["user_1"], "data": bad}))).await;
    let run = finished(&ns, &run.name_any()).await;
    assert_eq!(run.status.as_ref().unwrap().state, RunState::Completed);
    let (s, reason, _) = condition(&run, "DataValid");
    assert_eq!((s.as_str(), reason.as_str()), ("False", "InvalidData"));
    assert_eq!(recipients(&ns, &run).await[0].state, RecipientState::Completed);
    wait_for_event(&ns, &run.name_any(), "Warning", "InvalidData").await;

    // Valid data runs; data that is not an object is refused by the schema itself.
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "strict", "recipients": ["user_1"], "data": {"message": "hi", "count": 2}}))).await;
    assert_eq!(finished(&ns, &run.name_any()).await.status.unwrap().state, RunState::Completed);
}

#[tokio::test]
async fn a_broken_schema_makes_the_workflow_not_ready_and_its_runs_fail() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let _op = common::operator(&client, &ns.name).await;
    users(&ns, &["user_1"]).await;
    create::<Workflow>(&ns, workflow("broken", json!({"dataSchema": {"type": 12}}))).await;
    let api = ns.api::<Workflow>();
    let message = wait_for("Workflow Ready=False", Duration::from_secs(20), || async {
        let wf = api.get("broken").await.ok()?;
        let c = wf.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")?;
        Some(c.message)
    })
    .await;
    assert!(message.contains("dataSchema"), "{message}");
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "broken", "recipients": ["user_1"]}))).await;
    let run = finished(&ns, &run.name_any()).await;
    assert_eq!(condition(&run, "Accepted").1, "WorkflowInvalid");
}

#[tokio::test]
async fn missing_inactive_workflows_and_unknown_recipients() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let mut settings = herald::settings::Settings::for_namespace(&ns.name);
    settings.workflow_grace_seconds = 3;
    let _op = common::operator_with(&client, settings).await;
    hooks_channel(&ns).await;
    users(&ns, &["user_1"]).await;

    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "nope", "recipients": ["user_1"]}))).await;
    let run = finished(&ns, &run.name_any()).await;
    assert_eq!(condition(&run, "Succeeded").1, "WorkflowNotFound");

    // A Workflow applied just after its trigger (same `kubectl apply`) is waited for.
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "late", "recipients": ["user_1", "ghost"], "data": {"message": "m"}}))).await;
    let api = ns.api::<TriggerRun>();
    wait_for("the run to wait for its Workflow", Duration::from_secs(20), || async {
        let status = api.get(&run.name_any()).await.ok()?.status?;
        status.conditions.iter().any(|c| c.type_ == "Accepted" && c.reason == "WaitingForWorkflow").then_some(())
    })
    .await;
    create::<Workflow>(&ns, workflow("late", json!({}))).await;
    let run = finished(&ns, &run.name_any()).await;
    let r = by_id(&recipients(&ns, &run).await);
    assert_eq!(r["user_1"].state, RecipientState::Completed);
    assert_eq!(r["ghost"].state, RecipientState::Failed);
    assert_eq!(r["ghost"].reason.as_deref(), Some("RecipientNotFound"));
    assert_eq!(run.status.as_ref().unwrap().state, RunState::Failed, "a failed recipient fails the run");
    assert_eq!(run.status.as_ref().unwrap().totals.as_ref().unwrap().completed, 1);

    create::<Workflow>(&ns, workflow("off", json!({"active": false}))).await;
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "off", "recipients": ["user_1"]}))).await;
    assert_eq!(condition(&finished(&ns, &run.name_any()).await, "Succeeded").1, "WorkflowInactive");

    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "late", "recipients": [5, {"name": "no id"}]}))).await;
    let run = finished(&ns, &run.name_any()).await;
    let (_, reason, message) = condition(&run, "Accepted");
    assert_eq!(reason, "InvalidRecipients");
    assert!(message.contains("recipients[0]") && message.contains("recipients[1]"), "{message}");

    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "late"}))).await;
    assert_eq!(condition(&finished(&ns, &run.name_any()).await, "Accepted").1, "NoRecipients");
}

#[tokio::test]
async fn inline_recipients_are_identified_before_the_run_and_trigger_data_merges() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let _op = common::operator(&client, &ns.name).await;
    let hooks = hooks_channel(&ns).await;
    users(&ns, &["user_1"]).await;
    create::<Workflow>(&ns, workflow("greet", json!({}))).await;

    let run: TriggerRun = create(
        &ns,
        trigger(json!({
            "workflow": "greet",
            "recipients": [
                "user_1",
                {"id": "Jane.Doe@x", "name": "Jane", "email": "jane@example.com", "plan": "pro",
                 "channel_data": {"hooks": {"url": format!("{hooks}jane")}}, "$trigger_data": {"message": "just for Jane"}},
                {"id": "room-7", "collection": "rooms", "name": "Room Seven"}
            ],
            "data": {"message": "for everyone"}
        })),
    )
    .await;
    let run = finished(&ns, &run.name_any()).await;
    let r = by_id(&recipients(&ns, &run).await);
    assert!(sent(&r["user_1"]).contains("Name of user_1|for everyone"), "{}", sent(&r["user_1"]));
    assert!(sent(&r["Jane.Doe@x"]).contains("Jane|just for Jane"), "{}", sent(&r["Jane.Doe@x"]));
    assert!(sent(&r["room-7"]).contains("Room Seven|for everyone"), "{}", sent(&r["room-7"]));

    // Identified as resources, named from their ids, found by id.
    let jane = ns.api::<User>().list(&ListParams::default()).await.unwrap().items.into_iter().find(|u| u.spec.id == "Jane.Doe@x").expect("Jane identified");
    assert_eq!(jane.name_any(), herald::core::ids::name_for_id("Jane.Doe@x"));
    assert_eq!(jane.spec.email.as_deref(), Some("jane@example.com"));
    assert_eq!(jane.spec.properties["plan"], "pro");
    assert!(jane.spec.channel_data.contains_key("hooks"));
    let room = ns.api::<Object>().get("rooms-room-7").await.expect("object identified");
    assert_eq!(room.spec.properties["name"], "Room Seven");
}

#[tokio::test]
async fn objects_fan_out_two_levels_deduplicated_without_the_actor_and_audiences() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let op = common::operator(&client, &ns.name).await;
    hooks_channel(&ns).await;
    users(&ns, &["user_1", "user_2", "user_3", "user_4", "user_5"]).await;
    create::<Workflow>(&ns, workflow("fan", json!({}))).await;
    let obj = |name: &str, collection: &str, id: &str, subs: Value| {
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Object", "metadata": {"name": name},
               "spec": {"collection": collection, "id": id, "properties": {"name": format!("{collection}/{id}")}, "subscribers": subs}})
    };
    create::<Object>(&ns, obj("deep", "teams", "deep", json!([{"recipient": "user_5"}]))).await;
    create::<Object>(&ns, obj("ops", "teams", "ops", json!([{"recipient": "user_3"}, {"recipient": "user_1"}, {"recipient": {"id": "deep", "collection": "teams"}}]))).await;
    create::<Object>(
        &ns,
        obj(
            "p1",
            "projects",
            "p1",
            json!([
                {"recipient": "user_1", "properties": {"role": "owner"}},
                {"recipient": "user_2"},
                {"recipient": {"id": "ops", "collection": "teams"}}
            ]),
        ),
    )
    .await;
    create::<Workflow>(
        &ns,
        workflow("roles", json!({"steps": [{"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{{ recipient.subscription.role }}"}}]})),
    )
    .await;

    let run: TriggerRun =
        create(&ns, trigger(json!({"workflow": "fan", "actor": "user_2", "recipients": ["user_4", {"id": "p1", "collection": "projects"}], "data": {"message": "m"}}))).await;
    let run = finished(&ns, &run.name_any()).await;
    let list = recipients(&ns, &run).await;
    let ids: Vec<&str> = list.iter().map(|r| r.recipient.as_str()).collect();
    // user_4 direct; p1; its subscribers (user_2 is the actor: excluded); ops' user_3
    // (user_1 already reached); `deep` is an object two levels down: not reached.
    assert_eq!(ids, ["user_4", "p1", "user_1", "ops", "user_3"]);
    assert_eq!(list[2].via.as_deref(), Some("object:projects/p1"));
    assert_eq!(list[4].via.as_deref(), Some("object:teams/ops"));
    assert!(list.iter().all(|r| r.state == RecipientState::Completed));
    assert_eq!(run.status.as_ref().unwrap().actor.as_deref(), Some("user_2"));
    assert!(sent(&list[0]).contains("|user_2|"), "the actor is visible to templates: {}", sent(&list[0]));

    // The actor listed directly is notified.
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "fan", "actor": "user_2", "recipients": ["user_2", {"id": "p1", "collection": "projects"}]}))).await;
    let run = finished(&ns, &run.name_any()).await;
    assert_eq!(recipients(&ns, &run).await.iter().filter(|r| r.recipient == "user_2").count(), 1);

    // Subscription properties reach templates.
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "roles", "recipients": [{"id": "p1", "collection": "projects"}]}))).await;
    let run = finished(&ns, &run.name_any()).await;
    let r = by_id(&recipients(&ns, &run).await);
    assert!(sent(&r["user_1"]).contains("owner"), "{}", sent(&r["user_1"]));

    // Audiences (the notify API's lists) fan out to their members.
    let audience = json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Audience", "metadata": {"name": "followers"},
                          "spec": {"key": "project.p1.followers", "members": ["user_3", "user_5", {"id": "ops", "collection": "teams"}]}});
    create::<herald::resources::Audience>(&ns, audience).await;
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "fan", "recipients": ["user_5"], "audiences": ["project.p1.followers"]}))).await;
    let run = finished(&ns, &run.name_any()).await;
    let list = recipients(&ns, &run).await;
    let ids: Vec<&str> = list.iter().map(|r| r.recipient.as_str()).collect();
    assert_eq!(ids, ["user_5", "user_3", "ops", "user_1", "deep"]);
    assert_eq!(list[1].via.as_deref(), Some("audience:project.p1.followers"));

    // The operator's metrics tell the same story (once the last reconcile has counted itself).
    let metric = |name: &str| common::metric_value(&op.context.metrics.render(), name);
    wait_for("no reconcile in flight", Duration::from_secs(20), || async { (metric("herald_reconciles_in_flight") == 0.0).then_some(()) }).await;
    assert_eq!(metric("herald_run_recipients_count"), 4.0, "four runs expanded");
    assert_eq!(metric("herald_run_recipients_sum"), 20.0, "five recipients each");
    assert_eq!(metric("herald_deliveries_total"), 20.0, "one http step each");
    assert!(metric("herald_reconciles_total") >= 4.0);
    assert!(metric("herald_reconcile_duration_seconds_count") >= 4.0);
    assert_eq!(metric("herald_leader"), 1.0);
    wait_for("an empty work queue", Duration::from_secs(10), || async { (metric("herald_work_queue_depth") == 0.0).then_some(()) }).await;
}

#[tokio::test]
async fn tenant_preferences_take_precedence_and_opt_outs_are_skipped() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let _op = common::operator(&client, &ns.name).await;
    hooks_channel(&ns).await;
    create::<Workflow>(&ns, workflow("digest", json!({"categories": ["news"]}))).await;
    create::<Workflow>(&ns, workflow("security", json!({"categories": ["news"], "overridePreferences": true}))).await;
    create::<Tenant>(
        &ns,
        json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "acme"},
        "spec": {"id": "acme", "name": "Acme", "settings": {"preferenceSet": {"channel_types": {"http": true}, "categories": {"news": {"channel_types": {"http": false}}}}}}}),
    )
    .await;
    // a: default says no http, the tenant says yes: the tenant wins.
    create::<User>(&ns, user("a", json!({"id": "a", "name": "A", "preferences": {"default": {"channel_types": {"http": false}}}}))).await;
    // b: the tenant turns the category off; b's tenant-specific set turns it back on.
    create::<User>(&ns, user("b", json!({"id": "b", "name": "B", "tenantPreferences": {"acme": {"categories": {"news": true}}}}))).await;
    // c: nothing of its own: the tenant's category opt-out applies.
    create::<User>(&ns, user("c", json!({"id": "c", "name": "C"}))).await;
    // d: its tenant-specific set opts out of the workflow.
    create::<User>(&ns, user("d", json!({"id": "d", "name": "D", "tenantPreferences": {"acme": {"workflows": {"digest": false}}}}))).await;

    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "digest", "recipients": ["a", "b", "c", "d"], "tenant": "acme", "data": {"message": "m"}}))).await;
    let run = finished(&ns, &run.name_any()).await;
    let r = by_id(&recipients(&ns, &run).await);
    // a's default is below the tenant's defaults; the tenant's category rule opts a out though.
    assert_eq!(r["a"].state, RecipientState::Skipped);
    assert_eq!(r["b"].state, RecipientState::Completed, "{:?}", r["b"]);
    assert!(sent(&r["b"]).contains("|acme"), "the tenant is visible to templates: {}", sent(&r["b"]));
    assert_eq!(r["c"].state, RecipientState::Skipped);
    assert_eq!(r["c"].reason.as_deref(), Some("PreferenceOptOut"));
    assert_eq!(r["c"].steps[0].reason.as_deref(), Some("PreferenceOptOut"));
    assert_eq!(r["d"].state, RecipientState::Skipped);
    assert!(r["d"].steps[0].message.as_deref().unwrap_or("").contains("workflows.digest"));
    assert_eq!(run.status.as_ref().unwrap().state, RunState::Completed, "sending nothing is a success");
    assert_eq!(run.status.as_ref().unwrap().tenant.as_deref(), Some("acme"));

    // Without the tenant, a's own default applies.
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "digest", "recipients": ["a", "c"]}))).await;
    let r = by_id(&recipients(&ns, &finished(&ns, &run.name_any()).await).await);
    assert_eq!(r["a"].state, RecipientState::Skipped);
    assert_eq!(r["c"].state, RecipientState::Completed);

    // overridePreferences ignores them all.
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "security", "recipients": ["a", "c", "d"], "tenant": "acme"}))).await;
    let list = recipients(&ns, &finished(&ns, &run.name_any()).await).await;
    assert!(list.iter().all(|r| r.state == RecipientState::Completed), "{list:?}");
}

fn delayed_workflow(name: &str, delay: &str) -> Value {
    workflow(
        name,
        json!({"steps": [
            {"ref": "wait", "type": "delay", "delay": {"duration": delay}},
            {"ref": "notify", "type": "channel", "channel": "hooks", "template": {"body": "{{ recipient.id }}"}}
        ]}),
    )
}

async fn wait_state(ns: &TestNamespace, name: &str, state: RecipientState, count: usize) -> TriggerRun {
    let api = ns.api::<TriggerRun>();
    wait_for(&format!("{count} recipients {state:?}"), Duration::from_secs(30), || async {
        let run = api.get(name).await.ok()?;
        let t = run.status.as_ref()?.totals.clone()?;
        let n = match state {
            RecipientState::Waiting => t.waiting,
            RecipientState::Completed => t.completed,
            _ => unreachable!(),
        };
        (n as usize == count).then_some(run)
    })
    .await
}

#[tokio::test]
async fn recipient_run_ids_are_derived_and_stable_across_a_restart() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    hooks_channel(&ns).await;
    users(&ns, &["user_1", "user_2"]).await;
    create::<Workflow>(&ns, delayed_workflow("later", "3s")).await;
    let op = common::operator(&client, &ns.name).await;
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "later", "recipients": ["user_1", "user_2"]}))).await;
    let waiting = wait_state(&ns, &run.name_any(), RecipientState::Waiting, 2).await;
    let before = recipients(&ns, &waiting).await;
    op.shutdown().await;

    let _op = common::operator(&client, &ns.name).await;
    let done = finished(&ns, &run.name_any()).await;
    let after = recipients(&ns, &done).await;
    let run_id = uuid::Uuid::parse_str(&run.uid().unwrap()).unwrap();
    assert_eq!(done.status.as_ref().unwrap().workflow_run_id.as_deref(), Some(run_id.to_string().as_str()));
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.recipient_run_id, a.recipient_run_id);
        let expected = uuid::Uuid::new_v5(&run_id, format!("user:{}", a.recipient).as_bytes());
        assert_eq!(a.recipient_run_id, expected.to_string());
        assert_eq!(a.state, RecipientState::Completed);
        assert_eq!(a.steps.len(), 2, "each step ran once: {:?}", a.steps);
    }
}

fn cancellation(key: &str, recipients: Value) -> Value {
    json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Cancellation", "metadata": {"generateName": "cancel-"},
           "spec": {"workflow": "slow", "cancellationKey": key, "recipients": recipients}})
}

#[tokio::test]
async fn cancellation_for_all_for_some_and_before_the_trigger() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let _op = common::operator(&client, &ns.name).await;
    hooks_channel(&ns).await;
    users(&ns, &["user_1", "user_2", "user_3"]).await;
    create::<Workflow>(&ns, delayed_workflow("slow", "4s")).await;

    // All recipients.
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "slow", "recipients": ["user_1", "user_2"], "cancellationKey": "k-all"}))).await;
    wait_state(&ns, &run.name_any(), RecipientState::Waiting, 2).await;
    create::<Cancellation>(&ns, cancellation("k-all", json!([]))).await;
    let done = finished(&ns, &run.name_any()).await;
    assert_eq!(done.status.as_ref().unwrap().state, RunState::Cancelled);
    let list = recipients(&ns, &done).await;
    assert!(list.iter().all(|r| r.state == RecipientState::Cancelled), "{list:?}");
    assert!(list.iter().all(|r| r.steps.len() == 1), "nothing was sent after the cancel");

    // Some recipients: the others go on and finish.
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "slow", "recipients": ["user_1", "user_2", "user_3"], "cancellationKey": "k-some"}))).await;
    wait_state(&ns, &run.name_any(), RecipientState::Waiting, 3).await;
    create::<Cancellation>(&ns, cancellation("k-some", json!(["user_2"]))).await;
    let done = finished(&ns, &run.name_any()).await;
    let r = by_id(&recipients(&ns, &done).await);
    assert_eq!(r["user_2"].state, RecipientState::Cancelled);
    assert_eq!(r["user_1"].state, RecipientState::Completed);
    assert_eq!(r["user_3"].state, RecipientState::Completed);
    assert_eq!(done.status.as_ref().unwrap().state, RunState::Completed);

    // A cancel that arrives before its trigger still applies.
    // (No pause between the two: tests/trust.rs shows it applies back to back.)
    create::<Cancellation>(&ns, cancellation("k-first", json!([]))).await;
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "slow", "recipients": ["user_1"], "cancellationKey": "k-first"}))).await;
    let done = finished(&ns, &run.name_any()).await;
    assert_eq!(done.status.as_ref().unwrap().state, RunState::Cancelled);
}

#[tokio::test]
async fn finished_runs_and_their_pages_are_deleted_after_their_ttl() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let _op = common::operator(&client, &ns.name).await;
    hooks_channel(&ns).await;
    users(&ns, &["user_1"]).await;
    create::<Workflow>(&ns, workflow("brief", json!({}))).await;
    // A small run (its records inline) and one with more recipients than fit inline (on a page).
    let short: TriggerRun = create(&ns, trigger(json!({"workflow": "brief", "recipients": ["user_1"], "ttlSecondsAfterFinished": 2}))).await;
    let many: Vec<String> = (0..=herald::core::status::INLINE_RECIPIENTS).map(|i| format!("ghost-{i}")).collect();
    let paged: TriggerRun = create(&ns, trigger(json!({"workflow": "brief", "recipients": many, "ttlSecondsAfterFinished": 2}))).await;
    let kept: TriggerRun = create(&ns, trigger(json!({"workflow": "brief", "recipients": ["user_1"]}))).await;
    let done = finished(&ns, &short.name_any()).await;
    assert!(done.status.as_ref().unwrap().pages.is_empty(), "one recipient is kept inline");
    let page = finished(&ns, &paged.name_any()).await.status.unwrap().pages[0].clone();
    finished(&ns, &kept.name_any()).await;
    let runs = ns.api::<TriggerRun>();
    for name in [short.name_any(), paged.name_any()] {
        wait_for("the run to be deleted", Duration::from_secs(20), || async { runs.get_opt(&name).await.unwrap().is_none().then_some(()) }).await;
    }
    assert!(ns.api::<RecipientPage>().get_opt(&page).await.unwrap().is_none(), "its pages go with it");
    assert!(runs.get_opt(&kept.name_any()).await.unwrap().is_some(), "the default TTL (7 days) keeps the other");
}

#[tokio::test]
async fn ten_thousand_subscribers_fan_out_with_readable_status_and_few_writes() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    hooks_channel(&ns).await;
    create::<Workflow>(&ns, workflow("big", json!({}))).await;
    const N: usize = 10_000;
    let ids: Vec<String> = (0..N).map(|i| format!("user_{i:05}")).collect();
    users_subscribed_to_everyone(&ns, &ids).await;

    let op = common::operator(&client, &ns.name).await;
    let writes_before = api_writes(&op);
    let started = std::time::Instant::now();
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "big", "recipients": [{"id": "everyone", "collection": "groups"}], "data": {"message": "hi"}}))).await;
    let runs = ns.api::<TriggerRun>();
    let done = wait_for("the 10,000-recipient run to finish", Duration::from_secs(300), || async {
        let run = runs.get(&run.name_any()).await.ok()?;
        run.status.as_ref().filter(|s| s.state.is_finished())?;
        Some(run)
    })
    .await;
    let elapsed = started.elapsed();
    let writes = api_writes(&op) - writes_before;
    let status = done.status.clone().unwrap();
    let totals = status.totals.clone().unwrap();
    assert_eq!(totals.recipients as usize, N + 1, "the object and every subscriber");
    assert_eq!(totals.completed as usize, N + 1);
    let size = serde_json::to_vec(&done).unwrap().len();
    assert!(size < 256 * 1024, "the TriggerRun is {size} bytes");
    let list = recipients(&ns, &done).await;
    assert_eq!(list.len(), N + 1);
    assert!(list.iter().all(|r| r.state == RecipientState::Completed));
    let distinct: std::collections::HashSet<&str> = list.iter().map(|r| r.recipient_run_id.as_str()).collect();
    assert_eq!(distinct.len(), N + 1);
    assert!((writes as usize) < N / 20, "{writes} API writes for {N} recipients");
    println!(
        "fan-out of {} recipients: {:.1}s, {writes} API writes ({:.4} per recipient), TriggerRun {size} bytes, {} pages",
        N + 1,
        elapsed.as_secs_f64(),
        writes as f64 / (N + 1) as f64,
        status.pages.len()
    );
}

/// The operator's count of its own API writes, from its metrics.
fn api_writes(op: &herald::operator::Operator) -> u64 {
    op.context.metrics.render().lines().filter(|l| l.starts_with("herald_api_writes_total")).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

/// The operator's API writes by kind (`herald_api_writes_total{kind=...}`
/// lines as they are), so a failure names what was written.
fn api_writes_by_kind(op: &herald::operator::Operator) -> Vec<String> {
    op.context.metrics.render().lines().filter(|l| l.starts_with("herald_api_writes_total{")).map(str::to_string).collect()
}

/// TriggerRun reconciles started so far, from the operator's metrics text.
fn run_reconciles(metrics: &str) -> f64 {
    common::metric_value(metrics, "herald_reconciles_total{controller=\"triggerrun\"}")
}

/// Waits until the TriggerRun controller has started more than `than`
/// reconciles and none is running; returns the count.
async fn reconciled_past(op: &herald::operator::Operator, than: f64) -> f64 {
    wait_for("a reconcile of the poked run, finished", Duration::from_secs(20), || async {
        let text = op.context.metrics.render();
        let count = run_reconciles(&text);
        (count > than && common::metric_value(&text, "herald_reconciles_in_flight") == 0.0).then_some(count)
    })
    .await
}

#[tokio::test]
async fn a_reconcile_that_changes_nothing_writes_nothing() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let op = common::operator(&client, &ns.name).await;
    hooks_channel(&ns).await;
    // The Channel's own status write comes from its controller on its own
    // schedule: wait for it, so every write counted below is about the run.
    channel_ready(&ns, "hooks", "True", Duration::from_secs(20)).await;
    users(&ns, &["user_1", "user_2"]).await;
    create::<Workflow>(&ns, workflow("quiet", json!({}))).await;
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "quiet", "recipients": ["user_1", "user_2"], "data": {"message": "m"}}))).await;
    let done = finished(&ns, &run.name_any()).await;
    // The reconcile that wrote the final status may still be counting that write.
    wait_for("no reconcile in flight", Duration::from_secs(20), || async {
        (common::metric_value(&op.context.metrics.render(), "herald_reconciles_in_flight") == 0.0).then_some(())
    })
    .await;
    let writes = api_writes_by_kind(&op);

    // Wake the controller twice: a label on the run changes it without
    // touching its spec. The watch echo of the run's final status write may
    // still be on its way and count as one of the reconciles waited for, but
    // not as two: the second is of a poke.
    let before = run_reconciles(&op.context.metrics.render());
    let mut reconciles = before;
    for poke in ["1", "2"] {
        let patch = json!({"metadata": {"labels": {"poke": poke}}});
        ns.api::<TriggerRun>().patch(&run.name_any(), &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
        reconciles = reconciled_past(&op, reconciles).await;
        let again = ns.api::<TriggerRun>().get(&run.name_any()).await.unwrap();
        assert_eq!(again.status, done.status, "the status did not change");
        assert_eq!(api_writes_by_kind(&op), writes, "no API writes for a finished run");
    }
    // And no loop: reconciles that wrote nothing set off no others.
    assert!(reconciles <= before + 3.0, "{} reconciles for two pokes", reconciles - before);
}

#[tokio::test]
async fn one_operator_watches_several_namespaces_and_only_those() {
    let client = common::client().await;
    let a = TestNamespace::new(&client).await;
    let b = TestNamespace::new(&client).await;
    let unwatched = TestNamespace::new(&client).await;
    let mut settings = herald::settings::Settings::for_namespace(&a.name);
    settings.namespaces.push(b.name.clone());
    let _op = common::operator_with(&client, settings).await;
    let mut runs = Vec::new();
    for ns in [&a, &b, &unwatched] {
        hooks_channel(ns).await;
        users(ns, &["user_1"]).await;
        create::<Workflow>(ns, workflow("multi", json!({}))).await;
        let run: TriggerRun = create(ns, trigger(json!({"workflow": "multi", "recipients": ["user_1"], "data": {"message": "m"}}))).await;
        runs.push(run.name_any());
    }
    assert_eq!(finished(&a, &runs[0]).await.status.unwrap().state, RunState::Completed);
    assert_eq!(finished(&b, &runs[1]).await.status.unwrap().state, RunState::Completed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let untouched = unwatched.api::<TriggerRun>().get(&runs[2]).await.unwrap();
    assert!(untouched.status.is_none(), "a namespace herald does not watch is left alone: {:?}", untouched.status);
}

/// A run of more pages than it holds in memory at once waits on a delay;
/// the reconcile that wakes it reads its pages a few at a time (the others
/// keep only their counts until their turn): every recipient is sent to
/// once, and the totals stay whole throughout.
#[tokio::test]
async fn a_waiting_run_of_many_pages_resumes_a_few_pages_at_a_time() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let receiver = receivers::HttpReceiver::start().await;
    create::<Channel>(&ns, json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "hooks"}, "spec": {"type": "http", "url": receiver.url("/")}}))
        .await;
    create::<Workflow>(&ns, delayed_workflow("later", "3s")).await;
    // With the object itself, 2,601 recipients: six pages, more than the four held at once.
    const N: usize = 2_600;
    let ids: Vec<String> = (0..N).map(|i| format!("user_{i:04}")).collect();
    users_subscribed_to_everyone(&ns, &ids).await;
    let _op = common::operator(&client, &ns.name).await;
    let run: TriggerRun = create(&ns, trigger(json!({"workflow": "later", "recipients": [{"id": "everyone", "collection": "groups"}]}))).await;
    let waiting = wait_state(&ns, &run.name_any(), RecipientState::Waiting, N + 1).await;
    assert_eq!(waiting.status.as_ref().unwrap().pages.len(), 6);
    assert!(receiver.received().is_empty(), "nothing is sent before the delay ends");

    // While the woken run goes, its totals count every recipient.
    let runs = ns.api::<TriggerRun>();
    let done = wait_for("the run to finish", Duration::from_secs(120), || async {
        let run = runs.get(&run.name_any()).await.ok()?;
        let totals = run.status.as_ref()?.totals.clone()?;
        assert_eq!(totals.recipients as usize, N + 1, "{totals:?}");
        run.status.as_ref().is_some_and(|s| s.state.is_finished()).then_some(run)
    })
    .await;
    assert_eq!(done.status.as_ref().unwrap().state, RunState::Completed);
    assert_eq!(done.status.as_ref().unwrap().totals.as_ref().unwrap().completed as usize, N + 1);
    let mut sent: Vec<String> = receiver.received().iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    assert_eq!(sent.len(), N + 1, "each recipient once");
    sent.sort();
    sent.dedup();
    assert_eq!(sent.len(), N + 1, "each recipient once");
    let list = recipients(&ns, &done).await;
    assert!(list.iter().all(|r| r.state == RecipientState::Completed && r.steps.len() == 2), "each step ran once for everyone");
}
