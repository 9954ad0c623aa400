//! Black-box tests of `gpuwatch-client snapshot`, `list` and the exit codes,
//! against real daemons on loopback ports.

use std::{collections::HashSet, time::Duration};

use crate::support::{
    CONSUMER_FLEET, Streaming, closed_port, run_client, run_client_env, temp_file,
};
use serde_json::Value;

const SAMPLE_KEYS: &[&str] = &[
    "host",
    "index",
    "uuid",
    "name",
    "seq",
    "time",
    "temperature_c",
    "power_w",
    "sm_clock_mhz",
    "utilization_gpu_pct",
    "memory_used_mib",
    "memory_total_mib",
    "throttle_reasons",
    "governor_state",
    "health",
    "age_ms",
];

const GOVERNOR_STATES: &[&str] = &[
    "idle",
    "throttling",
    "recovering",
    "observe_only",
    "disabled",
    "suspended",
];

fn samples_of<'a>(lines: &'a [Value], host: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|v| v["host"] == host && v.get("index").is_some())
        .collect()
}

#[test]
fn snapshot_json_has_every_key_and_leaves_unsupported_metrics_out() {
    let demo = crate::support::start(None);
    let consumer = crate::support::start(Some(CONSUMER_FLEET));
    let run = run_client(&["snapshot", "--json", &demo.host(), &consumer.host()]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let lines = run.json_lines();

    let demo_rows = samples_of(&lines, &demo.host());
    assert_eq!(demo_rows.len(), 4, "the demo fleet has 4 GPUs: {lines:#?}");
    let consumer_rows = samples_of(&lines, &consumer.host());
    assert_eq!(consumer_rows.len(), 2);

    for row in demo_rows.iter().chain(&consumer_rows) {
        for key in SAMPLE_KEYS {
            assert!(row.get(*key).is_some(), "{key} missing in {row}");
        }
        let time = row["time"].as_str().expect("time is a string");
        assert!(
            time.len() >= 20 && time.as_bytes()[10] == b'T' && time.ends_with('Z'),
            "RFC 3339 UTC: {time}"
        );
        assert!(row["power_w"].is_number() && row["power_w"].as_f64().expect("number") > 0.0);
        assert!(row["throttle_reasons"].is_array());
        assert!(
            row["seq"].as_u64().expect("seq") > 1_600_000_000_000,
            "seq starts at the daemon's start in ms"
        );
        let state = row["governor_state"].as_str().expect("string");
        assert!(GOVERNOR_STATES.contains(&state), "{state}");
        let used = row["memory_used_mib"].as_f64().expect("number");
        let total = row["memory_total_mib"].as_f64().expect("number");
        assert!(used > 0.0 && used <= total, "{used} of {total} MiB");
    }
    // Indexes are each GPU once, and every row has a distinct UUID.
    let uuids: HashSet<_> = demo_rows.iter().map(|r| r["uuid"].as_str()).collect();
    assert_eq!(uuids.len(), 4);

    let laptop = consumer_rows
        .iter()
        .find(|r| r["name"].as_str().is_some_and(|n| n.contains("Laptop")))
        .expect("laptop GPU row");
    let rtx = consumer_rows
        .iter()
        .find(|r| r["name"].as_str().is_some_and(|n| n.contains("4090")))
        .expect("RTX 4090 row");
    // The laptop reports no power limit: absent, not 0.
    assert!(laptop.get("power_limit_w").is_none(), "{laptop}");
    // Neither consumer board has a memory temperature sensor or ECC.
    for row in [laptop, rtx] {
        assert!(row.get("memory_temperature_c").is_none(), "{row}");
        assert!(row.get("ecc").is_none(), "{row}");
    }
    // The 4090 has a fan and a power limit; the H100s have memory temperature.
    assert!(rtx["fan_speed_pct"].is_number());
    assert!(rtx["power_limit_w"].as_f64().expect("limit") > 0.0);
    let h100 = demo_rows
        .iter()
        .find(|r| r["name"].as_str().is_some_and(|n| n.contains("H100")))
        .expect("an H100");
    assert!(h100["memory_temperature_c"].is_number());
    assert!(
        h100.get("fan_speed_pct").is_none(),
        "SXM boards have no fan: {h100}"
    );
}

#[test]
fn snapshot_table_uses_human_units() {
    let demo = crate::support::start(None);
    let run = run_client(&["snapshot", &demo.host()]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let header = run.stdout.lines().next().expect("a header");
    for column in ["HOST", "GPU", "TEMP", "POWER", "MEMORY", "GOVERNOR"] {
        assert!(header.contains(column), "{header}");
    }
    let rows: Vec<_> = run.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{}", run.stdout);
    for row in rows {
        assert!(row.contains(&demo.host()), "{row}");
        assert!(
            row.contains("°C") && row.contains(" W") && row.contains("MHz") && row.contains("GiB"),
            "{row}"
        );
    }
}

#[test]
fn dead_host_fails_the_run_but_live_hosts_still_print() {
    let live = crate::support::start(None);
    let dead = closed_port();
    let run = run_client(&["snapshot", "--json", "--timeout", "5s", &live.host(), &dead]);
    assert_eq!(
        run.code,
        Some(1),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    let lines = run.json_lines();
    assert_eq!(samples_of(&lines, &live.host()).len(), 4);
    let failure = lines
        .iter()
        .find(|v| v["host"] == dead.as_str())
        .expect("a line for the dead host");
    let error = failure["error"].as_str().expect("error text");
    assert!(error.contains("refused"), "{error}");
    assert!(failure.get("index").is_none());

    let table = run_client(&["snapshot", &live.host(), &dead]);
    assert_eq!(table.code, Some(1));
    assert_eq!(
        table
            .stdout
            .lines()
            .filter(|l| l.contains(&live.host()))
            .count(),
        4,
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with(&dead) && l.contains("error")),
        "{}",
        table.stdout
    );
}

#[test]
fn hosts_file_and_env_var_are_read() {
    let a = crate::support::start(None);
    let b = crate::support::start(Some(CONSUMER_FLEET));
    let dir = tempfile::tempdir().expect("dir");
    let file = temp_file(
        dir.path(),
        "fleet.txt",
        &format!(
            "# the fleet\n{}\n\n  http://{}   # rack 2\n",
            a.host(),
            b.host()
        ),
    );
    let file = file.to_str().expect("utf-8 path");
    let run = run_client(&["snapshot", "--json", "--hosts-file", file]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let lines = run.json_lines();
    assert_eq!(samples_of(&lines, &a.host()).len(), 4);
    // The host is named as written in the file.
    assert_eq!(samples_of(&lines, &format!("http://{}", b.host())).len(), 2);

    let via_env = run_client_env(&["list", "--json"], &[("GPUWATCH_HOSTS_FILE", file)]);
    assert_eq!(via_env.code, Some(0), "stderr: {}", via_env.stderr);
    assert_eq!(via_env.json_lines().len(), 6);
}

#[test]
fn list_shows_limits_capabilities_and_policy() {
    let consumer = crate::support::start(Some(CONSUMER_FLEET));
    let run = run_client(&["list", "--json", &consumer.host()]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let lines = run.json_lines();
    assert_eq!(lines.len(), 2);
    let laptop = lines.iter().find(|d| d["index"] == 0).expect("GPU 0");
    let rtx = lines.iter().find(|d| d["index"] == 1).expect("GPU 1");
    assert_eq!(laptop["capabilities"]["power_limit_settable"], false);
    assert!(
        laptop.get("power_max_w").is_none(),
        "no limits reported: {laptop}"
    );
    assert_eq!(laptop["policy"]["mode"], "clock_lock");
    assert_eq!(rtx["capabilities"]["power_limit_settable"], true);
    assert_eq!(rtx["power_min_w"], 150);
    assert_eq!(rtx["power_max_w"], 600);
    assert_eq!(rtx["power_default_w"], 450);
    assert_eq!(rtx["slowdown_temperature_c"], 88);
    let fields: Vec<&str> = rtx["capabilities"]["supported_fields"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        fields.contains(&"fan_speed") && !fields.contains(&"memory_temperature"),
        "{fields:?}"
    );
    assert!(rtx["policy"]["threshold_c"].as_u64().expect("threshold") > 30);

    let table = run_client(&["list", &consumer.host()]);
    assert_eq!(table.code, Some(0));
    assert!(
        table.stdout.contains("150 / 450 / 600 W"),
        "{}",
        table.stdout
    );
}

#[test]
fn usage_errors_exit_2_and_say_what_is_allowed() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().expect("utf-8");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["snapshot"], "no hosts"),
        (vec!["snapshot", "node:99999"], "not a port"),
        (vec!["snapshot", "ftp://node"], "http://"),
        (vec!["snapshot", "--bogus", "node"], "--bogus"),
        (vec!["frobnicate", "node"], "frobnicate"),
        (vec!["set-power-limit", "node", "--watts", "300"], "--gpu"),
        (vec!["set-power-limit", "node", "--gpu", "0"], "--watts"),
        (
            vec!["set-power-limit", "node", "--gpu", "0", "--watts", "lots"],
            "watts",
        ),
        (
            vec!["set-threshold", "node", "--gpu", "first", "--celsius", "80"],
            "expected an index",
        ),
        (vec!["watch", "node", "--interval", "soon"], "duration"),
        (
            vec!["snapshot", "node", "--hosts-file", missing],
            "missing.pem",
        ),
        (vec!["snapshot", "node", "--tls-ca", missing], "missing.pem"),
        (
            vec!["events", "node", "--kind", "nope"],
            "power_limit_changed",
        ),
    ];
    for (args, needle) in cases {
        let run = run_client(&args);
        assert_eq!(
            run.code,
            Some(2),
            "{args:?}: stdout {} stderr {}",
            run.stdout,
            run.stderr
        );
        assert!(
            run.stderr.contains(needle),
            "{args:?}: {:?} not in {}",
            needle,
            run.stderr
        );
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
    let help = run_client(&["snapshot", "--help"]);
    assert_eq!(help.code, Some(0));
    assert!(help.stdout.contains("Examples"), "{}", help.stdout);
}

#[test]
fn closing_the_pipe_early_is_not_an_error() {
    let daemon = crate::support::start(None);
    let mut watch = Streaming::start(&["watch", "--json", "--interval", "100ms", &daemon.host()]);
    watch.wait_for("a first sample", Duration::from_secs(30), |v| {
        v.get("index").is_some()
    });
    let (code, stderr) = watch.close_stdout_and_wait();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
}
