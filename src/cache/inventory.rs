//! What the cache holds, image by image, and purging an image (`berth cache ls`, `berth cache
//! rm` through the admin API). Read from the manifest and blob stores themselves: nothing here
//! keeps books of its own. Blocking (it walks the cache's folders): run it off the runtime.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;

use super::{BlobStore, ManifestStore, Pins, PullStat, SharedStore};
use crate::oci::{Digest, Reference, RepoName, Tag, referenced_digests};

/// One cached tag (or a manifest no tag points to).
#[derive(Debug, Serialize)]
pub struct CachedImage {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
    pub media_type: String,
    /// Bytes on disk: the manifest's blobs that are cached (children of an index included).
    pub bytes: u64,
    /// When upstream last confirmed the tag (seconds since the epoch).
    pub checked: Option<u64>,
    /// Manifest GETs of the tag or of its digest (kept across restarts).
    pub pulls: u64,
    /// The last of those (seconds since the epoch).
    pub last_pulled: Option<u64>,
    /// Pinned by name (`berth pin`, `[cache] pin`): never evicted.
    pub pinned: bool,
}

/// An image's pulls: by its tag and by the digest the tag names.
fn pulls_of(manifests: &ManifestStore, registry: &str, repo: &RepoName, refs: &[&str]) -> PullStat {
    let mut total = PullStat::default();
    for r in refs {
        if let Some(s) = manifests.pulls().get(registry, repo, r) {
            total.count += s.count;
            total.last = total.last.max(s.last);
        }
    }
    total
}

/// What a purge removed (or, with `dry_run`, would remove).
#[derive(Debug, Default, Serialize)]
pub struct Purged {
    pub dry_run: bool,
    pub tags: Vec<String>,
    pub manifests: Vec<String>,
    pub blobs: Vec<String>,
    pub bytes_freed: u64,
    /// The same, typed (for the shared store's purge).
    #[serde(skip)]
    pub removed: Removed,
}

/// What a purge removed from one repository, typed.
#[derive(Debug, Default)]
pub struct Removed {
    pub registry: String,
    pub repo: Option<RepoName>,
    pub tags: Vec<Tag>,
    pub manifests: Vec<Digest>,
    pub blobs: Vec<Digest>,
}

impl Removed {
    /// Deletes it from the shared store too (see [`SharedStore::purge`]).
    pub async fn purge_from(&self, shared: &SharedStore) -> Result<usize, String> {
        let Some(repo) = &self.repo else { return Ok(0) };
        shared
            .purge(
                &self.registry,
                repo,
                &self.tags,
                &self.manifests,
                &self.blobs,
            )
            .await
    }
}

/// The digests a cached manifest reaches: its blobs and, for an index, its cached children's.
fn reach(
    manifests: &ManifestStore,
    registry: &Arc<str>,
    repo: &RepoName,
    d: &Digest,
) -> HashSet<Digest> {
    let mut seen = HashSet::new();
    let mut todo = vec![d.clone()];
    // Bounded: an index lists at most what its 4 MiB hold, children are leaves.
    while let Some(d) = todo.pop() {
        if !seen.insert(d.clone()) || seen.len() > 100_000 {
            continue;
        }
        if let Some(m) = manifests.get(registry, repo, &d) {
            todo.extend(referenced_digests(&m.bytes));
        }
    }
    seen
}

pub fn list(
    manifests: &ManifestStore,
    blobs: &BlobStore,
    pins: &Pins,
    registry: Option<&str>,
) -> Vec<CachedImage> {
    let mut out = Vec::new();
    for reg in manifests.registries() {
        if registry.is_some_and(|r| r != reg) {
            continue;
        }
        let reg_arc: Arc<str> = reg.as_str().into();
        for repo_name in manifests.repositories(&reg) {
            let Ok(repo) = repo_name.parse::<RepoName>() else {
                continue;
            };
            let tags = manifests.tags_of(&reg, &repo);
            let mut tagged: HashSet<Digest> = HashSet::new();
            let size = |d: &Digest| -> u64 {
                reach(manifests, &reg_arc, &repo, d)
                    .iter()
                    .filter_map(|b| blobs.len_of(b))
                    .sum()
            };
            for (tag, rec) in &tags {
                tagged.insert(rec.digest.clone());
                let digest = rec.digest.to_string();
                let pulls = pulls_of(manifests, &reg, &repo, &[tag.as_str(), &digest]);
                out.push(CachedImage {
                    pulls: pulls.count,
                    last_pulled: (pulls.count > 0).then_some(pulls.last),
                    pinned: pins.names(&reg, &repo_name, tag.as_str())
                        || pins.names(&reg, &repo_name, &digest),
                    registry: reg.clone(),
                    repository: repo_name.clone(),
                    tag: Some(tag.to_string()),
                    digest,
                    media_type: rec.media_type.clone(),
                    bytes: size(&rec.digest),
                    checked: Some(rec.checked),
                });
            }
            // Manifests pulled by digest that no tag (nor a tagged index) reaches.
            let reached: HashSet<Digest> = tagged
                .iter()
                .flat_map(|d| reach(manifests, &reg_arc, &repo, d))
                .collect();
            for d in manifests.manifests_of(&reg, &repo) {
                if reached.contains(&d) {
                    continue;
                }
                let media_type = manifests
                    .get(&reg_arc, &repo, &d)
                    .map(|m| m.media_type.clone())
                    .unwrap_or_default();
                let digest = d.to_string();
                let pulls = pulls_of(manifests, &reg, &repo, &[&digest]);
                out.push(CachedImage {
                    pulls: pulls.count,
                    last_pulled: (pulls.count > 0).then_some(pulls.last),
                    pinned: pins.names(&reg, &repo_name, &digest),
                    registry: reg.clone(),
                    repository: repo_name.clone(),
                    tag: None,
                    bytes: size(&d),
                    digest,
                    media_type,
                    checked: None,
                });
            }
        }
    }
    out
}

/// Purges an image: its tag (or, by digest, the manifest and every tag pointing to it), the
/// manifests it reaches that nothing else cached reaches, and the blobs no remaining cached
/// manifest references.
pub fn remove(
    manifests: &ManifestStore,
    blobs: &BlobStore,
    registry: &Arc<str>,
    repo: &RepoName,
    reference: &Reference,
    dry_run: bool,
) -> std::io::Result<Purged> {
    let mut p = Purged {
        dry_run,
        ..Purged::default()
    };
    p.removed.registry = registry.to_string();
    p.removed.repo = Some(repo.clone());
    let tags = manifests.tags_of(registry, repo);
    let (root, gone_tags): (Option<Digest>, Vec<_>) = match reference {
        Reference::Tag(t) => {
            let rec = tags.iter().find(|(tag, _)| tag == t);
            (
                rec.map(|(_, r)| r.digest.clone()),
                rec.map(|(t, _)| t.clone()).into_iter().collect(),
            )
        }
        Reference::Digest(d) => (
            Some(d.clone()),
            tags.iter()
                .filter(|(_, r)| &r.digest == d)
                .map(|(t, _)| t.clone())
                .collect(),
        ),
    };
    let Some(root) = root else {
        return Ok(p);
    };
    // What every other tag and manifest of the whole cache still reaches.
    let mut kept: HashSet<Digest> = HashSet::new();
    for reg in manifests.registries() {
        let reg_arc: Arc<str> = reg.as_str().into();
        for name in manifests.repositories(&reg) {
            let Ok(r) = name.parse::<RepoName>() else {
                continue;
            };
            let same_repo = reg_arc == *registry && &r == repo;
            for (tag, rec) in manifests.tags_of(&reg, &r) {
                if same_repo && gone_tags.contains(&tag) {
                    continue;
                }
                kept.extend(reach(manifests, &reg_arc, &r, &rec.digest));
            }
            if !same_repo {
                for d in manifests.manifests_of(&reg, &r) {
                    kept.extend(reach(manifests, &reg_arc, &r, &d));
                }
            }
        }
    }
    let reached = reach(manifests, registry, repo, &root);
    let repo_manifests: HashSet<Digest> =
        manifests.manifests_of(registry, repo).into_iter().collect();
    for t in &gone_tags {
        p.tags.push(format!("{registry}/{repo}:{t}"));
        p.removed.tags.push(t.clone());
        if !dry_run {
            manifests.remove_tag(registry, repo, t)?;
            manifests.pulls().forget(registry, repo, t.as_str());
        }
    }
    let mut digests: Vec<&Digest> = reached.iter().filter(|d| !kept.contains(*d)).collect();
    digests.sort();
    for d in digests {
        if repo_manifests.contains(d) {
            p.manifests.push(d.to_string());
            p.removed.manifests.push(d.clone());
            if !dry_run {
                manifests.remove_manifest(registry, repo, d)?;
                manifests.pulls().forget(registry, repo, &d.to_string());
            }
        }
        // A blob another pinned image holds stays.
        if blobs.is_pinned(d) {
            continue;
        }
        if let Some(len) = blobs.len_of(d) {
            p.blobs.push(d.to_string());
            p.removed.blobs.push(d.clone());
            p.bytes_freed += len;
            if !dry_run {
                blobs.remove(d)?;
            }
        }
    }
    Ok(p)
}

/// What a prune removed (or, with `dry_run`, would remove).
#[derive(Debug, Default, Serialize)]
pub struct Pruned {
    pub dry_run: bool,
    /// The images not pulled since the cutoff, as `registry/repository:tag` or `@digest`.
    pub images: Vec<String>,
    pub blobs: Vec<String>,
    pub bytes_freed: u64,
    /// Per image, typed (for the shared store's purge).
    #[serde(skip)]
    pub removed: Vec<Removed>,
}

/// Purges every image not pulled since `cutoff` (seconds since the epoch; a tag never pulled
/// counts from when upstream last confirmed it, a manifest by digest never pulled is kept).
/// Pinned images stay. A dry run counts only the blobs no other image references (blobs only
/// two pruned images share are freed by the real run but not counted by the dry one).
/// Blocking.
pub fn prune(
    manifests: &ManifestStore,
    blobs: &BlobStore,
    pins: &Pins,
    cutoff: u64,
    dry_run: bool,
) -> std::io::Result<Pruned> {
    let mut out = Pruned {
        dry_run,
        ..Pruned::default()
    };
    for image in list(manifests, blobs, pins, None) {
        let last = image.last_pulled.or(image.checked);
        if image.pinned || last.is_none_or(|t| t >= cutoff) {
            continue;
        }
        let (Ok(repo), reference) = (
            image.repository.parse::<RepoName>(),
            match &image.tag {
                Some(t) => t.parse::<Reference>(),
                None => image.digest.parse::<Reference>(),
            },
        ) else {
            continue;
        };
        let Ok(reference) = reference else { continue };
        let registry: Arc<str> = image.registry.as_str().into();
        let p = remove(manifests, blobs, &registry, &repo, &reference, dry_run)?;
        out.images.push(match &image.tag {
            Some(t) => format!("{}/{}:{t}", image.registry, image.repository),
            None => format!("{}/{}@{}", image.registry, image.repository, image.digest),
        });
        out.bytes_freed += p.bytes_freed;
        out.blobs.extend(p.blobs);
        out.removed.push(p.removed);
    }
    Ok(out)
}
