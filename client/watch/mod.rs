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
