//! Azurite (`azurite-blob`), Microsoft's Azure Blob Storage emulator, as berth's shared tier.
//!
//! Installed by `tests/setup.sh` (npm package `azurite`, run with Debian's Node.js) into
//! `${BERTH_TOOLS_DIR:-$HOME/.cache/berth-tools}/azurite`; `azurite-blob` on `$PATH` is used
//! after that. It serves one storage account of its own (not the well-known
//! `devstoreaccount1`), with a random shared key, path style:
//! `http://127.0.0.1:PORT/<account>/<container>/<blob>`. The container is created through the
//! Blob REST API, signed with that key.
//!
//! [`Azurite::start_oauth`] serves HTTPS instead (a certificate for `127.0.0.1` from a CA of
//! the test's own, [`Azurite::ca_file`]) with `--oauth basic`: it then also takes bearer
//! tokens, checking that they are JWTs with an Entra ID issuer, a storage audience and a
//! current lifetime (not their signature) — what managed and workload identity send.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use object_store::ObjectStore;
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use tempfile::TempDir;

use super::process::{Daemon, find_program, free_addr, short_tempdir};
use super::store::{StoreServer, test_client_options, test_retry};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const ACCOUNT: &str = "berthtest";
const CONTAINER: &str = "berth";

/// Azurite's HTTPS: its certificate and key, and the CA that issued them.
#[derive(Debug)]
struct Tls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    ca_pem: String,
}

impl Tls {
    /// A CA and a certificate for `127.0.0.1` it signed, written to `dir`.
    fn write(dir: &Path) -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
            .expect("azurite test CA");
        let key_pair = KeyPair::generate().expect("key");
        let cert_pem = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .signed_by(&key_pair, &ca)
            .expect("azurite certificate")
            .pem();
        let tls = Tls {
            cert: dir.join("azurite.crt"),
            key: dir.join("azurite.key"),
            ca: dir.join("ca.pem"),
            ca_pem: ca.pem(),
        };
        for (path, pem) in [
            (&tls.cert, cert_pem),
            (&tls.key, key_pair.serialize_pem()),
            (&tls.ca, tls.ca_pem.clone()),
        ] {
            std::fs::write(path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        tls
    }
}

/// A running Azurite blob service on a free `127.0.0.1` port, storing in a temp dir.
#[derive(Debug)]
pub struct Azurite {
    daemon: Daemon,
    program: Vec<PathBuf>,
    addr: SocketAddr,
    key: String,
    key_file: PathBuf,
    log: PathBuf,
    data: PathBuf,
    /// HTTPS and `--oauth basic` ([`Azurite::start_oauth`]).
    tls: Option<Tls>,
    /// How long the last start or restart took.
    startup: Duration,
    // Last: removed after the daemon is stopped.
    dir: TempDir,
}

impl Azurite {
    /// `http://127.0.0.1:PORT/berthtest` (`https://` with [`Azurite::start_oauth`]): the
    /// account's URL, berth's `endpoint`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}/{ACCOUNT}", self.addr)
    }

    /// The CA (PEM) that issued the HTTPS certificate of [`Azurite::start_oauth`].
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn account(&self) -> &str {
        ACCOUNT
    }

    pub fn container(&self) -> &str {
        CONTAINER
    }

    /// A file holding the account's shared key, for `access_key_file`.
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    pub fn logs(&self) -> String {
        self.daemon.logs()
    }

    fn spawn(&self) -> Daemon {
        spawn(
            &self.program,
            self.addr,
            &self.data,
            &self.key,
            &self.log,
            self.tls.as_ref(),
        )
    }

    /// A reqwest client that trusts this Azurite's certificate, if it has one.
    fn http_client(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder().no_proxy();
        if let Some(tls) = &self.tls {
            let ca = reqwest::Certificate::from_pem(tls.ca_pem.as_bytes()).expect("CA PEM");
            builder = builder.tls_certs_merge([ca]);
        }
        builder.build().expect("reqwest client")
    }

    /// Creates the container (201, or 409 when it is there already).
    fn create_container(&self) {
        // object_store has no "create container": a Blob REST call, signed with the key.
        let url = format!("{}/{CONTAINER}?restype=container", self.endpoint());
        let status = super::seed::block_on(async {
            let date = httpdate_now();
            let resource = format!("/{ACCOUNT}/{ACCOUNT}/{CONTAINER}\nrestype:container");
            // VERB, then 11 standard headers (all empty), then the x-ms- headers.
            let string_to_sign = format!(
                "PUT\n{}x-ms-date:{date}\nx-ms-version:2021-08-06\n{resource}",
                "\n".repeat(11)
            );
            let signature = sign(&self.key, &string_to_sign);
            self.http_client()
                .put(&url)
                .header("x-ms-date", &date)
                .header("x-ms-version", "2021-08-06")
                .header("content-length", "0")
                .header("authorization", format!("SharedKey {ACCOUNT}:{signature}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
        match status {
            Ok(201 | 409) => {}
            other => self.fail(&format!("create container {CONTAINER}: {other:?}")),
        }
    }

    fn wait_serving(&mut self) {
        let store = self.client();
        let served = self
            .daemon
            .wait_ready("azurite blob list", READY_TIMEOUT, || {
                super::store::list_keys(&*store, "").map(|_| ())
            });
        if let Err(e) = served {
            self.fail(&e);
        }
    }
}

impl StoreServer for Azurite {
    /// Starts Azurite's blob service with account `berthtest` (a random key), creates container
    /// `berth`, and waits until a signed list of it succeeds.
    fn start() -> Azurite {
        Azurite::start_with(false)
    }

    fn name(&self) -> &'static str {
        "azurite"
    }

    fn berth_keys(&self, prefix: &str) -> String {
        format!(
            "url = \"az://{CONTAINER}/{prefix}\"\nendpoint = \"{}\"\naccount = \"{ACCOUNT}\"\n\
             access_key_file = {:?}\n",
            self.endpoint(),
            self.key_file.display().to_string(),
        )
    }

    fn client(&self) -> Arc<dyn ObjectStore> {
        Arc::new(self.store())
    }

    /// `SIGTERM` (then `SIGKILL` after 5 s): Azurite keeps its metadata in memory and saves it
    /// as it shuts down, so a `SIGKILL` would lose the container. Its port refuses connections
    /// after.
    fn stop(&mut self) {
        self.daemon.stop();
    }

    fn restart(&mut self) {
        let began = Instant::now();
        self.daemon.stop();
        self.daemon = self.spawn();
        self.wait_port();
        self.wait_serving();
        self.startup = began.elapsed();
    }

    fn fail(&self, why: &str) -> ! {
        panic!("azurite: {why}\n{}", self.daemon.log_tail(40))
    }

    /// Access log lines: `127.0.0.1 - - [date] "GET /berthtest/berth/… HTTP/1.1" 200 -`.
    fn requests_served(&self) -> usize {
        let container = format!(" /{ACCOUNT}/{CONTAINER}");
        self.logs()
            .lines()
            .filter(|l| l.contains(" HTTP/1.1\" ") && l.contains(&container))
            .count()
    }
}

impl Azurite {
    /// Like [`StoreServer::start`], over HTTPS and with `--oauth basic` (see the module docs).
    pub fn start_oauth() -> Azurite {
        Azurite::start_with(true)
    }

    fn start_with(oauth: bool) -> Azurite {
        let began = Instant::now();
        let program = azurite_program();
        let dir = short_tempdir("azurite-");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir azurite data");
        let mut raw = [0u8; 64];
        random_bytes(&mut raw);
        let key = base64::engine::general_purpose::STANDARD.encode(raw);
        let key_file = dir.path().join("account-key");
        std::fs::write(&key_file, format!("{key}\n")).expect("write account key");
        let log = dir.path().join("azurite.log");
        let addr = free_addr();
        let tls = oauth.then(|| Tls::write(dir.path()));
        let daemon = spawn(&program, addr, &data, &key, &log, tls.as_ref());
        let mut azurite = Azurite {
            daemon,
            program,
            addr,
            key,
            key_file,
            log,
            data,
            tls,
            startup: Duration::ZERO,
            dir,
        };
        azurite.wait_port();
        azurite.create_container();
        azurite.wait_serving();
        azurite.startup = began.elapsed();
        azurite
    }

    /// An `object_store` client for the container with the account key.
    pub fn store(&self) -> MicrosoftAzure {
        let mut options = test_client_options();
        if let Some(tls) = &self.tls {
            let ca = object_store::Certificate::from_pem(tls.ca_pem.as_bytes()).expect("CA PEM");
            options = options.with_root_certificate(ca);
        }
        MicrosoftAzureBuilder::new()
            .with_endpoint(self.endpoint())
            .with_account(ACCOUNT)
            .with_access_key(&self.key)
            .with_container_name(CONTAINER)
            .with_allow_http(true)
            .with_client_options(options)
            .with_retry(test_retry())
            .build()
            .expect("build an object_store client for azurite")
    }

    fn wait_port(&mut self) {
        let addr = self.addr;
        let up = self
            .daemon
            .wait_ready("azurite blob port", READY_TIMEOUT, || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = up {
            self.fail(&e);
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.daemon.kill();
    }
}

fn spawn(
    program: &[PathBuf],
    addr: SocketAddr,
    data: &Path,
    key: &str,
    log: &Path,
    tls: Option<&Tls>,
) -> Daemon {
    let mut cmd = Command::new(&program[0]);
    cmd.args(&program[1..]);
    if let Some(tls) = tls {
        cmd.arg("--cert")
            .arg(&tls.cert)
            .arg("--key")
            .arg(&tls.key)
            .arg("--oauth")
            .arg("basic");
    }
    cmd.arg("--blobHost")
        .arg(addr.ip().to_string())
        .arg("--blobPort")
        .arg(addr.port().to_string())
        .arg("--location")
        .arg(data)
        .arg("--skipApiVersionCheck")
        .arg("--disableProductStyleUrl")
        .env("AZURITE_ACCOUNTS", format!("{ACCOUNT}:{key}"));
    Daemon::spawn("azurite", &mut cmd, log, log, Duration::from_secs(5))
}

/// `node <tools>/azurite/node_modules/azurite/dist/src/blob/main.js`, else `azurite-blob` on
/// `$PATH`.
pub fn azurite_program() -> Vec<PathBuf> {
    let tools = super::garage::tools_dir();
    let main = tools.join("azurite/node_modules/azurite/dist/src/blob/main.js");
    if main.is_file() {
        let node = find_program("node").unwrap_or_else(|| {
            panic!("node not found on $PATH (Azurite needs it): run tests/setup.sh")
        });
        return vec![node, main];
    }
    match find_program("azurite-blob") {
        Some(bin) => vec![bin],
        None => panic!(
            "azurite not found (looked for {} and azurite-blob on $PATH): run tests/setup.sh",
            main.display()
        ),
    }
}

/// Base64 of HMAC-SHA256(`key` decoded from base64, `text`) (RFC 2104).
fn sign(key: &str, text: &str) -> String {
    use sha2::{Digest, Sha256};
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .expect("base64 key");
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(&key));
    } else {
        block[..key.len()].copy_from_slice(&key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(text.as_bytes())
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    base64::engine::general_purpose::STANDARD.encode(outer)
}

/// The current time as an HTTP date (`Tue, 01 Dec 2026 10:00:00 GMT`).
fn httpdate_now() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

fn random_bytes(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}
