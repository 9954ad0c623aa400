//! Conversions from the daemon's internal types to the wire contract.
//!
//! The backend speaks in plain Rust types ([`Reading`], [`DeviceFacts`]);
//! clients speak `gpuwatch.v1`. Every translation between the two lives here,
//! so "absent stays absent" is enforced in one place: an unsupported field is
//! `None` in a reading and stays unset on the wire.

use std::time::SystemTime;

use crate::{
    api::{
        self, Capabilities, DeviceInfo, EccErrors, GovernorState, GpuHealth, GpuProcess, GpuSample,
        PowerLimits, TelemetryField,
    },
    attribution::tracker::{self, GpuView},
    backend::{DeviceFacts, Field, MigReading, Reading, SlowReading},
    throttle,
    tick::SlowPart,
};

/// The wire enum for a telemetry field.
pub fn field(f: Field) -> TelemetryField {
    match f {
        Field::Temperature => TelemetryField::Temperature,
        Field::MemoryTemperature => TelemetryField::MemoryTemperature,
        Field::FanSpeed => TelemetryField::FanSpeed,
        Field::PowerDraw => TelemetryField::PowerDraw,
        Field::PowerLimit => TelemetryField::PowerLimit,
        Field::EnforcedPowerLimit => TelemetryField::EnforcedPowerLimit,
        Field::Energy => TelemetryField::Energy,
        Field::GraphicsClock => TelemetryField::GraphicsClock,
        Field::SmClock => TelemetryField::SmClock,
        Field::MemoryClock => TelemetryField::MemoryClock,
        Field::VideoClock => TelemetryField::VideoClock,
        Field::MaxClocks => TelemetryField::MaxClocks,
        Field::Utilization => TelemetryField::Utilization,
        Field::MemoryUsage => TelemetryField::MemoryUsage,
        Field::PerformanceState => TelemetryField::PerformanceState,
        Field::ThrottleReasons => TelemetryField::ThrottleReasons,
        Field::EccErrors => TelemetryField::EccErrors,
        Field::PcieThroughput => TelemetryField::PcieThroughput,
        Field::Processes => TelemetryField::Processes,
    }
}

/// Static device facts as a DeviceInfo (policy is filled by the caller).
pub fn device_info(
    facts: &DeviceFacts,
    health: GpuHealth,
    current: Option<&Reading>,
    mig: Option<&MigReading>,
) -> DeviceInfo {
    let c = &facts.controls;
    DeviceInfo {
        index: facts.index,
        uuid: facts.uuid.clone(),
        name: facts.name.clone(),
        pci_bus_id: facts.pci_bus_id.clone(),
        power_limits: Some(PowerLimits {
            min_mw: facts.power_min_mw,
            max_mw: facts.power_max_mw,
            default_mw: facts.power_default_mw,
            current_mw: current.and_then(|r| r.power_limit_mw),
            enforced_mw: current.and_then(|r| r.enforced_power_limit_mw),
        }),
        slowdown_temperature_c: facts.slowdown_c,
        shutdown_temperature_c: facts.shutdown_c,
        max_operating_temperature_c: facts.max_operating_c,
        capabilities: Some(Capabilities {
            power_limit_settable: c.power_limit_settable,
            gpu_clocks_lockable: c.gpu_clocks_lockable,
            memory_clocks_lockable: c.memory_clocks_lockable,
            application_clocks_resettable: c.application_clocks_resettable,
            supported_fields: facts.fields.iter().map(|f| field(*f) as i32).collect(),
            xid_events: c.xid_events,
        }),
        health: health as i32,
        policy: None,
        max_graphics_clock_mhz: facts.max_graphics_clock_mhz,
        max_sm_clock_mhz: facts.max_sm_clock_mhz,
        max_memory_clock_mhz: facts.max_memory_clock_mhz,
        max_video_clock_mhz: facts.max_video_clock_mhz,
        memory_total_bytes: facts.memory_total_bytes,
        mig_enabled: mig.map(|m| m.enabled),
        mig_instances: mig.map(|m| mig_instances(m, &[])).unwrap_or_default(),
        lease: None,
    }
}

/// Everything that goes into one GPU's sample besides the reading itself.
#[derive(Debug, Clone, Copy)]
pub struct SampleMeta<'a> {
    pub facts: &'a DeviceFacts,
    pub seq: u64,
    /// When the reading (or, without one, the tick) happened.
    pub time: SystemTime,
    pub age_ms: u64,
    pub health: GpuHealth,
    pub error: Option<&'a str>,
    pub governor_state: GovernorState,
}

/// Builds a sample's fast part: every field but the slow ones (processes,
/// MIG, allocations: see [`slow_part`]). ECC counts come from the slow
/// reading but cost no allocation, so they are here. `reading` is `None`
/// for a lost GPU (all telemetry absent).
pub fn sample(
    meta: SampleMeta<'_>,
    reading: Option<&Reading>,
    slow: Option<&(SlowReading, SystemTime)>,
) -> GpuSample {
    let facts = meta.facts;
    let mut s = GpuSample {
        index: facts.index,
        uuid: facts.uuid.clone(),
        seq: meta.seq,
        time: Some(meta.time.into()),
        age_ms: meta.age_ms,
        health: meta.health as i32,
        error: meta.error.map(str::to_owned),
        governor_state: meta.governor_state as i32,
        ..GpuSample::default()
    };
    let Some(r) = reading else {
        return s;
    };
    s.temperature_c = r.temperature_c;
    s.memory_temperature_c = r.memory_temperature_c;
    if let Some(p) = &r.profiling {
        s.graphics_engine_active_ratio = p.graphics_engine_active;
        s.tensor_active_ratio = p.tensor_active;
        s.dram_active_ratio = p.dram_active;
    }
    s.fan_speed_pct = r.fan_speed_pct;
    s.power_draw_mw = r.power_draw_mw;
    s.power_limit_mw = r.power_limit_mw;
    s.enforced_power_limit_mw = r.enforced_power_limit_mw;
    s.energy_mj = r.energy_mj;
    s.graphics_clock_mhz = r.graphics_clock_mhz;
    s.sm_clock_mhz = r.sm_clock_mhz;
    s.memory_clock_mhz = r.memory_clock_mhz;
    s.video_clock_mhz = r.video_clock_mhz;
    if facts.fields.contains(&Field::MaxClocks) {
        s.max_graphics_clock_mhz = facts.max_graphics_clock_mhz;
        s.max_sm_clock_mhz = facts.max_sm_clock_mhz;
        s.max_memory_clock_mhz = facts.max_memory_clock_mhz;
        s.max_video_clock_mhz = facts.max_video_clock_mhz;
    }
    s.utilization_gpu_pct = r.utilization_gpu_pct;
    s.utilization_memory_pct = r.utilization_memory_pct;
    s.memory_used_bytes = r.memory_used_bytes;
    s.memory_total_bytes = r.memory_total_bytes;
    s.performance_state = r.performance_state;
    s.throttle_reasons_mask = r.throttle_mask;
    if let Some(bits) = r.throttle_mask {
        s.throttle_reasons = throttle::decode(bits)
            .map(|spec| spec.reason as i32)
            .collect();
    }
    s.pcie_tx_kbps = r.pcie_tx_kbps;
    s.pcie_rx_kbps = r.pcie_rx_kbps;
    if let Some((slow, _)) = slow {
        s.ecc = slow.ecc.map(|e| EccErrors {
            corrected_volatile: e.corrected_volatile,
            uncorrected_volatile: e.uncorrected_volatile,
            corrected_aggregate: e.corrected_aggregate,
            uncorrected_aggregate: e.uncorrected_aggregate,
        });
    }
    s
}

/// A sample's slow part, from one slow reading and who uses the GPU: its
/// processes with their owners, its MIG instances and its allocations.
/// Built once per slow reading (or attribution refresh) and shared by every
/// tick until the next.
pub fn slow_part(slow: &SlowReading, at: SystemTime, users: Option<&GpuView>) -> SlowPart {
    let mut s = GpuSample {
        processes: processes(slow, at, users),
        processes_time: Some(at.into()),
        ..GpuSample::default()
    };
    if let Some(mig) = &slow.mig {
        s.mig_enabled = Some(mig.enabled);
        s.mig_instances = mig_instances(mig, &s.processes);
    }
    if let Some(users) = users {
        s.allocations.clone_from(&users.allocations);
    }
    SlowPart::new(s)
}

/// The processes of a slow reading, with who owns them. The attribution
/// view made from this very reading is used as it is; one made from an
/// earlier reading lends its records by pid (a new pid shows without them
/// until the next refresh).
fn processes(slow: &SlowReading, at: SystemTime, users: Option<&GpuView>) -> Vec<GpuProcess> {
    let list = slow.processes.as_deref().unwrap_or_default();
    match users {
        Some(v) if v.at == Some(at) => v.processes.clone(),
        Some(v) => list
            .iter()
            .map(|p| {
                let mut wire = tracker::process_wire(p, None);
                if let Some(known) = v.processes.iter().find(|k| k.pid == p.pid) {
                    wire.name.clone_from(&known.name);
                    wire.command_line.clone_from(&known.command_line);
                    wire.uid = known.uid;
                    wire.user.clone_from(&known.user);
                    wire.attribution.clone_from(&known.attribution);
                }
                wire
            })
            .collect(),
        None => list
            .iter()
            .map(|p| tracker::process_wire(p, None))
            .collect(),
    }
}

/// The wire form of a GPU's MIG instances, each with its processes' pids.
pub fn mig_instances(mig: &MigReading, processes: &[GpuProcess]) -> Vec<api::MigInstance> {
    mig.instances
        .iter()
        .map(|i| api::MigInstance {
            uuid: i.uuid.clone(),
            gpu_instance_id: i.gpu_instance_id,
            compute_instance_id: i.compute_instance_id,
            profile: i.profile.clone(),
            sm_count: i.sm_count,
            memory_total_bytes: i.memory_total_bytes,
            memory_used_bytes: i.memory_used_bytes,
            utilization_gpu_pct: i.utilization_gpu_pct,
            pids: processes
                .iter()
                .filter(|p| p.mig_uuid.as_deref() == Some(i.uuid.as_str()))
                .map(|p| p.pid)
                .collect(),
        })
        .collect()
}

/// Milliseconds from `earlier` to `later`, 0 if the clock went backwards.
pub fn age_ms(earlier: SystemTime, later: SystemTime) -> u64 {
    later
        .duration_since(earlier)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_gpu_sample_has_no_telemetry() {
        let facts = DeviceFacts {
            index: 1,
            uuid: "GPU-1".into(),
            fields: vec![Field::Temperature],
            ..DeviceFacts::default()
        };
        let meta = SampleMeta {
            facts: &facts,
            seq: 7,
            time: SystemTime::now(),
            age_ms: 0,
            health: GpuHealth::Lost,
            error: Some("fell off the bus"),
            governor_state: GovernorState::Suspended,
        };
        let s = sample(meta, None, None);
        assert_eq!(s.health(), GpuHealth::Lost);
        assert!(s.temperature_c.is_none() && s.power_draw_mw.is_none());
        assert_eq!(s.error.as_deref(), Some("fell off the bus"));
    }

    #[test]
    fn unsupported_fields_stay_absent_and_reasons_are_decoded() {
        let facts = DeviceFacts {
            uuid: "GPU-0".into(),
            fields: vec![Field::Temperature, Field::ThrottleReasons],
            max_graphics_clock_mhz: Some(1980),
            ..DeviceFacts::default()
        };
        let reading = Reading {
            temperature_c: Some(0),
            throttle_mask: Some(throttle::mask::SW_POWER_CAP),
            ..Reading::default()
        };
        let meta = SampleMeta {
            facts: &facts,
            seq: 1,
            time: SystemTime::now(),
            age_ms: 3,
            health: GpuHealth::Ok,
            error: None,
            governor_state: GovernorState::Idle,
        };
        let s = sample(meta, Some(&reading), None);
        assert_eq!(s.temperature_c, Some(0), "a real zero stays a zero");
        assert!(s.fan_speed_pct.is_none());
        assert!(
            s.max_graphics_clock_mhz.is_none(),
            "max clocks not advertised"
        );
        assert_eq!(
            s.throttle_reasons().collect::<Vec<_>>(),
            [crate::api::ThrottleReason::SwPowerCap]
        );
        assert!(s.processes_time.is_none());
    }
}
