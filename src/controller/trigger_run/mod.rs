//! The TriggerRun reconciler: accepts a trigger (workflow, data, recipients,
//! actor, tenant), expands its recipients, then takes every recipient through
//! the workflow's steps, checkpointing their records. A small run keeps its
//! records inline in its own status, and a run that finishes within its first
//! checkpoint interval writes its status once; a large one keeps them in
//! RecipientPages. The decisions are the core's; these modules read, call the
//! core, and write: `acceptance` (checks, identify, expansion, layout),
//! `drive` (recipients through their steps, checkpoints, cancellation),
//! `records` (where records live and the conditional writes that save them),
//! `stream` (a large run's recipients expanded and cut into pages while the
//! first pages deliver), `retention` (deleting finished runs).

mod acceptance;
mod drive;
mod functions;
mod records;
mod retention;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};
use uuid::Uuid;

use super::fair::FairSlots;
use super::lenient::Lenient;
use super::{scope_api, scopes, Context, Error};
use crate::core::ids;
use crate::core::status::RunState;
use crate::resources::{Cancellation, RecipientPage, TriggerRun, TriggerRunStatus, Workflow};

/// Recipients per RecipientPage at most: 10,000 recipients take 20 pages.
/// Workflows with many steps get fewer a page (see `core::status::plan_pages`),
/// so that a page always fits etcd's request limit.
pub const PAGE_SIZE: usize = 500;
/// A run that is still expanding cuts its next page only while fewer than
/// this many pages have recipients to go: what a run holds in memory is a
/// few pages, not its audience.
pub const PAGES_IN_FLIGHT: usize = 4;
/// A run takes on no further page while this many pages it is done with
/// wait for their last records to be saved: a fan-out that delivers faster
/// than the apiserver takes its saves goes at the pace of the saves, holding
/// a few pages, not every page it finished.
pub const PAGES_UNSAVED: usize = 16;
/// Pages of one checkpoint written at once.
pub const PAGES_SAVED_AT_ONCE: usize = 4;
/// Changed records are saved this long after the last checkpoint (a page is
/// also saved as soon as its recipients are done). Saves do not stall
/// deliveries (one is in flight at a time), so a crash loses at most this
/// much recorded progress plus what finished during the save in flight, and
/// a run writes each page about once however fast it delivers.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);
/// Directly listed recipients allowed per trigger (Knock's limit).
pub const MAX_RECIPIENTS: usize = 1000;
/// The label that ties a RecipientPage to its TriggerRun: the run's name, or
/// for names over 63 characters a shortened, hashed form ([`ids::label_value`]).
pub const RUN_LABEL: &str = "herald.dev/trigger-run";
/// Keys of runs with an idempotency key live at least this long (Knock keeps keys 7 days).
const IDEMPOTENCY_RETENTION: SignedDuration = SignedDuration::from_hours(7 * 24);

/// The workflow run id: the TriggerRun's uid.
fn run_id(run: &TriggerRun) -> Uuid {
    run.uid().and_then(|u| Uuid::parse_str(&u).ok()).unwrap_or_default()
}

/// A RecipientPage name: `<run>-p<index>`, shortened with a hash for long run names.
pub fn page_name(run: &str, index: usize) -> String {
    let suffix = format!("-p{index}");
    if run.len() + suffix.len() <= 253 {
        format!("{run}{suffix}")
    } else {
        // Names are ASCII, so byte 200 is a char boundary; a cut may end in `.` or `-`.
        let head = run.get(..200).unwrap_or(run).trim_end_matches(['.', '-']);
        format!("{head}-{}{suffix}", ids::short_hash(run, 10))
    }
}

struct Reconciler<'a> {
    ctx: &'a Context,
    run: &'a TriggerRun,
    namespace: String,
    name: String,
    /// The resourceVersion of the run and of each page as this reconcile last
    /// read or wrote them. Every status write is conditional on it, so a
    /// stale writer (a paused former leader) loses instead of rolling back
    /// the new leader's checkpoints.
    versions: std::sync::Mutex<HashMap<String, String>>,
    /// The status this reconcile last wrote: a write that would change
    /// nothing is skipped.
    written: std::sync::Mutex<Option<TriggerRunStatus>>,
}

/// The key of the run itself in [`Reconciler::versions`] (page names never contain `/`).
const RUN_VERSION: &str = "/run";

impl<'a> Reconciler<'a> {
    fn runs(&self) -> Api<TriggerRun> {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    fn pages_api(&self) -> Api<RecipientPage> {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let event = Event { type_, reason: reason.into(), note: Some(crate::core::truncate(&note, 1000)), action: "Reconcile".into(), secondary: None };
        if let Err(e) = self.ctx.recorder.publish(&event, &self.run.object_ref(&())).await {
            tracing::warn!(error = %e, run = %self.name, "could not publish event");
        }
    }

    fn version(&self, key: &str) -> Option<String> {
        self.versions.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// `metadata` for a conditional server-side apply: a resourceVersion in an
    /// apply request is a precondition.
    fn precondition(&self, key: &str) -> Value {
        match self.version(key) {
            Some(v) => json!({"resourceVersion": v}),
            None => json!({}),
        }
    }

    fn remember(&self, key: &str, version: Option<String>) {
        if let Some(v) = version {
            self.versions.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_string(), v);
        }
    }
}

/// A write refused because the object changed since it was read: another
/// writer (a newer leader) got there first. The reconcile stops; the next one
/// reads afresh.
fn conflict_is_stale(e: kube::Error) -> Error {
    match e {
        kube::Error::Api(s) if s.code == 409 => Error::Stale(s.message),
        e => Error::Kube(e),
    }
}

/// The time from now until `t` (zero if past).
fn until(t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO)
}

async fn reconcile(run: Arc<TriggerRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    use tracing::Instrument;
    let started = std::time::Instant::now();
    let labels = crate::metrics::ControllerLabels { controller: "triggerrun".into() };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    // A guard, not a dec() after the await: a reconcile aborted where it
    // stands (leadership lost) must not stay counted as in flight.
    let _in_flight = crate::metrics::InFlight::count(&ctx.metrics.reconciles_in_flight);
    // Every log line of the reconcile (deliveries included) carries the run's ids.
    let span = tracing::info_span!(
        "reconcile",
        namespace = %run.namespace().unwrap_or_default(),
        run = %run.name_any(),
        workflow = %run.spec.workflow,
        workflow_run_id = %run_id(&run),
    );
    let result = reconcile_run(&run, &ctx).instrument(span).await;
    ctx.metrics.reconcile_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_run(cached: &TriggerRun, ctx: &Context) -> Result<Action, Error> {
    let namespace = cached.namespace().ok_or(Error::MissingMetadata)?;
    let name = cached.name_any();
    // The watch cache can lag behind this controller's own last status write.
    // Acceptance expands and writes the pages afresh, so it must never run
    // twice: a run that looks Pending is read from the apiserver first. (A
    // small run accepted in memory is saved at its first checkpoint: until
    // then it is accepted again after a crash, and what it had sent is sent
    // again with the same Idempotency-Key, as for any unsaved outcome.)
    let fresh;
    // Unfinished runs are read fresh for another reason too: status writes are
    // conditional on the version read, and the cache may not have our last one.
    let run = if cached.status.as_ref().is_none_or(|s| !s.state.is_finished()) {
        let api: Api<TriggerRun> = Api::namespaced(ctx.client.clone(), &namespace);
        match api.get_opt(&name).await? {
            Some(run) => {
                fresh = run;
                &fresh
            }
            None => return Ok(Action::await_change()),
        }
    } else {
        cached
    };
    if run.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let r = Reconciler { ctx, run, namespace, name, versions: Default::default(), written: Default::default() };
    r.remember(RUN_VERSION, run.metadata.resource_version.clone());
    let mut status = run.status.clone().unwrap_or_default();
    if status.state.is_finished() {
        return r.retain(&status).await;
    }
    if status.state == RunState::Pending {
        return match r.accept(status).await? {
            Ok((status, pages, directory)) => {
                let reached = records::reached(&pages);
                r.execute(status, pages, reached, Some(directory)).await
            }
            Err(action) => Ok(action),
        };
    }
    // The spec is immutable; where the apiserver cannot enforce it (before
    // Kubernetes 1.25), a changed spec is never acted on.
    // A run stopped mid-expansion goes on expanding where its pages end.
    let (pages, reached) = r.load_pages(&mut status).await?;
    if status.observed_generation.is_some() && status.observed_generation != run.metadata.generation {
        return r.fail_unfinished(status, pages, "SpecChanged", "the spec changed after the run started; create a new TriggerRun instead").await;
    }
    r.execute(status, pages, reached, None).await
}

/// A TriggerRun herald cannot read is skipped with a Warning Event (the
/// other runs go on); see [`super::lenient`].
async fn reconcile_lenient(run: Arc<Lenient<TriggerRun>>, ctx: Arc<Context>) -> Result<Action, Error> {
    match &*run {
        Lenient::Valid(valid) => reconcile(valid.clone(), ctx).await,
        Lenient::Invalid { error, .. } => {
            tracing::warn!(run = %run.name_any(), %error, "skipping a TriggerRun herald cannot read");
            let note = crate::core::truncate(&format!("herald cannot read this TriggerRun and skips it: {error}"), 1000);
            let event = Event { type_: EventType::Warning, reason: "Unreadable".into(), note: Some(note), action: "Read".into(), secondary: None };
            if let Err(e) = ctx.recorder.publish(&event, &run.object_ref(&())).await {
                tracing::debug!(error = %e, "could not publish an Unreadable event");
            }
            Ok(Action::await_change())
        }
    }
}

fn error_policy(run: Arc<Lenient<TriggerRun>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&crate::metrics::ErrorLabels { controller: "triggerrun".into(), error: error.label().into() }).inc();
    tracing::warn!(run = %run.name_any(), error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Reconciles `run` once it has a slot of `slots` (none: unbounded). Runs
/// wait for slots fairly by namespace, so that one namespace's flood of
/// runs, or its long ones, do not hold every reconcile while another's wait.
async fn reconcile_fairly(slots: Option<Arc<FairSlots>>, run: Arc<Lenient<TriggerRun>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _slot = match &slots {
        None => None,
        Some(slots) => match slots.acquire(&run.namespace().unwrap_or_default(), "").await {
            Some(slot) => Some(slot),
            // Stopping: leave the run to the next leader (or the next start).
            None => return Ok(Action::await_change()),
        },
    };
    // Boxed once it has its slot: a reconcile still waiting holds a small
    // future, not a whole reconcile's state, however many runs are queued.
    Box::pin(reconcile_lenient(run, ctx)).await
}

/// Runs the TriggerRun controller until `shutdown`.
pub async fn run<F>(ctx: Arc<Context>, shutdown: F)
where
    F: std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
{
    // --max-concurrent-runs across every watched namespace, shared fairly
    // (kube's own bound is FIFO and per controller); 0 leaves them unbounded.
    let max_runs = usize::from(ctx.settings.max_concurrent_runs);
    let slots = (max_runs > 0).then(|| super::fair::pool("reconciles", max_runs, &ctx.settings, &ctx.metrics));
    // One controller per watched namespace (or one for all).
    let mut stores = Vec::new();
    let mut controllers = Vec::new();
    for scope in scopes(&ctx.settings) {
        // Lenient: one TriggerRun herald cannot read must not stop the others.
        let controller =
            Controller::new(scope_api::<Lenient<TriggerRun>>(&ctx.client, &scope), watcher::Config::default()).trigger_backoff(crate::controller::WatchBackoff::default());
        let store = controller.store();
        stores.push(store.clone());
        let by_cancellation = store.clone();
        let by_workflow = store.clone();
        let ready = store;
        let running = controller
            // Unbounded here: `slots` bounds the reconciles.
            .with_config(kube::runtime::controller::Config::default().concurrency(0))
            // A Cancellation wakes the runs it covers.
            .watches(scope_api::<Cancellation>(&ctx.client, &scope), watcher::Config::default(), move |c: Cancellation| {
                let ns = c.namespace();
                by_cancellation
                    .state()
                    .iter()
                    .filter(|l| {
                        l.valid().is_some_and(|r| {
                            r.namespace() == ns && r.spec.workflow == c.spec.workflow && r.spec.cancellation_key.as_deref() == Some(c.spec.cancellation_key.as_str())
                        })
                    })
                    .map(|l| ObjectRef::from_obj(l.as_ref()))
                    .collect::<Vec<_>>()
            })
            // A Workflow wakes the runs still waiting for it.
            .watches(scope_api::<Workflow>(&ctx.client, &scope), watcher::Config::default(), move |w: Workflow| {
                let ns = w.namespace();
                let key = w.key();
                by_workflow
                    .state()
                    .iter()
                    .filter(|l| l.valid().is_some_and(|r| r.namespace() == ns && r.spec.workflow == key && r.status.as_ref().is_none_or(|s| s.state == RunState::Pending)))
                    .map(|l| ObjectRef::from_obj(l.as_ref()))
                    .collect::<Vec<_>>()
            })
            .graceful_shutdown_on(shutdown.clone())
            .run(
                {
                    let slots = slots.clone();
                    move |run, ctx| reconcile_fairly(slots.clone(), run, ctx)
                },
                error_policy,
                ctx.clone(),
            )
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "triggerrun controller event");
                }
            });
        controllers.push(super::until_stopped(running, ready, shutdown.clone()));
    }
    let reporter = std::pin::pin!(report_queue_depth(ctx.clone(), stores));
    let janitor = std::pin::pin!(sweep_step_state(ctx.clone()));
    // On shutdown, reconciles still waiting for a slot give up at once
    // instead of starting (kube lets every reconcile it started finish).
    let closer = std::pin::pin!(async move {
        shutdown.await;
        if let Some(slots) = slots {
            slots.close();
        }
        std::future::pending::<()>().await
    });
    // The reporter, the janitor and the closer never end; they stop with the controllers.
    futures::future::select(std::pin::pin!(futures::future::join_all(controllers)), futures::future::select(reporter, futures::future::select(janitor, closer))).await;
}

/// How often ended throttle windows and abandoned batches are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Deletes throttle windows that ended and batches nobody will read again
/// (the leader's job: it runs with the controllers).
async fn sweep_step_state(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let now = Timestamp::now();
        for scope in scopes(&ctx.settings) {
            let scope = scope.as_deref();
            if let Err(e) = crate::controller::throttle::sweep(&ctx.client, scope, now).await {
                tracing::warn!(error = %e, "sweeping throttle windows");
            }
            if let Err(e) = crate::controller::batch::sweep(&ctx.client, scope, now).await {
                tracing::warn!(error = %e, "sweeping batches");
            }
        }
    }
}

/// Keeps `herald_work_queue_depth` (the runs not finished yet: the work the
/// controller has ahead of it) current.
async fn report_queue_depth(ctx: Arc<Context>, stores: Vec<kube::runtime::reflector::Store<Lenient<TriggerRun>>>) {
    loop {
        let depth = stores.iter().flat_map(|s| s.state()).filter(|l| l.valid().is_some_and(|r| r.status.as_ref().is_none_or(|s| !s.state.is_finished()))).count();
        ctx.metrics.work_queue_depth.set(depth as i64);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Deletes Cancellations whose retention window has passed, once a minute.
pub async fn sweep_cancellations(ctx: Arc<Context>) {
    let retention = SignedDuration::from_secs(ctx.settings.cancellation_retention_seconds.max(0));
    loop {
        let now = Timestamp::now();
        for c in ctx.stores.cancellations.state() {
            let expired = c.metadata.creation_timestamp.as_ref().is_some_and(|t| t.0.checked_add(retention).is_ok_and(|end| end <= now));
            if let (true, Some(ns)) = (expired, c.namespace()) {
                let api: Api<Cancellation> = Api::namespaced(ctx.client.clone(), &ns);
                if api.delete(&c.name_any(), &DeleteParams::default()).await.is_ok() {
                    ctx.metrics.write("Cancellation");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kubernetes' own rule for object names (IsDNS1123Subdomain): at most 253
    /// characters of dot-separated lowercase alphanumeric segments with inner dashes.
    fn is_object_name(s: &str) -> bool {
        s.len() <= 253
            && s.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !l.starts_with('-') && !l.ends_with('-'))
    }

    #[test]
    fn every_legal_run_name_has_legal_page_names() {
        let dotted = format!("{}.{}", "a".repeat(199), "b".repeat(53));
        for run in ["r".to_string(), "x".repeat(64), "x".repeat(250), "y".repeat(253), dotted, format!("{}-{}", "c".repeat(199), "d".repeat(53))] {
            assert!(is_object_name(&run), "test input {run}");
            for index in [0, 7, 12345] {
                let name = page_name(&run, index);
                assert!(is_object_name(&name), "{run} -> {name}");
            }
            assert_ne!(page_name(&run, 0), page_name(&run, 1));
        }
    }
}
