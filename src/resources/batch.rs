//! The `Batch` kind: one batch of a workflow's batch step, for one recipient
//! and batch key. Written only by herald; the rules are `core::batch`, the
//! store `controller::batch`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::batch::{BatchGroup, BatchState};

/// A batch: the group it belongs to and its state.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A batch of a Workflow's batch step for one recipient and batch key: the run that opened it waits until its window closes, later runs join it as activities. Written by herald and deleted once its run has continued (or when abandoned).",
    version = "v1alpha1",
    kind = "Batch",
    plural = "batches",
    namespaced,
    category = "herald",
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".spec.group.workflow"}"#,
    printcolumn = r#"{"name":"Step","type":"string","jsonPath":".spec.group.stepRef"}"#,
    printcolumn = r#"{"name":"Recipient","type":"string","jsonPath":".spec.group.recipient"}"#,
    printcolumn = r#"{"name":"Activities","type":"integer","jsonPath":".spec.state.totalActivities"}"#,
    printcolumn = r#"{"name":"ClosesAt","type":"string","format":"date-time","jsonPath":".spec.state.closesAt"}"#,
    printcolumn = r#"{"name":"Closed","type":"boolean","jsonPath":".spec.state.closed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BatchSpec {
    /// What the batch groups by: workflow, step, recipient and batch key.
    pub group: BatchGroup,
    /// The batch: its carrier run, window, activities and counts.
    pub state: BatchState,
}
