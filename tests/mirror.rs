//! berth in-process against a fake upstream on 127.0.0.1:0: fetch once, verification, faults,
//! stale serving, restarts, token auth, repository scoping, ranges and exact metrics.

mod fake_upstream;
mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use fake_upstream::{Behaviour, FakeUpstream, sha256};
use support::{InProc, InProcConfig, files_under, sample, seeded_bytes};

/// A mirror of `upstream` with short upstream timeouts and the given tag TTL.
fn config(upstream: &str, tag_ttl: &str) -> InProcConfig {
    InProcConfig::mirror_of(upstream, "connect_timeout = \"1s\"\nread_timeout = \"2s\"")
        .cache(&format!("max_size = \"1GiB\"\ntag_ttl = \"{tag_ttl}\""))
}

fn random_bytes(n: usize, seed: u8) -> Bytes {
    Bytes::from(seeded_bytes(n, seed))
}

fn blob_files(dir: &Path) -> usize {
    files_under(&dir.join("blobs")).len()
}

/// Waits (at most 5 s) until `n` blobs are on disk: a verified blob is committed to the cache
/// just after its last byte goes out.
async fn wait_blob_files(dir: &Path, n: usize) -> usize {
    for _ in 0..250 {
        if blob_files(dir) == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    blob_files(dir)
}

struct Setup {
    up: FakeUpstream,
    dir: tempfile::TempDir,
    berth: InProc,
    client: reqwest::Client,
    layers: Vec<(String, Bytes)>,
    config: String,
    manifest: String,
}

impl Setup {
    /// An upstream with `library/app:v1` of `n` layers of `size` bytes, and berth before it.
    async fn new(n: usize, size: usize, tag_ttl: &str) -> Setup {
        let up = FakeUpstream::start().await;
        let layers: Vec<(String, Bytes)> = (0..n)
            .map(|i| {
                let data = random_bytes(size, i as u8);
                (up.add_blob(data.clone()), data)
            })
            .collect();
        let config = up.add_blob(Bytes::from_static(
            br#"{"architecture":"amd64","os":"linux"}"#,
        ));
        let digests: Vec<String> = layers.iter().map(|(d, _)| d.clone()).collect();
        let (manifest, _) = up.add_image("library/app", "v1", &config, &digests);
        let dir = tempfile::tempdir().expect("tempdir");
        let berth = InProc::start_in(&self::config(&up.url(), tag_ttl), dir.path()).await;
        Setup {
            up,
            dir,
            client: berth.client().clone(),
            berth,
            layers,
            config,
            manifest,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.berth.url())
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.berth.get(path).await
    }

    /// The metrics once berth has settled: a request is recorded when its response has been
    /// handed to the socket (just after the client may have read it) and a fill commits just
    /// after its last byte, so wait until no fill is in flight and berth's figures stop moving.
    /// Manifest requests answered stale, once berth has settled.
    async fn stale_answers(&self) -> f64 {
        let m = self.metrics().await;
        sample(
            &m,
            r#"berth_cache_requests_total{kind="manifest",result="stale"}"#,
        )
    }

    async fn metrics(&self) -> String {
        let berth_lines = |m: &str| {
            m.lines()
                .filter(|l| l.starts_with("berth_") && !l.contains("duration_seconds"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut last = self.berth.metrics_text().await;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let now = self.berth.metrics_text().await;
            if berth_lines(&now) == berth_lines(&last)
                && sample(&now, "berth_fills_in_flight") == 0.0
            {
                return now;
            }
            last = now;
        }
        last
    }
}

/// The OCI error code of an error answer.
async fn error_code(r: reqwest::Response) -> serde_json::Value {
    let v: serde_json::Value = r.json().await.expect("json error");
    v["errors"][0]["code"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_gets_fetch_once_and_all_verify() {
    let s = Setup::new(1, 8 * 1024 * 1024, "10m").await;
    // A slow upstream keeps the fill in flight while all 20 clients join it.
    s.up.set(Behaviour::Slow(Duration::from_millis(5)));
    let (digest, data) = s.layers[0].clone();
    // The manifest first: it makes the blob a known member of the repository.
    assert_eq!(s.get("/v2/library/app/manifests/v1").await.status(), 200);
    let path = format!("/v2/library/app/blobs/{digest}");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, url) = (s.client.clone(), s.url(&path));
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await.expect("send");
            assert_eq!(r.status(), 200);
            r.bytes().await.expect("body")
        }));
    }
    for t in tasks {
        let body = t.await.expect("task");
        assert_eq!(body.len(), data.len());
        assert_eq!(sha256(&body), digest);
    }
    assert_eq!(
        s.up.count(&format!("GET /v2/library/app/blobs/{digest}")),
        1
    );
    let m = s.metrics().await;
    let miss = sample(
        &m,
        r#"berth_cache_requests_total{kind="blob",result="miss"}"#,
    );
    let coalesced = sample(
        &m,
        r#"berth_cache_requests_total{kind="blob",result="coalesced"}"#,
    );
    let hit = sample(
        &m,
        r#"berth_cache_requests_total{kind="blob",result="hit"}"#,
    );
    assert_eq!(miss, 1.0);
    assert_eq!(miss + coalesced + hit, 20.0);
    assert_eq!(wait_blob_files(s.dir.path(), 1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_cut_bodies_are_never_cached_or_complete() {
    for behaviour in [Behaviour::Corrupt, Behaviour::Cut] {
        let s = Setup::new(1, 1024 * 1024, "10m").await;
        let (digest, data) = s.layers[0].clone();
        s.up.set(behaviour.clone());
        assert_eq!(s.get("/v2/library/app/manifests/v1").await.status(), 200);
        let r = s.get(&format!("/v2/library/app/blobs/{digest}")).await;
        // Headers may already be out; the body must then fail, never end complete.
        if r.status() == 200 {
            let body = r.bytes().await;
            assert!(
                body.is_err(),
                "{behaviour:?}: a bad body was delivered complete"
            );
        } else {
            assert!(
                r.status().is_server_error(),
                "{behaviour:?}: {}",
                r.status()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            blob_files(s.dir.path()),
            0,
            "{behaviour:?}: something was cached"
        );
        let m = s.metrics().await;
        let reason = if behaviour == Behaviour::Corrupt {
            "digest_mismatch"
        } else {
            "upstream_error"
        };
        assert_eq!(
            sample(
                &m,
                &format!(r#"berth_fill_failures_total{{reason="{reason}",registry="docker.io"}}"#)
            ),
            1.0,
            "{m}"
        );
        // Upstream heals: the next request fills and verifies.
        s.up.set(Behaviour::Normal);
        let r = s.get(&format!("/v2/library/app/blobs/{digest}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.expect("body"), data);
        assert_eq!(wait_blob_files(s.dir.path(), 1).await, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_manifest_served_when_upstream_fails() {
    let s = Setup::new(1, 1000, "0s").await;
    let r = s.get("/v2/library/app/manifests/v1").await;
    assert_eq!(r.status(), 200);
    let first = r.bytes().await.expect("body");
    for status in [503, 429, 500] {
        s.up.set(Behaviour::Status(status));
        let r = s.get("/v2/library/app/manifests/v1").await;
        assert_eq!(r.status(), 200, "upstream {status}: stale answer expected");
        assert_eq!(
            r.headers()["docker-content-digest"]
                .to_str()
                .expect("ascii"),
            s.manifest
        );
        assert_eq!(r.bytes().await.expect("body"), first);
    }
    // With nothing cached, the upstream's failure is passed on as an OCI error.
    s.up.set(Behaviour::Status(429));
    let r = s.get("/v2/library/other/manifests/v1").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    s.up.set(Behaviour::Status(503));
    let r = s.get("/v2/library/other/manifests/v1").await;
    assert_eq!(r.status(), 503);
    assert_eq!(s.stale_answers().await, 3.0);
}

/// One rule for serving a cached tag when upstream fails, whichever request failed: stale on
/// anything but a 404 (the tag gone upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_tag_is_served_on_any_upstream_failure_but_404() {
    let s = Setup::new(1, 1000, "0s").await;
    let path = "/v2/library/app/manifests/v1";
    assert_eq!(s.get(path).await.status(), 200);
    let served = |r: &reqwest::Response| {
        r.headers()
            .get("docker-content-digest")
            .map(|v| v.to_str().expect("ascii").to_owned())
    };
    // The revalidating HEAD is denied.
    s.up.set(Behaviour::Status(403));
    let r = s.get(path).await;
    assert_eq!(r.status(), 200, "HEAD 403: stale answer expected");
    assert_eq!(served(&r).as_deref(), Some(s.manifest.as_str()));
    // The tag moved (the HEAD says so), and the GET of its new manifest is denied.
    s.up.add_image("library/app", "v1", &s.config, &[]);
    s.up.set(Behaviour::ManifestGetStatus(403));
    let r = s.get(path).await;
    assert_eq!(r.status(), 200, "GET 403: stale answer expected");
    assert_eq!(served(&r).as_deref(), Some(s.manifest.as_str()));
    assert_eq!(s.up.count("GET /v2/library/app/manifests/v1"), 2);
    // The tag is gone upstream: a 404, not the cached answer.
    s.up.set(Behaviour::Normal);
    s.up.state
        .manifests
        .lock()
        .expect("lock")
        .remove(&("library/app".to_owned(), "v1".to_owned()));
    let r = s.get(path).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    assert_eq!(s.stale_answers().await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidates_with_head_and_follows_a_moved_tag() {
    let s = Setup::new(1, 1000, "0s").await;
    assert_eq!(s.get("/v2/library/app/manifests/v1").await.status(), 200);
    // Unchanged: a HEAD, no GET.
    let r = s.get("/v2/library/app/manifests/v1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(s.up.count("GET /v2/library/app/manifests/v1"), 1);
    assert_eq!(s.up.count("HEAD /v2/library/app/manifests/v1"), 1);
    // The tag moves upstream: the new manifest is fetched.
    let (moved, _) = s.up.add_image("library/app", "v1", &s.config, &[]);
    let r = s.get("/v2/library/app/manifests/v1").await;
    assert_eq!(
        r.headers()["docker-content-digest"]
            .to_str()
            .expect("ascii"),
        moved
    );
    assert_eq!(s.up.count("GET /v2/library/app/manifests/v1"), 2);
    let m = s.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"berth_cache_requests_total{kind="manifest",result="revalidated"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_the_cache_with_upstream_down() {
    let s = Setup::new(2, 300_000, "10m").await;
    let paths: Vec<String> = std::iter::once("/v2/library/app/manifests/v1".to_owned())
        .chain(
            s.layers
                .iter()
                .map(|(d, _)| format!("/v2/library/app/blobs/{d}")),
        )
        .chain(std::iter::once(format!(
            "/v2/library/app/manifests/{}",
            s.manifest
        )))
        .collect();
    for p in &paths {
        let r = s.get(p).await;
        assert_eq!(r.status(), 200, "{p}");
        r.bytes().await.expect("body");
    }
    let dir = s.dir;
    s.berth.stop().await;
    let upstream_url = s.up.url();
    drop(s.up); // upstream gone
    let berth = InProc::start_in(&config(&upstream_url, "10m"), dir.path()).await;
    for p in &paths {
        let r = berth.get(p).await;
        assert_eq!(r.status(), 200, "{p} after restart");
        let body = r.bytes().await.expect("body");
        if let Some(d) = p.rsplit('/').next().filter(|d| d.starts_with("sha256:")) {
            assert_eq!(sha256(&body), d);
        }
    }
    // Something never cached, with upstream down: a clean 5xx OCI error.
    let r = berth.get("/v2/library/nope/manifests/v1").await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.expect("json");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("unreachable")
    );
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_challenge_flow_caches_the_token() {
    let s = Setup::new(2, 1000, "10m").await;
    *s.up.state.token.lock().expect("lock") = Some("sekrit".into());
    let r = s.get("/v2/library/app/manifests/v1").await;
    assert_eq!(r.status(), 200);
    for (d, _) in &s.layers {
        assert_eq!(
            s.get(&format!("/v2/library/app/blobs/{d}")).await.status(),
            200
        );
    }
    // One token for the repository scope, reused for every later request.
    assert_eq!(s.up.count("GET /token"), 1, "{:?}", s.up.requests());
    let token_req =
        s.up.requests()
            .into_iter()
            .find(|r| r.starts_with("GET /token"))
            .expect("token request");
    assert!(
        token_req.contains("scope=repository%3Alibrary%2Fapp%3Apull"),
        "{token_req}"
    );
    assert!(token_req.contains("service=fake"), "{token_req}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_scoped_to_repositories_that_contain_them() {
    let s = Setup::new(1, 1000, "10m").await;
    let (digest, _) = s.layers[0].clone();
    assert_eq!(s.get("/v2/library/app/manifests/v1").await.status(), 200);
    assert_eq!(
        s.get(&format!("/v2/library/app/blobs/{digest}"))
            .await
            .status(),
        200
    );
    // Another repository that upstream says does not hold the blob: refused, though cached.
    s.up.state
        .hidden_repos
        .lock()
        .expect("lock")
        .push("library/private".into());
    let r = s.get(&format!("/v2/library/private/blobs/{digest}")).await;
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
    // A repository upstream confirms (HEAD) is served from the cache, without a GET.
    let r = s.get(&format!("/v2/library/other/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.up.count(&format!("HEAD /v2/library/other/blobs/{digest}")),
        1
    );
    assert_eq!(
        s.up.count(&format!("GET /v2/library/other/blobs/{digest}")),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_on_cached_and_filling_blobs() {
    let s = Setup::new(1, 1_000_000, "10m").await;
    let (digest, data) = s.layers[0].clone();
    assert_eq!(s.get("/v2/library/app/manifests/v1").await.status(), 200);
    let path = s.url(&format!("/v2/library/app/blobs/{digest}"));
    // Uncached: the range joins a fill.
    s.up.set(Behaviour::Slow(Duration::from_millis(2)));
    let r = s
        .client
        .get(&path)
        .header("range", "bytes=100-199")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 100-199/1000000");
    assert_eq!(r.bytes().await.expect("body"), data.slice(100..200));
    // Cached.
    for (range, want, slice) in [
        ("bytes=0-0", "bytes 0-0/1000000", data.slice(0..1)),
        (
            "bytes=-10",
            "bytes 999990-999999/1000000",
            data.slice(999_990..),
        ),
        (
            "bytes=999000-",
            "bytes 999000-999999/1000000",
            data.slice(999_000..),
        ),
    ] {
        let r = s
            .client
            .get(&path)
            .header("range", range)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(r.headers()["content-range"], want);
        assert_eq!(r.bytes().await.expect("body"), slice);
    }
    let r = s
        .client
        .get(&path)
        .header("range", "bytes=1000000-")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */1000000");
    assert_eq!(
        s.up.count(&format!("GET /v2/library/app/blobs/{digest}")),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_metrics_for_a_cold_then_warm_pull() {
    const N: usize = 3;
    let s = Setup::new(N, 200_000, "10m").await;
    pull_whole_image(&s).await;
    let m = s.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"berth_cache_requests_total{kind="blob",result="miss"}"#
        ),
        N as f64
    );
    assert_eq!(
        sample(
            &m,
            r#"berth_cache_requests_total{kind="blob",result="hit"}"#
        ),
        0.0
    );
    pull_whole_image(&s).await;
    let m = s.metrics().await;
    assert_warm_pull_metrics(&s, &m, N).await;
}

/// GETs `library/app:v1` and each of its layers, each answered 200, bodies read.
async fn pull_whole_image(s: &Setup) {
    let r = s.get("/v2/library/app/manifests/v1").await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("manifest");
    for (d, _) in &s.layers {
        let r = s.get(&format!("/v2/library/app/blobs/{d}")).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("blob");
    }
}

/// The exact figures `m` shows after a cold then a warm pull of the image's `n` layers.
async fn assert_warm_pull_metrics(s: &Setup, m: &str, n: usize) {
    let layer_bytes: usize = s.layers.iter().map(|(_, b)| b.len()).sum();
    let manifest_len = s
        .get(&format!("/v2/library/app/manifests/{}", s.manifest))
        .await
        .bytes()
        .await
        .expect("m")
        .len();
    assert_eq!(
        sample(
            m,
            r#"berth_cache_requests_total{kind="blob",result="miss"}"#
        ),
        n as f64
    );
    assert_eq!(
        sample(m, r#"berth_cache_requests_total{kind="blob",result="hit"}"#),
        n as f64
    );
    assert_eq!(
        sample(
            m,
            r#"berth_cache_requests_total{kind="manifest",result="miss"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            m,
            r#"berth_cache_requests_total{kind="manifest",result="hit"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(m, r#"berth_served_bytes_total{source="upstream"}"#),
        (layer_bytes + manifest_len) as f64
    );
    assert_eq!(
        sample(m, r#"berth_served_bytes_total{source="cache"}"#),
        (layer_bytes + manifest_len) as f64
    );
    for (d, _) in &s.layers {
        assert_eq!(s.up.count(&format!("GET /v2/library/app/blobs/{d}")), 1);
    }
    let endpoint = s.up.url();
    assert_eq!(
        sample(
            m,
            &format!(
                r#"berth_upstream_requests_total{{endpoint="{endpoint}",method="GET",registry="docker.io",status="200"}}"#
            )
        ),
        (n + 1) as f64
    );
    assert_eq!(
        sample(
            m,
            r#"berth_upstream_ratelimit_remaining{registry="docker.io"}"#
        ),
        42.0
    );
    assert_eq!(sample(m, "berth_cache_blobs"), n as f64);
    assert_eq!(sample(m, "berth_cache_size_bytes"), layer_bytes as f64);
    assert_eq!(sample(m, "berth_fills_in_flight"), 0.0);
    assert_eq!(
        sample(
            m,
            r#"berth_http_requests_total{kind="blob",method="GET",status="200"}"#
        ),
        (2 * n) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_oci_errors() {
    let s = Setup::new(1, 1000, "10m").await;
    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "/v2/Bad/manifests/v1", 400, "NAME_INVALID"),
        (
            "GET",
            "/v2/library/app/manifests/bad:ref",
            400,
            "DIGEST_INVALID",
        ),
        // A tag that cannot exist is unknown, as the OCI conformance suite wants (never asked
        // upstream: see the end).
        (
            "GET",
            "/v2/library/app/manifests/.INVALID_MANIFEST_NAME",
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "GET",
            "/v2/library/app/blobs/sha256:1234",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/library/app/manifests/nope",
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("GET", "/v2/..%2f..%2fetc/manifests/v1", 400, "NAME_INVALID"),
        (
            "GET",
            "/v2/library/app/manifests/v1?ns=evil.example",
            404,
            "NAME_UNKNOWN",
        ),
        ("PUT", "/v2/library/app/manifests/v1", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/library/app/manifests/v1", 405, "UNSUPPORTED"),
        ("POST", "/v2/library/app/blobs/uploads/", 405, "UNSUPPORTED"),
    ];
    for (method, path, status, code) in cases {
        let r = s
            .client
            .request(method.parse().expect("method"), s.url(path))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), *status, "{method} {path}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["errors"][0]["code"], *code, "{method} {path}");
    }
    // HEAD answers carry no body, errors included: the keep-alive connection stays in sync.
    for _ in 0..3 {
        let r = s
            .client
            .head(s.url("/v2/library/app/manifests/nope"))
            .send()
            .await
            .expect("head");
        assert_eq!(r.status(), 404);
        let r = s
            .client
            .head(s.url("/v2/library/app/manifests/v1"))
            .send()
            .await
            .expect("head");
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("docker-content-digest"));
        assert!(r.headers().contains_key("date"));
        assert_eq!(s.get("/v2/").await.status(), 200);
    }
    // The refused ns and the impossible tag never reached any upstream.
    assert!(
        s.up.requests()
            .iter()
            .all(|r| !r.contains("evil") && !r.contains("INVALID"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_catalog() {
    let s = Setup::new(1, 1000, "10m").await;
    let r = s.get("/v2/library/app/tags/list?n=10").await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["tags"][0], "v1");
    assert_eq!(s.up.count("GET /v2/library/app/tags/list?n=10"), 1);
    assert_eq!(s.get("/v2/library/app/manifests/v1").await.status(), 200);
    let v: serde_json::Value = s.get("/v2/_catalog").await.json().await.expect("json");
    assert_eq!(v["repositories"], serde_json::json!(["library/app"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirects_are_followed_without_forwarding_credentials() {
    // Docker Hub answers blob GETs with a 307 to its CDN: berth follows it upstream-side, and
    // the Authorization header (a bearer token here) never reaches the other host.
    let cdn = FakeUpstream::start().await;
    let data = random_bytes(300_000, 7);
    let digest = cdn.add_blob(data.clone());
    let up = FakeUpstream::start().await;
    up.add_blob(data.clone());
    let config_digest = up.add_blob(Bytes::from_static(b"{}"));
    up.add_image(
        "library/app",
        "v1",
        &config_digest,
        std::slice::from_ref(&digest),
    );
    *up.state.token.lock().expect("lock") = Some("tok".into());
    up.set(Behaviour::Redirect(format!(
        "http://{}/cdn/{{digest}}",
        cdn.addr
    )));
    // The CDN is on loopback, so it must be a configured endpoint for the redirect to be
    // followed (a redirect to any other local address is refused).
    let config =
        InProcConfig::mirror_of(&up.url(), "").registry("cdn.local", false, &[&cdn.url()], "");
    let b = InProc::start(&config).await;
    assert_eq!(b.get("/v2/library/app/manifests/v1").await.status(), 200);
    let r = b.get(&format!("/v2/library/app/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body"), data);
    let blob_get = format!("GET /v2/library/app/blobs/{digest}");
    assert!(
        up.state
            .authorized
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l == &blob_get),
        "the registry got the token"
    );
    assert_eq!(
        cdn.count(&format!("GET /cdn/{digest}")),
        1,
        "the redirect was followed"
    );
    assert!(
        cdn.state.authorized.lock().expect("lock").is_empty(),
        "credentials leaked to the CDN host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_survives_its_first_client_going_away() {
    let s = Setup::new(1, 2 * 1024 * 1024, "10m").await;
    let (digest, data) = s.layers[0].clone();
    s.up.set(Behaviour::Slow(Duration::from_millis(5)));
    assert_eq!(s.get("/v2/library/app/manifests/v1").await.status(), 200);
    // The first client reads a little, then hangs up.
    let mut r = s.get(&format!("/v2/library/app/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.expect("first chunk").expect("some bytes");
    assert!(!first.is_empty());
    drop(r);
    // The fill goes on: the blob lands in the cache, fetched from upstream once.
    assert_eq!(wait_blob_files(s.dir.path(), 1).await, 1);
    let r = s.get(&format!("/v2/library/app/blobs/{digest}")).await;
    assert_eq!(r.bytes().await.expect("body"), data);
    assert_eq!(
        s.up.count(&format!("GET /v2/library/app/blobs/{digest}")),
        1
    );
}

/// Issue #20, item 4: a cached, fresh tag asked for with an Accept header that names no
/// manifest type (garbage, `text/html`, wildcards) is answered from the cache, and one naming
/// only types berth cannot serve for the tag is answered 404 from what upstream said the first
/// time — one upstream GET per tag and set of types per tag TTL, not one per request (on
/// Docker Hub, each a counted pull), and no ERROR line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_accept_headers_cost_one_upstream_get_per_tag_ttl() {
    let (up, image, image_bytes, index) = negotiating_upstream().await;
    let berth = InProc::start(&config(&up.url(), "10m")).await;
    let gets = |tag: &str| up.count(&format!("GET /v2/{NEG_REPO}/manifests/{tag}"));
    // A client accepting everything caches both tags.
    assert_eq!(manifest_get(&berth, "v1", None).await.status(), 200);
    assert_eq!(manifest_get(&berth, "multi", None).await.status(), 200);
    assert_eq!((gets("v1"), gets("multi")), (1, 1));
    // From now on upstream negotiates as Docker Hub does: a lone schema-1 type (or, for the
    // old code, any Accept naming no type it has) gets a signed schema-1 manifest, whose digest
    // is not the hash of its bytes; an index is sent whatever the Accept says.
    up.set(Behaviour::Negotiate);
    odd_accepts_concurrently(&berth, &up, &image, &image_bytes).await;

    // Clients naming a type the cache has still get it, from the cache.
    let r = manifest_get(&berth, "v1", Some("application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")).await;
    assert_eq!(r.status(), 200);
    let r = manifest_get(&berth, "multi", Some(OCI_INDEX)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body"), index);
    assert_eq!((gets("v1"), gets("multi")), (2, 2));

    // Nothing the client caused is an ERROR; the 404s are explained at info.
    let logs = berth.logs();
    let mine: Vec<&str> = logs.lines().filter(|l| l.contains(NEG_REPO)).collect();
    let errors: Vec<&&str> = mine.iter().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let explained = mine
        .iter()
        .filter(|l| l.contains(" INFO ") && l.contains("no manifest of a type the client accepts"))
        .count();
    assert_eq!(explained, 2, "{mine:#?}");

    not_found_is_remembered_for_the_tag_ttl_only(&up).await;
}

const NEG_REPO: &str = "library/negotiate";
const SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An upstream with `NEG_REPO:v1` (an image) and `NEG_REPO:multi` (an OCI index of it);
/// returns it with the image's digest and bytes and the index's bytes.
async fn negotiating_upstream() -> (FakeUpstream, String, Bytes, Bytes) {
    let up = FakeUpstream::start().await;
    let layer = up.add_blob(random_bytes(1000, 7));
    let config_blob = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
    let (image, image_bytes) = up.add_image(NEG_REPO, "v1", &config_blob, &[layer]);
    let index = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": image, "size": image_bytes.len(),
                           "platform": {"architecture": "amd64", "os": "linux"}}],
        }))
        .expect("json"),
    );
    up.add_manifest(NEG_REPO, "multi", OCI_INDEX, index.clone());
    (up, image, image_bytes, index)
}

/// A GET of `NEG_REPO`'s manifest `tag` through `berth`, with `accept` if given.
fn manifest_get(
    berth: &InProc,
    tag: &str,
    accept: Option<&str>,
) -> impl std::future::Future<Output = reqwest::Response> + Send + 'static {
    let mut req = berth
        .client()
        .get(format!("{}/v2/{NEG_REPO}/manifests/{tag}", berth.url()));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    async move { req.send().await.expect("manifest request") }
}

/// 30 concurrent GETs with Accept headers naming no type berth has for the tag: those naming
/// no manifest type at all get the cached image, the others 404 — one upstream GET per class.
async fn odd_accepts_concurrently(
    berth: &InProc,
    up: &FakeUpstream,
    image: &str,
    image_bytes: &Bytes,
) {
    let gets = |tag: &str| up.count(&format!("GET /v2/{NEG_REPO}/manifests/{tag}"));
    // (tag, Accept, status, upstream GETs expected for the class).
    let classes: [(&str, &str, u16, usize); 6] = [
        ("v1", "text/html", 200, 0),
        ("v1", "x", 200, 0),
        ("v1", "*/*;q=0.1", 200, 0),
        ("v1", "text/html, text/*;q=0.1", 200, 0),
        ("v1", SCHEMA1, 404, 1),
        ("multi", OCI_MANIFEST, 404, 1),
    ];
    let mut tasks = Vec::new();
    for i in 0..30 {
        let (tag, accept, status, _) = classes[i % classes.len()];
        let r = manifest_get(berth, tag, Some(accept));
        tasks.push(tokio::spawn(async move {
            let r = r.await;
            let digest = r
                .headers()
                .get("docker-content-digest")
                .map(|v| v.to_str().expect("ascii").to_owned());
            let got = r.status().as_u16();
            let body = r.bytes().await.expect("body");
            (tag, accept, status, got, digest, body)
        }));
    }
    for t in tasks {
        let (tag, accept, want, got, digest, body) = t.await.expect("request task");
        assert_eq!(got, want, "{tag} with Accept {accept}: {body:?}");
        if want == 200 {
            assert_eq!(digest.as_deref(), Some(image), "{tag} {accept}");
            assert_eq!(&body, image_bytes, "{tag} {accept}");
        } else {
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json error");
            assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN", "{tag} {accept}");
        }
    }
    let per_tag = |tag: &str| {
        classes
            .iter()
            .filter(|c| c.0 == tag)
            .map(|c| c.3)
            .sum::<usize>()
    };
    assert_eq!(gets("v1"), 1 + per_tag("v1"), "{:?}", up.requests());
    assert_eq!(gets("multi"), 1 + per_tag("multi"), "{:?}", up.requests());
}

/// The 404 is remembered for the tag TTL only: past it, upstream is asked again, once.
async fn not_found_is_remembered_for_the_tag_ttl_only(up: &FakeUpstream) {
    let gets = |tag: &str| up.count(&format!("GET /v2/{NEG_REPO}/manifests/{tag}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let short = InProc::start_in(&config(&up.url(), "1s"), dir.path()).await;
    let url = format!("{}/v2/{NEG_REPO}/manifests/v1", short.url());
    let schema1 = |c: &reqwest::Client| c.get(&url).header("accept", SCHEMA1).send();
    let before = gets("v1");
    for round in 1..=2 {
        for _ in 0..3 {
            let r = schema1(short.client()).await.expect("send");
            assert_eq!(r.status(), 404);
        }
        assert_eq!(gets("v1"), before + round, "round {round}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}

/// Issue 21 item 8: a client asking for something berth cannot fetch gets a 502 that says so,
/// without the upstream URL or the error chain; the log keeps both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_body_carries_no_upstream_internals() {
    // A loopback port held (bound, never listening) so no other test takes it: connections
    // to it are refused.
    let hold = tokio::net::TcpSocket::new_v4().expect("socket");
    hold.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let closed = hold.local_addr().expect("local addr");
    let upstream = format!("http://{closed}");
    let berth = InProc::start(&config(&upstream, "10m")).await;
    let r = berth.get("/v2/library/nope/manifests/v1").await;
    assert_eq!(r.status(), 502);
    let body = r.text().await.expect("body");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let message = v["errors"][0]["message"].as_str().unwrap_or("");
    assert!(message.contains("unreachable"), "{body}");
    let port = closed.port().to_string();
    for internal in ["http", &port, "error sending request", "Connect", "refused"] {
        assert!(
            !body.contains(internal),
            "the 502 body shows {internal:?}: {body}"
        );
    }
    let logs = berth.logs();
    assert!(
        logs.contains(&port),
        "the log lost the upstream address: {logs}"
    );
    assert!(
        logs.contains("error sending request"),
        "the log lost the cause: {logs}"
    );
    // Issue 21 item 9: the failed connection is counted with a status value of its own.
    let metrics = berth.metrics_text().await;
    let counted: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("berth_upstream_requests_total{"))
        .collect();
    assert!(
        counted.iter().any(|l| l.contains(r#"status="error""#))
            && counted.iter().all(|l| !l.contains(r#"status="0""#)),
        "{counted:?}"
    );
    berth.stop().await;
    drop(hold);
}

/// Issue 21 item 8: the access log line of a refused request keeps the query string and says
/// why (here: `?ns=` names a registry that is not configured).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_keeps_the_query_and_the_reason() {
    let up = FakeUpstream::start().await;
    let berth = InProc::start(&config(&up.url(), "10m")).await;
    let r = berth.get("/v2/app/manifests/v1?ns=quay.io").await;
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.expect("json");
    let message = v["errors"][0]["message"].as_str().unwrap_or("").to_owned();
    assert!(message.contains("quay.io"), "{v}");
    let logs = berth.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("berth::access") && l.contains("/v2/app/manifests/v1"))
        .unwrap_or_else(|| panic!("no access log line: {logs}"));
    assert!(line.contains("ns=quay.io"), "the query is missing: {line}");
    assert!(line.contains(&message), "the reason is missing: {line}");
    berth.stop().await;
}

/// Issue 21 item 7: a graceful stop takes one `shutdown_grace` in all, even with a download
/// and its fill still running, not one for connections and then another for fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_takes_one_grace_period() {
    let up = FakeUpstream::start().await;
    // 2 MiB in 64 KiB pieces 300 ms apart: about 10 s, far longer than the grace.
    let digest = up.add_blob(random_bytes(2 << 20, 7));
    up.set(Behaviour::Slow(Duration::from_millis(300)));
    // A 3 s grace (InProcConfig's is 1 s): one grace is about 3 s, two are at least 6 s.
    let dir = tempfile::tempdir().expect("tempdir");
    let (listener, admin) = (
        support::loopback_listener().await,
        support::loopback_listener().await,
    );
    let text = config(&up.url(), "10m")
        .toml(
            listener.local_addr().expect("addr"),
            admin.local_addr().expect("addr"),
            dir.path(),
        )
        .replace(r#"shutdown_grace = "1s""#, r#"shutdown_grace = "3s""#);
    assert!(text.contains(r#"shutdown_grace = "3s""#), "{text}");
    let berth = InProc::start_on(&text, listener, admin).await;
    let url = berth.url();
    let download = tokio::spawn(async move {
        let r = reqwest::get(format!("{url}/v2/library/app/blobs/{digest}"))
            .await
            .expect("response");
        r.bytes().await.map(|b| b.len())
    });
    // The download and its fill are under way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    berth.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(4500),
        "stopping took {took:?} with a 3s grace"
    );
    // It was still running: the stop did not wait for it (the process exit that follows a
    // stop is what cuts it).
    assert!(
        !download.is_finished(),
        "the download ended before the stop"
    );
    download.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_of_a_mirrored_repository_fall_back_to_the_tag_schema_and_are_cached() {
    let s = Setup::new(1, 100, "10m").await;
    let subject = s.manifest.clone();
    // Upstream has no referrers API (the fake answers 404): its fallback tag holds the list.
    let list = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "1".repeat(64)), "size": 10, "artifactType": "application/vnd.example.sig"},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "2".repeat(64)), "size": 10, "artifactType": "application/vnd.example.sbom"},
        ],
    });
    let fallback = subject.replace(':', "-");
    s.up.add_manifest(
        "library/app",
        &fallback,
        "application/vnd.oci.image.index.v1+json",
        Bytes::from(serde_json::to_vec(&list).expect("json")),
    );
    let path = format!("/v2/library/app/referrers/{subject}");
    for _ in 0..3 {
        let r = s.get(&path).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "application/vnd.oci.image.index.v1+json"
        );
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["manifests"].as_array().map(Vec::len), Some(2));
    }
    // Asked upstream once (the API, then the fallback tag), then kept like a tag.
    assert_eq!(
        s.up.count(&format!("GET /v2/library/app/referrers/{subject}")),
        1
    );
    assert_eq!(
        s.up.count(&format!("GET /v2/library/app/manifests/{fallback}")),
        1
    );
    let r = s
        .get(&format!("{path}?artifactType=application/vnd.example.sbom"))
        .await;
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["manifests"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
    // A subject with neither: an empty list, not an error.
    let other = format!("sha256:{}", "3".repeat(64));
    let r = s.get(&format!("/v2/library/app/referrers/{other}")).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["manifests"], serde_json::json!([]));
}
