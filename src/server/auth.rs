//! Client authentication and authorization: the token protocol clients already speak with
//! Docker Hub (a 401 challenge naming berth's `/token` realm, Basic credentials checked against
//! an htpasswd file, short-lived signed tokens scoped to `repository:<name>:pull`), Basic
//! credentials directly on registry requests, and rules that say which users may pull which
//! `registry/repository` globs. The rules are checked on every request against the routed
//! registry and repository, so a token's scopes can never reach past them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::request::Credentials;
use crate::config::{Action, AuthConfig};
use crate::error::{ErrorCode, RegistryError, SetupError};
use crate::route::{Router, Target};

const ISSUER: &str = "berth";
const SERVICE: &str = "berth";

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    Anonymous,
    User(String),
}

impl Identity {
    pub(crate) fn name(&self) -> &str {
        match self {
            Identity::Anonymous => "anonymous",
            Identity::User(u) => u,
        }
    }
}

struct Rule {
    users: Vec<String>,
    allow: Vec<wildmatch::WildMatch>,
    actions: Vec<Action>,
}

pub(crate) struct Auth {
    users: HashMap<String, String>,
    rules: Vec<Rule>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
    realm: Option<String>,
    /// Passwords that verified recently (bcrypt is slow on purpose; Basic comes every request).
    verified: moka::sync::Cache<[u8; 32], ()>,
    /// Failed (and in-flight) password checks per client address and per user name, each
    /// counted for [`FAILURE_WINDOW`] from the first.
    failures: moka::sync::Cache<LoginKey, Arc<AtomicU32>>,
    /// The most failures either may have in a window (0: no limit).
    max_failures: u32,
    /// Password checks running at once (bcrypt takes a core for as long as its cost says).
    checks: tokio::sync::Semaphore,
    /// What unknown users are checked against.
    dummy: String,
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
pub(crate) struct TokenAnswer {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
}

/// A line of an htpasswd file berth cannot use.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HtpasswdError {
    #[error("line {0}: not user:hash")]
    NotUserHash(usize),
    #[error("line {line}: user {user:?} has no bcrypt hash (use htpasswd -B)")]
    NotBcrypt { line: usize, user: String },
}

/// Parses an htpasswd file with bcrypt entries.
pub(crate) fn parse_htpasswd(text: &str) -> Result<HashMap<String, String>, HtpasswdError> {
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or(HtpasswdError::NotUserHash(n + 1))?;
        if !["$2y$", "$2a$", "$2b$"].iter().any(|p| hash.starts_with(p)) {
            return Err(HtpasswdError::NotBcrypt {
                line: n + 1,
                user: user.to_owned(),
            });
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
    pub(crate) fn load(cfg: &AuthConfig) -> Result<Auth, SetupError> {
        let file_error = |e: Box<dyn std::error::Error + Send + Sync>| {
            SetupError::file("auth.htpasswd", &cfg.htpasswd, e)
        };
        let text = std::fs::read_to_string(&cfg.htpasswd).map_err(|e| file_error(e.into()))?;
        let users = parse_htpasswd(&text).map_err(|e| file_error(e.into()))?;
        let key = match &cfg.token_key_file {
            Some(path) => read_key(path)?,
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let cost = users
            .values()
            .filter_map(|h| bcrypt_cost(h))
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Auth {
            dummy: dummy_hash(cost),
            checks: tokio::sync::Semaphore::new((cores / 2).max(1)),
            max_failures: cfg.failed_logins_per_minute,
            failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FAILURE_WINDOW)
                .build(),
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
                    actions: r.actions.clone(),
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

    /// Whether `who` may do `action` to `target` (`registry/repository`).
    pub(crate) fn allowed(&self, who: &Identity, target: &Target, action: Action) -> bool {
        let full = format!("{}/{}", target.registry, target.repo);
        self.rules
            .iter()
            .filter(|r| r.actions.contains(&action))
            .any(|r| {
                r.users.iter().any(|u| match (u.as_str(), who) {
                    // What anyone may pull without credentials, users who log in may pull too.
                    ("anonymous", _) => true,
                    ("*", Identity::User(_)) => true,
                    (name, Identity::User(user)) => name == user,
                    _ => false,
                }) && r.allow.iter().any(|g| g.matches(&full))
            })
    }

    /// Checks a user's password: from the cache of recently verified credentials, or with
    /// bcrypt on the blocking pool (at most [`Auth::checks`] at once, never on the async
    /// workers). Unknown users cost a bcrypt of the same cost as known ones, so user names
    /// cannot be told by timing. Too many failed checks for one client address or one user
    /// name within a minute are refused with 429 before any bcrypt runs.
    pub(crate) async fn login(
        &self,
        user: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<Identity, Denial> {
        let hash = self.users.get(user);
        let key = {
            let mut h = sha2::Sha256::new();
            h.update(user.as_bytes());
            h.update([0]);
            h.update(password.as_bytes());
            h.update([0]);
            h.update(hash.map_or("", String::as_str).as_bytes());
            let key: [u8; 32] = h.finalize().into();
            key
        };
        if hash.is_some() && self.verified.contains_key(&key) {
            return Ok(Identity::User(user.to_owned()));
        }
        // Attempts in flight count as failures until they succeed, so a burst cannot pass
        // the limit before the first failure is known.
        let counters = [
            self.failures
                .get_with(LoginKey::Client(client), Default::default),
            self.failures
                .get_with(LoginKey::User(user.to_owned()), Default::default),
        ];
        let before = counters
            .each_ref()
            .map(|c| c.fetch_add(1, Ordering::Relaxed));
        let over = self.max_failures > 0 && before.iter().any(|&n| n >= self.max_failures);
        let undo = || {
            for c in &counters {
                c.fetch_sub(1, Ordering::Relaxed);
            }
        };
        if over {
            undo();
            return Err(Denial::Limited(
                RegistryError::new(
                    ErrorCode::TooManyRequests,
                    "too many failed logins; try again later",
                )
                .with_retry_after(FAILURE_WINDOW.as_secs()),
            ));
        }
        let ok = self.verify(password, hash.cloned()).await;
        if ok {
            undo();
            self.verified.insert(key, ());
            Ok(Identity::User(user.to_owned()))
        } else {
            Err(Denial::challenge("invalid credentials", None))
        }
    }

    /// bcrypt on the blocking pool, one of at most `checks` at once.
    async fn verify(&self, password: &str, hash: Option<String>) -> bool {
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy.clone());
        let password = password.to_owned();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        known && ok
    }

    /// The `WWW-Authenticate` challenge, for a request that arrived with `host`;
    /// `insufficient` when a valid token lacked the scope.
    pub(crate) fn challenge(
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
        let mut c = format!(
            "Bearer realm={},service={}",
            quoted(&realm),
            quoted(SERVICE)
        );
        if let Some(s) = scope {
            c.push_str(&format!(",scope={}", quoted(s)));
        }
        if insufficient {
            c.push_str(",error=\"insufficient_scope\"");
        }
        c
    }

    /// Issues a token for `who` with the requested scopes the rules allow (others are left
    /// out, as Docker's token servers do).
    pub(crate) fn issue(
        &self,
        who: &Identity,
        scopes: &[&str],
        router: &Router,
    ) -> Result<TokenAnswer, jsonwebtoken::errors::Error> {
        let mut access: Vec<Access> = Vec::new();
        for scope in scopes {
            let mut parts = scope.splitn(3, ':');
            let (Some("repository"), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            // The name as the client will use it in URLs; it may route to any registry (a
            // containerd ?ns= is not in the token request), and each request is checked again.
            let targets = router.targets_for_name(name);
            // `*` asks for every action (skopeo delete sends `repository:<name>:*`), as in
            // distribution's token access sets.
            let mut wanted: Vec<Action> = Vec::new();
            for a in actions.split(',') {
                let parsed = match a {
                    "*" => vec![Action::Pull, Action::Push, Action::Delete],
                    _ => Action::parse(a).into_iter().collect(),
                };
                for p in parsed {
                    if !wanted.contains(&p) {
                        wanted.push(p);
                    }
                }
            }
            let granted: Vec<String> = wanted
                .into_iter()
                .filter(|a| targets.iter().any(|t| self.allowed(who, t, *a)))
                .map(|a| a.as_str().to_owned())
                .collect();
            if !granted.is_empty() {
                access.push(Access {
                    kind: "repository".into(),
                    name: name.to_owned(),
                    actions: granted,
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
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
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
    /// (401 with a challenge, 403 DENIED, or 429 after too many failed logins).
    pub(crate) async fn authorize(
        &self,
        credentials: Option<&Credentials>,
        name: Option<&str>,
        target: Option<&Target>,
        client: IpAddr,
        action: Action,
    ) -> Result<Identity, Denial> {
        let scope = name.map(|n| match action {
            Action::Pull => format!("repository:{n}:pull"),
            Action::Push => format!("repository:{n}:pull,push"),
            Action::Delete => format!("repository:{n}:delete"),
        });
        let who = match credentials {
            None => Identity::Anonymous,
            Some(Credentials::Bearer(token)) => {
                let Some(claims) = self.decode(token) else {
                    return Err(Denial::challenge("invalid or expired token", scope));
                };
                if let Some(n) = name {
                    let covered = claims.access.iter().any(|a| {
                        a.kind == "repository"
                            && a.name == n
                            && a.actions.iter().any(|x| x == action.as_str())
                    });
                    if !covered {
                        // A valid token without this scope: the challenge says
                        // error="insufficient_scope" (the answer stays 401 UNAUTHORIZED).
                        return Err(Denial::Challenge(
                            RegistryError::new(
                                ErrorCode::Unauthorized,
                                format!(
                                    "token does not cover {} on this repository",
                                    action.as_str()
                                ),
                            )
                            .insufficient_scope(),
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
            Some(Credentials::Basic { user, password }) => {
                match self.login(user, password, client).await {
                    Ok(who) => who,
                    Err(Denial::Challenge(e, _)) => return Err(Denial::Challenge(e, scope)),
                    Err(other) => return Err(other),
                }
            }
            Some(Credentials::Other(_)) => {
                return Err(Denial::challenge(
                    "unsupported authorization scheme (use Basic or Bearer)",
                    scope,
                ));
            }
        };
        match target {
            // /v2/ itself: the client must show it can authenticate (docker login does this).
            None if who == Identity::Anonymous && credentials.is_none() => {
                Err(Denial::challenge("authentication required", None))
            }
            None => Ok(who),
            Some(t) if self.allowed(&who, t, action) => Ok(who),
            Some(_) if who == Identity::Anonymous => {
                Err(Denial::challenge("authentication required", scope))
            }
            Some(t) => Err(Denial::Forbidden(RegistryError::new(
                ErrorCode::Denied,
                format!(
                    "{} may not {} {}/{}",
                    who.name(),
                    action.as_str(),
                    t.registry,
                    t.repo
                ),
            ))),
        }
    }
}

/// A challenge parameter value, quoted and escaped (RFC 9110 §5.6.4).
fn quoted(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// A fixed, well-formed bcrypt hash of `cost` that no password matches: checking an unknown
/// user against it costs what checking a known one does.
fn dummy_hash(cost: u32) -> String {
    // A cheap hash with a fixed salt, relabelled with the cost: still well-formed, and
    // verifying against it runs the full cost.
    let cheap = bcrypt::hash_with_salt("berth-dummy", 4, [7; 16])
        .map(|h| h.format_for_version(bcrypt::Version::TwoB))
        .unwrap_or_default();
    match cheap.strip_prefix("$2b$04$") {
        Some(rest) => format!("$2b${:02}${rest}", cost.clamp(4, 31)),
        None => cheap,
    }
}

/// The bcrypt cost of an htpasswd entry (`$2y$NN$…`).
fn bcrypt_cost(hash: &str) -> Option<u32> {
    hash.get(4..6)?.parse().ok()
}

/// Why a request was refused.
#[derive(Debug)]
pub(crate) enum Denial {
    /// 401 with a challenge for this scope.
    Challenge(RegistryError, Option<String>),
    /// 403.
    Forbidden(RegistryError),
    /// 429: too many failed logins.
    Limited(RegistryError),
}

impl Denial {
    fn challenge(msg: &str, scope: Option<String>) -> Denial {
        Denial::Challenge(RegistryError::new(ErrorCode::Unauthorized, msg), scope)
    }

    /// The error to answer with.
    pub(crate) fn into_error(self) -> RegistryError {
        match self {
            Denial::Challenge(e, _) | Denial::Forbidden(e) | Denial::Limited(e) => e,
        }
    }
}

/// What failed logins are counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LoginKey {
    Client(IpAddr),
    User(String),
}

/// Failed logins are counted over this window.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

fn read_key(path: &Path) -> Result<Vec<u8>, SetupError> {
    let key = std::fs::read(path).map_err(|e| SetupError::file("auth.token_key_file", path, e))?;
    if key.len() < 32 {
        return Err(SetupError::file(
            "auth.token_key_file",
            path,
            "needs at least 32 bytes",
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
            failed_logins_per_minute: 3,
            rules: vec![
                AuthRule {
                    users: vec!["anonymous".into()],
                    allow: vec!["docker.io/library/*".into()],
                    actions: vec![Action::Pull],
                },
                AuthRule {
                    users: vec!["ci".into()],
                    allow: vec!["*".into()],
                    actions: vec![Action::Pull],
                },
                AuthRule {
                    users: vec!["*".into()],
                    allow: vec!["docker.io/*".into()],
                    actions: vec![Action::Pull],
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

    fn basic(user: &str, pass: &str) -> Credentials {
        Credentials::Basic {
            user: user.into(),
            password: pass.into(),
        }
    }

    fn bearer_of(token: &str) -> Credentials {
        Credentials::Bearer(token.into())
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn rules() {
        let (a, _, _d) = auth();
        let anon = Identity::Anonymous;
        let ci = Identity::User("ci".into());
        let bob = Identity::User("bob".into());
        assert!(a.allowed(&anon, &target("docker.io", "library/alpine"), Action::Pull));
        assert!(!a.allowed(&anon, &target("docker.io", "bitnami/redis"), Action::Pull));
        assert!(!a.allowed(&anon, &target("private.example", "team/app"), Action::Pull));
        assert!(a.allowed(&ci, &target("private.example", "team/app"), Action::Pull));
        assert!(a.allowed(&bob, &target("docker.io", "bitnami/redis"), Action::Pull));
        assert!(!a.allowed(&bob, &target("private.example", "team/app"), Action::Pull));
    }

    #[tokio::test]
    async fn basic_and_tokens() {
        let (a, router, _d) = auth();
        let private = target("private.example", "team/app");
        assert!(matches!(
            a.authorize(
                Some(&basic("ci", "s3cret")),
                Some("team/app"),
                Some(&private),
                CLIENT,
                Action::Pull,
            )
            .await,
            Ok(Identity::User(_))
        ));
        assert!(matches!(
            a.authorize(
                Some(&basic("ci", "wrong")),
                Some("team/app"),
                Some(&private),
                CLIENT,
                Action::Pull,
            )
            .await,
            Err(Denial::Challenge(..))
        ));
        assert!(matches!(
            a.authorize(
                Some(&basic("bob", "s3cret")),
                Some("team/app"),
                Some(&private),
                CLIENT,
                Action::Pull,
            )
            .await,
            Err(Denial::Forbidden(_))
        ));
        assert!(matches!(
            a.authorize(None, Some("team/app"), Some(&private), CLIENT, Action::Pull)
                .await,
            Err(Denial::Challenge(..))
        ));
        assert!(matches!(
            a.authorize(None, None, None, CLIENT, Action::Pull).await,
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
        let bearer = bearer_of(&t.token);
        let prefixed = target("private.example", "team/app");
        assert!(
            a.authorize(
                Some(&bearer),
                Some("private.example/team/app"),
                Some(&prefixed),
                CLIENT,
                Action::Pull,
            )
            .await
            .is_ok()
        );
        assert!(matches!(
            a.authorize(
                Some(&bearer),
                Some("other/app"),
                Some(&target("docker.io", "other/app")),
                CLIENT,
                Action::Pull,
            )
            .await,
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
        let bearer = bearer_of(&t.token);
        assert!(
            a.authorize(
                Some(&bearer),
                Some("private.example/team/app"),
                Some(&prefixed),
                CLIENT,
                Action::Pull,
            )
            .await
            .is_err()
        );
        // Tampered tokens are refused.
        let mut forged = t.token.clone();
        forged.pop();
        assert!(
            a.authorize(Some(&bearer_of(&forged)), None, None, CLIENT, Action::Pull)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn failed_logins_are_limited_and_unknown_users_cost_the_same() {
        let (a, _, _d) = auth();
        // The dummy is well-formed (bcrypt runs it in full) and matches nothing.
        assert_eq!(bcrypt_cost(&a.dummy), Some(4));
        assert!(matches!(
            bcrypt::verify("berth-dummy", &dummy_hash(5)),
            Ok(false)
        ));
        assert!(matches!(
            a.login("nobody", "berth-dummy", IpAddr::from([127, 0, 0, 4]))
                .await,
            Err(Denial::Challenge(..))
        ));
        assert_eq!(bcrypt_cost(&dummy_hash(14)), Some(14));
        let other = IpAddr::from([127, 0, 0, 2]);
        for _ in 0..3 {
            assert!(matches!(
                a.login("ci", "wrong", CLIENT).await,
                Err(Denial::Challenge(..))
            ));
        }
        // The fourth failure from this client, or for this user, is refused before bcrypt.
        assert!(matches!(
            a.login("bob", "wrong", CLIENT).await,
            Err(Denial::Limited(e)) if e.retry_after == Some(60)
        ));
        assert!(matches!(
            a.login("ci", "s3cret", other).await,
            Err(Denial::Limited(_))
        ));
        // Another user from another client is not affected; a success does not count.
        assert!(a.login("bob", "s3cret", other).await.is_ok());
        assert!(a.login("bob", "s3cret", other).await.is_ok());
        assert!(matches!(
            a.login("nobody", "x", IpAddr::from([127, 0, 0, 3])).await,
            Err(Denial::Challenge(..))
        ));
    }

    #[tokio::test]
    async fn a_star_scope_grants_every_allowed_action() {
        let (a, router, _d) = auth();
        // ci may only pull (the rules above): `*` grants pull, nothing more.
        let t = a
            .issue(
                &Identity::User("ci".into()),
                &["repository:private.example/team/app:*"],
                &router,
            )
            .unwrap();
        let claims = a.decode(&t.token).unwrap();
        assert_eq!(claims.access.len(), 1);
        assert_eq!(claims.access[0].actions, vec!["pull".to_owned()]);
        let prefixed = target("private.example", "team/app");
        let bearer = bearer_of(&t.token);
        let name = Some("private.example/team/app");
        assert!(
            a.authorize(Some(&bearer), name, Some(&prefixed), CLIENT, Action::Pull)
                .await
                .is_ok()
        );
        assert!(matches!(
            a.authorize(Some(&bearer), name, Some(&prefixed), CLIENT, Action::Delete)
                .await,
            Err(Denial::Challenge(..))
        ));
    }

    #[test]
    fn challenge_parameters_are_quoted() {
        let (a, _, _d) = auth();
        let c = a.challenge(Some("berth:5000"), false, Some("repository:a:pull"), true);
        assert_eq!(
            c,
            r#"Bearer realm="http://berth:5000/token",service="berth",scope="repository:a:pull",error="insufficient_scope""#
        );
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn htpasswd_format() {
        assert!(parse_htpasswd("a:$apr1$xyz\n").is_err());
        assert!(parse_htpasswd("nocolon\n").is_err());
        assert_eq!(parse_htpasswd("\n# c\nu:$2y$05$abc\n").unwrap().len(), 1);
    }
}
