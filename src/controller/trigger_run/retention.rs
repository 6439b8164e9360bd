//! Retention: a finished run (and its pages) is deleted once its TTL passes.
//! With a history store, the run is archived first (its summary, every
//! recipient's record and any message not stored yet) and leaves the cluster
//! after --finished-ttl-seconds; if the store cannot take it, it stays and the
//! archive is retried.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use uuid::Uuid;

use super::{until, Reconciler, IDEMPOTENCY_RETENTION, RUN_LABEL};
use crate::controller::Error;
use crate::core::history::{MessageRecord, MessageSource};
use crate::core::ids;
use crate::core::model::RecipientKey;
use crate::resources::workflow::StepType;
use crate::resources::{TriggerRun, TriggerRunStatus};
use crate::store::{self, History};

impl Reconciler<'_> {
    /// When a finished run leaves the cluster: ttlSecondsAfterFinished (or
    /// the operator's default) after completion. Without a history store,
    /// runs with an idempotency key stay at least 7 days after creation (the
    /// run is what holds the key); with one, the store keeps the key.
    fn expiry(&self, status: &TriggerRunStatus) -> Option<Timestamp> {
        let finished = status.completion_time.as_ref()?.0;
        let settings = &self.ctx.settings;
        let default_ttl = if self.ctx.history.is_some() { settings.finished_ttl_seconds } else { settings.default_ttl_seconds };
        let ttl = self.run.spec.ttl_seconds_after_finished.unwrap_or(default_ttl).max(0);
        let mut expiry = finished.checked_add(SignedDuration::from_secs(ttl)).ok()?;
        if self.run.spec.idempotency_key.is_some() && self.ctx.history.is_none() {
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

    /// Archives (with a history store) and deletes a finished run (and its pages) once it expires.
    pub(super) async fn retain(&self, status: &TriggerRunStatus) -> Result<Action, Error> {
        let Some(expiry) = self.expiry(status) else { return Ok(Action::await_change()) };
        if expiry > Timestamp::now() {
            return Ok(self.retention_action(status));
        }
        if let Some(history) = &self.ctx.history {
            self.archive(history, status).await?;
            self.ctx.metrics.runs_archived.inc();
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
        tracing::info!(run = %self.name, archived = self.ctx.history.is_some(), "finished run left the cluster after its TTL");
        Ok(Action::await_change())
    }

    /// Writes the finished run to the history store: first every message
    /// still in the writer's buffer, then the run, then its recipients'
    /// records a page at a time with the messages they stand for that the
    /// store does not have (a buffer that was full, a crash), and its
    /// idempotency key. A page at a time: a run of any size is archived
    /// holding one page.
    async fn archive(&self, history: &History, status: &TriggerRunStatus) -> Result<(), Error> {
        history.messages.flush().await?;
        let id = status.workflow_run_id.as_deref().and_then(|id| Uuid::parse_str(id).ok()).or_else(|| self.run.uid().and_then(|u| Uuid::parse_str(&u).ok())).unwrap_or_default();
        // The run as kubectl showed it, without the records (kept row by row) or field bookkeeping.
        let mut run: TriggerRun = self.run.clone();
        run.metadata.managed_fields = None;
        if let Some(s) = run.status.as_mut() {
            s.recipients.clear();
            s.pages.clear();
        }
        let archived = store::runs::ArchivedRun {
            id,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            workflow: self.run.spec.workflow.clone(),
            state: format!("{:?}", status.state),
            run: serde_json::to_value(&run)?,
            inserted_at: self.run.metadata.creation_timestamp.as_ref().map_or_else(Timestamp::now, |t| t.0),
        };
        store::runs::archive_run(&history.store, &archived).await?;
        let mut position = 0;
        let pages = self.pages_api();
        for page in 0..status.pages.len().max(1) {
            let records = match status.pages.get(page) {
                Some(name) => pages.get_opt(name).await?.and_then(|p| p.status).map(|s| s.recipients).unwrap_or_default(),
                None => status.recipients.clone(),
            };
            let rows =
                records.iter().map(|r| Ok((Uuid::parse_str(&r.recipient_run_id).unwrap_or_default(), serde_json::to_value(r)?))).collect::<Result<Vec<_>, serde_json::Error>>()?;
            let messages = self.messages_of(status, id, &records);
            store::runs::archive_recipients(&history.store, id, position, &rows, &messages).await?;
            position += records.len();
        }
        if let Some(fingerprint) = self.run.spec.idempotency_key.as_ref().and_then(|_| self.run.annotations().get(crate::resources::trigger_run::FINGERPRINT_ANNOTATION)) {
            store::idempotency::record(&history.store, &self.namespace, &self.name, fingerprint, archived.inserted_at).await?;
        }
        tracing::info!(run = %self.name, recipients = position, "archived finished run to the history store");
        Ok(())
    }

    /// The messages the records' channel steps stand for (without content: that was the live record's).
    fn messages_of(&self, status: &TriggerRunStatus, run_id: Uuid, records: &[crate::core::status::RecipientStatus]) -> Vec<MessageRecord> {
        let steps = status.workflow_spec.as_ref().map(|w| w.steps.as_slice()).unwrap_or_default();
        let channel_of = |step_ref: &str| {
            let step = steps.iter().find(|s| s.step_ref == step_ref && s.step_type == StepType::Channel)?;
            let channel = step.channel.clone()?;
            let kind = self.ctx.stores.channels.get(&self.namespace, &channel).map_or_else(|| "unknown".to_string(), |c| c.spec.channel_type.preference_name().to_string());
            Some((channel, kind))
        };
        let actor = status.actor.as_deref().map(|a| match a.split_once('/') {
            Some((collection, id)) => RecipientKey::object(collection, id),
            None => RecipientKey::user(a),
        });
        let data = serde_json::to_value(self.run.spec.data.clone().unwrap_or_default()).unwrap_or_default();
        let mut out = Vec::new();
        for record in records {
            let source = MessageSource {
                namespace: self.namespace.clone(),
                workflow: self.run.spec.workflow.clone(),
                workflow_run_id: run_id,
                recipient_run_id: Uuid::parse_str(&record.recipient_run_id).unwrap_or_default(),
                recipient: record.key(),
                tenant: status.tenant.clone(),
                actor: actor.clone(),
                data: data.clone(),
                categories: status.workflow_spec.as_ref().map(|w| w.categories.clone()).unwrap_or_default(),
            };
            for step in &record.steps {
                if let Some((channel, kind)) = channel_of(&step.step_ref) {
                    out.extend(MessageRecord::from_step(&source, step, &channel, &kind));
                }
            }
        }
        out
    }
}
