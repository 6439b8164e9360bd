//! The optional history store in PostgreSQL (`--database-url`): messages,
//! finished runs and idempotency keys, so that the cluster's etcd holds only
//! live work. Thin: SQL in, records of [`crate::core::history`] out; the
//! decisions stay in the core.
//!
//! Schema migrations ship in the binary ([`MIGRATIONS`]) and apply at start,
//! under an advisory lock so that replicas starting together apply each once.

pub mod idempotency;
pub mod messages;
pub mod runs;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// The migrations, in order: (version, name, SQL). Never edit a shipped one; add the next.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(1, "history", include_str!("migrations/0001_history.sql"))];

/// An arbitrary, fixed key for `pg_advisory_xact_lock`: herald's migrations.
const MIGRATION_LOCK: i64 = 0x6865_7261_6c64;

/// Connections in the pool.
const POOL_SIZE: usize = 16;
/// How long a caller waits for a connection (or for one to be made) before
/// the store counts as unavailable: history reads answer 503, writes retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database URL is not valid: {0}")]
    Url(String),
    #[error("the history store is unavailable: {0}")]
    Unavailable(String),
    #[error("the history store refused a query: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("a stored record does not read: {0}")]
    Corrupt(String),
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

impl StoreError {
    /// Whether the store could not be reached (as opposed to refusing a query).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Query(e) => e.is_closed() || e.code().is_none(),
            _ => false,
        }
    }
}

/// The history store and its message writer, as the operator uses them.
#[derive(Clone)]
pub struct History {
    pub store: Store,
    pub messages: messages::MessageLog,
}

impl History {
    /// Connects to `url`, applies the migrations and starts the message writer.
    pub async fn start(url: &str, metrics: &crate::metrics::Metrics) -> Result<History, StoreError> {
        let store = Store::connect(url).await?;
        let messages = messages::MessageLog::start(store.clone(), metrics.history_messages_dropped.clone());
        Ok(History { store, messages })
    }
}

/// The history store: a pool of connections to PostgreSQL.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Connects (lazily: the pool opens connections when first used) and
    /// applies the migrations; fails if the database cannot be reached.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("herald");
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Url(e.to_string()))?;
        let store = Store { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations not applied yet, each in its own transaction.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS herald_schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            .await?;
        for (version, name, sql) in MIGRATIONS {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
            let applied = tx.query_opt("SELECT 1 FROM herald_schema_migrations WHERE version = $1", &[version]).await?.is_some();
            if !applied {
                tracing::info!(version, name, "applying history store migration");
                tx.batch_execute(sql).await?;
                tx.execute("INSERT INTO herald_schema_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// A connection from the pool.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }
}
