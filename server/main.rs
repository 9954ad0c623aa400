//! `gpuwatch-server`: parses flags, loads the configuration, runs the daemon
//! until SIGTERM/SIGINT, and maps failures to exit codes (64 for a bad
//! configuration, 69 when the GPUs or the network cannot be used, 73 when the
//! state directory cannot be).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::Parser;
use gpuwatch_server::config::{self, Config, LogFormat, Overrides};

/// Exit code for a bad command line or configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the GPUs or a listener cannot be used (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code when the state directory cannot be used: locked by another
/// daemon, not readable or writable, or its contents unloadable
/// (EX_CANTCREAT).
const EXIT_STATE_DIR: u8 = 73;

/// Watches and governs NVIDIA GPUs: streams telemetry over gRPC, accepts
/// control requests, and runs a thermal governor that lowers a hot GPU's power
/// limit and gives it back when it cools.
#[derive(Debug, Parser)]
#[command(
    name = "gpuwatch-server",
    version,
    after_help = "Configuration layers, later wins: built-in defaults < --config FILE < \
environment (GPUWATCH_SECTION__KEY, e.g. GPUWATCH_SAMPLER__INTERVAL=250ms) < flags.\n\n\
Examples:\n  gpuwatch-server --simulate                  # simulated GPUs, no driver needed\n  \
gpuwatch-server --config /etc/gpuwatch/gpuwatch.toml\n  \
gpuwatch-server --simulate --listen 127.0.0.1:0 --state-dir /tmp/gw"
)]
struct Args {
    /// TOML configuration file (see deploy/gpuwatch.toml for every key).
    #[arg(long, short = 'c', value_name = "FILE", env = "GPUWATCH_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:9450]; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// HTTP listen address for /metrics, the dashboard and /healthz
    /// [default: 127.0.0.1:9451]; "off" disables it.
    #[arg(long, value_name = "ADDR|off", value_parser = parse_http_listen)]
    http_listen: Option<HttpListen>,
    /// Run on simulated GPUs ([simulator] in the config, or a demo fleet).
    #[arg(long)]
    simulate: bool,
    /// Where desired state and the event log live.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Sampler interval, e.g. 100ms [default: 100ms].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    sampler_interval: Option<Duration>,
    /// Governor decides and records but never writes.
    #[arg(long)]
    dry_run: bool,
    /// Log filter, e.g. info, debug, gpuwatch=debug.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Metric names /metrics serves: native, dcgm-exporter or both
    /// [default: native].
    #[arg(long, value_name = "PROFILE", value_parser = config::MetricsProfile::parse)]
    metrics_profile: Option<config::MetricsProfile>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Once serving, write the bound addresses here as JSON
    /// (`{"pid":…,"grpc":"127.0.0.1:9450","http":"127.0.0.1:9451"|null}`),
    /// for supervisors and tests that start the daemon on port 0.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
}

/// `--http-listen`: an address, or "off".
#[derive(Debug, Clone, Copy)]
struct HttpListen(Option<SocketAddr>);

fn parse_http_listen(text: &str) -> Result<HttpListen, String> {
    config::parse_optional_addr(text).map(HttpListen)
}

fn init_logging(config: &Config) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .map_err(|e| format!("invalid value for `log.level`: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. Both handlers are installed by this call,
/// not when the future is first polled, so a signal that arrives while the
/// daemon is still starting (in the middle of its startup repairs) is taken
/// as a request to stop, never a kill with the default disposition.
#[cfg(unix)]
fn wait_for_signal() -> impl Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        match (term, int) {
            (Some(mut term), Some(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Some(mut term), None) => {
                term.recv().await;
            }
            (None, Some(mut int)) => {
                int.recv().await;
            }
            (None, None) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn wait_for_signal() -> impl Future<Output = ()> + Send {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Writes the ready file atomically (a temporary file renamed into place),
/// so a reader never sees half of it.
fn write_ready_file(path: &Path, daemon: &gpuwatch_server::daemon::Daemon) -> std::io::Result<()> {
    let ready = serde_json::json!({
        "pid": std::process::id(),
        "grpc": daemon.grpc_addr().to_string(),
        "http": daemon.http_addr().map(|a| a.to_string()),
    });
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{ready}\n"))?;
    std::fs::rename(&tmp, path)
}

fn main() -> ExitCode {
    // Before any thread: they keep the arena they are given.
    gpuwatch_server::memory::configure_allocator();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            // --help and --version are not errors; a bad flag is EX_USAGE.
            return if usage {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let overrides = Overrides {
        listen: args.listen,
        http_listen: args.http_listen.map(|h| h.0),
        simulate: args.simulate,
        state_dir: args.state_dir.clone(),
        sampler_interval: args.sampler_interval,
        dry_run: args.dry_run,
        log_level: args.log_level.clone(),
        metrics_profile: args.metrics_profile,
    };
    let config = match config::load(args.config.as_deref(), std::env::vars(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpuwatch-server: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = init_logging(&config) {
        eprintln!("gpuwatch-server: configuration error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if args.check_config {
        let files = gpuwatch_server::tls::load(&config.tls)
            .map(|_| ())
            .and_then(|()| {
                config::tokens(&config.auth)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = files {
            eprintln!("gpuwatch-server: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpuwatch-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Signals stop the daemon from here on, during startup too: a stop
        // asked for mid-repair finishes (bounded) the repair, gives back
        // what the governor holds and exits cleanly (see `start_until`).
        let stop = tokio_util::sync::CancellationToken::new();
        let signal = wait_for_signal();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            signal.await;
            tracing::info!("signal received; shutting down");
            on_signal.cancel();
        });
        let daemon = match gpuwatch_server::daemon::start_until(config, stop).await {
            Ok(d) => d,
            Err(gpuwatch_server::daemon::DaemonError::Stopped) => {
                tracing::info!("stopped during startup");
                return ExitCode::SUCCESS;
            }
            Err(e @ gpuwatch_server::daemon::DaemonError::Config(_)) => {
                eprintln!("gpuwatch-server: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e @ gpuwatch_server::daemon::DaemonError::StateDir(_)) => {
                eprintln!("gpuwatch-server: {e}");
                return ExitCode::from(EXIT_STATE_DIR);
            }
            Err(e) => {
                eprintln!("gpuwatch-server: {e}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        if let Some(path) = &args.ready_file
            && let Err(e) = write_ready_file(path, &daemon)
        {
            eprintln!(
                "gpuwatch-server: cannot write the ready file {}: {e}",
                path.display()
            );
            daemon.shutdown_token().cancel();
            let _ = daemon.wait().await;
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
        match daemon.wait().await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gpuwatch-server: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
