//! A log writer for one line per request at high request rates: lines are appended to an
//! in-memory buffer and a background thread writes the buffer out every few milliseconds, so
//! logging a request costs a short copy under a lock instead of a thread wake-up per line
//! (what a channel-based writer pays). The buffer is bounded: past `MAX_PENDING` the logging
//! thread writes the buffer itself, which slows requests rather than growing memory.

use std::io::{self, Write};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use std::time::Duration;

const FLUSH_EVERY: Duration = Duration::from_millis(20);
const MAX_PENDING: usize = 1024 * 1024;

#[derive(Default)]
struct Shared {
    buf: Mutex<(Vec<u8>, bool)>,
    wake: Condvar,
}

/// A `MakeWriter` for tracing-subscriber that batches lines to stdout.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Flushes what is pending and stops the writer thread when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BatchWriter {
    pub fn stdout() -> (BatchWriter, FlushGuard) {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("berth-log".into())
            .spawn(move || {
                let mut out = Vec::new();
                loop {
                    let stop = {
                        let mut guard = s.buf.lock();
                        s.wake.wait_for(&mut guard, FLUSH_EVERY);
                        std::mem::swap(&mut guard.0, &mut out);
                        guard.1
                    };
                    if !out.is_empty() {
                        let _ = io::stdout().lock().write_all(&out);
                        out.clear();
                    }
                    if stop {
                        return;
                    }
                }
            })
            .ok();
        (
            BatchWriter {
                shared: shared.clone(),
            },
            FlushGuard { shared, thread },
        )
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        {
            let mut g = self.shared.buf.lock();
            g.1 = true;
        }
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut g = self.shared.buf.lock();
        if g.0.len() + data.len() > MAX_PENDING {
            // The writer thread cannot keep up (or is gone): write it out here.
            let mut out = io::stdout().lock();
            out.write_all(&g.0)?;
            g.0.clear();
            out.write_all(data)?;
            return Ok(data.len());
        }
        g.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
