//! The `dcgm-exporter` metrics profile and decoded XIDs: dcgm-exporter's
//! names, label names, units and types rendered from a hub the test
//! controls; counters a GPU cannot give absent; XIDs from the simulator and
//! from the stand-in NVML library reaching the event stream decoded and
//! `/metrics` counted by class.
//!
//! `.ci/dashboards.sh` checks the same output with promtool and a real
//! Prometheus running NVIDIA's dashboard queries; these tests pin content.

use std::{
    sync::{Arc, atomic::AtomicUsize},
    time::{Duration, SystemTime},
};

use crate::http_support::{Series, find, parse_samples};
use crate::support::{Options, events_since, eventually, sim_config};
use gpuwatch_server::{
    api::{
        self, Capabilities, DeviceInfo, EventKind, Frame, GpuAllocation, GpuHealth, GpuSample,
        PodRef, XidAction,
    },
    config::MetricsProfile,
    events::{Actor, EventLog, NewEvent},
    http::metrics::{Format, MetricsEndpoint, Sources},
    hub::Hub,
};
use serde_json::json;

fn uuid(index: u32) -> String {
    format!("GPU-{index}bbbbbbb-0000-0000-0000-000000000000")
}

fn device(index: u32, name: &str) -> DeviceInfo {
    DeviceInfo {
        index,
        uuid: uuid(index),
        name: name.to_owned(),
        pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index * 0x10),
        capabilities: Some(Capabilities {
            xid_events: true,
            ..Capabilities::default()
        }),
        ..DeviceInfo::default()
    }
}

/// GPU 0 reports everything and is allocated whole to a pod; GPU 1 has no
/// memory temperature, power limit or PCIe counters; GPU 2 is lost.
fn hub_and_log() -> (Arc<Hub>, Arc<EventLog>) {
    let hub = Arc::new(Hub::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
        16,
    ));
    let (events, _) = EventLog::open(None, 100);
    hub.set_devices(vec![
        device(0, "NVIDIA H100 80GB HBM3"),
        device(1, "NVIDIA GeForce RTX 4090 Laptop GPU"),
        device(2, "NVIDIA A100-SXM4-80GB"),
    ]);
    let full = GpuSample {
        index: 0,
        uuid: uuid(0),
        seq: 5,
        health: GpuHealth::Ok as i32,
        temperature_c: Some(84),
        memory_temperature_c: Some(80),
        power_draw_mw: Some(612_345),
        power_limit_mw: Some(650_000),
        energy_mj: Some(123_456_789),
        sm_clock_mhz: Some(1755),
        memory_clock_mhz: Some(2619),
        utilization_gpu_pct: Some(97),
        utilization_memory_pct: Some(41),
        memory_used_bytes: Some(40 << 30),
        memory_total_bytes: Some(80 << 30),
        pcie_tx_kbps: Some(1000),
        pcie_rx_kbps: Some(2000),
        allocations: vec![GpuAllocation {
            pod: Some(PodRef {
                namespace: "ml".into(),
                pod: "trainer-0".into(),
                container: "main".into(),
            }),
            resource_name: "nvidia.com/gpu".into(),
            device_ids: vec![uuid(0)],
            idle: false,
        }],
        ..GpuSample::default()
    };
    let partial = GpuSample {
        index: 1,
        uuid: uuid(1),
        seq: 5,
        health: GpuHealth::Ok as i32,
        temperature_c: Some(61),
        power_draw_mw: Some(80_000),
        sm_clock_mhz: Some(2100),
        memory_used_bytes: Some(1 << 30),
        memory_total_bytes: Some(8 << 30),
        utilization_gpu_pct: Some(12),
        ..GpuSample::default()
    };
    let lost = GpuSample {
        index: 2,
        uuid: uuid(2),
        seq: 5,
        health: GpuHealth::Lost as i32,
        ..GpuSample::default()
    };
    hub.publish(Frame {
        seq: 5,
        time: Some(SystemTime::now().into()),
        samples: vec![full, partial, lost],
    });
    (hub, Arc::new(events))
}

fn endpoint(hub: &Arc<Hub>, events: &Arc<EventLog>, profile: MetricsProfile) -> MetricsEndpoint {
    MetricsEndpoint::with_profile(
        Sources {
            hub: hub.clone(),
            events: events.clone(),
            hostname: Arc::from("node-7"),
            dashboard_streams: Arc::new(AtomicUsize::new(0)),
            leases: None,
        },
        profile,
        Some("550.54.15".into()),
    )
}

fn body(e: &MetricsEndpoint) -> String {
    let bytes = e.body(e.format_for(Format::OpenMetrics)).expect("renders");
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

fn one(all: &[Series], name: &str, gpu: &str) -> f64 {
    let found = find(all, name, &[("gpu", gpu)]);
    assert_eq!(found.len(), 1, "{name} gpu {gpu}: {found:?}");
    found[0].value
}

#[test]
fn dcgm_profile_serves_dcgm_exporters_names_labels_units_and_types() {
    let (hub, events) = hub_and_log();
    let e = endpoint(&hub, &events, MetricsProfile::DcgmExporter);
    assert_eq!(
        e.format_for(Format::OpenMetrics),
        Format::Prometheus,
        "dcgm-exporter's counters have no _total, so the classic format is served"
    );
    let text = body(&e);
    let all = parse_samples(&text);

    // Units as dcgm-exporter's: °C, W, mJ, MHz, %, MiB.
    assert_eq!(one(&all, "DCGM_FI_DEV_GPU_TEMP", "0"), 84.0);
    assert_eq!(one(&all, "DCGM_FI_DEV_MEMORY_TEMP", "0"), 80.0);
    assert_eq!(one(&all, "DCGM_FI_DEV_POWER_USAGE", "0"), 612.345);
    assert_eq!(one(&all, "DCGM_FI_DEV_POWER_MGMT_LIMIT", "0"), 650.0);
    assert_eq!(
        one(&all, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "0"),
        123_456_789.0
    );
    assert_eq!(one(&all, "DCGM_FI_DEV_SM_CLOCK", "0"), 1755.0);
    assert_eq!(one(&all, "DCGM_FI_DEV_MEM_CLOCK", "0"), 2619.0);
    assert_eq!(one(&all, "DCGM_FI_DEV_GPU_UTIL", "0"), 97.0);
    assert_eq!(one(&all, "DCGM_FI_DEV_MEM_COPY_UTIL", "0"), 41.0);
    assert_eq!(one(&all, "DCGM_FI_DEV_FB_USED", "0"), 40.0 * 1024.0);
    assert_eq!(one(&all, "DCGM_FI_DEV_FB_FREE", "0"), 40.0 * 1024.0);
    assert_eq!(
        one(&all, "DCGM_FI_PROF_PCIE_TX_BYTES", "0"),
        1000.0 * 1024.0
    );
    assert_eq!(one(&all, "DCGM_FI_DEV_XID_ERRORS", "0"), 0.0, "no XID yet");

    // Types as dcgm-exporter declares them.
    assert!(text.contains("# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"));
    assert!(text.contains("# TYPE DCGM_FI_DEV_GPU_TEMP gauge\n"));
    assert!(text.contains("# TYPE DCGM_FI_DEV_FB_USED gauge\n"));
    assert!(
        !text.contains("_total"),
        "no _total suffix anywhere:\n{text}"
    );
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"));

    // Label names as dcgm-exporter spells them, pod labels on the pod's GPU.
    let temp0 = &find(&all, "DCGM_FI_DEV_GPU_TEMP", &[("gpu", "0")])[0].labels;
    let expected: Vec<(&str, String)> = vec![
        ("Hostname", "node-7".into()),
        ("UUID", uuid(0)),
        ("DCGM_FI_DRIVER_VERSION", "550.54.15".into()),
        ("container", "main".into()),
        ("device", "nvidia0".into()),
        ("gpu", "0".into()),
        ("modelName", "NVIDIA H100 80GB HBM3".into()),
        ("namespace", "ml".into()),
        ("pci_bus_id", "00000000:18:00.0".into()),
        ("pod", "trainer-0".into()),
    ];
    let mut expected: Vec<(String, String)> = expected
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    expected.sort();
    let got: Vec<(String, String)> = temp0.clone().into_iter().collect();
    assert_eq!(got, expected);
    let temp1 = &find(&all, "DCGM_FI_DEV_GPU_TEMP", &[("gpu", "1")])[0].labels;
    assert!(
        !temp1.contains_key("pod"),
        "no pod labels on an unallocated GPU"
    );

    // What GPU 1 cannot read is absent, never 0 or a sentinel.
    assert_eq!(one(&all, "DCGM_FI_DEV_GPU_TEMP", "1"), 61.0);
    for absent in [
        "DCGM_FI_DEV_MEMORY_TEMP",
        "DCGM_FI_DEV_POWER_MGMT_LIMIT",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "DCGM_FI_PROF_PCIE_TX_BYTES",
    ] {
        assert!(
            find(&all, absent, &[("gpu", "1")]).is_empty(),
            "{absent} for GPU 1"
        );
    }
    // The lost GPU has no series at all; counters nobody reads never appear.
    assert!(
        all.iter()
            .all(|s| s.labels.get("gpu").map(String::as_str) != Some("2"))
    );
    for never in [
        "DCGM_FI_DEV_ENC_UTIL",
        "DCGM_FI_DEV_DEC_UTIL",
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
    ] {
        assert!(!text.contains(never), "{never}");
    }
    assert!(!text.contains("9223372036854775794"));
    assert!(
        all.iter().all(|s| s.name.starts_with("DCGM_FI_")),
        "nothing but dcgm-exporter's families"
    );
}

#[test]
fn native_stays_the_default_and_both_serves_both_sets_in_the_classic_format() {
    let (hub, events) = hub_and_log();
    let native = MetricsEndpoint::new(Sources {
        hub: hub.clone(),
        events: events.clone(),
        hostname: Arc::from("node-7"),
        dashboard_streams: Arc::new(AtomicUsize::new(0)),
        leases: None,
    });
    assert_eq!(native.format_for(Format::OpenMetrics), Format::OpenMetrics);
    let text = body(&native);
    assert!(text.contains("gpuwatch_temperature_celsius{"));
    assert!(!text.contains("DCGM_FI_"));

    let both = endpoint(&hub, &events, MetricsProfile::Both);
    let text = body(&both);
    let all = parse_samples(&text);
    assert_eq!(one(&all, "gpuwatch_temperature_celsius", "0"), 84.0);
    assert_eq!(one(&all, "DCGM_FI_DEV_GPU_TEMP", "0"), 84.0);
    assert!(
        text.contains("# TYPE gpuwatch_energy_joules_total counter\n"),
        "native counters in the classic spelling"
    );
    assert!(!text.contains("# EOF"));
}

#[test]
fn xids_are_decoded_counted_by_class_and_dcgm_shows_the_last() {
    let (hub, events) = hub_and_log();
    for code in [79, 48, 48] {
        let recorded = events.record(
            NewEvent::new(EventKind::XidError, Actor::device(), "xid")
                .gpu(0, &uuid(0))
                .xid(code),
        );
        let info = recorded.event().xid_info.as_ref().expect("decoded");
        assert!(!info.meaning.is_empty() && !info.action_text.is_empty());
    }
    let unknown = events.record(
        NewEvent::new(EventKind::XidError, Actor::device(), "xid")
            .gpu(1, &uuid(1))
            .xid(4242),
    );
    assert_eq!(
        unknown.event().xid_info.as_ref().map(|i| i.action),
        Some(XidAction::Unknown as i32)
    );
    let other = events.record(NewEvent::new(
        EventKind::DaemonStarted,
        Actor::daemon(),
        "not an xid",
    ));
    assert!(other.event().xid_info.is_none());

    let native = endpoint(&hub, &events, MetricsProfile::Native);
    let all = parse_samples(&body(&native));
    let count = |xid: &str, action: &str, severity: &str| {
        let found = find(
            &all,
            "gpuwatch_xid_errors_total",
            &[("xid", xid), ("action", action), ("severity", severity)],
        );
        assert_eq!(found.len(), 1, "xid {xid}: {found:?}");
        found[0].value
    };
    assert_eq!(count("48", "reset_gpu", "error"), 2.0);
    assert_eq!(count("79", "reboot_node", "error"), 1.0);
    assert_eq!(count("4242", "unknown", "warning"), 1.0);
    let xid79 = find(&all, "gpuwatch_xid_errors_total", &[("xid", "79")]);
    assert_eq!(
        xid79[0].labels.get("uuid").map(String::as_str),
        Some(uuid(0).as_str())
    );

    let dcgm = endpoint(&hub, &events, MetricsProfile::DcgmExporter);
    let all = parse_samples(&body(&dcgm));
    assert_eq!(
        one(&all, "DCGM_FI_DEV_XID_ERRORS", "0"),
        48.0,
        "the last XID"
    );
    assert_eq!(one(&all, "DCGM_FI_DEV_XID_ERRORS", "1"), 4242.0);
}

/// A simulated daemon: XIDs injected by the simulator arrive decoded on the
/// event stream, and the dcgm-exporter profile chosen by the flag shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_xids_arrive_decoded_and_the_flag_picks_the_dcgm_profile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(
        dir.path(),
        Options {
            config: Some(sim_config(
                10.0,
                "",
                &[
                    "preset = \"h100-sxm\"\nxid = [ { at = \"1s\", code = 79 }, { at = \"2s\", code = 13 } ]",
                    "preset = \"a100-sxm\"",
                ],
            )),
            args: vec!["--metrics-profile".into(), "dcgm-exporter".into()],
            http: true,
            ..Options::default()
        },
    );
    let mut c = d.client().await;
    let xids = eventually(Duration::from_secs(20), "two XID events", || {
        let mut c = c.clone();
        async move {
            let xids: Vec<api::Event> = events_since(&mut c, 0)
                .await
                .into_iter()
                .filter(|e| e.kind == EventKind::XidError as i32)
                .collect();
            (xids.len() == 2).then_some(xids)
        }
    })
    .await;
    let fell = &xids[0];
    assert_eq!(fell.xid, Some(79));
    let info = fell.xid_info.as_ref().expect("xid_info");
    assert!(info.meaning.contains("fallen off the bus"), "{info:?}");
    assert_eq!(info.action, XidAction::RebootNode as i32);
    assert_eq!(fell.severity, api::Severity::Error as i32);
    assert!(
        fell.reason.contains("fallen off the bus"),
        "{}",
        fell.reason
    );
    assert_eq!(
        xids[1].xid_info.as_ref().map(|i| i.action),
        Some(XidAction::RestartApp as i32)
    );
    assert_eq!(xids[1].severity, api::Severity::Warning as i32);
    let _ = &mut c;

    let url = d.http_url("/metrics");
    let text = eventually(Duration::from_secs(10), "the last XID in /metrics", || {
        let url = url.clone();
        async move {
            let text = crate::http_support::get_bearer(&url, gpuwatch_testkit::READ_TOKEN)
                .await
                .body;
            text.contains("DCGM_FI_DEV_XID_ERRORS{gpu=\"0\"")
                .then_some(text)
        }
    })
    .await;
    let all = parse_samples(&text);
    assert_eq!(one(&all, "DCGM_FI_DEV_XID_ERRORS", "0"), 13.0);
    assert_eq!(one(&all, "DCGM_FI_DEV_XID_ERRORS", "1"), 0.0);
    // The profiling counters: the H100 (Hopper, GPM) has them, as ratios;
    // the A100 does not.
    let tensor = one(&all, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "0");
    let engine = one(&all, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "0");
    assert!(
        (0.0..=1.0).contains(&tensor) && tensor <= engine,
        "{tensor} {engine}"
    );
    assert!((0.0..=1.0).contains(&one(&all, "DCGM_FI_PROF_DRAM_ACTIVE", "0")));
    for name in [
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "DCGM_FI_PROF_DRAM_ACTIVE",
    ] {
        assert!(
            find(&all, name, &[("gpu", "1")]).is_empty(),
            "{name} on the A100"
        );
    }
    assert!(
        !text.contains("gpuwatch_"),
        "the dcgm-exporter profile only"
    );
}

/// The stand-in NVML library: an XID it logs reaches the daemon's events
/// decoded and the native counter by class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvml_xids_are_counted_by_class_in_metrics() {
    let fake = crate::nvml_support::FakeNvml::new(&json!({
        "gpus": [ { "model": "datacenter", "xid": [48, 94], "gpm": true }, { "model": "datacenter" } ]
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(
        dir.path(),
        Options {
            nvml_library: Some(fake.library().to_path_buf()),
            http: true,
            ..Options::default()
        },
    );
    let url = d.http_url("/metrics");
    let all = eventually(Duration::from_secs(20), "both XIDs counted", || {
        let url = url.clone();
        async move {
            let all = parse_samples(
                &crate::http_support::get_bearer(&url, gpuwatch_testkit::READ_TOKEN)
                    .await
                    .body,
            );
            (find(&all, "gpuwatch_xid_errors_total", &[]).len() == 2).then_some(all)
        }
    })
    .await;
    let dbe = find(
        &all,
        "gpuwatch_xid_errors_total",
        &[("gpu", "0"), ("xid", "48")],
    );
    assert_eq!(dbe.len(), 1, "{dbe:?}");
    assert_eq!(dbe[0].value, 1.0);
    assert_eq!(
        dbe[0].labels.get("action").map(String::as_str),
        Some("reset_gpu")
    );
    let contained = find(&all, "gpuwatch_xid_errors_total", &[("xid", "94")]);
    assert_eq!(
        contained[0].labels.get("action").map(String::as_str),
        Some("restart_app")
    );
    // GPM on GPU 0 only: the stand-in's tensor pipes run at half the
    // graphics engine's busy time, which is its utilisation.
    let all = eventually(Duration::from_secs(10), "GPM counters", || {
        let url = url.clone();
        async move {
            let all = parse_samples(
                &crate::http_support::get_bearer(&url, gpuwatch_testkit::READ_TOKEN)
                    .await
                    .body,
            );
            (!find(&all, "gpuwatch_tensor_active_ratio", &[]).is_empty()).then_some(all)
        }
    })
    .await;
    let util = one(&all, "gpuwatch_gpu_utilization_ratio", "0");
    assert!(util > 0.0);
    assert_eq!(
        one(&all, "gpuwatch_graphics_engine_active_ratio", "0"),
        util
    );
    assert_eq!(one(&all, "gpuwatch_tensor_active_ratio", "0"), util / 2.0);
    assert!(find(&all, "gpuwatch_tensor_active_ratio", &[("gpu", "1")]).is_empty());
    let mut c = d.client().await;
    let events = events_since(&mut c, 0).await;
    let decoded = events
        .iter()
        .filter(|e| e.kind == EventKind::XidError as i32)
        .filter_map(|e| e.xid_info.as_ref())
        .count();
    assert_eq!(decoded, 2, "every XID event is decoded");
}
