//! The architecture gpuwatch replaces, measured beside gpuwatch in the same
//! run: a Flask app under Gunicorn workers answering JSON polls of 8
//! simulated GPUs (`bench/baseline/app.py`, a benchmark fixture), against
//! gpuwatch's `GetSnapshot` and its own JSON endpoint `/api/v1/dashboard`.
//!
//! Each server gets the same two loads from the same generator, one after
//! the other: as many requests as it can answer (closed loop over the same
//! number of connections), then the same fixed rate for all (open loop).
//! At the fixed rate, latency runs from sending a request to its last
//! byte, and a request sent more than 10 ms after it was due counts as
//! late: a server that cannot keep up shows as late requests and fewer
//! answers per second, not as timer noise in the latency. CPU is the
//! server's processes' (Gunicorn's
//! master and workers together); memory is their resident set (and PSS,
//! which shares forked pages fairly) after the loads.
//!
//! Flask and Gunicorn are installed from PyPI into a virtual environment
//! (`target/bench-venv` by default) the first time, pinned by
//! `bench/baseline/requirements.txt`.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use prost::Message;
use tonic::client::Grpc;

use crate::{
    Common,
    daemon::{self, Daemon, DaemonSpec},
    duration,
    http1::Http1,
    lite, proc,
    report::{Figure, Target},
    stats::Latency,
};

/// Options of `baseline`.
#[derive(Debug, Clone, Default, Args)]
pub struct BaselineArgs {
    /// Gunicorn workers [default: 2 x cores + 1, Gunicorn's advice].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Connections of the load generator, for every server [default: 8].
    #[arg(long)]
    pub connections: Option<usize>,
    /// The equal load, in requests/s, for every server [default: 200].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured window of each load [default: 10s].
    #[arg(long, value_parser = duration)]
    pub window: Option<Duration>,
    /// Python used to create the virtual environment [default: python3].
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// The virtual environment with Flask and Gunicorn
    /// [default: target/bench-venv].
    #[arg(long, value_name = "DIR")]
    pub venv: Option<PathBuf>,
}

/// Where a load goes.
#[derive(Debug, Clone)]
enum Endpoint {
    Http {
        addr: SocketAddr,
        path: &'static str,
    },
    Grpc {
        url: String,
    },
}

enum Conn {
    Http(Http1, &'static str),
    Grpc(Grpc<tonic::transport::Channel>),
}

impl Conn {
    async fn open(endpoint: &Endpoint) -> anyhow::Result<Self> {
        Ok(match endpoint {
            Endpoint::Http { addr, path } => Conn::Http(Http1::connect(*addr).await?, path),
            Endpoint::Grpc { url } => Conn::Grpc(Grpc::new(lite::connect(url).await?)),
        })
    }

    async fn request(&mut self) -> anyhow::Result<()> {
        match self {
            Conn::Http(http, path) => http.get(path, Some("application/json")).await.map(|_| ()),
            Conn::Grpc(grpc) => lite::snapshot(grpc)
                .await
                .map(|_| ())
                .map_err(|s| anyhow!("GetSnapshot: {s}")),
        }
    }

    fn reconnects(&self) -> u64 {
        match self {
            Conn::Http(http, _) => http.reconnects,
            Conn::Grpc(_) => 0,
        }
    }
}

/// One load's outcome.
#[derive(Debug, Default)]
struct LoadResult {
    requests: u64,
    errors: u64,
    reconnects: u64,
    /// Requests sent more than [`LATE`] after they were due.
    late: u64,
    first_error: Option<String>,
    latency: Latency,
    wall: Duration,
}

/// How far behind its schedule an open-loop request may start before it
/// counts as late.
const LATE: Duration = Duration::from_millis(10);

/// Runs a load: closed loop (`rate` None) or `rate` requests/s spread
/// over the connections (open loop).
async fn run_load(
    endpoint: &Endpoint,
    connections: usize,
    rate: Option<f64>,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<LoadResult> {
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let measure_from = start + warmup;
    let end = measure_from + window;
    let mut tasks = Vec::new();
    for i in 0..connections {
        let mut conn = Conn::open(endpoint).await?;
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            let period = rate.map(|rate| Duration::from_secs_f64(connections as f64 / rate));
            // Connections' schedules are staggered across one period.
            let mut due =
                start + period.map_or(Duration::ZERO, |p| p.mul_f64(i as f64 / connections as f64));
            loop {
                if period.is_some() {
                    tokio::time::sleep_until(due).await;
                } else {
                    due = tokio::time::Instant::now();
                }
                if due >= end {
                    break;
                }
                let sent = tokio::time::Instant::now();
                let outcome = conn.request().await;
                let done = tokio::time::Instant::now();
                if due >= measure_from {
                    if sent.duration_since(due) > LATE {
                        r.late += 1;
                    }
                    match outcome {
                        Ok(()) => {
                            r.requests += 1;
                            r.latency
                                .record_us(done.duration_since(sent).as_micros() as u64);
                        }
                        Err(e) => {
                            r.errors += 1;
                            r.first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                if let Some(p) = period {
                    due += p;
                }
            }
            r.reconnects = conn.reconnects();
            r
        }));
    }
    let mut total = LoadResult {
        wall: window,
        ..LoadResult::default()
    };
    for t in tasks {
        let r = t.await.map_err(|e| anyhow!("load task failed: {e}"))?;
        total.requests += r.requests;
        total.errors += r.errors;
        total.reconnects += r.reconnects;
        total.late += r.late;
        total.latency.merge(&r.latency);
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    Ok(total)
}

/// Gunicorn serving the fixture.
struct Gunicorn {
    child: Child,
    addr: SocketAddr,
}

impl Gunicorn {
    fn start(gunicorn: &Path, app_dir: &Path, workers: usize) -> anyhow::Result<Self> {
        // Gunicorn logs the address it was given, not the one the kernel
        // picked for port 0: take a free port first.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port for Gunicorn")?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(gunicorn)
            .arg("--workers")
            .arg(workers.to_string())
            .arg("--bind")
            .arg(addr.to_string())
            .arg("--chdir")
            .arg(app_dir)
            .args(["--log-level", "warning", "app:app"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", gunicorn.display()))?;
        Ok(Self { child, addr })
    }

    fn pids(&self) -> Vec<u32> {
        proc::process_tree(self.child.id())
    }

    fn stop(mut self) {
        daemon::signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The fixture's directory: `bench/baseline` under the working directory
/// (the repository root), else under the source tree this was built from.
fn app_dir() -> anyhow::Result<PathBuf> {
    [
        PathBuf::from("bench/baseline"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("baseline"),
    ]
    .into_iter()
    .find(|d| d.join("app.py").is_file())
    .ok_or_else(|| {
        anyhow!("bench/baseline/app.py not found; run gpuwatch-bench from the repository root")
    })
}

/// A virtual environment with the pinned Flask and Gunicorn; returns the
/// path of its `gunicorn`.
fn ensure_venv(python: &Path, venv: &Path, app_dir: &Path) -> anyhow::Result<PathBuf> {
    let requirements = app_dir.join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let marker = venv.join(".gpuwatch-bench-requirements");
    let gunicorn = venv.join("bin/gunicorn");
    if gunicorn.is_file() && std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
        return Ok(gunicorn);
    }
    eprintln!(
        "  installing Flask and Gunicorn into {} (once)",
        venv.display()
    );
    let status = Command::new(python)
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !status.success() {
        bail!(
            "`{} -m venv {}` failed ({status}); on Debian install python3-venv",
            python.display(),
            venv.display()
        );
    }
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .status()
        .context("cannot run pip in the virtual environment")?;
    if !status.success() {
        bail!(
            "pip could not install {} ({status})",
            requirements.display()
        );
    }
    std::fs::write(&marker, wanted)
        .with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(gunicorn)
}

/// The size of one answer from `endpoint`, in bytes (for gRPC, the
/// encoded GetSnapshotResponse).
async fn response_size(endpoint: &Endpoint) -> anyhow::Result<usize> {
    match endpoint {
        Endpoint::Http { addr, path } => {
            Ok(Http1::connect(*addr).await?.get(path, None).await?.len())
        }
        Endpoint::Grpc { url } => {
            let mut full =
                gpuwatch_api::gpu_watch_client::GpuWatchClient::new(lite::connect(url).await?);
            Ok(full
                .get_snapshot(gpuwatch_api::GetSnapshotRequest { gpus: Vec::new() })
                .await
                .map_err(|s| anyhow!("GetSnapshot: {s}"))?
                .into_inner()
                .encoded_len())
        }
    }
}

/// Resident and proportional memory of processes, summed, in MiB.
fn memory(pids: &[u32]) -> (f64, f64) {
    let rss = pids.iter().filter_map(|p| proc::rss_mib(*p).ok()).sum();
    let pss = pids.iter().filter_map(|p| proc::pss_mib(*p)).sum();
    (rss, pss)
}

pub fn baseline(common: &Common, args: &BaselineArgs) -> anyhow::Result<Figure> {
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.workers.unwrap_or(2 * nproc + 1).max(1);
    let connections = args.connections.unwrap_or(8).max(1);
    let rate = args.rate.unwrap_or(common.pick(200.0, 50.0));
    if !(rate.is_finite() && rate > 0.0) {
        bail!("--rate {rate}: must be a positive number of requests/s");
    }
    let window = args
        .window
        .unwrap_or(common.pick(Duration::from_secs(10), Duration::from_secs(1)));
    let warmup = common.pick(Duration::from_secs(2), Duration::from_millis(300));
    let app_dir = app_dir()?;
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| PathBuf::from("python3"));
    let venv = args
        .venv
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench-venv"));
    let gunicorn_bin = ensure_venv(&python, &venv, &app_dir)?;
    let mut fig = Figure::new(
        "baseline",
        format!(
            "the replaced architecture (Flask under {workers} Gunicorn sync workers) vs gpuwatch, 8 GPUs, {connections} connections"
        ),
        common.runs(3),
        common.quick,
    );
    let rt = common.runtime()?;
    for run in 1..=fig.runs {
        let daemon = Daemon::start(
            &common.server,
            &DaemonSpec::fleet(8, Duration::from_millis(100)),
        )?;
        let gunicorn = Gunicorn::start(&gunicorn_bin, &app_dir, workers)?;
        let flask = Endpoint::Http {
            addr: gunicorn.addr,
            path: "/api/gpus",
        };
        let http = daemon.http_addr()?;
        let servers: [(&str, Endpoint, bool); 3] = [
            ("flask+gunicorn /api/gpus", flask.clone(), false),
            (
                "gpuwatch GetSnapshot",
                Endpoint::Grpc { url: daemon.url() },
                true,
            ),
            (
                "gpuwatch /api/v1/dashboard",
                Endpoint::Http {
                    addr: http,
                    path: "/api/v1/dashboard",
                },
                true,
            ),
        ];
        rt.block_on(async {
            // Gunicorn is up when it answers.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match response_size(&flask).await {
                    Ok(_) => return anyhow::Ok(()),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(e.context("Gunicorn did not answer within 30 s"));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })?;
        for (name, endpoint, is_daemon) in &servers {
            let pids = if *is_daemon {
                vec![daemon.pid]
            } else {
                gunicorn.pids()
            };
            for (load, load_rate) in [("max", None), ("equal load", Some(rate))] {
                let cpu = proc::CpuMeter::start(&pids)?;
                let r = rt.block_on(run_load(endpoint, connections, load_rate, warmup, window))?;
                let (cpu_pct, _) = cpu.percent()?;
                let achieved = r.requests as f64 / r.wall.as_secs_f64();
                eprintln!(
                    "  run {run}: {name} at {load}: {achieved:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, server CPU {cpu_pct:.0} %, errors {}, reconnects {}{}",
                    r.latency.quantile_ms(0.5),
                    r.latency.quantile_ms(0.99),
                    r.errors,
                    r.reconnects,
                    r.first_error
                        .as_ref()
                        .map_or(String::new(), |e| format!(" (first: {e})"))
                );
                let key = |what: &str| format!("{name} | {load} | {what}");
                if load_rate.is_none() {
                    fig.record(&key("requests"), "req/s", None, achieved);
                } else {
                    fig.record(&key("requests answered"), "req/s", None, achieved);
                }
                fig.record(&key("latency p50"), "ms", None, r.latency.quantile_ms(0.5));
                fig.record(&key("latency p99"), "ms", None, r.latency.quantile_ms(0.99));
                fig.record(&key("server CPU"), "% core", None, cpu_pct);
                if load_rate.is_some() {
                    fig.record(&key("late requests"), "count", None, r.late as f64);
                }
                fig.record(
                    &key("errors"),
                    "count",
                    Some(Target::AtMost(0.0)),
                    r.errors as f64,
                );
            }
            // After the loads: the dashboard's history has grown by then.
            let bytes = rt.block_on(response_size(endpoint))?;
            let (rss, pss) = memory(&pids);
            fig.record(
                &format!("{name} | memory RSS (sum of processes)"),
                "MiB",
                None,
                rss,
            );
            fig.record(
                &format!("{name} | memory PSS (sum of processes)"),
                "MiB",
                None,
                pss,
            );
            fig.record(
                &format!("{name} | response size"),
                "KiB",
                None,
                bytes as f64 / 1024.0,
            );
        }
        gunicorn.stop();
        daemon.stop()?;
    }
    fig.note(format!(
        "each server in turn, same generator: 'max' = {connections} connections in a closed loop; 'equal load' = {rate} req/s over {connections} connections, latency from send to the last byte (late = sent > 10 ms after due); {window:?} windows after a {warmup:?} warm-up. Gunicorn sync workers close the connection after every response (a new TCP connection per poll, part of the old design's cost); gpuwatch keeps its connections. /api/v1/dashboard carries the whole chart history (600 frames), not just the latest readings"
    ));
    Ok(fig.finish())
}
