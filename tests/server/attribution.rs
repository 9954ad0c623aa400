//! Who uses each GPU, through the real daemon on simulated GPUs (issue 13):
//! processes with their owners in GetSnapshot and Watch, the kubelet's
//! allocations with allocated-but-idle marked, MIG instances as child
//! devices in ListDevices and the samples, MIG UUIDs as selectors (reads
//! pick the parent, control is refused naming it), MIG reconfiguration and
//! owners starting and stopping as events, and the command-line policy.
//!
//! Every expectation comes from the scenario written here, not from the
//! daemon's output.

use std::time::Duration;

use crate::support::{Options, events_since, eventually, sim_config};
use gpuwatch_api::{
    self as api, EventKind, GetSnapshotRequest, GpuSelector, ListDevicesRequest,
    gpu_selector::Selector,
};

fn uuid(u: &str) -> GpuSelector {
    GpuSelector {
        selector: Some(Selector::Uuid(u.to_owned())),
    }
}

/// GPU 0: two pod processes sharing its busy time 3:1, a Slurm step that
/// starts at 20 s and ends at 40 s (simulated), and a pod allocated the GPU
/// that runs nothing. GPU 1: MIG with two instances, a pod process in
/// instance 1, a pod allocated instance 0 (idle), and a reconfiguration
/// to one 7g.80gb instance at 60 s.
fn scenario(extra: &str) -> String {
    sim_config(
        10.0,
        extra,
        &[
            r#"preset = "h100-sxm"
demand = [ { at = "0s", watts = 500 } ]
processes = [
  { pid = 5001, name = "trainer", command_line = "python3 train.py --token=s3cr3t --epochs 3", uid = 1000, user = "alice", memory_mib = 20000, sm_share = 3.0, namespace = "ml", pod = "train-a", container = "main" },
  { pid = 5002, name = "sidecar", memory_mib = 1000, sm_share = 1.0, namespace = "ml", pod = "train-a", container = "metrics" },
  { pid = 5003, name = "step", uid = 1001, memory_mib = 4000, slurm_job = "777", slurm_step = "2", from = "20s", until = "40s" },
]
allocations = [ { namespace = "ml", pod = "waiting", container = "c" } ]"#,
            r#"preset = "a100-sxm"
demand = [ { at = "0s", watts = 300 } ]
mig = { enabled = true, instances = ["3g.40gb", "2g.20gb"], changes = [ { at = "60s", instances = ["7g.80gb"] } ] }
processes = [ { pid = 6001, name = "infer", memory_mib = 8000, mig_instance = 1, namespace = "serve", pod = "emb-0", container = "emb", until = "60s" } ]
allocations = [ { namespace = "serve", pod = "idle-0", container = "c", mig_instance = 0, until = "60s" } ]"#,
        ],
    )
}

async fn snapshot(
    c: &mut crate::support::Client,
    gpus: Vec<GpuSelector>,
) -> api::GetSnapshotResponse {
    c.get_snapshot(GetSnapshotRequest { gpus })
        .await
        .expect("snapshot")
        .into_inner()
}

/// The latest sample of GPU `i` once its processes carry attribution.
async fn attributed(c: &crate::support::Client, i: usize) -> api::GpuSample {
    eventually(Duration::from_secs(15), "attributed processes", || {
        let mut c = c.clone();
        async move {
            let s = snapshot(&mut c, vec![]).await.samples.into_iter().nth(i)?;
            (!s.processes.is_empty() && s.processes.iter().all(|p| p.name.is_some())).then_some(s)
        }
    })
    .await
}

fn pod_of(p: &api::GpuProcess) -> Option<(String, String, String)> {
    p.attribution
        .as_ref()?
        .pod
        .as_ref()
        .map(|r| (r.namespace.clone(), r.pod.clone(), r.container.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_carry_their_owners_and_share_the_gpu_without_exceeding_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(scenario("")));
    let c = d.client().await;
    let s = attributed(&c, 0).await;
    let by_pid = |pid| s.processes.iter().find(|p| p.pid == pid).expect("listed");
    let trainer = by_pid(5001);
    assert_eq!(trainer.name.as_deref(), Some("trainer"));
    assert_eq!(trainer.user.as_deref(), Some("alice"));
    assert_eq!(trainer.uid, Some(1000));
    assert_eq!(trainer.used_memory_bytes, Some(20_000 << 20));
    assert_eq!(
        pod_of(trainer),
        Some(("ml".into(), "train-a".into(), "main".into()))
    );
    let a = trainer.attribution.as_ref().expect("attribution");
    assert_eq!(a.container_id.as_ref().map(String::len), Some(64));
    assert_eq!(a.container_runtime(), api::ContainerRuntime::Containerd);
    assert!(a.unattributed_reason.is_none());
    assert_eq!(
        pod_of(by_pid(5002)).map(|p| p.2),
        Some("metrics".to_owned())
    );
    assert_eq!(
        trainer.command_line, None,
        "command lines are off unless configured"
    );

    // Per-process SM use: present, never above the device's, and in the
    // 3:1 proportion of the shares.
    let sm = |p: &api::GpuProcess| p.utilization.and_then(|u| u.sm_pct).expect("sampled");
    let device = s.utilization_gpu_pct.expect("device utilisation");
    assert!(sm(trainer) + sm(by_pid(5002)) <= device, "{s:?}");
    assert!(sm(trainer) >= 2 * sm(by_pid(5002)), "{s:?}");

    // The pod with the GPU and no process on it is allocated but idle;
    // the pod running on it is not.
    let allocs: Vec<(String, bool)> = s
        .allocations
        .iter()
        .map(|a| (a.pod.as_ref().expect("pod").pod.clone(), a.idle))
        .collect();
    assert!(allocs.contains(&("waiting".into(), true)), "{allocs:?}");
    assert!(allocs.contains(&("train-a".into(), false)), "{allocs:?}");

    let hosts = c
        .clone()
        .list_devices(ListDevicesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .host
        .expect("host");
    let status = hosts.attribution.expect("status");
    assert!(status.enabled);
    assert_eq!(status.source, "simulator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slurm_step_starting_and_ending_is_announced_with_who_and_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(scenario("")));
    let c = d.client().await;
    // The step runs from 20 s to 40 s simulated: 2 to 4 s of wall time.
    let events = eventually(Duration::from_secs(20), "the step's start and end", || {
        let mut c = c.clone();
        async move {
            let e = events_since(&mut c, 0).await;
            let slurm: Vec<_> = e
                .into_iter()
                .filter(|e| e.kind() == EventKind::AttributionChanged)
                .filter(|e| {
                    e.attribution
                        .as_ref()
                        .and_then(|a| a.slurm.as_ref())
                        .is_some_and(|s| s.job_id == "777")
                })
                .collect();
            (slurm.len() >= 2).then_some(slurm)
        }
    })
    .await;
    let started = &events[0];
    let a = started.attribution.as_ref().expect("change");
    assert!(a.started, "{started:?}");
    assert_eq!(a.slurm.as_ref().and_then(|s| s.step.as_deref()), Some("2"));
    assert_eq!(started.gpu_index, Some(0));
    assert!(
        started.reason.contains("Slurm job 777"),
        "{}",
        started.reason
    );
    let ended = &events[1];
    assert!(!ended.attribution.as_ref().expect("change").started);
    assert!(ended.seq > started.seq);
    assert!(ended.reason.contains("stopped"), "{}", ended.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mig_instances_are_child_devices_selectable_for_reads_and_refused_for_control() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(scenario("")));
    let c = d.client().await;
    let s = attributed(&c, 1).await;
    assert_eq!(s.mig_enabled, Some(true));
    let profiles: Vec<&str> = s.mig_instances.iter().map(|m| m.profile.as_str()).collect();
    assert_eq!(profiles, vec!["3g.40gb", "2g.20gb"]);
    let small = &s.mig_instances[1];
    assert!(small.uuid.starts_with("MIG-"), "{small:?}");
    assert_eq!(small.pids, vec![6001]);
    assert_eq!(small.memory_used_bytes, Some(8000 << 20));
    assert!(
        small.memory_total_bytes.expect("total") < s.memory_total_bytes.expect("board"),
        "an instance holds part of the board"
    );
    assert_eq!(
        small.utilization_gpu_pct, None,
        "NVML gives none per instance"
    );
    let p = &s.processes[0];
    assert_eq!(p.mig_uuid.as_deref(), Some(small.uuid.as_str()));
    assert_eq!(pod_of(p).map(|p| p.1), Some("emb-0".to_owned()));
    // Power and temperature stay on the parent's sample.
    assert!(s.power_draw_mw.is_some() && s.temperature_c.is_some());
    let idle: Vec<_> = s.allocations.iter().filter(|a| a.idle).collect();
    assert_eq!(idle.len(), 1, "{:?}", s.allocations);
    assert_eq!(idle[0].device_ids, vec![s.mig_instances[0].uuid.clone()]);
    assert_eq!(idle[0].resource_name, "nvidia.com/mig-3g.40gb");

    // ListDevices lists the instances too.
    let mut c2 = c.clone();
    let devices = c2
        .list_devices(ListDevicesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .devices;
    assert_eq!(devices[1].mig_instances.len(), 2);
    assert_eq!(devices[0].mig_enabled, Some(false), "H100 with MIG off");

    // A MIG UUID (any case) selects its parent for reads.
    let picked = snapshot(&mut c2, vec![uuid(&small.uuid.to_lowercase())]).await;
    assert_eq!(picked.samples.len(), 1);
    assert_eq!(picked.samples[0].index, 1);
    let mut watch = crate::support::watch(
        &mut c2,
        api::WatchRequest {
            gpus: vec![uuid(&small.uuid)],
            ..Default::default()
        },
    )
    .await;
    match crate::support::next_message(&mut watch).await {
        api::watch_response::Message::Start(start) => {
            let f = start.current.expect("current frame");
            assert_eq!(
                f.samples.iter().map(|s| s.index).collect::<Vec<_>>(),
                vec![1]
            );
        }
        other => panic!("expected the stream's start, got {other:?}"),
    }

    // Control on a MIG instance is refused, naming the parent.
    let err = c2
        .set_power_limit(api::SetPowerLimitRequest {
            gpus: vec![uuid(&small.uuid)],
            target: Some(api::set_power_limit_request::Target::Watts(300.0)),
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("parent GPU") && err.message().contains("GPU 1"),
        "{}",
        err.message()
    );
    let err = c2
        .set_threshold(api::SetThresholdRequest {
            gpus: vec![uuid(&small.uuid)],
            target: Some(api::set_threshold_request::Target::Celsius(70)),
            hysteresis_c: None,
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mig_reconfiguration_is_announced_and_the_new_instances_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(scenario("")));
    let c = d.client().await;
    let before = attributed(&c, 1).await;
    let old: Vec<String> = before
        .mig_instances
        .iter()
        .map(|m| m.uuid.clone())
        .collect();
    // The change is at 60 s simulated: 6 s of wall time.
    let event = eventually(Duration::from_secs(25), "MIG_CHANGED", || {
        let mut c = c.clone();
        async move {
            events_since(&mut c, 0)
                .await
                .into_iter()
                .find(|e| e.kind() == EventKind::MigChanged)
        }
    })
    .await;
    assert_eq!(event.gpu_index, Some(1));
    assert!(event.reason.contains("created 7g.80gb"), "{}", event.reason);
    for u in &old {
        assert!(
            event.reason.contains(u.as_str()),
            "{} lacks {u}",
            event.reason
        );
    }
    let mut c2 = c.clone();
    let devices = eventually(Duration::from_secs(5), "ListDevices updated", || {
        let mut c = c2.clone();
        async move {
            let d = c
                .list_devices(ListDevicesRequest::default())
                .await
                .ok()?
                .into_inner()
                .devices;
            (d[1].mig_instances.len() == 1).then_some(d)
        }
    })
    .await;
    assert_eq!(devices[1].mig_instances[0].profile, "7g.80gb");
    assert!(!old.contains(&devices[1].mig_instances[0].uuid));
    // The destroyed instance's UUID no longer selects anything.
    let err = c2
        .get_snapshot(GetSnapshotRequest {
            gpus: vec![uuid(&old[0])],
        })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Its pod left it: the allocation and the process ended with it.
    let events = events_since(&mut c2, 0).await;
    assert!(
        events
            .iter()
            .any(|e| e.kind() == EventKind::AttributionChanged
                && e.attribution.as_ref().is_some_and(
                    |a| !a.started && a.pod.as_ref().is_some_and(|p| p.pod == "emb-0")
                )),
        "no stop event for emb-0: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_lines_follow_the_policy_and_are_cut_to_the_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        scenario("[attribution]\ncommand_lines = \"redacted\"\ncommand_line_max_bytes = 24\n");
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let c = d.client().await;
    let s = attributed(&c, 0).await;
    let line = s
        .processes
        .iter()
        .find(|p| p.pid == 5001)
        .and_then(|p| p.command_line.clone())
        .expect("a redacted command line");
    assert!(!line.contains("s3cr3t"), "{line}");
    assert!(line.starts_with("python3"), "{line}");
    assert!(line.len() <= 24, "{line}");
}

#[test]
fn workload_mistakes_are_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("gpuwatch.toml");
    for (gpu, key, words) in [
        (
            "preset = \"rtx-4090\"\nmig = { instances = [\"1g.10gb\"] }",
            "simulator.gpus[0].mig",
            "no MIG",
        ),
        (
            "preset = \"h100-sxm\"\nmig = { instances = [\"7g.80gb\", \"1g.10gb\"] }",
            "simulator.gpus[0].mig.instances",
            "do not fit",
        ),
        (
            "preset = \"h100-sxm\"\nprocesses = [ { pid = 1, mig_instance = 0 } ]",
            "simulator.gpus[0].processes[0].mig_instance",
            "no MIG instance 0",
        ),
        (
            "preset = \"h100-sxm\"\nprocesses = [ { pid = 1, namespace = \"a\" } ]",
            "simulator.gpus[0].processes[0].pod",
            "go together",
        ),
    ] {
        std::fs::write(&file, sim_config(1.0, "", &[gpu])).expect("write config");
        let out = std::process::Command::new(gpuwatch_testkit::server_bin())
            .args(["--simulate", "--check-config", "--config"])
            .arg(&file)
            .output()
            .expect("run gpuwatch-server --check-config");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: accepted");
        assert!(err.contains(key) && err.contains(words), "{key}: {err}");
    }
}

/// The same through the NVML backend and the stand-in libnvidia-ml.so:
/// instances listed with their processes, the kinds merged, a MIG UUID
/// selecting the parent, and a reconfiguration of the fake while the
/// daemon runs announced and listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nvml_mig_instances_and_their_changes_reach_the_api() {
    use serde_json::json;
    let gpu = |instances: serde_json::Value| {
        json!({ "gpus": [
            { "model": "datacenter", "load_pct": 40,
              "mig": { "enabled": true, "instances": instances } },
            { "model": "consumer", "load_pct": 30,
              "processes": [ { "pid": 900, "used_memory_mib": 100 } ],
              "graphics_processes": [ { "pid": 900, "used_memory_mib": 100 }, { "pid": 901, "used_memory_mib": 50 } ] },
        ]})
    };
    let fake = crate::nvml_support::FakeNvml::new(&gpu(json!([
        { "profile": "3g.40gb", "processes": [ { "pid": 700, "used_memory_mib": 2000 } ] },
        { "profile": "1g.10gb" },
    ])));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(
        dir.path(),
        Options {
            nvml_library: Some(fake.library().to_path_buf()),
            ..Options::default()
        },
    );
    let c = d.client().await;
    let s = eventually(Duration::from_secs(15), "MIG instances in a sample", || {
        let mut c = c.clone();
        async move {
            let s = snapshot(&mut c, vec![]).await;
            (s.samples.len() == 2 && s.samples[0].mig_instances.len() == 2).then_some(s)
        }
    })
    .await;
    let parent = &s.samples[0];
    assert_eq!(parent.mig_enabled, Some(true));
    let big = &parent.mig_instances[0];
    assert_eq!(big.profile, "3g.40gb");
    assert_eq!(big.pids, vec![700]);
    assert_eq!(
        parent
            .processes
            .iter()
            .find(|p| p.pid == 700)
            .and_then(|p| p.mig_uuid.clone()),
        Some(big.uuid.clone())
    );
    let consumer = &s.samples[1];
    assert_eq!(consumer.mig_enabled, None, "a GeForce board has no MIG");
    let kinds: Vec<(u32, api::ProcessKind)> = consumer
        .processes
        .iter()
        .map(|p| (p.pid, p.kind()))
        .collect();
    assert!(
        kinds.contains(&(900, api::ProcessKind::ComputeAndGraphics)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(901, api::ProcessKind::Graphics)),
        "{kinds:?}"
    );

    let mut c2 = c.clone();
    let picked = snapshot(&mut c2, vec![uuid(&big.uuid)]).await;
    assert_eq!(
        picked.samples.iter().map(|s| s.index).collect::<Vec<_>>(),
        vec![0]
    );

    // Reconfigure the board: one 7g.80gb instance instead.
    fake.set_config(&gpu(json!([{ "profile": "7g.80gb" }])));
    let event = eventually(Duration::from_secs(15), "MIG_CHANGED", || {
        let mut c = c.clone();
        async move {
            events_since(&mut c, 0)
                .await
                .into_iter()
                .find(|e| e.kind() == EventKind::MigChanged)
        }
    })
    .await;
    assert_eq!(event.gpu_index, Some(0));
    assert!(event.reason.contains("created 7g.80gb"), "{}", event.reason);
    assert!(event.reason.contains(&big.uuid), "{}", event.reason);
    let devices = c2
        .list_devices(ListDevicesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .devices;
    assert_eq!(devices[0].mig_instances.len(), 1);
    assert_eq!(devices[0].mig_instances[0].profile, "7g.80gb");
}

/// The host source end to end: simulated GPUs whose pids live in a fixture
/// `/proc` tree, and an in-test kubelet over a unix socket. Every
/// attribution the daemon reports is compared with what the fixture says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_records_and_the_kubelet_are_joined_into_what_the_api_reports() {
    use gpuwatch_server::{
        attribution::{
            fixture::{FakeProc, FakeProcess, write_passwd},
            podresources::fake_kubelet::{FakeKubelet, container, devices, pod, serve},
        },
        backend::sim::sim_uuid,
        config::PresetKey,
    };
    let tree = tempfile::tempdir().expect("tempdir");
    let proc = FakeProc::new(tree.path().join("proc")).expect("proc");
    write_passwd(
        &tree.path().join("passwd"),
        &[("alice", 1000), ("bob", 1001)],
    )
    .expect("passwd");
    let containerd = "ab".repeat(32);
    let docker = "cd".repeat(32);
    let pod_uid = "4f6b1c2a-0d3e-4b5f-8a9b-1c2d3e4f5a6b";
    let processes = [
        FakeProcess::new(
            7001,
            "trainer",
            1000,
            &format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{containerd}.scope\n",
                pod_uid.replace('-', "_")
            ),
        ),
        FakeProcess::new(
            7002,
            "infer",
            1001,
            &format!("0::/system.slice/docker-{docker}.scope\n"),
        ),
        FakeProcess::new(
            7003,
            "sim",
            1001,
            "0::/system.slice/slurmstepd.scope/job_4242/step_3/user/task_0\n",
        ),
        FakeProcess::new(7004, "render", 0, "0::/system.slice/render-farm.service\n"),
        FakeProcess::new(
            7005,
            "notebook",
            1000,
            "0::/user.slice/user-1000.slice/session-4.scope\n",
        ),
        FakeProcess::new(7006, "hidden", 1000, "0::/\n"),
    ];
    for p in &processes {
        proc.add(p).expect("add");
    }
    // A cgroup file that cannot be read (a directory where it should be).
    let cgroup = proc.dir(7006).join("cgroup");
    std::fs::remove_file(&cgroup).expect("rm");
    std::fs::create_dir(&cgroup).expect("mkdir");

    let (gpu0, gpu1) = (
        sim_uuid(PresetKey::H100Sxm, 0),
        sim_uuid(PresetKey::H100Sxm, 1),
    );
    let socket = tree.path().join("kubelet.sock");
    let _kubelet = serve(
        FakeKubelet {
            pods: vec![
                pod(
                    "ml",
                    "trainer-0",
                    vec![container("main", vec![devices("nvidia.com/gpu", &[&gpu0])])],
                ),
                pod(
                    "ml",
                    "waiting",
                    vec![container("c", vec![devices("nvidia.com/gpu", &[&gpu1])])],
                ),
                pod(
                    "web",
                    "nginx",
                    vec![container(
                        "nginx",
                        vec![devices("example.com/fpga", &["fpga0"])],
                    )],
                ),
            ],
            allocatable: None,
            delay: Duration::ZERO,
        },
        &socket,
    )
    .expect("kubelet");

    let attribution = format!(
        "[attribution]\nproc_root = \"{}\"\npasswd_file = \"{}\"\npod_resources_socket = \"{}\"\n",
        proc.root().display(),
        tree.path().join("passwd").display(),
        socket.display()
    );
    let config = sim_config(
        10.0,
        &attribution,
        &[
            "preset = \"h100-sxm\"\ndemand = [ { at = \"0s\", watts = 400 } ]\nprocesses = [ { pid = 7001, memory_mib = 1000 }, { pid = 7005, memory_mib = 100 } ]",
            "preset = \"h100-sxm\"\ndemand = [ { at = \"0s\", watts = 400 } ]\nprocesses = [ { pid = 7002 }, { pid = 7003 }, { pid = 7004 }, { pid = 7006 } ]",
        ],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let c = d.client().await;
    let snap = eventually(Duration::from_secs(15), "host attribution", || {
        let mut c = c.clone();
        async move {
            let s = snapshot(&mut c, vec![]).await;
            (s.samples.len() == 2
                && s.samples.iter().all(|g| {
                    !g.processes.is_empty() && g.processes.iter().all(|p| p.attribution.is_some())
                })
                && !s.samples[1].allocations.is_empty())
            .then_some(s)
        }
    })
    .await;
    let find = |pid: u32| {
        snap.samples
            .iter()
            .flat_map(|s| &s.processes)
            .find(|p| p.pid == pid)
            .unwrap_or_else(|| panic!("pid {pid} listed"))
    };
    let a = |pid| find(pid).attribution.clone().expect("attribution");

    let trainer = find(7001);
    assert_eq!(trainer.name.as_deref(), Some("trainer"));
    assert_eq!(trainer.user.as_deref(), Some("alice"));
    assert_eq!(
        pod_of(trainer),
        Some(("ml".into(), "trainer-0".into(), "main".into()))
    );
    assert_eq!(a(7001).container_id.as_deref(), Some(containerd.as_str()));
    assert_eq!(
        a(7001).container_runtime(),
        api::ContainerRuntime::Containerd
    );
    assert_eq!(a(7001).pod_uid.as_deref(), Some(pod_uid));

    assert_eq!(a(7002).container_id.as_deref(), Some(docker.as_str()));
    assert_eq!(a(7002).container_runtime(), api::ContainerRuntime::Docker);
    assert_eq!(
        a(7002).pod,
        None,
        "a Docker container outside Kubernetes has no pod"
    );
    assert_eq!(find(7002).user.as_deref(), Some("bob"));

    let slurm = a(7003).slurm.expect("slurm");
    assert_eq!(
        (slurm.job_id.as_str(), slurm.step.as_deref()),
        ("4242", Some("3"))
    );
    assert_eq!(a(7004).systemd_unit.as_deref(), Some("render-farm.service"));

    let plain = a(7005);
    assert_eq!(
        (plain.pod, plain.slurm, plain.container_id),
        (None, None, None),
        "a user's notebook is nobody's job"
    );
    assert!(plain.unattributed_reason.is_none());
    assert_eq!(find(7005).name.as_deref(), Some("notebook"));

    let hidden = a(7006);
    let reason = hidden.unattributed_reason.expect("a reason");
    assert!(
        reason.contains("7006") && reason.contains("cgroup"),
        "{reason}"
    );

    let allocs = &snap.samples[1].allocations;
    assert_eq!(allocs.len(), 1, "the FPGA is not a GPU: {allocs:?}");
    assert!(allocs[0].idle);
    assert_eq!(
        allocs[0].pod.as_ref().map(|p| p.pod.as_str()),
        Some("waiting")
    );
    let busy = &snap.samples[0].allocations;
    assert_eq!(busy.len(), 1);
    assert!(!busy[0].idle, "trainer-0 runs on GPU 0");

    let status = c
        .clone()
        .list_devices(ListDevicesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .host
        .and_then(|h| h.attribution)
        .expect("status");
    assert_eq!(status.source, "host");
    assert!(status.kubelet, "{status:?}");
    let problem = status.problem.expect("the unreadable pid is reported");
    assert!(problem.contains("7006"), "{problem}");
}
