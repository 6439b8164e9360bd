//! Who is calling, and in which namespace (herald's "environment").
//!
//! * An API key is a Secret in herald's key namespace (`--api-key-namespace`)
//!   labelled `herald.dev/api-key: "true"`, whose data key `key` holds the
//!   token. It acts only in the namespace its annotation `herald.dev/namespace`
//!   names (default: the key namespace itself). Keeping keys in one namespace
//!   means herald lists and watches Secrets there only: RBAC cannot narrow a
//!   list to labelled Secrets, and elsewhere herald needs only `get` (for the
//!   Secrets Channels name). Keys are indexed by the SHA-256 of the key; the
//!   presented token is then compared with the stored key in constant time.
//! * A Kubernetes token (a ServiceAccount's, for in-cluster pipelines) is
//!   checked with a TokenReview; every action is then authorized with a
//!   SubjectAccessReview for the matching herald resource and verb in the
//!   namespace named by `X-Herald-Namespace` (default: the served namespace,
//!   else the ServiceAccount's own). Both reviews are cached briefly.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::errors::ApiError;
use crate::settings::Settings;

/// The label that marks a Secret as a herald API key.
pub const API_KEY_LABEL: &str = "herald.dev/api-key";
/// The annotation naming the namespace an API key acts in.
pub const API_KEY_NAMESPACE_ANNOTATION: &str = "herald.dev/namespace";
/// The Secret data key that holds the token.
pub const API_KEY_DATA: &str = "key";
/// The header naming the namespace a Kubernetes token acts in.
pub const NAMESPACE_HEADER: &str = "x-herald-namespace";
/// Keys shorter than this are ignored (and logged): they can be guessed.
pub const MIN_KEY_BYTES: usize = 16;

const REVIEW_TTL: Duration = Duration::from_secs(60);
const NEGATIVE_TTL: Duration = Duration::from_secs(10);
const ACCESS_TTL: Duration = Duration::from_secs(30);
const CACHE_ENTRIES: usize = 10_000;

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The namespace the request acts in.
    pub namespace: String,
    pub identity: Identity,
}

#[derive(Clone, Debug)]
pub enum Identity {
    /// An API key Secret (its name).
    ApiKey { secret: String },
    /// A Kubernetes user (a ServiceAccount), as the TokenReview described it.
    Kubernetes { user: UserInfo, token_digest: [u8; 32] },
}

impl Caller {
    /// Checks that the caller may act for this user's own data (the feed, its
    /// messages). Server credentials (API keys, Kubernetes tokens) may act for
    /// any user of their namespace.
    /// The user a caller acts for when it is a user (a user token); None for
    /// server credentials, which act for any user of their namespace.
    pub fn user(&self) -> Option<&str> {
        match &self.identity {
            Identity::ApiKey { .. } | Identity::Kubernetes { .. } => None,
        }
    }

    pub fn acts_for_user(&self, _user_id: &str) -> Result<(), ApiError> {
        match &self.identity {
            Identity::ApiKey { .. } | Identity::Kubernetes { .. } => Ok(()),
        }
    }

    /// A stable, loggable name: `apikey:<namespace>/<secret>` or the Kubernetes user name.
    pub fn name(&self) -> String {
        match &self.identity {
            Identity::ApiKey { secret } => format!("apikey:{}/{secret}", self.namespace),
            Identity::Kubernetes { user, .. } => user.username.clone().unwrap_or_default(),
        }
    }
}

#[derive(Clone, Debug)]
struct KeyEntry {
    namespace: String,
    secret: String,
    key: Vec<u8>,
}

/// The API keys, by the SHA-256 of the key.
#[derive(Default)]
struct KeyIndex {
    /// By Secret name (all in the key namespace).
    by_secret: HashMap<String, KeyEntry>,
    by_digest: HashMap<[u8; 32], Vec<KeyEntry>>,
}

impl KeyIndex {
    fn rebuild(&mut self) {
        self.by_digest.clear();
        for entry in self.by_secret.values() {
            self.by_digest.entry(digest(&entry.key)).or_default().push(entry.clone());
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The key a Secret holds, if it is a usable one for a namespace herald serves.
fn key_of(secret: &Secret, served: &[String]) -> Option<KeyEntry> {
    let name = secret.name_any();
    let namespace = match secret.annotations().get(API_KEY_NAMESPACE_ANNOTATION) {
        Some(ns) if is_namespace_name(ns) => ns.clone(),
        Some(ns) => {
            tracing::warn!(secret = %name, annotation = %ns, "API key Secret ignored: annotation {API_KEY_NAMESPACE_ANNOTATION} is not a namespace name");
            return None;
        }
        None => secret.namespace()?,
    };
    if !served.is_empty() && !served.contains(&namespace) {
        tracing::warn!(secret = %name, %namespace, "API key Secret ignored: herald does not serve its namespace");
        return None;
    }
    let raw = secret.data.as_ref()?.get(API_KEY_DATA)?;
    // `kubectl create secret --from-file` keeps a trailing newline.
    let mut key = raw.0.clone();
    while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
        key.pop();
    }
    if key.len() < MIN_KEY_BYTES {
        tracing::warn!(%namespace, secret = %name, "API key Secret ignored: data key `key` is missing or shorter than {MIN_KEY_BYTES} bytes");
        return None;
    }
    Some(KeyEntry { namespace, secret: name, key })
}

/// Keeps the key index in step with the labelled Secrets of the key namespace.
async fn watch_keys(api: Api<Secret>, served: Vec<String>, index: Arc<RwLock<KeyIndex>>, loaded: watch::Sender<bool>) {
    let config = watcher::Config::default().labels(&format!("{API_KEY_LABEL}=true"));
    let stream = watcher::watcher(api, config).backoff(crate::controller::WatchBackoff::default());
    futures::pin_mut!(stream);
    let mut buffer: Option<HashMap<String, KeyEntry>> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "watching API key Secrets; retrying");
                continue;
            }
        };
        let mut index = index.write().unwrap_or_else(|p| p.into_inner());
        match event {
            Event::Init => buffer = Some(HashMap::new()),
            Event::InitApply(secret) => {
                if let (Some(buffer), Some(entry)) = (buffer.as_mut(), key_of(&secret, &served)) {
                    buffer.insert(entry.secret.clone(), entry);
                }
            }
            Event::InitDone => {
                index.by_secret = buffer.take().unwrap_or_default();
                index.rebuild();
                let _ = loaded.send(true);
            }
            Event::Apply(secret) => {
                match key_of(&secret, &served) {
                    Some(entry) => index.by_secret.insert(secret.name_any(), entry),
                    None => index.by_secret.remove(&secret.name_any()),
                };
                index.rebuild();
            }
            Event::Delete(secret) => {
                index.by_secret.remove(&secret.name_any());
                index.rebuild();
            }
        }
    }
}

/// A small time-bounded cache.
struct Cache<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Cache { entries: Mutex::new(HashMap::new()) }
    }

    fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(key).filter(|(until, _)| *until > Instant::now()).map(|(_, v)| v.clone())
    }

    fn put(&self, key: K, value: V, ttl: Duration) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CACHE_ENTRIES {
            let now = Instant::now();
            entries.retain(|_, (until, _)| *until > now);
            if entries.len() >= CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now() + ttl, value));
    }
}

/// Aborts the key watch when the API goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Authenticates and authorizes API requests.
pub struct Authenticator {
    client: Client,
    /// The namespaces herald serves (empty: every namespace).
    served: Vec<String>,
    index: Arc<RwLock<KeyIndex>>,
    /// True once the key watch's first list is in.
    loaded: watch::Receiver<bool>,
    /// How long a request waits for the first list ([`Settings::api_wait`]).
    wait: Duration,
    reviews: Cache<[u8; 32], Option<UserInfo>>,
    access: Cache<([u8; 32], String, &'static str, &'static str), bool>,
    _watch: AbortOnDrop,
}

/// What a route needs: a verb on a herald resource (for Kubernetes tokens;
/// API keys may do everything in their namespace).
#[derive(Clone, Copy, Debug)]
pub struct Permission {
    pub verb: &'static str,
    pub resource: &'static str,
}

impl Authenticator {
    /// Starts the key watch on the key namespace.
    pub fn start(client: Client, settings: &Settings) -> Self {
        let index = Arc::new(RwLock::new(KeyIndex::default()));
        let api: Api<Secret> = Api::namespaced(client.clone(), &settings.key_namespace());
        let (tx, rx) = watch::channel(false);
        let watch = AbortOnDrop(tokio::spawn(watch_keys(api, settings.namespaces.clone(), index.clone(), tx)));
        Authenticator { client, served: settings.namespaces.clone(), index, loaded: rx, wait: settings.api_wait(), reviews: Cache::new(), access: Cache::new(), _watch: watch }
    }

    /// Waits (briefly) for the first list of API keys.
    async fn keys_loaded(&self) -> Result<(), ApiError> {
        let mut loaded = self.loaded.clone();
        let ready = tokio::time::timeout(self.wait, loaded.wait_for(|l| *l)).await.is_ok_and(|r| r.is_ok());
        if ready {
            Ok(())
        } else {
            Err(ApiError::unavailable("API keys are not loaded yet (is the Kubernetes API reachable?)"))
        }
    }

    /// Who sent this request, and in which namespace it acts.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = bearer(headers)?;
        let requested = requested_namespace(headers)?;
        self.keys_loaded().await?;
        if let Some(caller) = self.api_key(token.as_bytes(), requested.as_deref())? {
            return Ok(caller);
        }
        if !looks_like_jwt(&token) {
            return Err(ApiError::Unauthenticated("invalid API key".into()));
        }
        let token_digest = digest(token.as_bytes());
        let user = match self.reviews.get(&token_digest) {
            Some(user) => user,
            None => {
                let user = self.review(&token).await?;
                self.reviews.put(token_digest, user.clone(), if user.is_some() { REVIEW_TTL } else { NEGATIVE_TTL });
                user
            }
        };
        let Some(user) = user else {
            return Err(ApiError::Unauthenticated("invalid API key or Kubernetes token".into()));
        };
        let own = user.username.as_deref().and_then(|u| u.strip_prefix("system:serviceaccount:")).and_then(|r| r.split(':').next()).map(str::to_string);
        let only_served = match self.served.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        };
        let namespace = requested.or(only_served).or(own).ok_or_else(|| ApiError::invalid(NAMESPACE_HEADER, "name the namespace to act in with the X-Herald-Namespace header"))?;
        if !self.served.is_empty() && !self.served.contains(&namespace) {
            return Err(ApiError::Forbidden(format!("this herald serves namespace {}, not {namespace}", self.served.join(", "))));
        }
        Ok(Caller { namespace, identity: Identity::Kubernetes { user, token_digest } })
    }

    /// The caller of an API key, if the token is one.
    fn api_key(&self, token: &[u8], requested: Option<&str>) -> Result<Option<Caller>, ApiError> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(candidates) = index.by_digest.get(&digest(token)) else { return Ok(None) };
        let matching: Vec<&KeyEntry> = candidates.iter().filter(|e| bool::from(e.key.as_slice().ct_eq(token))).collect();
        let chosen: Vec<&&KeyEntry> = match requested {
            Some(ns) => matching.iter().filter(|e| e.namespace == ns).collect(),
            None => matching.iter().collect(),
        };
        match (chosen.as_slice(), matching.first()) {
            ([one], _) => Ok(Some(Caller { namespace: one.namespace.clone(), identity: Identity::ApiKey { secret: one.secret.clone() } })),
            ([], Some(other)) => Err(ApiError::Forbidden(format!("this API key acts only in namespace {}", other.namespace))),
            ([], None) => Ok(None),
            _ => Err(ApiError::Unauthenticated("this API key acts in several namespaces; name one with the X-Herald-Namespace header".into())),
        }
    }

    async fn review(&self, token: &str) -> Result<Option<UserInfo>, ApiError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview { spec: TokenReviewSpec { token: Some(token.to_string()), audiences: None }, ..Default::default() };
        let reviewed = api.create(&PostParams::default(), &review).await?;
        let status = reviewed.status.unwrap_or_default();
        Ok(if status.authenticated == Some(true) { status.user } else { None })
    }

    /// Checks that the caller may `permission` in its namespace.
    pub async fn authorize(&self, caller: &Caller, permission: Permission) -> Result<(), ApiError> {
        let Identity::Kubernetes { user, token_digest } = &caller.identity else { return Ok(()) };
        let key = (*token_digest, caller.namespace.clone(), permission.verb, permission.resource);
        let allowed = match self.access.get(&key) {
            Some(allowed) => allowed,
            None => {
                let allowed = self.review_access(user, &caller.namespace, permission).await?;
                self.access.put(key, allowed, if allowed { ACCESS_TTL } else { NEGATIVE_TTL });
                allowed
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("{} may not {} {}.herald.dev in namespace {}", caller.name(), permission.verb, permission.resource, caller.namespace)))
        }
    }

    async fn review_access(&self, user: &UserInfo, namespace: &str, permission: Permission) -> Result<bool, ApiError> {
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone().map(|e| e.into_iter().collect::<BTreeMap<_, _>>()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_string()),
                    verb: Some(permission.verb.to_string()),
                    group: Some(crate::resources::GROUP.to_string()),
                    resource: Some(permission.resource.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = api.create(&PostParams::default(), &review).await?;
        Ok(reviewed.status.is_some_and(|s| s.allowed))
    }
}

/// The bearer token of the request.
fn bearer(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Err(ApiError::ApiKeyMissing) };
    let value = value.to_str().map_err(|_| ApiError::Unauthenticated("the Authorization header is not valid text".into()))?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Unauthenticated("the Authorization header must be `Bearer <key>`".into()));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(ApiError::ApiKeyMissing);
    }
    Ok(token.to_string())
}

/// The namespace named by `X-Herald-Namespace`, if any.
fn requested_namespace(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(NAMESPACE_HEADER) else { return Ok(None) };
    let ns = value.to_str().unwrap_or_default().trim();
    if !is_namespace_name(ns) {
        return Err(ApiError::invalid(NAMESPACE_HEADER, "must be a Kubernetes namespace name"));
    }
    Ok(Some(ns.to_string()))
}

/// A DNS-1123 label, as namespace names are.
fn is_namespace_name(ns: &str) -> bool {
    !ns.is_empty() && ns.len() <= 63 && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !ns.starts_with('-') && !ns.ends_with('-')
}

/// Kubernetes tokens are JWTs: three base64url segments.
fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'='))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens() {
        assert!(matches!(bearer(&headers(&[])), Err(ApiError::ApiKeyMissing)));
        assert!(matches!(bearer(&headers(&[("authorization", "Bearer ")])), Err(ApiError::ApiKeyMissing)));
        assert!(matches!(bearer(&headers(&[("authorization", "Basic abc")])), Err(ApiError::Unauthenticated(_))));
        assert_eq!(bearer(&headers(&[("authorization", "bearer  sk_123 ")])).unwrap(), "sk_123");
    }

    #[test]
    fn namespaces_and_jwts() {
        assert_eq!(requested_namespace(&headers(&[("x-herald-namespace", "team-a")])).unwrap().as_deref(), Some("team-a"));
        assert!(requested_namespace(&headers(&[("x-herald-namespace", "Team_A")])).is_err());
        assert!(looks_like_jwt("eyJhbGciOi.eyJpc3Mi.c2lnbmF0dXJl"));
        assert!(!looks_like_jwt("sk_test_123"));
        assert!(!looks_like_jwt("a..b"));
    }

    fn key_secret(namespace: &str, annotation: Option<&str>, key: &str) -> Secret {
        let mut secret = serde_json::from_value::<Secret>(serde_json::json!({
            "metadata": {"name": "k", "namespace": namespace, "labels": {API_KEY_LABEL: "true"}},
        }))
        .unwrap();
        secret.data = Some([(API_KEY_DATA.to_string(), k8s_openapi::ByteString(key.as_bytes().to_vec()))].into());
        if let Some(a) = annotation {
            secret.metadata.annotations = Some([(API_KEY_NAMESPACE_ANNOTATION.to_string(), a.to_string())].into());
        }
        secret
    }

    #[test]
    fn a_key_acts_in_the_namespace_its_annotation_names() {
        let key = "0123456789abcdef\n";
        let entry = key_of(&key_secret("herald", None, key), &[]).unwrap();
        assert_eq!((entry.namespace.as_str(), entry.key.as_slice()), ("herald", b"0123456789abcdef".as_slice()));
        assert_eq!(key_of(&key_secret("herald", Some("team-a"), key), &[]).unwrap().namespace, "team-a");
        // Not a namespace name, a namespace herald does not serve, a short key: no key.
        assert!(key_of(&key_secret("herald", Some("Team A"), key), &[]).is_none());
        assert!(key_of(&key_secret("herald", Some("team-b"), key), &["team-a".into()]).is_none());
        assert!(key_of(&key_secret("herald", Some("team-a"), key), &["team-a".into()]).is_some());
        assert!(key_of(&key_secret("herald", None, "short"), &[]).is_none());
    }

    #[test]
    fn keys_are_found_by_digest_and_namespace() {
        let mut index = KeyIndex::default();
        for (ns, name, key) in [("a", "k1", "0123456789abcdef-a"), ("b", "k2", "0123456789abcdef-b"), ("c", "k3", "0123456789abcdef-a")] {
            index.by_secret.insert(name.into(), KeyEntry { namespace: ns.into(), secret: name.into(), key: key.as_bytes().to_vec() });
        }
        index.rebuild();
        assert_eq!(index.by_digest.len(), 2);
        assert_eq!(index.by_digest[&digest(b"0123456789abcdef-a")].len(), 2);
    }
}
