//! The listeners: [`run`] serves an [`App`] on the registry and admin listeners — accept
//! loops, connection limits and timeouts, graceful shutdown. A registry request is read by one
//! of two transports ([`fast`] for GET/HEAD on plain HTTP/1, [`hyper_transport`] for the rest),
//! which build a [`request::RequestHead`] and run it through [`pipeline`]; the reply's
//! [`response::ResponseHead`] is rendered by the transport that read the request.

pub(crate) mod admin;
pub(crate) mod auth;
mod body;
mod fast;
mod hosted;
mod hyper_transport;
mod meter;
mod pipeline;
pub mod request;
mod response;
pub mod status;
pub(crate) mod tls;
pub(crate) mod warm;

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use body::Body;

use crate::app::{App, Limits};

/// The two listeners of a berth.
pub struct Listeners {
    pub registry: TcpListener,
    pub admin: TcpListener,
}

/// Serves `app` on both listeners until `shutdown` fires, then lets requests in flight finish
/// (up to the grace period).
pub async fn run(app: Arc<App>, listeners: Listeners, shutdown: watch::Receiver<bool>) {
    let limits = app.limits;
    let fast = Some(app.clone());
    let tls = app.tls.clone();
    let registry_app = app.clone();
    let registry = serve(
        listeners.registry,
        move |req, peer| hyper_transport::handle(registry_app.clone(), req, peer),
        fast,
        tls,
        shutdown.clone(),
        limits,
    );
    let admin = serve(
        listeners.admin,
        move |req, _peer| admin::handle(app.clone(), req),
        None,
        None,
        shutdown,
        Limits {
            max_connections_per_client: 0,
            ..limits
        },
    );
    tokio::join!(registry, admin);
}

/// Open connections per client address, so one client cannot take every socket.
#[derive(Clone, Default)]
pub struct ConnectionCounts(Arc<parking_lot::Mutex<std::collections::HashMap<IpAddr, usize>>>);

pub struct ConnectionSlot(ConnectionCounts, IpAddr);

impl ConnectionCounts {
    /// A slot for one more connection from `ip`, or None when it holds `max` already.
    pub fn open(&self, ip: IpAddr, max: usize) -> Option<ConnectionSlot> {
        let mut m = self.0.lock();
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
        let mut m = (self.0).0.lock();
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
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

/// Serves one connection with hyper until it closes or the server shuts down.
async fn hyper_serve<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    svc: S,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<hyper::body::Incoming>, Response = Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Serves connections from `listener` with `handler` until `shutdown` fires, then waits up to
/// `grace` for requests in flight. With `fast`, GET and HEAD on HTTP/1.x (plain or TLS) take
/// the fast transport first (see [`fast`]).
async fn serve<F, Fut>(
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
                    // On plain HTTP the client is told why (one non-blocking write: a
                    // flood of refused connections holds nothing open).
                    if tls.is_none() {
                        let _ = stream.try_write(pipeline::too_many_connections());
                    }
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
                    let Some(acceptor) = tls else {
                        let io = match fast {
                            Some(app) => match fast::serve(app, stream, ip, header_timeout, stop).await {
                                fast::Outcome::Done => return,
                                fast::Outcome::Handoff(io) => io,
                            },
                            None => fast::Prefixed::plain(stream),
                        };
                        Box::pin(hyper_serve(&builder, io, svc, watcher)).await;
                        return;
                    };
                    // Boxed, like the hyper connection: the task of an idle connection holds
                    // only what its transport needs between requests.
                    Box::pin(async move {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(header_timeout, acceptor.accept(stream)).await
                        else {
                            tracing::debug!(%peer, "TLS handshake failed or timed out");
                            return;
                        };
                        // HTTP/1.x over TLS takes the fast transport too; HTTP/2 is hyper's.
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                        let io = match fast {
                            Some(app) if !h2 => {
                                match fast::serve(app, stream, ip, header_timeout, stop).await {
                                    fast::Outcome::Done => return,
                                    fast::Outcome::Handoff(io) => io,
                                }
                            }
                            _ => fast::Prefixed::plain(stream),
                        };
                        hyper_serve(&builder, io, svc, watcher).await;
                    })
                    .await;
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
