//! Snapshot polling: closed-loop `GetSnapshot` callers over a few HTTP/2
//! connections, as many polling scripts or a scheduler's pollers would be.
//!
//! Each caller sends its next request as soon as the last one is answered,
//! so the request rate is what the daemon (and the generator, on the same
//! cores) can sustain with that many requests in flight. Besides requests/s
//! and latency, the figure reports the daemon's CPU per request — the
//! number that says how far one daemon core goes, whoever shares the
//! machine with it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use tonic::client::Grpc;

use crate::{
    Common,
    daemon::{Daemon, DaemonSpec},
    duration, lite, proc,
    report::{Figure, Target},
    stats::Latency,
};

/// Options of `polling`.
#[derive(Debug, Clone, Default, Args)]
pub struct PollingArgs {
    /// HTTP/2 connections [default: 4].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Requests in flight on each connection [default: 8].
    #[arg(long)]
    pub in_flight: Option<usize>,
    /// Measured window per run [default: 15s].
    #[arg(long, value_parser = duration)]
    pub window: Option<Duration>,
    /// Simulated GPUs [default: 8].
    #[arg(long)]
    pub gpus: Option<u32>,
}

/// One caller's results.
#[derive(Debug, Default)]
struct CallerTally {
    ok: u64,
    errors: u64,
    wrong_shape: u64,
    first_error: Option<String>,
    latency: Latency,
}

pub fn polling(common: &Common, args: &PollingArgs) -> anyhow::Result<Figure> {
    let connections = args.connections.unwrap_or(4).max(1);
    let in_flight = args.in_flight.unwrap_or(8).max(1);
    let gpus = args.gpus.unwrap_or(8);
    let window = args
        .window
        .unwrap_or(common.pick(Duration::from_secs(15), Duration::from_secs(2)));
    let warmup = common.pick(Duration::from_secs(3), Duration::from_millis(500));
    let mut fig = Figure::new(
        "polling",
        format!(
            "snapshot polling: GetSnapshot of {gpus} GPUs, {connections} connections x {in_flight} in flight"
        ),
        common.runs(3),
        common.quick,
    );
    let rt = common.runtime()?;
    for run in 1..=fig.runs {
        let daemon = Daemon::start(
            &common.server,
            &DaemonSpec::fleet(gpus, Duration::from_millis(100)),
        )?;
        let url = daemon.url();
        let outcome = rt.block_on(async {
            let recording = Arc::new(AtomicBool::new(false));
            let stop = Arc::new(AtomicBool::new(false));
            let counted = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for _ in 0..connections {
                let channel = lite::connect(&url).await?;
                for _ in 0..in_flight {
                    let grpc = Grpc::new(channel.clone());
                    tasks.push(tokio::spawn(caller(
                        grpc,
                        gpus as usize,
                        recording.clone(),
                        stop.clone(),
                        counted.clone(),
                    )));
                }
            }
            tokio::time::sleep(warmup).await;
            let daemon_cpu = proc::CpuMeter::start(&[daemon.pid])?;
            let generator_cpu = proc::CpuMeter::this_process()?;
            let started = Instant::now();
            recording.store(true, Ordering::Relaxed);
            tokio::time::sleep(window).await;
            recording.store(false, Ordering::Relaxed);
            let wall = started.elapsed();
            let requests = counted.load(Ordering::Relaxed);
            let (daemon_pct, _) = daemon_cpu.percent()?;
            let (generator_pct, _) = generator_cpu.percent()?;
            stop.store(true, Ordering::Relaxed);
            let mut total = CallerTally::default();
            for task in tasks {
                let t = task.await.unwrap_or_else(|e| CallerTally {
                    errors: 1,
                    first_error: Some(format!("caller task failed: {e}")),
                    ..CallerTally::default()
                });
                total.ok += t.ok;
                total.errors += t.errors;
                total.wrong_shape += t.wrong_shape;
                total.latency.merge(&t.latency);
                if total.first_error.is_none() {
                    total.first_error = t.first_error;
                }
            }
            anyhow::Ok((total, requests, wall, daemon_pct, generator_pct))
        });
        let (total, requests, wall, daemon_pct, generator_pct) = outcome?;
        daemon.stop()?;
        let rate = requests as f64 / wall.as_secs_f64();
        let daemon_us_per_request =
            daemon_pct / 100.0 * wall.as_secs_f64() * 1e6 / requests.max(1) as f64;
        eprintln!(
            "  run {run}: {rate:.0} requests/s, p50 {:.3} ms, p99 {:.3} ms, daemon CPU {daemon_pct:.0} % ({daemon_us_per_request:.1} us/request), generator CPU {generator_pct:.0} %, errors {}, wrong shape {}{}",
            total.latency.quantile_ms(0.5),
            total.latency.quantile_ms(0.99),
            total.errors,
            total.wrong_shape,
            total
                .first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        );
        fig.record("requests", "req/s", Some(Target::AtLeast(50_000.0)), rate);
        fig.record("latency p50", "ms", None, total.latency.quantile_ms(0.5));
        fig.record(
            "latency p99",
            "ms",
            Some(Target::AtMost(2.0)),
            total.latency.quantile_ms(0.99),
        );
        fig.record("daemon CPU", "% core", None, daemon_pct);
        fig.record("daemon CPU per request", "us", None, daemon_us_per_request);
        fig.record(
            "requests per daemon core (derived)",
            "req/s",
            None,
            1e6 / daemon_us_per_request.max(1e-9),
        );
        fig.record("generator CPU", "% core", None, generator_pct);
        fig.record(
            "errors + wrong-shape answers",
            "count",
            Some(Target::AtMost(0.0)),
            (total.errors + total.wrong_shape) as f64,
        );
    }
    fig.note(format!(
        "closed loop: {} callers ({connections} HTTP/2 connections x {in_flight}) each send the next GetSnapshot when the last is answered; daemon and generator ({} threads) share the machine's cores; every answer is checked to hold {gpus} samples",
        connections * in_flight,
        common.threads
    ));
    Ok(fig.finish())
}

async fn caller(
    mut grpc: Grpc<tonic::transport::Channel>,
    gpus: usize,
    recording: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    counted: Arc<AtomicU64>,
) -> CallerTally {
    let mut tally = CallerTally::default();
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let answer = lite::snapshot(&mut grpc).await;
        let took = sent.elapsed();
        let in_window = recording.load(Ordering::Relaxed);
        match answer {
            Ok(snap) if snap.samples.len() == gpus => {
                if in_window {
                    tally.ok += 1;
                    counted.fetch_add(1, Ordering::Relaxed);
                    tally.latency.record_us(took.as_micros() as u64);
                }
            }
            Ok(snap) => {
                tally.wrong_shape += 1;
                tally.first_error.get_or_insert_with(|| {
                    format!("{} samples, expected {gpus}", snap.samples.len())
                });
            }
            Err(status) => {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| status.to_string());
                // Do not spin on a dead connection.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}
