//! Where a fill gets a blob's bytes: the shared object store, the blob's owner among the
//! replicas, or upstream — in that order. A stream that breaks is resumed from the byte it
//! stopped at, so the clients of the fill never notice: a peer's (the owner died mid-fill) from
//! the next replica in hash order or from upstream; upstream's (a reset, a read timeout, an
//! early end) with `Range: bytes=<received>-` from the registry's next endpoint or the same
//! one, [`MAX_UPSTREAM_RESUMES`] times at most, with a growing pause between them. An
//! upstream that ignores the Range (answers 200) has the bytes already received skipped. The
//! fill hashes every byte it gets, so the digest is checked over the whole blob however many
//! pieces it came in.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{Method, StatusCode};

use super::{Kind, upstream_error};
use crate::cache::{Fill, Lookup, ManifestStore, SharedStore, Source};
use crate::cluster::{Cluster, Peer, PeerError};
use crate::error::{ErrorCode, RegistryError};
use crate::metrics::{Metrics, PeerResult, ResumeResult, UpstreamFailure};
use crate::oci::Digest;
use crate::route::Target;
use crate::upstream::{Upstream, UpstreamError, UpstreamPath, Urgency, endpoint_of, failure_kind};

/// Resumes of one fill's peer stream before it gives up.
const MAX_PEER_RESUMES: usize = 4;
/// Requests for the rest of a blob after its upstream stream broke, before the fill gives up
/// (and its clients get the aborted body).
const MAX_UPSTREAM_RESUMES: usize = 3;
/// The pause before the first upstream resume; doubled before each next one.
const RESUME_PAUSE: Duration = Duration::from_millis(100);

type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// Everything a fill needs to find its bytes.
pub(super) struct Plan {
    pub target: Target,
    pub digest: Digest,
    pub upstream: Arc<Upstream>,
    pub manifests: Arc<ManifestStore>,
    pub metrics: Arc<Metrics>,
    /// The shared store, when configured and the repository is known to hold the blob.
    pub shared: Option<Arc<SharedStore>>,
    /// Where verified blobs fetched from upstream are uploaded (configured store).
    pub upload_to: Option<Arc<SharedStore>>,
    /// The replicas, unless the request came from one (an owner never forwards).
    pub cluster: Option<Arc<Cluster>>,
    /// The client's credentials, passed to the owner (replicas share their `[auth]`).
    pub authorization: Option<String>,
}

pub(super) async fn open(plan: Arc<Plan>, fill: Arc<Fill>) -> Result<Source, RegistryError> {
    if let Some(shared) = &plan.shared
        && let Lookup::Found((len, stream)) = shared.get_blob(&plan.digest).await
    {
        let (store, digest) = (shared.clone(), plan.digest.clone());
        return Ok(Source {
            len: Some(len),
            stream,
            endpoint: "object-store".into(),
            on_corrupt: Some(Box::new(move || store.delete_blob(&digest))),
        });
    }
    if let Some(cluster) = &plan.cluster {
        for peer in cluster.owners(&plan.digest) {
            if peer.is_self() {
                break;
            }
            match cluster
                .fetch(
                    &peer,
                    &plan.target,
                    &plan.digest,
                    0,
                    plan.authorization.as_deref(),
                )
                .await
            {
                Ok(resp) => {
                    plan.metrics.record_peer(PeerResult::Ok);
                    let len = resp.content_length();
                    let endpoint = peer.base.clone();
                    let first = body(resp, None);
                    let stream = resuming(plan.clone(), fill, Origin::Peer(peer), first, len);
                    return Ok(Source {
                        len,
                        stream,
                        endpoint,
                        on_corrupt: None,
                    });
                }
                Err(PeerError::Status(StatusCode::NOT_FOUND)) => {
                    return Err(RegistryError::new(
                        ErrorCode::BlobUnknown,
                        format!("blob {} not found upstream", plan.digest),
                    ));
                }
                Err(PeerError::Status(s)) => {
                    tracing::warn!(peer = %peer.base, status = %s, digest = %plan.digest, "owner could not serve the blob; fetching it upstream");
                    break;
                }
                Err(PeerError::Unreachable(e)) => {
                    tracing::warn!(peer = %peer.base, error = %e, digest = %plan.digest, "owner unreachable; asking the next replica");
                }
            }
        }
    }
    let up = from_upstream(&plan, &fill, 0, None)
        .await
        .map_err(|e| upstream_error(&e, Kind::Blob, &format!("blob {}", plan.digest)))?;
    let (upstream, configured) = (plan.upstream.clone(), up.endpoint.clone());
    let stream = resuming(
        plan.clone(),
        fill,
        Origin::Upstream(up.endpoint),
        up.stream,
        up.len,
    );
    Ok(Source {
        len: up.len,
        stream,
        endpoint: up.shown,
        on_corrupt: Some(Box::new(move || {
            upstream.record_failure(
                &configured,
                UpstreamFailure::BadBody,
                "blob bytes do not match its digest",
            );
        })),
    })
}

/// The body of a peer's or upstream's answer, counted, from byte `from` on when the answer
/// was the whole blob (status 200) although a range was asked for.
fn body(resp: reqwest::Response, skip: Option<u64>) -> ByteStream {
    let stream = resp
        .bytes_stream()
        .map_err(|e| {
            let kind = match failure_kind(&e) {
                UpstreamFailure::Timeout => io::ErrorKind::TimedOut,
                _ => io::ErrorKind::ConnectionReset,
            };
            io::Error::new(kind, crate::upstream::error_chain(&e))
        })
        .boxed();
    match skip {
        Some(n) if n > 0 => skip_bytes(stream, n),
        _ => stream,
    }
}

/// Drops the first `n` bytes of a stream.
fn skip_bytes(stream: ByteStream, n: u64) -> ByteStream {
    futures_util::stream::unfold((stream, n), |(mut s, mut left)| async move {
        loop {
            let item = s.next().await?;
            match item {
                Ok(b) if left >= b.len() as u64 => left -= b.len() as u64,
                Ok(b) => {
                    let rest = b.slice(left as usize..);
                    left = 0;
                    return Some((Ok(rest), (s, left)));
                }
                Err(e) => return Some((Err(e), (s, left))),
            }
        }
    })
    .boxed()
}

/// An answer from upstream for (the rest of) a blob.
struct Upstreamed {
    stream: ByteStream,
    /// The whole blob's length, when upstream said.
    len: Option<u64>,
    /// The configured endpoint that answered.
    endpoint: String,
    /// Where the bytes came from (after redirects), for the fill's log line.
    shown: String,
}

/// Fetches from upstream (from byte `from` on; after the stream from endpoint `broke` broke,
/// that endpoint last), and — unless this resumes an upstream stream — uploads the verified
/// blob to the shared store: this replica is now the one that fetched it.
async fn from_upstream(
    plan: &Plan,
    fill: &Arc<Fill>,
    from: u64,
    broke: Option<&str>,
) -> Result<Upstreamed, UpstreamError> {
    let (t, digest) = (&plan.target, &plan.digest);
    let resp = match broke {
        Some(endpoint) => {
            plan.upstream
                .resume_blob(&t.repo, digest, from, endpoint)
                .await?
        }
        None => {
            plan.upstream
                .send_from(
                    Method::GET,
                    &t.repo,
                    UpstreamPath::Blob(digest),
                    None,
                    from,
                    Urgency::Fetch,
                )
                .await?
        }
    };
    let endpoint = endpoint_of(&resp);
    let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
    let len = if partial {
        // `bytes <from>-<last>/<length>`: the rest of this blob, or not an answer to use.
        let range = resp
            .headers()
            .get(http::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(content_range);
        match range {
            Some((start, total)) if start == from => total,
            _ => {
                let e = UpstreamError::Invalid(format!(
                    "a Range answer that does not start at byte {from}"
                ));
                plan.upstream
                    .record_failure(&endpoint, UpstreamFailure::BadBody, &e.to_string());
                return Err(e);
            }
        }
    } else {
        resp.content_length()
    };
    // Upstream serves it under this repository: a member from now on.
    plan.manifests.add_member(&t.registry, &t.repo, digest);
    if broke.is_none()
        && let Some(store) = &plan.upload_to
    {
        store.upload(fill.clone());
    }
    let shown = resp.url().origin().ascii_serialization();
    let counter = plan
        .metrics
        .upstream_bytes
        .with_label_values(&[&t.registry]);
    let skip = (!partial).then_some(from);
    let stream = body(resp, skip)
        .inspect_ok(move |b: &Bytes| counter.inc_by(b.len() as u64))
        .boxed();
    Ok(Upstreamed {
        stream,
        len,
        endpoint,
        shown,
    })
}

/// The first byte and the total length of a `Content-Range: bytes a-b/total` value (`*` for
/// an unknown total).
fn content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        n => Some(n.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

/// Where a fill's bytes are coming from now.
enum Origin {
    Peer(Arc<Peer>),
    /// Upstream, at this configured endpoint.
    Upstream(String),
}

struct Resume {
    plan: Arc<Plan>,
    fill: Arc<Fill>,
    origin: Origin,
    /// Peers asked so far.
    tried: Vec<String>,
    stream: ByteStream,
    offset: u64,
    /// The blob's length, when known: a stream that ends before it ended early.
    len: Option<u64>,
    peer_resumes: usize,
    upstream_resumes: usize,
}

/// A stream that, when it breaks, continues from where it stopped: a peer's from the next
/// replica or upstream, upstream's from upstream again.
fn resuming(
    plan: Arc<Plan>,
    fill: Arc<Fill>,
    origin: Origin,
    first: ByteStream,
    len: Option<u64>,
) -> ByteStream {
    let tried = match &origin {
        Origin::Peer(p) => vec![p.base.clone()],
        Origin::Upstream(_) => Vec::new(),
    };
    let state = Resume {
        plan,
        fill,
        origin,
        tried,
        stream: first,
        offset: 0,
        len,
        peer_resumes: 0,
        upstream_resumes: 0,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            let broke = match st.stream.next().await {
                None => match st.len {
                    Some(len) if st.offset < len => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the body ended at byte {} of {len}", st.offset),
                    ),
                    _ => return None,
                },
                Some(Ok(b)) => {
                    if st.len.is_some_and(|len| st.offset + b.len() as u64 > len) {
                        // Not a break to resume: the source sends something else.
                        if let Origin::Upstream(endpoint) = &st.origin {
                            st.plan.upstream.record_failure(
                                endpoint,
                                UpstreamFailure::BadBody,
                                "more bytes than the blob's length",
                            );
                        }
                        let e = io::Error::other("upstream sent more bytes than announced");
                        return Some((Err(e), st));
                    }
                    st.offset += b.len() as u64;
                    return Some((Ok(b), st));
                }
                Some(Err(e)) => e,
            };
            let resumed = match &st.origin {
                Origin::Peer(_) => resume_from_peer(&mut st, broke).await,
                Origin::Upstream(_) => resume_from_upstream(&mut st, broke).await,
            };
            if let Err(e) = resumed {
                return Some((Err(e), st));
            }
        }
    })
    .boxed()
}

/// After a peer's stream broke: the rest of the blob (from `st.offset`) from the next live
/// replica in hash order, or upstream when this replica is next (or none answers).
async fn resume_from_peer(st: &mut Resume, broke: io::Error) -> io::Result<()> {
    if st.peer_resumes >= MAX_PEER_RESUMES {
        return Err(broke);
    }
    st.peer_resumes += 1;
    let plan = st.plan.clone();
    if let (Some(cluster), Origin::Peer(current)) = (&plan.cluster, &st.origin) {
        tracing::warn!(peer = %current.base, digest = %plan.digest, offset = st.offset, error = %broke, "owner's stream broke; resuming elsewhere");
        cluster.failed(current);
        plan.metrics.record_peer(PeerResult::Resumed);
        for peer in cluster.owners(&plan.digest) {
            if peer.is_self() {
                break;
            }
            if st.tried.contains(&peer.base) {
                continue;
            }
            st.tried.push(peer.base.clone());
            match cluster
                .fetch(
                    &peer,
                    &plan.target,
                    &plan.digest,
                    st.offset,
                    plan.authorization.as_deref(),
                )
                .await
            {
                Ok(resp) => {
                    let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
                    st.stream = body(resp, (!partial).then_some(st.offset));
                    st.origin = Origin::Peer(peer);
                    plan.metrics
                        .record_resume(&plan.target.registry, ResumeResult::Ok);
                    return Ok(());
                }
                Err(e) => {
                    plan.metrics
                        .record_resume(&plan.target.registry, ResumeResult::Failed);
                    tracing::warn!(peer = %peer.base, error = ?e, "replica cannot resume the blob");
                }
            }
        }
    }
    match from_upstream(&plan, &st.fill, st.offset, None).await {
        Ok(up) => {
            plan.metrics
                .record_resume(&plan.target.registry, ResumeResult::Ok);
            st.stream = up.stream;
            st.origin = Origin::Upstream(up.endpoint);
            Ok(())
        }
        Err(e) => {
            plan.metrics
                .record_resume(&plan.target.registry, ResumeResult::Failed);
            Err(io::Error::other(e.to_string()))
        }
    }
}

/// After upstream's stream broke: the rest of the blob (from `st.offset`) from upstream —
/// another endpoint first — after a pause that doubles with each attempt; an answer that
/// cannot get better (a 4xx: the blob is gone, the range refused) ends the attempts.
async fn resume_from_upstream(st: &mut Resume, broke: io::Error) -> io::Result<()> {
    let plan = st.plan.clone();
    let Origin::Upstream(endpoint) = &st.origin else {
        return Err(broke);
    };
    let endpoint = endpoint.clone();
    let kind = match broke.kind() {
        io::ErrorKind::TimedOut => UpstreamFailure::Timeout,
        _ => UpstreamFailure::Reset,
    };
    plan.upstream
        .record_failure(&endpoint, kind, &format!("blob stream broke: {broke}"));
    loop {
        if st.upstream_resumes >= MAX_UPSTREAM_RESUMES {
            tracing::warn!(registry = %plan.target.registry, digest = %plan.digest, offset = st.offset, resumes = st.upstream_resumes, "upstream blob stream broke and every resume failed: the fill fails");
            return Err(broke);
        }
        let pause = RESUME_PAUSE * (1 << st.upstream_resumes);
        st.upstream_resumes += 1;
        tokio::time::sleep(pause).await;
        match from_upstream(&plan, &st.fill, st.offset, Some(&endpoint)).await {
            Ok(up) => {
                plan.metrics
                    .record_resume(&plan.target.registry, ResumeResult::Ok);
                tracing::info!(registry = %plan.target.registry, digest = %plan.digest, offset = st.offset, from = %endpoint, to = %up.endpoint, attempt = st.upstream_resumes, "upstream blob stream broke: resumed");
                st.stream = up.stream;
                st.origin = Origin::Upstream(up.endpoint);
                if st.len.is_none() {
                    st.len = up.len;
                }
                return Ok(());
            }
            Err(e) => {
                plan.metrics
                    .record_resume(&plan.target.registry, ResumeResult::Failed);
                tracing::warn!(registry = %plan.target.registry, digest = %plan.digest, offset = st.offset, attempt = st.upstream_resumes, error = %e, "resuming the upstream blob stream failed");
                let hopeless = matches!(
                    &e,
                    UpstreamError::Status { status, .. }
                        if status.is_client_error() && *status != StatusCode::TOO_MANY_REQUESTS
                ) || matches!(e, UpstreamError::Invalid(_));
                if hopeless {
                    return Err(io::Error::other(format!("resume refused: {e}")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::content_range;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range("bytes 100-199/1000"), Some((100, Some(1000))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("bytes */1000"), None);
        assert_eq!(content_range("items 1-2/3"), None);
        assert_eq!(content_range("bytes x-2/3"), None);
    }
}
