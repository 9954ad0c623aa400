//! One GPU through NVML: probing, reading, writing, losing and finding it.
//!
//! Owns a cached `Device<'static>` handle and the set of telemetry fields the
//! GPU was found to support. Probing calls each read once and takes only
//! `NotSupported` (or a symbol missing from the library) to mean "absent";
//! `read` then never calls what is absent, and a field that fails is `None`,
//! never 0. Controls are inferred without writing anything:
//! - power limit settable: the limit constraints are readable and the
//!   driver exports the setter;
//! - graphics clocks lockable: the architecture is Volta or newer (NVML's
//!   documented floor for `nvmlDeviceSetGpuLockedClocks`) and the driver
//!   exports the lock/reset pair;
//! - memory clocks lockable: Ampere or newer (the floor for
//!   `nvmlDeviceSetMemoryLockedClocks`) and the reset is exported;
//! - application clocks resettable: the application clock is readable
//!   (GeForce boards answer NotSupported) and the reset is exported;
//! - XID events: registering for them succeeded.
//!
//! On Hopper and newer datacenter GPUs it also reads the profiling counters
//! (graphics engine, tensor pipes and memory interface busy) through GPU
//! Performance Monitoring: each slow read takes a GPM sample and compares it
//! with the previous one, so the values cover the last slow period. A GPU or
//! library without GPM (the query answers false or NotSupported, or the
//! symbols are missing) has none of them.
//!
//! On the slow cadence it also reads who is on the GPU: compute and
//! graphics processes merged by pid, per-process utilisation from NVML's
//! samples (asking only for samples newer than the last one seen), and, on
//! a GPU in MIG mode, each MIG device with its processes (`processes.rs`
//! puts the answers together). Whether each of those calls is supported is
//! probed with the rest and remembered; process utilisation is probed again
//! when the MIG mode changes, since GPUs refuse it in MIG mode.
//!
//! A GPU that fell off the bus (`GpuLost`, `ResetRequired`, the driver
//! going away, or an `Unknown` error confirmed by the handle no longer
//! resolving) marks the device lost; every later call first tries to
//! re-acquire the handle by UUID, so a GPU that returns reads again.

use std::{
    collections::{BTreeSet, HashMap},
    time::Instant,
};

use nvml_wrapper::{
    Device, GpmSample, Nvml,
    enum_wrappers::device::{
        Clock, EccCounter, MemoryError, PcieUtilCounter, PerformanceState, TemperatureSensor,
        TemperatureThreshold,
    },
    enums::{
        device::{DeviceArchitecture, GpuLockedClocksSetting, SampleValue},
        gpm::GpmMetricId,
    },
    error::NvmlError,
    struct_wrappers::device::ProcessInfo,
    structs::device::FieldId,
    sys_exports::field_id::NVML_FI_DEV_MEMORY_TEMP,
};

use super::{
    context,
    events::DeviceEvents,
    events::EventWatcher,
    map_error,
    processes::{self, MigProcesses},
    raw,
};
use crate::backend::{
    BackendError, Controls, DeviceEvent, DeviceFacts, Ecc, Field, GpuDevice, MigInstance,
    MigReading, ProcessUtilization, Profiling, ReadScope, Reading, SlowReading,
};

/// NVML's `NVML_DEVICE_MIG_ENABLE`: the value of an enabled MIG mode.
const MIG_ENABLED: u32 = 1;

/// What a probing call found.
enum Probe<T> {
    /// Supported, with its value.
    Value(T),
    /// Supported, but this call failed for another reason.
    Failed,
    /// Not supported by this GPU or driver.
    Absent,
}

impl<T> Probe<T> {
    fn value(self) -> Option<T> {
        match self {
            Probe::Value(v) => Some(v),
            Probe::Failed | Probe::Absent => None,
        }
    }
}

/// One GPU.
pub(super) struct NvmlDevice {
    nvml: &'static Nvml,
    index: u32,
    uuid: String,
    handle: Device<'static>,
    lost: bool,
    /// Fields found supported; `None` until the first probe.
    supported: Option<BTreeSet<Field>>,
    started: Instant,
    events: DeviceEvents,
    /// The graphics clock cap this backend locked, while it holds.
    locked_gpu_clock_max_mhz: Option<u32>,
    /// Values read on the slow cadence only.
    slow_cache: SlowCache,
    /// What is known about the slow read's process and MIG calls.
    slow_probes: SlowProbes,
    /// GPU Performance Monitoring: whether the GPU has it, and the last
    /// sample the next one is compared with.
    gpm: Gpm,
    /// The profiling counters of the last slow read.
    gpm_cache: Option<Profiling>,
}

/// GPM as far as it is known for one GPU.
#[derive(Debug, Default)]
enum Gpm {
    #[default]
    Unprobed,
    Unsupported,
    Ready(Option<GpmSample<'static>>),
}

/// Whether a call is supported, as far as is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Support {
    /// Not asked yet, or the last answer was an error that says nothing.
    #[default]
    Unknown,
    Yes,
    /// Answered NotSupported (or the symbol is missing): not asked again
    /// until the next `describe`.
    No,
}

impl<T> From<&Probe<T>> for Support {
    fn from(probe: &Probe<T>) -> Self {
        match probe {
            Probe::Value(_) => Support::Yes,
            Probe::Absent => Support::No,
            Probe::Failed => Support::Unknown,
        }
    }
}

/// The slow read's process and MIG calls: support, and the state that
/// makes each process utilisation query return only new samples.
#[derive(Debug, Clone, Copy, Default)]
struct SlowProbes {
    graphics_processes: Support,
    process_utilization: Support,
    /// Timestamp (µs) of the newest process utilisation sample seen.
    utilization_last_seen_us: u64,
    mig: Support,
    /// Utilisation rates on a MIG device (GPUs usually refuse them).
    mig_device_utilization: Support,
    /// MIG mode at the last slow read.
    mig_enabled: Option<bool>,
}

/// Fields that are expensive to read, from the last slow read.
#[derive(Debug, Clone, Copy, Default)]
struct SlowCache {
    filled: bool,
    energy_mj: Option<u64>,
    pcie_tx_kbps: Option<u32>,
    pcie_rx_kbps: Option<u32>,
}

impl std::fmt::Debug for NvmlDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlDevice")
            .field("index", &self.index)
            .field("uuid", &self.uuid)
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

fn is_unsupported(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)
    )
}

/// Errors that mean the GPU (or the driver under it) is gone.
fn is_lost(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::GpuLost | NvmlError::ResetRequired | NvmlError::DriverNotLoaded
    )
}

impl NvmlDevice {
    pub(super) fn open(
        nvml: &'static Nvml,
        index: u32,
        started: Instant,
        events: &EventWatcher,
    ) -> Result<Self, BackendError> {
        let opening = format!("opening GPU {index}");
        let handle = nvml
            .device_by_index(index)
            .map_err(|e| context(&opening, map_error(e)))?;
        let uuid = handle.uuid().map_err(|e| context(&opening, map_error(e)))?;
        let events = events.attach(nvml, &handle, index);
        Ok(Self {
            nvml,
            index,
            uuid,
            handle,
            lost: false,
            supported: None,
            started,
            events,
            locked_gpu_clock_max_mhz: None,
            slow_cache: SlowCache::default(),
            slow_probes: SlowProbes::default(),
            gpm: Gpm::Unprobed,
            gpm_cache: None,
        })
    }

    fn lost_error(&self, why: impl std::fmt::Display) -> BackendError {
        BackendError::GpuLost(format!("GPU {} ({}): {why}", self.index, self.uuid))
    }

    /// After a loss, looks the GPU up again by UUID; a GPU that answers is
    /// back (with its settings reset, so locks this backend made are gone).
    fn reacquire_if_lost(&mut self) -> Result<(), BackendError> {
        if !self.lost {
            return Ok(());
        }
        let handle = self
            .nvml
            .device_by_uuid(self.uuid.as_str())
            .map_err(|e| self.lost_error(format!("still lost ({e})")))?;
        tracing::info!("GPU {} ({}) answers again", self.index, self.uuid);
        self.handle = handle;
        self.lost = false;
        self.locked_gpu_clock_max_mhz = None;
        // A sample from before the loss says nothing about the GPU now.
        self.gpm = Gpm::Unprobed;
        self.gpm_cache = None;
        if self.events.active() {
            self.events.register(self.nvml, &self.handle);
        }
        Ok(())
    }

    /// Decides whether `e` means the GPU is gone, marking it lost if so.
    /// `Unknown` is what some drivers answer for a GPU that fell off the
    /// bus; it counts as lost when the UUID no longer resolves either.
    fn check_lost(&mut self, e: &NvmlError) -> bool {
        let lost = is_lost(e)
            || (matches!(e, NvmlError::Unknown)
                && self
                    .nvml
                    .device_by_uuid(self.uuid.as_str())
                    .is_err_and(|again| {
                        is_lost(&again) || matches!(again, NvmlError::Unknown | NvmlError::NotFound)
                    }));
        if lost && !self.lost {
            tracing::warn!("GPU {} ({}) is lost: {e}", self.index, self.uuid);
        }
        self.lost |= lost;
        lost
    }

    /// Calls `f` once to learn whether the GPU supports it.
    fn probe<T>(
        &mut self,
        f: impl FnOnce(&Device<'static>) -> Result<T, NvmlError>,
    ) -> Result<Probe<T>, BackendError> {
        let result = f(&self.handle);
        self.judge("probe", result)
    }

    /// Sorts the answer of a call (on the GPU or one of its MIG devices)
    /// into value, unsupported, or failed; a lost GPU is an error.
    fn judge<T>(
        &mut self,
        what: &str,
        result: Result<T, NvmlError>,
    ) -> Result<Probe<T>, BackendError> {
        match result {
            Ok(v) => Ok(Probe::Value(v)),
            Err(e) if is_unsupported(&e) => Ok(Probe::Absent),
            Err(e) if self.check_lost(&e) => Err(self.lost_error(e)),
            Err(e) => {
                tracing::debug!("GPU {}: {what} failed: {e}", self.index);
                Ok(Probe::Failed)
            }
        }
    }

    /// Probes `f` for `field`, recording it in `fields` when supported.
    fn probe_field<T>(
        &mut self,
        fields: &mut BTreeSet<Field>,
        field: Field,
        f: impl FnOnce(&Device<'static>) -> Result<T, NvmlError>,
    ) -> Result<Option<T>, BackendError> {
        let probe = self.probe(f)?;
        if !matches!(probe, Probe::Absent) {
            fields.insert(field);
        }
        Ok(probe.value())
    }

    /// Reads `field` with `f` if the GPU supports it. A field that turns out
    /// unsupported is not asked again (until the next `describe`).
    fn field<T>(
        &mut self,
        field: Field,
        f: impl FnOnce(&Device<'static>) -> Result<T, NvmlError>,
    ) -> Result<Option<T>, BackendError> {
        if !self.supported.as_ref().is_some_and(|s| s.contains(&field)) {
            return Ok(None);
        }
        match f(&self.handle) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_unsupported(&e) => {
                if let Some(s) = self.supported.as_mut() {
                    s.remove(&field);
                }
                Ok(None)
            }
            Err(e) if self.check_lost(&e) => Err(self.lost_error(e)),
            Err(e) => {
                tracing::debug!("GPU {}: reading {field:?} failed: {e}", self.index);
                Ok(None)
            }
        }
    }

    /// The profiling counters since the previous read, through GPM; None
    /// without GPM, on the first read (nothing to compare with yet) and on
    /// any failure (logged at debug; the next read starts over).
    fn read_gpm(&mut self) -> Option<Profiling> {
        if matches!(self.gpm, Gpm::Unprobed) {
            self.gpm = match self.handle.gpm_support() {
                Ok(true) => Gpm::Ready(None),
                Ok(false) => Gpm::Unsupported,
                Err(e) if is_unsupported(&e) => Gpm::Unsupported,
                Err(e) => {
                    tracing::debug!("GPU {}: GPM support unknown: {e}", self.index);
                    return None;
                }
            };
        }
        let Gpm::Ready(previous) = &mut self.gpm else {
            return None;
        };
        let sample = match self.handle.gpm_sample() {
            Ok(sample) => sample,
            Err(e) => {
                tracing::debug!("GPU {}: GPM sample failed: {e}", self.index);
                *previous = None;
                return None;
            }
        };
        let before = previous.replace(sample)?;
        let after = previous.as_ref()?;
        const METRICS: [GpmMetricId; 3] = [
            GpmMetricId::GraphicsUtil,
            GpmMetricId::AnyTensorUtil,
            GpmMetricId::DramBwUtil,
        ];
        let results = match nvml_wrapper::gpm::gpm_metrics_get(self.nvml, &before, after, &METRICS)
        {
            Ok(results) => results,
            Err(e) => {
                tracing::debug!("GPU {}: GPM metrics failed: {e}", self.index);
                return None;
            }
        };
        // GPM answers percentages; the counters are fractions.
        let value = |i: usize| {
            results
                .get(i)?
                .as_ref()
                .ok()
                .map(|r| (r.value / 100.0).clamp(0.0, 1.0))
        };
        Some(Profiling {
            graphics_engine_active: value(0),
            tensor_active: value(1),
            dram_active: value(2),
        })
    }

    /// Probes every telemetry field and control. Returns the facts and
    /// caches the supported fields.
    fn probe_all(&mut self) -> Result<DeviceFacts, BackendError> {
        let mut fields = BTreeSet::new();
        let f = &mut fields;

        // Identity.
        let name = self.probe(|d| d.name())?.value().unwrap_or_default();
        let pci_bus_id = self
            .probe(|d| d.pci_info())?
            .value()
            .map(|p| p.bus_id)
            .unwrap_or_default();

        // Telemetry.
        self.probe_field(f, Field::Temperature, |d| {
            d.temperature(TemperatureSensor::Gpu)
        })?;
        self.probe_field(f, Field::MemoryTemperature, memory_temperature)?;
        // Passively cooled boards (SXM) report no fans, and fan 0 then
        // answers InvalidArgument rather than NotSupported.
        if self.probe(|d| d.num_fans())?.value() != Some(0) {
            self.probe_field(f, Field::FanSpeed, |d| {
                d.fan_speed(0).map_err(|e| match e {
                    NvmlError::InvalidArg => NvmlError::NotSupported,
                    other => other,
                })
            })?;
        }
        self.probe_field(f, Field::PowerDraw, |d| d.power_usage())?;
        self.probe_field(f, Field::PowerLimit, |d| d.power_management_limit())?;
        self.probe_field(f, Field::EnforcedPowerLimit, |d| d.enforced_power_limit())?;
        self.probe_field(f, Field::Energy, |d| d.total_energy_consumption())?;
        self.probe_field(f, Field::GraphicsClock, |d| d.clock_info(Clock::Graphics))?;
        self.probe_field(f, Field::SmClock, |d| d.clock_info(Clock::SM))?;
        self.probe_field(f, Field::MemoryClock, |d| d.clock_info(Clock::Memory))?;
        self.probe_field(f, Field::VideoClock, |d| d.clock_info(Clock::Video))?;
        self.probe_field(f, Field::Utilization, |d| d.utilization_rates())?;
        let memory = self.probe_field(f, Field::MemoryUsage, |d| d.memory_info())?;
        self.probe_field(f, Field::PerformanceState, |d| d.performance_state())?;
        self.probe_field(f, Field::ThrottleReasons, |d| d.current_throttle_reasons())?;
        self.probe_field(f, Field::PcieThroughput, |d| {
            d.pcie_throughput(PcieUtilCounter::Send)
        })?;
        self.probe_field(f, Field::Processes, |d| d.running_compute_processes())?;
        // ECC counts only mean something while ECC is on.
        if self
            .probe(|d| d.is_ecc_enabled())?
            .value()
            .is_some_and(|mode| mode.currently_enabled)
        {
            self.probe_field(f, Field::EccErrors, |d| {
                d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
            })?;
        }

        // Limits.
        let max_graphics =
            self.probe_field(f, Field::MaxClocks, |d| d.max_clock_info(Clock::Graphics))?;
        let max_sm = self.probe(|d| d.max_clock_info(Clock::SM))?.value();
        let max_memory = self.probe(|d| d.max_clock_info(Clock::Memory))?.value();
        let max_video = self.probe(|d| d.max_clock_info(Clock::Video))?.value();
        let constraints = self.probe(|d| d.power_management_limit_constraints())?;
        let power_default = self.probe(|d| d.power_management_limit_default())?.value();
        let threshold = |t| move |d: &Device<'static>| d.temperature_threshold(t);
        let slowdown = self
            .probe(threshold(TemperatureThreshold::Slowdown))?
            .value();
        let shutdown = self
            .probe(threshold(TemperatureThreshold::Shutdown))?
            .value();
        let max_operating = self.probe(threshold(TemperatureThreshold::GpuMax))?.value();

        // Controls, inferred without writing.
        let lib = self.nvml.lib();
        let power_limit_settable =
            matches!(constraints, Probe::Value(_)) && lib.nvmlDeviceSetPowerManagementLimit.is_ok();
        let architecture = self.probe(|d| d.architecture())?;
        let at_least = |floor: u32| match &architecture {
            Probe::Value(arch) => architecture_rank(arch) >= floor,
            Probe::Failed | Probe::Absent => false,
        };
        let gpu_clocks_lockable = at_least(VOLTA)
            && lib.nvmlDeviceSetGpuLockedClocks.is_ok()
            && lib.nvmlDeviceResetGpuLockedClocks.is_ok();
        let memory_clocks_lockable =
            at_least(AMPERE) && lib.nvmlDeviceResetMemoryLockedClocks.is_ok();
        let application_clocks_resettable = matches!(
            self.probe(|d| d.applications_clock(Clock::Graphics))?,
            Probe::Value(_)
        ) && lib.nvmlDeviceResetApplicationsClocks.is_ok();

        // Who is on the GPU (read on the slow cadence). Process utilisation
        // is probed without moving the last-seen timestamp, so the first
        // slow read gets the driver's whole buffer; "no sample yet" is an
        // answer, not a failure.
        let graphics = self.probe(|d| d.running_graphics_processes())?;
        let utilization = self.probe(|d| match d.process_utilization_stats(None) {
            Err(NvmlError::NotFound) => Ok(Vec::new()),
            other => other,
        })?;
        let mig = self.probe(|d| d.mig_mode())?;
        self.slow_probes = SlowProbes {
            graphics_processes: Support::from(&graphics),
            process_utilization: Support::from(&utilization),
            mig: Support::from(&mig),
            ..SlowProbes::default()
        };

        let constraints = constraints.value();
        let facts = DeviceFacts {
            index: self.index,
            uuid: self.uuid.clone(),
            name,
            pci_bus_id,
            power_min_mw: constraints.as_ref().map(|c| c.min_limit),
            power_max_mw: constraints.as_ref().map(|c| c.max_limit),
            power_default_mw: power_default,
            slowdown_c: slowdown,
            shutdown_c: shutdown,
            max_operating_c: max_operating,
            max_graphics_clock_mhz: max_graphics,
            max_sm_clock_mhz: max_sm,
            max_memory_clock_mhz: max_memory,
            max_video_clock_mhz: max_video,
            memory_total_bytes: memory.map(|m| m.total),
            fields: fields.iter().copied().collect(),
            controls: Controls {
                power_limit_settable,
                gpu_clocks_lockable,
                memory_clocks_lockable,
                application_clocks_resettable,
                xid_events: self.events.active(),
            },
        };
        self.supported = Some(fields);
        Ok(facts)
    }

    fn read_slow(&mut self) -> Result<SlowReading, BackendError> {
        let ecc = if self
            .supported
            .as_ref()
            .is_some_and(|s| s.contains(&Field::EccErrors))
        {
            let count =
                |kind, counter| move |d: &Device<'static>| d.total_ecc_errors(kind, counter);
            Some(Ecc {
                corrected_volatile: self.field(
                    Field::EccErrors,
                    count(MemoryError::Corrected, EccCounter::Volatile),
                )?,
                uncorrected_volatile: self.field(
                    Field::EccErrors,
                    count(MemoryError::Uncorrected, EccCounter::Volatile),
                )?,
                corrected_aggregate: self.field(
                    Field::EccErrors,
                    count(MemoryError::Corrected, EccCounter::Aggregate),
                )?,
                uncorrected_aggregate: self.field(
                    Field::EccErrors,
                    count(MemoryError::Uncorrected, EccCounter::Aggregate),
                )?,
            })
        } else {
            None
        };
        let (mig, mig_processes) = match self.read_mig()? {
            Some((reading, placed)) => (Some(reading), placed),
            None => (None, Vec::new()),
        };
        self.note_mig_mode(mig.as_ref().map(|m| m.enabled));
        let processes = match self.field(Field::Processes, |d| d.running_compute_processes())? {
            Some(compute) => {
                let graphics = self.read_graphics_processes()?;
                let utilization = self.read_process_utilization()?;
                Some(processes::merge(
                    &compute,
                    &graphics,
                    &mig_processes,
                    utilization.as_ref(),
                ))
            }
            None => None,
        };
        Ok(SlowReading {
            ecc,
            processes,
            mig,
        })
    }

    /// Remembers the MIG mode; a change makes process utilisation worth
    /// asking about again (GPUs refuse it in MIG mode and give it outside).
    fn note_mig_mode(&mut self, enabled: Option<bool>) {
        let probes = &mut self.slow_probes;
        if let Some(before) = probes.mig_enabled
            && enabled != Some(before)
        {
            tracing::info!(
                "GPU {} ({}): MIG mode changed from {} to {}",
                self.index,
                self.uuid,
                if before { "on" } else { "off" },
                match enabled {
                    Some(true) => "on",
                    Some(false) => "off",
                    None => "unreadable",
                }
            );
            probes.process_utilization = Support::Unknown;
            probes.utilization_last_seen_us = 0;
            probes.mig_device_utilization = Support::Unknown;
        }
        if enabled.is_some() {
            probes.mig_enabled = enabled;
        }
    }

    /// Graphics processes; empty where the GPU does not list them.
    fn read_graphics_processes(&mut self) -> Result<Vec<ProcessInfo>, BackendError> {
        if self.slow_probes.graphics_processes == Support::No {
            return Ok(Vec::new());
        }
        let result = self.handle.running_graphics_processes();
        let probe = self.judge("listing graphics processes", result)?;
        if probe_says_no(&probe) {
            self.slow_probes.graphics_processes = Support::No;
        }
        Ok(probe.value().unwrap_or_default())
    }

    /// The latest utilisation sample of each process since the last call;
    /// `None` where the GPU gives no samples.
    fn read_process_utilization(
        &mut self,
    ) -> Result<Option<HashMap<u32, ProcessUtilization>>, BackendError> {
        if self.slow_probes.process_utilization == Support::No {
            return Ok(None);
        }
        let last_seen = self.slow_probes.utilization_last_seen_us;
        let mut result = self.handle.process_utilization_stats(last_seen);
        if matches!(result, Err(NvmlError::InsufficientSize(_))) {
            // A sample arrived between the wrapper's count and its fetch.
            result = self.handle.process_utilization_stats(last_seen);
        }
        let result = match result {
            // Nothing newer than the last sample: supported, no samples.
            Err(NvmlError::NotFound) => Ok(Vec::new()),
            other => other,
        };
        match self.judge("reading process utilisation", result)? {
            Probe::Value(samples) => {
                self.slow_probes.process_utilization = Support::Yes;
                if let Some(newest) = samples.iter().map(|s| s.timestamp).max() {
                    self.slow_probes.utilization_last_seen_us = newest.max(last_seen);
                }
                Ok(Some(processes::latest_per_pid(&samples)))
            }
            Probe::Absent => {
                self.slow_probes.process_utilization = Support::No;
                Ok(None)
            }
            // Supported as far as is known, but nothing to say this time.
            Probe::Failed => Ok(Some(HashMap::new())),
        }
    }

    /// The MIG mode and, when it is on, each MIG device with the processes
    /// it lists; `None` where the GPU has no MIG.
    fn read_mig(&mut self) -> Result<Option<(MigReading, Vec<MigProcesses>)>, BackendError> {
        if self.slow_probes.mig == Support::No {
            return Ok(None);
        }
        let result = self.handle.mig_mode();
        let mode = match self.judge("reading the MIG mode", result)? {
            Probe::Value(mode) => mode,
            Probe::Absent => {
                self.slow_probes.mig = Support::No;
                return Ok(None);
            }
            Probe::Failed => return Ok(None),
        };
        self.slow_probes.mig = Support::Yes;
        if mode.current != MIG_ENABLED {
            return Ok(Some((MigReading::default(), Vec::new())));
        }
        // The maximum count: indices no instance fills answer NotFound.
        let result = self.handle.mig_device_count();
        let slots = self
            .judge("counting MIG devices", result)?
            .value()
            .unwrap_or(0);
        let mut found = Vec::new();
        for slot in 0..slots {
            let child = match self.handle.mig_device_by_index(slot) {
                Ok(child) => child,
                Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
                Err(e) => {
                    self.judge::<()>("opening a MIG device", Err(e))?;
                    continue;
                }
            };
            if let Some(instance) = self.read_mig_device(&child)? {
                found.push(instance);
            }
        }
        found.sort_by_key(|(m, _)| (m.gpu_instance_id, m.compute_instance_id));
        let (instances, placed) = found.into_iter().unzip();
        Ok(Some((
            MigReading {
                enabled: true,
                instances,
            },
            placed,
        )))
    }

    /// One MIG device: identity, profile, memory, SMs, utilisation where
    /// NVML gives it, and its processes. `None` when it cannot be named
    /// (no UUID or instance ids), e.g. destroyed while being read.
    fn read_mig_device(
        &mut self,
        child: &Device<'static>,
    ) -> Result<Option<(MigInstance, MigProcesses)>, BackendError> {
        let uuid = child.uuid();
        let Probe::Value(uuid) = self.judge("reading a MIG device's UUID", uuid)? else {
            return Ok(None);
        };
        let gi = raw::gpu_instance_id(self.nvml, child);
        let gi = self.judge("reading a GPU instance id", gi)?;
        let ci = raw::compute_instance_id(self.nvml, child);
        let ci = self.judge("reading a compute instance id", ci)?;
        let (Probe::Value(gpu_instance_id), Probe::Value(compute_instance_id)) = (gi, ci) else {
            tracing::debug!("GPU {}: MIG device {uuid} has no instance ids", self.index);
            return Ok(None);
        };
        let name = child.name();
        let name = self.judge("reading a MIG device's name", name)?.value();
        let attributes = child.attributes();
        let attributes = self
            .judge("reading a MIG device's attributes", attributes)?
            .value();
        let profile = name
            .as_deref()
            .and_then(processes::profile_from_name)
            .or_else(|| {
                attributes.as_ref().and_then(|a| {
                    processes::profile_from_attributes(a.gpu_instance_slice_count, a.memory_size_mb)
                })
            })
            .unwrap_or_default();
        let memory = child.memory_info();
        let memory = self.judge("reading a MIG device's memory", memory)?.value();
        let utilization_gpu_pct = if self.slow_probes.mig_device_utilization == Support::No {
            None
        } else {
            let rates = child.utilization_rates();
            let probe = self.judge("reading a MIG device's utilisation", rates)?;
            self.slow_probes.mig_device_utilization = Support::from(&probe);
            probe.value().map(|u| u.gpu.min(100))
        };
        let listed = child.running_compute_processes();
        let listed = self
            .judge("listing a MIG device's processes", listed)?
            .value()
            .unwrap_or_default();
        Ok(Some((
            MigInstance {
                uuid: uuid.clone(),
                gpu_instance_id,
                compute_instance_id,
                profile,
                sm_count: attributes.map(|a| a.multiprocessor_count),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                utilization_gpu_pct,
            },
            MigProcesses {
                uuid,
                gpu_instance_id,
                compute_instance_id,
                processes: listed,
            },
        )))
    }

    /// Runs a write, marking the GPU lost when the write says so.
    fn write(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Device<'static>) -> Result<(), NvmlError>,
    ) -> Result<(), BackendError> {
        self.reacquire_if_lost()?;
        match f(&mut self.handle) {
            Ok(()) => Ok(()),
            Err(e) if self.check_lost(&e) => Err(self.lost_error(format!("{what}: {e}"))),
            Err(e) => Err(context(
                format!("{what} on GPU {}", self.index),
                map_error(e),
            )),
        }
    }
}

fn probe_says_no<T>(probe: &Probe<T>) -> bool {
    matches!(probe, Probe::Absent)
}

const VOLTA: u32 = 5;
const AMPERE: u32 = 7;

/// NVML's architecture number; newer than this crate knows counts as newest.
fn architecture_rank(arch: &DeviceArchitecture) -> u32 {
    match arch {
        DeviceArchitecture::Kepler => 2,
        DeviceArchitecture::Maxwell => 3,
        DeviceArchitecture::Pascal => 4,
        DeviceArchitecture::Volta => VOLTA,
        DeviceArchitecture::Turing => 6,
        DeviceArchitecture::Ampere => AMPERE,
        DeviceArchitecture::Ada => 8,
        DeviceArchitecture::Hopper => 9,
        DeviceArchitecture::Blackwell => 10,
        DeviceArchitecture::Unknown => u32::MAX,
    }
}

/// HBM temperature, only available as NVML field value 82.
fn memory_temperature(d: &Device<'static>) -> Result<u32, NvmlError> {
    let sample = d
        .field_values_for(&[FieldId(NVML_FI_DEV_MEMORY_TEMP)])?
        .into_iter()
        .next()
        .ok_or(NvmlError::NotSupported)??;
    Ok(match sample.value? {
        SampleValue::U32(v) => v,
        SampleValue::U64(v) => u32::try_from(v).unwrap_or(u32::MAX),
        SampleValue::I64(v) => u32::try_from(v.max(0)).unwrap_or(u32::MAX),
        SampleValue::F64(v) => v.round().clamp(0.0, f64::from(u32::MAX)) as u32,
    })
}

fn pstate_number(state: PerformanceState) -> Option<u32> {
    match state {
        PerformanceState::Unknown => None,
        known => Some(known.as_c()),
    }
}

impl GpuDevice for NvmlDevice {
    fn describe(&mut self) -> Result<DeviceFacts, BackendError> {
        self.reacquire_if_lost()?;
        self.probe_all()
    }

    fn read(&mut self, scope: ReadScope) -> Result<Reading, BackendError> {
        self.reacquire_if_lost()?;
        if self.supported.is_none() {
            self.probe_all()?;
        }
        let device_time = self.started.elapsed();
        let temperature_c = self.field(Field::Temperature, |d| {
            d.temperature(TemperatureSensor::Gpu)
        })?;
        let memory_temperature_c = self.field(Field::MemoryTemperature, memory_temperature)?;
        let fan_speed_pct = self.field(Field::FanSpeed, |d| d.fan_speed(0))?;
        let power_draw_mw = self.field(Field::PowerDraw, |d| d.power_usage())?;
        let power_limit_mw = self.field(Field::PowerLimit, |d| d.power_management_limit())?;
        let enforced_power_limit_mw =
            self.field(Field::EnforcedPowerLimit, |d| d.enforced_power_limit())?;
        // PCIe throughput takes NVML ~20 ms per counter (it samples the link)
        // and the energy counter a few ms: read them on the slow cadence and
        // report the latest value in between.
        if scope.slow_fields || !self.slow_cache.filled {
            self.slow_cache = SlowCache {
                filled: true,
                energy_mj: self.field(Field::Energy, |d| d.total_energy_consumption())?,
                pcie_tx_kbps: self.field(Field::PcieThroughput, |d| {
                    d.pcie_throughput(PcieUtilCounter::Send)
                })?,
                pcie_rx_kbps: self.field(Field::PcieThroughput, |d| {
                    d.pcie_throughput(PcieUtilCounter::Receive)
                })?,
            };
        }
        let SlowCache {
            energy_mj,
            pcie_tx_kbps,
            pcie_rx_kbps,
            ..
        } = self.slow_cache;
        let graphics_clock_mhz =
            self.field(Field::GraphicsClock, |d| d.clock_info(Clock::Graphics))?;
        let sm_clock_mhz = self.field(Field::SmClock, |d| d.clock_info(Clock::SM))?;
        let memory_clock_mhz = self.field(Field::MemoryClock, |d| d.clock_info(Clock::Memory))?;
        let video_clock_mhz = self.field(Field::VideoClock, |d| d.clock_info(Clock::Video))?;
        let utilization = self.field(Field::Utilization, |d| d.utilization_rates())?;
        let memory = self.field(Field::MemoryUsage, |d| d.memory_info())?;
        let performance_state = self
            .field(Field::PerformanceState, |d| d.performance_state())?
            .and_then(pstate_number);
        let throttle_mask = self
            .field(Field::ThrottleReasons, |d| d.current_throttle_reasons())?
            .map(|reasons| reasons.bits());
        let slow = if scope.slow_fields {
            Some(self.read_slow()?)
        } else {
            None
        };
        // GPM samples cost the driver more than a plain query: take them on
        // the slow cadence, over the slow period, and report the latest
        // values in between (as for PCIe throughput).
        if scope.slow_fields || matches!(self.gpm, Gpm::Unprobed) {
            self.gpm_cache = self.read_gpm();
        }
        let profiling = self.gpm_cache;
        Ok(Reading {
            device_time,
            temperature_c,
            memory_temperature_c,
            fan_speed_pct,
            power_draw_mw,
            power_limit_mw,
            enforced_power_limit_mw,
            energy_mj,
            graphics_clock_mhz,
            sm_clock_mhz,
            memory_clock_mhz,
            video_clock_mhz,
            utilization_gpu_pct: utilization.as_ref().map(|u| u.gpu),
            utilization_memory_pct: utilization.as_ref().map(|u| u.memory),
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
            performance_state,
            throttle_mask,
            pcie_tx_kbps,
            pcie_rx_kbps,
            slow,
            locked_gpu_clock_max_mhz: self.locked_gpu_clock_max_mhz,
            profiling,
        })
    }

    fn drain_events(&mut self) -> Vec<DeviceEvent> {
        self.events.drain()
    }

    fn set_power_limit(&mut self, limit_mw: u32) -> Result<(), BackendError> {
        self.write("setting the power limit", |d| {
            d.set_power_management_limit(limit_mw)
        })
    }

    fn lock_gpu_clocks(&mut self, min_mhz: u32, max_mhz: u32) -> Result<(), BackendError> {
        self.write("locking graphics clocks", |d| {
            d.set_gpu_locked_clocks(GpuLockedClocksSetting::Numeric {
                min_clock_mhz: min_mhz,
                max_clock_mhz: max_mhz,
            })
        })?;
        self.locked_gpu_clock_max_mhz = Some(max_mhz);
        Ok(())
    }

    fn reset_gpu_locked_clocks(&mut self) -> Result<(), BackendError> {
        self.write("resetting locked graphics clocks", |d| {
            d.reset_gpu_locked_clocks()
        })?;
        self.locked_gpu_clock_max_mhz = None;
        Ok(())
    }

    fn reset_memory_locked_clocks(&mut self) -> Result<(), BackendError> {
        self.write("resetting locked memory clocks", |d| {
            d.reset_mem_locked_clocks()
        })
    }

    fn reset_application_clocks(&mut self) -> Result<(), BackendError> {
        self.write("resetting application clocks", |d| {
            d.reset_applications_clocks()
        })
    }
}
