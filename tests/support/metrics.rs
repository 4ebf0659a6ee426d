//! Reading samples from berth's `/metrics` text (the Prometheus exposition format).

/// The value of the sample `series` (a metric name with its labels as berth writes them, e.g.
/// `berth_cache_requests_total{kind="blob",result="hit"}`), or `None` if it is not there.
pub fn try_sample(metrics: &str, series: &str) -> Option<f64> {
    let series = series.trim_end();
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Like [`try_sample`], with 0 for a sample that is not there.
pub fn sample(metrics: &str, series: &str) -> f64 {
    try_sample(metrics, series).unwrap_or(0.0)
}
