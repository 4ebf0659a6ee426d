//! Fault drill: upstream trouble in the middle of a pull never reaches the clients. A blob
//! stream reset at 30 % and at 90 % of a 64 MiB blob, with 8 clients waiting on the fill, is
//! resumed with `Range` (also from an upstream that ignores it); a fill whose every resume
//! fails ends as before, in aborted bodies; a bearer token that expires between two layers or
//! in the middle of one is renewed once; a tag missing upstream is asked for once per
//! `negative_ttl`; every kind of upstream failure is counted by kind. See `tests/drill/mod.rs`
//! for how drills run and report.

mod drill;
mod fake_upstream;
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use drill::{Got, MIB, fetch_blob, random_bytes, run_drill};
use fake_upstream::{Behaviour, FakeUpstream};
use support::{InProc, InProcConfig, sample};

const BLOB: usize = 64 * MIB;
const WAITERS: usize = 8;

/// A mirror of `up` with 1 s timeouts and `cache` lines added to `[cache]`.
fn config(up: &FakeUpstream, cache: &str) -> InProcConfig {
    InProcConfig::mirror_of(&up.url(), "connect_timeout = \"1s\"\nread_timeout = \"1s\"")
        .cache(&format!("max_size = \"1GiB\"\n{cache}"))
}

/// An upstream holding `library/app:v1` with one layer per size; the layers' digests.
fn upstream_image(up: &FakeUpstream, sizes: &[usize]) -> Vec<String> {
    let config = up.add_blob(Bytes::from_static(br#"{"os":"linux"}"#));
    let layers: Vec<String> = sizes
        .iter()
        .map(|&n| up.add_blob(random_bytes(n)))
        .collect();
    up.add_image("library/app", "v1", &config, &layers);
    layers
}

async fn manifest_status(berth: &InProc, reference: &str) -> u16 {
    berth
        .get(&format!("/v2/library/app/manifests/{reference}"))
        .await
        .status()
        .as_u16()
}

/// `n` clients GET the blob at once; what each got, and how long the slowest took.
async fn waiters(berth: &InProc, digest: &str, n: usize) -> (Vec<Got>, Duration) {
    let url = format!("{}/v2/library/app/blobs/{digest}", berth.url());
    let started = Instant::now();
    let gets = (0..n).map(|_| {
        let (c, url, digest) = (berth.client().clone(), url.clone(), digest.to_owned());
        tokio::spawn(async move { fetch_blob(&c, &url, &digest).await })
    });
    let mut got = Vec::new();
    for g in gets.collect::<Vec<_>>() {
        let r = tokio::time::timeout(Duration::from_secs(60), g)
            .await
            .expect("a client finished within 60 s")
            .expect("client task");
        got.push(r);
    }
    (got, started.elapsed())
}

fn blob_gets(up: &FakeUpstream, digest: &str) -> usize {
    up.count(&format!("GET /v2/library/app/blobs/{digest}"))
}

fn failures(m: &str, up: &FakeUpstream, kind: &str) -> f64 {
    sample(
        m,
        &format!(
            r#"berth_upstream_failures_total{{endpoint="{}",kind="{kind}",registry="docker.io"}}"#,
            up.url()
        ),
    )
}

fn resumes(m: &str, result: &str) -> f64 {
    sample(
        m,
        &format!(r#"berth_fill_resumes_total{{registry="docker.io",result="{result}"}}"#),
    )
}

/// The blob is reset once at `at` bytes; 8 clients waiting on its fill all get it whole.
async fn reset_once(at_percent: usize, ignore_range: bool) {
    let up = FakeUpstream::start().await;
    let layer = upstream_image(&up, &[BLOB]).remove(0);
    let berth = InProc::start(&config(&up, "")).await;
    assert_eq!(manifest_status(&berth, "v1").await, 200);
    let at = BLOB * at_percent / 100;
    let reset = Behaviour::ResetAfter {
        bytes: at,
        times: 1,
    };
    up.set(if ignore_range {
        Behaviour::Each(vec![reset, Behaviour::IgnoreRange])
    } else {
        reset
    });
    let (got, took) = waiters(&berth, &layer, WAITERS).await;
    let m = berth.metrics_text().await;
    let ranges = up.state.ranges.lock().expect("lock").clone();
    let what = format!(
        "reset at {at_percent} %{}",
        if ignore_range {
            ", upstream ignores Range"
        } else {
            ""
        }
    );
    println!(
        "[resume] {what}: {} of {WAITERS} clients verified in {took:?}; upstream blob GETs {}, Range headers {ranges:?}; resumes ok={} failed={}; failures reset={}",
        got.iter().filter(|g| g.is_verified()).count(),
        blob_gets(&up, &layer),
        resumes(&m, "ok"),
        resumes(&m, "failed"),
        failures(&m, &up, "reset"),
    );
    for g in &got {
        assert!(g.is_verified(), "{what}: a client got {}", g.short());
    }
    assert_eq!(blob_gets(&up, &layer), 2, "{what}: one resume");
    assert_eq!(ranges.len(), 1, "{what}: {ranges:?}");
    let from: usize = ranges[0]
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{what}: not a resume Range: {ranges:?}"));
    assert!(
        from > 0 && from <= at,
        "{what}: resumed from {from}, reset at {at}"
    );
    assert_eq!(resumes(&m, "ok"), 1.0, "{what}");
    assert_eq!(resumes(&m, "failed"), 0.0, "{what}");
    assert_eq!(failures(&m, &up, "reset"), 1.0, "{what}");
    assert_eq!(
        sample(
            &m,
            r#"berth_fill_failures_total{reason="upstream_error",registry="docker.io"}"#
        ),
        0.0,
        "{what}"
    );
    // All 8 were served by the one fill.
    let blob = |r: &str| {
        sample(
            &m,
            &format!(r#"berth_cache_requests_total{{kind="blob",result="{r}"}}"#),
        )
    };
    assert_eq!(blob("miss"), 1.0, "{what}");
    assert_eq!(
        blob("coalesced") + blob("hit"),
        (WAITERS - 1) as f64,
        "{what}"
    );
    // The resumed blob is cached and served again, verified.
    let got = fetch_blob(
        berth.client(),
        &format!("{}/v2/library/app/blobs/{layer}", berth.url()),
        &layer,
    )
    .await;
    assert!(got.is_verified(), "{what}: from the cache: {}", got.short());
    assert_eq!(blob_gets(&up, &layer), 2, "{what}: served from the cache");
}

#[test]
fn reset_at_30_percent_is_resumed_for_8_waiters() {
    run_drill(reset_once(30, false));
}

#[test]
fn reset_at_90_percent_is_resumed_for_8_waiters() {
    run_drill(reset_once(90, false));
}

#[test]
fn reset_is_resumed_from_an_upstream_that_ignores_range() {
    run_drill(reset_once(30, true));
}

/// Two endpoints, each resetting its first blob GET: the resume goes to the other endpoint
/// first (which resets too), the next one back to the first, which sends the rest.
#[test]
fn a_resume_asks_the_next_endpoint_first() {
    run_drill(async {
        let (a, b) = (FakeUpstream::start().await, FakeUpstream::start().await);
        let layer = upstream_image(&a, &[8 * MIB]).remove(0);
        for (k, v) in a.state.blobs.lock().expect("lock").iter() {
            b.state
                .blobs
                .lock()
                .expect("lock")
                .insert(k.clone(), v.clone());
        }
        for (k, v) in a.state.manifests.lock().expect("lock").iter() {
            b.state
                .manifests
                .lock()
                .expect("lock")
                .insert(k.clone(), v.clone());
        }
        let cfg = InProcConfig::new()
            .registry(
                "docker.io",
                true,
                &[&a.url(), &b.url()],
                "connect_timeout = \"1s\"\nread_timeout = \"1s\"",
            )
            .cache(r#"max_size = "1GiB""#);
        let berth = InProc::start(&cfg).await;
        assert_eq!(manifest_status(&berth, "v1").await, 200);
        for up in [&a, &b] {
            up.set(Behaviour::ResetAfter {
                bytes: 2 * MIB,
                times: 1,
            });
        }
        let (got, took) = waiters(&berth, &layer, 2).await;
        let m = berth.metrics_text().await;
        let (ga, gb) = (blob_gets(&a, &layer), blob_gets(&b, &layer));
        let ranges = |up: &FakeUpstream| up.state.ranges.lock().expect("lock").clone();
        println!(
            "[resume] two endpoints: {:?} in {took:?}; GETs a={ga} {:?}, b={gb} {:?}; resumes ok={}",
            got.iter().map(Got::short).collect::<Vec<_>>(),
            ranges(&a),
            ranges(&b),
            resumes(&m, "ok")
        );
        for g in &got {
            assert!(g.is_verified(), "{}", g.short());
        }
        assert_eq!(ga + gb, 3, "the GET and two resumes");
        // Had the first resume gone to the endpoint that broke, it would have sent the rest (it
        // resets only its first GET): two resumes mean it went to the other one, which reset,
        // and the second back to the first.
        assert_eq!(resumes(&m, "ok"), 2.0);
        let (first, other) = if ga == 2 { (&a, &b) } else { (&b, &a) };
        assert_eq!(
            ranges(first).len(),
            1,
            "the first endpoint: its GET, then the last resume"
        );
        assert_eq!(
            ranges(other).len(),
            1,
            "the other endpoint: only the first resume"
        );
        assert_eq!(blob_gets(other, &layer), 1);
    });
}

/// Every resume breaks again: after 3 the clients get an aborted body, as without resumes,
/// and nothing is cached.
#[test]
fn a_fill_whose_every_resume_fails_aborts() {
    run_drill(async {
        let up = FakeUpstream::start().await;
        let layer = upstream_image(&up, &[8 * MIB]).remove(0);
        let berth = InProc::start(&config(&up, "")).await;
        assert_eq!(manifest_status(&berth, "v1").await, 200);
        up.set(Behaviour::ResetAfter {
            bytes: MIB,
            times: 100,
        });
        let (got, took) = waiters(&berth, &layer, 2).await;
        let m = berth.metrics_text().await;
        println!(
            "[resume] every resume reset: {:?} after {took:?}; upstream blob GETs {}",
            got.iter().map(Got::short).collect::<Vec<_>>(),
            blob_gets(&up, &layer)
        );
        for g in &got {
            assert!(
                matches!(g, Got::Aborted { .. }) || g.is_5xx_oci(),
                "{}",
                g.short()
            );
        }
        assert_eq!(blob_gets(&up, &layer), 4, "the GET and 3 resumes");
        assert_eq!(resumes(&m, "ok"), 3.0);
        assert_eq!(failures(&m, &up, "reset"), 4.0);
        assert_eq!(
            sample(
                &m,
                r#"berth_fill_failures_total{reason="upstream_error",registry="docker.io"}"#
            ),
            1.0
        );
        assert!(took < Duration::from_secs(10), "took {took:?}");
        // Upstream heals: the next request fills and verifies.
        up.set(Behaviour::Normal);
        let (got, _) = waiters(&berth, &layer, 1).await;
        assert!(got[0].is_verified(), "{}", got[0].short());
    });
}

/// Pulls `library/app:v1` (manifest, then each layer in turn) through `berth`, verified.
async fn pull(berth: &InProc, layers: &[String]) {
    assert_eq!(manifest_status(berth, "v1").await, 200);
    for layer in layers {
        let url = format!("{}/v2/library/app/blobs/{layer}", berth.url());
        let got = fetch_blob(berth.client(), &url, layer).await;
        assert!(got.is_verified(), "{}", got.short());
    }
}

/// The token expires after the manifest and the first layer: the second layer's request gets
/// 401, berth asks for a new token once and the pull completes.
#[test]
fn token_expiring_between_two_layers_is_renewed_once() {
    run_drill(async {
        let up = FakeUpstream::start().await;
        *up.state.token.lock().expect("lock") = Some("first".into());
        let layers = upstream_image(&up, &[2 * MIB, 2 * MIB]);
        let berth = InProc::start(&config(&up, "")).await;
        // Accepted with the first token: the manifest GET and the first layer's.
        up.set(Behaviour::ExpireToken { after: 2 });
        pull(&berth, &layers).await;
        let tokens = up.count("GET /token");
        println!(
            "[token] expired between two layers: token requests {tokens}, requests {:?}",
            up.requests()
        );
        assert_eq!(tokens, 2, "one token, and one renewal");
        assert_eq!(blob_gets(&up, &layers[1]), 2, "the 401, then the GET");
        // Expired again before a manifest GET: renewed once more.
        let image_config = up.add_blob(Bytes::from_static(br#"{"os":"linux","v":2}"#));
        up.add_image("library/app", "v2", &image_config, &layers);
        *up.state.token.lock().expect("lock") = Some("third".into());
        assert_eq!(manifest_status(&berth, "v2").await, 200);
        assert_eq!(up.count("GET /token"), 3, "one renewal for the manifest");
        assert_eq!(
            up.count("GET /v2/library/app/manifests/v2"),
            2,
            "the 401, then the GET"
        );
    });
}

/// The first layer's stream is reset halfway, and the token expires with that request: the
/// resume gets 401, berth asks for a new token once, the resume continues the layer.
#[test]
fn token_expiring_in_the_middle_of_a_layer_is_renewed_for_the_resume() {
    run_drill(async {
        let up = FakeUpstream::start().await;
        *up.state.token.lock().expect("lock") = Some("first".into());
        let layers = upstream_image(&up, &[16 * MIB, 2 * MIB]);
        let berth = InProc::start(&config(&up, "")).await;
        up.set(Behaviour::Each(vec![
            Behaviour::ExpireToken { after: 2 },
            Behaviour::ResetAfter {
                bytes: 8 * MIB,
                times: 1,
            },
        ]));
        pull(&berth, &layers).await;
        let m = berth.metrics_text().await;
        let tokens = up.count("GET /token");
        println!(
            "[token] expired in the middle of a layer: token requests {tokens}, resumes ok={}, Range headers {:?}",
            resumes(&m, "ok"),
            up.state.ranges.lock().expect("lock")
        );
        assert_eq!(tokens, 2, "one token, and one renewal");
        // The GET (reset), the resume (401), the resume again (206).
        assert_eq!(blob_gets(&up, &layers[0]), 3);
        assert_eq!(resumes(&m, "ok"), 1.0);
        // The 401 came before the blob was looked at: one Range served, from the reset.
        let ranges = up.state.ranges.lock().expect("lock").clone();
        assert_eq!(ranges.len(), 1, "{ranges:?}");
        let from: usize = ranges[0]
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a resume Range: {ranges:?}"));
        assert!(from > 0 && from <= 8 * MIB, "resumed from {from}");
    });
}

/// Podman asks for a tag again and again (each platform, each retry): a tag missing upstream
/// costs one upstream request per `negative_ttl`, and once it is pushed upstream it is served
/// after `negative_ttl` at the latest. With `negative_ttl = "0s"` every ask goes upstream.
#[test]
fn a_missing_tag_is_asked_upstream_once_per_negative_ttl() {
    run_drill(async {
        let up = FakeUpstream::start().await;
        let layers = upstream_image(&up, &[1024]);
        let berth = InProc::start(&config(&up, r#"negative_ttl = "2s""#)).await;
        let podman_accept = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.v1+prettyjws";
        let url = format!("{}/v2/library/app/manifests/later", berth.url());
        let ask = |accept: &'static str| {
            let (c, url) = (berth.client().clone(), url.clone());
            async move {
                let r = c
                    .get(&url)
                    .header("accept", accept)
                    .send()
                    .await
                    .expect("answer");
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                (status, body)
            }
        };
        let started = Instant::now();
        for i in 0..10 {
            let (status, body) = ask(if i % 2 == 0 { podman_accept } else { "*/*" }).await;
            assert_eq!(status, 404, "{body}");
            assert!(body.contains("MANIFEST_UNKNOWN"), "{body}");
        }
        // A missing digest too.
        let missing = format!("sha256:{}", "0".repeat(64));
        for _ in 0..3 {
            assert_eq!(manifest_status(&berth, &missing).await, 404);
        }
        let asked = up.count("GET /v2/library/app/manifests/later");
        println!(
            "[negative] 10 asks for a missing tag within {:?}: {asked} upstream request(s); 3 for a missing digest: {}",
            started.elapsed(),
            up.count(&format!("GET /v2/library/app/manifests/{missing}"))
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the test was too slow for its ttl"
        );
        assert_eq!(asked, 1);
        assert_eq!(
            up.count(&format!("GET /v2/library/app/manifests/{missing}")),
            1
        );
        // Pushed upstream: within negative_ttl still 404, then served.
        let image_config = up.add_blob(Bytes::from_static(br#"{"os":"linux","later":1}"#));
        up.add_image("library/app", "later", &image_config, &layers);
        let pushed = Instant::now();
        let mut served_after = None;
        for _ in 0..100 {
            if ask("*/*").await.0 == 200 {
                served_after = Some(pushed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "[negative] tag pushed upstream: served after {served_after:?} (negative_ttl 2 s)"
        );
        let served_after = served_after.expect("the pushed tag is served after negative_ttl");
        assert!(served_after < Duration::from_secs(3), "{served_after:?}");

        // negative_ttl = "0s": every ask goes upstream.
        let berth = InProc::start(&config(&up, r#"negative_ttl = "0s""#)).await;
        for _ in 0..5 {
            assert_eq!(manifest_status(&berth, "never").await, 404);
        }
        assert_eq!(up.count("GET /v2/library/app/manifests/never"), 5);
    });
}

/// Each kind of upstream failure berth can meet here, counted under its kind (and named in
/// the log line): a 503, a 429, a blob stream reset (RST), a read timeout, a corrupt blob, a
/// refused connection.
#[test]
fn upstream_failures_are_counted_by_kind() {
    run_drill(async {
        let up = FakeUpstream::start().await;
        let layers = upstream_image(&up, &[MIB, MIB]);
        let port = up.addr.port();
        let berth = InProc::start(&config(&up, r#"negative_ttl = "0s""#)).await;
        let mut seen = Vec::new();
        let phases: [(&str, Behaviour); 5] = [
            ("status_5xx", Behaviour::Status(503)),
            ("status_429", Behaviour::Status(429)),
            (
                "reset",
                Behaviour::ResetAfter {
                    bytes: 64 * 1024,
                    times: 100,
                },
            ),
            ("timeout", Behaviour::Stall(Duration::from_secs(3))),
            ("bad_body", Behaviour::Corrupt),
        ];
        for (i, (kind, behaviour)) in phases.into_iter().enumerate() {
            up.set(behaviour);
            let before = failures(&berth.metrics_text().await, &up, kind);
            if kind == "bad_body" || kind == "reset" {
                // A blob not cached: its body is reset (every resume too), or corrupt.
                let layer = &layers[usize::from(kind == "reset")];
                let url = format!("{}/v2/library/app/blobs/{layer}", berth.url());
                let got = fetch_blob(berth.client(), &url, layer).await;
                assert!(
                    !got.is_verified(),
                    "{kind}: a blob was served: {}",
                    got.short()
                );
            } else {
                // A tag not cached: the request reaches upstream.
                let status = manifest_status(&berth, &format!("t{i}")).await;
                assert!(status >= 429, "{kind}: {status}");
            }
            let after = failures(&berth.metrics_text().await, &up, kind);
            seen.push(format!("{kind} {before}→{after}"));
            assert!(after > before, "{kind}: not counted ({before} → {after})");
            up.set(Behaviour::Normal);
        }
        // The upstream goes away: connections are refused.
        let url = up.url();
        drop(up);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = manifest_status(&berth, "gone").await;
        let m = berth.metrics_text().await;
        let connect = sample(
            &m,
            &format!(
                r#"berth_upstream_failures_total{{endpoint="{url}",kind="connect",registry="docker.io"}}"#
            ),
        );
        seen.push(format!("connect 0→{connect}"));
        println!("[failures] counted by kind: {seen:?} (port {port})");
        assert!(status >= 500, "upstream gone: {status}");
        assert!(connect >= 1.0, "connect: not counted");
        let logs = berth.logs();
        for kind in [
            "status_5xx",
            "status_429",
            "reset",
            "timeout",
            "bad_body",
            "connect",
        ] {
            assert!(logs.contains(kind), "no log line names {kind}");
        }
    });
}
