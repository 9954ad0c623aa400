//! Who is on a GPU, in the short words the terminal views use: a process's
//! owner (`ns/pod/container`, `slurm:JOB.STEP`, a container's short id, a
//! systemd unit), a MIG instance's label (`2/MIG 1g.10gb`), and a GPU's
//! one-line list of users.
//!
//! `ps`, `snapshot` and `watch` all name owners through here, so the same
//! process reads the same everywhere. JSON output does not: it carries every
//! attribution field typed (see `record`).

use std::collections::BTreeSet;

use gpuwatch_api::{Attribution, GpuAllocation, GpuSample, MigInstance, PodRef};

/// How many hex digits of a container id a person needs (what `docker ps`
/// shows).
pub const SHORT_CONTAINER_ID: usize = 12;

/// What kind of owner [`owner`] named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerKind {
    Pod,
    Slurm,
    Container,
    Unit,
}

impl OwnerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerKind::Pod => "pod",
            OwnerKind::Slurm => "slurm",
            OwnerKind::Container => "container",
            OwnerKind::Unit => "unit",
        }
    }
}

/// `ns/pod/container`.
pub fn pod_text(p: &PodRef) -> String {
    format!("{}/{}/{}", p.namespace, p.pod, p.container)
}

/// The most specific owner the records give: the pod, else the Slurm job
/// (`slurm:JOB` or `slurm:JOB.STEP`), else the container's short id, else
/// the systemd unit. None when the records name none.
pub fn owner(a: &Attribution) -> Option<(OwnerKind, String)> {
    if let Some(p) = &a.pod {
        return Some((OwnerKind::Pod, pod_text(p)));
    }
    if let Some(job) = &a.slurm {
        let text = match &job.step {
            Some(step) => format!("slurm:{}.{step}", job.job_id),
            None => format!("slurm:{}", job.job_id),
        };
        return Some((OwnerKind::Slurm, text));
    }
    if let Some(id) = a.container_id.as_deref().filter(|id| !id.is_empty()) {
        let short: String = id.chars().take(SHORT_CONTAINER_ID).collect();
        return Some((OwnerKind::Container, short));
    }
    a.systemd_unit
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(|u| (OwnerKind::Unit, u.to_owned()))
}

/// A MIG instance's place: `2/MIG 1g.10gb`, with the GPU instance id
/// added (`2/MIG 1g.10gb gi13`) when another instance of the same GPU has
/// the same profile, so two rows never read alike.
pub fn mig_label(gpu_index: u32, instances: &[MigInstance], mig: &MigInstance) -> String {
    let twins = instances
        .iter()
        .filter(|m| m.profile == mig.profile)
        .count();
    if twins > 1 {
        format!("{gpu_index}/MIG {} gi{}", mig.profile, mig.gpu_instance_id)
    } else {
        format!("{gpu_index}/MIG {}", mig.profile)
    }
}

/// The device column for a GPU or one of its MIG instances (by UUID).
pub fn device_label(s: &GpuSample, mig_uuid: Option<&str>) -> String {
    match mig_uuid.and_then(|u| find_mig(s, u)) {
        Some(m) => mig_label(s.index, &s.mig_instances, m),
        None => s.index.to_string(),
    }
}

/// The MIG instance of `s` with this UUID.
pub fn find_mig<'a>(s: &'a GpuSample, uuid: &str) -> Option<&'a MigInstance> {
    s.mig_instances
        .iter()
        .find(|m| m.uuid.eq_ignore_ascii_case(uuid))
}

/// The MIG instance an allocation holds on this GPU, if it holds one.
pub fn allocation_mig<'a>(s: &'a GpuSample, a: &GpuAllocation) -> Option<&'a MigInstance> {
    a.device_ids.iter().find_map(|id| find_mig(s, id))
}

/// Everyone on a GPU, in one short list: each distinct process owner (or
/// `user:name` for a process the records do not attribute), then
/// `idle: ns/pod` for each allocation that runs nothing. Empty when nobody
/// is there.
pub fn users(s: &GpuSample) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for p in &s.processes {
        let text = match p.attribution.as_ref().and_then(owner) {
            Some((_, o)) => o,
            None => match (&p.user, &p.name) {
                (Some(u), Some(n)) => format!("{u}:{n}"),
                (None, Some(n)) => n.clone(),
                (Some(u), None) => format!("{u}:{}", p.pid),
                (None, None) => format!("pid {}", p.pid),
            },
        };
        if seen.insert(text.clone()) {
            out.push(text);
        }
    }
    for a in s.allocations.iter().filter(|a| a.idle) {
        if let Some(p) = &a.pod {
            let text = format!("idle: {}/{}", p.namespace, p.pod);
            if seen.insert(text.clone()) {
                out.push(text);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuwatch_api::{GpuProcess, SlurmJob};

    fn pod(ns: &str, name: &str, c: &str) -> PodRef {
        PodRef {
            namespace: ns.into(),
            pod: name.into(),
            container: c.into(),
        }
    }

    #[test]
    fn the_most_specific_owner_wins() {
        let mut a = Attribution {
            container_id: Some("4f1c0123456789abcdef".into()),
            systemd_unit: Some("train.service".into()),
            slurm: Some(SlurmJob {
                job_id: "1234".into(),
                step: Some("0".into()),
                uid: None,
            }),
            pod: Some(pod("ml", "trainer-0", "main")),
            ..Default::default()
        };
        assert_eq!(
            owner(&a),
            Some((OwnerKind::Pod, "ml/trainer-0/main".to_owned()))
        );
        a.pod = None;
        assert_eq!(owner(&a), Some((OwnerKind::Slurm, "slurm:1234.0".into())));
        a.slurm = None;
        assert_eq!(
            owner(&a),
            Some((OwnerKind::Container, "4f1c01234567".into()))
        );
        a.container_id = None;
        assert_eq!(owner(&a), Some((OwnerKind::Unit, "train.service".into())));
        a.systemd_unit = None;
        assert_eq!(owner(&a), None);
    }

    #[test]
    fn mig_labels_stay_distinct() {
        let mig = |gi: u32, profile: &str| MigInstance {
            uuid: format!("MIG-{gi}"),
            gpu_instance_id: gi,
            profile: profile.into(),
            ..Default::default()
        };
        let all = vec![mig(1, "3g.40gb"), mig(2, "1g.10gb"), mig(3, "1g.10gb")];
        assert_eq!(mig_label(2, &all, &all[0]), "2/MIG 3g.40gb");
        assert_eq!(mig_label(2, &all, &all[1]), "2/MIG 1g.10gb gi2");
        assert_eq!(mig_label(2, &all, &all[2]), "2/MIG 1g.10gb gi3");
    }

    #[test]
    fn users_list_owners_once_then_idle_allocations() {
        let proc_of = |pid: u32, attribution: Option<Attribution>| GpuProcess {
            pid,
            name: Some("python3".into()),
            user: Some("alice".into()),
            attribution,
            ..Default::default()
        };
        let by_pod = Attribution {
            pod: Some(pod("ml", "trainer-0", "main")),
            ..Default::default()
        };
        let s = GpuSample {
            processes: vec![
                proc_of(1, Some(by_pod.clone())),
                proc_of(2, Some(by_pod)),
                proc_of(3, None),
            ],
            allocations: vec![
                GpuAllocation {
                    pod: Some(pod("ml", "trainer-0", "main")),
                    idle: false,
                    ..Default::default()
                },
                GpuAllocation {
                    pod: Some(pod("research", "notebook-5", "jupyter")),
                    idle: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            users(&s),
            vec![
                "ml/trainer-0/main".to_owned(),
                "alice:python3".to_owned(),
                "idle: research/notebook-5".to_owned()
            ]
        );
        assert!(users(&GpuSample::default()).is_empty());
    }
}
