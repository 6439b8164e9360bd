//! The `Tenant` kind: a customer of your product, scoping preferences.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::model::{JsonObject, PreferenceSet};

/// A tenant. Triggers name it by `id`; its default preferences apply to its users.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    doc = "A tenant (a customer of your product): its default preferences apply to its users' notifications.",
    version = "v1alpha1",
    kind = "Tenant",
    namespaced,
    category = "herald",
    printcolumn = r#"{"name":"ID","type":"string","jsonPath":".spec.id"}"#,
    printcolumn = r#"{"name":"Name","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// The tenant's id.
    pub id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any other properties, visible to templates as `tenant.<key>`.
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub properties: JsonObject,
    /// Tenant settings.
    #[serde(default)]
    pub settings: TenantSettings,
}

/// Tenant settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantSettings {
    /// Default preferences for the tenant's users: below a user's tenant-specific
    /// set, above the user's default set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference_set: Option<PreferenceSet>,
    /// Branding for templates (logo, colours...), visible as `tenant.settings.branding`.
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schemars(schema_with = "crate::resources::schema::free_form_object")]
    pub branding: JsonObject,
}
