//! Configuration: load (TOML) → normalize → validate.
//!
//! Every key is documented in `config/berth.toml`. Unknown keys are rejected and errors name the
//! key. Secrets (passwords) are never printed: they are read from a file or environment variable
//! named in the config, and held in [`Secret`], whose `Debug` is `<redacted>`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The embedded default: mirror Docker Hub on port 5000 with a cache in `./berth-cache`.
pub const DEFAULT_CONFIG: &str = r#"
[server]
listen = "0.0.0.0:5000"
admin_listen = "0.0.0.0:9090"

[cache]
dir = "./berth-cache"
max_size = "20GiB"
tag_ttl = "10m"

[[registry]]
name = "docker.io"
default = true
endpoints = ["https://registry-1.docker.io"]
"#;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A TOML or type error, with its line and column; the offending line is not quoted (it
    /// may hold a secret), and URL credentials are masked.
    #[error("{0}")]
    Parse(String),
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
    /// A file the config names (a password, key, certificate or htpasswd file) is unreadable.
    #[error("invalid config: {key}: cannot read {}: {source}", path.display())]
    File {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: redact_userinfo(&message.into()),
    }
}

/// Masks the user and password of every URL in `text` (`https://me:pw@host` →
/// `https://***@host`), so that error messages never echo credentials.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The URL runs to the next character that cannot be part of it unescaped in a message.
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | ',' | ']' | '>'))
            .unwrap_or(tail.len());
        let url = &tail[..end];
        match url.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&url[at..]);
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// A TOML error as "line L, column C, key K: message", without the quoted source line (it may
/// hold a secret); K is the dotted key written on that line, under the table header above it.
fn parse_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        let key = error_key(text, line)
            .map(|k| format!(", key {k}"))
            .unwrap_or_default();
        format!("line {line}, column {column}{key}: ")
    });
    ConfigError::Parse(redact_userinfo(&format!(
        "TOML error at {}{}",
        at.unwrap_or_default(),
        e.message().trim_end()
    )))
}

/// The dotted key set on line `line` (1-based), or the table a header line names.
fn error_key(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().take(line).collect();
    let header = |l: &str| {
        let l = l.trim();
        l.starts_with('[').then(|| {
            let end = l.find(']').unwrap_or(l.len());
            l[..end].trim_start_matches('[').trim().to_owned()
        })
    };
    let here = lines.last()?;
    if let Some(table) = header(here) {
        return Some(table);
    }
    let (key, _) = here.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || key.starts_with('#') {
        return None;
    }
    match lines.iter().rev().skip(1).find_map(|l| header(l)) {
        Some(table) => Some(format!("{table}.{key}")),
        None => Some(key.to_owned()),
    }
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::File {
        key: key.to_owned(),
        path: path.to_owned(),
        source,
    })
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Client authentication and per-repository authorization (off unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    #[serde(rename = "registry", default)]
    pub registries: Vec<RegistryConfig>,
    /// Replicas that share fills (and, with `cache.object_store`, one cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// The admin API under `/admin/` on `server.admin_listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// Registries berth stores itself: push, pull, delete.
    #[serde(rename = "hosted", default, skip_serializing_if = "Vec::is_empty")]
    pub hosted: Vec<HostedConfig>,
    /// Webhooks told of pushes, deletes and pulls.
    #[serde(rename = "notify", default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<NotifyConfig>,
}

/// `[admin]`: who may use the admin API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `/admin/` requires `Authorization: Bearer <the file's content>`. Without it, `/admin/`
    /// answers only when `server.admin_listen` is a loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// `[[hosted]]`: a registry whose repositories berth stores itself (no upstream).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostedConfig {
    /// How clients may name it: `?ns=<name>` or a first path component `/v2/<name>/...`.
    pub name: String,
    /// Repository globs (`*` within one path component, `**` across any): requests that name
    /// no registry and match one are served from here, before the default registry.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Allow DELETE of manifests, tags and blobs (otherwise 405).
    #[serde(default)]
    pub delete: bool,
    /// Uploads larger than this are refused with 413 (default: no limit).
    #[serde(
        default,
        with = "human_size_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_blob_size: Option<u64>,
    /// Unfinished uploads untouched this long are removed.
    #[serde(default = "default_upload_ttl", with = "human_duration")]
    pub upload_ttl: Duration,
    /// Garbage collection never removes a blob or manifest younger than this.
    #[serde(default = "default_gc_grace", with = "human_duration")]
    pub gc_grace: Duration,
}

fn default_upload_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_gc_grace() -> Duration {
    Duration::from_secs(3600)
}

/// `[[notify]]`: a webhook that receives distribution's event envelopes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    pub url: url::Url,
    /// Which actions are sent: "push", "delete", "pull" (default: push and delete).
    #[serde(default = "default_notify_events")]
    pub events: Vec<NotifyEvent>,
    /// Headers sent with every delivery (for a secret, prefer `header_file`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// A file of `Name: value` lines sent as headers (kept out of the config and its printout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_file: Option<PathBuf>,
    /// How long one delivery may take.
    #[serde(default = "default_notify_timeout", with = "human_duration")]
    pub timeout: Duration,
    /// Deliveries retried this many times (exponential back-off) before the event is dropped.
    #[serde(default = "default_notify_retries")]
    pub retries: u32,
    /// Events waiting for this endpoint; beyond it new events are dropped and counted.
    #[serde(default = "default_notify_queue")]
    pub queue: usize,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum NotifyEvent {
    Push,
    Delete,
    Pull,
}

fn default_notify_events() -> Vec<NotifyEvent> {
    vec![NotifyEvent::Push, NotifyEvent::Delete]
}

fn default_notify_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_notify_retries() -> u32 {
    5
}

fn default_notify_queue() -> usize {
    1000
}

/// `[cluster]`: the replicas of one berth deployment. Each blob has an owner among the live
/// replicas (rendezvous hashing); a replica that misses a blob asks its owner for it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Every replica's registry URL, this one included (it recognizes itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<url::Url>,
    /// A URL whose host name resolves to every replica (a Kubernetes headless Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<url::Url>,
    /// How often peers are checked (and `dns` resolved again).
    #[serde(default = "default_peer_probe_interval", with = "human_duration")]
    pub probe_interval: Duration,
    /// How long a connection to a peer may take before the next replica in order is asked.
    #[serde(default = "default_peer_connect_timeout", with = "human_duration")]
    pub connect_timeout: Duration,
    /// How long a peer may keep a request or a stream waiting before it is given up (and the
    /// blob asked of the next replica, or resumed there).
    #[serde(default = "default_peer_read_timeout", with = "human_duration")]
    pub read_timeout: Duration,
    /// https peers: extra CA certificates (PEM) their certificates are checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// https peers found by IP address (`dns`, or IPs in `peers`): the name their certificate
    /// is checked against (and sent as SNI), e.g. the Service's name. Default: the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// A client certificate (PEM, with `client_key`) sent on every request to a peer, for
    /// replicas whose `[server.tls] client_ca` requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
}

impl ClusterConfig {
    /// The client certificate and key sent to peers, read and parsed (errors name the key).
    pub fn client_identity(
        &self,
        cert: &Path,
        key: &Path,
    ) -> Result<reqwest::Identity, ConfigError> {
        let mut pem = read_file("cluster.client_cert", cert)?;
        pem.push(b'\n');
        pem.extend(read_file("cluster.client_key", key)?);
        reqwest::Identity::from_pem(&pem).map_err(|e| {
            invalid(
                "cluster.client_cert",
                format!("{} with {}: {e}", cert.display(), key.display()),
            )
        })
    }
}

/// `[cache.object_store]`: a shared bucket (S3, Azure Blob Storage or Google Cloud Storage)
/// behind the local disk.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// `s3://bucket/prefix`, `az://container/prefix` (or `azure://`), `gs://bucket/prefix`.
    pub url: url::Url,
    /// The API endpoint: S3 (path style: Garage, MinIO), the Azure account URL (Azurite:
    /// `http://127.0.0.1:10000/devstoreaccount1`) or the GCS base URL (fake-gcs-server);
    /// omitted for the cloud's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<url::Url>,
    /// S3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// S3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_env: Option<String>,
    /// S3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_file: Option<PathBuf>,
    /// S3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_env: Option<String>,
    /// S3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// Azure only: the storage account (else `AZURE_STORAGE_ACCOUNT_NAME`, else the first path
    /// segment of a path-style `endpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Azure only: a file holding the account's shared key (else `AZURE_STORAGE_ACCOUNT_KEY`,
    /// else workload identity or managed identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_file: Option<PathBuf>,
    /// GCS only: a service account key (JSON) file (else `GOOGLE_APPLICATION_CREDENTIALS`,
    /// else the metadata server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_file: Option<PathBuf>,
    #[serde(default = "default_store_connect_timeout", with = "human_duration")]
    pub connect_timeout: Duration,
    /// How long a store request may stall (a single read) before it counts as failed.
    #[serde(default = "default_read_timeout", with = "human_duration")]
    pub read_timeout: Duration,
}

/// Which service a `[cache.object_store]` URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    S3,
    Azure,
    Gcs,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::S3 => "s3:// (S3)",
            StoreKind::Azure => "az:// (Azure Blob Storage)",
            StoreKind::Gcs => "gs:// (Google Cloud Storage)",
        }
    }
}

impl ObjectStoreConfig {
    /// The service the URL's scheme names (`None`: not one berth speaks).
    pub fn kind(&self) -> Option<StoreKind> {
        match self.url.scheme() {
            "s3" => Some(StoreKind::S3),
            "az" | "azure" => Some(StoreKind::Azure),
            "gs" => Some(StoreKind::Gcs),
            _ => None,
        }
    }

    /// The bucket (S3, GCS) or container (Azure).
    pub fn bucket(&self) -> &str {
        self.url.host_str().unwrap_or_default()
    }

    /// The key prefix inside the bucket, without slashes at either end ("" for none).
    pub fn prefix(&self) -> &str {
        self.url.path().trim_matches('/')
    }

    /// S3: the access key id and secret, when configured here (else the AWS environment).
    pub fn credentials(&self) -> Result<Option<(Secret, Secret)>, ConfigError> {
        let id = read_secret(
            "cache.object_store.access_key_id",
            self.access_key_id_file.as_deref(),
            self.access_key_id_env.as_deref(),
        )?;
        let secret = read_secret(
            "cache.object_store.secret_access_key",
            self.secret_access_key_file.as_deref(),
            self.secret_access_key_env.as_deref(),
        )?;
        match (id, secret) {
            (Some(id), Some(secret)) => Ok(Some((id, secret))),
            (None, None) => Ok(None),
            _ => Err(invalid(
                "cache.object_store",
                "give both the access key id and the secret access key, or neither",
            )),
        }
    }

    /// Azure: the storage account: `account`, else a path-style endpoint's first segment
    /// (`None`: left to `AZURE_STORAGE_ACCOUNT_NAME`).
    pub fn azure_account(&self) -> Option<String> {
        self.account.clone().or_else(|| {
            let e = self.endpoint.as_ref()?;
            let first = e.path_segments()?.find(|s| !s.is_empty())?;
            Some(first.to_owned())
        })
    }

    /// Azure: the shared key from `access_key_file` (checked to be base64, never printed).
    pub fn azure_access_key(&self) -> Result<Option<Secret>, ConfigError> {
        let key = "cache.object_store.access_key";
        let Some(secret) = read_secret(key, self.access_key_file.as_deref(), None)? else {
            return Ok(None);
        };
        use base64::Engine as _;
        if base64::engine::general_purpose::STANDARD
            .decode(secret.expose())
            .is_err()
        {
            return Err(invalid(
                format!("{key}_file"),
                "is not a base64 account key (the storage account's key1 or key2)",
            ));
        }
        Ok(Some(secret))
    }

    /// GCS: the service account key file's path, checked to be a service account key (its
    /// contents are never printed).
    pub fn gcs_service_account(&self) -> Result<Option<&Path>, ConfigError> {
        let key = "cache.object_store.service_account_file";
        let Some(path) = self.service_account_file.as_deref() else {
            return Ok(None);
        };
        let bytes = read_file(key, path)?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            invalid(
                key,
                format!("{}: not JSON (line {})", path.display(), e.line()),
            )
        })?;
        if !json.get("private_key").is_some_and(|v| v.is_string())
            || !json.get("client_email").is_some_and(|v| v.is_string())
        {
            return Err(invalid(
                key,
                format!(
                    "{}: not a service account key (needs client_email and private_key)",
                    path.display()
                ),
            ));
        }
        Ok(Some(path))
    }

    /// Checks the table by itself (no file is read); errors name the key.
    fn validate(&self) -> Result<(), ConfigError> {
        let Some(kind) = self.kind().filter(|_| !self.bucket().is_empty()) else {
            return Err(invalid(
                "cache.object_store.url",
                "must be s3://bucket, az://container or gs://bucket, with an optional /prefix",
            ));
        };
        for (key, url) in [
            ("url", Some(&self.url)),
            ("endpoint", self.endpoint.as_ref()),
        ] {
            if let Some(url) = url
                && (!url.username().is_empty() || url.password().is_some())
            {
                return Err(invalid(
                    format!("cache.object_store.{key}"),
                    "must not carry credentials: give them in files (or the environment)",
                ));
            }
        }
        // Each key belongs to one service: a key of another is a mistake, not ignored.
        let keys = [
            ("region", self.region.is_some(), StoreKind::S3),
            (
                "access_key_id_env",
                self.access_key_id_env.is_some(),
                StoreKind::S3,
            ),
            (
                "access_key_id_file",
                self.access_key_id_file.is_some(),
                StoreKind::S3,
            ),
            (
                "secret_access_key_env",
                self.secret_access_key_env.is_some(),
                StoreKind::S3,
            ),
            (
                "secret_access_key_file",
                self.secret_access_key_file.is_some(),
                StoreKind::S3,
            ),
            ("account", self.account.is_some(), StoreKind::Azure),
            (
                "access_key_file",
                self.access_key_file.is_some(),
                StoreKind::Azure,
            ),
            (
                "service_account_file",
                self.service_account_file.is_some(),
                StoreKind::Gcs,
            ),
        ];
        for (key, set, of) in keys {
            if set && of != kind {
                return Err(invalid(
                    format!("cache.object_store.{key}"),
                    format!(
                        "is for {} URLs only, and the url is {}",
                        of.name(),
                        kind.name()
                    ),
                ));
            }
        }
        if self.access_key_id_file.is_some() && self.access_key_id_env.is_some() {
            return Err(invalid(
                "cache.object_store.access_key_id_file",
                "give access_key_id_file or access_key_id_env, not both",
            ));
        }
        if self.secret_access_key_file.is_some() && self.secret_access_key_env.is_some() {
            return Err(invalid(
                "cache.object_store.secret_access_key_file",
                "give secret_access_key_file or secret_access_key_env, not both",
            ));
        }
        let has_id = self.access_key_id_file.is_some() || self.access_key_id_env.is_some();
        let has_secret =
            self.secret_access_key_file.is_some() || self.secret_access_key_env.is_some();
        if has_id != has_secret {
            return Err(invalid(
                "cache.object_store",
                "give both the access key id and the secret access key, or neither",
            ));
        }
        if let Some(e) = &self.endpoint
            && (!matches!(e.scheme(), "http" | "https") || e.host_str().is_none())
        {
            return Err(invalid(
                "cache.object_store.endpoint",
                "must be an http(s) URL with a host",
            ));
        }
        if let Some(a) = &self.account
            && (a.is_empty() || !a.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            return Err(invalid(
                "cache.object_store.account",
                "must be a storage account name (letters and digits)",
            ));
        }
        Ok(())
    }

    /// Reads the credential files the table names, as `serve` will; errors name the key.
    fn check_files(&self) -> Result<(), ConfigError> {
        self.credentials()?;
        self.azure_access_key()?;
        self.gcs_service_account()?;
        Ok(())
    }
}

fn read_secret(
    key: &str,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(path) = file {
        let s = read_file(&format!("{key}_file"), path)?;
        return Ok(Some(Secret(String::from_utf8_lossy(&s).trim().to_owned())));
    }
    if let Some(var) = env {
        let v = std::env::var(var).map_err(|_| {
            invalid(
                format!("{key}_env"),
                format!("environment variable {var} is not set"),
            )
        })?;
        return Ok(Some(Secret(v.trim().to_owned())));
    }
    Ok(None)
}

/// `[server.tls]`: serve the registry API over TLS (HTTP/1.1 and HTTP/2 by ALPN).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; reloaded when the file changes or on SIGHUP.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Require client certificates signed by this CA (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// The protocols offered by ALPN, most preferred first ("http/1.1", "h2"): a client that
    /// offers several gets the first of these it offers.
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
}

/// The protocols ALPN may name.
pub const ALPN_PROTOCOLS: [&str; 2] = ["http/1.1", "h2"];

/// HTTP/1.1 first: berth serves it with its own transport (a blob is read into one reused
/// buffer and encrypted from there), which costs about a quarter less CPU per GB than HTTP/2's
/// framing and flow control (BENCHMARKS.md, issue 18).
fn default_alpn() -> Vec<String> {
    ALPN_PROTOCOLS.iter().map(|p| p.to_string()).collect()
}

/// `[auth]`: clients authenticate with the token protocol (or Basic), and rules say which
/// repositories each user may pull.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// htpasswd file with bcrypt entries (`htpasswd -B`).
    pub htpasswd: PathBuf,
    /// The token signing key (any bytes, at least 32); generated at start when absent, so
    /// tokens then do not survive a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_key_file: Option<PathBuf>,
    /// How long an issued token is valid.
    #[serde(default = "default_token_ttl", with = "human_duration")]
    pub token_ttl: Duration,
    /// The token realm sent in challenges (default: this server's own `/token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
    /// Failed password checks allowed per client address, and per user name, in a minute;
    /// more are answered 429 before any check runs (0: no limit).
    #[serde(default = "default_failed_logins")]
    pub failed_logins_per_minute: u32,
    #[serde(rename = "rule", default)]
    pub rules: Vec<AuthRule>,
}

fn default_failed_logins() -> u32 {
    10
}

/// `[[auth.rule]]`: these users may pull these `registry/repository` globs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRule {
    /// "anonymous", user names, or "*" (any authenticated user).
    pub users: Vec<String>,
    pub allow: Vec<String>,
    /// What the rule allows: "pull" (the default), "push", "delete".
    #[serde(default = "default_actions")]
    pub actions: Vec<Action>,
}

/// What a request does to a repository (the actions of a token scope).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

fn default_actions() -> Vec<Action> {
    vec![Action::Pull]
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Registry API listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// /healthz, /readyz and /metrics.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// How long a graceful shutdown waits for requests in flight.
    #[serde(default = "default_shutdown_grace", with = "human_duration")]
    pub shutdown_grace: Duration,
    /// Close a connection that has not sent a complete request head within this time.
    #[serde(default = "default_header_timeout", with = "human_duration")]
    pub header_read_timeout: Duration,
    /// Open connections one client address may hold (0: unlimited). More are closed at once.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// TLS for the registry listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Requests per second one client address may make (0: unlimited, the default).
    #[serde(default)]
    pub client_requests_per_second: u32,
    /// Requests a client may make at once above its rate (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_burst: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default = "default_cache_dir")]
    pub dir: PathBuf,
    /// Total bytes of blobs on disk; least recently used blobs are evicted beyond it.
    #[serde(default = "default_max_size", with = "human_size")]
    pub max_size: u64,
    /// How long a tag → digest answer is trusted before it is revalidated upstream.
    #[serde(default = "default_tag_ttl", with = "human_duration")]
    pub tag_ttl: Duration,
    /// How long upstream's 404 for a tag or manifest is remembered (per registry and
    /// repository) and answered without asking again; `0s`: never.
    #[serde(default = "default_negative_ttl", with = "human_duration")]
    pub negative_ttl: Duration,
    /// Blobs not pulled for this long are evicted even below `max_size` (pinned ones never).
    #[serde(
        default,
        with = "human_duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_idle: Option<Duration>,
    /// Images that are never evicted (their manifests, index children for `platforms`, and
    /// blobs), warmed at start; `berth pin` adds to them at run time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pin: Vec<String>,
    /// The platforms `berth warm` and pins fetch of a multi-platform image when not told
    /// otherwise (`os/arch` or `os/arch/variant`).
    #[serde(default = "default_platforms")]
    pub platforms: Vec<String>,
    /// A shared object store; the local disk becomes a bounded hot tier in front of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectStoreConfig>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The registry's name as clients say it: `docker.io`, `ghcr.io`, `registry.local:5000`.
    pub name: String,
    /// Requests that name no registry are served from this one (dockerd `registry-mirrors`).
    #[serde(default)]
    pub default: bool,
    /// Where to fetch from, tried in order with failover.
    pub endpoints: Vec<EndpointConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Per-request timeout to connect to an endpoint.
    #[serde(default = "default_connect_timeout", with = "human_duration")]
    pub connect_timeout: Duration,
    /// Longest silence while reading an upstream response before it is abandoned.
    #[serde(default = "default_read_timeout", with = "human_duration")]
    pub read_timeout: Duration,
    /// Longest wait for upstream to revalidate a tag past `tag_ttl`: past it the cached
    /// manifest is served (stale) and the revalidation finishes in the background ("0s":
    /// always answer at once and revalidate in the background).
    #[serde(default = "default_revalidate_timeout", with = "human_duration")]
    pub revalidate_timeout: Duration,
    /// How requests are spread over several endpoints.
    #[serde(default)]
    pub balance: Balance,
    /// Endpoints used only when every primary endpoint is down (e.g. the origin registry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<EndpointConfig>,
    /// Per-repository rules: the first whose `match` glob fits the repository picks its
    /// endpoints.
    #[serde(rename = "route", default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// Active health probes of each endpoint's `/v2/` ("0s": off).
    #[serde(default = "default_probe_interval", with = "human_duration")]
    pub probe_interval: Duration,
    /// Upstream request budget (requests per second, fractions allowed; 0: unlimited, the
    /// default).
    #[serde(default)]
    pub max_requests_per_second: f64,
    /// Requests allowed at once above the rate (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// When upstream's `ratelimit-remaining` falls below this, tags are not revalidated
    /// (cached answers are served) until `ratelimit_pause` has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratelimit_floor: Option<u64>,
    #[serde(default = "default_ratelimit_pause", with = "human_duration")]
    pub ratelimit_pause: Duration,
    /// Extra CA certificates (PEM) trusted for this registry's endpoints, beside the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from this registry's endpoints. Dangerous; logged loudly.
    #[serde(default)]
    pub insecure: bool,
    /// Only repositories matching one of these globs may be pulled through (default: all).
    /// `*` matches within one path component, `**` across any; Docker Hub's official images
    /// are `library/<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Repositories matching one of these are refused (403 DENIED, never sent upstream);
    /// checked before `allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// `balance = "round-robin" | "least-requests" | "consistent-hash"`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastRequests,
    /// Rendezvous hashing on the blob digest (or the repository for manifests and tags), so
    /// the same blob always goes to the same parent.
    ConsistentHash,
}

/// `[[registry.route]]`: endpoints for the repositories matching a glob.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(rename = "match")]
    pub pattern: String,
    pub endpoints: Vec<EndpointConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<EndpointConfig>,
}

/// An upstream endpoint: a plain registry (`"https://host"`) or another berth
/// (`{ url = "http://regional:5000", mirror = true }`), which gets `?ns=<registry>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub url: reqwest::Url,
    pub mirror: bool,
    /// Overrides the registry's `connect_timeout` for this endpoint.
    pub connect_timeout: Option<Duration>,
    /// Overrides the registry's `read_timeout` for this endpoint.
    pub read_timeout: Option<Duration>,
}

impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            url: String,
            #[serde(default)]
            mirror: bool,
            #[serde(default, with = "human_duration::option")]
            connect_timeout: Option<Duration>,
            #[serde(default, with = "human_duration::option")]
            read_timeout: Option<Duration>,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Full;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an endpoint: a URL like \"https://registry-1.docker.io\", or a table like \
                     { url = \"http://regional:5000\", mirror = true }",
                )
            }
            fn visit_str<E: de::Error>(self, url: &str) -> Result<Full, E> {
                Ok(Full {
                    url: url.to_owned(),
                    mirror: false,
                    connect_timeout: None,
                    read_timeout: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Full, A::Error> {
                Full::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        let f = d.deserialize_any(V)?;
        let url = reqwest::Url::parse(&f.url).map_err(|e| {
            serde::de::Error::custom(format!("endpoint url {:?}: {e}", redact_userinfo(&f.url)))
        })?;
        Ok(EndpointConfig {
            url,
            mirror: f.mirror,
            connect_timeout: f.connect_timeout,
            read_timeout: f.read_timeout,
        })
    }
}

impl Serialize for EndpointConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let fmt = |d: &Option<Duration>| d.map(|d| humantime::format_duration(d).to_string());
        let mut st = s.serialize_struct("EndpointConfig", 4)?;
        st.serialize_field("url", self.url.as_str().trim_end_matches('/'))?;
        st.serialize_field("mirror", &self.mirror)?;
        if let Some(t) = fmt(&self.connect_timeout) {
            st.serialize_field("connect_timeout", &t)?;
        }
        if let Some(t) = fmt(&self.read_timeout) {
            st.serialize_field("read_timeout", &t)?;
        }
        st.end()
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5000))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("./berth-cache")
}
fn default_max_size() -> u64 {
    20 * 1024 * 1024 * 1024
}
fn default_tag_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_platforms() -> Vec<String> {
    vec!["linux/amd64".to_owned()]
}

fn default_negative_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_revalidate_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_max_connections_per_client() -> usize {
    512
}
fn default_token_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_peer_probe_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_peer_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_peer_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_store_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_ratelimit_pause() -> Duration {
    Duration::from_secs(600)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            shutdown_grace: default_shutdown_grace(),
            header_read_timeout: default_header_timeout(),
            client_requests_per_second: 0,
            client_burst: None,
            max_connections_per_client: default_max_connections_per_client(),
            tls: None,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: default_cache_dir(),
            max_size: default_max_size(),
            tag_ttl: default_tag_ttl(),
            negative_ttl: default_negative_ttl(),
            max_idle: None,
            pin: Vec::new(),
            platforms: default_platforms(),
            object_store: None,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    /// The embedded default config.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.registries.is_empty() && self.hosted.is_empty() {
            return Err(invalid(
                "registry",
                "at least one [[registry]] or [[hosted]] is required",
            ));
        }
        self.validate_hosted()?;
        if self.cache.max_size < 1024 * 1024 {
            return Err(invalid("cache.max_size", "must be at least 1MiB"));
        }
        if self.cache.dir.as_os_str().is_empty() {
            return Err(invalid("cache.dir", "must not be empty"));
        }
        if self.cache.max_idle.is_some_and(|d| d.is_zero()) {
            return Err(invalid(
                "cache.max_idle",
                "must be longer than 0s (leave it out to never evict idle blobs)",
            ));
        }
        for (i, image) in self.cache.pin.iter().enumerate() {
            image
                .parse::<crate::oci::ImageRef>()
                .map_err(|e| invalid(format!("cache.pin[{i}]"), e))?;
        }
        if self.cache.platforms.is_empty() {
            return Err(invalid(
                "cache.platforms",
                "must name at least one platform",
            ));
        }
        for (i, p) in self.cache.platforms.iter().enumerate() {
            crate::oci::Platform::parse(p)
                .map_err(|e| invalid(format!("cache.platforms[{i}]"), e))?;
        }
        if let Some(tls) = &self.server.tls {
            if tls.alpn.is_empty() {
                return Err(invalid(
                    "server.tls.alpn",
                    "must name at least one of \"http/1.1\", \"h2\"",
                ));
            }
            for (i, p) in tls.alpn.iter().enumerate() {
                if !ALPN_PROTOCOLS.contains(&p.as_str()) {
                    return Err(invalid(
                        format!("server.tls.alpn[{i}]"),
                        format!("{p:?} is not \"http/1.1\" or \"h2\""),
                    ));
                }
                if tls.alpn[..i].contains(p) {
                    return Err(invalid(
                        format!("server.tls.alpn[{i}]"),
                        format!("{p:?} is named twice"),
                    ));
                }
            }
        }
        let (api, admin) = (self.server.listen, self.server.admin_listen);
        if api.port() != 0
            && api.port() == admin.port()
            && (api.ip() == admin.ip() || api.ip().is_unspecified() || admin.ip().is_unspecified())
        {
            return Err(invalid(
                "server.admin_listen",
                format!(
                    "{admin} overlaps server.listen {api}: give the admin listener another port"
                ),
            ));
        }
        let mut default: Option<&str> = None;
        for (i, r) in self.registries.iter().enumerate() {
            let key = |k: &str| format!("registry[{i}].{k}");
            if !valid_registry_name(&r.name) {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?} is not a registry host name (host or host:port)",
                        r.name
                    ),
                ));
            }
            if self.registries[..i].iter().any(|o| o.name == r.name) {
                return Err(invalid(
                    key("name"),
                    format!("{:?} is configured twice", r.name),
                ));
            }
            if r.default {
                if let Some(first) = default {
                    return Err(invalid(
                        key("default"),
                        format!(
                            "registries {first:?} and {:?} both set default = true; only one registry may be the default",
                            r.name
                        ),
                    ));
                }
                default = Some(&r.name);
            }
            for (field, globs) in [("allow", &r.allow), ("deny", &r.deny)] {
                for (j, g) in globs.iter().enumerate() {
                    crate::route::RepoGlob::new(g)
                        .map_err(|e| invalid(key(&format!("{field}[{j}]")), e))?;
                }
            }
            if r.endpoints.is_empty() {
                return Err(invalid(
                    key("endpoints"),
                    "at least one endpoint is required",
                ));
            }
            check_endpoints(&key("endpoints"), &r.endpoints)?;
            check_endpoints(&key("fallback"), &r.fallback)?;
            for (k, route) in r.routes.iter().enumerate() {
                let rkey = format!("registry[{i}].route[{k}]");
                if route.pattern.is_empty() {
                    return Err(invalid(format!("{rkey}.match"), "must not be empty"));
                }
                if route.endpoints.is_empty() {
                    return Err(invalid(
                        format!("{rkey}.endpoints"),
                        "at least one endpoint is required",
                    ));
                }
                check_endpoints(&format!("{rkey}.endpoints"), &route.endpoints)?;
                check_endpoints(&format!("{rkey}.fallback"), &route.fallback)?;
            }
            if !(r.max_requests_per_second.is_finite() && r.max_requests_per_second >= 0.0) {
                return Err(invalid(
                    key("max_requests_per_second"),
                    "must be a number of requests per second, 0 or more",
                ));
            }
            if r.burst == Some(0) {
                return Err(invalid(key("burst"), "must be at least 1"));
            }
            if r.password_file.is_some() && r.password_env.is_some() {
                return Err(invalid(
                    key("password_file"),
                    "give password_file or password_env, not both",
                ));
            }
            if (r.password_file.is_some() || r.password_env.is_some()) && r.username.is_none() {
                return Err(invalid(key("username"), "a password needs a username"));
            }
        }
        if let Some(auth) = &self.auth {
            for (i, r) in auth.rules.iter().enumerate() {
                if r.users.is_empty() || r.allow.is_empty() {
                    return Err(invalid(
                        format!("auth.rule[{i}]"),
                        "needs at least one user and one allow pattern",
                    ));
                }
            }
            if auth.token_ttl < Duration::from_secs(10) {
                return Err(invalid("auth.token_ttl", "must be at least 10s"));
            }
        }
        if self.server.client_burst == Some(0) {
            return Err(invalid("server.client_burst", "must be at least 1"));
        }
        if let Some(store) = &self.cache.object_store {
            store.validate()?;
        }
        if let Some(cluster) = &self.cluster {
            if cluster.peers.is_empty() == cluster.dns.is_none() {
                return Err(invalid(
                    "cluster",
                    "give either peers (a list of URLs) or dns (one URL), not both",
                ));
            }
            for (j, p) in cluster.peers.iter().chain(&cluster.dns).enumerate() {
                if !matches!(p.scheme(), "http" | "https")
                    || p.host_str().is_none()
                    || !p.path().trim_matches('/').is_empty()
                    || p.query().is_some()
                    || p.fragment().is_some()
                    || !p.username().is_empty()
                    || p.password().is_some()
                {
                    let key = match j < cluster.peers.len() {
                        true => format!("cluster.peers[{j}]"),
                        false => "cluster.dns".to_owned(),
                    };
                    return Err(invalid(
                        key,
                        format!(
                            "{} must be an http(s) URL with a host and no path, query, fragment or credentials",
                            redact_userinfo(p.as_str())
                        ),
                    ));
                }
            }
            if let Some(name) = &cluster.server_name
                && (name.is_empty()
                    || name.len() > 253
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            {
                return Err(invalid(
                    "cluster.server_name",
                    format!("{name:?} is not a DNS name"),
                ));
            }
            if cluster.probe_interval < Duration::from_millis(100) {
                return Err(invalid("cluster.probe_interval", "must be at least 100ms"));
            }
            if cluster.client_cert.is_some() != cluster.client_key.is_some() {
                let key = match cluster.client_cert {
                    Some(_) => "cluster.client_key",
                    None => "cluster.client_cert",
                };
                return Err(invalid(
                    key,
                    "client_cert and client_key go together: give both or neither",
                ));
            }
        }
        Ok(())
    }

    fn validate_hosted(&self) -> Result<(), ConfigError> {
        for (i, h) in self.hosted.iter().enumerate() {
            let key = |k: &str| format!("hosted[{i}].{k}");
            // A hosted name is the first component of a path or an `ns` value: a registry
            // name, or a plain repository-like component.
            let plain = !h.name.is_empty()
                && h.name.len() <= 64
                && h.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !plain && !valid_registry_name(&h.name) {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?} is not a registry name (host[:port] or lowercase letters, digits, - and _)",
                        h.name
                    ),
                ));
            }
            if self.registries.iter().any(|r| r.name == h.name)
                || self.hosted[..i].iter().any(|o| o.name == h.name)
            {
                return Err(invalid(
                    key("name"),
                    format!("{:?} is configured twice", h.name),
                ));
            }
            for (j, g) in h.repositories.iter().enumerate() {
                crate::route::RepoGlob::new(g)
                    .map_err(|e| invalid(format!("hosted[{i}].repositories[{j}]"), e))?;
            }
        }
        for (i, n) in self.notify.iter().enumerate() {
            if !matches!(n.url.scheme(), "http" | "https") {
                return Err(invalid(
                    format!("notify[{i}].url"),
                    "must be http:// or https://",
                ));
            }
            if n.queue == 0 {
                return Err(invalid(format!("notify[{i}].queue"), "must be at least 1"));
            }
        }
        Ok(())
    }

    /// Checks what the config refers to outside itself, as `serve` would need it: password
    /// and credential files and variables, TLS, CA, htpasswd and token key files. Errors name
    /// the key.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for (i, r) in self.registries.iter().enumerate() {
            r.password_for(&format!("registry[{i}]"))?;
            if let Some(path) = &r.ca_file {
                let key = format!("registry[{i}].ca_file");
                let pem = read_file(&key, path)?;
                reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
            }
        }
        if let Some(store) = &self.cache.object_store {
            store.check_files()?;
        }
        if let Some(tls) = &self.server.tls {
            read_file("server.tls.cert", &tls.cert)?;
            read_file("server.tls.key", &tls.key)?;
            if let Some(ca) = &tls.client_ca {
                read_file("server.tls.client_ca", ca)?;
            }
        }
        if let Some(auth) = &self.auth {
            let text = read_file("auth.htpasswd", &auth.htpasswd)?;
            crate::server::auth::parse_htpasswd(&String::from_utf8_lossy(&text)).map_err(|e| {
                invalid("auth.htpasswd", format!("{}: {e}", auth.htpasswd.display()))
            })?;
            if let Some(path) = &auth.token_key_file
                && read_file("auth.token_key_file", path)?.len() < 32
            {
                return Err(invalid(
                    "auth.token_key_file",
                    format!("{}: needs at least 32 bytes", path.display()),
                ));
            }
        }
        if let Some(cluster) = &self.cluster {
            if let Some(path) = &cluster.ca_file {
                read_file("cluster.ca_file", path)?;
            }
            if let (Some(cert), Some(key)) = (&cluster.client_cert, &cluster.client_key) {
                cluster.client_identity(cert, key)?;
            }
        }
        if let Some(path) = self.admin.as_ref().and_then(|a| a.token_file.as_ref())
            && String::from_utf8_lossy(&read_file("admin.token_file", path)?)
                .trim()
                .len()
                < 16
        {
            return Err(invalid(
                "admin.token_file",
                format!("{}: the token needs at least 16 characters", path.display()),
            ));
        }
        for (i, n) in self.notify.iter().enumerate() {
            if let Some(path) = &n.header_file {
                let key = format!("notify[{i}].header_file");
                let text = read_file(&key, path)?;
                crate::notify::parse_header_lines(&String::from_utf8_lossy(&text))
                    .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
            }
        }
        Ok(())
    }

    /// The effective config as TOML, for `check-config` (holds no secrets: only their sources).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

impl RegistryConfig {
    /// Reads the configured password from its file or environment variable.
    pub fn password(&self) -> Result<Option<Secret>, ConfigError> {
        self.password_for(&format!("registry {}", self.name))
    }

    /// Like [`password`](Self::password), with errors naming `{prefix}.password_file` or
    /// `{prefix}.password_env`.
    fn password_for(&self, prefix: &str) -> Result<Option<Secret>, ConfigError> {
        if let Some(path) = &self.password_file {
            let s = read_file(&format!("{prefix}.password_file"), path)?;
            let s = String::from_utf8(s).map_err(|_| {
                invalid(
                    format!("{prefix}.password_file"),
                    "the file is not UTF-8 text",
                )
            })?;
            return Ok(Some(Secret(s.trim_end_matches(['\n', '\r']).to_owned())));
        }
        if let Some(var) = &self.password_env {
            let v = std::env::var(var).map_err(|_| {
                invalid(
                    format!("{prefix}.password_env"),
                    format!("environment variable {var} is not set"),
                )
            })?;
            return Ok(Some(Secret(v)));
        }
        Ok(None)
    }
}

fn check_endpoints(key: &str, endpoints: &[EndpointConfig]) -> Result<(), ConfigError> {
    for (j, e) in endpoints.iter().enumerate() {
        if !matches!(e.url.scheme(), "http" | "https") || e.url.host_str().is_none() {
            return Err(invalid(
                format!("{key}[{j}]"),
                format!(
                    "{} must be an http(s) URL with a host",
                    redact_userinfo(e.url.as_str())
                ),
            ));
        }
        if e.url.query().is_some() || !e.url.username().is_empty() || e.url.password().is_some() {
            return Err(invalid(
                format!("{key}[{j}]"),
                "must not carry a query or credentials (give credentials with username and password_file)",
            ));
        }
        if e.url.fragment().is_some() {
            return Err(invalid(
                format!("{key}[{j}]"),
                "must not carry a fragment (#...): everything after # would be dropped from every request",
            ));
        }
    }
    Ok(())
}

/// A host name with an optional port, as registry names are written.
pub(crate) fn valid_registry_name(name: &str) -> bool {
    let (host, port) = match name.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (name, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return false;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
        && host.bytes().all(|b| !b.is_ascii_uppercase())
}

/// A secret value whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `"20GiB"`, `"512MB"` or a whole number of bytes. KiB, MiB, GiB and TiB are powers of 1024;
/// kB, MB, GB and TB powers of 1000.
pub mod human_size {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    const UNITS: &str = "KiB, MiB, GiB, TiB are powers of 1024; kB, MB, GB, TB are powers of 1000";

    pub fn parse(s: &str) -> Result<u64, String> {
        let t = s.trim();
        // Whole bytes are taken exactly (the unit parser goes through floating point).
        if let Ok(n) = t.strip_suffix('B').unwrap_or(t).trim().parse::<u64>() {
            return Ok(n);
        }
        t.parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| format!("{s:?} is not a size like \"20GiB\" ({UNITS}): {e}"))
    }

    struct V;

    impl Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "a size like \"20GiB\" ({UNITS}) or a whole number of bytes"
            )
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n).map_err(|_| {
                E::custom(format!(
                    "{n} is negative; write a size like \"20GiB\" ({UNITS})"
                ))
            })
        }
        fn visit_f64<E: de::Error>(self, n: f64) -> Result<u64, E> {
            Err(E::custom(format!(
                "{n} is not a whole number of bytes; write a size like \"1.5GiB\" ({UNITS})"
            )))
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
            parse(s).map_err(E::custom)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(V)
    }

    /// Exact, in the unit that writes it shortest: binary units first, then decimal ones
    /// (so "10GB" stays "10GB" rather than "9765625KiB"), else bytes.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*v))
    }

    pub fn format(v: u64) -> String {
        const UNITS: [(u64, &str); 8] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
            (1_000_000_000_000, "TB"),
            (1_000_000_000, "GB"),
            (1_000_000, "MB"),
            (1_000, "kB"),
        ];
        UNITS
            .iter()
            .filter(|(size, _)| v >= *size && v.is_multiple_of(*size))
            .map(|(size, name)| format!("{}{name}", v / size))
            .min_by_key(String::len)
            .unwrap_or_else(|| format!("{v}B"))
    }
}

/// An optional [`human_size`].
pub mod human_size_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    struct Wrapped(#[serde(deserialize_with = "super::human_size::deserialize")] u64);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<Wrapped>::deserialize(d).map(|w| w.map(|w| w.0))
    }

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::human_size::serialize(v, s),
            None => s.serialize_none(),
        }
    }
}

/// `"10m"`, `"30s"`, `"1h 30m"`.
pub mod human_duration {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;
    use std::time::Duration;

    pub(super) struct V;

    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration with a unit, like \"10m\", \"30s\" or \"1h 30m\"")
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "{n} has no unit; write a duration like \"{n}s\" or \"10m\""
            )))
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
            self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
        }
        fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "{n} has no unit; write a duration like \"1500ms\" or \"10m\""
            )))
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
            humantime::parse_duration(s).map_err(|e| {
                E::custom(format!(
                    "{s:?} is not a duration like \"10m\" or \"30s\": {e}"
                ))
            })
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(V)
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*v).to_string())
    }

    /// The same, for an optional key.
    pub mod option {
        use serde::{Deserialize, Deserializer};
        use std::time::Duration;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct W(#[serde(with = "super")] Duration);
            Ok(Some(W::deserialize(d)?.0))
        }

        pub fn serialize<S: serde::Serializer>(
            v: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_mirrors_docker_hub() {
        let c = Config::embedded().unwrap();
        assert_eq!(c.server.listen.port(), 5000);
        assert_eq!(c.registries.len(), 1);
        assert_eq!(c.registries[0].name, "docker.io");
        assert!(c.registries[0].default);
        assert_eq!(
            c.registries[0].endpoints[0].url.as_str(),
            "https://registry-1.docker.io/"
        );
    }

    #[test]
    fn sizes_and_durations() {
        let c = Config::parse(
            r#"
            [cache]
            dir = "/tmp/x"
            max_size = "50GiB"
            tag_ttl = "1h 30m"
            [[registry]]
            name = "ghcr.io"
            endpoints = ["https://ghcr.io", { url = "http://regional:5000", mirror = true }]
            "#,
        )
        .unwrap();
        assert_eq!(c.cache.max_size, 50 * 1024 * 1024 * 1024);
        for size in ["1.5GiB", "1000000000", "1025KiB", "3MB", "7"] {
            let c = Config::parse(&format!(
                "[cache]\nmax_size = \"{size}\"\n[[registry]]\nname = \"a\"\nendpoints = [\"http://a\"]\n"
            ));
            if let Ok(c) = c {
                let again = Config::parse(&c.to_toml()).unwrap();
                assert_eq!(again.cache.max_size, c.cache.max_size, "{size}");
            }
        }
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(5400));
        assert!(!c.registries[0].endpoints[0].mirror);
        assert!(c.registries[0].endpoints[1].mirror);
        // The printed config parses back to the same values.
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again.cache.max_size, c.cache.max_size);
        assert_eq!(again.registries[0].endpoints, c.registries[0].endpoints);
    }

    #[test]
    fn tls_alpn_defaults_to_http1_first_and_is_checked() {
        let head = "[server.tls]\ncert = \"c\"\nkey = \"k\"\n";
        let reg = "[[registry]]\nname = \"a\"\nendpoints = [\"http://a\"]\n";
        let c = Config::parse(&format!("{head}{reg}")).unwrap();
        let tls = c.server.tls.as_ref().unwrap();
        assert_eq!(tls.alpn, ["http/1.1", "h2"]);
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again.server.tls.unwrap().alpn, ["http/1.1", "h2"]);
        let c = Config::parse(&format!("{head}alpn = [\"h2\"]\n{reg}")).unwrap();
        assert_eq!(c.server.tls.unwrap().alpn, ["h2"]);
        for (alpn, key) in [
            ("[]", "server.tls.alpn"),
            ("[\"h3\"]", "server.tls.alpn[0]"),
            ("[\"h2\", \"h2\"]", "server.tls.alpn[1]"),
        ] {
            let err = Config::parse(&format!("{head}alpn = {alpn}\n{reg}")).unwrap_err();
            assert!(err.to_string().contains(key), "{alpn}: {err}");
        }
    }

    #[test]
    fn revalidate_timeout_defaults_to_2s_and_round_trips() {
        let reg = "[[registry]]\nname = \"a\"\nendpoints = [\"http://a\"]\n";
        let c = Config::parse(reg).unwrap();
        assert_eq!(c.registries[0].revalidate_timeout, Duration::from_secs(2));
        let c = Config::parse(&format!("{reg}revalidate_timeout = \"0s\"\n")).unwrap();
        assert_eq!(c.registries[0].revalidate_timeout, Duration::ZERO);
        let c = Config::parse(&format!("{reg}revalidate_timeout = \"750ms\"\n")).unwrap();
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(
            again.registries[0].revalidate_timeout,
            Duration::from_millis(750)
        );
        let err = Config::parse(&format!("{reg}revalidate_timeout = \"soon\"\n")).unwrap_err();
        assert!(err.to_string().contains("revalidate_timeout"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[server]\nlisen = \"0.0.0.0:1\"\n", "lisen"),
            (
                "[cache]\nmax_size = \"lots\"\n[[registry]]\nname=\"a\"\nendpoints=[\"http://a\"]\n",
                "max_size",
            ),
            (
                "[cache]\ntag_ttl = \"soon\"\n[[registry]]\nname=\"a\"\nendpoints=[\"http://a\"]\n",
                "tag_ttl",
            ),
            (
                "[[registry]]\nname=\"Bad Name\"\nendpoints=[\"http://a\"]\n",
                "registry[0].name",
            ),
            (
                "[[registry]]\nname=\"a\"\nendpoints=[\"ftp://a\"]\n",
                "registry[0].endpoints[0]",
            ),
            (
                "[[registry]]\nname=\"a\"\nendpoints=[]\n",
                "registry[0].endpoints",
            ),
            ("", "registry"),
            (
                "[[registry]]\nname=\"a\"\ndefault=true\nendpoints=[\"http://a\"]\n[[registry]]\nname=\"b\"\ndefault=true\nendpoints=[\"http://b\"]\n",
                "default",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "{text:?}: error {err:?} does not name {key:?}"
            );
        }
    }

    /// Item 6 of issue 21: the error says what to write, and names the key (and the
    /// registries, for two defaults).
    #[test]
    fn errors_say_what_to_write() {
        let reg = "[[registry]]\nname = \"a\"\nendpoints = [\"http://a\"]\n";
        let cases = [
            (format!("[cache]\nmax_size = 1.5\n{reg}"), ["cache.max_size", "\"1.5GiB\""]),
            (format!("[cache]\nmax_size = -1\n{reg}"), ["cache.max_size", "\"20GiB\""]),
            (format!("[cache]\nmax_size = \"lots\"\n{reg}"), ["cache.max_size", "powers of 1000"]),
            (format!("[cache]\ntag_ttl = 600\n{reg}"), ["cache.tag_ttl", "\"600s\""]),
            (format!("{reg}read_timeout = 5\n"), ["registry.read_timeout", "\"5s\""]),
            (
                "[[registry]]\nname = \"a\"\nendpoints = [{ url = \"http://a\", connect_timeout = 1 }]\n".into(),
                ["registry.endpoints", "\"1s\""],
            ),
            (
                "[[registry]]\nname = \"a\"\nendpoints = [{ url = \"http://a\", mirrors = true }]\n".into(),
                ["registry.endpoints", "`mirror`"],
            ),
            (
                format!("{reg}default = true\n[[registry]]\nname = \"b\"\ndefault = true\nendpoints = [\"http://b\"]\n"),
                ["registry[1].default", "\"a\" and \"b\""],
            ),
            (
                "[[registry]]\nname = \"a\"\nendpoints = [\"http://a/#x\"]\n".into(),
                ["registry[0].endpoints[0]", "fragment"],
            ),
            (
                format!("{reg}[[registry.route]]\nmatch = \"x/*\"\nendpoints = [\"http://b\"]\nfallback = [\"http://c#f\"]\n"),
                ["registry[0].route[0].fallback[0]", "fragment"],
            ),
        ];
        for (text, wants) in &cases {
            let err = Config::parse(text).unwrap_err().to_string();
            for want in wants {
                assert!(
                    err.contains(want),
                    "{text:?}: {err:?} does not say {want:?}"
                );
            }
        }
    }

    #[test]
    fn decimal_sizes_print_back_decimal() {
        for (written, printed) in [
            ("10 GB", "10GB"),
            ("20GiB", "20GiB"),
            ("1500kB", "1500kB"),
            ("1536KiB", "1536KiB"),
            ("1048577", "1048577B"),
        ] {
            let c = Config::parse(&format!(
                "[cache]\nmax_size = \"{written}\"\n[[registry]]\nname = \"a\"\nendpoints = [\"http://a\"]\n"
            ))
            .unwrap();
            let line = format!("max_size = \"{printed}\"");
            assert!(c.to_toml().contains(&line), "{written}: {}", c.to_toml());
        }
    }

    /// A path in an endpoint URL is a prefix the API is found under (config/berth.toml says so).
    #[test]
    fn an_endpoint_path_is_kept_as_a_prefix() {
        let c =
            Config::parse("[[registry]]\nname = \"a\"\nendpoints = [\"https://host/prefix\"]\n")
                .unwrap();
        assert_eq!(c.registries[0].endpoints[0].url.path(), "/prefix");
    }

    #[test]
    fn userinfo_is_masked() {
        assert_eq!(
            redact_userinfo("a https://me:pw@host/x, \"http://u@h\" ftp://plain/p@q"),
            "a https://***@host/x, \"http://***@h\" ftp://***@q"
        );
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "<redacted>");
    }
}
