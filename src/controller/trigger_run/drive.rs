//! Driving a run: every unfinished recipient through its steps (at most
//! --run-concurrency at once), checkpointing their records, stopping at a
//! Cancellation, and the run's outcome.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use prometheus_client::metrics::gauge::Gauge;
use uuid::Uuid;

use super::acceptance::page_shape;
use super::acceptance::{overlay_inline, parse_trigger, tenant_record};
use super::records::{totals, Holder, Page};
use super::stream::{Existing, PageStream};
use super::{run_id, until, Reconciler, CHECKPOINT_INTERVAL, PAGES_IN_FLIGHT, PAGES_SAVED_AT_ONCE, PAGES_UNSAVED};
use crate::controller::delivery::Fenced;
use crate::controller::directory::LiveDirectory;
use crate::controller::identify;
use crate::controller::lenient::Lenient;
use crate::controller::workflow::find_by_key;
use crate::controller::{conditions, Context, Error};
use crate::core::execution::{self, ChannelTypes, Next, RecipientContext, RunContext};
use crate::core::expansion;
use crate::core::expansion::{AudienceView, Directory, ReachedSet};
use crate::core::functions;
use crate::core::history::{MessageRecord, MessageSource};
use crate::core::model::{JsonObject, RecipientInput, RecipientKey};
use crate::core::status::{self as run_status, RecipientState, RecipientStatus, RunState};
use crate::core::templates::CompiledTemplates;
use crate::resources::channel::ChannelType;
use crate::resources::{Cancellation, TriggerRunStatus, WorkflowSnapshot};

impl Reconciler<'_> {
    /// Which recipients these Cancellations cover for this run: None, all, or some.
    fn covered_by<'c>(&self, cancellations: impl Iterator<Item = &'c Cancellation>) -> Cancelled {
        let Some(key) = self.run.spec.cancellation_key.as_deref() else { return Cancelled::None };
        let retention = SignedDuration::from_secs(self.ctx.settings.cancellation_retention_seconds.max(0));
        let now = Timestamp::now();
        let mut some = HashSet::new();
        for c in cancellations {
            if c.namespace().as_deref() != Some(self.namespace.as_str()) || c.spec.workflow != self.run.spec.workflow || c.spec.cancellation_key != key {
                continue;
            }
            let live = c.metadata.creation_timestamp.as_ref().is_none_or(|t| t.0.checked_add(retention).is_ok_and(|end| end > now));
            if !live {
                continue;
            }
            if c.spec.recipients.is_empty() {
                return Cancelled::All;
            }
            some.extend(c.spec.recipients.iter().filter_map(|r| expansion::parse_reference(r).ok()));
        }
        if some.is_empty() {
            Cancelled::None
        } else {
            Cancelled::Some(some)
        }
    }

    /// The Cancellations for this run in the watch cache: checked before every
    /// recipient's every step, so a cancel stops a run in progress at once.
    fn cancellation(&self) -> Cancelled {
        if self.run.spec.cancellation_key.is_none() {
            return Cancelled::None;
        }
        let cached = self.ctx.stores.cancellations.state();
        self.covered_by(cached.iter().map(|c| c.as_ref()))
    }

    /// The Cancellations for this run as the apiserver has them now, read
    /// once when the run is accepted: a cancel stored just before its trigger
    /// applies even if the watch cache has not seen it yet.
    async fn stored_cancellation(&self) -> Result<Cancelled, Error> {
        if self.run.spec.cancellation_key.is_none() {
            return Ok(Cancelled::None);
        }
        let api: Api<Lenient<Cancellation>> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let listed = api.list(&ListParams::default()).await?;
        let valid: Vec<Arc<Cancellation>> = listed.items.iter().filter_map(|l| l.valid().cloned()).collect();
        Ok(self.covered_by(valid.iter().map(|c| c.as_ref())))
    }

    /// Takes every unfinished recipient as far as it can go, page by page,
    /// saving each page that changed, then the run's totals.
    /// `directory`: the one acceptance built (it may hold what the watch
    /// cache does not have yet); later reconciles build it from the cache.
    /// `reached`: the recipients on the run's pages, which an expansion that goes on skips.
    pub(super) async fn execute(&self, mut status: TriggerRunStatus, mut pages: Vec<Page>, reached: ReachedSet, directory: Option<LiveDirectory>) -> Result<Action, Error> {
        let generation = self.run.metadata.generation;
        let key = &self.run.spec.workflow;
        let Some(workflow) = find_by_key(self.ctx, &self.namespace, key) else {
            return self.fail_unfinished(status, pages, "WorkflowNotFound", &format!("Workflow `{key}` was deleted")).await;
        };
        // The run follows the Workflow as it was accepted; runs accepted
        // before herald kept that snapshot follow the current one.
        let snapshot = status.workflow_spec.clone().unwrap_or_else(|| WorkflowSnapshot::of(&workflow));
        let live = self.ctx.workflows.get(&workflow);
        let edited;
        let templates = if Some(snapshot.generation) == workflow.metadata.generation {
            match live.as_ref() {
                Ok(compiled) => &compiled.templates,
                Err(message) => return self.fail_unfinished(status, pages, "WorkflowInvalid", message).await,
            }
        } else {
            // The Workflow was edited since: compile the steps this run follows (they compiled when it was accepted).
            edited = match CompiledTemplates::compile(&snapshot.steps) {
                Ok(templates) => templates,
                Err(e) => return self.fail_unfinished(status, pages, "WorkflowInvalid", &e.to_string()).await,
            };
            &edited
        };
        let trigger = match parse_trigger(self.run) {
            Ok(t) => t,
            Err(refusal) => return self.fail_unfinished(status, pages, refusal.reason, &refusal.message).await,
        };

        let directory_given = directory.is_some();
        let mut directory = directory.unwrap_or_else(|| LiveDirectory::new(&self.ctx.stores, &self.namespace));
        overlay_inline(&mut directory, &trigger);
        let trigger_data: HashMap<RecipientKey, &JsonObject> = trigger
            .recipients
            .iter()
            .filter_map(|r| match r {
                RecipientInput::Inline(i) if !i.trigger_data.is_empty() => Some((i.key.clone(), &i.trigger_data)),
                _ => None,
            })
            .collect();
        let tenant = trigger.tenant.as_ref().map(|t| tenant_record(self.ctx, &self.namespace, t));
        let actor = trigger.actor.as_ref().map(|a| identify::actor_view(&directory, a.key()));
        let channels = NamespaceChannels::new(self.ctx, &self.namespace);
        let run_context = RunContext {
            workflow_key: key,
            categories: &snapshot.categories,
            override_preferences: snapshot.override_preferences,
            steps: &snapshot.steps,
            templates,
            workflow_run_id: run_id(self.run),
            data: &trigger.data,
            actor,
            tenant: tenant.as_ref(),
            conditions: &snapshot.conditions,
            trigger_frequency: snapshot.trigger_frequency,
            cancellation_key: self.run.spec.cancellation_key.as_deref(),
            audiences: &AudienceView(&directory),
            schedule: self
                .run
                .spec
                .schedule
                .as_ref()
                .map(|s| serde_json::json!({"id": s.id, "last_occurrence_at": s.last_occurrence_at, "next_occurrence_at": s.next_occurrence_at})),
        };
        // Each recipient checks the watch cache before every step (`drive`); a
        // run just accepted (`directory` given) also reads what the apiserver
        // stores now, which the cache may not have yet.
        let cancelled = if directory_given { self.stored_cancellation().await? } else { Cancelled::None };

        // A batch that filled up early woke this run: its carriers look once.
        let poll_batch = self.run.annotations().contains_key(super::functions::WAKE_ANNOTATION);
        let mut next_wake: Option<Timestamp> = None;
        // Every unfinished recipient of every page, in order, at most
        // --run-concurrency at once: a slow recipient holds up no other page.
        let mut remaining: Vec<usize> = pages.iter().map(|page| page.recipients.iter().filter(|r| !r.state.is_finished()).count()).collect();
        let (work, queue) = futures::channel::mpsc::unbounded::<(usize, usize, RecipientStatus)>();
        for item in pages.iter().enumerate().flat_map(|(p, page)| unfinished(p, page)) {
            let _ = work.unbounded_send(item);
        }
        // Streaming fan-out: while the run expands, its next page is cut and
        // created (below, in the loop) whenever fewer than PAGES_IN_FLIGHT
        // pages have recipients to go, and its recipients join. The
        // recipients on existing pages are not reached again.
        let (step_refs, extra) = page_shape(&snapshot.steps);
        let step_refs: Vec<&str> = step_refs.iter().map(String::as_str).collect();
        let mut stream = status.expanding.then(|| {
            let existing = Existing { pages: pages.iter().filter(|p| !p.is_inline()).count(), recipients: totals(&pages).recipients.max(0) as usize, reached };
            PageStream::new(&trigger, &self.run.spec.audiences, &directory, (&step_refs, extra), run_id(self.run), (&self.namespace, &self.name), existing)
        });
        if stream.is_some() && !directory_given {
            tracing::info!(pages = pages.len(), "resuming the expansion of a run a stopped operator had not finished expanding");
        }
        // A page being created (streaming) or read again (let go at load).
        let mut incoming: Option<futures::future::BoxFuture<'_, Result<Page, Error>>> = None;
        // Pages with recipients to go, held in memory.
        let mut in_flight = remaining.iter().filter(|r| **r > 0).count();
        // Pages with recipients to go that were let go at load, read again in turn.
        let mut to_load: std::collections::VecDeque<usize> = pages.iter().enumerate().filter(|(_, page)| page.unfinished_settled() > 0).map(|(p, _)| p).collect();
        let mut closed = false;
        // Pages with nothing left to do are let go of (their counts kept);
        // one not saved yet once its save takes its records.
        for (p, page) in pages.iter_mut().enumerate() {
            if remaining[p] == 0 && !page.unsaved {
                page.settle();
            }
        }
        let mut results = queue
            .map(|(p, i, mut recipient_status)| {
                let recipient_key = recipient_status.key();
                let is_cancelled = cancelled.covers(&recipient_key);
                let run_context = &run_context;
                let directory = &directory;
                let channels = &channels;
                let trigger_data = trigger_data.get(&recipient_key).copied();
                async move {
                    let via = recipient_status.via.as_deref().and_then(expansion::Via::parse);
                    let user = match &recipient_key {
                        RecipientKey::User(id) => directory.user(id),
                        RecipientKey::Object { .. } => None,
                    };
                    let object = match &recipient_key {
                        RecipientKey::Object { collection, id } => directory.object(collection, id),
                        RecipientKey::User(_) => None,
                    };
                    let subscription = via.as_ref().and_then(|v| expansion::subscription(directory, v, &recipient_key));
                    let recipient = RecipientContext {
                        key: &recipient_key,
                        recipient_run_id: Uuid::parse_str(&recipient_status.recipient_run_id).unwrap_or_default(),
                        user: user.as_deref(),
                        object: object.as_deref(),
                        trigger_data,
                        subscription: subscription.as_ref(),
                        messages: None,
                        poll_batch,
                    };
                    let wake = self.drive(run_context, &recipient, channels, &mut recipient_status, is_cancelled).await;
                    (p, i, recipient_status, wake)
                }
            })
            .buffer_unordered(self.ctx.settings.run_concurrency.max(1));
        // Checkpoints: a page whose recipients all went as far as they can is
        // saved at once (its final records, usually its only save: a page is
        // created without its records); a page still going, once its oldest
        // unsaved outcome (or its creation) is CHECKPOINT_INTERVAL old; the
        // run's totals and its list of pages at most every
        // CHECKPOINT_INTERVAL. Deliveries go on meanwhile (one save in flight
        // at a time). Each save writes a whole page, so saving by finished
        // page and by age, not after every so many outcomes or on a clock
        // that catches pages about to finish, is what keeps a fast fan-out's
        // writes (and the apiserver's work) to about one per page. A crash
        // loses at most the outcomes not saved yet (about a second's worth);
        // those recipients are sent again, with the same Idempotency-Key.
        // Inline records are saved with the run's status; a run accepted in
        // memory (a small run) is saved at the first checkpoint, or with its
        // outcome if it finishes before: then its status is written once.
        // Pages with unsaved outcomes, and since when; a page cut but not
        // saved yet has unsaved records from the start.
        let mut changed_pages: std::collections::BTreeMap<usize, tokio::time::Instant> =
            pages.iter().enumerate().filter(|(_, page)| page.unsaved).map(|(p, _)| (p, tokio::time::Instant::now())).collect();
        // Pages were saved since the run's status was: its totals are behind.
        let mut totals_due = false;
        let mut status_due = !self.is_saved(&status);
        let mut last_checkpoint = tokio::time::Instant::now();
        let mut saving: Option<futures::future::BoxFuture<'_, Result<(), Error>>> = None;
        // Pages in the save under way (their records are held until it is written).
        let mut saving_pages = 0;
        let mut held = Held::new(&self.ctx.metrics.run_pages_held);
        loop {
            // Pages done with but not saved yet (due, or in the save under
            // way) still hold their records. No page is taken on while
            // PAGES_UNSAVED of them wait: a fan-out that delivers
            // faster than the apiserver takes its saves waits for them,
            // instead of holding every page it finished until the end.
            let unsaved = saving_pages + changed_pages.keys().filter(|p| remaining[**p] == 0 && !pages[**p].is_inline()).count();
            held.set(in_flight + unsaved);
            // The next page while few are in flight: one let go at load, read
            // again; else, while the run expands, a new one.
            if incoming.is_none() && in_flight < PAGES_IN_FLIGHT && unsaved < PAGES_UNSAVED {
                if let Some(p) = to_load.pop_front() {
                    // The page as let go: its name and place (no records).
                    let shell = pages[p].clone();
                    incoming = Some(Box::pin(async move { self.reload(&shell).await }));
                } else if let Some(next) = stream.as_mut() {
                    match next.next_page() {
                        Some(page) => incoming = Some(Box::pin(self.create_owned(page))),
                        None => {
                            // Every recipient is on a page.
                            let count = next.recipients;
                            stream = None;
                            status.expanding = false;
                            status_due = true;
                            self.ctx.metrics.fanout.observe(count as f64);
                            conditions::set(&mut status.conditions, "Accepted", conditions::TRUE, "Accepted", &format!("{count} recipients"), generation);
                            tracing::info!(recipients = count, pages = pages.len(), "run expanded");
                        }
                    }
                }
            }
            // Nothing more to come: the work ends once the queue is drained.
            if !closed && incoming.is_none() && to_load.is_empty() && stream.is_none() {
                work.close_channel();
                closed = true;
            }
            // When the next save falls due: a page's oldest unsaved outcome
            // coming of age, or the run's status.
            let oldest = changed_pages.values().min().map(|since| *since + CHECKPOINT_INTERVAL);
            let status_at = (status_due || totals_due).then_some(last_checkpoint + CHECKPOINT_INTERVAL);
            let next_due = oldest.into_iter().chain(status_at).min();
            tokio::select! {
                next = results.next() => match next {
                    Some((p, i, new_status, wake)) => {
                        // Leadership could not be confirmed: stop here, record nothing more
                        // (the next leader resumes from the last checkpoint).
                        let Ok(wake) = wake else {
                            tracing::warn!("stopping the run: this replica can no longer confirm it leads");
                            return Err(Error::Fenced);
                        };
                        if let Some(w) = wake {
                            next_wake = Some(next_wake.map_or(w, |n| n.min(w)));
                        }
                        if pages[p].recipients[i] != new_status {
                            pages[p].recipients[i] = new_status;
                            changed_pages.entry(p).or_insert_with(tokio::time::Instant::now);
                        }
                        remaining[p] -= 1;
                        if remaining[p] == 0 {
                            in_flight -= 1;
                            if !changed_pages.contains_key(&p) {
                                pages[p].settle();
                            }
                        }
                    }
                    None => break,
                },
                created = async { incoming.as_mut().expect("polled only while a page is on its way").await }, if incoming.is_some() => {
                    incoming = None;
                    // A page that could not be created ends the reconcile (retried: the next finds the pages by name).
                    let page = created?;
                    let p = page.index;
                    let to_go = page.recipients.iter().filter(|r| !r.state.is_finished()).count();
                    for item in unfinished(p, &page) {
                        let _ = work.unbounded_send(item);
                    }
                    if p < pages.len() {
                        // Read again: it takes its place back.
                        pages[p] = page;
                        remaining[p] = to_go;
                    } else {
                        // Created: the run lists it.
                        if let Holder::Page(name) = &page.holder {
                            status.pages.push(name.clone());
                        }
                        status_due = true;
                        pages.push(page);
                        remaining.push(to_go);
                    }
                    in_flight += usize::from(to_go > 0);
                    if pages[p].unsaved {
                        // Its records are written by its first save (at once
                        // if nobody on it is left to drive: every recipient
                        // not found, say).
                        changed_pages.insert(p, tokio::time::Instant::now());
                    } else if to_go == 0 {
                        pages[p].settle();
                    }
                }
                saved = async { saving.as_mut().expect("polled only while a save is in flight").await }, if saving.is_some() => {
                    saving = None;
                    saving_pages = 0;
                    saved?;
                }
                _ = tokio::time::sleep_until(next_due.unwrap_or_else(tokio::time::Instant::now)), if next_due.is_some() && saving.is_none() => {}
            }
            if saving.is_some() {
                continue;
            }
            let now = tokio::time::Instant::now();
            let status_check = (status_due || totals_due) && now >= last_checkpoint + CHECKPOINT_INTERVAL;
            let changed: Vec<usize> =
                changed_pages.iter().filter(|(p, since)| (remaining[**p] == 0 && !pages[**p].is_inline()) || now >= **since + CHECKPOINT_INTERVAL).map(|(p, _)| *p).collect();
            if !status_check && changed.is_empty() {
                continue;
            }
            for p in &changed {
                changed_pages.remove(p);
            }
            let inline_changed = changed.iter().any(|p| pages[*p].is_inline());
            let snapshots: Vec<Page> = changed.iter().filter(|p| !pages[**p].is_inline()).map(|p| pages[*p].clone()).collect();
            // Their records are on their way out: pages done with are let go of.
            for p in &changed {
                pages[*p].unsaved = false;
                if remaining[*p] == 0 {
                    pages[*p].settle();
                }
            }
            let parent = (status_check || inline_changed)
                .then(|| {
                    let totals = totals(&pages);
                    (status_due || inline_changed || status.totals.as_ref() != Some(&totals)).then(|| {
                        self.with_records(&mut status, &pages);
                        status.clone()
                    })
                })
                .flatten();
            totals_due |= !snapshots.is_empty();
            if parent.is_some() || status_check {
                status_due = false;
                totals_due = false;
                last_checkpoint = now;
            }
            saving_pages = snapshots.len();
            saving = Some(Box::pin(async move {
                // Pages are independent writes: a few at a time keep the apiserver's cores busy.
                let mut writes = futures::stream::FuturesUnordered::new();
                for page in &snapshots {
                    if writes.len() >= PAGES_SAVED_AT_ONCE {
                        writes.next().await.transpose()?;
                    }
                    writes.push(self.write_page(page));
                }
                while let Some(written) = writes.next().await {
                    written?;
                }
                if let Some(parent) = parent {
                    self.write_status(&parent).await?;
                }
                Ok(())
            }));
        }
        if let Some(save) = saving {
            save.await?;
        }
        for p in changed_pages.into_keys() {
            self.write_page(&pages[p]).await?;
        }

        // The outcome goes out with the last records and totals: one write.
        self.with_records(&mut status, &pages);
        let totals = status.totals.clone().unwrap_or_default();
        match run_status::run_outcome(&totals) {
            Some((state, ok, reason, message)) => {
                status.state = state;
                if status.completion_time.is_none() {
                    status.completion_time = Some(Time(Timestamp::now()));
                }
                let cond = if ok { conditions::TRUE } else { conditions::FALSE };
                conditions::set(&mut status.conditions, "Succeeded", cond, reason, &message, generation);
                let changed = self.run.status.as_ref() != Some(&status);
                self.write_status(&status).await?;
                if changed {
                    tracing::info!(state = ?state, %reason, %message, "run finished");
                    // Events are for what an operator needs to see: a run that
                    // did not succeed; a successful one is in its status.
                    if !ok {
                        self.event(EventType::Warning, reason, message).await;
                    }
                }
                Ok(self.retention_action(&status))
            }
            None => {
                self.write_status(&status).await?;
                Ok(match next_wake {
                    Some(wake) => Action::requeue(until(wake).max(Duration::from_millis(50))),
                    None => Action::requeue(Duration::from_secs(5)),
                })
            }
        }
    }

    /// Creates a page not created yet, and gives it back.
    async fn create_owned(&self, page: Page) -> Result<Page, Error> {
        self.create_page(&page).await?;
        Ok(page)
    }

    /// Drives one recipient until it is done, waits, or fails.
    async fn drive(
        &self,
        run: &RunContext<'_>,
        recipient: &RecipientContext<'_>,
        channels: &NamespaceChannels,
        status: &mut RecipientStatus,
        cancelled: bool,
    ) -> Result<Option<Timestamp>, Fenced> {
        // Message-status conditions (`refs.<step>...`) read the recipient's stored messages.
        let refs_conditions = crate::core::path::all_steps(run.steps).iter().any(|s| s.conditions.leaves().iter().any(|c| c.variable.starts_with("refs.")));
        let history = self.ctx.history.as_ref().filter(|_| refs_conditions);
        // Set once this recipient looked at its batch: one look per reconcile.
        let mut polled = false;
        loop {
            // A Cancellation stored while the run is in progress stops the recipient before its next step.
            let cancelled = cancelled || self.cancellation().covers(recipient.key);
            let stored = match history {
                Some(h) => match crate::store::messages::statuses(&h.store, recipient.recipient_run_id).await {
                    Ok(s) => {
                        tracing::debug!(recipient = %recipient.key, statuses = ?s, "message statuses for refs conditions");
                        Some(s)
                    }
                    // Conditions then see the step records alone (no engagement): an email
                    // meant for an unseen message goes out rather than being lost.
                    Err(e) => {
                        tracing::warn!(error = %e, "reading message statuses for refs conditions; using the step records");
                        None
                    }
                },
                None => None,
            };
            let recipient = &RecipientContext { messages: stored.as_ref(), poll_batch: recipient.poll_batch && !polled, ..*recipient };
            // Rendering is CPU-bound (up to its budget per field): not on an async worker.
            match crate::controller::cpu::off_the_async_workers(|| execution::advance(run, recipient, channels, status, cancelled, Timestamp::now())) {
                Next::Done => return Ok(None),
                Next::WaitUntil(wake) => return Ok(Some(wake)),
                Next::Deliver(message) => {
                    use tracing::Instrument;
                    let span = tracing::info_span!("delivery", recipient = %recipient.key, recipient_run_id = %recipient.recipient_run_id, step = %message.step_ref);
                    let source = MessageSource::of(&self.namespace, run, recipient);
                    let in_app = message.channel_type == ChannelType::InAppFeed.preference_name();
                    let outcome = if in_app {
                        crate::controller::in_app::deliver(self.ctx, &self.namespace, &source, &message).instrument(span.clone()).await?
                    } else {
                        self.ctx.deliverer.deliver(&self.namespace, &self.name, &message).instrument(span.clone()).await?
                    };
                    if !outcome.ok {
                        span.in_scope(|| tracing::warn!(reason = %outcome.reason, message = %outcome.message, attempts = outcome.attempts, "delivery failed"));
                    }
                    self.ctx
                        .metrics
                        .deliveries
                        .get_or_create(&crate::metrics::DeliveryLabels { channel_type: message.channel_type.to_string(), outcome: outcome.reason.clone() })
                        .inc();
                    // A feed message that was stored is its own record; anything else is queued for the store.
                    if let (Some(history), false) = (&self.ctx.history, in_app && outcome.ok) {
                        history.messages.record(MessageRecord::delivered(&source, &message, &outcome, Timestamp::now()));
                    }
                    execution::record_delivery(status, &message, &outcome, Timestamp::now());
                }
                Next::CheckFrequency(check) => {
                    let first = self.check_frequency(recipient, &check).await;
                    functions::record_frequency(status, &check, first);
                }
                Next::Fetch(call) => {
                    let outcome = self.ctx.deliverer.fetch(&self.namespace, &self.name, &call).await?;
                    let step = crate::core::path::find(run.steps, &call.step_ref).expect("the call's step is in the run");
                    let data = execution::step_context(run, recipient, status)["data"].clone();
                    functions::record_fetch(status, step, &outcome, &data, Timestamp::now());
                }
                Next::TriggerWorkflow(call) => {
                    let outcome = self.trigger_workflow(&call).await;
                    functions::record_trigger(status, &call, &outcome, Timestamp::now());
                }
                Next::Throttle(call) => {
                    let outcome = self.throttle(&call).await;
                    match outcome {
                        Ok(Ok(outcome)) => functions::record_throttle(status, &call, &outcome, Timestamp::now()),
                        Ok(Err(why)) => functions::skip_throttle(status, &call, why, Timestamp::now()),
                        // The throttle's state could not be read or written: try again later, exactly.
                        Err(e) => {
                            tracing::warn!(error = %e, step = %call.step_ref, "throttle unavailable; retrying");
                            return Ok(Some(Timestamp::now() + SignedDuration::from_secs(1)));
                        }
                    }
                }
                Next::Batch(call) => {
                    polled |= call.carrier;
                    let visited = self.batch(&call).await;
                    match visited {
                        Ok(outcome) => functions::record_batch(status, &call, &outcome, Timestamp::now()),
                        Err(e) => {
                            tracing::warn!(error = %e, step = %call.step_ref, "batch unavailable; retrying");
                            return Ok(Some(Timestamp::now() + SignedDuration::from_secs(1)));
                        }
                    }
                }
            }
        }
    }

    /// Fails every unfinished recipient (the workflow went away mid-run, or the spec changed).
    pub(super) async fn fail_unfinished(&self, mut status: TriggerRunStatus, mut pages: Vec<Page>, reason: &str, message: &str) -> Result<Action, Error> {
        for page in &mut pages {
            // A let-go page with recipients to go is read again, failed, saved and let go again.
            let settled = page.unfinished_settled() > 0;
            if settled {
                *page = self.reload(page).await?;
            }
            let mut changed = false;
            for r in page.recipients.iter_mut().filter(|r| !r.state.is_finished()) {
                r.state = RecipientState::Failed;
                r.reason = Some(reason.to_string());
                r.message = Some(message.to_string());
                changed = true;
            }
            // A page cut but not saved yet is written even if nothing changed.
            if changed || page.unsaved {
                self.write_page(page).await?;
            }
            if settled {
                page.settle();
            }
        }
        let generation = self.run.metadata.generation;
        // Recipients not expanded yet never run.
        status.expanding = false;
        self.with_records(&mut status, &pages);
        status.state = RunState::Failed;
        if status.completion_time.is_none() {
            status.completion_time = Some(Time(Timestamp::now()));
        }
        conditions::set(&mut status.conditions, "Succeeded", conditions::FALSE, reason, message, generation);
        let changed = self.run.status.as_ref() != Some(&status);
        self.write_status(&status).await?;
        if changed {
            self.event(EventType::Warning, "RunFailed", format!("{reason}: {message}")).await;
        }
        Ok(self.retention_action(&status))
    }
}

/// Which recipients a cancellation covers.
enum Cancelled {
    None,
    All,
    Some(HashSet<RecipientKey>),
}

impl Cancelled {
    fn covers(&self, key: &RecipientKey) -> bool {
        match self {
            Cancelled::None => false,
            Cancelled::All => true,
            Cancelled::Some(keys) => keys.contains(key),
        }
    }
}

/// The Channels of a namespace, by name.
struct NamespaceChannels(HashMap<String, &'static str>);

impl NamespaceChannels {
    fn new(ctx: &Context, namespace: &str) -> Self {
        NamespaceChannels(
            ctx.stores.channels.state().iter().filter(|c| c.namespace().as_deref() == Some(namespace)).map(|c| (c.name_any(), c.spec.channel_type.preference_name())).collect(),
        )
    }
}

impl ChannelTypes for NamespaceChannels {
    fn channel_type(&self, channel: &str) -> Option<&'static str> {
        self.0.get(channel).copied()
    }
}

/// A page's unfinished recipients, with their place: (page, index, record).
fn unfinished(p: usize, page: &Page) -> Vec<(usize, usize, RecipientStatus)> {
    page.recipients.iter().enumerate().filter(|(_, r)| !r.state.is_finished()).map(|(i, r)| (p, i, r.clone())).collect()
}

/// A run's share of `herald_run_pages_held`: the pages whose records it
/// holds in memory now; given back when the run stops driving, however it stops.
struct Held<'a> {
    gauge: &'a Gauge,
    now: i64,
}

impl<'a> Held<'a> {
    fn new(gauge: &'a Gauge) -> Self {
        Held { gauge, now: 0 }
    }

    fn set(&mut self, pages: usize) {
        let pages = pages as i64;
        self.gauge.inc_by(pages - self.now);
        self.now = pages;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gauge.dec_by(self.now);
    }
}
