//! Building real images in memory and pushing them with the registry v2 API.
//!
//! Layers are genuine gzip'd tars that dockerd can extract. Both are written here by hand
//! (ustar headers; gzip with *stored* deflate blocks, i.e. no compression) to avoid extra
//! dev-dependencies; `gzip -t`, GNU tar, skopeo and dockerd accept them.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::Read;

use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode, Url};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::registry::Registry;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Timestamp in tar headers and image configs, so builds differ only by content.
const EPOCH: u64 = 1_700_000_000;

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `n` bytes from `/dev/urandom`: incompressible, and unique per call.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf
}

/// `n` bytes of a xorshift stream started from `seed`: incompressible enough for tests, and
/// the same for the same `(n, seed)`.
pub fn seeded_bytes(n: usize, seed: u8) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A ustar archive of regular files (mode 0644, owner root); parent directories get their
/// own entries (0755). Paths are relative (`berth/a.txt`) and shorter than 100 bytes.
pub fn tar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut dirs = BTreeSet::new();
    for (path, data) in files {
        let parts: Vec<&str> = path.split('/').collect();
        for i in 1..parts.len() {
            let dir = format!("{}/", parts[..i].join("/"));
            if dirs.insert(dir.clone()) {
                out.extend_from_slice(&tar_header(&dir, 0, b'5', 0o755));
            }
        }
        out.extend_from_slice(&tar_header(path, data.len() as u64, b'0', 0o644));
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0); // end of archive: two zero blocks
    out
}

fn tar_header(name: &str, size: u64, kind: u8, mode: u64) -> [u8; 512] {
    assert!(
        !name.is_empty() && name.len() < 100,
        "tar name must be 1..100 bytes: {name:?}"
    );
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], mode);
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], EPOCH);
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root"); // uname
    h[297..301].copy_from_slice(b"root"); // gname
    octal(&mut h[329..337], 0); // devmajor
    octal(&mut h[337..345], 0); // devminor
    // The checksum is computed with its own field as spaces, then stored as "%06o\0 ".
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Zero-padded octal digits and a NUL, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = format!("{value:0width$o}", width = field.len() - 1);
    assert_eq!(
        digits.len(),
        field.len() - 1,
        "{value} does not fit a tar field"
    );
    field[..digits.len()].copy_from_slice(digits.as_bytes());
    field[digits.len()] = 0;
}

/// gzip (RFC 1952) of `data` using stored (uncompressed) deflate blocks.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    // magic, CM=deflate, no flags, mtime 0, no extra flags, OS=unix
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    let mut blocks = data.chunks(usize::from(u16::MAX)).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]); // one final, empty block
    }
    while let Some(block) = blocks.next() {
        let last = blocks.peek().is_none();
        let len = u16::try_from(block.len()).expect("block fits u16");
        out.push(u8::from(last)); // BFINAL, BTYPE=00 (stored); byte-aligned
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes()); // ISIZE: length mod 2^32
    out
}

fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Manifest flavour of a built image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Docker image manifest v2 schema 2 (what Docker Hub mostly serves).
    Docker,
    /// OCI image manifest.
    Oci,
}

/// One layer: the gzip'd tar pushed as a blob, and what is in it.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Digest of the compressed blob (`bytes`).
    pub digest: String,
    pub size: u64,
    pub media_type: &'static str,
    /// The blob as pushed.
    pub bytes: Vec<u8>,
    /// Digest of the uncompressed tar (as listed in the config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// `(path in the image without leading '/', content)` of each file in the layer.
    pub files: Vec<(String, Vec<u8>)>,
}

/// A single-platform image, ready to push or already pushed.
#[derive(Debug, Clone)]
pub struct Image {
    /// Repository, e.g. `library/app`.
    pub name: String,
    pub tag: String,
    pub format: Format,
    pub os: String,
    pub architecture: String,
    pub media_type: &'static str,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<Layer>,
}

impl Image {
    /// `name:tag`
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }

    /// `name@sha256:…`
    pub fn by_digest(&self) -> String {
        format!("{}@{}", self.name, self.manifest_digest)
    }

    /// `(digest, bytes)` of every blob: the config, then the layers.
    pub fn blobs(&self) -> Vec<(&str, &[u8])> {
        std::iter::once((self.config_digest.as_str(), self.config.as_slice()))
            .chain(
                self.layers
                    .iter()
                    .map(|l| (l.digest.as_str(), l.bytes.as_slice())),
            )
            .collect()
    }

    /// Sum of the layer blob sizes (what a pull downloads besides manifest and config).
    pub fn layers_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// A multi-platform OCI image index and its images.
#[derive(Debug, Clone)]
pub struct Index {
    pub name: String,
    pub tag: String,
    pub media_type: &'static str,
    pub bytes: Vec<u8>,
    pub digest: String,
    /// In index order: linux/amd64, linux/arm64.
    pub images: Vec<Image>,
}

impl Index {
    /// `name:tag`
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }

    /// The image for `architecture` (`amd64`, `arm64`); panics if there is none.
    pub fn image(&self, architecture: &str) -> &Image {
        self.images
            .iter()
            .find(|i| i.architecture == architecture)
            .unwrap_or_else(|| panic!("index {} has no {architecture} image", self.name))
    }
}

/// Builds (does not push) an image whose layers hold the given files, one `Vec` per layer.
pub fn build_image(
    name: &str,
    tag: &str,
    format: Format,
    architecture: &str,
    layer_files: Vec<Vec<(String, Vec<u8>)>>,
) -> Image {
    let (manifest_type, config_type, layer_type) = match format {
        Format::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
        Format::Oci => (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
    };
    let layers: Vec<Layer> = layer_files
        .into_iter()
        .map(|files| {
            let tar = tar(&files);
            let bytes = gzip(&tar);
            Layer {
                digest: digest_of(&bytes),
                size: bytes.len() as u64,
                media_type: layer_type,
                bytes,
                diff_id: digest_of(&tar),
                files,
            }
        })
        .collect();
    let first_file = layers
        .iter()
        .flat_map(|l| &l.files)
        .next()
        .map_or_else(|| "/".to_owned(), |(path, _)| format!("/{path}"));
    let mut config = json!({
        "architecture": architecture,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["cat", first_file],
            "WorkingDir": "/",
            "Labels": { "org.berth.test.image": format!("{name}:{tag}") },
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.as_str()).collect::<Vec<_>>(),
        },
        "history": layers
            .iter()
            .enumerate()
            .map(|(i, _)| json!({
                "created": "2023-11-14T22:13:20Z",
                "created_by": format!("berth tests: layer {i}"),
            }))
            .collect::<Vec<_>>(),
    });
    if architecture == "arm64" {
        config["variant"] = json!("v8");
    }
    let config = serde_json::to_vec_pretty(&config).expect("serialize image config");
    let config_digest = digest_of(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": { "mediaType": config_type, "size": config.len(), "digest": config_digest },
        "layers": layers
            .iter()
            .map(|l| json!({ "mediaType": l.media_type, "size": l.size, "digest": l.digest }))
            .collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec_pretty(&manifest).expect("serialize manifest");
    Image {
        name: name.to_owned(),
        tag: tag.to_owned(),
        format,
        os: "linux".to_owned(),
        architecture: architecture.to_owned(),
        media_type: manifest_type,
        manifest_digest: digest_of(&manifest),
        manifest,
        config_digest,
        config,
        layers,
    }
}

/// Layers of one small text file each, unique to this call (random nonce).
fn small_layers(
    name: &str,
    tag: &str,
    architecture: &str,
    n: usize,
) -> Vec<Vec<(String, Vec<u8>)>> {
    let slug = name.replace('/', "_");
    let nonce = hex::encode(random_bytes(8));
    (0..n)
        .map(|i| {
            let path = format!("berth/{slug}-{tag}-{architecture}-layer{i}.txt");
            let body = format!("berth test layer {i} of {name}:{tag} ({architecture}) {nonce}\n");
            vec![(path, body.into_bytes())]
        })
        .collect()
}

/// Runs `fut` to completion on a fresh current-thread tokio runtime in a scoped thread, so it
/// works from plain `#[test]`s and from inside a tokio runtime alike. Panics propagate.
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build a tokio runtime")
                .block_on(fut)
        });
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Pushes a linux/amd64 Docker (schema 2) image with `layers` small layers as `name:tag`.
pub fn seed_image(registry: &Registry, name: &str, tag: &str, layers: usize) -> Image {
    seed_image_with(registry, name, tag, Format::Docker, "amd64", layers)
}

/// Like [`seed_image`] with a chosen manifest format and architecture.
pub fn seed_image_with(
    registry: &Registry,
    name: &str,
    tag: &str,
    format: Format,
    architecture: &str,
    layers: usize,
) -> Image {
    let image = build_image(
        name,
        tag,
        format,
        architecture,
        small_layers(name, tag, architecture, layers),
    );
    let pusher = Pusher::for_registry(registry);
    block_on(pusher.push_image(&image, tag));
    image
}

/// Pushes a linux/amd64 Docker image whose layers are one file of random (incompressible)
/// bytes each, of the given sizes; blob sizes are a little larger (tar and gzip framing).
pub fn seed_blob_image(registry: &Registry, name: &str, tag: &str, layer_sizes: &[usize]) -> Image {
    let slug = name.replace('/', "_");
    let layers = layer_sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            vec![(
                format!("berth/{slug}-{tag}-blob{i}.bin"),
                random_bytes(size),
            )]
        })
        .collect();
    let image = build_image(name, tag, Format::Docker, "amd64", layers);
    block_on(Pusher::for_registry(registry).push_image(&image, tag));
    image
}

/// Pushes an OCI image index `name:tag` over two OCI images, linux/amd64 and linux/arm64
/// (v8), of two small layers each. The images are pushed by digest only (no tag of their own).
pub fn seed_index(registry: &Registry, name: &str, tag: &str) -> Index {
    let images: Vec<Image> = ["amd64", "arm64"]
        .into_iter()
        .map(|arch| {
            build_image(
                name,
                tag,
                Format::Oci,
                arch,
                small_layers(name, tag, arch, 2),
            )
        })
        .collect();
    let manifests: Vec<_> = images
        .iter()
        .map(|img| {
            let mut platform = json!({ "architecture": img.architecture, "os": img.os });
            if img.architecture == "arm64" {
                platform["variant"] = json!("v8");
            }
            json!({
                "mediaType": img.media_type,
                "size": img.manifest.len(),
                "digest": img.manifest_digest,
                "platform": platform,
            })
        })
        .collect();
    let bytes = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .expect("serialize index");
    let index = Index {
        name: name.to_owned(),
        tag: tag.to_owned(),
        media_type: OCI_INDEX,
        digest: digest_of(&bytes),
        bytes,
        images,
    };
    let pusher = Pusher::for_registry(registry);
    block_on(async {
        for img in &index.images {
            pusher.push_image(img, &img.manifest_digest).await;
        }
        pusher
            .push_manifest(name, tag, OCI_INDEX, &index.bytes)
            .await;
    });
    index
}

/// Pushes blobs and manifests with the registry v2 API (async; see [`block_on`]).
#[derive(Debug, Clone)]
pub struct Pusher {
    client: reqwest::Client,
    base: Url,
    credentials: Option<(String, String)>,
}

impl Pusher {
    /// `base_url` like `http://127.0.0.1:5000`; `credentials` for HTTP basic auth.
    pub fn new(base_url: &str, credentials: Option<(&str, &str)>) -> Pusher {
        Pusher {
            client: reqwest::Client::builder()
                .user_agent("berth-tests/seed")
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .expect("build reqwest client"),
            base: Url::parse(base_url).expect("registry base URL"),
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
        }
    }

    pub fn for_registry(registry: &Registry) -> Pusher {
        Pusher::new(&registry.url(), registry.credentials())
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        match &self.credentials {
            Some((user, password)) => req.basic_auth(user, Some(password)),
            None => req,
        }
    }

    /// Uploads `data` into `repo` (POST an upload, then PUT it with `?digest=`).
    /// Returns the digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = digest_of(data);
        let start = self
            .base
            .join(&format!("/v2/{repo}/blobs/uploads/"))
            .expect("upload URL");
        let resp = self
            .request(Method::POST, start.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {start}: {e}"));
        let resp = expect_status(resp, StatusCode::ACCEPTED, "start blob upload").await;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .expect("upload response has a Location")
            .to_owned();
        // Location may be absolute or relative, and usually carries a `_state` query already.
        let mut put = self.base.join(&location).expect("upload Location URL");
        put.query_pairs_mut().append_pair("digest", &digest);
        let resp = self
            .request(Method::PUT, put.clone())
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {put}: {e}"));
        expect_status(
            resp,
            StatusCode::CREATED,
            &format!("finish upload of {digest}"),
        )
        .await;
        digest
    }

    /// PUTs a manifest or index as `repo:reference` (a tag or its digest). Returns the digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let digest = digest_of(bytes);
        let url = self
            .base
            .join(&format!("/v2/{repo}/manifests/{reference}"))
            .expect("manifest URL");
        let resp = self
            .request(Method::PUT, url.clone())
            .header(CONTENT_TYPE, media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
        let resp = expect_status(resp, StatusCode::CREATED, &format!("push manifest {url}")).await;
        let echoed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok());
        assert_eq!(echoed, Some(digest.as_str()), "registry's digest of {url}");
        digest
    }

    /// Pushes the image's blobs, then its manifest as `image.name:reference`.
    pub async fn push_image(&self, image: &Image, reference: &str) {
        for (digest, bytes) in image.blobs() {
            let pushed = self.push_blob(&image.name, bytes).await;
            assert_eq!(pushed, digest);
        }
        self.push_manifest(&image.name, reference, image.media_type, &image.manifest)
            .await;
    }
}

async fn expect_status(resp: reqwest::Response, want: StatusCode, what: &str) -> reqwest::Response {
    if resp.status() == want {
        return resp;
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    panic!("{what}: expected {want}, got {status}: {body}");
}
