//! The admin listener: the status page (`/`), `/healthz`, `/readyz` and `/metrics`, open to
//! anyone who reaches the port; and the admin API under `/admin/`, which needs the `[admin]` token (or, without one, a
//! loopback `admin_listen`):
//!
//! - `POST /admin/gc[?dry_run=true][&untagged=true]`: garbage collection of the hosted
//!   registries; answers the JSON report.
//! - `GET /admin/cache[?registry=R]`: the cached images (`{"images": [...]}`).
//! - `POST /admin/cache/rm?registry=R&repository=REPO&reference=TAG|DIGEST[&dry_run=true]`:
//!   purges one image; answers what went and the bytes freed.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};

use super::body::Body;
use crate::app::App;
use crate::cache::check_writable;

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from_static(s.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Whether a request may use `/admin/`: it carries the token, or there is none and the
/// listener is loopback-only.
fn admitted<B>(app: &App, req: &Request<B>) -> Result<(), Box<Response<Body>>> {
    match &app.admin_token {
        Some(token) => {
            let sent = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            // Compared in constant time: the token is a password.
            let same = sent.len() == token.len()
                && sent
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            if same {
                Ok(())
            } else {
                Err(Box::new(json(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({"error": "the admin API needs Authorization: Bearer <[admin] token_file>"}),
                )))
            }
        }
        None if app.admin_loopback => Ok(()),
        None => Err(Box::new(json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({"error": "the admin API is off: admin_listen is not loopback and [admin] token_file is not set"}),
        ))),
    }
}

fn flag(query: Option<&str>, key: &str) -> bool {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .any(|(k, v)| k == key && (v == "true" || v == "1" || v.is_empty()))
}

fn param(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

async fn admin_api<B>(app: Arc<App>, req: Request<B>) -> Response<Body> {
    if let Err(refused) = admitted(&app, &req) {
        return *refused;
    }
    match (req.method(), req.uri().path()) {
        (&http::Method::POST, "/admin/gc") => {
            let Some(hosted) = app.hosted.clone() else {
                return json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "no [[hosted]] registry is configured"}),
                );
            };
            let dry_run = flag(req.uri().query(), "dry_run");
            let untagged = flag(req.uri().query(), "untagged");
            match hosted.gc(dry_run, untagged).await {
                Ok(report) => {
                    tracing::info!(
                        dry_run,
                        blobs = report.blobs.len(),
                        bytes = report.bytes,
                        manifests = report.manifests.len(),
                        "garbage collection"
                    );
                    json(
                        StatusCode::OK,
                        &serde_json::to_value(&report).unwrap_or_default(),
                    )
                }
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": e.to_string()}),
                ),
            }
        }
        (&http::Method::GET, "/admin/cache") => {
            let registry = param(req.uri().query(), "registry");
            let (m, b) = (
                app.mirror.manifest_store().clone(),
                app.mirror.blobs.clone(),
            );
            match tokio::task::spawn_blocking(move || {
                crate::cache::inventory::list(&m, &b, registry.as_deref())
            })
            .await
            {
                Ok(images) => json(StatusCode::OK, &serde_json::json!({ "images": images })),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": e.to_string()}),
                ),
            }
        }
        (&http::Method::POST, "/admin/cache/rm") => {
            let q = req.uri().query();
            let target = param(q, "registry")
                .zip(param(q, "repository"))
                .zip(param(q, "reference"));
            let Some(((registry, repository), reference)) = target else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "registry, repository and reference are required"}),
                );
            };
            let (Ok(repo), Ok(reference)) = (
                repository.parse::<crate::oci::RepoName>(),
                reference.parse::<crate::oci::Reference>(),
            ) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "invalid repository or reference"}),
                );
            };
            let dry_run = flag(q, "dry_run");
            let registry: Arc<str> = registry.into();
            let (m, b) = (
                app.mirror.manifest_store().clone(),
                app.mirror.blobs.clone(),
            );
            let reg = registry.clone();
            let done = tokio::task::spawn_blocking(move || {
                crate::cache::inventory::remove(&m, &b, &reg, &repo, &reference, dry_run)
            })
            .await;
            match done {
                Ok(Ok(p)) => {
                    tracing::info!(registry = %registry, repository, dry_run, bytes = p.bytes_freed, blobs = p.blobs.len(), "cache purge");
                    json(
                        StatusCode::OK,
                        &serde_json::to_value(&p).unwrap_or_default(),
                    )
                }
                Ok(Err(e)) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": e.to_string()}),
                ),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": e.to_string()}),
                ),
            }
        }
        (_, "/admin/gc") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "use POST"}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        ),
    }
}

/// The status page (see [`super::status`]), open like `/metrics`.
async fn status_page(app: Arc<App>, method: &http::Method) -> Response<Body> {
    if method != http::Method::GET && method != http::Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let page = tokio::task::spawn_blocking(move || {
        let data = super::status::StatusData::read(&app);
        super::status::render(&data, std::time::SystemTime::now())
    })
    .await;
    let Ok(page) = page else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot render the status page\n",
        );
    };
    let mut r = Response::new(Body::full(Bytes::from(page)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Nothing but the page itself and its inline style: no script, no outside asset.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub async fn handle<B>(app: Arc<App>, req: Request<B>) -> Response<Body> {
    if req.uri().path().starts_with("/admin/") {
        return admin_api(app, req).await;
    }
    match req.uri().path() {
        "/" => status_page(app, req.method()).await,
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if !app.mirror.blobs.is_ready() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "cache index loading\n");
            }
            if !app.mirror.cluster_ready() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "probing cluster peers\n");
            }
            let dir = app.cache_dir.join("tmp");
            match tokio::task::spawn_blocking(move || check_writable(&dir)).await {
                Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
                _ => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cache directory not writable\n",
                ),
            }
        }
        "/metrics" => {
            app.mirror.blobs.run_pending();
            let mut r = Response::new(Body::full(app.mirror.metrics().render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
