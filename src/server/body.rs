//! Response bodies: small in-memory ones, streams (cached files, fills in flight), and the
//! meter that records each request's metrics and log line when its body is done.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use http_body::{Frame, SizeHint};

use crate::metrics::{CacheResult, Metrics, RequestKind};

/// Bytes read from a cached file per step.
const FILE_CHUNK: usize = 512 * 1024;

enum Inner {
    Full(Option<Bytes>),
    Stream(BoxStream<'static, io::Result<Bytes>>),
}

pub struct Body {
    inner: Inner,
    meter: Option<Box<Meter>>,
}

impl Body {
    pub fn empty() -> Body {
        Body {
            inner: Inner::Full(None),
            meter: None,
        }
    }

    pub fn full(b: impl Into<Bytes>) -> Body {
        let b = b.into();
        Body {
            inner: Inner::Full((!b.is_empty()).then_some(b)),
            meter: None,
        }
    }

    pub fn stream(s: BoxStream<'static, io::Result<Bytes>>) -> Body {
        Body {
            inner: Inner::Stream(s),
            meter: None,
        }
    }

    /// Bytes `[start, start+len)` of a file, read in large pieces off the async threads.
    pub fn file(file: Arc<File>, start: u64, len: u64) -> Body {
        let stream =
            futures_util::stream::unfold((file, start, len), |(file, pos, left)| async move {
                if left == 0 {
                    return None;
                }
                let n = left.min(FILE_CHUNK as u64) as usize;
                let f = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = BytesMut::zeroed(n);
                    f.read_exact_at(&mut buf, pos).map(|()| buf.freeze())
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
                match read {
                    Ok(b) => Some((Ok(b), (file, pos + n as u64, left - n as u64))),
                    // Stop after an error: the response is cut, the client sees it incomplete.
                    Err(e) => Some((Err(e), (file, pos, 0))),
                }
            });
        Body::stream(stream.boxed())
    }

    pub fn metered(mut self, meter: Meter) -> Body {
        self.meter = Some(Box::new(meter));
        self
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(Ok)),
            Inner::Stream(s) => Pin::new(s).poll_next(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(b))) => {
                if let Some(m) = &mut this.meter {
                    m.bytes += b.len() as u64;
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(m) = &mut this.meter {
                    m.aborted = Some(e.to_string());
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                if let Some(m) = &mut this.meter {
                    m.complete = true;
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.inner, Inner::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Stream(_) => SizeHint::default(),
        }
    }
}

/// One request's record, written when its body is dropped (sent, failed or abandoned).
pub struct Meter {
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    pub kind: RequestKind,
    pub method: http::Method,
    pub path: String,
    /// The registry the request routed to, if it named a repository.
    pub registry: Option<Arc<str>>,
    /// Who made it, with `[auth]` ("-" without).
    pub user: Option<String>,
    pub status: u16,
    pub cache: Option<CacheResult>,
    pub bytes: u64,
    pub complete: bool,
    pub aborted: Option<String>,
}

impl Drop for Meter {
    fn drop(&mut self) {
        let kind = self.kind.as_str();
        let status = self.status.to_string();
        self.metrics
            .http_requests
            .with_label_values(&[kind, self.method.as_str(), &status])
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
        match &self.aborted {
            None => tracing::info!(
                target: "berth::access",
                method = %self.method, path = %self.path, registry = %registry, user = %user,
                status = self.status, bytes = self.bytes, us, cache = %cache, "request"
            ),
            Some(e) => tracing::warn!(
                target: "berth::access",
                method = %self.method, path = %self.path, registry = %registry, user = %user,
                status = self.status, bytes = self.bytes, us, cache = %cache, error = %e,
                "request aborted"
            ),
        }
    }
}
