//! The I/O of the function steps the core asks for: the trigger frequency
//! check (the history store), starting another workflow's run (a TriggerRun
//! named after the step, so it is created once), throttles and batches (their
//! state lives in Throttle and Batch resources). Fetch requests are the
//! deliverer's ([`crate::controller::delivery::Deliverer::fetch`]).

use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use super::Reconciler;
use crate::controller::workflow::find_by_key;
use crate::controller::Error;
use crate::core::batch::{self as core_batch, BatchDecision};
use crate::core::execution::RecipientContext;
use crate::core::functions::{self, BatchCall, BatchOutcome, FrequencyCheck, ThrottleCall, ThrottleOutcome, TriggerCall, TriggerOutcome};
use crate::core::ids;
use crate::core::model::RecipientKey;
use crate::core::throttle as core_throttle;
use crate::resources::{TriggerRun, TriggerRunSpec};

/// The label naming the run whose trigger-workflow step started a run.
pub const PARENT_RUN_LABEL: &str = "herald.dev/parent-run";
/// Set on a run whose batch closed before its window ended (maxActivities):
/// its waiting carriers look at their batches at once.
pub const WAKE_ANNOTATION: &str = "herald.dev/batch-wake";

impl Reconciler<'_> {
    /// Whether this recipient run is the workflow's first for the recipient.
    pub(super) async fn check_frequency(&self, recipient: &RecipientContext<'_>, check: &FrequencyCheck) -> Result<bool, String> {
        let Some(history) = &self.ctx.history else {
            return Err("triggerFrequency needs the history store (--database-url)".into());
        };
        let tenant = check.tenant.as_deref().unwrap_or_default();
        crate::store::once::claim(&history.store, &self.namespace, &check.workflow, &recipient.key.canonical(), tenant, recipient.recipient_run_id).await.map_err(|e| e.to_string())
    }

    /// Starts the step's run (once: a second create finds it there).
    pub(super) async fn trigger_workflow(&self, call: &TriggerCall) -> TriggerOutcome {
        let failed = |reason: &str, message: String| TriggerOutcome::Failed { reason: reason.into(), message };
        match find_by_key(self.ctx, &self.namespace, &call.workflow) {
            None => return failed("WorkflowNotFound", format!("no Workflow `{}` in namespace {}", call.workflow, self.namespace)),
            Some(w) if !w.spec.active => return TriggerOutcome::Skipped { reason: "WorkflowInactive".into(), message: format!("Workflow `{}` is inactive", call.workflow) },
            Some(_) => {}
        }
        let recipient = match &call.recipient {
            RecipientKey::User(id) => json!(id),
            RecipientKey::Object { collection, id } => json!({"id": id, "collection": collection}),
        };
        let mut run = TriggerRun::new(
            &call.name,
            TriggerRunSpec {
                workflow: call.workflow.clone(),
                actor: call.actor.clone().map(Value::String),
                recipients: vec![recipient],
                data: Some(call.data.clone()),
                cancellation_key: call.cancellation_key.clone(),
                tenant: call.tenant.clone().map(Value::String),
                ..Default::default()
            },
        );
        run.metadata.labels = Some([(PARENT_RUN_LABEL.to_string(), ids::label_value(&self.name))].into());
        let api: Api<TriggerRun> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        match api.create(&PostParams::default(), &run).await {
            Ok(created) => TriggerOutcome::Started { workflow_run_id: created.uid() },
            // Created by an earlier attempt of this step (the name is the step's own).
            Err(kube::Error::Api(e)) if e.code == 409 => TriggerOutcome::Started { workflow_run_id: api.get(&call.name).await.ok().and_then(|r| r.uid()) },
            Err(kube::Error::Api(e)) if e.code == 400 || e.code == 422 => failed("InvalidTrigger", e.message),
            Err(e) => failed("TriggerFailed", e.to_string()),
        }
    }

    /// Asks the step's throttle (see [`crate::controller::throttle`]).
    /// `Ok(Err(why))`: the request itself is invalid (a window or key out of
    /// bounds): the step is skipped, as Knock does.
    pub(super) async fn throttle(&self, call: &ThrottleCall) -> Result<Result<ThrottleOutcome, String>, Error> {
        let window = match call.window {
            functions::Window::For(d) => core_throttle::ThrottleWindow::For(d),
            functions::Window::Until(t) => core_throttle::ThrottleWindow::Until(t),
        };
        let request = core_throttle::ThrottleRequest {
            group: core_throttle::ThrottleGroup::new(call.workflow.clone(), call.step_ref.clone(), &call.recipient, call.key.clone()),
            window,
            limit: call.limit,
            recipient_run_id: call.recipient_run_id,
        };
        match crate::controller::throttle::pass(&self.ctx.client, &self.namespace, &request, jiff::Timestamp::now()).await {
            Ok(core_throttle::ThrottleDecision::Admitted) => Ok(Ok(ThrottleOutcome::Admitted)),
            Ok(core_throttle::ThrottleDecision::Throttled { window_end }) => Ok(Ok(ThrottleOutcome::Throttled { window_end })),
            Err(Error::Throttle(e)) => Ok(Err(e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Visits the step's batch (see [`crate::controller::batch`]).
    pub(super) async fn batch(&self, call: &BatchCall) -> Result<BatchOutcome, Error> {
        let std = |d: jiff::SignedDuration| d.unsigned_abs();
        let window = match call.window {
            functions::BatchWindow::Fixed(d) => core_batch::BatchWindow::Fixed(std(d)),
            functions::BatchWindow::Sliding { window, max } => core_batch::BatchWindow::Sliding { window: std(window), max: std(max) },
            functions::BatchWindow::Until(t) => core_batch::BatchWindow::Until(t),
        };
        let actor_id = call.actor.get("id").and_then(Value::as_str).map(str::to_string);
        let visit = core_batch::Visit {
            group: core_batch::BatchGroup::new(&call.workflow, &call.step_ref, &call.recipient.to_string(), &call.key),
            settings: core_batch::BatchSettings { window, max_activities: call.max_activities, render_limit: call.render_limit, flush_leading: call.flush_leading },
            activity: core_batch::Activity {
                recipient_run_id: call.recipient_run_id.to_string(),
                workflow_run_id: call.workflow_run_id.to_string(),
                trigger_run: self.name.clone(),
                actor_id,
                actor: (!call.actor.is_null()).then(|| call.actor.clone()),
                data: Some(call.data.clone()),
                cancellation_key: call.cancellation_key.clone(),
                ..Default::default()
            },
            cancelled_keys: self.cancelled_keys(&call.workflow, &call.recipient),
            carrying: call.carrier,
        };
        let decision = crate::controller::batch::visit(&self.ctx.client, &self.namespace, &visit, jiff::Timestamp::now()).await?;
        Ok(match decision {
            BatchDecision::Open { closes_at } => BatchOutcome::Opened { closes_at },
            BatchDecision::Wait { closes_at } => BatchOutcome::Wait { closes_at },
            BatchDecision::FlushLeading => BatchOutcome::Continue,
            BatchDecision::Closed(summary) if summary.is_empty() => BatchOutcome::Empty,
            BatchDecision::Closed(summary) => BatchOutcome::Closed { summary: summary.variables() },
            BatchDecision::Joined { carrier_run, wake_carrier, .. } => {
                if wake_carrier {
                    self.wake(&carrier_run).await;
                }
                BatchOutcome::Joined { carrier: carrier_run }
            }
        })
    }

    /// The cancellation keys of this workflow's live Cancellations that cover the recipient.
    fn cancelled_keys(&self, workflow: &str, recipient: &RecipientKey) -> std::collections::BTreeSet<String> {
        self.ctx
            .stores
            .cancellations
            .state()
            .iter()
            .filter(|c| c.namespace().as_deref() == Some(self.namespace.as_str()) && c.spec.workflow == workflow)
            .filter(|c| c.spec.recipients.is_empty() || c.spec.recipients.iter().any(|r| crate::core::expansion::parse_reference(r).is_ok_and(|k| &k == recipient)))
            .map(|c| c.spec.cancellation_key.clone())
            .collect()
    }

    /// Tells a batch's carrier its batch closed early: an annotation on its
    /// run wakes it (a reconcile), and asks its waiting carriers to look.
    async fn wake(&self, run: &str) {
        let api: Api<TriggerRun> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let patch = json!({"metadata": {"annotations": {WAKE_ANNOTATION: jiff::Timestamp::now().to_string()}}});
        if let Err(e) = api.patch(run, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await {
            tracing::warn!(error = %e, %run, "could not wake a batch's carrier; it looks again at its window's end");
        }
    }
}
