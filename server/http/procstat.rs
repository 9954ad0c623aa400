//! The daemon's own process figures (CPU time, memory, file descriptors,
//! threads) for the standard `process_*` metrics, read from `/proc/self`.
//!
//! `prometheus-client` has no process collector, and these few numbers are
//! cheap to read: two small files and one directory listing, only when a
//! scrape renders a new frame. Anything that cannot be read (not Linux, a
//! locked-down `/proc`) is `None` and its metric is left out.

use std::fs;

/// Linux reports CPU times in `/proc` in USER_HZ ticks, which is 100 on
/// every architecture Linux supports for userspace ABI purposes.
const USER_HZ: f64 = 100.0;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub threads: Option<u64>,
}

/// Reads the current figures; never fails, only leaves out.
pub fn read() -> ProcessStats {
    let mut stats = ProcessStats::default();
    if let Ok(stat) = fs::read_to_string("/proc/self/stat") {
        stats.cpu_seconds = cpu_seconds(&stat);
    }
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        stats.resident_memory_bytes = status_kib(&status, "VmRSS:").map(|k| k * 1024);
        stats.virtual_memory_bytes = status_kib(&status, "VmSize:").map(|k| k * 1024);
        stats.threads = status_kib(&status, "Threads:");
    }
    if let Ok(dir) = fs::read_dir("/proc/self/fd") {
        stats.open_fds = Some(dir.count() as u64);
    }
    if let Ok(limits) = fs::read_to_string("/proc/self/limits") {
        stats.max_fds = max_open_files(&limits);
    }
    stats
}

/// utime + stime from `/proc/self/stat`, in seconds. The command name (field
/// 2) may hold spaces and parentheses, so fields are counted after its last
/// `)`: state is the first, utime the 12th, stime the 13th.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The number on the `key` line of `/proc/self/status` ("VmRSS:  1234 kB").
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The soft limit on the "Max open files" line of `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_counted_after_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (gpu (watch) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 100 1000000 500";
        assert_eq!(cpu_seconds(stat), Some(3.25));
        assert_eq!(cpu_seconds("garbage"), None);
    }

    #[test]
    fn status_and_limits_lines_are_parsed() {
        let status = "Name:\tgpuwatch\nVmSize:\t  204800 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "Threads:"), Some(9));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn this_process_reports_memory_and_threads() {
        let stats = read();
        assert!(stats.resident_memory_bytes.is_some_and(|b| b > 0));
        assert!(stats.threads.is_some_and(|n| n >= 1));
        assert!(stats.open_fds.is_some_and(|n| n >= 1));
    }
}
