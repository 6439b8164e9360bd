//! Triggers (`POST /v1/workflows/{key}/trigger`), cancels
//! (`POST /v1/workflows/{key}/cancel`) and the older notify API
//! (`POST /v1/notify`). A trigger is checked at the door (workflow, recipients,
//! actor, tenant, data against the workflow's schema) and answered only once
//! its TriggerRun is stored: the workflow run id is the run's metadata.uid.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::ResourceExt;
use serde_json::{json, Value};

use super::auth::Caller;
use super::errors::{ApiError, FieldError};
use super::idempotency::{self, Scope};
use super::{check_id, check_ids, Api, Fields, JsonBody, Params, FIELD_MANAGER, MAX_ID_CHARS};
use crate::controller::identify::{self, IdentifyError, Overwrite, Written};
use crate::controller::trigger_run::MAX_RECIPIENTS;
use crate::controller::workflow::find_by_key;
use crate::core::model::{parse_recipient, parse_tenant, InlineRecipient, JsonObject, RecipientInput, RecipientKey, TenantInput};
use crate::metrics::TriggerLabels;
use crate::resources::workflow::OnInvalid;
use crate::resources::{Cancellation, CancellationSpec, TriggerRun, TriggerRunSpec};

/// Longest cancellation key accepted.
pub const MAX_CANCELLATION_KEY_CHARS: usize = 1024;
/// The label on every TriggerRun and Cancellation the API creates.
pub const CREATED_BY_LABEL: &str = "app.kubernetes.io/created-by";
/// The annotation naming the caller (API key Secret or Kubernetes user).
pub const CALLER_ANNOTATION: &str = "herald.dev/api-caller";

/// A name for a new resource: a readable prefix from `key` and a random suffix.
pub(super) fn generated_name(key: &str) -> String {
    let mut prefix = String::new();
    for c in key.chars().map(|c| c.to_ascii_lowercase()) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' };
        if !(c == '-' && (prefix.is_empty() || prefix.ends_with('-'))) {
            prefix.push(c);
        }
        if prefix.len() >= 40 {
            break;
        }
    }
    let prefix = prefix.trim_end_matches('-');
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    if prefix.is_empty() {
        format!("run-{suffix}")
    } else {
        format!("{prefix}-{suffix}")
    }
}

fn check_key_ids(field: &str, key: &RecipientKey) -> Vec<FieldError> {
    let mut errors: Vec<FieldError> = check_id(&format!("{field}/id"), key.id()).err().into_iter().collect();
    if let RecipientKey::Object { collection, .. } = key {
        errors.extend(check_id(&format!("{field}/collection"), collection).err());
    }
    errors
}

/// Reads a recipients list: at most 1,000 entries, each a valid recipient.
pub(super) fn read_recipients(f: &mut Fields, field: &str, values: &[Value]) {
    if values.len() > MAX_RECIPIENTS {
        f.error(format!("/{field}"), format!("{} recipients listed; at most {MAX_RECIPIENTS} are allowed (use an Object or an Audience to reach more)", values.len()));
        return;
    }
    for (i, value) in values.iter().enumerate() {
        let at = format!("/{field}/{i}");
        match parse_recipient(value) {
            Ok(recipient) => {
                for e in check_key_ids(&at, recipient.key()) {
                    f.push(e);
                }
            }
            Err(e) => f.error(at, e.to_string()),
        }
    }
}

/// Reads the optional actor and tenant.
pub(super) fn read_actor_and_tenant(f: &mut Fields) -> (Option<Value>, Option<Value>) {
    let actor = f.take("actor");
    if let Some(value) = &actor {
        match parse_recipient(value) {
            Ok(actor) => {
                for e in check_key_ids("/actor", actor.key()) {
                    f.push(e);
                }
            }
            Err(e) => f.error("/actor", e.to_string()),
        }
    }
    let tenant = f.take("tenant");
    if let Some(value) = &tenant {
        match parse_tenant(value) {
            Ok(t) => {
                if let Err(e) = check_id("/tenant", t.id()) {
                    f.push(e);
                }
            }
            Err(e) => f.error("/tenant", e.to_string()),
        }
    }
    (actor, tenant)
}

/// Checks the workflow and the data against its schema; every data error is listed.
async fn check_workflow(api: &Api, namespace: &str, spec: &mut TriggerRunSpec) -> Result<(), ApiError> {
    api.caches_ready().await?;
    let key = &spec.workflow;
    let workflow = find_by_key(&api.ctx, namespace, key).ok_or_else(|| ApiError::WorkflowMissing(key.clone()))?;
    if !workflow.spec.active {
        return Err(ApiError::WorkflowInactive(key.clone()));
    }
    let compiled = api.ctx.workflows.get(&workflow);
    let compiled = compiled.as_ref().as_ref().map_err(|message| ApiError::WorkflowInvalid { key: key.clone(), message: message.clone() })?;
    if let (Some(schema), OnInvalid::Reject) = (&compiled.schema, workflow.spec.validation.on_invalid) {
        // The schema reads a Value: the data moves into one and back rather than being copied.
        let present = spec.data.is_some();
        let data = Value::Object(spec.data.take().unwrap_or_default());
        let errors = schema.validate(&data);
        if let (true, Value::Object(map)) = (present, data) {
            spec.data = Some(map);
        }
        if !errors.is_empty() {
            let errors =
                errors.into_iter().map(|e| FieldError::new(if e.pointer == "/" { "/data".to_string() } else { format!("/data{}", e.pointer) }, e.message)).collect::<Vec<_>>();
            let count = errors.len();
            return Err(ApiError::InvalidParams {
                message: format!("data does not match the schema of workflow `{key}` ({count} error{})", if count == 1 { "" } else { "s" }),
                errors,
            });
        }
    }
    Ok(())
}

/// The inline recipients (and actor) and the inline tenant a trigger carries.
fn inline_parts(spec: &TriggerRunSpec) -> (Vec<InlineRecipient>, Option<TenantInput>) {
    let recipients = spec
        .recipients
        .iter()
        .chain(spec.actor.iter())
        .filter_map(|v| match parse_recipient(v) {
            Ok(RecipientInput::Inline(inline)) => Some(inline),
            _ => None,
        })
        .collect();
    let tenant = spec.tenant.as_ref().and_then(|t| parse_tenant(t).ok()).filter(|t| matches!(t, TenantInput::Inline { .. }));
    (recipients, tenant)
}

/// Inline recipients, actor and tenant write Users, Objects and Tenants: the
/// caller needs the same permission as the write routes (`update`), not
/// only `create` on triggerruns.
pub(super) async fn authorize_inline(api: &Api, caller: &Caller, spec: &TriggerRunSpec) -> Result<(), ApiError> {
    let (recipients, tenant) = inline_parts(spec);
    if recipients.iter().any(|r| !r.key.is_object()) {
        api.allow(caller, "update", "users").await?;
    }
    if recipients.iter().any(|r| r.key.is_object()) {
        api.allow(caller, "update", "objects").await?;
    }
    if tenant.is_some() {
        api.allow(caller, "update", "tenants").await?;
    }
    Ok(())
}

/// Identifies the trigger's inline recipients, actor and tenant before the run
/// is stored (Knock's order), with the caller's permission checked by
/// [`authorize_inline`]. The controller then finds them as they are and writes nothing.
pub(super) async fn identify_inline(api: &Api, namespace: &str, spec: &TriggerRunSpec) -> Result<(), ApiError> {
    /// Identify writes in flight at once for one trigger.
    const CONCURRENCY: usize = 16;
    let (recipients, tenant) = inline_parts(spec);
    let ctx = &api.ctx;
    // Owned items: a stream of borrowing closures trips the Send check of axum handlers.
    let results: Vec<(bool, Result<Written, IdentifyError>)> = futures::stream::iter(recipients)
        .map(|inline| async move {
            let written = identify::identify_recipient(&ctx.client, &ctx.stores, namespace, &inline, Overwrite::Allowed).await.map(|r| r.written());
            (inline.key.is_object(), written)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for (is_object, result) in &results {
        if result.as_ref().is_ok_and(|w| w.wrote()) {
            ctx.metrics.write(if *is_object { "Object" } else { "User" });
        }
    }
    for (_, result) in results {
        result?;
    }
    if let Some(tenant) = tenant {
        if identify::identify_tenant(&ctx.client, &ctx.stores, namespace, &tenant, Overwrite::Allowed).await?.is_some_and(|t| t.written.wrote()) {
            ctx.metrics.write("Tenant");
        }
    }
    Ok(())
}

/// The parameters an idempotency key is bound to.
fn parameters(spec: &TriggerRunSpec) -> Value {
    json!({
        "workflow": spec.workflow,
        "recipients": spec.recipients,
        "audiences": spec.audiences,
        "actor": spec.actor,
        "data": spec.data,
        "cancellation_key": spec.cancellation_key,
        "tenant": spec.tenant,
    })
}

fn new_run(name: &str, spec: TriggerRunSpec, fingerprint: &str, caller: &Caller, api_name: &str) -> TriggerRun {
    let mut run = TriggerRun::new(name, spec);
    run.metadata.labels = Some(BTreeMap::from([(CREATED_BY_LABEL.to_string(), "herald-api".to_string())]));
    run.metadata.annotations = Some(BTreeMap::from([
        (idempotency::FINGERPRINT_ANNOTATION.to_string(), fingerprint.to_string()),
        (CALLER_ANNOTATION.to_string(), caller.name()),
        ("herald.dev/api".to_string(), api_name.to_string()),
    ]));
    run
}

fn run_id(run: &ObjectMeta) -> Result<String, ApiError> {
    run.uid.clone().ok_or_else(|| ApiError::Internal("the stored TriggerRun has no uid".into()))
}

/// The trigger response: `{"workflow_run_id"}`, marked when replayed.
fn accepted(run: &ObjectMeta, replayed: bool) -> Result<Response, ApiError> {
    let mut response = Json(json!({"workflow_run_id": run_id(run)?})).into_response();
    if replayed {
        response.headers_mut().insert(idempotency::REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// What became of a trigger: the stored run's metadata (all a response needs).
enum Outcome {
    Created(ObjectMeta),
    /// A run already holds the idempotency key.
    Existing(ObjectMeta),
}

/// Checks and stores a trigger whose parameters have this `fingerprint`. With
/// a key, the run is named after it, so a second create is refused by the
/// Kubernetes API and the first run returned.
async fn persist(api: &Api, caller: &Caller, key: Option<(Scope, &str)>, mut spec: TriggerRunSpec, fingerprint: &str, api_name: &str) -> Result<Outcome, ApiError> {
    let namespace = &caller.namespace;
    let runs = api.kube::<TriggerRun>(namespace);
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let Some((scope, key)) = key else {
        check_workflow(api, namespace, &mut spec).await?;
        identify_inline(api, namespace, &spec).await?;
        let mut run = new_run(&generated_name(&spec.workflow), spec, fingerprint, caller, api_name);
        for _ in 0..3 {
            match api.create_returning_metadata(namespace, &pp, &run).await {
                Ok(meta) => return Ok(Outcome::Created(meta)),
                // A random name taken: draw another.
                Err(kube::Error::Api(s)) if s.code == 409 => run.metadata.name = Some(generated_name(&run.spec.workflow)),
                Err(e) => return Err(e.into()),
            }
        }
        return Err(ApiError::Conflict("could not find a free TriggerRun name".into()));
    };
    let name = idempotency::run_name(scope, namespace, key);
    spec.idempotency_key = Some(key.to_string());
    // A key already used is answered from its run even when the request would
    // not pass the checks today (the workflow was deactivated since, say);
    // looking only when the checks fail keeps the common path to one write.
    if let Err(refused) = check_workflow(api, namespace, &mut spec).await {
        return match runs.get_opt(&name).await? {
            Some(existing) => Ok(Outcome::Existing(existing.metadata)),
            None => Err(refused),
        };
    }
    identify_inline(api, namespace, &spec).await?;
    // With a history store the key outlives its run in the cluster: it is
    // claimed there first (a unique key), and a key used before is answered
    // from its run, in the cluster or archived.
    let store = api.ctx.history.as_ref().map(|h| &h.store);
    let mut claimed = false;
    if let Some(store) = store {
        match crate::store::idempotency::claim(store, namespace, &name, fingerprint).await {
            Ok(true) => claimed = true,
            Ok(false) => {
                if let Some(existing) = runs.get_opt(&name).await? {
                    return Ok(Outcome::Existing(existing.metadata));
                }
                if let Some(archived) = crate::store::runs::find_by_name(store, namespace, &name).await? {
                    return Ok(Outcome::Existing(archived_run(archived)?));
                }
                // Claimed, but its run is not made yet (a parallel request is
                // making it, or an earlier create failed): create it; the
                // cluster lets one create win.
            }
            // The store is down: the cluster still holds keys of runs not archived
            // yet; the archive records this key when the store is back.
            Err(e) if e.is_unavailable() => tracing::warn!(error = %e, "idempotency key checked in the cluster only: the history store is unavailable"),
            Err(e) => return Err(e.into()),
        }
    }
    let run = new_run(&name, spec, fingerprint, caller, api_name);
    for _ in 0..3 {
        match api.create_returning_metadata(namespace, &pp, &run).await {
            Ok(meta) => return Ok(Outcome::Created(meta)),
            Err(kube::Error::Api(s)) if s.code == 409 => match runs.get_opt(&name).await? {
                Some(existing) => return Ok(Outcome::Existing(existing.metadata)),
                // Deleted in between: archived first, with a store; without one its retention ended.
                None => match store {
                    Some(store) => match crate::store::runs::find_by_name(store, namespace, &name).await? {
                        Some(archived) => return Ok(Outcome::Existing(archived_run(archived)?)),
                        None => continue,
                    },
                    None => continue,
                },
            },
            Err(e) => {
                // Nothing was stored: free the key for the caller's retry.
                if let (true, Some(store)) = (claimed, store) {
                    if let Err(release) = crate::store::idempotency::release(store, namespace, &name).await {
                        tracing::warn!(error = %release, "releasing an idempotency key whose run was not created");
                    }
                }
                return Err(e.into());
            }
        }
    }
    Err(ApiError::Conflict("the idempotency key's run kept changing; retry".into()))
}

/// The metadata of an archived run (the store keeps the whole object).
fn archived_run(value: Value) -> Result<ObjectMeta, ApiError> {
    serde_json::from_value::<TriggerRun>(value).map(|run| run.metadata).map_err(|e| ApiError::Internal(format!("an archived run does not read: {e}")))
}

fn count_accepted(api: &Api, name: &str) {
    api.ctx.metrics.http.triggers_accepted.get_or_create(&TriggerLabels { api: name.to_string() }).inc();
    api.ctx.metrics.write("TriggerRun");
}

/// `POST /v1/workflows/{key}/trigger`: `{recipients, actor, data, cancellation_key, tenant}` → 200 `{"workflow_run_id"}`.
pub async fn trigger(State(api): State<Arc<Api>>, caller: Caller, Params(key): Params<String>, headers: HeaderMap, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    api.allow(&caller, "create", "triggerruns").await?;
    check_ids(&[("key", &key)])?;
    let idempotency_key = idempotency::header_key(&headers)?;
    let mut f = Fields::new(body)?;
    let recipients = match f.array("recipients") {
        Some(r) if r.is_empty() => {
            f.error("/recipients", "must list at least one recipient");
            r
        }
        Some(r) => r,
        None => {
            if !f.has_errors() {
                f.error("/recipients", "is required");
            }
            Vec::new()
        }
    };
    read_recipients(&mut f, "recipients", &recipients);
    let (actor, tenant) = read_actor_and_tenant(&mut f);
    let data = f.object("data");
    let cancellation_key = f.string("cancellation_key", MAX_CANCELLATION_KEY_CHARS);
    if cancellation_key.as_deref() == Some("") {
        f.error("/cancellation_key", "must not be empty");
    }
    f.deny_unknown(" (a trigger takes recipients, actor, data, cancellation_key and tenant)");
    f.finish()?;

    let spec = TriggerRunSpec { workflow: key, actor, recipients, data, cancellation_key, tenant, ..Default::default() };
    authorize_inline(&api, &caller, &spec).await?;
    let fingerprint = idempotency::fingerprint(&parameters(&spec));
    match persist(&api, &caller, idempotency_key.as_deref().map(|k| (Scope::Trigger, k)), spec, &fingerprint, "trigger").await? {
        Outcome::Created(run) => {
            api.index.remember(&run);
            count_accepted(&api, "trigger");
            tracing::info!(run = run.name.as_deref().unwrap_or_default(), workflow_run_id = run.uid.as_deref().unwrap_or_default(), caller = %caller.name(), "trigger accepted");
            accepted(&run, false)
        }
        Outcome::Existing(run) => {
            let stored = run.annotations.as_ref().and_then(|a| a.get(idempotency::FINGERPRINT_ANNOTATION));
            if stored != Some(&fingerprint) {
                return Err(ApiError::IdempotencyMismatch { run_id: run_id(&run)? });
            }
            api.ctx.metrics.http.idempotent_replays.inc();
            accepted(&run, true)
        }
    }
}

/// `POST /v1/notify` (the older API): `{name, actor, recipients, lists, data,
/// cancellation_key, tenant, idempotencyKey}`. Lists are Audience keys. A key
/// that an earlier successful call used fails with 409, naming its run.
pub async fn notify(State(api): State<Arc<Api>>, caller: Caller, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    api.allow(&caller, "create", "triggerruns").await?;
    let mut f = Fields::new(body)?;
    let name = f.required_string("name", MAX_ID_CHARS);
    if let Some(name) = &name {
        if let Err(e) = check_id("/name", name) {
            f.push(e);
        }
    }
    let recipients = f.array("recipients").unwrap_or_default();
    read_recipients(&mut f, "recipients", &recipients);
    let mut lists = Vec::new();
    for (i, list) in f.array("lists").unwrap_or_default().into_iter().enumerate() {
        match list {
            Value::String(s) => match check_id(&format!("/lists/{i}"), &s) {
                Ok(()) => lists.push(s),
                Err(e) => f.push(e),
            },
            other => f.error(format!("/lists/{i}"), format!("must be a list key string, got {}", super::type_name(&other))),
        }
    }
    if recipients.is_empty() && lists.is_empty() && !f.has_errors() {
        f.error("/recipients", "a notify call needs recipients, lists, or both");
    }
    let (actor, tenant) = read_actor_and_tenant(&mut f);
    let data: Option<JsonObject> = if f.has("data") {
        f.object("data")
    } else {
        f.error("/data", "is required");
        None
    };
    let cancellation_key = match (f.has("cancellation_key"), f.has("cancellationKey")) {
        (true, _) => f.string("cancellation_key", MAX_CANCELLATION_KEY_CHARS),
        (false, true) => f.string("cancellationKey", MAX_CANCELLATION_KEY_CHARS),
        _ => None,
    };
    let key_field = if f.has("idempotency_key") { "idempotency_key" } else { "idempotencyKey" };
    let idempotency_key = f.string(key_field, idempotency::MAX_KEY_CHARS);
    if let Some(key) = &idempotency_key {
        if let Err(ApiError::InvalidParams { errors, .. }) = idempotency::check_key(&format!("/{key_field}"), key) {
            errors.into_iter().for_each(|e| f.push(e));
        }
    }
    f.deny_unknown(" (notify takes name, actor, recipients, lists, data, cancellation_key, tenant and idempotencyKey)");
    f.finish()?;

    let spec = TriggerRunSpec { workflow: name.unwrap_or_default(), actor, recipients, audiences: lists, data, cancellation_key, tenant, ..Default::default() };
    let key = idempotency_key.as_deref().map(|k| (Scope::Notify, k));
    let fingerprint = idempotency::fingerprint(&parameters(&spec));
    match persist(&api, &caller, key, spec, &fingerprint, "notify").await? {
        Outcome::Created(run) => {
            api.index.remember(&run);
            count_accepted(&api, "notify");
            tracing::info!(run = run.name.as_deref().unwrap_or_default(), workflow_run_id = run.uid.as_deref().unwrap_or_default(), caller = %caller.name(), "notify accepted");
            accepted(&run, false)
        }
        Outcome::Existing(run) => Err(ApiError::IdempotencyKeyUsed { key: idempotency_key.unwrap_or_default(), run_id: run_id(&run)? }),
    }
}

/// A recipient reference as a Cancellation stores it: a user id, or `{id, collection}`.
fn reference(key: &RecipientKey) -> Value {
    match key {
        RecipientKey::User(id) => Value::String(id.clone()),
        RecipientKey::Object { collection, id } => json!({"id": id, "collection": collection}),
    }
}

/// `POST /v1/workflows/{key}/cancel`: `{cancellation_key, recipients?}` → 204,
/// once a Cancellation resource is stored (it also covers runs triggered
/// shortly after it, for the cancellation retention window).
pub async fn cancel(State(api): State<Arc<Api>>, caller: Caller, Params(key): Params<String>, JsonBody(body): JsonBody) -> Result<StatusCode, ApiError> {
    api.allow(&caller, "create", "cancellations").await?;
    check_ids(&[("key", &key)])?;
    let mut f = Fields::new(body)?;
    let cancellation_key = f.required_string("cancellation_key", MAX_CANCELLATION_KEY_CHARS);
    let mut recipients = Vec::new();
    for (i, value) in f.array("recipients").unwrap_or_default().iter().enumerate() {
        let at = format!("/recipients/{i}");
        match parse_recipient(value) {
            Ok(RecipientInput::Reference(k)) => {
                let errors = check_key_ids(&at, &k);
                if errors.is_empty() {
                    recipients.push(reference(&k));
                }
                errors.into_iter().for_each(|e| f.push(e));
            }
            Ok(RecipientInput::Inline(_)) => f.error(at, "a cancel names recipients by reference: a user id or {id, collection}"),
            Err(e) => f.error(at, e.to_string()),
        }
    }
    f.deny_unknown(" (a cancel takes cancellation_key and recipients)");
    f.finish()?;

    api.caches_ready().await?;
    if find_by_key(&api.ctx, &caller.namespace, &key).is_none() {
        return Err(ApiError::WorkflowMissing(key));
    }
    let spec = CancellationSpec { workflow: key.clone(), cancellation_key: cancellation_key.unwrap_or_default(), recipients };
    let mut cancellation = Cancellation::new(&generated_name(&key), spec);
    cancellation.metadata.labels = Some(BTreeMap::from([(CREATED_BY_LABEL.to_string(), "herald-api".to_string())]));
    cancellation.metadata.annotations = Some(BTreeMap::from([(CALLER_ANNOTATION.to_string(), caller.name())]));
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let created = api.kube::<Cancellation>(&caller.namespace).create(&pp, &cancellation).await?;
    api.ctx.metrics.write("Cancellation");
    tracing::info!(cancellation = %created.name_any(), workflow = %key, caller = %caller.name(), "cancel accepted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_valid_and_unique() {
        for key in ["new-comment", "Weird Key!!", "", "---", &"x".repeat(300), "é"] {
            let a = generated_name(key);
            assert!(crate::core::ids::is_dns_subdomain(&a), "{key:?} -> {a}");
            assert!(a.len() <= 63, "{a}");
            assert_ne!(a, generated_name(key));
        }
        assert!(generated_name("new-comment").starts_with("new-comment-"));
    }

    #[test]
    fn recipients_are_checked_entry_by_entry() {
        let mut f = Fields::new(json!({})).unwrap();
        read_recipients(&mut f, "recipients", &[json!("u1"), json!(5), json!({"id": "x".repeat(300)}), json!({"id": "p", "collection": 1})]);
        let ApiError::InvalidParams { errors, .. } = f.finish().unwrap_err() else { panic!() };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["/recipients/1", "/recipients/2/id", "/recipients/3"]);
        let mut f = Fields::new(json!({})).unwrap();
        read_recipients(&mut f, "recipients", &vec![json!("u"); MAX_RECIPIENTS + 1]);
        assert!(f.finish().is_err());
    }
}
