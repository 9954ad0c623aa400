//! The NVML backend reading who is on a GPU, against the stand-in NVML
//! library: compute and graphics processes merged by pid, per-process
//! utilisation where the GPU samples it (absent where it does not), and MIG
//! mode with its instances, their processes, and changes while running.
//! Expected values come from the config each test writes (and the fake's
//! own profile table), not from the output.

use std::{collections::HashMap, fs, thread, time::Duration};

use crate::nvml_support::{FakeNvml, SLOW};
use fakenvml::model::{SAMPLE_PERIOD_US, mig_profile};
use gpuwatch_server::backend::{
    Backend, GpuDevice, MigReading, Process, ProcessKind, Reading, SlowReading,
};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn open(fake: &FakeNvml) -> Box<dyn GpuDevice> {
    let mut gpu = fake.backend().open(0).expect("open GPU");
    gpu.describe().expect("describe");
    gpu
}

fn slow(gpu: &mut dyn GpuDevice) -> (Reading, SlowReading) {
    let mut reading = gpu.read(SLOW).expect("read");
    let slow = reading.slow.take().expect("slow fields were asked for");
    (reading, slow)
}

fn processes(slow: &SlowReading) -> HashMap<u32, Process> {
    slow.processes
        .clone()
        .expect("processes")
        .into_iter()
        .map(|p| (p.pid, p))
        .collect()
}

fn mig(slow: &SlowReading) -> &MigReading {
    slow.mig.as_ref().expect("a datacenter GPU has MIG")
}

/// A datacenter GPU in MIG mode with `instances`.
fn mig_config(instances: Value) -> Value {
    json!({"gpus": [{"model": "datacenter", "mig": {"enabled": true, "instances": instances}}]})
}

#[test]
fn mig_is_absent_without_it_and_off_until_enabled() {
    let fake = FakeNvml::new(&json!({"gpus": [{"model": "consumer"}, {"model": "datacenter"}]}));
    let backend = fake.backend();
    let mut consumer = backend.open(0).expect("open");
    consumer.describe().expect("describe");
    let (_, slow_consumer) = slow(consumer.as_mut());
    assert_eq!(slow_consumer.mig, None, "a GeForce board has no MIG");

    let mut datacenter = backend.open(1).expect("open");
    datacenter.describe().expect("describe");
    let (_, slow_dc) = slow(datacenter.as_mut());
    assert_eq!(
        slow_dc.mig,
        Some(MigReading {
            enabled: false,
            instances: Vec::new()
        }),
        "supported but off"
    );
    assert!(
        processes(&slow_dc).values().all(|p| p.mig_uuid.is_none()),
        "no instance outside MIG mode"
    );

    // Pending "on" is not on.
    let fake = FakeNvml::new(&json!({"gpus": [{"mig": {"enabled": false, "pending": true}}]}));
    let (_, s) = slow(open(&fake).as_mut());
    assert!(!mig(&s).enabled);
}

#[test]
fn instances_are_listed_with_ids_profile_memory_and_uuid() {
    let profiles = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"];
    let fake = FakeNvml::new(&mig_config(json!([
        {"profile": profiles[0], "gpu_instance_id": 4,
         "processes": [{"pid": 100, "used_memory_mib": 1000}, {"pid": 101, "used_memory_mib": 24}]},
        {"profile": profiles[1]},
        {"profile": profiles[2], "processes": [{"pid": 102, "used_memory_mib": null}]},
        {"profile": profiles[3]}
    ])));
    let mut gpu = open(&fake);
    let parent_uuid = gpu.describe().expect("describe").uuid;
    let (_, s) = slow(gpu.as_mut());
    let reading = mig(&s);
    assert!(reading.enabled);
    assert_eq!(reading.instances.len(), profiles.len());

    // Sorted by GPU instance id; the given id kept, the others assigned.
    let ids: Vec<_> = reading
        .instances
        .iter()
        .map(|m| (m.gpu_instance_id, m.compute_instance_id))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    let given = reading
        .instances
        .iter()
        .find(|m| m.gpu_instance_id == 4)
        .expect("the instance given id 4");
    assert_eq!(given.profile, profiles[0]);

    let mut uuids = std::collections::HashSet::new();
    for m in &reading.instances {
        let profile = mig_profile(&m.profile)
            .unwrap_or_else(|| panic!("profile {:?} is one the config named", m.profile));
        assert!(m.uuid.starts_with("MIG-"), "{}", m.uuid);
        assert_ne!(m.uuid, parent_uuid);
        assert!(uuids.insert(m.uuid.clone()), "UUIDs are distinct");
        assert_eq!(m.sm_count, Some(profile.sm_count), "{}", m.profile);
        assert_eq!(m.memory_total_bytes, Some(profile.memory_mib * MIB));
        assert_eq!(m.utilization_gpu_pct, None, "NVML gives none per instance");
    }
    let mut named: Vec<_> = reading
        .instances
        .iter()
        .map(|m| m.profile.as_str())
        .collect();
    let mut wanted = profiles.to_vec();
    named.sort();
    wanted.sort();
    assert_eq!(named, wanted);
    // Memory used: what the config's processes use (a null figure adds 0).
    assert_eq!(given.memory_used_bytes, Some(1024 * MIB));

    // The same instances read again have the same UUIDs.
    let (_, again) = slow(gpu.as_mut());
    assert_eq!(mig(&again).instances, reading.instances);
}

#[test]
fn processes_in_instances_carry_the_instance_uuid() {
    let fake = FakeNvml::new(&mig_config(json!([
        {"profile": "4g.40gb", "gpu_instance_id": 1,
         "processes": [{"pid": 200, "used_memory_mib": 300}, {"pid": 201, "used_memory_mib": 1}]},
        {"profile": "3g.40gb", "gpu_instance_id": 2,
         "processes": [{"pid": 202, "used_memory_mib": 5}]}
    ])));
    let mut gpu = open(&fake);
    let (_, s) = slow(gpu.as_mut());
    let uuid_of = |gi: u32| {
        mig(&s)
            .instances
            .iter()
            .find(|m| m.gpu_instance_id == gi)
            .map(|m| m.uuid.clone())
            .expect("instance")
    };
    let by_pid = processes(&s);
    assert_eq!(by_pid.len(), 3, "each process once: {by_pid:?}");
    for (pid, gi, mib) in [(200, 1, 300), (201, 1, 1), (202, 2, 5)] {
        let p = &by_pid[&pid];
        assert_eq!(p.mig_uuid, Some(uuid_of(gi)), "pid {pid}");
        assert_eq!(p.kind, ProcessKind::Compute);
        assert_eq!(p.used_memory_bytes, Some(mib * MIB));
        assert_eq!(p.utilization, None, "no process utilisation in MIG mode");
    }
}

#[test]
fn graphics_and_compute_processes_merge_by_pid() {
    let fake = FakeNvml::new(&json!({"gpus": [{
        "processes": [{"pid": 1, "used_memory_mib": 10}, {"pid": 2, "used_memory_mib": 20}],
        "graphics_processes": [{"pid": 2, "used_memory_mib": 20}, {"pid": 3, "used_memory_mib": 30}]
    }]}));
    let (_, s) = slow(open(&fake).as_mut());
    let by_pid = processes(&s);
    assert_eq!(by_pid.len(), 3);
    assert_eq!(by_pid[&1].kind, ProcessKind::Compute);
    assert_eq!(by_pid[&2].kind, ProcessKind::ComputeAndGraphics);
    assert_eq!(by_pid[&3].kind, ProcessKind::Graphics);
    assert_eq!(by_pid[&3].used_memory_bytes, Some(30 * MIB));

    // Where the GPU does not list graphics processes, compute ones remain.
    let fake = FakeNvml::new(&json!({"gpus": [{
        "unsupported": ["graphics_processes"],
        "processes": [{"pid": 1, "used_memory_mib": 10}],
        "graphics_processes": [{"pid": 3, "used_memory_mib": 30}]
    }]}));
    let (_, s) = slow(open(&fake).as_mut());
    let by_pid = processes(&s);
    assert_eq!(by_pid.keys().copied().collect::<Vec<_>>(), vec![1]);
}

#[test]
fn process_utilization_is_reported_where_sampled_and_absent_elsewhere() {
    let fake = FakeNvml::new(&json!({"gpus": [{
        "load_pct": 70,
        "processes": [
            {"pid": 10, "used_memory_mib": 1, "sm_pct": 40, "memory_pct": 12},
            {"pid": 11, "used_memory_mib": 1, "sm_pct": 25, "decoder_pct": 7},
            {"pid": 12, "used_memory_mib": 1}
        ],
        "graphics_processes": [{"pid": 13, "used_memory_mib": 1, "encoder_pct": 30}]
    }]}));
    let mut gpu = open(&fake);
    let (reading, s) = slow(gpu.as_mut());
    let by_pid = processes(&s);
    let u = |pid: u32| by_pid[&pid].utilization;
    let ten = u(10).expect("pid 10 is sampled");
    assert_eq!(
        (ten.sm_pct, ten.memory_pct, ten.encoder_pct, ten.decoder_pct),
        (Some(40), Some(12), Some(0), Some(0))
    );
    assert_eq!(u(11).and_then(|x| x.decoder_pct), Some(7));
    assert_eq!(u(13).and_then(|x| x.encoder_pct), Some(30));
    assert_eq!(u(12), None, "no sample is unknown, never 0");
    let sm_sum: u32 = by_pid
        .values()
        .filter_map(|p| p.utilization.and_then(|x| x.sm_pct))
        .sum();
    assert!(
        sm_sum <= reading.utilization_gpu_pct.expect("device utilisation"),
        "processes use {sm_sum} % of a GPU at {:?} %",
        reading.utilization_gpu_pct
    );

    // Later reads ask for new samples only, and still find them once the
    // driver has taken another.
    thread::sleep(Duration::from_micros(2 * SAMPLE_PERIOD_US));
    let (_, s) = slow(gpu.as_mut());
    assert_eq!(
        processes(&s)[&10].utilization.and_then(|x| x.sm_pct),
        Some(40)
    );
}

#[test]
fn unsupported_process_utilization_is_none_and_not_asked_again() {
    let config = |trace: &std::path::Path| {
        json!({"trace_file": trace, "gpus": [{
            "unsupported": ["process_utilization"],
            "processes": [{"pid": 10, "used_memory_mib": 1, "sm_pct": 40}]
        }]})
    };
    let fake = FakeNvml::new(&json!({"gpus": [{}]}));
    let trace = fake.dir().join("calls.log");
    fake.set_config(&config(&trace));
    let mut gpu = open(&fake);
    for _ in 0..3 {
        let (_, s) = slow(gpu.as_mut());
        let p = &processes(&s)[&10];
        assert_eq!(p.utilization, None);
        assert_eq!(p.used_memory_bytes, Some(MIB), "the rest is still read");
    }
    let log = fs::read_to_string(&trace).expect("trace");
    let asked = log
        .lines()
        .filter(|l| l.contains("nvmlDeviceGetProcessUtilization"))
        .count();
    assert_eq!(asked, 1, "probed once, then remembered:\n{log}");
}

#[test]
fn instances_created_and_destroyed_while_open_are_seen_at_the_next_slow_read() {
    let fake = FakeNvml::new(&json!({"gpus": [{"model": "datacenter"}]}));
    let mut gpu = open(&fake);
    let (_, s) = slow(gpu.as_mut());
    assert!(!mig(&s).enabled);
    // A setting made before the change survives it.
    let limit_mw = gpu.describe().expect("describe").power_min_mw.expect("min") + 1000;
    gpu.set_power_limit(limit_mw).expect("set power limit");

    fake.set_config(&mig_config(json!([
        {"profile": "3g.40gb", "gpu_instance_id": 1},
        {"profile": "3g.40gb", "gpu_instance_id": 2,
         "processes": [{"pid": 300, "used_memory_mib": 1}]}
    ])));
    let (reading, s) = slow(gpu.as_mut());
    let on = mig(&s).clone();
    assert!(on.enabled);
    assert_eq!(on.instances.len(), 2);
    assert_eq!(reading.power_limit_mw, Some(limit_mw), "state kept");
    let kept = on.instances[1].clone();
    assert_eq!(processes(&s)[&300].mig_uuid.as_ref(), Some(&kept.uuid));

    // Destroy instance 1: instance 2 keeps its UUID.
    fake.set_config(&mig_config(json!([
        {"profile": "3g.40gb", "gpu_instance_id": 2,
         "processes": [{"pid": 300, "used_memory_mib": 1}]}
    ])));
    let (_, s) = slow(gpu.as_mut());
    assert_eq!(mig(&s).instances, vec![kept]);

    // MIG off again.
    fake.set_config(&json!({"gpus": [{"model": "datacenter", "mig": {"enabled": false}}]}));
    let (reading, s) = slow(gpu.as_mut());
    assert_eq!(mig(&s), &MigReading::default());
    assert_eq!(reading.power_limit_mw, Some(limit_mw));
}

#[test]
fn leaving_mig_mode_brings_process_utilization_back() {
    let fake = FakeNvml::new(&mig_config(json!([
        {"profile": "7g.80gb", "processes": [{"pid": 400, "used_memory_mib": 1, "sm_pct": 30}]}
    ])));
    let mut gpu = open(&fake);
    let (_, s) = slow(gpu.as_mut());
    assert_eq!(processes(&s)[&400].utilization, None, "refused in MIG mode");

    fake.set_config(&json!({"gpus": [{
        "mig": {"enabled": false},
        "processes": [{"pid": 400, "used_memory_mib": 1, "sm_pct": 30}]
    }]}));
    let (_, s) = slow(gpu.as_mut());
    let p = &processes(&s)[&400];
    assert_eq!(p.mig_uuid, None);
    assert_eq!(p.utilization.and_then(|u| u.sm_pct), Some(30));
}

#[test]
fn a_config_that_overfills_the_gpu_is_refused_and_the_last_good_one_kept() {
    let good = mig_config(json!([{"profile": "4g.40gb"}]));
    let fake = FakeNvml::new(&good);
    let mut gpu = open(&fake);
    let (_, s) = slow(gpu.as_mut());
    let before = mig(&s).clone();
    fake.set_config(&mig_config(
        json!([{"profile": "4g.40gb"}, {"profile": "4g.40gb"}]),
    ));
    let (_, s) = slow(gpu.as_mut());
    assert_eq!(
        mig(&s),
        &before,
        "8 compute slices do not fit; nothing changed"
    );
    let backend = fake.backend();
    assert_eq!(backend.device_count().expect("count"), 1);
}

/// The stand-in library itself, through nvml-wrapper's own calls: what the
/// backend relies on MIG device handles and process samples to answer.
#[test]
fn the_fake_answers_mig_device_handles_and_sample_queries_like_nvml() {
    use nvml_wrapper::{Nvml, error::NvmlError};
    let fake = FakeNvml::new(&json!({"gpus": [
        {"mig": {"enabled": true, "instances": [
            {"profile": "2g.20gb", "gpu_instance_id": 3,
             "processes": [{"pid": 500, "used_memory_mib": 64}]}]}},
        {"processes": [{"pid": 600, "used_memory_mib": 1, "sm_pct": 20}]}
    ]}));
    let nvml = Nvml::builder()
        .lib_path(fake.library().as_os_str())
        .init()
        .expect("init");
    let parent = nvml.device_by_index(0).expect("GPU 0");
    let mode = parent.mig_mode().expect("MIG mode");
    assert_eq!((mode.current, mode.pending), (1, 1));
    assert_eq!(parent.mig_device_count().expect("max count"), 7);
    let child = parent.mig_device_by_index(0).expect("MIG device 0");
    assert!(matches!(
        parent.mig_device_by_index(1),
        Err(NvmlError::NotFound)
    ));
    assert!(matches!(
        parent.mig_device_by_index(7),
        Err(NvmlError::InvalidArg)
    ));
    assert!(child.mig_is_mig_device_handle().expect("is MIG"));
    assert!(!parent.mig_is_mig_device_handle().expect("is MIG"));
    let child_uuid = child.uuid().expect("MIG UUID");
    assert_eq!(
        child.mig_parent_device().expect("parent").uuid().ok(),
        parent.uuid().ok()
    );
    let by_uuid = nvml
        .device_by_uuid(child_uuid.as_str())
        .expect("by MIG UUID");
    assert_eq!(by_uuid.uuid().ok(), Some(child_uuid));
    assert!(child.name().expect("name").ends_with(" MIG 2g.20gb"));
    let attributes = child.attributes().expect("attributes");
    let profile = mig_profile("2g.20gb").expect("profile");
    assert_eq!(attributes.multiprocessor_count, profile.sm_count);
    assert_eq!(attributes.gpu_instance_slice_count, profile.compute_slices);
    let listed = child.running_compute_processes().expect("processes");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].gpu_instance_id, listed[0].compute_instance_id),
        (Some(3), Some(0))
    );
    let on_parent = parent.running_compute_processes().expect("processes");
    assert_eq!(on_parent[0].gpu_instance_id, Some(3));
    // What only the whole GPU answers.
    assert!(matches!(
        child.temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        child.utilization_rates(),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        parent.process_utilization_stats(None),
        Err(NvmlError::NotSupported)
    ));

    // Outside MIG mode: ids are "none"; samples follow the size protocol
    // (the wrapper asks for the count with a null buffer) and NOT_FOUND.
    let other = nvml.device_by_index(1).expect("GPU 1");
    assert_eq!(other.mig_mode().expect("MIG mode").current, 0);
    assert_eq!(other.mig_device_count().expect("max count"), 0);
    assert_eq!(
        other.running_compute_processes().expect("processes")[0].gpu_instance_id,
        None
    );
    let samples = other.process_utilization_stats(None).expect("samples");
    assert!(!samples.is_empty() && samples.iter().all(|s| s.pid == 600 && s.sm_util == 20));
    let far_future_us = u64::MAX / 2;
    assert!(matches!(
        other.process_utilization_stats(far_future_us),
        Err(NvmlError::NotFound)
    ));
}

#[test]
fn a_mig_gpu_that_is_lost_and_returns_lists_its_instances_again() {
    let instances = json!([{"profile": "3g.40gb", "gpu_instance_id": 2,
                            "processes": [{"pid": 700, "used_memory_mib": 8}]}]);
    let fake = FakeNvml::new(&mig_config(instances.clone()));
    let mut gpu = open(&fake);
    let (_, s) = slow(gpu.as_mut());
    let before = mig(&s).clone();
    let mut lost = mig_config(instances);
    lost["gpus"][0]["lost"] = json!(true);
    fake.set_config(&lost);
    let e = gpu.read(SLOW).expect_err("a lost GPU does not read");
    assert!(e.is_lost(), "{e:?}");
    lost["gpus"][0]["lost"] = json!(false);
    fake.set_config(&lost);
    let (_, s) = slow(gpu.as_mut());
    assert_eq!(mig(&s), &before);
    assert_eq!(
        processes(&s)[&700].mig_uuid.as_ref(),
        Some(&before.instances[0].uuid)
    );
}
