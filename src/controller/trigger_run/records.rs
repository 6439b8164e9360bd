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
use crate::controller::{slim, Error, MANAGER};
use crate::core::expansion::ReachedSet;
use crate::core::ids;
use crate::core::status::{self as run_status, RecipientStatus, RecipientTotals};
use crate::resources::recipient_page::{encode_recipient_run_ids, RECIPIENT_RUN_IDS_ANNOTATION, WORKFLOW_RUN_ID_LABEL};
use crate::resources::{RecipientPage, RecipientPageSpec, RecipientPageStatus, TriggerRun, TriggerRunStatus};

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
    /// A page just cut: created without its records, which its first save
    /// writes (always false for inline records: they go with the run's status).
    pub unsaved: bool,
    /// Set when the page is done with for this reconcile (every recipient
    /// went as far as it could, and the page is saved): its records are let
    /// go and its counts kept, so a run holds a few pages in memory, not its
    /// whole audience.
    pub settled: Option<RecipientTotals>,
}

impl Page {
    pub fn is_inline(&self) -> bool {
        self.holder == Holder::Run
    }

    /// Recipients of a let-go page still to go (its records are read again to drive them).
    pub fn unfinished_settled(&self) -> i64 {
        self.settled.as_ref().map_or(0, |t| t.queued + t.running + t.waiting)
    }

    /// Lets go of the records, keeping their counts.
    pub fn settle(&mut self) {
        if self.settled.is_none() && !self.is_inline() {
            self.settled = Some(run_status::totals(&self.recipients));
            self.recipients = Vec::new();
        }
    }
}

/// Whether a stored page holds its records: a page is created without them
/// (with its recipients' run ids, for the API's index), and they are
/// written by its first save.
fn filled(page: &RecipientPage) -> bool {
    page.status.as_ref().is_some_and(|s| s.recipients.len() == page.spec.size.max(0) as usize)
}

/// The recipients on pages held in memory (a run just accepted): what its
/// expansion skips as it goes on.
pub(super) fn reached(pages: &[Page]) -> ReachedSet {
    pages.iter().flat_map(|p| p.recipients.iter().map(RecipientStatus::key)).collect()
}

/// Recipient counts over a run's pages, settled or not.
pub(super) fn totals(pages: &[Page]) -> RecipientTotals {
    let mut t = RecipientTotals::default();
    for page in pages {
        match &page.settled {
            Some(settled) => t.add(settled),
            None => t.add(&run_status::totals(&page.recipients)),
        }
    }
    t
}

impl Reconciler<'_> {
    /// Puts the records as they are now into the run's status: the totals,
    /// and the records themselves when the run keeps them inline (compacted,
    /// as pages are, to fit their budget).
    pub(super) fn with_records(&self, status: &mut TriggerRunStatus, pages: &[Page]) {
        status.totals = Some(totals(pages));
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
        let written = slim::patch_status::<TriggerRun, _>(&self.ctx.client, &self.namespace, &self.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(conflict_is_stale)?;
        self.remember(RUN_VERSION, written.resource_version);
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
        self.ctx.metrics.write("TriggerRun");
        Ok(())
    }

    /// Creates a page's RecipientPage, labelled and annotated for the run
    /// index. Its records are written by its first save (once its recipients
    /// are done, or CHECKPOINT_INTERVAL after): writing them all Queued first
    /// cost a write a page, a quarter of a fan-out's apiserver work.
    pub(super) async fn create_page(&self, page: &Page) -> Result<(), Error> {
        let Holder::Page(name) = &page.holder else { return Ok(()) };
        let owner = self.run.controller_owner_ref(&()).ok_or(Error::MissingMetadata)?;
        let workflow_run_id = super::run_id(self.run);
        let spec = RecipientPageSpec { trigger_run: self.name.clone(), index: page.index as i32, size: page.recipients.len() as i32 };
        let mut object = RecipientPage::new(name, spec);
        object.metadata.labels = Some(BTreeMap::from([(RUN_LABEL.to_string(), ids::label_value(&self.name)), (WORKFLOW_RUN_ID_LABEL.to_string(), workflow_run_id.to_string())]));
        // What the API finds recipient runs by (a metadata-only watch).
        object.metadata.annotations = Some(BTreeMap::from([(RECIPIENT_RUN_IDS_ANNOTATION.to_string(), encode_recipient_run_ids(&page.recipients))]));
        object.metadata.owner_references = Some(vec![owner]);
        let created = slim::patch::<RecipientPage, _>(&self.ctx.client, &self.namespace, name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&object)).await?;
        self.remember(name, created.resource_version);
        self.ctx.metrics.write("RecipientPage");
        Ok(())
    }

    /// Writes a page's status, conditionally like [`Self::write_status`].
    /// Inline records are saved with the run's status instead.
    pub(super) async fn write_page(&self, page: &Page) -> Result<(), Error> {
        let Holder::Page(name) = &page.holder else { return Ok(()) };
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
        // The answer's metadata only: the page is not sent back and parsed.
        let written = slim::patch_status::<RecipientPage, _>(&self.ctx.client, &self.namespace, name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(conflict_is_stale)?;
        self.remember(name, written.resource_version);
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
    /// pages. The pages read are the ones that exist with their records, up
    /// to the first that does not: one listed but missing, or created but not
    /// saved yet (the operator stopped before its first save) ends them, and
    /// the run goes on expanding from there (`status.expanding`), cutting
    /// that page again. Its recipients, and those of pages after it, are
    /// then driven again: one sent already is sent again with the same
    /// Idempotency-Key, as any outcome not saved yet. While a run expands,
    /// pages created but not yet listed in its status are found by name.
    /// Also answers the recipients the pages read hold, which an expansion
    /// that goes on skips (a run that had finished expanding may be found to
    /// need it only at its last pages).
    pub(super) async fn load_pages(&self, status: &mut TriggerRunStatus) -> Result<(Vec<Page>, ReachedSet), Error> {
        let mut reached = ReachedSet::default();
        if status.pages.is_empty() && !status.expanding {
            return Ok((vec![Page { holder: Holder::Run, index: 0, recipients: status.recipients.clone(), unsaved: false, settled: None }], reached));
        }
        let api = self.pages_api();
        let mut pages = Vec::with_capacity(status.pages.len());
        let mut held = 0;
        loop {
            let index = pages.len();
            let name = match status.pages.get(index) {
                Some(name) => name.clone(),
                None if status.expanding => super::page_name(&self.name, index),
                None => break,
            };
            let Some(page) = api.get_opt(&name).await?.filter(filled) else {
                if index < status.pages.len() {
                    tracing::info!(page = %name, "resuming the expansion at a page a stopped operator had not saved yet");
                    status.pages.truncate(index);
                    status.expanding = true;
                }
                break;
            };
            self.remember(&name, page.metadata.resource_version.clone());
            let recipients = page.status.map(|s| s.recipients).unwrap_or_default();
            if index >= status.pages.len() {
                status.pages.push(name.clone());
            }
            reached.extend(recipients.iter().map(RecipientStatus::key));
            let mut page = Page { holder: Holder::Page(name), index, recipients, unsaved: false, settled: None };
            // Held: the first pages with recipients to go. The others keep
            // their counts and are read again when their turn comes, so a
            // run of any size, expanding or not, holds a few pages.
            let to_go = page.recipients.iter().any(|r| !r.state.is_finished());
            if !to_go || held >= super::PAGES_IN_FLIGHT {
                page.settle();
            } else {
                held += 1;
            }
            pages.push(page);
        }
        Ok((pages, reached))
    }

    /// Reads a let-go page's records again, to drive its recipients.
    pub(super) async fn reload(&self, page: &Page) -> Result<Page, Error> {
        let Holder::Page(name) = &page.holder else { return Ok(page.clone()) };
        let read = self.pages_api().get_opt(name).await?;
        let Some(read) = read.filter(filled) else {
            return Err(Error::Stale(format!("RecipientPage {name} went away while its run was being driven")));
        };
        self.remember(name, read.metadata.resource_version.clone());
        Ok(Page { holder: page.holder.clone(), index: page.index, recipients: read.status.map(|s| s.recipients).unwrap_or_default(), unsaved: false, settled: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::status::RecipientState;

    fn page(index: usize, states: &[RecipientState]) -> Page {
        let recipients = states.iter().map(|s| RecipientStatus { recipient: format!("u{index}"), state: *s, ..Default::default() }).collect();
        Page { holder: Holder::Page(format!("run-p{index}")), index, recipients, unsaved: false, settled: None }
    }

    #[test]
    fn settled_pages_keep_their_counts_and_let_go_of_their_records() {
        use RecipientState::*;
        let mut pages = vec![page(0, &[Completed, Failed, Waiting]), page(1, &[Queued, Completed])];
        let before = totals(&pages);
        pages[0].settle();
        assert!(pages[0].recipients.is_empty());
        assert_eq!(totals(&pages), before);
        assert_eq!((before.recipients, before.completed, before.failed, before.waiting, before.queued), (5, 2, 1, 1, 1));
        let mut inline = Page { holder: Holder::Run, ..page(0, &[Completed]) };
        inline.settle();
        assert_eq!(inline.recipients.len(), 1, "inline records are saved with the run's status: kept");
    }
}
