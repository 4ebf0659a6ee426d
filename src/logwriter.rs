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
