//! The NVML backend reading GPUs: identity, limits, probing of supported
//! fields and controls, and readings, against the stand-in NVML library.

use std::fs;

use crate::nvml_support::{FAST, FakeNvml, SLOW};
use gpuwatch_server::backend::{Backend, BackendError, Field, GpuDevice};
use serde_json::json;

fn open(fake: &FakeNvml, index: u32) -> Box<dyn GpuDevice> {
    fake.backend().open(index).expect("open GPU")
}

#[test]
fn datacenter_gpu_reads_sane_values() {
    let fake = FakeNvml::new(&json!({
        "gpus": [
            {"model": "datacenter", "load_pct": 80,
             "processes": [{"pid": 4242, "used_memory_mib": 2048}],
             "ecc_errors": {"corrected": 3, "uncorrected": 1}},
            {"model": "datacenter", "load_pct": 10}
        ]
    }));
    let backend = fake.backend();
    let host = backend.host_facts();
    assert_eq!(host.backend, "nvml");
    assert!(host.driver_version.is_some_and(|v| !v.is_empty()));
    assert!(host.nvml_version.is_some_and(|v| !v.is_empty()));
    assert_eq!(backend.device_count().expect("count"), 2);

    let mut gpu0 = backend.open(0).expect("open 0");
    let mut gpu1 = backend.open(1).expect("open 1");
    let facts = gpu0.describe().expect("describe");
    let other = gpu1.describe().expect("describe");
    assert_eq!(facts.index, 0);
    assert_eq!(other.index, 1);
    assert!(facts.uuid.starts_with("GPU-"), "{}", facts.uuid);
    assert_ne!(facts.uuid, other.uuid);
    assert_ne!(facts.pci_bus_id, other.pci_bus_id);
    assert!(!facts.name.is_empty());
    let (min, max, default) = (
        facts.power_min_mw.expect("min"),
        facts.power_max_mw.expect("max"),
        facts.power_default_mw.expect("default"),
    );
    assert!(min < max && (min..=max).contains(&default));
    let slowdown = facts.slowdown_c.expect("slowdown");
    assert!(slowdown < facts.shutdown_c.expect("shutdown"));
    assert!(facts.max_operating_c.is_some());
    let max_graphics = facts.max_graphics_clock_mhz.expect("max graphics clock");
    let total = facts.memory_total_bytes.expect("memory total");

    let r = gpu0.read(SLOW).expect("read");
    let temperature = r.temperature_c.expect("temperature");
    assert!(temperature > 0 && temperature < slowdown, "{temperature}");
    assert!(r.memory_temperature_c.is_some());
    assert!(r.fan_speed_pct.is_some_and(|p| p <= 100));
    let limit = r.power_limit_mw.expect("limit");
    assert_eq!(limit, default, "a fresh GPU runs at its default limit");
    assert_eq!(r.enforced_power_limit_mw, Some(limit));
    let draw = r.power_draw_mw.expect("draw");
    assert!(draw > 0 && draw <= limit);
    assert!(r.energy_mj.is_some());
    for clock in [r.graphics_clock_mhz, r.sm_clock_mhz, r.video_clock_mhz] {
        assert!(
            clock.is_some_and(|c| c > 0 && c <= max_graphics),
            "{clock:?}"
        );
    }
    assert!(r.memory_clock_mhz.is_some());
    assert_eq!(r.utilization_gpu_pct, Some(80));
    assert!(r.utilization_memory_pct.is_some_and(|u| u <= 100));
    assert_eq!(r.memory_total_bytes, Some(total));
    assert!(
        r.memory_used_bytes
            .is_some_and(|u| u >= 2048 << 20 && u < total)
    );
    assert_eq!(r.performance_state, Some(0), "a busy GPU is in P0");
    assert!(r.throttle_mask.is_some());
    assert!(r.pcie_tx_kbps.is_some() && r.pcie_rx_kbps.is_some());
    assert_eq!(r.locked_gpu_clock_max_mhz, None);
    let slow = r.slow.expect("slow fields were asked for");
    let ecc = slow.ecc.expect("ECC is on");
    assert_eq!(ecc.corrected_volatile, Some(3));
    assert_eq!(ecc.uncorrected_volatile, Some(1));
    assert!(ecc.corrected_aggregate >= ecc.corrected_volatile);
    assert!(ecc.uncorrected_aggregate >= ecc.uncorrected_volatile);
    let processes = slow.processes.expect("processes");
    assert_eq!(processes.len(), 1);
    assert_eq!(processes[0].pid, 4242);
    assert_eq!(processes[0].used_memory_bytes, Some(2048 << 20));

    // The lighter GPU draws less and runs cooler.
    let light = gpu1.read(FAST).expect("read");
    assert!(light.power_draw_mw < r.power_draw_mw);
    assert!(light.temperature_c < r.temperature_c);
    assert!(light.slow.is_none(), "slow fields only when asked");
}

#[test]
fn device_time_is_monotonic_backend_time() {
    let fake = FakeNvml::new(&json!({"gpus": [{}]}));
    let mut gpu = open(&fake, 0);
    let a = gpu.read(FAST).expect("read").device_time;
    std::thread::sleep(std::time::Duration::from_millis(5));
    let b = gpu.read(FAST).expect("read").device_time;
    assert!(b > a, "{a:?} then {b:?}");
}

#[test]
fn consumer_gpu_reports_unsupported_fields_as_absent() {
    let fake = FakeNvml::new(&json!({"gpus": [{"model": "consumer", "load_pct": 50}]}));
    let mut gpu = open(&fake, 0);
    let facts = gpu.describe().expect("describe");
    for absent in [
        Field::MemoryTemperature,
        Field::FanSpeed,
        Field::EccErrors,
        Field::PcieThroughput,
    ] {
        assert!(
            !facts.fields.contains(&absent),
            "{absent:?} in {:?}",
            facts.fields
        );
    }
    for present in [Field::Temperature, Field::PowerDraw, Field::PowerLimit] {
        assert!(facts.fields.contains(&present), "{present:?} missing");
    }
    let r = gpu.read(SLOW).expect("read");
    assert_eq!(r.memory_temperature_c, None);
    assert_eq!(r.fan_speed_pct, None);
    assert_eq!(r.pcie_tx_kbps, None);
    assert_eq!(r.pcie_rx_kbps, None);
    assert!(r.temperature_c.is_some());
    assert!(r.power_draw_mw.is_some());
    let slow = r.slow.expect("slow");
    assert_eq!(slow.ecc, None, "no ECC, so no counts (not zeros)");
    assert!(slow.processes.is_some());
}

#[test]
fn probing_finds_each_models_fields_and_controls() {
    let fake = FakeNvml::new(&json!({
        "gpus": [{"model": "datacenter"}, {"model": "consumer"}, {"model": "laptop"}]
    }));
    let backend = fake.backend();
    let describe = |i| backend.open(i).expect("open").describe().expect("describe");
    let (datacenter, consumer, laptop) = (describe(0), describe(1), describe(2));

    // A board that has everything reports every field, sorted.
    let every_field = vec![
        Field::Temperature,
        Field::MemoryTemperature,
        Field::FanSpeed,
        Field::PowerDraw,
        Field::PowerLimit,
        Field::EnforcedPowerLimit,
        Field::Energy,
        Field::GraphicsClock,
        Field::SmClock,
        Field::MemoryClock,
        Field::VideoClock,
        Field::MaxClocks,
        Field::Utilization,
        Field::MemoryUsage,
        Field::PerformanceState,
        Field::ThrottleReasons,
        Field::EccErrors,
        Field::PcieThroughput,
        Field::Processes,
    ];
    assert_eq!(datacenter.fields, every_field);
    let all = datacenter.controls;
    assert!(all.power_limit_settable);
    assert!(all.gpu_clocks_lockable);
    assert!(all.memory_clocks_lockable);
    assert!(all.application_clocks_resettable);
    assert!(all.xid_events);

    // GeForce: no application clocks, but clocks and power can be set.
    assert!(consumer.controls.power_limit_settable);
    assert!(consumer.controls.gpu_clocks_lockable);
    assert!(!consumer.controls.application_clocks_resettable);

    // Laptop: power management is not exposed at all.
    assert!(!laptop.controls.power_limit_settable);
    assert_eq!(laptop.power_min_mw, None);
    assert_eq!(laptop.power_max_mw, None);
    assert_eq!(laptop.power_default_mw, None);
    assert!(!laptop.fields.contains(&Field::PowerLimit));
    assert!(!laptop.fields.contains(&Field::Energy));
    assert!(!laptop.controls.memory_clocks_lockable);
    assert!(laptop.controls.gpu_clocks_lockable);
}

#[test]
fn features_switched_off_are_probed_away() {
    let fake = FakeNvml::new(&json!({
        "gpus": [{"unsupported": ["utilization", "throttle_reasons", "processes", "events"]}]
    }));
    let mut gpu = open(&fake, 0);
    let facts = gpu.describe().expect("describe");
    assert!(!facts.fields.contains(&Field::Utilization));
    assert!(!facts.fields.contains(&Field::ThrottleReasons));
    assert!(!facts.fields.contains(&Field::Processes));
    assert!(!facts.controls.xid_events, "registration was refused");
    let r = gpu.read(SLOW).expect("read");
    assert_eq!(r.utilization_gpu_pct, None);
    assert_eq!(r.utilization_memory_pct, None);
    assert_eq!(r.throttle_mask, None);
    assert_eq!(r.slow.expect("slow").processes, None);
    assert!(r.temperature_c.is_some());
}

#[test]
fn reads_never_call_what_probing_found_unsupported() {
    let fake = FakeNvml::new(&json!({"gpus": [{"model": "consumer"}]}));
    let trace = fake.dir().join("calls.log");
    fake.set_config(&json!({"trace_file": trace, "gpus": [{"model": "consumer"}]}));
    let mut gpu = open(&fake, 0);
    gpu.describe().expect("describe");
    let log = fs::read_to_string(&trace).expect("trace");
    let not_supported = " 3\n"; // NVML_ERROR_NOT_SUPPORTED
    assert!(
        log.contains(not_supported),
        "probing met unsupported calls:\n{log}"
    );
    let probed = log.len();
    for _ in 0..3 {
        gpu.read(SLOW).expect("read");
    }
    let log = fs::read_to_string(&trace).expect("trace");
    let reads = &log[probed..];
    assert!(!reads.is_empty(), "reads call NVML");
    assert!(
        !reads.contains(not_supported),
        "reads called unsupported functions:\n{reads}"
    );
    // Memory temperature is a field value whose NotSupported is per field.
    assert!(
        !reads.contains("nvmlDeviceGetFieldValues"),
        "reads asked for the memory temperature again:\n{reads}"
    );
}

#[test]
fn a_process_without_a_memory_figure_reports_none() {
    let fake = FakeNvml::new(&json!({
        "gpus": [{"processes": [{"pid": 10, "used_memory_mib": null},
                                {"pid": 11, "used_memory_mib": 1}]}]
    }));
    let mut gpu = open(&fake, 0);
    let processes = gpu
        .read(SLOW)
        .expect("read")
        .slow
        .and_then(|s| s.processes)
        .expect("processes");
    assert_eq!(processes.len(), 2);
    assert_eq!(processes[0].pid, 10);
    assert_eq!(processes[0].used_memory_bytes, None);
    assert_eq!(processes[1].used_memory_bytes, Some(1 << 20));
}

#[test]
fn a_gpu_that_does_not_exist_cannot_be_opened() {
    let fake = FakeNvml::new(&json!({"gpus": [{}]}));
    let result = fake.backend().open(5);
    assert!(
        matches!(result, Err(BackendError::InvalidArgument(_))),
        "{:?}",
        result.err()
    );
}

#[test]
fn the_default_fleet_has_two_gpus() {
    let fake = FakeNvml::without_config();
    // The fake falls back to FAKENVML_CONFIG when it has no file of its own;
    // this test is only meaningful without it.
    if std::env::var_os("FAKENVML_CONFIG").is_some() {
        return;
    }
    assert_eq!(fake.backend().device_count().expect("count"), 2);
}
