//! The reconcilers: thin layers that read resources, call the core, and write
//! status. They share one [`Context`].

pub mod batch;
pub mod channel;
pub mod combine;
pub mod conditions;
pub mod cpu;
pub mod delivery;
pub mod directory;
pub mod fair;
pub mod identify;
pub mod in_app;
pub mod index;
pub mod lenient;
pub mod membership;
pub mod schedule;
pub mod slim;
pub mod throttle;
pub mod trigger_run;
pub mod workflow;

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use self::index::Index;
use self::lenient::Lenient;
use crate::resources::{Audience, Cancellation, Channel, MemberSlice, Object, Tenant, User, Workflow};
use crate::settings::Settings;

/// Errors of the reconcilers; each goes to the error policy, which retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("TriggerRun has no namespace or name")]
    MissingMetadata,
    #[error("serializing status: {0}")]
    Serialize(#[from] serde_json::Error),
    /// A conditional write lost: the object changed since it was read.
    #[error("the object changed since it was read (another writer, e.g. a newer leader): {0}")]
    Stale(String),
    /// This replica's leadership may have ended: nothing more is sent or written.
    #[error("this replica can no longer confirm it leads; stopping the reconcile")]
    Fenced,
    /// The history store could not take a finished run (it stays in the cluster; retried).
    #[error("history store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A throttle step's settings or resolved values are invalid (Knock logs it and skips the step; not retried).
    #[error("{0}")]
    Throttle(#[from] crate::core::throttle::ThrottleError),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingMetadata => "metadata",
            Error::Serialize(_) => "serialize",
            Error::Stale(_) => "stale",
            Error::Fenced => "fenced",
            Error::Store(_) => "store",
            Error::Throttle(_) => "throttle",
        }
    }
}

/// In-memory caches of the resources the reconcilers read, fed by watches:
/// the few, small kinds whole; the many (users, objects, memberships) as
/// indexes of their records by id ([`index`]).
#[derive(Clone)]
pub struct Stores {
    pub workflows: Cache<Workflow>,
    pub users: Index<User>,
    pub objects: Index<Object>,
    pub tenants: Index<Tenant>,
    pub audiences: Index<Audience>,
    pub member_slices: Index<MemberSlice>,
    pub channels: Cache<Channel>,
    pub cancellations: Cache<Cancellation>,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub stores: Stores,
    pub recorder: Recorder,
    pub workflows: workflow::Compiled,
    pub deliverer: delivery::Deliverer,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Open while this replica may act as the leader: checked before every delivery attempt.
    pub fence: crate::leader::Fence,
    /// The history store, when --database-url is set.
    pub history: Option<crate::store::History>,
}

/// Field manager for herald's server-side apply writes.
pub const MANAGER: &str = "herald";

/// The watch scopes: each watched namespace, or (None) every namespace.
pub fn scopes(settings: &Settings) -> Vec<Option<String>> {
    if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    }
}

/// The backoff of every watch herald runs (caches, controllers, API keys,
/// the run index): 100 ms doubling to at most 1 s, with jitter, from the
/// start again once the watch delivers.
///
/// Why not kube's default (0.8 s doubling to 30 s, reset only after two quiet
/// minutes): after an apiserver outage of a few seconds its next attempt can
/// be ten or more seconds after the apiserver is back, and until then the
/// caches and controllers do not see new objects. A failing watch costs the
/// apiserver one request a second at most.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    pub const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(1);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(Self::MAX);
        // Up to a quarter less, so watches that failed together do not retry together.
        Some(delay.mul_f64(1.0 - fastrand::f64() / 4.0))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// An Api for kind `K` in one scope.
pub fn scope_api<K>(client: &Client, scope: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A watch-fed cache of kind `K` over every watched namespace (one
/// reflector per namespace: Kubernetes has no multi-namespace watch). Objects
/// herald cannot read are kept apart ([`lenient`]) and never returned.
pub struct Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    parts: Vec<Store<Lenient<K>>>,
    /// Whether each part has had its first full list. Not `Store::wait_until_ready`:
    /// that wakes only the last of several concurrent waiters (a futures
    /// oneshot holds one waker), so the API waiting for the caches could leave
    /// the controllers waiting forever.
    listed: Vec<tokio::sync::watch::Receiver<bool>>,
}

/// A watch cache stopped before its first full list.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("a watch cache stopped before it was ready")]
pub struct CacheStopped;

impl<K> Clone for Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn clone(&self) -> Self {
        Cache { parts: self.parts.clone(), listed: self.listed.clone() }
    }
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// Every cached object herald can read.
    pub fn state(&self) -> Vec<Arc<K>> {
        self.parts.iter().flat_map(|p| p.state()).filter_map(|l| l.valid().cloned()).collect()
    }

    /// The first cached object matching `predicate`.
    pub fn find(&self, predicate: impl Fn(&K) -> bool) -> Option<Arc<K>> {
        self.parts.iter().find_map(|p| p.find(|l| l.valid().is_some_and(|k| predicate(k)))).and_then(|l| l.valid().cloned())
    }

    /// The cached object `name` in `namespace`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        let key = ObjectRef::<Lenient<K>>::new(name).within(namespace);
        self.parts.iter().find_map(|p| p.get(&key)).and_then(|l| l.valid().cloned())
    }

    /// How many cached objects herald cannot read.
    pub fn invalid_count(&self) -> usize {
        self.parts.iter().flat_map(|p| p.state()).filter(|l| l.valid().is_none()).count()
    }

    /// Waits until every namespace's first full list is in (any number of waiters).
    pub async fn wait_until_ready(&self) -> Result<(), CacheStopped> {
        for listed in &self.listed {
            listed.clone().wait_for(|l| *l).await.map_err(|_| CacheStopped)?;
        }
        Ok(())
    }
}

/// An object herald cannot read, for the reporter to say so on it.
#[derive(Debug)]
pub struct Unreadable {
    pub kind: String,
    pub reference: k8s_openapi::api::core::v1::ObjectReference,
    pub error: String,
}

/// kubectl's annotation holding the whole object as last applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Starts watch-fed stores for kind `K`; the tasks end with the runtime.
/// Objects herald cannot read go to `unreadable` (dropped if the reporter lags).
fn spawn_store<K>(client: &Client, settings: &Settings, unreadable: &tokio::sync::mpsc::Sender<Unreadable>) -> Cache<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let mut parts = Vec::new();
    let mut listed = Vec::new();
    for scope in scopes(settings) {
        let (reader, writer) = reflector::store();
        let (ready, ready_rx) = tokio::sync::watch::channel(false);
        let stream = watcher(scope_api::<Lenient<K>>(client, &scope), watcher::Config::default())
            .backoff(WatchBackoff::default())
            // Kept in memory for every object: drop what herald never reads
            // (managedFields and kubectl's copy of the last applied object are
            // often larger than the spec).
            .modify(|object| {
                let meta = object.meta_mut();
                meta.managed_fields = None;
                if let Some(annotations) = meta.annotations.as_mut() {
                    annotations.remove(LAST_APPLIED);
                }
            })
            .reflect(writer);
        let unreadable = unreadable.clone();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                let object = match item {
                    Err(e) => {
                        tracing::warn!(error = %e, kind = %K::kind(&()), "watch error; retrying");
                        continue;
                    }
                    Ok(watcher::Event::InitDone) => {
                        ready.send_replace(true);
                        continue;
                    }
                    Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => object,
                    Ok(_) => continue,
                };
                if let Some(error) = object.error() {
                    let reference = object.object_ref(&());
                    tracing::warn!(kind = %K::kind(&()), namespace = ?reference.namespace, name = ?reference.name, %error, "skipping an object herald cannot read");
                    let _ = unreadable.try_send(Unreadable { kind: K::kind(&()).to_string(), reference, error: error.to_string() });
                }
            }
        });
        parts.push(reader);
        listed.push(ready_rx);
    }
    Cache { parts, listed }
}

impl Stores {
    /// Starts every store; objects herald cannot read are reported through the returned receiver.
    pub fn start(client: &Client, settings: &Settings) -> (Self, tokio::sync::mpsc::Receiver<Unreadable>) {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let stores = Stores {
            workflows: spawn_store(client, settings, &tx),
            users: Index::start(client, settings, &tx),
            objects: Index::start(client, settings, &tx),
            tenants: Index::start(client, settings, &tx),
            audiences: Index::start(client, settings, &tx),
            member_slices: Index::start(client, settings, &tx),
            channels: spawn_store(client, settings, &tx),
            cancellations: spawn_store(client, settings, &tx),
        };
        (stores, rx)
    }

    /// Waits until every store has its first full list.
    pub async fn wait_until_ready(&self) -> Result<(), CacheStopped> {
        self.workflows.wait_until_ready().await?;
        self.users.wait_until_ready().await?;
        self.objects.wait_until_ready().await?;
        self.tenants.wait_until_ready().await?;
        self.audiences.wait_until_ready().await?;
        self.member_slices.wait_until_ready().await?;
        self.channels.wait_until_ready().await?;
        self.cancellations.wait_until_ready().await
    }

    /// Objects herald cannot read, per kind.
    pub fn invalid_counts(&self) -> [(&'static str, usize); 8] {
        [
            ("Workflow", self.workflows.invalid_count()),
            ("User", self.users.invalid_count()),
            ("Object", self.objects.invalid_count()),
            ("Tenant", self.tenants.invalid_count()),
            ("Audience", self.audiences.invalid_count()),
            ("MemberSlice", self.member_slices.invalid_count()),
            ("Channel", self.channels.invalid_count()),
            ("Cancellation", self.cancellations.invalid_count()),
        ]
    }
}

/// Says so on every object herald cannot read (a Warning Event `Unreadable`,
/// once per resourceVersion) and keeps `herald_invalid_resources` current.
async fn report_unreadable(ctx: Arc<Context>, mut unreadable: tokio::sync::mpsc::Receiver<Unreadable>) {
    use kube::runtime::events::{Event, EventType};
    let mut told: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            next = unreadable.recv() => {
                let Some(u) = next else { return };
                let seen = (u.reference.uid.clone().unwrap_or_default(), u.reference.resource_version.clone().unwrap_or_default());
                if !told.insert(seen) {
                    continue;
                }
                if told.len() > 10_000 {
                    told.clear();
                }
                let note = format!("herald cannot read this {} and skips it until it is fixed: {}", u.kind, u.error);
                let event = Event { type_: EventType::Warning, reason: "Unreadable".into(), note: Some(crate::core::truncate(&note, 1000)), action: "Read".into(), secondary: None };
                if let Err(e) = ctx.recorder.publish(&event, &u.reference).await {
                    tracing::debug!(error = %e, "could not publish an Unreadable event");
                }
                refresh_invalid_gauge(&ctx);
            }
            _ = tick.tick() => refresh_invalid_gauge(&ctx),
        }
    }
}

fn refresh_invalid_gauge(ctx: &Context) {
    for (kind, count) in ctx.stores.invalid_counts() {
        ctx.metrics.invalid_resources.get_or_create(&crate::metrics::KindLabels { kind: kind.to_string() }).set(count as i64);
    }
    let s = &ctx.stores;
    for (kind, count) in
        [("User", s.users.total()), ("Object", s.objects.total()), ("Tenant", s.tenants.total()), ("Audience", s.audiences.total()), ("MemberSlice", s.member_slices.total())]
    {
        ctx.metrics.cached_objects.get_or_create(&crate::metrics::KindLabels { kind: kind.to_string() }).set(count as i64);
    }
}

impl Context {
    /// The shared context; starts the reporter of objects herald cannot read.
    pub fn new(
        client: Client,
        settings: Settings,
        (stores, unreadable): (Stores, tokio::sync::mpsc::Receiver<Unreadable>),
        metrics: Arc<crate::metrics::Metrics>,
        history: Option<crate::store::History>,
    ) -> Arc<Self> {
        let recorder = Recorder::new(client.clone(), Reporter { controller: "herald".into(), instance: std::env::var("HOSTNAME").ok() });
        let fence = crate::leader::Fence::for_settings(&settings);
        let ctx = Arc::new(Context {
            deliverer: delivery::Deliverer::new(
                client.clone(),
                stores.channels.clone(),
                fair::pool("deliveries", settings.max_deliveries, &settings, &metrics),
                fence.clone(),
                settings.egress_policy(),
            ),
            metrics,
            history,
            client,
            settings,
            stores,
            recorder,
            workflows: workflow::Compiled::default(),
            fence,
        });
        tokio::spawn(report_unreadable(ctx.clone(), unreadable));
        ctx
    }
}

/// Runs the controller of kind `K` (one per watch scope) until `shutdown`;
/// failed reconciles go to [`error_policy`].
pub async fn run_simple<K, R, Fut, F>(ctx: Arc<Context>, shutdown: F, name: &'static str, reconcile: R)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    R: FnMut(Arc<K>, Arc<Context>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<kube::runtime::controller::Action, Error>> + Send + 'static,
    F: std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let controllers = scopes(&ctx.settings).into_iter().map(|scope| {
        // Lenient: an object herald cannot read is skipped (the caches report it), not a stopped controller.
        let controller = kube::runtime::Controller::new(scope_api::<Lenient<K>>(&ctx.client, &scope), watcher::Config::default()).trigger_backoff(WatchBackoff::default());
        let store = controller.store();
        let mut reconcile = reconcile.clone();
        let lenient = move |object: Arc<Lenient<K>>, ctx: Arc<Context>| {
            let valid = object.valid().cloned();
            let future = valid.map(|k| reconcile(k, ctx));
            async move {
                match future {
                    Some(f) => f.await,
                    None => Ok(kube::runtime::controller::Action::await_change()),
                }
            }
        };
        let running = controller.graceful_shutdown_on(shutdown.clone()).run(lenient, error_policy::<Lenient<K>>, ctx.clone()).for_each(move |result| {
            if let Err(e) = result {
                tracing::debug!(controller = name, error = %e, "controller event");
            }
            futures::future::ready(())
        });
        until_stopped(running, store, shutdown.clone())
    });
    futures::future::join_all(controllers).await;
}

/// Drives a kube `Controller` until it has shut down gracefully, or drops it
/// at once if `shutdown` comes before its watch cache was ever ready.
///
/// Why: kube-runtime's runner waits for the controller's store to be ready
/// before it notices that its queue has ended, and a store whose watch the
/// shutdown has stopped never becomes ready, so a SIGTERM in the first moments
/// after start would hang forever. Before the store is ready no reconcile has
/// started, so dropping the controller then loses nothing.
pub(crate) async fn until_stopped<K>(running: impl std::future::Future<Output = ()>, store: Store<K>, shutdown: impl std::future::Future<Output = ()>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let stopped_before_ready = async {
        shutdown.await;
        if futures::FutureExt::now_or_never(store.wait_until_ready()).is_none() {
            tracing::debug!(kind = %K::kind(&K::DynamicType::default()), "stopping before the watch cache was ready");
            return;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = running => {}
        () = stopped_before_ready => {}
    }
}

/// Counts a failed reconcile in `herald_reconcile_errors_total`, logs it, and
/// retries after five seconds.
fn error_policy<K>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> kube::runtime::controller::Action
where
    K: Resource,
    <K as Resource>::DynamicType: Default,
{
    let controller = K::kind(&Default::default()).to_lowercase();
    ctx.metrics.reconcile_errors.get_or_create(&crate::metrics::ErrorLabels { controller: controller.clone(), error: error.label().into() }).inc();
    tracing::warn!(%controller, object = %object.meta().name.as_deref().unwrap_or_default(), error = %error, "reconcile failed; retrying");
    kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5))
}

/// Runs every controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let shutdown = futures::future::FutureExt::shared(shutdown);
    let workflows = run_simple(ctx.clone(), shutdown.clone(), "workflow", workflow::reconcile);
    let runs = trigger_run::run(ctx.clone(), shutdown.clone());
    let channels = run_simple(ctx.clone(), shutdown.clone(), "channel", channel::reconcile);
    let schedules = run_simple(ctx.clone(), shutdown.clone(), "schedule", schedule::reconcile);
    futures::join!(workflows, runs, channels, schedules);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn watches_retry_within_a_second_and_start_over_once_they_deliver() {
        let mut backoff = WatchBackoff::default();
        let delays: Vec<_> = backoff.by_ref().take(20).collect();
        assert!(delays[0] <= WatchBackoff::FIRST && delays[0] >= WatchBackoff::FIRST * 3 / 4, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= WatchBackoff::MAX), "{delays:?}");
        // However long the outage, the next attempt is at most a second away.
        assert!(delays[10..].iter().all(|d| *d >= WatchBackoff::MAX * 3 / 4), "{delays:?}");
        backoff.reset();
        assert!(backoff.next().unwrap() <= WatchBackoff::FIRST);
    }
}
