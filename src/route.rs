//! Routing: which API operation a request is, and which configured registry and repository it
//! is for. A request can only ever name a registry from the config; anything else is refused
//! here, so no path, `ns` value or header can make berth contact an unconfigured host.

use std::sync::Arc;

use crate::error::{ErrorCode, RegistryError};
use crate::oci::{Digest, Reference, RepoName};

/// A repository of a configured registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub registry: Arc<str>,
    pub repo: RepoName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`
    Ping,
    /// `GET /v2/_catalog`: of the registry `ns` names, or (None) of the hosted registries and
    /// the default one.
    Catalog {
        registry: Option<Arc<str>>,
    },
    Manifest {
        target: Target,
        reference: Reference,
    },
    Blob {
        target: Target,
        digest: Digest,
    },
    Tags {
        target: Target,
    },
    /// `/v2/<name>/blobs/uploads/`: start an upload (or mount, or push a blob whole).
    Uploads {
        target: Target,
    },
    /// `/v2/<name>/blobs/uploads/<id>`: an upload session.
    Upload {
        target: Target,
        id: String,
    },
    /// `GET /v2/<name>/referrers/<digest>` (OCI 1.1).
    Referrers {
        target: Target,
        digest: Digest,
    },
    /// `/token`, the token endpoint (only with `[auth]`).
    Token,
    /// `/_berth/peer`, a replica's instance id (only in a cluster).
    PeerId,
}

impl Route {
    /// The repository a route is about, if any.
    pub fn target(&self) -> Option<&Target> {
        match self {
            Route::Manifest { target, .. }
            | Route::Blob { target, .. }
            | Route::Tags { target }
            | Route::Uploads { target }
            | Route::Upload { target, .. }
            | Route::Referrers { target, .. } => Some(target),
            _ => None,
        }
    }
}

/// A repository glob (`[[hosted]] repositories`, a registry's `allow` and `deny`): `*` matches within one path component,
/// `**` across any number of them.
#[derive(Debug, Clone)]
pub struct RepoGlob(globset::GlobMatcher);

impl RepoGlob {
    pub fn new(pattern: &str) -> Result<RepoGlob, String> {
        globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map(|g| RepoGlob(g.compile_matcher()))
            .map_err(|e| format!("{pattern:?} is not a glob: {e}"))
    }

    pub fn matches(&self, repo: &str) -> bool {
        self.0.is_match(repo)
    }
}

/// A mirrored registry's `allow` and `deny` globs.
#[derive(Debug, Clone, Default)]
pub struct RepoFilter {
    pub allow: Vec<RepoGlob>,
    pub deny: Vec<RepoGlob>,
}

impl RepoFilter {
    /// Deny first; then, if there is an allow list, the repository must be on it.
    pub fn permits(&self, repo: &str) -> bool {
        !self.deny.iter().any(|g| g.matches(repo))
            && (self.allow.is_empty() || self.allow.iter().any(|g| g.matches(repo)))
    }
}

pub struct Router {
    registries: Vec<Arc<str>>,
    default: Option<Arc<str>>,
    /// Hosted registries with the repository globs they serve when no registry is named.
    hosted: Vec<(Arc<str>, Vec<RepoGlob>)>,
    /// Per mirrored registry, the repositories that may be pulled through it.
    filters: Vec<(Arc<str>, RepoFilter)>,
    token: bool,
    peer_id: bool,
}

fn invalid_name(msg: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::NameInvalid, msg)
}

impl Router {
    pub fn new(registries: Vec<Arc<str>>, default: Option<Arc<str>>) -> Router {
        Router {
            registries,
            default,
            hosted: Vec::new(),
            filters: Vec::new(),
            token: false,
            peer_id: false,
        }
    }

    /// Routes to hosted registries: by name (`ns`, a path prefix) and, for names that name no
    /// registry, by these globs, before the default registry.
    pub fn with_hosted(mut self, hosted: Vec<(Arc<str>, Vec<RepoGlob>)>) -> Router {
        self.hosted = hosted;
        self
    }

    /// Limits what may be pulled through a registry (`allow` / `deny` of its `[[registry]]`).
    pub fn with_filter(mut self, registry: Arc<str>, filter: RepoFilter) -> Router {
        self.filters.push((registry, filter));
        self
    }

    /// Routes `/token` (berth issues tokens: `[auth]` is on).
    pub fn with_token_endpoint(mut self) -> Router {
        self.token = true;
        self
    }

    /// Routes the peer-id endpoint (berth is a replica of a cluster).
    pub fn with_peer_id(mut self) -> Router {
        self.peer_id = true;
        self
    }

    fn configured(&self, name: &str) -> Option<Arc<str>> {
        self.registries
            .iter()
            .chain(self.hosted.iter().map(|(n, _)| n))
            .find(|r| &***r == name)
            .cloned()
    }

    /// The hosted registry whose globs match a name that names no registry.
    fn hosted_for(&self, name: &str) -> Option<Arc<str>> {
        self.hosted
            .iter()
            .find(|(_, globs)| globs.iter().any(|g| g.matches(name)))
            .map(|(n, _)| n.clone())
    }

    /// The registry requests that name none go to (after the hosted globs).
    pub fn default_registry(&self) -> Option<&Arc<str>> {
        self.default.as_ref()
    }

    /// Whether a registry name is a hosted one.
    pub fn is_hosted(&self, registry: &str) -> bool {
        self.hosted.iter().any(|(n, _)| &**n == registry)
    }

    /// Parses `path` (and the `ns` query parameter) into a route.
    pub fn route(&self, path: &str, ns: Option<&str>) -> Result<Route, RegistryError> {
        if self.token && path == "/token" {
            return Ok(Route::Token);
        }
        if self.peer_id && path == crate::cluster::ID_PATH {
            return Ok(Route::PeerId);
        }
        let rest = path
            .strip_prefix("/v2")
            .ok_or_else(|| RegistryError::new(ErrorCode::NameUnknown, "not a registry API path"))?;
        if rest.is_empty() || rest == "/" {
            return Ok(Route::Ping);
        }
        let rest = rest
            .strip_prefix('/')
            .ok_or_else(|| RegistryError::new(ErrorCode::NameUnknown, "not a registry API path"))?;
        if rest == "_catalog" {
            let registry = match ns {
                Some(_) => Some(self.registry_for(ns, None)?.0),
                None => None,
            };
            return Ok(Route::Catalog { registry });
        }
        // Split from the right so repository names of any depth work.
        if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
            let target = self.target(name, ns)?;
            // A tag that cannot exist is unknown (404, as the spec's conformance suite wants);
            // a malformed digest is invalid (400).
            let reference = reference.parse::<Reference>().map_err(|e| {
                if reference.contains(':') {
                    RegistryError::new(
                        ErrorCode::DigestInvalid,
                        format!("invalid digest {:?}", e.0),
                    )
                } else {
                    RegistryError::new(
                        ErrorCode::ManifestUnknown,
                        format!("manifest unknown: {:?} is not a valid tag", e.0),
                    )
                }
            })?;
            return Ok(Route::Manifest { target, reference });
        }
        if let Some((name, id)) = rest.rsplit_once("/blobs/uploads") {
            let target = self.target(name, ns)?;
            let id = id.strip_prefix('/').unwrap_or(id);
            if id.is_empty() {
                return Ok(Route::Uploads { target });
            }
            if !crate::hosted::valid_upload_id(id) {
                return Err(RegistryError::new(
                    ErrorCode::BlobUploadUnknown,
                    "no such upload",
                ));
            }
            return Ok(Route::Upload {
                target,
                id: id.to_owned(),
            });
        }
        if let Some((name, digest)) = rest.rsplit_once("/referrers/") {
            let target = self.target(name, ns)?;
            let digest = parse_digest(digest)?;
            return Ok(Route::Referrers { target, digest });
        }
        if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
            let target = self.target(name, ns)?;
            let digest = parse_digest(digest)?;
            return Ok(Route::Blob { target, digest });
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Ok(Route::Tags {
                target: self.target(name, ns)?,
            });
        }
        Err(RegistryError::new(
            ErrorCode::NameUnknown,
            "unknown registry API endpoint",
        ))
    }

    /// Resolves the registry in this order: `ns`, a path prefix naming a configured
    /// registry, the default registry. Returns the registry and the name left for the repo.
    fn registry_for<'a>(
        &self,
        ns: Option<&str>,
        name: Option<&'a str>,
    ) -> Result<(Arc<str>, Option<&'a str>), RegistryError> {
        if let Some(ns) = ns {
            let reg = self.configured(ns).ok_or_else(|| {
                RegistryError::new(
                    ErrorCode::NameUnknown,
                    format!(
                        "registry {:?} is not configured on this mirror",
                        truncate(ns)
                    ),
                )
            })?;
            return Ok((reg, name));
        }
        if let Some(name) = name
            && let Some((first, rest)) = name.split_once('/')
        {
            if let Some(reg) = self.configured(first) {
                return Ok((reg, Some(rest)));
            }
            // A first component that looks like a host names a registry that is not ours.
            let host_like = first.contains('.') || first.contains(':') || first == "localhost";
            if host_like && crate::config::valid_registry_name(first) {
                return Err(RegistryError::new(
                    ErrorCode::NameUnknown,
                    format!(
                        "registry {:?} is not configured on this mirror",
                        truncate(first)
                    ),
                ));
            }
        }
        if let Some(hosted) = name.and_then(|n| self.hosted_for(n)) {
            return Ok((hosted, name));
        }
        match &self.default {
            Some(d) => Ok((d.clone(), name)),
            None => Err(RegistryError::new(
                ErrorCode::NameUnknown,
                "no registry named (use ?ns= or a registry path prefix) and no default registry",
            )),
        }
    }

    fn target(&self, name: &str, ns: Option<&str>) -> Result<Target, RegistryError> {
        let (registry, name) = self.registry_for(ns, Some(name))?;
        let name = name.unwrap_or_default();
        let target = self
            .make_target(registry, name)
            .ok_or_else(|| invalid_name(format!("invalid repository name {:?}", truncate(name))))?;
        if !self.permitted(&target) {
            return Err(RegistryError::new(
                ErrorCode::Denied,
                format!(
                    "{}/{} may not be pulled through this mirror (the registry's allow/deny list)",
                    target.registry, target.repo
                ),
            ));
        }
        Ok(target)
    }

    /// Whether a registry's allow/deny lists let `t` through.
    pub fn permitted(&self, t: &Target) -> bool {
        self.filters
            .iter()
            .find(|(r, _)| *r == t.registry)
            .is_none_or(|(_, f)| f.permits(t.repo.as_str()))
    }
}

impl Router {
    /// Every target a repository name could mean without an `ns` parameter: the registry its
    /// prefix names, or else each configured registry (for tokens, which carry no `ns`).
    pub fn targets_for_name(&self, name: &str) -> Vec<Target> {
        if let Some((first, rest)) = name.split_once('/')
            && let Some(reg) = self.configured(first)
        {
            return self.make_target(reg, rest).into_iter().collect();
        }
        if let Some(hosted) = self.hosted_for(name) {
            return self.make_target(hosted, name).into_iter().collect();
        }
        self.registries
            .iter()
            .filter_map(|r| self.make_target(r.clone(), name))
            .filter(|t| self.permitted(t))
            .collect()
    }

    fn make_target(&self, registry: Arc<str>, name: &str) -> Option<Target> {
        let mut repo = name.parse::<RepoName>().ok()?;
        if &*registry == "docker.io" {
            repo = repo.with_docker_library()?;
        }
        Some(Target { registry, repo })
    }
}

/// A digest from a path or query, or 400 `DIGEST_INVALID`.
pub fn parse_digest(s: &str) -> Result<Digest, RegistryError> {
    s.parse::<Digest>().map_err(|e| {
        RegistryError::new(
            ErrorCode::DigestInvalid,
            format!("invalid digest {:?}", e.0),
        )
    })
}

/// The repository name exactly as a registry API path names it (what a token scope names).
pub fn url_name(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    rest.rsplit_once("/manifests/")
        .or_else(|| rest.rsplit_once("/blobs/uploads"))
        .or_else(|| rest.rsplit_once("/blobs/"))
        .or_else(|| rest.rsplit_once("/referrers/"))
        .map(|(n, _)| n)
        .or_else(|| rest.strip_suffix("/tags/list"))
}

fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

/// The value of the `ns` query parameter, if any (percent-decoding is not needed: registry
/// names have no characters that would be encoded, and anything encoded is refused).
pub fn ns_param(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("ns="))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let regs: Vec<Arc<str>> = vec![
            "docker.io".into(),
            "ghcr.io".into(),
            "127.0.0.1:5001".into(),
        ];
        Router::new(regs, Some("docker.io".into()))
    }

    fn target(route: &Route) -> (&str, &str) {
        match route {
            Route::Manifest { target, .. }
            | Route::Blob { target, .. }
            | Route::Tags { target } => (&target.registry, target.repo.as_str()),
            other => panic!("no target in {other:?}"),
        }
    }

    #[test]
    fn resolution_order() {
        let r = router();
        let d = format!("sha256:{}", "a".repeat(64));
        let table: &[(&str, Option<&str>, (&str, &str))] = &[
            (
                "/v2/library/alpine/manifests/3.20",
                None,
                ("docker.io", "library/alpine"),
            ),
            (
                "/v2/alpine/manifests/3.20",
                None,
                ("docker.io", "library/alpine"),
            ),
            (
                "/v2/library/alpine/manifests/3.20",
                Some("docker.io"),
                ("docker.io", "library/alpine"),
            ),
            (
                "/v2/owner/app/manifests/1.0",
                Some("ghcr.io"),
                ("ghcr.io", "owner/app"),
            ),
            (
                "/v2/ghcr.io/owner/app/manifests/1.0",
                None,
                ("ghcr.io", "owner/app"),
            ),
            (
                "/v2/docker.io/alpine/manifests/1",
                None,
                ("docker.io", "library/alpine"),
            ),
            (
                "/v2/127.0.0.1:5001/a/b/c/tags/list",
                None,
                ("127.0.0.1:5001", "a/b/c"),
            ),
            ("/v2/a/b/c/d/e/tags/list", None, ("docker.io", "a/b/c/d/e")),
        ];
        for (path, ns, want) in table {
            let route = r.route(path, *ns).unwrap();
            assert_eq!(target(&route), *want, "{path} ns={ns:?}");
        }
        let blob = r.route(&format!("/v2/ghcr.io/x/blobs/{d}"), None).unwrap();
        assert!(matches!(blob, Route::Blob { .. }));
        assert_eq!(target(&blob), ("ghcr.io", "x"));
        assert_eq!(r.route("/v2/", None).unwrap(), Route::Ping);
        assert_eq!(r.route("/v2", None).unwrap(), Route::Ping);
        assert!(
            matches!(r.route("/v2/_catalog", Some("ghcr.io")).unwrap(), Route::Catalog { registry: Some(registry) } if &*registry == "ghcr.io")
        );
        assert!(matches!(
            r.route("/v2/a/blobs/uploads/", None).unwrap(),
            Route::Uploads { .. }
        ));
    }

    #[test]
    fn refusals() {
        let r = router();
        let d = format!("sha256:{}", "a".repeat(64));
        let table: &[(String, Option<&str>, ErrorCode)] = &[
            (
                "/v2/a/manifests/3.20".into(),
                Some("evil.com"),
                ErrorCode::NameUnknown,
            ),
            (
                "/v2/a/manifests/3.20".into(),
                Some("127.0.0.1:6379"),
                ErrorCode::NameUnknown,
            ),
            (
                "/v2/quay.io/a/manifests/1".into(),
                None,
                ErrorCode::NameUnknown,
            ),
            (
                "/v2/localhost:5000/a/manifests/1".into(),
                None,
                ErrorCode::NameUnknown,
            ),
            (
                "/v2/../etc/manifests/1".into(),
                None,
                ErrorCode::NameInvalid,
            ),
            (
                "/v2/a/%2e%2e/manifests/1".into(),
                None,
                ErrorCode::NameInvalid,
            ),
            ("/v2/a%2fb/manifests/1".into(), None, ErrorCode::NameInvalid),
            ("/v2/A/manifests/1".into(), None, ErrorCode::NameInvalid),
            (
                "/v2/a/manifests/bad:tag".into(),
                None,
                ErrorCode::DigestInvalid,
            ),
            (
                "/v2/a/manifests/.INVALID_MANIFEST_NAME".into(),
                None,
                ErrorCode::ManifestUnknown,
            ),
            ("/v2/a/manifests/".into(), None, ErrorCode::ManifestUnknown),
            (
                "/v2/a/blobs/sha256:123".into(),
                None,
                ErrorCode::DigestInvalid,
            ),
            (format!("/v2//blobs/{d}"), None, ErrorCode::NameInvalid),
            ("/v2/a/nothing".into(), None, ErrorCode::NameUnknown),
            ("/v3/".into(), None, ErrorCode::NameUnknown),
            ("/v2/a\0b/manifests/1".into(), None, ErrorCode::NameInvalid),
        ];
        for (path, ns, code) in table {
            let err = r.route(path, *ns).unwrap_err();
            assert_eq!(err.code, *code, "{path} ns={ns:?}: {err}");
        }
        let no_default = Router::new(vec!["ghcr.io".into()], None);
        assert!(no_default.route("/v2/a/manifests/1", None).is_err());
        // The token and peer-id endpoints exist only when configured.
        assert!(r.route("/token", None).is_err());
        assert!(r.route(crate::cluster::ID_PATH, None).is_err());
        let full = router().with_token_endpoint().with_peer_id();
        assert_eq!(full.route("/token", None).unwrap(), Route::Token);
        assert_eq!(
            full.route(crate::cluster::ID_PATH, None).unwrap(),
            Route::PeerId
        );
    }

    #[test]
    fn hosted_registries_by_name_and_by_glob() {
        let globs = vec![
            RepoGlob::new("team/*").unwrap(),
            RepoGlob::new("ci/**").unwrap(),
        ];
        let r = router().with_hosted(vec![("local".into(), globs)]);
        let table: &[(&str, Option<&str>, (&str, &str))] = &[
            ("/v2/team/app/manifests/1", None, ("local", "team/app")),
            ("/v2/ci/a/b/c/manifests/1", None, ("local", "ci/a/b/c")),
            // `*` stays within one component: deeper names go to the default registry.
            ("/v2/team/a/b/manifests/1", None, ("docker.io", "team/a/b")),
            ("/v2/local/misc/manifests/1", None, ("local", "misc")),
            ("/v2/misc/manifests/1", Some("local"), ("local", "misc")),
            (
                "/v2/team/app/manifests/1",
                Some("docker.io"),
                ("docker.io", "team/app"),
            ),
            (
                "/v2/alpine/manifests/1",
                None,
                ("docker.io", "library/alpine"),
            ),
        ];
        for (path, ns, want) in table {
            let route = r.route(path, *ns).unwrap();
            assert_eq!(target(&route), *want, "{path} ns={ns:?}");
        }
        assert!(r.is_hosted("local") && !r.is_hosted("docker.io"));
        let id = "0123456789abcdef0123456789abcdef";
        assert!(matches!(
            r.route(&format!("/v2/team/app/blobs/uploads/{id}"), None).unwrap(),
            Route::Upload { id: i, .. } if i == id
        ));
        assert_eq!(
            r.route("/v2/team/app/blobs/uploads/../../x", None)
                .unwrap_err()
                .code,
            ErrorCode::BlobUploadUnknown
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(
            r.route(&format!("/v2/team/app/referrers/{d}"), None)
                .unwrap(),
            Route::Referrers { .. }
        ));
        assert_eq!(url_name("/v2/team/app/blobs/uploads/"), Some("team/app"));
        assert_eq!(
            url_name(&format!("/v2/local/x/referrers/{d}")),
            Some("local/x")
        );
        // Tokens: a hosted name means the hosted registry only.
        let t = r.targets_for_name("team/app");
        assert_eq!(t.len(), 1);
        assert_eq!(&*t[0].registry, "local");
    }

    #[test]
    fn allow_and_deny_lists_apply_to_every_way_of_naming_a_registry() {
        let glob = |g: &str| RepoGlob::new(g).unwrap();
        let filter = RepoFilter {
            allow: vec![glob("library/*"), glob("bitnami/*")],
            deny: vec![glob("*/*-miner*")],
        };
        let r = router().with_filter("docker.io".into(), filter);
        for (path, ns) in [
            ("/v2/alpine/manifests/1", None),
            ("/v2/library/alpine/manifests/1", Some("docker.io")),
            ("/v2/docker.io/bitnami/redis/manifests/1", None),
        ] {
            assert!(r.route(path, ns).is_ok(), "{path} {ns:?}");
        }
        for (path, ns) in [
            ("/v2/someone/app/manifests/1", None),
            ("/v2/someone/app/manifests/1", Some("docker.io")),
            (
                "/v2/docker.io/someone/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
                None,
            ),
            ("/v2/bitnami/xmr-miner/manifests/1", None),
            ("/v2/library/coin-miner/tags/list", None),
        ] {
            assert_eq!(
                r.route(path, ns).unwrap_err().code,
                ErrorCode::Denied,
                "{path} {ns:?}"
            );
        }
        // Other registries are not filtered; tokens are never issued for denied names.
        assert!(r.route("/v2/x/y/manifests/1", Some("ghcr.io")).is_ok());
        assert!(
            r.targets_for_name("someone/app")
                .iter()
                .all(|t| &*t.registry != "docker.io")
        );
    }

    #[test]
    fn ns_parameter() {
        assert_eq!(ns_param(Some("ns=docker.io")), Some("docker.io"));
        assert_eq!(ns_param(Some("n=1&ns=ghcr.io")), Some("ghcr.io"));
        assert_eq!(ns_param(Some("n=1")), None);
        assert_eq!(ns_param(None), None);
    }
}
