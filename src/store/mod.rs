//! The optional history store in PostgreSQL (`--database-url`): messages,
//! finished runs and idempotency keys, so that the cluster's etcd holds only
//! live work. Thin: SQL in, records of [`crate::core::history`] out; the
//! decisions stay in the core.
//!
//! Schema migrations ship in the binary ([`MIGRATIONS`]) and apply at start,
//! under an advisory lock so that replicas starting together apply each once.

pub mod feed;
pub mod idempotency;
pub mod messages;
pub mod once;
pub mod retention;
pub mod runs;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// The migrations, in order: (version, name, SQL). Never edit a shipped one; add the next.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "history", include_str!("migrations/0001_history.sql")),
    (2, "feed", include_str!("migrations/0002_feed.sql")),
    (3, "trigger_frequency", include_str!("migrations/0003_trigger_frequency.sql")),
];

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
    /// Opens the store at `url` and starts the message writer. Only a URL
    /// that does not parse fails: a database that is down must not keep
    /// herald from starting (runs go on; history waits), so the migrations
    /// are applied in the background, retried until they are, and the store
    /// answers "unavailable" until then.
    pub async fn start(url: &str, metrics: &crate::metrics::Metrics) -> Result<History, StoreError> {
        let store = Store::open(url)?;
        if let Err(e) = store.migrate().await {
            tracing::warn!(error = %e, "the history store is unavailable; retrying its migrations in the background");
            let retry = store.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    match retry.migrate().await {
                        Ok(()) => break,
                        Err(e) => tracing::debug!(error = %e, "history store migrations; retrying"),
                    }
                }
            });
        }
        let messages = messages::MessageLog::start(store.clone(), metrics.history_messages_dropped.clone());
        Ok(History { store, messages })
    }
}

/// The history store: a pool of connections to PostgreSQL.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Set once the migrations are applied: until then every use is "unavailable".
    migrated: Arc<AtomicBool>,
}

impl Store {
    /// Connects and applies the migrations; fails if the database cannot be reached.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let store = Store::open(url)?;
        store.migrate().await?;
        Ok(store)
    }

    /// The pool for `url`, without connecting (it opens connections when first used).
    pub fn open(url: &str) -> Result<Store, StoreError> {
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
        Ok(Store { pool, migrated: Arc::new(AtomicBool::new(false)) })
    }

    /// Applies the migrations not applied yet, each in its own transaction.
    /// Applies the migrations not applied yet, in one transaction under an
    /// advisory lock (replicas starting together wait for each other).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS herald_schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            .await?;
        for (version, name, sql) in MIGRATIONS {
            let applied = tx.query_opt("SELECT 1 FROM herald_schema_migrations WHERE version = $1", &[version]).await?.is_some();
            if !applied {
                tracing::info!(version, name, "applying history store migration");
                tx.batch_execute(sql).await?;
                tx.execute("INSERT INTO herald_schema_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
            }
        }
        tx.commit().await?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }

    /// A connection from the pool, once the schema is in place.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if !self.migrated.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the history store's schema is not applied yet (is PostgreSQL reachable?)".into()));
        }
        Ok(self.pool.get().await?)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }
}
