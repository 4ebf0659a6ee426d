//! The request pipeline on both transports: malformed and non-ASCII `Authorization` values,
//! invented methods, and `Host` values that would break the challenge. Requests go over raw
//! TCP so the bytes are exactly the hostile ones: a GET or HEAD without a body is read by the
//! zero-copy transport; the same request with a one-byte body is handed to hyper.

mod fake_upstream;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use fake_upstream::FakeUpstream;
use support::{InProc, InProcConfig, exchange, status_of};

/// Panics anywhere in the process (a connection task included) since the hook was set.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

struct Setup {
    berth: InProc,
    _up: FakeUpstream,
    /// Holds the htpasswd file.
    _dir: tempfile::TempDir,
    blob: String,
}

/// berth in front of a fake upstream holding `library/app:v1`; with `[auth]` when
/// `htpasswd` is given (anonymous may pull `docker.io/library/*`).
async fn start(htpasswd: Option<String>) -> Setup {
    let up = FakeUpstream::start().await;
    let blob = up.add_blob(Bytes::from_static(b"layer bytes"));
    let cfg = up.add_blob(Bytes::from_static(b"{}"));
    up.add_image("library/app", "v1", &cfg, std::slice::from_ref(&blob));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = InProcConfig::mirror_of(&up.url(), r#"probe_interval = "0s""#)
        .server(r#"header_read_timeout = "2s""#);
    if let Some(entries) = htpasswd {
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, entries).expect("write htpasswd");
        config = config.table(&format!(
            r#"
            [auth]
            htpasswd = "{}"
            [[auth.rule]]
            users = ["anonymous"]
            allow = ["docker.io/library/*"]
            "#,
            htpasswd.display()
        ));
    }
    let berth = InProc::start(&config).await;
    Setup {
        berth,
        _up: up,
        _dir: dir,
        blob,
    }
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    /// GET/HEAD without a body: the zero-copy transport.
    Fast,
    /// The same with a one-byte body: hyper.
    Hyper,
}

fn request(method: &str, path: &str, extra: &[u8], transport: Transport) -> Vec<u8> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n").into_bytes();
    raw.extend_from_slice(extra);
    match transport {
        Transport::Fast => raw.extend_from_slice(b"Connection: close\r\n\r\n"),
        Transport::Hyper => {
            raw.extend_from_slice(b"Connection: close\r\nContent-Length: 1\r\n\r\nx")
        }
    }
    raw
}

/// The OCI error JSON of a response (GET only: HEAD answers carry no body).
fn error_code(resp: &str) -> String {
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {resp}"));
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no OCI error code: {resp}"))
        .to_owned()
}

const MALFORMED: &[&[u8]] = &[
    "Basicx\u{e9}".as_bytes(),
    "Basic \u{e9}".as_bytes(),
    b"Basicxyz",
    b"Basic !!!notbase64",
    b"Basic Zm9v",
    b"Basic \x80\x81\xfe\xff",
    b"Bearer \xff\xfe\xfd\xfc",
    b"Bearerabc",
    b"Bearer ",
    "Bearer a\u{200b}b".as_bytes(),
    "Bearer \u{feff}token".as_bytes(),
    b"Bearer a b c",
];

fn ci_user() -> String {
    format!("ci:{}\n", bcrypt::hash("s3cret", 4).expect("bcrypt"))
}

async fn malformed_authorization(with_auth: bool) {
    count_panics();
    let s = start(with_auth.then(ci_user)).await;
    let addr = s.berth.addr();
    let blob = format!("/v2/library/app/blobs/{}", s.blob);
    let manifest = "/v2/library/app/manifests/v1";
    let cases = tokio::task::spawn_blocking(move || {
        let mut n = 0;
        for transport in [Transport::Fast, Transport::Hyper] {
            for value in MALFORMED {
                for (method, path) in [
                    ("GET", blob.as_str()),
                    ("HEAD", blob.as_str()),
                    ("GET", manifest),
                    ("HEAD", manifest),
                    ("GET", "/v2/"),
                ] {
                    let mut header = b"Authorization: ".to_vec();
                    header.extend_from_slice(value);
                    header.extend_from_slice(b"\r\n");
                    let resp = exchange(addr, &request(method, path, &header, transport));
                    let what = format!(
                        "{transport:?} {method} {path} with {:?} (auth {with_auth})",
                        String::from_utf8_lossy(value)
                    );
                    let status = status_of(&resp);
                    assert!(status == 400 || status == 401, "{what}: {resp}");
                    if method == "GET" {
                        assert!(
                            resp.to_ascii_lowercase()
                                .contains("content-type: application/json"),
                            "{what}: {resp}"
                        );
                        assert_eq!(error_code(&resp), "UNAUTHORIZED", "{what}");
                    }
                    // The next request on a new connection is served.
                    let ok = exchange(addr, &request("GET", manifest, b"", transport));
                    assert_eq!(status_of(&ok), 200, "after {what}: {ok}");
                    n += 1;
                }
            }
        }
        n
    })
    .await
    .expect("requests");
    assert_eq!(cases, 2 * MALFORMED.len() * 5);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a request panicked");
    s.berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_authorization_without_auth() {
    malformed_authorization(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_authorization_with_auth() {
    malformed_authorization(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_get_4xx_and_one_label() {
    let s = start(None).await;
    let addr = s.berth.addr();
    tokio::task::spawn_blocking(move || {
        for i in 0..60 {
            let method = format!("XMETHOD{i}");
            let path = if i % 2 == 0 {
                "/v2/"
            } else {
                "/v2/library/app/manifests/v1"
            };
            let resp = exchange(addr, &request(&method, path, b"", Transport::Fast));
            let status = status_of(&resp);
            assert!((400..500).contains(&status), "{method}: {resp}");
        }
    })
    .await
    .expect("requests");
    let metrics = s.berth.render_metrics();
    let mut methods: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("berth_http_requests_total{"))
        .filter_map(|l| l.split("method=\"").nth(1)?.split('"').next())
        .collect();
    methods.sort_unstable();
    methods.dedup();
    assert_eq!(methods, ["other"], "{metrics}");
    let other: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("berth_http_requests_total{") && l.contains("method=\"other\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(other, 60.0, "{metrics}");
    s.berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_are_not_authorities_get_400() {
    let s = start(Some(ci_user())).await;
    let addr = s.berth.addr();
    tokio::task::spawn_blocking(move || {
        for transport in [Transport::Fast, Transport::Hyper] {
            for host in [
                "evil.example/x\",service=\"pwn\",scope=\"",
                "evil.example x",
                "user@evil.example",
                "a\"b",
            ] {
                let raw = match transport {
                    Transport::Fast => format!(
                        "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                    ),
                    Transport::Hyper => format!(
                        "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
                    ),
                };
                let resp = exchange(addr, raw.as_bytes());
                assert_eq!(status_of(&resp), 400, "{transport:?} Host {host:?}: {resp}");
                assert!(!resp.to_ascii_lowercase().contains("www-authenticate"), "{resp}");
            }
            // Two Host headers are refused too (RFC 9112 §3.2).
            let two = request("GET", "/v2/", b"Host: other\r\n", transport);
            let resp = exchange(addr, &two);
            assert_eq!(status_of(&resp), 400, "{transport:?} two Hosts: {resp}");
            // A valid Host is what the challenge's realm names, quoted.
            let resp = exchange(addr, &request("GET", "/v2/", b"", transport));
            assert_eq!(status_of(&resp), 401, "{resp}");
            assert!(
                resp.contains(r#"Bearer realm="http://127.0.0.1/token",service="berth""#),
                "{transport:?}: {resp}"
            );
        }
    })
    .await
    .expect("requests");
    s.berth.stop().await;
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b64}")
}

/// A client whose connections come from `ip` (a loopback address: 127.0.0.0/8).
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(ip))
        .no_proxy()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("client")
}

/// The time one login attempt takes to be refused, and its status.
async fn refused_in(client: &reqwest::Client, url: &str, user: &str) -> (u16, f64) {
    let t = std::time::Instant::now();
    let r = client
        .get(format!("{url}/v2/"))
        .header("authorization", basic(user, "wrong"))
        .send()
        .await
        .expect("login attempt");
    (r.status().as_u16(), t.elapsed().as_secs_f64())
}

/// bcrypt at cost 14 (what `htpasswd -B -C 14` writes) takes about a second per check. 40
/// concurrent wrong passwords must not stall anyone else: the checks run off the request
/// threads, at most `failed_logins_per_minute` (10) of them, the rest get 429 at once; and
/// an unknown user is refused in about the time a known one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_never_stall_other_requests() {
    let strong = bcrypt::hash("s3cret", 14).expect("bcrypt");
    let weak = bcrypt::hash("s3cret", 4).expect("bcrypt");
    let s = start(Some(format!("ci:{strong}\ndana:{strong}\nbob:{weak}\n"))).await;
    let url = s.berth.url();
    let manifest = format!("{url}/v2/library/app/manifests/v1");
    let local = client_from([127, 0, 0, 1]);
    assert_eq!(
        local.get(&manifest).send().await.expect("warm").status(),
        200
    );
    let bob = basic("bob", "s3cret");
    let r = local
        .get(format!("{url}/v2/"))
        .header("authorization", &bob);
    assert_eq!(r.send().await.expect("bob logs in").status(), 200);

    let storm: Vec<_> = (0..40)
        .map(|i| {
            let (client, url) = (local.clone(), url.clone());
            tokio::spawn(async move {
                let r = client
                    .get(format!("{url}/v2/"))
                    .header("authorization", basic("ci", &format!("wrong{i}")))
                    .send()
                    .await
                    .expect("wrong password request");
                r.status().as_u16()
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Meanwhile: anonymous /v2/, a cached manifest, an anonymous token, a user logged in.
    let mut slowest: f64 = 0.0;
    for _ in 0..5 {
        let checks = [
            (local.get(format!("{url}/v2/")), 401),
            (local.get(&manifest), 200),
            (
                local.get(format!("{url}/token?scope=repository:library/app:pull")),
                200,
            ),
            (
                local
                    .get(format!("{url}/v2/"))
                    .header("authorization", &bob),
                200,
            ),
        ];
        for (request, want) in checks {
            let t = std::time::Instant::now();
            let status = request.send().await.expect("request").status();
            slowest = slowest.max(t.elapsed().as_secs_f64());
            assert_eq!(status, want);
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let mut statuses = Vec::new();
    for t in storm {
        statuses.push(t.await.expect("storm task"));
    }
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    let refused = statuses.iter().filter(|&&s| s == 401).count();
    assert_eq!(limited + refused, 40, "{statuses:?}");
    assert!(
        (1..=10).contains(&refused),
        "at most 10 checked: {statuses:?}"
    );
    eprintln!(
        "40 wrong passwords: {refused} checked (401), {limited} limited (429); slowest other request {slowest:.3} s"
    );
    assert!(slowest < 1.0, "another request waited {slowest:.3} s");

    // A known and an unknown user, each from an address of its own, cost the same.
    let (known, t_known) = refused_in(&client_from([127, 0, 0, 3]), &url, "dana").await;
    let (unknown, t_unknown) = refused_in(&client_from([127, 0, 0, 4]), &url, "nobody").await;
    eprintln!("refused: known user {t_known:.3} s, unknown user {t_unknown:.3} s");
    assert_eq!((known, unknown), (401, 401));
    let ratio = t_unknown / t_known;
    assert!(
        (0.5..2.0).contains(&ratio),
        "known {t_known:.3} s vs unknown {t_unknown:.3} s"
    );
    s.berth.stop().await;
}

/// The whole answer to a raw request on `transport`, with `extra` header lines.
fn answer(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
    t: Transport,
) -> String {
    exchange(addr, &request(method, path, extra.as_bytes(), t))
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    let head = resp.split("\r\n\r\n").next().unwrap_or("");
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body_of(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Conditional requests and ranges at the edges of u64, on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_and_ranges() {
    let s = start(None).await;
    let addr = s.berth.addr();
    let blob = format!("/v2/library/app/blobs/{}", s.blob);
    let blob_etag = format!("\"{}\"", s.blob);
    tokio::task::spawn_blocking(move || {
        let manifest = "/v2/library/app/manifests/v1";
        for t in [Transport::Fast, Transport::Hyper] {
            let first = answer(addr, "GET", manifest, "", t);
            assert_eq!(status_of(&first), 200, "{first}");
            let etag = header(&first, "etag").expect("manifest etag").to_owned();
            for (inm, want) in [
                (etag.clone(), 304),
                (format!("\"other\", W/{etag}"), 304),
                ("*".to_owned(), 304),
                ("\"other\"".to_owned(), 200),
            ] {
                let r = answer(
                    addr,
                    "GET",
                    manifest,
                    &format!("If-None-Match: {inm}\r\n"),
                    t,
                );
                assert_eq!(status_of(&r), want, "{t:?} If-None-Match {inm}: {r}");
                if want == 304 {
                    assert_eq!(header(&r, "etag"), Some(etag.as_str()), "{r}");
                    assert_eq!(body_of(&r), "", "a 304 has no body: {r}");
                }
            }
            // Blobs: the digest is the entity tag.
            assert_eq!(status_of(&answer(addr, "GET", &blob, "", t)), 200);
            let r = answer(
                addr,
                "GET",
                &blob,
                &format!("If-None-Match: {blob_etag}\r\n"),
                t,
            );
            assert_eq!(status_of(&r), 304, "{t:?}: {r}");
            assert_eq!(body_of(&r), "", "{r}");
            // If-Range: the range only while the entity tag matches.
            let range = "Range: bytes=0-4\r\n";
            let r = answer(
                addr,
                "GET",
                &blob,
                &format!("{range}If-Range: {blob_etag}\r\n"),
                t,
            );
            assert_eq!((status_of(&r), body_of(&r)), (206, "layer"), "{t:?}: {r}");
            let r = answer(
                addr,
                "GET",
                &blob,
                &format!("{range}If-Range: \"sha256:x\"\r\n"),
                t,
            );
            assert_eq!(
                (status_of(&r), body_of(&r)),
                (200, "layer bytes"),
                "{t:?}: {r}"
            );
            // Positions past u64: clamped at the end, unsatisfiable at the start.
            let r = answer(
                addr,
                "GET",
                &blob,
                "Range: bytes=6-99999999999999999999\r\n",
                t,
            );
            assert_eq!((status_of(&r), body_of(&r)), (206, "bytes"), "{t:?}: {r}");
            assert_eq!(header(&r, "content-range"), Some("bytes 6-10/11"), "{r}");
            let r = answer(
                addr,
                "GET",
                &blob,
                "Range: bytes=99999999999999999999-\r\n",
                t,
            );
            assert_eq!(status_of(&r), 416, "{t:?}: {r}");
            assert_eq!(header(&r, "content-range"), Some("bytes */11"), "{r}");
        }
    })
    .await
    .expect("requests");
    s.berth.stop().await;
}

/// Host rules (RFC 9112 §3.2), HEAD lengths, and the header limit on HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_rules_head_lengths_and_the_http2_header_limit() {
    let s = start(None).await;
    let addr = s.berth.addr();
    tokio::task::spawn_blocking(move || {
        for t in [Transport::Fast, Transport::Hyper] {
            // HEAD of the catalog has the length of the GET's body, and no body.
            let get = answer(addr, "GET", "/v2/_catalog", "", t);
            let head = answer(addr, "HEAD", "/v2/_catalog", "", t);
            let len = body_of(&get).len().to_string();
            assert_eq!(
                header(&head, "content-length"),
                Some(len.as_str()),
                "{t:?}: {head}"
            );
            assert_eq!(body_of(&head), "", "{head}");
        }
        // HTTP/1.1 needs a Host; HTTP/1.0 does not.
        for (req, want) in [
            ("GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
            (
                "GET /v2/ HTTP/1.1\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
                400,
            ),
            ("GET /v2/ HTTP/1.0\r\n\r\n", 200),
        ] {
            let r = exchange(addr, req.as_bytes());
            assert_eq!(status_of(&r), want, "{req:?}: {r}");
        }
    })
    .await
    .expect("requests");
    // HTTP/2 (hyper only): more than 100 header fields get 431, as on HTTP/1.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .expect("h2 client");
    let mut r = h2.get(format!("{}/v2/", s.berth.url()));
    for i in 0..101 {
        r = r.header(format!("x-filler-{i}"), "1");
    }
    let r = r.send().await.expect("h2 request");
    assert_eq!(r.status(), 431);
    let ok = h2
        .get(format!("{}/v2/", s.berth.url()))
        .send()
        .await
        .expect("h2");
    assert_eq!(ok.status(), 200);
    s.berth.stop().await;
}
