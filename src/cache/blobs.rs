//! The blob store: content-addressed files under `<dir>/blobs/<alg>/<xx>/<hex>`, an in-memory
//! LRU index weighted by size (evicting files beyond `max_size`), and the table of fills in
//! flight so that each blob is fetched once however many clients ask for it.
//!
//! This is the seam a shared object store plugs into: callers only `lookup`, `fill` and read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

use super::fill::{self, Fill, FillOutcome, SourceFuture};
use super::{unix_now, unix_secs};
use crate::metrics::{FillFailure, Metrics};
use crate::oci::{Digest, DigestAlgorithm};
use crate::route::Target;

/// A verified blob on disk, opened: reading from the handle works even if it is evicted now.
pub struct CachedBlob {
    pub file: Arc<File>,
    pub len: u64,
}

pub struct BlobStore {
    root: PathBuf,
    tmp: PathBuf,
    index: moka::sync::Cache<Digest, Arc<Entry>>,
    /// A logical clock for last use, so the disk-full path can find the least recently used
    /// blobs (moka keeps its LRU order to itself).
    clock: AtomicU64,
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    /// The last [`RECENT_EVICTIONS`] blobs evicted, newest last (for the status page; the
    /// counts are `berth_cache_evictions_total` and `berth_cache_evicted_bytes_total`).
    recent_evictions: Arc<Mutex<VecDeque<Eviction>>>,
    max_size: u64,
    /// Pinned blobs that are cached: kept out of the LRU index, so never evicted.
    pinned: Mutex<HashMap<Digest, Arc<Entry>>>,
    /// Every pinned digest, cached or not yet: a blob in it is pinned when it is stored.
    pin_set: RwLock<HashSet<Digest>>,
    pinned_bytes: AtomicU64,
}

/// A blob's file gets its modification time set to its last pull at most this often, so that
/// last-pulled times (`max_idle`) survive a restart at one metadata write per blob per period.
const TOUCH_EVERY: u64 = 3600;

/// How many evicted blobs [`BlobStore::recent_evictions`] remembers.
pub const RECENT_EVICTIONS: usize = 20;

/// A blob evicted from the cache: which, how large, and when.
#[derive(Debug, Clone)]
pub struct Eviction {
    pub digest: Digest,
    pub bytes: u64,
    pub at: SystemTime,
}

fn remember_eviction(recent: &Mutex<VecDeque<Eviction>>, digest: Digest, bytes: u64) {
    let mut r = recent.lock();
    if r.len() >= RECENT_EVICTIONS {
        r.pop_front();
    }
    r.push_back(Eviction {
        digest,
        bytes,
        at: SystemTime::now(),
    });
}

/// What the index knows of a cached blob.
struct Entry {
    len: u64,
    used: AtomicU64,
    /// When it was last pulled (seconds since the epoch).
    pulled: AtomicU64,
    /// When its file's modification time was last set to `pulled`.
    touched: AtomicU64,
}

/// Index weights are KiB (moka weighs in u32), so one blob may be up to 4 TiB.
fn weight(len: u64) -> u32 {
    u32::try_from(len.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl BlobStore {
    pub fn open(dir: &Path, max_size: u64, metrics: Arc<Metrics>) -> io::Result<Arc<BlobStore>> {
        let root = dir.join("blobs");
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&tmp)?;
        // Off the start-up path: making 256 directories in a fresh cache takes 20–350 ms on
        // ext4, and nothing needs them made first (a commit makes a missing shard itself).
        let shards_root = root.clone();
        std::thread::Builder::new()
            .name("berth-shards".into())
            .spawn(move || {
                if let Err(e) = make_shards(&shards_root) {
                    tracing::warn!(dir = %shards_root.display(), error = %e, "cannot make the blob shard directories; blobs make theirs when stored");
                }
            })?;
        metrics.cache_max_size_bytes.set(max_size as i64);
        let evict_metrics = metrics.clone();
        let recent_evictions = Arc::new(Mutex::new(VecDeque::with_capacity(RECENT_EVICTIONS)));
        let evict_recent = recent_evictions.clone();
        // Evicted files are deleted off the async threads (moka runs the listener wherever its
        // maintenance happens to run, which is often a request's thread).
        let (delete_tx, delete_rx) = std::sync::mpsc::channel::<Digest>();
        let index = moka::sync::Cache::builder()
            .max_capacity(max_size / 1024)
            .weigher(|_: &Digest, e: &Arc<Entry>| weight(e.len))
            // LRU, not TinyLFU: a new blob must never be refused (and its file deleted).
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |digest: Arc<Digest>, e: Arc<Entry>, cause| {
                if cause == RemovalCause::Replaced {
                    return;
                }
                let len = e.len;
                evict_metrics.cache_size_bytes.sub(len as i64);
                evict_metrics.cache_blobs.dec();
                if cause == RemovalCause::Size {
                    evict_metrics.cache_evictions.inc();
                    evict_metrics.cache_evicted_bytes.inc_by(len);
                    remember_eviction(&evict_recent, (*digest).clone(), len);
                    let _ = delete_tx.send((*digest).clone());
                    tracing::debug!(digest = %digest, bytes = len, "evicted blob");
                }
            })
            .build();
        let store = Arc::new(BlobStore {
            root,
            tmp,
            index,
            clock: AtomicU64::new(1),
            fills: Mutex::new(HashMap::new()),
            metrics,
            ready: AtomicBool::new(false),
            recent_evictions,
            max_size,
            pinned: Mutex::new(HashMap::new()),
            pin_set: RwLock::new(HashSet::new()),
            pinned_bytes: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("berth-evict".into())
            .spawn(move || {
                while let Ok(digest) = delete_rx.recv() {
                    let Some(store) = weak.upgrade() else { return };
                    // Filled again since it was evicted: the file is the new one; keep it.
                    if store.index.contains_key(&digest) {
                        continue;
                    }
                    let path = blob_path(&store.root, &digest);
                    if let Err(e) = std::fs::remove_file(&path)
                        && e.kind() != io::ErrorKind::NotFound
                    {
                        tracing::warn!(path = %path.display(), error = %e, "cannot delete evicted blob");
                    }
                }
            })?;
        Ok(store)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Rebuilds the index from the directory (oldest first, so LRU order roughly survives a
    /// restart) and removes temp files left by a crash. Blocking: run it off the runtime.
    pub fn scan(&self) -> io::Result<usize> {
        let started = Instant::now();
        for entry in std::fs::read_dir(&self.tmp)? {
            let path = entry?.path();
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove stale temp file");
            }
        }
        let mut found: Vec<(SystemTime, Digest, u64)> = Vec::new();
        for alg in [DigestAlgorithm::Sha256, DigestAlgorithm::Sha512] {
            let alg_dir = self.root.join(alg.as_str());
            let Ok(prefixes) = std::fs::read_dir(&alg_dir) else {
                continue;
            };
            for prefix in prefixes.flatten() {
                let Ok(files) = std::fs::read_dir(prefix.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let name = f.file_name();
                    let parsed = name
                        .to_str()
                        .and_then(|hex| format!("{}:{hex}", alg.as_str()).parse::<Digest>().ok());
                    let Some(digest) = parsed else {
                        tracing::warn!(path = %f.path().display(), "ignoring unexpected file in the blob store");
                        continue;
                    };
                    if let Ok(meta) = f.metadata() {
                        // The last pull: the modification time (set on pulls, see
                        // TOUCH_EVERY), or the access time where the file system keeps it.
                        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        let when = meta.accessed().map_or(modified, |a| a.max(modified));
                        found.push((when, digest, meta.len()));
                    }
                }
            }
        }
        found.sort_by_key(|(when, _, _)| *when);
        let n = found.len();
        for (when, digest, len) in found {
            self.insert(digest, len, unix_secs(when));
        }
        self.index.run_pending_tasks();
        self.ready.store(true, Ordering::Release);
        let secs = started.elapsed().as_secs_f64();
        self.metrics.cache_scan_seconds.observe(secs);
        tracing::info!(
            blobs = n,
            bytes = self.metrics.cache_size_bytes.get(),
            seconds = secs,
            "cache index loaded"
        );
        Ok(n)
    }

    /// Indexes a blob on disk: in the pinned table when it is pinned, else in the LRU index.
    fn insert(&self, digest: Digest, len: u64, pulled: u64) {
        if self.index.contains_key(&digest) {
            return;
        }
        let entry = Arc::new(Entry {
            len,
            used: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
            pulled: AtomicU64::new(pulled),
            touched: AtomicU64::new(pulled),
        });
        if self.pin_set.read().contains(&digest) {
            let mut pinned = self.pinned.lock();
            if pinned.contains_key(&digest) {
                return;
            }
            pinned.insert(digest, entry);
            self.pinned_bytes.fetch_add(len, Ordering::Relaxed);
            self.metrics.cache_pinned_bytes.add(len as i64);
        } else {
            self.index.insert(digest, entry);
        }
        self.metrics.cache_size_bytes.add(len as i64);
        self.metrics.cache_blobs.inc();
    }

    /// Deletes the least recently used evictable blobs until `need` bytes are freed (or none
    /// is left). Returns the bytes freed. Blocking.
    fn evict_lru(&self, need: u64) -> u64 {
        let mut entries: Vec<(Arc<Digest>, Arc<Entry>)> = self.index.iter().collect();
        entries.sort_by_key(|(_, e)| e.used.load(Ordering::Relaxed));
        let mut freed = 0;
        for (digest, e) in entries {
            if freed >= need {
                break;
            }
            if self.evict(&digest, &e) {
                freed += e.len;
            }
        }
        self.index.run_pending_tasks();
        freed
    }

    /// Evicts one blob of the LRU index: forgets it, deletes its file, counts it.
    fn evict(&self, digest: &Digest, e: &Entry) -> bool {
        self.index.invalidate(digest);
        if std::fs::remove_file(blob_path(&self.root, digest)).is_err() {
            return false;
        }
        self.metrics.cache_evictions.inc();
        self.metrics.cache_evicted_bytes.inc_by(e.len);
        remember_eviction(&self.recent_evictions, digest.clone(), e.len);
        true
    }

    /// Disk full: deletes the least recently used blobs until `need` bytes are freed (or the
    /// cache is empty). Returns the bytes freed. Blocking.
    pub fn make_room(&self, need: u64) -> u64 {
        let freed = self.evict_lru(need);
        tracing::warn!(
            need,
            freed,
            "disk full: evicted least recently used blobs to make room"
        );
        freed
    }

    /// Pinned bytes count toward `max_size` but are not in the LRU index (whose capacity is
    /// `max_size`): with pins, evict from the index until both together fit. Blocking.
    fn enforce_max_size(&self) {
        let pinned = self.pinned_bytes.load(Ordering::Relaxed);
        if pinned == 0 {
            return;
        }
        self.index.run_pending_tasks();
        let used = self.index.weighted_size() * 1024 + pinned;
        if used > self.max_size {
            self.evict_lru(used - self.max_size);
        }
    }

    /// Pins exactly `set`: its cached blobs leave the LRU index (never evicted), blobs of it
    /// stored later are pinned as they arrive, and blobs no longer in it become evictable
    /// again (most recently used). Blocking (it may evict to keep `max_size`).
    pub fn set_pinned(&self, set: HashSet<Digest>) {
        {
            let mut pinned = self.pinned.lock();
            *self.pin_set.write() = set.clone();
            let unpinned: Vec<Digest> = pinned
                .keys()
                .filter(|d| !set.contains(*d))
                .cloned()
                .collect();
            for d in unpinned {
                if let Some(e) = pinned.remove(&d) {
                    self.pinned_bytes.fetch_sub(e.len, Ordering::Relaxed);
                    self.metrics.cache_pinned_bytes.sub(e.len as i64);
                    e.used.store(
                        self.clock.fetch_add(1, Ordering::Relaxed),
                        Ordering::Relaxed,
                    );
                    self.index.insert(d, e);
                }
            }
            for d in &set {
                if pinned.contains_key(d) {
                    continue;
                }
                // Removing from the index counts the blob out of the size metrics (an
                // explicit removal deletes no file); the pinned table counts it back in.
                if let Some(e) = self.index.remove(d) {
                    self.pinned_bytes.fetch_add(e.len, Ordering::Relaxed);
                    self.metrics.cache_pinned_bytes.add(e.len as i64);
                    self.metrics.cache_size_bytes.add(e.len as i64);
                    self.metrics.cache_blobs.inc();
                    pinned.insert(d.clone(), e);
                }
            }
        }
        self.enforce_max_size();
    }

    /// Forgets a pinned blob whose file is gone (it stays in the pin set).
    fn forget_pinned(&self, digest: &Digest) {
        if let Some(e) = self.pinned.lock().remove(digest) {
            self.pinned_bytes.fetch_sub(e.len, Ordering::Relaxed);
            self.metrics.cache_pinned_bytes.sub(e.len as i64);
            self.metrics.cache_size_bytes.sub(e.len as i64);
            self.metrics.cache_blobs.dec();
        }
    }

    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.pin_set.read().contains(digest)
    }

    /// Bytes of pinned blobs on disk.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes.load(Ordering::Relaxed)
    }

    /// Whether a new fill of `digest` may start: pinned blobs always; others not once pinned
    /// blobs fill `max_size` (the cache would exceed it by more than the one blob).
    pub fn may_fill(&self, digest: &Digest) -> bool {
        self.pinned_bytes() < self.max_size || self.is_pinned(digest)
    }

    /// Evicts the blobs not pulled for `max_idle` (pinned blobs never). Returns how many
    /// and their bytes. Blocking.
    pub fn evict_idle(&self, max_idle: Duration) -> (usize, u64) {
        let cutoff = unix_now().saturating_sub(max_idle.as_secs());
        let (mut n, mut bytes) = (0, 0);
        let idle: Vec<(Arc<Digest>, Arc<Entry>)> = self
            .index
            .iter()
            .filter(|(_, e)| e.pulled.load(Ordering::Relaxed) < cutoff)
            .collect();
        for (digest, e) in idle {
            // A fill of the same digest may have replaced the entry since.
            let still = self
                .index
                .get(&*digest)
                .is_some_and(|now| Arc::ptr_eq(&now, &e));
            if still && self.evict(&digest, &e) {
                n += 1;
                bytes += e.len;
            }
        }
        self.index.run_pending_tasks();
        if n > 0 {
            tracing::info!(
                blobs = n,
                bytes,
                max_idle = %humantime::format_duration(max_idle),
                "evicted blobs not pulled within max_idle"
            );
        }
        (n, bytes)
    }

    fn entry(&self, digest: &Digest) -> Option<Arc<Entry>> {
        self.index
            .get(digest)
            .or_else(|| self.pinned.lock().get(digest).cloned())
    }

    /// Opens a cached blob, marking it recently used.
    /// The size of a cached blob, if it is on disk.
    pub fn len_of(&self, digest: &Digest) -> Option<u64> {
        std::fs::metadata(blob_path(&self.root, digest))
            .ok()
            .map(|m| m.len())
    }

    /// Removes a blob from the cache (a purge). Clients streaming it keep reading their open
    /// file; the next request fetches it again.
    pub fn remove(&self, digest: &Digest) -> io::Result<bool> {
        self.index.invalidate(digest);
        self.forget_pinned(digest);
        match std::fs::remove_file(blob_path(&self.root, digest)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The file of a cached, verified blob (for a hosted push of the same bytes to link). A
    /// file at a blob's path is always complete and verified (fills rename it there after the
    /// digest matched), whether or not the index has caught up with it.
    pub fn path_if_cached(&self, digest: &Digest) -> Option<PathBuf> {
        let path = blob_path(&self.root, digest);
        path.exists().then_some(path)
    }

    pub fn lookup(&self, digest: &Digest) -> Option<CachedBlob> {
        let entry = self.entry(digest);
        if let Some(e) = &entry {
            e.used.store(
                self.clock.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        let known = entry.as_ref().map(|e| e.len);
        if known.is_none() && self.is_ready() {
            return None;
        }
        let path = blob_path(&self.root, digest);
        match File::open(&path) {
            Ok(file) => {
                let len = match known {
                    Some(len) => len,
                    None => {
                        // Still scanning at start-up: the file on disk is authoritative.
                        let len = file.metadata().ok()?.len();
                        self.insert(digest.clone(), len, unix_now());
                        len
                    }
                };
                if let Some(e) = &entry {
                    touch(e, &file);
                }
                Some(CachedBlob {
                    file: Arc::new(file),
                    len,
                })
            }
            Err(_) => {
                if known.is_some() {
                    tracing::warn!(digest = %digest, "indexed blob is missing on disk; forgetting it");
                    self.index.invalidate(digest);
                    self.forget_pinned(digest);
                }
                None
            }
        }
    }

    /// Joins the fill of `digest` in flight, or starts one with `source`. Returns the fill and
    /// whether it was joined (coalesced) rather than started.
    pub fn fill(
        self: &Arc<Self>,
        digest: &Digest,
        origin: &Target,
        source: impl FnOnce(&Arc<Fill>) -> SourceFuture,
    ) -> (Arc<Fill>, bool) {
        let mut fills = self.fills.lock();
        if let Some(f) = fills.get(digest) {
            return (f.clone(), true);
        }
        let f = Arc::new(Fill::new(digest.clone(), origin.clone()));
        fills.insert(digest.clone(), f.clone());
        drop(fills);
        self.metrics.fills_in_flight.inc();
        // From here on the guard owns the fill's place in the table: however the task ends
        // (or if it never runs), the fill leaves the table and its readers hear of it.
        let mut guard = FillGuard {
            store: self.clone(),
            fill: f.clone(),
            started: Instant::now(),
            outcome: None,
        };
        let fut = source(&f);
        tokio::spawn(async move {
            let outcome = fill::run(guard.fill.clone(), guard.store.clone(), fut).await;
            guard.ran(outcome);
        });
        (f, false)
    }

    pub(super) fn temp_path(&self, digest: &Digest) -> PathBuf {
        let nonce: u64 = rand::random();
        self.tmp.join(format!("{}-{nonce:016x}", digest.hex()))
    }

    /// Moves a verified, synced temp file into place and indexes it. Blocking.
    pub(super) fn commit(&self, digest: &Digest, tmp: &Path, len: u64) -> io::Result<()> {
        let path = blob_path(&self.root, digest);
        let shard = path.parent().unwrap_or(&self.root);
        match std::fs::rename(tmp, &path) {
            // A digest algorithm without made shards, or a shard removed by hand.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(shard)?;
                std::fs::rename(tmp, &path)?;
            }
            renamed => renamed?,
        }
        // The directory is not synced: the file's bytes are (before the rename), so after a
        // crash the blob is either here whole or still under its temp name, which start-up
        // removes — a lost rename costs a refetch, never a damaged blob.
        self.insert(digest.clone(), len, unix_now());
        // Evict now, so the disk never holds much more than max_size.
        self.index.run_pending_tasks();
        self.enforce_max_size();
        Ok(())
    }

    /// Waits until no fill is in flight, at most `limit` (for a graceful shutdown: a verified
    /// blob should reach the cache before the process exits).
    pub async fn wait_idle(&self, limit: std::time::Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.fills.lock().is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tracing::warn!("shutting down with fills still in flight; they restart on demand");
    }

    /// The last blobs evicted, newest first (at most [`RECENT_EVICTIONS`]).
    pub fn recent_evictions(&self) -> Vec<Eviction> {
        self.recent_evictions.lock().iter().rev().cloned().collect()
    }

    /// The size of every blob in the index (without marking any as used). Blocking: it walks
    /// the whole index.
    pub fn sizes(&self) -> HashMap<Arc<Digest>, u64> {
        let mut all: HashMap<Arc<Digest>, u64> =
            self.index.iter().map(|(d, e)| (d, e.len)).collect();
        for (d, e) in self.pinned.lock().iter() {
            all.insert(Arc::new(d.clone()), e.len);
        }
        all
    }

    /// Applies pending evictions now (tests and metrics scrapes).
    pub fn run_pending(&self) {
        self.index.run_pending_tasks();
    }
}

/// Marks a blob pulled now; at most every [`TOUCH_EVERY`], also on its file (see there).
fn touch(e: &Entry, file: &File) {
    let now = unix_now();
    e.pulled.store(now, Ordering::Relaxed);
    if now >= e.touched.load(Ordering::Relaxed) + TOUCH_EVERY {
        e.touched.store(now, Ordering::Relaxed);
        if let Err(err) = file.set_modified(SystemTime::now()) {
            tracing::debug!(error = %err, "cannot record a blob's last pull on its file");
        }
    }
}

/// The task that drives one fill, as far as the in-flight table is concerned. Dropped when the
/// task ends — it finished, panicked, or was cancelled (its future dropped, as at runtime
/// shutdown) — it removes the fill from the table, so the next request starts a fresh fill,
/// and fails a fill left unfinished (pingora calls such a lock "dangling"), so no reader or
/// waiter of it waits forever. Then it logs and counts the outcome.
struct FillGuard {
    store: Arc<BlobStore>,
    fill: Arc<Fill>,
    started: Instant,
    /// What `fill::run` returned, once it did.
    outcome: Option<FillOutcome>,
}

impl FillGuard {
    fn ran(&mut self, outcome: FillOutcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        let (store, fill) = (&self.store, &self.fill);
        {
            let mut fills = store.fills.lock();
            if fills
                .get(&fill.digest)
                .is_some_and(|f| Arc::ptr_eq(f, fill))
            {
                fills.remove(&fill.digest);
            }
        }
        store.metrics.fills_in_flight.dec();
        let why = if std::thread::panicking() {
            "its task panicked"
        } else {
            "its task ended before the fill did"
        };
        let unfinished = fill.abandon(why);
        let outcome = match self.outcome.take() {
            Some(outcome) if !unfinished => outcome,
            // Unfinished (now failed), or verified but never stored.
            _ => FillOutcome {
                bytes: fill.received(),
                endpoint: String::new(),
                failure: Some((FillFailure::Cancelled, why.to_owned())),
            },
        };
        let (registry, repo) = (&*fill.origin.registry, fill.origin.repo.as_str());
        let seconds = self.started.elapsed().as_secs_f64();
        match &outcome.failure {
            None => tracing::info!(
                registry, repository = repo, digest = %fill.digest, bytes = outcome.bytes,
                seconds, endpoint = outcome.endpoint, outcome = "cached", "fill"
            ),
            Some((reason, msg)) => {
                store.metrics.record_fill_failure(registry, *reason);
                tracing::warn!(
                    registry, repository = repo, digest = %fill.digest, bytes = outcome.bytes,
                    seconds, endpoint = outcome.endpoint, outcome = reason.as_str(), error = %msg, "fill"
                );
            }
        }
    }
}

/// Makes the 256 directories of sha256 blobs (`blobs/sha256/00` … `ff`) once, at start (on a
/// thread of its own), so storing a blob needs no mkdir: creating a directory (an inode, a
/// directory block) costs more than the rest of a small blob's commit, and every new blob would
/// otherwise pay it until the cache holds a blob under each prefix.
fn make_shards(root: &Path) -> io::Result<()> {
    let alg = root.join(crate::oci::DigestAlgorithm::Sha256.as_str());
    std::fs::create_dir_all(&alg)?;
    let mut made = false;
    for prefix in 0..=255u8 {
        match std::fs::create_dir(alg.join(format!("{prefix:02x}"))) {
            Ok(()) => made = true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    if made {
        File::open(&alg)?.sync_all()?;
    }
    Ok(())
}

fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    root.join(digest.algorithm().as_str())
        .join(&hex[..2])
        .join(hex)
}

#[cfg(test)]
mod tests {
    use std::task::Poll;
    use std::time::Duration;

    use std::os::unix::fs::FileExt;

    use bytes::Bytes;
    use futures_util::stream::BoxStream;
    use futures_util::{FutureExt, StreamExt};

    use super::*;
    use crate::cache::{FillReader, Piece, Source};

    /// How long a reader may wait before the test calls it left waiting forever.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn origin() -> Target {
        Target {
            registry: "docker.io".into(),
            repo: "library/app".parse().unwrap(),
        }
    }

    fn blob(len: usize) -> Bytes {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn source(len: usize, stream: BoxStream<'static, io::Result<Bytes>>) -> SourceFuture {
        let source = Source {
            len: Some(len as u64),
            stream,
            endpoint: "test".into(),
            on_corrupt: None,
        };
        futures_util::future::ready(Ok(source)).boxed()
    }

    /// A source that sends `data` whole.
    fn whole(data: &Bytes) -> SourceFuture {
        let stream = futures_util::stream::iter([Ok(data.clone())]).boxed();
        source(data.len(), stream)
    }

    /// A source that sends the first `sent` bytes of `data`, then panics (a bug in a source).
    fn panicking(data: &Bytes, sent: usize) -> SourceFuture {
        let head = futures_util::stream::iter([Ok(data.slice(..sent))]);
        let panic = futures_util::stream::poll_fn(|_| -> Poll<Option<io::Result<Bytes>>> {
            panic!("a source that panics mid-body (expected by this test)")
        });
        source(data.len(), head.chain(panic).boxed())
    }

    async fn read_all(fill: &Arc<Fill>) -> io::Result<Vec<u8>> {
        let mut reader = fill.reader(0, None);
        let mut out = Vec::new();
        while let Some(chunk) = reader.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// Checks what must follow a fill whose task ended early: every reader and waiter has an
    /// error, the failure is counted as `cancelled`, and the next request for the digest starts
    /// a fresh fill that serves — and caches — the verified bytes.
    async fn assert_recovers(store: &Arc<BlobStore>, broken: &Arc<Fill>, data: &Bytes) {
        let digest = Digest::sha256_of(data);
        let read = tokio::time::timeout(PATIENCE, read_all(broken)).await;
        let err = read.expect("the reader is not left waiting").unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
        let waited = tokio::time::timeout(PATIENCE, broken.wait_started()).await;
        let err = waited.expect("the waiter is not left waiting").unwrap_err();
        assert!(err.message.contains("abandoned"), "{}", err.message);
        assert_eq!(
            store
                .metrics
                .fill_failures
                .with_label_values(&["docker.io", "cancelled"])
                .get(),
            1
        );

        let (fresh, joined) = store.fill(&digest, &origin(), |_| whole(data));
        assert!(!joined, "the next request starts a fill of its own");
        assert!(!Arc::ptr_eq(&fresh, broken));
        let got = tokio::time::timeout(PATIENCE, read_all(&fresh)).await;
        assert_eq!(got.unwrap().unwrap(), &data[..]);
        for _ in 0..500 {
            if store.lookup(&digest).is_some() && store.metrics.fills_in_flight.get() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cached = store
            .lookup(&digest)
            .expect("the fresh fill reached the cache");
        let mut on_disk = vec![0; cached.len as usize];
        cached.file.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, &data[..]);
        assert_eq!(store.metrics.fills_in_flight.get(), 0);
        assert_eq!(
            std::fs::read_dir(&store.tmp).unwrap().count(),
            0,
            "no temp file is left behind"
        );
    }

    /// A fresh store, and a blob of `len` bytes with its digest.
    fn setup(len: usize) -> (tempfile::TempDir, Arc<BlobStore>, Bytes, Digest) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 1 << 30, Arc::new(Metrics::new())).unwrap();
        let data = blob(len);
        let digest = Digest::sha256_of(&data);
        (dir, store, data, digest)
    }

    #[tokio::test]
    async fn a_fill_whose_task_panics_fails_its_readers_and_the_next_request_fills_again() {
        let (_dir, store, data, digest) = setup(300 * 1024);
        let (broken, joined) = store.fill(&digest, &origin(), |_| panicking(&data, 200 * 1024));
        assert!(!joined);
        let (same, joined) = store.fill(&digest, &origin(), |_| whole(&data));
        assert!(joined && Arc::ptr_eq(&same, &broken));
        assert_recovers(&store, &broken, &data).await;
    }

    #[tokio::test]
    async fn a_fill_whose_source_panics_fails_its_waiters_and_the_next_request_fills_again() {
        let (_dir, store, data, digest) = setup(1000);
        let (broken, _) = store.fill(&digest, &origin(), |_| {
            async { panic!("a source that panics before it answers (expected by this test)") }
                .boxed()
        });
        assert_recovers(&store, &broken, &data).await;
    }

    #[tokio::test]
    async fn a_fill_whose_task_is_cancelled_fails_its_waiters_and_the_next_request_fills_again() {
        let (_dir, store, data, digest) = setup(1000);
        // The fill runs on a runtime of its own, waiting for a source that never answers;
        // dropping that runtime drops (cancels) the fill's task.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (cancel_tx, cancel_rx) = std::sync::mpsc::channel::<()>();
        let (s, d) = (store.clone(), digest.clone());
        let driver = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (fill, _) = s.fill(&d, &origin(), |_| futures_util::future::pending().boxed());
                // Let the fill's task start and wait on its source.
                tokio::task::yield_now().await;
                let _ = started_tx.send(fill);
            });
            let _ = cancel_rx.recv_timeout(PATIENCE);
            drop(rt);
        });
        let broken = tokio::time::timeout(PATIENCE, started_rx)
            .await
            .unwrap()
            .unwrap();
        let waiter = tokio::spawn({
            let broken = broken.clone();
            async move { tokio::time::timeout(PATIENCE, broken.wait_started()).await }
        });
        let (same, joined) = store.fill(&digest, &origin(), |_| whole(&data));
        assert!(joined && Arc::ptr_eq(&same, &broken));
        cancel_tx.send(()).unwrap();
        driver.join().unwrap();
        let waited = waiter
            .await
            .unwrap()
            .expect("the waiter is not left waiting");
        assert!(waited.is_err());
        assert_recovers(&store, &broken, &data).await;
    }

    /// A source that sends `data` in `chunk`-byte pieces, `pause` apart.
    fn paced(data: &Bytes, chunk: usize, pause: Duration) -> SourceFuture {
        let pieces: Vec<Bytes> = (0..data.len())
            .step_by(chunk)
            .map(|at| data.slice(at..(at + chunk).min(data.len())))
            .collect();
        let stream = futures_util::stream::iter(pieces)
            .then(move |piece| async move {
                tokio::time::sleep(pause).await;
                Ok(piece)
            })
            .boxed();
        source(data.len(), stream)
    }

    /// Reads a fill through `next_piece` as a sendfile caller does: bytes, and how many of them
    /// came as ranges of the temp file.
    async fn read_pieces(mut reader: FillReader) -> io::Result<(Vec<u8>, usize)> {
        let (mut out, mut from_file) = (Vec::new(), 0);
        while let Some(piece) = reader.next_piece().await {
            match piece? {
                Piece::Chunk(b) => out.extend_from_slice(&b),
                Piece::File { file, pos, len } => {
                    let mut buf = vec![0; len];
                    file.read_exact_at(&mut buf, pos)?;
                    out.extend_from_slice(&buf);
                    from_file += len;
                    reader.advance(len as u64);
                }
            }
        }
        Ok((out, from_file))
    }

    #[tokio::test]
    async fn a_reader_that_prefers_the_file_gets_the_blob_from_the_temp_file_as_it_is_written() {
        let (_dir, store, data, digest) = setup(8 << 20);
        let (fill, _) = store.fill(&digest, &origin(), |_| {
            paced(&data, 1 << 20, Duration::from_millis(5))
        });
        let preferring = tokio::spawn(read_pieces(fill.reader(0, None).prefer_file()));
        let plain = tokio::spawn(read_pieces(fill.reader(0, None)));
        let (preferring, plain) = tokio::time::timeout(PATIENCE, async {
            tokio::try_join!(preferring, plain).unwrap()
        })
        .await
        .unwrap();
        let (bytes, from_file) = preferring.unwrap();
        assert_eq!(bytes, &data[..]);
        assert!(
            from_file >= data.len() / 2,
            "{from_file} of {} bytes came from the file",
            data.len()
        );
        // A reader that keeps up and does not ask for the file reads the ring.
        let (bytes, from_file) = plain.unwrap();
        assert_eq!(bytes, &data[..]);
        assert_eq!(from_file, 0);
    }

    #[tokio::test]
    async fn a_reader_that_prefers_the_file_still_gets_the_bytes_of_a_source_that_stalls() {
        // 1000 bytes arrive, then the source stalls: they are far less than a write batch, so
        // they reach no file until the source goes on, and the reader must have them anyway.
        let (_dir, store, data, digest) = setup(5000);
        let (go_on, held) = tokio::sync::oneshot::channel::<()>();
        let head = futures_util::stream::iter([Ok(data.slice(..1000))]);
        let rest = data.slice(1000..);
        let tail = futures_util::stream::once(async move {
            let _ = held.await;
            Ok(rest)
        });
        let stalled = source(data.len(), head.chain(tail).boxed());
        let (fill, _) = store.fill(&digest, &origin(), |_| stalled);
        let mut reader = fill.reader(0, None).prefer_file();
        let first = tokio::time::timeout(PATIENCE, reader.next_piece())
            .await
            .expect("bytes reach the reader while the source stalls")
            .unwrap()
            .unwrap();
        let Piece::Chunk(first) = first else {
            panic!("the stalled bytes come from memory")
        };
        assert_eq!(first, data.slice(..1000));
        go_on.send(()).unwrap();
        let (rest, _) = tokio::time::timeout(PATIENCE, read_pieces(reader))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rest, &data[1000..]);
    }

    #[tokio::test]
    async fn a_reader_that_prefers_the_file_never_gets_a_corrupt_blob_whole() {
        let (_dir, store, data, _) = setup(3 << 20);
        // The digest of other bytes: what arrives is the right length but not the blob.
        let digest = Digest::sha256_of(b"the blob that was asked for");
        let (fill, _) = store.fill(&digest, &origin(), |_| {
            paced(&data, 1 << 20, Duration::from_millis(5))
        });
        let mut reader = fill.reader(0, None).prefer_file();
        let mut got = 0;
        let failed = tokio::time::timeout(PATIENCE, async {
            while let Some(piece) = reader.next_piece().await {
                match piece {
                    Ok(Piece::Chunk(b)) => got += b.len(),
                    Ok(Piece::File { len, .. }) => {
                        got += len;
                        reader.advance(len as u64);
                    }
                    Err(_) => return true,
                }
            }
            false
        })
        .await
        .unwrap();
        assert!(failed, "the reader gets an error");
        assert!(got < data.len(), "the last byte is held back: {got}");
        assert!(store.lookup(&digest).is_none());
    }

    #[test]
    fn shards_are_made_at_open_and_remade_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 1 << 30, Arc::new(Metrics::new())).unwrap();
        let alg = dir.path().join("blobs/sha256");
        let shards = || std::fs::read_dir(&alg).map_or(0, |d| d.count());
        // Made by a thread of their own: wait for it (bounded).
        for _ in 0..500 {
            if shards() == 256 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(shards(), 256);
        for name in ["00", "7f", "ff"] {
            assert!(alg.join(name).is_dir(), "{name}");
        }

        let body = b"a blob whose shard was removed by hand";
        let digest = Digest::sha256_of(body);
        std::fs::remove_dir(alg.join(&digest.hex()[..2])).unwrap();
        let tmp = store.temp_path(&digest);
        std::fs::write(&tmp, body).unwrap();
        store.commit(&digest, &tmp, body.len() as u64).unwrap();
        assert_eq!(
            std::fs::read(blob_path(&store.root, &digest)).unwrap(),
            body
        );
        assert!(store.lookup(&digest).is_some());

        // Opening again keeps what is there.
        drop(store);
        BlobStore::open(dir.path(), 1 << 30, Arc::new(Metrics::new())).unwrap();
        assert_eq!(
            std::fs::read(blob_path(&dir.path().join("blobs"), &digest)).unwrap(),
            body
        );
    }
}
