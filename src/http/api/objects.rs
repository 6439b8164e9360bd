//! Objects: `PUT/GET/DELETE /v1/objects/{collection}/{id}` and their
//! subscriptions (`POST/DELETE /v1/objects/{collection}/{id}/subscriptions`
//! with `{"recipients": [...], "properties": {...}}`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::auth::Caller;
use super::errors::ApiError;
use super::{check_id, check_ids, created_at, delete_located, updated_at, Api, Fields, JsonBody, Params};
use crate::controller::identify::{self, Located, Overwrite, Target};
use crate::core::model::{parse_recipient, RecipientInput, RecipientKey};
use crate::resources::{Object, ObjectSpec, Subscription};

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

/// A subscriber reference as an Object stores it.
fn reference(key: &RecipientKey) -> Value {
    match key {
        RecipientKey::User(id) => Value::String(id.clone()),
        RecipientKey::Object { collection, id } => json!({"id": id, "collection": collection}),
    }
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

fn subscription_json(object: &Object, s: &Subscription) -> Value {
    json!({
        "__typename": "Subscription",
        "object": object_json(object),
        "recipient": subscription_key(s).map(|k| recipient_json(&k)).unwrap_or(s.recipient.clone()),
        "properties": s.properties,
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

/// `POST /v1/objects/{collection}/{id}/subscriptions`: subscribes recipients
/// (inline ones are identified first); an existing subscription gets the new
/// properties. Returns the subscriptions.
pub async fn subscribe(State(api): State<Arc<Api>>, caller: Caller, Params((collection, id)): Params<(String, String)>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "objects").await?;
    check_ids(&[("collection", &collection), ("id", &id)])?;
    let this = RecipientKey::object(collection.clone(), id.clone());
    let mut f = Fields::new(body)?;
    let subscribers = read_subscribers(&mut f, &this, true);
    let properties = f.object("properties").unwrap_or_default();
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
    let object = upsert_object(&api, &caller.namespace, &collection, &id, &|spec| {
        for key in &keys {
            match spec.subscribers.iter_mut().find(|s| subscription_key(s).as_ref() == Some(key)) {
                Some(existing) => existing.properties = properties.clone(),
                None => spec.subscribers.push(Subscription { recipient: reference(key), properties: properties.clone() }),
            }
        }
        Ok(())
    })
    .await?;
    let out: Vec<Value> = object.spec.subscribers.iter().filter(|s| subscription_key(s).is_some_and(|k| keys.contains(&k))).map(|s| subscription_json(&object, s)).collect();
    Ok(Json(Value::Array(out)))
}

/// `DELETE /v1/objects/{collection}/{id}/subscriptions`: unsubscribes the
/// recipients named; returns the subscriptions removed.
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
    let Some(before) = find(&api, &caller.namespace, &collection, &id).await?.object else {
        return Err(not_found(&collection, &id));
    };
    let removed: Vec<Subscription> = before.spec.subscribers.iter().filter(|s| subscription_key(s).is_some_and(|k| keys.contains(&k))).cloned().collect();
    if removed.is_empty() {
        return Ok(Json(json!([])));
    }
    let object = upsert_object(&api, &caller.namespace, &collection, &id, &|spec| {
        spec.subscribers.retain(|s| !subscription_key(s).is_some_and(|k| keys.contains(&k)));
        Ok(())
    })
    .await?;
    Ok(Json(Value::Array(removed.iter().map(|s| subscription_json(&object, s)).collect())))
}
