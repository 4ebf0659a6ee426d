//! Webhooks (`[[notify]]`): distribution's notification envelopes
//! (`application/vnd.docker.distribution.events.v1+json`) for pushes, deletes and pulls, sent
//! in order per endpoint from a bounded queue, each retried with exponential back-off. A full
//! queue drops the event (counted); a request never waits for a webhook.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{NotifyConfig, NotifyEvent};
use crate::error::SetupError;
use crate::metrics::Metrics;

pub const MEDIA_TYPE: &str = "application/vnd.docker.distribution.events.v1+json";

/// One event, as distribution writes it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: String,
    pub timestamp: String,
    pub action: &'static str,
    pub target: EventTarget,
    pub request: EventRequest,
    pub actor: Actor,
    pub source: Source,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventTarget {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub length: u64,
    pub repository: String,
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRequest {
    pub id: String,
    pub addr: String,
    pub host: String,
    pub method: String,
    pub useragent: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Actor {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub addr: String,
    #[serde(rename = "instanceID")]
    pub instance_id: String,
}

impl Event {
    pub fn action(a: NotifyEvent) -> &'static str {
        match a {
            NotifyEvent::Push => "push",
            NotifyEvent::Delete => "delete",
            NotifyEvent::Pull => "pull",
        }
    }
}

/// A random id (distribution uses UUIDs; any unique string does).
pub fn new_id() -> String {
    let v: u128 = rand::random();
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// Parses `Name: value` lines (blank lines and `#` comments skipped).
pub fn parse_header_lines(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: not `Name: value`", i + 1))?;
        let (name, value) = (name.trim(), value.trim());
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("line {}: {name:?} is not a header name", i + 1))?;
        http::HeaderValue::from_str(value)
            .map_err(|_| format!("line {}: the value is not a header value", i + 1))?;
        out.push((name.to_owned(), value.to_owned()));
    }
    Ok(out)
}

struct Endpoint {
    events: HashSet<NotifyEvent>,
    tx: mpsc::Sender<Event>,
    label: String,
}

/// Every configured webhook.
pub struct Notifier {
    endpoints: Vec<Endpoint>,
    metrics: std::sync::Arc<Metrics>,
    /// This instance, for `source`.
    pub source: Source,
}

impl Notifier {
    /// Builds the queues and starts one sender task per endpoint (on the current runtime).
    pub fn start(
        configs: &[NotifyConfig],
        metrics: std::sync::Arc<Metrics>,
        addr: String,
    ) -> Result<Notifier, SetupError> {
        let mut endpoints = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let mut headers = http::HeaderMap::new();
            let mut lines: Vec<(String, String)> = c
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if let Some(path) = &c.header_file {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| SetupError::file("notify.header_file", path, e))?;
                lines.extend(
                    parse_header_lines(&text)
                        .map_err(|e| SetupError::file("notify.header_file", path, e))?,
                );
            }
            for (k, v) in lines {
                let name = http::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|e| SetupError::new("notify.headers", e))?;
                let value = http::HeaderValue::from_str(&v)
                    .map_err(|e| SetupError::new("notify.headers", e))?;
                headers.insert(name, value);
            }
            let client = reqwest::Client::builder()
                .timeout(c.timeout)
                .default_headers(headers)
                .build()
                .map_err(|e| SetupError::new("notify", e))?;
            // The label: the endpoint's host and port (no path, no credentials).
            let label = format!(
                "{}{}",
                c.url.host_str().unwrap_or("endpoint"),
                c.url.port().map(|p| format!(":{p}")).unwrap_or_default()
            );
            let label = if endpoints.iter().any(|e: &Endpoint| e.label == label) {
                format!("{label}#{i}")
            } else {
                label
            };
            let (tx, rx) = mpsc::channel(c.queue);
            tokio::spawn(deliver(
                client,
                c.url.clone(),
                c.retries,
                rx,
                metrics.clone(),
                label.clone(),
            ));
            for r in ["sent", "failed", "dropped"] {
                metrics
                    .notifications
                    .with_label_values(&[label.as_str(), r]);
            }
            metrics
                .notification_queue
                .with_label_values(&[label.as_str()])
                .set(0);
            endpoints.push(Endpoint {
                events: c.events.iter().copied().collect(),
                tx,
                label,
            });
        }
        Ok(Notifier {
            endpoints,
            metrics,
            source: Source {
                addr,
                instance_id: new_id(),
            },
        })
    }

    /// Whether any endpoint wants events of this kind (so callers build none in vain).
    pub fn wants(&self, kind: NotifyEvent) -> bool {
        self.endpoints.iter().any(|e| e.events.contains(&kind))
    }

    /// Queues an event for every endpoint that wants it; never waits.
    pub fn emit(&self, kind: NotifyEvent, event: Event) {
        for e in self.endpoints.iter().filter(|e| e.events.contains(&kind)) {
            match e.tx.try_send(event.clone()) {
                Ok(()) => {
                    self.metrics
                        .notification_queue
                        .with_label_values(&[e.label.as_str()])
                        .inc();
                }
                Err(_) => {
                    self.metrics
                        .notifications
                        .with_label_values(&[e.label.as_str(), "dropped"])
                        .inc();
                    tracing::warn!(endpoint = %e.label, "webhook queue is full: event dropped");
                }
            }
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    events: [&'a Event; 1],
}

/// Sends one endpoint's events in order, each until it is accepted (2xx) or its retries are
/// spent.
async fn deliver(
    client: reqwest::Client,
    url: url::Url,
    retries: u32,
    mut rx: mpsc::Receiver<Event>,
    metrics: std::sync::Arc<Metrics>,
    label: String,
) {
    while let Some(event) = rx.recv().await {
        metrics
            .notification_queue
            .with_label_values(&[label.as_str()])
            .dec();
        let body = match serde_json::to_vec(&Envelope { events: [&event] }) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let mut delay = Duration::from_millis(200);
        let mut sent = false;
        for attempt in 0..=retries {
            let r = client
                .post(url.clone())
                .header(http::header::CONTENT_TYPE, MEDIA_TYPE)
                .body(body.clone())
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() => {
                    sent = true;
                    break;
                }
                Ok(resp) => {
                    tracing::warn!(endpoint = %label, status = resp.status().as_u16(), attempt, "webhook refused an event");
                }
                Err(e) => {
                    tracing::warn!(endpoint = %label, error = %e, attempt, "webhook delivery failed");
                }
            }
            if attempt < retries {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
        let result = if sent { "sent" } else { "failed" };
        metrics
            .notifications
            .with_label_values(&[label.as_str(), result])
            .inc();
    }
}
