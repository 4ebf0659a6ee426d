//! Pull counts and last-pulled times per image — registry, repository and the tag or digest a
//! client asked for — for `berth cache ls`, `berth cache prune --not-pulled-for` and the status
//! page's top repositories. Counted in memory on every manifest GET; saved to
//! `<cache.dir>/pulls.json` (temp file, fsync, rename) by [`Pulls::save`], which the server
//! calls every few seconds when something changed and at shutdown — so the disk sees at most
//! one write per period, never one per request — and loaded at start.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::unix_now;
use crate::oci::RepoName;

/// How many images are counted (a bound on memory and on the file's size).
const MAX_COUNTED: usize = 100_000;

/// One image's pulls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullStat {
    pub count: u64,
    /// Seconds since the epoch.
    pub last: u64,
}

/// Per registry, repository and tag or digest: one level each, so that counting a pull looks
/// every part up by reference, without allocating a key.
type Map = HashMap<Arc<str>, HashMap<RepoName, HashMap<String, PullStat>>>;

pub struct Pulls {
    path: PathBuf,
    map: RwLock<Map>,
    /// How many images `map` counts (bounded by [`MAX_COUNTED`]).
    counted: AtomicUsize,
    dirty: AtomicBool,
    /// Held while saving, so two saves never interleave their temp files.
    saving: Mutex<()>,
}

#[derive(Serialize, Deserialize)]
struct Record {
    registry: String,
    repository: String,
    reference: String,
    count: u64,
    last: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    pulls: Vec<Record>,
}

impl Pulls {
    /// Loads `<dir>/pulls.json`; a missing or unreadable file starts the counts afresh (with a
    /// warning for an unreadable one: counts are statistics, never a reason not to start).
    pub fn open(dir: &Path) -> Pulls {
        let path = dir.join("pulls.json");
        let mut map = Map::new();
        let mut counted = 0;
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Ok(f) => {
                    for r in f.pulls.into_iter().take(MAX_COUNTED) {
                        let Ok(repo) = r.repository.parse::<RepoName>() else {
                            continue;
                        };
                        let stat = PullStat {
                            count: r.count,
                            last: r.last,
                        };
                        let refs = map
                            .entry(r.registry.as_str().into())
                            .or_default()
                            .entry(repo)
                            .or_default();
                        if refs.insert(r.reference, stat).is_none() {
                            counted += 1;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the pull counts; counting afresh")
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the pull counts; counting afresh")
            }
        }
        Pulls {
            path,
            map: RwLock::new(map),
            counted: counted.into(),
            dirty: AtomicBool::new(false),
            saving: Mutex::new(()),
        }
    }

    /// Counts one pull of `reference` (a tag or a digest) of the repository. Allocates only
    /// for an image not counted before.
    pub fn record(&self, registry: &Arc<str>, repo: &RepoName, reference: &str) {
        let now = unix_now();
        let mut map = self.map.write();
        let full = self.counted.load(Ordering::Relaxed) >= MAX_COUNTED;
        let repos = match map.get_mut(registry) {
            Some(repos) => repos,
            None if full => return,
            None => map.entry(registry.clone()).or_default(),
        };
        let refs = match repos.get_mut(repo) {
            Some(refs) => refs,
            None if full => return,
            None => repos.entry(repo.clone()).or_default(),
        };
        match refs.get_mut(reference) {
            Some(s) => {
                s.count += 1;
                s.last = now;
            }
            None if full => return,
            None => {
                refs.insert(
                    reference.to_owned(),
                    PullStat {
                        count: 1,
                        last: now,
                    },
                );
                self.counted.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub fn get(&self, registry: &str, repo: &RepoName, reference: &str) -> Option<PullStat> {
        self.map
            .read()
            .get(registry)
            .and_then(|repos| repos.get(repo))
            .and_then(|refs| refs.get(reference))
            .copied()
    }

    /// Forgets an image's counts (it was purged).
    pub fn forget(&self, registry: &str, repo: &RepoName, reference: &str) {
        let mut map = self.map.write();
        let Some(repos) = map.get_mut(registry) else {
            return;
        };
        let Some(refs) = repos.get_mut(repo) else {
            return;
        };
        if refs.remove(reference).is_some() {
            self.counted.fetch_sub(1, Ordering::Relaxed);
            self.dirty.store(true, Ordering::Relaxed);
        }
        if refs.is_empty() {
            repos.remove(repo);
        }
    }

    /// Calls `f` with every repository's counts, by tag or digest.
    fn each_repo(&self, mut f: impl FnMut(&Arc<str>, &RepoName, &HashMap<String, PullStat>)) {
        for (reg, repos) in self.map.read().iter() {
            for (repo, refs) in repos {
                f(reg, repo, refs);
            }
        }
    }

    /// The `n` repositories with the most pulls, most first (ties by name), with their counts.
    pub fn top_repositories(&self, n: usize) -> Vec<(Arc<str>, RepoName, u64)> {
        let mut all: Vec<(Arc<str>, RepoName, u64)> = Vec::new();
        self.each_repo(|reg, repo, refs| {
            all.push((
                reg.clone(),
                repo.clone(),
                refs.values().map(|s| s.count).sum(),
            ));
        });
        all.sort_by(|a, b| {
            b.2.cmp(&a.2)
                .then_with(|| a.0.cmp(&b.0))
                .then_with(|| a.1.as_str().cmp(b.1.as_str()))
        });
        all.truncate(n);
        all
    }

    /// Writes the counts if they changed since the last save. Blocking.
    pub fn save(&self) -> io::Result<()> {
        let _one = self.saving.lock();
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let mut file = File::default();
        self.each_repo(|reg, repo, refs| {
            for (reference, st) in refs {
                file.pulls.push(Record {
                    registry: reg.to_string(),
                    repository: repo.as_str().to_owned(),
                    reference: reference.clone(),
                    count: st.count,
                    last: st.last,
                });
            }
        });
        let write = || -> io::Result<()> {
            let bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
            let tmp = self.path.with_extension("json.tmp");
            {
                let mut f = std::fs::File::create(&tmp)?;
                io::Write::write_all(&mut f, &bytes)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &self.path)
        };
        write().inspect_err(|_| self.dirty.store(true, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_save_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = Pulls::open(dir.path());
        let reg: Arc<str> = "docker.io".into();
        let repo: RepoName = "library/alpine".parse().unwrap();
        p.record(&reg, &repo, "3.20");
        p.record(&reg, &repo, "3.20");
        p.record(&reg, &repo, "latest");
        p.save().unwrap();
        let again = Pulls::open(dir.path());
        let s = again.get("docker.io", &repo, "3.20").unwrap();
        assert_eq!(s.count, 2);
        assert!(s.last >= unix_now() - 5);
        assert_eq!(again.get("docker.io", &repo, "latest").unwrap().count, 1);
        assert_eq!(
            again.top_repositories(5),
            vec![(reg.clone(), repo.clone(), 3)]
        );
        again.forget("docker.io", &repo, "latest");
        assert!(again.get("docker.io", &repo, "latest").is_none());
        // Nothing changed since: no write (the file stays as it was).
        let before = std::fs::metadata(dir.path().join("pulls.json")).unwrap();
        p.save().unwrap();
        let after = std::fs::metadata(dir.path().join("pulls.json")).unwrap();
        assert_eq!(before.modified().unwrap(), after.modified().unwrap());
    }

    #[test]
    fn a_damaged_file_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pulls.json"), b"{not json").unwrap();
        let p = Pulls::open(dir.path());
        assert!(p.top_repositories(5).is_empty());
    }
}
