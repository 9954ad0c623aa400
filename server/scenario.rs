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
    /// The governor before it learned to hold the threshold
    /// ([`crate::governor_v1`]), for comparison.
    GovernorV1,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "no governor",
            Policy::Naive => "naive (min when hot)",
            Policy::Governor => "gpuwatch governor",
            Policy::GovernorV1 => "previous governor (0.x)",
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
    /// The most the GPU can draw and stay at the threshold (the die
    /// settled exactly at it), capped by what the workload asks and the
    /// ceiling: what a perfect governor would let it draw while hot.
    pub allowed_power_w: f64,
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
    let allowed_power_w = ((scenario.threshold_c - params.ambient_c)
        / params.thermal_resistance_c_per_w)
        .min(scenario.high_w)
        .min(preset.power_default_w);
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
    let mut previous = crate::governor_v1::Governor::new(
        crate::governor_v1::GovernorParams {
            threshold_c: scenario.threshold_c,
            hysteresis_c: scenario.hysteresis_c,
            floor,
            ceiling,
            min_write_interval: scenario.min_write_interval,
            min_step,
            ambient_guess_c: 30.0,
            actuator: match actuator {
                Actuator::PowerLimit => crate::governor_v1::Actuator::PowerLimit,
                Actuator::ClockCap => crate::governor_v1::Actuator::ClockCap,
            },
            thermal_prior: match governor.params().thermal_prior {
                ThermalPrior::ResistanceCPerW(r) => {
                    crate::governor_v1::ThermalPrior::ResistanceCPerW(r)
                }
                ThermalPrior::HeadroomC(h) => crate::governor_v1::ThermalPrior::HeadroomC(h),
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
        allowed_power_w,
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
            Policy::GovernorV1 => {
                let obs = crate::governor_v1::Observation {
                    time: t,
                    temperature_c,
                    power_w: Some(power_w),
                    level: Some(level),
                    clock_mhz: reading.graphics_clock_mhz.map(f64::from),
                };
                match previous.step(&obs) {
                    crate::governor_v1::Decision::Hold => None,
                    crate::governor_v1::Decision::Set { level, .. } => Some(level),
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
    /// Mean reported temperature over the settled half of the high-demand
    /// phase.
    pub settled_mean_c: f64,
    /// What the settled power falls short of [`Trace::allowed_power_w`]
    /// (negative: the GPU drew more than staying at the threshold allows).
    pub power_given_up_w: f64,
    /// Changes of direction of the level over the whole run (a cut after a
    /// raise or a raise after a cut).
    pub reversals: usize,
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
    let settled_mean_c = settled.iter().sum::<f64>() / settled.len().max(1) as f64;
    Metrics {
        settled_mean_c,
        power_given_up_w: trace.allowed_power_w - settled_power_w,
        reversals: reversals(trace),
        peak_c,
        band_c,
        writes: trace.writes_s.len(),
        max_writes_per_s,
        steady_writes,
        settled_power_w,
        recovery_s,
    }
}

/// Changes of direction of the level in `trace` (writes that do not move it
/// are ignored).
pub fn reversals(trace: &Trace) -> usize {
    let mut count = 0;
    let mut last_direction = 0i8;
    for pair in trace.points.windows(2) {
        let delta = pair[1].level - pair[0].level;
        if delta.abs() < 0.5 {
            continue;
        }
        let direction = if delta > 0.0 { 1 } else { -1 };
        if last_direction != 0 && direction != last_direction {
            count += 1;
        }
        last_direction = direction;
    }
    count
}

/// The scenarios the criteria are stated for, named: the standard
/// step on an H100 for time constants of 2, 10 and 60 s, sampled every 100 ms
/// and every second, with the cooling the governor assumes and cooling 30 %
/// better / 40 % worse at other ambients; the same on the laptop preset (the
/// clock-cap mode); a sensor that lags three times as much as the preset's.
pub fn criteria_scenarios() -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    for tau in [2.0, 10.0, 60.0] {
        for period in [0.1, 1.0] {
            for (r_scale, ambient) in [(1.0, 30.0), (0.7, 40.0), (1.4, 20.0)] {
                let s = Scenario::cooled(
                    Duration::from_secs_f64(tau),
                    Duration::from_secs_f64(period),
                    r_scale,
                    ambient,
                );
                out.push((
                    format!("h100 tau {tau} dt {period} R x{r_scale} amb {ambient}"),
                    s,
                ));
            }
            let mut s = Scenario::standard(Duration::from_secs_f64(tau));
            s.sample_period = Duration::from_secs_f64(period);
            s.sensor_lag = Duration::from_secs_f64(2.4);
            out.push((format!("h100 tau {tau} dt {period} sensor lag 2.4 s"), s));
            out.push((
                format!("laptop tau {tau} dt {period}"),
                Scenario::laptop(
                    Duration::from_secs_f64(tau),
                    Duration::from_secs_f64(period),
                ),
            ));
        }
    }
    out
}

impl Scenario {
    /// The standard H100 scenario sampled every `sample_period`, with
    /// cooling `r_scale` times the assumed 0.075 °C/W at `ambient_c`, and
    /// the threshold 15 °C under where the demand would settle.
    pub fn cooled(
        time_constant: Duration,
        sample_period: Duration,
        r_scale: f64,
        ambient_c: f64,
    ) -> Self {
        let mut s = Scenario::standard(time_constant);
        s.sample_period = sample_period;
        let r = 0.075 * r_scale;
        s.thermal_resistance_c_per_w = Some(r);
        s.ambient_c = ambient_c;
        s.threshold_c = (ambient_c + s.high_w * r - 15.0).round();
        s
    }

    /// The laptop preset (no settable power limit: the clock-cap mode) under
    /// a demand that would take it 15 °C over the threshold.
    pub fn laptop(time_constant: Duration, sample_period: Duration) -> Self {
        let mut s = Scenario::standard(time_constant);
        s.preset = PresetKey::Laptop;
        s.high_w = 110.0;
        s.low_w = 20.0;
        s.ambient_c = 35.0;
        let r = 0.42;
        s.thermal_resistance_c_per_w = Some(r);
        s.threshold_c = (s.ambient_c + s.high_w * r - 15.0).round();
        s.sample_period = sample_period;
        s
    }

    /// A square-wave load between the standard scenario's high and low
    /// demand whose period is the time constant: the load that would make a
    /// governor that chases it cycle.
    pub fn square_wave(time_constant: Duration, sample_period: Duration) -> Self {
        let mut s = Scenario::standard(time_constant);
        let half = time_constant / 2;
        let point = |at: Duration, watts: f64| crate::config::DemandPoint {
            at,
            watts,
            ramp: false,
        };
        s.sample_period = sample_period;
        s.profile = Some((
            vec![point(Duration::ZERO, s.high_w), point(half, s.low_w)],
            Some(time_constant),
        ));
        s
    }
}

/// Loads other than a single step — ramps, square waves, a second step up —
/// on every preset the governor can act on, for time constants of 2 to 60 s
/// and both sampling rates: (name, scenario, has a repeating load).
pub fn other_load_scenarios() -> Vec<(String, Scenario, Option<u64>)> {
    use crate::config::DemandPoint;
    let p = |at: u64, watts: f64, ramp: bool| DemandPoint {
        at: Duration::from_secs(at),
        watts,
        ramp,
    };
    /// Name, board, demand points, repeat period (s), threshold (°C).
    type Case = (&'static str, PresetKey, Vec<DemandPoint>, Option<u64>, f64);
    let cases: Vec<Case> = vec![
        (
            "ramp 100->700 W over 120 s",
            PresetKey::H100Sxm,
            vec![p(0, 100.0, false), p(120, 700.0, true)],
            None,
            70.0,
        ),
        (
            "square 650/150 W, 60 s period",
            PresetKey::H100Sxm,
            vec![p(0, 650.0, false), p(30, 150.0, false)],
            Some(60),
            65.0,
        ),
        (
            "450 W then 700 W",
            PresetKey::H100Sxm,
            vec![p(0, 450.0, false), p(150, 700.0, false)],
            None,
            66.0,
        ),
        (
            "A100 at 400 W",
            PresetKey::A100Sxm,
            vec![p(5, 400.0, false)],
            None,
            70.0,
        ),
        (
            "RTX 4090 at 450 W",
            PresetKey::Rtx4090,
            vec![p(5, 450.0, false)],
            None,
            72.0,
        ),
        (
            "laptop square 115/30 W",
            PresetKey::Laptop,
            vec![p(0, 115.0, false), p(20, 30.0, false)],
            Some(40),
            70.0,
        ),
    ];
    let mut out = Vec::new();
    for tau in [2.0, 10.0, 30.0, 60.0] {
        for period in [0.1, 1.0] {
            for (name, preset, points, repeat, threshold) in &cases {
                let mut s = Scenario::standard(Duration::from_secs_f64(tau));
                let params = Preset::get(*preset);
                s.preset = *preset;
                s.ambient_c = params.ambient_c;
                s.threshold_c = *threshold;
                s.sample_period = Duration::from_secs_f64(period);
                s.duration = Duration::from_secs(400);
                s.drop = Duration::from_secs(400);
                s.profile = Some((points.clone(), repeat.map(Duration::from_secs)));
                out.push((
                    format!("{name}, tau {tau} s, sampled every {period} s"),
                    s,
                    *repeat,
                ));
            }
        }
    }
    out
}

/// A node power budget over several simulated GPUs whose demand moves
/// between them, each GPU with its own physics, the budget's split written
/// through [`crate::budget::Sequencer`].
#[derive(Debug, Clone)]
pub struct BudgetScenario {
    pub preset: PresetKey,
    pub budget_w: f64,
    /// Demand per GPU (steps).
    pub demand: Vec<Vec<crate::config::DemandPoint>>,
    pub duration: Duration,
    pub sample_period: Duration,
    pub min_write_interval: Duration,
}

impl BudgetScenario {
    /// Eight H100s under 4,000 W, demand moving between them every 40 s:
    /// half busy (3,000 W asked), all busy (5,200 W), the other half busy
    /// and harder (3,200 W), two flat out and the rest at 450 W (4,100 W),
    /// a hot spot that moves every 5 s (2,800 W), six flat out (4,500 W).
    pub fn eight_h100s() -> Self {
        let step = |at_s: u64, watts: f64| crate::config::DemandPoint {
            at: Duration::from_secs(at_s),
            watts,
            ramp: false,
        };
        let demand = (0..8)
            .map(|i| {
                let mut points = vec![
                    step(0, if i < 4 { 650.0 } else { 100.0 }),
                    step(40, 650.0),
                    step(80, if i < 4 { 100.0 } else { 700.0 }),
                    step(120, if i < 2 { 700.0 } else { 450.0 }),
                ];
                for slot in 0..8u64 {
                    let hot = slot as usize == i;
                    points.push(step(160 + 5 * slot, if hot { 700.0 } else { 300.0 }));
                }
                points.push(step(200, if i < 6 { 700.0 } else { 150.0 }));
                points
            })
            .collect();
        Self {
            preset: PresetKey::H100Sxm,
            budget_w: 4000.0,
            demand,
            duration: Duration::from_secs(240),
            sample_period: Duration::from_millis(100),
            min_write_interval: Duration::from_secs(1),
        }
    }
}

/// What a budget run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetMetrics {
    /// Highest sum of the limits in force, at any sample and after any
    /// single write within one.
    pub max_enforced_sum_w: f64,
    /// Energy the GPUs drew (J) and what the best split of the same demand
    /// would have let them draw.
    pub delivered_j: f64,
    pub oracle_j: f64,
    /// Most writes to one GPU within any one second.
    pub max_writes_per_s: usize,
    /// Writes to all GPUs.
    pub writes: usize,
    /// Samples where the total demand was under the budget (counted from 6 s
    /// after the demand last changed), and of those, the ones where every
    /// GPU's limit covered its demand.
    pub under_budget_samples: usize,
    pub under_budget_all_unconstrained: usize,
    /// Seconds per sample, the budget, and per-sample totals for plots:
    /// (t, sum of limits, sum of power drawn, oracle power).
    pub series: Vec<(f64, f64, f64, f64)>,
}

/// Runs a budget scenario. The budget is in force from the start: the GPUs
/// begin at an even split of it (as if it had been set while they idled).
pub fn run_budget(s: &BudgetScenario) -> BudgetMetrics {
    use crate::budget::{BudgetGpu, Sequencer, Standing, allocate};
    let preset = Preset::get(s.preset);
    let n = s.demand.len();
    let (min_w, max_w) = (preset.power_min_w, preset.power_default_w);
    let mut models: Vec<GpuModel> = s
        .demand
        .iter()
        .map(|d| {
            let mut m = GpuModel::new(
                ModelParams::from_preset(preset.clone()),
                DemandProfile::new(d, None),
            );
            m.set_power_limit_mw(watts_to_mw((s.budget_w / n as f64).min(max_w)));
            m
        })
        .collect();
    let profiles: Vec<DemandProfile> = s
        .demand
        .iter()
        .map(|d| DemandProfile::new(d, None))
        .collect();
    let changes: Vec<f64> = {
        let mut c: Vec<f64> = s
            .demand
            .iter()
            .flat_map(|d| d.iter().map(|p| p.at.as_secs_f64()))
            .collect();
        c.sort_by(f64::total_cmp);
        c
    };
    let mut seq = Sequencer::new(n, s.min_write_interval, 5.0);
    let mut writes: Vec<Vec<f64>> = vec![Vec::new(); n];
    let dt = s.sample_period.as_secs_f64();
    let limit_w = |m: &GpuModel| f64::from(m.power_limit_mw()) / 1000.0;
    let mut out = BudgetMetrics {
        max_enforced_sum_w: 0.0,
        delivered_j: 0.0,
        oracle_j: 0.0,
        max_writes_per_s: 0,
        writes: 0,
        under_budget_samples: 0,
        under_budget_all_unconstrained: 0,
        series: Vec::new(),
    };
    let mut t = Duration::ZERO;
    while t <= s.duration {
        let ts = t.as_secs_f64();
        for m in &mut models {
            m.advance_to(t);
        }
        let sum: f64 = models.iter().map(limit_w).sum();
        out.max_enforced_sum_w = out.max_enforced_sum_w.max(sum);
        let demand: Vec<f64> = profiles.iter().map(|p| p.at(ts)).collect();
        let drawn: f64 = models.iter().map(GpuModel::power_w).sum();
        // The oracle: water-filling on the true demand.
        let oracle_split = allocate(
            s.budget_w,
            &demand
                .iter()
                .map(|d| BudgetGpu {
                    min_w,
                    cap_w: d.clamp(min_w, max_w),
                    enforced_w: d.clamp(min_w, max_w),
                    draw_w: *d,
                    capped: false,
                    standing: Standing::Allocatable,
                })
                .collect::<Vec<_>>(),
        );
        let oracle: f64 = demand
            .iter()
            .zip(&oracle_split)
            .map(|(d, share)| d.min(share.unwrap_or(0.0)).max(preset.idle_w))
            .sum();
        out.delivered_j += drawn * dt;
        out.oracle_j += oracle * dt;
        out.series.push((ts, sum, drawn, oracle));
        // Settled: 6 s after the demand last changed (a raise the room
        // allowed only in part waits a write interval for the rest).
        let settled = changes.iter().all(|c| ts < *c || ts - c >= 6.0);
        if demand.iter().sum::<f64>() < s.budget_w && settled {
            out.under_budget_samples += 1;
            if models
                .iter()
                .zip(&demand)
                .all(|(m, d)| limit_w(m) >= d.min(max_w) - 0.5)
            {
                out.under_budget_all_unconstrained += 1;
            }
        }
        let gpus: Vec<BudgetGpu> = models
            .iter()
            .map(|m| {
                let reading = m.reading(false, 0);
                BudgetGpu {
                    min_w,
                    cap_w: max_w,
                    enforced_w: limit_w(m),
                    draw_w: f64::from(reading.power_draw_mw.unwrap_or(0)) / 1000.0,
                    capped: reading
                        .throttle_mask
                        .is_some_and(|m| m & crate::throttle::mask::SW_POWER_CAP != 0),
                    standing: Standing::Allocatable,
                }
            })
            .collect();
        let targets = allocate(s.budget_w, &gpus);
        if std::env::var_os("BUDGET_DEBUG").is_some() && (ts * 10.0).round() as i64 % 50 == 0 {
            eprintln!(
                "{ts:5.1} limits {:?} draw {:?} targets {:?}",
                gpus.iter()
                    .map(|g| g.enforced_w.round())
                    .collect::<Vec<_>>(),
                gpus.iter().map(|g| g.draw_w.round()).collect::<Vec<_>>(),
                targets
                    .iter()
                    .map(|t| t.unwrap_or(0.0).round())
                    .collect::<Vec<_>>()
            );
        }
        // Writes land one at a time, in the order planned: the sum is
        // checked after each.
        for (i, to) in seq.plan(t, s.budget_w, &gpus, &targets) {
            models[i].set_power_limit_mw(watts_to_mw(to));
            seq.settled(i);
            writes[i].push(ts);
            out.writes += 1;
            let sum: f64 = models.iter().map(limit_w).sum();
            out.max_enforced_sum_w = out.max_enforced_sum_w.max(sum);
        }
        t += s.sample_period;
    }
    out.max_writes_per_s = writes
        .iter()
        .map(|w| {
            w.iter()
                .map(|&a| w.iter().filter(|&&b| b >= a && b < a + 1.0 - 1e-9).count())
                .max()
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    out
}

/// Which of the "hold the threshold" criteria a run misses, by
/// name: settled mean within [threshold - 1, threshold], band within the
/// mean ± 1 °C and no reading above threshold + 1 once settled, peak at most
/// threshold + 2, at most one write a second and no more writes than
/// `previous` (the previous governor in the same scenario), back at the
/// ceiling within three time constants (plus two samples and a second).
pub fn hold_criteria_failures(s: &Scenario, m: &Metrics, previous: &Metrics) -> Vec<&'static str> {
    let t = s.threshold_c;
    let mut failed = Vec::new();
    if !(t - 1.0..=t).contains(&m.settled_mean_c) {
        failed.push("mean");
    }
    if m.band_c.1 - m.band_c.0 > 2.0 || m.band_c.1 > t + 1.0 {
        failed.push("band");
    }
    if m.peak_c > t + 2.0 {
        failed.push("peak");
    }
    if m.max_writes_per_s > 1 {
        failed.push("writes/s");
    }
    if m.writes > previous.writes {
        failed.push("writes");
    }
    let allowed = 3.0 * s.time_constant.as_secs_f64() + 2.0 * s.sample_period.as_secs_f64() + 1.0;
    if m.recovery_s.is_none_or(|r| r > allowed) {
        failed.push("recovery");
    }
    failed
}
