//! One fill: a blob streamed from a source into a temp file while hashing, fanned out to every
//! reader as it arrives. Recent chunks stay in a small in-memory ring, so readers that keep up
//! get them without touching the disk; readers that fall behind read the temp file in large
//! pieces. The fill never waits for a reader. The last byte of every response is held back
//! until the digest has been verified, so a corrupt or cut blob can never look complete.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Notify;

use super::blobs::BlobStore;
use crate::error::{ErrorCode, RegistryError};
use crate::metrics::FillFailure;
use crate::oci::{Digest, Hasher};
use crate::route::Target;

/// Bytes of recent chunks kept in memory per fill.
const RING_BYTES: usize = 4 * 1024 * 1024;
/// Chunks are gathered up to this size before they are published.
const PUBLISH_BYTES: usize = 128 * 1024;
/// Largest single read from the temp file for a reader that fell behind.
const READ_BYTES: usize = 256 * 1024;
/// Largest file range handed out at once (sent with sendfile, or read in READ_BYTES pieces).
const FILE_PIECE_BYTES: u64 = 16 * 1024 * 1024;
/// A reader that prefers the temp file waits for bytes to reach it while the disk writer is
/// less than this far behind the source; further behind, it reads the ring like any reader,
/// so a slow disk never slows a client that keeps up.
const DISK_LAG_BYTES: u64 = 2 * 1024 * 1024;
/// How long a reader that prefers the temp file waits for the next batch to reach it before it
/// takes what the ring holds: a source that trickles (or stalls with a part batch gathered)
/// still reaches its clients within this.
const FILE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
/// Batches queued for the disk writer (with WRITE_BATCH_BYTES: at most about 4 MiB held
/// for a slow disk per fill, as many as the ring).
const WRITE_QUEUE: usize = 4;
/// Chunks are handed to the disk writer in batches of about this size: one wake-up of the
/// writer thread per batch, not per chunk. Readers that keep up read the ring, which holds more
/// than a batch, so batching delays no one.
const WRITE_BATCH_BYTES: usize = 1024 * 1024;

/// The bytes of a blob from upstream: its length if known, and the body.
pub struct Source {
    pub len: Option<u64>,
    pub stream: BoxStream<'static, io::Result<Bytes>>,
    /// Where it came from, for the fill log line.
    pub endpoint: String,
    /// Called when the bytes turn out not to be the blob (wrong digest or length), so a store
    /// that holds a damaged copy can drop it instead of serving it again.
    pub on_corrupt: Option<Box<dyn FnOnce() + Send>>,
}

/// Opens the source (sends the upstream request). Errors are what the first clients see.
pub type SourceFuture = BoxFuture<'static, Result<Source, RegistryError>>;

enum Phase {
    Starting,
    Streaming,
    Complete,
    Failed(RegistryError),
}

struct Shared {
    phase: Phase,
    len: Option<u64>,
    received: u64,
    flushed: u64,
    ring: VecDeque<(u64, Bytes)>,
    ring_bytes: usize,
    file: Option<Arc<File>>,
    /// Readers that prefer the temp file ([`FillReader::prefer_file`]): each flush wakes them.
    file_readers: usize,
}

impl Shared {
    fn set_failed(&mut self, err: RegistryError) {
        self.phase = Phase::Failed(err);
        self.ring.clear();
        self.ring_bytes = 0;
    }
}

pub struct Fill {
    pub digest: Digest,
    /// The repository of the request that started it (whose upstream answer it is).
    pub origin: Target,
    shared: Mutex<Shared>,
    notify: Notify,
}

impl Fill {
    pub(super) fn new(digest: Digest, origin: Target) -> Fill {
        Fill {
            digest,
            origin,
            shared: Mutex::new(Shared {
                phase: Phase::Starting,
                len: None,
                received: 0,
                flushed: 0,
                ring: VecDeque::new(),
                ring_bytes: 0,
                file: None,
                file_readers: 0,
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A poisoned lock means a panic elsewhere; the state itself is still consistent
        // because every critical section only assigns plain fields.
        self.shared.lock()
    }

    fn update(&self, f: impl FnOnce(&mut Shared)) {
        f(&mut self.lock());
        self.notify.notify_waiters();
    }

    /// Records how far the temp file is written. Readers are woken only when one may be
    /// waiting for the file: one that prefers it, or one behind the ring. Readers that keep up
    /// from the ring need no wake-up per flushed batch.
    fn set_flushed(&self, flushed: u64) {
        let wake = {
            let mut s = self.lock();
            let before = s.flushed;
            s.flushed = flushed;
            s.file_readers > 0 || s.ring.front().is_none_or(|&(first, _)| first > before)
        };
        if wake {
            self.notify.notify_waiters();
        }
    }

    fn fail(&self, err: RegistryError) {
        self.update(|s| s.set_failed(err));
    }

    /// Fails the fill if it has neither completed nor failed: its task ended without finishing
    /// it (panicked, was cancelled, or returned early), so every reader and waiter gets an
    /// error instead of waiting forever. Returns whether it was unfinished.
    pub(super) fn abandon(&self, why: &str) -> bool {
        let mut unfinished = false;
        self.update(|s| {
            if matches!(s.phase, Phase::Starting | Phase::Streaming) {
                unfinished = true;
                s.set_failed(RegistryError::new(
                    ErrorCode::Unavailable,
                    format!("fill of blob {} abandoned: {why}", self.digest),
                ));
            }
        });
        unfinished
    }

    /// Bytes received from the source so far.
    pub(super) fn received(&self) -> u64 {
        self.lock().received
    }

    /// Whether the blob arrived whole and verified (it may still be on its way to the cache).
    pub fn is_complete(&self) -> bool {
        matches!(self.lock().phase, Phase::Complete)
    }

    /// A reader of bytes `[start, end)` (`end` None: to the end of the blob).
    pub fn reader(self: &Arc<Self>, start: u64, end: Option<u64>) -> FillReader {
        FillReader {
            fill: self.clone(),
            pos: start,
            end,
            prefer_file: false,
            ring_until: 0,
        }
    }

    /// Waits until the source answered: the blob length (None when upstream did not say),
    /// or the error every reader gets.
    pub async fn wait_started(&self) -> Result<Option<u64>, RegistryError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                match &s.phase {
                    Phase::Starting => {}
                    Phase::Failed(e) => return Err(e.clone()),
                    Phase::Streaming | Phase::Complete => return Ok(s.len),
                }
            }
            notified.await;
        }
    }
}

/// A piece of a fill's body.
pub enum Piece {
    Chunk(Bytes),
    File {
        file: Arc<File>,
        pos: u64,
        len: usize,
    },
}

enum Step {
    Chunk(Bytes),
    ReadFile(Arc<File>, u64, usize),
    Wait,
    /// Wait for the disk writer to flush what was received (this much so far).
    WaitFile(u64),
    End,
    Error(io::Error),
}

/// Streams a range of a fill to one client.
pub struct FillReader {
    fill: Arc<Fill>,
    pos: u64,
    end: Option<u64>,
    prefer_file: bool,
    /// A reader that prefers the file takes bytes below this from the ring: they were received
    /// but had not reached the file after [`FILE_WAIT`].
    ring_until: u64,
}

impl Drop for FillReader {
    fn drop(&mut self) {
        if self.prefer_file {
            let mut s = self.fill.lock();
            s.file_readers = s.file_readers.saturating_sub(1);
        }
    }
}

impl FillReader {
    /// Makes this reader take its bytes from the temp file as soon as they are written there,
    /// rather than from the in-memory ring, for a caller that sends file ranges without
    /// copying them (sendfile on a plain socket): the kernel then sends the page cache's pages
    /// and the bytes are not copied once more from memory into the socket. It waits for the
    /// disk writer's batches while that keeps up with the source (within
    /// [`DISK_LAG_BYTES`]) and reads the ring when it does not.
    pub fn prefer_file(mut self) -> FillReader {
        if !self.prefer_file {
            self.prefer_file = true;
            self.fill.lock().file_readers += 1;
        }
        self
    }

    fn step(&mut self) -> Step {
        let s = self.fill.lock();
        let complete = match &s.phase {
            Phase::Starting => return Step::Wait,
            Phase::Failed(e) => {
                return Step::Error(io::Error::other(format!("fill aborted: {}", e.message)));
            }
            Phase::Streaming => false,
            Phase::Complete => true,
        };
        let end = self.end.or(s.len);
        // Readable up to here: everything received, less the response's final byte until the
        // blob is verified.
        let limit = match end {
            Some(end) if self.pos >= end => return Step::End,
            Some(end) if complete => end,
            Some(end) => s.received.min(end - 1),
            None if complete && self.pos >= s.received => return Step::End,
            None => s.received,
        };
        if self.pos >= limit {
            return Step::Wait;
        }
        // A reader that prefers the file reads what is flushed from it (below) and waits for
        // what is not, unless the disk lags or the wait timed out.
        let from_file = self.prefer_file && s.file.is_some();
        if from_file
            && self.pos >= s.flushed
            && self.pos >= self.ring_until
            && s.received - s.flushed < DISK_LAG_BYTES
        {
            return Step::WaitFile(s.received);
        }
        if !(from_file && self.pos < s.flushed)
            && let Some(&(first, _)) = s.ring.front()
            && self.pos >= first
        {
            let idx = s.ring.partition_point(|(off, _)| *off <= self.pos) - 1;
            let (off, chunk) = &s.ring[idx];
            let from = (self.pos - off) as usize;
            let to = (chunk.len() as u64).min(limit - off) as usize;
            if from < to {
                let piece = chunk.slice(from..to);
                self.pos += piece.len() as u64;
                return Step::Chunk(piece);
            }
        }
        match &s.file {
            Some(file) if self.pos < s.flushed => {
                let n = (s.flushed.min(limit) - self.pos).min(FILE_PIECE_BYTES) as usize;
                Step::ReadFile(file.clone(), self.pos, n)
            }
            Some(_) => Step::Wait,
            // The disk failed and the bytes left the ring: this reader fell too far behind.
            None => Step::Error(io::Error::other("reader fell behind an uncached fill")),
        }
    }

    /// The next piece of the body without copying it: a chunk from memory (already
    /// consumed), or a range of the temp file that the caller sends and then [`advance`]s
    /// past. None at the end; an error means the response must be aborted.
    ///
    /// [`advance`]: FillReader::advance
    pub async fn next_piece(&mut self) -> Option<io::Result<Piece>> {
        let fill = self.fill.clone();
        // Started when this call first waits for the file; it bounds that wait.
        let mut file_wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let notified = fill.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.step() {
                Step::Chunk(b) => return Some(Ok(Piece::Chunk(b))),
                Step::ReadFile(file, pos, len) => return Some(Ok(Piece::File { file, pos, len })),
                Step::End => return None,
                Step::Error(e) => return Some(Err(e)),
                Step::Wait => notified.await,
                Step::WaitFile(received) => {
                    let timer =
                        file_wait.get_or_insert_with(|| Box::pin(tokio::time::sleep(FILE_WAIT)));
                    tokio::select! {
                        () = &mut notified => {}
                        () = timer.as_mut() => {
                            self.ring_until = received;
                            file_wait = None;
                        }
                    }
                }
            }
        }
    }

    /// Marks `n` bytes of a [`Piece::File`] as sent.
    pub fn advance(&mut self, n: u64) {
        self.pos += n;
    }

    /// The next piece of the body as bytes in memory.
    pub async fn next(&mut self) -> Option<io::Result<Bytes>> {
        match self.next_piece().await? {
            Ok(Piece::Chunk(b)) => Some(Ok(b)),
            Ok(Piece::File { file, pos, len }) => {
                let len = len.min(READ_BYTES);
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = BytesMut::zeroed(len);
                    file.read_exact_at(&mut buf, pos).map(|()| buf.freeze())
                })
                .await;
                Some(match read {
                    Ok(Ok(b)) => {
                        self.advance(b.len() as u64);
                        Ok(b)
                    }
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(io::Error::other(e)),
                })
            }
            Err(e) => Some(Err(e)),
        }
    }

    pub fn into_stream(self) -> BoxStream<'static, io::Result<Bytes>> {
        futures_util::stream::unfold(self, |mut r| async move {
            let item = r.next().await?;
            Some((item, r))
        })
        .boxed()
    }
}

/// What a finished fill did, for its log line and metrics.
pub(super) struct FillOutcome {
    pub bytes: u64,
    pub endpoint: String,
    pub failure: Option<(FillFailure, String)>,
}

/// Runs one fill to its end. Called on a task of its own, so it survives its clients.
pub(super) async fn run(
    fill: Arc<Fill>,
    store: Arc<BlobStore>,
    source: SourceFuture,
) -> FillOutcome {
    let started = Instant::now();
    let mut source = match source.await {
        Ok(s) => s,
        Err(e) => {
            let msg = e.message.clone();
            fill.fail(e);
            return FillOutcome {
                bytes: 0,
                endpoint: String::new(),
                failure: Some((FillFailure::UpstreamError, msg)),
            };
        }
    };
    let endpoint = source.endpoint.clone();
    let on_corrupt = source.on_corrupt.take();
    let mut tmp = TempFile {
        path: store.temp_path(&fill.digest),
        keep: false,
    };
    let result = stream_to_disk(&fill, &store, source, &tmp.path).await;
    // Committed: the temp file is the blob's file now. Otherwise it goes when `tmp` drops.
    tmp.keep = matches!(result, Ok(true));
    drop(tmp);
    let bytes = fill.received();
    let failure = match result {
        Ok(true) => None,
        Ok(false) => Some((FillFailure::Disk, "verified but not stored".to_owned())),
        Err((reason, err)) => {
            let msg = err.message.clone();
            fill.fail(err);
            if reason == FillFailure::DigestMismatch
                && let Some(drop_copy) = on_corrupt
            {
                drop_copy();
            }
            Some((reason, msg))
        }
    };
    tracing::debug!(digest = %fill.digest, seconds = started.elapsed().as_secs_f64(), "fill ended");
    FillOutcome {
        bytes,
        endpoint,
        failure,
    }
}

/// A fill's temp file. Nothing of a fill that did not reach the cache stays — whether it failed
/// or its task ended early (the future dropped mid-stream) — the file goes now, not at the next
/// start.
struct TempFile {
    path: std::path::PathBuf,
    /// Set once the file was committed (renamed into the cache).
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Ok(cached): the clients got a verified blob; `cached` is false when only the disk failed.
type FillResult = Result<bool, (FillFailure, RegistryError)>;

fn upstream_err(msg: String) -> (FillFailure, RegistryError) {
    (
        FillFailure::UpstreamError,
        RegistryError::new(ErrorCode::Unavailable, msg),
    )
}

async fn stream_to_disk(
    fill: &Arc<Fill>,
    store: &Arc<BlobStore>,
    mut source: Source,
    tmp_path: &std::path::Path,
) -> FillResult {
    let digest = fill.digest.clone();
    // One open for both ends: the writer writes and readers read at explicit offsets, so they
    // can share a file (a second descriptor from dup, not a second path lookup).
    let opened = (|| -> io::Result<(File, File)> {
        let w = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp_path)?;
        let r = w.try_clone()?;
        Ok((w, r))
    })();
    // Without a temp file the blob still streams to its clients from memory, uncached.
    let (writer, reader) = match opened {
        Ok((w, r)) => (Some(w), Some(Arc::new(r))),
        Err(e) => {
            tracing::warn!(digest = %digest, error = %e, "cannot create temp file: streaming without caching");
            (None, None)
        }
    };
    fill.update(|s| {
        s.phase = Phase::Streaming;
        s.len = source.len;
        s.file = reader;
    });

    let (tx, rx) = tokio::sync::mpsc::channel::<ToDisk>(WRITE_QUEUE);
    let writer_task = writer.map(|w| {
        let (fill, store, len) = (fill.clone(), store.clone(), source.len);
        let tmp = tmp_path.to_owned();
        tokio::task::spawn_blocking(move || write_loop(w, rx, &fill, &store, len, &tmp))
    });
    let mut out = Outlet {
        fill,
        tx: writer_task.as_ref().map(|_| tx),
        batch: Vec::new(),
        batch_bytes: 0,
        disk_error: None,
        hasher: Hasher::new(digest.algorithm()),
        received: 0,
    };
    let mut buf = BytesMut::new();

    loop {
        // Gather what is ready into one chunk; publish as soon as the source would wait.
        let item = if buf.is_empty() {
            source.stream.next().await
        } else {
            match source.stream.next().now_or_never() {
                Some(item) => item,
                None => {
                    out.publish(buf.split().freeze()).await;
                    source.stream.next().await
                }
            }
        };
        match item {
            Some(Ok(chunk)) => {
                if source
                    .len
                    .is_some_and(|len| out.received + (buf.len() + chunk.len()) as u64 > len)
                {
                    return Err(upstream_err(
                        "upstream sent more bytes than announced".into(),
                    ));
                }
                if buf.is_empty() && chunk.len() >= PUBLISH_BYTES {
                    out.publish(chunk).await;
                } else {
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= PUBLISH_BYTES {
                        out.publish(buf.split().freeze()).await;
                    }
                }
            }
            Some(Err(e)) => {
                return Err(upstream_err(format!("upstream stream broke: {e}")));
            }
            None => break,
        }
    }
    if !buf.is_empty() {
        out.publish(buf.split().freeze()).await;
    }
    out.send_batch().await;
    let Outlet {
        tx,
        disk_error,
        hasher,
        received,
        ..
    } = out;
    if let Some(len) = source.len
        && received != len
    {
        return Err(upstream_err(format!(
            "upstream sent {received} of {len} bytes"
        )));
    }
    let actual = hasher.finish();
    if actual != digest {
        tracing::error!(digest = %digest, actual = %actual, "digest mismatch: upstream sent wrong bytes; discarded");
        return Err((
            FillFailure::DigestMismatch,
            RegistryError::new(
                ErrorCode::Unavailable,
                format!("upstream sent bytes that do not match {digest}"),
            ),
        ));
    }
    // Verified: readers may have the last byte now (the bytes are in the ring, or written to
    // the temp file as `flushed` says). Persisting — fsync, rename — is the cache's business and
    // stays off the clients' critical path.
    fill.update(|s| {
        s.phase = Phase::Complete;
        s.len = Some(received);
    });
    // The writer thread syncs the file and moves it into the cache: one hand-off per blob.
    if disk_error.is_none()
        && let Some(sender) = &tx
    {
        let _ = sender.send(ToDisk::Commit(received)).await;
    }
    drop(tx);
    let stored = match writer_task {
        Some(task) => match task.await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(io::Error::other(
                disk_error.unwrap_or_else(|| "disk writer stopped".into()),
            )),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(io::Error::other(e)),
        },
        None => Err(io::Error::other("no temp file")),
    };
    match stored {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(digest = %digest, error = %e, "blob verified but not cached (disk)");
            // The temp file goes when `run` drops it. Readers still waiting for bytes from the
            // temp file will not get them.
            fill.update(|s| s.file = None);
            Ok(false)
        }
    }
}

/// Where a fill's chunks go: the hash, the readers (ring), and the disk writer.
struct Outlet<'a> {
    fill: &'a Fill,
    /// None once the disk writer stopped (or never started): the fill goes on from memory.
    tx: Option<tokio::sync::mpsc::Sender<ToDisk>>,
    /// Chunks not yet handed to the writer.
    batch: Vec<Bytes>,
    batch_bytes: usize,
    disk_error: Option<String>,
    hasher: Hasher,
    received: u64,
}

impl Outlet<'_> {
    /// Makes a chunk visible to readers, hashes it and queues it for the disk.
    async fn publish(&mut self, chunk: Bytes) {
        self.hasher.update(&chunk);
        let offset = self.received;
        self.received += chunk.len() as u64;
        let (received, len) = (self.received, chunk.len());
        self.fill.update(|s| {
            s.received = received;
            s.ring.push_back((offset, chunk.clone()));
            s.ring_bytes += len;
            while s.ring_bytes > RING_BYTES && s.ring.len() > 1 {
                if let Some((_, old)) = s.ring.pop_front() {
                    s.ring_bytes -= old.len();
                }
            }
        });
        if self.tx.is_some() {
            self.batch.push(chunk);
            self.batch_bytes += len;
            if self.batch_bytes >= WRITE_BATCH_BYTES {
                self.send_batch().await;
            }
        }
    }

    /// Hands the chunks gathered so far to the disk writer.
    async fn send_batch(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if batch.is_empty() {
            return;
        }
        if let Some(sender) = &self.tx
            && sender.send(ToDisk::Batch(batch)).await.is_err()
        {
            // The writer stopped: the disk failed. Keep streaming from memory, uncached.
            self.tx = None;
            self.disk_error
                .get_or_insert_with(|| "disk writer stopped".into());
            self.fill.update(|s| s.file = None);
        }
    }
}

/// What the fill task hands the disk writer thread.
enum ToDisk {
    /// Chunks to append to the temp file.
    Batch(Vec<Bytes>),
    /// The blob is verified and this long: sync the file and move it into the cache.
    Commit(u64),
}

/// The disk writer thread of one fill: writes batches to the temp file as they come and, when
/// told the blob is verified, syncs it and commits it to the cache. Ok(true) once committed;
/// Ok(false) when the fill ended without a commit (it failed: the temp file is removed by its
/// owner).
fn write_loop(
    file: File,
    mut rx: tokio::sync::mpsc::Receiver<ToDisk>,
    fill: &Fill,
    store: &BlobStore,
    len: Option<u64>,
    tmp_path: &std::path::Path,
) -> io::Result<bool> {
    let mut flushed = 0u64;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            ToDisk::Batch(batch) => {
                for chunk in batch {
                    write_chunk(&file, &chunk, flushed, store, len)?;
                    flushed += chunk.len() as u64;
                }
                fill.set_flushed(flushed);
            }
            ToDisk::Commit(received) => {
                if received != flushed {
                    return Err(io::Error::other(format!(
                        "wrote {flushed} of {received} bytes"
                    )));
                }
                file.sync_all()?;
                store.commit(&fill.digest, tmp_path, received)?;
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Writes one chunk at `pos`. When the disk is full, makes room for the rest of this blob by
/// evicting the least recently used ones, then tries once more.
fn write_chunk(
    file: &File,
    chunk: &[u8],
    pos: u64,
    store: &BlobStore,
    len: Option<u64>,
) -> io::Result<()> {
    match file.write_all_at(chunk, pos) {
        Err(e) if e.kind() == io::ErrorKind::StorageFull => {
            let rest = len.map_or(chunk.len() as u64, |l| l.saturating_sub(pos));
            if store.make_room(rest.max(chunk.len() as u64)) == 0 {
                return Err(e);
            }
            file.write_all_at(chunk, pos)
        }
        written => written,
    }
}
