//! Hot-path figures for berth (issue #6): warm manifests by tag, warm blob throughput, a cold
//! fan-out of one blob to many clients, and berth's peak memory and CPU over the run.
//!
//! berth runs as a child process (the release binary cargo builds for this bench, or
//! `BERTH_BIN`), so the load generator and the server do not share a runtime and berth's RSS and
//! CPU can be read from /proc. The upstream is a small in-process registry on a thread of its own.
//!
//! `cargo bench --bench hot_paths`. Settings (environment):
//! BENCH_SECS (5) duration of the manifest run, BENCH_CONNS (64) its connections,
//! BENCH_BLOB_MB (256) blob size, BENCH_BLOB_CLIENTS (8) and BENCH_BLOB_ROUNDS (3) for the warm
//! blob run, BENCH_FANOUT (16) clients of the cold blob, BENCH_THROTTLE_MBPS (400) upstream rate
//! for it (MB/s, 10^6), BENCH_FANOUT_HASH ("after": bodies kept in memory and hashed once the
//! clock stopped, so client hashing does not compete with berth for CPU; "stream": hashed while
//! received), BENCH_PHASES ("manifest,warm,cold": which phases run, in order; e.g. one phase at
//! a time under `perf record`), BERTH_LOG (RUST_LOG for berth, default "info").

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest as _, Sha256};

const DOCKER_ACCEPT: &str = "Accept: application/vnd.docker.distribution.manifest.v2+json\r\n\
Accept: application/vnd.docker.distribution.manifest.list.v2+json\r\n\
Accept: application/vnd.oci.image.index.v1+json\r\n\
Accept: application/vnd.oci.image.manifest.v1+json\r\n\
Accept: application/vnd.docker.distribution.manifest.v1+prettyjws\r\n";

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("hot_paths: FAILED: {e}");
        std::process::exit(1);
    }
}

async fn wait_ready(b: &Berth) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok((200, _)) = get(b.admin, "/readyz").await {
            return Ok(b.started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err("berth not ready within 60 s".into())
}

/// What every phase needs.
struct Ctx {
    berth: Berth,
    up: Upstream,
    addr: std::net::SocketAddr,
    manifest: bytes::Bytes,
    warm: String,
    cold: String,
    cold_hex: String,
    blob_len: usize,
    blob_mb: usize,
}

async fn run() -> Result<()> {
    let blob_mb: usize = env_or("BENCH_BLOB_MB", 256);
    let phases: String = env_or("BENCH_PHASES", "manifest,warm,cold".to_string());
    let blob_len = blob_mb * 1024 * 1024;
    let load_start = loadavg();
    println!("berth binary: {}", berth_bin().display());
    println!("load average at start (1/5/15 min): {load_start}");

    // The upstream: one image whose layers are the warm blob and the cold blob.
    let up = Upstream::start();
    let config_blob = bytes::Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let cfg = up.add_blob(BlobSrc::Mem(config_blob), None);
    let warm_bytes = random_bytes(1, blob_len);
    let warm = up.add_blob(BlobSrc::Mem(warm_bytes), None);
    let cold_bytes = random_bytes(2, blob_len);
    let cold_hex = sha256_hex(&cold_bytes);
    let cold = up.add_blob(BlobSrc::Mem(cold_bytes), Some(cold_hex.clone()));
    let (_mdigest, manifest) =
        up.add_image("bench/app", "latest", &[cfg, warm.clone(), cold.clone()]);

    let tmp = tempfile::Builder::new().prefix("berth-bench-").tempdir()?;
    let cache = tmp.path().join("cache");
    let berth = Berth::spawn(
        &config_toml(&cache, "8GiB", &up.url()),
        &tmp.path().join("berth.toml"),
    )?;
    let ready = wait_ready(&berth).await?;
    println!(
        "berth pid {} ready after {:.1} ms (empty cache)",
        berth.pid,
        ms(ready)
    );
    let self_cpu0 = cpu_secs(self_pid());
    let ctx = Ctx {
        addr: berth.addr,
        berth,
        up,
        manifest,
        warm,
        cold,
        cold_hex,
        blob_len,
        blob_mb,
    };
    let mut ok = true;
    let mut json = serde_json::json!({"bench": "hot_paths", "load_start": load_start});
    for phase in phases.split(',') {
        let (name, v, good) = match phase.trim() {
            "manifest" => ("manifest", manifest_phase(&ctx).await?, None),
            "warm" => ("warm_blob", warm_phase(&ctx).await?, None),
            "cold" => {
                let (v, good) = cold_phase(&ctx).await?;
                ("cold_fanout", v, Some(good))
            }
            "" => continue,
            p => return Err(format!("unknown phase {p:?} in BENCH_PHASES").into()),
        };
        ok &= good.unwrap_or(true) && v["ok"].as_bool().unwrap_or(true);
        json[name] = v;
    }
    let Ctx { berth, .. } = ctx;
    let hwm = berth.kib("VmHWM");
    let rss = berth.kib("VmRSS");
    let cpu_total = berth.cpu_secs();
    let self_cpu = cpu_secs(self_pid()) - self_cpu0;
    let self_hwm = status_kib(self_pid(), "VmHWM");
    let load_end = loadavg();
    let log = berth.stop();
    println!(
        "berth peak RSS (VmHWM): {:.1} MiB; RSS at the end {:.1} MiB; CPU over the run {cpu_total:.2} s (load generator {self_cpu:.2} s, its VmHWM {:.0} MiB)",
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0,
        self_hwm as f64 / 1024.0
    );
    println!(
        "berth log: {} lines, {} warnings/errors, fills {:?}",
        log.lines, log.problem_count, log.fills
    );
    for p in &log.problems {
        println!("  berth log: {p}");
    }
    println!("load average at end (1/5/15 min): {load_end}");

    json["ok"] = ok.into();
    json["load_end"] = load_end.clone().into();
    json["berth"] = serde_json::json!({"vm_hwm_kib": hwm, "vm_rss_end_kib": rss, "cpu_s": round(cpu_total),
            "log_warnings": log.problem_count, "log_lines": log.lines});
    println!("{json}");
    drop(tmp);
    if !ok {
        return Err("a correctness check failed (see above)".into());
    }
    Ok(())
}

/// GETs the image manifest by tag, docker-style, and checks it (the first time, berth fetches
/// it and learns which blobs the repository holds).
async fn pull_manifest(ctx: &Ctx) -> Result<()> {
    let mut c = Conn::connect(ctx.addr).await?;
    c.send(&get_request(
        ctx.addr,
        "/v2/bench/app/manifests/latest",
        DOCKER_ACCEPT,
    ))
    .await?;
    let h = c.read_head().await?;
    let body = c
        .read_small_body(h.content_length.unwrap_or(0) as usize)
        .await?;
    if h.status != 200 || body != ctx.manifest {
        return Err(format!("manifest GET: status {}", h.status).into());
    }
    Ok(())
}

async fn manifest_phase(ctx: &Ctx) -> Result<serde_json::Value> {
    let secs: f64 = env_or("BENCH_SECS", 5.0);
    let conns: usize = env_or("BENCH_CONNS", 64);
    let (berth, up, addr, manifest) = (&ctx.berth, &ctx.up, ctx.addr, &ctx.manifest);
    let mreq = Arc::new(get_request(
        addr,
        "/v2/bench/app/manifests/latest",
        DOCKER_ACCEPT,
    ));
    pull_manifest(ctx).await?;
    let up_manifest0 = up.count("GET manifest") + up.count("HEAD manifest");
    let (cpu0, scpu0) = (berth.cpu_secs(), cpu_secs(self_pid()));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let mlen = manifest.len();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mreq = mreq.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(64 * 1024);
            let mut c = Conn::connect(addr).await?;
            while Instant::now() < deadline {
                let t = Instant::now();
                c.send(&mreq).await?;
                let h = c.read_head().await?;
                let n = h.content_length.unwrap_or(0) as usize;
                c.read_small_body(n).await?;
                if h.status != 200 || n != mlen {
                    return Err::<Vec<u32>, Error>(
                        format!("manifest GET: status {}, {n} bytes", h.status).into(),
                    );
                }
                lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let melapsed = t0.elapsed().as_secs_f64();
    let (mcpu, mscpu) = (berth.cpu_secs() - cpu0, cpu_secs(self_pid()) - scpu0);
    lat.sort_unstable();
    let mrps = lat.len() as f64 / melapsed;
    let (p50, p99, p999, pmax) = (
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        *lat.last().unwrap_or(&0),
    );
    let up_manifest = up.count("GET manifest") + up.count("HEAD manifest") - up_manifest0;
    println!(
        "warm manifest by tag: {:.0} req/s ({} requests, {conns} keep-alive connections, {melapsed:.2} s)",
        mrps,
        lat.len()
    );
    println!(
        "warm manifest latency: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        p50 as f64 / 1e3,
        p99 as f64 / 1e3,
        p999 as f64 / 1e3,
        pmax as f64 / 1e3
    );
    println!(
        "warm manifest CPU: berth {mcpu:.2} s ({:.1} us/request), load generator {mscpu:.2} s; upstream manifest requests during the run: {up_manifest}",
        mcpu * 1e6 / lat.len().max(1) as f64
    );

    Ok(
        serde_json::json!({"rps": round(mrps), "requests": lat.len(), "conns": conns, "secs": round(melapsed),
        "p50_ms": p50 as f64 / 1e3, "p99_ms": p99 as f64 / 1e3, "p999_ms": p999 as f64 / 1e3, "max_ms": pmax as f64 / 1e3,
        "berth_cpu_s": round(mcpu), "loadgen_cpu_s": round(mscpu), "upstream_requests": up_manifest,
        "ok": check(up_manifest == 0, "no upstream manifest request while the tag is fresh")}),
    )
}

async fn warm_phase(ctx: &Ctx) -> Result<serde_json::Value> {
    let blob_clients: usize = env_or("BENCH_BLOB_CLIENTS", 8);
    let blob_rounds: usize = env_or("BENCH_BLOB_ROUNDS", 3);
    let (berth, addr, warm) = (&ctx.berth, ctx.addr, &ctx.warm);
    let (blob_len, blob_mb) = (ctx.blob_len, ctx.blob_mb);
    pull_manifest(ctx).await?;
    let wpath = format!("/v2/bench/app/blobs/{warm}");
    let mut scratch = vec![0u8; 4 * 1024 * 1024];
    let fcpu0 = berth.cpu_secs();
    let t = Instant::now();
    let fill_ok = {
        let mut c = Conn::connect(addr).await?;
        c.send(&get_request(addr, &wpath, "")).await?;
        let h = c.read_head().await?;
        if h.status != 200 || h.content_length != Some(blob_len as u64) {
            return Err(format!("first blob GET: status {}", h.status).into());
        }
        let mut hasher = Sha256::new();
        let times = c
            .read_body(blob_len as u64, &mut scratch, |b| hasher.update(b))
            .await?;
        (
            format!("sha256:{}", hex::encode(hasher.finalize())) == *warm,
            times,
        )
    };
    let first_fill = t.elapsed().as_secs_f64();
    let fcpu = berth.cpu_secs() - fcpu0;
    let (fill_ok, fill_times) = fill_ok;
    if !fill_ok {
        return Err("first (filling) GET of the warm blob: wrong sha256".into());
    }
    let fill_hold = hold(&fill_times);
    println!(
        "first fill of the {blob_mb} MiB blob (1 client, unthrottled upstream, hashed by the client): {first_fill:.3} s, {:.2} GB/s; all but the last byte after {:.3} s, last byte held {:.1} ms; berth CPU {fcpu:.2} s",
        blob_len as f64 / first_fill / 1e9,
        first_fill - fill_hold / 1e3,
        fill_hold
    );
    let m0 = metrics(berth.admin).await?;
    let (cpu0, scpu0) = (berth.cpu_secs(), cpu_secs(self_pid()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..blob_clients {
        let req = get_request(addr, &wpath, "");
        tasks.push(tokio::spawn(async move {
            let mut scratch = vec![0u8; 4 * 1024 * 1024];
            let mut c = Conn::connect(addr).await?;
            let mut total = 0u64;
            for _ in 0..blob_rounds {
                c.send(&req).await?;
                let h = c.read_head().await?;
                if h.status != 200 || h.content_length != Some(blob_len as u64) {
                    return Err::<u64, Error>(format!("warm blob GET: status {}", h.status).into());
                }
                let mut n = 0u64;
                c.read_body(blob_len as u64, &mut scratch, |b| n += b.len() as u64)
                    .await?;
                if n != blob_len as u64 {
                    return Err(format!("warm blob GET: {n} bytes").into());
                }
                total += n;
            }
            Ok(total)
        }));
    }
    let mut wbytes = 0u64;
    for t in tasks {
        wbytes += t.await??;
    }
    let welapsed = t0.elapsed().as_secs_f64();
    let (wcpu, wscpu) = (berth.cpu_secs() - cpu0, cpu_secs(self_pid()) - scpu0);
    let m1 = metrics(berth.admin).await?;
    let hits = m1
        .get(r#"berth_cache_requests_total{kind="blob",result="hit"}"#)
        .unwrap_or(&0.0)
        - m0.get(r#"berth_cache_requests_total{kind="blob",result="hit"}"#)
            .unwrap_or(&0.0);
    let expected = (blob_clients * blob_rounds) as u64 * blob_len as u64;
    if wbytes != expected {
        return Err(format!("warm blob: {wbytes} bytes, expected {expected}").into());
    }
    let wgbs = wbytes as f64 / welapsed / 1e9;
    println!(
        "warm blob GET: {wgbs:.2} GB/s ({blob_clients} clients x {blob_rounds} x {blob_mb} MiB = {:.2} GB in {welapsed:.2} s, {hits} cache hits)",
        wbytes as f64 / 1e9
    );
    println!(
        "warm blob CPU: berth {wcpu:.2} s ({:.3} s/GB), load generator {wscpu:.2} s",
        wcpu / (wbytes as f64 / 1e9)
    );

    Ok(serde_json::json!({
        "first_fill": {"mib": blob_mb, "secs": round(first_fill), "berth_cpu_s": round(fcpu), "last_byte_hold_ms": round(fill_hold)},
        "gb_per_s": round(wgbs), "clients": blob_clients, "rounds": blob_rounds, "mib": blob_mb,
        "bytes": wbytes, "secs": round(welapsed), "berth_cpu_s": round(wcpu), "loadgen_cpu_s": round(wscpu)}))
}

async fn cold_phase(ctx: &Ctx) -> Result<(serde_json::Value, bool)> {
    let fanout: usize = env_or("BENCH_FANOUT", 16);
    let throttle_mbps: f64 = env_or("BENCH_THROTTLE_MBPS", 400.0);
    let hash_after = env_or("BENCH_FANOUT_HASH", "after".to_string()) != "stream";
    let (berth, up, addr, cold, cold_hex) =
        (&ctx.berth, &ctx.up, ctx.addr, &ctx.cold, &ctx.cold_hex);
    let (blob_len, blob_mb) = (ctx.blob_len, ctx.blob_mb);
    pull_manifest(ctx).await?;
    up.set_throttle((throttle_mbps * 1e6) as u64);
    let cpath = format!("/v2/bench/app/blobs/{cold}");
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    if hash_after {
        for _ in 0..fanout {
            let mut v = vec![0u8; blob_len];
            // Touch every page now so the clock does not include page faults.
            for i in (0..blob_len).step_by(4096) {
                v[i] = 1;
            }
            bufs.push(v);
        }
    }
    let mut clients = Vec::new();
    for _ in 0..fanout {
        clients.push(Conn::connect(addr).await?);
    }
    let m0 = metrics(berth.admin).await?;
    let (cpu0, scpu0) = (berth.cpu_secs(), cpu_secs(self_pid()));
    let barrier = Arc::new(tokio::sync::Barrier::new(fanout));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let (req, barrier) = (get_request(addr, &cpath, ""), barrier.clone());
        let mut buf = if hash_after {
            std::mem::take(&mut bufs[i])
        } else {
            Vec::new()
        };
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let sent = Instant::now();
            c.send(&req).await?;
            let h = c.read_head().await?;
            if h.status != 200 || h.content_length != Some(blob_len as u64) {
                return Err::<_, Error>(
                    format!(
                        "cold blob GET: status {} length {:?}",
                        h.status, h.content_length
                    )
                    .into(),
                );
            }
            let (times, digest) = if buf.is_empty() {
                let mut scratch = vec![0u8; 1024 * 1024];
                let mut hasher = Sha256::new();
                let times = c
                    .read_body(blob_len as u64, &mut scratch, |b| hasher.update(b))
                    .await?;
                (times, Some(hex::encode(hasher.finalize())))
            } else {
                (c.read_body_into(&mut buf).await?, None)
            };
            Ok(FanoutResult {
                sent,
                times,
                digest,
                body: buf,
            })
        }));
    }
    let mut results: Vec<FanoutResult> = Vec::new();
    for t in tasks {
        results.push(t.await??);
    }
    let last = |r: &FanoutResult| r.times.last.unwrap_or(r.sent);
    let cwall = results
        .iter()
        .map(|r| last(r) - t0)
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    let (ccpu, cscpu) = (berth.cpu_secs() - cpu0, cpu_secs(self_pid()) - scpu0);
    let ttfb = |r: &FanoutResult| r.times.first.unwrap_or(r.sent) - r.sent;
    let ttfb_max = results.iter().map(ttfb).max().unwrap_or_default();
    let ttfb_min = results.iter().map(ttfb).min().unwrap_or_default();
    let slowest = results
        .iter()
        .map(|r| last(r) - r.sent)
        .max()
        .unwrap_or_default();
    let but_last = results
        .iter()
        .map(|r| r.times.all_but_last.unwrap_or(r.sent) - t0)
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    let hold_max = results.iter().map(|r| hold(&r.times)).fold(0.0, f64::max);
    // Check every body.
    let digests: Vec<String> = if hash_after {
        let bodies: Vec<Vec<u8>> = results
            .iter_mut()
            .map(|r| std::mem::take(&mut r.body))
            .collect();
        std::thread::scope(|s| {
            let chunks: Vec<_> = bodies
                .chunks(bodies.len().div_ceil(2).max(1))
                .map(|part| s.spawn(move || part.iter().map(|b| sha256_hex(b)).collect::<Vec<_>>()))
                .collect();
            chunks
                .into_iter()
                .flat_map(|h| h.join().expect("hash thread"))
                .collect()
        })
    } else {
        results.iter().filter_map(|r| r.digest.clone()).collect()
    };
    let good = digests.iter().filter(|d| *d == cold_hex).count();
    let up_done = up
        .last_throttled_done()
        .map_or(f64::NAN, |t| t.saturating_duration_since(t0).as_secs_f64());
    // berth logs the fill when it ends (after the clients got their last byte): wait a little.
    let mut fill_logged = f64::NAN;
    for _ in 0..100 {
        if let Some(s) = berth.fill_secs(cold) {
            fill_logged = s;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let up_gets = up.count(&format!("GET {cold}"));
    let m1 = metrics(berth.admin).await?;
    let delta = |k: &str| m1.get(k).unwrap_or(&0.0) - m0.get(k).unwrap_or(&0.0);
    let coalesced = delta(r#"berth_cache_requests_total{kind="blob",result="coalesced"}"#);
    let misses = delta(r#"berth_cache_requests_total{kind="blob",result="miss"}"#);
    let ideal = blob_len as f64 / (throttle_mbps * 1e6);
    println!(
        "cold fan-out: {fanout} clients, {blob_mb} MiB blob, upstream throttled to {throttle_mbps} MB/s (alone: {ideal:.3} s): wall {cwall:.3} s, slowest client {:.3} s",
        slowest.as_secs_f64()
    );
    println!(
        "cold fan-out time to first body byte: slowest {:.1} ms, fastest {:.1} ms; all clients had all but the last byte after {but_last:.3} s, last byte held back up to {hold_max:.1} ms (verify + store)",
        ms(ttfb_max),
        ms(ttfb_min)
    );
    println!(
        "cold fan-out upstream GETs: {up_gets} (must be 1); sha256 good: {good}/{fanout} (hashed {}); berth: {misses} miss + {coalesced} coalesced",
        if hash_after {
            "after the clock stopped"
        } else {
            "while streaming"
        }
    );
    println!(
        "cold fan-out: upstream finished sending after {up_done:.3} s; berth logged the fill as {fill_logged:.3} s"
    );
    let delivered = (fanout * blob_len) as f64 / 1e9;
    println!(
        "cold fan-out delivered {delivered:.2} GB in {cwall:.3} s = {:.2} GB/s to clients; CPU: berth {ccpu:.2} s ({:.3} s/GB), load generator {cscpu:.2} s",
        delivered / cwall,
        ccpu / delivered
    );

    let ok = up_gets == 1 && good == fanout;
    println!(
        "check {}: one upstream GET for {fanout} concurrent clients",
        if up_gets == 1 { "ok" } else { "FAILED" }
    );
    println!(
        "check {}: every client's body has the blob's sha256",
        if good == fanout { "ok" } else { "FAILED" }
    );
    Ok((
        serde_json::json!({"clients": fanout, "mib": blob_mb, "throttle_mb_per_s": throttle_mbps,
        "wall_s": round(cwall), "upstream_done_s": round(up_done), "fill_logged_s": round(fill_logged), "delivered_gb_per_s": round(delivered / cwall), "all_but_last_s": round(but_last),
        "last_byte_hold_max_ms": round(hold_max), "ttfb_max_ms": round(ms(ttfb_max)), "ttfb_min_ms": round(ms(ttfb_min)),
        "upstream_gets": up_gets, "sha256_ok": good, "coalesced": coalesced, "miss": misses,
        "hash": if hash_after { "after" } else { "stream" },
        "berth_cpu_s": round(ccpu), "loadgen_cpu_s": round(cscpu)}),
        ok,
    ))
}

struct FanoutResult {
    sent: Instant,
    times: BodyTimes,
    digest: Option<String>,
    body: Vec<u8>,
}

/// How long the last body byte came after all the others, in ms.
fn hold(t: &BodyTimes) -> f64 {
    match (t.all_but_last, t.last) {
        (Some(a), Some(b)) => ms(b - a),
        _ => f64::NAN,
    }
}

fn check(ok: bool, what: &str) -> bool {
    println!("check {}: {what}", if ok { "ok" } else { "FAILED" });
    ok
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
