//! Garage (`garage server`), a real S3-compatible object store, as berth's shared tier.
//!
//! A single node (`replication_factor = 1`, LMDB metadata) with one bucket and one key that can
//! read and write it. The binary is built by `tests/setup.sh` into
//! `${BERTH_TOOLS_DIR:-$HOME/.cache/berth-tools}/bin/garage` (crates.io `garage` 2.5.0); `$PATH`
//! is searched after that.
//!
//! Setup goes through Garage's own CLI (`garage -c FILE …`, which talks to the server over its
//! RPC port). Objects are read and written for assertions through the `object_store` crate,
//! the same client berth uses, path-style against [`Garage::endpoint`] (see
//! [`StoreServer`](super::StoreServer)).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use tempfile::TempDir;

use super::process::{
    CmdOutput, Daemon, Probe, find_program, free_addr, http_get_text, http_status, run,
    short_tempdir, wait_for,
};
use super::seed::block_on;
use super::store::{StoreServer, test_client_options, test_retry};

/// Start (or restart) until the S3 and admin APIs answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// One `garage` CLI command.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at binding free ports (another process may grab one we picked).
const PORT_ATTEMPTS: usize = 3;
const BUCKET: &str = "berth";
const KEY_NAME: &str = "berth-key";
const REGION: &str = "garage";

/// A running single-node Garage on free `127.0.0.1` ports, storing in a temp dir.
///
/// [`Garage::stop`] kills it (the S3 port then refuses connections); [`Garage::restart`] starts
/// it again on the same ports with the same data, bucket and key.
#[derive(Debug)]
pub struct Garage {
    daemon: Daemon,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    s3_addr: SocketAddr,
    admin_addr: SocketAddr,
    rpc_addr: SocketAddr,
    node_id: String,
    key_id: String,
    secret: String,
    key_id_file: PathBuf,
    secret_file: PathBuf,
    /// Seconds the last start or restart took, setup included.
    startup: Duration,
    // Last: removed after the daemon is stopped.
    dir: TempDir,
}

impl Garage {
    /// Starts Garage, assigns the node a layout, creates bucket `berth` and key `berth-key`
    /// (read + write on it), and waits until the S3 API serves that key.
    pub fn start() -> Garage {
        let began = Instant::now();
        let bin = garage_program();
        let dir = short_tempdir("garage-");
        let config = dir.path().join("garage.toml");
        let log = dir.path().join("garage.log");
        let rpc_secret = random_hex(32);
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let (rpc_addr, s3_addr, admin_addr) = (free_addr(), free_addr(), free_addr());
            if rpc_addr == s3_addr || rpc_addr == admin_addr || s3_addr == admin_addr {
                continue;
            }
            // Fresh state per attempt: a failed attempt may have written a layout or node key.
            for sub in ["meta", "data"] {
                let _ = std::fs::remove_dir_all(dir.path().join(sub));
            }
            let toml = format!(
                r#"metadata_dir = {meta:?}
data_dir = {data:?}
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "{rpc_addr}"
rpc_public_addr = "{rpc_addr}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "{s3_addr}"

[admin]
api_bind_addr = "{admin_addr}"
"#,
                meta = dir.path().join("meta").display().to_string(),
                data = dir.path().join("data").display().to_string(),
            );
            std::fs::write(&config, toml).expect("write garage.toml");
            let mut daemon = spawn(&bin, &config, &log);
            // The admin API's /health answers 503 until a layout is applied: any status will do.
            let up = wait_for("garage admin API", READY_TIMEOUT, || {
                if let Err(e) = daemon.check_running() {
                    return Probe::Failed(e);
                }
                match http_status(admin_addr, "/health") {
                    Ok(_) => Probe::Ready(()),
                    Err(e) => Probe::Pending(e.to_string()),
                }
            });
            match up {
                Ok(()) => {
                    let mut garage = Garage {
                        daemon,
                        bin: bin.clone(),
                        config: config.clone(),
                        log: log.clone(),
                        s3_addr,
                        admin_addr,
                        rpc_addr,
                        node_id: String::new(),
                        key_id: String::new(),
                        secret: String::new(),
                        key_id_file: dir.path().join("s3-access-key-id"),
                        secret_file: dir.path().join("s3-secret-access-key"),
                        startup: Duration::ZERO,
                        dir,
                    };
                    garage.setup();
                    garage.startup = began.elapsed();
                    return garage;
                }
                Err(e)
                    if daemon
                        .logs()
                        .to_lowercase()
                        .contains("address already in use") =>
                {
                    failures.push(e);
                    daemon.kill();
                }
                Err(e) => panic!("garage did not start: {e}\n{}", daemon.log_tail(40)),
            }
        }
        panic!("garage could not bind free ports: {failures:?}");
    }

    /// Layout, bucket, key and permissions; then waits until the key can list the bucket.
    fn setup(&mut self) {
        let node = wait_for("garage node id", READY_TIMEOUT, || {
            match self.try_cli(&["node", "id", "-q"]) {
                // `<64 hex>@127.0.0.1:PORT`
                Ok(out) => match out.trim().split_once('@') {
                    Some((id, _)) if !id.is_empty() => Probe::Ready(id.to_owned()),
                    _ => Probe::Failed(format!("unexpected `garage node id -q` output: {out:?}")),
                },
                Err(e) => Probe::Pending(e),
            }
        })
        .unwrap_or_else(|e| self.fail(&e));
        self.node_id = node;
        let node = self.node_id.clone();
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        self.cli(&["layout", "apply", "--version", "1"]);
        self.wait_healthy();
        self.cli(&["bucket", "create", BUCKET]);
        let key = self.cli(&["key", "create", KEY_NAME]);
        self.key_id = field(&key, "Key ID:")
            .unwrap_or_else(|| self.fail(&format!("no `Key ID:` in `garage key create`:\n{key}")));
        self.secret = field(&key, "Secret key:").unwrap_or_else(|| {
            self.fail(&format!("no `Secret key:` in `garage key create`:\n{key}"))
        });
        std::fs::write(&self.key_id_file, format!("{}\n", self.key_id)).expect("write key id");
        std::fs::write(&self.secret_file, format!("{}\n", self.secret)).expect("write secret");
        self.cli(&[
            "bucket", "allow", "--read", "--write", BUCKET, "--key", KEY_NAME,
        ]);
        self.wait_s3_serves_key();
    }

    /// `http://127.0.0.1:PORT`, the S3 API (path-style: `http://127.0.0.1:PORT/berth/KEY`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.s3_addr)
    }

    /// The S3 API's address.
    pub fn s3_addr(&self) -> SocketAddr {
        self.s3_addr
    }

    /// The admin API's address (`GET /health`: 200 when fully operational).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// `berth`
    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// `garage` (Garage's `s3_region`; requests signed for another region are refused).
    pub fn region(&self) -> &str {
        REGION
    }

    /// The access key id (`GK` + 24 hex digits).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The secret access key (64 hex digits).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// A file holding [`Garage::key_id`] (and a newline), for `access_key_id_file`.
    pub fn key_id_file(&self) -> &Path {
        &self.key_id_file
    }

    /// A file holding [`Garage::secret`] (and a newline), for `secret_access_key_file`.
    pub fn secret_file(&self) -> &Path {
        &self.secret_file
    }

    /// The Garage node id (64 hex digits).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// How long the last [`Garage::start`] (setup included) or [`Garage::restart`] took.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// Takes the store down (`SIGKILL`, reaped): connections to the S3 port are refused.
    /// Data, bucket and key are kept for [`Garage::restart`].
    pub fn stop(&mut self) {
        self.daemon.kill();
    }

    /// Starts it again (after [`Garage::stop`]; kills it first if it still runs) on the same
    /// ports with the same data, and waits until the S3 API serves the key again.
    pub fn restart(&mut self) {
        let began = Instant::now();
        self.daemon.kill();
        self.daemon = spawn(&self.bin, &self.config, &self.log);
        self.wait_healthy();
        self.wait_s3_serves_key();
        self.startup = began.elapsed();
    }

    /// Suspends the process (`SIGSTOP`): connections are accepted by the kernel but never
    /// answered — a store that hangs. [`Garage::resume`] undoes it.
    pub fn freeze(&self) {
        self.daemon.signal(libc::SIGSTOP);
    }

    /// Resumes a [`Garage::freeze`]d store (`SIGCONT`).
    pub fn resume(&self) {
        self.daemon.signal(libc::SIGCONT);
    }

    /// Its log (one line per S3 request at `info`, after the startup lines).
    pub fn logs(&self) -> String {
        self.daemon.logs()
    }

    /// Runs `garage -c FILE ARGS` against this server; panics (with the log tail) on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| self.fail(&e))
    }

    /// Like [`Garage::cli`], `Err` with the command's output instead of panicking.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg(&self.config).args(args);
        clean_env(&mut cmd);
        run(&mut cmd, CLI_TIMEOUT)?.into_result()
    }

    /// An `object_store` client for the bucket with the fixture's key (few, quick retries).
    pub fn store(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_virtual_hosted_style_request(false)
            .with_region(REGION)
            .with_bucket_name(BUCKET)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_client_options(test_client_options())
            .with_retry(test_retry())
            .build()
            .expect("build an object_store client for garage")
    }

    /// Waits until `/health` on the admin API is 200 ("Garage is fully operational").
    fn wait_healthy(&mut self) {
        let (daemon, admin) = (&mut self.daemon, self.admin_addr);
        let healthy = wait_for("garage GET /health", READY_TIMEOUT, || {
            if let Err(e) = daemon.check_running() {
                return Probe::Failed(e);
            }
            match http_status(admin, "/health") {
                Ok(200) => Probe::Ready(()),
                Ok(code) => Probe::Pending(format!(
                    "status {code}: {}",
                    http_get_text(admin, "/health").unwrap_or_else(|e| e.to_string())
                )),
                Err(e) => Probe::Pending(e.to_string()),
            }
        });
        if let Err(e) = healthy {
            self.fail(&e);
        }
    }

    /// Waits until a signed ListObjectsV2 with the fixture's key succeeds.
    fn wait_s3_serves_key(&mut self) {
        let store = self.store();
        let daemon = &mut self.daemon;
        let served = wait_for("garage S3 ListObjectsV2", READY_TIMEOUT, || {
            if let Err(e) = daemon.check_running() {
                return Probe::Failed(e);
            }
            let listed = block_on(async {
                let mut stream = store.list(None);
                match stream.next().await {
                    Some(Err(e)) => Err(e),
                    _ => Ok(()),
                }
            });
            match listed {
                Ok(()) => Probe::Ready(()),
                Err(e) => Probe::Pending(e.to_string()),
            }
        });
        if let Err(e) = served {
            self.fail(&e);
        }
    }

    fn fail(&self, why: &str) -> ! {
        panic!("garage: {why}\n{}", self.daemon.log_tail(40))
    }
}

impl StoreServer for Garage {
    fn start() -> Garage {
        Garage::start()
    }

    fn name(&self) -> &'static str {
        "garage"
    }

    fn berth_keys(&self, prefix: &str) -> String {
        format!(
            "url = \"s3://{BUCKET}/{prefix}\"\nendpoint = \"{}\"\nregion = \"{REGION}\"\n\
             access_key_id_env = \"BERTH_S3_KEY_ID\"\nsecret_access_key_file = {:?}\n",
            self.endpoint(),
            self.secret_file.display().to_string(),
        )
    }

    fn berth_env(&self) -> Vec<(&'static str, String)> {
        vec![("BERTH_S3_KEY_ID", self.key_id.clone())]
    }

    fn client(&self) -> Arc<dyn ObjectStore> {
        Arc::new(self.store())
    }

    fn stop(&mut self) {
        Garage::stop(self)
    }

    fn restart(&mut self) {
        Garage::restart(self)
    }

    fn fail(&self, why: &str) -> ! {
        Garage::fail(self, why)
    }

    /// S3 API lines: `… generic_server: 127.0.0.1:PORT (key GK…) GET /berth/…` (an error answer
    /// gets a second line, `… generic_server: error 404 … in response to 127.0.0.1:…`).
    fn requests_served(&self) -> usize {
        self.logs()
            .lines()
            .filter_map(|l| l.split_once("generic_server: ").map(|(_, rest)| rest))
            .filter(|rest| rest.contains(" (key ") && !rest.starts_with("error "))
            .count()
    }
}

impl Drop for Garage {
    /// `SIGKILL`: a graceful `SIGTERM` shutdown takes Garage 1–3 s, and the data is thrown
    /// away anyway. (The daemon's own `Drop` then prints the log tail if the test panicked.)
    fn drop(&mut self) {
        self.daemon.kill();
    }
}

/// `${BERTH_TOOLS_DIR:-$HOME/.cache/berth-tools}`: where tests/setup.sh installs the programs
/// that are not Debian packages.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("BERTH_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/berth-tools"))
        })
        .unwrap_or_else(|| PathBuf::from("$HOME/.cache/berth-tools"))
}

/// `${BERTH_TOOLS_DIR:-$HOME/.cache/berth-tools}/bin/garage`, else `garage` on `$PATH`.
pub fn garage_program() -> PathBuf {
    let tools = tools_dir();
    let bin = tools.join("bin/garage");
    if bin.is_file() {
        return bin;
    }
    find_program("garage").unwrap_or_else(|| {
        panic!(
            "garage not found (looked in {}/bin and $PATH): run tests/setup.sh",
            tools.display()
        )
    })
}

fn spawn(bin: &Path, config: &Path, log: &Path) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(config).arg("server");
    clean_env(&mut cmd);
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    Daemon::spawn("garage", &mut cmd, log, log, Duration::from_secs(5))
}

/// `GARAGE_*` variables override the config file (e.g. `GARAGE_RPC_SECRET`).
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GARAGE_") {
            cmd.env_remove(key);
        }
    }
}

/// The value after `label` on its line, e.g. `Key ID:              GK…` → `GK…`.
fn field(text: &str, label: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.trim_start().strip_prefix(label))
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// `bytes` random bytes from `/dev/urandom`, hex-encoded.
fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    hex::encode(buf)
}
