//! Fault drill: berth (the binary, a child process) is killed with SIGKILL in the middle of
//! filling a 32 MiB blob from a slow upstream. The client must see an incomplete body, never
//! a complete 200; after a restart no temp file or half-filled blob is left, and the blob is
//! filled again, verified and cached. See `tests/drill/mod.rs` for how drills run and report.

mod drill;
mod fake_upstream;
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drill::{
    Findings, Got, KIB, MIB, Tally, blob_file, fetch_blob, random_bytes, run_drill, temp_files,
    wait_blobs_indexed,
};
use fake_upstream::{Behaviour, FakeUpstream};
use support::{Berth, files_under, http_get_text, http_status};

#[test]
fn kill_9_mid_fill() {
    run_drill(async {
        let mut d = Kill9::new().await;
        // Berth is a child process here (the blocking fixture calls run on the test's thread;
        // the fake upstream runs on the runtime's workers).
        let mut berth = Berth::start(&support::berth_config(&d.up.url(), &d.cache));
        let pid1 = berth.pid();
        let got = d.kill_mid_fill(&mut berth).await;
        d.tally.record(&got);
        assert_eq!(d.tally.corrupt, 0, "corrupt body");
        assert!(
            matches!(got, Got::Aborted { bytes, .. } if bytes < d.data.len() as u64)
                || matches!(got, Got::Failed(_)),
            "the client must see an incomplete body, never a complete 200: {}",
            got.short()
        );
        println!(
            "[kill-9] temp files after the crash (before restart): {:?}",
            temp_files(&d.cache)
        );
        d.restart_leaves_nothing_half_done(&mut berth);
        d.up.set(Behaviour::Normal);
        let gets = d.refill_and_hit(&berth).await;
        d.tally.print("kill-9");
        println!(
            "[kill-9] upstream blob GETs={gets} pid before={pid1:?} after={:?} panics in log={} elapsed={:?}",
            berth.pid(),
            berth.logs().matches("panicked").count(),
            d.started.elapsed()
        );
        assert!(!berth.logs().contains("panicked"));
        d.f.assert_none("kill-9");
    });
}

/// The drill's upstream (one 32 MiB blob, sent slowly), cache dir and figures.
struct Kill9 {
    started: Instant,
    f: Findings,
    tally: Tally,
    up: FakeUpstream,
    data: Bytes,
    digest: String,
    c: reqwest::Client,
    cache: PathBuf,
    _work: tempfile::TempDir,
}

impl Kill9 {
    async fn new() -> Kill9 {
        let started = Instant::now();
        let up = FakeUpstream::start().await;
        let data = random_bytes(32 * MIB);
        let digest = up.add_blob(data.clone());
        // 64 KiB every 8 ms: 32 MiB take about 4 s.
        up.set(Behaviour::Slow(Duration::from_millis(8)));
        let work = tempfile::Builder::new()
            .prefix("drill-kill-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        Kill9 {
            started,
            f: Findings::default(),
            tally: Tally::default(),
            up,
            data,
            digest,
            c: support::client(),
            cache: work.path().join("cache"),
            _work: work,
        }
    }

    fn blob_url(&self, berth: &Berth) -> String {
        format!("{}/v2/library/big/blobs/{}", berth.url(), self.digest)
    }

    /// Starts a GET of the blob, kills berth once the fill's temp file has 512 KiB, and
    /// returns what the client saw (within 20 s).
    async fn kill_mid_fill(&self, berth: &mut Berth) -> Got {
        let get = {
            let (c, u, d) = (self.c.clone(), self.blob_url(berth), self.digest.clone());
            tokio::spawn(async move { fetch_blob(&c, &u, &d).await })
        };
        let partial = wait_partial_temp_file(&self.cache).await;
        let killed_at = Instant::now();
        let pid = berth.pid();
        berth.kill();
        println!(
            "[kill-9] killed berth (pid {pid:?}) {:?} after start, temp file {} had {} bytes",
            self.started.elapsed(),
            partial.0.file_name().unwrap_or_default().to_string_lossy(),
            partial.1
        );
        let got = tokio::time::timeout(Duration::from_secs(20), get)
            .await
            .expect("the client noticed the crash within 20 s")
            .expect("client task");
        println!(
            "[kill-9] client saw: {} ({:?} after the kill)",
            got.short(),
            killed_at.elapsed()
        );
        got
    }

    /// Restarts berth on the same cache: ready, no temp file, nothing in blobs/.
    fn restart_leaves_nothing_half_done(&self, berth: &mut Berth) {
        berth.restart();
        let ready = support::wait_for(
            "berth /readyz",
            Duration::from_secs(20),
            || match http_status(berth.admin_addr(), "/readyz") {
                Ok(200) => support::Probe::Ready(()),
                other => support::Probe::Pending(format!("{other:?}")),
            },
        );
        assert!(ready.is_ok(), "{ready:?}");
        let left = temp_files(&self.cache);
        assert!(left.is_empty(), "temp files survived the restart: {left:?}");
        assert!(
            !blob_file(&self.cache, &self.digest).exists(),
            "the half-filled blob is in blobs/"
        );
        assert!(
            files_under(&self.cache.join("blobs")).is_empty(),
            "blobs/ after restart: {:?}",
            files_under(&self.cache.join("blobs"))
        );
    }

    /// Fills again, at full speed: a second upstream GET, a verified body, cached; the third
    /// GET is a cache hit. Returns the upstream's blob GETs after the refill.
    async fn refill_and_hit(&mut self, berth: &Berth) -> usize {
        let (blob_url, digest) = (self.blob_url(berth), self.digest.clone());
        let got = fetch_blob(&self.c, &blob_url, &digest).await;
        self.tally.record(&got);
        println!("[kill-9] after restart: {}", got.short());
        assert!(matches!(got, Got::Verified { bytes } if bytes == self.data.len() as u64));
        let gets = self
            .up
            .count(&format!("GET /v2/library/big/blobs/{digest}"));
        assert_eq!(gets, 2, "upstream blob GETs");
        let admin = berth.admin_addr();
        let cached = wait_blobs_indexed(|| http_get_text(admin, "/metrics").unwrap_or_default(), 1);
        self.f.check(
            cached.is_ok() && blob_file(&self.cache, &digest).exists(),
            format!("the refilled blob was not committed to blobs/: {cached:?}"),
        );
        let got = fetch_blob(&self.c, &blob_url, &digest).await;
        self.tally.record(&got);
        assert!(got.is_verified(), "{}", got.short());
        assert_eq!(
            self.up
                .count(&format!("GET /v2/library/big/blobs/{digest}")),
            2,
            "the third GET was a cache hit"
        );
        gets
    }
}

/// Waits (15 s at most) until a fill's temp file has at least 512 KiB.
async fn wait_partial_temp_file(cache: &Path) -> (PathBuf, u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = temp_files(cache);
        if let Some((p, n)) = t.into_iter().find(|(_, n)| *n >= 512 * KIB as u64) {
            return (p, n);
        }
        assert!(
            Instant::now() < deadline,
            "no temp file with bytes in {}/tmp after 15 s",
            cache.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
