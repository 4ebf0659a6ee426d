//! The request head both transports build: from hyper's `http::request::Parts` and from the
//! zero-copy path's `httparse` output. Everything the pipeline reads of a request is here, in
//! checked form; header bytes that the protocol requires to be visible ASCII are refused here,
//! in one place, so no later step ever slices or decodes raw header bytes.

use std::net::IpAddr;

use base64::Engine as _;
use http::StatusCode;

use crate::error::{ErrorCode, RegistryError};

/// Request URIs longer than this are refused with 414.
pub const MAX_URI: usize = 8 * 1024;

/// The methods the registry API knows; anything else is `Other` (and one metric label value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Other,
}

impl Method {
    /// Methods are case-sensitive (RFC 9110 §9.1).
    pub fn parse(s: &[u8]) -> Method {
        match s {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"PATCH" => Method::Patch,
            b"DELETE" => Method::Delete,
            _ => Method::Other,
        }
    }

    /// The `method` label value and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Other => "other",
        }
    }

    /// Whether the method only reads (GET and HEAD).
    pub fn is_read(self) -> bool {
        matches!(self, Method::Get | Method::Head)
    }
}

/// Credentials of an `Authorization` header, syntactically valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
    /// Another scheme (well-formed, but one berth does not take).
    Other(String),
}

/// An `Authorization` header: the value as sent (passed on to a blob's owner among the
/// replicas) and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub raw: String,
    pub credentials: Credentials,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHeader {
    #[error("the {0} header has bytes that are not visible ASCII")]
    NotAscii(&'static str),
    #[error("malformed Authorization header: {0}")]
    Authorization(&'static str),
    #[error("the Host header is not a host[:port] authority")]
    Host,
    #[error("more than one {0} header")]
    Repeated(&'static str),
    #[error("an HTTP/1.1 request needs a Host header")]
    NoHost,
    #[error("more than {MAX_HEADERS} headers")]
    TooMany,
}

/// The most header fields a request may have (HTTP/1 heads over this never parse).
pub const MAX_HEADERS: usize = 100;

impl From<BadHeader> for RegistryError {
    fn from(e: BadHeader) -> RegistryError {
        let code = match e {
            BadHeader::Authorization(_) => ErrorCode::Unauthorized,
            BadHeader::NotAscii("authorization") => ErrorCode::Unauthorized,
            _ => ErrorCode::Unsupported,
        };
        let status = match e {
            BadHeader::TooMany => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        RegistryError::new(code, e.to_string()).with_status(status)
    }
}

/// Visible ASCII and the spaces and tabs between (a header value as RFC 9110 §5.5 allows it,
/// less `obs-text`).
fn visible_ascii(v: &[u8]) -> bool {
    // No early exit, so the loop vectorizes: this runs over every Accept value.
    v.iter().fold(true, |ok, &b| {
        ok & ((b.wrapping_sub(0x20) < 0x5f) | (b == b'\t'))
    })
}

fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `token68` (RFC 9110 §11.2): the credentials of Basic and Bearer.
fn token68(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

impl Authorization {
    /// Parses an `Authorization` value: `scheme SP credentials`.
    pub fn parse(value: &[u8]) -> Result<Authorization, BadHeader> {
        if !visible_ascii(value) {
            return Err(BadHeader::NotAscii("authorization"));
        }
        // Visible ASCII is UTF-8.
        let raw = String::from_utf8_lossy(value).into_owned();
        let text = raw.trim();
        let (scheme, rest) = text
            .split_once([' ', '\t'])
            .ok_or(BadHeader::Authorization("no space after the scheme"))?;
        let rest = rest.trim();
        if scheme.is_empty() || !scheme.bytes().all(token_char) {
            return Err(BadHeader::Authorization("invalid scheme"));
        }
        let credentials = if scheme.eq_ignore_ascii_case("basic") {
            if !token68(rest) {
                return Err(BadHeader::Authorization("Basic credentials are not base64"));
            }
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| BadHeader::Authorization("Basic credentials are not base64"))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| BadHeader::Authorization("Basic credentials are not UTF-8"))?;
            let (user, password) = text
                .split_once(':')
                .ok_or(BadHeader::Authorization("Basic credentials have no ':'"))?;
            Credentials::Basic {
                user: user.to_owned(),
                password: password.to_owned(),
            }
        } else if scheme.eq_ignore_ascii_case("bearer") {
            if !token68(rest) {
                return Err(BadHeader::Authorization("Bearer token is not a token68"));
            }
            Credentials::Bearer(rest.to_owned())
        } else {
            if rest.is_empty() {
                return Err(BadHeader::Authorization("no credentials"));
            }
            Credentials::Other(scheme.to_owned())
        };
        Ok(Authorization {
            raw: text.to_owned(),
            credentials,
        })
    }
}

/// Checks a `Host` value: `host[:port]` with a registered name, an IPv4 address or an IPv6
/// literal in brackets; no user info, path, quotes, spaces or control bytes.
fn parse_host(value: &[u8]) -> Result<String, BadHeader> {
    let s = std::str::from_utf8(value).map_err(|_| BadHeader::Host)?;
    if s.is_empty() || s.len() > 255 {
        return Err(BadHeader::Host);
    }
    let (host, port) = match s.strip_prefix('[') {
        Some(v6) => {
            let (addr, rest) = v6.split_once(']').ok_or(BadHeader::Host)?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(BadHeader::Host);
            }
            match rest {
                "" => (s, None),
                r => (s, Some(r.strip_prefix(':').ok_or(BadHeader::Host)?)),
            }
        }
        None => match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        },
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(BadHeader::Host);
    }
    if !host.starts_with('[')
        && (host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'))
    {
        return Err(BadHeader::Host);
    }
    Ok(s.to_owned())
}

/// Who sent a request: a client over the network, or berth itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from a socket (every head the transports build).
    Network,
    /// A warm job ([`crate::server::warm`]), already authorized by the admin token: `[auth]`
    /// and the client rate limit do not apply, routing, allow/deny lists, hosted vs mirrored and
    /// upstream credentials do, and an upstream 404 remembered (`negative_ttl`) is asked again.
    Warm,
}

/// What the pipeline knows of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// The length of the request target as sent (for the 414 limit).
    pub target_len: usize,
    pub authorization: Option<Authorization>,
    pub host: Option<String>,
    /// Every `Accept` value, in order.
    pub accept: Vec<String>,
    pub range: Option<String>,
    /// `If-None-Match`: the entity tags a client already has.
    pub if_none_match: Option<String>,
    /// `If-Range`: send the range only if the representation still has this entity tag.
    pub if_range: Option<String>,
    /// Sent by another replica asking this one as a blob's owner (`x-berth-peer`).
    pub from_peer: bool,
    /// `Content-Type` (of a pushed manifest).
    pub content_type: Option<String>,
    /// `Content-Range` (of an upload chunk).
    pub content_range: Option<String>,
    /// `Content-Length`, when it parses.
    pub content_length: Option<u64>,
    /// `User-Agent` (for notifications).
    pub user_agent: Option<String>,
    /// The client's address.
    pub client: IpAddr,
    /// Set when a header was refused: the pipeline answers it with 400 before anything else.
    pub defect: Option<BadHeader>,
    /// Always [`Origin::Network`] but for the heads the warm code builds (no header sets it).
    pub(crate) origin: Origin,
}

impl RequestHead {
    /// A head with the request line; headers are added with [`RequestHead::header`].
    pub fn new(method: Method, target: &str, client: IpAddr) -> RequestHead {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (target, None),
        };
        RequestHead {
            method,
            path: path.to_owned(),
            query,
            target_len: target.len(),
            authorization: None,
            host: None,
            accept: Vec::new(),
            range: None,
            if_none_match: None,
            if_range: None,
            from_peer: false,
            content_type: None,
            content_range: None,
            content_length: None,
            user_agent: None,
            client,
            defect: None,
            origin: Origin::Network,
        }
    }

    /// A GET that berth itself sends through the pipeline (see [`Origin::Warm`]).
    pub(crate) fn internal(target: &str) -> RequestHead {
        let mut head = RequestHead::new(
            Method::Get,
            target,
            IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
        );
        head.origin = Origin::Warm;
        head
    }

    /// Whether berth itself sent it (see [`Origin::Warm`]).
    pub fn is_internal(&self) -> bool {
        self.origin == Origin::Warm
    }

    /// Adds one header (names compared case-insensitively). The first defect found is kept.
    pub fn header(&mut self, name: &str, value: &[u8]) {
        if let Err(e) = self.add(name, value) {
            self.defect.get_or_insert(e);
        }
    }

    fn add(&mut self, name: &str, value: &[u8]) -> Result<(), BadHeader> {
        let ascii = |label: &'static str| -> Result<String, BadHeader> {
            let v = value.trim_ascii();
            if !visible_ascii(v) {
                return Err(BadHeader::NotAscii(label));
            }
            // Visible ASCII is UTF-8.
            std::str::from_utf8(v)
                .map(str::to_owned)
                .map_err(|_| BadHeader::NotAscii(label))
        };
        if name.eq_ignore_ascii_case("authorization") {
            if self.authorization.is_some() {
                return Err(BadHeader::Repeated("Authorization"));
            }
            self.authorization = Some(Authorization::parse(value)?);
        } else if name.eq_ignore_ascii_case("host") {
            if self.host.is_some() {
                return Err(BadHeader::Repeated("Host"));
            }
            self.host = Some(parse_host(value)?);
        } else if name.eq_ignore_ascii_case("accept") {
            self.accept.push(ascii("accept")?);
        } else if name.eq_ignore_ascii_case("range") {
            if self.range.is_some() {
                return Err(BadHeader::Repeated("Range"));
            }
            self.range = Some(ascii("range")?);
        } else if name.eq_ignore_ascii_case("if-none-match") {
            self.if_none_match = Some(ascii("if-none-match")?);
        } else if name.eq_ignore_ascii_case("if-range") {
            self.if_range = Some(ascii("if-range")?);
        } else if name.eq_ignore_ascii_case(crate::cluster::PEER_HEADER) {
            self.from_peer = true;
        } else if name.eq_ignore_ascii_case("content-type") {
            self.content_type = Some(ascii("content-type")?);
        } else if name.eq_ignore_ascii_case("content-range") {
            self.content_range = Some(ascii("content-range")?);
        } else if name.eq_ignore_ascii_case("content-length") {
            self.content_length = ascii("content-length")?.parse().ok();
        } else if name.eq_ignore_ascii_case("user-agent") {
            // Only for logs and webhooks: a value that is not visible ASCII is dropped.
            self.user_agent = ascii("user-agent").ok();
        }
        Ok(())
    }

    /// The head of a request hyper parsed (HTTP/1 or HTTP/2: the authority of an HTTP/2
    /// request stands for its Host).
    pub fn from_parts(parts: &http::request::Parts, client: IpAddr) -> RequestHead {
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let method = Method::parse(parts.method.as_str().as_bytes());
        let mut head = RequestHead::new(method, target, client);
        head.target_len += parts.uri.authority().map_or(0, |a| a.as_str().len());
        if parts.headers.len() > MAX_HEADERS {
            head.defect = Some(BadHeader::TooMany);
        }
        for (name, value) in &parts.headers {
            head.header(name.as_str(), value.as_bytes());
        }
        if head.host.is_none()
            && let Some(a) = parts.uri.authority()
        {
            head.header("host", a.as_str().as_bytes());
        }
        head.require_host(parts.version == http::Version::HTTP_11);
        head
    }

    /// The head of a request `httparse` read (the zero-copy transport's parser); None when
    /// the request line is incomplete or its target is not a path.
    pub fn from_httparse(req: &httparse::Request<'_, '_>, client: IpAddr) -> Option<RequestHead> {
        let method = Method::parse(req.method?.as_bytes());
        let target = req.path.filter(|p| p.starts_with('/'))?;
        let mut head = RequestHead::new(method, target, client);
        for h in req.headers.iter() {
            head.header(h.name, h.value);
        }
        head.require_host(req.version == Some(1));
        Some(head)
    }

    /// An HTTP/1.1 request without a Host is refused (RFC 9112 §3.2).
    fn require_host(&mut self, http11: bool) {
        if http11 && self.host.is_none() {
            self.defect.get_or_insert(BadHeader::NoHost);
        }
    }

    /// Whether `If-None-Match` names `etag` (or is `*`): the client has it already (304).
    pub fn has_etag(&self, etag: impl FnOnce() -> String) -> bool {
        self.if_none_match.as_deref().is_some_and(|v| {
            let etag = etag();
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag.as_str())
        })
    }

    /// Whether a `Range` may be honoured: no `If-Range`, or one naming `etag` exactly (a date,
    /// or another tag, means the client's copy may differ: send everything).
    pub fn range_applies(&self, etag: &str) -> bool {
        self.if_range.as_deref().is_none_or(|v| v.trim() == etag)
    }

    /// The `Authorization` value as sent, for passing on to a peer.
    pub fn raw_authorization(&self) -> Option<&str> {
        self.authorization.as_ref().map(|a| a.raw.as_str())
    }

    /// The value of a query parameter, percent-decoded (the first one of that name).
    pub fn query_decoded(&self, key: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_deref()?.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    /// The value of a query parameter (the first one of that name).
    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then_some(v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    }

    #[test]
    fn authorization_values() {
        let ok = Authorization::parse(basic("ci:s3:cret").as_bytes()).unwrap();
        assert_eq!(
            ok.credentials,
            Credentials::Basic {
                user: "ci".into(),
                password: "s3:cret".into()
            }
        );
        let b = Authorization::parse(b"bearer abc.def-_~+/==").unwrap();
        assert_eq!(b.credentials, Credentials::Bearer("abc.def-_~+/==".into()));
        assert!(matches!(
            Authorization::parse(b"Negotiate abc").unwrap().credentials,
            Credentials::Other(_)
        ));
        let refused: &[&[u8]] = &[
            "Basicxé".as_bytes(),
            b"Basicx",
            b"Bearer \xff\xfe\xfd\xfc",
            b"Bearer",
            b"Bearer ",
            b"Basic !!!",
            b"Basic bm9jb2xvbg==",          // "nocolon"
            "Bearer a\u{200b}b".as_bytes(), // zero-width space
            b"Bearer a b",
            b"Bearer \x80",
            b"Basic\x00 YTpi",
            b"\"quoted\" x",
            b"",
        ];
        for v in refused {
            assert!(
                Authorization::parse(v).is_err(),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn host_values() {
        for ok in [
            "berth:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "[::1]",
            "a.b-c_d",
        ] {
            assert_eq!(parse_host(ok.as_bytes()).as_deref(), Ok(ok));
        }
        for bad in [
            "evil.example/x\",service=\"pwn\",scope=\"",
            "a b",
            "a\"b",
            "user@host",
            "host:",
            "host:99999x",
            "[::1",
            "[zz]:1",
            "",
            "a\u{e9}",
        ] {
            assert!(parse_host(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn heads() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let mut h = RequestHead::new(Method::Get, "/v2/a/manifests/1?ns=docker.io&n=2", ip);
        h.header("ACCEPT", b"application/json");
        h.header("x-berth-peer", b"id");
        assert_eq!(h.path, "/v2/a/manifests/1");
        assert_eq!(h.query_param("n"), Some("2"));
        assert_eq!(h.accept, ["application/json"]);
        assert!(h.from_peer && h.defect.is_none());
        h.header("host", b"a");
        h.header("Host", b"b");
        assert_eq!(h.defect, Some(BadHeader::Repeated("Host")));
        assert_eq!(Method::parse(b"get"), Method::Other);
        assert_eq!(Method::parse(b"XMETHOD1").as_str(), "other");
    }
}
