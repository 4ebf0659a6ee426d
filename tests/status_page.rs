//! The status page (`GET /` on the admin listener) in a real headless Chromium: berth
//! in-process before a fake upstream, with a hosted registry two blobs are pushed to; images
//! pulled through it (some twice, for hits; more than `max_size`, for evictions); then
//! Chromium loads the page (`--dump-dom` and `--screenshot`) and every number in the DOM is
//! checked against `/metrics` read at the same moment (before and after Chromium, unchanged),
//! and against what the test itself pulled and pushed. The screenshot is kept as
//! `target/status-page.png`.
//!
//! Chromium (Debian's `chromium`, installed by tests/setup.sh) is required: a missing one fails
//! the test.

mod fake_upstream;
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_upstream::FakeUpstream;
use support::{InProc, InProcConfig, require_program, sample, seeded_bytes, try_sample};

/// The longest one Chromium run may take before it is killed.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// One image in the fake upstream: its repository, tag, manifest and blobs (config first).
struct TestImage {
    repo: &'static str,
    tag: &'static str,
    manifest: Bytes,
    blobs: Vec<(String, usize)>,
}

fn add_image(
    up: &FakeUpstream,
    repo: &'static str,
    tag: &'static str,
    layers: &[(usize, u8)],
) -> TestImage {
    let config = Bytes::from(format!(
        r#"{{"architecture":"amd64","os":"linux","repo":"{repo}"}}"#
    ));
    let config_len = config.len();
    let config_digest = up.add_blob(config);
    let mut blobs = vec![(config_digest.clone(), config_len)];
    let mut layer_digests = Vec::new();
    for &(size, seed) in layers {
        let d = up.add_blob(Bytes::from(seeded_bytes(size, seed)));
        layer_digests.push(d.clone());
        blobs.push((d, size));
    }
    let (_, manifest) = up.add_image(repo, tag, &config_digest, &layer_digests);
    TestImage {
        repo,
        tag,
        manifest,
        blobs,
    }
}

/// Pulls `img` through berth as a client does (manifest by tag, then every blob); returns the
/// bytes received.
async fn pull(berth: &InProc, img: &TestImage) -> u64 {
    let r = berth
        .client()
        .get(format!(
            "{}/v2/{}/manifests/{}",
            berth.url(),
            img.repo,
            img.tag
        ))
        .header("accept", MANIFEST_TYPE)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(r.status(), 200, "manifest of {}", img.repo);
    let body = r.bytes().await.expect("manifest body");
    assert_eq!(body, img.manifest, "manifest of {}", img.repo);
    let mut total = body.len() as u64;
    for (digest, len) in &img.blobs {
        let r = berth.get(&format!("/v2/{}/blobs/{digest}", img.repo)).await;
        assert_eq!(r.status(), 200, "blob {digest} of {}", img.repo);
        let body = r.bytes().await.expect("blob body");
        assert_eq!(body.len(), *len, "blob {digest} of {}", img.repo);
        total += body.len() as u64;
    }
    total
}

/// The berth_ series of a metrics text that a scrape may not change (the process_ metrics do).
fn berth_lines(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| l.starts_with("berth_"))
        .collect()
}

/// Reads `/metrics` until two reads agree and `ready(text)` holds (a request's bytes are
/// counted just after its response ends); at most 10 s.
async fn settled_metrics(berth: &InProc, ready: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    let mut last = berth.metrics_text().await;
    for _ in 0..500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = berth.metrics_text().await;
        if berth_lines(&now) == berth_lines(&last) && ready(&now) {
            return now;
        }
        last = now;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "metrics did not settle within 10 s:\n{last}"
        );
    }
    panic!("metrics did not settle:\n{last}");
}

/// Runs Chromium headless with `args` then `url`, in a process group of its own (killed whole
/// after [`CHROMIUM_TIMEOUT`], and swept of leftover helpers when it exits); returns stdout.
fn chromium(program: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    use std::os::unix::process::CommandExt;
    let out_path = profile.join("stdout");
    let err_path = profile.join("stderr");
    let out = std::fs::File::create(&out_path).expect("chromium stdout file");
    let err = std::fs::File::create(&err_path).expect("chromium stderr file");
    let mut cmd = Command::new(program);
    cmd.args([
        "--headless",
        // berth's tests run as root, where Chromium refuses its sandbox.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--hide-scrollbars",
        // Loopback only: anything else goes to a proxy that is not there.
        "--proxy-server=http://127.0.0.1:9",
        &format!("--user-data-dir={}", profile.join("profile").display()),
    ])
    .args(args)
    .arg(url)
    .env("HOME", profile)
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err)
    .process_group(0);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let pgid = child.id() as libc::pid_t;
    let kill_group = || {
        // SAFETY: kill(2) on the process group this test made (its leader is our child).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    };
    let mut status: Option<ExitStatus> = None;
    while started.elapsed() < CHROMIUM_TIMEOUT {
        if let Some(s) = child.try_wait().expect("try_wait on chromium") {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its helpers (zygote, renderer) exit with it; whatever did not goes now.
    kill_group();
    // Reaped in every case (after the kill, if it timed out).
    let reaped = child.wait();
    if status.is_none() {
        eprintln!("chromium killed after {CHROMIUM_TIMEOUT:?}: {reaped:?}");
    }
    // Its crash handlers leave the group (they make their own) and exit shortly after the
    // browser; they are the processes naming this run's own directory. Waited for (at most
    // 5 s), then killed by PID, so none outlives the test.
    let marker = profile.display().to_string();
    let sweep = Instant::now();
    loop {
        // SAFETY: signal 0 only asks whether the group still has a member.
        let group_left = unsafe { libc::kill(-pgid, 0) } == 0;
        let strays = processes_naming(&marker);
        if !group_left && strays.is_empty() {
            break;
        }
        if sweep.elapsed() >= Duration::from_secs(5) {
            for pid in strays {
                eprintln!("killing chromium helper {pid}, still running 5 s after chromium");
                // SAFETY: kill(2) on a process whose command line names this run's directory.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    eprintln!("[timing] chromium {args:?}: {:.2?}", started.elapsed());
    match status {
        None => panic!(
            "chromium timed out after {CHROMIUM_TIMEOUT:?}\nstderr: {stderr}\nstdout: {stdout}"
        ),
        Some(s) if !s.success() => {
            panic!("chromium failed ({s})\nstderr: {stderr}\nstdout: {stdout}")
        }
        Some(_) => stdout,
    }
}

/// The processes whose command line contains `marker` (this test's Chromium run's directory).
fn processes_naming(marker: &str) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

/// One start tag of the DOM: its name, attributes, and the text right after it (up to the
/// next tag).
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: HashMap<String, String>,
    text: String,
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The start tags of `html` as Chromium serializes a DOM (attribute values double-quoted),
/// except those inside `<style>`.
fn tags(html: &str) -> Vec<Tag> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        rest = &rest[lt + 1..];
        if rest.starts_with('/') || rest.starts_with('!') {
            continue;
        }
        let name_end = rest
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .unwrap_or(rest.len());
        let name = rest[..name_end].to_ascii_lowercase();
        let mut attrs = HashMap::new();
        let mut s = &rest[name_end..];
        loop {
            s = s.trim_start_matches(|c: char| c.is_whitespace() || c == '/');
            if s.is_empty() || s.starts_with('>') {
                break;
            }
            let key_end = s
                .find(|c: char| c == '=' || c == '>' || c.is_whitespace())
                .unwrap_or(s.len());
            let key = s[..key_end].to_ascii_lowercase();
            s = &s[key_end..];
            let value = if let Some(v) = s.strip_prefix("=\"") {
                let end = v.find('"').unwrap_or(v.len());
                s = &v[(end + 1).min(v.len())..];
                unescape(&v[..end])
            } else {
                String::new()
            };
            attrs.insert(key, value);
        }
        let after = s.strip_prefix('>').unwrap_or(s);
        let text_end = after.find('<').unwrap_or(after.len());
        let text = unescape(&after[..text_end]);
        rest = after;
        if name == "style"
            && let Some(end) = rest.find("</style>")
        {
            rest = &rest[end..];
        }
        out.push(Tag { name, attrs, text });
    }
    out
}

struct Dom {
    tags: Vec<Tag>,
}

impl Dom {
    fn by_id(&self, id: &str) -> &Tag {
        self.tags
            .iter()
            .find(|t| t.attrs.get("id").is_some_and(|v| v == id))
            .unwrap_or_else(|| panic!("no element #{id} in the DOM"))
    }

    /// The `data-value` of `#id`, as a number.
    fn value(&self, id: &str) -> f64 {
        data_num(self.by_id(id), "data-value")
    }

    fn with_class(&self, class: &str) -> Vec<&Tag> {
        self.tags
            .iter()
            .filter(|t| {
                t.attrs
                    .get("class")
                    .is_some_and(|c| c.split_whitespace().any(|c| c == class))
            })
            .collect()
    }
}

fn data_num(t: &Tag, attr: &str) -> f64 {
    let v = t
        .attrs
        .get(attr)
        .unwrap_or_else(|| panic!("<{}> has no {attr}: {:?}", t.name, t.attrs));
    v.parse()
        .unwrap_or_else(|e| panic!("{attr}={v:?} of <{}> is not a number: {e}", t.name))
}

/// Where this build's artifacts go: `$CARGO_TARGET_DIR`, or `target/` of the crate.
fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => manifest.join(d),
        None => manifest.join("target"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_shows_the_numbers_of_metrics() {
    let started = Instant::now();
    let program = require_program("chromium");

    let up = FakeUpstream::start().await;
    let alpine = add_image(
        &up,
        "library/alpine",
        "3.20",
        &[(150 * 1024, 1), (150 * 1024, 2)],
    );
    let busybox = add_image(&up, "library/busybox", "latest", &[(100 * 1024, 3)]);
    let app = add_image(
        &up,
        "team/app",
        "v1",
        &[(250 * 1024, 4), (250 * 1024, 5), (250 * 1024, 6)],
    );
    // 1 MiB of cache for 1.1 MiB of images: pulling the last one evicts.
    let config = InProcConfig::mirror_of(&up.url(), "probe_interval = \"0s\"")
        .cache("max_size = \"1MiB\"")
        .table("[[hosted]]\nname = \"local\"\nrepositories = [\"ci/*\"]\n");
    let berth = InProc::start(&config).await;

    // Two blobs pushed to the hosted registry.
    let mut hosted_bytes = 0;
    for (n, seed) in [(3000, 7u8), (5000, 8)] {
        let data = seeded_bytes(n, seed);
        let r = berth
            .client()
            .post(format!(
                "{}/v2/ci/tool/blobs/uploads/?digest={}",
                berth.url(),
                fake_upstream::sha256(&data)
            ))
            .body(data)
            .send()
            .await
            .expect("push a blob");
        assert_eq!(r.status(), 201, "monolithic push: {:?}", r.text().await);
        hosted_bytes += n;
    }

    let mut from_upstream = 0;
    let mut from_cache = 0;
    from_upstream += pull(&berth, &alpine).await;
    from_upstream += pull(&berth, &busybox).await;
    from_cache += pull(&berth, &alpine).await;
    from_cache += pull(&berth, &busybox).await;
    from_upstream += pull(&berth, &app).await;

    // A pinned image (not cached: its pin covers it once it is).
    let pin = format!(
        "{}/admin/pin?image=docker.io/library/pinned-later:1",
        berth.admin_url()
    );
    let r = berth.client().post(&pin).send().await.expect("pin");
    assert_eq!(r.status(), 200);

    // Every blob filled: in the cache, or in it and evicted since (a fill commits just after
    // its last byte went out).
    let blob_count = [&alpine, &busybox, &app]
        .iter()
        .map(|i| i.blobs.len())
        .sum::<usize>() as f64;
    let metrics = settled_metrics(&berth, |m| {
        sample(m, r#"berth_served_bytes_total{source="upstream"}"#) == from_upstream as f64
            && sample(m, r#"berth_served_bytes_total{source="cache"}"#) == from_cache as f64
            && sample(m, "berth_fills_in_flight") == 0.0
            && sample(m, "berth_cache_blobs") + sample(m, "berth_cache_evictions_total")
                == blob_count
    })
    .await;
    let evictions = sample(&metrics, "berth_cache_evictions_total");
    assert!(evictions >= 1.0, "nothing was evicted:\n{metrics}");

    // The page as any client gets it: HTML, no script or outside asset allowed.
    let url = format!("{}/", berth.admin_url());
    let r = berth.client().get(&url).send().await.expect("GET /");
    assert_eq!(r.status(), 200);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert!(
        header("content-security-policy").starts_with("default-src 'none'"),
        "{}",
        header("content-security-policy")
    );
    let served = r.text().await.expect("page");
    assert!(served.contains(r#"<meta http-equiv="refresh" content="5">"#));
    let r = berth.client().post(&url).send().await.expect("POST /");
    assert_eq!(r.status(), 405, "the status page only reads");

    let work = tempfile::tempdir().expect("tempdir");
    let dom_text =
        tokio::task::block_in_place(|| chromium(&program, work.path(), &["--dump-dom"], &url));
    let after = berth.metrics_text().await;
    assert_eq!(
        berth_lines(&metrics),
        berth_lines(&after),
        "the metrics changed while Chromium read the page"
    );

    let shot = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::block_in_place(|| {
        chromium(
            &program,
            work.path(),
            &[
                &format!("--screenshot={}", shot.display()),
                "--window-size=1200,1600",
            ],
            &url,
        )
    });

    let lower = dom_text.to_ascii_lowercase();
    assert!(lower.contains("<title>berth status</title>"), "{dom_text}");
    for banned in ["<script", "<link", "<img", "<iframe", "src=", "url("] {
        assert!(
            !lower.contains(banned),
            "the page has {banned}:\n{dom_text}"
        );
    }
    let dom = Dom {
        tags: tags(&dom_text),
    };
    let m = |series: &str| {
        try_sample(&metrics, series)
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{metrics}"))
    };

    // Cache size against max_size.
    assert_eq!(dom.value("cache-size-bytes"), m("berth_cache_size_bytes"));
    assert_eq!(
        dom.value("cache-max-size-bytes"),
        m("berth_cache_max_size_bytes")
    );
    assert_eq!(dom.value("cache-max-size-bytes"), 1024.0 * 1024.0);
    assert_eq!(dom.value("cache-blobs"), m("berth_cache_blobs"));
    assert!(dom.by_id("cache-size-bytes").text.contains("KiB"));
    let pct = data_num(dom.by_id("cache-bar"), "data-percent");
    let want = m("berth_cache_size_bytes") / m("berth_cache_max_size_bytes") * 100.0;
    assert!((pct - want).abs() < 0.001, "bar at {pct}%, size is {want}%");

    // Hits and the bytes the cache saved.
    assert_eq!(
        dom.value("served-bytes-cache"),
        m(r#"berth_served_bytes_total{source="cache"}"#)
    );
    assert_eq!(dom.value("served-bytes-cache"), from_cache as f64);
    assert_eq!(
        dom.value("served-bytes-upstream"),
        m(r#"berth_served_bytes_total{source="upstream"}"#)
    );
    assert_eq!(dom.value("served-bytes-upstream"), from_upstream as f64);
    let mut total = 0.0;
    let mut hits = 0.0;
    for kind in ["manifest", "blob"] {
        for result in ["hit", "miss", "coalesced", "stale", "revalidated"] {
            let v = m(&format!(
                r#"berth_cache_requests_total{{kind="{kind}",result="{result}"}}"#
            ));
            assert_eq!(
                dom.value(&format!("cache-requests-{kind}-{result}")),
                v,
                "{kind} {result}"
            );
            total += v;
            if matches!(result, "hit" | "stale" | "revalidated") {
                hits += v;
            }
        }
    }
    // Both pulls of alpine (1 manifest, 3 blobs) and busybox (1 manifest, 2 blobs) were
    // answered from the cache the second time.
    assert_eq!(hits, 4.0 + 3.0);
    let ratio = dom.by_id("hit-ratio");
    assert_eq!(data_num(ratio, "data-hits"), hits);
    assert_eq!(data_num(ratio, "data-requests"), total);
    assert!((data_num(ratio, "data-value") - hits / total).abs() < 1e-9);

    // Each endpoint's health, the rate limit left, fills.
    let endpoints = dom.with_class("endpoint");
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    assert_eq!(endpoints[0].attrs["data-registry"], "docker.io");
    assert_eq!(endpoints[0].attrs["data-endpoint"], up.url());
    let health = dom.with_class("health");
    assert_eq!(
        data_num(health[0], "data-value"),
        m(&format!(
            r#"berth_upstream_up{{endpoint="{}",registry="docker.io"}}"#,
            up.url()
        ))
    );
    assert_eq!(data_num(health[0], "data-value"), 1.0);
    let ratelimit = dom.with_class("ratelimit");
    assert_eq!(
        data_num(ratelimit[0], "data-value"),
        m(r#"berth_upstream_ratelimit_remaining{registry="docker.io"}"#)
    );
    // What the fake upstream sends with each manifest.
    assert_eq!(data_num(ratelimit[0], "data-value"), 42.0);
    assert_eq!(
        data_num(dom.with_class("upstream-bytes")[0], "data-value"),
        m(r#"berth_upstream_bytes_total{registry="docker.io"}"#)
    );
    assert_eq!(dom.value("fills-in-flight"), m("berth_fills_in_flight"));
    let failures: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("berth_fill_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(dom.value("fill-failures"), failures);

    // Evictions: the counts from /metrics, the list from the blob store.
    assert_eq!(dom.value("cache-evictions"), evictions);
    assert_eq!(
        dom.value("cache-evicted-bytes"),
        m("berth_cache_evicted_bytes_total")
    );
    let all_blobs: HashMap<&str, usize> = [&alpine, &busybox, &app]
        .iter()
        .flat_map(|i| i.blobs.iter().map(|(d, n)| (d.as_str(), *n)))
        .collect();
    let evicted = dom.with_class("eviction");
    assert_eq!(evicted.len() as f64, evictions, "{evicted:?}");
    let mut evicted_bytes = 0.0;
    for e in &evicted {
        let d = e.attrs["data-digest"].as_str();
        let len = all_blobs
            .get(d)
            .unwrap_or_else(|| panic!("evicted {d} is none of the pulled blobs"));
        assert_eq!(data_num(e, "data-value"), *len as f64);
        evicted_bytes += *len as f64;
    }
    assert_eq!(evicted_bytes, m("berth_cache_evicted_bytes_total"));
    let evicted: Vec<&str> = evicted
        .iter()
        .map(|e| e.attrs["data-digest"].as_str())
        .collect();

    // Top repositories by pulls (manifest GETs) and by size (cached blobs).
    let pulls: Vec<(String, f64)> = dom
        .with_class("repo-pulls")
        .iter()
        .map(|t| {
            assert_eq!(t.attrs["data-registry"], "docker.io");
            (t.attrs["data-repo"].clone(), data_num(t, "data-value"))
        })
        .collect();
    assert_eq!(
        pulls,
        vec![
            ("library/alpine".to_owned(), 2.0),
            ("library/busybox".to_owned(), 2.0),
            ("team/app".to_owned(), 1.0),
        ]
    );
    let mut want_sizes: Vec<(String, f64)> = [&alpine, &busybox, &app]
        .iter()
        .map(|i| {
            let bytes: usize = i
                .blobs
                .iter()
                .filter(|(d, _)| !evicted.contains(&d.as_str()))
                .map(|(_, n)| n)
                .sum();
            (i.repo.to_owned(), bytes as f64)
        })
        .filter(|(_, b)| *b > 0.0)
        .collect();
    want_sizes.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let sizes: Vec<(String, f64)> = dom
        .with_class("repo-size")
        .iter()
        .map(|t| (t.attrs["data-repo"].clone(), data_num(t, "data-value")))
        .collect();
    assert_eq!(sizes, want_sizes);
    let total_sizes: f64 = sizes.iter().map(|(_, b)| b).sum();
    assert_eq!(
        total_sizes,
        m("berth_cache_size_bytes"),
        "no blob is shared"
    );

    // The pinned image, and the bytes pins hold as /metrics says.
    assert_eq!(dom.by_id("pinned-list").attrs["data-count"], "1");
    let pinned = dom.with_class("pinned");
    assert_eq!(pinned.len(), 1);
    assert_eq!(
        pinned[0].attrs["data-image"],
        "docker.io/library/pinned-later:1"
    );
    assert_eq!(dom.value("pinned-bytes"), m("berth_cache_pinned_bytes"));

    // Hosted registries: the one configured, and what was pushed to it.
    assert_eq!(dom.value("hosted-bytes"), m("berth_hosted_bytes"));
    assert_eq!(dom.value("hosted-bytes"), hosted_bytes as f64);
    assert_eq!(dom.value("hosted-blobs"), m("berth_hosted_blobs"));
    assert_eq!(dom.value("hosted-blobs"), 2.0);
    let hosted: Vec<&str> = dom
        .with_class("hosted")
        .iter()
        .map(|t| t.text.as_str())
        .collect();
    assert_eq!(hosted, vec!["local"]);

    // The screenshot: a PNG of the window's size.
    let png =
        std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let (w, h) = (
        u32::from_be_bytes([png[16], png[17], png[18], png[19]]),
        u32::from_be_bytes([png[20], png[21], png[22], png[23]]),
    );
    assert_eq!((w, h), (1200, 1600));
    assert!(
        png.len() > 20_000,
        "a {} byte screenshot is blank",
        png.len()
    );
    eprintln!(
        "status page screenshot: {} ({} bytes); test took {:.2?}",
        shot.display(),
        png.len(),
        started.elapsed()
    );
    berth.stop().await;
}
