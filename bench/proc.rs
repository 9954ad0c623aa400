//! CPU time and memory of processes, read from `/proc`: how every figure
//! charges cost to the daemon, to the load generator (this process) and to
//! the baseline's process tree separately, though they share the cores.
//!
//! CPU is `utime + stime` of `/proc/PID/stat` (every thread, live or
//! exited) over a window divided by the window's wall time: 100 % is one
//! core kept busy. Memory is `VmRSS` (and `VmHWM`, its peak) of
//! `/proc/PID/status`, and `Pss` of `/proc/PID/smaps_rollup` where forked
//! workers share pages.

use std::{
    fs,
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`).
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU seconds `pid` has used so far (user + system, every thread).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone (reading /proc/{pid}/stat)"))?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. utime and stime are fields 14 and 15 (1-based).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<f64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat field {n}: {stat}"))
    };
    Ok((field(14)? + field(15)?) / clock_ticks_per_second())
}

/// A `kB` line of `/proc/PID/status` (or `smaps_rollup`), in KiB.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resident memory of `pid`, in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    status_mib(pid, "VmRSS:")
}

/// Peak resident memory of `pid` since it started, in MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    status_mib(pid, "VmHWM:")
}

fn status_mib(pid: u32, key: &str) -> anyhow::Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone (reading /proc/{pid}/status)"))?;
    kib_field(&status, key)
        .map(|kib| kib as f64 / 1024.0)
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no {key}"))
}

/// Proportional set size of `pid` in MiB: its private pages plus its share
/// of pages shared with other processes (forked workers). None where the
/// kernel does not offer `smaps_rollup`.
pub fn pss_mib(pid: u32) -> Option<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&text, "Pss:").map(|kib| kib as f64 / 1024.0)
}

/// `pid` and every process descended from it.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree
}

/// CPU used by a set of processes over a window.
#[derive(Debug)]
pub struct CpuMeter {
    pids: Vec<u32>,
    start_cpu: f64,
    start: Instant,
}

impl CpuMeter {
    /// Starts counting for `pids` (their CPU so far is the zero).
    pub fn start(pids: &[u32]) -> anyhow::Result<Self> {
        Ok(Self {
            pids: pids.to_vec(),
            start_cpu: total_cpu(pids)?,
            start: Instant::now(),
        })
    }

    /// Starts counting for this process (the load generator).
    pub fn this_process() -> anyhow::Result<Self> {
        Self::start(&[std::process::id()])
    }

    /// Percent of one core used since `start`, and the window's length.
    pub fn percent(&self) -> anyhow::Result<(f64, Duration)> {
        let used = total_cpu(&self.pids)? - self.start_cpu;
        let wall = self.start.elapsed();
        Ok((100.0 * used / wall.as_secs_f64().max(1e-9), wall))
    }
}

fn total_cpu(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        // Burn a little CPU so the counter moves past one tick.
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert_ne!(x, 1);
        assert!(cpu_seconds(pid).expect("cpu") > 0.0);
        let rss = rss_mib(pid).expect("rss");
        assert!(rss > 0.0);
        assert!(peak_rss_mib(pid).expect("hwm") >= rss);
        assert!(process_tree(pid).contains(&pid));
    }

    #[test]
    fn a_missing_process_is_an_error_naming_it() {
        let err = cpu_seconds(u32::MAX).expect_err("no such process");
        assert!(err.to_string().contains(&u32::MAX.to_string()), "{err}");
    }
}
