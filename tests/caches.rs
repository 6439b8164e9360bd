//! The watch caches keep what herald reads of each object (its record, by
//! id), not the object: no metadata bookkeeping, no kubectl copies, and
//! they follow edits, renames of ids and deletes.

mod common;

use std::time::Duration;

use common::{wait_for, TestNamespace};
use herald::resources::User;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

#[tokio::test]
async fn users_are_indexed_by_id_as_records_and_follow_edits() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let op = common::operator(&client, &ns.name).await;
    let user = |id: &str, name: &str| {
        json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "User",
            "metadata": {"name": "ann", "labels": {"plan": "pro"}, "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"a huge\": \"copy\"}"}},
            "spec": {"id": id, "name": name}
        })
    };
    let api = ns.api::<User>();
    api.patch("ann", &PatchParams::apply("test").force(), &Patch::Apply(&user("user_ann", "Ann"))).await.unwrap();
    let stores = &op.context.stores;
    // Found by id (not by resource name), as a record: properties and labels.
    let cached = wait_for("ann in the index", Duration::from_secs(30), || async { stores.users.get(&ns.name, &"user_ann".to_string()) }).await;
    assert_eq!(cached.record().properties["name"], "Ann");
    assert_eq!(cached.labels.get("plan").map(String::as_str), Some("pro"));
    assert!(stores.users.get(&ns.name, &"ann".to_string()).is_none(), "the resource name is not an id");

    // An edit that changes the id moves the entry.
    api.patch("ann", &PatchParams::apply("test").force(), &Patch::Apply(&user("user_anne", "Anne"))).await.unwrap();
    wait_for("the new id in the index", Duration::from_secs(30), || async {
        stores.users.get(&ns.name, &"user_anne".to_string()).filter(|u| u.record().properties["name"] == "Anne")
    })
    .await;
    assert!(stores.users.get(&ns.name, &"user_ann".to_string()).is_none());
    assert_eq!(stores.users.len(&ns.name), 1);

    // A delete removes it.
    api.delete("ann", &DeleteParams::default()).await.unwrap();
    wait_for("the user gone from the index", Duration::from_secs(30), || async { stores.users.get(&ns.name, &"user_anne".to_string()).is_none().then_some(()) }).await;
    assert_eq!(stores.users.len(&ns.name), 0);
}
