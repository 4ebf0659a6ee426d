//! The cache: content-addressed blobs on disk with an LRU index and single-flight fills, and
//! manifests and tags per registry and repository, optionally backed by a shared object store
//! (`shared`) that several replicas use. The cache never calls upstream: fills are given a byte
//! source by the mirror.

mod blobs;
mod fill;
mod gcs;
pub mod inventory;
mod manifests;
pub mod pins;
mod pulls;
mod shared;
mod stores;

pub use blobs::{BlobStore, CachedBlob, Eviction};
pub use fill::{Fill, FillReader, Piece, Source};
pub use manifests::{Manifest, ManifestStore, TagRecord};
pub use pins::Pins;
pub use pulls::{PullStat, Pulls};
pub use shared::{Lookup, SharedStore};

use std::path::Path;
use std::time::SystemTime;

/// Seconds since the epoch, now.
pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

/// Seconds since the epoch of `t` (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Creates `dir` and checks that a file can be written there (for /readyz and start-up).
pub fn check_writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".berth-write-check");
    std::fs::write(&probe, b"ok")?;
    std::fs::remove_file(&probe)
}
