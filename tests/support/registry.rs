//! CNCF distribution (`docker-registry serve`) as the upstream registry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::process::{
    CmdOutput, Daemon, Probe, free_addr, http_status, require_program, run, short_tempdir, wait_for,
};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts at binding a free port (another process may grab the one we picked).
const PORT_ATTEMPTS: usize = 3;

/// A running `docker-registry` on `127.0.0.1:<free port>`, storing in a temp dir.
///
/// Its access log (distribution writes one Apache "combined" line per request to stdout) is
/// kept across [`Registry::stop`]/[`Registry::restart`] and parsed by [`Registry::access_log`].
/// The line is written when the handler returns, i.e. before the client has read the last
/// bytes of the response, so counts are complete once a client request has finished.
#[derive(Debug)]
pub struct Registry {
    daemon: Daemon,
    addr: SocketAddr,
    config: PathBuf,
    access_log: PathBuf,
    credentials: Option<(String, String)>,
    // Last: removed after the daemon is stopped.
    dir: TempDir,
}

/// One request from the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    /// Path and query as requested.
    pub uri: String,
    /// `uri` without the query.
    pub path: String,
    pub status: u16,
    /// Response body bytes written.
    pub bytes: u64,
    pub user_agent: String,
}

impl Registry {
    /// Starts an open (no auth) registry and waits until `GET /v2/` answers.
    pub fn start() -> Registry {
        Registry::launch(None, &[])
    }

    /// Starts an open registry that adds `headers` (`(name, value)`) to every response, e.g.
    /// Docker Hub's `ratelimit-remaining: 100;w=21600` (distribution's `http.headers`).
    pub fn start_with_headers(headers: &[(&str, &str)]) -> Registry {
        Registry::launch(None, headers)
    }

    /// Starts a registry that requires HTTP basic auth (`htpasswd`, bcrypt) for everything.
    pub fn start_with_htpasswd(user: &str, password: &str) -> Registry {
        Registry::launch(Some((user.to_owned(), password.to_owned())), &[])
    }

    fn launch(credentials: Option<(String, String)>, headers: &[(&str, &str)]) -> Registry {
        let bin = require_program("docker-registry");
        let dir = short_tempdir("reg-");
        let htpasswd = dir.path().join("htpasswd");
        if let Some((user, password)) = &credentials {
            let tool = require_program("htpasswd");
            let line = run(
                Command::new(tool).args(["-Bbn", user, password]),
                Duration::from_secs(30),
            )
            .and_then(CmdOutput::into_result)
            .expect("htpasswd -Bbn");
            std::fs::write(&htpasswd, line.trim_end().to_owned() + "\n").expect("write htpasswd");
        }
        let config = dir.path().join("config.yml");
        let access_log = dir.path().join("access.log");
        let error_log = dir.path().join("registry.log");
        // JSON strings are YAML double-quoted scalars.
        let extra_headers: String = headers
            .iter()
            .map(|(name, value)| {
                let value = serde_json::to_string(value).expect("header value as JSON");
                format!("    {name}: [{value}]\n")
            })
            .collect();
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let addr = free_addr();
            let auth = match &credentials {
                None => String::new(),
                Some(_) => format!(
                    "auth:\n  htpasswd:\n    realm: berth-tests\n    path: {}\n",
                    htpasswd.display()
                ),
            };
            let yaml = format!(
                "version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: berth-tests-not-a-secret
  headers:
    X-Content-Type-Options: [nosniff]
{extra_headers}{auth}",
                root = dir.path().join("data").display(),
            );
            std::fs::write(&config, yaml).expect("write registry config");
            let mut daemon = spawn(&bin, &config, &access_log, &error_log);
            match wait_ready(&mut daemon, addr) {
                Ok(()) => {
                    return Registry {
                        daemon,
                        addr,
                        config,
                        access_log,
                        credentials,
                        dir,
                    };
                }
                Err(e) if daemon.logs().contains("address already in use") => failures.push(e),
                Err(e) => panic!(
                    "docker-registry did not start: {e}\n{}",
                    daemon.log_tail(40)
                ),
            }
        }
        panic!("docker-registry could not bind a free port: {failures:?}");
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as used in image references (`127.0.0.1:PORT/library/app:v1`).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `(user, password)` if started with htpasswd auth.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// Takes the registry down (`SIGKILL`): new connections are refused. Storage is kept.
    pub fn stop(&mut self) {
        self.daemon.kill();
    }

    /// Starts it again (after [`Registry::stop`]) on the same port with the same storage.
    pub fn restart(&mut self) {
        self.daemon.kill();
        let bin = require_program("docker-registry");
        let error_log = self.dir.path().join("registry.log");
        self.daemon = spawn(&bin, &self.config, &self.access_log, &error_log);
        if let Err(e) = wait_ready(&mut self.daemon, self.addr) {
            panic!(
                "docker-registry did not restart: {e}\n{}",
                self.daemon.log_tail(40)
            );
        }
    }

    /// Suspends the process (`SIGSTOP`): connections are accepted by the kernel but never
    /// answered — an upstream that hangs. [`Registry::resume`] undoes it.
    pub fn freeze(&self) {
        self.daemon.signal(libc::SIGSTOP);
        // kill(2) returns before every thread has stopped: wait (at most 5 s) until the
        // kernel reports each of them stopped, so nothing answers after freeze returns.
        let Some(pid) = self.daemon.pid() else { return };
        let stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.flatten().all(|t| {
                        std::fs::read_to_string(t.path().join("stat"))
                            .ok()
                            .and_then(|st| {
                                st.rsplit_once(')')
                                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
                            })
                            .unwrap_or(true)
                    })
                })
                .unwrap_or(true)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !stopped() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Resumes a [`Registry::freeze`]d registry (`SIGCONT`).
    pub fn resume(&self) {
        self.daemon.signal(libc::SIGCONT);
    }

    /// Its own log (stderr, logrus text format), after the access log.
    pub fn logs(&self) -> String {
        self.daemon.logs()
    }

    /// Every request logged so far, oldest first.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines().filter_map(AccessEntry::parse).collect()
    }

    /// How many requests had this method and exactly this path (query ignored).
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|e| e.method == method && e.path == path)
            .count()
    }

    /// `GET /v2/<repo>/blobs/<digest>` requests, whatever their status.
    pub fn blob_gets(&self, repo: &str, digest: &str) -> usize {
        self.count("GET", &format!("/v2/{repo}/blobs/{digest}"))
    }

    /// `GET /v2/<repo>/manifests/<reference>` requests (reference: tag or digest).
    pub fn manifest_gets(&self, repo: &str, reference: &str) -> usize {
        self.count("GET", &format!("/v2/{repo}/manifests/{reference}"))
    }

    /// Requests whose path starts with `/v2/<repo>/blobs/` and method is `GET`.
    pub fn all_blob_gets(&self, repo: &str) -> usize {
        let prefix = format!("/v2/{repo}/blobs/");
        self.access_log()
            .iter()
            .filter(|e| e.method == "GET" && e.path.starts_with(&prefix))
            .count()
    }
}

fn wait_ready(daemon: &mut Daemon, addr: SocketAddr) -> Result<(), String> {
    wait_for("docker-registry GET /v2/", READY_TIMEOUT, || {
        if let Err(e) = daemon.check_running() {
            return Probe::Failed(e);
        }
        match http_status(addr, "/v2/") {
            Ok(200 | 401) => Probe::Ready(()),
            Ok(code) => Probe::Pending(format!("status {code}")),
            Err(e) => Probe::Pending(e.to_string()),
        }
    })
}

fn spawn(
    bin: &std::path::Path,
    config: &std::path::Path,
    access_log: &std::path::Path,
    error_log: &std::path::Path,
) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg(config);
    // REGISTRY_* variables override the config file.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REGISTRY_") {
            cmd.env_remove(key);
        }
    }
    Daemon::spawn(
        "docker-registry",
        &mut cmd,
        access_log,
        error_log,
        Duration::from_secs(5),
    )
}

impl AccessEntry {
    /// Parses one Apache combined-log line as written by distribution; `None` for other lines.
    /// `127.0.0.1 - - [23/Nov/2026:17:07:16 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "docker/20.10"`
    pub fn parse(line: &str) -> Option<AccessEntry> {
        let (_client, rest) = line.split_once(" \"")?;
        let (request, rest) = rest.split_once('"')?;
        let mut request = request.split(' ');
        let (method, uri) = (request.next()?, request.next()?);
        let mut fields = rest.trim_start().splitn(3, ' ');
        let status = fields.next()?.parse().ok()?;
        let bytes = fields.next()?.parse().unwrap_or(0);
        // `"referer" "user agent"`: the agent is between the third quote and the last one.
        let user_agent = fields
            .next()
            .unwrap_or("")
            .splitn(4, '"')
            .nth(3)
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or("")
            .to_owned();
        Some(AccessEntry {
            method: method.to_owned(),
            uri: uri.to_owned(),
            path: uri.split('?').next().unwrap_or(uri).to_owned(),
            status,
            bytes,
            user_agent,
        })
    }
}
