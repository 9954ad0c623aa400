//! The cost of host attribution on the issue's fleet shape: 8 GPUs × 64
//! processes across 16 containers (512 pids), on a fixture `/proc` tree,
//! warm cache, one `HostSource::process` per pid per slow tick.
//!
//! ```text
//! cargo run --release -p gpuwatch-server --features testing --example attribution_cost -- [ticks]
//! ```
//! prints the mean time per slow tick and what that is as a share of one
//! core at the default 1 s attribution interval. The `gpuwatch-bench`
//! figure (the integrator's) measures the whole daemon; this isolates the
//! host reads so a regression here is seen on its own.

use std::time::{Duration, Instant};

use gpuwatch_server::attribution::{
    HostRecords,
    fixture::{cost_tree, time_ticks},
    host::HostSource,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ticks: u32 = std::env::args()
        .nth(1)
        .map(|t| t.parse())
        .transpose()?
        .unwrap_or(200);
    let dir = tempfile::tempdir()?;
    let (config, pids) = cost_tree(dir.path())?;
    let mut source = HostSource::new(&config);

    let cold = Instant::now();
    for pid in &pids {
        source.process(*pid)?;
    }
    let cold = cold.elapsed();
    let warm = time_ticks(&mut source, &pids, ticks)?;
    let interval = config.interval.max(Duration::from_millis(1));
    println!(
        "attribution cost: {} pids, cold tick {} µs, warm tick {} µs (mean of {ticks}), {:.3} % of a core at a {} interval",
        pids.len(),
        cold.as_micros(),
        warm.as_micros(),
        100.0 * warm.as_secs_f64() / interval.as_secs_f64(),
        humantime::format_duration(interval),
    );
    Ok(())
}
