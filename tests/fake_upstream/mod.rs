//! A small in-process upstream registry for fault injection: it serves the manifests and blobs
//! a test puts in it, counts every request, and can be told to misbehave (corrupt or cut
//! bodies, error statuses, slow streams, a token challenge). Blob GETs honour
//! `Range: bytes=<n>-` (206 with `Content-Range`) unless told to ignore it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[derive(Clone, Debug, PartialEq)]
pub enum Behaviour {
    Normal,
    /// Blob bodies have their last byte flipped (same length, wrong digest).
    Corrupt,
    /// Blob bodies stop after half the announced length.
    Cut,
    /// Every registry request answers this status.
    Status(u16),
    /// Blob bodies are sent in 64 KiB pieces with this pause between them.
    Slow(Duration),
    /// Blob GETs answer `307` to this URL (`{digest}` in it is replaced by the blob's digest).
    Redirect(String),
    /// Blob GETs announce a Content-Length 1 MiB larger than the blob, send the whole blob,
    /// then close the connection.
    LyingLength,
    /// Manifest GETs answer a 5 MiB JSON body, streamed without a Content-Length.
    HugeManifest,
    /// `/token` answers 200 with this body instead of a token.
    GarbageToken(String),
    /// Every `fail_every`th blob GET fails, deterministically: alternately cut halfway and
    /// answered 503.
    Flaky {
        fail_every: usize,
    },
    /// Manifest and blob requests wait this long before answering anything (no headers).
    Stall(Duration),
    /// A black hole (a registry in a brown-out, a half-dead load balancer): every request,
    /// `/v2/` and `/token` included, is accepted and never answered while this is the
    /// behaviour. When it changes, the waiting requests are answered by the new one (after
    /// 120 s at most they get a 503).
    Hang,
    /// Blob bodies go silent for this long when they reach the middle of the blob, then send
    /// the rest (a body asked for from past the middle does not stall).
    StallMidway(Duration),
    /// Every new connection is reset (RST) at once, before its request is read.
    Reset,
    /// Manifest GETs answer this status; manifest HEADs are answered as usual.
    ManifestGetStatus(u16),
    /// Manifest requests honour Accept as Docker Hub does: a manifest of a type the Accept
    /// header names (or `*/*`, or with no Accept) is sent as it is, an index is sent anyway,
    /// and otherwise the answer is a signed schema-1 manifest (whose Docker-Content-Digest is
    /// the hash of its payload, not of its bytes).
    Negotiate,
    /// The first `times` blob GETs after this is set send `bytes` bytes of their body, then
    /// reset the connection (RST).
    ResetAfter {
        bytes: usize,
        times: usize,
    },
    /// Blob GETs ignore `Range` (answer 200 with the whole blob).
    IgnoreRange,
    /// The bearer token (when one is required) expires after `after` registry requests were
    /// accepted with it: the next request with it gets 401 and `/token` issues a new one
    /// (once per `set`).
    ExpireToken {
        after: usize,
    },
    /// Several of [`ResetAfter`](Behaviour::ResetAfter), [`IgnoreRange`](Behaviour::IgnoreRange),
    /// [`ExpireToken`](Behaviour::ExpireToken) at once (other behaviours apply only alone).
    Each(Vec<Behaviour>),
}

impl Behaviour {
    /// This behaviour, or those it combines.
    fn parts(&self) -> Vec<&Behaviour> {
        match self {
            Behaviour::Each(all) => all.iter().collect(),
            one => vec![one],
        }
    }
}

/// The signed schema-1 manifest [`Behaviour::Negotiate`] answers, and its claimed digest.
pub fn schema1(repo: &str, reference: &str) -> (Bytes, String) {
    let payload = serde_json::json!({
        "schemaVersion": 1,
        "name": repo,
        "tag": reference,
        "architecture": "amd64",
        "fsLayers": [],
        "history": [],
    });
    let mut signed = payload.clone();
    signed["signatures"] = serde_json::json!([{"header": {"alg": "ES256"}, "signature": "c2ln", "protected": "cHJvdA"}]);
    let payload = serde_json::to_vec_pretty(&payload).expect("json");
    let signed = serde_json::to_vec_pretty(&signed).expect("json");
    (Bytes::from(signed), sha256(&payload))
}

/// Whether a request's Accept headers admit `media_type` (no header, `*/*`, or named).
fn accepts(req: &Request<hyper::body::Incoming>, media_type: &str) -> bool {
    let mut items = req
        .headers()
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|i| i.split(';').next().unwrap_or("").trim().to_owned())
        .peekable();
    items.peek().is_none() || items.any(|mt| mt == media_type || mt == "*/*")
}

#[derive(Default)]
pub struct State {
    pub blobs: Mutex<HashMap<String, Bytes>>,
    /// (repo, reference) → (media type, bytes)
    pub manifests: Mutex<HashMap<(String, String), (String, Bytes)>>,
    pub behaviour: Mutex<Option<Behaviour>>,
    /// Every request as "METHOD path?query".
    pub log: Mutex<Vec<String>>,
    /// The requests (as in `log`) that carried an Authorization header.
    pub authorized: Mutex<Vec<String>>,
    /// When set, registry requests need `Authorization: Bearer <token>`, issued by /token.
    pub token: Mutex<Option<String>>,
    /// The realm the token challenge names (default: this server's `/token`).
    pub realm: Mutex<Option<String>>,
    /// Repositories whose blobs are hidden (404), as a private repository would be.
    pub hidden_repos: Mutex<Vec<String>>,
    /// Blob GETs seen (what `Behaviour::Flaky` counts).
    pub blob_gets: AtomicUsize,
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Blob GETs reset by `ResetAfter` since the behaviour was set.
    pub resets: AtomicUsize,
    /// Requests accepted with the current token since the behaviour was set (`ExpireToken`).
    pub token_uses: AtomicUsize,
    /// The `Range` header of every blob GET that had one.
    pub ranges: Mutex<Vec<String>>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn sha256(b: &[u8]) -> String {
    let mut h = Sha256Hasher::new();
    h.update(b);
    h.finish()
}

/// Incremental SHA-256 from aws-lc (reached through rustls, a dependency of berth). In the
/// unoptimized test profile the `sha2` crate hashes about 35 MiB/s; aws-lc's assembly about
/// 750 MiB/s, so tests that verify many large bodies are not bound by their own hashing.
pub struct Sha256Hasher(Box<dyn rustls::crypto::hash::Context>);

impl Sha256Hasher {
    pub fn new() -> Sha256Hasher {
        let rustls::SupportedCipherSuite::Tls13(suite) =
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            unreachable!("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite")
        };
        let hash = suite.common.hash_provider;
        assert_eq!(
            hash.algorithm(),
            rustls::crypto::hash::HashAlgorithm::SHA256
        );
        Sha256Hasher(hash.start())
    }

    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }

    /// `sha256:<hex>`.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finish().as_ref()))
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, b: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(b.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        Self::start_on(listener, Arc::new(State::default())).await
    }

    /// Serves `state` on `listener` (a restart keeps the state and the address).
    /// Dropping the `FakeUpstream` closes the listener and every open connection.
    pub async fn start_on(listener: TcpListener, state: Arc<State>) -> FakeUpstream {
        let addr = listener.local_addr().expect("local addr");
        let st = state.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the accept task drops them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                st.connections.fetch_add(1, Ordering::Relaxed);
                let reset = *st.behaviour.lock().expect("lock") == Some(Behaviour::Reset);
                if reset {
                    // SO_LINGER 0: close() sends RST instead of FIN.
                    let _ = linger_zero(&stream);
                    drop(stream);
                    continue;
                }
                let st = st.clone();
                let fd = stream.as_raw_fd();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req, fd).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeUpstream { addr, state, task }
    }

    /// Serves `state` on 127.0.0.1:`port` again, after an earlier `FakeUpstream` on that port
    /// was dropped (retries the bind for up to 5 s while the old listener closes).
    pub async fn start_on_port(port: u16, state: Arc<State>) -> FakeUpstream {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rebind fake upstream on port {port}: {e}"),
            }
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        Self::start_on(listener, state).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, b: Behaviour) {
        self.state.resets.store(0, Ordering::Relaxed);
        self.state.token_uses.store(0, Ordering::Relaxed);
        *self.state.behaviour.lock().expect("lock") = Some(b);
    }

    pub fn add_blob(&self, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let d = sha256(&data);
        self.state
            .blobs
            .lock()
            .expect("lock")
            .insert(d.clone(), data);
        d
    }

    /// Adds an image manifest referencing `config` and `layers`, under `tag` and its digest.
    pub fn add_image(
        &self,
        repo: &str,
        tag: &str,
        config: &str,
        layers: &[String],
    ) -> (String, Bytes) {
        let size = |d: &str| {
            self.state
                .blobs
                .lock()
                .expect("lock")
                .get(d)
                .map_or(0, |b| b.len())
        };
        let layers_json: Vec<serde_json::Value> = layers
            .iter()
            .map(|d| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size(d)}))
            .collect();
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": size(config)},
            "layers": layers_json,
        });
        let bytes = Bytes::from(serde_json::to_vec(&m).expect("json"));
        self.add_manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            bytes.clone(),
        );
        (sha256(&bytes), bytes)
    }

    pub fn add_manifest(&self, repo: &str, tag: &str, media_type: &str, bytes: Bytes) {
        let d = sha256(&bytes);
        let mut m = self.state.manifests.lock().expect("lock");
        m.insert(
            (repo.into(), tag.into()),
            (media_type.into(), bytes.clone()),
        );
        m.insert((repo.into(), d), (media_type.into(), bytes));
    }

    /// How many logged requests start with `prefix` (e.g. "GET /v2/library/a/blobs/").
    pub fn count(&self, prefix: &str) -> usize {
        self.state
            .log
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.log.lock().expect("lock").clone()
    }
}

/// The first byte of a `Range: bytes=<n>-` header (other forms are not honoured).
fn range_start(req: &Request<hyper::body::Incoming>) -> Option<usize> {
    let v = req.headers().get("range")?.to_str().ok()?;
    v.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
}

async fn handle(st: Arc<State>, req: Request<hyper::body::Incoming>, fd: RawFd) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let line = format!("{} {path}{query}", req.method());
    if req.headers().contains_key("authorization") {
        st.authorized.lock().expect("lock").push(line.clone());
    }
    st.log.lock().expect("lock").push(line);
    if !wait_while_hanging(&st).await {
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"errors":[{"code":"UNAVAILABLE"}]}"#,
        );
    }
    let head = req.method() == hyper::Method::HEAD;
    let behaviour = st
        .behaviour
        .lock()
        .expect("lock")
        .clone()
        .unwrap_or(Behaviour::Normal);
    let parts = behaviour.parts();
    let reset_after = parts.iter().find_map(|b| match b {
        Behaviour::ResetAfter { bytes, times } => Some((*bytes, *times)),
        _ => None,
    });
    let ignore_range = parts.iter().any(|b| **b == Behaviour::IgnoreRange);
    let expire_after = parts.iter().find_map(|b| match b {
        Behaviour::ExpireToken { after } => Some(*after),
        _ => None,
    });
    if path == "/token" {
        if let Behaviour::GarbageToken(body) = &behaviour {
            let mut r = full(StatusCode::OK, body.clone());
            r.headers_mut()
                .insert("content-type", "application/json".parse().expect("header"));
            return r;
        }
        let token = st.token.lock().expect("lock").clone().unwrap_or_default();
        return full(
            StatusCode::OK,
            serde_json::json!({"token": token, "expires_in": 300}).to_string(),
        );
    }
    let token = st.token.lock().expect("lock").clone();
    if let Some(token) = token {
        let ok = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {token}"));
        if !ok {
            let host = req
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("127.0.0.1")
                .to_owned();
            let mut r = full(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
            );
            let realm = st.realm.lock().expect("lock").clone();
            let realm = realm.unwrap_or_else(|| format!("http://{host}/token"));
            let v = format!(r#"Bearer realm="{realm}",service="fake""#);
            r.headers_mut()
                .insert("www-authenticate", v.parse().expect("header"));
            return r;
        }
        if let Some(after) = expire_after
            && st.token_uses.fetch_add(1, Ordering::Relaxed) + 1 == after
        {
            // This request was the token's last: later ones with it get 401.
            *st.token.lock().expect("lock") = Some(format!("{token}-renewed"));
        }
    }
    if let Behaviour::Status(s) = behaviour {
        let mut r = full(
            StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            r#"{"errors":[{"code":"UNAVAILABLE"}]}"#,
        );
        r.headers_mut()
            .insert("retry-after", "7".parse().expect("header"));
        return r;
    }
    if path == "/v2/" {
        return full(StatusCode::OK, "{}");
    }
    // An endless redirect chain, and a "CDN" that serves blobs at /cdn/<digest>.
    if let Some(n) = path.strip_prefix("/loop/") {
        let next = n.parse::<u64>().unwrap_or(0) + 1;
        let mut r = full(StatusCode::FOUND, "");
        r.headers_mut()
            .insert("location", format!("/loop/{next}").parse().expect("header"));
        return r;
    }
    if let Some(digest) = path.strip_prefix("/cdn/") {
        let found = st.blobs.lock().expect("lock").get(digest).cloned();
        return match found {
            Some(data) => {
                let len = data.len();
                let mut r = Response::new(plain_body(data));
                r.headers_mut().insert("content-length", len.into());
                r
            }
            None => full(StatusCode::NOT_FOUND, "{}"),
        };
    }
    if let Behaviour::Stall(d) = behaviour {
        tokio::time::sleep(d).await;
    }
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        let found = st
            .manifests
            .lock()
            .expect("lock")
            .get(&(repo.to_owned(), reference.to_owned()))
            .cloned();
        if behaviour == Behaviour::HugeManifest && !head {
            return huge_manifest();
        }
        if let Behaviour::ManifestGetStatus(s) = behaviour
            && !head
        {
            return full(
                StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                r#"{"errors":[{"code":"DENIED"}]}"#,
            );
        }
        let index = |mt: &str| mt.contains("index") || mt.contains("list");
        let found = match found {
            Some((mt, _))
                if behaviour == Behaviour::Negotiate && !index(&mt) && !accepts(&req, &mt) =>
            {
                let (bytes, digest) = schema1(repo, reference);
                let len = bytes.len();
                let mut r = full(StatusCode::OK, if head { Bytes::new() } else { bytes });
                let h = r.headers_mut();
                h.insert(
                    "content-type",
                    "application/vnd.docker.distribution.manifest.v1+prettyjws"
                        .parse()
                        .expect("header"),
                );
                h.insert("docker-content-digest", digest.parse().expect("header"));
                h.insert("content-length", len.into());
                return r;
            }
            found => found,
        };
        return match found {
            Some((mt, bytes)) => {
                let len = bytes.len();
                let mut r = full(
                    StatusCode::OK,
                    if head { Bytes::new() } else { bytes.clone() },
                );
                let h = r.headers_mut();
                h.insert("content-type", mt.parse().expect("header"));
                h.insert(
                    "docker-content-digest",
                    sha256(&bytes).parse().expect("header"),
                );
                h.insert("content-length", len.into());
                h.insert("ratelimit-remaining", "42;w=21600".parse().expect("header"));
                r
            }
            None => full(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#,
            ),
        };
    }
    if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
        let hidden = st
            .hidden_repos
            .lock()
            .expect("lock")
            .iter()
            .any(|r| r == repo);
        let found = st.blobs.lock().expect("lock").get(digest).cloned();
        let Some(data) = found.filter(|_| !hidden) else {
            return full(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#,
            );
        };
        let len = data.len();
        let mut behaviour = behaviour;
        let mut reset_at = None;
        let range = req
            .headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(range) = &range
            && !head
        {
            st.ranges.lock().expect("lock").push(range.clone());
        }
        let from = match range_start(&req) {
            Some(n) if !head && !ignore_range => n,
            _ => 0,
        };
        if from > 0 && from >= len {
            let mut r = full(StatusCode::RANGE_NOT_SATISFIABLE, "");
            r.headers_mut().insert(
                "content-range",
                format!("bytes */{len}").parse().expect("header"),
            );
            return r;
        }
        if !head {
            if let Some((bytes, times)) = reset_after
                && st.resets.fetch_add(1, Ordering::Relaxed) < times
            {
                reset_at = Some(bytes);
            }
            let n = st.blob_gets.fetch_add(1, Ordering::Relaxed) + 1;
            match &behaviour {
                Behaviour::Redirect(to) => {
                    let mut r = full(StatusCode::TEMPORARY_REDIRECT, "");
                    let to = to.replace("{digest}", digest);
                    r.headers_mut()
                        .insert("location", to.parse().expect("redirect header"));
                    return r;
                }
                Behaviour::Flaky { fail_every }
                    if *fail_every > 0 && n.is_multiple_of(*fail_every) =>
                {
                    if (n / fail_every).is_multiple_of(2) {
                        let mut r = full(
                            StatusCode::SERVICE_UNAVAILABLE,
                            r#"{"errors":[{"code":"UNAVAILABLE"}]}"#,
                        );
                        r.headers_mut()
                            .insert("retry-after", "1".parse().expect("header"));
                        return r;
                    }
                    behaviour = Behaviour::Cut;
                }
                _ => {}
            }
        }
        let announced = if behaviour == Behaviour::LyingLength {
            len - from + 1024 * 1024
        } else {
            len - from
        };
        let body: Body = if head {
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed()
        } else {
            let part = Part {
                offset: from,
                total: len,
                reset_at,
                fd,
            };
            blob_body(data.slice(from..), behaviour, part)
        };
        let mut r = Response::new(body);
        if from > 0 {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            r.headers_mut().insert(
                "content-range",
                format!("bytes {from}-{}/{len}", len - 1)
                    .parse()
                    .expect("header"),
            );
        }
        r.headers_mut().insert("content-length", announced.into());
        r.headers_mut()
            .insert("docker-content-digest", digest.parse().expect("header"));
        return r;
    }
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        let tags: Vec<String> = st
            .manifests
            .lock()
            .expect("lock")
            .keys()
            .filter(|(r, t)| r == repo && !t.contains(':'))
            .map(|(_, t)| t.clone())
            .collect();
        return full(
            StatusCode::OK,
            serde_json::json!({"name": repo, "tags": tags}).to_string(),
        );
    }
    full(StatusCode::NOT_FOUND, "{}")
}

/// Waits while the behaviour is [`Behaviour::Hang`] (checked every 10 ms, 120 s at most);
/// returns whether it changed.
async fn wait_while_hanging(st: &State) -> bool {
    let hanging = || *st.behaviour.lock().expect("lock") == Some(Behaviour::Hang);
    for _ in 0..12_000 {
        if !hanging() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    !hanging()
}

/// Which part of a blob a body is, and how it ends.
struct Part {
    /// Where in the blob the body starts.
    offset: usize,
    /// The blob's length.
    total: usize,
    /// Reset the connection after this many bytes of the body.
    reset_at: Option<usize>,
    /// The connection's socket.
    fd: RawFd,
}

fn plain_body(data: Bytes) -> Body {
    let total = data.len();
    let part = Part {
        offset: 0,
        total,
        reset_at: None,
        fd: -1,
    };
    blob_body(data, Behaviour::Normal, part)
}

fn blob_body(data: Bytes, behaviour: Behaviour, part: Part) -> Body {
    let pieces: Vec<Bytes> = {
        let mut v = Vec::new();
        let mut i = 0;
        while i < data.len() {
            let end = (i + 64 * 1024).min(data.len());
            v.push(data.slice(i..end));
            i = end;
        }
        v
    };
    let stream = async_stream(pieces, behaviour, data.len(), part);
    BodyExt::boxed(StreamBody::new(stream))
}

/// Sets SO_LINGER to zero on a connection's socket and fails its body: hyper closes the
/// connection, which resets it (RST) instead of closing it.
fn reset_connection(fd: RawFd) {
    if fd < 0 {
        return;
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is the socket of the connection whose body is being sent: open while its
    // body streams. setsockopt only reads `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn async_stream(
    pieces: Vec<Bytes>,
    behaviour: Behaviour,
    len: usize,
    part: Part,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut sent = 0usize;
        let n = pieces.len();
        // The middle of the blob, as an offset into this body (StallMidway).
        let mid = (part.total / 2).checked_sub(part.offset);
        for (i, mut p) in pieces.into_iter().enumerate() {
            if let Some(at) = part.reset_at
                && sent + p.len() > at
            {
                let head = p.slice(..at - sent);
                if !head.is_empty() && tx.send(Ok(Frame::data(head))).await.is_err() {
                    return;
                }
                // Let hyper write what was sent before the connection goes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                reset_connection(part.fd);
                let _ = tx
                    .send(Err(std::io::Error::other("reset by the fake upstream")))
                    .await;
                return;
            }
            match &behaviour {
                Behaviour::Cut if sent + p.len() > len / 2 => {
                    let _ = tx
                        .send(Err(std::io::Error::other("cut by the fake upstream")))
                        .await;
                    return;
                }
                Behaviour::Corrupt if i + 1 == n => {
                    let mut v = p.to_vec();
                    if let Some(last) = v.last_mut() {
                        *last ^= 0xff;
                    }
                    p = Bytes::from(v);
                }
                Behaviour::Slow(d) => tokio::time::sleep(*d).await,
                Behaviour::StallMidway(d)
                    if mid.is_some_and(|m| m > 0 && sent < m && sent + p.len() >= m) =>
                {
                    // Send up to the middle, then go silent.
                    let mid = mid.unwrap_or(0) - sent;
                    let head = p.slice(..mid);
                    p = p.slice(mid..);
                    sent += head.len();
                    if !head.is_empty() && tx.send(Ok(Frame::data(head))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(*d).await;
                    if p.is_empty() {
                        continue;
                    }
                }
                _ => {}
            }
            sent += p.len();
            if tx.send(Ok(Frame::data(p))).await.is_err() {
                return;
            }
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A 5 MiB JSON manifest-like body, in 64 KiB chunks, without a Content-Length.
fn huge_manifest() -> Response<Body> {
    const SIZE: usize = 5 * 1024 * 1024;
    let mut v = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","annotations":{"pad":""#.to_vec();
    v.resize(SIZE - 3, b'a');
    v.extend_from_slice(b"\"}}");
    let data = Bytes::from(v);
    let mut r = Response::new(plain_body(data));
    r.headers_mut().insert(
        "content-type",
        "application/vnd.oci.image.manifest.v1+json"
            .parse()
            .expect("header"),
    );
    r
}

/// Sets SO_LINGER to zero, so that closing the socket resets the connection.
fn linger_zero(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_zero_linger()
}
