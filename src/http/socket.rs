//! The real-time socket of Knock's client SDKs: `GET /ws/v1/websocket`,
//! Phoenix Channels with the v2 JSON serializer (frames
//! `[join_ref, ref, topic, event, payload]`).
//!
//! * Auth at upgrade: `api_key` (a publishable key) and `user_token` query
//!   parameters, as for HTTP; a bad pair is a 403 (Knock's answer, on which
//!   the client backs off). The Origin must be an allowed CORS origin, when
//!   any are configured.
//! * `heartbeat` on `phoenix` is answered; `phx_join` on
//!   `feeds:<channel_id>:<user_id>` is allowed for the token's own user only;
//!   its payload maps each feed client's reference to its feed options.
//! * A new feed message is announced by the replica that stored it with
//!   PostgreSQL NOTIFY (`store::feed::notify`); every replica LISTENs on one
//!   dedicated connection and hands the news to the sockets subscribed to
//!   that (namespace, channel, user), each of which pushes `new-message` with
//!   the counts under each client reference's options; `attn` names the
//!   references whose counts changed.
//! * Bounded: frame size, topics per socket, references per join, joins per
//!   minute, idle time without a frame, sockets per replica, time to write a
//!   frame. A client that breaks a rule loses its own socket.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify};

use crate::http::api::auth::Caller;
use crate::http::api::errors::ApiError;
use crate::http::api::{check_id, Api, MAX_ID_CHARS};
use crate::store::feed::{self, Archived, FeedCounts, FeedFilter};
use crate::store::Store;

/// The socket's path (Knock's client appends `/websocket` to `/ws/v1`).
pub const PATH: &str = "/ws/v1/websocket";
/// The largest frame (and message) a client may send.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Topics one socket may have joined at once.
pub const MAX_TOPICS: usize = 10;
/// Feed client references in one join.
pub const MAX_CLIENT_REFS: usize = 10;
/// A socket with no frame from its client for this long is closed (clients
/// send a heartbeat every 30 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A frame the client does not take within this long closes the socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Joins a socket may send per minute (each costs a counts query per reference).
const JOINS_PER_MINUTE: u32 = 60;
/// The longest client reference accepted.
const MAX_REF_CHARS: usize = 128;
/// Categories one client reference may filter on.
const MAX_CATEGORIES: usize = 50;

/// Which feed a topic follows: the key of the PostgreSQL notifications.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
pub struct FeedKey {
    pub namespace: String,
    /// The Channel's name (as messages store it).
    pub channel: String,
    pub user: String,
}

/// What a socket has to look at: the feeds that changed since it last looked.
#[derive(Default)]
struct Mailbox {
    dirty: Mutex<HashSet<FeedKey>>,
    notify: Notify,
}

impl Mailbox {
    fn post(&self, key: FeedKey) {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        self.notify.notify_one();
    }

    fn take(&self) -> HashSet<FeedKey> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// This replica's sockets, by the feeds they follow. A notification marks
/// the feed in each subscriber's mailbox: nothing queues up behind a slow
/// socket, and several messages in a row cost it one look.
#[derive(Default)]
pub struct Hub {
    subscribers: Mutex<HashMap<FeedKey, HashMap<u64, Arc<Mailbox>>>>,
}

impl Hub {
    fn subscribe(&self, key: FeedKey, socket: u64, mailbox: Arc<Mailbox>) {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().insert(socket, mailbox);
    }

    fn unsubscribe(&self, key: &FeedKey, socket: u64) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sockets) = subscribers.get_mut(key) {
            sockets.remove(&socket);
            if sockets.is_empty() {
                subscribers.remove(key);
            }
        }
    }

    /// Tells the sockets following `key` that it has a new message.
    pub fn publish(&self, key: &FeedKey) {
        let subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        for mailbox in subscribers.get(key).into_iter().flat_map(HashMap::values) {
            mailbox.post(key.clone());
        }
    }

    /// Tells every socket to look again (notifications may have been missed
    /// while the listening connection was down).
    fn publish_all(&self) {
        let subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        for (key, sockets) in subscribers.iter() {
            for mailbox in sockets.values() {
                mailbox.post(key.clone());
            }
        }
    }

    /// The number of feeds followed (for tests and metrics).
    pub fn feeds(&self) -> usize {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The sockets of this replica, and the listener that feeds them.
pub struct Sockets {
    api: Arc<Api>,
    pub hub: Arc<Hub>,
    store: Option<Store>,
    origins: Vec<String>,
    max_sockets: usize,
    open: AtomicUsize,
    next_id: AtomicU64,
    closing: watch::Sender<bool>,
    listener: Mutex<Option<AbortOnDrop>>,
}

impl Sockets {
    /// Starts the PostgreSQL listener (when there is a history store).
    pub fn start(api: Arc<Api>) -> Arc<Sockets> {
        let settings = &api.ctx.settings;
        let hub = Arc::new(Hub::default());
        let store = api.ctx.history.as_ref().map(|h| h.store.clone());
        let listener = settings.database_url.clone().map(|url| AbortOnDrop(tokio::spawn(listen(url, hub.clone()))));
        Arc::new(Sockets {
            origins: settings.cors_origins(),
            max_sockets: settings.max_sockets,
            api,
            hub,
            store,
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            closing: watch::channel(false).0,
            listener: Mutex::new(listener),
        })
    }

    /// Closes every socket (1001, going away: clients reconnect elsewhere) and stops listening.
    pub fn close_all(&self) {
        let _ = self.closing.send(true);
        self.listener.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Open sockets.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The socket's route.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new().route(PATH, get(upgrade)).with_state(self)
    }

    fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        // Browsers always send an Origin on a WebSocket; other clients may
        // forge any, so only its presence is worth checking.
        let Some(origin) = headers.get(header::ORIGIN) else { return true };
        if self.origins.is_empty() {
            return true;
        }
        let origin = origin.to_str().unwrap_or_default().to_ascii_lowercase();
        self.origins.iter().any(|allowed| allowed == "*" || *allowed == origin)
    }
}

/// Counts a socket as open while it lives.
struct OpenSocket(Arc<Sockets>);

impl OpenSocket {
    fn claim(sockets: &Arc<Sockets>) -> Option<OpenSocket> {
        let max = sockets.max_sockets;
        let claimed = sockets.open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).is_ok();
        claimed.then(|| {
            sockets.api.ctx.metrics.sockets_open.inc();
            OpenSocket(sockets.clone())
        })
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.api.ctx.metrics.sockets_open.dec();
    }
}

/// Maps a topic's channel id (a Channel's name, or its uid: Knock's feed ids
/// are UUIDs) to the Channel name messages are stored under; an id that names
/// no in-app Channel is kept as is (its feed is empty).
pub async fn resolve_feed_channel(api: &Api, namespace: &str, channel_id: &str) -> String {
    crate::http::api::feeds::resolve_channel(api, namespace, channel_id).unwrap_or_else(|_| channel_id.to_string())
}

/// The socket's query: `api_key`, `user_token`, `vsn` (Phoenix), `branch_slug` (ignored).
fn socket_params(query: Option<&str>) -> Result<(String, Option<String>), ApiError> {
    // Empty pairs (`?&api_key=…&&vsn=2.0.0`, from null parameters) are skipped by the form parser.
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or_default()).map_err(|e| ApiError::invalid("query", e.to_string()))?;
    let find = |name: &str| pairs.iter().find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v.clone());
    if let Some(vsn) = find("vsn") {
        if !vsn.starts_with("2.") {
            return Err(ApiError::invalid("vsn", format!("serializer version {vsn} is not supported; use 2.0.0")));
        }
    }
    let api_key = find("api_key").ok_or(ApiError::ApiKeyMissing)?;
    Ok((api_key, find("user_token")))
}

/// `GET /ws/v1/websocket`: authenticates, then upgrades.
async fn upgrade(State(sockets): State<Arc<Sockets>>, headers: HeaderMap, RawQuery(query): RawQuery, ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    match accept(&sockets, &headers, query.as_deref()).await {
        Ok((caller, store, open)) => ws
            .max_message_size(MAX_FRAME_BYTES)
            .max_frame_size(MAX_FRAME_BYTES)
            .on_upgrade(move |socket| async move {
                let _open = open;
                Session::new(sockets, caller, store).run(socket).await;
            })
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn accept(sockets: &Arc<Sockets>, headers: &HeaderMap, query: Option<&str>) -> Result<(Caller, Store, OpenSocket), ApiError> {
    let store = sockets.store.clone().ok_or_else(|| ApiError::Unavailable { message: "the in-app feed needs the history store (--database-url)".into(), retry_after: 60 })?;
    if !sockets.origin_allowed(headers) {
        return Err(ApiError::Forbidden("this Origin is not one of --cors-allowed-origins".into()));
    }
    // Knock answers a missing or bad key or token with 403 at upgrade; its client then backs off.
    let forbidden = |e: ApiError| match e {
        ApiError::ApiKeyMissing | ApiError::Unauthenticated(_) => ApiError::Forbidden(e.to_string()),
        other => other,
    };
    let (api_key, user_token) = socket_params(query).map_err(forbidden)?;
    let caller = sockets.api.auth.authenticate_client(&api_key, user_token.as_deref()).await.map_err(forbidden)?;
    if let Some(limiter) = &sockets.api.limiter {
        limiter.check(&caller.name())?;
    }
    let open = OpenSocket::claim(sockets).ok_or_else(|| ApiError::unavailable(format!("this replica has its {} sockets open (--max-sockets)", sockets.max_sockets)))?;
    Ok((caller, store, open))
}

/// One feed client reference of a joined topic.
struct ClientRef {
    id: String,
    filter: FeedFilter,
    /// The counts last computed (None: unknown, so the next push names it).
    last: Option<FeedCounts>,
}

/// A joined topic.
struct Topic {
    key: FeedKey,
    clients: Vec<ClientRef>,
}

/// The socket's subscriptions, dropped from the hub when the socket ends (however it ends).
struct Subscriptions {
    hub: Arc<Hub>,
    socket: u64,
    mailbox: Arc<Mailbox>,
    keys: HashMap<FeedKey, usize>,
}

impl Subscriptions {
    fn add(&mut self, key: &FeedKey) {
        let count = self.keys.entry(key.clone()).or_insert(0);
        if *count == 0 {
            self.hub.subscribe(key.clone(), self.socket, self.mailbox.clone());
        }
        *count += 1;
    }

    fn remove(&mut self, key: &FeedKey) {
        if let Some(count) = self.keys.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.keys.remove(key);
                self.hub.unsubscribe(key, self.socket);
            }
        }
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for key in self.keys.keys() {
            self.hub.unsubscribe(key, self.socket);
        }
    }
}

/// What a frame from the client leads to.
enum Outcome {
    Send(Vec<Value>),
    Close(u16, String),
}

/// One socket's state.
struct Session {
    sockets: Arc<Sockets>,
    caller: Caller,
    store: Store,
    topics: HashMap<String, Topic>,
    subscriptions: Subscriptions,
    joins: (Instant, u32),
}

fn reply(join_ref: &Value, msg_ref: &Value, topic: &str, status: &str, response: Value) -> Value {
    json!([join_ref, msg_ref, topic, "phx_reply", {"status": status, "response": response}])
}

fn refusal(join_ref: &Value, msg_ref: &Value, topic: &str, reason: impl Into<String>) -> Value {
    reply(join_ref, msg_ref, topic, "error", json!({"reason": reason.into()}))
}

fn counts_json(c: &FeedCounts) -> Value {
    json!({"total_count": c.total, "unread_count": c.unread, "unseen_count": c.unseen})
}

impl Session {
    fn new(sockets: Arc<Sockets>, caller: Caller, store: Store) -> Session {
        let socket = sockets.next_id.fetch_add(1, Ordering::Relaxed);
        let subscriptions = Subscriptions { hub: sockets.hub.clone(), socket, mailbox: Arc::new(Mailbox::default()), keys: HashMap::new() };
        Session { sockets, caller, store, topics: HashMap::new(), subscriptions, joins: (Instant::now(), 0) }
    }

    async fn run(mut self, mut ws: WebSocket) {
        let mailbox = self.subscriptions.mailbox.clone();
        let mut closing = self.sockets.closing.subscribe();
        // Resolves once herald shuts down (the guard `wait_for` returns is not Send: dropped here).
        let closing = async move { closing.wait_for(|c| *c).await.is_ok() };
        tokio::pin!(closing);
        let idle = tokio::time::sleep(IDLE_TIMEOUT);
        tokio::pin!(idle);
        let close = loop {
            tokio::select! {
                received = ws.recv() => {
                    let outcome = match received {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                        Some(Ok(Message::Text(text))) => self.frame(text.as_str()).await,
                        Some(Ok(Message::Binary(_))) => Outcome::Close(1003, "frames are JSON text (Phoenix serializer 2.0.0)".into()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Outcome::Send(Vec::new()),
                    };
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                    match outcome {
                        Outcome::Send(frames) => {
                            if !send(&mut ws, frames).await {
                                break None;
                            }
                        }
                        Outcome::Close(code, reason) => break Some((code, reason)),
                    }
                }
                () = mailbox.notify.notified() => {
                    let frames = self.pushes(mailbox.take()).await;
                    if !send(&mut ws, frames).await {
                        break None;
                    }
                }
                () = &mut idle => break Some((1000, format!("no frame in {} s (send a heartbeat every 30 s)", IDLE_TIMEOUT.as_secs()))),
                _ = &mut closing => break Some((1001, "herald is shutting down".into())),
            }
        };
        if let Some((code, reason)) = close {
            let frame = CloseFrame { code, reason: reason.into() };
            let _ = tokio::time::timeout(SEND_TIMEOUT, ws.send(Message::Close(Some(frame)))).await;
        }
    }

    /// Handles one frame from the client.
    async fn frame(&mut self, text: &str) -> Outcome {
        let Ok(Value::Array(mut parts)) = serde_json::from_str::<Value>(text) else {
            return Outcome::Close(1007, "a frame is a JSON array [join_ref, ref, topic, event, payload]".into());
        };
        if parts.len() != 5 || !parts[..2].iter().all(|v| v.is_null() || v.is_string()) || !parts[2].is_string() || !parts[3].is_string() {
            return Outcome::Close(1007, "a frame is a JSON array [join_ref, ref, topic, event, payload]".into());
        }
        let payload = parts.pop().unwrap_or_default();
        let event = parts[3].as_str().unwrap_or_default().to_string();
        let topic = parts[2].as_str().unwrap_or_default().to_string();
        let (join_ref, msg_ref) = (parts[0].clone(), parts[1].clone());
        let frames = match (topic.as_str(), event.as_str()) {
            ("phoenix", "heartbeat") => vec![reply(&Value::Null, &msg_ref, "phoenix", "ok", json!({}))],
            (_, "phx_join") => vec![self.join(&join_ref, &msg_ref, &topic, payload).await],
            (_, "phx_leave") => self.leave(&join_ref, &msg_ref, &topic),
            _ if self.topics.contains_key(&topic) => vec![refusal(&join_ref, &msg_ref, &topic, "unmatched event")],
            _ => vec![refusal(&join_ref, &msg_ref, &topic, "unmatched topic")],
        };
        Outcome::Send(frames)
    }

    /// Joins (or re-joins, replacing its options) a feed topic.
    async fn join(&mut self, join_ref: &Value, msg_ref: &Value, topic: &str, payload: Value) -> Value {
        let Some(rest) = topic.strip_prefix("feeds:") else { return refusal(join_ref, msg_ref, topic, "unmatched topic") };
        let Some((channel_id, user)) = rest.split_once(':') else { return refusal(join_ref, msg_ref, topic, "unmatched topic") };
        if let Some(e) = [("channel_id", channel_id), ("user_id", user)].iter().find_map(|(field, id)| check_id(field, id).err()) {
            return refusal(join_ref, msg_ref, topic, format!("invalid topic: {} {}", e.field, e.message));
        }
        if self.caller.acts_for_user(user).is_err() {
            return refusal(join_ref, msg_ref, topic, "unauthorized");
        }
        if !self.topics.contains_key(topic) && self.topics.len() >= MAX_TOPICS {
            return refusal(join_ref, msg_ref, topic, format!("a socket may join at most {MAX_TOPICS} topics"));
        }
        if !self.take_join() {
            return refusal(join_ref, msg_ref, topic, format!("a socket may join at most {JOINS_PER_MINUTE} times a minute"));
        }
        let namespace = self.caller.namespace.clone();
        let channel = resolve_feed_channel(&self.sockets.api, &namespace, channel_id).await;
        let base = FeedFilter { namespace: namespace.clone(), channel: channel.clone(), user: user.to_string(), ..Default::default() };
        let mut clients = match client_refs(&base, payload) {
            Ok(clients) => clients,
            Err(reason) => return refusal(join_ref, msg_ref, topic, reason),
        };
        // Subscribed first: a message stored while the counts are read is
        // either in them or announced after.
        let key = FeedKey { namespace, channel, user: user.to_string() };
        self.subscriptions.add(&key);
        // The counts now, so that a push names only the references a new message changed.
        for client in &mut clients {
            client.last = feed::counts(&self.store, &client.filter).await.ok();
        }
        if let Some(previous) = self.topics.insert(topic.to_string(), Topic { key, clients }) {
            self.subscriptions.remove(&previous.key);
        }
        reply(join_ref, msg_ref, topic, "ok", json!({}))
    }

    fn leave(&mut self, join_ref: &Value, msg_ref: &Value, topic: &str) -> Vec<Value> {
        let mut frames = vec![reply(join_ref, msg_ref, topic, "ok", json!({}))];
        if let Some(left) = self.topics.remove(topic) {
            self.subscriptions.remove(&left.key);
            frames.push(json!([join_ref, join_ref, topic, "phx_close", {}]));
        }
        frames
    }

    /// A token bucket of joins: [`JOINS_PER_MINUTE`], refilled each minute.
    fn take_join(&mut self) -> bool {
        let (since, used) = &mut self.joins;
        if since.elapsed() >= Duration::from_secs(60) {
            *since = Instant::now();
            *used = 0;
        }
        *used += 1;
        *used <= JOINS_PER_MINUTE
    }

    /// `new-message` pushes for the topics following these feeds: the
    /// counts of every reference, `attn` naming those whose counts changed
    /// (nothing is pushed when none did).
    async fn pushes(&mut self, keys: HashSet<FeedKey>) -> Vec<Value> {
        let mut frames = Vec::new();
        for (topic, joined) in self.topics.iter_mut().filter(|(_, t)| keys.contains(&t.key)) {
            let mut data = Map::new();
            let mut attn = Vec::new();
            let mut first = None;
            for client in &mut joined.clients {
                let counts = match feed::counts(&self.store, &client.filter).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, %topic, "feed counts for a socket push");
                        continue;
                    }
                };
                data.insert(client.id.clone(), json!({"metadata": counts_json(&counts)}));
                if client.last != Some(counts) {
                    attn.push(client.id.clone());
                    first.get_or_insert(counts);
                }
                client.last = Some(counts);
            }
            if let Some(first) = first {
                frames.push(json!([null, null, topic, "new-message", {"event": "new-message", "metadata": counts_json(&first), "data": data, "attn": attn}]));
            }
        }
        frames
    }
}

/// Writes frames; false when the socket is gone or too slow.
async fn send(ws: &mut WebSocket, frames: Vec<Value>) -> bool {
    for frame in frames {
        match tokio::time::timeout(SEND_TIMEOUT, ws.send(Message::Text(frame.to_string().into()))).await {
            Ok(Ok(())) => {}
            _ => return false,
        }
    }
    true
}

/// The client references of a join payload (`{"<ref>": {feed options}}`),
/// each with its feed filter. A join without references follows the feed
/// unfiltered under the reference "default".
fn client_refs(base: &FeedFilter, payload: Value) -> Result<Vec<ClientRef>, String> {
    let refs = match payload {
        Value::Null => Map::new(),
        Value::Object(refs) => refs,
        _ => return Err("the join payload maps client references to feed options".into()),
    };
    if refs.len() > MAX_CLIENT_REFS {
        return Err(format!("a join may carry at most {MAX_CLIENT_REFS} client references"));
    }
    if refs.is_empty() {
        return Ok(vec![ClientRef { id: "default".into(), filter: base.clone(), last: None }]);
    }
    refs.into_iter()
        .map(|(id, options)| {
            if id.is_empty() || id.chars().count() > MAX_REF_CHARS {
                return Err(format!("a client reference is 1 to {MAX_REF_CHARS} characters"));
            }
            let filter = feed_filter(base, options).map_err(|e| format!("client reference {id}: {e}"))?;
            Ok(ClientRef { id, filter, last: None })
        })
        .collect()
}

/// A feed client's options (Knock's `FeedClientOptions`) as the filter of its
/// counts. `status`, paging and display options do not change counts; unknown
/// options are ignored, as the client sends some meant for itself.
fn feed_filter(base: &FeedFilter, options: Value) -> Result<FeedFilter, String> {
    let options = match options {
        Value::Null => Map::new(),
        Value::Object(o) => o,
        _ => return Err("feed options are an object".into()),
    };
    let mut filter = base.clone();
    let string = |key: &str, value: &Value| match value {
        Value::String(s) if s.chars().count() <= MAX_ID_CHARS => Ok(s.clone()),
        _ => Err(format!("`{key}` must be a string of at most {MAX_ID_CHARS} characters")),
    };
    for (key, value) in options.into_iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            "archived" => {
                filter.archived = match value.as_str() {
                    Some("exclude") => Archived::Exclude,
                    Some("include") => Archived::Include,
                    Some("only") => Archived::Only,
                    _ => return Err("`archived` must be exclude, include or only".into()),
                }
            }
            "source" => filter.source = Some(string(&key, &value)?),
            "tenant" => filter.tenant = Some(string(&key, &value)?),
            "has_tenant" => {
                filter.has_tenant = match &value {
                    Value::Bool(b) => *b,
                    Value::String(s) if s == "true" || s == "false" => s == "true",
                    _ => return Err("`has_tenant` must be true or false".into()),
                }
            }
            "workflow_categories" => {
                let categories =
                    value.as_array().filter(|a| a.len() <= MAX_CATEGORIES).ok_or_else(|| format!("`workflow_categories` must be an array of at most {MAX_CATEGORIES} strings"))?;
                filter.categories = categories.iter().map(|c| string("workflow_categories", c)).collect::<Result<_, _>>()?;
            }
            "trigger_data" => {
                // The client sends an object here (and a JSON string over HTTP).
                let object = match value {
                    Value::String(s) => serde_json::from_str::<Value>(&s).map_err(|_| "`trigger_data` must be a JSON object".to_string())?,
                    other => other,
                };
                let Value::Object(pairs) = object else { return Err("`trigger_data` must be an object".into()) };
                if pairs.values().any(|v| v.is_object() || v.is_array()) {
                    return Err("`trigger_data` values must be flat (no objects or arrays)".into());
                }
                filter.trigger_data = pairs.into_iter().collect();
            }
            "inserted_at_date_range" => {
                let Value::Object(range) = value else { return Err("`inserted_at_date_range` must be an object".into()) };
                let inclusive = range.get("inclusive").and_then(Value::as_bool).unwrap_or(false);
                let time = |name: &str| -> Result<Option<jiff::Timestamp>, String> {
                    match range.get(name) {
                        None | Some(Value::Null) => Ok(None),
                        Some(Value::String(s)) => s.parse::<jiff::Timestamp>().map(Some).map_err(|_| format!("`inserted_at_date_range.{name}` must be an ISO 8601 time")),
                        Some(_) => Err(format!("`inserted_at_date_range.{name}` must be an ISO 8601 time")),
                    }
                };
                // The store's bounds are exclusive; PostgreSQL keeps microseconds.
                let step = jiff::SignedDuration::from_micros(if inclusive { 1 } else { 0 });
                filter.inserted_after = time("start")?.and_then(|t| t.checked_sub(step).ok());
                filter.inserted_before = time("end")?.and_then(|t| t.checked_add(step).ok());
            }
            _ => {}
        }
    }
    Ok(filter)
}

/// How long the listener waits before reconnecting, at most.
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the listening connection is checked (a half-open TCP connection
/// would otherwise stay silent for ever).
const LISTEN_PING: Duration = Duration::from_secs(30);

/// Listens for new feed messages on one dedicated connection, reconnecting
/// with backoff, and hands each to the hub.
async fn listen(url: String, hub: Arc<Hub>) {
    let mut config: tokio_postgres::Config = match url.parse() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "the database URL does not parse; the real-time socket gets no news");
            return;
        }
    };
    config.application_name("herald-feed-listener").keepalives(true).keepalives_idle(Duration::from_secs(30));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    let mut backoff = Duration::from_millis(500);
    let mut first = true;
    loop {
        let started = Instant::now();
        let result = listen_once(&config, &hub, &mut first).await;
        if started.elapsed() > LISTEN_BACKOFF_MAX {
            backoff = Duration::from_millis(500);
        }
        match result {
            Ok(()) => tracing::warn!("the feed listener's connection closed; reconnecting in {backoff:?}"),
            Err(e) => tracing::warn!(error = %e, "the feed listener's connection failed; reconnecting in {backoff:?}"),
        }
        tokio::time::sleep(backoff + Duration::from_millis(fastrand::u64(0..250))).await;
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

async fn listen_once(config: &tokio_postgres::Config, hub: &Hub, first: &mut bool) -> anyhow::Result<()> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let drive = async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => match serde_json::from_str::<FeedKey>(n.payload()) {
                    Ok(key) => hub.publish(&key),
                    Err(e) => tracing::debug!(error = %e, payload = %n.payload(), "a {} notification that does not read", feed::CHANNEL),
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow::Error::from(e)),
                None => return Ok(()),
            }
        }
    };
    let work = async {
        client.batch_execute(&format!("LISTEN {}", feed::CHANNEL)).await?;
        tracing::info!("listening for new feed messages");
        if !std::mem::replace(first, false) {
            hub.publish_all();
        }
        loop {
            tokio::time::sleep(LISTEN_PING).await;
            tokio::time::timeout(Duration::from_secs(10), client.simple_query("SELECT 1")).await.map_err(|_| anyhow::anyhow!("no answer to a ping in 10 s"))??;
        }
    };
    tokio::select! {
        r = drive => r,
        r = work => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> FeedFilter {
        FeedFilter { namespace: "ns".into(), channel: "in-app".into(), user: "jane".into(), ..Default::default() }
    }

    #[test]
    fn socket_params_tolerate_empty_pairs() {
        let (key, token) = socket_params(Some("&api_key=pk_123&&vsn=2.0.0")).unwrap();
        assert_eq!((key.as_str(), token), ("pk_123", None));
        let (_, token) = socket_params(Some("user_token=a.b.c&api_key=pk_1&vsn=2.0.0&branch_slug=")).unwrap();
        assert_eq!(token.as_deref(), Some("a.b.c"));
        assert!(matches!(socket_params(Some("vsn=2.0.0")), Err(ApiError::ApiKeyMissing)));
        assert!(matches!(socket_params(None), Err(ApiError::ApiKeyMissing)));
        assert!(matches!(socket_params(Some("api_key=pk_1&vsn=1.0.0")), Err(ApiError::InvalidParams { .. })));
    }

    #[test]
    fn join_options_become_count_filters() {
        let refs = client_refs(
            &base(),
            json!({
                "client_a": {"archived": "include", "tenant": "acme", "has_tenant": true, "source": "new-comment", "workflow_categories": ["x"],
                             "trigger_data": {"project": "p1"}, "mode": "compact", "status": "unread", "__experimentalCrossBrowserUpdates": true},
                "client_b": {"inserted_at_date_range": {"start": "2024-01-01T00:00:00Z", "inclusive": true}},
            }),
        )
        .unwrap();
        let a = &refs.iter().find(|r| r.id == "client_a").unwrap().filter;
        assert_eq!(a.archived, Archived::Include);
        assert_eq!((a.tenant.as_deref(), a.has_tenant, a.source.as_deref()), (Some("acme"), true, Some("new-comment")));
        assert_eq!(a.categories, vec!["x"]);
        assert_eq!(a.trigger_data, vec![("project".to_string(), json!("p1"))]);
        let b = &refs.iter().find(|r| r.id == "client_b").unwrap().filter;
        assert_eq!(b.inserted_after.unwrap().to_string(), "2023-12-31T23:59:59.999999Z");
        assert_eq!(b.archived, Archived::Exclude);
        // No references: one, unfiltered.
        assert_eq!(client_refs(&base(), json!({})).unwrap().len(), 1);
    }

    #[test]
    fn bad_join_options_are_refused() {
        for bad in [
            json!([1]),
            json!({"r": {"archived": "sometimes"}}),
            json!({"r": {"has_tenant": 1}}),
            json!({"r": {"trigger_data": {"a": {"b": 1}}}}),
            json!({"r": {"workflow_categories": "x"}}),
            json!({"r": {"tenant": "x".repeat(MAX_ID_CHARS + 1)}}),
            json!({"r": 5}),
            json!({"": {}}),
            Value::Object((0..=MAX_CLIENT_REFS).map(|i| (format!("r{i}"), json!({}))).collect()),
        ] {
            assert!(client_refs(&base(), bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_hub_reaches_only_subscribers_of_a_feed() {
        let hub = Hub::default();
        let key = FeedKey { namespace: "ns".into(), channel: "in-app".into(), user: "jane".into() };
        let other = FeedKey { user: "bob".into(), ..key.clone() };
        let (a, b) = (Arc::new(Mailbox::default()), Arc::new(Mailbox::default()));
        hub.subscribe(key.clone(), 1, a.clone());
        hub.subscribe(other.clone(), 2, b.clone());
        hub.publish(&key);
        hub.publish(&key);
        assert_eq!(a.take(), HashSet::from([key.clone()]));
        assert!(b.take().is_empty());
        hub.unsubscribe(&key, 1);
        hub.publish(&key);
        assert!(a.take().is_empty());
        assert_eq!(hub.feeds(), 1);
    }
}
