//! What knowing who uses each GPU costs (issue 13): 8 simulated GPUs × 64
//! processes across 16 containers (two pods per GPU), at 10 Hz with the
//! slow cadence at 1 s, the daemon's CPU with attribution off and on in the
//! same run, alternating, so the difference is attribution's own cost.
//!
//! Three sources are priced: the simulator's declared workloads (the join,
//! the change tracking and the wider frames alone); the host source over
//! the kernel's `/proc`, for 512 real processes this harness starts (what
//! a real host costs, cgroups and all, without the pods); and the host
//! source over a fixture `/proc` and cgroup tree written here (pods and
//! containers, but on a plain file tree, where the host source cannot hold
//! a process's `comm` open and re-reads its `stat` every slow tick: a path
//! only test trees take, dearer than the kernel's).

use std::{fmt::Write as _, fs, path::Path, thread, time::Duration};

use anyhow::Context;

use crate::{
    Common,
    daemon::{Daemon, DaemonSpec},
    idle::sleep_watching,
    proc,
    report::{Figure, Target},
};

const GPUS: u32 = 8;
const PER_GPU: u32 = 64;
const CONTAINERS: u32 = 16;

/// The `[simulator]` section: GPU g runs `pid(g, i)` for i < 64, the
/// first half in pod `job-(2g)`, the second in `job-(2g+1)`.
fn simulator(pid: impl Fn(u32, u32) -> u32) -> String {
    let mut s = String::from("[simulator]\nspeed = 1.0\n");
    for g in 0..GPUS {
        s.push_str(
            "\n[[simulator.gpus]]\npreset = \"h100-sxm\"\ndemand = [ { at = \"0s\", watts = 500.0 } ]\nprocesses = [\n",
        );
        for i in 0..PER_GPU {
            let pid = pid(g, i);
            let pod = container_of(g, i);
            let _ = writeln!(
                s,
                "  {{ pid = {pid}, name = \"worker\", uid = 1000, memory_mib = 1000, namespace = \"bench\", pod = \"job-{pod}\", container = \"main\" }},"
            );
        }
        s.push_str("]\n");
    }
    s
}

fn pid(g: u32, i: u32) -> u32 {
    100_000 + g * PER_GPU + i
}

fn container_of(g: u32, i: u32) -> u32 {
    g * (CONTAINERS / GPUS) + i / (PER_GPU / (CONTAINERS / GPUS))
}

/// A fixture `/proc` and cgroup tree for every simulated pid: a
/// containerd container per pod, kubelet's systemd cgroup driver.
fn fixture(root: &Path) -> anyhow::Result<()> {
    let proc_root = root.join("proc");
    for g in 0..GPUS {
        for i in 0..PER_GPU {
            let pid = pid(g, i);
            let c = container_of(g, i);
            let dir = proc_root.join(pid.to_string());
            fs::create_dir_all(&dir)?;
            let id = format!("{c:064x}");
            let uid = format!("{c:08x}_0000_4000_8000_{c:012x}");
            fs::write(dir.join("comm"), "worker\n")?;
            fs::write(
                dir.join("status"),
                format!("Name:\tworker\nPid:\t{pid}\nUid:\t1000\t1000\t1000\t1000\n"),
            )?;
            fs::write(
                dir.join("cgroup"),
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{id}.scope\n"
                ),
            )?;
            fs::write(
                dir.join("stat"),
                format!(
                    "{pid} (worker) S 1 {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 {} 0 0\n",
                    1000 + pid
                ),
            )?;
            fs::write(dir.join("cmdline"), "worker\0--job\0bench\0")?;
        }
    }
    fs::create_dir_all(root.join("cgroup"))?;
    fs::write(
        root.join("passwd"),
        "bench:x:1000:1000::/home/bench:/bin/sh\n",
    )?;
    Ok(())
}

/// Processes that live as long as the value: the kernel's `/proc` entries
/// the host source reads in the kernel variant.
struct Sleepers(Vec<std::process::Child>);

impl Sleepers {
    fn start(n: u32) -> anyhow::Result<Self> {
        let mut children = Vec::new();
        for _ in 0..n {
            children.push(
                std::process::Command::new("sleep")
                    .arg("3600")
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .context("starting a `sleep` for the kernel /proc variant")?,
            );
        }
        Ok(Self(children))
    }

    fn pid(&self, g: u32, i: u32) -> u32 {
        self.0[(g * PER_GPU + i) as usize].id()
    }
}

impl Drop for Sleepers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn attribution(common: &Common) -> anyhow::Result<Figure> {
    let mut fig = Figure::new(
        "attribution",
        format!(
            "attribution: {GPUS} GPUs × {PER_GPU} processes in {CONTAINERS} containers, 10 Hz, slow cadence 1 s"
        ),
        common.runs(3),
        common.quick,
    );
    let window = common.pick(Duration::from_secs(20), Duration::from_secs(2));
    let warmup = common.pick(Duration::from_secs(4), Duration::from_secs(1));
    let tree = tempfile::tempdir().context("fixture tree")?;
    fixture(tree.path())?;
    let host = format!(
        "[attribution]\nproc_root = \"{0}/proc\"\ncgroup_root = \"{0}/cgroup\"\npasswd_file = \"{0}/passwd\"\npod_resources_socket = \"\"\n",
        tree.path().display()
    );
    let sleepers = Sleepers::start(GPUS * PER_GPU)?;
    let kernel = "[attribution]\nsource = \"host\"\nproc_root = \"/proc\"\ncgroup_root = \"/sys/fs/cgroup\"\npasswd_file = \"/etc/passwd\"\npod_resources_socket = \"\"\n".to_owned();
    // Name, `[attribution]`, the pids the simulated GPUs report.
    let variants = [
        ("off", "[attribution]\nenabled = false\n".to_owned(), false),
        ("simulator records", String::new(), false),
        ("host records (kernel /proc)", kernel, true),
        ("host records (fixture /proc)", host, false),
    ];
    for run in 1..=fig.runs {
        let mut cpu = Vec::new();
        for (name, extra, real) in &variants {
            let simulator_toml = if *real {
                simulator(|g, i| sleepers.pid(g, i))
            } else {
                simulator(pid)
            };
            let spec = DaemonSpec {
                extra_toml: extra.clone(),
                simulator_toml: Some(simulator_toml),
                ..DaemonSpec::fleet(GPUS, Duration::from_millis(100))
            };
            let mut daemon = Daemon::start(&common.server, &spec)?;
            thread::sleep(warmup);
            let meter = proc::CpuMeter::start(&[daemon.pid])?;
            sleep_watching(&mut daemon, window)?;
            let (c, _) = meter.percent()?;
            let rss = proc::rss_mib(daemon.pid)?;
            daemon.stop()?;
            eprintln!(
                "  run {run}: attribution {name}: daemon CPU {c:.2} % of a core, RSS {rss:.1} MiB"
            );
            fig.record(
                &format!("daemon CPU, attribution {name}"),
                "% core",
                None,
                c,
            );
            fig.record(&format!("daemon RSS, attribution {name}"), "MiB", None, rss);
            cpu.push(c);
        }
        fig.record(
            "CPU above off: simulator records",
            "% core",
            Some(Target::AtMost(0.5)),
            cpu[1] - cpu[0],
        );
        fig.record(
            "CPU above off: host records, kernel /proc",
            "% core",
            Some(Target::AtMost(0.5)),
            cpu[2] - cpu[0],
        );
        // A path only test trees take: reported, not held to the target.
        fig.record(
            "CPU above off: host records, fixture /proc",
            "% core",
            None,
            cpu[3] - cpu[0],
        );
    }
    drop(sleepers);
    fig.note(
        "the four daemons run one after the other within each run; the difference to `off` is attribution's cost: reading the records, the join, the change tracking, and the wider samples every frame carries. The kernel /proc variant reads 512 `sleep` processes this harness starts (no pods); the fixture variant has pods but takes the plain-file path, which re-reads each process's `stat` every slow tick",
    );
    Ok(fig.finish())
}
