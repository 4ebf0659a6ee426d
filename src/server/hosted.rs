//! The answer phase for hosted registries: push, pull, delete, tags and referrers of the
//! repositories berth stores itself, as HTTP answers ([`Answer`]), with the headers the
//! distribution spec gives each (`Location`, `Range`, `Docker-Upload-UUID`, `OCI-Subject`,
//! `Link`, `OCI-Filters-Applied`), and the webhook event each success makes.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderName, HeaderValue, StatusCode, header};

use super::auth::Identity;
use super::pipeline::{Answer, BlobBody};
use super::request::{Method, RequestHead};
use crate::app::App;
use crate::config::{Action, NotifyEvent};
use crate::error::{ErrorCode, RegistryError};
use crate::hosted::{BodyStream, Hosted, parse_content_range};
use crate::notify::{Actor, Event, EventRequest, EventTarget};
use crate::oci::{Digest, Reference};
use crate::route::{Route, Target, parse_digest, url_name};

const DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
const FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

fn empty_body() -> BodyStream {
    futures_util::stream::empty().boxed()
}

/// `/v2/<name>` as the client named the repository, and the `?ns=` it used, for `Location`.
struct Base {
    path: String,
    ns: Option<String>,
}

impl Base {
    fn of(req: &RequestHead) -> Base {
        Base {
            path: format!("/v2/{}", url_name(&req.path).unwrap_or_default()),
            ns: crate::route::ns_param(req.query.as_deref()).map(str::to_owned),
        }
    }

    fn url(&self, rest: &str) -> String {
        match &self.ns {
            Some(ns) => format!("{}{rest}?ns={ns}", self.path),
            None => format!("{}{rest}", self.path),
        }
    }
}

fn headers(status: StatusCode, list: Vec<(HeaderName, String)>) -> Answer {
    Answer::Custom {
        status,
        headers: list,
        content_type: None,
        body: Bytes::new(),
    }
}

/// `Range: 0-<last byte>` of an upload holding `offset` bytes (`0-0` when empty, as
/// distribution sends it).
fn upload_range(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

fn upload_answer(status: StatusCode, base: &Base, id: &str, offset: u64) -> Answer {
    headers(
        status,
        vec![
            (header::LOCATION, base.url(&format!("/blobs/uploads/{id}"))),
            (header::RANGE, upload_range(offset)),
            (UPLOAD_UUID, id.to_owned()),
        ],
    )
}

fn blob_created(base: &Base, d: &Digest) -> Answer {
    headers(
        StatusCode::CREATED,
        vec![
            (header::LOCATION, base.url(&format!("/blobs/{d}"))),
            (DIGEST, d.to_string()),
        ],
    )
}

fn query_digest(req: &RequestHead) -> Result<Option<Digest>, RegistryError> {
    req.query_decoded("digest")
        .map(|d| parse_digest(&d))
        .transpose()
}

/// Answers a request routed to a hosted registry.
pub(super) async fn answer(
    app: &App,
    hosted: &Hosted,
    req: &RequestHead,
    route: Route,
    who: Option<&Identity>,
    body: Option<BodyStream>,
) -> Result<Answer, RegistryError> {
    let base = Base::of(req);
    let body = || body.unwrap_or_else(empty_body);
    match (route, req.method) {
        (Route::Manifest { target, reference }, Method::Get | Method::Head) => {
            let m = hosted.manifest(&target, &reference).await?;
            if req.method == Method::Get {
                let tag = match &reference {
                    Reference::Tag(t) => Some(t.to_string()),
                    Reference::Digest(_) => None,
                };
                notify(
                    app,
                    req,
                    who,
                    NotifyEvent::Pull,
                    &target,
                    &m.media_type,
                    Some(&m.digest),
                    m.bytes.len() as u64,
                    tag,
                );
            }
            Ok(Answer::Manifest(m))
        }
        (Route::Manifest { target, reference }, Method::Put) => {
            let pushed = hosted
                .put_manifest(&target, &reference, req.content_type.as_deref(), body())
                .await?;
            let user = who.map_or("anonymous", |w| w.name());
            tracing::info!(
                registry = %target.registry,
                repository = %target.repo,
                reference = %reference,
                digest = %pushed.digest,
                bytes = pushed.size,
                user,
                "push"
            );
            let tag = match &reference {
                Reference::Tag(t) => Some(t.to_string()),
                Reference::Digest(_) => None,
            };
            notify(
                app,
                req,
                who,
                NotifyEvent::Push,
                &target,
                &pushed.media_type,
                Some(&pushed.digest),
                pushed.size,
                tag,
            );
            let mut list = vec![
                (
                    header::LOCATION,
                    base.url(&format!("/manifests/{}", pushed.digest)),
                ),
                (DIGEST, pushed.digest.to_string()),
            ];
            if let Some(s) = &pushed.subject {
                list.push((OCI_SUBJECT, s.to_string()));
            }
            Ok(headers(StatusCode::CREATED, list))
        }
        (Route::Manifest { target, reference }, Method::Delete) => {
            hosted.delete_manifest(&target, &reference).await?;
            tracing::info!(registry = %target.registry, repository = %target.repo, reference = %reference, user = who.map_or("anonymous", |w| w.name()), "delete");
            let (digest, tag) = match &reference {
                Reference::Digest(d) => (Some(d), None),
                Reference::Tag(t) => (None, Some(t.to_string())),
            };
            notify(
                app,
                req,
                who,
                NotifyEvent::Delete,
                &target,
                "",
                digest,
                0,
                tag,
            );
            Ok(headers(StatusCode::ACCEPTED, Vec::new()))
        }
        (Route::Blob { target, digest }, Method::Get | Method::Head) => {
            let blob = hosted.blob(&target, &digest).await?;
            if req.method == Method::Get {
                notify(
                    app,
                    req,
                    who,
                    NotifyEvent::Pull,
                    &target,
                    "application/octet-stream",
                    Some(&digest),
                    blob.len,
                    None,
                );
            }
            Ok(Answer::Blob {
                digest,
                body: BlobBody::Cached(Arc::new(blob.file)),
                len: Some(blob.len),
            })
        }
        (Route::Blob { target, digest }, Method::Delete) => {
            hosted.delete_blob(&target, &digest).await?;
            notify(
                app,
                req,
                who,
                NotifyEvent::Delete,
                &target,
                "",
                Some(&digest),
                0,
                None,
            );
            Ok(headers(StatusCode::ACCEPTED, Vec::new()))
        }
        (Route::Uploads { target }, Method::Post) => {
            if let (Some(mount), Some(from)) =
                (req.query_decoded("mount"), req.query_decoded("from"))
            {
                let d = parse_digest(&mount)?;
                if let Some(from) = mount_source(app, req, &from, who)
                    && hosted.mount(&target, &d, &from).await?
                {
                    return Ok(blob_created(&base, &d));
                }
                // Not mountable (unknown there, or not the client's to pull): a session.
                let id = hosted.start_upload(&target).await?;
                return Ok(upload_answer(StatusCode::ACCEPTED, &base, &id, 0));
            }
            if let Some(d) = query_digest(req)? {
                hosted
                    .push_blob(&target, &d, body(), req.content_length)
                    .await?;
                return Ok(blob_created(&base, &d));
            }
            let id = hosted.start_upload(&target).await?;
            Ok(upload_answer(StatusCode::ACCEPTED, &base, &id, 0))
        }
        (Route::Upload { target, id }, Method::Get | Method::Head) => {
            let offset = hosted.upload_offset(&target, &id).await?;
            Ok(upload_answer(StatusCode::NO_CONTENT, &base, &id, offset))
        }
        (Route::Upload { target, id }, Method::Patch) => {
            let range = match req.content_range.as_deref() {
                Some(v) => Some(parse_content_range(v).ok_or_else(|| {
                    RegistryError::new(
                        ErrorCode::BlobUploadInvalid,
                        "Content-Range must be <first>-<last>",
                    )
                    .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                })?),
                None => None,
            };
            match hosted.patch(&target, &id, range, body()).await {
                Ok(offset) => Ok(upload_answer(StatusCode::ACCEPTED, &base, &id, offset)),
                Err(e) if e.code == ErrorCode::RangeInvalid => {
                    // 416 with where the upload stands, so the client can resume from there.
                    let offset = hosted.upload_offset(&target, &id).await?;
                    Ok(Answer::Custom {
                        status: StatusCode::RANGE_NOT_SATISFIABLE,
                        headers: vec![
                            (header::LOCATION, base.url(&format!("/blobs/uploads/{id}"))),
                            (header::RANGE, upload_range(offset)),
                            (UPLOAD_UUID, id.clone()),
                        ],
                        content_type: Some(HeaderValue::from_static("application/json")),
                        body: Bytes::from(e.body()),
                    })
                }
                Err(e) => Err(e),
            }
        }
        (Route::Upload { target, id }, Method::Put) => {
            let d = query_digest(req)?.ok_or_else(|| {
                RegistryError::new(
                    ErrorCode::DigestInvalid,
                    "finishing an upload needs ?digest=",
                )
            })?;
            hosted.finish(&target, &id, &d, body()).await?;
            Ok(blob_created(&base, &d))
        }
        (Route::Upload { target, id }, Method::Delete) => {
            hosted.cancel(&target, &id).await?;
            Ok(headers(StatusCode::NO_CONTENT, Vec::new()))
        }
        (Route::Tags { target }, _) => {
            let n = super::pipeline::parse_n(req)?;
            let last = req.query_param("last");
            let (tags, more) = hosted.tags(&target, n, last).await?;
            let mut list = Vec::new();
            if more && let (Some(n), Some(last)) = (n, tags.last()) {
                list.push((
                    header::LINK,
                    format!("<{}/tags/list?n={n}&last={last}>; rel=\"next\"", base.path),
                ));
            }
            let name = url_name(&req.path).unwrap_or_default();
            Ok(Answer::Custom {
                status: StatusCode::OK,
                headers: list,
                content_type: Some(HeaderValue::from_static("application/json")),
                body: Bytes::from(serde_json::json!({ "name": name, "tags": tags }).to_string()),
            })
        }
        (Route::Referrers { target, digest }, _) => {
            let filter = req.query_decoded("artifactType");
            let body = hosted.referrers(&target, &digest, filter.as_deref());
            let mut list = Vec::new();
            if filter.is_some() {
                list.push((FILTERS_APPLIED, "artifactType".to_owned()));
            }
            Ok(Answer::Custom {
                status: StatusCode::OK,
                headers: list,
                content_type: Some(HeaderValue::from_static(crate::oci::OCI_INDEX)),
                body,
            })
        }
        _ => Err(RegistryError::new(
            ErrorCode::Unsupported,
            "method not allowed here",
        )),
    }
}

/// The repository a mount takes its blob from, if the client may pull it there.
fn mount_source(
    app: &App,
    req: &RequestHead,
    from: &str,
    who: Option<&Identity>,
) -> Option<Target> {
    let route = app
        .router
        .route(
            &format!("/v2/{from}/tags/list"),
            crate::route::ns_param(req.query.as_deref()),
        )
        .ok()?;
    let t = route.target()?.clone();
    match (&app.auth, who) {
        (Some(auth), Some(who)) => auth.allowed(who, &t, Action::Pull).then_some(t),
        (Some(_), None) => None,
        (None, _) => Some(t),
    }
}

/// Queues a webhook event for a push, pull or delete, if an endpoint wants it.
#[allow(clippy::too_many_arguments)]
pub(super) fn notify(
    app: &App,
    req: &RequestHead,
    who: Option<&Identity>,
    kind: NotifyEvent,
    target: &Target,
    media_type: &str,
    digest: Option<&Digest>,
    size: u64,
    tag: Option<String>,
) {
    let Some(n) = &app.notify else { return };
    if !n.wants(kind) {
        return;
    }
    n.emit(
        kind,
        event(
            app,
            req,
            who,
            kind,
            target,
            media_type,
            &digest.map(Digest::to_string).unwrap_or_default(),
            size,
            tag,
        ),
    );
}

#[allow(clippy::too_many_arguments)]
fn event(
    app: &App,
    req: &RequestHead,
    who: Option<&Identity>,
    kind: NotifyEvent,
    target: &Target,
    media_type: &str,
    digest: &str,
    size: u64,
    tag: Option<String>,
) -> Event {
    let host = req.host.clone().unwrap_or_default();
    let scheme = if app.tls.is_some() { "https" } else { "http" };
    let repository = format!("{}/{}", target.registry, target.repo);
    let url = event_url(scheme, &host, &req.path, digest);
    let source = app
        .notify
        .as_ref()
        .map(|n| n.source.clone())
        .unwrap_or(crate::notify::Source {
            addr: String::new(),
            instance_id: String::new(),
        });
    Event {
        id: crate::notify::new_id(),
        timestamp: crate::notify::now_rfc3339(),
        action: Event::action(kind),
        target: EventTarget {
            media_type: media_type.to_owned(),
            digest: digest.to_owned(),
            size,
            length: size,
            repository,
            url,
            tag,
        },
        request: EventRequest {
            id: crate::notify::new_id(),
            addr: req.client.to_string(),
            host,
            method: req.method.as_str().to_owned(),
            useragent: req.user_agent.clone().unwrap_or_default(),
        },
        actor: Actor {
            name: who
                .map(|w| w.name().to_owned())
                .filter(|n| n != "anonymous")
                .unwrap_or_default(),
        },
        source,
    }
}

/// `target.url` of an event: where the manifest or blob the request was about is fetched, by
/// digest, under the repository name the client used (empty without a digest).
fn event_url(scheme: &str, host: &str, path: &str, digest: &str) -> String {
    if digest.is_empty() {
        return String::new();
    }
    // The route parser's order: a path with `/manifests/` is a manifest request.
    let kind = if path.rsplit_once("/manifests/").is_some() {
        "manifests"
    } else {
        "blobs"
    };
    format!(
        "{scheme}://{host}/v2/{}/{kind}/{digest}",
        url_name(path).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::event_url;

    #[test]
    fn event_urls_name_manifests_and_blobs() {
        let d = "sha256:0ba1593c6215c9a1bedb965eefc7c83198a302618b37724ad54fa85815528aaf";
        assert_eq!(
            event_url("http", "h:5000", "/v2/team/app/manifests/v1", d),
            format!("http://h:5000/v2/team/app/manifests/{d}")
        );
        assert_eq!(
            event_url("http", "h:5000", &format!("/v2/team/app/blobs/{d}"), d),
            format!("http://h:5000/v2/team/app/blobs/{d}")
        );
        // A repository whose name has a `blobs` component is still a manifest request.
        assert_eq!(
            event_url("https", "h", "/v2/team/blobs/manifests/v1", d),
            format!("https://h/v2/team/blobs/manifests/{d}")
        );
        assert_eq!(event_url("http", "h", "/v2/team/app/manifests/v1", ""), "");
    }
}
