//! The host's own records behind [`HostRecords`]: `/proc` (through
//! `procfs`), the cgroup path (through `cgroup`) and the kubelet's
//! pod-resources API (through `podresources`).
//!
//! Owns three things the parts do not:
//! - **The per-process cache.** A process is read in full once, keyed by
//!   (pid, start time from `stat` field 22); each later call reads only
//!   `stat` (into a reused buffer) to learn it is the same process, so a
//!   long-lived process costs one small read per slow tick. A pid whose
//!   start time changed was reused and is read afresh; entries of pids
//!   that are gone are evicted when asked about, and by a sweep every
//!   [`SWEEP_EVERY`] calls. The cached record's user name is redone when
//!   the passwd file changes; its command line is the one read first
//!   (a process that rewrites its argv later is not re-read). A process
//!   whose `stat` cannot be read or parsed (a minimal fixture tree) is
//!   read in full on every call instead.
//!
//!   On the kernel's procfs the check is cheaper still: the process's
//!   `comm` is held open once it is cached, and re-read with one `pread`,
//!   which fails (ESRCH) once that very process is reaped, pid reuse or
//!   not; a `stat` read costs several times more because the kernel
//!   generates it. At most a quarter of the soft open-files limit is held
//!   (and at most [`MAX_HANDLES`]); processes beyond that, and fixture
//!   trees (where a held file outlives its removal), use the `stat`
//!   check.
//! - **The runtime for the kubelet client.** [`HostRecords`] is a sync
//!   trait called from one dedicated thread, and tonic is async, so the
//!   source holds a small current-thread tokio runtime of its own (built
//!   on the first `allocations()` that needs it) and blocks on each call
//!   there, bounded by `pod_resources_timeout`. Calling it from inside a
//!   tokio runtime is refused with a reason rather than a panic. This keeps
//!   the seam sync for the simulator's source and the sampler's thread.
//! - **Saying a problem once.** Each distinct problem (a kind of file
//!   that cannot be read, a kubelet failure) is logged at `warn` the first
//!   time and at `debug` after, never a line per tick; a process that has
//!   exited is routine and only ever `debug`.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use super::{
    AttributionConfig, CommandLines, HostRecords, Owner, ProcessRecord, Unattributed, cgroup,
    podresources::{KubeletStatus, PodResources, ResourceDevices},
    procfs::{Passwd, ProcError, ProcFs},
};

/// Sweep the cache of exited pids every this many `process` calls.
pub const SWEEP_EVERY: u32 = 1024;

/// How often the passwd file's mtime is looked at.
const PASSWD_RECHECK: Duration = Duration::from_secs(1);

/// At most this many distinct problems are remembered as said.
const MAX_NOTED: usize = 256;

#[derive(Debug)]
struct Cached {
    start_time: u64,
    passwd_generation: u64,
    record: ProcessRecord,
    /// On the kernel's procfs, the process's `comm` held open: the
    /// same-process check then costs one `pread`, not a `stat` read.
    handle: Option<std::fs::File>,
}

/// [`HostRecords`] over the host (or a fixture tree).
#[derive(Debug)]
pub struct HostSource {
    proc: ProcFs,
    command_lines: CommandLines,
    command_line_max_bytes: usize,
    passwd: Passwd,
    cache: HashMap<u32, Cached>,
    stat_buf: Vec<u8>,
    calls_since_sweep: u32,
    kubelet: PodResources,
    runtime: Option<tokio::runtime::Runtime>,
    noted: HashSet<String>,
    /// How many processes may hold a handle (0 on a fixture tree).
    handle_budget: usize,
    /// NVIDIA devices the kubelet can allocate (`GetAllocatableResources`),
    /// and when that was last asked: it changes only when devices do, so it
    /// is asked once a minute, not every refresh.
    allocatable: Option<(u32, std::time::Instant)>,
}

impl HostSource {
    pub fn new(config: &AttributionConfig) -> Self {
        Self {
            proc: ProcFs::new(&config.proc_root),
            command_lines: config.command_lines,
            command_line_max_bytes: config.command_line_max_bytes,
            passwd: Passwd::new(&config.passwd_file, PASSWD_RECHECK),
            cache: HashMap::new(),
            stat_buf: Vec::with_capacity(512),
            calls_since_sweep: 0,
            kubelet: PodResources::new(&config.pod_resources_socket, config.pod_resources_timeout),
            runtime: None,
            noted: HashSet::new(),
            handle_budget: handle_budget(&ProcFs::new(&config.proc_root)),
            allocatable: None,
        }
    }

    /// How many cached processes hold a handle.
    pub fn handles(&self) -> usize {
        self.cache.values().filter(|c| c.handle.is_some()).count()
    }

    /// Where the kubelet stands, as of the last `allocations()` or
    /// `allocatable()`.
    #[cfg(any(test, feature = "testing"))]
    pub fn kubelet_status(&self) -> &KubeletStatus {
        self.kubelet.status()
    }

    /// The NVIDIA devices the kubelet knows (`GetAllocatableResources`);
    /// `Ok(None)` without a kubelet or where it does not implement the call.
    pub fn allocatable(&mut self) -> Result<Option<Vec<ResourceDevices>>, Unattributed> {
        if self.kubelet.is_off() {
            return Ok(None);
        }
        self.ensure_runtime()?;
        let result = match &self.runtime {
            Some(runtime) => runtime.block_on(self.kubelet.allocatable()),
            None => Err(no_runtime()),
        };
        self.after_kubelet_call(result)
    }

    /// Drops the cache entries of pids that no longer exist.
    pub fn evict_exited(&mut self) {
        let proc = &self.proc;
        self.cache.retain(|pid, cached| match &cached.handle {
            Some(handle) => ProcFs::handle_alive(handle),
            None => proc.exists(*pid),
        });
        self.calls_since_sweep = 0;
    }

    /// How many processes are cached.
    #[cfg(any(test, feature = "testing"))]
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    fn ensure_runtime(&mut self) -> Result<(), Unattributed> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Unattributed {
                reason: "attribution's host source was called from inside a tokio runtime; \
                         it must run on its own thread"
                    .to_owned(),
            });
        }
        if self.runtime.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Unattributed {
                    reason: format!("cannot start the kubelet client's runtime: {e}"),
                })?;
            self.runtime = Some(runtime);
        }
        Ok(())
    }

    fn after_kubelet_call<T>(
        &mut self,
        result: Result<T, Unattributed>,
    ) -> Result<T, Unattributed> {
        match (&result, self.kubelet.status().clone()) {
            (Err(e), _) => self.note(format!("kubelet {}", e.reason), &e.reason),
            (Ok(_), KubeletStatus::NoSocket { path }) => {
                // Routine on a host without Kubernetes: `info` once.
                let reason = format!(
                    "no kubelet pod-resources socket at {}: pods are not attributed",
                    path.display()
                );
                if self.noted.insert("kubelet absent".to_owned()) {
                    info!("attribution: {reason}");
                } else {
                    debug!("attribution: {reason}");
                }
            }
            (Ok(_), KubeletStatus::Answered) => {
                let before = self.noted.len();
                self.noted.retain(|k| !k.starts_with("kubelet "));
                if self.noted.len() != before {
                    info!(socket = %self.kubelet.socket().display(), "the kubelet's pod-resources API answers again");
                }
            }
            _ => {}
        }
        result
    }

    /// Logs a problem: `warn` the first time its key is seen, `debug` after.
    fn note(&mut self, key: String, reason: &str) {
        if self.noted.len() < MAX_NOTED && self.noted.insert(key) {
            warn!("attribution: {reason}");
        } else {
            debug!("attribution: {reason}");
        }
    }

    fn proc_error(&mut self, pid: u32, error: ProcError) -> Unattributed {
        let reason = error.reason();
        match error {
            ProcError::Gone { .. } => {
                self.cache.remove(&pid);
                debug!("attribution: {reason}");
            }
            _ => {
                self.cache.remove(&pid);
                self.note(error.kind_key(), &reason);
            }
        }
        Unattributed { reason }
    }

    /// An optional part of a record: a process that has gone fails the
    /// whole read; any other failure leaves the part out, said once.
    fn optional<T>(&mut self, part: Result<T, ProcError>) -> Result<Option<T>, ProcError> {
        match part {
            Ok(v) => Ok(Some(v)),
            Err(gone @ ProcError::Gone { .. }) => Err(gone),
            Err(e) => {
                let reason = e.reason();
                self.note(e.kind_key(), &reason);
                Ok(None)
            }
        }
    }

    /// Reads a process in full. The cgroup is required (the owner is what
    /// attribution is for); the name, uid and command line are left out
    /// when they cannot be read, rather than losing the owner with them.
    fn read(&mut self, pid: u32) -> Result<ProcessRecord, ProcError> {
        let name = self.optional(self.proc.comm(pid))?;
        let uid = self.optional(self.proc.real_uid(pid))?;
        let cgroup_text = self.proc.cgroup(pid)?;
        let command_line = self
            .optional(
                self.proc
                    .command_line(pid, self.command_lines, self.command_line_max_bytes),
            )?
            .flatten();
        let (cgroup, owner) = match cgroup::parse(&cgroup_text) {
            Some(parsed) => (Some(parsed.path), parsed.owner),
            None => (None, Owner::default()),
        };
        Ok(ProcessRecord {
            pid,
            name,
            command_line,
            uid,
            user: uid.and_then(|u| self.passwd.user(u)).map(str::to_owned),
            cgroup,
            owner,
        })
    }

    /// The start time that keys the cache; `None` where `stat` cannot be
    /// read or parsed (a minimal fixture tree without it): such a process
    /// is read in full on every call instead of cached.
    fn start_time(&mut self, pid: u32) -> Result<Option<u64>, ProcError> {
        let result = self.proc.start_time(pid, &mut self.stat_buf);
        self.optional(result)
    }
}

impl HostRecords for HostSource {
    fn kubelet_answered(&self) -> bool {
        matches!(self.kubelet.status(), KubeletStatus::Answered)
    }

    fn process(&mut self, pid: u32) -> Result<ProcessRecord, Unattributed> {
        self.calls_since_sweep += 1;
        if self.calls_since_sweep >= SWEEP_EVERY {
            self.evict_exited();
        }
        if self.passwd.refresh(Instant::now())
            && let Some(reason) = self.passwd.error().map(str::to_owned)
        {
            self.note(
                "passwd".to_owned(),
                &format!("{reason}: user names are left out"),
            );
        }
        let generation = self.passwd.generation();
        if let Some(cached) = self.cache.get_mut(&pid)
            && let Some(handle) = &cached.handle
        {
            if ProcFs::handle_alive(handle) {
                if cached.passwd_generation != generation {
                    cached.record.user = cached
                        .record
                        .uid
                        .and_then(|u| self.passwd.user(u))
                        .map(str::to_owned);
                    cached.passwd_generation = generation;
                }
                return Ok(cached.record.clone());
            }
            // That process is gone; the pid may be another one's now.
            self.cache.remove(&pid);
        }
        // Twice at most: a pid reused while its files were read is read
        // again, once.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let start_time = match self.start_time(pid) {
                Ok(t) => t,
                Err(e) => return Err(self.proc_error(pid, e)),
            };
            if let Some(cached) = self.cache.get_mut(&pid)
                && Some(cached.start_time) == start_time
            {
                if cached.passwd_generation != generation {
                    cached.record.user = cached
                        .record
                        .uid
                        .and_then(|u| self.passwd.user(u))
                        .map(str::to_owned);
                    cached.passwd_generation = generation;
                }
                return Ok(cached.record.clone());
            }
            let record = match self.read(pid) {
                Ok(r) => r,
                Err(e) => return Err(self.proc_error(pid, e)),
            };
            let Some(start_time) = start_time else {
                self.cache.remove(&pid);
                return Ok(record);
            };
            // Opened between the two `stat` reads, so it is bound to the
            // process both name.
            let handle = if self.handles() < self.handle_budget {
                self.proc.open_handle(pid).ok()
            } else {
                None
            };
            // Cache only a record whose process is still the one `stat`
            // named before the reads.
            match self.start_time(pid) {
                Ok(Some(again)) if again == start_time => {
                    self.cache.insert(
                        pid,
                        Cached {
                            start_time,
                            passwd_generation: generation,
                            record: record.clone(),
                            handle,
                        },
                    );
                    return Ok(record);
                }
                Ok(None) => {
                    self.cache.remove(&pid);
                    return Ok(record);
                }
                Ok(Some(_)) if attempts < 2 => {
                    self.cache.remove(&pid);
                }
                Ok(Some(_)) => {
                    self.cache.remove(&pid);
                    return Err(Unattributed {
                        reason: format!("process {pid} was replaced while it was read"),
                    });
                }
                Err(e) => return Err(self.proc_error(pid, e)),
            }
        }
    }

    fn allocations(&mut self) -> Result<Vec<super::Allocation>, Unattributed> {
        if self.kubelet.is_off() {
            return Ok(Vec::new());
        }
        self.ensure_runtime()?;
        let result = match &self.runtime {
            Some(runtime) => runtime.block_on(self.kubelet.list()),
            None => Err(no_runtime()),
        };
        let listed = self.after_kubelet_call(result)?;
        let due = self
            .allocatable
            .is_none_or(|(_, at)| at.elapsed() >= ALLOCATABLE_EVERY);
        if due {
            // Unimplemented (older kubelets) or a failure leaves it unknown.
            let count = self.allocatable().ok().flatten().map(|devices| {
                devices.iter().map(|r| r.device_ids.len() as u32).sum::<u32>()
            });
            self.allocatable = count.map(|n| (n, std::time::Instant::now()));
        }
        Ok(listed)
    }

    fn allocatable_devices(&self) -> Option<u32> {
        self.allocatable.map(|(n, _)| n)
    }
}

/// How often `GetAllocatableResources` is asked.
const ALLOCATABLE_EVERY: Duration = Duration::from_secs(60);

/// Handles held at most: a quarter of the soft open-files limit (the
/// daemon's sockets need the rest), at most [`MAX_HANDLES`]; none on a
/// fixture tree, where a held file outlives its removal and would hide an
/// exit.
fn handle_budget(proc: &ProcFs) -> usize {
    if !proc.is_kernel_procfs() {
        return 0;
    }
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        })
        .unwrap_or(1024);
    (soft / 4).min(MAX_HANDLES)
}

/// The most handles held, whatever the open-files limit.
pub const MAX_HANDLES: usize = 4096;

fn no_runtime() -> Unattributed {
    Unattributed {
        reason: "the kubelet client's runtime is missing".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::{error::Error, fs, path::Path};

    use super::*;
    use crate::attribution::{
        Allocation, Container, PodRef, Runtime, SlurmJob,
        fixture::{FakeProc, FakeProcess, config, write_passwd},
        podresources::fake_kubelet::{self, FakeKubelet},
    };

    type TestResult = Result<(), Box<dyn Error>>;

    const CTR: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
    const DKR: &str = "d0cce400d0cce400d0cce400d0cce400d0cce400d0cce400d0cce400d0cce400";
    const PDM: &str = "9d3a9d3a9d3a9d3a9d3a9d3a9d3a9d3a9d3a9d3a9d3a9d3a9d3a9d3a9d3a9d3a";
    const CRIO: &str = "c310c310c310c310c310c310c310c310c310c310c310c310c310c310c310c310";
    const POD_UID: &str = "6b1d2c3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";

    fn container(id: &str, runtime: Runtime) -> Option<Container> {
        Some(Container {
            id: id.to_owned(),
            runtime,
        })
    }

    /// A host: every owner shape, plus the broken ones.
    fn host(dir: &Path) -> Result<FakeProc, Box<dyn Error>> {
        let proc = FakeProc::new(dir.join("proc"))?;
        write_passwd(
            &dir.join("passwd"),
            &[("root", 0), ("alice", 1000), ("slurmuser", 2001)],
        )?;
        let uid_ = POD_UID.replace('-', "_");
        proc.add(
            &FakeProcess::new(
                101,
                "python3",
                1000,
                &format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{CTR}.scope\n"
                ),
            )
            .args(&["python3", "train.py", "--hf-token=hf_secret", "--epochs", "3"]),
        )?;
        proc.add(&FakeProcess::new(
            102,
            "infer",
            0,
            &format!("0::/system.slice/docker-{DKR}.scope\n"),
        ))?;
        proc.add(&FakeProcess::new(
            103,
            "render",
            1000,
            &format!("0::/machine.slice/libpod-{PDM}.scope\n"),
        ))?;
        proc.add(&FakeProcess::new(
            104,
            "vllm",
            0,
            &format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-{CRIO}.scope\n"),
        ))?;
        proc.add(&FakeProcess::new(
            105,
            "a.out",
            2001,
            "11:devices:/slurm/uid_2001/job_4242/step_0/task_0\n1:name=systemd:/system.slice/slurmd.service\n",
        ))?;
        proc.add(&FakeProcess::new(
            106,
            "a.out",
            2001,
            "0::/system.slice/slurmstepd.scope/job_4243/step_batch/user/task_0\n",
        ))?;
        proc.add(&FakeProcess::new(
            107,
            "gpu-burn",
            0,
            "0::/system.slice/gpu-job.service\n",
        ))?;
        proc.add(
            &FakeProcess::new(
                108,
                "jupyter",
                1000,
                "0::/user.slice/user-1000.slice/session-3.scope\n",
            )
            .args(&[
                "jupyter",
                "--password",
                "pw",
                "https://alice:pw@hub.example.com/x",
            ]),
        )?;
        // uid 3000 is in no passwd entry.
        proc.add(&FakeProcess::new(109, "orphan", 3000, "0::/\n"))?;
        // Unreadable cgroup files. As root, permission bits do not stop a
        // read, so "unreadable" is simulated with a directory where the file
        // should be (EISDIR) and with a dangling symlink (ENOENT while the
        // pid's directory exists).
        proc.add(&FakeProcess::new(110, "hidden", 1000, ""))?;
        fs::remove_file(proc.dir(110).join("cgroup"))?;
        fs::create_dir(proc.dir(110).join("cgroup"))?;
        proc.add(&FakeProcess::new(111, "hidden2", 1000, ""))?;
        fs::remove_file(proc.dir(111).join("cgroup"))?;
        std::os::unix::fs::symlink(dir.join("nowhere"), proc.dir(111).join("cgroup"))?;
        Ok(proc)
    }

    fn record(
        pid: u32,
        name: &str,
        uid: u32,
        user: Option<&str>,
        cgroup: &str,
        owner: Owner,
    ) -> ProcessRecord {
        ProcessRecord {
            pid,
            name: Some(name.to_owned()),
            command_line: None,
            uid: Some(uid),
            user: user.map(str::to_owned),
            cgroup: Some(cgroup.to_owned()),
            owner,
        }
    }

    fn expected() -> Vec<ProcessRecord> {
        let uid_ = POD_UID.replace('-', "_");
        vec![
            record(
                101,
                "python3",
                1000,
                Some("alice"),
                &format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{CTR}.scope"
                ),
                Owner {
                    container: container(CTR, Runtime::Containerd),
                    pod_uid: Some(POD_UID.to_owned()),
                    ..Owner::default()
                },
            ),
            record(
                102,
                "infer",
                0,
                Some("root"),
                &format!("/system.slice/docker-{DKR}.scope"),
                Owner {
                    container: container(DKR, Runtime::Docker),
                    ..Owner::default()
                },
            ),
            record(
                103,
                "render",
                1000,
                Some("alice"),
                &format!("/machine.slice/libpod-{PDM}.scope"),
                Owner {
                    container: container(PDM, Runtime::Podman),
                    ..Owner::default()
                },
            ),
            record(
                104,
                "vllm",
                0,
                Some("root"),
                &format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{CRIO}.scope"),
                Owner {
                    container: container(CRIO, Runtime::CriO),
                    pod_uid: Some(POD_UID.to_owned()),
                    ..Owner::default()
                },
            ),
            record(
                105,
                "a.out",
                2001,
                Some("slurmuser"),
                "/slurm/uid_2001/job_4242/step_0/task_0",
                Owner {
                    slurm: Some(SlurmJob {
                        job_id: "4242".to_owned(),
                        step: Some("0".to_owned()),
                        uid: Some(2001),
                    }),
                    ..Owner::default()
                },
            ),
            record(
                106,
                "a.out",
                2001,
                Some("slurmuser"),
                "/system.slice/slurmstepd.scope/job_4243/step_batch/user/task_0",
                Owner {
                    slurm: Some(SlurmJob {
                        job_id: "4243".to_owned(),
                        step: Some("batch".to_owned()),
                        uid: None,
                    }),
                    systemd_unit: Some("slurmstepd.scope".to_owned()),
                    ..Owner::default()
                },
            ),
            record(
                107,
                "gpu-burn",
                0,
                Some("root"),
                "/system.slice/gpu-job.service",
                Owner {
                    systemd_unit: Some("gpu-job.service".to_owned()),
                    ..Owner::default()
                },
            ),
            record(
                108,
                "jupyter",
                1000,
                Some("alice"),
                "/user.slice/user-1000.slice/session-3.scope",
                Owner {
                    systemd_unit: Some("session-3.scope".to_owned()),
                    ..Owner::default()
                },
            ),
            record(109, "orphan", 3000, None, "/", Owner::default()),
        ]
    }

    #[test]
    fn every_fixture_process_is_attributed_field_by_field() -> TestResult {
        let dir = tempfile::tempdir()?;
        host(dir.path())?;
        let mut source = HostSource::new(&config(dir.path()));
        for want in expected() {
            assert_eq!(source.process(want.pid)?, want, "pid {}", want.pid);
        }
        Ok(())
    }

    #[test]
    fn unreadable_cgroup_files_are_unattributed_with_the_path_and_error() -> TestResult {
        let dir = tempfile::tempdir()?;
        let proc = host(dir.path())?;
        let mut source = HostSource::new(&config(dir.path()));
        let as_dir = source
            .process(110)
            .err()
            .ok_or("a directory is no cgroup file")?;
        let path = proc.dir(110).join("cgroup");
        assert!(
            as_dir
                .reason
                .starts_with(&format!("cannot read {}: ", path.display())),
            "{}",
            as_dir.reason
        );
        assert!(as_dir.reason.contains("directory"), "{}", as_dir.reason);
        let dangling = source
            .process(111)
            .err()
            .ok_or("a dangling link is no cgroup file")?;
        let path = proc.dir(111).join("cgroup");
        assert!(
            dangling
                .reason
                .starts_with(&format!("cannot read {}: ", path.display())),
            "{}",
            dangling.reason
        );
        assert_eq!(source.cached(), 0, "failures are not cached");
        Ok(())
    }

    #[test]
    fn a_pid_that_vanishes_between_calls_is_unattributed_and_evicted() -> TestResult {
        let dir = tempfile::tempdir()?;
        let proc = host(dir.path())?;
        let mut source = HostSource::new(&config(dir.path()));
        assert_eq!(source.process(102)?.name.as_deref(), Some("infer"));
        assert_eq!(source.cached(), 1);
        proc.remove(102)?;
        let gone = source
            .process(102)
            .err()
            .ok_or("an exited process has no record")?;
        assert_eq!(
            gone.reason,
            format!(
                "no {}: process 102 has exited, or is hidden from this daemon (another pid namespace, or hidepid / ProtectProc)",
                proc.dir(102).display()
            )
        );
        assert_eq!(source.cached(), 0);
        let never = source.process(4_000_000).err().ok_or("no such pid")?;
        assert!(
            never.reason.contains("process 4000000 has exited"),
            "{}",
            never.reason
        );
        Ok(())
    }

    #[test]
    fn a_cached_process_is_not_reread_until_its_start_time_changes() -> TestResult {
        let dir = tempfile::tempdir()?;
        let proc = host(dir.path())?;
        let mut source = HostSource::new(&config(dir.path()));
        let first = source.process(107)?;
        // Same process (same start time), files rewritten: the cache answers.
        let mut same = FakeProcess::new(107, "other", 1000, "0::/system.slice/other.service\n");
        same.start_time = 1107;
        proc.add(&same)?;
        assert_eq!(source.process(107)?, first);
        // The pid is reused by a new process: read afresh.
        same.start_time = 99_999;
        proc.add(&same)?;
        let reused = source.process(107)?;
        assert_eq!(reused.name.as_deref(), Some("other"));
        assert_eq!(reused.user.as_deref(), Some("alice"));
        assert_eq!(reused.owner.systemd_unit.as_deref(), Some("other.service"));
        Ok(())
    }

    #[test]
    fn exited_pids_are_swept_from_the_cache() -> TestResult {
        let dir = tempfile::tempdir()?;
        let proc = host(dir.path())?;
        let mut source = HostSource::new(&config(dir.path()));
        for pid in 101..=109 {
            source.process(pid)?;
        }
        assert_eq!(source.cached(), 9);
        for pid in 101..=105 {
            proc.remove(pid)?;
        }
        // Never asked about again: only the sweep can drop them.
        for _ in 0..SWEEP_EVERY {
            source.process(107)?;
        }
        assert_eq!(source.cached(), 4);
        Ok(())
    }

    #[test]
    fn command_lines_follow_the_configuration() -> TestResult {
        let dir = tempfile::tempdir()?;
        host(dir.path())?;
        let mut off = HostSource::new(&config(dir.path()));
        assert_eq!(off.process(101)?.command_line, None);

        let mut redacted = HostSource::new(&AttributionConfig {
            command_lines: CommandLines::Redacted,
            ..config(dir.path())
        });
        assert_eq!(
            redacted.process(101)?.command_line.as_deref(),
            Some("python3 train.py --hf-token=*** --epochs 3")
        );
        assert_eq!(
            redacted.process(108)?.command_line.as_deref(),
            Some("jupyter --password *** https://alice:***@hub.example.com/x")
        );

        let mut full = HostSource::new(&AttributionConfig {
            command_lines: CommandLines::Full,
            command_line_max_bytes: 20,
            ..config(dir.path())
        });
        assert_eq!(
            full.process(101)?.command_line.as_deref(),
            Some("python3 train.py --h")
        );
        Ok(())
    }

    #[test]
    fn a_minimal_tree_without_stat_status_or_comm_still_gives_the_owner_uncached() -> TestResult {
        let dir = tempfile::tempdir()?;
        let proc = host(dir.path())?;
        for file in ["stat", "status", "comm"] {
            fs::remove_file(proc.dir(102).join(file))?;
        }
        let mut source = HostSource::new(&config(dir.path()));
        let record = source.process(102)?;
        assert_eq!(record.name, None);
        assert_eq!(record.uid, None);
        assert_eq!(record.user, None);
        assert_eq!(record.owner.container, container(DKR, Runtime::Docker));
        assert_eq!(
            source.cached(),
            0,
            "no start time: nothing to key the cache on"
        );
        // Read in full each call: a changed cgroup is seen at once.
        fs::write(
            proc.dir(102).join("cgroup"),
            "0::/system.slice/moved.service\n",
        )?;
        assert_eq!(
            source.process(102)?.owner.systemd_unit.as_deref(),
            Some("moved.service")
        );
        proc.remove(102)?;
        let gone = source.process(102).err().ok_or("gone")?;
        assert!(
            gone.reason.contains("process 102 has exited"),
            "{}",
            gone.reason
        );
        Ok(())
    }

    #[test]
    fn a_stat_without_a_start_time_is_read_uncached() -> TestResult {
        let dir = tempfile::tempdir()?;
        let proc = host(dir.path())?;
        fs::write(proc.dir(107).join("stat"), "107 (gpu-burn) S 1\n")?;
        let mut source = HostSource::new(&config(dir.path()));
        assert_eq!(source.process(107)?.name.as_deref(), Some("gpu-burn"));
        assert_eq!(source.cached(), 0);
        Ok(())
    }

    #[test]
    fn an_unreadable_command_line_leaves_only_the_command_line_out() -> TestResult {
        let dir = tempfile::tempdir()?;
        let proc = host(dir.path())?;
        fs::remove_file(proc.dir(107).join("cmdline"))?;
        fs::create_dir(proc.dir(107).join("cmdline"))?;
        let mut source = HostSource::new(&AttributionConfig {
            command_lines: CommandLines::Full,
            ..config(dir.path())
        });
        let record = source.process(107)?;
        assert_eq!(record.command_line, None);
        assert_eq!(
            record.owner.systemd_unit.as_deref(),
            Some("gpu-job.service")
        );
        Ok(())
    }

    #[test]
    fn user_names_follow_the_passwd_file_for_cached_processes() -> TestResult {
        let dir = tempfile::tempdir()?;
        host(dir.path())?;
        let mut source = HostSource::new(&config(dir.path()));
        source.passwd = Passwd::new(dir.path().join("passwd"), Duration::ZERO);
        assert_eq!(source.process(101)?.user.as_deref(), Some("alice"));
        write_passwd(&dir.path().join("passwd"), &[("alicia", 1000)])?;
        assert_eq!(source.process(101)?.user.as_deref(), Some("alicia"));
        fs::remove_file(dir.path().join("passwd"))?;
        let record = source.process(101)?;
        assert_eq!(record.user, None);
        assert_eq!(record.uid, Some(1000));
        Ok(())
    }

    fn pod(ns: &str, name: &str, container: &str) -> PodRef {
        PodRef {
            namespace: ns.to_owned(),
            pod: name.to_owned(),
            container: container.to_owned(),
        }
    }

    #[test]
    fn allocations_come_from_the_kubelet_including_an_idle_pod_and_recover_after_it_restarts()
    -> TestResult {
        let dir = tempfile::tempdir()?;
        host(dir.path())?;
        let socket = dir.path().join("kubelet.sock");
        let served = fake_kubelet::serve(fake_kubelet::node(), &socket)?;
        let mut source = HostSource::new(&AttributionConfig {
            pod_resources_socket: socket.clone(),
            pod_resources_timeout: Duration::from_secs(2),
            ..config(dir.path())
        });
        let allocations = source.allocations()?;
        assert_eq!(source.kubelet_status(), &KubeletStatus::Answered);
        // The notebook pod holds GPU-cccc and no process runs on it: the
        // allocation is there for the integrator's allocated-but-idle join.
        assert!(allocations.contains(&Allocation {
            pod: pod("ml", "idle-notebook", "notebook"),
            resource_name: "nvidia.com/gpu".to_owned(),
            device_ids: vec!["GPU-cccc".to_owned()],
        }));
        assert!(
            allocations
                .iter()
                .any(|a| a.resource_name == "nvidia.com/mig-1g.10gb")
        );
        assert!(
            allocations
                .iter()
                .all(|a| a.resource_name.starts_with("nvidia.com/"))
        );
        assert_eq!(allocations.len(), 4);
        assert_eq!(source.allocatable()?.map(|d| d.len()), Some(2));

        drop(served);
        let deadline = Instant::now() + Duration::from_secs(10);
        let failed = loop {
            match source.allocations() {
                Err(e) => break e,
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(_) => return Err("a stopped kubelet kept answering".into()),
            }
        };
        assert!(
            failed.reason.contains(&socket.display().to_string()),
            "{}",
            failed.reason
        );
        assert!(matches!(
            source.kubelet_status(),
            KubeletStatus::Failed { .. }
        ));

        fs::remove_file(&socket)?;
        let _served = fake_kubelet::serve(
            FakeKubelet {
                allocatable: None,
                ..fake_kubelet::node()
            },
            &socket,
        )?;
        assert_eq!(source.allocations()?.len(), 4);
        assert_eq!(source.allocatable()?, None, "Unimplemented is no error");
        assert_eq!(source.kubelet_status(), &KubeletStatus::Answered);
        Ok(())
    }

    #[test]
    fn a_slow_kubelet_is_unattributed_within_the_timeout() -> TestResult {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("kubelet.sock");
        let _served = fake_kubelet::serve(
            FakeKubelet {
                delay: Duration::from_secs(30),
                ..fake_kubelet::node()
            },
            &socket,
        )?;
        let mut source = HostSource::new(&AttributionConfig {
            pod_resources_socket: socket.clone(),
            pod_resources_timeout: Duration::from_millis(150),
            ..config(dir.path())
        });
        let started = Instant::now();
        let err = source
            .allocations()
            .err()
            .ok_or("a slow kubelet must fail")?;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            err.reason,
            format!(
                "kubelet pod-resources socket {}: List timed out after 150ms",
                socket.display()
            )
        );
        Ok(())
    }

    #[test]
    fn no_kubelet_is_an_empty_answer_not_an_error() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut off = HostSource::new(&config(dir.path()));
        assert_eq!(off.allocations()?, vec![]);
        assert_eq!(off.kubelet_status(), &KubeletStatus::Off);
        let missing = dir.path().join("no/kubelet.sock");
        let mut absent = HostSource::new(&AttributionConfig {
            pod_resources_socket: missing.clone(),
            ..config(dir.path())
        });
        assert_eq!(absent.allocations()?, vec![]);
        assert_eq!(absent.allocations()?, vec![]);
        assert_eq!(
            absent.kubelet_status(),
            &KubeletStatus::NoSocket { path: missing }
        );
        Ok(())
    }

    /// Captures what is logged at `warn` and above.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let text = self
                .0
                .lock()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default();
            text.lines().map(str::to_owned).collect()
        }
    }

    #[test]
    fn each_distinct_problem_is_warned_once_not_every_tick() -> TestResult {
        let dir = tempfile::tempdir()?;
        host(dir.path())?;
        let socket = dir.path().join("kubelet.sock");
        // A socket file nobody listens on: every call is refused.
        drop(std::os::unix::net::UnixListener::bind(&socket)?);
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || -> TestResult {
            let mut source = HostSource::new(&AttributionConfig {
                pod_resources_socket: socket.clone(),
                ..config(dir.path())
            });
            for _ in 0..5 {
                assert!(source.process(110).is_err());
                assert!(source.process(111).is_err());
                assert!(source.process(4_000_000).is_err());
                assert!(source.allocations().is_err());
            }
            Ok(())
        })?;
        let lines = captured.lines();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert_eq!(
            lines.iter().filter(|l| l.contains("/110/cgroup")).count(),
            1,
            "{lines:#?}"
        );
        assert_eq!(
            lines.iter().filter(|l| l.contains("/111/cgroup")).count(),
            1,
            "{lines:#?}"
        );
        assert_eq!(
            lines.iter().filter(|l| l.contains("kubelet.sock")).count(),
            1,
            "{lines:#?}"
        );
        assert!(lines.iter().all(|l| l.contains("WARN")), "{lines:#?}");
        Ok(())
    }

    #[tokio::test]
    async fn called_inside_a_tokio_runtime_it_refuses_instead_of_panicking() {
        let dir = std::env::temp_dir();
        let mut source = HostSource::new(&AttributionConfig {
            pod_resources_socket: dir.join("gpuwatch-no-such-kubelet.sock"),
            ..config(&dir)
        });
        let err = source.allocations().err();
        assert!(err.is_some_and(|e| e.reason.contains("inside a tokio runtime")));
    }

    #[test]
    fn a_real_process_on_this_hosts_proc_is_read_and_its_exit_seen() -> TestResult {
        let mut child = std::process::Command::new("sleep").arg("30").spawn()?;
        let pid = child.id();
        // `spawn` returns once the child's exec has replaced its memory,
        // which is before the kernel has laid out the new argument area:
        // for a moment its `comm` is `sleep` and its `cmdline` still empty.
        // A process a GPU reports is long past that; wait it out here.
        let cmdline = format!("/proc/{pid}/cmdline");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while fs::read(&cmdline)?.is_empty() {
            assert!(std::time::Instant::now() < deadline, "{cmdline} stayed empty");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let own_uid = fs::read_to_string("/proc/self/status")?
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().next()?.parse::<u32>().ok());
        let mut source = HostSource::new(&AttributionConfig {
            proc_root: "/proc".into(),
            passwd_file: "/etc/passwd".into(),
            command_lines: CommandLines::Full,
            pod_resources_socket: "".into(),
            ..AttributionConfig::default()
        });
        let record = source.process(pid);
        let again = source.process(pid);
        let handles = source.handles();
        child.kill()?;
        child.wait()?;
        let record = record?;
        assert_eq!(again?, record, "the cached record");
        assert_eq!(handles, 1, "the kernel's procfs: a handle is held");
        assert_eq!(record.pid, pid);
        assert_eq!(record.name.as_deref(), Some("sleep"));
        assert_eq!(record.command_line.as_deref(), Some("sleep 30"));
        assert_eq!(record.uid, own_uid);
        assert!(record.cgroup.is_some_and(|c| c.starts_with('/')));
        let gone = source
            .process(pid)
            .err()
            .ok_or("a reaped child has no record")?;
        assert!(
            gone.reason.contains(&format!("process {pid} has exited")),
            "{}",
            gone.reason
        );
        assert_eq!(source.cached(), 0);
        assert_eq!(source.handles(), 0);
        Ok(())
    }

    #[test]
    fn the_sweep_drops_real_processes_whose_held_handle_says_they_are_gone() -> TestResult {
        let mut a = std::process::Command::new("sleep").arg("30").spawn()?;
        let mut b = std::process::Command::new("sleep").arg("30").spawn()?;
        let mut source = HostSource::new(&AttributionConfig {
            proc_root: "/proc".into(),
            pod_resources_socket: "".into(),
            ..AttributionConfig::default()
        });
        let read = source.process(a.id()).and(source.process(b.id()));
        let held = source.handles();
        a.kill()?;
        a.wait()?;
        source.evict_exited();
        let after = (source.cached(), source.handles());
        b.kill()?;
        b.wait()?;
        read?;
        assert_eq!(held, 2);
        assert_eq!(after, (1, 1));
        Ok(())
    }

    #[test]
    fn the_cost_fixture_is_all_attributed() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (config, pids) = crate::attribution::fixture::cost_tree(dir.path())?;
        assert_eq!(pids.len(), 512);
        let mut source = HostSource::new(&config);
        let per_tick = crate::attribution::fixture::time_ticks(&mut source, &pids, 1)?;
        assert!(per_tick > Duration::ZERO);
        let containers: HashSet<String> = pids
            .iter()
            .map(|pid| {
                source
                    .process(*pid)
                    .ok()
                    .and_then(|r| r.owner.container)
                    .map(|c| c.id)
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(containers.len(), 16);
        assert!(!containers.contains(""));
        assert_eq!(source.cached(), 512);
        assert_eq!(source.handles(), 0, "a fixture tree holds no handles");
        Ok(())
    }
}
