use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use berth::config::{Config, LogFormat};

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
        Some(Command::Gc {
            config,
            dry_run,
            untagged,
        }) => gc(&config, dry_run, untagged),
        Some(Command::Serve { config }) => serve(config),
        None => serve(None),
    }
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
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
