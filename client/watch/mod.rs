//! `gpuwatch-client watch`: every host's telemetry stream at once, rendered
//! as a live table on a terminal or as NDJSON otherwise.
//!
//! One task per host ([`session`]) keeps that host's stream alive and sends
//! [`session::Update`]s down one channel; one renderer ([`tui`] or
//! [`ndjson`]) consumes them on its own thread. A dead or slow host only
//! ever delays its own task.

pub mod ndjson;
pub mod session;
pub mod tui;
pub mod view;

use std::{
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gpuwatch_api::WatchRequest;
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    app::{Exit, UsageError, shutdown_signal},
    backoff::BackoffPolicy,
    cli::{WatchArgs, read_selectors},
    connect::Connector,
    hosts::HostSpec,
    output::OutputClosed,
};

use session::{HostStates, WatchPlan};

pub async fn run(
    args: WatchArgs,
    hosts: Vec<HostSpec>,
    connector: Connector,
    json: bool,
) -> Result<Exit, UsageError> {
    let initial = BackoffPolicy::DEFAULT_INITIAL.min(args.reconnect_max);
    let backoff = BackoffPolicy::new(initial, args.reconnect_max)
        .map_err(|e| UsageError(format!("--reconnect-max: {e}")))?;
    let plan = WatchPlan {
        request: WatchRequest {
            gpus: read_selectors(&args.gpu),
            interval_ms: u32::try_from(args.interval.as_millis()).unwrap_or(u32::MAX),
            resume_after_seq: None,
        },
        interval: args.interval,
        backoff,
    };
    let hosts: Arc<[HostSpec]> = hosts.into();
    let states = HostStates::new(hosts.len());
    // Room for a few updates per host: a burst never blocks a healthy host
    // behind a busy renderer for long.
    let (tx, rx) = mpsc::channel((hosts.len() * 8).clamp(256, 65_536));
    let mut tasks = JoinSet::new();
    for (i, host) in hosts.iter().enumerate() {
        tasks.spawn(session::run_host(
            i,
            host.clone(),
            connector.clone(),
            plan.clone(),
            tx.clone(),
            states.clone(),
        ));
    }
    drop(tx);

    let stop = Arc::new(AtomicBool::new(false));
    let deadline = args.duration.map(|d| Instant::now() + d);
    let use_tui = !json && std::io::stdout().is_terminal();
    let render_hosts = hosts.clone();
    let render_stop = stop.clone();
    let interval = args.interval;
    let mut renderer = tokio::task::spawn_blocking(move || -> Result<(), RenderError> {
        if use_tui {
            tui::run(rx, &render_hosts, interval, render_stop, deadline)
                .map(|_| ())
                .map_err(RenderError::Terminal)
        } else {
            ndjson::run(rx, &render_hosts).map_err(RenderError::Output)
        }
    });

    let sleep_until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    let finished = tokio::select! {
        r = &mut renderer => Some(r),
        _ = shutdown_signal() => None,
        _ = sleep_until_deadline => None,
    };
    stop.store(true, Ordering::Relaxed);
    let all_up = states.all_up();
    // Ending the host tasks closes the channel, so the NDJSON writer drains
    // what is left, flushes and returns.
    tasks.shutdown().await;
    let rendered = match finished {
        Some(r) => r,
        None => match tokio::time::timeout(Duration::from_secs(5), renderer).await {
            Ok(r) => r,
            Err(_) => Ok(Ok(())),
        },
    };
    let render_failed = match rendered {
        Ok(Ok(())) => false,
        Ok(Err(RenderError::Output(closed))) => closed.report(),
        Ok(Err(RenderError::Terminal(e))) => {
            eprintln!("gpuwatch-client: terminal error: {e} (--json prints NDJSON instead)");
            true
        }
        Err(e) => {
            eprintln!("gpuwatch-client: the display failed: {e}");
            true
        }
    };
    Ok(if all_up && !render_failed {
        Exit::Ok
    } else {
        Exit::Failed
    })
}

#[derive(Debug)]
enum RenderError {
    Output(OutputClosed),
    Terminal(std::io::Error),
}

/// `gpuwatch-client record`: the same host sessions as `watch`, written to
/// a file instead of rendered.
pub async fn record(
    args: crate::cli::RecordArgs,
    hosts: Vec<HostSpec>,
    connector: Connector,
) -> Result<Exit, UsageError> {
    let initial = BackoffPolicy::DEFAULT_INITIAL.min(args.reconnect_max);
    let backoff = BackoffPolicy::new(initial, args.reconnect_max)
        .map_err(|e| UsageError(format!("--reconnect-max: {e}")))?;
    let plan = WatchPlan {
        request: WatchRequest {
            gpus: read_selectors(&args.gpu),
            interval_ms: u32::try_from(args.interval.as_millis()).unwrap_or(u32::MAX),
            resume_after_seq: None,
        },
        interval: args.interval,
        backoff,
    };
    let labels: Vec<String> = hosts.iter().map(|h| h.label.clone()).collect();
    let mut writer = crate::recording::RecordingWriter::create(&args.out, &labels)
        .map_err(|e| UsageError(format!("cannot write {}: {e}", args.out.display())))?;
    let states = HostStates::new(hosts.len());
    let (tx, mut rx) = mpsc::channel((hosts.len() * 8).clamp(256, 65_536));
    let mut tasks = JoinSet::new();
    for (i, host) in hosts.iter().enumerate() {
        tasks.spawn(session::run_host(
            i,
            host.clone(),
            connector.clone(),
            plan.clone(),
            tx.clone(),
            states.clone(),
        ));
    }
    drop(tx);
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut failed = false;
    loop {
        tokio::select! {
            update = rx.recv() => match update {
                Some(u) => {
                    if let Err(e) = writer.write(&u) {
                        eprintln!("gpuwatch-client: cannot write {}: {e}", args.out.display());
                        failed = true;
                        break;
                    }
                }
                None => break,
            },
            _ = &mut deadline => break,
            _ = &mut shutdown => break,
        }
    }
    tasks.shutdown().await;
    let entries = writer.entries;
    if let Err(e) = writer.finish() {
        eprintln!("gpuwatch-client: cannot finish {}: {e}", args.out.display());
        failed = true;
    }
    eprintln!(
        "gpuwatch-client: recorded {entries} messages from {} host(s) to {}",
        labels.len(),
        args.out.display()
    );
    Ok(if failed || !states.all_up() {
        Exit::Failed
    } else {
        Exit::Ok
    })
}

/// `gpuwatch-client watch --replay FILE`: a recording through the same
/// renderers as a live watch, its intervals divided by `--speed`.
pub async fn replay(
    file: &std::path::Path,
    args: &WatchArgs,
    json: bool,
) -> Result<Exit, UsageError> {
    let mut reader =
        crate::recording::RecordingReader::open(file).map_err(|e| UsageError(e.to_string()))?;
    let hosts: Arc<[HostSpec]> = reader
        .header
        .hosts
        .iter()
        .map(|label| {
            crate::hosts::parse_host(label).unwrap_or_else(|_| HostSpec {
                label: label.clone(),
                name: label.clone(),
                port: 0,
                tls: false,
                tls_name: None,
            })
        })
        .collect::<Vec<_>>()
        .into();
    let (tx, rx) = mpsc::channel(1024);
    let speed = args.speed;
    let stop = Arc::new(AtomicBool::new(false));
    let feed_stop = stop.clone();
    let feeder = std::thread::spawn(move || {
        let mut origin: Option<(i64, Instant)> = None;
        while let Some(entry) = reader.next_entry() {
            if feed_stop.load(Ordering::Relaxed) {
                return;
            }
            let at = entry.received_unix_ms;
            let (first, started) = *origin.get_or_insert((at, Instant::now()));
            let offset_ms = u64::try_from(at.saturating_sub(first)).unwrap_or(0) as f64 / speed;
            let due = started + Duration::from_secs_f64(offset_ms / 1000.0);
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            if let Some(update) = crate::recording::update_of(entry)
                && tx.blocking_send(update).is_err()
            {
                return;
            }
        }
    });
    let use_tui = !json && std::io::stdout().is_terminal();
    let interval = args.interval;
    let deadline = args.duration.map(|d| Instant::now() + d);
    let render_stop = stop.clone();
    let render_hosts = hosts.clone();
    let renderer = tokio::task::spawn_blocking(move || -> Result<(), RenderError> {
        if use_tui {
            tui::run(rx, &render_hosts, interval, render_stop, deadline)
                .map(|_| ())
                .map_err(RenderError::Terminal)
        } else {
            ndjson::run(rx, &render_hosts).map_err(RenderError::Output)
        }
    });
    let rendered = tokio::select! {
        r = renderer => Some(r),
        _ = shutdown_signal() => None,
    };
    stop.store(true, Ordering::Relaxed);
    drop(feeder);
    Ok(match rendered {
        Some(Ok(Ok(()))) | None => Exit::Ok,
        Some(Ok(Err(RenderError::Output(closed)))) if !closed.report() => Exit::Ok,
        Some(Ok(Err(RenderError::Terminal(e)))) => {
            eprintln!("gpuwatch-client: terminal error: {e} (--json prints NDJSON instead)");
            Exit::Failed
        }
        Some(_) => Exit::Failed,
    })
}
