//! Just enough of the manifest formats to route and to check repository membership: the media
//! type, and the digests a manifest or index references. Manifests are never re-serialized.

use serde::Deserialize;

use super::Digest;

pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The manifest media types berth asks upstream for when a client names none.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST_V2,
];

/// Docker's schema-1 manifest, unsigned and signed: berth recognises these in an Accept header
/// but does not serve them (a signed one's digest is not the hash of its bytes).
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Every manifest media type berth recognises in an Accept header: those it serves, then
/// schema 1.
pub const KNOWN_MANIFEST_MEDIA_TYPES: [&str; 6] = [
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST_V2,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
];

#[derive(Deserialize)]
struct Descriptor {
    digest: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
    subject: Option<Descriptor>,
    #[serde(default)]
    fs_layers: Vec<FsLayer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FsLayer {
    blob_sum: Option<String>,
}

/// The media type a manifest declares, or the one its shape implies (an OCI manifest may omit
/// `mediaType`). None when the bytes are not a JSON manifest.
pub fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    let m: AnyManifest = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = m.media_type {
        return Some(mt);
    }
    if !m.manifests.is_empty() {
        Some(OCI_INDEX.to_owned())
    } else if m.config.is_some() {
        Some(OCI_MANIFEST.to_owned())
    } else {
        None
    }
}

/// Every digest a manifest references: config, layers, child manifests, blobs, subject and
/// schema-1 fsLayers. Invalid digests are skipped (they can never be requested anyway).
pub fn referenced_digests(bytes: &[u8]) -> Vec<Digest> {
    let Ok(m) = serde_json::from_slice::<AnyManifest>(bytes) else {
        return Vec::new();
    };
    let descriptors = m
        .config
        .into_iter()
        .chain(m.layers)
        .chain(m.manifests)
        .chain(m.blobs)
        .chain(m.subject)
        .filter_map(|d| d.digest);
    let fs_layers = m.fs_layers.into_iter().filter_map(|l| l.blob_sum);
    let mut out: Vec<Digest> = descriptors
        .chain(fs_layers)
        .filter_map(|d| d.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What a pushed manifest refers to, as a hosted registry checks it.
#[derive(Debug, Default)]
pub struct Parts {
    /// The `mediaType` the manifest declares.
    pub media_type: Option<String>,
    /// `artifactType`, or else the config's media type (what the referrers API reports).
    pub artifact_type: Option<String>,
    /// Blobs that must be in the repository: config and layers (those with `urls`, foreign
    /// layers, are fetched elsewhere and not checked).
    pub blobs: Vec<Digest>,
    /// The size each descriptor of `blobs` declares, in the same order (0 when it is not a
    /// count).
    pub blob_sizes: Vec<u64>,
    /// Manifests an index lists, which must be in the repository.
    pub manifests: Vec<Digest>,
    pub subject: Option<Digest>,
    pub annotations: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct FullDescriptor {
    digest: String,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    urls: Vec<String>,
    /// Any JSON: a size that is not a count is taken as unknown (0), not as a bad manifest.
    size: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PushedManifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<FullDescriptor>,
    #[serde(default)]
    layers: Vec<FullDescriptor>,
    #[serde(default)]
    manifests: Vec<FullDescriptor>,
    #[serde(default)]
    blobs: Vec<FullDescriptor>,
    subject: Option<FullDescriptor>,
    annotations: Option<serde_json::Value>,
}

/// Reads a pushed manifest: Err with the reason when it is not a manifest berth can store
/// (not JSON, no schemaVersion 2, or a descriptor whose digest does not parse).
pub fn parts(bytes: &[u8]) -> Result<Parts, String> {
    let m: PushedManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
    if m.schema_version != Some(2) {
        return Err("schemaVersion must be 2".into());
    }
    let digest = |d: &FullDescriptor| {
        d.digest.parse::<Digest>().map_err(|_| {
            format!(
                "invalid digest {:?}",
                d.digest.chars().take(100).collect::<String>()
            )
        })
    };
    let mut out = Parts {
        artifact_type: m
            .artifact_type
            .clone()
            .or_else(|| m.config.as_ref().and_then(|c| c.media_type.clone())),
        media_type: m.media_type,
        annotations: m.annotations,
        ..Parts::default()
    };
    for d in m.config.iter().chain(&m.layers).chain(&m.blobs) {
        let dg = digest(d)?;
        if d.urls.is_empty() {
            out.blobs.push(dg);
            let size = d.size.as_ref().and_then(serde_json::Value::as_u64);
            out.blob_sizes.push(size.unwrap_or(0));
        }
    }
    for d in &m.manifests {
        out.manifests.push(digest(d)?);
    }
    out.subject = m.subject.as_ref().map(digest).transpose()?;
    Ok(out)
}

/// Whether a client's `Accept` header admits a manifest of `media_type`. No header, `*/*` and
/// `application/*` admit everything.
pub fn accepts_media_type(accept: &[&str], media_type: &str) -> bool {
    if accept.is_empty() {
        return true;
    }
    accept.iter().flat_map(|v| v.split(',')).any(|item| {
        let mt = item.split(';').next().unwrap_or("").trim();
        mt == media_type || mt == "*/*" || mt == "application/*" || mt.is_empty()
    })
}

/// Which of [`KNOWN_MANIFEST_MEDIA_TYPES`] a client's `Accept` header names, as a bit set (bit
/// `i` for the `i`-th type). 0 when it names none: no header, only wildcards, `text/html`,
/// garbage — no manifest preference, so berth treats it as accepting every manifest type.
pub fn named_manifest_types(accept: &[&str]) -> u8 {
    accept
        .iter()
        .flat_map(|v| v.split(','))
        .filter_map(|item| {
            let mt = item.split(';').next().unwrap_or("").trim();
            KNOWN_MANIFEST_MEDIA_TYPES.iter().position(|k| *k == mt)
        })
        .fold(0, |set, i| set | (1 << i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn walks_manifest_and_index() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_V2}","config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}},{{"digest":"{}"}},{{"digest":"bogus"}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let got: Vec<String> = referenced_digests(m.as_bytes())
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(got, vec![d('a'), d('b'), d('c')]);
        assert_eq!(
            manifest_media_type(m.as_bytes()).as_deref(),
            Some(DOCKER_MANIFEST_V2)
        );

        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}","platform":{{"os":"linux"}}}}]}}"#,
            d('e')
        );
        assert_eq!(referenced_digests(i.as_bytes()).len(), 1);
        assert_eq!(
            manifest_media_type(i.as_bytes()).as_deref(),
            Some(OCI_INDEX)
        );
        assert!(referenced_digests(b"not json").is_empty());
        assert!(referenced_digests(b"[1,2]").is_empty());
        assert_eq!(manifest_media_type(b"{}"), None);
    }

    #[test]
    fn parts_keep_blob_sizes() {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":2}},"layers":[{{"digest":"{}","size":40}},{{"digest":"{}","size":7,"urls":["https://x"]}},{{"digest":"{}","size":"big"}}]}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let p = parts(m.as_bytes()).unwrap();
        assert_eq!(p.blobs.len(), 3);
        assert_eq!(p.blob_sizes, [2, 40, 0]);
    }

    #[test]
    fn accept_matching() {
        assert!(accepts_media_type(&[], OCI_INDEX));
        assert!(accepts_media_type(&["*/*"], OCI_INDEX));
        assert!(accepts_media_type(
            &[&format!("{DOCKER_MANIFEST_V2}, {OCI_INDEX};q=0.5")],
            OCI_INDEX
        ));
        assert!(!accepts_media_type(&[DOCKER_MANIFEST_V2], OCI_INDEX));
        assert!(accepts_media_type(
            &[DOCKER_MANIFEST_V2, OCI_INDEX],
            OCI_INDEX
        ));
    }

    #[test]
    fn named_types() {
        for none in [
            &[][..],
            &["*/*"],
            &["text/html"],
            &["x"],
            &["*/*;q=0.1"],
            &["text/html,application/xhtml+xml,*/*;q=0.8"],
        ] {
            assert_eq!(named_manifest_types(none), 0, "{none:?}");
        }
        assert_eq!(named_manifest_types(&[OCI_INDEX]), 1);
        assert_eq!(named_manifest_types(&[DOCKER_SCHEMA1_SIGNED]), 1 << 5);
        assert_eq!(
            named_manifest_types(&[&format!("x, {OCI_MANIFEST};q=0.9"), DOCKER_MANIFEST_V2]),
            (1 << 2) | (1 << 3)
        );
        assert_eq!(
            named_manifest_types(&[&KNOWN_MANIFEST_MEDIA_TYPES.join(",")]),
            0b11_1111
        );
    }
}
