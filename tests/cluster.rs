//! Three berth replicas sharing one real object store and coordinating fills among themselves,
//! in front of a real upstream registry (CNCF distribution) — or, to kill a replica mid-fill, a
//! slow in-process upstream.
//!
//! The shared-tier scenarios run against each backend berth speaks, each a real server on
//! loopback: Garage (S3), Azurite (Azure Blob Storage) and fake-gcs-server (Google Cloud
//! Storage) — the same test bodies, as `garage::…`, `azurite::…` and `fake_gcs::…` (see
//! [`on_each_store`]). The cluster-only scenarios (a killed or frozen owner, TLS peers) run on
//! Garage.
//!
//! The hosted registry on the object store (`hosted_…`) runs on each backend too: pushes in
//! the bucket when the 201 arrives, served by a replica with an empty disk, refused with the
//! store down, deleted and collected from the bucket.
//!
//! The credentials a config leaves to the environment — GCS's metadata server, Azure's managed
//! and workload identity — are tested in [`identity`], against fakes of those services.
//!
//! Needs `garage`, Azurite, fake-gcs-server (all installed by tests/setup.sh) and
//! `docker-registry`; a missing program fails.

mod fake_upstream;
#[path = "cluster/identity.rs"]
mod identity;
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_upstream::sha256;
use sha2::{Digest as _, Sha256};
use support::{
    Berth, Garage, Image, Registry, StoreServer, free_addr, on_each_store, seed_blob_image,
};

/// What dockerd and containerd send: every manifest type.
const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json, \
                      application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.oci.image.index.v1+json";

/// Three replicas' configs: same peers, same bucket, each its own cache dir and ports.
struct Replicas {
    addrs: Vec<std::net::SocketAddr>,
    berths: Vec<Berth>,
}

/// Where the replicas keep their objects in the bucket.
const PREFIX: &str = "berth-test";

fn replica_config(
    addrs: &[std::net::SocketAddr],
    i: usize,
    upstream: &str,
    store: &dyn StoreServer,
    cache_dir: &std::path::Path,
) -> String {
    replica_config_with(addrs, i, upstream, &store.berth_keys(PREFIX), cache_dir)
}

/// [`replica_config`] with `store_keys` as the `[cache.object_store]` table's keys.
fn replica_config_with(
    addrs: &[std::net::SocketAddr],
    i: usize,
    upstream: &str,
    store_keys: &str,
    cache_dir: &std::path::Path,
) -> String {
    let peers: Vec<String> = addrs.iter().map(|a| format!("\"http://{a}\"")).collect();
    let cluster = if addrs.len() > 1 {
        format!(
            "[cluster]\npeers = [{}]\nprobe_interval = \"300ms\"\nconnect_timeout = \"500ms\"\n\
             read_timeout = \"5s\"\n",
            peers.join(", ")
        )
    } else {
        String::new()
    };
    format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
shutdown_grace = "2s"

[cache]
dir = "{cache}"
max_size = "1GiB"
tag_ttl = "10m"

[cache.object_store]
{store}
{cluster}
[[registry]]
name = "docker.io"
default = true
endpoints = ["{upstream}"]
read_timeout = "10s"
"#,
        listen = addrs[i],
        admin = free_addr(),
        cache = cache_dir.display(),
        store = store_keys,
    )
}

/// Starts berth with `config` and the environment `store` needs.
fn start_berth(config: &str, store: &dyn StoreServer) -> Berth {
    let env = store.berth_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Berth::start_with_env(config, &env)
}

/// One berth on the shared store, outside any cluster (nobody to ask but the store and upstream).
fn single_replica(upstream: &str, store: &dyn StoreServer, cache_dir: &std::path::Path) -> Berth {
    start_berth(
        &replica_config(&[free_addr()], 0, upstream, store, cache_dir),
        store,
    )
}

impl Replicas {
    fn start(upstream: &str, store: &dyn StoreServer, dirs: &tempfile::TempDir) -> Replicas {
        let addrs: Vec<_> = (0..3).map(|_| free_addr()).collect();
        Replicas::start_on(addrs, upstream, store, dirs)
    }

    fn start_on(
        addrs: Vec<std::net::SocketAddr>,
        upstream: &str,
        store: &dyn StoreServer,
        dirs: &tempfile::TempDir,
    ) -> Replicas {
        let berths = (0..3)
            .map(|i| {
                let cache = dirs.path().join(format!("replica-{i}"));
                let config = replica_config(&addrs, i, upstream, store, &cache);
                start_berth(&config, store)
            })
            .collect();
        let r = Replicas { addrs, berths };
        r.wait_peers();
        r
    }

    /// Waits until every replica sees all three (itself included) answering.
    fn wait_peers(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for b in &self.berths {
            loop {
                if metric(&admin_metrics(b), "berth_cluster_peers_up") == 3.0 {
                    // Ready once it knows the owners.
                    assert_eq!(
                        support::http_status(b.admin_addr(), "/readyz").ok(),
                        Some(200)
                    );
                    break;
                }
                assert!(Instant::now() < deadline, "replicas never saw each other");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn urls(&self) -> Vec<String> {
        self.berths.iter().map(Berth::url).collect()
    }

    /// The replicas in the order they own `digest` (rendezvous hashing on the peer URL).
    fn owner_order(&self, digest: &str) -> Vec<usize> {
        let mut scored: Vec<(Vec<u8>, usize)> = self
            .addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut h = Sha256::new();
                h.update(format!("http://{a}\n{digest}").as_bytes());
                (h.finalize().to_vec(), i)
            })
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0));
        scored.into_iter().map(|(_, i)| i).collect()
    }
}

fn admin_metrics(b: &Berth) -> String {
    support::http_get_text(b.admin_addr(), "/metrics").unwrap_or_default()
}

/// Sum of every sample of `name` whose labels contain all of `labels`.
fn metric_with(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.split_whitespace().next().unwrap_or("");
            (series == name || series.starts_with(&format!("{name}{{")))
                && labels.iter().all(|want| series.contains(want))
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

fn metric(text: &str, name: &str) -> f64 {
    metric_with(text, name, &[])
}

/// Pulls `repo:tag` through `base` like a client: manifest, then config and layers (at once),
/// verifying every blob against its digest. Returns the digests fetched.
async fn pull(client: &reqwest::Client, base: &str, repo: &str, tag: &str) -> Vec<String> {
    let resp = client
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", ACCEPT)
        .send()
        .await
        .expect("manifest request");
    assert_eq!(resp.status(), 200, "manifest of {repo}:{tag} from {base}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&resp.bytes().await.expect("manifest body")).expect("json");
    let mut digests = vec![
        manifest["config"]["digest"]
            .as_str()
            .expect("config")
            .to_owned(),
    ];
    for l in manifest["layers"].as_array().expect("layers") {
        digests.push(l["digest"].as_str().expect("digest").to_owned());
    }
    let gets = digests.iter().map(|d| async move {
        let resp = client
            .get(format!("{base}/v2/{repo}/blobs/{d}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("blob {d} from {base}: {e}"));
        assert_eq!(resp.status(), 200, "blob {d} from {base}");
        let body = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("blob {d} body from {base}: {e}"));
        assert_eq!(&sha256(&body), d, "blob {d} from {base} is verified");
    });
    futures_util::future::join_all(gets).await;
    digests
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

/// One pull of `image` through `base` (see [`pull`]).
fn pull_once(base: &str, image: &Image) {
    runtime().block_on(pull(&reqwest::Client::new(), base, &image.name, &image.tag));
}

/// 8 concurrent pulls on each of 3 replicas at once.
fn pull_everywhere(urls: &[String], image: &Image) -> Vec<String> {
    runtime().block_on(async {
        let client = reqwest::Client::new();
        let pulls = (0..24).map(|i| {
            let (client, base) = (client.clone(), urls[i % urls.len()].clone());
            let (repo, tag) = (image.name.clone(), image.tag.clone());
            async move { pull(&client, &base, &repo, &tag).await }
        });
        let all = futures_util::future::join_all(pulls).await;
        all.into_iter().next().expect("24 pulls")
    })
}

/// Waits (bounded) until the replicas' object-store request counters have stood still for a
/// second (their background uploads done), and returns their sum.
fn settled_store_requests(berths: &[Berth]) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let total = || -> f64 {
        berths
            .iter()
            .map(|b| metric(&admin_metrics(b), "berth_object_store_requests_total"))
            .sum()
    };
    let (mut last, mut still) = (total(), 0);
    while still < 4 {
        assert!(
            Instant::now() < deadline,
            "object-store requests never settled"
        );
        std::thread::sleep(Duration::from_millis(250));
        let now = total();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    last
}

/// Waits (bounded) until the store holds every blob of `image`, its manifest and tag.
fn wait_stored(store: &dyn StoreServer, image: &Image) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys: Vec<String> = store
            .list_keys("berth-test/")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let missing: Vec<String> = image
            .blobs()
            .iter()
            .map(|(d, _)| format!("berth-test/blobs/sha256/{}", &d[7..]))
            .chain([format!(
                "berth-test/manifests/docker.io/{}/_tags/{}",
                image.name, image.tag
            )])
            .filter(|k| !keys.contains(k))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not in {}: {missing:?} (have {keys:?})",
            store.name()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

on_each_store!(
    replicas_fetch_each_blob_once_and_share_it_through_the_object_store,
    all_replicas_restarted_with_empty_disks_pull_from_the_object_store_alone,
    object_store_down_hot_tier_serves_and_new_fills_still_stream,
    a_damaged_blob_in_the_store_is_never_served_and_gets_replaced,
    a_blob_that_fails_its_digest_never_reaches_the_store,
    more_fills_than_upload_slots_all_reach_the_store_verified,
    hosted_pushes_are_in_the_bucket_before_the_201_and_an_empty_replica_serves_them,
    a_purged_image_leaves_the_bucket_and_no_replica_restores_it,
);

fn replicas_fetch_each_blob_once_and_share_it_through_the_object_store<S: StoreServer>() {
    let store = S::start();
    let store: &dyn StoreServer = &store;
    let upstream = Registry::start();
    // One layer above the single-PUT size (a multipart upload), two below.
    let image = seed_blob_image(
        &upstream,
        "library/shared",
        "v1",
        &[12 * 1024 * 1024, 3 * 1024 * 1024, 200 * 1024],
    );
    let dirs = tempfile::tempdir().expect("tempdir");
    let replicas = Replicas::start(&upstream.url(), store, &dirs);
    let urls = replicas.urls();

    let served_before = store.requests_logged();
    let digests = pull_everywhere(&urls, &image);
    assert_eq!(digests.len(), 4);
    // berth's request counters are the server's own count (before the test's listing below).
    let counted = settled_store_requests(&replicas.berths);
    assert_eq!(
        (store.requests_logged() - served_before) as f64,
        counted,
        "{} logged other than the {counted} requests the replicas counted",
        store.name()
    );
    for (d, _) in image.blobs() {
        assert_eq!(
            upstream.blob_gets("library/shared", d),
            1,
            "blob {d}: exactly one upstream GET across 3 replicas × 8 pulls"
        );
    }
    wait_stored(store, &image);
    // Every stored blob is the verified bytes under its digest.
    for (d, bytes) in image.blobs() {
        let key = format!("berth-test/blobs/sha256/{}", &d[7..]);
        let stored = store.get_object(&key).expect("stored blob");
        assert_eq!(stored.len(), bytes.len(), "{key}");
        assert_eq!(sha256(&stored), d, "{key}");
    }
    // The cost, for BENCHMARKS.md: object-store requests per blob pulled.
    let totals: Vec<String> = replicas.berths.iter().map(admin_metrics).collect();
    // tests/run.sh checks the dashboard's and the alerts' cluster metrics against this dump
    // (tests/chart.sh with BERTH_CLUSTER_METRICS_FILE).
    support::promtool_check(&totals[0]);
    // Each backend's run writes it; one rename, so a reader sees one whole dump.
    let dump = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/metrics-cluster.txt");
    let part = dump.with_extension(format!("txt.{}", store.name()));
    std::fs::create_dir_all(dump.parent().expect("target dir")).expect("mkdir target");
    std::fs::write(&part, &totals[0]).unwrap_or_else(|e| panic!("write {}: {e}", part.display()));
    std::fs::rename(&part, &dump).unwrap_or_else(|e| panic!("rename to {}: {e}", dump.display()));
    let requests: f64 = totals
        .iter()
        .map(|t| metric(t, "berth_object_store_requests_total"))
        .sum();
    let peer_ok: f64 = totals
        .iter()
        .map(|t| metric_with(t, "berth_peer_requests_total", &["result=\"ok\""]))
        .sum();
    eprintln!(
        "{}: cold pull of {} blobs, 3 replicas x 8 clients: {requests} object-store requests in \
         all ({:.1} per blob, manifests and tags included), {peer_ok} blob requests to owners",
        store.name(),
        digests.len(),
        requests / digests.len() as f64
    );
    for op in ["get", "head", "put", "multipart", "part"] {
        for result in ["ok", "not_found", "error"] {
            let label = [
                format!("operation=\"{op}\""),
                format!("result=\"{result}\""),
            ];
            let labels: Vec<&str> = label.iter().map(String::as_str).collect();
            let n: f64 = totals
                .iter()
                .map(|t| metric_with(t, "berth_object_store_requests_total", &labels))
                .sum();
            if n > 0.0 {
                eprintln!("  {} {op} {result}: {n}", store.name());
            }
        }
    }
    assert!(peer_ok >= 1.0, "non-owners asked the owners");

    // Warm: a replica that never had a blob on disk reads it from the store, not upstream.
    let before = upstream.access_log().len();
    let dirs2 = tempfile::tempdir().expect("tempdir");
    let fresh = single_replica(&upstream.url(), store, &dirs2.path().join("c"));
    let served_before = store.requests_logged();
    pull_once(&fresh.url(), &image);
    let m = admin_metrics(&fresh);
    assert_eq!(
        (store.requests_logged() - served_before) as f64,
        metric(&m, "berth_object_store_requests_total"),
        "{}: the warm pull's requests as counted by the server and by berth",
        store.name()
    );
    eprintln!(
        "{}: warm pull of {} blobs through a replica with an empty disk: {} object-store requests",
        store.name(),
        digests.len(),
        metric(&m, "berth_object_store_requests_total")
    );
    assert_eq!(
        upstream.access_log().len(),
        before,
        "a fresh replica pulled everything from the object store: {:?}",
        &upstream.access_log()[before..]
    );
}

fn all_replicas_restarted_with_empty_disks_pull_from_the_object_store_alone<S: StoreServer>() {
    let store = S::start();
    let store: &dyn StoreServer = &store;
    let mut upstream = Registry::start();
    let image = seed_blob_image(
        &upstream,
        "library/restart",
        "v1",
        &[9 * 1024 * 1024, 1024 * 1024],
    );
    let dirs = tempfile::tempdir().expect("tempdir");
    let mut replicas = Replicas::start(&upstream.url(), store, &dirs);
    pull_everywhere(&replicas.urls(), &image);
    wait_stored(store, &image);
    for b in &mut replicas.berths {
        b.stop();
    }
    let addrs = replicas.addrs.clone();
    drop(replicas);

    // Upstream gone too: everything comes from the store.
    let before = upstream.access_log().len();
    let upstream_url = upstream.url();
    upstream.stop();
    let empty = tempfile::tempdir().expect("tempdir");
    let replicas = Replicas::start_on(addrs, &upstream_url, store, &empty);
    pull_everywhere(&replicas.urls(), &image);
    let after = upstream.access_log();
    assert_eq!(
        after.len(),
        before,
        "restarted replicas with empty disks asked upstream: {:?}",
        &after[before..]
    );
    for b in &replicas.berths {
        let m = admin_metrics(b);
        assert_eq!(metric(&m, "berth_upstream_requests_total"), 0.0);
    }
}

fn object_store_down_hot_tier_serves_and_new_fills_still_stream<S: StoreServer>() {
    let mut store = S::start();
    let upstream = Registry::start();
    let first = seed_blob_image(&upstream, "library/hot", "v1", &[2 * 1024 * 1024]);
    let dirs = tempfile::tempdir().expect("tempdir");
    let replicas = Replicas::start(&upstream.url(), &store, &dirs);
    let urls = replicas.urls();
    pull_everywhere(&urls, &first);
    wait_stored(&store, &first);

    store.stop();
    let second = seed_blob_image(&upstream, "library/cold", "v1", &[10 * 1024 * 1024]);
    let gets_before: usize = first
        .blobs()
        .iter()
        .map(|(d, _)| upstream.blob_gets("library/hot", d))
        .sum();
    // Every replica holds `first` on its disk: served with the store down, no upstream GET.
    pull_everywhere(&urls, &first);
    let gets_after: usize = first
        .blobs()
        .iter()
        .map(|(d, _)| upstream.blob_gets("library/hot", d))
        .sum();
    assert_eq!(gets_after, gets_before, "hot tiers served the cached image");
    // A new image streams to every client (fetched once, the store skipped).
    pull_everywhere(&urls, &second);
    for (d, _) in second.blobs() {
        assert_eq!(upstream.blob_gets("library/cold", d), 1, "{d} fetched once");
    }
    let down: f64 = replicas
        .berths
        .iter()
        .map(|b| metric(&admin_metrics(b), "berth_object_store_up"))
        .sum();
    assert!(down < 3.0, "some replica noticed the store is down");

    // Back up: nothing partial appeared while it was down; the store serves again.
    store.restart();
    for (d, _) in second.blobs() {
        let key = format!("berth-test/blobs/sha256/{}", &d[7..]);
        if let Some(stored) = store.get_object(&key) {
            assert_eq!(sha256(&stored), d, "only verified bytes under {key}");
        }
    }
    // Recovered once the back-off (5 s) has passed: new fills reach the store again, and a
    // replica with an empty disk reads from it, not upstream.
    std::thread::sleep(Duration::from_secs(6));
    let third = seed_blob_image(&upstream, "library/after", "v1", &[9 * 1024 * 1024]);
    pull_everywhere(&urls, &third);
    wait_stored(&store, &third);
    let before = upstream.access_log().len();
    let dirs2 = tempfile::tempdir().expect("tempdir");
    let fresh = single_replica(&upstream.url(), &store, &dirs2.path().join("c"));
    runtime().block_on(async {
        let client = reqwest::Client::new();
        pull(&client, &fresh.url(), &first.name, &first.tag).await;
        pull(&client, &fresh.url(), &third.name, &third.tag).await;
    });
    assert_eq!(
        upstream.access_log().len(),
        before,
        "after its restart {} served both images: {:?}",
        store.name(),
        &upstream.access_log()[before..]
    );
    assert_eq!(metric(&admin_metrics(&fresh), "berth_object_store_up"), 1.0);
}

#[test]
fn owner_killed_mid_fill_the_pull_completes_through_another_replica() {
    let garage = Garage::start();
    let rt = runtime();
    let up = rt.block_on(fake_upstream::FakeUpstream::start());
    let blob = Bytes::from(
        (0..6 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    );
    let digest = up.add_blob(blob.clone());
    let config = up.add_blob(Bytes::from_static(b"{}"));
    up.add_image("library/slow", "v1", &config, std::slice::from_ref(&digest));
    // 96 pieces of 64 KiB, 20 ms apart: about 2 s per fill.
    up.set(fake_upstream::Behaviour::Slow(Duration::from_millis(20)));

    let dirs = tempfile::tempdir().expect("tempdir");
    let mut replicas = Replicas::start(&up.url(), &garage, &dirs);
    let order = replicas.owner_order(&digest);
    let (owner, asker) = (order[0], order[2]);
    let url = format!(
        "{}/v2/library/slow/blobs/{digest}",
        replicas.berths[asker].url()
    );
    let body = rt.block_on(async {
        let resp = reqwest::get(&url).await.expect("blob request");
        assert_eq!(resp.status(), 200);
        let mut resp = resp;
        let mut got = Vec::new();
        let mut killed = false;
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(chunk) = resp.chunk().await.expect("the pull never breaks") {
            got.extend_from_slice(&chunk);
            if !killed && got.len() >= 1024 * 1024 {
                // The owner dies with the fill half done.
                replicas.berths[owner].kill();
                killed = true;
            }
            assert!(Instant::now() < deadline, "pull took too long");
        }
        assert!(killed, "the owner was killed mid-fill");
        got
    });
    assert_eq!(body.len(), blob.len());
    assert_eq!(
        sha256(&body),
        digest,
        "the resumed pull is the verified blob"
    );
    let m = admin_metrics(&replicas.berths[asker]);
    assert!(
        metric_with(&m, "berth_peer_requests_total", &["result=\"resumed\""]) >= 1.0,
        "the asker resumed elsewhere"
    );
    // The next replica in order took over the blob: it is cached there now.
    let next = order[1];
    let resp = rt.block_on(async {
        reqwest::get(format!(
            "{}/v2/library/slow/blobs/{digest}",
            replicas.berths[next].url()
        ))
        .await
        .expect("request")
        .bytes()
        .await
        .expect("body")
    });
    assert_eq!(sha256(&resp), digest);
}

fn a_damaged_blob_in_the_store_is_never_served_and_gets_replaced<S: StoreServer>() {
    let store = S::start();
    let store: &dyn StoreServer = &store;
    let upstream = Registry::start();
    let image = seed_blob_image(&upstream, "library/damaged", "v1", &[1024 * 1024]);
    let layer = image.layers[0].digest.clone();
    let key = format!("berth-test/blobs/sha256/{}", &layer[7..]);
    let single = |dir: &std::path::Path| single_replica(&upstream.url(), store, dir);
    let dirs = tempfile::tempdir().expect("tempdir");
    let first = single(&dirs.path().join("a"));
    pull_once(&first.url(), &image);
    wait_stored(store, &image);
    // Same length, one byte flipped.
    let mut bad = store.get_object(&key).expect("stored");
    bad[1000] ^= 0xff;
    store.put_object(&key, bad);

    // A replica with an empty disk reads the damaged copy: its client never gets it whole.
    let second = single(&dirs.path().join("b"));
    let url = format!("{}/v2/{}/blobs/{layer}", second.url(), image.name);
    let outcome = runtime().block_on(async {
        let resp = reqwest::get(&url).await.expect("request");
        let status = resp.status();
        (status, resp.bytes().await)
    });
    match outcome {
        (status, Ok(body)) if status == 200 => {
            assert_eq!(
                sha256(&body),
                layer,
                "a complete 200 must be the verified blob"
            )
        }
        _ => {} // an error status or an aborted body: the client retries
    }
    // The damaged object is dropped, the next pull fetches upstream and stores good bytes.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        runtime().block_on(async {
            let resp = reqwest::get(&url).await.expect("request");
            if resp.status() == 200
                && let Ok(body) = resp.bytes().await
            {
                assert_eq!(sha256(&body), layer, "only verified bytes are served");
            }
        });
        if store
            .get_object(&key)
            .is_some_and(|stored| sha256(&stored) == layer)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the damaged copy was never replaced"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    runtime().block_on(async {
        pull(
            &reqwest::Client::new(),
            &second.url(),
            &image.name,
            &image.tag,
        )
        .await;
    });
    assert_eq!(
        upstream.blob_gets("library/damaged", &layer),
        2,
        "fetched once by the first replica, once more to replace the damaged copy"
    );
}

fn a_blob_that_fails_its_digest_never_reaches_the_store<S: StoreServer>() {
    // Upstream flips each blob's last byte: the fill fails at its end, after the uploads have
    // sent what came before it (a 12 MiB blob: its first 8 MiB part, block or chunk).
    let store = S::start();
    let store: &dyn StoreServer = &store;
    let rt = runtime();
    let up = rt.block_on(fake_upstream::FakeUpstream::start());
    let pattern = |n: usize, salt: u32| -> Bytes {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ salt as u8)
            .collect::<Vec<u8>>()
            .into()
    };
    let blobs = [pattern(12 * 1024 * 1024, 1), pattern(2 * 1024 * 1024, 2)];
    let digests: Vec<String> = blobs.iter().map(|b| up.add_blob(b.clone())).collect();
    up.set(fake_upstream::Behaviour::Corrupt);
    let dirs = tempfile::tempdir().expect("tempdir");
    let berth = single_replica(&up.url(), store, &dirs.path().join("c"));
    let get = |d: &str| {
        let url = format!("{}/v2/library/bad/blobs/{d}", berth.url());
        rt.block_on(async {
            let resp = reqwest::get(&url).await.expect("request");
            let status = resp.status();
            (status, resp.bytes().await)
        })
    };
    let served_before = store.requests_logged();
    for d in &digests {
        match get(d) {
            (status, Ok(body)) if status == 200 => {
                panic!(
                    "{d}: a whole 200 of {} bytes for a blob that fails its digest",
                    body.len()
                )
            }
            _ => {} // an error status or a cut body
        }
    }
    let counted = settled_store_requests(std::slice::from_ref(&berth));
    // Not counted by berth: an aborted upload's parts (and the abort).
    eprintln!(
        "{}: the failed fills cost {} store requests ({counted} counted by berth)",
        store.name(),
        store.requests_logged() - served_before
    );
    let keys = store.list_keys("berth-test/blobs/");
    assert!(
        keys.is_empty(),
        "{}: unverified bytes stored: {keys:?}",
        store.name()
    );
    let m = admin_metrics(&berth);
    assert!(
        metric_with(
            &m,
            "berth_object_store_requests_total",
            &["operation=\"part\""]
        ) == 0.0,
        "no upload counted as completed"
    );
    // Upstream mended: the same blobs are fetched again and stored, verified.
    up.set(fake_upstream::Behaviour::Normal);
    for (d, blob) in digests.iter().zip(&blobs) {
        let (status, body) = get(d);
        assert_eq!(status, 200);
        assert_eq!(body.expect("body").len(), blob.len());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (d, blob) in digests.iter().zip(&blobs) {
        let key = format!("berth-test/blobs/sha256/{}", &d[7..]);
        let stored = loop {
            if let Some(stored) = store.get_object(&key) {
                break stored;
            }
            assert!(Instant::now() < deadline, "{key} never stored");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(stored.len(), blob.len(), "{key}");
        assert_eq!(&sha256(&stored), d, "{key}");
    }
}

fn more_fills_than_upload_slots_all_reach_the_store_verified<S: StoreServer>() {
    // 12 blobs filled at once against 4 upload slots: the waiting uploads read their verified
    // fills back from disk later, and every blob ends up stored with the right bytes.
    let store = S::start();
    let store: &dyn StoreServer = &store;
    let upstream = Registry::start();
    // And one of exactly two parts (no remainder: the last part is a whole one).
    let mut sizes = vec![600 * 1024; 12];
    sizes.push(16 * 1024 * 1024);
    let image = seed_blob_image(&upstream, "library/many", "v1", &sizes);
    let dirs = tempfile::tempdir().expect("tempdir");
    let berth = single_replica(&upstream.url(), store, &dirs.path().join("c"));
    pull_everywhere(&[berth.url()], &image);
    wait_stored(store, &image);
    for (d, bytes) in image.blobs() {
        let stored = store
            .get_object(&format!("berth-test/blobs/sha256/{}", &d[7..]))
            .expect("stored");
        assert_eq!(stored.len(), bytes.len());
        assert_eq!(sha256(&stored), d);
    }
}

/// Replicas that serve TLS find each other by IP and check each other's certificate against
/// the name it was issued for (`[cluster] server_name`) and the cluster's CA (`ca_file`).
#[test]
fn tls_replicas_verify_each_other_by_server_name_and_fetch_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = write_cluster_pki(dir.path());
    let rt = runtime();
    rt.block_on(async {
        let (up, layer) = tls_upstream(7u8).await;
        let (replicas, addrs) = start_tls_replicas(dir.path(), &pki, &up.url(), Mtls::No).await;
        wait_tls_peers_verified(&replicas).await;
        pull_by_server_name_from_each_replica(&pki.ca_pem, &addrs, None).await;
        filled_once_by_the_owner(&up, &layer, &replicas, "TLS");
        for r in replicas {
            r.stop().await;
        }
    });
}

/// An upstream holding `library/tls:v1`, one 3 MiB layer of `byte`s; and the layer's digest.
async fn tls_upstream(byte: u8) -> (fake_upstream::FakeUpstream, String) {
    let up = fake_upstream::FakeUpstream::start().await;
    let layer = up.add_blob(Bytes::from(vec![byte; 3 * 1024 * 1024]));
    let config_blob = up.add_blob(Bytes::from_static(b"{}"));
    up.add_image(
        "library/tls",
        "v1",
        &config_blob,
        std::slice::from_ref(&layer),
    );
    (up, layer)
}

/// The layer was fetched upstream once across the replicas, the others asking its owner
/// (`how`: over what); returns the peer requests the owner answered.
fn filled_once_by_the_owner(
    up: &fake_upstream::FakeUpstream,
    layer: &str,
    replicas: &[support::InProc],
    how: &str,
) -> u64 {
    assert_eq!(
        up.count(&format!("GET /v2/library/tls/blobs/{layer}")),
        1,
        "one upstream GET across the {how} replicas"
    );
    let asked: u64 = replicas
        .iter()
        .map(|r| {
            r.running()
                .metrics
                .peer_requests
                .with_label_values(&["ok"])
                .get()
        })
        .sum();
    assert!(asked >= 1, "non-owners asked the owner over {how}");
    asked
}

/// Replicas that need client certificates (`[server.tls] client_ca`) see their peers with
/// one ([`Mtls::Peers`]: `[cluster] client_cert` and `client_key`), without, or do not ask.
#[derive(Clone, Copy, PartialEq)]
enum Mtls {
    No,
    Peers,
    PeersWithoutCertificate,
}

/// With `[server.tls] client_ca`, replicas fetch from each other with `[cluster] client_cert`
/// and `client_key`: three mTLS replicas share fills as the TLS ones do (one upstream GET),
/// a client without a certificate is refused. Without the cluster's client certificate the
/// replicas cannot reach each other at all.
#[test]
fn mtls_replicas_share_fills_with_the_cluster_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = write_cluster_pki(dir.path());
    let rt = runtime();
    rt.block_on(async {
        let (up, layer) = tls_upstream(9u8).await;
        // Without the certificate: every peer probe is refused in the handshake.
        let without = dir.path().join("without");
        let (replicas, _) =
            start_tls_replicas(&without, &pki, &up.url(), Mtls::PeersWithoutCertificate).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let seen: Vec<i64> = replicas
            .iter()
            .map(|r| r.running().metrics.peers_up.get())
            .collect();
        assert!(
            seen.iter().all(|&n| n <= 1),
            "replicas without a client certificate reached their mTLS peers: {seen:?}"
        );
        for r in replicas {
            r.stop().await;
        }

        let (replicas, addrs) = start_tls_replicas(dir.path(), &pki, &up.url(), Mtls::Peers).await;
        wait_tls_peers_verified(&replicas).await;
        let anonymous = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("ca"),
            )
            .resolve("berth.test", addrs[0])
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let refused = anonymous
            .get(format!("https://berth.test:{}/v2/", addrs[0].port()))
            .send()
            .await;
        assert!(refused.is_err(), "a client without a certificate was served");
        pull_by_server_name_from_each_replica(&pki.ca_pem, &addrs, Some(&pki.client_pem)).await;
        let asked = filled_once_by_the_owner(&up, &layer, &replicas, "mTLS");
        println!("[mtls] 9 pulls over 3 mTLS replicas: 1 upstream blob GET, {asked} peer requests answered");
        for r in replicas {
            r.stop().await;
        }
    });
}

/// A cluster CA, a certificate (with its key) issued by it for `berth.test` only, and a
/// client certificate for the replicas, written under `dir`.
struct ClusterPki {
    ca_pem: String,
    ca_path: std::path::PathBuf,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    client_cert_path: std::path::PathBuf,
    client_key_path: std::path::PathBuf,
    /// The client certificate and its key, for a test client.
    client_pem: String,
}

fn write_cluster_pki(dir: &std::path::Path) -> ClusterPki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    // Issued for the Service's name only: no IP address in it.
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["berth.test".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    let (ca_path, cert_path, key_path) =
        (dir.join("ca.pem"), dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&ca_path, ca.pem()).expect("write");
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    let client_key = KeyPair::generate().expect("key");
    let client = CertificateParams::new(vec!["berth-replica".to_owned()])
        .expect("params")
        .signed_by(&client_key, &ca)
        .expect("client cert");
    let (client_cert_path, client_key_path) = (dir.join("client.crt"), dir.join("client.key"));
    std::fs::write(&client_cert_path, client.pem()).expect("write");
    std::fs::write(&client_key_path, client_key.serialize_pem()).expect("write");
    ClusterPki {
        ca_pem: ca.pem(),
        ca_path,
        cert_path,
        key_path,
        client_cert_path,
        client_key_path,
        client_pem: format!("{}{}", client.pem(), client_key.serialize_pem()),
    }
}

/// Three in-process replicas serving TLS with `pki`'s certificate, peers of each other by
/// IP (`https://127.0.0.1:…`) with `server_name = "berth.test"`, before `upstream`, needing
/// client certificates as `mtls` says; returns them with their addresses.
async fn start_tls_replicas(
    dir: &std::path::Path,
    pki: &ClusterPki,
    upstream: &str,
    mtls: Mtls,
) -> (Vec<support::InProc>, Vec<std::net::SocketAddr>) {
    let ca = pki.ca_path.display();
    let client_ca = match mtls {
        Mtls::No => String::new(),
        _ => format!("client_ca = \"{ca}\"\n"),
    };
    let client_cert = match mtls {
        Mtls::Peers => format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"\n",
            pki.client_cert_path.display(),
            pki.client_key_path.display()
        ),
        _ => String::new(),
    };
    let listeners =
        futures_util::future::join_all((0..3).map(|_| support::loopback_listener())).await;
    let addrs: Vec<_> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let peers: Vec<String> = addrs.iter().map(|a| format!("\"https://{a}\"")).collect();
    let mut replicas = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let admin = support::loopback_listener().await;
        let text = format!(
            r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
shutdown_grace = "1s"
[server.tls]
cert = "{cert}"
key = "{key}"
{client_ca}[cache]
dir = "{cache}"
[cluster]
peers = [{peers}]
server_name = "berth.test"
ca_file = "{ca}"
probe_interval = "200ms"
{client_cert}[[registry]]
name = "docker.io"
default = true
endpoints = ["{upstream}"]
"#,
            listen = addrs[i],
            admin = admin.local_addr().expect("addr"),
            cert = pki.cert_path.display(),
            key = pki.key_path.display(),
            cache = dir.join(format!("c{i}")).display(),
            peers = peers.join(", "),
            upstream = upstream,
        );
        replicas.push(support::InProc::start_on(&text, listener, admin).await);
    }
    (replicas, addrs)
}

/// Every replica verifies the other two (and finds itself) despite connecting by IP.
async fn wait_tls_peers_verified(replicas: &[support::InProc]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas
        .iter()
        .any(|r| r.running().metrics.peers_up.get() != 3)
    {
        assert!(
            Instant::now() < deadline,
            "TLS peers never verified each other"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nine concurrent pulls of `library/tls:v1`, three to each replica, by the name
/// `berth.test` and verified against the cluster CA.
async fn pull_by_server_name_from_each_replica(
    ca_pem: &str,
    addrs: &[std::net::SocketAddr],
    identity: Option<&str>,
) {
    let ca_cert = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca");
    let pulls = (0..9).map(|i| {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(ca_cert.clone())
            .resolve("berth.test", addrs[i % 3])
            .timeout(Duration::from_secs(30));
        if let Some(pem) = identity {
            b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("identity"));
        }
        let client = b.build().expect("client");
        let port = addrs[i % 3].port();
        async move {
            pull(
                &client,
                &format!("https://berth.test:{port}"),
                "library/tls",
                "v1",
            )
            .await
        }
    });
    futures_util::future::join_all(pulls).await;
}

#[test]
fn a_frozen_owner_holds_a_pull_for_at_most_the_peer_read_timeout() {
    let garage = Garage::start();
    let rt = runtime();
    let up = rt.block_on(fake_upstream::FakeUpstream::start());
    let digest = up.add_blob(Bytes::from(vec![1u8; 2 * 1024 * 1024]));
    let dirs = tempfile::tempdir().expect("tempdir");
    let replicas = Replicas::start(&up.url(), &garage, &dirs);
    // Two blobs owned by the same replica, asked through another.
    let order = replicas.owner_order(&digest);
    let owner = order[0];
    let asker = order[2];
    let second = (0..200u8)
        .map(|i| up.add_blob(Bytes::from(vec![i; 1024 * 1024])))
        .find(|d| replicas.owner_order(d)[0] == owner && replicas.owner_order(d)[2] == asker)
        .expect("another blob with the same owner");
    let pid = replicas.berths[owner].pid().expect("pid") as i32;
    // SAFETY: signals to the child this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let get = |d: &str| {
        let url = format!(
            "{}/v2/library/frozen/blobs/{d}",
            replicas.berths[asker].url()
        );
        let started = Instant::now();
        let body = rt.block_on(async {
            let resp = reqwest::get(&url).await.expect("request");
            assert_eq!(resp.status(), 200);
            resp.bytes().await.expect("body")
        });
        assert_eq!(sha256(&body), d, "verified");
        started.elapsed()
    };
    // The frozen owner accepts the connection but never answers: the asker gives up after the
    // peer read_timeout (5 s here) and the next replica in order fetches it.
    let first = get(&digest);
    assert!(first < Duration::from_secs(12), "first pull took {first:?}");
    // Marked down: the next blob it owns does not wait at all.
    let next = get(&second);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(next < Duration::from_secs(2), "second pull took {next:?}");
    eprintln!("frozen owner: first pull {first:?}, next pull {next:?}");
}

/// The objects of the hosted registries, under the test's prefix.
const HOSTED: &str = "berth-test/hosted";

/// One berth with a hosted registry `local` (`team/*`, deletes on, gc grace 1 s) on the
/// shared store; its mirror's upstream is a closed port (never asked).
fn hosted_berth(store: &dyn StoreServer, cache_dir: &std::path::Path) -> Berth {
    let config = replica_config(&[free_addr()], 0, support::DEAD_PROXY, store, cache_dir)
        + "\n[[hosted]]\nname = \"local\"\nrepositories = [\"team/*\"]\ndelete = true\n\
           gc_grace = \"1s\"\n";
    start_berth(&config, store)
}

fn blob_key(d: &str) -> String {
    format!("{HOSTED}/blobs/sha256/{}/{}", &d[7..9], &d[7..])
}

fn repo_key(repo: &str, folder: &str, name: &str) -> String {
    format!("{HOSTED}/repos/local/{repo}/{folder}/{name}")
}

/// The object's bytes; fails naming the key when it is not in the bucket.
fn stored(store: &dyn StoreServer, key: &str) -> Vec<u8> {
    store
        .get_object(key)
        .unwrap_or_else(|| panic!("{}: {key} not in the bucket", store.name()))
}

/// Pushes a blob to `base`'s `repo`: monolithic, or (`chunked`) POST, PATCH in 5 MiB chunks
/// and PUT; returns the status and body of the last request.
fn push_hosted_blob(base: &str, repo: &str, data: &[u8], chunked: bool) -> support::Reply {
    let d = sha256(data);
    if !chunked {
        return support::request(
            "POST",
            &format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"),
            None,
            &[("content-type", "application/octet-stream")],
            data.to_vec(),
        );
    }
    let started = support::request(
        "POST",
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        None,
        &[],
        Vec::new(),
    );
    assert_eq!(started.status, 202, "upload start: {}", started.text());
    let mut location = started.header("location").expect("Location").to_owned();
    for (i, chunk) in data.chunks(5 * 1024 * 1024).enumerate() {
        let at = i * 5 * 1024 * 1024;
        let range = format!("{at}-{}", at + chunk.len() - 1);
        let r = support::request(
            "PATCH",
            &format!("{base}{location}"),
            None,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &range),
            ],
            chunk.to_vec(),
        );
        assert_eq!(r.status, 202, "chunk {range}: {}", r.text());
        location = r.header("location").expect("Location").to_owned();
    }
    let sep = if location.contains('?') { '&' } else { '?' };
    support::request(
        "PUT",
        &format!("{base}{location}{sep}digest={d}"),
        None,
        &[],
        Vec::new(),
    )
}

fn put_hosted_manifest(base: &str, repo: &str, reference: &str, m: &[u8]) -> support::Reply {
    support::request(
        "PUT",
        &format!("{base}/v2/{repo}/manifests/{reference}"),
        None,
        &[("content-type", support::OCI_MANIFEST)],
        m.to_vec(),
    )
}

fn oci_manifest(config: (&str, usize), layers: &[(String, usize)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(d, n)| serde_json::json!({"mediaType": support::OCI_LAYER, "digest": d, "size": n}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": support::OCI_MANIFEST,
        "config": {"mediaType": support::OCI_CONFIG, "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .expect("json")
}

fn get(base: &str, path: &str) -> support::Reply {
    support::request(
        "GET",
        &format!("{base}{path}"),
        None,
        &[("accept", ACCEPT)],
        Vec::new(),
    )
}

fn tags_of(base: &str, repo: &str) -> Vec<String> {
    let r = get(base, &format!("/v2/{repo}/tags/list"));
    assert_eq!(r.status, 200, "tags of {repo} at {base}: {}", r.text());
    support::json(&r.text())["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect()
}

fn hosted_pushes_are_in_the_bucket_before_the_201_and_an_empty_replica_serves_them<
    S: StoreServer,
>() {
    let began = Instant::now();
    let mut store = S::start();
    let dirs = tempfile::tempdir().expect("tempdir");
    let first = hosted_berth(&store, &dirs.path().join("a"));
    let base = first.url();
    let repo = "team/app";
    // A config, a small layer (one PUT) and a 12 MiB one pushed in chunks (a multipart upload:
    // S3 parts, Azure blocks, GCS resumable chunks).
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let small = support::seeded_bytes(300 * 1024, 1);
    let large = support::seeded_bytes(12 * 1024 * 1024, 2);
    let mut layers = Vec::new();
    for (data, chunked) in [(&config, false), (&small, false), (&large, true)] {
        let d = sha256(data);
        let r = push_hosted_blob(&base, repo, data, chunked);
        assert_eq!(r.status, 201, "{}: blob push: {}", store.name(), r.text());
        // In the bucket when the 201 arrives: the verified bytes and the repository's link.
        let got = stored(&store, &blob_key(&d));
        assert_eq!((got.len(), sha256(&got)), (data.len(), d.clone()));
        stored(
            &store,
            &repo_key(repo, "_blobs", &format!("sha256-{}", &d[7..])),
        );
        layers.push((d, data.len()));
    }
    let config_desc = layers.remove(0);
    let m = oci_manifest((&config_desc.0, config_desc.1), &layers);
    let md = sha256(&m);
    let r = put_hosted_manifest(&base, repo, "v1", &m);
    assert_eq!(
        r.status,
        201,
        "{}: manifest push: {}",
        store.name(),
        r.text()
    );
    let hex = format!("sha256-{}", &md[7..]);
    assert_eq!(stored(&store, &blob_key(&md)), m, "the manifest's bytes");
    assert_eq!(
        stored(&store, &repo_key(repo, "_manifests", &hex)),
        support::OCI_MANIFEST.as_bytes()
    );
    assert_eq!(
        stored(&store, &repo_key(repo, "_tags", "v1")),
        md.as_bytes()
    );
    let pushed = began.elapsed();

    // A replica with an empty disk and the same bucket serves all of it.
    let second = hosted_berth(&store, &dirs.path().join("b"));
    let other = second.url();
    assert_eq!(tags_of(&other, repo), ["v1"]);
    let catalog = get(&other, "/v2/_catalog");
    assert!(catalog.text().contains(repo), "catalog: {}", catalog.text());
    let r = get(&other, &format!("/v2/{repo}/manifests/v1"));
    assert_eq!(
        r.status,
        200,
        "{}: manifest from the empty replica",
        store.name()
    );
    assert_eq!(
        (r.body.clone(), r.header("docker-content-digest")),
        (m.clone(), Some(md.as_str()))
    );
    for (d, n) in layers.iter().chain([&config_desc]) {
        let r = get(&other, &format!("/v2/{repo}/blobs/{d}"));
        assert_eq!(
            r.status,
            200,
            "{}: blob {d} from the empty replica",
            store.name()
        );
        assert_eq!((r.body.len(), sha256(&r.body)), (*n, d.clone()));
    }
    let served = began.elapsed();

    // The store down: pushes are refused (5xx, OCI error JSON) and nothing becomes visible.
    store.stop();
    let extra = support::seeded_bytes(64 * 1024, 3);
    let extra_d = sha256(&extra);
    let r = push_hosted_blob(&base, repo, &extra, false);
    assert_eq!(
        r.status,
        503,
        "{}: blob push with the store down: {}",
        store.name(),
        r.text()
    );
    assert_eq!(r.error_code(), "UNAVAILABLE", "{}", r.text());
    let head = support::request(
        "HEAD",
        &format!("{base}/v2/{repo}/blobs/{extra_d}"),
        None,
        &[],
        Vec::new(),
    );
    assert_eq!(
        head.status, 404,
        "the refused blob is not in the repository"
    );
    let m2 = oci_manifest((&config_desc.0, config_desc.1), &layers[..1]);
    let r = put_hosted_manifest(&base, repo, "v2", &m2);
    assert_eq!(
        r.status,
        503,
        "{}: manifest push with the store down: {}",
        store.name(),
        r.text()
    );
    assert_eq!(r.error_code(), "UNAVAILABLE", "{}", r.text());
    assert!(
        r.text().contains("object store"),
        "the error names the store: {}",
        r.text()
    );
    assert_eq!(
        tags_of(&base, repo),
        ["v1"],
        "the refused tag is not listed"
    );
    assert_eq!(get(&base, &format!("/v2/{repo}/manifests/v2")).status, 404);
    assert_eq!(
        get(&base, &format!("/v2/{repo}/manifests/{}", sha256(&m2))).status,
        404
    );

    // Back: the same push succeeds and lands in the bucket.
    store.restart();
    let r = put_hosted_manifest(&base, repo, "v2", &m2);
    assert_eq!(
        r.status,
        201,
        "{}: manifest push after the store is back: {}",
        store.name(),
        r.text()
    );
    assert_eq!(
        stored(&store, &repo_key(repo, "_tags", "v2")),
        sha256(&m2).as_bytes()
    );
    assert_eq!(
        tags_of(&other, repo),
        ["v1", "v2"],
        "the other replica lists the new tag"
    );

    // Deletes leave the bucket before the 202.
    let del = |path: &str| {
        support::request(
            "DELETE",
            &format!("{base}/v2/{repo}/{path}"),
            None,
            &[],
            Vec::new(),
        )
    };
    assert_eq!(del("manifests/v2").status, 202);
    assert!(
        store.get_object(&repo_key(repo, "_tags", "v2")).is_none(),
        "tag v2 deleted"
    );
    let (small_d, _) = &layers[0];
    assert_eq!(del(&format!("blobs/{small_d}")).status, 202);
    assert!(
        store
            .get_object(&repo_key(
                repo,
                "_blobs",
                &format!("sha256-{}", &small_d[7..])
            ))
            .is_none(),
        "the blob's link deleted"
    );
    assert_eq!(del(&format!("manifests/{md}")).status, 202);
    assert!(
        store
            .get_object(&repo_key(repo, "_manifests", &hex))
            .is_none(),
        "manifest link deleted"
    );
    assert!(
        store.get_object(&repo_key(repo, "_tags", "v1")).is_none(),
        "its tag deleted"
    );

    // gc (grace 1 s) removes the bytes nothing references from the bucket too.
    std::thread::sleep(Duration::from_millis(1500));
    let r = support::request(
        "POST",
        &format!("{}/admin/gc", first.admin_url()),
        None,
        &[],
        Vec::new(),
    );
    assert_eq!(r.status, 200, "gc: {}", r.text());
    let report = support::json(&r.text());
    assert!(
        report["blobs"]
            .as_array()
            .is_some_and(|b| b.iter().any(|d| d == md.as_str())),
        "gc: {report}"
    );
    assert!(
        store.get_object(&blob_key(&md)).is_none(),
        "gc removed the manifest's bytes from the bucket"
    );
    assert!(
        store.get_object(&blob_key(&large_d(&layers))).is_none(),
        "gc removed the large layer from the bucket"
    );
    eprintln!(
        "[timing] {}: hosted push {pushed:.2?}, served by an empty replica at {served:.2?}, all {:.2?}",
        store.name(),
        began.elapsed()
    );
}

/// The large layer's digest (the last one pushed).
fn large_d(layers: &[(String, usize)]) -> String {
    layers.last().expect("layers").0.clone()
}

/// `POST /admin/cache/rm` (what `berth cache rm` calls) on one replica deletes the tag record,
/// the manifest and the blobs from the bucket too, before it answers: a replica with an empty
/// disk then fetches the image from upstream again instead of restoring it from the store.
fn a_purged_image_leaves_the_bucket_and_no_replica_restores_it<S: StoreServer>() {
    let store = S::start();
    let store: &dyn StoreServer = &store;
    let upstream = Registry::start();
    let image = seed_blob_image(&upstream, "library/purged", "v1", &[2 * 1024 * 1024]);
    let dir = tempfile::tempdir().expect("tempdir");
    let a = single_replica(&upstream.url(), store, &dir.path().join("a"));
    pull_everywhere(&[a.url()], &image);
    wait_stored(store, &image);
    let keys = || -> Vec<String> {
        store
            .list_keys("berth-test/")
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    let image_keys = |keys: &[String]| -> Vec<String> {
        keys.iter()
            .filter(|k| {
                k.contains("/library/purged/")
                    || image.blobs().iter().any(|(d, _)| k.ends_with(&d[7..]))
            })
            .cloned()
            .collect()
    };
    assert!(
        !image_keys(&keys()).is_empty(),
        "nothing of the image in the bucket"
    );
    let purge = format!(
        "http://{}/admin/cache/rm?registry=docker.io&repository=library/purged&reference=v1",
        a.admin_addr()
    );
    let status = runtime().block_on(async {
        reqwest::Client::new()
            .post(&purge)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert_eq!(status.ok(), Some(200), "{}: purge", store.name());
    let left = image_keys(&keys());
    assert!(
        left.is_empty(),
        "{}: left in the bucket after the purge: {left:?}",
        store.name()
    );

    // A replica with an empty disk asks upstream again: nothing came back from the store.
    let before = upstream.access_log().len();
    let b = single_replica(&upstream.url(), store, &dir.path().join("b"));
    pull_everywhere(&[b.url()], &image);
    let asked: Vec<String> = upstream.access_log()[before..]
        .iter()
        .filter(|e| e.method == "GET" && e.path.contains("/library/purged/"))
        .map(|e| e.path.clone())
        .collect();
    assert!(
        asked.iter().any(|p| p.contains("/manifests/"))
            && asked.iter().any(|p| p.contains("/blobs/")),
        "{}: the purged image was restored from the store: upstream saw {asked:?}",
        store.name()
    );
}
