//! What the benchmarks share: a small upstream registry (one runtime thread of its own), the
//! berth release binary as a child process, /proc readers, and a minimal HTTP/1.1 client that
//! costs the load generator as little CPU as possible.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

// ---------------------------------------------------------------- settings and output

/// An environment setting, or its default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} does not parse")),
        Err(_) => default,
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Fast deterministic pseudo-random bytes (incompressible enough for a blob).
pub fn random_bytes(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    Bytes::from(v)
}

// ---------------------------------------------------------------- /proc

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    (ut + st) / clk_tck()
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM, ...).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn self_pid() -> u32 {
    std::process::id()
}

// ---------------------------------------------------------------- the upstream

/// How the upstream produces a blob: bytes held in memory, or regenerated per request.
#[derive(Clone)]
pub enum BlobSrc {
    Mem(Bytes),
    Gen { seed: u64, len: usize },
}

impl BlobSrc {
    fn bytes(&self) -> Bytes {
        match self {
            BlobSrc::Mem(b) => b.clone(),
            BlobSrc::Gen { seed, len } => random_bytes(*seed, *len),
        }
    }
    fn len(&self) -> usize {
        match self {
            BlobSrc::Mem(b) => b.len(),
            BlobSrc::Gen { len, .. } => *len,
        }
    }
}

#[derive(Default)]
pub struct UpState {
    /// (repo, tag or digest) → manifest bytes (OCI image manifest).
    manifests: Mutex<HashMap<(String, String), Bytes>>,
    /// "sha256:<hex>" → blob.
    blobs: Mutex<HashMap<String, BlobSrc>>,
    /// "METHOD kind" and "GET <digest>" → count.
    counts: Mutex<HashMap<String, u64>>,
    /// Bytes per second for each blob body (0: unthrottled).
    pub throttle: AtomicU64,
    /// When the last throttled body was completely handed to the connection.
    pub last_throttled_done: Mutex<Option<Instant>>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpState>,
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

impl Upstream {
    /// Starts the upstream on a thread with a single-threaded runtime of its own.
    pub fn start() -> Upstream {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let state = Arc::new(UpState::default());
        let st = state.clone();
        std::thread::Builder::new()
            .name("upstream".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("upstream runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("listener");
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let st = st.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| {
                                let st = st.clone();
                                async move { Ok::<_, Infallible>(handle(st, req)) }
                            });
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .await;
                        });
                    }
                });
            })
            .expect("upstream thread");
        Upstream { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a blob; returns its digest "sha256:<hex>".
    pub fn add_blob(&self, src: BlobSrc, digest_hex: Option<String>) -> String {
        let hex = digest_hex.unwrap_or_else(|| sha256_hex(&src.bytes()));
        let d = format!("sha256:{hex}");
        self.state
            .blobs
            .lock()
            .expect("lock")
            .insert(d.clone(), src);
        d
    }

    /// Adds an OCI image manifest (first digest: config, the rest: layers) under `tag` and its
    /// digest. Returns the manifest's digest and bytes.
    pub fn add_image(&self, repo: &str, tag: &str, digests: &[String]) -> (String, Bytes) {
        let blobs = self.state.blobs.lock().expect("lock");
        let desc = |d: &String, mt: &str| serde_json::json!({"mediaType": mt, "digest": d, "size": blobs.get(d).map_or(0, BlobSrc::len)});
        let layers: Vec<_> = digests[1..]
            .iter()
            .map(|d| desc(d, "application/vnd.oci.image.layer.v1.tar+gzip"))
            .collect();
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(&digests[0], "application/vnd.oci.image.config.v1+json"),
            "layers": layers,
        });
        drop(blobs);
        let bytes = Bytes::from(serde_json::to_vec(&m).expect("json"));
        let d = format!("sha256:{}", sha256_hex(&bytes));
        let mut ms = self.state.manifests.lock().expect("lock");
        ms.insert((repo.into(), tag.into()), bytes.clone());
        ms.insert((repo.into(), d.clone()), bytes.clone());
        (d, bytes)
    }

    /// How many requests were counted under `key` ("GET manifest", "HEAD blob", "GET blob",
    /// or "GET <digest>").
    pub fn count(&self, key: &str) -> u64 {
        self.state
            .counts
            .lock()
            .expect("lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    pub fn last_throttled_done(&self) -> Option<Instant> {
        *self.state.last_throttled_done.lock().expect("lock")
    }

    pub fn set_throttle(&self, bytes_per_sec: u64) {
        self.state.throttle.store(bytes_per_sec, Ordering::Relaxed);
    }
}

type UpBody = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, b: impl Into<Bytes>) -> Response<UpBody> {
    let mut r = Response::new(Full::new(b.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

fn handle(st: Arc<UpState>, req: Request<hyper::body::Incoming>) -> Response<UpBody> {
    let path = req.uri().path().to_owned();
    let method = req.method().as_str().to_owned();
    let head = req.method() == hyper::Method::HEAD;
    let count = |key: String| *st.counts.lock().expect("lock").entry(key).or_default() += 1;
    if path == "/v2/" || path == "/v2" {
        count(format!("{method} ping"));
        return full(StatusCode::OK, "{}");
    }
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        count(format!("{method} manifest"));
        let found = st
            .manifests
            .lock()
            .expect("lock")
            .get(&(repo.to_owned(), reference.to_owned()))
            .cloned();
        let Some(bytes) = found else {
            return full(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#,
            );
        };
        let len = bytes.len();
        let digest = format!("sha256:{}", sha256_hex(&bytes));
        let mut r = full(StatusCode::OK, if head { Bytes::new() } else { bytes });
        let h = r.headers_mut();
        h.insert("content-type", OCI_MANIFEST.parse().expect("header"));
        h.insert("docker-content-digest", digest.parse().expect("header"));
        h.insert("content-length", len.into());
        return r;
    }
    if let Some((_repo, digest)) = rest.rsplit_once("/blobs/") {
        count(format!("{method} blob"));
        if !head {
            count(format!("GET {digest}"));
        }
        let found = st.blobs.lock().expect("lock").get(digest).cloned();
        let Some(src) = found else {
            return full(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#,
            );
        };
        let len = src.len();
        let rate = st.throttle.load(Ordering::Relaxed);
        let body: UpBody = if head {
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed()
        } else if rate == 0 {
            Full::new(src.bytes())
                .map_err(|never| match never {})
                .boxed()
        } else {
            throttled(src.bytes(), rate, st.clone())
        };
        let mut r = Response::new(body);
        r.headers_mut().insert("content-length", len.into());
        r.headers_mut()
            .insert("docker-content-digest", digest.parse().expect("header"));
        r.headers_mut().insert(
            "content-type",
            "application/octet-stream".parse().expect("header"),
        );
        return r;
    }
    count(format!("{method} other"));
    full(StatusCode::NOT_FOUND, "{}")
}

/// A body sent in 256 KiB pieces paced to `rate` bytes per second.
fn throttled(data: Bytes, rate: u64, st: Arc<UpState>) -> UpBody {
    const PIECE: usize = 256 * 1024;
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<std::result::Result<Frame<Bytes>, std::io::Error>>(2);
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut sent = 0usize;
        while sent < data.len() {
            let end = (sent + PIECE).min(data.len());
            if tx
                .send(Ok(Frame::data(data.slice(sent..end))))
                .await
                .is_err()
            {
                return;
            }
            sent = end;
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
        *st.last_throttled_done.lock().expect("lock") = Some(Instant::now());
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    BodyExt::boxed(StreamBody::new(stream))
}

// ---------------------------------------------------------------- berth as a child process

/// The berth binary: `BERTH_BIN`, else the one cargo built for this bench (release profile).
pub fn berth_bin() -> PathBuf {
    std::env::var_os("BERTH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_berth")))
}

pub fn config_toml(cache_dir: &Path, max_size: &str, upstream: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[cache]
dir = "{}"
max_size = "{max_size}"
tag_ttl = "10m"
[log]
format = "json"
[[registry]]
name = "docker.io"
default = true
endpoints = ["{upstream}"]
"#,
        cache_dir.display()
    )
}

/// What berth's log said, as the reader thread saw it.
#[derive(Default)]
pub struct LogSummary {
    pub lines: u64,
    /// Up to 20 WARN/ERROR lines.
    pub problems: Vec<String>,
    pub problem_count: u64,
    /// The fields of the last "cache index loaded" line.
    pub index_loaded: Option<serde_json::Value>,
    /// Fill log lines by outcome.
    pub fills: HashMap<String, u64>,
    /// (digest, seconds) of each fill log line.
    pub fill_secs: Vec<(String, f64)>,
}

/// Records one parsed log line; sends the listen addresses on `tx` when they are logged.
fn summarize(
    l: &mut LogSummary,
    v: &serde_json::Value,
    line: &str,
    tx: &mut Option<mpsc::Sender<(SocketAddr, SocketAddr)>>,
) {
    let level = v["level"].as_str().unwrap_or("");
    let msg = v["fields"]["message"].as_str().unwrap_or("");
    if level == "WARN" || level == "ERROR" {
        l.problem_count += 1;
        if l.problems.len() < 20 {
            l.problems.push(line.to_owned());
        }
    }
    match msg {
        "berth serving" => {
            let a = v["fields"]["addr"].as_str().and_then(|a| a.parse().ok());
            let b = v["fields"]["admin_addr"]
                .as_str()
                .and_then(|a| a.parse().ok());
            if let (Some(a), Some(b), Some(tx)) = (a, b, tx.take()) {
                let _ = tx.send((a, b));
            }
        }
        "cache index loaded" => l.index_loaded = Some(v["fields"].clone()),
        "fill" => {
            let o = v["fields"]["outcome"].as_str().unwrap_or("?").to_owned();
            *l.fills.entry(o).or_default() += 1;
            let d = v["fields"]["digest"].as_str().unwrap_or("").to_owned();
            let secs = v["fields"]["seconds"].as_f64().unwrap_or(f64::NAN);
            l.fill_secs.push((d, secs));
        }
        _ => {}
    }
}

pub struct Berth {
    pub child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub started: Instant,
    pub log: Arc<Mutex<LogSummary>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Berth {
    /// Writes `config` next to the cache and starts berth; returns once it is listening.
    pub fn spawn(config: &str, config_path: &Path) -> Result<Berth> {
        std::fs::write(config_path, config)?;
        let started = Instant::now();
        let mut child = Command::new(berth_bin())
            .arg("serve")
            .arg("--config")
            .arg(config_path)
            .env(
                "RUST_LOG",
                std::env::var("BERTH_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", berth_bin().display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let log = Arc::new(Mutex::new(LogSummary::default()));
        let (tx, rx) = mpsc::channel::<(SocketAddr, SocketAddr)>();
        let lg = log.clone();
        let reader = std::thread::Builder::new()
            .name("bench-log-reader".into())
            .spawn(move || {
                let mut tx = Some(tx);
                let mut r = BufReader::with_capacity(1 << 20, stdout);
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let mut l = lg.lock().expect("lock");
                    l.lines += 1;
                    // Parse only the lines of interest: the access log can be 100k lines/s.
                    let interesting = [
                        "berth serving",
                        "cache index loaded",
                        "\"fill\"",
                        "\"WARN\"",
                        "\"ERROR\"",
                    ]
                    .iter()
                    .any(|k| line.contains(k));
                    if !interesting {
                        continue;
                    }
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    summarize(&mut l, &v, line.trim_end(), &mut tx);
                }
            })?;
        let (addr, admin) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("berth did not log its listen addresses within 30 s".into());
            }
        };
        Ok(Berth {
            child,
            pid,
            addr,
            admin,
            started,
            log,
            reader: Some(reader),
        })
    }

    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.pid)
    }

    /// How long berth logged the fill of `digest` took (once it has logged it).
    pub fn fill_secs(&self, digest: &str) -> Option<f64> {
        let l = self.log.lock().expect("lock");
        l.fill_secs
            .iter()
            .rev()
            .find(|(d, _)| d == digest)
            .map(|(_, s)| *s)
    }

    pub fn kib(&self, field: &str) -> u64 {
        status_kib(self.pid, field)
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(mut self) -> LogSummary {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        std::mem::take(&mut *self.log.lock().expect("lock"))
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------- a minimal HTTP/1.1 client

/// When a body's first byte, all bytes but the last, and the last byte arrived (berth holds the
/// last byte of a fill back until the blob is verified and stored).
#[derive(Default, Clone, Copy)]
pub struct BodyTimes {
    pub first: Option<Instant>,
    pub all_but_last: Option<Instant>,
    pub last: Option<Instant>,
}

impl BodyTimes {
    fn saw(&mut self, got: u64, len: u64) {
        let now = Instant::now();
        if got > 0 {
            self.first.get_or_insert(now);
        }
        if got + 1 >= len {
            self.all_but_last.get_or_insert(now);
        }
        if got >= len {
            self.last.get_or_insert(now);
        }
    }
}

pub struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
    pub close: bool,
}

/// One keep-alive connection, plain or TLS. Only content-length bodies (berth always sends one
/// here).
pub struct Conn<S = TcpStream> {
    s: S,
    buf: BytesMut,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn::over(s))
    }
}

impl Conn<tokio_rustls::client::TlsStream<TcpStream>> {
    /// A TLS connection to `addr` (the certificate checked for its IP address).
    pub async fn connect_tls(
        addr: SocketAddr,
        connector: &tokio_rustls::TlsConnector,
    ) -> Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        Ok(Conn::over(connector.connect(name, s).await?))
    }
}

/// A TLS client trusting `ca_pem` only, offering HTTP/1.1 alone (so `Conn` can speak it).
pub fn tls_connector(ca_pem: &str) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Conn<S> {
    pub fn over(s: S) -> Conn<S> {
        Conn {
            s,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    pub async fn send(&mut self, req: &[u8]) -> Result<()> {
        self.s.write_all(req).await?;
        Ok(())
    }

    pub async fn read_head(&mut self) -> Result<Head> {
        loop {
            if !self.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut resp = httparse::Response::new(&mut headers);
                if let httparse::Status::Complete(n) = resp.parse(&self.buf)? {
                    let mut head = Head {
                        status: resp.code.unwrap_or(0),
                        content_length: None,
                        close: false,
                    };
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            head.content_length = std::str::from_utf8(h.value)?.parse().ok();
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            return Err("chunked responses are not supported here".into());
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            head.close = h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    let _ = self.buf.split_to(n);
                    return Ok(head);
                }
            }
            if self.s.read_buf(&mut self.buf).await? == 0 {
                return Err("connection closed before a response head".into());
            }
        }
    }

    /// Reads a `len`-byte body into memory (small bodies).
    pub async fn read_small_body(&mut self, len: usize) -> Result<Bytes> {
        while self.buf.len() < len {
            self.buf.reserve(len - self.buf.len());
            if self.s.read_buf(&mut self.buf).await? == 0 {
                return Err("connection closed mid-body".into());
            }
        }
        Ok(self.buf.split_to(len).freeze())
    }

    /// Reads a `len`-byte body, handing each piece to `sink` (with `scratch` as the read
    /// buffer).
    pub async fn read_body(
        &mut self,
        len: u64,
        scratch: &mut [u8],
        mut sink: impl FnMut(&[u8]),
    ) -> Result<BodyTimes> {
        let mut got = 0u64;
        let mut t = BodyTimes::default();
        if !self.buf.is_empty() {
            let n = (self.buf.len() as u64).min(len) as usize;
            sink(&self.buf[..n]);
            let _ = self.buf.split_to(n);
            got += n as u64;
            t.saw(got, len);
        }
        while got < len {
            let want = ((len - got) as usize).min(scratch.len());
            let n = self.s.read(&mut scratch[..want]).await?;
            if n == 0 {
                return Err(format!("connection closed after {got} of {len} body bytes").into());
            }
            sink(&scratch[..n]);
            got += n as u64;
            t.saw(got, len);
        }
        Ok(t)
    }

    /// Reads a body straight into `dst` (pre-allocated, exactly the body's length).
    pub async fn read_body_into(&mut self, dst: &mut [u8]) -> Result<BodyTimes> {
        let len = dst.len();
        let mut got = 0usize;
        let mut t = BodyTimes::default();
        if !self.buf.is_empty() {
            let n = self.buf.len().min(len);
            dst[..n].copy_from_slice(&self.buf[..n]);
            let _ = self.buf.split_to(n);
            got = n;
            t.saw(got as u64, len as u64);
        }
        while got < len {
            let n = self.s.read(&mut dst[got..]).await?;
            if n == 0 {
                return Err(format!("connection closed after {got} of {len} body bytes").into());
            }
            got += n;
            t.saw(got as u64, len as u64);
        }
        Ok(t)
    }
}

pub fn get_request(addr: SocketAddr, path: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: berth-bench\r\n{extra_headers}\r\n")
        .into_bytes()
}

/// One GET on a fresh connection; the status and (small) body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes)> {
    let mut c = Conn::connect(addr).await?;
    c.send(&get_request(addr, path, "Connection: close\r\n"))
        .await?;
    let h = c.read_head().await?;
    let len = h.content_length.ok_or("no content-length")? as usize;
    Ok((h.status, c.read_small_body(len).await?))
}

/// The berth admin port's /metrics, as (name{labels} → value).
pub async fn metrics(admin: SocketAddr) -> Result<HashMap<String, f64>> {
    let (status, body) = get(admin, "/metrics").await?;
    if status != 200 {
        return Err(format!("/metrics answered {status}").into());
    }
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

/// The sum of every series of metric `name`.
pub fn metric_sum(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// Percentile of sorted samples.
pub fn pct<T: Copy>(sorted: &[T], p: f64) -> T {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
