//! Leader election through a coordination.k8s.io Lease, with a fence: every
//! replica serves the HTTP API, only the leader reconciles, and the leader
//! stops starting deliveries as soon as it cannot confirm its Lease.
//!
//! Why not a library: a leader that is paused (SIGSTOP, a long GC-like stall,
//! a VM freeze) or cut off from the apiserver must learn that its term may be
//! over *before* it sends anything else, and the libraries at hand hide
//! renewal errors. Here the leader's term is bounded by its own monotonic
//! clock: a renewal sent at `t0` and answered with success makes this replica
//! the leader until `t0 + 2/3 of the lease duration` ([`Fence::holds`]).
//! Another replica takes over only after it has itself seen the Lease
//! unchanged for the whole duration (Kubernetes' client-go rule: expiry is
//! judged by the observer's clock, never by comparing clocks), so the terms
//! never overlap. A stale leader's late writes are refused by the apiserver
//! too: herald's status writes carry the resourceVersion they were based on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::settings::Settings;

/// Until when this replica may act as the leader (by its monotonic clock).
#[derive(Clone, Debug)]
pub struct Fence(Arc<Mutex<Option<Instant>>>);

impl Fence {
    /// A fence that always holds (leader election turned off).
    pub fn unfenced() -> Self {
        Fence(Arc::new(Mutex::new(Some(Instant::now() + Duration::from_secs(100 * 365 * 86_400)))))
    }

    /// The fence of a replica with these settings: closed until it leads, or
    /// always open when leader election is off.
    pub fn for_settings(settings: &Settings) -> Self {
        if settings.leader_election {
            Fence(Arc::new(Mutex::new(None)))
        } else {
            Fence::unfenced()
        }
    }

    /// Whether this replica's term as leader certainly has not ended: checked
    /// before every delivery attempt.
    pub fn holds(&self) -> bool {
        self.lock().is_some_and(|until| Instant::now() < until)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn extend(&self, until: Instant) {
        *self.lock() = Some(until);
    }

    fn close(&self) {
        *self.lock() = None;
    }
}

/// Whether this replica leads, as it changes.
pub struct Leadership {
    receiver: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    fence: Fence,
    /// The elector's task and the way to ask it to release the Lease.
    elector: Option<(tokio::task::JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>,
}

impl Leadership {
    /// Waits until this replica leads; false if the elector stopped.
    pub async fn acquired(&mut self) -> bool {
        let acquired = self.receiver.wait_for(|leading| *leading).await.is_ok();
        self.metrics.leader.set(i64::from(acquired));
        acquired
    }

    /// Waits until this replica stops leading (lost, could not renew in time,
    /// or the elector stopped).
    pub async fn lost(&mut self) {
        let _ = self.receiver.wait_for(|leading| !*leading).await;
        self.metrics.leader.set(0);
    }

    /// Whether the elector is still running (it only stops when released or on a bug).
    pub fn elector_alive(&self) -> bool {
        self.elector.as_ref().is_none_or(|(task, _)| !task.is_finished())
    }

    /// Gives the Lease up (on a graceful stop), so that another replica takes
    /// over at once instead of after the lease duration.
    pub async fn release(self) {
        self.metrics.leader.set(0);
        self.fence.close();
        let Some((task, release)) = self.elector else { return };
        let _ = release.send(());
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the leader elector stopped abnormally"),
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
/// `fence` (from [`Fence::for_settings`]) is opened while this replica leads.
pub async fn start(client: &Client, settings: &Settings, metrics: Arc<Metrics>, fence: Fence) -> anyhow::Result<Leadership> {
    if !settings.leader_election {
        let (sender, receiver) = watch::channel(true);
        // Keep the sender alive for the life of the process.
        std::mem::forget(sender);
        return Ok(Leadership { receiver, metrics, fence, elector: None });
    }
    let duration = Duration::from_secs(settings.lease_seconds.max(2) as u64);
    let elector = Elector {
        api: Api::namespaced(client.clone(), &lease_namespace(settings)),
        name: settings.lease_name.clone(),
        identity: identity(settings),
        duration,
        fence,
        observed: None,
    };
    tracing::info!(identity = %elector.identity, namespace = %lease_namespace(settings), lease = %elector.name, duration_s = duration.as_secs(), "contending for leadership");
    let fence = elector.fence.clone();
    let (sender, receiver) = watch::channel(false);
    let (release, released) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(elector.run(sender, released));
    Ok(Leadership { receiver, metrics, fence, elector: Some((task, release)) })
}

/// What a Lease said when this replica last saw it change, and when (by this replica's clock).
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    fence: Fence,
    observed: Option<Observed>,
}

/// What one round of the elector found.
enum Round {
    /// This replica holds the Lease, renewed by a request sent at this instant.
    Leading {
        sent: Instant,
    },
    Following,
}

impl Elector {
    /// How long a successful renewal lets this replica act: two thirds of the
    /// lease duration, leaving a third for clock-rate differences and for the
    /// time the answer took (counted from when the request was sent).
    fn term(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How often to try: a third of the term, so a renewal or two may fail
    /// before the term ends.
    fn period(&self) -> Duration {
        (self.term() / 3).max(Duration::from_millis(200))
    }

    async fn run(mut self, leading: watch::Sender<bool>, mut released: tokio::sync::oneshot::Receiver<()>) {
        loop {
            match self.round().await {
                Ok(Round::Leading { sent }) => {
                    self.fence.extend(sent + self.term());
                    if !*leading.borrow() {
                        tracing::info!(identity = %self.identity, "acquired the leader Lease");
                    }
                    leading.send_if_modified(|l| !std::mem::replace(l, true));
                }
                Ok(Round::Following) => {
                    self.fence.close();
                    if leading.send_if_modified(|l| std::mem::replace(l, false)) {
                        tracing::warn!(identity = %self.identity, "another replica holds the leader Lease: stopping");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "leader election: the Lease could not be read or written"),
            }
            // Wake when the term ends too, to stop at once if no renewal came in time.
            let deadline = tokio::time::sleep(self.period());
            let until = if *leading.borrow() { *self.fence.lock() } else { None };
            let expiry = async {
                match until {
                    Some(until) => tokio::time::sleep_until(until.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = deadline => {}
                () = expiry => {}
                _ = &mut released => {
                    self.release(&leading).await;
                    return;
                }
            }
            if *leading.borrow() && !self.fence.holds() {
                tracing::warn!(identity = %self.identity, "could not renew the leader Lease in time: stopping");
                leading.send_replace(false);
            }
        }
    }

    /// Reads the Lease and renews, acquires or follows.
    async fn round(&mut self) -> Result<Round, kube::Error> {
        let sent = Instant::now();
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let created = self.api.create(&PostParams::default(), &self.lease(None, 0)).await;
            return match created {
                Ok(_) => Ok(Round::Leading { sent }),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Following),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let changed = self.observed.as_ref().is_none_or(|o| o.holder != holder || o.renew_time != spec.renew_time);
        if changed {
            self.observed = Some(Observed { holder: holder.clone(), renew_time: spec.renew_time.clone(), at: Instant::now() });
        }
        let mine = holder.as_deref() == Some(self.identity.as_str());
        // The holder's term, as this replica saw it, by this replica's clock.
        let lease_duration = spec.lease_duration_seconds.map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
        let expired = holder.is_none() || self.observed.as_ref().is_some_and(|o| o.at.elapsed() >= lease_duration);
        if !mine && !expired {
            return Ok(Round::Following);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let mut next = self.lease(Some(&spec), transitions);
        next.metadata.resource_version = lease.metadata.resource_version.clone();
        // Conditional on the version read: of two replicas racing for an expired Lease, one wins.
        match self.api.replace(&self.name, &PostParams::default(), &next).await {
            Ok(written) => {
                let spec = written.spec.unwrap_or_default();
                self.observed = Some(Observed { holder: spec.holder_identity, renew_time: spec.renew_time, at: Instant::now() });
                Ok(Round::Leading { sent })
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Following),
            Err(e) => Err(e),
        }
    }

    fn lease(&self, previous: Option<&LeaseSpec>, transitions: i32) -> Lease {
        let now = MicroTime(Timestamp::now());
        let keeps = previous.is_some_and(|p| p.holder_identity.as_deref() == Some(self.identity.as_str()));
        Lease {
            metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.duration.as_secs() as i32),
                acquire_time: if keeps { previous.and_then(|p| p.acquire_time.clone()) } else { Some(now.clone()) },
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    /// Gives the Lease up if this replica holds it: an empty holder lets
    /// another replica take over at its next round.
    async fn release(&mut self, leading: &watch::Sender<bool>) {
        self.fence.close();
        leading.send_replace(false);
        let Ok(Some(lease)) = self.api.get_opt(&self.name).await else { return };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        let released = Lease { metadata: lease.metadata.clone(), spec: Some(spec) };
        match self.api.replace(&self.name, &PostParams::default(), &released).await {
            Ok(_) => tracing::info!("released the leader Lease"),
            Err(e) => tracing::warn!(error = %e, "releasing the leader Lease failed; it expires on its own"),
        }
    }
}
