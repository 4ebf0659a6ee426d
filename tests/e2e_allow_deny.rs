//! End to end: a registry's `allow` / `deny` lists against real clients. One `docker-registry`
//! upstream holds three images; berth mirrors it as `docker.io` (the default registry) with
//! `allow = ["library/*"]` and `deny = ["*/*-miner*"]`:
//!
//! - `library/allowed`: on the allow list, pulls;
//! - `library/denied-miner`: on the allow list but also on the deny list (deny wins), refused;
//! - `someone/app`: not on the allow list, refused.
//!
//! Each client names the registry its own way: dockerd (`registry-mirrors`) by default (no
//! name), containerd (`ctr` with hosts.toml) with `?ns=docker.io`, podman (registries.conf
//! mirror) with the `/v2/docker.io/…` path prefix. For each, the allowed image pulls and the
//! refused ones fail; berth answered the refused ones 403 `DENIED` (its access log); the
//! upstream's access log has not one request for a refused repository after seeding, while
//! it does have the allowed image's; and berth cached nothing of the refused ones.
//!
//! Clients talk to berth through a [`Recorder`], so each test also pins down that the client
//! named the registry the way it is meant to (otherwise a test could pass by another route).
//! Every client runs with `HTTP(S)_PROXY` at a closed loopback port, so its fallback to the
//! real docker.io after berth refuses fails at once. The programs are installed by
//! tests/setup.sh; a missing one fails the test.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// The `[[registry]]` keys of berth's config.
const FILTERS: &str = r#"allow = ["library/*"]
deny = ["*/*-miner*"]
probe_interval = "0s""#;

/// On the allow list, on no deny list.
const ALLOWED: &str = "library/allowed";
/// Refused by the deny list (although `library/*` allows it).
const DENIED: &str = "library/denied-miner";
/// Refused by the allow list.
const NOT_ALLOWED: &str = "someone/app";

/// How long a refused pull (berth's 403, then the client's fallback to the dead proxy) may take.
const REFUSAL_LIMIT: Duration = Duration::from_secs(30);

/// How long berth's log may lag behind its answers.
const LOG_LAG: Duration = Duration::from_secs(5);

/// How a client names the registry to berth.
#[derive(Debug, Clone, Copy)]
enum Naming {
    /// No name: berth's default registry (dockerd's `registry-mirrors`).
    Default,
    /// `?ns=docker.io` (containerd's hosts.toml mirrors).
    Ns,
    /// `/v2/docker.io/<repo>/…` (podman's registries.conf mirror `berth/docker.io`).
    Prefix,
}

impl Naming {
    /// The manifest request path and `ns` a client naming the registry this way sends.
    fn manifest_request(self, repo: &str) -> (String, Option<&'static str>) {
        match self {
            Naming::Default => (format!("/v2/{repo}/manifests/v1"), None),
            Naming::Ns => (format!("/v2/{repo}/manifests/v1"), Some("docker.io")),
            Naming::Prefix => (format!("/v2/docker.io/{repo}/manifests/v1"), None),
        }
    }

    /// The reference the client pulls for `repo`'s `v1` (dockerd takes docker.io's names
    /// unqualified; ctr and podman want them fully qualified).
    fn reference(self, repo: &str) -> String {
        match self {
            Naming::Default => format!("{repo}:v1"),
            Naming::Ns | Naming::Prefix => format!("docker.io/{repo}:v1"),
        }
    }
}

/// The upstream with the three images, and berth with the lists in front of it.
struct Filtered {
    upstream: Registry,
    allowed: Image,
    /// Upstream access-log entries written by seeding; later ones are berth's.
    seeded: usize,
    berth: Berth,
    /// Between the client and berth.
    rec: Recorder,
}

fn filtered_mirror() -> Filtered {
    let upstream = Registry::start();
    let allowed = seed_image(&upstream, ALLOWED, "v1", 2);
    seed_image(&upstream, DENIED, "v1", 1);
    seed_image(&upstream, NOT_ALLOWED, "v1", 1);
    let seeded = upstream.access_log().len();
    let berth = Berth::start_mirror_with(&upstream.url(), FILTERS);
    let rec = Recorder::start(berth.addr());
    Filtered {
        upstream,
        allowed,
        seeded,
        berth,
        rec,
    }
}

impl Filtered {
    /// Upstream requests since seeding whose path names `repo`.
    fn upstream_requests_for(&self, repo: &str) -> Vec<AccessEntry> {
        self.upstream
            .access_log()
            .into_iter()
            .skip(self.seeded)
            .filter(|e| e.path.contains(&format!("/{repo}/")))
            .collect()
    }

    /// berth's access-log lines (`berth::access`) for requests whose path contains `repo`,
    /// once one for `path` is there (berth writes its log in batches, a few ms behind).
    fn berth_access_lines(&self, repo: &str, path: &str) -> Vec<String> {
        let lines = || -> Vec<String> {
            self.berth
                .logs()
                .lines()
                .filter(|l| l.contains("berth::access") && l.contains(&format!("/{repo}/")))
                .map(str::to_owned)
                .collect()
        };
        let logged = wait_for(&format!("berth's access log of {path}"), LOG_LAG, || {
            let found = lines();
            if found.iter().any(|l| l.contains(&format!("path={path} "))) {
                Probe::Ready(found)
            } else {
                Probe::Pending(format!("{found:?}"))
            }
        });
        logged.unwrap_or_else(|e| panic!("{e}\n{}", self.berth.logs()))
    }

    /// The client asked berth for `repo`'s manifest, naming the registry as `naming` says.
    fn assert_asked(&self, client: &str, naming: Naming, repo: &str) {
        let (path, ns) = naming.manifest_request(repo);
        assert!(
            self.rec
                .requests()
                .iter()
                .any(|r| r.path == path && r.ns() == ns),
            "{client} did not ask berth for {path} (ns {ns:?}):\n{}",
            self.rec.summary()
        );
    }

    /// With `pull` (the client's pull of a reference): the allowed image pulls, through berth
    /// and from the upstream; each refused one fails fast, was asked of berth named as
    /// `naming` says, was answered 403 DENIED, produced no upstream request and no cache
    /// entry, and `shows_refusal(repo, error output)` holds (the client's own evidence).
    fn only_the_allowed_image_pulls(
        &self,
        client: &str,
        naming: Naming,
        pull: impl Fn(&str) -> Result<String, String>,
        shows_refusal: impl Fn(&str, &str) -> bool,
    ) {
        let reference = naming.reference(ALLOWED);
        timed(&format!("{client} pull {reference}"), || pull(&reference))
            .unwrap_or_else(|e| panic!("{client} pull {reference} (allowed) through berth: {e}"));
        self.assert_asked(client, naming, ALLOWED);
        for (d, _) in self.allowed.blobs() {
            assert_eq!(
                self.upstream.blob_gets(ALLOWED, d),
                1,
                "upstream GETs of {d}\n{:?}",
                self.upstream.access_log()
            );
        }

        for repo in [DENIED, NOT_ALLOWED] {
            let reference = naming.reference(repo);
            let start = Instant::now();
            let err = timed(&format!("{client} pull {reference}"), || pull(&reference)).expect_err(
                &format!("{client} pulled {reference}, a refused repository"),
            );
            let took = start.elapsed();
            eprintln!("{client} pull {reference} failed after {took:.2?}: {err}");
            assert!(took < REFUSAL_LIMIT, "refusing {reference} took {took:?}");
            assert!(
                shows_refusal(repo, &err),
                "{client} does not show berth refusing {repo}: {err}"
            );

            self.assert_asked(client, naming, repo);
            let (path, _) = naming.manifest_request(repo);
            for line in &self.berth_access_lines(repo, &path) {
                assert!(
                    line.contains("status=403") && line.contains("allow/deny list"),
                    "berth did not refuse {repo} with 403 DENIED: {line}"
                );
            }
            assert_eq!(
                self.upstream_requests_for(repo),
                vec![],
                "berth asked the upstream for the refused {repo}"
            );
            let cached = self
                .berth
                .cache_dir()
                .join("manifests/docker.io")
                .join(repo);
            assert!(!cached.exists(), "berth cached {}", cached.display());
        }
        // The refusal itself, as the client saw it: 403 with the OCI error JSON.
        let reply = self.refusal(naming, DENIED);
        assert_eq!(reply.status, 403, "{}", reply.text());
        assert_eq!(reply.error_code(), "DENIED", "{}", reply.text());
        // Nothing of the refused repositories reached the upstream, all told.
        for repo in [DENIED, NOT_ALLOWED] {
            assert_eq!(self.upstream_requests_for(repo), vec![], "{repo}");
        }
    }

    /// berth's answer to a manifest GET for `repo`, named as `naming`.
    fn refusal(&self, naming: Naming, repo: &str) -> Reply {
        let (path, ns) = naming.manifest_request(repo);
        let url = match ns {
            Some(ns) => format!("{}{path}?ns={ns}", self.berth.url()),
            None => format!("{}{path}", self.berth.url()),
        };
        request("GET", &url, None, &[], Vec::new())
    }
}

/// Whether `text` has berth's 403 `DENIED` for `repo` as Go clients print a registry error:
/// `denied: <message>`.
fn shows_denied(text: &str, repo: &str) -> bool {
    text.contains(&format!(
        "denied: docker.io/{repo} may not be pulled through this mirror"
    ))
}

#[test]
fn dockerd_pulls_only_what_the_lists_allow_by_default_registry() {
    let t = filtered_mirror();
    // --debug: dockerd logs the mirror's error before it falls back to Docker Hub.
    let docker = timed("dockerd start", || {
        Dockerd::start_with(DockerdOptions {
            mirrors: vec![t.rec.url()],
            extra_args: vec!["--debug".to_owned()],
            ..DockerdOptions::default()
        })
    });
    // dockerd falls back to Docker Hub after its mirror refuses and reports that error (the
    // dead proxy's); its log keeps the mirror's answer.
    t.only_the_allowed_image_pulls(
        "docker",
        Naming::Default,
        |reference| docker.pull(reference),
        |repo, err| {
            err.contains("proxyconnect")
                && docker
                    .logs()
                    .lines()
                    .any(|l| l.contains("Attempting next endpoint") && shows_denied(l, repo))
        },
    );
    assert!(docker.has_image("library/allowed:v1"));
    for repo in [DENIED, NOT_ALLOWED] {
        assert!(!docker.has_image(&format!("{repo}:v1")), "{repo}");
    }
}

#[test]
fn containerd_pulls_only_what_the_lists_allow_with_ns() {
    require_program("containerd");
    require_program("ctr");
    let t = filtered_mirror();
    let ctd = timed("containerd start", Containerd::start);
    ctd.add_mirror("docker.io", &t.rec.url());
    // ctr resolves with HEAD, so it reports the 403 without the error body.
    t.only_the_allowed_image_pulls(
        "ctr",
        Naming::Ns,
        |reference| ctd.pull(reference),
        |repo, err| {
            err.contains(&format!(
                "failed to resolve reference \"docker.io/{repo}:v1\""
            )) && err.contains(&format!("pulling from host {} failed", t.rec.host()))
                && err.contains("403 Forbidden")
        },
    );
    assert_eq!(ctd.images(), ["docker.io/library/allowed:v1"]);
}

#[test]
fn podman_pulls_only_what_the_lists_allow_by_path_prefix() {
    require_program("podman");
    let t = filtered_mirror();
    let podman = Podman::new();
    podman.add_mirror(
        "docker.io",
        "docker.io",
        &format!("{}/docker.io", t.rec.host()),
    );
    t.only_the_allowed_image_pulls(
        "podman",
        Naming::Prefix,
        |reference| podman.pull(reference),
        |repo, err| err.contains("Mirrors also failed") && shows_denied(err, repo),
    );
    assert_eq!(podman.images(), ["docker.io/library/allowed:v1"]);
}
