//! The machine a figure ran on, so BENCHMARKS.md can say so: cores, CPU
//! model, memory, kernel, and the load average (the harness is meant to be
//! rerun on a quiet machine; the load says how quiet it was).

use std::fs;

use serde::Serialize;

/// What the figures ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
}

impl Machine {
    pub fn describe() -> Self {
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let memory_gib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kib| kib.parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let os = fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            nproc,
            cpu_model,
            memory_gib,
            kernel,
            os,
        }
    }

    pub fn describe_text(&self) -> String {
        format!(
            "machine: {} cores ({}), {:.1} GiB RAM, Linux {}, {}; load average {}",
            self.nproc,
            self.cpu_model,
            self.memory_gib,
            self.kernel,
            self.os,
            load_average().map_or("unknown".to_owned(), |l| format!(
                "{:.2} {:.2} {:.2}",
                l[0], l[1], l[2]
            ))
        )
    }
}

/// The 1, 5 and 15-minute load averages.
pub fn load_average() -> Option<[f64; 3]> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}
