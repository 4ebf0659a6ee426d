//! The one response head: status and headers, decided once by the pipeline, with two
//! renderers — a hyper `Response`, and HTTP/1.1 bytes for the zero-copy transport — and the
//! body to send after it.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode, header};

use super::body::Body;
use crate::cache::Fill;

/// The header every registry response carries.
const API_VERSION: (HeaderName, HeaderValue) = (
    HeaderName::from_static("docker-distribution-api-version"),
    HeaderValue::from_static("registry/2.0"),
);

/// The body's length, as the response head announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Known(u64),
    /// Not known when the head is sent (a fill whose upstream did not say): chunked.
    Unknown,
}

/// Status and headers of a response.
pub struct ResponseHead {
    pub status: StatusCode,
    pub length: Length,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// What follows the head.
pub enum Payload {
    Empty,
    Bytes(Bytes),
    /// `len` bytes of a cached file from `start`.
    File {
        file: Arc<File>,
        start: u64,
        len: u64,
    },
    /// Bytes `[start, end)` of a fill in flight (`end` None: to its end).
    Fill {
        fill: Arc<Fill>,
        start: u64,
        end: Option<u64>,
    },
}

impl ResponseHead {
    pub fn new(status: StatusCode, length: Length) -> ResponseHead {
        let mut headers = Vec::with_capacity(8);
        headers.push(API_VERSION);
        ResponseHead {
            status,
            length,
            headers,
        }
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> ResponseHead {
        self.headers.push((name, value));
        self
    }

    /// Adds a header whose value is built at run time; a value that is not a valid header
    /// (never the case for what berth builds) is left out rather than sent broken.
    pub fn header_str(self, name: HeaderName, value: &str) -> ResponseHead {
        match HeaderValue::from_str(value) {
            Ok(v) => self.header(name, v),
            Err(_) => {
                tracing::warn!(header = %name, "response header value is not valid; left out");
                self
            }
        }
    }

    /// Renders for hyper (which adds `date` and, when the length is unknown, chunks).
    pub fn into_hyper(self, body: Body) -> http::Response<Body> {
        let mut r = http::Response::new(body);
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.reserve(self.headers.len() + 1);
        for (name, value) in self.headers {
            h.append(name, value);
        }
        if let Length::Known(n) = self.length {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        r
    }

    /// Renders as HTTP/1.1 bytes, ending with the blank line. `bodyless` for answers that have
    /// the headers of a body but never the body (HEAD).
    pub fn write_http1(&self, out: &mut Vec<u8>, keep_alive: bool, bodyless: bool) {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        match self.length {
            Length::Known(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Length::Unknown if !bodyless => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n")
            }
            Length::Unknown => {}
        }
        out.extend_from_slice(b"date: ");
        with_http_date(|d| out.extend_from_slice(d.as_bytes()));
        out.extend_from_slice(if keep_alive {
            b"\r\nconnection: keep-alive\r\n\r\n"
        } else {
            b"\r\nconnection: close\r\n\r\n"
        });
    }
}

/// Calls `f` with the current HTTP date, formatted once a second per thread.
fn with_http_date(f: impl FnOnce(&str)) {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        f(&c.1);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_renderers_send_the_same_headers() {
        let head = ResponseHead::new(StatusCode::PARTIAL_CONTENT, Length::Known(3))
            .header(header::CONTENT_TYPE, HeaderValue::from_static("a/b"))
            .header_str(header::CONTENT_RANGE, "bytes 0-2/9")
            .header_str(header::ETAG, "bad\nvalue");
        let mut out = Vec::new();
        head.write_http1(&mut out, true, false);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 206 Partial Content\r\n"),
            "{text}"
        );
        for line in [
            "docker-distribution-api-version: registry/2.0\r\n",
            "content-type: a/b\r\n",
            "content-range: bytes 0-2/9\r\n",
            "content-length: 3\r\n",
            "connection: keep-alive\r\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
        assert!(text.ends_with("\r\n\r\n") && !text.contains("etag"));
        let r = head.into_hyper(Body::empty());
        assert_eq!(r.status(), 206);
        assert_eq!(r.headers()["content-range"], "bytes 0-2/9");
        assert_eq!(r.headers()["content-length"], "3");
        assert_eq!(
            r.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );

        let chunked = ResponseHead::new(StatusCode::OK, Length::Unknown);
        let mut out = Vec::new();
        chunked.write_http1(&mut out, false, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("transfer-encoding: chunked\r\n") && text.contains("close"));
        let mut out = Vec::new();
        chunked.write_http1(&mut out, false, true);
        assert!(
            !String::from_utf8(out)
                .unwrap()
                .contains("transfer-encoding")
        );
    }
}
