//! Streaming fan-out: a paged run's recipients are expanded and cut into
//! RecipientPages one page at a time, while the pages before it deliver. The
//! first page goes out after its own recipients were expanded, whatever the
//! audience's size; a run resumed mid-expansion (`status.expanding`) skips
//! the recipients its existing pages hold and cuts the rest, so nobody is
//! lost or repeated even if memberships changed meanwhile.

use std::collections::VecDeque;

use uuid::Uuid;

use super::acceptance::Trigger;
use super::page_name;
use super::records::{Holder, Page};
use crate::core::expansion::{Directory, Expander, Reached, ReachedSet};
use crate::core::ids;
use crate::core::model::RecipientKey;
use crate::core::status::{PageCutter, RecipientState, RecipientStatus, PAGE_BUDGET};

/// What a run's existing pages hold: the expansion goes on after them.
#[derive(Default)]
pub(super) struct Existing {
    /// RecipientPages (the next page's index).
    pub pages: usize,
    pub recipients: usize,
    pub reached: ReachedSet,
}

/// The rest of a run's recipients, page by page.
pub(super) struct PageStream<'d> {
    expander: Expander<'d>,
    cutter: PageCutter,
    /// Records read but not on a page yet, in order.
    pending: VecDeque<RecipientStatus>,
    /// The record that did not fit the last page: the next one starts with it.
    carried: Option<RecipientStatus>,
    workflow_run_id: Uuid,
    namespace: String,
    run: String,
    next_index: usize,
    /// Recipients on every page cut so far, and on the pages the run had.
    pub recipients: usize,
}

impl<'d> PageStream<'d> {
    /// The run's expansion, after the recipients already on `existing` pages
    /// (which the next page follows). `shape`: the page shape
    /// ([`super::acceptance::page_shape`]).
    pub fn new(
        trigger: &Trigger,
        audiences: &[String],
        directory: &'d dyn Directory,
        shape: (&[&str], usize),
        workflow_run_id: Uuid,
        run: (&str, &str),
        existing: Existing,
    ) -> Self {
        let direct = trigger.recipients.iter().map(|r| r.key().clone()).collect();
        let actor = trigger.actor.as_ref().map(|a| a.key().clone());
        let mut expander = Expander::new(direct, audiences.to_vec(), actor, directory);
        expander.already_reached(existing.reached);
        let (namespace, run) = run;
        PageStream {
            expander,
            cutter: PageCutter::new(shape.0, shape.1, super::PAGE_SIZE, PAGE_BUDGET),
            pending: VecDeque::new(),
            carried: None,
            workflow_run_id,
            namespace: namespace.to_string(),
            run: run.to_string(),
            next_index: existing.pages,
            recipients: existing.recipients,
        }
    }

    /// The next recipient's record.
    pub fn next_record(&mut self) -> Option<RecipientStatus> {
        if let Some(r) = self.pending.pop_front() {
            return Some(r);
        }
        let reached = self.expander.next()?;
        Some(record(&reached, self.workflow_run_id, &self.namespace))
    }

    /// Puts records read with [`Self::next_record`] back, in front.
    pub fn unread(&mut self, records: Vec<RecipientStatus>) {
        for r in records.into_iter().rev() {
            self.pending.push_front(r);
        }
    }

    /// Whether any recipient is left.
    pub fn has_more(&mut self) -> bool {
        if self.carried.is_some() || !self.pending.is_empty() {
            return true;
        }
        match self.next_record() {
            Some(r) => {
                self.pending.push_back(r);
                true
            }
            None => false,
        }
    }

    /// The next page, not created yet; None once every recipient is on one.
    pub fn next_page(&mut self) -> Option<Page> {
        let mut recipients: Vec<RecipientStatus> = self.carried.take().into_iter().collect();
        while let Some(r) = self.next_record() {
            if self.cutter.starts_page(&r) && !recipients.is_empty() {
                self.carried = Some(r);
                break;
            }
            recipients.push(r);
        }
        if recipients.is_empty() {
            return None;
        }
        let index = self.next_index;
        self.next_index += 1;
        self.recipients += recipients.len();
        Some(Page { holder: Holder::Page(page_name(&self.run, index)), index, recipients, unsaved: true, settled: None })
    }
}

/// A reached recipient's record, as its run starts.
pub(super) fn record(reached: &Reached, workflow_run_id: Uuid, namespace: &str) -> RecipientStatus {
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
        r.message = Some(format!("no {} `{}` in namespace {namespace}", if reached.key.is_object() { "Object" } else { "User" }, reached.key));
    }
    r
}
