//! A transparent TCP relay on 127.0.0.1 that records the HTTP/1.1 requests passing through it.
//!
//! Clients are pointed at the [`Recorder`] instead of berth; every byte is relayed unchanged
//! both ways, and the head of each request (method, path, query, headers) is kept, so a test
//! can assert what a real client actually sends (`?ns=`, path prefixes, `Accept`, `Range`).
//! Request bodies are skipped by `Content-Length` (registry pulls have none); responses are not
//! parsed. HTTP/2 (or TLS) would not be understood: clients here speak plain HTTP/1.1.
//! A request is recorded before its last byte is forwarded, so once a client has its answer,
//! [`Recorder::requests`] lists the request.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request head as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, as on the request line.
    pub uri: String,
    /// `uri` without the query.
    pub path: String,
    /// The query (without `?`), if any.
    pub query: Option<String>,
    /// Header names lowercased, in the order sent.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All values of header `name`, joined with ", " (as HTTP allows).
    pub fn header_all(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// The value of query parameter `key` (not percent-decoded), if present.
    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then_some(v)
        })
    }

    /// `?ns=` as containerd sends it to a mirror.
    pub fn ns(&self) -> Option<&str> {
        self.query_param("ns")
    }

    /// One line for reports: `GET /v2/…?ns=… accept=… range=…`.
    pub fn summary(&self) -> String {
        let mut s = format!("{} {}", self.method, self.uri);
        for h in ["accept", "range"] {
            if let Some(v) = self.header_all(h) {
                s.push_str(&format!(" {h}={v:?}"));
            }
        }
        s
    }
}

#[derive(Debug, Default)]
struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    /// Both ends of every relayed connection, shut down on drop.
    streams: Mutex<Vec<TcpStream>>,
    stopping: AtomicBool,
}

/// A running relay `127.0.0.1:<free port>` → `target`.
#[derive(Debug)]
pub struct Recorder {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Listens on a free loopback port and relays each connection to `target`.
    pub fn start(target: SocketAddr) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("recorder: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("recorder: local_addr");
        let shared = Arc::new(Shared::default());
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("recorder-accept".into())
                .spawn(move || accept_loop(listener, target, shared))
                .expect("spawn recorder thread")
        };
        Recorder {
            addr,
            target,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Every request head seen so far, in arrival order (per connection; connections
    /// interleave).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().expect("recorder lock").clone()
    }

    /// Forgets the requests recorded so far.
    pub fn clear(&self) {
        self.shared.requests.lock().expect("recorder lock").clear();
    }

    /// [`RecordedRequest::summary`] of every request, one a line.
    pub fn summary(&self) -> String {
        self.requests()
            .iter()
            .map(RecordedRequest::summary)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for s in self.shared.streams.lock().expect("recorder lock").iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut streams = shared.streams.lock().expect("recorder lock");
            for s in [&client, &server] {
                if let Ok(c) = s.try_clone() {
                    streams.push(c);
                }
            }
        }
        let (Ok(client_w), Ok(server_r)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        // server → client: raw copy.
        let _ = std::thread::Builder::new()
            .name("recorder-down".into())
            .spawn(move || {
                let (mut from, mut to) = (server_r, client_w);
                let _ = io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            });
        // client → server: copy, parsing request heads on the way.
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("recorder-up".into())
            .spawn(move || relay_requests(client, server, &shared));
    }
}

fn relay_requests(mut client: TcpStream, mut server: TcpStream, shared: &Shared) {
    let mut pending: Vec<u8> = Vec::new();
    let mut skip_body: usize = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Record first, then forward: a request is on the list before berth can answer it.
        let mut data = &buf[..n];
        if skip_body > 0 {
            let k = skip_body.min(data.len());
            skip_body -= k;
            data = &data[k..];
        }
        pending.extend_from_slice(data);
        while skip_body == 0 {
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                break;
            };
            let head: Vec<u8> = pending.drain(..end + 4).collect();
            if let Some(req) = parse_head(&head) {
                let len = req
                    .header("content-length")
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                shared.requests.lock().expect("recorder lock").push(req);
                let k = len.min(pending.len());
                pending.drain(..k);
                skip_body = len - k;
            }
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}

fn parse_head(head: &[u8]) -> Option<RecordedRequest> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let uri = request_line.next()?.to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (uri.clone(), None),
    };
    Some(RecordedRequest {
        method,
        uri,
        path,
        query,
        headers,
    })
}
