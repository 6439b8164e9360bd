//! Prometheus metrics, served at /metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub channel_type: String,
    pub outcome: String,
}

/// A pool of fairly shared slots (`deliveries`, `reconciles`) and a namespace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabels {
    pub pool: String,
    pub namespace: String,
}

/// Labels of an HTTP request: the matched route (never the raw path), method and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// `trigger` (POST /v1/workflows/{key}/trigger) or `notify` (POST /v1/notify).
    pub api: String,
}

/// Metrics of the HTTP API (src/http), kept apart from the reconcilers'.
pub struct HttpMetrics {
    pub requests: Family<HttpLabels, Counter>,
    pub request_seconds: Family<HttpRouteLabels, Histogram>,
    /// Triggers persisted as TriggerRuns (replays not counted).
    pub triggers_accepted: Family<TriggerLabels, Counter>,
    /// Trigger requests answered by replaying an earlier response (Idempotency-Key).
    pub idempotent_replays: Counter,
    /// Requests being served now (one still waiting for its body counts).
    pub in_flight: Gauge,
}

impl HttpMetrics {
    fn register(registry: &mut Registry) -> Self {
        let requests = Family::<HttpLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests answered, by method, route and status", requests.clone());
        let request_seconds = Family::<HttpRouteLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.5, 14)));
        registry.register("http_request_duration_seconds", "HTTP request latency, by method and route", request_seconds.clone());
        let triggers_accepted = Family::<TriggerLabels, Counter>::default();
        registry.register("http_triggers_accepted", "Triggers persisted as TriggerRuns through the HTTP API", triggers_accepted.clone());
        let idempotent_replays = Counter::default();
        registry.register("http_idempotent_replays", "Trigger requests answered by replaying the original response", idempotent_replays.clone());
        let in_flight = Gauge::default();
        registry.register("http_requests_in_flight", "HTTP requests being served now (one still waiting for its body counts)", in_flight.clone());
        HttpMetrics { requests, request_seconds, triggers_accepted, idempotent_replays, in_flight }
    }
}

/// Every metric herald exports.
pub struct Metrics {
    registry: Registry,
    /// Writes (create, patch, delete) herald made to the Kubernetes API, by kind.
    pub api_writes: Family<KindLabels, Counter>,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_seconds: Family<ControllerLabels, Histogram>,
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// Recipients per run after expansion.
    pub fanout: Histogram,
    /// 1 while this replica leads (reconciles), else 0.
    pub leader: Gauge,
    /// TriggerRuns not finished yet.
    pub work_queue_depth: Gauge,
    /// Reconciles running now.
    pub reconciles_in_flight: Gauge,
    /// RecipientPages whose records runs hold in memory now: pages with
    /// recipients to go, and pages done with whose last records are not saved
    /// yet (each run holds at most a few of each).
    pub run_pages_held: Gauge,
    /// Objects herald cannot read (and skips), by kind.
    pub invalid_resources: Family<KindLabels, Gauge>,
    /// Objects in the watch indexes (Users, Objects, Tenants, Audiences, MemberSlices), by kind.
    pub cached_objects: Family<KindLabels, Gauge>,
    /// Messages not queued for the history store because its buffer was full
    /// (the archive writes them later, without their content).
    pub history_messages_dropped: Counter,
    /// Finished runs archived to the history store and removed from the cluster.
    pub runs_archived: Counter,
    /// Real-time feed sockets open on this replica.
    pub sockets_open: Gauge,
    /// Fair slot pools (`controller::fair`): waiters, slots held, and how
    /// long a slot took to come, per pool and namespace.
    pub slot_waiters: Family<SlotLabels, Gauge>,
    pub slots_in_use: Family<SlotLabels, Gauge>,
    pub slot_wait_seconds: Family<SlotLabels, Histogram>,
    /// The HTTP API's metrics.
    pub http: HttpMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("herald");
        let api_writes = Family::<KindLabels, Counter>::default();
        registry.register("api_writes", "Writes herald made to the Kubernetes API, by kind", api_writes.clone());
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register("reconciles", "Reconciles run, by controller", reconciles.clone());
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register("reconcile_errors", "Reconciles that failed, by controller and error", reconcile_errors.clone());
        let reconcile_seconds = Family::<ControllerLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 4.0, 10)));
        registry.register("reconcile_duration_seconds", "Reconcile duration, by controller", reconcile_seconds.clone());
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register("deliveries", "Deliveries, by channel type and outcome", deliveries.clone());
        let fanout = Histogram::new(exponential_buckets(1.0, 4.0, 10));
        registry.register("run_recipients", "Recipients per TriggerRun after expansion", fanout.clone());
        let http = HttpMetrics::register(&mut registry);
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica is the leader and reconciles", leader.clone());
        let work_queue_depth = Gauge::default();
        registry.register("work_queue_depth", "TriggerRuns not finished yet (pending, running or waiting)", work_queue_depth.clone());
        let reconciles_in_flight = Gauge::default();
        registry.register("reconciles_in_flight", "Reconciles running now", reconciles_in_flight.clone());
        let run_pages_held = Gauge::default();
        registry.register("run_pages_held", "RecipientPages whose records runs hold in memory (recipients to go, or last records not saved yet)", run_pages_held.clone());
        let invalid_resources = Family::<KindLabels, Gauge>::default();
        registry.register("invalid_resources", "Objects herald cannot read and skips, by kind (each has an Unreadable Event)", invalid_resources.clone());
        let cached_objects = Family::<KindLabels, Gauge>::default();
        registry.register("cached_objects", "Objects in herald's watch indexes, by kind (refreshed every 5 s)", cached_objects.clone());
        let history_messages_dropped = Counter::default();
        registry.register("history_messages_dropped", "Messages not queued for the history store because its buffer was full", history_messages_dropped.clone());
        let runs_archived = Counter::default();
        registry.register("runs_archived", "Finished runs archived to the history store", runs_archived.clone());
        let sockets_open = Gauge::default();
        registry.register("sockets_open", "Real-time feed sockets open on this replica (at most --max-sockets)", sockets_open.clone());
        let slot_waiters = Family::<SlotLabels, Gauge>::default();
        registry.register("slot_waiters", "Work waiting for a slot of a fairly shared pool (deliveries, reconciles), by pool and namespace", slot_waiters.clone());
        let slots_in_use = Family::<SlotLabels, Gauge>::default();
        registry.register("slots_in_use", "Slots of a fairly shared pool (deliveries, reconciles) held now, by pool and namespace", slots_in_use.clone());
        let slot_wait_seconds = Family::<SlotLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 4.0, 9)));
        registry.register("slot_wait_seconds", "Time work waited for a slot of a fairly shared pool, by pool and namespace", slot_wait_seconds.clone());
        Metrics {
            registry,
            slot_waiters,
            slots_in_use,
            slot_wait_seconds,
            sockets_open,
            history_messages_dropped,
            runs_archived,
            invalid_resources,
            cached_objects,
            leader,
            work_queue_depth,
            reconciles_in_flight,
            run_pages_held,
            api_writes,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            deliveries,
            fanout,
            http,
        }
    }
}

/// Counts one in a gauge while it lives: work that is dropped where it
/// stands (an aborted reconcile, a request whose client went away) does not
/// stay counted.
pub struct InFlight(Gauge);

impl InFlight {
    pub fn count(gauge: &Gauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Counts one API write of `kind`.
    pub fn write(&self, kind: &str) {
        self.api_writes.get_or_create(&KindLabels { kind: kind.to_string() }).inc();
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
