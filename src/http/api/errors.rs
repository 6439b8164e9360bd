//! The API's one error type, mapped once to Knock's error body:
//! `{"code", "message", "status", "type"}`, plus `errors` (one entry per bad
//! field) for validation failures. Handlers return `Result<_, ApiError>`;
//! nothing else in the API layer builds an error response.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

/// One invalid field: `field` is a JSON pointer into the request body
/// (`/recipients/3`, `/data/count`) or a parameter name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("No valid API key provided: send `Authorization: Bearer <key>`")]
    ApiKeyMissing,
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{message}")]
    InvalidParams { message: String, errors: Vec<FieldError> },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("no workflow with key `{0}` in this environment")]
    WorkflowMissing(String),
    #[error("workflow `{0}` is not active")]
    WorkflowInactive(String),
    #[error("workflow `{key}` cannot run: {message}")]
    WorkflowInvalid { key: String, message: String },
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("this Idempotency-Key was used with different parameters (by workflow run {run_id}); use a new key for a different request")]
    IdempotencyMismatch { run_id: String },
    #[error("idempotencyKey `{key}` was already used by a successful call (workflow run {run_id})")]
    IdempotencyKeyUsed { key: String, run_id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("rate limit exceeded; retry in {retry_after} s")]
    RateLimited { retry_after: u64 },
    #[error("the request was not received and answered within {0} s")]
    Timeout(u64),
    #[error("{message}")]
    Unavailable { message: String, retry_after: u64 },
    #[error("{0}")]
    Internal(String),
    #[error("no route for {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("{method} is not allowed on this route")]
    MethodNotAllowed { method: String },
}

impl ApiError {
    /// A 422 for one field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let error = FieldError::new(field, message);
        ApiError::InvalidParams { message: format!("{}: {}", error.field, error.message), errors: vec![error] }
    }

    /// A 422 listing every bad field (at least one).
    pub fn invalid_all(errors: Vec<FieldError>) -> Self {
        let message = match errors.as_slice() {
            [] => "one or more parameters are invalid".to_string(),
            [one] => format!("{}: {}", one.field, one.message),
            [first, rest @ ..] => format!("{}: {} (and {} more errors)", first.field, first.message, rest.len()),
        };
        ApiError::InvalidParams { message, errors }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::NotFound { code, message: message.into() }
    }

    /// The apiserver could not be reached or is overloaded.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::Unavailable { message: message.into(), retry_after: 1 }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::ApiKeyMissing | ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidParams { .. } | ApiError::WorkflowInactive(_) | ApiError::WorkflowInvalid { .. } | ApiError::IdempotencyMismatch { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::WorkflowMissing(_) | ApiError::NotFound { .. } | ApiError::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::IdempotencyKeyUsed { .. } | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// Knock's error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::ApiKeyMissing => "api_key_missing",
            ApiError::Unauthenticated(_) => "authentication_required",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidParams { .. } => "invalid_params",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::WorkflowMissing(_) => "workflow_missing",
            ApiError::WorkflowInactive(_) => "workflow_inactive",
            ApiError::WorkflowInvalid { .. } => "workflow_invalid",
            ApiError::NotFound { code, .. } => code,
            ApiError::IdempotencyMismatch { .. } => "idempotency_key_mismatch",
            ApiError::IdempotencyKeyUsed { .. } => "idempotency_key_used",
            ApiError::Conflict(_) => "conflict",
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::Timeout(_) => "request_timeout",
            ApiError::Unavailable { .. } => "service_unavailable",
            ApiError::Internal(_) => "internal_error",
            ApiError::RouteNotFound { .. } => "route_not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
        }
    }

    /// Knock's error type, grouping codes.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::ApiKeyMissing | ApiError::Unauthenticated(_) => "authentication_error",
            ApiError::Forbidden(_) => "authorization_error",
            ApiError::RateLimited { .. } => "rate_limit_error",
            ApiError::Unavailable { .. } | ApiError::Internal(_) => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// Seconds to wait before retrying, for the `Retry-After` header.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after } | ApiError::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// The Knock-shaped body of an error.
pub fn body(error: &ApiError) -> serde_json::Value {
    let mut body = json!({
        "code": error.code(),
        "message": error.to_string(),
        "status": error.status().as_u16(),
        "type": error.kind(),
    });
    match error {
        ApiError::InvalidParams { errors, .. } if !errors.is_empty() => body["errors"] = json!(errors),
        ApiError::IdempotencyKeyUsed { run_id, .. } | ApiError::IdempotencyMismatch { run_id } => body["workflow_run_id"] = json!(run_id),
        _ => {}
    }
    body
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "API request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "API request refused");
        }
        let mut response = (status, axum::Json(body(&self))).into_response();
        if let Some(seconds) = self.retry_after() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if matches!(self, ApiError::ApiKeyMissing | ApiError::Unauthenticated(_)) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Errors of the Kubernetes API, as the API's caller should see them. Callers
/// handle the codes they expect (404 on a read, 409 on a create) before this.
impl From<crate::controller::identify::IdentifyError> for ApiError {
    fn from(e: crate::controller::identify::IdentifyError) -> Self {
        use crate::controller::identify::IdentifyError;
        match e {
            IdentifyError::Kube(e) => e.into(),
            e @ (IdentifyError::NamesTaken { .. } | IdentifyError::Contended { .. } | IdentifyError::Unreadable { .. }) => ApiError::Conflict(e.to_string()),
        }
    }
}

/// Errors writing memberships: a slice that kept changing is a 409 (retry).
impl From<std::sync::Arc<crate::controller::membership::MembershipError>> for ApiError {
    fn from(e: std::sync::Arc<crate::controller::membership::MembershipError>) -> Self {
        use crate::controller::membership::MembershipError;
        match &*e {
            MembershipError::Kube(k) => ApiError::from(clone_kube_error(k)),
            MembershipError::Contended { .. } => ApiError::Conflict(e.to_string()),
            MembershipError::Dropped => ApiError::Internal(e.to_string()),
        }
    }
}

/// kube's error is not Clone; an error shared by combined calls is rebuilt for each.
fn clone_kube_error(e: &kube::Error) -> kube::Error {
    match e {
        kube::Error::Api(s) => kube::Error::Api(s.clone()),
        other => kube::Error::Service(other.to_string().into()),
    }
}

/// Errors of the history store: unreachable is 503 (retry), anything else 500.
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_unavailable() {
            ApiError::Unavailable { message: e.to_string(), retry_after: 5 }
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl From<kube::Error> for ApiError {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) => match s.code {
                400 | 422 => ApiError::InvalidParams { message: format!("the Kubernetes API refused the object: {}", s.message), errors: vec![] },
                404 if s.reason == "NotFound" => ApiError::not_found("resource_missing", s.message.clone()),
                // A bare 404 ("404 page not found", no Status): the apiserver does not
                // serve the kind right now, as while it starts after a restart.
                404 => ApiError::unavailable(format!("the Kubernetes API does not serve herald's resources right now (starting, or the CRDs are not installed): {}", s.message)),
                409 => ApiError::Conflict(format!("the resource changed concurrently, retry: {}", s.message)),
                413 => ApiError::InvalidParams { message: format!("the resource is too large to store: {}", s.message), errors: vec![] },
                429 | 500..=599 => ApiError::Unavailable { message: format!("the Kubernetes API is unavailable: {}", s.message), retry_after: 1 },
                401 | 403 => ApiError::Internal(format!("herald is not allowed to do this in the Kubernetes API (check its RBAC): {}", s.message)),
                _ => ApiError::Internal(format!("the Kubernetes API answered {}: {}", s.code, s.message)),
            },
            kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) | kube::Error::HttpError(_) => ApiError::Internal(e.to_string()),
            // Transport failures: connection refused, reset, TLS, timeouts.
            _ => ApiError::unavailable(format!("the Kubernetes API cannot be reached: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_knocks_shape() {
        let b = body(&ApiError::ApiKeyMissing);
        assert_eq!(b["code"], "api_key_missing");
        assert_eq!(b["status"], 401);
        assert_eq!(b["type"], "authentication_error");
        assert!(b["message"].as_str().unwrap().contains("API key"));

        let b = body(&ApiError::invalid_all(vec![FieldError::new("/data/a", "bad"), FieldError::new("/data/b", "worse")]));
        assert_eq!(b["status"], 422);
        assert_eq!(b["code"], "invalid_params");
        assert_eq!(b["errors"].as_array().unwrap().len(), 2);
        assert!(b["message"].as_str().unwrap().contains("1 more"));
    }

    #[test]
    fn retryable_errors_say_when() {
        let r = ApiError::unavailable("down").into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::RateLimited { retry_after: 3 }.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn kube_errors_map_to_statuses() {
        let api = |code: u16| kube::Error::Api(Box::new(kube::core::Status { code, message: "m".into(), ..Default::default() }));
        assert_eq!(ApiError::from(api(503)).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ApiError::from(api(422)).status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(ApiError::from(api(403)).status(), StatusCode::INTERNAL_SERVER_ERROR);
        let missing = kube::core::Status { code: 404, reason: "NotFound".into(), message: "m".into(), ..Default::default() };
        assert_eq!(ApiError::from(kube::Error::Api(Box::new(missing))).status(), StatusCode::NOT_FOUND);
        // The kind itself is not served (a restarting apiserver): try again, not "no such thing".
        let unserved = kube::core::Status::failure("404 page not found", "Failed to parse error data").with_code(404);
        assert_eq!(ApiError::from(kube::Error::Api(Box::new(unserved))).status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
