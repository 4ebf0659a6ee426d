//! What berth's shared-tier tests need of a real object-store server, whichever it is: Garage
//! (S3), Azurite (Azure Blob Storage) or fake-gcs-server (Google Cloud Storage). A scenario
//! written against [`StoreServer`] runs unchanged on each (see tests/cluster.rs).
//!
//! Objects are read, listed and deleted for assertions through the `object_store` crate's
//! client for that service (the library berth uses, not berth's own code).

use std::sync::Arc;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::seed::block_on;

/// A running object-store server with one empty bucket (or container) berth may use.
pub trait StoreServer {
    /// Starts it on free `127.0.0.1` ports, in a temp dir, and waits until it serves the bucket.
    fn start() -> Self
    where
        Self: Sized;

    /// The program's name, for messages.
    fn name(&self) -> &'static str;

    /// The keys of berth's `[cache.object_store]` table (without the header) that point at this
    /// server, with the bucket's keys under `prefix/`.
    fn berth_keys(&self, prefix: &str) -> String;

    /// Environment variables berth needs for [`StoreServer::berth_keys`].
    fn berth_env(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// A client for the bucket (few, quick retries), for assertions.
    fn client(&self) -> Arc<dyn ObjectStore>;

    /// Takes the server down (killed): its port refuses connections; data kept.
    fn stop(&mut self);

    /// Starts it again on the same port with the same data, and waits until it serves.
    fn restart(&mut self);

    /// Panics with the server's log tail.
    fn fail(&self, why: &str) -> !;

    /// How many requests to the bucket the server has logged since it started (each attempt of
    /// a retried request counts): what berth's `berth_object_store_requests_total` is checked
    /// against.
    fn requests_served(&self) -> usize;

    /// [`StoreServer::requests_served`] once it has stood still for 300 ms (a server may log a
    /// request a moment after answering it); at most 10 s.
    fn requests_logged(&self) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut last = self.requests_served();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = self.requests_served();
            if now == last || std::time::Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// `(key, size)` of every object whose key starts with `prefix` (a plain string prefix,
    /// "" for all), sorted by key.
    fn list_keys(&self, prefix: &str) -> Vec<(String, u64)> {
        list_keys(&*self.client(), prefix).unwrap_or_else(|e| self.fail(&e))
    }

    /// The object's bytes, `None` if there is no such key.
    fn get_object(&self, key: &str) -> Option<Vec<u8>> {
        get_object(&*self.client(), key).unwrap_or_else(|e| self.fail(&e))
    }

    /// Writes (or overwrites) an object, e.g. to plant a damaged one.
    fn put_object(&self, key: &str, bytes: Vec<u8>) {
        put_object(&*self.client(), key, bytes).unwrap_or_else(|e| self.fail(&e))
    }

    /// Deletes an object (no error if it does not exist).
    fn delete_object(&self, key: &str) {
        let store = self.client();
        block_on(async { store.delete(&ObjectPath::from(key)).await })
            .or_else(|e| match e {
                object_store::Error::NotFound { .. } => Ok(()),
                e => Err(e),
            })
            .unwrap_or_else(|e| self.fail(&format!("delete {key:?}: {e}")))
    }
}

/// [`StoreServer::list_keys`] through `store`.
pub fn list_keys(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<(String, u64)>, String> {
    // object_store lists by whole path segments: list the prefix's directory, then filter.
    let dir = prefix.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("");
    let listed: Result<Vec<(String, u64)>, object_store::Error> = block_on(async {
        let dir = (!dir.is_empty()).then(|| ObjectPath::from(dir));
        let mut stream = store.list(dir.as_ref());
        let mut keys = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta?;
            keys.push((meta.location.to_string(), meta.size));
        }
        Ok(keys)
    });
    let mut keys: Vec<(String, u64)> = listed
        .map_err(|e| format!("list {prefix:?}: {e}"))?
        .into_iter()
        .filter(|(key, _)| key.starts_with(prefix))
        .collect();
    keys.sort();
    Ok(keys)
}

/// [`StoreServer::get_object`] through `store`.
pub fn get_object(store: &dyn ObjectStore, key: &str) -> Result<Option<Vec<u8>>, String> {
    let got = block_on(async {
        let result = store.get(&ObjectPath::from(key)).await?;
        result.bytes().await
    });
    match got {
        Ok(bytes) => Ok(Some(bytes.to_vec())),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(format!("get {key:?}: {e}")),
    }
}

/// [`StoreServer::put_object`] through `store`.
pub fn put_object(store: &dyn ObjectStore, key: &str, bytes: Vec<u8>) -> Result<(), String> {
    let payload = PutPayload::from(bytes);
    block_on(async { store.put(&ObjectPath::from(key), payload).await })
        .map(|_| ())
        .map_err(|e| format!("put {key:?}: {e}"))
}

/// The quick retries of a test's client.
pub fn test_retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(50),
            max_backoff: std::time::Duration::from_millis(500),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: std::time::Duration::from_secs(5),
    }
}

/// Plain-HTTP client options for a test's client.
pub fn test_client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_allow_http(true)
        .with_connect_timeout(std::time::Duration::from_secs(2))
        .with_timeout(std::time::Duration::from_secs(30))
}

/// A `#[test]` per scenario and backend: `garage::NAME`, `azurite::NAME` and `fake_gcs::NAME`
/// each run the test file's generic `fn NAME<S: StoreServer>()` against a fresh server of
/// their own. Use it at the top level of a test file that has `mod support;`.
#[allow(unused_macros)] // test files without shared-tier scenarios
macro_rules! on_each_store {
    ($($scenario:ident),* $(,)?) => {
        $crate::support::on_each_store!(@backend garage, Garage, $($scenario),*);
        $crate::support::on_each_store!(@backend azurite, Azurite, $($scenario),*);
        $crate::support::on_each_store!(@backend fake_gcs, FakeGcs, $($scenario),*);
    };
    (@backend $module:ident, $server:ident, $($scenario:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario::<$crate::support::$server>()
                }
            )*
        }
    };
}
pub(crate) use on_each_store;
