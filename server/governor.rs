//! The thermal governor: a pure state machine per GPU that decides the power
//! limit (or, where the limit cannot be set, a graphics clock cap) from
//! temperature and power readings.
//!
//! It has no clock, no runtime and no device: [`Governor::step`] takes one
//! [`Observation`] (stamped with the device's own clock) and returns what to
//! write, if anything. The control plane feeds it and carries out its
//! decisions, so the same code runs in the daemon, in unit tests and in the
//! scenario runner that produces the README's plots.
//!
//! # The law
//!
//! Temperature is a first-order response to power: it heads for
//! `ambient + R * power` with a time constant. The governor works in power,
//! and aims to hold the GPU *at* its threshold under sustained load — the
//! die settled [`AIM_BELOW_C`] under it, so the whole-degree sensor reads
//! `threshold - 1` or `threshold` — not a safe margin under it: the margin
//! is throughput the operator paid for.
//!
//! * **Segments.** Readings at one power form a segment. Once they span a
//!   few degrees, an exponential is fitted to them ([`Segment::fit`]): where
//!   this power settles, long before it gets there, and the time constant.
//!   Flat for three time constants (or, with none learned, for as long as it
//!   took to get flat) counts as settled. Either makes the segment *known*.
//! * **Response fit** ([`Response`]): over the last half minute, whatever the
//!   power did, ambient, resistance and the die's and sensor's lags are
//!   fitted together; once where the current power settles (and where the
//!   power that settles at the aim does) is pinned down, the segment is
//!   known seconds after a cut, while the temperature still moves. A fit
//!   a little less sure ([`RESPONSE_PROVISIONAL_C`]) that has seen a whole
//!   fitted time constant since the power changed backs only a raise, aimed
//!   lower by its excess uncertainty: a fast GPU gets its power back a
//!   reading or two sooner after the cautious first cut.
//! * **Hot** — a reading over `threshold + 1`, a rise towards it at a power
//!   the model does not vouch for (for a slow GPU whose readings tick by a
//!   single degree, the rise over the long window: [`Governor::rise_slope`]),
//!   or a known segment settling over the
//!   threshold: cut to the power the model says settles at
//!   [`CUT_AIM_BELOW_C`] under the threshold. Before
//!   the resistance is learned the cut assumes it is [`PRIOR_ERROR`] higher
//!   than the prior (under-cooled rather than overshooting); repeated cuts
//!   with the reading still over the line grow.
//! * **Trim** — a known segment settling more than [`TRIM_BELOW_C`] under the
//!   threshold while the GPU presses against its limit: raise to the aim.
//!   Each new power gets its own fit, so trims step towards the threshold
//!   (integral action in steps, the deadband sized to whole degrees, no
//!   raise while the workload does not use the limit).
//! * **Cool** — at or below `threshold - hysteresis`: when the workload no
//!   longer uses the limit, straight back to the ceiling; otherwise a raise
//!   towards the aim.
//!
//! Writes are rate-limited (`min_write_interval`) and only made when the
//! change is at least `min_step`. The limit never leaves `[floor, ceiling]`.
//! The previous law (cut to 1 °C under, hold until `threshold - hysteresis`)
//! is kept as `governor_v1` in test builds, for side-by-side comparison.

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
/// A time constant this many slope windows long is slow: its readings
/// within one window span a degree or less, so see [`Governor::rise_slope`].
const SLOW_TAU_WINDOWS: f64 = 8.0;
/// Window for judging whether the temperature has settled.
const LONG_WINDOW: Duration = Duration::from_secs(10);
/// How far ahead a rising temperature is surely going (a lower bound for
/// any GPU whose time constant is at least this).
const BOUND_HORIZON_S: f64 = 1.5;
/// A rise over the recent window at least this wide is read as a curve
/// that may bend (see `bound_rise`).
const BENDING_SPAN_C: f64 = 3.0;
/// How long power must hold before readings say anything about where that
/// power settles (the sensor's lag plus the power reading's averaging).
const POWER_HOLD_S: f64 = 2.5;
/// How far ahead the governor looks when judging "hot".
const HORIZON_S: f64 = 2.0;
/// The governor aims the settled die temperature this far below the
/// threshold. The sensor reads whole degrees: a die anywhere in
/// `[threshold - 1.5, threshold + 0.5)` reads `threshold - 1` or
/// `threshold`, and from `threshold + 0.5` it reads over. The aim is the
/// highest that keeps a prediction off by the response fit's largest
/// accepted error ([`RESPONSE_MAX_UNCERTAINTY_C`]) from reading over.
const AIM_BELOW_C: f64 = RESPONSE_MAX_UNCERTAINTY_C - 0.5;
/// A cut for heat is made on the prior and on bounds from a rising
/// reading, not on a response fit: it aims lower, the middle of the
/// readings `threshold - 1` and `threshold`, and the trim gives back the
/// rest once the fit has seen the cut's curve.
const CUT_AIM_BELOW_C: f64 = 0.4;
/// Readings this far above the threshold count as hot (the sensor's whole
/// degrees: `threshold` itself is on target).
const HOT_ABOVE_C: f64 = 1.0;
/// A settled temperature predicted this far below the threshold, with the
/// GPU pressing against its limit, is power given away: raise.
const TRIM_BELOW_C: f64 = 1.2;
/// With no time constant learned yet, readings flat (within a degree) at one
/// power for this long count as settled.
const UNKNOWN_TAU_FLAT_S: f64 = 6.0;
/// How far the thermal prior may be off (a fraction): the cut made before
/// anything is learned assumes the resistance is this much higher.
const PRIOR_ERROR: f64 = 0.4;
/// Most points kept for the current constant-power segment.
const SEGMENT_POINTS: usize = 400;
/// Smallest spread of readings (°C) over a segment before a curve is fitted
/// to it: less is mostly the sensor's rounding.
const FIT_MIN_SPREAD_C: f64 = 3.0;

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
    /// Readings since power last changed: what the fit sees.
    segment: Segment,
    /// Cuts in a row made with the reading over the line: each one cuts
    /// harder, so a model that is wrong is overruled in a few writes.
    over_cuts: u32,
    /// The thermal time constant, once a fit has seen it (seconds).
    tau_s: Option<f64>,
    /// The sensor's lag behind the die, once a response fit has seen it
    /// (seconds).
    lag_s: f64,
    /// The last cut was for heat and the GPU has not cooled below
    /// `threshold - hysteresis` since: the node budget counts the GPU as
    /// held by heat, not by its share.
    hot_hold: bool,
    /// Readings and power over the last half minute, for the response fit.
    response: Response,
    /// How much lower (°C) a trim aims: the excess uncertainty of the
    /// provisional response fit behind the model, 0 otherwise.
    trim_margin_c: f64,
    /// The last write raised the level.
    last_raised: bool,
    /// A level the governor raised to itself and then had to cut from for
    /// heat, and when (s): a trim goes at most halfway back to it, so a
    /// model that a reading's rounding moves by a degree either way homes
    /// in on the level between instead of swinging across it every few
    /// seconds. Forgotten back at the ceiling, and after
    /// [`TOO_HOT_MEMORY_TAUS`] time constants.
    too_hot: Option<(f64, f64)>,
}

/// With the reading over the line but no hotter than at the last cut, how
/// long (time constants, once one is known) a cut is given to show before
/// another: a slow GPU's reading barely turns within the few seconds of
/// [`POWER_HOLD_S`], and cutting again every few seconds then piles cut on
/// cut (a hotter reading still cuts at once).
const OVER_WAIT_TAUS: f64 = 0.25;

/// How long (time constants, at least [`TOO_HOT_MEMORY_MIN_S`]) a level cut
/// from for heat caps the trims: long enough to outlast the rounding's
/// swing, short enough that a change of ambient or workload is not held
/// against the GPU for long.
const TOO_HOT_MEMORY_TAUS: f64 = 15.0;
const TOO_HOT_MEMORY_MIN_S: f64 = 30.0;

/// Readings at one power, from the moment it was reached.
#[derive(Debug, Clone, Default)]
struct Segment {
    /// Power (W) the segment is at.
    power_w: f64,
    /// When it started (s).
    start_s: f64,
    /// (time s, temperature °C), decimated to fit [`SEGMENT_POINTS`].
    points: Vec<(f64, f64)>,
    /// Spacing of kept points (s); doubles when the segment fills.
    spacing_s: f64,
    /// The segment's curve has already been handed to the model.
    fitted: bool,
    /// The response fit vouches for where this power settles, while the
    /// temperature still moves.
    predicted: bool,
}

impl Segment {
    fn restart(&mut self, power_w: f64, at_s: f64) {
        self.power_w = power_w;
        self.start_s = at_s;
        self.points.clear();
        self.spacing_s = 0.2;
        self.fitted = false;
        self.predicted = false;
    }

    fn push(&mut self, at_s: f64, temperature_c: f64) {
        if at_s - self.start_s < POWER_HOLD_S {
            // The temperature still follows the previous power (and the
            // power reading its average): not this segment's curve yet.
            return;
        }
        if self
            .points
            .last()
            .is_some_and(|(t, _)| at_s - t < self.spacing_s)
        {
            return;
        }
        if self.points.len() >= SEGMENT_POINTS {
            let kept: Vec<_> = self.points.iter().copied().step_by(2).collect();
            self.points = kept;
            self.spacing_s *= 2.0;
        }
        self.points.push((at_s, temperature_c));
    }

    fn duration_s(&self) -> f64 {
        match (self.points.first(), self.points.last()) {
            (Some(a), Some(b)) => b.0 - a.0,
            _ => 0.0,
        }
    }

    fn spread_c(&self) -> f64 {
        let (lo, hi) = self
            .points
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), (_, y)| {
                (lo.min(*y), hi.max(*y))
            });
        if self.points.is_empty() { 0.0 } else { hi - lo }
    }

    fn mean_c(&self, last_s: f64) -> f64 {
        let end = self.points.last().map_or(0.0, |p| p.0);
        let recent: Vec<f64> = self
            .points
            .iter()
            .filter(|(t, _)| end - t <= last_s)
            .map(|p| p.1)
            .collect();
        recent.iter().sum::<f64>() / recent.len().max(1) as f64
    }

    /// Fits `temperature = settled + b * exp(-t / tau)` to the segment: a
    /// first-order response at constant power. Returns (settled °C, tau s)
    /// when the curve is clear enough to extrapolate from.
    fn fit(&self) -> Option<(f64, f64)> {
        let duration = self.duration_s();
        if self.points.len() < 8 || duration < 2.0 || self.spread_c() < FIT_MIN_SPREAD_C {
            return None;
        }
        // The start of a segment carries the sensor's lag (the curve is
        // S-shaped there, not exponential): fit the rest.
        let from = self.points[0].0 + 0.25 * duration;
        let points: Vec<(f64, f64)> = self
            .points
            .iter()
            .copied()
            .filter(|p| p.0 >= from)
            .collect();
        let t0 = points[0].0;
        let mut best: Option<(f64, f64, f64)> = None;
        // Time constants from 0.5 s to ~400 s, 6 % apart.
        let mut tau = 0.5;
        while tau < 400.0 {
            let n = points.len() as f64;
            let (mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0);
            for (t, y) in &points {
                let x = (-(t - t0) / tau).exp();
                sx += x;
                sy += y;
                sxx += x * x;
                sxy += x * y;
            }
            let den = n * sxx - sx * sx;
            if den > 1e-12 {
                let b = (n * sxy - sx * sy) / den;
                let a = (sy - b * sx) / n;
                let sse: f64 = points
                    .iter()
                    .map(|(t, y)| {
                        let e = y - a - b * (-(t - t0) / tau).exp();
                        e * e
                    })
                    .sum();
                if best.is_none_or(|(_, _, best_sse)| sse < best_sse) {
                    best = Some((a, tau, sse));
                }
            }
            tau *= 1.06;
        }
        let (settled, tau, sse) = best?;
        let rms = (sse / points.len() as f64).sqrt();
        // Extrapolating far past what was seen, or a curve that does not
        // fit (the power was not constant after all), says little.
        (tau <= 2.5 * duration && tau < 380.0 && rms < 0.6).then_some((settled, tau))
    }
}

/// Spacing of the points kept for the response fit (s).
const RESPONSE_SPACING_S: f64 = 0.25;
/// How far back the response fit looks (s).
const RESPONSE_WINDOW_S: f64 = 30.0;
/// Least time between two response fits (s of the device's clock).
const RESPONSE_EVERY_S: f64 = 0.5;
/// A power segment older than this is left to the segment fit and the
/// settled test: the window no longer holds the change that identifies it.
const RESPONSE_MAX_AGE_S: f64 = 20.0;
/// The response fit's prediction of where the current power settles is
/// used once its uncertainty (°C) is under this: well inside the
/// aim's deadband (`threshold - TRIM_BELOW_C` to `threshold + 0.5`).
const RESPONSE_MAX_UNCERTAINTY_C: f64 = 0.75;
/// How sure the response fit must be (°C) of where the power that settles
/// at the aim settles, before it is used: a looser bound than for the
/// current power, since a trim is followed by the next fit at the new power
/// (and the hot rule), but tight enough that a resistance the readings do
/// not pin down is never extrapolated from.
const RESPONSE_MAX_EXTRAPOLATION_C: f64 = 1.5;
/// A response fit whose uncertainty exceeds the bounds above by at most
/// this (°C) is provisional: it backs only a raise from a power it says
/// settles clearly under the trim line, aimed lower by the excess, and only
/// once the readings since the power changed span the fitted time constant
/// (the fit interpolates the curve rather than extrapolating it): a fast
/// GPU cut deep by the cautious first cut is given power back a reading or
/// two earlier, with its overshoot bounded by the fit's own error, while a
/// slow one waits for a fit that needs no allowance.
const RESPONSE_PROVISIONAL_C: f64 = 1.0;
/// Time constant of the power reading's average (NVML's reading on recent
/// GPUs averages about a second): the response fit undoes it.
const POWER_AVERAGE_S: f64 = 1.0;
/// Sensor lags tried by the response fit (s).
const RESPONSE_LAGS_S: [f64; 7] = [0.0, 0.4, 0.8, 1.3, 2.0, 3.0, 4.5];

/// Readings with the power that produced them, over the last
/// [`RESPONSE_WINDOW_S`], whatever the power did: what the response fit
/// sees.
///
/// Unlike a [`Segment`], this needs no constant power: the temperature of a
/// first-order die behind a first-order sensor is linear in ambient,
/// resistance and the starting temperature for any power history, so one
/// least-squares fit per pair of time constants (die, sensor) identifies
/// the resistance from the cut itself, seconds after it, rather than after
/// the GPU has settled. That is what lets a GPU with a time constant of a
/// few seconds be trimmed to its threshold while it is still under load.
#[derive(Debug, Clone, Default)]
struct Response {
    /// (time s, sensor °C, power reading W, most the GPU could draw W).
    points: VecDeque<(f64, f64, f64, f64)>,
    last_fit_s: Option<f64>,
}

/// What a response fit found.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ResponseFit {
    /// Where the current power settles (°C).
    settles_c: f64,
    /// °C/W.
    resistance: f64,
    /// The slower time constant (s).
    tau_s: f64,
    /// The faster one: the sensor's lag (s).
    lag_s: f64,
    /// How far (°C) the fit's uncertainty exceeds what is needed to act on
    /// it outright (0 when within); up to [`RESPONSE_PROVISIONAL_C`], the
    /// fit only backs a raise aimed this much lower.
    excess_c: f64,
}

impl Response {
    fn clear(&mut self) {
        self.points.clear();
        self.last_fit_s = None;
    }

    /// `power_w` is the power reading (an average, see
    /// [`POWER_AVERAGE_S`]); `cap_w` what the limit in force lets the GPU
    /// draw (infinite when the power limit is not what is moved).
    fn push(&mut self, at_s: f64, temperature_c: f64, power_w: f64, cap_w: f64) {
        if self
            .points
            .back()
            .is_some_and(|last| at_s - last.0 < RESPONSE_SPACING_S)
        {
            return;
        }
        self.points.push_back((at_s, temperature_c, power_w, cap_w));
        while self
            .points
            .front()
            .is_some_and(|p| at_s - p.0 > RESPONSE_WINDOW_S)
        {
            self.points.pop_front();
        }
    }

    /// Whether a fit is worth running now.
    fn due(&self, now_s: f64) -> bool {
        self.last_fit_s
            .is_none_or(|last| now_s - last >= RESPONSE_EVERY_S)
    }

    /// Fits `sensor = f(ambient + R * power)` through a die lag and a sensor
    /// lag to the window, and returns where `power_now` settles, when the
    /// window pins it down to [`RESPONSE_MAX_UNCERTAINTY_C`]: over every
    /// pair of lags whose fit is about as good as the best (within four
    /// times the residual variance, the sensor's rounding at least), the
    /// predictions must agree, and the best fit's own parameter error must
    /// be small too. Resistances outside `r_range` are not believed.
    fn fit(
        &mut self,
        now_s: f64,
        power_now: f64,
        aim_c: f64,
        r_range: (f64, f64),
    ) -> Option<ResponseFit> {
        self.last_fit_s = Some(now_s);
        let n = self.points.len();
        if n < 10 {
            return None;
        }
        let (p_lo, p_hi) = self
            .points
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.2), hi.max(p.2)));
        // Ambient and resistance are told apart only by a change of power.
        if p_hi - p_lo < 0.15 * p_hi.max(1.0) {
            return None;
        }
        let span = self.points.back()?.0 - self.points.front()?.0;
        let tau_max = (3.0 * span).min(400.0);
        let mut tried: Vec<PairFit> = Vec::new();
        let mut tau = 0.5;
        while tau <= tau_max {
            for lag in RESPONSE_LAGS_S.into_iter().filter(|l| *l <= tau) {
                tried.extend(self.fit_one(tau, lag));
            }
            tau *= 1.12;
        }
        let best = *tried.iter().min_by(|a, b| a.sse.total_cmp(&b.sse))?;
        // Finer around the best pair.
        for tau_factor in [0.94, 1.0, 1.06] {
            for lag_factor in [0.8, 1.0, 1.25] {
                let (tau, lag) = (best.tau * tau_factor, best.lag * lag_factor);
                if (tau_factor, lag_factor) == (1.0, 1.0) || lag > tau {
                    continue;
                }
                tried.extend(self.fit_one(tau, lag));
            }
        }
        let best = *tried.iter().min_by(|a, b| a.sse.total_cmp(&b.sse))?;
        let sigma2 = (best.sse / (n - 3) as f64).max(1.0 / 12.0);
        let rms = (best.sse / n as f64).sqrt();
        if rms > 0.6 || best.tau >= tau_max / 1.12 || !(r_range.0..=r_range.1).contains(&best.r) {
            return None;
        }
        // Both where the current power settles and where the power that
        // settles at the aim does (what a trim would write) must be pinned
        // down: the second is what a poorly identified resistance gets
        // wrong while the first is plain to see.
        let aim_power = (aim_c - best.ambient) / best.r;
        let excess_c = [
            (power_now, RESPONSE_MAX_UNCERTAINTY_C),
            (aim_power, RESPONSE_MAX_EXTRAPOLATION_C),
        ]
        .into_iter()
        .map(|(power, allowed)| {
            let settles = best.settles(power);
            let spread = tried
                .iter()
                .filter(|x| x.sse <= best.sse + 4.0 * sigma2)
                .map(|x| (x.settles(power) - settles).abs())
                .fold(0.0, f64::max);
            spread + 2.0 * (sigma2 * best.variance(power)).sqrt() - allowed
        })
        .fold(0.0, f64::max);
        (excess_c <= RESPONSE_PROVISIONAL_C).then_some(ResponseFit {
            settles_c: best.settles(power_now),
            resistance: best.r,
            tau_s: best.tau,
            lag_s: best.lag,
            excess_c,
        })
    }

    /// Least squares for one pair of lags.
    fn fit_one(&self, tau: f64, lag: f64) -> Option<PairFit> {
        // Three responses, each (die, sensor): to ambient 1 °C, to the
        // power history at 1 °C/W, and to a start 1 °C above zero.
        let mut state = [[0.0f64; 2]; 3];
        state[2] = [1.0, 1.0];
        let mut ata = [[0.0f64; 3]; 3];
        let mut aty = [0.0f64; 3];
        let mut yy = 0.0;
        let mut prev: Option<(f64, f64, f64)> = None;
        for &(t, y, reading, cap) in &self.points {
            if let Some((t0, reading0, cap0)) = prev {
                let h: f64 = t - t0;
                // The power over the interval: the reading is an average,
                // so what moved it is the change over what an average of
                // a constant power would have moved it; never more than
                // the limits in force over the interval let through.
                let p = (reading0 + (reading - reading0) / (1.0 - (-h / POWER_AVERAGE_S).exp()))
                    .min(cap.max(cap0))
                    .max(0.0);
                let a = (-h / tau).exp();
                let (b, k) = if lag <= 1e-9 {
                    (0.0, a)
                } else if (tau - lag).abs() < 1e-6 {
                    (a, h / tau * a)
                } else {
                    let b = (-h / lag).exp();
                    (b, tau / (tau - lag) * (a - b))
                };
                for (j, s) in state.iter_mut().enumerate() {
                    let u = match j {
                        0 => 1.0,
                        1 => p,
                        _ => 0.0,
                    };
                    let (d, se) = (s[0], s[1]);
                    s[0] = u + (d - u) * a;
                    s[1] = u + (se - u) * b + (d - u) * k;
                }
            }
            prev = Some((t, reading, cap));
            let x = [state[0][1], state[1][1], state[2][1]];
            for i in 0..3 {
                for j in 0..3 {
                    ata[i][j] += x[i] * x[j];
                }
                aty[i] += x[i] * y;
            }
            yy += y * y;
        }
        let inv = invert3(&ata)?;
        let theta: Vec<f64> = (0..3)
            .map(|i| (0..3).map(|j| inv[i][j] * aty[j]).sum())
            .collect();
        let (ambient, r) = (theta[0], theta[1]);
        if r.is_nan() || r <= 0.0 {
            return None;
        }
        let sse = (yy - (0..3).map(|i| theta[i] * aty[i]).sum::<f64>()).max(0.0);
        Some(PairFit {
            sse,
            ambient,
            r,
            inv: [[inv[0][0], inv[0][1]], [inv[1][0], inv[1][1]]],
            tau,
            lag,
        })
    }
}

/// The least-squares fit for one pair of lags.
#[derive(Debug, Clone, Copy)]
struct PairFit {
    sse: f64,
    ambient: f64,
    /// °C/W.
    r: f64,
    /// The (ambient, resistance) block of the inverse normal matrix.
    inv: [[f64; 2]; 2],
    tau: f64,
    lag: f64,
}

impl PairFit {
    fn settles(&self, power: f64) -> f64 {
        self.ambient + self.r * power
    }

    /// Variance of [`PairFit::settles`] per unit residual variance.
    fn variance(&self, power: f64) -> f64 {
        let c = [1.0, power];
        (0..2)
            .map(|i| (0..2).map(|j| c[i] * self.inv[i][j] * c[j]).sum::<f64>())
            .sum::<f64>()
            .max(0.0)
    }
}

/// The inverse of a symmetric 3×3 matrix, if it is well enough conditioned.
fn invert3(m: &[[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let c00 = m[1][1] * m[2][2] - m[1][2] * m[2][1];
    let c01 = m[1][2] * m[2][0] - m[1][0] * m[2][2];
    let c02 = m[1][0] * m[2][1] - m[1][1] * m[2][0];
    let det = m[0][0] * c00 + m[0][1] * c01 + m[0][2] * c02;
    let scale = m[0][0] * m[1][1] * m[2][2];
    if !det.is_finite() || det.abs() <= 1e-9 * scale.abs() {
        return None;
    }
    let inv = [
        [
            c00 / det,
            (m[0][2] * m[2][1] - m[0][1] * m[2][2]) / det,
            (m[0][1] * m[1][2] - m[0][2] * m[1][1]) / det,
        ],
        [
            c01 / det,
            (m[0][0] * m[2][2] - m[0][2] * m[2][0]) / det,
            (m[0][2] * m[1][0] - m[0][0] * m[1][2]) / det,
        ],
        [
            c02 / det,
            (m[0][1] * m[2][0] - m[0][0] * m[2][1]) / det,
            (m[0][0] * m[1][1] - m[0][1] * m[1][0]) / det,
        ],
    ];
    Some(inv)
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
            segment: Segment::default(),
            over_cuts: 0,
            tau_s: None,
            lag_s: 0.0,
            hot_hold: false,
            response: Response::default(),
            trim_margin_c: 0.0,
            last_raised: false,
            too_hot: None,
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

    /// Tells the governor its last write did not land: `in_force` is what
    /// was last written (or read). It decided as if its write had landed;
    /// without this, a failed raise to the ceiling would leave it believing
    /// the GPU is there while the GPU stays held down (with a limit that
    /// cannot be read back, nothing else would correct it). The time of the
    /// attempt still counts for the rate limit.
    pub fn write_failed(&mut self, in_force: f64) {
        if !in_force.is_finite() {
            return;
        }
        self.level = in_force.clamp(
            self.params.floor,
            self.params.ceiling.max(self.params.floor),
        );
        self.state = if self.is_lowered() {
            Phase::Throttling
        } else {
            Phase::Idle
        };
    }

    /// True when heat, not the ceiling, holds the GPU where it is: the last
    /// cut was for heat and the GPU has not cooled off since.
    pub fn holds_for_heat(&self) -> bool {
        self.hot_hold
    }

    /// True when the governor holds the GPU below its ceiling.
    pub fn is_lowered(&self) -> bool {
        self.level < self.params.ceiling - 0.5
    }

    /// The readings of the recent window (at least four), newest first.
    fn recent(&self) -> impl Iterator<Item = (f64, f64)> + Clone + '_ {
        self.newest(SLOPE_WINDOW.as_secs_f64(), 4)
    }

    /// The readings of the last `window_s` seconds (at least `at_least`),
    /// newest first.
    fn newest(
        &self,
        window_s: f64,
        at_least: usize,
    ) -> impl Iterator<Item = (f64, f64)> + Clone + '_ {
        let t_end = self.history.back().map_or(0.0, |p| p.0);
        self.history
            .iter()
            .rev()
            .enumerate()
            .take_while(move |(i, (t, _))| *i < at_least || t_end - t <= window_s)
            .map(|(_, p)| *p)
    }

    /// Lowest and highest reading of `points`, and how many there are.
    fn span(points: impl Iterator<Item = (f64, f64)>) -> (f64, f64, usize) {
        points.fold((f64::INFINITY, f64::NEG_INFINITY, 0), |(lo, hi, n), p| {
            (lo.min(p.1), hi.max(p.1), n + 1)
        })
    }

    /// Rate of temperature change over the recent window, °C/s.
    fn slope(&self) -> f64 {
        Self::fit(self.recent())
    }

    /// The rise a lower bound on where this power settles is drawn from. A
    /// fast GPU heating by degrees within the recent window bends towards
    /// where it settles: the window's slope still carries the steep start of
    /// the window (at τ = 2 s about twice the slope now), so the bound is
    /// drawn from the slope over the newer half of the window (at least two
    /// readings) when that is lower. A rise within a degree or two keeps the
    /// window's slope: over a few whole-degree readings the newer half's
    /// slope is mostly the sensor's rounding.
    fn bound_rise(&self, rise: f64) -> f64 {
        let (lo, hi, _) = Self::span(self.recent());
        if hi - lo < BENDING_SPAN_C {
            return rise;
        }
        let newer_half = Self::fit(self.newest(SLOPE_WINDOW.as_secs_f64() / 2.0, 2));
        rise.min(newer_half.max(0.0))
    }

    /// The rate of rise a prediction is made on. A slow GPU's reading moves
    /// by a whole degree every many seconds, so when the recent window's
    /// readings span a single degree its slope is mostly where in it the
    /// sensor ticked over (a tick at its end reads as 0.5 °C/s): then the
    /// rise over the long window, which sees the ticks before, is the
    /// evidence. A GPU fast enough to heat by degrees within the window
    /// keeps the window's slope.
    fn rise_slope(&self, short: f64) -> f64 {
        let window = SLOPE_WINDOW.as_secs_f64();
        let slow = self
            .tau_s
            .is_some_and(|tau| tau >= SLOW_TAU_WINDOWS * window);
        if !slow {
            return short;
        }
        let (lo, hi, n) = Self::span(self.recent());
        if hi - lo <= 1.0 && self.history.len() > n {
            short.min(self.long_slope().max(0.0))
        } else {
            short
        }
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

    /// With no time constant known: the readings have stayed within a
    /// degree for at least as long as they took to get there since the
    /// power last changed (at least 3 s). A first-order response that moved
    /// for `m` seconds and then held still as long is within a fraction of
    /// a degree of where it settles.
    fn flat_for_as_long_as_it_moved(&self, now: f64) -> bool {
        let (mut lo, mut hi) = (f64::MAX, f64::MIN);
        let mut flat_since = None;
        for (t, y) in self.history.iter().rev() {
            lo = lo.min(*y);
            hi = hi.max(*y);
            if hi - lo > 1.0 {
                break;
            }
            flat_since = Some(*t);
        }
        let Some(flat_since) = flat_since else {
            return false;
        };
        if self
            .history
            .front()
            .is_some_and(|(t0, _)| *t0 >= flat_since)
        {
            // Flat for all the history holds: the other tests judge that.
            return false;
        }
        let moving = (flat_since - self.segment.start_s).max(0.0);
        now - flat_since >= moving.max(3.0) && now - self.segment.start_s >= POWER_HOLD_S + 3.0
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
            self.response.clear();
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
        // What is read in force overrules what the governor believes it
        // wrote, before anything (the draw's bound below) is judged by it.
        if let Some(level) = obs.level.filter(|l| l.is_finite()) {
            self.level = level;
        }
        self.history.push_back((t, obs.temperature_c));
        self.powers
            .push_back(obs.power_w.unwrap_or(self.level).min(self.level.max(1.0)));
        let p = self.params.clone();
        let temp = obs.temperature_c;
        let slope = self.slope();
        let rise = self.rise_slope(slope);
        let long_slope = self.long_slope();
        let draw = self.draw(obs);
        // The power reading is an average that lags a cut by a second or
        // so; what the GPU draws now is at most the limit in force.
        // Right after a write, a reading heading for the new limit means the
        // GPU already draws it.
        let since_write_s = self
            .last_write
            .map_or(f64::INFINITY, |w| t - w.as_secs_f64());
        let power = match p.actuator {
            Actuator::PowerLimit => {
                let reading = self.power_of(obs);
                if since_write_s < POWER_HOLD_S && reading >= 0.75 * self.level {
                    self.level
                } else {
                    reading.min(self.level)
                }
            }
            Actuator::ClockCap => self.power_of(obs),
        };
        let ceiling = p.ceiling.max(p.floor);
        // A new power (a write landed, or the workload changed) starts a new
        // segment: the readings from here on trace that power's curve.
        if self.segment.points.is_empty() && self.segment.start_s == 0.0
            || (power - self.segment.power_w).abs() > 0.03 * self.segment.power_w.max(10.0)
        {
            self.segment.restart(power, t);
            self.trim_margin_c = 0.0;
            self.model.begin_segment();
        }
        self.segment.push(t, temp);
        // Keep the model honest. A segment whose curve is clear says where
        // its power settles long before it gets there (the fit also learns
        // the time constant); otherwise, at a power held for a while, rising
        // means that power heads above the current temperature, falling
        // means below, flat for three time constants means here.
        self.model.saw_power(power);
        if let Some((settled_c, tau)) = self.segment.fit() {
            self.tau_s = Some(self.tau_s.map_or(tau, |old| 0.5 * (old + tau)));
            self.model.settles_from_fit(power, settled_c);
            self.trim_margin_c = 0.0;
            self.segment.fitted = true;
        } else if self.power_held_for(t, POWER_HOLD_S) {
            if slope > 0.05 {
                let bound_rise = self.bound_rise(rise);
                self.model.at_least(power, temp + bound_rise * BOUND_HORIZON_S);
            } else if slope < -0.05 {
                self.model.at_most(power, temp);
            }
            let flat_for = self
                .tau_s
                .map_or(LONG_WINDOW.as_secs_f64(), |tau| 3.0 * tau);
            let settled = match self.tau_s {
                Some(_) => {
                    self.segment.duration_s() >= flat_for && {
                        // The last time constant's readings, all within a degree.
                        let mean = self.segment.mean_c(flat_for / 3.0);
                        (temp - mean).abs() <= 1.0 && long_slope.abs() < 0.05
                    }
                }
                // No time constant seen yet: flat for a while at one power.
                None => {
                    self.segment.duration_s() >= UNKNOWN_TAU_FLAT_S
                        && self.segment.spread_c() <= 1.0
                        || self.flat_for_as_long_as_it_moved(t)
                        || long_slope.abs() < 0.02 && self.history.len() >= 6 && self.power_steady()
                }
            };
            if settled && slope.abs() <= 0.05 {
                let mean = match self.tau_s {
                    Some(_) => self.segment.mean_c(flat_for / 3.0),
                    None => temp,
                };
                self.model.settled(power, mean);
                self.trim_margin_c = 0.0;
                self.segment.fitted = true;
            }
        }
        // The response fit: where this power settles, from the whole recent
        // history (the cut and the curve after it), while that history
        // still holds the change that tells ambient from resistance.
        self.response.push(
            t,
            temp,
            self.power_of(obs),
            match p.actuator {
                Actuator::PowerLimit => self.level,
                Actuator::ClockCap => f64::INFINITY,
            },
        );
        let age = t - self.segment.start_s;
        if (self.level < ceiling - 0.5 || temp >= p.threshold_c - p.hysteresis_c)
            && (0.5..=RESPONSE_MAX_AGE_S).contains(&age)
            && self.response.due(t)
            && let Some(fit) = self.response.fit(
                t,
                power,
                p.threshold_c - AIM_BELOW_C,
                self.model.resistance_range(),
            )
            && (fit.excess_c <= 0.0
                || fit.tau_s <= age.max(since_write_s)
                    && fit.settles_c + RESPONSE_MAX_UNCERTAINTY_C + fit.excess_c
                        <= p.threshold_c - TRIM_BELOW_C)
        {
            self.trim_margin_c = fit.excess_c;
            self.model
                .settles_from_response(power, fit.settles_c, fit.resistance);
            self.tau_s = Some(fit.tau_s);
            self.lag_s = fit.lag_s;
            self.segment.fitted = true;
            self.segment.predicted = true;
        }
        let settles_at = self.model.settles_at(power);
        let known = self.segment.fitted;

        let predicted = temp + rise.max(0.0) * HORIZON_S;
        let since_write = self
            .last_write
            .map_or(f64::INFINITY, |w| t - w.as_secs_f64());
        let can_write = since_write >= p.min_write_interval.as_secs_f64();
        let unit = self.unit();
        let hot_line = p.threshold_c + HOT_ABOVE_C;
        let aim = p.threshold_c - AIM_BELOW_C;
        let cut_aim = p.threshold_c - CUT_AIM_BELOW_C;

        // Hot: a reading over the line; or rising towards it at a power the
        // model does not vouch for; or the model says this power settles
        // over the threshold's reading (far over, to act before the reading
        // gets there).
        let over_settle = settles_at >= p.threshold_c + 0.5 && temp >= p.threshold_c && known
            || settles_at >= p.threshold_c + 2.0 && temp >= p.threshold_c - 1.0;
        // The model vouches for a power it chose itself, or one whose curve
        // it has seen; not for the ceiling it has never held the GPU at.
        let vouched = settles_at <= p.threshold_c && (known || self.level < ceiling - 0.5);
        let hot = temp >= hot_line
            || (predicted >= hot_line && !vouched)
            // From the ceiling, rising fast: the first catch leaves a degree
            // more margin for the sensor's lag.
            || (predicted >= p.threshold_c && self.level >= ceiling - 0.5 && !vouched)
            || over_settle;
        if hot {
            self.state = Phase::Throttling;
            // A resistance not yet learned may be the prior's, which can be
            // 40 % off: the first cut assumes the worse case and the trim
            // gives back what it did not need.
            // In clock mode the level is mapped through the power reading,
            // which lags while the power moves: cautious then as well.
            let mapping_lags =
                p.actuator == Actuator::ClockCap && !self.power_held_for(t, POWER_HOLD_S);
            let power_target = if self.model.learned && !mapping_lags {
                self.model.power_for(cut_aim)
            } else {
                self.model.power_for_cautious(cut_aim, PRIOR_ERROR)
            };
            let mut target = self.level_for_power(power_target, obs);
            let over_now = temp >= hot_line;
            let settled_since_write = since_write >= POWER_HOLD_S;
            if over_now || (predicted >= hot_line && settled_since_write) {
                // Hot now: cut at least a little, whatever the model says,
                // and more each time in a row.
                let fraction = 0.03 * f64::from(self.over_cuts + 1);
                target = target.min(draw.min(self.level) * (1.0 - self.level_fraction(fraction)));
            }
            let target = target.clamp(p.floor, ceiling);
            // A cut takes a while to show; cut again only on evidence that
            // the last one was not enough (still rising, or hotter), or on a
            // new curve that says so.
            // Right after a cut the lagging sensor still rises: only a
            // reading over the line is evidence then.
            let evidence = over_now && temp > self.last_write_temp
                || over_now
                    && settled_since_write
                    && slope >= -0.05
                    && since_write >= OVER_WAIT_TAUS * self.tau_s.unwrap_or(0.0) + self.lag_s
                || settled_since_write && (slope > 0.1 || temp > self.last_write_temp)
                || since_write > 2.0 * HORIZON_S.max(self.tau_s.unwrap_or(0.0));
            if can_write && evidence && self.level - target >= p.min_step {
                let reason = if predicted >= hot_line {
                    format!(
                        "temperature {temp:.0} °C{} over threshold {:.0} °C",
                        if predicted > temp + 0.5 {
                            format!(" (rising {slope:.1} °C/s)")
                        } else {
                            String::new()
                        },
                        p.threshold_c
                    )
                } else {
                    format!(
                        "temperature {temp:.0} °C heading for {settles_at:.0} °C, over threshold {:.0} °C",
                        p.threshold_c
                    )
                };
                self.last_write_temp = temp;
                if over_now {
                    self.over_cuts = (self.over_cuts + 1).min(5);
                }
                self.hot_hold = true;
                // Cut from a level it raised to itself: remember it (the
                // cuts after it, made while the sensor still lags, prove
                // nothing about the levels they cut from).
                if self.last_raised && self.level < ceiling - 0.5 {
                    self.too_hot = Some((self.level, t));
                }
                return self.set(target, obs.time, reason);
            }
            return Decision::Hold;
        }
        if temp < p.threshold_c {
            self.over_cuts = 0;
        }

        let cool_edge = p.threshold_c - p.hysteresis_c;
        if temp <= cool_edge {
            self.hot_hold = false;
        }
        let pressing = match self.params.actuator {
            Actuator::PowerLimit => draw >= self.level - p.min_step.max(0.03 * self.level),
            Actuator::ClockCap => draw >= 0.97 * self.level,
        };
        let not_using_it = draw < 0.85 * self.level;
        // Still rising is no reason to wait when the response fit has
        // already said where this power settles.
        if self.level < ceiling && (slope <= 0.05 || self.segment.predicted) {
            // Cool and the workload no longer uses the limit: all of it back.
            // Pressing against the limit with a settled temperature (known,
            // or cool enough to be sure) under the threshold: give back what
            // settles just under it.
            let still = slope <= 0.05;
            let target = if still && temp <= cool_edge && not_using_it {
                Some(ceiling)
            } else if pressing
                && known
                && settles_at <= p.threshold_c - TRIM_BELOW_C
            {
                let aim = aim - self.trim_margin_c;
                Some(self.level_for_power(self.model.power_for(aim), obs))
            } else if still && pressing && temp <= cool_edge && since_write >= POWER_HOLD_S {
                // Cool but not settled: aim at the target only if the
                // resistance has been learned, else halfway.
                let cautious = if self.model.learned {
                    aim
                } else {
                    p.threshold_c - AIM_BELOW_C - p.hysteresis_c / 2.0
                };
                Some(self.level_for_power(self.model.power_for(cautious), obs))
            } else {
                None
            };
            let memory_s =
                (TOO_HOT_MEMORY_TAUS * self.tau_s.unwrap_or(0.0)).max(TOO_HOT_MEMORY_MIN_S);
            if self
                .too_hot
                .is_some_and(|(_, at)| t - at > memory_s || self.level >= ceiling - 0.5)
            {
                self.too_hot = None;
            }
            // All of it back (the workload let go) is never capped.
            let target = match (target, self.too_hot) {
                (Some(target), Some((hot, _))) if target < ceiling => {
                    Some(target.min(0.5 * (self.level + hot)))
                }
                (target, _) => target,
            };
            if let Some(target) = target.map(|t| t.clamp(p.floor, ceiling)) {
                self.state = Phase::Recovering;
                if can_write && target - self.level >= p.min_step.min(ceiling - self.level).max(0.5)
                {
                    let reason = if target >= ceiling {
                        format!("temperature {temp:.0} °C: back to the ceiling {ceiling:.0} {unit}")
                    } else {
                        format!(
                            "temperature {temp:.0} °C settles at {settles_at:.0} °C, under threshold {:.0} °C: giving power back",
                            p.threshold_c
                        )
                    };
                    self.last_write_temp = temp;
                    return self.set(target, obs.time, reason);
                }
                return Decision::Hold;
            }
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
        self.last_raised = level > self.level;
        self.level = level;
        self.last_write = Some(at);
        if level >= self.params.ceiling - 0.5 {
            self.too_hot = None;
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
    /// The anchor as it was when the current segment began: fits of the
    /// segment learn the resistance against it.
    base: (f64, f64, bool),
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
            base: (0.0, ambient_c, false),
        }
    }

    /// A new constant-power segment begins.
    fn begin_segment(&mut self) {
        self.base = (self.anchor_power_w, self.anchor_c, self.anchor_seen);
    }

    /// A fitted curve says the GPU at `power` settles at `temperature`.
    fn settles_from_fit(&mut self, power: f64, temperature: f64) {
        let (base_power, base_c, base_seen) = self.base;
        let far = (power - base_power).abs() > 0.15 * power.max(base_power).max(1.0);
        if base_seen && far {
            let r = (temperature - base_c) / (power - base_power);
            if r.is_finite() && r > 0.0 {
                self.resistance = self.clamp(r);
                self.learned = true;
            }
        }
        self.anchor_power_w = power;
        self.anchor_c = temperature;
        self.anchor_seen = true;
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
        let (lo, hi) = self.resistance_range();
        r.clamp(lo, hi)
    }

    /// The resistances the model believes possible (°C/W).
    fn resistance_range(&self) -> (f64, f64) {
        (0.4 * self.prior, 3.0 * self.prior)
    }

    /// A response fit says the GPU at `power` settles at `temperature`, with
    /// resistance `r` (fitted from the same readings, not against the
    /// anchor).
    fn settles_from_response(&mut self, power: f64, temperature: f64, r: f64) {
        self.resistance = self.clamp(r);
        self.learned = true;
        self.anchor_power_w = power;
        self.anchor_c = temperature;
        self.anchor_seen = true;
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

    /// The power that settles at `temperature` if the resistance were
    /// `1 + error` times what the model holds (only ever lower when cutting
    /// from above the anchor).
    fn power_for_cautious(&self, temperature: f64, error: f64) -> f64 {
        let r = self.resistance * (1.0 + error);
        self.power_for(temperature)
            .min(self.anchor_power_w + (temperature - self.anchor_c) / r)
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
