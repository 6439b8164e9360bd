//! Leader election through a coordination.k8s.io Lease (kube-lease-manager):
//! every replica serves the HTTP API, only the leader reconciles.

use std::sync::Arc;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::settings::Settings;

/// Whether this replica leads, as it changes.
pub struct Leadership {
    receiver: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    /// The Lease manager's task; it releases the Lease when `receiver` is dropped.
    task: Option<tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>>,
}

impl Leadership {
    /// Waits until this replica leads.
    pub async fn acquired(&mut self) -> bool {
        let acquired = self.receiver.wait_for(|leading| *leading).await.is_ok();
        self.metrics.leader.set(i64::from(acquired));
        acquired
    }

    /// Waits until this replica stops leading (lost, or could not renew).
    pub async fn lost(&mut self) {
        let _ = self.receiver.wait_for(|leading| !*leading).await;
        self.metrics.leader.set(0);
    }

    /// Gives the Lease up (on a graceful stop), so that another replica takes
    /// over at once instead of after the lease duration: a rolling upgrade
    /// then leaves no gap without a leader.
    pub async fn release(self) {
        self.metrics.leader.set(0);
        drop(self.receiver);
        let Some(task) = self.task else { return };
        match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the leader Lease"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the leader Lease failed; it expires on its own"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the Lease manager stopped abnormally"),
            Err(_) => tracing::warn!("releasing the leader Lease timed out; it expires on its own"),
        }
    }
}

fn identity(settings: &Settings) -> String {
    settings.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "herald".into());
        format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
    })
}

fn lease_namespace(settings: &Settings) -> String {
    settings.lease_namespace.clone().or_else(|| settings.namespaces.first().cloned()).or_else(|| std::env::var("POD_NAMESPACE").ok()).unwrap_or_else(|| "default".into())
}

/// Starts contending for the Lease (or, with leader election off, leads at once).
pub async fn start(client: &Client, settings: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<Leadership> {
    if !settings.leader_election {
        let (sender, receiver) = watch::channel(true);
        // Keep the sender alive for the life of the process.
        std::mem::forget(sender);
        return Ok(Leadership { receiver, metrics, task: None });
    }
    let duration = settings.lease_seconds.max(2) as u64;
    // Renew a third of the way before expiry, at least a second early.
    let grace = (duration / 3).max(1);
    let identity = identity(settings);
    let namespace = lease_namespace(settings);
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
        .with_namespace(&namespace)
        .with_parameters(LeaseParams::new(identity.clone(), duration, grace))
        .build()
        .await?;
    let (receiver, task) = manager.watch().await;
    tracing::info!(%identity, %namespace, lease = %settings.lease_name, duration, "contending for leadership");
    Ok(Leadership { receiver, metrics, task: Some(task) })
}
