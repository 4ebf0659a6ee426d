//! Child processes, free ports, bounded waits and tiny HTTP probes.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where to look for programs besides `$PATH` (root's `PATH` may lack the sbin dirs).
const EXTRA_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The proxy client programs are pointed at: a closed loopback port, so a request meant for
/// a real registry fails at once instead of leaving the machine.
pub const DEAD_PROXY: &str = "http://127.0.0.1:9";

/// Removes the proxy variables and `unset` from `cmd`'s environment, then points
/// `HTTP(S)_PROXY` at [`DEAD_PROXY`], loopback excepted (`NO_PROXY`).
pub fn use_dead_proxy(cmd: &mut Command, unset: &[&str]) {
    let proxies = [
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
        "ALL_PROXY",
    ];
    for var in unset.iter().chain(&proxies) {
        cmd.env_remove(var);
    }
    cmd.env("HTTP_PROXY", DEAD_PROXY)
        .env("HTTPS_PROXY", DEAD_PROXY)
        .env("NO_PROXY", "127.0.0.0/8,localhost");
}

/// The path of executable `name` from `$PATH` or the usual system dirs.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Like [`find_program`], but panics with a hint to run `tests/setup.sh`.
pub fn require_program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| panic!("{name} not found: run tests/setup.sh"))
}

/// A port on 127.0.0.1 that was free a moment ago (bound to :0, then released).
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `127.0.0.1:<free port>`; see [`free_port`].
pub fn free_addr() -> SocketAddr {
    // The kernel may hand the same free port out again once its listener is closed: never
    // return one this process returned before (two calls in a row gave listen and
    // admin_listen the same port in a CI run). Bounded: 100 tries.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let addr = TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0 to find a free port")
            .local_addr()
            .expect("local_addr of a bound listener");
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
    panic!("no port not handed out before in 100 tries")
}

/// One look at a condition that is being waited for.
#[derive(Debug)]
pub enum Probe<T> {
    /// Done: stop waiting.
    Ready(T),
    /// Not yet; the text says why (shown if the wait times out).
    Pending(String),
    /// Will never be ready (e.g. the process exited): stop waiting.
    Failed(String),
}

/// Polls `probe` every 50–250 ms until it is ready, fails, or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Probe<T>,
) -> Result<T, String> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match probe() {
            Probe::Ready(v) => return Ok(v),
            Probe::Failed(why) => return Err(format!("{what}: {why}")),
            Probe::Pending(why) if start.elapsed() >= timeout => {
                return Err(format!("{what}: not ready after {timeout:?}: {why}"));
            }
            Probe::Pending(_) => {}
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Sends `raw` on a new connection to `addr` and returns what came back until the server
/// closed or 5 s passed (lossy UTF-8). The server may close before reading everything; what
/// it sent is the answer then too.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP response (its second word), 0 if there is none.
pub fn status_of(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Status code of `GET path` on `addr` over a fresh HTTP/1.1 connection (2 s timeouts).
pub fn http_status(addr: SocketAddr, path: &str) -> io::Result<u16> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    status_over(stream, &addr.to_string(), path)
}

/// Status code of `GET path` over a unix socket (e.g. dockerd's `/_ping`).
pub(crate) fn unix_http_status(socket: &Path, path: &str) -> io::Result<u16> {
    let stream = UnixStream::connect(socket)?;
    status_over(stream, "localhost", path)
}

fn status_over<S: Read + Write + SetTimeouts>(
    mut stream: S,
    host: &str,
    path: &str,
) -> io::Result<u16> {
    stream.set_timeouts(Duration::from_secs(2))?;
    // One write: `write!` would send each piece separately.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: berth-tests\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > 4096 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .filter(|_| line.starts_with("HTTP/"))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP status line: {line:?}"),
            )
        })
}

trait SetTimeouts {
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}
impl SetTimeouts for TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}
impl SetTimeouts for UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// Makes `cmd`'s child receive `signal` when the spawning thread dies (see the module docs).
fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    let parent = std::process::id();
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

fn display_cmd(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a finished short-lived command printed.
#[derive(Debug)]
pub struct CmdOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// `Ok(stdout)` if the command exited 0, else `Err` naming the command, status and output.
    pub fn into_result(self) -> Result<String, String> {
        if self.status.success() {
            Ok(self.stdout)
        } else {
            Err(format!(
                "`{}` failed ({}):\nstderr: {}\nstdout: {}",
                self.command,
                self.status,
                self.stderr.trim(),
                self.stdout.trim()
            ))
        }
    }
}

/// Runs `cmd` to completion with stdin closed, killing it after `timeout`.
/// `Err` only if it cannot be started or times out (then with what it printed so far).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput, String> {
    let command = display_cmd(cmd);
    let mut out = tempfile::tempfile().expect("anonymous temp file for stdout");
    let mut err = tempfile::tempfile().expect("anonymous temp file for stderr");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone stdout file"))
        .stderr(err.try_clone().expect("clone stderr file"));
    die_with_parent(cmd, libc::SIGKILL);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start `{command}`: {e}"))?;
    let status = wait_child(&mut child, timeout);
    let read_back = |f: &mut File| {
        let mut s = String::new();
        f.seek(SeekFrom::Start(0)).expect("seek temp file");
        f.read_to_string(&mut s).expect("read temp file");
        s
    };
    let (stdout, stderr) = (read_back(&mut out), read_back(&mut err));
    match status {
        Some(status) => Ok(CmdOutput {
            command,
            status,
            stdout,
            stderr,
        }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "`{command}` timed out after {timeout:?}:\nstderr: {}\nstdout: {}",
                stderr.trim(),
                stdout.trim()
            ))
        }
    }
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child") {
            return Some(status);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A long-running child whose stdout and stderr are appended to log files.
/// Dropping it stops it: `SIGTERM`, then `SIGKILL` after `grace`.
#[derive(Debug)]
pub(crate) struct Daemon {
    name: String,
    child: Option<Child>,
    grace: Duration,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` (stdin closed). `stdout_log` and `stderr_log` may be the same file.
    pub(crate) fn spawn(
        name: &str,
        cmd: &mut Command,
        stdout_log: &Path,
        stderr_log: &Path,
        grace: Duration,
    ) -> Daemon {
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open log {}: {e}", p.display()))
        };
        let out = open(stdout_log);
        let err = if stderr_log == stdout_log {
            out.try_clone().expect("clone log file")
        } else {
            open(stderr_log)
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(cmd, libc::SIGTERM);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} (`{}`): {e}", display_cmd(cmd)));
        Daemon {
            name: name.to_owned(),
            child: Some(child),
            grace,
            stdout_log: stdout_log.to_owned(),
            stderr_log: stderr_log.to_owned(),
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Err(exit status)` once the child has exited (it is then reaped and forgotten).
    pub(crate) fn check_running(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{} is not running", self.name));
        };
        match child.try_wait().expect("try_wait on a daemon") {
            None => Ok(()),
            Some(status) => {
                self.child = None;
                Err(format!("{} exited: {status}", self.name))
            }
        }
    }

    /// [`wait_for`] `probe` (`Ok`: ready, `Err`: not yet, and why), failing at once when the
    /// child exits.
    pub(crate) fn wait_ready<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<T, String>,
    ) -> Result<T, String> {
        wait_for(what, timeout, || {
            if let Err(e) = self.check_running() {
                return Probe::Failed(e);
            }
            match probe() {
                Ok(v) => Probe::Ready(v),
                Err(e) => Probe::Pending(e),
            }
        })
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.check_running().is_ok()
    }

    /// Sends `signal` (e.g. `SIGSTOP`, `SIGCONT`) if the child is running.
    pub(crate) fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            signal_pid(pid, signal);
        }
    }

    /// `SIGTERM`, wait up to `grace`, then `SIGKILL`. Returns how it exited, if it was running.
    pub(crate) fn stop(&mut self) -> Option<ExitStatus> {
        let grace = self.grace;
        self.signal(libc::SIGCONT); // a SIGSTOPped child would not act on SIGTERM
        self.terminate(libc::SIGTERM, grace)
    }

    /// `SIGKILL` and reap.
    pub(crate) fn kill(&mut self) -> Option<ExitStatus> {
        self.terminate(libc::SIGKILL, Duration::ZERO)
    }

    fn terminate(&mut self, signal: libc::c_int, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(status) = child.try_wait().expect("try_wait on a daemon") {
            return Some(status);
        }
        signal_pid(child.id(), signal);
        if signal == libc::SIGKILL {
            return child.wait().ok();
        }
        if let Some(status) = wait_child(&mut child, grace) {
            return Some(status);
        }
        eprintln!(
            "{} (pid {}) still running {grace:?} after signal {signal}: SIGKILL",
            self.name,
            child.id()
        );
        let _ = child.kill();
        child.wait().ok()
    }

    /// The whole stdout log (and the stderr log, if it is another file).
    pub(crate) fn logs(&self) -> String {
        let mut s = std::fs::read_to_string(&self.stdout_log).unwrap_or_default();
        if self.stderr_log != self.stdout_log {
            s.push_str(&std::fs::read_to_string(&self.stderr_log).unwrap_or_default());
        }
        s
    }

    /// The last `n` lines of [`Daemon::logs`], headed with the daemon's name.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        format!(
            "----- {} log (last {n} lines) -----\n{tail}\n-----",
            self.name
        )
    }
}

/// Only for PIDs of our own children that are not yet reaped (so not reused).
fn signal_pid(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(40));
        }
        self.stop();
    }
}

/// A private temp dir under `/tmp` (not `$TMPDIR`: unix socket paths must stay < 108 bytes).
pub(crate) fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create a temp dir in /tmp")
}

/// The body of `GET path` on `addr` (HTTP/1.1, `Connection: close`, read to the end; the
/// server must answer with a Content-Length body, as berth's admin endpoints do).
pub fn http_get_text(addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_timeouts(Duration::from_secs(5))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut all = Vec::new();
    stream.read_to_end(&mut all)?;
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no end of headers"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("GET {path}: {head}")));
    }
    Ok(body.to_owned())
}
