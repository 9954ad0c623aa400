//! Real GPUs, read-only: what one full sample costs through gpuwatch's NVML
//! backend (fast fields, read every tick, and with the slow-cadence fields:
//! processes, ECC, PCIe throughput, energy), against one
//! `nvidia-smi --query-gpu` call for the same fields, and the daemon's own
//! CPU at 10 Hz with the governor off and in dry-run.
//!
//! Nothing here writes to a GPU: the backend is only asked to describe and
//! read, nvidia-smi only to query, and the daemon runs with
//! `[controller] enabled = false, dry_run = true`. With `--library` it runs
//! against another libnvidia-ml.so (e.g. the stand-in the test suite
//! builds), which is how CI proves the subcommand works without a GPU.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};
use clap::Args;

use gpuwatch_server::backend::{Backend, ReadScope, nvml::NvmlBackend};

use crate::{
    Common,
    daemon::{Daemon, DaemonSpec},
    duration,
    idle::sleep_watching,
    proc,
    report::Figure,
    stats::Latency,
};

/// Options of `nvml`.
#[derive(Debug, Clone, Default, Args)]
pub struct NvmlArgs {
    /// Timed fast samples per GPU per run [default: 500]; samples with the
    /// slow fields are a tenth of that (at least 10).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Timed nvidia-smi calls per run [default: 20].
    #[arg(long)]
    pub smi_calls: Option<usize>,
    /// libnvidia-ml.so to load [default: the loader's].
    #[arg(long, value_name = "PATH")]
    pub library: Option<PathBuf>,
    /// Window of the daemon's CPU measurement [default: 30s].
    #[arg(long, value_parser = duration)]
    pub window: Option<Duration>,
}

/// The fields gpuwatch reads every tick, as nvidia-smi names them.
const SMI_FIELDS: &str = "index,uuid,temperature.gpu,temperature.memory,fan.speed,power.draw,power.limit,enforced.power.limit,clocks.gr,clocks.sm,clocks.mem,clocks.video,clocks.max.gr,clocks.max.sm,clocks.max.mem,utilization.gpu,utilization.memory,memory.used,memory.total,pstate,clocks_event_reasons.active";

/// Whether this machine looks like it has an NVIDIA GPU and driver.
pub fn gpu_present() -> bool {
    Path::new("/dev/nvidiactl").exists()
}

pub fn nvml(common: &Common, args: &NvmlArgs) -> anyhow::Result<Figure> {
    let samples = args.samples.unwrap_or(common.pick(500, 20)).max(1);
    let slow_samples = (samples / 10).max(10);
    let smi_calls = args.smi_calls.unwrap_or(common.pick(20, 2)).max(1);
    let window = args
        .window
        .unwrap_or(common.pick(Duration::from_secs(30), Duration::from_secs(2)));
    let library = args.library.as_deref();
    let mut fig = Figure::new(
        "nvml",
        format!(
            "NVML backend, read-only{}",
            library.map_or(String::new(), |l| format!(" ({})", l.display()))
        ),
        common.runs(3),
        common.quick,
    );
    let backend = NvmlBackend::new(library).map_err(|e| anyhow!("cannot load NVML: {e}"))?;
    let facts = backend.host_facts();
    let count = backend
        .device_count()
        .map_err(|e| anyhow!("cannot count GPUs: {e}"))?;
    if count == 0 {
        anyhow::bail!("NVML reports no GPU");
    }
    fig.note(format!(
        "{count} GPU(s), driver {}, NVML {}",
        facts.driver_version.as_deref().unwrap_or("?"),
        facts.nvml_version.as_deref().unwrap_or("?")
    ));
    let mut devices = Vec::new();
    for index in 0..count {
        let mut device = backend
            .open(index)
            .map_err(|e| anyhow!("cannot open GPU {index}: {e}"))?;
        let name = device
            .describe()
            .map(|f| f.name)
            .map_err(|e| anyhow!("GPU {index} did not describe itself: {e}"))?;
        fig.note(format!("GPU {index}: {name}"));
        devices.push(device);
    }
    let smi = which("nvidia-smi");
    if smi.is_none() {
        fig.note("nvidia-smi is not on PATH: its cost is not measured");
    }
    for run in 1..=fig.runs {
        let mut fast = Latency::new();
        let mut full = Latency::new();
        for device in devices.iter_mut() {
            for _ in 0..samples {
                let t = Instant::now();
                device
                    .read(ReadScope { slow_fields: false })
                    .map_err(|e| anyhow!("read failed: {e}"))?;
                fast.record_us(t.elapsed().as_micros() as u64);
            }
            for _ in 0..slow_samples {
                let t = Instant::now();
                device
                    .read(ReadScope { slow_fields: true })
                    .map_err(|e| anyhow!("read failed: {e}"))?;
                full.record_us(t.elapsed().as_micros() as u64);
            }
        }
        let us = |l: &Latency, q: f64| l.quantile_ms(q) * 1e3;
        fig.record(
            "one sample, fast fields, median",
            "us",
            None,
            us(&fast, 0.5),
        );
        fig.record("one sample, fast fields, p90", "us", None, us(&fast, 0.9));
        fig.record("one sample, fast fields, p99", "us", None, us(&fast, 0.99));
        fig.record(
            "one sample with slow fields, median",
            "ms",
            None,
            full.quantile_ms(0.5),
        );
        fig.record(
            "one sample with slow fields, p99",
            "ms",
            None,
            full.quantile_ms(0.99),
        );
        if let Some(smi) = &smi {
            let mut calls = Latency::new();
            for _ in 0..smi_calls {
                let t = Instant::now();
                let ok = Command::new(smi)
                    .arg(format!("--query-gpu={SMI_FIELDS}"))
                    .arg("--format=csv,noheader,nounits")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    anyhow::bail!("nvidia-smi --query-gpu={SMI_FIELDS} failed");
                }
                calls.record_us(t.elapsed().as_micros() as u64);
            }
            fig.record(
                "nvidia-smi --query-gpu, median",
                "ms",
                None,
                calls.quantile_ms(0.5),
            );
            fig.record(
                "nvidia-smi --query-gpu, p90",
                "ms",
                None,
                calls.quantile_ms(0.9),
            );
        }
        // The daemon on these GPUs at 10 Hz, observe-only.
        let spec = DaemonSpec {
            gpus: count,
            sampler_interval: Duration::from_millis(100),
            http: true,
            extra_toml: "[controller]\nenabled = false\ndry_run = true\n".to_owned(),
            nvml: Some(library.map(Path::to_path_buf)),
            log_level: "info",
            simulator_toml: None,
            state_dir: None,
        };
        let mut daemon = Daemon::start(&common.server, &spec).context("the daemon on NVML")?;
        std::thread::sleep(common.pick(Duration::from_secs(5), Duration::from_secs(1)));
        let meter = proc::CpuMeter::start(&[daemon.pid])?;
        sleep_watching(&mut daemon, window)?;
        let (cpu, _) = meter.percent()?;
        let rss = proc::rss_mib(daemon.pid)?;
        daemon.stop()?;
        eprintln!(
            "  run {run}: fast sample median {:.0} us p99 {:.0} us, with slow fields median {:.1} ms; daemon CPU {cpu:.2} %, RSS {rss:.1} MiB",
            us(&fast, 0.5),
            us(&fast, 0.99),
            full.quantile_ms(0.5)
        );
        fig.record("daemon CPU at 10 Hz (observe-only)", "% core", None, cpu);
        fig.record("daemon RSS", "MiB", None, rss);
    }
    fig.note(format!(
        "per run: {samples} fast and {slow_samples} full samples per GPU through gpuwatch's NvmlBackend, {smi_calls} nvidia-smi calls for the same fields, and the daemon with [controller] enabled = false, dry_run = true over {window:?}; nothing is written to any GPU"
    ));
    Ok(fig.finish())
}

/// The path of `program` on PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}
