//! Fake `/proc` trees for attribution's tests and its cost figure: writes
//! the files `procfs` reads (`stat`, `comm`, `status`, `cmdline`,
//! `cgroup`) for declared processes, and a passwd file.
//!
//! Exists so the host source is tested on the same files a host has,
//! without the host, and so the benchmark harness (the integrator's
//! `gpuwatch-bench` figure) and `examples/attribution_cost.rs` can build
//! the 8 GPUs × 64 processes × 16 containers tree and time a slow
//! tick over it. Test-only: compiled for tests and the `testing` feature.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{AttributionConfig, CommandLines, HostRecords, Unattributed};

/// One process to write into a fake `/proc`.
#[derive(Debug, Clone)]
pub struct FakeProcess {
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub args: Vec<String>,
    /// The `cgroup` file's full text.
    pub cgroup: String,
    /// `stat` field 22.
    pub start_time: u64,
}

impl FakeProcess {
    pub fn new(pid: u32, comm: &str, uid: u32, cgroup: &str) -> Self {
        Self {
            pid,
            comm: comm.to_owned(),
            uid,
            args: vec![comm.to_owned()],
            cgroup: cgroup.to_owned(),
            start_time: 1000 + u64::from(pid),
        }
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }
}

/// A fake `/proc` at `root`.
#[derive(Debug, Clone)]
pub struct FakeProc {
    root: PathBuf,
}

impl FakeProc {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// Writes (or rewrites) a process's files.
    pub fn add(&self, p: &FakeProcess) -> io::Result<()> {
        let dir = self.dir(p.pid);
        fs::create_dir_all(&dir)?;
        // Fields 3..=22 after the name: state, then 18 numbers, then the
        // start time; a few more after it, as the kernel writes.
        let stat = format!(
            "{} ({}) S 1 {} {} 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 {} 12345678 300 18446744073709551615\n",
            p.pid, p.comm, p.pid, p.pid, p.start_time
        );
        fs::write(dir.join("stat"), stat)?;
        fs::write(dir.join("comm"), format!("{}\n", p.comm))?;
        fs::write(
            dir.join("status"),
            format!(
                "Name:\t{}\nUmask:\t0022\nState:\tS (sleeping)\nPid:\t{}\nUid:\t{}\t{}\t{}\t{}\nGid:\t100\t100\t100\t100\n",
                p.comm, p.pid, p.uid, p.uid, p.uid, p.uid
            ),
        )?;
        let mut cmdline = Vec::new();
        for arg in &p.args {
            cmdline.extend_from_slice(arg.as_bytes());
            cmdline.push(0);
        }
        fs::write(dir.join("cmdline"), cmdline)?;
        fs::write(dir.join("cgroup"), &p.cgroup)?;
        Ok(())
    }

    /// The process exits.
    pub fn remove(&self, pid: u32) -> io::Result<()> {
        fs::remove_dir_all(self.dir(pid))
    }
}

/// Writes a passwd file with `(name, uid)` entries.
pub fn write_passwd(path: &Path, users: &[(&str, u32)]) -> io::Result<()> {
    let text: String = users
        .iter()
        .map(|(name, uid)| format!("{name}:x:{uid}:{uid}::/home/{name}:/bin/sh\n"))
        .collect();
    fs::write(path, text)
}

/// A configuration reading the fixture tree under `dir` (`proc/`,
/// `passwd`), with no kubelet.
pub fn config(dir: &Path) -> AttributionConfig {
    AttributionConfig {
        proc_root: dir.join("proc"),
        cgroup_root: dir.join("cgroup"),
        passwd_file: dir.join("passwd"),
        pod_resources_socket: PathBuf::new(),
        command_lines: CommandLines::Off,
        ..AttributionConfig::default()
    }
}

/// The cost fixture under `dir`: 8 GPUs × 64 processes across 16
/// containerd pod containers (two per GPU, 32 processes each). Returns
/// the configuration and the 512 pids.
pub fn cost_tree(dir: &Path) -> io::Result<(AttributionConfig, Vec<u32>)> {
    let proc = FakeProc::new(dir.join("proc"))?;
    write_passwd(&dir.join("passwd"), &[("root", 0), ("trainer", 1000)])?;
    let mut pids = Vec::with_capacity(512);
    for gpu in 0..8u32 {
        for n in 0..64u32 {
            let container = gpu * 2 + n / 32;
            let pid = 10_000 + gpu * 64 + n;
            let id = format!("{container:064x}");
            let pod = format!("00000000-0000-4000-8000-{container:012x}");
            let cgroup = format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope\n",
                pod.replace('-', "_")
            );
            proc.add(&FakeProcess::new(pid, "python3", 1000, &cgroup).args(&[
                "python3",
                "train.py",
                "--rank",
                &n.to_string(),
            ]))?;
            pids.push(pid);
        }
    }
    Ok((config(dir), pids))
}

/// Times `ticks` slow ticks of `source.process` over `pids` after one
/// warm-up tick (the cache full, as on a steady host); the mean per tick.
/// Fails if any pid is unattributed in the warm-up tick: a figure over
/// failed reads would measure the wrong thing.
pub fn time_ticks(
    source: &mut dyn HostRecords,
    pids: &[u32],
    ticks: u32,
) -> Result<Duration, Unattributed> {
    for pid in pids {
        source.process(*pid)?;
    }
    let started = Instant::now();
    for _ in 0..ticks {
        for pid in pids {
            let _ = std::hint::black_box(source.process(*pid));
        }
    }
    Ok(started.elapsed() / ticks.max(1))
}
