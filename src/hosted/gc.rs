//! Garbage collection of the hosted registries: mark every blob reachable from a manifest of
//! any repository (with `untagged`, only from tagged manifests, their children and their
//! referrers), then sweep the rest. Nothing younger than the grace period is removed, so
//! pushes running during a collection are safe: their blobs are new.
//!
//! With an object store, a collection is planned first (a dry run, listing the files it would
//! remove), those files' objects are deleted from the bucket, and then only the files whose
//! objects are gone are removed from the disk: nothing leaves the disk that stays in the bucket.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::store::Store;
use crate::oci::{Digest, RepoName};

/// What a collection removed (or, with `dry_run`, would remove).
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Blobs (and manifests' bytes) removed from disk.
    pub blobs: Vec<String>,
    /// Bytes they held.
    pub bytes: u64,
    /// Untagged manifests removed from their repositories, as `registry/repo@digest`.
    pub manifests: Vec<String>,
    /// Blobs kept only because they are younger than the grace period.
    pub kept_young: usize,
    /// Files kept because their object could not be deleted from the object store.
    #[serde(skip_serializing_if = "is_zero")]
    pub kept_in_store: usize,
    /// The files removed (or, with `dry_run`, to remove): manifest links, blobs, blob links.
    #[serde(skip)]
    pub(super) files: Vec<PathBuf>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn young(at: SystemTime, grace: Duration) -> bool {
    SystemTime::now()
        .duration_since(at)
        .is_ok_and(|age| age < grace)
        || at > SystemTime::now()
}

/// Collects; with `only`, removes no file but those (the ones whose objects the bucket no
/// longer holds).
pub(super) fn collect(
    store: &Store,
    grace: Duration,
    dry_run: bool,
    untagged: bool,
    only: Option<&HashSet<PathBuf>>,
) -> GcReport {
    let may = |p: &PathBuf| only.is_none_or(|o| o.contains(p));
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    let mut marked: HashSet<Digest> = HashSet::new();
    // Per repository, the blob links to drop once their blob is gone.
    let mut links: Vec<(String, RepoName, Vec<Digest>)> = Vec::new();
    for (registry, repo) in store.all_repositories() {
        let manifests: HashMap<Digest, SystemTime> =
            store.manifests(&registry, &repo).into_iter().collect();
        let keep = if untagged {
            live_manifests(store, &registry, &repo, &manifests, grace)
        } else {
            manifests.keys().cloned().collect()
        };
        for (d, at) in &manifests {
            if keep.contains(d) {
                continue;
            }
            report.manifests.push(format!("{registry}/{repo}@{d}"));
            let link = store.manifest_link(&registry, &repo, d);
            if !young(*at, grace) && may(&link) {
                if !dry_run {
                    let _ = store.unlink_manifest(&registry, &repo, d);
                }
                report.files.push(link);
            }
        }
        for d in &keep {
            marked.insert(d.clone());
            if let Ok(bytes) = store.read_blob(d) {
                marked.extend(crate::oci::referenced_digests(&bytes));
            }
        }
        let blob_links = store
            .blob_links(&registry, &repo)
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        links.push((registry, repo, blob_links));
    }
    let mut removed: HashSet<Digest> = HashSet::new();
    for (d, len, at) in store.all_blobs() {
        if marked.contains(&d) {
            continue;
        }
        if young(at, grace) {
            report.kept_young += 1;
            continue;
        }
        let path = store.blob_path(&d);
        if !may(&path) {
            report.kept_in_store += 1;
            continue;
        }
        if dry_run || store.remove_blob(&d).is_ok_and(|gone| gone) {
            report.bytes += len;
            report.blobs.push(d.to_string());
            report.files.push(path);
            removed.insert(d);
        }
    }
    // A blob that is gone must not reappear in these repositories if pushed again elsewhere.
    for (registry, repo, ds) in links {
        for d in ds.iter().filter(|d| removed.contains(*d)) {
            let link = store.blob_link(&registry, &repo, d);
            if may(&link) {
                if !dry_run {
                    let _ = store.unlink_blob(&registry, &repo, d);
                }
                report.files.push(link);
            }
        }
    }
    report.blobs.sort();
    report
}

/// The manifests of a repository that an untagged collection keeps: the tagged ones, what
/// indexes among them list, their referrers, and anything younger than the grace period.
fn live_manifests(
    store: &Store,
    registry: &str,
    repo: &RepoName,
    manifests: &HashMap<Digest, SystemTime>,
    grace: Duration,
) -> HashSet<Digest> {
    let mut keep: HashSet<Digest> = store
        .tags(registry, repo)
        .into_iter()
        .filter_map(|(_, d)| d)
        .collect();
    keep.extend(
        manifests
            .iter()
            .filter(|(_, at)| young(**at, grace))
            .map(|(d, _)| d.clone()),
    );
    // Children of kept indexes and referrers of kept manifests, to a fixed point (bounded by
    // the number of manifests).
    for _ in 0..=manifests.len() {
        let before = keep.len();
        for d in manifests.keys() {
            let Ok(bytes) = store.read_blob(d) else {
                continue;
            };
            let Ok(parts) = crate::oci::manifest_parts(&bytes) else {
                continue;
            };
            if keep.contains(d) {
                keep.extend(
                    parts
                        .manifests
                        .iter()
                        .filter(|m| manifests.contains_key(*m))
                        .cloned(),
                );
            } else if parts.subject.as_ref().is_some_and(|s| keep.contains(s)) {
                keep.insert(d.clone());
            }
        }
        if keep.len() == before {
            break;
        }
    }
    keep.retain(|d| manifests.contains_key(d));
    keep
}
