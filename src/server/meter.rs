//! One request's record: started by the pipeline when a request arrives, fed by the transport
//! with the bytes it sends, written (metrics and the access log line) when dropped — sent,
//! failed or abandoned. Every label is an enum, so no client input becomes a label value.

use std::sync::Arc;
use std::time::Instant;

use super::request::{Method, RequestHead};
use crate::metrics::{CacheResult, Metrics, RequestKind};

pub struct Meter {
    metrics: Arc<Metrics>,
    started: Instant,
    method: Method,
    /// The request path (for the log line), set when the request is done with it.
    pub path: String,
    /// The request's query string (`ns=quay.io`), if any, for the log line.
    pub query: Option<String>,
    /// Why an error answer was given (its message), for the log line.
    pub reason: Option<String>,
    pub kind: RequestKind,
    /// The registry the request routed to, if it named a repository.
    pub registry: Option<Arc<str>>,
    /// Who made it, with `[auth]` ("-" without).
    pub user: Option<String>,
    pub status: u16,
    pub cache: Option<CacheResult>,
    pub bytes: u64,
    pub aborted: Option<String>,
}

impl Meter {
    pub fn start(metrics: Arc<Metrics>, req: &RequestHead) -> Meter {
        Meter {
            metrics,
            started: Instant::now(),
            method: req.method,
            path: String::new(),
            query: None,
            reason: None,
            kind: RequestKind::Other,
            registry: None,
            user: None,
            status: 0,
            cache: None,
            bytes: 0,
            aborted: None,
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let kind = self.kind.as_str();
        let method = self.method.as_str();
        let mut status = itoa::Buffer::new();
        let status = status.format(self.status);
        self.metrics
            .http_requests
            .with_label_values(&[kind, method, status])
            .inc();
        let secs = self.started.elapsed().as_secs_f64();
        self.metrics
            .http_duration
            .with_label_values(&[kind])
            .observe(secs);
        if let Some(c) = self.cache
            && self.bytes > 0
        {
            self.metrics
                .served_bytes
                .with_label_values(&[c.source().as_str()])
                .inc_by(self.bytes);
        }
        let cache = self.cache.map_or("-", CacheResult::as_str);
        let registry = self.registry.as_deref().unwrap_or("-");
        let user = self.user.as_deref().unwrap_or("-");
        let us = self.started.elapsed().as_micros() as u64;
        let query = self.query.as_deref().unwrap_or("-");
        match (&self.aborted, &self.reason) {
            (None, None) => tracing::info!(
                target: "berth::access",
                method, path = %self.path, query = %query, registry = %registry, user = %user,
                status = self.status, bytes = self.bytes, us, cache = %cache, "request"
            ),
            (None, Some(reason)) => tracing::info!(
                target: "berth::access",
                method, path = %self.path, query = %query, registry = %registry, user = %user,
                status = self.status, bytes = self.bytes, us, cache = %cache, reason = %reason,
                "request"
            ),
            (Some(e), _) => tracing::warn!(
                target: "berth::access",
                method, path = %self.path, query = %query, registry = %registry, user = %user,
                status = self.status, bytes = self.bytes, us, cache = %cache, error = %e,
                "request aborted"
            ),
        }
    }
}
