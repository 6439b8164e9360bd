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
    let context = Context::new(client, settings, stores);
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
    let mut leadership = leader::start(&ctx.client, &ctx.settings, ctx.metrics.clone()).await?;
    let task = tokio::spawn(async move {
        let controllers = async {
            // A stop must not wait for caches that may never fill (say, a kind
            // the RBAC does not let herald watch).
            tokio::select! {
                caches = ctx.stores.wait_until_ready() => match caches {
                    Err(_) => tracing::error!("watch caches stopped before they were ready"),
                    Ok(()) => {
                        if !*stopped.borrow() {
                            ready.store(true, Ordering::SeqCst);
                        }
                        lead(ctx, &mut leadership, wait_stop).await;
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
    Ok(Operator { addr, context, stop, task })
}

/// Reconciles while this replica leads. Losing the Lease aborts the
/// controllers where they stand (progress is checkpointed in status, so the
/// next leader resumes it); a shutdown lets in-flight reconciles finish, for
/// at most `--shutdown-grace-seconds`.
async fn lead<F, Fut>(ctx: Arc<Context>, leadership: &mut leader::Leadership, wait_stop: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    loop {
        tokio::select! {
            acquired = leadership.acquired() => if !acquired { return },
            () = wait_stop() => return,
        }
        tracing::info!("leading: starting controllers");
        let sweeper = tokio::spawn(controller::trigger_run::sweep_cancellations(ctx.clone()));
        let mut controllers = tokio::spawn(controller::run(ctx.clone(), wait_stop()));
        enum Ended {
            Lost,
            Stopping,
            /// The controllers' task is done (a JoinHandle must not be polled again).
            Finished,
        }
        let ended = tokio::select! {
            () = leadership.lost() => Ended::Lost,
            () = wait_stop() => Ended::Stopping,
            _ = &mut controllers => Ended::Finished,
        };
        sweeper.abort();
        match ended {
            Ended::Finished => return,
            Ended::Stopping => {
                let grace = Duration::from_secs(ctx.settings.shutdown_grace_seconds);
                if tokio::time::timeout(grace, &mut controllers).await.is_err() {
                    tracing::warn!(?grace, "reconciles still running at the end of the shutdown grace; cutting them short (they resume from their checkpoints)");
                    controllers.abort();
                    let _ = controllers.await;
                }
                return;
            }
            Ended::Lost => {
                tracing::warn!("lost leadership: stopping controllers now");
                controllers.abort();
                let _ = controllers.await;
            }
        }
    }
}

/// Runs the operator until `shutdown` resolves.
pub async fn run(client: Client, settings: Settings, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let operator = start(client, settings).await?;
    shutdown.await;
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
