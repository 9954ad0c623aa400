//! The NVML backend changing GPUs: power limits and clocks, with NVML's
//! refusals (out of range, no permission, not supported) mapped to the
//! daemon's errors, against the stand-in NVML library.

use crate::nvml_support::{FAST, FakeNvml};
use gpuwatch_server::backend::{Backend, BackendError, GpuDevice};
use serde_json::json;

fn datacenter(load_pct: u32, no_permission_on_write: bool) -> FakeNvml {
    FakeNvml::new(&json!({
        "gpus": [{"model": "datacenter", "load_pct": load_pct,
                  "no_permission_on_write": no_permission_on_write}]
    }))
}

fn open(fake: &FakeNvml) -> Box<dyn GpuDevice> {
    fake.backend().open(0).expect("open GPU 0")
}

#[test]
fn power_limit_round_trips_and_caps_the_draw() {
    let fake = datacenter(100, false);
    let mut gpu = open(&fake);
    let facts = gpu.describe().expect("describe");
    let (min, max) = (
        facts.power_min_mw.expect("min"),
        facts.power_max_mw.expect("max"),
    );
    let before = gpu.read(FAST).expect("read");
    let target = min + (max - min) / 4;
    assert!(
        before.power_draw_mw.expect("draw") > target,
        "the test needs a capped draw"
    );

    gpu.set_power_limit(target).expect("set the limit");
    let after = gpu.read(FAST).expect("read");
    assert_eq!(after.power_limit_mw, Some(target));
    assert_eq!(after.enforced_power_limit_mw, Some(target));
    assert!(after.power_draw_mw.expect("draw") <= target);
    assert!(
        after.temperature_c < before.temperature_c,
        "less power, cooler"
    );

    // A second backend on the same GPU sees the same limit: it lives in
    // the (fake) driver, not in the backend.
    let mut again = open(&fake);
    assert_eq!(again.read(FAST).expect("read").power_limit_mw, Some(target));
}

#[test]
fn power_limit_outside_constraints_is_invalid_argument() {
    let fake = datacenter(50, false);
    let mut gpu = open(&fake);
    let facts = gpu.describe().expect("describe");
    let (min, max) = (
        facts.power_min_mw.expect("min"),
        facts.power_max_mw.expect("max"),
    );
    for bad in [min - 1, max + 1, 0] {
        let err = gpu.set_power_limit(bad).expect_err("out of range");
        assert!(
            matches!(err, BackendError::InvalidArgument(_)),
            "{bad}: {err:?}"
        );
    }
    let r = gpu.read(FAST).expect("read");
    assert_eq!(
        r.power_limit_mw, facts.power_default_mw,
        "refused writes change nothing"
    );
}

#[test]
fn writes_without_permission_report_no_permission() {
    let fake = datacenter(50, true);
    let mut gpu = open(&fake);
    let facts = gpu.describe().expect("describe");
    assert!(
        facts.controls.power_limit_settable,
        "controls are probed without writing, so a refusal is only seen on write"
    );
    let results = [
        gpu.set_power_limit(facts.power_min_mw.expect("min")),
        gpu.lock_gpu_clocks(300, 1000),
        gpu.reset_gpu_locked_clocks(),
        gpu.reset_memory_locked_clocks(),
        gpu.reset_application_clocks(),
    ];
    for result in results {
        let err = result.expect_err("refused");
        assert!(matches!(err, BackendError::NoPermission(_)), "{err:?}");
    }
    assert_eq!(
        gpu.read(FAST).expect("read").power_limit_mw,
        facts.power_default_mw
    );
}

#[test]
fn clock_lock_caps_the_clock_and_resets() {
    let fake = datacenter(100, false);
    let mut gpu = open(&fake);
    let facts = gpu.describe().expect("describe");
    assert!(facts.controls.gpu_clocks_lockable);
    let max = facts.max_graphics_clock_mhz.expect("max clock");
    let cap = max / 2;

    gpu.lock_gpu_clocks(cap / 2, cap).expect("lock");
    let locked = gpu.read(FAST).expect("read");
    assert_eq!(locked.locked_gpu_clock_max_mhz, Some(cap));
    assert!(locked.graphics_clock_mhz.is_some_and(|c| c <= cap));

    gpu.reset_gpu_locked_clocks().expect("reset");
    let free = gpu.read(FAST).expect("read");
    assert_eq!(free.locked_gpu_clock_max_mhz, None);
    assert!(free.graphics_clock_mhz > locked.graphics_clock_mhz);

    let err = gpu
        .lock_gpu_clocks(cap, cap / 2)
        .expect_err("inverted range");
    assert!(matches!(err, BackendError::InvalidArgument(_)), "{err:?}");
    let err = gpu
        .lock_gpu_clocks(0, max + 1)
        .expect_err("above the maximum");
    assert!(matches!(err, BackendError::InvalidArgument(_)), "{err:?}");
    assert_eq!(gpu.read(FAST).expect("read").locked_gpu_clock_max_mhz, None);
}

#[test]
fn memory_and_application_clock_resets_succeed_where_supported() {
    let fake = datacenter(50, false);
    let mut gpu = open(&fake);
    gpu.reset_memory_locked_clocks()
        .expect("memory clock reset");
    gpu.reset_application_clocks()
        .expect("application clock reset");
}

#[test]
fn writes_a_gpu_cannot_do_are_not_supported() {
    let fake = FakeNvml::new(&json!({"gpus": [{"model": "laptop"}, {"model": "consumer"}]}));
    let backend = fake.backend();
    let mut laptop = backend.open(0).expect("open");
    let err = laptop.set_power_limit(80_000).expect_err("laptop");
    assert!(matches!(err, BackendError::NotSupported(_)), "{err:?}");
    let err = laptop.reset_memory_locked_clocks().expect_err("laptop");
    assert!(matches!(err, BackendError::NotSupported(_)), "{err:?}");
    let mut consumer = backend.open(1).expect("open");
    let err = consumer.reset_application_clocks().expect_err("GeForce");
    assert!(matches!(err, BackendError::NotSupported(_)), "{err:?}");
    assert!(
        err.to_string().contains("GPU 1"),
        "errors say which GPU: {err}"
    );
}
