//! Fault drills for the hosted registry, with berth the binary: kill -9 in the middle of an
//! upload (monolithic and a session), and a push that fills the disk. Nothing half-written is
//! ever visible; an interrupted session resumes from the offset berth reports after the
//! restart; a full disk answers a 5xx OCI error while the cache keeps serving.

mod drill;
mod fake_upstream;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drill::{MIB, Tmpfs, fetch, random_bytes, run_drill};
use fake_upstream::{FakeUpstream, sha256};
use futures_util::StreamExt;
use support::{Berth, berth_config, files_under};

const HOSTED: &str = "\n[[hosted]]\nname = \"local\"\nrepositories = [\"team/*\"]\n";

/// A request body that sends `data` in 64 KiB pieces, one every `pace`.
fn paced_body(data: Bytes, pace: Duration) -> reqwest::Body {
    let pieces: Vec<Bytes> = (0..data.len())
        .step_by(64 * 1024)
        .map(|i| data.slice(i..(i + 64 * 1024).min(data.len())))
        .collect();
    let stream = futures_util::stream::iter(pieces).then(move |p| async move {
        tokio::time::sleep(pace).await;
        Ok::<Bytes, std::io::Error>(p)
    });
    reqwest::Body::wrap_stream(stream)
}

/// Waits (at most 10 s) until a file under `dir` holds at least `min` bytes; returns its size.
async fn wait_for_bytes(dir: &Path, min: u64) -> u64 {
    let started = Instant::now();
    loop {
        let most = files_under(dir)
            .iter()
            .map(|(_, len)| *len)
            .max()
            .unwrap_or(0);
        if most >= min {
            return most;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no file under {} reached {min} bytes",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn kill_9_mid_upload() {
    run_drill(async {
        let work = tempfile::tempdir().expect("tempdir");
        let cache = work.path().join("cache");
        let mut berth = Berth::start(&(berth_config("http://127.0.0.1:9", &cache) + HOSTED));
        let c = support::client();
        let data = random_bytes(8 * MIB);
        let d = sha256(&data);

        // A monolithic push killed half-way: after the restart the blob is unknown and no
        // temp file is left.
        let url = format!("{}/v2/team/app/blobs/uploads/?digest={d}", berth.url());
        let push = tokio::spawn(
            c.post(url)
                .body(paced_body(data.clone(), Duration::from_millis(5)))
                .send(),
        );
        let at = wait_for_bytes(&cache.join("hosted/tmp"), 2 * MIB as u64).await;
        berth.kill();
        let client_saw = push.await.expect("task");
        assert!(
            client_saw.is_err() || client_saw.is_ok_and(|r| r.status() != 201),
            "a killed push answered 201"
        );
        println!("[push-kill9] killed a monolithic push with {at} bytes written");
        berth.restart();
        let head = c
            .head(format!("{}/v2/team/app/blobs/{d}", berth.url()))
            .send()
            .await
            .expect("head");
        assert_eq!(head.status(), 404, "a half-pushed blob is visible");
        assert!(
            files_under(&cache.join("hosted/tmp")).is_empty(),
            "temp files left"
        );
        assert!(
            files_under(&cache.join("hosted/blobs")).is_empty(),
            "blobs after a killed push"
        );

        // A session killed mid-PATCH resumes from the offset GET reports.
        let r = c
            .post(format!("{}/v2/team/app/blobs/uploads/", berth.url()))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 202);
        let location = format!(
            "{}{}",
            berth.url(),
            r.headers()["location"].to_str().expect("location")
        );
        let patch = tokio::spawn(
            c.patch(&location)
                .body(paced_body(data.clone(), Duration::from_millis(5)))
                .send(),
        );
        wait_for_bytes(&cache.join("hosted/uploads"), 2 * MIB as u64).await;
        berth.kill();
        let _ = patch.await;
        berth.restart();
        let r = c.get(&location).send().await.expect("status");
        assert_eq!(r.status(), 204);
        let range = r.headers()["range"].to_str().expect("range").to_owned();
        let offset: usize = range
            .trim_start_matches("0-")
            .parse::<usize>()
            .expect("range end")
            + 1;
        assert!(
            offset >= 2 * MIB && offset < data.len(),
            "offset {offset} after the kill"
        );
        println!(
            "[push-kill9] session resumed at offset {offset} of {}",
            data.len()
        );
        let r = c
            .patch(&location)
            .header("content-range", format!("{offset}-{}", data.len() - 1))
            .body(data.slice(offset..))
            .send()
            .await
            .expect("patch the rest");
        assert_eq!(r.status(), 202);
        let r = c
            .put(format!("{location}?digest={d}"))
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        let got = c
            .get(format!("{}/v2/team/app/blobs/{d}", berth.url()))
            .send()
            .await
            .expect("get");
        assert_eq!(
            sha256(&got.bytes().await.expect("body")),
            d,
            "the resumed blob"
        );
    });
}

#[test]
fn disk_full_during_a_push() {
    run_drill(async {
        let disk = Tmpfs::mount("8m");
        let cache = disk.path.join("cache");
        let up = FakeUpstream::start().await;
        let layer = up.add_blob(Bytes::from_static(b"a cached layer"));
        let cfg = up.add_blob(Bytes::from_static(b"{}"));
        up.add_image("library/app", "v1", &cfg, std::slice::from_ref(&layer));
        let berth = Berth::start(&(berth_config(&up.url(), &cache) + HOSTED));
        let c = support::client();
        let manifest = format!("{}/v2/library/app/manifests/v1", berth.url());
        let (before, _) = fetch(&c, &manifest).await;
        assert!(before.is_verified(), "{}", before.short());

        let big = random_bytes(12 * MIB);
        let d = sha256(&big);
        let r = c
            .post(format!(
                "{}/v2/team/app/blobs/uploads/?digest={d}",
                berth.url()
            ))
            .body(big.clone())
            .send()
            .await
            .expect("push");
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        println!("[push-disk] 12 MiB push on an 8 MiB disk: {status} {body}");
        assert_eq!(status, 507, "{body}");
        assert_eq!(body["errors"][0]["code"], "UNKNOWN");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("no space"),
            "{body}"
        );
        let head = c
            .head(format!("{}/v2/team/app/blobs/{d}", berth.url()))
            .send()
            .await
            .expect("head");
        assert_eq!(head.status(), 404);
        assert!(
            files_under(&cache.join("hosted/tmp")).is_empty(),
            "temp files left after ENOSPC"
        );
        // The cache keeps serving, and a push that fits works.
        let (after, _) = fetch(&c, &manifest).await;
        assert!(after.is_verified(), "{}", after.short());
        let small = random_bytes(MIB);
        let r = c
            .post(format!(
                "{}/v2/team/app/blobs/uploads/?digest={}",
                berth.url(),
                sha256(&small)
            ))
            .body(small)
            .send()
            .await
            .expect("small push");
        assert_eq!(r.status(), 201);
        drop(berth);
        drop(disk);
    });
}
