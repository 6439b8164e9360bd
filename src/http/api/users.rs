//! Users: `PUT/GET/DELETE /v1/users/{user_id}`, their preference sets
//! (`/preferences/{set}`, `?tenant=` for tenant-specific ones) and channel data
//! (`/channel_data/{channel}`). A user is found by its id, whatever the
//! resource's name; a new one is named after the id (core::ids).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Caller;
use super::errors::ApiError;
use super::{check_ids, created_at, delete_located, updated_at, Api, Fields, JsonBody, Params, QueryParams};
use crate::controller::identify::{self, Located, Overwrite, Target};
use crate::core::model::{JsonObject, PreferenceSet};
use crate::resources::{User, UserSpec};

const TYPED: [&str; 4] = ["name", "email", "phone_number", "timezone"];

async fn find(api: &Api, namespace: &str, id: &str) -> Result<Located<User>, ApiError> {
    api.caches_ready().await?;
    Ok(identify::locate(&api.kube(namespace), &Target::user(&api.ctx.stores, namespace, id)).await?)
}

/// Creates the user if needed, then applies `change` to its spec (identify).
async fn upsert_user(api: &Api, namespace: &str, id: &str, change: &(dyn Fn(&mut UserSpec) -> Result<(), ApiError> + Send + Sync)) -> Result<User, ApiError> {
    api.caches_ready().await?;
    let target = Target::user(&api.ctx.stores, namespace, id);
    let user = identify::upsert(&api.kube(namespace), &target, Overwrite::Allowed, &|u: &mut User| change(&mut u.spec)).await?;
    if user.written.wrote() {
        api.ctx.metrics.write("User");
    }
    Ok(user.object)
}

/// A user as Knock returns it: `{__typename, id, name, email, ..., properties flattened}`.
pub fn user_json(user: &User) -> Value {
    let mut out = user.spec.properties.clone();
    out.insert("__typename".into(), json!("User"));
    out.insert("id".into(), json!(user.spec.id));
    out.insert("name".into(), json!(user.spec.name));
    out.insert("email".into(), json!(user.spec.email));
    out.insert("phone_number".into(), json!(user.spec.phone_number));
    out.insert("timezone".into(), json!(user.spec.timezone));
    out.insert("created_at".into(), json!(created_at(&user.metadata)));
    out.insert("updated_at".into(), json!(updated_at(&user.metadata)));
    Value::Object(out)
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("resource_missing", format!("user `{id}` not found"))
}

/// `PUT /v1/users/{user_id}`: identify (create or update) a user. Properties
/// are merged into the stored ones; a property set to null is removed.
pub async fn put(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "users").await?;
    check_ids(&[("user_id", &id)])?;
    caller.acts_for_user(&id)?;
    let mut f = Fields::new(body)?;
    let channel_data = f.object("channel_data").unwrap_or_default();
    let preferences = f.preference_sets("preferences");
    if let Some(body_id) = f.take("id") {
        if body_id != json!(id) {
            f.error("/id", "must match the user id in the path (or be left out)");
        }
    }
    f.take("__typename");
    let mut properties = f.rest();
    for key in TYPED {
        if let Some(v) = properties.get(key).filter(|v| !v.is_null() && !v.is_string()) {
            f.error(format!("/{key}"), format!("must be a string, got {}", super::type_name(v)));
        }
    }
    for key in ["created_at", "updated_at"] {
        properties.remove(key);
    }
    f.finish()?;
    let removed: Vec<String> = properties.iter().filter(|(_, v)| v.is_null()).map(|(k, _)| k.clone()).collect();
    properties.retain(|_, v| !v.is_null());
    let user = upsert_user(&api, &caller.namespace, &id, &|spec| {
        for key in &removed {
            spec.properties.remove(key);
            match key.as_str() {
                "name" => spec.name = None,
                "email" => spec.email = None,
                "phone_number" => spec.phone_number = None,
                "timezone" => spec.timezone = None,
                _ => {}
            }
        }
        identify::merge_user(spec, &properties, &channel_data, &preferences);
        Ok(())
    })
    .await?;
    Ok(Json(user_json(&user)))
}

/// `GET /v1/users/{user_id}`.
pub async fn get(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "users").await?;
    check_ids(&[("user_id", &id)])?;
    caller.acts_for_user(&id)?;
    let user = find(&api, &caller.namespace, &id).await?.object.ok_or_else(|| not_found(&id))?;
    Ok(Json(user_json(&user)))
}

/// `DELETE /v1/users/{user_id}` → 204.
pub async fn delete(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>) -> Result<StatusCode, ApiError> {
    api.allow(&caller, "delete", "users").await?;
    check_ids(&[("user_id", &id)])?;
    caller.acts_for_user(&id)?;
    let located = find(&api, &caller.namespace, &id).await?;
    delete_located(&api.kube::<User>(&caller.namespace), located, "resource_missing", &format!("user `{id}`")).await?;
    api.ctx.metrics.write("User");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct PreferenceQuery {
    /// A tenant id: the set is the user's preferences within that tenant.
    tenant: Option<String>,
}

/// A preference set as Knock returns it.
pub fn preference_json(id: &str, set: &PreferenceSet) -> Value {
    json!({
        "__typename": "PreferenceSet",
        "id": id,
        "workflows": set.workflows,
        "categories": set.categories,
        "channel_types": set.channel_types,
    })
}

/// A preference set request, and whether it merges into the stored set
/// (Knock's `__persistence_strategy__: "merge"`) rather than replacing it.
fn read_preference_set(body: Value) -> Result<(PreferenceSet, bool), ApiError> {
    let mut f = Fields::new(body)?;
    f.take("__typename");
    f.take("id");
    let merge = match f.string("__persistence_strategy__", 16).as_deref() {
        None | Some("replace") => false,
        Some("merge") => true,
        Some(_) => {
            f.error("/__persistence_strategy__", "must be `merge` or `replace`");
            false
        }
    };
    f.finish()?;
    let rest = Value::Object(f.rest());
    let set = serde_json::from_value::<PreferenceSet>(rest).map_err(|e| ApiError::invalid("/", format!("not a preference set: {e}")))?;
    Ok((set, merge))
}

fn store_set(slot: Option<&mut PreferenceSet>, set: &PreferenceSet, merge: bool) -> Option<PreferenceSet> {
    match (slot, merge) {
        (Some(existing), true) => {
            existing.workflows.extend(set.workflows.clone());
            existing.categories.extend(set.categories.clone());
            existing.channel_types.extend(set.channel_types.clone());
            None
        }
        _ => Some(set.clone()),
    }
}

fn check_tenant_set(set: &str, tenant: &Option<String>) -> Result<(), ApiError> {
    match tenant {
        Some(t) => {
            check_ids(&[("tenant", t)])?;
            if set != "default" {
                return Err(ApiError::invalid("set", "tenant-specific preferences use the `default` set"));
            }
            Ok(())
        }
        None => Ok(()),
    }
}

/// `PUT /v1/users/{user_id}/preferences/{set}`: replaces the set.
pub async fn put_preferences(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Params((id, set)): Params<(String, String)>,
    QueryParams(query): QueryParams<PreferenceQuery>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "users").await?;
    check_ids(&[("user_id", &id), ("set", &set)])?;
    caller.acts_for_user(&id)?;
    check_tenant_set(&set, &query.tenant)?;
    let (preferences, merge) = read_preference_set(body)?;
    let user = upsert_user(&api, &caller.namespace, &id, &|spec| {
        let map = match &query.tenant {
            Some(_) => &mut spec.tenant_preferences,
            None => &mut spec.preferences,
        };
        let slot = query.tenant.clone().unwrap_or_else(|| set.clone());
        if let Some(replacement) = store_set(map.get_mut(&slot), &preferences, merge) {
            map.insert(slot, replacement);
        }
        Ok(())
    })
    .await?;
    let stored = match &query.tenant {
        Some(tenant) => user.spec.tenant_preferences.get(tenant),
        None => user.spec.preferences.get(&set),
    };
    Ok(Json(preference_json(&set, stored.unwrap_or(&preferences))))
}

/// `GET /v1/users/{user_id}/preferences/{set}`: the set (empty when never set).
pub async fn get_preferences(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Params((id, set)): Params<(String, String)>,
    QueryParams(query): QueryParams<PreferenceQuery>,
) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "users").await?;
    check_ids(&[("user_id", &id), ("set", &set)])?;
    caller.acts_for_user(&id)?;
    check_tenant_set(&set, &query.tenant)?;
    let user = find(&api, &caller.namespace, &id).await?.object.ok_or_else(|| not_found(&id))?;
    let preferences = match &query.tenant {
        Some(tenant) => user.spec.tenant_preferences.get(tenant),
        None => user.spec.preferences.get(&set),
    };
    Ok(Json(preference_json(&set, &preferences.cloned().unwrap_or_default())))
}

fn channel_data_json(channel: &str, data: &Value) -> Value {
    json!({"__typename": "ChannelData", "channel_id": channel, "data": data})
}

/// `PUT /v1/users/{user_id}/channel_data/{channel}`: `{"data": {...}}` replaces the channel's data.
pub async fn put_channel_data(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Params((id, channel)): Params<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "users").await?;
    check_ids(&[("user_id", &id), ("channel", &channel)])?;
    caller.acts_for_user(&id)?;
    let mut f = Fields::new(body)?;
    let data: Option<JsonObject> = if f.has("data") {
        f.object("data")
    } else {
        f.error("/data", "is required");
        None
    };
    f.deny_unknown(" (channel data is sent as {\"data\": {...}})");
    f.finish()?;
    let data = Value::Object(data.unwrap_or_default());
    upsert_user(&api, &caller.namespace, &id, &|spec| {
        spec.channel_data.insert(channel.clone(), data.clone());
        Ok(())
    })
    .await?;
    Ok(Json(channel_data_json(&channel, &data)))
}

/// `GET /v1/users/{user_id}/channel_data/{channel}`.
pub async fn get_channel_data(State(api): State<Arc<Api>>, caller: Caller, Params((id, channel)): Params<(String, String)>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "users").await?;
    check_ids(&[("user_id", &id), ("channel", &channel)])?;
    caller.acts_for_user(&id)?;
    let user = find(&api, &caller.namespace, &id).await?.object.ok_or_else(|| not_found(&id))?;
    let data = user.spec.channel_data.get(&channel).ok_or_else(|| ApiError::not_found("resource_missing", format!("user `{id}` has no channel data for `{channel}`")))?;
    Ok(Json(channel_data_json(&channel, data)))
}

/// `DELETE /v1/users/{user_id}/channel_data/{channel}` → 204.
pub async fn delete_channel_data(State(api): State<Arc<Api>>, caller: Caller, Params((id, channel)): Params<(String, String)>) -> Result<StatusCode, ApiError> {
    api.allow(&caller, "update", "users").await?;
    check_ids(&[("user_id", &id), ("channel", &channel)])?;
    caller.acts_for_user(&id)?;
    if find(&api, &caller.namespace, &id).await?.object.is_none() {
        return Err(not_found(&id));
    }
    upsert_user(&api, &caller.namespace, &id, &|spec| {
        spec.channel_data.remove(&channel).map(|_| ()).ok_or_else(|| ApiError::not_found("resource_missing", format!("user `{id}` has no channel data for `{channel}`")))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
