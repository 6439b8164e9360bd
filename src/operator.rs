//! Wiring of `herald run`: wait for the CRDs, start the watch caches and the
//! controllers, serve HTTP, and stop gracefully.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::controller::{self, Context, Stores};
use crate::http;
use crate::leader;
use crate::settings::Settings;

/// A running operator (used by `herald run` and by tests that embed it).
pub struct Operator {
    /// The HTTP server's bound address.
    pub addr: SocketAddr,
    pub context: Arc<Context>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Set when the controllers ended without being asked to (a panic, the
    /// elector gone): the process must exit so that Kubernetes restarts it.
    failure: watch::Receiver<Option<String>>,
}

impl Operator {
    /// Stops the controllers and the HTTP server, letting in-flight work finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops at once, like a killed process: tasks are aborted where they stand.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Resolves, with the reason, if the controllers end without a stop
    /// having been asked for; never resolves otherwise.
    pub async fn failed(&self) -> String {
        let mut failure = self.failure.clone();
        let reason = failure.wait_for(Option::is_some).await.map(|r| r.clone().unwrap_or_default());
        match reason {
            Ok(reason) => reason,
            Err(_) => std::future::pending().await,
        }
    }
}

/// herald's client of the Kubernetes API, built from `config`.
///
/// Without kube-client's default retries: they wait with a backoff growing to
/// minutes on 429, 503 and 504, and a restarting apiserver answers 503 until it
/// is ready, so API requests were held for their whole timeout. Retrying is
/// done where it can be bounded: the API answers 503 with Retry-After at
/// once, reconciles are requeued, and watches back off (at most a second).
/// A connection (TCP and TLS) that does not come up within 5 s, or within
/// [`Settings::api_wait`] when that is shorter, fails rather than after
/// kube's 30 s: a restarting apiserver accepts TCP connections long before
/// it answers TLS, and an unreachable address may never answer.
pub fn client(mut config: kube::Config, settings: &Settings) -> anyhow::Result<Client> {
    config.default_retry = false;
    config.connect_timeout = Some(settings.api_wait().min(Duration::from_secs(5)));
    Client::try_from(config).context("building the Kubernetes client")
}

/// Waits until every herald CRD is Established.
pub async fn wait_for_crds(client: &Client, timeout: Duration) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    for crd in crate::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let established = match api.get_opt(&name).await {
                Ok(Some(found)) => found.status.and_then(|s| s.conditions).unwrap_or_default().iter().any(|c| c.type_ == "Established" && c.status == "True"),
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "checking CRDs");
                    false
                }
            };
            if established {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("CRD {name} is not installed or not established; install them with `herald crds | kubectl apply -f -`");
            }
            tracing::info!(crd = %name, "waiting for CRD");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    Ok(())
}

/// Starts the operator and returns once it is serving.
pub async fn start(client: Client, settings: Settings) -> anyhow::Result<Operator> {
    wait_for_crds(&client, Duration::from_secs(120)).await?;
    let listener = tokio::net::TcpListener::bind(settings.api_addr).await.with_context(|| format!("binding {}", settings.api_addr))?;
    let addr = listener.local_addr()?;
    let stores = Stores::start(&client, &settings);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let history = match &settings.database_url {
        Some(url) => Some(crate::store::History::start(url, &metrics).await.context("the history store (--database-url)")?),
        None => None,
    };
    let context = Context::new(client, settings, stores, metrics, history);
    let ready = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = watch::channel(false);

    let wait_stop = {
        let stopped = stopped.clone();
        move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        }
    };
    // On SIGTERM the server first says it is not ready and goes on serving for
    // --shutdown-delay-seconds, while load balancers and kube-proxy catch up
    // with the pod's removal from the Service; then it stops accepting.
    let drain = {
        let (ready, stopped, delay) = (ready.clone(), wait_stop(), Duration::from_secs(context.settings.shutdown_delay_seconds));
        async move {
            stopped.await;
            ready.store(false, Ordering::SeqCst);
            if !delay.is_zero() {
                tracing::info!(?delay, "not ready; serving on while the endpoint is removed");
                tokio::time::sleep(delay).await;
            }
        }
    };
    let server = http::serve(listener, http::State { context: context.clone(), ready: ready.clone() }, drain);
    let ctx = context.clone();
    let mut leadership = leader::start(&ctx.client, &ctx.settings, ctx.metrics.clone(), ctx.fence.clone()).await?;
    let (fail, failure) = watch::channel(None);
    let task = tokio::spawn(async move {
        let controllers = async {
            // A stop must not wait for caches that may never fill (say, a kind
            // the RBAC does not let herald watch).
            tokio::select! {
                caches = ctx.stores.wait_until_ready() => match caches {
                    Err(_) => tracing::error!("watch caches stopped before they were ready"),
                    Ok(()) => {
                        tracing::debug!("watch caches ready");
                        if !*stopped.borrow() {
                            ready.store(true, Ordering::SeqCst);
                        }
                        if let Err(reason) = lead(ctx, &mut leadership, wait_stop, controller::run).await {
                            tracing::error!(%reason, "the controllers stopped unexpectedly; exiting so that the pod restarts");
                            ready.store(false, Ordering::SeqCst);
                            fail.send_replace(Some(reason));
                        }
                    }
                },
                () = wait_stop() => tracing::info!("stopping before the watch caches were ready"),
            }
            leadership.release().await;
        };
        let (served, ()) = tokio::join!(server, controllers);
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    tracing::info!(%addr, "herald is serving");
    Ok(Operator { addr, context, stop, task, failure })
}

/// Reconciles while this replica leads. Losing the Lease aborts the
/// controllers where they stand (progress is checkpointed in status, so the
/// next leader resumes it); a shutdown lets in-flight reconciles finish, for
/// at most `--shutdown-grace-seconds`. Controllers that end on their own (a
/// panic) or an elector that stops are an error: a replica that serves
/// healthy probes while nothing reconciles would be a zombie.
async fn lead<F, Fut, C, CFut>(ctx: Arc<Context>, leadership: &mut leader::Leadership, wait_stop: F, controllers: C) -> Result<(), String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + Sync + 'static,
    C: Fn(Arc<Context>, Fut) -> CFut,
    CFut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            acquired = leadership.acquired() => if !acquired { return Err("the leader elector stopped".into()) },
            () = wait_stop() => return Ok(()),
        }
        tracing::info!("leading: starting controllers");
        let sweeper = tokio::spawn(controller::trigger_run::sweep_cancellations(ctx.clone()));
        let purger = ctx.history.as_ref().map(|h| tokio::spawn(crate::store::retention::keep(h.store.clone(), ctx.settings.history_retention_days)));
        let mut running = tokio::spawn(controllers(ctx.clone(), wait_stop()));
        enum Ended {
            Lost,
            Stopping,
            /// The controllers' task is done (a JoinHandle must not be polled again).
            Finished(Result<(), tokio::task::JoinError>),
        }
        let ended = tokio::select! {
            () = leadership.lost() => Ended::Lost,
            () = wait_stop() => Ended::Stopping,
            done = &mut running => Ended::Finished(done),
        };
        sweeper.abort();
        if let Some(purger) = purger {
            purger.abort();
        }
        match ended {
            Ended::Finished(done) => {
                // The controllers end by themselves only when a stop was asked for just now.
                if futures::FutureExt::now_or_never(wait_stop()).is_some() {
                    return Ok(());
                }
                return Err(match done {
                    Err(e) if e.is_panic() => format!("a controller panicked: {e}"),
                    Err(e) => format!("the controllers were cancelled: {e}"),
                    Ok(()) => "the controllers ended".into(),
                });
            }
            Ended::Stopping => {
                let grace = Duration::from_secs(ctx.settings.shutdown_grace_seconds);
                if tokio::time::timeout(grace, &mut running).await.is_err() {
                    tracing::warn!(?grace, "reconciles still running at the end of the shutdown grace; cutting them short (they resume from their checkpoints)");
                    running.abort();
                    let _ = running.await;
                }
                return Ok(());
            }
            Ended::Lost => {
                tracing::warn!("lost leadership: stopping controllers now");
                running.abort();
                let _ = running.await;
                if !leadership.elector_alive() {
                    return Err("the leader elector stopped".into());
                }
            }
        }
    }
}

/// Runs the operator until `shutdown` resolves.
/// Fails (the process exits non-zero, and Kubernetes restarts it) if the
/// controllers stop on their own.
pub async fn run(client: Client, settings: Settings, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let operator = start(client, settings).await?;
    tokio::select! {
        () = shutdown => {}
        reason = operator.failed() => {
            operator.abort();
            anyhow::bail!("herald stopped reconciling: {reason}");
        }
    }
    tracing::info!("shutting down");
    operator.shutdown().await;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A context whose client points at nothing (these tests never reach an apiserver).
    fn context() -> Arc<Context> {
        let config = kube::Config::new("http://127.0.0.1:1".parse().expect("static URL"));
        let client = Client::try_from(config).expect("client");
        let mut settings = Settings::for_namespace("n");
        settings.leader_election = false;
        Context::new(client.clone(), settings.clone(), Stores::start(&client, &settings), Default::default(), None)
    }

    #[tokio::test]
    async fn controllers_that_end_on_their_own_are_an_error() {
        let ctx = context();
        let mut leadership = leader::start(&ctx.client, &ctx.settings, ctx.metrics.clone(), ctx.fence.clone()).await.unwrap();
        let never = || std::future::pending::<()>();
        let panicked = lead(ctx.clone(), &mut leadership, never, |_, _| async { panic!("a bug") }).await;
        assert!(panicked.as_ref().is_err_and(|e| e.contains("panicked")), "{panicked:?}");
        let ended = lead(ctx.clone(), &mut leadership, never, |_, _| async {}).await;
        assert!(ended.as_ref().is_err_and(|e| e.contains("ended")), "{ended:?}");
        // Asked to stop: the controllers end, and that is no error.
        let stop = || std::future::ready(());
        assert_eq!(lead(ctx, &mut leadership, stop, |_, stop| stop).await, Ok(()));
    }
}
