//! Hostile clients: oversized and malformed request heads, slowloris, connection floods,
//! smuggling attempts. Each sends the abuse over raw TCP, checks the refusal (4xx or a closed
//! connection), and checks that berth keeps serving others.

mod fake_upstream;
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_upstream::FakeUpstream;
use support::{InProc, InProcConfig, exchange, status_of};

/// berth before an upstream with `library/app:v1`; `extra` goes into `[server]`.
async fn start(extra: &str) -> (InProc, FakeUpstream) {
    let up = FakeUpstream::start().await;
    let layer = up.add_blob(Bytes::from_static(b"layer"));
    let cfg = up.add_blob(Bytes::from_static(b"{}"));
    up.add_image("library/app", "v1", &cfg, &[layer]);
    let config = InProcConfig::mirror_of(&up.url(), "probe_interval = \"0s\"")
        .server("header_read_timeout = \"1s\"")
        .server(extra);
    (InProc::start(&config).await, up)
}

/// berth still answers an ordinary request.
fn still_serving(addr: SocketAddr) {
    let r = exchange(
        addr,
        b"GET /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&r), 200, "berth stopped serving: {r}");
}

fn blocking<F: FnOnce() + Send + 'static>(f: F) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_heads_are_refused() {
    let (b, up) = start("").await;
    let addr = b.addr();
    blocking(move || {
        let big = format!(
            "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let r = exchange(addr, big.as_bytes());
        assert!(status_of(&r) == 431 || r.is_empty(), "huge header: {r:.200}");

        let mut many = String::from("GET /v2/ HTTP/1.1\r\nHost: x\r\n");
        for i in 0..150 {
            many.push_str(&format!("X-H{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let r = exchange(addr, many.as_bytes());
        assert!(status_of(&r) == 431 || r.is_empty(), "150 headers: {r:.200}");

        let long = format!(
            "GET /v2/{}/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "a/".repeat(5000) + "a"
        );
        assert_eq!(status_of(&exchange(addr, long.as_bytes())), 414);

        // Conflicting framing (request smuggling): either refused, or answered once with the
        // connection closed, so the smuggled request behind it is never served.
        let r = exchange(
            addr,
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v2/_catalog HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
        assert!(status_of(&r) == 400 || r.contains("connection: close"), "{r}");
        assert!(!r.contains("repositories"), "the smuggled request was served: {r}");
        let cases: &[(&[u8], u16)] = &[
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 7\r\n\r\n", 400),
            // NUL and spaces in the target.
            (b"GET /v2/a\0b/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            // Encoded slashes and dot segments in names.
            (b"GET /v2/library%2fapp/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
            (b"GET /v2/library/../app/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
            (b"GET /v2/library/%2e%2e/blobs/sha256:00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
            // Not HTTP at all.
            (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
        ];
        for (raw, want) in cases {
            let r = exchange(addr, raw);
            let got = status_of(&r);
            assert!(got == *want || r.is_empty(), "{:?}: got {r:.200}", String::from_utf8_lossy(raw));
        }
        // Absolute-form: the authority is ignored; only configured upstreams are contacted.
        let r = exchange(
            addr,
            b"GET http://evil.example/v2/library/app/manifests/v1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status_of(&r), 200, "{r:.300}");
        // A push with a huge announced body is refused without reading it.
        let started = Instant::now();
        let r = exchange(
            addr,
            b"PUT /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n",
        );
        assert_eq!(status_of(&r), 405, "{r:.200}");
        assert!(started.elapsed() < Duration::from_secs(3));
        still_serving(addr);
    })
    .await
    .expect("blocking part");
    assert!(up.requests().iter().all(|r| !r.contains("evil")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_and_others_are_served() {
    let (b, _up) = start("").await;
    let addr = b.addr();
    blocking(move || {
        // A head that never completes: closed after header_read_timeout (1 s).
        let started = Instant::now();
        let mut slow = TcpStream::connect(addr).expect("connect");
        slow.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
            .expect("write");
        // Trickle a byte now and then; it must not keep the connection alive forever.
        let mut closed = false;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(250));
            still_serving(addr);
            if slow.write_all(b"X").is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 512];
            slow.set_nonblocking(true).expect("nonblocking");
            match slow.read(&mut buf) {
                Ok(_) => {
                    closed = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            slow.set_nonblocking(false).expect("blocking");
        }
        assert!(closed, "a slowloris connection stayed open");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}",
            started.elapsed()
        );
        // An idle connection that never sends anything is closed too.
        let mut idle = TcpStream::connect(addr).expect("connect");
        idle.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let n = idle.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "idle connection got data");
        assert!(started.elapsed() < Duration::from_secs(3));
    })
    .await
    .expect("blocking part");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_client_are_capped() {
    let (b, _up) = start("max_connections_per_client = 4").await;
    let addr = b.addr();
    blocking(move || {
        // Four open keep-alive connections, each having made a request.
        let mut open: Vec<TcpStream> = (0..4)
            .map(|_| {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                    .expect("write");
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).expect("response");
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
                s
            })
            .collect();
        // The fifth is told 503 with Retry-After and closed at once, unserved.
        let mut fifth = TcpStream::connect(addr).expect("connect");
        fifth
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let _ = fifth.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut answer = Vec::new();
        let _ = fifth.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 503 ") && answer.contains("retry-after: 1\r\n"),
            "fifth connection: {answer}"
        );
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
        assert!(answer.contains("UNAVAILABLE"), "{answer}");
        // Closing one frees a slot.
        drop(open.pop());
        std::thread::sleep(Duration::from_millis(200));
        still_serving(addr);
    })
    .await
    .expect("blocking part");
}
