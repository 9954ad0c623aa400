//! The simulated GPU stack: the embedded default on machines without a GPU.
//!
//! [`SimBackend`] turns the `[simulator]` config into [`GpuModel`]s (the
//! physics lives in `model`, the boards in `preset`) behind the same
//! [`Backend`] / [`GpuDevice`] traits NVML sits behind, so the sampler, the
//! governor, the streams and the CLI run unchanged on it. It also injects the
//! faults real clusters have: a GPU falling off the bus, a hung driver call,
//! writes refused, a driver reload resetting the power limit, XID errors.
//!
//! Simulated time runs `speed` times faster than the wall clock, so a
//! ten-minute thermal scenario plays out in seconds.

pub mod hardware;
pub mod model;
pub mod preset;
pub mod workload;

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use crate::config::{PresetKey, SimGpuConfig, SimWriteError, SimulatorConfig};

use super::{
    Backend, BackendError, DeviceEvent, DeviceFacts, GpuDevice, HostFacts, ReadScope, Reading,
};
use hardware::{BoardSettings, HardwareStore};
pub use model::{DemandProfile, GpuModel, ModelParams};
pub use preset::Preset;

/// Simulated time: wall time since start, times `speed`.
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    start: Instant,
    speed: f64,
}

impl SimClock {
    pub fn new(speed: f64) -> Self {
        Self {
            start: Instant::now(),
            speed,
        }
    }

    /// Simulated time now.
    pub fn now(&self) -> Duration {
        self.start.elapsed().mul_f64(self.speed)
    }

    /// Wall time that `simulated` takes.
    pub fn wall(&self, simulated: Duration) -> Duration {
        simulated.div_f64(self.speed)
    }
}

/// The demo fleet `--simulate` runs without a `[simulator]` section: four
/// GPUs of three models under loads that change over a few minutes, one of
/// them in a hot rack so the governor has work to do.
pub fn demo_fleet() -> SimulatorConfig {
    let point = |at: u64, watts: f64, ramp: bool| crate::config::DemandPoint {
        at: Duration::from_secs(at),
        watts,
        ramp,
    };
    let gpu = |preset: PresetKey| SimGpuConfig {
        preset,
        count: 1,
        ambient_c: None,
        time_constant: None,
        sensor_lag: None,
        thermal_resistance_c_per_w: None,
        demand: Vec::new(),
        repeat: None,
        lost_at: None,
        recover_at: None,
        lost_every: None,
        recover_power_default_watts: None,
        limit_reset_at: None,
        read_hang_at: None,
        read_hang_for: None,
        write_hang_at: None,
        write_hang_for: None,
        write_error: None,
        xid: Vec::new(),
        power_limit_settable: None,
        clocks_lockable: None,
        processes: Vec::new(),
        allocations: Vec::new(),
        mig: None,
    };
    let process = |text: &str| -> crate::config::SimProcess {
        toml::from_str(text).expect("the demo fleet's processes parse")
    };
    SimulatorConfig {
        speed: 1.0,
        gpus: vec![
            // Training job: steady heavy load with a checkpoint pause.
            SimGpuConfig {
                demand: vec![
                    point(5, 640.0, true),
                    point(150, 640.0, false),
                    point(170, 120.0, false),
                ],
                repeat: Some(Duration::from_secs(180)),
                processes: vec![process(
                    r#"pid = 41000
name = "python3"
uid = 1000
user = "alice"
memory_mib = 61440
namespace = "ml"
pod = "trainer-0"
container = "main""#,
                )],
                ..gpu(PresetKey::H100Sxm)
            },
            // Same job in a hot rack: runs into the governor's threshold.
            SimGpuConfig {
                ambient_c: Some(42.0),
                demand: vec![
                    point(5, 690.0, true),
                    point(200, 690.0, false),
                    point(230, 150.0, false),
                ],
                repeat: Some(Duration::from_secs(260)),
                processes: vec![process(
                    r#"pid = 41001
name = "train.py"
uid = 1001
user = "bob"
memory_mib = 52000
slurm_job = "81723"
slurm_step = "0""#,
                )],
                ..gpu(PresetKey::H100Sxm)
            },
            // Inference: bursty square wave.
            SimGpuConfig {
                demand: vec![point(0, 320.0, false), point(20, 90.0, false)],
                repeat: Some(Duration::from_secs(40)),
                mig: Some(crate::config::SimMig {
                    enabled: true,
                    instances: vec!["3g.40gb".into(), "2g.20gb".into(), "2g.20gb".into()],
                    changes: Vec::new(),
                }),
                processes: vec![
                    process(
                        r#"pid = 41002
name = "tritonserver"
memory_mib = 30000
mig_instance = 0
namespace = "serving"
pod = "triton-7f9c"
container = "triton""#,
                    ),
                    process(
                        r#"pid = 41003
name = "python3"
memory_mib = 12000
mig_instance = 1
namespace = "serving"
pod = "embedder-2"
container = "embed""#,
                    ),
                ],
                allocations: vec![crate::config::SimAllocation {
                    namespace: "research".into(),
                    pod: "notebook-5".into(),
                    container: "jupyter".into(),
                    mig_instance: Some(2),
                    from: None,
                    until: None,
                }],
                ..gpu(PresetKey::A100Sxm)
            },
            // A workstation card under a slow ramp up and down.
            SimGpuConfig {
                demand: vec![point(60, 420.0, true), point(120, 60.0, true)],
                repeat: Some(Duration::from_secs(150)),
                processes: vec![process(
                    r#"pid = 41004
name = "blender"
uid = 1002
user = "carol"
memory_mib = 9000
kind = "compute_and_graphics"
unit = "render-farm.service""#,
                )],
                ..gpu(PresetKey::Rtx4090)
            },
        ],
    }
}

/// One simulated GPU's full description, after expanding `count`.
#[derive(Debug, Clone)]
struct SimGpuSpec {
    key: PresetKey,
    params: ModelParams,
    config: SimGpuConfig,
}

/// The simulated GPU stack.
#[derive(Debug)]
pub struct SimBackend {
    clock: SimClock,
    gpus: Vec<SimGpuSpec>,
    hardware: Arc<HardwareStore>,
}

impl SimBackend {
    /// Builds the fleet described by `config` (validated beforehand); the
    /// boards' settings live only as long as this backend.
    pub fn new(config: &SimulatorConfig) -> Self {
        Self::with_hardware(config, HardwareStore::volatile())
    }

    /// Like [`SimBackend::new`], with board settings (power limits, clock
    /// locks) kept in `hardware`, so they survive a daemon restart the way a
    /// real GPU's do.
    pub fn with_hardware(config: &SimulatorConfig, hardware: HardwareStore) -> Self {
        let gpus = config
            .gpus
            .iter()
            .flat_map(|g| std::iter::repeat_n(g, g.count as usize))
            .map(|g| {
                let mut params = ModelParams::from_preset(Preset::get(g.preset));
                if let Some(a) = g.ambient_c {
                    params.ambient_c = a;
                }
                if let Some(t) = g.time_constant {
                    params.time_constant_s = t.as_secs_f64();
                }
                if let Some(l) = g.sensor_lag {
                    params.sensor_lag_s = l.as_secs_f64();
                }
                if let Some(r) = g.thermal_resistance_c_per_w {
                    params.thermal_resistance_c_per_w = r;
                }
                if let Some(s) = g.power_limit_settable {
                    params.preset.power_limit_settable = s;
                }
                if let Some(l) = g.clocks_lockable {
                    params.preset.gpu_clocks_lockable = l;
                }
                SimGpuSpec {
                    key: g.preset,
                    params,
                    config: g.clone(),
                }
            })
            .collect();
        Self {
            clock: SimClock::new(config.speed),
            gpus,
            hardware: Arc::new(hardware),
        }
    }
}

impl SimBackend {
    /// The attribution seam for these GPUs: the processes and allocations
    /// the config declares, on this backend's clock.
    pub fn host_records(&self) -> workload::SimHostRecords {
        let workloads = self
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| workload::Workload::new(i as u32, &g.config))
            .collect();
        workload::SimHostRecords::new(self.clock, workloads)
    }
}

impl Backend for SimBackend {
    fn host_facts(&self) -> HostFacts {
        HostFacts {
            backend: "simulator",
            driver_version: None,
            nvml_version: None,
        }
    }

    fn device_count(&self) -> Result<u32, BackendError> {
        Ok(self.gpus.len() as u32)
    }

    fn open(&self, index: u32) -> Result<Box<dyn GpuDevice>, BackendError> {
        let spec = self
            .gpus
            .get(index as usize)
            .ok_or_else(|| BackendError::InvalidArgument(format!("no simulated GPU {index}")))?;
        Ok(Box::new(SimDevice::new(
            index,
            spec,
            self.clock,
            self.hardware.clone(),
        )))
    }
}

/// FNV-1a, for stable made-up identities.
fn fnv1a(seed: u64, text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A stable, well-formed UUID for simulated GPU `index` of model `key`.
pub fn sim_uuid(key: PresetKey, index: u32) -> String {
    let text = format!("gpuwatch-sim/{}/{index}", key.as_str());
    let a = fnv1a(1, &text);
    let b = fnv1a(2, &text);
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// True when simulated time `now` is inside one of `config`'s lost windows
/// (`lost_at` to `recover_at`, repeating every `lost_every`).
fn in_lost_window(config: &SimGpuConfig, now: Duration) -> bool {
    let Some(at) = config.lost_at else {
        return false;
    };
    if now < at {
        return false;
    }
    let since = match config.lost_every {
        Some(every) if !every.is_zero() => {
            Duration::from_nanos((now - at).as_nanos().rem_euclid(every.as_nanos()) as u64)
        }
        _ => now - at,
    };
    config
        .recover_at
        .is_none_or(|back| since < back.saturating_sub(at))
}

/// One simulated GPU, driven from its sampler thread.
struct SimDevice {
    index: u32,
    uuid: String,
    key: PresetKey,
    model: GpuModel,
    config: SimGpuConfig,
    clock: SimClock,
    /// XIDs not yet raised, in time order.
    pending_xids: Vec<(Duration, u64)>,
    limit_reset_done: bool,
    was_lost: bool,
    /// The default power limit the board reports after coming back with
    /// `recover_power_default_watts`.
    default_override_w: Option<f64>,
    hardware: Arc<HardwareStore>,
    workload: workload::Workload,
}

impl SimDevice {
    fn new(index: u32, spec: &SimGpuSpec, clock: SimClock, hardware: Arc<HardwareStore>) -> Self {
        let demand = DemandProfile::new(&spec.config.demand, spec.config.repeat);
        let mut pending_xids: Vec<_> = spec.config.xid.iter().map(|x| (x.at, x.code)).collect();
        pending_xids.sort();
        let uuid = sim_uuid(spec.key, index);
        let mut model = GpuModel::new(spec.params.clone(), demand);
        let kept = hardware.get(&uuid);
        if let Some(limit) = kept.power_limit_mw {
            model.set_power_limit_mw(limit);
        }
        model.set_gpu_clock_lock(kept.gpu_clock_lock);
        model.set_memory_clock_locked(kept.memory_clock_locked);
        Self {
            index,
            uuid,
            key: spec.key,
            model,
            config: spec.config.clone(),
            clock,
            pending_xids,
            limit_reset_done: false,
            was_lost: false,
            default_override_w: None,
            hardware,
            workload: workload::Workload::new(index, &spec.config),
        }
    }

    /// Remembers the board's settings, as the hardware would.
    fn keep_settings(&self) {
        self.hardware.set(
            &self.uuid,
            BoardSettings {
                power_limit_mw: Some(self.model.power_limit_mw()),
                gpu_clock_lock: self.model.gpu_clock_lock(),
                memory_clock_locked: self.model.memory_clock_locked(),
            },
        );
    }

    fn preset(&self) -> &Preset {
        &self.model.params().preset
    }

    /// The default power limit the board reports now.
    fn default_w(&self) -> f64 {
        self.default_override_w
            .unwrap_or(self.preset().power_default_w)
    }

    /// Brings the model to now and applies time-triggered faults.
    fn catch_up(&mut self) -> Result<(), BackendError> {
        let now = self.clock.now();
        self.model.advance_to(now);
        if let Some(at) = self.config.limit_reset_at
            && now >= at
            && !self.limit_reset_done
        {
            self.limit_reset_done = true;
            self.reset_to_boot_state();
        }
        let lost = in_lost_window(&self.config, now);
        if lost || self.model.is_shut_down() {
            self.was_lost = true;
            let why = if lost {
                "fell off the bus"
            } else {
                "thermal shutdown"
            };
            return Err(BackendError::GpuLost(format!(
                "simulated GPU {} {why}",
                self.index
            )));
        }
        if self.was_lost {
            // A GPU that comes back has been reset: driver defaults again
            // (another default, where the scenario says so).
            self.was_lost = false;
            if let Some(w) = self.config.recover_power_default_watts {
                let p = self.preset();
                self.default_override_w = Some(w.clamp(p.power_min_w, p.power_max_w));
            }
            self.reset_to_boot_state();
        }
        Ok(())
    }

    fn reset_to_boot_state(&mut self) {
        let default_mw = model::watts_to_mw(self.default_w());
        self.model.set_power_limit_mw(default_mw);
        self.model.set_gpu_clock_lock(None);
        self.model.set_memory_clock_locked(false);
        self.keep_settings();
    }

    fn hang_if_scheduled(&self) {
        let (Some(at), Some(duration)) = (self.config.read_hang_at, self.config.read_hang_for)
        else {
            return;
        };
        let now = self.clock.now();
        let end = at + duration;
        if now >= at && now < end {
            thread::sleep(self.clock.wall(end - now));
        }
    }

    /// A write started inside the `write_hang_at` window blocks until the
    /// window ends, then goes ahead (a write that lands late).
    fn hang_write_if_scheduled(&self) {
        let (Some(at), Some(duration)) = (self.config.write_hang_at, self.config.write_hang_for)
        else {
            return;
        };
        let now = self.clock.now();
        let end = at + duration;
        if now >= at && now < end {
            thread::sleep(self.clock.wall(end - now));
        }
    }

    fn check_write(&mut self, supported: bool, what: &str) -> Result<(), BackendError> {
        self.hang_write_if_scheduled();
        self.catch_up()?;
        match self.config.write_error {
            Some(SimWriteError::NoPermission) => {
                return Err(BackendError::NoPermission(format!(
                    "{what} (simulated fault)"
                )));
            }
            Some(SimWriteError::NotSupported) => {
                return Err(BackendError::NotSupported(format!(
                    "{what} (simulated fault)"
                )));
            }
            Some(SimWriteError::Unknown) => {
                return Err(BackendError::Other(format!(
                    "{what}: unknown error (simulated fault)"
                )));
            }
            None => {}
        }
        if !supported {
            return Err(BackendError::NotSupported(format!(
                "{what} is not supported on {}",
                self.preset().name
            )));
        }
        Ok(())
    }
}

impl GpuDevice for SimDevice {
    fn describe(&mut self) -> Result<DeviceFacts, BackendError> {
        self.catch_up()?;
        let p = self.preset().clone();
        let limits = p.reports_power_limits;
        let mw = |w: f64| limits.then_some(model::watts_to_mw(w));
        Ok(DeviceFacts {
            index: self.index,
            uuid: self.uuid.clone(),
            name: p.name.to_owned(),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + self.index * 0x10),
            power_min_mw: mw(p.power_min_w),
            power_max_mw: mw(p.power_max_w),
            power_default_mw: mw(self.default_w()),
            slowdown_c: Some(p.slowdown_c),
            shutdown_c: Some(p.shutdown_c),
            max_operating_c: Some(p.max_operating_c),
            max_graphics_clock_mhz: Some(p.max_graphics_mhz),
            max_sm_clock_mhz: Some(p.max_graphics_mhz),
            max_memory_clock_mhz: Some(p.max_memory_mhz),
            max_video_clock_mhz: Some(p.max_video_mhz),
            memory_total_bytes: Some(p.memory_total_bytes),
            fields: p.fields(),
            controls: super::Controls {
                power_limit_settable: p.power_limit_settable,
                gpu_clocks_lockable: p.gpu_clocks_lockable,
                memory_clocks_lockable: p.memory_clocks_lockable,
                application_clocks_resettable: p.application_clocks,
                xid_events: true,
            },
        })
    }

    fn read(&mut self, scope: ReadScope) -> Result<Reading, BackendError> {
        self.hang_if_scheduled();
        self.catch_up()?;
        let mut reading = self.model.reading(scope.slow_fields, self.index);
        let now = self.clock.now();
        if self.workload.declares_processes() {
            reading.memory_used_bytes =
                Some(self.preset().memory_reserved_bytes + self.workload.memory_used_bytes(now));
        }
        if let Some(slow) = reading.slow.as_mut() {
            if self.workload.declares_processes() {
                let (processes, mig) = self.workload.slow(
                    now,
                    reading.utilization_gpu_pct.unwrap_or(0),
                    reading.utilization_memory_pct.unwrap_or(0),
                );
                slow.processes = Some(processes);
                slow.mig = mig;
            } else {
                slow.mig = self.workload.mig(now);
            }
        }
        Ok(reading)
    }

    fn drain_events(&mut self) -> Vec<DeviceEvent> {
        let now = self.clock.now();
        let due = self.pending_xids.partition_point(|(at, _)| *at <= now);
        self.pending_xids
            .drain(..due)
            .map(|(_, code)| DeviceEvent::Xid(code))
            .collect()
    }

    fn set_power_limit(&mut self, limit_mw: u32) -> Result<(), BackendError> {
        let settable = self.preset().power_limit_settable;
        self.check_write(settable, "setting the power limit")?;
        let p = self.preset();
        let (min, max) = (
            model::watts_to_mw(p.power_min_w),
            model::watts_to_mw(p.power_max_w),
        );
        if !(min..=max).contains(&limit_mw) {
            return Err(BackendError::InvalidArgument(format!(
                "power limit {limit_mw} mW is outside {min}-{max} mW"
            )));
        }
        self.model.set_power_limit_mw(limit_mw);
        self.keep_settings();
        Ok(())
    }

    fn lock_gpu_clocks(&mut self, min_mhz: u32, max_mhz: u32) -> Result<(), BackendError> {
        let lockable = self.preset().gpu_clocks_lockable;
        self.check_write(lockable, "locking graphics clocks")?;
        let top = self.preset().max_graphics_mhz;
        if min_mhz > max_mhz || max_mhz > top {
            return Err(BackendError::InvalidArgument(format!(
                "clock lock {min_mhz}-{max_mhz} MHz is outside 0-{top} MHz or inverted"
            )));
        }
        self.model.set_gpu_clock_lock(Some((min_mhz, max_mhz)));
        self.keep_settings();
        Ok(())
    }

    fn reset_gpu_locked_clocks(&mut self) -> Result<(), BackendError> {
        let lockable = self.preset().gpu_clocks_lockable;
        self.check_write(lockable, "resetting locked graphics clocks")?;
        self.model.set_gpu_clock_lock(None);
        self.keep_settings();
        Ok(())
    }

    fn reset_memory_locked_clocks(&mut self) -> Result<(), BackendError> {
        let lockable = self.preset().memory_clocks_lockable;
        self.check_write(lockable, "resetting locked memory clocks")?;
        self.model.set_memory_clock_locked(false);
        self.keep_settings();
        Ok(())
    }

    fn reset_application_clocks(&mut self) -> Result<(), BackendError> {
        let supported = self.preset().application_clocks;
        self.check_write(supported, "resetting application clocks")
    }
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevice")
            .field("index", &self.index)
            .field("preset", &self.key)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DemandPoint;

    fn one_gpu(mut g: SimGpuConfig, speed: f64) -> SimBackend {
        g.count = 1;
        SimBackend::new(&SimulatorConfig {
            speed,
            gpus: vec![g],
        })
    }

    fn base(preset: PresetKey) -> SimGpuConfig {
        let mut g = demo_fleet().gpus.remove(0);
        g.preset = preset;
        g.demand = vec![DemandPoint {
            at: Duration::ZERO,
            watts: 300.0,
            ramp: false,
        }];
        g.repeat = None;
        g.ambient_c = None;
        g
    }

    #[test]
    fn uuids_are_stable_and_well_formed() {
        let a = sim_uuid(PresetKey::H100Sxm, 3);
        assert_eq!(a, sim_uuid(PresetKey::H100Sxm, 3));
        assert_ne!(a, sim_uuid(PresetKey::H100Sxm, 4));
        let parts: Vec<_> = a
            .trim_start_matches("GPU-")
            .split('-')
            .map(str::len)
            .collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
    }

    #[test]
    fn laptop_refuses_power_limit_but_locks_clocks() {
        let backend = one_gpu(base(PresetKey::Laptop), 1.0);
        let mut dev = backend.open(0).expect("open");
        let facts = dev.describe().expect("describe");
        assert!(!facts.controls.power_limit_settable);
        assert!(
            facts.power_min_mw.is_none(),
            "laptop reports no power limits"
        );
        assert!(matches!(
            dev.set_power_limit(50_000),
            Err(BackendError::NotSupported(_))
        ));
        dev.lock_gpu_clocks(210, 1200).expect("lock");
        assert_eq!(
            dev.read(ReadScope { slow_fields: false })
                .expect("read")
                .locked_gpu_clock_max_mhz,
            Some(1200)
        );
    }

    #[test]
    fn power_limit_outside_constraints_is_invalid() {
        let backend = one_gpu(base(PresetKey::H100Sxm), 1.0);
        let mut dev = backend.open(0).expect("open");
        assert!(matches!(
            dev.set_power_limit(100_000),
            Err(BackendError::InvalidArgument(_))
        ));
        dev.set_power_limit(400_000).expect("in range");
        let r = dev.read(ReadScope { slow_fields: false }).expect("read");
        assert_eq!(r.power_limit_mw, Some(400_000));
    }

    #[test]
    fn lost_windows_repeat_with_lost_every() {
        let s = Duration::from_secs;
        let mut g = base(PresetKey::H100Sxm);
        g.lost_at = Some(s(30));
        g.recover_at = Some(s(40));
        let once: Vec<bool> = [0, 29, 30, 39, 40, 90, 95]
            .iter()
            .map(|t| in_lost_window(&g, s(*t)))
            .collect();
        assert_eq!(once, [false, false, true, true, false, false, false]);
        g.lost_every = Some(s(60));
        let again: Vec<bool> = [29, 30, 39, 40, 89, 90, 99, 100, 150]
            .iter()
            .map(|t| in_lost_window(&g, s(*t)))
            .collect();
        assert_eq!(
            again,
            [false, true, true, false, false, true, true, false, true]
        );
        g.recover_at = None;
        assert!(in_lost_window(&g, s(1000)), "never back without recover_at");
    }

    #[test]
    fn lost_gpu_comes_back_reset_to_defaults() {
        let mut g = base(PresetKey::H100Sxm);
        g.lost_at = Some(Duration::from_secs(10));
        g.recover_at = Some(Duration::from_secs(20));
        let backend = one_gpu(g, 500.0); // 10 s simulated = 20 ms
        let mut dev = backend.open(0).expect("open");
        dev.set_power_limit(300_000).expect("set");
        let scope = ReadScope { slow_fields: false };
        thread::sleep(Duration::from_millis(25));
        assert!(dev.read(scope).is_err_and(|e| e.is_lost()));
        thread::sleep(Duration::from_millis(25));
        let r = dev.read(scope).expect("back");
        assert_eq!(
            r.power_limit_mw,
            Some(700_000),
            "a returning GPU has its default limit"
        );
    }

    #[test]
    fn write_fault_is_reported() {
        let mut g = base(PresetKey::H100Sxm);
        g.write_error = Some(SimWriteError::NoPermission);
        let backend = one_gpu(g, 1.0);
        let mut dev = backend.open(0).expect("open");
        assert!(matches!(
            dev.set_power_limit(400_000),
            Err(BackendError::NoPermission(_))
        ));
    }

    #[test]
    fn count_expands_and_consumer_card_omits_unsupported_fields() {
        let mut g = base(PresetKey::Rtx4090);
        g.count = 3;
        let backend = SimBackend::new(&SimulatorConfig {
            speed: 1.0,
            gpus: vec![g],
        });
        assert_eq!(backend.device_count().expect("count"), 3);
        let mut dev = backend.open(2).expect("open");
        let r = dev.read(ReadScope { slow_fields: true }).expect("read");
        assert!(r.memory_temperature_c.is_none());
        assert!(r.fan_speed_pct.is_some());
        assert!(r.slow.expect("slow").ecc.is_none());
    }
}
