//! Performance of the client against a fleet of real daemons (ignored in a
//! plain `cargo test`; `.ci/client-bench.sh` runs it on a release build).
//!
//! Targets: `snapshot` of 256 endpoints in at most 1 s of wall time, and
//! `watch` of 256 hosts at a 1 s interval using at most 10 % of one core.
//! The fleet size is `GPUWATCH_BENCH_HOSTS` (default 256); every host is its
//! own daemon process with one simulated GPU, sampling once a second.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::support::{Daemon, Tmux, client_bin, temp_file, wait_with_deadline};

const ONE_GPU_SLOW: &str = r#"
[sampler]
interval = "1s"

[simulator]
gpus = [{ preset = "h100-sxm", demand = [{ at = "0s", watts = 450.0 }] }]
"#;

fn fleet_size() -> usize {
    std::env::var("GPUWATCH_BENCH_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn start_fleet(n: usize) -> Vec<Daemon> {
    let started = Instant::now();
    let fleet: Vec<Daemon> = (0..n)
        .map(|_| crate::support::start(Some(ONE_GPU_SLOW)))
        .collect();
    eprintln!(
        "started {n} daemons in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    fleet
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
#[ignore = "benchmark: run by .ci/client-bench.sh on a release build"]
fn bench_snapshot_and_watch_of_a_large_fleet() {
    let n = fleet_size();
    let fleet = start_fleet(n);
    let dir = tempfile::tempdir().expect("dir");
    let hosts: String = fleet.iter().map(|d| format!("{}\n", d.host())).collect();
    let hosts_file = temp_file(dir.path(), "fleet.txt", &hosts);
    let hosts_file = hosts_file.to_str().expect("utf-8 path");

    // Let every daemon publish its first sample.
    thread::sleep(Duration::from_secs(2));

    // snapshot: wall time of whole runs, several times.
    let mut walls = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let out = Command::new(client_bin())
            .args(["snapshot", "--json", "--hosts-file", hosts_file])
            .output()
            .expect("run snapshot");
        let wall = started.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let rows = out
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        assert_eq!(rows, n, "one row per GPU, one GPU per host");
        walls.push(wall);
    }
    walls.sort();
    let median = walls[walls.len() / 2];
    eprintln!(
        "BENCH snapshot of {n} endpoints: median {:.0} ms, best {:.0} ms, worst {:.0} ms (target <= 1000 ms)",
        median.as_secs_f64() * 1000.0,
        walls[0].as_secs_f64() * 1000.0,
        walls[walls.len() - 1].as_secs_f64() * 1000.0
    );

    // watch: CPU used over a steady-state window, NDJSON to a pipe we drain.
    let mut child = Command::new(client_bin())
        .args([
            "watch",
            "--json",
            "--interval",
            "1s",
            "--hosts-file",
            hosts_file,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start watch");
    let stdout = child.stdout.take().expect("stdout");
    let counter = thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("\"index\""))
            .count()
    });
    // Connect everything first, then measure.
    thread::sleep(Duration::from_secs(5));
    let pid = child.id();
    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    let window = Duration::from_secs(30);
    thread::sleep(window);
    let (cpu1, t1) = (cpu_time(pid), Instant::now());
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = wait_with_deadline(&mut child, Duration::from_secs(30)).expect("watch exits");
    let rows = counter.join().expect("counter");
    let share = (cpu1 - cpu0).as_secs_f64() / (t1 - t0).as_secs_f64();
    eprintln!(
        "BENCH watch of {n} hosts at 1s: {:.1} % of one core over {:.0} s ({rows} rows in total, exit {:?}) (target <= 10 %)",
        share * 100.0,
        (t1 - t0).as_secs_f64(),
        status.code()
    );
    // The live view in a real terminal (when tmux is there): same fleet.
    let tui_share = if Tmux::available() {
        let tmux = Tmux::start_command(
            "bench",
            &format!(
                "exec {} watch --interval 1s --hosts-file {hosts_file}",
                client_bin().display()
            ),
        );
        let up = format!("{n} hosts ({n} up)");
        tmux.wait_screen("every host connected", |s| s.contains(&up));
        let pid: u32 = tmux.format("#{pane_pid}").parse().expect("pane pid");
        let (cpu0, t0) = (cpu_time(pid), Instant::now());
        thread::sleep(window);
        let (cpu1, t1) = (cpu_time(pid), Instant::now());
        let share = (cpu1 - cpu0).as_secs_f64() / (t1 - t0).as_secs_f64();
        eprintln!(
            "BENCH watch (terminal view, 200x50) of {n} hosts at 1s: {:.1} % of one core over {:.0} s (target <= 10 %)",
            share * 100.0,
            (t1 - t0).as_secs_f64()
        );
        tmux.tmux(&["send-keys", "q"]);
        Some(share)
    } else {
        eprintln!("BENCH watch (terminal view): skipped, tmux is not installed");
        None
    };
    assert_eq!(status.code(), Some(0), "every host stayed connected");
    if let Some(share) = tui_share {
        assert!(
            share <= 0.10,
            "the terminal view used {:.1} % of a core",
            share * 100.0
        );
    }
    assert!(
        rows as f64 >= (n as f64) * window.as_secs_f64() * 0.8,
        "rows kept flowing: {rows}"
    );
    assert!(
        median <= Duration::from_secs(1),
        "snapshot median {median:?} > 1 s"
    );
    assert!(share <= 0.10, "watch used {:.1} % of a core", share * 100.0);
}
