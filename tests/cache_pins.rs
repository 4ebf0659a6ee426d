//! Pins, pull counts, prune and max_idle (`berth pin`, `berth unpin`, `berth cache ls`,
//! `berth cache prune`, `[cache] max_idle` and `pin`), through the CLI against a running
//! berth's admin API with an upstream that records what it is asked.
//!
//! - Pinned blobs stay under eviction pressure (a 1 MiB `max_size`), survive a restart, and
//!   once pinned blobs fill `max_size`, a new fill is refused with 507 while `/readyz` stays
//!   200; unpinning makes room again.
//! - Pull counts and last-pulled times survive a restart; `cache ls` shows them.
//! - `cache prune --not-pulled-for` removes what was not pulled since, not what was or is
//!   pinned; `max_idle` evicts blobs not pulled for that long, never pinned ones.
//! - With `[admin] token_file`, no pin, unpin or prune without the token changes anything.

mod fake_upstream;
mod support;

use std::time::Duration;

use bytes::Bytes;
use fake_upstream::FakeUpstream;
use support::{InProc, InProcConfig};

fn cli(berth: &InProc, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .arg("--admin")
        .arg(berth.admin_url())
        .env_remove("BERTH_ADMIN_TOKEN")
        .output()
        .expect("run berth");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// An image of one config and one `size`-byte layer of `fill` bytes: (layer digest).
fn image(up: &FakeUpstream, repo: &str, fill: u8, size: usize) -> String {
    let layer = up.add_blob(Bytes::from(vec![fill; size]));
    let cfg = up.add_blob(Bytes::from(format!("{{\"image\":\"{repo}\"}}")));
    up.add_image(repo, "v1", &cfg, std::slice::from_ref(&layer));
    layer
}

/// Pulls `repo:v1` through berth: the manifest and every blob. Returns the statuses of the
/// blob GETs.
async fn pull(berth: &InProc, repo: &str) -> Vec<u16> {
    let r = berth.get(&format!("/v2/{repo}/manifests/v1")).await;
    assert_eq!(r.status(), 200, "manifest of {repo}");
    let m: serde_json::Value = r.json().await.expect("manifest");
    let mut digests = vec![m["config"]["digest"].as_str().unwrap_or("").to_owned()];
    for l in m["layers"].as_array().expect("layers") {
        digests.push(l["digest"].as_str().unwrap_or("").to_owned());
    }
    let mut statuses = Vec::new();
    for d in digests {
        let r = berth.get(&format!("/v2/{repo}/blobs/{d}")).await;
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        statuses.push(status);
    }
    statuses
}

fn on_disk(berth: &InProc, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    berth
        .cache_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists()
}

/// Waits (at most 10 s) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ls(berth: &InProc) -> Vec<serde_json::Value> {
    let (ok, out) = cli(berth, &["cache", "ls", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    v["images"].as_array().cloned().unwrap_or_default()
}

fn row<'a>(images: &'a [serde_json::Value], repo: &str) -> Option<&'a serde_json::Value> {
    images.iter().find(|i| i["repository"] == repo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_images_survive_eviction_and_restart_and_fill_the_cache_at_most() {
    let up = FakeUpstream::start().await;
    const K: usize = 300 * 1024;
    let pinned = image(&up, "library/base", 1, K);
    let others: Vec<String> = (0..4)
        .map(|i| image(&up, &format!("library/other{i}"), 10 + i as u8, K))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        InProcConfig::mirror_of(&up.url(), "probe_interval = \"0s\"").cache("max_size = \"1MiB\"");
    let berth = InProc::start_in(&config, dir.path()).await;
    assert!(pull(&berth, "library/base").await.iter().all(|s| *s == 200));
    eventually("the base layer is cached", || on_disk(&berth, &pinned)).await;
    let (ok, out) = cli(&berth, &["pin", "base:v1"]);
    assert!(
        ok && out.contains("pinned docker.io/library/base:v1"),
        "{out}"
    );
    // Eviction pressure: 4 × 300 KiB more through a 1 MiB cache.
    for i in 0..4 {
        assert!(
            pull(&berth, &format!("library/other{i}"))
                .await
                .iter()
                .all(|s| *s == 200)
        );
    }
    eventually("an unpinned blob is evicted", || {
        !on_disk(&berth, &others[0])
    })
    .await;
    assert!(on_disk(&berth, &pinned), "the pinned layer was evicted");
    let images = ls(&berth);
    assert_eq!(
        row(&images, "library/base").expect("base listed")["pinned"],
        true
    );
    assert_eq!(
        row(&images, "library/other3").expect("other3 listed")["pinned"],
        false
    );
    let metrics = berth.metrics_text().await;
    assert!(metrics.contains("berth_cache_pinned_bytes "), "{metrics}");
    berth.stop().await;

    // After a restart: still pinned, still there under pressure.
    let berth = InProc::start_in(&config, dir.path()).await;
    let (ok, out) = cli(&berth, &["pin", "base:v1"]);
    assert!(ok, "{out}");
    for i in 0..4 {
        pull(&berth, &format!("library/other{i}")).await;
    }
    assert!(
        on_disk(&berth, &pinned),
        "the pinned layer was evicted after a restart"
    );
    let r = berth
        .client()
        .get(format!("{}/admin/pins", berth.admin_url()))
        .send()
        .await
        .expect("pins");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["pins"][0]["image"], "docker.io/library/base:v1", "{v}");

    // Pin so much that pinned blobs fill max_size: a new fill is refused with 507 and the
    // cache does not grow past max_size by more than one blob.
    let big: Vec<String> = (0..3)
        .map(|i| image(&up, &format!("library/big{i}"), 50 + i as u8, K))
        .collect();
    for i in 0..3 {
        let repo = format!("big{i}:v1");
        let (ok, out) = cli(&berth, &["pin", &repo]);
        assert!(ok, "{out}");
        pull(&berth, &format!("library/big{i}")).await;
    }
    for b in &big {
        eventually("a pinned blob is cached", || on_disk(&berth, b)).await;
    }
    let fresh = image(&up, "library/fresh", 99, 1000);
    let statuses = pull(&berth, "library/fresh").await;
    assert!(statuses.contains(&507), "{statuses:?}");
    assert!(!on_disk(&berth, &fresh));
    let r = berth
        .client()
        .get(format!("{}/readyz", berth.admin_url()))
        .send()
        .await
        .expect("readyz");
    assert_eq!(r.status(), 200);
    assert!(berth.logs().contains("pinned blobs fill cache.max_size"));
    let size = |t: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix("berth_cache_size_bytes "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let metrics = berth.metrics_text().await;
    assert!(
        size(&metrics) <= (1024 * 1024 + K + 200) as f64,
        "{metrics}"
    );

    // Unpinning makes room: the fill goes through again.
    let (ok, out) = cli(&berth, &["unpin", "big0:v1", "big1:v1", "big2:v1"]);
    assert!(
        ok && out.contains("unpinned docker.io/library/big2:v1"),
        "{out}"
    );
    let statuses = pull(&berth, "library/fresh").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        on_disk(&berth, &pinned),
        "the still pinned layer was evicted"
    );
    // A pinned image is not purged by cache rm.
    let (ok, out) = cli(&berth, &["cache", "rm", "base:v1"]);
    assert!(!ok && out.contains("is pinned"), "{out}");
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_counts_survive_restart_and_prune_removes_what_was_not_pulled() {
    let up = FakeUpstream::start().await;
    let old = image(&up, "library/old", 1, 2000);
    let recent = image(&up, "library/recent", 2, 2000);
    let kept = image(&up, "library/kept", 3, 2000);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = InProcConfig::mirror_of(&up.url(), "probe_interval = \"0s\"");
    let berth = InProc::start_in(&config, dir.path()).await;
    for repo in ["library/old", "library/kept"] {
        pull(&berth, repo).await;
    }
    for _ in 0..2 {
        pull(&berth, "library/recent").await;
    }
    let (ok, out) = cli(&berth, &["pin", "kept:v1"]);
    assert!(ok, "{out}");
    let images = ls(&berth);
    assert_eq!(row(&images, "library/recent").expect("recent")["pulls"], 2);
    assert_eq!(row(&images, "library/old").expect("old")["pulls"], 1);
    berth.stop().await;

    // Counts come back after a restart.
    let berth = InProc::start_in(&config, dir.path()).await;
    let images = ls(&berth);
    let r = row(&images, "library/recent").expect("recent after restart");
    assert_eq!(r["pulls"], 2, "{r}");
    assert!(r["last_pulled"].as_u64().is_some(), "{r}");
    let (ok, table) = cli(&berth, &["cache", "ls", "--sort", "pulls"]);
    assert!(ok, "{table}");
    let first = table.lines().nth(1).unwrap_or("");
    assert!(
        first.contains("library/recent"),
        "most pulled first: {table}"
    );
    let (ok, table) = cli(&berth, &["cache", "ls", "--sort", "last-pulled"]);
    assert!(ok && table.contains("PINNED"), "{table}");

    // Age: "old" and "kept" not pulled for 3 s, "recent" pulled just now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    pull(&berth, "library/recent").await;
    let (ok, dry) = cli(
        &berth,
        &["cache", "prune", "--not-pulled-for", "2s", "--dry-run"],
    );
    assert!(ok, "{dry}");
    assert!(
        dry.contains("would remove image docker.io/library/old:v1"),
        "{dry}"
    );
    assert!(
        !dry.contains("library/recent") && !dry.contains("library/kept"),
        "{dry}"
    );
    assert!(on_disk(&berth, &old));
    let (ok, done) = cli(&berth, &["cache", "prune", "--not-pulled-for", "2s"]);
    assert!(ok, "{done}");
    assert!(done.contains(&format!("removed blob {old}")), "{done}");
    assert!(!on_disk(&berth, &old));
    assert!(on_disk(&berth, &recent) && on_disk(&berth, &kept));
    let images = ls(&berth);
    assert!(row(&images, "library/old").is_none());
    let (ok, out) = cli(&berth, &["cache", "prune", "--not-pulled-for", "soon"]);
    assert!(!ok && out.contains("not a duration"), "{out}");
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_idle_evicts_blobs_not_pulled_and_never_pinned_ones() {
    let up = FakeUpstream::start().await;
    let idle = image(&up, "library/idle", 1, 2000);
    let busy = image(&up, "library/busy", 2, 2000);
    let pinned = image(&up, "library/pinned", 3, 2000);
    let berth = InProc::start(
        &InProcConfig::mirror_of(&up.url(), "probe_interval = \"0s\"")
            .cache("max_idle = \"3s\"\npin = [\"docker.io/library/pinned:v1\"]"),
    )
    .await;
    for repo in ["library/idle", "library/busy", "library/pinned"] {
        pull(&berth, repo).await;
    }
    // "busy" is pulled every 500 ms; the others are left alone.
    let started = std::time::Instant::now();
    while on_disk(&berth, &idle) && started.elapsed() < Duration::from_secs(10) {
        let r = berth.get(&format!("/v2/library/busy/blobs/{busy}")).await;
        let _ = r.bytes().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!on_disk(&berth, &idle), "an idle blob outlived max_idle");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "evicted before max_idle: {:?}",
        started.elapsed()
    );
    assert!(
        on_disk(&berth, &busy),
        "a blob pulled within max_idle was evicted"
    );
    assert!(
        on_disk(&berth, &pinned),
        "a pinned blob was evicted for idleness"
    );
    // A configured pin cannot be unpinned at run time.
    let (ok, out) = cli(&berth, &["unpin", "pinned:v1"]);
    assert!(!ok && out.contains("[cache] pin"), "{out}");
    let metrics = berth.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("berth_cache_evictions_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_no_pin_unpin_or_prune_changes_anything_without_it() {
    let up = FakeUpstream::start().await;
    let layer = image(&up, "library/app", 1, 2000);
    let token_dir = tempfile::tempdir().expect("tempdir");
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "a-long-enough-admin-token-1234\n").expect("token");
    let berth = InProc::start(
        &InProcConfig::mirror_of(&up.url(), "probe_interval = \"0s\"").table(&format!(
            "[admin]\ntoken_file = \"{}\"\n",
            token_file.display()
        )),
    )
    .await;
    pull(&berth, "library/app").await;
    eventually("the layer is cached", || on_disk(&berth, &layer)).await;
    let image = "docker.io/library/app:v1";
    let calls = [
        format!("/admin/pin?image={image}"),
        format!("/admin/unpin?image={image}"),
        "/admin/cache/prune?not_pulled_for=0s".to_owned(),
    ];
    for auth in [None, Some("wrong-token-wrong-token-wrong")] {
        for path in &calls {
            let mut req = berth.client().post(format!("{}{path}", berth.admin_url()));
            if let Some(t) = auth {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.expect("admin");
            assert_eq!(r.status(), 401, "{path} with {auth:?}");
        }
    }
    assert!(
        !berth.cache_dir().join("pins.json").exists(),
        "pinned without the token"
    );
    assert!(on_disk(&berth, &layer), "pruned without the token");
    // With the token, from the CLI's --token-file: both work.
    let tf = token_file.to_str().expect("path");
    let (ok, out) = cli(&berth, &["pin", "app:v1", "--token-file", tf]);
    assert!(ok, "{out}");
    assert!(berth.cache_dir().join("pins.json").exists());
    let (ok, out) = cli(&berth, &["unpin", "app:v1", "--token-file", tf]);
    assert!(ok && out.contains("unpinned"), "{out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, out) = cli(
        &berth,
        &[
            "cache",
            "prune",
            "--not-pulled-for",
            "1s",
            "--token-file",
            tf,
        ],
    );
    assert!(ok, "{out}");
    assert!(!on_disk(&berth, &layer), "{out}");
    berth.stop().await;
}

/// Pinning an image while its blob is being filled pins the blob as it lands; purging an image
/// while a client streams one of its blobs lets the stream finish whole (the file goes at once,
/// the open handle keeps reading).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_during_a_fill_and_purge_during_a_stream() {
    use futures_util::StreamExt;
    let up = FakeUpstream::start().await;
    const M: usize = 1024 * 1024;
    let slow = image(&up, "library/slow", 7, 2 * M);
    let big = image(&up, "library/big", 8, 16 * M);
    let berth = InProc::start(&InProcConfig::mirror_of(
        &up.url(),
        "probe_interval = \"0s\"",
    ))
    .await;

    // 2 MiB in 64 KiB pieces 20 ms apart: the fill takes about 0.6 s.
    up.set(fake_upstream::Behaviour::Slow(Duration::from_millis(20)));
    let r = berth.get("/v2/library/slow/manifests/v1").await;
    assert_eq!(r.status(), 200);
    let url = format!("{}/v2/library/slow/blobs/{slow}", berth.url());
    let client = berth.client().clone();
    let fill =
        tokio::spawn(async move { client.get(url).send().await.expect("get").bytes().await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!on_disk(&berth, &slow), "the fill was over before the pin");
    let (ok, out) = cli(&berth, &["pin", "slow:v1"]);
    assert!(ok, "{out}");
    let body = fill.await.expect("task").expect("body");
    assert_eq!(fake_upstream::sha256(&body), slow);
    up.set(fake_upstream::Behaviour::Normal);
    eventually("the blob filled during the pin is cached", || {
        on_disk(&berth, &slow)
    })
    .await;
    let metrics = berth.metrics_text().await;
    let pinned: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("berth_cache_pinned_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(pinned >= (2 * M) as f64, "pinned bytes {pinned}");

    // A cached 16 MiB blob, read slowly while its image is purged.
    pull(&berth, "library/big").await;
    eventually("the big layer is cached", || on_disk(&berth, &big)).await;
    let r = berth.get(&format!("/v2/library/big/blobs/{big}")).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut got = Vec::with_capacity(16 * M);
    let first = stream.next().await.expect("a first chunk").expect("chunk");
    got.extend_from_slice(&first);
    let (ok, out) = cli(&berth, &["cache", "rm", "big:v1"]);
    assert!(ok && out.contains(&format!("removed blob {big}")), "{out}");
    assert!(
        !on_disk(&berth, &big),
        "the purged blob's file is still there"
    );
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.expect("the stream of a purged blob completes"));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(got.len(), 16 * M);
    assert_eq!(fake_upstream::sha256(&got), big);
    berth.stop().await;
}

/// `[cache] pin` images are fetched at start, and `berth pin` of an image not cached yet
/// fetches it (manifests at once, blobs by a warm job), with no client pulling either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_images_are_fetched_without_a_pull() {
    let up = FakeUpstream::start().await;
    let at_start = image(&up, "library/at-start", 1, 3000);
    let later = image(&up, "library/later", 2, 3000);
    let berth = InProc::start(
        &InProcConfig::mirror_of(&up.url(), "probe_interval = \"0s\"")
            .cache("pin = [\"docker.io/library/at-start:v1\"]"),
    )
    .await;
    eventually("the configured pin is fetched at start", || {
        on_disk(&berth, &at_start)
    })
    .await;
    let (ok, out) = cli(&berth, &["pin", "later:v1"]);
    assert!(ok && out.contains("/admin/warm/"), "{out}");
    eventually("a new pin is fetched", || on_disk(&berth, &later)).await;
    assert_eq!(up.count(&format!("GET /v2/library/later/blobs/{later}")), 1);
    let images = ls(&berth);
    for repo in ["library/at-start", "library/later"] {
        let r = row(&images, repo).expect("listed");
        assert_eq!(r["pinned"], true, "{r}");
        assert_eq!(r["pulls"], 0, "a fetch for a pin is not a pull: {r}");
    }
    berth.stop().await;
}

/// A pinned multi-platform image covers the index children of `[cache] platforms` only: with
/// `platforms = ["linux/arm64"]`, the arm64 layer stays under eviction pressure and the amd64
/// one (pulled too) is evicted like any other blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_index_covers_the_configured_platforms() {
    let up = FakeUpstream::start().await;
    const K: usize = 300 * 1024;
    let child = |arch: &str, fill: u8| {
        let layer = up.add_blob(Bytes::from(vec![fill; K]));
        let cfg = up.add_blob(Bytes::from(format!("{{\"architecture\":\"{arch}\"}}")));
        let (digest, bytes) =
            up.add_image("library/multi", arch, &cfg, std::slice::from_ref(&layer));
        (layer, digest, bytes.len())
    };
    let (amd_layer, amd, amd_len) = child("amd64", 1);
    let (arm_layer, arm, arm_len) = child("arm64", 2);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd, "size": amd_len,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm, "size": arm_len,
             "platform": {"os": "linux", "architecture": "arm64"}},
        ],
    });
    up.add_manifest(
        "library/multi",
        "v1",
        "application/vnd.oci.image.index.v1+json",
        Bytes::from(serde_json::to_vec(&index).expect("json")),
    );
    for i in 0..4 {
        image(&up, &format!("library/other{i}"), 10 + i as u8, K);
    }
    let berth = InProc::start(
        &InProcConfig::mirror_of(&up.url(), "probe_interval = \"0s\"")
            .cache("max_size = \"1MiB\"\nplatforms = [\"linux/arm64\"]"),
    )
    .await;
    let (ok, out) = cli(&berth, &["pin", "multi:v1"]);
    assert!(ok, "{out}");
    eventually("the arm64 layer is fetched for the pin", || {
        on_disk(&berth, &arm_layer)
    })
    .await;
    assert_eq!(
        up.count(&format!("GET /v2/library/multi/blobs/{amd_layer}")),
        0,
        "the pin fetched a platform it does not cover"
    );
    // A client pulls the amd64 child too; then pressure.
    let r = berth
        .get(&format!("/v2/library/multi/blobs/{amd_layer}"))
        .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    eventually("the amd64 layer is cached", || on_disk(&berth, &amd_layer)).await;
    for i in 0..4 {
        pull(&berth, &format!("library/other{i}")).await;
    }
    eventually("the amd64 layer is evicted", || {
        !on_disk(&berth, &amd_layer)
    })
    .await;
    assert!(
        on_disk(&berth, &arm_layer),
        "the pinned platform's layer was evicted"
    );
    berth.stop().await;
}
