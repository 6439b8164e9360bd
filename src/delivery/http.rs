//! HTTP webhooks (`http` channels) and Slack-compatible incoming webhooks
//! (`chat` channels): building the request from a rendered message, and one
//! attempt at sending it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Map, Value};

use super::config::parse_webhook_url;
use super::egress::{EgressDenied, EgressPolicy};
use super::retry::parse_retry_after;
use super::signing::{self, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use super::{error_chain, preview, DeliveryError, Failure, Sent};
use crate::core::execution::Message;

/// Connections kept open per receiver host between deliveries.
const IDLE_CONNECTIONS_PER_HOST: usize = 64;
/// How much of an error response's body goes into herald's log. Never into
/// status: whoever can read a run through the API could otherwise read what
/// an internal service answered to a URL they chose.
const ERROR_BODY_CHARS: usize = 200;
/// How much of what was sent goes into the step's message.
const SENT_PREVIEW_CHARS: usize = 160;

/// Headers herald sets itself; a template may not set them.
const RESERVED_HEADERS: [&str; 7] = ["host", "content-length", "transfer-encoding", "connection", "idempotency-key", "x-herald-timestamp", "x-herald-signature"];

/// The shared HTTP client and the egress policy it enforces.
pub struct HttpClient {
    client: reqwest::Client,
    egress: Arc<EgressPolicy>,
}

/// The shared HTTP client: pooled keep-alive connections (one pool for every
/// delivery), rustls with the ring provider (the one kube uses), no
/// redirects (a webhook that redirects is misconfigured, and following a 302
/// would turn the POST into a GET), and the egress policy applied to every
/// address it connects to.
pub fn client(egress: Arc<EgressPolicy>) -> Result<HttpClient, String> {
    // reqwest is built without a default crypto provider; install ring (a
    // no-op when something installed one already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(EgressResolver { egress: egress.clone() })
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HOST)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))?;
    Ok(HttpClient { client, egress })
}

/// The system resolver, less the addresses the egress policy refuses. The
/// connection is made to exactly the addresses returned here, so a name
/// cannot resolve to something else between the check and the connect.
/// (Through a proxy from HTTP(S)_PROXY, this resolves the proxy's name
/// only; the proxy resolves the webhook's.)
struct EgressResolver {
    egress: Arc<EgressPolicy>,
}

impl Resolve for EgressResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let egress = self.egress.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted = egress.permitted(&host, resolved)?;
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// The address of an IP-literal URL (`http://169.254.169.254/`, `http://[::1]/`),
/// which reqwest connects to without asking the resolver.
/// (The URL parser already turned other spellings of an IPv4 address, like
/// `http://2852039166/`, into dotted decimal.)
fn literal_address(url: &Url) -> Option<IpAddr> {
    url.host_str()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Checks an IP-literal URL against the egress policy (names are checked by
/// the resolver, when a connection is made).
fn check_literal(egress: &EgressPolicy, url: &Url) -> Result<(), DeliveryError> {
    let Some(address) = literal_address(url) else { return Ok(()) };
    egress.check(address).map_err(|refused| DeliveryError::EgressDenied(EgressDenied { host: url.host_str().unwrap_or_default().to_string(), refused }))
}

/// A request ready to send (the same bytes on every attempt).
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// What was sent, for the step's status.
    pub preview: String,
}

/// The URL to call: the step's rendered `url`, else the recipient's
/// channel_data for the channel (`url`, or Knock's Slack shape
/// `connections[0].incoming_webhook.url`), else the Channel's `url`.
/// An empty rendered url (a template over missing data) counts as none.
fn resolve_url(message: &Message, channel_url: Option<&str>) -> Result<Url, DeliveryError> {
    let non_empty = |s: Option<&str>| s.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
    let from_template = non_empty(message.fields.get("url").and_then(Value::as_str)).map(|u| (u, "the step's template.url"));
    let from_data = message.channel_data.as_ref().and_then(|d| {
        non_empty(d.get("url").and_then(Value::as_str))
            .or_else(|| non_empty(d.pointer("/connections/0/incoming_webhook/url").and_then(Value::as_str)))
            .map(|u| (u, "the recipient's channel_data"))
    });
    let from_channel = non_empty(channel_url).map(|u| (u, "the Channel's url"));
    let Some((url, source)) = from_template.or(from_data).or(from_channel) else {
        return Err(DeliveryError::InvalidMessage(format!(
            "no URL to send to: the step has no template.url, the recipient has no channel_data `{}` url, and Channel `{}` has no url",
            message.channel, message.channel
        )));
    };
    parse_webhook_url(&url).map_err(|e| DeliveryError::InvalidMessage(format!("url from {source}: {e}")))
}

/// The Idempotency-Key header: `<recipient run id>:<step ref>`, the same on
/// every attempt and after restarts. A step ref with characters a header
/// cannot carry fails here, before any attempt.
fn idempotency_header(message: &Message) -> Result<HeaderValue, DeliveryError> {
    HeaderValue::from_str(&message.idempotency_key)
        .map_err(|_| DeliveryError::InvalidMessage(format!("the idempotency key `{}` is not a valid header value (control characters in the step ref?)", message.idempotency_key)))
}

/// The rendered `headers` of an http step, checked.
fn template_headers(message: &Message) -> Result<HeaderMap, DeliveryError> {
    let Some(Value::Object(rendered)) = message.fields.get("headers") else { return Ok(HeaderMap::new()) };
    checked_headers(rendered.iter().map(|(name, value)| (name.as_str(), value.as_str().unwrap_or_default())))
}

/// Rendered headers, checked: valid names and values, none of herald's own.
fn checked_headers<'a>(rendered: impl Iterator<Item = (&'a str, &'a str)>) -> Result<HeaderMap, DeliveryError> {
    let mut headers = HeaderMap::new();
    for (name, value) in rendered {
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(DeliveryError::InvalidMessage(format!("header `{name}` is set by herald and cannot be templated")));
        }
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| DeliveryError::InvalidMessage(format!("header name `{name}` is not a valid HTTP header name")))?;
        let header_value = HeaderValue::from_str(value.trim()).map_err(|_| {
            DeliveryError::InvalidMessage(format!("header `{name}`: the rendered value `{}` is not a valid header value (line breaks or control characters)", preview(value, 60)))
        })?;
        headers.insert(header_name, header_value);
    }
    Ok(headers)
}

/// The request of an `http` step: method (default POST), url, headers, body.
/// A body that is JSON is sent as `application/json` unless the step sets
/// Content-Type; other bodies as `text/plain`.
pub fn http_request(message: &Message, channel_url: Option<&str>) -> Result<WebhookRequest, DeliveryError> {
    let method_text = message.fields.get("method").and_then(Value::as_str).map(str::trim).filter(|m| !m.is_empty()).unwrap_or("POST").to_ascii_uppercase();
    let method = Method::from_bytes(method_text.as_bytes()).map_err(|_| DeliveryError::InvalidMessage(format!("method `{method_text}` is not an HTTP method")))?;
    let url = resolve_url(message, channel_url)?;
    let mut headers = template_headers(message)?;
    headers.insert(IDEMPOTENCY_HEADER, idempotency_header(message)?);
    let body = message.fields.get("body").and_then(Value::as_str).unwrap_or_default().to_string();
    if !body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
        let content_type = if serde_json::from_str::<Value>(&body).is_ok() { "application/json" } else { "text/plain; charset=utf-8" };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    Ok(WebhookRequest { preview: format!("{method} {url}; body: {}", preview(&body, SENT_PREVIEW_CHARS)), method, url, headers, body: body.into_bytes() })
}

/// The request of a fetch step: its method, URL (with the query parameters
/// added), headers and body; a JSON body goes as `application/json`.
pub fn fetch_request(call: &crate::core::functions::FetchCall) -> Result<WebhookRequest, DeliveryError> {
    let method = Method::from_bytes(call.method.as_bytes()).map_err(|_| DeliveryError::InvalidMessage(format!("method `{}` is not an HTTP method", call.method)))?;
    let mut url = parse_webhook_url(&call.url).map_err(|e| DeliveryError::InvalidMessage(format!("fetch.url: {e}")))?;
    if !call.query.is_empty() {
        url.query_pairs_mut().extend_pairs(call.query.iter());
    }
    let mut headers = checked_headers(call.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let key = HeaderValue::from_str(&call.idempotency_key)
        .map_err(|_| DeliveryError::InvalidMessage(format!("the idempotency key `{}` is not a valid header value", call.idempotency_key)))?;
    headers.insert(IDEMPOTENCY_HEADER, key);
    if !headers.contains_key(reqwest::header::ACCEPT) {
        headers.insert(reqwest::header::ACCEPT, HeaderValue::from_static("application/json"));
    }
    let body = call.body.clone().unwrap_or_default();
    if !body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
        let content_type = if serde_json::from_str::<Value>(&body).is_ok() { "application/json" } else { "text/plain; charset=utf-8" };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    Ok(WebhookRequest { preview: format!("{method} {url}"), method, url, headers, body: body.into_bytes() })
}

/// The request of a `chat` step: a Slack-compatible incoming-webhook POST of
/// `{"text": ..., "blocks": [...]}`. `blocks` must render a JSON array; a
/// step that renders neither text nor blocks has nothing to say and fails.
pub fn chat_request(message: &Message, channel_url: Option<&str>) -> Result<WebhookRequest, DeliveryError> {
    let url = resolve_url(message, channel_url)?;
    let text = message.fields.get("text").and_then(Value::as_str).filter(|t| !t.trim().is_empty());
    let blocks = match message.fields.get("blocks").and_then(Value::as_str).map(str::trim).filter(|b| !b.is_empty()) {
        None => None,
        Some(source) => match serde_json::from_str::<Value>(source) {
            Ok(Value::Array(items)) => Some(items),
            Ok(_) => return Err(DeliveryError::InvalidMessage(format!("template.blocks must render a JSON array, not `{}`", preview(source, 80)))),
            Err(e) => return Err(DeliveryError::InvalidMessage(format!("template.blocks did not render JSON ({e}): `{}`", preview(source, 80)))),
        },
    };
    if text.is_none() && blocks.is_none() {
        return Err(DeliveryError::InvalidMessage("the chat message is empty: template.text and template.blocks rendered nothing".into()));
    }
    let mut payload = Map::new();
    if let Some(t) = text {
        payload.insert("text".into(), json!(t));
    }
    if let Some(b) = blocks {
        payload.insert("blocks".into(), Value::Array(b));
    }
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(IDEMPOTENCY_HEADER, idempotency_header(message)?);
    let body = serde_json::to_vec(&payload).map_err(|e| DeliveryError::InvalidMessage(format!("encoding the chat message: {e}")))?;
    Ok(WebhookRequest { preview: format!("POST {url}; text: {}", preview(text.unwrap_or(""), SENT_PREVIEW_CHARS)), method: Method::POST, url, headers, body })
}

/// One attempt: sends the request (with its Idempotency-Key, the same on
/// every attempt, so receivers can drop duplicates) and, with a signing key,
/// a fresh timestamp and signature; classifies the answer.
pub async fn send(client: &HttpClient, request: &WebhookRequest, signing_key: Option<&[u8]>, timeout: Duration) -> Result<Sent, DeliveryError> {
    let response = exchange(client, request, signing_key, timeout).await?;
    let status = response.status();
    Ok(Sent { status: Some(i32::from(status.as_u16())), summary: format!("HTTP {} from {}", status.as_u16(), request.preview) })
}

/// One attempt of a fetch step: like [`send`], and the answer's body, at most
/// `max_body` bytes (a longer one fails, for good).
pub async fn fetch(client: &HttpClient, request: &WebhookRequest, signing_key: Option<&[u8]>, timeout: Duration, max_body: usize) -> Result<(i32, Vec<u8>), DeliveryError> {
    let mut response = exchange(client, request, signing_key, timeout).await?;
    let code = i32::from(response.status().as_u16());
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(timeout, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                body.extend_from_slice(&chunk);
                if body.len() > max_body {
                    return Err(DeliveryError::Rejected(Failure::new(Some(code), format!("the answer is larger than {max_body} bytes"))));
                }
            }
            Ok(Ok(None)) => return Ok((code, body)),
            Ok(Err(e)) => return Err(classify_error(&e, timeout)),
            Err(_) => return Err(DeliveryError::Transient(Failure::new(Some(code), format!("the answer's body did not arrive within {}s", timeout.as_secs())))),
        }
    }
}

/// Sends one attempt; a 2xx answer is returned, anything else classified.
async fn exchange(client: &HttpClient, request: &WebhookRequest, signing_key: Option<&[u8]>, timeout: Duration) -> Result<reqwest::Response, DeliveryError> {
    check_literal(&client.egress, &request.url)?;
    let mut headers = request.headers.clone();
    if let Some(signing_key) = signing_key {
        let timestamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let signature = signing::signature(signing_key, timestamp, &request.body);
        // Both are ASCII digits and hex: always valid header values.
        headers.insert(TIMESTAMP_HEADER, HeaderValue::from(timestamp));
        headers.insert(SIGNATURE_HEADER, HeaderValue::from_str(&signature).unwrap_or_else(|_| HeaderValue::from_static("")));
    }
    let result = client.client.request(request.method.clone(), request.url.clone()).headers(headers).body(request.body.clone()).timeout(timeout).send().await;
    let response = match result {
        Ok(r) => r,
        Err(e) => return Err(classify_error(&e, timeout)),
    };
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| parse_retry_after(v, SystemTime::now()));
    let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = error_body(response).await;
    let code = i32::from(status.as_u16());
    // What the receiver said (its body, where it redirects to) goes to the
    // log only: the step's message is readable through the API.
    tracing::info!(status = code, method = %request.method, url = %request.url, body = %body, location = location.as_deref().unwrap_or_default(), "the receiver answered with an error");
    let mut message = format!("HTTP {} from {} {}", status.as_u16(), request.method, request.url);
    if status.is_redirection() {
        message.push_str(" (a redirect; herald does not follow redirects: use the URL it redirects to, logged by herald)");
    }
    if is_retryable_status(status) {
        Err(DeliveryError::Transient(Failure { status: Some(code), message, retry_after }))
    } else {
        Err(DeliveryError::Rejected(Failure::new(Some(code), message)))
    }
}

/// 408, 429 and 5xx may pass; any other non-2xx answer will not.
fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

fn classify_error(e: &reqwest::Error, timeout: Duration) -> DeliveryError {
    if let Some(denied) = egress_denial(e) {
        return DeliveryError::EgressDenied(denied.clone());
    }
    let chain = error_chain(e);
    if e.is_builder() {
        DeliveryError::InvalidMessage(chain)
    } else if e.is_timeout() {
        DeliveryError::Transient(Failure::new(None, format!("no answer within {}s: {chain}", timeout.as_secs())))
    } else if e.is_connect() {
        DeliveryError::Transient(Failure::new(None, format!("cannot connect: {chain}")))
    } else {
        DeliveryError::Transient(Failure::new(None, chain))
    }
}

/// The resolver's refusal, from the sources of a connect error.
fn egress_denial<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a EgressDenied> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(denied) = s.downcast_ref::<EgressDenied>() {
            return Some(denied);
        }
        source = s.source();
    }
    None
}

/// The start of an error response's body, read without loading a huge one.
async fn error_body(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < 4 * ERROR_BODY_CHARS {
        match tokio::time::timeout(Duration::from_secs(2), response.chunk()).await {
            Ok(Ok(Some(chunk))) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    preview(&String::from_utf8_lossy(&bytes), ERROR_BODY_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(fields: Value, channel_data: Option<Value>) -> Message {
        Message {
            step_ref: "hook".into(),
            channel: "hooks".into(),
            channel_type: "http",
            fields: fields.as_object().cloned().unwrap_or_default(),
            channel_data,
            email: None,
            idempotency_key: "rr:hook".into(),
        }
    }

    #[test]
    fn the_url_comes_from_the_template_then_channel_data_then_the_channel() {
        let channel = Some("http://channel.example/hook");
        let m = message(json!({"url": "http://template.example/x"}), Some(json!({"url": "http://data.example/"})));
        assert_eq!(http_request(&m, channel).unwrap().url.as_str(), "http://template.example/x");
        let m = message(json!({"url": "  "}), Some(json!({"url": "http://data.example/"})));
        assert_eq!(http_request(&m, channel).unwrap().url.as_str(), "http://data.example/");
        let m = message(json!({}), Some(json!({"connections": [{"incoming_webhook": {"url": "https://hooks.slack.example/T1"}}]})));
        assert_eq!(chat_request(&message(json!({"text": "hi"}), m.channel_data.clone()), None).unwrap().url.as_str(), "https://hooks.slack.example/T1");
        assert_eq!(http_request(&message(json!({}), None), channel).unwrap().url.as_str(), "http://channel.example/hook");
        let err = http_request(&message(json!({}), None), None).unwrap_err();
        assert!(err.to_string().contains("no URL"), "{err}");
        let err = http_request(&message(json!({"url": "nope"}), None), channel).unwrap_err();
        assert_eq!(err.reason(), "InvalidMessage");
        assert!(err.to_string().contains("template.url"), "{err}");
    }

    #[test]
    fn methods_headers_and_bodies_are_checked() {
        let r = http_request(&message(json!({"url": "http://x/", "body": "{\"a\":1}", "headers": {"X-Team": "ops"}}), None), None).unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-team"], "ops");
        assert_eq!(r.headers["idempotency-key"], "rr:hook");
        let mut odd = message(json!({"url": "http://x/"}), None);
        odd.idempotency_key = "rr:line\nbreak".into();
        assert!(http_request(&odd, None).unwrap_err().to_string().contains("idempotency key"));
        let r = http_request(&message(json!({"url": "http://x/", "method": "put", "body": "plain"}), None), None).unwrap();
        assert_eq!((r.method, r.headers["content-type"].to_str().unwrap()), (Method::PUT, "text/plain; charset=utf-8"));
        for (fields, expected) in [
            (json!({"url": "http://x/", "method": "GE T"}), "not an HTTP method"),
            (json!({"url": "http://x/", "headers": {"Bad Name": "v"}}), "not a valid HTTP header name"),
            (json!({"url": "http://x/", "headers": {"X-Ok": "line\nbreak"}}), "not a valid header value"),
            (json!({"url": "http://x/", "headers": {"Idempotency-Key": "mine"}}), "set by herald"),
        ] {
            let err = http_request(&message(fields.clone(), None), None).expect_err(&fields.to_string());
            assert!(err.to_string().contains(expected), "{err}");
            assert_eq!(err.reason(), "InvalidMessage");
        }
    }

    #[test]
    fn chat_messages_are_slack_json() {
        let r = chat_request(&message(json!({"url": "http://x/", "text": "hi", "blocks": "[{\"type\": \"divider\"}]"}), None), None).unwrap();
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body, json!({"text": "hi", "blocks": [{"type": "divider"}]}));
        let r = chat_request(&message(json!({"url": "http://x/", "text": "only text"}), None), None).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&r.body).unwrap(), json!({"text": "only text"}));
        let err = chat_request(&message(json!({"url": "http://x/", "text": "t", "blocks": "{\"not\": \"an array\"}"}), None), None).unwrap_err();
        assert!(err.to_string().contains("JSON array"), "{err}");
        let err = chat_request(&message(json!({"url": "http://x/", "blocks": "[oops"}), None), None).unwrap_err();
        assert!(err.to_string().contains("did not render JSON"), "{err}");
        let err = chat_request(&message(json!({"url": "http://x/", "text": "  "}), None), None).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    fn webhook(url: &str) -> WebhookRequest {
        http_request(&message(json!({"url": url, "body": "x"}), None), None).unwrap()
    }

    fn policy(deny: &str) -> Arc<EgressPolicy> {
        Arc::new(EgressPolicy::new(&deny.parse::<crate::delivery::egress::CidrList>().unwrap().0, &[]))
    }

    #[tokio::test]
    async fn ip_literal_urls_are_checked_before_connecting() {
        let client = client(policy("")).unwrap();
        for (url, expected) in [
            ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is refused by the egress policy (default: cloud metadata)"),
            ("http://[::ffff:169.254.169.254]:8080/", "::ffff:169.254.169.254 is refused by the egress policy (default: cloud metadata)"),
            ("http://[fe80::1]/", "fe80::1 is refused by the egress policy (default: link-local)"),
            // Another spelling of 169.254.169.254, normalized by the URL parser.
            ("http://2852039166/", "169.254.169.254 is refused by the egress policy (default: cloud metadata)"),
        ] {
            let err = send(&client, &webhook(url), None, Duration::from_secs(1)).await.unwrap_err();
            assert_eq!((err.reason(), err.to_string().as_str(), err.is_retryable()), ("EgressDenied", expected, false), "{url}");
        }
    }

    #[tokio::test]
    async fn names_are_checked_on_the_addresses_they_resolve_to() {
        // `localhost` resolves through the system resolver to loopback addresses only.
        let client = client(policy("127.0.0.0/8,::1")).unwrap();
        let err = send(&client, &webhook("http://localhost:9/hook"), None, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err.reason(), "EgressDenied", "{err}");
        let text = err.to_string();
        assert!(text.starts_with("`localhost` resolves to ") && text.contains(", which is refused by the egress policy (--egress-deny-cidrs "), "{text}");
    }

    /// A real HTTP server that answers one request with `raw` (status line, headers, body).
    async fn answer_once(raw: String) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let mut request = vec![0u8; 4096];
            let _ = socket.read(&mut request).await;
            let _ = socket.write_all(raw.as_bytes()).await;
        });
        addr
    }

    #[tokio::test]
    async fn failed_answers_keep_the_status_but_not_what_the_receiver_said() {
        let client = client(policy("")).unwrap();
        let body = "internal secret: AKIA-EXAMPLE";
        let addr = answer_once(format!("HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())).await;
        let err = send(&client, &webhook(&format!("http://{addr}/hook")), None, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!((err.reason(), err.status_code()), ("Rejected", Some(400)), "{err}");
        assert_eq!(err.to_string(), format!("HTTP 400 from POST http://{addr}/hook"));
        // Nor where a redirect points (herald follows none).
        let addr = answer_once("HTTP/1.1 302 Found\r\nlocation: http://internal.example/?token=AKIA-EXAMPLE\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()).await;
        let err = send(&client, &webhook(&format!("http://{addr}/hook")), None, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!((err.reason(), err.status_code()), ("Rejected", Some(302)), "{err}");
        assert!(err.to_string().starts_with(&format!("HTTP 302 from POST http://{addr}/hook (a redirect")) && !err.to_string().contains("AKIA"), "{err}");
        // 5xx answers, retried, alike.
        let addr = answer_once(format!("HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())).await;
        let err = send(&client, &webhook(&format!("http://{addr}/hook")), None, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!((err.reason(), err.to_string()), ("RetriesExhausted", format!("HTTP 503 from POST http://{addr}/hook")));
    }

    #[test]
    fn retryable_statuses() {
        for code in [408u16, 429, 500, 502, 503, 504] {
            assert!(is_retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [301u16, 400, 401, 403, 404, 410, 422] {
            assert!(!is_retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }
}
