//! Simulated GPU models: the limits, clocks and quirks of real boards.
//!
//! Figures come from public spec sheets and typical `nvidia-smi -q` output;
//! thermal resistances are chosen so a fully loaded board settles where such
//! boards run in a well-cooled server (or, for the consumer cards, a case).
//! What a preset does *not* support is as important as what it does: the
//! consumer and laptop presets exist to exercise absent fields and missing
//! controls.

use std::time::Duration;

use crate::{backend::Field, config::PresetKey};

/// A simulated board.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub power_min_w: f64,
    pub power_max_w: f64,
    pub power_default_w: f64,
    /// Power drawn with nothing running.
    pub idle_w: f64,
    pub slowdown_c: u32,
    pub shutdown_c: u32,
    pub max_operating_c: u32,
    /// Steady-state temperature rise above ambient per watt.
    pub thermal_resistance_c_per_w: f64,
    pub time_constant: Duration,
    pub sensor_lag: Duration,
    pub ambient_c: f64,
    pub max_graphics_mhz: u32,
    pub max_memory_mhz: u32,
    pub max_video_mhz: u32,
    pub idle_graphics_mhz: u32,
    pub idle_memory_mhz: u32,
    pub memory_total_bytes: u64,
    /// Memory the driver and context use with nothing running.
    pub memory_reserved_bytes: u64,
    pub has_fan: bool,
    pub has_memory_temperature: bool,
    pub has_ecc: bool,
    pub has_energy: bool,
    pub has_pcie_throughput: bool,
    /// GPU Performance Monitoring (Hopper and newer): the profiling
    /// counters (graphics engine, tensor pipes, memory interface busy).
    pub has_gpm: bool,
    /// Power limit readable (current/default/min/max).
    pub reports_power_limits: bool,
    pub power_limit_settable: bool,
    pub gpu_clocks_lockable: bool,
    pub memory_clocks_lockable: bool,
    pub application_clocks: bool,
    pub pcie_max_kbps: u32,
}

const GIB: u64 = 1 << 30;

impl Preset {
    /// The preset for `key`.
    pub fn get(key: PresetKey) -> Preset {
        match key {
            PresetKey::H100Sxm => Preset {
                name: "NVIDIA H100 80GB HBM3",
                power_min_w: 200.0,
                power_max_w: 700.0,
                power_default_w: 700.0,
                idle_w: 70.0,
                slowdown_c: 89,
                shutdown_c: 92,
                max_operating_c: 87,
                thermal_resistance_c_per_w: 0.075,
                time_constant: Duration::from_secs(20),
                sensor_lag: Duration::from_millis(800),
                ambient_c: 30.0,
                max_graphics_mhz: 1980,
                max_memory_mhz: 2619,
                max_video_mhz: 1545,
                idle_graphics_mhz: 345,
                idle_memory_mhz: 2619,
                memory_total_bytes: 80 * GIB,
                memory_reserved_bytes: 530 << 20,
                has_fan: false,
                has_memory_temperature: true,
                has_ecc: true,
                has_energy: true,
                has_pcie_throughput: true,
                has_gpm: true,
                reports_power_limits: true,
                power_limit_settable: true,
                gpu_clocks_lockable: true,
                memory_clocks_lockable: true,
                application_clocks: true,
                pcie_max_kbps: 50_000_000,
            },
            PresetKey::A100Sxm => Preset {
                name: "NVIDIA A100-SXM4-80GB",
                power_min_w: 100.0,
                power_max_w: 400.0,
                power_default_w: 400.0,
                idle_w: 55.0,
                slowdown_c: 92,
                shutdown_c: 95,
                max_operating_c: 88,
                thermal_resistance_c_per_w: 0.12,
                time_constant: Duration::from_secs(15),
                sensor_lag: Duration::from_millis(800),
                ambient_c: 30.0,
                max_graphics_mhz: 1410,
                max_memory_mhz: 1593,
                max_video_mhz: 1290,
                idle_graphics_mhz: 210,
                idle_memory_mhz: 1593,
                memory_total_bytes: 80 * GIB,
                memory_reserved_bytes: 420 << 20,
                has_fan: false,
                has_memory_temperature: true,
                has_ecc: true,
                has_energy: true,
                has_pcie_throughput: true,
                has_gpm: false,
                reports_power_limits: true,
                power_limit_settable: true,
                gpu_clocks_lockable: true,
                memory_clocks_lockable: true,
                application_clocks: true,
                pcie_max_kbps: 25_000_000,
            },
            PresetKey::Rtx4090 => Preset {
                name: "NVIDIA GeForce RTX 4090",
                power_min_w: 150.0,
                power_max_w: 600.0,
                power_default_w: 450.0,
                idle_w: 25.0,
                slowdown_c: 88,
                shutdown_c: 93,
                max_operating_c: 83,
                thermal_resistance_c_per_w: 0.105,
                time_constant: Duration::from_secs(12),
                sensor_lag: Duration::from_millis(500),
                ambient_c: 35.0,
                max_graphics_mhz: 3120,
                max_memory_mhz: 10501,
                max_video_mhz: 2415,
                idle_graphics_mhz: 210,
                idle_memory_mhz: 405,
                memory_total_bytes: 24 * GIB,
                memory_reserved_bytes: 300 << 20,
                has_fan: true,
                has_memory_temperature: false,
                has_ecc: false,
                has_energy: true,
                has_pcie_throughput: true,
                has_gpm: false,
                reports_power_limits: true,
                power_limit_settable: true,
                gpu_clocks_lockable: true,
                memory_clocks_lockable: false,
                application_clocks: false,
                pcie_max_kbps: 25_000_000,
            },
            PresetKey::Laptop => Preset {
                name: "NVIDIA GeForce RTX 4070 Laptop GPU",
                power_min_w: 35.0,
                power_max_w: 115.0,
                power_default_w: 115.0,
                idle_w: 8.0,
                slowdown_c: 87,
                shutdown_c: 102,
                max_operating_c: 87,
                thermal_resistance_c_per_w: 0.42,
                time_constant: Duration::from_secs(8),
                sensor_lag: Duration::from_millis(500),
                ambient_c: 35.0,
                max_graphics_mhz: 2175,
                max_memory_mhz: 8001,
                max_video_mhz: 1950,
                idle_graphics_mhz: 210,
                idle_memory_mhz: 405,
                memory_total_bytes: 8 * GIB,
                memory_reserved_bytes: 200 << 20,
                has_fan: false,
                has_memory_temperature: false,
                has_ecc: false,
                has_energy: false,
                has_pcie_throughput: false,
                has_gpm: false,
                reports_power_limits: false,
                power_limit_settable: false,
                gpu_clocks_lockable: true,
                memory_clocks_lockable: false,
                application_clocks: false,
                pcie_max_kbps: 16_000_000,
            },
        }
    }

    /// The telemetry fields this board reports, sorted.
    pub fn fields(&self) -> Vec<Field> {
        let mut fields = vec![
            Field::Temperature,
            Field::PowerDraw,
            Field::GraphicsClock,
            Field::SmClock,
            Field::MemoryClock,
            Field::VideoClock,
            Field::MaxClocks,
            Field::Utilization,
            Field::MemoryUsage,
            Field::PerformanceState,
            Field::ThrottleReasons,
            Field::Processes,
        ];
        let optional = [
            (self.has_memory_temperature, Field::MemoryTemperature),
            (self.has_fan, Field::FanSpeed),
            (self.reports_power_limits, Field::PowerLimit),
            (self.reports_power_limits, Field::EnforcedPowerLimit),
            (self.has_energy, Field::Energy),
            (self.has_ecc, Field::EccErrors),
            (self.has_pcie_throughput, Field::PcieThroughput),
        ];
        fields.extend(optional.iter().filter(|(has, _)| *has).map(|(_, f)| *f));
        fields.sort();
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_self_consistent() {
        for key in PresetKey::ALL {
            let p = Preset::get(*key);
            assert!(
                p.power_min_w < p.power_default_w || p.power_min_w < p.power_max_w,
                "{key}"
            );
            assert!(p.power_default_w <= p.power_max_w, "{key}");
            assert!(
                p.idle_w < p.power_min_w,
                "{key}: idle must sit below the minimum limit"
            );
            assert!(
                p.max_operating_c <= p.slowdown_c && p.slowdown_c < p.shutdown_c,
                "{key}"
            );
            // A board at its default limit must stay below slowdown when cooled as designed.
            let full_load_c = p.ambient_c + p.power_default_w * p.thermal_resistance_c_per_w;
            assert!(
                full_load_c < f64::from(p.slowdown_c),
                "{key} runs at {full_load_c} C"
            );
        }
    }

    #[test]
    fn consumer_and_laptop_lack_datacenter_fields() {
        let consumer = Preset::get(PresetKey::Rtx4090).fields();
        assert!(consumer.contains(&Field::FanSpeed));
        assert!(!consumer.contains(&Field::EccErrors));
        assert!(!consumer.contains(&Field::MemoryTemperature));
        let laptop = Preset::get(PresetKey::Laptop);
        assert!(!laptop.power_limit_settable);
        assert!(!laptop.fields().contains(&Field::PowerLimit));
        let h100 = Preset::get(PresetKey::H100Sxm).fields();
        assert!(
            !h100.contains(&Field::FanSpeed),
            "SXM boards are passively cooled"
        );
        assert!(h100.contains(&Field::EccErrors));
    }
}
