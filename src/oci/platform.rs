//! Platforms (`linux/amd64`, `linux/arm64/v8`) and the children of an image index that match
//! them: what `berth warm` and pins fetch of a multi-platform image.

use serde::Deserialize;

use super::Digest;

/// A platform as the CLI and config name it: `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Platform, String> {
        let mut parts = s.split('/');
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(os), Some(arch), variant, None)
                if ok(os) && ok(arch) && variant.is_none_or(ok) =>
            {
                Ok(Platform {
                    os: os.to_owned(),
                    architecture: arch.to_owned(),
                    variant: variant.map(str::to_owned),
                })
            }
            _ => Err(format!(
                "{s:?} is not a platform like \"linux/amd64\" or \"linux/arm64/v8\""
            )),
        }
    }

    /// Whether an index entry's platform is this one. A platform named without a variant
    /// matches every variant of its architecture.
    fn matches(&self, p: &DescriptorPlatform) -> bool {
        p.os == self.os
            && p.architecture == self.architecture
            && self
                .variant
                .as_ref()
                .is_none_or(|v| p.variant.as_ref() == Some(v))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct DescriptorPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Child {
    digest: String,
    platform: Option<DescriptorPlatform>,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Child>,
}

/// The children of an image index to fetch for `platforms` (all of them with `all`). Entries
/// without a platform (attestations, artifacts) are only taken with `all`. Empty for a
/// manifest that is not an index, or bytes that are not JSON.
pub fn index_children(bytes: &[u8], platforms: &[Platform], all: bool) -> Vec<Digest> {
    let Ok(index) = serde_json::from_slice::<Index>(bytes) else {
        return Vec::new();
    };
    let mut out: Vec<Digest> = index
        .manifests
        .iter()
        .filter(|c| {
            all || c
                .platform
                .as_ref()
                .is_some_and(|p| platforms.iter().any(|want| want.matches(p)))
        })
        .filter_map(|c| c.digest.parse().ok())
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
        {"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","platform":{"os":"linux","architecture":"amd64"}},
        {"digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
        {"digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","platform":{"os":"unknown","architecture":"unknown"}},
        {"digest":"sha256:4444444444444444444444444444444444444444444444444444444444444444"}]}"#;

    #[test]
    fn parses_platforms() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(Platform::parse("linux/amd64").unwrap().variant, None);
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux/amd 64"] {
            assert!(Platform::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn selects_children() {
        let amd = Platform::parse("linux/amd64").unwrap();
        let arm = Platform::parse("linux/arm64").unwrap();
        let arm7 = Platform::parse("linux/arm64/v7").unwrap();
        let hex = |d: &Digest| d.hex()[..1].to_owned();
        let pick = |p: &[Platform], all| {
            index_children(INDEX.as_bytes(), p, all)
                .iter()
                .map(hex)
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(std::slice::from_ref(&amd), false), ["1"]);
        assert_eq!(pick(&[amd, arm], false), ["1", "2"]);
        assert!(pick(&[arm7], false).is_empty());
        assert_eq!(pick(&[], true), ["1", "2", "3", "4"]);
        assert!(index_children(b"{\"config\":{}}", &[], true).is_empty());
        assert!(index_children(b"not json", &[], true).is_empty());
    }
}
