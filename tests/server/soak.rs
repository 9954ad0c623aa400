//! A bounded soak: telemetry streams, an event follower and control calls
//! all running while the daemon is restarted with SIGTERM and SIGKILL, on
//! simulated GPUs the governor is busy with. At the end: no event a client
//! saw is missing from the log, event numbering has no holes, every stream's
//! sequence numbers only skipped where it was told, and the daemon's memory
//! stayed bounded.
//!
//! Ignored by default (it takes minutes); `.ci/soak.sh` runs it with
//! `SOAK_SECS` (default 60).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::support::{Options, events_since, index};
use gpuwatch_api::{self as api, WatchRequest, watch_events_response, watch_response::Message};

fn scenario() -> String {
    crate::support::sim_config(
        10.0,
        "[controller]\nthreshold_c = 70\n",
        &[
            "preset = \"h100-sxm\"\nambient_c = 40.0\ndemand = [ { at = \"0s\", watts = 690 }, { at = \"40s\", watts = 200 } ]\nrepeat = \"80s\"",
            "preset = \"a100-sxm\"\nambient_c = 38.0\ndemand = [ { at = \"0s\", watts = 390 }, { at = \"30s\", watts = 100 } ]\nrepeat = \"60s\"",
            "preset = \"laptop\"\ndemand = [ { at = \"0s\", watts = 110 } ]",
        ],
    )
}

/// A Watch subscriber that survives restarts: resumes after the last seq it
/// saw and checks every frame is the next one or announced by a gap.
async fn watcher(
    url: String,
    stop: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    violations: Arc<Mutex<Vec<String>>>,
) {
    let mut last: Option<u64> = None;
    let mut stride = 1;
    while !stop.load(Ordering::Relaxed) {
        let Ok(channel) = tonic::transport::Channel::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut client = api::gpu_watch_client::GpuWatchClient::new(channel);
        let request = WatchRequest {
            interval_ms: 100,
            resume_after_seq: last,
            ..Default::default()
        };
        let Ok(response) = client.watch(request).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = response.into_inner();
        while let Ok(Ok(Some(msg))) =
            tokio::time::timeout(Duration::from_secs(5), stream.message()).await
        {
            match msg.message {
                Some(Message::Start(s)) => {
                    stride = u64::from(s.stride);
                    if let Some(f) = s.current {
                        last = Some(f.seq);
                    }
                }
                Some(Message::Gap(g)) => last = Some(g.last_seq + 1 - stride),
                Some(Message::History(_)) => {}
                Some(Message::Frame(f)) => {
                    if let Some(prev) = last
                        && f.seq != prev + stride
                    {
                        violations
                            .lock()
                            .expect("lock")
                            .push(format!("frame {} after {prev} without a gap", f.seq));
                    }
                    last = Some(f.seq);
                    frames.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// Follows events across restarts, remembering every one it saw.
async fn event_follower(
    url: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<u64, api::Event>>>,
) {
    let mut since = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(channel) = tonic::transport::Channel::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut client = api::gpu_watch_client::GpuWatchClient::new(channel);
        let Ok(response) = client
            .watch_events(api::WatchEventsRequest {
                since_seq: Some(since),
                ..Default::default()
            })
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = response.into_inner();
        while let Ok(Ok(Some(msg))) =
            tokio::time::timeout(Duration::from_secs(5), stream.message()).await
        {
            if let Some(watch_events_response::Message::Event(e)) = msg.message {
                since = since.max(e.seq);
                seen.lock().expect("lock").insert(e.seq, e);
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run by .ci/soak.sh"]
async fn soak_streams_control_and_restarts_lose_nothing_and_leak_nothing() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let options = |port: Option<u16>| Options {
        config: Some(scenario()),
        port,
        ..Options::default()
    };
    let mut daemon = crate::support::start(&state, options(None));
    let port = daemon.grpc.port();
    let url = daemon.url();

    let stop = Arc::new(AtomicBool::new(false));
    let frames = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(tokio::spawn(watcher(
            url.clone(),
            stop.clone(),
            frames.clone(),
            violations.clone(),
        )));
    }
    tasks.push(tokio::spawn(event_follower(
        url.clone(),
        stop.clone(),
        seen.clone(),
    )));
    let control_stop = stop.clone();
    let control_url = url.clone();
    let control_calls = Arc::new(AtomicU64::new(0));
    let calls = control_calls.clone();
    tasks.push(tokio::spawn(async move {
        let mut flip = false;
        while !control_stop.load(Ordering::Relaxed) {
            let mut c =
                crate::support::connect_with(&control_url, Some(crate::support::CONTROL_TOKEN))
                    .await;
            flip = !flip;
            let threshold = c
                .set_threshold(api::SetThresholdRequest {
                    gpus: vec![index(0)],
                    target: Some(api::set_threshold_request::Target::Celsius(if flip {
                        70
                    } else {
                        72
                    })),
                    hysteresis_c: None,
                })
                .await;
            let limit = c
                .set_power_limit(api::SetPowerLimitRequest {
                    gpus: vec![index(1)],
                    target: Some(api::set_power_limit_request::Target::Watts(if flip {
                        350.0
                    } else {
                        380.0
                    })),
                })
                .await;
            if threshold.is_ok() && limit.is_ok() {
                calls.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }));

    let started = Instant::now();
    let mut restarts = 0;
    let mut peak_rss = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(
            Duration::from_secs(15)
                .min(Duration::from_secs(secs).saturating_sub(started.elapsed())),
        )
        .await;
        peak_rss = peak_rss.max(crate::support::rss_kib(daemon.pid()));
        if started.elapsed() >= Duration::from_secs(secs) {
            break;
        }
        let signal = if restarts % 3 == 2 { "KILL" } else { "TERM" };
        daemon.signal_and_wait(signal, Duration::from_secs(20));
        daemon = crate::support::start(&state, options(Some(port)));
        restarts += 1;
    }
    // Let the clients catch up with the last daemon, then stop them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }

    let mut c = daemon.client().await;
    let log = events_since(&mut c, 0).await;
    let seen = seen.lock().expect("lock");
    let missing: Vec<_> = seen
        .keys()
        .filter(|seq| !log.iter().any(|e| e.seq == **seq))
        .collect();
    assert!(
        missing.is_empty(),
        "events seen live but not in the log: {missing:?}"
    );
    for e in log.iter().filter(|e| seen.contains_key(&e.seq)) {
        assert_eq!(
            Some(e),
            seen.get(&e.seq),
            "an event reads back exactly as it was streamed"
        );
    }
    assert!(
        log.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "event numbering has no holes"
    );
    let violations = violations.lock().expect("lock");
    assert!(violations.is_empty(), "{violations:?}");
    assert!(frames.load(Ordering::Relaxed) > 16 * secs, "streams flowed");
    assert!(
        control_calls.load(Ordering::Relaxed) > secs,
        "control calls succeeded"
    );
    assert!(restarts >= 1 || secs < 20);
    assert!(peak_rss < 80 * 1024, "daemon RSS peaked at {peak_rss} KiB");
    eprintln!(
        "soak: {secs} s, {restarts} restarts, {} frames, {} control rounds, {} events, peak RSS {peak_rss} KiB",
        frames.load(Ordering::Relaxed),
        control_calls.load(Ordering::Relaxed),
        log.len()
    );
}
