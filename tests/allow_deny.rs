//! A registry's `allow` and `deny` lists: a refused repository gets 403 `DENIED` however the
//! registry is named (default, `?ns=`, path prefix), for manifests, blobs and tags, and is never
//! sent upstream (a recording fake upstream).

mod fake_upstream;
mod support;

use bytes::Bytes;
use fake_upstream::FakeUpstream;
use support::{InProc, InProcConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_repositories_never_reach_upstream() {
    let up = FakeUpstream::start().await;
    let blob = up.add_blob(Bytes::from_static(b"layer"));
    let cfg = up.add_blob(Bytes::from_static(b"{}"));
    for repo in ["library/alpine", "someone/app", "bitnami/xmr-miner"] {
        up.add_image(repo, "v1", &cfg, std::slice::from_ref(&blob));
    }
    let config = InProcConfig::mirror_of(
        &up.url(),
        "probe_interval = \"0s\"\nallow = [\"library/*\", \"bitnami/*\"]\ndeny = [\"*/*-miner*\"]",
    );
    let berth = InProc::start(&config).await;
    assert_eq!(berth.get("/v2/alpine/manifests/v1").await.status(), 200);
    let denied = [
        "/v2/someone/app/manifests/v1".to_owned(),
        "/v2/someone/app/manifests/v1?ns=docker.io".to_owned(),
        "/v2/docker.io/someone/app/manifests/v1".to_owned(),
        format!("/v2/someone/app/blobs/{blob}"),
        "/v2/someone/app/tags/list".to_owned(),
        "/v2/bitnami/xmr-miner/manifests/v1".to_owned(),
    ];
    for path in &denied {
        let r = berth.get(path).await;
        assert_eq!(r.status(), 403, "{path}");
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["errors"][0]["code"], "DENIED", "{path}");
    }
    let asked = up.requests();
    assert!(
        asked
            .iter()
            .all(|r| !r.contains("someone") && !r.contains("miner")),
        "{asked:?}"
    );
    berth.stop().await;
}
