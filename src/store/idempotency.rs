//! Idempotency keys in the store. A key is held by the TriggerRun it made
//! (named by a hash of its API, namespace and key), so the cluster refuses a
//! second run while the first is there; the store keeps the key after the run
//! has left the cluster. Claimed with a unique key, never read-then-write.

use jiff::Timestamp;

use super::{Store, StoreError};

/// Claims a run name for a key; false when it was claimed before (the key
/// was used: replay its run).
pub async fn claim(store: &Store, namespace: &str, run_name: &str, fingerprint: &str) -> Result<bool, StoreError> {
    let inserted = store
        .client()
        .await?
        .execute(
            "INSERT INTO herald_idempotency_keys (namespace, run_name, fingerprint, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&namespace, &run_name, &fingerprint, &Timestamp::now()],
        )
        .await?;
    Ok(inserted == 1)
}

/// Releases a claim whose run could not be created (so a retry may create it).
pub async fn release(store: &Store, namespace: &str, run_name: &str) -> Result<(), StoreError> {
    store.client().await?.execute("DELETE FROM herald_idempotency_keys WHERE namespace = $1 AND run_name = $2", &[&namespace, &run_name]).await?;
    Ok(())
}

/// Records the key of a run being archived (one accepted while the store was
/// down has no claim yet).
pub async fn record(store: &Store, namespace: &str, run_name: &str, fingerprint: &str, created_at: Timestamp) -> Result<(), StoreError> {
    store
        .client()
        .await?
        .execute(
            "INSERT INTO herald_idempotency_keys (namespace, run_name, fingerprint, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&namespace, &run_name, &fingerprint, &created_at],
        )
        .await?;
    Ok(())
}
