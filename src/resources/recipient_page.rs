//! The `RecipientPage` kind: a page of a TriggerRun's per-recipient status.
//! Keeping recipients in pages owned by the run keeps the run itself small
//! (Tekton's answer to status outgrowing etcd's request limit); how many
//! recipients a page holds and how its records are compacted so that the
//! page itself always fits is `core::status` (`plan_pages`, `fit_page`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::status::RecipientStatus;

/// Per-recipient status for part of a TriggerRun's recipients.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A page of a TriggerRun's recipients (up to 500; fewer for workflows with many steps), each with its recipient run id, state and step outcomes. Owned by the run and written by herald, compacted as needed so that it always fits etcd's request limit.",
    version = "v1alpha1",
    kind = "RecipientPage",
    namespaced,
    status = "RecipientPageStatus",
    shortname = "rp",
    category = "herald",
    printcolumn = r#"{"name":"Run","type":"string","jsonPath":".spec.triggerRun"}"#,
    printcolumn = r#"{"name":"Page","type":"integer","jsonPath":".spec.index"}"#,
    printcolumn = r#"{"name":"Recipients","type":"integer","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RecipientPageSpec {
    /// The TriggerRun this page belongs to.
    pub trigger_run: String,
    /// The page's position, from 0.
    pub index: i32,
    /// How many recipients the page holds.
    pub size: i32,
}

/// The recipients of one page.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipientPageStatus {
    /// One entry per recipient, in the run's order.
    #[serde(default)]
    pub recipients: Vec<RecipientStatus>,
}
