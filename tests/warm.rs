//! `berth warm` (the CLI, through a running berth's admin API): images fetched into the cache
//! through berth itself, so routes, allow/deny lists and upstream credentials apply and the
//! next pull is a cache hit. In-process against the recording fake upstream: warmed once (a
//! second warm GETs no blob upstream), the platforms of an index, a denied repository never
//! asked upstream, a remembered 404 asked again, client `[auth]` bypassed by the admin token,
//! the admin token required; the admin API's checks. Then against a real `docker-registry`:
//! plain and terminal (pseudo-terminal via `script`) output, and skopeo pulling the warmed
//! image without a blob GET upstream.

mod fake_upstream;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use fake_upstream::FakeUpstream;
use support::{CmdOutput, InProc, InProcConfig};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// `berth warm ARGS --admin ADMIN` with `env` (and no `BERTH_ADMIN_TOKEN` from the test's own
/// environment), off the async threads, bounded.
async fn warm(admin: &str, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.arg("warm")
        .args(args)
        .arg("--admin")
        .arg(admin)
        .env_remove("BERTH_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || support::run(&mut cmd, CLI_TIMEOUT))
        .await
        .expect("join")
        .expect("run berth warm")
}

fn blob_file(cache: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

fn mirror(up: &FakeUpstream, keys: &str) -> InProcConfig {
    InProcConfig::mirror_of(&up.url(), &format!("probe_interval = \"0s\"\n{keys}"))
}

/// `library/app:v1`: one layer of `bytes` and the config `{}`; returns the layer's digest.
fn add_app(up: &FakeUpstream, bytes: Vec<u8>) -> String {
    let layer = up.add_blob(Bytes::from(bytes));
    let cfg = up.add_blob(Bytes::from_static(b"{}"));
    up.add_image("library/app", "v1", &cfg, std::slice::from_ref(&layer));
    layer
}

fn blob_gets(up: &FakeUpstream, repo: &str, digest: &str) -> usize {
    up.count(&format!("GET /v2/{repo}/blobs/{digest}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warms_an_image_once_and_reports_it() {
    let up = FakeUpstream::start().await;
    let big = up.add_blob(Bytes::from(vec![7u8; 300_000]));
    let small = up.add_blob(Bytes::from_static(b"a small layer"));
    let cfg = up.add_blob(Bytes::from_static(b"{\"app\":1}"));
    up.add_image("library/app", "v1", &cfg, &[big.clone(), small.clone()]);
    let berth = InProc::start(&mirror(&up, "")).await;
    let admin = berth.admin_url();

    let out = warm(&admin, &["app:v1"], &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout
            .contains("warmed docker.io/library/app:v1: 3 blobs, 293.0 KiB"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("warmed 1 of 1 images"),
        "the summary: {out:?}"
    );
    // Not a terminal: no progress drawing.
    assert!(!out.stdout.contains('\r'), "{out:?}");
    for d in [&big, &small, &cfg] {
        assert!(blob_file(berth.cache_dir(), d).exists(), "{d} on disk");
        assert_eq!(blob_gets(&up, "library/app", d), 1, "{d}");
    }

    // Again: everything is cached, nothing is asked upstream but (at most) the tag.
    let before = up.count("GET /v2/library/app/blobs/");
    let out = warm(&admin, &["docker.io/library/app:v1"], &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("(3 already cached)"), "{out:?}");
    assert_eq!(up.count("GET /v2/library/app/blobs/"), before);
    // A pull of the warmed image is served from the cache.
    let r = berth.get(&format!("/v2/library/app/blobs/{big}")).await;
    assert_eq!(r.bytes().await.expect("body").len(), 300_000);
    assert_eq!(up.count("GET /v2/library/app/blobs/"), before);
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_starts_jobs_reports_them_and_checks_requests() {
    let up = FakeUpstream::start().await;
    add_app(&up, vec![1u8; 1000]);
    let berth = InProc::start(&mirror(&up, "")).await;
    let c = berth.client();
    let url = |p: &str| format!("{}{p}", berth.admin_url());
    let post = |body: String| {
        c.post(url("/admin/warm"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let r = post(r#"{"images": ["app:v1", "nothere:1"]}"#.to_owned())
        .await
        .expect("POST");
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.expect("json")["id"]
        .as_u64()
        .expect("a job id");
    let mut job = serde_json::Value::Null;
    for _ in 0..500 {
        job = c
            .get(url(&format!("/admin/warm/{id}")))
            .send()
            .await
            .expect("GET job")
            .json()
            .await
            .expect("job JSON");
        if job["state"] == "done" || job["state"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["failed"], 1, "{job}");
    assert_eq!(
        job["platforms"],
        serde_json::json!(["linux/amd64"]),
        "{job}"
    );
    let app = &job["images"][0];
    assert_eq!(app["image"], "docker.io/library/app:v1", "{job}");
    assert_eq!(app["state"], "done", "{job}");
    assert_eq!(app["manifests"], 1, "{job}");
    assert_eq!(
        (&app["blobs_done"], &app["blobs_total"]),
        (&2.into(), &2.into())
    );
    assert_eq!(app["bytes_done"], 1002, "{job}");
    assert_eq!(app["bytes_total"], 1002, "{job}");
    let missing = &job["images"][1];
    assert_eq!(missing["state"], "failed", "{job}");
    let why = missing["error"].as_str().expect("an error");
    assert!(why.starts_with("404 MANIFEST_UNKNOWN"), "{job}");

    // Refused requests, each naming what is wrong; none starts a job.
    for (body, status, names) in [
        (
            r#"{"images": ["UPPER:case"]}"#.to_owned(),
            400,
            "UPPER:case",
        ),
        (
            r#"{"images": ["app"], "platforms": ["linux"]}"#.to_owned(),
            400,
            "\\\"linux\\\"",
        ),
        (r#"{"images": []}"#.to_owned(), 400, "images"),
        (r#"{"image": "app"}"#.to_owned(), 400, "image"),
        ("not json".to_owned(), 400, "images"),
        (
            format!(r#"{{"images": ["{}"]}}"#, "a".repeat(2 << 20)),
            413,
            "over",
        ),
    ] {
        let r = post(body.clone()).await.expect("POST");
        assert_eq!(r.status(), status, "{}", &body[..body.len().min(80)]);
        let text = r.text().await.expect("body");
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON error");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains(names)) || text.contains(names),
            "{text}"
        );
    }
    for path in ["/admin/warm/999999", "/admin/warm/x", "/admin/warm/"] {
        let r = c.get(url(path)).send().await.expect("GET");
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = c.get(url("/admin/warm")).send().await.expect("GET");
    assert_eq!(r.status(), 405);
    assert!(berth.running().addr.port() > 0);
    berth.stop().await;
}

/// A two-platform index plus a child without a platform (as attestations are), each with
/// its own config and layer. Returns the (config, layer) digests: amd64, arm64/v8, none.
fn add_index(up: &FakeUpstream) -> [(String, String); 3] {
    let mut entries = Vec::new();
    let mut out = Vec::new();
    for (i, platform) in [
        Some(serde_json::json!({"os": "linux", "architecture": "amd64"})),
        Some(serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"})),
        None,
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = up.add_blob(Bytes::from(format!("{{\"child\":{i}}}")));
        let layer = up.add_blob(Bytes::from(vec![i as u8 + 1; 2000 + i]));
        let (digest, bytes) = up.add_image(
            "library/multi",
            &format!("child{i}"),
            &cfg,
            std::slice::from_ref(&layer),
        );
        let mut entry = serde_json::json!({
            "mediaType": OCI_MANIFEST, "digest": digest, "size": bytes.len(),
        });
        if let Some(p) = platform {
            entry["platform"] = p;
        }
        entries.push(entry);
        out.push((cfg, layer));
    }
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    up.add_manifest(
        "library/multi",
        "v1",
        OCI_INDEX,
        Bytes::from(serde_json::to_vec(&index).expect("json")),
    );
    [out[0].clone(), out[1].clone(), out[2].clone()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warms_the_platforms_asked_for() {
    let up = FakeUpstream::start().await;
    let [amd, arm, none] = add_index(&up);
    let berth = InProc::start(&mirror(&up, "")).await;
    let admin = berth.admin_url();
    let fetched = |pair: &(String, String)| {
        (
            blob_gets(&up, "library/multi", &pair.0),
            blob_gets(&up, "library/multi", &pair.1),
        )
    };

    let out = warm(&admin, &["--platform", "linux/arm64", "multi:v1"], &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout
            .contains("warmed docker.io/library/multi:v1: 2 blobs"),
        "{out:?}"
    );
    assert_eq!(fetched(&arm), (1, 1));
    assert_eq!(fetched(&amd), (0, 0));
    assert_eq!(fetched(&none), (0, 0));
    assert!(blob_file(berth.cache_dir(), &arm.1).exists());

    // Without --platform: `[cache] platforms`, linux/amd64 by default.
    let out = warm(&admin, &["multi:v1"], &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fetched(&amd), (1, 1));
    assert_eq!(fetched(&none), (0, 0));

    // Every child, with a platform or not; what is cached is not fetched again.
    let out = warm(&admin, &["--all-platforms", "multi:v1"], &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains("6 blobs") && out.stdout.contains("(4 already cached)"),
        "{out:?}"
    );
    for pair in [&amd, &arm, &none] {
        assert_eq!(fetched(pair), (1, 1), "{pair:?}");
    }

    // A platform the index does not have.
    let out = warm(&admin, &["--platform", "linux/s390x", "multi:v1"], &[]).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains("failed docker.io/library/multi:v1")
            && out.stdout.contains("no manifest for linux/s390x"),
        "{out:?}"
    );
    // Bad arguments are refused before anything is sent.
    let out = warm(&admin, &["--platform", "linux", "multi:v1"], &[]).await;
    assert!(
        !out.status.success() && out.stderr.contains("\"linux\""),
        "{out:?}"
    );
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_images_fail_and_remembered_404s_are_asked_again() {
    let up = FakeUpstream::start().await;
    let layer = up.add_blob(Bytes::from_static(b"layer"));
    let cfg = up.add_blob(Bytes::from_static(b"{}"));
    for repo in ["library/app", "someone/app"] {
        up.add_image(repo, "v1", &cfg, std::slice::from_ref(&layer));
    }
    let config = mirror(&up, "deny = [\"someone/*\"]").cache("negative_ttl = \"1h\"");
    let berth = InProc::start(&config).await;
    let admin = berth.admin_url();

    let out = warm(&admin, &["someone/app:v1", "app:v1"], &[]).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains(
            "failed docker.io/someone/app:v1: 403 DENIED: docker.io/someone/app may not be pulled"
        ),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("berth: warm failed: docker.io/someone/app:v1"),
        "{out:?}"
    );
    // The other image is warmed all the same.
    assert!(
        out.stdout
            .contains("warmed docker.io/library/app:v1: 2 blobs"),
        "{out:?}"
    );
    let asked = up.requests();
    assert!(asked.iter().all(|r| !r.contains("someone")), "{asked:?}");

    // A tag upstream did not have, remembered for negative_ttl...
    let late = |up: &FakeUpstream| {
        up.requests()
            .iter()
            .filter(|r| r.contains("/v2/library/late/manifests/v1"))
            .count()
    };
    assert_eq!(
        berth.get("/v2/library/late/manifests/v1").await.status(),
        404
    );
    let asked = late(&up);
    assert!(asked >= 1);
    let late_layer = up.add_blob(Bytes::from_static(b"pushed later"));
    up.add_image(
        "library/late",
        "v1",
        &cfg,
        std::slice::from_ref(&late_layer),
    );
    assert_eq!(
        berth.get("/v2/library/late/manifests/v1").await.status(),
        404,
        "the 404 is remembered"
    );
    assert_eq!(late(&up), asked);
    // ...is asked upstream again by a warm.
    let out = warm(&admin, &["late:v1"], &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(late(&up) > asked);
    assert_eq!(blob_gets(&up, "library/late", &late_layer), 1);
    assert_eq!(
        berth.get("/v2/library/late/manifests/v1").await.status(),
        200
    );
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_needed_and_client_auth_does_not_apply() {
    let up = FakeUpstream::start().await;
    let layer = add_app(&up, vec![3u8; 4000]);
    let dir = tempfile::tempdir().expect("tempdir");
    let hash = bcrypt::hash("s3cret-password", 4).expect("bcrypt");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("ci:{hash}\n")).expect("write htpasswd");
    let token = "an-admin-token-of-32-characters!";
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{token}\n")).expect("write token");
    let config = mirror(&up, "").table(&format!(
        "[auth]\nhtpasswd = \"{}\"\n[[auth.rule]]\nusers = [\"ci\"]\nallow = [\"*\"]\n\n[admin]\ntoken_file = \"{}\"\n",
        htpasswd.display(),
        token_file.display()
    ));
    let berth = InProc::start_in(&config, &dir.path().join("cache")).await;
    let admin = berth.admin_url();
    // Client auth is on: an anonymous pull is refused.
    assert_eq!(
        berth.get("/v2/library/app/manifests/v1").await.status(),
        401
    );

    let c = berth.client();
    let body = r#"{"images": ["app:v1"]}"#;
    for auth in [
        None,
        Some("Bearer wrong-token-wrong-token-wrong"),
        Some("Basic Y2k6czNjcmV0LXBhc3N3b3Jk"),
    ] {
        let mut req = c.post(format!("{admin}/admin/warm")).body(body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.expect("POST");
        assert_eq!(r.status(), 401, "{auth:?}");
    }
    let out = warm(
        &admin,
        &["app:v1"],
        &[("BERTH_ADMIN_TOKEN", "wrong-token-wrong-token-wrong")],
    )
    .await;
    assert!(
        !out.status.success() && out.stderr.contains("401"),
        "{out:?}"
    );
    let out = warm(&admin, &["app:v1"], &[]).await;
    assert!(
        !out.status.success() && out.stderr.contains("401"),
        "{out:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(up.requests().is_empty(), "{:?}", up.requests());

    let tf = token_file.display().to_string();
    let out = warm(&admin, &["--token-file", &tf, "app:v1"], &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(blob_file(berth.cache_dir(), &layer).exists());
    assert_eq!(blob_gets(&up, "library/app", &layer), 1);
    let out = warm(&admin, &["app:v1"], &[("BERTH_ADMIN_TOKEN", token)]).await;
    assert!(
        out.status.success() && out.stdout.contains("(2 already cached)"),
        "{out:?}"
    );
    berth.stop().await;
}

/// Against a real registry: `berth warm` with plain output and on a pseudo-terminal (bars),
/// then skopeo copies of the warmed platforms through berth make no blob GET upstream.
#[test]
fn warm_from_a_real_registry_then_pull_from_cache() {
    let script = support::require_program("script");
    support::require_program("skopeo");
    let registry = support::Registry::start();
    let index = support::seed_index(&registry, "library/app", "v1");
    let berth = support::Berth::start_mirror(&registry.url());
    let bin = env!("CARGO_BIN_EXE_berth");

    let mut plain = Command::new(bin);
    plain.args(["warm", "--admin", &berth.admin_url(), "app:v1"]);
    let out = support::run(&mut plain, CLI_TIMEOUT).expect("berth warm");
    assert!(out.status.success(), "{out:?}");
    let amd = index.image("amd64");
    assert!(
        out.stdout
            .contains("warmed docker.io/library/app:v1: 3 blobs"),
        "{out:?}"
    );
    assert!(
        !out.stdout.contains('\r') && !out.stdout.contains('\x1b'),
        "{out:?}"
    );
    for (d, _) in amd.blobs() {
        assert_eq!(registry.blob_gets("library/app", d), 1, "{d}");
    }
    let arm = index.image("arm64");
    for (d, _) in arm.blobs() {
        assert_eq!(registry.blob_gets("library/app", d), 0, "{d}");
    }

    // On a terminal: the bars are drawn, and the lines are printed too.
    let cmd = format!(
        "'{bin}' warm --admin '{}' --platform linux/arm64 app:v1",
        berth.admin_url()
    );
    let mut tty = Command::new(script);
    tty.args(["-qfec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .env_remove("BERTH_ADMIN_TOKEN");
    let out = support::run(&mut tty, CLI_TIMEOUT).expect("script berth warm");
    assert!(out.status.success(), "{out:?}");
    let drawn = &out.stdout;
    assert!(
        drawn.contains("warmed docker.io/library/app:v1: 3 blobs"),
        "{drawn:?}"
    );
    assert!(drawn.contains("warmed 1 of 1 images"), "{drawn:?}");
    // indicatif's drawing: cursor movement / line clearing, and the bar of the template.
    assert!(drawn.contains('\r') || drawn.contains("\x1b["), "{drawn:?}");
    assert!(
        drawn.contains(&"=".repeat(30)) && drawn.contains("all images"),
        "{drawn:?}"
    );
    assert!(drawn.contains("3/3 blobs"), "{drawn:?}");
    for (d, _) in arm.blobs() {
        assert_eq!(registry.blob_gets("library/app", d), 1, "{d}");
    }

    // Pulls of both warmed platforms: no blob GET reaches the registry.
    let before = registry.all_blob_gets("library/app");
    assert_eq!(before, 6);
    let work = tempfile::tempdir().expect("tempdir");
    for arch in ["amd64", "arm64"] {
        let dest = work.path().join(arch);
        support::skopeo_isolated(
            work.path(),
            &[
                "copy",
                "--insecure-policy",
                "--src-tls-verify=false",
                "--override-arch",
                arch,
                &format!("docker://{}/library/app:v1", berth.host()),
                &format!("dir:{}", dest.display()),
            ],
        )
        .unwrap_or_else(|e| panic!("skopeo copy {arch}: {e}"));
        for (d, bytes) in index.image(arch).blobs() {
            let copied =
                std::fs::read(dest.join(d.trim_start_matches("sha256:"))).expect("copied blob");
            assert!(copied == bytes, "{arch} blob {d} differs");
        }
    }
    assert_eq!(registry.all_blob_gets("library/app"), before);
}
