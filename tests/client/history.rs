//! Black-box tests of `gpuwatch-client history` against a real daemon: the
//! NDJSON points are ordered, self-consistent and carry their tier; the
//! table shows a sparkline row per GPU and field; bad windows are usage
//! errors.

use std::{collections::BTreeMap, time::Duration};

use gpuwatch_testkit::Launch;

const FLEET: &str = r#"
[simulator]
gpus = [{ preset = "h100-sxm", demand = [ { at = "0s", watts = 300 }, { at = "30s", watts = 650 } ] }, { preset = "rtx-4090" }]

[sampler]
interval = "100ms"

[history]
flush_interval = "200ms"
"#;

#[test]
fn history_json_gives_ordered_points_with_statistics_per_gpu() {
    let d = Launch::with_config(FLEET).start();
    std::thread::sleep(Duration::from_secs(4));
    let run = crate::support::run_client(&[
        "history",
        "--json",
        &d.host(),
        "--since",
        "1m",
        "--step",
        "1s",
        "--field",
        "temperature_c,power_draw_mw",
    ]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let lines = run.json_lines();
    let mut per_gpu: BTreeMap<u64, Vec<&serde_json::Value>> = BTreeMap::new();
    for l in lines.iter().filter(|l| l["event"] == "point") {
        per_gpu
            .entry(l["gpu"].as_u64().expect("gpu"))
            .or_default()
            .push(l);
    }
    assert_eq!(per_gpu.len(), 2, "both GPUs: {lines:#?}");
    for (gpu, points) in &per_gpu {
        assert!(points.len() >= 2, "GPU {gpu}: {} points", points.len());
        let times: Vec<&str> = points
            .iter()
            .map(|p| p["time"].as_str().expect("time"))
            .collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "ordered: {times:?}");
        for p in points {
            assert_eq!(p["tier_step_ms"], 1000);
            assert!(p["samples"].as_u64().expect("samples") > 0);
            let t = &p["temperature_c"];
            let (min, mean, max) = (
                t["min"].as_f64().expect("min"),
                t["mean"].as_f64().expect("mean"),
                t["max"].as_f64().expect("max"),
            );
            assert!(min <= mean && mean <= max, "{p}");
            assert!(
                p["power_draw_w"]["max"].as_f64().expect("watts") > 0.0,
                "{p}"
            );
        }
    }
    // The daemon's start is an event in the window.
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "event" && l["kind"] == "daemon_started"),
        "{lines:#?}"
    );
}

#[test]
fn history_table_has_a_sparkline_row_per_gpu_and_field() {
    let d = Launch::with_config(FLEET).start();
    std::thread::sleep(Duration::from_secs(3));
    let run = crate::support::run_client(&[
        "history",
        &d.host(),
        "--since",
        "2m",
        "--field",
        "temperature_c",
    ]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let rows: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains("temperature_c"))
        .collect();
    assert_eq!(rows.len(), 2, "{}", run.stdout);
    for r in rows {
        assert!(r.contains(" C"), "{r}");
        assert!(
            r.chars().any(|c| ('▁'..='█').contains(&c)),
            "a sparkline: {r}"
        );
    }
    let header = run.stdout.lines().next().unwrap_or_default();
    for col in [
        "HOST", "GPU", "FIELD", "MIN", "MEAN", "MAX", "HISTORY", "GAPS",
    ] {
        assert!(header.contains(col), "{header}");
    }
}

#[test]
fn a_bad_window_is_a_usage_error() {
    let run = crate::support::run_client(&["history", "localhost", "--since", "soon"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("not a duration"), "{}", run.stderr);
}
