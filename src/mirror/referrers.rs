//! The OCI 1.1 referrers API for mirrored registries: upstream's answer is passed through and
//! kept like a tag (trusted for `tag_ttl`, served stale when upstream fails). An upstream
//! without the API (404) is asked for the spec's fallback tag, `<alg>-<hex>`, through the
//! ordinary tag path (so it is cached like any tag); with neither, the list is empty.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};

use super::{Kind, Mirror, upstream_error};
use crate::error::{ErrorCode, RegistryError};
use crate::oci::{Digest, OCI_INDEX, Reference, Tag};
use crate::route::Target;
use crate::upstream::{UpstreamError, UpstreamPath, Urgency, read_limited};

/// The largest referrers list accepted from upstream.
const MAX_REFERRERS: usize = 4 * 1024 * 1024;

/// A referrers list as it was fetched.
pub(super) struct Fetched {
    index: Bytes,
    at: Instant,
}

fn empty_index() -> Bytes {
    Bytes::from(
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
            .to_string(),
    )
}

/// Keeps the descriptors of `index` whose `artifactType` is `filter`.
pub(crate) fn filter_index(index: &[u8], filter: &str) -> Bytes {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(index) else {
        return empty_index();
    };
    if let Some(list) = v.get_mut("manifests").and_then(|m| m.as_array_mut()) {
        list.retain(|d| d.get("artifactType").and_then(|a| a.as_str()) == Some(filter));
    }
    Bytes::from(v.to_string())
}

impl Mirror {
    /// The referrers of `subject` in a mirrored repository, as an OCI image index.
    pub async fn referrers(&self, t: &Target, subject: &Digest) -> Result<Bytes, RegistryError> {
        let key = (t.clone(), subject.clone());
        let cached = self.referrers.get(&key);
        if let Some(f) = &cached
            && f.at.elapsed() < self.tag_ttl
        {
            return Ok(f.index.clone());
        }
        match self.fetch_referrers(t, subject).await {
            Ok(index) => {
                self.referrers.insert(
                    key,
                    Arc::new(Fetched {
                        index: index.clone(),
                        at: Instant::now(),
                    }),
                );
                Ok(index)
            }
            // Stale on failure, like a tag.
            Err(e) => match cached {
                Some(f) => {
                    tracing::warn!(registry = %t.registry, repository = %t.repo, error = %e, "referrers: upstream failed; serving the cached list");
                    Ok(f.index.clone())
                }
                None => Err(e),
            },
        }
    }

    async fn fetch_referrers(&self, t: &Target, subject: &Digest) -> Result<Bytes, RegistryError> {
        let up = self.core.upstream(&t.registry)?;
        let what = format!("referrers of {subject} in {}", t.repo);
        let sent = up
            .send(
                Method::GET,
                &t.repo,
                UpstreamPath::Referrers(subject),
                Some(OCI_INDEX),
                Urgency::Fetch,
            )
            .await;
        match sent {
            Ok(resp) => {
                let body = read_limited(resp, MAX_REFERRERS)
                    .await
                    .map_err(|e| upstream_error(&e, Kind::Tags, &what))?;
                serde_json::from_slice::<serde_json::Value>(&body).map_err(|_| {
                    RegistryError::new(
                        ErrorCode::Unavailable,
                        format!("{what}: upstream sent no JSON index"),
                    )
                })?;
                Ok(body)
            }
            Err(UpstreamError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                // No referrers API upstream: the fallback tag.
                let tag: Tag = format!("{}-{}", subject.algorithm().as_str(), subject.hex())
                    .parse()
                    .map_err(|_| RegistryError::new(ErrorCode::DigestInvalid, "digest"))?;
                match self.manifest(t, &Reference::Tag(tag), &[OCI_INDEX]).await {
                    Ok((m, _)) => Ok(m.bytes.clone()),
                    Err(e) if e.code == ErrorCode::ManifestUnknown => Ok(empty_index()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(upstream_error(&e, Kind::Tags, &what)),
        }
    }
}
