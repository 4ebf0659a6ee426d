//! The listeners: accept loops for the registry API and the admin endpoints, connection limits
//! and timeouts, and graceful shutdown.

pub mod auth;
pub mod body;
pub mod fast;
pub mod handlers;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use body::Body;
use handlers::App;

use crate::cache::check_writable;

/// What the admin endpoints need to answer.
pub struct Admin {
    pub app: Arc<App>,
    pub cache_dir: std::path::PathBuf,
}

/// Request URIs longer than this are refused with 414.
pub const MAX_URI: usize = 8 * 1024;

/// Open connections per client address, so one client cannot take every socket.
#[derive(Clone, Default)]
pub struct ConnectionCounts(Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>);

pub struct ConnectionSlot(ConnectionCounts, IpAddr);

impl ConnectionCounts {
    /// A slot for one more connection from `ip`, or None when it holds `max` already.
    pub fn open(&self, ip: IpAddr, max: usize) -> Option<ConnectionSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot(self.clone(), ip))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Limits and timeouts of a listener.
#[derive(Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub grace: Duration,
    pub max_connections_per_client: usize,
}

fn builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(64 * 1024)
        .max_headers(100)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    b
}

/// Serves connections from `listener` with `handler` until `shutdown` fires, then waits up to
/// `grace` for requests in flight. With `fast`, whole-blob GETs on plain HTTP/1.1 take the
/// zero-copy path first (see [`fast`]).
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    fast: Option<Arc<App>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
) where
    F: Fn(Request<hyper::body::Incoming>, IpAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let Limits {
        header_timeout,
        grace,
        max_connections_per_client,
    } = limits;
    let builder = Arc::new(builder(header_timeout));
    let graceful = GracefulShutdown::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let counts = ConnectionCounts::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = counts.open(peer.ip(), max_connections_per_client) else {
                    tracing::warn!(%peer, limit = max_connections_per_client, "too many connections from one client: closing");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let ip = peer.ip();
                let svc = service_fn(move |req| {
                    let h = handler.clone();
                    async move { Ok::<_, Infallible>(h(req, ip).await) }
                });
                let (builder, watcher, fast, stop) =
                    (builder.clone(), graceful.watcher(), fast.clone(), shutdown.clone());
                let tls = tls.clone();
                tracker.spawn(async move {
                    let _slot = slot;
                    if let Some(acceptor) = tls {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(header_timeout, acceptor.accept(stream)).await
                        else {
                            tracing::debug!(%peer, "TLS handshake failed or timed out");
                            return;
                        };
                        let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                        if let Err(e) = watcher.watch(conn).await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        return;
                    }
                    let io = match fast {
                        Some(app) => match fast::serve(app, stream, ip, header_timeout, stop).await {
                            fast::Outcome::Done => return,
                            fast::Outcome::Handoff(io) => io,
                        },
                        None => fast::Prefixed::plain(stream),
                    };
                    let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tracker.close();
    let drained = async {
        graceful.shutdown().await;
        tracker.wait().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("graceful shutdown timed out; closing remaining connections");
    }
}

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from_static(s.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `/healthz`, `/readyz` and `/metrics`.
pub async fn admin(
    admin: Arc<Admin>,
    req: Request<hyper::body::Incoming>,
    _peer: IpAddr,
) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let blobs = &admin.app.mirror.blobs;
            if !blobs.is_ready() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "cache index loading\n");
            }
            if !admin.app.mirror.cluster_ready() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "probing cluster peers\n");
            }
            let dir = admin.cache_dir.join("tmp");
            match tokio::task::spawn_blocking(move || check_writable(&dir)).await {
                Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
                _ => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cache directory not writable\n",
                ),
            }
        }
        "/metrics" => {
            admin.app.mirror.blobs.run_pending();
            let mut r = Response::new(Body::full(admin.app.mirror.metrics().render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
