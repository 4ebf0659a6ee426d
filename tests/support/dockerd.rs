//! A private `dockerd` (with its own `containerd`) and `docker` CLI helpers.
//!
//! Isolation: `--data-root`, `--exec-root`, `--pidfile`, the API socket and an empty
//! `--config-file` live in one temp dir; containerd is started by us with its root, state,
//! sockets and `opt` dir in there too (dockerd would otherwise share a system containerd
//! whenever `/run/containerd/containerd.sock` exists). dockerd still writes two shared,
//! harmless things: `/etc/docker/key.json` (created once) and the empty `/run/docker/plugins`.
//!
//! Docker Hub is made unreachable *fast*: dockerd runs with `HTTP(S)_PROXY` pointing at a
//! closed loopback port. Go never proxies loopback, so mirrors and registries on 127.0.0.0/8
//! are reached directly, while the Docker Hub fallback that follows a failed mirror fails at
//! once with "proxyconnect … connection refused" instead of resolving and dialing the
//! internet. So a pull fails within milliseconds when the mirror cannot serve it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::process::{
    Daemon, Probe, find_program, require_program, run, short_tempdir, unix_http_status,
    use_dead_proxy, wait_for,
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `docker pull` may take before it is killed.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(180);
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// What to start dockerd with, beyond the fixed isolation flags.
#[derive(Debug, Clone, Default)]
pub struct DockerdOptions {
    /// `--registry-mirror` URLs (used for docker.io images only), e.g. `http://127.0.0.1:5000`.
    pub mirrors: Vec<String>,
    /// `--insecure-registry` entries. 127.0.0.0/8 is insecure by default already.
    pub insecure_registries: Vec<String>,
    /// Any other dockerd flags, e.g. `--max-concurrent-downloads=1`, `--debug`.
    pub extra_args: Vec<String>,
}

/// A running dockerd on a private unix socket.
#[derive(Debug)]
pub struct Dockerd {
    dockerd: Daemon,
    containerd: Daemon,
    docker: PathBuf,
    socket: PathBuf,
    // Last: removed after both daemons are stopped (and leftover mounts unmounted).
    dir: TempDir,
}

impl Dockerd {
    /// Starts dockerd with `--registry-mirror mirror_url` and waits until its API answers.
    pub fn start(mirror_url: &str) -> Dockerd {
        Dockerd::start_with(DockerdOptions {
            mirrors: vec![mirror_url.to_owned()],
            ..DockerdOptions::default()
        })
    }

    pub fn start_with(options: DockerdOptions) -> Dockerd {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "Dockerd needs root (it mounts and manages namespaces)"
        );
        let dockerd_bin = require_program("dockerd");
        let containerd_bin = require_program("containerd");
        require_program("runc");
        let docker = docker_cli();
        let dir = short_tempdir("dkr-");
        let root = dir.path();

        // containerd: everything under <dir>/c, CRI off, no debug/metrics listeners.
        let ctd_sock = root.join("c/sock");
        let ctd_config = root.join("containerd.toml");
        std::fs::create_dir_all(root.join("c")).expect("mkdir containerd dir");
        std::fs::write(
            &ctd_config,
            format!(
                r#"version = 2
root = "{c}/root"
state = "{c}/state"
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
  path = "{c}/opt"
"#,
                c = root.join("c").display(),
                sock = ctd_sock.display()
            ),
        )
        .expect("write containerd config");
        let containerd_log = root.join("containerd.log");
        let mut containerd = Daemon::spawn(
            "containerd",
            Command::new(containerd_bin)
                .arg("--config")
                .arg(&ctd_config),
            &containerd_log,
            &containerd_log,
            Duration::from_secs(10),
        );
        let ready = wait_for("containerd socket", READY_TIMEOUT, || {
            if let Err(e) = containerd.check_running() {
                return Probe::Failed(e);
            }
            match std::os::unix::net::UnixStream::connect(&ctd_sock) {
                Ok(_) => Probe::Ready(()),
                Err(e) => Probe::Pending(e.to_string()),
            }
        });
        if let Err(e) = ready {
            panic!("{e}\n{}", containerd.log_tail(40));
        }

        // dockerd
        let socket = root.join("docker.sock");
        std::fs::write(root.join("daemon.json"), "{}\n").expect("write daemon.json");
        let mut cmd = Command::new(dockerd_bin);
        cmd.arg("--data-root")
            .arg(root.join("root"))
            .arg("--exec-root")
            .arg(root.join("x"))
            .arg("--pidfile")
            .arg(root.join("dockerd.pid"))
            .arg("--config-file")
            .arg(root.join("daemon.json"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--containerd")
            .arg(&ctd_sock)
            .args([
                "--storage-driver=vfs",
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
                "--userland-proxy=false",
            ]);
        for mirror in &options.mirrors {
            cmd.arg("--registry-mirror").arg(mirror);
        }
        for insecure in &options.insecure_registries {
            cmd.arg("--insecure-registry").arg(insecure);
        }
        cmd.args(&options.extra_args);
        use_dead_proxy(&mut cmd, &[]);
        let log = root.join("dockerd.log");
        let mut dockerd = Daemon::spawn("dockerd", &mut cmd, &log, &log, Duration::from_secs(20));
        let ready = wait_for("dockerd /_ping", READY_TIMEOUT, || {
            if let Err(e) = dockerd.check_running() {
                return Probe::Failed(e);
            }
            match unix_http_status(&socket, "/_ping") {
                Ok(200) => Probe::Ready(()),
                Ok(code) => Probe::Pending(format!("status {code}")),
                Err(e) => Probe::Pending(e.to_string()),
            }
        });
        let d = Dockerd {
            dockerd,
            containerd,
            docker,
            socket,
            dir,
        };
        if let Err(e) = ready {
            panic!("{e}\n{}", d.dockerd.log_tail(60));
        }
        d
    }

    /// `unix:///tmp/dkr-…/docker.sock`, for `docker -H`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A `docker -H <this daemon>` command with a private, empty CLI config.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.docker);
        for var in [
            "DOCKER_HOST",
            "DOCKER_CONTEXT",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
            "DOCKER_API_VERSION",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("DOCKER_CONFIG", self.dir.path().join("cli"))
            .arg("-H")
            .arg(self.host());
        cmd
    }

    /// Runs `docker ARGS` (bounded by `timeout`); `Ok(stdout)` if it exits 0, else `Err`
    /// with the command, exit status, stderr and stdout.
    pub fn docker_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        run(self.command().args(args), timeout)?.into_result()
    }

    /// Runs `docker ARGS` (bounded to 60 s); see [`Dockerd::docker_with_timeout`].
    pub fn docker(&self, args: &[&str]) -> Result<String, String> {
        self.docker_with_timeout(args, CLI_TIMEOUT)
    }

    /// `docker pull IMAGE` (bounded by [`PULL_TIMEOUT`]). A name without a registry
    /// (`library/app:v1`) is docker.io's, fetched through the mirror.
    pub fn pull(&self, image: &str) -> Result<String, String> {
        self.docker_with_timeout(&["pull", image], PULL_TIMEOUT)
    }

    /// `docker pull --platform PLATFORM IMAGE`, e.g. platform `linux/arm64`.
    pub fn pull_platform(&self, image: &str, platform: &str) -> Result<String, String> {
        self.docker_with_timeout(&["pull", "--platform", platform, image], PULL_TIMEOUT)
    }

    /// `docker rmi IMAGE` (its layers go too, so a later pull downloads them again).
    pub fn rmi(&self, image: &str) -> Result<String, String> {
        self.docker(&["rmi", image])
    }

    /// `repository:tag` of every image, as `docker images` shows them
    /// (docker.io's `library/app:v1` is `app:v1`).
    pub fn images(&self) -> Vec<String> {
        self.docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
            .expect("docker images")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Whether `image` (any reference form) is present.
    pub fn has_image(&self, image: &str) -> bool {
        self.docker(&["image", "inspect", "--format", "{{.Id}}", image])
            .is_ok()
    }

    /// `docker image inspect --format FORMAT IMAGE`, trimmed, e.g. `{{.Architecture}}`.
    pub fn inspect(&self, image: &str, format: &str) -> Result<String, String> {
        self.docker(&["image", "inspect", "--format", format, image])
            .map(|s| s.trim().to_owned())
    }

    /// The content of `path` in `image`'s extracted filesystem (creates a container without
    /// starting it, copies the file out, removes the container).
    pub fn read_file(&self, image: &str, path: &str) -> Result<Vec<u8>, String> {
        let id = self
            .docker(&["create", "--network", "none", image])?
            .trim()
            .to_owned();
        let out = self
            .dir
            .path()
            .join(format!("cp-{}", &id[..12.min(id.len())]));
        let copied = self.docker(&["cp", &format!("{id}:{path}"), &out.to_string_lossy()]);
        let removed = self.docker(&["rm", "-f", &id]);
        copied?;
        removed?;
        let content = std::fs::read(&out).map_err(|e| format!("read {}: {e}", out.display()));
        let _ = std::fs::remove_file(&out);
        content
    }

    /// dockerd's log (it names the endpoints tried, e.g. "Attempting next endpoint").
    pub fn logs(&self) -> String {
        self.dockerd.logs()
    }

    pub fn containerd_logs(&self) -> String {
        self.containerd.logs()
    }

    /// The temp dir holding data root, exec root, sockets and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // The daemons print their log tails themselves if the test is panicking.
        self.dockerd.stop();
        self.containerd.stop();
        unmount_under(self.dir.path());
    }
}

/// The Debian `docker` CLI (same version as the daemon) if present, else `docker` on PATH.
fn docker_cli() -> PathBuf {
    let debian = Path::new("/usr/bin/docker");
    if debian.is_file() {
        return debian.to_owned();
    }
    find_program("docker").unwrap_or_else(|| panic!("docker not found: run tests/setup.sh"))
}

/// Lazily unmounts everything mounted under `root`, deepest first (dockerd bind-mounts its
/// data root onto itself, and leaves it if it is killed).
pub(crate) fn unmount_under(root: &Path) {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(&root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for point in points {
        let c = CString::new(point.as_os_str().as_bytes()).expect("mount point has no NUL");
        // SAFETY: umount2 with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "umount {}: {}",
                point.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}
