use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use berth::config::{Config, LogFormat};

mod cli;

/// A pull-through caching mirror for container registries.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror (the default). Without --config, the embedded default config mirrors
    /// Docker Hub on port 5000 with a cache in ./berth-cache.
    Serve {
        /// The TOML config file (every key is documented in config/berth.toml). Without it,
        /// the embedded default config is used.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and the files it names (password, TLS, CA, htpasswd and token
    /// key files), then print the effective config. Errors name the key to fix.
    CheckConfig {
        /// The TOML config file to check.
        file: PathBuf,
        /// Check the config file alone, not the files and environment variables it names
        /// (for a config checked away from where it runs, e.g. in CI).
        #[arg(long)]
        no_files: bool,
    },
    /// What the cache of a running berth holds, and purging it (through its admin API).
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Pin images in a running berth's cache: the manifest, the index children for
    /// `[cache] platforms` and every blob are fetched and never evicted, across restarts.
    /// IMAGE is docker-style (`alpine` is docker.io/library/alpine:latest).
    Pin {
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Unpin images: they become evictable again (least recently used first).
    Unpin {
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Fetch images into the cache of a running berth (through its admin API).
    ///
    /// The images are fetched through berth itself: its routes, allow/deny lists and upstream
    /// credentials apply, and the first pull of a warmed image is a cache hit. IMAGE is
    /// docker-style (`alpine` is docker.io/library/alpine:latest). Of a
    /// multi-platform image, the platforms of its `[cache] platforms` (or --platform) are
    /// fetched. Shows progress, and exits 1 naming each image that failed.
    Warm {
        #[command(flatten)]
        args: cli::warm::WarmArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Garbage-collect the hosted registries: remove every blob no manifest references (and,
    /// with --untagged, manifests no tag reaches). Safe beside a running berth: nothing
    /// younger than `gc_grace` is removed. The same runs online as `POST /admin/gc`.
    Gc {
        /// The TOML config file of the berth whose hosted registries to collect.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print what would be removed and how many bytes, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove manifests that no tag (or tagged index, or subject) reaches.
        #[arg(long)]
        untagged: bool,
    },
}

/// How to reach a running berth's admin API.
#[derive(clap::Args)]
struct AdminArgs {
    /// The admin listener of the running berth.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// A file holding the `[admin] token_file` token (else $BERTH_ADMIN_TOKEN, else none).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List cached images: registry, repository, tag, digest, bytes on disk, pull count,
    /// last pulled, pinned.
    Ls {
        /// Print the admin API's JSON.
        #[arg(long)]
        json: bool,
        /// Only this registry.
        #[arg(long)]
        registry: Option<String>,
        /// Sort by: name, size (largest first), pulls (most first) or last-pulled (most
        /// recent first).
        #[arg(long, default_value = "name", value_parser = ["name", "size", "pulls", "last-pulled"])]
        sort: String,
    },
    /// Remove every image not pulled for the given time (like `cache rm` of each; pinned
    /// images stay). A tag never pulled counts from when it was cached or last checked.
    Prune {
        /// Like 30d, 12h.
        #[arg(long, required = true, value_name = "DURATION")]
        not_pulled_for: String,
        /// Print what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove images: the tag, the manifest, and the blobs no cached manifest references any
    /// more. IMAGE is docker-style (`alpine` is docker.io/library/alpine:latest).
    Rm {
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
        /// Print what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file, no_files }) => match load(&file, !no_files) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth: {}: {e}", file.display());
                ExitCode::FAILURE
            }
        },
        Some(Command::Cache { command, admin }) => cache(command, &admin),
        Some(Command::Pin { images, admin }) => cli::pins::pin(&images, false, &admin),
        Some(Command::Unpin { images, admin }) => cli::pins::pin(&images, true, &admin),
        Some(Command::Warm { args, admin }) => cli::warm::run(args, &admin),
        Some(Command::Gc {
            config,
            dry_run,
            untagged,
        }) => gc(&config, dry_run, untagged),
        Some(Command::Serve { config }) => serve(config),
        None => serve(None),
    }
}

/// Builds a runtime, or says why not.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .inspect_err(|e| eprintln!("berth: cannot start the runtime: {e}"))
        .ok()
}

/// Talks to a running berth's admin API.
struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    fn new(args: &AdminArgs) -> Result<AdminClient, String> {
        let token = match &args.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("{}: {e}", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => std::env::var("BERTH_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(300))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(AdminClient {
            base: args.admin.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
    ) -> Result<serde_json::Value, String> {
        self.call_with(method, path_and_query, None).await
    }

    /// Like [`AdminClient::call`], with a JSON request body.
    async fn call_with(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let mut req = self
            .http
            .request(method, format!("{}{path_and_query}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req
            .send()
            .await
            .map_err(|e| format!("{}: {e}", self.base))?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.map_err(|e| format!("{}: {e}", self.base))?;
        if !status.is_success() {
            return Err(format!(
                "{status}: {}",
                v["error"].as_str().unwrap_or("error")
            ));
        }
        Ok(v)
    }
}

fn human_bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// An admin API client and a runtime to drive it, or None having said why not.
fn admin_session(admin: &AdminArgs) -> Option<(AdminClient, tokio::runtime::Runtime)> {
    let client = AdminClient::new(admin)
        .inspect_err(|e| eprintln!("berth: {e}"))
        .ok()?;
    let runtime = runtime(tokio::runtime::Builder::new_current_thread())?;
    Some((client, runtime))
}

fn cache(command: CacheCommand, admin: &AdminArgs) -> ExitCode {
    let Some((client, runtime)) = admin_session(admin) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        match command {
            CacheCommand::Ls {
                json,
                registry,
                sort,
            } => {
                let query = registry
                    .map(|r| {
                        format!(
                            "?registry={}",
                            url::form_urlencoded::byte_serialize(r.as_bytes()).collect::<String>()
                        )
                    })
                    .unwrap_or_default();
                let v = match client
                    .call(reqwest::Method::GET, &format!("/admin/cache{query}"))
                    .await
                {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("berth: cache ls: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                if json {
                    println!("{v}");
                    return ExitCode::SUCCESS;
                }
                let mut images = v["images"].as_array().cloned().unwrap_or_default();
                let key = match sort.as_str() {
                    "size" => "bytes",
                    "pulls" => "pulls",
                    "last-pulled" => "last_pulled",
                    _ => "",
                };
                if !key.is_empty() {
                    images.sort_by_key(|i| std::cmp::Reverse(i[key].as_u64().unwrap_or(0)));
                }
                println!(
                    "{:<40} {:<20} {:<19} {:>10} {:>6} {:<20} PINNED",
                    "IMAGE", "TAG", "DIGEST", "SIZE", "PULLS", "LAST PULLED"
                );
                for i in images {
                    let name = format!(
                        "{}/{}",
                        i["registry"].as_str().unwrap_or(""),
                        i["repository"].as_str().unwrap_or("")
                    );
                    let digest = i["digest"].as_str().unwrap_or("");
                    let last = i["last_pulled"]
                        .as_u64()
                        .map(|t| {
                            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
                            humantime::format_rfc3339_seconds(at).to_string()
                        })
                        .unwrap_or_else(|| "never".into());
                    println!(
                        "{:<40} {:<20} {:<19} {:>10} {:>6} {:<20} {}",
                        name,
                        i["tag"].as_str().unwrap_or("<none>"),
                        digest.get(..19).unwrap_or(digest),
                        human_bytes(i["bytes"].as_u64().unwrap_or(0)),
                        i["pulls"].as_u64().unwrap_or(0),
                        last,
                        if i["pinned"].as_bool().unwrap_or(false) {
                            "yes"
                        } else {
                            "no"
                        }
                    );
                }
                ExitCode::SUCCESS
            }
            CacheCommand::Prune {
                not_pulled_for,
                dry_run,
            } => cli::pins::prune(&client, &not_pulled_for, dry_run).await,
            CacheCommand::Rm { images, dry_run } => {
                let mut failed = Vec::new();
                let (mut total, verb) = (0u64, if dry_run { "would remove" } else { "removed" });
                for image in &images {
                    let parsed = match image.parse::<berth::oci::ImageRef>() {
                        Ok(p) => p,
                        Err(e) => {
                            eprintln!("berth: {e}");
                            failed.push(image.clone());
                            continue;
                        }
                    };
                    let enc = |s: &str| {
                        url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                    };
                    let path = format!(
                        "/admin/cache/rm?registry={}&repository={}&reference={}{}",
                        enc(&parsed.registry),
                        enc(parsed.repository.as_str()),
                        enc(&parsed.reference.to_string()),
                        if dry_run { "&dry_run=true" } else { "" }
                    );
                    match client.call(reqwest::Method::POST, &path).await {
                        Ok(v) => {
                            let list = |k: &str| v[k].as_array().cloned().unwrap_or_default();
                            if list("tags").is_empty() && list("manifests").is_empty() {
                                eprintln!("berth: {image}: not in the cache");
                                failed.push(image.clone());
                                continue;
                            }
                            for (kind, key) in [
                                ("tag", "tags"),
                                ("manifest", "manifests"),
                                ("blob", "blobs"),
                            ] {
                                for x in list(key) {
                                    println!("{verb} {kind} {}", x.as_str().unwrap_or(""));
                                }
                            }
                            total += v["bytes_freed"].as_u64().unwrap_or(0);
                        }
                        Err(e) => {
                            eprintln!("berth: {image}: {e}");
                            failed.push(image.clone());
                        }
                    }
                }
                println!(
                    "{} freed{}",
                    human_bytes(total),
                    if dry_run { " (dry run)" } else { "" }
                );
                if failed.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    eprintln!("berth: failed: {}", failed.join(", "));
                    ExitCode::FAILURE
                }
            }
        }
    })
}

fn gc(path: &std::path::Path, dry_run: bool, untagged: bool) -> ExitCode {
    let config = match load(path, false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    if config.hosted.is_empty() {
        eprintln!(
            "berth: {}: no [[hosted]] registry to collect",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    match berth::gc(&config, dry_run, untagged) {
        Ok(report) => {
            let verb = if dry_run { "would remove" } else { "removed" };
            let list = |key: &str| {
                report[key]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            };
            for m in list("manifests") {
                println!("{verb} manifest {m}");
            }
            let blobs = list("blobs");
            for b in &blobs {
                println!("{verb} blob {b}");
            }
            println!(
                "{verb} {} blobs, {} bytes; {} kept as younger than gc_grace",
                blobs.len(),
                report["bytes"],
                report["kept_young"]
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth: gc: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads and validates a config file and (with `files`) checks the files it names.
fn load(path: &std::path::Path, files: bool) -> Result<Config, berth::config::ConfigError> {
    let config = Config::load(path)?;
    if files {
        config.check_files()?;
    }
    Ok(config)
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    let config = match &path {
        Some(p) => load(p, true),
        None => Config::embedded(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            let src = path.map_or("embedded config".into(), |p| p.display().to_string());
            eprintln!("berth: {src}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (writer, _guard) = berth::logwriter::BatchWriter::stdout();
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, filter_warning) = berth::logwriter::env_filter(rust_log.as_deref());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match config.log.format {
        LogFormat::Json => sub.json().init(),
        LogFormat::Text => sub.init(),
    }
    if let Some(w) = filter_warning {
        tracing::warn!("{w}");
    }
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let running = match berth::start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down");
        running.stop().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
