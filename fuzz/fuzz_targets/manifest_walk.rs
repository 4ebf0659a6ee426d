//! The manifest reference walker: never panics on any bytes, and every digest it returns is a
//! valid digest (sorted, no duplicates).
#![no_main]

use berth::oci::{Digest, manifest_media_type, referenced_digests};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let digests = referenced_digests(data);
    for d in &digests {
        let s = d.to_string();
        assert_eq!(s.parse::<Digest>().as_ref(), Ok(d), "returned digest {s:?} does not re-parse");
    }
    assert!(
        digests.windows(2).all(|w| w[0] < w[1]),
        "digests are not sorted and deduplicated: {digests:?}"
    );
    let media_type = manifest_media_type(data);
    // Whatever is not a JSON object or array references nothing and has no media type.
    if certainly_not_json_container(data) {
        assert!(digests.is_empty());
        assert!(media_type.is_none());
    }
});

/// Cheap check for "certainly not a JSON object or array" (serde's derived structs also accept
/// arrays, fields in order): the walker must then find nothing.
fn certainly_not_json_container(data: &[u8]) -> bool {
    let first = data.iter().find(|b| !b.is_ascii_whitespace());
    !matches!(first, Some(b'{' | b'['))
}
