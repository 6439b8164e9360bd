//! Accepting a run: the trigger parsed and checked against its Workflow,
//! inline recipients, actor and tenant identified, recipients expanded, and
//! where their records live planned (inline in the run, or pages).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::Value;

use super::records::{Holder, Page};
use super::stream::{Existing, PageStream};
use super::{run_id, Reconciler, MAX_RECIPIENTS, PAGE_SIZE};
use crate::controller::directory::LiveDirectory;
use crate::controller::identify::{self, IdentifyError, Recipient, Written};
use crate::controller::workflow::find_by_key;
use crate::controller::{conditions, directory, Context, Error};
use crate::core::execution::TenantRecord;
use crate::core::expansion::{self, Directory};
use crate::core::model::{parse_recipient, parse_tenant, JsonObject, RecipientInput, RecipientKey, TenantInput};
use crate::core::status::{self as run_status, Layout, RecipientState, RecipientStatus, RunState};
use crate::core::validation;
use crate::resources::workflow::OnInvalid;
use crate::resources::workflow::StepType;
use crate::resources::{TriggerRun, TriggerRunStatus, WorkflowSnapshot};

/// What a trigger says, parsed and checked.
pub(super) struct Trigger {
    pub recipients: Vec<RecipientInput>,
    pub actor: Option<RecipientInput>,
    pub tenant: Option<TenantInput>,
    pub data: JsonObject,
}

/// Why a run failed before any recipient ran: the reason and message of its conditions.
pub(super) struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refuse(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { reason, message: message.into() }
}

/// Reads the trigger's recipients, actor, tenant and data, naming the first bad entry.
pub(super) fn parse_trigger(run: &TriggerRun) -> Result<Trigger, Refusal> {
    let spec = &run.spec;
    if spec.recipients.len() > MAX_RECIPIENTS {
        return Err(refuse(
            "TooManyRecipients",
            format!("{} recipients listed; at most {MAX_RECIPIENTS} are allowed (use an Object or an Audience to reach more)", spec.recipients.len()),
        ));
    }
    if spec.recipients.is_empty() && spec.audiences.is_empty() {
        return Err(refuse("NoRecipients", "the trigger names neither recipients nor audiences"));
    }
    let mut problems = Vec::new();
    let mut recipients = Vec::with_capacity(spec.recipients.len());
    for (i, value) in spec.recipients.iter().enumerate() {
        match parse_recipient(value) {
            Ok(r) => recipients.push(r),
            Err(e) => problems.push(format!("recipients[{i}]: {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(refuse("InvalidRecipients", problems.join("; ")));
    }
    let actor = match &spec.actor {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_recipient(v).map_err(|e| refuse("InvalidActor", format!("actor: {e}")))?),
    };
    let tenant = match &spec.tenant {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_tenant(v).map_err(|e| refuse("InvalidTenant", format!("tenant: {e}")))?),
    };
    Ok(Trigger { recipients, actor, tenant, data: spec.data.clone().unwrap_or_default() })
}

/// Overlays what the trigger's inline recipients and actor say onto the
/// directory, so they are visible even before the watch cache has the
/// identified resources.
pub(super) fn overlay_inline(directory: &mut LiveDirectory, trigger: &Trigger) {
    let inline = trigger.recipients.iter().chain(trigger.actor.iter());
    for input in inline {
        let RecipientInput::Inline(inline) = input else { continue };
        if directory.contains(&inline.key) {
            continue;
        }
        match &inline.key {
            RecipientKey::User(id) => {
                let mut spec = crate::resources::UserSpec { id: id.clone(), ..Default::default() };
                identify::merge_user(&mut spec, &inline.properties, &inline.channel_data, &inline.preferences);
                directory.overlay.insert_user(directory::user_record(&spec));
            }
            RecipientKey::Object { collection, id } => directory.overlay.insert_object(expansion::ObjectRecord {
                collection: collection.clone(),
                id: id.clone(),
                properties: inline.properties.clone(),
                channel_data: inline.channel_data.clone(),
                preferences: inline.preferences.clone(),
                subscribers: Default::default(),
            }),
        }
    }
}

pub(super) fn tenant_record(ctx: &Context, namespace: &str, tenant: &TenantInput) -> TenantRecord {
    if let Some(record) = directory::tenant(&ctx.stores, namespace, tenant.id()) {
        return record;
    }
    match tenant {
        TenantInput::Reference(id) => TenantRecord { id: id.clone(), ..Default::default() },
        TenantInput::Inline { id, properties, preference_set } => TenantRecord { id: id.clone(), properties: properties.clone(), preference_set: preference_set.clone() },
    }
}

impl Reconciler<'_> {
    /// Fails the run before any recipient ran.
    async fn fail(&self, mut status: TriggerRunStatus, refusal: Refusal) -> Result<Action, Error> {
        let generation = self.run.metadata.generation;
        status.workflow_run_id = Some(run_id(self.run).to_string());
        status.state = RunState::Failed;
        status.observed_generation = generation;
        if status.completion_time.is_none() {
            status.completion_time = Some(Time(Timestamp::now()));
        }
        conditions::set(&mut status.conditions, "Accepted", conditions::FALSE, refusal.reason, &refusal.message, generation);
        conditions::set(&mut status.conditions, "Succeeded", conditions::FALSE, refusal.reason, &refusal.message, generation);
        let changed = self.run.status.as_ref() != Some(&status);
        self.write_status(&status).await?;
        if changed {
            self.event(EventType::Warning, refusal.reason, refusal.message).await;
        }
        Ok(self.retention_action(&status))
    }

    /// Accepts a pending run: checks it, identifies inline recipients, expands
    /// the recipients and writes the pages. Returns the pages, or the action to
    /// take when the run is not (yet) accepted.
    pub(super) async fn accept(&self, mut status: TriggerRunStatus) -> Result<Result<(TriggerRunStatus, Vec<Page>, LiveDirectory), Action>, Error> {
        let generation = self.run.metadata.generation;
        let key = &self.run.spec.workflow;
        let Some(workflow) = find_by_key(self.ctx, &self.namespace, key) else {
            let age = self.run.metadata.creation_timestamp.as_ref().map(|t| Timestamp::now().duration_since(t.0)).unwrap_or_default();
            if age < SignedDuration::try_from(self.ctx.settings.workflow_grace()).unwrap_or_default() {
                conditions::set(&mut status.conditions, "Accepted", conditions::UNKNOWN, "WaitingForWorkflow", &format!("no Workflow with key `{key}` yet"), generation);
                self.write_status(&status).await?;
                return Ok(Err(Action::requeue(Duration::from_secs(1))));
            }
            return self.fail(status, refuse("WorkflowNotFound", format!("no Workflow with key `{key}` in namespace {}", self.namespace))).await.map(Err);
        };
        if !workflow.spec.active {
            return self.fail(status, refuse("WorkflowInactive", format!("Workflow `{key}` is not active"))).await.map(Err);
        }
        let compiled = self.ctx.workflows.get(&workflow);
        let compiled = match compiled.as_ref() {
            Ok(c) => c,
            Err(message) => return self.fail(status, refuse("WorkflowInvalid", format!("Workflow `{key}` is not ready: {message}"))).await.map(Err),
        };
        let trigger = match parse_trigger(self.run) {
            Ok(t) => t,
            Err(refusal) => return self.fail(status, refusal).await.map(Err),
        };
        if let Some(schema) = &compiled.schema {
            let errors = schema.validate(&Value::Object(trigger.data.clone()));
            if !errors.is_empty() {
                let message = format!("data does not match the workflow's dataSchema: {}", validation::summarize(&errors));
                match workflow.spec.validation.on_invalid {
                    OnInvalid::Reject => return self.fail(status, refuse("InvalidData", message)).await.map(Err),
                    OnInvalid::Warn => {
                        conditions::set(&mut status.conditions, "DataValid", conditions::FALSE, "InvalidData", &message, generation);
                        self.event(EventType::Warning, "InvalidData", format!("{message} (running anyway: validation.onInvalid is Warn)")).await;
                    }
                }
            }
        }

        // Identify inline recipients, actor and tenant before the workflow runs for them.
        let mut directory = LiveDirectory::new(&self.ctx.stores, &self.namespace);
        let overwrite = self.ctx.settings.identify_overwrite(&self.namespace);
        let mut refused = Vec::new();
        for input in trigger.recipients.iter().chain(trigger.actor.iter()) {
            if let RecipientInput::Inline(inline) = input {
                let identified = match identify::identify_recipient(&self.ctx.client, &self.ctx.stores, &self.namespace, inline, overwrite).await {
                    Ok(identified) => identified,
                    Err(IdentifyError::Kube(e)) => return Err(e.into()),
                    Err(e) => return self.fail(status, refuse("IdentifyFailed", e.to_string())).await.map(Err),
                };
                if identified.written().wrote() {
                    self.ctx.metrics.write(if inline.key.is_object() { "Object" } else { "User" });
                }
                match identified {
                    Recipient::User(u) => {
                        if u.written == Written::Refused {
                            refused.push(format!("User `{}`", u.object.name_any()));
                        }
                        directory.overlay.insert_user(directory::user_record(&u.object.spec));
                    }
                    Recipient::Object(o) => {
                        if o.written == Written::Refused {
                            refused.push(format!("Object `{}`", o.object.name_any()));
                        }
                        directory.overlay.insert_object(directory::object_record(&o.object));
                    }
                }
            }
        }
        if let Some(tenant) = &trigger.tenant {
            match identify::identify_tenant(&self.ctx.client, &self.ctx.stores, &self.namespace, tenant, overwrite).await {
                Ok(Some(t)) if t.written == Written::Refused => refused.push(format!("Tenant `{}`", t.object.name_any())),
                Ok(Some(t)) if t.written.wrote() => self.ctx.metrics.write("Tenant"),
                Ok(_) => {}
                Err(IdentifyError::Kube(e)) => return Err(e.into()),
                Err(e) => return self.fail(status, refuse("IdentifyFailed", e.to_string())).await.map(Err),
            }
        }
        if !refused.is_empty() {
            let message = format!(
                "inline recipients, actor or tenant would change {} that exist already; herald left them as they are and runs with what they hold (a TriggerRun may create Users, Objects and Tenants but overwrites them only in namespaces listed in --identify-overwrite-namespaces; update them with kubectl or the API)",
                refused.join(", ")
            );
            conditions::set(&mut status.conditions, "Identified", conditions::FALSE, "OverwriteRefused", &message, generation);
            self.event(EventType::Warning, "OverwriteRefused", message).await;
        }

        let actor = trigger.actor.as_ref().map(|a| a.key().clone());
        let missing_audiences: Vec<&str> = self.run.spec.audiences.iter().filter(|a| !directory.has_audience(a)).map(String::as_str).collect();
        if !missing_audiences.is_empty() {
            self.event(EventType::Warning, "AudienceNotFound", format!("no Audience with key {}", missing_audiences.join(", "))).await;
        }
        let workflow_run_id = run_id(self.run);
        let snapshot = WorkflowSnapshot::of(&workflow);
        let (step_refs, extra) = page_shape(&workflow.spec.steps);
        let step_refs: Vec<&str> = step_refs.iter().map(String::as_str).collect();

        // The first page's worth of recipients: those the watch cache does
        // not have yet are looked up on the apiserver before the run starts.
        {
            let mut first =
                PageStream::new(&trigger, &self.run.spec.audiences, &directory, (&step_refs, extra), workflow_run_id, (&self.namespace, &self.name), Existing::default());
            let unknown: Vec<RecipientKey> = std::iter::from_fn(|| first.next_record()).take(PAGE_SIZE).filter(|r| r.state == RecipientState::Failed).map(|r| r.key()).collect();
            drop(first);
            self.fetch_missing(&unknown, &mut directory).await?;
        }
        let mut stream = PageStream::new(&trigger, &self.run.spec.audiences, &directory, (&step_refs, extra), workflow_run_id, (&self.namespace, &self.name), Existing::default());
        let head: Vec<RecipientStatus> = std::iter::from_fn(|| stream.next_record()).take(run_status::INLINE_RECIPIENTS + 1).collect();
        if head.is_empty() {
            return self.fail(status, refuse("NoRecipients", "the trigger's recipients and audiences reach nobody")).await.map(Err);
        }
        // What the run's object holds besides inline records: they share its size limit.
        let run_size = run_status::stored_size(&self.run.metadata) + run_status::stored_size(&self.run.spec) + run_status::stored_size(&snapshot);
        let inline = head.len() <= run_status::INLINE_RECIPIENTS && run_status::plan_layout(&head, &step_refs, extra, run_size, PAGE_SIZE) == Layout::Inline;
        let pages = if inline {
            // Inline: nothing is written yet but the recipient run ids (the
            // API's index); the run's status goes out at the first checkpoint,
            // or with the outcome.
            self.write_recipient_run_ids(&head).await?;
            vec![Page { holder: Holder::Run, index: 0, recipients: head, unsaved: false, settled: None }]
        } else {
            // Streaming fan-out: the first page is cut and created now; the
            // rest are cut and created while it delivers (`execute`).
            stream.unread(head);
            let first = stream.next_page().expect("the stream holds the records just read");
            self.create_page(&first).await?;
            status.expanding = stream.has_more();
            vec![first]
        };
        drop(stream);
        let count: usize = pages.iter().map(|p| p.recipients.len()).sum();
        if !status.expanding {
            self.ctx.metrics.fanout.observe(count as f64);
        }

        status.workflow_run_id = Some(workflow_run_id.to_string());
        status.state = RunState::Running;
        status.actor = actor.map(|a| a.to_string());
        status.tenant = trigger.tenant.as_ref().map(|t| t.id().to_string());
        status.pages = pages.iter().filter_map(|p| if let Holder::Page(name) = &p.holder { Some(name.clone()) } else { None }).collect();
        status.workflow_spec = Some(snapshot);
        self.with_records(&mut status, &pages);
        status.start_time = Some(Time(Timestamp::now()));
        status.observed_generation = generation;
        let accepted = if status.expanding { format!("{count} recipients so far; expanding the rest") } else { format!("{count} recipients") };
        conditions::set(&mut status.conditions, "Accepted", conditions::TRUE, "Accepted", &accepted, generation);
        conditions::set(&mut status.conditions, "Succeeded", conditions::UNKNOWN, "Running", "the run is in progress", generation);
        if !status.pages.is_empty() {
            // The first page is listed once it exists: a crash before
            // re-expands and rewrites it (nothing was sent yet); a crash after
            // finds the pages saved since by name and expands the rest (from
            // this one, if it was not saved yet).
            self.write_status(&status).await?;
        }
        tracing::info!(recipients = count, expanding = status.expanding, "run accepted");
        Ok(Ok((status, pages, directory)))
    }

    /// Reads recipients the watch cache does not have (yet) from the
    /// apiserver, by the names herald gives them: a user identified through
    /// the API just before the trigger must not be RecipientNotFound.
    /// Bounded, so a trigger naming thousands of unknown ids costs a bounded
    /// number of reads.
    async fn fetch_missing(&self, keys: &[RecipientKey], directory: &mut LiveDirectory) -> Result<(), Error> {
        const MAX_READS: usize = 100;
        for key in keys.iter().take(MAX_READS) {
            // identify's lookup (by id, under any name herald gives it); one
            // herald cannot read counts as not found (the caches report it).
            match key {
                RecipientKey::User(id) => {
                    let target = identify::Target::user(&self.ctx.stores, &self.namespace, id);
                    if let Some(user) = not_unreadable(identify::locate(&Api::namespaced(self.ctx.client.clone(), &self.namespace), &target).await)? {
                        directory.overlay.insert_user(directory::user_record(&user.spec));
                    }
                }
                RecipientKey::Object { collection, id } => {
                    let target = identify::Target::object(&self.ctx.stores, &self.namespace, collection, id);
                    if let Some(object) = not_unreadable(identify::locate(&Api::namespaced(self.ctx.client.clone(), &self.namespace), &target).await)? {
                        directory.overlay.insert_object(directory::object_record(&object));
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a page's size depends on, from a workflow's steps: every step ref,
/// and the bound on what steps add to a record (fetched data, names).
pub(super) fn page_shape(steps: &[crate::resources::workflow::Step]) -> (Vec<String>, usize) {
    let tree = crate::core::path::all_steps(steps);
    // Fetch and batch steps keep data for later steps in the record; some steps record names.
    let named = tree.iter().filter(|s| matches!(s.step_type, StepType::Branch | StepType::Batch | StepType::TriggerWorkflow)).count();
    let extra = run_status::extra_bound(tree.iter().any(|s| matches!(s.step_type, StepType::Fetch | StepType::Batch)), named);
    (tree.iter().map(|s| s.step_ref.clone()).collect(), extra)
}

/// What a lookup found, with a stored object herald cannot read as nothing.
fn not_unreadable<K>(located: Result<identify::Located<K>, IdentifyError>) -> Result<Option<K>, Error> {
    match located {
        Ok(l) => Ok(l.object),
        Err(IdentifyError::Kube(e)) => Err(e.into()),
        Err(_) => Ok(None),
    }
}
