//! `podman` (no daemon) with private storage and a private `registries.conf`.
//!
//! Isolation, all in one temp dir: `--root`, `--runroot`, `--tmpdir`, `--volumepath`, the
//! `vfs` storage driver (works in any container, as root), `--cgroup-manager cgroupfs`,
//! `--events-backend file`, and the config files podman would otherwise read from `/etc`:
//! `CONTAINERS_CONF`, `CONTAINERS_STORAGE_CONF`, `CONTAINERS_REGISTRIES_CONF` (which also
//! stops `registries.conf.d` drop-ins from being read), `REGISTRY_AUTH_FILE` and a
//! `--signature-policy` accepting anything.
//!
//! Mirrors are the `registries.conf` (v2) path-prefix form:
//!
//! ```toml
//! [[registry]]
//! prefix = "docker.io"
//! location = "docker.io"
//! [[registry.mirror]]
//! location = "127.0.0.1:PORT/docker.io"
//! insecure = true
//! ```
//!
//! so `docker.io/library/app:v1` is fetched as `GET /v2/docker.io/library/app/manifests/v1`
//! from the mirror. When every mirror fails, containers/image falls back to the primary
//! `location`; that is made to fail *fast* by `HTTP(S)_PROXY` pointing at a closed loopback
//! port (Go never proxies loopback, so the mirror itself is reached directly). podman 4.3
//! retries a failed pull 3 times, 1 s apart, so such a failure takes about 3 s; every attempt
//! asks the mirror first.
//!
//! Not isolated: containers/image (as root) keeps its blob-info cache, a bolt DB of
//! digest → location hints with its own locking, in `/var/lib/containers/cache`; podman 4.3
//! has no setting for it. It never makes a pull skip a download into empty storage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;

use super::process::{require_program, run, short_tempdir, use_dead_proxy};

/// How long `podman pull` may take before it is killed.
pub const PODMAN_PULL_TIMEOUT: Duration = Duration::from_secs(120);
const PODMAN_TIMEOUT: Duration = Duration::from_secs(60);

/// One `[[registry]]` of registries.conf with its insecure mirrors.
#[derive(Debug)]
struct RegistryEntry {
    prefix: String,
    location: String,
    mirrors: Vec<String>,
}

/// A private podman "installation": storage, state and config in a temp dir.
#[derive(Debug)]
pub struct Podman {
    podman: PathBuf,
    /// The `[[registry]]` entries of registries.conf, in order.
    registries: Mutex<Vec<RegistryEntry>>,
    dir: TempDir,
}

impl Podman {
    /// Prepares the private dirs and config files (podman has no daemon to start).
    pub fn new() -> Podman {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "Podman fixture expects root (rootful storage in a temp dir)"
        );
        let podman = require_program("podman");
        let dir = short_tempdir("pod-");
        let d = dir.path();
        for sub in ["root", "runroot", "tmp", "volumes"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir podman dir");
        }
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/runroot\"\ngraphroot = \"{d}/root\"\n",
                d = d.display()
            ),
        )
        .expect("write storage.conf");
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{d}/events.log\"\ntmp_dir = \"{d}/tmp\"\n\
                 volume_path = \"{d}/volumes\"\n",
                d = d.display()
            ),
        )
        .expect("write containers.conf");
        // podman insists that a REGISTRY_AUTH_FILE exists.
        std::fs::write(d.join("auth.json"), "{\"auths\":{}}\n").expect("write auth.json");
        std::fs::write(
            d.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("write policy.json");
        let p = Podman {
            podman,
            registries: Mutex::new(Vec::new()),
            dir,
        };
        p.write_registries_conf();
        p
    }

    /// Adds a `[[registry]]` for `prefix` (located at `location`) with one insecure
    /// `[[registry.mirror]]` at `mirror_location` (`127.0.0.1:PORT/docker.io`: host, port and
    /// an optional path prefix; no scheme). Calling it again for the same prefix appends a
    /// mirror. Returns the registries.conf text.
    pub fn add_mirror(&self, prefix: &str, location: &str, mirror_location: &str) -> String {
        {
            let mut regs = self.registries.lock().expect("registries lock");
            match regs.iter_mut().find(|r| r.prefix == prefix) {
                Some(r) => r.mirrors.push(mirror_location.to_owned()),
                None => regs.push(RegistryEntry {
                    prefix: prefix.to_owned(),
                    location: location.to_owned(),
                    mirrors: vec![mirror_location.to_owned()],
                }),
            }
        }
        self.write_registries_conf()
    }

    fn write_registries_conf(&self) -> String {
        let mut text = String::from("unqualified-search-registries = []\n");
        for r in self.registries.lock().expect("registries lock").iter() {
            text.push_str(&format!(
                "\n[[registry]]\nprefix = \"{}\"\nlocation = \"{}\"\n",
                r.prefix, r.location
            ));
            for m in &r.mirrors {
                text.push_str(&format!(
                    "[[registry.mirror]]\nlocation = \"{m}\"\ninsecure = true\n"
                ));
            }
        }
        std::fs::write(self.registries_conf(), &text).expect("write registries.conf");
        text
    }

    /// The private `registries.conf` (`CONTAINERS_REGISTRIES_CONF`).
    pub fn registries_conf(&self) -> PathBuf {
        self.dir.path().join("registries.conf")
    }

    /// A `podman` command with the isolation flags and environment of the module docs.
    pub fn command(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new(&self.podman);
        use_dead_proxy(
            &mut cmd,
            &[
                "CONTAINER_HOST",
                "CONTAINER_CONNECTION",
                "REGISTRIES_CONFIG_PATH",
            ],
        );
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", self.registries_conf())
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .env("DOCKER_CONFIG", d.join("docker-config"))
            .env("TMPDIR", d.join("tmp"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--volumepath")
            .arg(d.join("volumes"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        cmd
    }

    /// Runs `podman ARGS` (bounded by `timeout`); `Ok(stdout)` if it exits 0, else `Err`
    /// with the command, exit status, stderr and stdout.
    pub fn podman_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        run(self.command().args(args), timeout)?.into_result()
    }

    /// Runs `podman ARGS` (bounded to 60 s).
    pub fn podman(&self, args: &[&str]) -> Result<String, String> {
        self.podman_with_timeout(args, PODMAN_TIMEOUT)
    }

    /// `podman pull --signature-policy <accept anything> EXTRA… IMAGE` (bounded by
    /// [`PODMAN_PULL_TIMEOUT`]). Use fully qualified names (`docker.io/library/app:v1`).
    pub fn pull_with(&self, extra: &[&str], image: &str) -> Result<String, String> {
        let policy = self.dir.path().join("policy.json");
        let mut args = vec![
            "pull",
            "--signature-policy",
            policy.to_str().expect("utf-8 temp dir"),
        ];
        args.extend_from_slice(extra);
        args.push(image);
        self.podman_with_timeout(&args, PODMAN_PULL_TIMEOUT)
    }

    /// `podman pull IMAGE`; see [`Podman::pull_with`].
    pub fn pull(&self, image: &str) -> Result<String, String> {
        self.pull_with(&[], image)
    }

    /// `repository:tag` of every image (`docker.io/library/app:v1`).
    pub fn images(&self) -> Vec<String> {
        self.podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
            .expect("podman images")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `podman image inspect --format FORMAT IMAGE`, trimmed.
    pub fn inspect(&self, image: &str, format: &str) -> Result<String, String> {
        self.podman(&["image", "inspect", "--format", format, image])
            .map(|s| s.trim().to_owned())
    }

    /// The temp dir holding storage, state and config.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Podman {
    fn default() -> Podman {
        Podman::new()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // vfs needs no unmounting, but podman may leave a shm/overlay mount in runroot.
        super::dockerd::unmount_under(self.dir.path());
        // vfs layer dirs can hold read-only dirs; TempDir's removal copes with that as root.
    }
}
