//! Reading runs: `GET /v1/workflow_runs/{workflow_run_id}` (a TriggerRun,
//! found by its uid, with a page of its recipients' runs) and
//! `GET /v1/workflow_recipient_runs/{id}` (one recipient's run). Knock's
//! fields come first; herald's own (state, reason, steps) beside them.
//!
//! Neither route lists runs or pages. A run's uid cannot be selected on and
//! a recipient run id (UUID v5) cannot be reversed, so both are looked up in
//! the API's [`RunIndex`](super::index::RunIndex) (in memory, fed by
//! metadata-only watches; its cost is in its docs), then read by name and
//! checked. Per call: a run is one `get` of the TriggerRun and one of each
//! RecipientPage the requested entries are on (none for a small run, which
//! keeps its records inline; else one or two: a page holds up to 500
//! recipients, fewer for workflows with many steps); a recipient run is a
//! `get` of its page and one of its run, or of its run alone.
//!
//! A run's recipients come in Knock's list shape, `recipient_runs: {entries,
//! page_info}`: `?page_size=` entries (1 to 50, default 50, as Knock), from
//! the `?after=` cursor on, or those just before the `?before=` cursor.
//! `page_info.after` and `page_info.before` are the cursors of the next and
//! the previous entries, null at the ends. A cursor is a position in the
//! run's recipients (`<page>.<offset>`, a run's inline records being its one
//! page; treat it as opaque): recipients never move between pages, so
//! cursors stay valid while the run goes on.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use kube::core::ObjectMeta;
use kube::ResourceExt;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::Caller;
use super::errors::{ApiError, FieldError};
use super::index::Holder;
use super::{created_at, updated_at, Api, Params, QueryParams};
use crate::core::model::{parse_recipient, parse_tenant, RecipientKey};
use crate::core::status::{RecipientState, RecipientStatus, StepState};
use crate::resources::{RecipientPage, TriggerRun};
use crate::store::Store;

/// Entries of a run's recipients per answer (Knock's default and maximum).
pub const PAGE_SIZE: usize = 50;

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::invalid("id", "must be a UUID"))
}

/// Knock's recipient run status for herald's state.
fn knock_status(state: RecipientState) -> &'static str {
    match state {
        RecipientState::Queued => "queued",
        RecipientState::Running | RecipientState::Waiting => "processing",
        RecipientState::Completed | RecipientState::Skipped | RecipientState::Failed | RecipientState::Batched | RecipientState::Throttled => "completed",
        RecipientState::Cancelled => "cancelled",
    }
}

fn reference(key: &RecipientKey) -> Value {
    match key {
        RecipientKey::User(id) => json!(id),
        RecipientKey::Object { collection, id } => json!({"id": id, "collection": collection}),
    }
}

fn actor_reference(run: &TriggerRun) -> Value {
    run.spec.actor.as_ref().and_then(|a| parse_recipient(a).ok()).map(|a| reference(a.key())).unwrap_or(Value::Null)
}

fn tenant_id(run: &TriggerRun) -> Value {
    run.spec.tenant.as_ref().and_then(|t| parse_tenant(t).ok()).map(|t| json!(t.id())).unwrap_or(Value::Null)
}

fn events(recipient: &RecipientStatus) -> Vec<Value> {
    let run_id = Uuid::parse_str(&recipient.recipient_run_id).unwrap_or_default();
    recipient
        .steps
        .iter()
        .map(|step| {
            json!({
                "__typename": "WorkflowRecipientRunEvent",
                "id": Uuid::new_v5(&run_id, step.step_ref.as_bytes()).to_string(),
                "event": format!("step.{}", step.step_ref),
                "status": if step.state == StepState::Failed { "error" } else { "ok" },
                "attempt": step.attempts,
                "inserted_at": step.time,
                "data": {"ref": step.step_ref, "state": step.state, "reason": step.reason, "message": step.message, "status_code": step.status_code},
            })
        })
        .collect()
}

/// One recipient's run, in Knock's shape plus herald's detail.
/// `holder`: the page or run the record is in (its last write is the record's `updated_at`).
fn recipient_run_json(run: Option<&TriggerRun>, run_id: &str, holder: &ObjectMeta, recipient: &RecipientStatus, detail: bool) -> Value {
    let mut out = json!({
        "__typename": "WorkflowRecipientRun",
        "id": recipient.recipient_run_id,
        "workflow_run_id": run_id,
        "recipient": reference(&recipient.key()),
        "status": knock_status(recipient.state),
        "state": recipient.state,
        "reason": recipient.reason,
        "message": recipient.message,
        "via": recipient.via,
        "error_count": recipient.steps.iter().filter(|s| s.state == StepState::Failed).count() + usize::from(recipient.state == RecipientState::Failed && recipient.steps.is_empty()),
        "updated_at": updated_at(holder),
    });
    if let Some(run) = run {
        out["workflow"] = json!(run.spec.workflow);
        out["actor"] = actor_reference(run);
        out["tenant"] = tenant_id(run);
        out["inserted_at"] = json!(created_at(&run.metadata));
        out["trigger_source"] = json!({"type": "api", "cancellation_key": run.spec.cancellation_key});
    }
    if detail {
        out["events"] = json!(events(recipient));
        out["steps"] = json!(recipient.steps);
        out["wake_at"] = json!(recipient.wake_at);
    }
    out
}

/// A position in a run's recipients: the page (its index in the run's
/// `status.pages`) and the offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    page: usize,
    offset: usize,
}

impl Position {
    const START: Position = Position { page: 0, offset: 0 };

    fn cursor(self) -> String {
        format!("{}.{}", self.page, self.offset)
    }

    fn parse(cursor: &str) -> Option<Position> {
        let (page, offset) = cursor.split_once('.')?;
        Some(Position { page: page.parse().ok()?, offset: offset.parse().ok()? })
    }
}

/// The run route's query: `page_size`, `after`, `before` (read as text, so
/// that a bad value gets Knock's error body naming it).
#[derive(Debug, Default, Deserialize)]
pub struct RunQuery {
    page_size: Option<String>,
    after: Option<String>,
    before: Option<String>,
}

/// Where to read from: on from a position, or back from one.
#[derive(Debug, PartialEq, Eq)]
enum Direction {
    After(Position),
    Before(Position),
}

/// The query's page size and direction, every problem named.
fn read_query(query: &RunQuery) -> Result<(usize, Direction), ApiError> {
    let mut errors = Vec::new();
    let size = match query.page_size.as_deref().map(str::parse::<usize>) {
        None => PAGE_SIZE,
        Some(Ok(n)) if (1..=PAGE_SIZE).contains(&n) => n,
        Some(_) => {
            errors.push(FieldError::new("page_size", format!("must be a whole number from 1 to {PAGE_SIZE}")));
            PAGE_SIZE
        }
    };
    let mut cursor = |field: &str, value: &Option<String>| match value.as_deref().map(Position::parse) {
        None => None,
        Some(Some(p)) => Some(p),
        Some(None) => {
            errors.push(FieldError::new(field, "is not a cursor from page_info"));
            None
        }
    };
    let (after, before) = (cursor("after", &query.after), cursor("before", &query.before));
    if query.after.is_some() && query.before.is_some() {
        errors.push(FieldError::new("before", "give `after` or `before`, not both"));
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid_all(errors));
    }
    Ok((size, before.map_or(Direction::After(after.unwrap_or(Position::START)), Direction::Before)))
}

/// Recipient records as read from what holds them: a page, or a run that
/// keeps them inline.
struct Records {
    meta: ObjectMeta,
    recipients: Vec<RecipientStatus>,
}

impl Records {
    fn of_page(page: RecipientPage) -> Records {
        Records { meta: page.metadata, recipients: page.status.map(|s| s.recipients).unwrap_or_default() }
    }

    fn of_run(run: &TriggerRun) -> Records {
        Records { meta: run.metadata.clone(), recipients: run.status.as_ref().map(|s| s.recipients.clone()).unwrap_or_default() }
    }
}

/// Where a run's pages are read from.
enum Source {
    /// RecipientPages in the cluster (by name).
    Cluster(kube::Api<RecipientPage>),
    /// An archived run's records in the history store, [`ARCHIVE_PAGE`] to a page.
    Archive { store: Store, run: Uuid, meta: ObjectMeta },
}

/// Records per page of an archived run (its cursors are `<page>.<offset>` as a live run's).
const ARCHIVE_PAGE: usize = 500;

/// The pages of one run, read (once each) as the entries asked for need
/// them; a run that keeps its records inline is its own one page.
struct RunPages {
    source: Source,
    names: Vec<String>,
    read: Vec<Option<Option<Records>>>,
}

impl RunPages {
    fn of(api: kube::Api<RecipientPage>, run: &TriggerRun) -> RunPages {
        let status = run.status.clone().unwrap_or_default();
        if status.pages.is_empty() && !status.recipients.is_empty() {
            return RunPages { source: Source::Cluster(api), names: vec![run.name_any()], read: vec![Some(Some(Records::of_run(run)))] };
        }
        RunPages { source: Source::Cluster(api), read: status.pages.iter().map(|_| None).collect(), names: status.pages }
    }

    /// The pages of an archived run of `count` recipients.
    fn archived(store: Store, run: Uuid, meta: ObjectMeta, count: usize) -> RunPages {
        let pages = count.div_ceil(ARCHIVE_PAGE);
        RunPages { source: Source::Archive { store, run, meta }, names: (0..pages).map(|i| i.to_string()).collect(), read: (0..pages).map(|_| None).collect() }
    }

    /// Page `index`; None past the last page or when it is gone.
    async fn get(&mut self, index: usize) -> Result<Option<&Records>, ApiError> {
        let Some(name) = self.names.get(index) else { return Ok(None) };
        if self.read[index].is_none() {
            let records = match &self.source {
                Source::Cluster(api) => api.get_opt(name).await?.map(Records::of_page),
                Source::Archive { store, run, meta } => {
                    let values = crate::store::runs::recipients(store, *run, (index * ARCHIVE_PAGE) as i64, ARCHIVE_PAGE as i64).await?;
                    let recipients = values
                        .into_iter()
                        .map(serde_json::from_value)
                        .collect::<Result<Vec<RecipientStatus>, _>>()
                        .map_err(|e| ApiError::Internal(format!("an archived record does not read: {e}")))?;
                    Some(Records { meta: meta.clone(), recipients })
                }
            };
            self.read[index] = Some(records);
        }
        Ok(self.read[index].as_ref().and_then(Option::as_ref))
    }

    /// How many recipients page `index` holds (0 when it is gone).
    async fn len(&mut self, index: usize) -> Result<usize, ApiError> {
        Ok(self.get(index).await?.map_or(0, |p| p.recipients.len()))
    }

    /// `at`, checked against the run's pages (a cursor from the client), and
    /// moved to the next page's start when it is at the end of one.
    async fn check(&mut self, field: &str, at: Position) -> Result<Position, ApiError> {
        let bad = || ApiError::invalid(field, "is not a cursor of this run's recipients");
        if at.page >= self.names.len() {
            return if at == (Position { page: self.names.len(), offset: 0 }) || at == Position::START { Ok(at) } else { Err(bad()) };
        }
        let len = self.len(at.page).await?;
        match at.offset {
            o if o < len => Ok(at),
            o if o == len => Ok(Position { page: at.page + 1, offset: 0 }),
            _ => Err(bad()),
        }
    }
}

/// Up to `size` entries from `from` on, and where the next ones start
/// (None at the end).
async fn read_after(pages: &mut RunPages, uid: &str, from: Position, size: usize) -> Result<(Vec<Value>, Option<Position>), ApiError> {
    let mut entries = Vec::new();
    let mut at = from;
    while entries.len() < size && at.page < pages.names.len() {
        if let Some(page) = pages.get(at.page).await? {
            let slice = page.recipients.get(at.offset..).unwrap_or_default();
            let taken = slice.len().min(size - entries.len());
            entries.extend(slice[..taken].iter().map(|r| recipient_run_json(None, uid, &page.meta, r, false)));
            at.offset += taken;
            if at.offset < page.recipients.len() {
                break;
            }
        }
        at = Position { page: at.page + 1, offset: 0 };
    }
    Ok((entries, (at.page < pages.names.len()).then_some(at)))
}

/// Up to `size` entries just before `end`, in order, and where they start.
async fn read_before(pages: &mut RunPages, uid: &str, end: Position, size: usize) -> Result<(Vec<Value>, Position), ApiError> {
    let mut chunks: Vec<Vec<Value>> = Vec::new();
    let mut count = 0;
    let mut at = end;
    while count < size && at != Position::START {
        if at.offset == 0 {
            at = Position { page: at.page - 1, offset: pages.len(at.page - 1).await? };
            continue;
        }
        let Some(page) = pages.get(at.page).await? else { break };
        let start = at.offset - at.offset.min(size - count);
        let slice = page.recipients.get(start..at.offset).unwrap_or_default();
        count += slice.len();
        chunks.push(slice.iter().map(|r| recipient_run_json(None, uid, &page.meta, r, false)).collect());
        at.offset = start;
    }
    Ok((chunks.into_iter().rev().flatten().collect(), at))
}

/// `GET /v1/workflow_runs/{workflow_run_id}`: the run and a page of its
/// recipients' runs.
pub async fn workflow_run(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>, QueryParams(query): QueryParams<RunQuery>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "triggerruns").await?;
    let uid = parse_id(&id)?;
    let (size, direction) = read_query(&query)?;
    let missing = || ApiError::not_found("resource_missing", format!("workflow run {id} not found"));
    index_ready(&api).await?;
    let live = match api.index.run(&caller.namespace, &uid) {
        // The name may since belong to another run: the uid decides.
        Some(name) => api.kube::<TriggerRun>(&caller.namespace).get_opt(&name).await?.filter(|r| r.uid().as_deref() == Some(uid.to_string().as_str())),
        None => None,
    };
    // Not in the cluster: a finished run may have left it for the history store.
    let (run, mut pages) = match live {
        Some(run) => {
            let pages = RunPages::of(api.kube::<RecipientPage>(&caller.namespace), &run);
            (run, pages)
        }
        None => {
            let Some(store) = api.ctx.history.as_ref().map(|h| h.store.clone()) else { return Err(missing()) };
            let stored = crate::store::runs::get(&store, &caller.namespace, uid).await?.ok_or_else(missing)?;
            let run: TriggerRun = serde_json::from_value(stored.run).map_err(|e| ApiError::Internal(format!("an archived run does not read: {e}")))?;
            let pages = RunPages::archived(store, uid, run.metadata.clone(), stored.recipients as usize);
            (run, pages)
        }
    };
    let uid = uid.to_string();
    let status = run.status.clone().unwrap_or_default();
    let (entries, after, before) = match direction {
        Direction::After(from) => {
            let from = pages.check("after", from).await?;
            let (entries, next) = read_after(&mut pages, &uid, from, size).await?;
            (entries, next, (from != Position::START).then_some(from))
        }
        Direction::Before(end) => {
            let end = pages.check("before", end).await?;
            let (entries, start) = read_before(&mut pages, &uid, end, size).await?;
            (entries, (end.page < pages.names.len()).then_some(end), (start != Position::START).then_some(start))
        }
    };
    Ok(Json(json!({
        "__typename": "WorkflowRun",
        "id": uid,
        "name": run.name_any(),
        "workflow": run.spec.workflow,
        "status": format!("{:?}", status.state).to_lowercase(),
        "actor": actor_reference(&run),
        "tenant": tenant_id(&run),
        "cancellation_key": run.spec.cancellation_key,
        "idempotency_key": run.spec.idempotency_key,
        "totals": status.totals,
        "conditions": status.conditions,
        "inserted_at": created_at(&run.metadata),
        "started_at": status.start_time.map(|t| t.0.to_string()),
        "completed_at": status.completion_time.map(|t| t.0.to_string()),
        "recipient_runs": {
            "entries": entries,
            "page_info": {"__typename": "PageInfo", "after": after.map(Position::cursor), "before": before.map(Position::cursor), "page_size": size},
        },
    })))
}

/// Waits briefly for the run index's first lists: before them, a miss would
/// not mean "not found".
async fn index_ready(api: &Api) -> Result<(), ApiError> {
    if api.index.wait_until_ready(api.ctx.settings.api_wait()).await {
        Ok(())
    } else {
        Err(ApiError::unavailable("herald's run index is not loaded yet (is the Kubernetes API reachable?)"))
    }
}

/// `GET /v1/workflow_recipient_runs/{id}`: one recipient's run.
pub async fn recipient_run(State(api): State<Arc<Api>>, caller: Caller, Params(id): Params<String>) -> Result<Json<Value>, ApiError> {
    api.allow(&caller, "get", "recipientpages").await?;
    let wanted = parse_id(&id)?;
    let missing = || ApiError::not_found("resource_missing", format!("workflow recipient run {id} not found"));
    index_ready(&api).await?;
    let Some((holder, position)) = api.index.recipient(&caller.namespace, &wanted) else {
        // Not in the cluster: a finished run may have left it for the history store.
        let Some(history) = &api.ctx.history else { return Err(missing()) };
        let (record, run) = crate::store::runs::recipient(&history.store, &caller.namespace, wanted).await?.ok_or_else(missing)?;
        let unreadable = |e: serde_json::Error| ApiError::Internal(format!("an archived run does not read: {e}"));
        let record: RecipientStatus = serde_json::from_value(record).map_err(unreadable)?;
        let run: TriggerRun = serde_json::from_value(run).map_err(unreadable)?;
        let run_id = run.status.as_ref().and_then(|s| s.workflow_run_id.clone()).or_else(|| run.uid()).unwrap_or_default();
        return Ok(Json(recipient_run_json(Some(&run), &run_id, &run.metadata, &record, true)));
    };
    let runs = api.kube::<TriggerRun>(&caller.namespace);
    let (records, run) = match holder {
        Holder::Page(name) => {
            let page = api.kube::<RecipientPage>(&caller.namespace).get_opt(&name).await?.ok_or_else(missing)?;
            let run = runs.get_opt(&page.spec.trigger_run).await?;
            (Records::of_page(page), run)
        }
        Holder::Run(name) => {
            let run = runs.get_opt(&name).await?.ok_or_else(missing)?;
            (Records::of_run(&run), Some(run))
        }
    };
    let wanted = wanted.to_string();
    let all = &records.recipients;
    let recipient = all.get(position).filter(|r| r.recipient_run_id == wanted).or_else(|| all.iter().find(|r| r.recipient_run_id == wanted)).ok_or_else(missing)?;
    let run_id = run.as_ref().and_then(|r| r.uid()).unwrap_or_default();
    Ok(Json(recipient_run_json(run.as_ref(), &run_id, &records.meta, recipient, true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(page_size: Option<&str>, after: Option<&str>, before: Option<&str>) -> RunQuery {
        RunQuery { page_size: page_size.map(Into::into), after: after.map(Into::into), before: before.map(Into::into) }
    }

    #[test]
    fn queries_are_read_with_knocks_limits() {
        assert_eq!(read_query(&RunQuery::default()).unwrap(), (50, Direction::After(Position::START)));
        assert_eq!(read_query(&query(Some("7"), Some("1.24"), None)).unwrap(), (7, Direction::After(Position { page: 1, offset: 24 })));
        assert_eq!(read_query(&query(None, None, Some("0.50"))).unwrap(), (50, Direction::Before(Position { page: 0, offset: 50 })));
        for (q, fields) in [
            (query(Some("0"), None, None), vec!["page_size"]),
            (query(Some("51"), None, None), vec!["page_size"]),
            (query(Some("-1"), Some("x"), None), vec!["page_size", "after"]),
            (query(None, Some("1.2"), Some("0.1")), vec!["before"]),
            (query(None, None, Some("1.2.3")), vec!["before"]),
        ] {
            let Err(ApiError::InvalidParams { errors, .. }) = read_query(&q) else { panic!("{q:?} was accepted") };
            assert_eq!(errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), fields, "{q:?}");
        }
    }

    #[test]
    fn cursors_round_trip() {
        let p = Position { page: 3, offset: 499 };
        assert_eq!(Position::parse(&p.cursor()), Some(p));
        assert_eq!(Position::parse("3"), None);
        assert_eq!(Position::parse("a.b"), None);
    }
}
