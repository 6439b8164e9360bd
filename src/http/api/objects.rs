//! Objects: `PUT/GET/DELETE /v1/objects/{collection}/{id}` and their
//! subscriptions (`POST/DELETE /v1/objects/{collection}/{id}/subscriptions`
//! with `{"recipients": [...], "properties": {...}}`, and `GET` to list them).

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::auth::Caller;
use super::errors::ApiError;
use super::{check_id, check_ids, created_at, delete_located, updated_at, Api, Fields, JsonBody, Params, QueryParams};
use crate::controller::directory::LiveDirectory;
use crate::controller::identify::{self, Located, Overwrite, Target};
use crate::controller::membership::{Change, MAX_PROPERTIES_BYTES};
use crate::core::expansion::Directory;
use crate::core::model::{parse_recipient, JsonObject, RecipientInput, RecipientKey};
use crate::resources::{MemberTarget, Object, ObjectSpec, Subscription};

async fn find(api: &Api, namespace: &str, collection: &str, id: &str) -> Result<Located<Object>, ApiError> {
    api.caches_ready().await?;
    Ok(identify::locate(&api.kube(namespace), &Target::object(&api.ctx.stores, namespace, collection, id)).await?)
}

/// Creates the object if needed, then applies `change` to its spec (identify).
async fn upsert_object(
    api: &Api,
    namespace: &str,
    collection: &str,
    id: &str,
    change: &(dyn Fn(&mut ObjectSpec) -> Result<(), ApiError> + Send + Sync),
) -> Result<Object, ApiError> {
    api.caches_ready().await?;
    let target = Target::object(&api.ctx.stores, namespace, collection, id);
    let object = identify::upsert(&api.kube(namespace), &target, Overwrite::Allowed, &|o: &mut Object| change(&mut o.spec)).await?;
    if object.written.wrote() {
        api.ctx.metrics.write("Object");
    }
    Ok(object.object)
}

/// An object as Knock returns it.
pub fn object_json(object: &Object) -> Value {
    json!({
        "__typename": "Object",
        "id": object.spec.id,
        "collection": object.spec.collection,
        "properties": object.spec.properties,
        "created_at": created_at(&object.metadata),
        "updated_at": updated_at(&object.metadata),
    })
}

fn not_found(collection: &str, id: &str) -> ApiError {
    ApiError::not_found("resource_missing", format!("object `{collection}/{id}` not found"))
}

/// `PUT /v1/objects/{collection}/{id}`: create or update; properties merge, null removes one.
pub async fn put(State(api): State<Arc<Api>>, caller: Caller, Params((collection, id)): Params<(String, String)>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "objects").await?;
    check_ids(&[("collection", &collection), ("id", &id)])?;
    let mut f = Fields::new(body)?;
    let channel_data = f.object("channel_data").unwrap_or_default();
    let preferences = f.preference_sets("preferences");
    for key in ["id", "collection"] {
        if let Some(v) = f.take(key) {
            let expected = if key == "id" { &id } else { &collection };
            if v != json!(expected) {
                f.error(format!("/{key}"), "must match the path (or be left out)");
            }
        }
    }
    f.take("__typename");
    let mut properties = f.rest();
    for key in ["created_at", "updated_at"] {
        properties.remove(key);
    }
    f.finish()?;
    let object = upsert_object(&api, &caller.namespace, &collection, &id, &|spec| {
        for (key, value) in &properties {
            if value.is_null() {
                spec.properties.remove(key);
            } else {
                spec.properties.insert(key.clone(), value.clone());
            }
        }
        spec.channel_data.extend(channel_data.clone());
        spec.preferences.extend(preferences.clone());
        Ok(())
    })
    .await?;
    Ok(Json(object_json(&object)))
}

/// `GET /v1/objects/{collection}/{id}`.
pub async fn get(State(api): State<Arc<Api>>, caller: Caller, Params((collection, id)): Params<(String, String)>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "objects").await?;
    check_ids(&[("collection", &collection), ("id", &id)])?;
    let object = find(&api, &caller.namespace, &collection, &id).await?.object.ok_or_else(|| not_found(&collection, &id))?;
    Ok(Json(object_json(&object)))
}

/// `DELETE /v1/objects/{collection}/{id}` → 204.
pub async fn delete(State(api): State<Arc<Api>>, caller: Caller, Params((collection, id)): Params<(String, String)>) -> Result<StatusCode, ApiError> {
    api.allow(&caller, "delete", "objects").await?;
    check_ids(&[("collection", &collection), ("id", &id)])?;
    let located = find(&api, &caller.namespace, &collection, &id).await?;
    delete_located(&api.kube::<Object>(&caller.namespace), located, "resource_missing", &format!("object `{collection}/{id}`")).await?;
    api.ctx.metrics.write("Object");
    Ok(StatusCode::NO_CONTENT)
}

fn recipient_json(key: &RecipientKey) -> Value {
    match key {
        RecipientKey::User(id) => json!({"__typename": "User", "id": id}),
        RecipientKey::Object { collection, id } => json!({"__typename": "Object", "id": id, "collection": collection}),
    }
}

fn subscription_key(s: &Subscription) -> Option<RecipientKey> {
    parse_recipient(&s.recipient).ok().map(|r| r.key().clone())
}

fn subscription_json(object: &Object, key: &RecipientKey, properties: &JsonObject) -> Value {
    json!({
        "__typename": "Subscription",
        "object": object_json(object),
        "recipient": recipient_json(key),
        "properties": properties,
        "inserted_at": created_at(&object.metadata),
        "updated_at": updated_at(&object.metadata),
    })
}

/// Reads `recipients` of a subscriptions body; `inline` allows inline recipients.
fn read_subscribers(f: &mut Fields, this: &RecipientKey, inline: bool) -> Vec<RecipientInput> {
    let values = match f.array("recipients") {
        Some(v) if !v.is_empty() => v,
        Some(_) => {
            f.error("/recipients", "must list at least one recipient");
            return Vec::new();
        }
        None => {
            if !f.has_errors() {
                f.error("/recipients", "is required");
            }
            return Vec::new();
        }
    };
    if values.len() > crate::controller::trigger_run::MAX_RECIPIENTS {
        f.error("/recipients", format!("at most {} recipients per call", crate::controller::trigger_run::MAX_RECIPIENTS));
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, value) in values.iter().enumerate() {
        let at = format!("/recipients/{i}");
        match parse_recipient(value) {
            Ok(RecipientInput::Inline(_)) if !inline => f.error(at, "name subscribers by reference: a user id or {id, collection}"),
            Ok(r) => {
                let key = r.key();
                let mut ok = true;
                for (field, id) in [("id", Some(key.id())), ("collection", if let RecipientKey::Object { collection, .. } = key { Some(collection.as_str()) } else { None })] {
                    if let Some(Err(e)) = id.map(|id| check_id(&format!("{at}/{field}"), id)) {
                        f.push(e);
                        ok = false;
                    }
                }
                if key == this {
                    f.error(at, "an object cannot subscribe to itself");
                } else if ok {
                    out.push(r);
                }
            }
            Err(e) => f.error(at, e.to_string()),
        }
    }
    out
}

/// A membership's properties: an object of at most [`MAX_PROPERTIES_BYTES`] of JSON.
pub fn read_member_properties(f: &mut Fields, field: &str) -> JsonObject {
    let properties = f.object(field).unwrap_or_default();
    if serde_json::to_vec(&properties).map(|v| v.len()).unwrap_or(0) > MAX_PROPERTIES_BYTES {
        f.error(format!("/{field}"), format!("must take at most {MAX_PROPERTIES_BYTES} bytes of JSON (a subscription carries a few properties, not documents)"));
    }
    properties
}

/// `POST /v1/objects/{collection}/{id}/subscriptions`: subscribes recipients
/// (inline ones are identified first; the object is created if missing); an
/// existing subscription gets the new properties. Subscribers listed in the
/// Object itself stay there; the API adds new ones to the object's
/// MemberSlices, so an object's subscribers have no size limit. Concurrent
/// calls for one object are combined into one write ([`Membership`]).
/// Returns the subscriptions.
pub async fn subscribe(State(api): State<Arc<Api>>, caller: Caller, Params((collection, id)): Params<(String, String)>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "objects").await?;
    check_ids(&[("collection", &collection), ("id", &id)])?;
    let this = RecipientKey::object(collection.clone(), id.clone());
    let mut f = Fields::new(body)?;
    let subscribers = read_subscribers(&mut f, &this, true);
    let properties = read_member_properties(&mut f, "properties");
    f.deny_unknown(" (subscriptions take recipients and properties)");
    f.finish()?;
    api.caches_ready().await?;
    for subscriber in &subscribers {
        if let RecipientInput::Inline(inline) = subscriber {
            if identify::identify_recipient(&api.ctx.client, &api.ctx.stores, &caller.namespace, inline, Overwrite::Allowed).await?.written().wrote() {
                api.ctx.metrics.write(if inline.key.is_object() { "Object" } else { "User" });
            }
        }
    }
    let keys: Vec<RecipientKey> = subscribers.iter().map(|s| s.key().clone()).collect();
    // The object exists afterwards; subscribers listed in it get the new properties there.
    let object = upsert_object(&api, &caller.namespace, &collection, &id, &|spec| {
        for s in spec.subscribers.iter_mut() {
            if subscription_key(s).is_some_and(|k| keys.contains(&k)) {
                s.properties = properties.clone();
            }
        }
        Ok(())
    })
    .await?;
    let listed: HashSet<RecipientKey> = object.spec.subscribers.iter().filter_map(subscription_key).collect();
    let sliced: Vec<(RecipientKey, JsonObject)> = keys.iter().filter(|k| !listed.contains(*k)).map(|k| (k.clone(), properties.clone())).collect();
    if !sliced.is_empty() {
        api.membership.apply(&caller.namespace, &MemberTarget::Object { collection: collection.clone(), id: id.clone() }, Change::Add(sliced)).await?;
    }
    Ok(Json(Value::Array(keys.iter().map(|k| subscription_json(&object, k, &properties)).collect())))
}

/// `DELETE /v1/objects/{collection}/{id}/subscriptions`: unsubscribes the
/// recipients named (from the Object's own list and its MemberSlices);
/// returns the subscriptions removed.
pub async fn unsubscribe(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Params((collection, id)): Params<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "objects").await?;
    check_ids(&[("collection", &collection), ("id", &id)])?;
    let this = RecipientKey::object(collection.clone(), id.clone());
    let mut f = Fields::new(body)?;
    let keys: Vec<RecipientKey> = read_subscribers(&mut f, &this, false).iter().map(|s| s.key().clone()).collect();
    f.deny_unknown(" (unsubscribing takes recipients)");
    f.finish()?;
    let Some(mut object) = find(&api, &caller.namespace, &collection, &id).await?.object else {
        return Err(not_found(&collection, &id));
    };
    let mut removed: Vec<(RecipientKey, JsonObject)> =
        object.spec.subscribers.iter().filter_map(|s| subscription_key(s).filter(|k| keys.contains(k)).map(|k| (k, s.properties.clone()))).collect();
    if !removed.is_empty() {
        object = upsert_object(&api, &caller.namespace, &collection, &id, &|spec| {
            spec.subscribers.retain(|s| !subscription_key(s).is_some_and(|k| keys.contains(&k)));
            Ok(())
        })
        .await?;
    }
    let outcome = api.membership.apply(&caller.namespace, &MemberTarget::Object { collection: collection.clone(), id: id.clone() }, Change::Remove(keys.clone())).await?;
    for (key, was) in outcome {
        if let Some(properties) = was {
            if !removed.iter().any(|(k, _)| *k == key) {
                removed.push((key, properties));
            }
        }
    }
    Ok(Json(Value::Array(removed.iter().map(|(k, p)| subscription_json(&object, k, p)).collect())))
}

/// `GET /v1/objects/{collection}/{id}/subscriptions`: the object's
/// subscribers, its own list first, then its MemberSlices', in pages
/// (`page_size` up to 50, `after` from `page_info`).
pub async fn subscriptions(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Params((collection, id)): Params<(String, String)>,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "objects").await?;
    check_ids(&[("collection", &collection), ("id", &id)])?;
    let object = find(&api, &caller.namespace, &collection, &id).await?.object.ok_or_else(|| not_found(&collection, &id))?;
    let directory = LiveDirectory::new(&api.ctx.stores, &caller.namespace);
    let chunks = directory.subscribers(&collection, &id);
    let (entries, page_info) = page(chunks.iter().flat_map(|c| c.iter()), &query)?;
    let entries: Vec<Value> = entries.iter().map(|s| subscription_json(&object, &s.recipient, &s.properties)).collect();
    Ok(Json(json!({"entries": entries, "page_info": page_info})))
}

/// `page_size` and `after` of a list call.
#[derive(Debug, Default, serde::Deserialize)]
pub struct PageQuery {
    pub page_size: Option<usize>,
    pub after: Option<String>,
}

/// One page of `entries` (cursors are positions) and its `page_info`.
pub fn page<'a, T: 'a>(entries: impl Iterator<Item = &'a T>, query: &PageQuery) -> Result<(Vec<&'a T>, Value), ApiError> {
    let size = query.page_size.unwrap_or(50).clamp(1, 50);
    let start = match &query.after {
        None => 0,
        Some(after) => after.parse::<usize>().map_err(|_| ApiError::invalid("after", "is not a cursor this API returned"))?,
    };
    let mut taken: Vec<&T> = entries.skip(start).take(size + 1).collect();
    let more = taken.len() > size;
    taken.truncate(size);
    let after = more.then(|| (start + size).to_string());
    let before = (start > 0).then(|| start.saturating_sub(size).to_string());
    Ok((taken, json!({"__typename": "PageInfo", "after": after, "before": before, "page_size": size})))
}
