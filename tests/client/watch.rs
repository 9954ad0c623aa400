//! Black-box tests of `gpuwatch-client watch` in NDJSON mode: several real
//! daemons, one killed and restarted mid-watch.

use std::{collections::HashMap, time::Duration};

use crate::support::{CONSUMER_FLEET, ONE_H100, Streaming, closed_port, is_event_of, is_sample_of};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn rows_keep_flowing_while_a_host_is_down_and_it_resumes_after_restart() {
    let a = crate::support::start(None);
    let b = crate::support::start(Some(CONSUMER_FLEET));
    let mut c = crate::support::start(Some(ONE_H100));
    let (ha, hb, hc) = (a.host(), b.host(), c.host());
    let mut watch = Streaming::start(&[
        "watch",
        "--json",
        "--interval",
        "200ms",
        "--reconnect-max",
        "1s",
        &ha,
        &hb,
        &hc,
    ]);

    // Every host connects and sends rows.
    let mut rows: HashMap<String, usize> = HashMap::new();
    watch.wait_for("rows from every host", WAIT, |v| {
        if v.get("index").is_some() {
            *rows
                .entry(v["host"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
        [&ha, &hb, &hc]
            .iter()
            .all(|h| rows.get(h.as_str()).copied().unwrap_or(0) >= 3)
    });
    for host in [&ha, &hb, &hc] {
        let connected = watch.expect("connected", WAIT, |v| is_event_of(v, host, "connected"));
        assert!(
            connected["gpus"].as_u64().expect("gpus") >= 1,
            "{connected}"
        );
    }
    let last_seq_c = watch
        .seen
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| is_sample_of(v, &hc))
        .filter_map(|v| v["seq"].as_u64())
        .max()
        .expect("a sample from c");

    // Kill c without a goodbye.
    c.kill();
    let down = watch.wait_for("c disconnected", WAIT, |v| {
        is_event_of(v, &hc, "disconnected")
    });
    assert!(
        down["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down}"
    );
    let retry = watch.wait_for("c reconnecting", WAIT, |v| {
        is_event_of(v, &hc, "reconnecting")
    });
    assert!(
        retry["retry_in_ms"].as_u64().expect("retry_in_ms") <= 1000,
        "{retry}"
    );

    // While c is down, a and b keep streaming.
    let mut after: HashMap<String, usize> = HashMap::new();
    watch.wait_for("rows from a and b while c is down", WAIT, |v| {
        assert!(!is_sample_of(v, &hc), "no rows from a dead host: {v}");
        if v.get("index").is_some() {
            *after
                .entry(v["host"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
        after.get(&ha).copied().unwrap_or(0) >= 8 && after.get(&hb).copied().unwrap_or(0) >= 4
    });
    // ... and c keeps being retried.
    watch.wait_for("another retry of c", WAIT, |v| {
        is_event_of(v, &hc, "reconnecting")
    });

    // c comes back on the same port: the client reconnects and resumes
    // after the last sample it saw, and the restart shows as a gap.
    c.restart();
    let back = watch.wait_for("c connected again", WAIT, |v| {
        is_event_of(v, &hc, "connected")
    });
    assert_eq!(
        back["resumed_after_seq"].as_u64(),
        Some(last_seq_c),
        "{back}"
    );
    let gap = watch.wait_for("a gap for c", WAIT, |v| is_event_of(v, &hc, "gap"));
    assert_eq!(gap["restarted"], true, "{gap}");
    assert_eq!(gap["first_seq"].as_u64(), Some(last_seq_c + 1), "{gap}");
    assert!(
        gap["last_seq"].as_u64().expect("last_seq") > last_seq_c,
        "{gap}"
    );
    let resumed = watch.wait_for("rows from c again", WAIT, |v| is_sample_of(v, &hc));
    assert!(resumed["seq"].as_u64().expect("seq") > last_seq_c);

    let (code, stderr) = watch.signal_and_wait("TERM");
    assert_eq!(
        code,
        Some(0),
        "every host was up at the end; stderr: {stderr}"
    );
    // Every line, to the last, is a JSON object.
    for line in &watch.seen {
        let v: Value = serde_json::from_str(line).expect("JSON line");
        assert!(v.is_object() && v["host"].is_string(), "{line}");
    }
    // Each host's samples only move forward, gap or not.
    for host in [&ha, &hb, &hc] {
        let mut last: HashMap<u64, u64> = HashMap::new();
        for v in watch
            .seen
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            if is_sample_of(&v, host) {
                let index = v["index"].as_u64().expect("index");
                let seq = v["seq"].as_u64().expect("seq");
                if let Some(prev) = last.insert(index, seq) {
                    assert!(seq > prev, "{host} GPU {index}: seq {seq} after {prev}");
                }
            }
        }
    }
}

#[test]
fn graceful_daemon_shutdown_is_reported_and_retried() {
    let mut d = crate::support::start(Some(ONE_H100));
    let host = d.host();
    let mut watch = Streaming::start(&[
        "watch",
        "--json",
        "--interval",
        "100ms",
        "--reconnect-max",
        "500ms",
        &host,
    ]);
    watch.wait_for("a sample", WAIT, |v| is_sample_of(v, &host));
    d.stop().expect("the daemon stops cleanly on SIGTERM");
    let down = watch.wait_for("disconnected", WAIT, |v| {
        is_event_of(v, &host, "disconnected")
    });
    assert!(down["error"].is_string(), "{down}");
    // Retries back off but never beyond the cap.
    let mut delays = Vec::new();
    watch.wait_for("several retries", WAIT, |v| {
        if is_event_of(v, &host, "reconnecting") {
            delays.push(v["retry_in_ms"].as_u64().expect("retry_in_ms"));
            assert!(v["error"].is_string(), "{v}");
        }
        delays.len() >= 6
    });
    assert!(
        delays.iter().all(|d| *d <= 500),
        "capped at 500ms: {delays:?}"
    );
    let (code, _) = watch.signal_and_wait("INT");
    assert_eq!(code, Some(1), "the host was down when watch stopped");
}

#[test]
fn gpu_selector_and_duration() {
    let d = crate::support::start(None);
    let host = d.host();
    let dead = closed_port();
    let mut watch = Streaming::start(&[
        "watch",
        "--json",
        "--interval",
        "100ms",
        "--gpu",
        "2",
        "--duration",
        "3s",
        &host,
        &dead,
    ]);
    watch.wait_for("a sample", WAIT, |v| is_sample_of(v, &host));
    watch.expect("the dead host reported", WAIT, |v| {
        is_event_of(v, &dead, "disconnected")
            && v["error"].as_str().is_some_and(|e| e.contains("refused"))
    });
    let (code, _) = watch.signal_and_wait("CONT"); // no-op signal: wait for --duration
    assert_eq!(code, Some(1), "one host never answered");
    let samples: Vec<Value> = watch
        .seen_json()
        .into_iter()
        .filter(|v| is_sample_of(v, &host))
        .collect();
    assert!(samples.len() >= 3, "{samples:?}");
    assert!(
        samples.iter().all(|v| v["index"] == 2),
        "only GPU 2 was asked for"
    );
}

/// A daemon with 16 GPUs sampling every 20 ms: large frames, fast, so a
/// stalled reader fills every buffer on the way (pipe, client queue, HTTP/2
/// windows) and falls out of the daemon's per-subscriber buffer in seconds.
const FAST_SAMPLER: &str = r#"
[sampler]
interval = "20ms"

[simulator]
gpus = [{ preset = "a100-sxm", count = 16 }]
"#;

#[test]
fn a_reader_that_stalls_is_told_what_it_missed() {
    use std::{
        io::{BufRead, BufReader},
        process::{Command, Stdio},
        sync::mpsc,
        thread,
        time::Instant,
    };

    let d = crate::support::start(Some(FAST_SAMPLER));
    let host = d.host();
    let mut child = Command::new(crate::support::client_bin())
        .args(["watch", "--json", "--interval", "20ms", &host])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn client");
    let guard = ChildGuard(&mut child);
    let stdout = guard.0.stdout.take().expect("stdout");
    // A rendezvous channel: while the test does not receive, nothing reads
    // the pipe, so the client, and behind it the daemon, must hold back.
    let (tx, rx) = mpsc::sync_channel::<String>(0);
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(WAIT).expect("a first line");
    assert!(first.contains("connected"), "{first}");
    let mut seqs = Vec::new();
    let mut rounds = 0;
    let gap = 'outer: loop {
        rounds += 1;
        assert!(
            rounds <= 3,
            "no slow_subscriber gap after 3 stalls; last seqs {:?}",
            &seqs[seqs.len().saturating_sub(5)..]
        );
        // Stall long enough to overflow every buffer on the way...
        thread::sleep(Duration::from_secs(30));
        // ... then read what piled up (reading is faster than the daemon
        // produces, so the backlog is gone well within this bound).
        let drain_until = Instant::now() + Duration::from_secs(15);
        while let Ok(line) = rx.recv_timeout(drain_until.saturating_duration_since(Instant::now()))
        {
            let v: Value = serde_json::from_str(&line).expect("JSON line");
            if v["event"] == "gap" {
                break 'outer v;
            }
            if let Some(seq) = v["seq"].as_u64() {
                seqs.push(seq);
            }
        }
    };
    assert_eq!(gap["reason"], "slow_subscriber", "{gap}");
    assert!(gap["missed"].as_u64().expect("missed") >= 1, "{gap}");
    let first_missing = gap["first_seq"].as_u64().expect("first_seq");
    assert_eq!(
        seqs.last().map(|s| s + 1),
        Some(first_missing),
        "the gap starts right after the last sample printed"
    );
    // The next sample follows the gap.
    let next: Value = loop {
        let line = rx.recv_timeout(WAIT).expect("samples after the gap");
        let v: Value = serde_json::from_str(&line).expect("JSON line");
        if v.get("seq").is_some() {
            break v;
        }
    };
    assert_eq!(
        next["seq"].as_u64(),
        Some(gap["last_seq"].as_u64().expect("last_seq") + 1),
        "{next}"
    );
}

/// Kills the child on drop.
struct ChildGuard<'a>(&'a mut std::process::Child);

impl Drop for ChildGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
