//! Knock's Messages API, read from the history store: `GET /v1/messages`,
//! `GET /v1/messages/{id}`, `GET /v1/users/{id}/messages` and
//! `GET /v1/objects/{collection}/{id}/messages`.
//!
//! Lists are newest first, `page_size` at a time (1 to 50, default 50), from
//! the `after` cursor on or just before the `before` cursor, with Knock's
//! `{items, page_info: {after, before, page_size}}` (`items`, not `entries`:
//! Knock's SDKs read message lists as items cursors). Filters: `source` or
//! `workflow` (a workflow key), `tenant`, `channel_id` (a Channel's name),
//! `status` (one or more of Knock's delivery statuses, `status[]=` repeats),
//! `message_ids[]`, `workflow_run_id`, `workflow_recipient_run_id`, and
//! `inserted_at.gt` / `.gte` / `.lt` / `.lte` (RFC 3339; Knock's SDKs send
//! them as `inserted_at[gt]` and so on, which reads the same).
//!
//! Reading needs `get` on `triggerruns` for Kubernetes tokens (messages are
//! what runs sent). Without a history store the routes answer 404
//! `history_store_disabled`; with the store down, 503 with Retry-After.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::Json;
use jiff::Timestamp;
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::Caller;
use super::errors::{ApiError, FieldError};
use super::{check_ids, Api, Params};
use crate::core::history::{Cursor, MessageRecord, MessageStatus};
use crate::core::model::RecipientKey;
use crate::store::messages::{self, MessageFilter, Start};
use crate::store::Store;

/// Entries per answer: Knock's default and maximum.
pub const PAGE_SIZE: usize = 50;

/// The store, or why there is none.
pub fn store(api: &Api) -> Result<&Store, ApiError> {
    api.ctx
        .history
        .as_ref()
        .map(|h| &h.store)
        .ok_or_else(|| ApiError::NotFound { code: "history_store_disabled", message: "this herald keeps no history: start it with --database-url".into() })
}

/// `GET /v1/messages`.
pub async fn list(State(api): State<Arc<Api>>, caller: Caller, RawQuery(query): RawQuery) -> Result<Json<Value>, ApiError> {
    list_for(&api, &caller, query, None).await
}

/// `GET /v1/users/{user_id}/messages`.
pub async fn for_user(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>, RawQuery(query): RawQuery) -> Result<Json<Value>, ApiError> {
    check_ids(&[("user_id", &id)])?;
    list_for(&api, &caller, query, Some(RecipientKey::User(id))).await
}

/// `GET /v1/objects/{collection}/{id}/messages`.
pub async fn for_object(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Params((collection, id)): Params<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    check_ids(&[("collection", &collection), ("id", &id)])?;
    list_for(&api, &caller, query, Some(RecipientKey::object(collection, id))).await
}

/// `GET /v1/messages/{message_id}`.
pub async fn get(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "triggerruns").await?;
    let store = store(&api)?;
    let message_id = Uuid::parse_str(&id).map_err(|_| ApiError::invalid("message_id", "must be a UUID"))?;
    let message = messages::get(store, &caller.namespace, message_id).await?;
    let message = message.ok_or_else(|| ApiError::NotFound { code: "resource_missing", message: format!("no message `{id}`") })?;
    Ok(Json(message_json(&message)))
}

async fn list_for(api: &Api, caller: &Caller, query: Option<String>, recipient: Option<RecipientKey>) -> Result<Json<Value>, ApiError> {
    api.allow(caller, "get", "triggerruns").await?;
    let store = store(api)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or_default()).map_err(|e| ApiError::invalid("query", e.to_string()))?;
    let request = read_query(&caller.namespace, &pairs)?;
    let filter = MessageFilter { recipient, ..request.filter };
    let page = messages::list(store, &filter, request.start, request.size).await?;
    Ok(Json(json!({
        "items": page.messages.iter().map(message_json).collect::<Vec<_>>(),
        "page_info": {
            "__typename": "PageInfo",
            "after": page.after.map(|c| c.encode()),
            "before": page.before.map(|c| c.encode()),
            "page_size": request.size,
        },
    })))
}

/// A list request, read from its query.
#[derive(Debug)]
struct ListRequest {
    filter: MessageFilter,
    start: Start,
    size: usize,
}

fn read_query(namespace: &str, pairs: &[(String, String)]) -> Result<ListRequest, ApiError> {
    let mut filter = MessageFilter { namespace: namespace.to_string(), ..Default::default() };
    let (mut size, mut start) = (PAGE_SIZE, Start::Newest);
    let mut errors = Vec::new();
    let mut error = |field: &str, message: &str| errors.push(FieldError { field: field.to_string(), message: message.to_string() });
    let cursor = |text: &str| Cursor::decode(text);
    let time = |text: &str| text.parse::<Timestamp>().ok();
    let uuid = |text: &str| Uuid::parse_str(text).ok();
    for (name, value) in pairs {
        match name.as_str() {
            "page_size" => match value.parse::<usize>() {
                Ok(n) if (1..=PAGE_SIZE).contains(&n) => size = n,
                _ => error(name, &format!("must be a whole number from 1 to {PAGE_SIZE}")),
            },
            "after" => match cursor(value) {
                Some(c) if matches!(start, Start::Newest) => start = Start::After(c),
                Some(_) => error(name, "send `after` or `before`, not both"),
                None => error(name, "is not a cursor this API gave"),
            },
            "before" => match cursor(value) {
                Some(c) if matches!(start, Start::Newest) => start = Start::Before(c),
                Some(_) => error(name, "send `after` or `before`, not both"),
                None => error(name, "is not a cursor this API gave"),
            },
            "source" | "workflow" => filter.workflow = Some(value.clone()),
            "tenant" => filter.tenant = Some(value.clone()),
            "channel_id" => filter.channel = Some(value.clone()),
            "status" | "status[]" => {
                if MessageStatus::KNOCK.contains(&value.as_str()) {
                    filter.statuses.push(value.clone());
                } else {
                    error(name, &format!("must be one of {}", MessageStatus::KNOCK.join(", ")));
                }
            }
            "message_ids" | "message_ids[]" => match uuid(value) {
                Some(id) => filter.message_ids.push(id),
                None => error(name, "must be message ids (UUIDs)"),
            },
            "workflow_run_id" => match uuid(value) {
                Some(id) => filter.workflow_run_id = Some(id),
                None => error(name, "must be a UUID"),
            },
            "workflow_recipient_run_id" => match uuid(value) {
                Some(id) => filter.recipient_run_id = Some(id),
                None => error(name, "must be a UUID"),
            },
            // `inserted_at.gt` as Knock documents it, `inserted_at[gt]` as its SDKs send it.
            _ if inserted_at_bound(name).is_some() => match time(value) {
                // Stored times have microseconds: gte t is gt t - 1 µs, lte t is lt t + 1 µs.
                Some(t) => {
                    let micro = jiff::SignedDuration::from_micros(1);
                    match inserted_at_bound(name) {
                        Some("gt") => filter.inserted_after = Some(t),
                        Some("gte") => filter.inserted_after = t.checked_sub(micro).ok(),
                        Some("lt") => filter.inserted_before = Some(t),
                        _ => filter.inserted_before = t.checked_add(micro).ok(),
                    }
                }
                None => error(name, "must be an RFC 3339 time"),
            },
            // Knock's filters herald has nothing to match against yet: refused, not ignored.
            "engagement_status" | "engagement_status[]" | "trigger_data" | "workflow_categories" | "workflow_categories[]" => {
                error(name, "is not supported by herald's history store yet")
            }
            _ => error(name, "is not a filter of this list"),
        }
    }
    if errors.is_empty() {
        Ok(ListRequest { filter, start, size })
    } else {
        Err(ApiError::invalid_all(errors))
    }
}

/// The bound an `inserted_at` parameter names (`gt`, `gte`, `lt`, `lte`), in
/// either spelling: `inserted_at.gt` or `inserted_at[gt]`.
fn inserted_at_bound(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("inserted_at")?;
    let bound = rest.strip_prefix('.').or_else(|| rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')))?;
    ["gt", "gte", "lt", "lte"].contains(&bound).then_some(bound)
}

fn reference(key: &RecipientKey) -> Value {
    match key {
        RecipientKey::User(id) => json!(id),
        RecipientKey::Object { collection, id } => json!({"id": id, "collection": collection}),
    }
}

/// An RFC 3339 time, or null.
pub fn time(t: Option<Timestamp>) -> Value {
    t.map_or(Value::Null, |t| json!(t.to_string()))
}

/// A message in Knock's shape, with herald's detail (`reason`, `attempts`, `content`) beside it.
pub fn message_json(m: &MessageRecord) -> Value {
    json!({
        "__typename": "Message",
        "__cursor": Cursor { inserted_at: m.inserted_at, id: m.id }.encode(),
        "id": m.id,
        "channel_id": m.channel,
        "channel": {"id": m.channel, "key": m.channel, "type": m.channel_type},
        "recipient": reference(&m.recipient),
        "actors": m.actor.iter().map(reference).collect::<Vec<_>>(),
        "workflow": m.workflow,
        "tenant": m.tenant,
        "status": m.status.as_str(),
        "engagement_statuses": m.engagement.statuses(),
        "seen_at": time(m.engagement.seen_at),
        "read_at": time(m.engagement.read_at),
        "archived_at": time(m.engagement.archived_at),
        "interacted_at": time(m.engagement.interacted_at),
        "clicked_at": time(m.engagement.clicked_at),
        "link_clicked_at": time(m.engagement.link_clicked_at),
        "inserted_at": m.inserted_at.to_string(),
        "updated_at": m.updated_at.to_string(),
        "source": {
            "__typename": "NotificationSource",
            "type": "workflow",
            "key": m.workflow,
            "version_id": null,
            "categories": m.categories,
            "step_ref": m.step_ref,
            "workflow_run_id": m.workflow_run_id,
            "workflow_recipient_run_id": m.recipient_run_id,
        },
        "data": m.data,
        "metadata": {
            "workflow_run_id": m.workflow_run_id,
            "workflow_recipient_run_id": m.recipient_run_id,
            "step_ref": m.step_ref,
        },
        "reason": m.reason,
        "attempts": m.attempts.iter().map(|a| json!({"attempt": a.attempt, "time": a.time, "status_code": a.status_code, "error": a.error})).collect::<Vec<_>>(),
        "content": m.content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<ListRequest, ApiError> {
        read_query("ns", &pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>())
    }

    #[test]
    fn queries_read_every_filter_and_refuse_the_rest() {
        let run = Uuid::new_v4();
        let r =
            q(&[("page_size", "10"), ("source", "welcome"), ("status[]", "sent"), ("status[]", "not_sent"), ("workflow_run_id", &run.to_string()), ("tenant", "acme")]).unwrap();
        assert_eq!(r.size, 10);
        assert_eq!(r.filter.workflow.as_deref(), Some("welcome"));
        assert_eq!(r.filter.statuses, vec!["sent", "not_sent"]);
        assert_eq!(r.filter.workflow_run_id, Some(run));
        assert_eq!(r.filter.tenant.as_deref(), Some("acme"));
        let r = q(&[("inserted_at.gte", "2026-01-01T00:00:00Z"), ("inserted_at.lt", "2026-02-01T00:00:00Z")]).unwrap();
        assert_eq!(r.filter.inserted_after.unwrap().to_string(), "2025-12-31T23:59:59.999999Z");
        assert_eq!(r.filter.inserted_before.unwrap().to_string(), "2026-02-01T00:00:00Z");
        let bad_params = [
            ("page_size", "0"),
            ("page_size", "51"),
            ("status", "lost"),
            ("after", "nope"),
            ("workflow_run_id", "x"),
            ("inserted_at.gt", "yesterday"),
            ("inserted_at[gt]", "yesterday"),
            ("inserted_at[since]", "2026-01-01T00:00:00Z"),
            ("inserted_at.gt]", "2026-01-01T00:00:00Z"),
            ("inserted_at", "2026-01-01T00:00:00Z"),
            ("color", "red"),
        ];
        for bad in bad_params {
            let Err(ApiError::InvalidParams { errors, .. }) = q(&[bad]) else { panic!("{bad:?} was accepted") };
            assert_eq!(errors[0].field, bad.0);
        }
        let c = Cursor { inserted_at: Timestamp::now(), id: Uuid::new_v4() }.encode();
        assert!(q(&[("after", &c), ("before", &c)]).is_err(), "after and before together");
    }

    /// What Knock's Node SDK sends for `{status: ["sent", "undelivered"], inserted_at: {gte, lt}}`
    /// (its stringifyQuery: primitive arrays as `status[]=`, objects as `inserted_at[gte]=`).
    #[test]
    fn queries_read_the_sdks_encoding() {
        let query = "page_size=1&status%5B%5D=sent&status%5B%5D=undelivered&inserted_at%5Bgte%5D=2026-01-01T00%3A00%3A00Z&inserted_at%5Blt%5D=2026-02-01T00%3A00%3A00Z";
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
        let r = read_query("ns", &pairs).unwrap();
        assert_eq!(r.size, 1);
        assert_eq!(r.filter.statuses, vec!["sent", "undelivered"]);
        assert_eq!(r.filter.inserted_after.unwrap().to_string(), "2025-12-31T23:59:59.999999Z");
        assert_eq!(r.filter.inserted_before.unwrap().to_string(), "2026-02-01T00:00:00Z");
        let r = q(&[("inserted_at[gt]", "2026-01-01T00:00:00Z"), ("inserted_at[lte]", "2026-02-01T00:00:00Z")]).unwrap();
        assert_eq!(r.filter.inserted_after.unwrap().to_string(), "2026-01-01T00:00:00Z");
        assert_eq!(r.filter.inserted_before.unwrap().to_string(), "2026-02-01T00:00:00.000001Z");
    }
}
