//! Knock's client-side access, against the local control plane and (for the
//! socket) a real PostgreSQL: publishable keys with user tokens (RS256 JWTs
//! signed with a key pair made here by `openssl genpkey`, as the README tells
//! customers to), what such a caller may and may not do, CORS, and the
//! Phoenix socket at `/ws/v1/websocket` (join, heartbeat, `new-message`
//! pushes across two replicas through LISTEN/NOTIFY).

mod api_support;
mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use api_support::{Answer, Herald};
use common::wait_for;
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::Api;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// An RSA key pair in PEM: (private PKCS#8, public SPKI).
struct KeyPair {
    private: Vec<u8>,
    public: Vec<u8>,
}

/// Runs openssl, as a customer would.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl").args(args).output().expect("running openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn new_key_pair() -> KeyPair {
    let dir = std::env::temp_dir().join(format!("herald-client-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let private_path: PathBuf = dir.join("private.pem");
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", private_path.to_str().unwrap()]);
    let public = openssl(&["pkey", "-in", private_path.to_str().unwrap(), "-pubout"]);
    let private = std::fs::read(&private_path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    KeyPair { private, public }
}

/// The environment's key pair, and another one (a forger's).
fn keys() -> &'static (KeyPair, KeyPair) {
    static KEYS: OnceLock<(KeyPair, KeyPair)> = OnceLock::new();
    KEYS.get_or_init(|| (new_key_pair(), new_key_pair()))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A user token as Knock's `signUserToken` makes it: RS256, `sub`, `iat`, `exp` an hour later, grants.
fn user_token(user: &str) -> String {
    sign(&keys().0, json!({"sub": user, "iat": now(), "exp": now() + 3600, "grants": {format!("https://api.knock.app/v1/users/{user}"): {"user/feed_read": [{}]}}}))
}

fn sign(pair: &KeyPair, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &EncodingKey::from_rsa_pem(&pair.private).unwrap()).unwrap()
}

const CLIENT_SECRET: &str = "herald-client-key";

/// Creates a key Secret holding a publishable key (and the public key of its user tokens).
async fn publishable_key(h: &Herald, name: &str, token: Option<&str>) -> String {
    let pk = format!("pk_test_{}", uuid::Uuid::new_v4().simple());
    let mut annotations = serde_json::Map::new();
    if let Some(mode) = token {
        annotations.insert("herald.dev/user-token".into(), json!(mode));
    }
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"herald.dev/api-key": "true"}, "annotations": annotations},
        "stringData": {"publishableKey": pk, "userTokenPublicKey": String::from_utf8(keys().0.public.clone()).unwrap()},
    }))
    .unwrap();
    Api::<Secret>::namespaced(h.client(), &h.ns.name).create(&PostParams::default(), &secret).await.expect("creating the key Secret");
    pk
}

/// A request with a publishable key and (if any) a user token.
async fn as_user(h: &Herald, pk: &str, token: Option<&str>, method: &str, path: &str, body: Option<Value>) -> Answer {
    let mut headers = vec![("authorization".to_string(), format!("Bearer {pk}")), ("x-knock-client".to_string(), "Knock/ClientJS 0.22.0".to_string())];
    if let Some(token) = token {
        headers.push(("x-knock-user-token".into(), token.into()));
    }
    let body = body.map(|b| {
        headers.push(("content-type".into(), "application/json".into()));
        b.to_string().into_bytes()
    });
    h.raw(method, path, &headers, body).await
}

/// Waits until herald knows the publishable key.
async fn wait_for_pk(h: &Herald, pk: &str, token: Option<&str>) {
    wait_for("the publishable key to be known", Duration::from_secs(30), || async {
        let a = as_user(h, pk, token, "GET", "/v1/users/jane", None).await;
        (a.status != 401).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_user_token_acts_for_its_own_user_on_the_client_routes_only() {
    let h = Herald::start().await;
    for user in ["jane", "bob"] {
        assert_eq!(h.call("PUT", &format!("/v1/users/{user}"), Some(json!({"name": user}))).await.status, 200);
    }
    let pk = publishable_key(&h, CLIENT_SECRET, None).await;
    let jane = user_token("jane");
    wait_for_pk(&h, &pk, Some(&jane)).await;

    // Its own user, preferences and channel data.
    let a = as_user(&h, &pk, Some(&jane), "GET", "/v1/users/jane", None).await;
    assert_eq!((a.status, a.body["id"].as_str()), (200, Some("jane")), "{a:?}");
    let a = as_user(&h, &pk, Some(&jane), "PUT", "/v1/users/jane", Some(json!({"name": "Jane Doe"}))).await;
    assert_eq!((a.status, a.body["name"].as_str()), (200, Some("Jane Doe")), "{a:?}");
    assert_eq!(as_user(&h, &pk, Some(&jane), "GET", "/v1/users/jane/preferences/default", None).await.status, 200);
    let a = as_user(&h, &pk, Some(&jane), "PUT", "/v1/users/jane/channel_data/push", Some(json!({"data": {"tokens": ["t"]}}))).await;
    assert_eq!(a.status, 200, "{a:?}");

    // Another user's: 403.
    as_user(&h, &pk, Some(&jane), "GET", "/v1/users/bob", None).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "PUT", "/v1/users/bob", Some(json!({"name": "B"}))).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "GET", "/v1/users/bob/preferences/default", None).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "GET", "/v1/users/bob/channel_data/push", None).await.assert_error(403, "forbidden");

    // Server routes: 403, whoever they concern.
    h.workflow("w", json!({"steps": []})).await;
    as_user(&h, &pk, Some(&jane), "POST", "/v1/workflows/w/trigger", Some(json!({"recipients": ["jane"]}))).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "POST", "/v1/workflows/w/cancel", Some(json!({"cancellation_key": "k"}))).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "DELETE", "/v1/users/jane", None).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "PUT", "/v1/tenants/acme", Some(json!({}))).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "GET", "/v1/objects/projects/p1", None).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "GET", "/v1/workflow_runs/00000000-0000-0000-0000-000000000000", None).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "GET", "/v1/users/jane/messages", None).await.assert_error(403, "forbidden");

    // Tokens are required, and must verify, be current and name a user.
    as_user(&h, &pk, None, "GET", "/v1/users/jane", None).await.assert_error(401, "authentication_required");
    let expired = sign(&keys().0, json!({"sub": "jane", "iat": now() - 7200, "exp": now() - 3600}));
    let a = as_user(&h, &pk, Some(&expired), "GET", "/v1/users/jane", None).await;
    a.assert_error(401, "authentication_required");
    assert!(a.text.contains("expired"), "{a:?}");
    let forged = sign(&keys().1, json!({"sub": "jane", "exp": now() + 3600}));
    as_user(&h, &pk, Some(&forged), "GET", "/v1/users/jane", None).await.assert_error(401, "authentication_required");
    let hs256 = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &json!({"sub": "jane", "exp": now() + 3600}), &EncodingKey::from_secret(&keys().0.public)).unwrap();
    as_user(&h, &pk, Some(&hs256), "GET", "/v1/users/jane", None).await.assert_error(401, "authentication_required");
    let no_sub = sign(&keys().0, json!({"exp": now() + 3600}));
    as_user(&h, &pk, Some(&no_sub), "GET", "/v1/users/jane", None).await.assert_error(401, "authentication_required");
    let no_exp = sign(&keys().0, json!({"sub": "jane"}));
    as_user(&h, &pk, Some(&no_exp), "GET", "/v1/users/jane", None).await.assert_error(401, "authentication_required");
    as_user(&h, &pk, Some("not.a.jwt"), "GET", "/v1/users/jane", None).await.assert_error(401, "authentication_required");

    // The secret key still acts for every user.
    assert_eq!(h.call("GET", "/v1/users/bob", None).await.status, 200);

    // Tokens made optional (development): the key alone acts for any user, on the client routes only.
    let dev = publishable_key(&h, "herald-dev-key", Some("optional")).await;
    wait_for_pk(&h, &dev, None).await;
    assert_eq!(as_user(&h, &dev, None, "GET", "/v1/users/bob", None).await.status, 200);
    as_user(&h, &dev, None, "POST", "/v1/workflows/w/trigger", Some(json!({"recipients": ["bob"]}))).await.assert_error(403, "forbidden");
    // A token that is sent is still checked.
    as_user(&h, &dev, Some(&forged), "GET", "/v1/users/bob", None).await.assert_error(401, "authentication_required");
    as_user(&h, &dev, Some(&jane), "GET", "/v1/users/bob", None).await.assert_error(403, "forbidden");
}

#[tokio::test]
async fn cors_answers_preflights_for_allowed_origins_only() {
    let h = Herald::start_with(|s| s.cors_allowed_origins = vec!["https://app.example.com".into()]).await;
    let pk = publishable_key(&h, CLIENT_SECRET, None).await;
    let preflight = |origin: &str| {
        vec![
            ("origin".to_string(), origin.to_string()),
            ("access-control-request-method".to_string(), "PUT".to_string()),
            ("access-control-request-headers".to_string(), "authorization,content-type,x-knock-user-token,x-knock-client".to_string()),
        ]
    };
    // Answered without credentials.
    let a = h.raw("OPTIONS", "/v1/users/jane", &preflight("https://app.example.com"), None).await;
    assert!(a.status == 200 || a.status == 204, "{a:?}");
    assert_eq!(a.header("access-control-allow-origin"), Some("https://app.example.com"), "{a:?}");
    let methods = a.header("access-control-allow-methods").unwrap_or_default().to_ascii_lowercase();
    assert!(["get", "post", "put", "delete", "options"].iter().all(|m| methods.contains(m)), "{methods}");
    let headers = a.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
    for name in ["authorization", "content-type", "accept", "x-knock-user-token", "x-knock-client", "x-knock-branch"] {
        assert!(headers.contains(name), "{name} in {headers}");
    }
    assert!(a.header("access-control-allow-credentials").is_none());
    // Another origin gets no CORS headers.
    let a = h.raw("OPTIONS", "/v1/users/jane", &preflight("https://evil.example.com"), None).await;
    assert!(a.header("access-control-allow-origin").is_none(), "{a:?}");

    // Actual requests (errors too) carry the headers, and expose Retry-After.
    let jane = user_token("jane");
    wait_for_pk(&h, &pk, Some(&jane)).await;
    let mut headers = vec![("origin".to_string(), "https://app.example.com".to_string()), ("authorization".to_string(), format!("Bearer {pk}"))];
    headers.push(("x-knock-user-token".into(), jane));
    let a = h.raw("GET", "/v1/users/bob", &headers, None).await;
    a.assert_error(403, "forbidden");
    assert_eq!(a.header("access-control-allow-origin"), Some("https://app.example.com"));
    assert_eq!(a.header("access-control-expose-headers").map(str::to_ascii_lowercase).as_deref(), Some("retry-after"));

    // Without --cors-allowed-origins: no CORS headers at all.
    let plain = Herald::start().await;
    let a = plain.raw("OPTIONS", "/v1/users/jane", &preflight("https://app.example.com"), None).await;
    assert!(a.header("access-control-allow-origin").is_none(), "{a:?}");
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The socket URL as Knock's client builds it (an empty pair for its null `branch_slug`).
fn socket_url(base: &str, pk: &str, token: &str) -> String {
    format!("{}/ws/v1/websocket?&user_token={token}&api_key={pk}&&vsn=2.0.0", base.replacen("http", "ws", 1))
}

/// Connects; the HTTP status of a refused upgrade otherwise.
async fn connect(url: &str, origin: Option<&str>) -> Result<Socket, u16> {
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request.headers_mut().insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("connecting to {url}: {e}"),
    }
}

async fn send(socket: &mut Socket, frame: Value) {
    socket.send(Message::Text(frame.to_string().into())).await.unwrap();
}

/// The next text frame, as JSON (within 10 s).
async fn next(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.expect("a frame within 10 s").expect("the socket is open").unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// Inserts an in-app feed message for `user` (as the feed channel step will) and announces it; its id.
async fn new_feed_message(db: &tokio_postgres::Client, store: &herald::store::Store, namespace: &str, channel: &str, user: &str, tenant: Option<&str>) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    db.execute(
        "INSERT INTO herald_messages (id, namespace, workflow, workflow_run_id, recipient_run_id, recipient_id, tenant, step_ref, channel, channel_type, status, reason, attempts, data, inserted_at, updated_at)
         VALUES ($1, $2, 'new-comment', $1, $1, $3, $4, 'in-app', $5, 'in_app_feed', 'delivered', '', '[]', '{}', now(), now())",
        &[&id, &namespace, &user, &tenant, &channel],
    )
    .await
    .unwrap();
    herald::store::feed::notify(store, namespace, channel, user).await.unwrap();
    id
}

/// One user's token reads and changes its own feed only: another user's feed
/// is 403, and another user's messages are not there to change.
#[tokio::test]
async fn a_user_token_reads_and_changes_only_its_own_feed() {
    let url = common::database().await;
    let h = {
        let url = url.clone();
        Herald::start_with(move |s| s.database_url = Some(url)).await
    };
    let channel: herald::resources::Channel =
        serde_json::from_value(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "feed"}, "spec": {"type": "in_app_feed"}})).unwrap();
    h.api::<herald::resources::Channel>().create(&PostParams::default(), &channel).await.unwrap();
    wait_for("the Channel in herald's cache", Duration::from_secs(20), || async { h.op.as_ref().unwrap().context.stores.channels.get(&h.ns.name, "feed").map(|_| ()) }).await;
    let store = herald::store::Store::connect(&url).await.unwrap();
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let janes = new_feed_message(&db, &store, &h.ns.name, "feed", "jane", None).await;
    let bobs = new_feed_message(&db, &store, &h.ns.name, "feed", "bob", None).await;

    let pk = publishable_key(&h, CLIENT_SECRET, None).await;
    let jane = user_token("jane");
    wait_for_pk(&h, &pk, Some(&jane)).await;
    let a = as_user(&h, &pk, Some(&jane), "GET", "/v1/users/jane/feeds/feed", None).await;
    assert_eq!((a.status, a.body["entries"].as_array().map(Vec::len)), (200, Some(1)), "{a:?}");
    assert_eq!(a.body["entries"][0]["id"], janes.to_string());
    as_user(&h, &pk, Some(&jane), "GET", "/v1/users/bob/feeds/feed", None).await.assert_error(403, "forbidden");
    as_user(&h, &pk, Some(&jane), "GET", "/v1/users/bob/feeds/feed/settings", None).await.assert_error(403, "forbidden");
    // Bob's message cannot be changed with Jane's token, one by one or in a batch; Jane's can.
    as_user(&h, &pk, Some(&jane), "PUT", &format!("/v1/messages/{bobs}/read"), None).await.assert_error(404, "resource_missing");
    let a = as_user(&h, &pk, Some(&jane), "POST", "/v1/messages/batch/read", Some(json!({"message_ids": [bobs, janes]}))).await;
    assert_eq!(a.body.as_array().map(|m| m.iter().map(|m| m["id"].clone()).collect::<Vec<_>>()), Some(vec![json!(janes.to_string())]), "{a:?}");
    as_user(&h, &pk, Some(&jane), "POST", "/v1/channels/feed/messages/bulk/read", Some(json!({"user_ids": ["bob"]}))).await.assert_error(403, "forbidden");
    let a = as_user(&h, &pk, Some(&jane), "POST", "/v1/channels/feed/messages/bulk/seen", Some(json!({"user_ids": ["jane"]}))).await;
    assert_eq!((a.status, &a.body["success_count"]), (200, &json!(1)), "{a:?}");
    // Bob's message is untouched: read through the secret key.
    let a = h.call("GET", "/v1/users/bob/feeds/feed", None).await;
    assert_eq!((a.body["meta"]["unread_count"].as_i64(), a.body["meta"]["unseen_count"].as_i64()), (Some(1), Some(1)), "{a:?}");
}

#[tokio::test]
async fn the_socket_pushes_new_messages_to_their_user_on_every_replica() {
    let url = common::database().await;
    let origin = "https://app.example.com";
    let a = {
        let url = url.clone();
        Herald::start_with(move |s| {
            s.database_url = Some(url);
            s.cors_allowed_origins = vec![origin.into()];
        })
        .await
    };
    // A second replica: same namespace, same database, one socket at most.
    let mut settings = herald::settings::Settings::for_namespace(&a.ns.name);
    settings.database_url = Some(url.clone());
    settings.max_sockets = 1;
    let b = common::operator_with(&a.client(), settings).await;
    let b_base = format!("http://{}", b.addr);

    let pk = publishable_key(&a, CLIENT_SECRET, None).await;
    let jane = user_token("jane");
    wait_for_pk(&a, &pk, Some(&jane)).await;

    // Refused at upgrade: a forged token, a secret key, no key, an origin not allowed.
    let forged = sign(&keys().1, json!({"sub": "jane", "exp": now() + 3600}));
    assert_eq!(connect(&socket_url(&a.base, &pk, &forged), Some(origin)).await.err(), Some(403));
    assert_eq!(connect(&socket_url(&a.base, &a.key, &jane), Some(origin)).await.err(), Some(403));
    assert_eq!(connect(&format!("{}/ws/v1/websocket?vsn=2.0.0", a.base.replacen("http", "ws", 1)), Some(origin)).await.err(), Some(403));
    assert_eq!(connect(&socket_url(&a.base, &pk, &jane), Some("https://evil.example.com")).await.err(), Some(403));

    let mut on_a = connect(&socket_url(&a.base, &pk, &jane), Some(origin)).await.expect("connecting to replica a");
    // The second replica knows the key too (same key namespace); its one socket is taken after this.
    let mut on_b = wait_for("replica b to accept the socket", Duration::from_secs(30), || async { connect(&socket_url(&b_base, &pk, &jane), Some(origin)).await.ok() }).await;
    assert_eq!(connect(&socket_url(&b_base, &pk, &jane), Some(origin)).await.err(), Some(503));
    assert!(a.metrics().await.lines().any(|l| l == "herald_sockets_open 1"), "the open socket is counted: {}", a.metrics().await);

    // Heartbeat.
    send(&mut on_a, json!([null, "1", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next(&mut on_a).await, json!([null, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}]));

    // Join jane's feed with two feed clients: one unfiltered, one for another tenant only.
    let topic = "feeds:in-app:jane";
    let options = json!({"client_all": {"archived": "exclude", "mode": "compact", "status": "all"}, "client_other": {"tenant": "other", "has_tenant": true}});
    send(&mut on_a, json!(["2", "2", topic, "phx_join", options])).await;
    assert_eq!(next(&mut on_a).await, json!(["2", "2", topic, "phx_reply", {"status": "ok", "response": {}}]));
    send(&mut on_b, json!(["1", "1", topic, "phx_join", {"client_b": {}}])).await;
    assert_eq!(next(&mut on_b).await[4]["status"], "ok");

    // Another user's feed, and topics that are not feeds: refused.
    send(&mut on_a, json!(["3", "3", "feeds:in-app:bob", "phx_join", {"c": {}}])).await;
    assert_eq!(next(&mut on_a).await, json!(["3", "3", "feeds:in-app:bob", "phx_reply", {"status": "error", "response": {"reason": "unauthorized"}}]));
    send(&mut on_a, json!(["4", "4", "rooms:lobby", "phx_join", {}])).await;
    assert_eq!(next(&mut on_a).await[4]["status"], "error");

    // Both replicas listen (LISTEN/NOTIFY): then a message for jane reaches both sockets.
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    wait_for("both replicas to LISTEN", Duration::from_secs(30), || async {
        let row = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'herald-feed-listener' AND state = 'idle' AND query <> ''",
                &[],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 2).then_some(())
    })
    .await;
    let store = herald::store::Store::connect(&url).await.unwrap();
    new_feed_message(&db, &store, &a.ns.name, "in-app", "jane", None).await;

    let counts = json!({"total_count": 1, "unread_count": 1, "unseen_count": 1});
    let zero = json!({"total_count": 0, "unread_count": 0, "unseen_count": 0});
    let push = next(&mut on_a).await;
    assert_eq!(
        push,
        json!([null, null, topic, "new-message", {
            "event": "new-message", "metadata": counts,
            "data": {"client_all": {"metadata": counts}, "client_other": {"metadata": zero}},
            "attn": ["client_all"],
        }]),
    );
    let push = next(&mut on_b).await;
    assert_eq!((&push[3], &push[4]["attn"], &push[4]["data"]["client_b"]["metadata"]), (&json!("new-message"), &json!(["client_b"]), &counts));

    // A message for another user is not pushed to jane; her next one is.
    new_feed_message(&db, &store, &a.ns.name, "in-app", "bob", None).await;
    new_feed_message(&db, &store, &a.ns.name, "in-app", "jane", Some("other")).await;
    let push = next(&mut on_a).await;
    assert_eq!(push[4]["data"]["client_all"]["metadata"]["total_count"], 2, "{push}");
    assert_eq!(push[4]["data"]["client_other"]["metadata"]["total_count"], 1, "{push}");
    let mut attn: Vec<String> = serde_json::from_value(push[4]["attn"].clone()).unwrap();
    attn.sort();
    assert_eq!(attn, vec!["client_all", "client_other"]);
    assert_eq!(next(&mut on_b).await[4]["data"]["client_b"]["metadata"]["total_count"], 2);

    // Leave: an ok reply, then phx_close; no more pushes for that topic.
    send(&mut on_a, json!(["2", "5", topic, "phx_leave", {}])).await;
    assert_eq!(next(&mut on_a).await, json!(["2", "5", topic, "phx_reply", {"status": "ok", "response": {}}]));
    assert_eq!(next(&mut on_a).await, json!(["2", "2", topic, "phx_close", {}]));
    new_feed_message(&db, &store, &a.ns.name, "in-app", "jane", None).await;
    assert_eq!(next(&mut on_b).await[4]["data"]["client_b"]["metadata"]["total_count"], 3);
    send(&mut on_a, json!([null, "6", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next(&mut on_a).await[1], "6", "no push came before the heartbeat's reply");

    // A frame that is not Phoenix's closes the socket (and only it).
    send(&mut on_a, json!({"not": "a frame"})).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), on_a.next()).await.unwrap();
    assert!(matches!(closed, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == 1007), "{closed:?}");
    send(&mut on_b, json!([null, "9", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next(&mut on_b).await[1], "9");
    b.shutdown().await;
}

#[tokio::test]
async fn a_hostile_socket_client_loses_only_its_own_socket() {
    let url = common::database().await;
    let h = Herald::start_with(move |s| s.database_url = Some(url)).await;
    let pk = publishable_key(&h, CLIENT_SECRET, None).await;
    let jane = user_token("jane");
    wait_for_pk(&h, &pk, Some(&jane)).await;
    let socket_url = socket_url(&h.base, &pk, &jane);
    let mut calm = connect(&socket_url, None).await.unwrap();

    // Too many topics, too many client references, options that do not read: refused joins, the socket stays.
    let mut socket = connect(&socket_url, None).await.unwrap();
    for i in 0..herald::http::socket::MAX_TOPICS {
        send(&mut socket, json!([i.to_string(), i.to_string(), format!("feeds:channel-{i}:jane"), "phx_join", {}])).await;
        assert_eq!(next(&mut socket).await[4]["status"], "ok");
    }
    send(&mut socket, json!(["x", "x", "feeds:one-more:jane", "phx_join", {}])).await;
    assert_eq!(next(&mut socket).await[4]["status"], "error");
    let refs: serde_json::Map<String, Value> = (0..=herald::http::socket::MAX_CLIENT_REFS).map(|i| (format!("r{i}"), json!({}))).collect();
    send(&mut socket, json!(["y", "y", "feeds:channel-0:jane", "phx_join", refs])).await;
    assert_eq!(next(&mut socket).await[4]["status"], "error");
    send(&mut socket, json!(["z", "z", "feeds:channel-0:jane", "phx_join", {"r": {"archived": 3}}])).await;
    let refused = next(&mut socket).await;
    assert!(refused[4]["response"]["reason"].as_str().unwrap().contains("archived"), "{refused}");
    send(&mut socket, json!([null, "h", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next(&mut socket).await[4]["status"], "ok");

    // A frame over 64 KiB ends the socket.
    let huge = json!(["1", "1", "feeds:c:jane", "phx_join", {"r": {"tenant": "x".repeat(herald::http::socket::MAX_FRAME_BYTES)}}]);
    let _ = socket.send(Message::Text(huge.to_string().into())).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the socket outlived a frame over the limit");

    // Binary frames are not Phoenix's: closed with 1003.
    let mut binary = connect(&socket_url, None).await.unwrap();
    binary.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), binary.next()).await.unwrap();
    assert!(matches!(closed, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == 1003), "{closed:?}");

    // Meanwhile the calm client is served as ever.
    send(&mut calm, json!([null, "1", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next(&mut calm).await, json!([null, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}]));
}
