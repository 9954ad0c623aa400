//! Fan-out: many `Watch` subscribers on one daemon. Three figures share the
//! machinery here: 1,000 subscribers at 10 Hz, 10,000 at 1 Hz, and 1,000
//! of which 10 % freeze for 30 s.
//!
//! Subscribers are multiplexed over a handful of HTTP/2 connections and
//! decode only what they check (see `lite`). Each keeps a tally: every
//! frame's seq (to prove delivery: consecutive frames must be `stride`
//! apart unless a gap says why), the gaps it was sent, and the latency of
//! every sample in every frame received during the measured window —
//! receive time minus `GpuSample.time`, the moment the GPU was read, both
//! on this machine's clock.
//!
//! Delivery is counted over a window of ticks: from the daemon's latest seq
//! when the window opens (`lo`) to its latest seq when it closes (`hi`),
//! after which the subscribers drain for a moment before they stop. A
//! subscriber is owed every `stride`-th tick after the last frame it had at
//! `lo`, up to `hi`.
//!
//! The frozen subscribers of `slow-subscribers` run in a helper copy of
//! this binary (`subscribe-helper`) that the harness stops with SIGSTOP:
//! its sockets stop being read at all, the hardest kind of slow client,
//! and its own connections keep HTTP/2 flow control honest (streams that
//! share a connection with a frozen reader would stall with it in any
//! client). The helper reports its tally as JSON on stdout when its stdin
//! closes.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    Common,
    daemon::{self, Daemon, DaemonSpec},
    duration,
    http1::{Http1, metric_value},
    idle::latest_seq,
    lite::{self, GAP_SLOW_SUBSCRIBER, WatchMsg},
    proc,
    report::{Figure, Target},
    stats::Latency,
};

/// Options of `fanout` and `fanout-10k`.
#[derive(Debug, Clone, Default, Args)]
pub struct FanoutArgs {
    /// Watch subscribers [default: 1000; fanout-10k: 10000].
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// HTTP/2 connections they share [default: 4; fanout-10k: 8].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Each subscriber's interval [default: 100ms; fanout-10k: 1s].
    #[arg(long, value_parser = duration)]
    pub interval: Option<Duration>,
    /// Simulated GPUs [default: 8].
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Measured window per run [default: 30s].
    #[arg(long, value_parser = duration)]
    pub window: Option<Duration>,
    /// Time after every subscriber is streaming, before the window
    /// [default: 5s].
    #[arg(long, value_parser = duration)]
    pub warmup: Option<Duration>,
}

/// Options of `fanout-10k` (the same as `fanout`, other defaults).
#[derive(Debug, Clone, Default, Args)]
pub struct Fanout10kArgs {
    #[command(flatten)]
    pub base: FanoutArgs,
}

/// Options of `slow-subscribers`.
#[derive(Debug, Clone, Default, Args)]
pub struct SlowArgs {
    /// Watch subscribers in all [default: 1000].
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Percent of them that freeze [default: 10].
    #[arg(long)]
    pub stalled_pct: Option<f64>,
    /// How long they stay frozen; also the length of the window before
    /// the freeze that the others' latency is compared with [default: 30s].
    #[arg(long, value_parser = duration)]
    pub stall: Option<Duration>,
    /// HTTP/2 connections of the subscribers that keep reading [default: 4].
    #[arg(long)]
    pub connections: Option<usize>,
    /// HTTP/2 connections of the frozen ones [default: 1].
    #[arg(long)]
    pub stalled_connections: Option<usize>,
    /// Simulated GPUs [default: 8].
    #[arg(long)]
    pub gpus: Option<u32>,
}

/// Options of the hidden `subscribe-helper`.
#[derive(Debug, Clone, Args)]
pub struct HelperArgs {
    /// The daemon's gRPC URL.
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub subscribers: usize,
    #[arg(long)]
    pub connections: usize,
    #[arg(long)]
    pub interval_ms: u32,
}

/// Measurement phases, as subscribers see them.
const PHASE_IDLE: u8 = 0;
const PHASE_A: u8 = 1;
const PHASE_B: u8 = 2;

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Tally {
    started: bool,
    stride: u64,
    /// Every frame's seq, in arrival order (the start's current frame too).
    seqs: Vec<u64>,
    gaps: Vec<lite::GapMsg>,
    /// Consecutive frames not `stride` apart without a gap between them.
    violations: u64,
    after_gap: bool,
    /// Sample latencies in phase A and phase B.
    latency: [Latency; 2],
    error: Option<String>,
}

impl Tally {
    fn on_message(&mut self, message: WatchMsg, phase: u8, now: f64) {
        if let Some(start) = message.start {
            self.started = true;
            self.stride = u64::from(start.stride.max(1));
            if let Some(current) = start.current {
                self.seqs.push(current.seq);
            }
        }
        if let Some(gap) = message.gap {
            self.gaps.push(gap);
            self.after_gap = true;
        }
        if let Some(frame) = message.frame {
            if let Some(&last) = self.seqs.last()
                && !self.after_gap
                && frame.seq != last + self.stride
            {
                self.violations += 1;
            }
            self.after_gap = false;
            self.seqs.push(frame.seq);
            if let Some(slot) = match phase {
                PHASE_A => Some(0),
                PHASE_B => Some(1),
                _ => None,
            } {
                for sample in &frame.samples {
                    if let Some(t) = &sample.time {
                        self.latency[slot].record_secs(now - lite::unix_secs(t));
                    }
                }
            }
        }
    }

    /// (delivered, owed) frames with seq in (lo, hi].
    fn delivery(&self, lo: u64, hi: u64) -> (u64, u64) {
        let stride = self.stride.max(1);
        let delivered = self.seqs.iter().filter(|s| **s > lo && **s <= hi).count() as u64;
        let gapped: u64 = self
            .gaps
            .iter()
            .filter(|g| g.last_seq > lo && g.first_seq <= hi)
            .map(|g| g.missed)
            .sum();
        let owed = match self.seqs.iter().rev().find(|s| **s <= lo) {
            Some(anchor) if gapped == 0 => (hi.saturating_sub(*anchor)) / stride,
            // Started late, or lost frames: what it got plus what it was
            // told it lost.
            _ => delivered + gapped,
        };
        (delivered, owed.max(delivered))
    }
}

/// Shared by a swarm's subscribers.
#[derive(Debug, Default)]
struct Shared {
    phase: AtomicU8,
    started: AtomicUsize,
    failed: AtomicUsize,
    stop: CancellationToken,
}

/// Subscribers running in this process.
struct Swarm {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<Tally>>,
}

impl Swarm {
    /// Opens `connections` connections and `subscribers` Watch streams over
    /// them (round robin).
    async fn start(
        url: &str,
        subscribers: usize,
        connections: usize,
        interval_ms: u32,
    ) -> anyhow::Result<Self> {
        let mut channels = Vec::new();
        for _ in 0..connections.max(1) {
            channels.push(lite::connect(url).await?);
        }
        let shared = Arc::new(Shared::default());
        let tasks = (0..subscribers)
            .map(|i| {
                let channel = channels[i % channels.len()].clone();
                let shared = shared.clone();
                tokio::spawn(subscribe(channel, interval_ms, shared))
            })
            .collect();
        Ok(Self { shared, tasks })
    }

    /// Waits until every subscriber has its `start` message.
    async fn wait_started(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let want = self.tasks.len();
        loop {
            let started = self.shared.started.load(Ordering::Relaxed);
            let failed = self.shared.failed.load(Ordering::Relaxed);
            if failed > 0 {
                bail!("{failed} of {want} subscribers could not start their stream");
            }
            if started >= want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("only {started} of {want} subscribers started within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn set_phase(&self, phase: u8) {
        self.shared.phase.store(phase, Ordering::Relaxed);
    }

    /// Stops every subscriber and collects their tallies.
    async fn finish(self) -> Vec<Tally> {
        self.shared.stop.cancel();
        let mut tallies = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            match task.await {
                Ok(t) => tallies.push(t),
                Err(e) => tallies.push(Tally {
                    error: Some(format!("subscriber task failed: {e}")),
                    ..Tally::default()
                }),
            }
        }
        tallies
    }
}

async fn subscribe(
    channel: tonic::transport::Channel,
    interval_ms: u32,
    shared: Arc<Shared>,
) -> Tally {
    let mut tally = Tally::default();
    let mut stream = match lite::watch(channel, interval_ms).await {
        Ok(s) => s,
        Err(status) => {
            tally.error = Some(format!("Watch refused: {status}"));
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return tally;
        }
    };
    loop {
        let next = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break,
            next = stream.message() => next,
        };
        match next {
            Ok(Some(message)) => {
                let first = !tally.started;
                tally.on_message(
                    message,
                    shared.phase.load(Ordering::Relaxed),
                    lite::now_unix_secs(),
                );
                if first && tally.started {
                    shared.started.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(None) => {
                tally.error = Some("the stream ended".into());
                break;
            }
            Err(status) => {
                tally.error = Some(format!("stream error: {status}"));
                if !tally.started {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
        }
    }
    tally
}

/// A swarm's results over one window.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Summary {
    subscribers: usize,
    delivered: u64,
    owed: u64,
    slow_gaps: u64,
    other_gaps: u64,
    missed_in_gaps: u64,
    violations: u64,
    errors: usize,
    first_error: Option<String>,
    /// Subscribers that got at least one frame after their gap (caught up).
    resumed_after_gap: usize,
}

impl Summary {
    fn of(tallies: &[Tally], lo: u64, hi: u64) -> Self {
        let mut s = Summary {
            subscribers: tallies.len(),
            ..Summary::default()
        };
        for t in tallies {
            let (delivered, owed) = t.delivery(lo, hi);
            s.delivered += delivered;
            s.owed += owed;
            for g in &t.gaps {
                if g.reason == GAP_SLOW_SUBSCRIBER {
                    s.slow_gaps += 1;
                } else {
                    s.other_gaps += 1;
                }
                s.missed_in_gaps += g.missed;
            }
            s.violations += t.violations;
            if let Some(e) = &t.error {
                s.errors += 1;
                s.first_error.get_or_insert_with(|| e.clone());
            }
            if let (Some(gap), Some(last)) = (t.gaps.last(), t.seqs.last())
                && *last > gap.last_seq
            {
                s.resumed_after_gap += 1;
            }
        }
        s
    }

    fn delivered_pct(&self) -> f64 {
        if self.owed == 0 {
            f64::NAN
        } else {
            100.0 * self.delivered as f64 / self.owed as f64
        }
    }
}

fn merged_latency(tallies: &[Tally], slot: usize) -> Latency {
    let mut all = Latency::new();
    for t in tallies {
        all.merge(&t.latency[slot]);
    }
    all
}

/// Samples the daemon's RSS every 500 ms until stopped; returns the peak.
fn watch_rss(pid: u32, stop: CancellationToken) -> JoinHandle<f64> {
    tokio::spawn(async move {
        let mut peak: f64 = 0.0;
        loop {
            if let Ok(rss) = proc::rss_mib(pid) {
                peak = peak.max(rss);
            }
            tokio::select! {
                _ = stop.cancelled() => return peak,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    })
}

/// Reads one counter from the daemon's /metrics.
async fn daemon_counter(daemon: &Daemon, name: &str) -> Option<f64> {
    let addr = daemon.http?;
    let mut http = Http1::connect(addr).await.ok()?;
    let body = http.get("/metrics", Some("text/plain")).await.ok()?;
    metric_value(&String::from_utf8_lossy(&body), name)
}

pub fn fanout(common: &Common, args: &FanoutArgs) -> anyhow::Result<Figure> {
    let subscribers = args.subscribers.unwrap_or(common.pick(1000, 50));
    let interval = args.interval.unwrap_or(Duration::from_millis(100));
    let gpus = args.gpus.unwrap_or(8);
    let mut fig = Figure::new(
        "fanout",
        format!(
            "fan-out: {subscribers} Watch subscribers x {gpus} GPUs, every {} ms",
            interval.as_millis()
        ),
        common.runs(3),
        common.quick,
    );
    run_fanout(
        common,
        args,
        subscribers,
        args.connections.unwrap_or(4),
        interval,
        &mut fig,
        FanoutTargets {
            latency_p99_ms: Some(5.0),
            daemon_cpu_pct: Some(10.0),
            daemon_rss_mib: None,
        },
    )?;
    Ok(fig.finish())
}

pub fn fanout_10k(common: &Common, args: &Fanout10kArgs) -> anyhow::Result<Figure> {
    let args = &args.base;
    let subscribers = args.subscribers.unwrap_or(common.pick(10_000, 200));
    let interval = args.interval.unwrap_or(Duration::from_secs(1));
    let gpus = args.gpus.unwrap_or(8);
    let mut fig = Figure::new(
        "fanout-10k",
        format!(
            "fan-out: {subscribers} Watch subscribers x {gpus} GPUs, every {} ms (sampler at 10 Hz)",
            interval.as_millis()
        ),
        common.runs(3),
        common.quick,
    );
    run_fanout(
        common,
        args,
        subscribers,
        args.connections.unwrap_or(8),
        interval,
        &mut fig,
        FanoutTargets {
            latency_p99_ms: None,
            daemon_cpu_pct: None,
            daemon_rss_mib: Some(80.0),
        },
    )?;
    Ok(fig.finish())
}

struct FanoutTargets {
    latency_p99_ms: Option<f64>,
    daemon_cpu_pct: Option<f64>,
    daemon_rss_mib: Option<f64>,
}

fn run_fanout(
    common: &Common,
    args: &FanoutArgs,
    subscribers: usize,
    connections: usize,
    interval: Duration,
    fig: &mut Figure,
    targets: FanoutTargets,
) -> anyhow::Result<()> {
    let gpus = args.gpus.unwrap_or(8);
    let window = args
        .window
        .unwrap_or(common.pick(Duration::from_secs(30), Duration::from_secs(3)));
    let warmup = args
        .warmup
        .unwrap_or(common.pick(Duration::from_secs(5), Duration::from_secs(1)));
    let interval_ms = u32::try_from(interval.as_millis())
        .map_err(|_| anyhow!("--interval {interval:?} is too long"))?;
    let rt = common.runtime()?;
    for run in 1..=fig.runs {
        let daemon = Daemon::start(
            &common.server,
            &DaemonSpec::fleet(gpus, Duration::from_millis(100)),
        )?;
        let url = daemon.url();
        let outcome = rt.block_on(async {
            let swarm = Swarm::start(&url, subscribers, connections, interval_ms).await?;
            let ready_within = Duration::from_secs(30 + subscribers as u64 / 200);
            swarm.wait_started(ready_within).await?;
            tokio::time::sleep(warmup).await;
            let lo = latest_seq(&url).await?;
            let rss_stop = CancellationToken::new();
            let rss_peak = watch_rss(daemon.pid, rss_stop.clone());
            let daemon_cpu = proc::CpuMeter::start(&[daemon.pid])?;
            let generator_cpu = proc::CpuMeter::this_process()?;
            swarm.set_phase(PHASE_A);
            tokio::time::sleep(window).await;
            swarm.set_phase(PHASE_IDLE);
            let (daemon_pct, wall) = daemon_cpu.percent()?;
            let (generator_pct, _) = generator_cpu.percent()?;
            let hi = latest_seq(&url).await?;
            rss_stop.cancel();
            let rss_peak = rss_peak.await.unwrap_or(f64::NAN);
            let dropped = daemon_counter(&daemon, "gpuwatch_frames_dropped_total").await;
            // Frames up to `hi` are owed: let them arrive.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let tallies = swarm.finish().await;
            anyhow::Ok((
                tallies,
                lo,
                hi,
                daemon_pct,
                generator_pct,
                wall,
                rss_peak,
                dropped,
            ))
        });
        let (tallies, lo, hi, daemon_pct, generator_pct, wall, rss_peak, dropped) = outcome?;
        daemon.stop()?;
        let summary = Summary::of(&tallies, lo, hi);
        let latency = merged_latency(&tallies, 0);
        let frames_per_s = summary.delivered as f64 / wall.as_secs_f64();
        eprintln!(
            "  run {run}: delivered {}/{} frames ({:.3} %), {} latencies, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, daemon CPU {daemon_pct:.1} %, generator CPU {generator_pct:.1} %, daemon RSS peak {rss_peak:.1} MiB, gaps {}, violations {}, errors {}{}",
            summary.delivered,
            summary.owed,
            summary.delivered_pct(),
            latency.count(),
            latency.quantile_ms(0.5),
            latency.quantile_ms(0.99),
            latency.max_ms(),
            summary.slow_gaps + summary.other_gaps,
            summary.violations,
            summary.errors,
            summary
                .first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})")),
        );
        fig.record(
            "samples delivered",
            "%",
            Some(Target::AtLeast(100.0)),
            summary.delivered_pct(),
        );
        fig.record("frames delivered", "frames/s", None, frames_per_s);
        fig.record("latency p50", "ms", None, latency.quantile_ms(0.5));
        fig.record(
            "latency p99",
            "ms",
            targets.latency_p99_ms.map(Target::AtMost),
            latency.quantile_ms(0.99),
        );
        fig.record("latency max", "ms", None, latency.max_ms());
        fig.record(
            "daemon CPU",
            "% core",
            targets.daemon_cpu_pct.map(Target::AtMost),
            daemon_pct,
        );
        fig.record(
            "daemon CPU per frame sent",
            "us",
            None,
            daemon_pct / 100.0 * 1e6 / frames_per_s.max(1e-9),
        );
        fig.record(
            "daemon RSS peak",
            "MiB",
            targets.daemon_rss_mib.map(Target::AtMost),
            rss_peak,
        );
        fig.record("generator CPU", "% core", None, generator_pct);
        fig.record(
            "gaps + seq violations + stream errors",
            "count",
            Some(Target::AtMost(0.0)),
            (summary.slow_gaps + summary.other_gaps + summary.violations) as f64
                + summary.errors as f64,
        );
        if let Some(d) = dropped {
            fig.record("daemon frames_dropped_total", "frames", None, d);
        }
    }
    fig.note(format!(
        "{subscribers} streams over {connections} HTTP/2 connections from one load generator ({} threads) on the same machine; latency = receive time - GpuSample.time (when the GPU was read), every sample of every frame received in the {window:?} window; delivery counted per subscriber over the ticks published in the window",
        common.threads
    ));
    Ok(())
}

pub fn slow(common: &Common, args: &SlowArgs) -> anyhow::Result<Figure> {
    let subscribers = args.subscribers.unwrap_or(common.pick(1000, 50));
    let pct = args.stalled_pct.unwrap_or(10.0);
    if !(0.0..100.0).contains(&pct) {
        bail!("--stalled-pct {pct}: allowed 0 to below 100");
    }
    let stalled = ((subscribers as f64) * pct / 100.0).round() as usize;
    let healthy = subscribers - stalled;
    let stall = args
        .stall
        .unwrap_or(common.pick(Duration::from_secs(30), Duration::from_secs(3)));
    let connections = args.connections.unwrap_or(4);
    let stalled_connections = args.stalled_connections.unwrap_or(1).max(1);
    let gpus = args.gpus.unwrap_or(8);
    let mut fig = Figure::new(
        "slow-subscribers",
        format!(
            "slow subscribers: {stalled} of {subscribers} Watch subscribers (10 Hz, {gpus} GPUs) frozen for {} s",
            stall.as_secs()
        ),
        common.runs(3),
        common.quick,
    );
    let helper_exe = std::env::current_exe().context("cannot find the harness's own binary")?;
    let rt = common.runtime()?;
    for run in 1..=fig.runs {
        let daemon = Daemon::start(
            &common.server,
            &DaemonSpec::fleet(gpus, Duration::from_millis(100)),
        )?;
        let url = daemon.url();
        let helper = Helper::start(&helper_exe, &url, stalled, stalled_connections, 100)?;
        let outcome = rt.block_on(async {
            let swarm = Swarm::start(&url, healthy, connections, 100).await?;
            swarm
                .wait_started(Duration::from_secs(30 + subscribers as u64 / 200))
                .await?;
            tokio::time::sleep(common.pick(Duration::from_secs(5), Duration::from_secs(1))).await;
            let rss_stop = CancellationToken::new();
            let lo = latest_seq(&url).await?;
            // Phase A: everybody reads.
            let rss_a = watch_rss(daemon.pid, rss_stop.clone());
            swarm.set_phase(PHASE_A);
            tokio::time::sleep(stall).await;
            rss_stop.cancel();
            let rss_a = rss_a.await.unwrap_or(f64::NAN);
            // Phase B: the helper's subscribers are frozen.
            let rss_stop = CancellationToken::new();
            let rss_b = watch_rss(daemon.pid, rss_stop.clone());
            daemon::signal(helper.pid(), "STOP");
            swarm.set_phase(PHASE_B);
            tokio::time::sleep(stall).await;
            swarm.set_phase(PHASE_IDLE);
            daemon::signal(helper.pid(), "CONT");
            rss_stop.cancel();
            let rss_b = rss_b.await.unwrap_or(f64::NAN);
            let hi = latest_seq(&url).await?;
            // Let the thawed subscribers catch up and the rest drain.
            tokio::time::sleep(common.pick(Duration::from_secs(5), Duration::from_secs(2))).await;
            let rss_after = proc::rss_mib(daemon.pid).unwrap_or(f64::NAN);
            let dropped = daemon_counter(&daemon, "gpuwatch_frames_dropped_total").await;
            let tallies = swarm.finish().await;
            anyhow::Ok((tallies, lo, hi, rss_a, rss_b, rss_after, dropped))
        });
        // Thaw the helper whatever happened, then collect its tally.
        daemon::signal(helper.pid(), "CONT");
        let (tallies, lo, hi, rss_a, rss_b, rss_after, dropped) = outcome?;
        let frozen = helper.finish(lo, hi)?;
        daemon.stop()?;
        let others = Summary::of(&tallies, lo, hi);
        let p99_a = merged_latency(&tallies, 0).quantile_ms(0.99);
        let p99_b = merged_latency(&tallies, 1).quantile_ms(0.99);
        let rise = 100.0 * (p99_b - p99_a) / p99_a;
        eprintln!(
            "  run {run}: others p99 {p99_a:.2} ms before, {p99_b:.2} ms during the freeze ({rise:+.1} %); others delivered {:.3} %, errors {}; daemon RSS peak {rss_a:.1} MiB before, {rss_b:.1} MiB during, {rss_after:.1} MiB after; frozen: {} slow gaps, {} resumed, {} errors{}",
            others.delivered_pct(),
            others.errors,
            frozen.slow_gaps,
            frozen.resumed_after_gap,
            frozen.errors,
            frozen
                .first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        );
        fig.record("others' latency p99 before", "ms", None, p99_a);
        fig.record("others' latency p99 during freeze", "ms", None, p99_b);
        fig.record("others' p99 rise", "%", Some(Target::AtMost(10.0)), rise);
        fig.record(
            "others' samples delivered",
            "%",
            Some(Target::AtLeast(100.0)),
            others.delivered_pct(),
        );
        fig.record("daemon RSS peak before", "MiB", None, rss_a);
        fig.record("daemon RSS peak during freeze", "MiB", None, rss_b);
        fig.record(
            "daemon RSS growth during freeze",
            "MiB",
            None,
            rss_b - rss_a,
        );
        fig.record("daemon RSS after thaw", "MiB", None, rss_after);
        fig.record(
            "frozen subscribers told of a gap",
            "count",
            None,
            frozen.slow_gaps as f64,
        );
        fig.record(
            "frozen subscribers streaming again after thaw",
            "count",
            None,
            frozen.subscribers.saturating_sub(frozen.errors) as f64,
        );
        if let Some(d) = dropped {
            fig.record("daemon frames_dropped_total", "frames", None, d);
        }
    }
    fig.note(format!(
        "{healthy} subscribers over {connections} connections keep reading; {stalled} over {stalled_connections} connection(s) live in a helper process frozen with SIGSTOP (its sockets are not read at all) for {stall:?}, then thawed. The others' p99 during the freeze is compared with their p99 over the {stall:?} before it"
    ));
    Ok(fig.finish())
}

/// The helper process that holds the frozen subscribers.
struct Helper {
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Helper {
    fn start(
        exe: &std::path::Path,
        url: &str,
        subscribers: usize,
        connections: usize,
        interval_ms: u32,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .args(["subscribe-helper", "--url", url, "--subscribers"])
            .arg(subscribers.to_string())
            .arg("--connections")
            .arg(connections.to_string())
            .arg("--interval-ms")
            .arg(interval_ms.to_string())
            .arg("--threads")
            .arg("1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the subscribe helper")?;
        let stdout = child
            .stdout
            .take()
            .map(BufReader::new)
            .ok_or_else(|| anyhow!("the helper's stdout was not captured"))?;
        let mut helper = Self { child, stdout };
        let mut line = String::new();
        helper
            .stdout
            .read_line(&mut line)
            .context("reading the helper's ready line")?;
        if !line.starts_with("ready") {
            let _ = helper.child.kill();
            bail!("the subscribe helper did not start its subscribers: {line:?}");
        }
        Ok(helper)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the helper's stdin and reads its tally.
    fn finish(mut self, lo: u64, hi: u64) -> anyhow::Result<Summary> {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = writeln!(stdin, "{lo} {hi}");
        }
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("reading the helper's tally")?;
        let _ = self.child.wait();
        serde_json::from_str(&line).with_context(|| format!("the helper's tally {line:?}"))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        daemon::signal(self.child.id(), "CONT");
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The helper: start subscribers, say "ready", read stdin's "LO HI" line
/// (or EOF), print the tally as JSON.
pub fn run_helper(common: &Common, args: &HelperArgs) -> anyhow::Result<()> {
    let rt = common.runtime()?;
    rt.block_on(async {
        let swarm = Swarm::start(
            &args.url,
            args.subscribers,
            args.connections,
            args.interval_ms,
        )
        .await?;
        swarm
            .wait_started(Duration::from_secs(30 + args.subscribers as u64 / 200))
            .await?;
        println!("ready {}", args.subscribers);
        let _ = std::io::stdout().flush();
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            line
        })
        .await
        .unwrap_or_default();
        let mut bounds = line.split_whitespace().map(|v| v.parse::<u64>().ok());
        let (lo, hi) = match (bounds.next().flatten(), bounds.next().flatten()) {
            (Some(lo), Some(hi)) => (lo, hi),
            _ => (0, 0),
        };
        let tallies = swarm.finish().await;
        let summary = Summary::of(&tallies, lo, hi);
        println!("{}", serde_json::to_string(&summary)?);
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lite::{FrameMsg, GapMsg, StartMsg};

    fn frame(seq: u64) -> WatchMsg {
        WatchMsg {
            frame: Some(FrameMsg {
                seq,
                time: None,
                samples: Vec::new(),
            }),
            ..WatchMsg::default()
        }
    }

    fn start(seq: u64, stride: u32) -> WatchMsg {
        WatchMsg {
            start: Some(StartMsg {
                stride,
                latest_seq: seq,
                current: Some(FrameMsg {
                    seq,
                    time: None,
                    samples: Vec::new(),
                }),
            }),
            ..WatchMsg::default()
        }
    }

    #[test]
    fn a_complete_stream_is_fully_delivered() {
        let mut t = Tally::default();
        t.on_message(start(100, 10), PHASE_IDLE, 0.0);
        for seq in (110..=200).step_by(10) {
            t.on_message(frame(seq), PHASE_A, 0.0);
        }
        assert_eq!(t.violations, 0);
        // Window (125, 200]: owed 130..=200 step 10 = 8 frames.
        assert_eq!(t.delivery(125, 200), (8, 8));
    }

    #[test]
    fn a_silent_jump_is_a_violation_and_a_shortfall() {
        let mut t = Tally::default();
        t.on_message(start(100, 1), PHASE_IDLE, 0.0);
        t.on_message(frame(101), PHASE_A, 0.0);
        t.on_message(frame(104), PHASE_A, 0.0);
        assert_eq!(t.violations, 1);
        assert_eq!(t.delivery(100, 104), (2, 4));
    }

    #[test]
    fn a_gap_explains_a_jump() {
        let mut t = Tally::default();
        t.on_message(start(100, 1), PHASE_IDLE, 0.0);
        t.on_message(
            WatchMsg {
                gap: Some(GapMsg {
                    first_seq: 101,
                    last_seq: 103,
                    reason: GAP_SLOW_SUBSCRIBER,
                    missed: 3,
                }),
                ..WatchMsg::default()
            },
            PHASE_A,
            0.0,
        );
        t.on_message(frame(104), PHASE_A, 0.0);
        assert_eq!(t.violations, 0);
        assert_eq!(t.delivery(100, 104), (1, 4));
        let s = Summary::of(&[t], 100, 104);
        assert_eq!((s.slow_gaps, s.resumed_after_gap), (1, 1));
        assert!((s.delivered_pct() - 25.0).abs() < 1e-9);
    }

    #[test]
    fn latency_is_recorded_only_inside_the_window() {
        let mut t = Tally::default();
        t.on_message(start(1, 1), PHASE_IDLE, 0.0);
        let with_sample = |seq| WatchMsg {
            frame: Some(FrameMsg {
                seq,
                time: None,
                samples: vec![lite::SampleMsg {
                    time: Some(prost_types::Timestamp {
                        seconds: 100,
                        nanos: 0,
                    }),
                }],
            }),
            ..WatchMsg::default()
        };
        t.on_message(with_sample(2), PHASE_IDLE, 100.5);
        t.on_message(with_sample(3), PHASE_A, 100.002);
        t.on_message(with_sample(4), PHASE_B, 100.004);
        assert_eq!((t.latency[0].count(), t.latency[1].count()), (1, 1));
        assert!((t.latency[0].quantile_ms(0.5) - 2.0).abs() < 0.01);
        assert!((t.latency[1].quantile_ms(0.5) - 4.0).abs() < 0.01);
    }
}
