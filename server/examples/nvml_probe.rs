//! Reads every GPU once through gpuwatch's NVML backend — read-only — and
//! prints what it found as JSON, then times full samples.
//!
//! Used to check the backend against a real GPU (compare with
//! `nvidia-smi --query-gpu=...`) and to measure the cost of one full sample.
//! It never writes: no limits, clocks or thresholds are touched.
//!
//! ```text
//! cargo run --release --example nvml_probe -- [SAMPLES]
//! ```

use std::time::Instant;

use gpuwatch_server::backend::{Backend, ReadScope, nvml::NvmlBackend};

fn main() {
    let samples: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let started = Instant::now();
    let backend = match NvmlBackend::new(None) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("nvml_probe: {e}");
            std::process::exit(69);
        }
    };
    println!("init_ms {:.1}", started.elapsed().as_secs_f64() * 1e3);
    println!("host {:?}", backend.host_facts());
    let count = backend.device_count().unwrap_or(0);
    for index in 0..count {
        let mut device = match backend.open(index) {
            Ok(d) => d,
            Err(e) => {
                println!("gpu {index}: open failed: {e}");
                continue;
            }
        };
        let t = Instant::now();
        match device.describe() {
            Ok(facts) => println!(
                "gpu {index} describe_ms {:.1} facts {facts:#?}",
                t.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => println!("gpu {index}: describe failed: {e}"),
        }
        match device.read(ReadScope { slow_fields: true }) {
            Ok(r) => println!("gpu {index} reading {r:#?}"),
            Err(e) => println!("gpu {index}: read failed: {e}"),
        }
        for (label, slow) in [("fast", false), ("full (with processes, ECC)", true)] {
            let mut times: Vec<f64> = (0..samples)
                .map(|_| {
                    let t = Instant::now();
                    let _ = device.read(ReadScope { slow_fields: slow });
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
            println!(
                "gpu {index} sample cost {label}: n {} median {:.0} us p90 {:.0} us p99 {:.0} us max {:.0} us",
                times.len(),
                pct(0.5),
                pct(0.9),
                pct(0.99),
                pct(1.0)
            );
        }
    }
}
