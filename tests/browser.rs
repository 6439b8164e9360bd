//! Knock's own React feed components against herald, in a real browser (issue
//! 12): tests/browser is a small Vite page with `KnockProvider`,
//! `KnockFeedProvider`, `NotificationIconButton` and `NotificationFeedPopover`
//! from npm (`@knocklabs/react`, pinned by tests/browser/package-lock.json);
//! this test serves it from its own origin, points it at herald through its
//! query string and drives it in headless Chromium (Debian's `chromium`,
//! through `playwright-core`, tests/browser/drive.mjs): a trigger through the
//! API shows up as the unread badge and the rendered message without a reload
//! (the real-time socket), the popover opens, "Mark all as read" marks them
//! read, and herald's feed API reads the new counts back.
//!
//! scripts/test.sh installs Chromium, runs `npm ci` and builds the page; this
//! test builds it itself when dist/ is missing or older than its sources.

mod api_support;
mod common;

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use api_support::Herald;
use common::wait_for;
use herald::resources::{Channel, User};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::Api;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn run(dir: &Path, program: &str, args: &[&str]) {
    let status =
        std::process::Command::new(program).args(args).current_dir(dir).status().unwrap_or_else(|e| panic!("running {program} (scripts/test.sh installs Node.js and npm): {e}"));
    assert!(status.success(), "{program} {} in {} failed", args.join(" "), dir.display());
}

fn newest_change(path: &Path) -> SystemTime {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if meta.is_dir() {
        std::fs::read_dir(path).unwrap().map(|e| newest_change(&e.unwrap().path())).max().unwrap_or(SystemTime::UNIX_EPOCH)
    } else {
        meta.modified().unwrap()
    }
}

/// The built page (tests/browser/dist): installs the packages and builds
/// when scripts/test.sh has not (or the sources changed since).
fn ensure_page() -> PathBuf {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: the browser test needs Debian's chromium package (scripts/test.sh installs it: apt-get install chromium)");
    let dir = browser_dir();
    if !dir.join("node_modules/@knocklabs/react/package.json").exists() || !dir.join("node_modules/playwright-core/package.json").exists() {
        run(&dir, "npm", &["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
    }
    let built = dir.join("dist/index.html");
    let sources = ["src", "index.html", "vite.config.js", "package-lock.json"].iter().map(|p| newest_change(&dir.join(p))).max().unwrap();
    if !built.exists() || newest_change(&built) < sources {
        run(&dir, "npm", &["run", "build"]);
    }
    assert!(built.exists(), "npm run build left no {}", built.display());
    dir.join("dist")
}

/// A static file server for the built page, on its own port (so its origin
/// differs from herald's, as in production: every API call is cross-origin).
struct PageServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_file(root: &Path, uri: &axum::http::Uri) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let rel = Path::new(uri.path().trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = if rel.as_os_str().is_empty() { root.join("index.html") } else { root.join(rel) };
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-store")], bytes).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

impl PageServer {
    async fn start(root: PathBuf) -> PageServer {
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let root = root.clone();
            async move { serve_file(&root, &uri).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        PageServer { addr, task }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Chromium driven by tests/browser/drive.mjs, one JSON command per line.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    async fn launch() -> Browser {
        let mut child = tokio::process::Command::new("node")
            .arg("drive.mjs")
            .current_dir(browser_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("running node (scripts/test.sh installs Node.js)");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut browser = Browser { child, stdin, lines };
        let ready = browser.answer(Duration::from_secs(60)).await;
        assert_eq!(ready["ready"], true, "{ready}");
        browser
    }

    async fn answer(&mut self, timeout: Duration) -> Value {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("drive.mjs did not answer within {timeout:?}"))
            .expect("reading drive.mjs")
            .unwrap_or_else(|| panic!("drive.mjs exited (status {:?})", self.child.try_wait()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Sends a command and returns its answer, whether it succeeded or not.
    async fn try_send(&mut self, command: Value) -> Value {
        let timeout_ms = command["timeout"].as_u64().unwrap_or(15_000);
        self.stdin.write_all(format!("{command}\n").as_bytes()).await.expect("writing to drive.mjs");
        self.stdin.flush().await.unwrap();
        self.answer(Duration::from_millis(timeout_ms) + Duration::from_secs(30)).await
    }

    /// Sends a command; panics (with what the page did) when it failed.
    async fn send(&mut self, command: Value) -> Value {
        let answer = self.try_send(command.clone()).await;
        if answer["ok"] != true {
            let state = self.try_send(json!({"cmd": "state"})).await;
            let shot = std::env::temp_dir().join(format!("herald-browser-{}.png", uuid::Uuid::new_v4().simple()));
            self.try_send(json!({"cmd": "screenshot", "path": shot})).await;
            panic!("{command} failed: {answer}\nscreenshot: {}\npage state: {state:#}", shot.display());
        }
        answer
    }
}

async fn trigger(h: &Herald, body: Value) {
    let a = h.call("POST", "/v1/workflows/comment/trigger", Some(body)).await;
    assert_eq!(a.status, 200, "{a:?}");
    let run = a.body["workflow_run_id"].as_str().unwrap().to_string();
    h.wait_finished(&run).await;
}

/// The feed's counts through herald's API (with the secret key, as a server would read them).
async fn counts(h: &Herald, user: &str) -> (i64, i64, i64, Value) {
    let a = h.call("GET", &format!("/v1/users/{user}/feeds/feed"), None).await;
    assert_eq!(a.status, 200, "{a:?}");
    let m = &a.body["meta"];
    (m["total_count"].as_i64().unwrap(), m["unread_count"].as_i64().unwrap(), m["unseen_count"].as_i64().unwrap(), a.body)
}

/// Runs openssl, as the README tells customers to make their key pair.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl").args(args).output().expect("running openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// What the page authenticates with, as a customer's backend would set it up:
/// a publishable key in a key Secret with the public key of an RSA pair, and a
/// user token (RS256, as Knock's `signUserToken` makes it) signed with the
/// private key. Waits until herald accepts them.
async fn client_credentials(h: &Herald, user: &str) -> (String, String) {
    let dir = std::env::temp_dir().join(format!("herald-browser-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("private.pem");
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", private.to_str().unwrap()]);
    let public = String::from_utf8(openssl(&["pkey", "-in", private.to_str().unwrap(), "-pubout"])).unwrap();
    let private = std::fs::read(&private).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let pk = format!("pk_test_{}", uuid::Uuid::new_v4().simple());
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "herald-client-key", "labels": {"herald.dev/api-key": "true"}},
        "stringData": {"publishableKey": pk, "userTokenPublicKey": public},
    }))
    .unwrap();
    Api::<Secret>::namespaced(h.client(), &h.ns.name).create(&PostParams::default(), &secret).await.expect("creating the key Secret");

    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let claims =
        json!({"sub": user, "iat": now, "exp": now + 3600, "grants": {format!("https://api.knock.app/v1/users/{user}"): {"user/feed_read": [{}], "user/feed_write": [{}]}}});
    let token = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &EncodingKey::from_rsa_pem(&private).unwrap()).unwrap();

    wait_for("herald to accept the publishable key", Duration::from_secs(30), || async {
        let headers = [("authorization".to_string(), format!("Bearer {pk}")), ("x-knock-user-token".to_string(), token.clone())];
        let a = h.raw("GET", &format!("/v1/users/{user}/feeds/feed"), &headers, None).await;
        (a.status == 200).then_some(())
    })
    .await;
    (pk, token)
}

fn page_url(page: &PageServer, h: &Herald, key: &str, token: &str, user: &str, feed: &str) -> String {
    let query: String = url_query(&[("host", &h.base), ("key", key), ("token", token), ("user", user), ("feed", feed)]);
    format!("{}/index.html?{query}", page.origin())
}

fn url_query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap()
}

#[tokio::test]
async fn knocks_react_feed_components_update_live_against_herald_in_chromium() {
    let dist = ensure_page();
    let page = PageServer::start(dist).await;
    let url = common::database().await;
    // The page calls herald from its own origin: herald allows exactly that one.
    let origin = page.origin();
    let h = Herald::start_with(move |s| {
        s.database_url = Some(url);
        s.cors_allowed_origins = vec![origin];
    })
    .await;

    // An in-app Channel, the reader and an actor, a workflow with an in-app step.
    h.create::<Channel>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "Channel", "metadata": {"name": "feed"}, "spec": {"type": "in_app_feed"}})).await;
    for (id, name) in [("jane", "Jane Doe"), ("u1", "User One")] {
        h.create::<User>(json!({"apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": id}, "spec": {"id": id, "name": name}})).await;
    }
    h.cached(&["jane", "u1"]).await;
    wait_for("the Channel in herald's cache", Duration::from_secs(20), || async { h.op.as_ref().unwrap().context.stores.channels.get(&h.ns.name, "feed").map(|_| ()) }).await;
    h.workflow(
        "comment",
        json!({"steps": [{"ref": "in_app", "type": "channel", "channel": "feed",
            "template": {"markdownBody": "**{{ actor.name }}** commented on {{ data.page }}", "actionUrl": "https://app.example/p/{{ data.page }}"}}]}),
    )
    .await;
    // Knock's feed ids are the in-app channel's UUID: herald takes the Channel's uid.
    let feed_id = h.api::<Channel>().get("feed").await.unwrap().metadata.uid.unwrap();
    let (key, token) = client_credentials(&h, "u1").await;

    let mut browser = Browser::launch().await;
    let opened = browser.send(json!({"cmd": "open", "url": page_url(&page, &h, &key, &token, "u1", &feed_id)})).await;
    assert_eq!(opened["feedStatus"], 200, "{opened}");
    let joined = browser.send(json!({"cmd": "waitSocket"})).await;
    assert_eq!(joined["topic"], format!("feeds:{feed_id}:u1"), "{joined}");
    assert_eq!(browser.send(json!({"cmd": "badge"})).await["count"], 0, "an empty feed shows no badge");

    // A trigger through the API: the badge and the rendered message appear, pushed over the socket, without a reload.
    trigger(&h, json!({"recipients": ["u1"], "actor": "jane", "data": {"page": "p1"}})).await;
    let badge = browser.send(json!({"cmd": "waitBadge", "count": 1, "timeout": 10_000})).await;
    let item = browser.send(json!({"cmd": "waitItem", "text": "commented on p1", "timeout": 10_000})).await;
    assert_eq!(item["html"].as_str().map(str::trim), Some("<p><strong>Jane Doe</strong> commented on p1</p>"), "the Markdown body rendered by herald, shown as HTML: {item}");
    assert_eq!(item["visible"], false, "the popover is still closed");
    let state = browser.send(json!({"cmd": "state"})).await;
    assert_eq!(state["loads"], 1, "the page was not reloaded");
    let pushes: Vec<&Value> = state["sockets"].as_array().unwrap().iter().flat_map(|s| s["received"].as_array().unwrap()).filter(|f| f[3] == "new-message").collect();
    assert!(!pushes.is_empty(), "herald pushed new-message over the socket: {state:#}");
    eprintln!("the badge showed 1 within {} ms of the run finishing", badge["elapsedMs"]);

    // Open the popover: the message shows, unread; opening marks the feed seen.
    browser.send(json!({"cmd": "openPopover"})).await;
    let items = browser.send(json!({"cmd": "items"})).await;
    let items = items["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!((&items[0]["visible"], &items[0]["unread"]), (&json!(true), &json!(true)), "{items:?}");
    wait_for("the popover to mark the feed seen", Duration::from_secs(10), || async {
        let (total, unread, unseen, _) = counts(&h, "u1").await;
        ((total, unread, unseen) == (1, 1, 0)).then_some(())
    })
    .await;

    // A second message lands while the popover is open.
    trigger(&h, json!({"recipients": ["u1"], "actor": "jane", "data": {"page": "p2"}})).await;
    let item = browser.send(json!({"cmd": "waitItem", "text": "commented on p2", "timeout": 10_000})).await;
    assert_eq!(item["visible"], true, "{item}");
    browser.send(json!({"cmd": "waitBadge", "count": 2, "timeout": 10_000})).await;

    // Click the first message: Knock's cell marks it interacted (and, in the client's own state, read).
    let clicked = browser.send(json!({"cmd": "clickItem", "text": "commented on p1"})).await;
    let clicked_id = clicked["clicked"][0].as_str().expect("the clicked item's id").to_string();
    browser.send(json!({"cmd": "waitBadge", "count": 1})).await;
    wait_for("herald to record the click", Duration::from_secs(10), || async {
        let (_, _, _, body) = counts(&h, "u1").await;
        body["entries"].as_array().unwrap().iter().find(|e| e["id"] == clicked_id.as_str()).filter(|e| e["interacted_at"].is_string()).map(|_| ())
    })
    .await;

    // Mark all as read: the badge goes, and herald's counts say so.
    let marked = browser.send(json!({"cmd": "markAllRead"})).await;
    assert_eq!(marked["status"], 200, "{marked}");
    browser.send(json!({"cmd": "waitBadge", "count": 0})).await;
    let items = browser.send(json!({"cmd": "items"})).await;
    assert!(items["items"].as_array().unwrap().iter().all(|i| i["unread"] == false), "{items}");
    let (total, unread, unseen, body) = counts(&h, "u1").await;
    assert_eq!((total, unread, unseen), (2, 0, 0), "{body:#}");
    assert!(body["entries"].as_array().unwrap().iter().all(|e| e["read_at"].is_string() && e["seen_at"].is_string()), "{body:#}");

    // Nothing went wrong on the way: no script errors, no failed call to herald, one page load.
    let state = browser.send(json!({"cmd": "state"})).await;
    assert_eq!(state["loads"], 1, "the page was never reloaded");
    assert_eq!(state["pageErrors"], json!([]), "{state:#}");
    let failed: Vec<&Value> =
        state["requests"].as_array().unwrap().iter().filter(|r| r["url"].as_str().unwrap().starts_with(&h.base) && !matches!(r["status"].as_u64(), Some(200..=299))).collect();
    assert!(failed.is_empty(), "calls to herald that failed: {failed:#?}");
    browser.send(json!({"cmd": "close"})).await;
}
