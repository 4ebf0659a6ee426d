//! Manifests and tags, per registry and repository, on disk under
//! `<dir>/manifests/<registry>/<repo>/_manifests/<alg>/<hex>` (first line: media type, then the
//! exact bytes) and `…/_tags/<tag>` (JSON), with small in-memory caches in front so the warm
//! manifest path never reads the disk. Also the repository index: which digests each
//! repository is known to contain, so one repository's blobs are never served under another.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderValue;

use super::Pulls;
use crate::oci::{Digest, Hasher, Reference, RepoName, Tag, referenced_digests};

/// A manifest with its exact bytes and the response headers that go with it.
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    pub content_type: HeaderValue,
    pub digest_header: HeaderValue,
    pub etag_header: HeaderValue,
}

impl Manifest {
    /// Builds a manifest from bytes that hash to `digest` (checked by the caller).
    pub fn new(digest: Digest, media_type: String, bytes: Bytes) -> Option<Manifest> {
        Some(Manifest {
            content_type: HeaderValue::from_str(&media_type).ok()?,
            digest_header: HeaderValue::from_str(&digest.to_string()).ok()?,
            etag_header: HeaderValue::from_str(&format!("\"{digest}\"")).ok()?,
            digest,
            media_type,
            bytes,
        })
    }
}

/// What a tag pointed to when it was last checked upstream.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TagRecord {
    #[serde(with = "digest_string")]
    pub digest: Digest,
    pub media_type: String,
    /// Seconds since the epoch of the last upstream confirmation.
    pub checked: u64,
}

impl TagRecord {
    pub fn age(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Duration::from_secs(now.saturating_sub(self.checked))
    }

    pub fn now(digest: &Digest, media_type: &str) -> TagRecord {
        TagRecord {
            digest: digest.clone(),
            media_type: media_type.to_owned(),
            checked: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        }
    }
}

type RepoKey = (Arc<str>, RepoName);

/// Digests in tag records are stored as their string form.
mod digest_string {
    use crate::oci::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

pub struct ManifestStore {
    root: PathBuf,
    by_digest: moka::sync::Cache<(RepoKey, Digest), Arc<Manifest>>,
    tags: moka::sync::Cache<(RepoKey, Tag), Arc<TagRecord>>,
    members: RwLock<HashMap<RepoKey, HashSet<Digest>>>,
    /// Digests upstream recently said a repository does not hold, so repeated probes for a
    /// foreign digest cost one upstream request a minute, not one each.
    non_members: moka::sync::Cache<(RepoKey, Digest), ()>,
    /// Manifest GETs answered per image, kept across restarts.
    pulls: Pulls,
}

/// A cached repository's size: the blobs in the cache it is known to hold.
#[derive(Debug, Clone)]
pub struct RepoSize {
    pub registry: Arc<str>,
    pub repo: RepoName,
    pub bytes: u64,
    pub blobs: usize,
}

impl ManifestStore {
    pub fn open(dir: &Path) -> io::Result<ManifestStore> {
        let root = dir.join("manifests");
        std::fs::create_dir_all(&root)?;
        Ok(ManifestStore {
            root,
            by_digest: moka::sync::Cache::builder()
                .max_capacity(8 * 1024 * 1024)
                .weigher(|_, m: &Arc<Manifest>| {
                    u32::try_from(m.bytes.len() + 256).unwrap_or(u32::MAX)
                })
                .build(),
            tags: moka::sync::Cache::new(100_000),
            members: RwLock::new(HashMap::new()),
            non_members: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            pulls: Pulls::open(dir),
        })
    }

    fn repo_dir(&self, registry: &str, repo: &RepoName) -> PathBuf {
        // Both parts are validated names: no component can be empty, "." or "..".
        self.root.join(registry).join(repo.as_str())
    }

    fn manifest_path(&self, registry: &str, repo: &RepoName, digest: &Digest) -> PathBuf {
        self.repo_dir(registry, repo)
            .join("_manifests")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    fn tag_path(&self, registry: &str, repo: &RepoName, tag: &Tag) -> PathBuf {
        self.repo_dir(registry, repo)
            .join("_tags")
            .join(tag.as_str())
    }

    pub fn get(
        &self,
        registry: &Arc<str>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Option<Arc<Manifest>> {
        let key = ((registry.clone(), repo.clone()), digest.clone());
        if let Some(m) = self.by_digest.get(&key) {
            return Some(m);
        }
        let raw = std::fs::read(self.manifest_path(registry, repo, digest)).ok()?;
        let nl = raw.iter().position(|&b| b == b'\n')?;
        let media_type = std::str::from_utf8(&raw[..nl]).ok()?.to_owned();
        let bytes = Bytes::copy_from_slice(&raw[nl + 1..]);
        let mut hasher = Hasher::new(digest.algorithm());
        hasher.update(&bytes);
        if hasher.finish() != *digest {
            tracing::warn!(registry = %registry, repository = %repo, digest = %digest, "cached manifest is corrupt; ignoring it");
            return None;
        }
        let m = Arc::new(Manifest::new(digest.clone(), media_type, bytes)?);
        self.by_digest.insert(key, m.clone());
        Some(m)
    }

    pub fn get_tag(
        &self,
        registry: &Arc<str>,
        repo: &RepoName,
        tag: &Tag,
    ) -> Option<Arc<TagRecord>> {
        let key = ((registry.clone(), repo.clone()), tag.clone());
        if let Some(t) = self.tags.get(&key) {
            return Some(t);
        }
        let raw = std::fs::read(self.tag_path(registry, repo, tag)).ok()?;
        let rec: TagRecord = serde_json::from_slice(&raw).ok()?;
        let rec = Arc::new(rec);
        self.tags.insert(key, rec.clone());
        Some(rec)
    }

    /// Stores a verified manifest and records what it references as members of the repository.
    pub fn put(&self, registry: &Arc<str>, repo: &RepoName, m: Arc<Manifest>) {
        let path = self.manifest_path(registry, repo, &m.digest);
        let mut content = Vec::with_capacity(m.media_type.len() + 1 + m.bytes.len());
        content.extend_from_slice(m.media_type.as_bytes());
        content.push(b'\n');
        content.extend_from_slice(&m.bytes);
        if let Err(e) = write_atomic(&path, &content) {
            tracing::warn!(path = %path.display(), error = %e, "cannot store manifest; serving it from memory only");
        }
        self.add_members(registry, repo, &m.bytes, &m.digest);
        self.by_digest
            .insert(((registry.clone(), repo.clone()), m.digest.clone()), m);
    }

    pub fn put_tag(&self, registry: &Arc<str>, repo: &RepoName, tag: &Tag, rec: TagRecord) {
        let path = self.tag_path(registry, repo, tag);
        match serde_json::to_vec(&rec) {
            Ok(json) => {
                if let Err(e) = write_atomic(&path, &json) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot store tag");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode tag record"),
        }
        self.tags.insert(
            ((registry.clone(), repo.clone()), tag.clone()),
            Arc::new(rec),
        );
    }

    fn add_members(&self, registry: &Arc<str>, repo: &RepoName, bytes: &[u8], own: &Digest) {
        let refs = referenced_digests(bytes);
        let mut members = self.members.write();
        let set = members.entry((registry.clone(), repo.clone())).or_default();
        set.insert(own.clone());
        set.extend(refs);
    }

    /// Records that upstream confirmed `digest` exists in the repository.
    pub fn add_member(&self, registry: &Arc<str>, repo: &RepoName, digest: &Digest) {
        let mut members = self.members.write();
        members
            .entry((registry.clone(), repo.clone()))
            .or_default()
            .insert(digest.clone());
    }

    /// Records that upstream said the repository does not hold `digest`.
    pub fn add_non_member(&self, registry: &Arc<str>, repo: &RepoName, digest: &Digest) {
        self.non_members
            .insert(((registry.clone(), repo.clone()), digest.clone()), ());
    }

    pub fn is_known_non_member(
        &self,
        registry: &Arc<str>,
        repo: &RepoName,
        digest: &Digest,
    ) -> bool {
        self.non_members
            .contains_key(&((registry.clone(), repo.clone()), digest.clone()))
    }

    pub fn is_member(&self, registry: &Arc<str>, repo: &RepoName, digest: &Digest) -> bool {
        let members = self.members.read();
        members
            .get(&(registry.clone(), repo.clone()))
            .is_some_and(|s| s.contains(digest))
    }

    /// Rebuilds the repository index from the manifests on disk. Blocking.
    pub fn scan(&self) -> io::Result<usize> {
        let mut n = 0;
        let Ok(registries) = std::fs::read_dir(&self.root) else {
            return Ok(0);
        };
        for reg in registries.flatten() {
            let Some(reg_name) = reg.file_name().to_str().map(Arc::<str>::from) else {
                continue;
            };
            for (repo, dir) in repos_under(&reg.path()) {
                for alg in ["sha256", "sha512"] {
                    let Ok(files) = std::fs::read_dir(dir.join("_manifests").join(alg)) else {
                        continue;
                    };
                    for f in files.flatten() {
                        let Some(digest) = f
                            .file_name()
                            .to_str()
                            .and_then(|h| format!("{alg}:{h}").parse::<Digest>().ok())
                        else {
                            continue;
                        };
                        if let Ok(raw) = std::fs::read(f.path()) {
                            let body = raw
                                .iter()
                                .position(|&b| b == b'\n')
                                .map_or(&raw[..0], |nl| &raw[nl + 1..]);
                            self.add_members(&reg_name, &repo, body, &digest);
                            n += 1;
                        }
                    }
                }
            }
        }
        Ok(n)
    }

    /// The registries with cached manifests.
    pub fn registries(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        out.sort();
        out
    }

    /// The tags of a cached repository and their records, sorted by tag.
    pub fn tags_of(&self, registry: &str, repo: &RepoName) -> Vec<(Tag, TagRecord)> {
        let dir = self.repo_dir(registry, repo).join("_tags");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<(Tag, TagRecord)> = entries
            .flatten()
            .filter_map(|e| {
                let tag = e.file_name().to_str()?.parse::<Tag>().ok()?;
                let rec = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                Some((tag, rec))
            })
            .collect();
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        out
    }

    /// The manifests cached for a repository.
    pub fn manifests_of(&self, registry: &str, repo: &RepoName) -> Vec<Digest> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            let dir = self.repo_dir(registry, repo).join("_manifests").join(alg);
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            out.extend(entries.flatten().filter_map(|e| {
                format!("{alg}:{}", e.file_name().to_str()?)
                    .parse::<Digest>()
                    .ok()
            }));
        }
        out.sort();
        out
    }

    /// Forgets a tag (its record on disk and in memory).
    pub fn remove_tag(&self, registry: &Arc<str>, repo: &RepoName, tag: &Tag) -> io::Result<()> {
        self.tags
            .invalidate(&((registry.clone(), repo.clone()), tag.clone()));
        match std::fs::remove_file(self.tag_path(registry, repo, tag)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Forgets a manifest of a repository.
    pub fn remove_manifest(
        &self,
        registry: &Arc<str>,
        repo: &RepoName,
        digest: &Digest,
    ) -> io::Result<()> {
        self.by_digest
            .invalidate(&((registry.clone(), repo.clone()), digest.clone()));
        match std::fs::remove_file(self.manifest_path(registry, repo, digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Counts one manifest GET answered for `reference` (a tag or digest) of the repository.
    pub fn record_pull(&self, registry: &Arc<str>, repo: &RepoName, reference: &Reference) {
        match reference {
            Reference::Tag(t) => self.pulls.record(registry, repo, t.as_str()),
            Reference::Digest(d) => self.pulls.record(registry, repo, &d.to_string()),
        }
    }

    /// Pull counts and last-pulled times.
    pub fn pulls(&self) -> &Pulls {
        &self.pulls
    }

    /// The `n` repositories with the most manifest GETs, most first (ties by name), with
    /// their counts.
    pub fn top_pulled(&self, n: usize) -> Vec<(Arc<str>, RepoName, u64)> {
        self.pulls.top_repositories(n)
    }

    /// The `n` largest repositories by the bytes of cached blobs (`sizes`: every cached
    /// blob's size) they are known to hold, largest first (ties by name). A blob two
    /// repositories share counts in both.
    pub fn top_by_size(&self, sizes: &HashMap<Arc<Digest>, u64>, n: usize) -> Vec<RepoSize> {
        let members = self.members.read();
        let mut all: Vec<RepoSize> = members
            .iter()
            .map(|((reg, repo), digests)| {
                let (bytes, blobs) = digests
                    .iter()
                    .filter_map(|d| sizes.get(d))
                    .fold((0u64, 0usize), |(b, k), len| (b + len, k + 1));
                RepoSize {
                    registry: reg.clone(),
                    repo: repo.clone(),
                    bytes,
                    blobs,
                }
            })
            .filter(|r| r.blobs > 0)
            .collect();
        drop(members);
        all.sort_by(|a, b| {
            b.bytes
                .cmp(&a.bytes)
                .then_with(|| a.registry.cmp(&b.registry))
                .then_with(|| a.repo.as_str().cmp(b.repo.as_str()))
        });
        all.truncate(n);
        all
    }

    /// Repositories of `registry` that have cached manifests, sorted.
    pub fn repositories(&self, registry: &str) -> Vec<String> {
        let mut out: Vec<String> = repos_under(&self.root.join(registry))
            .into_iter()
            .map(|(r, _)| r.to_string())
            .collect();
        out.sort();
        out
    }
}

/// Every repository directory (one holding `_manifests`) below a registry directory.
fn repos_under(reg_dir: &Path) -> Vec<(RepoName, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), reg_dir.to_path_buf())];
    while let Some((prefix, dir)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name == "_manifests" {
                if let Ok(repo) = prefix.parse::<RepoName>() {
                    out.push((repo, dir.clone()));
                }
            } else if !name.starts_with('_') && e.file_type().is_ok_and(|t| t.is_dir()) {
                let p = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                stack.push((p, e.path()));
            }
        }
    }
    out
}

fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Names of tags and digests never start with '.', so the temp name cannot clash.
    let nonce: u64 = rand::random();
    let tmp = path.with_file_name(format!(".tmp-{nonce:016x}"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
