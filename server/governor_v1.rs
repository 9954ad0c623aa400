//! The governor as it was before it learned to hold the threshold (0.x, issue 17's
//! "today's governor"), kept verbatim behind the `testing` feature so the scenario
//! runner and `examples/governor_report` can show it side by side with the
//! current one, in the same run. Nothing in the daemon uses it.

use std::{collections::VecDeque, time::Duration};

/// Where the governor stands, in its own terms (the control plane maps it
/// onto the wire's `GovernorState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// At the ceiling, nothing to do.
    Idle,
    /// Holding the GPU below its ceiling because it runs hot.
    Throttling,
    /// Giving power back after the GPU cooled.
    Recovering,
}

/// Fixed settings of one GPU's governor.
#[derive(Debug, Clone, PartialEq)]
pub struct GovernorParams {
    /// Target temperature: at or above it, cut.
    pub threshold_c: f64,
    /// Below `threshold_c - hysteresis_c`, give power back.
    pub hysteresis_c: f64,
    /// Lowest level the governor sets (W, or MHz in clock mode).
    pub floor: f64,
    /// Highest level the governor restores (W, or MHz in clock mode).
    pub ceiling: f64,
    /// Minimum time between two writes.
    pub min_write_interval: Duration,
    /// Smallest change worth a write (W, or MHz in clock mode).
    pub min_step: f64,
    /// Best guess of the coolant/air temperature, until the governor has
    /// seen the GPU idle and settled.
    pub ambient_guess_c: f64,
    /// What the governor moves.
    pub actuator: Actuator,
    /// What the governor assumes about the GPU's heat before it learns.
    pub thermal_prior: ThermalPrior,
}

/// The governor's starting assumption about temperature rise per watt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThermalPrior {
    /// A known (or estimated from the power rating) rise per watt, °C/W.
    ResistanceCPerW(f64),
    /// The power rating is unknown: assume the GPU rises this many degrees
    /// above ambient at the highest power it is seen drawing.
    HeadroomC(f64),
}

/// What the governor moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actuator {
    /// The power management limit, in watts.
    PowerLimit,
    /// A cap on the graphics clock, in MHz; power scales roughly with the
    /// square of the clock.
    ClockCap,
}

/// One reading, as the governor sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The device's clock (simulated time for the simulator).
    pub time: Duration,
    /// Sensor temperature.
    pub temperature_c: f64,
    /// Power drawn (averaged), if the GPU reports it.
    pub power_w: Option<f64>,
    /// The level currently in force (limit in W, or clock cap in MHz); `None`
    /// when unknown (then the governor assumes its own last command).
    pub level: Option<f64>,
    /// The current graphics clock (clock mode uses it as the "draw").
    pub clock_mhz: Option<f64>,
}

/// What to do after an observation.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing to write.
    Hold,
    /// Write `level` (W or MHz); `reason` says why, for the audit log.
    Set { level: f64, reason: String },
}

/// Samples of history used for the rate of rise.
const HISTORY: usize = 128;
/// Window over which the rate of temperature change is estimated.
const SLOPE_WINDOW: Duration = Duration::from_millis(2500);
/// Window for judging whether the temperature has settled.
const LONG_WINDOW: Duration = Duration::from_secs(10);
/// How far ahead a rising temperature is surely going (a lower bound for
/// any GPU whose time constant is at least this).
const BOUND_HORIZON_S: f64 = 2.0;
/// How long power must hold before readings say anything about where that
/// power settles (the sensor's lag plus the power reading's averaging).
const POWER_HOLD_S: f64 = 2.5;
/// How far ahead the governor looks when judging "hot".
const HORIZON_S: f64 = 2.0;
/// The governor aims this far below the threshold when cutting.
const AIM_BELOW_C: f64 = 1.0;

/// One GPU's governor.
#[derive(Debug, Clone)]
pub struct Governor {
    params: GovernorParams,
    state: Phase,
    history: VecDeque<(f64, f64)>,
    /// Power draw for each entry of `history`.
    powers: VecDeque<f64>,
    /// The level the governor believes is in force.
    level: f64,
    last_write: Option<Duration>,
    /// Consecutive hot cuts while still rising.
    model: ThermalModel,
    /// Temperature at the last write.
    last_write_temp: f64,
}

impl Governor {
    /// A governor that believes the GPU is at `current_level`.
    pub fn new(params: GovernorParams, current_level: f64) -> Self {
        let level = current_level.clamp(params.floor, params.ceiling.max(params.floor));
        let state = if level < params.ceiling {
            Phase::Throttling
        } else {
            Phase::Idle
        };
        Self {
            model: ThermalModel::new(params.ambient_guess_c, params.thermal_prior),
            params,
            state,
            history: VecDeque::with_capacity(HISTORY),
            powers: VecDeque::with_capacity(HISTORY),
            level,
            last_write: None,
            last_write_temp: f64::MIN,
        }
    }

    pub fn params(&self) -> &GovernorParams {
        &self.params
    }

    /// Changes threshold, hysteresis, floor or ceiling; takes effect at the
    /// next step.
    pub fn set_params(&mut self, params: GovernorParams) {
        self.params = params;
    }

    pub fn state(&self) -> Phase {
        self.state
    }

    /// The level the governor believes is in force.
    pub fn level(&self) -> f64 {
        self.level
    }

    /// Tells the governor a write happened (by it or anyone else).
    pub fn note_written(&mut self, level: f64, at: Duration) {
        self.level = level;
        self.last_write = Some(at);
    }

    /// True when the governor holds the GPU below its ceiling.
    pub fn is_lowered(&self) -> bool {
        self.level < self.params.ceiling - 0.5
    }

    /// Rate of temperature change over the recent window, °C/s.
    fn slope(&self) -> f64 {
        let Some(&(t_end, _)) = self.history.back() else {
            return 0.0;
        };
        let window = SLOPE_WINDOW.as_secs_f64();
        let points: Vec<_> = self
            .history
            .iter()
            .rev()
            .enumerate()
            .take_while(|(i, (t, _))| *i < 4 || t_end - t <= window)
            .map(|(_, p)| *p)
            .collect();
        if points.len() < 2 {
            return 0.0;
        }
        let n = points.len() as f64;
        let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
        let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (t, y)| {
            (
                num + (t - mean_t) * (y - mean_y),
                den + (t - mean_t).powi(2),
            )
        });
        if den <= f64::EPSILON { 0.0 } else { num / den }
    }

    /// The "draw" in the actuator's units: power for a power limit, the
    /// running clock for a clock cap.
    fn draw(&self, obs: &Observation) -> f64 {
        match self.params.actuator {
            Actuator::PowerLimit => obs.power_w.unwrap_or(self.level),
            Actuator::ClockCap => obs.clock_mhz.unwrap_or(self.level),
        }
    }

    /// Converts a fraction of power to remove into a fraction of the
    /// actuator's level to remove.
    fn level_fraction(&self, power_fraction: f64) -> f64 {
        match self.params.actuator {
            Actuator::PowerLimit => power_fraction,
            // Dynamic power ~ clock^2: removing a fraction f of power needs
            // the clock scaled by sqrt(1 - f).
            Actuator::ClockCap => 1.0 - (1.0 - power_fraction.clamp(0.0, 0.99)).sqrt(),
        }
    }

    fn unit(&self) -> &'static str {
        match self.params.actuator {
            Actuator::PowerLimit => "W",
            Actuator::ClockCap => "MHz",
        }
    }

    /// True when power has stayed within 5 % of its current value for the
    /// last `seconds` (and history covers that long).
    fn power_held_for(&self, now: f64, seconds: f64) -> bool {
        let Some(&current) = self.powers.back() else {
            return false;
        };
        let covered = self
            .history
            .front()
            .is_some_and(|(t0, _)| now - t0 >= seconds);
        covered
            && self
                .history
                .iter()
                .zip(&self.powers)
                .filter(|((t, _), _)| now - t <= seconds)
                .all(|(_, p)| (p - current).abs() <= 0.05 * current.abs().max(1.0))
    }

    /// True when power stayed within 5 % over the history window.
    fn power_steady(&self) -> bool {
        let (lo, hi) = self
            .powers
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(*p), hi.max(*p)));
        self.powers.len() >= 2 && hi - lo <= 0.05 * hi.max(1.0)
    }

    /// Rate of change over the longer window, for "has it settled".
    fn long_slope(&self) -> f64 {
        Self::fit(self.history.iter().copied())
    }

    fn fit(points: impl Iterator<Item = (f64, f64)> + Clone) -> f64 {
        let n = points.clone().count() as f64;
        if n < 2.0 {
            return 0.0;
        }
        let mean_t = points.clone().map(|p| p.0).sum::<f64>() / n;
        let mean_y = points.clone().map(|p| p.1).sum::<f64>() / n;
        let (num, den) = points.fold((0.0, 0.0), |(num, den), (t, y)| {
            (
                num + (t - mean_t) * (y - mean_y),
                den + (t - mean_t).powi(2),
            )
        });
        if den <= f64::EPSILON { 0.0 } else { num / den }
    }

    /// One step: takes a reading, returns what to write.
    pub fn step(&mut self, obs: &Observation) -> Decision {
        let t = obs.time.as_secs_f64();
        if self.history.back().is_some_and(|(last, _)| t <= *last) {
            self.history.clear();
            self.powers.clear();
        }
        while self.history.len() >= HISTORY
            || self
                .history
                .front()
                .is_some_and(|(t0, _)| t - t0 > LONG_WINDOW.as_secs_f64())
                && self.history.len() > 4
        {
            self.history.pop_front();
            self.powers.pop_front();
        }
        self.history.push_back((t, obs.temperature_c));
        self.powers.push_back(obs.power_w.unwrap_or(self.level));
        if let Some(level) = obs.level {
            self.level = level;
        }
        let p = self.params.clone();
        let temp = obs.temperature_c;
        let slope = self.slope();
        let long_slope = self.long_slope();
        let draw = self.draw(obs);
        let power = self.power_of(obs);
        let ceiling = p.ceiling.max(p.floor);
        // Keep the model honest. At a power held for a while, rising means
        // that power heads above the current temperature, falling means
        // below, flat means here. Right after the power changed, the
        // temperature still follows the old power (and the sensor lags), so
        // nothing is inferred until the new power has held.
        self.model.saw_power(power);
        if self.power_held_for(t, POWER_HOLD_S) {
            if slope > 0.05 {
                self.model.at_least(power, temp + slope * BOUND_HORIZON_S);
            } else if slope < -0.05 {
                self.model.at_most(power, temp);
            } else if long_slope.abs() < 0.02 && self.history.len() >= 6 && self.power_steady() {
                self.model.settled(power, temp);
            }
        }
        let settles_at = self.model.settles_at(power);

        let predicted = temp + slope.max(0.0) * HORIZON_S;
        let since_write = self
            .last_write
            .map_or(f64::INFINITY, |w| t - w.as_secs_f64());
        let can_write = since_write >= p.min_write_interval.as_secs_f64();
        let unit = self.unit();

        let hot = predicted >= p.threshold_c
            || (settles_at > p.threshold_c + 0.5 && temp >= p.threshold_c - 1.0);
        if hot {
            self.state = Phase::Throttling;
            let aim = p.threshold_c - AIM_BELOW_C;
            let power_target = self.model.power_for(aim);
            let mut target = self.level_for_power(power_target, obs);
            if predicted >= p.threshold_c {
                // Hot now: cut at least a little, whatever the model says.
                target = target.min(draw.min(self.level) * (1.0 - self.level_fraction(0.03)));
            }
            let target = target.clamp(p.floor, ceiling);
            // A cut takes a while to show; cut again only on evidence that
            // the last one was not enough (still rising, or hotter).
            let evidence =
                slope > 0.1 || temp > self.last_write_temp || since_write > 2.0 * HORIZON_S;
            if can_write && evidence && self.level - target >= p.min_step {
                let reason = format!(
                    "temperature {temp:.0} °C{} >= threshold {:.0} °C",
                    if predicted > temp + 0.5 {
                        format!(" (rising {slope:.1} °C/s)")
                    } else {
                        String::new()
                    },
                    p.threshold_c
                );
                self.last_write_temp = temp;
                return self.set(target, obs.time, reason);
            }
            return Decision::Hold;
        }

        let cool_edge = p.threshold_c - p.hysteresis_c;
        if temp <= cool_edge && slope <= 0.05 && self.level < ceiling {
            self.state = Phase::Recovering;
            let not_using_it = draw < 0.85 * self.level;
            let target = if not_using_it {
                ceiling
            } else {
                let aim = p.threshold_c - AIM_BELOW_C - p.hysteresis_c / 2.0;
                let power_target = self.model.power_for(aim);
                self.level_for_power(power_target, obs)
                    .clamp(p.floor, ceiling)
            };
            if can_write && target - self.level >= p.min_step.min(ceiling - self.level).max(0.5) {
                let reason = if target >= ceiling {
                    format!(
                        "temperature {temp:.0} °C <= {cool_edge:.0} °C: back to the ceiling {ceiling:.0} {unit}"
                    )
                } else {
                    format!("temperature {temp:.0} °C <= {cool_edge:.0} °C: giving power back")
                };
                self.last_write_temp = temp;
                return self.set(target, obs.time, reason);
            }
            return Decision::Hold;
        }
        self.state = if self.level < ceiling - 0.5 {
            Phase::Throttling
        } else {
            Phase::Idle
        };
        Decision::Hold
    }

    /// Power drawn now (W); in clock mode, an estimate when not reported.
    fn power_of(&self, obs: &Observation) -> f64 {
        obs.power_w.unwrap_or(self.level)
    }

    /// The actuator level expected to make the GPU draw `power_w`.
    fn level_for_power(&self, power_w: f64, obs: &Observation) -> f64 {
        match self.params.actuator {
            Actuator::PowerLimit => power_w,
            Actuator::ClockCap => {
                let clock = obs.clock_mhz.unwrap_or(self.level).max(1.0);
                let power = self.power_of(obs).max(1.0);
                clock * (power_w.max(0.0) / power).sqrt()
            }
        }
    }

    fn set(&mut self, level: f64, at: Duration, reason: String) -> Decision {
        self.level = level;
        self.last_write = Some(at);
        if level >= self.params.ceiling - 0.5 {
            self.state = Phase::Idle;
        }
        Decision::Set { level, reason }
    }
}

/// What the governor believes about the GPU's heat: it settles at
/// `anchor.temperature + resistance * (power - anchor.power)`.
///
/// The anchor is the last point the GPU was seen settled at (at first, an
/// idle GPU at the ambient guess); the resistance starts at the prior and is
/// learned from how the temperature responds at other powers. Readings
/// bound the model: a rising temperature means the current power settles
/// higher than now, a falling one lower.
#[derive(Debug, Clone)]
struct ThermalModel {
    anchor_power_w: f64,
    anchor_c: f64,
    resistance: f64,
    prior: f64,
    /// With an unknown power rating: the assumed rise at peak power.
    headroom_c: Option<f64>,
    peak_power_w: f64,
    /// The resistance has been learned from readings.
    learned: bool,
    /// The anchor is a real settled reading, not the initial guess (no
    /// resistance is learned against a guess).
    anchor_seen: bool,
}

impl ThermalModel {
    fn new(ambient_c: f64, prior: ThermalPrior) -> Self {
        let (prior, headroom_c) = match prior {
            ThermalPrior::ResistanceCPerW(r) if r.is_finite() && r > 0.0 => (r, None),
            ThermalPrior::HeadroomC(h) if h.is_finite() && h > 0.0 => (h / 100.0, Some(h)),
            _ => (0.1, None),
        };
        Self {
            anchor_power_w: 0.0,
            anchor_c: ambient_c,
            resistance: prior,
            prior,
            headroom_c,
            peak_power_w: 0.0,
            learned: false,
            anchor_seen: false,
        }
    }

    /// Tracks the highest power seen; with an unknown rating that sets the
    /// prior (a GPU is built to stay cool enough at the most it draws).
    fn saw_power(&mut self, power: f64) {
        if power <= self.peak_power_w {
            return;
        }
        self.peak_power_w = power;
        if let Some(headroom) = self.headroom_c {
            self.prior = headroom / power.max(10.0);
            if !self.learned {
                self.resistance = self.prior;
            }
        }
    }

    fn clamp(&self, r: f64) -> f64 {
        r.clamp(0.4 * self.prior, 3.0 * self.prior)
    }

    /// Whether `power` is far enough from the anchor to learn the resistance.
    fn far(&self, power: f64) -> bool {
        (power - self.anchor_power_w).abs() > 0.15 * power.max(self.anchor_power_w).max(1.0)
    }

    fn settles_at(&self, power: f64) -> f64 {
        self.anchor_c + self.resistance * (power - self.anchor_power_w)
    }

    fn power_for(&self, temperature: f64) -> f64 {
        self.anchor_power_w + (temperature - self.anchor_c) / self.resistance
    }

    /// The GPU at `power` settles at `temperature` or above.
    fn at_least(&mut self, power: f64, temperature: f64) {
        if self.settles_at(power) >= temperature {
            return;
        }
        if self.anchor_seen && self.far(power) && power > self.anchor_power_w {
            let needed = (temperature - self.anchor_c) / (power - self.anchor_power_w);
            self.resistance = self.clamp(self.resistance.max(needed));
            self.learned = true;
        }
        let short = temperature - self.settles_at(power);
        if short > 0.0 {
            self.anchor_c += short;
        }
    }

    /// The GPU at `power` settles at `temperature` or below.
    fn at_most(&mut self, power: f64, temperature: f64) {
        if self.settles_at(power) <= temperature {
            return;
        }
        if self.anchor_seen && self.far(power) && power > self.anchor_power_w {
            let allowed = (temperature - self.anchor_c) / (power - self.anchor_power_w);
            self.resistance = self.clamp(self.resistance.min(allowed));
            self.learned = true;
        }
        let over = self.settles_at(power) - temperature;
        if over > 0.0 {
            self.anchor_c -= over;
        }
    }

    /// The GPU sits settled at `temperature` while drawing `power`.
    fn settled(&mut self, power: f64, temperature: f64) {
        if self.anchor_seen && self.far(power) {
            let r = (temperature - self.anchor_c) / (power - self.anchor_power_w);
            if r.is_finite() && r > 0.0 {
                self.resistance = self.clamp(r);
                self.learned = true;
            }
        }
        self.anchor_power_w = power;
        self.anchor_c = temperature;
        self.anchor_seen = true;
    }
}
