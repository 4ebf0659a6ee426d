//! berth: a pull-through caching mirror for container registries.
//!
//! Data flows one way: a request is routed ([`route`]) to a registry and repository, the
//! [`mirror`] answers it from the [`cache`] or fills the cache from the [`upstream`] client, and
//! the [`server`] streams the answer back.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod cluster;
pub mod config;
pub mod error;
pub mod logwriter;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod route;
pub mod server;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use cache::{BlobStore, ManifestStore};
use config::Config;
use metrics::Metrics;
use mirror::Mirror;
use route::Router;
use server::Admin;
use server::handlers::App;

/// A running berth: its addresses, and the handle that stops it.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    blobs: Arc<BlobStore>,
    grace: std::time::Duration,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets requests in flight finish (up to the grace period) and returns.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.blobs.wait_idle(self.grace).await;
    }
}

/// Opens the cache, binds the listeners named in the config and starts serving.
pub async fn start(config: Config) -> Result<Running, String> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.admin_listen))?;
    start_on(config, listener, admin).await
}

/// Like [`start`], on listeners the caller bound (tests bind 127.0.0.1:0).
pub async fn start_on(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
) -> Result<Running, String> {
    let dir = config.cache.dir.clone();
    cache::check_writable(&dir)
        .map_err(|e| format!("cache directory {} is not writable: {e}", dir.display()))?;
    let metrics = Arc::new(Metrics::new());
    let blobs = BlobStore::open(&dir, config.cache.max_size, metrics.clone())
        .map_err(|e| format!("cannot open the blob store in {}: {e}", dir.display()))?;
    let manifests = Arc::new(
        ManifestStore::open(&dir)
            .map_err(|e| format!("cannot open the manifest store in {}: {e}", dir.display()))?,
    );
    // The repository index must be complete before blob requests are checked against it.
    let m = manifests.clone();
    let n = tokio::task::spawn_blocking(move || m.scan())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot scan cached manifests: {e}"))?;
    tracing::info!(manifests = n, "manifest index loaded");
    // Blobs are indexed in the background; until then lookups check the disk directly.
    let b = blobs.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = b.scan() {
            tracing::error!(error = %e, "cannot scan the blob store");
        }
    });

    let default = config
        .registries
        .iter()
        .find(|r| r.default)
        .map(|r| Arc::<str>::from(r.name.as_str()));
    let names = config
        .registries
        .iter()
        .map(|r| Arc::<str>::from(r.name.as_str()))
        .collect();
    let shared = match &config.cache.object_store {
        Some(c) => {
            tracing::info!(url = %c.url, "shared object store behind the local cache");
            Some(Arc::new(cache::SharedStore::open(c, metrics.clone())?))
        }
        None => None,
    };
    let cluster = match &config.cluster {
        Some(c) => {
            let cluster = Arc::new(cluster::Cluster::new(c, metrics.clone())?);
            cluster.spawn_probes();
            Some(cluster)
        }
        None => None,
    };
    let mirror = Mirror::new(
        &config,
        blobs.clone(),
        manifests,
        shared,
        cluster,
        metrics.clone(),
    )?;
    let client_limit =
        std::num::NonZeroU32::new(config.server.client_requests_per_second).map(|rate| {
            let burst = config
                .server
                .client_burst
                .and_then(std::num::NonZeroU32::new)
                .unwrap_or(rate);
            let limiter = Arc::new(governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ));
            // Forget idle clients now and then, so the table stays bounded.
            let weak = Arc::downgrade(&limiter);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                    let Some(l) = weak.upgrade() else { return };
                    l.retain_recent();
                    l.shrink_to_fit();
                }
            });
            limiter
        });
    let auth = match &config.auth {
        Some(a) => Some(server::auth::Auth::load(a)?),
        None => None,
    };
    let app = Arc::new(App {
        router: Router::new(names, default),
        mirror,
        client_limit,
        auth,
        tls: config.server.tls.is_some(),
    });
    let admin = Arc::new(Admin {
        app: app.clone(),
        cache_dir: dir,
    });

    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
    let (tx, rx) = watch::channel(false);
    let limits = server::Limits {
        header_timeout: config.server.header_read_timeout,
        grace: config.server.shutdown_grace,
        max_connections_per_client: config.server.max_connections_per_client,
    };
    let tls = match &config.server.tls {
        Some(t) => Some(server::tls::acceptor(t)?),
        None => None,
    };
    // The zero-copy path needs the plain socket; with TLS everything goes through hyper.
    let fast = tls.is_none().then(|| app.clone());
    let registry_task = tokio::spawn(server::serve(
        listener,
        move |req, peer| server::handlers::handle(app.clone(), req, peer),
        fast,
        tls,
        rx.clone(),
        limits,
    ));
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        move |req, peer| server::admin(admin.clone(), req, peer),
        None,
        None,
        rx,
        server::Limits {
            max_connections_per_client: 0,
            ..limits
        },
    ));
    tracing::info!(%addr, %admin_addr, "berth serving");
    Ok(Running {
        addr,
        admin_addr,
        metrics,
        blobs,
        grace: config.server.shutdown_grace,
        shutdown: tx,
        tasks: vec![registry_task, admin_task],
    })
}
