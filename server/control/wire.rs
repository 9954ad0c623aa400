//! The control plane's state in wire terms: the policy each GPU publishes
//! to the hub (GetPolicy, metrics, the dashboard) and the governor state
//! stamped on every sample. The pure governor and the planners know
//! nothing of the wire; this is where their state is spelled for it.

use crate::{
    api::{self, GovernorMode, GovernorState, GpuPolicy, event::Change},
    backend::DeviceFacts,
    governor::Phase,
};

use super::{gpu::GpuControl, lifecycle::Lifecycle};

/// The governor state a GPU's samples and policy show.
pub(crate) fn governor_state(gpu: &GpuControl) -> GovernorState {
    if !gpu.enabled {
        GovernorState::Disabled
    } else if gpu.lifecycle.is_lost() {
        GovernorState::Suspended
    } else if gpu.dry_run || gpu.mode == GovernorMode::ObserveOnly {
        GovernorState::ObserveOnly
    } else {
        match &gpu.lifecycle {
            Lifecycle::Governed { governor } => phase(governor.state()),
            _ => GovernorState::Idle,
        }
    }
}

fn phase(phase: Phase) -> GovernorState {
    match phase {
        Phase::Idle => GovernorState::Idle,
        Phase::Throttling => GovernorState::Throttling,
        Phase::Recovering => GovernorState::Recovering,
    }
}

/// The policy a GPU publishes.
pub(crate) fn policy(gpu: &GpuControl, facts: &DeviceFacts) -> GpuPolicy {
    GpuPolicy {
        index: facts.index,
        uuid: facts.uuid.clone(),
        mode: gpu.mode as i32,
        state: governor_state(gpu) as i32,
        dry_run: gpu.dry_run,
        threshold_c: gpu.threshold_c,
        threshold_source: gpu.threshold_source as i32,
        hysteresis_c: gpu.hysteresis_c,
        floor_mw: gpu.floor_mw(facts),
        ceiling_mw: gpu.ceiling_mw(facts),
        operator_ceiling_mw: gpu.operator_ceiling_mw(),
        current_limit_mw: gpu.expected_limit_mw,
        clock_cap_mhz: gpu.clock_cap_mhz,
        last_action: gpu.last_action.clone(),
        mode_reason: gpu.mode_reason.clone(),
        budget_share_mw: gpu.budget_share_mw.filter(|_| gpu.budget_active),
        budget_counted_mw: gpu
            .budget_active
            .then(|| super::node_budget::counted_mw(gpu, facts)),
    }
}

/// One line for a policy's "last action".
pub(crate) fn describe_change(event: &api::Event) -> String {
    match &event.change {
        Some(Change::PowerLimit(p)) => format!(
            "power limit {} -> {}: {}",
            p.before_mw
                .map_or("?".to_owned(), |mw| format!("{} W", mw / 1000)),
            p.after_mw
                .map_or("?".to_owned(), |mw| format!("{} W", mw / 1000)),
            event.reason
        ),
        Some(Change::ClockLock(c)) => format!(
            "graphics clock cap {} -> {}: {}",
            c.before_max_mhz
                .map_or("none".to_owned(), |m| format!("{m} MHz")),
            c.after_max_mhz
                .map_or("none".to_owned(), |m| format!("{m} MHz")),
            event.reason
        ),
        _ => event.reason.clone(),
    }
}
