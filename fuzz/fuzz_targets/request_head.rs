//! The request head both transports build, and `Authorization` parsing: never panics, never
//! takes bytes that are not visible ASCII, and both constructions agree.
//!
//! Input: a raw HTTP/1 request head (`METHOD TARGET HTTP/1.1\r\nName: value\r\n…\r\n\r\n`),
//! and the same bytes as one `Authorization` value.
#![no_main]

use std::net::IpAddr;

use berth::server::request::{Authorization, Credentials, RequestHead};
use libfuzzer_sys::fuzz_target;

fn visible(s: &str) -> bool {
    s.bytes().all(|b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b))
}

fn check_authorization(a: &Authorization) {
    assert!(visible(&a.raw), "took non-visible bytes: {:?}", a.raw);
    match &a.credentials {
        Credentials::Bearer(t) => assert!(
            !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()),
            "bearer token {t:?}"
        ),
        Credentials::Basic { user, .. } => assert!(!user.contains(':'), "user {user:?}"),
        Credentials::Other(scheme) => assert!(!scheme.is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    let client = IpAddr::from([127, 0, 0, 1]);
    if let Ok(a) = Authorization::parse(data) {
        check_authorization(&a);
    }

    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    // The zero-copy transport's construction.
    let Some(fast) = RequestHead::from_httparse(&req, client) else {
        return;
    };
    if fast.defect.is_none() {
        if let Some(a) = &fast.authorization {
            check_authorization(a);
        }
        if let Some(h) = &fast.host {
            assert!(
                !h.is_empty() && !h.contains(['"', '/', ' ', '\\', '@', ',']),
                "host {h:?}"
            );
        }
        assert!(fast.accept.iter().all(|v| visible(v)));
    }
    // hyper's construction, from the same request as `http` types (when `http` takes it).
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let version = if req.version == Some(1) {
        http::Version::HTTP_11
    } else {
        http::Version::HTTP_10
    };
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .version(version);
    for h in req.headers.iter() {
        b = b.header(h.name, h.value);
    }
    let Ok(r) = b.body(()) else {
        return;
    };
    let (parts, ()) = r.into_parts();
    if parts.uri.authority().is_some() || parts.uri.path_and_query().map(|p| p.as_str()) != Some(path) {
        // An absolute-form target, or one `http` normalised: not the same request any more.
        return;
    }
    let slow = RequestHead::from_parts(&parts, client);
    // Both refuse the same heads (which header is named first may differ: `http` groups
    // repeated names), and agree on everything else.
    assert_eq!(fast.defect.is_some(), slow.defect.is_some(), "{fast:?}\n{slow:?}");
    if fast.defect.is_none() {
        assert_eq!(fast, slow);
    }
});
