//! The fleet CLI against a fleet: `gpuwatch-client snapshot` across 256
//! endpoints (wall time) and `gpuwatch-client watch` of 256 hosts at 1 s
//! (the client's CPU).
//!
//! The fleet is 256 real daemons on this machine, each on its own loopback
//! port with 8 simulated GPUs. To keep 256 daemons from eating the cores
//! the client is measured on, they sample at 1 Hz (the client asks for 1 s
//! anyway) and serve no HTTP; their own cost is reported beside the client's.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;

use crate::{
    Common, check_binary,
    daemon::{self, Daemon, DaemonSpec},
    duration, proc,
    report::{Figure, Target},
};

/// Options of `client-snapshot`.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientSnapshotArgs {
    /// Daemons to poll [default: 256].
    #[arg(long)]
    pub endpoints: Option<usize>,
    /// Simulated GPUs per daemon [default: 8].
    #[arg(long)]
    pub gpus: Option<u32>,
}

/// Options of `client-watch`.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientWatchArgs {
    /// Daemons to watch [default: 256].
    #[arg(long)]
    pub hosts: Option<usize>,
    /// Simulated GPUs per daemon [default: 8].
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Measured window per run [default: 30s].
    #[arg(long, value_parser = duration)]
    pub window: Option<Duration>,
}

/// Fails unless `path` is the fleet CLI (a placeholder binary of the same
/// name, as main had before the client landed, does nothing).
fn check_client(path: &std::path::Path) -> anyhow::Result<()> {
    check_binary(path, "the fleet CLI (gpuwatch-client)")?;
    let help = Command::new(path)
        .arg("--help")
        .output()
        .with_context(|| format!("cannot run {}", path.display()))?;
    let text = String::from_utf8_lossy(&help.stdout);
    if !(text.contains("snapshot") && text.contains("watch")) {
        bail!(
            "{} is not the fleet CLI yet (its --help lists no `snapshot` and `watch` commands); build the branch where gpuwatch-client has landed",
            path.display()
        );
    }
    Ok(())
}

/// Daemons on this machine.
struct Fleet {
    daemons: Vec<Daemon>,
}

impl Fleet {
    fn start(common: &Common, count: usize, gpus: u32) -> anyhow::Result<Self> {
        let mut spec = DaemonSpec::fleet(gpus, Duration::from_secs(1));
        spec.http = false;
        let started = Instant::now();
        let mut daemons = Vec::with_capacity(count);
        // Start in batches, so 256 startups do not all fight for 2 cores.
        for batch in (0..count).collect::<Vec<_>>().chunks(16) {
            let spawned = batch
                .iter()
                .map(|_| Daemon::spawn(&common.server, &spec))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for s in spawned {
                daemons.push(s.wait_ready(Duration::from_secs(60))?);
            }
        }
        eprintln!(
            "  fleet: {count} daemons x {gpus} GPUs started in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(Self { daemons })
    }

    fn hosts(&self) -> Vec<String> {
        self.daemons.iter().map(|d| d.grpc.to_string()).collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.daemons.iter().map(|d| d.pid).collect()
    }

    fn stop(self) -> anyhow::Result<()> {
        // SIGTERM them all first, then wait: stopping 256 one by one would
        // take minutes.
        for d in &self.daemons {
            daemon::signal(d.pid, "TERM");
        }
        let mut failures = 0;
        for d in self.daemons {
            if d.stop().is_err() {
                failures += 1;
            }
        }
        if failures > 0 {
            bail!("{failures} fleet daemons did not stop cleanly");
        }
        Ok(())
    }
}

pub fn client_snapshot(common: &Common, args: &ClientSnapshotArgs) -> anyhow::Result<Figure> {
    check_client(&common.client)?;
    let endpoints = args.endpoints.unwrap_or(common.pick(256, 8));
    let gpus = args.gpus.unwrap_or(8);
    let mut fig = Figure::new(
        "client-snapshot",
        format!("gpuwatch-client snapshot across {endpoints} endpoints x {gpus} GPUs, --json"),
        common.runs(5),
        common.quick,
    );
    let fleet = Fleet::start(common, endpoints, gpus)?;
    let hosts = fleet.hosts();
    let result = (|| {
        for run in 1..=fig.runs {
            let started = Instant::now();
            let output = Command::new(&common.client)
                .arg("snapshot")
                .args(&hosts)
                .arg("--json")
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("cannot run {}", common.client.display()))?;
            let wall = started.elapsed();
            let lines = output.stdout.iter().filter(|b| **b == b'\n').count();
            let with_temperature = String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|l| l.contains("\"temperature_c\""))
                .count();
            eprintln!(
                "  run {run}: {:.0} ms wall, {}, {lines} lines ({with_temperature} with a temperature; {} expected)",
                wall.as_secs_f64() * 1e3,
                output.status,
                endpoints * gpus as usize
            );
            if !output.status.success() {
                bail!(
                    "gpuwatch-client snapshot failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                        .lines()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            fig.record(
                "wall time",
                "ms",
                Some(Target::AtMost(1000.0)),
                wall.as_secs_f64() * 1e3,
            );
            fig.record(
                "GPU samples printed / expected",
                "%",
                Some(Target::AtLeast(100.0)),
                100.0 * with_temperature as f64 / (endpoints * gpus as usize) as f64,
            );
        }
        anyhow::Ok(())
    })();
    fleet.stop()?;
    result?;
    fig.note(format!(
        "command: gpuwatch-client snapshot HOST1 ... HOST{endpoints} --json (HOST = 127.0.0.1:PORT of {endpoints} daemons on this machine, each sampling {gpus} simulated GPUs at 1 Hz); wall time from spawn to exit, output read in full"
    ));
    Ok(fig.finish())
}

pub fn client_watch(common: &Common, args: &ClientWatchArgs) -> anyhow::Result<Figure> {
    check_client(&common.client)?;
    let hosts_n = args.hosts.unwrap_or(common.pick(256, 8));
    let gpus = args.gpus.unwrap_or(8);
    let window = args
        .window
        .unwrap_or(common.pick(Duration::from_secs(30), Duration::from_secs(3)));
    let warmup = common.pick(Duration::from_secs(5), Duration::from_secs(2));
    let mut fig = Figure::new(
        "client-watch",
        format!("gpuwatch-client watch of {hosts_n} hosts x {gpus} GPUs at 1 s, --json"),
        common.runs(3),
        common.quick,
    );
    let fleet = Fleet::start(common, hosts_n, gpus)?;
    let hosts = fleet.hosts();
    let result = (|| {
        for run in 1..=fig.runs {
            let mut child = Command::new(&common.client)
                .arg("watch")
                .args(&hosts)
                .args(["--json", "--interval", "1s"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot run {}", common.client.display()))?;
            let pid = child.id();
            let lines = Arc::new(AtomicU64::new(0));
            let reader = child.stdout.take().map(|stdout| {
                let lines = lines.clone();
                thread::spawn(move || {
                    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                        if line.contains("\"temperature_c\"") {
                            lines.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            });
            thread::sleep(warmup);
            let client_cpu = proc::CpuMeter::start(&[pid]);
            let fleet_cpu = proc::CpuMeter::start(&fleet.pids());
            let before = lines.load(Ordering::Relaxed);
            thread::sleep(window);
            let measured = client_cpu.and_then(|c| c.percent());
            let fleet_pct = fleet_cpu
                .and_then(|c| c.percent())
                .map(|p| p.0)
                .unwrap_or(f64::NAN);
            let samples = lines.load(Ordering::Relaxed) - before;
            let rss = proc::rss_mib(pid).unwrap_or(f64::NAN);
            let exited = child.try_wait().ok().flatten();
            daemon::signal(pid, "TERM");
            let _ = child.wait();
            if let Some(r) = reader {
                let _ = r.join();
            }
            if let Some(status) = exited {
                bail!("gpuwatch-client watch exited early ({status})");
            }
            let (client_pct, wall) = measured?;
            let rate = samples as f64 / wall.as_secs_f64();
            eprintln!(
                "  run {run}: client CPU {client_pct:.2} % of a core, RSS {rss:.1} MiB, {rate:.0} samples/s printed ({} expected), fleet CPU {fleet_pct:.0} %",
                hosts_n * gpus as usize
            );
            fig.record(
                "client CPU",
                "% core",
                Some(Target::AtMost(10.0)),
                client_pct,
            );
            fig.record("client RSS", "MiB", None, rss);
            fig.record("GPU samples printed", "per s", None, rate);
            fig.record(
                &format!("the {hosts_n} daemons' CPU (not the client's)"),
                "% core",
                None,
                fleet_pct,
            );
        }
        anyhow::Ok(())
    })();
    fleet.stop()?;
    result?;
    fig.note(format!(
        "command: gpuwatch-client watch HOST1 ... HOST{hosts_n} --json --interval 1s, stdout read by the harness; client CPU from /proc over a {window:?} window after a {warmup:?} warm-up"
    ));
    Ok(fig.finish())
}
