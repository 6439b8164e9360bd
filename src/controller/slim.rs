//! Writes whose answer herald reads only the metadata of (the new
//! resourceVersion, a created run's uid): the apiserver is asked for a
//! PartialObjectMetadata (Kubernetes 1.15+), so a RecipientPage of 500
//! records is not encoded again, sent back and parsed after every
//! checkpoint, nor a trigger's spec after every create. Plain JSON is the
//! fallback for a server that cannot convert (its metadata reads the same).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::Request;
use kube::{Client, Resource};

const METADATA_ACCEPT: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json";

/// A written object's answer, metadata only.
#[derive(serde::Deserialize)]
struct StoredMetadata {
    #[serde(default)]
    metadata: ObjectMeta,
}

fn request<K>(namespace: &str) -> Request
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    Request::new(K::url_path(&Default::default(), Some(namespace)))
}

/// Sends `request` asking for the metadata only; `verb` names its span as kube's own calls do.
async fn send(client: &Client, mut request: http::Request<Vec<u8>>, verb: &'static str) -> Result<ObjectMeta, kube::Error> {
    request.headers_mut().insert(http::header::ACCEPT, http::HeaderValue::from_static(METADATA_ACCEPT));
    request.extensions_mut().insert(verb);
    let stored: StoredMetadata = client.request(request).await?;
    Ok(stored.metadata)
}

/// [`kube::Api::create`], answering the stored metadata.
pub async fn create<K>(client: &Client, namespace: &str, pp: &PostParams, object: &K) -> Result<ObjectMeta, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + serde::Serialize,
    <K as Resource>::DynamicType: Default,
{
    let body = serde_json::to_vec(object).map_err(kube::Error::SerdeError)?;
    let request = request::<K>(namespace).create(pp, body).map_err(kube::Error::BuildRequest)?;
    send(client, request, "create").await
}

/// [`kube::Api::patch`], answering the stored metadata.
pub async fn patch<K, P>(client: &Client, namespace: &str, name: &str, pp: &PatchParams, patch: &Patch<P>) -> Result<ObjectMeta, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
    P: serde::Serialize + std::fmt::Debug,
{
    patch_at::<K, P>(client, namespace, name, None, pp, patch).await
}

/// [`kube::Api::patch_status`], answering the stored metadata.
pub async fn patch_status<K, P>(client: &Client, namespace: &str, name: &str, pp: &PatchParams, patch: &Patch<P>) -> Result<ObjectMeta, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
    P: serde::Serialize + std::fmt::Debug,
{
    patch_at::<K, P>(client, namespace, name, Some("status"), pp, patch).await
}

/// A patch of the object, or of one of its subresources.
async fn patch_at<K, P>(client: &Client, namespace: &str, name: &str, subresource: Option<&str>, pp: &PatchParams, patch: &Patch<P>) -> Result<ObjectMeta, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
    P: serde::Serialize + std::fmt::Debug,
{
    let request = request::<K>(namespace);
    let request = match subresource {
        Some(sub) => request.patch_subresource(sub, name, pp, patch),
        None => request.patch(name, pp, patch),
    };
    send(client, request.map_err(kube::Error::BuildRequest)?, if subresource.is_some() { "patch_status" } else { "patch" }).await
}
