//! Every Prometheus metric berth exports, in one place. The names are a contract: dashboards and
//! alerts depend on them. Labels have bounded cardinality (no digests, no client addresses).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub cache_requests: IntCounterVec,
    pub served_bytes: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_bytes: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_up: IntGaugeVec,
    pub upstream_ratelimit_remaining: IntGaugeVec,
    pub fills_in_flight: IntGauge,
    pub fill_failures: IntCounterVec,
    pub fill_resumes: IntCounterVec,
    pub upstream_failures: IntCounterVec,
    pub cache_size_bytes: IntGauge,
    pub cache_max_size_bytes: IntGauge,
    pub cache_blobs: IntGauge,
    pub cache_pinned_bytes: IntGauge,
    pub cache_evictions: IntCounter,
    pub cache_evicted_bytes: IntCounter,
    /// Start-up scan time, for operators sizing a large cache.
    pub cache_scan_seconds: Histogram,
    pub object_store_requests: IntCounterVec,
    pub object_store_bytes: IntCounterVec,
    pub object_store_up: IntGauge,
    pub peer_requests: IntCounterVec,
    pub peers_up: IntGauge,
    pub hosted_bytes: IntGauge,
    pub hosted_blobs: IntGauge,
    pub notifications: IntCounterVec,
    pub notification_queue: IntGaugeVec,
}

/// An enum per label: `as_str` is the value exported, `ALL` every value (to create each series
/// at 0, so rates and alerts see the first event).
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $value:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value),+
                }
            }
        }
    };
}

label_values! {
    /// What a client's request was about, for the `kind` label.
    RequestKind {
        Ping => "ping",
        Manifest => "manifest",
        Blob => "blob",
        Tags => "tags",
        Catalog => "catalog",
        Referrers => "referrers",
        Push => "push",
        Delete => "delete",
        Other => "other",
    }
}

label_values! {
    /// How a manifest or blob request was answered, for `berth_cache_requests_total{result}`.
    CacheResult {
        Hit => "hit",
        Miss => "miss",
        Coalesced => "coalesced",
        Stale => "stale",
        Revalidated => "revalidated",
    }
}

impl CacheResult {
    /// Where the bytes of such an answer come from.
    pub fn source(self) -> ServedFrom {
        match self {
            CacheResult::Miss | CacheResult::Coalesced => ServedFrom::Upstream,
            _ => ServedFrom::Cache,
        }
    }
}

label_values! {
    /// Where served bytes came from, for `berth_served_bytes_total{source}`.
    ServedFrom {
        Cache => "cache",
        Upstream => "upstream",
    }
}

label_values! {
    /// Why a fill did not end in the cache, for `berth_fill_failures_total{reason}`.
    FillFailure {
        DigestMismatch => "digest_mismatch",
        UpstreamError => "upstream_error",
        Cancelled => "cancelled",
        Disk => "disk",
    }
}

label_values! {
    /// How one attempt to resume a fill whose stream broke ended, for
    /// `berth_fill_resumes_total{result}`: `ok`, the rest of the blob is on its way; `failed`,
    /// the request for it failed (the next attempt, if any, follows after a pause).
    ResumeResult {
        Ok => "ok",
        Failed => "failed",
    }
}

label_values! {
    /// What went wrong with an upstream request, for `berth_upstream_failures_total{kind}`:
    /// no connection; no answer (or no next byte of the body) within the timeout; the
    /// connection reset or closed early; a 5xx or a 429 answer; a body that is not what it
    /// should be (wrong digest or length, oversized, unparseable).
    UpstreamFailure {
        Connect => "connect",
        Timeout => "timeout",
        Reset => "reset",
        Status5xx => "status_5xx",
        Status429 => "status_429",
        BadBody => "bad_body",
    }
}

label_values! {
    /// A request to the shared object store, for `berth_object_store_requests_total{operation}`
    /// (`Multipart`: a large upload's start, completion or abandonment — each only where it is a
    /// request: Azure starts and abandons one without; `Part`: an S3 part, an Azure block or a
    /// GCS chunk other than the completing one; `List`: one listing, however many pages).
    StoreOp {
        Get => "get",
        Head => "head",
        Put => "put",
        Multipart => "multipart",
        Part => "part",
        Delete => "delete",
        List => "list",
    }
}

label_values! {
    /// How an object-store request ended, for `berth_object_store_requests_total{result}`.
    StoreResult {
        Ok => "ok",
        NotFound => "not_found",
        Error => "error",
    }
}

label_values! {
    /// Which way blob bytes went, for `berth_object_store_bytes_total{direction}`.
    StoreDirection {
        Read => "read",
        Written => "written",
    }
}

label_values! {
    /// How a blob request to the blob's owner among the peers ended, for
    /// `berth_peer_requests_total{result}` (`Resumed`: its stream broke and the rest came from
    /// elsewhere).
    PeerResult {
        Ok => "ok",
        Unreachable => "unreachable",
        Error => "error",
        Resumed => "resumed",
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is well-formed: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registered once: {e}"));
    c
}

/// A gauge not yet exported: see [`gauge`], or [`Metrics::enable_object_store`] and
/// [`Metrics::enable_cluster`] for the gauges of optional features (a 0 would read as "down").
fn unregistered_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = unregistered_gauge(name, help);
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registered once: {e}"));
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registered once: {e}"));
    g
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registered once: {e}"));
    h
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

impl Metrics {
    // The metric definitions are constants: a failure here is a programming error caught by
    // every test, never something a request can reach.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            r.register(Box::new(pc))
                .unwrap_or_else(|e| panic!("process collector registered once: {e}"));
        }
        let m = Metrics {
            http_requests: counter(
                &r,
                "berth_http_requests_total",
                "Requests answered on the registry listener.",
                &["kind", "method", "status"],
            ),
            http_duration: histogram(
                &r,
                "berth_http_request_duration_seconds",
                "Time from request to the end of the response body.",
                &["kind"],
                LATENCY_BUCKETS,
            ),
            cache_requests: counter(
                &r,
                "berth_cache_requests_total",
                "Manifest and blob requests by how the cache answered them.",
                &["kind", "result"],
            ),
            served_bytes: counter(
                &r,
                "berth_served_bytes_total",
                "Manifest and blob bytes sent to clients, by where they came from.",
                &["source"],
            ),
            upstream_requests: counter(
                &r,
                "berth_upstream_requests_total",
                "Requests sent upstream (status 0: no HTTP answer).",
                &["registry", "endpoint", "method", "status"],
            ),
            upstream_bytes: counter(
                &r,
                "berth_upstream_bytes_total",
                "Body bytes received from upstream.",
                &["registry"],
            ),
            upstream_duration: histogram(
                &r,
                "berth_upstream_request_duration_seconds",
                "Time until upstream answered with headers.",
                &["registry"],
                LATENCY_BUCKETS,
            ),
            upstream_up: gauge_vec(
                &r,
                "berth_upstream_up",
                "1 when the endpoint is considered healthy, 0 while it cools down.",
                &["registry", "endpoint"],
            ),
            upstream_ratelimit_remaining: gauge_vec(
                &r,
                "berth_upstream_ratelimit_remaining",
                "The last ratelimit-remaining value upstream sent.",
                &["registry"],
            ),
            fills_in_flight: gauge(&r, "berth_fills_in_flight", "Blob fills running now."),
            fill_failures: counter(
                &r,
                "berth_fill_failures_total",
                "Blob fills that did not end in the cache.",
                &["registry", "reason"],
            ),
            fill_resumes: counter(
                &r,
                "berth_fill_resumes_total",
                "Attempts to resume a blob fill whose stream broke, by how they ended.",
                &["registry", "result"],
            ),
            upstream_failures: counter(
                &r,
                "berth_upstream_failures_total",
                "Upstream requests and bodies that failed, by kind.",
                &["registry", "endpoint", "kind"],
            ),
            cache_size_bytes: gauge(&r, "berth_cache_size_bytes", "Bytes of blobs in the cache."),
            cache_max_size_bytes: gauge(
                &r,
                "berth_cache_max_size_bytes",
                "The configured cache.max_size.",
            ),
            cache_blobs: gauge(&r, "berth_cache_blobs", "Blobs in the cache."),
            cache_pinned_bytes: gauge(
                &r,
                "berth_cache_pinned_bytes",
                "Bytes of cached blobs that are pinned (never evicted; counted in berth_cache_size_bytes).",
            ),
            cache_evictions: IntCounter::new(
                "berth_cache_evictions_total",
                "Blobs evicted to stay under cache.max_size, or not pulled for cache.max_idle.",
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
            cache_evicted_bytes: IntCounter::new(
                "berth_cache_evicted_bytes_total",
                "Bytes of blobs evicted.",
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
            object_store_requests: counter(
                &r,
                "berth_object_store_requests_total",
                "Requests to the shared object store (result: ok, not_found, error).",
                &["operation", "result"],
            ),
            object_store_bytes: counter(
                &r,
                "berth_object_store_bytes_total",
                "Blob bytes read from and written to the shared object store.",
                &["direction"],
            ),
            object_store_up: unregistered_gauge(
                "berth_object_store_up",
                "1 while the shared object store answers, 0 while it is skipped after failures.",
            ),
            peer_requests: counter(
                &r,
                "berth_peer_requests_total",
                "Blob requests this replica sent to the blob's owner among its peers.",
                &["result"],
            ),
            peers_up: unregistered_gauge(
                "berth_cluster_peers_up",
                "Replicas (this one included) currently answering peer probes.",
            ),
            hosted_bytes: gauge(
                &r,
                "berth_hosted_bytes",
                "Bytes of blobs and manifests stored by the hosted registries.",
            ),
            hosted_blobs: gauge(
                &r,
                "berth_hosted_blobs",
                "Blobs and manifests stored by the hosted registries.",
            ),
            notifications: counter(
                &r,
                "berth_notifications_total",
                "Webhook events by endpoint and result (sent, failed after retries, dropped).",
                &["endpoint", "result"],
            ),
            notification_queue: gauge_vec(
                &r,
                "berth_notification_queue_length",
                "Events waiting to be sent to a webhook.",
                &["endpoint"],
            ),
            cache_scan_seconds: Histogram::with_opts(HistogramOpts::new(
                "berth_cache_scan_duration_seconds",
                "Time the start-up scan of the cache directory took.",
            ))
            .unwrap_or_else(|e| panic!("metric: {e}")),
            registry: r,
        };
        for c in [&m.cache_evictions, &m.cache_evicted_bytes] {
            m.registry
                .register(Box::new(c.clone()))
                .unwrap_or_else(|e| panic!("metric registered once: {e}"));
        }
        m.registry
            .register(Box::new(m.cache_scan_seconds.clone()))
            .unwrap_or_else(|e| panic!("metric registered once: {e}"));
        // Every series dashboards and alerts use exists from the start (at 0), so rates and
        // increase() see the first event.
        for &source in ServedFrom::ALL {
            m.served_bytes.with_label_values(&[source.as_str()]);
        }
        for kind in [RequestKind::Manifest, RequestKind::Blob] {
            for &result in CacheResult::ALL {
                m.cache_requests
                    .with_label_values(&[kind.as_str(), result.as_str()]);
            }
        }
        m
    }

    /// Creates a configured registry's fill-failure and fill-resume series at 0.
    pub fn add_registry(&self, registry: &str) {
        for &reason in FillFailure::ALL {
            self.fill_failures
                .with_label_values(&[registry, reason.as_str()]);
        }
        for &result in ResumeResult::ALL {
            self.fill_resumes
                .with_label_values(&[registry, result.as_str()]);
        }
    }

    /// Creates an endpoint's failure series at 0.
    pub fn add_endpoint(&self, registry: &str, endpoint: &str) {
        for &kind in UpstreamFailure::ALL {
            self.upstream_failures
                .with_label_values(&[registry, endpoint, kind.as_str()]);
        }
    }

    pub fn record_resume(&self, registry: &str, result: ResumeResult) {
        self.fill_resumes
            .with_label_values(&[registry, result.as_str()])
            .inc();
    }

    pub fn record_upstream_failure(&self, registry: &str, endpoint: &str, kind: UpstreamFailure) {
        self.upstream_failures
            .with_label_values(&[registry, endpoint, kind.as_str()])
            .inc();
    }

    pub fn record_cache(&self, kind: RequestKind, result: CacheResult) {
        self.cache_requests
            .with_label_values(&[kind.as_str(), result.as_str()])
            .inc();
    }

    /// One upstream request: `status` is the HTTP status it was answered with, `None` when no
    /// answer came (connection refused, reset, timed out), counted as `status="error"`.
    pub fn record_upstream(
        &self,
        registry: &str,
        endpoint: &str,
        method: &str,
        status: Option<u16>,
        seconds: f64,
    ) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.upstream_requests
            .with_label_values(&[registry, endpoint, method, &status])
            .inc();
        self.upstream_duration
            .with_label_values(&[registry])
            .observe(seconds);
    }

    /// Starts exporting the object-store metrics (a berth with `[cache.object_store]`): the
    /// gauge at 1 and every labelled series at 0, so rates and alerts see the first event.
    pub fn enable_object_store(&self) {
        self.export(&self.object_store_up);
        self.object_store_up.set(1);
        for &direction in StoreDirection::ALL {
            self.store_bytes(direction);
        }
        for &op in StoreOp::ALL {
            for &result in StoreResult::ALL {
                self.record_store(op, result, 0);
            }
        }
    }

    /// Starts exporting the cluster metrics (a berth with `[cluster]`), every series at 0.
    pub fn enable_cluster(&self) {
        self.export(&self.peers_up);
        for &result in PeerResult::ALL {
            self.peer_requests.with_label_values(&[result.as_str()]);
        }
    }

    /// Registers a feature's gauge; enabling a feature twice is harmless.
    fn export(&self, gauge: &IntGauge) {
        match self.registry.register(Box::new(gauge.clone())) {
            Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
            Err(e) => tracing::warn!(error = %e, "cannot export a feature metric"),
        }
    }

    pub fn record_store(&self, op: StoreOp, result: StoreResult, requests: u64) {
        self.object_store_requests
            .with_label_values(&[op.as_str(), result.as_str()])
            .inc_by(requests);
    }

    /// The byte counter of one direction (kept by a stream that counts as it goes).
    pub fn store_bytes(&self, direction: StoreDirection) -> IntCounter {
        self.object_store_bytes
            .with_label_values(&[direction.as_str()])
    }

    pub fn record_peer(&self, result: PeerResult) {
        self.peer_requests
            .with_label_values(&[result.as_str()])
            .inc();
    }

    pub fn record_fill_failure(&self, registry: &str, reason: FillFailure) {
        self.fill_failures
            .with_label_values(&[registry, reason.as_str()])
            .inc();
    }

    /// The current value of every counter and gauge series, gathered at once from the same
    /// registry `/metrics` renders (so a page built from it shows exactly what a scrape at
    /// that moment reads). Histograms and summaries are left out.
    pub fn snapshot(&self) -> Snapshot {
        let mut series = Vec::new();
        for family in self.registry.gather() {
            for m in family.get_metric() {
                let value = match family.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => m.get_counter().value(),
                    prometheus::proto::MetricType::GAUGE => m.get_gauge().value(),
                    _ => continue,
                };
                let labels = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_owned(), l.value().to_owned()))
                    .collect();
                series.push(Series {
                    name: family.name().to_owned(),
                    labels,
                    value,
                });
            }
        }
        Snapshot { series }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        buf
    }
}

/// One counter or gauge series: its name, labels and value.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Series {
    /// The value of label `name`, or "" (as Prometheus reads a missing label).
    pub fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Counter and gauge values read at one moment (see [`Metrics::snapshot`]).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    series: Vec<Series>,
}

impl Snapshot {
    /// Every series of the metric `name`.
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Series> + 'a {
        self.series.iter().filter(move |s| s.name == name)
    }

    /// The value of the series of `name` whose labels include all of `labels`, summed over
    /// the series that match (0 when none does).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series(name)
            .filter(|s| labels.iter().all(|(k, v)| s.label(k) == *v))
            .map(|s| s.value)
            .sum()
    }

    /// The value of the unlabelled (or only) series of `name`, if it is exported.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.series(name).next().map(|s| s.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn series_dashboards_use_exist_at_zero_from_the_start() {
        let m = Metrics::new();
        m.add_registry("docker.io");
        let t = text(&m);
        for line in [
            "berth_served_bytes_total{source=\"cache\"} 0",
            "berth_served_bytes_total{source=\"upstream\"} 0",
            "berth_cache_requests_total{kind=\"blob\",result=\"coalesced\"} 0",
            "berth_cache_requests_total{kind=\"manifest\",result=\"revalidated\"} 0",
            "berth_fill_failures_total{reason=\"digest_mismatch\",registry=\"docker.io\"} 0",
            "berth_fill_failures_total{reason=\"disk\",registry=\"docker.io\"} 0",
        ] {
            assert!(t.contains(line), "{line} missing from\n{t}");
        }
    }

    #[test]
    fn a_snapshot_reads_what_the_text_format_says() {
        let m = Metrics::new();
        m.add_registry("docker.io");
        m.record_cache(RequestKind::Blob, CacheResult::Hit);
        m.record_cache(RequestKind::Blob, CacheResult::Hit);
        m.record_cache(RequestKind::Manifest, CacheResult::Miss);
        m.cache_size_bytes.set(1234);
        m.upstream_up
            .with_label_values(&["docker.io", "https://a.example"])
            .set(1);
        let s = m.snapshot();
        assert_eq!(s.get("berth_cache_size_bytes"), Some(1234.0));
        assert_eq!(
            s.sum(
                "berth_cache_requests_total",
                &[("kind", "blob"), ("result", "hit")]
            ),
            2.0
        );
        assert_eq!(s.sum("berth_cache_requests_total", &[]), 3.0);
        let up: Vec<_> = s.series("berth_upstream_up").collect();
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].label("endpoint"), "https://a.example");
        assert_eq!(s.get("berth_cache_scan_duration_seconds"), None);
        assert!(
            text(&m).contains("berth_cache_size_bytes 1234\n"),
            "the text format disagrees"
        );
    }

    #[test]
    fn feature_metrics_are_exported_only_once_the_feature_is_enabled() {
        let m = Metrics::new();
        let before = text(&m);
        for name in [
            "berth_object_store_up",
            "berth_object_store_bytes_total",
            "berth_object_store_requests_total",
            "berth_cluster_peers_up",
            "berth_peer_requests_total",
        ] {
            assert!(
                !before.contains(name),
                "{name} exported without its feature"
            );
        }

        m.enable_object_store();
        m.enable_object_store();
        m.enable_cluster();
        let after = text(&m);
        assert!(after.contains("\nberth_object_store_up 1\n"), "{after}");
        assert!(after.contains("berth_object_store_bytes_total{direction=\"written\"} 0"));
        assert!(after.contains("berth_object_store_bytes_total{direction=\"read\"} 0"));
        assert!(
            after.contains(
                "berth_object_store_requests_total{operation=\"part\",result=\"error\"} 0"
            )
        );
        assert!(after.contains("\nberth_cluster_peers_up 0\n"), "{after}");
        assert!(after.contains("berth_peer_requests_total{result=\"resumed\"} 0"));
    }
}
