//! The status page, `GET /` on the admin listener: one server-rendered HTML page with no
//! external assets (inline CSS, no script; it works in an air-gapped cluster) that reloads
//! itself every few seconds.
//!
//! Every number on it is read from the metrics registry `/metrics` renders, in one snapshot
//! ([`Metrics::snapshot`]): cache size, hit ratio, bytes served from the cache and from
//! upstream, endpoint health, rate limits, fills, evictions, hosted storage. What no metric
//! holds (metrics have no repository or digest labels) comes from the cache's own state: the
//! repositories by size from the manifest store's repository index and the blob index, the
//! repositories by pulls from the manifest store's in-memory pull counts, and the recent
//! evictions from the blob store's short list. Each number sits in an element with a stable id
//! or class and its exact value in a `data-` attribute, for tests and scrapers.
//!
//! Every label value and name put into the page is HTML-escaped: repository names come from
//! clients, endpoint URLs from the config.

use std::fmt::Write;
use std::time::SystemTime;

use crate::app::App;
use crate::cache::Eviction;
use crate::metrics::{CacheResult, RequestKind, Snapshot};

/// Seconds between the page's reloads.
pub const REFRESH_SECONDS: u32 = 5;
/// Repositories in each "top" list.
const TOP: usize = 10;

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value as the text format writes it: integers without a fraction.
fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Bytes for people: B, KiB, MiB, GiB, TiB with one decimal.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b.abs() < 1024.0 {
        return format!("{} B", num(b));
    }
    let mut v = b / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v.abs() < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        (part / whole * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    }
}

/// `<span id=ID data-value=V>TEXT</span>`.
fn value_span(out: &mut String, id: &str, value: f64, text: &str) {
    let _ = write!(
        out,
        r#"<span id="{id}" class="num" data-value="{v}">{text}</span>"#,
        v = num(value),
        text = escape(text),
    );
}

/// Everything the page shows, read at one moment.
pub struct StatusData {
    pub metrics: Snapshot,
    /// (registry, repository, manifest GETs since start), most first.
    pub top_pulled: Vec<(String, String, u64)>,
    /// (registry, repository, bytes, blobs), largest first.
    pub top_size: Vec<(String, String, u64, usize)>,
    pub recent_evictions: Vec<Eviction>,
    /// Names of the hosted registries (None: no `[[hosted]]`).
    pub hosted: Option<Vec<String>>,
    /// Pinned images (`[cache] pin`, `berth pin`), and the bytes their cached blobs take
    /// (`berth_cache_pinned_bytes`).
    pub pinned: Vec<String>,
}

impl StatusData {
    /// Reads the page's data from a running berth. Blocking: it walks the blob index.
    pub fn read(app: &App) -> StatusData {
        let blobs = &app.mirror.blobs;
        blobs.run_pending();
        let store = app.mirror.manifest_store();
        let sizes = blobs.sizes();
        let top_size = store
            .top_by_size(&sizes, TOP)
            .into_iter()
            .map(|r| (r.registry.to_string(), r.repo.to_string(), r.bytes, r.blobs))
            .collect();
        let top_pulled = store
            .top_pulled(TOP)
            .into_iter()
            .map(|(reg, repo, n)| (reg.to_string(), repo.to_string(), n))
            .collect();
        let recent_evictions = blobs.recent_evictions();
        let hosted = app
            .hosted
            .as_ref()
            .map(|h| h.registries().iter().map(|r| r.name.to_string()).collect());
        // Last, so the numbers are as fresh as the lists above (nothing on the page counts
        // from them).
        let metrics = app.mirror.metrics().snapshot();
        StatusData {
            metrics,
            top_pulled,
            top_size,
            recent_evictions,
            hosted,
            pinned: app.pins.list().into_iter().map(|p| p.image).collect(),
        }
    }
}

const STYLE: &str = r#"
:root{--bg:#f6f7f9;--card:#fff;--fg:#1d2330;--muted:#667085;--line:#e3e6eb;--ok:#1f9d55;--bad:#d64545;--bar:#3b82f6;--bar2:#a3b8d9}
@media (prefers-color-scheme:dark){:root{--bg:#12151b;--card:#1b2029;--fg:#e6e9ef;--muted:#98a2b3;--line:#2c3340;--bar2:#44556f}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{padding:16px 24px;border-bottom:1px solid var(--line);background:var(--card);display:flex;align-items:baseline;gap:16px;flex-wrap:wrap}
header h1{margin:0;font-size:20px}
.muted{color:var(--muted)}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:16px;padding:16px 24px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;min-width:0}
section.wide{grid-column:1/-1}
h2{margin:0 0 10px;font-size:15px}
.big{font-size:24px;font-weight:600}
.bar{height:14px;border-radius:7px;background:var(--line);overflow:hidden;display:flex;margin:6px 0 8px}
.bar>div{height:100%;background:var(--bar)}
.bar>div.rest{background:var(--bar2)}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted);font-size:12px}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
table.small{font-size:12px}
table.small th,table.small td{padding:3px 4px}
.up{color:var(--ok);font-weight:600}
.down{color:var(--bad);font-weight:600}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all}
ol,ul{margin:0;padding-left:20px}
.none{color:var(--muted);font-style:italic}
"#;

/// The page.
pub fn render(d: &StatusData, now: SystemTime) -> String {
    let m = &d.metrics;
    let mut out = String::with_capacity(16 * 1024);
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>berth status</title><style>{STYLE}</style></head><body>\
         <header><h1>berth</h1><span class=\"muted\">v{version}</span>\
         <span class=\"muted\">rendered <time id=\"rendered-at\" data-value=\"{now_secs}\">{when}</time>, \
         reloads every {REFRESH_SECONDS} s · the numbers are those of <a href=\"/metrics\">/metrics</a></span></header><main>",
        version = escape(env!("CARGO_PKG_VERSION")),
        when = humantime::format_rfc3339_seconds(now),
    );
    cache_section(&mut out, m);
    traffic_section(&mut out, m);
    evictions_section(&mut out, m, &d.recent_evictions, now);
    upstream_section(&mut out, m);
    top_sections(&mut out, d);
    pinned_section(
        &mut out,
        &d.pinned,
        d.metrics.get("berth_cache_pinned_bytes").unwrap_or(0.0),
    );
    hosted_section(&mut out, m, d.hosted.as_deref());
    out.push_str("</main></body></html>\n");
    out
}

fn cache_section(out: &mut String, m: &Snapshot) {
    let size = m.get("berth_cache_size_bytes").unwrap_or(0.0);
    let max = m.get("berth_cache_max_size_bytes").unwrap_or(0.0);
    let blobs = m.get("berth_cache_blobs").unwrap_or(0.0);
    let used = percent(size, max);
    let _ = write!(
        out,
        "<section id=\"cache\"><h2>Cache</h2><div class=\"big\">{used:.1}% full</div>\
         <div class=\"bar\" id=\"cache-bar\" role=\"meter\" aria-valuemin=\"0\" aria-valuemax=\"{max_v}\" \
         aria-valuenow=\"{size_v}\" data-percent=\"{used:.3}\"><div style=\"width:{used:.3}%\"></div></div><p>",
        max_v = num(max),
        size_v = num(size),
    );
    value_span(out, "cache-size-bytes", size, &human_bytes(size));
    out.push_str(" of ");
    value_span(out, "cache-max-size-bytes", max, &human_bytes(max));
    out.push_str(" (<code>max_size</code>) in ");
    value_span(out, "cache-blobs", blobs, &num(blobs));
    out.push_str(" blobs</p></section>");
}

fn traffic_section(out: &mut String, m: &Snapshot) {
    let total = m.sum("berth_cache_requests_total", &[]);
    let hits: f64 = CacheResult::ALL
        .iter()
        .filter(|r| r.source() == crate::metrics::ServedFrom::Cache)
        .map(|r| m.sum("berth_cache_requests_total", &[("result", r.as_str())]))
        .sum();
    let ratio = if total > 0.0 { hits / total } else { 0.0 };
    let from_cache = m.sum("berth_served_bytes_total", &[("source", "cache")]);
    let from_upstream = m.sum("berth_served_bytes_total", &[("source", "upstream")]);
    let cache_share = percent(from_cache, from_cache + from_upstream);
    let _ = write!(
        out,
        "<section id=\"traffic\"><h2>Hits and bytes saved</h2>\
         <div class=\"big\"><span id=\"hit-ratio\" class=\"num\" data-value=\"{ratio}\" \
         data-hits=\"{hits_v}\" data-requests=\"{total_v}\">{pct:.1}%</span> hit ratio</div>\
         <p class=\"muted\">{hits_v} of {total_v} manifest and blob requests answered from the cache \
         (hit, stale or revalidated)</p>",
        hits_v = num(hits),
        total_v = num(total),
        pct = ratio * 100.0,
    );
    let _ = write!(
        out,
        "<div class=\"bar\" id=\"served-bar\" data-percent=\"{cache_share:.3}\">\
         <div style=\"width:{cache_share:.3}%\"></div><div class=\"rest\" style=\"width:{rest:.3}%\"></div></div><p>",
        rest = if from_cache + from_upstream > 0.0 {
            100.0 - cache_share
        } else {
            0.0
        },
    );
    value_span(
        out,
        "served-bytes-cache",
        from_cache,
        &human_bytes(from_cache),
    );
    out.push_str(" served from the cache (saved upstream), ");
    value_span(
        out,
        "served-bytes-upstream",
        from_upstream,
        &human_bytes(from_upstream),
    );
    out.push_str(" from upstream</p>");
    out.push_str("<table id=\"cache-requests\" class=\"small\"><tr><th>requests</th>");
    for r in CacheResult::ALL {
        let _ = write!(out, "<th class=\"n\">{}</th>", r.as_str());
    }
    out.push_str("</tr>");
    for kind in [RequestKind::Manifest, RequestKind::Blob] {
        let _ = write!(out, "<tr><td>{}</td>", kind.as_str());
        for r in CacheResult::ALL {
            let v = m.sum(
                "berth_cache_requests_total",
                &[("kind", kind.as_str()), ("result", r.as_str())],
            );
            let _ = write!(
                out,
                "<td class=\"n\" id=\"cache-requests-{k}-{res}\" data-value=\"{v}\">{v}</td>",
                k = kind.as_str(),
                res = r.as_str(),
                v = num(v),
            );
        }
        out.push_str("</tr>");
    }
    out.push_str("</table></section>");
}

fn upstream_section(out: &mut String, m: &Snapshot) {
    let fills = m.get("berth_fills_in_flight").unwrap_or(0.0);
    let failures = m.sum("berth_fill_failures_total", &[]);
    out.push_str("<section id=\"upstreams\" class=\"wide\"><h2>Upstream registries</h2><p>");
    value_span(out, "fills-in-flight", fills, &num(fills));
    out.push_str(" fills in flight · ");
    value_span(out, "fill-failures", failures, &num(failures));
    out.push_str(" fills failed since start</p>");
    let mut endpoints: Vec<(&str, &str, f64)> = m
        .series("berth_upstream_up")
        .map(|s| (s.label("registry"), s.label("endpoint"), s.value))
        .collect();
    endpoints.sort_by(|a, b| a.0.cmp(b.0).then_with(|| a.1.cmp(b.1)));
    if endpoints.is_empty() {
        out.push_str("<p class=\"none\" id=\"no-upstreams\">no registry configured</p></section>");
        return;
    }
    out.push_str(
        "<table id=\"endpoints\"><tr><th>registry</th><th>endpoint</th><th>health</th>\
         <th class=\"n\">ratelimit-remaining</th><th class=\"n\">upstream bytes</th></tr>",
    );
    for (registry, endpoint, up) in endpoints {
        let remaining = m
            .series("berth_upstream_ratelimit_remaining")
            .find(|s| s.label("registry") == registry)
            .map(|s| s.value);
        let bytes = m.sum("berth_upstream_bytes_total", &[("registry", registry)]);
        let (class, word) = if up >= 1.0 {
            ("up", "up")
        } else {
            ("down", "cooling down")
        };
        let _ = write!(
            out,
            "<tr class=\"endpoint\" data-registry=\"{r}\" data-endpoint=\"{e}\">\
             <td>{r}</td><td><code>{e}</code></td>\
             <td class=\"health {class}\" data-value=\"{up_v}\">{word}</td>",
            r = escape(registry),
            e = escape(endpoint),
            up_v = num(up),
        );
        match remaining {
            Some(v) => {
                let _ = write!(
                    out,
                    "<td class=\"n ratelimit\" data-value=\"{v}\">{v}</td>",
                    v = num(v)
                );
            }
            None => out.push_str(
                "<td class=\"n ratelimit none\" data-value=\"\" title=\"upstream sent no ratelimit-remaining\">—</td>",
            ),
        }
        let _ = write!(
            out,
            "<td class=\"n upstream-bytes\" data-value=\"{v}\">{h}</td></tr>",
            v = num(bytes),
            h = escape(&human_bytes(bytes)),
        );
    }
    out.push_str("</table></section>");
}

fn top_sections(out: &mut String, d: &StatusData) {
    out.push_str(
        "<section id=\"top-pulls\"><h2>Top repositories by pulls</h2>\
         <p class=\"muted\">manifest GETs since berth started</p>",
    );
    if d.top_pulled.is_empty() {
        out.push_str("<p class=\"none\">no pulls yet</p>");
    } else {
        out.push_str("<table><tr><th>repository</th><th class=\"n\">pulls</th></tr>");
        for (registry, repo, n) in &d.top_pulled {
            let _ = write!(
                out,
                "<tr class=\"repo-pulls\" data-registry=\"{r}\" data-repo=\"{p}\" data-value=\"{n}\">\
                 <td><span class=\"muted\">{r}/</span>{p}</td><td class=\"n\">{n}</td></tr>",
                r = escape(registry),
                p = escape(repo),
            );
        }
        out.push_str("</table>");
    }
    out.push_str(
        "</section><section id=\"top-size\"><h2>Top repositories by size</h2>\
         <p class=\"muted\">cached blobs each repository is known to hold (shared blobs count in each)</p>",
    );
    if d.top_size.is_empty() {
        out.push_str("<p class=\"none\">nothing cached yet</p>");
    } else {
        out.push_str(
            "<table><tr><th>repository</th><th class=\"n\">blobs</th><th class=\"n\">size</th></tr>",
        );
        for (registry, repo, bytes, blobs) in &d.top_size {
            let _ = write!(
                out,
                "<tr class=\"repo-size\" data-registry=\"{r}\" data-repo=\"{p}\" data-value=\"{bytes}\" data-blobs=\"{blobs}\">\
                 <td><span class=\"muted\">{r}/</span>{p}</td><td class=\"n\">{blobs}</td><td class=\"n\">{h}</td></tr>",
                r = escape(registry),
                p = escape(repo),
                h = escape(&human_bytes(*bytes as f64)),
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</section>");
}

fn pinned_section(out: &mut String, pinned: &[String], pinned_bytes: f64) {
    let _ = write!(
        out,
        "<section id=\"pinned\"><h2>Pinned images</h2><p>Never evicted: <span id=\"pinned-bytes\" data-value=\"{}\">{}</span> on disk.</p><ul id=\"pinned-list\" data-count=\"{}\">",
        pinned_bytes,
        human_bytes(pinned_bytes),
        pinned.len()
    );
    for p in pinned {
        let p = escape(p);
        let _ = write!(
            out,
            "<li class=\"pinned\" data-image=\"{p}\"><code>{p}</code></li>"
        );
    }
    out.push_str("</ul>");
    if pinned.is_empty() {
        out.push_str("<p class=\"none\" id=\"pinned-none\">none (<code>berth pin IMAGE</code> or <code>[cache] pin</code>)</p>");
    }
    out.push_str("</section>");
}

fn evictions_section(out: &mut String, m: &Snapshot, recent: &[Eviction], now: SystemTime) {
    let n = m.get("berth_cache_evictions_total").unwrap_or(0.0);
    let bytes = m.get("berth_cache_evicted_bytes_total").unwrap_or(0.0);
    out.push_str("<section id=\"evictions\"><h2>Evictions</h2><p>");
    value_span(out, "cache-evictions", n, &num(n));
    out.push_str(" blobs (");
    value_span(out, "cache-evicted-bytes", bytes, &human_bytes(bytes));
    out.push_str(") evicted since start</p>");
    if recent.is_empty() {
        out.push_str("<p class=\"none\" id=\"no-evictions\">no evictions yet</p>");
    } else {
        let _ = write!(
            out,
            "<table id=\"recent-evictions\" data-count=\"{}\"><tr><th>blob</th><th class=\"n\">size</th><th class=\"n\">when</th></tr>",
            recent.len()
        );
        for e in recent {
            let digest = e.digest.to_string();
            let short: String = digest.chars().take(19).collect();
            let ago = now.duration_since(e.at).unwrap_or_default().as_secs();
            let _ = write!(
                out,
                "<tr class=\"eviction\" data-digest=\"{d}\" data-value=\"{b}\"><td><code title=\"{d}\">{s}…</code></td>\
                 <td class=\"n\">{h}</td><td class=\"n\">{ago} s ago</td></tr>",
                d = escape(&digest),
                s = escape(&short),
                b = e.bytes,
                h = escape(&human_bytes(e.bytes as f64)),
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</section>");
}

fn hosted_section(out: &mut String, m: &Snapshot, hosted: Option<&[String]>) {
    let bytes = m.get("berth_hosted_bytes").unwrap_or(0.0);
    let blobs = m.get("berth_hosted_blobs").unwrap_or(0.0);
    out.push_str("<section id=\"hosted\"><h2>Hosted registries</h2>");
    match hosted {
        Some(names) if !names.is_empty() => {
            out.push_str("<ul id=\"hosted-list\">");
            for n in names {
                let _ = write!(out, "<li class=\"hosted\">{}</li>", escape(n));
            }
            out.push_str("</ul>");
        }
        _ => {
            out.push_str("<p class=\"none\" id=\"no-hosted\">no [[hosted]] registry configured</p>")
        }
    }
    out.push_str("<p>");
    value_span(out, "hosted-bytes", bytes, &human_bytes(bytes));
    out.push_str(" in ");
    value_span(out, "hosted-blobs", blobs, &num(blobs));
    out.push_str(" blobs and manifests</p></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn escapes_markup_in_every_label() {
        assert_eq!(
            escape(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        let m = Metrics::new();
        m.upstream_up
            .with_label_values(&["r<b>", "http://e/\"><script>x</script>"])
            .set(1);
        let d = StatusData {
            metrics: m.snapshot(),
            top_pulled: vec![("r".into(), "<img src=x onerror=y>".into(), 3)],
            top_size: vec![("r".into(), "a\"b".into(), 10, 1)],
            recent_evictions: Vec::new(),
            hosted: Some(vec!["<h>".into()]),
            pinned: Vec::new(),
        };
        let page = render(&d, SystemTime::now());
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("<b>"), "{page}");
        assert!(!page.contains("<h>"), "{page}");
        assert!(page.contains("&lt;img src=x onerror=y&gt;"));
        assert!(page.contains("data-repo=\"a&quot;b\""));
    }

    #[test]
    fn shows_the_metrics_values() {
        let m = Metrics::new();
        m.cache_size_bytes.set(512 * 1024);
        m.cache_max_size_bytes.set(1024 * 1024);
        m.record_cache(RequestKind::Blob, CacheResult::Hit);
        m.record_cache(RequestKind::Blob, CacheResult::Miss);
        let d = StatusData {
            metrics: m.snapshot(),
            top_pulled: Vec::new(),
            top_size: Vec::new(),
            recent_evictions: Vec::new(),
            hosted: None,
            pinned: Vec::new(),
        };
        let page = render(&d, SystemTime::now());
        assert!(
            page.contains(r#"id="cache-size-bytes" class="num" data-value="524288">512.0 KiB<"#)
        );
        assert!(page.contains(r#"id="hit-ratio" class="num" data-value="0.5""#));
        assert!(page.contains("50.0% full"));
        assert!(page.contains(r#"<meta http-equiv="refresh" content="5">"#));
        assert!(!page.contains("<script") && !page.contains("src="));
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1023.0), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(20.0 * 1024.0 * 1024.0 * 1024.0), "20.0 GiB");
    }
}
