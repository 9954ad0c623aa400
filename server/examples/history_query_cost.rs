//! Where a GetHistory answer's time goes, without the daemon, the network
//! or another process competing: a day of 8 GPUs is backfilled into a
//! temporary store (the writer's encoding and commits), then the two
//! benchmarked queries (24 h at 1 min, 1 h at 1 s; all 15 fields and the
//! dashboard's 3) run `runs` times each, timing the store query (redb reads
//! or the query cache, building the answer), the answer's encoding as the
//! GetHistory route does it, and a client's decoding of it, and printing
//! the answer's size.
//!
//! ```text
//! cargo run --release -p gpuwatch-server --example history_query_cost -- [runs]
//! ```
//! The `gpuwatch-bench history` figure measures the whole path through the
//! daemon; this isolates the daemon's own work so each part is seen on its
//! own (and can be profiled: `perf record` on this binary).

use std::time::{Duration, Instant, SystemTime};

use gpuwatch_server::{
    api,
    history::{self, HistoryConfig, Limits, Query, Source},
};
use prost::Message;

/// This thread's time on a CPU so far, in ms (from
/// `/proc/thread-self/schedstat`: time spent waiting for a busy CPU is not
/// counted, so the figures hold on a loaded machine).
fn cpu_ms() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e6)
}

fn quantiles(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(30);
    let dir = tempfile::tempdir()?;
    let config = HistoryConfig::default();
    let uuids: Vec<String> = (0..8).map(|i| format!("GPU-cost-{i}")).collect();
    let end = SystemTime::now();
    let filled = Instant::now();
    let (store, end_ms) = history::backfilled(
        dir.path(),
        &config,
        &uuids,
        Duration::from_secs(86_400),
        end,
    )?;
    eprintln!(
        "backfilled 24 h x 8 GPUs in {:.1} s: {} bytes",
        filled.elapsed().as_secs_f64(),
        store.disk_bytes()
    );
    let gpus: Vec<(u32, String)> = uuids
        .iter()
        .enumerate()
        .map(|(i, u)| (i as u32, u.clone()))
        .collect();
    let dashboard = history::resolve_fields(&[
        "temperature_c".to_owned(),
        "power_draw_mw".to_owned(),
        "power_limit_mw".to_owned(),
    ])?;
    let all = history::resolve_fields(&[])?;
    let limits = Limits {
        max_points: 200_000,
        max_bytes: 32 << 20,
    };
    for (name, span_ms, step_ms) in [
        ("24 h at 1 min", 86_400_000u64, 60_000u64),
        ("1 h at 1 s", 3_600_000, 1_000),
    ] {
        for (fname, fields) in [("15 fields", &all), ("3 fields", &dashboard)] {
            for columnar in [false, true] {
                let q = Query {
                    gpus: gpus.clone(),
                    fields: fields.clone(),
                    since_ms: end_ms - span_ms,
                    until_ms: end_ms,
                    step_ms,
                    columnar,
                };
                let src = Source::store_only(&store, end_ms);
                let (mut tq, mut te, mut td, mut tx) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                let (mut cq, mut ce, mut cd) = (Vec::new(), Vec::new(), Vec::new());
                let mut size = 0;
                for _ in 0..runs {
                    // As the GetHistory route answers: the query, then
                    // the answer's encoding (columns are already encoded).
                    let (t, c) = (Instant::now(), cpu_ms());
                    let a = history::query_wire(&src, &q, limits)?;
                    tq.push(t.elapsed().as_secs_f64() * 1e3);
                    cq.push(cpu_ms() - c);
                    assert_eq!(a.response.columnar, columnar);
                    let (t, c) = (Instant::now(), cpu_ms());
                    let wire = a.encode();
                    te.push(t.elapsed().as_secs_f64() * 1e3);
                    ce.push(cpu_ms() - c);
                    size = wire.len();
                    let (t, c) = (Instant::now(), cpu_ms());
                    let mut back = api::GetHistoryResponse::decode(wire.as_slice())?;
                    td.push(t.elapsed().as_secs_f64() * 1e3);
                    cd.push(cpu_ms() - c);
                    assert_eq!(back.gpus.len(), 8);
                    let t = Instant::now();
                    back.expand_columns()?;
                    tx.push(t.elapsed().as_secs_f64() * 1e3);
                }
                let ((q50, q99), (e50, e99), (d50, d99), (x50, _)) =
                    (quantiles(tq), quantiles(te), quantiles(td), quantiles(tx));
                let ((cq50, _), (ce50, _), (cd50, _)) =
                    (quantiles(cq), quantiles(ce), quantiles(cd));
                println!(
                    "{name}, {fname}, {}: {size} bytes; CPU median: query {cq50:.2} ms, encode {ce50:.2} ms, client decode {cd50:.2} ms; wall median/p99: query {q50:.2}/{q99:.2} ms, encode {e50:.2}/{e99:.2} ms, client decode {d50:.2}/{d99:.2} ms{}",
                    if columnar { "columns" } else { "points" },
                    if columnar {
                        format!("; columns to points {x50:.2} ms")
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    println!(
        "query cache after these queries: {:.2} MiB (bound {} MiB)",
        store.cache_bytes() as f64 / 1_048_576.0,
        history::QUERY_CACHE_BYTES >> 20
    );
    Ok(())
}
