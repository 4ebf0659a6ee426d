//! A log writer for one line per request at high request rates: lines are appended to an
//! in-memory buffer and a background thread, woken by the first line of a batch, writes the
//! buffer out a few milliseconds later, so logging a request costs a short copy under a lock
//! instead of a thread wake-up per line (what a channel-based writer pays), and an idle server
//! wakes the thread not at all. The buffer is bounded: past `MAX_PENDING` the logging thread
//! writes the buffer itself, which slows requests rather than growing memory.

use std::io::{self, Write};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use std::time::Duration;

const FLUSH_EVERY: Duration = Duration::from_millis(20);
const MAX_PENDING: usize = 1024 * 1024;

struct Shared {
    /// Lines not yet written, and whether the writer thread is to stop.
    buf: Mutex<(Vec<u8>, bool)>,
    wake: Condvar,
    /// Where lines go; locked by the writer thread while it writes a batch, and by a logging
    /// thread that finds the buffer full.
    sink: Mutex<Box<dyn Write + Send>>,
}

/// A `MakeWriter` for tracing-subscriber that batches lines to stdout (or another sink).
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
        BatchWriter::to(io::stdout())
    }

    /// A writer batching to `sink` (stdout in berth; a buffer in tests).
    pub fn to(sink: impl Write + Send + 'static) -> (BatchWriter, FlushGuard) {
        let shared = Arc::new(Shared {
            buf: Mutex::new((Vec::new(), false)),
            wake: Condvar::new(),
            sink: Mutex::new(Box::new(sink)),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("berth-log".into())
            .spawn(move || {
                let mut out = Vec::new();
                loop {
                    // Asleep until a line arrives (an idle server wakes this thread for
                    // nothing), then a short wait so that one write carries every line
                    // logged meanwhile.
                    {
                        let mut guard = s.buf.lock();
                        while guard.0.is_empty() && !guard.1 {
                            s.wake.wait(&mut guard);
                        }
                    }
                    std::thread::sleep(FLUSH_EVERY);
                    let stop = {
                        let mut guard = s.buf.lock();
                        std::mem::swap(&mut guard.0, &mut out);
                        guard.1
                    };
                    if !out.is_empty() {
                        let mut sink = s.sink.lock();
                        let _ = sink.write_all(&out).and_then(|()| sink.flush());
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
            let mut out = self.shared.sink.lock();
            out.write_all(&g.0)?;
            g.0.clear();
            out.write_all(data)?;
            out.flush()?;
            return Ok(data.len());
        }
        let was_empty = g.0.is_empty();
        g.0.extend_from_slice(data);
        drop(g);
        // The first line of a batch wakes the writer; later ones find it already awake.
        if was_empty {
            self.shared.wake.notify_one();
        }
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

/// The log filter for `RUST_LOG` (`None`: unset): `info` unless it says otherwise. Directives
/// for some targets only (`berth::access=warn`) keep `info` for everything else; a value that
/// does not parse falls back to `info`, with the warning to log returned beside it.
pub fn env_filter(rust_log: Option<&str>) -> (tracing_subscriber::EnvFilter, Option<String>) {
    use tracing_subscriber::filter::LevelFilter;
    let info = || tracing_subscriber::EnvFilter::new("info");
    let Some(value) = rust_log.map(str::trim).filter(|v| !v.is_empty()) else {
        return (info(), None);
    };
    let has_global = value
        .split(',')
        .any(|d| d.trim().parse::<LevelFilter>().is_ok());
    let directives = if has_global {
        value.to_owned()
    } else {
        format!("info,{value}")
    };
    match tracing_subscriber::EnvFilter::builder().parse(&directives) {
        Ok(filter) => (filter, None),
        Err(e) => (
            info(),
            Some(format!(
                "RUST_LOG={value:?} is not a valid filter ({e}); logging at info"
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::BatchWriter;
    use std::io::Write;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[derive(Clone, Default)]
    struct Sink(Arc<parking_lot::Mutex<(Vec<u8>, usize)>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut g = self.0.lock();
            g.0.extend_from_slice(b);
            g.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_batches_and_the_guard_flushes_the_rest() {
        let sink = Sink::default();
        let (mut w, guard) = BatchWriter::to(sink.clone());
        for i in 0..100 {
            writeln!(w, "line {i}").unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.0.lock().0.len() < 100 * 7 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (text, writes) = {
            let g = sink.0.lock();
            (String::from_utf8_lossy(&g.0).into_owned(), g.1)
        };
        assert!(
            text.starts_with("line 0\nline 1\n") && text.ends_with("line 99\n"),
            "{text}"
        );
        // One write per batch, not per line.
        assert!(writes < 10, "{writes} writes for 100 lines");
        // Idle: nothing more is written.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(sink.0.lock().1, writes);
        // A line logged just before shutdown is not lost.
        writeln!(w, "last").unwrap();
        drop(guard);
        assert!(String::from_utf8_lossy(&sink.0.lock().0).ends_with("line 99\nlast\n"));
    }
}

#[cfg(test)]
mod filter_tests {
    use super::env_filter;
    use std::sync::Arc;

    /// The lines logged under `rust_log` by a few events of different targets and levels.
    fn logged(rust_log: Option<&str>) -> (String, Option<String>) {
        #[derive(Clone, Default)]
        struct Capture(Arc<parking_lot::Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Capture::default();
        let (filter, warning) = env_filter(rust_log);
        let writer = out.clone();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(target: "berth::app", "started");
            tracing::debug!(target: "berth::app", "detail");
            tracing::info!(target: "berth::access", "request");
            tracing::warn!(target: "berth::access", "slow request");
        });
        let text = String::from_utf8_lossy(&out.0.lock()).into_owned();
        (text, warning)
    }

    #[test]
    fn unset_logs_info() {
        let (text, warning) = logged(None);
        assert!(
            text.contains("started") && text.contains("access: request"),
            "{text}"
        );
        assert!(!text.contains("detail"), "{text}");
        assert_eq!(warning, None);
    }

    #[test]
    fn a_target_directive_keeps_info_for_the_rest() {
        let (text, warning) = logged(Some("berth::access=warn"));
        assert!(text.contains("started"), "{text}");
        assert!(!text.contains("access: request"), "{text}");
        assert!(text.contains("slow request"), "{text}");
        assert_eq!(warning, None);
        // A global level given explicitly is kept.
        let (text, _) = logged(Some("warn,berth::app=debug"));
        assert!(
            text.contains("detail") && !text.contains("access: request"),
            "{text}"
        );
        assert!(text.contains("slow request"), "{text}");
    }

    #[test]
    fn a_malformed_value_warns_and_logs_info() {
        let (text, warning) = logged(Some("berth=loud"));
        assert!(
            text.contains("started") && text.contains("access: request"),
            "{text}"
        );
        assert!(warning.is_some_and(|w| w.contains("berth=loud")));
    }
}
