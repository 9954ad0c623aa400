//! The history store's cost: a 24 h x 8 GPU GetHistory at 1 min step and a
//! 1 h query at 1 s step (latency median/p99 and the daemon's CPU while
//! answering), the cost of writing history at 10 Hz (two daemons side by
//! side in the same window, history on and off), and disk per GPU-day.
//!
//! A day of history is filled in seconds through the store's documented
//! test-only backfill (`gpuwatch_server::history::backfill`, the writer's
//! own encoding and commits) into the state directory of a stopped daemon,
//! which is then started again on it: the queries run against a full day.

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use clap::Args;
use gpuwatch_api::{GetHistoryRequest, GetSnapshotRequest, gpu_watch_client::GpuWatchClient};
use gpuwatch_server::history::{self, HistoryConfig};
use prost::Message;

use crate::{
    Common,
    daemon::{Daemon, DaemonSpec},
    duration,
    idle::sleep_watching,
    proc,
    report::{Figure, Target},
    stats::Latency,
};

/// HTTP/2 flow-control window for history answers.
const HISTORY_WINDOW_BYTES: u32 = 16 << 20;

/// Options of `history`.
#[derive(Debug, Clone, Default, Args)]
pub struct HistoryArgs {
    /// Simulated GPUs [default: 8].
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Queries timed per kind and run [default: 50].
    #[arg(long)]
    pub queries: Option<u32>,
    /// How long the write cost is measured per run [default: 30s].
    #[arg(long, value_parser = duration)]
    pub window: Option<Duration>,
}

fn file_bytes(path: &Path) -> (u64, u64) {
    std::fs::metadata(path).map_or((0, 0), |m| (m.len(), m.blocks() * 512))
}

pub fn history(common: &Common, args: &HistoryArgs) -> anyhow::Result<Figure> {
    let gpus = args.gpus.unwrap_or(8);
    let queries = args.queries.unwrap_or(common.pick(50, 5));
    let window = args
        .window
        .unwrap_or(common.pick(Duration::from_secs(30), Duration::from_secs(3)));
    let mut fig = Figure::new(
        "history",
        format!("history: {gpus} simulated GPUs, a day in the store"),
        common.runs(3),
        common.quick,
    );
    let rt = common.runtime()?;
    let config = HistoryConfig::default();

    // Disk per GPU-day: one GPU, one day, the default tiers.
    let dir = tempfile::tempdir()?;
    history::backfill(
        dir.path(),
        &config,
        &["GPU-bench-0".to_owned()],
        Duration::from_secs(86_400),
        SystemTime::now(),
    )?;
    let (len, allocated) = file_bytes(&dir.path().join(history::FILE_NAME));
    eprintln!("  one GPU-day: file {len} bytes, {allocated} allocated");
    fig.record(
        "disk per GPU-day (file size)",
        "MiB",
        None,
        len as f64 / 1_048_576.0,
    );
    fig.record(
        "disk per GPU-day (allocated)",
        "MiB",
        None,
        allocated as f64 / 1_048_576.0,
    );

    for run in 1..=fig.runs {
        // A daemon whose store holds the last 24 h of its GPUs.
        let state = tempfile::tempdir()?;
        let spec = DaemonSpec {
            state_dir: Some(state.path().to_path_buf()),
            ..DaemonSpec::fleet(gpus, Duration::from_millis(100))
        };
        let first = Daemon::start(&common.server, &spec)?;
        let uuids: Vec<String> = rt.block_on(async {
            let mut c = GpuWatchClient::connect(first.url()).await?;
            let snap = c
                .get_snapshot(GetSnapshotRequest::default())
                .await?
                .into_inner();
            anyhow::Ok(snap.samples.into_iter().map(|s| s.uuid).collect())
        })?;
        first.stop()?;
        let filled = Instant::now();
        history::backfill(
            state.path(),
            &config,
            &uuids,
            Duration::from_secs(86_400),
            SystemTime::now(),
        )?;
        eprintln!(
            "  run {run}: backfilled 24 h x {} GPUs in {:.1} s",
            uuids.len(),
            filled.elapsed().as_secs_f64()
        );
        let mut daemon = Daemon::start(&common.server, &spec)?;
        thread::sleep(Duration::from_secs(1));
        let dashboard: Vec<String> = ["temperature_c", "power_draw_mw", "power_limit_mw"]
            .iter()
            .map(|&f| f.to_owned())
            .collect();
        let day = Duration::from_secs(86_400);
        let hour = Duration::from_secs(3_600);
        let p99 = Some(Target::AtMost(20.0));
        let mut kinds = Vec::new();
        for columnar in [true, false] {
            let form = if columnar { "columns" } else { "points" };
            for (what, span, step_ms, fields) in [
                (
                    "24 h x all GPUs at 1 min, all 15 fields",
                    day,
                    60_000u32,
                    Vec::new(),
                ),
                (
                    "24 h x all GPUs at 1 min, the dashboard's 3 fields",
                    day,
                    60_000,
                    dashboard.clone(),
                ),
                (
                    "1 h x all GPUs at 1 s, all 15 fields",
                    hour,
                    1_000,
                    Vec::new(),
                ),
                (
                    "1 h x all GPUs at 1 s, the dashboard's 3 fields",
                    hour,
                    1_000,
                    dashboard.clone(),
                ),
            ] {
                // The target is the 24 h query as the CLI asks it (columns).
                let target = (columnar && span == day).then_some(p99).flatten();
                kinds.push((
                    format!("{what}, as {form}"),
                    span,
                    step_ms,
                    target,
                    fields,
                    columnar,
                ));
            }
        }
        for (name, span, step_ms, target, fields, columnar) in kinds {
            let url = daemon.url();
            let (lat, cpu, points, bytes, answered_columnar) = rt.block_on(async {
                // Windows large enough for a whole answer: with HTTP/2's
                // default 64 KiB a multi-MB answer waits on a WINDOW_UPDATE
                // round trip every 64 KiB.
                let channel = tonic::transport::Endpoint::from_shared(url)?
                    .initial_stream_window_size(Some(HISTORY_WINDOW_BYTES))
                    .initial_connection_window_size(Some(HISTORY_WINDOW_BYTES))
                    .connect()
                    .await?;
                let mut c = GpuWatchClient::new(channel).max_decoding_message_size(64 << 20);
                let mut lat = Latency::new();
                let (mut points, mut bytes, mut answered_columnar) = (0usize, 0usize, false);
                let meter = proc::CpuMeter::start(&[daemon.pid])?;
                for _ in 0..queries {
                    let now = SystemTime::now();
                    let req = GetHistoryRequest {
                        since: Some((now - span).into()),
                        until: Some(now.into()),
                        step_ms,
                        fields: fields.clone(),
                        columnar,
                        ..GetHistoryRequest::default()
                    };
                    let started = Instant::now();
                    let a = c.get_history(req).await.context("GetHistory")?.into_inner();
                    lat.record_secs(started.elapsed().as_secs_f64());
                    points = a
                        .gpus
                        .iter()
                        .map(|g| {
                            g.points.len() + g.columns.as_ref().map_or(0, |c| c.time_delta_ms.len())
                        })
                        .sum();
                    bytes = a.encoded_len();
                    answered_columnar = a.columnar;
                }
                let (cpu, _) = meter.percent()?;
                anyhow::Ok((lat, cpu, points, bytes, answered_columnar))
            })?;
            eprintln!(
                "  run {run}: {name}: {points} points in {bytes} bytes{}, median {:.2} ms, p99 {:.2} ms, daemon CPU {cpu:.0} % of a core while answering back to back",
                if columnar && !answered_columnar {
                    " (this daemon answered points: it predates columns)"
                } else {
                    ""
                },
                lat.quantile_ms(0.5),
                lat.quantile_ms(0.99)
            );
            fig.record(&format!("{name}: median"), "ms", None, lat.quantile_ms(0.5));
            fig.record(&format!("{name}: p99"), "ms", target, lat.quantile_ms(0.99));
            fig.record(
                &format!("{name}: daemon CPU, queries back to back"),
                "% core",
                None,
                cpu,
            );
            fig.record(&format!("{name}: points"), "points", None, points as f64);
            fig.record(
                &format!("{name}: answer size"),
                "MB",
                None,
                bytes as f64 / 1e6,
            );
        }
        daemon.check_alive()?;
        // The daemon that answered (its query cache full of what it was
        // asked), compared below with one without history: at once, and a
        // second later, once the daemon has given the pages of its large
        // answers back (it trims 100 ms after the last, see
        // server/memory.rs). What it holds is the second figure.
        let rss_at_once = proc::rss_mib(daemon.pid)?;
        thread::sleep(Duration::from_secs(1));
        let rss_queried = proc::rss_mib(daemon.pid)?;
        daemon.stop()?;

        // Write cost: history on and off, side by side, same window.
        let off = DaemonSpec {
            extra_toml: "[history]\nenabled = false\n".to_owned(),
            ..DaemonSpec::fleet(gpus, Duration::from_millis(100))
        };
        let on = DaemonSpec::fleet(gpus, Duration::from_millis(100));
        let mut d_off = Daemon::start(&common.server, &off)?;
        let mut d_on = Daemon::start(&common.server, &on)?;
        thread::sleep(common.pick(Duration::from_secs(5), Duration::from_secs(1)));
        let m_off = proc::CpuMeter::start(&[d_off.pid])?;
        let m_on = proc::CpuMeter::start(&[d_on.pid])?;
        sleep_watching(&mut d_on, window)?;
        d_off.check_alive()?;
        let (c_off, _) = m_off.percent()?;
        let (c_on, wall) = m_on.percent()?;
        let (rss_off, rss_on) = (proc::rss_mib(d_off.pid)?, proc::rss_mib(d_on.pid)?);
        d_on.stop()?;
        d_off.stop()?;
        eprintln!(
            "  run {run}: daemon CPU history on {c_on:.3} %, off {c_off:.3} % over {:.1} s; RSS on {rss_on:.1} MiB, off {rss_off:.1} MiB, after the queries {rss_at_once:.1} MiB at once, {rss_queried:.1} MiB 1 s later",
            wall.as_secs_f64()
        );
        fig.record("daemon CPU, history on", "% core", None, c_on);
        fig.record("daemon CPU, history off", "% core", None, c_off);
        fig.record(
            "history write cost (on - off)",
            "% core",
            Some(Target::AtMost(0.3)),
            c_on - c_off,
        );
        fig.record(
            "RSS, history on - off",
            "MiB",
            Some(Target::AtMost(20.0)),
            rss_on - rss_off,
        );
        fig.record(
            "RSS at the last query's answer (a day in the store) - history off",
            "MiB",
            None,
            rss_at_once - rss_off,
        );
        fig.record(
            "RSS 1 s after the queries (a day in the store) - history off",
            "MiB",
            Some(Target::AtMost(20.0)),
            rss_queried - rss_off,
        );
    }
    fig.note(format!(
        "queries: {queries} GetHistory calls back to back on one connection (every stored field, or the 3 the dashboard asks for; answered as columns, as the CLI asks, and as points, as older clients do), timed until the client holds the decoded answer, against 24 h backfilled through gpuwatch_server::history::backfill (the writer's encoding and commits); write cost: two daemons ({gpus} GPUs at 10 Hz) measured over the same {window:?} window, one with [history] enabled = false; disk: one GPU-day at the default tiers (1 s for 24 h + 1 min buckets), redb file size and allocated blocks"
    ));
    Ok(fig.finish())
}
