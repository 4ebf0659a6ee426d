//! The outbound-URL policy: where berth may connect when an upstream names the place (a
//! redirect's `Location`, a token realm) rather than berth's config.
//!
//! A loopback, link-local or unspecified address, and the admin listener's address, are
//! refused unless that exact host:port is a configured endpoint. Addresses are compared in a
//! canonical form: IPv6 forms that embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`,
//! IPv4-compatible `::a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`, NAT64 `64:ff9b::/96` and
//! `64:ff9b:1::/48`) count as that IPv4 address; host names are lower case without trailing
//! dots, and `localhost` and `*.localhost` are local. (The `url` crate already turns the other
//! IPv4 spellings of http(s) URLs, `127.1`, `0x7f000001`, `2130706433`, `0177.0.0.1`, into
//! plain addresses; the tests check that.) Host names are checked again after DNS: the
//! [`GuardedResolver`] of every upstream client drops local answers for names that are not
//! configured endpoints.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use parking_lot::RwLock;

use reqwest::Url;

use crate::config::Config;

/// Why an outbound URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0:?} is not an http(s) URL")]
    Scheme(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("{host}:{port} is a {kind} address and not a configured endpoint")]
    Local {
        host: String,
        port: u16,
        kind: LocalKind,
    },
    #[error("{host}:{port} is berth's admin listener")]
    Admin { host: String, port: u16 },
    #[error("{name} resolves only to local addresses, and it is not a configured endpoint")]
    ResolvesLocal { name: String },
}

/// The kinds of address an upstream may not point berth at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalKind {
    Loopback,
    LinkLocal,
    Unspecified,
}

impl fmt::Display for LocalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LocalKind::Loopback => "loopback",
            LocalKind::LinkLocal => "link-local",
            LocalKind::Unspecified => "unspecified",
        })
    }
}

/// A host in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    /// Lower case, without trailing dots.
    Name(String),
}

impl Host {
    pub fn from_url(host: &url::Host<&str>) -> Host {
        match host {
            url::Host::Ipv4(ip) => Host::Ip(IpAddr::V4(*ip)),
            url::Host::Ipv6(ip) => Host::Ip(canonical_ip(IpAddr::V6(*ip))),
            url::Host::Domain(d) => Host::from_name(d),
        }
    }

    /// A name as a resolver or a non-special URL gives it (an IP literal is an address).
    pub fn from_name(name: &str) -> Host {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let bare = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(&name);
        match bare.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(canonical_ip(ip)),
            Err(_) => Host::Name(name),
        }
    }

    /// Whether connecting to this host reaches this machine (or its link) whatever DNS says.
    pub fn local_kind(&self) -> Option<LocalKind> {
        match self {
            Host::Ip(ip) => local_kind(*ip),
            Host::Name(n) if n.is_empty() || n == "localhost" || n.ends_with(".localhost") => {
                Some(LocalKind::Loopback)
            }
            Host::Name(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// The IPv4 address an IPv6 address stands for, if it embeds one; else the address itself.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if v6.is_loopback() || v6.is_unspecified() {
        return ip;
    }
    let s = v6.segments();
    let embedded = match s {
        // IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, IPv4-translated
        // ::ffff:0:a.b.c.d, NAT64 64:ff9b::a.b.c.d.
        [0, 0, 0, 0, 0, 0xffff, _, _]
        | [0, 0, 0, 0, 0, 0, _, _]
        | [0, 0, 0, 0, 0xffff, 0, _, _]
        | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => true,
        // Local-use NAT64 64:ff9b:1::/48 (RFC 8215), address in the last 32 bits.
        [0x64, 0xff9b, 1, ..] => true,
        _ => false,
    };
    if embedded {
        let [.., a, b, c, d] = v6.octets();
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        ip
    }
}

/// Loopback, link-local or unspecified, after [`canonical_ip`].
pub fn local_kind(ip: IpAddr) -> Option<LocalKind> {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if a == 127 {
                Some(LocalKind::Loopback)
            } else if a == 0 {
                // 0.0.0.0/8, "this network": Linux connects 0.0.0.0 to the local host.
                Some(LocalKind::Unspecified)
            } else if a == 169 && b == 254 {
                Some(LocalKind::LinkLocal)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some(LocalKind::Loopback)
            } else if v6.is_unspecified() {
                Some(LocalKind::Unspecified)
            } else if v6.is_unicast_link_local() || is_multicast_link_local(&v6) {
                Some(LocalKind::LinkLocal)
            } else {
                None
            }
        }
    }
}

/// ff02::/16 and ff01::/16 (interface- and link-local multicast).
fn is_multicast_link_local(ip: &Ipv6Addr) -> bool {
    matches!(ip.segments()[0], 0xff01 | 0xff02)
}

/// The configured endpoints (the only local places an upstream may point at) and the admin
/// listener (never, unless it is itself an endpoint).
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    endpoints: Vec<(Host, u16)>,
    admin: SocketAddr,
}

impl OutboundPolicy {
    pub fn new<'a>(endpoints: impl IntoIterator<Item = &'a Url>, admin: SocketAddr) -> Self {
        let endpoints = endpoints
            .into_iter()
            .filter_map(|u| Some((Host::from_url(&u.host()?), u.port_or_known_default()?)))
            .collect();
        let admin = SocketAddr::new(canonical_ip(admin.ip()), admin.port());
        OutboundPolicy { endpoints, admin }
    }

    /// Every endpoint of every registry (its own, its routes', their fallbacks).
    pub fn from_config(config: &Config) -> Self {
        let urls = config.registries.iter().flat_map(|r| {
            r.endpoints
                .iter()
                .chain(&r.fallback)
                .chain(
                    r.routes
                        .iter()
                        .flat_map(|p| p.endpoints.iter().chain(&p.fallback)),
                )
                .map(|e| &e.url)
        });
        OutboundPolicy::new(urls, config.server.admin_listen)
    }

    fn is_endpoint(&self, host: &Host, port: u16) -> bool {
        self.endpoints.iter().any(|(h, p)| h == host && *p == port)
    }

    fn is_admin(&self, ip: IpAddr, port: Option<u16>) -> bool {
        let admin_ip = self.admin.ip();
        !admin_ip.is_unspecified()
            && canonical_ip(ip) == admin_ip
            && port.is_none_or(|p| p == self.admin.port())
    }

    /// Checks a URL an upstream named, before anything is sent to it. Host names that are not
    /// `localhost` pass here and are checked again on their DNS answers ([`GuardedResolver`]).
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refusal::Scheme(url.scheme().to_owned()));
        }
        let host = url
            .host()
            .map(|h| Host::from_url(&h))
            .ok_or(Refusal::NoHost)?;
        let port = url.port_or_known_default().unwrap_or(0);
        if self.is_endpoint(&host, port) {
            return Ok(());
        }
        if let Some(kind) = host.local_kind() {
            return Err(Refusal::Local {
                host: host.to_string(),
                port,
                kind,
            });
        }
        if let Host::Ip(ip) = host
            && self.is_admin(ip, Some(port))
        {
            return Err(Refusal::Admin {
                host: host.to_string(),
                port,
            });
        }
        Ok(())
    }

    /// The DNS answers for `name` berth may connect to: all of them for a configured
    /// endpoint's name, else those that are not local (nor the admin listener's address).
    pub fn admit_resolved(
        &self,
        name: &str,
        addrs: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let host = Host::from_name(name);
        if self.endpoints.iter().any(|(h, _)| *h == host) {
            return Ok(addrs);
        }
        let total = addrs.len();
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| local_kind(a.ip()).is_none() && !self.is_admin(a.ip(), None))
            .collect();
        if kept.is_empty() && total > 0 {
            return Err(Refusal::ResolvesLocal {
                name: host.to_string(),
            });
        }
        if kept.len() < total {
            tracing::warn!(name = %host, dropped = total - kept.len(), "DNS answers with local addresses dropped");
        }
        Ok(kept)
    }
}

/// Extra DNS answers, consulted before the system resolver (tests point names at 127.0.0.1
/// with them). They pass through [`OutboundPolicy::admit_resolved`] like any answer.
static DNS_OVERRIDES: RwLock<Option<HashMap<String, Vec<IpAddr>>>> = RwLock::new(None);

/// Makes every [`GuardedResolver`] answer `ips` for `name` (for tests).
#[doc(hidden)]
pub fn override_dns(name: &str, ips: Vec<IpAddr>) {
    {
        let mut map = DNS_OVERRIDES.write();
        map.get_or_insert_with(HashMap::new)
            .insert(name.to_ascii_lowercase(), ips);
    }
}

fn dns_override(name: &str) -> Option<Vec<IpAddr>> {
    let map = DNS_OVERRIDES.read();
    map.as_ref()?.get(&name.to_ascii_lowercase()).cloned()
}

/// The resolver of every upstream client: the system's answers (or a test override),
/// filtered by [`OutboundPolicy::admit_resolved`].
pub struct GuardedResolver(pub Arc<OutboundPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let name = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match dns_override(&name) {
                Some(ips) => ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect(),
                None => tokio::net::lookup_host((name.as_str(), 0)).await?.collect(),
            };
            let kept = policy.admit_resolved(&name, addrs).inspect_err(|e| {
                tracing::warn!(error = %e, "outbound connection refused by policy");
            })?;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutboundPolicy {
        let eps = [
            Url::parse("http://127.0.0.1:5001").unwrap(),
            Url::parse("http://registry.local:5000").unwrap(),
        ];
        OutboundPolicy::new(&eps, "10.0.0.5:9090".parse().unwrap())
    }

    #[test]
    fn spellings_of_local_addresses() {
        // URL, host after normalisation, local kind (- for none).
        let table = "
            http://127.0.0.1/                      127.0.0.1        loopback
            http://127.1/                          127.0.0.1        loopback
            http://127.0.1/                        127.0.0.1        loopback
            http://0x7f000001/                     127.0.0.1        loopback
            http://0x7f.1/                         127.0.0.1        loopback
            http://2130706433/                     127.0.0.1        loopback
            http://0177.0.0.1/                     127.0.0.1        loopback
            http://017700000001/                   127.0.0.1        loopback
            http://127.0.0.1./                     127.0.0.1        loopback
            http://127.0.0.1../                    127.0.0.1        loopback
            http://127.8.9.10/                     127.8.9.10       loopback
            http://%31%32%37.0.0.1/                127.0.0.1        loopback
            http://\u{ff11}\u{ff12}\u{ff17}.0.0.1/ 127.0.0.1        loopback
            http://[::1]/                          [::1]            loopback
            http://[0:0:0:0:0:0:0:1]/              [::1]            loopback
            http://[::ffff:127.0.0.1]/             127.0.0.1        loopback
            http://[::ffff:7f00:1]/                127.0.0.1        loopback
            http://[0:0:0:0:0:ffff:127.0.0.1]/     127.0.0.1        loopback
            http://[::127.0.0.1]/                  127.0.0.1        loopback
            http://[::ffff:0:127.0.0.1]/           127.0.0.1        loopback
            http://[64:ff9b::127.0.0.1]/           127.0.0.1        loopback
            http://[64:ff9b::7f00:1]/              127.0.0.1        loopback
            http://[64:ff9b:1::7f00:1]/            127.0.0.1        loopback
            http://[::ffff:169.254.169.254]/       169.254.169.254  link-local
            http://169.254.169.254/                169.254.169.254  link-local
            http://[fe80::1]/                      [fe80::1]        link-local
            http://[ff02::1]/                      [ff02::1]        link-local
            http://0.0.0.0/                        0.0.0.0          unspecified
            http://0/                              0.0.0.0          unspecified
            http://[::]/                           [::]             unspecified
            http://[::ffff:0.0.0.0]/               0.0.0.0          unspecified
            http://localhost/                      localhost        loopback
            http://LocalHost./                     localhost        loopback
            http://localhost../                    localhost        loopback
            http://%6c%6fcalhost/                  localhost        loopback
            http://\u{ff4c}ocalhost/               localhost        loopback
            http://api.localhost/                  api.localhost    loopback
            http://a.b.LOCALHOST./                 a.b.localhost    loopback
            https://cdn.example.com/               cdn.example.com  -
            https://Example.COM./                  example.com      -
            http://localhost.example.com/          localhost.example.com -
            http://mylocalhost/                    mylocalhost      -
            http://10.0.0.1/                       10.0.0.1         -
            http://1.0.0.127/                      1.0.0.127        -
            http://[2001:db8::1]/                  [2001:db8::1]    -
            http://[::ffff:8.8.8.8]/               8.8.8.8          -
            http://[64:ff9b::8.8.8.8]/             8.8.8.8          -
            http://[2002:7f00:1::]/                [2002:7f00:1::]  -
        ";
        let mut n = 0;
        for line in table.lines().filter(|l| !l.trim().is_empty()) {
            let [u, normal, kind] = line.split_whitespace().collect::<Vec<_>>()[..] else {
                panic!("bad table line {line:?}");
            };
            let url = Url::parse(u).unwrap_or_else(|e| panic!("{u}: {e}"));
            let host = Host::from_url(&url.host().unwrap());
            assert_eq!(host.to_string(), normal, "{u}");
            let got = host.local_kind().map_or("-".to_owned(), |k| k.to_string());
            assert_eq!(got, kind, "{u}");
            n += 1;
        }
        assert_eq!(n, 48);
    }

    #[test]
    fn names_from_the_resolver() {
        assert_eq!(
            Host::from_name("LOCALHOST."),
            Host::Name("localhost".into())
        );
        assert_eq!(
            Host::from_name("[::ffff:127.0.0.1]"),
            Host::Ip("127.0.0.1".parse().unwrap())
        );
        assert_eq!(Host::from_name("").local_kind(), Some(LocalKind::Loopback));
    }

    #[test]
    fn urls() {
        let p = policy();
        let ok = [
            "https://cdn.example.com/blob",
            "http://127.0.0.1:5001/token",
            "http://[::ffff:127.0.0.1]:5001/token",
            "http://registry.local:5000/x",
            "http://10.0.0.5:9091/",
            "http://10.0.0.6:9090/",
        ];
        for u in ok {
            assert_eq!(p.check_url(&Url::parse(u).unwrap()), Ok(()), "{u}");
        }
        let refused = [
            "http://127.0.0.1:6379/x",
            "http://127.0.0.1/x",
            "http://localhost:5001/x",
            "http://[::1]:5001/x",
            "http://0.0.0.0:5001/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:127.0.0.1]:6379/",
            "http://[::ffff:7f00:1]:6379/",
            "http://[0:0:0:0:0:ffff:127.0.0.1]:6379/",
            "http://10.0.0.5:9090/metrics",
            "http://[::ffff:10.0.0.5]:9090/metrics",
            "file:///etc/passwd",
            "ftp://example.com/",
        ];
        for u in refused {
            assert!(p.check_url(&Url::parse(u).unwrap()).is_err(), "{u}");
        }
    }

    #[test]
    fn dns_answers() {
        let p = policy();
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        assert_eq!(
            p.admit_resolved("evil.example", vec![a("127.0.0.1:0")]),
            Err(Refusal::ResolvesLocal {
                name: "evil.example".into()
            })
        );
        assert!(
            p.admit_resolved("evil.example", vec![a("[::ffff:127.0.0.1]:0")])
                .is_err()
        );
        assert!(
            p.admit_resolved("evil.example", vec![a("10.0.0.5:0")])
                .is_err()
        );
        assert_eq!(
            p.admit_resolved("cdn.example", vec![a("127.0.0.1:0"), a("1.2.3.4:0")]),
            Ok(vec![a("1.2.3.4:0")])
        );
        // A configured endpoint's name may resolve to loopback.
        assert_eq!(
            p.admit_resolved("Registry.Local.", vec![a("127.0.0.1:0")]),
            Ok(vec![a("127.0.0.1:0")])
        );
    }

    #[test]
    fn unspecified_admin_listener_is_refused_on_loopback() {
        let p = OutboundPolicy::new([], "0.0.0.0:9090".parse().unwrap());
        assert!(
            p.check_url(&Url::parse("http://127.0.0.1:9090/metrics").unwrap())
                .is_err()
        );
        assert_eq!(
            p.check_url(&Url::parse("http://192.0.2.1:9090/").unwrap()),
            Ok(())
        );
    }
}
