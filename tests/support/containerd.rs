//! A private `containerd` and `ctr images pull --hosts-dir` with per-registry `hosts.toml`.
//!
//! Isolation: root, state, the gRPC/ttrpc sockets, the `opt` dir and the config live in one
//! short temp dir under /tmp (socket paths must stay < 108 bytes); CRI, the debug and the
//! metrics listeners are off, so it never touches `/run/containerd` or another containerd.
//!
//! `ctr images pull` (containerd 1.6) fetches in the *ctr* process, not in the daemon: the
//! resolver, `hosts.toml` handling and HTTP client all run in ctr, which then writes content
//! and unpacks through the daemon. `--hosts-dir DIR` makes ctr read `DIR/<registry>/hosts.toml`
//! (`DIR/docker.io/hosts.toml` for `docker.io/...` references); each `[host."URL"]` there is
//! tried in order, then `server` as the last resort. A host that is not the reference's
//! registry gets `?ns=<registry>` on every request (containerd's mirror convention).
//!
//! The real registries are made unreachable *fast*: ctr runs with `HTTP(S)_PROXY` pointing
//! at a closed loopback port. Go never proxies loopback, so hosts on 127.0.0.0/8 are reached
//! directly, while the `server = "https://registry-1.docker.io"` fallback (tried after the
//! mirror answered 404 or failed) fails at once with "proxyconnect … connection refused".
//!
//! Unpacking uses the `native` snapshotter (plain copies: works in any container, no
//! overlayfs needed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::process::{
    Daemon, Probe, require_program, run, short_tempdir, use_dead_proxy, wait_for,
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `ctr images pull` may take before it is killed.
pub const CTR_PULL_TIMEOUT: Duration = Duration::from_secs(120);
const CTR_TIMEOUT: Duration = Duration::from_secs(60);
/// `ctr --namespace`
const NAMESPACE: &str = "berth-tests";

/// The fallback `server` containerd would use for a registry without a `hosts.toml` of its
/// own (`docker.io` is served by `registry-1.docker.io`).
pub fn default_server(registry: &str) -> String {
    match registry {
        "docker.io" => "https://registry-1.docker.io".to_owned(),
        other => format!("https://{other}"),
    }
}

/// A running private containerd, plus a hosts dir for `ctr --hosts-dir`.
#[derive(Debug)]
pub struct Containerd {
    daemon: Daemon,
    ctr: PathBuf,
    socket: PathBuf,
    // Last: removed after the daemon is stopped.
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd (CRI disabled) on a private socket and waits until it answers
    /// `ctr version`.
    pub fn start() -> Containerd {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "Containerd needs root (it mounts snapshots and owns its state dirs)"
        );
        let bin = require_program("containerd");
        let ctr = require_program("ctr");
        let dir = short_tempdir("ctd-");
        let root = dir.path();
        let socket = root.join("sock");
        let config = root.join("config.toml");
        std::fs::create_dir_all(root.join("hosts")).expect("mkdir hosts dir");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
                d = root.display(),
                sock = socket.display()
            ),
        )
        .expect("write containerd config");
        let log = root.join("containerd.log");
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config);
        for var in ["CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE"] {
            cmd.env_remove(var);
        }
        let mut daemon = Daemon::spawn("containerd", &mut cmd, &log, &log, Duration::from_secs(10));
        let ready = wait_for("containerd socket", READY_TIMEOUT, || {
            if let Err(e) = daemon.check_running() {
                return Probe::Failed(e);
            }
            match std::os::unix::net::UnixStream::connect(&socket) {
                Ok(_) => Probe::Ready(()),
                Err(e) => Probe::Pending(e.to_string()),
            }
        });
        let c = Containerd {
            daemon,
            ctr,
            socket,
            dir,
        };
        if let Err(e) = ready {
            panic!("{e}\n{}", c.daemon.log_tail(40));
        }
        if let Err(e) = c.ctr(&["version"]) {
            panic!(
                "containerd does not answer ctr: {e}\n{}",
                c.daemon.log_tail(40)
            );
        }
        c
    }

    /// The gRPC socket, for `ctr --address`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The dir given to `ctr images pull --hosts-dir`.
    pub fn hosts_dir(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    /// Writes `<hosts dir>/<registry>/hosts.toml`: `server` as the fallback, then each of
    /// `mirrors` (`http://127.0.0.1:PORT`) as a host with the `pull` and `resolve`
    /// capabilities, tried in order before the server. Returns the file's text.
    pub fn set_hosts(&self, registry: &str, server: &str, mirrors: &[&str]) -> String {
        let mut toml = format!("server = \"{server}\"\n");
        for m in mirrors {
            toml.push_str(&format!(
                "\n[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ));
        }
        let dir = self.hosts_dir().join(registry);
        std::fs::create_dir_all(&dir).expect("mkdir hosts.toml dir");
        std::fs::write(dir.join("hosts.toml"), &toml).expect("write hosts.toml");
        toml
    }

    /// Makes `mirror_url` (e.g. berth's `http://127.0.0.1:PORT`) the mirror of `registry`,
    /// with the registry's real server as the (unreachable) fallback.
    pub fn add_mirror(&self, registry: &str, mirror_url: &str) -> String {
        self.set_hosts(registry, &default_server(registry), &[mirror_url])
    }

    /// A `ctr --address <socket> --namespace berth-tests` command, with proxies pointing at
    /// a dead loopback port (see the module docs).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.ctr);
        use_dead_proxy(
            &mut cmd,
            &[
                "CONTAINERD_ADDRESS",
                "CONTAINERD_NAMESPACE",
                "CONTAINERD_SNAPSHOTTER",
            ],
        );
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(NAMESPACE);
        cmd
    }

    /// Runs `ctr ARGS` (bounded by `timeout`); `Ok(stdout)` if it exits 0, else `Err` with
    /// the command, exit status, stderr and stdout.
    pub fn ctr_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        run(self.command().args(args), timeout)?.into_result()
    }

    /// Runs `ctr ARGS` (bounded to 60 s).
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        self.ctr_with_timeout(args, CTR_TIMEOUT)
    }

    /// `ctr images pull --hosts-dir <hosts dir> --snapshotter native EXTRA… IMAGE` (bounded
    /// by [`CTR_PULL_TIMEOUT`]). `image` must be fully qualified (`docker.io/library/app:v1`).
    pub fn pull_with(&self, extra: &[&str], image: &str) -> Result<String, String> {
        let hosts = self.hosts_dir();
        let mut args = vec![
            "images",
            "pull",
            "--hosts-dir",
            hosts.to_str().expect("utf-8 temp dir"),
            "--snapshotter",
            "native",
        ];
        args.extend_from_slice(extra);
        args.push(image);
        self.ctr_with_timeout(&args, CTR_PULL_TIMEOUT)
    }

    /// `ctr images pull` of a fully qualified `image`; see [`Containerd::pull_with`].
    pub fn pull(&self, image: &str) -> Result<String, String> {
        self.pull_with(&[], image)
    }

    /// Names (`docker.io/library/app:v1`) of the images containerd has.
    pub fn images(&self) -> Vec<String> {
        self.ctr(&["images", "list", "--quiet"])
            .expect("ctr images list")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `ctr images rm --sync IMAGE` (its content is garbage-collected at once).
    pub fn rmi(&self, image: &str) -> Result<String, String> {
        self.ctr(&["images", "rm", "--sync", image])
    }

    /// The daemon's log.
    pub fn logs(&self) -> String {
        self.daemon.logs()
    }

    /// The temp dir holding config, state, root, socket, hosts dir and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // The daemon prints its log tail itself if the test is panicking.
        self.daemon.stop();
        super::dockerd::unmount_under(self.dir.path());
    }
}
