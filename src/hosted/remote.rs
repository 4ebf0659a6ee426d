//! The hosted registries in the object store (`[cache.object_store]`): the bucket is their
//! record, the local files of [`Store`] a copy of it.
//!
//! Keys: every file of the hosted store is one object, under `<prefix>/hosted/` plus its path
//! below `<cache.dir>/hosted/` — `hosted/blobs/<alg>/<xx>/<hex>` (layers, configs and
//! manifests' bytes), `hosted/repos/<registry>/<repo>/_blobs/<alg>-<hex>`, `…/_manifests/
//! <alg>-<hex>` (the media type), `…/_tags/<tag>` (the digest) and `…/_referrers/<subject>/
//! <alg-hex>` (a descriptor). The mirror's keys (`blobs/`, `manifests/`) never start with
//! `hosted/`, and nothing of the cache (eviction, a damaged blob's deletion) touches these.
//!
//! Writes go to the bucket first, awaited, then to the disk: a push is answered 201 (a delete
//! 202) only once its objects are in the bucket, and when the bucket fails the client gets 503
//! and nothing changed on the disk. Reads are served from the disk; what the disk lacks is
//! read from the bucket (blobs verified against their digest), kept on the disk and served.
//! At start the repositories' index (`repos/`: links, tags, referrers — not blobs, fetched
//! when asked for) is brought up to date from the bucket, so the tags lists and the catalog of
//! a replica with an empty disk are whole; `tags/list` also lists the bucket's tags, so a tag
//! pushed to another replica since is listed.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;

use super::store::Store;
use super::upload::Sink;
use crate::cache::{Lookup, SharedStore};
use crate::error::{ErrorCode, RegistryError};
use crate::oci::{Digest, DigestAlgorithm, Hasher, RepoName};

/// The most index objects one restore reads.
const RESTORE_LIMIT: usize = 1_000_000;
/// How long one restore may take in all.
const RESTORE_TIME: Duration = Duration::from_secs(600);
/// Index objects fetched at once during a restore.
const RESTORE_AT_ONCE: usize = 16;
/// The most tags one repository's listing reads from the bucket.
const TAGS_LIMIT: usize = 100_000;

/// The object store, for the hosted registries.
pub(super) struct Remote {
    shared: Arc<SharedStore>,
    store: Arc<Store>,
}

/// What a restore of the index did.
#[derive(Debug, Default)]
pub(super) struct Restored {
    pub listed: usize,
    pub written: usize,
    pub failed: usize,
    /// The listing or the time ran out before the end.
    pub partial: bool,
}

fn failed(what: &str, url: &str, e: impl std::fmt::Display) -> RegistryError {
    tracing::error!(error = %e, store = url, "{what}: the object store failed");
    RegistryError::new(
        ErrorCode::Unavailable,
        format!("{what}: the object store {url} failed, nothing was stored: {e}"),
    )
    .with_status(StatusCode::SERVICE_UNAVAILABLE)
}

fn digest_of(bytes: &[u8], alg: DigestAlgorithm) -> Digest {
    let mut h = Hasher::new(alg);
    h.update(bytes);
    h.finish()
}

impl Remote {
    pub fn new(shared: Arc<SharedStore>, store: Arc<Store>) -> Remote {
        Remote { shared, store }
    }

    pub fn url(&self) -> &str {
        self.shared.url()
    }

    fn key(&self, path: &Path) -> Result<String, RegistryError> {
        self.store.key(path).ok_or_else(|| {
            RegistryError::new(
                ErrorCode::Internal,
                format!("{} is not in the hosted store", path.display()),
            )
        })
    }

    /// Stores a small file's content under its key.
    pub async fn put(&self, what: &str, path: &Path, bytes: Bytes) -> Result<(), RegistryError> {
        let key = self.key(path)?;
        self.shared
            .put_hosted(&key, bytes)
            .await
            .map_err(|e| failed(what, self.url(), e))
    }

    /// Stores a verified blob from `file` (its first `len` bytes) unless the bucket has it.
    pub async fn put_blob(
        &self,
        d: &Digest,
        file: Arc<File>,
        len: u64,
    ) -> Result<(), RegistryError> {
        let key = self.key(&self.store.blob_path(d))?;
        if let Lookup::Found(n) = self.shared.head_hosted(&key).await
            && n == len
        {
            return Ok(());
        }
        self.shared
            .put_hosted_file(&key, file, len)
            .await
            .map_err(|e| failed("cannot store the blob", self.url(), e))
    }

    pub async fn delete(&self, what: &str, path: &Path) -> Result<(), RegistryError> {
        let key = self.key(path)?;
        self.shared
            .delete_hosted(&key)
            .await
            .map_err(|e| failed(what, self.url(), e))
    }

    /// Whether the bucket has the file's object.
    pub async fn has(&self, path: &Path) -> bool {
        match self.key(path) {
            Ok(key) => matches!(self.shared.head_hosted(&key).await, Lookup::Found(_)),
            Err(_) => false,
        }
    }

    /// Reads a small file (a link, tag or referrer; with `digest`, a manifest's bytes, checked
    /// against it) from the bucket and writes it to the disk; true when it is there now.
    pub async fn restore(&self, path: &Path, digest: Option<&Digest>) -> bool {
        let Ok(key) = self.key(path) else {
            return false;
        };
        let Lookup::Found(bytes) = self.shared.get_hosted(&key).await else {
            return false;
        };
        if let Some(d) = digest
            && digest_of(&bytes, d.algorithm()) != *d
        {
            tracing::warn!(
                key,
                "hosted object in the object store does not match its digest; ignoring it"
            );
            return false;
        }
        self.write(path, bytes).await
    }

    async fn write(&self, path: &Path, bytes: Bytes) -> bool {
        let (store, path) = (self.store.clone(), path.to_owned());
        let written = super::blocking("cannot restore a hosted file", move || {
            store.write_atomic(&path, &bytes)
        })
        .await;
        written.is_ok()
    }

    /// Reads a blob from the bucket to the disk, verified against its digest; true when it is
    /// there now.
    pub async fn restore_blob(&self, d: &Digest) -> Result<bool, RegistryError> {
        let path = self.store.blob_path(d);
        let key = self.key(&path)?;
        let Lookup::Found((_, body)) = self.shared.get_hosted_blob(&key).await else {
            return Ok(false);
        };
        let store = self.store.clone();
        let (tmp, file) =
            super::blocking("cannot restore a blob", move || store.temp_file()).await?;
        let mut sink = Sink::new(file);
        if let Err(e) = sink.append(body, None).await {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(digest = %d, error = ?e, "cannot restore a hosted blob from the object store");
            return Ok(false);
        }
        let (store, want) = (self.store.clone(), d.clone());
        super::blocking("cannot restore a blob", move || {
            let got = match (sink.hasher, want.algorithm()) {
                (Some(h), DigestAlgorithm::Sha256) => h.finish(),
                _ => super::hash_file(&sink.file, sink.len, want.algorithm())?,
            };
            if got != want {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(digest = %want, got = %got, "hosted blob in the object store does not match its digest; not served");
                return Ok(false);
            }
            sink.file.sync_all()?;
            store.commit_blob(&tmp, &want)?;
            Ok(true)
        })
        .await
    }

    /// The tags of a repository in the bucket (None when it cannot say).
    pub async fn tags(&self, registry: &str, repo: &RepoName) -> Option<Vec<String>> {
        let dir = self
            .key(&self.store.repo_dir(registry, repo).join("_tags"))
            .ok()?;
        let (listed, _) = self.shared.list_hosted(&dir, TAGS_LIMIT).await.ok()?;
        Some(
            listed
                .into_iter()
                .filter_map(|(key, _, _)| Some(key.rsplit_once('/')?.1.to_owned()))
                .collect(),
        )
    }

    /// Brings the repositories' index on the disk up to date with the bucket: every link,
    /// tag and referrer the disk lacks is written, every tag that differs is overwritten
    /// (the bucket's is the latest push). Nothing is removed from the disk. Bounded in objects
    /// ([`RESTORE_LIMIT`]) and time ([`RESTORE_TIME`]).
    pub async fn restore_index(&self) -> Restored {
        let started = Instant::now();
        let mut report = Restored::default();
        let listed = tokio::time::timeout(
            RESTORE_TIME,
            self.shared.list_hosted("repos", RESTORE_LIMIT),
        )
        .await;
        let keys = match listed {
            Ok(Ok((keys, more))) => {
                report.partial = more;
                keys
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot list the hosted registries in the object store");
                report.partial = true;
                return report;
            }
            Err(_) => {
                tracing::warn!("listing the hosted registries in the object store took too long");
                report.partial = true;
                return report;
            }
        };
        report.listed = keys.len();
        let work = keys.into_iter().filter_map(|(key, _, _)| {
            let path = self.store.index_path(&key)?;
            let tag = key.contains("/_tags/");
            Some(async move {
                if !tag && path.exists() {
                    return None;
                }
                let Lookup::Found(bytes) = self.shared.get_hosted(&key).await else {
                    return Some(false);
                };
                if tag && std::fs::read(&path).is_ok_and(|b| b == bytes) {
                    return None;
                }
                Some(self.write(&path, bytes).await)
            })
        });
        let mut results = futures_util::stream::iter(work).buffer_unordered(RESTORE_AT_ONCE);
        let deadline = started + RESTORE_TIME;
        loop {
            let next = tokio::time::timeout_at(deadline.into(), results.next()).await;
            match next {
                Ok(Some(Some(true))) => report.written += 1,
                Ok(Some(Some(false))) => report.failed += 1,
                Ok(Some(None)) => {}
                Ok(None) => break,
                Err(_) => {
                    report.partial = true;
                    break;
                }
            }
        }
        report
    }
}
