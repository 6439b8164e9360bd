//! The I/O of the function steps the core asks for: the trigger frequency
//! check (the history store), starting another workflow's run (a TriggerRun
//! named after the step, so it is created once), throttles and batches (their
//! state lives in Throttle and Batch resources). Fetch requests are the
//! deliverer's ([`crate::controller::delivery::Deliverer::fetch`]).

use kube::api::PostParams;
use kube::Api;
use serde_json::{json, Value};

use super::{Reconciler, RUN_LABEL};
use crate::controller::workflow::find_by_key;
use crate::controller::Error;
use crate::core::execution::RecipientContext;
use crate::core::functions::{BatchCall, BatchOutcome, FrequencyCheck, ThrottleCall, ThrottleOutcome, TriggerCall, TriggerOutcome};
use crate::core::ids;
use crate::core::model::RecipientKey;
use crate::resources::{TriggerRun, TriggerRunSpec};

/// The label naming the run whose trigger-workflow step started a run.
pub const PARENT_RUN_LABEL: &str = "herald.dev/parent-run";

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
            Ok(_) => TriggerOutcome::Started,
            // Created by an earlier attempt of this step (the name is the step's own).
            Err(kube::Error::Api(e)) if e.code == 409 => TriggerOutcome::Started,
            Err(kube::Error::Api(e)) if e.code == 400 || e.code == 422 => failed("InvalidTrigger", e.message),
            Err(e) => failed("TriggerFailed", e.to_string()),
        }
    }

    /// Asks the step's throttle.
    pub(super) async fn throttle(&self, call: &ThrottleCall) -> Result<ThrottleOutcome, Error> {
        let _ = (call, RUN_LABEL);
        Err(Error::Stale("throttle steps are not available yet".into()))
    }

    /// Visits the step's batch.
    pub(super) async fn batch(&self, call: &BatchCall) -> Result<BatchOutcome, Error> {
        let _ = call;
        Err(Error::Stale("batch steps are not available yet".into()))
    }
}
