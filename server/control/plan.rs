//! What the planners hand the effects layer: an ordered list of effects.
//!
//! A plan is data, not behaviour. The planners (`lifecycle`, `requests`)
//! decide; the controller carries a plan out in order — persist, record,
//! write — so that "persist `lowered` before the write that lowers" is a
//! property of the plan that tests can check without a device or a disk.

use crate::{actor::WriteOp, events::NewEvent, state::GpuState};

/// One thing to do, in the order it appears in its plan.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Save a change to the GPU's desired state.
    Persist(DesiredChange),
    /// Record an event in the audit log.
    Record(NewEvent),
    /// Record an event and show it as the governor's last action.
    RecordGovernorAction(NewEvent),
    /// Send a write to the GPU's device thread.
    Write(Write),
}

/// A write to send to a GPU, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Write {
    pub op: WriteOp,
    pub origin: Origin,
    /// The limit / clock cap before the write, for the event.
    pub before: Option<u32>,
}

/// A change to a GPU's persisted desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DesiredChange {
    OperatorCeiling(Option<u32>),
    /// The operator's threshold and hysteresis (`None`: not the operator's).
    Threshold {
        threshold_c: Option<u32>,
        hysteresis_c: Option<u32>,
    },
    /// The governor holds the power limit below the ceiling.
    LoweredLimit(bool),
    /// The governor holds a graphics clock lock.
    ClockLock(bool),
}

impl DesiredChange {
    pub(crate) fn apply(self, state: &mut GpuState) {
        match self {
            DesiredChange::OperatorCeiling(mw) => state.operator_ceiling_mw = mw,
            DesiredChange::Threshold {
                threshold_c,
                hysteresis_c,
            } => {
                state.threshold_c = threshold_c;
                state.hysteresis_c = hysteresis_c;
            }
            DesiredChange::LoweredLimit(on) => state.governor_lowered_limit = on,
            DesiredChange::ClockLock(on) => state.governor_clock_lock = on,
        }
    }
}

/// Why a write is made, and who to tell when it completes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Origin {
    Governor {
        reason: String,
    },
    Operator {
        name: String,
        /// The pending reply this write is part of.
        reply: u64,
        /// Which GPU of the request (position in its results).
        slot: usize,
        part: Part,
    },
    /// The first reading of a GPU (at start, or back after it was lost).
    Startup {
        reason: String,
    },
    Drift {
        reason: String,
    },
    /// The node power budget's split (see `node_budget`).
    Budget {
        reason: String,
    },
    Shutdown,
}

/// Which part of a multi-write request a write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    PowerLimit,
    ApplicationClocks,
    LockedGpuClocks,
    LockedMemoryClocks,
}

/// The effects for one GPU, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    pub effects: Vec<Effect>,
}

impl Plan {
    pub(crate) fn none() -> Self {
        Self::default()
    }

    pub(crate) fn push(&mut self, effect: Effect) {
        self.effects.push(effect);
    }

    pub(crate) fn record(&mut self, event: NewEvent) {
        self.effects.push(Effect::Record(event));
    }

    pub(crate) fn persist(&mut self, change: DesiredChange) {
        self.effects.push(Effect::Persist(change));
    }

    pub(crate) fn write(&mut self, write: Write) {
        self.effects.push(Effect::Write(write));
    }

    pub(crate) fn extend(&mut self, other: Plan) {
        self.effects.extend(other.effects);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.effects.is_empty()
    }

    /// The writes of this plan, in order.
    #[cfg(test)]
    pub(crate) fn writes(&self) -> impl Iterator<Item = &Write> {
        self.effects.iter().filter_map(|e| match e {
            Effect::Write(w) => Some(w),
            _ => None,
        })
    }

    /// The events of this plan, in order.
    #[cfg(test)]
    pub(crate) fn events(&self) -> impl Iterator<Item = &NewEvent> {
        self.effects.iter().filter_map(|e| match e {
            Effect::Record(ev) | Effect::RecordGovernorAction(ev) => Some(ev),
            _ => None,
        })
    }
}
