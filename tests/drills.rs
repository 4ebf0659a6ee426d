//! Fault drills: berth against a hostile or failing upstream, a crash mid-fill, a full disk,
//! and a flaky-upstream soak with 200 concurrent clients. Each drill is bounded in time and
//! prints its figures (requests, bytes, statuses, client-visible errors by kind, corrupt
//! bodies); run `cargo test --test drills -- --nocapture` to see them.
//!
//! The drills run one at a time (a process-wide lock), so that timing bounds hold on 2 cores
//! whatever `--test-threads` says. `SOAK_SECS` (default 20, at most 300) sets the soak length.
//!
//! Invariants (a corrupt body, a complete body from a crashed berth, a redirect followed to a
//! forbidden address) fail at once. Other expectations are checked softly: every miss is
//! collected and the drill fails at its end, after printing its figures, so one finding does
//! not hide the rest.

mod fake_upstream;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_upstream::{Behaviour, FakeUpstream, Sha256Hasher, sha256};
use support::{Berth, http_get_text, http_status};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one drill at a time (a drill that panicked does not block the others), on a
/// runtime of its own with 2 workers. The drill's future runs on the test's own thread, so
/// child processes it starts die with it (see `tests/support`).
fn run_drill(drill: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(drill);
}

const MIB: usize = 1024 * 1024;
const KIB: usize = 1024;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn random_bytes(n: usize) -> Bytes {
    Bytes::from(support::random_bytes(n))
}

/// What a client got for one request.
#[derive(Debug)]
enum Got {
    /// 200 with the whole body, which hashed to the expected digest.
    Verified { bytes: u64 },
    /// 200 with a body that ended cleanly but does not hash to the digest. Must never happen.
    Corrupt { bytes: u64 },
    /// 200 whose body broke off.
    Aborted { bytes: u64, error: String },
    /// Any other status, with its body.
    Status {
        status: u16,
        retry_after: Option<String>,
        content_type: Option<String>,
        body: String,
    },
    /// No answer (connection refused, reset before the head, client timeout).
    Failed(String),
}

impl Got {
    fn kind(&self) -> &'static str {
        match self {
            Got::Verified { .. } => "verified",
            Got::Corrupt { .. } => "CORRUPT",
            Got::Aborted { .. } => "aborted body",
            Got::Status { status, .. } if *status >= 500 => "5xx",
            Got::Status { status, .. } if *status == 429 => "429",
            Got::Status { .. } => "other status",
            Got::Failed(_) => "no answer",
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Got::Verified { .. } | Got::Corrupt { .. } | Got::Aborted { .. } => Some(200),
            Got::Status { status, .. } => Some(*status),
            Got::Failed(_) => None,
        }
    }

    /// A clean error: a status ≥ 400 with an OCI JSON error body.
    fn oci_error(&self) -> Option<(u16, String)> {
        let Got::Status {
            status,
            content_type,
            body,
            ..
        } = self
        else {
            return None;
        };
        if *status < 400 || content_type.as_deref() != Some("application/json") {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let code = v["errors"][0]["code"].as_str()?.to_owned();
        Some((*status, code))
    }

    fn is_5xx_oci(&self) -> bool {
        self.oci_error().is_some_and(|(s, _)| s >= 500)
    }

    /// One line for the figures: status, OCI code and message, or the error.
    fn short(&self) -> String {
        let text = match self {
            Got::Status {
                status,
                retry_after,
                body,
                ..
            } => {
                let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                let (code, msg) = (&v["errors"][0]["code"], &v["errors"][0]["message"]);
                format!(
                    "{status} {} retry-after={} {:?}",
                    code.as_str().unwrap_or("(no OCI code)"),
                    retry_after.as_deref().unwrap_or("-"),
                    msg.as_str().unwrap_or(body)
                )
            }
            Got::Aborted { bytes, error } => {
                format!("200, body aborted after {bytes} bytes: {error}")
            }
            Got::Failed(error) => format!("no answer: {error}"),
            Got::Verified { bytes } => format!("200, {bytes} bytes, verified"),
            Got::Corrupt { bytes } => format!("200, {bytes} bytes, CORRUPT"),
        };
        // Digests make lines long and say nothing here.
        let mut out = String::new();
        for word in text.split_inclusive(' ') {
            match word.find("sha256:") {
                Some(i) if word.len() > i + 19 => {
                    out.push_str(&word[..i + 15]);
                    out.push('…');
                    out.push_str(&word[i + 71.min(word.len() - i)..]);
                }
                _ => out.push_str(word),
            }
        }
        out.chars().take(260).collect()
    }
}

/// GETs a blob and hashes the body as it streams (nothing is buffered).
async fn fetch_blob(client: &reqwest::Client, url: &str, digest: &str) -> Got {
    let resp = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) => return Got::Failed(error_chain(&e)),
    };
    if resp.status() != 200 {
        return status_of(resp).await;
    }
    let mut resp = resp;
    let mut hasher = Sha256Hasher::new();
    let mut bytes = 0u64;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                bytes += c.len() as u64;
                hasher.update(&c);
            }
            Ok(None) => break,
            Err(e) => {
                return Got::Aborted {
                    bytes,
                    error: error_chain(&e),
                };
            }
        }
    }
    if hasher.finish() == digest {
        Got::Verified { bytes }
    } else {
        Got::Corrupt { bytes }
    }
}

/// Like [`fetch_blob`], reading no faster than `rate` bytes per second.
async fn fetch_blob_paced(client: &reqwest::Client, url: &str, digest: &str, rate: u64) -> Got {
    let mut resp = match client.get(url).send().await {
        Ok(r) if r.status() == 200 => r,
        Ok(r) => return status_of(r).await,
        Err(e) => return Got::Failed(error_chain(&e)),
    };
    let started = Instant::now();
    let mut hasher = Sha256Hasher::new();
    let mut bytes = 0u64;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                bytes += c.len() as u64;
                hasher.update(&c);
                let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Got::Aborted {
                    bytes,
                    error: error_chain(&e),
                };
            }
        }
    }
    if hasher.finish() == digest {
        Got::Verified { bytes }
    } else {
        Got::Corrupt { bytes }
    }
}

/// GETs anything and reads a 200 body whole: `Verified` when it is complete and hashes to
/// the `Docker-Content-Digest` berth sent (if it sent one), `Corrupt` when it does not.
async fn fetch(client: &reqwest::Client, url: &str) -> (Got, Bytes) {
    let resp = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) => return (Got::Failed(error_chain(&e)), Bytes::new()),
    };
    if resp.status() != 200 {
        return (status_of(resp).await, Bytes::new());
    }
    let claimed = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match resp.bytes().await {
        Ok(b) => {
            let bytes = b.len() as u64;
            if claimed.is_some_and(|d| d != sha256(&b)) {
                (Got::Corrupt { bytes }, b)
            } else {
                (Got::Verified { bytes }, b)
            }
        }
        Err(e) => (
            Got::Aborted {
                bytes: 0,
                error: error_chain(&e),
            },
            Bytes::new(),
        ),
    }
}

async fn status_of(resp: reqwest::Response) -> Got {
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let retry_after = header("retry-after");
    let content_type = header("content-type");
    let body = resp.text().await.unwrap_or_default();
    Got::Status {
        status,
        retry_after,
        content_type,
        body,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// Requests, bytes, statuses and errors of a drill, printed at its end.
#[derive(Default)]
struct Tally {
    requests: usize,
    bytes: u64,
    statuses: BTreeMap<String, usize>,
    kinds: BTreeMap<&'static str, usize>,
    corrupt: usize,
    /// The first few errors of each kind, for the figures.
    samples: BTreeMap<String, Vec<String>>,
}

impl Tally {
    fn record(&mut self, got: &Got) {
        self.requests += 1;
        let status = got.status().map_or("none".to_owned(), |s| s.to_string());
        *self.statuses.entry(status).or_default() += 1;
        *self.kinds.entry(got.kind()).or_default() += 1;
        if !matches!(got, Got::Verified { .. }) {
            let key = match got.status() {
                Some(s) if s != 200 => format!("{} {s}", got.kind()),
                _ => got.kind().to_owned(),
            };
            let samples = self.samples.entry(key).or_default();
            if samples.len() < 2 {
                samples.push(got.short());
            }
        }
        match got {
            Got::Verified { bytes } | Got::Aborted { bytes, .. } => self.bytes += bytes,
            Got::Corrupt { bytes } => {
                self.bytes += bytes;
                self.corrupt += 1;
            }
            _ => {}
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.bytes += other.bytes;
        self.corrupt += other.corrupt;
        for (k, v) in &other.statuses {
            *self.statuses.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.kinds {
            *self.kinds.entry(k).or_default() += v;
        }
        for (k, v) in &other.samples {
            let samples = self.samples.entry(k.clone()).or_default();
            for sample in v {
                if samples.len() < 2 {
                    samples.push(sample.clone());
                }
            }
        }
    }

    fn print(&self, drill: &str) {
        println!(
            "[{drill}] requests={} bytes={} ({:.1} MiB) statuses={:?} outcomes={:?} corrupt_bodies={}",
            self.requests,
            self.bytes,
            self.bytes as f64 / MIB as f64,
            self.statuses,
            self.kinds,
            self.corrupt
        );
    }

    /// Examples of each kind of error.
    fn print_samples(&self, drill: &str) {
        for (kind, samples) in &self.samples {
            for sample in samples {
                println!("[{drill}]   e.g. {kind}: {sample}");
            }
        }
    }
}

/// Soft checks: misses are collected and reported together at the end of a drill.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            println!("  FINDING: {what}");
            self.0.push(what);
        }
    }

    fn assert_none(self, drill: &str) {
        assert!(
            self.0.is_empty(),
            "[{drill}] {} finding(s):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

/// Regular files under `dir`, recursively, with their sizes.
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            let len = e.metadata().map_or(0, |m| m.len());
            out.push((e.path(), len));
        }
    }
    out
}

/// Temp files of fills (not readyz's write probe).
fn temp_files(cache: &Path) -> Vec<(PathBuf, u64)> {
    files_under(&cache.join("tmp"))
        .into_iter()
        .filter(|(p, _)| !p.ends_with(".berth-write-check"))
        .collect()
}

fn blob_file(cache: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Waits (bounded) until `<cache>/tmp` holds no temp file besides those in `known`; returns
/// the others that are left.
async fn temp_files_settled(
    cache: &Path,
    known: &[(PathBuf, u64)],
    within: Duration,
) -> Vec<(PathBuf, u64)> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<(PathBuf, u64)> = temp_files(cache)
            .into_iter()
            .filter(|(p, _)| !known.iter().any(|(k, _)| k == p))
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded, blocking) until `berth_cache_blobs` in `metrics()` is at least `n`. A fill
/// commits its blob to the cache after the client may have its last byte, so a cache hit
/// right after a fill is not guaranteed without this.
fn wait_blobs_indexed(metrics: impl Fn() -> String, n: usize) -> Result<f64, String> {
    support::wait_for("blobs indexed", Duration::from_secs(5), || {
        let have = sample(&metrics(), "berth_cache_blobs ");
        if have >= n as f64 {
            support::Probe::Ready(have)
        } else {
            support::Probe::Pending(format!("berth_cache_blobs {have}, want {n}"))
        }
    })
}

/// An in-process berth config: one default `docker.io` registry on `upstream`.
fn inproc_config(
    upstream: &str,
    cache: &Path,
    tag_ttl: &str,
    read_timeout: &str,
    max_size: &str,
) -> berth::config::Config {
    berth::config::Config::parse(&format!(
        r#"
        {}
        max_size = "{max_size}"
        tag_ttl = "{tag_ttl}"
        [[registry]]
        name = "docker.io"
        default = true
        endpoints = ["{upstream}"]
        connect_timeout = "1s"
        read_timeout = "{read_timeout}"
        "#,
        fake_upstream::server_toml(cache)
    ))
    .expect("drill config is valid")
}

async fn start_inproc(config: berth::config::Config) -> berth::Running {
    let running = berth::start(config).await.expect("berth starts");
    let client = reqwest::Client::new();
    for _ in 0..250 {
        let r = client
            .get(format!("http://{}/readyz", running.admin_addr))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            return running;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("berth not ready after 5 s");
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .expect("client")
}

/// A TCP listener that only counts the connections it gets (and closes them).
struct ConnRecorder {
    port: u16,
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnRecorder {
    async fn start() -> ConnRecorder {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let port = l.local_addr().expect("addr").port();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        ConnRecorder { port, count, task }
    }

    fn connections(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for ConnRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of one metrics sample line (0 when absent).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The metric lines starting with `prefix` (for printing).
fn metric_lines(metrics: &str, prefixes: &[&str]) -> String {
    metrics
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Drill 1: hostile upstream answers
// ---------------------------------------------------------------------------------------------

#[test]
fn drill1_hostile_upstream_answers() {
    run_drill(hostile_upstream_answers());
}

async fn hostile_upstream_answers() {
    let started = Instant::now();
    let mut f = Findings::default();
    let mut tally = Tally::default();
    let up = FakeUpstream::start().await;
    let recorder = ConnRecorder::start().await;
    let blob = random_bytes(MIB);
    let digest = up.add_blob(blob.clone());
    let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
    let (app_manifest, _) =
        up.add_image("library/app", "v1", &config, std::slice::from_ref(&digest));
    // A 5 MiB manifest with its Content-Length.
    let mut huge = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","annotations":{"pad":""#.to_vec();
    huge.resize(5 * MIB - 3, b'a');
    huge.extend_from_slice(b"\"}}");
    let huge = Bytes::from(huge);
    let huge_digest = sha256(&huge);
    up.add_manifest("library/huge", "v1", OCI_MANIFEST, huge);
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().to_owned();
    let berth = start_inproc(inproc_config(&up.url(), &cache, "10m", "2s", "1GiB")).await;
    let c = client();
    let url = |p: &str| format!("http://{}{p}", berth.addr);
    let blob_url = url(&format!("/v2/library/app/blobs/{digest}"));
    let manifests_of = |repo: &str| files_under(&cache.join("manifests/docker.io").join(repo));

    // 1a. A 5 MiB manifest, announced by its Content-Length.
    let (got, _) = fetch(&c, &url("/v2/library/huge/manifests/v1")).await;
    tally.record(&got);
    println!("[hostile] 5 MiB manifest (Content-Length): {}", got.short());
    assert!(got.is_5xx_oci(), "oversized manifest: {}", got.short());
    assert!(
        manifests_of("library/huge").is_empty(),
        "oversized manifest cached: {:?}",
        manifests_of("library/huge")
    );
    assert!(
        !files_under(&cache.join("manifests")).iter().any(|(p, _)| p
            .to_string_lossy()
            .contains(huge_digest.trim_start_matches("sha256:"))),
        "oversized manifest stored somewhere"
    );

    // 1b. A 5 MiB manifest streamed without a Content-Length (the limit must hold anyway).
    up.set(Behaviour::HugeManifest);
    let (got, _) = fetch(&c, &url("/v2/library/chunked/manifests/v1")).await;
    tally.record(&got);
    println!("[hostile] 5 MiB manifest (chunked): {}", got.short());
    assert!(
        got.is_5xx_oci(),
        "oversized chunked manifest: {}",
        got.short()
    );
    assert!(manifests_of("library/chunked").is_empty());
    up.set(Behaviour::Normal);

    // The real manifest, so blob requests are for a known member.
    let (got, _) = fetch(&c, &url("/v2/library/app/manifests/v1")).await;
    tally.record(&got);
    assert!(matches!(got, Got::Verified { .. }), "{}", got.short());

    // 1c. Content-Length larger than the bytes sent, then the connection closes.
    up.set(Behaviour::LyingLength);
    let temp_files_before = temp_files(&cache);
    let got = fetch_blob(&c, &blob_url, &digest).await;
    tally.record(&got);
    println!("[hostile] lying Content-Length: {}", got.short());
    assert!(
        matches!(got, Got::Aborted { .. }) || got.is_5xx_oci(),
        "lying length: the client must see a broken body or a 5xx: {}",
        got.short()
    );
    assert!(
        !blob_file(&cache, &digest).exists(),
        "lying-length blob cached"
    );
    let left = temp_files_settled(&cache, &temp_files_before, Duration::from_secs(2)).await;
    // BUG (reported to the lead, fails today): `stream_to_disk` in src/cache/fill.rs returns
    // on an upstream error (cut, short body, stall, digest mismatch) without removing its
    // temp file; `<cache>/tmp` is only emptied at start-up, and is not counted in max_size.
    f.check(
        left.is_empty(),
        format!("lying length: temp files left in <cache>/tmp after the fill failed: {left:?}"),
    );

    // 1d. Redirects berth must refuse: another scheme, a local port that is not an endpoint,
    // and an endless loop.
    let rec = recorder.port;
    let refused = [
        ("ftp", format!("ftp://127.0.0.1:{rec}/{{digest}}")),
        (
            "loopback non-endpoint",
            format!("http://127.0.0.1:{rec}/v2/library/app/blobs/{{digest}}"),
        ),
        (
            "localhost non-endpoint",
            format!("http://localhost:{rec}/x/{{digest}}"),
        ),
        ("endless loop", format!("{}/loop/0", up.url())),
    ];
    for (what, to) in refused {
        up.set(Behaviour::Redirect(to));
        let loops_before = up.count("GET /loop/");
        let t = Instant::now();
        let got = fetch_blob(&c, &blob_url, &digest).await;
        tally.record(&got);
        let hops = up.count("GET /loop/") - loops_before;
        println!(
            "[hostile] redirect ({what}): {} in {:?}, loop hops followed={hops}",
            got.short(),
            t.elapsed()
        );
        assert!(got.is_5xx_oci(), "redirect ({what}): {}", got.short());
        assert!(hops <= 5, "redirect loop followed {hops} times");
        assert!(
            !blob_file(&cache, &digest).exists(),
            "redirect ({what}): cached"
        );
    }
    assert_eq!(
        recorder.connections(),
        0,
        "a redirect to a forbidden local port was followed"
    );
    let m = String::from_utf8_lossy(&berth.metrics.render()).into_owned();
    println!(
        "[hostile] after the refused redirects: recorder connections={} (must be 0)\n{}",
        recorder.connections(),
        metric_lines(&m, &["berth_upstream_up"])
    );
    // Control: a redirect to a configured endpoint (a "CDN" path on the fake) is followed.
    up.set(Behaviour::Redirect(format!("{}/cdn/{{digest}}", up.url())));
    let got = fetch_blob(&c, &blob_url, &digest).await;
    tally.record(&got);
    println!(
        "[hostile] redirect to a configured endpoint (control): {}",
        got.short()
    );
    assert!(
        matches!(got, Got::Verified { .. }),
        "control: {}",
        got.short()
    );
    let indexed = wait_blobs_indexed(
        || String::from_utf8_lossy(&berth.metrics.render()).into_owned(),
        1,
    );
    assert!(indexed.is_ok(), "control blob not cached: {indexed:?}");
    assert!(
        blob_file(&cache, &digest).exists(),
        "control blob not in blobs/"
    );
    up.set(Behaviour::Normal);

    // 1e. A token endpoint that answers garbage.
    *up.state.token.lock().expect("lock") = Some("sekrit".into());
    let garbage = [
        ("not JSON", "this is not json <html>".to_owned()),
        (
            "JSON without a token",
            r#"{"nope":true,"expires_in":300}"#.to_owned(),
        ),
        ("token of the wrong type", r#"{"token":42}"#.to_owned()),
        (
            "100 KiB of JSON",
            format!(r#"{{"token":"{}"}}"#, "t".repeat(100 * KIB)),
        ),
    ];
    for (i, (what, body)) in garbage.into_iter().enumerate() {
        up.set(Behaviour::GarbageToken(body));
        let before = up.count("GET /token");
        let t = Instant::now();
        let (got, _) = fetch(&c, &url(&format!("/v2/library/tok{i}/manifests/v1"))).await;
        tally.record(&got);
        println!(
            "[hostile] token endpoint answers {what}: {} in {:?} (token requests: {})",
            got.short(),
            t.elapsed(),
            up.count("GET /token") - before
        );
        assert!(got.is_5xx_oci(), "garbage token ({what}): {}", got.short());
        assert!(manifests_of(&format!("library/tok{i}")).is_empty());
    }
    // Control: a real token works afterwards (nothing bad was cached as a token).
    up.set(Behaviour::Normal);
    up.add_image("library/tok0", "v1", &config, &[]);
    let (got, _) = fetch(&c, &url("/v2/library/tok0/manifests/v1")).await;
    tally.record(&got);
    println!("[hostile] real token afterwards (control): {}", got.short());
    assert!(matches!(got, Got::Verified { .. }), "{}", got.short());

    // Nothing from the hostile answers is in the cache.
    let blobs = files_under(&cache.join("blobs"));
    assert_eq!(blobs.len(), 1, "only the control blob is cached: {blobs:?}");
    let m = String::from_utf8_lossy(&berth.metrics.render()).into_owned();
    tally.print("hostile");
    println!(
        "[hostile] upstream requests={} cached blobs={} app manifest={app_manifest} elapsed={:?}\n{}",
        up.requests().len(),
        blobs.len(),
        started.elapsed(),
        metric_lines(&m, &["berth_fill_failures_total", "berth_cache_blobs "])
    );
    assert_eq!(tally.corrupt, 0);
    berth.stop().await;
    f.assert_none("hostile");
}

// ---------------------------------------------------------------------------------------------
// Drill 2: kill -9 mid-fill
// ---------------------------------------------------------------------------------------------

#[test]
fn drill2_kill_9_mid_fill() {
    run_drill(kill_9_mid_fill());
}

async fn kill_9_mid_fill() {
    let started = Instant::now();
    let mut f = Findings::default();
    let mut tally = Tally::default();
    let up = FakeUpstream::start().await;
    let data = random_bytes(32 * MIB);
    let digest = up.add_blob(data.clone());
    // 64 KiB every 8 ms: 32 MiB take about 4 s.
    up.set(Behaviour::Slow(Duration::from_millis(8)));
    let work = tempfile::Builder::new()
        .prefix("drill-kill-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let cache = work.path().join("cache");
    // Berth is a child process here (the blocking fixture calls run on the test's thread; the
    // fake upstream runs on the runtime's workers).
    let mut berth = Berth::start(&support::berth_config(&up.url(), &cache));
    let pid1 = berth.pid();
    let c = client();
    let blob_url = format!("{}/v2/library/big/blobs/{digest}", berth.url());
    let get = {
        let (c, u, d) = (c.clone(), blob_url.clone(), digest.clone());
        tokio::spawn(async move { fetch_blob(&c, &u, &d).await })
    };
    // Wait until the fill's temp file has some bytes (bounded).
    let deadline = Instant::now() + Duration::from_secs(15);
    let partial = loop {
        let t = temp_files(&cache);
        if let Some((p, n)) = t.into_iter().find(|(_, n)| *n >= 512 * KIB as u64) {
            break (p, n);
        }
        assert!(
            Instant::now() < deadline,
            "no temp file with bytes in {}/tmp after 15 s",
            cache.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let killed_at = Instant::now();
    berth.kill();
    println!(
        "[kill-9] killed berth (pid {pid1:?}) {:?} after start, temp file {} had {} bytes",
        started.elapsed(),
        partial.0.file_name().unwrap_or_default().to_string_lossy(),
        partial.1
    );
    let got = tokio::time::timeout(Duration::from_secs(20), get)
        .await
        .expect("the client noticed the crash within 20 s")
        .expect("client task");
    tally.record(&got);
    println!(
        "[kill-9] client saw: {} ({:?} after the kill)",
        got.short(),
        killed_at.elapsed()
    );
    assert_eq!(tally.corrupt, 0, "corrupt body");
    assert!(
        matches!(got, Got::Aborted { bytes, .. } if bytes < data.len() as u64)
            || matches!(got, Got::Failed(_)),
        "the client must see an incomplete body, never a complete 200: {}",
        got.short()
    );
    let left_before = temp_files(&cache);
    println!("[kill-9] temp files after the crash (before restart): {left_before:?}");

    berth.restart();
    let ready = support::wait_for(
        "berth /readyz",
        Duration::from_secs(20),
        || match http_status(berth.admin_addr(), "/readyz") {
            Ok(200) => support::Probe::Ready(()),
            other => support::Probe::Pending(format!("{other:?}")),
        },
    );
    assert!(ready.is_ok(), "{ready:?}");
    let left = temp_files(&cache);
    assert!(left.is_empty(), "temp files survived the restart: {left:?}");
    assert!(
        !blob_file(&cache, &digest).exists(),
        "the half-filled blob is in blobs/"
    );
    assert!(
        files_under(&cache.join("blobs")).is_empty(),
        "blobs/ after restart: {:?}",
        files_under(&cache.join("blobs"))
    );

    // Fill again, at full speed: a second upstream GET, a verified body, cached.
    up.set(Behaviour::Normal);
    let got = fetch_blob(&c, &blob_url, &digest).await;
    tally.record(&got);
    println!("[kill-9] after restart: {}", got.short());
    assert!(matches!(got, Got::Verified { bytes } if bytes == data.len() as u64));
    let gets = up.count(&format!("GET /v2/library/big/blobs/{digest}"));
    assert_eq!(gets, 2, "upstream blob GETs");
    let admin = berth.admin_addr();
    let cached = wait_blobs_indexed(|| http_get_text(admin, "/metrics").unwrap_or_default(), 1);
    f.check(
        cached.is_ok() && blob_file(&cache, &digest).exists(),
        format!("the refilled blob was not committed to blobs/: {cached:?}"),
    );
    let got = fetch_blob(&c, &blob_url, &digest).await;
    tally.record(&got);
    assert!(matches!(got, Got::Verified { .. }), "{}", got.short());
    assert_eq!(
        up.count(&format!("GET /v2/library/big/blobs/{digest}")),
        2,
        "the third GET was a cache hit"
    );
    tally.print("kill-9");
    println!(
        "[kill-9] upstream blob GETs={gets} pid before={pid1:?} after={:?} panics in log={} elapsed={:?}",
        berth.pid(),
        berth.logs().matches("panicked").count(),
        started.elapsed()
    );
    assert!(!berth.logs().contains("panicked"));
    f.assert_none("kill-9");
}

// ---------------------------------------------------------------------------------------------
// Drill 3: upstream dies mid-stream, stalls, throttles, resets
// ---------------------------------------------------------------------------------------------

#[test]
fn drill3_upstream_dies_stalls_throttles_resets() {
    run_drill(upstream_dies_stalls_throttles_resets());
}

async fn upstream_dies_stalls_throttles_resets() {
    let started = Instant::now();
    let mut f = Findings::default();
    let mut tally = Tally::default();
    let up = FakeUpstream::start().await;
    let port = up.addr.port();
    let state = up.state.clone();
    let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
    let layer = |n: usize| {
        let d = random_bytes(n);
        (up.add_blob(d.clone()), d)
    };
    let app = [layer(MIB), layer(MIB)];
    let other = layer(MIB);
    let late = layer(MIB);
    let (app_manifest, _) = up.add_image(
        "library/app",
        "v1",
        &config,
        &[app[0].0.clone(), app[1].0.clone()],
    );
    up.add_image(
        "library/other",
        "v1",
        &config,
        std::slice::from_ref(&other.0),
    );
    up.add_image("library/late", "v1", &config, std::slice::from_ref(&late.0));
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().to_owned();
    // tag_ttl 0s: every tag request revalidates, so a failing upstream shows at once.
    let berth = start_inproc(inproc_config(&up.url(), &cache, "0s", "1s", "1GiB")).await;
    let c = client();
    let url = |p: &str| format!("http://{}{p}", berth.addr);
    let blob_url = |repo: &str, d: &str| url(&format!("/v2/{repo}/blobs/{d}"));
    let digest_of = |got: &Got, body: &Bytes| match got {
        Got::Verified { .. } => sha256(body),
        _ => String::new(),
    };

    let (got, _) = fetch(&c, &url("/v2/library/app/manifests/v1")).await;
    tally.record(&got);
    assert!(matches!(got, Got::Verified { .. }), "{}", got.short());

    // 3a. The upstream dies mid-stream (the body is cut), then heals.
    up.set(Behaviour::Cut);
    let temp_files_before = temp_files(&cache);
    let got = fetch_blob(&c, &blob_url("library/app", &app[0].0), &app[0].0).await;
    tally.record(&got);
    println!("[upstream] cut mid-stream: {}", got.short());
    assert!(
        matches!(got, Got::Aborted { .. }) || got.is_5xx_oci(),
        "cut: {}",
        got.short()
    );
    assert!(!blob_file(&cache, &app[0].0).exists(), "cut blob cached");
    let left = temp_files_settled(&cache, &temp_files_before, Duration::from_secs(2)).await;
    // BUG (reported to the lead, fails today): `stream_to_disk` in src/cache/fill.rs returns
    // on an upstream error (cut, short body, stall, digest mismatch) without removing its
    // temp file; `<cache>/tmp` is only emptied at start-up, and is not counted in max_size.
    f.check(
        left.is_empty(),
        format!("cut: temp files left in <cache>/tmp after the fill failed: {left:?}"),
    );
    up.set(Behaviour::Normal);
    let got = fetch_blob(&c, &blob_url("library/app", &app[0].0), &app[0].0).await;
    tally.record(&got);
    println!("[upstream] after the cut, upstream normal: {}", got.short());
    assert!(matches!(got, Got::Verified { .. }), "{}", got.short());
    // Served from the cache below, while the upstream fails.
    let indexed = wait_blobs_indexed(
        || String::from_utf8_lossy(&berth.metrics.render()).into_owned(),
        1,
    );
    assert!(indexed.is_ok(), "refilled blob not cached: {indexed:?}");

    // 3b. Stalls longer than read_timeout (1s): mid-body, and before any header.
    up.set(Behaviour::StallMidway(Duration::from_secs(5)));
    let temp_files_before = temp_files(&cache);
    let t = Instant::now();
    let got = fetch_blob(&c, &blob_url("library/app", &app[1].0), &app[1].0).await;
    let stalled_for = t.elapsed();
    tally.record(&got);
    println!(
        "[upstream] stall mid-body (5 s): {} after {stalled_for:?}",
        got.short()
    );
    assert!(
        matches!(got, Got::Aborted { .. }) || got.is_5xx_oci(),
        "stall mid-body: {}",
        got.short()
    );
    assert!(
        stalled_for < Duration::from_secs(4),
        "a 1 s read_timeout took {stalled_for:?} to end a stalled body"
    );
    assert!(
        !blob_file(&cache, &app[1].0).exists(),
        "stalled blob cached"
    );
    let left = temp_files_settled(&cache, &temp_files_before, Duration::from_secs(2)).await;
    // BUG (reported): the temp file of the failed fill stays, as above.
    f.check(
        left.is_empty(),
        format!("stall: temp files left in <cache>/tmp after the fill failed: {left:?}"),
    );
    up.set(Behaviour::Stall(Duration::from_secs(5)));
    let t = Instant::now();
    let (got, _) = fetch(&c, &url("/v2/library/other/manifests/v1")).await;
    let stalled_for = t.elapsed();
    tally.record(&got);
    println!(
        "[upstream] stall before headers, uncached manifest: {} after {stalled_for:?}",
        got.short()
    );
    assert!(got.is_5xx_oci(), "stall before headers: {}", got.short());
    assert!(stalled_for < Duration::from_secs(4), "took {stalled_for:?}");
    let t = Instant::now();
    let (got, body) = fetch(&c, &url("/v2/library/app/manifests/v1")).await;
    let stalled_for = t.elapsed();
    tally.record(&got);
    println!(
        "[upstream] stall before headers, cached tag (ttl 0s): {} after {stalled_for:?}",
        got.short()
    );
    assert_eq!(
        digest_of(&got, &body),
        app_manifest,
        "stale manifest expected"
    );
    assert!(stalled_for < Duration::from_secs(4), "took {stalled_for:?}");
    up.set(Behaviour::Normal);

    // 3c. 503, then 429, for a while: cached tag served stale, uncached → OCI errors.
    let mut stale_served = 0;
    for code in [503u16, 429] {
        up.set(Behaviour::Status(code));
        let until = Instant::now() + Duration::from_millis(1500);
        let mut rounds = 0;
        let mut missing_retry_after = 0;
        while Instant::now() < until && rounds < 20 {
            rounds += 1;
            let (got, body) = fetch(&c, &url("/v2/library/app/manifests/v1")).await;
            tally.record(&got);
            assert_eq!(
                digest_of(&got, &body),
                app_manifest,
                "upstream {code}: stale manifest expected: {}",
                got.short()
            );
            stale_served += 1;
            let (m, _) = fetch(&c, &url("/v2/library/other/manifests/v1")).await;
            let b = fetch_blob(&c, &blob_url("library/other", &other.0), &other.0).await;
            for (what, got) in [("manifest", &m), ("blob", &b)] {
                tally.record(got);
                if rounds == 1 {
                    println!(
                        "[upstream] upstream {code}, uncached {what}: {}",
                        got.short()
                    );
                }
                assert_eq!(
                    got.oci_error().map(|(s, _)| s),
                    Some(code),
                    "upstream {code}, uncached {what}: {}",
                    got.short()
                );
                if !matches!(
                    got,
                    Got::Status {
                        retry_after: Some(_),
                        ..
                    }
                ) {
                    missing_retry_after += 1;
                }
            }
            // Cached blobs keep being served.
            let got = fetch_blob(&c, &blob_url("library/app", &app[0].0), &app[0].0).await;
            tally.record(&got);
            assert!(matches!(got, Got::Verified { .. }), "{}", got.short());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // BUG (reported to the lead, fails today for 503): upstream sent `Retry-After: 7` with
        // its 503, but `upstream_error` in src/mirror/mod.rs passes Retry-After on only for
        // 429; a 503 with nothing cached reaches clients without it.
        f.check(
            missing_retry_after == 0,
            format!(
                "upstream {code}: {missing_retry_after} of {} uncached answers had no Retry-After",
                2 * rounds
            ),
        );
    }
    println!("[upstream] stale manifest answers during 503/429: {stale_served}");
    // Upstream heals: fresh fills work at once, without a restart.
    up.set(Behaviour::Normal);
    let (got, _) = fetch(&c, &url("/v2/library/other/manifests/v1")).await;
    tally.record(&got);
    assert!(
        matches!(got, Got::Verified { .. }),
        "after 503/429: {}",
        got.short()
    );
    let got = fetch_blob(&c, &blob_url("library/other", &other.0), &other.0).await;
    tally.record(&got);
    println!("[upstream] after 503/429, uncached blob: {}", got.short());
    assert!(matches!(got, Got::Verified { .. }), "{}", got.short());

    // 3d. The upstream goes away (listener and every connection closed)…
    let requests_before_down = state.log.lock().expect("lock").len();
    drop(up);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (got, _) = fetch(&c, &url("/v2/library/late/manifests/v1")).await;
    tally.record(&got);
    println!(
        "[upstream] upstream down, uncached manifest: {}",
        got.short()
    );
    assert_eq!(
        got.oci_error().map(|(s, _)| s),
        Some(502),
        "upstream down: {}",
        got.short()
    );
    let got = fetch_blob(&c, &blob_url("library/late", &late.0), &late.0).await;
    tally.record(&got);
    println!("[upstream] upstream down, uncached blob: {}", got.short());
    assert_eq!(
        got.oci_error().map(|(s, _)| s),
        Some(502),
        "{}",
        got.short()
    );
    let (got, body) = fetch(&c, &url("/v2/library/app/manifests/v1")).await;
    tally.record(&got);
    assert_eq!(digest_of(&got, &body), app_manifest, "stale while down");
    let got = fetch_blob(&c, &blob_url("library/app", &app[0].0), &app[0].0).await;
    tally.record(&got);
    assert!(
        matches!(got, Got::Verified { .. }),
        "cached while down: {}",
        got.short()
    );
    // …comes back on the same port resetting every connection…
    *state.behaviour.lock().expect("lock") = Some(Behaviour::Reset);
    let resets_before = state.connections.load(Ordering::Relaxed);
    let up = FakeUpstream::start_on_port(port, state.clone()).await;
    let (got, _) = fetch(&c, &url("/v2/library/late/manifests/v1")).await;
    tally.record(&got);
    println!(
        "[upstream] upstream resets connections, uncached manifest: {}",
        got.short()
    );
    assert_eq!(
        got.oci_error().map(|(s, _)| s),
        Some(502),
        "{}",
        got.short()
    );
    let got = fetch_blob(&c, &blob_url("library/late", &late.0), &late.0).await;
    tally.record(&got);
    assert_eq!(
        got.oci_error().map(|(s, _)| s),
        Some(502),
        "{}",
        got.short()
    );
    let resets = state.connections.load(Ordering::Relaxed) - resets_before;
    // …and heals: berth recovers by itself within the endpoint cool-down.
    up.set(Behaviour::Normal);
    let healed = Instant::now();
    let mut polls = 0;
    let recovered = loop {
        polls += 1;
        let (got, _) = fetch(&c, &url("/v2/library/late/manifests/v1")).await;
        tally.record(&got);
        if matches!(got, Got::Verified { .. }) {
            break Some(healed.elapsed());
        }
        if healed.elapsed() > Duration::from_secs(15) {
            println!("[upstream] still failing after 15 s: {}", got.short());
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "[upstream] recovered {recovered:?} after the upstream healed ({polls} polls, {resets} connections reset)"
    );
    let recovered = recovered.expect("berth recovered within 15 s");
    assert!(
        recovered <= Duration::from_secs(12),
        "recovery took {recovered:?}"
    );
    let got = fetch_blob(&c, &blob_url("library/late", &late.0), &late.0).await;
    tally.record(&got);
    assert!(
        matches!(got, Got::Verified { .. }),
        "after recovery: {}",
        got.short()
    );

    let m = String::from_utf8_lossy(&berth.metrics.render()).into_owned();
    tally.print("upstream");
    println!(
        "[upstream] upstream requests={} (before going down: {requests_before_down}) elapsed={:?}\n{}",
        state.log.lock().expect("lock").len(),
        started.elapsed(),
        metric_lines(
            &m,
            &[
                "berth_fill_failures_total",
                "berth_cache_requests_total{kind=\"manifest\",result=\"stale\"}",
                "berth_upstream_up"
            ]
        )
    );
    assert_eq!(tally.corrupt, 0);
    berth.stop().await;
    drop(up);
    f.assert_none("upstream");
}

// ---------------------------------------------------------------------------------------------
// Drill 4: disk full
// ---------------------------------------------------------------------------------------------

/// A small tmpfs mounted on a temp dir (root only), unmounted on drop, even on panic
/// (lazily, if something still holds a file open on it).
struct Tmpfs {
    path: PathBuf,
    // Removed after the unmount.
    _dir: tempfile::TempDir,
}

fn cstring(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("drill-disk-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let path = dir.path().to_owned();
        let (target, fstype) = (cstring(&path), std::ffi::CString::new("tmpfs").expect("c"));
        let data = std::ffi::CString::new(format!("size={size},mode=0755")).expect("c");
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount -t tmpfs -o size={size} tmpfs {}: {} (this drill needs root)",
            path.display(),
            std::io::Error::last_os_error()
        );
        Tmpfs { path, _dir: dir }
    }

    /// (size, used) in bytes.
    fn usage(&self) -> (u64, u64) {
        let target = cstring(&self.path);
        // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(target.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs");
        let frsize = st.f_frsize as u64;
        (
            st.f_blocks as u64 * frsize,
            (st.f_blocks as u64 - st.f_bfree as u64) * frsize,
        )
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = cstring(&self.path);
        // SAFETY: a valid C string; unmounting our own mount.
        if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
            eprintln!(
                "umount {}: {}; detaching it lazily",
                self.path.display(),
                std::io::Error::last_os_error()
            );
            // SAFETY: as above.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[test]
fn drill4_disk_full() {
    run_drill(disk_full());
}

async fn disk_full() {
    let started = Instant::now();
    let mut f = Findings::default();
    let mut tally = Tally::default();
    // Declared before berth, so berth is stopped before the unmount.
    let disk = Tmpfs::mount("8m");
    let cache = disk.path.join("cache");
    let up = FakeUpstream::start().await;
    let big = random_bytes(12 * MIB);
    let big_digest = up.add_blob(big.clone());
    let smalls: Vec<(String, Bytes)> = (0..4)
        .map(|_| {
            let d = random_bytes(MIB);
            (up.add_blob(d.clone()), d)
        })
        .collect();
    let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
    let mut layers = vec![big_digest.clone()];
    layers.extend(smalls.iter().map(|(d, _)| d.clone()));
    up.add_image("library/full", "v1", &config, &layers);
    // max_size larger than the disk, on purpose.
    let toml = support::berth_config_with(&up.url(), &cache, "64MiB", r#"read_timeout = "5s""#);
    let berth = Berth::start(&toml);
    let c = client();
    let url = |p: &str| format!("{}{p}", berth.url());
    let admin = |p: &str| format!("{}{p}", berth.admin_url());
    let big_url = url(&format!("/v2/library/full/blobs/{big_digest}"));
    let (size, used) = disk.usage();
    println!("[disk] tmpfs size={size} used={used} before");
    let (got, _) = fetch(&c, &url("/v2/library/full/manifests/v1")).await;
    tally.record(&got);
    assert!(matches!(got, Got::Verified { .. }), "{}", got.short());

    // 4a. A 12 MiB blob on an 8 MiB disk, from a paced upstream (~30 MB/s); berth must keep
    // answering while the disk is full.
    for (run, behaviour) in [
        ("paced upstream", Behaviour::Slow(Duration::from_millis(2))),
        ("full-speed upstream", Behaviour::Normal),
    ] {
        up.set(behaviour);
        let temp_files_before = temp_files(&cache);
        let t = Instant::now();
        let probes = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let health = c
                .get(admin("/healthz"))
                .send()
                .await
                .map(|r| r.status().as_u16());
            let ready = c
                .get(admin("/readyz"))
                .send()
                .await
                .map(|r| r.status().as_u16());
            let (m, _) = fetch(&c, &url("/v2/library/full/manifests/v1")).await;
            (health.ok(), ready.ok(), m)
        };
        let (got, (health, ready, manifest)) =
            tokio::join!(fetch_blob(&c, &big_url, &big_digest), probes);
        tally.record(&got);
        tally.record(&manifest);
        let (_, used_after) = disk.usage();
        println!(
            "[disk] 12 MiB blob, {run}: {} in {:?}; during the fill: /healthz {health:?}, /readyz {ready:?}, cached manifest {}; tmpfs used after={used_after}",
            got.short(),
            t.elapsed(),
            manifest.kind()
        );
        assert_eq!(tally.corrupt, 0, "corrupt body");
        f.check(
            matches!(got, Got::Verified { bytes } if bytes == big.len() as u64),
            format!(
                "disk full, {run}: the client did not get the complete verified blob: {}",
                got.short()
            ),
        );
        assert_eq!(health, Some(200), "/healthz during the fill");
        assert!(
            matches!(manifest, Got::Verified { .. }),
            "cached manifest during the fill: {}",
            manifest.short()
        );
        assert!(
            !blob_file(&cache, &big_digest).exists(),
            "a 12 MiB blob on an 8 MiB disk is in blobs/"
        );
        let left = temp_files_settled(&cache, &temp_files_before, Duration::from_secs(3)).await;
        f.check(
            left.is_empty(),
            format!("disk full, {run}: temp files left in <cache>/tmp: {left:?}"),
        );
        let partial: Vec<_> = files_under(&cache.join("blobs"));
        assert!(
            partial.is_empty(),
            "blobs/ after the failed store: {partial:?}"
        );
    }

    // A client slower than the upstream (8 MiB/s) while the disk is full: documented, not
    // asserted. With no temp file, only the last 4 MiB of the blob stay in memory, so a
    // reader that falls further behind loses its stream.
    up.set(Behaviour::Normal);
    let t = Instant::now();
    let got = fetch_blob_paced(&c, &big_url, &big_digest, 8 * MIB as u64).await;
    tally.record(&got);
    assert_eq!(tally.corrupt, 0, "corrupt body");
    println!(
        "[disk] 12 MiB blob, full-speed upstream, client reading 8 MiB/s: {} in {:?}",
        got.short(),
        t.elapsed()
    );
    let _ = temp_files_settled(&cache, &[], Duration::from_secs(3)).await;

    // 4b. Small blobs that fit: cached and served from the cache.
    up.set(Behaviour::Normal);
    for (d, data) in &smalls {
        let u = url(&format!("/v2/library/full/blobs/{d}"));
        let got = fetch_blob(&c, &u, d).await;
        tally.record(&got);
        assert!(
            matches!(got, Got::Verified { bytes } if bytes == data.len() as u64),
            "small blob: {}",
            got.short()
        );
    }
    let admin = berth.admin_addr();
    let committed = wait_blobs_indexed(
        || http_get_text(admin, "/metrics").unwrap_or_default(),
        smalls.len(),
    );
    let on_disk = smalls
        .iter()
        .filter(|(d, _)| blob_file(&cache, d).exists())
        .count();
    f.check(
        committed.is_ok() && on_disk == smalls.len(),
        format!(
            "small blobs after the disk-full fill were not cached: {committed:?}, {on_disk} on disk"
        ),
    );
    for (d, _) in &smalls {
        let got = fetch_blob(&c, &url(&format!("/v2/library/full/blobs/{d}")), d).await;
        tally.record(&got);
        assert!(matches!(got, Got::Verified { .. }), "{}", got.short());
        assert_eq!(
            up.count(&format!("GET /v2/library/full/blobs/{d}")),
            1,
            "second GET of a small blob was not a cache hit"
        );
    }
    // 4c. The disk fills up with cached blobs while max_size (64 MiB) is far away: on ENOSPC
    // berth evicts the least recently used blobs to make room, so every new blob is still
    // cached (and every client gets a verified body; berth keeps serving).
    let more: Vec<(String, Bytes)> = (0..5)
        .map(|_| {
            let d = random_bytes(MIB);
            (up.add_blob(d.clone()), d)
        })
        .collect();
    let mut layers2: Vec<String> = more.iter().map(|(d, _)| d.clone()).collect();
    layers2.push(config.clone());
    up.add_image("library/more", "v1", &config, &layers2);
    let (got, _) = fetch(&c, &url("/v2/library/more/manifests/v1")).await;
    tally.record(&got);
    assert!(matches!(got, Got::Verified { .. }), "{}", got.short());
    let mut outcomes = Vec::new();
    for (d, _) in &more {
        let temp_files_before = temp_files(&cache);
        let got = fetch_blob(&c, &url(&format!("/v2/library/more/blobs/{d}")), d).await;
        tally.record(&got);
        assert_eq!(tally.corrupt, 0, "corrupt body");
        f.check(
            matches!(got, Got::Verified { .. }),
            format!(
                "disk filling up: a 1 MiB blob was not delivered: {}",
                got.short()
            ),
        );
        // The fill has ended (committed or given up) once its temp file is gone.
        let _ = temp_files_settled(&cache, &temp_files_before, Duration::from_secs(3)).await;
        outcomes.push(if blob_file(&cache, d).exists() {
            "cached"
        } else {
            "served uncached"
        });
    }
    f.check(
        outcomes.iter().all(|o| *o == "cached"),
        format!("disk full: eviction did not make room for new blobs: {outcomes:?}"),
    );
    let ready_full = http_status(berth.admin_addr(), "/readyz").ok();
    // A manifest never seen before, with the disk full.
    let extra = up.add_blob(Bytes::from_static(b"extra"));
    up.add_image("library/late", "v1", &config, &[extra]);
    let (got, _) = fetch(&c, &url("/v2/library/late/manifests/v1")).await;
    tally.record(&got);
    let late_manifest_stored =
        !files_under(&cache.join("manifests/docker.io/library/late")).is_empty();
    println!(
        "[disk] disk filling with 5 more 1 MiB blobs (max_size 64 MiB): {outcomes:?}; /readyz with the disk full: {ready_full:?}; new manifest: {} (stored on disk: {late_manifest_stored})",
        got.short()
    );
    f.check(
        matches!(got, Got::Verified { .. }),
        format!("disk full: a new manifest was not served: {}", got.short()),
    );

    let health = http_status(berth.admin_addr(), "/healthz").ok();
    let ready = http_status(berth.admin_addr(), "/readyz").ok();
    let m = http_get_text(berth.admin_addr(), "/metrics").unwrap_or_default();
    let (_, used) = disk.usage();
    tally.print("disk");
    println!(
        "[disk] upstream GETs of the big blob={} small blobs cached={}/{} tmpfs used={used} /healthz={health:?} /readyz={ready:?} elapsed={:?}\n{}",
        up.count(&format!("GET /v2/library/full/blobs/{big_digest}")),
        smalls
            .iter()
            .filter(|(d, _)| blob_file(&cache, d).exists())
            .count(),
        smalls.len(),
        started.elapsed(),
        metric_lines(
            &m,
            &[
                "berth_fill_failures_total",
                "berth_cache_blobs ",
                "berth_cache_size_bytes "
            ]
        )
    );
    let logs = berth.logs();
    let disk_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(|l| l.trim())
        .collect::<Vec<_>>();
    println!("[disk] berth WARN/ERROR log lines: {}", disk_lines.len());
    for l in disk_lines.iter().take(8) {
        println!("[disk] log: {}", l.chars().take(300).collect::<String>());
    }
    assert_eq!(health, Some(200));
    assert!(!logs.contains("panicked"), "berth panicked");
    drop(berth);
    drop(disk);
    f.assert_none("disk");
}

// ---------------------------------------------------------------------------------------------
// Drill 5: soak with a flaky upstream
// ---------------------------------------------------------------------------------------------

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A process's open descriptors by kind: TCP connections from clients (local port
/// `listen`) and to the upstream (remote port `upstream`), other sockets, files under `dir`
/// (deleted ones apart), anything else.
fn fds_by_kind(pid: u32, dir: &Path, listen: u16, upstream: u16) -> BTreeMap<String, usize> {
    // inode → (local port, remote port, state) from /proc/net/tcp.
    let mut tcp: std::collections::HashMap<String, (u16, u16, String)> = Default::default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        let port = |a: &str| {
            a.rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                .unwrap_or(0)
        };
        let state = match cols[3] {
            "01" => "established",
            "06" => "time-wait",
            "08" => "close-wait",
            "0A" => "listen",
            other => other,
        };
        tcp.insert(
            cols[9].to_owned(),
            (port(cols[1]), port(cols[2]), state.to_owned()),
        );
    }
    let mut kinds = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return kinds;
    };
    for e in entries.flatten() {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        let kind = if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']'))
        {
            match tcp.get(inode) {
                Some((l, _, st)) if *l == listen && st != "listen" => format!("client tcp {st}"),
                Some((_, r, st)) if *r == upstream => format!("upstream tcp {st}"),
                Some((_, _, st)) => format!("other tcp {st}"),
                None => "socket (not tcp4)".to_owned(),
            }
        } else if target.starts_with(dir) {
            let rel = target
                .strip_prefix(dir)
                .unwrap_or(&target)
                .to_string_lossy()
                .into_owned();
            let top = rel.split('/').next().unwrap_or("").to_owned();
            format!(
                "cache file ({top}{})",
                if t.ends_with("(deleted)") {
                    ", deleted"
                } else {
                    ""
                }
            )
        } else {
            "other".to_owned()
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

/// Client connections berth still holds open (see [`fds_by_kind`]).
fn client_fds(kinds: &BTreeMap<String, usize>) -> usize {
    kinds
        .iter()
        .filter(|(k, _)| k.starts_with("client tcp"))
        .map(|(_, n)| n)
        .sum()
}

/// xorshift64*, one per client task: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn drill5_soak_flaky_upstream() {
    run_drill(soak_flaky_upstream());
}

async fn soak_flaky_upstream() {
    const CLIENTS: usize = 200;
    const BLOBS: usize = 40;
    const FAIL_EVERY: usize = 7;
    /// Generous: berth keeps up to 4 MiB of recent chunks per fill in flight.
    const RSS_LIMIT_MIB: u64 = 256;
    let started = Instant::now();
    let mut f = Findings::default();
    let soak = Duration::from_secs(
        std::env::var("SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20u64)
            .clamp(1, 300),
    );
    let up = FakeUpstream::start().await;
    let repos = ["library/alpha", "library/beta", "team/gamma", "team/delta"];
    let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
    // 40 blobs from 256 KiB to 4 MiB, 10 per repository.
    let blobs: Vec<(&str, String, u64)> = (0..BLOBS)
        .map(|i| {
            let size = 256 * KIB + i * (4 * MIB - 256 * KIB) / (BLOBS - 1);
            let digest = up.add_blob(random_bytes(size));
            (repos[i % repos.len()], digest, size as u64)
        })
        .collect();
    let total: u64 = blobs.iter().map(|b| b.2).sum();
    for repo in repos {
        let layers: Vec<String> = blobs
            .iter()
            .filter(|b| b.0 == repo)
            .map(|b| b.1.clone())
            .collect();
        up.add_image(repo, "v1", &config, &layers);
    }
    up.set(Behaviour::Flaky {
        fail_every: FAIL_EVERY,
    });
    let work = tempfile::Builder::new()
        .prefix("drill-soak-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let cache = work.path().join("cache");
    // max_size below the 85 MiB of blobs: evictions keep some blobs uncached throughout.
    let toml = support::berth_config_with(&up.url(), &cache, "64MiB", r#"read_timeout = "10s""#);
    let berth = Berth::start(&toml);
    let pid = berth.pid().expect("berth pid");
    let fds_before = open_fds(pid);
    println!(
        "[soak] {CLIENTS} clients for {soak:?}; {BLOBS} blobs ({:.1} MiB) in {} repositories; max_size 64 MiB; every {FAIL_EVERY}th upstream blob GET cut or 503",
        total as f64 / MIB as f64,
        repos.len()
    );

    // Memory sampler.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak_rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak_rss.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some((rss, _)) = memory_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(CLIENTS)
        .no_proxy()
        .build()
        .expect("client");
    let base = berth.url();
    let blobs = Arc::new(blobs);
    let deadline = Instant::now() + soak;
    let hard_stop = tokio::time::Instant::from_std(deadline + Duration::from_secs(5));
    let mut tasks = Vec::new();
    for t in 0..CLIENTS {
        let (c, base, blobs) = (c.clone(), base.clone(), blobs.clone());
        tasks.push(tokio::spawn(async move {
            let (mut blob_tally, mut manifest_tally) = (Tally::default(), Tally::default());
            let mut corrupt = Vec::new();
            // Manifests first, as a pulling client would: the repositories then know their
            // blobs.
            for repo in repos {
                let (got, _) = fetch(&c, &format!("{base}/v2/{repo}/manifests/v1")).await;
                manifest_tally.record(&got);
            }
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1).wrapping_mul(0x1000_0001));
            let mut unfinished = 0usize;
            while Instant::now() < deadline {
                let (repo, digest, _) = &blobs[(rng.next() % blobs.len() as u64) as usize];
                let url = format!("{base}/v2/{repo}/blobs/{digest}");
                // Requests still running shortly after the deadline are dropped (the client
                // goes away mid-body, which berth must also take in its stride).
                let Ok(got) =
                    tokio::time::timeout_at(hard_stop, fetch_blob(&c, &url, digest)).await
                else {
                    unfinished += 1;
                    break;
                };
                if matches!(got, Got::Corrupt { .. }) {
                    corrupt.push(format!("{repo} {digest}: {got:?}"));
                }
                let failed = !matches!(got, Got::Verified { .. });
                blob_tally.record(&got);
                if failed {
                    // A real client backs off a little before retrying.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            (blob_tally, manifest_tally, corrupt, unfinished)
        }));
    }
    let mut blob_tally = Tally::default();
    let mut manifest_tally = Tally::default();
    let mut corrupt = Vec::new();
    let mut unfinished = 0;
    let joined = tokio::time::timeout(soak + Duration::from_secs(30), async {
        for t in tasks {
            let (b, m, c, u) = t.await.expect("client task");
            blob_tally.merge(&b);
            manifest_tally.merge(&m);
            corrupt.extend(c);
            unfinished += u;
        }
    })
    .await;
    let soaked = started.elapsed();
    assert!(
        joined.is_ok(),
        "clients did not finish within the soak + 30 s"
    );
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let (rss_end, hwm) = memory_kib(pid).unwrap_or_default();
    let peak_rss = peak_rss.load(Ordering::Relaxed).max(rss_end);
    let fills_gets = up.state.blob_gets.load(Ordering::Relaxed);

    // After the storm: the upstream heals and every blob is served, verified.
    up.set(Behaviour::Normal);
    let mut after = Tally::default();
    for (repo, digest, _) in blobs.iter() {
        let got = fetch_blob(&c, &format!("{base}/v2/{repo}/blobs/{digest}"), digest).await;
        after.record(&got);
        f.check(
            matches!(got, Got::Verified { .. }),
            format!("after the soak, {repo} blob: {}", got.short()),
        );
    }
    // The clients go away: berth closes their connections (no descriptor leaks).
    drop(c);
    let (listen, up_port) = (berth.addr().port(), up.addr.port());
    let closed = support::wait_for(
        "berth closes client connections",
        Duration::from_secs(5),
        || {
            let kinds = fds_by_kind(pid, &cache, listen, up_port);
            if client_fds(&kinds) == 0 {
                support::Probe::Ready(kinds)
            } else {
                support::Probe::Pending(format!("{kinds:?}"))
            }
        },
    );
    let fds_after = match closed {
        Ok(kinds) => kinds,
        Err(e) => {
            f.check(
                false,
                format!("berth's descriptors after the clients left: {e}"),
            );
            fds_by_kind(pid, &cache, listen, up_port)
        }
    };
    let health = http_status(berth.admin_addr(), "/healthz").ok();
    let m = http_get_text(berth.admin_addr(), "/metrics").unwrap_or_default();
    let logs = berth.logs();
    let temp_left = temp_files(&cache);
    let temp_bytes: u64 = temp_left.iter().map(|(_, n)| n).sum();
    let secs = soak.as_secs_f64();
    blob_tally.print("soak blobs");
    blob_tally.print_samples("soak blobs");
    manifest_tally.print("soak manifests");
    manifest_tally.print_samples("soak manifests");
    after.print("soak after (upstream normal)");
    let kinds = &blob_tally.kinds;
    let n = |k: &str| kinds.get(k).copied().unwrap_or(0);
    println!(
        "[soak] client-visible errors: aborted body={} 5xx={} other={} (429={}, other status={}, no answer={}); corrupt bodies={}; requests dropped by the drill at its end={unfinished}",
        n("aborted body"),
        n("5xx"),
        n("429") + n("other status") + n("no answer"),
        n("429"),
        n("other status"),
        n("no answer"),
        blob_tally.corrupt
    );
    println!(
        "[soak] throughput (debug builds, shared CPU): {:.0} blob requests/s, {:.1} MiB/s to clients; upstream blob GETs={fills_gets} (~{} failed on purpose)",
        blob_tally.requests as f64 / secs,
        blob_tally.bytes as f64 / MIB as f64 / secs,
        fills_gets / FAIL_EVERY
    );
    println!(
        "[soak] berth pid {pid}: peak VmRSS={:.1} MiB, VmHWM={:.1} MiB, VmRSS at end={:.1} MiB; open fds before={fds_before} after the clients left={} {fds_after:?}; /healthz={health:?}; panics in log={}; temp files left={} ({temp_bytes} bytes); elapsed={soaked:?}",
        peak_rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        fds_after.values().sum::<usize>(),
        logs.matches("panicked").count(),
        temp_left.len(),
    );
    println!(
        "{}",
        metric_lines(
            &m,
            &[
                "berth_fill_failures_total",
                "berth_cache_requests_total{kind=\"blob\"",
                "berth_cache_evictions_total",
                "berth_fills_in_flight",
                "berth_cache_blobs ",
                "berth_cache_size_bytes ",
            ]
        )
    );
    assert!(corrupt.is_empty(), "corrupt bodies: {corrupt:#?}");
    assert_eq!(blob_tally.corrupt, 0);
    assert!(
        n("verified") > 0,
        "no blob request succeeded during the soak"
    );
    assert_eq!(health, Some(200), "/healthz after the soak");
    assert!(!logs.contains("panicked"), "berth panicked during the soak");
    assert!(
        hwm.max(peak_rss) < RSS_LIMIT_MIB * 1024,
        "berth's peak RSS {} KiB is over {RSS_LIMIT_MIB} MiB",
        hwm.max(peak_rss)
    );
    assert_eq!(
        manifest_tally.kinds.get("verified").copied().unwrap_or(0),
        CLIENTS * repos.len(),
        "manifest GETs (cached tags) must all succeed: {:?}",
        manifest_tally.kinds
    );
    f.check(
        sample(&m, "berth_fills_in_flight") == 0.0,
        "fills still in flight after the soak",
    );
    // BUG (reported, fails today): every cut fill leaves its temp file in <cache>/tmp (see
    // drill 1); under a flaky upstream they pile up until the next restart.
    f.check(
        temp_left.is_empty(),
        format!(
            "{} temp files ({temp_bytes} bytes) left in <cache>/tmp after the soak",
            temp_left.len()
        ),
    );
    drop(berth);
    f.assert_none("soak");
}
