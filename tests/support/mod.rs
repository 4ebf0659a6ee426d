//! End-to-end test support: real programs on loopback, started and cleaned up by the test.
//!
//! Use it from an integration test with `mod support;`. It provides:
//!
//! - [`Registry`]: CNCF distribution (`docker-registry`) with filesystem storage, optional
//!   htpasswd auth, and an access-log parser to count upstream requests.
//! - Seeding ([`seed_image`], [`seed_index`], [`seed_blob_image`], [`Pusher`]): real images
//!   (gzip'd tar layers, config, manifest, OCI index) pushed with the registry v2 API.
//! - [`Dockerd`]: a private `dockerd` + `containerd` pair, with `docker` CLI helpers.
//! - [`Berth`]: the berth binary under test (`berth serve --config FILE`).
//! - [`InProc`]: berth in-process (started on 127.0.0.1:0 listeners), its config
//!   built by [`InProcConfig`], its log captured; [`sample`] reads a metric from `/metrics`.
//! - [`Containerd`]: a private `containerd` for `ctr images pull --hosts-dir` (hosts.toml).
//! - [`Podman`]: `podman` with private storage, config and `registries.conf` mirrors.
//! - [`Recorder`]: a loopback TCP relay recording the HTTP requests a client sends.
//! - [`Webhook`]: a loopback HTTP receiver recording the webhook deliveries berth sends (or,
//!   answering as a test says, a fake token service: a metadata server, an IMDS).
//! - [`request`]: one blocking HTTP request (reqwest), for raw registry API checks.
//! - [`Garage`]: a single-node Garage S3 object store with one bucket and key, for the shared
//!   tier (built by `tests/setup.sh` into `$HOME/.cache/berth-tools`).
//! - [`Azurite`] (Azure Blob Storage) and [`FakeGcs`] (Google Cloud Storage): the emulators of
//!   the other two backends (installed by `tests/setup.sh` there too). All three implement
//!   [`StoreServer`], so a shared-tier scenario runs against each.
//!   [`Azurite::start_oauth`] serves HTTPS (a test CA) and takes bearer tokens too.
//!
//! Every fixture listens on a free port on 127.0.0.1 (dockerd: a unix socket), lives in its own
//! temp dir under `/tmp`, and cleans up on `Drop` (signals its child by PID, waits bounded,
//! unmounts leftovers, removes its dir). When a test panics, `Drop` prints the tail of the
//! fixture's log to stderr.
//!
//! A missing program is a panic naming `tests/setup.sh`, never a skip.
//!
//! Children are started with `PR_SET_PDEATHSIG`, so a killed test run leaks no daemons. Linux
//! sends that signal when the *thread* that spawned the child exits: start fixtures on the
//! test's own thread (plain `#[test]` or `#[tokio::test]`), not in `spawn_blocking` or a helper
//! thread that ends before the test does.
//!
//! Everything but [`Pusher`] is blocking, including the `seed_*` functions (they run their own
//! runtime on a scoped thread), so it works in plain `#[test]`s and in `#[tokio::test]`s alike.
#![allow(dead_code, unused_imports)]

mod azurite;
mod berth;
mod containerd;
mod dockerd;
mod fake_gcs;
mod garage;
mod http;
mod inproc;
mod metrics;
mod podman;
mod process;
mod recorder;
mod registry;
mod seed;
mod store;
mod webhook;

pub use self::azurite::{Azurite, azurite_program};
pub use self::berth::{Berth, berth_config, berth_config_with, berth_multi_config};
pub use self::containerd::{CTR_PULL_TIMEOUT, Containerd, default_server};
pub use self::dockerd::{Dockerd, DockerdOptions, PULL_TIMEOUT};
pub use self::fake_gcs::{FakeGcs, fake_gcs_program};
pub use self::garage::{Garage, garage_program, tools_dir};
pub use self::http::{Reply, request};
pub use self::inproc::{InProc, InProcConfig, client, error_chain, loopback_listener};
pub use self::metrics::{sample, try_sample};
pub use self::podman::{PODMAN_PULL_TIMEOUT, Podman};
pub use self::process::{
    CmdOutput, DEAD_PROXY, Probe, exchange, find_program, free_addr, free_port, http_get_text,
    http_status, require_program, run, status_of, use_dead_proxy, wait_for,
};
pub use self::recorder::{RecordedRequest, Recorder};
pub use self::registry::{AccessEntry, Registry};
pub use self::seed::{
    DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, Format, Image, Index, Layer, OCI_CONFIG,
    OCI_INDEX, OCI_LAYER, OCI_MANIFEST, Pusher, block_on, build_image, digest_of, gzip,
    random_bytes, seed_blob_image, seed_image, seed_image_with, seed_index, seeded_bytes, tar,
};
pub use self::store::StoreServer;
pub(crate) use self::store::on_each_store;
pub use self::webhook::{Delivery, Webhook};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `f`, printing how long it took (`[timing] what: …`) to stderr.
pub fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let v = f();
    eprintln!("[timing] {what}: {:.2?}", start.elapsed());
    v
}

/// `text` parsed as JSON; panics with the text if it is not JSON.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Regular files under `dir`, recursively, with their sizes, sorted by path (none if `dir`
/// does not exist).
pub fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => dirs.push(e.path()),
                Ok(_) => out.push((e.path(), e.metadata().map_or(0, |m| m.len()))),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// Runs `skopeo ARGS` (bounded to 60 s); `Ok(stdout)` on success, `Err` with stderr otherwise.
pub fn skopeo(args: &[&str]) -> Result<String, String> {
    let bin = require_program("skopeo");
    let mut cmd = Command::new(bin);
    cmd.args(args);
    run(&mut cmd, Duration::from_secs(60))?.into_result()
}

/// `skopeo ARGS` (bounded to 60 s) with an empty private registries.conf and auth file (in
/// `dir`), and `HTTP(S)_PROXY` at a closed loopback port, so nothing reaches a real registry.
pub fn skopeo_isolated(dir: &Path, args: &[&str]) -> Result<String, String> {
    let conf = dir.join("registries.conf");
    std::fs::write(&conf, "unqualified-search-registries = []\n").expect("write registries.conf");
    std::fs::write(dir.join("auth.json"), "{\"auths\":{}}\n").expect("write auth.json");
    let mut cmd = Command::new(require_program("skopeo"));
    use_dead_proxy(&mut cmd, &[]);
    cmd.env("CONTAINERS_REGISTRIES_CONF", &conf)
        .env("REGISTRY_AUTH_FILE", dir.join("auth.json"))
        .args(args);
    run(&mut cmd, Duration::from_secs(60))?.into_result()
}

/// `promtool check metrics` (Debian package `prometheus`) on the exposition text.
pub fn promtool_check(metrics: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let promtool = require_program("promtool");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write metrics to promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
