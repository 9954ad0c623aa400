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

/// The `[simulator]` section of `idle-all`: 8 H100s (two of them in MIG
/// mode with three instances), four processes each in pods, under the
/// fleet's moving load.
fn all_features_simulator(gpus: u32) -> String {
    let mut s = String::from("[simulator]\nspeed = 1.0\n");
    for g in 0..gpus {
        s.push_str(
            "\n[[simulator.gpus]]\npreset = \"h100-sxm\"\n\
             demand = [ { at = \"0s\", watts = 350.0 }, { at = \"30s\", watts = 650.0, ramp = true }, \
             { at = \"60s\", watts = 350.0, ramp = true } ]\nrepeat = \"90s\"\n",
        );
        let mig = g < 2;
        if mig {
            s.push_str(
                "mig = { enabled = true, instances = [\"3g.40gb\", \"2g.20gb\", \"1g.10gb\"] }\n",
            );
        }
        s.push_str("processes = [\n");
        for i in 0..4u32 {
            let instance = if mig {
                format!(", mig_instance = {}", i % 3)
            } else {
                String::new()
            };
            s.push_str(&format!(
                "  {{ pid = {}, name = \"worker\", uid = 1000, memory_mib = 4000, namespace = \"bench\", pod = \"job-{g}\", container = \"c{i}\"{instance} }},\n",
                200_000 + g * 4 + i
            ));
        }
        s.push_str("]\n");
    }
    s
}

/// Idle with every feature the manager adds on: attribution (simulator
/// records), MIG polling on two GPUs, history (the default tiers) and a node
/// power budget set over gRPC.
pub fn idle_all(common: &Common, args: &IdleArgs) -> anyhow::Result<Figure> {
    let gpus = args.gpus.unwrap_or(8);
    let mut fig = Figure::new(
        "idle-all",
        format!(
            "idle footprint, every feature on: {gpus} simulated GPUs at 10 Hz (2 in MIG mode), 4 attributed processes each, history, a node power budget; no clients"
        ),
        common.runs(3),
        common.quick,
    );
    let spec = DaemonSpec {
        simulator_toml: Some(all_features_simulator(gpus)),
        extra_toml: format!(
            "[[auth.tokens]]\nname = \"bench\"\nrole = \"control\"\ntoken = \"{BENCH_TOKEN}\"\n"
        ),
        ..DaemonSpec::fleet(gpus, Duration::from_millis(100))
    };
    // Enough for every GPU's load: the budget has work (it divides and
    // redistributes) without holding the GPUs down.
    let budget_watts = 600 * gpus;
    let client = common.client.clone();
    measure_with(
        common,
        args,
        &spec,
        Duration::from_millis(100),
        &mut fig,
        Target::AtMost(1.0),
        Some(Target::AtMost(24.0)),
        &|daemon: &Daemon| set_budget(&client, &daemon.url(), budget_watts),
    )?;
    fig.note(format!(
        "history on (default tiers), attribution on simulator records (4 processes per GPU, 2 GPUs in MIG mode), a {budget_watts} W node power budget set with `gpuwatch-client set-power-budget` before the warm-up"
    ));
    Ok(fig.finish())
}

/// The control token `idle-all`'s daemon accepts (loopback, throwaway).
const BENCH_TOKEN: &str = "bench-control-token";

/// `gpuwatch-client set-power-budget URL --watts N`.
fn set_budget(client: &std::path::Path, url: &str, watts: u32) -> anyhow::Result<()> {
    crate::check_binary(client, "the fleet CLI")?;
    let out = std::process::Command::new(client)
        .args(["set-power-budget", url, "--watts", &watts.to_string()])
        .args(["--token", BENCH_TOKEN])
        .output()
        .with_context(|| format!("running {}", client.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "gpuwatch-client set-power-budget {url} --watts {watts} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn sampler(common: &Common, args: &SamplerArgs) -> anyhow::Result<Figure> {
    let gpus = args.base.gpus.unwrap_or(8);
    let interval = args.interval.unwrap_or(Duration::from_millis(10));
    let hz = 1.0 / interval.as_secs_f64();
    let mut fig = Figure::new(
        "sampler",
        format!("sampler cost: {gpus} simulated GPUs at {hz:.0} Hz, no clients"),
        // Issue 18 states this target as the median of at least 5 runs.
        common.runs(5),
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
    let spec = DaemonSpec::fleet(args.gpus.unwrap_or(8), interval);
    measure_with(
        common,
        args,
        &spec,
        interval,
        fig,
        cpu_target,
        rss_target,
        &|_| Ok(()),
    )
}

/// [`measure`] for a daemon started from `spec`, `prepare`d once started.
#[allow(clippy::too_many_arguments)]
fn measure_with(
    common: &Common,
    args: &IdleArgs,
    spec: &DaemonSpec,
    interval: Duration,
    fig: &mut Figure,
    cpu_target: Target,
    rss_target: Option<Target>,
    prepare: &dyn Fn(&Daemon) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let window = args
        .window
        .unwrap_or(common.pick(Duration::from_secs(30), Duration::from_secs(2)));
    let warmup = args
        .warmup
        .unwrap_or(common.pick(Duration::from_secs(5), Duration::from_secs(1)));
    let rt = common.runtime()?;
    for run in 1..=fig.runs {
        let mut daemon = Daemon::start(&common.server, spec)?;
        prepare(&daemon)?;
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
