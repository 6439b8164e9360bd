//! Prometheus metrics, served at /metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
        let reconcile_seconds =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 4.0, 10)));
        registry.register("reconcile_duration_seconds", "Reconcile duration, by controller", reconcile_seconds.clone());
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register("deliveries", "Deliveries, by channel type and outcome", deliveries.clone());
        let fanout = Histogram::new(exponential_buckets(1.0, 4.0, 10));
        registry.register("run_recipients", "Recipients per TriggerRun after expansion", fanout.clone());
        Metrics { registry, api_writes, reconciles, reconcile_errors, reconcile_seconds, deliveries, fanout }
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
