//! The physics of one simulated GPU.
//!
//! A deliberately small model that still behaves like a GPU in the ways the
//! governor and the operators care about:
//!
//! * **Power**: the workload asks for `demand` watts at full clocks. Power at
//!   clock `c` is `idle + (demand - idle) * (c / c_max)^ALPHA` (dynamic power
//!   grows faster than linearly with clock, because voltage rises with it).
//!   The board draws `min(that, power limit)`: under a limit the clock drops
//!   until the power fits, and the SW power cap reason is set.
//! * **Heat**: first order. The die temperature moves toward
//!   `ambient + power * R` with time constant `tau`. The sensor lags the die
//!   (its own first-order lag) and reads whole degrees. Power reads as a ~1 s
//!   average, like NVML's on recent GPUs.
//! * **Protection**: past the slowdown temperature the hardware halves the
//!   clock (HW slowdown + HW thermal slowdown reasons) until it is 2 °C below;
//!   near the maximum operating temperature the driver trims clocks (SW
//!   thermal slowdown); at the shutdown temperature the board switches off
//!   (lost) until it has cooled 10 °C below slowdown.
//! * **Fan** (boards that have one) follows temperature with a lag.
//!
//! Time only moves through [`GpuModel::advance`], so tests drive the model
//! deterministically without clocks or threads.

use std::time::Duration;

use crate::{
    backend::{Ecc, Process, Profiling, Reading, SlowReading},
    config::DemandPoint,
    throttle::mask,
};

use super::preset::Preset;

/// Exponent of the clock-to-dynamic-power law.
const ALPHA: f64 = 2.0;
/// Fraction of the maximum clock the hardware keeps in HW slowdown.
const HW_SLOWDOWN_CLOCK_FRACTION: f64 = 0.5;
/// Fraction of the maximum clock the driver keeps in SW thermal slowdown.
const SW_THERMAL_CLOCK_FRACTION: f64 = 0.85;
/// Averaging time constant of the power reading.
const POWER_AVERAGE_S: f64 = 1.0;
/// Fan response time constant.
const FAN_LAG_S: f64 = 4.0;
/// Longest integration step.
const MAX_STEP_S: f64 = 0.05;

/// A demand profile over simulated time: steps, ramps, optionally repeated.
#[derive(Debug, Clone, PartialEq)]
pub struct DemandProfile {
    points: Vec<(f64, f64, bool)>,
    repeat_s: Option<f64>,
}

impl DemandProfile {
    /// Builds a profile; points must be in increasing time order (config
    /// validation guarantees it).
    pub fn new(points: &[DemandPoint], repeat: Option<Duration>) -> Self {
        Self {
            points: points
                .iter()
                .map(|p| (p.at.as_secs_f64(), p.watts, p.ramp))
                .collect(),
            repeat_s: repeat.map(|r| r.as_secs_f64()),
        }
    }

    /// A constant demand.
    pub fn constant(watts: f64) -> Self {
        Self {
            points: vec![(0.0, watts, false)],
            repeat_s: None,
        }
    }

    /// Demand in watts at simulated time `t_s`. Before the first point the
    /// workload is idle (0 W asked, so the board draws its idle power).
    pub fn at(&self, t_s: f64) -> f64 {
        let t = match self.repeat_s {
            Some(period) if period > 0.0 => t_s % period,
            _ => t_s,
        };
        let next = self.points.partition_point(|&(at, _, _)| at <= t);
        let current = if next == 0 {
            0.0
        } else {
            self.points[next - 1].1
        };
        match self.points.get(next) {
            Some(&(at, watts, true)) => {
                let (from_t, from_w) = if next == 0 {
                    (0.0, 0.0)
                } else {
                    (self.points[next - 1].0, current)
                };
                let span = at - from_t;
                if span <= 0.0 {
                    watts
                } else {
                    from_w + (watts - from_w) * ((t - from_t) / span)
                }
            }
            _ => current,
        }
    }
}

/// Physical parameters of one simulated GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    pub preset: Preset,
    pub ambient_c: f64,
    pub thermal_resistance_c_per_w: f64,
    pub time_constant_s: f64,
    pub sensor_lag_s: f64,
}

impl ModelParams {
    /// The preset's own parameters.
    pub fn from_preset(preset: Preset) -> Self {
        Self {
            ambient_c: preset.ambient_c,
            thermal_resistance_c_per_w: preset.thermal_resistance_c_per_w,
            time_constant_s: preset.time_constant.as_secs_f64(),
            sensor_lag_s: preset.sensor_lag.as_secs_f64(),
            preset,
        }
    }

    /// Where the die temperature settles at a constant `power_w`.
    pub fn steady_temperature_c(&self, power_w: f64) -> f64 {
        self.ambient_c + power_w * self.thermal_resistance_c_per_w
    }
}

/// The state of one simulated GPU.
#[derive(Debug, Clone)]
pub struct GpuModel {
    params: ModelParams,
    demand: DemandProfile,
    t_s: f64,
    die_c: f64,
    sensor_c: f64,
    memory_c: f64,
    power_w: f64,
    power_avg_w: f64,
    fan_pct: f64,
    energy_mj: f64,
    limit_mw: u32,
    gpu_clock_lock: Option<(u32, u32)>,
    memory_clock_locked: bool,
    graphics_mhz: f64,
    power_capped: bool,
    hw_slowdown: bool,
    sw_thermal: bool,
    shut_down: bool,
}

impl GpuModel {
    /// A GPU at rest: idle, at its idle equilibrium temperature, with the
    /// default power limit.
    pub fn new(params: ModelParams, demand: DemandProfile) -> Self {
        let idle = params.preset.idle_w;
        let rest_c = params.steady_temperature_c(idle);
        let limit_mw = watts_to_mw(params.preset.power_default_w);
        let graphics_mhz = f64::from(params.preset.idle_graphics_mhz);
        Self {
            demand,
            t_s: 0.0,
            die_c: rest_c,
            sensor_c: rest_c,
            memory_c: rest_c,
            power_w: idle,
            power_avg_w: idle,
            fan_pct: 30.0,
            energy_mj: 0.0,
            limit_mw,
            gpu_clock_lock: None,
            memory_clock_locked: false,
            graphics_mhz,
            power_capped: false,
            hw_slowdown: false,
            sw_thermal: false,
            shut_down: false,
            params,
        }
    }

    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    /// Simulated time.
    pub fn time(&self) -> Duration {
        Duration::from_secs_f64(self.t_s)
    }

    /// True die temperature (the sensor lags it).
    pub fn die_temperature_c(&self) -> f64 {
        self.die_c
    }

    /// Instantaneous board power.
    pub fn power_w(&self) -> f64 {
        self.power_w
    }

    /// True while the board is off after a thermal shutdown.
    pub fn is_shut_down(&self) -> bool {
        self.shut_down
    }

    pub fn power_limit_mw(&self) -> u32 {
        self.limit_mw
    }

    /// Sets the power limit (the caller validates the range).
    pub fn set_power_limit_mw(&mut self, limit_mw: u32) {
        self.limit_mw = limit_mw;
    }

    pub fn gpu_clock_lock(&self) -> Option<(u32, u32)> {
        self.gpu_clock_lock
    }

    pub fn set_gpu_clock_lock(&mut self, lock: Option<(u32, u32)>) {
        self.gpu_clock_lock = lock;
    }

    pub fn memory_clock_locked(&self) -> bool {
        self.memory_clock_locked
    }

    pub fn set_memory_clock_locked(&mut self, locked: bool) {
        self.memory_clock_locked = locked;
    }

    /// Moves simulated time forward to `t`, integrating in small steps.
    pub fn advance_to(&mut self, t: Duration) {
        let target = t.as_secs_f64();
        let mut max_step = MAX_STEP_S.min(self.params.time_constant_s / 50.0);
        if self.params.sensor_lag_s > 0.0 {
            max_step = max_step.min(self.params.sensor_lag_s / 10.0);
        }
        while self.t_s < target {
            let dt = (target - self.t_s).min(max_step);
            self.step(dt);
            self.t_s += dt;
        }
    }

    /// Moves simulated time forward by `dt`.
    pub fn advance(&mut self, dt: Duration) {
        self.advance_to(Duration::from_secs_f64(self.t_s) + dt);
    }

    fn step(&mut self, dt: f64) {
        let p = &self.params.preset;
        let demand = self.demand.at(self.t_s);
        let idle = p.idle_w;
        let max_mhz = f64::from(p.max_graphics_mhz);

        let power = if self.shut_down {
            self.graphics_mhz = 0.0;
            self.power_capped = false;
            0.0
        } else {
            let mut cap_mhz = max_mhz;
            if let Some((_, hi)) = self.gpu_clock_lock {
                cap_mhz = cap_mhz.min(f64::from(hi));
            }
            if self.hw_slowdown {
                cap_mhz = cap_mhz.min(max_mhz * HW_SLOWDOWN_CLOCK_FRACTION);
            }
            if self.sw_thermal {
                cap_mhz = cap_mhz.min(max_mhz * SW_THERMAL_CLOCK_FRACTION);
            }
            let dynamic_w = (demand - idle).max(0.0);
            let at_cap_w = idle + dynamic_w * (cap_mhz / max_mhz).powf(ALPHA);
            let limit_w = f64::from(self.limit_mw) / 1000.0;
            let power = at_cap_w.min(limit_w.max(idle));
            self.power_capped = at_cap_w > limit_w + 0.5;
            self.graphics_mhz = if dynamic_w > 0.0 {
                let fraction = ((power - idle) / dynamic_w).clamp(0.0, 1.0);
                (max_mhz * fraction.powf(1.0 / ALPHA))
                    .min(cap_mhz)
                    .max(f64::from(p.idle_graphics_mhz))
            } else {
                f64::from(p.idle_graphics_mhz)
            };
            power
        };
        self.power_w = power;

        let decay = |tau: f64| {
            if tau > 0.0 {
                1.0 - (-dt / tau).exp()
            } else {
                1.0
            }
        };
        let target_c = self.params.steady_temperature_c(power);
        self.die_c += (target_c - self.die_c) * decay(self.params.time_constant_s);
        self.sensor_c += (self.die_c - self.sensor_c) * decay(self.params.sensor_lag_s);
        let ambient = self.params.ambient_c;
        let memory_target = ambient + 0.85 * (self.die_c - ambient) + 4.0;
        self.memory_c += (memory_target - self.memory_c) * decay(self.params.time_constant_s * 1.2);
        self.power_avg_w += (power - self.power_avg_w) * decay(POWER_AVERAGE_S);
        self.energy_mj += power * dt * 1000.0;
        let fan_target = (30.0 + (self.die_c - 40.0) * 1.75).clamp(30.0, 100.0);
        self.fan_pct += (fan_target - self.fan_pct) * decay(FAN_LAG_S);

        let slowdown = f64::from(p.slowdown_c);
        if self.die_c >= slowdown {
            self.hw_slowdown = true;
        } else if self.die_c < slowdown - 2.0 {
            self.hw_slowdown = false;
        }
        let max_operating = f64::from(p.max_operating_c);
        if self.die_c >= max_operating && max_operating < slowdown {
            self.sw_thermal = true;
        } else if self.die_c < max_operating - 1.0 {
            self.sw_thermal = false;
        }
        if self.die_c >= f64::from(p.shutdown_c) {
            self.shut_down = true;
        } else if self.shut_down && self.die_c < slowdown - 10.0 {
            self.shut_down = false;
        }
    }

    fn busy(&self) -> bool {
        self.demand.at(self.t_s) > self.params.preset.idle_w + 1.0 && !self.shut_down
    }

    /// Load as a fraction of what saturates the GPU.
    fn load(&self) -> f64 {
        let p = &self.params.preset;
        let dynamic_w = (self.demand.at(self.t_s) - p.idle_w).max(0.0);
        (dynamic_w / ((p.power_default_w - p.idle_w) * 0.5)).clamp(0.0, 1.0)
    }

    /// The NVML throttle mask the board would report now.
    pub fn throttle_mask(&self) -> u64 {
        let p = &self.params.preset;
        let mut bits = 0;
        if !self.busy() {
            bits |= mask::GPU_IDLE;
        }
        if self.power_capped {
            bits |= mask::SW_POWER_CAP;
        }
        if self
            .gpu_clock_lock
            .is_some_and(|(_, hi)| hi < p.max_graphics_mhz)
        {
            bits |= mask::APPLICATIONS_CLOCKS_SETTING;
        }
        if self.hw_slowdown {
            bits |= mask::HW_SLOWDOWN | mask::HW_THERMAL_SLOWDOWN;
        }
        if self.sw_thermal {
            bits |= mask::SW_THERMAL_SLOWDOWN;
        }
        bits
    }

    /// What NVML would report now. Fields the board lacks are `None`.
    pub fn reading(&self, slow_fields: bool, index: u32) -> Reading {
        let p = &self.params.preset;
        let busy = self.busy();
        let load = self.load();
        let graphics = self.graphics_mhz.round() as u32;
        let memory_mhz = if busy || self.memory_clock_locked {
            p.max_memory_mhz
        } else {
            p.idle_memory_mhz
        };
        let workload_bytes = if busy {
            (p.memory_total_bytes as f64 * 0.6) as u64
        } else {
            0
        };
        let util_gpu = (load * 100.0).round() as u32;
        let pcie = (f64::from(p.pcie_max_kbps) * load * 0.1) as u32;
        let some_if = |has: bool, v: u32| has.then_some(v);
        Reading {
            device_time: self.time(),
            temperature_c: Some(self.sensor_c.round().max(0.0) as u32),
            memory_temperature_c: some_if(
                p.has_memory_temperature,
                self.memory_c.round().max(0.0) as u32,
            ),
            fan_speed_pct: some_if(p.has_fan, self.fan_pct.round() as u32),
            power_draw_mw: Some(watts_to_mw(self.power_avg_w)),
            power_limit_mw: some_if(p.reports_power_limits, self.limit_mw),
            enforced_power_limit_mw: some_if(p.reports_power_limits, self.limit_mw),
            energy_mj: p.has_energy.then_some(self.energy_mj as u64),
            graphics_clock_mhz: Some(graphics),
            sm_clock_mhz: Some(graphics),
            memory_clock_mhz: Some(memory_mhz),
            video_clock_mhz: Some(
                (self.graphics_mhz * f64::from(p.max_video_mhz) / f64::from(p.max_graphics_mhz))
                    .round() as u32,
            ),
            utilization_gpu_pct: Some(util_gpu),
            utilization_memory_pct: Some((f64::from(util_gpu) * 0.55).round() as u32),
            memory_used_bytes: Some(p.memory_reserved_bytes + workload_bytes),
            memory_total_bytes: Some(p.memory_total_bytes),
            performance_state: Some(if busy { 0 } else { 8 }),
            throttle_mask: Some(self.throttle_mask()),
            pcie_tx_kbps: some_if(p.has_pcie_throughput, pcie),
            pcie_rx_kbps: some_if(p.has_pcie_throughput, pcie / 2),
            // The simulated workload keeps the tensor pipes busy for 70 %
            // of the time a kernel runs and the memory interface for 55 %
            // (as its memory utilisation above).
            profiling: p.has_gpm.then_some(Profiling {
                graphics_engine_active: Some(load),
                tensor_active: Some(load * 0.7),
                dram_active: Some(load * 0.55),
            }),
            slow: slow_fields.then(|| SlowReading {
                ecc: p.has_ecc.then_some(Ecc {
                    corrected_volatile: Some(0),
                    uncorrected_volatile: Some(0),
                    corrected_aggregate: Some(0),
                    uncorrected_aggregate: Some(0),
                }),
                processes: Some(if busy {
                    vec![Process {
                        pid: 41_000 + index,
                        used_memory_bytes: Some(workload_bytes),
                        ..Process::default()
                    }]
                } else {
                    Vec::new()
                }),
                mig: None,
            }),
            locked_gpu_clock_max_mhz: self.gpu_clock_lock.map(|(_, hi)| hi),
        }
    }
}

/// Watts to whole milliwatts (negative and NaN become 0).
pub fn watts_to_mw(watts: f64) -> u32 {
    (watts * 1000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PresetKey;

    fn model(key: PresetKey, demand_w: f64) -> GpuModel {
        GpuModel::new(
            ModelParams::from_preset(Preset::get(key)),
            DemandProfile::constant(demand_w),
        )
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn settles_at_ambient_plus_power_times_resistance() {
        let mut m = model(PresetKey::H100Sxm, 500.0);
        let expected = m.params().steady_temperature_c(500.0);
        m.advance(secs(m.params().time_constant_s * 10.0));
        assert!(
            (m.die_temperature_c() - expected).abs() < 0.05,
            "{}",
            m.die_temperature_c()
        );
        let read = m.reading(false, 0);
        let sensor = f64::from(read.temperature_c.expect("temperature"));
        assert!(
            (sensor - expected).abs() <= 1.0,
            "sensor {sensor}, expected {expected}"
        );
        assert_eq!(read.power_draw_mw, Some(500_000));
    }

    #[test]
    fn heating_follows_a_first_order_curve() {
        let mut m = model(PresetKey::A100Sxm, 350.0);
        let params = m.params().clone();
        let start = m.die_temperature_c();
        let end = params.steady_temperature_c(350.0);
        m.advance(secs(params.time_constant_s));
        // After one time constant a first-order system has covered 1 - 1/e
        // of the way (the 1 s power average delays it slightly).
        let covered = (m.die_temperature_c() - start) / (end - start);
        assert!((0.55..0.64).contains(&covered), "covered {covered}");
        m.advance(secs(params.time_constant_s * 2.0));
        let covered = (m.die_temperature_c() - start) / (end - start);
        assert!((0.93..0.96).contains(&covered), "covered {covered}");
    }

    #[test]
    fn power_is_capped_by_the_limit_and_reports_sw_power_cap() {
        let mut m = model(PresetKey::H100Sxm, 650.0);
        m.set_power_limit_mw(400_000);
        m.advance(secs(5.0));
        assert!((m.power_w() - 400.0).abs() < 1e-6);
        assert_ne!(m.throttle_mask() & mask::SW_POWER_CAP, 0);
        let read = m.reading(false, 0);
        let clock = read.graphics_clock_mhz.expect("clock");
        assert!(
            clock < 1980,
            "a capped GPU runs below its maximum clock, got {clock}"
        );
        m.set_power_limit_mw(700_000);
        m.advance(secs(1.0));
        assert!((m.power_w() - 650.0).abs() < 1e-6);
        assert_eq!(m.throttle_mask() & mask::SW_POWER_CAP, 0);
    }

    #[test]
    fn sensor_lags_and_reads_whole_degrees() {
        let mut m = model(PresetKey::H100Sxm, 700.0);
        m.advance(secs(0.5));
        // The die has started to heat; the lagging sensor shows less.
        let read = m.reading(false, 0);
        let die = m.die_temperature_c();
        let sensor = f64::from(read.temperature_c.expect("temperature"));
        assert!(sensor <= die.round(), "sensor {sensor} die {die}");
        assert_eq!(sensor.fract(), 0.0);
    }

    #[test]
    fn overheating_gpu_slows_itself_down_with_hysteresis() {
        let mut params = ModelParams::from_preset(Preset::get(PresetKey::H100Sxm));
        // 60 + 700 * 0.075 = 112.5 C without protection; even the driver's
        // SW thermal slowdown (85 % clocks) would settle at 99 C.
        params.ambient_c = 60.0;
        let mut m = GpuModel::new(params, DemandProfile::constant(700.0));
        m.advance(secs(200.0));
        let mask_bits = m.throttle_mask();
        assert_ne!(
            mask_bits & mask::HW_THERMAL_SLOWDOWN,
            0,
            "mask {mask_bits:#x}"
        );
        // Hardware slowdown holds it around the slowdown temperature, far from
        // the unprotected 112.5 C and below shutdown.
        assert!(m.die_temperature_c() < 92.0, "{}", m.die_temperature_c());
        assert!(!m.is_shut_down());
    }

    #[test]
    fn clock_lock_reduces_power() {
        let mut m = model(PresetKey::Laptop, 115.0);
        m.advance(secs(2.0));
        let free = m.power_w();
        m.set_gpu_clock_lock(Some((210, 1200)));
        m.advance(secs(2.0));
        assert!(m.power_w() < free * 0.5, "{} vs {}", m.power_w(), free);
        assert_ne!(m.throttle_mask() & mask::APPLICATIONS_CLOCKS_SETTING, 0);
    }

    #[test]
    fn thermal_shutdown_then_recovery() {
        let mut params = ModelParams::from_preset(Preset::get(PresetKey::Rtx4090));
        params.thermal_resistance_c_per_w = 0.5; // hopeless cooling
        let mut m = GpuModel::new(params, DemandProfile::constant(600.0));
        m.set_power_limit_mw(600_000);
        let mut shut = false;
        for _ in 0..600 {
            m.advance(secs(0.5));
            shut |= m.is_shut_down();
            if shut && !m.is_shut_down() {
                return;
            }
        }
        panic!("expected shutdown (seen: {shut}) and recovery");
    }

    #[test]
    fn demand_profile_steps_ramps_and_repeats() {
        let pts = |v: &[(u64, f64, bool)]| {
            v.iter()
                .map(|&(at, watts, ramp)| DemandPoint {
                    at: Duration::from_secs(at),
                    watts,
                    ramp,
                })
                .collect::<Vec<_>>()
        };
        let p = DemandProfile::new(&pts(&[(10, 100.0, false), (20, 300.0, true)]), None);
        assert_eq!(p.at(5.0), 0.0);
        assert_eq!(p.at(10.0), 100.0);
        assert!((p.at(15.0) - 200.0).abs() < 1e-9);
        assert_eq!(p.at(25.0), 300.0);
        let square = DemandProfile::new(
            &pts(&[(0, 500.0, false), (30, 100.0, false)]),
            Some(Duration::from_secs(60)),
        );
        assert_eq!(square.at(70.0), 500.0);
        assert_eq!(square.at(95.0), 100.0);
    }

    #[test]
    fn idle_gpu_reports_idle_reason_and_no_processes() {
        let mut m = model(PresetKey::A100Sxm, 0.0);
        m.advance(secs(1.0));
        let read = m.reading(true, 0);
        assert_ne!(read.throttle_mask.unwrap_or(0) & mask::GPU_IDLE, 0);
        assert_eq!(read.slow.and_then(|s| s.processes), Some(Vec::new()));
        assert_eq!(read.utilization_gpu_pct, Some(0));
    }

    #[test]
    fn energy_integrates_power() {
        let mut m = model(PresetKey::H100Sxm, 300.0);
        m.advance(secs(10.0));
        let energy = m.reading(false, 0).energy_mj.expect("energy");
        // 300 W for 10 s = 3000 J (the first instants ramp from idle power).
        assert!((2_990_000..=3_000_000).contains(&energy), "{energy}");
    }
}
