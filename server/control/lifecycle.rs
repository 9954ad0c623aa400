//! The life of one GPU under the control plane, and the planning of every
//! step in it.
//!
//! [`Lifecycle`] is the one place that says whether a GPU is waiting for its
//! first reading, governed, only observed, or lost. Every way out of
//! [`Lifecycle::Lost`] leads back to [`Lifecycle::AwaitingFirstReading`], and
//! the only way into [`Lifecycle::Governed`] is the first-reading path
//! (re-apply the operator's ceiling, clear a stale throttle, build a
//! governor) — so a GPU that comes back is governed again.
//!
//! The planners here are pure: each takes the GPU's control state, its
//! facts and one input (a reading, lost, recovered, a finished write,
//! shutdown), updates the state and returns a [`Plan`]. No clock (`now` is
//! passed in), no I/O.

use std::time::{Duration, SystemTime};

use crate::{
    actor::WriteOp,
    api::{ClockLockChange, EventKind, GovernorMode, PowerLimitChange, Severity, event::Change},
    backend::{BackendError, DeviceFacts, Reading},
    config::ControllerConfig,
    events::{Actor, NewEvent},
    governor::{Decision, Governor, GovernorParams, Observation},
    state::GpuState,
};

use super::{
    gpu::{GpuControl, LIMIT_TOLERANCE_MW},
    plan::{DesiredChange, Effect, Origin, Plan, Write},
};

/// Dry-run decisions are recorded at most this often per GPU, unless the
/// decision changes.
const DRY_RUN_EVENT_INTERVAL: Duration = Duration::from_secs(30);
/// After a governor write was refused for want of permission while the
/// governor held the GPU below its ceiling: the first wait before trying
/// again, doubled on each refusal in a row up to [`WRITE_RETRY_MAX`].
pub(crate) const WRITE_RETRY_FIRST: Duration = Duration::from_secs(10);
pub(crate) const WRITE_RETRY_MAX: Duration = Duration::from_secs(300);

/// Where one GPU is in its life.
#[derive(Debug, Clone)]
pub(crate) enum Lifecycle {
    /// Known, not read yet (at start, or back after being lost): the next
    /// fresh reading runs the first-reading path.
    AwaitingFirstReading,
    /// Read; its mode lets the governor move it (in dry run: decide only).
    Governed { governor: Box<Governor> },
    /// Read; its mode does not let anything move it (observe-only,
    /// disabled).
    Observing,
    /// Not answering. Nothing is written to it.
    Lost,
}

impl Lifecycle {
    /// The state after a first reading: governed where the mode has
    /// governor settings, observed otherwise. `level` gives the level the
    /// governor starts believing in.
    fn running(params: Option<GovernorParams>, level: impl FnOnce(&GovernorParams) -> f64) -> Self {
        match params {
            Some(params) => {
                let level = level(&params);
                Lifecycle::Governed {
                    governor: Box::new(Governor::new(params, level)),
                }
            }
            None => Lifecycle::Observing,
        }
    }

    pub(crate) fn governor(&self) -> Option<&Governor> {
        match self {
            Lifecycle::Governed { governor } => Some(governor.as_ref()),
            _ => None,
        }
    }

    pub(crate) fn governor_mut(&mut self) -> Option<&mut Governor> {
        match self {
            Lifecycle::Governed { governor } => Some(governor.as_mut()),
            _ => None,
        }
    }

    pub(crate) fn is_lost(&self) -> bool {
        matches!(self, Lifecycle::Lost)
    }

    /// Read at least once since it was last (re)started.
    pub(crate) fn is_running(&self) -> bool {
        matches!(self, Lifecycle::Governed { .. } | Lifecycle::Observing)
    }
}

fn gpu_event(facts: &DeviceFacts, kind: EventKind, actor: Actor, reason: String) -> NewEvent {
    NewEvent::new(kind, actor, reason).gpu(facts.index, &facts.uuid)
}

/// A fresh reading of a GPU: its first (repairs and a new governor), or a
/// later one (drift check, then the governor). Nothing while writes to it
/// are still in flight.
pub(crate) fn reading(
    gpu: &mut GpuControl,
    facts: &DeviceFacts,
    reading: &Reading,
    now: SystemTime,
) -> Plan {
    if let Some(last) = gpu.last_device_time {
        gpu.reading_period = reading.device_time.saturating_sub(last);
    }
    gpu.last_device_time = Some(reading.device_time);
    gpu.last_draw_mw = reading.power_draw_mw;
    gpu.power_capped = reading
        .throttle_mask
        .is_some_and(|m| m & crate::throttle::mask::SW_POWER_CAP != 0);
    if gpu.in_flight > 0 {
        return Plan::none();
    }
    match gpu.lifecycle {
        Lifecycle::Lost => Plan::none(),
        Lifecycle::AwaitingFirstReading => first_reading(gpu, facts, reading),
        Lifecycle::Governed { .. } | Lifecycle::Observing => {
            let mut plan = drift(gpu, facts, reading);
            if gpu.in_flight == 0 {
                plan.extend(govern(gpu, facts, reading, now));
            }
            plan
        }
    }
}

/// First reading: clear what a previous run left, re-apply the operator's
/// ceiling, start the governor.
///
/// In dry run too: dry run stops the governor's *new* decisions, but a
/// throttle or clock lock gpuwatch itself left (a run killed while it held
/// the GPU down) is always undone, and the operator's ceiling is theirs, not
/// a decision. A `lowered` flag for a GPU already back at its ceiling (the
/// driver reset it while gpuwatch was away, or it was lost and came back
/// reset) is cleared, so nothing later mistakes it for a throttle.
pub(crate) fn first_reading(gpu: &mut GpuControl, facts: &DeviceFacts, reading: &Reading) -> Plan {
    let current = reading.power_limit_mw;
    gpu.expected_limit_mw = current;
    // Under a node budget, a GPU without a share joins it at the limit it
    // has: nothing at start raises it past what the budget counted.
    if gpu.budget_active
        && gpu.budget_share_mw.is_none()
        && facts.controls.power_limit_settable
        && let (Some(now), Some(own)) = (current, gpu.own_ceiling_mw(facts))
    {
        gpu.budget_share_mw = Some(now.min(own));
    }
    gpu.clock_cap_mhz = reading.locked_gpu_clock_max_mhz;
    let mut plan = Plan::none();
    let note = if gpu.dry_run {
        " (dry run stops new decisions only; what gpuwatch left is undone)"
    } else {
        ""
    };
    let mut ops = Vec::new();
    if gpu.desired.governor_clock_lock && facts.controls.gpu_clocks_lockable {
        ops.push((
            WriteOp::ResetGpuLockedClocks,
            format!("clearing a clock lock a previous run of the governor left behind{note}"),
        ));
    }
    if let (Some(ceiling), Some(now)) = (gpu.ceiling_mw(facts), current)
        && facts.controls.power_limit_settable
    {
        if now.abs_diff(ceiling) > LIMIT_TOLERANCE_MW {
            // Below the ceiling with `lowered` set: a throttle gpuwatch
            // left. Otherwise (above it, say after a driver reset) it is the
            // operator's ceiling being put back.
            let throttled = gpu.desired.governor_lowered_limit
                && (now < ceiling || gpu.operator_ceiling_mw().is_none());
            if throttled {
                ops.push((
                    WriteOp::SetPowerLimit { limit_mw: ceiling },
                    format!(
                        "clearing a stale throttle a previous run left behind: {} W -> {} W{note}",
                        now / 1000,
                        ceiling / 1000
                    ),
                ));
            } else if gpu.operator_ceiling_mw().is_some() {
                ops.push((
                    WriteOp::SetPowerLimit { limit_mw: ceiling },
                    format!(
                        "re-applying the operator's ceiling of {} W{note}",
                        ceiling / 1000
                    ),
                ));
            }
        } else if gpu.desired.governor_lowered_limit {
            DesiredChange::LoweredLimit(false).apply(&mut gpu.desired);
            plan.persist(DesiredChange::LoweredLimit(false));
        }
    }
    let restored = !ops.is_empty();
    let mode = gpu.mode;
    gpu.lifecycle = Lifecycle::running(gpu.governor_params(facts), |params| {
        if restored {
            return params.ceiling;
        }
        match mode {
            GovernorMode::ClockLock => f64::from(
                reading
                    .locked_gpu_clock_max_mhz
                    .unwrap_or(params.ceiling as u32),
            ),
            _ => current.map_or(params.ceiling, |mw| f64::from(mw) / 1000.0),
        }
    });
    for (op, reason) in ops {
        let write = gpu.plan_write(op, Origin::Startup { reason });
        plan.write(write);
    }
    plan
}

/// Re-applies the limit gpuwatch set when something else changed it.
fn drift(gpu: &mut GpuControl, facts: &DeviceFacts, reading: &Reading) -> Plan {
    let mut plan = Plan::none();
    let (Some(expected), Some(actual)) = (gpu.expected_limit_mw, reading.power_limit_mw) else {
        return plan;
    };
    if expected.abs_diff(actual) <= LIMIT_TOLERANCE_MW {
        return plan;
    }
    let reason = format!(
        "power limit changed behind gpuwatch's back: {} W where {} W was set",
        actual / 1000,
        expected / 1000
    );
    let reapply = !gpu.dry_run && facts.controls.power_limit_settable;
    plan.record(
        gpu_event(
            facts,
            EventKind::LimitDrift,
            Actor::device(),
            if reapply {
                format!("{reason}; re-applying")
            } else {
                format!("{reason}; dry run, not re-applied")
            },
        )
        .severity(Severity::Warning)
        .change(Change::PowerLimit(PowerLimitChange {
            before_mw: Some(expected),
            after_mw: Some(actual),
        })),
    );
    if reapply {
        // Never above the ceiling in force, whatever was read at start; and
        // a limit below it is recorded as lowered before it is written, like
        // any other, so the next start gives it back.
        let ceiling = gpu.ceiling_mw(facts);
        let limit_mw = ceiling.map_or(expected, |c| expected.min(c));
        if ceiling.is_some_and(|c| limit_mw.saturating_add(LIMIT_TOLERANCE_MW) < c) {
            DesiredChange::LoweredLimit(true).apply(&mut gpu.desired);
            plan.persist(DesiredChange::LoweredLimit(true));
        }
        let write = gpu.plan_write(
            WriteOp::SetPowerLimit { limit_mw },
            Origin::Drift {
                reason: format!("re-applying the {} W gpuwatch had set", limit_mw / 1000),
            },
        );
        plan.write(write);
    }
    // The device has `actual` now; the event of the re-apply says so when
    // it completes.
    gpu.expected_limit_mw = Some(actual);
    plan
}

/// One step of the governor on a fresh reading.
fn govern(gpu: &mut GpuControl, facts: &DeviceFacts, reading: &Reading, now: SystemTime) -> Plan {
    let mut plan = Plan::none();
    if gpu.enabled && gpu.mode == GovernorMode::ObserveOnly {
        plan.extend(retry_writes(gpu, facts, reading, now));
    }
    if !gpu.enabled || gpu.mode == GovernorMode::ObserveOnly {
        return plan;
    }
    let Some(temperature) = reading.temperature_c else {
        return plan;
    };
    let (mode, dry_run) = (gpu.mode, gpu.dry_run);
    let Some(governor) = gpu.lifecycle.governor_mut() else {
        return plan;
    };
    let level = match mode {
        GovernorMode::ClockLock => Some(f64::from(
            reading
                .locked_gpu_clock_max_mhz
                .unwrap_or(governor.params().ceiling as u32),
        )),
        _ => reading.power_limit_mw.map(|mw| f64::from(mw) / 1000.0),
    };
    let obs = Observation {
        time: reading.device_time,
        temperature_c: f64::from(temperature),
        power_w: reading.power_draw_mw.map(|mw| f64::from(mw) / 1000.0),
        level: if dry_run { None } else { level },
        clock_mhz: reading.graphics_clock_mhz.map(f64::from),
    };
    let Decision::Set { level, reason } = governor.step(&obs) else {
        return plan;
    };
    let (floor, ceiling) = (governor.params().floor, governor.params().ceiling);
    // Whatever the facts it was built from, nothing outside the GPU's range
    // (or not a number) is ever written.
    if !level.is_finite() {
        return plan;
    }
    let level = level.clamp(floor.min(ceiling), ceiling);
    let op = match mode {
        GovernorMode::ClockLock if level >= ceiling - 0.5 => WriteOp::ResetGpuLockedClocks,
        GovernorMode::ClockLock => WriteOp::LockGpuClocks {
            min_mhz: GpuControl::clock_floor_mhz(facts).min(level as u32),
            max_mhz: level.round() as u32,
        },
        _ => WriteOp::SetPowerLimit {
            limit_mw: (level * 1000.0).round() as u32,
        },
    };
    if dry_run {
        let repeat = gpu.last_dry_run.is_some_and(|(last, at)| {
            (last - level).abs() < 5.0
                && now.duration_since(at).unwrap_or_default() < DRY_RUN_EVENT_INTERVAL
        });
        if !repeat {
            gpu.last_dry_run = Some((level, now));
            let unit = if mode == GovernorMode::ClockLock {
                "MHz"
            } else {
                "W"
            };
            plan.record(gpu_event(
                facts,
                EventKind::DryRunDecision,
                Actor::governor(),
                format!("dry run: would set {level:.0} {unit}: {reason}"),
            ));
        }
        return plan;
    }
    if level < ceiling - 0.5 {
        // Persist first: a crash right after the write must still know the
        // governor left this GPU lowered.
        let change = if mode == GovernorMode::ClockLock {
            DesiredChange::ClockLock(true)
        } else {
            DesiredChange::LoweredLimit(true)
        };
        change.apply(&mut gpu.desired);
        plan.persist(change);
    }
    let write = gpu.plan_write(op, Origin::Governor { reason });
    plan.write(write);
    plan
}

/// The GPU stopped answering: nothing is governed or written until it is
/// back.
pub(crate) fn lost(gpu: &mut GpuControl) -> Plan {
    gpu.lifecycle = Lifecycle::Lost;
    Plan::none()
}

/// The GPU answers again, with facts read afresh (a reset GPU may report
/// new limits). Its control state is rebuilt from those facts, the
/// configuration and what was persisted, as at start; the next reading
/// runs the first-reading path.
pub(crate) fn recovered(
    gpu: &mut GpuControl,
    facts: &DeviceFacts,
    config: &ControllerConfig,
    saved: &GpuState,
) -> Plan {
    let mut plan = Plan::none();
    let (mut fresh, warning) = GpuControl::new(facts, config, saved);
    fresh.in_flight = gpu.in_flight;
    // The budget keeps counting what it counted: its share, the limit last
    // known, a write still under way.
    fresh.budget_share_mw = gpu.budget_share_mw;
    fresh.budget_active = gpu.budget_active;
    fresh.pending_limit_mw = gpu.pending_limit_mw;
    fresh.expected_limit_mw = gpu.expected_limit_mw;
    fresh.last_write_device_time = gpu.last_write_device_time;
    fresh.last_action = gpu.last_action.take();
    fresh.writes_permitted = gpu.writes_permitted;
    if let Some(warning) = warning {
        plan.record(warning);
    }
    if fresh.mode != gpu.mode
        && let Some(announcement) = fresh.mode_announcement(facts)
    {
        plan.record(announcement);
    }
    *gpu = fresh;
    plan
}

/// A write finished: record it, keep the desired state and the governor's
/// belief in step with it, and fall back to clocks or observing when the
/// governor may not write.
pub(crate) fn write_done(
    gpu: &mut GpuControl,
    facts: &DeviceFacts,
    write: &Write,
    result: &Result<(), BackendError>,
) -> Plan {
    finish_write(gpu, facts, write, result, false)
}

/// A write timed out after it had started on the device: it is still under
/// way and will land (or fail) later. Recorded as late now; it stays in
/// flight, so no reading is planned on (no drift correction fights it, no
/// governor step assumes it) until [`late_write_done`] reports how it ended.
pub(crate) fn write_still_running(facts: &DeviceFacts, write: &Write) -> Plan {
    let mut plan = Plan::none();
    plan.record(
        gpu_event(
            facts,
            EventKind::ControlFailed,
            actor(&write.origin),
            format!(
                "{:?} did not finish in time; it is still under way on the GPU and is recorded when it completes ({})",
                write.op,
                reason(&write.origin)
            ),
        )
        .severity(Severity::Warning),
    );
    plan
}

/// A write that timed out while running finally completed: recorded as
/// any write is (the event says it was late), the limit gpuwatch expects
/// follows it, and the desired state and the governor's belief with it.
pub(crate) fn late_write_done(
    gpu: &mut GpuControl,
    facts: &DeviceFacts,
    write: &Write,
    result: &Result<(), BackendError>,
) -> Plan {
    finish_write(gpu, facts, write, result, true)
}

fn finish_write(
    gpu: &mut GpuControl,
    facts: &DeviceFacts,
    write: &Write,
    result: &Result<(), BackendError>,
    late: bool,
) -> Plan {
    let mut plan = Plan::none();
    gpu.in_flight = gpu.in_flight.saturating_sub(1);
    if gpu.in_flight == 0 {
        gpu.pending_limit_mw = None;
    }
    // The next budget write waits a write interval from when this one
    // finished (as far as the readings tell), not only from when it was
    // planned: a slow call does not bunch two writes together.
    if matches!(write.op, WriteOp::SetPowerLimit { .. }) {
        gpu.last_write_device_time = gpu.last_device_time.max(gpu.last_write_device_time);
    }
    let actor = actor(&write.origin);
    let mut reason = reason(&write.origin);
    if late {
        reason.push_str("; it completed late, after its timeout");
    }
    let by_governor = matches!(write.origin, Origin::Governor { .. });
    match result {
        Ok(()) => {
            let (kind, change) = match write.op {
                WriteOp::SetPowerLimit { limit_mw } => {
                    gpu.expected_limit_mw = Some(limit_mw);
                    (
                        EventKind::PowerLimitChanged,
                        Some(Change::PowerLimit(PowerLimitChange {
                            before_mw: write.before,
                            after_mw: Some(limit_mw),
                        })),
                    )
                }
                WriteOp::LockGpuClocks { max_mhz, .. } => {
                    gpu.clock_cap_mhz = Some(max_mhz);
                    (
                        EventKind::ClocksLocked,
                        Some(Change::ClockLock(ClockLockChange {
                            before_max_mhz: write.before,
                            after_max_mhz: Some(max_mhz),
                        })),
                    )
                }
                WriteOp::ResetGpuLockedClocks => {
                    gpu.clock_cap_mhz = None;
                    (
                        EventKind::ClocksReset,
                        Some(Change::ClockLock(ClockLockChange {
                            before_max_mhz: write.before,
                            after_max_mhz: None,
                        })),
                    )
                }
                WriteOp::ResetMemoryLockedClocks | WriteOp::ResetApplicationClocks => {
                    (EventKind::ClocksReset, None)
                }
            };
            let what = match write.op {
                WriteOp::ResetApplicationClocks => "application clocks reset; ",
                WriteOp::ResetMemoryLockedClocks => "memory clock lock released; ",
                WriteOp::ResetGpuLockedClocks => "graphics clock lock released; ",
                _ => "",
            };
            let mut event = gpu_event(facts, kind, actor, format!("{what}{reason}"));
            if let Some(change) = change {
                event = event.change(change);
            }
            plan.push(if by_governor {
                Effect::RecordGovernorAction(event)
            } else {
                Effect::Record(event)
            });
            gpu.writes_permitted = true;
            if by_governor {
                // Writes work: no retry is owed any more.
                gpu.write_retry = None;
            } else if let Some(retry) = gpu.write_retry.as_mut() {
                // Someone else's write landed while the governor observes
                // after a refusal: writes work again, so the governor
                // takes over at the next reading instead of waiting out
                // its back-off.
                retry.refusals = 0;
                retry.at = Some(SystemTime::UNIX_EPOCH);
            }
            plan.extend(after_successful_write(gpu, facts, write));
        }
        Err(e) => {
            plan.record(
                gpu_event(
                    facts,
                    EventKind::ControlFailed,
                    actor,
                    format!("{:?} failed: {e} ({reason})", write.op),
                )
                .severity(Severity::Error),
            );
            if by_governor {
                plan.extend(governor_write_failed(gpu, facts, e));
                governor_belief_after_failure(gpu, write, e);
            }
            // A write that would have given power back did not: the GPU
            // stays below the ceiling in force, so it is recorded as held
            // down, and shutdown or the next start gives the power back.
            if matches!(write.op, WriteOp::SetPowerLimit { .. }) {
                plan.extend(record_if_below_ceiling(gpu, facts, gpu.expected_limit_mw));
            }
        }
    }
    plan
}

/// Records `lowered` when the GPU's limit is below the ceiling in force and
/// is not recorded so already.
fn record_if_below_ceiling(
    gpu: &mut GpuControl,
    facts: &DeviceFacts,
    limit_mw: Option<u32>,
) -> Plan {
    let mut plan = Plan::none();
    let below = match (limit_mw, gpu.ceiling_mw(facts)) {
        (Some(limit), Some(ceiling)) => limit.saturating_add(LIMIT_TOLERANCE_MW) < ceiling,
        _ => false,
    };
    if below && !gpu.desired.governor_lowered_limit && facts.controls.power_limit_settable {
        DesiredChange::LoweredLimit(true).apply(&mut gpu.desired);
        plan.persist(DesiredChange::LoweredLimit(true));
    }
    plan
}

/// Keeps the persisted "governor lowered" flags and the governor's belief
/// in step with a write that succeeded.
fn after_successful_write(gpu: &mut GpuControl, facts: &DeviceFacts, write: &Write) -> Plan {
    let mut plan = Plan::none();
    let ceiling = gpu.ceiling_mw(facts);
    let mode = gpu.mode;
    match write.op {
        WriteOp::SetPowerLimit { limit_mw } => {
            let at_ceiling =
                ceiling.is_none_or(|c| limit_mw.saturating_add(LIMIT_TOLERANCE_MW) >= c);
            // A budget write counts for the governor's write interval (one
            // write a second per GPU, whoever makes it), from a reading
            // after it was planned, as the budget counts (`node_budget::
            // due`): a write lands some time after it is planned, and the
            // governor's next, planned an interval after this one was, must
            // not land closer than that.
            let at = match write.origin {
                Origin::Budget { .. } => gpu
                    .last_write_device_time
                    .map_or(Duration::ZERO, |planned| planned + gpu.reading_period),
                _ => Duration::ZERO,
            };
            if let Some(g) = gpu.lifecycle.governor_mut()
                && mode == GovernorMode::PowerLimit
                && !matches!(write.origin, Origin::Governor { .. })
            {
                g.note_written(f64::from(limit_mw) / 1000.0, at);
            }
            if at_ceiling {
                DesiredChange::LoweredLimit(false).apply(&mut gpu.desired);
                plan.persist(DesiredChange::LoweredLimit(false));
            } else {
                // A write that landed below the ceiling now in force (an
                // operator's earlier ceiling landing after a later one, a
                // write that completed late) holds the GPU down like a
                // throttle: recorded as one, so shutdown or the next start
                // gives the power back.
                plan.extend(record_if_below_ceiling(gpu, facts, Some(limit_mw)));
            }
        }
        WriteOp::ResetGpuLockedClocks => {
            if let Some(g) = gpu.lifecycle.governor_mut()
                && mode == GovernorMode::ClockLock
            {
                let ceiling = g.params().ceiling;
                g.note_written(ceiling, Duration::ZERO);
            }
            DesiredChange::ClockLock(false).apply(&mut gpu.desired);
            plan.persist(DesiredChange::ClockLock(false));
        }
        _ => {}
    }
    plan
}

/// A governor that went to observing after a write of its own was refused
/// for want of permission tries again after a wait (doubling, capped) when
/// it still holds the GPU below its ceiling (that throttle is its own to
/// give back, and nobody else will) or when a write to this GPU has worked
/// in this run (the refusal was a passing one, and a GPU left observed
/// would never be governed again). A daemon that never had the privilege
/// keeps observing a GPU it does not hold, without retrying; any write
/// that lands while it observes brings it back at the next reading.
fn retry_writes(
    gpu: &mut GpuControl,
    facts: &DeviceFacts,
    reading: &Reading,
    now: SystemTime,
) -> Plan {
    let mut plan = Plan::none();
    let below = match (reading.power_limit_mw, gpu.ceiling_mw(facts)) {
        (Some(limit), Some(ceiling)) => limit.saturating_add(LIMIT_TOLERANCE_MW) < ceiling,
        _ => false,
    };
    let holds = (gpu.desired.governor_lowered_limit && below)
        || (gpu.desired.governor_clock_lock && reading.locked_gpu_clock_max_mhz.is_some());
    let permitted = gpu.writes_permitted;
    let Some(retry) = gpu.write_retry.as_mut() else {
        return plan;
    };
    if !holds && !permitted {
        return plan;
    }
    let wait = WRITE_RETRY_FIRST
        .saturating_mul(1 << retry.refusals.saturating_sub(1).min(8))
        .min(WRITE_RETRY_MAX);
    let at = *retry.at.get_or_insert(now + wait);
    if now < at {
        return plan;
    }
    retry.at = None;
    let mode = retry.mode;
    gpu.mode = mode;
    gpu.mode_reason = if holds {
        "trying writes again: the governor still holds this GPU below its ceiling"
    } else {
        "trying writes again: writes to this GPU have worked in this run, so the refusal may have passed"
    }
    .to_owned();
    gpu.lifecycle = Lifecycle::running(gpu.governor_params(facts), |params| match mode {
        GovernorMode::ClockLock => f64::from(
            reading
                .locked_gpu_clock_max_mhz
                .unwrap_or(params.ceiling as u32),
        ),
        _ => reading
            .power_limit_mw
            .map_or(params.ceiling, |mw| f64::from(mw) / 1000.0),
    });
    plan.record(
        gpu_event(
            facts,
            EventKind::GovernorModeChanged,
            Actor::governor(),
            gpu.mode_reason.clone(),
        )
        .severity(Severity::Warning),
    );
    plan
}

/// A governor write failed for a passing reason (busy, timed out, lost):
/// the governor stays in charge, and what it believes is in force goes back
/// to what was last written, so its next steps work from the truth (a
/// refusal that changes the mode rebuilt the governor already).
fn governor_belief_after_failure(gpu: &mut GpuControl, write: &Write, e: &BackendError) {
    if matches!(
        e,
        BackendError::NotSupported(_) | BackendError::NoPermission(_)
    ) {
        return;
    }
    let mode = gpu.mode;
    let (expected_limit_mw, clock_cap_mhz) = (gpu.expected_limit_mw, gpu.clock_cap_mhz);
    let Some(governor) = gpu.lifecycle.governor_mut() else {
        return;
    };
    let in_force = match (write.op, mode) {
        (WriteOp::SetPowerLimit { .. }, GovernorMode::PowerLimit) => {
            expected_limit_mw.map(|mw| f64::from(mw) / 1000.0)
        }
        (
            WriteOp::LockGpuClocks { .. } | WriteOp::ResetGpuLockedClocks,
            GovernorMode::ClockLock,
        ) => Some(clock_cap_mhz.map_or(governor.params().ceiling, f64::from)),
        _ => None,
    };
    if let Some(level) = in_force {
        governor.write_failed(level);
    }
}

/// A governor write failed: fall back to clocks, or to observing.
fn governor_write_failed(gpu: &mut GpuControl, facts: &DeviceFacts, e: &BackendError) -> Plan {
    let mut plan = Plan::none();
    let (mode, reason) = match (e, gpu.mode) {
        (BackendError::NotSupported(_), GovernorMode::PowerLimit)
            if facts.controls.gpu_clocks_lockable && facts.max_graphics_clock_mhz.is_some() =>
        {
            (
                GovernorMode::ClockLock,
                "setting the power limit is not supported; locking graphics clocks instead"
                    .to_owned(),
            )
        }
        (BackendError::NotSupported(_), _) => (
            GovernorMode::ObserveOnly,
            "the GPU refused the governor's write as not supported; observing only".to_owned(),
        ),
        (BackendError::NoPermission(_), mode) => {
            if matches!(mode, GovernorMode::PowerLimit | GovernorMode::ClockLock) {
                gpu.write_retry = Some(super::gpu::WriteRetry {
                    mode,
                    refusals: gpu.write_retry.map_or(0, |r| r.refusals) + 1,
                    at: None,
                });
            }
            (
            GovernorMode::ObserveOnly,
            "no permission to change GPU settings (run gpuwatch-server as root or with CAP_SYS_ADMIN); observing only"
                .to_owned(),
        )
        }
        _ => return plan,
    };
    gpu.mode = mode;
    gpu.mode_reason = reason.clone();
    if gpu.lifecycle.is_running() {
        gpu.lifecycle = Lifecycle::running(gpu.governor_params(facts), |p| p.ceiling);
    }
    plan.record(
        gpu_event(
            facts,
            EventKind::GovernorModeChanged,
            Actor::governor(),
            reason,
        )
        .severity(Severity::Warning),
    );
    plan
}

/// The daemon is stopping: give back what the governor took. Nothing for
/// a GPU that is lost (it cannot be written; the `lowered` flag stays for
/// the next start). In dry run the governor took nothing, but a throttle or
/// clock lock a previous run left and the startup repair could not undo is
/// still given back.
pub(crate) fn shutdown(gpu: &mut GpuControl, facts: &DeviceFacts) -> Plan {
    let mut plan = Plan::none();
    if gpu.lifecycle.is_lost() {
        return plan;
    }
    let governs = !gpu.dry_run;
    let governor_lowered = governs && gpu.lifecycle.governor().is_some_and(Governor::is_lowered);
    let power_lowered = (governor_lowered && gpu.mode == GovernorMode::PowerLimit)
        || gpu.desired.governor_lowered_limit;
    let clocks_locked = (governs
        && gpu.mode == GovernorMode::ClockLock
        && (governor_lowered || gpu.clock_cap_mhz.is_some()))
        || gpu.desired.governor_clock_lock;
    if power_lowered
        && (gpu.mode == GovernorMode::PowerLimit || facts.controls.power_limit_settable)
        && let Some(ceiling) = gpu.ceiling_mw(facts)
    {
        let write = gpu.plan_write(
            WriteOp::SetPowerLimit { limit_mw: ceiling },
            Origin::Shutdown,
        );
        plan.write(write);
    }
    if clocks_locked && facts.controls.gpu_clocks_lockable {
        let write = gpu.plan_write(WriteOp::ResetGpuLockedClocks, Origin::Shutdown);
        plan.write(write);
    }
    plan
}

/// Who an event about a write names as its actor.
fn actor(origin: &Origin) -> Actor {
    match origin {
        Origin::Governor { .. } => Actor::governor(),
        Origin::Operator { name, .. } => Actor::operator(name),
        Origin::Startup { .. } => Actor::startup(),
        Origin::Drift { .. } => Actor::daemon(),
        Origin::Budget { .. } => Actor::budget(),
        Origin::Shutdown => Actor::shutdown(),
    }
}

/// Why a write was made, for its event.
fn reason(origin: &Origin) -> String {
    match origin {
        Origin::Governor { reason }
        | Origin::Startup { reason }
        | Origin::Drift { reason }
        | Origin::Budget { reason } => reason.clone(),
        Origin::Operator { name, .. } => format!("requested by {name}"),
        Origin::Shutdown => "daemon stopping: giving back what the governor took".to_owned(),
    }
}
