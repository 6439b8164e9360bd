//! Knock's in-app feed API, read from the history store, in the shapes
//! `@knocklabs/client` and `@knocklabs/react` read:
//!
//! * `GET /v1/users/{user_id}/feeds/{channel_id}` — a user's feed of one
//!   `in_app_feed` Channel (named by its name or its uid), newest first, with
//!   `meta` counts (every filter but `status`) and cursors;
//! * `GET /v1/users/{user_id}/feeds/{channel_id}/settings`;
//! * engagement: `PUT`/`DELETE /v1/messages/{id}/{seen|read|archived|interacted}`,
//!   `POST /v1/messages/batch/{action}`, and mark-all
//!   `POST /v1/channels/{channel_id}/messages/bulk/{action}`.
//!
//! Reading a feed needs `get` on `users`, engagement `update` on `users`
//! (Kubernetes tokens); a user's own token may act only for that user, and
//! on that user's messages only.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::Json;
use jiff::Timestamp;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::auth::Caller;
use super::errors::{ApiError, FieldError};
use super::messages::{message_json, store, time};
use super::{check_ids, Api, JsonBody, Params};
use crate::core::history::{Cursor, EngagementAction, MessageRecord};
use crate::core::model::RecipientKey;
use crate::resources::channel::ChannelType;
use crate::store::feed::{self as feed_store, Archived, FeedFilter, ReadStatus};
use crate::store::messages::Start;

/// Entries per answer: Knock's default; also the most.
pub const PAGE_SIZE: usize = 50;
/// Messages one batch or bulk call may change at once (ids in a batch).
pub const MAX_BATCH: usize = 1000;

/// The Channel a feed route names: its name, or its uid (Knock's feed ids are UUIDs).
pub fn resolve_channel(api: &Api, namespace: &str, channel_id: &str) -> Result<String, ApiError> {
    let channels = &api.ctx.stores.channels;
    let found =
        channels.get(namespace, channel_id).or_else(|| channels.find(|c| c.metadata.namespace.as_deref() == Some(namespace) && c.metadata.uid.as_deref() == Some(channel_id)));
    match found {
        Some(c) if c.spec.channel_type == ChannelType::InAppFeed => Ok(c.metadata.name.clone().unwrap_or_default()),
        Some(_) => Err(ApiError::invalid("channel_id", "is not an in_app_feed Channel")),
        None => Err(ApiError::not_found("resource_missing", format!("no in_app_feed Channel `{channel_id}`"))),
    }
}

/// `GET /v1/users/{user_id}/feeds/{channel_id}`.
pub async fn get(State(api): State<Arc<Api>>, caller: Caller, Params((user_id, channel_id)): Params<(String, String)>, RawQuery(query): RawQuery) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "users").await?;
    check_ids(&[("user_id", &user_id), ("channel_id", &channel_id)])?;
    caller.acts_for_user(&user_id)?;
    let store = store(&api)?;
    let channel = resolve_channel(&api, &caller.namespace, &channel_id)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or_default()).map_err(|e| ApiError::invalid("query", e.to_string()))?;
    let request = read_query(FeedFilter { namespace: caller.namespace.clone(), channel, user: user_id, ..Default::default() }, &pairs)?;
    let page = feed_store::list(store, &request.filter, request.start, request.size).await?;
    let counts = feed_store::counts(store, &request.filter).await?;
    let entries: Vec<Value> = page.messages.iter().map(|m| feed_item(&api, m, request.compact)).collect();
    Ok(Json(json!({
        "entries": entries,
        "meta": {"__typename": "FeedMetadata", "total_count": counts.total, "unread_count": counts.unread, "unseen_count": counts.unseen},
        "page_info": {"__typename": "PageInfo", "after": page.after.map(|c| c.encode()), "before": page.before.map(|c| c.encode()), "page_size": request.size},
        "vars": {},
    })))
}

/// `GET /v1/users/{user_id}/feeds/{channel_id}/settings`: herald shows no branding.
pub async fn settings(State(api): State<Arc<Api>>, caller: Caller, Params((user_id, channel_id)): Params<(String, String)>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "users").await?;
    check_ids(&[("user_id", &user_id), ("channel_id", &channel_id)])?;
    caller.acts_for_user(&user_id)?;
    resolve_channel(&api, &caller.namespace, &channel_id)?;
    Ok(Json(json!({"features": {"branding_required": false}})))
}

/// A feed read from its query.
#[derive(Debug)]
struct FeedRequest {
    filter: FeedFilter,
    start: Start,
    size: usize,
    compact: bool,
}

fn read_query(mut filter: FeedFilter, pairs: &[(String, String)]) -> Result<FeedRequest, ApiError> {
    let (mut size, mut start, mut compact) = (PAGE_SIZE, Start::Newest, false);
    let mut errors = Vec::new();
    let mut error = |field: &str, message: &str| errors.push(FieldError { field: field.to_string(), message: message.to_string() });
    for (name, value) in pairs {
        // The client drops nulls but may send empty values; an empty filter is no filter.
        if value.is_empty() {
            continue;
        }
        match name.as_str() {
            "page_size" => match value.parse::<usize>() {
                Ok(n) if (1..=PAGE_SIZE).contains(&n) => size = n,
                _ => error(name, &format!("must be a whole number from 1 to {PAGE_SIZE}")),
            },
            "after" | "before" => match (Cursor::decode(value), matches!(start, Start::Newest)) {
                (Some(c), true) => start = if name == "after" { Start::After(c) } else { Start::Before(c) },
                (Some(_), false) => error(name, "send `after` or `before`, not both"),
                (None, _) => error(name, "is not a cursor this API gave"),
            },
            "status" => match value.as_str() {
                "all" => filter.status = ReadStatus::All,
                "unread" => filter.status = ReadStatus::Unread,
                "read" => filter.status = ReadStatus::Read,
                "unseen" => filter.status = ReadStatus::Unseen,
                "seen" => filter.status = ReadStatus::Seen,
                _ => error(name, "must be one of all, unread, read, unseen, seen"),
            },
            "archived" => match value.as_str() {
                "exclude" => filter.archived = Archived::Exclude,
                "include" => filter.archived = Archived::Include,
                "only" => filter.archived = Archived::Only,
                _ => error(name, "must be one of exclude, include, only"),
            },
            "source" => filter.source = Some(value.clone()),
            "tenant" => filter.tenant = Some(value.clone()),
            "has_tenant" => match value.as_str() {
                "true" => filter.has_tenant = true,
                "false" => filter.has_tenant = false,
                _ => error(name, "must be true or false"),
            },
            "workflow_categories[]" | "workflow_categories" => filter.categories.push(value.clone()),
            "trigger_data" => match serde_json::from_str::<Map<String, Value>>(value) {
                Ok(pairs) if pairs.values().all(|v| !v.is_object() && !v.is_array()) => filter.trigger_data = pairs.into_iter().collect(),
                _ => error(name, "must be a JSON object of flat values"),
            },
            "inserted_at.gt" | "inserted_at.gte" | "inserted_at.lt" | "inserted_at.lte" | "inserted_at[gt]" | "inserted_at[gte]" | "inserted_at[lt]" | "inserted_at[lte]" => {
                match value.parse::<Timestamp>() {
                    Ok(t) => {
                        let micro = jiff::SignedDuration::from_micros(1);
                        match name.trim_start_matches("inserted_at").trim_matches(['.', '[', ']']) {
                            "gt" => filter.inserted_after = Some(t),
                            "gte" => filter.inserted_after = t.checked_sub(micro).ok(),
                            "lt" => filter.inserted_before = Some(t),
                            _ => filter.inserted_before = t.checked_add(micro).ok(),
                        }
                    }
                    Err(_) => error(name, "must be an RFC 3339 time"),
                }
            }
            "mode" => match value.as_str() {
                "compact" => compact = true,
                "rich" => compact = false,
                _ => error(name, "must be compact or rich"),
            },
            // Accepted and not applied: herald has no translations or field trimming.
            "locale" | "exclude" => {}
            _ => error(name, "is not a filter of the feed"),
        }
    }
    if errors.is_empty() {
        Ok(FeedRequest { filter, start, size, compact })
    } else {
        Err(ApiError::invalid_all(errors))
    }
}

/// An actor as feed items show it: the user's properties when herald knows the user.
fn actor_json(api: &Api, namespace: &str, key: &RecipientKey) -> Value {
    match key {
        RecipientKey::User(id) => match crate::controller::directory::user(&api.ctx.stores, namespace, id) {
            Some(user) => {
                let field = |key: &str| user.properties.get(key).cloned().unwrap_or(Value::Null);
                json!({"__typename": "User", "id": id, "name": field("name"), "email": field("email"), "avatar": field("avatar"),
                       "phone_number": field("phone_number"), "timezone": field("timezone"), "created_at": null, "updated_at": null})
            }
            None => {
                json!({"__typename": "User", "id": id, "name": null, "email": null, "avatar": null, "phone_number": null, "timezone": null, "created_at": null, "updated_at": null})
            }
        },
        RecipientKey::Object { collection, id } => json!({"__typename": "Object", "id": id, "collection": collection}),
    }
}

/// A feed item in Knock's shape. Compact mode (what the SDK asks for) keeps
/// only scalar `data` values.
fn feed_item(api: &Api, m: &MessageRecord, compact: bool) -> Value {
    let data = match (&m.data, compact) {
        (Value::Object(map), true) => Value::Object(map.iter().filter(|(_, v)| !v.is_object() && !v.is_array()).map(|(k, v)| (k.clone(), v.clone())).collect()),
        (data, _) => data.clone(),
    };
    let blocks = m.content.as_ref().and_then(|c| c.get("blocks")).cloned().unwrap_or_else(|| json!([]));
    let actors: Vec<Value> = m.actor.iter().map(|a| actor_json(api, &m.namespace, a)).collect();
    json!({
        "__typename": "FeedItem",
        "__cursor": Cursor { inserted_at: m.inserted_at, id: m.id }.encode(),
        "id": m.id,
        "inserted_at": m.inserted_at.to_string(),
        "updated_at": m.updated_at.to_string(),
        "read_at": time(m.engagement.read_at),
        "seen_at": time(m.engagement.seen_at),
        "archived_at": time(m.engagement.archived_at),
        "clicked_at": time(m.engagement.clicked_at),
        "interacted_at": time(m.engagement.interacted_at),
        "link_clicked_at": time(m.engagement.link_clicked_at),
        "total_actors": actors.len(),
        "actors": actors,
        "blocks": blocks,
        "data": data,
        "source": {"__typename": "Workflow", "key": m.workflow, "version_id": null, "categories": m.categories},
        "tenant": m.tenant,
    })
}

fn parse_action(segment: &str, set: bool) -> Result<EngagementAction, ApiError> {
    EngagementAction::parse(segment, set).ok_or_else(|| ApiError::not_found("route_not_found", format!("no message status `{segment}` to {}", if set { "set" } else { "remove" })))
}

/// The user a caller's token speaks for (None for server credentials: any user).
fn owner(caller: &Caller) -> Option<String> {
    caller.token_user().map(str::to_string)
}

/// `PUT /v1/messages/{id}/{status}`.
pub async fn set_status(State(api): State<Arc<Api>>, caller: Caller, Params((id, status)): Params<(String, String)>) -> Result<Json<Value>, ApiError> {
    one(&api, &caller, &id, parse_action(&status, true)?).await
}

/// `DELETE /v1/messages/{id}/{status}`.
pub async fn remove_status(State(api): State<Arc<Api>>, caller: Caller, Params((id, status)): Params<(String, String)>) -> Result<Json<Value>, ApiError> {
    one(&api, &caller, &id, parse_action(&status, false)?).await
}

async fn one(api: &Api, caller: &Caller, id: &str, action: EngagementAction) -> Result<Json<Value>, ApiError> {
    api.allow(caller, "update", "users").await?;
    let store = store(api)?;
    let message_id = Uuid::parse_str(id).map_err(|_| ApiError::invalid("message_id", "must be a UUID"))?;
    let changed = feed_store::engage(store, &caller.namespace, &[message_id], owner(caller).as_deref(), action).await?;
    let message = changed.into_iter().next().ok_or_else(|| ApiError::not_found("resource_missing", format!("no message `{id}`")))?;
    Ok(Json(message_json(&message)))
}

/// `POST /v1/messages/batch/{action}` with `{"message_ids": [...]}`.
pub async fn batch(State(api): State<Arc<Api>>, caller: Caller, Params(action): Params<String>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "users").await?;
    let action = parse_action(&action, true)?;
    let store = store(&api)?;
    let ids = body.get("message_ids").and_then(Value::as_array).ok_or_else(|| ApiError::invalid("/message_ids", "is required: a list of message ids"))?;
    if ids.len() > MAX_BATCH {
        return Err(ApiError::invalid("/message_ids", format!("at most {MAX_BATCH} ids")));
    }
    let ids = ids
        .iter()
        .map(|v| v.as_str().and_then(|s| Uuid::parse_str(s).ok()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ApiError::invalid("/message_ids", "must be message ids (UUIDs)"))?;
    let changed = feed_store::engage(store, &caller.namespace, &ids, owner(&caller).as_deref(), action).await?;
    Ok(Json(Value::Array(changed.iter().map(message_json).collect())))
}

/// `POST /v1/channels/{channel_id}/messages/bulk/{action}`: every matching
/// message of the users named (`user_ids`, or `recipient_ids`), at once.
pub async fn bulk(State(api): State<Arc<Api>>, caller: Caller, Params((channel_id, action)): Params<(String, String)>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "users").await?;
    check_ids(&[("channel_id", &channel_id)])?;
    let action = parse_action(&action, true)?;
    let store = store(&api)?;
    let channel = resolve_channel(&api, &caller.namespace, &channel_id)?;
    let users: Vec<String> = ["user_ids", "recipient_ids"]
        .iter()
        .filter_map(|k| body.get(*k).and_then(Value::as_array))
        .flatten()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid("/user_ids", "must be user ids")))
        .collect::<Result<_, _>>()?;
    if users.is_empty() || users.len() > MAX_BATCH {
        return Err(ApiError::invalid("/user_ids", format!("name 1 to {MAX_BATCH} users")));
    }
    for user in &users {
        caller.acts_for_user(user)?;
    }
    // The body's filters, as the feed's query names them.
    let mut pairs = Vec::new();
    if let Some(status) = body.get("engagement_status").and_then(Value::as_str) {
        pairs.push(("status".to_string(), status.to_string()));
    }
    for key in ["archived", "has_tenant"] {
        match body.get(key) {
            Some(Value::String(s)) => pairs.push((key.to_string(), s.clone())),
            Some(Value::Bool(b)) => pairs.push((key.to_string(), b.to_string())),
            _ => {}
        }
    }
    let base = FeedFilter { namespace: caller.namespace.clone(), channel, ..Default::default() };
    let mut filter = read_query(base, &pairs)?.filter;
    if let Some(Value::Array(tenants)) = body.get("tenants") {
        // One tenant is what the client sends; several are not supported by the filter.
        match tenants.as_slice() {
            [] => {}
            [Value::String(t)] => filter.tenant = Some(t.clone()),
            _ => return Err(ApiError::invalid("/tenants", "name at most one tenant")),
        }
    }
    let started = Timestamp::now();
    let changed = feed_store::engage_all(store, &filter, &users, action).await?;
    let now = Timestamp::now().to_string();
    Ok(Json(json!({
        "__typename": "BulkOperation", "id": Uuid::new_v4(), "name": format!("channel.messages.bulk.{action:?}").to_lowercase(),
        "status": "completed", "estimated_total_rows": changed, "processed_rows": changed, "success_count": changed, "error_count": 0, "error_items": [],
        "progress_path": null, "started_at": started.to_string(), "completed_at": now, "failed_at": null, "inserted_at": started.to_string(), "updated_at": now,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<FeedRequest, ApiError> {
        read_query(FeedFilter::default(), &pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>())
    }

    #[test]
    fn feed_queries_read_what_the_client_sends() {
        let r = q(&[("page_size", "20"), ("status", "unread"), ("archived", "include"), ("tenant", "acme"), ("has_tenant", "true"), ("mode", "compact"), ("source", "w")]).unwrap();
        assert_eq!((r.size, r.filter.status, r.filter.archived, r.compact), (20, ReadStatus::Unread, Archived::Include, true));
        assert_eq!((r.filter.tenant.as_deref(), r.filter.has_tenant, r.filter.source.as_deref()), (Some("acme"), true, Some("w")));
        let r = q(&[("workflow_categories[]", "a"), ("workflow_categories[]", "b"), ("trigger_data", "{\"project\":\"p1\",\"n\":2}"), ("tenant", "")]).unwrap();
        assert_eq!(r.filter.categories, vec!["a", "b"]);
        assert_eq!(r.filter.trigger_data.len(), 2);
        assert_eq!(r.filter.tenant, None, "an empty value is no filter");
        for bad in [("status", "new"), ("archived", "yes"), ("trigger_data", "{\"a\":{\"b\":1}}"), ("trigger_data", "[1]"), ("page_size", "100"), ("before", "x"), ("color", "red")]
        {
            assert!(q(&[bad]).is_err(), "{bad:?}");
        }
    }
}
