//! The container image, end to end with a real dockerd: `tests/image/build-local.sh` builds it
//! from the berth binary under test (no base image), one private dockerd runs it with
//! `--network host`, and the same dockerd pulls an image through it (`--registry-mirror`
//! pointing at the containerized berth). The upstream is Debian's `docker-registry`.
//!
//! The Dockerfile is not built here: it needs base images (`rust:1-bookworm`,
//! `gcr.io/distroless/cc-debian12`) that the test machine does not have.
//!
//! The programs are installed by tests/setup.sh; a missing one fails the test.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const TAG: &str = "berth:test";
const CONTAINER: &str = "berth-test";
/// build-local.sh copies the (debug, ~200 MB) binary and `docker import`s the rootfs.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The uid and gid the image runs as (distroless "nonroot").
const NONROOT: &str = "65532";

#[test]
fn image_built_locally_runs_as_nonroot_and_serves_docker_pulls() {
    let started = Instant::now();
    let registry = Registry::start();
    let image = seed_image(&registry, "library/app", "v1", 3);

    // One dockerd: it runs the berth container and pulls through it.
    let listen = free_addr();
    let admin = free_addr();
    let docker = Dockerd::start(&format!("http://{listen}"));

    build_berth_image(&docker);
    assert_built_image_user_and_config(&docker);
    let dir = tempfile::Builder::new()
        .prefix("img-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let container = run_berth_container(&docker, dir.path(), listen, admin, &registry.url());
    assert_runs_as_nonroot(&container);
    pull_through_the_container(&docker, &container, &registry, &image);
    assert_cache_written_by_nonroot(&container, admin, &image);

    container.remove();
    eprintln!("image test took {:?}", started.elapsed());
}

/// The built image's USER is 65532:65532, and the config baked into it
/// (config/container.toml) is one berth accepts.
fn assert_built_image_user_and_config(docker: &Dockerd) {
    let created = docker
        .docker(&["image", "inspect", "--format", "{{.Config.User}}", TAG])
        .expect("inspect the built image");
    assert_eq!(created.trim(), "65532:65532", "USER of {TAG}");
    // The config baked into the image (config/container.toml) is one berth accepts.
    docker
        .docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            TAG,
            "check-config",
            "/etc/berth/berth.toml",
        ])
        .expect("berth check-config of the image's own /etc/berth/berth.toml");
}

/// Runs the berth image with `--network host` and a config (in `dir`) listening on `listen`
/// and `admin` before `upstream`; returns once it is ready.
fn run_berth_container<'a>(
    docker: &'a Dockerd,
    dir: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: &str,
) -> Container<'a> {
    let config = dir.join("berth.toml");
    std::fs::write(&config, container_config(listen, admin, upstream)).expect("write berth.toml");

    let container = Container::run(
        docker,
        &[
            "run",
            "-d",
            "--network",
            "host",
            "-v",
            &format!("{}:/etc/berth/berth.toml:ro", config.display()),
            "--name",
            CONTAINER,
            TAG,
        ],
    );
    container.wait_ready(admin);
    container
}

/// Runs as 65532:65532: the container's config, and the process the kernel runs.
fn assert_runs_as_nonroot(container: &Container) {
    assert_eq!(
        container.inspect("{{.Config.User}}"),
        "65532:65532",
        "container USER"
    );
    let pid = container.inspect("{{.State.Pid}}");
    assert!(
        pid.parse::<u32>().is_ok_and(|p| p > 0),
        "container pid {pid:?}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    assert_eq!(
        status_field(&status, "Name"),
        ["berth"],
        "the container's process"
    );
    assert_eq!(status_field(&status, "Uid"), [NONROOT; 4], "{status}");
    assert_eq!(status_field(&status, "Gid"), [NONROOT; 4], "{status}");
}

/// Pull through the containerized berth: each blob fetched from upstream once, and the
/// image's files arrive intact.
fn pull_through_the_container(
    docker: &Dockerd,
    container: &Container,
    registry: &Registry,
    image: &Image,
) {
    docker.pull("library/app:v1").unwrap_or_else(|e| {
        panic!(
            "pull through the berth container: {e}\n{}",
            container.logs()
        )
    });
    for (d, _) in image.blobs() {
        assert_eq!(
            registry.blob_gets("library/app", d),
            1,
            "upstream GETs of {d}"
        );
    }
    let file = &image.layers[2].files[0];
    assert_eq!(
        docker
            .read_file("library/app:v1", &format!("/{}", file.0))
            .expect("read a file of the pulled image"),
        file.1
    );
}

/// The blobs are in the cache (the image's volume at /var/lib/berth), written by 65532.
fn assert_cache_written_by_nonroot(container: &Container, admin: SocketAddr, image: &Image) {
    let want = image.blobs().len() as f64;
    let cached = wait_for(
        "berth_cache_blobs",
        Duration::from_secs(10),
        || match http_get_text(admin, "/metrics") {
            Ok(m) if sample(&m, "berth_cache_blobs") == want => Probe::Ready(()),
            Ok(m) => Probe::Pending(format!(
                "berth_cache_blobs {}",
                sample(&m, "berth_cache_blobs")
            )),
            Err(e) => Probe::Pending(e.to_string()),
        },
    );
    cached.unwrap_or_else(|e| panic!("{e}\n{}", container.logs()));
    let volume = container.inspect(
        r#"{{range .Mounts}}{{if eq .Destination "/var/lib/berth"}}{{.Source}}{{end}}{{end}}"#,
    );
    assert!(!volume.is_empty(), "no volume at /var/lib/berth");
    let (files, bytes) = owned_files(Path::new(&volume), NONROOT.parse().unwrap());
    assert!(
        files >= image.blobs().len() && bytes >= image.layers_size(),
        "{volume}: {files} files of {bytes} bytes; expected the {} blobs",
        image.blobs().len()
    );
}

/// Builds [`TAG`] with build-local.sh against `docker`'s daemon.
fn build_berth_image(docker: &Dockerd) {
    // What build-local.sh runs; a missing one fails the test here, by name.
    for program in ["bash", "docker", "ldd", "tar", "install"] {
        require_program(program);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/image/build-local.sh");
    let mut cmd = Command::new(require_program("bash"));
    cmd.arg(&script)
        .arg(env!("CARGO_BIN_EXE_berth"))
        .arg(TAG)
        .env("DOCKER_HOST", docker.host())
        .env("DOCKER_CONFIG", docker.dir().join("cli"));
    for var in [
        "DOCKER_CONTEXT",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "CA_BUNDLE",
    ] {
        cmd.env_remove(var);
    }
    let t = Instant::now();
    let out = run(&mut cmd, BUILD_TIMEOUT)
        .and_then(CmdOutput::into_result)
        .unwrap_or_else(|e| panic!("build-local.sh: {e}"));
    eprintln!("build-local.sh took {:?}:\n{}", t.elapsed(), out.trim());
}

/// berth.toml for the container: the registry API and admin on the host's loopback
/// (`--network host`), the cache in the image's volume, `upstream` as docker.io's endpoint.
fn container_config(listen: SocketAddr, admin: SocketAddr, upstream: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"

[cache]
dir = "/var/lib/berth"
max_size = "1GiB"
tag_ttl = "10m"

[[registry]]
name = "docker.io"
default = true
endpoints = ["{upstream}"]
"#
    )
}

/// Regular files under `dir` and their total size; panics on an entry not owned by `uid`.
fn owned_files(dir: &Path, uid: u32) -> (usize, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut files, mut bytes) = (0, 0);
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat a cache entry");
            assert_eq!(meta.uid(), uid, "owner of {}", path.display());
            if meta.is_dir() {
                todo.push(path);
            } else if meta.is_file() {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    (files, bytes)
}

/// The whitespace-separated values of `Field:` in /proc/PID/status.
fn status_field<'a>(status: &'a str, field: &str) -> Vec<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default()
}

/// A container on `docker`, removed (`docker rm -f -v`) on drop; its log is printed then if
/// the test is failing.
struct Container<'a> {
    docker: &'a Dockerd,
    removed: bool,
}

impl<'a> Container<'a> {
    /// `docker ARGS` (a `docker run -d … --name CONTAINER …`).
    fn run(docker: &'a Dockerd, args: &[&str]) -> Container<'a> {
        // Guard first: a `docker run` that created the container and then failed still
        // leaves a container to remove.
        let container = Container {
            docker,
            removed: false,
        };
        if let Err(e) = docker.docker(args) {
            panic!("docker run: {e}\n{}", container.logs());
        }
        container
    }

    fn inspect(&self, format: &str) -> String {
        self.docker
            .docker(&["inspect", "--format", format, CONTAINER])
            .unwrap_or_else(|e| panic!("docker inspect {format}: {e}"))
            .trim()
            .to_owned()
    }

    /// Waits until berth's `/readyz` answers 200; fails at once if the container stops.
    fn wait_ready(&self, admin: SocketAddr) {
        let ready = wait_for("berth container /readyz", READY_TIMEOUT, || {
            match self
                .docker
                .docker(&["inspect", "--format", "{{.State.Status}}", CONTAINER])
            {
                Ok(s) if s.trim() == "running" => {}
                Ok(s) => return Probe::Failed(format!("container is {}", s.trim())),
                Err(e) => return Probe::Failed(e),
            }
            match http_status(admin, "/readyz") {
                Ok(200) => Probe::Ready(()),
                Ok(code) => Probe::Pending(format!("status {code}")),
                Err(e) => Probe::Pending(e.to_string()),
            }
        });
        if let Err(e) = ready {
            panic!("{e}\n{}", self.logs());
        }
    }

    /// `docker logs` of the container, headed, or why it could not be read.
    fn logs(&self) -> String {
        let text = match run(
            self.docker.command().args(["logs", CONTAINER]),
            Duration::from_secs(30),
        ) {
            Ok(out) => format!("{}{}", out.stdout, out.stderr),
            Err(e) => e,
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        format!("----- {CONTAINER} log (last 60 lines) -----\n{tail}\n-----")
    }

    fn remove(mut self) {
        self.removed = true;
        self.docker
            .docker(&["rm", "-f", "-v", CONTAINER])
            .expect("docker rm -f -v the berth container");
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if let Err(e) = self.docker.docker(&["rm", "-f", "-v", CONTAINER]) {
            eprintln!("docker rm -f -v {CONTAINER}: {e}");
        }
    }
}
