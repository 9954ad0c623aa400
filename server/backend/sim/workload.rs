//! What runs on a simulated GPU and who owns it: the simulator's stand-in
//! for NVML's process lists and MIG instances on one side, and for the
//! host's records (`/proc`, the cgroup tree, the kubelet) on the other.
//!
//! Owns the `processes`, `allocations` and `mig` keys of a
//! `[[simulator.gpus]]` entry once validated: which processes run at a
//! simulated time, how the GPU's busy time is shared among them, which MIG
//! instances exist (NVIDIA's profiles for the 80 GB boards, with the
//! slice arithmetic that decides what fits), and the [`SimHostRecords`]
//! that answer the attribution seam for the simulated pids. Everything is a
//! function of simulated time, so a scenario plays the same way every run.

use std::{collections::HashMap, time::Duration};

use crate::{
    attribution::{
        Allocation, Container, HostRecords, Owner, PodRef, ProcessRecord, Runtime, SlurmJob,
        Unattributed,
    },
    backend::{MigInstance, MigReading, Process, ProcessKind, ProcessUtilization},
    config::{PresetKey, SimAllocation, SimGpuConfig, SimProcess, SimProcessKind, SimRuntime},
};

use super::{SimClock, fnv1a, sim_uuid};

/// One MIG profile of an 80 GB board: compute slices of 7, memory slices
/// of 8 (10 GB each), and the SMs an instance of it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigProfile {
    pub name: &'static str,
    pub compute_slices: u32,
    pub memory_slices: u32,
    pub sm_count: u32,
}

/// NVIDIA's GPU-instance profiles for the H100 80GB (132 SMs).
const H100_PROFILES: &[MigProfile] = &[
    profile("1g.10gb", 1, 1, 16),
    profile("1g.20gb", 1, 2, 16),
    profile("2g.20gb", 2, 2, 32),
    profile("3g.40gb", 3, 4, 60),
    profile("4g.40gb", 4, 4, 64),
    profile("7g.80gb", 7, 8, 132),
];

/// NVIDIA's GPU-instance profiles for the A100 80GB (108 SMs).
const A100_PROFILES: &[MigProfile] = &[
    profile("1g.10gb", 1, 1, 14),
    profile("1g.20gb", 1, 2, 14),
    profile("2g.20gb", 2, 2, 28),
    profile("3g.40gb", 3, 4, 42),
    profile("4g.40gb", 4, 4, 56),
    profile("7g.80gb", 7, 8, 98),
];

const fn profile(
    name: &'static str,
    compute_slices: u32,
    memory_slices: u32,
    sm_count: u32,
) -> MigProfile {
    MigProfile {
        name,
        compute_slices,
        memory_slices,
        sm_count,
    }
}

/// The MIG profiles a preset supports; empty for boards without MIG.
pub fn profiles(key: PresetKey) -> &'static [MigProfile] {
    match key {
        PresetKey::H100Sxm => H100_PROFILES,
        PresetKey::A100Sxm => A100_PROFILES,
        PresetKey::Rtx4090 | PresetKey::Laptop => &[],
    }
}

/// Checks a GPU entry's workload keys; the error is (key, message).
pub fn check(i: usize, g: &SimGpuConfig) -> Result<(), (String, String)> {
    let key = |k: &str| format!("simulator.gpus[{i}].{k}");
    let known = profiles(g.preset);
    let mut instance_count = 0;
    if let Some(mig) = &g.mig {
        if known.is_empty() {
            return Err((
                key("mig"),
                format!(
                    "the {} preset has no MIG; allowed on: h100-sxm, a100-sxm",
                    g.preset.as_str()
                ),
            ));
        }
        let mut layouts = vec![(key("mig.instances"), &mig.instances)];
        let mut last = None;
        for (j, c) in mig.changes.iter().enumerate() {
            if last.is_some_and(|l| c.at <= l) {
                return Err((
                    key(&format!("mig.changes[{j}].at")),
                    "changes must be in increasing time order".into(),
                ));
            }
            last = Some(c.at);
            layouts.push((key(&format!("mig.changes[{j}].instances")), &c.instances));
        }
        for (k, layout) in layouts {
            instance_count = instance_count.max(layout.len());
            layout_of(g.preset, layout).map_err(|m| (k, m))?;
        }
    }
    let mut pids = HashMap::new();
    for (j, p) in g.processes.iter().enumerate() {
        let pkey = |k: &str| key(&format!("processes[{j}].{k}"));
        if p.pid == 0 {
            return Err((pkey("pid"), "must be a positive process id".into()));
        }
        if let Some(prev) = pids.insert(p.pid, j) {
            return Err((
                pkey("pid"),
                format!("pid {} is already processes[{prev}] on this GPU", p.pid),
            ));
        }
        if let Some(s) = p.sm_share
            && !(s.is_finite() && (0.0..=1000.0).contains(&s))
        {
            return Err((
                pkey("sm_share"),
                format!("{s} is out of range; allowed: 0 to 1000"),
            ));
        }
        for (name, v) in [
            ("encoder_pct", p.encoder_pct),
            ("decoder_pct", p.decoder_pct),
        ] {
            if v.is_some_and(|v| v > 100) {
                return Err((pkey(name), "allowed: 0 to 100".into()));
            }
        }
        if let (Some(from), Some(until)) = (p.from, p.until)
            && until <= from
        {
            return Err((pkey("until"), "must be after `from`".into()));
        }
        check_pod_names(&pkey, [&p.namespace, &p.pod, &p.container])?;
        if let Some(m) = p.mig_instance
            && m >= instance_count
        {
            return Err((
                pkey("mig_instance"),
                format!("no MIG instance {m}: the GPU's `mig` lists {instance_count} at most"),
            ));
        }
        if let Some(id) = &p.container_id
            && (id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err((
                pkey("container_id"),
                "must be 1 to 64 hexadecimal digits".into(),
            ));
        }
        if p.slurm_step.is_some() && p.slurm_job.is_none() {
            return Err((pkey("slurm_step"), "needs `slurm_job`".into()));
        }
    }
    let total_mib: u64 = g.processes.iter().filter_map(|p| p.memory_mib).sum();
    let board = super::preset::Preset::get(g.preset).memory_total_bytes >> 20;
    if total_mib > board {
        return Err((
            key("processes"),
            format!("the processes hold {total_mib} MiB in all; the board has {board} MiB"),
        ));
    }
    for (j, a) in g.allocations.iter().enumerate() {
        let akey = |k: &str| key(&format!("allocations[{j}].{k}"));
        check_pod_names(
            &akey,
            [
                &Some(a.namespace.clone()),
                &Some(a.pod.clone()),
                &Some(a.container.clone()),
            ],
        )?;
        if let Some(m) = a.mig_instance
            && m >= instance_count
        {
            return Err((
                akey("mig_instance"),
                format!("no MIG instance {m}: the GPU's `mig` lists {instance_count} at most"),
            ));
        }
        if let (Some(from), Some(until)) = (a.from, a.until)
            && until <= from
        {
            return Err((akey("until"), "must be after `from`".into()));
        }
    }
    Ok(())
}

fn check_pod_names(
    key: &impl Fn(&str) -> String,
    [namespace, pod, container]: [&Option<String>; 3],
) -> Result<(), (String, String)> {
    let given = [namespace, pod, container]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if given != 0 && given != 3 {
        return Err((
            key("pod"),
            "`namespace`, `pod` and `container` go together".into(),
        ));
    }
    for (name, v) in [
        ("namespace", namespace),
        ("pod", pod),
        ("container", container),
    ] {
        if let Some(v) = v
            && (v.is_empty()
                || v.len() > 253
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)))
        {
            return Err((
                key(name),
                format!("{v:?} is not a Kubernetes name (lower-case letters, digits, '-', '.')"),
            ));
        }
    }
    Ok(())
}

/// The profiles of `layout`, checked to fit the board together.
fn layout_of(key: PresetKey, layout: &[String]) -> Result<Vec<MigProfile>, String> {
    let known = profiles(key);
    let profiles: Vec<MigProfile> = layout
        .iter()
        .map(|name| {
            known
                .iter()
                .find(|p| p.name == name)
                .copied()
                .ok_or_else(|| {
                    let names: Vec<_> = known.iter().map(|p| p.name).collect();
                    format!(
                        "unknown MIG profile {name:?} for {}; allowed: {}",
                        key.as_str(),
                        names.join(", ")
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let compute: u32 = profiles.iter().map(|p| p.compute_slices).sum();
    let memory: u32 = profiles.iter().map(|p| p.memory_slices).sum();
    if compute > 7 || memory > 8 {
        return Err(format!(
            "the instances need {compute} of 7 compute slices and {memory} of 8 memory slices: they do not fit"
        ));
    }
    Ok(profiles)
}

/// A made-up but stable MIG UUID for instance `gi`/`ci` of `gpu_uuid`.
fn mig_uuid(gpu_uuid: &str, gi: u32, ci: u32) -> String {
    let text = format!("{gpu_uuid}/{gi}/{ci}");
    let a = fnv1a(3, &text);
    let b = fnv1a(4, &text);
    format!(
        "MIG-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn active(from: Option<Duration>, until: Option<Duration>, now: Duration) -> bool {
    from.is_none_or(|f| now >= f) && until.is_none_or(|u| now < u)
}

/// One simulated GPU's workload.
#[derive(Debug, Clone)]
pub struct Workload {
    gpu_uuid: String,
    preset: PresetKey,
    processes: Vec<SimProcess>,
    allocations: Vec<SimAllocation>,
    /// (from, enabled, instances) in time order; empty without MIG support.
    mig: Vec<(Duration, bool, Vec<MigProfile>)>,
    /// The preset supports MIG.
    mig_capable: bool,
    /// The preset samples per-process utilisation.
    process_utilization: bool,
}

impl Workload {
    pub fn new(index: u32, g: &SimGpuConfig) -> Self {
        let mig_capable = !profiles(g.preset).is_empty();
        let mut mig = Vec::new();
        if mig_capable {
            match &g.mig {
                None => mig.push((Duration::ZERO, false, Vec::new())),
                Some(m) => {
                    // Validated: the layouts fit.
                    let layout = |l: &[String]| layout_of(g.preset, l).unwrap_or_default();
                    mig.push((Duration::ZERO, m.enabled, layout(&m.instances)));
                    let mut enabled = m.enabled;
                    for c in &m.changes {
                        enabled = c.enabled.unwrap_or(enabled);
                        mig.push((c.at, enabled, layout(&c.instances)));
                    }
                }
            }
        }
        Self {
            gpu_uuid: sim_uuid(g.preset, index),
            preset: g.preset,
            processes: g.processes.clone(),
            allocations: g.allocations.clone(),
            mig,
            mig_capable,
            process_utilization: g.preset != PresetKey::Laptop,
        }
    }

    /// True when the entry declares processes (otherwise the model's one
    /// anonymous process stands in).
    pub fn declares_processes(&self) -> bool {
        !self.processes.is_empty()
    }

    /// The MIG layout at `now`: (enabled, instances).
    fn mig_layout(&self, now: Duration) -> Option<(bool, &[MigProfile])> {
        self.mig
            .iter()
            .rev()
            .find(|(from, _, _)| *from <= now)
            .map(|(_, enabled, l)| (*enabled, l.as_slice()))
    }

    /// The MIG instances at `now` with their ids and UUIDs (memory use not
    /// filled in); `None` on boards without MIG.
    fn instances(&self, now: Duration) -> Option<(bool, Vec<MigInstance>)> {
        let (enabled, layout) = self.mig_layout(now)?;
        let total = super::preset::Preset::get(self.preset).memory_total_bytes;
        let instances = if enabled {
            layout
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    // A 7-slice instance is GPU instance 0, as on real boards;
                    // the rest are numbered from 1 in creation order.
                    let gi = if p.compute_slices == 7 {
                        0
                    } else {
                        i as u32 + 1
                    };
                    MigInstance {
                        uuid: mig_uuid(&self.gpu_uuid, gi, 0),
                        gpu_instance_id: gi,
                        compute_instance_id: 0,
                        profile: p.name.to_owned(),
                        sm_count: Some(p.sm_count),
                        memory_total_bytes: Some(u64::from(p.memory_slices) * total / 8),
                        memory_used_bytes: Some(0),
                        // NVML gives no per-instance utilisation.
                        utilization_gpu_pct: None,
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        Some((enabled, instances))
    }

    /// Processes running at `now`, each with the MIG instance (index) it
    /// runs in; a process whose instance does not exist does not run.
    fn running(&self, now: Duration, mig: Option<&(bool, Vec<MigInstance>)>) -> Vec<&SimProcess> {
        let mig_on = mig.is_some_and(|(on, _)| *on);
        let count = mig.map_or(0, |(_, i)| i.len());
        self.processes
            .iter()
            .filter(|p| active(p.from, p.until, now))
            .filter(|p| match p.mig_instance {
                Some(m) => mig_on && m < count,
                None => !mig_on,
            })
            .collect()
    }

    /// GPU memory the running processes hold at `now`.
    pub fn memory_used_bytes(&self, now: Duration) -> u64 {
        let mig = self.instances(now);
        self.running(now, mig.as_ref())
            .iter()
            .filter_map(|p| p.memory_mib)
            .map(|m| m << 20)
            .sum()
    }

    /// The process list and MIG reading at `now`, with the GPU's busy time
    /// (`util_gpu_pct`, `util_memory_pct`) shared among the processes
    /// outside MIG instances by their `sm_share`.
    pub fn slow(
        &self,
        now: Duration,
        util_gpu_pct: u32,
        util_memory_pct: u32,
    ) -> (Vec<Process>, Option<MigReading>) {
        let mut mig = self.instances(now);
        let running = self.running(now, mig.as_ref());
        let weight = |p: &SimProcess| p.sm_share.unwrap_or(1.0);
        let total: f64 = running
            .iter()
            .filter(|p| p.mig_instance.is_none())
            .map(|p| weight(p))
            .sum();
        let share = |p: &SimProcess, pct: u32| -> u32 {
            if total <= 0.0 {
                0
            } else {
                // Floor, so the shares never sum above the device's figure.
                (f64::from(pct) * weight(p) / total).floor() as u32
            }
        };
        let processes = running
            .iter()
            .map(|p| {
                let mig_uuid = p.mig_instance.and_then(|m| {
                    let (_, instances) = mig.as_mut()?;
                    let instance = instances.get_mut(m)?;
                    if let (Some(used), Some(mib)) =
                        (instance.memory_used_bytes.as_mut(), p.memory_mib)
                    {
                        *used += mib << 20;
                    }
                    Some(instance.uuid.clone())
                });
                let utilization =
                    (self.process_utilization && mig_uuid.is_none()).then(|| ProcessUtilization {
                        sm_pct: Some(share(p, util_gpu_pct)),
                        memory_pct: Some(share(p, util_memory_pct)),
                        encoder_pct: Some(p.encoder_pct.unwrap_or(0)),
                        decoder_pct: Some(p.decoder_pct.unwrap_or(0)),
                    });
                Process {
                    pid: p.pid,
                    used_memory_bytes: p.memory_mib.map(|m| m << 20),
                    kind: match p.kind {
                        SimProcessKind::Compute => ProcessKind::Compute,
                        SimProcessKind::Graphics => ProcessKind::Graphics,
                        SimProcessKind::ComputeAndGraphics => ProcessKind::ComputeAndGraphics,
                    },
                    utilization,
                    mig_uuid,
                }
            })
            .collect();
        let mig = mig.map(|(enabled, instances)| MigReading { enabled, instances });
        (processes, mig)
    }

    /// The MIG reading at `now` alone (for a GPU whose processes are the
    /// model's anonymous one).
    pub fn mig(&self, now: Duration) -> Option<MigReading> {
        if !self.mig_capable {
            return None;
        }
        self.slow(now, 0, 0).1
    }

    /// The device id the kubelet would report for `mig_instance` (or the
    /// whole GPU) at `now`, with the resource name; `None` when the
    /// instance does not exist then.
    fn device(&self, mig_instance: Option<usize>, now: Duration) -> Option<(String, String)> {
        match mig_instance {
            None => Some((self.gpu_uuid.clone(), "nvidia.com/gpu".to_owned())),
            Some(m) => {
                let (on, instances) = self.instances(now)?;
                let i = instances.get(m).filter(|_| on)?;
                Some((i.uuid.clone(), format!("nvidia.com/mig-{}", i.profile)))
            }
        }
    }
}

/// A stable made-up 64-hex container id for a pod's container.
fn container_id_for(namespace: &str, pod: &str, container: &str) -> String {
    let text = format!("{namespace}/{pod}/{container}");
    (0..4u64)
        .map(|k| format!("{:016x}", fnv1a(10 + k, &text)))
        .collect()
}

/// A stable made-up pod UID.
fn pod_uid_for(namespace: &str, pod: &str) -> String {
    let text = format!("{namespace}/{pod}");
    let a = fnv1a(20, &text);
    let b = fnv1a(21, &text);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn record(p: &SimProcess) -> ProcessRecord {
    let pod = match (&p.namespace, &p.pod, &p.container) {
        (Some(namespace), Some(pod), Some(container)) => Some(PodRef {
            namespace: namespace.clone(),
            pod: pod.clone(),
            container: container.clone(),
        }),
        _ => None,
    };
    let container = match (&p.container_id, &pod) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(r)) => Some(container_id_for(&r.namespace, &r.pod, &r.container)),
        (None, None) => None,
    }
    .map(|id| Container {
        id,
        runtime: match p.runtime {
            Some(SimRuntime::Docker) => Runtime::Docker,
            Some(SimRuntime::Podman) => Runtime::Podman,
            Some(SimRuntime::CriO) => Runtime::CriO,
            Some(SimRuntime::Containerd) | None => Runtime::Containerd,
        },
    });
    let pod_uid = pod.as_ref().map(|r| pod_uid_for(&r.namespace, &r.pod));
    let cgroup = match (&pod_uid, &container, &p.slurm_job, &p.unit) {
        (Some(uid), Some(c), _, _) => Some(format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{}.scope",
            uid.replace('-', "_"),
            c.id
        )),
        (None, Some(c), _, _) => Some(format!("/system.slice/docker-{}.scope", c.id)),
        (_, None, Some(job), _) => Some(format!(
            "/system.slice/slurmstepd.scope/job_{job}/step_{}/user/task_0",
            p.slurm_step.as_deref().unwrap_or("0")
        )),
        (_, None, None, Some(unit)) => Some(format!("/system.slice/{unit}")),
        _ => p
            .uid
            .map(|uid| format!("/user.slice/user-{uid}.slice/session-1.scope")),
    };
    ProcessRecord {
        pid: p.pid,
        name: Some(p.name.clone().unwrap_or_else(|| "python3".to_owned())),
        command_line: p.command_line.clone(),
        uid: p.uid,
        user: p.user.clone(),
        cgroup,
        owner: Owner {
            container,
            systemd_unit: p.unit.clone(),
            slurm: p.slurm_job.as_ref().map(|job| SlurmJob {
                job_id: job.clone(),
                step: p.slurm_step.clone(),
                uid: p.uid,
            }),
            pod,
            pod_uid,
        },
    }
}

/// The attribution seam for simulated GPUs: the processes and allocations
/// the `[simulator]` entries declare, at the simulator's time.
#[derive(Debug)]
pub struct SimHostRecords {
    clock: SimClock,
    workloads: Vec<Workload>,
    records: HashMap<u32, ProcessRecord>,
}

impl SimHostRecords {
    pub fn new(clock: SimClock, workloads: Vec<Workload>) -> Self {
        let records = workloads
            .iter()
            .flat_map(|w| w.processes.iter())
            .map(|p| (p.pid, record(p)))
            .collect();
        Self {
            clock,
            workloads,
            records,
        }
    }
}

impl HostRecords for SimHostRecords {
    fn process(&mut self, pid: u32) -> Result<ProcessRecord, Unattributed> {
        self.records.get(&pid).cloned().ok_or_else(|| Unattributed {
            reason: format!("pid {pid} is not one of the simulator's declared processes"),
        })
    }

    fn allocations(&mut self) -> Result<Vec<Allocation>, Unattributed> {
        let now = self.clock.now();
        let mut out: Vec<Allocation> = Vec::new();
        let mut add = |pod: PodRef, device: Option<(String, String)>| {
            let Some((id, resource_name)) = device else {
                return;
            };
            match out
                .iter_mut()
                .find(|a| a.pod == pod && a.resource_name == resource_name)
            {
                Some(a) if a.device_ids.contains(&id) => {}
                Some(a) => a.device_ids.push(id),
                None => out.push(Allocation {
                    pod,
                    resource_name,
                    device_ids: vec![id],
                }),
            }
        };
        for w in &self.workloads {
            for a in &w.allocations {
                if active(a.from, a.until, now) {
                    let pod = PodRef {
                        namespace: a.namespace.clone(),
                        pod: a.pod.clone(),
                        container: a.container.clone(),
                    };
                    add(pod, w.device(a.mig_instance, now));
                }
            }
            // A pod's container running on a GPU was allocated it.
            for p in &w.processes {
                if let Some(pod) = self.records.get(&p.pid).and_then(|r| r.owner.pod.clone())
                    && active(p.from, p.until, now)
                {
                    add(pod, w.device(p.mig_instance, now));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SimMig, SimMigChange};

    const GIB: u64 = 1 << 30;

    fn gpu(preset: PresetKey) -> SimGpuConfig {
        toml::from_str(&format!("preset = \"{}\"", preset.as_str())).expect("entry")
    }

    fn process(pid: u32) -> SimProcess {
        toml::from_str(&format!("pid = {pid}")).expect("process")
    }

    #[test]
    fn busy_time_is_shared_by_weight_and_never_sums_above_the_device() {
        let mut g = gpu(PresetKey::H100Sxm);
        for (pid, share) in [(10, 1.0), (11, 2.0), (12, 0.5)] {
            g.processes.push(SimProcess {
                sm_share: Some(share),
                ..process(pid)
            });
        }
        let w = Workload::new(0, &g);
        for util in [0, 1, 7, 33, 99, 100] {
            let (ps, _) = w.slow(Duration::ZERO, util, util / 2);
            let sm: Vec<u32> = ps
                .iter()
                .map(|p| p.utilization.and_then(|u| u.sm_pct).expect("sampled"))
                .collect();
            assert!(sm.iter().sum::<u32>() <= util, "{sm:?} over {util}");
            // The heavier process never gets less than a lighter one.
            assert!(sm[1] >= sm[0] && sm[0] >= sm[2], "{sm:?}");
        }
    }

    #[test]
    fn processes_come_and_go_with_simulated_time() {
        let mut g = gpu(PresetKey::A100Sxm);
        g.processes.push(SimProcess {
            from: Some(Duration::from_secs(10)),
            until: Some(Duration::from_secs(20)),
            memory_mib: Some(1024),
            ..process(5)
        });
        let w = Workload::new(0, &g);
        let pids = |t| {
            w.slow(Duration::from_secs(t), 50, 20)
                .0
                .iter()
                .map(|p| p.pid)
                .collect::<Vec<_>>()
        };
        assert!(pids(5).is_empty());
        assert_eq!(pids(10), vec![5]);
        assert!(pids(20).is_empty());
        assert_eq!(w.memory_used_bytes(Duration::from_secs(15)), 1 << 30);
        assert_eq!(w.memory_used_bytes(Duration::from_secs(25)), 0);
    }

    #[test]
    fn mig_instances_have_stable_ids_and_carry_their_processes() {
        let mut g = gpu(PresetKey::H100Sxm);
        g.mig = Some(SimMig {
            enabled: true,
            instances: vec!["3g.40gb".into(), "1g.10gb".into()],
            changes: vec![SimMigChange {
                at: Duration::from_secs(60),
                enabled: None,
                instances: vec!["7g.80gb".into()],
            }],
        });
        g.processes.push(SimProcess {
            mig_instance: Some(1),
            memory_mib: Some(2048),
            until: Some(Duration::from_secs(60)),
            ..process(7)
        });
        g.processes.push(process(8)); // no instance: cannot run in MIG mode
        check(0, &g).expect("valid");
        let w = Workload::new(0, &g);
        let (ps, mig) = w.slow(Duration::ZERO, 80, 40);
        let mig = mig.expect("MIG-capable");
        assert!(mig.enabled);
        assert_eq!(mig.instances.len(), 2);
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert_eq!(
            ps[0].mig_uuid.as_deref(),
            Some(mig.instances[1].uuid.as_str())
        );
        assert_eq!(ps[0].utilization, None, "NVML samples no process in MIG");
        assert_eq!(mig.instances[1].memory_used_bytes, Some(2048 << 20));
        assert_eq!(mig.instances[1].profile, "1g.10gb");
        assert_eq!(mig.instances[0].memory_total_bytes, Some(40 * GIB));
        let again = w.mig(Duration::from_secs(1)).expect("mig");
        assert_eq!(again.instances[0].uuid, mig.instances[0].uuid);
        let later = w.mig(Duration::from_secs(61)).expect("mig");
        assert_eq!(later.instances.len(), 1);
        assert_eq!(later.instances[0].gpu_instance_id, 0);
        assert_ne!(later.instances[0].uuid, mig.instances[0].uuid);
    }

    #[test]
    fn layouts_that_do_not_fit_and_unknown_profiles_are_refused_by_name() {
        let mut g = gpu(PresetKey::H100Sxm);
        g.mig = Some(SimMig {
            enabled: true,
            instances: vec!["4g.40gb".into(), "4g.40gb".into()],
            changes: Vec::new(),
        });
        let (key, msg) = check(2, &g).expect_err("8 compute slices");
        assert_eq!(key, "simulator.gpus[2].mig.instances");
        assert!(msg.contains("do not fit"), "{msg}");
        g.mig.as_mut().expect("mig").instances = vec!["2g.10gb".into()];
        let (_, msg) = check(0, &g).expect_err("unknown");
        assert!(msg.contains("2g.10gb") && msg.contains("1g.10gb"), "{msg}");
        let mut laptop = gpu(PresetKey::Laptop);
        laptop.mig = g.mig.clone();
        let (key, _) = check(0, &laptop).expect_err("no MIG");
        assert_eq!(key, "simulator.gpus[0].mig");
        assert!(
            Workload::new(0, &gpu(PresetKey::Laptop))
                .mig(Duration::ZERO)
                .is_none()
        );
    }

    #[test]
    fn pods_imply_their_allocations_and_idle_allocations_are_listed() {
        let mut g = gpu(PresetKey::H100Sxm);
        g.processes.push(SimProcess {
            namespace: Some("ml".into()),
            pod: Some("trainer-0".into()),
            container: Some("main".into()),
            ..process(100)
        });
        g.allocations.push(SimAllocation {
            namespace: "ml".into(),
            pod: "idle-1".into(),
            container: "c".into(),
            mig_instance: None,
            from: None,
            until: None,
        });
        check(0, &g).expect("valid");
        let mut records = SimHostRecords::new(SimClock::new(1.0), vec![Workload::new(0, &g)]);
        let r = records.process(100).expect("declared");
        let pod = r.owner.pod.clone().expect("pod");
        assert_eq!(pod.pod, "trainer-0");
        let c = r.owner.container.expect("container");
        assert_eq!(c.id.len(), 64);
        assert!(r.cgroup.expect("cgroup").contains(&c.id));
        let allocations = records.allocations().expect("allocations");
        let pods: Vec<_> = allocations.iter().map(|a| a.pod.pod.as_str()).collect();
        assert_eq!(pods, vec!["idle-1", "trainer-0"]);
        assert!(
            allocations
                .iter()
                .all(|a| a.device_ids == vec![sim_uuid(PresetKey::H100Sxm, 0)])
        );
        assert!(records.process(4242).is_err());
    }

    #[test]
    fn bad_pod_names_and_duplicate_pids_are_refused() {
        let mut g = gpu(PresetKey::H100Sxm);
        g.processes.push(SimProcess {
            namespace: Some("ml".into()),
            pod: Some("Trainer".into()),
            container: Some("main".into()),
            ..process(1)
        });
        let (key, msg) = check(0, &g).expect_err("upper case");
        assert_eq!(key, "simulator.gpus[0].processes[0].pod");
        assert!(msg.contains("Trainer"), "{msg}");
        g.processes[0].pod = Some("trainer".into());
        g.processes.push(process(1));
        let (key, _) = check(0, &g).expect_err("duplicate");
        assert_eq!(key, "simulator.gpus[0].processes[1].pid");
    }
}
