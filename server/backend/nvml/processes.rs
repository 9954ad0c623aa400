//! Who is on a GPU, from NVML's separate answers put together.
//!
//! NVML lists compute and graphics processes in two calls, places MIG
//! processes both on the parent (with their instance ids) and on the MIG
//! device they run in, and gives utilisation as timestamped samples per
//! process. This module owns the pure part: merging those lists by pid into
//! one [`Process`] each, choosing one utilisation figure per pid from the
//! samples, and naming a MIG device's profile. `device.rs` makes the calls.

use std::collections::HashMap;

use nvml_wrapper::{
    enums::device::UsedGpuMemory,
    struct_wrappers::device::{ProcessInfo, ProcessUtilizationSample},
};

use crate::backend::{Process, ProcessKind, ProcessUtilization};

/// The processes NVML listed on one MIG device.
#[derive(Debug, Clone, Default)]
pub(super) struct MigProcesses {
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    pub processes: Vec<ProcessInfo>,
}

fn memory(p: &ProcessInfo) -> Option<u64> {
    match p.used_gpu_memory {
        UsedGpuMemory::Used(bytes) => Some(bytes),
        UsedGpuMemory::Unavailable => None,
    }
}

/// One process per pid, in the order NVML listed them (compute first):
/// a pid in both lists is [`ProcessKind::ComputeAndGraphics`]; a process in
/// a MIG instance carries the instance's UUID, found from the instance ids
/// on the parent's entry or from the instance's own list (a pid only the
/// instance lists is added). `utilization` is `None` where the GPU gives no
/// samples; otherwise a pid without a sample gets `None`, never zeros.
pub(super) fn merge(
    compute: &[ProcessInfo],
    graphics: &[ProcessInfo],
    mig: &[MigProcesses],
    utilization: Option<&HashMap<u32, ProcessUtilization>>,
) -> Vec<Process> {
    let mut merged: Vec<Process> = Vec::new();
    let mut at: HashMap<u32, usize> = HashMap::new();
    let instance_by_ids = |gi: Option<u32>, ci: Option<u32>| {
        let (gi, ci) = (gi?, ci?);
        mig.iter()
            .find(|m| m.gpu_instance_id == gi && m.compute_instance_id == ci)
            .map(|m| m.uuid.clone())
    };
    for p in compute {
        if let Some(&i) = at.get(&p.pid) {
            // NVML repeats a pid with several contexts; keep the first figure.
            merged[i].used_memory_bytes = merged[i].used_memory_bytes.or(memory(p));
            continue;
        }
        at.insert(p.pid, merged.len());
        merged.push(Process {
            pid: p.pid,
            used_memory_bytes: memory(p),
            kind: ProcessKind::Compute,
            utilization: None,
            mig_uuid: instance_by_ids(p.gpu_instance_id, p.compute_instance_id),
        });
    }
    for p in graphics {
        if let Some(&i) = at.get(&p.pid) {
            let process = &mut merged[i];
            if process.kind == ProcessKind::Compute {
                process.kind = ProcessKind::ComputeAndGraphics;
            }
            process.used_memory_bytes = process.used_memory_bytes.or(memory(p));
            continue;
        }
        at.insert(p.pid, merged.len());
        merged.push(Process {
            pid: p.pid,
            used_memory_bytes: memory(p),
            kind: ProcessKind::Graphics,
            utilization: None,
            mig_uuid: instance_by_ids(p.gpu_instance_id, p.compute_instance_id),
        });
    }
    for instance in mig {
        for p in &instance.processes {
            match at.get(&p.pid) {
                Some(&i) => {
                    let process = &mut merged[i];
                    process
                        .mig_uuid
                        .get_or_insert_with(|| instance.uuid.clone());
                    process.used_memory_bytes = process.used_memory_bytes.or(memory(p));
                }
                None => {
                    at.insert(p.pid, merged.len());
                    merged.push(Process {
                        pid: p.pid,
                        used_memory_bytes: memory(p),
                        kind: ProcessKind::Compute,
                        utilization: None,
                        mig_uuid: Some(instance.uuid.clone()),
                    });
                }
            }
        }
    }
    if let Some(by_pid) = utilization {
        for process in &mut merged {
            process.utilization = by_pid.get(&process.pid).copied();
        }
    }
    merged
}

/// One utilisation figure per pid: its latest sample in the window. The
/// latest rather than the maximum, because the latest samples of all
/// processes describe (nearly) one moment, whose shares add up to no more
/// than the device's utilisation; per-pid maxima from different moments
/// can add up to more, which is the bug this figure must not have. Values
/// are clamped to 0–100 (drivers have been seen to report more).
pub(super) fn latest_per_pid(
    samples: &[ProcessUtilizationSample],
) -> HashMap<u32, ProcessUtilization> {
    let mut latest: HashMap<u32, &ProcessUtilizationSample> = HashMap::new();
    for s in samples {
        let entry = latest.entry(s.pid).or_insert(s);
        if s.timestamp > entry.timestamp {
            *entry = s;
        }
    }
    latest
        .into_iter()
        .map(|(pid, s)| {
            let pct = |v: u32| Some(v.min(100));
            (
                pid,
                ProcessUtilization {
                    sm_pct: pct(s.sm_util),
                    memory_pct: pct(s.mem_util),
                    encoder_pct: pct(s.enc_util),
                    decoder_pct: pct(s.dec_util),
                },
            )
        })
        .collect()
}

/// The profile in a MIG device's name: NVML names it
/// `"<product> MIG <profile>"`, e.g. `"NVIDIA A100-SXM4-40GB MIG 1g.5gb"`
/// (or `"… MIG 1c.3g.20gb"` for a compute instance smaller than its GPU
/// instance). The name is the only place NVIDIA's own spelling appears, so
/// it is preferred over any reconstruction.
pub(super) fn profile_from_name(name: &str) -> Option<String> {
    let (_, tail) = name.rsplit_once("MIG ")?;
    let profile = tail.split_whitespace().next()?;
    let looks_right = profile.starts_with(|c: char| c.is_ascii_digit())
        && profile.contains("g.")
        && profile.contains("gb");
    looks_right.then(|| profile.to_owned())
}

/// A profile name rebuilt from a MIG device's attributes, for a name that
/// does not carry one: `<slices>g.<memory, GiB rounded up>gb`. NVIDIA
/// rounds its names to marketing sizes, so this matches them on the
/// common 40/80 GB boards (`1g.10gb`, `3g.40gb`) but not everywhere (an
/// H100 94GB `1g.12gb` would read `1g.11gb`); it is a fallback only.
pub(super) fn profile_from_attributes(slices: u32, memory_mb: u64) -> Option<String> {
    (slices > 0 && memory_mb > 0).then(|| format!("{slices}g.{}gb", memory_mb.div_ceil(1024)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(pid: u32, mib: Option<u64>, ids: Option<(u32, u32)>) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory: mib
                .map_or(UsedGpuMemory::Unavailable, |m| UsedGpuMemory::Used(m << 20)),
            gpu_instance_id: ids.map(|(gi, _)| gi),
            compute_instance_id: ids.map(|(_, ci)| ci),
        }
    }

    fn sample(pid: u32, timestamp: u64, sm: u32) -> ProcessUtilizationSample {
        ProcessUtilizationSample {
            pid,
            timestamp,
            sm_util: sm,
            mem_util: sm / 2,
            enc_util: 0,
            dec_util: 0,
        }
    }

    #[test]
    fn a_pid_in_both_lists_is_one_process_of_both_kinds() {
        let merged = merge(
            &[listed(1, Some(10), None), listed(2, None, None)],
            &[listed(2, Some(20), None), listed(3, Some(30), None)],
            &[],
            None,
        );
        let kinds: Vec<_> = merged.iter().map(|p| (p.pid, p.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (1, ProcessKind::Compute),
                (2, ProcessKind::ComputeAndGraphics),
                (3, ProcessKind::Graphics)
            ]
        );
        assert_eq!(
            merged[1].used_memory_bytes,
            Some(20 << 20),
            "graphics fills a gap"
        );
        assert!(
            merged
                .iter()
                .all(|p| p.utilization.is_none() && p.mig_uuid.is_none())
        );
    }

    #[test]
    fn mig_processes_are_placed_by_ids_or_by_the_instance_list() {
        let mig = [
            MigProcesses {
                uuid: "MIG-a".into(),
                gpu_instance_id: 1,
                compute_instance_id: 0,
                processes: vec![listed(7, Some(1), Some((1, 0)))],
            },
            MigProcesses {
                uuid: "MIG-b".into(),
                gpu_instance_id: 2,
                compute_instance_id: 0,
                processes: vec![listed(8, Some(2), Some((2, 0))), listed(9, Some(3), None)],
            },
        ];
        // The parent lists 7 with its ids and 8 without (a driver that
        // leaves them out); 9 only appears on the instance.
        let parent = [listed(7, Some(1), Some((1, 0))), listed(8, Some(2), None)];
        let merged = merge(&parent, &[], &mig, None);
        let placed: Vec<_> = merged
            .iter()
            .map(|p| (p.pid, p.mig_uuid.as_deref()))
            .collect();
        assert_eq!(
            placed,
            vec![(7, Some("MIG-a")), (8, Some("MIG-b")), (9, Some("MIG-b"))]
        );
    }

    #[test]
    fn utilisation_is_the_latest_sample_and_absent_without_one() {
        let samples = [
            sample(1, 100, 40),
            sample(1, 300, 10),
            sample(1, 200, 90),
            sample(2, 300, 250),
        ];
        let by_pid = latest_per_pid(&samples);
        assert_eq!(by_pid[&1].sm_pct, Some(10), "latest, not max");
        assert_eq!(by_pid[&1].memory_pct, Some(5));
        assert_eq!(by_pid[&2].sm_pct, Some(100), "clamped");
        let merged = merge(
            &[listed(1, None, None), listed(3, None, None)],
            &[],
            &[],
            Some(&by_pid),
        );
        assert_eq!(merged[0].utilization.and_then(|u| u.sm_pct), Some(10));
        assert_eq!(merged[1].utilization, None, "no sample is unknown, not 0");
    }

    #[test]
    fn profiles_come_from_the_mig_device_name() {
        assert_eq!(
            profile_from_name("NVIDIA A100-SXM4-40GB MIG 1g.5gb").as_deref(),
            Some("1g.5gb")
        );
        assert_eq!(
            profile_from_name("NVIDIA H100 80GB HBM3 MIG 3g.40gb").as_deref(),
            Some("3g.40gb")
        );
        assert_eq!(
            profile_from_name("NVIDIA A100 MIG 1c.3g.20gb").as_deref(),
            Some("1c.3g.20gb")
        );
        assert_eq!(
            profile_from_name("NVIDIA H100 MIG 1g.10gb+me").as_deref(),
            Some("1g.10gb+me")
        );
        assert_eq!(profile_from_name("NVIDIA H100 80GB HBM3"), None);
        assert_eq!(profile_from_name("NVIDIA MIG thing"), None);
    }

    #[test]
    fn profiles_rebuilt_from_attributes_match_common_names() {
        assert_eq!(profile_from_attributes(1, 4864).as_deref(), Some("1g.5gb"));
        assert_eq!(profile_from_attributes(1, 9856).as_deref(), Some("1g.10gb"));
        assert_eq!(
            profile_from_attributes(3, 40192).as_deref(),
            Some("3g.40gb")
        );
        assert_eq!(profile_from_attributes(0, 40192), None);
    }
}
