//! One fake GPU: its board's fixed numbers and its changing state.
//!
//! Owns the small physical model behind every answer, so that answers hang
//! together the way a real GPU's do: power drawn is the workload's demand
//! capped by the power limit, temperature follows power, clocks drop when the
//! power cap or a clock lock bites, energy integrates power over time, and the
//! throttle-reason mask says why. Writes change the state (a set followed by a
//! get round-trips) after the range checks NVML itself makes.

use std::{collections::HashSet, time::Instant};

use nvml_wrapper_sys::bindings::*;

use crate::config::{Feature, GpuConfig, LostError, ModelKind};

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
                unsupported: &[
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
                unsupported: &[
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
        if config.resets != self.config.resets {
            // A board reset: the driver's defaults again.
            self.power_limit_mw = self.board.power_default_mw;
            self.gpu_clock_lock = None;
            self.memory_clock_lock = None;
        }
        self.config = config;
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
        let utilization = (load * 100.0).round() as u32;
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

    /// Memory used: the driver's reservation plus the processes' memory.
    pub fn memory_used_bytes(&self) -> u64 {
        let processes: u64 = self
            .config
            .processes
            .iter()
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
