//! Outbound URLs (what an upstream names in a redirect or a token realm): whatever the
//! spelling, the policy never allows a loopback, link-local or unspecified address that is not
//! the configured endpoint, and never keeps a local DNS answer for a name that is not one. The
//! check below is written apart from the policy's own normalisation (bytes, not its helpers).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::LazyLock;

use berth::upstream::policy::OutboundPolicy;
use libfuzzer_sys::fuzz_target;
use url::{Host, Url};

/// Only a public name is an endpoint: nothing local may be allowed.
static STRICT: LazyLock<OutboundPolicy> = LazyLock::new(|| {
    let ep = Url::parse("https://registry.example.com").expect("endpoint URL");
    OutboundPolicy::new([&ep], "0.0.0.0:9090".parse().expect("admin address"))
});

/// 127.0.0.1:5001 is an endpoint: a local address is allowed only as exactly that.
static WITH_LOCAL: LazyLock<OutboundPolicy> = LazyLock::new(|| {
    let ep = Url::parse("http://127.0.0.1:5001").expect("endpoint URL");
    OutboundPolicy::new([&ep], "0.0.0.0:9090".parse().expect("admin address"))
});

fn v4_local(o: [u8; 4]) -> bool {
    o[0] == 127 || o[0] == 0 || (o[0] == 169 && o[1] == 254)
}

/// The IPv4 address in the last 32 bits of an IPv6 address that embeds one.
fn embedded_v4(b: &[u8; 16]) -> Option<[u8; 4]> {
    let prefixes: [&[u8]; 5] = [
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0],
        &[0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0],
        &[0, 0x64, 0xff, 0x9b, 0, 1],
    ];
    prefixes
        .iter()
        .any(|p| b.starts_with(p))
        .then(|| [b[12], b[13], b[14], b[15]])
}

/// Loopback, link-local (unicast) or unspecified, in any IPv6 form that embeds IPv4.
fn ip_local(ip: IpAddr) -> Option<IpAddr> {
    let local = match ip {
        IpAddr::V4(v4) => v4_local(v4.octets()),
        IpAddr::V6(v6) => {
            let b = v6.octets();
            let loopback_or_any = b[..15].iter().all(|&x| x == 0) && b[15] <= 1;
            let link_local = b[0] == 0xfe && b[1] & 0xc0 == 0x80;
            loopback_or_any || link_local || embedded_v4(&b).is_some_and(v4_local)
        }
    };
    let v4 = match ip {
        IpAddr::V6(v6) => embedded_v4(&v6.octets())
            .filter(|_| !v6.is_loopback() && !v6.is_unspecified())
            .map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        v4 => Some(v4),
    };
    local.then(|| v4.unwrap_or(ip))
}

/// The local address (IPv4 when embedded) a URL host stands for, if it is local; names:
/// `localhost`, `*.localhost`, or an address once trailing dots are gone.
fn host_local(host: &Host<&str>) -> Option<Option<IpAddr>> {
    match host {
        Host::Ipv4(ip) => ip_local(IpAddr::V4(*ip)).map(Some),
        Host::Ipv6(ip) => ip_local(IpAddr::V6(*ip)).map(Some),
        Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if let Ok(ip) = d.parse::<IpAddr>() {
                return ip_local(ip).map(Some);
            }
            (d.is_empty() || d == "localhost" || d.ends_with(".localhost")).then_some(None)
        }
    }
}

fn check_url(s: &str) {
    let Ok(url) = Url::parse(s) else {
        return;
    };
    let Some(host) = url.host() else {
        assert!(
            STRICT.check_url(&url).is_err(),
            "{s:?}: allowed without a host"
        );
        return;
    };
    let local = host_local(&host);
    if STRICT.check_url(&url).is_ok() {
        assert!(
            local.is_none(),
            "{s:?}: host {host} is local ({local:?}) and was allowed"
        );
        assert!(
            matches!(url.scheme(), "http" | "https"),
            "{s:?}: scheme allowed"
        );
    }
    if WITH_LOCAL.check_url(&url).is_ok()
        && let Some(ip) = local
    {
        assert_eq!(
            (ip, url.port_or_known_default()),
            (Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), Some(5001)),
            "{s:?}: local host {host} allowed, and it is not the endpoint"
        );
    }
    // The same host as a DNS name answered with loopback: refused unless it is the endpoint.
    let name = url.host_str().unwrap_or_default();
    let answer = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))];
    if let Ok(kept) = STRICT.admit_resolved(name, answer) {
        assert_eq!(
            name.trim_end_matches('.').to_ascii_lowercase(),
            "registry.example.com",
            "{s:?}: {name} may resolve to loopback: {kept:?}"
        );
    }
}

/// Raw bytes as DNS answers for a name that is no endpoint: no local answer is kept.
fn check_answers(data: &[u8]) {
    let mut addrs = Vec::new();
    if let Ok(b) = <[u8; 16]>::try_from(data.get(..16).unwrap_or_default()) {
        addrs.push(SocketAddr::from((Ipv6Addr::from(b), 0)));
    }
    if let Ok(b) = <[u8; 4]>::try_from(data.get(..4).unwrap_or_default()) {
        addrs.push(SocketAddr::from((Ipv4Addr::from(b), 0)));
    }
    if let Ok(kept) = STRICT.admit_resolved("cdn.fuzz.example", addrs) {
        for a in kept {
            assert!(
                ip_local(a.ip()).is_none(),
                "{data:?}: local answer {a} kept"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_answers(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    check_url(s);
    // Most inputs are host spellings rather than whole URLs.
    if !s.contains("://") {
        check_url(&format!("http://{s}/"));
        check_url(&format!("http://[{s}]:8080/"));
    }
});
