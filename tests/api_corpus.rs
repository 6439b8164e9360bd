//! The bad-input corpus: malformed JSON, invalid UTF-8, wrong types, huge and
//! deeply nested bodies, oversize and undecodable ids, sent to every route.
//! Every answer must be a 4xx with Knock's error body, nothing may be created,
//! and herald must keep serving.

mod api_support;
mod common;

use api_support::{json_headers, resource_counts, Herald};
use serde_json::json;

/// Every write route, with bodies of the right shape but wrong types, and
/// (where the body names recipients, workflows or lists) control characters
/// and oversize ids.
fn write_routes() -> Vec<(&'static str, String, Vec<serde_json::Value>)> {
    let long = "x".repeat(10_000);
    vec![
        (
            "POST",
            "/v1/workflows/w/trigger".into(),
            vec![
                json!({"recipients": {"a": 1}, "data": 5}),
                json!({"recipients": ["u\u{0}"]}),
                json!({"recipients": [{"id": long}]}),
                json!({"recipients": [{"id": "p", "collection": long}]}),
                json!({"recipients": ["u1"], "actor": {"id": "a\u{7}"}}),
                json!({"recipients": ["u1"], "tenant": long}),
                json!({"recipients": ["u1"], "cancellation_key": long}),
            ],
        ),
        (
            "POST",
            "/v1/workflows/w/cancel".into(),
            vec![json!({"cancellation_key": [], "recipients": "u1"}), json!({"cancellation_key": "k", "recipients": ["u\u{7}"]}), json!({"cancellation_key": long})],
        ),
        (
            "POST",
            "/v1/notify".into(),
            vec![
                json!({"name": 5, "recipients": "x", "data": []}),
                json!({"name": "a\u{7}b", "recipients": ["u1"], "data": {}}),
                json!({"name": long, "recipients": ["u1"], "data": {}}),
                json!({"name": "w", "lists": [long], "data": {}}),
                json!({"name": "w", "recipients": ["u1"], "data": {}, "idempotencyKey": long}),
            ],
        ),
        ("PUT", "/v1/users/u1".into(), vec![json!({"email": 5, "preferences": []}), json!({"id": "other"}), json!({"preferences": {"default": {"nope": 1}}})]),
        ("PUT", "/v1/users/u1/preferences/default".into(), vec![json!({"channel_types": 5}), json!({"channel_types": {"email": "yes"}})]),
        ("PUT", "/v1/users/u1/channel_data/chat".into(), vec![json!({"data": 5}), json!({})]),
        ("PUT", "/v1/objects/projects/p1".into(), vec![json!({"channel_data": 5}), json!({"collection": "other"})]),
        (
            "POST",
            "/v1/objects/projects/p1/subscriptions".into(),
            vec![json!({"recipients": 5}), json!({"recipients": ["u\u{0}"]}), json!({"recipients": [long]}), json!({"recipients": ["u1"], "properties": 5})],
        ),
        ("DELETE", "/v1/objects/projects/p1/subscriptions".into(), vec![json!({"recipients": [{"id": 5}]}), json!({"recipients": [long]})]),
        ("PUT", "/v1/tenants/t1".into(), vec![json!({"name": [], "settings": 5}), json!({"settings": {"branding": 5}})]),
    ]
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// Bodies no route may accept.
fn bad_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let huge = serde_json::to_vec(&json!({"recipients": ["u1"], "data": {"blob": "x".repeat(2 * 1024 * 1024)}})).unwrap();
    vec![
        ("empty", b"".to_vec()),
        ("whitespace", b"  \n\t ".to_vec()),
        ("truncated", br#"{"recipients": ["u1""#.to_vec()),
        ("unbalanced", b"}".to_vec()),
        ("single quotes", b"{'recipients': ['u1']}".to_vec()),
        ("trailing comma", br#"{"recipients": ["u1"],}"#.to_vec()),
        ("bare word", b"nul".to_vec()),
        ("invalid utf-8", b"\xff\xfe{\"recipients\": [\"u1\"]}".to_vec()),
        ("invalid utf-8 in a string", b"{\"recipients\": [\"\xc3\x28\"], \"cancellation_key\": \"k\"}".to_vec()),
        ("byte order mark", "\u{feff}{\"recipients\": [\"u1\"]}".as_bytes().to_vec()),
        ("NaN", br#"{"recipients": ["u1"], "data": {"x": NaN}}"#.to_vec()),
        ("number out of range", br#"{"recipients": ["u1"], "data": {"x": 1e999999}}"#.to_vec()),
        ("lone surrogate", br#"{"recipients": ["\ud800"], "data": 5}"#.to_vec()),
        ("two documents", br#"{"recipients": ["u1"]} {"recipients": ["u2"]}"#.to_vec()),
        ("null", b"null".to_vec()),
        ("number", b"42".to_vec()),
        ("string", br#""recipients""#.to_vec()),
        ("array", b"[]".to_vec()),
        ("array of objects", br#"[{"recipients": ["u1"]}]"#.to_vec()),
        ("deep array", nested(100_000).into_bytes()),
        ("deep object", format!("{}1{}", r#"{"a":"#.repeat(5_000), "}".repeat(5_000)).into_bytes()),
        ("deep data", format!(r#"{{"recipients": ["u1"], "data": {{"x": {}}}}}"#, nested(200)).into_bytes()),
        ("huge", huge),
    ]
}

/// Paths no route may accept: oversize, control characters, undecodable.
fn bad_paths() -> Vec<(&'static str, String)> {
    let long = "x".repeat(300);
    vec![
        ("GET", format!("/v1/users/{long}")),
        ("PUT", format!("/v1/users/{long}")),
        ("DELETE", format!("/v1/users/{long}")),
        ("GET", "/v1/users/%FF%FE".into()),
        ("GET", "/v1/users/a%00b".into()),
        ("GET", "/v1/users/a%0Ab/preferences/default".into()),
        ("GET", format!("/v1/users/u1/preferences/{long}")),
        ("GET", "/v1/users/u1/preferences/default?tenant=".into()),
        ("GET", format!("/v1/users/u1/preferences/default?tenant={long}")),
        ("GET", "/v1/users/u1/preferences/default?tenant=a%00".into()),
        ("GET", format!("/v1/users/u1/channel_data/{long}")),
        ("GET", format!("/v1/objects/{long}/p1")),
        ("GET", format!("/v1/objects/projects/{long}")),
        ("GET", "/v1/objects/%C3%28/p1".into()),
        ("GET", format!("/v1/tenants/{long}")),
        ("POST", format!("/v1/workflows/{long}/trigger")),
        ("POST", "/v1/workflows/%FF/cancel".into()),
        ("GET", "/v1/workflow_runs/123".into()),
        ("GET", format!("/v1/workflow_recipient_runs/{long}")),
        ("GET", "/v1/users".into()),
        ("GET", "/v1/users/u1/preferences".into()),
        ("POST", "/v1/users/u1".into()),
        ("GET", "/v1/../../etc/passwd".into()),
    ]
}

#[tokio::test]
async fn every_bad_input_is_a_4xx_and_creates_nothing() {
    let h = Herald::start().await;
    h.workflow("w", json!({"dataSchema": {"type": "object"}, "steps": []})).await;
    let mut failures = Vec::new();
    let mut count = 0;

    let mut check = |what: String, a: api_support::Answer| {
        count += 1;
        let knock_body = ["code", "message", "status", "type"].iter().all(|k| !a.body[k].is_null());
        if !(400..500).contains(&a.status) || !knock_body || a.body["status"] != a.status {
            failures.push(format!("{what}: {} {}", a.status, a.text.chars().take(300).collect::<String>()));
        }
    };

    for (method, path, bodies) in write_routes() {
        for body in &bodies {
            let a = h.call(method, &path, Some(body.clone())).await;
            check(format!("{method} {path} {}", body.to_string().chars().take(80).collect::<String>()), a);
        }
        let body = &bodies[0];
        for (name, bytes) in bad_bodies() {
            let a = h.raw(method, &path, &json_headers(&h.key), Some(bytes)).await;
            check(format!("{method} {path} {name}"), a);
        }
        // Without any credentials, nothing is even read.
        let a = h.raw(method, &path, &[], Some(body.to_string().into_bytes())).await;
        check(format!("{method} {path} no key"), a);
    }
    for (method, path) in bad_paths() {
        let a = h.raw(method, &path, &json_headers(&h.key), Some(br#"{"recipients": ["u1"], "cancellation_key": "k", "data": {}}"#.to_vec())).await;
        check(format!("{method} {path}"), a);
    }
    // Headers: an oversize Idempotency-Key, a malformed namespace header.
    let mut headers = json_headers(&h.key);
    headers.push(("idempotency-key".into(), "k".repeat(1000)));
    check("oversize idempotency key".into(), h.raw("POST", "/v1/workflows/w/trigger", &headers, Some(br#"{"recipients": ["u1"]}"#.to_vec())).await);
    let mut headers = json_headers(&h.key);
    headers.push(("x-herald-namespace".into(), "Not A Namespace!".into()));
    check("malformed namespace header".into(), h.raw("POST", "/v1/workflows/w/trigger", &headers, Some(br#"{"recipients": ["u1"]}"#.to_vec())).await);

    assert!(failures.is_empty(), "{} of {count} bad inputs were not refused properly:\n{}", failures.len(), failures.join("\n"));
    let counts = resource_counts(&h).await;
    assert!(counts.values().all(|n| *n == 0), "bad input created resources: {counts:?}");

    // Herald is still serving and still accepts a good trigger.
    assert_eq!(h.raw("GET", "/healthz", &[], None).await.status, 200);
    let a = h.call("POST", "/v1/workflows/w/trigger", Some(json!({"recipients": ["u1"], "data": {}}))).await;
    assert_eq!(a.status, 200, "{a:?}");
}
