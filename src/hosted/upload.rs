//! Blob uploads: a request body streamed to a file in large writes off the async threads,
//! hashed as it is written, with a size limit; and upload sessions (`POST` … `PATCH`… `PUT`)
//! whose state is on disk, so an upload interrupted by a restart resumes from the offset a
//! `GET` of it reports.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::oci::{DigestAlgorithm, Hasher, RepoName};

/// A request body as the transports hand it over.
pub type BodyStream = BoxStream<'static, io::Result<Bytes>>;

/// Bytes gathered before one write (and hash update) on the blocking pool.
const WRITE_CHUNK: usize = 1024 * 1024;

/// Why appending a body stopped.
#[derive(Debug)]
pub(crate) enum AppendError {
    /// The body would take the file past this many bytes.
    TooLarge(u64),
    /// The client's body broke off (what was written before stays).
    Body(io::Error),
    /// Writing failed (disk full, ...).
    Disk(io::Error),
}

/// A file being appended to, with the sha256 of everything in it while that is known.
pub(crate) struct Sink {
    pub file: Arc<File>,
    pub len: u64,
    /// sha256 over bytes `[0, len)`; None after a restart (the file is hashed again at the end).
    pub hasher: Option<Hasher>,
}

impl Sink {
    pub fn new(file: File) -> Sink {
        Sink {
            file: Arc::new(file),
            len: 0,
            hasher: Some(Hasher::new(DigestAlgorithm::Sha256)),
        }
    }

    /// Appends a whole body; `limit` caps the file's size. On error, `len` (and the hash) still
    /// cover exactly what was written.
    pub async fn append(
        &mut self,
        mut body: BodyStream,
        limit: Option<u64>,
    ) -> Result<(), AppendError> {
        let mut buf = BytesMut::new();
        loop {
            let next = body.next().await;
            let done = next.is_none();
            match next {
                Some(Ok(b)) => {
                    let total = self.len + buf.len() as u64 + b.len() as u64;
                    if limit.is_some_and(|l| total > l) {
                        return Err(AppendError::TooLarge(limit.unwrap_or_default()));
                    }
                    buf.extend_from_slice(&b);
                }
                Some(Err(e)) => {
                    self.write(buf.split().freeze())
                        .await
                        .map_err(AppendError::Disk)?;
                    return Err(AppendError::Body(e));
                }
                None => {}
            }
            if buf.len() >= WRITE_CHUNK || (done && !buf.is_empty()) {
                self.write(buf.split().freeze())
                    .await
                    .map_err(AppendError::Disk)?;
            }
            if done {
                return Ok(());
            }
        }
    }

    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let file = self.file.clone();
        let at = self.len;
        let mut hasher = self.hasher.take();
        let (hasher, written) = tokio::task::spawn_blocking(move || {
            let r = file.write_all_at(&chunk, at);
            if r.is_ok()
                && let Some(h) = &mut hasher
            {
                h.update(&chunk);
            }
            (hasher, r.map(|()| chunk.len() as u64))
        })
        .await
        .map_err(io::Error::other)?;
        let n = written?;
        self.hasher = hasher;
        self.len += n;
        Ok(())
    }
}

/// What an upload session's state file records.
#[derive(Serialize, Deserialize)]
struct State {
    registry: String,
    repo: String,
}

/// An upload session, open. One request at a time appends to it (the sink's lock).
pub(crate) struct Session {
    pub registry: Arc<str>,
    pub repo: RepoName,
    pub data: PathBuf,
    pub sink: tokio::sync::Mutex<Sink>,
}

/// The upload sessions of every hosted registry.
pub(crate) struct Uploads {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<Session>>>,
}

/// An upload id: 32 hex characters.
pub fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Uploads {
    pub fn new(dir: &Path) -> Uploads {
        Uploads {
            dir: dir.to_owned(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(id), self.dir.join(format!("{id}.json")))
    }

    /// Starts a session for a repository; returns its id.
    pub fn start(&self, registry: &Arc<str>, repo: &RepoName) -> io::Result<String> {
        let id = format!("{:032x}", rand::random::<u128>());
        let (data, state) = self.paths(&id);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&data)?;
        let s = State {
            registry: registry.to_string(),
            repo: repo.to_string(),
        };
        let json = serde_json::to_vec(&s).map_err(io::Error::other)?;
        if let Err(e) = std::fs::write(&state, json) {
            let _ = std::fs::remove_file(&data);
            return Err(e);
        }
        let session = Session {
            registry: registry.clone(),
            repo: repo.clone(),
            data,
            sink: tokio::sync::Mutex::new(Sink::new(file)),
        };
        self.open.lock().insert(id.clone(), Arc::new(session));
        Ok(id)
    }

    /// The session `id` if it exists and is for this repository (after a restart it is read
    /// back from its files).
    pub fn get(&self, id: &str, registry: &str, repo: &RepoName) -> Option<Arc<Session>> {
        if !valid_id(id) {
            return None;
        }
        let mut open = self.open.lock();
        let session = match open.get(id) {
            Some(s) => s.clone(),
            None => {
                let (data, state) = self.paths(id);
                let s: State = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
                let file = File::options().read(true).write(true).open(&data).ok()?;
                let len = file.metadata().ok()?.len();
                let session = Session {
                    registry: s.registry.as_str().into(),
                    repo: s.repo.parse().ok()?,
                    data,
                    sink: tokio::sync::Mutex::new(Sink {
                        file: Arc::new(file),
                        len,
                        hasher: (len == 0).then(|| Hasher::new(DigestAlgorithm::Sha256)),
                    }),
                };
                let s = Arc::new(session);
                open.insert(id.to_owned(), s.clone());
                s
            }
        };
        drop(open);
        // A session is only ever for the repository it was started in.
        (&*session.registry == registry && &session.repo == repo).then_some(session)
    }

    /// Forgets a session and removes its files (after it finished or was cancelled).
    pub fn remove(&self, id: &str) {
        self.open.lock().remove(id);
        let (data, state) = self.paths(id);
        let _ = std::fs::remove_file(data);
        let _ = std::fs::remove_file(state);
    }

    /// Removes sessions untouched for longer than `ttl`; returns how many.
    pub fn expire(&self, ttl: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut n = 0;
        for e in entries.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !valid_id(&name) {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > ttl);
            // A session in use right now is never expired under its client.
            let busy = self
                .open
                .lock()
                .get(&name)
                .is_some_and(|s| s.sink.try_lock().is_err());
            if old && !busy {
                self.remove(&name);
                n += 1;
            }
        }
        n
    }
}
