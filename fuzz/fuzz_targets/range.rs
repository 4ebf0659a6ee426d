//! `Range` header parsing: any accepted range lies inside the body.
//!
//! Input: either `LEN\nVALUE` (LEN a decimal u64) to test one body length, or just `VALUE`, tested
//! against a set of edge-case lengths.
#![no_main]

use berth::oci::{RangeError, parse_range};
use libfuzzer_sys::fuzz_target;

const LENS: [u64; 7] = [0, 1, 2, 100, 1 << 32, u64::MAX - 1, u64::MAX];

fn check(value: &str, len: u64) {
    match parse_range(value, len) {
        Ok(r) => {
            assert!(
                r.start <= r.end && r.end < len,
                "{value:?} len {len}: range {r:?} is outside the body"
            );
            // len() must not overflow and must fit in the body.
            let n = r.len();
            assert!(n >= 1 && n <= len, "{value:?} len {len}: length {n}");
            assert!(!r.is_empty());
        }
        Err(RangeError::Unsatisfiable) | Err(RangeError::Ignore) => {}
    }
    // A zero-length body can never yield a range.
    if len == 0 {
        assert!(parse_range(value, 0).is_err(), "{value:?}: a range of an empty body");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((len, value)) = s.split_once('\n')
        && let Ok(len) = len.trim().parse::<u64>()
    {
        check(value, len);
        return;
    }
    for len in LENS {
        check(s, len);
    }
});
