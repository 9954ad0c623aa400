//! The seam between gpuwatch and the GPUs.
//!
//! Everything gpuwatch knows about a GPU, and every change it makes to one,
//! passes through the [`Backend`] / [`GpuDevice`] traits defined here. Two real
//! implementations exist: [`nvml::NvmlBackend`] over NVIDIA's NVML and
//! [`sim::SimBackend`], a physical model used when no GPU is present. The rest
//! of the daemon never names either; it only sees the plain data types below,
//! in which a field a GPU does not support is `None`, never zero.
//!
//! Device calls block (NVML calls are driver ioctls that can hang on a sick
//! GPU), so a [`GpuDevice`] is only ever driven from its own dedicated thread
//! (see `sampler`), never from an async worker.

pub mod nvml;
pub mod sim;

use std::time::Duration;

use thiserror::Error;

/// Why a device call failed, reduced to what callers act on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendError {
    /// The GPU or driver does not support this call.
    #[error("not supported by this GPU or driver: {0}")]
    NotSupported(String),
    /// The daemon lacks the privilege (writes need root or CAP_SYS_ADMIN).
    #[error("no permission: {0}")]
    NoPermission(String),
    /// The GPU fell off the bus or stopped answering.
    #[error("GPU is lost: {0}")]
    GpuLost(String),
    /// The value was rejected by the driver.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The call timed out in the driver.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The driver or library is missing or not loaded.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The device is busy with something else.
    #[error("in use: {0}")]
    InUse(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    /// True when the GPU itself has gone away.
    pub fn is_lost(&self) -> bool {
        matches!(self, BackendError::GpuLost(_))
    }
}

/// Facts about the host's GPU stack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// "nvml" or "simulator".
    pub backend: &'static str,
    pub driver_version: Option<String>,
    pub nvml_version: Option<String>,
}

/// Telemetry fields, as advertised in capabilities. Mirrors
/// `api::TelemetryField` without the wire's "unspecified" value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Temperature,
    MemoryTemperature,
    FanSpeed,
    PowerDraw,
    PowerLimit,
    EnforcedPowerLimit,
    Energy,
    GraphicsClock,
    SmClock,
    MemoryClock,
    VideoClock,
    MaxClocks,
    Utilization,
    MemoryUsage,
    PerformanceState,
    ThrottleReasons,
    EccErrors,
    PcieThroughput,
    Processes,
}

/// What can be changed on a GPU, probed when it is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controls {
    pub power_limit_settable: bool,
    pub gpu_clocks_lockable: bool,
    pub memory_clocks_lockable: bool,
    pub application_clocks_resettable: bool,
    pub xid_events: bool,
}

/// Static facts about one GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    pub power_min_mw: Option<u32>,
    pub power_max_mw: Option<u32>,
    pub power_default_mw: Option<u32>,
    pub slowdown_c: Option<u32>,
    pub shutdown_c: Option<u32>,
    pub max_operating_c: Option<u32>,
    pub max_graphics_clock_mhz: Option<u32>,
    pub max_sm_clock_mhz: Option<u32>,
    pub max_memory_clock_mhz: Option<u32>,
    pub max_video_clock_mhz: Option<u32>,
    pub memory_total_bytes: Option<u64>,
    /// Telemetry fields this GPU reports, sorted.
    pub fields: Vec<Field>,
    pub controls: Controls,
}

/// The range of temperatures (°C) a GPU's slowdown, shutdown or maximum
/// operating temperature can plausibly have; outside it the value is a
/// driver or library fault, not a fact to plan with.
pub const PLAUSIBLE_LIMIT_C: std::ops::RangeInclusive<u32> = 40..=150;

impl DeviceFacts {
    /// Treats as unknown (`None`) what no real GPU reports: a slowdown,
    /// shutdown or operating limit outside [`PLAUSIBLE_LIMIT_C`] (NVML
    /// answers 0 on some boards), a power limit or clock of 0, a minimum
    /// limit above the maximum, a default outside the range. Returns one
    /// line per value dropped, for a warning. Facts are checked once, where
    /// they leave the device, so nothing downstream plans with them.
    pub fn sanitize(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("slowdown temperature", &mut self.slowdown_c),
            ("shutdown temperature", &mut self.shutdown_c),
            ("maximum operating temperature", &mut self.max_operating_c),
        ] {
            if let Some(c) = *value
                && !PLAUSIBLE_LIMIT_C.contains(&c)
            {
                problems.push(format!(
                    "{name} {c} °C is outside {}-{} °C; treated as unknown",
                    PLAUSIBLE_LIMIT_C.start(),
                    PLAUSIBLE_LIMIT_C.end()
                ));
                *value = None;
            }
        }
        for (name, value) in [
            ("minimum power limit", &mut self.power_min_mw),
            ("maximum power limit", &mut self.power_max_mw),
            ("default power limit", &mut self.power_default_mw),
            ("maximum graphics clock", &mut self.max_graphics_clock_mhz),
            ("maximum SM clock", &mut self.max_sm_clock_mhz),
            ("maximum memory clock", &mut self.max_memory_clock_mhz),
            ("maximum video clock", &mut self.max_video_clock_mhz),
        ] {
            if *value == Some(0) {
                problems.push(format!("{name} of 0; treated as unknown"));
                *value = None;
            }
        }
        if let (Some(min), Some(max)) = (self.power_min_mw, self.power_max_mw)
            && min > max
        {
            problems.push(format!(
                "minimum power limit {min} mW is above the maximum {max} mW; power limits treated as unknown"
            ));
            self.power_min_mw = None;
            self.power_max_mw = None;
            self.power_default_mw = None;
        }
        if let Some(default) = self.power_default_mw
            && (self.power_min_mw.is_some_and(|min| default < min)
                || self.power_max_mw.is_some_and(|max| default > max))
        {
            problems.push(format!(
                "default power limit {default} mW is outside {}-{} mW; treated as unknown",
                self.power_min_mw.unwrap_or(0),
                self.power_max_mw.unwrap_or(u32::MAX)
            ));
            self.power_default_mw = None;
        }
        if let (Some(slowdown), Some(shutdown)) = (self.slowdown_c, self.shutdown_c)
            && shutdown < slowdown
        {
            problems.push(format!(
                "shutdown temperature {shutdown} °C is below the slowdown temperature {slowdown} °C; both treated as unknown"
            ));
            self.slowdown_c = None;
            self.shutdown_c = None;
        }
        problems
    }
}

/// Which parts of a reading to take. Process lists and ECC counters are
/// slower to read and change slowly, so the sampler asks for them on a
/// slower cadence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadScope {
    pub slow_fields: bool,
}

/// ECC counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ecc {
    pub corrected_volatile: Option<u64>,
    pub uncorrected_volatile: Option<u64>,
    pub corrected_aggregate: Option<u64>,
    pub uncorrected_aggregate: Option<u64>,
}

/// What a process uses the GPU for (NVML lists compute and graphics
/// processes separately; one that appears in both is both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProcessKind {
    #[default]
    Compute,
    Graphics,
    ComputeAndGraphics,
}

/// A process's share of the GPU over the last sampling window, from NVML's
/// process utilisation samples. Each field is `None` where the GPU does not
/// sample it (never 0 for "unknown").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessUtilization {
    pub sm_pct: Option<u32>,
    pub memory_pct: Option<u32>,
    pub encoder_pct: Option<u32>,
    pub decoder_pct: Option<u32>,
}

/// One process on a GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub used_memory_bytes: Option<u64>,
    pub kind: ProcessKind,
    /// `None` where the GPU gives no per-process utilisation samples.
    pub utilization: Option<ProcessUtilization>,
    /// The MIG instance the process runs in (its MIG UUID), when the GPU is
    /// in MIG mode.
    pub mig_uuid: Option<String>,
}

/// One MIG instance (a GPU instance with one compute instance) of a GPU in
/// MIG mode, as the child device NVML exposes for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigInstance {
    /// The child device's UUID, `MIG-…`.
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    /// The profile, as NVIDIA names it: `1g.10gb`, `3g.40gb`, …
    pub profile: String,
    /// Streaming multiprocessors the instance owns.
    pub sm_count: Option<u32>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    /// Where NVML gives per-instance utilisation; `None` where it gives none.
    pub utilization_gpu_pct: Option<u32>,
}

/// A GPU's MIG configuration at one reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigReading {
    /// MIG mode is on (current mode, not the pending one).
    pub enabled: bool,
    /// The instances, in GPU-instance then compute-instance order; empty
    /// when MIG is off or on with no instance created.
    pub instances: Vec<MigInstance>,
}

/// The slowly changing part of a reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlowReading {
    pub ecc: Option<Ecc>,
    /// `None` when the GPU does not report processes.
    pub processes: Option<Vec<Process>>,
    /// `None` when the GPU does not support MIG.
    pub mig: Option<MigReading>,
}

impl SlowReading {
    /// Keeps per-process shares consistent with the device's own figures:
    /// NVML samples processes and the device at different moments, so the
    /// processes' SM (or memory) percentages can add up to more than the
    /// device's utilisation read with them. Where they do, they are scaled
    /// down in proportion (rounding down), so no consumer ever sees the
    /// parts exceed the whole. Absent values stay absent.
    pub fn bound_process_shares(
        &mut self,
        device_sm_pct: Option<u32>,
        device_mem_pct: Option<u32>,
    ) {
        let Some(processes) = self.processes.as_mut() else {
            return;
        };
        type Pick = fn(&mut ProcessUtilization) -> &mut Option<u32>;
        let picks: [(Option<u32>, Pick); 2] = [
            (device_sm_pct, |u| &mut u.sm_pct),
            (device_mem_pct, |u| &mut u.memory_pct),
        ];
        for (device, pick) in picks {
            let Some(device) = device else {
                continue;
            };
            let sum: u32 = processes
                .iter_mut()
                .filter_map(|p| p.utilization.as_mut().and_then(|u| *pick(u)))
                .sum();
            if sum <= device {
                continue;
            }
            for p in processes.iter_mut() {
                if let Some(v) = p.utilization.as_mut().and_then(|u| pick(u).as_mut()) {
                    *v = (u64::from(*v) * u64::from(device) / u64::from(sum)) as u32;
                }
            }
        }
    }
}

/// One reading of one GPU. `None` means the GPU does not report the field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// The backend's clock when the GPU was read: monotonic time since the
    /// backend started (simulated time for the simulator). The governor
    /// measures time in this clock.
    pub device_time: Duration,
    pub temperature_c: Option<u32>,
    pub memory_temperature_c: Option<u32>,
    pub fan_speed_pct: Option<u32>,
    pub power_draw_mw: Option<u32>,
    pub power_limit_mw: Option<u32>,
    pub enforced_power_limit_mw: Option<u32>,
    pub energy_mj: Option<u64>,
    pub graphics_clock_mhz: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub video_clock_mhz: Option<u32>,
    pub utilization_gpu_pct: Option<u32>,
    pub utilization_memory_pct: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub performance_state: Option<u32>,
    /// Raw NVML clocks-event-reasons mask.
    pub throttle_mask: Option<u64>,
    pub pcie_tx_kbps: Option<u32>,
    pub pcie_rx_kbps: Option<u32>,
    /// Present only when the read asked for slow fields.
    pub slow: Option<SlowReading>,
    /// Graphics clock cap currently locked, when the backend knows it.
    pub locked_gpu_clock_max_mhz: Option<u32>,
    /// Profiling counters (NVML's GPM on Hopper and newer), when given.
    pub profiling: Option<Profiling>,
}

/// Profiling counters over the last sample period, each a fraction (0-1).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Profiling {
    pub graphics_engine_active: Option<f64>,
    pub tensor_active: Option<f64>,
    pub dram_active: Option<f64>,
}

/// Something the device reported on its own (not derived from a reading).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// An XID error.
    Xid(u64),
}

/// A GPU stack: NVML, or the simulator.
pub trait Backend: Send + Sync {
    /// Facts about the driver and library.
    fn host_facts(&self) -> HostFacts;
    /// How many GPUs there are (fixed for the daemon's lifetime).
    fn device_count(&self) -> Result<u32, BackendError>;
    /// Opens GPU `index`; called once per GPU at startup.
    fn open(&self, index: u32) -> Result<Box<dyn GpuDevice>, BackendError>;
}

/// One GPU. Driven from a single dedicated thread; every method may block.
pub trait GpuDevice: Send {
    /// Static facts: identity, limits, supported fields and controls. Called
    /// at startup and again when a lost GPU returns.
    fn describe(&mut self) -> Result<DeviceFacts, BackendError>;
    /// One reading. `Err(GpuLost)` marks the GPU lost; the sampler keeps
    /// calling `read` (less often) and a later `Ok` means it came back.
    fn read(&mut self, scope: ReadScope) -> Result<Reading, BackendError>;
    /// Events the device reported since the last call (e.g. XID errors).
    fn drain_events(&mut self) -> Vec<DeviceEvent> {
        Vec::new()
    }
    /// Sets the power management limit.
    fn set_power_limit(&mut self, limit_mw: u32) -> Result<(), BackendError>;
    /// Locks the graphics clocks into `[min_mhz, max_mhz]`.
    fn lock_gpu_clocks(&mut self, min_mhz: u32, max_mhz: u32) -> Result<(), BackendError>;
    /// Releases a graphics clock lock (`nvidia-smi -rgc`).
    fn reset_gpu_locked_clocks(&mut self) -> Result<(), BackendError>;
    /// Releases a memory clock lock (`nvidia-smi -rmc`).
    fn reset_memory_locked_clocks(&mut self) -> Result<(), BackendError>;
    /// Resets application clocks to default (`nvidia-smi -rac`).
    fn reset_application_clocks(&mut self) -> Result<(), BackendError>;
}

/// The clock writes of a test device that does not model clocks: each
/// succeeds and changes nothing. Used inside an `impl GpuDevice`.
#[cfg(test)]
macro_rules! accept_clock_writes {
    () => {
        fn lock_gpu_clocks(&mut self, _: u32, _: u32) -> Result<(), $crate::backend::BackendError> {
            Ok(())
        }
        fn reset_gpu_locked_clocks(&mut self) -> Result<(), $crate::backend::BackendError> {
            Ok(())
        }
        fn reset_memory_locked_clocks(&mut self) -> Result<(), $crate::backend::BackendError> {
            Ok(())
        }
        fn reset_application_clocks(&mut self) -> Result<(), $crate::backend::BackendError> {
            Ok(())
        }
    };
}
#[cfg(test)]
pub(crate) use accept_clock_writes;

#[cfg(test)]
mod tests {
    use super::*;

    fn h100() -> DeviceFacts {
        DeviceFacts {
            power_min_mw: Some(200_000),
            power_max_mw: Some(700_000),
            power_default_mw: Some(700_000),
            slowdown_c: Some(89),
            shutdown_c: Some(92),
            max_operating_c: Some(87),
            max_graphics_clock_mhz: Some(1980),
            ..DeviceFacts::default()
        }
    }

    fn with_sm(values: &[Option<u32>]) -> SlowReading {
        SlowReading {
            processes: Some(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Process {
                        pid: i as u32 + 1,
                        utilization: Some(ProcessUtilization {
                            sm_pct: *v,
                            memory_pct: Some(10),
                            ..ProcessUtilization::default()
                        }),
                        ..Process::default()
                    })
                    .collect(),
            ),
            ..SlowReading::default()
        }
    }

    fn sm(s: &SlowReading) -> Vec<Option<u32>> {
        s.processes
            .iter()
            .flatten()
            .map(|p| p.utilization.and_then(|u| u.sm_pct))
            .collect()
    }

    #[test]
    fn process_shares_over_the_device_are_scaled_down_and_absent_stays_absent() {
        let mut s = with_sm(&[Some(60), Some(50), None]);
        s.bound_process_shares(Some(80), Some(100));
        let after = sm(&s);
        assert_eq!(after[2], None);
        let sum: u32 = after.iter().flatten().sum();
        assert!(sum <= 80, "{after:?}");
        assert!(after[0] > after[1], "proportions kept: {after:?}");
        // Memory shares under the device figure are left alone.
        assert!(
            s.processes
                .iter()
                .flatten()
                .all(|p| p.utilization.and_then(|u| u.memory_pct) == Some(10))
        );
        // Shares under the device's are untouched; no device figure, no change.
        let mut s = with_sm(&[Some(20), Some(30)]);
        s.bound_process_shares(Some(90), None);
        assert_eq!(sm(&s), vec![Some(20), Some(30)]);
        s.bound_process_shares(None, None);
        assert_eq!(sm(&s), vec![Some(20), Some(30)]);
        // A device at 0 with processes claiming time: all 0.
        let mut s = with_sm(&[Some(5)]);
        s.bound_process_shares(Some(0), None);
        assert_eq!(sm(&s), vec![Some(0)]);
    }

    #[test]
    fn plausible_facts_pass_unchanged() {
        let mut facts = h100();
        assert!(facts.sanitize().is_empty());
        assert_eq!(facts, h100());
    }

    #[test]
    fn a_slowdown_temperature_of_zero_is_unknown_not_zero() {
        for bad in [0, 5, 39, 151, u32::MAX] {
            let mut facts = h100();
            facts.slowdown_c = Some(bad);
            let problems = facts.sanitize();
            assert_eq!(facts.slowdown_c, None, "{bad}");
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains("slowdown"), "{problems:?}");
        }
    }

    #[test]
    fn absurd_power_limits_are_unknown() {
        let mut facts = h100();
        facts.power_default_mw = Some(0);
        facts.sanitize();
        assert_eq!(facts.power_default_mw, None);
        assert_eq!(facts.power_min_mw, Some(200_000));

        let mut facts = h100();
        facts.power_min_mw = Some(800_000);
        let problems = facts.sanitize();
        assert_eq!(
            (
                facts.power_min_mw,
                facts.power_max_mw,
                facts.power_default_mw
            ),
            (None, None, None),
            "{problems:?}"
        );

        let mut facts = h100();
        facts.power_default_mw = Some(900_000);
        facts.sanitize();
        assert_eq!(facts.power_default_mw, None);
        assert_eq!(facts.power_max_mw, Some(700_000));
    }

    #[test]
    fn a_shutdown_below_slowdown_makes_both_unknown() {
        let mut facts = h100();
        facts.shutdown_c = Some(60);
        facts.sanitize();
        assert_eq!((facts.slowdown_c, facts.shutdown_c), (None, None));
    }
}
