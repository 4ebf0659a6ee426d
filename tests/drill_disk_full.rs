//! Fault drill: berth (the binary) with its cache on an 8 MiB tmpfs and a `max_size` of
//! 64 MiB. A 12 MiB blob cannot be stored but is still served whole and verified while
//! berth keeps answering; small blobs that fit are cached; as the disk fills up, the least
//! recently used blobs are evicted to make room. Needs root (it mounts the tmpfs). See
//! `tests/drill/mod.rs` for how drills run and report.

mod drill;
mod fake_upstream;
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drill::{
    Findings, Got, MIB, Tally, Tmpfs, blob_file, fetch, fetch_blob, fetch_blob_paced, metric_lines,
    random_bytes, run_drill, temp_files, temp_files_settled, wait_blobs_indexed,
};
use fake_upstream::{Behaviour, FakeUpstream};
use support::{Berth, files_under, http_get_text, http_status};

#[test]
fn disk_full() {
    run_drill(async {
        let mut d = DiskFull::start().await;
        let got = d.fetch("/v2/library/full/manifests/v1").await;
        assert!(got.is_verified(), "{}", got.short());
        // A 12 MiB blob on an 8 MiB disk, from a paced upstream (~30 MB/s), then at full speed.
        d.big_blob_on_a_small_disk("paced upstream", Behaviour::Slow(Duration::from_millis(2)))
            .await;
        d.big_blob_on_a_small_disk("full-speed upstream", Behaviour::Normal)
            .await;
        d.slow_client_with_the_disk_full().await;
        d.small_blobs_are_cached().await;
        d.eviction_makes_room().await;
        d.finish();
    });
}

/// The drill's disk, upstream, berth and figures, shared by its phases.
struct DiskFull {
    started: Instant,
    f: Findings,
    tally: Tally,
    // Before `disk`: berth is stopped before the unmount.
    berth: Berth,
    disk: Tmpfs,
    cache: PathBuf,
    up: FakeUpstream,
    c: reqwest::Client,
    big: Bytes,
    big_digest: String,
    smalls: Vec<(String, Bytes)>,
    config: String,
}

impl DiskFull {
    /// An 8 MiB tmpfs; an upstream with `library/full:v1` (a 12 MiB layer and four of
    /// 1 MiB); berth with its cache on the tmpfs and a max_size larger than the disk, on
    /// purpose.
    async fn start() -> DiskFull {
        let started = Instant::now();
        let disk = Tmpfs::mount("8m");
        let cache = disk.path.join("cache");
        let up = FakeUpstream::start().await;
        let big = random_bytes(12 * MIB);
        let big_digest = up.add_blob(big.clone());
        let smalls: Vec<(String, Bytes)> = (0..4)
            .map(|_| {
                let d = random_bytes(MIB);
                (up.add_blob(d.clone()), d)
            })
            .collect();
        let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
        let mut layers = vec![big_digest.clone()];
        layers.extend(smalls.iter().map(|(d, _)| d.clone()));
        up.add_image("library/full", "v1", &config, &layers);
        let toml = support::berth_config_with(&up.url(), &cache, "64MiB", r#"read_timeout = "5s""#);
        let berth = Berth::start(&toml);
        let (size, used) = disk.usage();
        println!("[disk] tmpfs size={size} used={used} before");
        DiskFull {
            started,
            f: Findings::default(),
            tally: Tally::default(),
            berth,
            disk,
            cache,
            up,
            c: support::client(),
            big,
            big_digest,
            smalls,
            config,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.berth.url())
    }

    fn big_url(&self) -> String {
        self.url(&format!("/v2/library/full/blobs/{}", self.big_digest))
    }

    async fn fetch(&mut self, path: &str) -> Got {
        let (got, _) = fetch(&self.c, &self.url(path)).await;
        self.tally.record(&got);
        got
    }

    /// GET of blob `digest` of `repo`, verified and recorded.
    async fn blob(&mut self, repo: &str, digest: &str) -> Got {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let got = fetch_blob(&self.c, &url, digest).await;
        self.tally.record(&got);
        got
    }

    /// The 12 MiB blob from an upstream that behaves as `behaviour`: the client gets it
    /// whole and verified; during the fill /healthz answers and the cached manifest is
    /// served; afterwards nothing of it is in blobs/ or tmp/.
    async fn big_blob_on_a_small_disk(&mut self, run: &str, behaviour: Behaviour) {
        self.up.set(behaviour);
        let temp_files_before = temp_files(&self.cache);
        let (t, big_url) = (Instant::now(), self.big_url());
        let (got, (health, ready, manifest)) = tokio::join!(
            fetch_blob(&self.c, &big_url, &self.big_digest),
            self.probes_during_a_fill()
        );
        self.tally.record(&got);
        self.tally.record(&manifest);
        let (_, used_after) = self.disk.usage();
        println!(
            "[disk] 12 MiB blob, {run}: {} in {:?}; during the fill: /healthz {health:?}, /readyz {ready:?}, cached manifest {}; tmpfs used after={used_after}",
            got.short(),
            t.elapsed(),
            manifest.kind()
        );
        assert_eq!(self.tally.corrupt, 0, "corrupt body");
        self.f.check(
            matches!(got, Got::Verified { bytes } if bytes == self.big.len() as u64),
            format!(
                "disk full, {run}: the client did not get the complete verified blob: {}",
                got.short()
            ),
        );
        assert_eq!(health, Some(200), "/healthz during the fill");
        assert!(
            manifest.is_verified(),
            "cached manifest during the fill: {}",
            manifest.short()
        );
        assert!(
            !blob_file(&self.cache, &self.big_digest).exists(),
            "a 12 MiB blob on an 8 MiB disk is in blobs/"
        );
        let left =
            temp_files_settled(&self.cache, &temp_files_before, Duration::from_secs(3)).await;
        self.f.check(
            left.is_empty(),
            format!("disk full, {run}: temp files left in <cache>/tmp: {left:?}"),
        );
        let partial: Vec<_> = files_under(&self.cache.join("blobs"));
        assert!(
            partial.is_empty(),
            "blobs/ after the failed store: {partial:?}"
        );
    }

    /// 150 ms into a fill: /healthz, /readyz and the cached manifest.
    async fn probes_during_a_fill(&self) -> (Option<u16>, Option<u16>, Got) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let admin = |p: &str| format!("{}{p}", self.berth.admin_url());
        let status = |url: String| async move {
            self.c
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        };
        let health = status(admin("/healthz")).await;
        let ready = status(admin("/readyz")).await;
        let (m, _) = fetch(&self.c, &self.url("/v2/library/full/manifests/v1")).await;
        (health, ready, m)
    }

    /// A client slower than the upstream (8 MiB/s) while the disk is full: documented, not
    /// asserted (beyond: no corrupt body). With no temp file, only the last 4 MiB of the
    /// blob stay in memory, so a reader that falls further behind loses its stream.
    async fn slow_client_with_the_disk_full(&mut self) {
        self.up.set(Behaviour::Normal);
        let t = Instant::now();
        let got =
            fetch_blob_paced(&self.c, &self.big_url(), &self.big_digest, 8 * MIB as u64).await;
        self.tally.record(&got);
        assert_eq!(self.tally.corrupt, 0, "corrupt body");
        println!(
            "[disk] 12 MiB blob, full-speed upstream, client reading 8 MiB/s: {} in {:?}",
            got.short(),
            t.elapsed()
        );
        let _ = temp_files_settled(&self.cache, &[], Duration::from_secs(3)).await;
    }

    /// Small blobs that fit: cached, and served from the cache the second time.
    async fn small_blobs_are_cached(&mut self) {
        self.up.set(Behaviour::Normal);
        for (d, data) in self.smalls.clone() {
            let got = self.blob("library/full", &d).await;
            assert!(
                matches!(got, Got::Verified { bytes } if bytes == data.len() as u64),
                "small blob: {}",
                got.short()
            );
        }
        let admin = self.berth.admin_addr();
        let committed = wait_blobs_indexed(
            || http_get_text(admin, "/metrics").unwrap_or_default(),
            self.smalls.len(),
        );
        let on_disk = self.smalls_on_disk();
        self.f.check(
            committed.is_ok() && on_disk == self.smalls.len(),
            format!(
                "small blobs after the disk-full fill were not cached: {committed:?}, {on_disk} on disk"
            ),
        );
        for (d, _) in self.smalls.clone() {
            let got = self.blob("library/full", &d).await;
            assert!(got.is_verified(), "{}", got.short());
            assert_eq!(
                self.up.count(&format!("GET /v2/library/full/blobs/{d}")),
                1,
                "second GET of a small blob was not a cache hit"
            );
        }
    }

    fn smalls_on_disk(&self) -> usize {
        self.smalls
            .iter()
            .filter(|(d, _)| blob_file(&self.cache, d).exists())
            .count()
    }

    /// The disk fills up with cached blobs while max_size (64 MiB) is far away: on ENOSPC
    /// berth evicts the least recently used blobs to make room, so every new blob is still
    /// cached (and every client gets a verified body; berth keeps serving). Then a manifest
    /// never seen before is served with the disk full.
    async fn eviction_makes_room(&mut self) {
        let more: Vec<String> = (0..5)
            .map(|_| self.up.add_blob(random_bytes(MIB)))
            .collect();
        let mut layers = more.clone();
        layers.push(self.config.clone());
        self.up
            .add_image("library/more", "v1", &self.config, &layers);
        let got = self.fetch("/v2/library/more/manifests/v1").await;
        assert!(got.is_verified(), "{}", got.short());
        let mut outcomes = Vec::new();
        for d in &more {
            let temp_files_before = temp_files(&self.cache);
            let got = self.blob("library/more", d).await;
            assert_eq!(self.tally.corrupt, 0, "corrupt body");
            self.f.check(
                got.is_verified(),
                format!(
                    "disk filling up: a 1 MiB blob was not delivered: {}",
                    got.short()
                ),
            );
            // The fill has ended (committed or given up) once its temp file is gone.
            let _ =
                temp_files_settled(&self.cache, &temp_files_before, Duration::from_secs(3)).await;
            outcomes.push(if blob_file(&self.cache, d).exists() {
                "cached"
            } else {
                "served uncached"
            });
        }
        self.f.check(
            outcomes.iter().all(|o| *o == "cached"),
            format!("disk full: eviction did not make room for new blobs: {outcomes:?}"),
        );
        let ready_full = http_status(self.berth.admin_addr(), "/readyz").ok();
        let extra = self.up.add_blob(Bytes::from_static(b"extra"));
        self.up
            .add_image("library/late", "v1", &self.config, &[extra]);
        let got = self.fetch("/v2/library/late/manifests/v1").await;
        let late_manifest_stored =
            !files_under(&self.cache.join("manifests/docker.io/library/late")).is_empty();
        println!(
            "[disk] disk filling with 5 more 1 MiB blobs (max_size 64 MiB): {outcomes:?}; /readyz with the disk full: {ready_full:?}; new manifest: {} (stored on disk: {late_manifest_stored})",
            got.short()
        );
        self.f.check(
            got.is_verified(),
            format!("disk full: a new manifest was not served: {}", got.short()),
        );
    }

    /// /healthz still answers, berth never panicked; the figures and berth's warnings.
    fn finish(self) {
        let health = http_status(self.berth.admin_addr(), "/healthz").ok();
        let ready = http_status(self.berth.admin_addr(), "/readyz").ok();
        let m = http_get_text(self.berth.admin_addr(), "/metrics").unwrap_or_default();
        let (_, used) = self.disk.usage();
        self.tally.print("disk");
        println!(
            "[disk] upstream GETs of the big blob={} small blobs cached={}/{} tmpfs used={used} /healthz={health:?} /readyz={ready:?} elapsed={:?}\n{}",
            self.up
                .count(&format!("GET /v2/library/full/blobs/{}", self.big_digest)),
            self.smalls_on_disk(),
            self.smalls.len(),
            self.started.elapsed(),
            metric_lines(
                &m,
                &[
                    "berth_fill_failures_total",
                    "berth_cache_blobs ",
                    "berth_cache_size_bytes "
                ]
            )
        );
        let logs = self.berth.logs();
        let warnings: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(|l| l.trim())
            .collect();
        println!("[disk] berth WARN/ERROR log lines: {}", warnings.len());
        for l in warnings.iter().take(8) {
            println!("[disk] log: {}", l.chars().take(300).collect::<String>());
        }
        assert_eq!(health, Some(200));
        assert!(!logs.contains("panicked"), "berth panicked");
        drop(self.berth);
        drop(self.disk);
        self.f.assert_none("disk");
    }
}
