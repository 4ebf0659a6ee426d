//! berth: a pull-through caching mirror for container registries.
//!
//! Data flows one way: a request is routed ([`route`]) to a registry and repository, the
//! [`mirror`] answers it from the [`cache`] or fills the cache from the [`upstream`] client, and
//! the [`server`] streams the answer back.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

// Public: what the binary, the tests, the benches and the fuzz targets use.
pub mod config;
pub mod logwriter;
pub mod oci;
pub mod route;
pub mod server;
pub mod upstream;

pub(crate) mod app;
pub(crate) mod cache;
pub(crate) mod cluster;
pub(crate) mod error;
pub(crate) mod hosted;
pub(crate) mod metrics;
pub(crate) mod mirror;
pub(crate) mod notify;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use app::{App, StartError};
use config::Config;
pub use metrics::Metrics;

/// A running berth: its addresses, and the handle that stops it.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    app: Arc<App>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets requests in flight and fills finish, and returns: all within one
    /// grace period (`server.shutdown_grace`), after which what still runs is cut.
    pub async fn stop(self) {
        let started = tokio::time::Instant::now();
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        let left = self.app.limits.grace.saturating_sub(started.elapsed());
        self.app.mirror.blobs.wait_idle(left).await;
        let app = self.app.clone();
        let _ = tokio::task::spawn_blocking(move || app.housekeeping(None)).await;
    }
}

/// Garbage collection of the hosted registries of `config`, offline (`berth gc`): safe beside a
/// running berth on the same directory, as blobs younger than `gc_grace` are never removed.
/// Returns the report as JSON.
/// With `[cache.object_store]`, what it removes leaves the bucket too (first).
pub fn gc(config: &Config, dry_run: bool, untagged: bool) -> std::io::Result<serde_json::Value> {
    let metrics = Arc::new(Metrics::new());
    let shared = match &config.cache.object_store {
        Some(c) => Some(Arc::new(
            cache::SharedStore::open(c, metrics.clone()).map_err(std::io::Error::other)?,
        )),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let hosted =
            hosted::Hosted::open(&config.hosted, &config.cache.dir, metrics, None, shared)?;
        hosted.gc(dry_run, untagged).await
    })?;
    serde_json::to_value(report).map_err(std::io::Error::other)
}

/// Opens the cache, binds the listeners named in the config and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let bind = async |addr: SocketAddr| {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })
    };
    let listener = bind(config.server.listen).await?;
    let admin = bind(config.server.admin_listen).await?;
    start_on(config, listener, admin).await
}

/// Like [`start`], on listeners the caller bound (tests bind 127.0.0.1:0).
pub async fn start_on(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
) -> Result<Running, StartError> {
    let local = |l: &TcpListener, addr: SocketAddr| {
        l.local_addr()
            .map_err(|source| StartError::Listen { addr, source })
    };
    let addr = local(&listener, config.server.listen)?;
    let admin_addr = local(&admin_listener, config.server.admin_listen)?;
    let app = App::open(&config).await?;
    app.spawn_housekeeping();
    server::admin::fetch_pins_at_start(&app);
    let (tx, rx) = watch::channel(false);
    let listeners = server::Listeners {
        registry: listener,
        admin: admin_listener,
    };
    let task = tokio::spawn(server::run(app.clone(), listeners, rx));
    tracing::info!(%addr, %admin_addr, "berth serving");
    Ok(Running {
        addr,
        admin_addr,
        metrics: app.mirror.metrics_arc(),
        app,
        shutdown: tx,
        task,
    })
}
