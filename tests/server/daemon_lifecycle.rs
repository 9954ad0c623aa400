//! A GPU's life under the control plane, through the real daemon: a hot GPU
//! that falls off the bus and comes back (reset to its driver defaults) is
//! governed again, as it was before it went.
//!
//! Simulated time runs 20x faster than the wall clock and the sampler ticks
//! every 50 ms, so the GPU is read once per simulated second.

use std::time::Duration;

use crate::support::{Options, events_since, index};
use gpuwatch_api::{self as api, ActorKind, EventKind, GovernorMode, GovernorState};

/// An H100 drawing 650 W throughout (it would settle near 79 °C), held at
/// 64 °C by the governor, lost from 20 s to 40 s of simulated time.
const HOT_AND_LOST: &str = r#"
[sampler]
interval = "50ms"

[simulator]
speed = 20.0

[[simulator.gpus]]
preset = "h100-sxm"
ambient_c = 30.0
time_constant = "10s"
thermal_resistance_c_per_w = 0.075
demand = [ { at = "0s", watts = 650 } ]
lost_at = "20s"
recover_at = "40s"

[controller]
threshold_c = 64
hysteresis_c = 3
"#;

fn is_governor_cut(e: &api::Event) -> bool {
    e.kind() == EventKind::PowerLimitChanged
        && e.actor
            .as_ref()
            .is_some_and(|a| a.kind() == ActorKind::Governor)
        && matches!(
            &e.change,
            Some(api::event::Change::PowerLimit(c)) if c.after_mw.is_some_and(|a| a < 700_000)
        )
}

/// Regression: a GPU that was lost and came back was never governed again
/// (its governor was dropped on recovery and only the start built one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_gpu_lost_and_back_is_governed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(HOT_AND_LOST));
    let mut c = d.client().await;

    let events = crate::support::eventually(
        Duration::from_secs(30),
        "a governor cut after the GPU came back",
        || {
            let mut c = c.clone();
            async move {
                let events = events_since(&mut c, 0).await;
                let back = events
                    .iter()
                    .find(|e| e.kind() == EventKind::GpuRecovered && e.gpu_index == Some(0))?
                    .seq;
                events
                    .iter()
                    .any(|e| e.seq > back && is_governor_cut(e))
                    .then_some(events)
            }
        },
    )
    .await;

    let lost = events
        .iter()
        .find(|e| e.kind() == EventKind::GpuLost)
        .expect("the GPU was reported lost")
        .seq;
    assert!(
        events.iter().any(|e| e.seq < lost && is_governor_cut(e)),
        "the GPU was governed before it was lost: {events:?}"
    );

    // Governed, not just written once: the policy says so, and the limit
    // in force is below the default the reset GPU came back with.
    let policy = c
        .get_policy(api::GetPolicyRequest {
            gpus: vec![index(0)],
        })
        .await
        .expect("policy")
        .into_inner();
    let p = &policy.policies[0];
    assert_eq!(p.mode(), GovernorMode::PowerLimit);
    assert_ne!(p.state(), GovernorState::Suspended);
    assert!(
        p.current_limit_mw.is_some_and(|l| l < 700_000),
        "the limit is held down after the return: {p:?}"
    );
}
