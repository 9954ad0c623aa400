//! The cost of host attribution on the issue's fleet shape: 8 GPUs × 64
//! processes across 16 containers (512 pids), on a fixture `/proc` tree,
//! warm cache, one `HostSource::process` per pid per slow tick.
//!
//! ```text
//! cargo run --release -p gpuwatch-server --features testing --example attribution_cost -- [ticks]
//! ```
//! prints, per slow tick, the wall time and the thread's CPU time (from
//! `/proc/thread-self/schedstat`, so time spent waiting for a busy CPU is
//! not counted), the cost of the `stat` reads alone (the floor a warm tick
//! must pay), and the CPU time as a share of one core at the default 1 s
//! attribution interval. The `gpuwatch-bench` figure (the integrator's)
//! measures the whole daemon; this isolates the host reads so a regression
//! here is seen on its own.

use std::time::{Duration, Instant};

use gpuwatch_server::attribution::{
    HostRecords,
    fixture::{cost_tree, time_ticks},
    host::HostSource,
    procfs::ProcFs,
};

/// This thread's time on a CPU so far.
fn cpu_time() -> Result<Duration, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let ns: u64 = text
        .split_whitespace()
        .next()
        .ok_or("empty schedstat")?
        .parse()?;
    Ok(Duration::from_nanos(ns))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ticks: u32 = std::env::args()
        .nth(1)
        .map(|t| t.parse())
        .transpose()?
        .unwrap_or(200)
        .max(1);
    let dir = tempfile::tempdir()?;
    let (config, pids) = cost_tree(dir.path())?;
    let mut source = HostSource::new(&config);

    let cold = Instant::now();
    for pid in &pids {
        source.process(*pid)?;
    }
    let cold = cold.elapsed();

    let cpu_before = cpu_time()?;
    let warm = time_ticks(&mut source, &pids, ticks)?;
    // `time_ticks` runs one untimed warm-up tick before the timed ones.
    let warm_cpu = (cpu_time()? - cpu_before) / (ticks + 1);

    let proc = ProcFs::new(&config.proc_root);
    let mut buf = Vec::new();
    let cpu_before = cpu_time()?;
    for _ in 0..ticks {
        for pid in &pids {
            std::hint::black_box(proc.start_time(*pid, &mut buf)?);
        }
    }
    let stat_cpu = (cpu_time()? - cpu_before) / ticks;

    // The same floor on this host's real /proc, whose `stat` is generated
    // by the kernel on each read: per pid, to compare with the fixture's.
    let host = ProcFs::new("/proc");
    let host_pids: Vec<u32> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let cpu_before = cpu_time()?;
    let mut host_reads = 0u32;
    for _ in 0..ticks {
        for pid in &host_pids {
            if host.start_time(*pid, &mut buf).is_ok() {
                host_reads += 1;
            }
        }
    }
    let host_stat_ns = (cpu_time()? - cpu_before).as_nanos() / u128::from(host_reads.max(1));

    // `HostSource` itself on this host's /proc, where a cached process is
    // checked through its held handle: per pid per warm tick.
    let mut live = HostSource::new(&gpuwatch_server::attribution::AttributionConfig {
        proc_root: "/proc".into(),
        pod_resources_socket: "".into(),
        ..Default::default()
    });
    let live_pids: Vec<u32> = host_pids
        .iter()
        .copied()
        .filter(|p| live.process(*p).is_ok())
        .collect();
    let cpu_before = cpu_time()?;
    for _ in 0..ticks {
        for pid in &live_pids {
            let _ = std::hint::black_box(live.process(*pid));
        }
    }
    let live_ns = (cpu_time()? - cpu_before).as_nanos()
        / u128::from((ticks as usize * live_pids.len()).max(1) as u32);

    // Attribution runs once per slow reading (the sampler's slow interval,
    // 1 s by default).
    let interval = Duration::from_secs(1);
    println!(
        "attribution cost, {} pids, {ticks} warm ticks: cold tick {} µs wall; warm tick {} µs wall, {} µs CPU \
         (stat reads alone {} µs CPU); {:.3} % of a core at a {} interval",
        pids.len(),
        cold.as_micros(),
        warm.as_micros(),
        warm_cpu.as_micros(),
        stat_cpu.as_micros(),
        100.0 * warm_cpu.as_secs_f64() / interval.as_secs_f64(),
        humantime::format_duration(interval),
    );
    println!(
        "this host's /proc: a stat read costs {:.1} µs CPU ({} pids × {ticks}); the fixture's {:.1} µs",
        host_stat_ns as f64 / 1000.0,
        host_pids.len(),
        stat_cpu.as_nanos() as f64 / 1000.0 / pids.len() as f64,
    );
    println!(
        "this host's /proc through HostSource (held handles: {}): a warm process() costs {:.1} µs CPU; × 512 = {} µs a tick, {:.3} % of a core",
        live.handles(),
        live_ns as f64 / 1000.0,
        live_ns * 512 / 1000,
        100.0 * (live_ns * 512) as f64 / 1e9 / interval.as_secs_f64(),
    );
    Ok(())
}
