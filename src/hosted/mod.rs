//! The hosted registries: repositories berth stores itself (`[[hosted]]`), beside the mirrored
//! ones, behind the same endpoint. Push (monolithic, chunked and cross-repository mount),
//! pull, tags, the catalog, delete, OCI 1.1 referrers and garbage collection, on the files of
//! [`store`]. Nothing here ever contacts an upstream.
//!
//! Durability: a push is answered 201 only after its bytes are synced to disk and renamed into
//! place and, with `[cache.object_store]`, stored in the bucket (see [`remote`]: the bucket
//! first, then the disk); a blob is visible in a repository only after it is complete and
//! verified; a manifest only after every blob and child manifest it references is in the
//! repository.

mod gc;
mod remote;
mod store;
mod upload;

pub use gc::GcReport;
pub use upload::{BodyStream, valid_id as valid_upload_id};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;

use self::remote::Remote;
use self::store::Store;
use self::upload::{AppendError, Sink, Uploads};
use crate::cache::{BlobStore, Manifest, SharedStore};
use crate::config::HostedConfig;
use crate::error::{ErrorCode, RegistryError};
use crate::metrics::Metrics;
use crate::oci::{Digest, DigestAlgorithm, Hasher, Reference, Tag};
use crate::route::{RepoGlob, Target};

/// The largest manifest accepted (distribution's limit too).
const MAX_MANIFEST: usize = 4 * 1024 * 1024;

/// One `[[hosted]]` registry.
pub struct HostedRegistry {
    pub name: Arc<str>,
    pub globs: Vec<RepoGlob>,
    pub delete: bool,
    pub max_blob_size: Option<u64>,
    pub upload_ttl: Duration,
    pub gc_grace: Duration,
}

pub struct Hosted {
    store: Arc<Store>,
    uploads: Arc<Uploads>,
    registries: Vec<HostedRegistry>,
    metrics: Arc<Metrics>,
    /// The mirror's blobs: a pushed blob the cache already holds is kept once (a hard link).
    cache: Option<Arc<BlobStore>>,
    /// The object store, where every write lands before it is answered (None: disk only).
    remote: Option<Remote>,
}

/// How a manifest push went.
pub struct Pushed {
    pub digest: Digest,
    pub subject: Option<Digest>,
    pub media_type: String,
    pub size: u64,
}

/// A blob of a hosted repository, opened.
pub struct HostedBlob {
    pub file: std::fs::File,
    pub len: u64,
}

fn disk_error(what: &str, e: std::io::Error) -> RegistryError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        tracing::error!(error = %e, "{what}: the hosted store's disk is full");
        return RegistryError::new(
            ErrorCode::Internal,
            format!("{what}: no space left on the registry's disk"),
        )
        .with_status(StatusCode::INSUFFICIENT_STORAGE);
    }
    tracing::error!(error = %e, "{what}");
    RegistryError::new(ErrorCode::Internal, format!("{what}: {e}"))
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::new(ErrorCode::Internal, format!("{what}: {e}")))?
        .map_err(|e| disk_error(what, e))
}

fn upload_unknown() -> RegistryError {
    RegistryError::new(
        ErrorCode::BlobUploadUnknown,
        "upload unknown to this repository",
    )
}

fn too_large(limit: u64) -> RegistryError {
    RegistryError::new(
        ErrorCode::SizeInvalid,
        format!("the blob is larger than this registry's max_blob_size of {limit} bytes"),
    )
    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

fn append_error(e: AppendError) -> RegistryError {
    match e {
        AppendError::TooLarge(limit) => too_large(limit),
        AppendError::Body(e) => RegistryError::new(
            ErrorCode::BlobUploadInvalid,
            format!("the request body broke off: {e}"),
        ),
        AppendError::Disk(e) => disk_error("cannot write the upload", e),
    }
}

impl Hosted {
    pub fn open(
        configs: &[HostedConfig],
        cache_dir: &std::path::Path,
        metrics: Arc<Metrics>,
        cache: Option<Arc<BlobStore>>,
        shared: Option<Arc<SharedStore>>,
    ) -> std::io::Result<Hosted> {
        let store = Arc::new(Store::open(cache_dir)?);
        let uploads = Arc::new(Uploads::new(&store.uploads));
        let mut registries = Vec::new();
        for c in configs {
            let globs = c
                .repositories
                .iter()
                .map(|g| RepoGlob::new(g).map_err(std::io::Error::other))
                .collect::<Result<_, _>>()?;
            registries.push(HostedRegistry {
                name: c.name.as_str().into(),
                globs,
                delete: c.delete,
                max_blob_size: c.max_blob_size,
                upload_ttl: c.upload_ttl,
                gc_grace: c.gc_grace,
            });
        }
        let blobs = store.all_blobs();
        metrics
            .hosted_bytes
            .set(blobs.iter().map(|b| b.1 as i64).sum());
        metrics.hosted_blobs.set(blobs.len() as i64);
        let remote = shared.map(|s| Remote::new(s, store.clone()));
        Ok(Hosted {
            store,
            uploads,
            registries,
            metrics,
            cache,
            remote,
        })
    }

    /// With an object store: brings the repositories' index on the disk up to date with the
    /// bucket (bounded, logged); see [`remote`].
    pub async fn restore(&self) {
        let Some(r) = &self.remote else { return };
        let started = std::time::Instant::now();
        let done = r.restore_index().await;
        let level_warn = done.partial || done.failed > 0;
        if level_warn {
            tracing::warn!(
                store = r.url(),
                listed = done.listed,
                written = done.written,
                failed = done.failed,
                partial = done.partial,
                seconds = started.elapsed().as_secs_f64(),
                "hosted registries only partly restored from the object store (missing files are read from it when asked for)"
            );
        } else {
            tracing::info!(
                store = r.url(),
                listed = done.listed,
                written = done.written,
                seconds = started.elapsed().as_secs_f64(),
                "hosted registries' index restored from the object store"
            );
        }
    }

    /// Counts a blob now on the disk that was read back from the bucket.
    fn count_restored(&self, d: &Digest) {
        if let Ok(m) = std::fs::metadata(self.store.blob_path(d)) {
            self.metrics.hosted_bytes.add(m.len() as i64);
            self.metrics.hosted_blobs.inc();
        }
    }

    /// Whether the repository holds blob `d`; a link the disk lacks is read from the bucket
    /// (the blob's bytes only looked for there, fetched when pulled).
    async fn has_blob(&self, registry: &str, repo: &crate::oci::RepoName, d: &Digest) -> bool {
        if self.store.has_blob(registry, repo, d) {
            return true;
        }
        let Some(r) = &self.remote else { return false };
        let link = self.store.blob_link(registry, repo, d);
        let blob = self.store.blob_path(d);
        (link.exists() || r.restore(&link, None).await) && (blob.exists() || r.has(&blob).await)
    }

    /// The media type of a manifest of the repository; what the disk lacks (its link, its
    /// bytes) is read from the bucket.
    async fn manifest_type(
        &self,
        registry: &str,
        repo: &crate::oci::RepoName,
        d: &Digest,
    ) -> Option<String> {
        if let Some(t) = self.store.manifest_type(registry, repo, d) {
            return Some(t);
        }
        let r = self.remote.as_ref()?;
        let link = self.store.manifest_link(registry, repo, d);
        if !link.exists() && !r.restore(&link, None).await {
            return None;
        }
        let blob = self.store.blob_path(d);
        if !blob.exists() {
            if !r.restore(&blob, Some(d)).await {
                return None;
            }
            self.count_restored(d);
        }
        self.store.manifest_type(registry, repo, d)
    }

    /// The digest a tag points to; a tag the disk lacks is read from the bucket.
    async fn tag(&self, registry: &str, repo: &crate::oci::RepoName, tag: &Tag) -> Option<Digest> {
        if let Some(d) = self.store.tag(registry, repo, tag) {
            return Some(d);
        }
        let r = self.remote.as_ref()?;
        if !r
            .restore(&self.store.tag_path(registry, repo, tag), None)
            .await
        {
            return None;
        }
        self.store.tag(registry, repo, tag)
    }

    /// Removes abandoned uploads now and then (each registry's `upload_ttl`).
    pub fn spawn_janitor(&self) {
        let Some(ttl) = self.registries.iter().map(|r| r.upload_ttl).min() else {
            return;
        };
        let uploads = Arc::downgrade(&self.uploads);
        tokio::spawn(async move {
            let every = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
            loop {
                tokio::time::sleep(every).await;
                let Some(u) = uploads.upgrade() else { return };
                let n = tokio::task::spawn_blocking(move || u.expire(ttl))
                    .await
                    .unwrap_or(0);
                if n > 0 {
                    tracing::info!(uploads = n, "removed abandoned uploads");
                }
            }
        });
    }

    pub fn registries(&self) -> &[HostedRegistry] {
        &self.registries
    }

    pub fn registry(&self, name: &str) -> Option<&HostedRegistry> {
        self.registries.iter().find(|r| &*r.name == name)
    }

    fn require(&self, t: &Target) -> Result<&HostedRegistry, RegistryError> {
        self.registry(&t.registry)
            .ok_or_else(|| RegistryError::new(ErrorCode::NameUnknown, "not a hosted registry"))
    }

    // Pull.

    /// The manifest a tag or digest names.
    pub async fn manifest(
        &self,
        t: &Target,
        r: &Reference,
    ) -> Result<Arc<Manifest>, RegistryError> {
        let unknown = || {
            RegistryError::new(
                ErrorCode::ManifestUnknown,
                format!("manifest {r} unknown to {}/{}", t.registry, t.repo),
            )
        };
        let digest = match r {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(tag) => self
                .tag(&t.registry, &t.repo, tag)
                .await
                .ok_or_else(unknown)?,
        };
        let media_type = self
            .manifest_type(&t.registry, &t.repo, &digest)
            .await
            .ok_or_else(unknown)?;
        let store = self.store.clone();
        let d = digest.clone();
        let bytes = blocking("cannot read the manifest", move || store.read_blob(&d)).await?;
        Manifest::new(digest, media_type, Bytes::from(bytes))
            .map(Arc::new)
            .ok_or_else(|| {
                RegistryError::new(
                    ErrorCode::Internal,
                    "stored media type is not a header value",
                )
            })
    }

    pub async fn blob(&self, t: &Target, d: &Digest) -> Result<HostedBlob, RegistryError> {
        let unknown = || {
            RegistryError::new(
                ErrorCode::BlobUnknown,
                format!("blob {d} unknown to {}/{}", t.registry, t.repo),
            )
        };
        // A manifest is a blob of its repository too (distribution serves it as one).
        if !self.has_blob(&t.registry, &t.repo, d).await
            && self.manifest_type(&t.registry, &t.repo, d).await.is_none()
        {
            return Err(unknown());
        }
        if let Some(r) = &self.remote
            && !self.store.blob_path(d).exists()
            && r.restore_blob(d).await?
        {
            self.count_restored(d);
        }
        let (file, len) = self.store.open_blob(d).map_err(|_| unknown())?;
        Ok(HostedBlob { file, len })
    }

    /// Tags in lexical order after `last`, at most `n`; and whether more follow. With an
    /// object store, the bucket's tags too (pushed to another replica since this one started).
    pub async fn tags(
        &self,
        t: &Target,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<(Vec<String>, bool), RegistryError> {
        let mut all: std::collections::BTreeSet<String> = self
            .store
            .tags(&t.registry, &t.repo)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        if let Some(r) = &self.remote
            && let Some(stored) = r.tags(&t.registry, &t.repo).await
        {
            all.extend(stored.into_iter().filter(|n| n.parse::<Tag>().is_ok()));
        }
        if all.is_empty() && self.store.manifests(&t.registry, &t.repo).is_empty() {
            return Err(RegistryError::new(
                ErrorCode::NameUnknown,
                format!("repository {}/{} unknown", t.registry, t.repo),
            ));
        }
        let mut tags: Vec<String> = all
            .into_iter()
            .filter(|name| last.is_none_or(|l| name.as_str() > l))
            .collect();
        let more = n.is_some_and(|n| tags.len() > n as usize);
        if let Some(n) = n {
            tags.truncate(n as usize);
        }
        Ok((tags, more))
    }

    /// The repositories of a hosted registry, sorted.
    pub fn catalog(&self, registry: &str) -> Vec<String> {
        self.store.repositories(registry)
    }

    /// The OCI image index of the manifests whose subject is `subject`, filtered by
    /// `artifactType` when given; and whether the filter was applied.
    pub fn referrers(&self, t: &Target, subject: &Digest, artifact_type: Option<&str>) -> Bytes {
        let manifests: Vec<serde_json::Value> = self
            .store
            .referrers(&t.registry, &t.repo, subject)
            .into_iter()
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|d| {
                artifact_type
                    .is_none_or(|a| d.get("artifactType").and_then(|v| v.as_str()) == Some(a))
            })
            .collect();
        Bytes::from(
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": crate::oci::OCI_INDEX,
                "manifests": manifests,
            })
            .to_string(),
        )
    }

    // Push.

    /// Starts an upload session; returns its id.
    pub async fn start_upload(&self, t: &Target) -> Result<String, RegistryError> {
        self.require(t)?;
        let uploads = self.uploads.clone();
        let (registry, repo) = (t.registry.clone(), t.repo.clone());
        blocking("cannot start an upload", move || {
            uploads.start(&registry, &repo)
        })
        .await
    }

    /// A monolithic upload: the whole blob in one request, verified against `d`.
    pub async fn push_blob(
        &self,
        t: &Target,
        d: &Digest,
        body: BodyStream,
        len: Option<u64>,
    ) -> Result<(), RegistryError> {
        let reg = self.require(t)?;
        if let (Some(limit), Some(len)) = (reg.max_blob_size, len)
            && len > limit
        {
            return Err(too_large(limit));
        }
        let store = self.store.clone();
        let (path, file) = blocking("cannot start an upload", move || store.temp_file()).await?;
        let mut sink = Sink::new(file);
        if let Err(e) = sink.append(body, reg.max_blob_size).await {
            let _ = std::fs::remove_file(&path);
            return Err(append_error(e));
        }
        self.commit(t, d, path, sink).await
    }

    /// Cross-repository mount: links `d` from `from` into `t`. False when `from` lacks it (the
    /// client then uploads it).
    pub async fn mount(
        &self,
        t: &Target,
        d: &Digest,
        from: &Target,
    ) -> Result<bool, RegistryError> {
        self.require(t)?;
        if from.registry != t.registry || !self.has_blob(&from.registry, &from.repo, d).await {
            return Ok(false);
        }
        if let Some(r) = &self.remote {
            r.put(
                "cannot mount the blob",
                &self.store.blob_link(&t.registry, &t.repo, d),
                Bytes::new(),
            )
            .await?;
        }
        let store = self.store.clone();
        let (registry, repo, d) = (t.registry.clone(), t.repo.clone(), d.clone());
        blocking("cannot mount the blob", move || {
            store.link_blob_to(&registry, &repo, &d)
        })
        .await?;
        Ok(true)
    }

    fn session(&self, t: &Target, id: &str) -> Result<Arc<upload::Session>, RegistryError> {
        self.uploads
            .get(id, &t.registry, &t.repo)
            .ok_or_else(upload_unknown)
    }

    /// The bytes an upload holds so far.
    pub async fn upload_offset(&self, t: &Target, id: &str) -> Result<u64, RegistryError> {
        let s = self.session(t, id)?;
        let sink = s.sink.lock().await;
        Ok(sink.len)
    }

    /// A chunk: `range` is the `Content-Range` the client sent (first, last byte), which must
    /// start where the upload ends (else 416 with the current offset). Returns the new offset.
    pub async fn patch(
        &self,
        t: &Target,
        id: &str,
        range: Option<(u64, u64)>,
        body: BodyStream,
    ) -> Result<u64, RegistryError> {
        let reg = self.require(t)?;
        let s = self.session(t, id)?;
        let mut sink = s.sink.lock().await;
        if let Some((start, end)) = range
            && (start != sink.len || end < start)
        {
            return Err(RegistryError::new(
                ErrorCode::RangeInvalid,
                format!(
                    "the chunk starts at {start}, the upload holds {} bytes",
                    sink.len
                ),
            ));
        }
        if let Err(e) = sink.append(body, reg.max_blob_size).await {
            return Err(append_error(e));
        }
        Ok(sink.len)
    }

    /// Finishes an upload with its last chunk (maybe empty), verified against `d`.
    pub async fn finish(
        &self,
        t: &Target,
        id: &str,
        d: &Digest,
        body: BodyStream,
    ) -> Result<(), RegistryError> {
        let reg = self.require(t)?;
        let s = self.session(t, id)?;
        let mut guard = s.sink.lock().await;
        if let Err(e) = guard.append(body, reg.max_blob_size).await {
            return Err(append_error(e));
        }
        let sink = Sink {
            file: guard.file.clone(),
            len: guard.len,
            hasher: guard.hasher.take(),
        };
        // Once finishing, the session is gone whatever the outcome (as distribution does).
        let result = self.commit(t, d, s.data.clone(), sink).await;
        drop(guard);
        self.uploads.remove(id);
        result
    }

    pub async fn cancel(&self, t: &Target, id: &str) -> Result<(), RegistryError> {
        let s = self.session(t, id)?;
        let _guard = s.sink.lock().await;
        self.uploads.remove(id);
        Ok(())
    }

    /// Verifies an upload's file against `d`, stores it in the bucket (with an object store),
    /// syncs it and makes it the blob (or drops it when the blob is stored already), then
    /// links it into the repository (the bucket's link first).
    async fn commit(
        &self,
        t: &Target,
        d: &Digest,
        path: std::path::PathBuf,
        sink: Sink,
    ) -> Result<(), RegistryError> {
        let discard = |p: &std::path::Path| {
            let _ = std::fs::remove_file(p);
        };
        let (file, len) = (sink.file.clone(), sink.len);
        let (want, p) = (d.clone(), path.clone());
        tokio::task::spawn_blocking(move || -> Result<(), RegistryError> {
            let got = match (sink.hasher, want.algorithm()) {
                (Some(h), DigestAlgorithm::Sha256) => h.finish(),
                _ => hash_file(&sink.file, sink.len, want.algorithm())
                    .map_err(|e| disk_error("cannot read the upload back", e))?,
            };
            if got != want {
                let _ = std::fs::remove_file(&p);
                return Err(RegistryError::new(
                    ErrorCode::DigestInvalid,
                    format!("the upload's digest is {got}, not {want}"),
                ));
            }
            Ok(())
        })
        .await
        .map_err(|e| RegistryError::new(ErrorCode::Internal, format!("upload: {e}")))??;
        // Verified: into the bucket before anything becomes visible here.
        if let Some(r) = &self.remote {
            let link = self.store.blob_link(&t.registry, &t.repo, d);
            let stored = match r.put_blob(d, file.clone(), len).await {
                Ok(()) => r.put("cannot link the blob", &link, Bytes::new()).await,
                Err(e) => Err(e),
            };
            if let Err(e) = stored {
                discard(&path);
                return Err(e);
            }
        }
        let store = self.store.clone();
        let cached = self.cache.as_ref().and_then(|c| c.path_if_cached(d));
        let (registry, repo, want) = (t.registry.clone(), t.repo.clone(), d.clone());
        let added = tokio::task::spawn_blocking(move || -> Result<Option<u64>, RegistryError> {
            let existed = store.blob_path(&want).exists();
            if !existed {
                if cached.as_ref().is_some_and(|c| store.link_blob(c, &want)) {
                    discard(&path);
                } else {
                    file.sync_all()
                        .map_err(|e| disk_error("cannot sync the upload", e))?;
                    store
                        .commit_blob(&path, &want)
                        .map_err(|e| disk_error("cannot store the blob", e))?;
                }
            } else {
                discard(&path);
                touch(&store.blob_path(&want));
            }
            store
                .link_blob_to(&registry, &repo, &want)
                .map_err(|e| disk_error("cannot link the blob", e))?;
            Ok((!existed).then_some(len))
        })
        .await
        .map_err(|e| RegistryError::new(ErrorCode::Internal, format!("upload: {e}")))??;
        if let Some(len) = added {
            self.metrics.hosted_bytes.add(len as i64);
            self.metrics.hosted_blobs.inc();
        }
        Ok(())
    }

    /// Stores a manifest under a tag or its digest, after checking everything it references.
    pub async fn put_manifest(
        &self,
        t: &Target,
        r: &Reference,
        content_type: Option<&str>,
        mut body: BodyStream,
    ) -> Result<Pushed, RegistryError> {
        self.require(t)?;
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                RegistryError::new(
                    ErrorCode::ManifestInvalid,
                    format!("the request body broke off: {e}"),
                )
            })?;
            if bytes.len() + chunk.len() > MAX_MANIFEST {
                return Err(RegistryError::new(
                    ErrorCode::ManifestInvalid,
                    format!("manifests are limited to {MAX_MANIFEST} bytes"),
                )
                .with_status(StatusCode::PAYLOAD_TOO_LARGE));
            }
            bytes.extend_from_slice(&chunk);
        }
        let parts = crate::oci::manifest_parts(&bytes)
            .map_err(|e| RegistryError::new(ErrorCode::ManifestInvalid, e))?;
        let digest = match r {
            Reference::Digest(want) => {
                let mut h = Hasher::new(want.algorithm());
                h.update(&bytes);
                let got = h.finish();
                if &got != want {
                    return Err(RegistryError::new(
                        ErrorCode::DigestInvalid,
                        format!("the manifest's digest is {got}, not {want}"),
                    ));
                }
                got
            }
            Reference::Tag(_) => Digest::sha256_of(&bytes),
        };
        let media_type = content_type
            .filter(|c| !c.is_empty() && *c != "application/octet-stream")
            .map(str::to_owned)
            .or(parts.media_type.clone())
            .or_else(|| crate::oci::manifest_media_type(&bytes))
            .ok_or_else(|| {
                RegistryError::new(
                    ErrorCode::ManifestInvalid,
                    "no media type: send Content-Type",
                )
            })?;
        if http::HeaderValue::from_str(&media_type).is_err() {
            return Err(RegistryError::new(
                ErrorCode::ManifestInvalid,
                "invalid media type",
            ));
        }
        for b in &parts.blobs {
            if !self.has_blob(&t.registry, &t.repo, b).await {
                return Err(RegistryError::new(
                    ErrorCode::ManifestBlobUnknown,
                    format!(
                        "blob {b} is not in {}/{}: push it first",
                        t.registry, t.repo
                    ),
                ));
            }
        }
        for m in &parts.manifests {
            if self.manifest_type(&t.registry, &t.repo, m).await.is_none() {
                return Err(RegistryError::new(
                    ErrorCode::ManifestUnknown,
                    format!(
                        "manifest {m} is not in {}/{}: push it first",
                        t.registry, t.repo
                    ),
                )
                .with_status(StatusCode::BAD_REQUEST));
            }
        }
        let size = bytes.len() as u64;
        let descriptor = parts.subject.as_ref().map(|_| {
            let mut d = serde_json::json!({
                "mediaType": media_type,
                "digest": digest.to_string(),
                "size": size,
            });
            if let Some(a) = &parts.artifact_type {
                d["artifactType"] = serde_json::Value::String(a.clone());
            }
            if let Some(a) = &parts.annotations {
                d["annotations"] = a.clone();
            }
            d.to_string()
        });
        let store = self.store.clone();
        let (registry, repo, d) = (t.registry.clone(), t.repo.clone(), digest.clone());
        let tag = match r {
            Reference::Tag(tag) => Some(tag.clone()),
            Reference::Digest(_) => None,
        };
        let (mt, subject) = (media_type.clone(), parts.subject.clone());
        if let Some(r) = &self.remote {
            // The bucket first, in the order the disk is written: the bytes, the referrer, the
            // manifest's link, and the tag last.
            let what = "cannot store the manifest";
            let st = &self.store;
            r.put(what, &st.blob_path(&digest), Bytes::from(bytes.clone()))
                .await?;
            if let (Some(s), Some(desc)) = (&subject, &descriptor) {
                let path = st
                    .referrers_dir(&t.registry, &t.repo, s)
                    .join(store::file_name(&digest));
                r.put(what, &path, Bytes::from(desc.clone())).await?;
            }
            r.put(
                what,
                &st.manifest_link(&t.registry, &t.repo, &digest),
                Bytes::from(media_type.clone()),
            )
            .await?;
            if let Some(tag) = &tag {
                r.put(
                    what,
                    &st.tag_path(&t.registry, &t.repo, tag),
                    Bytes::from(digest.to_string()),
                )
                .await?;
            }
        }
        let new = blocking("cannot store the manifest", move || {
            let existed = store.blob_path(&d).exists();
            store.write_blob(&d, &bytes)?;
            store.link_manifest(&registry, &repo, &d, &mt)?;
            if let (Some(subject), Some(desc)) = (&subject, &descriptor) {
                store.add_referrer(&registry, &repo, subject, &d, desc.as_bytes())?;
            }
            // The tag moves last: a reader sees the old manifest or the whole new one.
            if let Some(tag) = &tag {
                store.set_tag(&registry, &repo, tag, &d)?;
            }
            Ok(!existed)
        })
        .await?;
        if new {
            self.metrics.hosted_bytes.add(size as i64);
            self.metrics.hosted_blobs.inc();
        }
        Ok(Pushed {
            digest,
            subject: parts.subject,
            media_type,
            size,
        })
    }

    // Delete.

    fn deletable(&self, t: &Target) -> Result<(), RegistryError> {
        if self.require(t)?.delete {
            Ok(())
        } else {
            Err(RegistryError::new(
                ErrorCode::Unsupported,
                format!(
                    "deletes are off for {} (set delete = true in its [[hosted]])",
                    t.registry
                ),
            ))
        }
    }

    /// Deletes a tag, or a manifest by digest (and every tag that points to it); with an
    /// object store, from the bucket first.
    pub async fn delete_manifest(&self, t: &Target, r: &Reference) -> Result<(), RegistryError> {
        self.deletable(t)?;
        let known = match r {
            Reference::Tag(tag) => self.tag(&t.registry, &t.repo, tag).await.is_some(),
            Reference::Digest(d) => self.manifest_type(&t.registry, &t.repo, d).await.is_some(),
        };
        if let (Some(remote), true) = (&self.remote, known) {
            let what = "cannot delete";
            let st = &self.store;
            match r {
                Reference::Tag(tag) => {
                    remote
                        .delete(what, &st.tag_path(&t.registry, &t.repo, tag))
                        .await?
                }
                Reference::Digest(d) => {
                    for (tag, points) in st.tags(&t.registry, &t.repo) {
                        if points.as_ref() == Some(d)
                            && let Ok(tag) = tag.parse::<Tag>()
                        {
                            remote
                                .delete(what, &st.tag_path(&t.registry, &t.repo, &tag))
                                .await?;
                        }
                    }
                    if let Some(subject) = st
                        .read_blob(d)
                        .ok()
                        .and_then(|b| crate::oci::manifest_parts(&b).ok())
                        .and_then(|p| p.subject)
                    {
                        let path = st
                            .referrers_dir(&t.registry, &t.repo, &subject)
                            .join(store::file_name(d));
                        remote.delete(what, &path).await?;
                    }
                    remote
                        .delete(what, &st.manifest_link(&t.registry, &t.repo, d))
                        .await?;
                }
            }
        }
        let store = self.store.clone();
        let (registry, repo, r) = (t.registry.clone(), t.repo.clone(), r.clone());
        let found = blocking("cannot delete", move || match &r {
            Reference::Tag(tag) => store.remove_tag(&registry, &repo, tag),
            Reference::Digest(d) => {
                let bytes = store.read_blob(d).ok();
                if !store.unlink_manifest(&registry, &repo, d)? {
                    return Ok(false);
                }
                for (tag, points) in store.tags(&registry, &repo) {
                    if points.as_ref() == Some(d)
                        && let Ok(tag) = tag.parse::<Tag>()
                    {
                        store.remove_tag(&registry, &repo, &tag)?;
                    }
                }
                if let Some(subject) = bytes
                    .and_then(|b| crate::oci::manifest_parts(&b).ok())
                    .and_then(|p| p.subject)
                {
                    store.remove_referrer(&registry, &repo, &subject, d);
                }
                Ok(true)
            }
        })
        .await?;
        if found {
            Ok(())
        } else {
            Err(RegistryError::new(
                ErrorCode::ManifestUnknown,
                "manifest unknown",
            ))
        }
    }

    pub async fn delete_blob(&self, t: &Target, d: &Digest) -> Result<(), RegistryError> {
        self.deletable(t)?;
        if let Some(remote) = &self.remote
            && self.has_blob(&t.registry, &t.repo, d).await
        {
            let link = self.store.blob_link(&t.registry, &t.repo, d);
            remote.delete("cannot delete", &link).await?;
        }
        let store = self.store.clone();
        let (registry, repo, d) = (t.registry.clone(), t.repo.clone(), d.clone());
        let found = blocking("cannot delete", move || {
            store.unlink_blob(&registry, &repo, &d)
        })
        .await?;
        if found {
            Ok(())
        } else {
            Err(RegistryError::new(ErrorCode::BlobUnknown, "blob unknown"))
        }
    }

    /// Garbage collection. With an object store the index is restored from the bucket first
    /// (so what other replicas pushed is marked too), and what is removed leaves the bucket
    /// before the disk (see [`gc`]).
    pub async fn gc(&self, dry_run: bool, untagged: bool) -> std::io::Result<GcReport> {
        let grace = self
            .registries
            .iter()
            .map(|r| r.gc_grace)
            .max()
            .unwrap_or(Duration::from_secs(3600));
        let collect = |dry: bool, only: Option<std::collections::HashSet<std::path::PathBuf>>| {
            let store = self.store.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    gc::collect(&store, grace, dry, untagged, only.as_ref())
                })
                .await
                .map_err(std::io::Error::other)
            }
        };
        let report = match &self.remote {
            None => collect(dry_run, None).await?,
            Some(r) => {
                self.restore().await;
                let plan = collect(true, None).await?;
                if dry_run {
                    plan
                } else {
                    let deleted = futures_util::stream::iter(plan.files)
                        .map(|path| async move { r.delete("gc", &path).await.ok().map(|()| path) })
                        .buffer_unordered(8)
                        .filter_map(std::future::ready)
                        .collect()
                        .await;
                    collect(false, Some(deleted)).await?
                }
            }
        };
        if !dry_run {
            self.metrics.hosted_bytes.sub(report.bytes as i64);
            self.metrics.hosted_blobs.sub(report.blobs.len() as i64);
        }
        Ok(report)
    }
}

fn hash_file(file: &std::fs::File, len: u64, alg: DigestAlgorithm) -> std::io::Result<Digest> {
    use std::os::unix::fs::FileExt;
    let mut h = Hasher::new(alg);
    let mut buf = vec![0u8; 1024 * 1024];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finish())
}

/// Marks a blob as used now (garbage collection's grace counts from its last push).
fn touch(path: &std::path::Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Reads an upload's `Content-Range` (`<first>-<last>`, optionally `bytes ` first).
pub fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v.strip_prefix("bytes ").unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}
