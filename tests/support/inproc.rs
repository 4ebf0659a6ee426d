//! berth in-process: the one place the tests call `berth::start_on`.
//!
//! [`InProcConfig`] builds the TOML (berth's contract format, parsed by
//! `berth::config::Config::parse`); [`InProc`] binds its listeners on 127.0.0.1:0, starts
//! berth on them, waits (bounded) until `/readyz` on the admin address answers 200, and gives
//! its URLs, a client and its metrics. berth's log lines (its `tracing` events) are captured;
//! a test that panics prints those logged since its berth started.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::TcpListener;

/// How long a starting berth may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The TOML of an in-process berth: `[server]` (its `listen` and `admin_listen` filled in by
/// [`InProc`] with the listeners it bound), `[cache]` (its `dir` likewise) and any other
/// tables, in the order they were added.
#[derive(Clone, Debug)]
pub struct InProcConfig {
    server: Vec<String>,
    cache: Vec<String>,
    tables: Vec<String>,
}

impl Default for InProcConfig {
    fn default() -> InProcConfig {
        InProcConfig::new()
    }
}

impl InProcConfig {
    /// `[server]` with `shutdown_grace = "1s"` (a stopping berth holds no test up), an empty
    /// `[cache]` (berth's defaults) and no registry.
    pub fn new() -> InProcConfig {
        InProcConfig {
            server: vec![r#"shutdown_grace = "1s""#.to_owned()],
            cache: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// A mirror of `upstream`: [`InProcConfig::new`] with the default registry `docker.io`
    /// on that one endpoint and `keys` (`key = value` lines) in its `[[registry]]` table.
    pub fn mirror_of(upstream: &str, keys: &str) -> InProcConfig {
        InProcConfig::new().registry("docker.io", true, &[upstream], keys)
    }

    /// Adds `lines` (`key = value` lines, or a `[server.tls]` table last) to `[server]`.
    pub fn server(mut self, lines: &str) -> InProcConfig {
        self.server.push(lines.to_owned());
        self
    }

    /// Adds `lines` (`key = value` lines) to `[cache]`.
    pub fn cache(mut self, lines: &str) -> InProcConfig {
        self.cache.push(lines.to_owned());
        self
    }

    /// Adds `toml` (whole tables: `[auth]`, `[[registry]]`, …) after `[cache]`.
    pub fn table(mut self, toml: &str) -> InProcConfig {
        self.tables.push(toml.to_owned());
        self
    }

    /// Adds a `[[registry]]` table: `name`, `default = true` if `default`, the `endpoints`
    /// (URLs), and `keys` (`key = value` lines).
    pub fn registry(self, name: &str, default: bool, endpoints: &[&str], keys: &str) -> Self {
        let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        self.table(&format!(
            "[[registry]]\nname = \"{name}\"\n{default}endpoints = [{endpoints}]\n{keys}\n",
            default = if default { "default = true\n" } else { "" },
            endpoints = endpoints.join(", "),
        ))
    }

    /// The config text for berth on `listen` and `admin`, with its cache in `cache_dir`.
    pub fn toml(&self, listen: SocketAddr, admin: SocketAddr, cache_dir: &Path) -> String {
        format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n{server}\n\
             [cache]\ndir = \"{cache}\"\n{cache_keys}\n{tables}",
            server = self.server.join("\n"),
            cache = cache_dir.display(),
            cache_keys = self.cache.join("\n"),
            tables = self.tables.join("\n"),
        )
    }
}

/// A reqwest client for loopback tests: no proxy from the environment, 30 s per request.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .expect("reqwest client")
}

/// `e` and its sources, `: `-separated (reqwest's own message hides the cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// A listener on 127.0.0.1 with a port of its own.
pub async fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// A berth running in this process (stopped, at the latest, when the test's runtime ends).
pub struct InProc {
    running: Option<berth::Running>,
    cache: Option<PathBuf>,
    client: reqwest::Client,
    /// The first of berth's log lines (see [`logs`]) that are this berth's.
    log_from: u64,
    // Last: removed after berth is gone.
    _dir: Option<TempDir>,
}

impl InProc {
    /// Starts berth with `config` and its cache in a temp dir of its own.
    pub async fn start(config: &InProcConfig) -> InProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut berth = InProc::start_in(config, dir.path()).await;
        berth._dir = Some(dir);
        berth
    }

    /// Starts berth with `config` and its cache in `cache_dir` (kept after berth stops).
    pub async fn start_in(config: &InProcConfig, cache_dir: &Path) -> InProc {
        let (listener, admin) = (loopback_listener().await, loopback_listener().await);
        let text = config.toml(local_addr(&listener), local_addr(&admin), cache_dir);
        let mut berth = InProc::start_on(&text, listener, admin).await;
        berth.cache = Some(cache_dir.to_owned());
        berth
    }

    /// Starts berth with the config `text` as it is, on listeners the caller bound (the
    /// config should name their addresses); panics if it does not get ready.
    pub async fn start_on(text: &str, listener: TcpListener, admin: TcpListener) -> InProc {
        InProc::try_start_on(text, listener, admin)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`InProc::start_on`]; a config berth refuses, or a berth that does not get ready
    /// within 10 s, is an `Err` with the reason and berth's log.
    pub async fn try_start_on(
        text: &str,
        listener: TcpListener,
        admin: TcpListener,
    ) -> Result<InProc, String> {
        logs::capture();
        let log_from = logs::next_line();
        let config = berth::config::Config::parse(text)
            .map_err(|e| format!("berth refuses the test config: {e}\n{text}"))?;
        let running = berth::start_on(config, listener, admin)
            .await
            .map_err(|e| format!("berth did not start: {e}\n{text}"))?;
        let berth = InProc {
            running: Some(running),
            cache: None,
            client: client(),
            log_from,
            _dir: None,
        };
        berth.wait_ready().await?;
        Ok(berth)
    }

    async fn wait_ready(&self) -> Result<(), String> {
        let url = format!("{}/readyz", self.admin_url());
        let started = Instant::now();
        loop {
            let last = match self.client.get(&url).send().await {
                Ok(r) if r.status() == 200 => return Ok(()),
                Ok(r) => format!("status {}", r.status()),
                Err(e) => error_chain(&e),
            };
            if started.elapsed() >= READY_TIMEOUT {
                return Err(format!(
                    "berth not ready after {READY_TIMEOUT:?} (GET {url}: {last})\n{}",
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What `berth::start_on` returned.
    pub fn running(&self) -> &berth::Running {
        self.running.as_ref().expect("berth is running")
    }

    /// The registry API's address.
    pub fn addr(&self) -> SocketAddr {
        self.running().addr
    }

    /// The admin address (`/healthz`, `/readyz`, `/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.running().admin_addr
    }

    /// `http://127.0.0.1:PORT` of the registry API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `http://127.0.0.1:PORT2` of the admin endpoints.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr())
    }

    /// The cache dir it was started with ([`InProc::start`], [`InProc::start_in`]).
    pub fn cache_dir(&self) -> &Path {
        self.cache
            .as_deref()
            .expect("a berth started from config text has no known cache dir")
    }

    /// The client the helpers below use (see [`client`]).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `GET {url}{path}` on the registry API; panics if no answer comes.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} from berth: {}", error_chain(&e)))
    }

    /// `/metrics` from the admin address, as a scraper sees it.
    pub async fn metrics_text(&self) -> String {
        let url = format!("{}/metrics", self.admin_url());
        let r = self.client.get(&url).send().await.expect("GET /metrics");
        assert_eq!(r.status(), 200, "GET {url}");
        r.text().await.expect("metrics text")
    }

    /// The metrics as berth renders them now (no request; for use in blocking code); panics
    /// if they are not UTF-8.
    pub fn render_metrics(&self) -> String {
        String::from_utf8(self.running().metrics.render()).expect("metrics are UTF-8")
    }

    /// berth's log lines since it started (with tests running at once, other in-process
    /// berths' lines are among them; the last few thousand lines at most).
    pub fn logs(&self) -> String {
        logs::since(self.log_from)
    }

    /// Stops berth gracefully (see `berth::Running::stop`).
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- berth {:?} log -----\n{}",
                self.running.as_ref().map(|r| r.addr),
                self.logs()
            );
        }
    }
}

fn local_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr().expect("local_addr of a bound listener")
}

/// berth's `tracing` events, formatted as text, into a bounded buffer of this test process.
/// `RUST_LOG` sets the filter (default `info`).
mod logs {
    use super::*;

    /// How many of the most recent lines are kept.
    const KEEP: usize = 5000;

    struct Lines {
        /// The number of the next line.
        next: u64,
        lines: VecDeque<String>,
    }

    static LINES: Mutex<Lines> = Mutex::new(Lines {
        next: 0,
        lines: VecDeque::new(),
    });

    fn lines() -> std::sync::MutexGuard<'static, Lines> {
        LINES.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the capturing subscriber (once per test process).
    pub fn capture() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(|| Writer)
                .finish();
            // Another subscriber set by the test itself wins; berth's lines then go there.
            let _ = tracing::subscriber::set_global_default(subscriber);
        });
    }

    pub fn next_line() -> u64 {
        lines().next
    }

    pub fn since(from: u64) -> String {
        let l = lines();
        let first = l.next - l.lines.len() as u64;
        let skip = from.saturating_sub(first) as usize;
        let mut out = String::new();
        if from < first {
            out.push_str(&format!("({} earlier lines dropped)\n", first - from));
        }
        for line in l.lines.iter().skip(skip) {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    struct Writer;

    impl io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let text = String::from_utf8_lossy(buf);
            let mut l = lines();
            for line in text.lines().filter(|line| !line.is_empty()) {
                l.lines.push_back(line.to_owned());
                l.next += 1;
                if l.lines.len() > KEEP {
                    l.lines.pop_front();
                }
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
