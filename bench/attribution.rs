//! What knowing who uses each GPU costs (issue 13): 8 simulated GPUs × 64
//! processes across 16 containers (two pods per GPU), at 10 Hz with the
//! slow cadence at 1 s, the daemon's CPU with attribution off and on in the
//! same run, alternating, so the difference is attribution's own cost.
//!
//! Two sources are priced: the simulator's declared workloads (the join,
//! the change tracking and the wider frames alone) and the host source
//! over a fixture `/proc` and cgroup tree written here (the same reads a
//! real host costs: `stat`, `comm`, `status`, `cgroup` per process).

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

/// The `[simulator]` section: GPU g runs pids 100000 + 64·g + i, the
/// first half in pod `job-(2g)`, the second in `job-(2g+1)`.
fn simulator() -> String {
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
    let variants = [
        ("off", "[attribution]\nenabled = false\n".to_owned()),
        ("simulator records", String::new()),
        ("host records (fixture /proc)", host),
    ];
    for run in 1..=fig.runs {
        let mut cpu = Vec::new();
        for (name, extra) in &variants {
            let spec = DaemonSpec {
                extra_toml: extra.clone(),
                simulator_toml: Some(simulator()),
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
            "CPU above off: host records",
            "% core",
            Some(Target::AtMost(0.5)),
            cpu[2] - cpu[0],
        );
    }
    fig.note(
        "the three daemons run one after the other within each run; the difference to `off` is attribution's cost: reading the records, the join, the change tracking, and the wider samples every frame carries",
    );
    Ok(fig.finish())
}
