//! Reads ownership out of a process's cgroup membership: the one place that
//! knows the path shapes container runtimes, the kubelet, systemd and Slurm
//! leave in `/proc/<pid>/cgroup`.
//!
//! Pure: it takes the file's text and returns the chosen cgroup path with
//! the [`Owner`] parts that path names (container id and runtime, pod UID,
//! systemd unit, Slurm job/step/uid). `Owner::pod` is never set here: the
//! pod's names come from pod-resources, joined by device elsewhere.
//!
//! Which line: a cgroup v2 host has one line, `0::/path`. A v1 or hybrid
//! host has one line per hierarchy (`N:controllers:/path`), and they need
//! not agree (Slurm's v1 plugin moves tasks in its own hierarchies only;
//! a hybrid host's unified line may name just the daemon's service). So
//! every line is parsed and the one naming the most wins: a container, pod
//! or Slurm job over a bare systemd unit over nothing; on a tie the v2 line,
//! then the first v1 line. Lines that are not `id:controllers:/path` are
//! skipped.

use super::{Container, Owner, Runtime, SlurmJob};

/// What a cgroup file says about its process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupOwner {
    /// The chosen line's path, e.g. `/kubepods.slice/…/cri-containerd-….scope`.
    pub path: String,
    /// Everything but `pod` (see the module comment).
    pub owner: Owner,
}

/// Parses the text of `/proc/<pid>/cgroup`; `None` when no line is a cgroup
/// line at all (empty or garbage content).
pub fn parse(content: &str) -> Option<CgroupOwner> {
    let mut best: Option<(u8, bool, CgroupOwner)> = None;
    for line in content.lines() {
        let Some((is_v2, path)) = split_line(line) else {
            continue;
        };
        let owner = owner_of_path(path);
        let rank = specificity(&owner);
        let better = match &best {
            None => true,
            Some((best_rank, best_v2, _)) => {
                rank > *best_rank || (rank == *best_rank && is_v2 && !best_v2)
            }
        };
        if better {
            best = Some((
                rank,
                is_v2,
                CgroupOwner {
                    path: path.to_owned(),
                    owner,
                },
            ));
        }
    }
    best.map(|(_, _, chosen)| chosen)
}

/// `hierarchy-id:controllers:path` → (is the v2 line, path).
fn split_line(line: &str) -> Option<(bool, &str)> {
    let line = line.trim_end_matches('\r');
    let (id, rest) = line.split_once(':')?;
    let (controllers, path) = rest.split_once(':')?;
    let id: u32 = id.parse().ok()?;
    if !path.starts_with('/') {
        return None;
    }
    Some((id == 0 && controllers.is_empty(), path))
}

fn specificity(owner: &Owner) -> u8 {
    if owner.container.is_some() || owner.slurm.is_some() || owner.pod_uid.is_some() {
        2
    } else if owner.systemd_unit.is_some() {
        1
    } else {
        0
    }
}

/// The owner parts one cgroup path names.
pub fn owner_of_path(path: &str) -> Owner {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut owner = Owner::default();
    let under_kubepods = |i: usize| parts[..i].iter().any(|p| p.starts_with("kubepods"));
    for (i, part) in parts.iter().enumerate() {
        if let Some(container) = container_of(&parts, i) {
            owner.container = Some(container);
        } else if is_unit(part) {
            owner.systemd_unit = Some((*part).to_owned());
        }
        // The colon form carries the pod's slice before its first ':'.
        let slice = part.split(':').next().unwrap_or(part);
        if let Some(uid) = pod_uid_systemd(slice) {
            owner.pod_uid = Some(uid);
        } else if under_kubepods(i)
            && let Some(uid) = part.strip_prefix("pod").filter(|u| is_pod_uid(u))
        {
            owner.pod_uid = Some(uid.to_owned());
        }
    }
    owner.slurm = slurm_of(&parts);
    owner
}

/// The container component at `parts[i]`, if it is one.
fn container_of(parts: &[&str], i: usize) -> Option<Container> {
    let part = parts[i];
    let container = |id: &str, runtime| {
        is_container_id(id).then(|| Container {
            id: id.to_owned(),
            runtime,
        })
    };
    // systemd driver: `<prefix>-<id>.scope`.
    if let Some(stem) = part.strip_suffix(".scope") {
        for (prefix, runtime) in SCOPE_PREFIXES {
            if let Some(id) = stem.strip_prefix(prefix) {
                return container(id, *runtime);
            }
        }
        return None;
    }
    // containerd's systemd driver nested under its own service on some
    // hosts: `kubepods-…-pod<uid>.slice:cri-containerd:<id>`.
    if let Some((_, rest)) = part.split_once(':') {
        let (prefix, id) = rest.split_once(':')?;
        let runtime = match prefix {
            "cri-containerd" => Runtime::Containerd,
            "crio" => Runtime::CriO,
            "docker" => Runtime::Docker,
            _ => return None,
        };
        return container(id, runtime);
    }
    // cgroupfs driver: `/docker/<id>`, `/libpod_parent/libpod-<id>`,
    // `/kubepods/<qos>/pod<uid>/<id>` (containerd) or `…/crio-<id>`.
    let parent = i.checked_sub(1).map(|p| parts[p]);
    if let Some(id) = part.strip_prefix("libpod-") {
        return container(id, Runtime::Podman);
    }
    if let Some(id) = part.strip_prefix("crio-") {
        return container(id, Runtime::CriO);
    }
    if is_container_id(part) {
        if parent == Some("docker") {
            return container(part, Runtime::Docker);
        }
        if parts[..i].iter().any(|p| p.starts_with("kubepods")) {
            return container(part, Runtime::Containerd);
        }
    }
    None
}

/// Scope-name prefixes of container scopes, by runtime. The `-conmon-`
/// scopes are the runtimes' monitors, not containers: they fall through to
/// systemd units because their stem is no container id.
const SCOPE_PREFIXES: &[(&str, Runtime)] = &[
    ("cri-containerd-", Runtime::Containerd),
    ("crio-", Runtime::CriO),
    ("docker-", Runtime::Docker),
    ("libpod-", Runtime::Podman),
];

fn is_unit(part: &str) -> bool {
    let Some(stem) = part
        .strip_suffix(".service")
        .or_else(|| part.strip_suffix(".scope"))
    else {
        return false;
    };
    !stem.is_empty() && !part.contains(':')
}

/// `kubepods-burstable-pod<uid with _>.slice`, `kubepods-pod<uid>.slice`.
fn pod_uid_systemd(part: &str) -> Option<String> {
    let stem = part.strip_prefix("kubepods")?.strip_suffix(".slice")?;
    let (_, uid) = stem.rsplit_once("-pod")?;
    let uid = uid.replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// A Kubernetes UID: the 8-4-4-4-12 hex form.
fn is_pod_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `…/slurm[_<node>]/uid_<uid>/job_<id>/step_<step>/…` (v1) or
/// `…/[<node>_]slurmstepd.scope/job_<id>/step_<step>/…` (v2; the node
/// prefix where one host runs several slurmd).
fn slurm_of(parts: &[&str]) -> Option<SlurmJob> {
    let root = parts.iter().position(|p| {
        p.ends_with("slurmstepd.scope") || *p == "slurm" || p.starts_with("slurm_")
    })?;
    let rest = &parts[root + 1..];
    let mut uid = None;
    let mut i = 0;
    if let Some(u) = rest.first().and_then(|p| p.strip_prefix("uid_")) {
        uid = Some(u.parse().ok()?);
        i = 1;
    }
    let job_id = rest.get(i)?.strip_prefix("job_")?;
    if job_id.is_empty() || !job_id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step = rest
        .get(i + 1)
        .and_then(|p| p.strip_prefix("step_"))
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    Some(SlurmJob {
        job_id: job_id.to_owned(),
        step,
        uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "5f1e8b7a-3c2d-4e6f-9a8b-7c6d5e4f3a2b";
    const UID_: &str = "5f1e8b7a_3c2d_4e6f_9a8b_7c6d5e4f3a2b";

    fn ctr(runtime: Runtime) -> Option<Container> {
        Some(Container {
            id: ID.to_owned(),
            runtime,
        })
    }

    fn unit(u: &str) -> Option<String> {
        Some(u.to_owned())
    }

    fn job(id: &str, step: Option<&str>, uid: Option<u32>) -> Option<SlurmJob> {
        Some(SlurmJob {
            job_id: id.to_owned(),
            step: step.map(str::to_owned),
            uid,
        })
    }

    struct Case {
        name: &'static str,
        content: String,
        path: &'static str,
        container: Option<Container>,
        unit: Option<String>,
        slurm: Option<SlurmJob>,
        pod_uid: Option<&'static str>,
    }

    fn cases() -> Vec<Case> {
        let v2 = |p: &str| format!("0::{p}\n");
        vec![
            Case {
                name: "containerd, systemd driver, v2",
                content: v2(&format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                )),
                path: "",
                container: ctr(Runtime::Containerd),
                unit: None,
                slurm: None,
                pod_uid: Some(UID),
            },
            Case {
                name: "containerd, guaranteed pod, systemd driver",
                content: v2(&format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope")),
                path: "",
                container: ctr(Runtime::Containerd),
                unit: None,
                slurm: None,
                pod_uid: Some(UID),
            },
            Case {
                name: "containerd, cgroupfs driver, v1",
                content: format!(
                    "12:memory:/kubepods/besteffort/pod{UID}/{ID}\n11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n"
                ),
                path: "",
                container: ctr(Runtime::Containerd),
                unit: None,
                slurm: None,
                pod_uid: Some(UID),
            },
            Case {
                name: "containerd nested under its service (colon form)",
                content: v2(&format!(
                    "/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID}"
                )),
                path: "",
                container: ctr(Runtime::Containerd),
                unit: unit("containerd.service"),
                slurm: None,
                pod_uid: Some(UID),
            },
            Case {
                name: "CRI-O, systemd driver",
                content: v2(&format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
                )),
                path: "",
                container: ctr(Runtime::CriO),
                unit: None,
                slurm: None,
                pod_uid: Some(UID),
            },
            Case {
                name: "CRI-O, cgroupfs driver",
                content: format!("0::/kubepods/burstable/pod{UID}/crio-{ID}\n"),
                path: "",
                container: ctr(Runtime::CriO),
                unit: None,
                slurm: None,
                pod_uid: Some(UID),
            },
            Case {
                name: "CRI-O conmon is a unit, not a container",
                content: v2(&format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope")),
                path: "",
                container: None,
                unit: unit(&format!("crio-conmon-{ID}.scope")),
                slurm: None,
                pod_uid: Some(UID),
            },
            Case {
                name: "Docker, systemd driver, v2",
                content: v2(&format!("/system.slice/docker-{ID}.scope")),
                path: "",
                container: ctr(Runtime::Docker),
                unit: None,
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "Docker, cgroupfs driver, v1",
                content: format!(
                    "13:name=systemd:/docker/{ID}\n4:devices:/docker/{ID}\n0::/system.slice/containerd.service\n"
                ),
                path: "",
                container: ctr(Runtime::Docker),
                unit: None,
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "Podman rootful, machine.slice",
                content: v2(&format!("/machine.slice/libpod-{ID}.scope")),
                path: "",
                container: ctr(Runtime::Podman),
                unit: None,
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "Podman rootless with inner container cgroup",
                content: v2(&format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
                )),
                path: "",
                container: ctr(Runtime::Podman),
                unit: unit("user@1000.service"),
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "Podman, cgroupfs manager",
                content: format!("0::/libpod_parent/libpod-{ID}\n"),
                path: "",
                container: ctr(Runtime::Podman),
                unit: None,
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "Slurm v1 numbered step",
                content: "10:freezer:/slurm/uid_1000/job_4242/step_0\n9:cpuset:/slurm/uid_1000/job_4242/step_0\n1:name=systemd:/system.slice/slurmd.service\n".to_owned(),
                path: "/slurm/uid_1000/job_4242/step_0",
                container: None,
                unit: None,
                slurm: job("4242", Some("0"), Some(1000)),
                pod_uid: None,
            },
            Case {
                name: "Slurm v1 batch step, per-node root",
                content: "7:devices:/slurm_node07/uid_2001/job_77/step_batch/task_0\n".to_owned(),
                path: "/slurm_node07/uid_2001/job_77/step_batch/task_0",
                container: None,
                unit: None,
                slurm: job("77", Some("batch"), Some(2001)),
                pod_uid: None,
            },
            Case {
                name: "Slurm v1 extern step",
                content: "5:memory:/slurm/uid_0/job_9/step_extern\n".to_owned(),
                path: "/slurm/uid_0/job_9/step_extern",
                container: None,
                unit: None,
                slurm: job("9", Some("extern"), Some(0)),
                pod_uid: None,
            },
            Case {
                name: "Slurm v2",
                content: v2("/system.slice/slurmstepd.scope/job_4243/step_1/user/task_0"),
                path: "/system.slice/slurmstepd.scope/job_4243/step_1/user/task_0",
                container: None,
                unit: unit("slurmstepd.scope"),
                slurm: job("4243", Some("1"), None),
                pod_uid: None,
            },
            Case {
                name: "Slurm v2, one of several slurmd on the host",
                content: v2("/system.slice/node3_slurmstepd.scope/job_81/step_interactive/user/task_0"),
                path: "/system.slice/node3_slurmstepd.scope/job_81/step_interactive/user/task_0",
                container: None,
                unit: unit("node3_slurmstepd.scope"),
                slurm: job("81", Some("interactive"), None),
                pod_uid: None,
            },
            Case {
                name: "Slurm v2 job without step",
                content: v2("/system.slice/slurmstepd.scope/job_5"),
                path: "/system.slice/slurmstepd.scope/job_5",
                container: None,
                unit: unit("slurmstepd.scope"),
                slurm: job("5", None, None),
                pod_uid: None,
            },
            Case {
                name: "systemd service",
                content: v2("/system.slice/gpu-job.service"),
                path: "/system.slice/gpu-job.service",
                container: None,
                unit: unit("gpu-job.service"),
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "user session scope",
                content: v2("/user.slice/user-1000.slice/session-3.scope"),
                path: "/user.slice/user-1000.slice/session-3.scope",
                container: None,
                unit: unit("session-3.scope"),
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "app under user manager: last unit wins",
                content: v2("/user.slice/user-1000.slice/user@1000.service/app.slice/train.service"),
                path: "/user.slice/user-1000.slice/user@1000.service/app.slice/train.service",
                container: None,
                unit: unit("train.service"),
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "root cgroup",
                content: v2("/"),
                path: "/",
                container: None,
                unit: None,
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "short hex is no container id",
                content: v2("/system.slice/docker-0123abcd.scope"),
                path: "/system.slice/docker-0123abcd.scope",
                container: None,
                unit: unit("docker-0123abcd.scope"),
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "bare hex outside kubepods and docker names nothing",
                content: format!("0::/custom/{ID}\n"),
                path: "",
                container: None,
                unit: None,
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "job_ outside a slurm root is not Slurm",
                content: v2("/batch/job_12/step_0"),
                path: "/batch/job_12/step_0",
                container: None,
                unit: None,
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "garbage lines around a good one",
                content: format!("garbage\n\nx:y:/z\n3:cpu:relative\n0::/system.slice/docker-{ID}.scope\r\n"),
                path: "",
                container: ctr(Runtime::Docker),
                unit: None,
                slurm: None,
                pod_uid: None,
            },
            Case {
                name: "hybrid: v2 line names a unit, v1 names the container",
                content: format!("0::/system.slice/kubelet.service\n4:pids:/kubepods/pod{UID}/{ID}\n"),
                path: "",
                container: ctr(Runtime::Containerd),
                unit: None,
                slurm: None,
                pod_uid: Some(UID),
            },
        ]
    }

    #[test]
    fn every_cgroup_shape_parses_into_its_owner_parts() {
        for case in cases() {
            let parsed =
                parse(&case.content).unwrap_or_else(|| panic!("{}: no cgroup line", case.name));
            let expected_path = if case.path.is_empty() {
                // The chosen line is the one naming the container.
                case.content
                    .lines()
                    .filter_map(split_line)
                    .map(|(_, p)| p)
                    .find(|p| p.contains(ID))
                    .unwrap_or_else(|| panic!("{}: fixture has no container line", case.name))
                    .to_owned()
            } else {
                case.path.to_owned()
            };
            assert_eq!(parsed.path, expected_path, "{}: path", case.name);
            assert_eq!(
                parsed.owner.container, case.container,
                "{}: container",
                case.name
            );
            assert_eq!(parsed.owner.systemd_unit, case.unit, "{}: unit", case.name);
            assert_eq!(parsed.owner.slurm, case.slurm, "{}: slurm", case.name);
            assert_eq!(
                parsed.owner.pod_uid.as_deref(),
                case.pod_uid,
                "{}: pod uid",
                case.name
            );
            assert_eq!(
                parsed.owner.pod, None,
                "{}: pod is never set here",
                case.name
            );
        }
    }

    #[test]
    fn content_without_any_cgroup_line_is_none() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("not a cgroup file\n:::\n-1::/x\n"), None);
    }

    #[test]
    fn v2_line_wins_a_tie_with_v1_lines() {
        let parsed = parse("1:name=systemd:/system.slice/a.service\n0::/system.slice/b.service\n");
        assert_eq!(
            parsed.map(|p| p.path),
            Some("/system.slice/b.service".to_owned())
        );
    }

    #[test]
    fn first_v1_hierarchy_that_names_something_wins_over_empty_ones() {
        let parsed = parse(
            "12:memory:/\n11:cpu:/\n10:devices:/system.slice/x.service\n9:pids:/system.slice/y.service\n",
        );
        assert_eq!(
            parsed.map(|p| p.path),
            Some("/system.slice/x.service".to_owned())
        );
    }
}
