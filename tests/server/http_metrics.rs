//! `/metrics`: what Prometheus gets from a real daemon, and the exact values
//! rendered from a hub whose contents the test controls.
//!
//! The CI scripts `.ci/prometheus.sh` (promtool + a real Prometheus server)
//! check the format with the reference parsers; these tests pin the content.

use std::{
    sync::{Arc, atomic::AtomicUsize},
    time::{Duration, Instant, SystemTime},
};

use crate::http_support::{Daemon, eventually, find, get, parse_samples};
use gpuwatch_server::{
    api::{
        self, Capabilities, DeviceInfo, EccErrors, EventKind, Frame, GovernorMode, GovernorState,
        GpuHealth, GpuPolicy, GpuSample, PowerLimits, TelemetryField,
    },
    events::{Actor, EventLog, NewEvent},
    http::metrics::{Format, MetricsEndpoint, Sources},
    hub::Hub,
};

const LIMIT: Duration = Duration::from_secs(90);

/// Runs a test body with an overall deadline.
async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("the test took too long");
}

fn device(index: u32, name: &str, fields: &[TelemetryField]) -> DeviceInfo {
    DeviceInfo {
        index,
        uuid: format!("GPU-{index}aaaaaaa-0000-0000-0000-000000000000"),
        name: name.to_owned(),
        pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index * 0x10),
        power_limits: Some(PowerLimits {
            min_mw: Some(200_000),
            max_mw: Some(700_000),
            default_mw: Some(700_000),
            current_mw: Some(650_000),
            enforced_mw: Some(650_000),
        }),
        slowdown_temperature_c: Some(89),
        shutdown_temperature_c: Some(92),
        max_operating_temperature_c: Some(85),
        capabilities: Some(Capabilities {
            power_limit_settable: true,
            supported_fields: fields.iter().map(|f| *f as i32).collect(),
            ..Capabilities::default()
        }),
        ..DeviceInfo::default()
    }
}

fn full_sample(index: u32, seq: u64, temperature_c: u32) -> GpuSample {
    GpuSample {
        index,
        uuid: format!("GPU-{index}aaaaaaa-0000-0000-0000-000000000000"),
        seq,
        time: Some(SystemTime::now().into()),
        health: GpuHealth::Ok as i32,
        temperature_c: Some(temperature_c),
        memory_temperature_c: Some(temperature_c - 4),
        fan_speed_pct: None,
        power_draw_mw: Some(612_345),
        power_limit_mw: Some(650_000),
        enforced_power_limit_mw: Some(650_000),
        energy_mj: Some(123_456_789),
        graphics_clock_mhz: Some(1755),
        sm_clock_mhz: Some(1755),
        memory_clock_mhz: Some(2619),
        video_clock_mhz: Some(1500),
        max_graphics_clock_mhz: Some(1980),
        utilization_gpu_pct: Some(97),
        utilization_memory_pct: Some(41),
        memory_used_bytes: Some(40 << 30),
        memory_total_bytes: Some(80 << 30),
        performance_state: Some(0),
        throttle_reasons_mask: Some(0x4),
        ecc: Some(EccErrors {
            corrected_volatile: Some(3),
            uncorrected_volatile: Some(0),
            corrected_aggregate: Some(17),
            uncorrected_aggregate: None,
        }),
        pcie_tx_kbps: Some(1000),
        pcie_rx_kbps: Some(2000),
        processes: vec![api::GpuProcess {
            pid: 4242,
            used_memory_bytes: Some(1 << 30),
            ..api::GpuProcess::default()
        }],
        processes_time: Some(SystemTime::now().into()),
        governor_state: GovernorState::Throttling as i32,
        ..GpuSample::default()
    }
}

/// A hub holding two GPUs: GPU 0 reports (almost) everything, GPU 1 is lost.
fn controlled_hub() -> (Arc<Hub>, Arc<EventLog>, MetricsEndpoint) {
    let hub = Arc::new(Hub::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
        16,
    ));
    let (events, _) = EventLog::open(None, 100);
    let events = Arc::new(events);
    let all_fields: Vec<TelemetryField> = (1..=19)
        .filter_map(|n| TelemetryField::try_from(n).ok())
        .filter(|f| *f != TelemetryField::FanSpeed)
        .collect();
    hub.set_devices(vec![
        device(0, "NVIDIA H100 80GB HBM3", &all_fields),
        device(1, "NVIDIA \"Quoted\" GPU", &all_fields),
    ]);
    hub.set_policies(vec![GpuPolicy {
        index: 0,
        uuid: "GPU-0aaaaaaa-0000-0000-0000-000000000000".into(),
        mode: GovernorMode::PowerLimit as i32,
        state: GovernorState::Throttling as i32,
        threshold_c: 83,
        hysteresis_c: 3,
        floor_mw: Some(200_000),
        ceiling_mw: Some(700_000),
        current_limit_mw: Some(650_000),
        ..GpuPolicy::default()
    }]);
    hub.publish(Frame {
        seq: 1000,
        time: Some(SystemTime::now().into()),
        samples: vec![
            full_sample(0, 1000, 84),
            GpuSample {
                index: 1,
                uuid: "GPU-1aaaaaaa-0000-0000-0000-000000000000".into(),
                seq: 1000,
                health: GpuHealth::Lost as i32,
                governor_state: GovernorState::Suspended as i32,
                ..GpuSample::default()
            },
        ],
    });
    events.record(
        NewEvent::new(EventKind::PowerLimitChanged, Actor::governor(), "too hot")
            .gpu(0, "GPU-0aaaaaaa-0000-0000-0000-000000000000"),
    );
    events.record(NewEvent::new(EventKind::GpuLost, Actor::device(), "gone").gpu(1, "GPU-1"));
    let endpoint = MetricsEndpoint::new(Sources {
        hub: hub.clone(),
        events: events.clone(),
        hostname: Arc::from("node-7"),
        dashboard_streams: Arc::new(AtomicUsize::new(2)),
        leases: None,
    });
    (hub, events, endpoint)
}

fn value(all: &[crate::http_support::Series], name: &str, with: &[(&str, &str)]) -> f64 {
    let found = find(all, name, with);
    assert_eq!(found.len(), 1, "{name} {with:?}: {found:?}");
    found[0].value
}

#[test]
fn values_are_the_hubs_latest_sample_in_base_units() {
    let (_hub, _events, endpoint) = controlled_hub();
    let text = endpoint.render_openmetrics().expect("renders");
    let all = parse_samples(&text);
    let gpu0 = [("gpu", "0")];
    assert_eq!(value(&all, "gpuwatch_temperature_celsius", &gpu0), 84.0);
    assert_eq!(
        value(&all, "gpuwatch_memory_temperature_celsius", &gpu0),
        80.0
    );
    assert_eq!(value(&all, "gpuwatch_power_draw_watts", &gpu0), 612.345);
    assert_eq!(value(&all, "gpuwatch_power_limit_watts", &gpu0), 650.0);
    assert_eq!(
        value(&all, "gpuwatch_energy_joules_total", &gpu0),
        123_456.789
    );
    assert_eq!(
        value(
            &all,
            "gpuwatch_clock_hertz",
            &[("gpu", "0"), ("clock", "sm")]
        ),
        1_755e6
    );
    assert_eq!(
        value(
            &all,
            "gpuwatch_max_clock_hertz",
            &[("gpu", "0"), ("clock", "graphics")]
        ),
        1_980e6
    );
    assert_eq!(value(&all, "gpuwatch_gpu_utilization_ratio", &gpu0), 0.97);
    assert_eq!(
        value(&all, "gpuwatch_memory_used_bytes", &gpu0),
        (40u64 << 30) as f64
    );
    assert_eq!(
        value(
            &all,
            "gpuwatch_throttle_reason",
            &[("gpu", "0"), ("reason", "sw_power_cap")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &all,
            "gpuwatch_throttle_reason",
            &[("gpu", "0"), ("reason", "hw_thermal_slowdown")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &all,
            "gpuwatch_ecc_errors_aggregate_total",
            &[("gpu", "0"), ("error", "corrected")]
        ),
        17.0
    );
    assert_eq!(
        value(
            &all,
            "gpuwatch_pcie_throughput_bytes_per_second",
            &[("gpu", "0"), ("direction", "rx")]
        ),
        2000.0 * 1024.0
    );
    assert_eq!(value(&all, "gpuwatch_processes", &gpu0), 1.0);
    assert_eq!(
        value(&all, "gpuwatch_power_limit_default_watts", &gpu0),
        700.0
    );
    assert_eq!(
        value(&all, "gpuwatch_slowdown_temperature_celsius", &gpu0),
        89.0
    );

    // The governor.
    assert_eq!(
        value(&all, "gpuwatch_governor_threshold_celsius", &gpu0),
        83.0
    );
    assert_eq!(
        value(&all, "gpuwatch_governor_power_limit_watts", &gpu0),
        650.0
    );
    assert_eq!(value(&all, "gpuwatch_governor_ceiling_watts", &gpu0), 700.0);
    assert_eq!(
        value(
            &all,
            "gpuwatch_governor_state",
            &[("gpu", "0"), ("state", "throttling")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &all,
            "gpuwatch_governor_state",
            &[("gpu", "0"), ("state", "idle")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &all,
            "gpuwatch_governor_mode",
            &[("gpu", "0"), ("mode", "power_limit")]
        ),
        1.0
    );

    // Events and the daemon's own figures.
    assert_eq!(
        value(
            &all,
            "gpuwatch_events_total",
            &[("kind", "power_limit_changed")]
        ),
        1.0
    );
    assert_eq!(
        value(&all, "gpuwatch_events_total", &[("kind", "gpu_lost")]),
        1.0
    );
    assert_eq!(
        value(&all, "gpuwatch_events_total", &[("kind", "xid_error")]),
        0.0
    );
    assert_eq!(value(&all, "gpuwatch_frames_published_total", &[]), 1.0);
    assert_eq!(
        value(&all, "gpuwatch_subscribers", &[("stream", "dashboard")]),
        2.0
    );
    assert!(value(&all, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
}

#[test]
fn every_gpu_series_carries_the_dcgm_exporter_labels() {
    let (_hub, _events, endpoint) = controlled_hub();
    let text = endpoint.render_openmetrics().expect("renders");
    let all = parse_samples(&text);
    let temps = find(&all, "gpuwatch_temperature_celsius", &[]);
    assert_eq!(temps.len(), 1, "only the GPU that reads has a temperature");
    let labels = &temps[0].labels;
    assert_eq!(labels["gpu"], "0");
    assert_eq!(labels["uuid"], "GPU-0aaaaaaa-0000-0000-0000-000000000000");
    assert_eq!(labels["model_name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(labels["hostname"], "node-7");
    assert_eq!(labels["pci_bus_id"], "00000000:18:00.0");
    // A model name with quotes is escaped, not broken.
    assert!(
        text.contains(r#"model_name="NVIDIA \"Quoted\" GPU""#),
        "{text}"
    );
}

#[test]
fn unsupported_and_lost_readings_have_no_series_never_zero() {
    let (_hub, _events, endpoint) = controlled_hub();
    let text = endpoint.render_openmetrics().expect("renders");
    let all = parse_samples(&text);
    // GPU 0 has no fan: no fan series at all (the family is left out).
    assert!(find(&all, "gpuwatch_fan_speed_ratio", &[]).is_empty());
    assert!(
        !text.contains("gpuwatch_fan_speed"),
        "no empty family either"
    );
    // uncorrected_aggregate is absent: only the reported ECC series exist.
    assert!(
        find(
            &all,
            "gpuwatch_ecc_errors_aggregate_total",
            &[("error", "uncorrected")]
        )
        .is_empty()
    );
    // GPU 1 is lost: its health says so, and none of its readings remain.
    let gpu1 = [("gpu", "1")];
    assert_eq!(
        value(
            &all,
            "gpuwatch_gpu_health",
            &[("gpu", "1"), ("state", "lost")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &all,
            "gpuwatch_gpu_health",
            &[("gpu", "1"), ("state", "ok")]
        ),
        0.0
    );
    for name in [
        "gpuwatch_temperature_celsius",
        "gpuwatch_power_draw_watts",
        "gpuwatch_power_limit_watts",
        "gpuwatch_processes",
        "gpuwatch_reading_timestamp_seconds",
        "gpuwatch_throttle_reason",
    ] {
        assert!(find(&all, name, &gpu1).is_empty(), "{name} for a lost GPU");
    }
    // Facts about the device stay: they are not readings.
    assert_eq!(
        value(&all, "gpuwatch_shutdown_temperature_celsius", &gpu1),
        92.0
    );
    // GPU 1 has no policy: no governor series for it.
    assert!(find(&all, "gpuwatch_governor_threshold_celsius", &gpu1).is_empty());
}

#[test]
fn the_text_is_cached_per_frame_and_renewed_by_the_next_one() {
    let (hub, _events, endpoint) = controlled_hub();
    let first = endpoint.body(Format::Prometheus).expect("renders");
    let again = endpoint.body(Format::Prometheus).expect("renders");
    assert_eq!(
        first.as_ptr(),
        again.as_ptr(),
        "a second scrape of the same frame reuses the rendered bytes"
    );
    hub.publish(Frame {
        seq: 1001,
        time: Some(SystemTime::now().into()),
        samples: vec![full_sample(0, 1001, 71)],
    });
    let next = endpoint.body(Format::Prometheus).expect("renders");
    let all = parse_samples(std::str::from_utf8(&next).expect("utf-8"));
    assert_eq!(
        value(&all, "gpuwatch_temperature_celsius", &[("gpu", "0")]),
        71.0
    );
}

#[test]
fn classic_format_names_counters_for_promtool() {
    let (_hub, _events, endpoint) = controlled_hub();
    let classic = endpoint.body(Format::Prometheus).expect("renders");
    let classic = std::str::from_utf8(&classic).expect("utf-8");
    assert!(classic.contains("# TYPE gpuwatch_events_total counter\n"));
    assert!(classic.contains("# TYPE gpuwatch_energy_joules_total counter\n"));
    assert!(!classic.contains("# EOF"));
    assert!(!classic.contains("# UNIT"));
    // Same samples in both formats.
    let om = endpoint.body(Format::OpenMetrics).expect("renders");
    let om = std::str::from_utf8(&om).expect("utf-8");
    assert_eq!(parse_samples(classic), parse_samples(om));
}

/// A hub whose one GPU is in MIG mode with two instances: a pod's process
/// in instance A (allocated, busy), a notebook allocated instance B but
/// running nothing there, two processes of one Slurm job in instance B, and
/// a systemd unit's process. Users and command lines are set, to prove
/// they never reach /metrics.
fn workload_hub() -> MetricsEndpoint {
    let hub = Arc::new(Hub::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
        16,
    ));
    let (events, _) = EventLog::open(None, 100);
    hub.set_devices(vec![device(
        0,
        "NVIDIA A100-SXM4-80GB",
        &[TelemetryField::Processes],
    )]);
    let gpu = "GPU-0aaaaaaa-0000-0000-0000-000000000000";
    let (mig_a, mig_b) = ("MIG-aaaa", "MIG-bbbb");
    let pod = |ns: &str, name: &str, c: &str| api::PodRef {
        namespace: ns.into(),
        pod: name.into(),
        container: c.into(),
    };
    let process = |pid: u32, mig: &str, attribution: api::Attribution| api::GpuProcess {
        pid,
        used_memory_bytes: Some(1 << 30),
        name: Some("python3".into()),
        command_line: Some("python3 train.py --token=hunter2".into()),
        uid: Some(1000),
        user: Some("alice".into()),
        mig_uuid: Some(mig.into()),
        attribution: Some(attribution),
        ..api::GpuProcess::default()
    };
    let slurm = || api::Attribution {
        slurm: Some(api::SlurmJob {
            job_id: "4242".into(),
            step: Some("0".into()),
            uid: Some(1000),
        }),
        ..api::Attribution::default()
    };
    let mut sample = full_sample(0, 7, 60);
    sample.mig_enabled = Some(true);
    sample.mig_instances = vec![
        api::MigInstance {
            uuid: mig_a.into(),
            gpu_instance_id: 1,
            compute_instance_id: 0,
            profile: "3g.40gb".into(),
            sm_count: Some(42),
            memory_total_bytes: Some(40 << 30),
            memory_used_bytes: Some(10 << 30),
            utilization_gpu_pct: None,
            pids: vec![987_001],
        },
        api::MigInstance {
            uuid: mig_b.into(),
            gpu_instance_id: 2,
            compute_instance_id: 0,
            profile: "2g.20gb".into(),
            sm_count: Some(28),
            memory_total_bytes: Some(20 << 30),
            memory_used_bytes: Some(2 << 30),
            utilization_gpu_pct: Some(35),
            pids: vec![987_002, 987_003, 987_004],
        },
    ];
    sample.processes = vec![
        process(
            987_001,
            mig_a,
            api::Attribution {
                pod: Some(pod("ml", "trainer-0", "main")),
                container_id: Some("5aa78b70".into()),
                ..api::Attribution::default()
            },
        ),
        process(987_002, mig_b, slurm()),
        process(987_003, mig_b, slurm()),
        process(
            987_004,
            mig_b,
            api::Attribution {
                systemd_unit: Some("render.service".into()),
                ..api::Attribution::default()
            },
        ),
    ];
    sample.allocations = vec![
        api::GpuAllocation {
            pod: Some(pod("ml", "trainer-0", "main")),
            resource_name: "nvidia.com/mig-3g.40gb".into(),
            device_ids: vec![mig_a.into()],
            idle: false,
        },
        api::GpuAllocation {
            pod: Some(pod("research", "notebook-5", "jupyter")),
            resource_name: "nvidia.com/mig-2g.20gb".into(),
            device_ids: vec![mig_b.into()],
            idle: true,
        },
    ];
    assert_eq!(sample.uuid, gpu);
    hub.publish(Frame {
        seq: 7,
        time: Some(SystemTime::now().into()),
        samples: vec![sample],
    });
    MetricsEndpoint::new(Sources {
        hub,
        events: Arc::new(events),
        hostname: Arc::from("node-7"),
        dashboard_streams: Arc::new(AtomicUsize::new(0)),
        leases: None,
    })
}

#[test]
fn allocations_owners_and_mig_instances_are_info_series_to_join_on() {
    let endpoint = workload_hub();
    let text = endpoint.render_openmetrics().expect("renders");
    let all = parse_samples(&text);

    // One allocation series per allocated device, with the pod's names.
    let allocations = find(&all, "gpuwatch_gpu_allocation_info", &[]);
    assert_eq!(allocations.len(), 2, "{allocations:?}");
    let trainer = find(
        &all,
        "gpuwatch_gpu_allocation_info",
        &[
            ("device", "MIG-aaaa"),
            ("namespace", "ml"),
            ("pod", "trainer-0"),
        ],
    );
    assert_eq!(trainer.len(), 1, "{allocations:?}");
    assert_eq!(trainer[0].value, 1.0);
    assert_eq!(trainer[0].labels["container"], "main");
    assert_eq!(trainer[0].labels["resource"], "nvidia.com/mig-3g.40gb");
    assert_eq!(
        trainer[0].labels["uuid"], "GPU-0aaaaaaa-0000-0000-0000-000000000000",
        "joins on the parent GPU's uuid"
    );

    // Allocated but idle: 1 for the notebook, 0 for the busy trainer.
    assert_eq!(
        value(
            &all,
            "gpuwatch_gpu_allocated_idle",
            &[("pod", "notebook-5")]
        ),
        1.0
    );
    assert_eq!(
        value(&all, "gpuwatch_gpu_allocated_idle", &[("pod", "trainer-0")]),
        0.0
    );

    // Non-pod owners: one series per owner and device, not per process
    // (the job's two processes make one series); the pod is not repeated.
    let owners = find(&all, "gpuwatch_gpu_process_owner_info", &[]);
    assert_eq!(owners.len(), 2, "{owners:?}");
    let job = find(
        &all,
        "gpuwatch_gpu_process_owner_info",
        &[
            ("owner_kind", "slurm"),
            ("owner", "4242"),
            ("device", "MIG-bbbb"),
        ],
    );
    assert_eq!(job.len(), 1, "{owners:?}");
    assert_eq!(
        find(
            &all,
            "gpuwatch_gpu_process_owner_info",
            &[("owner_kind", "unit"), ("owner", "render.service")],
        )
        .len(),
        1
    );

    // MIG instances.
    assert_eq!(
        value(&all, "gpuwatch_gpu_mig_enabled", &[("gpu", "0")]),
        1.0
    );
    let info = find(
        &all,
        "gpuwatch_mig_instance_info",
        &[("mig_uuid", "MIG-bbbb")],
    );
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].labels["profile"], "2g.20gb");
    assert_eq!(info[0].labels["gpu_instance_id"], "2");
    assert_eq!(info[0].labels["compute_instance_id"], "0");
    let b = [("mig_uuid", "MIG-bbbb")];
    assert_eq!(
        value(&all, "gpuwatch_mig_instance_memory_used_bytes", &b),
        (2u64 << 30) as f64
    );
    assert_eq!(
        value(&all, "gpuwatch_mig_instance_memory_total_bytes", &b),
        (20u64 << 30) as f64
    );
    assert_eq!(
        value(&all, "gpuwatch_mig_instance_multiprocessors", &b),
        28.0
    );
    assert_eq!(value(&all, "gpuwatch_mig_instance_processes", &b), 3.0);
    assert_eq!(
        value(&all, "gpuwatch_mig_instance_utilization_ratio", &b),
        0.35
    );
    // Instance A's driver gives no utilisation: no series, never a 0.
    assert!(
        find(
            &all,
            "gpuwatch_mig_instance_utilization_ratio",
            &[("mig_uuid", "MIG-aaaa")]
        )
        .is_empty()
    );

    // /metrics may be readable without a token: no users, command lines or
    // pids, ever.
    for secret in [
        "alice", "hunter2", "train.py", "987001", "987002", "python3",
    ] {
        assert!(!text.contains(secret), "{secret} leaked into /metrics");
    }
    // Same workload samples in the classic format (the daemon's own
    // process_* figures move between two renderings).
    let classic = endpoint.body(Format::Prometheus).expect("renders");
    let classic = std::str::from_utf8(&classic).expect("utf-8");
    let workload = |all: Vec<crate::http_support::Series>| {
        all.into_iter()
            .filter(|s| {
                s.name.starts_with("gpuwatch_mig_")
                    || [
                        "gpuwatch_gpu_allocation_info",
                        "gpuwatch_gpu_allocated_idle",
                        "gpuwatch_gpu_process_owner_info",
                        "gpuwatch_gpu_mig_enabled",
                    ]
                    .contains(&s.name.as_str())
            })
            .collect::<Vec<_>>()
    };
    let from_classic = workload(parse_samples(classic));
    // 2 allocations, 2 idle flags, 2 owners, 1 MIG mode, and per instance
    // info, SMs, memory used and total, processes (+ 1 utilisation).
    assert_eq!(
        from_classic.len(),
        2 + 2 + 2 + 1 + 2 * 5 + 1,
        "{from_classic:#?}"
    );
    assert_eq!(from_classic, workload(all));
}

#[test]
fn a_gpu_without_workloads_or_mig_readings_has_no_workload_series() {
    let (_hub, _events, endpoint) = controlled_hub();
    let all = parse_samples(&endpoint.render_openmetrics().expect("renders"));
    for name in [
        "gpuwatch_gpu_allocation_info",
        "gpuwatch_gpu_allocated_idle",
        "gpuwatch_gpu_process_owner_info",
        "gpuwatch_gpu_mig_enabled",
        "gpuwatch_mig_instance_info",
        "gpuwatch_mig_instance_memory_used_bytes",
    ] {
        assert!(find(&all, name, &[]).is_empty(), "{name} without data");
    }
}

// ---- Black-box: the real daemon ----

const TWO_H100: &str = r#"
[sampler]
interval = "100ms"

[simulator]
speed = 5.0

[[simulator.gpus]]
preset = "h100-sxm"
count = 2
demand = [ { at = "0s", watts = 450.0 } ]
"#;

/// A scrape once every GPU has a temperature.
async fn scrape_when_ready(d: &Daemon, gpus: usize) -> Vec<crate::http_support::Series> {
    eventually(LIMIT, "every GPU to report a temperature", || async {
        let r = get(&d.url("/metrics"), None).await;
        let all = parse_samples(&r.body);
        (find(&all, "gpuwatch_temperature_celsius", &[]).len() == gpus).then_some(all)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_exports_every_family_a_dcgm_user_expects() {
    bounded(async {
        let d = Daemon::start(Some(TWO_H100));
        let all = scrape_when_ready(&d, 2).await;
        for name in [
            "gpuwatch_temperature_celsius",
            "gpuwatch_memory_temperature_celsius",
            "gpuwatch_power_draw_watts",
            "gpuwatch_power_limit_watts",
            "gpuwatch_enforced_power_limit_watts",
            "gpuwatch_energy_joules_total",
            "gpuwatch_clock_hertz",
            "gpuwatch_gpu_utilization_ratio",
            "gpuwatch_memory_used_bytes",
            "gpuwatch_throttle_reason",
            "gpuwatch_gpu_health",
            "gpuwatch_governor_state",
            "gpuwatch_governor_threshold_celsius",
            "gpuwatch_governor_power_limit_watts",
            "gpuwatch_power_limit_default_watts",
        ] {
            let series = find(&all, name, &[]);
            assert!(!series.is_empty(), "{name} is missing");
            for s in series {
                for label in ["gpu", "uuid", "model_name", "hostname", "pci_bus_id"] {
                    assert!(s.labels.contains_key(label), "{name} lacks {label}: {s:?}");
                }
                assert_eq!(s.labels["model_name"], "NVIDIA H100 80GB HBM3");
            }
        }
        assert_eq!(
            find(&all, "gpuwatch_events_total", &[("kind", "daemon_started")])[0].value,
            1.0
        );
        let ticks = find(&all, "gpuwatch_sample_duration_seconds_count", &[]);
        assert!(ticks[0].value >= 1.0, "sample durations are recorded");
        let published = find(&all, "gpuwatch_frames_published_total", &[]);
        assert!(published[0].value >= 1.0);
        assert!(!find(&all, "gpuwatch_subscribers", &[("stream", "watch")]).is_empty());
        assert!(!find(&all, "process_cpu_seconds_total", &[]).is_empty());
    })
    .await;
}

/// A simulated A100 in MIG mode: a pod process in one instance, a notebook
/// allocated the other and running nothing; command lines read in full.
const MIG_WORKLOADS: &str = r#"
[attribution]
command_lines = "full"

[[simulator.gpus]]
preset = "a100-sxm"
mig = { enabled = true, instances = ["3g.40gb", "2g.20gb"] }
processes = [ { pid = 7100, name = "tritonserver", command_line = "tritonserver --api-key=s3cr3t", user = "svc-infer", uid = 2000, memory_mib = 9000, mig_instance = 0, namespace = "serving", pod = "triton-0", container = "triton" } ]
allocations = [ { namespace = "research", pod = "notebook-1", container = "jupyter", mig_instance = 1 } ]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_mig_gpu_exports_its_instances_and_who_holds_them() {
    bounded(async {
        let d = Daemon::start(Some(MIG_WORKLOADS));
        let (text, all) = eventually(LIMIT, "the instances and allocations", || async {
            let r = get(&d.url("/metrics"), None).await;
            let all = parse_samples(&r.body);
            (find(&all, "gpuwatch_mig_instance_processes", &[]).len() == 2
                && find(&all, "gpuwatch_gpu_allocation_info", &[]).len() == 2)
                .then_some((r.body, all))
        })
        .await;
        let infos = find(&all, "gpuwatch_mig_instance_info", &[]);
        let mut profiles: Vec<&str> = infos.iter().map(|s| s.labels["profile"].as_str()).collect();
        profiles.sort_unstable();
        assert_eq!(profiles, ["2g.20gb", "3g.40gb"]);
        let triton_mig = &find(
            &all,
            "gpuwatch_mig_instance_info",
            &[("profile", "3g.40gb")],
        )[0]
        .labels["mig_uuid"];
        assert_eq!(
            value(
                &all,
                "gpuwatch_mig_instance_memory_used_bytes",
                &[("mig_uuid", triton_mig)]
            ),
            (9000u64 << 20) as f64,
            "the declared process's memory"
        );
        assert_eq!(
            value(
                &all,
                "gpuwatch_gpu_allocated_idle",
                &[
                    ("namespace", "research"),
                    ("pod", "notebook-1"),
                    ("container", "jupyter")
                ]
            ),
            1.0
        );
        assert_eq!(
            value(&all, "gpuwatch_gpu_allocated_idle", &[("pod", "triton-0")]),
            0.0
        );
        assert_eq!(
            find(&all, "gpuwatch_gpu_allocation_info", &[("pod", "triton-0")])[0].labels["device"],
            *triton_mig
        );
        assert_eq!(
            value(&all, "gpuwatch_gpu_mig_enabled", &[("gpu", "0")]),
            1.0
        );
        for secret in ["s3cr3t", "svc-infer", "tritonserver", "7100"] {
            assert!(!text.contains(secret), "{secret} leaked into /metrics");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_dashboard_snapshot_of_the_same_hub() {
    bounded(async {
        let d = Daemon::start(Some(TWO_H100));
        let all = scrape_when_ready(&d, 2).await;
        let snap: serde_json::Value =
            serde_json::from_str(&get(&d.url("/api/v1/dashboard"), None).await.body)
                .expect("dashboard JSON");
        for gpu in snap["gpus"].as_array().expect("gpus") {
            let index = gpu["index"].to_string();
            let labels = [("gpu", index.as_str())];
            let uuid = gpu["uuid"].as_str().expect("uuid");
            let series = find(&all, "gpuwatch_power_limit_default_watts", &labels);
            assert_eq!(series[0].labels["uuid"], uuid);
            assert_eq!(
                Some(series[0].value),
                gpu["power_default_w"].as_f64(),
                "default limit"
            );
            assert_eq!(
                Some(value(&all, "gpuwatch_governor_threshold_celsius", &labels)),
                gpu["policy"]["threshold_c"].as_f64(),
                "threshold"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_a_laptop_or_consumer_card_lacks_have_no_series() {
    bounded(async {
        let d = Daemon::start(Some(
            r#"
[simulator]
[[simulator.gpus]]
preset = "laptop"
[[simulator.gpus]]
preset = "rtx-4090"
"#,
        ));
        let all = scrape_when_ready(&d, 2).await;
        let laptop = [("gpu", "0")];
        let consumer = [("gpu", "1")];
        assert_eq!(
            find(&all, "gpuwatch_temperature_celsius", &laptop)[0].labels["model_name"],
            "NVIDIA GeForce RTX 4070 Laptop GPU"
        );
        for name in [
            "gpuwatch_power_limit_watts",
            "gpuwatch_enforced_power_limit_watts",
            "gpuwatch_fan_speed_ratio",
            "gpuwatch_energy_joules_total",
            "gpuwatch_pcie_throughput_bytes_per_second",
            "gpuwatch_power_limit_default_watts",
        ] {
            assert!(find(&all, name, &laptop).is_empty(), "laptop has {name}");
            assert!(
                !find(&all, name, &consumer).is_empty(),
                "RTX 4090 lacks {name}"
            );
        }
        for name in [
            "gpuwatch_memory_temperature_celsius",
            "gpuwatch_ecc_errors_volatile_total",
        ] {
            assert!(find(&all, name, &[]).is_empty(), "neither board has {name}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_gets_openmetrics_and_curl_gets_the_classic_format() {
    bounded(async {
        let d = Daemon::start(Some(TWO_H100));
        scrape_when_ready(&d, 2).await;
        let om = get(
            &d.url("/metrics"),
            Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
        )
        .await;
        assert_eq!(om.status, 200);
        assert!(om.header("content-type").starts_with("application/openmetrics-text"));
        assert!(om.body.ends_with("# EOF\n"));
        assert!(om.body.contains("# TYPE gpuwatch_events counter\n"));
        let classic = get(&d.url("/metrics"), None).await;
        assert!(classic.header("content-type").starts_with("text/plain; version=0.0.4"));
        assert!(classic.body.contains("# TYPE gpuwatch_events_total counter\n"));
        assert!(!classic.body.contains("# EOF"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_gpu_is_reported_lost_and_its_readings_disappear() {
    bounded(async {
        let d = Daemon::start(Some(
            r#"
[simulator]
[[simulator.gpus]]
preset = "h100-sxm"
lost_at = "2s"
[[simulator.gpus]]
preset = "a100-sxm"
"#,
        ));
        let all = eventually(LIMIT, "GPU 0 to be reported lost", || async {
            let all = parse_samples(&get(&d.url("/metrics"), None).await.body);
            let lost = find(
                &all,
                "gpuwatch_gpu_health",
                &[("gpu", "0"), ("state", "lost")],
            );
            // The GPU_LOST event is counted once the writer has committed
            // it, which may be a moment after the frame that shows the loss.
            let counted = find(&all, "gpuwatch_events_total", &[("kind", "gpu_lost")])
                .first()
                .is_some_and(|s| s.value >= 1.0);
            (lost.first().map(|s| s.value) == Some(1.0) && counted).then_some(all)
        })
        .await;
        assert!(find(&all, "gpuwatch_temperature_celsius", &[("gpu", "0")]).is_empty());
        assert_eq!(
            find(&all, "gpuwatch_temperature_celsius", &[("gpu", "1")]).len(),
            1,
            "the other GPU keeps reporting"
        );
        assert_eq!(
            find(
                &all,
                "gpuwatch_governor_state",
                &[("gpu", "0"), ("state", "suspended")]
            )[0]
            .value,
            1.0
        );
        assert!(find(&all, "gpuwatch_events_total", &[("kind", "gpu_lost")])[0].value >= 1.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_the_sampler_publishes() {
    bounded(async {
        let d = Daemon::start(Some(TWO_H100));
        let body = eventually(LIMIT, "healthz to answer 200", || async {
            let r = get(&d.url("/healthz"), None).await;
            (r.status == 200).then_some(r.body)
        })
        .await;
        assert!(body.starts_with("ok: frame "), "{body}");
        assert!(body.contains("2 GPU(s)"), "{body}");
        let missing = get(&d.url("/nope"), None).await;
        assert_eq!(missing.status, 404);
        assert!(missing.body.contains("/metrics"), "{}", missing.body);
    })
    .await;
}

// ---- Benchmark (run on demand, in release) ----

/// Median and 99th percentile of `samples`, in microseconds.
fn median_p99(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5).as_secs_f64() * 1e6, at(0.99).as_secs_f64() * 1e6)
}

/// `cargo test --release --test http_metrics -- --ignored --nocapture`
///
/// Scrape cost with 8 simulated H100s: rendering a new frame in-process,
/// and whole HTTP scrapes of the real daemon over loopback, both when every
/// scrape meets a new frame (render + HTTP) and back to back (cached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it on demand with --release"]
async fn scrape_benchmark_8_gpus() {
    // In-process: render only.
    let hub = Arc::new(Hub::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
        16,
    ));
    let (events, _) = EventLog::open(None, 100);
    let all_fields: Vec<TelemetryField> = (1..=19)
        .filter_map(|n| TelemetryField::try_from(n).ok())
        .collect();
    hub.set_devices(
        (0..8)
            .map(|i| device(i, "NVIDIA H100 80GB HBM3", &all_fields))
            .collect(),
    );
    hub.set_policies(
        (0..8)
            .map(|i| GpuPolicy {
                index: i,
                mode: GovernorMode::PowerLimit as i32,
                state: GovernorState::Idle as i32,
                threshold_c: 83,
                hysteresis_c: 3,
                floor_mw: Some(200_000),
                ceiling_mw: Some(700_000),
                current_limit_mw: Some(700_000),
                ..GpuPolicy::default()
            })
            .collect(),
    );
    let endpoint = MetricsEndpoint::new(Sources {
        hub: hub.clone(),
        events: Arc::new(events),
        hostname: Arc::from("bench-host"),
        dashboard_streams: Arc::new(AtomicUsize::new(0)),
        leases: None,
    });
    let mut renders = Vec::new();
    let mut size = 0;
    for seq in 0..2000u64 {
        hub.publish(Frame {
            seq,
            time: Some(SystemTime::now().into()),
            samples: (0..8)
                .map(|i| full_sample(i, seq, 60 + (seq % 20) as u32))
                .collect(),
        });
        let started = Instant::now();
        let body = endpoint.body(Format::OpenMetrics).expect("renders");
        renders.push(started.elapsed());
        size = body.len();
    }
    let (median, p99) = median_p99(renders);
    println!(
        "render of a new frame, 8 GPUs, {size} bytes: median {median:.0} us, p99 {p99:.0} us (2000 frames)"
    );

    // The real daemon over loopback.
    let d = Daemon::start(Some(
        r#"
[simulator]
[[simulator.gpus]]
preset = "h100-sxm"
count = 8
demand = [ { at = "0s", watts = 500.0 } ]
"#,
    ));
    scrape_when_ready(&d, 8).await;
    let client = crate::http_support::client();
    let url = d.url("/metrics");
    let accept = Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5");
    let mut fresh = Vec::new();
    for _ in 0..150 {
        // Past one sampler tick, so this scrape meets a frame not yet rendered.
        tokio::time::sleep(Duration::from_millis(110)).await;
        let started = Instant::now();
        let r = crate::http_support::get_with(&client, &url, accept).await;
        fresh.push(started.elapsed());
        assert_eq!(r.status, 200);
    }
    let (fresh_median, fresh_p99) = median_p99(fresh);
    println!(
        "HTTP scrape meeting a new frame (render + HTTP): median {fresh_median:.0} us, p99 {fresh_p99:.0} us (150 scrapes)"
    );
    let mut cached = Vec::new();
    let mut last = String::new();
    for _ in 0..2000 {
        let started = Instant::now();
        let r = crate::http_support::get_with(&client, &url, accept).await;
        cached.push(started.elapsed());
        last = r.body;
    }
    let (cached_median, cached_p99) = median_p99(cached);
    println!(
        "HTTP scrape back to back (mostly cached): median {cached_median:.0} us, p99 {cached_p99:.0} us (2000 scrapes)"
    );
    let all = parse_samples(&last);
    assert_eq!(find(&all, "gpuwatch_temperature_celsius", &[]).len(), 8);
}
