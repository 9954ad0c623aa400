//! The control state of one GPU: what the operator and the configuration
//! ask of it (mode, threshold, ceiling, floor), where it is in its
//! lifecycle, and what gpuwatch last wrote to it.
//!
//! Device facts (limits, capabilities) are not kept here: the sampler owns
//! them and every planner is handed them by reference. The desired state
//! mirrors what is persisted; planners change both through
//! [`DesiredChange`](super::plan::DesiredChange) so the two never disagree.

use std::time::{Duration, SystemTime};

use crate::{
    actor::WriteOp,
    api::{
        EventKind, GovernorAction, GovernorMode, Severity, ThresholdChange, ThresholdSource,
        event::Change,
    },
    backend::DeviceFacts,
    config::{
        ControllerConfig, HYSTERESIS_MAX_C, HYSTERESIS_MIN_C, THRESHOLD_MAX_C, THRESHOLD_MIN_C,
    },
    events::{Actor, NewEvent},
    governor::{Actuator, GovernorParams, ThermalPrior},
    state::GpuState,
};

use super::{
    lifecycle::Lifecycle,
    plan::{Origin, Write},
};

/// Smallest limit difference treated as a real change (mW).
pub(crate) const LIMIT_TOLERANCE_MW: u32 = 1_000;
/// Governor floor in clock mode, as a fraction of the maximum clock.
const CLOCK_FLOOR_FRACTION: f64 = 0.3;
/// Assumed coolant/air temperature before the governor has seen the GPU.
const AMBIENT_GUESS_C: f64 = 30.0;
/// The threshold when neither operator, configuration nor the GPU's
/// slowdown temperature gives one.
const FALLBACK_THRESHOLD_C: u32 = 83;

/// The control state of one GPU.
#[derive(Debug, Clone)]
pub(crate) struct GpuControl {
    pub mode: GovernorMode,
    pub mode_reason: String,
    pub enabled: bool,
    pub dry_run: bool,
    pub threshold_c: u32,
    pub threshold_source: ThresholdSource,
    pub hysteresis_c: u32,
    /// The configuration's threshold for this GPU, for restore-default.
    pub config_threshold: Option<(u32, ThresholdSource)>,
    pub config_hysteresis_c: u32,
    /// How far below slowdown a derived threshold sits.
    pub threshold_margin_c: u32,
    pub floor_w: Option<f64>,
    pub min_write_interval: Duration,
    pub min_step_w: f64,
    /// What is persisted for this GPU (operator ceiling and threshold,
    /// whether the governor left it lowered).
    pub desired: GpuState,
    pub lifecycle: Lifecycle,
    /// Writes to this GPU not yet completed.
    pub in_flight: usize,
    pub last_action: Option<GovernorAction>,
    /// The power limit gpuwatch last wrote (drift reference).
    pub expected_limit_mw: Option<u32>,
    /// The graphics clock cap the governor holds.
    pub clock_cap_mhz: Option<u32>,
    /// The last dry-run decision recorded (level, when).
    pub last_dry_run: Option<(f64, SystemTime)>,
    /// The governor went to observing because a write of its own was
    /// refused for want of permission: how to try again (see
    /// `lifecycle::retry_writes`).
    pub write_retry: Option<WriteRetry>,
    /// A write to this GPU succeeded in this run: the daemon has the
    /// privilege, so a later refusal is a passing one (a lock someone else
    /// held, a driver in transition), and observing is never for good.
    pub writes_permitted: bool,
    /// This GPU's share of the node power budget (mW) while one is set and
    /// the GPU is given one: an inner limit, like the operator's ceiling
    /// (see [`Self::ceiling_mw`]).
    pub budget_share_mw: Option<u32>,
    /// A node power budget is in force: a GPU without a share yet is held
    /// at the limit it has (it joins the budget there at its first reading).
    pub budget_active: bool,
    /// The highest power limit among the writes under way (mW): the budget
    /// counts it, as it may land at any moment.
    pub pending_limit_mw: Option<u32>,
    /// Power drawn at the last reading (mW), and whether the power limit
    /// held the clocks down then (the SW power cap throttle reason).
    pub last_draw_mw: Option<u32>,
    pub power_capped: bool,
    /// The device clock of the last reading, and of the last write planned
    /// to this GPU by anyone (the governor or the budget): the budget keeps
    /// to the same write interval as the governor.
    pub last_device_time: Option<Duration>,
    pub last_write_device_time: Option<Duration>,
    /// Device time between the last two readings (the sampler's period on
    /// the device's clock).
    pub reading_period: Duration,
}

/// Trying governor writes again after a permission error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct WriteRetry {
    /// The mode to go back to.
    pub mode: GovernorMode,
    /// Refusals in a row.
    pub refusals: u32,
    /// When to try; set at the first reading after the refusal.
    pub at: Option<SystemTime>,
}

impl GpuControl {
    /// The control state of a GPU from its facts, the configuration and
    /// what was persisted for it; with the warning event to record when the
    /// threshold asked for is not below the GPU's slowdown temperature.
    pub(crate) fn new(
        facts: &DeviceFacts,
        config: &ControllerConfig,
        saved: &GpuState,
    ) -> (Self, Option<NewEvent>) {
        let over = config.gpus.iter().find(|o| {
            o.index == Some(facts.index)
                || o.uuid
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(&facts.uuid))
        });
        let enabled = over.and_then(|o| o.enabled).unwrap_or(config.enabled);
        let dry_run = over.and_then(|o| o.dry_run).unwrap_or(config.dry_run);
        let config_threshold = over
            .and_then(|o| o.threshold_c)
            .or(config.threshold_c)
            .map(|t| (t, ThresholdSource::Config));
        let config_hysteresis_c = over
            .and_then(|o| o.hysteresis_c)
            .unwrap_or(config.hysteresis_c);
        let derived = derived_threshold(facts, config.threshold_margin_c);
        // What was persisted is only believed within what an operator could
        // have set: a damaged or hand-edited state file never sets a
        // threshold the governor could not work with.
        let saved_threshold = saved
            .threshold_c
            .filter(|t| (THRESHOLD_MIN_C..=THRESHOLD_MAX_C).contains(t));
        let saved_hysteresis = saved
            .hysteresis_c
            .filter(|h| (HYSTERESIS_MIN_C..=HYSTERESIS_MAX_C).contains(h));
        let (mut threshold_c, mut threshold_source) = match (saved_threshold, config_threshold) {
            (Some(t), _) => (t, ThresholdSource::Operator),
            (None, Some(c)) => c,
            (None, None) => (derived, ThresholdSource::Derived),
        };
        let mut warning = None;
        if let Some(slowdown) = slowdown_c(facts)
            && threshold_c >= slowdown
        {
            let safe = slowdown.saturating_sub(1).max(THRESHOLD_MIN_C);
            warning = Some(
                NewEvent::new(
                    EventKind::ThresholdChanged,
                    Actor::startup(),
                    format!(
                        "threshold {threshold_c} °C is not below GPU {}'s slowdown temperature {slowdown} °C; using {safe} °C",
                        facts.index
                    ),
                )
                .gpu(facts.index, &facts.uuid)
                .severity(Severity::Warning)
                .change(Change::Threshold(ThresholdChange {
                    before_c: Some(threshold_c),
                    after_c: Some(safe),
                    ..ThresholdChange::default()
                })),
            );
            threshold_c = safe;
            if threshold_source == ThresholdSource::Operator {
                threshold_source = ThresholdSource::Config;
            }
        }
        let (mode, mode_reason) = derive_mode(facts, enabled);
        let gpu = GpuControl {
            mode,
            mode_reason,
            enabled,
            dry_run,
            threshold_c,
            threshold_source,
            hysteresis_c: saved_hysteresis.unwrap_or(config_hysteresis_c),
            config_threshold,
            config_hysteresis_c,
            threshold_margin_c: config.threshold_margin_c,
            floor_w: over.and_then(|o| o.floor_watts).or(config.floor_watts),
            min_write_interval: config.min_write_interval,
            min_step_w: config.min_step_watts,
            desired: saved.clone(),
            lifecycle: Lifecycle::AwaitingFirstReading,
            in_flight: 0,
            last_action: None,
            expected_limit_mw: None,
            clock_cap_mhz: None,
            last_dry_run: None,
            write_retry: None,
            writes_permitted: false,
            budget_share_mw: None,
            budget_active: false,
            pending_limit_mw: None,
            last_draw_mw: None,
            power_capped: false,
            last_device_time: None,
            last_write_device_time: None,
            reading_period: Duration::ZERO,
        };
        (gpu, warning)
    }

    /// The operator's ceiling, if one is set.
    pub(crate) fn operator_ceiling_mw(&self) -> Option<u32> {
        self.desired.operator_ceiling_mw
    }

    /// The ceiling in force: the operator's, else the device default; never
    /// above the device's maximum (a GPU back from a reset, or a state file,
    /// may hold a ceiling above what the device now allows), nor above the
    /// GPU's share of the node power budget.
    pub(crate) fn ceiling_mw(&self, facts: &DeviceFacts) -> Option<u32> {
        let ceiling = self.own_ceiling_mw(facts)?;
        let share = match self.budget_share_mw {
            Some(share) => Some(share),
            None if self.budget_active => self.expected_limit_mw,
            None => None,
        };
        Some(share.map_or(ceiling, |share| ceiling.min(share)))
    }

    /// The ceiling without the budget: the operator's, else the device
    /// default, never above the device's maximum. What the budget never
    /// gives a GPU more than.
    pub(crate) fn own_ceiling_mw(&self, facts: &DeviceFacts) -> Option<u32> {
        let ceiling = self.operator_ceiling_mw().or(facts.power_default_mw)?;
        Some(facts.power_max_mw.map_or(ceiling, |max| ceiling.min(max)))
    }

    pub(crate) fn floor_mw(&self, facts: &DeviceFacts) -> Option<u32> {
        let min = facts.power_min_mw?;
        let floor = self.floor_w.map_or(min, |w| (w * 1000.0) as u32).max(min);
        Some(floor.min(self.ceiling_mw(facts).unwrap_or(floor)))
    }

    pub(crate) fn clock_floor_mhz(facts: &DeviceFacts) -> u32 {
        let max = facts.max_graphics_clock_mhz.unwrap_or(0);
        (f64::from(max) * CLOCK_FLOOR_FRACTION) as u32
    }

    /// The threshold restore-default goes back to.
    pub(crate) fn default_threshold(&self, facts: &DeviceFacts) -> (u32, ThresholdSource) {
        self.config_threshold.unwrap_or((
            derived_threshold(facts, self.threshold_margin_c),
            ThresholdSource::Derived,
        ))
    }

    /// True when the mode lets the governor move this GPU at all (dry run
    /// included: it decides, it just does not write).
    #[cfg(test)]
    pub(crate) fn mode_governs(&self) -> bool {
        matches!(
            self.mode,
            GovernorMode::PowerLimit | GovernorMode::ClockLock
        )
    }

    /// The governor's settings for this GPU in its current mode; `None`
    /// where the mode does not govern.
    pub(crate) fn governor_params(&self, facts: &DeviceFacts) -> Option<GovernorParams> {
        let (floor, ceiling, actuator, min_step) = match self.mode {
            GovernorMode::PowerLimit => (
                f64::from(self.floor_mw(facts)?) / 1000.0,
                f64::from(self.ceiling_mw(facts)?) / 1000.0,
                Actuator::PowerLimit,
                self.min_step_w,
            ),
            GovernorMode::ClockLock => (
                f64::from(Self::clock_floor_mhz(facts)),
                f64::from(facts.max_graphics_clock_mhz?),
                Actuator::ClockCap,
                15.0,
            ),
            _ => return None,
        };
        Some(GovernorParams {
            threshold_c: f64::from(self.threshold_c),
            hysteresis_c: f64::from(self.hysteresis_c),
            floor,
            ceiling,
            min_write_interval: self.min_write_interval,
            min_step,
            ambient_guess_c: AMBIENT_GUESS_C,
            actuator,
            thermal_prior: thermal_prior(facts),
        })
    }

    /// A write to plan, counted in flight from now on; `before` is what the
    /// event will show the write changed from.
    pub(crate) fn plan_write(&mut self, op: WriteOp, origin: Origin) -> Write {
        self.in_flight += 1;
        if let WriteOp::SetPowerLimit { limit_mw } = op {
            self.pending_limit_mw =
                Some(self.pending_limit_mw.map_or(limit_mw, |p| p.max(limit_mw)));
            self.last_write_device_time = self.last_device_time.or(self.last_write_device_time);
        }
        let before = match op {
            WriteOp::SetPowerLimit { .. } => self.expected_limit_mw,
            WriteOp::LockGpuClocks { .. } | WriteOp::ResetGpuLockedClocks => self.clock_cap_mhz,
            _ => None,
        };
        Write { op, origin, before }
    }

    /// The event announcing a mode other than the usual power-limit one, if
    /// this GPU has one.
    pub(crate) fn mode_announcement(&self, facts: &DeviceFacts) -> Option<NewEvent> {
        let severity = match self.mode {
            GovernorMode::ObserveOnly => Severity::Warning,
            GovernorMode::ClockLock => Severity::Info,
            _ => return None,
        };
        Some(
            NewEvent::new(
                EventKind::GovernorModeChanged,
                Actor::startup(),
                self.mode_reason.clone(),
            )
            .gpu(facts.index, &facts.uuid)
            .severity(severity),
        )
    }
}

/// The GPU's slowdown temperature, where it is one to plan with. Facts are
/// checked where they leave the device (`DeviceFacts::sanitize`); this
/// guards the planners against any that were not, so an absurd slowdown
/// (NVML answers 0 on some boards) never drags the threshold to its minimum
/// and the GPU to its floor.
pub(crate) fn slowdown_c(facts: &DeviceFacts) -> Option<u32> {
    facts
        .slowdown_c
        .filter(|c| crate::backend::PLAUSIBLE_LIMIT_C.contains(c))
}

/// The threshold derived from the GPU's slowdown temperature.
fn derived_threshold(facts: &DeviceFacts, margin_c: u32) -> u32 {
    slowdown_c(facts).map_or(FALLBACK_THRESHOLD_C, |s| {
        s.saturating_sub(margin_c).max(THRESHOLD_MIN_C)
    })
}

/// What the governor can move on a GPU with these facts.
pub(crate) fn derive_mode(facts: &DeviceFacts, enabled: bool) -> (GovernorMode, String) {
    let c = &facts.controls;
    if !enabled {
        (
            GovernorMode::Disabled,
            "governor disabled in the configuration".to_owned(),
        )
    } else if c.power_limit_settable
        && facts.power_min_mw.is_some()
        && facts.power_default_mw.is_some()
    {
        (
            GovernorMode::PowerLimit,
            "lowers and raises the power limit".to_owned(),
        )
    } else if c.gpu_clocks_lockable && facts.max_graphics_clock_mhz.is_some() {
        (
            GovernorMode::ClockLock,
            "power limit control is not supported on this GPU; locks graphics clocks instead"
                .to_owned(),
        )
    } else {
        (
            GovernorMode::ObserveOnly,
            "neither the power limit nor the clocks can be set on this GPU; observing only"
                .to_owned(),
        )
    }
}

/// Thermal resistance prior: a board at its default limit is designed to
/// run a few degrees under slowdown.
fn thermal_prior(facts: &DeviceFacts) -> ThermalPrior {
    let headroom = f64::from(slowdown_c(facts).unwrap_or(85)) - 5.0 - AMBIENT_GUESS_C;
    match facts.power_default_mw {
        Some(mw) => {
            ThermalPrior::ResistanceCPerW(headroom.max(5.0) / (f64::from(mw) / 1000.0).max(10.0))
        }
        None => ThermalPrior::HeadroomC(headroom.max(5.0)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::Controls;

    /// An H100-like GPU: 200-700 W, default 700 W, slowdown 89 °C.
    pub(crate) fn h100(index: u32) -> DeviceFacts {
        DeviceFacts {
            index,
            uuid: format!("GPU-test-{index}"),
            name: "Test H100".into(),
            power_min_mw: Some(200_000),
            power_max_mw: Some(700_000),
            power_default_mw: Some(700_000),
            slowdown_c: Some(89),
            max_graphics_clock_mhz: Some(1980),
            controls: Controls {
                power_limit_settable: true,
                gpu_clocks_lockable: true,
                memory_clocks_lockable: true,
                application_clocks_resettable: true,
                xid_events: false,
            },
            ..DeviceFacts::default()
        }
    }

    /// A laptop-like GPU: clocks lockable, power limit not settable.
    pub(crate) fn laptop(index: u32) -> DeviceFacts {
        let mut facts = h100(index);
        facts.name = "Test laptop".into();
        facts.controls.power_limit_settable = false;
        facts.controls.memory_clocks_lockable = false;
        facts.controls.application_clocks_resettable = false;
        facts
    }

    #[test]
    fn the_mode_follows_what_the_gpu_can_do() {
        assert_eq!(derive_mode(&h100(0), true).0, GovernorMode::PowerLimit);
        assert_eq!(derive_mode(&laptop(0), true).0, GovernorMode::ClockLock);
        let mut none = laptop(0);
        none.controls.gpu_clocks_lockable = false;
        assert_eq!(derive_mode(&none, true).0, GovernorMode::ObserveOnly);
        assert_eq!(derive_mode(&h100(0), false).0, GovernorMode::Disabled);
    }

    #[test]
    fn the_operator_ceiling_replaces_the_default_and_bounds_the_floor() {
        let facts = h100(0);
        let saved = GpuState {
            operator_ceiling_mw: Some(150_000),
            ..GpuState::default()
        };
        let config = ControllerConfig {
            floor_watts: Some(300.0),
            ..ControllerConfig::default()
        };
        let (gpu, _) = GpuControl::new(&facts, &config, &saved);
        assert_eq!(gpu.ceiling_mw(&facts), Some(150_000));
        assert_eq!(
            gpu.floor_mw(&facts),
            Some(150_000),
            "floor never above the ceiling"
        );
        let (gpu, _) = GpuControl::new(&facts, &config, &GpuState::default());
        assert_eq!(gpu.ceiling_mw(&facts), Some(700_000));
        assert_eq!(gpu.floor_mw(&facts), Some(300_000));
    }

    #[test]
    fn a_threshold_at_slowdown_is_lowered_with_a_warning() {
        let facts = h100(0);
        let saved = GpuState {
            threshold_c: Some(95),
            ..GpuState::default()
        };
        let (gpu, warning) = GpuControl::new(&facts, &ControllerConfig::default(), &saved);
        assert_eq!(gpu.threshold_c, 88);
        assert_eq!(gpu.threshold_source, ThresholdSource::Config);
        let warning = warning.expect("a warning event");
        assert_eq!(warning.kind, EventKind::ThresholdChanged);
        assert_eq!(warning.severity, Severity::Warning);
        let (_, none) = GpuControl::new(&facts, &ControllerConfig::default(), &GpuState::default());
        assert!(none.is_none());
    }
}
