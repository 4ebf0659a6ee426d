//! Google Cloud Storage writes through its JSON API, around `object_store`'s GCS client (which
//! reads, heads, lists and deletes through the XML API).
//!
//! `object_store` writes GCS objects with the XML API (a PUT, or an XML multipart upload). berth
//! writes them with the JSON API instead, which GCS serves alike and which fake-gcs-server, the
//! emulator berth is tested against, implements: a media upload for a small object, and a
//! resumable upload session for a large one. A session's object appears only when its final
//! chunk, the one that states the total size, lands — and berth sends that chunk only once the
//! fill verified the blob (it holds the last part back until [`MultipartUpload::complete`]); an
//! aborted session is deleted and leaves nothing.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use object_store::gcp::GoogleCloudStorage;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use tokio::sync::oneshot;

/// Every chunk of a resumable upload but the last is a multiple of this (GCS's rule).
const CHUNK_GRANULE: usize = 256 * 1024;

const STORE: &str = "GCS";

fn error(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: source.into(),
    }
}

fn put_result() -> PutResult {
    PutResult {
        e_tag: None,
        version: None,
        extensions: Default::default(),
    }
}

/// A GCS bucket: `object_store`'s client for reads, the JSON API for writes.
#[derive(Debug)]
pub struct GcsStore {
    inner: Arc<GoogleCloudStorage>,
    http: reqwest::Client,
    /// `{base}/upload/storage/v1/b/{bucket}/o`
    upload_url: url::Url,
}

impl GcsStore {
    pub fn new(
        inner: GoogleCloudStorage,
        base_url: &str,
        bucket: &str,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<GcsStore, object_store::Error> {
        let mut upload_url = url::Url::parse(base_url).map_err(error)?;
        upload_url
            .path_segments_mut()
            .map_err(|()| error(format!("{base_url} cannot be a base URL")))?
            .pop_if_empty()
            .extend(["upload", "storage", "v1", "b", bucket, "o"]);
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            // A session URI is followed as given; nothing else is redirected to.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(error)?;
        Ok(GcsStore {
            inner: Arc::new(inner),
            http,
            upload_url,
        })
    }

    /// The bearer token for the bucket (none with an emulator's `disable_oauth` key).
    async fn authorize(
        &self,
        req: reqwest::RequestBuilder,
    ) -> object_store::Result<reqwest::RequestBuilder> {
        let credential = self.inner.credentials().get_credential().await?;
        Ok(match credential.bearer.as_str() {
            "" => req,
            token => req.bearer_auth(token),
        })
    }

    fn upload_url(&self, upload_type: &str, location: &Path) -> url::Url {
        let mut url = self.upload_url.clone();
        url.query_pairs_mut()
            .append_pair("uploadType", upload_type)
            .append_pair("name", location.as_ref());
        url
    }
}

impl fmt::Display for GcsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (JSON API uploads)", self.inner)
    }
}

/// Fails unless `resp` has one of the `expected` statuses.
async fn expect_status(
    resp: Result<reqwest::Response, reqwest::Error>,
    what: &str,
    expected: &[u16],
) -> object_store::Result<reqwest::Response> {
    let resp = resp.map_err(|e| error(format!("{what}: {e}")))?;
    let status = resp.status().as_u16();
    if expected.contains(&status) {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    Err(error(format!("{what}: status {status}: {body}")))
}

#[async_trait]
impl ObjectStore for GcsStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        // berth overwrites (replicas write the same verified bytes); a conditional write is
        // refused rather than made unconditional (fake-gcs-server, the emulator this is
        // tested against, ignores ifGenerationMatch, so it could not be tested).
        if opts.mode != PutMode::Overwrite {
            return Err(object_store::Error::NotImplemented {
                operation: "conditional put".to_owned(),
                implementer: "berth's GCS uploads".to_owned(),
            });
        }
        let body: Bytes = payload.into();
        let req = self
            .http
            .post(self.upload_url("media", location))
            .header("content-type", "application/octet-stream")
            .body(body);
        let resp = self.authorize(req).await?.send().await;
        expect_status(resp, "GCS media upload", &[200, 201]).await?;
        Ok(put_result())
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let req = self
            .http
            .post(self.upload_url("resumable", location))
            .header("content-type", "application/json")
            .header("x-upload-content-type", "application/octet-stream")
            .body("{}");
        let resp = self.authorize(req).await?.send().await;
        let resp = expect_status(resp, "GCS resumable upload start", &[200, 201]).await?;
        let session = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| url::Url::parse(s).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| error("GCS resumable upload start: no session URI in Location"))?;
        Ok(Box::new(Resumable {
            http: self.http.clone(),
            session,
            sent: 0,
            held: None,
            previous: None,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// One resumable upload session. Chunks go out in order (each waits for the one before), and
/// the last part given is held back: [`MultipartUpload::complete`] sends it as the final chunk.
struct Resumable {
    http: reqwest::Client,
    session: url::Url,
    /// Bytes handed to chunks so far (sent, or being sent).
    sent: u64,
    held: Option<Bytes>,
    /// Tells when the chunk before finished (true: it landed).
    previous: Option<oneshot::Receiver<bool>>,
}

impl fmt::Debug for Resumable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resumable")
            .field("sent", &self.sent)
            .field("held", &self.held.as_ref().map(Bytes::len))
            .finish_non_exhaustive()
    }
}

impl Resumable {
    /// The future that sends `chunk` at `self.sent` (final when `total` is given), after the
    /// chunk before it landed.
    fn chunk(&mut self, chunk: Bytes, total: Option<u64>) -> UploadPart {
        let start = self.sent;
        self.sent += chunk.len() as u64;
        let (tx, rx) = oneshot::channel();
        let previous = self.previous.replace(rx);
        let (http, session) = (self.http.clone(), self.session.clone());
        Box::pin(async move {
            if let Some(previous) = previous
                && !previous.await.unwrap_or(false)
            {
                return Err(error("GCS resumable upload: an earlier chunk failed"));
            }
            let result = send_chunk(&http, &session, start, chunk, total).await;
            let _ = tx.send(result.is_ok());
            result
        })
    }
}

async fn send_chunk(
    http: &reqwest::Client,
    session: &url::Url,
    start: u64,
    chunk: Bytes,
    total: Option<u64>,
) -> object_store::Result<()> {
    let len = chunk.len() as u64;
    let range = match (len, total) {
        (0, Some(total)) => format!("bytes */{total}"),
        (_, Some(total)) => format!("bytes {start}-{}/{total}", start + len - 1),
        (_, None) => format!("bytes {start}-{}/*", start + len - 1),
    };
    let resp = http
        .put(session.clone())
        .header("content-range", range)
        .body(chunk)
        .send()
        .await;
    if total.is_some() {
        expect_status(resp, "GCS resumable upload: final chunk", &[200, 201]).await?;
        return Ok(());
    }
    let resp = expect_status(resp, "GCS resumable upload: chunk", &[308]).await?;
    // GCS may keep fewer bytes than were sent: then this upload fails rather than guess.
    let kept = resp
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes=0-"))
        .and_then(|end| end.parse::<u64>().ok());
    if kept != Some(start + len - 1) {
        return Err(error(format!(
            "GCS resumable upload: kept {kept:?} of bytes 0-{}",
            start + len - 1
        )));
    }
    Ok(())
}

#[async_trait]
impl MultipartUpload for Resumable {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let data: Bytes = data.into();
        let Some(ready) = self.held.replace(data) else {
            return Box::pin(async { Ok(()) });
        };
        if ready.len() % CHUNK_GRANULE != 0 {
            let len = ready.len();
            return Box::pin(async move {
                Err(error(format!(
                    "GCS resumable upload: a {len}-byte chunk is not a multiple of 256 KiB"
                )))
            });
        }
        self.chunk(ready, None)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let last = self.held.take().unwrap_or_default();
        let total = self.sent + last.len() as u64;
        self.chunk(last, Some(total)).await?;
        Ok(put_result())
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.held = None;
        // GCS answers 499 to a cancelled session.
        let resp = self.http.delete(self.session.clone()).send().await;
        expect_status(resp, "GCS resumable upload: cancel", &[204, 499, 404]).await?;
        Ok(())
    }
}
