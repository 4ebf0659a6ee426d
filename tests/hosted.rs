//! The hosted registry over HTTP, in-process: each behaviour of the distribution spec that the
//! OCI conformance suite checks (push monolithic and chunked, 416s, upload status, mount,
//! manifest checks, tags with `n`/`last`, referrers, deletes), and what berth adds: uploads
//! that resume after a restart, garbage collection, push rights, webhooks, blobs stored once
//! with the cache, and hosted names that never reach an upstream.

mod fake_upstream;
mod support;

use std::time::Duration;

use bytes::Bytes;
use fake_upstream::{FakeUpstream, sha256};
use reqwest::Method;
use support::{InProc, InProcConfig};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn hosted_config(extra: &str) -> InProcConfig {
    InProcConfig::new().table(&format!(
        "[[hosted]]\nname = \"local\"\nrepositories = [\"team/*\", \"ci/**\"]\n{extra}\n"
    ))
}

/// A client of one berth's hosted registry.
struct Reg<'a> {
    berth: &'a InProc,
    bearer: Option<String>,
}

impl<'a> Reg<'a> {
    fn new(berth: &'a InProc) -> Reg<'a> {
        Reg {
            berth,
            bearer: None,
        }
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            self.berth.url() + path
        };
        let r = self.berth.client().request(method, url);
        match &self.bearer {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.req(method, path)
            .body(body)
            .send()
            .await
            .expect("request")
    }

    /// Pushes a blob in one request; returns its digest.
    async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = sha256(data);
        let r = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                data.to_vec(),
            )
            .await;
        assert_eq!(
            r.status(),
            201,
            "monolithic push to {repo}: {:?}",
            r.text().await
        );
        d
    }

    async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> reqwest::Response {
        self.req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("put manifest")
    }

    /// Pushes an image of `layers` (and a config) under `tag`; returns the manifest's bytes
    /// and digest.
    async fn push_image(&self, repo: &str, tag: &str, layers: &[&[u8]]) -> (Vec<u8>, String) {
        let config = self
            .push_blob(repo, b"{\"architecture\":\"amd64\",\"os\":\"linux\"}")
            .await;
        let mut descs = Vec::new();
        for l in layers {
            let d = self.push_blob(repo, l).await;
            descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()}));
        }
        let m = image_manifest(&config, 38, descs, None);
        let r = self.push_manifest(repo, tag, OCI_MANIFEST, &m).await;
        assert_eq!(r.status(), 201, "manifest push: {:?}", r.text().await);
        let d = sha256(&m);
        (m, d)
    }
}

fn image_manifest(
    config: &str,
    config_size: usize,
    layers: Vec<serde_json::Value>,
    subject: Option<serde_json::Value>,
) -> Vec<u8> {
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": layers,
    });
    if let Some(s) = subject {
        m["subject"] = s;
    }
    serde_json::to_vec(&m).expect("json")
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn error_code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.expect("error json");
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_push_monolithic_and_in_chunks() {
    let berth = InProc::start(&hosted_config("")).await;
    let reg = Reg::new(&berth);
    let d = reg.push_blob("team/app", b"hello hosted").await;
    let r = reg
        .send(Method::HEAD, &format!("/v2/team/app/blobs/{d}"), "")
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "12");
    assert_eq!(header(&r, "docker-content-digest"), d);
    let r = reg
        .send(Method::GET, &format!("/v2/team/app/blobs/{d}"), "")
        .await;
    assert_eq!(
        r.bytes().await.expect("body"),
        Bytes::from_static(b"hello hosted")
    );
    // Another repository does not have it.
    let r = reg
        .send(Method::GET, &format!("/v2/team/other/blobs/{d}"), "")
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");

    // A session: two chunks, then the digest.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = sha256(&data);
    let r = reg
        .send(Method::POST, "/v2/team/app/blobs/uploads/", "")
        .await;
    assert_eq!(r.status(), 202);
    let location = header(&r, "location");
    assert!(
        location.starts_with("/v2/team/app/blobs/uploads/"),
        "{location}"
    );
    assert!(!header(&r, "docker-upload-uuid").is_empty());
    let chunk = |from: usize, to: usize| {
        reg.req(Method::PATCH, &location)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{from}-{}", to - 1))
            .body(data[from..to].to_vec())
    };
    let r = chunk(0, 100_000).send().await.expect("patch");
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), "0-99999");
    // Out of order, and repeated: 416 with where the upload stands.
    for (from, to) in [(200_000, 300_000), (0, 100_000)] {
        let r = chunk(from, to).send().await.expect("patch");
        assert_eq!(r.status(), 416, "chunk {from}-{to}");
        assert_eq!(header(&r, "range"), "0-99999");
    }
    let r = reg.send(Method::GET, &location, "").await;
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-99999");
    let r = chunk(100_000, 200_000).send().await.expect("patch");
    assert_eq!(r.status(), 202);
    // The last chunk comes with the PUT.
    let put = format!("{location}?digest={}", d.replace(':', "%3A"));
    let r = reg.send(Method::PUT, &put, data[200_000..].to_vec()).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    assert_eq!(header(&r, "location"), format!("/v2/team/app/blobs/{d}"));
    let r = reg
        .send(Method::GET, &format!("/v2/team/app/blobs/{d}"), "")
        .await;
    assert_eq!(r.bytes().await.expect("body").as_ref(), data.as_slice());
    // The session is gone.
    assert_eq!(reg.send(Method::GET, &location, "").await.status(), 404);

    // A wrong digest: 400, and nothing stored under either digest.
    let r = reg
        .send(
            Method::POST,
            &format!("/v2/team/app/blobs/uploads/?digest={}", sha256(b"other")),
            &b"these bytes"[..],
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    for d in [sha256(b"other"), sha256(b"these bytes")] {
        assert_eq!(
            reg.send(Method::HEAD, &format!("/v2/team/app/blobs/{d}"), "")
                .await
                .status(),
            404
        );
    }
    // A cancelled session is gone.
    let r = reg
        .send(Method::POST, "/v2/team/app/blobs/uploads/", "")
        .await;
    let location = header(&r, "location");
    assert_eq!(reg.send(Method::DELETE, &location, "").await.status(), 204);
    assert_eq!(reg.send(Method::GET, &location, "").await.status(), 404);
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_checked_before_they_are_stored() {
    let berth = InProc::start(&hosted_config("")).await;
    let reg = Reg::new(&berth);
    let config = reg.push_blob("team/app", b"{}").await;
    let missing = sha256(b"never pushed");
    let layer = serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": missing, "size": 12});
    let m = image_manifest(&config, 2, vec![layer], None);
    let r = reg.push_manifest("team/app", "v1", OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": missing, "size": 10}],
    }))
    .expect("json");
    let r = reg
        .push_manifest("team/app", "idx", OCI_INDEX, &index)
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = reg
        .push_manifest("team/app", "v1", OCI_MANIFEST, b"not json")
        .await;
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let (m, d) = reg
        .push_image("team/app", "v1", &[b"layer one", b"layer two"])
        .await;
    // By digest: the digest must be the bytes'.
    let r = reg
        .push_manifest("team/app", &sha256(b"x"), OCI_MANIFEST, &m)
        .await;
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = reg.push_manifest("team/app", &d, OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert_eq!(
        header(&r, "location"),
        format!("/v2/team/app/manifests/{d}")
    );
    for reference in ["v1", d.as_str()] {
        let r = reg
            .send(
                Method::GET,
                &format!("/v2/team/app/manifests/{reference}"),
                "",
            )
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&r, "docker-content-digest"), d);
        assert_eq!(r.bytes().await.expect("body").as_ref(), m.as_slice());
    }
    // The index of it now goes in; a manifest is in its repository only.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(), "platform": {"architecture": "amd64", "os": "linux"}}],
    }))
    .expect("json");
    assert_eq!(
        reg.push_manifest("team/app", "multi", OCI_INDEX, &index)
            .await
            .status(),
        201
    );
    assert_eq!(
        reg.push_manifest("team/other", "multi", OCI_INDEX, &index)
            .await
            .status(),
        400
    );
    assert_eq!(
        reg.send(Method::GET, &format!("/v2/team/other/manifests/{d}"), "")
            .await
            .status(),
        404
    );
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_paginate_and_the_catalog_lists_hosted_and_cached_repositories() {
    let up = FakeUpstream::start().await;
    let blob = up.add_blob(Bytes::from_static(b"cached layer"));
    let cfg = up.add_blob(Bytes::from_static(b"{}"));
    up.add_image("library/alpine", "3", &cfg, std::slice::from_ref(&blob));
    let config =
        hosted_config("").registry("docker.io", true, &[&up.url()], r#"probe_interval = "0s""#);
    let berth = InProc::start(&config).await;
    let reg = Reg::new(&berth);
    let (m, _) = reg.push_image("team/app", "a", &[b"l"]).await;
    for tag in ["e", "b", "d", "c"] {
        assert_eq!(
            reg.push_manifest("team/app", tag, OCI_MANIFEST, &m)
                .await
                .status(),
            201
        );
    }
    let r = reg
        .send(Method::GET, "/v2/team/app/tags/list?n=2", "")
        .await;
    assert_eq!(
        header(&r, "link"),
        "</v2/team/app/tags/list?n=2&last=b>; rel=\"next\""
    );
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
    let r = reg
        .send(Method::GET, "/v2/team/app/tags/list?n=2&last=d", "")
        .await;
    assert!(r.headers().get("link").is_none());
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["tags"], serde_json::json!(["e"]));
    let v: serde_json::Value = reg
        .send(Method::GET, "/v2/team/app/tags/list", "")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["tags"], serde_json::json!(["a", "b", "c", "d", "e"]));
    // A repository outside the globs, named through the hosted registry's prefix.
    reg.push_image("local/misc/tool", "1", &[b"t"]).await;
    assert_eq!(
        berth.get("/v2/library/alpine/manifests/3").await.status(),
        200
    );
    let v: serde_json::Value = reg
        .send(Method::GET, "/v2/_catalog", "")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        v["repositories"],
        serde_json::json!(["library/alpine", "local/misc/tool", "team/app"])
    );
    let v: serde_json::Value = reg
        .send(Method::GET, "/v2/_catalog?ns=local", "")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        v["repositories"],
        serde_json::json!(["misc/tool", "team/app"])
    );
    // Nothing about the hosted repositories ever went upstream.
    assert!(
        up.requests()
            .iter()
            .all(|r| !r.contains("team/") && !r.contains("misc/")),
        "{:?}",
        up.requests()
    );
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_link_a_blob_another_repository_has() {
    let berth = InProc::start(&hosted_config("")).await;
    let reg = Reg::new(&berth);
    let d = reg.push_blob("team/base", b"shared layer").await;
    let r = reg
        .send(
            Method::POST,
            &format!("/v2/team/app/blobs/uploads/?mount={d}&from=team/base"),
            "",
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/team/app/blobs/{d}"));
    assert_eq!(
        reg.send(Method::GET, &format!("/v2/team/app/blobs/{d}"), "")
            .await
            .status(),
        200
    );
    // From a repository without it: an upload session instead.
    let r = reg
        .send(
            Method::POST,
            &format!("/v2/team/x/blobs/uploads/?mount={d}&from=team/empty"),
            "",
        )
        .await;
    assert_eq!(r.status(), 202);
    assert!(header(&r, "location").starts_with("/v2/team/x/blobs/uploads/"));
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_list_the_manifests_whose_subject_is_a_digest() {
    let berth = InProc::start(&hosted_config("delete = true")).await;
    let reg = Reg::new(&berth);
    let (m, d) = reg.push_image("team/app", "v1", &[b"layer"]).await;
    let empty = reg.push_blob("team/app", b"{}").await;
    let subject = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": m.len()});
    let mut sig = serde_json::from_slice::<serde_json::Value>(&image_manifest(
        &empty,
        2,
        vec![],
        Some(subject),
    ))
    .expect("json");
    sig["artifactType"] = "application/vnd.example.signature".into();
    sig["config"]["mediaType"] = "application/vnd.oci.empty.v1+json".into();
    sig["annotations"] = serde_json::json!({"org.example": "yes"});
    let sig = serde_json::to_vec(&sig).expect("json");
    let r = reg
        .push_manifest("team/app", &sha256(&sig), OCI_MANIFEST, &sig)
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "oci-subject"), d);
    let r = reg
        .send(Method::GET, &format!("/v2/team/app/referrers/{d}"), "")
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert!(r.headers().get("oci-filters-applied").is_none());
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["manifests"][0]["digest"], sha256(&sig));
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.signature"
    );
    assert_eq!(v["manifests"][0]["annotations"]["org.example"], "yes");
    assert_eq!(v["manifests"][0]["size"], sig.len());
    let r = reg
        .send(
            Method::GET,
            &format!("/v2/team/app/referrers/{d}?artifactType=application/other"),
            "",
        )
        .await;
    assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["manifests"], serde_json::json!([]));
    // Deleting the referrer takes it out of the list.
    let r = reg
        .send(
            Method::DELETE,
            &format!("/v2/team/app/manifests/{}", sha256(&sig)),
            "",
        )
        .await;
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = reg
        .send(Method::GET, &format!("/v2/team/app/referrers/{d}"), "")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["manifests"], serde_json::json!([]));
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_need_the_key_and_garbage_collection_keeps_what_is_referenced() {
    let off = InProc::start(&hosted_config("")).await;
    let reg = Reg::new(&off);
    let (_, d) = reg.push_image("team/app", "v1", &[b"kept"]).await;
    let r = reg
        .send(Method::DELETE, &format!("/v2/team/app/manifests/{d}"), "")
        .await;
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    off.stop().await;

    let berth = InProc::start(&hosted_config("delete = true\ngc_grace = \"0s\"")).await;
    let reg = Reg::new(&berth);
    let (_, d) = reg.push_image("team/app", "v1", &[b"kept layer"]).await;
    let (_, gone) = reg
        .push_image("team/app", "old", &[b"layer only old has"])
        .await;
    let orphan = reg.push_blob("team/app", b"pushed, never referenced").await;
    // A tag delete leaves the manifest; a digest delete removes it and its tags.
    assert_eq!(
        reg.send(Method::DELETE, "/v2/team/app/manifests/old", "")
            .await
            .status(),
        202
    );
    assert_eq!(
        reg.send(Method::GET, "/v2/team/app/manifests/old", "")
            .await
            .status(),
        404
    );
    assert_eq!(
        reg.send(Method::GET, &format!("/v2/team/app/manifests/{gone}"), "")
            .await
            .status(),
        200
    );
    assert_eq!(
        reg.send(
            Method::DELETE,
            &format!("/v2/team/app/manifests/{gone}"),
            ""
        )
        .await
        .status(),
        202
    );
    assert_eq!(
        reg.send(Method::GET, &format!("/v2/team/app/manifests/{gone}"), "")
            .await
            .status(),
        404
    );
    assert_eq!(
        reg.send(
            Method::DELETE,
            &format!("/v2/team/app/manifests/{gone}"),
            ""
        )
        .await
        .status(),
        404
    );
    let blobs_before = support::sample(&berth.metrics_text().await, "berth_hosted_blobs");

    let b = &berth;
    let gc = |dry: bool| {
        let url = format!(
            "{}/admin/gc{}",
            b.admin_url(),
            if dry { "?dry_run=true" } else { "" }
        );
        async move {
            b.client()
                .post(url)
                .send()
                .await
                .expect("gc")
                .json::<serde_json::Value>()
                .await
                .expect("json")
        }
    };
    let dry = gc(true).await;
    let would = dry["blobs"].as_array().expect("blobs").len();
    // The orphan, the old manifest and its layer.
    assert_eq!(would, 3, "{dry}");
    assert_eq!(
        reg.send(Method::HEAD, &format!("/v2/team/app/blobs/{orphan}"), "")
            .await
            .status(),
        200
    );
    let done = gc(false).await;
    assert_eq!(done["blobs"], dry["blobs"]);
    assert!(done["bytes"].as_u64().expect("bytes") > 0);
    assert_eq!(
        reg.send(Method::HEAD, &format!("/v2/team/app/blobs/{orphan}"), "")
            .await
            .status(),
        404
    );
    let r = reg.send(Method::GET, "/v2/team/app/manifests/v1", "").await;
    assert_eq!(header(&r, "docker-content-digest"), d);
    let m: serde_json::Value = r.json().await.expect("json");
    for layer in m["layers"].as_array().expect("layers") {
        let path = format!(
            "/v2/team/app/blobs/{}",
            layer["digest"].as_str().expect("digest")
        );
        assert_eq!(reg.send(Method::GET, &path, "").await.status(), 200);
    }
    let blobs_after = support::sample(&berth.metrics_text().await, "berth_hosted_blobs");
    assert_eq!(blobs_after, blobs_before - 3.0);
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_resumes_after_a_restart_from_the_offset_it_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = hosted_config("");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let location = {
        let berth = InProc::start_in(&config, dir.path()).await;
        let reg = Reg::new(&berth);
        let r = reg
            .send(Method::POST, "/v2/team/app/blobs/uploads/", "")
            .await;
        let location = header(&r, "location");
        let r = reg
            .send(Method::PATCH, &location, data[..1_200_000].to_vec())
            .await;
        assert_eq!(r.status(), 202);
        berth.stop().await;
        location
    };
    let berth = InProc::start_in(&config, dir.path()).await;
    let reg = Reg::new(&berth);
    let r = reg.send(Method::GET, &location, "").await;
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-1199999");
    let r = reg
        .req(Method::PATCH, &location)
        .header("content-range", "1200000-1999999")
        .body(data[1_200_000..].to_vec())
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 202);
    let d = sha256(&data);
    let r = reg
        .send(Method::PUT, &format!("{location}?digest={d}"), "")
        .await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let got = reg
        .send(Method::GET, &format!("/v2/team/app/blobs/{d}"), "")
        .await
        .bytes()
        .await
        .expect("body");
    assert_eq!(sha256(&got), d);
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_needs_the_push_action_of_a_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash("s3cret", 4).expect("bcrypt");
    std::fs::write(&htpasswd, format!("ci:{hash}\nreader:{hash}\n")).expect("htpasswd");
    let config = hosted_config("").table(&format!(
        r#"
        [auth]
        htpasswd = "{}"
        [[auth.rule]]
        users = ["ci"]
        allow = ["local/team/*"]
        actions = ["pull", "push"]
        [[auth.rule]]
        users = ["reader"]
        allow = ["local/team/*", "local/secret/*"]
        "#,
        htpasswd.display()
    ));
    let berth = InProc::start(&config).await;
    let anon = Reg::new(&berth);
    let r = anon
        .send(Method::POST, "/v2/team/app/blobs/uploads/", "")
        .await;
    assert_eq!(r.status(), 401);
    let challenge = header(&r, "www-authenticate");
    assert!(
        challenge.contains(r#"scope="repository:team/app:pull,push""#),
        "{challenge}"
    );
    let b = &berth;
    let token = |user: &'static str, scope: &'static str| {
        let url = format!("{}/token?service=berth&scope={scope}", b.url());
        async move {
            let r = b
                .client()
                .get(url)
                .basic_auth(user, Some("s3cret"))
                .send()
                .await
                .expect("token");
            let v: serde_json::Value = r.json().await.expect("json");
            v["token"].as_str().expect("token").to_owned()
        }
    };
    let ci = Reg {
        berth: &berth,
        bearer: Some(token("ci", "repository:team/app:pull,push").await),
    };
    ci.push_image("team/app", "v1", &[b"by ci"]).await;
    // A token for a pull does not push; a reader's request for push gets pull only.
    let reader = Reg {
        berth: &berth,
        bearer: Some(token("reader", "repository:team/app:pull,push").await),
    };
    assert_eq!(
        reader
            .send(Method::GET, "/v2/team/app/manifests/v1", "")
            .await
            .status(),
        200
    );
    assert_eq!(
        reader
            .send(Method::POST, "/v2/team/app/blobs/uploads/", "")
            .await
            .status(),
        401
    );
    let r = reader
        .send(Method::POST, "/v2/team/app/blobs/uploads/", "")
        .await;
    let challenge = header(&r, "www-authenticate");
    assert!(
        challenge.contains(r#"error="insufficient_scope""#),
        "{challenge}"
    );
    // ci pushes nowhere else (Basic credentials, checked against the rules per request).
    let r = berth
        .client()
        .post(format!("{}/v2/local/other/x/blobs/uploads/", berth.url()))
        .basic_auth("ci", Some("s3cret"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    // ... and mounts nothing from a repository it cannot pull: a session instead.
    let d = sha256(b"by ci");
    let r = berth
        .client()
        .post(format!(
            "{}/v2/team/app2/blobs/uploads/?mount={d}&from=local/secret/s",
            berth.url()
        ))
        .basic_auth("ci", Some("s3cret"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    let r = berth
        .client()
        .post(format!(
            "{}/v2/team/app2/blobs/uploads/?mount={d}&from=team/app",
            berth.url()
        ))
        .basic_auth("ci", Some("s3cret"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_registry_refuses_pushes_and_a_pushed_blob_the_cache_has_is_stored_once() {
    let up = FakeUpstream::start().await;
    let layer = Bytes::from_static(b"a layer both cached and pushed");
    let blob = up.add_blob(layer.clone());
    let cfg = up.add_blob(Bytes::from_static(b"{}"));
    up.add_image("library/alpine", "3", &cfg, std::slice::from_ref(&blob));
    let config =
        hosted_config("").registry("docker.io", true, &[&up.url()], r#"probe_interval = "0s""#);
    let berth = InProc::start(&config).await;
    let reg = Reg::new(&berth);
    let r = reg
        .send(Method::POST, "/v2/library/alpine/blobs/uploads/", "")
        .await;
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    let r = berth.get(&format!("/v2/library/alpine/blobs/{blob}")).await;
    assert_eq!(r.bytes().await.expect("body"), layer);
    use std::os::unix::fs::MetadataExt;
    let hex = blob.trim_start_matches("sha256:");
    let cached = berth
        .cache_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    let hosted = berth
        .cache_dir()
        .join("hosted/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    // The fill is committed (renamed into place) just after its last byte was sent.
    let started = std::time::Instant::now();
    while !cached.exists() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reg.push_blob("team/app", &layer).await, blob);
    let (a, b) = (
        std::fs::metadata(&cached).expect("cached"),
        std::fs::metadata(&hosted).expect("hosted"),
    );
    assert_eq!(
        (a.dev(), a.ino()),
        (b.dev(), b.ino()),
        "one file, two names"
    );
    berth.stop().await;
}

/// A webhook receiver: records each request body, answers `fail_first` requests with 500.
async fn receiver(
    fail_first: usize,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = support::loopback_listener().await;
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    tokio::spawn(async move {
        for n in 0..200usize {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            // One request per connection is enough here: read the head and its body.
            let body = loop {
                let Ok(k) = s.read(&mut chunk).await else {
                    break None;
                };
                if k == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..k]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text[..i]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        let ct = text[..i].to_ascii_lowercase().contains(
                            "content-type: application/vnd.docker.distribution.events.v1+json",
                        );
                        break Some((buf[i + 4..i + 4 + len].to_vec(), ct));
                    }
                }
            };
            let status = if n < fail_first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            if let Some((body, ct)) = body
                && n >= fail_first
                && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body)
            {
                v["content_type_ok"] = ct.into();
                seen.lock().expect("lock").push(v);
            }
            let _ = s
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_distributions_envelopes_in_order_with_retries() {
    let (url, got) = receiver(2).await;
    let config = hosted_config("delete = true").table(&format!(
        "[[notify]]\nurl = \"{url}\"\nevents = [\"push\", \"delete\", \"pull\"]\nretries = 3\n"
    ));
    let berth = InProc::start(&config).await;
    let reg = Reg::new(&berth);
    let (_, d) = reg.push_image("team/app", "v1", &[b"layer"]).await;
    assert_eq!(
        reg.send(Method::GET, "/v2/team/app/manifests/v1", "")
            .await
            .status(),
        200
    );
    assert_eq!(
        reg.send(Method::DELETE, "/v2/team/app/manifests/v1", "")
            .await
            .status(),
        202
    );
    let started = std::time::Instant::now();
    while got.lock().expect("lock").len() < 3 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = got.lock().expect("lock").clone();
    assert_eq!(events.len(), 3, "{events:?}");
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["events"][0]["action"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(actions, ["push", "pull", "delete"]);
    let push = &events[0]["events"][0];
    assert_eq!(events[0]["content_type_ok"], true);
    assert_eq!(push["target"]["repository"], "local/team/app");
    assert_eq!(push["target"]["digest"], d);
    assert_eq!(push["target"]["tag"], "v1");
    assert_eq!(push["target"]["mediaType"], OCI_MANIFEST);
    assert_eq!(push["request"]["method"], "PUT");
    assert!(
        !push["source"]["instanceID"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    );
    assert!(!push["id"].as_str().unwrap_or_default().is_empty());
    let m = berth.metrics_text().await;
    let label = url.trim_start_matches("http://").trim_end_matches("/hook");
    assert_eq!(
        support::sample(
            &m,
            &format!(r#"berth_notifications_total{{endpoint="{label}",result="sent"}}"#)
        ),
        3.0
    );
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_gc_on_the_command_line_reports_then_removes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = hosted_config("delete = true\ngc_grace = \"0s\"");
    let (kept, orphan) = {
        let berth = InProc::start_in(&config, dir.path()).await;
        let reg = Reg::new(&berth);
        reg.push_image("team/app", "v1", &[b"kept layer"]).await;
        let orphan = reg.push_blob("team/app", b"nobody references me").await;
        berth.stop().await;
        (sha256(b"kept layer"), orphan)
    };
    // The command reads the same config (the ports are not used by gc).
    let file = dir.path().join("berth.toml");
    let text = config.toml(
        "127.0.0.1:1".parse().expect("addr"),
        "127.0.0.1:2".parse().expect("addr"),
        dir.path(),
    );
    std::fs::write(&file, text).expect("config");
    let gc = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("gc")
            .arg("--config")
            .arg(&file)
            .args(args)
            .output()
            .expect("run berth gc");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dry = gc(&["--dry-run"]);
    assert!(
        dry.contains(&format!("would remove blob {orphan}")),
        "{dry}"
    );
    assert!(!dry.contains(&kept), "{dry}");
    assert!(dry.contains("would remove 1 blobs, 20 bytes"), "{dry}");
    let blob = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        dir.path()
            .join("hosted/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
    };
    assert!(blob(&orphan).exists(), "a dry run removed the blob");
    let done = gc(&[]);
    assert!(done.contains(&format!("removed blob {orphan}")), "{done}");
    assert!(!blob(&orphan).exists() && blob(&kept).exists());
}
