//! The `MemberSlice` kind: a bounded slice of one Object's subscribers or one
//! Audience's members, as EndpointSlices are of a Service's endpoints. A
//! membership of any size is many slices, so no resource grows with it and
//! none nears etcd's request limit; herald's API writes them, and they may
//! also be declared in Git.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::object::Subscription;

/// Members at most per slice (the schema refuses more).
pub const MAX_MEMBERS: usize = 1000;
/// Label naming the Object a slice belongs to (`<collection>.<id>`, shortened with a hash when needed).
pub const OBJECT_LABEL: &str = "herald.dev/object";
/// Label naming the Audience a slice belongs to (its key, shortened with a hash when needed).
pub const AUDIENCE_LABEL: &str = "herald.dev/audience";

/// Up to 1000 subscribers of one Object, or members of one Audience.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A slice of up to 1000 subscribers of one Object (spec.object) or members of one Audience (spec.audience). A large membership is many slices; `kubectl get memberslices -l herald.dev/object=<collection>.<id>` or `-l herald.dev/audience=<key>` lists them.",
    version = "v1alpha1",
    kind = "MemberSlice",
    plural = "memberslices",
    namespaced,
    shortname = "mslice",
    category = "herald",
    printcolumn = r#"{"name":"Collection","type":"string","jsonPath":".spec.object.collection"}"#,
    printcolumn = r#"{"name":"Object","type":"string","jsonPath":".spec.object.id"}"#,
    printcolumn = r#"{"name":"Audience","type":"string","jsonPath":".spec.audience"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MemberSliceSpec {
    /// The Object these are subscribers of (set this or `audience`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectTarget>,
    /// The Audience key these are members of (set this or `object`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Subscribers or members: `{recipient, properties}`, the recipient a user
    /// id string or an object reference `{id, collection}`. At most 1000.
    #[serde(default)]
    #[schemars(length(max = 1000))]
    pub members: Vec<Subscription>,
}

/// An Object by collection and id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct ObjectTarget {
    /// The Object's collection, e.g. `projects`.
    pub collection: String,
    /// The Object's id within its collection.
    pub id: String,
}

/// Whose members a slice holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MemberTarget {
    Object { collection: String, id: String },
    Audience(String),
}

impl MemberSliceSpec {
    /// Whose members these are; None for a slice naming neither or both.
    pub fn target(&self) -> Option<MemberTarget> {
        match (&self.object, &self.audience) {
            (Some(o), None) => Some(MemberTarget::Object { collection: o.collection.clone(), id: o.id.clone() }),
            (None, Some(key)) => Some(MemberTarget::Audience(key.clone())),
            _ => None,
        }
    }
}

impl MemberTarget {
    /// The label a slice of this target carries, and its value.
    pub fn label(&self) -> (&'static str, String) {
        match self {
            MemberTarget::Object { collection, id } => (OBJECT_LABEL, crate::core::ids::label_value(&format!("{collection}.{id}"))),
            MemberTarget::Audience(key) => (AUDIENCE_LABEL, crate::core::ids::label_value(key)),
        }
    }

    /// The name of this target's `n`th slice (herald's API names them so).
    pub fn slice_name(&self, n: usize) -> String {
        let base = match self {
            MemberTarget::Object { collection, id } => crate::core::ids::resource_name(&["subscribers", collection, id]),
            MemberTarget::Audience(key) => crate::core::ids::resource_name(&["members", key]),
        };
        format!("{base}-{n}")
    }

    /// For messages: "object `projects/p1`", "audience `pro`".
    pub fn what(&self) -> String {
        match self {
            MemberTarget::Object { collection, id } => format!("object `{collection}/{id}`"),
            MemberTarget::Audience(key) => format!("audience `{key}`"),
        }
    }
}

impl MemberSlice {
    /// A new, empty slice of `target`, labelled so kubectl can select it.
    pub fn for_target(target: &MemberTarget, name: &str) -> Self {
        let spec = match target {
            MemberTarget::Object { collection, id } => MemberSliceSpec { object: Some(ObjectTarget { collection: collection.clone(), id: id.clone() }), ..Default::default() },
            MemberTarget::Audience(key) => MemberSliceSpec { audience: Some(key.clone()), ..Default::default() },
        };
        let mut slice = MemberSlice::new(name, spec);
        let (label, value) = target.label();
        slice.metadata.labels = Some([(label.to_string(), value)].into());
        slice
    }
}
