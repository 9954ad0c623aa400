//! The planners, tested the way the governor is: no runtime, no clock, no
//! device. Unit tests pin each operator request and lifecycle step; the
//! property tests drive random sequences of both through the planners
//! against a model GPU and check the promises the control plane makes.

use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use crate::{
    actor::WriteOp,
    api::{ActorKind, EventKind, GovernorMode, GovernorState, ResetOutcome, ThresholdSource},
    backend::{BackendError, DeviceFacts, Reading},
    config::ControllerConfig,
    state::GpuState,
};

use super::{
    error::ControlError,
    gpu::{
        GpuControl, LIMIT_TOLERANCE_MW,
        tests::{h100, laptop},
    },
    lifecycle::{self, Lifecycle},
    plan::{DesiredChange, Effect, Origin, Part, Plan, Write},
    requests::{self, PowerTarget, ThresholdTarget},
    wire,
};

const T0: SystemTime = SystemTime::UNIX_EPOCH;

fn control(facts: &DeviceFacts, config: &ControllerConfig, saved: &GpuState) -> GpuControl {
    GpuControl::new(facts, config, saved).0
}

fn config() -> ControllerConfig {
    ControllerConfig {
        threshold_c: Some(70),
        ..ControllerConfig::default()
    }
}

/// A reading at `temperature_c`, drawing what the limit allows.
fn reading(at_s: u64, temperature_c: u32, limit_mw: Option<u32>) -> Reading {
    Reading {
        device_time: Duration::from_secs(at_s),
        temperature_c: Some(temperature_c),
        power_limit_mw: limit_mw,
        power_draw_mw: limit_mw,
        graphics_clock_mhz: Some(1980),
        ..Reading::default()
    }
}

/// A GPU past its first reading, at `limit_mw`, cool.
fn running(facts: &DeviceFacts, config: &ControllerConfig, saved: &GpuState) -> GpuControl {
    let mut gpu = control(facts, config, saved);
    let limit = gpu
        .ceiling_mw(facts)
        .filter(|_| facts.controls.power_limit_settable);
    let plan = lifecycle::reading(&mut gpu, facts, &reading(0, 40, limit), T0);
    assert_eq!(plan.writes().count(), 0, "{plan:?}");
    gpu
}

/// `write` refused for want of permission.
fn refused_for_permission(gpu: &mut GpuControl, facts: &DeviceFacts, write: &Write) -> Plan {
    lifecycle::write_done(
        gpu,
        facts,
        write,
        &Err(BackendError::NoPermission("power limit".into())),
    )
}

fn ok_write(gpu: &mut GpuControl, facts: &DeviceFacts, write: &Write) -> Plan {
    lifecycle::write_done(gpu, facts, write, &Ok(()))
}

fn only_write(plan: &Plan) -> Write {
    let writes: Vec<_> = plan.writes().cloned().collect();
    assert_eq!(writes.len(), 1, "{plan:?}");
    writes[0].clone()
}

fn persists(plan: &Plan) -> Vec<DesiredChange> {
    plan.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Persist(c) => Some(*c),
            _ => None,
        })
        .collect()
}

fn kinds(plan: &Plan) -> Vec<EventKind> {
    plan.events().map(|e| e.kind).collect()
}

/// Feeds hot readings until the governor writes; returns that plan.
fn heat_until_write(gpu: &mut GpuControl, facts: &DeviceFacts, limit_mw: u32) -> Plan {
    for s in 1..30 {
        let plan = lifecycle::reading(gpu, facts, &reading(s, 80, Some(limit_mw)), T0);
        if plan.writes().count() > 0 {
            return plan;
        }
    }
    panic!("the governor never cut a GPU at 80 °C with threshold 70 °C");
}

// --- lifecycle: first reading -------------------------------------------

#[test]
fn first_reading_builds_a_governor_and_writes_nothing_when_all_is_as_asked() {
    let facts = h100(0);
    let mut gpu = control(&facts, &config(), &GpuState::default());
    assert!(matches!(gpu.lifecycle, Lifecycle::AwaitingFirstReading));
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(0, 40, Some(700_000)), T0);
    assert!(plan.is_empty(), "{plan:?}");
    assert!(gpu.lifecycle.governor().is_some());
    assert_eq!(gpu.expected_limit_mw, Some(700_000));
    assert_eq!(wire::governor_state(&gpu), GovernorState::Idle);
}

#[test]
fn first_reading_clears_a_stale_throttle_a_previous_run_left() {
    let facts = h100(0);
    let saved = GpuState {
        governor_lowered_limit: true,
        ..GpuState::default()
    };
    let mut gpu = control(&facts, &config(), &saved);
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(0, 40, Some(400_000)), T0);
    let write = only_write(&plan);
    assert_eq!(write.op, WriteOp::SetPowerLimit { limit_mw: 700_000 });
    assert!(
        matches!(&write.origin, Origin::Startup { reason } if reason.contains("stale throttle"))
    );
    assert_eq!(write.before, Some(400_000));
    assert_eq!(gpu.in_flight, 1);
    // The governor starts from the ceiling it is being restored to.
    let governor = gpu.lifecycle.governor().expect("governed");
    assert!(!governor.is_lowered());
    // Done: the flag is cleared.
    let done = ok_write(&mut gpu, &facts, &write);
    assert_eq!(persists(&done), vec![DesiredChange::LoweredLimit(false)]);
    assert!(!gpu.desired.governor_lowered_limit);
    assert_eq!(gpu.in_flight, 0);
}

#[test]
fn first_reading_reapplies_the_operator_ceiling() {
    let facts = h100(0);
    let saved = GpuState {
        operator_ceiling_mw: Some(550_000),
        ..GpuState::default()
    };
    let mut gpu = control(&facts, &config(), &saved);
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(0, 40, Some(700_000)), T0);
    let write = only_write(&plan);
    assert_eq!(write.op, WriteOp::SetPowerLimit { limit_mw: 550_000 });
    assert!(
        matches!(&write.origin, Origin::Startup { reason } if reason.contains("operator's ceiling"))
    );
}

#[test]
fn first_reading_releases_a_clock_lock_a_previous_run_left() {
    let facts = laptop(0);
    let saved = GpuState {
        governor_clock_lock: true,
        ..GpuState::default()
    };
    let mut gpu = control(&facts, &config(), &saved);
    assert_eq!(gpu.mode, GovernorMode::ClockLock);
    let mut r = reading(0, 40, None);
    r.locked_gpu_clock_max_mhz = Some(900);
    let plan = lifecycle::reading(&mut gpu, &facts, &r, T0);
    let write = only_write(&plan);
    assert_eq!(write.op, WriteOp::ResetGpuLockedClocks);
    assert_eq!(write.before, Some(900));
    let done = ok_write(&mut gpu, &facts, &write);
    assert_eq!(persists(&done), vec![DesiredChange::ClockLock(false)]);
    assert_eq!(gpu.clock_cap_mhz, None);
}

/// Issue 12 row 6: dry run stops only new decisions; a throttle a killed
/// run of gpuwatch left is undone at start all the same.
#[test]
fn first_reading_in_dry_run_still_undoes_a_throttle_gpuwatch_left() {
    let facts = h100(0);
    let saved = GpuState {
        governor_lowered_limit: true,
        ..GpuState::default()
    };
    let config = ControllerConfig {
        dry_run: true,
        ..config()
    };
    let mut gpu = control(&facts, &config, &saved);
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(0, 40, Some(520_000)), T0);
    let write = only_write(&plan);
    assert_eq!(write.op, WriteOp::SetPowerLimit { limit_mw: 700_000 });
    assert!(
        matches!(&write.origin, Origin::Startup { reason } if reason.contains("stale throttle") && reason.contains("dry run")),
        "{write:?}"
    );
    assert!(
        !kinds(&plan).contains(&EventKind::DryRunDecision),
        "{plan:?}"
    );
    assert!(gpu.lifecycle.governor().is_some(), "dry run still decides");
    assert_eq!(wire::governor_state(&gpu), GovernorState::ObserveOnly);
    let done = ok_write(&mut gpu, &facts, &write);
    assert_eq!(persists(&done), vec![DesiredChange::LoweredLimit(false)]);
    // Decisions after that are dry run again: recorded, never written.
    for s in 1..20 {
        let plan = lifecycle::reading(&mut gpu, &facts, &reading(s, 85, Some(700_000)), T0);
        assert_eq!(plan.writes().count(), 0, "{plan:?}");
    }
}

#[test]
fn first_reading_in_dry_run_still_releases_a_clock_lock_gpuwatch_left() {
    let facts = laptop(0);
    let saved = GpuState {
        governor_clock_lock: true,
        ..GpuState::default()
    };
    let config = ControllerConfig {
        dry_run: true,
        ..config()
    };
    let mut gpu = control(&facts, &config, &saved);
    let mut r = reading(0, 40, None);
    r.locked_gpu_clock_max_mhz = Some(900);
    let plan = lifecycle::reading(&mut gpu, &facts, &r, T0);
    assert_eq!(only_write(&plan).op, WriteOp::ResetGpuLockedClocks);
}

/// A dry-run shutdown still gives back a throttle a previous run left when
/// the startup repair could not (it failed, or timed out).
#[test]
fn shutdown_in_dry_run_gives_back_a_throttle_the_startup_repair_did_not() {
    let facts = h100(0);
    let saved = GpuState {
        governor_lowered_limit: true,
        ..GpuState::default()
    };
    let config = ControllerConfig {
        dry_run: true,
        ..config()
    };
    let mut gpu = control(&facts, &config, &saved);
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(0, 40, Some(520_000)), T0);
    let write = only_write(&plan);
    lifecycle::write_done(
        &mut gpu,
        &facts,
        &write,
        &Err(BackendError::Other("driver busy".into())),
    );
    assert!(gpu.desired.governor_lowered_limit, "still lowered");
    let restore = only_write(&lifecycle::shutdown(&mut gpu, &facts));
    assert_eq!(restore.op, WriteOp::SetPowerLimit { limit_mw: 700_000 });
    assert_eq!(restore.origin, Origin::Shutdown);
}

/// A `lowered` flag for a GPU found at its ceiling (the driver reset it
/// while the GPU was lost, or while gpuwatch was down) is cleared at the
/// first reading, with nothing written.
#[test]
fn a_lowered_flag_for_a_gpu_found_at_its_ceiling_is_cleared() {
    let facts = h100(0);
    let saved = GpuState {
        governor_lowered_limit: true,
        ..GpuState::default()
    };
    let mut gpu = control(&facts, &config(), &saved);
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(0, 40, Some(700_000)), T0);
    assert_eq!(plan.writes().count(), 0, "{plan:?}");
    assert_eq!(persists(&plan), vec![DesiredChange::LoweredLimit(false)]);
    assert!(!gpu.desired.governor_lowered_limit);
    assert!(lifecycle::shutdown(&mut gpu, &facts).is_empty());
}

#[test]
fn a_gpu_that_can_set_nothing_is_observed_not_governed() {
    let mut facts = laptop(0);
    facts.controls.gpu_clocks_lockable = false;
    let mut gpu = control(&facts, &config(), &GpuState::default());
    assert_eq!(gpu.mode, GovernorMode::ObserveOnly);
    assert!(gpu.mode_announcement(&facts).is_some());
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(0, 95, None), T0);
    assert!(plan.is_empty());
    assert!(matches!(gpu.lifecycle, Lifecycle::Observing));
    assert_eq!(wire::governor_state(&gpu), GovernorState::ObserveOnly);
}

// --- lifecycle: governing, drift --------------------------------------

#[test]
fn a_hot_gpu_is_recorded_as_lowered_before_the_write_that_lowers_it() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let plan = heat_until_write(&mut gpu, &facts, 700_000);
    let persist = plan
        .effects
        .iter()
        .position(|e| matches!(e, Effect::Persist(DesiredChange::LoweredLimit(true))))
        .expect("lowered persisted");
    let write = plan
        .effects
        .iter()
        .position(|e| matches!(e, Effect::Write(_)))
        .expect("a write");
    assert!(persist < write, "{plan:?}");
    let write = only_write(&plan);
    let WriteOp::SetPowerLimit { limit_mw } = write.op else {
        panic!("a power limit write: {write:?}");
    };
    assert!((200_000..700_000).contains(&limit_mw));
    assert!(matches!(write.origin, Origin::Governor { .. }));
    // The governor's write, once done, is its last action.
    let done = ok_write(&mut gpu, &facts, &write);
    assert!(matches!(done.effects[0], Effect::RecordGovernorAction(_)));
    assert!(gpu.desired.governor_lowered_limit, "still lowered");
}

#[test]
fn readings_while_a_write_is_in_flight_plan_nothing() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let plan = heat_until_write(&mut gpu, &facts, 700_000);
    assert_eq!(gpu.in_flight, 1, "{plan:?}");
    for s in 40..45 {
        let plan = lifecycle::reading(&mut gpu, &facts, &reading(s, 90, Some(300_000)), T0);
        assert!(plan.is_empty(), "{plan:?}");
    }
}

#[test]
fn a_limit_changed_behind_gpuwatchs_back_is_recorded_and_reapplied() {
    let facts = h100(0);
    let saved = GpuState {
        operator_ceiling_mw: Some(550_000),
        ..GpuState::default()
    };
    let mut gpu = control(&facts, &config(), &saved);
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(0, 40, Some(550_000)), T0);
    assert!(plan.is_empty(), "{plan:?}");
    // The driver resets to its default.
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(1, 40, Some(700_000)), T0);
    assert_eq!(kinds(&plan), vec![EventKind::LimitDrift]);
    let write = only_write(&plan);
    assert_eq!(write.op, WriteOp::SetPowerLimit { limit_mw: 550_000 });
    assert!(matches!(write.origin, Origin::Drift { .. }));
}

#[test]
fn drift_in_dry_run_is_recorded_not_reapplied() {
    let facts = h100(0);
    let config = ControllerConfig {
        dry_run: true,
        ..config()
    };
    let mut gpu = running(&facts, &config, &GpuState::default());
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(1, 40, Some(500_000)), T0);
    assert_eq!(plan.writes().count(), 0);
    let drift = plan.events().next().expect("an event");
    assert_eq!(drift.kind, EventKind::LimitDrift);
    assert!(drift.reason.contains("dry run"), "{}", drift.reason);
    assert_eq!(gpu.expected_limit_mw, Some(500_000));
}

#[test]
fn dry_run_decisions_are_recorded_not_written_and_not_repeated() {
    let facts = h100(0);
    let config = ControllerConfig {
        dry_run: true,
        ..config()
    };
    let mut gpu = running(&facts, &config, &GpuState::default());
    let mut decisions = 0;
    for s in 1..20 {
        let plan = lifecycle::reading(&mut gpu, &facts, &reading(s, 80, Some(700_000)), T0);
        assert_eq!(plan.writes().count(), 0);
        decisions += kinds(&plan)
            .iter()
            .filter(|k| **k == EventKind::DryRunDecision)
            .count();
    }
    assert!(decisions >= 1, "a decision was recorded");
    assert!(
        decisions < 19,
        "not one per reading at the same time: {decisions}"
    );
}

// --- lifecycle: lost and recovered ---------------------------------------

#[test]
fn a_lost_gpu_is_suspended_and_refuses_operator_requests() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    assert!(lifecycle::lost(&mut gpu).is_empty());
    assert_eq!(wire::governor_state(&gpu), GovernorState::Suspended);
    let mut gpus = vec![gpu];
    let err = requests::set_power_limit(
        &mut gpus,
        &[&facts],
        &[0],
        PowerTarget::Watts(500.0),
        "ops",
        1,
    )
    .expect_err("lost");
    assert_eq!(err, ControlError::GpuLost { index: 0 });
    let err = requests::reset_clocks(&mut gpus, &[&facts], &[0], "ops", 2).expect_err("lost");
    assert_eq!(err, ControlError::GpuLost { index: 0 });
    // A lost GPU is not restored at shutdown: it cannot be written.
    assert!(lifecycle::shutdown(&mut gpus[0], &facts).is_empty());
}

/// The bug this shape exists to prevent: a GPU that was lost and came back
/// was never governed again.
#[test]
fn a_gpu_lost_and_back_is_governed_again() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let _ = heat_until_write(&mut gpu, &facts, 700_000);
    lifecycle::lost(&mut gpu);
    let saved = gpu.desired.clone();
    let plan = lifecycle::recovered(&mut gpu, &facts, &config(), &saved);
    assert!(plan.writes().next().is_none());
    assert!(matches!(gpu.lifecycle, Lifecycle::AwaitingFirstReading));
    // The write that was under way when it went still completes.
    assert_eq!(gpu.in_flight, 1);
    let write = Write {
        op: WriteOp::SetPowerLimit { limit_mw: 500_000 },
        origin: Origin::Governor {
            reason: "hot".into(),
        },
        before: Some(700_000),
    };
    let _ = lifecycle::write_done(
        &mut gpu,
        &facts,
        &write,
        &Err(BackendError::GpuLost("gone".into())),
    );
    assert_eq!(gpu.in_flight, 0);
    // Back at the driver default, with the lowered flag persisted: the
    // first reading gives the ceiling back, then the governor governs.
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(100, 40, Some(700_000)), T0);
    assert!(gpu.lifecycle.governor().is_some(), "{plan:?}");
    let plan = heat_until_write(&mut gpu, &facts, 700_000);
    assert!(persists(&plan).contains(&DesiredChange::LoweredLimit(true)));
}

#[test]
fn a_gpu_back_with_new_default_limits_is_governed_within_them() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    lifecycle::lost(&mut gpu);
    let mut back = facts.clone();
    back.power_default_mw = Some(600_000);
    back.power_max_mw = Some(650_000);
    lifecycle::recovered(&mut gpu, &back, &config(), &GpuState::default());
    lifecycle::reading(&mut gpu, &back, &reading(10, 40, Some(600_000)), T0);
    let governor = gpu.lifecycle.governor().expect("governed");
    assert!((governor.params().ceiling - 600.0).abs() < 1e-9);
    let plan = heat_until_write(&mut gpu, &back, 600_000);
    let WriteOp::SetPowerLimit { limit_mw } = only_write(&plan).op else {
        panic!("power write");
    };
    assert!(limit_mw < 600_000);
}

#[test]
fn a_gpu_lost_at_start_takes_its_mode_from_the_facts_it_comes_back_with() {
    // Lost at start: nothing but the index is known, so it looks observe-only.
    let unknown = DeviceFacts {
        index: 0,
        ..DeviceFacts::default()
    };
    let mut gpu = control(&unknown, &config(), &GpuState::default());
    assert_eq!(gpu.mode, GovernorMode::ObserveOnly);
    lifecycle::lost(&mut gpu);
    let facts = h100(0);
    let plan = lifecycle::recovered(&mut gpu, &facts, &config(), &GpuState::default());
    assert_eq!(gpu.mode, GovernorMode::PowerLimit);
    assert!(plan.writes().next().is_none());
    lifecycle::reading(&mut gpu, &facts, &reading(0, 40, Some(700_000)), T0);
    assert!(gpu.lifecycle.governor().is_some());
}

// --- lifecycle: writes that fail -----------------------------------------

fn governor_write(limit_mw: u32) -> Write {
    Write {
        op: WriteOp::SetPowerLimit { limit_mw },
        origin: Origin::Governor {
            reason: "hot".into(),
        },
        before: Some(700_000),
    }
}

#[test]
fn a_governor_write_refused_as_not_supported_falls_back_to_clock_locks() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    gpu.in_flight = 1;
    let plan = lifecycle::write_done(
        &mut gpu,
        &facts,
        &governor_write(500_000),
        &Err(BackendError::NotSupported("power limit".into())),
    );
    assert_eq!(
        kinds(&plan),
        vec![EventKind::ControlFailed, EventKind::GovernorModeChanged]
    );
    assert_eq!(gpu.mode, GovernorMode::ClockLock);
    let governor = gpu.lifecycle.governor().expect("still governed, by clocks");
    assert!((governor.params().ceiling - 1980.0).abs() < 1e-9);
}

#[test]
fn a_governor_write_without_permission_falls_back_to_observing() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let plan = refused_for_permission(&mut gpu, &facts, &governor_write(500_000));
    assert!(kinds(&plan).contains(&EventKind::GovernorModeChanged));
    assert_eq!(gpu.mode, GovernorMode::ObserveOnly);
    assert!(matches!(gpu.lifecycle, Lifecycle::Observing));
}

/// The reading at `from` s tries writes again (the mode goes back to the
/// power limit, announced); returns the first raise planned from that
/// reading on, with when it came. Each plan is used as the daemon would:
/// a write it carries is in flight until reported done.
fn retry_then_raise(
    gpu: &mut GpuControl,
    facts: &DeviceFacts,
    from: u64,
    at: &dyn Fn(u64) -> SystemTime,
    cool: &dyn Fn(u64) -> Reading,
) -> (u64, Write) {
    let plan = lifecycle::reading(gpu, facts, &cool(from), at(from));
    assert_eq!(gpu.mode, GovernorMode::PowerLimit, "{plan:?}");
    assert!(kinds(&plan).contains(&EventKind::GovernorModeChanged));
    if plan.writes().count() > 0 {
        return (from, only_write(&plan));
    }
    (from + 1..from + 30)
        .find_map(|s| {
            let plan = lifecycle::reading(gpu, facts, &cool(s), at(s));
            (plan.writes().count() > 0).then(|| (s, only_write(&plan)))
        })
        .expect("the governor raises a cool GPU")
}

#[test]
fn a_throttle_left_when_permission_was_refused_is_given_back_once_writes_work_again() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let cut = only_write(&heat_until_write(&mut gpu, &facts, 700_000));
    let WriteOp::SetPowerLimit { limit_mw: lowered } = cut.op else {
        panic!("{cut:?}")
    };
    ok_write(&mut gpu, &facts, &cut);
    assert!(gpu.desired.governor_lowered_limit);
    // The next cut is refused: observing, the GPU left lowered.
    let plan = refused_for_permission(&mut gpu, &facts, &governor_write(lowered - 50_000));
    assert!(kinds(&plan).contains(&EventKind::GovernorModeChanged));
    assert_eq!(gpu.mode, GovernorMode::ObserveOnly);
    let at = |s: u64| T0 + Duration::from_secs(100 + s);
    // Cool now; nothing within the first wait...
    let cool = |s: u64| reading(100 + s, 40, Some(lowered));
    for s in [0, 5, 9] {
        let plan = lifecycle::reading(&mut gpu, &facts, &cool(s), at(s));
        assert_eq!(plan.writes().count(), 0, "at {s} s: {plan:?}");
    }
    // ...then the governor tries again and raises the GPU back: on that
    // very reading (the plan that changes the mode may carry the raise) or
    // a later one.
    let (s, raise) = retry_then_raise(&mut gpu, &facts, 10, &at, &cool);
    assert!(
        matches!(raise.op, WriteOp::SetPowerLimit { limit_mw } if limit_mw > lowered),
        "{raise:?}"
    );
    // Refused again: the next try waits twice as long (from the next
    // reading on).
    refused_for_permission(&mut gpu, &facts, &raise);
    assert_eq!(gpu.mode, GovernorMode::ObserveOnly);
    for t in [s + 1, s + 11, s + 20] {
        let plan = lifecycle::reading(&mut gpu, &facts, &cool(t), at(t));
        assert_eq!(plan.writes().count(), 0, "at {t} s: {plan:?}");
        assert_eq!(gpu.mode, GovernorMode::ObserveOnly, "at {t} s");
    }
    let (_, raise) = retry_then_raise(&mut gpu, &facts, s + 21, &at, &cool);
    ok_write(&mut gpu, &facts, &raise);
    assert_eq!(gpu.write_retry, None, "writes work: nothing owed");
    // And with writes working, a cool GPU goes all the way back.
    let mut limit = match raise.op {
        WriteOp::SetPowerLimit { limit_mw } => limit_mw,
        _ => unreachable!(),
    };
    for t in s + 22..s + 120 {
        if limit == 700_000 {
            break;
        }
        let plan = lifecycle::reading(&mut gpu, &facts, &reading(100 + t, 40, Some(limit)), at(t));
        if let Some(write) = plan.writes().next().cloned() {
            let WriteOp::SetPowerLimit { limit_mw } = write.op else {
                panic!("{write:?}")
            };
            assert!(limit_mw > limit, "a cool GPU is only raised: {write:?}");
            ok_write(&mut gpu, &facts, &write);
            limit = limit_mw;
        }
    }
    assert_eq!(limit, 700_000, "back at the ceiling");
}

/// A governor write that fails for a passing reason (busy, timed out)
/// leaves the governor in charge; what it believes is in force must go
/// back to what was last written, or a failed raise to the ceiling would
/// leave it believing the GPU is there while it stays held down. Readings
/// here carry no limit, so only that belief can say the GPU is still low.
#[test]
fn a_failed_raise_is_tried_again_until_the_gpu_is_back_at_its_ceiling() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let cut = only_write(&heat_until_write(&mut gpu, &facts, 700_000));
    let WriteOp::SetPowerLimit { limit_mw: lowered } = cut.op else {
        panic!("{cut:?}")
    };
    ok_write(&mut gpu, &facts, &cut);
    let mut limit = lowered;
    let mut ceiling_refused = false;
    for s in 100..400 {
        let cool = Reading {
            power_limit_mw: None,
            ..reading(s, 40, Some(limit))
        };
        let plan = lifecycle::reading(&mut gpu, &facts, &cool, T0 + Duration::from_secs(s));
        let Some(write) = plan.writes().next().cloned() else {
            continue;
        };
        let WriteOp::SetPowerLimit { limit_mw } = write.op else {
            panic!("{write:?}")
        };
        if !ceiling_refused {
            // Every write fails until one to the ceiling has.
            ceiling_refused = limit_mw == 700_000;
            lifecycle::write_done(
                &mut gpu,
                &facts,
                &write,
                &Err(BackendError::InUse("power limit".into())),
            );
            assert_eq!(gpu.mode, GovernorMode::PowerLimit, "still governed");
            continue;
        }
        ok_write(&mut gpu, &facts, &write);
        limit = limit_mw;
        if limit == 700_000 {
            break;
        }
    }
    assert!(
        ceiling_refused,
        "the governor raised a cool GPU to its ceiling"
    );
    assert_eq!(limit, 700_000, "and tried again after that write failed");
}

#[test]
fn a_daemon_refused_its_first_write_keeps_observing_without_retrying() {
    // No privilege at all: the cut never landed, the GPU is at its
    // ceiling, and nothing of the governor's is left to give back.
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let cut = only_write(&heat_until_write(&mut gpu, &facts, 700_000));
    refused_for_permission(&mut gpu, &facts, &cut);
    assert_eq!(gpu.mode, GovernorMode::ObserveOnly);
    for s in [0, 10, 100, 1000] {
        let plan = lifecycle::reading(
            &mut gpu,
            &facts,
            &reading(100 + s, 80, Some(700_000)),
            T0 + Duration::from_secs(100 + s),
        );
        assert!(plan.is_empty(), "at {s} s: {plan:?}");
    }
    assert_eq!(gpu.mode, GovernorMode::ObserveOnly);
}

/// Hot readings from `from` s on until the governor plans a write; the
/// reading's time and the write.
fn hot_until_write(
    gpu: &mut GpuControl,
    facts: &DeviceFacts,
    from: u64,
    limit_mw: u32,
) -> Option<(u64, Write)> {
    (from..from + 60).find_map(|s| {
        let plan = lifecycle::reading(
            gpu,
            facts,
            &reading(s, 85, Some(limit_mw)),
            T0 + Duration::from_secs(s),
        );
        plan.writes().next().cloned().map(|w| (s, w))
    })
}

#[test]
fn a_refusal_after_writes_worked_is_tried_again_even_with_nothing_held() {
    // Writes worked (a cut and the raise back), so the refusal of the next
    // cut is a passing one: the GPU sits at its ceiling, nothing of the
    // governor's is held, and yet it must be governed again, or a hot GPU
    // is left unprotected for the rest of the run.
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let cut = only_write(&heat_until_write(&mut gpu, &facts, 700_000));
    ok_write(&mut gpu, &facts, &cut);
    let raise = Write {
        op: WriteOp::SetPowerLimit { limit_mw: 700_000 },
        ..cut.clone()
    };
    gpu.in_flight += 1;
    ok_write(&mut gpu, &facts, &raise);
    assert!(!gpu.desired.governor_lowered_limit);
    let (s, next_cut) = hot_until_write(&mut gpu, &facts, 100, 700_000).expect("cuts again");
    refused_for_permission(&mut gpu, &facts, &next_cut);
    assert_eq!(gpu.mode, GovernorMode::ObserveOnly);
    // The readings find the GPU at its ceiling: nothing is held. Within
    // the back-off it observes...
    for t in [s + 1, s + 5] {
        let plan = lifecycle::reading(
            &mut gpu,
            &facts,
            &reading(t, 85, Some(700_000)),
            T0 + Duration::from_secs(t),
        );
        assert_eq!(plan.writes().count(), 0, "at {t} s: {plan:?}");
    }
    // ...then governs again and cuts the hot GPU.
    let (t, retried) = hot_until_write(&mut gpu, &facts, s + 6, 700_000)
        .expect("the governor tries writes again on a hot GPU");
    assert_eq!(gpu.mode, GovernorMode::PowerLimit);
    assert!(
        t - (s + 1) <= 10 + 2,
        "tried again after the first wait, not {t} s"
    );
    assert!(
        matches!(retried.op, WriteOp::SetPowerLimit { limit_mw } if limit_mw < 700_000),
        "{retried:?}"
    );
}

#[test]
fn a_write_that_lands_while_the_governor_observes_brings_it_back_at_once() {
    // No write had worked when the governor's first cut was refused, so it
    // observes without retrying; then an operator's write lands: the
    // privilege is there after all, and the governor takes over at the
    // next reading instead of observing for good.
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let cut = only_write(&heat_until_write(&mut gpu, &facts, 700_000));
    refused_for_permission(&mut gpu, &facts, &cut);
    assert_eq!(gpu.mode, GovernorMode::ObserveOnly);
    let at = |s: u64| T0 + Duration::from_secs(s);
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(100, 85, Some(700_000)), at(100));
    assert_eq!(plan.writes().count(), 0, "{plan:?}");
    let operator = Write {
        op: WriteOp::SetPowerLimit { limit_mw: 700_000 },
        origin: Origin::Operator {
            name: "ops".into(),
            reply: 1,
            slot: 0,
            part: crate::control::plan::Part::PowerLimit,
        },
        before: Some(700_000),
    };
    gpu.in_flight += 1;
    ok_write(&mut gpu, &facts, &operator);
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(101, 85, Some(700_000)), at(101));
    assert_eq!(gpu.mode, GovernorMode::PowerLimit, "{plan:?}");
    assert!(kinds(&plan).contains(&EventKind::GovernorModeChanged));
}

#[test]
fn other_write_failures_are_recorded_and_change_no_mode() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let plan = lifecycle::write_done(
        &mut gpu,
        &facts,
        &governor_write(500_000),
        &Err(BackendError::Other("driver".into())),
    );
    assert_eq!(kinds(&plan), vec![EventKind::ControlFailed]);
    assert_eq!(gpu.mode, GovernorMode::PowerLimit);
    assert_eq!(gpu.expected_limit_mw, Some(700_000), "nothing was written");
}

#[test]
fn a_successful_write_is_recorded_with_before_and_after() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let plan = ok_write(&mut gpu, &facts, &governor_write(500_000));
    let event = plan.events().next().expect("event");
    assert_eq!(event.kind, EventKind::PowerLimitChanged);
    assert_eq!(event.actor.kind, ActorKind::Governor);
    assert_eq!(
        event.change,
        Some(crate::api::event::Change::PowerLimit(
            crate::api::PowerLimitChange {
                before_mw: Some(700_000),
                after_mw: Some(500_000),
            }
        ))
    );
    assert_eq!(gpu.expected_limit_mw, Some(500_000));
}

// --- lifecycle: shutdown -------------------------------------------------

#[test]
fn shutdown_gives_back_what_the_governor_took() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let plan = heat_until_write(&mut gpu, &facts, 700_000);
    let write = only_write(&plan);
    ok_write(&mut gpu, &facts, &write);
    let plan = lifecycle::shutdown(&mut gpu, &facts);
    let write = only_write(&plan);
    assert_eq!(write.op, WriteOp::SetPowerLimit { limit_mw: 700_000 });
    assert_eq!(write.origin, Origin::Shutdown);
}

#[test]
fn shutdown_restores_to_the_operator_ceiling_not_the_default() {
    let facts = h100(0);
    let saved = GpuState {
        operator_ceiling_mw: Some(550_000),
        ..GpuState::default()
    };
    let mut gpu = running(&facts, &config(), &saved);
    let plan = heat_until_write(&mut gpu, &facts, 550_000);
    ok_write(&mut gpu, &facts, &only_write(&plan));
    let write = only_write(&lifecycle::shutdown(&mut gpu, &facts));
    assert_eq!(write.op, WriteOp::SetPowerLimit { limit_mw: 550_000 });
}

#[test]
fn shutdown_leaves_alone_what_was_never_lowered() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    assert!(lifecycle::shutdown(&mut gpu, &facts).is_empty());
    let config = ControllerConfig {
        dry_run: true,
        ..config()
    };
    let saved = GpuState {
        governor_lowered_limit: true,
        ..GpuState::default()
    };
    let mut dry = running(&facts, &config, &saved);
    assert!(
        lifecycle::shutdown(&mut dry, &facts).is_empty(),
        "dry run never writes"
    );
}

#[test]
fn shutdown_releases_the_governors_clock_lock() {
    let facts = laptop(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    assert!(lifecycle::shutdown(&mut gpu, &facts).is_empty());
    gpu.clock_cap_mhz = Some(1200);
    let write = only_write(&lifecycle::shutdown(&mut gpu, &facts));
    assert_eq!(write.op, WriteOp::ResetGpuLockedClocks);
}

// --- operator requests ---------------------------------------------------

#[test]
fn set_power_limit_sets_persists_records_and_writes_the_ceiling() {
    let facts = h100(0);
    let mut gpus = vec![running(&facts, &config(), &GpuState::default())];
    let plan = requests::set_power_limit(
        &mut gpus,
        &[&facts],
        &[0],
        PowerTarget::Watts(550.0),
        "ops",
        7,
    )
    .expect("valid");
    let effects: Vec<_> = plan.effects.iter().map(|(_, e)| e).collect();
    assert!(matches!(effects[0], Effect::Record(e) if e.kind == EventKind::CeilingChanged));
    assert_eq!(
        *effects[1],
        Effect::Persist(DesiredChange::OperatorCeiling(Some(550_000)))
    );
    let Effect::Write(write) = effects[2] else {
        panic!("a write: {effects:?}");
    };
    assert_eq!(write.op, WriteOp::SetPowerLimit { limit_mw: 550_000 });
    assert_eq!(
        write.origin,
        Origin::Operator {
            name: "ops".into(),
            reply: 7,
            slot: 0,
            part: Part::PowerLimit
        }
    );
    assert_eq!(plan.reply.remaining, 1);
    assert_eq!(plan.reply.results[0].ceiling_mw, 550_000);
    assert!(plan.reply.results[0].written);
    assert_eq!(gpus[0].ceiling_mw(&facts), Some(550_000));
    let governor = gpus[0].lifecycle.governor().expect("governed");
    assert!(
        (governor.params().ceiling - 550.0).abs() < 1e-9,
        "the governor's ceiling follows"
    );
}

#[test]
fn a_new_ceiling_above_what_the_governor_holds_waits_until_it_cools() {
    let facts = h100(0);
    let mut gpus = vec![running(&facts, &config(), &GpuState::default())];
    let plan = heat_until_write(&mut gpus[0], &facts, 700_000);
    ok_write(&mut gpus[0], &facts, &only_write(&plan));
    let plan = requests::set_power_limit(
        &mut gpus,
        &[&facts],
        &[0],
        PowerTarget::Watts(690.0),
        "ops",
        1,
    )
    .expect("valid");
    assert_eq!(plan.reply.remaining, 0);
    assert!(!plan.reply.results[0].written);
    assert!(plan.reply.results[0].note.contains("governor holds"));
}

#[test]
fn restore_default_removes_the_operator_ceiling() {
    let facts = h100(0);
    let saved = GpuState {
        operator_ceiling_mw: Some(550_000),
        ..GpuState::default()
    };
    let mut gpus = vec![running(&facts, &config(), &saved)];
    gpus[0].expected_limit_mw = Some(550_000);
    let plan = requests::set_power_limit(
        &mut gpus,
        &[&facts],
        &[0],
        PowerTarget::RestoreDefault,
        "ops",
        1,
    )
    .expect("valid");
    assert_eq!(plan.reply.results[0].previous_ceiling_mw, Some(550_000));
    assert_eq!(plan.reply.results[0].ceiling_mw, 700_000);
    assert!(
        plan.effects
            .iter()
            .any(|(_, e)| *e == Effect::Persist(DesiredChange::OperatorCeiling(None)))
    );
    assert_eq!(gpus[0].operator_ceiling_mw(), None);
}

#[test]
fn set_power_limit_refusals_name_what_is_wrong_and_change_nothing() {
    let (a, b) = (h100(0), laptop(1));
    let mut gpus = vec![
        running(&a, &config(), &GpuState::default()),
        running(&b, &config(), &GpuState::default()),
    ];
    let facts = [&a, &b];
    let cases = [
        (
            vec![5],
            PowerTarget::Watts(500.0),
            ControlError::UnknownGpu { index: 5 },
        ),
        (
            vec![0],
            PowerTarget::Watts(750.0),
            ControlError::WattsOutOfRange {
                index: 0,
                watts: 750.0,
                min_mw: 200_000,
                max_mw: 700_000,
            },
        ),
        (
            vec![0, 1],
            PowerTarget::Watts(500.0),
            ControlError::PowerLimitUnsupported {
                index: 1,
                name: "Test laptop".into(),
            },
        ),
    ];
    for (indices, target, expected) in cases {
        let err = requests::set_power_limit(&mut gpus, &facts, &indices, target, "ops", 1)
            .expect_err("refused");
        assert_eq!(err, expected);
        assert_eq!(
            gpus[0].operator_ceiling_mw(),
            None,
            "GPU 0 untouched by a refused request"
        );
    }
    let err = requests::set_power_limit(
        &mut gpus,
        &facts,
        &[0],
        PowerTarget::Watts(f64::NAN),
        "ops",
        1,
    )
    .expect_err("NaN");
    assert!(matches!(
        err,
        ControlError::WattsNotANumber { index: 0, .. }
    ));
}

#[test]
fn reset_clocks_writes_each_supported_part_and_reports_each_outcome() {
    let facts = h100(0);
    let mut gpus = vec![running(&facts, &config(), &GpuState::default())];
    let plan = requests::reset_clocks(&mut gpus, &[&facts], &[0], "ops", 3).expect("valid");
    let ops: Vec<_> = plan
        .effects
        .iter()
        .filter_map(|(_, e)| match e {
            Effect::Write(w) => Some(w.op),
            _ => None,
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            WriteOp::ResetApplicationClocks,
            WriteOp::ResetGpuLockedClocks,
            WriteOp::ResetMemoryLockedClocks
        ]
    );
    let mut reply = plan.reply;
    assert_eq!(reply.remaining, 3);
    reply.absorb(0, Part::ApplicationClocks, 0, &Ok(()));
    reply.absorb(
        0,
        Part::LockedGpuClocks,
        0,
        &Err(BackendError::NotSupported("x".into())),
    );
    assert!(!reply.is_complete());
    reply.absorb(
        0,
        Part::LockedMemoryClocks,
        0,
        &Err(BackendError::Other("y".into())),
    );
    assert!(reply.is_complete());
    let r = reply.results[0].clone();
    assert_eq!(r.application_clocks, ResetOutcome::Reset as i32);
    assert_eq!(r.locked_gpu_clocks, ResetOutcome::NotSupported as i32);
    assert_eq!(r.locked_memory_clocks, ResetOutcome::Failed as i32);
    let err = reply.finish().expect_err("one part failed");
    assert!(matches!(err, ControlError::Device { index: 0, .. }));
}

#[test]
fn a_reply_for_several_gpus_names_every_failure() {
    let (a, b) = (h100(0), h100(1));
    let mut gpus = vec![
        running(&a, &config(), &GpuState::default()),
        running(&b, &config(), &GpuState::default()),
    ];
    let plan = requests::set_power_limit(
        &mut gpus,
        &[&a, &b],
        &[0, 1],
        PowerTarget::Watts(500.0),
        "ops",
        1,
    )
    .expect("valid");
    let mut reply = plan.reply;
    assert_eq!(reply.remaining, 2);
    reply.absorb(
        0,
        Part::PowerLimit,
        0,
        &Err(BackendError::NoPermission("a".into())),
    );
    reply.absorb(
        1,
        Part::PowerLimit,
        1,
        &Err(BackendError::Other("b".into())),
    );
    assert!(!reply.results[0].written && reply.results[0].note.contains("write failed"));
    let Err(ControlError::Several(errors)) = reply.finish() else {
        panic!("both failures");
    };
    assert_eq!(errors.len(), 2);
}

#[test]
fn set_threshold_sets_persists_and_retunes_the_governor() {
    let facts = h100(0);
    let mut gpus = vec![running(&facts, &config(), &GpuState::default())];
    let plan = requests::set_threshold(
        &mut gpus,
        &[&facts],
        &[0],
        ThresholdTarget::Celsius(75),
        Some(4),
        "ops",
    )
    .expect("valid");
    assert_eq!(plan.reply.remaining, 0, "nothing to write");
    assert_eq!(
        plan.effects[0].1,
        Effect::Persist(DesiredChange::Threshold {
            threshold_c: Some(75),
            hysteresis_c: Some(4)
        })
    );
    assert!(
        matches!(&plan.effects[1].1, Effect::Record(e) if e.kind == EventKind::ThresholdChanged)
    );
    let result = plan.reply.finish().expect("ok");
    assert_eq!(result[0].previous_threshold_c, 70);
    assert_eq!(result[0].threshold_c, 75);
    let governor = gpus[0].lifecycle.governor().expect("governed");
    assert!((governor.params().threshold_c - 75.0).abs() < 1e-9);
    assert!((governor.params().hysteresis_c - 4.0).abs() < 1e-9);
    // Restore default: back to the configuration's, not the operator's.
    let plan = requests::set_threshold(
        &mut gpus,
        &[&facts],
        &[0],
        ThresholdTarget::RestoreDefault,
        None,
        "ops",
    )
    .expect("valid");
    let result = plan.reply.finish().expect("ok");
    assert_eq!(result[0].threshold_c, 70);
    assert_eq!(result[0].threshold_source, ThresholdSource::Config as i32);
    assert_eq!(gpus[0].desired.threshold_c, None);
}

#[test]
fn set_threshold_refusals_name_the_allowed_range() {
    let facts = h100(0);
    let mut gpus = vec![running(&facts, &config(), &GpuState::default())];
    let f = [&facts];
    let refused = |gpus: &mut Vec<GpuControl>, target, h| {
        requests::set_threshold(gpus, &f, &[0], target, h, "ops").expect_err("refused")
    };
    assert_eq!(
        refused(&mut gpus, ThresholdTarget::Celsius(70), Some(50)),
        ControlError::HysteresisOutOfRange { hysteresis_c: 50 }
    );
    assert_eq!(
        refused(&mut gpus, ThresholdTarget::Celsius(10), None),
        ControlError::ThresholdTooLow { threshold_c: 10 }
    );
    assert_eq!(
        refused(&mut gpus, ThresholdTarget::Celsius(89), None),
        ControlError::ThresholdNotBelowSlowdown {
            index: 0,
            threshold_c: 89,
            slowdown_c: 89
        }
    );
    assert_eq!(
        refused(&mut gpus, ThresholdTarget::Celsius(35), Some(20)),
        ControlError::BandTooNarrow {
            index: 0,
            threshold_c: 35,
            hysteresis_c: 20
        }
    );
    let mut no_slowdown = h100(0);
    no_slowdown.slowdown_c = None;
    let mut gpus2 = vec![running(&no_slowdown, &config(), &GpuState::default())];
    let err = requests::set_threshold(
        &mut gpus2,
        &[&no_slowdown],
        &[0],
        ThresholdTarget::Celsius(130),
        None,
        "ops",
    )
    .expect_err("too high");
    assert_eq!(err, ControlError::ThresholdTooHigh { threshold_c: 130 });
    assert_eq!(gpus[0].threshold_c, 70, "refusals changed nothing");
}

// --- writes that time out (issue 12 row 13) --------------------------------

/// A write that times out after it started on the device stays in flight
/// (no drift correction, no governor step) and, when it lands, is recorded
/// and becomes the limit gpuwatch expects: nothing reverts it.
#[test]
fn a_write_still_running_at_its_timeout_is_recorded_when_it_lands_and_not_reverted() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let plan = heat_until_write(&mut gpu, &facts, 700_000);
    let write = only_write(&plan);
    let WriteOp::SetPowerLimit { limit_mw } = write.op else {
        panic!("a power write: {write:?}");
    };
    let plan = lifecycle::write_still_running(&facts, &write);
    assert_eq!(kinds(&plan), vec![EventKind::ControlFailed]);
    assert!(
        plan.events().all(|e| e.reason.contains("still under way")),
        "{plan:?}"
    );
    assert_eq!(gpu.in_flight, 1, "still in flight");
    // It lands on the device before gpuwatch hears of it: a reading at the
    // new limit is not drift.
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(60, 80, Some(limit_mw)), T0);
    assert!(plan.is_empty(), "{plan:?}");
    let plan = lifecycle::late_write_done(&mut gpu, &facts, &write, &Ok(()));
    let event = plan.events().next().expect("the late write is recorded");
    assert_eq!(event.kind, EventKind::PowerLimitChanged);
    assert!(event.reason.contains("late"), "{}", event.reason);
    assert_eq!(gpu.expected_limit_mw, Some(limit_mw));
    assert_eq!(gpu.in_flight, 0);
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(61, 74, Some(limit_mw)), T0);
    assert!(!kinds(&plan).contains(&EventKind::LimitDrift), "{plan:?}");
}

/// A write cancelled before it started changed nothing: the limit gpuwatch
/// expects stays, and the next reading is not drift.
#[test]
fn a_write_cancelled_at_its_timeout_changes_nothing_and_is_not_drift() {
    let facts = h100(0);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let plan = heat_until_write(&mut gpu, &facts, 700_000);
    let write = only_write(&plan);
    let plan = lifecycle::write_done(
        &mut gpu,
        &facts,
        &write,
        &Err(BackendError::Timeout("cancelled, never applied".into())),
    );
    assert_eq!(kinds(&plan), vec![EventKind::ControlFailed]);
    assert_eq!(gpu.in_flight, 0);
    assert_eq!(gpu.expected_limit_mw, Some(700_000));
    let plan = lifecycle::reading(&mut gpu, &facts, &reading(60, 80, Some(700_000)), T0);
    assert!(!kinds(&plan).contains(&EventKind::LimitDrift), "{plan:?}");
}

// --- absurd device facts ---------------------------------------------------

/// NVML answering 0 for the slowdown temperature must not drag the derived
/// threshold to its minimum (which would hold the GPU at its floor), nor
/// refuse every operator threshold as "not below slowdown".
#[test]
fn a_slowdown_of_zero_never_drags_the_threshold_to_its_minimum() {
    let mut facts = h100(0);
    facts.slowdown_c = Some(0);
    let (gpu, warning) =
        GpuControl::new(&facts, &ControllerConfig::default(), &GpuState::default());
    assert!(warning.is_none(), "{warning:?}");
    assert!(gpu.threshold_c >= 80, "threshold {} °C", gpu.threshold_c);
    let mut gpus = vec![running(
        &facts,
        &ControllerConfig::default(),
        &GpuState::default(),
    )];
    let plan = requests::set_threshold(
        &mut gpus,
        &[&facts],
        &[0],
        ThresholdTarget::Celsius(75),
        None,
        "ops",
    )
    .expect("a normal threshold is accepted");
    assert_eq!(plan.reply.finish().expect("ok")[0].threshold_c, 75);
}

/// Limits at the edge of u32 plan without overflow.
#[test]
fn limits_at_the_edge_of_the_range_do_not_overflow() {
    let mut facts = h100(0);
    facts.power_max_mw = None;
    facts.power_default_mw = Some(u32::MAX);
    let mut gpu = running(&facts, &config(), &GpuState::default());
    let write = governor_write(u32::MAX - 10);
    let _ = ok_write(&mut gpu, &facts, &write);
    let mut gpus = vec![gpu];
    let plan = requests::set_power_limit(
        &mut gpus,
        &[&facts],
        &[0],
        PowerTarget::Watts(4_294_967.0),
        "ops",
        1,
    )
    .expect("within the (unknown) range");
    for (_, effect) in plan.effects {
        if let Effect::Write(w) = effect {
            let _ = lifecycle::write_done(&mut gpus[0], &facts, &w, &Ok(()));
        }
    }
}

// --- property tests --------------------------------------------------------

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// How the model device answers a write.
    #[derive(Debug, Clone, Copy)]
    enum Outcome {
        Ok,
        Failed,
        NotSupported,
        NoPermission,
    }

    #[derive(Debug, Clone)]
    enum Input {
        /// A reading at this temperature (the device supplies the limit).
        Reading(u32),
        Lost,
        /// Back; with new default limits when `true`.
        Recovered(bool),
        /// The driver resets the limit to its default (drift).
        DriverReset,
        /// The oldest write in flight finishes (a write that timed out
        /// while running lands late).
        Complete(Outcome),
        /// The oldest write in flight times out: cancelled when `true`
        /// (it had not started), else still running on the device.
        TimedOut(bool),
        /// The daemon is killed (writes under way are lost with it) and
        /// started again on the same desired state — the GPU lost at that
        /// start if it is lost now.
        Restart,
        SetPowerLimit(Option<u32>),
        SetThreshold(Option<u32>),
        ResetClocks,
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            6 => (35u32..95).prop_map(Input::Reading),
            1 => Just(Input::Lost),
            1 => any::<bool>().prop_map(Input::Recovered),
            1 => Just(Input::DriverReset),
            3 => prop_oneof![
                6 => Just(Outcome::Ok),
                1 => Just(Outcome::Failed),
                1 => Just(Outcome::NotSupported),
                1 => Just(Outcome::NoPermission),
            ]
            .prop_map(Input::Complete),
            1 => any::<bool>().prop_map(Input::TimedOut),
            1 => Just(Input::Restart),
            1 => proptest::option::of(200u32..=700).prop_map(Input::SetPowerLimit),
            1 => proptest::option::of(50u32..=85).prop_map(Input::SetThreshold),
            1 => Just(Input::ResetClocks),
        ]
    }

    /// The GPU as the hardware has it, and the desired state as the disk
    /// has it.
    struct World {
        facts: DeviceFacts,
        gpu: GpuControl,
        config: ControllerConfig,
        limit_mw: Option<u32>,
        /// The limit is one gpuwatch wrote (not a driver default).
        limit_written: bool,
        clock_cap_mhz: Option<u32>,
        lost: bool,
        stored: GpuState,
        /// Writes under way, oldest first; `true` once one has timed out
        /// while running (it lands late).
        in_flight: VecDeque<(Write, bool)>,
        time_s: u64,
        next_reply: u64,
    }

    impl World {
        fn new(facts: DeviceFacts, dry_run: bool) -> Self {
            Self::with_saved(facts, dry_run, GpuState::default())
        }

        /// A world whose disk already holds `saved` (from a previous run,
        /// or a damaged state file).
        fn with_saved(facts: DeviceFacts, dry_run: bool, saved: GpuState) -> Self {
            let config = ControllerConfig {
                dry_run,
                ..config()
            };
            let gpu = control(&facts, &config, &saved);
            Self {
                limit_mw: facts
                    .power_default_mw
                    .filter(|_| facts.controls.power_limit_settable),
                limit_written: false,
                facts,
                gpu,
                config,
                clock_cap_mhz: None,
                lost: false,
                stored: saved,
                in_flight: VecDeque::new(),
                time_s: 0,
                next_reply: 0,
            }
        }

        /// Checks a plan's promises while carrying it out against the
        /// model: every limit within the ceiling, every lowering persisted
        /// before its write.
        fn carry_out(
            &mut self,
            effects: impl IntoIterator<Item = Effect>,
        ) -> Result<(), TestCaseError> {
            let ceiling = self.gpu.ceiling_mw(&self.facts);
            // What this plan has persisted so far: a lowering write must
            // come after its own plan recorded it, not rely on an older one.
            let mut persisted = Vec::new();
            for effect in effects {
                match effect {
                    Effect::Persist(change) => {
                        change.apply(&mut self.stored);
                        persisted.push(change);
                    }
                    Effect::Write(write) => {
                        match write.op {
                            WriteOp::SetPowerLimit { limit_mw } => {
                                let ceiling = ceiling.unwrap_or(u32::MAX);
                                prop_assert!(
                                    limit_mw <= ceiling.saturating_add(1),
                                    "{limit_mw} mW planned above the ceiling {ceiling} mW: {write:?}"
                                );
                                if limit_mw.saturating_add(LIMIT_TOLERANCE_MW) < ceiling {
                                    prop_assert!(
                                        persisted.contains(&DesiredChange::LoweredLimit(true)),
                                        "{write:?} lowers the GPU before its plan persists `lowered`"
                                    );
                                }
                            }
                            WriteOp::LockGpuClocks { max_mhz, .. } => {
                                prop_assert!(
                                    persisted.contains(&DesiredChange::ClockLock(true)),
                                    "{write:?} locks clocks before its plan persists the lock"
                                );
                                prop_assert!(
                                    max_mhz <= self.facts.max_graphics_clock_mhz.unwrap_or(0)
                                );
                            }
                            _ => {}
                        }
                        self.in_flight.push_back((write, false));
                    }
                    Effect::Record(_) | Effect::RecordGovernorAction(_) => {}
                }
            }
            prop_assert_eq!(
                &self.stored,
                &self.gpu.desired,
                "the mirror is what is stored"
            );
            prop_assert_eq!(self.in_flight.len(), self.gpu.in_flight);
            Ok(())
        }

        fn complete(&mut self, outcome: Outcome) -> Result<(), TestCaseError> {
            let Some((write, late)) = self.in_flight.pop_front() else {
                return Ok(());
            };
            let result = match outcome {
                _ if self.lost => Err(BackendError::GpuLost("off the bus".into())),
                Outcome::Ok => {
                    match write.op {
                        WriteOp::SetPowerLimit { limit_mw } => {
                            self.limit_mw = Some(limit_mw);
                            self.limit_written = true;
                        }
                        WriteOp::LockGpuClocks { max_mhz, .. } => {
                            self.clock_cap_mhz = Some(max_mhz)
                        }
                        WriteOp::ResetGpuLockedClocks => self.clock_cap_mhz = None,
                        _ => {}
                    }
                    Ok(())
                }
                Outcome::Failed => Err(BackendError::Other("driver error".into())),
                Outcome::NotSupported => Err(BackendError::NotSupported("refused".into())),
                Outcome::NoPermission => Err(BackendError::NoPermission("refused".into())),
            };
            let plan = if late {
                lifecycle::late_write_done(&mut self.gpu, &self.facts, &write, &result)
            } else {
                lifecycle::write_done(&mut self.gpu, &self.facts, &write, &result)
            };
            self.carry_out(plan.effects)?;
            if let (Ok(()), WriteOp::SetPowerLimit { limit_mw }) = (&result, write.op) {
                prop_assert_eq!(
                    self.gpu.expected_limit_mw,
                    Some(limit_mw),
                    "gpuwatch expects what it wrote, late or not"
                );
            }
            Ok(())
        }

        /// The oldest write under way times out.
        fn time_out(&mut self, cancelled: bool) -> Result<(), TestCaseError> {
            let Some(pos) = self.in_flight.iter().position(|(_, late)| !late) else {
                return Ok(());
            };
            if pos != 0 && !cancelled {
                // Writes run in order: one queued behind a write still
                // running has not started, so it can only be cancelled.
                return Ok(());
            }
            if cancelled {
                let Some((write, _)) = self.in_flight.remove(pos) else {
                    return Ok(());
                };
                let before = self.gpu.expected_limit_mw;
                let result = Err(BackendError::Timeout("cancelled, never applied".into()));
                let plan = lifecycle::write_done(&mut self.gpu, &self.facts, &write, &result);
                prop_assert_eq!(self.gpu.expected_limit_mw, before, "nothing was written");
                self.carry_out(plan.effects)
            } else {
                let Some(entry) = self.in_flight.front_mut() else {
                    return Ok(());
                };
                entry.1 = true;
                let write = entry.0.clone();
                let plan = lifecycle::write_still_running(&self.facts, &write);
                prop_assert_eq!(plan.writes().count(), 0);
                self.carry_out(plan.effects)
            }
        }

        /// SIGKILL and a fresh start on the stored desired state.
        fn restart(&mut self) -> Result<(), TestCaseError> {
            // Whatever was under way dies with the process, unapplied.
            self.in_flight.clear();
            self.gpu = control(&self.facts, &self.config, &self.stored);
            if self.lost {
                // Lost at start: known by index only until it is back.
                let unknown = DeviceFacts {
                    index: self.facts.index,
                    ..DeviceFacts::default()
                };
                self.gpu = control(&unknown, &self.config, &GpuState::default());
                self.gpu.desired = self.stored.clone();
                let plan = lifecycle::lost(&mut self.gpu);
                return self.carry_out(plan.effects);
            }
            Ok(())
        }

        fn step(&mut self, input: &Input) -> Result<(), TestCaseError> {
            let effects: Vec<Effect> = match *input {
                Input::Reading(temperature_c) => {
                    if self.lost {
                        return Ok(());
                    }
                    self.time_s += 1;
                    let idle_before = self.gpu.in_flight == 0;
                    let first = matches!(self.gpu.lifecycle, Lifecycle::AwaitingFirstReading);
                    let mut r = reading(self.time_s, temperature_c, self.limit_mw);
                    r.locked_gpu_clock_max_mhz = self.clock_cap_mhz;
                    let plan = lifecycle::reading(
                        &mut self.gpu,
                        &self.facts,
                        &r,
                        T0 + Duration::from_secs(self.time_s),
                    );
                    if idle_before && !first && self.limit_written {
                        prop_assert!(
                            !plan.events().any(|e| e.kind == EventKind::LimitDrift),
                            "drift correction fights a limit gpuwatch wrote: {plan:?}"
                        );
                    }
                    if idle_before && self.gpu.mode_governs() {
                        prop_assert!(
                            self.gpu.lifecycle.governor().is_some(),
                            "a GPU reading normally in mode {:?} is not governed: {:?}",
                            self.gpu.mode,
                            self.gpu.lifecycle
                        );
                    }
                    plan.effects
                }
                Input::Lost => {
                    if self.lost {
                        return Ok(());
                    }
                    self.lost = true;
                    lifecycle::lost(&mut self.gpu).effects
                }
                Input::Recovered(new_limits) => {
                    if !self.lost {
                        return Ok(());
                    }
                    self.lost = false;
                    if new_limits {
                        let default = self
                            .facts
                            .power_default_mw
                            .map(|d| d.saturating_sub(50_000).max(300_000));
                        self.facts.power_default_mw = default;
                    }
                    // A GPU that comes back has been reset.
                    self.limit_mw = self
                        .facts
                        .power_default_mw
                        .filter(|_| self.facts.controls.power_limit_settable);
                    self.limit_written = false;
                    self.clock_cap_mhz = None;
                    let saved = self.stored.clone();
                    lifecycle::recovered(&mut self.gpu, &self.facts, &self.config, &saved).effects
                }
                Input::DriverReset => {
                    self.limit_mw = self
                        .facts
                        .power_default_mw
                        .filter(|_| self.facts.controls.power_limit_settable);
                    self.limit_written = false;
                    return Ok(());
                }
                Input::Complete(outcome) => return self.complete(outcome),
                Input::TimedOut(cancelled) => return self.time_out(cancelled),
                Input::Restart => return self.restart(),
                Input::SetPowerLimit(watts) => {
                    self.next_reply += 1;
                    let target = watts.map_or(PowerTarget::RestoreDefault, |w| {
                        PowerTarget::Watts(f64::from(w))
                    });
                    let mut gpus = [self.gpu.clone()];
                    match requests::set_power_limit(
                        &mut gpus,
                        &[&self.facts],
                        &[self.facts.index],
                        target,
                        "ops",
                        self.next_reply,
                    ) {
                        Ok(plan) => {
                            let [gpu] = gpus;
                            self.gpu = gpu;
                            plan.effects.into_iter().map(|(_, e)| e).collect()
                        }
                        Err(_) => return Ok(()),
                    }
                }
                Input::SetThreshold(celsius) => {
                    let target =
                        celsius.map_or(ThresholdTarget::RestoreDefault, ThresholdTarget::Celsius);
                    let mut gpus = [self.gpu.clone()];
                    match requests::set_threshold(
                        &mut gpus,
                        &[&self.facts],
                        &[self.facts.index],
                        target,
                        None,
                        "ops",
                    ) {
                        Ok(plan) => {
                            let [gpu] = gpus;
                            self.gpu = gpu;
                            plan.effects.into_iter().map(|(_, e)| e).collect()
                        }
                        Err(_) => return Ok(()),
                    }
                }
                Input::ResetClocks => {
                    self.next_reply += 1;
                    let mut gpus = [self.gpu.clone()];
                    match requests::reset_clocks(
                        &mut gpus,
                        &[&self.facts],
                        &[self.facts.index],
                        "ops",
                        self.next_reply,
                    ) {
                        Ok(plan) => {
                            let [gpu] = gpus;
                            self.gpu = gpu;
                            plan.effects.into_iter().map(|(_, e)| e).collect()
                        }
                        Err(_) => return Ok(()),
                    }
                }
            };
            self.carry_out(effects)
        }

        /// Shutdown as the controller does it: writes under way finish,
        /// then the restore is planned and carried out.
        fn shut_down(&mut self) -> Result<(), TestCaseError> {
            while !self.in_flight.is_empty() {
                self.complete(Outcome::Ok)?;
            }
            let governor_lowered = self
                .gpu
                .lifecycle
                .governor()
                .is_some_and(|g| g.is_lowered());
            let plan = lifecycle::shutdown(&mut self.gpu, &self.facts);
            let wrote = plan.writes().count() > 0;
            let ceiling = self.gpu.ceiling_mw(&self.facts);
            let below_ceiling = matches!((self.limit_mw, ceiling), (Some(l), Some(c)) if l.saturating_add(LIMIT_TOLERANCE_MW) < c);
            let untouched = !below_ceiling
                && self.clock_cap_mhz.is_none()
                && !self.stored.governor_lowered_limit
                && !self.stored.governor_clock_lock
                && !governor_lowered;
            self.carry_out(plan.effects)?;
            while !self.in_flight.is_empty() {
                self.complete(Outcome::Ok)?;
            }
            if untouched {
                prop_assert!(!wrote, "shutdown wrote to a GPU nothing had lowered");
            }
            let writable = !self.lost && !self.gpu.dry_run;
            match self.gpu.mode {
                // A limit gpuwatch wrote below the ceiling is given back (a
                // driver default below an operator ceiling is not gpuwatch's
                // to undo before it has read the GPU again).
                GovernorMode::PowerLimit if writable && self.limit_written => {
                    let (Some(limit), Some(ceiling)) = (self.limit_mw, ceiling) else {
                        return Ok(());
                    };
                    prop_assert!(
                        limit.saturating_add(LIMIT_TOLERANCE_MW) >= ceiling,
                        "left lowered at shutdown: {limit} mW under a {ceiling} mW ceiling"
                    );
                }
                GovernorMode::ClockLock if writable => {
                    prop_assert_eq!(self.clock_cap_mhz, None, "clock lock left at shutdown");
                }
                _ => {}
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Random lifecycles of a GPU whose power limit can be set: it is
        /// governed whenever it reads normally, never planned above its
        /// ceiling, recorded as lowered before it is lowered, and given
        /// back at shutdown.
        #[test]
        fn a_power_limited_gpu_keeps_the_control_planes_promises(
            dry_run in proptest::bool::weighted(0.15),
            inputs in proptest::collection::vec(input(), 1..120),
        ) {
            let mut world = World::new(h100(0), dry_run);
            for input in &inputs {
                world.step(input)?;
            }
            world.shut_down()?;
        }

        /// The same for a GPU governed by clock locks.
        #[test]
        fn a_clock_locked_gpu_keeps_the_control_planes_promises(
            dry_run in proptest::bool::weighted(0.15),
            inputs in proptest::collection::vec(input(), 1..120),
        ) {
            let mut world = World::new(laptop(0), dry_run);
            for input in &inputs {
                world.step(input)?;
            }
            world.shut_down()?;
        }
    }

    /// Device facts no real GPU reports (NVML answering 0, a minimum above
    /// the maximum, limits at the edge of u32), raw or as the device edge
    /// leaves them after `sanitize`.
    fn absurd_facts() -> impl Strategy<Value = DeviceFacts> {
        let temp = prop_oneof![
            Just(None),
            Just(Some(0)),
            Just(Some(1)),
            Just(Some(89)),
            Just(Some(200)),
            Just(Some(u32::MAX)),
        ];
        let mw = || {
            prop_oneof![
                Just(None),
                Just(Some(0)),
                Just(Some(1)),
                Just(Some(200_000)),
                Just(Some(700_000)),
                Just(Some(900_000)),
                Just(Some(u32::MAX)),
            ]
        };
        let mhz = prop_oneof![
            Just(None),
            Just(Some(0)),
            Just(Some(1980)),
            Just(Some(u32::MAX))
        ];
        (temp, mw(), mw(), mw(), mhz, any::<bool>(), any::<bool>()).prop_map(
            |(slowdown, min, max, default, clock, sanitize, clocks_only)| {
                let mut f = if clocks_only { laptop(0) } else { h100(0) };
                f.slowdown_c = slowdown;
                f.power_min_mw = min;
                f.power_max_mw = max;
                f.power_default_mw = default;
                f.max_graphics_clock_mhz = clock;
                if sanitize {
                    let _ = f.sanitize();
                }
                f
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever facts a GPU reports, the planners neither panic (no
        /// overflow, no underflow, no clamp of an empty range) nor plan
        /// outside the ceiling, nor lose a `lowered` flag.
        #[test]
        fn absurd_device_facts_never_panic_or_break_the_promises(
            facts in absurd_facts(),
            dry_run in proptest::bool::weighted(0.15),
            inputs in proptest::collection::vec(input(), 1..80),
        ) {
            let mut world = World::new(facts, dry_run);
            for input in &inputs {
                world.step(input)?;
            }
            world.shut_down()?;
        }

        /// Whatever a previous run (or a damaged state file) left on disk —
        /// thresholds and ceilings out of any range, flags set or not — the
        /// planners neither panic nor plan above the ceiling in force, and
        /// a GPU left lowered is given back.
        #[test]
        fn absurd_saved_state_never_panics_or_breaks_the_promises(
            ceiling in proptest::option::of(prop_oneof![Just(0u32), Just(1), 200_000u32..=700_000, Just(900_000), Just(u32::MAX)]),
            threshold in proptest::option::of(prop_oneof![Just(0u32), 30u32..=120, Just(10_000), Just(u32::MAX)]),
            hysteresis in proptest::option::of(prop_oneof![Just(0u32), 1u32..=20, Just(u32::MAX)]),
            lowered in any::<bool>(),
            clock_lock in any::<bool>(),
            clocks_only in any::<bool>(),
            inputs in proptest::collection::vec(input(), 1..80),
        ) {
            // Fields added to the state later keep their defaults here.
            #[allow(clippy::needless_update)]
            let saved = GpuState {
                operator_ceiling_mw: ceiling,
                threshold_c: threshold,
                hysteresis_c: hysteresis,
                governor_lowered_limit: lowered,
                governor_clock_lock: clock_lock,
                ..GpuState::default()
            };
            let facts = if clocks_only { laptop(0) } else { h100(0) };
            let mut world = World::with_saved(facts, false, saved);
            prop_assert!(world.gpu.threshold_c >= crate::config::THRESHOLD_MIN_C);
            prop_assert!(world.gpu.threshold_c <= crate::config::THRESHOLD_MAX_C);
            prop_assert!(world.gpu.hysteresis_c <= crate::config::HYSTERESIS_MAX_C);
            for input in &inputs {
                world.step(input)?;
            }
            world.shut_down()?;
        }
    }

    /// The cases the brief names, spelled out so they always run.
    #[test]
    fn named_sequences_keep_the_promises() {
        use Input::*;
        let sequences: Vec<Vec<Input>> = vec![
            // Lost and back, hot.
            vec![
                Reading(40),
                Reading(85),
                Reading(88),
                Lost,
                Recovered(false),
                Reading(88),
                Reading(89),
            ],
            // Lost twice.
            vec![
                Reading(40),
                Lost,
                Recovered(false),
                Reading(85),
                Complete(Outcome::Ok),
                Lost,
                Recovered(true),
                Reading(86),
                Reading(88),
            ],
            // Lost before an operator ceiling change (refused), then after one.
            vec![
                Reading(40),
                Lost,
                SetPowerLimit(Some(500)),
                Recovered(false),
                Reading(40),
                SetPowerLimit(Some(450)),
                Lost,
                Recovered(false),
                Reading(80),
                Reading(85),
            ],
            // A driver limit reset while lost.
            vec![
                Reading(40),
                SetPowerLimit(Some(500)),
                Complete(Outcome::Ok),
                Lost,
                DriverReset,
                Recovered(false),
                Reading(40),
                Reading(41),
            ],
            // Lost after a governor cut landed, back, hot again.
            vec![
                Reading(40),
                Reading(85),
                Reading(88),
                Complete(Outcome::Ok),
                Lost,
                Recovered(false),
                Reading(88),
                Reading(89),
            ],
            // A driver limit reset while lost, after a governor cut.
            vec![
                Reading(40),
                Reading(88),
                Reading(89),
                Complete(Outcome::Ok),
                Lost,
                DriverReset,
                Recovered(false),
                Reading(89),
                Reading(90),
            ],
            // Restarted (SIGKILL) while lost with `lowered` persisted: the
            // GPU is lost at that start, comes back, is governed.
            vec![
                Reading(40),
                Reading(88),
                Reading(89),
                Complete(Outcome::Ok),
                Lost,
                Restart,
                Recovered(false),
                Reading(89),
                Reading(90),
            ],
            // Restarted while lowered (not lost): the stale throttle goes.
            vec![
                Reading(40),
                Reading(88),
                Reading(89),
                Complete(Outcome::Ok),
                Restart,
                Reading(60),
                Complete(Outcome::Ok),
                Reading(88),
            ],
            // Back with different default limits, twice.
            vec![
                Reading(40),
                Lost,
                Recovered(true),
                Reading(88),
                Lost,
                Recovered(true),
                Reading(88),
                Reading(89),
            ],
            // A governor cut times out while running and lands late; then
            // one is cancelled while queued.
            vec![
                Reading(40),
                Reading(88),
                Reading(89),
                TimedOut(false),
                Reading(89),
                Complete(Outcome::Ok),
                Reading(89),
                Reading(70),
                Reading(60),
                TimedOut(true),
                Reading(60),
            ],
            // An operator's lower ceiling lands after it was raised again,
            // and the raise fails: the GPU is still given back at shutdown.
            vec![
                SetPowerLimit(None),
                SetPowerLimit(Some(200)),
                SetPowerLimit(None),
                Complete(Outcome::Ok),
                Complete(Outcome::Ok),
                Complete(Outcome::Failed),
            ],
            // The operator's raise is cancelled at its timeout: the GPU is
            // still given back at shutdown.
            vec![
                SetPowerLimit(Some(200)),
                Complete(Outcome::Ok),
                SetPowerLimit(None),
                TimedOut(true),
            ],
            // Killed while the operator's raise was under way: the GPU is
            // recorded as held down, so the next start gives it back.
            vec![
                Reading(35),
                SetPowerLimit(Some(200)),
                Complete(Outcome::Ok),
                SetPowerLimit(None),
                Restart,
            ],
            // A raise asked for before the first reading after a restart,
            // and refused by the driver.
            vec![
                Reading(35),
                SetPowerLimit(Some(200)),
                Complete(Outcome::Ok),
                Restart,
                SetPowerLimit(None),
                Complete(Outcome::Failed),
            ],
            // Lowered, then the write refused: fallback.
            vec![
                Reading(40),
                Reading(85),
                Complete(Outcome::NotSupported),
                Reading(86),
                Reading(88),
                Complete(Outcome::Ok),
            ],
        ];
        for facts in [h100(0), laptop(0)] {
            for inputs in &sequences {
                let mut world = World::new(facts.clone(), false);
                let result: Result<(), TestCaseError> = (|| {
                    for input in inputs {
                        world.step(input)?;
                    }
                    // Whatever is under way finishes; the next reading
                    // (checked in `step`) finds the GPU governed.
                    while !world.in_flight.is_empty() {
                        world.complete(Outcome::Ok)?;
                    }
                    world.step(&Reading(50))?;
                    world.shut_down()
                })();
                assert!(result.is_ok(), "{:?} on {}: {result:?}", inputs, facts.name);
            }
        }
    }
}

// --- the node power budget ----------------------------------------------

/// `n` H100s read at 700 W, cool, drawing `draw_w` each.
fn budget_gpus(n: u32, draw_w: u32) -> (Vec<GpuControl>, Vec<DeviceFacts>) {
    let facts: Vec<DeviceFacts> = (0..n).map(h100).collect();
    let gpus = facts
        .iter()
        .map(|f| {
            let mut gpu = running(f, &config(), &GpuState::default());
            let r = Reading {
                power_draw_mw: Some(draw_w * 1000),
                ..reading(1, 40, Some(700_000))
            };
            lifecycle::reading(&mut gpu, f, &r, T0);
            gpu
        })
        .collect();
    (gpus, facts)
}

fn budget_writes(round: &super::node_budget::Round) -> Vec<(usize, Write)> {
    round
        .plans
        .iter()
        .flat_map(|(pos, p)| p.writes().cloned().map(move |w| (*pos, w)))
        .collect()
}

/// What may be in force: for each GPU the higher of its confirmed limit and
/// any write under way.
fn may_be_in_force_mw(gpus: &[GpuControl]) -> u64 {
    gpus.iter()
        .map(|g| {
            u64::from(
                g.expected_limit_mw
                    .unwrap_or(0)
                    .max(g.pending_limit_mw.unwrap_or(0)),
            )
        })
        .sum()
}

#[test]
fn a_budget_lowers_first_and_raises_only_into_room_whatever_order_writes_land_in() {
    use super::node_budget::{activate, redistribute};
    let (mut gpus, facts) = budget_gpus(4, 100);
    let refs: Vec<&DeviceFacts> = facts.iter().collect();
    activate(&mut gpus, &refs);
    let round = redistribute(&mut gpus, &refs, 2000.0);
    let writes = budget_writes(&round);
    assert_eq!(writes.len(), 4, "every GPU lowered: {writes:?}");
    for (_, w) in &writes {
        let WriteOp::SetPowerLimit { limit_mw } = w.op else {
            panic!("{w:?}")
        };
        assert!(limit_mw <= 500_000, "{w:?}");
    }
    let shares: u32 = gpus.iter().map(|g| g.budget_share_mw.unwrap_or(0)).sum();
    assert!(shares <= 2_000_000, "{shares}");
    // The writes land in reverse order; GPU 0 now presses against its
    // limit and asks for more. After every landing, a round may raise only
    // into the room left with writes under way counted high.
    let mut t = 2;
    for (pos, write) in writes.into_iter().rev() {
        ok_write(&mut gpus[pos], &facts[pos], &write);
        t += 2;
        for (i, gpu) in gpus.iter_mut().enumerate() {
            if gpu.in_flight > 0 {
                continue;
            }
            let limit = gpu.expected_limit_mw;
            let draw = if i == 0 { limit } else { Some(100_000) };
            let r = Reading {
                power_draw_mw: draw,
                ..reading(t, 40, limit)
            };
            lifecycle::reading(gpu, &facts[i], &r, T0);
        }
        let before = super::node_budget::counted_total_mw(&gpus, &refs);
        let round = redistribute(&mut gpus, &refs, 2000.0);
        for (pos, w) in budget_writes(&round) {
            let WriteOp::SetPowerLimit { limit_mw } = w.op else {
                panic!("{w:?}")
            };
            assert!(limit_mw <= gpus[pos].budget_share_mw.unwrap_or(0), "{w:?}");
        }
        // Planned writes stay under way (counted at their value): what may
        // be in force is counted, and the count never grows past the
        // budget (over it, while the first lowers land, it only shrinks).
        let counted = super::node_budget::counted_total_mw(&gpus, &refs);
        assert!(may_be_in_force_mw(&gpus) <= counted, "{counted}");
        assert!(counted <= before.max(2_000_000), "{before} -> {counted}");
    }
    // Once the lowers have landed, what may be in force fits.
    assert!(
        super::node_budget::counted_total_mw(&gpus, &refs) <= 2_000_000,
        "{:?}",
        gpus.iter()
            .map(|g| (g.budget_share_mw, g.expected_limit_mw, g.pending_limit_mw))
            .collect::<Vec<_>>()
    );
}

#[test]
fn after_a_budget_write_no_write_is_planned_within_an_interval_and_a_reading() {
    use super::node_budget::{activate, redistribute};
    let (mut gpus, facts) = budget_gpus(2, 100);
    let refs: Vec<&DeviceFacts> = facts.iter().collect();
    activate(&mut gpus, &refs);
    // Planned on the reading at 1 s, landed before the next.
    let writes = budget_writes(&redistribute(&mut gpus, &refs, 800.0));
    assert_eq!(writes.len(), 2, "{writes:?}");
    for (pos, w) in &writes {
        ok_write(&mut gpus[*pos], &facts[*pos], w);
    }
    let planned_at = 1;
    let wait = gpus[0].min_write_interval + gpus[0].reading_period;
    assert!(wait >= Duration::from_secs(2), "{wait:?}");
    // The budget grows: both GPUs, cool and drawing 100 W, may have 700 W
    // back, from the budget or from their governors, but not before the
    // wait is over.
    let mut first_write = None;
    for t in 2..8 {
        // Each second: a round (at 2 s it raises the shares), then the
        // readings (the governors step).
        let round = redistribute(&mut gpus, &refs, 1400.0);
        for (pos, w) in budget_writes(&round) {
            first_write.get_or_insert((pos, t));
            ok_write(&mut gpus[pos], &facts[pos], &w);
        }
        for (i, gpu) in gpus.iter_mut().enumerate() {
            let limit = gpu.expected_limit_mw;
            let r = Reading {
                power_draw_mw: Some(100_000),
                ..reading(t, 40, limit)
            };
            let plan = lifecycle::reading(gpu, &facts[i], &r, T0);
            for w in plan.writes().cloned().collect::<Vec<_>>() {
                first_write.get_or_insert((i, t));
                ok_write(gpu, &facts[i], &w);
            }
        }
    }
    let (_, t) = first_write.expect("the power is given back");
    assert!(
        Duration::from_secs(t - planned_at) >= wait,
        "written at {t} s, {wait:?} not yet over since the budget's write at {planned_at} s"
    );
    for gpu in &gpus {
        assert_eq!(gpu.expected_limit_mw, Some(700_000));
    }
}

#[test]
fn a_lost_gpu_keeps_its_last_limit_counted_and_gets_no_new_share() {
    use super::node_budget::{activate, counted_mw, redistribute};
    let (mut gpus, facts) = budget_gpus(3, 650);
    let refs: Vec<&DeviceFacts> = facts.iter().collect();
    lifecycle::lost(&mut gpus[0]);
    activate(&mut gpus, &refs);
    let round = redistribute(&mut gpus, &refs, 1600.0);
    assert!(
        budget_writes(&round).iter().all(|(pos, _)| *pos != 0),
        "nothing is written to a lost GPU"
    );
    assert_eq!(counted_mw(&gpus[0], &facts[0]), 700_000);
    let others: u32 = gpus[1..]
        .iter()
        .map(|g| g.budget_share_mw.unwrap_or(0))
        .sum();
    assert!(others <= 900_000, "the others share what is left: {others}");
}

#[test]
fn a_gpu_whose_limit_cannot_be_set_counts_at_its_maximum() {
    use super::node_budget::{activate, counted_mw, redistribute};
    let (mut gpus, mut facts) = budget_gpus(2, 300);
    facts[1].controls.power_limit_settable = false;
    let refs: Vec<&DeviceFacts> = facts.iter().collect();
    activate(&mut gpus, &refs);
    redistribute(&mut gpus, &refs, 1000.0);
    assert_eq!(counted_mw(&gpus[1], &facts[1]), 700_000);
    assert_eq!(gpus[1].budget_share_mw, None);
    assert!(gpus[0].budget_share_mw.is_some_and(|s| s <= 300_000));
}
