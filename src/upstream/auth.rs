//! Upstream authentication: the `WWW-Authenticate` challenge, the bearer-token flow and a token
//! cache per (realm, service, scope) kept until expiry.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::policy::Host;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses the first challenge of a `WWW-Authenticate` value. Returns None for schemes berth
/// does not speak and for malformed values.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = match value.find(char::is_whitespace) {
        Some(i) => (&value[..i], value[i..].trim_start()),
        None => (value, ""),
    };
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest)?;
    let get = |k: &str| {
        params
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let realm = get("realm").filter(|r| !r.is_empty())?;
    Some(Challenge::Bearer {
        realm,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `k1="v1", k2=v2` (RFC 9110 auth-params, quoted strings with backslash escapes).
fn parse_params(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            if !(c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return None;
            }
            key.push(c);
            chars.next();
        }
        while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            return None;
        }
        while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => val.push(chars.next()?),
                    c => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        out.push((key, val));
    }
}

/// Whether credentials for `registry_host` may be sent to `realm_host`: the same host, or a
/// host in the same parent domain (`auth.docker.io` for `registry-1.docker.io`).
pub fn realm_may_get_credentials(registry_host: &str, realm_host: &str) -> bool {
    if registry_host.eq_ignore_ascii_case(realm_host) {
        return true;
    }
    let parent = |h: &str| -> Option<String> {
        let labels: Vec<&str> = h.split('.').collect();
        (labels.len() >= 2).then(|| labels[labels.len() - 2..].join(".").to_ascii_lowercase())
    };
    // IP addresses have no parent domain.
    if registry_host.parse::<std::net::IpAddr>().is_ok() {
        return false;
    }
    match (parent(registry_host), parent(realm_host)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Whether the registry's credentials may go with a token request to `realm`, for the
/// endpoint at `endpoint_base`: over the endpoint's own scheme (never https → http), in its
/// domain ([`realm_may_get_credentials`]); an endpoint named by an IP address or a local name
/// only to that same host and port.
pub fn realm_gets_credentials(endpoint_base: &str, realm: &url::Url) -> bool {
    let Ok(endpoint) = url::Url::parse(endpoint_base) else {
        return false;
    };
    let (Some(ep_host), Some(realm_host)) = (endpoint.host(), realm.host()) else {
        return false;
    };
    if endpoint.scheme() != realm.scheme() {
        return false;
    }
    let (ep_host, realm_host) = (Host::from_url(&ep_host), Host::from_url(&realm_host));
    match (&ep_host, &realm_host) {
        (Host::Name(e), Host::Name(r)) if ep_host.local_kind().is_none() => {
            realm_may_get_credentials(e, r)
        }
        _ => {
            ep_host == realm_host
                && endpoint.port_or_known_default() == realm.port_or_known_default()
        }
    }
}

#[derive(serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        // Docker's token spec: 60 s when absent; never trust less than that.
        let ttl = Duration::from_secs(self.expires_in.unwrap_or(60).max(60));
        Some((token, ttl))
    }
}

/// What a bearer token was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    realm: String,
    service: Option<String>,
    scope: String,
}

impl TokenKey {
    fn new(realm: &str, service: Option<&str>, scope: &str) -> TokenKey {
        TokenKey {
            realm: realm.to_owned(),
            service: service.map(str::to_owned),
            scope: scope.to_owned(),
        }
    }
}

/// Bearer tokens by (realm, service, scope), each kept until shortly before it expires.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, realm: &str, service: Option<&str>, scope: &str) -> Option<String> {
        let key = TokenKey::new(realm, service, scope);
        let tokens = self.tokens.lock();
        tokens
            .get(&key)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(t, _)| t.clone())
    }

    /// Drops the token for (realm, service, scope): upstream refused it (it expired early, or
    /// was revoked), so the next request fetches a new one.
    pub fn remove(&self, realm: &str, service: Option<&str>, scope: &str) {
        let key = TokenKey::new(realm, service, scope);
        self.tokens.lock().remove(&key);
    }

    pub fn put(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        token: String,
        ttl: Duration,
    ) {
        // Renew a little early so a token never expires between use and arrival.
        let until = Instant::now() + ttl.saturating_sub(Duration::from_secs(10));
        {
            let mut tokens = self.tokens.lock();
            tokens.retain(|_, (_, u)| Instant::now() < *u);
            tokens.insert(TokenKey::new(realm, service, scope), (token, until));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            parse_challenge(hub),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        let cases: &[(&str, Option<Challenge>)] = &[
            (r#"Basic realm="Registry Realm""#, Some(Challenge::Basic)),
            ("basic", Some(Challenge::Basic)),
            (
                r#"bearer  realm = "r" , service=s"#,
                Some(Challenge::Bearer {
                    realm: "r".into(),
                    service: Some("s".into()),
                    scope: None,
                }),
            ),
            (
                r#"Bearer realm="a\"b""#,
                Some(Challenge::Bearer {
                    realm: "a\"b".into(),
                    service: None,
                    scope: None,
                }),
            ),
            (r#"Bearer service="s""#, None),
            (r#"Bearer realm="""#, None),
            (r#"Bearer realm="unterminated"#, None),
            ("Bearer realm", None),
            ("Negotiate abc", None),
            ("", None),
            (r#"Bearer re@lm="x""#, None),
        ];
        for (value, want) in cases {
            assert_eq!(parse_challenge(value), *want, "{value:?}");
        }
    }

    #[test]
    fn credential_domains() {
        assert!(realm_may_get_credentials(
            "registry-1.docker.io",
            "auth.docker.io"
        ));
        assert!(realm_may_get_credentials("ghcr.io", "ghcr.io"));
        assert!(!realm_may_get_credentials(
            "registry-1.docker.io",
            "evil.io"
        ));
        assert!(!realm_may_get_credentials(
            "registry-1.docker.io",
            "docker.io.evil.com"
        ));
        assert!(realm_may_get_credentials("127.0.0.1", "127.0.0.1"));
        assert!(!realm_may_get_credentials("127.0.0.1", "0.0.1"));
    }

    #[test]
    fn credential_realms() {
        // Endpoint, realm, whether the realm gets the registry's credentials.
        let table = "
            https://registry-1.docker.io  https://auth.docker.io/token          yes
            https://registry-1.docker.io  http://auth.docker.io/token           no
            https://registry-1.docker.io  https://evil.io/token                 no
            https://ghcr.io               https://ghcr.io:8443/token            yes
            https://registry.example.com  https://registry.example.com./t       yes
            https://example.com           https://127.0.0.1/t                   no
            http://127.0.0.1:5001         http://127.0.0.1:5001/token           yes
            http://127.0.0.1:5001         http://[::ffff:127.0.0.1]:5001/t      yes
            http://127.0.0.1:5001         http://127.0.0.1:6379/token           no
            http://127.0.0.1:5001         https://127.0.0.1:5001/token          no
            http://127.0.0.1:5001         http://localhost:5001/token           no
            http://10.0.0.1:5000          http://10.0.0.1:5000/token            yes
            http://10.0.0.1:5000          http://10.0.0.2:5000/token            no
            http://localhost:5001         http://localhost:5002/t               no
            http://localhost:5001         http://LOCALHOST.:5001/t              yes
        ";
        let mut n = 0;
        for line in table.lines().filter(|l| !l.trim().is_empty()) {
            let [ep, realm, want] = line.split_whitespace().collect::<Vec<_>>()[..] else {
                panic!("bad table line {line:?}");
            };
            let realm = url::Url::parse(realm).unwrap();
            assert_eq!(
                realm_gets_credentials(ep, &realm),
                want == "yes",
                "{ep} → {realm}"
            );
            n += 1;
        }
        assert_eq!(n, 15);
    }

    #[test]
    fn token_cache_expiry() {
        let c = TokenCache::default();
        c.put(
            "r",
            Some("s"),
            "repository:a:pull",
            "t1".into(),
            Duration::from_secs(300),
        );
        assert_eq!(
            c.get("r", Some("s"), "repository:a:pull").as_deref(),
            Some("t1")
        );
        assert_eq!(c.get("r", Some("s"), "repository:b:pull"), None);
        c.remove("r", Some("s"), "repository:a:pull");
        assert_eq!(c.get("r", Some("s"), "repository:a:pull"), None);
        c.put("r", None, "x", "t2".into(), Duration::from_secs(5));
        // A token shorter-lived than the renewal margin is not reused.
        assert_eq!(c.get("r", None, "x"), None);
    }

    #[test]
    fn token_response() {
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"abc"}"#).unwrap();
        assert_eq!(
            t.into_token(),
            Some(("abc".into(), Duration::from_secs(60)))
        );
        let t: TokenResponse = serde_json::from_str(r#"{"token":"","expires_in":300}"#).unwrap();
        assert_eq!(t.into_token(), None);
    }
}
