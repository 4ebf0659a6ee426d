//! Response bodies for hyper: small in-memory ones and streams (cached files, fills in
//! flight), each carrying the request's meter, which records it when the body is done.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use http_body::{Frame, SizeHint};

use super::meter::Meter;

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
            Poll::Ready(None) => Poll::Ready(None),
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
