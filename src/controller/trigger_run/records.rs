//! Where a run's recipient records are kept, and the writes that save them:
//! inline in the run's own status (small runs: no RecipientPage, and the
//! records go out with the run's status writes), or in RecipientPages. Every
//! write is conditional on the resourceVersion this reconcile last read or
//! wrote, and skipped when it would change nothing.

use std::collections::BTreeMap;

use kube::api::{Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;

use kube::Resource;

use super::{conflict_is_stale, Reconciler, RUN_LABEL, RUN_VERSION};
use crate::controller::{Error, MANAGER};
use crate::core::ids;
use crate::core::status::{self as run_status, RecipientStatus};
use crate::resources::recipient_page::{encode_recipient_run_ids, RECIPIENT_RUN_IDS_ANNOTATION, WORKFLOW_RUN_ID_LABEL};
use crate::resources::{RecipientPage, RecipientPageSpec, RecipientPageStatus, TriggerRunStatus};

/// Where a set of recipient records is saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Holder {
    /// The run's own `status.recipients`, saved with the run's status.
    Run,
    /// The RecipientPage of this name.
    Page(String),
}

/// Recipient records in memory, and where they are saved.
#[derive(Clone)]
pub(super) struct Page {
    pub holder: Holder,
    /// The page's place in the run (0 for inline records).
    pub index: usize,
    pub recipients: Vec<RecipientStatus>,
    /// Whether its RecipientPage exists. A large run's pages are created one
    /// by one while the first ones are already delivering (streaming
    /// fan-out); [`Reconciler::write_page`] creates a page it finds missing.
    pub exists: bool,
}

impl Page {
    pub fn is_inline(&self) -> bool {
        self.holder == Holder::Run
    }
}

impl Reconciler<'_> {
    /// Puts the records as they are now into the run's status: the totals,
    /// and the records themselves when the run keeps them inline (compacted,
    /// as pages are, to fit their budget).
    pub(super) fn with_records(&self, status: &mut TriggerRunStatus, pages: &[Page]) {
        status.totals = Some(run_status::totals(pages.iter().flat_map(|p| p.recipients.iter())));
        if let Some(inline) = pages.iter().find(|p| p.is_inline()) {
            let (recipients, detail) = run_status::fit_page(&inline.recipients, run_status::INLINE_BUDGET);
            if detail != run_status::Detail::Full {
                tracing::debug!(?detail, "inline records compacted to fit");
            }
            status.recipients = recipients;
        }
    }

    /// Whether `status` is what the run holds (as read, or as this reconcile last wrote it).
    pub(super) fn is_saved(&self, status: &TriggerRunStatus) -> bool {
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        written.as_ref().or(self.run.status.as_ref()) == Some(status)
    }

    /// Writes the run's status if it differs from what the run holds, on the
    /// condition that nobody wrote the run since this reconcile read it.
    pub(super) async fn write_status(&self, status: &TriggerRunStatus) -> Result<(), Error> {
        if self.is_saved(status) {
            return Ok(());
        }
        let patch = json!({"apiVersion": "herald.dev/v1alpha1", "kind": "TriggerRun", "metadata": self.precondition(RUN_VERSION), "status": status});
        let written = self.runs().patch_status(&self.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await.map_err(conflict_is_stale)?;
        self.remember(RUN_VERSION, written.metadata.resource_version);
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
        self.ctx.metrics.write("TriggerRun");
        Ok(())
    }

    /// Creates a page's RecipientPage (labelled and annotated for the run
    /// index) and writes its records.
    pub(super) async fn create_page(&self, page: &mut Page) -> Result<(), Error> {
        let Holder::Page(name) = &page.holder else { return Ok(()) };
        let owner = self.run.controller_owner_ref(&()).ok_or(Error::MissingMetadata)?;
        let workflow_run_id = super::run_id(self.run);
        let spec = RecipientPageSpec { trigger_run: self.name.clone(), index: page.index as i32, size: page.recipients.len() as i32 };
        let mut object = RecipientPage::new(name, spec);
        object.metadata.labels = Some(BTreeMap::from([(RUN_LABEL.to_string(), ids::label_value(&self.name)), (WORKFLOW_RUN_ID_LABEL.to_string(), workflow_run_id.to_string())]));
        // What the API finds recipient runs by (a metadata-only watch).
        object.metadata.annotations = Some(BTreeMap::from([(RECIPIENT_RUN_IDS_ANNOTATION.to_string(), encode_recipient_run_ids(&page.recipients))]));
        object.metadata.owner_references = Some(vec![owner]);
        let created = self.pages_api().patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&object)).await?;
        self.remember(name, created.metadata.resource_version);
        self.ctx.metrics.write("RecipientPage");
        page.exists = true;
        self.write_page(page).await
    }

    /// Writes a page's status, conditionally like [`Self::write_status`]
    /// (creating the page first if it does not exist yet). Inline records are
    /// saved with the run's status instead.
    pub(super) async fn write_page(&self, page: &Page) -> Result<(), Error> {
        let Holder::Page(name) = &page.holder else { return Ok(()) };
        if !page.exists {
            return Box::pin(self.create_page(&mut page.clone())).await;
        }
        // A page must fit etcd's request limit: saved with as much detail as fits.
        let (recipients, detail) = run_status::fit_page(&page.recipients, run_status::PAGE_BUDGET);
        if detail != run_status::Detail::Full {
            tracing::debug!(page = %name, ?detail, "page compacted to fit");
        }
        let patch = json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "RecipientPage",
            "metadata": self.precondition(name),
            "status": RecipientPageStatus { recipients },
        });
        let written = self.pages_api().patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await.map_err(conflict_is_stale)?;
        self.remember(name, written.metadata.resource_version);
        self.ctx.metrics.write("RecipientPage");
        Ok(())
    }

    /// Records the run ids of a run's inline recipients in its annotation
    /// (as a page's): what the API finds a recipient run by, through a
    /// metadata-only watch (a status write cannot set metadata). Written once,
    /// at acceptance (they never change), conditionally like the status.
    pub(super) async fn write_recipient_run_ids(&self, recipients: &[RecipientStatus]) -> Result<(), Error> {
        let ids = encode_recipient_run_ids(recipients);
        if self.run.annotations().get(RECIPIENT_RUN_IDS_ANNOTATION) == Some(&ids) {
            return Ok(());
        }
        let mut metadata = self.precondition(RUN_VERSION);
        metadata["annotations"] = json!(BTreeMap::from([(RECIPIENT_RUN_IDS_ANNOTATION, ids)]));
        let written = self.runs().patch(&self.name, &PatchParams::default(), &Patch::Merge(&json!({"metadata": metadata}))).await.map_err(conflict_is_stale)?;
        self.remember(RUN_VERSION, written.metadata.resource_version);
        self.ctx.metrics.write("TriggerRun");
        Ok(())
    }

    /// The run's records as stored: inline in its status, or read from its
    /// pages. Pages listed but not created yet, or created without their
    /// records (the operator stopped while streaming them out), come back
    /// empty with `exists: false`.
    pub(super) async fn load_pages(&self, status: &TriggerRunStatus) -> Result<Vec<Page>, Error> {
        if status.pages.is_empty() {
            return Ok(vec![Page { holder: Holder::Run, index: 0, recipients: status.recipients.clone(), exists: true }]);
        }
        let api = self.pages_api();
        let mut pages = Vec::with_capacity(status.pages.len());
        for (index, name) in status.pages.iter().enumerate() {
            let page = api.get_opt(name).await?;
            // A page is created in two writes (the page, then its records): one
            // stopped between them has no records yet and is filled like a missing one.
            let filled = page.as_ref().is_some_and(|p| p.status.as_ref().is_some_and(|s| s.recipients.len() == p.spec.size.max(0) as usize));
            let recipients = page.filter(|_| filled).map(|page| {
                self.remember(name, page.metadata.resource_version.clone());
                page.status.map(|s| s.recipients).unwrap_or_default()
            });
            pages.push(Page { holder: Holder::Page(name.clone()), index, recipients: recipients.unwrap_or_default(), exists: filled });
        }
        Ok(pages)
    }

    /// Fills the records of pages that were never created from the run's
    /// expansion, made again: the same trigger and memberships give the same
    /// recipients in the same order, so the same pages. (Had memberships
    /// changed meanwhile, a recipient may land on a page twice; both records
    /// carry the same recipient run id, so receivers see the same
    /// Idempotency-Key.)
    pub(super) async fn refill_missing(&self, status: &TriggerRunStatus, pages: &mut [Page]) -> Result<(), Error> {
        if pages.iter().all(|p| p.exists) {
            return Ok(());
        }
        let trigger = match super::acceptance::parse_trigger(self.run) {
            Ok(t) => t,
            Err(refusal) => return Err(Error::Stale(refusal.message)),
        };
        let mut directory = crate::controller::directory::LiveDirectory::new(&self.ctx.stores, &self.namespace);
        super::acceptance::overlay_inline(&mut directory, &trigger);
        let (recipients, _) = self.expand_records(&trigger, &mut directory).await?;
        let steps = status.workflow_spec.as_ref().map(|s| s.steps.as_slice()).unwrap_or_default();
        let ranges = super::acceptance::page_ranges(&recipients, steps);
        for page in pages.iter_mut().filter(|p| !p.exists) {
            page.recipients = ranges.get(page.index).map(|r| recipients[r.clone()].to_vec()).unwrap_or_default();
        }
        tracing::info!(missing = pages.iter().filter(|p| !p.exists).count(), "re-expanded the pages a stopped operator had not created");
        Ok(())
    }
}
