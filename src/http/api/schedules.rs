//! Knock's schedules API: `POST/PUT/DELETE/GET /v1/schedules` and
//! `GET /v1/users/{user_id}/schedules`.
//!
//! Knock keeps one schedule per recipient; herald stores each schedule the
//! API creates as a `Schedule` resource of one recipient. A Schedule applied
//! with kubectl may list several recipients: the API shows it as one schedule
//! per recipient, reads and deletes them one by one (deleting removes that
//! recipient), and refuses to update them (edit the resource instead). A
//! schedule's id is UUID v5 of the recipient's canonical key under the
//! Schedule's uid (`status.recipients[].id`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::Json;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, PostParams};
use kube::ResourceExt;
use serde_json::{json, Value};

use super::auth::Caller;
use super::errors::ApiError;
use super::triggers::{authorize_inline, generated_name, identify_inline, read_actor_and_tenant, read_recipients, CALLER_ANNOTATION, CREATED_BY_LABEL};
use super::{check_ids, created_at, updated_at, Api, Fields, JsonBody, Params, FIELD_MANAGER};
use crate::controller::directory;
use crate::controller::schedule::{check, recipient_reference, zone_of};
use crate::controller::workflow::find_by_key;
use crate::core::model::{parse_recipient, parse_tenant, RecipientKey};
use crate::core::schedule::{self as rules, RepeatRule, Rule};
use crate::resources::schedule::{Schedule, ScheduleSpec};
use crate::resources::TriggerRunSpec;

/// Most recipients (create) or schedule ids (update, delete) per request, as in Knock.
pub const MAX_PER_REQUEST: usize = 100;
/// The label on Schedules the API creates: their workflow.
pub const WORKFLOW_LABEL: &str = "herald.dev/workflow";
/// The annotation on Schedules the API creates: when, to the nanosecond
/// (creationTimestamp has whole seconds; lists are newest first).
pub const INSERTED_AT_ANNOTATION: &str = "herald.dev/inserted-at";

/// When a Schedule was created: the API's annotation, else its creationTimestamp.
fn inserted_at(schedule: &Schedule) -> Option<Timestamp> {
    schedule.annotations().get(INSERTED_AT_ANNOTATION).and_then(|t| t.parse().ok()).or_else(|| schedule.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// One schedule as the API sees it: a Schedule and one of its recipients.
struct Entry {
    schedule: Schedule,
    key: RecipientKey,
    id: String,
}

fn entries_of(schedule: &Schedule) -> Vec<Entry> {
    let uid = schedule.uid().unwrap_or_default();
    schedule
        .spec
        .recipients
        .iter()
        .filter_map(|r| match parse_recipient(r) {
            Ok(crate::core::model::RecipientInput::Reference(key)) => Some(key),
            _ => None,
        })
        .map(|key| Entry { schedule: schedule.clone(), id: rules::schedule_id(&uid, &key.canonical()), key })
        .collect()
}

async fn all_entries(api: &Api, namespace: &str) -> Result<Vec<Entry>, ApiError> {
    let schedules = api.kube::<Schedule>(namespace).list(&ListParams::default()).await?;
    Ok(schedules.items.iter().flat_map(entries_of).collect())
}

/// A repeat rule as Knock echoes it: every field, nulls explicit.
fn rule_json(rule: &RepeatRule) -> Value {
    json!({
        "__typename": "ScheduleRepeat",
        "frequency": rule.frequency,
        "interval": rule.interval.unwrap_or(1),
        "days": rule.days.as_ref().map(|d| match rules::parse_days(Some(d)) {
            Ok(Some(days)) => json!(days.iter().map(|d| format!("{d:?}")[..3].to_lowercase()).collect::<Vec<_>>()),
            _ => d.clone(),
        }),
        "day_of_month": rule.day_of_month,
        "hours": rule.hours,
        "minutes": rule.minutes,
    })
}

fn recipient_json(api: &Api, namespace: &str, key: &RecipientKey) -> Value {
    match key {
        // What the index keeps: the recipient's properties (timestamps are not kept).
        RecipientKey::User(id) => {
            let mut user = directory::user(&api.ctx.stores, namespace, id).map(|u| u.properties.clone()).unwrap_or_default();
            user.insert("__typename".into(), json!("User"));
            user.insert("id".into(), json!(id));
            Value::Object(user)
        }
        RecipientKey::Object { collection, id } => {
            let properties = directory::object(&api.ctx.stores, namespace, collection, id).map(|o| o.properties.clone()).unwrap_or_default();
            json!({"__typename": "Object", "id": id, "collection": collection, "properties": properties})
        }
    }
}

/// A schedule in Knock's shape (`Schedule`).
fn schedule_json(api: &Api, namespace: &str, entry: &Entry) -> Value {
    let schedule = &entry.schedule;
    let label = crate::controller::schedule::recipient_label(&entry.key);
    let recorded = schedule.status.as_ref().and_then(|s| s.recipients.iter().find(|r| r.recipient == label));
    let last = recorded.and_then(|r| r.last_occurrence_at.as_ref()).map(|t| t.0.to_string());
    let next = match recorded {
        Some(r) => r.next_occurrence_at.as_ref().map(|t| t.0.to_string()),
        // Not reconciled yet: computed now, as the controller will.
        None => {
            let created = schedule.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or_else(Timestamp::now);
            check(&schedule.spec, created).ok().and_then(|c| {
                let (zone, _) = zone_of(&api.ctx, namespace, &entry.key);
                c.plan.next_after(api.ctx.settings.schedule_now(), &zone).map(|t| t.to_string())
            })
        }
    };
    let actor = schedule.spec.actor.as_ref().map(|a| match parse_recipient(a) {
        Ok(r) => recipient_json(api, namespace, r.key()),
        Err(_) => a.clone(),
    });
    json!({
        "__typename": "Schedule",
        "id": entry.id,
        "workflow": schedule.spec.workflow,
        "recipient": recipient_json(api, namespace, &entry.key),
        "actor": actor,
        "tenant": schedule.spec.tenant,
        "data": schedule.spec.data.clone().unwrap_or_default(),
        "repeats": schedule.spec.repeats.iter().map(rule_json).collect::<Vec<_>>(),
        "last_occurrence_at": last,
        "next_occurrence_at": next,
        "inserted_at": inserted_at(schedule).map(|t| t.to_string()).or_else(|| created_at(&schedule.metadata)),
        "updated_at": updated_at(&schedule.metadata),
    })
}

/// The timing fields of a create or update: repeats, scheduled_at, ending_at (each None when absent).
struct Timing {
    repeats: Option<Vec<RepeatRule>>,
    scheduled_at: Option<Option<Time>>,
    ending_at: Option<Option<Time>>,
}

fn read_time(f: &mut Fields, key: &str) -> Option<Option<Time>> {
    let present = f.has(key);
    let value = f.string(key, 64)?;
    match value.parse::<Timestamp>() {
        Ok(t) => Some(Some(Time(t))),
        Err(_) => {
            f.error(format!("/{key}"), "must be an ISO 8601 time with a UTC offset, e.g. 2026-03-02T09:00:00Z");
            present.then_some(None)
        }
    }
}

fn read_timing(f: &mut Fields) -> Timing {
    let repeats = f.array("repeats").map(|rules| {
        let mut out = Vec::new();
        for (i, value) in rules.into_iter().enumerate() {
            match serde_json::from_value::<RepeatRule>(value) {
                Ok(rule) => match Rule::parse(&rule) {
                    Ok(_) => out.push(rule),
                    Err(e) => f.error(format!("/repeats/{i}"), e),
                },
                Err(e) => f.error(format!("/repeats/{i}"), e.to_string()),
            }
        }
        out
    });
    let scheduled_at = read_time(f, "scheduled_at");
    let ending_at = read_time(f, "ending_at");
    Timing { repeats, scheduled_at, ending_at }
}

fn tenant_id(value: &Value) -> Option<String> {
    parse_tenant(value).ok().map(|t| t.id().to_string())
}

/// A reference for the stored actor (an inline actor is identified first).
fn actor_reference(value: &Value) -> Option<Value> {
    parse_recipient(value).ok().map(|r| recipient_reference(r.key()))
}

/// `POST /v1/schedules`: one schedule per recipient, as Knock returns them.
pub async fn create(State(api): State<Arc<Api>>, caller: Caller, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "create", "schedules").await?;
    let mut f = Fields::new(body)?;
    let workflow = f.required_string("workflow", super::MAX_ID_CHARS);
    let recipients = f.array("recipients").unwrap_or_default();
    if recipients.is_empty() && !f.has_errors() {
        f.error("/recipients", "must list at least one recipient");
    }
    if recipients.len() > MAX_PER_REQUEST {
        f.error("/recipients", format!("{} recipients listed; at most {MAX_PER_REQUEST} per request", recipients.len()));
    }
    read_recipients(&mut f, "recipients", &recipients);
    let (actor, tenant) = read_actor_and_tenant(&mut f);
    let data = f.object("data");
    let timing = read_timing(&mut f);
    if timing.repeats.as_ref().is_none_or(Vec::is_empty) && timing.scheduled_at.as_ref().is_none_or(Option::is_none) && !f.has_errors() {
        f.error("/repeats", "a schedule needs repeats, scheduled_at, or both");
    }
    f.deny_unknown(" (a schedule takes workflow, recipients, repeats, scheduled_at, ending_at, data, actor and tenant)");
    f.finish()?;
    let workflow = workflow.unwrap_or_default();
    api.caches_ready().await?;
    if find_by_key(&api.ctx, &caller.namespace, &workflow).is_none() {
        return Err(ApiError::WorkflowMissing(workflow));
    }
    // Inline recipients, actor and tenant are identified first, as triggers do.
    let inline = TriggerRunSpec { workflow: workflow.clone(), recipients: recipients.clone(), actor: actor.clone(), tenant: tenant.clone(), ..Default::default() };
    authorize_inline(&api, &caller, &inline).await?;
    identify_inline(&api, &caller.namespace, &inline).await?;

    let schedules = api.kube::<Schedule>(&caller.namespace);
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let mut out = Vec::new();
    for recipient in &recipients {
        let Ok(parsed) = parse_recipient(recipient) else { continue };
        let spec = ScheduleSpec {
            workflow: workflow.clone(),
            recipients: vec![recipient_reference(parsed.key())],
            actor: actor.as_ref().and_then(actor_reference),
            tenant: tenant.as_ref().and_then(tenant_id),
            data: data.clone(),
            scheduled_at: timing.scheduled_at.clone().flatten(),
            repeats: timing.repeats.clone().unwrap_or_default(),
            ending_at: timing.ending_at.clone().flatten(),
            catch_up_seconds: None,
        };
        check(&spec, Timestamp::now()).map_err(|e| ApiError::invalid("/", e))?;
        let mut schedule = Schedule::new(&generated_name(&workflow), spec);
        schedule.metadata.labels =
            Some(BTreeMap::from([(CREATED_BY_LABEL.to_string(), "herald-api".to_string()), (WORKFLOW_LABEL.to_string(), crate::core::ids::label_value(&workflow))]));
        schedule.metadata.annotations = Some(BTreeMap::from([(CALLER_ANNOTATION.to_string(), caller.name()), (INSERTED_AT_ANNOTATION.to_string(), Timestamp::now().to_string())]));
        let created = schedules.create(&pp, &schedule).await?;
        api.ctx.metrics.write("Schedule");
        let entry = entries_of(&created).into_iter().next().ok_or_else(|| ApiError::Internal("the stored Schedule has no recipient".into()))?;
        out.push(schedule_json(&api, &caller.namespace, &entry));
    }
    tracing::info!(workflow = %workflow, count = out.len(), caller = %caller.name(), "schedules created");
    Ok(Json(Value::Array(out)))
}

/// The entries named by `schedule_ids` (every id must exist).
async fn named_entries(api: &Api, namespace: &str, f: &mut Fields) -> Result<Vec<Entry>, ApiError> {
    let ids: Vec<String> = match f.array("schedule_ids") {
        None => {
            f.error("/schedule_ids", "is required");
            Vec::new()
        }
        Some(ids) => ids
            .into_iter()
            .enumerate()
            .filter_map(|(i, id)| match id {
                Value::String(s) => Some(s),
                other => {
                    f.error(format!("/schedule_ids/{i}"), format!("must be a string, got {}", super::type_name(&other)));
                    None
                }
            })
            .collect(),
    };
    if ids.is_empty() && !f.has_errors() {
        f.error("/schedule_ids", "must list at least one schedule id");
    }
    if ids.len() > MAX_PER_REQUEST {
        f.error("/schedule_ids", format!("{} ids listed; at most {MAX_PER_REQUEST} per request", ids.len()));
    }
    let all = all_entries(api, namespace).await?;
    let mut found = Vec::new();
    for id in ids {
        match all.iter().find(|e| e.id == id) {
            Some(e) => found.push(Entry { schedule: e.schedule.clone(), key: e.key.clone(), id: e.id.clone() }),
            None => return Err(ApiError::not_found("resource_missing", format!("schedule `{id}` not found"))),
        }
    }
    Ok(found)
}

/// Replaces a Schedule on the resourceVersion read (one retry on a conflict after re-reading).
async fn replace(api: &Api, namespace: &str, name: &str, change: impl Fn(&mut Schedule)) -> Result<Schedule, ApiError> {
    let schedules = api.kube::<Schedule>(namespace);
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    for _ in 0..3 {
        let mut current = schedules.get(name).await?;
        change(&mut current);
        match schedules.replace(name, &pp, &current).await {
            Ok(stored) => {
                api.ctx.metrics.write("Schedule");
                return Ok(stored);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!("Schedule `{name}` kept changing; retry")))
}

/// `PUT /v1/schedules`: the same values for every id.
pub async fn update(State(api): State<Arc<Api>>, caller: Caller, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "schedules").await?;
    let mut f = Fields::new(body)?;
    let entries = named_entries(&api, &caller.namespace, &mut f).await?;
    let (actor, tenant) = read_actor_and_tenant(&mut f);
    let data = f.object("data");
    let timing = read_timing(&mut f);
    f.deny_unknown(" (an update takes schedule_ids, repeats, scheduled_at, ending_at, data, actor and tenant)");
    for (i, e) in entries.iter().enumerate() {
        if e.schedule.spec.recipients.len() > 1 {
            f.error(format!("/schedule_ids/{i}"), format!("belongs to Schedule `{}`, which has several recipients: edit that resource instead", e.schedule.name_any()));
        }
    }
    f.finish()?;
    let inline = TriggerRunSpec { actor: actor.clone(), tenant: tenant.clone(), ..Default::default() };
    authorize_inline(&api, &caller, &inline).await?;
    identify_inline(&api, &caller.namespace, &inline).await?;
    let mut out = Vec::new();
    for entry in entries {
        let stored = replace(&api, &caller.namespace, &entry.schedule.name_any(), |s| {
            if let Some(repeats) = &timing.repeats {
                s.spec.repeats = repeats.clone();
            }
            if let Some(at) = &timing.scheduled_at {
                s.spec.scheduled_at = at.clone();
            }
            if let Some(at) = &timing.ending_at {
                s.spec.ending_at = at.clone();
            }
            if let Some(data) = &data {
                s.spec.data = Some(data.clone());
            }
            if let Some(actor) = &actor {
                s.spec.actor = actor_reference(actor);
            }
            if let Some(tenant) = &tenant {
                s.spec.tenant = tenant_id(tenant);
            }
        })
        .await?;
        check(&stored.spec, Timestamp::now()).map_err(|e| ApiError::invalid("/", e))?;
        out.push(schedule_json(&api, &caller.namespace, &Entry { schedule: stored, ..entry }));
    }
    Ok(Json(Value::Array(out)))
}

/// `DELETE /v1/schedules`: the schedules as they were.
pub async fn delete(State(api): State<Arc<Api>>, caller: Caller, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "delete", "schedules").await?;
    let mut f = Fields::new(body)?;
    let entries = named_entries(&api, &caller.namespace, &mut f).await?;
    f.deny_unknown(" (a delete takes schedule_ids)");
    f.finish()?;
    let schedules = api.kube::<Schedule>(&caller.namespace);
    let mut out = Vec::new();
    for entry in entries {
        out.push(schedule_json(&api, &caller.namespace, &entry));
        let name = entry.schedule.name_any();
        let reference = recipient_reference(&entry.key);
        if entry.schedule.spec.recipients.len() <= 1 {
            match schedules.delete(&name, &Default::default()).await {
                Ok(_) => api.ctx.metrics.write("Schedule"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        } else {
            let key = entry.key.clone();
            replace(&api, &caller.namespace, &name, |s| s.spec.recipients.retain(|r| parse_recipient(r).map(|p| p.key() != &key).unwrap_or(true))).await?;
            tracing::debug!(schedule = %name, recipient = %reference, "recipient removed from a Schedule");
        }
    }
    Ok(Json(Value::Array(out)))
}

/// Filters and paging of the list routes.
#[derive(Default)]
struct Query {
    workflow: Option<String>,
    tenant: Option<String>,
    recipients: Vec<RecipientKey>,
    after: Option<String>,
    before: Option<String>,
    page_size: usize,
}

fn read_query(raw: Option<&str>, workflow_required: bool) -> Result<Query, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default()).map_err(|e| ApiError::invalid("query", e.to_string()))?;
    let mut q = Query { page_size: 50, ..Default::default() };
    let mut errors = Vec::new();
    for (key, value) in pairs {
        match key.as_str() {
            "workflow" => q.workflow = Some(value),
            "tenant" => q.tenant = Some(value),
            "after" => q.after = Some(value),
            "before" => q.before = Some(value),
            "page_size" => match value.parse::<usize>() {
                Ok(n) if (1..=50).contains(&n) => q.page_size = n,
                _ => errors.push(super::errors::FieldError::new("page_size", "must be 1 to 50")),
            },
            "recipients[]" | "recipients" => q.recipients.push(RecipientKey::user(value)),
            k if k.starts_with("recipients[") => {
                // Object references as the SDK encodes them: recipients[0][id]=..&recipients[0][collection]=..
                let field = k.rsplit('[').next().unwrap_or_default().trim_end_matches(']');
                let index = k.trim_start_matches("recipients[").split(']').next().unwrap_or_default().to_string();
                q.recipients.push(match field {
                    "collection" => RecipientKey::object(value, format!("\u{0}{index}")),
                    _ => RecipientKey::object(format!("\u{0}{index}"), value),
                });
            }
            _ => errors.push(super::errors::FieldError::new(key.clone(), "unknown query parameter")),
        }
    }
    // Pair up the halves of object references read above.
    let mut halves: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    q.recipients.retain(|k| match k {
        RecipientKey::Object { collection, id } if collection.starts_with('\u{0}') => {
            halves.entry(collection.clone()).or_default().1 = Some(id.clone());
            false
        }
        RecipientKey::Object { collection, id } if id.starts_with('\u{0}') => {
            halves.entry(id.clone()).or_default().0 = Some(collection.clone());
            false
        }
        _ => true,
    });
    for (_, pair) in halves {
        match pair {
            (Some(collection), Some(id)) => q.recipients.push(RecipientKey::object(collection, id)),
            (None, Some(id)) => q.recipients.push(RecipientKey::user(id)),
            _ => errors.push(super::errors::FieldError::new("recipients", "an object reference needs id and collection")),
        }
    }
    if workflow_required && q.workflow.is_none() {
        errors.push(super::errors::FieldError::new("workflow", "is required"));
    }
    if errors.is_empty() {
        Ok(q)
    } else {
        Err(ApiError::invalid_all(errors))
    }
}

async fn list_page(api: &Api, namespace: &str, q: Query) -> Result<Json<Value>, ApiError> {
    api.caches_ready().await?;
    let mut entries: Vec<Entry> = all_entries(api, namespace)
        .await?
        .into_iter()
        .filter(|e| q.workflow.as_ref().is_none_or(|w| *w == e.schedule.spec.workflow))
        .filter(|e| q.tenant.as_ref().is_none_or(|t| Some(t) == e.schedule.spec.tenant.as_ref()))
        .filter(|e| q.recipients.is_empty() || q.recipients.contains(&e.key))
        .collect();
    // Newest first, as Knock lists them; the id breaks ties.
    entries.sort_by(|a, b| inserted_at(&b.schedule).cmp(&inserted_at(&a.schedule)).then(a.id.cmp(&b.id)));
    let position = |cursor: &str| entries.iter().position(|e| e.id == cursor).ok_or_else(|| ApiError::invalid("after", "unknown cursor"));
    let (start, end) = match (&q.after, &q.before) {
        (Some(after), _) => {
            let start = position(after)? + 1;
            (start, (start + q.page_size).min(entries.len()))
        }
        (None, Some(before)) => {
            let end = position(before)?;
            (end.saturating_sub(q.page_size), end)
        }
        (None, None) => (0, q.page_size.min(entries.len())),
    };
    let page: Vec<Value> = entries[start..end].iter().map(|e| schedule_json(api, namespace, e)).collect();
    let after = (end < entries.len()).then(|| entries[end - 1].id.clone()).filter(|_| end > start);
    let before = (start > 0).then(|| entries.get(start).map(|e| e.id.clone())).flatten();
    Ok(Json(json!({"entries": page, "page_info": {"__typename": "PageInfo", "after": after, "before": before, "page_size": q.page_size}})))
}

/// `GET /v1/schedules?workflow=…`: `{entries, page_info}`, newest first.
pub async fn list(State(api): State<Arc<Api>>, caller: Caller, RawQuery(query): RawQuery) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "schedules").await?;
    let q = read_query(query.as_deref(), true)?;
    list_page(&api, &caller.namespace, q).await
}

/// `GET /v1/users/{user_id}/schedules`: the user's schedules, `{entries, page_info}`.
pub async fn for_user(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>, RawQuery(query): RawQuery) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "schedules").await?;
    check_ids(&[("user_id", &id)])?;
    let mut q = read_query(query.as_deref(), false)?;
    if !q.recipients.is_empty() {
        return Err(ApiError::invalid("recipients", "not a parameter of a user's schedules"));
    }
    q.recipients = vec![RecipientKey::user(id)];
    list_page(&api, &caller.namespace, q).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_as_the_sdk_encodes_them() {
        let q = read_query(Some("workflow=w&recipients[0][id]=p1&recipients[0][collection]=projects&recipients[]=u1&page_size=2&after=x"), true).unwrap();
        assert_eq!(q.workflow.as_deref(), Some("w"));
        assert_eq!(q.page_size, 2);
        assert_eq!(q.after.as_deref(), Some("x"));
        assert!(q.recipients.contains(&RecipientKey::user("u1")) && q.recipients.contains(&RecipientKey::object("projects", "p1")), "{:?}", q.recipients);
        assert!(read_query(Some("page_size=2"), true).is_err());
        assert!(read_query(Some("workflow=w&page_size=99"), true).is_err());
        assert!(read_query(Some("workflow=w&colour=red"), true).is_err());
    }

    #[test]
    fn rules_echo_every_field() {
        let rule: RepeatRule = serde_json::from_value(json!({"frequency": "weekly", "days": "weekdays", "hours": 9})).unwrap();
        assert_eq!(
            rule_json(&rule),
            json!({"__typename": "ScheduleRepeat", "frequency": "weekly", "interval": 1, "days": ["mon", "tue", "wed", "thu", "fri"], "day_of_month": null, "hours": 9, "minutes": null})
        );
    }
}
