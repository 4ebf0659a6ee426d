//! What a cluster costs a cold pull: three berth replicas (the release binary) on loopback in
//! front of a throttled upstream, each cold blob requested once through its owner or once
//! through a non-owner (which asks the owner). Prints the median time to first byte and to the
//! whole blob for: upstream directly, the owner, a non-owner.
//!
//! `cargo bench --bench cluster` (BLOBS=24 BLOB_MIB=4 THROTTLE_MBPS=200).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::{Berth, BlobSrc, Conn, Result, Upstream, config_toml, env_or, loadavg};
use sha2::{Digest as _, Sha256};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("cluster: FAILED: {e}");
        std::process::exit(1);
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Replica indexes in owner order for `digest` (rendezvous hashing on the peer URL).
fn owner_order(addrs: &[SocketAddr], digest: &str) -> Vec<usize> {
    let mut scored: Vec<(Vec<u8>, usize)> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let h = Sha256::digest(format!("http://{a}\n{digest}").as_bytes());
            (h.to_vec(), i)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// GETs a blob; returns (time to first body byte, time to the whole body).
async fn fetch(addr: SocketAddr, path: &str) -> Result<(f64, f64)> {
    let started = Instant::now();
    let mut c = Conn::connect(addr).await?;
    c.send(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let head = c.read_head().await?;
    if head.status != 200 {
        return Err(format!("{path}: status {}", head.status).into());
    }
    let len = head.content_length.ok_or("no content-length")?;
    let mut scratch = vec![0u8; 256 * 1024];
    let t = c.read_body(len, &mut scratch, |_| {}).await?;
    let first = t.first.ok_or("empty body")?;
    let last = t.last.ok_or("short body")?;
    Ok((
        (first - started).as_secs_f64() * 1000.0,
        (last - started).as_secs_f64() * 1000.0,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn run() -> Result<()> {
    let blobs: usize = env_or("BLOBS", 24);
    let mib: usize = env_or("BLOB_MIB", 4);
    let mbps: u64 = env_or("THROTTLE_MBPS", 200);
    let up = Upstream::start();
    up.set_throttle(mbps * 1_000_000);
    let digests: Vec<String> = (0..blobs * 3)
        .map(|i| {
            up.add_blob(
                BlobSrc::Gen {
                    seed: 7000 + i as u64,
                    len: mib * 1024 * 1024,
                },
                None,
            )
        })
        .collect();

    let dir = tempfile::tempdir()?;
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect::<Result<_>>()?;
    let peers: Vec<String> = addrs.iter().map(|a| format!("\"http://{a}\"")).collect();
    let mut replicas = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let cache = dir.path().join(format!("r{i}"));
        let config = config_toml(&cache, "4GiB", &up.url()).replace(
            "listen = \"127.0.0.1:0\"\nadmin",
            &format!("listen = \"{addr}\"\nadmin"),
        ) + &format!(
            "[cluster]\npeers = [{}]\nprobe_interval = \"200ms\"\n",
            peers.join(", ")
        );
        replicas.push(Berth::spawn(
            &config,
            &dir.path().join(format!("r{i}.toml")),
        )?);
    }
    // Let every replica find the others.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (mut direct, mut owner, mut other) = (Vec::new(), Vec::new(), Vec::new());
    for (i, d) in digests.iter().enumerate() {
        let path = format!("/v2/library/bench/blobs/{d}");
        let order = owner_order(&addrs, d);
        match i % 3 {
            0 => direct.push(fetch(up.addr, &path).await?),
            1 => owner.push(fetch(addrs[order[0]], &path).await?),
            _ => other.push(fetch(addrs[order[1 + i % 2]], &path).await?),
        }
    }
    let row = |name: &str, v: &[(f64, f64)]| {
        println!(
            "{name:<34} {:>10.2} {:>12.1}",
            median(v.iter().map(|x| x.0).collect()),
            median(v.iter().map(|x| x.1).collect())
        );
    };
    println!(
        "cluster bench: {blobs} cold blobs of {mib} MiB per row, upstream throttled to {mbps} MB/s, load {}",
        loadavg()
    );
    println!(
        "{:<34} {:>10} {:>12}",
        "cold blob GET (median)", "1st byte ms", "whole ms"
    );
    row("upstream directly", &direct);
    row("berth: the blob's owner", &owner);
    row("berth: a non-owner (asks the owner)", &other);
    let added =
        median(other.iter().map(|x| x.0).collect()) - median(owner.iter().map(|x| x.0).collect());
    println!("added first-byte latency through a non-owner: {added:.2} ms");
    let fetched = up.count("GET blob");
    println!("upstream blob GETs: {fetched} for {} blobs", digests.len());
    if fetched != digests.len() as u64 {
        return Err("a blob was fetched upstream more than once".into());
    }
    for r in replicas {
        r.stop();
    }
    Ok(())
}
