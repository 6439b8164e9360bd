//! The TriggerRun reconciler: accepts a trigger (workflow, data, recipients,
//! actor, tenant), expands its recipients into RecipientPages, then takes every
//! recipient through the workflow's steps, checkpointing each page's status.
//! The decisions are the core's; this module reads, calls the core, and writes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};
use uuid::Uuid;

use super::delivery::Fenced;
use super::directory;
use super::identify::{self, IdentifyError, Recipient, Written};
use super::lenient::Lenient;
use super::workflow::find_by_key;
use super::{conditions, scope_api, scopes, Context, Error, MANAGER};
use crate::core::execution::{self, ChannelTypes, Next, RecipientContext, RunContext, TenantRecord};
use crate::core::expansion::{self, Directory};
use crate::core::ids;
use crate::core::model::{parse_recipient, parse_tenant, JsonObject, RecipientInput, RecipientKey, TenantInput};
use crate::core::status::{self as run_status, RecipientState, RecipientStatus, RunState};
use crate::core::templates::CompiledTemplates;
use crate::core::validation;
use crate::resources::recipient_page::{encode_recipient_run_ids, RECIPIENT_RUN_IDS_ANNOTATION, WORKFLOW_RUN_ID_LABEL};
use crate::resources::workflow::OnInvalid;
use crate::resources::{Cancellation, RecipientPage, RecipientPageSpec, RecipientPageStatus, TriggerRun, TriggerRunStatus, Workflow, WorkflowSnapshot};

/// Recipients per RecipientPage at most: 10,000 recipients take 20 pages.
/// Workflows with many steps get fewer a page (see `core::status::plan_pages`),
/// so that a page always fits etcd's request limit.
pub const PAGE_SIZE: usize = 500;
/// A page being executed is saved after this many recipients changed...
pub const CHECKPOINT_EVERY: usize = 100;
/// ...or this long after the last save, whichever comes first. Saves do not
/// stall deliveries (one is in flight at a time), so a crash loses at most
/// this much recorded progress plus what finished during the save in flight,
/// and 10,000 recipients take at most about 100 writes, not 10,000.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);
/// Directly listed recipients allowed per trigger (Knock's limit).
pub const MAX_RECIPIENTS: usize = 1000;
/// The label that ties a RecipientPage to its TriggerRun: the run's name, or
/// for names over 63 characters a shortened, hashed form ([`ids::label_value`]).
pub const RUN_LABEL: &str = "herald.dev/trigger-run";
/// Keys of runs with an idempotency key live at least this long (Knock keeps keys 7 days).
const IDEMPOTENCY_RETENTION: SignedDuration = SignedDuration::from_hours(7 * 24);

/// What a trigger says, parsed and checked.
struct Trigger {
    recipients: Vec<RecipientInput>,
    actor: Option<RecipientInput>,
    tenant: Option<TenantInput>,
    data: JsonObject,
}

/// Why a run failed before any recipient ran: the reason and message of its conditions.
struct Refusal {
    reason: &'static str,
    message: String,
}

fn refuse(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { reason, message: message.into() }
}

/// Reads the trigger's recipients, actor, tenant and data, naming the first bad entry.
fn parse_trigger(run: &TriggerRun) -> Result<Trigger, Refusal> {
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
fn overlay_inline(directory: &mut Directory, trigger: &Trigger) {
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
                directory.insert_user(directory::user_record(&crate::resources::User::new("inline", spec)));
            }
            RecipientKey::Object { collection, id } => directory.insert_object(expansion::ObjectRecord {
                collection: collection.clone(),
                id: id.clone(),
                properties: inline.properties.clone(),
                channel_data: inline.channel_data.clone(),
                preferences: inline.preferences.clone(),
                subscribers: Vec::new(),
            }),
        }
    }
}

fn tenant_record(ctx: &Context, namespace: &str, tenant: &TenantInput) -> TenantRecord {
    if let Some(record) = directory::tenant(&ctx.stores, namespace, tenant.id()) {
        return record;
    }
    match tenant {
        TenantInput::Reference(id) => TenantRecord { id: id.clone(), ..Default::default() },
        TenantInput::Inline { id, properties, preference_set } => TenantRecord { id: id.clone(), properties: properties.clone(), preference_set: preference_set.clone() },
    }
}

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

/// A page of recipients in memory.
#[derive(Clone)]
struct Page {
    name: String,
    recipients: Vec<RecipientStatus>,
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

    /// Writes the run's status if it differs from what is stored, on the
    /// condition that nobody wrote the run since this reconcile read it.
    async fn write_status(&self, status: &TriggerRunStatus) -> Result<(), Error> {
        if self.run.status.as_ref() == Some(status) {
            return Ok(());
        }
        let patch = json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": self.precondition(RUN_VERSION), "status": status});
        let written = self.runs().patch_status(&self.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await.map_err(conflict_is_stale)?;
        self.remember(RUN_VERSION, written.metadata.resource_version);
        self.ctx.metrics.write("TriggerRun");
        Ok(())
    }

    /// Writes a page's status, conditionally like [`Self::write_status`].
    async fn write_page(&self, page: &Page) -> Result<(), Error> {
        // A page must fit etcd's request limit: saved with as much detail as fits.
        let (recipients, detail) = run_status::fit_page(&page.recipients, run_status::PAGE_BUDGET);
        if detail != run_status::Detail::Full {
            tracing::debug!(page = %page.name, ?detail, "page compacted to fit");
        }
        let patch = json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "RecipientPage",
            "metadata": self.precondition(&page.name),
            "status": RecipientPageStatus { recipients },
        });
        let written = self.pages_api().patch_status(&page.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await.map_err(conflict_is_stale)?;
        self.remember(&page.name, written.metadata.resource_version);
        self.ctx.metrics.write("RecipientPage");
        Ok(())
    }

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

    fn retention_action(&self, status: &TriggerRunStatus) -> Action {
        match self.expiry(status) {
            Some(expiry) => Action::requeue(until(expiry).max(Duration::from_millis(100))),
            None => Action::await_change(),
        }
    }

    /// Deletes a finished run (and its pages) once it expires.
    async fn retain(&self, status: &TriggerRunStatus) -> Result<Action, Error> {
        let Some(expiry) = self.expiry(status) else { return Ok(Action::await_change()) };
        if expiry > Timestamp::now() {
            return Ok(self.retention_action(status));
        }
        // Pages first: a run is never gone while its pages remain (clusters
        // without a garbage collector, like the local control plane, would keep them).
        let selector = format!("{RUN_LABEL}={}", ids::label_value(&self.name));
        self.pages_api().delete_collection(&DeleteParams::default(), &ListParams::default().labels(&selector)).await?;
        self.ctx.metrics.write("RecipientPage");
        match self.runs().delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        self.ctx.metrics.write("TriggerRun");
        tracing::info!(run = %self.name, "deleted finished run after its TTL");
        Ok(Action::await_change())
    }

    /// Accepts a pending run: checks it, identifies inline recipients, expands
    /// the recipients and writes the pages. Returns the pages, or the action to
    /// take when the run is not (yet) accepted.
    async fn accept(&self, mut status: TriggerRunStatus) -> Result<Result<(TriggerRunStatus, Vec<Page>, Directory), Action>, Error> {
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
        let mut directory = directory::build(&self.ctx.stores, &self.namespace);
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
                        directory.insert_user(directory::user_record(&u.object));
                    }
                    Recipient::Object(o) => {
                        if o.written == Written::Refused {
                            refused.push(format!("Object `{}`", o.object.name_any()));
                        }
                        directory.insert_object(directory::object_record(&o.object));
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

        // Pages first, then the run's status that lists them: a crash in
        // between re-expands and rewrites the same pages (nothing was sent yet).
        let owner = self.run.controller_owner_ref(&()).ok_or(Error::MissingMetadata)?;
        let mut pages = Vec::new();
        let step_refs: Vec<&str> = workflow.spec.steps.iter().map(|s| s.step_ref.as_str()).collect();
        for (index, range) in run_status::plan_pages(&recipients, &step_refs, PAGE_SIZE, run_status::PAGE_BUDGET).into_iter().enumerate() {
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
            let page = Page { name, recipients: chunk.to_vec() };
            self.write_page(&page).await?;
            pages.push(page);
        }

        status.workflow_run_id = Some(workflow_run_id.to_string());
        status.state = RunState::Running;
        status.actor = actor.map(|a| a.to_string());
        status.tenant = trigger.tenant.as_ref().map(|t| t.id().to_string());
        status.pages = pages.iter().map(|p| p.name.clone()).collect();
        status.workflow_spec = Some(WorkflowSnapshot::of(&workflow));
        status.totals = Some(run_status::totals(&recipients));
        status.start_time = Some(Time(Timestamp::now()));
        status.observed_generation = generation;
        conditions::set(&mut status.conditions, "Accepted", conditions::TRUE, "Accepted", &format!("{} recipients", recipients.len()), generation);
        conditions::set(&mut status.conditions, "Succeeded", conditions::UNKNOWN, "Running", "the run is in progress", generation);
        self.write_status(&status).await?;
        tracing::info!(recipients = recipients.len(), pages = pages.len(), "run accepted");
        self.event(EventType::Normal, "Accepted", format!("workflow `{key}`: {} recipients in {} pages", recipients.len(), pages.len())).await;
        Ok(Ok((status, pages, directory)))
    }

    async fn load_pages(&self, status: &TriggerRunStatus) -> Result<Vec<Page>, Error> {
        let api = self.pages_api();
        let mut pages = Vec::with_capacity(status.pages.len());
        for name in &status.pages {
            let page = api.get(name).await?;
            self.remember(name, page.metadata.resource_version.clone());
            pages.push(Page { name: name.clone(), recipients: page.status.map(|s| s.recipients).unwrap_or_default() });
        }
        Ok(pages)
    }

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
    /// Reads recipients the watch cache does not have (yet) from the
    /// apiserver, by the names herald gives them: a user identified through
    /// the API just before the trigger must not be RecipientNotFound.
    /// Returns whether any was found. Bounded, so a trigger naming thousands
    /// of unknown ids costs a bounded number of reads.
    async fn fetch_missing(&self, expanded: &expansion::Expansion, directory: &mut Directory) -> Result<bool, Error> {
        const MAX_READS: usize = 100;
        let mut found = false;
        for reached in expanded.recipients.iter().filter(|r| !r.found).take(MAX_READS) {
            // identify's lookup (by id, under any name herald gives it); one
            // herald cannot read counts as not found (the caches report it).
            match &reached.key {
                RecipientKey::User(id) => {
                    let target = identify::Target::user(&self.ctx.stores, &self.namespace, id);
                    if let Some(user) = not_unreadable(identify::locate(&Api::namespaced(self.ctx.client.clone(), &self.namespace), &target).await)? {
                        directory.insert_user(directory::user_record(&user));
                        found = true;
                    }
                }
                RecipientKey::Object { collection, id } => {
                    let target = identify::Target::object(&self.ctx.stores, &self.namespace, collection, id);
                    if let Some(object) = not_unreadable(identify::locate(&Api::namespaced(self.ctx.client.clone(), &self.namespace), &target).await)? {
                        directory.insert_object(directory::object_record(&object));
                        found = true;
                    }
                }
            }
        }
        Ok(found)
    }

    /// `directory`: the one acceptance built (it may hold what the watch
    /// cache does not have yet); later reconciles build it from the cache.
    async fn execute(&self, mut status: TriggerRunStatus, mut pages: Vec<Page>, directory: Option<Directory>) -> Result<Action, Error> {
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
        let mut directory = directory.unwrap_or_else(|| directory::build(&self.ctx.stores, &self.namespace));
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
        };
        // Each recipient checks the watch cache before every step (`drive`); a
        // run just accepted (`directory` given) also reads what the apiserver
        // stores now, which the cache may not have yet.
        let cancelled = if directory_given { self.stored_cancellation().await? } else { Cancelled::None };

        let mut next_wake: Option<Timestamp> = None;
        // Every unfinished recipient of every page, in order, at most
        // --run-concurrency at once: a slow recipient holds up no other page.
        let pending: Vec<(usize, usize, RecipientStatus)> = pages
            .iter()
            .enumerate()
            .flat_map(|(p, page)| page.recipients.iter().enumerate().filter(|(_, r)| !r.state.is_finished()).map(move |(i, r)| (p, i, r.clone())))
            .collect();
        let mut remaining = vec![0usize; pages.len()];
        for (p, _, _) in &pending {
            remaining[*p] += 1;
        }
        let mut results = futures::stream::iter(pending)
            .map(|(p, i, mut recipient_status)| {
                let recipient_key = recipient_status.key();
                let is_cancelled = cancelled.covers(&recipient_key);
                let run_context = &run_context;
                let directory = &directory;
                let channels = &channels;
                let trigger_data = trigger_data.get(&recipient_key).copied();
                async move {
                    let via = recipient_status.via.as_deref().and_then(expansion::Via::parse);
                    let recipient = RecipientContext {
                        key: &recipient_key,
                        recipient_run_id: Uuid::parse_str(&recipient_status.recipient_run_id).unwrap_or_default(),
                        user: match &recipient_key {
                            RecipientKey::User(id) => directory.user(id),
                            RecipientKey::Object { .. } => None,
                        },
                        object: match &recipient_key {
                            RecipientKey::Object { collection, id } => directory.object(collection, id),
                            RecipientKey::User(_) => None,
                        },
                        trigger_data,
                        subscription: via.as_ref().and_then(|v| expansion::subscription(directory, v, &recipient_key)),
                    };
                    let wake = self.drive(run_context, &recipient, channels, &mut recipient_status, is_cancelled).await;
                    (p, i, recipient_status, wake)
                }
            })
            .buffer_unordered(self.ctx.settings.run_concurrency.max(1));
        // Checkpoints: the changed pages are saved after CHECKPOINT_EVERY
        // changed recipients or CHECKPOINT_INTERVAL, whichever comes first,
        // while deliveries go on (one save in flight at a time). A crash loses
        // at most the outcomes recorded since the last save; those recipients
        // are sent again, with the same Idempotency-Key. When a page finishes
        // while others go on, the save also updates the run's totals, so that
        // `kubectl get tr` stays current during long runs.
        let mut changed_pages = std::collections::BTreeSet::new();
        let mut unsaved = 0usize;
        let mut totals_due = false;
        let mut last_save = tokio::time::Instant::now();
        let mut saving: Option<futures::future::BoxFuture<'_, Result<(), Error>>> = None;
        loop {
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
                            changed_pages.insert(p);
                            unsaved += 1;
                        }
                        remaining[p] -= 1;
                        totals_due |= remaining[p] == 0 && remaining.iter().any(|r| *r > 0);
                    }
                    None => break,
                },
                saved = async { saving.as_mut().expect("polled only while a save is in flight").await }, if saving.is_some() => {
                    saving = None;
                    saved?;
                }
                _ = tokio::time::sleep_until(last_save + CHECKPOINT_INTERVAL), if unsaved > 0 && saving.is_none() => {}
            }
            let checkpoint = unsaved > 0 && (unsaved >= CHECKPOINT_EVERY || last_save.elapsed() >= CHECKPOINT_INTERVAL);
            if saving.is_none() && (checkpoint || totals_due) {
                let snapshots: Vec<Page> = std::mem::take(&mut changed_pages).into_iter().map(|p| pages[p].clone()).collect();
                let totals = run_status::totals(pages.iter().flat_map(|p| p.recipients.iter()));
                let parent = (totals_due && status.totals.as_ref() != Some(&totals)).then(|| {
                    status.totals = Some(totals);
                    status.clone()
                });
                saving = Some(Box::pin(async move {
                    for page in &snapshots {
                        self.write_page(page).await?;
                    }
                    if let Some(parent) = parent {
                        self.write_status(&parent).await?;
                    }
                    Ok(())
                }));
                unsaved = 0;
                totals_due = false;
                last_save = tokio::time::Instant::now();
            }
        }
        if let Some(save) = saving {
            save.await?;
        }
        for p in changed_pages {
            self.write_page(&pages[p]).await?;
        }

        let totals = run_status::totals(pages.iter().flat_map(|p| p.recipients.iter()));
        status.totals = Some(totals.clone());
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
                    let type_ = if ok { EventType::Normal } else { EventType::Warning };
                    self.event(type_, reason, message).await;
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

    /// Drives one recipient until it is done, waits, or fails.
    async fn drive(
        &self,
        run: &RunContext<'_>,
        recipient: &RecipientContext<'_>,
        channels: &NamespaceChannels,
        status: &mut RecipientStatus,
        cancelled: bool,
    ) -> Result<Option<Timestamp>, Fenced> {
        loop {
            // A Cancellation stored while the run is in progress stops the recipient before its next step.
            let cancelled = cancelled || self.cancellation().covers(recipient.key);
            // Rendering is CPU-bound (up to its budget per field): not on an async worker.
            match super::cpu::off_the_async_workers(|| execution::advance(run, recipient, channels, status, cancelled, Timestamp::now())) {
                Next::Done => return Ok(None),
                Next::WaitUntil(wake) => return Ok(Some(wake)),
                Next::Deliver(message) => {
                    use tracing::Instrument;
                    let span = tracing::info_span!("delivery", recipient = %recipient.key, recipient_run_id = %recipient.recipient_run_id, step = %message.step_ref);
                    let outcome = self.ctx.deliverer.deliver(&self.namespace, &message).instrument(span.clone()).await?;
                    if !outcome.ok {
                        span.in_scope(|| tracing::warn!(reason = %outcome.reason, message = %outcome.message, attempts = outcome.attempts, "delivery failed"));
                    }
                    self.ctx
                        .metrics
                        .deliveries
                        .get_or_create(&crate::metrics::DeliveryLabels { channel_type: message.channel_type.to_string(), outcome: outcome.reason.clone() })
                        .inc();
                    execution::record_delivery(status, &message, &outcome, Timestamp::now());
                }
            }
        }
    }

    /// Fails every unfinished recipient (the workflow went away mid-run, or the spec changed).
    async fn fail_unfinished(&self, mut status: TriggerRunStatus, mut pages: Vec<Page>, reason: &str, message: &str) -> Result<Action, Error> {
        for page in &mut pages {
            let mut changed = false;
            for r in page.recipients.iter_mut().filter(|r| !r.state.is_finished()) {
                r.state = RecipientState::Failed;
                r.reason = Some(reason.to_string());
                r.message = Some(message.to_string());
                changed = true;
            }
            if changed {
                self.write_page(page).await?;
            }
        }
        let generation = self.run.metadata.generation;
        status.totals = Some(run_status::totals(pages.iter().flat_map(|p| p.recipients.iter())));
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

/// Counts one reconcile in a gauge while it lives.
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn count(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
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
    let _in_flight = InFlight::count(&ctx.metrics.reconciles_in_flight);
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
    // twice: a run that looks Pending is read from the apiserver first.
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
    let r = Reconciler { ctx, run, namespace, name, versions: Default::default() };
    r.remember(RUN_VERSION, run.metadata.resource_version.clone());
    let status = run.status.clone().unwrap_or_default();
    if status.state.is_finished() {
        return r.retain(&status).await;
    }
    if status.state == RunState::Pending {
        return match r.accept(status).await? {
            Ok((status, pages, directory)) => r.execute(status, pages, Some(directory)).await,
            Err(action) => Ok(action),
        };
    }
    // The spec is immutable; where the apiserver cannot enforce it (before
    // Kubernetes 1.25), a changed spec is never acted on.
    if status.observed_generation.is_some() && status.observed_generation != run.metadata.generation {
        let pages = r.load_pages(&status).await?;
        return r.fail_unfinished(status, pages, "SpecChanged", "the spec changed after the run started; create a new TriggerRun instead").await;
    }
    let pages = r.load_pages(&status).await?;
    r.execute(status, pages, None).await
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

/// Runs the TriggerRun controller until `shutdown`.
pub async fn run<F>(ctx: Arc<Context>, shutdown: F)
where
    F: std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
{
    // One controller per watched namespace (or one for all).
    let mut stores = Vec::new();
    let mut controllers = Vec::new();
    for scope in scopes(&ctx.settings) {
        // Lenient: one TriggerRun herald cannot read must not stop the others.
        let controller = Controller::new(scope_api::<Lenient<TriggerRun>>(&ctx.client, &scope), watcher::Config::default()).trigger_backoff(super::WatchBackoff::default());
        let store = controller.store();
        stores.push(store.clone());
        let by_cancellation = store.clone();
        let by_workflow = store.clone();
        let ready = store;
        let running = controller
            .with_config(kube::runtime::controller::Config::default().concurrency(ctx.settings.max_concurrent_runs))
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
            .run(reconcile_lenient, error_policy, ctx.clone())
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "triggerrun controller event");
                }
            });
        controllers.push(super::until_stopped(running, ready, shutdown.clone()));
    }
    let reporter = std::pin::pin!(report_queue_depth(ctx.clone(), stores));
    // The reporter never ends; it stops with the controllers.
    futures::future::select(std::pin::pin!(futures::future::join_all(controllers)), reporter).await;
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
