//! The shared tier's credentials when the config names none: each cloud's own identity
//! service, faked on loopback, in front of the real emulators.
//!
//! - GCS without `service_account_file` (nor `GOOGLE_APPLICATION_CREDENTIALS`): berth takes a
//!   token from the GCE metadata server (`GCE_METADATA_HOST`), and every request it sends to
//!   fake-gcs-server (seen through a [`Recorder`]) carries it; with no metadata server the
//!   store is skipped, and berth serves from upstream and says so.
//! - Azure without `access_key_file` (nor `AZURE_STORAGE_ACCOUNT_KEY`): managed identity
//!   (an IMDS at `IDENTITY_ENDPOINT`) and workload identity (`AZURE_FEDERATED_TOKEN_FILE`
//!   exchanged at `AZURE_AUTHORITY_HOST`), against Azurite over HTTPS with `--oauth basic`
//!   (berth trusts its CA through `SSL_CERT_FILE`). Azurite checks the token's shape, issuer,
//!   audience and lifetime, not its signature: a token with another audience is refused.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

use super::support::{
    Azurite, Berth, Delivery, FakeGcs, Image, Recorder, Registry, StoreServer, Webhook, free_addr,
    seed_blob_image,
};
use super::{PREFIX, admin_metrics, metric, pull_once, replica_config_with, wait_stored};

/// The path of the GCE metadata server's token for the instance's service account.
const GCE_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
/// The path of Azure's IMDS token endpoint.
const IMDS_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// Fails (never skips) if the test's own environment holds credentials berth would find
/// before the identity service under test (the child inherits it).
fn no_ambient_credentials() {
    let set: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| {
            k.starts_with("GOOGLE_")
                || k.starts_with("AZURE_")
                || k.starts_with("GCE_METADATA")
                || k == "IDENTITY_ENDPOINT"
                || k == "SERVICE_ACCOUNT"
        })
        .collect();
    assert!(
        set.is_empty(),
        "the test environment has cloud credentials set, which would be used instead of the \
         identity service under test: unset {set:?}"
    );
}

/// The request target's path, without the query.
fn path_of(d: &Delivery) -> &str {
    d.path.split('?').next().unwrap_or_default()
}

/// What the identity service `what` was asked; fails if it was asked nothing.
fn asked(service: &Webhook, what: &str) -> Vec<Delivery> {
    let asked = service.deliveries();
    let paths: Vec<&str> = asked.iter().map(|d| d.path.as_str()).collect();
    eprintln!("{what} asked: {paths:?}");
    assert!(!asked.is_empty(), "berth never asked the {what}");
    asked
}

/// The form field `name` of a request's `application/x-www-form-urlencoded` body.
fn form_field(d: &Delivery, name: &str) -> Option<String> {
    url::form_urlencoded::parse(&d.body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The query parameter `key` of a request (percent-decoded).
fn query_of(d: &Delivery, key: &str) -> Option<String> {
    let (_, query) = d.path.split_once('?')?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// One berth (no cluster) on `upstream` with `store_keys` as its `[cache.object_store]`, and
/// `env` besides; `HOME` is an empty dir (no gcloud or az CLI credentials of the host's).
/// Returns its temp dir (cache, `HOME`) too, to keep as long as it runs.
fn identity_berth(
    upstream: &str,
    store_keys: &str,
    env: &[(&str, String)],
) -> (Berth, tempfile::TempDir) {
    let dirs = tempfile::tempdir().expect("tempdir");
    let cache = dirs.path().join("cache");
    let config = replica_config_with(&[free_addr()], 0, upstream, store_keys, &cache);
    let home = dirs.path().join("home");
    std::fs::create_dir_all(&home).expect("mkdir home");
    let mut env: Vec<(&str, String)> = env.to_vec();
    env.push(("HOME", home.display().to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    (Berth::start_with_env(&config, &env), dirs)
}

/// Waits (bounded: 20 s) until berth logs that it skips the object store, and returns that
/// line.
fn store_skipped(berth: &Berth) -> String {
    const SKIPPED: &str = "object store failed: skipping it";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(line) = berth.logs().lines().find(|l| l.contains(SKIPPED)) {
            eprintln!("berth says: {line}");
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "berth never logged {SKIPPED:?}:\n{}",
            berth.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts that none of `image`'s blobs is in `store`.
fn none_stored(store: &dyn StoreServer, image: &Image) {
    for (d, _) in image.blobs() {
        let key = format!("{PREFIX}/blobs/sha256/{}", &d[7..]);
        assert_eq!(store.get_object(&key), None, "{key} was not stored");
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

#[test]
fn gcs_without_a_key_file_takes_its_token_from_the_metadata_server() {
    no_ambient_credentials();
    let gcs = FakeGcs::start();
    // berth → relay → fake-gcs-server: what berth sends, headers included.
    let relay = Recorder::start(gcs.addr());
    const TOKEN: &str = "ya29.berth-test-metadata-token";
    let metadata = Webhook::start_answering(|req| {
        if req.header("metadata-flavor") != Some("Google") {
            return (
                403,
                r#"{"error": "Metadata-Flavor: Google missing"}"#.to_owned(),
            );
        }
        if req.method != "GET" || path_of(req) != GCE_TOKEN_PATH {
            return (404, "{}".to_owned());
        }
        let body =
            format!(r#"{{"access_token": "{TOKEN}", "expires_in": 3600, "token_type": "Bearer"}}"#);
        (200, body)
    });
    let upstream = Registry::start();
    // A resumable upload (above the single-PUT size) and a media upload.
    let image = seed_blob_image(
        &upstream,
        "library/gce",
        "v1",
        &[12 * 1024 * 1024, 200 * 1024],
    );
    let keys = format!(
        "url = \"gs://{}/{PREFIX}\"\nendpoint = \"{}\"\n",
        gcs.bucket(),
        relay.url()
    );
    let host = metadata.addr().to_string();
    let env = [
        ("GCE_METADATA_HOST", host.clone()),
        ("GCE_METADATA_IP", host),
    ];
    let (berth, _dirs) = identity_berth(&upstream.url(), &keys, &env);
    pull_once(&berth.url(), &image);
    wait_stored(&gcs, &image);
    for (d, bytes) in image.blobs() {
        let key = format!("{PREFIX}/blobs/sha256/{}", &d[7..]);
        assert_eq!(gcs.get_object(&key).as_deref(), Some(bytes), "{key}");
    }

    let asked = asked(&metadata, "metadata server");
    for d in &asked {
        assert_eq!(d.method, "GET", "{}", d.path);
        assert_eq!(path_of(d), GCE_TOKEN_PATH, "only the token was asked for");
        assert_eq!(d.header("metadata-flavor"), Some("Google"), "{}", d.path);
    }
    // The token is cached: asked once (its expiry is an hour away).
    assert_eq!(
        asked.len(),
        1,
        "asked for a token more than once: {asked:?}"
    );

    let sent = relay.requests();
    eprintln!("berth → fake-gcs-server:\n{}", relay.summary());
    let uploads = sent
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("/upload/storage/v1/b/"))
        .count();
    assert!(
        uploads >= 2,
        "the uploads went through the relay:\n{}",
        relay.summary()
    );
    let bearer = format!("Bearer {TOKEN}");
    // A resumable upload's chunks go to the session URI the start answered, which is the
    // credential itself (GCS takes them unsigned): berth sends no token with them.
    let (chunks, signed): (Vec<_>, Vec<_>) = sent
        .iter()
        .partition(|r| r.method == "PUT" && r.query_param("upload_id").is_some());
    assert!(
        !chunks.is_empty(),
        "the large blob went up in session chunks"
    );
    for r in &chunks {
        assert_eq!(r.header("authorization"), None, "{} {}", r.method, r.uri);
    }
    for r in &signed {
        assert_eq!(
            r.header("authorization"),
            Some(bearer.as_str()),
            "{} {} carried the metadata server's token",
            r.method,
            r.uri
        );
    }
    assert_eq!(metric(&admin_metrics(&berth), "berth_object_store_up"), 1.0);
    drop(berth);

    // No metadata server (nothing listens there): the store is skipped, pulls still work.
    let dead = free_addr().to_string();
    let env = [
        ("GCE_METADATA_HOST", dead.clone()),
        ("GCE_METADATA_IP", dead),
    ];
    let (berth, _dirs) = identity_berth(&upstream.url(), &keys, &env);
    let second = seed_blob_image(&upstream, "library/gce-down", "v1", &[300 * 1024]);
    relay.clear();
    pull_once(&berth.url(), &second);
    for (d, _) in second.blobs() {
        assert_eq!(
            upstream.blob_gets("library/gce-down", d),
            1,
            "{d} from upstream"
        );
    }
    let line = store_skipped(&berth);
    assert!(
        line.contains("metadata") || line.contains("token"),
        "the log names the token fetch as the failure: {line}"
    );
    assert_eq!(metric(&admin_metrics(&berth), "berth_object_store_up"), 0.0);
    assert!(
        relay.requests().is_empty(),
        "no request reached the bucket without a token:\n{}",
        relay.summary()
    );
    none_stored(&gcs, &second);
}

/// A JWT-shaped Entra ID access token for `audience`, valid for an hour (unsigned: Azurite's
/// `--oauth basic` does not check signatures).
fn entra_token(audience: &str) -> String {
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let now = now_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": "berth-test"});
    let claims = serde_json::json!({
        "aud": audience,
        "iss": "https://sts.windows.net/00000000-0000-0000-0000-0000000b3e27/",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 3600,
        "oid": "00000000-0000-0000-0000-000000000001",
        "tid": "00000000-0000-0000-0000-0000000b3e27",
    });
    format!(
        "{}.{}.{}",
        b64(header),
        b64(claims),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"not-checked")
    )
}

/// The storage audience the token is for (what Azure Storage takes).
const STORAGE_AUDIENCE: &str = "https://storage.azure.com";

/// `[cache.object_store]` for Azurite's container with the account but no key.
fn azure_keys_without_a_key(azurite: &Azurite) -> String {
    format!(
        "url = \"az://{}/{PREFIX}\"\nendpoint = \"{}\"\naccount = \"{}\"\n",
        azurite.container(),
        azurite.endpoint(),
        azurite.account()
    )
}

/// `SSL_CERT_FILE`: Azurite's CA, so berth trusts its HTTPS.
fn trust_azurite(azurite: &Azurite) -> (&'static str, String) {
    let ca = azurite.ca_file().expect("Azurite over HTTPS");
    ("SSL_CERT_FILE", ca.display().to_string())
}

/// Managed identity's environment: the IMDS at `imds`, and trust in Azurite's CA.
fn imds_env(imds: &Webhook, azurite: &Azurite) -> [(&'static str, String); 2] {
    let endpoint = format!("http://{}{IMDS_TOKEN_PATH}", imds.addr());
    [("IDENTITY_ENDPOINT", endpoint), trust_azurite(azurite)]
}

/// Pulls `image` through a berth on `azurite` with `env` (the identity under test), and checks
/// its blobs landed in the container.
fn pull_into_azurite(
    azurite: &Azurite,
    upstream: &Registry,
    image: &Image,
    env: &[(&str, String)],
) {
    let (berth, _dirs) = identity_berth(&upstream.url(), &azure_keys_without_a_key(azurite), env);
    pull_once(&berth.url(), image);
    wait_stored(azurite, image);
    for (d, bytes) in image.blobs() {
        let key = format!("{PREFIX}/blobs/sha256/{}", &d[7..]);
        assert_eq!(azurite.get_object(&key).as_deref(), Some(bytes), "{key}");
    }
    assert_eq!(metric(&admin_metrics(&berth), "berth_object_store_up"), 1.0);
    assert!(
        !berth.logs().contains("object store failed"),
        "{}",
        berth.logs()
    );
}

#[test]
fn azure_without_a_key_uses_managed_identity_and_azurite_takes_its_token() {
    no_ambient_credentials();
    let azurite = Azurite::start_oauth();
    let upstream = Registry::start();
    let image = seed_blob_image(
        &upstream,
        "library/imds",
        "v1",
        &[9 * 1024 * 1024, 100 * 1024],
    );
    let imds = |audience: &'static str| {
        Webhook::start_answering(move |req| {
            if req.header("metadata") != Some("true") {
                return (400, r#"{"error": "invalid_request"}"#.to_owned());
            }
            if req.method != "GET" || path_of(req) != IMDS_TOKEN_PATH {
                return (404, "{}".to_owned());
            }
            let body = serde_json::json!({
                "access_token": entra_token(audience),
                "expires_on": (now_secs() + 3600).to_string(),
                "expires_in": "3600",
                "resource": STORAGE_AUDIENCE,
                "token_type": "Bearer",
            });
            (200, body.to_string())
        })
    };
    let good = imds(STORAGE_AUDIENCE);
    let env = imds_env(&good, &azurite);
    pull_into_azurite(&azurite, &upstream, &image, &env);
    let asked = asked(&good, "IMDS");
    for d in &asked {
        assert_eq!(path_of(d), IMDS_TOKEN_PATH);
        assert_eq!(d.header("metadata"), Some("true"));
        assert_eq!(query_of(d, "resource").as_deref(), Some(STORAGE_AUDIENCE));
        assert_eq!(query_of(d, "api-version").as_deref(), Some("2019-08-01"));
    }

    // The control: Azurite checks what it is given. A token for another audience is refused,
    // and berth skips the store (serving from upstream) and says so.
    let wrong = imds("https://management.azure.com");
    let env = imds_env(&wrong, &azurite);
    let (berth, _dirs) = identity_berth(&upstream.url(), &azure_keys_without_a_key(&azurite), &env);
    let second = seed_blob_image(&upstream, "library/imds-refused", "v1", &[300 * 1024]);
    pull_once(&berth.url(), &second);
    let line = store_skipped(&berth);
    assert!(
        line.contains("403") || line.contains("audience"),
        "Azurite refused the token (not TLS or anything else): {line}"
    );
    assert!(!wrong.deliveries().is_empty(), "the IMDS was asked");
    none_stored(&azurite, &second);
}

#[test]
fn azure_without_a_key_uses_workload_identity_and_azurite_takes_its_token() {
    no_ambient_credentials();
    let azurite = Azurite::start_oauth();
    let upstream = Registry::start();
    let image = seed_blob_image(&upstream, "library/workload", "v1", &[6 * 1024 * 1024]);
    const TENANT: &str = "00000000-0000-0000-0000-0000000b3e27";
    const CLIENT: &str = "11111111-0000-0000-0000-0000000b3e27";
    const ASSERTION: &str = "eyJhbGciOiJSUzI1NiJ9.projected-service-account-token.sig";
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, ASSERTION).expect("write federated token");
    let authority = Webhook::start_answering(|req| {
        if req.method != "POST" || req.path != format!("/{TENANT}/oauth2/v2.0/token") {
            return (404, "{}".to_owned());
        }
        if form_field(req, "client_assertion").as_deref() != Some(ASSERTION)
            || form_field(req, "client_id").as_deref() != Some(CLIENT)
        {
            return (401, r#"{"error": "invalid_client"}"#.to_owned());
        }
        let body = serde_json::json!({
            "access_token": entra_token(STORAGE_AUDIENCE),
            "expires_in": 3600,
            "token_type": "Bearer",
        });
        (200, body.to_string())
    });
    let env = [
        ("AZURE_CLIENT_ID", CLIENT.to_owned()),
        ("AZURE_TENANT_ID", TENANT.to_owned()),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            token_file.display().to_string(),
        ),
        (
            "AZURE_AUTHORITY_HOST",
            format!("http://{}", authority.addr()),
        ),
        trust_azurite(&azurite),
    ];
    pull_into_azurite(&azurite, &upstream, &image, &env);
    let asked = asked(&authority, "authority host");
    for d in &asked {
        assert_eq!(
            form_field(d, "scope").as_deref(),
            Some("https://storage.azure.com/.default"),
            "{}",
            String::from_utf8_lossy(&d.body)
        );
        assert_eq!(
            form_field(d, "grant_type").as_deref(),
            Some("client_credentials")
        );
    }
}
