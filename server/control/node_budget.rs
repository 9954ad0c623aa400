//! The node power budget in the control plane: who takes part and at what
//! count, each GPU's share, and the writes that move the GPUs to their
//! shares in an order that keeps the sum of the limits in force within the
//! budget at every moment.
//!
//! The split itself is [`crate::budget::allocate`] (water-filling by need);
//! this module turns the control state of every GPU into its input and its
//! output into shares and writes. A share is an inner limit like the
//! operator's ceiling ([`GpuControl::ceiling_mw`] includes it), so the
//! thermal governor, the startup repairs, drift correction and operator
//! requests all stay under it without knowing about the budget.
//!
//! # The invariant
//!
//! Every GPU counts against the budget at the highest limit it may have in
//! force now: its share, its limit last confirmed and any write still under
//! way (which may land at any moment). A GPU that is lost or in a call that
//! has not returned keeps that count and gets no new share; one whose power
//! limit cannot be set counts at its maximum limit. A round lowers shares
//! (and writes the lowers) first; a share grows only by room left after
//! everything is counted that way, so no order in which the writes land can
//! take the sum over the budget.

use std::time::{Duration, SystemTime};

use crate::{
    actor::WriteOp,
    api::{BudgetShare, GovernorMode},
    backend::DeviceFacts,
    budget::{BudgetGpu, Standing, allocate},
};

use super::{
    gpu::{GpuControl, LIMIT_TOLERANCE_MW},
    plan::{Origin, Plan},
};

/// The budget in force.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NodeBudget {
    pub watts: f64,
    pub set_by: String,
    pub set_at: SystemTime,
}

/// How far over its current limit a GPU the governor holds down for heat
/// may be given a share (W, and a fraction of its limit): room for the
/// governor's own trims, no more.
const HEAT_MARGIN_W: f64 = 10.0;
const HEAT_MARGIN_FRACTION: f64 = 0.02;

/// What a GPU counts against the budget now (mW).
pub(crate) fn counted_mw(gpu: &GpuControl, facts: &DeviceFacts) -> u32 {
    match standing(gpu, facts) {
        Standing::Counted(w) => (w * 1000.0).round() as u32,
        Standing::Allocatable => in_force_mw(gpu, facts),
    }
}

/// The highest limit the GPU may have in force: share, last confirmed
/// limit, any write under way; its maximum when none is known.
fn in_force_mw(gpu: &GpuControl, facts: &DeviceFacts) -> u32 {
    let known = [
        gpu.budget_share_mw,
        gpu.expected_limit_mw,
        gpu.pending_limit_mw,
    ]
    .into_iter()
    .flatten()
    .max();
    known
        .or(facts.power_max_mw)
        .or(facts.power_default_mw)
        .unwrap_or(0)
}

/// Whether the budget may move this GPU, or only count it.
fn standing(gpu: &GpuControl, facts: &DeviceFacts) -> Standing {
    let watts = |mw: u32| f64::from(mw) / 1000.0;
    if !facts.controls.power_limit_settable
        || facts.power_default_mw.is_none()
        || gpu.mode == GovernorMode::ClockLock
    {
        // Nothing can hold it down: it may draw up to its maximum.
        let max = facts
            .power_max_mw
            .or(facts.power_default_mw)
            .or(gpu.expected_limit_mw)
            .unwrap_or(0);
        return Standing::Counted(watts(max));
    }
    // A GPU with a write under way still takes part in the split (its share
    // may change; it is written once the call returns), but counts at the
    // highest limit it may have; a lost one only counts.
    let movable = !gpu.lifecycle.is_lost()
        && gpu.lifecycle.is_running()
        && !gpu.dry_run
        && gpu.mode != GovernorMode::ObserveOnly
        && gpu.expected_limit_mw.is_some();
    if movable {
        Standing::Allocatable
    } else {
        Standing::Counted(watts(in_force_mw(gpu, facts)))
    }
}

/// The budget's view of one GPU.
fn budget_gpu(gpu: &GpuControl, facts: &DeviceFacts) -> BudgetGpu {
    let watts = |mw: u32| f64::from(mw) / 1000.0;
    let own = gpu.own_ceiling_mw(facts).map_or(0.0, watts);
    let enforced = gpu.expected_limit_mw.map_or(own, watts);
    let cap = match gpu.lifecycle.governor() {
        Some(g) if g.holds_for_heat() && gpu.mode == GovernorMode::PowerLimit => {
            let level = g.level();
            own.min(level + HEAT_MARGIN_W.max(HEAT_MARGIN_FRACTION * level))
        }
        _ => own,
    };
    BudgetGpu {
        min_w: facts.power_min_mw.map_or(0.0, watts),
        cap_w: cap,
        enforced_w: enforced,
        draw_w: gpu.last_draw_mw.map_or(enforced, watts),
        capped: gpu.power_capped,
        standing: standing(gpu, facts),
    }
}

/// The sum of what every GPU counts against the budget (mW).
pub(crate) fn counted_total_mw(gpus: &[GpuControl], facts: &[&DeviceFacts]) -> u64 {
    gpus.iter()
        .zip(facts)
        .map(|(g, f)| u64::from(counted_mw(g, f)))
        .sum()
}

/// The range a budget may take on this host (mW): the sums of the GPUs'
/// minimum and maximum power limits, over the GPUs that report them.
pub(crate) fn allowed_range_mw(facts: &[&DeviceFacts]) -> (u64, u64) {
    let min = facts
        .iter()
        .map(|f| u64::from(f.power_min_mw.unwrap_or(0)))
        .sum();
    let max = facts
        .iter()
        .map(|f| {
            u64::from(
                f.power_max_mw
                    .or(f.power_default_mw)
                    .or(f.power_min_mw)
                    .unwrap_or(0),
            )
        })
        .sum();
    (min, max)
}

/// What a round did: plans per GPU (writes), and each share that changed
/// (position, before, after).
#[derive(Debug, Default)]
pub(crate) struct Round {
    pub plans: Vec<(usize, Plan)>,
    pub changes: Vec<(usize, Option<u32>, Option<u32>)>,
}

/// The smallest share change worth making (mW): the governor's step, at
/// least 10 W and 2 % of the share, so that the split does not chase the
/// noise of the power readings with writes.
fn share_step_mw(gpu: &GpuControl, share_mw: u32) -> u32 {
    let w = gpu
        .min_step_w
        .max(SHARE_STEP_W)
        .max(SHARE_STEP_FRACTION * f64::from(share_mw) / 1000.0);
    (w * 1000.0).round() as u32
}

const SHARE_STEP_W: f64 = 10.0;
const SHARE_STEP_FRACTION: f64 = 0.02;

/// A GPU may be written now: its last write (anyone's) is at least the
/// write interval and one reading period ago on its own clock (the period:
/// a write lands some time after it is planned, and two writes planned an
/// interval apart must not land closer than that).
fn due(gpu: &GpuControl) -> bool {
    match (gpu.last_write_device_time, gpu.last_device_time) {
        (Some(last), Some(now)) => {
            now.saturating_sub(last) >= gpu.min_write_interval + gpu.reading_period
        }
        _ => true,
    }
}

/// Sets a GPU's share and tells its governor the ceiling moved.
fn set_share(gpu: &mut GpuControl, facts: &DeviceFacts, share: Option<u32>) {
    gpu.budget_share_mw = share;
    if let Some(params) = gpu.governor_params(facts)
        && let Some(g) = gpu.lifecycle.governor_mut()
    {
        g.set_params(params);
    }
}

fn budget_write(gpu: &mut GpuControl, limit_mw: u32, reason: String) -> Plan {
    let mut plan = Plan::none();
    let write = gpu.plan_write(
        WriteOp::SetPowerLimit { limit_mw },
        Origin::Budget { reason },
    );
    plan.write(write);
    plan
}

/// One round: divides `budget_w` by need, lowers the shares (and limits)
/// that must come down, then raises shares into the room that leaves.
pub(crate) fn redistribute(
    gpus: &mut [GpuControl],
    facts: &[&DeviceFacts],
    budget_w: f64,
) -> Round {
    let mut round = Round::default();
    let view: Vec<BudgetGpu> = gpus
        .iter()
        .zip(facts)
        .map(|(g, f)| budget_gpu(g, f))
        .collect();
    let targets = allocate(budget_w, &view);
    let to_mw = |w: f64| (w.max(0.0) * 1000.0).round() as u32;
    let mut plans: Vec<Plan> = (0..gpus.len()).map(|_| Plan::none()).collect();
    // A GPU that cannot be limited has no share (it counts at its maximum).
    for (pos, gpu) in gpus.iter_mut().enumerate() {
        if matches!(view[pos].standing, Standing::Counted(_))
            && !facts[pos].controls.power_limit_settable
            && gpu.budget_share_mw.is_some()
        {
            let before = gpu.budget_share_mw;
            set_share(gpu, facts[pos], None);
            round.changes.push((pos, before, None));
        }
    }
    // Lowers first: the share at once, the limit with a write.
    for (pos, gpu) in gpus.iter_mut().enumerate() {
        let (Some(target), Standing::Allocatable) = (targets[pos], view[pos].standing) else {
            continue;
        };
        let target_mw = to_mw(target);
        let share = gpu.budget_share_mw.unwrap_or(u32::MAX);
        let step_mw = share_step_mw(gpu, share.min(target_mw));
        let at_min = facts[pos]
            .power_min_mw
            .is_some_and(|m| target_mw <= m.saturating_add(LIMIT_TOLERANCE_MW));
        if target_mw < share && (share - target_mw >= step_mw || at_min || share == u32::MAX) {
            let before = gpu.budget_share_mw;
            set_share(gpu, facts[pos], Some(target_mw));
            round.changes.push((pos, before, Some(target_mw)));
        }
        let share = gpu.budget_share_mw.unwrap_or(target_mw);
        if gpu
            .expected_limit_mw
            .is_some_and(|e| e > share.saturating_add(LIMIT_TOLERANCE_MW / 2))
            && gpu.in_flight == 0
            && due(gpu)
        {
            plans[pos].extend(budget_write(
                gpu,
                share,
                format!(
                    "node power budget of {budget_w:.0} W: share lowered to {} W",
                    share / 1000
                ),
            ));
        }
    }
    // Then raises, into the room everything counted leaves, the largest
    // shortfall first.
    let budget_mw = (budget_w * 1000.0).floor() as u64;
    let mut counted = counted_total_mw(gpus, facts);
    let mut raises: Vec<(usize, u32)> = (0..gpus.len())
        .filter_map(|pos| {
            let target = to_mw(targets[pos]?);
            let share = gpus[pos].budget_share_mw?;
            (view[pos].standing == Standing::Allocatable && target > share)
                .then(|| (pos, target - share))
        })
        .collect();
    raises.sort_by_key(|&(_, up)| std::cmp::Reverse(up));
    for (pos, up) in raises {
        let gpu = &mut gpus[pos];
        let share = gpu.budget_share_mw.unwrap_or(0);
        let before_count = u64::from(counted_mw(gpu, facts[pos]));
        let room = budget_mw.saturating_sub(counted);
        let own = gpu.own_ceiling_mw(facts[pos]).unwrap_or(share);
        let new = share.saturating_add(up.min(u32::try_from(room).unwrap_or(u32::MAX)));
        let new = new - new % 1000; // whole watts
        let step_mw = share_step_mw(gpu, share);
        if new <= share || (new - share < step_mw && new < own) {
            continue;
        }
        set_share(gpu, facts[pos], Some(new));
        round.changes.push((pos, Some(share), Some(new)));
        counted = counted - before_count + u64::from(counted_mw(gpu, facts[pos]));
    }
    // Raise the limits of GPUs below their share that heat does not hold
    // down (a GPU the governor holds raises itself when it cools).
    for (pos, gpu) in gpus.iter_mut().enumerate() {
        if view[pos].standing != Standing::Allocatable || !plans[pos].is_empty() {
            continue;
        }
        let (Some(share), Some(expected)) = (gpu.budget_share_mw, gpu.expected_limit_mw) else {
            continue;
        };
        let Some(ceiling) = gpu.ceiling_mw(facts[pos]) else {
            continue;
        };
        let held = gpu.lifecycle.governor().is_some_and(|g| g.holds_for_heat());
        let step_mw = to_mw(gpu.min_step_w);
        let to = share.min(ceiling);
        if !held
            && to > expected
            && (to - expected >= step_mw || to == ceiling)
            && gpu.in_flight == 0
            && due(gpu)
        {
            plans[pos].extend(budget_write(
                gpu,
                to,
                format!(
                    "node power budget of {budget_w:.0} W: share raised to {} W",
                    to / 1000
                ),
            ));
        }
    }
    round.plans = plans
        .into_iter()
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .collect();
    round
}

/// The budget is dropped: every share goes, and a GPU held below its own
/// ceiling by its share alone (not by heat) is given its ceiling back.
pub(crate) fn release(gpus: &mut [GpuControl], facts: &[&DeviceFacts]) -> Round {
    let mut round = Round::default();
    for (pos, gpu) in gpus.iter_mut().enumerate() {
        let before = gpu.budget_share_mw;
        gpu.budget_active = false;
        set_share(gpu, facts[pos], None);
        if before.is_some() {
            round.changes.push((pos, before, None));
        }
        let held = gpu.lifecycle.governor().is_some_and(|g| g.holds_for_heat());
        let writable = standing(gpu, facts[pos]) == Standing::Allocatable;
        if let (Some(ceiling), Some(expected), true) =
            (gpu.ceiling_mw(facts[pos]), gpu.expected_limit_mw, writable)
            && !held
            && expected.saturating_add(LIMIT_TOLERANCE_MW) < ceiling
        {
            round.plans.push((
                pos,
                budget_write(
                    gpu,
                    ceiling,
                    format!(
                        "node power budget dropped: back to the ceiling {} W",
                        ceiling / 1000
                    ),
                ),
            ));
        }
    }
    round
}

/// The budget is set: every GPU takes part from now on, joining at the
/// limit it has (no higher than its own ceiling).
pub(crate) fn activate(gpus: &mut [GpuControl], facts: &[&DeviceFacts]) {
    for (pos, gpu) in gpus.iter_mut().enumerate() {
        gpu.budget_active = true;
        if gpu.budget_share_mw.is_none()
            && facts[pos].controls.power_limit_settable
            && let (Some(now), Some(own)) = (gpu.expected_limit_mw, gpu.own_ceiling_mw(facts[pos]))
        {
            set_share(gpu, facts[pos], Some(now.min(own)));
        }
    }
}

/// Shares as the wire shows them.
pub(crate) fn shares(
    changes: &[(usize, Option<u32>, Option<u32>)],
    facts: &[&DeviceFacts],
) -> Vec<BudgetShare> {
    changes
        .iter()
        .map(|&(pos, before, after)| BudgetShare {
            index: facts[pos].index,
            uuid: facts[pos].uuid.clone(),
            before_mw: before,
            after_mw: after,
        })
        .collect()
}

/// Redistribution events are at most this frequent; one covers every
/// change since the last.
pub(crate) const REDISTRIBUTION_EVENT_INTERVAL: Duration = Duration::from_secs(10);
