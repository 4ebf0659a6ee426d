//! `berth warm IMAGE…`: starts a warm job on a running berth (`POST /admin/warm`) and follows
//! it (`GET /admin/warm/<id>` every 200 ms) until every image is done or failed: progress bars
//! on a terminal, one line per finished image otherwise; a summary; exit 1 naming each image
//! that failed.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::{AdminArgs, AdminClient, human_bytes};

/// How often the job's progress is read.
const POLL: Duration = Duration::from_millis(200);
/// Failed reads of the job's progress in a row before giving up.
const MAX_POLL_ERRORS: u32 = 10;

#[derive(clap::Args)]
pub(crate) struct WarmArgs {
    /// Images to fetch, docker-style (`alpine:3.20`, `ghcr.io/owner/app@sha256:…`).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
    /// Of a multi-platform image, fetch this platform's image (repeatable). Default: the
    /// running berth's `[cache] platforms` (linux/amd64 unless configured).
    #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
    platforms: Vec<String>,
    /// Of a multi-platform image, fetch every image of the index, also those without a
    /// platform (attestations, artifacts).
    #[arg(long, conflicts_with = "platforms")]
    all_platforms: bool,
    /// Stop waiting after this long (the job goes on in berth).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub(crate) fn run(args: WarmArgs, admin: &AdminArgs) -> ExitCode {
    // Refused here already, before anything is sent (berth checks them again).
    let mut bad = Vec::new();
    for i in &args.images {
        if let Err(e) = i.parse::<berth::oci::ImageRef>() {
            bad.push(e);
        }
    }
    for p in &args.platforms {
        if let Err(e) = berth::oci::Platform::parse(p) {
            bad.push(e);
        }
    }
    if !bad.is_empty() {
        for e in bad {
            eprintln!("berth: warm: {e}");
        }
        return ExitCode::FAILURE;
    }
    let Some((client, runtime)) = crate::admin_session(admin) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(follow(&client, &args))
}

async fn follow(client: &AdminClient, args: &WarmArgs) -> ExitCode {
    let body = serde_json::json!({
        "images": args.images,
        "platforms": args.platforms,
        "all_platforms": args.all_platforms,
    });
    let id = match client
        .call_with(reqwest::Method::POST, "/admin/warm", Some(&body))
        .await
    {
        Ok(v) => match v["id"].as_u64() {
            Some(id) => id,
            None => {
                eprintln!("berth: warm: berth answered no job id: {v}");
                return ExitCode::FAILURE;
            }
        },
        Err(e) => {
            eprintln!("berth: warm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut view = View::new(std::io::stdout().is_terminal(), args.images.len());
    let deadline = Instant::now() + args.timeout;
    let mut errors = 0;
    let mut last = Value::Null;
    loop {
        match client
            .call(reqwest::Method::GET, &format!("/admin/warm/{id}"))
            .await
        {
            Ok(job) => {
                errors = 0;
                view.show(&job);
                let finished = matches!(job["state"].as_str(), Some("done" | "failed"));
                last = job;
                if finished {
                    break;
                }
            }
            Err(e) => {
                errors += 1;
                if errors >= MAX_POLL_ERRORS {
                    view.end();
                    eprintln!("berth: warm: cannot read the progress of job {id}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        if Instant::now() >= deadline {
            view.end();
            let waiting: Vec<String> = images(&last)
                .iter()
                .filter(|i| !finished(i))
                .map(|i| str_of(i, "image").to_owned())
                .collect();
            eprintln!(
                "berth: warm: gave up after {} (--timeout); job {id} goes on in berth; not finished: {}",
                humantime::format_duration(args.timeout),
                waiting.join(", ")
            );
            return ExitCode::FAILURE;
        }
        tokio::time::sleep(POLL).await;
    }
    view.end();
    summary(&last)
}

fn images(job: &Value) -> Vec<Value> {
    job["images"].as_array().cloned().unwrap_or_default()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn finished(image: &Value) -> bool {
    matches!(image["state"].as_str(), Some("done" | "failed"))
}

/// `warmed docker.io/library/alpine:3.20: 3 blobs, 3.4 MiB` or `failed …: reason`.
fn line(image: &Value) -> String {
    let name = str_of(image, "image");
    if image["state"] == "failed" {
        return format!("failed {name}: {}", str_of(image, "error"));
    }
    let cached = num(image, "blobs_cached");
    format!(
        "warmed {name}: {} blobs, {}{}",
        num(image, "blobs_total"),
        human_bytes(num(image, "bytes_done")),
        if cached > 0 {
            format!(" ({cached} already cached)")
        } else {
            String::new()
        }
    )
}

/// The last lines: how much was warmed, and which images failed (on stderr).
fn summary(job: &Value) -> ExitCode {
    let all = images(job);
    let failed: Vec<&str> = all
        .iter()
        .filter(|i| i["state"] == "failed")
        .map(|i| str_of(i, "image"))
        .collect();
    let sum = |key| all.iter().map(|i| num(i, key)).sum::<u64>();
    println!(
        "warmed {} of {} images: {} blobs ({} already cached), {}",
        all.len() - failed.len(),
        all.len(),
        sum("blobs_done"),
        sum("blobs_cached"),
        human_bytes(sum("bytes_done"))
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("berth: warm failed: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

/// How progress is shown: bars on a terminal, a line per finished image otherwise.
struct View {
    bars: Option<Bars>,
    /// Which images' lines were printed.
    reported: Vec<bool>,
}

struct Bars {
    multi: MultiProgress,
    images: Vec<ProgressBar>,
    total: ProgressBar,
    /// Bytes done of bytes to do.
    bar: ProgressStyle,
}

impl Bars {
    fn new(n: usize) -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let bar = ProgressStyle::with_template(
            "{prefix} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        // Until the manifests say how many bytes there are: no bar (one of length 0 is full).
        let waiting =
            ProgressStyle::with_template("{prefix} {msg}").unwrap_or_else(|_| bar.clone());
        let add = |prefix: &str| {
            multi.add(
                ProgressBar::new(0)
                    .with_style(waiting.clone())
                    .with_prefix(prefix.to_owned()),
            )
        };
        let images = (0..n).map(|_| add("")).collect();
        let total = add("all images");
        Bars {
            multi,
            images,
            total,
            bar,
        }
    }

    /// Sets a bar to `done` of `total` bytes, drawn as a bar once the total is known.
    fn set(&self, bar: &ProgressBar, done: u64, total: u64) {
        let total = total.max(done);
        if total > 0 && bar.length() == Some(0) {
            bar.set_style(self.bar.clone());
        }
        bar.set_length(total);
        bar.set_position(done);
    }
}

impl View {
    fn new(tty: bool, n: usize) -> View {
        View {
            bars: tty.then(|| Bars::new(n)),
            reported: vec![false; n],
        }
    }

    fn show(&mut self, job: &Value) {
        let all = images(job);
        for (i, image) in all.iter().enumerate() {
            let first = finished(image) && !self.reported.get(i).copied().unwrap_or(true);
            if first && let Some(r) = self.reported.get_mut(i) {
                *r = true;
            }
            let Some(bars) = &self.bars else {
                if first {
                    println!("{}", line(image));
                }
                continue;
            };
            let Some(bar) = bars.images.get(i).filter(|b| !b.is_finished()) else {
                continue;
            };
            bar.set_prefix(str_of(image, "image").to_owned());
            bars.set(bar, num(image, "bytes_done"), num(image, "bytes_total"));
            let blobs = format!(
                "{}/{} blobs",
                num(image, "blobs_done"),
                num(image, "blobs_total")
            );
            match str_of(image, "state") {
                "done" => bar.finish_with_message(blobs),
                "failed" => bar.abandon_with_message("failed"),
                state => bar.set_message(format!("{blobs} {state}")),
            }
            if first {
                let _ = bars.multi.println(line(image));
            }
        }
        if let Some(bars) = &self.bars {
            let sum = |key| all.iter().map(|i| num(i, key)).sum::<u64>();
            bars.set(&bars.total, sum("bytes_done"), sum("bytes_total"));
            let done = all.iter().filter(|i| finished(i)).count();
            bars.total
                .set_message(format!("{done}/{} images", all.len()));
        }
    }

    /// Leaves the bars as they are on the screen.
    fn end(&mut self) {
        if let Some(bars) = &self.bars {
            for bar in bars.images.iter().chain([&bars.total]) {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
        }
    }
}
