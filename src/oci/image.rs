//! Docker-style image references, as the CLI takes them: `alpine` is
//! `docker.io/library/alpine:latest`; `ghcr.io/owner/app@sha256:…` names its registry.

use super::{Reference, RepoName};

/// An image reference, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repository: RepoName,
    pub reference: Reference,
}

impl std::str::FromStr for ImageRef {
    type Err = String;

    fn from_str(s: &str) -> Result<ImageRef, String> {
        let bad = |why: &str| format!("{s:?} is not an image reference: {why}");
        let (name, reference) = match s.split_once('@') {
            Some((n, d)) => (n, d.to_owned()),
            None => {
                // A tag is after the last ':' that comes after the last '/' (a port is not).
                let slash = s.rfind('/').map_or(0, |i| i + 1);
                match s[slash..].rfind(':') {
                    Some(i) => (&s[..slash + i], s[slash + i + 1..].to_owned()),
                    None => (s, "latest".to_owned()),
                }
            }
        };
        let (registry, repo) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        let mut repository = repo
            .parse::<RepoName>()
            .map_err(|_| bad("invalid repository name"))?;
        if registry == "docker.io" {
            repository = repository
                .with_docker_library()
                .ok_or_else(|| bad("invalid repository name"))?;
        }
        let reference = reference
            .parse::<Reference>()
            .map_err(|_| bad("invalid tag or digest"))?;
        Ok(ImageRef {
            registry,
            repository,
            reference,
        })
    }
}

/// The full form, which parses back to the same reference: `docker.io/library/alpine:3.20`,
/// `ghcr.io/owner/app@sha256:…`.
impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = match self.reference {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        };
        write!(
            f,
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let d = format!("sha256:{}", "a".repeat(64));
        let table = [
            ("alpine", ("docker.io", "library/alpine", "latest")),
            ("alpine:3.20", ("docker.io", "library/alpine", "3.20")),
            ("bitnami/redis:7", ("docker.io", "bitnami/redis", "7")),
            (
                "docker.io/alpine",
                ("docker.io", "library/alpine", "latest"),
            ),
            (
                "registry.k8s.io/pause:3.10",
                ("registry.k8s.io", "pause", "3.10"),
            ),
            ("127.0.0.1:5001/a/b", ("127.0.0.1:5001", "a/b", "latest")),
            ("localhost/x:1", ("localhost", "x", "1")),
        ];
        for (s, (reg, repo, r)) in table {
            let i: ImageRef = s.parse().unwrap();
            assert_eq!(i.to_string().parse::<ImageRef>().unwrap(), i, "{s}");
            assert_eq!(
                (
                    i.registry.as_str(),
                    i.repository.as_str(),
                    i.reference.to_string().as_str()
                ),
                (reg, repo, r),
                "{s}"
            );
        }
        let i: ImageRef = format!("ghcr.io/owner/app@{d}").parse().unwrap();
        assert_eq!(i.reference.to_string(), d);
        assert_eq!(i.to_string(), format!("ghcr.io/owner/app@{d}"));
        let i: ImageRef = "alpine".parse().unwrap();
        assert_eq!(i.to_string(), "docker.io/library/alpine:latest");
        for bad in ["", "UPPER", "a:b:c", "x@sha256:12", "a//b"] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
    }
}
