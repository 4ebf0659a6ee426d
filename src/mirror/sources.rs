//! Where a fill gets a blob's bytes: the shared object store, the blob's owner among the
//! replicas, or upstream — in that order. A stream from a peer that breaks (the owner died
//! mid-fill) is resumed from the byte it stopped at, from the next replica in hash order or
//! from upstream, so the clients of the fill never notice.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{Method, StatusCode};

use super::{Kind, upstream_error};
use crate::cache::{Fill, Lookup, ManifestStore, SharedStore, Source};
use crate::cluster::{Cluster, Peer, PeerError};
use crate::error::{ErrorCode, RegistryError};
use crate::metrics::{Metrics, PeerResult};
use crate::oci::Digest;
use crate::route::Target;
use crate::upstream::{Upstream, UpstreamPath, Urgency};

/// Resumes of one fill's peer stream before it gives up.
const MAX_RESUMES: usize = 4;

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
                    let stream = resuming(plan.clone(), fill, peer, first);
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
    from_upstream(&plan, &fill, 0).await
}

/// The body of a peer's or upstream's answer, counted, from byte `from` on when the answer
/// was the whole blob (status 200) although a range was asked for.
fn body(resp: reqwest::Response, skip: Option<u64>) -> ByteStream {
    let stream = resp
        .bytes_stream()
        .map_err(|e| io::Error::other(crate::upstream::error_chain(&e)))
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

/// Fetches from upstream (from byte `from` on), and uploads the verified blob to the shared
/// store: this replica is now the one that fetched it.
async fn from_upstream(plan: &Plan, fill: &Arc<Fill>, from: u64) -> Result<Source, RegistryError> {
    let (t, digest) = (&plan.target, &plan.digest);
    let resp = plan
        .upstream
        .send_from(
            Method::GET,
            &t.repo,
            UpstreamPath::Blob(digest),
            None,
            from,
            Urgency::Fetch,
        )
        .await
        .map_err(|e| upstream_error(&e, Kind::Blob, &format!("blob {digest}")))?;
    // Upstream serves it under this repository: a member from now on.
    plan.manifests.add_member(&t.registry, &t.repo, digest);
    if let Some(store) = &plan.upload_to {
        store.upload(fill.clone());
    }
    let endpoint = resp.url().origin().ascii_serialization();
    let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
    let len = resp.content_length();
    let counter = plan
        .metrics
        .upstream_bytes
        .with_label_values(&[&t.registry]);
    let skip = (!partial).then_some(from);
    let stream = body(resp, skip)
        .inspect_ok(move |b: &Bytes| counter.inc_by(b.len() as u64))
        .boxed();
    Ok(Source {
        len: if from == 0 { len } else { None },
        stream,
        endpoint,
        on_corrupt: None,
    })
}

struct Resume {
    plan: Arc<Plan>,
    fill: Arc<Fill>,
    current: Arc<Peer>,
    tried: Vec<String>,
    stream: ByteStream,
    offset: u64,
    resumes: usize,
}

/// A peer's stream that, when it breaks, continues from the next replica or upstream.
fn resuming(plan: Arc<Plan>, fill: Arc<Fill>, peer: Arc<Peer>, first: ByteStream) -> ByteStream {
    let state = Resume {
        plan,
        fill,
        tried: vec![peer.base.clone()],
        current: peer,
        stream: first,
        offset: 0,
        resumes: 0,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            match st.stream.next().await {
                None => return None,
                Some(Ok(b)) => {
                    st.offset += b.len() as u64;
                    return Some((Ok(b), st));
                }
                Some(Err(e)) => {
                    if st.resumes >= MAX_RESUMES {
                        return Some((Err(e), st));
                    }
                    st.resumes += 1;
                    tracing::warn!(peer = %st.current.base, digest = %st.plan.digest, offset = st.offset, error = %e, "owner's stream broke; resuming elsewhere");
                    match resume(&mut st).await {
                        Ok(stream) => st.stream = stream,
                        Err(e) => return Some((Err(e), st)),
                    }
                }
            }
        }
    })
    .boxed()
}

/// Finds the rest of the blob (from `st.offset`): the next live replica in hash order, or
/// upstream when this replica is next (or none answers).
async fn resume(st: &mut Resume) -> io::Result<ByteStream> {
    let plan = st.plan.clone();
    if let Some(cluster) = &plan.cluster {
        cluster.failed(&st.current);
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
                    st.current = peer;
                    return Ok(body(resp, (!partial).then_some(st.offset)));
                }
                Err(e) => {
                    tracing::warn!(peer = %peer.base, error = ?e, "replica cannot resume the blob");
                }
            }
        }
    }
    let source = from_upstream(&plan, &st.fill, st.offset)
        .await
        .map_err(|e| io::Error::other(e.message))?;
    Ok(source.stream)
}
