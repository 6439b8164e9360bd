//! The `RecipientPage` kind: a page of a TriggerRun's per-recipient status.
//! Keeping recipients in pages owned by the run keeps the run itself small
//! (Tekton's answer to status outgrowing etcd's request limit); how many
//! recipients a page holds and how its records are compacted so that the
//! page itself always fits is `core::status` (`plan_pages`, `fit_page`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::core::status::RecipientStatus;

/// The label that holds a page's workflow run id (its TriggerRun's uid):
/// `kubectl get rp -l herald.dev/workflow-run-id=<id>`.
pub const WORKFLOW_RUN_ID_LABEL: &str = "herald.dev/workflow-run-id";
/// The annotation that holds the recipient run ids of a page's recipients,
/// in order, set when the page is created (they never change); a TriggerRun
/// that keeps its records inline (no pages) carries it too, for its own
/// recipients. What the API's index reads from a metadata-only watch to find
/// a recipient run by id without reading status. 32 hex digits an id, no
/// separator.
pub const RECIPIENT_RUN_IDS_ANNOTATION: &str = "herald.dev/recipient-run-ids";

/// The [`RECIPIENT_RUN_IDS_ANNOTATION`] of these recipients.
pub fn encode_recipient_run_ids(recipients: &[RecipientStatus]) -> String {
    recipients.iter().map(|r| Uuid::parse_str(&r.recipient_run_id).unwrap_or_default().simple().to_string()).collect()
}

/// The ids in a [`RECIPIENT_RUN_IDS_ANNOTATION`]; None when it is malformed.
pub fn decode_recipient_run_ids(annotation: &str) -> Option<Vec<Uuid>> {
    let bytes = annotation.as_bytes();
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    bytes.chunks(32).map(|chunk| std::str::from_utf8(chunk).ok().and_then(|hex| Uuid::try_parse(hex).ok())).collect()
}

/// Per-recipient status for part of a TriggerRun's recipients.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A page of a TriggerRun's recipients (up to 500; fewer for workflows with many steps), each with its recipient run id, state and step outcomes. Owned by the run and written by herald, compacted as needed so that it always fits etcd's request limit. A page is created with its recipients' run ids (annotation herald.dev/recipient-run-ids); its records are written by its first save, once its recipients are done or 500 ms after.",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipient_run_ids_round_trip_through_the_annotation() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let recipients: Vec<RecipientStatus> = ids.iter().map(|id| RecipientStatus { recipient_run_id: id.to_string(), ..Default::default() }).collect();
        let annotation = encode_recipient_run_ids(&recipients);
        assert_eq!(annotation.len(), 3 * 32);
        assert_eq!(decode_recipient_run_ids(&annotation), Some(ids));
        assert_eq!(decode_recipient_run_ids(""), Some(vec![]));
        for bad in ["abc", &"g".repeat(32), &"é".repeat(16)] {
            assert_eq!(decode_recipient_run_ids(bad), None, "{bad}");
        }
    }
}
