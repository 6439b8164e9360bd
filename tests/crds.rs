//! The CRDs: generated from the Rust types, committed in crds/, installed on a
//! real apiserver, which refuses objects that break their schema.

mod common;

use kube::api::{DynamicObject, PostParams};
use kube::discovery::ApiResource;
use kube::Api;
use serde_json::json;

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = common::repo_path("crds");
    let mut expected_files = Vec::new();
    for crd in herald::crds::all() {
        let file = herald::crds::file_name(&crd);
        let path = dir.join(&file);
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("crds/{file} is missing; run `cargo run -- crds --dir crds`"));
        assert_eq!(committed, herald::crds::to_yaml(&crd), "crds/{file} is stale; run `cargo run -- crds --dir crds`");
        expected_files.push(file);
    }
    let mut found: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    found.sort();
    expected_files.sort();
    assert_eq!(found, expected_files, "crds/ holds files no kind generates");
}

#[test]
fn schemas_use_no_unsigned_integers_and_describe_every_field() {
    fn walk(path: &str, v: &serde_json::Value, problems: &mut Vec<String>) {
        if let Some(obj) = v.as_object() {
            if let Some(format) = obj.get("format").and_then(|f| f.as_str()) {
                if format.starts_with("uint") {
                    problems.push(format!("{path}: unsigned format {format}"));
                }
            }
            if let Some(props) = obj.get("properties").and_then(|p| p.as_object()) {
                for (name, prop) in props {
                    let p = format!("{path}.{name}");
                    let skip = path.is_empty() && (name == "apiVersion" || name == "kind" || name == "metadata");
                    if !skip && prop.get("description").is_none() {
                        problems.push(format!("{p}: no description"));
                    }
                    walk(&p, prop, problems);
                }
            }
            if let Some(items) = obj.get("items") {
                walk(&format!("{path}[]"), items, problems);
            }
        }
    }
    let mut problems = Vec::new();
    for crd in herald::crds::all() {
        for version in &crd.spec.versions {
            let schema = serde_json::to_value(&version.schema.as_ref().unwrap().open_api_v3_schema).unwrap();
            walk(&crd.spec.names.kind, &schema, &mut problems);
        }
    }
    // Condition fields come from Kubernetes' own type and carry its descriptions.
    assert!(problems.is_empty(), "schema problems:\n{}", problems.join("\n"));
}

fn trigger_runs(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let ar =
        ApiResource { group: "herald.dev".into(), version: "v1alpha1".into(), api_version: "herald.dev/v1alpha1".into(), kind: "TriggerRun".into(), plural: "triggerruns".into() };
    Api::namespaced_with(client.clone(), ns, &ar)
}

async fn create_err(api: &Api<DynamicObject>, spec: serde_json::Value) -> String {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun",
        "metadata": {"generateName": "bad-"}, "spec": spec
    }))
    .unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Ok(o) => panic!("the apiserver accepted an invalid TriggerRun: {:?}", o.metadata.name),
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            s.message
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn the_apiserver_refuses_objects_that_break_the_schema() {
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    let api = trigger_runs(&client, &ns.name);

    let message = create_err(&api, json!({"recipients": ["user_1"], "data": {}})).await;
    assert!(message.contains("spec.workflow") && message.contains("Required"), "{message}");
    let message = create_err(&api, json!({"workflow": "w", "recipients": "user_1"})).await;
    assert!(message.contains("spec.recipients") && message.contains("array"), "{message}");
    let message = create_err(&api, json!({"workflow": "w", "recipients": ["u"], "data": "text"})).await;
    assert!(message.contains("spec.data") && message.contains("object"), "{message}");
    let message = create_err(&api, json!({"workflow": "w", "recipients": ["u"], "ttlSecondsAfterFinished": -1})).await;
    assert!(message.contains("ttlSecondsAfterFinished"), "{message}");
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let message = create_err(&api, json!({"workflow": "w", "recipients": too_many})).await;
    assert!(message.contains("spec.recipients"), "{message}");

    // The shape users write is accepted, unknown properties of inline recipients kept.
    let ok: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun",
        "metadata": {"generateName": "ok-"},
        "spec": {"workflow": "w", "recipients": ["user_1", {"id": "p1", "collection": "projects"},
                 {"id": "user_9", "name": "Nine", "$trigger_data": {"extra": 1}}],
                 "data": {"nested": {"deep": [1, 2]}}, "tenant": "acme", "cancellationKey": "c"}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &ok).await.expect("valid TriggerRun");
    assert_eq!(created.data["spec"]["recipients"][2]["$trigger_data"]["extra"], 1);
    assert_eq!(created.data["spec"]["data"]["nested"]["deep"][1], 2);

    // A workflow's steps are bounded (a recipient's record holds one entry per step).
    let workflows: Api<herald::resources::Workflow> = ns.api();
    let step = |r: String| json!({"ref": r, "type": "delay", "delay": {"duration": "1s"}});
    // (The wording varies with the Kubernetes version; the limit is named.)
    for (steps, limit) in [((0..51).map(|i| step(format!("s{i}"))).collect::<Vec<_>>(), "50"), (vec![step("r".repeat(65))], "64")] {
        let wf: herald::resources::Workflow = serde_json::from_value(json!({"metadata": {"generateName": "wf-"}, "spec": {"steps": steps}})).unwrap();
        match workflows.create(&PostParams::default(), &wf).await {
            Err(kube::Error::Api(s)) => assert!(s.code == 422 && s.message.contains("spec.steps") && s.message.contains(limit), "{s:?}"),
            other => panic!("a Workflow breaking its limits was not refused: {other:?}"),
        }
    }
}

#[tokio::test]
async fn examples_apply_cleanly() {
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client).await;
    for file in ["workflow.yaml", "users.yaml", "objects.yaml", "channel.yaml"] {
        common::apply_yaml(&ns, &common::read_example(file)).await;
    }
    let users: Api<herald::resources::User> = ns.api();
    assert_eq!(users.list(&Default::default()).await.unwrap().items.len(), 3);
}
