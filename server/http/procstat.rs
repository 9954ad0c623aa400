//! The daemon's own process figures (CPU time, memory, file descriptors,
//! threads) for the standard `process_*` metrics.
//!
//! `prometheus-client` has no process collector. Every scrape that renders a
//! new frame asks for these, so they are read with as few system calls as
//! Linux allows: one `pread` of `/proc/self/stat`, kept open (CPU time,
//! threads, virtual and resident size are all on its one line), one `statx`
//! of `/proc/self/fd` (Linux 6.2 and later report the number of open
//! descriptors as its size; older kernels fall back to listing it) and one
//! `getrlimit`. Reading `stat`, `status` and `limits` afresh with
//! `read_to_string` took ~30 system calls and 40 % of a render
//! (BENCHMARKS.md, fix 8). Anything that cannot be read (not Linux, a
//! locked-down `/proc`) is `None` and its metric is left out.

use std::{
    fs::{self, File},
    os::unix::fs::FileExt,
    sync::OnceLock,
};

/// Linux reports CPU times in `/proc` in USER_HZ ticks, which is 100 on
/// every architecture Linux supports for userspace ABI purposes.
const USER_HZ: f64 = 100.0;

/// `/proc/self/stat` is one line of a few hundred bytes.
const STAT_BUFFER: usize = 1024;

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
    let mut buf = [0u8; STAT_BUFFER];
    if let Some(stat) = read_stat(&mut buf).and_then(StatLine::parse) {
        let page = rustix::param::page_size() as u64;
        stats.cpu_seconds = stat.cpu_seconds();
        stats.virtual_memory_bytes = stat.field(VSIZE);
        stats.resident_memory_bytes = stat.field(RSS).map(|pages| pages * page);
        stats.threads = stat.field(THREADS);
    }
    stats.open_fds = open_fds();
    stats.max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    stats
}

/// `/proc/self/stat` through a descriptor opened once: a read at offset 0
/// makes procfs render the line afresh. The line is complete at its
/// newline, which the first read returns with all the rest; reading on
/// past it could splice in the tail of another render that a concurrent
/// scrape's read at offset 0 made meanwhile.
fn read_stat(buf: &mut [u8]) -> Option<&str> {
    static STAT: OnceLock<Option<File>> = OnceLock::new();
    let file = STAT
        .get_or_init(|| File::open("/proc/self/stat").ok())
        .as_ref()?;
    let mut len = 0;
    while len < buf.len() && !buf[..len].ends_with(b"\n") {
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    // A line that fills the buffer was cut short: better none than a wrong one.
    (len < buf.len()).then(|| std::str::from_utf8(&buf[..len]).ok())?
}

/// The open descriptors: the size of `/proc/self/fd` where the kernel reports
/// it (6.2+), else the entries of a listing less the one the listing holds.
fn open_fds() -> Option<u64> {
    match fs::metadata("/proc/self/fd") {
        Ok(meta) if meta.len() > 0 => Some(meta.len()),
        _ => {
            let listed = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
            Some(listed.saturating_sub(1))
        }
    }
}

/// Field numbers of `/proc/<pid>/stat` (proc(5), counted from 1).
const UTIME: usize = 14;
const STIME: usize = 15;
const THREADS: usize = 20;
const VSIZE: usize = 23;
const RSS: usize = 24;

/// The fields of a `/proc/<pid>/stat` line from the state (field 3) on. The
/// command name (field 2) may hold spaces and parentheses, so the line is
/// split after its last `)`.
struct StatLine<'a>(Vec<&'a str>);

impl<'a> StatLine<'a> {
    fn parse(stat: &'a str) -> Option<Self> {
        let (_, rest) = stat.rsplit_once(')')?;
        Some(Self(rest.split_whitespace().collect()))
    }

    /// Field `n`, in proc(5)'s numbering.
    fn field(&self, n: usize) -> Option<u64> {
        self.0.get(n.checked_sub(3)?)?.parse().ok()
    }

    /// utime + stime, in seconds.
    fn cpu_seconds(&self) -> Option<f64> {
        let ticks = self.field(UTIME)? + self.field(STIME)?;
        Some(ticks as f64 / USER_HZ)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "4242 (gpu (watch) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 100 1000000 500 18446744073709551615";

    #[test]
    fn fields_are_counted_after_a_command_name_with_spaces_and_parens() {
        let line = StatLine::parse(LINE).expect("a stat line");
        assert_eq!(line.cpu_seconds(), Some(3.25));
        assert_eq!(line.field(THREADS), Some(9));
        assert_eq!(line.field(VSIZE), Some(1_000_000));
        assert_eq!(line.field(RSS), Some(500));
        assert!(StatLine::parse("garbage").and_then(|l| l.cpu_seconds()).is_none());
        let short = StatLine::parse("1 (x) S 1").expect("a short stat line");
        assert_eq!(short.field(RSS), None);
        assert_eq!(line.field(2), None);
    }

    /// The number on the `key` line of `/proc/self/status` ("VmRSS: 1234 kB"),
    /// which reports in other units than the stat line.
    fn status_number(key: &str) -> u64 {
        let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect(key)
    }

    #[test]
    fn the_figures_agree_with_what_proc_status_and_limits_say() {
        let stats = read();
        let rss = stats.resident_memory_bytes.expect("RSS") as f64;
        let status_rss = (status_number("VmRSS:") * 1024) as f64;
        assert!(
            (0.5..2.0).contains(&(rss / status_rss)),
            "RSS {rss} vs VmRSS {status_rss}"
        );
        let vsz = stats.virtual_memory_bytes.expect("virtual size") as f64;
        let status_vsz = (status_number("VmSize:") * 1024) as f64;
        assert!(
            (0.5..2.0).contains(&(vsz / status_vsz)),
            "virtual {vsz} vs VmSize {status_vsz}"
        );
        assert!(stats.threads.is_some_and(|n| n >= 1));
        assert!(stats.cpu_seconds.is_some());
        let limits = fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
        let soft = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        assert_eq!(stats.max_fds, soft);
    }

    #[test]
    fn open_descriptors_are_counted() {
        let before = read().open_fds.expect("open fds");
        let files: Vec<File> = (0..64)
            .map(|_| File::open("/proc/self/stat").expect("a file to hold open"))
            .collect();
        let during = read().open_fds.expect("open fds");
        drop(files);
        // Other tests open and close files meanwhile; 64 of our own stand out.
        assert!(during >= before + 48, "{before} -> {during}");
    }

    #[test]
    fn scrapes_reading_at_once_each_get_a_whole_line() {
        let readers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..200).all(|_| {
                        let stats = read();
                        stats.cpu_seconds.is_some()
                            && stats.threads.is_some_and(|n| n >= 1)
                            && stats.resident_memory_bytes.is_some_and(|b| b > 0)
                    })
                })
            })
            .collect();
        for reader in readers {
            assert!(reader.join().expect("a reader thread"));
        }
    }

    #[test]
    fn a_stat_read_twice_reads_the_present() {
        let burn = std::time::Instant::now();
        let first = read().cpu_seconds.expect("CPU time");
        while burn.elapsed() < std::time::Duration::from_millis(60) {
            std::hint::black_box((0..1000u64).sum::<u64>());
        }
        assert!(read().cpu_seconds.expect("CPU time") > first);
    }
}
