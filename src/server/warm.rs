//! Warm jobs: images fetched into the cache ahead of the clients that will pull them
//! (`berth warm`, `POST /admin/warm`; pins call [`Warmer::start`] too).
//!
//! A job is a client of the [`pipeline`]: every manifest and blob is a GET built here
//! ([`RequestHead::internal`]) and answered by the same phases as a client's, so routing,
//! allow/deny lists, hosted vs mirrored and upstream credentials all apply. The admin token
//! already authorized the caller, so `[auth]` does not, and a 404 remembered for
//! `negative_ttl` is asked upstream again. Of an index, the children for the job's platforms
//! are fetched ([`index_children`]); of each image manifest, its config and layers. A blob
//! already cached is not read at all; a fill is drained (what is already in its temp file is
//! skipped, not read) and waited for until it is in the cache.
//!
//! Jobs run in the background; [`Warmer::job`] reads their progress. One image failing does
//! not stop the others. The last [`KEEP_FINISHED`] finished jobs are remembered.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::StatusCode;
use parking_lot::Mutex;
use serde::Serialize;

use super::pipeline;
use super::request::RequestHead;
use super::response::Payload;
use crate::app::App;
use crate::cache::Piece;
use crate::oci::{
    Digest, ImageRef, MANIFEST_MEDIA_TYPES, Platform, index_children, manifest_parts,
};

/// Finished jobs remembered for [`Warmer::job`].
pub(crate) const KEEP_FINISHED: usize = 64;
/// Images warmed at once, over all jobs.
const IMAGES_AT_ONCE: usize = 4;
/// Blobs of one image fetched at once.
const BLOBS_AT_ONCE: usize = 3;
/// How deep indexes may nest (an index of indexes is one level).
const MAX_DEPTH: usize = 2;
/// How long a drained fill may take to reach the cache.
const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// Where an image, or a job, is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    Queued,
    Running,
    Done,
    /// Finished, and it (or, for a job, one of its images) failed.
    Failed,
}

impl State {
    fn finished(self) -> bool {
        matches!(self, State::Done | State::Failed)
    }
}

/// One image of a job.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ImageStatus {
    /// In full: `docker.io/library/alpine:latest`.
    pub image: String,
    pub state: State,
    /// Manifests fetched (the index and its children).
    pub manifests: u64,
    pub blobs_done: u64,
    pub blobs_total: u64,
    /// Of `blobs_done`, those that were already cached (not fetched).
    pub blobs_cached: u64,
    pub bytes_done: u64,
    /// As the manifests declare them; known once the manifests are fetched.
    pub bytes_total: u64,
    /// Why it failed (`403 DENIED: …`).
    pub error: Option<String>,
}

impl ImageStatus {
    fn queued(image: String) -> ImageStatus {
        ImageStatus {
            image,
            state: State::Queued,
            manifests: 0,
            blobs_done: 0,
            blobs_total: 0,
            blobs_cached: 0,
            bytes_done: 0,
            bytes_total: 0,
            error: None,
        }
    }
}

/// A job, as `GET /admin/warm/<id>` answers it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct JobStatus {
    pub id: u64,
    /// `done` or `failed` once every image finished.
    pub state: State,
    pub platforms: Vec<String>,
    pub all_platforms: bool,
    /// Images that failed.
    pub failed: usize,
    pub images: Vec<ImageStatus>,
}

impl JobStatus {
    fn settle(&mut self) {
        let finished = self.images.iter().filter(|i| i.state.finished()).count();
        self.failed = self
            .images
            .iter()
            .filter(|i| i.state == State::Failed)
            .count();
        self.state = if finished == self.images.len() {
            if self.failed > 0 {
                State::Failed
            } else {
                State::Done
            }
        } else if self.images.iter().all(|i| i.state == State::Queued) {
            State::Queued
        } else {
            State::Running
        };
    }
}

/// The warm jobs of a berth (held by [`App`]).
pub(crate) struct Warmer {
    next_id: AtomicU64,
    jobs: Mutex<VecDeque<Arc<Mutex<JobStatus>>>>,
    /// `[cache] platforms`: what a job that names none fetches of an index.
    platforms: Vec<Platform>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Warmer {
    pub(crate) fn new(platforms: Vec<Platform>) -> Warmer {
        Warmer {
            next_id: AtomicU64::new(1),
            jobs: Mutex::new(VecDeque::new()),
            platforms,
            slots: Arc::new(tokio::sync::Semaphore::new(IMAGES_AT_ONCE)),
        }
    }

    /// Starts warming `images` in the background and returns the job's id. `platforms` empty:
    /// `[cache] platforms`; `all_platforms`: every child of an index, with a platform or not.
    pub(crate) fn start(
        &self,
        app: Arc<App>,
        images: Vec<ImageRef>,
        platforms: Vec<Platform>,
        all_platforms: bool,
    ) -> u64 {
        let platforms = Arc::new(if platforms.is_empty() {
            self.platforms.clone()
        } else {
            platforms
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut status = JobStatus {
            id,
            state: State::Queued,
            platforms: platforms.iter().map(Platform::to_string).collect(),
            all_platforms,
            failed: 0,
            images: images
                .iter()
                .map(|i| ImageStatus::queued(i.to_string()))
                .collect(),
        };
        status.settle();
        let job = Arc::new(Mutex::new(status));
        {
            let mut jobs = self.jobs.lock();
            jobs.push_back(job.clone());
            forget_old(&mut jobs);
        }
        tracing::info!(
            job = id,
            images = images.len(),
            platforms = %if all_platforms { "all".to_owned() } else { job.lock().platforms.join(",") },
            "warm job started"
        );
        for (i, image) in images.into_iter().enumerate() {
            let (app, slots, platforms) = (app.clone(), self.slots.clone(), platforms.clone());
            let progress = Progress {
                job: job.clone(),
                i,
            };
            tokio::spawn(async move {
                let result = match slots.acquire_owned().await {
                    Ok(_permit) => {
                        progress.update(|s| s.state = State::Running);
                        warm_image(&app, &image, &platforms, all_platforms, &progress).await
                    }
                    Err(_) => Err("berth is shutting down".to_owned()),
                };
                match &result {
                    Ok(()) => tracing::info!(job = id, image = %image, "warmed"),
                    Err(e) => tracing::warn!(job = id, image = %image, error = %e, "warm failed"),
                }
                progress.update(|s| match result {
                    Ok(()) => s.state = State::Done,
                    Err(e) => {
                        s.state = State::Failed;
                        s.error = Some(e);
                    }
                });
            });
        }
        id
    }

    /// A job's progress (None: no such job, or one finished long enough ago to be forgotten).
    pub(crate) fn job(&self, id: u64) -> Option<JobStatus> {
        let jobs = self.jobs.lock();
        let job = jobs.iter().find(|j| j.lock().id == id)?;
        Some(job.lock().clone())
    }
}

/// Drops the oldest finished jobs beyond [`KEEP_FINISHED`].
fn forget_old(jobs: &mut VecDeque<Arc<Mutex<JobStatus>>>) {
    let finished = |j: &Arc<Mutex<JobStatus>>| j.lock().state.finished();
    let mut extra = jobs
        .iter()
        .filter(|j| finished(j))
        .count()
        .saturating_sub(KEEP_FINISHED);
    jobs.retain(|j| {
        if extra > 0 && finished(j) {
            extra -= 1;
            return false;
        }
        true
    });
}

/// Updates one image of a job (and the job's state with it).
struct Progress {
    job: Arc<Mutex<JobStatus>>,
    i: usize,
}

impl Progress {
    fn update(&self, f: impl FnOnce(&mut ImageStatus)) {
        let mut job = self.job.lock();
        if let Some(s) = job.images.get_mut(self.i) {
            f(s);
        }
        job.settle();
    }
}

/// Where an image's requests go: its repository, and its registry as `?ns=`.
struct Repo<'a> {
    registry: &'a str,
    repository: &'a str,
}

impl Repo<'_> {
    fn path(&self, what: &str, reference: &str) -> String {
        format!(
            "/v2/{}/{what}/{reference}?ns={}",
            self.repository, self.registry
        )
    }
}

async fn warm_image(
    app: &App,
    image: &ImageRef,
    platforms: &[Platform],
    all: bool,
    progress: &Progress,
) -> Result<(), String> {
    let repo = Repo {
        registry: &image.registry,
        repository: image.repository.as_str(),
    };
    let top = manifest(app, &repo, &image.reference.to_string()).await?;
    progress.update(|s| s.manifests += 1);
    // Walk the indexes down to the image manifests, children in index order.
    let mut pending = vec![(top, image.reference.to_string(), 0)];
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    let mut seen = HashSet::new();
    while let Some((bytes, name, depth)) = pending.pop() {
        let parts = manifest_parts(&bytes).map_err(|e| format!("manifest {name}: {e}"))?;
        if parts.manifests.is_empty() {
            for (d, size) in parts.blobs.into_iter().zip(parts.blob_sizes) {
                if seen.insert(d.clone()) {
                    blobs.push((d, size));
                }
            }
            continue;
        }
        if depth >= MAX_DEPTH {
            return Err(format!("manifest {name}: indexes nested too deep"));
        }
        let children = index_children(&bytes, platforms, all);
        if children.is_empty() {
            let wanted: Vec<String> = platforms.iter().map(Platform::to_string).collect();
            return Err(format!(
                "the index {name} has no manifest for {} (see --platform, --all-platforms)",
                wanted.join(", ")
            ));
        }
        let mut fetched = Vec::with_capacity(children.len());
        for d in children {
            let name = d.to_string();
            let bytes = manifest(app, &repo, &name).await?;
            progress.update(|s| s.manifests += 1);
            fetched.push((bytes, name, depth + 1));
        }
        pending.extend(fetched.into_iter().rev());
    }
    let total = blobs.iter().map(|(_, size)| size).sum();
    progress.update(|s| {
        s.blobs_total = blobs.len() as u64;
        s.bytes_total = total;
    });
    futures_util::stream::iter(blobs.into_iter().map(|(d, _)| Ok(d)))
        .try_for_each_concurrent(BLOBS_AT_ONCE, |d| blob(app, &repo, d, progress))
        .await
}

/// A manifest's bytes, by tag or digest.
async fn manifest(app: &App, repo: &Repo<'_>, reference: &str) -> Result<Bytes, String> {
    let mut head = RequestHead::internal(&repo.path("manifests", reference));
    head.header("accept", MANIFEST_MEDIA_TYPES.join(", ").as_bytes());
    let reply = pipeline::handle(app, head, None).await;
    match (reply.head.status, reply.payload) {
        (StatusCode::OK, Payload::Bytes(b)) => Ok(b),
        (status, payload) => Err(refused(status, payload)),
    }
}

/// Fetches one blob into the cache (a cached one is counted, not read).
async fn blob(app: &App, repo: &Repo<'_>, d: Digest, progress: &Progress) -> Result<(), String> {
    let head = RequestHead::internal(&repo.path("blobs", &d.to_string()));
    let reply = pipeline::handle(app, head, None).await;
    if reply.head.status != StatusCode::OK {
        return Err(format!(
            "blob {d}: {}",
            refused(reply.head.status, reply.payload)
        ));
    }
    match reply.payload {
        Payload::File { len, .. } => progress.update(|s| {
            s.bytes_done += len;
            s.blobs_cached += 1;
        }),
        Payload::Fill { fill, start, end } => {
            let mut reader = fill.reader(start, end);
            while let Some(piece) = reader.next_piece().await {
                let n = match piece.map_err(|e| format!("blob {d}: {e}"))? {
                    Piece::Chunk(b) => b.len() as u64,
                    Piece::File { len, .. } => {
                        reader.advance(len as u64);
                        len as u64
                    }
                };
                progress.update(|s| s.bytes_done += n);
            }
            committed(app, &d).await?;
        }
        Payload::Bytes(b) => progress.update(|s| s.bytes_done += b.len() as u64),
        Payload::Empty => {}
    }
    progress.update(|s| s.blobs_done += 1);
    Ok(())
}

/// Waits (bounded) until a blob whose fill was drained is in the cache.
async fn committed(app: &App, d: &Digest) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + COMMIT_WAIT;
    while app.mirror.blobs.path_if_cached(d).is_none() {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "blob {d} was fetched and verified but is not in the cache (see berth's log)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `403 DENIED: why`, from an error answer's status and OCI error JSON.
fn refused(status: StatusCode, payload: Payload) -> String {
    let body = match payload {
        Payload::Bytes(b) => b,
        _ => Bytes::new(),
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let e = &v["errors"][0];
    match (e["code"].as_str(), e["message"].as_str()) {
        (Some(code), Some(message)) => format!("{} {code}: {message}", status.as_u16()),
        _ => format!("{status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: u64, state: State) -> Arc<Mutex<JobStatus>> {
        Arc::new(Mutex::new(JobStatus {
            id,
            state,
            platforms: Vec::new(),
            all_platforms: false,
            failed: 0,
            images: Vec::new(),
        }))
    }

    #[test]
    fn remembers_running_jobs_and_the_last_finished() {
        let mut jobs: VecDeque<_> = (0..100)
            .map(|i| {
                job(
                    i,
                    if i % 2 == 0 {
                        State::Done
                    } else {
                        State::Running
                    },
                )
            })
            .collect();
        forget_old(&mut jobs);
        let ids: Vec<u64> = jobs.iter().map(|j| j.lock().id).collect();
        assert_eq!(ids.len(), 50 + KEEP_FINISHED.min(50));
        let mut jobs: VecDeque<_> = (0..200).map(|i| job(i, State::Failed)).collect();
        jobs.push_back(job(200, State::Queued));
        forget_old(&mut jobs);
        let ids: Vec<u64> = jobs.iter().map(|j| j.lock().id).collect();
        assert_eq!(ids.len(), KEEP_FINISHED + 1);
        assert_eq!(ids[0], 200 - KEEP_FINISHED as u64);
        assert_eq!(ids.last(), Some(&200));
    }

    #[test]
    fn job_state_follows_its_images() {
        let image = |state| ImageStatus {
            state,
            ..ImageStatus::queued(String::new())
        };
        let mut j = job(1, State::Queued).lock().clone();
        for (states, want) in [
            (&[State::Queued, State::Queued][..], State::Queued),
            (&[State::Done, State::Queued], State::Running),
            (&[State::Done, State::Done], State::Done),
            (&[State::Failed, State::Done], State::Failed),
        ] {
            j.images = states.iter().map(|s| image(*s)).collect();
            j.settle();
            assert_eq!(j.state, want, "{states:?}");
        }
        assert_eq!(j.failed, 1);
    }

    #[test]
    fn refusals_name_status_code_and_message() {
        let body = Bytes::from_static(br#"{"errors":[{"code":"DENIED","message":"no"}]}"#);
        assert_eq!(
            refused(StatusCode::FORBIDDEN, Payload::Bytes(body)),
            "403 DENIED: no"
        );
        assert_eq!(
            refused(StatusCode::BAD_GATEWAY, Payload::Empty),
            "502 Bad Gateway"
        );
    }
}
