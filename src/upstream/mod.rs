//! The upstream client: one [`Upstream`] per configured registry, speaking the distribution API
//! to its endpoints with authentication, failover, timeouts and bounded retries. It never
//! touches the cache; the mirror decides what to fetch and what to keep.

pub mod auth;
mod endpoints;
pub mod policy;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use reqwest::Url;

use crate::config::{EndpointConfig, RegistryConfig, Secret};
use crate::error::SetupError;
use crate::metrics::{Metrics, UpstreamFailure};
use crate::oci::{Digest, RepoName, Tag};
use auth::{Challenge, TokenCache, TokenResponse, parse_challenge, realm_gets_credentials};
use endpoints::{Endpoint, Endpoints};
use policy::{GuardedResolver, OutboundPolicy};

/// The pause before the one retry of a request no endpoint answered.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long a fetch waits for the upstream budget before it is refused with 429.
const BUDGET_WAIT: Duration = Duration::from_secs(5);
/// Redirects followed for one request (Docker Hub uses one, to its CDN).
const MAX_REDIRECTS: usize = 5;
/// The largest token response accepted.
const MAX_TOKEN_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// Upstream answered, but not with success.
    #[error("upstream answered {status}")]
    Status {
        status: StatusCode,
        retry_after: Option<u64>,
    },
    /// No endpoint answered: connection refused, reset.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// An endpoint did not answer in time (connect or read timeout): it is marked down, and
    /// the request is not sent to it again.
    #[error("upstream timed out: {0}")]
    TimedOut(String),
    /// Every endpoint is marked down (it timed out, refused, or answered 5xx, and the probes
    /// have not seen it back): a revalidation is not sent, a fetch waited at most
    /// `connect_timeout` for an answer. `retry_after`: seconds until one may be tried again.
    #[error("every upstream endpoint is down")]
    Down { retry_after: u64 },
    /// Upstream answered with something unusable (bad token response, oversized manifest…).
    #[error("upstream sent an invalid answer: {0}")]
    Invalid(String),
    /// berth's own budget for this upstream is spent (or Docker Hub's rate limit is low):
    /// the request was not sent.
    #[error("upstream request budget exhausted")]
    Budget { retry_after: u64 },
}

/// The configured endpoint (its base URL) that answered a response, kept in the response's
/// extensions: the label of its metrics, whatever URL a redirect led to.
#[derive(Clone)]
struct AnsweredBy(String);

/// The configured endpoint that answered `resp` ("" for a response berth did not send).
pub(crate) fn endpoint_of(resp: &reqwest::Response) -> String {
    resp.extensions()
        .get::<AnsweredBy>()
        .map(|a| a.0.clone())
        .unwrap_or_default()
}

/// The kind of failure of a request or body read that got no (complete) answer.
pub(crate) fn failure_kind(e: &reqwest::Error) -> UpstreamFailure {
    if e.is_timeout() {
        UpstreamFailure::Timeout
    } else if e.is_connect() {
        UpstreamFailure::Connect
    } else {
        UpstreamFailure::Reset
    }
}

/// Whether a request may wait for the upstream budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Urgency {
    /// Fetching something not cached: wait a little for the budget, then give up (429).
    Fetch,
    /// Revalidating a cached tag: only when budget and rate limit allow; else serve cached.
    Revalidate,
}

/// What a request asks of a repository upstream (the path under `/v2/<repository>/`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum UpstreamPath<'a> {
    /// `manifests/<tag>`
    ManifestTag(&'a Tag),
    /// `manifests/<digest>`
    ManifestDigest(&'a Digest),
    /// `blobs/<digest>`
    Blob(&'a Digest),
    /// `referrers/<digest>` (OCI 1.1).
    Referrers(&'a Digest),
    /// `tags/list`, with the client's `n` and `last` passed on.
    Tags {
        n: Option<u32>,
        last: Option<&'a str>,
    },
}

impl UpstreamPath<'_> {
    /// The URL at endpoint `base` for `repo`; `ns` (a pull-through mirror endpoint's
    /// namespace) is added to the query.
    fn url(self, base: &str, repo: &RepoName, ns: Option<&str>) -> String {
        let mut url = match self {
            UpstreamPath::ManifestTag(t) => format!("{base}/v2/{repo}/manifests/{t}"),
            UpstreamPath::ManifestDigest(d) => format!("{base}/v2/{repo}/manifests/{d}"),
            UpstreamPath::Blob(d) => format!("{base}/v2/{repo}/blobs/{d}"),
            UpstreamPath::Referrers(d) => format!("{base}/v2/{repo}/referrers/{d}"),
            UpstreamPath::Tags { .. } => format!("{base}/v2/{repo}/tags/list"),
        };
        let (n, last) = match self {
            UpstreamPath::Tags { n, last } => (n, last),
            _ => (None, None),
        };
        let query = [
            ("n", n.map(|n| n.to_string())),
            ("last", last.map(str::to_owned)),
            ("ns", ns.map(str::to_owned)),
        ];
        let mut sep = '?';
        for (key, value) in query {
            if let Some(value) = value {
                url.push(sep);
                url.push_str(key);
                url.push('=');
                url.push_str(&value);
                sep = '&';
            }
        }
        url
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let repo: RepoName = "library/app".parse().unwrap();
        let tag: Tag = "v1.2".parse().unwrap();
        let digest = Digest::sha256_of(b"x");
        let base = "http://127.0.0.1:5000";
        let url = |p: UpstreamPath<'_>, ns| p.url(base, &repo, ns);
        let cases = [
            (
                url(UpstreamPath::ManifestTag(&tag), None),
                format!("{base}/v2/library/app/manifests/v1.2"),
            ),
            (
                url(UpstreamPath::ManifestDigest(&digest), Some("docker.io")),
                format!("{base}/v2/library/app/manifests/{digest}?ns=docker.io"),
            ),
            (
                url(UpstreamPath::Blob(&digest), None),
                format!("{base}/v2/library/app/blobs/{digest}"),
            ),
            (
                url(
                    UpstreamPath::Tags {
                        n: None,
                        last: None,
                    },
                    None,
                ),
                format!("{base}/v2/library/app/tags/list"),
            ),
            (
                url(
                    UpstreamPath::Tags {
                        n: Some(10),
                        last: Some("v1"),
                    },
                    Some("docker.io"),
                ),
                format!("{base}/v2/library/app/tags/list?n=10&last=v1&ns=docker.io"),
            ),
            (
                url(
                    UpstreamPath::Tags {
                        n: None,
                        last: Some("v1"),
                    },
                    None,
                ),
                format!("{base}/v2/library/app/tags/list?last=v1"),
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}

#[derive(Debug, Clone)]
enum AuthMode {
    /// Not asked yet, or no authentication needed.
    None,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

pub(crate) struct Upstream {
    pub name: String,
    endpoints: Endpoints,
    username: Option<String>,
    password: Option<Secret>,
    tokens: TokenCache,
    metrics: Arc<Metrics>,
    ratelimit_remaining: AtomicI64,
    budget: Option<governor::DefaultDirectRateLimiter>,
    ratelimit_floor: Option<u64>,
    ratelimit_pause: Duration,
    /// Revalidation is paused until then, because `ratelimit-remaining` fell below the floor.
    paused_until: Mutex<Option<Instant>>,
    probe_interval: Duration,
    /// Longest wait for a tag revalidation before the cached answer is served.
    pub revalidate_timeout: Duration,
    /// Where an upstream may send berth (redirects, token realms).
    outbound: Arc<OutboundPolicy>,
}

/// Whether the host and port of `base` (a configured endpoint) accept a TCP connection within
/// `timeout`. A URL berth cannot take apart counts as accepting (the HTTP probe decides then).
async fn accepts_connections(base: &str, timeout: Duration) -> bool {
    let Ok(url) = Url::parse(base) else {
        return true;
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return true;
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    matches!(
        tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port))
        )
        .await,
        Ok(Ok(_))
    )
}

impl Upstream {
    pub(crate) fn new(
        cfg: &RegistryConfig,
        metrics: Arc<Metrics>,
        outbound: Arc<OutboundPolicy>,
    ) -> Result<Upstream, SetupError> {
        let password = cfg
            .password()
            .map_err(|e| SetupError::new("registry.password", e))?;
        let policy = || {
            let outbound = outbound.clone();
            reqwest::redirect::Policy::custom(move |attempt| redirect(attempt, &outbound))
        };
        let extra_roots = match &cfg.ca_file {
            Some(path) => {
                let ca_error = |e: Box<dyn std::error::Error + Send + Sync>| {
                    SetupError::file(
                        "registry.ca_file",
                        path,
                        format!("registry {}: {e}", cfg.name),
                    )
                };
                let pem = std::fs::read(path).map_err(|e| ca_error(e.into()))?;
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_error(e.into()))?
            }
            None => Vec::new(),
        };
        if cfg.insecure {
            tracing::warn!(registry = %cfg.name, "insecure = true: upstream TLS certificates are NOT verified; anyone on the path can serve this registry's content");
        }
        let client_for = |e: &EndpointConfig| {
            let mut b = reqwest::Client::builder()
                .connect_timeout(e.connect_timeout.unwrap_or(cfg.connect_timeout))
                .read_timeout(e.read_timeout.unwrap_or(cfg.read_timeout))
                .redirect(policy())
                .dns_resolver(GuardedResolver(outbound.clone()))
                .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
                .pool_idle_timeout(Duration::from_secs(60))
                .danger_accept_invalid_certs(cfg.insecure);
            for c in &extra_roots {
                b = b.add_root_certificate(c.clone());
            }
            b.build()
                .map_err(|e| SetupError::new("registry.endpoints", e))
        };
        let endpoints = Endpoints::new(cfg, client_for)?;
        for e in &endpoints.all {
            metrics
                .upstream_up
                .with_label_values(&[&cfg.name, &e.base])
                .set(1);
            metrics.add_endpoint(&cfg.name, &e.base);
        }
        let rate = cfg.max_requests_per_second;
        let budget = (rate > 0.0)
            .then(|| governor::Quota::with_period(Duration::from_secs_f64(1.0 / rate)))
            .flatten()
            .map(|quota| {
                // Default burst: one second's worth, at least one request.
                let default_burst = NonZeroU32::new(rate.ceil().min(u32::MAX as f64) as u32)
                    .unwrap_or(NonZeroU32::MIN);
                let burst = cfg.burst.and_then(NonZeroU32::new).unwrap_or(default_burst);
                governor::RateLimiter::direct(quota.allow_burst(burst))
            });
        Ok(Upstream {
            name: cfg.name.clone(),
            endpoints,
            username: cfg.username.clone(),
            password,
            tokens: TokenCache::default(),
            metrics,
            ratelimit_remaining: AtomicI64::new(-1),
            budget,
            ratelimit_floor: cfg.ratelimit_floor,
            ratelimit_pause: cfg.ratelimit_pause,
            paused_until: Mutex::new(None),
            probe_interval: cfg.probe_interval,
            revalidate_timeout: cfg.revalidate_timeout,
            outbound,
        })
    }

    /// Probes each endpoint's `/v2/` every `probe_interval`, so a dead endpoint is skipped
    /// before a request has to fail on it, and a recovered one is used again.
    pub(crate) fn spawn_probes(self: &Arc<Self>) {
        if self.probe_interval.is_zero() {
            return;
        }
        let weak: Weak<Upstream> = Arc::downgrade(self);
        let interval = self.probe_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(up) = weak.upgrade() else { return };
                // With one endpoint there is nothing to choose between: while it is up, only
                // check that it still accepts connections (no request, so no traffic in the
                // origin's logs or quota); the HTTP probe runs while it is marked down.
                let choice = up.endpoints.all.len() > 1;
                for ep in up.endpoints.all.iter().filter(|e| !choice && !e.is_down()) {
                    let timeout = interval.min(ep.connect_timeout);
                    if !accepts_connections(&ep.base, timeout).await {
                        up.mark(ep, false);
                    }
                }
                for ep in up.endpoints.all.iter().filter(|e| choice || e.is_down()) {
                    let probe = ep
                        .client
                        .get(format!("{}/v2/", ep.base))
                        .timeout(interval.min(Duration::from_secs(10)))
                        .send()
                        .await;
                    // 200 and 401 both mean a live registry.
                    let healthy = probe.is_ok_and(|r| !r.status().is_server_error());
                    up.mark(ep, healthy);
                }
            }
        });
    }

    /// Whether a revalidation may be sent now: not while Docker Hub's remaining pulls are
    /// under the configured floor (until the pause passes).
    fn revalidation_paused(&self) -> bool {
        self.paused_until.lock().is_some_and(|t| Instant::now() < t)
    }

    /// Takes one request from the budget: a fetch waits a little, a revalidation does not.
    async fn take_budget(&self, urgency: Urgency) -> Result<(), UpstreamError> {
        if urgency == Urgency::Revalidate && self.revalidation_paused() {
            return Err(UpstreamError::Budget { retry_after: 60 });
        }
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        match urgency {
            Urgency::Revalidate => budget
                .check()
                .map_err(|_| UpstreamError::Budget { retry_after: 1 }),
            Urgency::Fetch => tokio::time::timeout(BUDGET_WAIT, budget.until_ready())
                .await
                .map_err(|_| {
                    tracing::warn!(registry = %self.name, "upstream request budget exhausted: refusing a fetch");
                    UpstreamError::Budget { retry_after: 1 }
                }),
        }
    }

    /// Sends `method` for `path` of `repo` and returns a success response, trying endpoints in
    /// the order the registry's balancing and health give, failing over on connection errors
    /// and 5xx.
    pub(crate) async fn send(
        &self,
        method: Method,
        repo: &RepoName,
        path: UpstreamPath<'_>,
        accept: Option<&str>,
        urgency: Urgency,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_from(method, repo, path, accept, 0, urgency).await
    }

    /// `HEAD` of a blob of `repo`: whether upstream has it there, and its length.
    pub(crate) async fn head_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<reqwest::Response, UpstreamError> {
        let path = UpstreamPath::Blob(digest);
        self.send(Method::HEAD, repo, path, None, Urgency::Fetch)
            .await
    }

    /// Like [`send`](Upstream::send), asking for the body from byte `from` on (a `Range`
    /// request when `from > 0`; the answer may still be the whole body, status 200).
    pub(crate) async fn send_from(
        &self,
        method: Method,
        repo: &RepoName,
        path: UpstreamPath<'_>,
        accept: Option<&str>,
        from: u64,
        urgency: Urgency,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_ordered(method, repo, path, accept, from, urgency, None)
            .await
    }

    /// A GET of the rest of a blob, from byte `from` on, for a fill whose stream from the
    /// endpoint `broke` broke: the registry's other endpoints are asked first, that one last
    /// (with one endpoint: that one again).
    pub(crate) async fn resume_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: u64,
        broke: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let path = UpstreamPath::Blob(digest);
        self.send_ordered(
            Method::GET,
            repo,
            path,
            None,
            from,
            Urgency::Fetch,
            Some(broke),
        )
        .await
    }

    /// Counts and logs a failure of an upstream request or body at `endpoint` (a configured
    /// endpoint's base).
    pub(crate) fn record_failure(&self, endpoint: &str, kind: UpstreamFailure, detail: &str) {
        self.metrics
            .record_upstream_failure(&self.name, endpoint, kind);
        tracing::warn!(registry = %self.name, endpoint, kind = kind.as_str(), error = detail, "upstream failure");
    }

    /// Reads a whole (small) body as [`read_limited`] does, counting a failure (a body over
    /// the limit, one that broke off) against the endpoint that answered.
    pub(crate) async fn read_body(
        &self,
        resp: reqwest::Response,
        limit: usize,
    ) -> Result<bytes::Bytes, UpstreamError> {
        let endpoint = endpoint_of(&resp);
        read_limited(resp, limit).await.inspect_err(|e| {
            let kind = match e {
                UpstreamError::TimedOut(_) => UpstreamFailure::Timeout,
                UpstreamError::Unreachable(_) => UpstreamFailure::Reset,
                _ => UpstreamFailure::BadBody,
            };
            self.record_failure(&endpoint, kind, &e.to_string());
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_ordered(
        &self,
        method: Method,
        repo: &RepoName,
        path: UpstreamPath<'_>,
        accept: Option<&str>,
        from: u64,
        urgency: Urgency,
        last: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.take_budget(urgency).await?;
        let scope = format!("repository:{repo}:pull");
        // Hash blobs on their digest, everything else on the repository.
        let blob_key = match path {
            UpstreamPath::Blob(d) => Some(d.to_string()),
            _ => None,
        };
        let key = blob_key.as_deref().unwrap_or(repo.as_str());
        let mut last_err = UpstreamError::Unreachable("no endpoint".into());
        // Whether every endpoint was down before this request tried any: then a failure is
        // answered as such (503 with Retry-After), not as this request's own.
        let mut down_before = false;
        // Every endpoint once; when they all failed to connect (not timed out), once more
        // after a short pause (a restarting registry, a dropped connection from the pool).
        for attempt in 0..2 {
            if attempt > 0 {
                if !matches!(last_err, UpstreamError::Unreachable(_)) {
                    break;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            let mut order = self.endpoints.order(Some(repo.as_str()), key);
            if let Some(i) = last.and_then(|l| order.iter().position(|e| e.base == l)) {
                let broke = order.remove(i);
                order.push(broke);
            }
            // Every endpoint marked down: a revalidation is not sent (the cached answer is
            // served at once); a fetch tries them still (one may be back before the probes
            // notice), but waits at most `connect_timeout` for an answer.
            let all_down = order.iter().all(|e| e.is_down());
            down_before |= attempt == 0 && all_down;
            if all_down && urgency == Urgency::Revalidate {
                return Err(self.down_error());
            }
            let bound = order
                .first()
                .filter(|_| all_down)
                .map(|e| tokio::time::Instant::now() + e.connect_timeout);
            for ep in order {
                let _in_flight = ep.start();
                // A pull-through mirror endpoint serves several registries: `ns` names ours.
                let ns = ep.mirror.then_some(self.name.as_str());
                let url = path.url(&ep.base, repo, ns);
                let sent = self.send_to(ep, &method, &url, Some(&scope), accept, from);
                let answer = match bound {
                    None => sent.await,
                    Some(deadline) => match tokio::time::timeout_at(deadline, sent).await {
                        // Still down (it may time out on its own first).
                        Ok(Err(UpstreamError::Unreachable(_) | UpstreamError::TimedOut(_)))
                            if down_before =>
                        {
                            Err(self.down_error())
                        }
                        Ok(answer) => answer,
                        Err(_) => {
                            self.mark(ep, false);
                            self.metrics.record_upstream_failure(
                                &self.name,
                                &ep.base,
                                UpstreamFailure::Timeout,
                            );
                            tracing::warn!(registry = %self.name, endpoint = %ep.base, kind = "timeout", "endpoint is down and did not answer within connect_timeout");
                            Err(self.down_error())
                        }
                    },
                };
                match answer {
                    Ok(resp) => return Ok(resp),
                    Err(e @ UpstreamError::Status { status, .. }) if !status.is_server_error() => {
                        return Err(e);
                    }
                    Err(e) => last_err = e,
                }
            }
        }
        Err(last_err)
    }

    async fn send_to(
        &self,
        ep: &Endpoint,
        method: &Method,
        url: &str,
        scope: Option<&str>,
        accept: Option<&str>,
        from: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        let label = ep.base.as_str();
        let mut authorized_retry = false;
        loop {
            let mut req = ep.client.request(method.clone(), url);
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a);
            }
            if from > 0 {
                req = req.header(header::RANGE, format!("bytes={from}-"));
            }
            let sent_auth = self.auth_header(ep, scope);
            if let Some(value) = &sent_auth {
                req = req.header(header::AUTHORIZATION, value.clone());
            }
            let started = Instant::now();
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if e.is_redirect() => {
                    // The endpoint answered; where it pointed is refused by policy.
                    tracing::warn!(registry = %self.name, endpoint = label, error = %error_chain(&e), "upstream redirect refused");
                    return Err(UpstreamError::Invalid(error_chain(&e)));
                }
                Err(e) => {
                    self.metrics.record_upstream(
                        &self.name,
                        label,
                        method.as_str(),
                        None,
                        started.elapsed().as_secs_f64(),
                    );
                    // Refused, reset or timed out: down until a probe or the cool-down says
                    // otherwise, so the next requests do not wait on it too.
                    self.mark(ep, false);
                    self.record_failure(label, failure_kind(&e), &error_chain(&e));
                    return Err(if e.is_timeout() {
                        UpstreamError::TimedOut(error_chain(&e))
                    } else {
                        UpstreamError::Unreachable(error_chain(&e))
                    });
                }
            };
            let status = resp.status();
            self.metrics.record_upstream(
                &self.name,
                label,
                method.as_str(),
                Some(status.as_u16()),
                started.elapsed().as_secs_f64(),
            );
            self.read_ratelimit(resp.headers());
            if status == StatusCode::UNAUTHORIZED && !authorized_retry {
                authorized_retry = true;
                // A token refused in the middle of a pull (expired early, revoked): unless
                // another request has fetched a new one meanwhile, it is dropped and a new one
                // fetched; the request is sent once more either way.
                if sent_auth.is_some() {
                    let now = self.auth_header(ep, scope);
                    if now.is_some() && now != sent_auth {
                        continue;
                    }
                    tracing::info!(registry = %self.name, endpoint = label, "upstream refused berth's credentials (an expired token?): asking for a new token");
                    self.drop_token(ep, scope);
                }
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                if self.answer_challenge(ep, challenge, scope).await? {
                    continue;
                }
            }
            if status.is_success() {
                self.mark(ep, true);
                let mut resp = resp;
                resp.extensions_mut().insert(AnsweredBy(ep.base.clone()));
                return Ok(resp);
            }
            if status.is_server_error() {
                self.mark(ep, false);
                self.record_failure(label, UpstreamFailure::Status5xx, status.as_str());
            } else {
                self.mark(ep, true);
                if status == StatusCode::TOO_MANY_REQUESTS {
                    self.record_failure(label, UpstreamFailure::Status429, status.as_str());
                }
            }
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            return Err(UpstreamError::Status {
                status,
                retry_after,
            });
        }
    }

    /// The error for a request not sent (or not answered) because every endpoint is down,
    /// with the seconds until the soonest is tried again.
    fn down_error(&self) -> UpstreamError {
        let soonest = self
            .endpoints
            .all
            .iter()
            .filter_map(Endpoint::down_for)
            .min()
            .unwrap_or(Duration::from_secs(1));
        UpstreamError::Down {
            retry_after: soonest.as_secs_f64().ceil().max(1.0) as u64,
        }
    }

    fn mark(&self, ep: &Endpoint, healthy: bool) {
        if ep.mark(healthy) {
            if healthy {
                tracing::info!(registry = %self.name, endpoint = %ep.base, "endpoint is up again");
            } else {
                tracing::warn!(registry = %self.name, endpoint = %ep.base, "endpoint is down: skipping it for a while");
            }
        }
        self.metrics
            .upstream_up
            .with_label_values(&[&self.name, &ep.base])
            .set(i64::from(healthy));
    }

    /// Drops the cached bearer token `ep` would send for `scope`.
    fn drop_token(&self, ep: &Endpoint, scope: Option<&str>) {
        let mode = ep.auth.lock().clone();
        if let AuthMode::Bearer { realm, service } = mode {
            self.tokens
                .remove(&realm, service.as_deref(), scope.unwrap_or(""));
        }
    }

    fn basic_value(&self) -> Option<HeaderValue> {
        use base64::Engine as _;
        let (user, pass) = (self.username.as_ref()?, self.password.as_ref()?);
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", pass.expose()));
        let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    fn auth_header(&self, ep: &Endpoint, scope: Option<&str>) -> Option<HeaderValue> {
        let mode = ep.auth.lock().clone();
        match mode {
            AuthMode::None => None,
            AuthMode::Basic => self.basic_value(),
            AuthMode::Bearer { realm, service } => {
                let token = self
                    .tokens
                    .get(&realm, service.as_deref(), scope.unwrap_or(""))?;
                let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
                v.set_sensitive(true);
                Some(v)
            }
        }
    }

    /// Handles a 401: remembers the scheme and, for Bearer, fetches a token. Returns whether
    /// the request should be sent again.
    async fn answer_challenge(
        &self,
        ep: &Endpoint,
        challenge: Option<Challenge>,
        scope: Option<&str>,
    ) -> Result<bool, UpstreamError> {
        match challenge {
            Some(Challenge::Basic) => {
                {
                    let mut m = ep.auth.lock();
                    *m = AuthMode::Basic;
                }
                Ok(self.basic_value().is_some())
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope: challenge_scope,
            }) => {
                let scope = scope
                    .map(str::to_owned)
                    .or(challenge_scope)
                    .unwrap_or_default();
                let token = self
                    .fetch_token(ep, &realm, service.as_deref(), &scope)
                    .await?;
                self.tokens
                    .put(&realm, service.as_deref(), &scope, token.0, token.1);
                {
                    let mut m = ep.auth.lock();
                    *m = AuthMode::Bearer { realm, service };
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(String, Duration), UpstreamError> {
        let mut url = Url::parse(realm)
            .map_err(|e| UpstreamError::Invalid(format!("token realm {realm:?}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            if !scope.is_empty() {
                q.append_pair("scope", scope);
            }
        }
        if let Err(e) = self.outbound.check_url(&url) {
            tracing::warn!(registry = %self.name, endpoint = %ep.base, realm, error = %e, "token realm refused");
            return Err(UpstreamError::Invalid(format!(
                "token realm {realm:?} refused: {e}"
            )));
        }
        let mut req = ep.client.get(url.clone());
        if realm_gets_credentials(&ep.base, &url) {
            if let Some(v) = self.basic_value() {
                req = req.header(header::AUTHORIZATION, v);
            }
        } else if self.username.is_some() {
            tracing::warn!(registry = %self.name, realm, "token realm is outside the registry's domain or scheme: asking for an anonymous token");
        }
        let started = Instant::now();
        let resp = req.send().await.map_err(|e| {
            self.record_failure(
                &ep.base,
                failure_kind(&e),
                &format!("token endpoint: {}", error_chain(&e)),
            );
            UpstreamError::Unreachable(format!("token endpoint: {}", error_chain(&e)))
        })?;
        self.metrics.record_upstream(
            &self.name,
            "token",
            "GET",
            Some(resp.status().as_u16()),
            started.elapsed().as_secs_f64(),
        );
        if !resp.status().is_success() {
            let status = resp.status();
            if status.is_server_error() {
                self.record_failure(
                    &ep.base,
                    UpstreamFailure::Status5xx,
                    &format!("token endpoint answered {status}"),
                );
            } else if status == StatusCode::TOO_MANY_REQUESTS {
                self.record_failure(
                    &ep.base,
                    UpstreamFailure::Status429,
                    &format!("token endpoint answered {status}"),
                );
            }
            return Err(UpstreamError::Status {
                status: if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                    resp.status()
                } else {
                    StatusCode::UNAUTHORIZED
                },
                retry_after: None,
            });
        }
        let bad = |e: UpstreamError| {
            let kind = match e {
                UpstreamError::Invalid(_) => UpstreamFailure::BadBody,
                _ => UpstreamFailure::Reset,
            };
            self.record_failure(&ep.base, kind, &format!("token endpoint: {e}"));
            e
        };
        let body = read_limited(resp, MAX_TOKEN_BYTES).await.map_err(bad)?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| bad(UpstreamError::Invalid(format!("token response: {e}"))))?;
        parsed
            .into_token()
            .ok_or_else(|| bad(UpstreamError::Invalid("token response has no token".into())))
    }

    fn read_ratelimit(&self, headers: &HeaderMap) {
        let Some(v) = headers
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        if let Ok(n) = v.split(';').next().unwrap_or("").trim().parse::<i64>() {
            self.ratelimit_remaining.store(n.max(0), Ordering::Relaxed);
            if let Some(floor) = self.ratelimit_floor
                && n < floor as i64
                && let mut p = self.paused_until.lock()
                && p.is_none_or(|t| Instant::now() >= t)
            {
                tracing::warn!(registry = %self.name, remaining = n, floor, pause = ?self.ratelimit_pause,
                    "upstream rate limit nearly spent: serving cached tags without revalidation");
                *p = Some(Instant::now() + self.ratelimit_pause);
            }
            self.metrics
                .upstream_ratelimit_remaining
                .with_label_values(&[&self.name])
                .set(n);
        }
    }
}

/// Reads a whole (small) body, refusing more than `limit` bytes whatever Content-Length says.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<bytes::Bytes, UpstreamError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(UpstreamError::Invalid(format!(
            "body of {} bytes is over the {limit} byte limit",
            resp.content_length().unwrap_or(0)
        )));
    }
    let mut buf = bytes::BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(UpstreamError::Invalid(format!(
                        "body is over the {limit} byte limit"
                    )));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) if e.is_timeout() => return Err(UpstreamError::TimedOut(error_chain(&e))),
            Err(e) => return Err(UpstreamError::Unreachable(error_chain(&e))),
        }
    }
}

/// The error with its causes, for logs ("error sending request: connection refused").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// The redirect policy: a few hops, to places the outbound policy allows.
fn redirect(
    attempt: reqwest::redirect::Attempt,
    outbound: &OutboundPolicy,
) -> reqwest::redirect::Action {
    if attempt.previous().len() >= MAX_REDIRECTS {
        return attempt.error("too many redirects");
    }
    match outbound.check_url(attempt.url()) {
        // reqwest drops Authorization when a redirect leaves the original scheme/host/port.
        Ok(()) => attempt.follow(),
        Err(e) => attempt.error(e),
    }
}
