//! The object store a `[cache.object_store]` URL names, with its credentials: S3 (`s3://`),
//! Azure Blob Storage (`az://`, `azure://`) or Google Cloud Storage (`gs://`).
//!
//! Credentials given in the config come first; else each cloud's own environment, as its SDKs
//! read it: `AWS_*` (keys, web identity), `AZURE_*` (`AZURE_STORAGE_ACCOUNT_NAME`,
//! `AZURE_STORAGE_ACCOUNT_KEY`, workload identity's `AZURE_CLIENT_ID`, `AZURE_TENANT_ID`,
//! `AZURE_FEDERATED_TOKEN_FILE` and `AZURE_AUTHORITY_HOST`; else managed identity, from the IMDS
//! or `IDENTITY_ENDPOINT`), `GOOGLE_*` (`GOOGLE_APPLICATION_CREDENTIALS`; else the metadata
//! server, or `GCE_METADATA_HOST`). Those fallbacks are tested in tests/cluster/identity.rs.
//! Certificates are checked against the system's roots (`SSL_CERT_FILE` replaces them).

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use super::gcs::GcsStore;
use crate::config::{ObjectStoreConfig, StoreKind};
use crate::error::SetupError;

/// GCS's own endpoint (`object_store`'s default too).
const GCS_BASE_URL: &str = "https://storage.googleapis.com";

fn client_options(config: &ObjectStoreConfig) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_read_timeout(config.read_timeout)
        // Blobs are large: no limit on a whole request, only on stalls.
        .with_timeout_disabled()
        .with_allow_http(true)
}

fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
    }
}

fn endpoint(config: &ObjectStoreConfig) -> Option<String> {
    let e = config.endpoint.as_ref()?;
    Some(e.as_str().trim_end_matches('/').to_owned())
}

/// Opens the store `config` names (no request is made yet), and says which service it is.
pub fn open(config: &ObjectStoreConfig) -> Result<(Arc<dyn ObjectStore>, StoreKind), SetupError> {
    const URL: &str = "cache.object_store.url";
    let kind = config
        .kind()
        .ok_or_else(|| SetupError::new(URL, "not an s3://, az:// or gs:// URL"))?;
    let store: Arc<dyn ObjectStore> = match kind {
        StoreKind::S3 => Arc::new(s3(config)?.build().map_err(|e| SetupError::new(URL, e))?),
        StoreKind::Azure => Arc::new(
            azure(config)?
                .build()
                .map_err(|e| SetupError::new(URL, e))?,
        ),
        StoreKind::Gcs => {
            let inner = gcs(config)?.build().map_err(|e| SetupError::new(URL, e))?;
            let base = endpoint(config).unwrap_or_else(|| GCS_BASE_URL.to_owned());
            Arc::new(
                GcsStore::new(
                    inner,
                    &base,
                    config.bucket(),
                    config.connect_timeout,
                    config.read_timeout,
                )
                .map_err(|e| SetupError::new(URL, e))?,
            )
        }
    };
    Ok((store, kind))
}

fn s3(config: &ObjectStoreConfig) -> Result<AmazonS3Builder, SetupError> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(config.bucket())
        .with_client_options(client_options(config))
        .with_retry(retry());
    if let Some(endpoint) = endpoint(config) {
        // A custom endpoint (Garage, MinIO, Ceph) is addressed path-style.
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
    }
    if let Some(region) = &config.region {
        builder = builder.with_region(region);
    }
    if let Some((id, secret)) = config
        .credentials()
        .map_err(|e| SetupError::new("cache.object_store", e))?
    {
        builder = builder
            .with_access_key_id(id.expose())
            .with_secret_access_key(secret.expose());
    }
    Ok(builder)
}

fn azure(config: &ObjectStoreConfig) -> Result<MicrosoftAzureBuilder, SetupError> {
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_container_name(config.bucket())
        .with_client_options(client_options(config))
        .with_retry(retry());
    if let Some(endpoint) = endpoint(config) {
        // The account's URL, path style for Azurite (`http://host:10000/account`).
        builder = builder.with_endpoint(endpoint);
    }
    match config.azure_account() {
        Some(account) => builder = builder.with_account(account),
        None if std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_none()
            && std::env::var_os("AZURE_STORAGE_USE_EMULATOR").is_none() =>
        {
            return Err(SetupError::new(
                "cache.object_store.account",
                "no storage account: set account (or AZURE_STORAGE_ACCOUNT_NAME)",
            ));
        }
        None => {}
    }
    if let Some(key) = config
        .azure_access_key()
        .map_err(|e| SetupError::new("cache.object_store.access_key_file", e))?
    {
        builder = builder.with_access_key(key.expose());
    }
    Ok(builder)
}

fn gcs(config: &ObjectStoreConfig) -> Result<GoogleCloudStorageBuilder, SetupError> {
    let mut builder = GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(config.bucket())
        .with_client_options(client_options(config))
        .with_retry(retry());
    if let Some(endpoint) = endpoint(config) {
        builder = builder.with_base_url(&endpoint);
    }
    if let Some(path) = config
        .gcs_service_account()
        .map_err(|e| SetupError::new("cache.object_store.service_account_file", e))?
    {
        builder = builder.with_service_account_path(path.to_string_lossy());
    }
    Ok(builder)
}
