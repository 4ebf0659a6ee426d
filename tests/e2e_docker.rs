//! End to end with real programs: Debian's `docker-registry` (CNCF distribution) as the
//! upstream, the berth binary, and a real `dockerd` whose `--registry-mirror` is berth.
//! The programs are installed by tests/setup.sh; a missing one fails the test.

mod support;

use support::*;

#[test]
fn dockerd_pulls_through_berth_and_from_cache_when_upstream_is_gone() {
    // Rate-limit headers as Docker Hub sends them: berth exports the last
    // `ratelimit-remaining` (berth_upstream_ratelimit_remaining, which exists only once an
    // upstream has sent one), so the metrics dump below has every family berth can export.
    let mut registry = Registry::start_with_headers(&[
        ("RateLimit-Limit", "100;w=21600"),
        (
            "RateLimit-Remaining",
            &format!("{RATELIMIT_REMAINING};w=21600"),
        ),
    ]);
    let image = seed_image(&registry, "library/app", "v1", 3);
    let index = seed_index(&registry, "library/multi", "v1");
    let berth = Berth::start_mirror(&registry.url());
    let docker = Dockerd::start(&berth.url());

    // Cold: everything comes through berth, each blob fetched from upstream once.
    docker
        .pull("library/app:v1")
        .expect("pull app through berth");
    docker
        .pull("library/multi:v1")
        .expect("pull the multi-arch index through berth");
    for (d, _) in image.blobs() {
        assert_eq!(
            registry.blob_gets("library/app", d),
            1,
            "upstream GETs of {d}"
        );
    }
    let amd64 = index.image("amd64");
    for (d, _) in amd64.blobs() {
        assert_eq!(
            registry.blob_gets("library/multi", d),
            1,
            "upstream GETs of {d}"
        );
    }
    let file = &image.layers[2].files[0];
    assert_eq!(
        docker
            .read_file("library/app:v1", &format!("/{}", file.0))
            .expect("read a file of the image"),
        file.1
    );

    // Upstream gone; local images removed: the pulls are served from berth's cache alone.
    registry.stop();
    docker.rmi("library/app:v1").expect("rmi app");
    docker.rmi("library/multi:v1").expect("rmi multi");
    docker
        .pull("library/app:v1")
        .expect("pull app from berth's cache, upstream down");
    docker
        .pull("library/multi:v1")
        .expect("pull multi from berth's cache, upstream down");
    assert!(docker.has_image("library/app:v1"));
    assert_eq!(
        docker
            .read_file("library/app:v1", &format!("/{}", file.0))
            .expect("read after re-pull"),
        file.1
    );

    // The figures berth exports agree with what happened, and are valid exposition format.
    let metrics = http_get_text(berth.admin_addr(), "/metrics").expect("metrics");
    // tests/run.sh checks the dashboard's and the alerts' metric names against this dump
    // (tests/chart.sh with BERTH_METRICS_FILE).
    let dump = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/metrics-e2e.txt");
    std::fs::create_dir_all(dump.parent().expect("target dir")).expect("mkdir target");
    std::fs::write(&dump, &metrics).unwrap_or_else(|e| panic!("write {}: {e}", dump.display()));
    let blobs = image.blobs().len() + amd64.blobs().len();
    assert_eq!(
        sample(
            &metrics,
            r#"berth_cache_requests_total{kind="blob",result="miss"}"#
        ),
        blobs as f64,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"berth_cache_requests_total{kind="blob",result="hit"}"#
        ),
        blobs as f64
    );
    assert_eq!(
        sample(
            &metrics,
            r#"berth_upstream_ratelimit_remaining{registry="docker.io"}"#
        ),
        RATELIMIT_REMAINING as f64,
        "{metrics}"
    );
    promtool_check(&metrics);
}

/// What the upstream says is left of its rate limit.
const RATELIMIT_REMAINING: u32 = 76;

#[test]
fn berth_starts_and_serves_with_upstream_unreachable() {
    // The established mirror panics at start-up here; berth starts, is ready, and answers
    // with a clean OCI error.
    let dead = format!("http://{}", free_addr());
    let berth = Berth::start_mirror(&dead);
    assert_eq!(
        http_status(berth.admin_addr(), "/readyz").expect("readyz"),
        200
    );
    assert_eq!(http_status(berth.addr(), "/v2/").expect("ping"), 200);
    let status = http_status(berth.addr(), "/v2/library/app/manifests/v1").expect("manifest");
    assert_eq!(status, 502);
}
