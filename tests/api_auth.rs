//! Authentication and scope of the HTTP API: API key Secrets (their own
//! namespace only, compared in constant time), and Kubernetes ServiceAccount
//! tokens (TokenReview, then SubjectAccessReview per route) with and without
//! RBAC permission.

mod api_support;
mod common;

use std::time::Duration;

use api_support::{create_key, json_headers, new_key, Herald};
use common::{wait_for, TestNamespace};
use herald::resources::TriggerRun;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

#[tokio::test]
async fn api_keys_act_only_in_their_namespace() {
    let h = Herald::start().await;
    h.workflow("w", json!({"steps": []})).await;
    let trigger = json!({"recipients": ["u1"]});
    let path = "/v1/workflows/w/trigger";

    // No key, wrong keys, wrong schemes.
    let a = h.raw("POST", path, &[("content-type".into(), "application/json".into())], Some(trigger.to_string().into_bytes())).await;
    a.assert_error(401, "api_key_missing");
    assert_eq!(a.header("www-authenticate"), Some("Bearer"));
    h.raw("POST", path, &[("authorization".into(), "Bearer ".into())], Some(trigger.to_string().into_bytes())).await.assert_error(401, "api_key_missing");
    h.call_as("sk_wrong_key_of_the_right_length", "POST", path, Some(trigger.clone())).await.assert_error(401, "authentication_required");
    h.call_as(&format!("{}x", h.key), "POST", path, Some(trigger.clone())).await.assert_error(401, "authentication_required");
    h.call_as(&h.key[..h.key.len() - 1], "POST", path, Some(trigger.clone())).await.assert_error(401, "authentication_required");
    let basic = vec![("authorization".to_string(), format!("Basic {}", h.key))];
    h.raw("POST", path, &basic, Some(trigger.to_string().into_bytes())).await.assert_error(401, "authentication_required");
    // Something that looks like a Kubernetes token but is not one.
    h.call_as("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJub2JvZHkifQ.c2lnbmF0dXJl", "POST", path, Some(trigger.clone())).await.assert_error(401, "authentication_required");

    // A key of another namespace is unknown here (this herald serves one namespace).
    let other = TestNamespace::new(&h.client()).await;
    let foreign = new_key();
    create_key(&h.client(), &other.name, "herald-api-key", &foreign).await;
    // A Secret without the label, and a key too short to be safe, are not keys either.
    let unlabelled = new_key();
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "not-a-key"}, "stringData": {"key": unlabelled}})).unwrap();
    h.api::<Secret>().create(&PostParams::default(), &secret).await.unwrap();
    create_key(&h.client(), &h.ns.name, "short-key", "abc123").await;
    // A second key, written with a trailing newline as `--from-file` would.
    let second = new_key();
    create_key(&h.client(), &h.ns.name, "second-key", &format!("{second}\n")).await;
    h.wait_for_key(&second).await;
    for token in [foreign.as_str(), unlabelled.as_str(), "abc123"] {
        h.call_as(token, "POST", path, Some(trigger.clone())).await.assert_error(401, "authentication_required");
    }
    assert!(h.names::<TriggerRun>().await.is_empty());

    // An API key names its namespace; asking for another is forbidden.
    let mut headers = json_headers(&second);
    headers.push(("x-herald-namespace".into(), other.name.clone()));
    h.raw("POST", path, &headers, Some(trigger.to_string().into_bytes())).await.assert_error(403, "forbidden");
    let mut headers = json_headers(&second);
    headers.push(("x-herald-namespace".into(), h.ns.name.clone()));
    let a = h.raw("POST", path, &headers, Some(trigger.to_string().into_bytes())).await;
    assert_eq!(a.status, 200, "{a:?}");
    let run = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items.remove(0);
    assert_eq!(run.annotations()["herald.dev/api-caller"], format!("apikey:{}/second-key", h.ns.name));

    // Deleting the Secret revokes the key.
    h.api::<Secret>().delete("second-key", &DeleteParams::default()).await.unwrap();
    wait_for("the deleted key to be refused", Duration::from_secs(20), || async { (h.call_as(&second, "GET", "/v1/users/u1", None).await.status == 401).then_some(()) }).await;
    assert_eq!(h.call("GET", "/v1/users/u1", None).await.status, 404, "the first key still works");
}

/// API keys live in one namespace (herald lists and watches Secrets only
/// there) and act in the namespace their annotation names.
#[tokio::test]
async fn api_keys_live_in_the_key_namespace_and_act_where_they_say() {
    let client = common::client().await;
    let (team_a, team_b, keys) = (TestNamespace::new(&client).await, TestNamespace::new(&client).await, TestNamespace::new(&client).await);
    let mut settings = herald::settings::Settings::for_namespace(&team_a.name);
    settings.namespaces.push(team_b.name.clone());
    settings.api_key_namespace = Some(keys.name.clone());
    let op = common::operator_with(&client, settings).await;
    let key_a = new_key();
    create_annotated_key(&client, &keys.name, "team-a-key", &key_a, Some(&team_a.name)).await;
    let h = Herald { base: format!("http://{}", op.addr), op: Some(op), ns: team_a, key: key_a.clone(), http: reqwest::Client::new() };
    h.wait_for_key(&key_a).await;
    h.workflow("w", json!({"steps": []})).await;
    let trigger = json!({"recipients": ["u1"]});
    let a = h.call("POST", "/v1/workflows/w/trigger", Some(trigger.clone())).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(h.names::<TriggerRun>().await.len(), 1, "the run is in the namespace the key names");
    let run = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items.remove(0);
    assert_eq!(run.annotations()["herald.dev/api-caller"], format!("apikey:{}/team-a-key", h.ns.name));

    // Refused: a labelled key Secret in a served namespace that is not the key
    // namespace (herald does not list Secrets there), a key naming a namespace
    // herald does not serve, and a key with no annotation (it would act in the
    // key namespace, which is not served).
    let in_team_b = new_key();
    create_annotated_key(&client, &team_b.name, "herald-api-key", &in_team_b, None).await;
    let elsewhere = new_key();
    create_annotated_key(&client, &keys.name, "elsewhere", &elsewhere, Some("kube-system")).await;
    let plain = new_key();
    create_annotated_key(&client, &keys.name, "plain", &plain, None).await;
    // A key for team-b, created last: once herald knows it, it has seen the others.
    let key_b = new_key();
    create_annotated_key(&client, &keys.name, "team-b-key", &key_b, Some(&team_b.name)).await;
    h.wait_for_key(&key_b).await;
    for token in [&in_team_b, &elsewhere, &plain] {
        h.call_as(token, "GET", "/v1/users/u1", None).await.assert_error(401, "authentication_required");
    }
    // team-b's key acts in team-b only.
    let mut headers = json_headers(&key_b);
    headers.push(("x-herald-namespace".into(), h.ns.name.clone()));
    h.raw("GET", "/v1/users/u1", &headers, None).await.assert_error(403, "forbidden");
}

async fn create_annotated_key(client: &kube::Client, namespace: &str, name: &str, key: &str, acts_in: Option<&str>) {
    let mut metadata = json!({"name": name, "labels": {"herald.dev/api-key": "true"}});
    if let Some(ns) = acts_in {
        metadata["annotations"] = json!({"herald.dev/namespace": ns});
    }
    let secret: Secret = serde_json::from_value(json!({"metadata": metadata, "stringData": {"key": key}})).unwrap();
    Api::<Secret>::namespaced(client.clone(), namespace).create(&PostParams::default(), &secret).await.expect("creating an API key Secret");
}

async fn service_account_token(h: &Herald, name: &str) -> String {
    let sas: Api<ServiceAccount> = h.api();
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let request = TokenRequest { spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(3600), ..Default::default() }, ..Default::default() };
    let token = sas.create_token_request(name, &PostParams::default(), &request).await.expect("TokenRequest");
    token.status.expect("token status").token
}

#[tokio::test]
async fn service_account_tokens_need_rbac_permission() {
    let h = Herald::start().await;
    h.workflow("deploys", json!({"steps": []})).await;
    let pipeline = service_account_token(&h, "pipeline").await;
    let bystander = service_account_token(&h, "bystander").await;
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "herald-trigger"},
        "rules": [{"apiGroups": ["herald.dev"], "resources": ["triggerruns"], "verbs": ["create", "get"]}]
    }))
    .unwrap();
    h.api::<Role>().create(&PostParams::default(), &role).await.unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "pipeline-triggers"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "herald-trigger"},
        "subjects": [{"kind": "ServiceAccount", "name": "pipeline", "namespace": h.ns.name}]
    }))
    .unwrap();
    h.api::<RoleBinding>().create(&PostParams::default(), &binding).await.unwrap();
    let trigger = json!({"recipients": ["u1"], "data": {"sha": "abc"}});

    // With permission (RBAC takes a moment to see the new binding).
    let a = wait_for("the pipeline to be allowed", Duration::from_secs(40), || async {
        let a = h.call_as(&pipeline, "POST", "/v1/workflows/deploys/trigger", Some(trigger.clone())).await;
        (a.status == 200).then_some(a)
    })
    .await;
    let run_id = a.body["workflow_run_id"].as_str().unwrap().to_string();
    let run = h.api::<TriggerRun>().list(&Default::default()).await.unwrap().items.remove(0);
    assert_eq!(run.uid().as_deref(), Some(run_id.as_str()));
    assert_eq!(run.annotations()["herald.dev/api-caller"], format!("system:serviceaccount:{}:pipeline", h.ns.name));
    assert_eq!(h.call_as(&pipeline, "GET", &format!("/v1/workflow_runs/{run_id}"), None).await.status, 200);
    // Permission is per route: the Role says nothing of users or cancellations.
    h.call_as(&pipeline, "PUT", "/v1/users/u1", Some(json!({"name": "x"}))).await.assert_error(403, "forbidden");
    h.call_as(&pipeline, "POST", "/v1/workflows/deploys/cancel", Some(json!({"cancellation_key": "k"}))).await.assert_error(403, "forbidden");
    // The namespace header must name a namespace this herald serves.
    let mut headers = json_headers(&pipeline);
    headers.push(("x-herald-namespace".into(), "kube-system".into()));
    h.raw("POST", "/v1/workflows/deploys/trigger", &headers, Some(trigger.to_string().into_bytes())).await.assert_error(403, "forbidden");
    let mut headers = json_headers(&pipeline);
    headers.push(("x-herald-namespace".into(), h.ns.name.clone()));
    assert_eq!(h.raw("POST", "/v1/workflows/deploys/trigger", &headers, Some(trigger.to_string().into_bytes())).await.status, 200);

    // Without permission.
    let a = h.call_as(&bystander, "POST", "/v1/workflows/deploys/trigger", Some(trigger.clone())).await;
    a.assert_error(403, "forbidden");
    assert!(a.body["message"].as_str().unwrap().contains("bystander"), "{a:?}");
    h.call_as(&bystander, "GET", "/v1/users/u1", None).await.assert_error(403, "forbidden");
    assert_eq!(h.names::<TriggerRun>().await.len(), 2);
}

/// Binds a Role with `rules` to the ServiceAccount `sa`.
async fn grant(h: &Herald, sa: &str, rules: serde_json::Value) {
    let role: Role = serde_json::from_value(json!({"metadata": {"name": sa}, "rules": rules})).unwrap();
    h.api::<Role>().create(&PostParams::default(), &role).await.unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": sa},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": h.ns.name}]
    }))
    .unwrap();
    h.api::<RoleBinding>().create(&PostParams::default(), &binding).await.unwrap();
}

#[tokio::test]
async fn inline_recipients_need_the_permission_to_update_users() {
    let h = Herald::start().await;
    h.workflow("deploys", json!({"steps": []})).await;
    let pipeline = service_account_token(&h, "pipeline").await;
    let identifier = service_account_token(&h, "identifier").await;
    grant(&h, "pipeline", json!([{"apiGroups": ["herald.dev"], "resources": ["triggerruns"], "verbs": ["create"]}])).await;
    grant(
        &h,
        "identifier",
        json!([{"apiGroups": ["herald.dev"], "resources": ["triggerruns"], "verbs": ["create"]}, {"apiGroups": ["herald.dev"], "resources": ["users", "tenants"], "verbs": ["update"]}]),
    )
    .await;
    assert_eq!(h.call("PUT", "/v1/users/user_1", Some(json!({"email": "ada@example.com"}))).await.status, 200);
    let plain = json!({"recipients": ["user_1"]});
    wait_for("the pipeline to be allowed", Duration::from_secs(40), || async {
        (h.call_as(&pipeline, "POST", "/v1/workflows/deploys/trigger", Some(plain.clone())).await.status == 200).then_some(())
    })
    .await;

    // Allowed to trigger, not to rewrite users: inline recipients, actor and tenants are refused.
    let takeover = json!({"recipients": [{"id": "user_1", "email": "m@evil.example"}]});
    let a = h.call_as(&pipeline, "POST", "/v1/workflows/deploys/trigger", Some(takeover.clone())).await;
    a.assert_error(403, "forbidden");
    let actor = json!({"recipients": ["user_1"], "actor": {"id": "user_1", "email": "m@evil.example"}});
    h.call_as(&pipeline, "POST", "/v1/workflows/deploys/trigger", Some(actor)).await.assert_error(403, "forbidden");
    let tenant = json!({"recipients": ["user_1"], "tenant": {"id": "acme", "name": "Evil"}});
    h.call_as(&pipeline, "POST", "/v1/workflows/deploys/trigger", Some(tenant.clone())).await.assert_error(403, "forbidden");
    assert_eq!(h.call("GET", "/v1/users/user_1", None).await.body["email"], "ada@example.com");

    // With `update` on users and tenants, the trigger identifies them before it is accepted.
    let a = wait_for("the identifier to be allowed", Duration::from_secs(40), || async {
        let a = h.call_as(&identifier, "POST", "/v1/workflows/deploys/trigger", Some(takeover.clone())).await;
        (a.status == 200).then_some(a)
    })
    .await;
    assert!(a.body["workflow_run_id"].is_string());
    assert_eq!(h.call("GET", "/v1/users/user_1", None).await.body["email"], "m@evil.example");
    assert_eq!(h.call_as(&identifier, "POST", "/v1/workflows/deploys/trigger", Some(tenant)).await.status, 200);
    assert_eq!(h.call("GET", "/v1/tenants/acme", None).await.body["name"], "Evil");
}
