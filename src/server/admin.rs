//! The admin listener: the status page (`/`), `/healthz`, `/readyz` and `/metrics`, open to
//! anyone who reaches the port; and the admin API under `/admin/`, which needs the `[admin]` token (or, without one, a
//! loopback `admin_listen`):
//!
//! - `POST /admin/gc[?dry_run=true][&untagged=true]`: garbage collection of the hosted
//!   registries; answers the JSON report.
//! - `GET /admin/cache[?registry=R]`: the cached images (`{"images": [...]}`).
//! - `POST /admin/cache/rm?registry=R&repository=REPO&reference=TAG|DIGEST[&dry_run=true]`:
//!   purges one image; answers what went and the bytes freed (409 for a pinned image).
//! - `POST /admin/cache/prune?not_pulled_for=30d[&dry_run=true]`: purges every image not
//!   pulled for that long (pinned ones stay); answers the images, blobs and bytes freed.
//! - `GET /admin/pins`: the pinned images (`{"pins": [{"image", "configured"}],
//!   "pinned_bytes"}`).
//! - `POST /admin/pin?image=IMAGE[&image=…]` / `POST /admin/unpin?image=IMAGE[&image=…]`:
//!   pins (and fetches) or unpins images, IMAGE in the full form `registry/repository:tag` or
//!   `…@digest`; answers `{"pinned": [...]}` / `{"unpinned": [...]}` (409 for an image
//!   `[cache] pin` configures).
//! - `POST /admin/warm` with `{"images": ["alpine:3.20", …], "platforms": ["linux/arm64"],
//!   "all_platforms": false}` (`platforms` and `all_platforms` optional; no platforms:
//!   `[cache] platforms`): starts a warm job ([`super::warm`]) and answers 202 `{"id": N}`;
//!   400 naming a bad image or platform, 413 for a body over 1 MiB.
//! - `GET /admin/warm/<id>`: the job's progress: `{"id", "state": "queued|running|done|failed",
//!   "platforms", "all_platforms", "failed", "images": [{"image", "state", "manifests",
//!   "blobs_done", "blobs_total", "blobs_cached", "bytes_done", "bytes_total", "error"}]}`;
//!   404 for an unknown id (or one of the jobs finished before the last 64).

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

/// Runs blocking work off the runtime; a panic in it answers 500.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Box<Response<Body>>> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Box::new(json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": e.to_string()}),
        ))
    })
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json(status, &serde_json::json!({"error": message.to_string()}))
}

/// Every `image` of the query, parsed; Err answers 400 naming the first that does not parse.
fn images(query: Option<&str>) -> Result<Vec<crate::oci::ImageRef>, Box<Response<Body>>> {
    let list: Vec<String> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "image")
        .map(|(_, v)| v.into_owned())
        .collect();
    if list.is_empty() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "name at least one image: ?image=registry/repository:tag",
        )));
    }
    list.iter()
        .map(|i| {
            i.parse()
                .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e)))
        })
        .collect()
}

/// Caches the manifests of pinned images (the tag, and an index's children for the
/// platforms) so that the pins cover every blob before the blobs are fetched; the mirrored
/// registries' allow/deny lists apply. Returns each image that failed, with the reason.
pub(crate) async fn fetch_pinned_manifests(
    app: &App,
    images: &[crate::oci::ImageRef],
) -> Vec<(String, String)> {
    let accept = crate::oci::MANIFEST_MEDIA_TYPES;
    let mut failed = Vec::new();
    for image in images {
        let t = crate::route::Target {
            registry: image.registry.as_str().into(),
            repo: image.repository.clone(),
        };
        let fetch = async {
            if !app.router.permitted(&t) {
                return Err(format!(
                    "{}/{} is denied by the registry's allow/deny lists",
                    t.registry, t.repo
                ));
            }
            let (m, _) = app
                .mirror
                .manifest(&t, &image.reference, &accept)
                .await
                .map_err(|e| e.to_string())?;
            let children = crate::oci::index_children(&m.bytes, app.pins.platforms(), false);
            for child in children {
                app.mirror
                    .manifest(&t, &crate::oci::Reference::Digest(child), &accept)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        if let Err(e) = fetch.await {
            failed.push((image.to_string(), e));
        }
    }
    failed
}

/// Fetches pinned images: their manifests first (so the pins cover every blob), then a warm
/// job for the blobs, whose id it returns with the images whose manifests failed.
pub(crate) async fn fetch_pins(
    app: Arc<App>,
    images: Vec<crate::oci::ImageRef>,
) -> (Vec<(String, String)>, u64) {
    let failed = fetch_pinned_manifests(&app, &images).await;
    let a = app.clone();
    let _ = tokio::task::spawn_blocking(move || {
        a.pins.refresh(a.mirror.manifest_store(), &a.mirror.blobs)
    })
    .await;
    let platforms = app.pins.platforms().to_vec();
    let id = app.warm.start(app.clone(), images, platforms, false);
    (failed, id)
}

/// At start: fetches the pinned images in the background (configured pins are "warmed at
/// start"; pins made by `berth pin` catch up on what was evicted before they were made).
pub(crate) fn fetch_pins_at_start(app: &Arc<App>) {
    let images = app.pins.images();
    if images.is_empty() {
        return;
    }
    let app = app.clone();
    tokio::spawn(async move {
        let (failed, warm) = fetch_pins(app, images).await;
        for (image, error) in failed {
            tracing::warn!(
                image,
                error,
                "cannot fetch a pinned image now; it is pinned once cached"
            );
        }
        tracing::info!(warm, "fetching the pinned images");
    });
}

/// With `[cache.object_store]`, deletes what a purge removed locally from the store too, so no
/// replica serves it back. Err says what was left in the store (the local purge stands).
async fn purge_shared(
    app: &App,
    dry_run: bool,
    removed: &[crate::cache::inventory::Removed],
) -> Result<(), String> {
    let Some(shared) = app.mirror.shared().filter(|_| !dry_run) else {
        return Ok(());
    };
    for r in removed {
        if let Err(e) = r.purge_from(shared).await {
            tracing::warn!(error = %e, "purged from the local cache, not from the object store");
            return Err(format!(
                "purged from the local cache, but not from the object store: {e}"
            ));
        }
    }
    Ok(())
}

/// `/admin/pins`, `/admin/pin`, `/admin/unpin` and `/admin/cache/prune`.
async fn pins_api(
    app: Arc<App>,
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> Response<Body> {
    let answer = async {
        match (method, path) {
            (&http::Method::GET, "/admin/pins") => {
                let a = app.clone();
                let pins = blocking(move || a.pins.list()).await?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"pins": pins, "pinned_bytes": app.mirror.blobs.pinned_bytes()}),
                ))
            }
            (&http::Method::POST, "/admin/pin") => {
                let wanted = images(query)?;
                let a = app.clone();
                let w = wanted.clone();
                let done = blocking(move || a.pins.pin(&w)).await?;
                if let Err(e) = done {
                    return Ok(error(StatusCode::INTERNAL_SERVER_ERROR, e));
                }
                // Pinned even if fetching fails now: the pin covers the image once cached.
                let (failed, warm) = fetch_pins(app.clone(), wanted.clone()).await;
                let names: Vec<String> = wanted.iter().map(ToString::to_string).collect();
                tracing::info!(images = names.join(", "), warm, "pinned");
                let failed: Vec<serde_json::Value> = failed
                    .into_iter()
                    .map(|(image, error)| serde_json::json!({"image": image, "error": error}))
                    .collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "pinned": names, "not_fetched": failed, "warm": warm }),
                ))
            }
            (&http::Method::POST, "/admin/unpin") => {
                let wanted = images(query)?;
                let a = app.clone();
                let done = blocking(move || {
                    let gone = a.pins.unpin(&wanted);
                    a.pins.refresh(a.mirror.manifest_store(), &a.mirror.blobs);
                    gone
                })
                .await?;
                match done {
                    Ok(gone) => {
                        let names: Vec<String> = gone.iter().map(ToString::to_string).collect();
                        tracing::info!(images = names.join(", "), "unpinned");
                        Ok(json(
                            StatusCode::OK,
                            &serde_json::json!({ "unpinned": names }),
                        ))
                    }
                    Err(e @ crate::cache::pins::UnpinError::Configured(_)) => {
                        Ok(error(StatusCode::CONFLICT, e))
                    }
                    Err(e) => Ok(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
                }
            }
            (&http::Method::POST, "/admin/cache/prune") => {
                let Some(age) = param(query, "not_pulled_for") else {
                    return Ok(error(
                        StatusCode::BAD_REQUEST,
                        "not_pulled_for is required (like 30d)",
                    ));
                };
                let age = match humantime::parse_duration(&age) {
                    Ok(d) => d,
                    Err(e) => {
                        return Ok(error(
                            StatusCode::BAD_REQUEST,
                            format!("not_pulled_for {age:?} is not a duration like \"30d\": {e}"),
                        ));
                    }
                };
                let dry_run = flag(query, "dry_run");
                let cutoff = crate::cache::unix_now().saturating_sub(age.as_secs());
                let a = app.clone();
                let done = blocking(move || {
                    crate::cache::inventory::prune(
                        a.mirror.manifest_store(),
                        &a.mirror.blobs,
                        &a.pins,
                        cutoff,
                        dry_run,
                    )
                })
                .await?;
                match done {
                    Ok(p) => {
                        tracing::info!(
                            dry_run,
                            images = p.images.len(),
                            bytes = p.bytes_freed,
                            "cache prune"
                        );
                        if let Err(e) = purge_shared(&app, dry_run, &p.removed).await {
                            return Ok(error(StatusCode::BAD_GATEWAY, e));
                        }
                        Ok(json(
                            StatusCode::OK,
                            &serde_json::to_value(&p).unwrap_or_default(),
                        ))
                    }
                    Err(e) => Ok(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
                }
            }
            _ => Ok(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET for /admin/pins, POST for the others",
            )),
        }
    };
    let answer: Result<Response<Body>, Box<Response<Body>>> = answer.await;
    match answer {
        Ok(r) => r,
        Err(refused) => *refused,
    }
}

fn param(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The largest request body the admin API reads.
const MAX_BODY: usize = 1024 * 1024;

/// The most images one warm job takes.
const MAX_WARM_IMAGES: usize = 1000;

/// The request body, at most [`MAX_BODY`] bytes (else 413).
async fn read_body<B>(body: B) -> Result<Bytes, Box<Response<Body>>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {MAX_BODY} bytes"),
        ))),
        Err(e) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        ))),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmRequest {
    images: Vec<String>,
    #[serde(default)]
    platforms: Vec<String>,
    #[serde(default)]
    all_platforms: bool,
}

/// `POST /admin/warm`: checks every image and platform, then starts the job.
fn start_warm(app: &Arc<App>, body: &[u8]) -> Response<Body> {
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
    let req: WarmRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return bad(format!(
                "the body is not {{\"images\": [...], \"platforms\": [...], \"all_platforms\": bool}}: {e}"
            ));
        }
    };
    if req.images.is_empty() || req.images.len() > MAX_WARM_IMAGES {
        return bad(format!("name 1 to {MAX_WARM_IMAGES} images"));
    }
    let mut images = Vec::with_capacity(req.images.len());
    for i in &req.images {
        match i.parse::<crate::oci::ImageRef>() {
            Ok(r) => images.push(r),
            Err(e) => return bad(e),
        }
    }
    let mut platforms = Vec::with_capacity(req.platforms.len());
    for p in &req.platforms {
        match crate::oci::Platform::parse(p) {
            Ok(p) => platforms.push(p),
            Err(e) => return bad(e),
        }
    }
    let id = app
        .warm
        .start(app.clone(), images, platforms, req.all_platforms);
    json(StatusCode::ACCEPTED, &serde_json::json!({ "id": id }))
}

async fn admin_api<B>(app: Arc<App>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Err(refused) = admitted(&app, &req) {
        return *refused;
    }
    if matches!(
        req.uri().path(),
        "/admin/pins" | "/admin/pin" | "/admin/unpin" | "/admin/cache/prune"
    ) {
        return pins_api(app, req.method(), req.uri().path(), req.uri().query()).await;
    }
    if let Some(id) = req.uri().path().strip_prefix("/admin/warm/") {
        if req.method() != http::Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        }
        return match id.parse::<u64>().ok().and_then(|id| app.warm.job(id)) {
            Some(job) => json(
                StatusCode::OK,
                &serde_json::to_value(&job).unwrap_or_default(),
            ),
            None => error(StatusCode::NOT_FOUND, format!("no warm job {id:?}")),
        };
    }
    match (req.method(), req.uri().path()) {
        (&http::Method::POST, "/admin/warm") => match read_body(req.into_body()).await {
            Ok(body) => start_warm(&app, &body),
            Err(refused) => *refused,
        },
        (_, "/admin/warm") => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
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
            let a = app.clone();
            match tokio::task::spawn_blocking(move || {
                crate::cache::inventory::list(
                    a.mirror.manifest_store(),
                    &a.mirror.blobs,
                    &a.pins,
                    registry.as_deref(),
                )
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
            let named = |r: &str| app.pins.names(&registry, repo.as_str(), r);
            if named(&reference.to_string()) {
                return error(
                    StatusCode::CONFLICT,
                    format!(
                        "{registry}/{repo} {reference} is pinned: unpin it first (berth unpin)"
                    ),
                );
            }
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
                    if let Err(e) =
                        purge_shared(&app, dry_run, std::slice::from_ref(&p.removed)).await
                    {
                        return error(StatusCode::BAD_GATEWAY, e);
                    }
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

pub async fn handle<B>(app: Arc<App>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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
