//! Watching objects that herald may not be able to read.
//!
//! A CRD schema cannot say everything herald needs (a preference entry that
//! is `true`/`false` or `{channel_types: ...}` is "any value" to a structural
//! schema), so the apiserver may store an object that herald's types refuse.
//! A watch of `K` fails on the first such object: its list never completes,
//! the cache never fills, and every run (and the API) waits forever. So
//! herald watches [`Lenient<K>`]: an object it cannot read is kept as
//! [`Lenient::Invalid`] with its metadata and the reason, skipped by every
//! lookup, reported on the object (a Warning Event) and counted in
//! `herald_invalid_resources`; everything else goes on.

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// A watched object, read or not.
#[derive(Clone, Debug)]
pub enum Lenient<K> {
    Valid(Arc<K>),
    /// An object herald's types refuse: its metadata (boxed: rare, and large), and why.
    Invalid {
        metadata: Box<ObjectMeta>,
        error: String,
    },
}

impl<K> Lenient<K> {
    /// The object, if herald could read it.
    pub fn valid(&self) -> Option<&Arc<K>> {
        match self {
            Lenient::Valid(k) => Some(k),
            Lenient::Invalid { .. } => None,
        }
    }

    /// Why herald could not read it, if it could not.
    pub fn error(&self) -> Option<&str> {
        match self {
            Lenient::Valid(_) => None,
            Lenient::Invalid { error, .. } => Some(error),
        }
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        match serde_path_to_error::deserialize::<_, K>(&value) {
            Ok(k) => Ok(Lenient::Valid(Arc::new(k))),
            Err(e) => {
                // `spec.preferences.default.workflows.deploy: ...`: the path says which field to fix.
                // Metadata always reads (the apiserver wrote it); if even that fails, so does the event.
                let metadata = ObjectMeta::deserialize(value.get("metadata").unwrap_or(&serde_json::Value::Null)).map_err(serde::de::Error::custom)?;
                Ok(Lenient::Invalid { metadata: Box::new(metadata), error: crate::core::truncate(&e.to_string(), 500) })
            }
        }
    }
}

impl<K> Resource for Lenient<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match self {
            Lenient::Valid(k) => k.meta(),
            Lenient::Invalid { metadata, .. } => metadata,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Lenient::Valid(k) => Arc::make_mut(k).meta_mut(),
            Lenient::Invalid { metadata, .. } => metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::User;
    use serde_json::json;

    #[test]
    fn an_unreadable_object_keeps_its_metadata_and_the_reason() {
        let ok: Lenient<User> = serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "a", "namespace": "n"}, "spec": {"id": "u1"}
        }))
        .unwrap();
        assert_eq!(ok.valid().unwrap().spec.id, "u1");
        let bad: Lenient<User> = serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "User", "metadata": {"name": "b", "namespace": "n", "resourceVersion": "7"},
            "spec": {"id": "u2", "preferences": {"default": {"workflows": {"deploy": "false"}}}}
        }))
        .unwrap();
        assert!(bad.valid().is_none());
        assert_eq!(bad.meta().name.as_deref(), Some("b"));
        assert_eq!(bad.meta().resource_version.as_deref(), Some("7"));
        assert!(bad.error().unwrap().starts_with("spec.preferences.default.workflows.deploy"), "{:?}", bad.error());
    }
}
