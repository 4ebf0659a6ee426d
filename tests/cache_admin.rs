//! `berth cache ls` and `berth cache rm` (the CLI, against a running berth's admin API): what is
//! cached, with bytes on disk; a purge removes the tag, the manifest and the blobs nothing else
//! references, and the next pull fetches them again. Shared blobs stay.

mod fake_upstream;
mod support;

use bytes::Bytes;
use fake_upstream::FakeUpstream;
use support::{InProc, InProcConfig};

fn cli(berth: &InProc, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .arg("--admin")
        .arg(berth.admin_url())
        .output()
        .expect("run berth");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_ls_and_rm_through_the_admin_api() {
    let up = FakeUpstream::start().await;
    let shared = up.add_blob(Bytes::from_static(b"a base layer both images have"));
    let own = up.add_blob(Bytes::from(vec![7u8; 5000]));
    let cfg = up.add_blob(Bytes::from_static(b"{}"));
    up.add_image("library/app", "v1", &cfg, &[shared.clone(), own.clone()]);
    up.add_image("library/other", "v1", &cfg, std::slice::from_ref(&shared));
    let berth = InProc::start(&InProcConfig::mirror_of(
        &up.url(),
        "probe_interval = \"0s\"",
    ))
    .await;
    for repo in ["app", "other"] {
        let r = berth.get(&format!("/v2/library/{repo}/manifests/v1")).await;
        let m: serde_json::Value = r.json().await.expect("manifest");
        for l in m["layers"].as_array().expect("layers") {
            let d = l["digest"].as_str().expect("digest");
            let body = berth
                .get(&format!("/v2/library/{repo}/blobs/{d}"))
                .await
                .bytes()
                .await;
            assert!(body.is_ok());
        }
    }
    let blob = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        berth
            .cache_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
    };
    let started = std::time::Instant::now();
    while !(blob(&own).exists() && blob(&shared).exists()) && started.elapsed().as_secs() < 5 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (ok, out) = cli(&berth, &["cache", "ls", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let app = v["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["repository"] == "library/app")
        .cloned()
        .expect("library/app listed");
    assert_eq!(app["tag"], "v1");
    assert_eq!(app["bytes"], 5000 + 29);
    let (ok, table) = cli(&berth, &["cache", "ls", "--sort", "size"]);
    assert!(
        ok && table.contains("docker.io/library/app") && table.contains("4.9 KiB"),
        "{table}"
    );

    let (ok, dry) = cli(&berth, &["cache", "rm", "--dry-run", "app:v1"]);
    assert!(ok, "{dry}");
    assert!(dry.contains(&format!("would remove blob {own}")), "{dry}");
    assert!(!dry.contains(&shared), "a blob another image uses: {dry}");
    assert!(blob(&own).exists());
    let (ok, done) = cli(&berth, &["cache", "rm", "app:v1"]);
    assert!(ok, "{done}");
    assert!(
        done.contains("removed tag docker.io/library/app:v1"),
        "{done}"
    );
    assert!(!blob(&own).exists() && blob(&shared).exists());
    // Gone from the list; pulled again from upstream.
    let (_, out) = cli(&berth, &["cache", "ls", "--json"]);
    assert!(!out.contains("library/app\""), "{out}");
    let before = up.count(&format!("GET /v2/library/app/blobs/{own}"));
    let r = berth.get(&format!("/v2/library/app/blobs/{own}")).await;
    assert_eq!(r.bytes().await.expect("body").len(), 5000);
    assert_eq!(
        up.count(&format!("GET /v2/library/app/blobs/{own}")),
        before + 1
    );
    // An image that is not cached: a clear failure.
    let (ok, out) = cli(&berth, &["cache", "rm", "nothere:1"]);
    assert!(!ok && out.contains("not in the cache"), "{out}");
    berth.stop().await;
}
