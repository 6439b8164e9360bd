//! Tenants: `PUT/GET/DELETE /v1/tenants/{id}`. A tenant has a name, settings
//! (`branding`, and `preference_set`: the defaults of its users) and any other
//! properties.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::auth::Caller;
use super::errors::ApiError;
use super::{check_ids, created_at, delete_located, updated_at, Api, Fields, JsonBody, Params};
use crate::controller::identify::{self, Located, Overwrite, Target};
use crate::core::model::PreferenceSet;
use crate::resources::Tenant;

async fn find(api: &Api, namespace: &str, id: &str) -> Result<Located<Tenant>, ApiError> {
    api.caches_ready().await?;
    Ok(identify::locate(&api.kube(namespace), &Target::tenant(&api.ctx.stores, namespace, id)).await?)
}

/// A tenant as Knock returns it: `{__typename, id, name, settings, ...properties}`.
pub fn tenant_json(tenant: &Tenant) -> Value {
    let mut out = tenant.spec.properties.clone();
    out.insert("__typename".into(), json!("Tenant"));
    out.insert("id".into(), json!(tenant.spec.id));
    out.insert("name".into(), json!(tenant.spec.name));
    out.insert("settings".into(), json!({"branding": tenant.spec.settings.branding, "preference_set": tenant.spec.settings.preference_set}));
    out.insert("created_at".into(), json!(created_at(&tenant.metadata)));
    out.insert("updated_at".into(), json!(updated_at(&tenant.metadata)));
    Value::Object(out)
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("resource_missing", format!("tenant `{id}` not found"))
}

/// `PUT /v1/tenants/{id}`: create or update. Properties and branding merge
/// (null removes a key); a preference_set replaces the stored one (null clears it).
pub async fn put(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "update", "tenants").await?;
    check_ids(&[("id", &id)])?;
    let mut f = Fields::new(body)?;
    if let Some(body_id) = f.take("id") {
        if body_id != json!(id) {
            f.error("/id", "must match the tenant id in the path (or be left out)");
        }
    }
    f.take("__typename");
    for unsupported in ["channel_data", "preferences"] {
        if f.take(unsupported).is_some() {
            f.error(format!("/{unsupported}"), "is not supported on tenants by herald; set settings.preference_set for the tenant's defaults");
        }
    }
    let name_set = f.has("name");
    let name = f.string("name", 1024);
    let settings_present = f.has("settings");
    let mut settings = f.object("settings").unwrap_or_default();
    let branding = match settings.remove("branding") {
        None | Some(Value::Null) => None,
        Some(Value::Object(b)) => Some(b),
        Some(other) => {
            f.error("/settings/branding", format!("must be an object, got {}", super::type_name(&other)));
            None
        }
    };
    let preference_set: Option<Option<PreferenceSet>> = match settings.remove("preference_set") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => match serde_json::from_value::<PreferenceSet>(v) {
            Ok(p) => Some(Some(p)),
            Err(e) => {
                f.error("/settings/preference_set", format!("not a preference set: {e}"));
                None
            }
        },
    };
    if settings_present {
        for key in settings.keys() {
            f.error(format!("/settings/{key}"), "unknown setting (tenants have branding and preference_set)");
        }
    }
    let mut properties = f.rest();
    for key in ["created_at", "updated_at"] {
        properties.remove(key);
    }
    f.finish()?;
    api.caches_ready().await?;
    let target = Target::tenant(&api.ctx.stores, &caller.namespace, &id);
    let tenant = identify::upsert(&api.kube(&caller.namespace), &target, Overwrite::Allowed, &|t: &mut Tenant| -> Result<(), ApiError> {
        let spec = &mut t.spec;
        if name_set {
            spec.name = name.clone();
        }
        for (key, value) in &properties {
            if value.is_null() {
                spec.properties.remove(key);
            } else {
                spec.properties.insert(key.clone(), value.clone());
            }
        }
        for (key, value) in branding.iter().flatten() {
            if value.is_null() {
                spec.settings.branding.remove(key);
            } else {
                spec.settings.branding.insert(key.clone(), value.clone());
            }
        }
        if let Some(set) = &preference_set {
            spec.settings.preference_set = set.clone();
        }
        Ok(())
    })
    .await?;
    if tenant.written.wrote() {
        api.ctx.metrics.write("Tenant");
    }
    Ok(Json(tenant_json(&tenant.object)))
}

/// `GET /v1/tenants/{id}`.
pub async fn get(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "tenants").await?;
    check_ids(&[("id", &id)])?;
    let tenant = find(&api, &caller.namespace, &id).await?.object.ok_or_else(|| not_found(&id))?;
    Ok(Json(tenant_json(&tenant)))
}

/// `DELETE /v1/tenants/{id}` → 204.
pub async fn delete(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>) -> Result<StatusCode, ApiError> {
    api.allow(&caller, "delete", "tenants").await?;
    check_ids(&[("id", &id)])?;
    let located = find(&api, &caller.namespace, &id).await?;
    delete_located(&api.kube::<Tenant>(&caller.namespace), located, "resource_missing", &format!("tenant `{id}`")).await?;
    api.ctx.metrics.write("Tenant");
    Ok(StatusCode::NO_CONTENT)
}
