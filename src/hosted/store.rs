//! The hosted registries' files, under `<cache.dir>/hosted/`:
//!
//! ```text
//! blobs/<alg>/<xx>/<hex>                      content (layers, configs and manifests alike)
//! uploads/<id>, uploads/<id>.json             an upload in progress and what it is for
//! repos/<registry>/<repo>/_blobs/<alg>-<hex>  the blob is in this repository (empty file)
//! repos/<registry>/<repo>/_manifests/<alg>-<hex>   a manifest of it (holds its media type)
//! repos/<registry>/<repo>/_tags/<tag>         the digest the tag points to
//! repos/<registry>/<repo>/_referrers/<subject alg-hex>/<alg-hex>   a referrer's descriptor
//! tmp/                                        files being written
//! ```
//!
//! Every file is written to `tmp/`, synced, then renamed into place, so a crash (even kill -9)
//! leaves either the old state or the new one, never a half-written file. Repository path
//! components never start with `_` (OCI names), so the `_` folders cannot collide with them.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::oci::{Digest, RepoName, Tag};

pub(crate) struct Store {
    root: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
    pub(super) uploads: PathBuf,
    repos: PathBuf,
}

/// `alg-hex`: a digest as a file name.
pub(crate) fn file_name(d: &Digest) -> String {
    format!("{}-{}", d.algorithm().as_str(), d.hex())
}

fn parse_file_name(name: &str) -> Option<Digest> {
    let (alg, hex) = name.split_once('-')?;
    format!("{alg}:{hex}").parse().ok()
}

/// Syncs a directory, so a rename into it survives a crash.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    pub(crate) fn open(cache_dir: &Path) -> io::Result<Store> {
        let root = cache_dir.join("hosted");
        let store = Store {
            blobs: root.join("blobs"),
            tmp: root.join("tmp"),
            uploads: root.join("uploads"),
            repos: root.join("repos"),
            root,
        };
        for d in [&store.blobs, &store.tmp, &store.uploads, &store.repos] {
            fs::create_dir_all(d)?;
        }
        // Files of writes a crash interrupted: never visible, safe to drop.
        for e in fs::read_dir(&store.tmp)? {
            let _ = fs::remove_file(e?.path());
        }
        Ok(store)
    }

    /// The object-store key of a file of this store: its path under `hosted/`.
    pub(crate) fn key(&self, path: &Path) -> Option<String> {
        path.strip_prefix(&self.root)
            .ok()?
            .to_str()
            .map(str::to_owned)
    }

    /// The file an object-store key of a repository's index names (`repos/<registry>/<repo>/
    /// _<folder>/…`), or None for any other key: one that is not such a key, or has an empty,
    /// `.` or `..` component, never leads outside `repos/`.
    pub(crate) fn index_path(&self, key: &str) -> Option<PathBuf> {
        let rest = key.strip_prefix("repos/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        let folder = parts.iter().position(|p| p.starts_with('_'))?;
        let valid = parts.len() > folder + 1
            && folder >= 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.contains('\\'))
            && matches!(
                parts[folder],
                "_blobs" | "_manifests" | "_tags" | "_referrers"
            );
        valid.then(|| self.repos.join(rest))
    }

    pub(crate) fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.blobs
            .join(d.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    pub(crate) fn repo_dir(&self, registry: &str, repo: &RepoName) -> PathBuf {
        self.repos.join(registry).join(repo.as_str())
    }

    /// A new file in `tmp/` to write into (and then [`Store::commit_file`]).
    pub(crate) fn temp_file(&self) -> io::Result<(PathBuf, File)> {
        let path = self.tmp.join(format!("{:032x}", rand::random::<u128>()));
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, f))
    }

    /// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the folder.
    pub(crate) fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let (tmp, mut f) = self.temp_file()?;
        let written = f.write_all(bytes).and_then(|()| f.sync_all());
        drop(f);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.place(&tmp, path)
    }

    /// Renames a synced temp file to `path`, making the folders it needs.
    fn place(&self, tmp: &Path, path: &Path) -> io::Result<()> {
        let dir = path.parent().unwrap_or(&self.root);
        let placed = fs::create_dir_all(dir)
            .and_then(|()| fs::rename(tmp, path))
            .and_then(|()| sync_dir(dir));
        if placed.is_err() {
            let _ = fs::remove_file(tmp);
        }
        placed
    }

    /// Makes a verified, synced temp file the blob `d` (a no-op when it is already stored).
    pub(crate) fn commit_blob(&self, tmp: &Path, d: &Digest) -> io::Result<()> {
        let path = self.blob_path(d);
        if path.exists() {
            let _ = fs::remove_file(tmp);
            return Ok(());
        }
        self.place(tmp, &path)
    }

    /// Stores the blob `d` as a second name of a verified file elsewhere on the same disk (the
    /// mirror's cache): the bytes are kept once. False when that is not possible.
    pub(crate) fn link_blob(&self, from: &Path, d: &Digest) -> bool {
        let path = self.blob_path(d);
        if path.exists() {
            return true;
        }
        let Some(dir) = path.parent() else {
            return false;
        };
        fs::create_dir_all(dir).is_ok()
            && fs::hard_link(from, &path).is_ok()
            && sync_dir(dir).is_ok()
    }

    pub(crate) fn write_blob(&self, d: &Digest, bytes: &[u8]) -> io::Result<()> {
        let path = self.blob_path(d);
        if path.exists() {
            return Ok(());
        }
        self.write_atomic(&path, bytes)
    }

    pub(crate) fn open_blob(&self, d: &Digest) -> io::Result<(File, u64)> {
        let f = File::open(self.blob_path(d))?;
        let len = f.metadata()?.len();
        Ok((f, len))
    }

    pub(crate) fn read_blob(&self, d: &Digest) -> io::Result<Vec<u8>> {
        fs::read(self.blob_path(d))
    }

    // Repository links.

    pub(crate) fn blob_link(&self, registry: &str, repo: &RepoName, d: &Digest) -> PathBuf {
        self.repo_dir(registry, repo)
            .join("_blobs")
            .join(file_name(d))
    }

    pub(crate) fn manifest_link(&self, registry: &str, repo: &RepoName, d: &Digest) -> PathBuf {
        self.repo_dir(registry, repo)
            .join("_manifests")
            .join(file_name(d))
    }

    pub(crate) fn tag_path(&self, registry: &str, repo: &RepoName, tag: &Tag) -> PathBuf {
        self.repo_dir(registry, repo)
            .join("_tags")
            .join(tag.as_str())
    }

    pub(crate) fn referrers_dir(
        &self,
        registry: &str,
        repo: &RepoName,
        subject: &Digest,
    ) -> PathBuf {
        self.repo_dir(registry, repo)
            .join("_referrers")
            .join(file_name(subject))
    }

    pub(crate) fn has_blob(&self, registry: &str, repo: &RepoName, d: &Digest) -> bool {
        self.blob_link(registry, repo, d).exists() && self.blob_path(d).exists()
    }

    pub(crate) fn link_blob_to(
        &self,
        registry: &str,
        repo: &RepoName,
        d: &Digest,
    ) -> io::Result<()> {
        let path = self.blob_link(registry, repo, d);
        if path.exists() {
            return Ok(());
        }
        self.write_atomic(&path, b"")
    }

    /// Removes a blob from a repository; false when it was not there.
    pub(crate) fn unlink_blob(
        &self,
        registry: &str,
        repo: &RepoName,
        d: &Digest,
    ) -> io::Result<bool> {
        remove_if_exists(&self.blob_link(registry, repo, d))
    }

    /// The media type of a manifest of the repository, or None.
    pub(crate) fn manifest_type(
        &self,
        registry: &str,
        repo: &RepoName,
        d: &Digest,
    ) -> Option<String> {
        let t = fs::read_to_string(self.manifest_link(registry, repo, d)).ok()?;
        self.blob_path(d).exists().then_some(t)
    }

    pub(crate) fn link_manifest(
        &self,
        registry: &str,
        repo: &RepoName,
        d: &Digest,
        media_type: &str,
    ) -> io::Result<()> {
        self.write_atomic(
            &self.manifest_link(registry, repo, d),
            media_type.as_bytes(),
        )
    }

    pub(crate) fn unlink_manifest(
        &self,
        registry: &str,
        repo: &RepoName,
        d: &Digest,
    ) -> io::Result<bool> {
        remove_if_exists(&self.manifest_link(registry, repo, d))
    }

    pub(crate) fn tag(&self, registry: &str, repo: &RepoName, tag: &Tag) -> Option<Digest> {
        fs::read_to_string(self.tag_path(registry, repo, tag))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub(crate) fn set_tag(
        &self,
        registry: &str,
        repo: &RepoName,
        tag: &Tag,
        d: &Digest,
    ) -> io::Result<()> {
        self.write_atomic(
            &self.tag_path(registry, repo, tag),
            d.to_string().as_bytes(),
        )
    }

    pub(crate) fn remove_tag(
        &self,
        registry: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> io::Result<bool> {
        remove_if_exists(&self.tag_path(registry, repo, tag))
    }

    /// The repository's tags, sorted.
    pub(crate) fn tags(&self, registry: &str, repo: &RepoName) -> Vec<(String, Option<Digest>)> {
        let dir = self.repo_dir(registry, repo).join("_tags");
        let mut out: Vec<(String, Option<Digest>)> = read_names(&dir)
            .into_iter()
            .map(|name| {
                let d = fs::read_to_string(dir.join(&name))
                    .ok()
                    .and_then(|t| t.trim().parse().ok());
                (name, d)
            })
            .collect();
        out.sort();
        out
    }

    /// Every manifest digest linked in the repository, with when it was linked.
    pub(crate) fn manifests(
        &self,
        registry: &str,
        repo: &RepoName,
    ) -> Vec<(Digest, std::time::SystemTime)> {
        linked(&self.repo_dir(registry, repo).join("_manifests"))
    }

    /// Every blob digest linked in the repository, with when it was linked.
    pub(crate) fn blob_links(
        &self,
        registry: &str,
        repo: &RepoName,
    ) -> Vec<(Digest, std::time::SystemTime)> {
        linked(&self.repo_dir(registry, repo).join("_blobs"))
    }

    pub(crate) fn add_referrer(
        &self,
        registry: &str,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
        descriptor: &[u8],
    ) -> io::Result<()> {
        let path = self
            .referrers_dir(registry, repo, subject)
            .join(file_name(referrer));
        self.write_atomic(&path, descriptor)
    }

    pub(crate) fn remove_referrer(
        &self,
        registry: &str,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) {
        let dir = self.referrers_dir(registry, repo, subject);
        let _ = remove_if_exists(&dir.join(file_name(referrer)));
        let _ = fs::remove_dir(&dir);
    }

    /// The descriptors of the manifests whose subject is `subject`, in digest order.
    pub(crate) fn referrers(
        &self,
        registry: &str,
        repo: &RepoName,
        subject: &Digest,
    ) -> Vec<Vec<u8>> {
        let dir = self.referrers_dir(registry, repo, subject);
        let mut names = read_names(&dir);
        names.sort();
        names
            .into_iter()
            .filter_map(|n| fs::read(dir.join(n)).ok())
            .collect()
    }

    /// The repositories of a hosted registry that hold at least one manifest or tag, sorted.
    pub(crate) fn repositories(&self, registry: &str) -> Vec<String> {
        let mut out: Vec<String> = repo_dirs(&self.repos.join(registry))
            .into_iter()
            .filter(|(_, dir)| {
                !read_names(&dir.join("_manifests")).is_empty()
                    || !read_names(&dir.join("_tags")).is_empty()
            })
            .map(|(name, _)| name)
            .collect();
        out.sort();
        out
    }

    /// Every stored blob with its size and modification time (for garbage collection).
    pub(crate) fn all_blobs(&self) -> Vec<(Digest, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            for shard in read_names(&self.blobs.join(alg)) {
                for hex in read_names(&self.blobs.join(alg).join(&shard)) {
                    let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else {
                        continue;
                    };
                    if let Ok(m) = fs::metadata(self.blob_path(&d)) {
                        let at = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                        out.push((d, m.len(), at));
                    }
                }
            }
        }
        out
    }

    pub(crate) fn remove_blob(&self, d: &Digest) -> io::Result<bool> {
        remove_if_exists(&self.blob_path(d))
    }

    /// Every (registry, repository) folder that exists, for garbage collection.
    pub(crate) fn all_repositories(&self) -> Vec<(String, RepoName)> {
        // Repositories with only blob links count too (their blobs are still reachable by a
        // manifest push to come).
        let mut out = Vec::new();
        for registry in read_names(&self.repos) {
            for (name, _) in repo_dirs(&self.repos.join(&registry)) {
                if let Ok(repo) = name.parse::<RepoName>() {
                    out.push((registry.clone(), repo));
                }
            }
        }
        out
    }
}

/// Every repository folder under a registry's folder (one with a `_` folder in it), with its
/// name relative to `base`: depth-first, bounded (names have at most 255 bytes).
fn repo_dirs(base: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![(base.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut is_repo = false;
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with('_') {
                is_repo = true;
            } else if depth < 64 && e.path().is_dir() {
                stack.push((e.path(), depth + 1));
            }
        }
        if is_repo && let Some(rel) = dir.strip_prefix(base).ok().and_then(|r| r.to_str()) {
            out.push((rel.to_owned(), dir.clone()));
        }
    }
    out
}

fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn read_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

fn linked(dir: &Path) -> Vec<(Digest, std::time::SystemTime)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let d = parse_file_name(e.file_name().to_str()?)?;
            let at = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            Some((d, at))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Store;

    #[test]
    fn only_index_keys_under_repos_map_to_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let repos = dir.path().join("hosted/repos");
        for (key, want) in [
            (
                "repos/local/team/app/_tags/v1",
                Some("local/team/app/_tags/v1"),
            ),
            (
                "repos/local/a/b/c/_blobs/sha256-00",
                Some("local/a/b/c/_blobs/sha256-00"),
            ),
            (
                "repos/local/team/app/_referrers/sha256-aa/sha256-bb",
                Some("local/team/app/_referrers/sha256-aa/sha256-bb"),
            ),
            (
                "repos/local/team/app/_manifests/sha256-00",
                Some("local/team/app/_manifests/sha256-00"),
            ),
            ("repos/local/_tags/v1", None),
            ("repos/local/team/app/_tags", None),
            ("repos/local/team/app/_other/x", None),
            ("repos/local/../../etc/_tags/x", None),
            ("repos/local/team/./_tags/x", None),
            ("repos/local//app/_tags/x", None),
            ("blobs/sha256/00/00", None),
            ("tmp/x", None),
            ("uploads/x", None),
        ] {
            assert_eq!(store.index_path(key), want.map(|w| repos.join(w)), "{key}");
        }
    }
}
