//! Throttle ("clocks event") reasons: NVML's bit mask decoded into names and
//! meanings.
//!
//! NVML reports why clocks are below maximum as a bit mask. Operators need to
//! tell "the power limit is doing its job" (SW power cap) from "the GPU is
//! cooking itself" (HW thermal slowdown); this module owns that table, used by
//! the samples, the events (hardware slowdown entered/left), the metrics and
//! the simulator, which sets the same bits a real GPU would.

use crate::api::{ThrottleCategory, ThrottleReason, ThrottleReasonInfo};

/// NVML bit values (`nvmlClocksEventReason*` in nvml.h).
pub mod mask {
    pub const GPU_IDLE: u64 = 0x1;
    pub const APPLICATIONS_CLOCKS_SETTING: u64 = 0x2;
    pub const SW_POWER_CAP: u64 = 0x4;
    pub const HW_SLOWDOWN: u64 = 0x8;
    pub const SYNC_BOOST: u64 = 0x10;
    pub const SW_THERMAL_SLOWDOWN: u64 = 0x20;
    pub const HW_THERMAL_SLOWDOWN: u64 = 0x40;
    pub const HW_POWER_BRAKE_SLOWDOWN: u64 = 0x80;
    pub const DISPLAY_CLOCK_SETTING: u64 = 0x100;
    /// Every bit that means "the hardware slowed itself down".
    pub const ANY_HW_SLOWDOWN: u64 = HW_SLOWDOWN | HW_THERMAL_SLOWDOWN | HW_POWER_BRAKE_SLOWDOWN;
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct ReasonSpec {
    pub reason: ThrottleReason,
    pub bit: u64,
    pub name: &'static str,
    pub summary: &'static str,
    pub description: &'static str,
    pub category: ThrottleCategory,
    pub hardware: bool,
}

/// Every reason gpuwatch decodes, in bit order.
pub const REASONS: &[ReasonSpec] = &[
    ReasonSpec {
        reason: ThrottleReason::GpuIdle,
        bit: mask::GPU_IDLE,
        name: "gpu_idle",
        summary: "idle",
        description: "Nothing is running, so the clocks are low. Not a problem.",
        category: ThrottleCategory::IdleOrSetting,
        hardware: false,
    },
    ReasonSpec {
        reason: ThrottleReason::ApplicationsClocksSetting,
        bit: mask::APPLICATIONS_CLOCKS_SETTING,
        name: "applications_clocks_setting",
        summary: "clocks set",
        description: "Application or locked clocks hold the GPU below its maximum clock (nvidia-smi -ac/-lgc, or gpuwatch's clock-lock governor).",
        category: ThrottleCategory::IdleOrSetting,
        hardware: false,
    },
    ReasonSpec {
        reason: ThrottleReason::SwPowerCap,
        bit: mask::SW_POWER_CAP,
        name: "sw_power_cap",
        summary: "SW power cap",
        description: "The driver lowers clocks to keep board power under the power limit. Expected under full load, and what a lowered limit looks like.",
        category: ThrottleCategory::Power,
        hardware: false,
    },
    ReasonSpec {
        reason: ThrottleReason::HwSlowdown,
        bit: mask::HW_SLOWDOWN,
        name: "hw_slowdown",
        summary: "HW slowdown",
        description: "The hardware cut clocks by half or more (too hot, a power brake, or an external signal). Performance suffers; find the cause.",
        category: ThrottleCategory::Other,
        hardware: true,
    },
    ReasonSpec {
        reason: ThrottleReason::SyncBoost,
        bit: mask::SYNC_BOOST,
        name: "sync_boost",
        summary: "sync boost",
        description: "Clocks held to match other GPUs in a sync-boost group.",
        category: ThrottleCategory::Other,
        hardware: false,
    },
    ReasonSpec {
        reason: ThrottleReason::SwThermalSlowdown,
        bit: mask::SW_THERMAL_SLOWDOWN,
        name: "sw_thermal_slowdown",
        summary: "SW thermal",
        description: "The driver lowers clocks because the GPU or its memory is near its maximum operating temperature.",
        category: ThrottleCategory::Thermal,
        hardware: false,
    },
    ReasonSpec {
        reason: ThrottleReason::HwThermalSlowdown,
        bit: mask::HW_THERMAL_SLOWDOWN,
        name: "hw_thermal_slowdown",
        summary: "HW thermal slowdown",
        description: "The GPU passed its slowdown temperature and the hardware cut clocks sharply to protect itself. Cooling is insufficient.",
        category: ThrottleCategory::Thermal,
        hardware: true,
    },
    ReasonSpec {
        reason: ThrottleReason::HwPowerBrakeSlowdown,
        bit: mask::HW_POWER_BRAKE_SLOWDOWN,
        name: "hw_power_brake_slowdown",
        summary: "HW power brake",
        description: "An external power-brake signal (e.g. from the power supply) made the hardware cut power.",
        category: ThrottleCategory::Power,
        hardware: true,
    },
    ReasonSpec {
        reason: ThrottleReason::DisplayClockSetting,
        bit: mask::DISPLAY_CLOCK_SETTING,
        name: "display_clock_setting",
        summary: "display clocks",
        description: "Clocks limited by the display clock setting.",
        category: ThrottleCategory::IdleOrSetting,
        hardware: false,
    },
];

/// The active reasons in `bits`, in table order. Unknown bits are ignored
/// (they remain visible in the raw mask).
pub fn decode(bits: u64) -> impl Iterator<Item = &'static ReasonSpec> {
    REASONS.iter().filter(move |spec| bits & spec.bit != 0)
}

/// The table entry for `reason`.
#[cfg(test)]
pub fn spec(reason: ThrottleReason) -> Option<&'static ReasonSpec> {
    REASONS.iter().find(|spec| spec.reason == reason)
}

/// The catalog sent in ListDevicesResponse.
pub fn catalog() -> Vec<ThrottleReasonInfo> {
    REASONS
        .iter()
        .map(|spec| ThrottleReasonInfo {
            reason: spec.reason as i32,
            name: spec.name.to_owned(),
            summary: spec.summary.to_owned(),
            description: spec.description.to_owned(),
            category: spec.category as i32,
            hardware: spec.hardware,
            nvml_mask: spec.bit,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_separates_power_cap_from_hardware_thermal_slowdown() {
        let names: Vec<_> = decode(mask::SW_POWER_CAP | mask::HW_THERMAL_SLOWDOWN)
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["sw_power_cap", "hw_thermal_slowdown"]);
        assert!(!spec(ThrottleReason::SwPowerCap).is_some_and(|s| s.hardware));
        assert!(spec(ThrottleReason::HwThermalSlowdown).is_some_and(|s| s.hardware));
    }

    #[test]
    fn unknown_bits_decode_to_nothing() {
        assert_eq!(decode(1 << 40).count(), 0);
        assert_eq!(decode(0).count(), 0);
    }

    #[test]
    fn every_bit_is_distinct_and_matches_nvml() {
        use nvml_wrapper::bitmasks::device::ThrottleReasons as Nvml;
        let pairs = [
            (mask::GPU_IDLE, Nvml::GPU_IDLE),
            (
                mask::APPLICATIONS_CLOCKS_SETTING,
                Nvml::APPLICATIONS_CLOCKS_SETTING,
            ),
            (mask::SW_POWER_CAP, Nvml::SW_POWER_CAP),
            (mask::HW_SLOWDOWN, Nvml::HW_SLOWDOWN),
            (mask::SYNC_BOOST, Nvml::SYNC_BOOST),
            (mask::SW_THERMAL_SLOWDOWN, Nvml::SW_THERMAL_SLOWDOWN),
            (mask::HW_THERMAL_SLOWDOWN, Nvml::HW_THERMAL_SLOWDOWN),
            (mask::HW_POWER_BRAKE_SLOWDOWN, Nvml::HW_POWER_BRAKE_SLOWDOWN),
            (mask::DISPLAY_CLOCK_SETTING, Nvml::DISPLAY_CLOCK_SETTING),
        ];
        for (ours, theirs) in pairs {
            assert_eq!(ours, theirs.bits());
        }
        let all = REASONS.iter().fold(0u64, |acc, s| {
            assert_eq!(acc & s.bit, 0, "{} overlaps", s.name);
            acc | s.bit
        });
        assert_eq!(all.count_ones() as usize, REASONS.len());
    }
}
