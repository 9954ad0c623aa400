//! Disk I/O is off the sampling loop, through the real daemon: with the
//! state directory's writer slowed by seconds (the test-only
//! `GPUWATCH_TEST_WRITER_DELAY`), Watch frames keep coming at the sampler's
//! cadence while a control answer waits for its change to be durable, and
//! its event reaches WatchEvents only once written; the governor writes a
//! lowered limit only after the "lowered" flag is on disk; a clean stop
//! commits everything still queued.

use std::time::{Duration, Instant, SystemTime};

use crate::support::{Options, events_since, index, sim_config};
use gpuwatch_api::{self as api, EventKind, WatchRequest, watch_events_response, watch_response};

/// What the writer waits before every commit in these tests.
const WRITER_DELAY: Duration = Duration::from_secs(2);

fn slow_disk(config: String, delay: Duration) -> Options {
    Options {
        env: vec![(
            gpuwatch_server::persist::TEST_DELAY_ENV.to_owned(),
            format!("{}ms", delay.as_millis()),
        )],
        ..Options::with_config(config)
    }
}

fn one_h100() -> String {
    sim_config(
        1.0,
        "[sampler]\ninterval = \"100ms\"\n",
        &["preset = \"h100-sxm\"\ndemand = [ { at = \"0s\", watts = 300 } ]"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_delays_control_answers_but_never_the_sampler() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), slow_disk(one_h100(), WRITER_DELAY));
    let mut c = d.client().await;

    // New events only, followed live from before the request.
    let mut live = c
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("events")
        .into_inner();
    let events_task = tokio::spawn(async move {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), live.message())
                .await
                .expect("the threshold event in time")
                .expect("event stream")
                .expect("stream open");
            if let Some(watch_events_response::Message::Event(e)) = msg.message
                && e.kind() == EventKind::ThresholdChanged
            {
                return (Instant::now(), e);
            }
        }
    });

    let mut frames = crate::support::watch(&mut c, WatchRequest::default()).await;
    let watch_response::Message::Start(start) = crate::support::next_message(&mut frames).await
    else {
        panic!("Watch starts with a start message");
    };
    let interval = Duration::from_millis(u64::from(start.sampler_interval_ms));

    let mut control = c.clone();
    let asked = Instant::now();
    let mut answer = tokio::spawn(async move {
        let reply = control
            .set_threshold(api::SetThresholdRequest {
                gpus: vec![index(0)],
                target: Some(api::set_threshold_request::Target::Celsius(70)),
                hysteresis_c: None,
            })
            .await;
        (Instant::now(), reply)
    });

    // Count frames (and ticks, by seq) while the answer is pending, and the
    // longest time without a tick (the daemon's own stamps, so a slow test
    // client does not count), from the question to the answer.
    let (mut received, mut first_seq, mut last_seq) = (0u64, None, 0u64);
    let (mut last_tick, mut longest_pause) = (Some(SystemTime::now()), Duration::ZERO);
    let (answered, reply) = loop {
        tokio::select! {
            done = &mut answer => {
                if let Some(before) = last_tick {
                    longest_pause = longest_pause
                        .max(SystemTime::now().duration_since(before).unwrap_or_default());
                }
                break done.expect("control task");
            }
            msg = crate::support::next_message(&mut frames) => {
                if let watch_response::Message::Frame(f) = msg {
                    received += 1;
                    first_seq.get_or_insert(f.seq);
                    last_seq = f.seq;
                    let tick = f.time.and_then(|t| SystemTime::try_from(t).ok());
                    if let (Some(before), Some(now)) = (last_tick, tick) {
                        longest_pause =
                            longest_pause.max(now.duration_since(before).unwrap_or_default());
                    }
                    last_tick = tick.or(last_tick);
                }
            }
        }
    };
    reply.expect("SetThreshold answered OK once durable");
    let waited = answered - asked;
    assert!(
        waited >= WRITER_DELAY,
        "SetThreshold was answered after {waited:?}, before its change could be on disk (writer delay {WRITER_DELAY:?})"
    );

    let ticks = last_seq.saturating_sub(first_seq.unwrap_or(last_seq)) + 1;
    let expected = waited.as_millis() / interval.as_millis().max(1);
    assert!(
        longest_pause < WRITER_DELAY / 2,
        "the sampler paused {longest_pause:?} between two ticks while the disk was slow"
    );
    assert!(
        u128::from(ticks) * 2 >= expected && received >= 5,
        "while the disk was slow for {waited:?} the sampler ticked {ticks} times and {received} frames arrived; \
         at {interval:?} a tick, about {expected} were due"
    );

    let (seen_at, event) = events_task.await.expect("events task");
    assert!(
        seen_at - asked >= WRITER_DELAY,
        "the event was published after {:?}, before the writer could have committed it",
        seen_at - asked
    );
    let Some(api::event::Change::Threshold(change)) = event.change else {
        panic!("the threshold event carries its change: {event:?}");
    };
    assert_eq!(change.after_c, Some(70));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_governor_writes_a_lowered_limit_only_once_it_is_recorded_as_lowered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = r#"
[sampler]
interval = "50ms"

[simulator]
speed = 20.0

[[simulator.gpus]]
preset = "h100-sxm"
ambient_c = 30.0
time_constant = "10s"
thermal_resistance_c_per_w = 0.075
demand = [ { at = "5s", watts = 650 } ]

[controller]
threshold_c = 64
hysteresis_c = 3
"#;
    let d = crate::support::start(
        dir.path(),
        slow_disk(config.to_owned(), Duration::from_millis(700)),
    );
    let c = d.client().await;
    let state_file = dir.path().join("state.json");
    let lowered_on_disk = crate::support::eventually(
        Duration::from_secs(60),
        "the governor to lower the limit",
        || {
            let mut c = c.clone();
            let state_file = state_file.clone();
            async move {
                let snap = c
                    .get_snapshot(api::GetSnapshotRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                snap.samples[0].power_limit_mw.filter(|l| *l < 650_000)?;
                // The GPU shows a lowered limit: the flag must already be on disk.
                let text = std::fs::read_to_string(&state_file).unwrap_or_default();
                let state: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                Some(
                    state
                        .pointer("/gpus")
                        .and_then(|g| g.as_object())
                        .is_some_and(|gpus| {
                            gpus.values()
                                .any(|g| g.get("governor_lowered_limit") == Some(&true.into()))
                        }),
                )
            }
        },
    )
    .await;
    assert!(
        lowered_on_disk,
        "the GPU was lowered before state.json recorded it as lowered"
    );
    // The write's event follows once the slow writer has committed it.
    crate::support::eventually(
        Duration::from_secs(30),
        "the governor's write in the event log",
        || {
            let mut c = c.clone();
            async move {
                events_since(&mut c, 0)
                    .await
                    .iter()
                    .any(|e| e.kind() == EventKind::PowerLimitChanged)
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_commits_everything_still_queued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut d = crate::support::start(&state, slow_disk(one_h100(), Duration::from_millis(1500)));
    let mut c = d.client().await;
    c.set_threshold(api::SetThresholdRequest {
        gpus: vec![index(0)],
        target: Some(api::set_threshold_request::Target::Celsius(72)),
        hysteresis_c: Some(5),
    })
    .await
    .expect("threshold");
    // The stop event is recorded fire-and-forget behind the slow writer.
    assert_eq!(d.signal_and_wait("TERM", Duration::from_secs(30)), Some(0));

    let d = crate::support::start(&state, Options::with_config(one_h100()));
    let mut c = d.client().await;
    let events = events_since(&mut c, 0).await;
    let kinds: Vec<_> = events.iter().map(api::Event::kind).collect();
    let stopping = kinds
        .iter()
        .position(|k| *k == EventKind::DaemonStopping)
        .unwrap_or_else(|| panic!("the stop was committed before exit: {kinds:?}"));
    assert!(
        kinds[..stopping].contains(&EventKind::ThresholdChanged),
        "{kinds:?}"
    );
    assert!(
        events.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "numbering continues without holes"
    );
    let policy = c
        .get_policy(api::GetPolicyRequest::default())
        .await
        .expect("policy")
        .into_inner();
    assert_eq!(
        (
            policy.policies[0].threshold_c,
            policy.policies[0].hysteresis_c
        ),
        (72, 5),
        "the operator's setting survived the restart"
    );
}
