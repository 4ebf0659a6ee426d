//! Pinned images: never evicted. An image's pin covers its manifest, for an index the children
//! for `[cache] platforms`, and every blob they reference. Pins come from `[cache] pin` (fixed
//! while berth runs) and from `berth pin` (kept in `<cache.dir>/pins.json`, so they survive a
//! restart). [`Pins::refresh`] resolves them against the manifest store into the blob store's
//! pin set; the server calls it when pins change and every few seconds, so children and blobs
//! that arrive later (a warm, a pull) are pinned as they come.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{BlobStore, ManifestStore};
use crate::oci::{Digest, ImageRef, Platform, Reference, index_children, referenced_digests};

pub struct Pins {
    path: PathBuf,
    configured: Vec<ImageRef>,
    /// Pinned at run time, in the order pinned.
    added: Mutex<Vec<ImageRef>>,
    platforms: Vec<Platform>,
}

/// One pinned image, as the admin API lists it.
#[derive(Debug, Serialize)]
pub struct Pinned {
    pub image: String,
    /// From `[cache] pin` (only the config file can unpin it).
    pub configured: bool,
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    images: Vec<String>,
}

impl Pins {
    /// Reads `<dir>/pins.json` beside the configured pins (already validated by the config).
    pub fn open(dir: &Path, configured: &[String], platforms: &[String]) -> io::Result<Pins> {
        let path = dir.join("pins.json");
        let parse = |s: &String| s.parse::<ImageRef>().map_err(io::Error::other);
        let configured = configured
            .iter()
            .map(parse)
            .collect::<io::Result<Vec<_>>>()?;
        let platforms = platforms
            .iter()
            .map(|p| Platform::parse(p).map_err(io::Error::other))
            .collect::<io::Result<Vec<_>>>()?;
        let added = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: File = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::other(format!("{}: not a pin list: {e}", path.display()))
                })?;
                f.images.iter().map(parse).collect::<io::Result<Vec<_>>>()?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Pins {
            path,
            configured,
            added: Mutex::new(added),
            platforms,
        })
    }

    /// Every pinned image: the configured ones first.
    pub fn list(&self) -> Vec<Pinned> {
        let configured = self.configured.iter().map(|i| Pinned {
            image: i.to_string(),
            configured: true,
        });
        let added: Vec<Pinned> = self
            .added
            .lock()
            .iter()
            .filter(|i| !self.configured.contains(i))
            .map(|i| Pinned {
                image: i.to_string(),
                configured: false,
            })
            .collect();
        configured.chain(added).collect()
    }

    pub fn images(&self) -> Vec<ImageRef> {
        let mut all = self.configured.clone();
        for i in self.added.lock().iter() {
            if !all.contains(i) {
                all.push(i.clone());
            }
        }
        all
    }

    /// Whether a cached tag or manifest is pinned by name.
    pub fn names(&self, registry: &str, repository: &str, reference: &str) -> bool {
        self.images().iter().any(|i| {
            i.registry == registry
                && i.repository.as_str() == repository
                && i.reference.to_string() == reference
        })
    }

    /// Pins images (those pinned already stay as they are). Saved before it returns. Blocking.
    pub fn pin(&self, images: &[ImageRef]) -> io::Result<()> {
        let mut added = self.added.lock();
        let mut next = added.clone();
        for i in images {
            if !next.contains(i) && !self.configured.contains(i) {
                next.push(i.clone());
            }
        }
        self.save(&next)?;
        *added = next;
        Ok(())
    }

    /// Unpins images. Err names an image `[cache] pin` configures (nothing changes then).
    /// Returns the images that were pinned and no longer are. Blocking.
    pub fn unpin(&self, images: &[ImageRef]) -> Result<Vec<ImageRef>, UnpinError> {
        if let Some(i) = images.iter().find(|i| self.configured.contains(i)) {
            return Err(UnpinError::Configured(i.to_string()));
        }
        let mut added = self.added.lock();
        let (gone, next): (Vec<ImageRef>, Vec<ImageRef>) =
            added.iter().cloned().partition(|i| images.contains(i));
        self.save(&next).map_err(UnpinError::Io)?;
        *added = next;
        Ok(gone)
    }

    fn save(&self, images: &[ImageRef]) -> io::Result<()> {
        let file = File {
            images: images.iter().map(ImageRef::to_string).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The digests the pins cover as far as the manifest store knows them: manifests,
    /// children for the platforms, and every referenced blob. Blocking.
    pub fn resolve(&self, manifests: &ManifestStore) -> HashSet<Digest> {
        let mut out = HashSet::new();
        for image in self.images() {
            let registry: Arc<str> = image.registry.as_str().into();
            let repo = &image.repository;
            let root = match &image.reference {
                Reference::Digest(d) => Some(d.clone()),
                Reference::Tag(t) => manifests
                    .tags_of(&image.registry, repo)
                    .into_iter()
                    .find(|(tag, _)| tag == t)
                    .map(|(_, rec)| rec.digest),
            };
            let Some(root) = root else { continue };
            out.insert(root.clone());
            let Some(m) = manifests.get(&registry, repo, &root) else {
                continue;
            };
            let children = index_children(&m.bytes, &self.platforms, false);
            if children.is_empty() {
                out.extend(referenced_digests(&m.bytes));
                continue;
            }
            for child in children {
                out.insert(child.clone());
                if let Some(c) = manifests.get(&registry, repo, &child) {
                    out.extend(referenced_digests(&c.bytes));
                }
            }
        }
        out
    }

    /// Makes the blob store pin what the pins cover now. Blocking.
    pub fn refresh(&self, manifests: &ManifestStore, blobs: &BlobStore) {
        blobs.set_pinned(self.resolve(manifests));
    }

    pub fn platforms(&self) -> &[Platform] {
        &self.platforms
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpinError {
    #[error("{0} is pinned by [cache] pin in the config file; remove it there")]
    Configured(String),
    #[error("cannot save the pins: {0}")]
    Io(io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_survive_a_reopen_and_configured_pins_stay() {
        let dir = tempfile::tempdir().unwrap();
        let conf = vec!["registry.k8s.io/pause:3.10".to_owned()];
        let plat = vec!["linux/amd64".to_owned()];
        let p = Pins::open(dir.path(), &conf, &plat).unwrap();
        let alpine: ImageRef = "alpine:3.20".parse().unwrap();
        let pause: ImageRef = "registry.k8s.io/pause:3.10".parse().unwrap();
        p.pin(std::slice::from_ref(&alpine)).unwrap();
        p.pin(std::slice::from_ref(&alpine)).unwrap();
        let again = Pins::open(dir.path(), &conf, &plat).unwrap();
        assert_eq!(again.images(), vec![pause.clone(), alpine.clone()]);
        assert!(again.names("docker.io", "library/alpine", "3.20"));
        assert!(!again.names("docker.io", "library/alpine", "3.19"));
        assert!(matches!(
            again.unpin(std::slice::from_ref(&pause)),
            Err(UnpinError::Configured(_))
        ));
        assert_eq!(
            again.unpin(std::slice::from_ref(&alpine)).unwrap(),
            vec![alpine]
        );
        let third = Pins::open(dir.path(), &conf, &plat).unwrap();
        assert_eq!(third.images(), vec![pause]);
    }
}
