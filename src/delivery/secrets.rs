//! Secrets, read with `get` through the Kubernetes API and cached briefly.
//!
//! herald only needs `get` on Secrets (no list or watch, which would expose
//! every Secret in the namespace to the operator). A short cache keeps a
//! 10,000-recipient fan-out from issuing 10,000 reads, and concurrent
//! deliveries share one read ("single flight"); a rotated key is picked up
//! within [`TTL`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::sync::OnceCell;

/// How long a read (or a "not found") is reused.
pub const TTL: Duration = Duration::from_secs(10);

/// A Secret's decoded data.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretData {
    pub resource_version: String,
    data: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for SecretData {
    // Never print the values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretData").field("resource_version", &self.resource_version).field("keys", &self.data.keys().collect::<Vec<_>>()).finish()
    }
}

impl SecretData {
    pub fn new(resource_version: &str, data: BTreeMap<String, Vec<u8>>) -> Self {
        SecretData { resource_version: resource_version.to_string(), data }
    }

    fn from_secret(secret: Secret) -> Self {
        let mut data: BTreeMap<String, Vec<u8>> = secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
        // stringData is write-only in the API, but a Secret built in memory may carry it.
        for (k, v) in secret.string_data.unwrap_or_default() {
            data.entry(k).or_insert_with(|| v.into_bytes());
        }
        SecretData { resource_version: secret.metadata.resource_version.unwrap_or_default(), data }
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.data.get(key).map(Vec::as_slice)
    }

    /// A value as text (SMTP logins), or None when it is missing or not UTF-8.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// The result of a read: the Secret, or None when it does not exist.
pub type Lookup = Option<Arc<SecretData>>;

struct Entry {
    fetched: Instant,
    cell: Arc<OnceCell<Lookup>>,
}

/// Cached Secret reads.
pub struct SecretCache {
    client: Client,
    entries: Mutex<HashMap<(String, String), Entry>>,
}

impl SecretCache {
    pub fn new(client: Client) -> Self {
        SecretCache { client, entries: Mutex::new(HashMap::new()) }
    }

    /// The Secret `name` in `namespace`, from the cache when it is fresh.
    /// API errors are not cached: the next call reads again.
    pub async fn get(&self, namespace: &str, name: &str) -> Result<Lookup, kube::Error> {
        let cell = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let key = (namespace.to_string(), name.to_string());
            match entries.get(&key) {
                Some(e) if e.fetched.elapsed() < TTL => e.cell.clone(),
                _ => {
                    let cell = Arc::new(OnceCell::new());
                    entries.insert(key, Entry { fetched: Instant::now(), cell: cell.clone() });
                    cell
                }
            }
        };
        cell.get_or_try_init(|| self.read(namespace, name)).await.cloned()
    }

    /// Reads the Secret now, bypassing and then refreshing the cache (the
    /// Channel reconciler's periodic check).
    pub async fn refresh(&self, namespace: &str, name: &str) -> Result<Lookup, kube::Error> {
        let lookup = self.read(namespace, name).await?;
        let cell = Arc::new(OnceCell::new_with(Some(lookup.clone())));
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.insert((namespace.to_string(), name.to_string()), Entry { fetched: Instant::now(), cell });
        Ok(lookup)
    }

    async fn read(&self, namespace: &str, name: &str) -> Result<Lookup, kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?.map(|s| Arc::new(SecretData::from_secret(s))))
    }
}
