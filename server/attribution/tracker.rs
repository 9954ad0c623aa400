//! The join: NVML's process lists and MIG instances, the host's records of
//! each pid, and the kubelet's allocations, made into what the wire shows
//! per GPU, plus the changes of who uses each GPU as events.
//!
//! Owns the attribution thread. The sampler hands it each slow reading's
//! process lists ([`Tracker::submit`], never blocking: a refresh still
//! running makes the next one wait for the following slow tick) and reads
//! the latest [`View`] when it builds a frame. All the work — reading
//! `/proc`, asking the kubelet, joining, diffing — happens on that thread,
//! on the slow cadence, never on the sampling loop.
//!
//! The join rules:
//! - a process's device is its MIG instance when it runs in one, else its
//!   GPU;
//! - a process in a Kubernetes container (a `kubepods` cgroup) whose record
//!   names no pod gets the pod whose container the kubelet allocated that
//!   device to, when exactly one container holds it (with several, say
//!   time-sliced GPUs, the records cannot tell which is whose, so none is
//!   guessed);
//! - an allocation is idle when no process of its container runs on any
//!   of its devices on this GPU.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex, PoisonError,
        mpsc::{self, SyncSender, TrySendError},
    },
    thread,
    time::SystemTime,
};

use crate::{
    api::{self, EventKind},
    backend::{MigReading, Process, ProcessKind},
    events::{Actor, EventLog, NewEvent},
};

use super::{
    podresources::device_uuid,
    Allocation, CommandLines, HostRecords, PodRef, ProcessRecord, Runtime, Unattributed,
};

/// Most ATTRIBUTION_CHANGED events one refresh records; the rest are
/// summed up in one event, so a node that churns through containers cannot
/// flood the audit trail.
pub const MAX_EVENTS_PER_REFRESH: usize = 32;

/// One GPU's slow reading, as the sampler hands it over.
#[derive(Debug, Clone)]
pub struct GpuInput {
    pub index: u32,
    pub uuid: String,
    /// When the slow reading was taken.
    pub at: SystemTime,
    pub processes: Vec<Process>,
    pub mig: Option<MigReading>,
}

/// What the wire shows of one GPU's users.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuView {
    /// The slow reading this view was made from.
    pub at: Option<SystemTime>,
    pub processes: Vec<api::GpuProcess>,
    pub allocations: Vec<api::GpuAllocation>,
}

/// The latest refresh: per GPU (by UUID) and the state of the sources.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub gpus: HashMap<String, Arc<GpuView>>,
    pub status: api::AttributionStatus,
}

impl View {
    /// The GPU's view as shared: the same `Arc` until a refresh changes it.
    pub fn gpu_arc(&self, uuid: &str) -> Option<&Arc<GpuView>> {
        self.gpus.get(uuid)
    }
}

/// Who is using a device, as one entry of the change tracking.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum User {
    Pod(PodRef),
    Slurm(String, Option<String>),
    Container(String),
    Unit(String),
}

impl User {
    /// The most specific owner the record gives; none for a plain process.
    fn of(a: &api::Attribution) -> Option<Self> {
        if let Some(p) = &a.pod {
            return Some(User::Pod(PodRef {
                namespace: p.namespace.clone(),
                pod: p.pod.clone(),
                container: p.container.clone(),
            }));
        }
        if let Some(s) = &a.slurm {
            return Some(User::Slurm(s.job_id.clone(), s.step.clone()));
        }
        if let Some(c) = &a.container_id {
            return Some(User::Container(c.clone()));
        }
        a.systemd_unit.clone().map(User::Unit)
    }

    fn describe(&self) -> String {
        match self {
            User::Pod(p) => format!("pod {}/{} (container {})", p.namespace, p.pod, p.container),
            User::Slurm(job, Some(step)) => format!("Slurm job {job} step {step}"),
            User::Slurm(job, None) => format!("Slurm job {job}"),
            User::Container(id) => format!("container {}", &id[..id.len().min(12)]),
            User::Unit(u) => format!("unit {u}"),
        }
    }

    fn change(&self, started: bool, device_id: &str, via: &str) -> api::AttributionChange {
        let mut c = api::AttributionChange {
            started,
            device_id: device_id.to_owned(),
            via: via.to_owned(),
            ..Default::default()
        };
        match self {
            User::Pod(p) => c.pod = Some(pod_wire(p)),
            User::Slurm(job, step) => {
                c.slurm = Some(api::SlurmJob {
                    job_id: job.clone(),
                    step: step.clone(),
                    uid: None,
                });
            }
            User::Container(id) => c.container_id = Some(id.clone()),
            User::Unit(u) => c.systemd_unit = Some(u.clone()),
        }
        c
    }
}

/// (GPU index, GPU uuid, device id, via) → users.
type Users = BTreeMap<(u32, String, String, &'static str), BTreeSet<User>>;

/// The join and the change tracking, without the thread (tests drive it
/// directly).
pub struct Join {
    source: Box<dyn HostRecords>,
    source_name: &'static str,
    enabled: bool,
    /// What command lines may be shown, whatever the source gives.
    command_lines: CommandLines,
    command_line_max_bytes: usize,
    events: Option<Arc<EventLog>>,
    previous: Option<Users>,
    /// Problems already logged at warn level.
    logged: BTreeSet<String>,
}

impl Join {
    pub fn new(
        source: Box<dyn HostRecords>,
        source_name: &'static str,
        enabled: bool,
        events: Option<Arc<EventLog>>,
    ) -> Self {
        Self {
            source,
            source_name,
            enabled,
            command_lines: CommandLines::Off,
            command_line_max_bytes: 0,
            events,
            previous: None,
            logged: BTreeSet::new(),
        }
    }

    /// Lets command lines through as `policy` says (off by default: a
    /// source's command lines are dropped), cut to `max_bytes`.
    pub fn command_lines(mut self, policy: CommandLines, max_bytes: usize) -> Self {
        self.command_lines = policy;
        self.command_line_max_bytes = max_bytes;
        self
    }

    /// A record with its command line as the policy allows.
    fn police(&self, mut r: ProcessRecord) -> ProcessRecord {
        r.command_line = match self.command_lines {
            CommandLines::Off => None,
            CommandLines::Redacted => r.command_line.map(|c| redact(&c)),
            CommandLines::Full => r.command_line,
        }
        .map(|mut c| {
            super::procfs::truncate_on_char_boundary(&mut c, self.command_line_max_bytes);
            c
        });
        r
    }

    fn note_problem(&mut self, problem: &str) {
        if self.logged.insert(problem.to_owned()) {
            tracing::warn!(%problem, "attribution degraded (said once per distinct problem)");
        } else {
            tracing::debug!(%problem, "attribution degraded");
        }
    }

    /// One refresh over every GPU's slow reading.
    pub fn refresh(&mut self, input: &[GpuInput]) -> View {
        let mut problems = Vec::new();
        let (allocations, kubelet) = if self.enabled {
            match self.source.allocations() {
                Ok(a) => {
                    let answered = self.source.kubelet_answered();
                    (a, answered)
                }
                Err(Unattributed { reason }) => {
                    problems.push(reason);
                    (Vec::new(), false)
                }
            }
        } else {
            (Vec::new(), false)
        };
        let mut records: HashMap<u32, Result<ProcessRecord, Unattributed>> = HashMap::new();
        if self.enabled {
            for p in input.iter().flat_map(|g| &g.processes) {
                if let std::collections::hash_map::Entry::Vacant(e) = records.entry(p.pid) {
                    let record = self.source.process(p.pid);
                    e.insert(record.map(|r| self.police(r)));
                }
            }
        }
        let mut users = Users::new();
        let mut gpus = HashMap::with_capacity(input.len());
        for g in input {
            let view = self.gpu_view(g, &allocations, &records, &mut users);
            gpus.insert(g.uuid.clone(), Arc::new(view));
        }
        // Unreadable pids are reported per process; the status names the
        // first kind of trouble so a dashboard can say why.
        let mut denied: Vec<&str> = records
            .values()
            .filter_map(|r| r.as_ref().err())
            .map(|e| e.reason.as_str())
            .filter(|r| !r.contains("no longer exists"))
            .collect();
        denied.sort_unstable();
        if let Some(first) = denied.first() {
            problems.push(format!(
                "{} process(es) could not be attributed, e.g. {first}",
                denied.len()
            ));
        }
        for p in &problems {
            self.note_problem(p);
        }
        self.announce(&users);
        View {
            gpus,
            status: api::AttributionStatus {
                enabled: self.enabled,
                source: self.source_name.to_owned(),
                kubelet,
                problem: (!problems.is_empty()).then(|| problems.join("; ")),
                allocatable_devices: self.source.allocatable_devices(),
            },
        }
    }

    fn gpu_view(
        &self,
        g: &GpuInput,
        allocations: &[Allocation],
        records: &HashMap<u32, Result<ProcessRecord, Unattributed>>,
        users: &mut Users,
    ) -> GpuView {
        let mig_uuids: Vec<&str> = g
            .mig
            .iter()
            .flat_map(|m| &m.instances)
            .map(|i| i.uuid.as_str())
            .collect();
        // Device plugins that share a GPU (time-slicing) name it
        // `GPU-…::N`; that is still this GPU.
        let on_this_gpu = |id: &str| {
            let id = device_uuid(id);
            id.eq_ignore_ascii_case(&g.uuid) || mig_uuids.iter().any(|m| m.eq_ignore_ascii_case(id))
        };
        // The allocations of this GPU's devices.
        let mine: Vec<(&Allocation, Vec<&str>)> = allocations
            .iter()
            .filter_map(|a| {
                let ids: Vec<&str> = a
                    .device_ids
                    .iter()
                    .map(String::as_str)
                    .filter(|id| on_this_gpu(id))
                    .collect();
                (!ids.is_empty()).then_some((a, ids))
            })
            .collect();
        let holders = |device: &str| -> Vec<&Allocation> {
            mine.iter()
                .filter(|(_, ids)| {
                    ids.iter()
                        .any(|id| device_uuid(id).eq_ignore_ascii_case(device))
                })
                .map(|(a, _)| *a)
                .collect()
        };
        let processes: Vec<api::GpuProcess> = g
            .processes
            .iter()
            .map(|p| {
                let device = p.mig_uuid.as_deref().unwrap_or(&g.uuid);
                let mut wire = process_wire(p, records.get(&p.pid));
                if let Some(a) = wire.attribution.as_mut()
                    && a.pod.is_none()
                    && a.pod_uid.is_some()
                    && let [only] = holders(device).as_slice()
                {
                    a.pod = Some(pod_wire(&only.pod));
                }
                if let Some(user) = wire.attribution.as_ref().and_then(User::of) {
                    users
                        .entry((g.index, g.uuid.clone(), device.to_owned(), "process"))
                        .or_default()
                        .insert(user);
                }
                wire
            })
            .collect();
        let allocations = mine
            .iter()
            .map(|(a, ids)| {
                let pod = pod_wire(&a.pod);
                let busy = processes.iter().any(|p| {
                    let device = p.mig_uuid.as_deref().unwrap_or(&g.uuid);
                    ids.iter()
                        .any(|id| device_uuid(id).eq_ignore_ascii_case(device))
                        && p.attribution.as_ref().and_then(|x| x.pod.as_ref()) == Some(&pod)
                });
                for id in ids {
                    users
                        .entry((g.index, g.uuid.clone(), (*id).to_owned(), "allocation"))
                        .or_default()
                        .insert(User::Pod(a.pod.clone()));
                }
                api::GpuAllocation {
                    pod: Some(pod),
                    resource_name: a.resource_name.clone(),
                    device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
                    idle: !busy,
                }
            })
            .collect();
        GpuView {
            at: Some(g.at),
            processes,
            allocations,
        }
    }

    /// Records who started and stopped using each device since the last
    /// refresh (the first refresh announces who is there).
    fn announce(&mut self, now: &Users) {
        let empty = BTreeSet::new();
        let previous = self.previous.take();
        let mut changes = Vec::new();
        let keys: BTreeSet<_> = now
            .keys()
            .chain(previous.iter().flat_map(|p| p.keys()))
            .cloned()
            .collect();
        for key in keys {
            let before = previous.as_ref().and_then(|p| p.get(&key)).unwrap_or(&empty);
            let after = now.get(&key).unwrap_or(&empty);
            for u in after.difference(before) {
                changes.push((key.clone(), u.clone(), true));
            }
            for u in before.difference(after) {
                changes.push((key.clone(), u.clone(), false));
            }
        }
        self.previous = Some(now.clone());
        let Some(events) = &self.events else {
            return;
        };
        let total = changes.len();
        for ((index, uuid, device, via), user, started) in changes.iter().take(MAX_EVENTS_PER_REFRESH)
        {
            let what = user.describe();
            let on = if device.eq_ignore_ascii_case(uuid) {
                format!("GPU {index}")
            } else {
                format!("MIG instance {device} of GPU {index}")
            };
            let reason = match (*via, *started) {
                ("allocation", true) => format!("{what} was allocated {on}"),
                ("allocation", false) => format!("{what} no longer holds {on}"),
                (_, true) => format!("{what} started using {on}"),
                (_, false) => format!("{what} stopped using {on}"),
            };
            events.record(
                NewEvent::new(EventKind::AttributionChanged, Actor::daemon(), reason)
                    .gpu(*index, uuid)
                    .attribution(user.change(*started, device, via)),
            );
        }
        if total > MAX_EVENTS_PER_REFRESH {
            events.record(NewEvent::new(
                EventKind::AttributionChanged,
                Actor::daemon(),
                format!(
                    "{} more changes of who uses the GPUs in one refresh, not listed one by one",
                    total - MAX_EVENTS_PER_REFRESH
                ),
            ));
        }
    }
}

/// A command line with secret-looking values replaced (the host source
/// redacts as it reads; this covers sources that hand over whole lines,
/// such as the simulator's).
fn redact(line: &str) -> String {
    let args: Vec<&str> = line.split_whitespace().collect();
    super::procfs::redact_args(&args).join(" ")
}

fn pod_wire(p: &super::PodRef) -> api::PodRef {
    api::PodRef {
        namespace: p.namespace.clone(),
        pod: p.pod.clone(),
        container: p.container.clone(),
    }
}

fn runtime_wire(r: Runtime) -> api::ContainerRuntime {
    match r {
        Runtime::Containerd => api::ContainerRuntime::Containerd,
        Runtime::CriO => api::ContainerRuntime::Crio,
        Runtime::Docker => api::ContainerRuntime::Docker,
        Runtime::Podman => api::ContainerRuntime::Podman,
    }
}

/// A process as NVML gave it, with the host's record where there is one.
pub fn process_wire(
    p: &Process,
    record: Option<&Result<ProcessRecord, Unattributed>>,
) -> api::GpuProcess {
    let mut wire = api::GpuProcess {
        pid: p.pid,
        used_memory_bytes: p.used_memory_bytes,
        kind: match p.kind {
            ProcessKind::Compute => api::ProcessKind::Compute,
            ProcessKind::Graphics => api::ProcessKind::Graphics,
            ProcessKind::ComputeAndGraphics => api::ProcessKind::ComputeAndGraphics,
        } as i32,
        utilization: p.utilization.map(|u| api::ProcessUtilization {
            sm_pct: u.sm_pct,
            memory_pct: u.memory_pct,
            encoder_pct: u.encoder_pct,
            decoder_pct: u.decoder_pct,
        }),
        mig_uuid: p.mig_uuid.clone(),
        ..Default::default()
    };
    match record {
        None => {}
        Some(Err(e)) => {
            wire.attribution = Some(api::Attribution {
                unattributed_reason: Some(e.reason.clone()),
                ..Default::default()
            });
        }
        Some(Ok(r)) => {
            wire.name = r.name.clone();
            wire.command_line = r.command_line.clone();
            wire.uid = r.uid;
            wire.user = r.user.clone();
            let o = &r.owner;
            wire.attribution = Some(api::Attribution {
                container_id: o.container.as_ref().map(|c| c.id.clone()),
                container_runtime: o
                    .container
                    .as_ref()
                    .map_or(api::ContainerRuntime::Unspecified, |c| runtime_wire(c.runtime))
                    as i32,
                systemd_unit: o.systemd_unit.clone(),
                slurm: o.slurm.as_ref().map(|s| api::SlurmJob {
                    job_id: s.job_id.clone(),
                    step: s.step.clone(),
                    uid: s.uid,
                }),
                pod: o.pod.as_ref().map(pod_wire),
                pod_uid: o.pod_uid.clone(),
                cgroup: r.cgroup.clone(),
                unattributed_reason: None,
            });
        }
    }
    wire
}

/// The attribution thread's handle.
#[derive(Debug, Clone)]
pub struct Tracker {
    tx: SyncSender<Vec<GpuInput>>,
    view: Arc<Mutex<Arc<View>>>,
}

impl Tracker {
    /// Starts the thread over `join`.
    pub fn spawn(mut join: Join) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Vec<GpuInput>>(1);
        let status = api::AttributionStatus {
            enabled: join.enabled,
            source: join.source_name.to_owned(),
            kubelet: false,
            problem: None,
            allocatable_devices: None,
        };
        let view = Arc::new(Mutex::new(Arc::new(View {
            gpus: HashMap::new(),
            status,
        })));
        let out = view.clone();
        thread::Builder::new()
            .name("gpuwatch-attribution".into())
            .spawn(move || {
                while let Ok(input) = rx.recv() {
                    let next = Arc::new(join.refresh(&input));
                    *out.lock().unwrap_or_else(PoisonError::into_inner) = next;
                }
            })?;
        Ok(Self { tx, view })
    }

    /// Hands over one slow reading of every GPU; never blocks. Returns
    /// false when the previous refresh is still queued (this one is
    /// dropped; the next slow tick brings a newer one).
    pub fn submit(&self, input: Vec<GpuInput>) -> bool {
        match self.tx.try_send(input) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::debug!("attribution refresh still running; skipping this slow tick");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// The latest view.
    pub fn view(&self) -> Arc<View> {
        self.view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        attribution::{Container, Owner},
        backend::MigInstance,
    };

    /// Host records from a table; allocations as given (or a failure).
    struct Table {
        records: HashMap<u32, ProcessRecord>,
        allocations: Result<Vec<Allocation>, Unattributed>,
    }

    impl HostRecords for Table {
        fn process(&mut self, pid: u32) -> Result<ProcessRecord, Unattributed> {
            self.records.get(&pid).cloned().ok_or(Unattributed {
                reason: format!("cannot read /proc/{pid}/cgroup: permission denied"),
            })
        }
        fn allocations(&mut self) -> Result<Vec<Allocation>, Unattributed> {
            self.allocations.clone()
        }
    }

    fn pod(ns: &str, name: &str, c: &str) -> PodRef {
        PodRef {
            namespace: ns.into(),
            pod: name.into(),
            container: c.into(),
        }
    }

    fn in_pod(pid: u32, uid: &str) -> ProcessRecord {
        ProcessRecord {
            pid,
            name: Some("python3".into()),
            owner: Owner {
                container: Some(Container {
                    id: "ab".repeat(32),
                    runtime: Runtime::Containerd,
                }),
                pod_uid: Some(uid.into()),
                ..Owner::default()
            },
            ..ProcessRecord::default()
        }
    }

    fn proc_on(pid: u32, mig: Option<&str>) -> Process {
        Process {
            pid,
            used_memory_bytes: Some(1 << 30),
            mig_uuid: mig.map(str::to_owned),
            ..Process::default()
        }
    }

    fn input(processes: Vec<Process>, mig: Option<MigReading>) -> Vec<GpuInput> {
        vec![GpuInput {
            index: 3,
            uuid: "GPU-aaaa".into(),
            at: SystemTime::UNIX_EPOCH,
            processes,
            mig,
        }]
    }

    fn alloc(p: PodRef, ids: &[&str]) -> Allocation {
        Allocation {
            pod: p,
            resource_name: "nvidia.com/gpu".into(),
            device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn a_pod_process_is_joined_by_device_and_an_unused_allocation_is_idle() {
        let table = Table {
            records: HashMap::from([(10, in_pod(10, "uid-1"))]),
            allocations: Ok(vec![
                alloc(pod("ml", "trainer", "main"), &["GPU-aaaa", "GPU-other"]),
                alloc(pod("ml", "idle", "c"), &["MIG-x"]),
                alloc(pod("ml", "elsewhere", "c"), &["GPU-other"]),
            ]),
        };
        let mig = MigReading {
            enabled: true,
            instances: vec![MigInstance {
                uuid: "MIG-x".into(),
                ..MigInstance::default()
            }],
        };
        let mut join = Join::new(Box::new(table), "host", true, None);
        let view = join.refresh(&input(vec![proc_on(10, None)], Some(mig)));
        let g = view.gpu_arc("GPU-aaaa").expect("gpu");
        let a = g.processes[0].attribution.as_ref().expect("attributed");
        assert_eq!(a.pod.as_ref().map(|p| p.pod.as_str()), Some("trainer"));
        let allocs: Vec<_> = g
            .allocations
            .iter()
            .map(|a| (a.pod.as_ref().expect("pod").pod.as_str(), a.idle, a.device_ids.clone()))
            .collect();
        assert_eq!(
            allocs,
            vec![
                ("trainer", false, vec!["GPU-aaaa".to_owned()]),
                ("idle", true, vec!["MIG-x".to_owned()]),
            ],
            "only this GPU's devices, the unused one idle"
        );
        assert!(view.status.kubelet);
        assert_eq!(view.status.problem, None);
    }

    #[test]
    fn time_sliced_device_ids_are_this_gpu() {
        let table = Table {
            records: HashMap::from([(10, in_pod(10, "uid-1"))]),
            allocations: Ok(vec![alloc(pod("ml", "t", "main"), &["GPU-aaaa::3"])]),
        };
        let mut join = Join::new(Box::new(table), "host", true, None);
        let view = join.refresh(&input(vec![proc_on(10, None)], None));
        let g = view.gpu_arc("GPU-aaaa").expect("gpu");
        assert_eq!(g.allocations.len(), 1);
        assert!(!g.allocations[0].idle);
        assert_eq!(
            g.processes[0].attribution.as_ref().and_then(|a| a.pod.as_ref()).map(|p| p.pod.as_str()),
            Some("t")
        );
    }

    #[test]
    fn a_device_shared_by_two_pods_is_not_guessed() {
        let table = Table {
            records: HashMap::from([(10, in_pod(10, "uid-1"))]),
            allocations: Ok(vec![
                alloc(pod("a", "p1", "c"), &["GPU-aaaa"]),
                alloc(pod("b", "p2", "c"), &["GPU-aaaa"]),
            ]),
        };
        let mut join = Join::new(Box::new(table), "host", true, None);
        let view = join.refresh(&input(vec![proc_on(10, None)], None));
        let g = view.gpu_arc("GPU-aaaa").expect("gpu");
        let a = g.processes[0].attribution.as_ref().expect("record");
        assert_eq!(a.pod, None);
        assert!(g.allocations.iter().all(|a| a.idle));
    }

    #[test]
    fn a_host_process_on_an_allocated_gpu_is_not_given_the_pod() {
        let host = ProcessRecord {
            pid: 11,
            name: Some("nvidia-smi".into()),
            ..ProcessRecord::default()
        };
        let table = Table {
            records: HashMap::from([(11, host)]),
            allocations: Ok(vec![alloc(pod("a", "p1", "c"), &["GPU-aaaa"])]),
        };
        let mut join = Join::new(Box::new(table), "host", true, None);
        let view = join.refresh(&input(vec![proc_on(11, None)], None));
        let g = view.gpu_arc("GPU-aaaa").expect("gpu");
        assert_eq!(g.processes[0].attribution.as_ref().and_then(|a| a.pod.clone()), None);
        assert!(g.allocations[0].idle, "a foreign process does not make the pod busy");
    }

    #[test]
    fn failures_degrade_to_reasons_per_process_and_in_the_status() {
        let table = Table {
            records: HashMap::new(),
            allocations: Err(Unattributed {
                reason: "kubelet socket /k.sock: connection refused".into(),
            }),
        };
        let mut join = Join::new(Box::new(table), "host", true, None);
        let view = join.refresh(&input(vec![proc_on(12, None)], None));
        let g = view.gpu_arc("GPU-aaaa").expect("gpu");
        let reason = g.processes[0]
            .attribution
            .as_ref()
            .and_then(|a| a.unattributed_reason.clone())
            .expect("reason");
        assert!(reason.contains("/proc/12/cgroup"), "{reason}");
        assert_eq!(g.processes[0].name, None, "nothing made up");
        let problem = view.status.problem.expect("problem");
        assert!(problem.contains("connection refused") && problem.contains("1 process"), "{problem}");
        assert!(!view.status.kubelet);
    }

    #[test]
    fn disabled_attribution_reads_nothing_and_keeps_nvml_facts() {
        let table = Table {
            records: HashMap::from([(10, in_pod(10, "u"))]),
            allocations: Ok(vec![alloc(pod("a", "p", "c"), &["GPU-aaaa"])]),
        };
        let mut join = Join::new(Box::new(table), "host", false, None);
        let view = join.refresh(&input(vec![proc_on(10, None)], None));
        let g = view.gpu_arc("GPU-aaaa").expect("gpu");
        assert_eq!(g.processes[0].attribution, None);
        assert_eq!(g.processes[0].used_memory_bytes, Some(1 << 30));
        assert!(g.allocations.is_empty());
        assert!(!view.status.enabled);
    }
}
