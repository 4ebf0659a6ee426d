//! End to end with `[auth]`: real clients (dockerd, the docker CLI, skopeo, curl) against the
//! berth binary that authenticates them (token protocol, htpasswd, rules), in front of two
//! Debian `docker-registry` upstreams: an open one standing in for docker.io (the default
//! registry) and one that itself requires HTTP Basic auth, reached by berth with its own
//! credentials as `private.example`.
//!
//! Users (berth's htpasswd): `ci` may pull everything, `bob` is a valid user no rule allows,
//! anonymous may pull `docker.io/library/*`.
//!
//! Clients talk to berth through a [`Recorder`], so the tests also pin down what each client
//! sends (paths, and the scheme of its `Authorization` header). The real docker.io is
//! unreachable: dockerd and skopeo run with `HTTP(S)_PROXY` at a closed loopback port, curl
//! with `--noproxy '*'`. The programs are installed by tests/setup.sh; a missing one fails the
//! test.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

const CI_PASS: &str = "ci-pass-Qx7";
const BOB_PASS: &str = "bob-pass-Lk3";
const UPSTREAM_USER: &str = "upstream-user";
const UPSTREAM_PASS: &str = "upstream-pass-Zr9";
/// How long one curl may take.
const CURL_TIMEOUT: Duration = Duration::from_secs(20);

/// Both upstreams, one image on each, and berth with `[auth]` in front of them.
struct Setup {
    /// Stands in for docker.io: open, no auth.
    public: Registry,
    /// `private.example`: Basic auth (`upstream-user`), which berth logs in to.
    private: Registry,
    /// `library/app:v1` on `public`.
    app: Image,
    /// `team/app:v1` on `private`.
    team: Image,
    berth: Berth,
    /// htpasswd, the upstream password file, client work files.
    dir: tempfile::TempDir,
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

fn setup() -> Setup {
    for program in ["curl", "htpasswd", "docker-registry"] {
        require_program(program);
    }
    let public = Registry::start();
    let private = Registry::start_with_htpasswd(UPSTREAM_USER, UPSTREAM_PASS);
    let app = seed_image(&public, "library/app", "v1", 2);
    let team = seed_image(&private, "team/app", "v1", 2);
    let dir = tempfile::Builder::new()
        .prefix("e2e-auth-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!(
            "{}\n{}\n",
            htpasswd_line("ci", CI_PASS),
            htpasswd_line("bob", BOB_PASS)
        ),
    )
    .expect("write htpasswd");
    let password_file = dir.path().join("upstream-password");
    std::fs::write(&password_file, format!("{UPSTREAM_PASS}\n")).expect("write password file");
    let registries = [
        ("docker.io", public.url(), true),
        ("private.example", private.url(), false),
    ];
    let registries: Vec<(&str, &str, bool)> = registries
        .iter()
        .map(|(n, u, d)| (*n, u.as_str(), *d))
        .collect();
    // The last [[registry]] table is private.example's: its credentials follow it.
    let config = format!(
        r#"{registries}username = "{UPSTREAM_USER}"
password_file = "{password}"

[auth]
htpasswd = "{htpasswd}"

[[auth.rule]]
users = ["anonymous"]
allow = ["docker.io/library/*"]

[[auth.rule]]
users = ["ci"]
allow = ["*"]
"#,
        registries = berth_multi_config(&registries, &dir.path().join("cache")),
        htpasswd = htpasswd.display(),
        password = password_file.display(),
    );
    let berth = Berth::start(&config);
    Setup {
        public,
        private,
        app,
        team,
        berth,
        dir,
    }
}

impl Setup {
    /// berth logged no error (warnings are expected: refused requests are logged).
    fn assert_berth_no_errors(&self) {
        let logs = self.berth.logs();
        let errors: Vec<&str> = logs.lines().filter(|l| l.contains(" ERROR ")).collect();
        assert!(errors.is_empty(), "berth errors:\n{}", errors.join("\n"));
    }

    /// Requests berth made to the private upstream, other than `/v2/` (probes, login), i.e.
    /// not the test's own seeding.
    fn private_api_requests(&self) -> Vec<AccessEntry> {
        self.private
            .access_log()
            .into_iter()
            .filter(|e| !e.user_agent.contains("berth-tests"))
            .filter(|e| e.path != "/v2/" && e.path != "/v2")
            .collect()
    }
}

/// What a client sent, one request a line: method, URI, and the *scheme* of its
/// `Authorization` header (never the credentials).
fn auth_summary(rec: &Recorder) -> String {
    rec.requests()
        .iter()
        .map(|r| {
            let auth = r
                .header("authorization")
                .map(|v| v.split(' ').next().unwrap_or("?").to_owned())
                .unwrap_or_else(|| "-".into());
            format!("{} {} authorization={auth}", r.method, r.uri)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `Authorization` scheme of each recorded request whose path is `path`.
fn auth_schemes(rec: &Recorder, path: &str) -> Vec<Option<String>> {
    rec.requests()
        .iter()
        .filter(|r| r.path == path)
        .map(|r| {
            r.header("authorization")
                .map(|v| v.split(' ').next().unwrap_or("").to_owned())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// curl

/// One curl exchange.
#[derive(Debug)]
struct Http {
    /// curl's exit code (28: timed out).
    exit: i32,
    /// 0 if no response head arrived.
    status: u16,
    /// Response header block, as curl wrote it.
    headers: String,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `errors[0].code` of a registry error body.
    fn error_code(&self) -> String {
        json(&self.text())["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

static CURL_SEQ: AtomicUsize = AtomicUsize::new(0);

/// `curl ARGS URL` (no proxy, `--max-time 15` unless `args` gives another): status, headers
/// and body, whatever curl's exit code. `args` may add `-u`, `-H`, `-I` (HEAD), `-r` (Range).
fn curl_any(work: &Path, args: &[&str], url: &str) -> Http {
    let n = CURL_SEQ.fetch_add(1, Ordering::SeqCst);
    let (head, body) = (
        work.join(format!("curl-{n}.head")),
        work.join(format!("curl-{n}.body")),
    );
    let mut cmd = Command::new(require_program("curl"));
    cmd.args([
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "15",
        "-w",
        "%{http_code}",
    ])
    .arg("-D")
    .arg(&head)
    .arg("-o")
    .arg(&body)
    .args(args)
    .arg(url);
    let out = run(&mut cmd, CURL_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let http = Http {
        exit: out.status.code().unwrap_or(-1),
        status: out.stdout.trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&head).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
    };
    let _ = (std::fs::remove_file(&head), std::fs::remove_file(&body));
    http
}

/// [`curl_any`] that must complete (exit 0).
fn curl(work: &Path, args: &[&str], url: &str) -> Http {
    let r = curl_any(work, args, url);
    assert_eq!(r.exit, 0, "curl {args:?} {url} failed: {r:?}");
    r
}

fn user_args(user: Option<(&str, &str)>) -> Vec<String> {
    match user {
        Some((u, p)) => vec!["-u".into(), format!("{u}:{p}")],
        None => vec![],
    }
}

fn base64_encode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A token from berth's `/token` for `scope`, as `user` (None: anonymous).
fn token(work: &Path, base: &str, user: Option<(&str, &str)>, scope: &str) -> String {
    let mut args = user_args(user);
    args.push("-G".into());
    args.extend(["--data-urlencode".into(), "service=berth".into()]);
    args.extend(["--data-urlencode".into(), format!("scope={scope}")]);
    let r = curl(work, &strs(&args), &format!("{base}/token"));
    assert_eq!(r.status, 200, "token for {user:?} {scope}: {}", r.text());
    let v = json(&r.text());
    v["token"].as_str().expect("token in answer").to_owned()
}

/// Whether `haystack` contains `needle` (or, for a long needle, its first 64 bytes).
fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    let needle = &needle[..needle.len().min(64)];
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// No leak through another repository name

/// After the private image's blobs are in berth's cache: asking for them under a repository
/// of the public registry (or with `?ns=` pointing elsewhere) never returns their bytes, for
/// anonymous, bob and even ci; and the private upstream is never asked on those requests'
/// behalf.
fn assert_no_leak(s: &Setup, work: &Path) {
    let base = s.berth.url();
    let private_before = s.private_api_requests().len();
    let anon_token = token(work, &base, None, "repository:library/app:pull");
    let bearer = format!("Authorization: Bearer {anon_token}");
    let checked = probe_private_blobs_under_other_names(s, work, &bearer)
        + probe_private_manifests_tags_and_catalog(s, work, &bearer);
    eprintln!("[leak] {checked} requests for private content under other names: none served");
    ci_gets_the_private_blobs_from_the_cache(s, work);

    // The private upstream was asked nothing on behalf of these requests.
    let after = s.private_api_requests();
    assert_eq!(
        after[private_before..].to_vec(),
        vec![],
        "private upstream asked during the leak probes"
    );
    // And never at all for a repository other than team/app.
    let strays: Vec<&AccessEntry> = after
        .iter()
        .filter(|e| !e.path.starts_with("/v2/team/app/"))
        .collect();
    assert!(strays.is_empty(), "private upstream got {strays:?}");
}

/// Each private blob under public repository names (and `?ns=`), for anonymous, bob and
/// ci, whole, ranged and HEAD, and with an anonymous token for library/app: never its bytes.
/// Returns how many requests were made.
fn probe_private_blobs_under_other_names(s: &Setup, work: &Path, bearer: &str) -> usize {
    let base = s.berth.url();
    let mut checked = 0;
    for (digest, bytes) in s.team.blobs() {
        for user in [None, Some(("bob", BOB_PASS)), Some(("ci", CI_PASS))] {
            let who = user.map_or("anonymous", |u| u.0);
            let mut attempts: Vec<(String, Vec<String>)> = Vec::new();
            for path in [
                format!("/v2/library/app/blobs/{digest}"),
                format!("/v2/library/no-such-repo/blobs/{digest}"),
                format!("/v2/docker.io/library/app/blobs/{digest}"),
                format!("/v2/library/app/blobs/{digest}?ns=docker.io"),
            ] {
                for extra in [
                    vec![],
                    vec!["-r".to_owned(), "0-9".to_owned()],
                    vec!["-I".to_owned()],
                ] {
                    let mut args = user_args(user);
                    args.extend(extra);
                    attempts.push((path.clone(), args));
                }
            }
            // ?ns=private.example names the private registry: refused before any upstream
            // contact for those without the right (ci may ask, and gets 404 from upstream).
            if user.is_none_or(|u| u.0 != "ci") {
                attempts.push((
                    format!("/v2/library/app/blobs/{digest}?ns=private.example"),
                    user_args(user),
                ));
            }
            for (path, args) in attempts {
                let r = curl(work, &strs(&args), &format!("{base}{path}"));
                checked += 1;
                let expected: &[u16] = match who {
                    // `?ns=private.example` is not allowed: 401 anonymously, 403 for bob.
                    "anonymous" if path.contains("ns=private.example") => &[401],
                    "bob" if path.contains("ns=private.example") => &[403],
                    // Everyone may pull docker.io/library/* (what anonymous may, logged-in
                    // users may too), but the blob is not in that repository: 404.
                    _ => &[404],
                };
                assert!(
                    expected.contains(&r.status),
                    "{who} GET {path} {args:?}: expected {expected:?}, got {} {:?}\n{}",
                    r.status,
                    r.text(),
                    r.headers
                );
                assert!(
                    !contains_bytes(&r.body, bytes),
                    "{who} GET {path} {args:?}: the body holds private blob {digest}"
                );
                if r.status == 404 && !args.contains(&"-I".to_owned()) {
                    assert_eq!(r.error_code(), "BLOB_UNKNOWN", "{who} {path}: {}", r.text());
                }
            }
        }
        // An anonymous token for library/app does not reach the private blob either.
        let r = curl(
            work,
            &["-H", bearer],
            &format!("{base}/v2/library/app/blobs/{digest}"),
        );
        checked += 1;
        assert_eq!(r.status, 404, "anonymous bearer: {}", r.text());
        assert!(!contains_bytes(&r.body, bytes));
    }
    checked
}

/// Private manifests under public names, the private repository's tags, and the private
/// registry's catalog, for those without the right: none served or listed. Returns how many
/// requests were made.
fn probe_private_manifests_tags_and_catalog(s: &Setup, work: &Path, bearer: &str) -> usize {
    let base = s.berth.url();
    let mut checked = 0;
    // Private manifests under public names (manifests are cached per repository).
    for (who, args) in [
        ("anonymous", vec![]),
        ("ci", vec!["-u".to_owned(), format!("ci:{CI_PASS}")]),
    ] {
        for path in [
            format!("/v2/library/app/manifests/{}", s.team.manifest_digest),
            format!("/v2/library/team/manifests/{}", s.team.manifest_digest),
        ] {
            let mut args = args.clone();
            args.extend(["-H".to_owned(), format!("Accept: {DOCKER_MANIFEST}")]);
            let r = curl(work, &strs(&args), &format!("{base}{path}"));
            checked += 1;
            assert_eq!(r.status, 404, "{who} GET {path}: {}", r.text());
            assert!(!contains_bytes(&r.body, &s.team.manifest), "{who} {path}");
        }
    }
    // An anonymous token for library/app, with ?ns= naming the private registry: refused.
    let layer = &s.team.layers[0];
    let r = curl(
        work,
        &["-H", bearer],
        &format!(
            "{base}/v2/library/app/blobs/{}?ns=private.example",
            layer.digest
        ),
    );
    checked += 1;
    assert_eq!(
        r.status,
        401,
        "anonymous bearer with ns=private.example: {}",
        r.text()
    );
    assert!(!contains_bytes(&r.body, &layer.bytes));
    // The private repository's tags and the private registry's catalog.
    for (who, args) in [
        ("anonymous", vec![]),
        ("bob", vec!["-u".to_owned(), format!("bob:{BOB_PASS}")]),
    ] {
        let r = curl(
            work,
            &strs(&args),
            &format!("{base}/v2/private.example/team/app/tags/list"),
        );
        checked += 1;
        assert_eq!(
            r.status,
            if who == "bob" { 403 } else { 401 },
            "{who} tags: {}",
            r.text()
        );
    }
    for (who, auth) in [
        ("anonymous bearer", bearer.to_owned()),
        (
            "bob",
            format!(
                "Authorization: Basic {}",
                base64_encode(&format!("bob:{BOB_PASS}"))
            ),
        ),
    ] {
        let r = curl(
            work,
            &["-H", &auth],
            &format!("{base}/v2/_catalog?ns=private.example"),
        );
        checked += 1;
        assert_eq!(r.status, 200, "{who} catalog: {}", r.text());
        assert!(
            !r.text().contains("team"),
            "{who} catalog lists: {}",
            r.text()
        );
    }
    checked
}

/// Positive control: the blobs are in the cache and ci gets them by their own name without
/// berth asking upstream again; ci's catalog lists team/app.
fn ci_gets_the_private_blobs_from_the_cache(s: &Setup, work: &Path) {
    let base = s.berth.url();
    let gets_before: Vec<usize> = s
        .team
        .blobs()
        .iter()
        .map(|(d, _)| s.private.blob_gets("team/app", d))
        .collect();
    for (digest, bytes) in s.team.blobs() {
        let r = curl(
            work,
            &["-u", &format!("ci:{CI_PASS}")],
            &format!("{base}/v2/private.example/team/app/blobs/{digest}"),
        );
        assert_eq!(r.status, 200, "ci GET own blob {digest}: {}", r.text());
        assert!(r.body == bytes, "ci's blob {digest} bytes");
    }
    let gets_after: Vec<usize> = s
        .team
        .blobs()
        .iter()
        .map(|(d, _)| s.private.blob_gets("team/app", d))
        .collect();
    assert_eq!(gets_before, gets_after, "the private blobs were not cached");
    let r = curl(
        work,
        &["-u", &format!("ci:{CI_PASS}")],
        &format!("{base}/v2/_catalog?ns=private.example"),
    );
    assert!(r.text().contains("team/app"), "ci's catalog: {}", r.text());
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn dockerd_pulls_anonymously_as_mirror_and_privately_after_login() {
    for program in ["dockerd", "containerd", "runc", "docker", "curl"] {
        require_program(program);
    }
    let started = Instant::now();
    let s = timed("upstreams, seeding, berth", setup);
    let rec = Recorder::start(s.berth.addr());
    let docker = timed("dockerd start", || Dockerd::start(&rec.url()));
    let work = s.dir.path();
    // 2. Anonymous pull through berth as the registry mirror: dockerd does the token dance.
    anonymous_mirror_pull(&s, &rec, &docker);

    // 3. docker login to berth as a registry (plain http on loopback: insecure by default).
    let host = rec.host();
    let private_ref = format!("{host}/private.example/team/app:v1");
    login_ci_and_pull_private(&s, &rec, &docker, &host, &private_ref);

    // 6. The private blobs are cached now: no other repository name reaches them.
    timed("leak probes", || assert_no_leak(&s, work));

    logged_out_and_bob_are_refused(&rec, &docker, &host, &private_ref);

    // Nothing reached the private upstream after ci's pull but berth's own (none: cached).
    for (d, _) in s.team.blobs() {
        assert_eq!(
            s.private.blob_gets("team/app", d),
            1,
            "private upstream GETs of {d}"
        );
    }
    s.assert_berth_no_errors();
    eprintln!("[timing] whole test: {:.2?}", started.elapsed());
}

/// dockerd pulls `library/app:v1` through berth as its registry mirror, anonymously: one
/// upstream GET per blob, the image's files intact, the token fetched without credentials
/// and the API calls carrying it; the private upstream is not asked.
fn anonymous_mirror_pull(s: &Setup, rec: &Recorder, docker: &Dockerd) {
    timed("docker pull library/app:v1 (mirror, anonymous)", || {
        docker.pull("library/app:v1")
    })
    .unwrap_or_else(|e| panic!("{e}\nsent:\n{}", auth_summary(rec)));
    for (d, _) in s.app.blobs() {
        assert_eq!(
            s.public.blob_gets("library/app", d),
            1,
            "upstream GETs of {d}"
        );
    }
    let file = &s.app.layers[1].files[0];
    assert_eq!(
        docker
            .read_file("library/app:v1", &format!("/{}", file.0))
            .expect("read a file of the public image"),
        file.1
    );
    eprintln!("dockerd (mirror, anonymous) sent:\n{}", auth_summary(rec));
    // The challenge sent it to /token without credentials; the API calls carried the token.
    let tokens = auth_schemes(rec, "/token");
    assert!(
        !tokens.is_empty(),
        "no /token request:\n{}",
        auth_summary(rec)
    );
    assert!(tokens.iter().all(Option::is_none), "{tokens:?}");
    let manifest = auth_schemes(rec, "/v2/library/app/manifests/v1");
    assert!(
        !manifest.is_empty() && manifest.iter().all(|a| a.as_deref() == Some("Bearer")),
        "manifest requests: {manifest:?}\n{}",
        auth_summary(rec)
    );
    assert_eq!(s.private_api_requests(), vec![], "private upstream");
}

/// `docker login` to berth: refused with a wrong password, accepted for ci (Basic to
/// `/token`); then ci pulls the private image, one private upstream GET per blob, with a
/// token scoped to it.
fn login_ci_and_pull_private(
    s: &Setup,
    rec: &Recorder,
    docker: &Dockerd,
    host: &str,
    private_ref: &str,
) {
    rec.clear();
    let wrong = docker.docker(&["login", host, "-u", "ci", "-p", "not-the-password"]);
    let err = wrong.expect_err("docker login with a wrong password must fail");
    assert!(
        err.contains("unauthorized") || err.contains("invalid credentials"),
        "{err}"
    );
    eprintln!("docker login (wrong password) sent:\n{}", auth_summary(rec));
    rec.clear();
    let ok = timed("docker login ci", || {
        docker.docker(&["login", host, "-u", "ci", "-p", CI_PASS])
    })
    .unwrap_or_else(|e| panic!("docker login ci: {e}\n{}", auth_summary(rec)));
    assert!(ok.contains("Login Succeeded"), "{ok}");
    eprintln!("docker login (ci) sent:\n{}", auth_summary(rec));
    assert!(
        auth_schemes(rec, "/token")
            .iter()
            .any(|a| a.as_deref() == Some("Basic")),
        "login did not send Basic credentials to /token:\n{}",
        auth_summary(rec)
    );

    rec.clear();
    timed("docker pull private.example/team/app:v1 (ci)", || {
        docker.pull(private_ref)
    })
    .unwrap_or_else(|e| panic!("{e}\nsent:\n{}", auth_summary(rec)));
    eprintln!("dockerd (registry, ci) sent:\n{}", auth_summary(rec));
    let file = &s.team.layers[0].files[0];
    assert_eq!(
        docker
            .read_file(private_ref, &format!("/{}", file.0))
            .expect("read a file of the private image"),
        file.1
    );
    for (d, _) in s.team.blobs() {
        assert_eq!(
            s.private.blob_gets("team/app", d),
            1,
            "private upstream GETs of {d}"
        );
    }
    let token_req = rec
        .requests()
        .into_iter()
        .find(|r| r.path == "/token")
        .expect("dockerd asked /token");
    assert_eq!(
        token_req.query_param("scope"),
        Some("repository%3Aprivate.example%2Fteam%2Fapp%3Apull"),
        "{}",
        token_req.uri
    );
}

/// Logged out (anonymous), and logged in as bob (a valid user no rule allows), the pull of
/// the private image fails and leaves no image.
fn logged_out_and_bob_are_refused(rec: &Recorder, docker: &Dockerd, host: &str, private_ref: &str) {
    // Logged out (anonymous): the private pull fails.
    docker.rmi(private_ref).expect("rmi private image");
    docker.docker(&["logout", host]).expect("docker logout");
    rec.clear();
    let err = docker
        .pull(private_ref)
        .expect_err("an anonymous pull of the private image must fail");
    eprintln!(
        "docker pull (anonymous) failed as expected: {}",
        err.lines().find(|l| l.contains("Error")).unwrap_or(&err)
    );
    assert!(
        err.contains("unauthorized")
            || err.contains("denied")
            || err.contains("authentication required"),
        "{err}"
    );
    assert!(!docker.has_image(private_ref));

    // Logged in as bob (valid user, no rule for private.example): the pull fails.
    docker
        .docker(&["login", host, "-u", "bob", "-p", BOB_PASS])
        .expect("docker login bob (valid credentials)");
    rec.clear();
    let err = docker
        .pull(private_ref)
        .expect_err("bob's pull of the private image must fail");
    eprintln!(
        "docker pull (bob) failed as expected: {}",
        err.lines().find(|l| l.contains("Error")).unwrap_or(&err)
    );
    eprintln!("dockerd (registry, bob) sent:\n{}", auth_summary(rec));
    assert!(
        err.contains("unauthorized") || err.contains("denied"),
        "{err}"
    );
    assert!(!docker.has_image(private_ref));
}

#[test]
fn skopeo_and_curl_authenticate_and_nothing_private_leaks() {
    for program in ["skopeo", "curl"] {
        require_program(program);
    }
    let started = Instant::now();
    let s = timed("upstreams, seeding, berth", setup);
    let rec = Recorder::start(s.berth.addr());
    let work = s.dir.path();
    let skopeo_dir = work.join("skopeo");
    std::fs::create_dir_all(&skopeo_dir).expect("mkdir skopeo");
    let private_ref = format!("docker://{}/private.example/team/app:v1", rec.host());
    // 4. skopeo inspect with credentials works; without, it fails.
    skopeo_inspect_needs_allowed_credentials(&s, &rec, &skopeo_dir, &private_ref);
    skopeo_copies_public_anonymously_and_private_as_ci(&s, &rec, &skopeo_dir, &private_ref);
    // 5. curl.
    curl_basic_and_challenges(&s, work);
    token_protocol_by_hand(&s, work);

    // 6. No leak through another repository name (the private blobs are cached).
    timed("leak probes", || assert_no_leak(&s, work));
    no_leak_through_a_fill_in_flight(&s, work);

    s.assert_berth_no_errors();
    eprintln!("[timing] whole test: {:.2?}", started.elapsed());
}

/// skopeo inspect of the private image: with ci's credentials it works (Basic to `/token`);
/// anonymously and as bob it fails.
fn skopeo_inspect_needs_allowed_credentials(
    s: &Setup,
    rec: &Recorder,
    skopeo_dir: &Path,
    private_ref: &str,
) {
    let ci_creds = format!("ci:{CI_PASS}");
    let inspect = json(
        &timed("skopeo inspect --creds ci (private)", || {
            skopeo_isolated(
                skopeo_dir,
                &[
                    "inspect",
                    "--tls-verify=false",
                    "--creds",
                    &ci_creds,
                    private_ref,
                ],
            )
        })
        .unwrap_or_else(|e| panic!("{e}\nsent:\n{}", auth_summary(rec))),
    );
    eprintln!("skopeo inspect (ci) sent:\n{}", auth_summary(rec));
    assert_eq!(
        inspect["Digest"],
        s.team.manifest_digest.as_str(),
        "{inspect}"
    );
    let layers: Vec<&str> = s.team.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(inspect["Layers"], serde_json::json!(layers), "{inspect}");
    let token_req = rec
        .requests()
        .into_iter()
        .find(|r| r.path == "/token")
        .expect("skopeo asked /token");
    assert_eq!(
        token_req
            .header("authorization")
            .map(|v| v.split(' ').next().unwrap_or("")),
        Some("Basic")
    );

    rec.clear();
    let err = skopeo_isolated(skopeo_dir, &["inspect", "--tls-verify=false", private_ref])
        .expect_err("skopeo inspect without credentials must fail");
    eprintln!("skopeo inspect (anonymous) sent:\n{}", auth_summary(rec));
    assert!(
        err.contains("unauthorized") || err.contains("authentication required"),
        "{err}"
    );
    let err = skopeo_isolated(
        skopeo_dir,
        &[
            "inspect",
            "--tls-verify=false",
            "--creds",
            &format!("bob:{BOB_PASS}"),
            private_ref,
        ],
    )
    .expect_err("skopeo inspect as bob must fail");
    assert!(
        err.contains("unauthorized") || err.contains("denied"),
        "{err}"
    );
}

/// skopeo copy of the public image anonymously and of the private one as ci: the bytes
/// intact, one upstream GET per blob; the private blobs are in berth's cache afterwards.
fn skopeo_copies_public_anonymously_and_private_as_ci(
    s: &Setup,
    rec: &Recorder,
    skopeo_dir: &Path,
    private_ref: &str,
) {
    let work = s.dir.path();
    let ci_creds = format!("ci:{CI_PASS}");
    // skopeo copy of the public image, anonymously.
    rec.clear();
    let out = work.join("app-copy");
    timed("skopeo copy library/app:v1 (anonymous)", || {
        skopeo_isolated(
            skopeo_dir,
            &[
                "copy",
                "--insecure-policy",
                "--src-tls-verify=false",
                &format!("docker://{}/library/app:v1", rec.host()),
                &format!("dir:{}", out.display()),
            ],
        )
    })
    .unwrap_or_else(|e| panic!("{e}\nsent:\n{}", auth_summary(rec)));
    eprintln!("skopeo copy (anonymous) sent:\n{}", auth_summary(rec));
    for (d, bytes) in s.app.blobs() {
        let copied = std::fs::read(out.join(d.trim_start_matches("sha256:"))).expect("copied blob");
        assert!(copied == bytes, "blob {d} differs");
        assert_eq!(
            s.public.blob_gets("library/app", d),
            1,
            "upstream GETs of {d}"
        );
    }
    assert_eq!(
        std::fs::read(out.join("manifest.json")).expect("copied manifest"),
        s.app.manifest
    );

    // skopeo copy of the private image as ci: its blobs are in berth's cache afterwards.
    let out = work.join("team-copy");
    timed("skopeo copy private.example/team/app:v1 (ci)", || {
        skopeo_isolated(
            skopeo_dir,
            &[
                "copy",
                "--insecure-policy",
                "--src-tls-verify=false",
                "--src-creds",
                &ci_creds,
                private_ref,
                &format!("dir:{}", out.display()),
            ],
        )
    })
    .expect("skopeo copy the private image as ci");
    for (d, bytes) in s.team.blobs() {
        let copied = std::fs::read(out.join(d.trim_start_matches("sha256:"))).expect("copied blob");
        assert!(copied == bytes, "blob {d} differs");
        assert_eq!(
            s.private.blob_gets("team/app", d),
            1,
            "private upstream GETs of {d}"
        );
    }
}

/// curl on the private manifest: ci's Basic gets it; anonymous gets the scoped challenge,
/// bob DENIED, a wrong password a challenge; `/v2/` challenges without scope.
fn curl_basic_and_challenges(s: &Setup, work: &Path) {
    let ci_creds = format!("ci:{CI_PASS}");
    let base = s.berth.url();
    let manifest_url = format!("{base}/v2/private.example/team/app/manifests/v1");
    let accept = format!("Accept: {DOCKER_MANIFEST}");
    let r = curl(work, &["-u", &ci_creds, "-H", &accept], &manifest_url);
    assert_eq!(r.status, 200, "ci Basic: {}", r.text());
    assert!(r.body == s.team.manifest, "manifest bytes: {}", r.text());
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(s.team.manifest_digest.as_str())
    );

    let r = curl(work, &["-H", &accept], &manifest_url);
    assert_eq!(r.status, 401, "anonymous: {}", r.text());
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(
            format!(
                "Bearer realm=\"{base}/token\",service=\"berth\",\
                 scope=\"repository:private.example/team/app:pull\""
            )
            .as_str()
        ),
        "{}",
        r.headers
    );
    assert_eq!(r.error_code(), "UNAUTHORIZED", "{}", r.text());
    assert!(!contains_bytes(&r.body, &s.team.manifest));

    let r = curl(
        work,
        &["-u", &format!("bob:{BOB_PASS}"), "-H", &accept],
        &manifest_url,
    );
    assert_eq!(r.status, 403, "bob: {}", r.text());
    assert_eq!(r.error_code(), "DENIED", "{}", r.text());
    assert!(!contains_bytes(&r.body, &s.team.manifest));

    let r = curl(work, &["-u", "ci:wrong", "-H", &accept], &manifest_url);
    assert_eq!(r.status, 401, "ci with a wrong password: {}", r.text());
    assert!(r.header("www-authenticate").is_some(), "{}", r.headers);

    // /v2/ itself: a challenge without scope anonymously, 200 with credentials.
    let r = curl(work, &[], &format!("{base}/v2/"));
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(format!("Bearer realm=\"{base}/token\",service=\"berth\"").as_str())
    );
    let r = curl(work, &["-u", &ci_creds], &format!("{base}/v2/"));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The token protocol by hand: ci's token covers the private repository, bob's and the
/// anonymous one do not, a wrong password gets no token.
fn token_protocol_by_hand(s: &Setup, work: &Path) {
    let base = s.berth.url();
    let manifest_url = format!("{base}/v2/private.example/team/app/manifests/v1");
    let accept = format!("Accept: {DOCKER_MANIFEST}");
    // The token protocol by hand: ci's token covers the private repository...
    let scope = "repository:private.example/team/app:pull";
    let t = token(work, &base, Some(("ci", CI_PASS)), scope);
    let bearer = format!("Authorization: Bearer {t}");
    let r = curl(work, &["-H", &bearer, "-H", &accept], &manifest_url);
    assert_eq!(r.status, 200, "ci bearer: {}", r.text());
    let layer = &s.team.layers[0];
    let r = curl(
        work,
        &["-H", &bearer],
        &format!("{base}/v2/private.example/team/app/blobs/{}", layer.digest),
    );
    assert_eq!(r.status, 200);
    assert!(r.body == layer.bytes, "private layer bytes");
    // ... bob's and anonymous ones do not (the scope is left out of the token).
    for user in [Some(("bob", BOB_PASS)), None] {
        let t = token(work, &base, user, scope);
        let r = curl(
            work,
            &["-H", &format!("Authorization: Bearer {t}"), "-H", &accept],
            &manifest_url,
        );
        assert_eq!(r.status, 401, "{user:?} bearer: {}", r.text());
        assert!(r.header("www-authenticate").is_some());
        assert!(!contains_bytes(&r.body, &s.team.manifest));
    }
    // A wrong password gets no token at all.
    let r = curl(
        work,
        &["-u", "ci:wrong"],
        &format!("{base}/token?service=berth&scope={scope}"),
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(!r.text().contains("token\""), "{}", r.text());
}

/// With the private upstream frozen, ci's GET of a blob not yet cached starts a fill that
/// waits; an anonymous (or ci's own) GET of the same digest under library/app must not join
/// it, and the private upstream is asked for nothing outside team/app.
fn no_leak_through_a_fill_in_flight(s: &Setup, work: &Path) {
    let base = s.berth.url();
    let ci_creds = format!("ci:{CI_PASS}");
    // Nor through a fill in flight: with the private upstream frozen, ci's GET of a blob not
    // yet cached starts a fill that waits; an anonymous GET of the same digest under
    // library/app must not join it.
    let v2 = seed_blob_image(&s.private, "team/app", "v2", &[1 << 20]);
    let big = &v2.layers[0];
    s.private.freeze();
    let ci_get = {
        let (work, url, creds) = (
            work.to_owned(),
            format!("{base}/v2/private.example/team/app/blobs/{}", big.digest),
            ci_creds.clone(),
        );
        std::thread::spawn(move || curl(&work, &["-u", &creds], &url))
    };
    let in_flight = wait_for(
        "berth fill in flight",
        Duration::from_secs(10),
        || match http_get_text(s.berth.admin_addr(), "/metrics") {
            Ok(m) if m.lines().any(|l| l == "berth_fills_in_flight 1") => Probe::Ready(()),
            Ok(_) => Probe::Pending("no fill yet".into()),
            Err(e) => Probe::Pending(e.to_string()),
        },
    );
    let joiners: Vec<(String, Http)> = [None, Some(("ci", CI_PASS))]
        .into_iter()
        .map(|user| {
            let who = user.map_or("anonymous", |u| u.0).to_owned();
            let mut args = user_args(user);
            args.extend(["--max-time".to_owned(), "5".to_owned()]);
            // Not `curl`: a client that joined the frozen fill would time out (exit 28).
            let r = curl_any(
                work,
                &strs(&args),
                &format!("{base}/v2/library/app/blobs/{}", big.digest),
            );
            (who, r)
        })
        .collect();
    s.private.resume();
    let ci_got = ci_get.join().expect("ci's curl thread");
    in_flight.expect("ci's GET started a fill");
    for (who, r) in &joiners {
        assert_eq!(
            (r.exit, r.status),
            (0, 404),
            "{who} GET library/app/blobs/<private digest> while ci's fill is in flight: {}\n{}",
            r.text(),
            r.headers
        );
        assert!(
            !contains_bytes(&r.body, &big.bytes),
            "{who} got private bytes"
        );
    }
    assert_eq!(
        ci_got.status,
        200,
        "ci's GET of the private blob: {}",
        ci_got.text()
    );
    assert!(ci_got.body == big.bytes, "ci's private blob bytes");
    assert_eq!(s.private.blob_gets("team/app", &big.digest), 1);
    // Evidence of the path taken: berth checked library/app's membership with the public
    // upstream (a HEAD) instead of starting a fill of its own there.
    let public_asked: Vec<String> = s
        .public
        .access_log()
        .into_iter()
        .filter(|e| e.path.ends_with(&big.digest))
        .map(|e| format!("{} {} {}", e.method, e.path, e.status))
        .collect();
    eprintln!("public upstream, for the in-flight private digest: {public_asked:?}");
    let strays: Vec<AccessEntry> = s
        .private_api_requests()
        .into_iter()
        .filter(|e| !e.path.starts_with("/v2/team/app/"))
        .collect();
    assert!(strays.is_empty(), "private upstream got {strays:?}");
}
