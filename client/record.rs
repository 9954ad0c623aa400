//! The client's JSON vocabulary: one flat object per GPU sample, device,
//! event or control result, plus host-state and gap objects.
//!
//! These shapes are what polling scripts parse, so they are spelled out as
//! types here and documented in docs/client.md. Rules: units live in key
//! names; numbers are exact (watts are milliwatts / 1000, MiB are bytes /
//! 2^20, printed as integers when whole); enum values are the contract's
//! names without their prefix, in lower case; a metric the GPU does not
//! report is absent, never 0.

use gpuwatch_api::names;
use std::time::{Duration, SystemTime};

use gpuwatch_api::{self as api, DeviceInfo, Event, Gap, GovernorState, GpuSample};
use serde::Serialize;

use crate::connect::HostFailure;

/// A quotient printed exactly: an integer when it divides, else the nearest
/// double (which prints as the shortest decimal that reads back the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exact {
    num: u64,
    den: u64,
}

impl Exact {
    pub fn watts(mw: u32) -> Self {
        Self {
            num: u64::from(mw),
            den: 1000,
        }
    }

    pub fn mib(bytes: u64) -> Self {
        Self {
            num: bytes,
            den: 1 << 20,
        }
    }

    pub fn as_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

impl Serialize for Exact {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.num.is_multiple_of(self.den) {
            s.serialize_u64(self.num / self.den)
        } else {
            s.serialize_f64(self.as_f64())
        }
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-22T12:30:05.123Z`.
pub fn rfc3339(t: &prost_types::Timestamp) -> Option<String> {
    let t = SystemTime::try_from(*t).ok()?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}

/// Now, in the same format.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One GPU sample.
#[derive(Debug, Serialize)]
pub struct SampleRecord<'a> {
    pub host: &'a str,
    pub index: u32,
    pub uuid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub age_ms: u64,
    pub health: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fan_speed_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_limit_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforced_power_limit_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_mj: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graphics_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_graphics_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sm_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_gpu_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_memory_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_mib: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_total_mib: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub performance_state: Option<u32>,
    /// Present (possibly empty) when the GPU reports throttle reasons.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_reasons: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_reasons_mask: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pcie_tx_kbps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pcie_rx_kbps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecc: Option<EccRecord>,
    /// Present when the GPU reports processes (read on the slow cadence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<ProcessRecord<'a>>>,
    /// Present when the GPU reports its MIG mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mig_instances: Vec<MigInstanceRecord<'a>>,
    /// The kubelet's allocations of this GPU; absent when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allocations: Vec<AllocationRecord<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub governor_state: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EccRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_volatile: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncorrected_volatile: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_aggregate: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncorrected_aggregate: Option<u64>,
}

/// One process on a GPU, with who owns it.
#[derive(Debug, Serialize)]
pub struct ProcessRecord<'a> {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_memory_mib: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// Only when the daemon is configured to read command lines and the
    /// caller has the read role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_line: Option<&'a str>,
    /// `compute`, `graphics` or `compute_and_graphics`; absent when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sm_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder_pct: Option<u32>,
    /// The MIG instance it runs in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_uuid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<AttributionRecord<'a>>,
}

/// Who owns a process, every part the host's records gave (absent parts
/// are absent). `owner` and `owner_kind` are the most specific of them,
/// as the tables show it.
#[derive(Debug, Default, Serialize)]
pub struct AttributionRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// `pod`, `slurm`, `container` or `unit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<&'a str>,
    /// `containerd`, `crio`, `docker` or `podman`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_runtime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slurm_step: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slurm_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unattributed_reason: Option<&'a str>,
}

impl<'a> AttributionRecord<'a> {
    pub fn new(a: &'a api::Attribution) -> Self {
        let owner = crate::owner::owner(a);
        let runtime = match api::ContainerRuntime::try_from(a.container_runtime) {
            Ok(api::ContainerRuntime::Unspecified) => None,
            _ => Some(names::name_of::<api::ContainerRuntime>(a.container_runtime)),
        };
        AttributionRecord {
            owner_kind: owner.as_ref().map(|(k, _)| k.as_str()),
            owner: owner.map(|(_, o)| o),
            namespace: a.pod.as_ref().map(|p| p.namespace.as_str()),
            pod: a.pod.as_ref().map(|p| p.pod.as_str()),
            container: a.pod.as_ref().map(|p| p.container.as_str()),
            pod_uid: a.pod_uid.as_deref(),
            container_id: a.container_id.as_deref(),
            container_runtime: runtime,
            systemd_unit: a.systemd_unit.as_deref(),
            slurm_job: a.slurm.as_ref().map(|j| j.job_id.as_str()),
            slurm_step: a.slurm.as_ref().and_then(|j| j.step.as_deref()),
            slurm_uid: a.slurm.as_ref().and_then(|j| j.uid),
            cgroup: a.cgroup.as_deref(),
            unattributed_reason: a.unattributed_reason.as_deref(),
        }
    }
}

/// A process kind's name, absent for UNSPECIFIED.
fn process_kind(kind: i32) -> Option<String> {
    match api::ProcessKind::try_from(kind) {
        Ok(api::ProcessKind::Unspecified) => None,
        _ => Some(names::name_of::<api::ProcessKind>(kind)),
    }
}

impl<'a> ProcessRecord<'a> {
    pub fn new(p: &'a api::GpuProcess) -> Self {
        let u = p.utilization.unwrap_or_default();
        ProcessRecord {
            pid: p.pid,
            used_memory_mib: p.used_memory_bytes.map(Exact::mib),
            name: p.name.as_deref(),
            command_line: p.command_line.as_deref(),
            kind: process_kind(p.kind),
            uid: p.uid,
            user: p.user.as_deref(),
            sm_pct: u.sm_pct,
            memory_pct: u.memory_pct,
            encoder_pct: u.encoder_pct,
            decoder_pct: u.decoder_pct,
            mig_uuid: p.mig_uuid.as_deref(),
            attribution: p.attribution.as_ref().map(AttributionRecord::new),
        }
    }
}

/// One MIG instance of a GPU in MIG mode.
#[derive(Debug, Serialize)]
pub struct MigInstanceRecord<'a> {
    pub mig_uuid: &'a str,
    pub profile: &'a str,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sm_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_mib: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_total_mib: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_gpu_pct: Option<u32>,
    pub pids: &'a [u32],
}

impl<'a> MigInstanceRecord<'a> {
    pub fn new(m: &'a api::MigInstance) -> Self {
        MigInstanceRecord {
            mig_uuid: &m.uuid,
            profile: &m.profile,
            gpu_instance_id: m.gpu_instance_id,
            compute_instance_id: m.compute_instance_id,
            sm_count: m.sm_count,
            memory_used_mib: m.memory_used_bytes.map(Exact::mib),
            memory_total_mib: m.memory_total_bytes.map(Exact::mib),
            utilization_gpu_pct: m.utilization_gpu_pct,
            pids: &m.pids,
        }
    }
}

/// A container the kubelet allocated this GPU (or its MIG instances) to.
#[derive(Debug, Serialize)]
pub struct AllocationRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a str>,
    pub resource_name: &'a str,
    pub device_ids: &'a [String],
    /// Allocated, but none of its processes runs on the device.
    pub idle: bool,
}

impl<'a> AllocationRecord<'a> {
    pub fn new(a: &'a api::GpuAllocation) -> Self {
        AllocationRecord {
            namespace: a.pod.as_ref().map(|p| p.namespace.as_str()),
            pod: a.pod.as_ref().map(|p| p.pod.as_str()),
            container: a.pod.as_ref().map(|p| p.container.as_str()),
            resource_name: &a.resource_name,
            device_ids: &a.device_ids,
            idle: a.idle,
        }
    }
}

impl<'a> SampleRecord<'a> {
    /// `fallback_time` (the frame's) is used when the sample has none.
    pub fn new(
        host: &'a str,
        name: Option<&'a str>,
        s: &'a GpuSample,
        fallback_time: Option<&prost_types::Timestamp>,
    ) -> Self {
        let governor_state = match GovernorState::try_from(s.governor_state) {
            Ok(GovernorState::Unspecified) => None,
            _ => Some(names::name_of::<gpuwatch_api::GovernorState>(
                s.governor_state,
            )),
        };
        SampleRecord {
            host,
            index: s.index,
            uuid: &s.uuid,
            name,
            seq: s.seq,
            time: s.time.as_ref().or(fallback_time).and_then(rfc3339),
            age_ms: s.age_ms,
            health: names::name_of::<gpuwatch_api::GpuHealth>(s.health),
            error: s.error.as_deref(),
            temperature_c: s.temperature_c,
            memory_temperature_c: s.memory_temperature_c,
            fan_speed_pct: s.fan_speed_pct,
            power_w: s.power_draw_mw.map(Exact::watts),
            power_limit_w: s.power_limit_mw.map(Exact::watts),
            enforced_power_limit_w: s.enforced_power_limit_mw.map(Exact::watts),
            energy_mj: s.energy_mj,
            graphics_clock_mhz: s.graphics_clock_mhz,
            sm_clock_mhz: s.sm_clock_mhz,
            memory_clock_mhz: s.memory_clock_mhz,
            video_clock_mhz: s.video_clock_mhz,
            max_graphics_clock_mhz: s.max_graphics_clock_mhz,
            max_sm_clock_mhz: s.max_sm_clock_mhz,
            max_memory_clock_mhz: s.max_memory_clock_mhz,
            utilization_gpu_pct: s.utilization_gpu_pct,
            utilization_memory_pct: s.utilization_memory_pct,
            memory_used_mib: s.memory_used_bytes.map(Exact::mib),
            memory_total_mib: s.memory_total_bytes.map(Exact::mib),
            performance_state: s.performance_state,
            throttle_reasons: s.throttle_reasons_mask.map(|_| {
                s.throttle_reasons
                    .iter()
                    .map(|r| names::name_of::<gpuwatch_api::ThrottleReason>(*r))
                    .collect()
            }),
            throttle_reasons_mask: s.throttle_reasons_mask,
            pcie_tx_kbps: s.pcie_tx_kbps,
            pcie_rx_kbps: s.pcie_rx_kbps,
            ecc: s.ecc.as_ref().map(|e| EccRecord {
                corrected_volatile: e.corrected_volatile,
                uncorrected_volatile: e.uncorrected_volatile,
                corrected_aggregate: e.corrected_aggregate,
                uncorrected_aggregate: e.uncorrected_aggregate,
            }),
            processes: s
                .processes_time
                .map(|_| s.processes.iter().map(ProcessRecord::new).collect()),
            mig_enabled: s.mig_enabled,
            mig_instances: s.mig_instances.iter().map(MigInstanceRecord::new).collect(),
            allocations: s.allocations.iter().map(AllocationRecord::new).collect(),
            governor_state,
        }
    }
}

/// One `ps` row: a process on a GPU (or MIG instance), or an allocation
/// that runs nothing there (`row: "allocation"`, no pid, `idle: true`).
/// Flat, so `jq 'select(.namespace == "ml")'` works; the attribution parts
/// are the same keys as in a snapshot's `processes[].attribution`.
#[derive(Debug, Serialize)]
pub struct PsRecord<'a> {
    pub host: &'a str,
    /// `process` or `allocation`.
    pub row: &'static str,
    pub gpu_index: u32,
    pub gpu_uuid: &'a str,
    /// The GPU's UUID, or the MIG instance's.
    pub device_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_uuid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_profile: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_line: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_memory_mib: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sm_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder_pct: Option<u32>,
    #[serde(flatten)]
    pub attribution: AttributionRecord<'a>,
    /// On allocation rows: the extended resource (`nvidia.com/gpu`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<&'a str>,
    /// On allocation rows: allocated but running nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<bool>,
}

impl<'a> PsRecord<'a> {
    /// A process row; `mig` is the instance it runs in.
    pub fn process(
        host: &'a str,
        s: &'a GpuSample,
        mig: Option<&'a api::MigInstance>,
        p: &'a api::GpuProcess,
    ) -> Self {
        let u = p.utilization.unwrap_or_default();
        PsRecord {
            host,
            row: "process",
            gpu_index: s.index,
            gpu_uuid: &s.uuid,
            device_id: mig.map_or(&s.uuid, |m| &m.uuid),
            mig_uuid: mig.map(|m| m.uuid.as_str()).or(p.mig_uuid.as_deref()),
            mig_profile: mig.map(|m| m.profile.as_str()),
            pid: Some(p.pid),
            name: p.name.as_deref(),
            user: p.user.as_deref(),
            uid: p.uid,
            command_line: p.command_line.as_deref(),
            kind: process_kind(p.kind),
            used_memory_mib: p.used_memory_bytes.map(Exact::mib),
            sm_pct: u.sm_pct,
            memory_pct: u.memory_pct,
            encoder_pct: u.encoder_pct,
            decoder_pct: u.decoder_pct,
            attribution: p
                .attribution
                .as_ref()
                .map(AttributionRecord::new)
                .unwrap_or_default(),
            resource_name: None,
            idle: None,
        }
    }

    /// An allocation row (an allocated-but-idle container).
    pub fn allocation(
        host: &'a str,
        s: &'a GpuSample,
        mig: Option<&'a api::MigInstance>,
        a: &'a api::GpuAllocation,
    ) -> Self {
        let attribution = AttributionRecord {
            owner: a.pod.as_ref().map(crate::owner::pod_text),
            owner_kind: a
                .pod
                .as_ref()
                .map(|_| crate::owner::OwnerKind::Pod.as_str()),
            namespace: a.pod.as_ref().map(|p| p.namespace.as_str()),
            pod: a.pod.as_ref().map(|p| p.pod.as_str()),
            container: a.pod.as_ref().map(|p| p.container.as_str()),
            ..Default::default()
        };
        PsRecord {
            host,
            row: "allocation",
            gpu_index: s.index,
            gpu_uuid: &s.uuid,
            device_id: mig.map_or(&s.uuid, |m| &m.uuid),
            mig_uuid: mig.map(|m| m.uuid.as_str()),
            mig_profile: mig.map(|m| m.profile.as_str()),
            pid: None,
            name: None,
            user: None,
            uid: None,
            command_line: None,
            kind: None,
            used_memory_mib: None,
            sm_pct: None,
            memory_pct: None,
            encoder_pct: None,
            decoder_pct: None,
            attribution,
            resource_name: Some(&a.resource_name),
            idle: Some(a.idle),
        }
    }
}

/// A host that could not be used (snapshot, list, control, events).
#[derive(Debug, Serialize)]
pub struct HostErrorRecord<'a> {
    pub host: &'a str,
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
}

impl<'a> HostErrorRecord<'a> {
    pub fn new(host: &'a str, failure: &HostFailure) -> Self {
        Self {
            host,
            error: failure.to_string(),
            code: failure.code_name(),
        }
    }
}

/// What happened to a host's connection (watch, events --follow).
#[derive(Debug, Serialize)]
pub struct HostEventRecord<'a> {
    pub host: &'a str,
    /// `connected`, `disconnected` or `reconnecting`.
    pub event: &'static str,
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// On `connected`: when the daemon started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_started: Option<String>,
    /// On `connected`: GPUs streamed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<usize>,
    /// On `connected`: the interval the daemon delivers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u32>,
    /// On `connected` after a reconnect: the stream resumes after this seq.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_after_seq: Option<u64>,
}

impl<'a> HostEventRecord<'a> {
    pub fn new(host: &'a str, event: &'static str) -> Self {
        Self {
            host,
            event,
            time: now_rfc3339(),
            error: None,
            retry_in_ms: None,
            server_started: None,
            gpus: None,
            interval_ms: None,
            resumed_after_seq: None,
        }
    }
}

/// Samples (or events) that will never be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GapRecord {
    pub first_seq: u64,
    pub last_seq: u64,
    /// `slow_subscriber`, `not_in_history`, or `unannounced` (the client saw
    /// sequence numbers jump without the daemon saying why).
    pub reason: String,
    pub missed: u64,
    pub restarted: bool,
}

impl From<&Gap> for GapRecord {
    fn from(g: &Gap) -> Self {
        GapRecord {
            first_seq: g.first_seq,
            last_seq: g.last_seq,
            reason: names::name_of::<gpuwatch_api::GapReason>(g.reason),
            missed: g.missed,
            restarted: g.restarted,
        }
    }
}

/// A gap, tagged with its host, as printed.
#[derive(Debug, Serialize)]
pub struct HostGapRecord<'a> {
    pub host: &'a str,
    pub event: &'static str,
    /// `samples` (watch) or `events` (events --follow).
    pub stream: &'static str,
    #[serde(flatten)]
    pub gap: &'a GapRecord,
}

/// One GPU's identity, limits, capabilities and policy.
#[derive(Debug, Serialize)]
pub struct DeviceRecord<'a> {
    pub host: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<&'a str>,
    pub index: u32,
    pub uuid: &'a str,
    pub name: &'a str,
    pub pci_bus_id: &'a str,
    pub health: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_min_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_max_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_default_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_limit_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforced_power_limit_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slowdown_temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_operating_temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_graphics_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sm_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_total_mib: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<CapabilitiesRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRecord<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mig_instances: Vec<MigInstanceRecord<'a>>,
    /// Where the host's attribution stands (per host, on every device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<AttributionStatusRecord<'a>>,
}

/// Whether a host can say who uses its GPUs, and what it could not read.
#[derive(Debug, Serialize)]
pub struct AttributionStatusRecord<'a> {
    pub enabled: bool,
    /// `host` or `simulator`.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub source: &'a str,
    /// The kubelet's pod-resources API answered on the last try.
    pub kubelet: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct CapabilitiesRecord {
    pub power_limit_settable: bool,
    pub gpu_clocks_lockable: bool,
    pub memory_clocks_lockable: bool,
    pub application_clocks_resettable: bool,
    pub xid_events: bool,
    pub supported_fields: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PolicyRecord<'a> {
    pub mode: String,
    pub state: String,
    #[serde(skip_serializing_if = "is_false")]
    pub dry_run: bool,
    pub threshold_c: u32,
    pub threshold_source: String,
    pub hysteresis_c: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_ceiling_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_limit_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_cap_mhz: Option<u32>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub mode_reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_action: Option<LastActionRecord<'a>>,
}

#[derive(Debug, Serialize)]
pub struct LastActionRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub description: &'a str,
    pub event_seq: u64,
}

impl<'a> PolicyRecord<'a> {
    pub fn new(p: &'a api::GpuPolicy) -> Self {
        PolicyRecord {
            mode: names::name_of::<gpuwatch_api::GovernorMode>(p.mode),
            state: names::name_of::<gpuwatch_api::GovernorState>(p.state),
            dry_run: p.dry_run,
            threshold_c: p.threshold_c,
            threshold_source: names::name_of::<gpuwatch_api::ThresholdSource>(p.threshold_source),
            hysteresis_c: p.hysteresis_c,
            floor_w: p.floor_mw.map(Exact::watts),
            ceiling_w: p.ceiling_mw.map(Exact::watts),
            operator_ceiling_w: p.operator_ceiling_mw.map(Exact::watts),
            current_limit_w: p.current_limit_mw.map(Exact::watts),
            clock_cap_mhz: p.clock_cap_mhz,
            mode_reason: &p.mode_reason,
            last_action: p.last_action.as_ref().map(|a| LastActionRecord {
                time: a.time.as_ref().and_then(rfc3339),
                description: &a.description,
                event_seq: a.event_seq,
            }),
        }
    }
}

impl<'a> DeviceRecord<'a> {
    pub fn new(host: &'a str, info: Option<&'a api::HostInfo>, d: &'a DeviceInfo) -> Self {
        let limits = d.power_limits.unwrap_or_default();
        DeviceRecord {
            host,
            hostname: info.map(|i| i.hostname.as_str()).filter(|h| !h.is_empty()),
            backend: info.map(|i| i.backend.as_str()).filter(|b| !b.is_empty()),
            driver_version: info.and_then(|i| i.driver_version.as_deref()),
            index: d.index,
            uuid: &d.uuid,
            name: &d.name,
            pci_bus_id: &d.pci_bus_id,
            health: names::name_of::<gpuwatch_api::GpuHealth>(d.health),
            power_min_w: limits.min_mw.map(Exact::watts),
            power_max_w: limits.max_mw.map(Exact::watts),
            power_default_w: limits.default_mw.map(Exact::watts),
            power_limit_w: limits
                .current_mw
                .or(d.policy.as_ref().and_then(|p| p.current_limit_mw))
                .map(Exact::watts),
            enforced_power_limit_w: limits.enforced_mw.map(Exact::watts),
            slowdown_temperature_c: d.slowdown_temperature_c,
            shutdown_temperature_c: d.shutdown_temperature_c,
            max_operating_temperature_c: d.max_operating_temperature_c,
            max_graphics_clock_mhz: d.max_graphics_clock_mhz,
            max_sm_clock_mhz: d.max_sm_clock_mhz,
            max_memory_clock_mhz: d.max_memory_clock_mhz,
            memory_total_mib: d.memory_total_bytes.map(Exact::mib),
            capabilities: d.capabilities.as_ref().map(|c| CapabilitiesRecord {
                power_limit_settable: c.power_limit_settable,
                gpu_clocks_lockable: c.gpu_clocks_lockable,
                memory_clocks_lockable: c.memory_clocks_lockable,
                application_clocks_resettable: c.application_clocks_resettable,
                xid_events: c.xid_events,
                supported_fields: c
                    .supported_fields
                    .iter()
                    .map(|f| names::name_of::<gpuwatch_api::TelemetryField>(*f))
                    .collect(),
            }),
            policy: d.policy.as_ref().map(PolicyRecord::new),
            mig_enabled: d.mig_enabled,
            mig_instances: d.mig_instances.iter().map(MigInstanceRecord::new).collect(),
            attribution: info.and_then(|i| i.attribution.as_ref()).map(|a| {
                AttributionStatusRecord {
                    enabled: a.enabled,
                    source: &a.source,
                    kubelet: a.kubelet,
                    problem: a.problem.as_deref(),
                }
            }),
        }
    }
}

/// One event from a daemon's event log.
#[derive(Debug, Serialize)]
pub struct EventRecord<'a> {
    pub host: &'a str,
    pub event: &'static str,
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub kind: String,
    pub severity: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_uuid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<&'a str>,
    pub reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_limit: Option<Change<Exact>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_lock_mhz: Option<Change<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_c: Option<Change<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hysteresis_c: Option<Change<u32>>,
    /// The node power budget before and after (W), for
    /// `power_budget_changed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_budget_w: Option<Change<f64>>,
    /// Each GPU's budget share before and after, for the budget's events.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub budget_shares: Vec<BudgetShareRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xid: Option<u64>,
    /// Who started or stopped using a device, for `attribution_changed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<AttributionChangeRecord<'a>>,
}

/// One GPU's budget share in an event, before and after (W; absent: none).
#[derive(Debug, Serialize)]
pub struct BudgetShareRecord {
    pub index: u32,
    pub uuid: String,
    pub before_w: Option<Exact>,
    pub after_w: Option<Exact>,
}

/// An `attribution_changed` event's owner and device.
#[derive(Debug, Serialize)]
pub struct AttributionChangeRecord<'a> {
    pub started: bool,
    /// The GPU or MIG UUID concerned.
    pub device_id: &'a str,
    /// `allocation` (the kubelet) or `process`.
    pub via: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slurm_step: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<&'a str>,
}

impl<'a> AttributionChangeRecord<'a> {
    pub fn new(c: &'a api::AttributionChange) -> Self {
        AttributionChangeRecord {
            started: c.started,
            device_id: &c.device_id,
            via: &c.via,
            namespace: c.pod.as_ref().map(|p| p.namespace.as_str()),
            pod: c.pod.as_ref().map(|p| p.pod.as_str()),
            container: c.pod.as_ref().map(|p| p.container.as_str()),
            slurm_job: c.slurm.as_ref().map(|j| j.job_id.as_str()),
            slurm_step: c.slurm.as_ref().and_then(|j| j.step.as_deref()),
            container_id: c.container_id.as_deref(),
            systemd_unit: c.systemd_unit.as_deref(),
        }
    }
}

/// Before and after of a changed setting (absent: unset / unlocked).
#[derive(Debug, Serialize)]
pub struct Change<T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<T>,
}

impl<'a> EventRecord<'a> {
    pub fn new(host: &'a str, e: &'a Event) -> Self {
        let mut record = EventRecord {
            host,
            event: "event",
            seq: e.seq,
            time: e.time.as_ref().and_then(rfc3339),
            kind: names::name_of::<gpuwatch_api::EventKind>(e.kind),
            severity: names::name_of::<gpuwatch_api::Severity>(e.severity),
            gpu_index: e.gpu_index,
            gpu_uuid: e.gpu_uuid.as_deref(),
            actor_kind: e
                .actor
                .as_ref()
                .map(|a| names::name_of::<gpuwatch_api::ActorKind>(a.kind)),
            actor: e.actor.as_ref().map(|a| a.name.as_str()),
            reason: &e.reason,
            power_limit: None,
            clock_lock_mhz: None,
            threshold_c: None,
            hysteresis_c: None,
            power_budget_w: None,
            budget_shares: Vec::new(),
            xid: e.xid,
            attribution: e.attribution.as_ref().map(AttributionChangeRecord::new),
        };
        match &e.change {
            Some(api::event::Change::PowerLimit(c)) => {
                record.power_limit = Some(Change {
                    before: c.before_mw.map(Exact::watts),
                    after: c.after_mw.map(Exact::watts),
                });
            }
            Some(api::event::Change::ClockLock(c)) => {
                record.clock_lock_mhz = Some(Change {
                    before: c.before_max_mhz,
                    after: c.after_max_mhz,
                });
            }
            Some(api::event::Change::Threshold(c)) => {
                if c.before_c.is_some() || c.after_c.is_some() {
                    record.threshold_c = Some(Change {
                        before: c.before_c,
                        after: c.after_c,
                    });
                }
                if c.before_hysteresis_c.is_some() || c.after_hysteresis_c.is_some() {
                    record.hysteresis_c = Some(Change {
                        before: c.before_hysteresis_c,
                        after: c.after_hysteresis_c,
                    });
                }
            }
            Some(api::event::Change::Budget(b)) => {
                if b.before_watts != b.after_watts {
                    record.power_budget_w = Some(Change {
                        before: b.before_watts,
                        after: b.after_watts,
                    });
                }
                record.budget_shares = b
                    .shares
                    .iter()
                    .map(|s| BudgetShareRecord {
                        index: s.index,
                        uuid: s.uuid.clone(),
                        before_w: s.before_mw.map(Exact::watts),
                        after_w: s.after_mw.map(Exact::watts),
                    })
                    .collect();
            }
            None => {}
        }
        record
    }
}

/// A duration in whole milliseconds, for `retry_in_ms`.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuwatch_api::{GpuHealth, ThrottleReason};

    fn json<T: Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).expect("serializes")
    }

    #[test]
    fn exact_numbers() {
        assert_eq!(json(&Exact::watts(700_000)), serde_json::json!(700));
        assert_eq!(json(&Exact::watts(612_345)).to_string(), "612.345");
        assert_eq!(json(&Exact::watts(1)).to_string(), "0.001");
        assert_eq!(json(&Exact::mib(80 << 30)), serde_json::json!(81920));
        assert_eq!(json(&Exact::mib(1 << 19)).to_string(), "0.5");
    }

    #[test]
    fn absent_metrics_are_absent_not_zero() {
        let sample = GpuSample {
            index: 1,
            uuid: "GPU-1".into(),
            seq: 42,
            time: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 5_000_000,
            }),
            health: GpuHealth::Ok as i32,
            temperature_c: Some(0),
            power_draw_mw: Some(612_345),
            governor_state: GovernorState::Idle as i32,
            ..Default::default()
        };
        let v = json(&SampleRecord::new("h", Some("GPU name"), &sample, None));
        let obj = v.as_object().expect("object");
        // A real 0 stays; what the GPU did not report is not there at all.
        assert_eq!(obj["temperature_c"], serde_json::json!(0));
        assert_eq!(obj["power_w"].to_string(), "612.345");
        for absent in [
            "memory_temperature_c",
            "fan_speed_pct",
            "power_limit_w",
            "sm_clock_mhz",
            "memory_used_mib",
            "throttle_reasons",
            "ecc",
            "processes",
        ] {
            assert!(!obj.contains_key(absent), "{absent} should be absent: {v}");
        }
        assert_eq!(obj["time"], "2027-01-15T08:00:00.005Z");
        assert_eq!(obj["governor_state"], "idle");
        assert_eq!(obj["health"], "ok");
    }

    #[test]
    fn throttle_reasons_listed_when_reported() {
        let sample = GpuSample {
            throttle_reasons_mask: Some(0x44),
            throttle_reasons: vec![
                ThrottleReason::SwPowerCap as i32,
                ThrottleReason::HwThermalSlowdown as i32,
            ],
            ..Default::default()
        };
        let v = json(&SampleRecord::new("h", None, &sample, None));
        assert_eq!(
            v["throttle_reasons"],
            serde_json::json!(["sw_power_cap", "hw_thermal_slowdown"])
        );
        let idle = GpuSample {
            throttle_reasons_mask: Some(0),
            ..Default::default()
        };
        let v = json(&SampleRecord::new("h", None, &idle, None));
        assert_eq!(v["throttle_reasons"], serde_json::json!([]));
    }
}
