//! The daemon on its own: the idle footprint (8 GPUs at 10 Hz, nobody
//! connected) and the sampler's cost at 100 Hz. The daemon's CPU is read
//! from `/proc` over a window after a warm-up; memory is its resident set
//! at the end of the window. Each figure also checks the sampler kept its
//! cadence (ticks published against the window's wall time), since a cheap
//! sampler that skips ticks would be no figure at all.

use std::{thread, time::Duration};

use anyhow::Context;
use clap::Args;
use tonic::client::Grpc;

use crate::{
    Common,
    daemon::{Daemon, DaemonSpec},
    duration, lite, proc,
    report::{Figure, Target},
};

/// Options of `idle`.
#[derive(Debug, Clone, Default, Args)]
pub struct IdleArgs {
    /// Simulated GPUs [default: 8].
    #[arg(long)]
    pub gpus: Option<u32>,
    /// How long CPU is measured per run [default: 30s].
    #[arg(long, value_parser = duration)]
    pub window: Option<Duration>,
    /// Time after startup before measuring [default: 5s].
    #[arg(long, value_parser = duration)]
    pub warmup: Option<Duration>,
}

/// Options of `sampler`.
#[derive(Debug, Clone, Default, Args)]
pub struct SamplerArgs {
    #[command(flatten)]
    pub base: IdleArgs,
    /// The sampler's interval [default: 10ms, i.e. 100 Hz].
    #[arg(long, value_parser = duration)]
    pub interval: Option<Duration>,
}

pub fn idle(common: &Common, args: &IdleArgs) -> anyhow::Result<Figure> {
    let gpus = args.gpus.unwrap_or(8);
    let mut fig = Figure::new(
        "idle",
        format!("idle footprint: {gpus} simulated GPUs at 10 Hz, no clients"),
        common.runs(3),
        common.quick,
    );
    measure(
        common,
        args,
        Duration::from_millis(100),
        &mut fig,
        Target::AtMost(1.0),
        Some(Target::AtMost(20.0)),
    )?;
    Ok(fig.finish())
}

pub fn sampler(common: &Common, args: &SamplerArgs) -> anyhow::Result<Figure> {
    let gpus = args.base.gpus.unwrap_or(8);
    let interval = args.interval.unwrap_or(Duration::from_millis(10));
    let hz = 1.0 / interval.as_secs_f64();
    let mut fig = Figure::new(
        "sampler",
        format!("sampler cost: {gpus} simulated GPUs at {hz:.0} Hz, no clients"),
        common.runs(3),
        common.quick,
    );
    measure(
        common,
        &args.base,
        interval,
        &mut fig,
        Target::AtMost(3.0),
        None,
    )?;
    fig.note(
        "the whole daemon's CPU (sampler, governor, hub, idle runtime): an upper bound on the sampler's own cost",
    );
    Ok(fig.finish())
}

fn measure(
    common: &Common,
    args: &IdleArgs,
    interval: Duration,
    fig: &mut Figure,
    cpu_target: Target,
    rss_target: Option<Target>,
) -> anyhow::Result<()> {
    let gpus = args.gpus.unwrap_or(8);
    let window = args
        .window
        .unwrap_or(common.pick(Duration::from_secs(30), Duration::from_secs(2)));
    let warmup = args
        .warmup
        .unwrap_or(common.pick(Duration::from_secs(5), Duration::from_secs(1)));
    let rt = common.runtime()?;
    for run in 1..=fig.runs {
        let mut daemon = Daemon::start(&common.server, &DaemonSpec::fleet(gpus, interval))?;
        thread::sleep(warmup);
        let first = rt.block_on(latest_seq(&daemon.url()))?;
        let meter = proc::CpuMeter::start(&[daemon.pid])?;
        sleep_watching(&mut daemon, window)?;
        let (cpu, wall) = meter.percent()?;
        let rss = proc::rss_mib(daemon.pid)?;
        let peak = proc::peak_rss_mib(daemon.pid)?;
        let last = rt.block_on(latest_seq(&daemon.url()))?;
        daemon.stop()?;
        let expected = wall.as_secs_f64() / interval.as_secs_f64();
        let ticks = last.saturating_sub(first) as f64;
        eprintln!(
            "  run {run}: daemon CPU {cpu:.2} % of a core over {:.1} s, RSS {rss:.1} MiB, {ticks:.0} ticks of ~{expected:.0}",
            wall.as_secs_f64()
        );
        fig.record("daemon CPU", "% core", Some(cpu_target), cpu);
        fig.record("daemon RSS", "MiB", rss_target, rss);
        fig.record("daemon peak RSS (VmHWM)", "MiB", None, peak);
        fig.record(
            "ticks published / expected",
            "%",
            Some(Target::AtLeast(99.0)),
            100.0 * ticks / expected.max(1.0),
        );
    }
    fig.note(format!(
        "CPU = utime+stime of /proc/PID/stat over a {window:?} window after a {warmup:?} warm-up, divided by wall time (100 % = one core); RSS = VmRSS at the window's end; gRPC and HTTP listeners open, nobody connected"
    ));
    Ok(())
}

/// Sleeps `total`, failing early if the daemon dies.
pub fn sleep_watching(daemon: &mut Daemon, total: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + total;
    loop {
        daemon.check_alive()?;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        thread::sleep(left.min(Duration::from_millis(500)));
    }
}

/// The daemon's latest tick, from one GetSnapshot on a new connection.
pub async fn latest_seq(url: &str) -> anyhow::Result<u64> {
    let channel = lite::connect(url).await?;
    let mut grpc = Grpc::new(channel);
    let snap = lite::snapshot(&mut grpc)
        .await
        .with_context(|| format!("GetSnapshot on {url}"))?;
    Ok(snap.seq)
}
