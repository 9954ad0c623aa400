//! The telemetry contract, checked against the real daemon over loopback:
//! devices and capabilities, snapshots, Watch streams (first message, stride,
//! sequence numbers, resume, gaps, bad intervals), event replay across a
//! restart, health and reflection, and the daemon's startup errors.

use std::{collections::BTreeSet, process::Command, time::Duration};

use crate::support::{Options, index, sim_config};
use gpuwatch_api::{
    self as api, GapReason, GpuHealth, TelemetryField, WatchRequest, watch_response::Message,
};
use tonic::Code;

fn mixed_fleet() -> String {
    sim_config(
        1.0,
        "",
        &[
            "preset = \"h100-sxm\"\ndemand = [ { at = \"0s\", watts = 500 } ]",
            "preset = \"rtx-4090\"",
            "preset = \"laptop\"",
        ],
    )
}

#[tokio::test]
async fn list_devices_reports_identity_limits_and_capabilities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(mixed_fleet()));
    let mut c = d.client().await;
    let list = c
        .list_devices(api::ListDevicesRequest::default())
        .await
        .expect("list")
        .into_inner();
    let host = list.host.expect("host");
    assert_eq!(host.backend, "simulator");
    assert_eq!(host.sampler_interval_ms, 100);
    assert_eq!(list.devices.len(), 3);
    let uuids: BTreeSet<_> = list.devices.iter().map(|d| d.uuid.clone()).collect();
    assert_eq!(uuids.len(), 3, "UUIDs are distinct");
    for dev in &list.devices {
        assert!(dev.uuid.starts_with("GPU-") && !dev.name.is_empty() && !dev.pci_bus_id.is_empty());
        assert!(dev.slowdown_temperature_c < dev.shutdown_temperature_c);
        assert!(dev.policy.is_some(), "policy is reported");
    }
    let h100 = &list.devices[0];
    let limits = h100.power_limits.expect("limits");
    assert!(limits.min_mw < limits.max_mw && limits.default_mw.is_some());
    let caps = h100.capabilities.clone().expect("caps");
    assert!(caps.power_limit_settable);
    assert!(
        caps.supported_fields
            .contains(&(TelemetryField::EccErrors as i32))
    );
    let consumer = list.devices[1].capabilities.clone().expect("caps");
    assert!(
        !consumer
            .supported_fields
            .contains(&(TelemetryField::MemoryTemperature as i32))
    );
    assert!(
        consumer
            .supported_fields
            .contains(&(TelemetryField::FanSpeed as i32))
    );
    let laptop = list.devices[2].capabilities.clone().expect("caps");
    assert!(!laptop.power_limit_settable && laptop.gpu_clocks_lockable);
    // The meaning of every throttle reason travels with the list.
    assert!(
        list.throttle_reasons
            .iter()
            .any(|r| r.name == "hw_thermal_slowdown" && r.hardware)
    );
}

#[tokio::test]
async fn snapshot_has_every_gpu_and_unsupported_fields_are_absent_not_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(mixed_fleet()));
    let mut c = d.client().await;
    let snap = crate::support::eventually(Duration::from_secs(10), "first snapshot", || {
        let mut c = c.clone();
        async move {
            c.get_snapshot(api::GetSnapshotRequest::default())
                .await
                .ok()
        }
    })
    .await
    .into_inner();
    assert_eq!(snap.samples.len(), 3);
    for s in &snap.samples {
        assert_eq!(s.health(), GpuHealth::Ok);
        assert!(s.time.is_some() && s.seq > 0 && s.temperature_c.is_some());
    }
    let (h100, consumer, laptop) = (&snap.samples[0], &snap.samples[1], &snap.samples[2]);
    assert!(h100.memory_temperature_c.is_some() && h100.fan_speed_pct.is_none());
    assert!(consumer.memory_temperature_c.is_none() && consumer.fan_speed_pct.is_some());
    assert!(consumer.ecc.is_none());
    assert!(
        laptop.power_limit_mw.is_none()
            && laptop.energy_mj.is_none()
            && laptop.pcie_tx_kbps.is_none()
    );
    // Selecting by UUID returns just that GPU.
    let one = c
        .get_snapshot(api::GetSnapshotRequest {
            gpus: vec![api::GpuSelector {
                selector: Some(api::gpu_selector::Selector::Uuid(
                    consumer.uuid.to_lowercase(),
                )),
            }],
        })
        .await
        .expect("by uuid")
        .into_inner();
    assert_eq!(one.samples.len(), 1);
    assert_eq!(one.samples[0].index, 1);
    let err = c
        .get_snapshot(api::GetSnapshotRequest {
            gpus: vec![index(7)],
        })
        .await
        .expect_err("unknown GPU");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("0, 1, 2"), "{}", err.message());
}

#[tokio::test]
async fn watch_starts_with_full_state_then_frames_at_the_requested_stride() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(mixed_fleet()));
    let mut c = d.client().await;
    let mut stream = crate::support::watch(
        &mut c,
        WatchRequest {
            interval_ms: 300,
            ..Default::default()
        },
    )
    .await;
    let Message::Start(start) = crate::support::next_message(&mut stream).await else {
        panic!("first message must be start");
    };
    assert_eq!(
        (start.stride, start.interval_ms, start.sampler_interval_ms),
        (3, 300, 100)
    );
    assert_eq!(start.devices.len(), 3);
    let current = start.current.expect("full current state");
    assert_eq!(current.samples.len(), 3);
    let mut last = current.seq;
    for _ in 0..8 {
        match crate::support::next_message(&mut stream).await {
            Message::Frame(f) => {
                assert_eq!(f.seq, last + 3, "frames advance by the stride");
                assert_eq!(f.samples.len(), 3);
                assert!(f.samples.iter().all(|s| s.seq == f.seq));
                last = f.seq;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn watch_of_one_gpu_and_interval_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(mixed_fleet()));
    let mut c = d.client().await;
    let mut stream = crate::support::watch(
        &mut c,
        WatchRequest {
            gpus: vec![index(2)],
            ..Default::default()
        },
    )
    .await;
    let Message::Start(start) = crate::support::next_message(&mut stream).await else {
        panic!("start first");
    };
    assert_eq!(start.devices.len(), 1);
    let Message::Frame(f) = crate::support::next_message(&mut stream).await else {
        panic!("frame");
    };
    assert_eq!(f.samples.iter().map(|s| s.index).collect::<Vec<_>>(), [2]);

    let err = c
        .watch(WatchRequest {
            interval_ms: 50,
            ..Default::default()
        })
        .await
        .expect_err("too fast");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("minimum is 100 ms"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn resume_replays_history_and_reports_what_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!("{}\n[sampler]\nhistory = 20\n", mixed_fleet());
    let d = crate::support::start(dir.path(), Options::with_config(toml));
    let mut c = d.client().await;
    let mut stream = crate::support::watch(&mut c, WatchRequest::default()).await;
    let Message::Start(start) = crate::support::next_message(&mut stream).await else {
        panic!("start");
    };
    let seen = start.current.expect("current").seq;
    drop(stream);
    // Let more than the history's worth of frames go by.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let mut stream = c
        .watch(WatchRequest {
            resume_after_seq: Some(seen),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    let Message::Start(start) = crate::support::next_message(&mut stream).await else {
        panic!("start");
    };
    assert!(start.current.is_none(), "a resume carries no current frame");
    // With a history store, what it holds of the missed range comes first
    // (see the history suite); the gap still names every missed frame.
    let mut next = crate::support::next_message(&mut stream).await;
    if let Message::History(_) = next {
        next = crate::support::next_message(&mut stream).await;
    }
    let Message::Gap(gap) = next else {
        panic!("expected a gap for frames no longer in history");
    };
    assert_eq!(gap.reason(), GapReason::NotInHistory);
    assert_eq!(gap.first_seq, seen + 1);
    assert!(!gap.restarted);
    let mut expected = gap.last_seq + 1;
    for _ in 0..25 {
        let Message::Frame(f) = crate::support::next_message(&mut stream).await else {
            panic!("frames after the gap");
        };
        assert_eq!(f.seq, expected, "replay then live, without holes");
        expected += 1;
    }

    // A resume within history: no gap, next frame is exactly seen + 1.
    let mut stream = c
        .watch(WatchRequest {
            resume_after_seq: Some(expected - 5),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    let _ = crate::support::next_message(&mut stream).await;
    let Message::Frame(f) = crate::support::next_message(&mut stream).await else {
        panic!("replayed frame");
    };
    assert_eq!(f.seq, expected - 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_replay_across_a_restart_with_rising_sequence_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut d = crate::support::start(&state, Options::with_config(mixed_fleet()));
    let mut c = d.client().await;
    c.set_threshold(api::SetThresholdRequest {
        gpus: vec![index(0)],
        target: Some(api::set_threshold_request::Target::Celsius(70)),
        hysteresis_c: None,
    })
    .await
    .expect("threshold");
    let before = crate::support::events_since(&mut c, 0).await;
    assert!(
        before
            .iter()
            .any(|e| e.kind() == api::EventKind::ThresholdChanged)
    );
    assert_eq!(d.signal_and_wait("TERM", Duration::from_secs(15)), Some(0));

    let d = crate::support::start(&state, Options::with_config(mixed_fleet()));
    let mut c = d.client().await;
    let after = crate::support::events_since(&mut c, 0).await;
    assert!(after.len() > before.len());
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a, b, "events read back exactly");
    }
    assert!(
        after.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "no holes in event numbering"
    );
    // The operator's threshold survived the restart.
    let policy = c
        .get_policy(api::GetPolicyRequest {
            gpus: vec![index(0)],
        })
        .await
        .expect("policy")
        .into_inner();
    assert_eq!(policy.policies[0].threshold_c, 70);
    assert_eq!(
        policy.policies[0].threshold_source(),
        api::ThresholdSource::Operator
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::default());
    let channel = tonic::transport::Channel::from_shared(d.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "gpuwatch.v1.GpuWatch".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.message().await.expect("response").expect("one");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("list services response");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"gpuwatch.v1.GpuWatch"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_and_exits_promptly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = crate::support::start(dir.path(), Options::default());
    let mut c = d.client().await;
    let mut stream = crate::support::watch(&mut c, WatchRequest::default()).await;
    let mut events = c
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("events")
        .into_inner();
    let _ = crate::support::next_message(&mut stream).await;
    let started = std::time::Instant::now();
    assert_eq!(d.signal_and_wait("TERM", Duration::from_secs(10)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // Both streams end (OK or a transport error), neither hangs.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = stream.message().await {}
        while let Ok(Some(_)) = events.message().await {}
    })
    .await;
    assert!(end.is_ok(), "streams did not end");
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[sampler]\ninterval = \"soon\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_gpuwatch-server"))
        .arg("--simulate")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sampler.interval"), "{stderr}");

    std::fs::write(&path, "[sampler]\nintervall = \"1s\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_gpuwatch-server"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("intervall") && stderr.contains("expected one of"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_gpuwatch-server"))
        .arg("--simulate")
        .env("GPUWATCH_SAMPLER__HISTORY", "-3")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn missing_nvml_is_a_clear_error_that_points_to_the_simulator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_gpuwatch-server"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--http-listen")
        .arg("off")
        .arg("--state-dir")
        .arg(dir.path())
        .env(
            "GPUWATCH_BACKEND__NVML_LIBRARY",
            "/nonexistent/libnvidia-ml.so.1",
        )
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--simulate"), "{stderr}");
}
