//! The shared tier: an object store (S3, Azure Blob Storage or Google Cloud Storage, through
//! the `object_store` crate; see `stores`) that several replicas read and write, behind each
//! replica's bounded local disk.
//!
//! Keys mirror the disk layout under the configured prefix:
//! `blobs/<alg>/<hex>`, `manifests/<registry>/<repo>/_manifests/<alg>/<hex>` (first line: media
//! type, then the exact bytes) and `manifests/<registry>/<repo>/_tags/<tag>` (JSON). The hosted
//! registries' objects are under `hosted/` (see `crate::hosted`'s `remote`): no key of the
//! mirror starts with it, and nothing here evicts or deletes them on its own.
//!
//! A blob is written only from a fill's verified stream: the uploader is a reader of the fill,
//! and a fill hands out its last byte only after the digest matched, so a multipart upload is
//! completed only for verified bytes and aborted otherwise — no partial or wrong object is
//! ever visible under a blob's key (S3: a multipart upload completed or aborted; Azure: a block
//! list committed, or its uncommitted blocks left to expire; GCS: a resumable session whose
//! final chunk is sent, or which is cancelled). Nothing here coordinates through conditional writes: two
//! replicas writing the same key write the same verified bytes.
//!
//! The store failing is not an outage: after an error it is skipped for a few seconds (reads
//! are misses, writes are dropped) and the mirror serves from disk and upstream meanwhile.
//! Hosted writes are the exception: always tried and awaited, their failure is the push's.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use super::fill::Fill;
use super::manifests::{Manifest, TagRecord};
use crate::config::{ObjectStoreConfig, StoreKind};
use crate::error::{RegistryError, SetupError};
use crate::metrics::{Metrics, StoreDirection, StoreOp, StoreResult};
use crate::oci::{Digest, Hasher, RepoName, Tag};

/// Blobs up to this size are uploaded with one PUT; larger ones in parts of this size (S3's
/// smallest part is 5 MiB; Azure's blocks and GCS's resumable chunks take it too).
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts uploading at once per blob.
const PARTS_IN_FLIGHT: usize = 2;
/// Blob uploads at once. Each holds up to about (PARTS_IN_FLIGHT + 1) × PART_BYTES in memory;
/// a waiting upload reads its fill later from the (verified) file, not from memory.
const UPLOADS_AT_ONCE: usize = 4;
/// How long the store is skipped after a failed request.
const BACKOFF: Duration = Duration::from_secs(5);
/// The largest manifest or tag object read back.
const MAX_SMALL_OBJECT: u64 = 4 * 1024 * 1024 + 1024;

/// The answer of a read: found, known missing, or the store could not say.
pub enum Lookup<T> {
    Found(T),
    Missing,
    Unavailable,
}

pub struct SharedStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// Milliseconds since `epoch` until which the store is skipped (0: not skipped).
    down_until: AtomicU64,
    epoch: Instant,
    metrics: Arc<Metrics>,
    uploads: tokio::sync::Semaphore,
    kind: StoreKind,
    /// The configured URL, for messages.
    url: String,
}

/// Where the hosted registries' objects are, under the prefix.
const HOSTED: &str = "hosted/";

/// Why a verified fill (or hosted blob) did not reach the object store.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the fill failed before it started: {0}")]
    Start(#[from] RegistryError),
    #[error("fill failed: {0}")]
    Fill(std::io::Error),
    #[error(transparent)]
    Store(#[from] object_store::Error),
    #[error("berth is shutting down")]
    Closed,
}

impl SharedStore {
    pub fn open(
        config: &ObjectStoreConfig,
        metrics: Arc<Metrics>,
    ) -> Result<SharedStore, SetupError> {
        let (store, kind) = super::stores::open(config)?;
        let prefix = config.prefix();
        metrics.enable_object_store();
        Ok(SharedStore {
            store,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
            uploads: tokio::sync::Semaphore::new(UPLOADS_AT_ONCE),
            kind,
            url: config.url.to_string(),
        })
    }

    /// The configured URL (`s3://bucket/prefix`), for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> Path {
        Path::from(format!("{}{key}", self.prefix))
    }

    fn blob_key(digest: &Digest) -> String {
        format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
    }

    fn manifest_key(registry: &str, repo: &RepoName, digest: &Digest) -> String {
        format!(
            "manifests/{registry}/{repo}/_manifests/{}/{}",
            digest.algorithm().as_str(),
            digest.hex()
        )
    }

    fn tag_key(registry: &str, repo: &RepoName, tag: &Tag) -> String {
        format!("manifests/{registry}/{repo}/_tags/{tag}")
    }

    /// Whether the store is being used (not skipped after a recent failure).
    pub fn is_available(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        until == 0 || self.epoch.elapsed().as_millis() as u64 >= until
    }

    fn record(&self, op: StoreOp, result: &Result<(), &object_store::Error>) {
        let label = match result {
            Ok(()) => StoreResult::Ok,
            Err(object_store::Error::NotFound { .. }) => StoreResult::NotFound,
            Err(_) => StoreResult::Error,
        };
        self.metrics.record_store(op, label, 1);
        match result {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                if self.down_until.swap(0, Ordering::Relaxed) != 0 {
                    tracing::info!("object store answers again");
                }
                self.metrics.object_store_up.set(1);
            }
            Err(e) => {
                let until = self.epoch.elapsed().as_millis() as u64 + BACKOFF.as_millis() as u64;
                if self.down_until.swap(until, Ordering::Relaxed) == 0 {
                    tracing::warn!(error = %e, "object store failed: skipping it for a few seconds (serving from disk and upstream)");
                }
                self.metrics.object_store_up.set(0);
            }
        }
    }

    /// Opens a blob for reading: its length and its bytes (verified by the fill that reads them).
    pub async fn get_blob(
        &self,
        digest: &Digest,
    ) -> Lookup<(u64, BoxStream<'static, io::Result<Bytes>>)> {
        self.get_stream(&Self::blob_key(digest)).await
    }

    async fn get_stream(&self, key: &str) -> Lookup<(u64, BoxStream<'static, io::Result<Bytes>>)> {
        if !self.is_available() {
            return Lookup::Unavailable;
        }
        match self.store.get(&self.path(key)).await {
            Ok(got) => {
                self.record(StoreOp::Get, &Ok(()));
                let len = got.meta.size;
                let counter = self.metrics.store_bytes(StoreDirection::Read);
                let stream = got
                    .into_stream()
                    .map(move |r| {
                        r.inspect(|b| counter.inc_by(b.len() as u64))
                            .map_err(io::Error::other)
                    })
                    .boxed();
                Lookup::Found((len, stream))
            }
            Err(e) => self.miss(StoreOp::Get, &e),
        }
    }

    /// The length of a stored blob.
    pub async fn head_blob(&self, digest: &Digest) -> Lookup<u64> {
        self.head(&Self::blob_key(digest)).await
    }

    async fn head(&self, key: &str) -> Lookup<u64> {
        if !self.is_available() {
            return Lookup::Unavailable;
        }
        match self.store.head(&self.path(key)).await {
            Ok(meta) => {
                self.record(StoreOp::Head, &Ok(()));
                Lookup::Found(meta.size)
            }
            Err(e) => self.miss(StoreOp::Head, &e),
        }
    }

    fn miss<T>(&self, op: StoreOp, e: &object_store::Error) -> Lookup<T> {
        self.record(op, &Err(e));
        match e {
            object_store::Error::NotFound { .. } => Lookup::Missing,
            _ => Lookup::Unavailable,
        }
    }

    async fn get_small(&self, key: &str) -> Lookup<Bytes> {
        if !self.is_available() {
            return Lookup::Unavailable;
        }
        match self.store.get(&self.path(key)).await {
            Ok(got) if got.meta.size <= MAX_SMALL_OBJECT => match got.bytes().await {
                Ok(b) => {
                    self.record(StoreOp::Get, &Ok(()));
                    Lookup::Found(b)
                }
                Err(e) => self.miss(StoreOp::Get, &e),
            },
            Ok(got) => {
                self.record(StoreOp::Get, &Ok(()));
                tracing::warn!(
                    key,
                    bytes = got.meta.size,
                    "object too large for a manifest or tag; ignoring it"
                );
                Lookup::Missing
            }
            Err(e) => self.miss(StoreOp::Get, &e),
        }
    }

    /// A manifest by digest, checked against the digest.
    pub async fn get_manifest(
        &self,
        registry: &str,
        repo: &RepoName,
        digest: &Digest,
    ) -> Option<Manifest> {
        let Lookup::Found(raw) = self
            .get_small(&Self::manifest_key(registry, repo, digest))
            .await
        else {
            return None;
        };
        let nl = raw.iter().position(|&b| b == b'\n')?;
        let media_type = std::str::from_utf8(&raw[..nl]).ok()?.to_owned();
        let bytes = raw.slice(nl + 1..);
        let mut hasher = Hasher::new(digest.algorithm());
        hasher.update(&bytes);
        if hasher.finish() != *digest {
            tracing::warn!(registry, repository = %repo, digest = %digest, "manifest in the object store does not match its digest; ignoring it");
            return None;
        }
        Manifest::new(digest.clone(), media_type, bytes)
    }

    /// What a tag pointed to when a replica last checked it upstream.
    pub async fn get_tag(&self, registry: &str, repo: &RepoName, tag: &Tag) -> Option<TagRecord> {
        let Lookup::Found(raw) = self.get_small(&Self::tag_key(registry, repo, tag)).await else {
            return None;
        };
        serde_json::from_slice(&raw).ok()
    }

    async fn put_small(&self, key: String, content: Vec<u8>) {
        if !self.is_available() {
            return;
        }
        let result = self
            .store
            .put(&self.path(&key), PutPayload::from(content))
            .await;
        self.record(StoreOp::Put, &result.as_ref().map(|_| ()));
        if let Err(e) = result {
            tracing::warn!(key, error = %e, "cannot store in the object store");
        }
    }

    /// Stores a verified manifest (in the background).
    pub fn put_manifest(self: &Arc<Self>, registry: &str, repo: &RepoName, m: &Manifest) {
        let key = Self::manifest_key(registry, repo, &m.digest);
        let mut content = Vec::with_capacity(m.media_type.len() + 1 + m.bytes.len());
        content.extend_from_slice(m.media_type.as_bytes());
        content.push(b'\n');
        content.extend_from_slice(&m.bytes);
        let me = self.clone();
        tokio::spawn(async move { me.put_small(key, content).await });
    }

    /// Stores a tag record (in the background).
    pub fn put_tag(self: &Arc<Self>, registry: &str, repo: &RepoName, tag: &Tag, rec: &TagRecord) {
        let key = Self::tag_key(registry, repo, tag);
        let Ok(json) = serde_json::to_vec(rec) else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move { me.put_small(key, json).await });
    }

    /// Deletes what a purge removed from the local cache (`berth cache rm`, `cache prune`):
    /// tag records, manifests and blobs, so that no replica restores them from the store.
    /// Awaited; an object already gone counts as deleted. Err names the first that failed.
    pub async fn purge(
        &self,
        registry: &str,
        repo: &RepoName,
        tags: &[Tag],
        manifests: &[Digest],
        blobs: &[Digest],
    ) -> Result<usize, String> {
        let keys = tags
            .iter()
            .map(|t| Self::tag_key(registry, repo, t))
            .chain(
                manifests
                    .iter()
                    .map(|d| Self::manifest_key(registry, repo, d)),
            )
            .chain(blobs.iter().map(Self::blob_key));
        let mut n = 0;
        for key in keys {
            let result = self.store.delete(&self.path(&key)).await;
            self.record(StoreOp::Delete, &result.as_ref().map(|_| ()));
            match result {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => n += 1,
                Err(e) => return Err(format!("cannot delete {key} from the object store: {e}")),
            }
        }
        Ok(n)
    }

    /// Deletes a stored blob whose bytes did not match its digest (in the background), so the
    /// next request fetches it again instead of reading the damaged copy.
    pub fn delete_blob(self: &Arc<Self>, digest: &Digest) {
        let (me, path) = (self.clone(), self.path(&Self::blob_key(digest)));
        let digest = digest.clone();
        tokio::spawn(async move {
            let result = me.store.delete(&path).await;
            me.record(StoreOp::Delete, &result.as_ref().map(|_| ()));
            match result {
                Ok(()) => {
                    tracing::warn!(digest = %digest, "deleted a damaged blob from the object store")
                }
                Err(e) => {
                    tracing::warn!(digest = %digest, error = %e, "cannot delete a damaged blob from the object store")
                }
            }
        });
    }

    /// Uploads the blob a fill is fetching, as it arrives, completing the upload only when the
    /// fill verified it (in the background).
    pub fn upload(self: &Arc<Self>, fill: Arc<Fill>) {
        if !self.is_available() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let digest = fill.digest.clone();
            match me.upload_fill(fill).await {
                Ok(bytes) => {
                    tracing::debug!(digest = %digest, bytes, seconds = started.elapsed().as_secs_f64(), "blob stored in the object store")
                }
                Err(e) => {
                    tracing::warn!(digest = %digest, error = %e, "blob not stored in the object store")
                }
            }
        });
    }

    /// Abandons a multipart upload: S3 aborts it and GCS cancels its session (one request
    /// each, counted); Azure's uncommitted blocks are never committed (no request). The parts
    /// already sent are not counted.
    async fn abort(&self, writer: WriteMultipart) {
        let result = writer.abort().await;
        if self.kind != StoreKind::Azure {
            self.record(StoreOp::Multipart, &result.as_ref().map(|_| ()));
        }
        if let Err(e) = result {
            tracing::debug!(error = %e, "abandoning a multipart upload failed");
        }
    }

    async fn upload_fill(&self, fill: Arc<Fill>) -> Result<u64, UploadError> {
        let len = fill.wait_started().await?;
        let path = self.path(&Self::blob_key(&fill.digest));
        self.upload_stream(&path, len, fill.reader(0, None).into_stream())
            .await
    }

    /// Uploads `reader`'s bytes under `path`: one PUT up to [`PART_BYTES`] (when the length is
    /// known), else a multipart upload completed only when the stream ended without an error.
    async fn upload_stream(
        &self,
        path: &Path,
        len: Option<u64>,
        mut reader: BoxStream<'static, io::Result<Bytes>>,
    ) -> Result<u64, UploadError> {
        let _permit = self
            .uploads
            .acquire()
            .await
            .map_err(|_| UploadError::Closed)?;
        let written = self.metrics.store_bytes(StoreDirection::Written);
        if len.is_some_and(|l| l <= PART_BYTES as u64) {
            // Small: one PUT of the whole verified blob (the reader ends only once verified).
            let mut parts = Vec::new();
            let mut n = 0u64;
            while let Some(chunk) = reader.next().await {
                let chunk = chunk.map_err(UploadError::Fill)?;
                n += chunk.len() as u64;
                parts.push(chunk);
            }
            let result = self.store.put(path, PutPayload::from_iter(parts)).await;
            self.record(StoreOp::Put, &result.as_ref().map(|_| ()));
            result?;
            written.inc_by(n);
            return Ok(n);
        }
        let upload = self.store.put_multipart(path).await;
        // Azure makes no request to start one (its block list is made up here).
        if self.kind != StoreKind::Azure || upload.is_err() {
            self.record(StoreOp::Multipart, &upload.as_ref().map(|_| ()));
        }
        let mut writer = WriteMultipart::new_with_chunk_size(upload?, PART_BYTES);
        let mut n = 0u64;
        loop {
            let chunk = match reader.next().await {
                None => break,
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => {
                    // Cut or wrong bytes: the parts sent so far are discarded, never visible.
                    self.abort(writer).await;
                    return Err(UploadError::Fill(e));
                }
            };
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                self.record(StoreOp::Multipart, &Err(&e));
                self.abort(writer).await;
                return Err(e.into());
            }
            n += chunk.len() as u64;
            writer.put(chunk);
        }
        let result = writer.finish().await;
        self.record(StoreOp::Multipart, &result.as_ref().map(|_| ()));
        result?;
        // The parts went out inside the writer: count them as the requests they were (GCS's
        // last chunk is the request that completed the upload, counted above).
        let parts = n.div_ceil(PART_BYTES as u64);
        let parts = match self.kind {
            StoreKind::Gcs => parts.saturating_sub(1),
            StoreKind::S3 | StoreKind::Azure => parts,
        };
        self.metrics
            .record_store(StoreOp::Part, StoreResult::Ok, parts);
        written.inc_by(n);
        Ok(n)
    }

    // The hosted registries' objects, under `hosted/` (see `crate::hosted`). Unlike the
    // mirror's writes, these are awaited and tried even while the store is skipped: a push is
    // answered only once they landed.

    fn hosted_key(key: &str) -> String {
        format!("{HOSTED}{key}")
    }

    /// Stores a small hosted object (a link, tag, referrer or manifest).
    pub async fn put_hosted(&self, key: &str, bytes: Bytes) -> Result<(), object_store::Error> {
        let result = self
            .store
            .put(&self.path(&Self::hosted_key(key)), PutPayload::from(bytes))
            .await;
        self.record(StoreOp::Put, &result.as_ref().map(|_| ()));
        result.map(|_| ())
    }

    /// Stores a verified hosted blob from its file (the same uploads as the mirror's blobs:
    /// one PUT, or parts completed only once the whole file was read).
    pub async fn put_hosted_file(
        &self,
        key: &str,
        file: Arc<std::fs::File>,
        len: u64,
    ) -> Result<(), UploadError> {
        let path = self.path(&Self::hosted_key(key));
        self.upload_stream(&path, Some(len), file_stream(file, len))
            .await
            .map(|_| ())
    }

    /// Deletes a hosted object (one that is not there counts as deleted).
    pub async fn delete_hosted(&self, key: &str) -> Result<(), object_store::Error> {
        let result = self.store.delete(&self.path(&Self::hosted_key(key))).await;
        self.record(StoreOp::Delete, &result.as_ref().map(|_| ()));
        match result {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The length of a hosted object.
    pub async fn head_hosted(&self, key: &str) -> Lookup<u64> {
        self.head(&Self::hosted_key(key)).await
    }

    /// A small hosted object (at most 4 MiB: links, tags, referrers, manifests).
    pub async fn get_hosted(&self, key: &str) -> Lookup<Bytes> {
        self.get_small(&Self::hosted_key(key)).await
    }

    /// A hosted blob's length and bytes (unverified: the reader checks the digest).
    pub async fn get_hosted_blob(
        &self,
        key: &str,
    ) -> Lookup<(u64, BoxStream<'static, io::Result<Bytes>>)> {
        self.get_stream(&Self::hosted_key(key)).await
    }

    /// The hosted objects whose keys start with `dir/`, as (key, size, last modified), at most
    /// `limit` of them (and whether there were more).
    pub async fn list_hosted(
        &self,
        dir: &str,
        limit: usize,
    ) -> Result<(Vec<(String, u64, std::time::SystemTime)>, bool), object_store::Error> {
        let base = self.path(&Self::hosted_key(""));
        let prefix = self.path(&Self::hosted_key(dir));
        let mut listed = self.store.list(Some(&prefix));
        let mut out = Vec::new();
        let mut more = false;
        while let Some(meta) = listed.next().await {
            let meta = match meta {
                Ok(m) => m,
                Err(e) => {
                    self.record(StoreOp::List, &Err(&e));
                    return Err(e);
                }
            };
            if out.len() == limit {
                more = true;
                break;
            }
            let Some(key) = meta.location.prefix_match(&base) else {
                continue;
            };
            let key: Vec<String> = key.map(|p| p.as_ref().to_owned()).collect();
            out.push((key.join("/"), meta.size, meta.last_modified.into()));
        }
        self.record(StoreOp::List, &Ok(()));
        Ok((out, more))
    }
}

/// A file's first `len` bytes, read in parts of [`PART_BYTES`] off the async threads.
fn file_stream(file: Arc<std::fs::File>, len: u64) -> BoxStream<'static, io::Result<Bytes>> {
    use std::os::unix::fs::FileExt;
    futures_util::stream::try_unfold(0u64, move |at| {
        let file = file.clone();
        async move {
            if at >= len {
                return Ok(None);
            }
            let n = ((len - at) as usize).min(PART_BYTES);
            let chunk = tokio::task::spawn_blocking(move || {
                let mut buf = bytes::BytesMut::zeroed(n);
                file.read_exact_at(&mut buf, at).map(|()| buf.freeze())
            })
            .await
            .map_err(io::Error::other)??;
            Ok(Some((chunk, at + n as u64)))
        }
    })
    .boxed()
}
