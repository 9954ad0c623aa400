//! Faults real clusters have, against the real daemon: a GPU lost mid-stream
//! and back (simulator and the stand-in NVML library), driver calls that
//! hang, slow and stalled subscribers, connection churn, a restart under a
//! watching client, and a damaged state file and event log at startup.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::support::{Client, Options, events_since};
use gpuwatch_api::{
    self as api, EventKind, GapReason, GpuHealth, WatchRequest, watch_response::Message,
};
use serde_json::json;

/// Frames received within `window`.
async fn frames_for(
    stream: &mut tonic::Streaming<api::WatchResponse>,
    window: Duration,
) -> Vec<api::Frame> {
    let end = Instant::now() + window;
    let mut frames = Vec::new();
    while Instant::now() < end {
        if let Message::Frame(f) = crate::support::next_message(stream).await {
            frames.push(f);
        }
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_driver_call_costs_only_its_gpu_and_shows_in_the_age() {
    a_hung_gpu_costs_only_itself(2, 1).await;
}

/// The first GPU is the first read of each tick's batch on the shared
/// reader: the GPUs after it must not wait behind its hung call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_first_gpu_costs_the_gpus_read_after_it_nothing() {
    a_hung_gpu_costs_only_itself(3, 0).await;
}

/// `count` GPUs, of which `hung`'s reads hang from 2 s to 32 s of simulated
/// time (0.2 s to 3.2 s of wall time at speed 10).
async fn a_hung_gpu_costs_only_itself(count: usize, hung: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gpus: Vec<&str> = (0..count)
        .map(|i| {
            if i == hung {
                "preset = \"h100-sxm\"\nread_hang_at = \"2s\"\nread_hang_for = \"30s\""
            } else {
                "preset = \"a100-sxm\""
            }
        })
        .collect();
    let config = crate::support::sim_config(10.0, "", &gpus);
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let mut c = d.client().await;
    let mut stream = crate::support::watch(&mut c, WatchRequest::default()).await;
    let _ = crate::support::next_message(&mut stream).await;
    let frames = frames_for(&mut stream, Duration::from_secs(2)).await;
    // The sampler kept its cadence: ~20 frames in 2 s at 100 ms (allow a
    // busy machine half of that).
    assert!(frames.len() >= 10, "only {} frames in 2 s", frames.len());
    assert!(frames.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    // The healthy GPUs stay fresh through the hang, from its first tick
    // (one late frame allowed for a busy machine).
    for gpu in (0..count).filter(|&g| g != hung) {
        let stale = frames
            .iter()
            .filter(|f| f.samples[gpu].health() != GpuHealth::Ok)
            .count();
        assert!(
            stale <= 1,
            "healthy GPU {gpu} was not fresh in {stale} frames"
        );
    }
    let last = frames.last().expect("frames");
    let hung_sample = &last.samples[hung];
    for (gpu, healthy) in last.samples.iter().enumerate().filter(|(g, _)| *g != hung) {
        assert_eq!(healthy.health(), GpuHealth::Ok, "GPU {gpu}");
        assert!(
            healthy.age_ms < 1000,
            "healthy GPU {gpu} is fresh: {} ms",
            healthy.age_ms
        );
    }
    assert_eq!(hung_sample.health(), GpuHealth::Stale, "{hung_sample:?}");
    assert!(
        hung_sample.age_ms >= 1000,
        "the hung GPU's age shows it: {} ms",
        hung_sample.age_ms
    );
    assert!(
        hung_sample.temperature_c.is_some(),
        "a stale sample keeps its last reading"
    );
    // And it comes back when the call returns.
    crate::support::eventually(
        Duration::from_secs(15),
        "the hung GPU to answer again",
        || {
            let mut c = c.clone();
            async move {
                let s = c
                    .get_snapshot(api::GetSnapshotRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                (s.samples[hung].health() == GpuHealth::Ok && s.samples[hung].age_ms < 1000)
                    .then_some(())
            }
        },
    )
    .await;
}

/// A daemon on the stand-in NVML library.
fn nvml_daemon(
    state: &std::path::Path,
    fake: &crate::nvml_support::FakeNvml,
) -> crate::support::Daemon {
    crate::support::start(
        state,
        Options {
            nvml_library: Some(fake.library().to_path_buf()),
            ..Options::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvml_gpu_lost_mid_stream_is_announced_while_the_other_streams_and_it_returns() {
    let two = |lost: bool| {
        json!({ "gpus": [
            { "model": "datacenter", "load_pct": 60 },
            { "model": "datacenter", "load_pct": 30, "lost": lost },
        ]})
    };
    let fake = crate::nvml_support::FakeNvml::new(&two(false));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = nvml_daemon(dir.path(), &fake);
    let mut c = d.client().await;
    let list = c
        .list_devices(api::ListDevicesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.host.expect("host").backend, "nvml");
    assert_eq!(list.devices.len(), 2);
    let mut stream = crate::support::watch(&mut c, WatchRequest::default()).await;
    let _ = crate::support::next_message(&mut stream).await;

    fake.set_config(&two(true));
    let lost_seen =
        crate::support::eventually(Duration::from_secs(10), "GPU 1 reported lost", || {
            let mut c = c.clone();
            async move {
                let s = c
                    .get_snapshot(api::GetSnapshotRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                (s.samples[1].health() == GpuHealth::Lost).then_some(s)
            }
        })
        .await;
    assert_eq!(lost_seen.samples[0].health(), GpuHealth::Ok);
    assert!(
        lost_seen.samples[1].temperature_c.is_none(),
        "a lost GPU has no telemetry"
    );
    // GPU 0 keeps streaming, fresh, while GPU 1 is lost.
    let frames = frames_for(&mut stream, Duration::from_secs(1)).await;
    assert!(frames.len() >= 4);
    assert!(
        frames
            .iter()
            .all(|f| f.samples[0].health() == GpuHealth::Ok)
    );

    fake.set_config(&two(false));
    crate::support::eventually(Duration::from_secs(10), "GPU 1 back", || {
        let mut c = c.clone();
        async move {
            let s = c
                .get_snapshot(api::GetSnapshotRequest::default())
                .await
                .ok()?
                .into_inner();
            (s.samples[1].health() == GpuHealth::Ok).then_some(())
        }
    })
    .await;
    // The sample that shows it back can be published before the recovery
    // event is through the writer's group commit: wait for the event.
    let kinds: Vec<_> = crate::support::eventually(
        Duration::from_secs(10),
        "GPU_RECOVERED in the event log",
        || {
            let mut c = c.clone();
            async move {
                let kinds: Vec<_> = events_since(&mut c, 0)
                    .await
                    .iter()
                    .filter(|e| e.gpu_index == Some(1))
                    .map(|e| e.kind())
                    .collect();
                kinds.contains(&EventKind::GpuRecovered).then_some(kinds)
            }
        },
    )
    .await;
    let lost = kinds.iter().position(|k| *k == EventKind::GpuLost);
    let back = kinds.iter().position(|k| *k == EventKind::GpuRecovered);
    assert!(lost.is_some() && back > lost, "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvml_calls_that_hang_leave_the_healthy_gpu_on_cadence() {
    let fake = crate::nvml_support::FakeNvml::new(&json!({ "gpus": [
        { "model": "datacenter" },
        { "model": "datacenter", "hang_ms": 60 },
    ]}));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = nvml_daemon(dir.path(), &fake);
    let mut c = d.client().await;
    let mut stream = crate::support::watch(&mut c, WatchRequest::default()).await;
    let _ = crate::support::next_message(&mut stream).await;
    let frames = frames_for(&mut stream, Duration::from_secs(4)).await;
    assert!(frames.len() >= 20, "{} frames in 4 s", frames.len());
    let last = frames.last().expect("frames");
    assert_eq!(last.samples[0].health(), GpuHealth::Ok);
    assert!(last.samples[0].age_ms < 1000);
    // The hanging GPU's reads take ~20 x 60 ms; at any moment its sample is
    // either stale or old, and its age says so.
    let ages: Vec<_> = frames.iter().map(|f| f.samples[1].age_ms).collect();
    assert!(ages.iter().any(|a| *a >= 1000), "ages {ages:?}");
    assert!(
        frames
            .iter()
            .any(|f| f.samples[1].health() == GpuHealth::Stale)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_is_told_what_it_missed_and_does_not_hold_back_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 100 Hz, so the stalled subscriber falls behind the 256-frame buffer
    // in a few seconds.
    let config = "[sampler]\ninterval = \"10ms\"\nhistory = 100\n";
    let d = crate::support::start(dir.path(), Options::with_config(config));
    // A client with small HTTP/2 windows, so its stall reaches the daemon
    // quickly instead of filling large buffers first.
    let channel = tonic::transport::Channel::from_shared(d.url())
        .expect("url")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect");
    let mut stalled_client = gpuwatch_api::gpu_watch_client::GpuWatchClient::with_interceptor(
        channel,
        gpuwatch_testkit::AddToken(Some(
            format!("Bearer {}", crate::support::CONTROL_TOKEN)
                .parse()
                .expect("ascii"),
        )),
    );
    let mut stalled = crate::support::watch(&mut stalled_client, WatchRequest::default()).await;
    let _ = crate::support::next_message(&mut stalled).await;
    let rss_before = crate::support::rss_kib(d.pid());

    // Meanwhile a healthy subscriber on another connection reads along.
    let mut healthy_client = d.client().await;
    let mut healthy = crate::support::watch(
        &mut healthy_client,
        WatchRequest {
            interval_ms: 100,
            ..Default::default()
        },
    )
    .await;
    let _ = crate::support::next_message(&mut healthy).await;
    let mut arrivals = VecDeque::new();
    let end = Instant::now() + Duration::from_secs(6);
    let mut last_seq = None;
    while Instant::now() < end {
        if let Message::Frame(f) = crate::support::next_message(&mut healthy).await {
            if let Some(prev) = last_seq {
                assert_eq!(f.seq, prev + 10, "the healthy subscriber misses nothing");
            }
            last_seq = Some(f.seq);
            arrivals.push_back(Instant::now());
        }
    }
    let gaps: Vec<_> = arrivals
        .iter()
        .zip(arrivals.iter().skip(1))
        .map(|(a, b)| *b - *a)
        .collect();
    let worst = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_millis(600),
        "the healthy subscriber waited {worst:?} between frames"
    );
    let rss_after = crate::support::rss_kib(d.pid());
    assert!(
        rss_after < rss_before + 20 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB with a stalled subscriber"
    );

    // The stalled subscriber reads again: whatever was buffered, then a gap.
    let mut saw_gap = None;
    for _ in 0..2000 {
        match crate::support::next_message(&mut stalled).await {
            Message::Gap(g) => {
                saw_gap = Some(g);
                break;
            }
            _ => continue,
        }
    }
    let gap = saw_gap.expect("the stalled subscriber is told what it missed");
    assert_eq!(gap.reason(), GapReason::SlowSubscriber);
    assert!(gap.missed > 0 && gap.last_seq >= gap.first_seq);
    let Message::Frame(f) = crate::support::next_message(&mut stalled).await else {
        panic!("frames resume after the gap");
    };
    assert_eq!(f.seq, gap.last_seq + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connects_and_disconnects_leak_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = "[limits]\nmax_streams = 64\n";
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let cycle = |n: usize| {
        let url = d.url();
        async move {
            for _ in 0..n {
                let mut c =
                    crate::support::connect_with(&url, Some(crate::support::READ_TOKEN)).await;
                let mut s = crate::support::watch(&mut c, WatchRequest::default()).await;
                let _ = s.message().await;
                let mut e = c
                    .watch_events(api::WatchEventsRequest {
                        since_seq: Some(0),
                        ..Default::default()
                    })
                    .await
                    .expect("events")
                    .into_inner();
                let _ = e.message().await;
            }
        }
    };
    // Warm up, then measure.
    cycle(200).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss0, threads0) = (
        crate::support::rss_kib(d.pid()),
        crate::support::threads(d.pid()),
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(cycle(500)));
    }
    for t in tasks {
        t.await.expect("churn task");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss1, threads1) = (
        crate::support::rss_kib(d.pid()),
        crate::support::threads(d.pid()),
    );
    assert!(
        rss1 < rss0 + 4 * 1024,
        "RSS {rss0} KiB -> {rss1} KiB after 2000 cycles"
    );
    assert!(threads1 <= threads0 + 2, "threads {threads0} -> {threads1}");
    // Every stream's place was given back: the full limit is available.
    let mut c = d.client().await;
    let mut open = Vec::new();
    for i in 0..64 {
        open.push(
            c.watch(WatchRequest::default())
                .await
                .unwrap_or_else(|e| panic!("stream {i}: {e}")),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_a_watching_client_resumes_with_the_restart_marked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut d = crate::support::start(&state, Options::default());
    let port = d.grpc.port();
    let mut c = d.client().await;
    let mut stream = crate::support::watch(&mut c, WatchRequest::default()).await;
    let mut last = 0;
    for _ in 0..5 {
        match crate::support::next_message(&mut stream).await {
            Message::Start(s) => last = s.current.map_or(last, |f| f.seq),
            Message::Frame(f) => last = f.seq,
            Message::Gap(_) | Message::History(_) => {}
        }
    }
    d.signal_and_wait("TERM", Duration::from_secs(15));
    let d = crate::support::start(
        &state,
        Options {
            port: Some(port),
            ..Options::default()
        },
    );
    let started = Instant::now();
    let mut c = d.client().await;
    let mut stream = c
        .watch(WatchRequest {
            resume_after_seq: Some(last),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    assert!(matches!(
        crate::support::next_message(&mut stream).await,
        Message::Start(_)
    ));
    // What history holds of the missed ticks may come first; then the gap.
    let gap = loop {
        match crate::support::next_message(&mut stream).await {
            Message::History(_) => {}
            Message::Gap(gap) => break gap,
            other => panic!("the restart shows as a gap, not {other:?}"),
        }
    };
    assert!(gap.restarted && gap.first_seq == last + 1, "{gap:?}");
    let Message::Frame(f) = crate::support::next_message(&mut stream).await else {
        panic!("frames continue");
    };
    assert!(f.seq > last);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_state_and_event_log_are_reported_and_the_gpus_still_protected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    // A torn event log and a truncated state file, as after a power loss.
    std::fs::write(state.join("events.log"), "deadbeef {\"seq\":1,\"ti").expect("write");
    std::fs::write(state.join("state.json"), "{\"version\":1,\"gpus\":{\"GPU-").expect("write");
    let config = r#"
[sampler]
interval = "50ms"
[simulator]
speed = 20.0
[[simulator.gpus]]
preset = "h100-sxm"
demand = [ { at = "0s", watts = 700 } ]
[controller]
threshold_c = 60
"#
    .to_owned();
    let d = crate::support::start(&state, Options::with_config(config));
    let mut c: Client = d.client().await;
    let events = events_since(&mut c, 0).await;
    let damaged: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::StateDamaged)
        .collect();
    assert!(damaged.len() >= 2, "both damages reported: {events:?}");
    assert!(damaged.iter().any(|e| e.reason.contains("event log")));
    assert!(damaged.iter().any(|e| e.reason.contains("state")));
    // The governor still works.
    crate::support::eventually(
        Duration::from_secs(20),
        "the governor to lower the limit",
        || {
            let mut c = c.clone();
            async move {
                let s = c
                    .get_snapshot(api::GetSnapshotRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                s.samples[0]
                    .power_limit_mw
                    .filter(|l| *l < 700_000)
                    .map(|_| ())
            }
        },
    )
    .await;
}
