//! Planning of operator requests: SetPowerLimit, ResetClocks, SetThreshold
//! (and restore-default for the first and last).
//!
//! Each planner validates the whole request first (a refusal changes
//! nothing on any GPU), then updates the GPUs' control state and returns a
//! [`RequestPlan`]: the effects per GPU, in order, and the reply as far as
//! it is known — complete when nothing is written, otherwise waiting for
//! the writes, whose results [`Awaiting::absorb`] folds in. Pure: no clock,
//! no I/O.

use crate::{
    actor::WriteOp,
    api::{
        ClockResetResult, EventKind, GovernorMode, PowerLimitChange, PowerLimitResult,
        ResetOutcome, ThresholdChange, ThresholdResult, ThresholdSource, event::Change,
    },
    backend::{BackendError, DeviceFacts},
    config::{HYSTERESIS_MAX_C, HYSTERESIS_MIN_C, THRESHOLD_MAX_C, THRESHOLD_MIN_C},
    events::{Actor, NewEvent},
};

use super::{
    error::ControlError,
    gpu::GpuControl,
    plan::{DesiredChange, Effect, Origin, Part},
};

/// What SetPowerLimit asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PowerTarget {
    /// A new operator ceiling, in watts.
    Watts(f64),
    /// Remove the operator ceiling: back to the device default.
    RestoreDefault,
}

/// What SetThreshold asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdTarget {
    /// A new operator threshold.
    Celsius(u32),
    /// Back to the configured (or derived) threshold and hysteresis.
    RestoreDefault,
}

/// The plan for one operator request.
#[derive(Debug)]
pub(crate) struct RequestPlan<R> {
    /// Effects, each for the GPU at that position, in order.
    pub effects: Vec<(usize, Effect)>,
    /// The reply, complete once `remaining` reaches zero.
    pub reply: Awaiting<R>,
}

/// A reply waiting for its writes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Awaiting<R> {
    pub results: Vec<R>,
    pub errors: Vec<ControlError>,
    /// Writes not yet finished.
    pub remaining: usize,
}

impl<R> Awaiting<R> {
    pub(crate) fn is_complete(&self) -> bool {
        self.remaining == 0
    }

    /// The reply: the results, or every failure together.
    pub(crate) fn finish(self) -> Result<Vec<R>, ControlError> {
        match ControlError::combine(self.errors) {
            None => Ok(self.results),
            Some(e) => Err(e),
        }
    }
}

/// A result that a finished write can be folded into.
pub(crate) trait WriteResult {
    /// Folds in the outcome of `part`; returns the error the request
    /// reports for it, if any.
    fn absorb(
        &mut self,
        part: Part,
        index: u32,
        result: &Result<(), BackendError>,
    ) -> Option<ControlError>;
}

impl WriteResult for PowerLimitResult {
    fn absorb(
        &mut self,
        _part: Part,
        index: u32,
        result: &Result<(), BackendError>,
    ) -> Option<ControlError> {
        let Err(e) = result else {
            return None;
        };
        self.written = false;
        self.note = format!("write failed: {e}");
        Some(ControlError::Device {
            index,
            error: e.clone(),
        })
    }
}

impl WriteResult for ClockResetResult {
    fn absorb(
        &mut self,
        part: Part,
        index: u32,
        result: &Result<(), BackendError>,
    ) -> Option<ControlError> {
        let outcome = match result {
            Ok(()) => ResetOutcome::Reset,
            Err(BackendError::NotSupported(_)) => ResetOutcome::NotSupported,
            Err(_) => ResetOutcome::Failed,
        };
        set_part(self, part, outcome);
        match result {
            Err(e) if !matches!(e, BackendError::NotSupported(_)) => {
                self.error = Some(e.to_string());
                Some(ControlError::Device {
                    index,
                    error: e.clone(),
                })
            }
            _ => None,
        }
    }
}

impl<R: WriteResult> Awaiting<R> {
    /// One of the request's writes finished.
    pub(crate) fn absorb(
        &mut self,
        slot: usize,
        part: Part,
        index: u32,
        result: &Result<(), BackendError>,
    ) {
        self.remaining = self.remaining.saturating_sub(1);
        if let Some(r) = self.results.get_mut(slot)
            && let Some(e) = r.absorb(part, index, result)
        {
            self.errors.push(e);
        }
    }
}

/// The positions of the GPUs a request names.
fn positions(facts: &[&DeviceFacts], indices: &[u32]) -> Result<Vec<usize>, ControlError> {
    indices
        .iter()
        .map(|&index| {
            facts
                .iter()
                .position(|f| f.index == index)
                .ok_or(ControlError::UnknownGpu { index })
        })
        .collect()
}

fn refuse_lost(
    gpus: &[GpuControl],
    facts: &[&DeviceFacts],
    positions: &[usize],
) -> Result<(), ControlError> {
    match positions.iter().find(|&&p| gpus[p].lifecycle.is_lost()) {
        Some(&p) => Err(ControlError::GpuLost {
            index: facts[p].index,
        }),
        None => Ok(()),
    }
}

/// SetPowerLimit: validate, set (or remove) the operator ceiling, and write
/// it unless the governor holds the GPU lower.
pub(crate) fn set_power_limit(
    gpus: &mut [GpuControl],
    facts: &[&DeviceFacts],
    indices: &[u32],
    target: PowerTarget,
    operator: &str,
    reply: u64,
) -> Result<RequestPlan<PowerLimitResult>, ControlError> {
    let positions = positions(facts, indices)?;
    for &pos in &positions {
        let (gpu, f) = (&gpus[pos], facts[pos]);
        let index = f.index;
        if gpu.lifecycle.is_lost() {
            return Err(ControlError::GpuLost { index });
        }
        if !f.controls.power_limit_settable || f.power_default_mw.is_none() {
            return Err(ControlError::PowerLimitUnsupported {
                index,
                name: f.name.clone(),
            });
        }
        if let PowerTarget::Watts(watts) = target {
            let (min_mw, max_mw) = (
                f.power_min_mw.unwrap_or(0),
                f.power_max_mw.unwrap_or(u32::MAX),
            );
            if !watts.is_finite() {
                return Err(ControlError::WattsNotANumber {
                    index,
                    watts,
                    min_mw,
                    max_mw,
                });
            }
            let mw = watts * 1000.0;
            if mw < f64::from(min_mw) || mw > f64::from(max_mw) {
                return Err(ControlError::WattsOutOfRange {
                    index,
                    watts,
                    min_mw,
                    max_mw,
                });
            }
        }
    }
    let mut effects = Vec::new();
    let mut results = Vec::new();
    let mut writes = Vec::new();
    for (slot, &pos) in positions.iter().enumerate() {
        let (gpu, f) = (&mut gpus[pos], facts[pos]);
        let previous = gpu.operator_ceiling_mw();
        let new_ceiling = match target {
            PowerTarget::Watts(w) => Some((w * 1000.0).round() as u32),
            PowerTarget::RestoreDefault => None,
        };
        DesiredChange::OperatorCeiling(new_ceiling).apply(&mut gpu.desired);
        let ceiling = gpu.ceiling_mw(f).unwrap_or(0);
        let power_mode = gpu.mode == GovernorMode::PowerLimit;
        if power_mode
            && let Some(params) = gpu.governor_params(f)
            && let Some(g) = gpu.lifecycle.governor_mut()
        {
            g.set_params(params);
        }
        let governor_level_mw = gpu
            .lifecycle
            .governor()
            .filter(|g| power_mode && g.is_lowered() && !gpu.dry_run)
            .map(|g| (g.level() * 1000.0).round() as u32);
        let current = gpu.expected_limit_mw;
        let (apply, note) = match governor_level_mw {
            Some(level) if level < ceiling => (
                None,
                format!(
                    "the governor holds the GPU at {} W while it is hot; the new ceiling applies when it cools",
                    level / 1000
                ),
            ),
            _ => (Some(ceiling), String::new()),
        };
        // Skipped only when the GPU already holds the ceiling and nothing
        // else is on its way there: a write still under way (an earlier
        // request's) lands after `current` was taken and would leave its
        // limit behind.
        let apply =
            apply.filter(|c| gpu.in_flight > 0 || current.is_none_or(|cur| cur.abs_diff(*c) > 0));
        effects.push((
            pos,
            Effect::Record(
                NewEvent::new(
                    EventKind::CeilingChanged,
                    Actor::operator(operator),
                    match new_ceiling {
                        Some(mw) => format!("operator ceiling set to {} W", f64::from(mw) / 1000.0),
                        None => format!(
                            "operator ceiling removed; back to the default {} W",
                            ceiling / 1000
                        ),
                    },
                )
                .gpu(f.index, &f.uuid)
                .change(Change::PowerLimit(PowerLimitChange {
                    before_mw: previous,
                    after_mw: new_ceiling,
                })),
            ),
        ));
        effects.push((
            pos,
            Effect::Persist(DesiredChange::OperatorCeiling(new_ceiling)),
        ));
        // Raising: until the write lands (or, where the governor holds the
        // GPU lower, until it cools) the GPU sits below the ceiling in
        // force, so it is recorded as held down first; a crash before then
        // leaves a flag the next start acts on. A limit not read yet counts
        // as below: the flag is cleared when the write lands at the ceiling.
        if f.controls.power_limit_settable
            && !gpu.desired.governor_lowered_limit
            && current
                .is_none_or(|cur| cur.saturating_add(super::gpu::LIMIT_TOLERANCE_MW) < ceiling)
        {
            DesiredChange::LoweredLimit(true).apply(&mut gpu.desired);
            effects.push((pos, Effect::Persist(DesiredChange::LoweredLimit(true))));
        }
        results.push(PowerLimitResult {
            index: f.index,
            uuid: f.uuid.clone(),
            previous_ceiling_mw: previous,
            ceiling_mw: ceiling,
            applied_limit_mw: apply.or(governor_level_mw).or(current).unwrap_or(ceiling),
            written: apply.is_some(),
            note,
        });
        if let Some(limit_mw) = apply {
            writes.push((pos, slot, limit_mw));
        }
    }
    let remaining = writes.len();
    for (pos, slot, limit_mw) in writes {
        let write = gpus[pos].plan_write(
            WriteOp::SetPowerLimit { limit_mw },
            Origin::Operator {
                name: operator.to_owned(),
                reply,
                slot,
                part: Part::PowerLimit,
            },
        );
        effects.push((pos, Effect::Write(write)));
    }
    Ok(RequestPlan {
        effects,
        reply: Awaiting {
            results,
            errors: Vec::new(),
            remaining,
        },
    })
}

/// ResetClocks: reset whatever clock settings each GPU supports.
pub(crate) fn reset_clocks(
    gpus: &mut [GpuControl],
    facts: &[&DeviceFacts],
    indices: &[u32],
    operator: &str,
    reply: u64,
) -> Result<RequestPlan<ClockResetResult>, ControlError> {
    let positions = positions(facts, indices)?;
    refuse_lost(gpus, facts, &positions)?;
    let mut results = Vec::new();
    let mut writes = Vec::new();
    for (slot, &pos) in positions.iter().enumerate() {
        let f = facts[pos];
        let c = &f.controls;
        let mut result = ClockResetResult {
            index: f.index,
            uuid: f.uuid.clone(),
            application_clocks: ResetOutcome::NotSupported as i32,
            locked_gpu_clocks: ResetOutcome::NotSupported as i32,
            locked_memory_clocks: ResetOutcome::NotSupported as i32,
            error: None,
        };
        for (supported, op, part) in [
            (
                c.application_clocks_resettable,
                WriteOp::ResetApplicationClocks,
                Part::ApplicationClocks,
            ),
            (
                c.gpu_clocks_lockable,
                WriteOp::ResetGpuLockedClocks,
                Part::LockedGpuClocks,
            ),
            (
                c.memory_clocks_lockable,
                WriteOp::ResetMemoryLockedClocks,
                Part::LockedMemoryClocks,
            ),
        ] {
            if supported {
                set_part(&mut result, part, ResetOutcome::Unspecified);
                writes.push((pos, slot, op, part));
            }
        }
        results.push(result);
    }
    let remaining = writes.len();
    let mut effects = Vec::new();
    for (pos, slot, op, part) in writes {
        let write = gpus[pos].plan_write(
            op,
            Origin::Operator {
                name: operator.to_owned(),
                reply,
                slot,
                part,
            },
        );
        effects.push((pos, Effect::Write(write)));
    }
    Ok(RequestPlan {
        effects,
        reply: Awaiting {
            results,
            errors: Vec::new(),
            remaining,
        },
    })
}

/// SetThreshold: validate every GPU, then set threshold and hysteresis.
/// Nothing is written to the GPUs; the governor uses the new values from
/// its next step.
pub(crate) fn set_threshold(
    gpus: &mut [GpuControl],
    facts: &[&DeviceFacts],
    indices: &[u32],
    target: ThresholdTarget,
    hysteresis_c: Option<u32>,
    operator: &str,
) -> Result<RequestPlan<ThresholdResult>, ControlError> {
    let positions = positions(facts, indices)?;
    if let Some(h) = hysteresis_c
        && !(HYSTERESIS_MIN_C..=HYSTERESIS_MAX_C).contains(&h)
    {
        return Err(ControlError::HysteresisOutOfRange { hysteresis_c: h });
    }
    let mut planned = Vec::new();
    for &pos in &positions {
        let (gpu, f) = (&gpus[pos], facts[pos]);
        let index = f.index;
        let (threshold, source) = match target {
            ThresholdTarget::Celsius(c) => (c, ThresholdSource::Operator),
            ThresholdTarget::RestoreDefault => gpu.default_threshold(f),
        };
        let hysteresis = match (hysteresis_c, target) {
            (Some(h), _) => h,
            (None, ThresholdTarget::RestoreDefault) => gpu.config_hysteresis_c,
            (None, ThresholdTarget::Celsius(_)) => gpu.hysteresis_c,
        };
        if threshold < THRESHOLD_MIN_C {
            return Err(ControlError::ThresholdTooLow {
                threshold_c: threshold,
            });
        }
        match super::gpu::slowdown_c(f) {
            Some(slowdown_c) if threshold >= slowdown_c => {
                return Err(ControlError::ThresholdNotBelowSlowdown {
                    index,
                    threshold_c: threshold,
                    slowdown_c,
                });
            }
            None if threshold > THRESHOLD_MAX_C => {
                return Err(ControlError::ThresholdTooHigh {
                    threshold_c: threshold,
                });
            }
            _ => {}
        }
        if threshold < hysteresis.saturating_add(20) {
            return Err(ControlError::BandTooNarrow {
                index,
                threshold_c: threshold,
                hysteresis_c: hysteresis,
            });
        }
        planned.push((pos, threshold, source, hysteresis));
    }
    let mut effects = Vec::new();
    let mut results = Vec::new();
    for (pos, threshold, source, hysteresis) in planned {
        let (gpu, f) = (&mut gpus[pos], facts[pos]);
        let (before_c, before_h) = (gpu.threshold_c, gpu.hysteresis_c);
        gpu.threshold_c = threshold;
        gpu.threshold_source = source;
        gpu.hysteresis_c = hysteresis;
        if let Some(params) = gpu.governor_params(f)
            && let Some(g) = gpu.lifecycle.governor_mut()
        {
            g.set_params(params);
        }
        let operator_value = (source == ThresholdSource::Operator).then_some(threshold);
        // The operator's hysteresis is kept exactly: one given now (also
        // with restore-default's threshold), else, with a new threshold, the
        // one they set before (a new threshold alone does not drop it).
        let operator_h = match target {
            ThresholdTarget::Celsius(_) => hysteresis_c.or(gpu.desired.hysteresis_c),
            ThresholdTarget::RestoreDefault => hysteresis_c,
        };
        let change = DesiredChange::Threshold {
            threshold_c: operator_value,
            hysteresis_c: operator_h,
        };
        change.apply(&mut gpu.desired);
        effects.push((pos, Effect::Persist(change)));
        effects.push((
            pos,
            Effect::Record(
                NewEvent::new(
                    EventKind::ThresholdChanged,
                    Actor::operator(operator),
                    format!("threshold {before_c} °C -> {threshold} °C, hysteresis {before_h} °C -> {hysteresis} °C"),
                )
                .gpu(f.index, &f.uuid)
                .change(Change::Threshold(ThresholdChange {
                    before_c: Some(before_c),
                    after_c: Some(threshold),
                    before_hysteresis_c: Some(before_h),
                    after_hysteresis_c: Some(hysteresis),
                })),
            ),
        ));
        results.push(ThresholdResult {
            index: f.index,
            uuid: f.uuid.clone(),
            previous_threshold_c: before_c,
            threshold_c: threshold,
            hysteresis_c: hysteresis,
            threshold_source: source as i32,
        });
    }
    Ok(RequestPlan {
        effects,
        reply: Awaiting {
            results,
            errors: Vec::new(),
            remaining: 0,
        },
    })
}

fn set_part(r: &mut ClockResetResult, part: Part, outcome: ResetOutcome) {
    let value = outcome as i32;
    match part {
        Part::ApplicationClocks => r.application_clocks = value,
        Part::LockedGpuClocks => r.locked_gpu_clocks = value,
        Part::LockedMemoryClocks => r.locked_memory_clocks = value,
        Part::PowerLimit => {}
    }
}
