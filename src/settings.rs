//! Operator settings: command-line flags, each with an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use crate::delivery::egress::{CidrList, EgressPolicy};

/// Settings of `herald run`.
#[derive(Clone, Debug, clap::Args)]
pub struct Settings {
    /// Address of the HTTP server (API, /healthz, /readyz, /metrics).
    #[arg(long, env = "HERALD_API_ADDR", default_value = "0.0.0.0:8080")]
    pub api_addr: SocketAddr,

    /// Watch only these namespaces, comma-separated (default: every namespace).
    #[arg(long = "namespace", env = "HERALD_NAMESPACE", value_delimiter = ',')]
    pub namespaces: Vec<String>,

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

    /// TriggerRuns reconciled at once, across every watched namespace (0: no bound). Shared
    /// fairly by namespace: with more than one namespace watched, one holds at most all but an
    /// eighth of them.
    #[arg(long, env = "HERALD_MAX_CONCURRENT_RUNS", default_value_t = 16)]
    pub max_concurrent_runs: u16,

    /// Delivery attempts in flight at once across every run. Shared fairly by namespace, then
    /// by run: a freed slot goes to the waiting namespace holding the fewest, and with more than
    /// one namespace watched, one holds at most all but an eighth of them.
    #[arg(long, env = "HERALD_MAX_DELIVERIES", default_value_t = 256)]
    pub max_deliveries: usize,

    /// Elect a leader through a coordination.k8s.io Lease so that, of several
    /// replicas, only one reconciles (every replica serves the HTTP API).
    #[arg(long, env = "HERALD_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Seconds the HTTP server goes on serving after SIGTERM, answering
    /// /readyz with 503, before it stops accepting connections: time for
    /// load balancers to stop sending to a pod that is going away.
    #[arg(long, env = "HERALD_SHUTDOWN_DELAY_SECONDS", default_value_t = 0)]
    pub shutdown_delay_seconds: u64,

    /// Seconds a graceful stop (SIGTERM) gives in-flight reconciles to finish
    /// before they are cut short; keep it below the pod's
    /// terminationGracePeriodSeconds. Work cut short resumes from its last
    /// checkpoint on the next leader.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    pub shutdown_grace_seconds: u64,

    /// Seconds a leader's Lease lasts without renewal; a replica that cannot
    /// renew stops reconciling, and another takes over after at most this long.
    #[arg(long = "leader-election-lease-seconds", env = "HERALD_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: i64,

    /// Name of the Lease (give each release in a namespace its own).
    #[arg(long, env = "HERALD_LEASE_NAME", default_value = "herald-controller")]
    pub lease_name: String,

    /// Namespace of the Lease (default: the first watched namespace, else POD_NAMESPACE, else `default`).
    #[arg(long, env = "HERALD_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// This replica's identity in the Lease (default: HERALD_POD_NAME, else the host name plus a random suffix).
    #[arg(long, env = "HERALD_POD_NAME")]
    pub identity: Option<String>,

    /// Log format: `text` or `json`.
    #[arg(long, env = "HERALD_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// HTTP API: the largest request body accepted, in bytes (larger: 413). Trigger
    /// payloads are stored in etcd, whose requests stop at 1.5 MiB.
    #[arg(long, env = "HERALD_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// HTTP API: seconds a client has to send a request's headers before the connection is closed.
    #[arg(long, env = "HERALD_HEADER_TIMEOUT_SECONDS", default_value_t = 10)]
    pub header_timeout_seconds: u64,

    /// HTTP API: seconds to read a request's body and answer it (longer: 408 while the body is
    /// still coming, else 503 with Retry-After).
    #[arg(long, env = "HERALD_REQUEST_TIMEOUT_SECONDS", default_value_t = 30)]
    pub request_timeout_seconds: u64,

    /// HTTP API: requests per second allowed per API key or ServiceAccount (over: 429 with
    /// Retry-After). 0 turns the limit off (the default).
    #[arg(long, env = "HERALD_RATE_LIMIT_PER_SECOND", default_value_t = 0.0)]
    pub rate_limit_per_second: f64,

    /// HTTP API: requests a caller may send at once above the rate (default: one second's worth).
    #[arg(long, env = "HERALD_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,

    /// Namespaces (comma-separated, `*` for all) in which the inline recipients,
    /// actor and tenant of a TriggerRun created with kubectl may overwrite
    /// existing Users, Objects and Tenants. Elsewhere they only create missing
    /// ones: permission to create TriggerRuns is not permission to rewrite a
    /// user's email or webhook URL. (API triggers identify with the caller's
    /// own `update` permission, checked by the API.)
    #[arg(long, env = "HERALD_IDENTIFY_OVERWRITE_NAMESPACES", value_delimiter = ',')]
    pub identify_overwrite_namespaces: Vec<String>,

    /// HTTP API: the namespace holding the API key Secrets (default: POD_NAMESPACE, else the
    /// first watched namespace, else `default`). herald lists and watches Secrets only here;
    /// a key acts in the namespace its annotation `herald.dev/namespace` names (default: this one).
    #[arg(long, env = "HERALD_API_KEY_NAMESPACE")]
    pub api_key_namespace: Option<String>,

    /// History store: a PostgreSQL URL (`postgres://user:password@host:5432/herald`). With
    /// it, messages are recorded, finished runs are archived and leave the cluster after
    /// --finished-ttl-seconds, and idempotency keys are kept there. Without it, herald keeps
    /// finished runs in the cluster (see --default-ttl-seconds).
    #[arg(long, env = "HERALD_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// History store: seconds a finished TriggerRun stays in the cluster after it is archived,
    /// when it sets no ttlSecondsAfterFinished (so `kubectl get` and `kubectl wait` still see it).
    #[arg(long, env = "HERALD_FINISHED_TTL_SECONDS", default_value_t = 300)]
    pub finished_ttl_seconds: i64,

    /// History store: days messages, archived runs and idempotency keys are kept (at least 7,
    /// Knock's idempotency window). The leader deletes older rows every 10 minutes, in batches.
    #[arg(long, env = "HERALD_HISTORY_RETENTION_DAYS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(7..))]
    pub history_retention_days: u32,

    /// Deliveries: CIDR blocks (or addresses) deliveries may not connect to, comma-separated, in
    /// addition to the defaults (link-local 169.254.0.0/16 and fe80::/10, cloud metadata
    /// 169.254.169.254, fd00:ec2::254 and 100.100.100.200, unspecified 0.0.0.0 and ::).
    /// Checked on the addresses a host resolves to.
    #[arg(long, env = "HERALD_EGRESS_DENY_CIDRS", value_name = "CIDRS", default_value_t, hide_default_value = true)]
    pub egress_deny_cidrs: CidrList,

    /// Deliveries: CIDR blocks (or addresses) deliveries may connect to even when a default rule
    /// or --egress-deny-cidrs covers them, comma-separated.
    #[arg(long, env = "HERALD_EGRESS_ALLOW_CIDRS", value_name = "CIDRS", default_value_t, hide_default_value = true)]
    pub egress_allow_cidrs: CidrList,

    /// HTTP API: origins browsers may call the API from (Knock's client SDKs with a publishable
    /// key), comma-separated, e.g. `https://app.example.com,http://localhost:5173`; `*` for any.
    /// Empty: no CORS headers. The real-time socket checks its Origin against the same list.
    #[arg(long, env = "HERALD_CORS_ALLOWED_ORIGINS", value_name = "ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_allowed_origins: Vec<String>,

    /// Real-time socket (`/ws/v1/websocket`): open sockets this replica accepts at most; beyond
    /// it, 503 with Retry-After (clients reconnect, possibly to another replica).
    #[arg(long, env = "HERALD_MAX_SOCKETS", default_value_t = 10_000)]
    pub max_sockets: usize,

    /// Schedules: the time zone of recipients without a (valid) `timezone`, per namespace:
    /// comma-separated `namespace=Zone` entries and at most one bare `Zone` for the other
    /// namespaces (IANA names, e.g. `team-a=Europe/Paris,America/New_York`). Default: UTC.
    #[arg(long, env = "HERALD_DEFAULT_TIMEZONE", value_delimiter = ',', value_parser = parse_zone_entry)]
    pub default_timezone: Vec<String>,

    /// Schedules: the clock they read (tests run it faster than real time); None is the real clock.
    #[arg(skip)]
    pub schedule_clock: Option<crate::core::schedule::Clock>,
}

/// An entry of `--default-timezone`: `Zone` or `namespace=Zone`, with a zone jiff knows.
fn parse_zone_entry(value: &str) -> Result<String, String> {
    let value = value.trim();
    let zone = value.split_once('=').map_or(value, |(_, z)| z);
    jiff::tz::TimeZone::get(zone).map_err(|_| format!("`{zone}` is not an IANA time zone (e.g. Europe/Paris)"))?;
    Ok(value.to_string())
}

/// An origin of `--cors-allowed-origins`: `scheme://host[:port]` (lowercased, as browsers send it), `*`, or nothing.
fn parse_origin(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() || value == "*" {
        return Ok(value.to_string());
    }
    let rest = value.strip_prefix("https://").or_else(|| value.strip_prefix("http://"));
    let valid = rest.is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#', '@']) && host.bytes().all(|b| b.is_ascii_graphic()));
    if valid {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(format!("`{value}` is not an origin: write scheme://host[:port], e.g. https://app.example.com, with no path"))
    }
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
            namespaces: vec![namespace.to_string()],
            default_ttl_seconds: 7 * 24 * 3600,
            cancellation_retention_seconds: 3600,
            workflow_grace_seconds: 30,
            run_concurrency: 64,
            max_concurrent_runs: 16,
            max_deliveries: 256,
            log_format: LogFormat::Text,
            leader_election: true,
            shutdown_grace_seconds: 20,
            shutdown_delay_seconds: 0,
            lease_seconds: 15,
            lease_name: "herald-controller".into(),
            lease_namespace: None,
            identity: None,
            max_body_bytes: 1024 * 1024,
            header_timeout_seconds: 10,
            request_timeout_seconds: 30,
            rate_limit_per_second: 0.0,
            rate_limit_burst: None,
            identify_overwrite_namespaces: Vec::new(),
            api_key_namespace: None,
            database_url: None,
            finished_ttl_seconds: 300,
            history_retention_days: 30,
            egress_deny_cidrs: CidrList::default(),
            egress_allow_cidrs: CidrList::default(),
            cors_allowed_origins: Vec::new(),
            max_sockets: 10_000,
            default_timezone: Vec::new(),
            schedule_clock: None,
        }
    }

    /// The namespace whose labelled Secrets are API keys.
    pub fn key_namespace(&self) -> String {
        self.api_key_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|ns| !ns.is_empty()))
            .or_else(|| self.namespaces.first().cloned())
            .unwrap_or_else(|| "default".into())
    }

    /// Whether a TriggerRun's inline identify may overwrite existing resources in `namespace`.
    pub fn identify_overwrite(&self, namespace: &str) -> crate::controller::identify::Overwrite {
        use crate::controller::identify::Overwrite;
        if self.identify_overwrite_namespaces.iter().any(|n| n == "*" || n == namespace) {
            Overwrite::Allowed
        } else {
            Overwrite::CreateOnly
        }
    }

    /// The egress policy of deliveries: the defaults, the deny list, the allow list over both.
    pub fn egress_policy(&self) -> EgressPolicy {
        EgressPolicy::new(&self.egress_deny_cidrs.0, &self.egress_allow_cidrs.0)
    }

    /// The origins browsers may call from (empty entries left out).
    pub fn cors_origins(&self) -> Vec<String> {
        self.cors_allowed_origins.iter().filter(|o| !o.is_empty()).cloned().collect()
    }

    /// The HTTP API's request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds.max(1))
    }

    /// How long an API request may wait for something herald itself lacks
    /// (watch caches still loading, an answer to `/readyz`'s check): 10 s,
    /// and always short of the request timeout, so the answer is a 503 with
    /// Retry-After rather than a 408.
    pub fn api_wait(&self) -> Duration {
        (self.request_timeout() * 3 / 4).min(Duration::from_secs(10))
    }

    /// The default time zone of recipients in `namespace` (`--default-timezone`), if set.
    pub fn default_timezone(&self, namespace: &str) -> Option<&str> {
        let entries = || self.default_timezone.iter().map(|e| e.split_once('=').map_or((None, e.as_str()), |(ns, z)| (Some(ns), z)));
        entries().find(|(ns, _)| *ns == Some(namespace)).or_else(|| entries().find(|(ns, _)| ns.is_none())).map(|(_, zone)| zone)
    }

    /// The time schedules read.
    pub fn schedule_now(&self) -> jiff::Timestamp {
        self.schedule_clock.map_or_else(jiff::Timestamp::now, |c| c.now())
    }

    pub fn workflow_grace(&self) -> Duration {
        Duration::from_secs(self.workflow_grace_seconds.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn api_waits_end_before_the_request_timeout() {
        for seconds in [1, 2, 8, 30, 600] {
            let settings = Settings { request_timeout_seconds: seconds, ..Settings::for_namespace("n") };
            assert!(settings.api_wait() < settings.request_timeout(), "{seconds}");
            assert!(settings.api_wait() <= Duration::from_secs(10));
        }
    }

    #[test]
    fn egress_flags_take_comma_separated_cidrs() {
        let cli = Cli::try_parse_from(["herald", "--egress-deny-cidrs", "127.0.0.0/8, ::1", "--egress-allow-cidrs=127.0.0.1"]).unwrap();
        let policy = cli.settings.egress_policy();
        assert_eq!(policy.check("127.0.0.2".parse().unwrap()).unwrap_err().to_string(), "127.0.0.2 is refused by the egress policy (--egress-deny-cidrs 127.0.0.0/8)");
        assert!(policy.check("::1".parse().unwrap()).is_err());
        assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
        let err = Cli::try_parse_from(["herald", "--egress-deny-cidrs", "10.0.0.0/8,example.com"]).err().unwrap();
        assert!(err.to_string().contains("`example.com` is not a CIDR block"), "{err}");
        assert_eq!(Cli::try_parse_from(["herald", "--egress-allow-cidrs="]).unwrap().settings.egress_allow_cidrs, CidrList::default());
    }

    #[test]
    fn cors_origins_are_origins() {
        let cli = Cli::try_parse_from(["herald", "--cors-allowed-origins", "https://App.example.com, http://localhost:5173,"]).unwrap();
        assert_eq!(cli.settings.cors_origins(), vec!["https://app.example.com", "http://localhost:5173"]);
        assert!(Cli::try_parse_from(["herald", "--cors-allowed-origins="]).unwrap().settings.cors_origins().is_empty());
        assert_eq!(Cli::try_parse_from(["herald", "--cors-allowed-origins=*"]).unwrap().settings.cors_origins(), vec!["*"]);
        for bad in ["app.example.com", "https://app.example.com/", "https://app.example.com/path", "ftp://x"] {
            assert!(Cli::try_parse_from(["herald", "--cors-allowed-origins", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_time_zones_per_namespace() {
        let cli = Cli::try_parse_from(["herald", "--default-timezone", "team-a=Europe/Paris,America/New_York"]).unwrap();
        assert_eq!(cli.settings.default_timezone("team-a"), Some("Europe/Paris"));
        assert_eq!(cli.settings.default_timezone("team-b"), Some("America/New_York"));
        assert_eq!(Settings::for_namespace("n").default_timezone("n"), None);
        assert!(Cli::try_parse_from(["herald", "--default-timezone", "team-a=Mars/Olympus"]).is_err());
    }
}
