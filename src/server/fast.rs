//! The zero-copy path for whole-blob GETs on plain HTTP/1.1 connections.
//!
//! A blob GET is the one request that carries real volume, and copying every byte through user
//! space costs more CPU than everything else berth does. So the registry listener reads each
//! request head itself: a `GET` of a blob with no body, no `Range` and no `Upgrade` is answered
//! here with `sendfile(2)` straight from the cached file (or the temp file of a fill in flight);
//! anything else — and anything unusual, including a head that does not parse — is handed, with
//! the bytes already read, to hyper, which serves the connection from then on.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::body::Meter;
use super::handlers::App;
use crate::cache::Piece;
use crate::error::RegistryError;
use crate::metrics::RequestKind;
use crate::mirror::{BlobAnswer, Via};
use crate::oci::{Digest, Reference};
use crate::route::{Route, Target, ns_param};

/// Request heads larger than this go to hyper (which applies its own limits).
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Bytes per sendfile call.
const SENDFILE_CHUNK: usize = 8 * 1024 * 1024;
/// Keep-alive connections idle this long are closed.
const IDLE: Duration = Duration::from_secs(60);

/// What the fast path did with a connection.
pub enum Outcome {
    /// The connection is finished (closed by either side, or an error).
    Done,
    /// Hand the connection to hyper; `buffered` holds bytes already read from it.
    Handoff(Prefixed),
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed {
    buffered: BytesMut,
    stream: TcpStream,
}

impl Prefixed {
    pub fn plain(stream: TcpStream) -> Prefixed {
        Prefixed {
            buffered: BytesMut::new(),
            stream,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.buffered.is_empty() {
            let n = self.buffered.len().min(buf.remaining());
            buf.put_slice(&self.buffered[..n]);
            self.buffered.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What a fast-path request asks for.
enum What {
    /// `GET` of a whole blob.
    Blob(Digest),
    /// `GET` or `HEAD` of a manifest.
    Manifest { reference: Reference, head: bool },
}

/// A request head the fast path takes.
struct FastRequest {
    what: What,
    target: Target,
    path: String,
    keep_alive: bool,
    authorization: Option<String>,
    host: Option<String>,
    accept: Vec<String>,
    /// Sent by another replica asking this one as the blob's owner.
    from_peer: bool,
}

enum Parsed {
    /// More bytes are needed.
    Partial,
    Fast(FastRequest, usize),
    /// Not for the fast path (or not parseable here): hyper decides.
    Other,
}

fn parse(app: &App, buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Other,
    };
    let head = match req.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return Parsed::Other,
    };
    let Some(uri) = req
        .path
        .filter(|p| p.starts_with('/') && p.len() <= super::MAX_URI)
    else {
        return Parsed::Other;
    };
    let version = req.version.unwrap_or(0);
    let mut keep_alive = version == 1;
    let (mut authorization, mut host, mut accept) = (None, None, Vec::new());
    let mut from_peer = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("range")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
            || (name.eq_ignore_ascii_case("content-length") && h.value != b"0")
        {
            return Parsed::Other;
        }
        let text = || std::str::from_utf8(h.value).ok().map(str::to_owned);
        if name.eq_ignore_ascii_case("authorization") {
            if authorization.is_some() {
                return Parsed::Other;
            }
            authorization = text();
        } else if name.eq_ignore_ascii_case("host") {
            host = text();
        } else if name.eq_ignore_ascii_case("accept") {
            accept.extend(text());
        } else if name.eq_ignore_ascii_case(crate::cluster::PEER_HEADER) {
            from_peer = true;
        }
        if name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (uri, None),
    };
    let (what, target) = match app.router.route(path, ns_param(query)) {
        Ok(Route::Blob { target, digest }) if !head => (What::Blob(digest), target),
        Ok(Route::Manifest { target, reference }) => (What::Manifest { reference, head }, target),
        _ => return Parsed::Other,
    };
    Parsed::Fast(
        FastRequest {
            what,
            target,
            path: path.to_owned(),
            keep_alive,
            authorization,
            host,
            accept,
            from_peer,
        },
        n,
    )
}

/// Serves blob GETs on `stream` until it closes or a request for hyper arrives.
pub async fn serve(
    app: Arc<App>,
    mut stream: TcpStream,
    peer: std::net::IpAddr,
    header_timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Outcome {
    let mut buf = BytesMut::with_capacity(4096);
    let mut first = true;
    loop {
        // Wait for a request head: the first within the header timeout, later ones while the
        // connection is idle for at most IDLE.
        let deadline = Instant::now() + if first { header_timeout } else { IDLE };
        let parsed = loop {
            if !buf.is_empty() {
                match parse(&app, &buf) {
                    Parsed::Partial => {}
                    other => break other,
                }
            }
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline.into(), stream.read_buf(&mut buf)) => r,
                // Shutting down: an idle connection just closes.
                _ = shutdown.changed(), if buf.is_empty() => return Outcome::Done,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Outcome::Done,
                Ok(Ok(_)) => {}
            }
        };
        first = false;
        let (req, n) = match parsed {
            Parsed::Fast(req, n) => (req, n),
            _ => {
                return Outcome::Handoff(Prefixed {
                    buffered: buf,
                    stream,
                });
            }
        };
        buf.advance(n);
        let keep_alive = req.keep_alive;
        if respond(&app, &mut stream, req, peer).await.is_err() || !keep_alive {
            return Outcome::Done;
        }
    }
}

async fn respond(
    app: &App,
    stream: &mut TcpStream,
    req: FastRequest,
    peer: std::net::IpAddr,
) -> io::Result<()> {
    let (kind, method) = match &req.what {
        What::Blob(_) => (RequestKind::Blob, http::Method::GET),
        What::Manifest { head: false, .. } => (RequestKind::Manifest, http::Method::GET),
        What::Manifest { head: true, .. } => (RequestKind::Manifest, http::Method::HEAD),
    };
    let mut meter = Meter {
        metrics: app.mirror.metrics_arc(),
        started: Instant::now(),
        kind,
        method,
        path: req.path,
        registry: Some(req.target.registry.clone()),
        user: None,
        status: 200,
        cache: None,
        bytes: 0,
        complete: false,
        aborted: None,
    };
    if let Some(e) = app.over_client_limit(peer) {
        return write_error(stream, &mut meter, &e, None, req.keep_alive).await;
    }
    let auth = app.authorize(
        req.authorization.as_deref(),
        req.host.as_deref(),
        &meter.path,
        Some(&req.target),
    );
    match auth {
        Ok(who) => meter.user = who.map(|w| w.name().to_owned()),
        Err((e, challenge)) => {
            return write_error(stream, &mut meter, &e, challenge.as_deref(), req.keep_alive).await;
        }
    }
    let digest = match req.what {
        What::Blob(d) => d,
        What::Manifest { reference, head } => {
            let accept: Vec<&str> = req.accept.iter().map(String::as_str).collect();
            return match app.mirror.manifest(&req.target, &reference, &accept).await {
                Ok((m, result)) => {
                    app.mirror
                        .metrics()
                        .record_cache(RequestKind::Manifest, result);
                    meter.cache = Some(result);
                    let mut out = Vec::with_capacity(256 + m.header_block.len() + m.bytes.len());
                    out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
                    out.extend_from_slice(&m.header_block);
                    out.extend_from_slice(common_headers(req.keep_alive).as_bytes());
                    if !head {
                        out.extend_from_slice(&m.bytes);
                        meter.bytes += m.bytes.len() as u64;
                    }
                    let sent = stream.write_all(&out).await;
                    meter.complete = sent.is_ok();
                    sent
                }
                Err(e) => write_error(stream, &mut meter, &e, None, req.keep_alive).await,
            };
        }
    };
    let via = Via {
        peer: req.from_peer,
        authorization: req.authorization.as_deref(),
    };
    let answer = app.mirror.blob(&req.target, &digest, false, via).await;
    let (answer, result) = match answer {
        Ok(a) => a,
        Err(e) => return write_error(stream, &mut meter, &e, None, req.keep_alive).await,
    };
    app.mirror.metrics().record_cache(RequestKind::Blob, result);
    meter.cache = Some(result);
    let sent = match answer {
        BlobAnswer::Cached(blob) => {
            write_head(stream, &digest, Some(blob.len), req.keep_alive).await?;
            send_file(stream, &blob.file, 0, blob.len, &mut meter).await
        }
        BlobAnswer::Filling { fill, len } => {
            write_head(stream, &digest, len, req.keep_alive).await?;
            let mut reader = fill.reader(0, len);
            let chunked = len.is_none();
            let mut result = Ok(());
            while let Some(piece) = reader.next_piece().await {
                let step = match piece {
                    Ok(Piece::Chunk(b)) => frame(
                        stream,
                        chunked,
                        b.len() as u64,
                        async |s: &mut TcpStream| s.write_all(&b).await,
                    )
                    .await
                    .map(|()| meter.bytes += b.len() as u64),
                    Ok(Piece::File { file, pos, len }) => {
                        let r = frame(stream, chunked, len as u64, async |s: &mut TcpStream| {
                            send_file(s, &file, pos, len as u64, &mut meter).await
                        })
                        .await;
                        reader.advance(len as u64);
                        r
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = step {
                    result = Err(e);
                    break;
                }
            }
            if result.is_ok() && chunked {
                result = stream.write_all(b"0\r\n\r\n").await;
            }
            result
        }
        BlobAnswer::Head { .. } => Err(io::Error::other("HEAD answer to a GET")),
    };
    match &sent {
        Ok(()) => meter.complete = true,
        Err(e) => meter.aborted = Some(e.to_string()),
    }
    sent
}

/// Writes one body piece, framed as a chunk when the length is unknown.
async fn frame<F>(stream: &mut TcpStream, chunked: bool, len: u64, body: F) -> io::Result<()>
where
    F: AsyncFnOnce(&mut TcpStream) -> io::Result<()>,
{
    if chunked {
        stream.write_all(format!("{len:x}\r\n").as_bytes()).await?;
    }
    body(stream).await?;
    if chunked {
        stream.write_all(b"\r\n").await?;
    }
    Ok(())
}

/// The headers every fast-path response ends with (and the blank line).
fn common_headers(keep_alive: bool) -> String {
    format!(
        "docker-distribution-api-version: registry/2.0\r\ndate: {}\r\nconnection: {}\r\n\r\n",
        http_date(),
        if keep_alive { "keep-alive" } else { "close" }
    )
}

/// The current HTTP date, formatted once a second per thread.
fn http_date() -> String {
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
        c.1.clone()
    })
}

async fn write_head(
    stream: &mut TcpStream,
    digest: &Digest,
    len: Option<u64>,
    keep_alive: bool,
) -> io::Result<()> {
    let length = match len {
        Some(n) => format!("content-length: {n}\r\n"),
        None => "transfer-encoding: chunked\r\n".to_owned(),
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ndocker-content-digest: {digest}\r\n\
         etag: \"{digest}\"\r\naccept-ranges: bytes\r\n{length}{}",
        common_headers(keep_alive)
    );
    stream.write_all(head.as_bytes()).await
}

async fn write_error(
    stream: &mut TcpStream,
    meter: &mut Meter,
    e: &RegistryError,
    challenge: Option<&str>,
    keep_alive: bool,
) -> io::Result<()> {
    let body = e.body();
    let status = e.status();
    meter.status = status.as_u16();
    let mut retry = e
        .retry_after
        .map(|s| format!("retry-after: {s}\r\n"))
        .unwrap_or_default();
    if let Some(c) = challenge {
        retry.push_str(&format!("www-authenticate: {c}\r\n"));
    }
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}{}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        common_headers(keep_alive)
    );
    // A HEAD answer has the body's headers but never the body.
    if meter.method != http::Method::HEAD {
        out.push_str(&body);
        meter.bytes += body.len() as u64;
    }
    stream.write_all(out.as_bytes()).await?;
    meter.complete = true;
    Ok(())
}

/// Sends `len` bytes of `file` from `offset` with sendfile(2), waiting for the socket.
async fn send_file(
    stream: &mut TcpStream,
    file: &std::fs::File,
    offset: u64,
    len: u64,
    meter: &mut Meter,
) -> io::Result<()> {
    let (sock, fd) = (stream.as_raw_fd(), file.as_raw_fd());
    let mut off = i64::try_from(offset).map_err(io::Error::other)?;
    let end = offset + len;
    while (off as u64) < end {
        let want = ((end - off as u64) as usize).min(SENDFILE_CHUNK);
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            // SAFETY: both descriptors are open for the duration of the call (borrowed above),
            // and `off` is a valid pointer to an i64 the kernel advances.
            let n = unsafe { libc::sendfile(sock, fd, &mut off, want) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match sent {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file ended early",
                ));
            }
            Ok(n) => meter.bytes += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
