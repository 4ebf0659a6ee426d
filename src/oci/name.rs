use std::fmt;
use std::str::FromStr;

use super::Digest;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
/// at most 255 characters. Its components can never be `.`, `..` or empty.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid repository name {0:?}")]
pub struct InvalidName(pub String);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `alpine` on Docker Hub is `library/alpine`. None when the prefix would make the name
    /// longer than a name may be.
    pub fn with_docker_library(self) -> Option<RepoName> {
        if self.0.contains('/') {
            Some(self)
        } else {
            format!("library/{}", self.0).parse().ok()
        }
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", always followed by an alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

impl FromStr for RepoName {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 255 || !s.split('/').all(valid_component) {
            return Err(InvalidName(s.chars().take(300).collect()));
        }
        Ok(RepoName(s.into()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Box<str>);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if ok {
            Ok(Tag(s.into()))
        } else {
            Err(InvalidName(s.chars().take(200).collect()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse::<Digest>()
                .map(Reference::Digest)
                .map_err(|e| InvalidName(e.0))
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        let ok = [
            "alpine",
            "library/alpine",
            "a/b/c/d/e",
            "my-org/my_app",
            "a__b",
            "a---b",
            "a.b.c",
            "0/1",
            "kube-state-metrics/kube-state-metrics",
        ];
        for s in ok {
            assert_eq!(s.parse::<RepoName>().unwrap().as_str(), s, "{s}");
        }
        let long = "a".repeat(256);
        let bad = [
            "",
            "/",
            "a/",
            "/a",
            "a//b",
            "A",
            "a/../b",
            "..",
            ".",
            "a/.",
            "a___b",
            "a_-b",
            "-a",
            "a-",
            "a.",
            "a..b",
            "a b",
            "a%2fb",
            "a\0b",
            "a\\b",
            long.as_str(),
        ];
        for s in bad {
            assert!(s.parse::<RepoName>().is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn docker_library_prefix() {
        let n: RepoName = "alpine".parse().unwrap();
        assert_eq!(n.with_docker_library().unwrap().as_str(), "library/alpine");
        let n: RepoName = "bitnami/redis".parse().unwrap();
        assert_eq!(n.with_docker_library().unwrap().as_str(), "bitnami/redis");
        let long: RepoName = "a".repeat(250).parse().unwrap();
        assert!(long.with_docker_library().is_none());
    }

    #[test]
    fn tags() {
        let max = "a".repeat(128);
        for s in ["latest", "3.20", "_x", "v1.0-rc_1", "A", max.as_str()] {
            assert!(s.parse::<Tag>().is_ok(), "{s}");
        }
        let long = "a".repeat(129);
        for s in ["", ".a", "-a", "a/b", "a:b", "a b", "a\0", long.as_str()] {
            assert!(s.parse::<Tag>().is_err(), "{s:?}");
        }
    }

    #[test]
    fn references() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!(matches!("3.20".parse::<Reference>(), Ok(Reference::Tag(_))));
        assert!("sha256:xyz".parse::<Reference>().is_err());
        assert!("a:b".parse::<Reference>().is_err());
    }
}
