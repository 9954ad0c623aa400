//! The thermal governor and the simulator's physics, through the public API
//! of the real daemon: a GPU driven toward threshold + 15 °C is held near the
//! threshold and given its power back; dry-run writes nothing; the laptop
//! preset is governed by clock locks; SIGTERM restores, SIGKILL leaves a
//! throttle the next start clears; an operator's ceiling is never exceeded
//! and is re-applied when the driver resets it; a lost GPU is announced and
//! comes back while the others keep streaming.
//!
//! Simulated time runs 20x faster than the wall clock and the sampler ticks
//! every 50 ms, so the GPU is read once per simulated second.

use std::{collections::BTreeMap, time::Duration};

use crate::support::{Options, events_since, index};
use gpuwatch_api::{self as api, ActorKind, EventKind, GovernorMode, GpuHealth, event::Change};

const SPEED: f64 = 20.0;

/// A frame's sample of GPU `gpu`, with its simulated time.
#[derive(Debug, Clone)]
struct Point {
    sim_s: f64,
    temperature_c: u32,
    limit_mw: Option<u32>,
    health: GpuHealth,
}

/// Watches until `until_sim_s` (simulated seconds since the daemon started)
/// and returns GPU `gpu`'s samples.
async fn record(client: &mut crate::support::Client, gpu: u32, until_sim_s: f64) -> Vec<Point> {
    let mut points = Vec::new();
    crate::support::frames_until(
        client,
        SPEED,
        until_sim_s,
        Duration::from_secs(20),
        |sim_s, frame| {
            if let Some(s) = frame.samples.iter().find(|s| s.index == gpu) {
                points.push(Point {
                    sim_s,
                    temperature_c: s.temperature_c.unwrap_or(0),
                    limit_mw: s.power_limit_mw,
                    health: s.health(),
                });
            }
        },
    )
    .await;
    points
}

/// An H100 whose demand (650 W from 5 s to 85 s, then 150 W) would settle at
/// 30 + 650 * 0.075 = 78.75 °C; the governor's threshold is 64 °C.
fn hot_h100(extra: &str) -> String {
    format!(
        r#"
[sampler]
interval = "50ms"

[simulator]
speed = {SPEED}

[[simulator.gpus]]
preset = "h100-sxm"
ambient_c = 30.0
time_constant = "10s"
thermal_resistance_c_per_w = 0.075
demand = [ {{ at = "5s", watts = 650 }}, {{ at = "85s", watts = 150 }} ]

[controller]
threshold_c = 64
hysteresis_c = 3
{extra}
"#
    )
}

fn governor_writes(events: &[api::Event]) -> Vec<&api::Event> {
    events
        .iter()
        .filter(|e| {
            e.kind() == EventKind::PowerLimitChanged
                && e.actor
                    .as_ref()
                    .is_some_and(|a| a.kind() == ActorKind::Governor)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governor_holds_a_hot_gpu_at_its_threshold_and_gives_the_power_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(hot_h100("")));
    let mut c = d.client().await;
    let points = record(&mut c, 0, 125.0).await;
    let threshold = 64;
    let peak = points
        .iter()
        .map(|p| p.temperature_c)
        .max()
        .expect("samples");
    assert!(
        peak <= threshold + 2,
        "peak {peak} °C for threshold {threshold} °C"
    );
    assert!(
        peak >= threshold - 3,
        "the GPU did heat up to the threshold (peak {peak})"
    );
    // Settled: the second half of the hot phase within ±1 °C of the threshold or below.
    let settled: Vec<_> = points
        .iter()
        .filter(|p| (45.0..85.0).contains(&p.sim_s))
        .collect();
    assert!(!settled.is_empty());
    assert!(
        settled.iter().all(|p| p.temperature_c <= threshold + 1),
        "{settled:?}"
    );
    assert!(
        settled
            .iter()
            .any(|p| p.limit_mw.is_some_and(|l| l < 700_000)),
        "the limit was lowered"
    );
    // Given back: at the ceiling within three time constants of the drop.
    let recovered = points
        .iter()
        .find(|p| p.sim_s > 85.0 && p.limit_mw == Some(700_000))
        .map(|p| p.sim_s - 85.0);
    assert!(
        recovered.is_some_and(|s| s <= 30.0 + 3.0),
        "recovered after {recovered:?} s"
    );

    let events = events_since(&mut c, 0).await;
    let writes = governor_writes(&events);
    assert!(
        !writes.is_empty() && writes.len() <= 20,
        "{} governor writes",
        writes.len()
    );
    for w in &writes {
        assert!(
            w.reason.contains("°C"),
            "reason names the temperature: {}",
            w.reason
        );
        let Some(Change::PowerLimit(change)) = &w.change else {
            panic!("a limit write records before/after");
        };
        assert!(change.before_mw.is_some() && change.after_mw.is_some());
        assert!(
            change
                .after_mw
                .is_some_and(|a| (200_000..=700_000).contains(&a))
        );
    }
    let policy = c
        .get_policy(api::GetPolicyRequest::default())
        .await
        .expect("policy")
        .into_inner();
    assert_eq!(policy.policies[0].mode(), GovernorMode::PowerLimit);
    assert!(policy.policies[0].last_action.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_decides_and_records_but_never_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(hot_h100("dry_run = true")));
    let mut c = d.client().await;
    let points = record(&mut c, 0, 60.0).await;
    assert!(
        points.iter().all(|p| p.limit_mw == Some(700_000)),
        "dry run changed the limit"
    );
    let peak = points
        .iter()
        .map(|p| p.temperature_c)
        .max()
        .expect("samples");
    assert!(
        peak >= 64 + 8,
        "without writes the GPU runs hot (peak {peak})"
    );
    let events = events_since(&mut c, 0).await;
    assert!(governor_writes(&events).is_empty());
    assert!(
        events.iter().any(|e| e.kind() == EventKind::DryRunDecision),
        "decisions are recorded"
    );
    let policy = c
        .get_policy(api::GetPolicyRequest::default())
        .await
        .expect("policy")
        .into_inner();
    assert!(policy.policies[0].dry_run);
    assert_eq!(policy.policies[0].state(), api::GovernorState::ObserveOnly);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laptop_without_power_limit_control_is_governed_by_clock_locks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        r#"
[sampler]
interval = "50ms"
[simulator]
speed = {SPEED}
[[simulator.gpus]]
preset = "laptop"
ambient_c = 35.0
time_constant = "8s"
thermal_resistance_c_per_w = 0.42
demand = [ {{ at = "5s", watts = 110 }} ]
[controller]
threshold_c = 66
"#
    );
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let mut c = d.client().await;
    let points = record(&mut c, 0, 90.0).await;
    let peak = points
        .iter()
        .map(|p| p.temperature_c)
        .max()
        .expect("samples");
    assert!(peak <= 66 + 2, "peak {peak}");
    let list = c
        .list_devices(api::ListDevicesRequest::default())
        .await
        .expect("list")
        .into_inner();
    let policy = list.devices[0].policy.clone().expect("policy");
    assert_eq!(policy.mode(), GovernorMode::ClockLock);
    assert!(
        policy.mode_reason.contains("not supported"),
        "{}",
        policy.mode_reason
    );
    let events = events_since(&mut c, 0).await;
    assert!(events.iter().any(|e| e.kind() == EventKind::ClocksLocked));
    assert!(
        events
            .iter()
            .any(|e| e.kind() == EventKind::GovernorModeChanged)
    );
    let err = c
        .set_power_limit(api::SetPowerLimitRequest {
            gpus: vec![index(0)],
            target: Some(api::set_power_limit_request::Target::Watts(80.0)),
        })
        .await
        .expect_err("no power limit control");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_only_when_nothing_can_be_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = r#"
[[simulator.gpus]]
preset = "laptop"
clocks_lockable = false
"#;
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let mut c = d.client().await;
    let list = c
        .list_devices(api::ListDevicesRequest::default())
        .await
        .expect("list")
        .into_inner();
    let policy = list.devices[0].policy.clone().expect("policy");
    assert_eq!(policy.mode(), GovernorMode::ObserveOnly);
    assert_eq!(policy.state(), api::GovernorState::ObserveOnly);
    let events = events_since(&mut c, 0).await;
    assert!(
        events
            .iter()
            .any(|e| e.kind() == EventKind::GovernorModeChanged
                && e.reason.contains("observing only")),
        "{events:?}"
    );
}

/// Runs the hot scenario until the governor has lowered the limit.
async fn until_throttled(c: &mut crate::support::Client) {
    crate::support::eventually(
        Duration::from_secs(30),
        "the governor to lower the limit",
        || {
            let mut c = c.clone();
            async move {
                let snap = c
                    .get_snapshot(api::GetSnapshotRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                snap.samples[0]
                    .power_limit_mw
                    .filter(|l| *l < 650_000)
                    .map(|_| ())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_throttled_restores_the_limit_and_records_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut d = crate::support::start(&state, Options::with_config(hot_h100("")));
    let mut c = d.client().await;
    until_throttled(&mut c).await;
    assert_eq!(d.signal_and_wait("TERM", Duration::from_secs(15)), Some(0));

    let d = crate::support::start(&state, Options::with_config(hot_h100("")));
    let mut c = d.client().await;
    let snap = c
        .get_snapshot(api::GetSnapshotRequest::default())
        .await
        .expect("snapshot")
        .into_inner();
    assert_eq!(
        snap.samples[0].power_limit_mw,
        Some(700_000),
        "the board was given its power back"
    );
    let events = events_since(&mut c, 0).await;
    let restored = events.iter().find(|e| {
        e.kind() == EventKind::PowerLimitChanged
            && e.actor
                .as_ref()
                .is_some_and(|a| a.kind() == ActorKind::Shutdown)
    });
    let Some(Change::PowerLimit(change)) = restored.and_then(|e| e.change.clone()) else {
        panic!("no shutdown restore event in {events:?}");
    };
    assert_eq!(change.after_mw, Some(700_000));
    assert!(change.before_mw.is_some_and(|b| b < 700_000));
    assert!(events.iter().any(|e| e.kind() == EventKind::DaemonStopping));
    // Nothing to clear at the second start.
    assert!(!events.iter().any(|e| e.reason.contains("stale throttle")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_throttled_then_start_clears_the_stale_throttle_and_loses_no_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut d = crate::support::start(&state, Options::with_config(hot_h100("")));
    let mut c = d.client().await;
    // A client follows the events live, as an auditor would.
    let mut live = c
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("events")
        .into_inner();
    until_throttled(&mut c).await;
    let mut seen = BTreeMap::new();
    while let Ok(Ok(Some(msg))) =
        tokio::time::timeout(Duration::from_millis(300), live.message()).await
    {
        if let Some(api::watch_events_response::Message::Event(e)) = msg.message {
            seen.insert(e.seq, e);
        }
    }
    assert!(!seen.is_empty(), "the governor's writes were seen live");
    d.signal_and_wait("KILL", Duration::from_secs(10));

    let d = crate::support::start(&state, Options::with_config(hot_h100("")));
    let mut c = d.client().await;
    let events = events_since(&mut c, 0).await;
    for (seq, e) in &seen {
        assert_eq!(
            events.iter().find(|x| x.seq == *seq),
            Some(e),
            "event {seq} seen before the kill is in the log"
        );
    }
    let cleared = events
        .iter()
        .find(|e| {
            e.actor
                .as_ref()
                .is_some_and(|a| a.kind() == ActorKind::Startup)
                && e.reason.contains("stale throttle")
        })
        .unwrap_or_else(|| panic!("no stale-throttle event in {events:?}"));
    let Some(Change::PowerLimit(change)) = &cleared.change else {
        panic!("before/after recorded");
    };
    assert_eq!(change.after_mw, Some(700_000));
    assert!(
        events.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "numbering continues without holes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_ceiling_is_never_exceeded_and_survives_a_driver_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Mild demand, and the driver resets the limit at 40 s.
    let config = format!(
        r#"
[sampler]
interval = "50ms"
[simulator]
speed = {SPEED}
[[simulator.gpus]]
preset = "h100-sxm"
demand = [ {{ at = "0s", watts = 650 }} ]
limit_reset_at = "40s"
"#
    );
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let mut c = d.client().await;
    let r = c
        .set_power_limit(api::SetPowerLimitRequest {
            gpus: vec![index(0)],
            target: Some(api::set_power_limit_request::Target::Watts(550.0)),
        })
        .await
        .expect("set")
        .into_inner();
    assert_eq!(r.results[0].ceiling_mw, 550_000);
    assert!(r.results[0].written);
    let err = c
        .set_power_limit(api::SetPowerLimitRequest {
            gpus: vec![index(0)],
            target: Some(api::set_power_limit_request::Target::Watts(750.0)),
        })
        .await
        .expect_err("out of range");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("200-700 W"), "{}", err.message());

    let points = record(&mut c, 0, 70.0).await;
    let after_reset: Vec<_> = points.iter().filter(|p| p.sim_s > 43.0).collect();
    assert!(!after_reset.is_empty());
    assert!(
        after_reset
            .iter()
            .rev()
            .take(5)
            .all(|p| p.limit_mw == Some(550_000)),
        "the operator's ceiling is back after the driver reset: {:?}",
        &after_reset[after_reset.len().saturating_sub(5)..]
    );
    let events = events_since(&mut c, 0).await;
    assert!(events.iter().any(|e| e.kind() == EventKind::LimitDrift));
    assert!(events.iter().any(|e| {
        e.kind() == EventKind::CeilingChanged
            && e.actor
                .as_ref()
                .is_some_and(|a| a.kind() == ActorKind::Operator)
    }));
    // Back to the default.
    let r = c
        .set_power_limit(api::SetPowerLimitRequest {
            gpus: vec![index(0)],
            target: Some(api::set_power_limit_request::Target::RestoreDefault(true)),
        })
        .await
        .expect("restore")
        .into_inner();
    assert_eq!(r.results[0].ceiling_mw, 700_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_gpu_is_announced_while_the_others_keep_streaming_and_it_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        r#"
[sampler]
interval = "50ms"
[simulator]
speed = {SPEED}
[[simulator.gpus]]
preset = "a100-sxm"
[[simulator.gpus]]
preset = "h100-sxm"
lost_at = "20s"
recover_at = "50s"
"#
    );
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let mut c = d.client().await;
    let healthy = record(&mut c, 0, 70.0).await;
    assert!(
        healthy.iter().all(|p| p.health == GpuHealth::Ok),
        "GPU 0 kept streaming"
    );
    let points = record(&mut c, 1, 10.0).await;
    assert!(
        points.iter().all(|p| p.health == GpuHealth::Ok),
        "GPU 1 came back"
    );
    let events = events_since(&mut c, 0).await;
    let lost = events
        .iter()
        .position(|e| e.kind() == EventKind::GpuLost && e.gpu_index == Some(1));
    let back = events
        .iter()
        .position(|e| e.kind() == EventKind::GpuRecovered && e.gpu_index == Some(1));
    assert!(
        lost.is_some() && back.is_some() && lost < back,
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temperature_settles_where_the_physics_says_and_heats_with_the_time_constant() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 25 + 400 W * 0.1 = 65 °C steady; tau 20 s; governor off.
    let config = format!(
        r#"
[sampler]
interval = "50ms"
[simulator]
speed = {SPEED}
[[simulator.gpus]]
preset = "h100-sxm"
ambient_c = 25.0
time_constant = "20s"
sensor_lag = "0s"
thermal_resistance_c_per_w = 0.1
demand = [ {{ at = "10s", watts = 400 }} ]
[controller]
enabled = false
"#
    );
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let mut c = d.client().await;
    let points = record(&mut c, 0, 150.0).await;
    let idle = 25.0 + 70.0 * 0.1;
    let steady = 65.0;
    let at = |s: f64| {
        points
            .iter()
            .min_by(|a, b| (a.sim_s - s).abs().total_cmp(&(b.sim_s - s).abs()))
            .map(|p| f64::from(p.temperature_c))
            .expect("points")
    };
    assert!((at(8.0) - idle).abs() <= 1.0, "idle at {} °C", at(8.0));
    // One time constant after the step: 63 % of the way (±1.5 °C for the
    // whole-degree sensor and frame timing).
    let expected = idle + (steady - idle) * (1.0 - (-1.0f64).exp());
    assert!(
        (at(30.0) - expected).abs() <= 1.5,
        "{} °C after one tau, expected {expected:.1}",
        at(30.0)
    );
    assert!(
        (at(145.0) - steady).abs() <= 1.0,
        "settled at {} °C, expected {steady}",
        at(145.0)
    );
    // Monotonic rise.
    let rise: Vec<_> = points
        .iter()
        .filter(|p| p.sim_s > 10.0)
        .map(|p| p.temperature_c)
        .collect();
    assert!(
        rise.windows(2).all(|w| w[1] >= w[0]),
        "heating is monotonic"
    );
}
