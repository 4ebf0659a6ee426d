//! Connection figures for berth (issue 18): the memory each held keep-alive connection costs,
//! plain and TLS, and warm blob throughput over TLS (HTTP/1.1) with berth's CPU per GB.
//!
//! berth runs as a child process (the release binary cargo builds for this bench, or
//! `BERTH_BIN`), serving plain HTTP and, in a second process, TLS with a certificate made here;
//! the upstream is the benches' small in-process registry. Memory is berth's RSS growth while
//! the connections are held, each having made one request (a used keep-alive connection, as a
//! node's runtime holds it), divided by their number.
//!
//! `cargo bench --bench connections`. Settings (environment): BENCH_IDLE_CONNS (2000) held
//! connections per protocol (the bench raises nothing: keep `ulimit -n` above it),
//! BENCH_BLOB_MB (256) blob size, BENCH_BLOB_CLIENTS (8) and BENCH_BLOB_ROUNDS (3) for the warm
//! TLS run, BENCH_PHASES ("idle,tls_warm,seal"), BERTH_LOG (RUST_LOG for berth, default "info").
//!
//! The "seal" phase is the ceiling for the TLS figures: rustls (aws-lc-rs, the cipher suite
//! berth negotiates) encrypting 16 KiB records in memory on one thread, the number to set beside
//! `openssl speed -evp aes-256-gcm -bytes 16384` (what nginx's OpenSSL does per record).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("connections: FAILED: {e}");
        std::process::exit(1);
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it (PEM: CA, cert, key).
fn certificates() -> Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &ca)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

async fn wait_ready(b: &Berth) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok((200, _)) = get(b.admin, "/readyz").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err("berth not ready within 60 s".into())
}

/// One GET of `path` on an open connection; the body's length (read and dropped).
async fn get_on<S>(c: &mut Conn<S>, addr: SocketAddr, path: &str, scratch: &mut [u8]) -> Result<u64>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    c.send(&get_request(addr, path, "")).await?;
    let h = c.read_head().await?;
    if h.status != 200 {
        return Err(format!("GET {path}: status {}", h.status).into());
    }
    let len = h.content_length.ok_or("no content-length")?;
    c.read_body(len, scratch, |_| {}).await?;
    Ok(len)
}

/// Opens `n` connections with `open`, makes one request on each, holds them all and returns
/// berth's RSS growth per connection in KiB.
async fn held<S, F, Fut>(berth: &Berth, n: usize, open: F) -> Result<f64>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Conn<S>>>,
{
    let mut scratch = vec![0u8; 4096];
    // One connection first, so what every connection shares (buffers, the TLS session cache,
    // the runtime's first allocations) is in the baseline.
    let mut first = open().await?;
    get_on(&mut first, berth.addr, "/v2/", &mut scratch).await?;
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = berth.kib("VmRSS");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        if Instant::now() > deadline {
            return Err(format!("{} of {n} connections opened within 120 s", conns.len()).into());
        }
        let mut c = open().await?;
        get_on(&mut c, berth.addr, "/v2/", &mut scratch).await?;
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = berth.kib("VmRSS");
    // Every one is still open and answering.
    for c in conns.iter_mut().step_by((n / 16).max(1)) {
        get_on(c, berth.addr, "/v2/", &mut scratch).await?;
    }
    drop(conns);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// rustls alone: a handshake in memory, then 1 GiB of 16 KiB records sealed and discarded.
fn seal(ca: &str, cert: &std::path::Path, key: &std::path::Path) -> Result<()> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use std::io::Write as _;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<std::result::Result<Vec<_>, _>>()?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(key)?)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c?)?;
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let mut c = rustls::ClientConnection::new(std::sync::Arc::new(client), name)?;
    let mut s = rustls::ServerConnection::new(std::sync::Arc::new(server))?;
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire)?;
        }
        s.read_tls(&mut &wire[..])?;
        s.process_new_packets()?;
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire)?;
        }
        c.read_tls(&mut &wire[..])?;
        c.process_new_packets()?;
    }
    if s.is_handshaking() {
        return Err("the in-memory handshake did not finish".into());
    }
    let suite = s
        .negotiated_cipher_suite()
        .map(|cs| format!("{:?}", cs.suite()))
        .unwrap_or_default();
    let record = vec![7u8; 16 * 1024];
    let total = 1u64 << 30;
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        s.writer().write_all(&record)?;
        while s.wants_write() {
            s.write_tls(&mut std::io::sink())?;
        }
        sent += record.len() as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "seal: rustls {suite}, 16 KiB records, one thread: {:.2} GB/s ({:.3} s per GB)",
        total as f64 / 1e9 / secs,
        secs / (total as f64 / 1e9)
    );
    Ok(())
}

async fn run() -> Result<()> {
    let phases = env_or("BENCH_PHASES", "idle,tls_warm,seal".to_owned());
    let n: usize = env_or("BENCH_IDLE_CONNS", 2000);
    let blob_mb: usize = env_or("BENCH_BLOB_MB", 256);
    let clients: usize = env_or("BENCH_BLOB_CLIENTS", 8);
    let rounds: usize = env_or("BENCH_BLOB_ROUNDS", 3);
    println!(
        "connections: {} | load {}",
        berth_bin().display(),
        loadavg()
    );

    let up = Upstream::start();
    let len = blob_mb * 1024 * 1024;
    let blob = up.add_blob(BlobSrc::Gen { seed: 18, len }, None);
    up.add_image("library/big", "v1", std::slice::from_ref(&blob));

    let dir = tempfile::tempdir()?;
    let (ca, cert, key) = certificates()?;
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert)?;
    std::fs::write(&key_path, key)?;
    let config = |cache: &str, tls: bool| {
        let mut c = config_toml(&dir.path().join(cache), "4GiB", &up.url()).replace(
            "admin_listen = \"127.0.0.1:0\"\n",
            "admin_listen = \"127.0.0.1:0\"\nmax_connections_per_client = 0\n",
        );
        if tls {
            c = c.replace(
                "[cache]\n",
                &format!(
                    "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[cache]\n",
                    cert_path.display(),
                    key_path.display()
                ),
            );
        }
        c
    };
    let connector = tls_connector(&ca)?;
    if phases.contains("seal") {
        seal(&ca, &cert_path, &key_path)?;
    }

    if phases.contains("idle") {
        let plain = Berth::spawn(&config("plain", false), &dir.path().join("plain.toml"))?;
        wait_ready(&plain).await?;
        let addr = plain.addr;
        let kib = held(&plain, n, || Conn::connect(addr)).await?;
        println!("idle_conns plain: {n} held, {kib:.2} KiB of berth RSS per connection");
        plain.stop();
    }

    let tls = Berth::spawn(&config("tls", true), &dir.path().join("tls.toml"))?;
    // /readyz is on the plain admin listener.
    wait_ready(&tls).await?;
    let addr = tls.addr;
    if phases.contains("idle") {
        let kib = held(&tls, n, || Conn::connect_tls(addr, &connector)).await?;
        println!("idle_conns tls: {n} held, {kib:.2} KiB of berth RSS per connection");
    }

    if phases.contains("tls_warm") {
        let path = format!("/v2/library/big/blobs/{blob}");
        let mut scratch = vec![0u8; 256 * 1024];
        // Cold once: berth fills its cache from upstream and checks the digest.
        let mut c = Conn::connect_tls(addr, &connector).await?;
        let got = get_on(&mut c, addr, &path, &mut scratch).await?;
        if got != len as u64 {
            return Err(format!("cold GET: {got} of {len} bytes").into());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while tls.fill_secs(&blob).is_none() {
            if Instant::now() > deadline {
                return Err("the fill was not logged within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let upstream_gets = up.count(&format!("GET {blob}"));
        let cpu0 = tls.cpu_secs();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let connector = connector.clone();
            let path = path.clone();
            tasks.push(tokio::spawn(async move {
                let mut scratch = vec![0u8; 256 * 1024];
                let mut c = Conn::connect_tls(addr, &connector).await?;
                let mut bytes = 0u64;
                for _ in 0..rounds {
                    bytes += tokio::time::timeout(
                        Duration::from_secs(120),
                        get_on(&mut c, addr, &path, &mut scratch),
                    )
                    .await
                    .map_err(|_| "a warm GET took over 120 s")??;
                }
                Ok::<u64, Error>(bytes)
            }));
        }
        let mut bytes = 0u64;
        for t in tasks {
            bytes += t.await??;
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = tls.cpu_secs() - cpu0;
        let want = (clients * rounds * len) as u64;
        if bytes != want {
            return Err(format!("warm GETs: {bytes} of {want} bytes").into());
        }
        if up.count(&format!("GET {blob}")) != upstream_gets {
            return Err("a warm GET went upstream".into());
        }
        let gb = bytes as f64 / 1e9;
        println!(
            "tls_warm: {clients} clients x {rounds} GETs of {blob_mb} MiB over HTTP/1.1: {:.3} GB/s, berth CPU {:.3} s per GB",
            gb / wall,
            cpu / gb
        );
    }
    let log = tls.stop();
    if log.problem_count > 0 {
        return Err(format!("berth logged warnings or errors: {:?}", log.problems).into());
    }
    Ok(())
}
