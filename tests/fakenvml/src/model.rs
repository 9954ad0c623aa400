//! One fake GPU: its board's fixed numbers and its changing state.
//!
//! Owns the small physical model behind every answer, so that answers hang
//! together the way a real GPU's do: power drawn is the workload's demand
//! capped by the power limit, temperature follows power, clocks drop when the
//! power cap or a clock lock bites, energy integrates power over time, and the
//! throttle-reason mask says why. Writes change the state (a set followed by a
//! get round-trips) after the range checks NVML itself makes.
//!
//! It also owns who is on the GPU: per-process utilisation samples whose SM
//! shares never add up to more than the device's utilisation, and MIG: the
//! H100 profile table, the instances a config lays out (ids assigned,
//! UUIDs derived, layouts that overfill the GPU refused by [`check_gpu`]).

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use nvml_wrapper_sys::bindings::*;

use crate::config::{Feature, GpuConfig, LostError, ModelKind, ProcessConfig};

/// The fixed numbers of a board.
#[derive(Debug, Clone)]
pub struct Board {
    pub name: &'static str,
    pub architecture: nvmlDeviceArchitecture_t,
    pub pci_device_id: u32,
    pub power_min_mw: u32,
    pub power_max_mw: u32,
    pub power_default_mw: u32,
    pub idle_w: f64,
    pub thermal_resistance_c_per_w: f64,
    pub shutdown_c: u32,
    pub slowdown_c: u32,
    pub gpu_max_c: u32,
    pub memory_max_c: u32,
    pub max_graphics_mhz: u32,
    pub idle_graphics_mhz: u32,
    pub max_memory_mhz: u32,
    pub idle_memory_mhz: u32,
    pub max_video_mhz: u32,
    pub memory_total_bytes: u64,
    pub memory_reserved_bytes: u64,
    pub pcie_max_kbps: u32,
    /// Streaming multiprocessors of the whole GPU.
    pub sm_count: u32,
    /// Features this board does not have.
    pub unsupported: &'static [Feature],
}

const MIB: u64 = 1024 * 1024;

impl Board {
    pub fn of(kind: ModelKind) -> Self {
        match kind {
            ModelKind::Datacenter => Board {
                name: "NVIDIA H100 80GB HBM3",
                architecture: NVML_DEVICE_ARCH_HOPPER,
                pci_device_id: 0x2330_10DE,
                power_min_mw: 200_000,
                power_max_mw: 700_000,
                power_default_mw: 700_000,
                idle_w: 70.0,
                thermal_resistance_c_per_w: 0.07,
                shutdown_c: 92,
                slowdown_c: 89,
                gpu_max_c: 87,
                memory_max_c: 95,
                max_graphics_mhz: 1980,
                idle_graphics_mhz: 345,
                max_memory_mhz: 2619,
                idle_memory_mhz: 2619,
                max_video_mhz: 1755,
                memory_total_bytes: 81_559 * MIB,
                memory_reserved_bytes: 530 * MIB,
                pcie_max_kbps: 64_000_000,
                sm_count: 132,
                unsupported: &[],
            },
            ModelKind::Consumer => Board {
                name: "NVIDIA GeForce RTX 4090",
                architecture: NVML_DEVICE_ARCH_ADA,
                pci_device_id: 0x2684_10DE,
                power_min_mw: 150_000,
                power_max_mw: 600_000,
                power_default_mw: 450_000,
                idle_w: 25.0,
                thermal_resistance_c_per_w: 0.12,
                shutdown_c: 96,
                slowdown_c: 93,
                gpu_max_c: 90,
                memory_max_c: 0,
                max_graphics_mhz: 3120,
                idle_graphics_mhz: 210,
                max_memory_mhz: 10_501,
                idle_memory_mhz: 405,
                max_video_mhz: 2415,
                memory_total_bytes: 24_564 * MIB,
                memory_reserved_bytes: 330 * MIB,
                pcie_max_kbps: 32_000_000,
                sm_count: 128,
                unsupported: &[
                    Feature::Mig,
                    Feature::MemoryTemperature,
                    Feature::FanSpeed,
                    Feature::Ecc,
                    Feature::PcieThroughput,
                    Feature::ApplicationsClocks,
                ],
            },
            // A Turing laptop: below NVML's Ampere floor for memory clock
            // locking, so the model's refusal matches what a client infers.
            ModelKind::Laptop => Board {
                name: "NVIDIA GeForce RTX 2070 Laptop GPU",
                architecture: NVML_DEVICE_ARCH_TURING,
                pci_device_id: 0x1F10_10DE,
                power_min_mw: 35_000,
                power_max_mw: 115_000,
                power_default_mw: 115_000,
                idle_w: 8.0,
                thermal_resistance_c_per_w: 0.45,
                shutdown_c: 102,
                slowdown_c: 99,
                gpu_max_c: 87,
                memory_max_c: 0,
                max_graphics_mhz: 1455,
                idle_graphics_mhz: 300,
                max_memory_mhz: 7001,
                idle_memory_mhz: 405,
                max_video_mhz: 1305,
                memory_total_bytes: 8192 * MIB,
                memory_reserved_bytes: 190 * MIB,
                pcie_max_kbps: 16_000_000,
                sm_count: 36,
                unsupported: &[
                    Feature::Mig,
                    Feature::MemoryTemperature,
                    Feature::FanSpeed,
                    Feature::Ecc,
                    Feature::PcieThroughput,
                    Feature::ApplicationsClocks,
                    Feature::PowerManagement,
                    Feature::Energy,
                    Feature::MemoryLockedClocks,
                ],
            },
        }
    }
}

/// A consistent set of readings at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub power_draw_mw: u32,
    pub temperature_c: u32,
    pub memory_temperature_c: u32,
    pub fan_pct: u32,
    pub graphics_mhz: u32,
    pub memory_mhz: u32,
    pub video_mhz: u32,
    pub utilization_gpu_pct: u32,
    pub utilization_memory_pct: u32,
    pub pstate: nvmlPstates_t,
    pub throttle_mask: u64,
    pub pcie_tx_kbps: u32,
    pub pcie_rx_kbps: u32,
}

/// One fake GPU.
#[derive(Debug)]
pub struct Gpu {
    pub index: u32,
    pub board: Board,
    pub config: GpuConfig,
    pub uuid: String,
    unsupported: HashSet<Feature>,
    /// The power management limit in force.
    pub power_limit_mw: u32,
    /// Graphics clock lock, when one is set.
    pub gpu_clock_lock: Option<(u32, u32)>,
    /// Memory clock lock, when one is set.
    pub memory_clock_lock: Option<(u32, u32)>,
    energy_mj: f64,
    last_advance: Instant,
    /// How many entries of `config.xid` have been handed to an event set.
    pub xids_delivered: usize,
    /// The MIG instances, in GPU-instance id order (empty when MIG is off).
    pub mig: Vec<MigInstance>,
}

impl Gpu {
    pub fn new(index: u32, config: GpuConfig) -> Self {
        let board = Board::of(config.model);
        let uuid = config.uuid.clone().unwrap_or_else(|| default_uuid(index));
        let mut gpu = Self {
            index,
            power_limit_mw: board.power_default_mw,
            board,
            uuid,
            unsupported: HashSet::new(),
            config: GpuConfig::default(),
            gpu_clock_lock: None,
            memory_clock_lock: None,
            energy_mj: 0.0,
            last_advance: Instant::now(),
            xids_delivered: 0,
            mig: Vec::new(),
        };
        gpu.reconfigure(config);
        gpu
    }

    /// True when `config` describes a different board than this one (a new
    /// GPU is needed rather than a reconfiguration).
    pub fn is_same_board(&self, config: &GpuConfig) -> bool {
        self.config.model == config.model && self.config.uuid == config.uuid
    }

    /// Applies a re-read config for the same board, keeping the state that
    /// writes changed (limits, locks) and the energy counter.
    pub fn reconfigure(&mut self, config: GpuConfig) {
        self.advance();
        self.unsupported = self
            .board
            .unsupported
            .iter()
            .chain(&config.unsupported)
            .copied()
            .collect();
        self.xids_delivered = self.xids_delivered.min(config.xid.len());
        // A config that reached here passed `check_gpu`; one built in code
        // that did not gets no instances rather than a half-made layout.
        self.mig = mig_layout(&config)
            .unwrap_or_default()
            .into_iter()
            .map(|(gpu_instance_id, profile, processes)| MigInstance {
                uuid: mig_uuid(&self.uuid, gpu_instance_id, 0),
                gpu_instance_id,
                compute_instance_id: 0,
                profile,
                processes,
            })
            .collect();
        if config.resets != self.config.resets {
            // A board reset: the driver's defaults again.
            self.power_limit_mw = self.board.power_default_mw;
            self.gpu_clock_lock = None;
            self.memory_clock_lock = None;
        }
        self.config = config;
    }

    /// MIG mode is on now (on a board that has MIG).
    pub fn mig_enabled(&self) -> bool {
        self.supports(Feature::Mig) && self.config.mig.as_ref().is_some_and(|m| m.enabled)
    }

    /// MIG mode after the next reset.
    pub fn mig_pending(&self) -> bool {
        self.supports(Feature::Mig)
            && self
                .config
                .mig
                .as_ref()
                .is_some_and(|m| m.pending.unwrap_or(m.enabled))
    }

    /// The live MIG instance with these ids.
    pub fn mig_instance(
        &self,
        gpu_instance_id: u32,
        compute_instance_id: u32,
    ) -> Option<&MigInstance> {
        if !self.mig_enabled() {
            return None;
        }
        self.mig.iter().find(|m| {
            m.gpu_instance_id == gpu_instance_id && m.compute_instance_id == compute_instance_id
        })
    }

    /// The compute processes NVML lists on the whole GPU: in MIG mode those
    /// of every instance, each with its instance's ids.
    pub fn compute_processes(&self) -> Vec<nvmlProcessInfo_t> {
        let mut list: Vec<_> = self
            .config
            .processes
            .iter()
            .map(|p| process_info(p, NO_INSTANCE, NO_INSTANCE))
            .collect();
        if self.mig_enabled() {
            for m in &self.mig {
                list.extend(m.processes());
            }
        }
        list
    }

    /// The graphics processes NVML lists on the whole GPU.
    pub fn graphics_processes(&self) -> Vec<nvmlProcessInfo_t> {
        self.config
            .graphics_processes
            .iter()
            .map(|p| process_info(p, NO_INSTANCE, NO_INSTANCE))
            .collect()
    }

    /// Every process entry of the GPU: compute, graphics, in instances.
    fn all_processes(&self) -> impl Iterator<Item = &ProcessConfig> {
        all_processes(&self.config)
    }

    /// The utilisation samples the driver holds newer than `last_seen_us`
    /// at `now_us`, oldest first: one per sampled process per
    /// [`SAMPLE_PERIOD_US`] tick, for the last [`SAMPLE_BUFFER`] ticks.
    pub fn process_samples(
        &self,
        last_seen_us: u64,
        now_us: u64,
    ) -> Vec<nvmlProcessUtilizationSample_t> {
        let sampled: Vec<&ProcessConfig> = self.all_processes().filter(|p| p.sampled()).collect();
        let latest = now_us - now_us % SAMPLE_PERIOD_US;
        let mut ticks: Vec<u64> = (0..SAMPLE_BUFFER)
            .filter_map(|k| latest.checked_sub(k * SAMPLE_PERIOD_US))
            .filter(|&t| t > last_seen_us)
            .collect();
        ticks.reverse();
        ticks
            .into_iter()
            .flat_map(|t| {
                sampled.iter().map(move |p| nvmlProcessUtilizationSample_t {
                    pid: p.pid,
                    timeStamp: t,
                    smUtil: p.sm_pct.unwrap_or(0),
                    memUtil: p.memory_pct.unwrap_or(0),
                    encUtil: p.encoder_pct.unwrap_or(0),
                    decUtil: p.decoder_pct.unwrap_or(0),
                })
            })
            .collect()
    }

    /// The error every call answers while the GPU is lost.
    pub fn lost_code(&self) -> Option<nvmlReturn_t> {
        self.config.lost.then_some(match self.config.lost_error {
            LostError::GpuIsLost => nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST,
            LostError::Unknown => nvmlReturn_enum_NVML_ERROR_UNKNOWN,
        })
    }

    /// True when calls for `feature` are configured to fail.
    pub fn fails(&self, feature: Feature) -> bool {
        self.config.failing.contains(&feature)
    }

    pub fn supports(&self, feature: Feature) -> bool {
        !self.unsupported.contains(&feature)
    }

    pub fn name(&self) -> &str {
        self.config.name.as_deref().unwrap_or(self.board.name)
    }

    pub fn pci_bus(&self) -> u32 {
        0x18 + self.index * 0x10
    }

    /// Brings the energy counter up to now.
    pub fn advance(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_advance).as_secs_f64();
        self.last_advance = now;
        let draw_w = f64::from(self.snapshot().power_draw_mw) / 1000.0;
        self.energy_mj += draw_w * dt * 1000.0;
    }

    pub fn energy_mj(&mut self) -> u64 {
        self.advance();
        self.energy_mj as u64
    }

    /// Power the workload would draw at `graphics_mhz`, uncapped.
    fn demand_w(&self, load: f64, graphics_mhz: f64) -> f64 {
        let b = &self.board;
        let full_w = f64::from(b.power_default_mw) / 1000.0;
        b.idle_w + load * (full_w - b.idle_w) * graphics_mhz / f64::from(b.max_graphics_mhz)
    }

    /// The GPU's readings now.
    pub fn snapshot(&self) -> Snapshot {
        let b = &self.board;
        let load = self.config.load_pct / 100.0;
        let busy = load > 0.0;
        let max_mhz = f64::from(b.max_graphics_mhz);
        let idle_mhz = f64::from(b.idle_graphics_mhz);
        let mut mask = 0u64;

        // Clocks the workload asks for, within any lock.
        let mut graphics = if busy { max_mhz } else { idle_mhz };
        if let Some((lo, hi)) = self.gpu_clock_lock {
            let clamped = graphics.clamp(f64::from(lo), f64::from(hi));
            if clamped < graphics {
                mask |= u64::from(nvmlClocksEventReasonApplicationsClocksSetting);
            }
            graphics = clamped;
        }
        // The power limit caps the draw, and clocks drop with it.
        let demand = self.demand_w(load, graphics);
        let limit_w = f64::from(self.power_limit_mw) / 1000.0;
        let draw = demand.min(limit_w);
        if demand > limit_w {
            mask |= u64::from(nvmlClocksEventReasonSwPowerCap);
            graphics = (graphics * draw / demand).max(idle_mhz);
        }
        let temperature = self.config.temperature_c.unwrap_or_else(|| {
            (self.config.ambient_c + draw * b.thermal_resistance_c_per_w)
                .round()
                .max(0.0) as u32
        });
        if temperature >= b.slowdown_c {
            mask |= u64::from(nvmlClocksThrottleReasonHwSlowdown)
                | u64::from(nvmlClocksThrottleReasonHwThermalSlowdown);
            graphics = (graphics / 2.0).max(idle_mhz);
        }
        if !busy {
            mask |= u64::from(nvmlClocksEventReasonGpuIdle);
        }
        let mut memory = if busy {
            b.max_memory_mhz
        } else {
            b.idle_memory_mhz
        };
        if let Some((lo, hi)) = self.memory_clock_lock {
            memory = memory.clamp(lo, hi);
        }
        let utilization = utilization_gpu_pct(self.config.load_pct);
        let pcie = (f64::from(b.pcie_max_kbps) * load * 0.05) as u32;
        Snapshot {
            power_draw_mw: (draw * 1000.0).round() as u32,
            temperature_c: temperature,
            memory_temperature_c: temperature + 6,
            fan_pct: (30 + temperature.saturating_sub(30) * 6 / 5).min(100),
            graphics_mhz: graphics.round() as u32,
            memory_mhz: memory,
            video_mhz: (graphics * f64::from(b.max_video_mhz) / max_mhz).round() as u32,
            utilization_gpu_pct: utilization,
            utilization_memory_pct: utilization * 3 / 5,
            pstate: if busy {
                nvmlPStates_enum_NVML_PSTATE_0
            } else {
                nvmlPStates_enum_NVML_PSTATE_8
            },
            throttle_mask: mask,
            pcie_tx_kbps: pcie,
            pcie_rx_kbps: pcie / 3,
        }
    }

    /// Memory used: the driver's reservation plus the processes' memory
    /// (a process in both the compute and graphics lists counted once).
    pub fn memory_used_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        let processes: u64 = self
            .all_processes()
            .filter(|p| seen.insert(p.pid))
            .filter_map(|p| p.used_memory_mib)
            .sum::<u64>()
            * MIB;
        (self.board.memory_reserved_bytes + processes).min(self.board.memory_total_bytes)
    }

    pub fn set_power_limit(&mut self, limit_mw: u32) -> nvmlReturn_t {
        let b = &self.board;
        if !(b.power_min_mw..=b.power_max_mw).contains(&limit_mw) {
            return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
        }
        self.advance();
        self.power_limit_mw = limit_mw;
        nvmlReturn_enum_NVML_SUCCESS
    }

    pub fn lock_gpu_clocks(&mut self, min_mhz: u32, max_mhz: u32) -> nvmlReturn_t {
        // The symbolic limits (TDP, unlimited) live at the top of the range.
        let resolve = |mhz: u32| match mhz {
            NVML_CLOCK_LIMIT_ID_TDP_MHZ => Some(self.board.max_graphics_mhz * 9 / 10),
            NVML_CLOCK_LIMIT_ID_UNLIMITED_MHZ => Some(self.board.max_graphics_mhz),
            v if v <= self.board.max_graphics_mhz => Some(v),
            _ => None,
        };
        match (resolve(min_mhz), resolve(max_mhz)) {
            (Some(lo), Some(hi)) if lo <= hi => {
                self.advance();
                self.gpu_clock_lock = Some((lo, hi));
                nvmlReturn_enum_NVML_SUCCESS
            }
            _ => nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT,
        }
    }
}

const NVML_CLOCK_LIMIT_ID_TDP_MHZ: u32 = nvmlClockLimitId_enum_NVML_CLOCK_LIMIT_ID_TDP;
const NVML_CLOCK_LIMIT_ID_UNLIMITED_MHZ: u32 = nvmlClockLimitId_enum_NVML_CLOCK_LIMIT_ID_UNLIMITED;

/// The device utilisation a workload of `load_pct` shows.
pub fn utilization_gpu_pct(load_pct: f64) -> u32 {
    load_pct.clamp(0.0, 100.0).round() as u32
}

/// The instance ids of a process outside any MIG instance.
pub const NO_INSTANCE: u32 = 0xFFFF_FFFF;

fn process_info(
    p: &ProcessConfig,
    gpu_instance_id: u32,
    compute_instance_id: u32,
) -> nvmlProcessInfo_t {
    nvmlProcessInfo_t {
        pid: p.pid,
        usedGpuMemory: p
            .used_memory_mib
            .map_or(NVML_VALUE_NOT_AVAILABLE as u64, |mib| mib * MIB),
        gpuInstanceId: gpu_instance_id,
        computeInstanceId: compute_instance_id,
    }
}

fn all_processes(config: &GpuConfig) -> impl Iterator<Item = &ProcessConfig> {
    config
        .processes
        .iter()
        .chain(&config.graphics_processes)
        .chain(
            config
                .mig
                .iter()
                .flat_map(|m| m.instances.iter().flat_map(|i| &i.processes)),
        )
}

// ---- process utilisation ---------------------------------------------------

/// How often the fake driver takes a process utilisation sample.
pub const SAMPLE_PERIOD_US: u64 = 100_000;
/// How many sampling ticks the fake driver keeps.
pub const SAMPLE_BUFFER: u64 = 10;

// ---- MIG ---------------------------------------------------------------------

/// A GPU instance profile of the datacenter board (an H100 80GB): its
/// share of the 7 compute and 8 memory slices, and what it owns. SM counts
/// and sizes are close to what an H100 SXM 80GB reports; they are the
/// fake's, not a datasheet.
#[derive(Debug, PartialEq, Eq)]
pub struct MigProfile {
    pub name: &'static str,
    pub compute_slices: u32,
    pub memory_slices: u32,
    pub sm_count: u32,
    pub memory_mib: u64,
}

/// Compute slices of an H100 (7 GPCs).
pub const COMPUTE_SLICES: u32 = 7;
/// Memory slices of an H100 (8).
pub const MEMORY_SLICES: u32 = 8;
/// The most MIG devices a GPU can hold (`nvmlDeviceGetMaxMigDeviceCount`).
pub const MAX_MIG_DEVICES: u32 = 7;

/// The H100 80GB profiles the fake offers.
pub const MIG_PROFILES: &[MigProfile] = &[
    MigProfile {
        name: "1g.10gb",
        compute_slices: 1,
        memory_slices: 1,
        sm_count: 16,
        memory_mib: 9_856,
    },
    MigProfile {
        name: "1g.20gb",
        compute_slices: 1,
        memory_slices: 2,
        sm_count: 16,
        memory_mib: 19_968,
    },
    MigProfile {
        name: "2g.20gb",
        compute_slices: 2,
        memory_slices: 2,
        sm_count: 32,
        memory_mib: 19_968,
    },
    MigProfile {
        name: "3g.40gb",
        compute_slices: 3,
        memory_slices: 4,
        sm_count: 60,
        memory_mib: 40_192,
    },
    MigProfile {
        name: "4g.40gb",
        compute_slices: 4,
        memory_slices: 4,
        sm_count: 64,
        memory_mib: 40_192,
    },
    MigProfile {
        name: "7g.80gb",
        compute_slices: 7,
        memory_slices: 8,
        sm_count: 132,
        memory_mib: 80_768,
    },
];

/// The profile called `name`.
pub fn mig_profile(name: &str) -> Option<&'static MigProfile> {
    MIG_PROFILES.iter().find(|p| p.name == name)
}

/// One MIG device: a GPU instance with one compute instance spanning it.
#[derive(Debug, Clone)]
pub struct MigInstance {
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    pub profile: &'static MigProfile,
    /// `MIG-…`, stable per (GPU UUID, GPU instance, compute instance).
    pub uuid: String,
    pub processes: Vec<ProcessConfig>,
}

impl MigInstance {
    /// The instance's compute processes, as NVML lists them.
    pub fn processes(&self) -> Vec<nvmlProcessInfo_t> {
        self.processes
            .iter()
            .map(|p| process_info(p, self.gpu_instance_id, self.compute_instance_id))
            .collect()
    }

    pub fn memory_total_bytes(&self) -> u64 {
        self.profile.memory_mib * MIB
    }

    /// What the instance's processes use, within its memory.
    pub fn memory_used_bytes(&self) -> u64 {
        let used: u64 = self
            .processes
            .iter()
            .filter_map(|p| p.used_memory_mib)
            .sum();
        (used * MIB).min(self.memory_total_bytes())
    }
}

/// The highest GPU instance id a config may give (ids travel in handles).
pub const MAX_GPU_INSTANCE_ID: u32 = 254;

/// Instances as a config lays them out: GPU instance id, profile, processes.
type MigLayout = Vec<(u32, &'static MigProfile, Vec<ProcessConfig>)>;

/// The instances `config` asks for, with GPU instance ids assigned and
/// sorted by them, or why the layout cannot exist.
fn mig_layout(config: &GpuConfig) -> Result<MigLayout, String> {
    let Some(mig) = &config.mig else {
        return Ok(Vec::new());
    };
    if !mig.enabled && !mig.instances.is_empty() {
        return Err("mig.instances need mig.enabled: true".into());
    }
    let mut taken = HashSet::new();
    for id in mig.instances.iter().filter_map(|i| i.gpu_instance_id) {
        if id > MAX_GPU_INSTANCE_ID {
            return Err(format!(
                "gpu_instance_id {id} is above {MAX_GPU_INSTANCE_ID}"
            ));
        }
        if !taken.insert(id) {
            return Err(format!("gpu_instance_id {id} is given twice"));
        }
    }
    let (mut compute, mut memory) = (0, 0);
    let mut layout = Vec::new();
    for instance in &mig.instances {
        let profile = mig_profile(&instance.profile).ok_or_else(|| {
            let known: Vec<_> = MIG_PROFILES.iter().map(|p| p.name).collect();
            format!(
                "unknown MIG profile {:?} (known: {})",
                instance.profile,
                known.join(", ")
            )
        })?;
        compute += profile.compute_slices;
        memory += profile.memory_slices;
        let id = match instance.gpu_instance_id {
            Some(id) => id,
            None => {
                let id = (1..).find(|id| !taken.contains(id)).unwrap_or(0);
                taken.insert(id);
                id
            }
        };
        layout.push((id, profile, instance.processes.clone()));
    }
    if compute > COMPUTE_SLICES {
        return Err(format!(
            "MIG instances need {compute} compute slices, the GPU has {COMPUTE_SLICES}"
        ));
    }
    if memory > MEMORY_SLICES {
        return Err(format!(
            "MIG instances need {memory} memory slices, the GPU has {MEMORY_SLICES}"
        ));
    }
    layout.sort_by_key(|(id, ..)| *id);
    Ok(layout)
}

/// Checks what one GPU entry asks for against the model: MIG only where
/// the board has it, a MIG layout that fits, processes inside instances
/// in MIG mode, and per-process utilisation that is a share of the
/// device's (each value 0–100, the processes' SM shares summing to no more
/// than the device utilisation the load gives). The fake refuses rather
/// than scales: a test that asks for more than the GPU can do has a bug.
pub fn check_gpu(config: &GpuConfig) -> Result<(), String> {
    if let Some(mig) = &config.mig {
        let wants_mig = mig.enabled || mig.pending == Some(true);
        if wants_mig && Board::of(config.model).unsupported.contains(&Feature::Mig) {
            return Err(format!("the {:?} model has no MIG", config.model));
        }
        if mig.enabled && !(config.processes.is_empty() && config.graphics_processes.is_empty()) {
            return Err(
                "with MIG enabled, processes run in instances: list them under                  mig.instances[].processes"
                    .into(),
            );
        }
        mig_layout(config)?;
    }
    let mut sampled: HashMap<u32, u32> = HashMap::new();
    for p in all_processes(config) {
        for (name, value) in [
            ("sm_pct", p.sm_pct),
            ("memory_pct", p.memory_pct),
            ("encoder_pct", p.encoder_pct),
            ("decoder_pct", p.decoder_pct),
        ] {
            if value.is_some_and(|v| v > 100) {
                return Err(format!("pid {}: {name} is above 100", p.pid));
            }
        }
        if p.sampled() && sampled.insert(p.pid, p.sm_pct.unwrap_or(0)).is_some() {
            return Err(format!(
                "pid {}: utilisation is given in two entries; give it in one",
                p.pid
            ));
        }
    }
    let sm_total: u32 = sampled.values().sum();
    let device = utilization_gpu_pct(config.load_pct);
    if sm_total > device {
        return Err(format!(
            "the processes' sm_pct sum to {sm_total} %, more than the GPU's utilisation of              {device} % (load_pct)"
        ));
    }
    Ok(())
}

/// A `MIG-` UUID derived from the parent's UUID and the instance ids: the
/// same instance on the same GPU always has the same UUID.
pub fn mig_uuid(gpu_uuid: &str, gpu_instance_id: u32, compute_instance_id: u32) -> String {
    let key = format!("{gpu_uuid}/{gpu_instance_id}/{compute_instance_id}");
    let hash = |seed: u64| {
        key.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let (a, b) = (hash(0xcbf2_9ce4_8422_2325), hash(0x6c62_272e_07bb_0142));
    format!(
        "MIG-{:08x}-{:04x}-5{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0xfff,
        b & 0xffff_ffff_ffff
    )
}

/// A well-formed, stable UUID for GPU `index`.
pub fn default_uuid(index: u32) -> String {
    format!("GPU-fa4e0000-0000-4000-8000-{index:012x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(load_pct: f64) -> Gpu {
        Gpu::new(
            0,
            GpuConfig {
                load_pct,
                ..GpuConfig::default()
            },
        )
    }

    #[test]
    fn lower_limit_lowers_draw_temperature_and_clocks() {
        let mut g = gpu(100.0);
        let before = g.snapshot();
        assert_eq!(g.set_power_limit(300_000), nvmlReturn_enum_NVML_SUCCESS);
        let after = g.snapshot();
        assert!(after.power_draw_mw <= 300_000);
        assert!(after.power_draw_mw < before.power_draw_mw);
        assert!(after.temperature_c < before.temperature_c);
        assert!(after.graphics_mhz < before.graphics_mhz);
        assert_ne!(
            after.throttle_mask & u64::from(nvmlClocksEventReasonSwPowerCap),
            0
        );
    }

    #[test]
    fn a_reset_puts_the_board_back_to_its_defaults_and_other_changes_do_not() {
        let mut g = gpu(100.0);
        assert_eq!(g.set_power_limit(300_000), nvmlReturn_enum_NVML_SUCCESS);
        assert_eq!(g.lock_gpu_clocks(500, 1000), nvmlReturn_enum_NVML_SUCCESS);
        let mut config = g.config.clone();
        config.load_pct = 20.0;
        g.reconfigure(config.clone());
        assert_eq!(g.power_limit_mw, 300_000, "a plain re-read keeps the limit");
        config.resets += 1;
        g.reconfigure(config.clone());
        assert_eq!(g.power_limit_mw, g.board.power_default_mw);
        assert_eq!(g.gpu_clock_lock, None);
        assert_eq!(g.set_power_limit(350_000), nvmlReturn_enum_NVML_SUCCESS);
        g.reconfigure(config);
        assert_eq!(g.power_limit_mw, 350_000, "the same count is no new reset");
    }

    #[test]
    fn out_of_range_limit_is_refused_and_state_kept() {
        let mut g = gpu(50.0);
        assert_eq!(
            g.set_power_limit(10_000),
            nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(g.power_limit_mw, g.board.power_default_mw);
    }

    #[test]
    fn clock_lock_caps_graphics_clock() {
        let mut g = gpu(100.0);
        assert_eq!(g.lock_gpu_clocks(500, 1000), nvmlReturn_enum_NVML_SUCCESS);
        assert!(g.snapshot().graphics_mhz <= 1000);
        assert_eq!(
            g.lock_gpu_clocks(1000, 500),
            nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT
        );
    }

    #[test]
    fn idle_gpu_says_idle() {
        let s = gpu(0.0).snapshot();
        assert_ne!(s.throttle_mask & u64::from(nvmlClocksEventReasonGpuIdle), 0);
        assert_eq!(s.utilization_gpu_pct, 0);
    }
}

#[cfg(test)]
mod mig_and_process_tests {
    use super::*;
    use crate::config::Config;

    fn parse(json: &str) -> Result<Config, String> {
        Config::parse(json)
    }

    fn gpu_of(json: &str) -> Gpu {
        let config = parse(json).expect("valid config");
        Gpu::new(0, config.expanded_gpus().remove(0))
    }

    #[test]
    fn profiles_fit_the_slices_and_name_their_memory() {
        for p in MIG_PROFILES {
            assert!(p.compute_slices <= COMPUTE_SLICES && p.memory_slices <= MEMORY_SLICES);
            let (slices, gb) = p.name.split_once('g').expect("NNg.MMgb");
            assert_eq!(
                slices.parse::<u32>().ok(),
                Some(p.compute_slices),
                "{}",
                p.name
            );
            let gb: u64 = gb
                .trim_start_matches('.')
                .trim_end_matches("gb")
                .parse()
                .expect("memory in the name");
            assert_eq!(
                p.memory_mib.div_ceil(1024).div_ceil(10) * 10,
                gb,
                "{}",
                p.name
            );
            assert!(p.sm_count <= Board::of(ModelKind::Datacenter).sm_count);
        }
        assert_eq!(mig_profile("7g.80gb").map(|p| p.sm_count), Some(132));
        assert!(mig_profile("1g.5gb").is_none(), "an A100 40GB profile");
    }

    #[test]
    fn instances_get_ids_in_order_and_stable_uuids() {
        let json = r#"{"gpus": [{"mig": {"enabled": true, "instances": [
            {"profile": "3g.40gb"}, {"profile": "2g.20gb", "gpu_instance_id": 1},
            {"profile": "1g.10gb"}]}}]}"#;
        let gpu = gpu_of(json);
        let ids: Vec<_> = gpu
            .mig
            .iter()
            .map(|m| (m.gpu_instance_id, m.profile.name))
            .collect();
        // The explicit id 1 is reserved; the others take the lowest free.
        assert_eq!(ids, vec![(1, "2g.20gb"), (2, "3g.40gb"), (3, "1g.10gb")]);
        assert!(gpu.mig.iter().all(|m| m.compute_instance_id == 0));
        let uuids: HashSet<_> = gpu.mig.iter().map(|m| m.uuid.clone()).collect();
        assert_eq!(uuids.len(), 3, "distinct");
        for m in &gpu.mig {
            assert!(
                m.uuid.starts_with("MIG-") && m.uuid.len() == 40,
                "{}",
                m.uuid
            );
            assert_eq!(m.uuid, mig_uuid(&gpu.uuid, m.gpu_instance_id, 0), "stable");
        }
        assert_ne!(mig_uuid("GPU-a", 1, 0), mig_uuid("GPU-b", 1, 0));
        assert_ne!(mig_uuid("GPU-a", 1, 0), mig_uuid("GPU-a", 2, 0));
        assert!(gpu.mig_enabled() && gpu.mig_pending());
    }

    #[test]
    fn a_layout_that_overfills_the_gpu_is_refused() {
        let too_many_slices = r#"{"gpus": [{"mig": {"enabled": true, "instances": [
            {"profile": "4g.40gb"}, {"profile": "4g.40gb"}]}}]}"#;
        let e = parse(too_many_slices).expect_err("8 compute slices");
        assert!(e.contains("compute slices"), "{e}");
        let too_much_memory = r#"{"gpus": [{"mig": {"enabled": true, "instances": [
            {"profile": "3g.40gb"}, {"profile": "3g.40gb"}, {"profile": "1g.10gb"}]}}]}"#;
        let e = parse(too_much_memory).expect_err("9 memory slices");
        assert!(e.contains("memory slices"), "{e}");
        let full = r#"{"gpus": [{"mig": {"enabled": true, "instances": [
            {"profile": "3g.40gb"}, {"profile": "2g.20gb"}, {"profile": "1g.10gb"},
            {"profile": "1g.10gb"}]}}]}"#;
        assert!(
            parse(full).is_ok(),
            "7 compute and 8 memory slices fit exactly"
        );
        let e = parse(
            r#"{"gpus": [{"mig": {"enabled": true, "instances": [{"profile": "9g.1tb"}]}}]}"#,
        )
        .expect_err("unknown profile");
        assert!(e.contains("1g.10gb"), "lists the known profiles: {e}");
    }

    #[test]
    fn mig_configs_that_cannot_exist_are_refused() {
        for bad in [
            r#"{"gpus": [{"model": "consumer", "mig": {"enabled": true}}]}"#,
            r#"{"gpus": [{"mig": {"enabled": false, "instances": [{"profile": "1g.10gb"}]}}]}"#,
            r#"{"gpus": [{"processes": [{"pid": 1, "used_memory_mib": 1}], "mig": {"enabled": true}}]}"#,
            r#"{"gpus": [{"mig": {"enabled": true, "instances": [
                {"profile": "1g.10gb", "gpu_instance_id": 3}, {"profile": "1g.10gb", "gpu_instance_id": 3}]}}]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // A board without MIG may say it is off.
        assert!(parse(r#"{"gpus": [{"model": "consumer", "mig": {"enabled": false}}]}"#).is_ok());
    }

    #[test]
    fn processes_in_instances_carry_their_ids_on_the_parent() {
        let gpu = gpu_of(
            r#"{"gpus": [{"mig": {"enabled": true, "instances": [
            {"profile": "3g.40gb", "processes": [{"pid": 7, "used_memory_mib": 100}]},
            {"profile": "1g.10gb", "gpu_instance_id": 9, "processes": [{"pid": 8, "used_memory_mib": 5}]}]}}]}"#,
        );
        let parent = gpu.compute_processes();
        let ids: Vec<_> = parent
            .iter()
            .map(|p| (p.pid, p.gpuInstanceId, p.computeInstanceId))
            .collect();
        assert_eq!(ids, vec![(7, 1, 0), (8, 9, 0)]);
        let instance = gpu.mig_instance(9, 0).expect("instance 9");
        assert_eq!(instance.processes().len(), 1);
        assert_eq!(instance.memory_used_bytes(), 5 * MIB);
        assert_eq!(
            gpu.memory_used_bytes(),
            gpu.board.memory_reserved_bytes + 105 * MIB
        );
        assert!(gpu.mig_instance(2, 0).is_none());
    }

    #[test]
    fn per_process_sm_shares_never_exceed_the_device() {
        let over = r#"{"gpus": [{"load_pct": 50, "processes": [
            {"pid": 1, "used_memory_mib": 1, "sm_pct": 30},
            {"pid": 2, "used_memory_mib": 1, "sm_pct": 25}]}]}"#;
        let e = parse(over).expect_err("55 % of a 50 % GPU");
        assert!(e.contains("sm_pct"), "{e}");
        assert!(
            parse(&over.replace("25", "20")).is_ok(),
            "exactly 50 % is fine"
        );
        let twice = r#"{"gpus": [{"processes": [{"pid": 1, "used_memory_mib": 1, "sm_pct": 5}],
            "graphics_processes": [{"pid": 1, "used_memory_mib": 1, "sm_pct": 5}]}]}"#;
        assert!(
            parse(twice).is_err(),
            "utilisation for one pid in two places"
        );
        assert!(parse(r#"{"gpus": [{"processes": [{"pid": 1, "used_memory_mib": 1, "decoder_pct": 101}]}]}"#).is_err());

        // What the samples say holds the invariant at every tick.
        let gpu = gpu_of(
            r#"{"gpus": [{"load_pct": 80, "processes": [
            {"pid": 1, "used_memory_mib": 1, "sm_pct": 50, "memory_pct": 10},
            {"pid": 2, "used_memory_mib": 1, "sm_pct": 30},
            {"pid": 3, "used_memory_mib": 1}],
            "graphics_processes": [{"pid": 4, "used_memory_mib": 1, "encoder_pct": 20}]}]}"#,
        );
        let device = gpu.snapshot().utilization_gpu_pct;
        let samples = gpu.process_samples(0, 10 * SAMPLE_PERIOD_US + 5);
        let mut by_tick: HashMap<u64, u32> = HashMap::new();
        for s in &samples {
            *by_tick.entry(s.timeStamp).or_default() += s.smUtil;
        }
        assert_eq!(by_tick.len() as u64, SAMPLE_BUFFER);
        assert!(
            by_tick.values().all(|&sum| sum <= device),
            "{by_tick:?} vs {device}"
        );
        assert!(
            samples.iter().all(|s| s.pid != 3),
            "an idle process has no samples"
        );
        assert!(samples.iter().any(|s| s.pid == 4 && s.encUtil == 20));
    }

    #[test]
    fn samples_respect_the_last_seen_timestamp() {
        let gpu = gpu_of(
            r#"{"gpus": [{"processes": [{"pid": 1, "used_memory_mib": 1, "sm_pct": 10}]}]}"#,
        );
        let now = 50 * SAMPLE_PERIOD_US + 7;
        let all = gpu.process_samples(0, now);
        assert_eq!(all.len() as u64, SAMPLE_BUFFER);
        assert!(
            all.windows(2).all(|w| w[0].timeStamp < w[1].timeStamp),
            "oldest first"
        );
        let newest = all.last().expect("a sample").timeStamp;
        assert!(
            gpu.process_samples(newest, now).is_empty(),
            "nothing newer yet"
        );
        let later = gpu.process_samples(newest, now + SAMPLE_PERIOD_US);
        assert_eq!(later.len(), 1);
        assert!(later[0].timeStamp > newest);
    }
}
