//! Digest, RepoName, Tag and Reference parsing. A value that parses prints back to exactly the
//! input and re-parses to itself; a RepoName is always safe to use as a path.
#![no_main]

use berth::oci::{Digest, Reference, RepoName, Tag};
use libfuzzer_sys::fuzz_target;

fn check_repo_name(s: &str, n: &RepoName) {
    let v = n.as_str();
    assert_eq!(v, s, "RepoName changed its input");
    assert_eq!(n.to_string(), s);
    assert_eq!(v.parse::<RepoName>().as_ref(), Ok(n));
    assert!(!v.is_empty() && v.len() <= 255, "bad length {}", v.len());
    assert!(!v.contains(".."), "RepoName {v:?} contains ..");
    assert!(!v.contains("//"), "RepoName {v:?} contains //");
    assert!(!v.starts_with('/') && !v.ends_with('/'), "RepoName {v:?} has an edge /");
    assert!(!v.bytes().any(|b| b.is_ascii_uppercase()), "RepoName {v:?} has uppercase");
    assert!(
        v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)),
        "RepoName {v:?} has a character outside [a-z0-9._-/]"
    );
    for c in v.split('/') {
        assert!(c != "." && c != ".." && !c.is_empty(), "RepoName {v:?} component {c:?}");
    }
}

fn check_digest(s: &str, d: &Digest) {
    assert_eq!(d.to_string(), s, "Digest does not print back to its input");
    assert_eq!(s.parse::<Digest>().as_ref(), Ok(d));
    assert_eq!(format!("{}:{}", d.algorithm().as_str(), d.hex()), s);
    assert!(d.hex().bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
}

fn check_tag(s: &str, t: &Tag) {
    assert_eq!(t.as_str(), s);
    assert_eq!(t.to_string(), s);
    assert_eq!(s.parse::<Tag>().as_ref(), Ok(t));
    assert!(!s.is_empty() && s.len() <= 128);
    assert!(!s.starts_with('.') && !s.starts_with('-'));
    assert!(!s.contains('/') && !s.contains(':'));
}

fn check_all(s: &str) {
    if let Ok(n) = s.parse::<RepoName>() {
        check_repo_name(s, &n);
        // The Docker Hub form of a valid name is a valid name too, or None when too long.
        match n.clone().with_docker_library() {
            Some(lib) => {
                check_repo_name(lib.as_str(), &lib);
                if s.contains('/') {
                    assert_eq!(lib, n, "{s:?}: a name with a '/' must stay as it is");
                } else {
                    assert_eq!(lib.as_str(), format!("library/{s}"));
                }
            }
            None => assert!(
                !s.contains('/') && s.len() + "library/".len() > 255,
                "{s:?}: no Docker Hub form although it would fit"
            ),
        }
    }
    if let Ok(d) = s.parse::<Digest>() {
        check_digest(s, &d);
    }
    if let Ok(t) = s.parse::<Tag>() {
        check_tag(s, &t);
    }
    match s.parse::<Reference>() {
        Ok(r) => {
            assert_eq!(r.to_string(), s, "Reference does not print back to its input");
            assert_eq!(s.parse::<Reference>().as_ref(), Ok(&r));
            match &r {
                Reference::Tag(t) => check_tag(s, t),
                Reference::Digest(d) => check_digest(s, d),
            }
        }
        Err(_) => {
            // A reference is a tag or a digest: if either parses, so does the reference.
            assert!(s.parse::<Tag>().is_err(), "{s:?} is a Tag but not a Reference");
            assert!(s.parse::<Digest>().is_err(), "{s:?} is a Digest but not a Reference");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check_all(s);
        // Also try the text after the first ':' (the hex of a digest-like input, a tag after a name).
        if let Some((_, after)) = s.split_once(':') {
            check_all(after);
        }
    }
});
