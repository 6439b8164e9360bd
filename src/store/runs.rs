//! Finished runs in the store: the TriggerRun as it was and each recipient's
//! record, written before the run leaves the cluster: the run's row first,
//! then its recipients a page at a time (a run of any size is archived in
//! bounded memory). The API reads a run from the cluster while it is there,
//! so a partly written archive is never read; archiving again rewrites it.

use jiff::Timestamp;
use serde_json::Value;
use uuid::Uuid;

use super::messages::{self, Conflict};
use super::{Store, StoreError};
use crate::core::history::MessageRecord;

/// A finished run, ready to archive.
#[derive(Clone, Debug)]
pub struct ArchivedRun {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub workflow: String,
    pub state: String,
    /// The TriggerRun object, without its pages.
    pub run: Value,
    pub inserted_at: Timestamp,
}

/// Starts archiving a run: its row, and none of its recipients' rows yet (a
/// stopped archive's are cleared). [`archive_recipients`] adds them.
pub async fn archive_run(store: &Store, run: &ArchivedRun) -> Result<(), StoreError> {
    let mut client = store.client().await?;
    let tx = client.transaction().await?;
    let now = Timestamp::now();
    tx.execute(
        "INSERT INTO herald_workflow_runs (id, namespace, name, workflow, state, run, inserted_at, archived_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, run = EXCLUDED.run, archived_at = EXCLUDED.archived_at",
        &[&run.id, &run.namespace, &run.name, &run.workflow, &run.state, &run.run, &run.inserted_at, &now],
    )
    .await?;
    tx.execute("DELETE FROM herald_recipient_runs WHERE workflow_run_id = $1", &[&run.id]).await?;
    tx.commit().await?;
    Ok(())
}

/// Archives recipients' records (recipient run id, record) of run `run_id`
/// at positions from `first`, and the messages they stand for that the store
/// does not have; idempotent.
pub async fn archive_recipients(store: &Store, run_id: Uuid, first: usize, recipients: &[(Uuid, Value)], messages: &[MessageRecord]) -> Result<(), StoreError> {
    let client = store.client().await?;
    let now = Timestamp::now();
    // Rows in batches: one statement per 1,000 recipients.
    for (chunk_index, chunk) in recipients.chunks(1000).enumerate() {
        let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
        let positions: Vec<i32> = (0..chunk.len()).map(|i| i32::try_from(first + chunk_index * 1000 + i).unwrap_or(i32::MAX)).collect();
        let records: Vec<&Value> = chunk.iter().map(|(_, r)| r).collect();
        client
            .execute(
                "INSERT INTO herald_recipient_runs (id, workflow_run_id, position, record, updated_at) \
                 SELECT id, $1, position, record, $2 FROM UNNEST($3::uuid[], $4::int4[], $5::jsonb[]) AS t(id, position, record) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record, position = EXCLUDED.position, workflow_run_id = EXCLUDED.workflow_run_id",
                &[&run_id, &now, &ids, &positions, &records],
            )
            .await?;
    }
    drop(client);
    messages::insert(store, messages, Conflict::Keep).await
}

/// A run read back: the TriggerRun object and how many recipients it had.
#[derive(Clone, Debug)]
pub struct StoredRun {
    pub run: Value,
    pub recipients: i64,
}

/// An archived run by its workflow run id, in a namespace.
pub async fn get(store: &Store, namespace: &str, id: Uuid) -> Result<Option<StoredRun>, StoreError> {
    let client = store.client().await?;
    let Some(row) = client.query_opt("SELECT run FROM herald_workflow_runs WHERE namespace = $1 AND id = $2", &[&namespace, &id]).await? else { return Ok(None) };
    let count: i64 = client.query_one("SELECT count(*) FROM herald_recipient_runs WHERE workflow_run_id = $1", &[&id]).await?.try_get(0)?;
    Ok(Some(StoredRun { run: row.try_get(0)?, recipients: count }))
}

/// Recipients' records of an archived run at positions `from..from+size`.
pub async fn recipients(store: &Store, id: Uuid, from: i64, size: i64) -> Result<Vec<Value>, StoreError> {
    let from = i32::try_from(from).unwrap_or(i32::MAX);
    let rows = store
        .client()
        .await?
        .query("SELECT record FROM herald_recipient_runs WHERE workflow_run_id = $1 AND position >= $2 ORDER BY position LIMIT $3", &[&id, &from, &size])
        .await?;
    rows.iter().map(|r| r.try_get(0).map_err(StoreError::from)).collect()
}

/// One recipient's record and its run, by recipient run id, in a namespace.
pub async fn recipient(store: &Store, namespace: &str, id: Uuid) -> Result<Option<(Value, Value)>, StoreError> {
    let row = store
        .client()
        .await?
        .query_opt(
            "SELECT r.record, w.run FROM herald_recipient_runs r JOIN herald_workflow_runs w ON w.id = r.workflow_run_id WHERE r.id = $1 AND w.namespace = $2",
            &[&id, &namespace],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Whether a run of this name was archived in a namespace (an idempotency key's run).
pub async fn find_by_name(store: &Store, namespace: &str, name: &str) -> Result<Option<Value>, StoreError> {
    let row =
        store.client().await?.query_opt("SELECT run FROM herald_workflow_runs WHERE namespace = $1 AND name = $2 ORDER BY archived_at DESC LIMIT 1", &[&namespace, &name]).await?;
    Ok(row.map(|r| r.get(0)))
}
