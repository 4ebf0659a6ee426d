//! URLs an upstream names (redirect `Location`s, token realms) never lead berth to a local
//! service: a hostile upstream answers with every spelling of a loopback address, and a canary
//! listener on 127.0.0.1 (an HTTP server that hands out a token) must see no connection. A
//! control shows the canary does see berth when it is a configured endpoint, and that the
//! registry's credentials still do not go to it.

mod fake_upstream;
mod support;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fake_upstream::{Behaviour, FakeUpstream};
use support::{InProc, InProcConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const USER: &str = "mirror-user";
const PASSWORD: &str = "s3cret-upstream-password";

/// A local service berth must not reach: counts connections, keeps each request head, and
/// answers every request with a token.
struct Canary {
    port: u16,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Canary {
    async fn start() -> Canary {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind canary");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (c, h) = (connections.clone(), heads.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut n = 0;
                    // One request head, at most 8 KiB and 2 s.
                    let read = async {
                        while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf[n..]).await {
                                Ok(0) | Err(_) => break,
                                Ok(k) => n += k,
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
                    h.lock()
                        .expect("lock")
                        .push(String::from_utf8_lossy(&buf[..n]).to_lowercase());
                    let body = r#"{"token":"canary-token","expires_in":300}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes()).await;
                });
            }
        });
        Canary {
            port,
            connections,
            heads,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A canary, an upstream with `library/app:v1` (one layer) and berth in front of it (registry
/// docker.io, with upstream credentials), plus what `extra` adds to the config (given the
/// canary's port).
struct Setup {
    canary: Canary,
    up: FakeUpstream,
    layer: String,
    berth: InProc,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn new(extra: impl FnOnce(InProcConfig, u16) -> InProcConfig) -> Setup {
        let canary = Canary::start().await;
        let up = FakeUpstream::start().await;
        let layer = up.add_blob(Bytes::from_static(b"layer bytes"));
        let config = up.add_blob(Bytes::from_static(b"{}"));
        up.add_image("library/app", "v1", &config, std::slice::from_ref(&layer));
        let dir = tempfile::tempdir().expect("tempdir");
        let password_file = dir.path().join("upstream-password");
        std::fs::write(&password_file, PASSWORD).expect("password file");
        let keys = format!(
            r#"
            username = "{USER}"
            password_file = "{}"
            connect_timeout = "1s"
            read_timeout = "2s"
            "#,
            password_file.display(),
        );
        let config = extra(InProcConfig::mirror_of(&up.url(), &keys), canary.port);
        let berth = InProc::start(&config).await;
        Setup {
            canary,
            up,
            layer,
            berth,
            _dir: dir,
        }
    }

    /// The status berth answers `GET path` with (within 10 s).
    async fn get(&self, path: &str) -> reqwest::StatusCode {
        self.berth
            .client()
            .get(format!("{}{path}", self.berth.url()))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("berth answers")
            .status()
    }

    /// Sends `GET path` once per form, after `set(form)`: each must fail with 502, and the
    /// canary must not be reached.
    async fn refused(&self, forms: &[String], path: &str, set: impl Fn(&str)) {
        for form in forms {
            set(form);
            let status = self.get(path).await;
            assert_eq!(status, 502, "{form}");
            assert_eq!(self.canary.connections(), 0, "{form} was reached");
        }
        // Each form really reached berth (one upstream request at least for each).
        assert!(
            self.up.count(&format!("GET {path}")) >= forms.len(),
            "{} upstream requests for {} forms",
            self.up.count(&format!("GET {path}")),
            forms.len()
        );
    }
}

/// Every spelling of "the canary on 127.0.0.1:port", as an upstream could name it. The last
/// one is a name that resolves to 127.0.0.1 (through the resolver's test override).
fn local_forms(port: u16, path: &str) -> Vec<String> {
    berth::upstream::policy::override_dns("canary-evil.test", vec![IpAddr::from([127, 0, 0, 1])]);
    [
        "127.0.0.1",
        "localhost",
        "LOCALHOST.",
        "sub.localhost",
        "127.1",
        "0x7f000001",
        "2130706433",
        "0177.0.0.1",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:127.0.0.1]",
        "[::ffff:0:127.0.0.1]",
        "[64:ff9b::127.0.0.1]",
        "canary-evil.test",
    ]
    .iter()
    .map(|h| format!("http://{h}:{port}{path}"))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_local_addresses_are_refused() {
    let s = Setup::new(|config, _| config).await;
    assert_eq!(s.get("/v2/library/app/manifests/v1").await, 200);
    let forms = local_forms(s.canary.port, "/cdn/{digest}");
    let blob = format!("/v2/library/app/blobs/{}", s.layer);
    s.refused(&forms, &blob, |form| {
        s.up.set(Behaviour::Redirect(form.into()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_realms_at_local_addresses_are_refused() {
    let s = Setup::new(|config, _| config).await;
    *s.up.state.token.lock().expect("lock") = Some("upstream-token".into());
    // The first form is also "the upstream's address, another port".
    let mut forms = local_forms(s.canary.port, "/token");
    // berth's own admin listener.
    let admin = s.berth.admin_addr();
    forms.push(format!("http://{admin}/metrics"));
    forms.push(format!(
        "http://[::ffff:127.0.0.1]:{}/metrics",
        admin.port()
    ));
    s.refused(&forms, "/v2/library/app/manifests/v1", |form| {
        *s.up.state.realm.lock().expect("lock") = Some(form.into());
    })
    .await;
    let authorized = s.up.state.authorized.lock().expect("lock").clone();
    assert!(
        authorized.is_empty(),
        "a token or credentials went upstream: {authorized:?}"
    );
    let metrics = s.berth.metrics_text().await;
    let token_series = |l: &&str| {
        l.starts_with("berth_upstream_requests_total") && l.contains(r#"endpoint="token""#)
    };
    assert!(
        !metrics.lines().any(|l| token_series(&l)),
        "a token endpoint answered:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_local_endpoint_is_reachable_but_gets_no_credentials() {
    // The canary is an endpoint of another registry, by address and by a name that resolves
    // to 127.0.0.1: an upstream may send berth there, without this registry's credentials.
    berth::upstream::policy::override_dns("canary-ok.test", vec![IpAddr::from([127, 0, 0, 1])]);
    let s = Setup::new(|config, p| {
        let endpoints = [
            format!("http://127.0.0.1:{p}"),
            format!("http://canary-ok.test:{p}"),
        ];
        config.registry(
            "canary.local",
            false,
            &[&endpoints[0], &endpoints[1]],
            r#"probe_interval = "0s""#,
        )
    })
    .await;
    assert_eq!(s.get("/v2/library/app/manifests/v1").await, 200);
    // A redirect to the endpoint's name is followed (the canary answers JSON, not the blob).
    let port = s.canary.port;
    s.up.set(Behaviour::Redirect(format!(
        "http://canary-ok.test:{port}/cdn/{{digest}}"
    )));
    let _ = s.get(&format!("/v2/library/app/blobs/{}", s.layer)).await;
    let after_redirect = s.canary.connections();
    assert!(
        after_redirect >= 1,
        "the redirect to an endpoint was not followed"
    );
    // A realm at the endpoint's address is asked for a token, anonymously.
    s.up.set(Behaviour::Normal);
    *s.up.state.token.lock().expect("lock") = Some("upstream-token".into());
    *s.up.state.realm.lock().expect("lock") = Some(format!("http://127.0.0.1:{port}/token"));
    let _ = s.get("/v2/library/app/manifests/v2").await;
    assert!(
        s.canary.connections() > after_redirect,
        "the realm at an endpoint was not asked"
    );
    let heads = s.canary.heads.lock().expect("lock").clone();
    assert!(
        heads.iter().any(|h| h.starts_with("get /token?")),
        "{heads:?}"
    );
    assert!(
        heads.iter().all(|h| !h.contains("authorization:")),
        "credentials went to another registry's endpoint: {heads:?}"
    );
}
