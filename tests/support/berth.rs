//! The berth binary under test: `berth serve --config FILE`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::process::{Daemon, Probe, free_addr, http_status, short_tempdir, wait_for};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a `SIGTERM`ed berth may take to drain before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A config (the contract format) for one `docker.io` default registry with a single
/// upstream endpoint, free loopback ports, a 1 GiB cache in `cache_dir`, a 10 min tag TTL.
pub fn berth_config(upstream_url: &str, cache_dir: &Path) -> String {
    berth_config_with(upstream_url, cache_dir, "1GiB", "")
}

/// Like [`berth_config`], with `max_size` and extra keys for the `[[registry]]` table (one
/// `key = value` per line, e.g. `read_timeout = "5s"`).
pub fn berth_config_with(
    upstream_url: &str,
    cache_dir: &Path,
    max_size: &str,
    registry_keys: &str,
) -> String {
    format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"

[cache]
dir = "{cache}"
max_size = "{max_size}"
tag_ttl = "10m"

[[registry]]
name = "docker.io"
default = true
endpoints = ["{upstream_url}"]
{registry_keys}
"#,
        listen = free_addr(),
        admin = free_addr(),
        cache = cache_dir.display(),
    )
}

/// A config (the contract format) for several registries, each `(name, upstream URL,
/// default)`, with free loopback ports, a 1 GiB cache in `cache_dir` and a 10 min tag TTL.
pub fn berth_multi_config(registries: &[(&str, &str, bool)], cache_dir: &Path) -> String {
    let mut toml = format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"

[cache]
dir = "{cache}"
max_size = "1GiB"
tag_ttl = "10m"
"#,
        listen = free_addr(),
        admin = free_addr(),
        cache = cache_dir.display(),
    );
    for (name, url, default) in registries {
        toml.push_str(&format!(
            "\n[[registry]]\nname = \"{name}\"\n{default}endpoints = [\"{url}\"]\n",
            default = if *default { "default = true\n" } else { "" },
        ));
    }
    toml
}

/// A running berth. Its config file, logs (stdout and stderr, appended across restarts) and,
/// with [`Berth::start_mirror`], its cache live in a temp dir removed on drop.
#[derive(Debug)]
pub struct Berth {
    daemon: Daemon,
    config: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    /// With `[auth]`, an anonymous `GET /v2/` is answered 401 (a challenge): that is ready too.
    auth: bool,
    /// Extra environment variables (kept for restarts).
    env: Vec<(String, String)>,
    // Last: removed after the daemon is stopped.
    dir: TempDir,
}

impl Berth {
    /// Writes `config_toml` to a file, starts berth with it, and waits (20 s) until
    /// `GET /v2/` on `server.listen` answers 200 (or, with an `[auth]` table, 401: the
    /// challenge an anonymous client gets). Panics with berth's log otherwise.
    pub fn start(config_toml: &str) -> Berth {
        Berth::try_start(config_toml).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Berth::start`], but a berth that exits or never gets ready is an `Err` holding
    /// the reason and the tail of its log.
    pub fn try_start(config_toml: &str) -> Result<Berth, String> {
        Berth::start_in(short_tempdir("berth-"), config_toml, &[])
    }

    /// Like [`Berth::start`], with extra environment variables for the berth process.
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Berth {
        Berth::start_in(short_tempdir("berth-"), config_toml, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts berth as a mirror of `upstream_url` (see [`berth_config`]) with its cache in
    /// its own temp dir ([`Berth::cache_dir`]).
    pub fn start_mirror(upstream_url: &str) -> Berth {
        Berth::start_mirror_with(upstream_url, "")
    }

    /// Like [`Berth::start_mirror`], with extra keys for the `[[registry]]` table (see
    /// [`berth_config_with`]), e.g. `allow = ["library/*"]`.
    pub fn start_mirror_with(upstream_url: &str, registry_keys: &str) -> Berth {
        let dir = short_tempdir("berth-");
        let config = berth_config_with(
            upstream_url,
            &dir.path().join("cache"),
            "1GiB",
            registry_keys,
        );
        Berth::start_in(dir, &config, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts berth with several registries (see [`berth_multi_config`]), each
    /// `(name, upstream URL, default)`, with its cache in its own temp dir
    /// ([`Berth::cache_dir`]).
    pub fn start_registries(registries: &[(&str, &str, bool)]) -> Berth {
        let dir = short_tempdir("berth-");
        let config = berth_multi_config(registries, &dir.path().join("cache"));
        Berth::start_in(dir, &config, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn start_in(dir: TempDir, config_toml: &str, env: &[(&str, &str)]) -> Result<Berth, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (listen, admin) = listen_addrs(config_toml);
        let auth = toml::from_str::<toml::Table>(config_toml).is_ok_and(|t| t.contains_key("auth"));
        let config = dir.path().join("berth.toml");
        std::fs::write(&config, config_toml).expect("write berth config");
        let log = dir.path().join("berth.log");
        let mut berth = Berth {
            daemon: spawn(&config, &log, &env),
            config,
            log,
            listen,
            admin,
            auth,
            env,
            dir,
        };
        berth.wait_ready()?;
        Ok(berth)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let (listen, auth) = (self.listen, self.auth);
        let daemon = &mut self.daemon;
        let ready = wait_for("berth GET /v2/", READY_TIMEOUT, || {
            if let Err(e) = daemon.check_running() {
                return Probe::Failed(e);
            }
            match http_status(listen, "/v2/") {
                Ok(200) => Probe::Ready(()),
                Ok(401) if auth => Probe::Ready(()),
                Ok(code) => Probe::Pending(format!("status {code}")),
                Err(e) => Probe::Pending(e.to_string()),
            }
        });
        ready.map_err(|e| format!("{e}\n{}", self.daemon.log_tail(60)))
    }

    /// `http://127.0.0.1:PORT` of the registry API (`server.listen`).
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// `127.0.0.1:PORT`, as used in image references.
    pub fn host(&self) -> String {
        self.listen.to_string()
    }

    /// `http://127.0.0.1:PORT2` of `/healthz`, `/readyz`, `/metrics` (`server.admin_listen`).
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The config file berth was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// `<temp dir>/cache`, the cache dir that [`Berth::start_mirror`] and
    /// [`Berth::start_registries`] configure.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// Everything berth printed (stdout and stderr), across restarts.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `SIGTERM` and wait for a graceful exit (30 s, then `SIGKILL`).
    /// Returns how it exited, if it was running.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.daemon.stop()
    }

    /// `SIGKILL`: a crash, with no chance to clean up.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Stops berth if running (gracefully), then starts it again with the same config file
    /// (same ports, same cache dir) and waits until it is ready.
    pub fn restart(&mut self) {
        self.daemon.stop();
        self.daemon = spawn(&self.config, &self.log, &self.env);
        if let Err(e) = self.wait_ready() {
            panic!("berth did not restart: {e}");
        }
    }
}

fn spawn(config: &Path, log: &Path, env: &[(String, String)]) -> Daemon {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.arg("serve").arg("--config").arg(config);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    // Upstreams are on loopback: keep a proxy from the environment out of the way.
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    Daemon::spawn("berth", &mut cmd, log, log, STOP_GRACE)
}

/// `server.listen` and `server.admin_listen` from a config, with an unspecified IP replaced
/// by 127.0.0.1 for connecting. Berth's defaults (`0.0.0.0:5000`, `0.0.0.0:9090`) stand in
/// for missing or unparsable values (berth then rejects the config and `try_start` fails).
fn listen_addrs(config_toml: &str) -> (SocketAddr, SocketAddr) {
    let table: toml::Table = toml::from_str(config_toml).unwrap_or_default();
    let server = table.get("server").and_then(toml::Value::as_table);
    let addr = |key: &str, default: &str| {
        let mut addr: SocketAddr = server
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_str)
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| default.parse().expect("default address"));
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        addr
    };
    (
        addr("listen", "0.0.0.0:5000"),
        addr("admin_listen", "0.0.0.0:9090"),
    )
}
