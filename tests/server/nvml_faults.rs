//! The NVML backend when things go wrong: a GPU falling off the bus and
//! coming back, a hung driver call, XID errors, no library, no driver, and
//! the fake's own configuration paths.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::nvml_support::{FAST, FakeNvml, SLOW, collect_events};
use gpuwatch_server::backend::{Backend, BackendError, DeviceEvent, Field, nvml::NvmlBackend};
use serde_json::{Value, json};

/// Long enough for a busy 2-core machine; success usually takes a few ms.
const PATIENCE: Duration = Duration::from_secs(20);

fn two_gpus(gpu0: Value) -> Value {
    json!({"gpus": [gpu0, {"model": "datacenter"}]})
}

#[test]
fn a_lost_gpu_reports_gpu_lost_and_reads_again_when_it_returns() {
    let fake = FakeNvml::new(&two_gpus(json!({"model": "datacenter"})));
    let backend = fake.backend();
    let mut gpu0 = backend.open(0).expect("open");
    let mut gpu1 = backend.open(1).expect("open");
    let facts = gpu0.describe().expect("describe");
    gpu0.read(SLOW).expect("healthy read");
    gpu0.lock_gpu_clocks(300, 900).expect("lock");

    fake.set_config(&two_gpus(json!({"model": "datacenter", "lost": true})));
    for _ in 0..3 {
        let err = gpu0.read(FAST).expect_err("lost");
        assert!(err.is_lost(), "{err:?}");
    }
    assert!(gpu0.describe().is_err_and(|e| e.is_lost()));
    assert!(gpu0.set_power_limit(300_000).is_err_and(|e| e.is_lost()));
    gpu1.read(FAST).expect("the other GPU is unaffected");

    fake.set_config(&two_gpus(json!({"model": "datacenter"})));
    let back = gpu0.read(SLOW).expect("the GPU is back");
    assert!(back.temperature_c.is_some());
    assert_eq!(
        back.locked_gpu_clock_max_mhz, None,
        "a returning GPU has been reset; the old lock is not claimed"
    );
    let again = gpu0.describe().expect("describe after return");
    assert_eq!(again.uuid, facts.uuid);
    assert_eq!(again.fields, facts.fields);
    gpu0.set_power_limit(facts.power_min_mw.expect("min"))
        .expect("writes work again");
}

#[test]
fn a_gpu_lost_before_its_first_read_is_reported_lost() {
    let fake = FakeNvml::new(&two_gpus(json!({"model": "datacenter"})));
    let backend = fake.backend();
    let mut gpu0 = backend.open(0).expect("open");
    fake.set_config(&two_gpus(json!({"model": "datacenter", "lost": true})));
    assert!(gpu0.read(FAST).is_err_and(|e| e.is_lost()));
    fake.set_config(&two_gpus(json!({"model": "datacenter"})));
    assert!(gpu0.read(FAST).expect("back").power_draw_mw.is_some());
}

#[test]
fn a_gpu_answering_unknown_after_falling_off_the_bus_is_lost() {
    let fake = FakeNvml::new(&json!({"gpus": [{}]}));
    let backend = fake.backend();
    let mut gpu = backend.open(0).expect("open");
    gpu.describe().expect("describe");
    fake.set_config(&json!({"gpus": [{"lost": true, "lost_error": "unknown"}]}));
    let err = gpu.read(FAST).expect_err("gone");
    assert!(
        err.is_lost(),
        "Unknown with no handle to be had is a loss: {err:?}"
    );
    fake.set_config(&json!({"gpus": [{}]}));
    assert!(gpu.read(FAST).expect("back").temperature_c.is_some());
}

#[test]
fn a_transient_error_blanks_the_field_but_keeps_the_gpu_and_the_field() {
    let fake = FakeNvml::new(&json!({"gpus": [{}]}));
    let backend = fake.backend();
    let mut gpu = backend.open(0).expect("open");
    fake.set_config(&json!({"gpus": [{"failing": ["fan_speed", "power_usage"]}]}));
    let facts = gpu.describe().expect("describe");
    assert!(
        facts.fields.contains(&Field::FanSpeed),
        "an error is not NotSupported"
    );
    assert!(facts.fields.contains(&Field::PowerDraw));
    let r = gpu
        .read(FAST)
        .expect("a field error does not fail the read");
    assert_eq!(r.fan_speed_pct, None);
    assert_eq!(r.power_draw_mw, None);
    assert!(r.temperature_c.is_some());

    fake.set_config(&json!({"gpus": [{}]}));
    let r = gpu.read(FAST).expect("read");
    assert!(
        r.fan_speed_pct.is_some(),
        "the field is read again once it works"
    );
    assert!(r.power_draw_mw.is_some());
}

#[test]
fn a_hung_gpu_read_is_slow_but_answers() {
    let fake = FakeNvml::new(&two_gpus(json!({"model": "datacenter"})));
    let backend = fake.backend();
    let mut gpu0 = backend.open(0).expect("open");
    gpu0.describe().expect("describe");
    let hang = Duration::from_millis(40);
    fake.set_config(&two_gpus(
        json!({"model": "datacenter", "hang_ms": hang.as_millis() as u64}),
    ));
    let start = Instant::now();
    let r = gpu0.read(FAST).expect("a hung GPU answers in the end");
    assert!(start.elapsed() >= hang, "took {:?}", start.elapsed());
    assert!(r.temperature_c.is_some());
}

#[test]
fn an_xid_reaches_its_own_gpu_only() {
    let fake = FakeNvml::new(&two_gpus(json!({"model": "datacenter"})));
    let backend = fake.backend();
    let mut gpu0 = backend.open(0).expect("open");
    let mut gpu1 = backend.open(1).expect("open");
    assert!(gpu1.describe().expect("describe").controls.xid_events);

    fake.set_config(
        &json!({"gpus": [{"model": "datacenter"}, {"model": "datacenter", "xid": [79, 48]}]}),
    );
    let events = collect_events(gpu1.as_mut(), 2, PATIENCE);
    assert_eq!(events, [DeviceEvent::Xid(79), DeviceEvent::Xid(48)]);
    // Give a misrouted event time to show up, then check none did.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gpu0.drain_events(), []);
    assert_eq!(gpu1.drain_events(), [], "each XID is delivered once");
}

#[test]
fn an_xid_logged_before_the_gpu_was_opened_is_delivered() {
    let fake = FakeNvml::new(&json!({"gpus": [{"model": "consumer", "xid": [31]}]}));
    let backend = fake.backend();
    let mut gpu = backend.open(0).expect("open");
    assert_eq!(
        collect_events(gpu.as_mut(), 1, PATIENCE),
        [DeviceEvent::Xid(31)]
    );
}

#[test]
fn xids_flow_again_after_a_lost_gpu_returns() {
    let fake = FakeNvml::new(&json!({"gpus": [{"xid": [79]}]}));
    let backend = fake.backend();
    let mut gpu = backend.open(0).expect("open");
    assert_eq!(
        collect_events(gpu.as_mut(), 1, PATIENCE),
        [DeviceEvent::Xid(79)]
    );

    fake.set_config(&json!({"gpus": [{"xid": [79], "lost": true}]}));
    assert!(gpu.read(FAST).is_err_and(|e| e.is_lost()));
    fake.set_config(&json!({"gpus": [{"xid": [79]}]}));
    gpu.read(FAST).expect("back");
    fake.set_config(&json!({"gpus": [{"xid": [79, 94]}]}));
    assert_eq!(
        collect_events(gpu.as_mut(), 1, PATIENCE),
        [DeviceEvent::Xid(94)]
    );
}

#[test]
fn a_missing_library_is_unavailable_and_points_to_simulate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("libnvidia-ml.so.1");
    let err = NvmlBackend::new(Some(&missing)).expect_err("no library");
    let BackendError::Unavailable(message) = err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert!(message.contains("--simulate"), "{message}");
    assert!(message.contains("backend.nvml_library"), "{message}");
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
}

#[test]
fn no_driver_is_unavailable_and_points_to_simulate() {
    let fake = FakeNvml::new(&json!({"driver_loaded": false}));
    let err = NvmlBackend::new(Some(fake.library())).expect_err("no driver");
    let BackendError::Unavailable(message) = err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert!(message.contains("driver is not loaded"), "{message}");
    assert!(message.contains("--simulate"), "{message}");

    // Once the driver is there, the same library initialises.
    fake.set_config(&json!({"gpus": [{}]}));
    let backend = NvmlBackend::new(Some(fake.library())).expect("driver loaded");
    assert_eq!(backend.device_count().expect("count"), 1);
}

#[test]
fn separate_copies_of_the_library_are_separate_installations() {
    let one = FakeNvml::new(&json!({"gpus": [{}]}));
    let three = FakeNvml::new(&json!({"gpus": [{"count": 3}]}));
    assert_eq!(one.backend().device_count().expect("count"), 1);
    assert_eq!(three.backend().device_count().expect("count"), 3);
    assert_eq!(one.backend().device_count().expect("count"), 1);
}

/// The parent half of `fakenvml_config_env_var_is_honoured`: runs in a child
/// process so `FAKENVML_CONFIG` can be set for it alone.
#[test]
#[ignore = "run by fakenvml_config_env_var_is_honoured in a child process"]
fn child_reads_config_from_env_var() {
    let Ok(expected) = std::env::var("NVML_TEST_EXPECTED_GPUS") else {
        return; // run by hand with --ignored: nothing to check
    };
    let fake = FakeNvml::without_config();
    let backend = NvmlBackend::new(Some(fake.library())).expect("backend");
    let count = backend.device_count().expect("count");
    assert_eq!(count.to_string(), expected);
}

#[test]
fn fakenvml_config_env_var_is_honoured() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("gpus.json");
    std::fs::write(&config, json!({"gpus": [{"count": 5}]}).to_string()).expect("write");
    let output = run_child("nvml_faults::child_reads_config_from_env_var", &config, "5");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the child test ran"
    );
}

fn run_child(test: &str, config: &Path, expected: &str) -> std::process::Output {
    Command::new(std::env::current_exe().expect("test executable"))
        .args(["--exact", test, "--ignored", "--test-threads=1"])
        .env("FAKENVML_CONFIG", config)
        .env("NVML_TEST_EXPECTED_GPUS", expected)
        .output()
        .expect("run the child test")
}
