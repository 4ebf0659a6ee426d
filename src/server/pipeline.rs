//! Every registry request, whichever transport read it, goes through these phases in order:
//!
//! 1. **admit** — a header refused when the head was built (400), the URI length (414), the
//!    client's request rate (429);
//! 2. **route** — which operation and which configured registry/repository ([`Router`]),
//!    and whether the method is one that operation takes;
//! 3. **authorize** — `[auth]`: who it is and whether they may do this (401 with a challenge,
//!    or 403);
//! 4. **answer** — the mirror's [`Answer`]: JSON, a manifest, a blob (cached, filling or
//!    headers only) or an error;
//!
//! and then [`render`] decides the status and headers once ([`ResponseHead`]) and what body
//! follows ([`Payload`]). The transports only read heads and write what this returns.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

use super::auth::{Denial, Identity};
use super::meter::Meter;
use super::request::{Credentials, Method, RequestHead};
use super::response::{Length, Payload, ResponseHead};
use crate::app::App;
use crate::cache::{Fill, Manifest};
use crate::config::{Action, NotifyEvent};
use crate::error::{ErrorCode, RegistryError};
use crate::hosted::BodyStream;
use crate::metrics::{CacheResult, RequestKind};
use crate::mirror::{BlobAnswer, Via};
use crate::oci::{ByteRange, Digest, RangeError, parse_range};
use crate::route::{Route, Target, ns_param, url_name};

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const TEXT: HeaderValue = HeaderValue::from_static("text/plain");
const OCTET: HeaderValue = HeaderValue::from_static("application/octet-stream");
const BYTES: HeaderValue = HeaderValue::from_static("bytes");

/// What a request is answered with, before it becomes status, headers and body.
pub enum Answer {
    /// A small JSON document (ping, tags, catalog, token).
    Json(Bytes),
    /// Plain text (a replica's instance id).
    Text(Bytes),
    Manifest(Arc<Manifest>),
    Blob {
        digest: Digest,
        body: BlobBody,
        /// The blob's length, when known.
        len: Option<u64>,
    },
    Error(Box<Refusal>),
    /// Any other answer: a status, its headers and a small body (push, delete, listings).
    Custom {
        status: StatusCode,
        headers: Vec<(http::HeaderName, String)>,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
}

/// Where a blob's bytes come from.
pub enum BlobBody {
    Cached(Arc<std::fs::File>),
    Filling(Arc<Fill>),
    /// Headers only (a HEAD answered without the bytes at hand).
    Empty,
}

/// An error answer with what goes with it.
pub struct Refusal {
    pub error: RegistryError,
    /// `WWW-Authenticate` for a 401.
    pub challenge: Option<String>,
    /// The blob length for a 416's `Content-Range: bytes */LEN`.
    pub range_total: Option<u64>,
}

impl From<RegistryError> for Refusal {
    fn from(error: RegistryError) -> Refusal {
        Refusal {
            error,
            challenge: None,
            range_total: None,
        }
    }
}

impl From<RegistryError> for Answer {
    fn from(error: RegistryError) -> Answer {
        Answer::Error(Box::new(error.into()))
    }
}

/// A finished answer: the head to send, the body after it, and the request's meter (which
/// the transport feeds with the bytes it sends; it records the request when dropped).
pub struct Reply {
    pub head: ResponseHead,
    pub payload: Payload,
    pub meter: Meter,
}

/// Runs a request through every phase. `body` is the request body, for requests that have one.
pub async fn handle(app: &App, req: RequestHead, body: Option<BodyStream>) -> Reply {
    let mut meter = Meter::start(app.mirror.metrics_arc(), &req);
    let (answer, cache) = match run(app, &req, &mut meter, body).await {
        Ok(a) => a,
        Err(e) => (Answer::from(e), None),
    };
    meter.cache = cache;
    if let Answer::Error(refusal) = &answer {
        meter.reason = Some(refusal.error.message.clone());
    }
    let (head, payload) = render(answer, &req);
    meter.status = head.status.as_u16();
    meter.path = req.path;
    meter.query = req.query;
    Reply {
        head,
        payload,
        meter,
    }
}

async fn run(
    app: &App,
    req: &RequestHead,
    meter: &mut Meter,
    body: Option<BodyStream>,
) -> Result<(Answer, Option<CacheResult>), RegistryError> {
    admit(app, req)?;
    let route = route(app, req)?;
    meter.kind = kind_of(&route, req.method);
    meter.registry = route.target().map(|t| t.registry.clone());
    let who = match authorize(app, req, &route).await {
        Ok(who) => who,
        Err(refusal) => return Ok((Answer::Error(refusal), None)),
    };
    meter.user = match &who {
        Some(w) => Some(w.name().to_owned()),
        None if req.is_internal() => Some("(warm)".to_owned()),
        None => None,
    };
    if let Some(hosted) = &app.hosted
        && route
            .target()
            .is_some_and(|t| hosted.registry(&t.registry).is_some())
    {
        let a = super::hosted::answer(app, hosted, req, route, who.as_ref(), body).await?;
        return Ok((a, None));
    }
    answer(app, req, route, who).await
}

/// Phase 1: what is refused before the request is even routed.
fn admit(app: &App, req: &RequestHead) -> Result<(), RegistryError> {
    if let Some(defect) = &req.defect {
        return Err(defect.clone().into());
    }
    if req.target_len > super::request::MAX_URI {
        return Err(
            RegistryError::new(ErrorCode::NameInvalid, "request URI too long")
                .with_status(StatusCode::URI_TOO_LONG),
        );
    }
    if req.is_internal() {
        return Ok(());
    }
    match app.over_client_limit(req.client) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Phase 2: the route, and whether it takes this method.
fn route(app: &App, req: &RequestHead) -> Result<Route, RegistryError> {
    let route = app
        .router
        .route(&req.path, ns_param(req.query.as_deref()))?;
    let hosted = route
        .target()
        .is_some_and(|t| app.router.is_hosted(&t.registry));
    let m = req.method;
    let ok = match &route {
        Route::Manifest { .. } => {
            m.is_read() || (hosted && matches!(m, Method::Put | Method::Delete))
        }
        Route::Blob { .. } => m.is_read() || (hosted && m == Method::Delete),
        Route::Uploads { .. } => hosted && m == Method::Post,
        Route::Upload { .. } => {
            hosted
                && matches!(
                    m,
                    Method::Get | Method::Head | Method::Patch | Method::Put | Method::Delete
                )
        }
        _ => m.is_read(),
    };
    if ok {
        return Ok(route);
    }
    Err(match route.target() {
        Some(t) if !hosted => RegistryError::new(
            ErrorCode::Unsupported,
            format!(
                "{} is mirrored from upstream: only GET and HEAD are supported (push to a [[hosted]] registry)",
                t.registry
            ),
        ),
        _ => RegistryError::new(
            ErrorCode::Unsupported,
            "method not allowed on this endpoint",
        ),
    })
}

fn kind_of(route: &Route, method: Method) -> RequestKind {
    if method == Method::Delete {
        return RequestKind::Delete;
    }
    match route {
        Route::Ping => RequestKind::Ping,
        Route::Manifest { .. } if method == Method::Put => RequestKind::Push,
        Route::Manifest { .. } => RequestKind::Manifest,
        Route::Blob { .. } => RequestKind::Blob,
        Route::Uploads { .. } | Route::Upload { .. } => RequestKind::Push,
        Route::Tags { .. } => RequestKind::Tags,
        Route::Catalog { .. } => RequestKind::Catalog,
        Route::Referrers { .. } => RequestKind::Referrers,
        Route::Token | Route::PeerId => RequestKind::Other,
    }
}

/// What a request does to its repository, for the rules of `[auth]`.
fn action_of(route: &Route, method: Method) -> Action {
    match (route, method) {
        (_, Method::Delete) => Action::Delete,
        (Route::Uploads { .. } | Route::Upload { .. }, _) => Action::Push,
        (Route::Manifest { .. }, Method::Put) => Action::Push,
        _ => Action::Pull,
    }
}

/// Phase 3: `[auth]`. Ok(None) when auth is off (or for the token endpoint and the peer id,
/// which authenticate themselves or need nothing).
async fn authorize(
    app: &App,
    req: &RequestHead,
    route: &Route,
) -> Result<Option<Identity>, Box<Refusal>> {
    let Some(auth) = &app.auth else {
        return Ok(None);
    };
    // A warm job was authorized by the admin token; the rest of the pipeline still applies.
    if req.is_internal() || matches!(route, Route::Token | Route::PeerId) {
        return Ok(None);
    }
    let credentials = req.authorization.as_ref().map(|a| &a.credentials);
    let action = action_of(route, req.method);
    match auth
        .authorize(
            credentials,
            url_name(&req.path),
            route.target(),
            req.client,
            action,
        )
        .await
    {
        Ok(who) => Ok(Some(who)),
        Err(Denial::Forbidden(error) | Denial::Limited(error)) => Err(Box::new(error.into())),
        Err(Denial::Challenge(error, scope)) => {
            let insufficient = error.code == ErrorCode::Denied || error.insufficient_scope;
            let challenge = auth.challenge(
                req.host.as_deref(),
                app.tls.is_some(),
                scope.as_deref(),
                insufficient,
            );
            Err(Box::new(Refusal {
                error,
                challenge: Some(challenge),
                range_total: None,
            }))
        }
    }
}

/// Phase 4: the answer, and how the cache answered (for manifests and blobs).
async fn answer(
    app: &App,
    req: &RequestHead,
    route: Route,
    who: Option<Identity>,
) -> Result<(Answer, Option<CacheResult>), RegistryError> {
    let head = req.method == Method::Head;
    let json = |b: String| Ok((Answer::Json(Bytes::from(b)), None));
    match route {
        Route::Ping => json("{}".into()),
        Route::PeerId => {
            let id = app.mirror.cluster_id().unwrap_or_default().to_owned();
            Ok((Answer::Text(Bytes::from(id)), None))
        }
        Route::Token => token(app, req).await.map(|b| (Answer::Json(b), None)),
        Route::Catalog { registry } => {
            let n = parse_n(req)?;
            let repos = catalog(app, registry, who.as_ref(), req.query_param("last"), n);
            json(serde_json::json!({ "repositories": repos }).to_string())
        }
        Route::Uploads { .. } | Route::Upload { .. } => Err(RegistryError::new(
            ErrorCode::Unsupported,
            "push goes to a [[hosted]] registry",
        )),
        Route::Referrers { target, digest } => {
            let index = app.mirror.referrers(&target, &digest).await?;
            let filter = req.query_decoded("artifactType");
            let mut headers = Vec::new();
            let body = match &filter {
                Some(f) => {
                    headers.push((
                        http::HeaderName::from_static("oci-filters-applied"),
                        "artifactType".to_owned(),
                    ));
                    crate::mirror::filter_index(&index, f)
                }
                None => index,
            };
            Ok((
                Answer::Custom {
                    status: StatusCode::OK,
                    headers,
                    content_type: Some(HeaderValue::from_static(crate::oci::OCI_INDEX)),
                    body,
                },
                None,
            ))
        }
        Route::Tags { target } => {
            let n = parse_n(req)?;
            let last = req
                .query_param("last")
                .map(|l| {
                    l.parse::<crate::oci::Tag>()
                        .map(|_| l)
                        .map_err(|_| RegistryError::new(ErrorCode::NameInvalid, "invalid last"))
                })
                .transpose()?;
            let body = app.mirror.tags(&target, n, last).await?;
            Ok((Answer::Json(body), None))
        }
        Route::Manifest { target, reference } => {
            let accept: Vec<&str> = req.accept.iter().map(String::as_str).collect();
            // A warm asks upstream again whatever 404 it answered within `negative_ttl`.
            if req.is_internal() {
                app.mirror.forget_missing(&target, &reference);
            }
            let (m, result) = app.mirror.manifest(&target, &reference, &accept).await?;
            app.mirror
                .metrics()
                .record_cache(RequestKind::Manifest, result);
            // A warm is not a pull: no pull count, no pull event.
            if !head && !req.is_internal() {
                app.mirror
                    .manifest_store()
                    .record_pull(&target.registry, &target.repo, &reference);
                let tag = match &reference {
                    crate::oci::Reference::Tag(t) => Some(t.to_string()),
                    crate::oci::Reference::Digest(_) => None,
                };
                let size = m.bytes.len() as u64;
                super::hosted::notify(
                    app,
                    req,
                    who.as_ref(),
                    NotifyEvent::Pull,
                    &target,
                    &m.media_type,
                    Some(&m.digest),
                    size,
                    tag,
                );
            }
            Ok((Answer::Manifest(m), Some(result)))
        }
        Route::Blob { target, digest } => {
            let via = Via {
                peer: req.from_peer,
                authorization: req.raw_authorization(),
            };
            let (answer, result) = app.mirror.blob(&target, &digest, head, via).await?;
            app.mirror.metrics().record_cache(RequestKind::Blob, result);
            let (body, len) = match answer {
                BlobAnswer::Cached(blob) => (BlobBody::Cached(blob.file), Some(blob.len)),
                BlobAnswer::Filling { fill, len } => (BlobBody::Filling(fill), len),
                BlobAnswer::Head { len } => (BlobBody::Empty, len),
            };
            Ok((Answer::Blob { digest, body, len }, Some(result)))
        }
    }
}

/// The repositories of `_catalog`: of the registry `ns` named, or of every hosted registry
/// (named as a client names them without `ns`) and the default registry; only what the caller
/// may pull, sorted, after `last`, at most `n`.
fn catalog(
    app: &App,
    registry: Option<Arc<str>>,
    who: Option<&Identity>,
    last: Option<&str>,
    n: Option<u32>,
) -> Vec<String> {
    let mut found: Vec<(String, Target)> = Vec::new();
    let mut add = |registry: &Arc<str>, repos: Vec<String>, shown: &dyn Fn(&str) -> String| {
        for r in repos {
            if let Ok(repo) = r.parse() {
                let t = Target {
                    registry: registry.clone(),
                    repo,
                };
                found.push((shown(&r), t));
            }
        }
    };
    let list = |registry: &Arc<str>| match app
        .hosted
        .as_ref()
        .filter(|h| h.registry(registry).is_some())
    {
        Some(h) => h.catalog(registry),
        None => app.mirror.catalog(registry, None),
    };
    match registry {
        Some(r) => add(&r, list(&r), &|s: &str| s.to_owned()),
        None => {
            if let Some(h) = &app.hosted {
                for reg in h.registries() {
                    let shown = |s: &str| {
                        if reg.globs.iter().any(|g| g.matches(s)) {
                            s.to_owned()
                        } else {
                            format!("{}/{s}", reg.name)
                        }
                    };
                    add(&reg.name, h.catalog(&reg.name), &shown);
                }
            }
            if let Some(d) = app.router.default_registry() {
                add(d, list(d), &|s: &str| s.to_owned());
            }
        }
    }
    // With [auth], list only what the caller may pull.
    if let (Some(auth), Some(who)) = (&app.auth, who) {
        found.retain(|(_, t)| auth.allowed(who, t, Action::Pull));
    }
    let mut repos: Vec<String> = found
        .into_iter()
        .map(|(s, _)| s)
        .filter(|s| last.is_none_or(|l| s.as_str() > l))
        .collect();
    repos.sort();
    repos.dedup();
    if let Some(n) = n {
        repos.truncate(n as usize);
    }
    repos
}

/// The token endpoint of `[auth]`: Basic credentials (or none, for anonymous) in, a token for
/// the allowed `repository:<name>:pull` scopes out.
async fn token(app: &App, req: &RequestHead) -> Result<Bytes, RegistryError> {
    let auth = app
        .auth
        .as_ref()
        .ok_or_else(|| RegistryError::new(ErrorCode::NameUnknown, "no token endpoint"))?;
    let who = match req.authorization.as_ref().map(|a| &a.credentials) {
        None => Identity::Anonymous,
        Some(Credentials::Basic { user, password }) => auth
            .login(user, password, req.client)
            .await
            .map_err(|d| d.into_error())?,
        Some(_) => {
            return Err(RegistryError::new(
                ErrorCode::Unauthorized,
                "invalid credentials",
            ));
        }
    };
    let scopes: Vec<String> =
        url::form_urlencoded::parse(req.query.as_deref().unwrap_or("").as_bytes())
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .collect();
    let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
    let answer = auth
        .issue(&who, &scopes, &app.router)
        .map_err(|e| RegistryError::new(ErrorCode::Internal, format!("cannot sign token: {e}")))?;
    serde_json::to_vec(&answer)
        .map(Bytes::from)
        .map_err(|e| RegistryError::new(ErrorCode::Internal, e.to_string()))
}

pub(super) fn parse_n(req: &RequestHead) -> Result<Option<u32>, RegistryError> {
    req.query_param("n")
        .map(|n| {
            n.parse::<u32>().map_err(|_| {
                RegistryError::new(ErrorCode::Unsupported, "n must be a non-negative integer")
                    .with_status(StatusCode::BAD_REQUEST)
            })
        })
        .transpose()
}

/// The whole HTTP/1 answer to a connection over `max_connections_per_client`: 503 with
/// `Retry-After`, then the connection closes.
pub fn too_many_connections() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let error = RegistryError::new(
            ErrorCode::Unavailable,
            "too many connections from this client; retry later",
        )
        .with_status(StatusCode::SERVICE_UNAVAILABLE)
        .with_retry_after(1);
        let (head, payload) = refusal(error.into(), false);
        let mut out = Vec::new();
        head.write_http1(&mut out, false, false);
        if let Payload::Bytes(b) = payload {
            out.extend_from_slice(&b);
        }
        out
    })
}

/// Decides status, headers and body of an answer, once for both transports.
pub fn render(answer: Answer, req: &RequestHead) -> (ResponseHead, Payload) {
    let bodyless = req.method == Method::Head;
    let small = |content_type: HeaderValue, b: Bytes| {
        let head = ResponseHead::new(StatusCode::OK, Length::Known(b.len() as u64))
            .header(header::CONTENT_TYPE, content_type);
        (
            head,
            if bodyless {
                Payload::Empty
            } else {
                Payload::Bytes(b)
            },
        )
    };
    match answer {
        Answer::Json(b) => small(JSON, b),
        Answer::Text(b) => small(TEXT, b),
        Answer::Manifest(m) if req.has_etag(|| etag_of(&m.digest)) => {
            let head = ResponseHead::new(StatusCode::NOT_MODIFIED, Length::Unknown)
                .header(DIGEST_HEADER, m.digest_header.clone())
                .header(header::ETAG, m.etag_header.clone());
            (head, Payload::Empty)
        }
        Answer::Manifest(m) => {
            let head = ResponseHead::new(StatusCode::OK, Length::Known(m.bytes.len() as u64))
                .header(header::CONTENT_TYPE, m.content_type.clone())
                .header(DIGEST_HEADER, m.digest_header.clone())
                .header(header::ETAG, m.etag_header.clone());
            let payload = if bodyless {
                Payload::Empty
            } else {
                Payload::Bytes(m.bytes.clone())
            };
            (head, payload)
        }
        Answer::Blob { digest, body, len } => blob(&digest, body, len, req),
        Answer::Error(r) => refusal(*r, bodyless),
        Answer::Custom {
            status,
            headers,
            content_type,
            body,
        } => {
            // A 204 has no body and announces none.
            let length = if status == StatusCode::NO_CONTENT {
                Length::Unknown
            } else {
                Length::Known(body.len() as u64)
            };
            let mut head = ResponseHead::new(status, length);
            if let Some(ct) = content_type {
                head = head.header(header::CONTENT_TYPE, ct);
            }
            for (name, value) in &headers {
                head = head.header_str(name.clone(), value);
            }
            let payload = if bodyless || body.is_empty() {
                Payload::Empty
            } else {
                Payload::Bytes(body)
            };
            (head, payload)
        }
    }
}

const DIGEST_HEADER: http::HeaderName = http::HeaderName::from_static("docker-content-digest");

/// The entity tag of a manifest or blob: its digest, quoted.
fn etag_of(digest: &Digest) -> String {
    format!("\"{digest}\"")
}

fn refusal(r: Refusal, bodyless: bool) -> (ResponseHead, Payload) {
    let body = Bytes::from(r.error.body());
    let mut head = ResponseHead::new(r.error.status(), Length::Known(body.len() as u64))
        .header(header::CONTENT_TYPE, JSON);
    if let Some(secs) = r.error.retry_after {
        head = head.header(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Some(c) = &r.challenge {
        head = head.header_str(header::WWW_AUTHENTICATE, c);
    }
    if let Some(total) = r.range_total {
        head = head.header_str(header::CONTENT_RANGE, &format!("bytes */{total}"));
    }
    (
        head,
        if bodyless {
            Payload::Empty
        } else {
            Payload::Bytes(body)
        },
    )
}

/// A blob response, whole or for a single range.
fn blob(
    digest: &Digest,
    body: BlobBody,
    len: Option<u64>,
    req: &RequestHead,
) -> (ResponseHead, Payload) {
    let digest_text = digest.to_string();
    // The digest is formatted once per request; the entity tag is it quoted.
    let etag = format!("\"{digest_text}\"");
    if req.has_etag(|| etag.clone()) {
        let head = ResponseHead::new(StatusCode::NOT_MODIFIED, Length::Unknown)
            .header_str(header::ETAG, &etag)
            .header_str(DIGEST_HEADER, &digest_text);
        return (head, Payload::Empty);
    }
    let bodyless = req.method == Method::Head || matches!(body, BlobBody::Empty);
    let wanted = req.range.as_deref().filter(|_| req.range_applies(&etag));
    let range = match (wanted, len) {
        (Some(r), Some(total)) if !bodyless => match parse_range(r, total) {
            Ok(br) => Some(br),
            Err(RangeError::Ignore) => None,
            Err(RangeError::Unsatisfiable) => {
                let refused = Refusal {
                    error: RegistryError::new(
                        ErrorCode::RangeInvalid,
                        format!("range {r:?} is outside the blob of {total} bytes"),
                    ),
                    challenge: None,
                    range_total: Some(total),
                };
                return refusal(refused, false);
            }
        },
        _ => None,
    };
    let (status, start, length) = match (range, len) {
        (Some(r), Some(_)) => (StatusCode::PARTIAL_CONTENT, r.start, Length::Known(r.len())),
        (_, Some(total)) => (StatusCode::OK, 0, Length::Known(total)),
        (_, None) => (StatusCode::OK, 0, Length::Unknown),
    };
    let mut head = ResponseHead::new(status, length)
        .header(header::CONTENT_TYPE, OCTET)
        .header(header::ACCEPT_RANGES, BYTES)
        .header_str(header::ETAG, &etag)
        .header_str(DIGEST_HEADER, &digest_text);
    if let (Some(ByteRange { start, end }), Some(total)) = (range, len) {
        head = head.header_str(
            header::CONTENT_RANGE,
            &format!("bytes {start}-{end}/{total}"),
        );
    }
    if bodyless {
        return (head, Payload::Empty);
    }
    let payload = match (body, length) {
        (BlobBody::Cached(file), Length::Known(n)) => Payload::File {
            file,
            start,
            len: n,
        },
        (BlobBody::Filling(fill), Length::Known(n)) => Payload::Fill {
            fill,
            start,
            end: Some(start + n),
        },
        (BlobBody::Filling(fill), Length::Unknown) => Payload::Fill {
            fill,
            start: 0,
            end: None,
        },
        // A cached blob always has a length; no body is the only safe answer otherwise.
        (BlobBody::Cached(_) | BlobBody::Empty, _) => Payload::Empty,
    };
    (head, payload)
}
