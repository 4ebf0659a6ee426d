//! Client authentication and authorization: the token protocol clients already speak with
//! Docker Hub (a 401 challenge naming berth's `/token` realm, Basic credentials checked against
//! an htpasswd file, short-lived signed tokens scoped to `repository:<name>:pull`), Basic
//! credentials directly on registry requests, and rules that say which users may pull which
//! `registry/repository` globs. The rules are checked on every request against the routed
//! registry and repository, so a token's scopes can never reach past them.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::config::AuthConfig;
use crate::error::{ErrorCode, RegistryError};
use crate::route::{Router, Target};

const ISSUER: &str = "berth";
const SERVICE: &str = "berth";

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User(String),
}

impl Identity {
    pub fn name(&self) -> &str {
        match self {
            Identity::Anonymous => "anonymous",
            Identity::User(u) => u,
        }
    }
}

struct Rule {
    users: Vec<String>,
    allow: Vec<wildmatch::WildMatch>,
}

pub struct Auth {
    users: HashMap<String, String>,
    rules: Vec<Rule>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
    realm: Option<String>,
    /// Passwords that verified recently (bcrypt is slow on purpose; Basic comes every request).
    verified: moka::sync::Cache<[u8; 32], ()>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    access: Vec<Access>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

/// The JSON the token endpoint answers with.
#[derive(Serialize)]
pub struct TokenAnswer {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
}

/// Parses an htpasswd file with bcrypt entries.
pub fn parse_htpasswd(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: not user:hash", n + 1))?;
        if !["$2y$", "$2a$", "$2b$"].iter().any(|p| hash.starts_with(p)) {
            return Err(format!(
                "line {}: user {user:?} has no bcrypt hash (use htpasswd -B)",
                n + 1
            ));
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Auth {
    pub fn load(cfg: &AuthConfig) -> Result<Auth, String> {
        let text = std::fs::read_to_string(&cfg.htpasswd)
            .map_err(|e| format!("auth.htpasswd {}: {e}", cfg.htpasswd.display()))?;
        let users = parse_htpasswd(&text)
            .map_err(|e| format!("auth.htpasswd {}: {e}", cfg.htpasswd.display()))?;
        let key = match &cfg.token_key_file {
            Some(path) => read_key(path)?,
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        Ok(Auth {
            users,
            rules: cfg
                .rules
                .iter()
                .map(|r| Rule {
                    users: r.users.clone(),
                    allow: r
                        .allow
                        .iter()
                        .map(|a| wildmatch::WildMatch::new(a))
                        .collect(),
                })
                .collect(),
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            ttl: cfg.token_ttl,
            realm: cfg.realm.clone(),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        })
    }

    /// Whether `who` may pull `target` (`registry/repository`).
    pub fn allowed(&self, who: &Identity, target: &Target) -> bool {
        let full = format!("{}/{}", target.registry, target.repo);
        self.rules.iter().any(|r| {
            r.users.iter().any(|u| match (u.as_str(), who) {
                // What anyone may pull without credentials, users who log in may pull too.
                ("anonymous", _) => true,
                ("*", Identity::User(_)) => true,
                (name, Identity::User(user)) => name == user,
                _ => false,
            }) && r.allow.iter().any(|g| g.matches(&full))
        })
    }

    fn check_password(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(user) else {
            return false;
        };
        let mut h = sha2::Sha256::new();
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.update([0]);
        h.update(hash.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        if self.verified.contains_key(&key) {
            return true;
        }
        let ok = bcrypt::verify(password, hash).unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }

    /// The identity in `Authorization: Basic …`.
    pub fn basic(&self, value: &str) -> Result<Identity, BadCredentials> {
        let encoded = value
            .strip_prefix("Basic ")
            .or_else(|| value.strip_prefix("basic "))
            .ok_or(BadCredentials)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| BadCredentials)?;
        let text = String::from_utf8(decoded).map_err(|_| BadCredentials)?;
        let (user, password) = text.split_once(':').ok_or(BadCredentials)?;
        if self.check_password(user, password) {
            Ok(Identity::User(user.to_owned()))
        } else {
            Err(BadCredentials)
        }
    }

    /// The `WWW-Authenticate` challenge, for a request that arrived with `host`;
    /// `insufficient` when a valid token lacked the scope.
    pub fn challenge(
        &self,
        host: Option<&str>,
        tls: bool,
        scope: Option<&str>,
        insufficient: bool,
    ) -> String {
        let realm = self.realm.clone().unwrap_or_else(|| {
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{}/token", host.unwrap_or("localhost"))
        });
        let mut c = format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\"");
        if let Some(s) = scope {
            c.push_str(&format!(",scope=\"{s}\""));
        }
        if insufficient {
            c.push_str(",error=\"insufficient_scope\"");
        }
        c
    }

    /// Issues a token for `who` with the requested scopes the rules allow (others are left
    /// out, as Docker's token servers do).
    pub fn issue(
        &self,
        who: &Identity,
        scopes: &[&str],
        router: &Router,
    ) -> Result<TokenAnswer, String> {
        let mut access: Vec<Access> = Vec::new();
        for scope in scopes {
            let mut parts = scope.splitn(3, ':');
            let (Some("repository"), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if !actions.split(',').any(|a| a == "pull") {
                continue;
            }
            // The name as the client will use it in URLs; it may route to any registry (a
            // containerd ?ns= is not in the token request), and each request is checked again.
            if router
                .targets_for_name(name)
                .iter()
                .any(|t| self.allowed(who, t))
            {
                access.push(Access {
                    kind: "repository".into(),
                    name: name.to_owned(),
                    actions: vec!["pull".into()],
                });
            }
        }
        let iat = now();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: who.name().to_owned(),
            aud: SERVICE.into(),
            exp: iat + self.ttl.as_secs(),
            nbf: iat.saturating_sub(5),
            iat,
            access,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| format!("cannot sign token: {e}"))?;
        Ok(TokenAnswer {
            access_token: token.clone(),
            token,
            expires_in: self.ttl.as_secs(),
            issued_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        })
    }

    fn decode(&self, token: &str) -> Option<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[SERVICE]);
        v.set_issuer(&[ISSUER]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .ok()
            .map(|d| d.claims)
    }

    /// Authorizes a registry request. `name` is the repository as the URL names it (the scope
    /// a token must carry), `target` where it routed. Returns who it is, or the error to send
    /// (401 with a challenge, or 403 DENIED).
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        name: Option<&str>,
        target: Option<&Target>,
    ) -> Result<Identity, Denial> {
        let scope = name.map(|n| format!("repository:{n}:pull"));
        let who = match authorization {
            None => Identity::Anonymous,
            Some(v) if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") => {
                let Some(claims) = self.decode(v[7..].trim()) else {
                    return Err(Denial::challenge("invalid or expired token", scope));
                };
                if let Some(n) = name {
                    let covered = claims.access.iter().any(|a| {
                        a.kind == "repository"
                            && a.name == n
                            && a.actions.iter().any(|x| x == "pull")
                    });
                    if !covered {
                        return Err(Denial::challenge(
                            "token does not cover this repository",
                            scope,
                        ));
                    }
                }
                if claims.sub == "anonymous" {
                    Identity::Anonymous
                } else {
                    Identity::User(claims.sub)
                }
            }
            Some(v) => self
                .basic(v)
                .map_err(|_| Denial::challenge("invalid credentials", scope.clone()))?,
        };
        match target {
            // /v2/ itself: the client must show it can authenticate (docker login does this).
            None if who == Identity::Anonymous && authorization.is_none() => {
                Err(Denial::challenge("authentication required", None))
            }
            None => Ok(who),
            Some(t) if self.allowed(&who, t) => Ok(who),
            Some(_) if who == Identity::Anonymous => {
                Err(Denial::challenge("authentication required", scope))
            }
            Some(t) => Err(Denial::Forbidden(RegistryError::new(
                ErrorCode::Denied,
                format!("{} may not pull {}/{}", who.name(), t.registry, t.repo),
            ))),
        }
    }
}

/// Credentials that are malformed or do not match the htpasswd file.
#[derive(Debug)]
pub struct BadCredentials;

/// Why a request was refused.
pub enum Denial {
    /// 401 with a challenge for this scope.
    Challenge(RegistryError, Option<String>),
    /// 403.
    Forbidden(RegistryError),
}

impl Denial {
    fn challenge(msg: &str, scope: Option<String>) -> Denial {
        Denial::Challenge(RegistryError::new(ErrorCode::Unauthorized, msg), scope)
    }
}

fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let key =
        std::fs::read(path).map_err(|e| format!("auth.token_key_file {}: {e}", path.display()))?;
    if key.len() < 32 {
        return Err(format!(
            "auth.token_key_file {}: needs at least 32 bytes",
            path.display()
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, AuthRule};
    use std::sync::Arc;

    fn auth() -> (Auth, Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, format!("ci:{hash}\n# comment\nbob:{hash}\n")).unwrap();
        let cfg = AuthConfig {
            htpasswd: path,
            token_key_file: None,
            token_ttl: Duration::from_secs(300),
            realm: None,
            rules: vec![
                AuthRule {
                    users: vec!["anonymous".into()],
                    allow: vec!["docker.io/library/*".into()],
                },
                AuthRule {
                    users: vec!["ci".into()],
                    allow: vec!["*".into()],
                },
                AuthRule {
                    users: vec!["*".into()],
                    allow: vec!["docker.io/*".into()],
                },
            ],
        };
        let router = Router::new(
            vec!["docker.io".into(), "private.example".into()],
            Some("docker.io".into()),
        );
        (Auth::load(&cfg).unwrap(), router, dir)
    }

    fn target(reg: &str, repo: &str) -> Target {
        Target {
            registry: Arc::from(reg),
            repo: repo.parse().unwrap(),
        }
    }

    fn basic(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    #[test]
    fn rules() {
        let (a, _, _d) = auth();
        let anon = Identity::Anonymous;
        let ci = Identity::User("ci".into());
        let bob = Identity::User("bob".into());
        assert!(a.allowed(&anon, &target("docker.io", "library/alpine")));
        assert!(!a.allowed(&anon, &target("docker.io", "bitnami/redis")));
        assert!(!a.allowed(&anon, &target("private.example", "team/app")));
        assert!(a.allowed(&ci, &target("private.example", "team/app")));
        assert!(a.allowed(&bob, &target("docker.io", "bitnami/redis")));
        assert!(!a.allowed(&bob, &target("private.example", "team/app")));
    }

    #[test]
    fn basic_and_tokens() {
        let (a, router, _d) = auth();
        let private = target("private.example", "team/app");
        assert!(matches!(
            a.authorize(
                Some(&basic("ci", "s3cret")),
                Some("team/app"),
                Some(&private)
            ),
            Ok(Identity::User(_))
        ));
        assert!(matches!(
            a.authorize(
                Some(&basic("ci", "wrong")),
                Some("team/app"),
                Some(&private)
            ),
            Err(Denial::Challenge(..))
        ));
        assert!(matches!(
            a.authorize(
                Some(&basic("bob", "s3cret")),
                Some("team/app"),
                Some(&private)
            ),
            Err(Denial::Forbidden(_))
        ));
        assert!(matches!(
            a.authorize(None, Some("team/app"), Some(&private)),
            Err(Denial::Challenge(..))
        ));
        assert!(matches!(
            a.authorize(None, None, None),
            Err(Denial::Challenge(..))
        ));

        // A token for ci covers what it asked for and the rules allow; not other names.
        let t = a
            .issue(
                &Identity::User("ci".into()),
                &[
                    "repository:private.example/team/app:pull",
                    "repository:x:push",
                ],
                &router,
            )
            .unwrap();
        let bearer = format!("Bearer {}", t.token);
        let prefixed = target("private.example", "team/app");
        assert!(
            a.authorize(
                Some(&bearer),
                Some("private.example/team/app"),
                Some(&prefixed)
            )
            .is_ok()
        );
        assert!(matches!(
            a.authorize(
                Some(&bearer),
                Some("other/app"),
                Some(&target("docker.io", "other/app"))
            ),
            Err(Denial::Challenge(..))
        ));
        // An anonymous token never gets the private scope.
        let t = a
            .issue(
                &Identity::Anonymous,
                &["repository:private.example/team/app:pull"],
                &router,
            )
            .unwrap();
        let bearer = format!("Bearer {}", t.token);
        assert!(
            a.authorize(
                Some(&bearer),
                Some("private.example/team/app"),
                Some(&prefixed)
            )
            .is_err()
        );
        // Tampered tokens are refused.
        let mut forged = t.token.clone();
        forged.pop();
        assert!(
            a.authorize(Some(&format!("Bearer {forged}")), None, None)
                .is_err()
        );
    }

    #[test]
    fn htpasswd_format() {
        assert!(parse_htpasswd("a:$apr1$xyz\n").is_err());
        assert!(parse_htpasswd("nocolon\n").is_err());
        assert_eq!(parse_htpasswd("\n# c\nu:$2y$05$abc\n").unwrap().len(), 1);
    }
}
