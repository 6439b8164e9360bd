//! History retention: rows older than --history-retention-days are deleted in
//! batches (small transactions, so the tables stay writable and vacuum keeps
//! up), by the replica that leads.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::{Store, StoreError};

/// Rows deleted per statement.
pub const BATCH: i64 = 10_000;
/// How often the leader purges.
pub const EVERY: Duration = Duration::from_secs(600);

/// What one purge deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    pub messages: u64,
    pub runs: u64,
    pub keys: u64,
}

/// Deletes what is older than `cutoff`: messages by insertion, archived runs
/// (with their recipients' records) by archiving, idempotency keys by
/// creation. Keys go no later than their runs (a run is archived after its key
/// is claimed), so a key that still exists can always be replayed.
pub async fn purge(store: &Store, cutoff: Timestamp) -> Result<Purged, StoreError> {
    let mut purged = Purged::default();
    for (table, column, count) in [
        ("herald_messages", "inserted_at", &mut purged.messages),
        ("herald_idempotency_keys", "created_at", &mut purged.keys),
        ("herald_workflow_runs", "archived_at", &mut purged.runs),
    ] {
        let sql = format!("DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE {column} < $1 LIMIT {BATCH})");
        loop {
            let deleted = store.client().await?.execute(sql.as_str(), &[&cutoff]).await?;
            *count += deleted;
            if deleted < BATCH as u64 {
                break;
            }
        }
    }
    Ok(purged)
}

/// The cutoff for a retention of `days`.
pub fn cutoff(now: Timestamp, days: u32) -> Timestamp {
    now.checked_sub(SignedDuration::from_hours(24 * i64::from(days))).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Purges every [`EVERY`] (the first time a minute after it starts) while
/// the task lives: the operator runs it on the leader only.
pub async fn keep(store: Store, days: u32) {
    let mut wait = Duration::from_secs(60);
    loop {
        tokio::time::sleep(wait).await;
        wait = EVERY;
        match purge(&store, cutoff(Timestamp::now(), days)).await {
            Ok(p) if p == Purged::default() => {}
            Ok(p) => tracing::info!(messages = p.messages, runs = p.runs, keys = p.keys, days, "purged history past its retention"),
            Err(e) => tracing::warn!(error = %e, "purging history past its retention; retrying later"),
        }
    }
}
