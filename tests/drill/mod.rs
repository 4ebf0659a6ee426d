//! What the fault drills (`tests/drill_*.rs`) share: running one drill at a time, fetching
//! with verification ([`Got`]), their figures ([`Tally`]), soft checks ([`Findings`]) and
//! looks at berth's cache dir.
//!
//! Each drill is bounded in time and prints its figures (requests, bytes, statuses,
//! client-visible errors by kind, corrupt bodies); run `cargo test --test drill_soak --
//! --nocapture` (or another drill) to see them. Invariants (a corrupt body, a complete body
//! from a crashed berth, a redirect followed to a forbidden address) fail at once. Other
//! expectations are checked softly: every miss is collected and the drill fails at its end,
//! after printing its figures, so one finding does not hide the rest.
//!
//! Use it with `mod drill; mod fake_upstream; mod support;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::fake_upstream::{Sha256Hasher, sha256};
use crate::support::{self, InProcConfig, error_chain, files_under, sample};

pub const MIB: usize = 1024 * 1024;
pub const KIB: usize = 1024;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one drill at a time (a drill that panicked does not block the others), on a
/// runtime of its own with 2 workers, so that timing bounds hold on 2 cores whatever
/// `--test-threads` says (cargo runs the test files themselves one after another). The
/// drill's future runs on the test's own thread, so child processes it starts die with it
/// (see `tests/support`).
pub fn run_drill(drill: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(drill);
}

/// `n` incompressible bytes, unique per call.
pub fn random_bytes(n: usize) -> Bytes {
    Bytes::from(support::random_bytes(n))
}

/// An in-process berth config: one default `docker.io` registry on `upstream`.
pub fn inproc_config(
    upstream: &str,
    tag_ttl: &str,
    read_timeout: &str,
    max_size: &str,
) -> InProcConfig {
    InProcConfig::mirror_of(
        upstream,
        &format!("connect_timeout = \"1s\"\nread_timeout = \"{read_timeout}\""),
    )
    .cache(&format!(
        "max_size = \"{max_size}\"\ntag_ttl = \"{tag_ttl}\""
    ))
}

/// What a client got for one request.
#[derive(Debug)]
pub enum Got {
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
    pub fn kind(&self) -> &'static str {
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

    pub fn status(&self) -> Option<u16> {
        match self {
            Got::Verified { .. } | Got::Corrupt { .. } | Got::Aborted { .. } => Some(200),
            Got::Status { status, .. } => Some(*status),
            Got::Failed(_) => None,
        }
    }

    pub fn is_verified(&self) -> bool {
        matches!(self, Got::Verified { .. })
    }

    /// A clean error: a status ≥ 400 with an OCI JSON error body.
    pub fn oci_error(&self) -> Option<(u16, String)> {
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

    pub fn is_5xx_oci(&self) -> bool {
        self.oci_error().is_some_and(|(s, _)| s >= 500)
    }

    /// One line for the figures: status, OCI code and message, or the error.
    pub fn short(&self) -> String {
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
        shorten_digests(&text).chars().take(260).collect()
    }
}

/// Digests make lines long and say nothing in the figures: `sha256:` and 8 hex digits stay.
fn shorten_digests(text: &str) -> String {
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
    out
}

/// GETs a blob and hashes the body as it streams (nothing is buffered).
pub async fn fetch_blob(client: &reqwest::Client, url: &str, digest: &str) -> Got {
    read_blob(client, url, digest, None).await
}

/// Like [`fetch_blob`], reading no faster than `rate` bytes per second.
pub async fn fetch_blob_paced(client: &reqwest::Client, url: &str, digest: &str, rate: u64) -> Got {
    read_blob(client, url, digest, Some(rate)).await
}

async fn read_blob(client: &reqwest::Client, url: &str, digest: &str, rate: Option<u64>) -> Got {
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
                let Some(rate) = rate else { continue };
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
pub async fn fetch(client: &reqwest::Client, url: &str) -> (Got, Bytes) {
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

/// Requests, bytes, statuses and errors of a drill, printed at its end.
#[derive(Default)]
pub struct Tally {
    pub requests: usize,
    pub bytes: u64,
    pub statuses: BTreeMap<String, usize>,
    pub kinds: BTreeMap<&'static str, usize>,
    pub corrupt: usize,
    /// The first few errors of each kind, for the figures.
    pub samples: BTreeMap<String, Vec<String>>,
}

impl Tally {
    pub fn record(&mut self, got: &Got) {
        self.requests += 1;
        let status = got.status().map_or("none".to_owned(), |s| s.to_string());
        *self.statuses.entry(status).or_default() += 1;
        *self.kinds.entry(got.kind()).or_default() += 1;
        if !got.is_verified() {
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

    pub fn merge(&mut self, other: &Tally) {
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

    /// How many outcomes of `kind` (see [`Got::kind`]).
    pub fn count(&self, kind: &str) -> usize {
        self.kinds.get(kind).copied().unwrap_or(0)
    }

    pub fn print(&self, drill: &str) {
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
    pub fn print_samples(&self, drill: &str) {
        for (kind, samples) in &self.samples {
            for sample in samples {
                println!("[{drill}]   e.g. {kind}: {sample}");
            }
        }
    }
}

/// Soft checks: misses are collected and reported together at the end of a drill.
#[derive(Default)]
pub struct Findings(Vec<String>);

impl Findings {
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            println!("  FINDING: {what}");
            self.0.push(what);
        }
    }

    pub fn assert_none(self, drill: &str) {
        assert!(
            self.0.is_empty(),
            "[{drill}] {} finding(s):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

/// Temp files of fills (not readyz's write probe).
pub fn temp_files(cache: &Path) -> Vec<(PathBuf, u64)> {
    files_under(&cache.join("tmp"))
        .into_iter()
        .filter(|(p, _)| !p.ends_with(".berth-write-check"))
        .collect()
}

pub fn blob_file(cache: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Waits (bounded) until `<cache>/tmp` holds no temp file besides those in `known`; returns
/// the others that are left.
pub async fn temp_files_settled(
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
pub fn wait_blobs_indexed(metrics: impl Fn() -> String, n: usize) -> Result<f64, String> {
    support::wait_for("blobs indexed", Duration::from_secs(5), || {
        let have = sample(&metrics(), "berth_cache_blobs ");
        if have >= n as f64 {
            support::Probe::Ready(have)
        } else {
            support::Probe::Pending(format!("berth_cache_blobs {have}, want {n}"))
        }
    })
}

/// The metric lines starting with one of `prefixes` (for printing).
pub fn metric_lines(metrics: &str, prefixes: &[&str]) -> String {
    metrics
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A small tmpfs mounted on a temp dir (root only), unmounted on drop, even on panic
/// (lazily, if something still holds a file open on it).
pub struct Tmpfs {
    pub path: PathBuf,
    // Removed after the unmount.
    _dir: tempfile::TempDir,
}

fn cstring(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
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
    pub fn usage(&self) -> (u64, u64) {
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
