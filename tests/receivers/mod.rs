//! Real receivers for delivery tests: an HTTP server that records every
//! request and answers as scripted (failures, Retry-After, slowness), and a
//! real SMTP server (Python's aiosmtpd) run as a subprocess.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// One request the HTTP receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// The query string, if any.
    pub query: String,
    /// Header names lowercased.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: SystemTime,
    /// What the receiver answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// An answer of the HTTP receiver.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: String,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply { status, retry_after: None, body: String::new() }
    }
    pub fn retry_after(mut self, value: &str) -> Self {
        self.retry_after = Some(value.into());
        self
    }
    pub fn body(mut self, body: &str) -> Self {
        self.body = body.into();
        self
    }
}

#[derive(Default)]
struct Path {
    /// Answers for the next requests, in order; then `always`, else 200.
    script: Vec<Reply>,
    always: Option<Reply>,
    delay: Duration,
}

#[derive(Default)]
struct Inner {
    /// Requests that have arrived (answered or not yet).
    arrived: std::sync::atomic::AtomicUsize,
    received: Mutex<Vec<Received>>,
    paths: Mutex<HashMap<String, Path>>,
}

/// An HTTP receiver on 127.0.0.1, stopped when dropped.
pub struct HttpReceiver {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(inner): State<Arc<Inner>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    inner.arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = uri.path().to_string();
    let (reply, delay) = {
        let mut paths = inner.paths.lock().unwrap();
        let p = paths.entry(path.clone()).or_default();
        let reply = if p.script.is_empty() { p.always.clone().unwrap_or_else(|| Reply::status(200)) } else { p.script.remove(0) };
        (reply, p.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    inner.received.lock().unwrap().push(Received {
        method: method.to_string(),
        path,
        query: uri.query().unwrap_or_default().to_string(),
        headers: headers.iter().map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.to_str().unwrap_or_default().to_string())).collect(),
        body: body.to_vec(),
        at: SystemTime::now(),
        status: reply.status,
    });
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body.clone()).into_response();
    if let Some(ra) = &reply.retry_after {
        response.headers_mut().insert("retry-after", ra.parse().unwrap());
    }
    response
}

impl HttpReceiver {
    pub async fn start() -> HttpReceiver {
        let inner = Arc::new(Inner::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the HTTP receiver");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HttpReceiver { addr, inner, task }
    }

    /// The URL of `path` on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next requests to `path` get these answers, in order.
    pub fn script(&self, path: &str, replies: Vec<Reply>) {
        self.inner.paths.lock().unwrap().entry(path.into()).or_default().script = replies;
    }

    /// Every request to `path` (after the script) gets this answer.
    pub fn always(&self, path: &str, reply: Reply) {
        self.inner.paths.lock().unwrap().entry(path.into()).or_default().always = Some(reply);
    }

    /// Requests to `path` are answered after this long.
    pub fn slow(&self, path: &str, delay: Duration) {
        self.inner.paths.lock().unwrap().entry(path.into()).or_default().delay = delay;
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }

    pub fn received_at(&self, path: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.path == path).collect()
    }

    /// Requests that have arrived, including those still waiting for their answer.
    pub fn arrived(&self) -> usize {
        self.inner.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests answered.
    pub fn count(&self) -> usize {
        self.inner.received.lock().unwrap().len()
    }
}

/// One message the SMTP server got.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Mail {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    /// The whole message: headers and body.
    pub data: String,
    pub authenticated: bool,
    pub login: Option<String>,
}

impl Mail {
    /// A header's (first line of) value.
    pub fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.data.lines().take_while(|l| !l.is_empty()).find(|l| l.to_ascii_lowercase().starts_with(&prefix)).map(|l| l[prefix.len()..].trim().to_string())
    }
}

/// A real SMTP server (aiosmtpd) on 127.0.0.1, stopped when dropped.
pub struct SmtpReceiver {
    pub port: u16,
    out: PathBuf,
    child: Child,
}

impl Drop for SmtpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}

impl SmtpReceiver {
    /// Starts the server; with `login`, it requires AUTH with these credentials.
    /// Python 3 and aiosmtpd are required: their absence fails the test, saying so.
    pub fn start(login: Option<(&str, &str)>) -> SmtpReceiver {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/receivers/smtp_server.py");
        let out = std::env::temp_dir().join(format!("herald-smtp-{}.jsonl", uuid::Uuid::new_v4().simple()));
        let mut command = Command::new("python3");
        command.arg(&script).arg("--out").arg(&out).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        if let Some((user, password)) = login {
            command.args(["--user", user, "--password", password]);
        }
        let mut child =
            command.spawn().unwrap_or_else(|e| panic!("cannot start python3 for the SMTP test server ({e}); install Python 3 and `pip install aiosmtpd` (scripts/test.sh does)"));
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("reading the SMTP server's first line");
        let port = match line.trim().strip_prefix("READY ") {
            Some(p) => p.parse().expect("port"),
            None => {
                let _ = child.kill();
                panic!("the SMTP test server did not start: {:?} (is aiosmtpd installed? `pip install aiosmtpd`; scripts/test.sh does)", line.trim());
            }
        };
        SmtpReceiver { port, out, child }
    }

    /// Every message received so far.
    pub fn mails(&self) -> Vec<Mail> {
        let Ok(text) = std::fs::read_to_string(&self.out) else { return Vec::new() };
        text.lines().map(|l| serde_json::from_str(l).expect("SMTP record")).collect()
    }
}
