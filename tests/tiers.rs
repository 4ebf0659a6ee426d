//! Chained tiers, load balancing, failover, upstream budgets and client limits, with berths
//! in-process in front of fake upstreams on 127.0.0.1:0.

mod fake_upstream;
mod support;

use std::time::Duration;

use bytes::Bytes;
use fake_upstream::{Behaviour, FakeUpstream, sha256};
use support::{InProc, InProcConfig, sample, seeded_bytes, try_sample};

/// A berth whose config is `registries` (TOML `[[registry]]` tables) plus `server_extra`
/// (`[server]` keys).
async fn start(registries: &str, server_extra: &str, tag_ttl: &str) -> InProc {
    let config = InProcConfig::new()
        .server(server_extra)
        .cache(&format!("max_size = \"1GiB\"\ntag_ttl = \"{tag_ttl}\""))
        .table(registries);
    InProc::start(&config).await
}

fn random_bytes(n: usize, seed: u8) -> Bytes {
    Bytes::from(seeded_bytes(n, seed))
}

/// An upstream holding `library/app:v1` with `n` layers; returns the layer digests.
fn seed(up: &FakeUpstream, n: usize, size: usize) -> Vec<(String, Bytes)> {
    let layers: Vec<(String, Bytes)> = (0..n)
        .map(|i| {
            let b = random_bytes(size, i as u8 + 1);
            (up.add_blob(b.clone()), b)
        })
        .collect();
    let config = up.add_blob(Bytes::from_static(b"{}"));
    let digests: Vec<String> = layers.iter().map(|(d, _)| d.clone()).collect();
    up.add_image("library/app", "v1", &config, &digests);
    layers
}

fn registry(endpoints: &str, extra: &str) -> String {
    format!(
        r#"
        [[registry]]
        name = "docker.io"
        default = true
        endpoints = [{endpoints}]
        connect_timeout = "1s"
        read_timeout = "3s"
        probe_interval = "0s"
        {extra}
        "#
    )
}

fn mirror(url: &str) -> String {
    format!(r#"{{ url = "{url}", mirror = true }}"#)
}

/// Pulls `library/app:v1` (manifest, then every layer), checking every body.
async fn pull(b: &InProc, layers: &[(String, Bytes)]) {
    let r = b.get("/v2/library/app/manifests/v1").await;
    assert_eq!(r.status(), 200, "manifest via {}", b.url());
    for (d, data) in layers {
        let r = b.get(&format!("/v2/library/app/blobs/{d}")).await;
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.expect("body");
        assert_eq!(body.len(), data.len());
        assert_eq!(&sha256(&body), d);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tier_chain_fetches_each_blob_once() {
    let up = FakeUpstream::start().await;
    let layers = seed(&up, 3, 2 * 1024 * 1024);
    // Slow enough that the two edges' pulls overlap at the regional tier.
    up.set(Behaviour::Slow(Duration::from_millis(3)));
    let regional = start(&registry(&format!("\"{}\"", up.url()), ""), "", "10m").await;
    let edge_cfg = registry(&mirror(&regional.url()), "");
    let edge1 = start(&edge_cfg, "", "10m").await;
    let edge2 = start(&edge_cfg, "", "10m").await;
    tokio::join!(pull(&edge1, &layers), pull(&edge2, &layers));
    for (d, _) in &layers {
        assert_eq!(
            up.count(&format!("GET /v2/library/app/blobs/{d}")),
            1,
            "blob {d}"
        );
    }
    // Upstream bytes: each layer once (the regional's counter of bytes from upstream).
    let total: usize = layers.iter().map(|(_, b)| b.len()).sum::<usize>();
    let m = regional.metrics_text().await;
    let bytes = try_sample(&m, r#"berth_upstream_bytes_total{registry="docker.io"}"#)
        .expect("regional upstream bytes");
    let manifest_len = up
        .state
        .manifests
        .lock()
        .expect("lock")
        .get(&("library/app".to_owned(), "v1".to_owned()))
        .map(|(_, b)| b.len())
        .expect("manifest");
    assert_eq!(bytes as usize, total + manifest_len);
    // The edges asked the regional with ?ns=docker.io; the regional asked upstream plainly.
    assert!(up.requests().iter().all(|r| !r.contains("ns=")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_tier_shares_one_logical_cache() {
    let up = FakeUpstream::start().await;
    let layers = seed(&up, 12, 64 * 1024);
    let origin = format!("\"{}\"", up.url());
    let p1 = start(&registry(&origin, ""), "", "10m").await;
    let p2 = start(&registry(&origin, ""), "", "10m").await;
    let parents = format!("{}, {}", mirror(&p1.url()), mirror(&p2.url()));
    let edge_cfg = registry(&parents, r#"balance = "consistent-hash""#);
    let e1 = start(&edge_cfg, "", "10m").await;
    let e2 = start(&edge_cfg, "", "10m").await;
    pull(&e1, &layers).await;
    pull(&e2, &layers).await;
    // The same blob always went to the same parent: one upstream fetch per blob.
    for (d, _) in &layers {
        assert_eq!(
            up.count(&format!("GET /v2/library/app/blobs/{d}")),
            1,
            "blob {d}"
        );
    }
    // And both parents hold a share of the cache.
    for p in [&p1, &p2] {
        let m = p.metrics_text().await;
        let blobs = sample(&m, "berth_cache_blobs");
        assert!(blobs >= 1.0, "parent {} holds no blob", p.url());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_fallback_only_when_primaries_are_down() {
    let up = FakeUpstream::start().await;
    let backup = FakeUpstream::start().await;
    let layers = seed(&up, 1, 1000);
    seed(&backup, 1, 1000);
    // A dead primary first: the request fails over to the live one.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = l.local_addr().expect("addr");
        drop(l);
        format!("http://{a}")
    };
    let b = start(
        &registry(
            &format!("\"{dead}\", \"{}\"", up.url()),
            &format!("fallback = [\"{}\"]", backup.url()),
        ),
        "",
        "10m",
    )
    .await;
    pull(&b, &layers).await;
    assert!(
        backup.requests().is_empty(),
        "fallback used while a primary was up"
    );
    let m = b.metrics_text().await;
    assert!(
        m.contains(&format!(
            r#"berth_upstream_up{{endpoint="{dead}",registry="docker.io"}} 0"#
        )),
        "{m}"
    );
    // Every primary down: the fallback serves.
    up.set(Behaviour::Status(503));
    let r = b.get("/v2/library/app/manifests/v1?ns=docker.io").await;
    assert_eq!(r.status(), 200);
    let r = b.get("/v2/library/app/tags/list").await;
    assert_eq!(r.status(), 200, "tags from the fallback");
    assert!(!backup.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_and_rate_limit_floor_stop_revalidation() {
    let up = FakeUpstream::start().await;
    seed(&up, 1, 1000);
    // A budget of one request per second: the first fetch spends it; the revalidation right
    // after is skipped and the cached manifest served.
    let b = start(
        &registry(
            &format!("\"{}\"", up.url()),
            "max_requests_per_second = 1\nburst = 1",
        ),
        "",
        "0s",
    )
    .await;
    assert_eq!(b.get("/v2/library/app/manifests/v1").await.status(), 200);
    assert_eq!(b.get("/v2/library/app/manifests/v1").await.status(), 200);
    assert_eq!(up.count("HEAD /v2/library/app/manifests/v1"), 0);
    assert!(
        b.metrics_text()
            .await
            .contains(r#"berth_cache_requests_total{kind="manifest",result="stale"} 1"#)
    );

    // The fake upstream reports 42 pulls remaining; a floor of 50 pauses revalidation.
    let up2 = FakeUpstream::start().await;
    seed(&up2, 1, 1000);
    let b2 = start(
        &registry(&format!("\"{}\"", up2.url()), "ratelimit_floor = 50"),
        "",
        "0s",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(b2.get("/v2/library/app/manifests/v1").await.status(), 200);
    }
    assert_eq!(up2.count("GET /v2/library/app/manifests/v1"), 1);
    assert_eq!(up2.count("HEAD /v2/library/app/manifests/v1"), 0);
    let m = b2.metrics_text().await;
    assert!(
        m.contains(r#"berth_upstream_ratelimit_remaining{registry="docker.io"} 42"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limit_answers_429() {
    let up = FakeUpstream::start().await;
    let layers = seed(&up, 1, 1000);
    let b = start(
        &registry(&format!("\"{}\"", up.url()), ""),
        "client_requests_per_second = 2\nclient_burst = 2",
        "10m",
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(b.get("/v2/").await.status().as_u16());
    }
    assert_eq!(&statuses[..2], &[200, 200]);
    let r = b
        .get(&format!("/v2/library/app/blobs/{}", layers[0].0))
        .await;
    assert_eq!(r.status(), 429, "the zero-copy blob path is limited too");
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(b.get("/v2/").await.status(), 200, "the limit refills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_rules_pick_endpoints_per_repository() {
    let public = FakeUpstream::start().await;
    let private = FakeUpstream::start().await;
    seed(&public, 1, 1000);
    let layers = {
        let b = random_bytes(5000, 99);
        let d = private.add_blob(b.clone());
        let config = private.add_blob(Bytes::from_static(b"{}"));
        private.add_image("myorg/app", "v1", &config, std::slice::from_ref(&d));
        vec![(d, b)]
    };
    let b = start(
        &registry(
            &format!("\"{}\"", public.url()),
            &format!(
                "[[registry.route]]\nmatch = \"myorg/*\"\nendpoints = [\"{}\"]",
                private.url()
            ),
        ),
        "",
        "10m",
    )
    .await;
    assert_eq!(b.get("/v2/myorg/app/manifests/v1").await.status(), 200);
    let r = b.get(&format!("/v2/myorg/app/blobs/{}", layers[0].0)).await;
    assert_eq!(r.bytes().await.expect("body"), layers[0].1);
    assert_eq!(b.get("/v2/library/app/manifests/v1").await.status(), 200);
    assert!(public.requests().iter().all(|r| !r.contains("myorg")));
    assert!(
        private
            .requests()
            .iter()
            .all(|r| !r.contains("library/app"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_probes_mark_endpoints_down_and_up_again() {
    let a = FakeUpstream::start().await;
    let b = FakeUpstream::start().await;
    seed(&a, 1, 1000);
    seed(&b, 1, 1000);
    let cfg = format!(
        r#"
        [[registry]]
        name = "docker.io"
        default = true
        endpoints = ["{}", "{}"]
        probe_interval = "300ms"
        "#,
        a.url(),
        b.url()
    );
    let berth = start(&cfg, "", "10m").await;
    let up_line = |url: &str, v: u8| {
        format!(r#"berth_upstream_up{{endpoint="{url}",registry="docker.io"}} {v}"#)
    };
    let wait_for = |line: String| {
        let berth = &berth;
        async move {
            for _ in 0..50 {
                if berth.metrics_text().await.contains(&line) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    // No client request at all: the probes alone notice A failing and coming back.
    a.set(Behaviour::Status(503));
    assert!(
        wait_for(up_line(&a.url(), 0)).await,
        "A not marked down by the probes"
    );
    assert!(a.count("GET /v2/") >= 1);
    a.set(Behaviour::Normal);
    assert!(
        wait_for(up_line(&a.url(), 1)).await,
        "A not marked up again by the probes"
    );
    assert!(berth.metrics_text().await.contains(&up_line(&b.url(), 1)));
}

/// A registry's only endpoint that stops accepting connections is marked down by the probes
/// alone (no client request), without any HTTP request reaching it while it was up; when it
/// accepts again, the HTTP probe marks it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_endpoint_that_stops_accepting_is_marked_down_without_requests() {
    let up = FakeUpstream::start().await;
    seed(&up, 1, 1000);
    let url = up.url();
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("port");
    let cfg = format!(
        r#"
        [[registry]]
        name = "docker.io"
        default = true
        endpoints = ["{}"]
        probe_interval = "200ms"
        connect_timeout = "500ms"
        "#,
        url
    );
    let berth = start(&cfg, "", "10m").await;
    let line = |v: u8| format!(r#"berth_upstream_up{{endpoint="{url}",registry="docker.io"}} {v}"#);
    // Up, and the connection checks send no request.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(berth.metrics_text().await.contains(&line(1)));
    assert_eq!(up.requests().len(), 0, "{:?}", up.requests());
    // The upstream goes away: its port no longer accepts.
    drop(up);
    let mut marked = false;
    for _ in 0..50 {
        if berth.metrics_text().await.contains(&line(0)) {
            marked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        marked,
        "the lone endpoint was not marked down by the probes"
    );
    // It comes back on the same port: the HTTP probe marks it up again.
    let back = FakeUpstream::start_on_port(port, Default::default()).await;
    let mut up_again = false;
    for _ in 0..50 {
        if berth.metrics_text().await.contains(&line(1)) {
            up_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up_again, "the endpoint was not marked up again");
    assert!(
        back.count("GET /v2/") >= 1,
        "no HTTP probe: {:?}",
        back.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_queue_for_the_budget_then_get_429() {
    let up = FakeUpstream::start().await;
    let config = up.add_blob(Bytes::from_static(b"{}"));
    for i in 0..10 {
        up.add_image(&format!("library/app{i}"), "v1", &config, &[]);
    }
    let b = start(
        &registry(
            &format!("\"{}\"", up.url()),
            "max_requests_per_second = 1\nburst = 1",
        ),
        "",
        "10m",
    )
    .await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let url = format!("{}/v2/library/app{i}/manifests/v1", b.url());
        let client = b.client().clone();
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await.expect("send");
            (
                r.status().as_u16(),
                r.headers().get("retry-after").is_some(),
            )
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.expect("task") {
            (200, _) => ok += 1,
            (429, true) => limited += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // One request a second, a 5 s queue: about six get through, the rest are refused —
    // never a stampede: upstream saw at most one request a second.
    assert!((4..=7).contains(&ok), "{ok} fetches got through");
    assert_eq!(ok + limited, 10);
    assert!(up.requests().len() <= ok + 1);
    assert!(started.elapsed() < Duration::from_secs(9));
}
