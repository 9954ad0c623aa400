//! Upgrading in place: a state directory written by the previous release
//! (0.1.0, kept in `tests/fixtures/state-v0.1.0/`) is read by this build
//! without loss.
//!
//! The fixture was written by the 0.1.0 `gpuwatch-server` on the fleet
//! below (two H100s under 700 W of demand, a laptop GPU), with an operator
//! ceiling of 600 W on GPU 0 and an operator threshold of 72 °C / 4 °C on
//! GPU 1 set through `gpuwatch-client`, then stopped with SIGKILL while the
//! governor held every GPU lowered: so its `state.json` says "lowered", its
//! simulated boards still hold the lowered limits and a clock lock, and its
//! `events.log` holds 18 events. (`gpuwatch.toml` beside it is the config
//! it was written with.)

use std::{path::Path, time::Duration};

use gpuwatch_api::{self as api, EventKind, GetPolicyRequest, GetSnapshotRequest, ThresholdSource};
use serde_json::Value;

use crate::support::{Options, events_since, eventually};

/// The fixture's fleet, now idle (so the governor has no reason to lower
/// anything again and what the startup repair did stays visible).
const FLEET: &str = r#"
[simulator]
speed = 20.0

[[simulator.gpus]]
preset = "h100-sxm"
count = 2

[[simulator.gpus]]
preset = "laptop"

[controller]
threshold_c = 70
"#;

fn fixture() -> std::path::PathBuf {
    gpuwatch_testkit::repo_root().join("tests/fixtures/state-v0.1.0")
}

/// Copies the fixture's state files into `dir`.
fn copy_fixture(dir: &Path) {
    std::fs::create_dir_all(dir).expect("state dir");
    for name in [
        "events.log",
        "state.json",
        "state.json.prev",
        "simulated-gpus.json",
    ] {
        std::fs::copy(fixture().join(name), dir.join(name))
            .unwrap_or_else(|e| panic!("copy fixture {name}: {e}"));
    }
}

/// (seq, kind, actor name) of every event in the fixture's log, read
/// straight from the file (`CRC32 JSON` lines).
fn fixture_events() -> Vec<(u64, String, String)> {
    let text = std::fs::read_to_string(fixture().join("events.log")).expect("fixture log");
    text.lines()
        .map(|line| {
            let (_, json) = line.split_once(' ').expect("CRC then JSON");
            let v: Value = serde_json::from_str(json).expect("fixture line is JSON");
            (
                v["seq"].as_u64().expect("seq"),
                v["kind"].as_str().expect("kind").to_owned(),
                v["actor"].as_str().expect("actor").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_from_0_1_0_is_read_without_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    copy_fixture(&state);
    let expected = fixture_events();
    assert_eq!(expected.len(), 18, "the fixture holds 18 events");

    let d = crate::support::start(&state, Options::with_config(FLEET));
    let mut c = d.client().await;

    // Every event of the old log replays, in order, with its number, kind
    // and actor; new events continue the numbering.
    let events = events_since(&mut c, 0).await;
    for (seq, kind, actor) in &expected {
        let e = events
            .iter()
            .find(|e| e.seq == *seq)
            .unwrap_or_else(|| panic!("event {seq} ({kind}) from the old log is gone"));
        assert_eq!(e.kind().as_str_name(), kind, "event {seq}'s kind");
        assert_eq!(
            e.actor.as_ref().map(|a| a.name.as_str()),
            Some(actor.as_str()),
            "event {seq}'s actor"
        );
    }
    let last_old = expected.last().map_or(0, |e| e.0);
    assert!(
        events
            .iter()
            .filter(|e| e.seq > last_old)
            .all(|e| e.seq > last_old)
            && events.iter().any(|e| e.seq > last_old),
        "the new run records events after the old ones"
    );

    // The operator's desired state survived.
    let policies = c
        .get_policy(GetPolicyRequest::default())
        .await
        .expect("GetPolicy")
        .into_inner()
        .policies;
    let p0 = &policies[0];
    assert_eq!(p0.operator_ceiling_mw, Some(600_000), "GPU 0's ceiling");
    let p1 = &policies[1];
    assert_eq!(p1.threshold_c, 72, "GPU 1's threshold");
    assert_eq!(p1.hysteresis_c, 4, "GPU 1's hysteresis");
    assert_eq!(p1.threshold_source(), ThresholdSource::Operator);
    assert_eq!(
        policies[2].threshold_c, 70,
        "GPU 2 keeps the configured one"
    );

    // What the old run left lowered is given back: GPU 0 to its operator
    // ceiling, GPU 1 to its default, the laptop's clock lock released.
    let limits = eventually(
        Duration::from_secs(20),
        "startup to restore what the old run lowered",
        || {
            let mut c = c.clone();
            async move {
                let snap = c
                    .get_snapshot(GetSnapshotRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                let gpus = snap.samples;
                let l0 = gpus.first()?.power_limit_mw?;
                let l1 = gpus.get(1)?.power_limit_mw?;
                let lock2 = c
                    .get_policy(GetPolicyRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .policies
                    .get(2)?
                    .clock_cap_mhz;
                (l0.abs_diff(600_000) <= 1_000 && l1.abs_diff(700_000) <= 1_000 && lock2.is_none())
                    .then_some((l0, l1))
            }
        },
    )
    .await;
    assert!(limits.0 <= 601_000, "never above the operator's ceiling");
    let repairs = events_since(&mut c, last_old).await;
    for gpu in [0, 1] {
        assert!(
            repairs.iter().any(|e| e.gpu_index == Some(gpu)
                && e.kind() == EventKind::PowerLimitChanged
                && e.actor.as_ref().map(|a| a.kind()) == Some(api::ActorKind::Startup)),
            "GPU {gpu}'s stale throttle is cleared by startup, as an event: {repairs:?}"
        );
    }

    // And state.json still holds the operator's choices, no longer "lowered".
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("state.json")).expect("read"))
            .expect("state.json is JSON");
    let gpus = saved["gpus"].as_object().expect("gpus");
    let by_ceiling = gpus
        .values()
        .find(|g| g["operator_ceiling_mw"].as_u64() == Some(600_000))
        .expect("the ceiling is still saved");
    assert_eq!(by_ceiling["governor_lowered_limit"], Value::Bool(false));
    assert!(
        gpus.values().any(|g| g["threshold_c"].as_u64() == Some(72)
            && g["hysteresis_c"].as_u64() == Some(4)),
        "the threshold is still saved: {saved}"
    );
}
