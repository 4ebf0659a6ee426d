//! OCI distribution types that validate on parse: once a value of these types exists, it is
//! safe to use in a file path or an upstream URL.

mod digest;
mod image;
mod manifest;
mod name;
mod platform;
mod range;

pub use digest::{Digest, DigestAlgorithm, Hasher};
pub use image::ImageRef;
pub use manifest::{
    MANIFEST_MEDIA_TYPES, OCI_INDEX, Parts as ManifestParts, accepts_media_type,
    manifest_media_type, named_manifest_types, parts as manifest_parts, referenced_digests,
};
pub use name::{Reference, RepoName, Tag};
pub use platform::{Platform, index_children};
pub use range::{ByteRange, RangeError, parse_range};
