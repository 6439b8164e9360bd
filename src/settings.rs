//! Operator settings: command-line flags, each with an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

/// Settings of `herald run`.
#[derive(Clone, Debug, clap::Args)]
pub struct Settings {
    /// Address of the HTTP server (API, /healthz, /readyz, /metrics).
    #[arg(long, env = "HERALD_API_ADDR", default_value = "0.0.0.0:8080")]
    pub api_addr: SocketAddr,

    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "HERALD_NAMESPACE")]
    pub namespace: Option<String>,

    /// Seconds a finished TriggerRun is kept when its spec sets no ttlSecondsAfterFinished.
    /// Runs with an idempotency key are always kept at least 7 days.
    #[arg(long, env = "HERALD_DEFAULT_TTL_SECONDS", default_value_t = 7 * 24 * 3600)]
    pub default_ttl_seconds: i64,

    /// Seconds a Cancellation stays in force, so that a cancel sent before its trigger still applies.
    #[arg(long, env = "HERALD_CANCELLATION_RETENTION_SECONDS", default_value_t = 3600)]
    pub cancellation_retention_seconds: i64,

    /// Seconds to wait for a Workflow that a TriggerRun names before failing it with WorkflowNotFound
    /// (the Workflow may be applied in the same `kubectl apply`).
    #[arg(long, env = "HERALD_WORKFLOW_GRACE_SECONDS", default_value_t = 30)]
    pub workflow_grace_seconds: i64,

    /// Deliveries in flight at once, per TriggerRun.
    #[arg(long, env = "HERALD_RUN_CONCURRENCY", default_value_t = 64)]
    pub run_concurrency: usize,

    /// TriggerRuns reconciled at once.
    #[arg(long, env = "HERALD_MAX_CONCURRENT_RUNS", default_value_t = 16)]
    pub max_concurrent_runs: u16,

    /// Log format: `text` or `json`.
    #[arg(long, env = "HERALD_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Settings {
    /// Settings for tests and embedding: every default, one namespace, an ephemeral port.
    pub fn for_namespace(namespace: &str) -> Self {
        Settings {
            api_addr: "127.0.0.1:0".parse().expect("static address"),
            namespace: Some(namespace.to_string()),
            default_ttl_seconds: 7 * 24 * 3600,
            cancellation_retention_seconds: 3600,
            workflow_grace_seconds: 30,
            run_concurrency: 64,
            max_concurrent_runs: 16,
            log_format: LogFormat::Text,
        }
    }

    pub fn workflow_grace(&self) -> Duration {
        Duration::from_secs(self.workflow_grace_seconds.max(0) as u64)
    }
}
