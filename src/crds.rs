//! Every CustomResourceDefinition, generated from the Rust types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::json;

use crate::resources::{Audience, Batch, Cancellation, Channel, MemberSlice, Object, RecipientPage, Schedule, Tenant, Throttle, TriggerRun, User, Workflow};

/// Every CRD, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    let mut trigger_run = TriggerRun::crd();
    make_spec_immutable(&mut trigger_run);
    let mut member_slice = MemberSlice::crd();
    one_target(&mut member_slice);
    vec![
        Workflow::crd(),
        trigger_run,
        RecipientPage::crd(),
        User::crd(),
        Object::crd(),
        Tenant::crd(),
        Audience::crd(),
        member_slice,
        Channel::crd(),
        Cancellation::crd(),
        Batch::crd(),
        Throttle::crd(),
        Schedule::crd(),
    ]
}

/// A CEL rule: a MemberSlice names exactly one Object or Audience.
fn one_target(crd: &mut CustomResourceDefinition) {
    for version in &mut crd.spec.versions {
        let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) else { continue };
        if let Some(spec) = schema.properties.as_mut().and_then(|p| p.get_mut("spec")) {
            let rule = json!({"rule": "has(self.object) != has(self.audience)", "message": "a MemberSlice names exactly one of object and audience"});
            spec.x_kubernetes_validations = Some(vec![serde_json::from_value(rule).expect("static CEL rule")]);
        }
    }
}

/// A CEL rule that refuses spec changes (honoured by Kubernetes 1.25+; the
/// controller also never acts on a changed spec).
fn make_spec_immutable(crd: &mut CustomResourceDefinition) {
    for version in &mut crd.spec.versions {
        let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) else { continue };
        if let Some(spec) = schema.properties.as_mut().and_then(|p| p.get_mut("spec")) {
            let rule = json!({"rule": "self == oldSelf", "message": "spec is immutable: create a new TriggerRun instead"});
            spec.x_kubernetes_validations = Some(vec![serde_json::from_value(rule).expect("static CEL rule")]);
        }
    }
}

/// The file name a CRD is stored under in crds/.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.spec.names.singular.clone().unwrap_or_else(|| crd.spec.names.kind.to_lowercase()))
}

/// A CRD as YAML.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    serde_yaml::to_string(crd).expect("CRDs serialize")
}
