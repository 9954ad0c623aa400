//! `/metrics` scrapes of 8 GPUs, the way Prometheus does them: a kept-alive
//! HTTP/1.1 connection and Prometheus's own `Accept` header.
//!
//! The daemon renders the text once per new frame and caches it, so two
//! cases are measured: a scrape that meets a frame nobody has rendered yet
//! (one every 110 ms, just over the 100 ms tick — what every real scrape
//! is, since Prometheus scrapes every 15 s or so) and back-to-back scrapes
//! (mostly cached). The target applies to the first.
//!
//! A request that comes after 110 ms of quiet pays for waking both ends,
//! whatever it asks: on the 2-core VMs this runs on, ~0.6 ms before a byte
//! of the answer is built (BENCHMARKS.md). So every scrape meeting a new
//! frame is paired with a `/healthz` after the same quiet, on the same
//! connection, and the figure also reports the scrape's cost over it: what
//! rendering and sending the metrics adds, on any machine.

use std::time::{Duration, Instant};

use clap::Args;

use crate::{
    Common,
    daemon::{Daemon, DaemonSpec},
    http1::Http1,
    report::{Figure, Target},
    stats::Latency,
};

/// What Prometheus 2.x/3.x sends.
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Options of `scrape`.
#[derive(Debug, Clone, Default, Args)]
pub struct ScrapeArgs {
    /// Scrapes that meet a new frame, one every 110 ms, per run
    /// [default: 100].
    #[arg(long)]
    pub fresh: Option<usize>,
    /// Back-to-back scrapes per run [default: 2000].
    #[arg(long)]
    pub back_to_back: Option<usize>,
    /// Simulated GPUs [default: 8].
    #[arg(long)]
    pub gpus: Option<u32>,
}

pub fn scrape(common: &Common, args: &ScrapeArgs) -> anyhow::Result<Figure> {
    let gpus = args.gpus.unwrap_or(8);
    let fresh = args.fresh.unwrap_or(common.pick(100, 10)).max(1);
    let hot = args.back_to_back.unwrap_or(common.pick(2000, 50)).max(1);
    let mut fig = Figure::new(
        "scrape",
        format!("/metrics scrape of {gpus} simulated GPUs"),
        common.runs(5),
        common.quick,
    );
    let rt = common.runtime()?;
    for run in 1..=fig.runs {
        let daemon = Daemon::start(
            &common.server,
            &DaemonSpec::fleet(gpus, Duration::from_millis(100)),
        )?;
        let addr = daemon.http_addr()?;
        let outcome = rt.block_on(async {
            let mut http = Http1::connect(addr).await?;
            // Warm-up: a few scrapes, and every GPU has history.
            for _ in 0..5 {
                http.get("/metrics", Some(PROMETHEUS_ACCEPT)).await?;
                tokio::time::sleep(Duration::from_millis(110)).await;
            }
            let mut fresh_latency = Latency::new();
            let mut quiet_health = Latency::new();
            let mut over_health = Latency::new();
            let mut bytes = 0;
            for _ in 0..fresh {
                tokio::time::sleep(Duration::from_millis(110)).await;
                let t = Instant::now();
                let body = http.get("/metrics", Some(PROMETHEUS_ACCEPT)).await?;
                let scrape_us = t.elapsed().as_micros() as u64;
                fresh_latency.record_us(scrape_us);
                bytes = body.len();
                tokio::time::sleep(Duration::from_millis(110)).await;
                let t = Instant::now();
                http.get("/healthz", None).await?;
                let health_us = t.elapsed().as_micros() as u64;
                quiet_health.record_us(health_us);
                over_health.record_us(scrape_us.saturating_sub(health_us));
            }
            let mut hot_latency = Latency::new();
            for _ in 0..hot {
                let t = Instant::now();
                http.get("/metrics", Some(PROMETHEUS_ACCEPT)).await?;
                hot_latency.record_us(t.elapsed().as_micros() as u64);
            }
            anyhow::Ok((fresh_latency, quiet_health, over_health, hot_latency, bytes))
        });
        let (fresh_latency, quiet_health, over_health, hot_latency, bytes) = outcome?;
        daemon.stop()?;
        eprintln!(
            "  run {run}: new frame median {:.3} ms p99 {:.3} ms (/healthz after the same quiet {:.3} ms, the scrape {:.3} ms over it); back to back median {:.3} ms p99 {:.3} ms; {:.0} KiB",
            fresh_latency.quantile_ms(0.5),
            fresh_latency.quantile_ms(0.99),
            quiet_health.quantile_ms(0.5),
            over_health.quantile_ms(0.5),
            hot_latency.quantile_ms(0.5),
            hot_latency.quantile_ms(0.99),
            bytes as f64 / 1024.0
        );
        fig.record(
            "scrape meeting a new frame, median",
            "ms",
            Some(Target::AtMost(1.0)),
            fresh_latency.quantile_ms(0.5),
        );
        fig.record(
            "scrape meeting a new frame, p99",
            "ms",
            None,
            fresh_latency.quantile_ms(0.99),
        );
        fig.record(
            "/healthz after the same quiet, median",
            "ms",
            None,
            quiet_health.quantile_ms(0.5),
        );
        fig.record(
            "scrape meeting a new frame over that /healthz, median",
            "ms",
            None,
            over_health.quantile_ms(0.5),
        );
        fig.record(
            "back-to-back scrape, median",
            "ms",
            None,
            hot_latency.quantile_ms(0.5),
        );
        fig.record(
            "back-to-back scrape, p99",
            "ms",
            None,
            hot_latency.quantile_ms(0.99),
        );
        fig.record("body (OpenMetrics)", "KiB", None, bytes as f64 / 1024.0);
    }
    fig.note(format!(
        "one kept-alive HTTP/1.1 connection with Prometheus's Accept header; {fresh} scrapes 110 ms apart (each meets a frame not yet rendered), each followed 110 ms later by a /healthz (what waking both ends costs), then {hot} back to back; time from request to the last byte of the body"
    ));
    Ok(fig.finish())
}
