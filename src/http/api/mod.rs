//! The Knock-compatible API under `/v1`, one module per API resource. Every
//! accepted write becomes (or changes) a herald resource that kubectl can see;
//! a 2xx is sent only once the Kubernetes API has stored it.

pub mod audiences;
pub mod auth;
pub mod errors;
pub mod feeds;
pub mod idempotency;
pub mod index;
pub mod messages;
pub mod objects;
pub mod ratelimit;
pub mod runs;
pub mod schedules;
pub mod tenants;
pub mod triggers;
pub mod users;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::{get, post, put};
use axum::Router;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api as KubeApi, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::Value;

use self::auth::{Authenticator, Caller, Permission};
use self::errors::{ApiError, FieldError};
use self::ratelimit::RateLimiter;
use crate::controller::Context;
use crate::core::model::JsonObject;

/// The field manager of the API's writes.
pub const FIELD_MANAGER: &str = "herald-api";
/// The longest id (user, object, collection, tenant, channel, preference set) accepted.
pub const MAX_ID_CHARS: usize = 256;

/// What the API handlers share.
pub struct Api {
    pub ctx: Arc<Context>,
    pub auth: Authenticator,
    pub limiter: Option<RateLimiter>,
    /// Runs and recipient runs by id (the run routes).
    pub index: index::RunIndex,
    /// Writes object subscriptions and audience members (combined per target).
    pub membership: crate::controller::membership::Membership,
    /// Set once every watch cache has had its first full list (they never
    /// go back): later requests skip waiting on each cache's channel.
    caches_listed: AtomicBool,
}

impl Api {
    /// Builds the API state and starts its watches (API keys, the run index).
    pub fn start(ctx: Arc<Context>) -> Arc<Self> {
        let auth = Authenticator::start(ctx.client.clone(), &ctx.settings);
        let limiter = RateLimiter::new(ctx.settings.rate_limit_per_second, ctx.settings.rate_limit_burst);
        let index = index::RunIndex::start(&ctx.client, &ctx.settings);
        let membership = crate::controller::membership::Membership::new(ctx.client.clone(), ctx.stores.clone(), ctx.metrics.clone());
        Arc::new(Api { ctx, auth, limiter, index, membership, caches_listed: AtomicBool::new(false) })
    }

    /// The caller may do `verb` on `resource` in its namespace.
    pub async fn allow(&self, caller: &Caller, verb: &'static str, resource: &'static str) -> Result<(), ApiError> {
        self.auth.authorize(caller, Permission { verb, resource }).await
    }

    /// Waits (briefly) until the watch caches hold a full list.
    pub async fn caches_ready(&self) -> Result<(), ApiError> {
        if self.caches_listed.load(Ordering::Relaxed) {
            return Ok(());
        }
        match tokio::time::timeout(self.ctx.settings.api_wait(), self.ctx.stores.wait_until_ready()).await {
            Ok(Ok(())) => {
                self.caches_listed.store(true, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(ApiError::unavailable("herald's caches are not loaded yet (is the Kubernetes API reachable?)")),
        }
    }

    /// Creates `object` in `namespace` and returns what the apiserver stored
    /// of its metadata (name, uid, annotations): a hot path (every trigger)
    /// that needs nothing else of the answer. Errors are [`KubeApi::create`]'s.
    pub async fn create_returning_metadata<K>(&self, namespace: &str, pp: &PostParams, object: &K) -> Result<ObjectMeta, kube::Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + serde::Serialize,
        <K as Resource>::DynamicType: Default,
    {
        crate::controller::slim::create(&self.ctx.client, namespace, pp, object).await
    }

    /// A Kubernetes API for kind `K` in `namespace`.
    pub fn kube<K>(&self, namespace: &str) -> KubeApi<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        KubeApi::namespaced(self.ctx.client.clone(), namespace)
    }
}

/// The `/v1` routes.
pub fn router(api: Arc<Api>) -> Router {
    let limit = api.ctx.settings.max_body_bytes;
    Router::new()
        .route("/v1/workflows/{key}/trigger", post(triggers::trigger))
        .route("/v1/workflows/{key}/cancel", post(triggers::cancel))
        .route("/v1/notify", post(triggers::notify))
        .route("/v1/users/{user_id}", put(users::put).get(users::get).delete(users::delete))
        .route("/v1/users/{user_id}/preferences/{set}", put(users::put_preferences).get(users::get_preferences))
        .route("/v1/users/{user_id}/channel_data/{channel}", put(users::put_channel_data).get(users::get_channel_data).delete(users::delete_channel_data))
        .route("/v1/objects/{collection}/{id}", put(objects::put).get(objects::get).delete(objects::delete))
        .route("/v1/objects/{collection}/{id}/subscriptions", post(objects::subscribe).delete(objects::unsubscribe).get(objects::subscriptions))
        .route("/v1/audiences/{key}/members", post(audiences::add).delete(audiences::remove).get(audiences::list))
        .route("/v1/tenants/{id}", put(tenants::put).get(tenants::get).delete(tenants::delete))
        .route("/v1/schedules", post(schedules::create).put(schedules::update).delete(schedules::delete).get(schedules::list))
        .route("/v1/users/{user_id}/schedules", get(schedules::for_user))
        .route("/v1/workflow_runs/{id}", get(runs::workflow_run))
        .route("/v1/workflow_recipient_runs/{id}", get(runs::recipient_run))
        .route("/v1/messages", get(messages::list))
        .route("/v1/messages/{message_id}", get(messages::get))
        .route("/v1/users/{user_id}/messages", get(messages::for_user))
        .route("/v1/objects/{collection}/{id}/messages", get(messages::for_object))
        .route("/v1/users/{user_id}/feeds/{channel_id}", get(feeds::get))
        .route("/v1/users/{user_id}/feeds/{channel_id}/settings", get(feeds::settings))
        .route("/v1/messages/{message_id}/{status}", put(feeds::set_status).delete(feeds::remove_status))
        .route("/v1/messages/batch/{action}", post(feeds::batch))
        .route("/v1/channels/{channel_id}/messages/bulk/{action}", post(feeds::bulk))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(api)
}

/// Every route of the API, as `(method, path)`: the OpenAPI document and its test use it.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/workflows/{key}/trigger"),
    ("post", "/v1/workflows/{key}/cancel"),
    ("post", "/v1/notify"),
    ("put", "/v1/users/{user_id}"),
    ("get", "/v1/users/{user_id}"),
    ("delete", "/v1/users/{user_id}"),
    ("put", "/v1/users/{user_id}/preferences/{set}"),
    ("get", "/v1/users/{user_id}/preferences/{set}"),
    ("put", "/v1/users/{user_id}/channel_data/{channel}"),
    ("get", "/v1/users/{user_id}/channel_data/{channel}"),
    ("delete", "/v1/users/{user_id}/channel_data/{channel}"),
    ("put", "/v1/objects/{collection}/{id}"),
    ("get", "/v1/objects/{collection}/{id}"),
    ("delete", "/v1/objects/{collection}/{id}"),
    ("post", "/v1/objects/{collection}/{id}/subscriptions"),
    ("delete", "/v1/objects/{collection}/{id}/subscriptions"),
    ("get", "/v1/objects/{collection}/{id}/subscriptions"),
    ("post", "/v1/audiences/{key}/members"),
    ("delete", "/v1/audiences/{key}/members"),
    ("get", "/v1/audiences/{key}/members"),
    ("put", "/v1/tenants/{id}"),
    ("get", "/v1/tenants/{id}"),
    ("delete", "/v1/tenants/{id}"),
    ("post", "/v1/schedules"),
    ("put", "/v1/schedules"),
    ("delete", "/v1/schedules"),
    ("get", "/v1/schedules"),
    ("get", "/v1/users/{user_id}/schedules"),
    ("get", "/v1/workflow_runs/{id}"),
    ("get", "/v1/workflow_recipient_runs/{id}"),
    ("get", "/v1/messages"),
    ("get", "/v1/messages/{message_id}"),
    ("get", "/v1/users/{user_id}/messages"),
    ("get", "/v1/objects/{collection}/{id}/messages"),
    ("get", "/v1/users/{user_id}/feeds/{channel_id}"),
    ("get", "/v1/users/{user_id}/feeds/{channel_id}/settings"),
    ("put", "/v1/messages/{message_id}/{status}"),
    ("delete", "/v1/messages/{message_id}/{status}"),
    ("post", "/v1/messages/batch/{action}"),
    ("post", "/v1/channels/{channel_id}/messages/bulk/{action}"),
];

impl FromRequestParts<Arc<Api>> for Caller {
    type Rejection = ApiError;

    /// Authenticates the request, then applies the per-caller rate limit.
    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, ApiError> {
        let caller = api.auth.authenticate(&parts.headers).await?;
        if let Some(limiter) = &api.limiter {
            limiter.check(&caller.name())?;
        }
        tracing::debug!(caller = %caller.name(), namespace = %caller.namespace, "authenticated");
        Ok(caller)
    }
}

/// The request body as JSON, read within `--max-body-bytes` (413 beyond it).
/// Malformed JSON, invalid UTF-8 and nesting deeper than 128 levels are 400s.
pub struct JsonBody(pub Value);

impl FromRequest<Arc<Api>> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, api: &Arc<Api>) -> Result<Self, ApiError> {
        let limit = api.ctx.settings.max_body_bytes;
        let declared = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let bytes = axum::body::Bytes::from_request(req, api).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::InvalidJson(format!("could not read the request body: {}", rejection.body_text()))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::InvalidJson("the request body is empty; send a JSON object".into()));
        }
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| ApiError::InvalidJson(e.to_string()))
    }
}

/// Path parameters, with Knock's error body when they cannot be read.
pub struct Params<T>(pub T);

impl<T, S> FromRequestParts<S> for Params<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state).await.map(|p| Params(p.0)).map_err(|e| ApiError::invalid("path", e.body_text()))
    }
}

/// Query parameters, with Knock's error body when they cannot be read.
pub struct QueryParams<T>(pub T);

impl<T, S> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state).await.map(|q| QueryParams(q.0)).map_err(|e| ApiError::invalid("query", e.body_text()))
    }
}

/// Checks an id from the path or the body: non-empty, at most 256 characters, no control characters.
pub fn check_id(field: &str, id: &str) -> Result<(), FieldError> {
    if id.is_empty() {
        Err(FieldError::new(field, "must not be empty"))
    } else if id.chars().count() > MAX_ID_CHARS {
        Err(FieldError::new(field, format!("must be at most {MAX_ID_CHARS} characters")))
    } else if id.chars().any(char::is_control) {
        Err(FieldError::new(field, "must not contain control characters"))
    } else {
        Ok(())
    }
}

/// Checks several path ids at once.
pub fn check_ids(ids: &[(&str, &str)]) -> Result<(), ApiError> {
    let errors: Vec<FieldError> = ids.iter().filter_map(|(field, id)| check_id(field, id).err()).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_all(errors))
    }
}

/// A request body's fields, read one by one; every problem is collected and
/// reported together (`/field` JSON pointers).
pub struct Fields {
    map: JsonObject,
    errors: Vec<FieldError>,
}

pub use crate::core::model::json_type_name as type_name;

impl Fields {
    /// The body must be a JSON object.
    pub fn new(body: Value) -> Result<Self, ApiError> {
        match body {
            Value::Object(map) => Ok(Fields { map, errors: Vec::new() }),
            other => Err(ApiError::invalid("/", format!("the body must be a JSON object, got {}", type_name(&other)))),
        }
    }

    pub fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    pub fn push(&mut self, error: FieldError) {
        self.errors.push(error);
    }

    /// Removes a field; null counts as absent.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    /// An optional string of at most `max` characters.
    pub fn string(&mut self, key: &str, max: usize) -> Option<String> {
        match self.take(key)? {
            Value::String(s) if s.chars().count() <= max => Some(s),
            Value::String(_) => {
                self.error(format!("/{key}"), format!("must be at most {max} characters"));
                None
            }
            other => {
                self.error(format!("/{key}"), format!("must be a string, got {}", type_name(&other)));
                None
            }
        }
    }

    /// A required, non-empty string.
    pub fn required_string(&mut self, key: &str, max: usize) -> Option<String> {
        let present = self.map.get(key).is_some_and(|v| !v.is_null());
        let value = self.string(key, max);
        match (&value, present) {
            (Some(s), _) if s.is_empty() => {
                self.error(format!("/{key}"), "must not be empty");
                None
            }
            (None, false) => {
                self.error(format!("/{key}"), "is required");
                None
            }
            _ => value,
        }
    }

    /// An optional array.
    pub fn array(&mut self, key: &str) -> Option<Vec<Value>> {
        match self.take(key)? {
            Value::Array(a) => Some(a),
            other => {
                self.error(format!("/{key}"), format!("must be an array, got {}", type_name(&other)));
                None
            }
        }
    }

    /// An optional object.
    pub fn object(&mut self, key: &str) -> Option<JsonObject> {
        match self.take(key)? {
            Value::Object(o) => Some(o),
            other => {
                self.error(format!("/{key}"), format!("must be an object, got {}", type_name(&other)));
                None
            }
        }
    }

    /// An optional map of preference-set id → PreferenceSet (`preferences`).
    pub fn preference_sets(&mut self, key: &str) -> std::collections::BTreeMap<String, crate::core::model::PreferenceSet> {
        match self.object(key).map(|p| crate::core::model::parse_preference_sets(&p)) {
            Some(Ok(sets)) => sets,
            Some(Err(e)) => {
                self.error(format!("/{key}"), e.to_string());
                Default::default()
            }
            None => Default::default(),
        }
    }

    /// Whether the body has this field (not null).
    pub fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    /// Every field not read yet is an error.
    pub fn deny_unknown(&mut self, hint: &str) {
        let unknown: Vec<String> = self.map.keys().cloned().collect();
        for key in unknown {
            self.error(format!("/{key}"), format!("unknown field{hint}"));
        }
        self.map.clear();
    }

    /// The fields not read.
    pub fn rest(&mut self) -> JsonObject {
        std::mem::take(&mut self.map)
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Ok when no problem was found, else a 422 listing every one.
    pub fn finish(&mut self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid_all(std::mem::take(&mut self.errors)))
        }
    }
}

/// RFC 3339 creation time.
pub fn created_at(meta: &ObjectMeta) -> Option<String> {
    meta.creation_timestamp.as_ref().map(|t| t.0.to_string())
}

/// RFC 3339 time of the last write (the newest managedFields entry), else the creation time.
pub fn updated_at(meta: &ObjectMeta) -> Option<String> {
    meta.managed_fields.iter().flatten().filter_map(|m| m.time.as_ref().map(|t| t.0)).max().map(|t| t.to_string()).or_else(|| created_at(meta))
}

/// Deletes a resource found by id; 404 with `code` when there is none.
pub async fn delete_located<K>(api: &KubeApi<K>, located: crate::controller::identify::Located<K>, code: &'static str, what: &str) -> Result<(), ApiError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(object) = located.object else { return Err(ApiError::not_found(code, format!("{what} not found"))) };
    match api.delete(&object.name_any(), &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 && s.reason == "NotFound" => Err(ApiError::not_found(code, format!("{what} not found"))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_collect_every_problem() {
        let mut f = Fields::new(json!({"a": 1, "b": "x", "c": null, "d": [1], "e": true})).unwrap();
        assert_eq!(f.string("a", 10), None);
        assert_eq!(f.required_string("c", 10), None);
        assert_eq!(f.string("b", 10).as_deref(), Some("x"));
        assert_eq!(f.array("d").map(|a| a.len()), Some(1));
        f.deny_unknown("");
        let ApiError::InvalidParams { errors, .. } = f.finish().unwrap_err() else { panic!() };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["/a", "/c", "/e"]);
        assert!(Fields::new(json!([1])).is_err());
    }

    #[test]
    fn ids_are_bounded() {
        assert!(check_id("id", "user_1").is_ok());
        assert!(check_id("id", "").is_err());
        assert!(check_id("id", &"x".repeat(MAX_ID_CHARS + 1)).is_err());
        assert!(check_id("id", "a\nb").is_err());
        assert!(check_id("id", &"é".repeat(MAX_ID_CHARS)).is_ok());
    }
}
