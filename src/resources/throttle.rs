//! The `Throttle` kind: the durable state of one throttle step gate (one
//! workflow step, recipient and key), written only by herald. What it means
//! and how runs pass it is `core::throttle`; how it is read and written
//! exactly is `controller::throttle`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::throttle::{ThrottleGroup, ThrottleState};

/// Which gate this is (workflow, step, recipient, key) and its current window
/// with the recipient runs it admitted. herald creates it when the first run
/// passes, opens a new window in it when a run arrives after the window ended,
/// and deletes it once the window has ended. Herald writes it only when it
/// admits a run, conditionally on the version it read.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "The current window of a workflow's throttle step for one recipient and key, and the recipient runs it admitted. Written by herald; deleting it opens a new window for the next run.",
    version = "v1alpha1",
    kind = "Throttle",
    namespaced,
    shortname = "thr",
    category = "herald",
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".spec.workflow"}"#,
    printcolumn = r#"{"name":"Step","type":"string","jsonPath":".spec.stepRef"}"#,
    printcolumn = r#"{"name":"Recipient","type":"string","jsonPath":".spec.recipient"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".spec.key","priority":1}"#,
    printcolumn = r#"{"name":"Admitted","type":"integer","jsonPath":".spec.admittedCount"}"#,
    printcolumn = r#"{"name":"Limit","type":"integer","jsonPath":".spec.limit"}"#,
    printcolumn = r#"{"name":"WindowEnd","type":"string","jsonPath":".spec.state.windowEnd"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleSpec {
    /// The workflow key.
    pub workflow: String,
    /// The `ref` of the workflow's throttle step.
    pub step_ref: String,
    /// The recipient: `user:<id>` or `object:<collection>:<id>`.
    pub recipient: String,
    /// The step's rendered throttle key; absent when the step has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// The step's limit (runs per window) when herald last wrote this throttle.
    pub limit: i32,
    /// How many runs the current window admitted (the length of `state.admitted`), for `kubectl get`.
    #[serde(default)]
    pub admitted_count: i32,
    /// The current window and the recipient runs it admitted.
    pub state: ThrottleState,
}

impl ThrottleSpec {
    /// The spec of `group`'s throttle holding `state`.
    pub fn new(group: &ThrottleGroup, limit: u32, state: ThrottleState) -> Self {
        ThrottleSpec {
            workflow: group.workflow.clone(),
            step_ref: group.step_ref.clone(),
            recipient: group.recipient.clone(),
            key: group.key.clone(),
            limit: i32::try_from(limit).unwrap_or(i32::MAX),
            admitted_count: i32::try_from(state.admitted.len()).unwrap_or(i32::MAX),
            state,
        }
    }

    /// The group this throttle counts.
    pub fn group(&self) -> ThrottleGroup {
        ThrottleGroup { workflow: self.workflow.clone(), step_ref: self.step_ref.clone(), recipient: self.recipient.clone(), key: self.key.clone() }
    }
}

impl Throttle {
    /// A new Throttle for `group`, named and labelled after it.
    pub fn for_group(group: &ThrottleGroup, limit: u32, state: ThrottleState) -> Self {
        let mut throttle = Throttle::new(&group.name(), ThrottleSpec::new(group, limit, state));
        throttle.metadata.labels = Some(group.labels());
        throttle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::RecipientKey;

    #[test]
    fn a_throttle_is_named_and_labelled_after_its_group() {
        let group = ThrottleGroup::new("deploy", "throttle_1", &RecipientKey::object("projects", "p1"), "a-42");
        let state = ThrottleState { window_start: "2024-05-01T10:00:00Z".parse().unwrap(), window_end: "2024-05-01T11:00:00Z".parse().unwrap(), admitted: vec!["x".into()] };
        let throttle = Throttle::for_group(&group, 3, state);
        assert_eq!(throttle.metadata.name.as_deref(), Some(group.name().as_str()));
        assert_eq!(throttle.metadata.labels.as_ref(), Some(&group.labels()));
        assert_eq!((throttle.spec.limit, throttle.spec.admitted_count), (3, 1));
        assert_eq!(throttle.spec.group(), group);
        assert_eq!(ThrottleSpec::new(&group, u32::MAX, ThrottleState::default()).limit, i32::MAX);
    }
}
