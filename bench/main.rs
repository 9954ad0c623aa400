//! `gpuwatch-bench`: the performance harness behind BENCHMARKS.md.
//!
//! Every figure in BENCHMARKS.md is one subcommand here. Each drives the
//! real daemon binary (`target/release/gpuwatch-server`, started fresh for
//! every run on simulated GPUs) over real loopback sockets, repeats the
//! measurement `--runs` times, and prints the median and the spread (min–max)
//! of every figure with the machine it ran on and its load average. `--out
//! FILE` appends the same results as JSON lines; `--quick` shrinks every
//! figure to a few seconds, which is what CI's smoke run uses to prove the
//! harness still works (its numbers mean nothing).
//!
//! The load generators live in this process (or, for the stalled
//! subscribers, in a helper copy of it); their CPU is measured and reported
//! apart from the daemon's, since both share the same cores.

mod attribution;
mod baseline;
mod client_fleet;
mod compare;
mod daemon;
mod fanout;
mod history;
mod http1;
mod idle;
mod lite;
mod machine;
mod nvml;
mod polling;
mod proc;
mod report;
mod scrape;
mod startup;
mod stats;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

use crate::report::Figure;

/// Measures gpuwatch: footprint, fan-out, polling, scrapes, startup, the
/// fleet CLI, a Flask/Gunicorn baseline and (with a GPU) the NVML backend.
#[derive(Debug, Parser)]
#[command(
    name = "gpuwatch-bench",
    version,
    after_help = "Build first: cargo build --release. Every figure starts its own daemons on \
loopback ports and stops them. Examples:\n  \
gpuwatch-bench idle\n  \
gpuwatch-bench fanout --runs 5 --out results.jsonl\n  \
gpuwatch-bench all --out results.jsonl\n  \
gpuwatch-bench all --quick          # seconds per figure: proves the harness works\n  \
gpuwatch-bench compare --against /tmp/old-gpuwatch-server fanout polling"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    figure: Command,
}

/// Options of every figure.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The daemon binary to measure.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "target/release/gpuwatch-server",
        env = "GPUWATCH_BENCH_SERVER"
    )]
    pub server: PathBuf,
    /// The fleet CLI binary (client-snapshot, client-watch).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "target/release/gpuwatch-client",
        env = "GPUWATCH_BENCH_CLIENT"
    )]
    pub client: PathBuf,
    /// Runs per figure (the median and the spread are over these); the
    /// default is each figure's own (3, or more for short figures).
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: Option<u32>,
    /// Append every figure's results to FILE as one JSON object per line.
    #[arg(long, global = true, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Seconds per figure, one run, small loads: proves the harness works;
    /// the figures mean nothing.
    #[arg(long, global = true)]
    pub quick: bool,
    /// Worker threads of the load generator's async runtime.
    #[arg(long, global = true, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
}

impl Common {
    /// Runs for a figure whose default is `default`.
    pub fn runs(&self, default: u32) -> u32 {
        if self.quick {
            1
        } else {
            self.runs.unwrap_or(default)
        }
    }

    /// `full` normally, `quick` with --quick.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    /// A tokio runtime for a load generator.
    pub fn runtime(&self) -> anyhow::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads as usize)
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start the load generator's runtime: {e}"))
    }
}

/// A duration flag such as 30s or 250ms.
fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("\"{text}\" is not a duration ({e}); e.g. 30s, 250ms, 2m"))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the machine's description (cores, CPU, memory, kernel, load).
    Machine,
    /// Print the daemon config the figures use (simulated H100s under a
    /// moving load), for running the daemon by hand or from other tools.
    Config(ConfigArgs),
    /// Idle footprint: 8 GPUs at 10 Hz, no clients — CPU % of a core, RSS.
    Idle(idle::IdleArgs),
    /// Idle with every feature on: attribution, MIG polling, history and a
    /// node power budget — CPU % of a core, RSS.
    #[command(name = "idle-all")]
    IdleAll(idle::IdleArgs),
    /// Sampler cost: 8 GPUs at 100 Hz, no clients — CPU % of a core.
    Sampler(idle::SamplerArgs),
    /// History: 24 h x 8 GPU and 1 h x 1 s GetHistory latency and CPU, the
    /// write cost at 10 Hz (history on vs off), disk per GPU-day.
    History(history::HistoryArgs),
    /// Fan-out: 1,000 Watch subscribers × 8 GPUs at 10 Hz — delivery,
    /// sample→client latency, daemon CPU and memory.
    Fanout(fanout::FanoutArgs),
    /// Fan-out: 10,000 Watch subscribers at 1 Hz — delivery and memory.
    #[command(name = "fanout-10k")]
    Fanout10k(fanout::Fanout10kArgs),
    /// Slow subscribers: 10 % of 1,000 frozen for 30 s — the others'
    /// latency and the daemon's memory.
    SlowSubscribers(fanout::SlowArgs),
    /// Attribution: 8 GPUs × 64 processes in 16 containers — the daemon's
    /// CPU with attribution off, on simulator records, on the kernel's /proc
    /// (512 real processes) and on a fixture /proc.
    Attribution,
    /// Snapshot polling: GetSnapshot over a few connections — requests/s,
    /// latency, daemon CPU per request.
    Polling(polling::PollingArgs),
    /// `/metrics` scrape of 8 GPUs: latency of scrapes that meet a new frame
    /// and of back-to-back scrapes.
    Scrape(scrape::ScrapeArgs),
    /// Startup to serving with the simulator: spawn → "listening" and
    /// spawn → first GetSnapshot answered.
    Startup(startup::StartupArgs),
    /// `gpuwatch-client snapshot` across 256 endpoints: wall time.
    ClientSnapshot(client_fleet::ClientSnapshotArgs),
    /// `gpuwatch-client watch` of 256 hosts at 1 s: the client's CPU.
    ClientWatch(client_fleet::ClientWatchArgs),
    /// The architecture gpuwatch replaces: Flask under Gunicorn answering
    /// JSON polls, side by side with GetSnapshot and /api/v1/dashboard.
    Baseline(baseline::BaselineArgs),
    /// A real NVIDIA GPU, read-only: one sample through the NVML backend
    /// against one `nvidia-smi --query-gpu`, and the daemon's CPU at 10 Hz.
    Nvml(nvml::NvmlArgs),
    /// Every figure above, one after the other (nvml only when a GPU is
    /// present or --nvml-library is given).
    All(AllArgs),
    /// Two daemon builds side by side: each named figure run once per
    /// build per round (--runs rounds, default 3), alternating which goes
    /// first, then a before/after table with the ratio of every metric.
    Compare(compare::CompareArgs),
    /// Internal: the stalled subscribers of `slow-subscribers`, run in a
    /// helper process the harness freezes with SIGSTOP.
    #[command(hide = true)]
    SubscribeHelper(fanout::HelperArgs),
}

/// Options of `config`.
#[derive(Debug, Args)]
struct ConfigArgs {
    /// Simulated GPUs.
    #[arg(long, default_value_t = 8)]
    gpus: u32,
    /// The sampler's interval.
    #[arg(long, default_value = "100ms", value_parser = duration)]
    interval: Duration,
}

/// Options of `all`.
#[derive(Debug, Args)]
struct AllArgs {
    /// Leave out these figures (comma-separated subcommand names).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    skip: Vec<String>,
    /// Run the nvml figure with this libnvidia-ml.so (e.g. the stand-in
    /// target/release/libfakenvml.so, to exercise the subcommand).
    #[arg(long, value_name = "PATH")]
    nvml_library: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::SubscribeHelper(args) = &cli.figure {
        return match fanout::run_helper(&cli.common, args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gpuwatch-bench subscribe-helper: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpuwatch-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let common = &cli.common;
    let machine = machine::Machine::describe();
    match &cli.figure {
        Command::Machine => {
            println!("{}", machine.describe_text());
            return Ok(());
        }
        Command::Config(c) => {
            print!("{}", daemon::DaemonSpec::fleet(c.gpus, c.interval).toml());
            return Ok(());
        }
        _ => {}
    }
    println!("{}", machine.describe_text());
    if let Command::Compare(c) = &cli.figure {
        return run_compare(common, c, &machine);
    }
    let needs_server = !matches!(cli.figure, Command::Nvml(_));
    if needs_server {
        check_binary(&common.server, "the daemon")?;
    }
    let figures: Vec<FigureFn> = match &cli.figure {
        Command::Machine
        | Command::Config(_)
        | Command::SubscribeHelper(_)
        | Command::Compare(_) => Vec::new(),
        Command::Idle(a) => vec![("idle", Box::new(|| idle::idle(common, a)))],
        Command::IdleAll(a) => vec![("idle-all", Box::new(|| idle::idle_all(common, a)))],
        Command::Sampler(a) => vec![("sampler", Box::new(|| idle::sampler(common, a)))],
        Command::History(a) => vec![("history", Box::new(|| history::history(common, a)))],
        Command::Fanout(a) => vec![("fanout", Box::new(|| fanout::fanout(common, a)))],
        Command::Fanout10k(a) => vec![("fanout-10k", Box::new(|| fanout::fanout_10k(common, a)))],
        Command::SlowSubscribers(a) => {
            vec![("slow-subscribers", Box::new(|| fanout::slow(common, a)))]
        }
        Command::Polling(a) => vec![("polling", Box::new(|| polling::polling(common, a)))],
        Command::Attribution => {
            vec![("attribution", Box::new(|| attribution::attribution(common)))]
        }
        Command::Scrape(a) => vec![("scrape", Box::new(|| scrape::scrape(common, a)))],
        Command::Startup(a) => vec![("startup", Box::new(|| startup::startup(common, a)))],
        Command::ClientSnapshot(a) => vec![(
            "client-snapshot",
            Box::new(|| client_fleet::client_snapshot(common, a)),
        )],
        Command::ClientWatch(a) => vec![(
            "client-watch",
            Box::new(|| client_fleet::client_watch(common, a)),
        )],
        Command::Baseline(a) => vec![("baseline", Box::new(|| baseline::baseline(common, a)))],
        Command::Nvml(a) => vec![("nvml", Box::new(|| nvml::nvml(common, a)))],
        Command::All(all) => all_figures(common, all),
    };
    let mut failed = Vec::new();
    for (name, figure) in figures {
        eprintln!("\n== {name}");
        match figure() {
            Ok(figure) => {
                print!("{}", figure.to_text());
                if let Some(out) = &common.out {
                    figure.append_json(out, &machine)?;
                }
            }
            Err(e) => {
                eprintln!("gpuwatch-bench {name}: {e:#}");
                failed.push(name);
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("these figures could not be measured: {}", failed.join(", "))
    }
}

/// A figure by name, ready to measure.
pub(crate) type FigureFn<'a> = (&'a str, Box<dyn Fn() -> anyhow::Result<Figure> + 'a>);

/// `compare`: the named figures with `--against` (before) and `--server`
/// (after), alternating, then the table.
fn run_compare(
    common: &Common,
    args: &compare::CompareArgs,
    machine: &machine::Machine,
) -> anyhow::Result<()> {
    check_binary(&args.against, "the --against daemon")?;
    check_binary(&common.server, "the --server daemon")?;
    let rounds = common.runs(3);
    let after_common = Common {
        runs: Some(1),
        ..common.clone()
    };
    let before_common = Common {
        server: args.against.clone(),
        ..after_common.clone()
    };
    let every = AllArgs {
        skip: Vec::new(),
        nvml_library: None,
    };
    let before_list = all_figures(&before_common, &every);
    let after_list = all_figures(&after_common, &every);
    for name in &args.figures {
        if !after_list.iter().any(|(n, _)| n == name) {
            anyhow::bail!(
                "no figure named \"{name}\"; compare can run: {}",
                compare::names(&after_list).join(", ")
            );
        }
    }
    let (before_bin, after_bin) = (
        args.against.display().to_string(),
        common.server.display().to_string(),
    );
    for name in &args.figures {
        eprintln!("\n== compare {name}");
        let mut c = compare::compare_one(name, &before_list, &after_list, rounds)?;
        print!("{}", c.to_text(&before_bin, &after_bin));
        if let Some(out) = &common.out {
            c.before.build = Some(format!("before: {before_bin}"));
            c.after.build = Some(format!("after: {after_bin}"));
            c.before.append_json(out, machine)?;
            c.after.append_json(out, machine)?;
        }
    }
    Ok(())
}

fn all_figures<'a>(common: &'a Common, all: &'a AllArgs) -> Vec<FigureFn<'a>> {
    let mut list: Vec<FigureFn<'a>> = vec![
        (
            "startup",
            Box::new(|| startup::startup(common, &Default::default())),
        ),
        ("idle", Box::new(|| idle::idle(common, &Default::default()))),
        (
            "idle-all",
            Box::new(|| idle::idle_all(common, &Default::default())),
        ),
        (
            "sampler",
            Box::new(|| idle::sampler(common, &Default::default())),
        ),
        (
            "scrape",
            Box::new(|| scrape::scrape(common, &Default::default())),
        ),
        (
            "history",
            Box::new(|| history::history(common, &Default::default())),
        ),
        ("attribution", Box::new(|| attribution::attribution(common))),
        (
            "polling",
            Box::new(|| polling::polling(common, &Default::default())),
        ),
        (
            "fanout",
            Box::new(|| fanout::fanout(common, &Default::default())),
        ),
        (
            "fanout-10k",
            Box::new(|| fanout::fanout_10k(common, &Default::default())),
        ),
        (
            "slow-subscribers",
            Box::new(|| fanout::slow(common, &Default::default())),
        ),
        (
            "baseline",
            Box::new(|| baseline::baseline(common, &Default::default())),
        ),
        (
            "client-snapshot",
            Box::new(|| client_fleet::client_snapshot(common, &Default::default())),
        ),
        (
            "client-watch",
            Box::new(|| client_fleet::client_watch(common, &Default::default())),
        ),
    ];
    if all.nvml_library.is_some() || nvml::gpu_present() {
        list.push((
            "nvml",
            Box::new(|| {
                nvml::nvml(
                    common,
                    &nvml::NvmlArgs {
                        library: all.nvml_library.clone(),
                        ..Default::default()
                    },
                )
            }),
        ));
    }
    list.retain(|(name, _)| !all.skip.iter().any(|s| s == name));
    list
}

/// Fails with a clear message when a binary the figure needs is missing.
pub fn check_binary(path: &Path, what: &str) -> anyhow::Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        anyhow::bail!(
            "{what} binary {} does not exist; run `cargo build --release` first (or pass its path)",
            path.display()
        )
    }
}
