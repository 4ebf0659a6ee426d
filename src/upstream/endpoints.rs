//! Endpoints and how a request picks them: per-repository pools, balancing (round-robin,
//! least-requests, rendezvous hashing), passive health with a cool-down, active `/v2/`
//! probes, and fallbacks used only when every primary endpoint is down.

use parking_lot::Mutex;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Balance, EndpointConfig, RegistryConfig};
use crate::error::SetupError;

/// How long an endpoint that failed is skipped before it is tried again.
pub(crate) const COOL_DOWN: Duration = Duration::from_secs(10);

pub(crate) struct Endpoint {
    /// Base URL without a trailing slash; the API root is `<base>/v2/`.
    pub base: String,
    /// Another berth: requests carry `?ns=<registry>`.
    pub mirror: bool,
    pub client: reqwest::Client,
    /// How long a connection may take (the endpoint's own, else the registry's): also the
    /// longest wait for an answer from an endpoint marked down.
    pub connect_timeout: Duration,
    down_until: Mutex<Option<Instant>>,
    in_flight: AtomicUsize,
    pub(super) auth: Mutex<super::AuthMode>,
}

impl Endpoint {
    pub(crate) fn new(
        cfg: &EndpointConfig,
        client: reqwest::Client,
        connect_timeout: Duration,
    ) -> Endpoint {
        Endpoint {
            base: cfg.url.as_str().trim_end_matches('/').to_owned(),
            mirror: cfg.mirror,
            client,
            connect_timeout,
            down_until: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            auth: Mutex::new(super::AuthMode::None),
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down_until.lock().is_some_and(|t| Instant::now() < t)
    }

    /// How long the endpoint stays marked down, if it is.
    pub(crate) fn down_for(&self) -> Option<Duration> {
        let t = (*self.down_until.lock())?;
        let left = t.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Records the outcome of a request or probe. Returns whether the state changed.
    pub(crate) fn mark(&self, healthy: bool) -> bool {
        let mut d = self.down_until.lock();
        let was_down = d.is_some_and(|t| Instant::now() < t);
        *d = (!healthy).then(|| Instant::now() + COOL_DOWN);
        was_down == healthy
    }

    /// Counts a request in flight until the guard drops (for least-requests).
    pub(crate) fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }
}

pub(crate) struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints for a set of repositories.
pub(crate) struct Pool {
    /// None: the registry's own endpoints (every repository).
    pattern: Option<wildmatch::WildMatch>,
    primary: Vec<usize>,
    fallback: Vec<usize>,
    balance: Balance,
    next: AtomicUsize,
}

/// All endpoints of a registry, and the pools that choose among them.
pub(crate) struct Endpoints {
    pub all: Vec<Endpoint>,
    pools: Vec<Pool>,
}

impl Endpoints {
    pub(crate) fn new(
        cfg: &RegistryConfig,
        client_for: impl Fn(&EndpointConfig) -> Result<reqwest::Client, SetupError>,
    ) -> Result<Endpoints, SetupError> {
        let mut all: Vec<Endpoint> = Vec::new();
        // Endpoints named in several places are one endpoint (one health state, one client).
        let mut index_of = |e: &EndpointConfig| -> Result<usize, SetupError> {
            let base = e.url.as_str().trim_end_matches('/');
            if let Some(i) = all
                .iter()
                .position(|x| x.base == base && x.mirror == e.mirror)
            {
                return Ok(i);
            }
            let connect_timeout = e.connect_timeout.unwrap_or(cfg.connect_timeout);
            all.push(Endpoint::new(e, client_for(e)?, connect_timeout));
            Ok(all.len() - 1)
        };
        let mut pools = Vec::new();
        for r in &cfg.routes {
            pools.push(Pool {
                pattern: Some(wildmatch::WildMatch::new(&r.pattern)),
                primary: r
                    .endpoints
                    .iter()
                    .map(&mut index_of)
                    .collect::<Result<_, _>>()?,
                fallback: r
                    .fallback
                    .iter()
                    .map(&mut index_of)
                    .collect::<Result<_, _>>()?,
                balance: r.balance.unwrap_or(cfg.balance),
                next: AtomicUsize::new(0),
            });
        }
        pools.push(Pool {
            pattern: None,
            primary: cfg
                .endpoints
                .iter()
                .map(&mut index_of)
                .collect::<Result<_, _>>()?,
            fallback: cfg
                .fallback
                .iter()
                .map(&mut index_of)
                .collect::<Result<_, _>>()?,
            balance: cfg.balance,
            next: AtomicUsize::new(0),
        });
        Ok(Endpoints { all, pools })
    }

    /// The order in which to try endpoints for a request about `repo`, hashing on `key`
    /// (the blob digest, else the repository): healthy primaries as balanced, then healthy
    /// fallbacks, then the ones cooling down (better a retry than a certain failure).
    pub(crate) fn order(&self, repo: Option<&str>, key: &str) -> Vec<&Endpoint> {
        let pool = self
            .pools
            .iter()
            .find(|p| match (&p.pattern, repo) {
                (None, _) => true,
                (Some(m), Some(r)) => m.matches(r),
                (Some(_), None) => false,
            })
            .unwrap_or_else(|| &self.pools[self.pools.len() - 1]);
        let mut primary: Vec<usize> = pool.primary.clone();
        match pool.balance {
            Balance::RoundRobin => {
                let n = primary.len().max(1);
                let start = pool.next.fetch_add(1, Ordering::Relaxed) % n;
                primary.rotate_left(start);
            }
            Balance::LeastRequests => {
                primary.sort_by_key(|&i| self.all[i].in_flight.load(Ordering::Relaxed));
            }
            Balance::ConsistentHash => {
                primary.sort_by_key(|&i| std::cmp::Reverse(rendezvous(key, &self.all[i].base)));
            }
        }
        let (mut up, mut down): (Vec<&Endpoint>, Vec<&Endpoint>) = primary
            .iter()
            .map(|&i| &self.all[i])
            .partition(|e| !e.is_down());
        let (fb_up, fb_down): (Vec<&Endpoint>, Vec<&Endpoint>) = pool
            .fallback
            .iter()
            .map(|&i| &self.all[i])
            .partition(|e| !e.is_down());
        up.extend(fb_up);
        down.extend(fb_down);
        up.extend(down);
        up
    }
}

/// Rendezvous (highest random weight) score of `key` on `endpoint`.
fn rendezvous(key: &str, endpoint: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    endpoint.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn endpoints(toml: &str) -> Endpoints {
        let c = Config::parse(toml).unwrap();
        Endpoints::new(&c.registries[0], |_| Ok(reqwest::Client::new())).unwrap()
    }

    fn bases(v: Vec<&Endpoint>) -> Vec<&str> {
        v.into_iter().map(|e| e.base.as_str()).collect()
    }

    #[test]
    fn round_robin_rotates_and_fallback_comes_last() {
        let e = endpoints(
            r#"[[registry]]
            name = "docker.io"
            endpoints = ["http://a:1", "http://b:1"]
            fallback = ["https://origin"]"#,
        );
        let first = bases(e.order(None, "k"));
        let second = bases(e.order(None, "k"));
        assert_eq!(first, ["http://a:1", "http://b:1", "https://origin"]);
        assert_eq!(second, ["http://b:1", "http://a:1", "https://origin"]);
        // A primary down: skipped, tried after the healthy fallback.
        e.all[0].mark(false);
        assert_eq!(
            bases(e.order(None, "k")),
            ["http://b:1", "https://origin", "http://a:1"]
        );
        e.all[1].mark(false);
        assert_eq!(bases(e.order(None, "k"))[0], "https://origin");
    }

    #[test]
    fn consistent_hash_is_stable_and_spreads() {
        let e = endpoints(
            r#"[[registry]]
            name = "docker.io"
            balance = "consistent-hash"
            endpoints = ["http://p1:5000", "http://p2:5000"]"#,
        );
        let mut firsts = std::collections::HashSet::new();
        for i in 0..64 {
            let key = format!("sha256:{i:064x}");
            let a = bases(e.order(None, &key));
            assert_eq!(a, bases(e.order(None, &key)), "same key, same order");
            firsts.insert(a[0].to_owned());
        }
        assert_eq!(firsts.len(), 2, "keys spread over both parents");
    }

    #[test]
    fn routes_pick_endpoints_by_repository() {
        let e = endpoints(
            r#"[[registry]]
            name = "docker.io"
            endpoints = ["http://regional:5000"]
            [[registry.route]]
            match = "myorg/*"
            endpoints = ["https://internal"]"#,
        );
        assert_eq!(bases(e.order(Some("myorg/app"), "k")), ["https://internal"]);
        assert_eq!(
            bases(e.order(Some("library/alpine"), "k")),
            ["http://regional:5000"]
        );
        assert_eq!(bases(e.order(None, "k")), ["http://regional:5000"]);
    }

    #[test]
    fn least_requests_prefers_the_idle_endpoint() {
        let e = endpoints(
            r#"[[registry]]
            name = "docker.io"
            balance = "least-requests"
            endpoints = ["http://a:1", "http://b:1"]"#,
        );
        let _busy = e.all[0].start();
        assert_eq!(bases(e.order(None, "k"))[0], "http://b:1");
    }
}
