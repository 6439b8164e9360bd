//! Reading runs: `GET /v1/workflow_runs/{workflow_run_id}` (a TriggerRun, found
//! by its uid, with every recipient's run) and
//! `GET /v1/workflow_recipient_runs/{id}` (one recipient's run, found in the
//! RecipientPages). Knock's fields come first; herald's own (state, reason,
//! steps) are added beside them.
//!
//! Both search by listing: the uid is not an indexable field for custom
//! resources, and recipient run ids are hashes (UUID v5) that cannot be
//! reversed. Runs are listed as metadata only; pages are listed in chunks.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use kube::api::ListParams;
use kube::ResourceExt;
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::Caller;
use super::errors::ApiError;
use super::{created_at, updated_at, Api, Params};
use crate::core::model::{parse_recipient, parse_tenant, RecipientKey};
use crate::core::status::{RecipientState, RecipientStatus, StepState};
use crate::resources::{RecipientPage, TriggerRun};

const LIST_CHUNK: u32 = 250;

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::invalid("id", "must be a UUID"))
}

/// Knock's recipient run status for herald's state.
fn knock_status(state: RecipientState) -> &'static str {
    match state {
        RecipientState::Queued => "queued",
        RecipientState::Running | RecipientState::Waiting => "processing",
        RecipientState::Completed | RecipientState::Skipped | RecipientState::Failed => "completed",
        RecipientState::Cancelled => "cancelled",
    }
}

fn reference(key: &RecipientKey) -> Value {
    match key {
        RecipientKey::User(id) => json!(id),
        RecipientKey::Object { collection, id } => json!({"id": id, "collection": collection}),
    }
}

fn actor_reference(run: &TriggerRun) -> Value {
    run.spec.actor.as_ref().and_then(|a| parse_recipient(a).ok()).map(|a| reference(a.key())).unwrap_or(Value::Null)
}

fn tenant_id(run: &TriggerRun) -> Value {
    run.spec.tenant.as_ref().and_then(|t| parse_tenant(t).ok()).map(|t| json!(t.id())).unwrap_or(Value::Null)
}

fn events(recipient: &RecipientStatus) -> Vec<Value> {
    let run_id = Uuid::parse_str(&recipient.recipient_run_id).unwrap_or_default();
    recipient
        .steps
        .iter()
        .map(|step| {
            json!({
                "__typename": "WorkflowRecipientRunEvent",
                "id": Uuid::new_v5(&run_id, step.step_ref.as_bytes()).to_string(),
                "event": format!("step.{}", step.step_ref),
                "status": if step.state == StepState::Failed { "error" } else { "ok" },
                "attempt": step.attempts,
                "inserted_at": step.time,
                "data": {"ref": step.step_ref, "state": step.state, "reason": step.reason, "message": step.message, "status_code": step.status_code},
            })
        })
        .collect()
}

/// One recipient's run, in Knock's shape plus herald's detail.
fn recipient_run_json(run: Option<&TriggerRun>, run_id: &str, page: &RecipientPage, recipient: &RecipientStatus, detail: bool) -> Value {
    let mut out = json!({
        "__typename": "WorkflowRecipientRun",
        "id": recipient.recipient_run_id,
        "workflow_run_id": run_id,
        "recipient": reference(&recipient.key()),
        "status": knock_status(recipient.state),
        "state": recipient.state,
        "reason": recipient.reason,
        "message": recipient.message,
        "via": recipient.via,
        "error_count": recipient.steps.iter().filter(|s| s.state == StepState::Failed).count() + usize::from(recipient.state == RecipientState::Failed && recipient.steps.is_empty()),
        "updated_at": updated_at(&page.metadata),
    });
    if let Some(run) = run {
        out["workflow"] = json!(run.spec.workflow);
        out["actor"] = actor_reference(run);
        out["tenant"] = tenant_id(run);
        out["inserted_at"] = json!(created_at(&run.metadata));
        out["trigger_source"] = json!({"type": "api", "cancellation_key": run.spec.cancellation_key});
    }
    if detail {
        out["events"] = json!(events(recipient));
        out["steps"] = json!(recipient.steps);
        out["wake_at"] = json!(recipient.wake_at);
    }
    out
}

/// `GET /v1/workflow_runs/{workflow_run_id}`: the run and each recipient's run.
pub async fn workflow_run(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "triggerruns").await?;
    let uid = parse_id(&id)?.to_string();
    let runs = api.kube::<TriggerRun>(&caller.namespace);
    let mut params = ListParams::default().limit(LIST_CHUNK);
    let name = loop {
        let list = runs.list_metadata(&params).await?;
        if let Some(found) = list.items.iter().find(|m| m.metadata.uid.as_deref() == Some(uid.as_str())) {
            break found.name_any();
        }
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Err(ApiError::not_found("resource_missing", format!("workflow run {id} not found"))),
        }
    };
    let run = runs.get_opt(&name).await?.ok_or_else(|| ApiError::not_found("resource_missing", format!("workflow run {id} not found")))?;
    let status = run.status.clone().unwrap_or_default();
    let pages = api.kube::<RecipientPage>(&caller.namespace);
    let mut recipient_runs = Vec::new();
    for page_name in &status.pages {
        if let Some(page) = pages.get_opt(page_name).await? {
            for recipient in page.status.as_ref().map(|s| s.recipients.as_slice()).unwrap_or_default() {
                recipient_runs.push(recipient_run_json(None, &uid, &page, recipient, false));
            }
        }
    }
    Ok(Json(json!({
        "__typename": "WorkflowRun",
        "id": uid,
        "name": run.name_any(),
        "workflow": run.spec.workflow,
        "status": format!("{:?}", status.state).to_lowercase(),
        "actor": actor_reference(&run),
        "tenant": tenant_id(&run),
        "cancellation_key": run.spec.cancellation_key,
        "idempotency_key": run.spec.idempotency_key,
        "totals": status.totals,
        "conditions": status.conditions,
        "inserted_at": created_at(&run.metadata),
        "started_at": status.start_time.map(|t| t.0.to_string()),
        "completed_at": status.completion_time.map(|t| t.0.to_string()),
        "recipient_runs": recipient_runs,
    })))
}

/// `GET /v1/workflow_recipient_runs/{id}`: one recipient's run.
pub async fn recipient_run(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "recipientpages").await?;
    let wanted = parse_id(&id)?.to_string();
    let pages = api.kube::<RecipientPage>(&caller.namespace);
    let mut params = ListParams::default().limit(LIST_CHUNK);
    loop {
        let list = pages.list(&params).await?;
        for page in &list.items {
            let recipients = page.status.as_ref().map(|s| s.recipients.as_slice()).unwrap_or_default();
            if let Some(recipient) = recipients.iter().find(|r| r.recipient_run_id == wanted) {
                let run = api.kube::<TriggerRun>(&caller.namespace).get_opt(&page.spec.trigger_run).await?;
                let run_id = run.as_ref().and_then(|r| r.uid()).unwrap_or_default();
                return Ok(Json(recipient_run_json(run.as_ref(), &run_id, page, recipient, true)));
            }
        }
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Err(ApiError::not_found("resource_missing", format!("workflow recipient run {id} not found"))),
        }
    }
}
