//! An upstream that accepts connections and never answers (a black hole) never stalls a pull:
//! a tag past `tag_ttl` is served from the cache within `revalidate_timeout`, the revalidation
//! finishes in the background (one per tag) and updates the tag for the next request; an
//! endpoint that timed out counts as down, so while it is, cached tags are served at once and
//! uncached manifests fail within `connect_timeout` with 503 and Retry-After, until the probes
//! bring it back. Every wait is bounded; loopback only.

mod fake_upstream;
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_upstream::{Behaviour, FakeUpstream, sha256};
use support::{InProc, InProcConfig, sample};

/// An upstream with `library/app:v1` and `library/other:v1`, and berth before it with
/// `tag_ttl = "2s"` and `keys` in its `[[registry]]`. (Tag records count whole seconds: a
/// 1 s TTL could expire at once, a 2 s one lasts at least 1 s.)
struct Setup {
    up: FakeUpstream,
    berth: InProc,
    config: String,
}

impl Setup {
    async fn new(keys: &str) -> Setup {
        let up = FakeUpstream::start().await;
        let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
        let layer = up.add_blob(Bytes::from_static(b"layer one"));
        up.add_image("library/app", "v1", &config, &[layer]);
        let other = up.add_blob(Bytes::from_static(b"layer other"));
        up.add_image("library/other", "v1", &config, &[other]);
        let cfg =
            InProcConfig::mirror_of(&up.url(), keys).cache("max_size = \"1GiB\"\ntag_ttl = \"2s\"");
        let berth = InProc::start(&cfg).await;
        Setup { up, berth, config }
    }

    /// `GET /v2/{repo}/manifests/v1`: status, digest of the body, time taken.
    async fn manifest(&self, repo: &str) -> (u16, String, Duration) {
        let t = Instant::now();
        let r = self.berth.get(&format!("/v2/{repo}/manifests/v1")).await;
        let status = r.status().as_u16();
        let body = r.bytes().await.expect("manifest body");
        (status, sha256(&body), t.elapsed())
    }

    /// Moves `library/app:v1` upstream to a new manifest; returns its digest.
    fn move_tag(&self) -> String {
        let layer = self.up.add_blob(Bytes::from_static(b"layer two"));
        self.up
            .add_image("library/app", "v1", &self.config, &[layer])
            .0
    }

    /// Asks for the tag (every 50 ms, 5 s at most) until it is answered with `digest`;
    /// returns how many requests that took, or None.
    async fn until_served(&self, digest: &str) -> Option<usize> {
        for i in 1..=100 {
            let (status, got, _) = self.manifest("library/app").await;
            assert_eq!(status, 200, "the tag is always answered");
            if got == digest {
                return Some(i);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Asks for the tag `n` times in a row, each answered with `digest`; returns the slowest
    /// answer's time.
    async fn cached_in_a_row(&self, n: usize, digest: &str) -> Duration {
        let mut slowest = Duration::ZERO;
        for _ in 0..n {
            let (status, got, took) = self.manifest("library/app").await;
            assert_eq!((status, got.as_str()), (200, digest), "the cached manifest");
            slowest = slowest.max(took);
        }
        slowest
    }

    /// Moves the tag upstream, lets the upstream answer again, and waits (bounded) until
    /// the moved tag is served.
    async fn heal_with_the_tag_moved(&self) {
        let new = self.move_tag();
        self.up.set(Behaviour::Normal);
        let healed = Instant::now();
        let n = self.until_served(&new).await;
        println!(
            "healed: the moved tag served after {:?} ({n:?} requests)",
            healed.elapsed()
        );
        assert!(
            n.is_some(),
            "the moved tag was never served after the upstream healed"
        );
    }

    fn heads(&self) -> usize {
        self.up.count("HEAD /v2/library/app/manifests/v1")
    }

    fn tag_gets(&self) -> usize {
        self.up.count("GET /v2/library/app/manifests/v1")
    }

    async fn stale_answers(&self) -> f64 {
        let m = self.berth.metrics_text().await;
        sample(
            &m,
            r#"berth_cache_requests_total{kind="manifest",result="stale"}"#,
        )
    }
}

/// Caches `library/app:v1` and lets its tag TTL (2 s) pass; returns the cached digest.
async fn cache_then_expire(s: &Setup) -> String {
    let (status, digest, _) = s.manifest("library/app").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    digest
}

/// berth with `keys`, `library/app:v1` cached and past its TTL, the upstream turned into a
/// black hole, and the tag asked for once: the setup, the cached digest and how long that took
/// (the answer checked to be the cached manifest).
async fn stale_in_a_black_hole(keys: &str) -> (Setup, String, Duration) {
    let s = Setup::new(keys).await;
    let old = cache_then_expire(&s).await;
    s.up.set(Behaviour::Hang);
    let (status, got, first) = s.manifest("library/app").await;
    println!("black hole ({keys:?}): first answer after {first:?}");
    assert_eq!(
        (status, got.as_str()),
        (200, old.as_str()),
        "the cached manifest"
    );
    (s, old, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_costs_one_revalidate_timeout_and_the_background_revalidation_updates_the_tag()
{
    let (s, old, first) = stale_in_a_black_hole(
        "connect_timeout = \"1s\"\nread_timeout = \"20s\"\nrevalidate_timeout = \"500ms\"\nprobe_interval = \"0s\"",
    )
    .await;
    assert!(
        first >= Duration::from_millis(400) && first < Duration::from_secs(1),
        "the first answer took {first:?}, not about revalidate_timeout (500ms)"
    );

    // The revalidation goes on in the background: the next requests are answered at once,
    // and none of them asks upstream again.
    let slowest = s.cached_in_a_row(20, &old).await;
    println!("20 requests after it: slowest {slowest:?}");
    assert!(slowest < Duration::from_millis(300), "slowest {slowest:?}");
    assert_eq!(s.heads(), 1, "one revalidation, in the background");
    assert!(s.stale_answers().await >= 21.0);

    // Upstream answers again, with the tag moved: the background revalidation's HEAD gets
    // the new digest and fetches it; the tag's next requests get the new manifest.
    s.heal_with_the_tag_moved().await;
    assert_eq!(
        s.heads(),
        1,
        "the background revalidation, not a new one, saw the move"
    );
    assert_eq!(s.tag_gets(), 2, "the first fill and the background fetch");
    assert!(
        s.berth
            .logs()
            .contains("background tag revalidation finished")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidate_timeout_zero_answers_at_once_and_revalidates_in_the_background() {
    let s = Setup::new("revalidate_timeout = \"0s\"\nprobe_interval = \"0s\"").await;
    let old = cache_then_expire(&s).await;
    let new = s.move_tag();
    // Upstream answers in 300 ms: the client does not wait for it.
    s.up.set(Behaviour::Stall(Duration::from_millis(300)));
    let (status, got, took) = s.manifest("library/app").await;
    println!("revalidate_timeout 0s: stale answer after {took:?}");
    assert_eq!(
        (status, got.as_str()),
        (200, old.as_str()),
        "the cached one"
    );
    assert!(took < Duration::from_millis(250), "took {took:?}");
    let n = s.until_served(&new).await;
    assert!(
        n.is_some(),
        "the background revalidation never updated the tag"
    );
    assert_eq!(s.heads(), 1, "{:#?}", s.up.requests());
    assert_eq!(s.tag_gets(), 2, "{:#?}", s.up.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_timed_out_is_down_until_the_probes_bring_it_back() {
    let (s, old, first) = stale_in_a_black_hole(
        "connect_timeout = \"1s\"\nread_timeout = \"1s\"\nrevalidate_timeout = \"300ms\"\nprobe_interval = \"300ms\"",
    )
    .await;
    assert!(first < Duration::from_millis(600), "took {first:?}");

    // The background HEAD times out after read_timeout (1 s): the endpoint is down.
    let endpoint = format!(
        "berth_upstream_up{{endpoint=\"{}\",registry=\"docker.io\"}}",
        s.up.url()
    );
    let mut down = false;
    for _ in 0..60 {
        if s.berth
            .metrics_text()
            .await
            .contains(&format!("{endpoint} 0"))
        {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(down, "the endpoint that timed out is not marked down");
    let heads = s.heads();
    assert_eq!(heads, 1, "the timed-out HEAD is not retried");

    // While it is down: the cached tag at once, without asking upstream.
    let slowest = s.cached_in_a_row(20, &old).await;
    println!("endpoint down: 20 stale answers, slowest {slowest:?}");
    assert!(slowest < Duration::from_millis(300), "slowest {slowest:?}");
    assert_eq!(s.heads(), heads, "no revalidation sent to a down endpoint");

    // An uncached manifest: 503 UNAVAILABLE with Retry-After within connect_timeout (1 s).
    let t = Instant::now();
    let r = s.berth.get("/v2/library/other/manifests/v1").await;
    let took = t.elapsed();
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").cloned();
    let body: serde_json::Value = r.json().await.expect("OCI error body");
    println!(
        "endpoint down: uncached manifest {status} after {took:?}, Retry-After {retry_after:?}"
    );
    assert_eq!(status, 503);
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    assert!(retry_after.is_some(), "no Retry-After");
    assert!(took < Duration::from_millis(1500), "took {took:?}");

    // Upstream heals with the tag moved: a probe brings the endpoint back and the next
    // revalidation goes upstream again.
    s.heal_with_the_tag_moved().await;
    let (status, _, _) = s.manifest("library/other").await;
    assert_eq!(
        status, 200,
        "the uncached manifest, once the endpoint is back"
    );
}
