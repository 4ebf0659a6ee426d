//! `WWW-Authenticate` parsing: never panics, a Bearer challenge always has a non-empty realm, and
//! a parsed challenge written back as quoted auth-params parses to the same challenge.
#![no_main]

use berth::upstream::auth::{Challenge, parse_challenge};
use libfuzzer_sys::fuzz_target;

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Some(c) = parse_challenge(s) else {
        return;
    };
    if let Challenge::Bearer {
        realm,
        service,
        scope,
    } = &c
    {
        assert!(!realm.is_empty(), "{s:?}: Bearer with an empty realm");
        let mut again = format!("Bearer realm={}", quote(realm));
        if let Some(v) = service {
            again += &format!(",service={}", quote(v));
        }
        if let Some(v) = scope {
            again += &format!(",scope={}", quote(v));
        }
        assert_eq!(
            parse_challenge(&again).as_ref(),
            Some(&c),
            "{s:?}: re-quoted as {again:?} parses differently"
        );
    }
});
