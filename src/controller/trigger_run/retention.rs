//! Retention: a finished run (and its pages) is deleted once its TTL passes.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams};
use kube::runtime::controller::Action;

use super::{until, Reconciler, IDEMPOTENCY_RETENTION, RUN_LABEL};
use crate::controller::Error;
use crate::core::ids;
use crate::resources::TriggerRunStatus;

impl Reconciler<'_> {
    /// When a finished run is deleted: ttlSecondsAfterFinished (or the
    /// operator's default) after completion, and for runs with an idempotency
    /// key never before 7 days after creation.
    fn expiry(&self, status: &TriggerRunStatus) -> Option<Timestamp> {
        let finished = status.completion_time.as_ref()?.0;
        let ttl = self.run.spec.ttl_seconds_after_finished.unwrap_or(self.ctx.settings.default_ttl_seconds).max(0);
        let mut expiry = finished.checked_add(SignedDuration::from_secs(ttl)).ok()?;
        if self.run.spec.idempotency_key.is_some() {
            if let Some(created) = self.run.metadata.creation_timestamp.as_ref() {
                expiry = expiry.max(created.0.checked_add(IDEMPOTENCY_RETENTION).ok()?);
            }
        }
        Some(expiry)
    }

    pub(super) fn retention_action(&self, status: &TriggerRunStatus) -> Action {
        match self.expiry(status) {
            Some(expiry) => Action::requeue(until(expiry).max(Duration::from_millis(100))),
            None => Action::await_change(),
        }
    }

    /// Deletes a finished run (and its pages) once it expires.
    pub(super) async fn retain(&self, status: &TriggerRunStatus) -> Result<Action, Error> {
        let Some(expiry) = self.expiry(status) else { return Ok(Action::await_change()) };
        if expiry > Timestamp::now() {
            return Ok(self.retention_action(status));
        }
        // Pages first: a run is never gone while its pages remain (clusters
        // without a garbage collector, like the local control plane, would keep them).
        // A run that kept its records inline has none.
        let inline = status.pages.is_empty() && !status.recipients.is_empty();
        if !inline {
            let selector = format!("{RUN_LABEL}={}", ids::label_value(&self.name));
            self.pages_api().delete_collection(&DeleteParams::default(), &ListParams::default().labels(&selector)).await?;
            self.ctx.metrics.write("RecipientPage");
        }
        match self.runs().delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        self.ctx.metrics.write("TriggerRun");
        tracing::info!(run = %self.name, "deleted finished run after its TTL");
        Ok(Action::await_change())
    }
}
