//! The watch caches keep what herald reads of each object, not the
//! bookkeeping the apiserver and kubectl attach to it.

mod common;

use std::time::Duration;

use common::{wait_for, TestNamespace};
use herald::resources::User;
use kube::api::{Patch, PatchParams};
use serde_json::json;

#[tokio::test]
async fn cached_users_drop_managed_fields_and_the_last_applied_copy() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client).await;
    let op = common::operator(&client, &ns.name).await;
    let user = json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "User",
        "metadata": {"name": "ann", "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"a huge\": \"copy\"}", "team": "ops"}},
        "spec": {"id": "ann", "name": "Ann"}
    });
    // Server-side apply: the stored object has managedFields.
    let stored = ns.api::<User>().patch("ann", &PatchParams::apply("test").force(), &Patch::Apply(&user)).await.unwrap();
    assert!(stored.metadata.managed_fields.is_some());
    let cached = wait_for("ann in the cache", Duration::from_secs(30), || async { op.context.stores.users.get(&ns.name, "ann") }).await;
    assert_eq!(cached.spec.name.as_deref(), Some("Ann"));
    assert!(cached.metadata.managed_fields.is_none());
    let annotations = cached.metadata.annotations.clone().unwrap_or_default();
    assert!(!annotations.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
    assert_eq!(annotations.get("team").map(String::as_str), Some("ops"), "other annotations stay");
}
