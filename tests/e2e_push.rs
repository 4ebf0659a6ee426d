//! End to end: real clients push to berth's hosted registry (`[[hosted]]`, issue 15) and pull
//! back through it. A real `dockerd` builds a multi-layer image (`docker build`, FROM scratch
//! with Debian's static busybox), logs in and pushes; a second dockerd pulls and runs it;
//! `podman push`; `skopeo copy --all` of a multi-arch index; `helm push`/`helm pull` of a chart
//! as an OCI artifact; a webhook receiver on loopback checks the notification envelopes; and
//! one berth serves hosted `team/app` and mirrored `library/alpine` to one dockerd, with no
//! request for `team/*` ever sent upstream.
//!
//! Users (berth's htpasswd): `ci` may pull, push and delete `local/team/*`; `admin` all of
//! `local/*`; anonymous may pull `docker.io/library/*` only. The programs are installed by
//! tests/setup.sh; a missing one fails the test.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

const CI_PASS: &str = "ci-push-Vb2";
const ADMIN_PASS: &str = "admin-push-Hq5";
/// How long one push (docker, podman, skopeo, helm) may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a webhook delivery may take to arrive after the request that caused it.
const HOOK_TIMEOUT: Duration = Duration::from_secs(20);
const EVENTS_MEDIA_TYPE: &str = "application/vnd.docker.distribution.events.v1+json";

/// An upstream standing in for docker.io, a webhook receiver, and berth: the mirrored
/// default registry plus the hosted registry `local` (`team/*`, `ci/**`), with `[auth]` or
/// without.
struct Site {
    upstream: Registry,
    hook: Webhook,
    berth: Berth,
    /// htpasswd, build contexts, client files.
    dir: tempfile::TempDir,
}

impl Site {
    fn start(auth: bool) -> Site {
        let upstream = Registry::start();
        let hook = Webhook::start();
        let dir = tempfile::Builder::new()
            .prefix("e2e-push-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let mut config = berth_config(&upstream.url(), &dir.path().join("cache"));
        config.push_str(&format!(
            r#"
[[hosted]]
name = "local"
repositories = ["team/*", "ci/**"]
delete = true

[[notify]]
url = "{hook}"
events = ["push", "delete", "pull"]
"#,
            hook = hook.url()
        ));
        if auth {
            let htpasswd = dir.path().join("htpasswd");
            let lines = format!(
                "{}\n{}\n",
                htpasswd_line("ci", CI_PASS),
                htpasswd_line("admin", ADMIN_PASS)
            );
            std::fs::write(&htpasswd, lines).expect("write htpasswd");
            config.push_str(&format!(
                r#"
[auth]
htpasswd = "{htpasswd}"

[[auth.rule]]
users = ["anonymous"]
allow = ["docker.io/library/*"]

[[auth.rule]]
users = ["ci"]
allow = ["local/team/*"]
actions = ["pull", "push", "delete"]

[[auth.rule]]
users = ["admin"]
allow = ["local/*"]
actions = ["pull", "push", "delete"]
"#,
                htpasswd = htpasswd.display()
            ));
        }
        let berth = Berth::start(&config);
        Site {
            upstream,
            hook,
            berth,
            dir,
        }
    }

    fn work(&self) -> &Path {
        self.dir.path()
    }

    /// `GET /v2/<name>/manifests/<reference>` as admin, accepting every manifest type.
    fn manifest(&self, name: &str, reference: &str) -> Reply {
        let accept = [DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX].join(", ");
        request(
            "GET",
            &format!("{}/v2/{name}/manifests/{reference}", self.berth.url()),
            Some(("admin", ADMIN_PASS)),
            &[("accept", &accept)],
            Vec::new(),
        )
    }

    /// `HEAD /v2/<name>/blobs/<digest>` as `user`: its status.
    fn blob_status(&self, user: (&str, &str), name: &str, digest: &str) -> u16 {
        let url = format!("{}/v2/{name}/blobs/{digest}", self.berth.url());
        request("HEAD", &url, Some(user), &[], Vec::new()).status
    }

    /// berth logged no error.
    fn assert_no_errors(&self) {
        let logs = self.berth.logs();
        let errors: Vec<&str> = logs.lines().filter(|l| l.contains(" ERROR ")).collect();
        assert!(errors.is_empty(), "berth errors:\n{}", errors.join("\n"));
    }
}

fn htpasswd_line(user: &str, password: &str) -> String {
    let out = run(
        Command::new(require_program("htpasswd")).args(["-Bbn", user, password]),
        Duration::from_secs(30),
    )
    .and_then(CmdOutput::into_result)
    .expect("htpasswd -Bbn");
    out.trim_end().to_owned()
}

/// dockerd options treating berth (plain HTTP) as an insecure registry.
fn insecure(host: &str) -> DockerdOptions {
    DockerdOptions {
        insecure_registries: vec![host.to_owned()],
        ..DockerdOptions::default()
    }
}

fn docker_login(docker: &Dockerd, host: &str, user: &str, password: &str) {
    let out = docker
        .docker(&["login", host, "-u", user, "-p", password])
        .unwrap_or_else(|e| panic!("docker login {host} as {user}: {e}"));
    assert!(out.contains("Login Succeeded"), "docker login: {out}");
}

/// The `sha256:…` after `digest: ` in a `docker push` output.
fn pushed_digest(out: &str) -> String {
    out.split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in push output: {out}"))
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// docker build

/// An image built by `docker build` from scratch: busybox, a greeting, a random payload and
/// a script, one layer per COPY/ADD.
struct Built {
    reference: String,
    greeting: String,
    payload_sha256: String,
}

impl Built {
    /// What `docker run` of it prints.
    fn expected_output(&self) -> String {
        format!(
            "{}\n{}  /opt/payload.bin\n",
            self.greeting, self.payload_sha256
        )
    }
}

/// The static busybox of Debian's `busybox-static` (tests/setup.sh installs it): an image
/// FROM scratch has no dynamic loader.
fn static_busybox() -> PathBuf {
    let bin = require_program("busybox");
    let elf = std::fs::read(&bin).unwrap_or_else(|e| panic!("read {}: {e}", bin.display()));
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01") && !has_interpreter(&elf),
        "{} is not a static 64-bit ELF: install busybox-static (tests/setup.sh)",
        bin.display()
    );
    bin
}

/// Whether a little-endian ELF64 file has a `PT_INTERP` program header (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    let u = |at: usize, n: usize| {
        elf.get(at..at + n).map_or(0, |b| {
            b.iter().rev().fold(0u64, |v, x| v << 8 | u64::from(*x))
        })
    };
    let (phoff, phentsize, phnum) = (u(0x20, 8) as usize, u(0x36, 2) as usize, u(0x38, 2));
    (0..phnum as usize).any(|i| u(phoff + i * phentsize, 4) == 3)
}

fn docker_build(docker: &Dockerd, reference: &str, work: &Path) -> Built {
    let ctx = work.join("build");
    std::fs::create_dir_all(&ctx).expect("mkdir build context");
    std::fs::copy(static_busybox(), ctx.join("busybox")).expect("copy busybox");
    let greeting = format!(
        "hello from berth's hosted registry {}",
        hex::encode(random_bytes(6))
    );
    std::fs::write(ctx.join("greeting.txt"), format!("{greeting}\n")).expect("write greeting");
    let payload = random_bytes(256 << 10);
    std::fs::write(ctx.join("payload.bin"), &payload).expect("write payload");
    std::fs::write(
        ctx.join("run.sh"),
        "busybox cat /etc/greeting.txt\nbusybox sha256sum /opt/payload.bin\n",
    )
    .expect("write run.sh");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         COPY greeting.txt /etc/greeting.txt\n\
         ADD payload.bin /opt/payload.bin\n\
         COPY run.sh /bin/run.sh\n\
         ENV PATH=/bin\n\
         ENTRYPOINT [\"/bin/busybox\", \"sh\", \"/bin/run.sh\"]\n",
    )
    .expect("write Dockerfile");
    let mut cmd = docker.command();
    // The classic builder (the Debian CLI has no buildx).
    cmd.env("DOCKER_BUILDKIT", "0")
        .args(["build", "-t", reference])
        .arg(&ctx);
    run(&mut cmd, PUSH_TIMEOUT)
        .and_then(CmdOutput::into_result)
        .unwrap_or_else(|e| panic!("docker build: {e}"));
    Built {
        reference: reference.to_owned(),
        greeting,
        payload_sha256: digest_of(&payload).trim_start_matches("sha256:").to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Webhook envelopes

/// Waits for the envelope carrying an event `action` on `digest` (and `tag`) by `actor` (the
/// test's own checks are made as admin, so their events are told apart) and checks it as
/// distribution writes it: the media type, one event with id and timestamp, the target, the
/// request, the actor and the source. Returns the event.
fn check_event(
    s: &Site,
    action: &str,
    repository: &str,
    digest: &str,
    tag: Option<&str>,
    method: &str,
    actor: &str,
) -> serde_json::Value {
    let (delivery, e) = s
        .hook
        .wait_event(
            &format!("webhook {action} of {digest}"),
            HOOK_TIMEOUT,
            |e| {
                e["action"] == action
                    && e["target"]["digest"] == digest
                    && e["target"]["tag"].as_str() == tag
                    && e["actor"]["name"] == actor
            },
        )
        .unwrap_or_else(|e| {
            let got: Vec<String> = s
                .hook
                .deliveries()
                .iter()
                .map(|d| d.json().to_string())
                .collect();
            panic!("{e}\nreceived:\n{}", got.join("\n"))
        });
    assert_eq!(delivery.method, "POST");
    assert_eq!(delivery.path, "/hook");
    assert_eq!(delivery.header("content-type"), Some(EVENTS_MEDIA_TYPE));
    let envelope = delivery.json();
    assert_eq!(
        envelope["events"].as_array().map(Vec::len),
        Some(1),
        "{envelope}"
    );
    for key in ["id", "timestamp"] {
        assert!(e[key].as_str().is_some_and(|v| !v.is_empty()), "{key}: {e}");
    }
    assert_eq!(e["target"]["repository"], repository, "{e}");
    assert_eq!(e["request"]["method"], method, "{e}");
    assert_eq!(e["actor"]["name"], actor, "{e}");
    assert!(
        e["source"]["instanceID"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "source.instanceID: {e}"
    );
    // A delete names no size (distribution's omits it; berth's is 0).
    if action != "delete" {
        assert!(e["target"]["size"].as_u64().is_some_and(|n| n > 0), "{e}");
    }
    assert_eq!(e["target"]["size"], e["target"]["length"], "{e}");
    assert!(
        e["request"]["useragent"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{e}"
    );
    e
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn docker_build_login_push_then_a_second_dockerd_pulls_and_runs_it() {
    let s = timed("upstream, webhook, berth", || Site::start(true));
    let host = s.berth.host();
    let builder = timed("dockerd (builder)", || Dockerd::start_with(insecure(&host)));
    let app = timed("docker build", || {
        docker_build(&builder, &format!("{host}/team/app:v1"), s.work())
    });
    let (digest, manifest) = docker_push_as_ci(&s, &builder, &app.reference);
    // Before the refused push below: after it dockerd forgets which repositories hold the
    // layers (a failed mount makes it drop that association), and would upload them again.
    docker_push_again_and_mount(&s, &builder, &app.reference);
    docker_push_elsewhere_is_refused(&s, &builder, &app.reference);

    // A second daemon pulls it through berth (logged in: team/* is not anonymous) and runs it.
    let puller = timed("dockerd (puller)", || Dockerd::start_with(insecure(&host)));
    let err = puller
        .pull(&app.reference)
        .expect_err("an anonymous pull of team/app");
    assert!(
        err.contains("unauthorized") || err.contains("denied"),
        "{err}"
    );
    docker_login(&puller, &host, "ci", CI_PASS);
    timed("docker pull (second dockerd)", || {
        puller.pull(&app.reference)
    })
    .unwrap_or_else(|e| panic!("docker pull on the second dockerd: {e}"));
    let inspect = |format: &str| puller.inspect(&app.reference, format).expect("inspect");
    assert_eq!(
        inspect("{{index .RepoDigests 0}}"),
        format!("{host}/team/app@{digest}")
    );
    assert_eq!(inspect("{{len .RootFS.Layers}}"), "4");
    let out = timed("docker run", || {
        puller.docker(&["run", "--rm", "--network", "none", &app.reference])
    })
    .unwrap_or_else(|e| panic!("docker run: {e}"));
    assert_eq!(out, app.expected_output());

    // dockerd resolves the tag with HEAD (no event), then GETs the manifest and blobs by digest.
    let e = check_event(&s, "pull", "local/team/app", &digest, None, "GET", "ci");
    let url = e["target"]["url"].as_str().unwrap_or_default();
    assert!(
        url.ends_with(&format!("/v2/team/app/manifests/{digest}")),
        "{e}"
    );
    let layer = manifest["layers"][3]["digest"]
        .as_str()
        .expect("layer digest");
    let e = check_event(&s, "pull", "local/team/app", layer, None, "GET", "ci");
    let url = e["target"]["url"].as_str().unwrap_or_default();
    assert!(url.ends_with(&format!("/v2/team/app/blobs/{layer}")), "{e}");
    s.assert_no_errors();
}

fn docker_push(docker: &Dockerd, reference: &str) -> Result<String, String> {
    docker.docker_with_timeout(&["push", reference], PUSH_TIMEOUT)
}

/// `docker push` before login is refused; after `docker login` as ci it is stored (four
/// layers) and notified. Returns the manifest's digest and the manifest.
fn docker_push_as_ci(s: &Site, docker: &Dockerd, reference: &str) -> (String, serde_json::Value) {
    let err = docker_push(docker, reference).expect_err("an anonymous docker push must fail");
    // An anonymous token carries no push, so berth's challenge says insufficient_scope, which
    // docker reports as Docker Hub's "requested access to the resource is denied".
    assert!(
        err.contains("unauthorized")
            || err.contains("no basic auth credentials")
            || err.contains("requested access to the resource is denied"),
        "anonymous docker push: {err}"
    );
    assert_eq!(s.manifest("local/team/app", "v1").status, 404);

    docker_login(docker, &s.berth.host(), "ci", CI_PASS);
    let out = timed("docker push", || docker_push(docker, reference))
        .unwrap_or_else(|e| panic!("docker push as ci: {e}\n{}", s.berth.logs()));
    let digest = pushed_digest(&out);
    let stored = s.manifest("local/team/app", "v1");
    assert_eq!(stored.status, 200, "{}", stored.text());
    assert_eq!(digest_of(&stored.body), digest);
    let manifest = json(&stored.text());
    let layers = manifest["layers"].as_array().map(Vec::len);
    assert_eq!(layers, Some(4), "{manifest}");
    let e = check_event(
        s,
        "push",
        "local/team/app",
        &digest,
        Some("v1"),
        "PUT",
        "ci",
    );
    assert_eq!(e["target"]["mediaType"], DOCKER_MANIFEST, "{e}");
    (digest, manifest)
}

/// ci, logged in, may push local/team/* only: `local/other/x` is refused and not stored.
fn docker_push_elsewhere_is_refused(s: &Site, docker: &Dockerd, reference: &str) {
    let elsewhere = format!("{}/local/other/x:v1", s.berth.host());
    docker
        .docker(&["tag", reference, &elsewhere])
        .expect("docker tag");
    let err = docker_push(docker, &elsewhere).expect_err("ci must not push local/other/x");
    assert!(
        err.contains("denied") || err.contains("unauthorized"),
        "docker push local/other/x as ci: {err}"
    );
    assert_eq!(s.manifest("local/other/x", "v1").status, 404);
}

/// Pushed again, every layer is found there (HEAD); pushed to another repository of ci's, every
/// layer is mounted from team/app (`POST ?mount=&from=`), no byte uploaded again.
fn docker_push_again_and_mount(s: &Site, docker: &Dockerd, reference: &str) {
    let out = docker_push(docker, reference).expect("docker push again");
    assert_eq!(out.matches("Layer already exists").count(), 4, "{out}");
    let copy = format!("{}/team/copy:v1", s.berth.host());
    docker
        .docker(&["tag", reference, &copy])
        .expect("docker tag");
    let out = docker_push(docker, &copy).expect("docker push team/copy");
    assert_eq!(out.matches("Mounted from team/app").count(), 4, "{out}");
    let (a, b) = (
        s.manifest("local/team/app", "v1"),
        s.manifest("local/team/copy", "v1"),
    );
    assert_eq!((b.status, digest_of(&b.body)), (200, digest_of(&a.body)));
}

#[test]
fn anonymous_push_is_challenged_and_ci_stays_inside_its_repositories() {
    let s = Site::start(true);
    let base = s.berth.url();
    let ci = ("ci", CI_PASS);
    // Anonymous: 401 with a challenge whose scope names push, for every way to start a push.
    let blob = random_bytes(4096);
    let digest = digest_of(&blob);
    for name in ["team/app", "local/team/app"] {
        for (method, path, body) in [
            ("POST", format!("/v2/{name}/blobs/uploads/"), Vec::new()),
            (
                "POST",
                format!("/v2/{name}/blobs/uploads/?digest={digest}"),
                blob.clone(),
            ),
            ("PUT", format!("/v2/{name}/manifests/v1"), b"{}".to_vec()),
        ] {
            let r = request(method, &format!("{base}{path}"), None, &[], body);
            assert_eq!(r.status, 401, "anonymous {method} {path}: {}", r.text());
            assert_eq!(r.error_code(), "UNAUTHORIZED");
            let challenge = r.header("www-authenticate").unwrap_or_default();
            assert!(challenge.starts_with("Bearer realm="), "{challenge}");
            assert!(
                challenge.contains(&format!("scope=\"repository:{name}:pull,push\"")),
                "anonymous {method} {path}: challenge {challenge}"
            );
        }
    }
    assert_eq!(
        s.blob_status(("admin", ADMIN_PASS), "local/team/app", &digest),
        404
    );

    // ci may push local/team/*: a monolithic blob upload is created.
    let r = request(
        "POST",
        &format!("{base}/v2/team/src/blobs/uploads/?digest={digest}"),
        Some(ci),
        &[("content-type", "application/octet-stream")],
        blob.clone(),
    );
    assert_eq!(r.status, 201, "ci pushes team/src: {}", r.text());

    // ... and nowhere else: another hosted repository is DENIED; a mirrored one takes no push.
    for (name, status, code) in [
        ("local/other/x", 403, "DENIED"),
        ("other/x", 405, "UNSUPPORTED"),
        ("library/app", 405, "UNSUPPORTED"),
    ] {
        let url = format!("{base}/v2/{name}/blobs/uploads/?digest={digest}");
        let r = request("POST", &url, Some(ci), &[], blob.clone());
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (status, code),
            "ci POST {name}: {}",
            r.text()
        );
        assert_ne!(
            s.blob_status(("admin", ADMIN_PASS), name, &digest),
            200,
            "{name}"
        );
    }
    assert_token_lacks_push(&base, ci, "local/other/x");

    mount_only_from_pullable(&s, &digest);
    s.assert_no_errors();
}

/// ci's mount into team/app from a repository it cannot pull is no mount (a plain upload
/// session instead, as the spec says); from one it can pull, holding `digest`, it is made.
fn mount_only_from_pullable(s: &Site, digest: &str) {
    let base = s.berth.url();
    let ci = ("ci", CI_PASS);
    // Mount: from a repository ci cannot pull, no mount (a plain upload session instead).
    let secret = random_bytes(2048);
    let secret_digest = block_on(
        Pusher::new(&base, Some(("admin", ADMIN_PASS))).push_blob("local/other/secret", &secret),
    );
    let mount = |from: &str, d: &str| {
        let url = format!("{base}/v2/team/app/blobs/uploads/?mount={d}&from={from}");
        request("POST", &url, Some(ci), &[], Vec::new())
    };
    let r = mount("local/other/secret", &secret_digest);
    assert_eq!(r.status, 202, "mount from local/other/secret: {}", r.text());
    assert!(
        r.header("location")
            .is_some_and(|l| l.contains("/blobs/uploads/"))
    );
    assert_eq!(s.blob_status(ci, "team/app", &secret_digest), 404);
    assert_eq!(
        s.blob_status(("admin", ADMIN_PASS), "local/team/app", &secret_digest),
        404
    );
    // From its own repository, the mount is made (the refusal above is not a mount that
    // never works).
    let r = mount("local/team/src", digest);
    assert_eq!(r.status, 201, "mount from local/team/src: {}", r.text());
    assert_eq!(s.blob_status(ci, "team/app", digest), 200);
}

/// A token `ci` gets for `repository:<name>:pull,push` does not let it push there.
fn assert_token_lacks_push(base: &str, ci: (&str, &str), name: &str) {
    let scope = format!("repository:{name}:pull,push");
    let url = format!(
        "{base}/token?service=berth&scope={}",
        scope.replace(':', "%3A")
    );
    let r = request("GET", &url, Some(ci), &[], Vec::new());
    assert_eq!(r.status, 200, "token: {}", r.text());
    let token = json(&r.text())["token"].as_str().expect("token").to_owned();
    // The token's claims grant no push on it (berth leaves out what the rules do not allow).
    use base64::Engine as _;
    let claims = token.split('.').nth(1).expect("a JWT");
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .expect("JWT claims are base64url");
    let claims: serde_json::Value = serde_json::from_slice(&claims).expect("JWT claims JSON");
    assert_eq!(claims["sub"], ci.0, "{claims}");
    let granted = claims["access"].as_array().cloned().unwrap_or_default();
    assert!(
        granted.iter().all(|a| a["actions"]
            .as_array()
            .is_none_or(|x| !x.iter().any(|x| x == "push"))),
        "{claims}"
    );
    let bearer = format!("Bearer {token}");
    let r = request(
        "POST",
        &format!("{base}/v2/{name}/blobs/uploads/"),
        None,
        &[("authorization", &bearer)],
        Vec::new(),
    );
    assert_eq!(r.status, 401, "bearer POST {name}: {}", r.text());
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains(&format!("scope=\"{scope}\"")),
        "{challenge}"
    );
}

#[test]
fn podman_builds_pushes_and_pulls_back() {
    let s = Site::start(true);
    let host = s.berth.host();
    let podman = Podman::new();
    let login = podman.podman(&[
        "login",
        "--tls-verify=false",
        &host,
        "-u",
        "ci",
        "-p",
        CI_PASS,
    ]);
    login.unwrap_or_else(|e| panic!("podman login: {e}"));
    let ctx = s.work().join("podman-build");
    std::fs::create_dir_all(&ctx).expect("mkdir context");
    let (one, two) = (random_bytes(64 << 10), random_bytes(32 << 10));
    std::fs::write(ctx.join("one.bin"), &one).expect("write one.bin");
    std::fs::write(ctx.join("two.bin"), &two).expect("write two.bin");
    std::fs::write(
        ctx.join("Containerfile"),
        "FROM scratch\nCOPY one.bin /one.bin\nCOPY two.bin /data/two.bin\n",
    )
    .expect("write Containerfile");
    let reference = format!("{host}/team/podapp:v1");
    let ctx_arg = ctx.to_string_lossy().into_owned();
    timed("podman build", || {
        podman.podman_with_timeout(&["build", "-t", &reference, &ctx_arg], PUSH_TIMEOUT)
    })
    .unwrap_or_else(|e| panic!("podman build: {e}"));
    let digest_file = s.work().join("podman.digest");
    let digest_arg = digest_file.to_string_lossy().into_owned();
    timed("podman push", || {
        podman.podman_with_timeout(
            &[
                "push",
                "--tls-verify=false",
                "--digestfile",
                &digest_arg,
                &reference,
            ],
            PUSH_TIMEOUT,
        )
    })
    .unwrap_or_else(|e| panic!("podman push: {e}\n{}", s.berth.logs()));
    let digest = std::fs::read_to_string(&digest_file).expect("digest file");
    let stored = s.manifest("local/team/podapp", "v1");
    assert_eq!(stored.status, 200, "{}", stored.text());
    assert_eq!(digest_of(&stored.body), digest.trim());
    let manifest = json(&stored.text());
    let layers = manifest["layers"].as_array().expect("layers").clone();
    assert_eq!(layers.len(), 2, "{manifest}");
    check_event(
        &s,
        "push",
        "local/team/podapp",
        digest.trim(),
        Some("v1"),
        "PUT",
        "ci",
    );

    // Removed locally, pulled back from berth: the same manifest digest, the same layers.
    podman.podman(&["rmi", &reference]).expect("podman rmi");
    timed("podman pull", || {
        podman.pull_with(&["--tls-verify=false"], &reference)
    })
    .unwrap_or_else(|e| panic!("podman pull: {e}"));
    assert_eq!(
        podman.inspect(&reference, "{{.Digest}}").expect("inspect"),
        digest.trim()
    );
    // containers/image GETs the manifest by tag.
    check_event(
        &s,
        "pull",
        "local/team/podapp",
        digest.trim(),
        Some("v1"),
        "GET",
        "ci",
    );
    for layer in &layers {
        let d = layer["digest"].as_str().expect("layer digest");
        assert_eq!(s.blob_status(("ci", CI_PASS), "team/podapp", d), 200, "{d}");
    }
    s.assert_no_errors();
}

#[test]
fn skopeo_copies_a_multi_arch_index_into_hosted_and_back() {
    let s = Site::start(true);
    let index = seed_index(&s.upstream, "library/multi", "v1");
    let skopeo = |line: String| {
        let dir = s.work().join("skopeo");
        std::fs::create_dir_all(&dir).expect("mkdir skopeo dir");
        skopeo_isolated(&dir, &line.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("skopeo {line}: {e}\n{}", s.berth.logs()))
    };
    let dest = format!("docker://{}/local/team/multi:v1", s.berth.host());
    let creds = format!("ci:{CI_PASS}");
    let copy = "copy --all --insecure-policy --preserve-digests";
    let from = format!("docker://{}/library/multi:v1", s.upstream.host());
    timed("skopeo copy --all into berth", || {
        skopeo(format!(
            "{copy} --src-tls-verify=false --dest-tls-verify=false --dest-creds {creds} {from} {dest}"
        ))
    });

    // The index and each image by digest, byte for byte.
    let stored = s.manifest("local/team/multi", "v1");
    assert_eq!(stored.status, 200, "{}", stored.text());
    assert!(stored.body == index.bytes, "index bytes: {}", stored.text());
    let inspect =
        |args: String| skopeo(format!("inspect --tls-verify=false --creds {creds} {args}"));
    assert_eq!(inspect(format!("--raw {dest}")).into_bytes(), index.bytes);
    for img in &index.images {
        let by_digest = format!(
            "docker://{}/local/team/multi@{}",
            s.berth.host(),
            img.manifest_digest
        );
        assert_eq!(
            inspect(format!("--raw {by_digest}")).into_bytes(),
            img.manifest
        );
        // Resolved through the index to this platform's image and its config (no spaces in
        // the format: the line is split on them).
        let arch = &img.architecture;
        let shown = inspect(format!(
            "--override-arch {arch} --format {{{{.Digest}}}}/{{{{.Architecture}}}} {dest}"
        ));
        assert_eq!(shown.trim(), format!("{}/{arch}", index.digest));
    }

    // Copied back out whole: every blob as seeded.
    let out = s.work().join("multi-oci");
    skopeo(format!(
        "{copy} --src-tls-verify=false --src-creds {creds} {dest} oci:{}:v1",
        out.display()
    ));
    for img in &index.images {
        for (d, bytes) in img.blobs() {
            let path = out
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"));
            let copied = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(copied == bytes, "blob {d} differs");
        }
    }
    let oci_index = json(&std::fs::read_to_string(out.join("index.json")).expect("index.json"));
    let top = &oci_index["manifests"][0]["digest"];
    assert_eq!(top, index.digest.as_str(), "{oci_index}");
    let e = check_event(
        &s,
        "push",
        "local/team/multi",
        &index.digest,
        Some("v1"),
        "PUT",
        "ci",
    );
    assert_eq!(e["target"]["mediaType"], OCI_INDEX, "{e}");

    s.assert_no_errors();
}

/// `skopeo delete` asks for a token with `repository:<name>:*` (every action), resolves the
/// tag, then DELETEs the manifest by digest (`delete = true`): gone by tag and digest, notified.
#[test]
fn skopeo_deletes_a_pushed_image() {
    let s = Site::start(true);
    let files = vec![vec![("gone.txt".to_owned(), random_bytes(512))]];
    let image = build_image("team/gone", "v1", Format::Oci, "amd64", files);
    block_on(Pusher::new(&s.berth.url(), Some(("ci", CI_PASS))).push_image(&image, "v1"));
    assert_eq!(s.manifest("local/team/gone", "v1").status, 200);
    let dir = s.work().join("skopeo");
    std::fs::create_dir_all(&dir).expect("mkdir skopeo dir");
    let creds = format!("ci:{CI_PASS}");
    let dest = format!("docker://{}/team/gone:v1", s.berth.host());
    skopeo_isolated(
        &dir,
        &["delete", "--tls-verify=false", "--creds", &creds, &dest],
    )
    .unwrap_or_else(|e| panic!("skopeo delete: {e}"));
    assert_eq!(s.manifest("local/team/gone", "v1").status, 404);
    assert_eq!(
        s.manifest("local/team/gone", &image.manifest_digest).status,
        404
    );
    let repo = "local/team/gone";
    check_event(
        &s,
        "delete",
        repo,
        &image.manifest_digest,
        None,
        "DELETE",
        "ci",
    );
    s.assert_no_errors();
}

/// helm v4 as tests/chart.sh finds it: `${XDG_CACHE_HOME:-$HOME/.cache}/berth-test/bin/helm`,
/// else a helm v4 on PATH (tests/setup.sh installs it).
fn helm_program() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_default();
    let is_v4 = |p: &Path| {
        run(
            Command::new(p).args(["version", "--short"]),
            Duration::from_secs(20),
        )
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with("v4."))
    };
    let cached = cache.join("berth-test/bin/helm");
    if is_v4(&cached) {
        return cached;
    }
    match find_program("helm") {
        Some(p) if is_v4(&p) => p,
        _ => panic!(
            "helm v4 not found at {} nor on PATH: run tests/setup.sh",
            cached.display()
        ),
    }
}

/// `helm ARGS` (split on whitespace) in `work`, with helm's cache, config and data dirs there
/// and no proxy but a dead one; its stdout, or a panic with its output.
fn helm_in(work: &Path, args: &str) -> String {
    let mut cmd = Command::new(helm_program());
    use_dead_proxy(&mut cmd, &["HELM_REGISTRY_CONFIG", "KUBECONFIG"]);
    for (var, sub) in [
        ("HELM_CACHE_HOME", "helm/cache"),
        ("HELM_CONFIG_HOME", "helm/config"),
        ("HELM_DATA_HOME", "helm/data"),
    ] {
        cmd.env(var, work.join(sub));
    }
    cmd.current_dir(work).args(args.split_whitespace());
    run(&mut cmd, PUSH_TIMEOUT)
        .and_then(CmdOutput::into_result)
        .unwrap_or_else(|e| panic!("helm {args}: {e}"))
}

#[test]
fn helm_pushes_and_pulls_a_chart_as_an_oci_artifact() {
    let s = Site::start(true);
    let work = s.work();
    let helm = |args: String| helm_in(work, &args);
    helm("create berthchart".into());
    helm("package berthchart -d pkg".into());
    let tgz = std::fs::read(work.join("pkg/berthchart-0.1.0.tgz")).expect("packaged chart");
    let host = s.berth.host();
    helm(format!(
        "registry login {host} --plain-http -u ci -p {CI_PASS}"
    ));
    let out = timed("helm push", || {
        helm(format!(
            "push pkg/berthchart-0.1.0.tgz oci://{host}/team --plain-http"
        ))
    });

    // Stored as helm's OCI artifact: its config, one layer: the .tgz itself.
    let stored = s.manifest("local/team/berthchart", "0.1.0");
    assert_eq!(stored.status, 200, "{}", stored.text());
    let manifest = json(&stored.text());
    let config_type = &manifest["config"]["mediaType"];
    assert_eq!(config_type, "application/vnd.cncf.helm.config.v1+json");
    let layer = &manifest["layers"][0];
    let layer_type = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";
    assert_eq!(layer["mediaType"], layer_type, "{manifest}");
    assert_eq!(layer["digest"], digest_of(&tgz).as_str(), "{manifest}");
    let digest = digest_of(&stored.body);
    let repo = "local/team/berthchart";
    check_event(&s, "push", repo, &digest, Some("0.1.0"), "PUT", "ci");
    assert!(
        out.contains(&format!("Digest: {digest}")),
        "helm push: {out}"
    );

    let chart = format!("oci://{host}/team/berthchart");
    std::fs::create_dir_all(work.join("pulled")).expect("mkdir pulled");
    timed("helm pull", || {
        helm(format!(
            "pull {chart} --version 0.1.0 --plain-http -d pulled"
        ))
    });
    let pulled = std::fs::read(work.join("pulled/berthchart-0.1.0.tgz")).expect("pulled chart");
    assert!(
        pulled == tgz,
        "the pulled chart differs from the pushed .tgz"
    );
    // From berth, not from a helm cache: the chart's layer was fetched by ci.
    check_event(&s, "pull", repo, &digest_of(&tgz), None, "GET", "ci");
    let shown = helm(format!("show chart {chart} --version 0.1.0 --plain-http"));
    assert!(shown.contains("name: berthchart"), "{shown}");
    s.assert_no_errors();
}

#[test]
fn one_dockerd_gets_hosted_team_app_and_mirrored_library_alpine() {
    let s = Site::start(false);
    let alpine = seed_image(&s.upstream, "library/alpine", "latest", 2);
    // A decoy upstream: if berth ever asked it for team/app, dockerd would get this one.
    let decoy = seed_image(&s.upstream, "team/app", "v1", 1);
    // team/app:v1 pushed to berth as a registry client would, naming no registry: hosted.
    let files = vec![
        vec![(
            "team/hosted.txt".to_owned(),
            b"served by the hosted registry\n".to_vec(),
        )],
        vec![("team/payload.bin".to_owned(), random_bytes(100 << 10))],
    ];
    let app = build_image("team/app", "v1", Format::Docker, "amd64", files);
    block_on(Pusher::new(&s.berth.url(), None).push_image(&app, "v1"));
    let docker = timed("dockerd (mirror: berth)", || Dockerd::start(&s.berth.url()));

    timed("docker pull team/app:v1", || docker.pull("team/app:v1"))
        .unwrap_or_else(|e| panic!("docker pull team/app:v1 via the mirror: {e}"));
    assert_eq!(
        docker
            .inspect("team/app:v1", "{{index .RepoDigests 0}}")
            .expect("inspect"),
        format!("team/app@{}", app.manifest_digest)
    );
    for (path, bytes) in app.layers.iter().flat_map(|l| &l.files) {
        assert_eq!(
            &docker
                .read_file("team/app:v1", &format!("/{path}"))
                .expect("read"),
            bytes
        );
    }
    assert_ne!(app.manifest_digest, decoy.manifest_digest);

    timed("docker pull library/alpine", || docker.pull("alpine"))
        .unwrap_or_else(|e| panic!("docker pull alpine via the mirror: {e}"));
    let file = &alpine.layers[1].files[0];
    assert_eq!(
        docker
            .read_file("alpine", &format!("/{}", file.0))
            .expect("read"),
        file.1
    );
    for (d, _) in alpine.blobs() {
        assert_eq!(
            s.upstream.blob_gets("library/alpine", d),
            1,
            "upstream GETs of {d}"
        );
    }
    // A team/* name hosted does not have is not looked for upstream either.
    assert!(docker.pull("team/absent:v1").is_err());

    let team_upstream: Vec<AccessEntry> = s
        .upstream
        .access_log()
        .into_iter()
        .filter(|e| !e.user_agent.contains("berth-tests"))
        .filter(|e| e.path.contains("/team/"))
        .collect();
    assert!(
        team_upstream.is_empty(),
        "team/* requests sent upstream: {team_upstream:?}"
    );
    let berth_upstream = s
        .upstream
        .access_log()
        .iter()
        .filter(|e| {
            !e.user_agent.contains("berth-tests") && e.path.starts_with("/v2/library/alpine/")
        })
        .count();
    assert!(berth_upstream >= 3, "berth fetched alpine from upstream");
    // The mirrored pull is notified too (anonymous: no actor).
    check_mirrored_pull_event(&s, &alpine);
    s.assert_no_errors();
}

/// berth notified the pull of the mirrored `library/alpine` manifest.
fn check_mirrored_pull_event(s: &Site, alpine: &Image) {
    let (delivery, e) = s
        .hook
        .wait_event("webhook pull of library/alpine", HOOK_TIMEOUT, |e| {
            e["action"] == "pull" && e["target"]["digest"] == alpine.manifest_digest.as_str()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(delivery.header("content-type"), Some(EVENTS_MEDIA_TYPE));
    assert_eq!(e["target"]["repository"], "docker.io/library/alpine", "{e}");
    assert_eq!(e["request"]["method"], "GET", "{e}");
}
