//! Who is using each GPU: the host's own records joined to the processes
//! NVML lists. Owns the types every consumer of attribution shares (the
//! sampler's join, the wire mapping, the metrics, the events) and the
//! [`HostRecords`] seam with its two sources: the host itself (`/proc`,
//! the cgroup tree, the kubelet's pod-resources API: see `host`) and the
//! simulator's declared workloads.
//!
//! Attribution runs on the slow cadence, off the sampling loop; a source
//! that cannot answer (no permission, no socket) degrades to
//! [`Unattributed`] with the reason, never to an error loop.

pub mod cgroup;
#[cfg(any(test, feature = "testing"))]
pub mod fixture;
pub mod host;
pub mod podresources;
pub mod procfs;
pub mod tracker;

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

/// The container runtime a cgroup path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
}

/// A container a process runs in, from its cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Container {
    /// The full 64-hex container id.
    pub id: String,
    pub runtime: Runtime,
}

/// A Slurm job step a process belongs to, from the `slurm` cgroup
/// hierarchy (`…/slurm/uid_<uid>/job_<id>/step_<step>/…` on cgroup v1,
/// `…/slurmstepd.scope/job_<id>/step_<step>/…` on v2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlurmJob {
    pub job_id: String,
    /// `0`, `1`, … or `batch`, `extern`, `interactive`.
    pub step: Option<String>,
    /// The job owner's uid, where the path carries it (cgroup v1).
    pub uid: Option<u32>,
}

/// A Kubernetes container, by the names the API server knows it by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// Who owns a process, as far as the host's records say. Every part is
/// independent: a process can be in a container of a pod, under a systemd
/// unit, in a Slurm step, or none of these.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Owner {
    pub container: Option<Container>,
    /// The systemd unit (service or scope) the cgroup is under.
    pub systemd_unit: Option<String>,
    pub slurm: Option<SlurmJob>,
    /// The pod, when the GPU the process runs on is allocated to a pod
    /// whose container it is (joined by device through pod-resources).
    pub pod: Option<PodRef>,
    /// The pod's UID from a `kubepods` cgroup path, when there is one.
    pub pod_uid: Option<String>,
}

/// What the host says about one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessRecord {
    pub pid: u32,
    /// `/proc/<pid>/comm`.
    pub name: Option<String>,
    /// The command line, bounded and redacted as configured; `None` when
    /// the configuration keeps command lines off (the default).
    pub command_line: Option<String>,
    pub uid: Option<u32>,
    /// The user name for `uid`, from the host's passwd file.
    pub user: Option<String>,
    /// The process's cgroup path (the v2 unified path, or the v1 path of
    /// the first hierarchy that names a container, job or unit).
    pub cgroup: Option<String>,
    pub owner: Owner,
}

/// One device allocation the kubelet reports: a container holding GPUs
/// (GPU or MIG UUIDs) whether or not it runs a process on them yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Allocation {
    pub pod: PodRef,
    /// The extended resource, e.g. `nvidia.com/gpu`, `nvidia.com/mig-1g.10gb`.
    pub resource_name: String,
    /// Device ids as the device plugin reports them (GPU or MIG UUIDs).
    pub device_ids: Vec<String>,
}

/// Why a record could not be had.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Unattributed {
    /// In words, naming the path or socket and the error, e.g.
    /// "cannot read /proc/4100/cgroup: permission denied".
    pub reason: String,
}

impl std::fmt::Display for Unattributed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Unattributed {}

/// A source of the host's records. `host::HostSource` reads the host (or a
/// fixture tree); the simulator declares its workloads through the same
/// seam. Called from one thread on the slow cadence; may block briefly.
pub trait HostRecords: Send {
    /// What the host says about `pid` (`pid` as NVML reports it: the host's
    /// pid namespace).
    fn process(&mut self, pid: u32) -> Result<ProcessRecord, Unattributed>;
    /// The kubelet's device allocations, `Ok(vec![])` where there is no
    /// kubelet configured.
    fn allocations(&mut self) -> Result<Vec<Allocation>, Unattributed>;
    /// Whether the last `allocations` came from a kubelet that answered
    /// (false where there is none).
    fn kubelet_answered(&self) -> bool {
        true
    }
    /// How many NVIDIA devices the kubelet can allocate on this node, where
    /// it says (`GetAllocatableResources`).
    fn allocatable_devices(&self) -> Option<u32> {
        None
    }
}

/// What to do with command lines, which carry secrets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandLines {
    /// Never read (the default).
    #[default]
    Off,
    /// Read, with the values of arguments that look like secrets replaced
    /// (`--token=…`, `--password …`, `KEY=…` for secret-like keys, URLs'
    /// userinfo).
    Redacted,
    /// Read as they are (still bounded, still only for callers with the
    /// read role).
    Full,
}

/// Where the records come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The host on NVML; on simulated GPUs the simulator's declared
    /// workloads, unless a root or the socket is configured (then the host:
    /// a fixture tree with simulated GPUs).
    #[default]
    Auto,
    Host,
    Simulator,
}

/// `[attribution]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AttributionConfig {
    /// Attribute processes at all.
    pub enabled: bool,
    pub source: Source,
    /// The host's `/proc` (a fixture tree in tests).
    pub proc_root: PathBuf,
    /// The host's cgroup mount.
    pub cgroup_root: PathBuf,
    /// The passwd file for uid → user names.
    pub passwd_file: PathBuf,
    /// The kubelet's pod-resources socket; empty turns the kubelet off.
    pub pod_resources_socket: PathBuf,
    /// How long one pod-resources call may take.
    #[serde(with = "humantime_serde")]
    pub pod_resources_timeout: Duration,
    pub command_lines: CommandLines,
    /// Command lines are cut to this many bytes (on a char boundary).
    pub command_line_max_bytes: usize,
}

impl AttributionConfig {
    /// True when a root or the kubelet socket differs from the defaults.
    pub fn names_host_paths(&self) -> bool {
        let d = Self::default();
        self.proc_root != d.proc_root
            || self.cgroup_root != d.cgroup_root
            || self.passwd_file != d.passwd_file
            || self.pod_resources_socket != d.pod_resources_socket
    }

    /// Whether the host's records are read (else the simulator's).
    pub fn reads_host(&self, simulated: bool) -> bool {
        match self.source {
            Source::Host => true,
            Source::Simulator => false,
            Source::Auto => !simulated || self.names_host_paths(),
        }
    }
}

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            source: Source::Auto,
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            passwd_file: PathBuf::from("/etc/passwd"),
            pod_resources_socket: PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock"),
            pod_resources_timeout: Duration::from_secs(2),
            command_lines: CommandLines::Off,
            command_line_max_bytes: 256,
        }
    }
}

/// The host's records, as `config` says where to read them.
pub fn host_records(config: &AttributionConfig) -> Box<dyn HostRecords> {
    Box::new(host::HostSource::new(config))
}
