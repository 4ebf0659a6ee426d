//! Scale figures for berth's cache index (issue #6): the start-up scan of a large cache
//! directory (time to /readyz, memory per index entry, stray temp files removed), then eviction
//! throughput with a small `max_size` and many distinct blobs.
//!
//! berth runs as a child process (the release binary cargo builds for this bench, or
//! `BERTH_BIN`); the upstream is a small in-process registry on a thread of its own.
//!
//! `cargo bench --bench scale`. Settings (environment):
//! BENCH_SCALE_BLOBS (100000) blob files in the synthetic cache, BENCH_EVICT_N (2000) distinct
//! blobs pulled through berth, BENCH_EVICT_KIB (1024) their size, BENCH_EVICT_MAX ("64MiB") the
//! max_size for that run, BENCH_DROP_CACHES (0; 1 drops the kernel's page/dentry/inode caches
//! before the scan, which affects every process on the machine), BERTH_LOG.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("scale: FAILED: {e}");
        std::process::exit(1);
    }
}

/// Polls /readyz until 200; the time since berth was spawned.
async fn wait_ready(b: &Berth) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok((200, _)) = get(b.admin, "/readyz").await {
            return Ok(b.started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err("berth not ready within 300 s".into())
}

fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.trim().parse().expect("size number");
    let mult = match unit {
        "" | "B" => 1u64,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => panic!("unknown size unit {u}"),
    };
    (n * mult as f64) as u64
}

/// Bytes and files directly in `dir`.
fn dir_usage(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(m) = f.metadata() {
            bytes += m.len();
            files += 1;
        }
    }
    (bytes, files)
}

/// Bytes and files under `<cache>/blobs`.
fn disk_usage(blobs: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    let Ok(algs) = std::fs::read_dir(blobs) else {
        return (0, 0);
    };
    for alg in algs.flatten() {
        for prefix in std::fs::read_dir(alg.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(prefix.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(m) = f.metadata() {
                    bytes += m.len();
                    files += 1;
                }
            }
        }
    }
    (bytes, files)
}

/// Writes `n` blob files of 1–4 KiB with valid sha256 names, and a few stray temp files.
/// Returns the total blob bytes and the stray file names.
fn generate(cache: &Path, n: usize) -> Result<(u64, Vec<String>)> {
    let root = cache.join("blobs").join("sha256");
    for p in 0..256 {
        std::fs::create_dir_all(root.join(format!("{p:02x}")))?;
    }
    let content = random_bytes(7, 4096);
    let threads = 2;
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (root, content) = (&root, &content);
                s.spawn(move || -> std::io::Result<u64> {
                    let mut total = 0u64;
                    for i in (t..n).step_by(threads) {
                        let hex = sha256_hex(&(i as u64).to_le_bytes());
                        let size = 1024 + (i.wrapping_mul(2_654_435_761) % 3073);
                        std::fs::write(root.join(&hex[..2]).join(&hex), &content[..size])?;
                        total += size as u64;
                    }
                    Ok(total)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("generator thread"))
            .sum::<std::io::Result<u64>>()
    })?;
    let tmp = cache.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let mut stray = Vec::new();
    for i in 0..5 {
        let name = format!(
            "{}-{:016x}",
            sha256_hex(&[i as u8, 0xee]),
            0xdead_0000u64 + i
        );
        std::fs::write(tmp.join(&name), vec![0u8; 1000 * (i as usize + 1)])?;
        stray.push(name);
    }
    Ok((total, stray))
}

async fn run() -> Result<()> {
    let n_scale: usize = env_or("BENCH_SCALE_BLOBS", 100_000);
    let n_evict: usize = env_or("BENCH_EVICT_N", 2000);
    let evict_kib: usize = env_or("BENCH_EVICT_KIB", 1024);
    let evict_max: String = env_or("BENCH_EVICT_MAX", "64MiB".to_string());
    let drop_caches: u8 = env_or("BENCH_DROP_CACHES", 0);
    let load_start = loadavg();
    println!("berth binary: {}", berth_bin().display());
    println!("load average at start (1/5/15 min): {load_start}");

    let up = Upstream::start();
    let tmp = tempfile::Builder::new().prefix("berth-scale-").tempdir()?;

    // ------------------------------------------------------------ baseline: empty cache
    let empty = tmp.path().join("empty");
    let b = Berth::spawn(
        &config_toml(&empty, "8GiB", &up.url()),
        &tmp.path().join("empty.toml"),
    )?;
    let ready_empty = wait_ready(&b).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_empty = b.kib("VmRSS");
    let hwm_empty = b.kib("VmHWM");
    b.stop();
    println!(
        "empty cache: ready after {:.1} ms, VmRSS {:.1} MiB (VmHWM {:.1} MiB)",
        ms(ready_empty),
        rss_empty as f64 / 1024.0,
        hwm_empty as f64 / 1024.0
    );

    // ------------------------------------------------------------ start-up scan
    let big = tmp.path().join("big");
    let t = Instant::now();
    let (total_bytes, stray) = generate(&big, n_scale)?;
    let gen_secs = t.elapsed().as_secs_f64();
    println!(
        "generated {n_scale} blob files ({:.1} MB) and {} stray temp files in {gen_secs:.1} s",
        total_bytes as f64 / 1e6,
        stray.len()
    );
    if drop_caches == 1 {
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        std::fs::write("/proc/sys/vm/drop_caches", "3")?;
        println!("dropped the kernel's caches before the scan (cold scan)");
    }
    let b = Berth::spawn(
        &config_toml(&big, "8GiB", &up.url()),
        &tmp.path().join("big.toml"),
    )?;
    let ready_big = wait_ready(&b).await?;
    let cpu_scan = b.cpu_secs();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_big = b.kib("VmRSS");
    let hwm_big = b.kib("VmHWM");
    let m = metrics(b.admin).await?;
    let left: Vec<String> = std::fs::read_dir(big.join("tmp"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let stray_left = stray.iter().filter(|s| left.contains(s)).count();
    let log = b.stop();
    let indexed = metric_sum(&m, "berth_cache_blobs");
    let size = metric_sum(&m, "berth_cache_size_bytes");
    let scan_logged = log
        .index_loaded
        .as_ref()
        .and_then(|v| v["seconds"].as_f64())
        .unwrap_or(f64::NAN);
    let per_entry = (rss_big as f64 - rss_empty as f64) * 1024.0 / n_scale as f64;
    let per_entry_hwm = (hwm_big as f64 - hwm_empty as f64) * 1024.0 / n_scale as f64;
    println!(
        "start-up scan of {n_scale} blobs: /readyz 200 after {:.1} ms (empty cache: {:.1} ms); berth logged the scan as {:.1} ms; berth CPU until ready {cpu_scan:.2} s",
        ms(ready_big),
        ms(ready_empty),
        scan_logged * 1e3
    );
    println!(
        "index memory: VmRSS {:.1} MiB vs {:.1} MiB empty = {per_entry:.0} bytes per entry (VmHWM {:.1} MiB: {per_entry_hwm:.0} bytes per entry)",
        rss_big as f64 / 1024.0,
        rss_empty as f64 / 1024.0,
        hwm_big as f64 / 1024.0
    );
    println!(
        "index contents: berth_cache_blobs {indexed}, berth_cache_size_bytes {size} (on disk {total_bytes}); stray temp files left: {stray_left}/{}",
        stray.len()
    );
    let scan_ok = check(&[
        (stray_left == 0, "every stray temp file was removed"),
        (
            indexed as usize == n_scale,
            "berth_cache_blobs counts every blob file",
        ),
        (
            size as u64 == total_bytes,
            "berth_cache_size_bytes equals the bytes on disk",
        ),
    ]);
    if log.problem_count > 0 {
        println!(
            "berth log: {} warnings/errors during the scan run",
            log.problem_count
        );
        for p in &log.problems {
            println!("  berth log: {p}");
        }
    }
    drop(std::fs::remove_dir_all(&big));

    // ------------------------------------------------------------ eviction throughput
    let max = parse_size(&evict_max);
    let blen = evict_kib * 1024;
    let t = Instant::now();
    let digests: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|k| {
                s.spawn(move || {
                    (k..n_evict)
                        .step_by(2)
                        .map(|i| (i, sha256_hex(&random_bytes(1000 + i as u64, blen))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, String)> = hs
            .into_iter()
            .flat_map(|h| h.join().expect("hash thread"))
            .collect();
        all.sort();
        all.into_iter().map(|(_, h)| h).collect()
    });
    let cfg = up.add_blob(
        BlobSrc::Mem(bytes::Bytes::from_static(br#"{"os":"linux"}"#)),
        None,
    );
    let mut image = vec![cfg];
    for (i, hex) in digests.iter().enumerate() {
        image.push(up.add_blob(
            BlobSrc::Gen {
                seed: 1000 + i as u64,
                len: blen,
            },
            Some(hex.clone()),
        ));
    }
    let (_, manifest) = up.add_image("bench/many", "latest", &image);
    println!(
        "upstream: {n_evict} blobs of {evict_kib} KiB in one image (manifest {} KB), prepared in {:.1} s",
        manifest.len() / 1000,
        t.elapsed().as_secs_f64()
    );
    let ev = tmp.path().join("evict");
    let b = Berth::spawn(
        &config_toml(&ev, &evict_max, &up.url()),
        &tmp.path().join("evict.toml"),
    )?;
    wait_ready(&b).await?;
    let addr = b.addr;
    let mut c = Conn::connect(addr).await?;
    c.send(&get_request(
        addr,
        "/v2/bench/many/manifests/latest",
        "Accept: application/vnd.oci.image.manifest.v1+json\r\n",
    ))
    .await?;
    let h = c.read_head().await?;
    let body = c
        .read_small_body(h.content_length.unwrap_or(0) as usize)
        .await?;
    if h.status != 200 || body != manifest {
        return Err(format!("manifest GET: status {}", h.status).into());
    }
    let m0 = metrics(b.admin).await?;
    let up0 = up.count("GET blob");
    let heads0 = up.count("HEAD blob");
    let blobs_dir = ev.join("blobs");
    let mut scratch = vec![0u8; 1024 * 1024];
    let (mut max_disk, mut max_files, mut max_metric) = (0u64, 0u64, 0f64);
    let (mut scrapes, mut shrank_on_rescrape) = (0u32, 0u32);
    let (mut max_tmp, mut max_tmp_files) = (0u64, 0u64);
    let mut sampling = Duration::ZERO;
    let mut lat: Vec<u32> = Vec::with_capacity(n_evict);
    let cpu0 = b.cpu_secs();
    let t0 = Instant::now();
    for (i, d) in image[1..].iter().enumerate() {
        let t = Instant::now();
        c.send(&get_request(addr, &format!("/v2/bench/many/blobs/{d}"), ""))
            .await?;
        let h = c.read_head().await?;
        if h.status != 200 || h.content_length != Some(blen as u64) {
            return Err(format!(
                "blob {i}: status {} length {:?}",
                h.status, h.content_length
            )
            .into());
        }
        let mut n = 0u64;
        c.read_body(blen as u64, &mut scratch, |b| n += b.len() as u64)
            .await?;
        if n != blen as u64 {
            return Err(format!("blob {i}: {n} bytes").into());
        }
        lat.push(t.elapsed().as_micros() as u32);
        if i % 10 == 9 {
            let s = Instant::now();
            let (bytes, files) = disk_usage(&blobs_dir);
            max_disk = max_disk.max(bytes);
            max_files = max_files.max(files);
            let (tbytes, tfiles) = dir_usage(&ev.join("tmp"));
            max_tmp = max_tmp.max(tbytes);
            max_tmp_files = max_tmp_files.max(tfiles);
            if i % 250 == 249 {
                // A scrape applies pending evictions first, so this is the best case. A second
                // scrape right after shows whether the first left evictions undone.
                let first = metric_sum(&metrics(b.admin).await?, "berth_cache_size_bytes");
                let second = metric_sum(&metrics(b.admin).await?, "berth_cache_size_bytes");
                max_metric = max_metric.max(first);
                scrapes += 1;
                if second < first {
                    shrank_on_rescrape += 1;
                }
            }
            sampling += s.elapsed();
        }
    }
    let elapsed = (t0.elapsed() - sampling).as_secs_f64();
    let ecpu = b.cpu_secs() - cpu0;
    // What is on disk before any scrape applies pending work.
    let (disk_end, files_end) = disk_usage(&blobs_dir);
    let m1 = metrics(b.admin).await?;
    let (disk_after, files_after) = disk_usage(&blobs_dir);
    let up_gets = up.count("GET blob") - up0;
    let up_heads = up.count("HEAD blob") - heads0;
    let hwm = b.kib("VmHWM");
    let log = b.stop();
    let delta = |k: &str| metric_sum(&m1, k) - metric_sum(&m0, k);
    let evictions = delta("berth_cache_evictions_total");
    let evicted_bytes = delta("berth_cache_evicted_bytes_total");
    let size_end = metric_sum(&m1, "berth_cache_size_bytes");
    let blobs_end = metric_sum(&m1, "berth_cache_blobs");
    let fill_fail = delta("berth_fill_failures_total");
    lat.sort_unstable();
    let rate = n_evict as f64 / elapsed;
    let limit = max + blen as u64;
    println!(
        "eviction run: {n_evict} distinct {evict_kib} KiB blobs GET sequentially through berth (max_size {evict_max}): {rate:.0} blobs/s, {:.1} MB/s; per blob p50 {:.2} ms, p99 {:.2} ms; berth CPU {ecpu:.2} s",
        rate * blen as f64 / 1e6,
        pct(&lat, 0.5) as f64 / 1e3,
        pct(&lat, 0.99) as f64 / 1e3
    );
    println!(
        "evictions: berth_cache_evictions_total +{evictions} (+{:.1} MB); upstream blob GETs {up_gets}, HEADs {up_heads}; fill failures {fill_fail}",
        evicted_bytes / 1e6
    );
    println!(
        "cache size: berth_cache_size_bytes {size_end} at the end (max at scrapes {max_metric}; {shrank_on_rescrape} of {scrapes} scrapes were followed by a lower value at an immediate re-scrape), berth_cache_blobs {blobs_end}; limit max_size + one blob = {limit}"
    );
    println!(
        "on disk (sampled every 10 blobs, no scrape): max {max_disk} bytes / {max_files} files in blobs/, max {max_tmp} bytes / {max_tmp_files} files in tmp/; at the end {disk_end} bytes / {files_end} files before a scrape, {disk_after} / {files_after} after"
    );
    if log.problem_count > 0 {
        println!(
            "berth log: {} warnings/errors during the eviction run",
            log.problem_count
        );
        for p in &log.problems {
            println!("  berth log: {p}");
        }
    }
    let hwm_mib = hwm as f64 / 1024.0;
    println!("berth VmHWM in the eviction run: {hwm_mib:.1} MiB");
    let load_end = loadavg();
    println!("load average at end (1/5/15 min): {load_end}");
    let evict_ok = check(&[
        (evictions > 0.0, "berth_cache_evictions_total grew"),
        (
            size_end <= limit as f64,
            "berth_cache_size_bytes <= max_size + one blob at the end",
        ),
        (
            max_metric <= limit as f64,
            "berth_cache_size_bytes <= max_size + one blob at every scrape",
        ),
        (up_gets as usize == n_evict, "one upstream GET per blob"),
    ]);
    let json = serde_json::json!({
        "bench": "scale",
        "ok": scan_ok && evict_ok,
        "load_start": load_start, "load_end": load_end,
        "scan": {"blobs": n_scale, "bytes": total_bytes, "ready_ms": round(ms(ready_big)),
            "ready_empty_ms": round(ms(ready_empty)), "logged_scan_ms": round(scan_logged * 1e3),
            "cpu_s": round(cpu_scan), "rss_kib": rss_big, "rss_empty_kib": rss_empty,
            "hwm_kib": hwm_big, "bytes_per_entry": per_entry.round(), "bytes_per_entry_hwm": per_entry_hwm.round(),
            "indexed": indexed, "stray_left": stray_left, "dropped_caches": drop_caches == 1, "ok": scan_ok},
        "eviction": {"n": n_evict, "kib": evict_kib, "max_size": max, "blobs_per_s": round(rate),
            "p50_ms": pct(&lat, 0.5) as f64 / 1e3, "p99_ms": pct(&lat, 0.99) as f64 / 1e3,
            "cpu_s": round(ecpu), "evictions": evictions, "evicted_bytes": evicted_bytes,
            "size_end": size_end, "size_max_scraped": max_metric, "scrapes": scrapes, "shrank_on_rescrape": shrank_on_rescrape, "disk_max_sampled": max_disk, "tmp_max_sampled": max_tmp,
            "disk_end": disk_end, "files_end": files_end, "upstream_gets": up_gets, "upstream_heads": up_heads,
            "vm_hwm_kib": hwm, "ok": evict_ok},
    });
    println!("{json}");
    if !(scan_ok && evict_ok) {
        return Err("a check failed (see above)".into());
    }
    Ok(())
}

/// Prints each check; true when all pass.
fn check(checks: &[(bool, &str)]) -> bool {
    for (ok, what) in checks {
        println!("check {}: {what}", if *ok { "ok" } else { "FAILED" });
    }
    checks.iter().all(|(ok, _)| *ok)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
