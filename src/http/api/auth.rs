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
//! * A publishable key (Knock's `pk_…`, safe in a browser) is the data key
//!   `publishableKey` of a key Secret; with it come a user token (an RS256 JWT
//!   signed by the customer's backend, `X-Knock-User-Token`) verified with the
//!   Secret's `userTokenPublicKey`, and an [`Identity::User`] that may only
//!   read and update that user's own data ([`Authenticator::authorize`],
//!   [`Caller::acts_for_user`]). The token is required unless the Secret's
//!   annotation `herald.dev/user-token` says `optional` (development only:
//!   the key alone then acts for any user, as Knock does without "enhanced
//!   security").

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use futures::StreamExt;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
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
/// The Secret data key that holds the publishable key (`pk_…`).
pub const PUBLISHABLE_KEY_DATA: &str = "publishableKey";
/// What a publishable key starts with (Knock's client refuses `sk_` keys).
pub const PUBLISHABLE_KEY_PREFIX: &str = "pk_";
/// The Secret data key that holds the PEM RSA public key verifying user tokens.
pub const USER_TOKEN_PUBLIC_KEY_DATA: &str = "userTokenPublicKey";
/// The annotation that makes user tokens `optional` (default: `required`).
pub const USER_TOKEN_ANNOTATION: &str = "herald.dev/user-token";
/// The header carrying the user token of a publishable key.
pub const USER_TOKEN_HEADER: &str = "x-knock-user-token";
/// The header naming the namespace a Kubernetes token acts in.
pub const NAMESPACE_HEADER: &str = "x-herald-namespace";
/// Keys shorter than this are ignored (and logged): they can be guessed.
pub const MIN_KEY_BYTES: usize = 16;
/// User tokens longer than this are refused unread (a token with a few grants is well under 2 KiB).
pub const MAX_USER_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew allowed between the customer's backend and herald, in seconds (`exp`, `nbf`).
const TOKEN_LEEWAY_SECONDS: u64 = 30;

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
    /// A publishable key (the name of its Secret) and the user its token
    /// names (`sub`). `user_id` is None only when the Secret makes tokens
    /// optional and none was sent: the key then acts for any user, on the
    /// client routes only.
    User { key_secret: String, user_id: Option<String> },
}

impl Caller {
    /// Checks that the caller may act for this user's own data (the user, its
    /// preferences, channel data, feed and messages). Server credentials (API
    /// keys, Kubernetes tokens) may act for any user of their namespace; a
    /// user token only for the user it names.
    pub fn acts_for_user(&self, user_id: &str) -> Result<(), ApiError> {
        match &self.identity {
            Identity::ApiKey { .. } | Identity::Kubernetes { .. } | Identity::User { user_id: None, .. } => Ok(()),
            Identity::User { user_id: Some(own), .. } if own == user_id => Ok(()),
            Identity::User { .. } => Err(ApiError::Forbidden("this user token acts only for its own user (its `sub`)".into())),
        }
    }

    /// The user a user token names: the owner whose messages the caller may
    /// engage with (None: a server credential, or a publishable key without
    /// a token where tokens are optional).
    pub fn token_user(&self) -> Option<&str> {
        match &self.identity {
            Identity::User { user_id, .. } => user_id.as_deref(),
            _ => None,
        }
    }

    /// Whether the caller is a publishable key (a browser), not a server.
    pub fn is_client(&self) -> bool {
        matches!(self.identity, Identity::User { .. })
    }

    /// A stable, loggable name: `apikey:<namespace>/<secret>`, the Kubernetes
    /// user name, or `pk:<namespace>/<secret>[:<user>]`.
    pub fn name(&self) -> String {
        match &self.identity {
            Identity::ApiKey { secret } => format!("apikey:{}/{secret}", self.namespace),
            Identity::Kubernetes { user, .. } => user.username.clone().unwrap_or_default(),
            Identity::User { key_secret, user_id: Some(user) } => format!("pk:{}/{key_secret}:{user}", self.namespace),
            Identity::User { key_secret, user_id: None } => format!("pk:{}/{key_secret}", self.namespace),
        }
    }
}

/// What a publishable key needs to authenticate its users.
#[derive(Clone)]
struct ClientAuth {
    /// Verifies user tokens (None: the Secret has no `userTokenPublicKey`).
    verifier: Option<DecodingKey>,
    token_required: bool,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth").field("verifier", &self.verifier.is_some()).field("token_required", &self.token_required).finish()
    }
}

#[derive(Clone, Debug)]
enum KeyKind {
    /// A secret API key: a server, which may do everything in its namespace.
    Secret,
    /// A publishable key: a browser, acting for the user its token names.
    Publishable(Arc<ClientAuth>),
}

#[derive(Clone, Debug)]
struct KeyEntry {
    namespace: String,
    secret: String,
    key: Vec<u8>,
    kind: KeyKind,
}

/// The API keys, by the SHA-256 of the key.
#[derive(Default)]
struct KeyIndex {
    /// By Secret name (all in the key namespace): its secret and publishable keys.
    by_secret: HashMap<String, Vec<KeyEntry>>,
    by_digest: HashMap<[u8; 32], Vec<KeyEntry>>,
}

impl KeyIndex {
    fn rebuild(&mut self) {
        self.by_digest.clear();
        for entry in self.by_secret.values().flatten() {
            self.by_digest.entry(digest(&entry.key)).or_default().push(entry.clone());
        }
    }
}

/// The claims herald reads from a user token (Knock's `signUserToken`).
#[derive(Debug, serde::Deserialize)]
pub struct UserClaims {
    /// The user id.
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: Option<u64>,
    /// Read, not enforced (see the README): `sub` alone bounds what the token may do.
    #[serde(default)]
    pub grants: Option<serde_json::Value>,
    #[serde(default)]
    pub explicit_grants: Option<bool>,
}

/// Verifies a user token: RS256 with `key`, `sub` and `exp` required, `exp`
/// (and `nbf`, when present) within [`TOKEN_LEEWAY_SECONDS`] of now, `sub` a
/// valid user id.
pub fn verify_user_token(key: &DecodingKey, token: &str) -> Result<UserClaims, ApiError> {
    if token.len() > MAX_USER_TOKEN_BYTES {
        return Err(ApiError::Unauthenticated(format!("the user token is longer than {MAX_USER_TOKEN_BYTES} bytes")));
    }
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.leeway = TOKEN_LEEWAY_SECONDS;
    validation.validate_nbf = true;
    // Knock's tokens carry no audience; one that does is not refused for it.
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<UserClaims>(token, key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        let why = match e.kind() {
            ErrorKind::ExpiredSignature => "the user token has expired".to_string(),
            ErrorKind::ImmatureSignature => "the user token is not valid yet (nbf)".to_string(),
            ErrorKind::InvalidSignature => "the user token's signature does not verify with this environment's public key".to_string(),
            ErrorKind::InvalidAlgorithm => "the user token must be signed with RS256".to_string(),
            ErrorKind::MissingRequiredClaim(claim) => format!("the user token has no `{claim}` claim"),
            _ => format!("the user token is not a valid JWT: {e}"),
        };
        ApiError::Unauthenticated(why)
    })?;
    super::check_id("sub", &data.claims.sub).map_err(|e| ApiError::Unauthenticated(format!("the user token's `sub` is not a user id: {}", e.message)))?;
    Ok(data.claims)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Secret data under `name`, trailing whitespace trimmed (`kubectl create
/// secret --from-file` keeps a trailing newline).
fn data_of(secret: &Secret, name: &str) -> Option<Vec<u8>> {
    let mut value = secret.data.as_ref()?.get(name)?.0.clone();
    while value.last().is_some_and(|b| b.is_ascii_whitespace()) {
        value.pop();
    }
    Some(value)
}

/// The keys a Secret holds (its secret key, its publishable key), if usable
/// for a namespace herald serves.
fn keys_of(secret: &Secret, served: &[String]) -> Vec<KeyEntry> {
    let name = secret.name_any();
    let namespace = match secret.annotations().get(API_KEY_NAMESPACE_ANNOTATION) {
        Some(ns) if is_namespace_name(ns) => ns.clone(),
        Some(ns) => {
            tracing::warn!(secret = %name, annotation = %ns, "API key Secret ignored: annotation {API_KEY_NAMESPACE_ANNOTATION} is not a namespace name");
            return Vec::new();
        }
        None => match secret.namespace() {
            Some(ns) => ns,
            None => return Vec::new(),
        },
    };
    if !served.is_empty() && !served.contains(&namespace) {
        tracing::warn!(secret = %name, %namespace, "API key Secret ignored: herald does not serve its namespace");
        return Vec::new();
    }
    let mut entries = Vec::new();
    match data_of(secret, API_KEY_DATA) {
        // A publishable key in `key` would give browsers a server's powers.
        Some(key) if key.starts_with(PUBLISHABLE_KEY_PREFIX.as_bytes()) => {
            tracing::warn!(%namespace, secret = %name, "API key ignored: data key `{API_KEY_DATA}` holds a publishable key (`{PUBLISHABLE_KEY_PREFIX}…`); put it under `{PUBLISHABLE_KEY_DATA}`")
        }
        Some(key) if key.len() >= MIN_KEY_BYTES => entries.push(KeyEntry { namespace: namespace.clone(), secret: name.clone(), key, kind: KeyKind::Secret }),
        Some(_) => tracing::warn!(%namespace, secret = %name, "API key ignored: data key `{API_KEY_DATA}` is shorter than {MIN_KEY_BYTES} bytes"),
        None => {}
    }
    match data_of(secret, PUBLISHABLE_KEY_DATA) {
        Some(key) if !key.starts_with(PUBLISHABLE_KEY_PREFIX.as_bytes()) || key.len() < MIN_KEY_BYTES => {
            tracing::warn!(%namespace, secret = %name, "publishable key ignored: data key `{PUBLISHABLE_KEY_DATA}` must start with `{PUBLISHABLE_KEY_PREFIX}` and be at least {MIN_KEY_BYTES} bytes")
        }
        Some(key) => {
            let token_required = match secret.annotations().get(USER_TOKEN_ANNOTATION).map(String::as_str) {
                None | Some("required") => true,
                Some("optional") => false,
                Some(other) => {
                    tracing::warn!(%namespace, secret = %name, annotation = %other, "annotation {USER_TOKEN_ANNOTATION} is neither `required` nor `optional`; user tokens stay required");
                    true
                }
            };
            let verifier = data_of(secret, USER_TOKEN_PUBLIC_KEY_DATA).and_then(|pem| match DecodingKey::from_rsa_pem(&pem) {
                Ok(key) => Some(key),
                Err(e) => {
                    tracing::warn!(%namespace, secret = %name, error = %e, "data key `{USER_TOKEN_PUBLIC_KEY_DATA}` is not a PEM RSA public key; user tokens cannot be verified");
                    None
                }
            });
            if verifier.is_none() && token_required {
                tracing::warn!(%namespace, secret = %name, "publishable key without a usable `{USER_TOKEN_PUBLIC_KEY_DATA}`: its requests are refused until one is set (or {USER_TOKEN_ANNOTATION}: optional)");
            }
            entries.push(KeyEntry { namespace, secret: name.clone(), key, kind: KeyKind::Publishable(Arc::new(ClientAuth { verifier, token_required })) });
        }
        None => {}
    }
    if entries.is_empty() {
        tracing::warn!(secret = %name, "API key Secret ignored: it has no usable `{API_KEY_DATA}` or `{PUBLISHABLE_KEY_DATA}`");
    }
    entries
}

/// Keeps the key index in step with the labelled Secrets of the key namespace.
async fn watch_keys(api: Api<Secret>, served: Vec<String>, index: Arc<RwLock<KeyIndex>>, loaded: watch::Sender<bool>) {
    let config = watcher::Config::default().labels(&format!("{API_KEY_LABEL}=true"));
    let stream = watcher::watcher(api, config).backoff(crate::controller::WatchBackoff::default());
    futures::pin_mut!(stream);
    let mut buffer: Option<HashMap<String, Vec<KeyEntry>>> = None;
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
                let entries = keys_of(&secret, &served);
                if let (Some(buffer), false) = (buffer.as_mut(), entries.is_empty()) {
                    buffer.insert(secret.name_any(), entries);
                }
            }
            Event::InitDone => {
                index.by_secret = buffer.take().unwrap_or_default();
                index.rebuild();
                let _ = loaded.send(true);
            }
            Event::Apply(secret) => {
                let entries = keys_of(&secret, &served);
                if entries.is_empty() {
                    index.by_secret.remove(&secret.name_any());
                } else {
                    index.by_secret.insert(secret.name_any(), entries);
                }
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
        if let Some(entry) = self.api_key(token.as_bytes(), requested.as_deref())? {
            return match &entry.kind {
                KeyKind::Secret => Ok(Caller { namespace: entry.namespace, identity: Identity::ApiKey { secret: entry.secret } }),
                KeyKind::Publishable(client) => {
                    let user_token = match headers.get(USER_TOKEN_HEADER) {
                        Some(v) => Some(v.to_str().map_err(|_| ApiError::Unauthenticated(format!("the {USER_TOKEN_HEADER} header is not valid text")))?.trim()),
                        None => None,
                    };
                    client_caller(&entry, client, user_token.filter(|t| !t.is_empty()))
                }
            };
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

    /// The caller of a browser client (the socket): a publishable key and,
    /// unless optional, a user token. Secret keys are refused here: they
    /// belong on servers, not in URLs.
    pub async fn authenticate_client(&self, api_key: &str, user_token: Option<&str>) -> Result<Caller, ApiError> {
        if api_key.is_empty() {
            return Err(ApiError::ApiKeyMissing);
        }
        self.keys_loaded().await?;
        match self.api_key(api_key.as_bytes(), None)? {
            Some(entry) => match &entry.kind {
                KeyKind::Publishable(client) => client_caller(&entry, client, user_token.filter(|t| !t.is_empty())),
                KeyKind::Secret => Err(ApiError::Forbidden("the socket takes a publishable key (`pk_…`), not a secret API key".into())),
            },
            None => Err(ApiError::Unauthenticated("invalid publishable key".into())),
        }
    }

    /// The key entry of an API key, if the token is one.
    fn api_key(&self, token: &[u8], requested: Option<&str>) -> Result<Option<KeyEntry>, ApiError> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(candidates) = index.by_digest.get(&digest(token)) else { return Ok(None) };
        let matching: Vec<&KeyEntry> = candidates.iter().filter(|e| bool::from(e.key.as_slice().ct_eq(token))).collect();
        let chosen: Vec<&&KeyEntry> = match requested {
            Some(ns) => matching.iter().filter(|e| e.namespace == ns).collect(),
            None => matching.iter().collect(),
        };
        match (chosen.as_slice(), matching.first()) {
            ([one], _) => Ok(Some((**one).clone())),
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

    /// Checks that the caller may `permission` in its namespace. A
    /// publishable key may only read and update users (what Knock lets it
    /// call: the user, its preferences and channel data, its feed, its
    /// messages' status); the routes then check [`Caller::acts_for_user`].
    pub async fn authorize(&self, caller: &Caller, permission: Permission) -> Result<(), ApiError> {
        let (user, token_digest) = match &caller.identity {
            Identity::ApiKey { .. } => return Ok(()),
            Identity::User { .. } => return client_may(permission),
            Identity::Kubernetes { user, token_digest } => (user, token_digest),
        };
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

/// What a publishable key may do.
fn client_may(permission: Permission) -> Result<(), ApiError> {
    match (permission.verb, permission.resource) {
        ("get" | "update", "users") => Ok(()),
        _ => Err(ApiError::Forbidden(
            "a publishable key may only read and update its user's own data (the user, preferences, channel data, the in-app feed and its messages); call this route from a server, with a secret API key".into(),
        )),
    }
}

/// The caller of a publishable key, given the user token sent with it.
fn client_caller(entry: &KeyEntry, client: &ClientAuth, user_token: Option<&str>) -> Result<Caller, ApiError> {
    let user_id = match (user_token, &client.verifier, client.token_required) {
        (Some(token), Some(verifier), _) => Some(verify_user_token(verifier, token)?.sub),
        (_, None, true) => {
            return Err(ApiError::Unauthenticated(format!(
                "this environment requires user tokens, but its key Secret `{}` has no usable `{USER_TOKEN_PUBLIC_KEY_DATA}` to verify them",
                entry.secret
            )))
        }
        (None, Some(_), true) => return Err(ApiError::Unauthenticated(format!("a user token is required with a publishable key: send it in the {USER_TOKEN_HEADER} header"))),
        // Tokens optional (development): without a public key, a token cannot be checked and is not used.
        (_, _, false) => None,
    };
    Ok(Caller { namespace: entry.namespace.clone(), identity: Identity::User { key_secret: entry.secret.clone(), user_id } })
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
        let entries = keys_of(&key_secret("herald", None, key), &[]);
        assert_eq!((entries[0].namespace.as_str(), entries[0].key.as_slice()), ("herald", b"0123456789abcdef".as_slice()));
        assert!(matches!(entries[0].kind, KeyKind::Secret));
        assert_eq!(keys_of(&key_secret("herald", Some("team-a"), key), &[])[0].namespace, "team-a");
        // Not a namespace name, a namespace herald does not serve, a short key: no key.
        assert!(keys_of(&key_secret("herald", Some("Team A"), key), &[]).is_empty());
        assert!(keys_of(&key_secret("herald", Some("team-b"), key), &["team-a".into()]).is_empty());
        assert_eq!(keys_of(&key_secret("herald", Some("team-a"), key), &["team-a".into()]).len(), 1);
        assert!(keys_of(&key_secret("herald", None, "short"), &[]).is_empty());
        // A publishable key is never a secret key.
        assert!(keys_of(&key_secret("herald", None, "pk_0123456789abcdef"), &[]).is_empty());
    }

    #[test]
    fn a_secret_may_hold_a_publishable_key_whose_tokens_are_required_by_default() {
        let mut secret = key_secret("herald", None, "sk_0123456789abcdef");
        let data = secret.data.as_mut().unwrap();
        data.insert(PUBLISHABLE_KEY_DATA.into(), k8s_openapi::ByteString(b"pk_0123456789abcdef\n".to_vec()));
        let entries = keys_of(&secret, &[]);
        assert_eq!(entries.len(), 2);
        let KeyKind::Publishable(client) = &entries[1].kind else { panic!("{entries:?}") };
        assert_eq!(entries[1].key, b"pk_0123456789abcdef");
        assert!(client.token_required && client.verifier.is_none());
        // Without a public key and with tokens required, every request is refused.
        assert!(matches!(client_caller(&entries[1], client, None), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(client_caller(&entries[1], client, Some("a.b.c")), Err(ApiError::Unauthenticated(_))));

        secret.metadata.annotations = Some([(USER_TOKEN_ANNOTATION.to_string(), "optional".to_string())].into());
        let entries = keys_of(&secret, &[]);
        let KeyKind::Publishable(client) = &entries[1].kind else { panic!("{entries:?}") };
        let caller = client_caller(&entries[1], client, None).unwrap();
        assert!(matches!(&caller.identity, Identity::User { user_id: None, .. }));
        assert!(caller.acts_for_user("anyone").is_ok());

        // A publishable key that does not look like one is ignored.
        let data = secret.data.as_mut().unwrap();
        data.insert(PUBLISHABLE_KEY_DATA.into(), k8s_openapi::ByteString(b"sk_0123456789abcdef".to_vec()));
        assert_eq!(keys_of(&secret, &[]).len(), 1);
    }

    #[test]
    fn a_user_acts_for_itself_on_the_client_routes_only() {
        let caller = Caller { namespace: "ns".into(), identity: Identity::User { key_secret: "k".into(), user_id: Some("jane".into()) } };
        assert!(caller.acts_for_user("jane").is_ok());
        assert!(matches!(caller.acts_for_user("bob"), Err(ApiError::Forbidden(_))));
        assert_eq!(caller.token_user(), Some("jane"));
        assert!(client_may(Permission { verb: "get", resource: "users" }).is_ok());
        assert!(client_may(Permission { verb: "update", resource: "users" }).is_ok());
        for (verb, resource) in [("delete", "users"), ("create", "triggerruns"), ("get", "triggerruns"), ("update", "objects"), ("get", "tenants"), ("create", "cancellations")] {
            assert!(matches!(client_may(Permission { verb, resource }), Err(ApiError::Forbidden(_))), "{verb} {resource}");
        }
        let server = Caller { namespace: "ns".into(), identity: Identity::ApiKey { secret: "k".into() } };
        assert!(server.acts_for_user("bob").is_ok());
        assert_eq!(server.token_user(), None);
    }

    #[test]
    fn malformed_user_tokens_are_401() {
        // Any key does: these fail before the signature is checked.
        let key = DecodingKey::from_secret(b"unused");
        for token in ["", "abc", "a.b.c", &"x".repeat(MAX_USER_TOKEN_BYTES + 1)] {
            assert!(matches!(verify_user_token(&key, token), Err(ApiError::Unauthenticated(_))), "{token:.20}");
        }
    }

    #[test]
    fn keys_are_found_by_digest_and_namespace() {
        let mut index = KeyIndex::default();
        for (ns, name, key) in [("a", "k1", "0123456789abcdef-a"), ("b", "k2", "0123456789abcdef-b"), ("c", "k3", "0123456789abcdef-a")] {
            index.by_secret.insert(name.into(), vec![KeyEntry { namespace: ns.into(), secret: name.into(), key: key.as_bytes().to_vec(), kind: KeyKind::Secret }]);
        }
        index.rebuild();
        assert_eq!(index.by_digest.len(), 2);
        assert_eq!(index.by_digest[&digest(b"0123456789abcdef-a")].len(), 2);
    }
}
