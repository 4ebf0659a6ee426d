//! Wiring: [`App::open`] builds everything a running berth holds — the cache stores and their
//! start-up scans, the upstream clients, the shared store and the cluster, auth and TLS — from
//! a [`Config`]. [`crate::server::run`] then serves it. Nothing else constructs these parts.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::{self, BlobStore, ManifestStore, Pins, SharedStore};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::{ErrorCode, RegistryError, SetupError};
use crate::hosted::Hosted;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::notify::Notifier;
use crate::route::Router;
use crate::server::auth::Auth;
use crate::server::warm::Warmer;

/// Why berth could not start. Each names the part and keeps its cause.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cache directory {} is not writable: {source}", dir.display())]
    CacheDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the {what} in {}: {source}", dir.display())]
    Store {
        what: &'static str,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot scan cached manifests: {0}")]
    Scan(std::io::Error),
    #[error(transparent)]
    Setup(#[from] SetupError),
}

/// Per-listener limits and timeouts.
#[derive(Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub grace: Duration,
    pub max_connections_per_client: usize,
}

type ClientLimiter = governor::DefaultKeyedRateLimiter<IpAddr>;

/// Everything a request needs, built once.
pub struct App {
    pub(crate) router: Router,
    pub(crate) mirror: Mirror,
    /// Client authentication and rules (None: everyone may pull everything configured).
    pub(crate) auth: Option<Auth>,
    /// The registry listener's TLS (None: plain HTTP, and the zero-copy transport).
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Per-client request rate on the registry listener (None: unlimited).
    client_limit: Option<Arc<ClientLimiter>>,
    pub(crate) limits: Limits,
    pub(crate) cache_dir: PathBuf,
    /// The hosted registries (None: berth only mirrors).
    pub(crate) hosted: Option<Arc<Hosted>>,
    /// Webhooks (None: none configured).
    pub(crate) notify: Option<Notifier>,
    /// `[admin] token_file`'s token: `/admin/` requires it (None: only on a loopback
    /// `admin_listen`).
    pub(crate) admin_token: Option<String>,
    pub(crate) admin_loopback: bool,
    /// Pinned images (`[cache] pin`, `berth pin`).
    pub(crate) pins: Arc<Pins>,
    /// `[cache] max_idle`.
    max_idle: Option<Duration>,
    /// Warm jobs (`POST /admin/warm`, pins).
    pub(crate) warm: Warmer,
}

/// How often pins are resolved again (children and blobs cached since are pinned then) and
/// pull counts saved when they changed.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

impl App {
    /// Opens the cache (waiting for the manifest index; blobs are indexed in the background),
    /// the upstream clients, the shared store and cluster, auth and TLS.
    pub async fn open(config: &Config) -> Result<Arc<App>, StartError> {
        let dir = config.cache.dir.clone();
        cache::check_writable(&dir).map_err(|source| StartError::CacheDir {
            dir: dir.clone(),
            source,
        })?;
        let metrics = Arc::new(Metrics::new());
        let store_error = |what| {
            let dir = dir.clone();
            move |source| StartError::Store { what, dir, source }
        };
        let blobs = BlobStore::open(&dir, config.cache.max_size, metrics.clone())
            .map_err(store_error("blob store"))?;
        let manifests = Arc::new(ManifestStore::open(&dir).map_err(store_error("manifest store"))?);
        // The repository index must be complete before blob requests are checked against it.
        let m = manifests.clone();
        let n = tokio::task::spawn_blocking(move || m.scan())
            .await
            .map_err(|e| StartError::Scan(std::io::Error::other(e)))?
            .map_err(StartError::Scan)?;
        tracing::info!(manifests = n, "manifest index loaded");
        let b = blobs.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = b.scan() {
                tracing::error!(error = %e, "cannot scan the blob store");
            }
        });

        let shared = match &config.cache.object_store {
            Some(c) => {
                tracing::info!(url = %c.url, "shared object store behind the local cache");
                Some(Arc::new(SharedStore::open(c, metrics.clone())?))
            }
            None => None,
        };
        let cluster = match &config.cluster {
            Some(c) => {
                let cluster = Arc::new(Cluster::new(c, metrics.clone())?);
                cluster.spawn_probes();
                Some(cluster)
            }
            None => None,
        };
        let in_cluster = cluster.is_some();
        let hosted = if config.hosted.is_empty() {
            None
        } else {
            let (hc, d, m, b, s) = (
                config.hosted.clone(),
                dir.clone(),
                metrics.clone(),
                blobs.clone(),
                shared.clone(),
            );
            let h = tokio::task::spawn_blocking(move || Hosted::open(&hc, &d, m, Some(b), s))
                .await
                .map_err(|e| StartError::Scan(std::io::Error::other(e)))?
                .map_err(store_error("hosted registry store"))?;
            // With an object store: the tags and catalog of what any replica pushed, before
            // the first request (bounded; blobs are read from the bucket when asked for).
            h.restore().await;
            h.spawn_janitor();
            tracing::info!(
                registries = config.hosted.len(),
                "hosted registries: {}",
                config
                    .hosted
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Some(Arc::new(h))
        };
        let notify = if config.notify.is_empty() {
            None
        } else {
            Some(Notifier::start(
                &config.notify,
                metrics.clone(),
                config.server.listen.to_string(),
            )?)
        };
        let (m, b, d) = (manifests.clone(), blobs.clone(), dir.clone());
        let (pin, platforms) = (config.cache.pin.clone(), config.cache.platforms.clone());
        let pins = tokio::task::spawn_blocking(move || {
            let pins = Pins::open(&d, &pin, &platforms)?;
            pins.refresh(&m, &b);
            Ok::<_, std::io::Error>(pins)
        })
        .await
        .map_err(|e| StartError::Scan(std::io::Error::other(e)))?
        .map_err(store_error("pins"))?;
        let mirror = Mirror::new(config, blobs, manifests, shared, cluster, metrics)?;
        let auth = match &config.auth {
            Some(a) => Some(Auth::load(a)?),
            None => None,
        };
        let tls = match &config.server.tls {
            Some(t) => Some(crate::server::tls::acceptor(t)?),
            None => None,
        };
        let admin_token = match config.admin.as_ref().and_then(|a| a.token_file.as_ref()) {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| SetupError::file("admin.token_file", path, e))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let admin_loopback = config.server.admin_listen.ip().is_loopback();
        if admin_token.is_none() && !admin_loopback {
            tracing::warn!(
                admin_listen = %config.server.admin_listen,
                "the admin API (/admin/) is refused: admin_listen is not a loopback address and [admin] token_file is not set"
            );
        }
        let mut router = router(config, auth.is_some(), in_cluster);
        if let Some(h) = &hosted {
            router = router.with_hosted(
                h.registries()
                    .iter()
                    .map(|r| (r.name.clone(), r.globs.clone()))
                    .collect(),
            );
        }
        Ok(Arc::new(App {
            router,
            hosted,
            notify,
            admin_token,
            admin_loopback,
            mirror,
            auth,
            tls,
            client_limit: client_limit(config),
            limits: Limits {
                header_timeout: config.server.header_read_timeout,
                grace: config.server.shutdown_grace,
                max_connections_per_client: config.server.max_connections_per_client,
            },
            cache_dir: dir,
            pins: Arc::new(pins),
            max_idle: config.cache.max_idle,
            // Checked by Config::validate: each parses.
            warm: Warmer::new(
                config
                    .cache
                    .platforms
                    .iter()
                    .filter_map(|p| crate::oci::Platform::parse(p).ok())
                    .collect(),
            ),
        }))
    }

    /// Starts the background upkeep: pins resolved again, pull counts saved (at most once per
    /// [`HOUSEKEEPING_EVERY`]) and, with `max_idle`, idle blobs evicted. Ends with the app.
    pub(crate) fn spawn_housekeeping(self: &Arc<App>) {
        let weak = Arc::downgrade(self);
        // Idle eviction runs a tenth of max_idle apart (between 1 s and 10 min).
        let idle_every = self
            .max_idle
            .map(|d| (d / 10).clamp(Duration::from_secs(1), Duration::from_secs(600)));
        tokio::spawn(async move {
            let mut last_idle = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(
                    HOUSEKEEPING_EVERY.min(idle_every.unwrap_or(HOUSEKEEPING_EVERY)),
                )
                .await;
                let Some(app) = weak.upgrade() else { return };
                let idle = match (app.max_idle, idle_every) {
                    (Some(max), Some(every)) if last_idle.elapsed() >= every => {
                        last_idle = tokio::time::Instant::now();
                        Some(max)
                    }
                    _ => None,
                };
                let _ = tokio::task::spawn_blocking(move || {
                    app.housekeeping(idle);
                })
                .await;
            }
        });
    }

    /// One round of upkeep (see [`App::spawn_housekeeping`]). Blocking.
    pub(crate) fn housekeeping(&self, evict_idle: Option<Duration>) {
        let manifests = self.mirror.manifest_store();
        self.pins.refresh(manifests, &self.mirror.blobs);
        if let Some(max_idle) = evict_idle {
            self.mirror.blobs.evict_idle(max_idle);
        }
        if let Err(e) = manifests.pulls().save() {
            tracing::warn!(error = %e, "cannot save the pull counts");
        }
    }

    /// The 429 a client over its request rate gets, or None.
    pub fn over_client_limit(&self, client: IpAddr) -> Option<RegistryError> {
        let limiter = self.client_limit.as_ref()?;
        // Replicas asking a blob's owner carry many clients' requests.
        if self.mirror.is_peer(client) {
            return None;
        }
        limiter.check_key(&client).err().map(|_| {
            RegistryError::new(
                ErrorCode::TooManyRequests,
                "too many requests from this client; slow down",
            )
            .with_retry_after(1)
        })
    }
}

fn router(config: &Config, token: bool, peer_id: bool) -> Router {
    let names = config
        .registries
        .iter()
        .map(|r| Arc::<str>::from(r.name.as_str()))
        .collect();
    let default = config
        .registries
        .iter()
        .find(|r| r.default)
        .map(|r| Arc::<str>::from(r.name.as_str()));
    let mut router = Router::new(names, default);
    for r in config
        .registries
        .iter()
        .filter(|r| !r.allow.is_empty() || !r.deny.is_empty())
    {
        let globs = |list: &[String]| {
            list.iter()
                .filter_map(|g| crate::route::RepoGlob::new(g).ok())
                .collect()
        };
        router = router.with_filter(
            r.name.as_str().into(),
            crate::route::RepoFilter {
                allow: globs(&r.allow),
                deny: globs(&r.deny),
            },
        );
    }
    if token {
        router = router.with_token_endpoint();
    }
    if peer_id {
        router = router.with_peer_id();
    }
    router
}

/// The per-client rate limiter of `[server] client_requests_per_second`, forgetting idle
/// clients now and then so its table stays bounded.
fn client_limit(config: &Config) -> Option<Arc<ClientLimiter>> {
    let rate = NonZeroU32::new(config.server.client_requests_per_second)?;
    let burst = config
        .server
        .client_burst
        .and_then(NonZeroU32::new)
        .unwrap_or(rate);
    let limiter = Arc::new(governor::RateLimiter::keyed(
        governor::Quota::per_second(rate).allow_burst(burst),
    ));
    let weak = Arc::downgrade(&limiter);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            let Some(l) = weak.upgrade() else { return };
            l.retain_recent();
            l.shrink_to_fit();
        }
    });
    Some(limiter)
}
