//! Client authentication and authorization, TLS (reload, HTTP/2, client certificates), and
//! repository scoping of private content — berth in-process against fake upstreams.

mod fake_upstream;
mod support;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use fake_upstream::FakeUpstream;
use support::{InProc, InProcConfig};

const PASSWORD: &str = "s3cret-pass";

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// docker.io (public) and private.example (private) upstreams, each with one image.
async fn upstreams() -> (FakeUpstream, FakeUpstream, String, String) {
    let public = FakeUpstream::start().await;
    let private = FakeUpstream::start().await;
    let pub_layer = public.add_blob(Bytes::from_static(b"public layer bytes"));
    let cfg = public.add_blob(Bytes::from_static(b"{}"));
    public.add_image("library/app", "v1", &cfg, std::slice::from_ref(&pub_layer));
    let priv_layer = private.add_blob(Bytes::from_static(b"private layer: secret bytes"));
    let cfg = private.add_blob(Bytes::from_static(b"{\"private\":1}"));
    private.add_image("team/app", "v1", &cfg, std::slice::from_ref(&priv_layer));
    (public, private, pub_layer, priv_layer)
}

fn write_htpasswd(dir: &Path) -> std::path::PathBuf {
    let hash = bcrypt::hash(PASSWORD, 4).expect("bcrypt");
    let path = dir.join("htpasswd");
    std::fs::write(&path, format!("ci:{hash}\nbob:{hash}\n")).expect("write htpasswd");
    path
}

/// berth before both upstreams; `server_extra` goes into `[server]`, `tables` after `[cache]`.
async fn start(
    dir: &Path,
    server_extra: &str,
    tables: &str,
    public: &str,
    private: &str,
) -> InProc {
    let config = InProcConfig::new()
        .server(server_extra)
        .cache("max_size = \"1GiB\"\ntag_ttl = \"10m\"")
        .table(tables)
        .registry("docker.io", true, &[public], "probe_interval = \"0s\"")
        .registry(
            "private.example",
            false,
            &[private],
            "probe_interval = \"0s\"",
        );
    InProc::start_in(&config, &dir.join("cache")).await
}

fn auth_section(htpasswd: &Path) -> String {
    format!(
        r#"
        [auth]
        htpasswd = "{}"
        [[auth.rule]]
        users = ["anonymous"]
        allow = ["docker.io/library/*"]
        [[auth.rule]]
        users = ["ci"]
        allow = ["*"]
        [[auth.rule]]
        users = ["*"]
        allow = ["docker.io/*"]
        "#,
        htpasswd.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_protocol_rules_and_private_content() {
    let (public, private, pub_layer, priv_layer) = upstreams().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let htpasswd = write_htpasswd(dir.path());
    let b = start(
        dir.path(),
        "",
        &auth_section(&htpasswd),
        &public.url(),
        &private.url(),
    )
    .await;
    let base = b.url();
    let c = support::client();
    login_and_challenge(&c, &b).await;
    let anon_token = anonymous_public_pull(&c, &base, &pub_layer).await;
    private_needs_an_allowed_user(&c, &base, &priv_layer).await;
    private_content_stays_scoped(&c, &base, &priv_layer, &anon_token).await;
    drop(private);
}

/// The `/v2/` challenge names berth's realm; `docker login` (Basic to the realm) yields a
/// token that opens `/v2/`; a wrong password is refused.
async fn login_and_challenge(c: &reqwest::Client, b: &InProc) {
    let base = b.url();
    // /v2/ without credentials: the challenge naming berth's realm.
    let r = c.get(format!("{base}/v2/")).send().await.expect("send");
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(
        challenge,
        format!(
            r#"Bearer realm="http://{}/token",service="berth""#,
            b.addr()
        )
    );
    // docker login: Basic to the realm yields a token; /v2/ with it answers 200.
    let r = c
        .get(format!(
            "{base}/token?service=berth&client_id=docker&offline_token=true"
        ))
        .header("authorization", basic("ci", PASSWORD))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    let ci_token = v["token"].as_str().expect("token").to_owned();
    assert_eq!(v["access_token"], v["token"]);
    let r = c
        .get(format!("{base}/v2/"))
        .bearer_auth(&ci_token)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{base}/token?service=berth"))
        .header("authorization", basic("ci", "wrong"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
}

/// The anonymous token flow for an allowed public repository, manifest and blob; returns
/// the anonymous token.
async fn anonymous_public_pull(c: &reqwest::Client, base: &str, pub_layer: &str) -> String {
    // Anonymous token flow for an allowed public repository.
    let r = c
        .get(format!(
            "{base}/token?service=berth&scope=repository%3Alibrary%2Fapp%3Apull"
        ))
        .send()
        .await
        .expect("send");
    let anon: serde_json::Value = r.json().await.expect("json");
    let anon_token = anon["token"].as_str().expect("token").to_owned();
    let r = c
        .get(format!("{base}/v2/library/app/manifests/v1"))
        .bearer_auth(&anon_token)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    // The blob, on the zero-copy path, with the same token.
    let r = c
        .get(format!("{base}/v2/library/app/blobs/{pub_layer}"))
        .bearer_auth(&anon_token)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body"), &b"public layer bytes"[..]);
    anon_token
}

/// The private registry: anonymous gets the challenge, an anonymous token never carries
/// the private scope, bob (authenticated, not allowed) is denied, ci pulls.
async fn private_needs_an_allowed_user(c: &reqwest::Client, base: &str, priv_layer: &str) {
    // The private registry: anonymous gets the challenge with the scope, on both paths.
    for path in [
        "/v2/private.example/team/app/manifests/v1".to_owned(),
        format!("/v2/private.example/team/app/blobs/{priv_layer}"),
    ] {
        let r = c.get(format!("{base}{path}")).send().await.expect("send");
        assert_eq!(r.status(), 401, "{path}");
        let ch = r.headers()["www-authenticate"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(
            ch.contains(r#"scope="repository:private.example/team/app:pull""#),
            "{ch}"
        );
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["errors"][0]["code"], "UNAUTHORIZED");
    }
    // An anonymous token never carries the private scope.
    let r = c
        .get(format!(
            "{base}/token?service=berth&scope=repository%3Aprivate.example%2Fteam%2Fapp%3Apull"
        ))
        .send()
        .await
        .expect("send");
    let t: serde_json::Value = r.json().await.expect("json");
    let r = c
        .get(format!("{base}/v2/private.example/team/app/manifests/v1"))
        .bearer_auth(t["token"].as_str().expect("token"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    // bob authenticates but is not allowed: 403 DENIED.
    let r = c
        .get(format!("{base}/v2/private.example/team/app/manifests/v1"))
        .header("authorization", basic("bob", PASSWORD))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["errors"][0]["code"], "DENIED");
    // ci pulls the private image with Basic on the registry requests (curl style).
    let r = c
        .get(format!("{base}/v2/private.example/team/app/manifests/v1"))
        .header("authorization", basic("ci", PASSWORD))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!(
            "{base}/v2/private.example/team/app/blobs/{priv_layer}"
        ))
        .header("authorization", basic("ci", PASSWORD))
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.bytes().await.expect("body"),
        &b"private layer: secret bytes"[..]
    );
}

/// With the private blob cached: not served under a public or another private repository
/// name; the catalog lists only what the caller may pull.
async fn private_content_stays_scoped(
    c: &reqwest::Client,
    base: &str,
    priv_layer: &str,
    anon_token: &str,
) {
    // Now cached, the private blob is still not served under a public repository name.
    let r = c
        .get(format!("{base}/v2/library/app/blobs/{priv_layer}"))
        .bearer_auth(anon_token)
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.status(),
        404,
        "private blob leaked through a public repository name"
    );
    assert!(
        r.bytes()
            .await
            .expect("body")
            .windows(6)
            .all(|w| w != b"secret")
    );
    // Nor through another private repository the anonymous user may not pull.
    let r = c
        .get(format!(
            "{base}/v2/private.example/other/blobs/{priv_layer}"
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    // The catalog lists only what the caller may pull.
    let r = c
        .get(format!("{base}/v2/_catalog?ns=private.example"))
        .header("authorization", basic("bob", PASSWORD))
        .send()
        .await
        .expect("send");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["repositories"], serde_json::json!([]));
    let r = c
        .get(format!("{base}/v2/_catalog?ns=private.example"))
        .header("authorization", basic("ci", PASSWORD))
        .send()
        .await
        .expect("send");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["repositories"], serde_json::json!(["team/app"]));
}

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki(cn: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{cn} test CA"));
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let server_key = KeyPair::generate().expect("key");
    let mut sp = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    sp.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let server = sp.signed_by(&server_key, &ca).expect("server cert");
    let client_key = KeyPair::generate().expect("key");
    let client = CertificateParams::new(vec!["client".to_owned()])
        .expect("params")
        .signed_by(&client_key, &ca)
        .expect("client cert");
    Pki {
        ca_pem: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

/// Writes `p`'s server certificate and key into `dir`: the `[server.tls]` lines and both paths.
fn tls_files(dir: &Path, p: &Pki) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, &p.server_cert).expect("write");
    std::fs::write(&key, &p.server_key).expect("write");
    let tls = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    (tls, cert, key)
}

fn https_client(
    ca_pem: &str,
    addr: std::net::SocketAddr,
    identity: Option<&Pki>,
) -> reqwest::Client {
    https_client_with(ca_pem, addr, identity, |b| b)
}

/// An HTTPS client trusting `ca_pem`, with `f` applied to its builder (a protocol, a timeout).
fn https_client_with(
    ca_pem: &str,
    addr: std::net::SocketAddr,
    identity: Option<&Pki>,
    f: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca"))
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(5));
    if let Some(p) = identity {
        let pem = format!("{}{}", p.client_cert, p.client_key);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("identity"));
    }
    f(b).build().expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_http2_reload_and_client_certificates() {
    let (public, private, pub_layer, _) = upstreams().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = pki("first");
    let (tls, cert, key) = tls_files(dir.path(), &first);
    // HTTP/2 preferred: a client offering both protocols gets it.
    let tls = format!("{tls}alpn = [\"h2\", \"http/1.1\"]\n");
    let b = start(dir.path(), &tls, "", &public.url(), &private.url()).await;
    let url = format!("https://localhost:{}", b.addr().port());
    let c = https_client(&first.ca_pem, b.addr(), None);
    let r = c
        .get(format!("{url}/v2/library/app/manifests/v1"))
        .send()
        .await
        .expect("https");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN h2 first");
    let r = c
        .get(format!("{url}/v2/library/app/blobs/{pub_layer}"))
        .send()
        .await
        .expect("https");
    assert_eq!(r.bytes().await.expect("body"), &b"public layer bytes"[..]);
    // Plain HTTP on the TLS port is refused.
    assert!(
        reqwest::get(format!("http://{}/v2/", b.addr()))
            .await
            .is_err()
    );

    // Replace the certificate: new connections get the new one; the open one keeps working.
    let second = pki("second");
    std::fs::write(&cert, &second.server_cert).expect("write");
    std::fs::write(&key, &second.server_key).expect("write");
    let c2 = https_client(&second.ca_pem, b.addr(), None);
    let mut reloaded = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if c2.get(format!("{url}/v2/")).send().await.is_ok() {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "the new certificate was not picked up");
    let r = c
        .get(format!("{url}/v2/"))
        .send()
        .await
        .expect("old connection still works");
    assert_eq!(r.status(), 200);
    assert!(
        https_client(&first.ca_pem, b.addr(), None)
            .get(format!("{url}/v2/"))
            .send()
            .await
            .is_err(),
        "a new connection must see the new certificate"
    );
    b.stop().await;

    // Client certificates required.
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &second.ca_pem).expect("write");
    let tls = format!("{tls}client_ca = \"{}\"\n", ca_file.display());
    let b = start(dir.path(), &tls, "", &public.url(), &private.url()).await;
    let url = format!("https://localhost:{}", b.addr().port());
    assert!(
        https_client(&second.ca_pem, b.addr(), None)
            .get(format!("{url}/v2/"))
            .send()
            .await
            .is_err(),
        "no client certificate: refused"
    );
    let r = https_client(&second.ca_pem, b.addr(), Some(&second))
        .get(format!("{url}/v2/"))
        .send()
        .await
        .expect("with a client certificate");
    assert_eq!(r.status(), 200);
}

/// A raw TLS connection to `addr` offering only HTTP/1.1 by ALPN.
async fn tls_http1(
    ca_pem: &str,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("ca");
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake")
}

/// Writes `requests` at once on a fresh HTTP/1.1 TLS connection and reads until berth closes
/// it (the last request asks for that), within 10 s, with a TLS close_notify.
async fn pipelined(ca_pem: &str, addr: std::net::SocketAddr, requests: &str) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let mut s = tls_http1(ca_pem, addr).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(b"http/1.1".as_slice()));
    s.write_all(requests.as_bytes()).await.expect("write");
    s.flush().await.expect("flush");
    read_to_close_notify(&mut s, Vec::new()).await
}

/// Reads on after `out` until berth ends the connection, within 10 s, and returns everything
/// read. A connection berth ends in order ends with close_notify: rustls reports a close
/// without one as an error (UnexpectedEof), so a truncated reply cannot pass for a whole one.
async fn read_to_close_notify(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    mut out: Vec<u8>,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => out,
        other => panic!(
            "connection not ended with close_notify ({other:?}) after {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// HTTP/1.1 over TLS takes berth's fast transport: large blobs (while the fill runs and from
/// the cache), ranges, HEAD, pipelined requests, and a request with a body handed to hyper on
/// the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http1_serves_blobs_ranges_pipelines_and_hands_bodies_over() {
    let (public, private, pub_layer, _) = upstreams().await;
    // Not a multiple of the TLS transport's read size, and larger than several of them.
    let big = support::seeded_bytes(3 * 1024 * 1024 + 12_345, 7);
    let big_digest = public.add_blob(Bytes::from(big.clone()));
    let cfg = public.add_blob(Bytes::from_static(b"{\"big\":1}"));
    public.add_image("library/big", "v1", &cfg, std::slice::from_ref(&big_digest));
    public.set(fake_upstream::Behaviour::Slow(Duration::from_millis(2)));
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki("http1");
    let (tls, _, _) = tls_files(dir.path(), &p);
    // A short header timeout, so that a connection that never sends a request ends soon.
    let server = format!("header_read_timeout = \"2s\"\n{tls}");
    let b = start(dir.path(), &server, "", &public.url(), &private.url()).await;
    let url = format!("https://localhost:{}", b.addr().port());
    let c = https_client_with(&p.ca_pem, b.addr(), None, |b| {
        b.http1_only().timeout(Duration::from_secs(30))
    });
    let blob_url = format!("{url}/v2/library/big/blobs/{big_digest}");

    // Cold: streamed while the (slow) fill runs; warm: from the cached file.
    for round in ["while filling", "cached"] {
        let r = c.get(&blob_url).send().await.expect("get");
        assert_eq!(r.status(), 200, "{round}");
        assert_eq!(r.version(), reqwest::Version::HTTP_11, "{round}");
        let body = r.bytes().await.expect("body");
        assert_eq!(body.len(), big.len(), "{round}");
        assert!(body[..] == big[..], "{round}: body differs");
        if round == "while filling" {
            public.set(fake_upstream::Behaviour::Normal);
        }
    }
    assert_eq!(
        public.count(&format!("GET /v2/library/big/blobs/{big_digest}")),
        1
    );

    let r = c
        .get(&blob_url)
        .header("range", "bytes=1000-300999")
        .send()
        .await
        .expect("range");
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 1000-300999/{}", big.len()).as_str()
    );
    assert!(r.bytes().await.expect("body")[..] == big[1000..301_000]);

    let r = c.head(&blob_url).send().await.expect("head");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        big.len().to_string().as_str()
    );
    assert!(r.bytes().await.expect("body").is_empty());

    // Three requests written at once: answered in order on the one connection.
    let host = "Host: localhost\r\n";
    let small = format!("/v2/library/app/blobs/{pub_layer}");
    let out = pipelined(
        &p.ca_pem,
        b.addr(),
        &format!(
            "GET /v2/ HTTP/1.1\r\n{host}\r\nGET {small} HTTP/1.1\r\n{host}\r\n\
             GET {small} HTTP/1.1\r\n{host}Connection: close\r\n\r\n"
        ),
    )
    .await;
    let statuses = find(&out, b"HTTP/1.1 200 OK\r\n");
    assert_eq!(statuses.len(), 3, "{}", String::from_utf8_lossy(&out));
    assert_eq!(find(&out, b"public layer bytes").len(), 2);

    // 32 requests of exactly 256 bytes in one write: rustls decrypts them at once and berth
    // reads them 4 KiB at a time, so after the 16th its buffer is empty while rustls still holds
    // the rest: berth must read on rather than wait for the socket.
    let sized = |last: bool| {
        let close = if last { "Connection: close\r\n" } else { "" };
        let bare = format!("GET /v2/ HTTP/1.1\r\n{host}{close}X-Pad: \r\n\r\n");
        let pad = "p".repeat(256 - bare.len());
        format!("GET /v2/ HTTP/1.1\r\n{host}{close}X-Pad: {pad}\r\n\r\n")
    };
    let mut many: String = (0..31).map(|_| sized(false)).collect();
    many.push_str(&sized(true));
    assert_eq!(many.len(), 32 * 256);
    let out = pipelined(&p.ca_pem, b.addr(), &many).await;
    assert_eq!(
        find(&out, b"HTTP/1.1 200 OK\r\n").len(),
        32,
        "{}",
        String::from_utf8_lossy(&out)
    );

    // A GET, then a request with a body: the second is hyper's, on the same connection.
    let out = pipelined(
        &p.ca_pem,
        b.addr(),
        &format!(
            "GET {small} HTTP/1.1\r\n{host}\r\n\
             POST /v2/library/app/blobs/uploads/ HTTP/1.1\r\n{host}Content-Length: 4\r\n\
             Connection: close\r\n\r\nabcd"
        ),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    let heads: Vec<&str> = find(&out, b"HTTP/1.1 ")
        .into_iter()
        .map(|i| &text[i..i + 12])
        .collect();
    assert_eq!(heads.len(), 2, "{text}");
    assert_eq!(heads[0], "HTTP/1.1 200", "{text}");
    // The mirror takes no pushes to docker.io: an OCI error, not a dropped connection.
    assert_eq!(heads[1], "HTTP/1.1 405", "{text}");
    assert!(text.contains("\"errors\""), "{text}");

    // The client ends a keep-alive connection with its own close_notify: berth answers with one.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tls_http1(&p.ca_pem, b.addr()).await;
        let get = format!("GET {small} HTTP/1.1\r\n{host}\r\n");
        s.write_all(get.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        while find(&out, b"public layer bytes").is_empty() {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
                .await
                .expect("reply in time")
                .expect("read");
            assert!(n > 0, "closed before the reply: {out:?}");
            out.extend_from_slice(&chunk[..n]);
        }
        s.shutdown().await.expect("client close_notify");
        let out = read_to_close_notify(&mut s, out).await;
        assert_eq!(find(&out, b"HTTP/1.1 200 OK\r\n").len(), 1);
    }
    // A connection that sends no request is ended at the header timeout, in order.
    let started = std::time::Instant::now();
    let mut s = tls_http1(&p.ca_pem, b.addr()).await;
    assert!(read_to_close_notify(&mut s, Vec::new()).await.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // By default a client offering both protocols gets HTTP/1.1 ...
    let r = https_client(&p.ca_pem, b.addr(), None)
        .get(&blob_url)
        .send()
        .await
        .expect("both offered");
    assert_eq!(
        r.version(),
        reqwest::Version::HTTP_11,
        "ALPN http/1.1 first"
    );
    assert!(r.bytes().await.expect("body")[..] == big[..]);
    // ... and one offering only HTTP/2 gets HTTP/2 on the same listener.
    let r = https_client_with(&p.ca_pem, b.addr(), None, |b| {
        b.http2_prior_knowledge().timeout(Duration::from_secs(30))
    })
    .get(&blob_url)
    .send()
    .await
    .expect("h2");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert!(r.bytes().await.expect("body")[..] == big[..]);
    b.stop().await;
}
