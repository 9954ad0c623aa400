//! Startup to serving with the simulator: from spawning the process to (a)
//! the "gRPC listening on" line in its log and (b) the first GetSnapshot
//! answered with every GPU in it, on a fresh connection. The daemon does
//! its first sampler tick and its startup repairs before it listens, so
//! (a) already means "has data"; (b) adds what a client sees (connect,
//! HTTP/2 handshake, one request).

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use tonic::client::Grpc;

use crate::{
    Common,
    daemon::{Daemon, DaemonSpec},
    lite,
    report::{Figure, Target},
};

/// Options of `startup`.
#[derive(Debug, Clone, Default, Args)]
pub struct StartupArgs {
    /// Simulated GPUs [default: 8].
    #[arg(long)]
    pub gpus: Option<u32>,
}

pub fn startup(common: &Common, args: &StartupArgs) -> anyhow::Result<Figure> {
    let gpus = args.gpus.unwrap_or(8);
    let mut fig = Figure::new(
        "startup",
        format!("startup to serving: {gpus} simulated GPUs, fresh state directory"),
        common.runs(10),
        common.quick,
    );
    let rt = common.runtime()?;
    for run in 1..=fig.runs {
        let daemon = Daemon::start(
            &common.server,
            &DaemonSpec::fleet(gpus, Duration::from_millis(100)),
        )?;
        let url = daemon.url();
        let answered = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let attempt = async {
                    let channel = lite::connect(&url).await?;
                    let snap = lite::snapshot(&mut Grpc::new(channel)).await?;
                    anyhow::Ok(snap)
                };
                match attempt.await {
                    Ok(snap) if snap.samples.len() == gpus as usize => {
                        return anyhow::Ok(Instant::now());
                    }
                    Ok(_) | Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Ok(snap) => bail!(
                        "GetSnapshot answered {} samples, expected {gpus}",
                        snap.samples.len()
                    ),
                    Err(e) => bail!("no GetSnapshot answered within 10 s: {e:#}"),
                }
            }
        })?;
        let listening = daemon.listening_after;
        let serving = answered.duration_since(daemon.spawned);
        daemon.stop()?;
        eprintln!(
            "  run {run}: listening after {:.1} ms, first GetSnapshot answered after {:.1} ms",
            listening.as_secs_f64() * 1e3,
            serving.as_secs_f64() * 1e3
        );
        fig.record(
            "spawn -> \"listening\" logged",
            "ms",
            None,
            listening.as_secs_f64() * 1e3,
        );
        fig.record(
            "spawn -> first GetSnapshot answered",
            "ms",
            Some(Target::AtMost(200.0)),
            serving.as_secs_f64() * 1e3,
        );
    }
    fig.note("a new daemon and state directory per run; the first GetSnapshot goes out on a new connection as soon as the log names the port");
    Ok(fig.finish())
}
