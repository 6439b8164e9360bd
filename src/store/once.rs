//! Trigger frequency: which recipient run of a workflow ran first for a
//! recipient (and tenant). Claimed with a unique key, never read-then-write,
//! so two runs racing for the same recipient cannot both pass.

use jiff::Timestamp;
use uuid::Uuid;

use super::{Store, StoreError};

/// True when `recipient_run_id` is the first run of the workflow for this
/// recipient and tenant scope (`""` for every tenant), or is that run asking again.
pub async fn claim(store: &Store, namespace: &str, workflow: &str, recipient: &str, tenant: &str, recipient_run_id: Uuid) -> Result<bool, StoreError> {
    let client = store.client().await?;
    let row = client
        .query_opt(
            "WITH inserted AS (
                INSERT INTO herald_trigger_once (namespace, workflow, recipient, tenant, recipient_run_id, created_at)
                VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING recipient_run_id)
             SELECT recipient_run_id FROM inserted
             UNION ALL
             SELECT recipient_run_id FROM herald_trigger_once WHERE namespace = $1 AND workflow = $2 AND recipient = $3 AND tenant = $4
             LIMIT 1",
            &[&namespace, &workflow, &recipient, &tenant, &recipient_run_id, &Timestamp::now()],
        )
        .await?;
    // A racing insert committed after this statement's snapshot: neither branch saw a row; read it now.
    let row = match row {
        Some(row) => row,
        None => {
            client
                .query_one(
                    "SELECT recipient_run_id FROM herald_trigger_once WHERE namespace = $1 AND workflow = $2 AND recipient = $3 AND tenant = $4",
                    &[&namespace, &workflow, &recipient, &tenant],
                )
                .await?
        }
    };
    let first: Uuid = row.get(0);
    Ok(first == recipient_run_id)
}
