//! Fault drill: berth against a hostile upstream — oversized manifests (with and without a
//! Content-Length), a lying Content-Length, redirects it must refuse (another scheme, a local
//! port that is not an endpoint, an endless loop), and a token endpoint that answers garbage.
//! Nothing of it may reach a client as a complete body or land in the cache. See
//! `tests/drill/mod.rs` for how drills run and report.

mod drill;
mod fake_upstream;
mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drill::{
    Findings, Got, KIB, MIB, Tally, blob_file, fetch, fetch_blob, inproc_config, metric_lines,
    random_bytes, run_drill, temp_files, temp_files_settled, wait_blobs_indexed,
};
use fake_upstream::{Behaviour, FakeUpstream, sha256};
use support::{InProc, OCI_MANIFEST, files_under};

#[test]
fn hostile_upstream_answers() {
    run_drill(async {
        let mut d = Hostile::start().await;
        d.oversized_manifests().await;
        d.lying_content_length().await;
        d.refused_redirects().await;
        d.redirect_to_an_endpoint_is_followed().await;
        d.garbage_tokens().await;
        d.finish().await;
    });
}

/// A TCP listener that only counts the connections it gets (and closes them).
struct ConnRecorder {
    port: u16,
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnRecorder {
    async fn start() -> ConnRecorder {
        let l = support::loopback_listener().await;
        let port = l.local_addr().expect("addr").port();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        ConnRecorder { port, count, task }
    }

    fn connections(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for ConnRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The drill's upstream, berth and figures, shared by its phases.
struct Hostile {
    started: Instant,
    f: Findings,
    tally: Tally,
    up: FakeUpstream,
    recorder: ConnRecorder,
    berth: InProc,
    cache: PathBuf,
    c: reqwest::Client,
    /// A 1 MiB layer of `library/app:v1`.
    digest: String,
    /// The image config blob.
    config: String,
    app_manifest: String,
    huge_digest: String,
}

impl Hostile {
    /// The upstream with `library/app:v1` (one 1 MiB layer) and `library/huge:v1` (a 5 MiB
    /// manifest), and berth before it.
    async fn start() -> Hostile {
        let started = Instant::now();
        let up = FakeUpstream::start().await;
        let recorder = ConnRecorder::start().await;
        let digest = up.add_blob(random_bytes(MIB));
        let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
        let (app_manifest, _) =
            up.add_image("library/app", "v1", &config, std::slice::from_ref(&digest));
        // A 5 MiB manifest with its Content-Length.
        let mut huge = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","annotations":{"pad":""#.to_vec();
        huge.resize(5 * MIB - 3, b'a');
        huge.extend_from_slice(b"\"}}");
        let huge = Bytes::from(huge);
        let huge_digest = sha256(&huge);
        up.add_manifest("library/huge", "v1", OCI_MANIFEST, huge);
        let berth = InProc::start(&inproc_config(&up.url(), "10m", "2s", "1GiB")).await;
        Hostile {
            started,
            f: Findings::default(),
            tally: Tally::default(),
            cache: berth.cache_dir().to_owned(),
            c: berth.client().clone(),
            berth,
            up,
            recorder,
            digest,
            config,
            app_manifest,
            huge_digest,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.berth.url())
    }

    fn blob_url(&self) -> String {
        self.url(&format!("/v2/library/app/blobs/{}", self.digest))
    }

    fn manifests_of(&self, repo: &str) -> Vec<(PathBuf, u64)> {
        files_under(&self.cache.join("manifests/docker.io").join(repo))
    }

    async fn fetch(&mut self, path: &str) -> Got {
        let (got, _) = fetch(&self.c, &self.url(path)).await;
        self.tally.record(&got);
        got
    }

    async fn fetch_blob(&mut self) -> Got {
        let got = fetch_blob(&self.c, &self.blob_url(), &self.digest).await;
        self.tally.record(&got);
        got
    }

    /// A 5 MiB manifest, announced by its Content-Length, then streamed without one (the
    /// limit must hold anyway): a 5xx, nothing stored. Then the real manifest, so blob
    /// requests are for a known member.
    async fn oversized_manifests(&mut self) {
        let got = self.fetch("/v2/library/huge/manifests/v1").await;
        println!("[hostile] 5 MiB manifest (Content-Length): {}", got.short());
        assert!(got.is_5xx_oci(), "oversized manifest: {}", got.short());
        assert!(
            self.manifests_of("library/huge").is_empty(),
            "oversized manifest cached: {:?}",
            self.manifests_of("library/huge")
        );
        let huge_hex = self.huge_digest.trim_start_matches("sha256:");
        assert!(
            !files_under(&self.cache.join("manifests"))
                .iter()
                .any(|(p, _)| p.to_string_lossy().contains(huge_hex)),
            "oversized manifest stored somewhere"
        );

        self.up.set(Behaviour::HugeManifest);
        let got = self.fetch("/v2/library/chunked/manifests/v1").await;
        println!("[hostile] 5 MiB manifest (chunked): {}", got.short());
        assert!(
            got.is_5xx_oci(),
            "oversized chunked manifest: {}",
            got.short()
        );
        assert!(self.manifests_of("library/chunked").is_empty());
        self.up.set(Behaviour::Normal);

        let got = self.fetch("/v2/library/app/manifests/v1").await;
        assert!(got.is_verified(), "{}", got.short());
    }

    /// Content-Length larger than the bytes sent, then the connection closes: a broken body
    /// or a 5xx, nothing cached, no temp file left.
    async fn lying_content_length(&mut self) {
        self.up.set(Behaviour::LyingLength);
        let temp_files_before = temp_files(&self.cache);
        let got = self.fetch_blob().await;
        println!("[hostile] lying Content-Length: {}", got.short());
        assert!(
            matches!(got, Got::Aborted { .. }) || got.is_5xx_oci(),
            "lying length: the client must see a broken body or a 5xx: {}",
            got.short()
        );
        assert!(
            !blob_file(&self.cache, &self.digest).exists(),
            "lying-length blob cached"
        );
        let left =
            temp_files_settled(&self.cache, &temp_files_before, Duration::from_secs(2)).await;
        self.f.check(
            left.is_empty(),
            format!("lying length: temp files left in <cache>/tmp after the fill failed: {left:?}"),
        );
    }

    /// Redirects berth must refuse: another scheme, a local port that is not an endpoint,
    /// and an endless loop. None is followed to the recorder; the loop is left within 5 hops.
    async fn refused_redirects(&mut self) {
        let rec = self.recorder.port;
        let refused = [
            ("ftp", format!("ftp://127.0.0.1:{rec}/{{digest}}")),
            (
                "loopback non-endpoint",
                format!("http://127.0.0.1:{rec}/v2/library/app/blobs/{{digest}}"),
            ),
            (
                "localhost non-endpoint",
                format!("http://localhost:{rec}/x/{{digest}}"),
            ),
            ("endless loop", format!("{}/loop/0", self.up.url())),
        ];
        for (what, to) in refused {
            self.up.set(Behaviour::Redirect(to));
            let loops_before = self.up.count("GET /loop/");
            let t = Instant::now();
            let got = self.fetch_blob().await;
            let hops = self.up.count("GET /loop/") - loops_before;
            println!(
                "[hostile] redirect ({what}): {} in {:?}, loop hops followed={hops}",
                got.short(),
                t.elapsed()
            );
            assert!(got.is_5xx_oci(), "redirect ({what}): {}", got.short());
            assert!(hops <= 5, "redirect loop followed {hops} times");
            assert!(
                !blob_file(&self.cache, &self.digest).exists(),
                "redirect ({what}): cached"
            );
        }
        assert_eq!(
            self.recorder.connections(),
            0,
            "a redirect to a forbidden local port was followed"
        );
        println!(
            "[hostile] after the refused redirects: recorder connections={} (must be 0)\n{}",
            self.recorder.connections(),
            metric_lines(&self.berth.render_metrics(), &["berth_upstream_up"])
        );
    }

    /// Control: a redirect to a configured endpoint (a "CDN" path on the fake) is followed,
    /// and the blob cached.
    async fn redirect_to_an_endpoint_is_followed(&mut self) {
        let to = format!("{}/cdn/{{digest}}", self.up.url());
        self.up.set(Behaviour::Redirect(to));
        let got = self.fetch_blob().await;
        println!(
            "[hostile] redirect to a configured endpoint (control): {}",
            got.short()
        );
        assert!(got.is_verified(), "control: {}", got.short());
        let indexed = wait_blobs_indexed(|| self.berth.render_metrics(), 1);
        assert!(indexed.is_ok(), "control blob not cached: {indexed:?}");
        assert!(
            blob_file(&self.cache, &self.digest).exists(),
            "control blob not in blobs/"
        );
        self.up.set(Behaviour::Normal);
    }

    /// A token endpoint that answers garbage: a 5xx each time, nothing cached; a real token
    /// works afterwards (nothing bad was cached as a token).
    async fn garbage_tokens(&mut self) {
        *self.up.state.token.lock().expect("lock") = Some("sekrit".into());
        let garbage = [
            ("not JSON", "this is not json <html>".to_owned()),
            (
                "JSON without a token",
                r#"{"nope":true,"expires_in":300}"#.to_owned(),
            ),
            ("token of the wrong type", r#"{"token":42}"#.to_owned()),
            (
                "100 KiB of JSON",
                format!(r#"{{"token":"{}"}}"#, "t".repeat(100 * KIB)),
            ),
        ];
        for (i, (what, body)) in garbage.into_iter().enumerate() {
            self.up.set(Behaviour::GarbageToken(body));
            let before = self.up.count("GET /token");
            let t = Instant::now();
            let got = self
                .fetch(&format!("/v2/library/tok{i}/manifests/v1"))
                .await;
            println!(
                "[hostile] token endpoint answers {what}: {} in {:?} (token requests: {})",
                got.short(),
                t.elapsed(),
                self.up.count("GET /token") - before
            );
            assert!(got.is_5xx_oci(), "garbage token ({what}): {}", got.short());
            assert!(self.manifests_of(&format!("library/tok{i}")).is_empty());
        }
        self.up.set(Behaviour::Normal);
        self.up.add_image("library/tok0", "v1", &self.config, &[]);
        let got = self.fetch("/v2/library/tok0/manifests/v1").await;
        println!("[hostile] real token afterwards (control): {}", got.short());
        assert!(got.is_verified(), "{}", got.short());
    }

    /// Nothing from the hostile answers is in the cache; no corrupt body; the figures.
    async fn finish(self) {
        let blobs = files_under(&self.cache.join("blobs"));
        assert_eq!(blobs.len(), 1, "only the control blob is cached: {blobs:?}");
        let m = self.berth.render_metrics();
        self.tally.print("hostile");
        println!(
            "[hostile] upstream requests={} cached blobs={} app manifest={} elapsed={:?}\n{}",
            self.up.requests().len(),
            blobs.len(),
            self.app_manifest,
            self.started.elapsed(),
            metric_lines(&m, &["berth_fill_failures_total", "berth_cache_blobs "])
        );
        assert_eq!(self.tally.corrupt, 0);
        self.berth.stop().await;
        self.f.assert_none("hostile");
    }
}
