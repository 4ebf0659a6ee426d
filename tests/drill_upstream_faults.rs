//! Fault drill: the upstream dies mid-stream, stalls (mid-body: resumed; and before any header),
//! throttles (503, 429), goes away, comes back resetting every connection, and heals. Cached
//! content keeps being served (stale tags, blobs), uncached requests get clean OCI errors
//! (with Retry-After), and berth recovers by itself. See `tests/drill/mod.rs` for how drills
//! run and report.

mod drill;
mod fake_upstream;
mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drill::{
    Findings, Got, MIB, Tally, blob_file, fetch, fetch_blob, inproc_config, metric_lines,
    random_bytes, run_drill, temp_files, temp_files_settled, wait_blobs_indexed,
};
use fake_upstream::{Behaviour, FakeUpstream, State, sha256};
use support::InProc;

#[test]
fn upstream_dies_stalls_throttles_resets() {
    run_drill(async {
        let mut d = Faults::start().await;
        let got = d.manifest("library/app").await;
        assert!(got.is_verified(), "{}", got.short());
        d.cut_mid_stream_then_heal().await;
        d.stall_mid_body().await;
        d.stall_before_headers().await;
        d.throttled(503).await;
        d.throttled(429).await;
        d.healed_after_throttling().await;
        d.upstream_down().await;
        d.resets_then_heals().await;
        d.finish().await;
    });
}

/// The drill's upstream, berth and figures, shared by its phases.
struct Faults {
    started: Instant,
    f: Findings,
    tally: Tally,
    /// `None` while the upstream is down.
    up: Option<FakeUpstream>,
    port: u16,
    state: Arc<State>,
    berth: InProc,
    cache: PathBuf,
    c: reqwest::Client,
    /// The two layers of `library/app:v1`, of `library/other:v1` and of `library/late:v1`.
    app: [String; 2],
    other: String,
    late: String,
    app_manifest: String,
    stale_served: usize,
    requests_before_down: usize,
}

impl Faults {
    async fn start() -> Faults {
        let started = Instant::now();
        let up = FakeUpstream::start().await;
        let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
        let layer = || up.add_blob(random_bytes(MIB));
        let (app, other, late) = ([layer(), layer()], layer(), layer());
        let (app_manifest, _) = up.add_image("library/app", "v1", &config, &app);
        up.add_image("library/other", "v1", &config, std::slice::from_ref(&other));
        up.add_image("library/late", "v1", &config, std::slice::from_ref(&late));
        // tag_ttl 0s: every tag request revalidates, so a failing upstream shows at once.
        let berth = InProc::start(&inproc_config(&up.url(), "0s", "1s", "1GiB")).await;
        Faults {
            started,
            f: Findings::default(),
            tally: Tally::default(),
            port: up.addr.port(),
            state: up.state.clone(),
            up: Some(up),
            cache: berth.cache_dir().to_owned(),
            c: berth.client().clone(),
            berth,
            app,
            other,
            late,
            app_manifest,
            stale_served: 0,
            requests_before_down: 0,
        }
    }

    fn up(&self) -> &FakeUpstream {
        self.up.as_ref().expect("the upstream is up")
    }

    /// `GET /v2/{repo}/manifests/v1`, recorded; with the digest of the body if verified.
    async fn manifest_digest(&mut self, repo: &str) -> (Got, String) {
        let url = format!("{}/v2/{repo}/manifests/v1", self.berth.url());
        let (got, body) = fetch(&self.c, &url).await;
        self.tally.record(&got);
        let digest = if got.is_verified() {
            sha256(&body)
        } else {
            String::new()
        };
        (got, digest)
    }

    async fn manifest(&mut self, repo: &str) -> Got {
        self.manifest_digest(repo).await.0
    }

    /// GET of blob `digest` of `repo`, verified and recorded.
    async fn blob(&mut self, repo: &str, digest: &str) -> Got {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.berth.url());
        let got = fetch_blob(&self.c, &url, digest).await;
        self.tally.record(&got);
        got
    }

    /// A failed fill leaves no temp file behind (waits 2 s at most).
    async fn check_no_temp_files_left(&mut self, before: &[(PathBuf, u64)], what: &str) {
        let left = temp_files_settled(&self.cache, before, Duration::from_secs(2)).await;
        self.f.check(
            left.is_empty(),
            format!("{what}: temp files left in <cache>/tmp after the fill failed: {left:?}"),
        );
    }

    /// The upstream dies mid-stream (the body is cut): a broken body or a 5xx, nothing
    /// cached. Then it heals, and the blob is filled and cached.
    async fn cut_mid_stream_then_heal(&mut self) {
        self.up().set(Behaviour::Cut);
        let before = temp_files(&self.cache);
        let layer = self.app[0].clone();
        let got = self.blob("library/app", &layer).await;
        println!("[upstream] cut mid-stream: {}", got.short());
        assert!(
            matches!(got, Got::Aborted { .. }) || got.is_5xx_oci(),
            "cut: {}",
            got.short()
        );
        assert!(!blob_file(&self.cache, &layer).exists(), "cut blob cached");
        self.check_no_temp_files_left(&before, "cut").await;
        self.up().set(Behaviour::Normal);
        let got = self.blob("library/app", &layer).await;
        println!("[upstream] after the cut, upstream normal: {}", got.short());
        assert!(got.is_verified(), "{}", got.short());
        // Served from the cache below, while the upstream fails.
        let indexed = wait_blobs_indexed(|| self.berth.render_metrics(), 1);
        assert!(indexed.is_ok(), "refilled blob not cached: {indexed:?}");
    }

    /// A body that stalls at its middle longer than read_timeout (1 s) is resumed from there
    /// (`Range`): the client gets the whole blob, verified, within 4 s, and it is cached.
    async fn stall_mid_body(&mut self) {
        self.up()
            .set(Behaviour::StallMidway(Duration::from_secs(5)));
        let layer = self.app[1].clone();
        let ranges_before = self.state.ranges.lock().expect("lock").len();
        let t = Instant::now();
        let got = self.blob("library/app", &layer).await;
        let stalled_for = t.elapsed();
        let ranges = self.state.ranges.lock().expect("lock")[ranges_before..].to_vec();
        println!(
            "[upstream] stall mid-body (5 s): {} after {stalled_for:?}, resumed with {ranges:?}",
            got.short()
        );
        assert!(got.is_verified(), "stall mid-body: {}", got.short());
        assert!(
            stalled_for < Duration::from_secs(4),
            "a 1 s read_timeout took {stalled_for:?} to resume a stalled body"
        );
        assert_eq!(ranges.len(), 1, "one resume: {ranges:?}");
        let indexed = wait_blobs_indexed(|| self.berth.render_metrics(), 2);
        assert!(indexed.is_ok(), "resumed blob not cached: {indexed:?}");
        self.up().set(Behaviour::Normal);
    }

    /// An upstream silent before any header: an uncached manifest is a 5xx, a cached tag is
    /// served stale, both within 4 s.
    async fn stall_before_headers(&mut self) {
        self.up().set(Behaviour::Stall(Duration::from_secs(5)));
        let t = Instant::now();
        let got = self.manifest("library/other").await;
        let stalled_for = t.elapsed();
        println!(
            "[upstream] stall before headers, uncached manifest: {} after {stalled_for:?}",
            got.short()
        );
        assert!(got.is_5xx_oci(), "stall before headers: {}", got.short());
        assert!(stalled_for < Duration::from_secs(4), "took {stalled_for:?}");
        let t = Instant::now();
        let (got, digest) = self.manifest_digest("library/app").await;
        let stalled_for = t.elapsed();
        println!(
            "[upstream] stall before headers, cached tag (ttl 0s): {} after {stalled_for:?}",
            got.short()
        );
        assert_eq!(digest, self.app_manifest, "stale manifest expected");
        assert!(stalled_for < Duration::from_secs(4), "took {stalled_for:?}");
        self.up().set(Behaviour::Normal);
    }

    /// The upstream answers `code` for a while (1.5 s, 20 rounds at most): the cached tag is
    /// served stale, cached blobs are served, uncached manifests and blobs get `code` as an
    /// OCI error with the upstream's Retry-After.
    async fn throttled(&mut self, code: u16) {
        self.up().set(Behaviour::Status(code));
        let until = Instant::now() + Duration::from_millis(1500);
        let (mut rounds, mut missing_retry_after) = (0, 0);
        let (other, cached) = (self.other.clone(), self.app[0].clone());
        while Instant::now() < until && rounds < 20 {
            rounds += 1;
            let (got, digest) = self.manifest_digest("library/app").await;
            assert_eq!(
                digest,
                self.app_manifest,
                "upstream {code}: stale manifest expected: {}",
                got.short()
            );
            self.stale_served += 1;
            let m = self.manifest("library/other").await;
            let b = self.blob("library/other", &other).await;
            for (what, got) in [("manifest", &m), ("blob", &b)] {
                if rounds == 1 {
                    println!(
                        "[upstream] upstream {code}, uncached {what}: {}",
                        got.short()
                    );
                }
                assert_eq!(
                    got.oci_error().map(|(s, _)| s),
                    Some(code),
                    "upstream {code}, uncached {what}: {}",
                    got.short()
                );
                if !matches!(
                    got,
                    Got::Status {
                        retry_after: Some(_),
                        ..
                    }
                ) {
                    missing_retry_after += 1;
                }
            }
            // Cached blobs keep being served.
            let got = self.blob("library/app", &cached).await;
            assert!(got.is_verified(), "{}", got.short());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.f.check(
            missing_retry_after == 0,
            format!(
                "upstream {code}: {missing_retry_after} of {} uncached answers had no Retry-After",
                2 * rounds
            ),
        );
    }

    /// The upstream heals: fresh fills work at once, without a restart.
    async fn healed_after_throttling(&mut self) {
        println!(
            "[upstream] stale manifest answers during 503/429: {}",
            self.stale_served
        );
        self.up().set(Behaviour::Normal);
        let got = self.manifest("library/other").await;
        assert!(got.is_verified(), "after 503/429: {}", got.short());
        let other = self.other.clone();
        let got = self.blob("library/other", &other).await;
        println!("[upstream] after 503/429, uncached blob: {}", got.short());
        assert!(got.is_verified(), "{}", got.short());
    }

    /// The upstream goes away (listener and every connection closed): uncached requests get
    /// 502 (503 once the endpoint is marked down), the cached tag is served stale and cached
    /// blobs are served.
    async fn upstream_down(&mut self) {
        self.requests_before_down = self.state.log.lock().expect("lock").len();
        drop(self.up.take());
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.late_is_502("upstream down").await;
        let (_, digest) = self.manifest_digest("library/app").await;
        assert_eq!(digest, self.app_manifest, "stale while down");
        let cached = self.app[0].clone();
        let got = self.blob("library/app", &cached).await;
        assert!(got.is_verified(), "cached while down: {}", got.short());
    }

    /// The upstream comes back on the same port resetting every connection (502s or 503s), then
    /// heals: berth recovers by itself within the endpoint cool-down (12 s at most).
    async fn resets_then_heals(&mut self) {
        *self.state.behaviour.lock().expect("lock") = Some(Behaviour::Reset);
        let resets_before = self.state.connections.load(Ordering::Relaxed);
        self.up = Some(FakeUpstream::start_on_port(self.port, self.state.clone()).await);
        self.late_is_502("upstream resets connections").await;
        let resets = self.state.connections.load(Ordering::Relaxed) - resets_before;
        self.up().set(Behaviour::Normal);
        let (recovered, polls) = self.poll_until_recovered().await;
        println!(
            "[upstream] recovered {recovered:?} after the upstream healed ({polls} polls, {resets} connections reset)"
        );
        let recovered = recovered.expect("berth recovered within 15 s");
        assert!(
            recovered <= Duration::from_secs(12),
            "recovery took {recovered:?}"
        );
        let late = self.late.clone();
        let got = self.blob("library/late", &late).await;
        assert!(got.is_verified(), "after recovery: {}", got.short());
    }

    /// The uncached `library/late` (manifest and blob) is answered with an OCI error: 502 by
    /// the request that finds the upstream unreachable, 503 with Retry-After while its one
    /// endpoint is marked down.
    async fn late_is_502(&mut self, when: &str) {
        let late = self.late.clone();
        let manifest = self.manifest("library/late").await;
        let blob = self.blob("library/late", &late).await;
        for (what, got) in [("manifest", manifest), ("blob", blob)] {
            println!("[upstream] {when}, uncached {what}: {}", got.short());
            let status = got.oci_error().map(|(s, _)| s);
            let retry_after = matches!(
                got,
                Got::Status {
                    retry_after: Some(_),
                    ..
                }
            );
            assert!(
                status == Some(502) || (status == Some(503) && retry_after),
                "{when}, uncached {what}: {}",
                got.short()
            );
        }
    }

    /// Polls the uncached manifest every 250 ms (15 s at most) until it is served; returns
    /// how long that took, and the number of polls.
    async fn poll_until_recovered(&mut self) -> (Option<Duration>, usize) {
        let healed = Instant::now();
        let mut polls = 0;
        loop {
            polls += 1;
            let got = self.manifest("library/late").await;
            if got.is_verified() {
                return (Some(healed.elapsed()), polls);
            }
            if healed.elapsed() > Duration::from_secs(15) {
                println!("[upstream] still failing after 15 s: {}", got.short());
                return (None, polls);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn finish(self) {
        let m = self.berth.render_metrics();
        self.tally.print("upstream");
        println!(
            "[upstream] upstream requests={} (before going down: {}) elapsed={:?}\n{}",
            self.state.log.lock().expect("lock").len(),
            self.requests_before_down,
            self.started.elapsed(),
            metric_lines(
                &m,
                &[
                    "berth_fill_failures_total",
                    "berth_cache_requests_total{kind=\"manifest\",result=\"stale\"}",
                    "berth_upstream_up"
                ]
            )
        );
        assert_eq!(self.tally.corrupt, 0);
        self.berth.stop().await;
        drop(self.up);
        self.f.assert_none("upstream");
    }
}
