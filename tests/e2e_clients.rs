//! End to end with real clients other than dockerd: containerd (`ctr images pull
//! --hosts-dir`), podman (registries.conf path-prefix mirrors) and skopeo, each pulling from
//! ONE berth that mirrors two registries: two `docker-registry` instances standing in for
//! docker.io (the default) and ghcr.io. Plus: routes naming an unconfigured registry are
//! refused without berth connecting anywhere.
//!
//! Clients talk to berth through a [`Recorder`], so the tests also pin down what each client
//! really sends (containerd: `?ns=<registry>`; podman/skopeo: `/v2/<registry>/<repo>/…`).
//! The real docker.io and ghcr.io are unreachable: every client runs with `HTTP(S)_PROXY` at
//! a closed loopback port, so a fallback past berth fails at once instead of going out.
//! The programs are installed by tests/setup.sh; a missing one fails the test.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// Two upstreams with one image each, and one berth mirroring both.
struct TwoRegistries {
    /// Stands in for docker.io (berth's default registry).
    hub: Registry,
    /// Stands in for ghcr.io.
    ghcr: Registry,
    /// `library/app:v1` on `hub`.
    app: Image,
    /// `owner/tool:v2` on `ghcr`.
    tool: Image,
    berth: Berth,
}

fn two_registries() -> TwoRegistries {
    let hub = Registry::start();
    let ghcr = Registry::start();
    let app = seed_image(&hub, "library/app", "v1", 2);
    let tool = seed_image_with(&ghcr, "owner/tool", "v2", Format::Oci, "amd64", 3);
    let berth = Berth::start_registries(&[
        ("docker.io", &hub.url(), true),
        ("ghcr.io", &ghcr.url(), false),
    ]);
    TwoRegistries {
        hub,
        ghcr,
        app,
        tool,
        berth,
    }
}

impl TwoRegistries {
    /// berth logged no warning or error (e.g. "request aborted") while serving the clients.
    fn assert_berth_quiet(&self) {
        let logs = self.berth.logs();
        let noisy: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        assert!(noisy.is_empty(), "berth warned:\n{}", noisy.join("\n"));
    }

    /// Each upstream got exactly one GET per blob of its own image, and no request at all
    /// for the other registry's repository.
    fn assert_one_get_per_blob(&self) {
        for (d, _) in self.app.blobs() {
            assert_eq!(
                self.hub.blob_gets("library/app", d),
                1,
                "docker.io upstream GETs of {d}\n{:?}",
                self.hub.access_log()
            );
        }
        for (d, _) in self.tool.blobs() {
            assert_eq!(
                self.ghcr.blob_gets("owner/tool", d),
                1,
                "ghcr.io upstream GETs of {d}\n{:?}",
                self.ghcr.access_log()
            );
        }
        let strays = |reg: &Registry, other: &str| {
            reg.access_log()
                .into_iter()
                .filter(|e| e.path.contains(other))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strays(&self.hub, "owner/tool"),
            vec![],
            "docker.io upstream"
        );
        assert_eq!(
            strays(&self.ghcr, "library/app"),
            vec![],
            "ghcr.io upstream"
        );
        assert_eq!(
            strays(&self.hub, "/docker.io/"),
            vec![],
            "docker.io upstream"
        );
        assert_eq!(strays(&self.ghcr, "/ghcr.io/"), vec![], "ghcr.io upstream");
    }

    /// berth's cache holds each manifest under its own registry's namespace only.
    fn assert_cache_namespaces(&self) {
        let manifests = self.berth.cache_dir().join("manifests");
        let listing = || tree(&manifests);
        eprintln!("berth cache manifests/:\n{}", listing());
        for (registry, repo, tag) in [
            ("docker.io", "library/app", "v1"),
            ("ghcr.io", "owner/tool", "v2"),
        ] {
            let dir = manifests.join(registry).join(repo);
            assert!(dir.is_dir(), "no {}\n{}", dir.display(), listing());
            let tags: Vec<String> = walk(&dir)
                .into_iter()
                .filter(|p| {
                    p.file_name().is_some_and(|n| n == tag)
                        && p.parent()
                            .and_then(Path::file_name)
                            .is_some_and(|n| n == "_tags")
                })
                .map(|p| p.display().to_string())
                .collect();
            assert!(
                !tags.is_empty(),
                "no _tags/{tag} under {}\n{}",
                dir.display(),
                listing()
            );
        }
        for (registry, repo) in [
            ("ghcr.io", "library/app"),
            ("ghcr.io", "app"),
            ("docker.io", "owner/tool"),
            ("docker.io", "library/owner"),
            ("docker.io", "docker.io"),
            ("docker.io", "ghcr.io"),
            ("docker.io", "library/docker.io"),
            ("docker.io", "library/ghcr.io"),
        ] {
            let dir = manifests.join(registry).join(repo);
            assert!(!dir.exists(), "unexpected {}\n{}", dir.display(), listing());
        }
        let registries: Vec<String> = std::fs::read_dir(&manifests)
            .expect("read cache manifests dir")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let mut sorted = registries.clone();
        sorted.sort();
        assert_eq!(sorted, ["docker.io", "ghcr.io"], "{}", listing());
    }
}

/// Every file under `dir`, recursively, sorted.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    files_under(dir).into_iter().map(|(p, _)| p).collect()
}

/// `walk` as text relative to `dir`, for failure messages.
fn tree(dir: &Path) -> String {
    walk(dir)
        .iter()
        .map(|p| p.strip_prefix(dir).unwrap_or(p).display().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Registry API requests other than the `/v2/` ping.
fn api_requests(rec: &Recorder) -> Vec<RecordedRequest> {
    rec.requests()
        .into_iter()
        .filter(|r| r.path != "/v2/" && r.path != "/v2")
        .collect()
}

/// The distinct `User-Agent`s a recorder saw.
fn user_agents(rec: &Recorder) -> std::collections::BTreeSet<String> {
    rec.requests()
        .iter()
        .filter_map(|r| r.header("user-agent").map(str::to_owned))
        .collect()
}

#[test]
fn containerd_pulls_two_registries_through_one_berth_with_ns() {
    require_program("containerd");
    require_program("ctr");
    let t = two_registries();
    let rec = Recorder::start(t.berth.addr());
    let ctd = timed("containerd start", Containerd::start);
    let hub_hosts = ctd.add_mirror("docker.io", &rec.url());
    ctd.add_mirror("ghcr.io", &rec.url());
    eprintln!("docker.io/hosts.toml:\n{hub_hosts}");
    cold_pulls_name_the_registry_with_ns(&t, &rec, &ctd);
    unnormalized_docker_io_name_is_served_as_library(&t, &rec, &ctd);
    t.assert_berth_quiet();
    warm_repull_is_served_from_the_cache(&t, &rec, &ctd);
    one_platform_of_an_index_is_fetched_once(&t, &ctd);
    nothing_falls_through_to_the_real_registries(&rec, &ctd);
}

/// ctr pulls an image from each registry through berth: containerd names the registry
/// with `?ns=` on every request, every blob is fetched from berth and upstream once.
fn cold_pulls_name_the_registry_with_ns(t: &TwoRegistries, rec: &Recorder, ctd: &Containerd) {
    timed("ctr pull docker.io/library/app:v1", || {
        ctd.pull("docker.io/library/app:v1")
    })
    .expect("ctr pull docker.io/library/app:v1 through berth");
    timed("ctr pull ghcr.io/owner/tool:v2", || {
        ctd.pull("ghcr.io/owner/tool:v2")
    })
    .expect("ctr pull ghcr.io/owner/tool:v2 through berth");
    eprintln!("containerd sent:\n{}", rec.summary());

    let images = ctd.images();
    for want in ["docker.io/library/app:v1", "ghcr.io/owner/tool:v2"] {
        assert!(images.iter().any(|i| i == want), "{want} not in {images:?}");
    }

    // containerd names the registry with ?ns= on every request to the mirror, and keeps the
    // repository path as the reference has it.
    let requests = api_requests(rec);
    assert!(!requests.is_empty(), "containerd sent nothing to berth");
    for r in &requests {
        let want = if r.path.starts_with("/v2/library/app/") {
            "docker.io"
        } else if r.path.starts_with("/v2/owner/tool/") {
            "ghcr.io"
        } else {
            panic!("unexpected request from containerd: {}", r.summary());
        };
        assert_eq!(r.ns(), Some(want), "{}", r.summary());
    }
    for (repo, image) in [("library/app", &t.app), ("owner/tool", &t.tool)] {
        for (d, _) in image.blobs() {
            let path = format!("/v2/{repo}/blobs/{d}");
            assert!(
                requests.iter().any(|r| r.method == "GET" && r.path == path),
                "containerd did not GET {path} from berth"
            );
        }
    }

    t.assert_one_get_per_blob();
    t.assert_cache_namespaces();
    eprintln!("containerd user agents: {:?}", user_agents(rec));
}

/// ctr does not normalize `docker.io/app`: berth serves `/v2/app/…?ns=docker.io` as
/// `library/app`, from its cache.
fn unnormalized_docker_io_name_is_served_as_library(
    t: &TwoRegistries,
    rec: &Recorder,
    ctd: &Containerd,
) {
    rec.clear();
    timed("ctr pull docker.io/app:v1", || ctd.pull("docker.io/app:v1"))
        .expect("ctr pull docker.io/app:v1 (no library/) through berth");
    assert!(
        rec.requests()
            .iter()
            .any(|r| r.path == "/v2/app/manifests/v1" && r.ns() == Some("docker.io")),
        "{}",
        rec.summary()
    );
    t.assert_one_get_per_blob();
    t.assert_cache_namespaces();
}

/// A second pull of the same images (after removing them, so containerd has none of their
/// content) is served by berth's cache: no new upstream blob GETs.
fn warm_repull_is_served_from_the_cache(t: &TwoRegistries, rec: &Recorder, ctd: &Containerd) {
    for image in [
        "docker.io/app:v1",
        "docker.io/library/app:v1",
        "ghcr.io/owner/tool:v2",
    ] {
        ctd.rmi(image).expect("ctr images rm");
    }
    rec.clear();
    timed("ctr re-pull both (warm cache)", || {
        ctd.pull("docker.io/library/app:v1")
            .and_then(|_| ctd.pull("ghcr.io/owner/tool:v2"))
    })
    .expect("re-pull from berth's cache");
    let blob_gets = rec
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .count();
    assert_eq!(
        blob_gets,
        t.app.blobs().len() + t.tool.blobs().len(),
        "containerd re-fetched every blob from berth:\n{}",
        rec.summary()
    );
    t.assert_one_get_per_blob();
}

/// One platform of a multi-arch index: only that image's blobs are fetched, once.
fn one_platform_of_an_index_is_fetched_once(t: &TwoRegistries, ctd: &Containerd) {
    let index = seed_index(&t.ghcr, "owner/multi", "v1");
    timed(
        "ctr pull --platform linux/arm64 ghcr.io/owner/multi:v1",
        || ctd.pull_with(&["--platform", "linux/arm64"], "ghcr.io/owner/multi:v1"),
    )
    .expect("ctr pull the arm64 image of an index through berth");
    for (d, _) in index.image("arm64").blobs() {
        assert_eq!(
            t.ghcr.blob_gets("owner/multi", d),
            1,
            "ghcr.io upstream GETs of {d}"
        );
    }
    for (d, _) in index.image("amd64").blobs() {
        assert_eq!(
            t.ghcr.blob_gets("owner/multi", d),
            0,
            "ghcr.io upstream GETs of {d}"
        );
    }
    assert!(
        t.berth
            .cache_dir()
            .join("manifests/ghcr.io/owner/multi")
            .is_dir(),
        "{}",
        tree(&t.berth.cache_dir().join("manifests"))
    );
}

/// A tag berth cannot serve (404) makes containerd try the hosts.toml `server` next, which
/// the dead proxy refuses at once: nothing falls through to the real registries.
fn nothing_falls_through_to_the_real_registries(rec: &Recorder, ctd: &Containerd) {
    // Nothing falls through to the real registries: a tag berth cannot serve (404) makes
    // containerd try the hosts.toml `server` next, which the dead proxy refuses at once.
    rec.clear();
    let start = Instant::now();
    let err = ctd
        .pull("ghcr.io/owner/tool:missing")
        .expect_err("a tag no upstream has must not pull");
    let took = start.elapsed();
    eprintln!("missing tag failed after {took:.2?}: {err}");
    assert!(took < Duration::from_secs(30), "failure took {took:?}");
    assert!(
        rec.requests()
            .iter()
            .any(|r| r.path == "/v2/owner/tool/manifests/missing" && r.ns() == Some("ghcr.io")),
        "containerd did not ask berth first:\n{}",
        rec.summary()
    );
    // The fallback was tried, and stopped by the dead proxy.
    assert!(
        err.contains("proxyconnect") && err.contains("127.0.0.1:9"),
        "the fallback to the real registry was not stopped by the dead proxy: {err}"
    );
}

#[test]
fn podman_pulls_two_registries_through_one_berth_by_path_prefix() {
    require_program("podman");
    let t = two_registries();
    let rec = Recorder::start(t.berth.addr());
    let podman = Podman::new();
    podman.add_mirror(
        "docker.io",
        "docker.io",
        &format!("{}/docker.io", rec.host()),
    );
    let conf = podman.add_mirror("ghcr.io", "ghcr.io", &format!("{}/ghcr.io", rec.host()));
    eprintln!("registries.conf:\n{conf}");

    timed("podman pull docker.io/library/app:v1", || {
        podman.pull("docker.io/library/app:v1")
    })
    .expect("podman pull docker.io/library/app:v1 through berth");
    timed("podman pull ghcr.io/owner/tool:v2", || {
        podman.pull("ghcr.io/owner/tool:v2")
    })
    .expect("podman pull ghcr.io/owner/tool:v2 through berth");
    eprintln!("podman sent:\n{}", rec.summary());

    let images = podman.images();
    for want in ["docker.io/library/app:v1", "ghcr.io/owner/tool:v2"] {
        assert!(images.iter().any(|i| i == want), "{want} not in {images:?}");
    }
    assert_eq!(
        podman
            .inspect("docker.io/library/app:v1", "{{.Digest}}")
            .expect("inspect app"),
        t.app.manifest_digest
    );
    assert_eq!(
        podman
            .inspect("ghcr.io/owner/tool:v2", "{{.Digest}}")
            .expect("inspect tool"),
        t.tool.manifest_digest
    );

    // podman names the registry by path prefix, never with ?ns=.
    let requests = api_requests(&rec);
    assert!(!requests.is_empty(), "podman sent nothing to berth");
    for r in &requests {
        assert!(
            r.path.starts_with("/v2/docker.io/library/app/")
                || r.path.starts_with("/v2/ghcr.io/owner/tool/"),
            "unexpected request from podman: {}",
            r.summary()
        );
        assert_eq!(r.ns(), None, "{}", r.summary());
    }

    t.assert_one_get_per_blob();
    t.assert_cache_namespaces();
    eprintln!("podman user agents: {:?}", user_agents(&rec));
    t.assert_berth_quiet();

    // A tag berth cannot serve: podman falls back to the primary location, which the dead
    // proxy refuses at once; nothing reaches the internet, and the pull fails.
    rec.clear();
    let start = Instant::now();
    let err = podman
        .pull("ghcr.io/owner/tool:missing")
        .expect_err("a tag no upstream has must not pull");
    let took = start.elapsed();
    eprintln!("missing tag failed after {took:.2?}: {err}");
    assert!(took < Duration::from_secs(30), "failure took {took:?}");
    assert!(
        rec.requests()
            .iter()
            .any(|r| r.path == "/v2/ghcr.io/owner/tool/manifests/missing"),
        "podman did not ask berth first:\n{}",
        rec.summary()
    );
    eprintln!("podman sent for the missing tag:\n{}", rec.summary());
    assert!(
        err.contains("proxyconnect") && err.contains("127.0.0.1:9"),
        "the fallback to the real registry was not stopped by the dead proxy: {err}"
    );
}

#[test]
fn skopeo_copies_by_path_prefix_and_picks_the_arm64_image_of_an_index() {
    require_program("skopeo");
    let t = two_registries();
    let index = seed_index(&t.hub, "library/multi", "v1");
    let rec = Recorder::start(t.berth.addr());
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("tool");

    timed("skopeo copy ghcr.io/owner/tool:v2", || {
        skopeo_isolated(
            work.path(),
            &[
                "copy",
                "--insecure-policy",
                "--src-tls-verify=false",
                &format!("docker://{}/ghcr.io/owner/tool:v2", rec.host()),
                &format!("dir:{}", out.display()),
            ],
        )
    })
    .expect("skopeo copy through berth by path prefix");
    for (d, bytes) in t.tool.blobs() {
        let copied = std::fs::read(out.join(d.trim_start_matches("sha256:"))).expect("copied blob");
        assert!(copied == bytes, "blob {d} differs");
    }
    assert_eq!(
        std::fs::read(out.join("manifest.json")).expect("copied manifest"),
        t.tool.manifest
    );
    for (d, _) in t.tool.blobs() {
        assert_eq!(
            t.ghcr.blob_gets("owner/tool", d),
            1,
            "ghcr.io upstream GETs of {d}"
        );
    }

    // The index through the default registry (no prefix), for arm64.
    let inspect = json(
        &timed("skopeo inspect --override-arch arm64", || {
            skopeo_isolated(
                work.path(),
                &[
                    "inspect",
                    "--tls-verify=false",
                    "--override-arch",
                    "arm64",
                    &format!("docker://{}/library/multi:v1", rec.host()),
                ],
            )
        })
        .expect("skopeo inspect the index for arm64"),
    );
    let arm64 = index.image("arm64");
    assert_eq!(inspect["Architecture"], "arm64", "{inspect}");
    let layers: Vec<&str> = arm64.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(inspect["Layers"], serde_json::json!(layers), "{inspect}");
    // skopeo 1.9 reports the index's digest; berth served the arm64 manifest by digest.
    assert_eq!(inspect["Digest"], index.digest.as_str());
    let by_digest = format!("/v2/library/multi/manifests/{}", arm64.manifest_digest);
    assert!(
        rec.requests().iter().any(|r| r.path == by_digest),
        "skopeo did not fetch the arm64 manifest:\n{}",
        rec.summary()
    );
    assert_eq!(
        t.hub.manifest_gets("library/multi", &arm64.manifest_digest),
        1
    );
    let amd64 = index.image("amd64");
    assert_eq!(
        t.hub.manifest_gets("library/multi", &amd64.manifest_digest),
        0
    );

    // The same by explicit prefix, raw: the arm64 manifest bytes as pushed.
    let raw = skopeo_isolated(
        work.path(),
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!(
                "docker://{}/docker.io/library/multi@{}",
                rec.host(),
                arm64.manifest_digest
            ),
        ],
    )
    .expect("skopeo inspect --raw the arm64 manifest by digest");
    assert!(
        raw.as_bytes() == arm64.manifest.as_slice(),
        "arm64 manifest bytes: {raw}"
    );
    eprintln!("skopeo sent:\n{}", rec.summary());
    t.assert_berth_quiet();
}

/// Status, headers and body of one request to `addr` (HTTP/1.1, `Connection: close`).
fn http_request(addr: SocketAddr, method: &str, target: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect berth");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).expect("send request");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read response");
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, head.to_owned(), body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        body = rest.get(n + 2..).unwrap_or("");
    }
    out
}

#[test]
fn unconfigured_registries_are_refused_without_any_connection() {
    let t = two_registries();
    let trap = TcpListener::bind("127.0.0.1:0").expect("bind trap listener");
    trap.set_nonblocking(true).expect("nonblocking");
    let port = trap.local_addr().expect("trap addr").port();
    let targets = [
        format!("/v2/library/app/manifests/v1?ns=127.0.0.1:{port}"),
        format!("/v2/127.0.0.1:{port}/library/app/manifests/v1"),
        format!(
            "/v2/127.0.0.1:{port}/library/app/blobs/{}",
            t.app.config_digest
        ),
        format!("/v2/127.0.0.1:{port}/library/app/tags/list"),
        format!(
            "/v2/library/app/blobs/{}?ns=127.0.0.1:{port}",
            t.app.config_digest
        ),
        format!("/v2/localhost:{port}/library/app/manifests/v1"),
        "/v2/unknown.example/x/manifests/1".to_owned(),
        "/v2/owner/tool/manifests/v2?ns=evil.example".to_owned(),
        "/v2/library/app/manifests/v1?ns=evil.example".to_owned(),
        "/v2/_catalog?ns=evil.example".to_owned(),
        // Encoded or repeated: still one configured name or nothing.
        format!("/v2/library/app/manifests/v1?ns=127.0.0.1%3A{port}"),
        format!("/v2/127.0.0.1%3A{port}/library/app/manifests/v1"),
        format!("/v2/library/app/manifests/v1?ns=127.0.0.1:{port}&ns=docker.io"),
        format!("/v2/library/app/manifests/v1?x=1&ns=127.0.0.1:{port}"),
    ];
    for target in &targets {
        for method in ["GET", "HEAD"] {
            let (status, head, body) = http_request(t.berth.addr(), method, target);
            eprintln!("{method} {target} -> {status} {body}");
            assert!(
                (400..500).contains(&status),
                "{method} {target}: status {status}\n{head}\n{body}"
            );
            if method == "GET" {
                let v = json(&body);
                let code = v["errors"][0]["code"].as_str().unwrap_or_else(|| {
                    panic!("{target}: no OCI error code in {body}");
                });
                assert!(!code.is_empty(), "{target}: {body}");
                assert!(
                    head.to_ascii_lowercase()
                        .contains("content-type: application/json"),
                    "{target}: {head}"
                );
            }
        }
    }
    // Give a stray connection attempt time to land in the backlog, then look.
    std::thread::sleep(Duration::from_millis(300));
    match trap.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!(
            "berth connected to the unconfigured registry 127.0.0.1:{port} (from {peer})\n{}",
            t.berth.logs()
        ),
        Err(e) => panic!("accept on the trap listener: {e}"),
    }
    // Nor did anything reach the configured upstreams for these requests.
    assert_eq!(t.hub.count("GET", "/v2/library/app/manifests/v1"), 0);
    assert_eq!(t.ghcr.count("GET", "/v2/owner/tool/manifests/v2"), 0);
    // berth still serves the configured routes.
    assert_eq!(
        http_request(t.berth.addr(), "GET", "/v2/library/app/manifests/v1").0,
        200
    );
    assert_eq!(
        http_request(
            t.berth.addr(),
            "GET",
            "/v2/owner/tool/manifests/v2?ns=ghcr.io"
        )
        .0,
        200
    );
}
