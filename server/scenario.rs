//! Thermal scenarios: a simulated GPU and a control policy in a loop, with no
//! daemon, runtime or wall clock.
//!
//! This is how the governor is judged and tuned: the same [`GpuModel`] the
//! simulator serves, sampled at the sampler's cadence, with the decision of
//! each sample applied to the model before the next one (a one-sample
//! actuation delay, as in the daemon). Three policies can drive it: none, the
//! original design's naive rule ("drop to the minimum when hot, restore
//! when cool"), and the governor. [`Metrics`] reduces a run to the figures
//! the README tabulates: peak, settling band, writes and recovery time.

use std::time::Duration;

use crate::{
    backend::sim::{DemandProfile, GpuModel, ModelParams, Preset, model::watts_to_mw},
    config::PresetKey,
    governor::{Actuator, Decision, Governor, GovernorParams, Observation, ThermalPrior},
};

/// Who controls the GPU in a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Nobody: the GPU runs at its default limit.
    None,
    /// The original design: minimum limit when hot, default when cool.
    Naive,
    /// gpuwatch's governor.
    Governor,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "no governor",
            Policy::Naive => "naive (min when hot)",
            Policy::Governor => "gpuwatch governor",
        }
    }
}

/// A thermal scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub preset: PresetKey,
    pub ambient_c: f64,
    pub time_constant: Duration,
    pub sensor_lag: Duration,
    /// Thermal resistance; the preset's when `None`.
    pub thermal_resistance_c_per_w: Option<f64>,
    /// Demand: `high_w` from `start` until `drop`, then `low_w`.
    pub high_w: f64,
    pub low_w: f64,
    pub start: Duration,
    pub drop: Duration,
    pub duration: Duration,
    pub threshold_c: f64,
    pub hysteresis_c: f64,
    pub sample_period: Duration,
    pub min_write_interval: Duration,
    /// A different demand profile (points, repeat period) instead of the
    /// high/low step; `drop` then only marks where metrics split.
    pub profile: Option<(Vec<crate::config::DemandPoint>, Option<Duration>)>,
}

impl Scenario {
    /// The standard test: an H100 whose demand would take it to
    /// threshold + 15 °C, held for 8 time constants, then dropped.
    pub fn standard(time_constant: Duration) -> Self {
        let preset = Preset::get(PresetKey::H100Sxm);
        let high_w = 650.0;
        let ambient_c = preset.ambient_c;
        let unlimited_c = ambient_c + high_w * preset.thermal_resistance_c_per_w;
        let tau = time_constant.as_secs_f64();
        Self {
            preset: PresetKey::H100Sxm,
            ambient_c,
            time_constant,
            sensor_lag: preset.sensor_lag,
            thermal_resistance_c_per_w: None,
            high_w,
            low_w: 150.0,
            start: Duration::from_secs(5),
            drop: Duration::from_secs_f64(5.0 + 8.0 * tau),
            duration: Duration::from_secs_f64(5.0 + 13.0 * tau),
            threshold_c: (unlimited_c - 15.0).round(),
            hysteresis_c: 3.0,
            sample_period: Duration::from_millis(100),
            min_write_interval: Duration::from_secs(1),
            profile: None,
        }
    }

    fn demand(&self) -> DemandProfile {
        if let Some((points, repeat)) = &self.profile {
            return DemandProfile::new(points, *repeat);
        }
        let point = |at: Duration, watts: f64| crate::config::DemandPoint {
            at,
            watts,
            ramp: false,
        };
        DemandProfile::new(
            &[point(self.start, self.high_w), point(self.drop, self.low_w)],
            None,
        )
    }
}

/// One sample of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub t_s: f64,
    /// What the sensor reports.
    pub temperature_c: f64,
    /// The power limit (W), or for boards without one the graphics clock
    /// cap (MHz) — whatever the policy moves.
    pub level: f64,
    pub power_w: f64,
}

/// A run: samples plus the times of writes.
#[derive(Debug, Clone)]
pub struct Trace {
    pub points: Vec<Point>,
    pub writes_s: Vec<f64>,
    /// The level's floor and ceiling.
    pub floor: f64,
    pub ceiling: f64,
    /// What the policy moves.
    pub actuator: Actuator,
}

/// Runs `scenario` under `policy`. Boards whose power limit cannot be set
/// (the laptop preset) are governed through a graphics clock cap.
pub fn run(scenario: &Scenario, policy: Policy) -> Trace {
    let preset = Preset::get(scenario.preset);
    let mut params = ModelParams::from_preset(preset.clone());
    params.ambient_c = scenario.ambient_c;
    params.time_constant_s = scenario.time_constant.as_secs_f64();
    params.sensor_lag_s = scenario.sensor_lag.as_secs_f64();
    if let Some(r) = scenario.thermal_resistance_c_per_w {
        params.thermal_resistance_c_per_w = r;
    }
    let mut model = GpuModel::new(params, scenario.demand());
    let (actuator, floor, ceiling, min_step) = if preset.power_limit_settable {
        (
            Actuator::PowerLimit,
            preset.power_min_w,
            preset.power_default_w,
            5.0,
        )
    } else {
        let max = f64::from(preset.max_graphics_mhz);
        (Actuator::ClockCap, (max * 0.3).round(), max, 15.0)
    };
    let mut governor = Governor::new(
        GovernorParams {
            threshold_c: scenario.threshold_c,
            hysteresis_c: scenario.hysteresis_c,
            floor,
            ceiling,
            min_write_interval: scenario.min_write_interval,
            min_step,
            ambient_guess_c: 30.0,
            actuator,
            // What the daemon would assume from the device's facts.
            thermal_prior: if preset.reports_power_limits {
                ThermalPrior::ResistanceCPerW(
                    (f64::from(preset.slowdown_c) - 35.0) / preset.power_default_w,
                )
            } else {
                ThermalPrior::HeadroomC(f64::from(preset.slowdown_c) - 35.0)
            },
        },
        ceiling,
    );
    let mut trace = Trace {
        points: Vec::new(),
        writes_s: Vec::new(),
        floor,
        ceiling,
        actuator,
    };
    let mut t = Duration::ZERO;
    while t <= scenario.duration {
        model.advance_to(t);
        let reading = model.reading(false, 0);
        let temperature_c = f64::from(reading.temperature_c.unwrap_or(0));
        let power_w = f64::from(reading.power_draw_mw.unwrap_or(0)) / 1000.0;
        let level = match actuator {
            Actuator::PowerLimit => f64::from(model.power_limit_mw()) / 1000.0,
            Actuator::ClockCap => model
                .gpu_clock_lock()
                .map_or(ceiling, |(_, hi)| f64::from(hi)),
        };
        trace.points.push(Point {
            t_s: t.as_secs_f64(),
            temperature_c,
            level,
            power_w,
        });
        let new_level = match policy {
            Policy::None => None,
            Policy::Naive => {
                if temperature_c >= scenario.threshold_c && level > floor {
                    Some(floor)
                } else if temperature_c <= scenario.threshold_c - scenario.hysteresis_c
                    && level < ceiling
                {
                    Some(ceiling)
                } else {
                    None
                }
            }
            Policy::Governor => {
                let obs = Observation {
                    time: t,
                    temperature_c,
                    power_w: Some(power_w),
                    level: Some(level),
                    clock_mhz: reading.graphics_clock_mhz.map(f64::from),
                };
                match governor.step(&obs) {
                    Decision::Hold => None,
                    Decision::Set { level, .. } => Some(level),
                }
            }
        };
        if let Some(level) = new_level {
            match actuator {
                Actuator::PowerLimit => model.set_power_limit_mw(watts_to_mw(level)),
                Actuator::ClockCap if level >= ceiling - 0.5 => model.set_gpu_clock_lock(None),
                Actuator::ClockCap => {
                    let cap = level.round() as u32;
                    model.set_gpu_clock_lock(Some(((floor as u32).min(cap), cap)));
                }
            }
            trace.writes_s.push(t.as_secs_f64());
        }
        t += scenario.sample_period;
    }
    trace
}

/// The figures of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    /// Highest reported temperature.
    pub peak_c: f64,
    /// Lowest and highest reported temperature over the second half of the
    /// high-demand phase (after settling).
    pub band_c: (f64, f64),
    pub writes: usize,
    /// Most writes within any one second.
    pub max_writes_per_s: usize,
    /// Writes during the settled half of the high-demand phase.
    pub steady_writes: usize,
    /// Mean power drawn over the settled half of the high-demand phase: the
    /// work the GPU got done while held at its threshold.
    pub settled_power_w: f64,
    /// Seconds from the demand drop until the limit is back at the ceiling
    /// (`None` if it never gets there).
    pub recovery_s: Option<f64>,
}

/// Reduces a run of `scenario` to its figures.
pub fn metrics(scenario: &Scenario, trace: &Trace) -> Metrics {
    let start = scenario.start.as_secs_f64();
    let drop = scenario.drop.as_secs_f64();
    let settled_from = start + (drop - start) / 2.0;
    let peak_c = trace
        .points
        .iter()
        .map(|p| p.temperature_c)
        .fold(f64::MIN, f64::max);
    let settled: Vec<_> = trace
        .points
        .iter()
        .filter(|p| p.t_s >= settled_from && p.t_s < drop)
        .map(|p| p.temperature_c)
        .collect();
    let settled_power: Vec<f64> = trace
        .points
        .iter()
        .filter(|p| p.t_s >= settled_from && p.t_s < drop)
        .map(|p| p.power_w)
        .collect();
    let settled_power_w = settled_power.iter().sum::<f64>() / settled_power.len().max(1) as f64;
    let band_c = (
        settled.iter().copied().fold(f64::MAX, f64::min),
        settled.iter().copied().fold(f64::MIN, f64::max),
    );
    let max_writes_per_s = trace
        .writes_s
        .iter()
        .map(|&w| {
            trace
                .writes_s
                .iter()
                .filter(|&&x| x >= w && x < w + 1.0)
                .count()
        })
        .max()
        .unwrap_or(0);
    let steady_writes = trace
        .writes_s
        .iter()
        .filter(|&&w| w >= settled_from && w < drop)
        .count();
    let recovery_s = trace
        .points
        .iter()
        .filter(|p| p.t_s >= drop)
        .find(|p| p.level >= trace.ceiling - 0.5)
        .map(|p| p.t_s - drop);
    Metrics {
        peak_c,
        band_c,
        writes: trace.writes_s.len(),
        max_writes_per_s,
        steady_writes,
        settled_power_w,
        recovery_s,
    }
}
