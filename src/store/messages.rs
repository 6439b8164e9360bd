//! Messages in the store: written in batches off the delivery path, read by
//! the Messages API.
//!
//! A delivery hands its [`MessageRecord`] to the [`MessageLog`] and goes on:
//! a bounded buffer feeds one writer task that inserts up to [`BATCH`] rows
//! per statement and retries while the database is down. When the buffer is
//! full the record is dropped and counted: deliveries never wait for the
//! database. Nothing is lost by that but the rendered content: before a
//! finished run leaves the cluster it is archived, and the archive writes the
//! message of every channel step its records hold that is not stored yet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::core::history::{Cursor, Engagement, MessageRecord, MessageStatus};
use crate::core::model::RecipientKey;

/// Records the buffer holds before new ones are dropped.
pub const BUFFER: usize = 10_000;
/// Rows per INSERT.
pub const BATCH: usize = 500;
/// How long [`MessageLog::flush`] waits.
pub const FLUSH_WAIT: Duration = Duration::from_secs(5);

enum Command {
    Record(Box<MessageRecord>),
    /// Answered once every record sent before it is written.
    Flush(oneshot::Sender<()>),
}

/// The writer's handle: cheap to clone.
#[derive(Clone)]
pub struct MessageLog {
    tx: mpsc::Sender<Command>,
    /// Set while the writer's last attempt failed: archives then fail at once
    /// instead of each waiting for a flush (they hold reconcile slots).
    failing: Arc<AtomicBool>,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl MessageLog {
    /// Starts the writer task.
    pub fn start(store: Store, dropped: prometheus_client::metrics::counter::Counter) -> MessageLog {
        let (tx, rx) = mpsc::channel(BUFFER);
        let failing = Arc::new(AtomicBool::new(false));
        tokio::spawn(write_loop(store, rx, failing.clone()));
        MessageLog { tx, failing, dropped }
    }

    /// Queues a message; never waits. A full buffer drops it (counted): the
    /// archive writes it later from the step's record, without its content.
    pub fn record(&self, record: MessageRecord) {
        if self.tx.try_send(Command::Record(Box::new(record))).is_err() {
            self.dropped.inc();
        }
    }

    /// Waits until every message queued before this call is written; gives
    /// up after [`FLUSH_WAIT`] (the database is down: the writer keeps retrying).
    pub async fn flush(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable("messages are waiting for the history store".into()));
        }
        let (tx, rx) = oneshot::channel();
        let flushed = async {
            self.tx.send(Command::Flush(tx)).await.map_err(|_| StoreError::Unavailable("the message writer stopped".into()))?;
            rx.await.map_err(|_| StoreError::Unavailable("the message writer stopped".into()))
        };
        tokio::time::timeout(FLUSH_WAIT, flushed).await.unwrap_or_else(|_| Err(StoreError::Unavailable("queued messages could not be written in time".into())))
    }
}

async fn write_loop(store: Store, mut rx: mpsc::Receiver<Command>, failing: Arc<AtomicBool>) {
    let mut batch: Vec<MessageRecord> = Vec::with_capacity(BATCH);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Record(r) => batch.push(*r),
                Command::Flush(done) => waiting.push(done),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        let mut backoff = Duration::from_millis(100);
        while !batch.is_empty() {
            match insert(&store, &batch, Conflict::Update).await {
                Ok(()) => {
                    batch.clear();
                    failing.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    failing.store(true, Ordering::Relaxed);
                    tracing::warn!(error = %e, messages = batch.len(), retry_ms = backoff.as_millis() as u64, "writing messages to the history store; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// What a write does to a message already stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// A later outcome of the same message (a redelivery after a failover): replace it.
    Update,
    /// A record rebuilt from a step: keep the stored one (it has the content).
    Keep,
}

/// The columns a write sets (engagement is set by its own routes).
const COLUMNS: &str =
    "id, namespace, workflow, workflow_run_id, recipient_run_id, recipient_id, recipient_collection, tenant, actor, step_ref, channel, channel_type, status, reason, content, attempts, data, categories, inserted_at, updated_at";
const PER_ROW: usize = 20;
/// The columns a read returns.
pub(super) const SELECT_COLUMNS: &str = "id, namespace, workflow, workflow_run_id, recipient_run_id, recipient_id, recipient_collection, tenant, actor, step_ref, channel, channel_type, status, reason, content, attempts, data, categories, inserted_at, updated_at, seen_at, read_at, archived_at, interacted_at, clicked_at, link_clicked_at";

/// Inserts messages, `BATCH` rows per statement.
pub async fn insert(store: &Store, records: &[MessageRecord], conflict: Conflict) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let client = store.client().await?;
    for chunk in records.chunks(BATCH) {
        let rows: Vec<Row> = chunk.iter().map(Row::of).collect();
        let mut sql = format!("INSERT INTO herald_messages ({COLUMNS}) VALUES ");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * PER_ROW);
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push('(');
            for c in 0..PER_ROW {
                if c > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!("${}", i * PER_ROW + c + 1));
            }
            sql.push(')');
            params.extend(row.params());
        }
        sql.push_str(match conflict {
            Conflict::Update => {
                " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, reason = EXCLUDED.reason, attempts = EXCLUDED.attempts, \
                 content = COALESCE(EXCLUDED.content, herald_messages.content), updated_at = EXCLUDED.updated_at"
            }
            Conflict::Keep => " ON CONFLICT (id) DO NOTHING",
        });
        client.execute(sql.as_str(), &params).await?;
    }
    Ok(())
}

/// A record's column values.
struct Row {
    id: Uuid,
    namespace: String,
    workflow: String,
    workflow_run_id: Uuid,
    recipient_run_id: Uuid,
    recipient_id: String,
    recipient_collection: String,
    tenant: Option<String>,
    actor: Option<Value>,
    step_ref: String,
    channel: String,
    channel_type: String,
    status: &'static str,
    reason: String,
    content: Option<Value>,
    attempts: Value,
    data: Value,
    categories: Vec<String>,
    inserted_at: Timestamp,
    updated_at: Timestamp,
}

impl Row {
    fn of(r: &MessageRecord) -> Row {
        let (recipient_collection, recipient_id) = split_key(&r.recipient);
        Row {
            id: r.id,
            namespace: r.namespace.clone(),
            workflow: r.workflow.clone(),
            workflow_run_id: r.workflow_run_id,
            recipient_run_id: r.recipient_run_id,
            recipient_id,
            recipient_collection,
            tenant: r.tenant.clone(),
            actor: r.actor.as_ref().map(|a| json!(a)),
            step_ref: r.step_ref.clone(),
            channel: r.channel.clone(),
            channel_type: r.channel_type.clone(),
            status: r.status.as_str(),
            reason: r.reason.clone(),
            content: r.content.clone().map(Value::Object),
            attempts: json!(r.attempts),
            data: r.data.clone(),
            categories: r.categories.clone(),
            inserted_at: r.inserted_at,
            updated_at: r.updated_at,
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); PER_ROW] {
        [
            &self.id,
            &self.namespace,
            &self.workflow,
            &self.workflow_run_id,
            &self.recipient_run_id,
            &self.recipient_id,
            &self.recipient_collection,
            &self.tenant,
            &self.actor,
            &self.step_ref,
            &self.channel,
            &self.channel_type,
            &self.status,
            &self.reason,
            &self.content,
            &self.attempts,
            &self.data,
            &self.categories,
            &self.inserted_at,
            &self.updated_at,
        ]
    }
}

/// (collection, id): users have the empty collection.
fn split_key(key: &RecipientKey) -> (String, String) {
    match key {
        RecipientKey::User(id) => (String::new(), id.clone()),
        RecipientKey::Object { collection, id } => (collection.clone(), id.clone()),
    }
}

/// Which messages to list (every field narrows).
#[derive(Clone, Debug, Default)]
pub struct MessageFilter {
    pub namespace: String,
    pub recipient: Option<RecipientKey>,
    pub workflow: Option<String>,
    pub workflow_run_id: Option<Uuid>,
    pub recipient_run_id: Option<Uuid>,
    pub channel: Option<String>,
    pub tenant: Option<String>,
    /// Any of these statuses.
    pub statuses: Vec<String>,
    pub message_ids: Vec<Uuid>,
    pub inserted_after: Option<Timestamp>,
    pub inserted_before: Option<Timestamp>,
}

/// One answer of a list: the messages (newest first) and the cursors around them.
#[derive(Debug)]
pub struct MessagePage {
    pub messages: Vec<MessageRecord>,
    /// The cursor of the next (older) messages, if there are any.
    pub after: Option<Cursor>,
    /// The cursor of the previous (newer) messages, if there are any.
    pub before: Option<Cursor>,
}

/// Where a list starts.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    Newest,
    /// Older than this cursor.
    After(Cursor),
    /// Newer than this cursor (the entries just before it in the list).
    Before(Cursor),
}

fn cursor_of(record: &MessageRecord) -> Cursor {
    Cursor { inserted_at: record.inserted_at, id: record.id }
}

/// Lists messages, newest first, `size` at a time.
pub async fn list(store: &Store, filter: &MessageFilter, from: Start, size: usize) -> Result<MessagePage, StoreError> {
    let mut q = Query::default();
    let ns = q.bind(Box::new(filter.namespace.clone()));
    q.wheres.push(format!("namespace = {ns}"));
    if let Some(key) = &filter.recipient {
        let (collection, id) = split_key(key);
        let c = q.bind(Box::new(collection));
        let i = q.bind(Box::new(id));
        q.wheres.push(format!("recipient_collection = {c} AND recipient_id = {i}"));
    }
    q.eq("workflow", filter.workflow.clone().map(|v| Box::new(v) as _));
    q.eq("workflow_run_id", filter.workflow_run_id.map(|v| Box::new(v) as _));
    q.eq("recipient_run_id", filter.recipient_run_id.map(|v| Box::new(v) as _));
    q.eq("channel", filter.channel.clone().map(|v| Box::new(v) as _));
    q.eq("tenant", filter.tenant.clone().map(|v| Box::new(v) as _));
    if !filter.statuses.is_empty() {
        let p = q.bind(Box::new(filter.statuses.clone()));
        q.wheres.push(format!("status = ANY({p})"));
    }
    if !filter.message_ids.is_empty() {
        let p = q.bind(Box::new(filter.message_ids.clone()));
        q.wheres.push(format!("id = ANY({p})"));
    }
    q.inserted_between(filter.inserted_after, filter.inserted_before);
    page(store, q, from, size).await
}

/// SQL conditions and their parameters, built up filter by filter.
#[derive(Default)]
pub(super) struct Query {
    pub wheres: Vec<String>,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Query {
    /// Binds a parameter; its placeholder (`$n`).
    pub fn bind(&mut self, value: Box<dyn ToSql + Sync + Send>) -> String {
        self.params.push(value);
        format!("${}", self.params.len())
    }

    /// `column = value`, when there is a value.
    pub fn eq(&mut self, column: &str, value: Option<Box<dyn ToSql + Sync + Send>>) {
        if let Some(v) = value {
            let p = self.bind(v);
            self.wheres.push(format!("{column} = {p}"));
        }
    }

    /// `inserted_at` strictly between the bounds given.
    pub fn inserted_between(&mut self, after: Option<Timestamp>, before: Option<Timestamp>) {
        if let Some(t) = after {
            let p = self.bind(Box::new(t));
            self.wheres.push(format!("inserted_at > {p}"));
        }
        if let Some(t) = before {
            let p = self.bind(Box::new(t));
            self.wheres.push(format!("inserted_at < {p}"));
        }
    }

    pub fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
    }
}

/// One page of the messages `q` selects, newest first, from `from`, and the
/// cursors around it. One row more than asked tells whether there are more.
pub(super) async fn page(store: &Store, mut q: Query, from: Start, size: usize) -> Result<MessagePage, StoreError> {
    let (order, cursor) = match from {
        Start::Newest => ("DESC", None),
        Start::After(c) => ("DESC", Some((c, "<"))),
        Start::Before(c) => ("ASC", Some((c, ">"))),
    };
    if let Some((c, op)) = cursor {
        let t = q.bind(Box::new(c.inserted_at));
        let i = q.bind(Box::new(c.id));
        q.wheres.push(format!("(inserted_at, id) {op} ({t}, {i})"));
    }
    let limit = q.bind(Box::new((size + 1) as i64));
    let sql = format!("SELECT {SELECT_COLUMNS} FROM herald_messages WHERE {} ORDER BY inserted_at {order}, id {order} LIMIT {limit}", q.wheres.join(" AND "));
    let rows = store.client().await?.query(sql.as_str(), &q.refs()).await?;
    let more = rows.len() > size;
    let mut messages = rows.iter().take(size).map(read_row).collect::<Result<Vec<_>, _>>()?;
    if matches!(from, Start::Before(_)) {
        messages.reverse();
    }
    let (after, before) = match from {
        Start::Newest => (more.then(|| messages.last().map(cursor_of)).flatten(), None),
        Start::After(_) => (more.then(|| messages.last().map(cursor_of)).flatten(), messages.first().map(cursor_of)),
        Start::Before(_) => (messages.last().map(cursor_of), more.then(|| messages.first().map(cursor_of)).flatten()),
    };
    Ok(MessagePage { messages, after, before })
}

/// The status and engagement statuses of a recipient run's messages, by step ref.
pub async fn statuses(store: &Store, recipient_run_id: uuid::Uuid) -> Result<crate::core::history::StoredStatuses, StoreError> {
    let rows = store
        .client()
        .await?
        .query("SELECT step_ref, status, seen_at, read_at, archived_at, interacted_at, link_clicked_at FROM herald_messages WHERE recipient_run_id = $1", &[&recipient_run_id])
        .await?;
    let mut out = crate::core::history::StoredStatuses::new();
    for row in rows {
        let engagement = Engagement {
            seen_at: row.try_get("seen_at")?,
            read_at: row.try_get("read_at")?,
            archived_at: row.try_get("archived_at")?,
            interacted_at: row.try_get("interacted_at")?,
            clicked_at: None,
            link_clicked_at: row.try_get("link_clicked_at")?,
        };
        out.insert(row.try_get("step_ref")?, (row.try_get("status")?, engagement.statuses().into_iter().map(str::to_string).collect()));
    }
    Ok(out)
}

/// One message by id, in a namespace.
pub async fn get(store: &Store, namespace: &str, id: Uuid) -> Result<Option<MessageRecord>, StoreError> {
    let sql = format!("SELECT {SELECT_COLUMNS} FROM herald_messages WHERE namespace = $1 AND id = $2");
    let row = store.client().await?.query_opt(sql.as_str(), &[&namespace, &id]).await?;
    row.as_ref().map(read_row).transpose()
}

pub(super) fn read_row(row: &tokio_postgres::Row) -> Result<MessageRecord, StoreError> {
    let corrupt = |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("message {what}: {e}"));
    let collection: String = row.try_get("recipient_collection")?;
    let id: String = row.try_get("recipient_id")?;
    let recipient = if collection.is_empty() { RecipientKey::user(id) } else { RecipientKey::object(collection, id) };
    let actor: Option<Value> = row.try_get("actor")?;
    let status: String = row.try_get("status")?;
    let status = serde_json::from_value::<MessageStatus>(json!(status)).map_err(|e| corrupt("status", &e))?;
    let attempts: Value = row.try_get("attempts")?;
    let content: Option<Value> = row.try_get("content")?;
    Ok(MessageRecord {
        id: row.try_get("id")?,
        namespace: row.try_get("namespace")?,
        workflow: row.try_get("workflow")?,
        workflow_run_id: row.try_get("workflow_run_id")?,
        recipient_run_id: row.try_get("recipient_run_id")?,
        recipient,
        tenant: row.try_get("tenant")?,
        actor: actor.map(serde_json::from_value).transpose().map_err(|e| corrupt("actor", &e))?,
        step_ref: row.try_get("step_ref")?,
        channel: row.try_get("channel")?,
        channel_type: row.try_get("channel_type")?,
        status,
        reason: row.try_get("reason")?,
        content: content.and_then(|c| c.as_object().cloned()),
        attempts: serde_json::from_value(attempts).map_err(|e| corrupt("attempts", &e))?,
        data: row.try_get::<_, Option<Value>>("data")?.unwrap_or(Value::Null),
        categories: row.try_get("categories")?,
        engagement: Engagement {
            seen_at: row.try_get("seen_at")?,
            read_at: row.try_get("read_at")?,
            archived_at: row.try_get("archived_at")?,
            interacted_at: row.try_get("interacted_at")?,
            clicked_at: row.try_get("clicked_at")?,
            link_clicked_at: row.try_get("link_clicked_at")?,
        },
        inserted_at: row.try_get("inserted_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
