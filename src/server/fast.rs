//! The fast transport for GET and HEAD on HTTP/1.x connections, plain or TLS.
//!
//! A blob GET is the one request that carries real volume, and moving every byte through hyper's
//! body machinery costs more CPU than everything else berth does. So the registry listener reads
//! each request head itself: a `GET` or `HEAD` with no body and no `Upgrade` or `Expect` goes
//! through the pipeline here, and its reply is written straight from the cached file (or the temp
//! file of a fill in flight) — with `sendfile(2)` on a plain socket, and through one reused
//! buffer sized to whole TLS records on a TLS one ([`Wire`]). Anything else — a request with a
//! body, and anything unusual, including a head that does not parse — is handed, with the bytes
//! already read, to hyper, which serves the connection from then on. No policy lives here: this
//! is a transport.
//!
//! An idle keep-alive connection holds no buffer of this transport: one is taken when bytes
//! arrive and dropped once the request is answered.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

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
/// Bytes read from a file per step on a TLS connection: sixteen full TLS records (16 KiB of
/// plaintext each), encrypted and written with one vectored write per four records.
const TLS_CHUNK: usize = 256 * 1024;
/// Keep-alive connections idle this long are closed.
const IDLE: Duration = Duration::from_secs(60);
/// How long ending a connection may wait to send its close_notify.
const CLOSE_NOTIFY: Duration = Duration::from_secs(5);

/// What the fast transport needs of a connection beyond reading and writing: waiting for a
/// request without holding a buffer, and sending a stretch of a file.
pub trait Wire: AsyncRead + AsyncWrite + Unpin + Send {
    /// Waits until a read would find bytes (or the end), holding nothing while it waits.
    fn ready_to_read(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Whether [`Wire::send_file`] sends without copying the file's bytes (sendfile), so a
    /// fill is better streamed from its temp file than from memory.
    const ZERO_COPY_FILES: bool;

    /// Sends `len` bytes of `file` from `offset`, counting them on `meter` as they go.
    fn send_file(
        &mut self,
        file: &std::fs::File,
        offset: u64,
        len: u64,
        meter: &mut Meter,
    ) -> impl Future<Output = io::Result<()>> + Send;
}

impl Wire for TcpStream {
    const ZERO_COPY_FILES: bool = true;

    async fn ready_to_read(&mut self) -> io::Result<()> {
        self.readable().await
    }

    async fn send_file(
        &mut self,
        file: &std::fs::File,
        offset: u64,
        len: u64,
        meter: &mut Meter,
    ) -> io::Result<()> {
        sendfile(self, file, offset, len, meter).await
    }
}

impl Wire for TlsStream<TcpStream> {
    const ZERO_COPY_FILES: bool = false;

    async fn ready_to_read(&mut self) -> io::Result<()> {
        // Plaintext rustls decrypted already (a pipelined request) is there to read now;
        // otherwise the next bytes have to come from the socket.
        let buffered = {
            let (_, conn) = self.get_mut();
            match io::BufRead::fill_buf(&mut conn.reader()) {
                Ok(b) => !b.is_empty(),
                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            }
        };
        if buffered {
            return Ok(());
        }
        self.get_ref().0.readable().await
    }

    async fn send_file(
        &mut self,
        file: &std::fs::File,
        offset: u64,
        len: u64,
        meter: &mut Meter,
    ) -> io::Result<()> {
        // One buffer per reply, reused for every step: the file's pages are copied into it
        // and rustls encrypts from it into whole records. The read is from the page cache on
        // the runtime thread, as sendfile's is on a plain connection.
        let mut buf = vec![0u8; (len as usize).min(TLS_CHUNK)];
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, pos)?;
            self.write_all(chunk).await?;
            pos += n as u64;
            meter.bytes += n as u64;
        }
        Ok(())
    }
}

/// What the fast path did with a connection.
pub enum Outcome<S> {
    /// The connection is finished (closed by either side, or an error).
    Done,
    /// Hand the connection to hyper; `buffered` holds bytes already read from it.
    Handoff(Prefixed<S>),
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    buffered: BytesMut,
    stream: S,
}

impl<S> Prefixed<S> {
    pub fn plain(stream: S) -> Prefixed<S> {
        Prefixed {
            buffered: BytesMut::new(),
            stream,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
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
        self.stream.is_write_vectored()
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

/// What `parse` made of the bytes so far. The head is boxed: `serve`'s state keeps room for
/// this value while a connection waits for its next request, and a head inline (hundreds of
/// bytes) would be held by every idle keep-alive connection.
enum Parsed {
    /// More bytes are needed.
    Partial,
    Taken(Box<Taken>, usize),
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
    Parsed::Taken(Box::new(Taken { head, keep_alive }), n)
}

/// Serves GET and HEAD requests on `stream` until it closes or a request for hyper arrives.
pub async fn serve<S: Wire>(
    app: Arc<App>,
    mut stream: S,
    peer: std::net::IpAddr,
    header_timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Outcome<S> {
    // No buffer while idle: one is taken when bytes arrive and given back once a request is
    // answered, so a held keep-alive connection costs its socket and a small task, not 4 KiB.
    let mut buf = BytesMut::new();
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
                r = tokio::time::timeout_at(deadline.into(), read_some(&mut stream, &mut buf)) => r,
                // Shutting down: an idle connection just closes.
                _ = shutdown.changed(), if buf.is_empty() => return done(&mut stream).await,
            };
            match read {
                // Closed by the client, or idle too long.
                Ok(Ok(0)) | Err(_) => return done(&mut stream).await,
                Ok(Err(_)) => return Outcome::Done,
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
        let Taken { head, keep_alive } = *taken;
        // Boxed: the state of a request lives on the heap only while it runs, and the
        // connection's own task stays small while it waits for the next one.
        let reply = Box::pin(pipeline::handle(&app, head, None)).await;
        if Box::pin(send(&mut stream, reply, keep_alive))
            .await
            .is_err()
        {
            return Outcome::Done;
        }
        if !keep_alive {
            return done(&mut stream).await;
        }
        if buf.is_empty() {
            buf = BytesMut::new();
        }
    }
}

/// Ends a connection that is in order (answered, idle, or closed by the client): over TLS with
/// close_notify, so the client can tell a finished connection from a cut one, and a FIN on
/// plain TCP. Bounded, as a client that reads nothing more must not hold the task; boxed, so
/// the connection's task keeps no room for it while it waits for a request.
async fn done<S: Wire>(stream: &mut S) -> Outcome<S> {
    let _ = Box::pin(tokio::time::timeout(CLOSE_NOTIFY, stream.shutdown())).await;
    Outcome::Done
}

/// Reads what has arrived, taking a buffer only once the connection is readable.
async fn read_some<S: Wire>(stream: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() == buf.len() {
        if buf.is_empty() {
            stream.ready_to_read().await?;
        }
        buf.reserve(4096);
    }
    stream.read_buf(buf).await
}

/// Writes a reply: the rendered head, then the payload (in one write when it is small, from
/// the cached file or the fill's temp file otherwise), and flushes it.
async fn send<S: Wire>(stream: &mut S, reply: Reply, keep_alive: bool) -> io::Result<()> {
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
            Ok(()) => stream.send_file(&file, start, len, &mut meter).await,
            Err(e) => Err(e),
        },
        Payload::Fill { fill, start, end } => match stream.write_all(&out).await {
            Ok(()) => {
                let reader = fill.reader(start, end);
                let reader = if S::ZERO_COPY_FILES {
                    reader.prefer_file()
                } else {
                    reader
                };
                send_fill(stream, reader, end.is_none(), &mut meter).await
            }
            Err(e) => Err(e),
        },
    };
    // TLS keeps what the socket did not take yet; a plain socket has nothing to flush.
    let sent = match sent {
        Ok(()) => stream.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = &sent {
        meter.aborted = Some(e.to_string());
    }
    sent
}

/// Streams a fill as it arrives, framed as chunks when its length is unknown.
async fn send_fill<S: Wire>(
    stream: &mut S,
    mut reader: FillReader,
    chunked: bool,
    meter: &mut Meter,
) -> io::Result<()> {
    while let Some(piece) = reader.next_piece().await {
        match piece? {
            Piece::Chunk(b) => {
                frame(stream, chunked, b.len() as u64, async |s: &mut S| {
                    s.write_all(&b).await
                })
                .await?;
                meter.bytes += b.len() as u64;
            }
            Piece::File { file, pos, len } => {
                frame(stream, chunked, len as u64, async |s: &mut S| {
                    s.send_file(&file, pos, len as u64, meter).await
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
async fn frame<S: Wire, F>(stream: &mut S, chunked: bool, len: u64, body: F) -> io::Result<()>
where
    F: AsyncFnOnce(&mut S) -> io::Result<()>,
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
async fn sendfile(
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
