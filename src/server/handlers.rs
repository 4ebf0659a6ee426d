//! The registry API: turns a routed request into a mirror call and the mirror's answer into
//! an HTTP response with the headers clients rely on.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};

use super::auth::{Auth, Denial, Identity};
use super::body::{Body, Meter};
use crate::error::{ErrorCode, RegistryError};
use crate::metrics::{CacheResult, RequestKind};
use crate::mirror::{BlobAnswer, Mirror, Via};
use crate::oci::{ByteRange, Digest, RangeError, parse_range};
use crate::route::{Route, Router, Target, ns_param, url_name};

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const OCTET: HeaderValue = HeaderValue::from_static("application/octet-stream");
const BYTES: HeaderValue = HeaderValue::from_static("bytes");

pub struct App {
    pub router: Router,
    pub mirror: Mirror,
    /// Client authentication and rules (None: everyone may pull everything configured).
    pub auth: Option<Auth>,
    /// Whether the registry listener speaks TLS (for the challenge's realm).
    pub tls: bool,
    /// Per-client request rate on the registry listener (None: unlimited).
    pub client_limit: Option<Arc<governor::DefaultKeyedRateLimiter<IpAddr>>>,
}

impl App {
    /// Checks a request against `[auth]`: Ok(None) when auth is off, Ok(who), or the error to
    /// send with the `WWW-Authenticate` challenge that goes with it.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        host: Option<&str>,
        path: &str,
        target: Option<&Target>,
    ) -> Result<Option<Identity>, (RegistryError, Option<String>)> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        match auth.authorize(authorization, url_name(path), target) {
            Ok(who) => Ok(Some(who)),
            Err(Denial::Forbidden(e)) => Err((e, None)),
            Err(Denial::Challenge(e, scope)) => {
                let insufficient = e.code == ErrorCode::Denied;
                Err((
                    e,
                    Some(auth.challenge(host, self.tls, scope.as_deref(), insufficient)),
                ))
            }
        }
    }

    /// The 429 a client over its request rate gets, or None.
    pub fn over_client_limit(&self, peer: IpAddr) -> Option<RegistryError> {
        let limiter = self.client_limit.as_ref()?;
        // Replicas asking a blob's owner carry many clients' requests.
        if self.mirror.is_peer(peer) {
            return None;
        }
        limiter.check_key(&peer).err().map(|_| {
            RegistryError::new(
                ErrorCode::TooManyRequests,
                "too many requests from this client; slow down",
            )
            .with_retry_after(1)
        })
    }
}

type Answer = Result<(Response<Body>, Option<CacheResult>), RegistryError>;

fn kind_of(route: &Result<Route, RegistryError>) -> RequestKind {
    match route {
        Ok(Route::Ping) => RequestKind::Ping,
        Ok(Route::Manifest { .. }) => RequestKind::Manifest,
        Ok(Route::Blob { .. }) => RequestKind::Blob,
        Ok(Route::Tags { .. }) => RequestKind::Tags,
        Ok(Route::Catalog { .. }) => RequestKind::Catalog,
        _ => RequestKind::Other,
    }
}

pub async fn handle<B>(app: Arc<App>, req: Request<B>, peer: IpAddr) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if path == crate::cluster::ID_PATH
        && let Some(id) = app.mirror.cluster_id()
    {
        let mut r = Response::new(Body::full(id.to_owned()));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return r;
    }
    let route = if path == "/token" && app.auth.is_some() {
        Ok(Route::Token)
    } else {
        app.router.route(&path, ns_param(req.uri().query()))
    };
    let kind = kind_of(&route);
    let registry = match &route {
        Ok(r) => r.target().map(|t| t.registry.clone()),
        Err(_) => None,
    };
    let mut user = None;
    let answer = match route {
        _ if uri_len(req.uri()) > super::MAX_URI => Err(RegistryError::new(
            ErrorCode::NameInvalid,
            "request URI too long",
        )
        .with_status(StatusCode::URI_TOO_LONG)),
        _ if app.client_limit.is_some()
            && let Some(e) = app.over_client_limit(peer) =>
        {
            Err(e)
        }
        Err(e) => Err(e),
        Ok(_) if method != Method::GET && method != Method::HEAD => Err(RegistryError::new(
            ErrorCode::Unsupported,
            "this mirror is read-only: only GET and HEAD are supported",
        )),
        Ok(Route::Token) => Ok((token(&app, &req), None)),
        Ok(route) => {
            let h = req.headers();
            let authorization = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
            match app.authorize(authorization, host, &path, route.target()) {
                Ok(who) => {
                    user = who.as_ref().map(|w| w.name().to_owned());
                    dispatch(&app, route, &req, who).await
                }
                Err((e, challenge)) => {
                    let mut r = error_response(&e);
                    if let Some(v) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
                        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                    }
                    Ok((r, None))
                }
            }
        }
    };
    let (mut resp, cache) = match answer {
        Ok(r) => r,
        Err(e) => (error_response(&e), None),
    };
    resp.headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
    let status = resp.status().as_u16();
    let meter = Meter {
        metrics: app.mirror.metrics_arc(),
        started,
        kind,
        method,
        path,
        registry,
        user,
        status,
        cache,
        bytes: 0,
        complete: false,
        aborted: None,
    };
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.metered(meter))
}

/// The length of a request target, without formatting it.
fn uri_len(uri: &http::Uri) -> usize {
    uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
}

pub fn error_response(e: &RegistryError) -> Response<Body> {
    let mut resp = Response::new(Body::full(e.body()));
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(header::CONTENT_TYPE, JSON);
    if let Some(secs) = e.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

fn accept_values(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

/// The token endpoint of `[auth]`: Basic credentials (or none, for anonymous) in, a token
/// for the allowed `repository:<name>:pull` scopes out.
fn token<B>(app: &App, req: &Request<B>) -> Response<Body> {
    let Some(auth) = &app.auth else {
        return error_response(&RegistryError::new(
            ErrorCode::NameUnknown,
            "no token endpoint",
        ));
    };
    let who = match req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        None => Identity::Anonymous,
        Some(v) => match auth.basic(v) {
            Ok(who) => who,
            Err(_) => {
                return error_response(&RegistryError::new(
                    ErrorCode::Unauthorized,
                    "invalid credentials",
                ));
            }
        },
    };
    let scopes: Vec<String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .collect();
    let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
    match auth.issue(&who, &scopes, &app.router) {
        Ok(answer) => {
            let body = serde_json::to_string(&answer).unwrap_or_default();
            let mut r = Response::new(Body::full(body));
            r.headers_mut().insert(header::CONTENT_TYPE, JSON);
            r
        }
        Err(e) => error_response(&RegistryError::new(ErrorCode::Internal, e)),
    }
}

async fn dispatch<B>(app: &App, route: Route, req: &Request<B>, who: Option<Identity>) -> Answer {
    let head = req.method() == Method::HEAD;
    match route {
        Route::Ping => {
            let mut r = Response::new(Body::full(Bytes::from_static(b"{}")));
            r.headers_mut().insert(header::CONTENT_TYPE, JSON);
            Ok((r, None))
        }
        Route::Token => Ok((token(app, req), None)),
        Route::Unsupported => Err(RegistryError::new(
            ErrorCode::Unsupported,
            "this mirror is read-only: push is not supported",
        )),
        Route::Catalog { registry } => {
            let query = req.uri().query();
            let n = parse_n(query)?;
            let mut repos = app
                .mirror
                .catalog(&registry, None, query_param(query, "last"));
            // With [auth], list only what the caller may pull.
            if let (Some(auth), Some(who)) = (&app.auth, &who) {
                repos.retain(|r| {
                    r.parse().is_ok_and(|repo| {
                        let t = Target {
                            registry: registry.clone(),
                            repo,
                        };
                        auth.allowed(who, &t)
                    })
                });
            }
            if let Some(n) = n {
                repos.truncate(n as usize);
            }
            let body = serde_json::json!({ "repositories": repos }).to_string();
            let mut r = Response::new(if head {
                Body::empty()
            } else {
                Body::full(body)
            });
            r.headers_mut().insert(header::CONTENT_TYPE, JSON);
            Ok((r, None))
        }
        Route::Tags { target } => {
            let query = req.uri().query();
            let n = parse_n(query)?;
            let last = query_param(query, "last")
                .map(|l| {
                    l.parse::<crate::oci::Tag>()
                        .map(|_| l)
                        .map_err(|_| RegistryError::new(ErrorCode::NameInvalid, "invalid last"))
                })
                .transpose()?;
            let body = app.mirror.tags(&target, n, last).await?;
            let len = body.len();
            let mut r = Response::new(if head {
                Body::empty()
            } else {
                Body::full(body)
            });
            r.headers_mut().insert(header::CONTENT_TYPE, JSON);
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Ok((r, None))
        }
        Route::Manifest { target, reference } => {
            let accept = accept_values(req.headers());
            let (m, result) = app.mirror.manifest(&target, &reference, &accept).await?;
            app.mirror
                .metrics()
                .record_cache(RequestKind::Manifest, result);
            let mut r = Response::new(if head {
                Body::empty()
            } else {
                Body::full(m.bytes.clone())
            });
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, m.content_type.clone());
            h.insert("docker-content-digest", m.digest_header.clone());
            h.insert(header::CONTENT_LENGTH, m.length_header.clone());
            h.insert(header::ETAG, m.etag_header.clone());
            Ok((r, Some(result)))
        }
        Route::Blob { target, digest } => {
            let h = req.headers();
            let via = Via {
                peer: h.contains_key(crate::cluster::PEER_HEADER),
                authorization: h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()),
            };
            let (answer, result) = app.mirror.blob(&target, &digest, head, via).await?;
            app.mirror.metrics().record_cache(RequestKind::Blob, result);
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok());
            let resp = match answer {
                BlobAnswer::Cached(blob) => {
                    let file = blob.file;
                    blob_response(&digest, Some(blob.len), range, head, |start, len| {
                        Body::file(file, start, len)
                    })?
                }
                BlobAnswer::Filling { fill, len } => {
                    blob_response(&digest, len, range, head, |start, n| {
                        let end = len.map(|_| start + n);
                        Body::stream(fill.reader(start, end).into_stream())
                    })?
                }
                BlobAnswer::Head { len } => {
                    blob_response(&digest, len, None, true, |_, _| Body::empty())?
                }
            };
            Ok((resp, Some(result)))
        }
    }
}

fn parse_n(query: Option<&str>) -> Result<Option<u32>, RegistryError> {
    query_param(query, "n")
        .map(|n| {
            n.parse::<u32>().map_err(|_| {
                RegistryError::new(ErrorCode::Unsupported, "n must be a non-negative integer")
                    .with_status(StatusCode::BAD_REQUEST)
            })
        })
        .transpose()
}

fn etag(digest: &Digest) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{digest}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

/// Builds a blob response, whole or for a single range. `body(start, len)` makes the body.
fn blob_response(
    digest: &Digest,
    len: Option<u64>,
    range: Option<&str>,
    head: bool,
    body: impl FnOnce(u64, u64) -> Body,
) -> Result<Response<Body>, RegistryError> {
    let range: Option<ByteRange> = match (range, len) {
        (Some(r), Some(len)) if !head => match parse_range(r, len) {
            Ok(br) => Some(br),
            Err(RangeError::Ignore) => None,
            Err(RangeError::Unsatisfiable) => {
                let mut e = error_response(&RegistryError::new(
                    ErrorCode::RangeInvalid,
                    format!("range {r:?} is outside the blob of {len} bytes"),
                ));
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    e.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(e);
            }
        },
        _ => None,
    };
    let (status, start, n) = match (range, len) {
        (Some(r), Some(total)) => (
            StatusCode::PARTIAL_CONTENT,
            r.start,
            Some((r.len(), total, r)),
        ),
        (_, Some(total)) => (
            StatusCode::OK,
            0,
            Some((total, total, ByteRange { start: 0, end: 0 })),
        ),
        (_, None) => (StatusCode::OK, 0, None),
    };
    let body = match (&n, head) {
        (_, true) => Body::empty(),
        (Some((count, _, _)), false) => body(start, *count),
        (None, false) => body(0, u64::MAX),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, OCTET);
    h.insert(header::ACCEPT_RANGES, BYTES);
    h.insert(header::ETAG, etag(digest));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v);
    }
    if let Some((count, total, r)) = n {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
        if status == StatusCode::PARTIAL_CONTENT
            && let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{total}", r.start, r.end))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}
