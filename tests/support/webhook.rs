//! A webhook receiver on loopback: a tiny HTTP/1.1 server (std::net, one thread per
//! connection) that answers every request `200 OK` and records its method, path, headers and
//! body, for checking the notification envelopes berth sends (`[[notify]]`). With
//! [`Webhook::start_answering`] it answers as a function of the request instead (a fake
//! token endpoint: a cloud's metadata server, Azure's IMDS or its authority host).
//!
//! Bounded: the accept loop polls a stop flag (set on drop) every 20 ms and gives up after
//! [`LIFETIME`]; each connection handles at most [`MAX_REQUESTS`] requests and times out
//! reading after 30 s idle; a body larger than [`MAX_BODY`] closes the connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::process::{Probe, wait_for};

/// How long the receiver runs at most.
const LIFETIME: Duration = Duration::from_secs(900);
/// Requests served on one connection at most.
const MAX_REQUESTS: usize = 10_000;
/// The largest body accepted.
const MAX_BODY: usize = 16 << 20;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub method: String,
    /// The request target: path and query.
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "webhook body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// What a [`Webhook`] answers a request: status and JSON body.
pub type Answer = Arc<dyn Fn(&Delivery) -> (u16, String) + Send + Sync>;

/// A running receiver; stops (and joins its accept thread) on drop.
#[derive(Debug)]
pub struct Webhook {
    addr: SocketAddr,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Webhook {
    /// Listens on `127.0.0.1:<free port>`, answering `200 OK` with no body.
    pub fn start() -> Webhook {
        Webhook::start_answering(|_| (200, String::new()))
    }

    /// Listens on `127.0.0.1:<free port>`, answering each request with `answer(request)`
    /// (status, JSON body); requests are recorded before they are answered.
    pub fn start_answering(
        answer: impl Fn(&Delivery) -> (u16, String) + Send + Sync + 'static,
    ) -> Webhook {
        let answer: Answer = Arc::new(answer);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook receiver");
        listener
            .set_nonblocking(true)
            .expect("nonblocking webhook listener");
        let addr = listener.local_addr().expect("webhook address");
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (deliveries, stop) = (deliveries.clone(), stop.clone());
            std::thread::spawn(move || accept_loop(listener, deliveries, stop, answer))
        };
        Webhook {
            addr,
            deliveries,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/hook`, the URL for `[[notify]]`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().expect("deliveries lock").clone()
    }

    /// Forgets what was received.
    pub fn clear(&self) {
        self.deliveries.lock().expect("deliveries lock").clear();
    }

    /// Waits (bounded by `timeout`) until a delivered envelope has an event for which `pred`
    /// holds; returns that delivery and the event. Deliveries are asynchronous: berth queues
    /// them and never makes a request wait for one.
    pub fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(Delivery, serde_json::Value), String> {
        wait_for(what, timeout, || {
            let found = self.deliveries().into_iter().find_map(|d| {
                let v: serde_json::Value = serde_json::from_slice(&d.body).ok()?;
                let e = v["events"].as_array()?.iter().find(|e| pred(e))?.clone();
                Some((d, e))
            });
            match found {
                Some(f) => Probe::Ready(f),
                None => Probe::Pending(format!("{} deliveries so far", self.deliveries().len())),
            }
        })
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    stop: Arc<AtomicBool>,
    answer: Answer,
) {
    let started = Instant::now();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < LIFETIME {
        match listener.accept() {
            Ok((stream, _)) => {
                let (deliveries, answer) = (deliveries.clone(), answer.clone());
                // Connection threads end when the client closes or after 30 s idle.
                std::thread::spawn(move || serve(stream, &deliveries, &*answer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve(
    stream: TcpStream,
    deliveries: &Mutex<Vec<Delivery>>,
    answer: &(dyn Fn(&Delivery) -> (u16, String) + Send + Sync),
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    for _ in 0..MAX_REQUESTS {
        let Some(delivery) = read_request(&mut reader) else {
            return;
        };
        let (status, body) = answer(&delivery);
        deliveries.lock().expect("deliveries lock").push(delivery);
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(body.as_bytes()).is_err()
        {
            return;
        }
    }
}

/// One request with a `content-length` body (berth's client sends no chunked bodies);
/// `None` at end of stream, on a timeout or on anything malformed.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Delivery> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = Vec::new();
    for _ in 0..200 {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':')?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(Some(0), |(_, v)| v.parse().ok())?;
    if len > MAX_BODY {
        return None;
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Delivery {
        method,
        path,
        headers,
        body,
    })
}
