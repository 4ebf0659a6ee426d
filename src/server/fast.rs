//! The zero-copy transport for GET and HEAD on plain HTTP/1.x connections.
//!
//! A blob GET is the one request that carries real volume, and copying every byte through user
//! space costs more CPU than everything else berth does. So the registry listener reads each
//! request head itself: a `GET` or `HEAD` with no body and no `Upgrade` or `Expect` goes through
//! the pipeline here, and its reply is written with `sendfile(2)` straight from the cached file
//! (or the temp file of a fill in flight); anything else — a request with a body, and anything
//! unusual, including a head that does not parse — is handed, with the bytes already read, to
//! hyper, which serves the connection from then on. No policy lives here: this is a transport.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::meter::Meter;
use super::pipeline::{self, Reply};
use super::request::RequestHead;
use super::response::Payload;
use crate::app::App;
use crate::cache::{FillReader, Piece};

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

/// A request head the zero-copy transport takes: a GET or HEAD on HTTP/1.x with no body.
struct Taken {
    head: RequestHead,
    keep_alive: bool,
}

// A temporary of `parse`, returned once per request: boxing the large variant would cost an
// allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// More bytes are needed.
    Partial,
    Taken(Taken, usize),
    /// Framing this transport does not handle (a body, an upgrade, HTTP/2, a head that does
    /// not parse): hyper decides.
    Other,
}

/// Reads one request head. The only decisions here are about framing; what the request means
/// is the pipeline's.
fn parse(buf: &[u8], client: std::net::IpAddr) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Other,
    };
    let Some(head) = RequestHead::from_httparse(&req, client) else {
        return Parsed::Other;
    };
    if !head.method.is_read() {
        return Parsed::Other;
    }
    let mut keep_alive = req.version == Some(1);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
            || (name.eq_ignore_ascii_case("content-length") && h.value != b"0")
        {
            return Parsed::Other;
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
    Parsed::Taken(Taken { head, keep_alive }, n)
}

/// Serves GET and HEAD requests on `stream` until it closes or a request for hyper arrives.
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
                match parse(&buf, peer) {
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
        let (taken, n) = match parsed {
            Parsed::Taken(t, n) => (t, n),
            _ => {
                return Outcome::Handoff(Prefixed {
                    buffered: buf,
                    stream,
                });
            }
        };
        buf.advance(n);
        let Taken { head, keep_alive } = taken;
        let reply = pipeline::handle(&app, head, None).await;
        if send(&mut stream, reply, keep_alive).await.is_err() || !keep_alive {
            return Outcome::Done;
        }
    }
}

/// Writes a reply: the rendered head, then the payload (in one write when it is small, with
/// sendfile from the cached file or the fill's temp file otherwise).
async fn send(stream: &mut TcpStream, reply: Reply, keep_alive: bool) -> io::Result<()> {
    let Reply {
        head,
        payload,
        mut meter,
    } = reply;
    let bodyless = matches!(payload, Payload::Empty);
    let small = match &payload {
        Payload::Bytes(b) => b.len(),
        _ => 0,
    };
    // One allocation for the head and a small body, sent with one write.
    let mut out = Vec::with_capacity(512 + small);
    head.write_http1(&mut out, keep_alive, bodyless);
    let sent = match payload {
        Payload::Empty => stream.write_all(&out).await,
        Payload::Bytes(b) => {
            out.extend_from_slice(&b);
            let r = stream.write_all(&out).await;
            if r.is_ok() {
                meter.bytes += b.len() as u64;
            }
            r
        }
        Payload::File { file, start, len } => match stream.write_all(&out).await {
            Ok(()) => send_file(stream, &file, start, len, &mut meter).await,
            Err(e) => Err(e),
        },
        Payload::Fill { fill, start, end } => match stream.write_all(&out).await {
            Ok(()) => send_fill(stream, fill.reader(start, end), end.is_none(), &mut meter).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = &sent {
        meter.aborted = Some(e.to_string());
    }
    sent
}

/// Streams a fill as it arrives, framed as chunks when its length is unknown.
async fn send_fill(
    stream: &mut TcpStream,
    mut reader: FillReader,
    chunked: bool,
    meter: &mut Meter,
) -> io::Result<()> {
    while let Some(piece) = reader.next_piece().await {
        match piece? {
            Piece::Chunk(b) => {
                frame(
                    stream,
                    chunked,
                    b.len() as u64,
                    async |s: &mut TcpStream| s.write_all(&b).await,
                )
                .await?;
                meter.bytes += b.len() as u64;
            }
            Piece::File { file, pos, len } => {
                frame(stream, chunked, len as u64, async |s: &mut TcpStream| {
                    send_file(s, &file, pos, len as u64, meter).await
                })
                .await?;
                reader.advance(len as u64);
            }
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
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
