//! Fault drill: a soak of 200 concurrent clients pulling 40 blobs (85 MiB, more than
//! `max_size`) through berth (the binary) from a flaky upstream that cuts or refuses every
//! 7th blob GET. No corrupt body, cached tags always served, bounded memory, no descriptor or
//! temp-file leak, and every blob served once the upstream heals. `SOAK_SECS` (default 20, at
//! most 300) sets the length. See `tests/drill/mod.rs` for how drills run and report.

mod drill;
mod fake_upstream;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drill::{
    Findings, Got, KIB, MIB, Tally, fetch, fetch_blob, metric_lines, random_bytes, run_drill,
    temp_files,
};
use fake_upstream::{Behaviour, FakeUpstream};
use support::{Berth, http_get_text, http_status, sample};

const CLIENTS: usize = 200;
const BLOBS: usize = 40;
const FAIL_EVERY: usize = 7;
/// Generous: berth keeps up to 4 MiB of recent chunks per fill in flight.
const RSS_LIMIT_MIB: u64 = 256;
const REPOS: [&str; 4] = ["library/alpha", "library/beta", "team/gamma", "team/delta"];

/// (repository, digest, size) of every blob.
type Blobs = Arc<Vec<(&'static str, String, u64)>>;

#[test]
fn soak_flaky_upstream() {
    run_drill(async {
        let mut s = Soak::start().await;
        let memory = MemorySampler::start(s.pid);
        let clients = run_clients(&s.c, &s.berth.url(), &s.blobs, s.soak).await;
        let soaked = s.started.elapsed();
        let (peak_rss, hwm, rss_end) = memory.stop().await;
        let fills_gets = s.up.state.blob_gets.load(Ordering::Relaxed);
        let after = s.every_blob_after_the_storm().await;
        // The clients go away: berth closes their connections (no descriptor leaks).
        let fds_after = s.fds_after_the_clients_left();
        let health = http_status(s.berth.admin_addr(), "/healthz").ok();
        let m = http_get_text(s.berth.admin_addr(), "/metrics").unwrap_or_default();
        let logs = s.berth.logs();
        let temp_left = temp_files(&s.cache);
        let temp_bytes: u64 = temp_left.iter().map(|(_, n)| n).sum();
        clients.print(&after, s.soak, fills_gets);
        println!(
            "[soak] berth pid {}: peak VmRSS={:.1} MiB, VmHWM={:.1} MiB, VmRSS at end={:.1} MiB; open fds before={} after the clients left={} {fds_after:?}; /healthz={health:?}; panics in log={}; temp files left={} ({temp_bytes} bytes); elapsed={soaked:?}",
            s.pid,
            peak_rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            rss_end as f64 / 1024.0,
            s.fds_before,
            fds_after.values().sum::<usize>(),
            logs.matches("panicked").count(),
            temp_left.len(),
        );
        println!(
            "{}",
            metric_lines(
                &m,
                &[
                    "berth_fill_failures_total",
                    "berth_cache_requests_total{kind=\"blob\"",
                    "berth_cache_evictions_total",
                    "berth_fills_in_flight",
                    "berth_cache_blobs ",
                    "berth_cache_size_bytes ",
                ]
            )
        );
        clients.assert_invariants();
        assert_eq!(health, Some(200), "/healthz after the soak");
        assert!(!logs.contains("panicked"), "berth panicked during the soak");
        assert!(
            hwm.max(peak_rss) < RSS_LIMIT_MIB * 1024,
            "berth's peak RSS {} KiB is over {RSS_LIMIT_MIB} MiB",
            hwm.max(peak_rss)
        );
        s.f.check(
            sample(&m, "berth_fills_in_flight") == 0.0,
            "fills still in flight after the soak",
        );
        s.f.check(
            temp_left.is_empty(),
            format!(
                "{} temp files ({temp_bytes} bytes) left in <cache>/tmp after the soak",
                temp_left.len()
            ),
        );
        drop(s.berth);
        s.f.assert_none("soak");
    });
}

/// The drill's upstream, berth and findings.
struct Soak {
    started: Instant,
    soak: Duration,
    f: Findings,
    up: FakeUpstream,
    blobs: Blobs,
    berth: Berth,
    pid: u32,
    fds_before: usize,
    cache: PathBuf,
    c: reqwest::Client,
    _work: tempfile::TempDir,
}

impl Soak {
    /// 40 blobs from 256 KiB to 4 MiB, 10 per repository, behind a flaky upstream; berth
    /// with a max_size below the 85 MiB of blobs: evictions keep some blobs uncached
    /// throughout.
    async fn start() -> Soak {
        let started = Instant::now();
        let soak = Duration::from_secs(
            std::env::var("SOAK_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(20u64)
                .clamp(1, 300),
        );
        let up = FakeUpstream::start().await;
        let blobs = seed_blobs(&up);
        let total: u64 = blobs.iter().map(|b| b.2).sum();
        up.set(Behaviour::Flaky {
            fail_every: FAIL_EVERY,
        });
        let work = tempfile::Builder::new()
            .prefix("drill-soak-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let cache = work.path().join("cache");
        let toml =
            support::berth_config_with(&up.url(), &cache, "64MiB", r#"read_timeout = "10s""#);
        let berth = Berth::start(&toml);
        let pid = berth.pid().expect("berth pid");
        println!(
            "[soak] {CLIENTS} clients for {soak:?}; {BLOBS} blobs ({:.1} MiB) in {} repositories; max_size 64 MiB; every {FAIL_EVERY}th upstream blob GET cut or 503",
            total as f64 / MIB as f64,
            REPOS.len()
        );
        Soak {
            started,
            soak,
            f: Findings::default(),
            up,
            blobs: Arc::new(blobs),
            berth,
            pid,
            fds_before: open_fds(pid),
            cache,
            c: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(CLIENTS)
                .no_proxy()
                .build()
                .expect("client"),
            _work: work,
        }
    }

    /// After the storm: the upstream heals and every blob is served, verified.
    async fn every_blob_after_the_storm(&mut self) -> Tally {
        self.up.set(Behaviour::Normal);
        let base = self.berth.url();
        let mut after = Tally::default();
        for (repo, digest, _) in self.blobs.iter() {
            let got =
                fetch_blob(&self.c, &format!("{base}/v2/{repo}/blobs/{digest}"), digest).await;
            after.record(&got);
            self.f.check(
                got.is_verified(),
                format!("after the soak, {repo} blob: {}", got.short()),
            );
        }
        after
    }

    /// Drops the clients and waits (5 s) until berth holds no client connection; returns
    /// berth's descriptors by kind.
    fn fds_after_the_clients_left(&mut self) -> BTreeMap<String, usize> {
        self.c = support::client();
        let (pid, cache) = (self.pid, self.cache.clone());
        let (listen, up_port) = (self.berth.addr().port(), self.up.addr.port());
        let closed = support::wait_for(
            "berth closes client connections",
            Duration::from_secs(5),
            || {
                let kinds = fds_by_kind(pid, &cache, listen, up_port);
                if client_fds(&kinds) == 0 {
                    support::Probe::Ready(kinds)
                } else {
                    support::Probe::Pending(format!("{kinds:?}"))
                }
            },
        );
        closed.unwrap_or_else(|e| {
            self.f.check(
                false,
                format!("berth's descriptors after the clients left: {e}"),
            );
            fds_by_kind(pid, &cache, listen, up_port)
        })
    }
}

fn seed_blobs(up: &FakeUpstream) -> Vec<(&'static str, String, u64)> {
    let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
    let blobs: Vec<(&str, String, u64)> = (0..BLOBS)
        .map(|i| {
            let size = 256 * KIB + i * (4 * MIB - 256 * KIB) / (BLOBS - 1);
            let digest = up.add_blob(random_bytes(size));
            (REPOS[i % REPOS.len()], digest, size as u64)
        })
        .collect();
    for repo in REPOS {
        let layers: Vec<String> = blobs
            .iter()
            .filter(|b| b.0 == repo)
            .map(|b| b.1.clone())
            .collect();
        up.add_image(repo, "v1", &config, &layers);
    }
    blobs
}

/// What the clients saw, together.
#[derive(Default)]
struct Clients {
    blobs: Tally,
    manifests: Tally,
    corrupt: Vec<String>,
    /// Requests still running at the hard stop, dropped by the drill.
    unfinished: usize,
}

impl Clients {
    fn merge(&mut self, other: Clients) {
        self.blobs.merge(&other.blobs);
        self.manifests.merge(&other.manifests);
        self.corrupt.extend(other.corrupt);
        self.unfinished += other.unfinished;
    }

    fn print(&self, after: &Tally, soak: Duration, fills_gets: usize) {
        self.blobs.print("soak blobs");
        self.blobs.print_samples("soak blobs");
        self.manifests.print("soak manifests");
        self.manifests.print_samples("soak manifests");
        after.print("soak after (upstream normal)");
        let n = |k: &str| self.blobs.count(k);
        println!(
            "[soak] client-visible errors: aborted body={} 5xx={} other={} (429={}, other status={}, no answer={}); corrupt bodies={}; requests dropped by the drill at its end={}",
            n("aborted body"),
            n("5xx"),
            n("429") + n("other status") + n("no answer"),
            n("429"),
            n("other status"),
            n("no answer"),
            self.blobs.corrupt,
            self.unfinished
        );
        let secs = soak.as_secs_f64();
        println!(
            "[soak] throughput (debug builds, shared CPU): {:.0} blob requests/s, {:.1} MiB/s to clients; upstream blob GETs={fills_gets} (~{} failed on purpose)",
            self.blobs.requests as f64 / secs,
            self.blobs.bytes as f64 / MIB as f64 / secs,
            fills_gets / FAIL_EVERY
        );
    }

    fn assert_invariants(&self) {
        assert!(
            self.corrupt.is_empty(),
            "corrupt bodies: {:#?}",
            self.corrupt
        );
        assert_eq!(self.blobs.corrupt, 0);
        assert!(
            self.blobs.count("verified") > 0,
            "no blob request succeeded during the soak"
        );
        assert_eq!(
            self.manifests.count("verified"),
            CLIENTS * REPOS.len(),
            "manifest GETs (cached tags) must all succeed: {:?}",
            self.manifests.kinds
        );
    }
}

/// Runs the clients for `soak` and waits for them (at most the soak + 30 s).
async fn run_clients(c: &reqwest::Client, base: &str, blobs: &Blobs, soak: Duration) -> Clients {
    let deadline = Instant::now() + soak;
    let hard_stop = tokio::time::Instant::from_std(deadline + Duration::from_secs(5));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let (c, base, blobs) = (c.clone(), base.to_owned(), blobs.clone());
            tokio::spawn(one_client(t, c, base, blobs, deadline, hard_stop))
        })
        .collect();
    let mut all = Clients::default();
    let joined = tokio::time::timeout(soak + Duration::from_secs(30), async {
        for t in tasks {
            all.merge(t.await.expect("client task"));
        }
    })
    .await;
    assert!(
        joined.is_ok(),
        "clients did not finish within the soak + 30 s"
    );
    all
}

/// One client: the manifests first, as a pulling client would (the repositories then know
/// their blobs), then random blobs until the deadline.
async fn one_client(
    t: usize,
    c: reqwest::Client,
    base: String,
    blobs: Blobs,
    deadline: Instant,
    hard_stop: tokio::time::Instant,
) -> Clients {
    let mut out = Clients::default();
    for repo in REPOS {
        let (got, _) = fetch(&c, &format!("{base}/v2/{repo}/manifests/v1")).await;
        out.manifests.record(&got);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1).wrapping_mul(0x1000_0001));
    while Instant::now() < deadline {
        let (repo, digest, _) = &blobs[(rng.next() % blobs.len() as u64) as usize];
        let url = format!("{base}/v2/{repo}/blobs/{digest}");
        // Requests still running shortly after the deadline are dropped (the client goes
        // away mid-body, which berth must also take in its stride).
        let Ok(got) = tokio::time::timeout_at(hard_stop, fetch_blob(&c, &url, digest)).await else {
            out.unfinished += 1;
            break;
        };
        if matches!(got, Got::Corrupt { .. }) {
            out.corrupt.push(format!("{repo} {digest}: {got:?}"));
        }
        out.blobs.record(&got);
        if !got.is_verified() {
            // A real client backs off a little before retrying.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    out
}

/// Samples a process's `VmRSS` every 100 ms, keeping the peak.
struct MemorySampler {
    pid: u32,
    sampling: Arc<AtomicBool>,
    peak_rss: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl MemorySampler {
    fn start(pid: u32) -> MemorySampler {
        let sampling = Arc::new(AtomicBool::new(true));
        let peak_rss = Arc::new(AtomicU64::new(0));
        let (s, peak) = (sampling.clone(), peak_rss.clone());
        let task = tokio::spawn(async move {
            while s.load(Ordering::Relaxed) {
                if let Some((rss, _)) = memory_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        MemorySampler {
            pid,
            sampling,
            peak_rss,
            task,
        }
    }

    /// (peak VmRSS, VmHWM, VmRSS now), in KiB.
    async fn stop(self) -> (u64, u64, u64) {
        self.sampling.store(false, Ordering::Relaxed);
        let _ = self.task.await;
        let (rss_end, hwm) = memory_kib(self.pid).unwrap_or_default();
        let peak = self.peak_rss.load(Ordering::Relaxed).max(rss_end);
        (peak, hwm, rss_end)
    }
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// inode → (local port, remote port, state) of a process's TCP sockets, from /proc/net/tcp.
fn tcp_sockets(pid: u32) -> std::collections::HashMap<String, (u16, u16, String)> {
    let mut tcp = std::collections::HashMap::new();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        let port = |a: &str| {
            a.rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                .unwrap_or(0)
        };
        let state = match cols[3] {
            "01" => "established",
            "06" => "time-wait",
            "08" => "close-wait",
            "0A" => "listen",
            other => other,
        };
        tcp.insert(
            cols[9].to_owned(),
            (port(cols[1]), port(cols[2]), state.to_owned()),
        );
    }
    tcp
}

/// A process's open descriptors by kind: TCP connections from clients (local port
/// `listen`) and to the upstream (remote port `upstream`), other sockets, files under `dir`
/// (deleted ones apart), anything else.
fn fds_by_kind(pid: u32, dir: &Path, listen: u16, upstream: u16) -> BTreeMap<String, usize> {
    let tcp = tcp_sockets(pid);
    let mut kinds = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return kinds;
    };
    for e in entries.flatten() {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        let kind = if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']'))
        {
            match tcp.get(inode) {
                Some((l, _, st)) if *l == listen && st != "listen" => format!("client tcp {st}"),
                Some((_, r, st)) if *r == upstream => format!("upstream tcp {st}"),
                Some((_, _, st)) => format!("other tcp {st}"),
                None => "socket (not tcp4)".to_owned(),
            }
        } else if target.starts_with(dir) {
            let rel = target
                .strip_prefix(dir)
                .unwrap_or(&target)
                .to_string_lossy()
                .into_owned();
            let top = rel.split('/').next().unwrap_or("").to_owned();
            let deleted = if t.ends_with("(deleted)") {
                ", deleted"
            } else {
                ""
            };
            format!("cache file ({top}{deleted})")
        } else {
            "other".to_owned()
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

/// Client connections berth still holds open (see [`fds_by_kind`]).
fn client_fds(kinds: &BTreeMap<String, usize>) -> usize {
    kinds
        .iter()
        .filter(|(k, _)| k.starts_with("client tcp"))
        .map(|(_, n)| n)
        .sum()
}

/// xorshift64*, one per client task: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Clients of the cycling soak.
const CYCLE_CLIENTS: usize = 64;
/// Images of the cycling soak: each a config, one of [`BASE_LAYERS`] shared base layers and a
/// layer of its own.
const IMAGES: usize = 200;
const BASE_LAYERS: usize = 20;

/// The soak a person runs (not in CI; `benches/soak.sh` runs it): 64 clients pull 200 images
/// (manifest, config, two layers each, every body verified) through berth while the upstream
/// cycles through hang, mid-body resets, 429, 503 and healthy, a phase each `SOAK_PHASE_SECS`
/// (default 3), for `SOAK_SECS` (default 60, at most 1800). Prints the outcomes, p50/p99
/// latencies, berth's peak RSS, resumes and upstream failures by kind; fails on a corrupt
/// body, a panic, or an image not served whole once the upstream is healthy again.
#[test]
#[ignore = "a soak a person runs: benches/soak.sh (SOAK_SECS)"]
fn soak_cycling_upstream() {
    run_drill(async {
        let secs = env_secs("SOAK_SECS", 60, 10, 1800);
        let phase = Duration::from_secs(env_secs("SOAK_PHASE_SECS", 3, 1, 60));
        let up = FakeUpstream::start().await;
        let images = Arc::new(seed_images(&up));
        let work = tempfile::Builder::new()
            .prefix("drill-soak-cycle-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let cache = work.path().join("cache");
        let toml = support::berth_config_with(
            &up.url(),
            &cache,
            "32MiB",
            "connect_timeout = \"1s\"\nread_timeout = \"2s\"\nrevalidate_timeout = \"500ms\"",
        )
        .replace("tag_ttl = \"10m\"", "tag_ttl = \"5s\"");
        let berth = Berth::start(&toml);
        let pid = berth.pid().expect("berth pid");
        let soak = Duration::from_secs(secs);
        println!(
            "[soak-cycle] {CYCLE_CLIENTS} clients for {soak:?}, {IMAGES} images ({} blobs, {:.1} MiB), max_size 32 MiB (blobs evicted and filled again throughout), tag_ttl 5 s; upstream phases of {phase:?}: hang, reset mid-body, 429, 503, healthy",
            images.blobs,
            images.bytes as f64 / MIB as f64
        );
        let memory = MemorySampler::start(pid);
        let started = Instant::now();
        let deadline = started + soak;
        let cycler = tokio::spawn(cycle_upstream(up.state.clone(), phase, deadline));
        let c = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(CYCLE_CLIENTS)
            .no_proxy()
            .build()
            .expect("client");
        let hard_stop = tokio::time::Instant::from_std(deadline + Duration::from_secs(10));
        let tasks: Vec<_> = (0..CYCLE_CLIENTS)
            .map(|t| {
                let (c, base, images) = (c.clone(), berth.url(), images.clone());
                tokio::spawn(puller(t, c, base, images, deadline, hard_stop))
            })
            .collect();
        let mut all = Pulls::default();
        for t in tasks {
            let joined = tokio::time::timeout(soak + Duration::from_secs(60), t).await;
            all.merge(joined.expect("a client ended").expect("client task"));
        }
        let phases = cycler.await.unwrap_or_default();
        let soaked = started.elapsed();
        // Healthy again: every image is served whole.
        *up.state.behaviour.lock().expect("lock") = Some(Behaviour::Normal);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut after = Pulls::default();
        for i in 0..IMAGES {
            pull_image(&c, &berth.url(), &images.repos[i], &mut after).await;
        }
        let (peak_rss, hwm, rss_end) = memory.stop().await;
        let m = http_get_text(berth.admin_addr(), "/metrics").unwrap_or_default();
        let logs = berth.logs();
        all.print("soak-cycle", soaked);
        after.print("soak-cycle after (upstream healthy)", Duration::ZERO);
        println!(
            "[soak-cycle] upstream phases run: {phases}; berth peak VmRSS={:.1} MiB, VmHWM={:.1} MiB, at end={:.1} MiB; panics in log={}",
            peak_rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            rss_end as f64 / 1024.0,
            logs.matches("panicked").count()
        );
        println!(
            "{}",
            metric_lines(
                &m,
                &[
                    "berth_fill_resumes_total",
                    "berth_upstream_failures_total",
                    "berth_fill_failures_total",
                    "berth_cache_requests_total{kind=",
                    "berth_cache_evictions_total",
                ]
            )
        );
        assert_eq!(all.tally.corrupt + after.tally.corrupt, 0, "corrupt bodies");
        assert!(!logs.contains("panicked"), "berth panicked during the soak");
        assert!(
            all.tally.count("verified") > 0,
            "nothing was served during the soak"
        );
        assert_eq!(
            after.tally.count("verified"),
            after.tally.requests,
            "after the soak, with the upstream healthy, every image is served whole: {:?}",
            after.tally.samples
        );
        assert!(
            hwm.max(peak_rss) < 512 * 1024,
            "berth's peak RSS {} KiB is over 512 MiB",
            hwm.max(peak_rss)
        );
        drop(berth);
        drop(work);
    });
}

fn env_secs(name: &str, default: u64, min: u64, max: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .clamp(min, max)
}

/// The images of the cycling soak.
struct Images {
    repos: Vec<String>,
    blobs: usize,
    bytes: u64,
}

fn seed_images(up: &FakeUpstream) -> Images {
    let mut bytes = 0u64;
    let mut layer = |i: usize| {
        // 32 KiB to about 768 KiB.
        let size = 32 * KIB + (i * 7919) % (736 * KIB);
        bytes += size as u64;
        up.add_blob(random_bytes(size))
    };
    let base: Vec<String> = (0..BASE_LAYERS).map(&mut layer).collect();
    let repos: Vec<String> = (0..IMAGES)
        .map(|i| {
            let repo = format!("soak/img{i:03}");
            let own = layer(BASE_LAYERS + i);
            let config = up.add_blob(Bytes::from(format!(r#"{{"os":"linux","image":{i}}}"#)));
            up.add_image(&repo, "v1", &config, &[base[i % BASE_LAYERS].clone(), own]);
            repo
        })
        .collect();
    Images {
        repos,
        blobs: BASE_LAYERS + 2 * IMAGES,
        bytes,
    }
}

/// Sets the upstream's behaviour to each phase in turn until `deadline`; returns how many
/// phases ran.
async fn cycle_upstream(
    state: Arc<fake_upstream::State>,
    phase: Duration,
    deadline: Instant,
) -> usize {
    let phases = [
        Behaviour::Hang,
        Behaviour::ResetAfter {
            bytes: 192 * KIB,
            times: usize::MAX,
        },
        Behaviour::Status(429),
        Behaviour::Status(503),
        Behaviour::Normal,
    ];
    let mut n = 0;
    while Instant::now() < deadline {
        let b = phases[n % phases.len()].clone();
        state.resets.store(0, Ordering::Relaxed);
        *state.behaviour.lock().expect("lock") = Some(b);
        n += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(phase.min(left)).await;
    }
    *state.behaviour.lock().expect("lock") = Some(Behaviour::Normal);
    n
}

/// What pulling clients saw: outcomes and latencies (seconds) of manifests and blobs.
#[derive(Default)]
struct Pulls {
    tally: Tally,
    manifest_secs: Vec<f64>,
    blob_secs: Vec<f64>,
    images_whole: usize,
    unfinished: usize,
}

impl Pulls {
    fn merge(&mut self, other: Pulls) {
        self.tally.merge(&other.tally);
        self.manifest_secs.extend(other.manifest_secs);
        self.blob_secs.extend(other.blob_secs);
        self.images_whole += other.images_whole;
        self.unfinished += other.unfinished;
    }

    fn print(&self, what: &str, took: Duration) {
        self.tally.print(what);
        self.tally.print_samples(what);
        println!(
            "[{what}] images pulled whole={} requests dropped at the end={}; manifest latency p50={:.3}s p99={:.3}s max={:.3}s; blob latency p50={:.3}s p99={:.3}s max={:.3}s{}",
            self.images_whole,
            self.unfinished,
            percentile(&self.manifest_secs, 0.50),
            percentile(&self.manifest_secs, 0.99),
            percentile(&self.manifest_secs, 1.0),
            percentile(&self.blob_secs, 0.50),
            percentile(&self.blob_secs, 0.99),
            percentile(&self.blob_secs, 1.0),
            if took.is_zero() {
                String::new()
            } else {
                format!(
                    "; {:.0} requests/s, {:.1} MiB/s to clients",
                    self.tally.requests as f64 / took.as_secs_f64(),
                    self.tally.bytes as f64 / MIB as f64 / took.as_secs_f64()
                )
            }
        );
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// One image pulled as a client does: the manifest, then its config and layers, each body
/// verified. A failed manifest ends the pull.
async fn pull_image(c: &reqwest::Client, base: &str, repo: &str, out: &mut Pulls) {
    let t = Instant::now();
    let (got, body) = fetch(c, &format!("{base}/v2/{repo}/manifests/v1")).await;
    out.manifest_secs.push(t.elapsed().as_secs_f64());
    out.tally.record(&got);
    if !got.is_verified() {
        return;
    }
    let Ok(manifest) = serde_json::from_slice::<serde_json::Value>(&body) else {
        out.tally.corrupt += 1;
        return;
    };
    let digests: Vec<String> = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().into_iter().flatten())
        .filter_map(|d| d["digest"].as_str().map(str::to_owned))
        .collect();
    let mut whole = digests.len() == 3;
    for d in &digests {
        let t = Instant::now();
        let got = fetch_blob(c, &format!("{base}/v2/{repo}/blobs/{d}"), d).await;
        out.blob_secs.push(t.elapsed().as_secs_f64());
        out.tally.record(&got);
        whole &= got.is_verified();
    }
    out.images_whole += usize::from(whole);
}

async fn puller(
    t: usize,
    c: reqwest::Client,
    base: String,
    images: Arc<Images>,
    deadline: Instant,
    hard_stop: tokio::time::Instant,
) -> Pulls {
    let mut out = Pulls::default();
    let mut rng = Rng(0x51ed_270b_2774_1f6d ^ (t as u64 + 1).wrapping_mul(0x1000_0001));
    let mut n = 0usize;
    while Instant::now() < deadline && n < 100_000 {
        n += 1;
        let repo = &images.repos[(rng.next() % IMAGES as u64) as usize];
        let (requests, verified) = (out.tally.requests, out.tally.count("verified"));
        if tokio::time::timeout_at(hard_stop, pull_image(&c, &base, repo, &mut out))
            .await
            .is_err()
        {
            out.unfinished += 1;
            break;
        }
        if out.tally.count("verified") - verified < out.tally.requests - requests {
            // A real client backs off a little before retrying.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}
