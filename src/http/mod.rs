//! The HTTP server: the Knock-compatible API under `/v1` (see [`api`]), the
//! real-time socket of Knock's client SDKs (see [`socket`]), and `/healthz`,
//! `/readyz`, `/metrics`, `/openapi.json`. With `--cors-allowed-origins`,
//! browsers on those origins may call it (preflights are answered before
//! authentication).
//!
//! Every response carries an `x-request-id` (the client's, or a new UUID),
//! which is also in the request's log span. Requests are counted by route and
//! status, and timed. Connections that do not send their headers within
//! `--header-timeout-seconds` are closed; API requests not answered within
//! `--request-timeout-seconds` get 408 when the client was still sending its
//! body, else 503 with Retry-After. On shutdown the listener closes and
//! in-flight requests are finished.

pub mod api;
pub mod openapi;
pub mod socket;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State as AxumState};
use axum::http::{header, HeaderName, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::controller::Context;
use crate::metrics::{HttpLabels, HttpRouteLabels, Metrics};
use api::errors::ApiError;

/// Shared by every handler.
#[derive(Clone)]
pub struct State {
    pub context: Arc<Context>,
    /// True once the CRDs are established and the watch caches are filled.
    pub ready: Arc<AtomicBool>,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The headers Knock's client SDKs send (every call is preflighted).
const CORS_HEADERS: [HeaderName; 6] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::ACCEPT,
    HeaderName::from_static("x-knock-user-token"),
    HeaderName::from_static("x-knock-client"),
    HeaderName::from_static("x-knock-branch"),
];

/// CORS for the configured origins (None: no CORS headers at all).
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Settings checked each origin's form; one that is not a header value is left out.
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
            .allow_headers(CORS_HEADERS)
            .expose_headers([header::RETRY_AFTER])
            // Fewer preflights: every client call has custom headers.
            .max_age(Duration::from_secs(600)),
    )
}

/// The router: health, readiness, metrics, the OpenAPI document, the API and the socket.
pub fn router(state: State, api: Arc<api::Api>, sockets: Arc<socket::Sockets>) -> Router {
    let metrics = state.context.metrics.clone();
    let timeout = state.context.settings.request_timeout();
    let cors = cors(&state.context.settings.cors_origins());
    let v1 = api::router(api).layer(middleware::from_fn_with_state(timeout, limit_time));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .with_state(state)
        .merge(v1)
        .merge(sockets.router())
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(metrics, count));
    // Outside the routes, so that a preflight is answered without authentication.
    let app = match cors {
        Some(cors) => app.layer(cors),
        None => app,
    };
    app.layer(
        TraceLayer::new_for_http()
            .make_span_with(|req: &Request| {
                let id = req.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default();
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
            })
            .on_request(())
            .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
    )
    .layer(PropagateRequestIdLayer::new(REQUEST_ID))
    .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

async fn readyz(AxumState(state): AxumState<State>) -> impl IntoResponse {
    if !state.ready.load(Ordering::SeqCst) {
        // Starting (watch caches not filled yet) or stopping (draining).
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: starting or stopping");
    }
    // Bounded: a probe that hangs on an unreachable apiserver says nothing.
    match tokio::time::timeout(state.context.settings.api_wait(), state.context.client.apiserver_version()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "Kubernetes API unreachable"),
    }
}

async fn metrics_text(AxumState(state): AxumState<State>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.context.metrics.render())
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound { method: method.to_string(), path: uri.path().chars().take(200).collect() }
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string() }
}

/// Bounds a request (reading its body included) by the request timeout. When
/// time runs out while herald waits for the client's body, the answer is 408;
/// otherwise herald was waiting on the Kubernetes API (slow, restarting or
/// unreachable), and the answer is 503 with Retry-After: the caller should
/// try again, not give up.
async fn limit_time(AxumState(limit): AxumState<Duration>, req: Request, next: Next) -> Response {
    let waiting = Arc::new(AtomicBool::new(false));
    let watched = waiting.clone();
    let req = req.map(move |inner| axum::body::Body::from_stream(WatchedBody { inner: inner.into_data_stream(), waiting: watched }));
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) if waiting.load(Ordering::SeqCst) => ApiError::Timeout(limit.as_secs()).into_response(),
        Err(_) => ApiError::unavailable(format!("no answer within the request timeout ({} s): the Kubernetes API is slow or unreachable", limit.as_secs())).into_response(),
    }
}

/// A request body that records whether the server is waiting for the client
/// to send more of it.
struct WatchedBody {
    inner: axum::body::BodyDataStream,
    waiting: Arc<AtomicBool>,
}

impl futures::Stream for WatchedBody {
    type Item = Result<axum::body::Bytes, axum::Error>;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        self.waiting.store(polled.is_pending(), Ordering::SeqCst);
        polled
    }
}

/// Counts and times every request by method, route (the route's pattern,
/// never the raw path) and status.
async fn count(AxumState(metrics): AxumState<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    // Clients may send any method token: keep the label's values bounded.
    let method = match *req.method() {
        Method::GET | Method::PUT | Method::POST | Method::DELETE | Method::PATCH | Method::HEAD | Method::OPTIONS => req.method().as_str(),
        _ => "OTHER",
    }
    .to_string();
    let http = &metrics.http;
    let in_flight = crate::metrics::InFlight::count(&http.in_flight);
    let response = next.run(req).await;
    drop(in_flight);
    http.requests.get_or_create(&HttpLabels { method: method.clone(), route: route.clone(), status: response.status().as_u16() }).inc();
    http.request_seconds.get_or_create(&HttpRouteLabels { method, route }).observe(started.elapsed().as_secs_f64());
    response
}

/// Serves until `shutdown`, then stops accepting and finishes in-flight
/// requests (for at most the request timeout and 5 s).
pub async fn serve(listener: tokio::net::TcpListener, state: State, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let settings = state.context.settings.clone();
    let api = api::Api::start(state.context.clone());
    let sockets = socket::Sockets::start(api.clone());
    let app = router(state, api, sockets.clone());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(settings.header_timeout_seconds.max(1)));
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(app.clone())).into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, "HTTP connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    // Upgraded connections leave hyper's graceful shutdown: close them here.
    sockets.close_all();
    let grace = Duration::from_secs(settings.request_timeout_seconds.max(1) + 5);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => tracing::warn!("HTTP requests still running after {grace:?}; stopping anyway"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use tower::ServiceExt;

    /// A route that reads the body, then waits for ever (as on a Kubernetes API that does not answer).
    fn stalled() -> Router {
        let handler = |body: axum::body::Bytes| async move {
            let _ = body;
            std::future::pending::<()>().await
        };
        Router::new().route("/", post(handler)).layer(middleware::from_fn_with_state(Duration::from_millis(200), limit_time))
    }

    #[tokio::test]
    async fn out_of_time_is_408_for_a_slow_client_and_503_for_a_slow_kubernetes_api() {
        // The body never comes: the client's fault.
        let never = axum::body::Body::from_stream(futures::stream::pending::<Result<axum::body::Bytes, std::io::Error>>());
        let response = stalled().oneshot(Request::post("/").body(never).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);

        // The body is in, herald waits: the caller should come back.
        let response = stalled().oneshot(Request::post("/").body(axum::body::Body::from("{}")).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
