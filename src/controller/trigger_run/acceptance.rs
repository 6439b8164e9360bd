//! Accepting a run: the trigger parsed and checked against its Workflow,
//! inline recipients, actor and tenant identified, recipients expanded, and
//! where their records live planned (inline in the run, or pages).

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::Value;
use uuid::Uuid;

use super::records::{Holder, Page};
use super::{page_name, run_id, Reconciler, MAX_RECIPIENTS, PAGE_SIZE, RUN_LABEL};
use crate::controller::directory::LiveDirectory;
use crate::controller::identify::{self, IdentifyError, Recipient, Written};
use crate::controller::workflow::find_by_key;
use crate::controller::{conditions, directory, Context, Error, MANAGER};
use crate::core::execution::TenantRecord;
use crate::core::expansion::{self, Directory};
use crate::core::ids;
use crate::core::model::{parse_recipient, parse_tenant, JsonObject, RecipientInput, RecipientKey, TenantInput};
use crate::core::status::{self as run_status, Layout, RecipientState, RecipientStatus, RunState};
use crate::core::validation;
use crate::resources::recipient_page::{encode_recipient_run_ids, RECIPIENT_RUN_IDS_ANNOTATION, WORKFLOW_RUN_ID_LABEL};
use crate::resources::workflow::OnInvalid;
use crate::resources::workflow::StepType;
use crate::resources::{RecipientPage, RecipientPageSpec, TriggerRun, TriggerRunStatus, WorkflowSnapshot};

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

        let direct: Vec<RecipientKey> = trigger.recipients.iter().map(|r| r.key().clone()).collect();
        let actor = trigger.actor.as_ref().map(|a| a.key().clone());
        let mut expanded = expansion::expand(&direct, &self.run.spec.audiences, actor.as_ref(), &directory);
        if self.fetch_missing(&expanded, &mut directory).await? {
            expanded = expansion::expand(&direct, &self.run.spec.audiences, actor.as_ref(), &directory);
        }
        if !expanded.missing_audiences.is_empty() {
            self.event(EventType::Warning, "AudienceNotFound", format!("no Audience with key {}", expanded.missing_audiences.join(", "))).await;
        }
        if expanded.recipients.is_empty() {
            return self.fail(status, refuse("NoRecipients", "the trigger's recipients and audiences reach nobody")).await.map(Err);
        }
        self.ctx.metrics.fanout.observe(expanded.recipients.len() as f64);

        let workflow_run_id = run_id(self.run);
        let recipients: Vec<RecipientStatus> = expanded
            .recipients
            .iter()
            .map(|reached| {
                let mut r = RecipientStatus {
                    recipient: reached.key.id().to_string(),
                    collection: match &reached.key {
                        RecipientKey::Object { collection, .. } => Some(collection.clone()),
                        RecipientKey::User(_) => None,
                    },
                    recipient_run_id: ids::recipient_run_id(&workflow_run_id, &reached.key).to_string(),
                    via: Some(reached.via.label()),
                    ..Default::default()
                };
                if !reached.found {
                    r.state = RecipientState::Failed;
                    r.reason = Some("RecipientNotFound".into());
                    r.message = Some(format!("no {} `{}` in namespace {}", if reached.key.is_object() { "Object" } else { "User" }, reached.key, self.namespace));
                }
                r
            })
            .collect();

        let snapshot = WorkflowSnapshot::of(&workflow);
        let tree = crate::core::path::all_steps(&workflow.spec.steps);
        let step_refs: Vec<&str> = tree.iter().map(|s| s.step_ref.as_str()).collect();
        // Fetch and batch steps keep data for later steps in the record; some steps record names.
        let named = tree.iter().filter(|s| matches!(s.step_type, StepType::Branch | StepType::Batch | StepType::TriggerWorkflow)).count();
        let extra = run_status::extra_bound(tree.iter().any(|s| matches!(s.step_type, StepType::Fetch | StepType::Batch)), named);
        // What the run's object holds besides inline records: they share its size limit.
        let run_size = run_status::stored_size(&self.run.metadata) + run_status::stored_size(&self.run.spec) + run_status::stored_size(&snapshot);
        let pages = match run_status::plan_layout(&recipients, &step_refs, extra, run_size, PAGE_SIZE) {
            // Inline: nothing is written yet but the recipient run ids (the
            // API's index); the run's status goes out at the first checkpoint,
            // or with the outcome.
            Layout::Inline => {
                self.write_recipient_run_ids(&recipients).await?;
                vec![Page { holder: Holder::Run, recipients: recipients.clone() }]
            }
            Layout::Pages(ranges) => self.create_pages(&recipients, ranges, &workflow_run_id).await?,
        };

        status.workflow_run_id = Some(workflow_run_id.to_string());
        status.state = RunState::Running;
        status.actor = actor.map(|a| a.to_string());
        status.tenant = trigger.tenant.as_ref().map(|t| t.id().to_string());
        status.pages = pages.iter().filter_map(|p| if let Holder::Page(name) = &p.holder { Some(name.clone()) } else { None }).collect();
        status.workflow_spec = Some(snapshot);
        self.with_records(&mut status, &pages);
        status.start_time = Some(Time(Timestamp::now()));
        status.observed_generation = generation;
        conditions::set(&mut status.conditions, "Accepted", conditions::TRUE, "Accepted", &format!("{} recipients", recipients.len()), generation);
        conditions::set(&mut status.conditions, "Succeeded", conditions::UNKNOWN, "Running", "the run is in progress", generation);
        if !status.pages.is_empty() {
            // The pages are listed once they exist: a crash before re-expands
            // and rewrites the same pages (nothing was sent yet).
            self.write_status(&status).await?;
        }
        tracing::info!(recipients = recipients.len(), pages = status.pages.len(), "run accepted");
        Ok(Ok((status, pages, directory)))
    }

    /// Creates the RecipientPages of a large run (`ranges` of its recipients), each with its records.
    async fn create_pages(&self, recipients: &[RecipientStatus], ranges: Vec<Range<usize>>, workflow_run_id: &Uuid) -> Result<Vec<Page>, Error> {
        let owner = self.run.controller_owner_ref(&()).ok_or(Error::MissingMetadata)?;
        let mut pages = Vec::new();
        for (index, range) in ranges.into_iter().enumerate() {
            let chunk = &recipients[range];
            let name = page_name(&self.name, index);
            let mut page = RecipientPage::new(&name, RecipientPageSpec { trigger_run: self.name.clone(), index: index as i32, size: chunk.len() as i32 });
            page.metadata.labels = Some(BTreeMap::from([(RUN_LABEL.to_string(), ids::label_value(&self.name)), (WORKFLOW_RUN_ID_LABEL.to_string(), workflow_run_id.to_string())]));
            // What the API finds recipient runs by (a metadata-only watch).
            page.metadata.annotations = Some(BTreeMap::from([(RECIPIENT_RUN_IDS_ANNOTATION.to_string(), encode_recipient_run_ids(chunk))]));
            page.metadata.owner_references = Some(vec![owner.clone()]);
            let created = self.pages_api().patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&page)).await?;
            self.remember(&name, created.metadata.resource_version);
            self.ctx.metrics.write("RecipientPage");
            let page = Page { holder: Holder::Page(name), recipients: chunk.to_vec() };
            self.write_page(&page).await?;
            pages.push(page);
        }
        Ok(pages)
    }

    /// Reads recipients the watch cache does not have (yet) from the
    /// apiserver, by the names herald gives them: a user identified through
    /// the API just before the trigger must not be RecipientNotFound.
    /// Returns whether any was found. Bounded, so a trigger naming thousands
    /// of unknown ids costs a bounded number of reads.
    async fn fetch_missing(&self, expanded: &expansion::Expansion, directory: &mut LiveDirectory) -> Result<bool, Error> {
        const MAX_READS: usize = 100;
        let mut found = false;
        for reached in expanded.recipients.iter().filter(|r| !r.found).take(MAX_READS) {
            // identify's lookup (by id, under any name herald gives it); one
            // herald cannot read counts as not found (the caches report it).
            match &reached.key {
                RecipientKey::User(id) => {
                    let target = identify::Target::user(&self.ctx.stores, &self.namespace, id);
                    if let Some(user) = not_unreadable(identify::locate(&Api::namespaced(self.ctx.client.clone(), &self.namespace), &target).await)? {
                        directory.overlay.insert_user(directory::user_record(&user.spec));
                        found = true;
                    }
                }
                RecipientKey::Object { collection, id } => {
                    let target = identify::Target::object(&self.ctx.stores, &self.namespace, collection, id);
                    if let Some(object) = not_unreadable(identify::locate(&Api::namespaced(self.ctx.client.clone(), &self.namespace), &target).await)? {
                        directory.overlay.insert_object(directory::object_record(&object));
                        found = true;
                    }
                }
            }
        }
        Ok(found)
    }
}

/// What a lookup found, with a stored object herald cannot read as nothing.
fn not_unreadable<K>(located: Result<identify::Located<K>, IdentifyError>) -> Result<Option<K>, Error> {
    match located {
        Ok(l) => Ok(l.object),
        Err(IdentifyError::Kube(e)) => Err(e.into()),
        Err(_) => Ok(None),
    }
}
