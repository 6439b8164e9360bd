//! The reconcilers: thin layers that read resources, call the core, and write
//! status. They share one [`Context`].

pub mod channel;
pub mod conditions;
pub mod delivery;
pub mod directory;
pub mod identify;
pub mod trigger_run;
pub mod workflow;

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::resources::{Audience, Cancellation, Channel, Object, Tenant, User, Workflow};
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
}

impl Error {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingMetadata => "metadata",
            Error::Serialize(_) => "serialize",
        }
    }
}

/// In-memory caches of the resources the reconcilers read, fed by watches.
#[derive(Clone)]
pub struct Stores {
    pub workflows: Cache<Workflow>,
    pub users: Cache<User>,
    pub objects: Cache<Object>,
    pub tenants: Cache<Tenant>,
    pub audiences: Cache<Audience>,
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
/// reflector per namespace: Kubernetes has no multi-namespace watch).
pub struct Cache<K>
where
    K: Resource + Clone + 'static,
    <K as Resource>::DynamicType: Eq + std::hash::Hash + Clone,
{
    parts: Vec<Store<K>>,
}

impl<K> Clone for Cache<K>
where
    K: Resource + Clone + 'static,
    <K as Resource>::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn clone(&self) -> Self {
        Cache { parts: self.parts.clone() }
    }
}

impl<K> Cache<K>
where
    K: Resource + Clone + 'static,
    <K as Resource>::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// Every cached object.
    pub fn state(&self) -> Vec<Arc<K>> {
        self.parts.iter().flat_map(|p| p.state()).collect()
    }

    /// The first cached object matching `predicate`.
    pub fn find(&self, predicate: impl Fn(&K) -> bool) -> Option<Arc<K>> {
        self.parts.iter().find_map(|p| p.find(&predicate))
    }

    /// The cached object `key` names.
    pub fn get(&self, key: &ObjectRef<K>) -> Option<Arc<K>> {
        self.parts.iter().find_map(|p| p.get(key))
    }

    /// Waits until every namespace's first full list is in.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        for part in &self.parts {
            part.wait_until_ready().await?;
        }
        Ok(())
    }
}

/// Starts watch-fed stores for kind `K`; the tasks end with the runtime.
fn spawn_store<K>(client: &Client, settings: &Settings) -> Cache<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    <K as Resource>::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let parts = scopes(settings)
        .iter()
        .map(|scope| {
            let (reader, writer) = reflector::store();
            let stream = watcher(scope_api::<K>(client, scope), watcher::Config::default()).default_backoff().reflect(writer).applied_objects();
            tokio::spawn(async move {
                futures::pin_mut!(stream);
                while let Some(item) = stream.next().await {
                    if let Err(e) = item {
                        tracing::warn!(error = %e, kind = %K::kind(&Default::default()), "watch error; retrying");
                    }
                }
            });
            reader
        })
        .collect();
    Cache { parts }
}

impl Stores {
    /// Starts every store.
    pub fn start(client: &Client, settings: &Settings) -> Self {
        Stores {
            workflows: spawn_store(client, settings),
            users: spawn_store(client, settings),
            objects: spawn_store(client, settings),
            tenants: spawn_store(client, settings),
            audiences: spawn_store(client, settings),
            channels: spawn_store(client, settings),
            cancellations: spawn_store(client, settings),
        }
    }

    /// Waits until every store has its first full list.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.workflows.wait_until_ready().await?;
        self.users.wait_until_ready().await?;
        self.objects.wait_until_ready().await?;
        self.tenants.wait_until_ready().await?;
        self.audiences.wait_until_ready().await?;
        self.channels.wait_until_ready().await?;
        self.cancellations.wait_until_ready().await
    }
}

impl Context {
    pub fn new(client: Client, settings: Settings, stores: Stores) -> Arc<Self> {
        let recorder = Recorder::new(client.clone(), Reporter { controller: "herald".into(), instance: std::env::var("HOSTNAME").ok() });
        Arc::new(Context {
            deliverer: delivery::Deliverer::new(client.clone(), stores.channels.clone(), settings.max_deliveries),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            client,
            settings,
            stores,
            recorder,
            workflows: workflow::Compiled::default(),
        })
    }
}

/// Runs the controller of kind `K` (one per watch scope) until `shutdown`;
/// failed reconciles go to [`error_policy`].
pub async fn run_simple<K, R, Fut, F>(ctx: Arc<Context>, shutdown: F, name: &'static str, reconcile: R)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    <K as Resource>::DynamicType: Default + Eq + std::hash::Hash + Clone + std::fmt::Debug + Unpin,
    R: FnMut(Arc<K>, Arc<Context>) -> Fut + Clone,
    Fut: std::future::Future<Output = Result<kube::runtime::controller::Action, Error>> + Send + 'static,
    F: std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let controllers = scopes(&ctx.settings).into_iter().map(|scope| {
        let controller = kube::runtime::Controller::new(scope_api::<K>(&ctx.client, &scope), watcher::Config::default());
        let store = controller.store();
        let running = controller.graceful_shutdown_on(shutdown.clone()).run(reconcile.clone(), error_policy::<K>, ctx.clone()).for_each(move |result| {
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
    futures::join!(workflows, runs, channels);
}
