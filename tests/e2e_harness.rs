//! Proves tests/support with the real programs, without berth: the registry, seeding, and a
//! dockerd that uses the registry itself as its docker.io mirror.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn access_log_lines_parse() {
    let line = r#"127.0.0.1 - - [23/Nov/2026:17:07:16 +0000] "HEAD /v2/library/x/manifests/v1?a=b HTTP/1.1" 404 92 "" "docker/20.10.24 UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))""#;
    let e = AccessEntry::parse(line).expect("parses");
    assert_eq!(e.method, "HEAD");
    assert_eq!(e.path, "/v2/library/x/manifests/v1");
    assert_eq!(e.uri, "/v2/library/x/manifests/v1?a=b");
    assert_eq!((e.status, e.bytes), (404, 92));
    assert!(e.user_agent.starts_with("docker/20.10.24 "), "{e:?}");

    let line =
        r#"127.0.0.1 - - [23/Nov/2026:17:07:16 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1""#;
    let e = AccessEntry::parse(line).expect("parses");
    assert_eq!(e.user_agent, "curl/7.88.1");

    assert!(AccessEntry::parse(r#"time="x" level=info msg="listening on 127.0.0.1:1""#).is_none());
}

/// The hand-written tar and gzip are read back by GNU gzip and tar, byte for byte,
/// including a file spanning several stored deflate blocks and an empty file.
#[test]
fn tar_gz_layers_extract_with_gnu_tar() {
    let files = vec![
        ("berth/a.txt".to_owned(), b"hello\n".to_vec()),
        ("berth/deep/dir/big.bin".to_owned(), random_bytes(200_000)),
        ("berth/empty".to_owned(), Vec::new()),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("layer.tar.gz");
    std::fs::write(&archive, gzip(&tar(&files))).expect("write layer");
    let gzip_t = run(
        Command::new(require_program("gzip"))
            .arg("-t")
            .arg(&archive),
        Duration::from_secs(30),
    );
    gzip_t.and_then(CmdOutput::into_result).expect("gzip -t");
    let untar = run(
        Command::new(require_program("tar"))
            .arg("-xzf")
            .arg(&archive)
            .arg("-C")
            .arg(dir.path()),
        Duration::from_secs(30),
    );
    untar.and_then(CmdOutput::into_result).expect("tar -xzf");
    for (path, content) in &files {
        let got = std::fs::read(dir.path().join(path)).expect("extracted file");
        assert!(got == *content, "{path} differs after extraction");
    }
    assert_eq!(
        gzip(&[]).len(),
        10 + 5 + 8,
        "empty gzip: header, one empty block, trailer"
    );
}

/// Seeded images and the index are valid for an independent client (skopeo), which also
/// verifies every blob digest while copying.
#[test]
fn seeded_images_are_valid_for_skopeo() {
    let registry = Registry::start();
    let image = seed_image(&registry, "library/app", "v1", 3);
    let index = seed_index(&registry, "library/multi", "v1");
    let host = registry.host();

    let inspect = json(
        &skopeo(&[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{host}/library/app:v1"),
        ])
        .expect("skopeo inspect app"),
    );
    assert_eq!(inspect["Digest"], image.manifest_digest.as_str());
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    let layers: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(inspect["Layers"], serde_json::json!(layers));

    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{host}/library/multi:v1"),
    ])
    .expect("skopeo inspect --raw multi");
    assert_eq!(
        raw.as_bytes(),
        index.bytes.as_slice(),
        "index bytes as pushed"
    );
    for arch in ["amd64", "arm64"] {
        let inspect = json(
            &skopeo(&[
                "inspect",
                "--tls-verify=false",
                "--override-arch",
                arch,
                &format!("docker://{host}/library/multi:v1"),
            ])
            .expect("skopeo inspect multi for an arch"),
        );
        // skopeo 1.9 reports the index's digest, and the chosen image's layers.
        assert_eq!(inspect["Architecture"], arch);
        assert_eq!(inspect["Digest"], index.digest.as_str());
        let layers: Vec<&str> = index
            .image(arch)
            .layers
            .iter()
            .map(|l| l.digest.as_str())
            .collect();
        assert_eq!(inspect["Layers"], serde_json::json!(layers));
    }

    let out = tempfile::tempdir().expect("tempdir");
    skopeo(&[
        "copy",
        "--insecure-policy",
        "--src-tls-verify=false",
        &format!("docker://{host}/library/app:v1"),
        &format!("dir:{}", out.path().display()),
    ])
    .expect("skopeo copy verifies digests");
    for layer in &image.layers {
        let hex = layer.digest.trim_start_matches("sha256:");
        let copied = std::fs::read(out.path().join(hex)).expect("copied layer");
        assert!(copied == layer.bytes, "layer {} differs", layer.digest);
    }
}

/// The main proof: dockerd pulls (and extracts) seeded images through `--registry-mirror`
/// pointing at a plain registry on 127.0.0.1, and the access log counts its requests.
#[test]
fn dockerd_pulls_through_a_loopback_mirror() {
    let t = Instant::now();
    let registry = Registry::start();
    eprintln!("registry ready in {:?}", t.elapsed());
    let t = Instant::now();
    let image = seed_image(&registry, "library/app", "v1", 3);
    let index = seed_index(&registry, "library/multi", "v1");
    eprintln!("seeded in {:?}", t.elapsed());
    let t = Instant::now();
    let docker = Dockerd::start(&registry.url());
    eprintln!("dockerd ready in {:?}", t.elapsed());
    let info = json(
        &docker
            .docker(&["info", "--format", "{{json .}}"])
            .expect("docker info"),
    );
    assert_eq!(info["Driver"], "vfs");
    eprintln!(
        "dockerd mirrors {} insecure {}",
        info["RegistryConfig"]["Mirrors"], info["RegistryConfig"]["InsecureRegistryCIDRs"]
    );

    pull_is_counted_and_extracted(&registry, &docker, &image);
    index_pulls_one_platform_at_a_time(&registry, &docker, &index);

    // rmi removes the layers: pulling again downloads every blob again.
    docker.rmi("library/app:v1").expect("rmi");
    assert!(!docker.has_image("library/app:v1"));
    docker.pull("library/app:v1").expect("pull again");
    for (digest, _) in image.blobs() {
        assert_eq!(
            registry.blob_gets("library/app", digest),
            2,
            "GETs of {digest}"
        );
    }
}

/// dockerd's requests (method, path, status) for `repo` in the registry's access log, one a
/// line.
fn dockerd_requests(registry: &Registry, repo: &str) -> String {
    let prefix = format!("/v2/{repo}/");
    registry
        .access_log()
        .iter()
        .filter(|e| e.user_agent.starts_with("docker/") && e.path.starts_with(&prefix))
        .map(|e| format!("\n  {} {} {}", e.method, e.path, e.status))
        .collect()
}

/// dockerd pulls `library/app:v1` through the mirror: the image is there under its names,
/// each blob was fetched once, and every file of its layers reads back as built.
fn pull_is_counted_and_extracted(registry: &Registry, docker: &Dockerd, image: &Image) {
    let t = Instant::now();
    let out = docker
        .pull("library/app:v1")
        .expect("pull through the mirror");
    eprintln!("pull library/app:v1 (3 layers) took {:?}", t.elapsed());
    assert!(out.contains("docker.io/library/app:v1"), "{out}");
    assert!(docker.has_image("library/app:v1"));
    assert!(
        docker.images().contains(&"app:v1".to_owned()),
        "{:?}",
        docker.images()
    );
    assert_eq!(
        docker
            .inspect("library/app:v1", "{{.Id}}")
            .expect("inspect"),
        image.config_digest
    );

    // Exactly one upstream GET per blob, and what was asked, in order.
    for (digest, _) in image.blobs() {
        assert_eq!(
            registry.blob_gets("library/app", digest),
            1,
            "GETs of {digest}"
        );
    }
    eprintln!(
        "dockerd's requests for app:{}",
        dockerd_requests(registry, "library/app")
    );

    // The layers were extracted: every file reads back as built.
    for layer in &image.layers {
        for (path, content) in &layer.files {
            let got = docker
                .read_file("library/app:v1", &format!("/{path}"))
                .expect("read a file from the image");
            assert!(got == *content, "/{path} in the pulled image");
        }
    }
}

/// The index: the host's platform, then arm64 explicitly; only that image's blobs move.
fn index_pulls_one_platform_at_a_time(registry: &Registry, docker: &Dockerd, index: &Index) {
    let t = Instant::now();
    docker.pull("library/multi:v1").expect("pull the index");
    eprintln!(
        "pull library/multi:v1 (index, amd64) took {:?}",
        t.elapsed()
    );
    assert_eq!(
        docker
            .inspect("library/multi:v1", "{{.Architecture}}")
            .as_deref(),
        Ok("amd64")
    );
    let amd64 = index.image("amd64");
    let arm64 = index.image("arm64");
    let blob_gets = |img: &Image| -> BTreeMap<String, usize> {
        img.blobs()
            .iter()
            .map(|(d, _)| (d.to_string(), registry.blob_gets("library/multi", d)))
            .collect()
    };
    assert!(
        blob_gets(amd64).values().all(|&n| n == 1),
        "{:?}",
        blob_gets(amd64)
    );
    assert!(
        blob_gets(arm64).values().all(|&n| n == 0),
        "{:?}",
        blob_gets(arm64)
    );
    docker
        .pull_platform("library/multi:v1", "linux/arm64")
        .expect("pull the index for arm64");
    assert_eq!(
        docker
            .inspect("library/multi:v1", "{{.Architecture}}")
            .as_deref(),
        Ok("arm64")
    );
    assert!(
        blob_gets(arm64).values().all(|&n| n == 1),
        "{:?}",
        blob_gets(arm64)
    );
    eprintln!(
        "dockerd's requests for multi (amd64, then arm64):{}",
        dockerd_requests(registry, "library/multi")
    );
}

/// With no internet, a pull the mirror cannot serve fails fast and deterministically: dockerd
/// falls back to Docker Hub, which the harness routes to a dead loopback proxy.
#[test]
fn dockerd_pull_fails_fast_when_the_mirror_cannot_serve() {
    let mut registry = Registry::start();
    let docker = Dockerd::start(&registry.url());

    let t = Instant::now();
    let err = docker.pull("library/absent:v1").expect_err("absent image");
    let missing = t.elapsed();
    assert!(err.contains("proxyconnect"), "{err}");
    assert!(
        docker.logs().contains("manifest unknown"),
        "the mirror was asked first"
    );
    assert_eq!(registry.count("GET", "/v2/library/absent/manifests/v1"), 1);

    registry.stop();
    let t = Instant::now();
    let err = docker.pull("library/absent:v1").expect_err("mirror down");
    let down = t.elapsed();
    assert!(err.contains("proxyconnect"), "{err}");
    eprintln!("failed pulls took {missing:?} (missing image) and {down:?} (mirror down)");
    assert!(missing < Duration::from_secs(10) && down < Duration::from_secs(10));
}

/// htpasswd auth, stop and restart with the same storage, and freeze/resume.
#[test]
fn registry_with_htpasswd_stops_and_restarts() {
    let mut registry = Registry::start_with_htpasswd("alice", "s3cret");
    assert_eq!(http_status(registry.addr(), "/v2/").expect("GET /v2/"), 401);
    let image = seed_image(&registry, "team/app", "v1", 1);
    let log = registry.access_log();
    assert!(
        log.iter().any(|e| e.path == "/v2/" && e.status == 401),
        "{log:?}"
    );

    let reference = format!("docker://{}/team/app:v1", registry.host());
    let inspect = |creds: Option<&str>| {
        let mut args = vec!["inspect", "--tls-verify=false"];
        if let Some(creds) = creds {
            args.extend(["--creds", creds]);
        }
        args.push(&reference);
        skopeo(&args)
    };
    assert!(inspect(None).is_err(), "anonymous access is refused");
    let found = json(&inspect(Some("alice:s3cret")).expect("inspect with credentials"));
    assert_eq!(found["Digest"], image.manifest_digest.as_str());

    registry.stop();
    assert!(!registry.is_running());
    assert!(
        http_status(registry.addr(), "/v2/").is_err(),
        "connection refused when down"
    );
    registry.restart();
    let found = json(&inspect(Some("alice:s3cret")).expect("inspect after restart"));
    assert_eq!(
        found["Digest"],
        image.manifest_digest.as_str(),
        "storage survives"
    );

    registry.freeze();
    assert!(
        http_status(registry.addr(), "/v2/").is_err(),
        "a frozen registry times out"
    );
    registry.resume();
    assert_eq!(http_status(registry.addr(), "/v2/").expect("resumed"), 401);
}

/// Random incompressible layers of exact sizes, for byte-count tests.
#[test]
fn blob_images_have_incompressible_layers_of_the_asked_size() {
    let registry = Registry::start();
    let image = seed_blob_image(&registry, "library/blobs", "v1", &[1 << 20, 3 << 20]);
    for (layer, size) in image.layers.iter().zip([1usize << 20, 3 << 20]) {
        assert!(layer.size as usize > size && (layer.size as usize) < size + size / 100 + 4096);
    }
    let inspect = json(
        &skopeo(&[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}/library/blobs:v1", registry.host()),
        ])
        .expect("skopeo inspect blobs"),
    );
    assert_eq!(inspect["Digest"], image.manifest_digest.as_str());
}
