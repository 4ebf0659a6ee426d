//! The pull-through logic, and the one place that uses both the cache and the upstream client:
//! look up (local disk, then the shared object store), revalidate tags, fill once (asking the
//! blob's owner among the replicas first), serve stale when upstream fails.

mod referrers;
mod sources;

pub(crate) use referrers::filter_index;

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;

use http::{Method, StatusCode, header};

use crate::cache::{
    BlobStore, CachedBlob, Fill, Lookup, Manifest, ManifestStore, SharedStore, TagRecord,
};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::{ErrorCode, RegistryError, SetupError};
use crate::metrics::UpstreamFailure;
use crate::metrics::{CacheResult, Metrics};
use crate::oci::{
    self, Digest, Hasher, MANIFEST_MEDIA_TYPES, Reference, Tag, accepts_media_type,
    manifest_media_type, named_manifest_types,
};
use crate::route::Target;
use crate::upstream::policy::OutboundPolicy;
use crate::upstream::{Upstream, UpstreamError, UpstreamPath, Urgency, endpoint_of};

/// Registries refuse manifests larger than this; so does berth.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// The largest tags list passed on.
const MAX_TAGS_BYTES: usize = 4 * 1024 * 1024;

/// How a blob request is answered.
pub enum BlobAnswer {
    /// From the cache.
    Cached(CachedBlob),
    /// Streamed from a fill in flight; `len` when upstream announced it.
    Filling { fill: Arc<Fill>, len: Option<u64> },
    /// A HEAD answered from upstream without downloading the blob.
    Head { len: Option<u64> },
}

/// Who is asking for a blob, as far as the fill's sources care.
#[derive(Default, Clone, Copy)]
pub struct Via<'a> {
    /// Another replica asking this one as the blob's owner: serve it, never forward it.
    pub peer: bool,
    /// The client's credentials, passed on to the owner.
    pub authorization: Option<&'a str>,
}

pub struct Mirror {
    /// What the manifest path needs, also in the background (revalidations).
    core: Core,
    pub blobs: Arc<BlobStore>,
    tag_ttl: Duration,
    locks: Mutex<HashMap<LockKey, Weak<tokio::sync::Mutex<()>>>>,
    cluster: Option<Arc<Cluster>>,
    /// Referrers lists fetched from upstream (see [`referrers`]).
    referrers: moka::sync::Cache<(Target, Digest), Arc<referrers::Fetched>>,
}

/// The parts of the mirror a tag revalidation uses, cheap to clone (each is shared), so that
/// one finishing in the background holds no borrow of the [`Mirror`].
#[derive(Clone)]
struct Core {
    upstreams: Arc<HashMap<Arc<str>, Arc<Upstream>>>,
    manifests: Arc<ManifestStore>,
    metrics: Arc<Metrics>,
    /// What upstream answered for a tag to clients that accept only some manifest types (by
    /// [`named_manifest_types`]) not including the tag's cached one: kept for the tag TTL, so
    /// such clients cost one upstream GET per tag and set of types per TTL, not one each.
    negotiated: moka::sync::Cache<(Target, Tag, u8), Arc<Negotiated>>,
    shared: Option<Arc<SharedStore>>,
    /// Tags and manifests upstream answered 404 for (by reference, as written), remembered for
    /// `negative_ttl` and answered 404 without asking upstream again. None: `0s`.
    missing: Option<moka::sync::Cache<(Target, String), ()>>,
    /// Tags being revalidated, with when the request that started it stops waiting for it:
    /// past that, the revalidation is in the background and the tag's requests are answered
    /// from the cache at once. An entry lives as long as its revalidation.
    revalidating: Arc<Mutex<HashMap<(Target, Tag), tokio::time::Instant>>>,
}

/// Upstream's answer for a tag to clients accepting only some manifest types.
struct Negotiated {
    /// The digest of the tag's own record when upstream was asked: the answer is kept while
    /// the tag does not move.
    base: Option<Digest>,
    /// The manifest such clients get, or None: none of a type they accept (404).
    answer: Option<Digest>,
}

/// Why a manifest GET gave nothing to serve.
enum FetchError {
    /// Upstream failed, or sent something broken.
    Upstream(UpstreamError),
    /// Upstream sent a manifest of a type berth does not serve (signed schema 1, whose digest
    /// is not the hash of its bytes) — what a client asking for that type gets.
    Unservable(String),
}

/// A manifest and how it was found, or the client's error.
type ManifestAnswer = Result<(Arc<Manifest>, CacheResult), RegistryError>;

/// What one of the mirror's locks serializes: the revalidation of a tag, or the fetch of a
/// manifest by digest.
#[derive(PartialEq, Eq, Hash)]
enum LockKey {
    Tag(Target, Tag),
    Digest(Target, Digest),
}

/// What the cache knows of a tag at one step of [`Mirror::manifest_by_tag`].
enum TagState {
    /// Checked upstream within the tag TTL.
    Fresh(Arc<Manifest>),
    /// Checked longer ago: to be revalidated, or served when upstream fails.
    Stale(Arc<TagRecord>, Arc<Manifest>),
    /// Nothing cached that the client accepts.
    Unknown,
}

#[derive(Clone, Copy)]
enum Kind {
    Manifest,
    Blob,
    Tags,
}

/// The client-facing error for an upstream failure with nothing cached to fall back on.
fn upstream_error(e: &UpstreamError, kind: Kind, what: &str) -> RegistryError {
    let unknown = match kind {
        Kind::Manifest => ErrorCode::ManifestUnknown,
        Kind::Blob => ErrorCode::BlobUnknown,
        Kind::Tags => ErrorCode::NameUnknown,
    };
    match e {
        UpstreamError::Status {
            status,
            retry_after,
        } => match *status {
            StatusCode::NOT_FOUND => {
                RegistryError::new(unknown, format!("{what} not found upstream"))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::new(
                unknown,
                format!("{what}: upstream denied access (repository missing or private)"),
            ),
            StatusCode::TOO_MANY_REQUESTS => {
                let err = RegistryError::new(
                    ErrorCode::TooManyRequests,
                    format!("{what}: upstream rate limit reached and nothing cached"),
                );
                err.with_retry_after(retry_after.unwrap_or(60))
            }
            s if s.is_server_error() => {
                let err = RegistryError::new(
                    ErrorCode::Unavailable,
                    format!("{what}: upstream answered {s} and nothing cached"),
                )
                .with_status(if s == StatusCode::SERVICE_UNAVAILABLE {
                    s
                } else {
                    StatusCode::BAD_GATEWAY
                });
                match retry_after {
                    Some(secs) => err.with_retry_after(*secs),
                    None => err,
                }
            }
            s => RegistryError::new(unknown, format!("{what}: upstream answered {s}")),
        },
        // The cause (upstream URLs, the error chain) is for the log, not for clients.
        UpstreamError::Unreachable(m) | UpstreamError::TimedOut(m) => {
            tracing::warn!(what, error = %m, "upstream unreachable and nothing cached");
            RegistryError::new(
                ErrorCode::Unavailable,
                format!("{what}: upstream unreachable and nothing cached"),
            )
        }
        UpstreamError::Down { retry_after } => RegistryError::new(
            ErrorCode::Unavailable,
            format!("{what}: every upstream endpoint is down and nothing cached"),
        )
        .with_status(StatusCode::SERVICE_UNAVAILABLE)
        .with_retry_after(*retry_after),
        UpstreamError::Invalid(m) => {
            tracing::warn!(what, error = %m, "upstream sent an invalid answer");
            RegistryError::new(
                ErrorCode::Unavailable,
                format!("{what}: upstream sent an invalid answer"),
            )
        }
        UpstreamError::Budget { retry_after } => RegistryError::new(
            ErrorCode::TooManyRequests,
            format!("{what}: the upstream request budget is spent and nothing cached"),
        )
        .with_retry_after(*retry_after),
    }
}

/// The Accept header sent upstream: the client's own list when it names types, else every
/// manifest type berth serves.
fn upstream_accept(accept: &[&str]) -> String {
    let explicit: Vec<&str> = accept
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            let mt = t.split(';').next().unwrap_or("").trim();
            !mt.is_empty() && mt != "*/*" && mt != "application/*"
        })
        .collect();
    let wildcard = explicit.len()
        != accept
            .iter()
            .flat_map(|v| v.split(','))
            .filter(|t| !t.trim().is_empty())
            .count();
    if explicit.is_empty() {
        MANIFEST_MEDIA_TYPES.join(", ")
    } else if wildcard {
        let mut all: Vec<&str> = explicit;
        all.extend(MANIFEST_MEDIA_TYPES);
        all.join(", ")
    } else {
        explicit.join(", ")
    }
}

/// The client-facing error for a tag with no manifest of a type the client accepts.
fn not_acceptable(t: &Target, tag: &Tag) -> RegistryError {
    RegistryError::new(
        ErrorCode::ManifestUnknown,
        format!(
            "manifest {}:{tag}: none of a type the Accept header names (berth does not serve schema 1)",
            t.repo
        ),
    )
}

/// Whether the client accepts every manifest type, so a tag answer fetched for it is the one
/// every client should get (and can be cached as the tag's answer).
fn accepts_all(accept: &[&str]) -> bool {
    MANIFEST_MEDIA_TYPES
        .iter()
        .all(|mt| accepts_media_type(accept, mt))
}

impl Mirror {
    pub fn new(
        config: &Config,
        blobs: Arc<BlobStore>,
        manifests: Arc<ManifestStore>,
        shared: Option<Arc<SharedStore>>,
        cluster: Option<Arc<Cluster>>,
        metrics: Arc<Metrics>,
    ) -> Result<Mirror, SetupError> {
        // Redirects and token realms may reach local addresses only at configured endpoints.
        let outbound = Arc::new(OutboundPolicy::from_config(config));
        let mut upstreams = HashMap::new();
        for r in &config.registries {
            metrics.add_registry(&r.name);
            let up = Upstream::new(r, metrics.clone(), outbound.clone())?;
            let up = Arc::new(up);
            up.spawn_probes();
            upstreams.insert(Arc::<str>::from(r.name.as_str()), up);
        }
        let core = Core {
            upstreams: Arc::new(upstreams),
            manifests,
            metrics,
            negotiated: moka::sync::Cache::builder()
                .max_capacity(100_000)
                // moka refuses more than 1000 years.
                .time_to_live(
                    config
                        .cache
                        .tag_ttl
                        .min(Duration::from_secs(100 * 365 * 86_400)),
                )
                .build(),
            shared,
            missing: (!config.cache.negative_ttl.is_zero()).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(
                        config
                            .cache
                            .negative_ttl
                            .min(Duration::from_secs(100 * 365 * 86_400)),
                    )
                    .build()
            }),
            revalidating: Arc::new(Mutex::new(HashMap::new())),
        };
        Ok(Mirror {
            core,
            blobs,
            tag_ttl: config.cache.tag_ttl,
            locks: Mutex::new(HashMap::new()),
            cluster,
            referrers: moka::sync::Cache::builder().max_capacity(10_000).build(),
        })
    }

    /// The manifest and tag store (repositories, their members and pull counts; the admin
    /// API's inventory and purges).
    pub fn manifest_store(&self) -> &Arc<ManifestStore> {
        &self.core.manifests
    }

    /// The shared object store behind the cache, if one is configured.
    pub fn shared(&self) -> Option<&Arc<SharedStore>> {
        self.core.shared.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.core.metrics
    }

    pub fn metrics_arc(&self) -> Arc<Metrics> {
        self.core.metrics.clone()
    }

    /// This replica's instance id, when it is part of a cluster.
    pub fn cluster_id(&self) -> Option<&str> {
        self.cluster.as_deref().map(Cluster::id)
    }

    /// Whether the cluster (if any) knows its peers.
    pub fn cluster_ready(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.is_ready())
    }

    /// Whether `ip` is one of the cluster's replicas.
    pub fn is_peer(&self, ip: std::net::IpAddr) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.is_peer(ip))
    }

    /// Forgets upstream's 404 for `reference` of `t` remembered for `negative_ttl`, so the next
    /// request for it asks upstream again (a warm).
    pub fn forget_missing(&self, t: &Target, reference: &Reference) {
        if let Some(missing) = &self.core.missing {
            missing.invalidate(&(t.clone(), reference.to_string()));
        }
    }

    /// Serializes work on one key (a tag revalidation, a manifest fetch).
    async fn lock(&self, key: LockKey) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.locks.lock();
            if locks.len() > 1024 {
                locks.retain(|_, w| w.strong_count() > 0);
            }
            match locks.get(&key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key, Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }

    /// A manifest by tag or digest. An `Accept` header that names no manifest type (garbage,
    /// `text/html`, wildcards) is taken as accepting them all.
    pub async fn manifest(
        &self,
        t: &Target,
        reference: &Reference,
        accept: &[&str],
    ) -> ManifestAnswer {
        // The warm path: a fresh tag of a type the client accepts (one pass over the list).
        if let Reference::Tag(tag) = reference
            && let TagState::Fresh(m) = self.tag_state(t, tag, accept)
        {
            return Ok((m, CacheResult::Hit));
        }
        let accept = if named_manifest_types(accept) == 0 {
            &[]
        } else {
            accept
        };
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(t, d, accept).await,
            Reference::Tag(tag) => self.manifest_by_tag(t, tag, accept).await,
        }
    }

    /// A manifest by digest: cached here, fetched by a request this one waited for, in the
    /// shared store, or fetched now. Never stale: a digest's manifest never changes.
    async fn manifest_by_digest(&self, t: &Target, d: &Digest, accept: &[&str]) -> ManifestAnswer {
        if let Some(m) = self.core.manifests.get(&t.registry, &t.repo, d) {
            return Ok((m, CacheResult::Hit));
        }
        let reference = d.to_string();
        self.core.not_missing(t, &reference)?;
        let _guard = self.lock(LockKey::Digest(t.clone(), d.clone())).await;
        if let Some(m) = self.core.manifests.get(&t.registry, &t.repo, d) {
            return Ok((m, CacheResult::Coalesced));
        }
        self.core.not_missing(t, &reference)?;
        if let Some(m) = self.core.shared_manifest(t, d).await {
            return Ok((m, CacheResult::Hit));
        }
        let m = self
            .core
            .fetch_manifest(t, UpstreamPath::ManifestDigest(d), accept)
            .await
            .map_err(|e| match e {
                FetchError::Upstream(e) => {
                    self.core.remember_missing(t, &reference, &e);
                    upstream_error(&e, Kind::Manifest, &format!("manifest {d}"))
                }
                FetchError::Unservable(mt) => RegistryError::new(
                    ErrorCode::ManifestUnknown,
                    format!("manifest {d} is of type {mt}, which berth does not serve"),
                ),
            })?;
        Ok((m, CacheResult::Miss))
    }

    /// A manifest by tag: a small state machine, one step per function. A fresh cached answer
    /// is served at once; otherwise, holding the tag's lock (so one request per tag asks
    /// upstream and the others wait for its answer), the cached state is read again — another
    /// request may have revalidated it meanwhile — and then, unless fresh, checked against the
    /// shared store, where another replica may have checked the tag more recently
    /// ([`newer_shared_tag`]). A stale answer is revalidated upstream ([`revalidate_tag`]);
    /// with none, or when the tag changed, it is fetched ([`fetch_tag`]). Whether an upstream
    /// failure is answered with the stale answer or an error is [`stale_or_error`]'s rule.
    ///
    /// With a stale answer at hand, a client waits at most the registry's
    /// `revalidate_timeout` (for the lock and upstream together); past it the stale answer is
    /// served and the revalidation finishes in the background ([`revalidate_bounded`]), where
    /// it holds the tag's lock: while it runs, the tag's requests are answered from the cache
    /// at once.
    ///
    /// [`newer_shared_tag`]: Mirror::newer_shared_tag
    /// [`revalidate_tag`]: Core::revalidate_tag
    /// [`fetch_tag`]: Core::fetch_tag
    /// [`stale_or_error`]: Core::stale_or_error
    /// [`revalidate_bounded`]: Mirror::revalidate_bounded
    ///
    /// A client that accepts only manifest types other than the cached one's gets what upstream
    /// answered the last such client within the tag TTL ([`negotiated`]), if any.
    ///
    /// [`negotiated`]: Mirror::negotiated
    async fn manifest_by_tag(&self, t: &Target, tag: &Tag, accept: &[&str]) -> ManifestAnswer {
        let stale = match self.tag_state(t, tag, accept) {
            TagState::Fresh(m) => return Ok((m, CacheResult::Hit)),
            TagState::Stale(_, m) => Some(m),
            TagState::Unknown => None,
        };
        if let Some(answer) = self.negotiated(t, tag, accept) {
            return answer;
        }
        self.core.not_missing(t, tag.as_str())?;
        let deadline = tokio::time::Instant::now() + self.core.revalidate_timeout(&t.registry);
        let lock = self.lock(LockKey::Tag(t.clone(), tag.clone()));
        let guard = match stale {
            Some(m) if self.core.in_background(t, tag) => {
                tracing::debug!(registry = %t.registry, repository = %t.repo, tag = %tag, "tag is being revalidated in the background: serving the cached manifest");
                return Ok((m, CacheResult::Stale));
            }
            Some(m) => match tokio::time::timeout_at(deadline, lock).await {
                Ok(guard) => guard,
                Err(_) => {
                    tracing::debug!(registry = %t.registry, repository = %t.repo, tag = %tag, "tag revalidation by another request still running after revalidate_timeout: serving the cached manifest");
                    return Ok((m, CacheResult::Stale));
                }
            },
            None => lock.await,
        };
        let state = self.tag_state(t, tag, accept);
        if !matches!(state, TagState::Fresh(_)) {
            if let Some(answer) = self.negotiated(t, tag, accept) {
                return answer;
            }
            // Another request may have been told 404 while this one waited for the lock.
            self.core.not_missing(t, tag.as_str())?;
        }
        match self.newer_shared_tag(t, tag, accept, state).await {
            TagState::Fresh(m) => Ok((m, CacheResult::Hit)),
            TagState::Stale(_, m) => {
                self.revalidate_bounded(t, tag, accept, m, guard, deadline)
                    .await
            }
            TagState::Unknown => self.core.fetch_tag(t, tag, accept, None).await,
        }
    }

    /// Revalidates a stale answer ([`Core::revalidate_tag`]) in a task of its own that holds
    /// the tag's lock (`guard`), waiting for it until `deadline`; past it (at once when the
    /// deadline has passed, as with `revalidate_timeout = "0s"`) the stale answer is served
    /// and the task goes on, updating the tag's record for the next request.
    async fn revalidate_bounded(
        &self,
        t: &Target,
        tag: &Tag,
        accept: &[&str],
        stale: Arc<Manifest>,
        guard: tokio::sync::OwnedMutexGuard<()>,
        deadline: tokio::time::Instant,
    ) -> ManifestAnswer {
        let entry = Revalidating::start(&self.core.revalidating, t, tag, deadline);
        let core = self.core.clone();
        let (target, name, cached) = (t.clone(), tag.clone(), stale.clone());
        let accept: Vec<String> = accept.iter().map(|a| (*a).to_owned()).collect();
        let task = tokio::spawn(async move {
            // Dropped in reverse order: the entry goes before the lock is released.
            let _guard = guard;
            let _entry = entry;
            let accept: Vec<&str> = accept.iter().map(String::as_str).collect();
            let answer = core.revalidate_tag(&target, &name, &accept, cached).await;
            if tokio::time::Instant::now() >= deadline {
                let result = answer
                    .as_ref()
                    .map(|(m, r)| (m.digest.to_string(), r.as_str()));
                tracing::info!(registry = %target.registry, repository = %target.repo, tag = %name, result = ?result, "background tag revalidation finished");
            }
            answer
        });
        if tokio::time::Instant::now() >= deadline {
            tracing::debug!(registry = %t.registry, repository = %t.repo, tag = %tag, "revalidating the tag in the background: serving the cached manifest");
            return Ok((stale, CacheResult::Stale));
        }
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::error!(registry = %t.registry, repository = %t.repo, tag = %tag, error = %e, "tag revalidation failed: serving the cached manifest (stale)");
                Ok((stale, CacheResult::Stale))
            }
            Err(_) => {
                tracing::warn!(registry = %t.registry, repository = %t.repo, tag = %tag, "upstream did not answer within revalidate_timeout: serving the cached manifest (stale), revalidating in the background");
                Ok((stale, CacheResult::Stale))
            }
        }
    }

    /// What this replica's cache knows of a tag, for a client that accepts `accept`.
    fn tag_state(&self, t: &Target, tag: &Tag, accept: &[&str]) -> TagState {
        let cached = || {
            let rec = self.core.manifests.get_tag(&t.registry, &t.repo, tag)?;
            let m = self.core.manifests.get(&t.registry, &t.repo, &rec.digest)?;
            accepts_media_type(accept, &m.media_type).then_some((rec, m))
        };
        match cached() {
            Some((rec, m)) => self.by_age(rec, m),
            None => TagState::Unknown,
        }
    }

    /// The remembered answer for a client that does not accept every manifest type, while the
    /// tag has not moved since (and within the tag TTL).
    fn negotiated(&self, t: &Target, tag: &Tag, accept: &[&str]) -> Option<ManifestAnswer> {
        if accepts_all(accept) {
            return None;
        }
        let types = named_manifest_types(accept);
        let n = self.core.negotiated.get(&(t.clone(), tag.clone(), types))?;
        if n.base != self.core.tag_digest(t, tag) {
            return None;
        }
        match &n.answer {
            Some(d) => {
                let m = self.core.manifests.get(&t.registry, &t.repo, d)?;
                Some(Ok((m, CacheResult::Hit)))
            }
            None => {
                tracing::debug!(registry = %t.registry, repository = %t.repo, tag = %tag, types, "no manifest of a type the client accepts (remembered)");
                Some(Err(not_acceptable(t, tag)))
            }
        }
    }

    /// Fresh or stale, by when the tag was last checked upstream.
    fn by_age(&self, rec: Arc<TagRecord>, m: Arc<Manifest>) -> TagState {
        if rec.age() < self.tag_ttl {
            TagState::Fresh(m)
        } else {
            TagState::Stale(rec, m)
        }
    }

    /// The tag as the shared store has it, when another replica checked it more recently than
    /// `state` says (its manifest kept here too); else `state`. A fresh state is kept as is.
    async fn newer_shared_tag(
        &self,
        t: &Target,
        tag: &Tag,
        accept: &[&str],
        state: TagState,
    ) -> TagState {
        let than = match &state {
            TagState::Fresh(_) => return state,
            TagState::Stale(rec, _) => Some(rec.checked),
            TagState::Unknown => None,
        };
        let newer = async {
            let shared = self.core.shared.as_ref()?;
            let rec = shared.get_tag(&t.registry, &t.repo, tag).await?;
            if than.is_some_and(|checked| checked >= rec.checked) {
                return None;
            }
            let m = match self.core.manifests.get(&t.registry, &t.repo, &rec.digest) {
                Some(m) => m,
                None => self.core.shared_manifest(t, &rec.digest).await?,
            };
            if !accepts_media_type(accept, &m.media_type) {
                return None;
            }
            self.core
                .manifests
                .put_tag(&t.registry, &t.repo, tag, rec.clone());
            Some((Arc::new(rec), m))
        };
        match newer.await {
            Some((rec, m)) => self.by_age(rec, m),
            None => state,
        }
    }

    /// Confirms upstream that the repository contains a blob berth already has.
    async fn confirm_member(&self, t: &Target, digest: &Digest) -> Result<(), RegistryError> {
        let unknown = || {
            RegistryError::new(
                ErrorCode::BlobUnknown,
                format!("blob {digest} unknown to repository {}", t.repo),
            )
        };
        if self
            .core
            .manifests
            .is_known_non_member(&t.registry, &t.repo, digest)
        {
            return Err(unknown());
        }
        let up = self.core.upstream(&t.registry)?;
        let answer = up.head_blob(&t.repo, digest).await;
        match answer {
            Ok(_) => {
                self.core.manifests.add_member(&t.registry, &t.repo, digest);
                Ok(())
            }
            Err(UpstreamError::Status { status, .. })
                if status == StatusCode::NOT_FOUND
                    || status == StatusCode::UNAUTHORIZED
                    || status == StatusCode::FORBIDDEN =>
            {
                self.core
                    .manifests
                    .add_non_member(&t.registry, &t.repo, digest);
                Err(unknown())
            }
            Err(e) => Err(upstream_error(&e, Kind::Blob, &format!("blob {digest}"))),
        }
    }

    /// A blob: from the cache, or from a fill (joined or started), or for HEAD from upstream.
    pub async fn blob(
        &self,
        t: &Target,
        digest: &Digest,
        head: bool,
        via: Via<'_>,
    ) -> Result<(BlobAnswer, CacheResult), RegistryError> {
        if let Some(blob) = self.blobs.lookup(digest) {
            if !self.core.manifests.is_member(&t.registry, &t.repo, digest) {
                self.confirm_member(t, digest).await?;
            }
            return Ok((BlobAnswer::Cached(blob), CacheResult::Hit));
        }
        // The shared store holds blobs of every repository: it answers for this one only when
        // a cached manifest (or upstream) says the repository holds the blob.
        let member = self.core.manifests.is_member(&t.registry, &t.repo, digest);
        let up = self.core.upstream(&t.registry)?.clone();
        if head {
            if member
                && let Some(shared) = &self.core.shared
                && let Lookup::Found(len) = shared.head_blob(digest).await
            {
                return Ok((BlobAnswer::Head { len: Some(len) }, CacheResult::Hit));
            }
            let resp = up
                .head_blob(&t.repo, digest)
                .await
                .map_err(|e| upstream_error(&e, Kind::Blob, &format!("blob {digest}")))?;
            self.core.manifests.add_member(&t.registry, &t.repo, digest);
            let len = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            return Ok((BlobAnswer::Head { len }, CacheResult::Miss));
        }
        let plan = sources::Plan {
            target: t.clone(),
            digest: digest.clone(),
            upstream: up,
            manifests: self.core.manifests.clone(),
            metrics: self.core.metrics.clone(),
            shared: self.core.shared.clone().filter(|_| member),
            upload_to: self.core.shared.clone(),
            cluster: self.cluster.clone().filter(|_| !via.peer),
            authorization: via.authorization.map(str::to_owned),
        };
        if !self.blobs.may_fill(digest) {
            tracing::warn!(digest = %digest, pinned_bytes = self.blobs.pinned_bytes(), "refusing a fill: pinned blobs fill cache.max_size (unpin images or raise max_size)");
            return Err(RegistryError::new(
                ErrorCode::Internal,
                "the cache is full of pinned images: unpin some or raise cache.max_size",
            )
            .with_status(http::StatusCode::INSUFFICIENT_STORAGE));
        }
        let (fill, joined) = self.blobs.fill(digest, t, |fill| {
            sources::open(Arc::new(plan), fill.clone()).boxed()
        });
        // A joiner from another repository must first show that its repository holds the blob
        // too; one from the same repository shares the fill's own upstream answer.
        let same_repo = fill.origin == *t;
        if joined && !same_repo && !self.core.manifests.is_member(&t.registry, &t.repo, digest) {
            self.confirm_member(t, digest).await?;
        }
        let len = fill.wait_started().await?;
        // Joining a fill that already arrived whole and verified is a cache hit in all but
        // name (the blob is being committed to disk).
        let result = match (joined, fill.is_complete()) {
            (false, _) => CacheResult::Miss,
            (true, false) => CacheResult::Coalesced,
            (true, true) => CacheResult::Hit,
        };
        Ok((BlobAnswer::Filling { fill, len }, result))
    }

    /// The tags of a repository, from upstream (`n` and `last` passed on).
    pub async fn tags(
        &self,
        t: &Target,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<Bytes, RegistryError> {
        let up = self.core.upstream(&t.registry)?;
        let what = format!("tags of {}", t.repo);
        let resp = up
            .send(
                Method::GET,
                &t.repo,
                UpstreamPath::Tags { n, last },
                Some("application/json"),
                Urgency::Fetch,
            )
            .await
            .map_err(|e| upstream_error(&e, Kind::Tags, &what))?;
        up.read_body(resp, MAX_TAGS_BYTES)
            .await
            .map_err(|e| upstream_error(&e, Kind::Tags, &what))
    }

    /// Repositories of a registry that have cached manifests, after `last` (pagination).
    pub fn catalog(&self, registry: &str, last: Option<&str>) -> Vec<String> {
        let repos = self.core.manifests.repositories(registry);
        let start = last.map_or(0, |l| repos.partition_point(|r| r.as_str() <= l));
        repos.into_iter().skip(start).collect()
    }
}

/// A tag's entry in [`Core::revalidating`], removed when its revalidation ends.
struct Revalidating {
    map: Arc<Mutex<HashMap<(Target, Tag), tokio::time::Instant>>>,
    key: (Target, Tag),
}

impl Revalidating {
    fn start(
        map: &Arc<Mutex<HashMap<(Target, Tag), tokio::time::Instant>>>,
        t: &Target,
        tag: &Tag,
        deadline: tokio::time::Instant,
    ) -> Revalidating {
        let key = (t.clone(), tag.clone());
        map.lock().insert(key.clone(), deadline);
        Revalidating {
            map: map.clone(),
            key,
        }
    }
}

impl Drop for Revalidating {
    fn drop(&mut self) {
        self.map.lock().remove(&self.key);
    }
}

impl Core {
    /// The registry's `revalidate_timeout` (zero for a registry not configured, which has
    /// nothing cached to serve).
    fn revalidate_timeout(&self, registry: &str) -> Duration {
        self.upstreams
            .get(registry)
            .map_or(Duration::ZERO, |u| u.revalidate_timeout)
    }

    /// Whether the tag is being revalidated in the background: its revalidation has run past
    /// the deadline of the request that started it.
    fn in_background(&self, t: &Target, tag: &Tag) -> bool {
        let key = (t.clone(), tag.clone());
        self.revalidating
            .lock()
            .get(&key)
            .is_some_and(|deadline| *deadline <= tokio::time::Instant::now())
    }

    /// Err(404) while upstream's 404 for `reference` of `t` is remembered (`negative_ttl`).
    fn not_missing(&self, t: &Target, reference: &str) -> Result<(), RegistryError> {
        let Some(missing) = &self.missing else {
            return Ok(());
        };
        if !missing.contains_key(&(t.clone(), reference.to_owned())) {
            return Ok(());
        }
        tracing::debug!(registry = %t.registry, repository = %t.repo, reference, "upstream answered 404 within negative_ttl: answering 404 again");
        let not_found = UpstreamError::Status {
            status: StatusCode::NOT_FOUND,
            retry_after: None,
        };
        let what = if reference.contains(':') {
            format!("manifest {reference}")
        } else {
            format!("manifest {}:{reference}", t.repo)
        };
        Err(upstream_error(&not_found, Kind::Manifest, &what))
    }

    /// Remembers upstream's 404 for `reference` of `t` (a tag or digest) for `negative_ttl`.
    fn remember_missing(&self, t: &Target, reference: &str, e: &UpstreamError) {
        if let (Some(missing), UpstreamError::Status { status, .. }) = (&self.missing, e)
            && *status == StatusCode::NOT_FOUND
        {
            missing.insert((t.clone(), reference.to_owned()), ());
        }
    }

    /// Stores a tag record here and in the shared store.
    fn record_tag(&self, t: &Target, tag: &Tag, rec: TagRecord) {
        if let Some(missing) = &self.missing {
            missing.invalidate(&(t.clone(), tag.as_str().to_owned()));
        }
        if let Some(shared) = &self.shared {
            shared.put_tag(&t.registry, &t.repo, tag, &rec);
        }
        self.manifests.put_tag(&t.registry, &t.repo, tag, rec);
    }

    /// A manifest from the shared store, verified and kept on the local disk too.
    async fn shared_manifest(&self, t: &Target, digest: &Digest) -> Option<Arc<Manifest>> {
        let shared = self.shared.as_ref()?;
        let m = Arc::new(shared.get_manifest(&t.registry, &t.repo, digest).await?);
        self.manifests.put(&t.registry, &t.repo, m.clone());
        Some(m)
    }

    fn upstream(&self, registry: &str) -> Result<&Arc<Upstream>, RegistryError> {
        self.upstreams
            .get(registry)
            .ok_or_else(|| RegistryError::new(ErrorCode::NameUnknown, "registry is not configured"))
    }

    /// The digest of the tag's record, if any.
    fn tag_digest(&self, t: &Target, tag: &Tag) -> Option<Digest> {
        let rec = self.manifests.get_tag(&t.registry, &t.repo, tag)?;
        Some(rec.digest.clone())
    }

    /// Remembers upstream's answer for clients accepting the types `accept` names.
    fn remember_negotiated(&self, t: &Target, tag: &Tag, accept: &[&str], answer: Option<Digest>) {
        let base = self.tag_digest(t, tag);
        let key = (t.clone(), tag.clone(), named_manifest_types(accept));
        self.negotiated
            .insert(key, Arc::new(Negotiated { base, answer }));
    }

    /// A stale answer, checked upstream with a HEAD (which Docker Hub does not count as a
    /// pull): unchanged, it is renewed and served; changed, the tag is fetched.
    async fn revalidate_tag(
        &self,
        t: &Target,
        tag: &Tag,
        accept: &[&str],
        stale: Arc<Manifest>,
    ) -> ManifestAnswer {
        let path = UpstreamPath::ManifestTag(tag);
        let resp = match self
            .manifest_request(t, Method::HEAD, path, accept, Urgency::Revalidate)
            .await
        {
            Ok(resp) => resp,
            Err(e) => return self.stale_or_error(t, tag, &e, Some(stale)),
        };
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        if digest.as_ref() == Some(&stale.digest) {
            self.record_tag(t, tag, TagRecord::now(&stale.digest, &stale.media_type));
            return Ok((stale, CacheResult::Revalidated));
        }
        self.fetch_tag(t, tag, accept, Some(stale)).await
    }

    /// Fetches the tag's manifest; recorded as the tag's answer when the client accepts every
    /// manifest type, else remembered for clients accepting the same types
    /// ([`negotiated`](Mirror::negotiated)), as is the lack of one: upstream answering a type
    /// the client does not accept (an index to a client of single-platform types), one berth
    /// does not serve (schema 1), or 404. `stale` is what may be served if upstream fails.
    async fn fetch_tag(
        &self,
        t: &Target,
        tag: &Tag,
        accept: &[&str],
        stale: Option<Arc<Manifest>>,
    ) -> ManifestAnswer {
        let all = accepts_all(accept);
        let unacceptable = |what: &str| {
            tracing::info!(registry = %t.registry, repository = %t.repo, tag = %tag, answer = what, accept = ?accept, "no manifest of a type the client accepts: answered 404 for the tag TTL");
            Err(not_acceptable(t, tag))
        };
        match self
            .fetch_manifest(t, UpstreamPath::ManifestTag(tag), accept)
            .await
        {
            Ok(m) if all => {
                self.record_tag(t, tag, TagRecord::now(&m.digest, &m.media_type));
                Ok((m, CacheResult::Miss))
            }
            Ok(m) if accepts_media_type(accept, &m.media_type) => {
                self.remember_negotiated(t, tag, accept, Some(m.digest.clone()));
                Ok((m, CacheResult::Miss))
            }
            Ok(m) => {
                self.remember_negotiated(t, tag, accept, None);
                unacceptable(&m.media_type)
            }
            Err(FetchError::Unservable(mt)) if !all => {
                self.remember_negotiated(t, tag, accept, None);
                unacceptable(&mt)
            }
            Err(FetchError::Unservable(mt)) => {
                let e = UpstreamError::Invalid(format!("a manifest of type {mt}"));
                self.stale_or_error(t, tag, &e, stale)
            }
            Err(FetchError::Upstream(e)) => {
                if !all
                    && matches!(
                        e,
                        UpstreamError::Status {
                            status: StatusCode::NOT_FOUND,
                            ..
                        }
                    )
                {
                    self.remember_negotiated(t, tag, accept, None);
                }
                self.stale_or_error(t, tag, &e, stale)
            }
        }
    }

    /// The one rule for when a cached tag answer is served instead of an error: upstream failed
    /// (`e`), and a stale answer is at hand. It is served — marked stale — on any failure
    /// except an authoritative 404, the tag gone upstream: unreachable, 5xx, 429, the request
    /// budget spent or revalidation paused, an invalid answer (a manifest that does not match
    /// its digest), and also a denial or any other 4xx, which say more about the upstream's
    /// state than about the tag. With nothing cached, or on a 404, the client gets the
    /// upstream error. The same rule holds whether the revalidating HEAD or the GET failed.
    fn stale_or_error(
        &self,
        t: &Target,
        tag: &Tag,
        e: &UpstreamError,
        stale: Option<Arc<Manifest>>,
    ) -> ManifestAnswer {
        let gone = matches!(
            e,
            UpstreamError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }
        );
        self.remember_missing(t, tag.as_str(), e);
        match stale {
            Some(m) if !gone => {
                tracing::warn!(registry = %t.registry, repository = %t.repo, tag = %tag, error = %e, "upstream failed: serving the cached manifest (stale)");
                Ok((m, CacheResult::Stale))
            }
            _ => {
                let what = format!("manifest {}:{tag}", t.repo);
                Err(upstream_error(e, Kind::Manifest, &what))
            }
        }
    }

    /// Sends a manifest request upstream with the Accept list the client's implies.
    async fn manifest_request(
        &self,
        t: &Target,
        method: Method,
        path: UpstreamPath<'_>,
        accept: &[&str],
        urgency: Urgency,
    ) -> Result<reqwest::Response, UpstreamError> {
        let up = self
            .upstream(&t.registry)
            .map_err(|e| UpstreamError::Invalid(e.message))?;
        up.send(
            method,
            &t.repo,
            path,
            Some(&upstream_accept(accept)),
            urgency,
        )
        .await
    }

    /// GETs a manifest, verifies it, and stores it.
    async fn fetch_manifest(
        &self,
        t: &Target,
        path: UpstreamPath<'_>,
        accept: &[&str],
    ) -> Result<Arc<Manifest>, FetchError> {
        let expected = match path {
            UpstreamPath::ManifestDigest(d) => Some(d),
            _ => None,
        };
        let resp = self
            .manifest_request(t, Method::GET, path, accept, Urgency::Fetch)
            .await
            .map_err(FetchError::Upstream)?;
        let header_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|v| !v.is_empty() && v != "application/octet-stream" && v != "text/plain");
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let up = self
            .upstream(&t.registry)
            .map_err(|e| FetchError::Upstream(UpstreamError::Invalid(e.message)))?;
        let endpoint = endpoint_of(&resp);
        let body = up
            .read_body(resp, MAX_MANIFEST_BYTES)
            .await
            .map_err(FetchError::Upstream)?;
        self.metrics
            .upstream_bytes
            .with_label_values(&[&t.registry])
            .inc_by(body.len() as u64);
        let algorithm = expected
            .or(header_digest.as_ref())
            .map_or(oci::DigestAlgorithm::Sha256, |d| d.algorithm());
        let mut hasher = Hasher::new(algorithm);
        hasher.update(&body);
        let digest = hasher.finish();
        let media_type = manifest_media_type(&body).or(header_type);
        for claimed in [expected, header_digest.as_ref()].into_iter().flatten() {
            if *claimed != digest {
                // A signed schema-1 manifest's digest is that of its bytes without the
                // signatures: what a client asking for schema 1 gets, not an upstream fault.
                if let Some(mt) = media_type.as_deref()
                    && !MANIFEST_MEDIA_TYPES.contains(&mt)
                {
                    tracing::info!(registry = %t.registry, repository = %t.repo, reference = ?path, media_type = mt, "upstream answered a manifest type berth does not serve; discarded");
                    return Err(FetchError::Unservable(mt.to_owned()));
                }
                tracing::error!(registry = %t.registry, repository = %t.repo, reference = ?path, claimed = %claimed, actual = %digest, "upstream manifest does not match its digest; discarded");
                up.record_failure(
                    &endpoint,
                    UpstreamFailure::BadBody,
                    "manifest does not match its digest",
                );
                return Err(FetchError::Upstream(UpstreamError::Invalid(format!(
                    "manifest bytes hash to {digest}, not {claimed}"
                ))));
            }
        }
        let media_type = media_type.ok_or_else(|| {
            FetchError::Upstream(UpstreamError::Invalid(
                "manifest is not JSON and has no media type".into(),
            ))
        })?;
        let m = Arc::new(Manifest::new(digest, media_type, body).ok_or_else(|| {
            FetchError::Upstream(UpstreamError::Invalid(
                "manifest media type is not a valid header".into(),
            ))
        })?);
        self.manifests.put(&t.registry, &t.repo, m.clone());
        if let Some(shared) = &self.shared {
            shared.put_manifest(&t.registry, &t.repo, &m);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_forwarding() {
        let all = MANIFEST_MEDIA_TYPES.join(", ");
        assert_eq!(upstream_accept(&[]), all);
        assert_eq!(upstream_accept(&["*/*"]), all);
        assert_eq!(
            upstream_accept(&[oci_v2()]),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert!(upstream_accept(&[oci_v2(), "*/*"]).contains("index"));
        assert!(accepts_all(&[]));
        assert!(accepts_all(&["*/*"]));
        assert!(!accepts_all(&[oci_v2()]));
    }

    fn oci_v2() -> &'static str {
        "application/vnd.docker.distribution.manifest.v2+json"
    }
}
