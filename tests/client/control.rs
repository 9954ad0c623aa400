//! Black-box tests of the control commands and `events`: the same action on
//! several real daemons, per-host result lines, exit codes, and the audit
//! records the actions leave behind.

use std::time::Duration;

use crate::support::{CONSUMER_FLEET, ONE_H100, Streaming, closed_port, is_event_of, run_client};
use serde_json::Value;

fn results_of<'a>(lines: &'a [Value], host: &str) -> Vec<&'a Value> {
    lines.iter().filter(|v| v["host"] == host).collect()
}

#[test]
fn set_power_limit_reports_per_host_and_fails_only_where_refused() {
    let h100 = crate::support::start(Some(ONE_H100));
    let consumer = crate::support::start(Some(CONSUMER_FLEET));
    let (a, b) = (h100.host(), consumer.host());

    // Within range on both H100 and RTX 4090 (index 1 on the consumer host).
    let ok = run_client(&[
        "set-power-limit",
        "--json",
        &a,
        "--gpu",
        "0",
        "--watts",
        "550.5",
    ]);
    assert_eq!(
        ok.code,
        Some(0),
        "stdout {} stderr {}",
        ok.stdout,
        ok.stderr
    );
    let lines = ok.json_lines();
    let r = results_of(&lines, &a);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["ok"], true);
    assert_eq!(r[0]["action"], "set_power_limit");
    assert_eq!(r[0]["index"], 0);
    assert_eq!(r[0]["ceiling_w"].as_f64(), Some(550.5));
    assert!(
        r[0].get("previous_ceiling_w").is_none(),
        "no operator ceiling before: {}",
        r[0]
    );

    // The same request to a host whose GPU 0 (a laptop) cannot do it: that
    // host fails on its own line, the other still succeeds, exit 1.
    let mixed = run_client(&["set-power-limit", &a, &b, "--gpu", "0", "--watts", "500"]);
    assert_eq!(
        mixed.code,
        Some(1),
        "stdout {} stderr {}",
        mixed.stdout,
        mixed.stderr
    );
    let a_line = mixed
        .stdout
        .lines()
        .find(|l| l.starts_with(&a))
        .expect("a line for a");
    assert!(
        a_line.contains(" ok ") && a_line.contains("ceiling 500 W") && a_line.contains("was 550"),
        "{a_line}"
    );
    let b_line = mixed
        .stdout
        .lines()
        .find(|l| l.starts_with(&b))
        .expect("a line for b");
    assert!(
        b_line.contains("FAILED") && b_line.contains("not support"),
        "{b_line}"
    );

    // Outside the device's range: refused with the range named.
    let too_high = run_client(&[
        "set-power-limit",
        "--json",
        &a,
        "--gpu",
        "0",
        "--watts",
        "5000",
    ]);
    assert_eq!(too_high.code, Some(1));
    let lines = too_high.json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["ok"], false);
    assert_eq!(lines[0]["code"], "INVALID_ARGUMENT");
    let error = lines[0]["error"].as_str().expect("error");
    assert!(
        error.contains("200") && error.contains("700"),
        "range named: {error}"
    );

    // A dead host among live ones: the live one is still changed.
    let dead = closed_port();
    let partial = run_client(&["set-power-limit", &b, &dead, "--gpu", "1", "--watts", "400"]);
    assert_eq!(partial.code, Some(1));
    assert!(
        partial
            .stdout
            .lines()
            .any(|l| l.starts_with(&b) && l.contains(" ok ")),
        "{}",
        partial.stdout
    );
    assert!(
        partial
            .stdout
            .lines()
            .any(|l| l.starts_with(&dead) && l.contains("FAILED")),
        "{}",
        partial.stdout
    );

    // --default forgets the operator ceiling: back to the device default.
    let restore = run_client(&["set-power-limit", "--json", &a, "--gpu", "all", "--default"]);
    assert_eq!(restore.code, Some(0), "{}", restore.stderr);
    let lines = restore.json_lines();
    assert_eq!(lines[0]["ceiling_w"], 700);
    assert_eq!(lines[0]["previous_ceiling_w"], 500);
}

#[test]
fn threshold_and_clock_reset_then_the_audit_log_shows_them() {
    let a = crate::support::start(Some(ONE_H100));
    let b = crate::support::start(Some(CONSUMER_FLEET));
    let (ha, hb) = (a.host(), b.host());

    let set = run_client(&[
        "set-threshold",
        "--json",
        &ha,
        &hb,
        "--gpu",
        "all",
        "--celsius",
        "75",
        "--hysteresis",
        "4",
    ]);
    assert_eq!(
        set.code,
        Some(0),
        "stdout {} stderr {}",
        set.stdout,
        set.stderr
    );
    let lines = set.json_lines();
    assert_eq!(results_of(&lines, &ha).len(), 1);
    assert_eq!(results_of(&lines, &hb).len(), 2);
    for r in &lines {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["threshold_c"], 75);
        assert_eq!(r["hysteresis_c"], 4);
        assert_eq!(r["threshold_source"], "operator");
    }
    // Below the allowed minimum: the daemon says what is allowed.
    let low = run_client(&["set-threshold", &ha, "--gpu", "0", "--celsius", "5"]);
    assert_eq!(low.code, Some(1));
    assert!(
        low.stdout.contains("FAILED") && low.stdout.contains("30"),
        "{}",
        low.stdout
    );

    let reset = run_client(&["reset-clocks", &ha, &hb, "--gpu", "0"]);
    assert_eq!(
        reset.code,
        Some(0),
        "stdout {} stderr {}",
        reset.stdout,
        reset.stderr
    );
    assert_eq!(reset.stdout.lines().count(), 2, "{}", reset.stdout);
    assert!(
        reset
            .stdout
            .lines()
            .all(|l| l.contains("locked clocks: reset")),
        "{}",
        reset.stdout
    );

    // The audit trail has every action, attributed to the operator.
    let events = run_client(&["events", "--json", "--since", "0", &ha, &hb]);
    assert_eq!(events.code, Some(0), "{}", events.stderr);
    let lines = events.json_lines();
    let kinds = |host: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|v| v["host"] == host && v["event"] == "event")
            .map(|v| v["kind"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    for host in [&ha, &hb] {
        let k = kinds(host);
        assert!(k.contains(&"daemon_started".to_owned()), "{host}: {k:?}");
        assert!(k.contains(&"threshold_changed".to_owned()), "{host}: {k:?}");
        assert!(k.contains(&"clocks_reset".to_owned()), "{host}: {k:?}");
    }
    let change = lines
        .iter()
        .find(|v| v["host"] == ha.as_str() && v["kind"] == "threshold_changed")
        .expect("threshold event");
    assert_eq!(change["actor_kind"], "operator");
    assert_eq!(change["threshold_c"]["after"], 75);
    assert_eq!(change["hysteresis_c"]["after"], 4);
    // Sequence numbers rise within each host.
    let seqs: Vec<u64> = lines
        .iter()
        .filter(|v| v["host"] == ha.as_str())
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // --since skips what came before; the table has a header and a line per event.
    let last = *seqs.last().expect("events");
    let later = run_client(&["events", "--json", "--since", &last.to_string(), &ha]);
    assert_eq!(later.code, Some(0));
    assert!(later.json_lines().is_empty(), "{}", later.stdout);
    let table = run_client(&["events", &ha]);
    assert_eq!(table.code, Some(0));
    assert!(
        table
            .stdout
            .lines()
            .next()
            .is_some_and(|h| h.contains("KIND"))
    );
    assert_eq!(
        table.stdout.lines().count(),
        seqs.len() + 1,
        "{}",
        table.stdout
    );
}

#[test]
fn events_follow_streams_new_events_and_survives_a_restart() {
    let mut d = crate::support::start(Some(ONE_H100));
    let host = d.host();
    let mut follow = Streaming::start(&[
        "events",
        "--follow",
        "--json",
        "--reconnect-max",
        "500ms",
        &host,
    ]);
    follow.wait_for("connected", Duration::from_secs(60), |v| {
        is_event_of(v, &host, "connected")
    });
    let set = run_client(&["set-threshold", &host, "--gpu", "0", "--celsius", "77"]);
    assert_eq!(set.code, Some(0), "{}", set.stdout);
    let event = follow.wait_for("the threshold event", Duration::from_secs(60), |v| {
        v["kind"] == "threshold_changed"
    });
    let seq = event["seq"].as_u64().expect("seq");

    // The daemon restarts (the log persists); the stream resumes after the
    // last event seen, so the next action shows up once, and nothing before it
    // is repeated.
    d.restart();
    follow.wait_for("reconnected", Duration::from_secs(60), |v| {
        is_event_of(v, &host, "connected")
    });
    let reset = run_client(&["reset-clocks", &host, "--gpu", "0"]);
    assert_eq!(reset.code, Some(0), "{}", reset.stdout);
    follow.wait_for("the reset event", Duration::from_secs(60), |v| {
        v["kind"] == "clocks_reset"
    });
    let (code, _) = follow.signal_and_wait("TERM");
    assert_eq!(code, Some(0));
    let seen = follow.seen_json();
    let seqs: Vec<u64> = seen
        .iter()
        .filter(|v| v["event"] == "event")
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "no event twice: {seqs:?}"
    );
    assert!(seqs.iter().any(|s| *s > seq));
    assert!(
        seen.iter().any(|v| is_event_of(v, &host, "disconnected")),
        "the restart was reported"
    );
}

#[test]
fn set_power_budget_sets_reports_shares_refuses_out_of_range_and_drops() {
    let h100 = crate::support::start(Some(ONE_H100));
    let a = h100.host();
    // One H100 (200-700 W): 400 W is within the host's range.
    let set = run_client(&["set-power-budget", "--json", &a, "--watts", "400"]);
    assert_eq!(
        set.code,
        Some(0),
        "stdout {} stderr {}",
        set.stdout,
        set.stderr
    );
    let lines = set.json_lines();
    assert_eq!(lines.len(), 1, "{}", set.stdout);
    assert_eq!(lines[0]["action"], "set_power_budget");
    assert_eq!(lines[0]["ok"], true);
    assert_eq!(lines[0]["budget_w"].as_f64(), Some(400.0));
    assert!(lines[0].get("previous_budget_w").is_none(), "{}", lines[0]);
    assert!(
        lines[0]["share_w"].as_f64().is_some_and(|w| w <= 400.0),
        "{}",
        lines[0]
    );

    // Above the sum of the maxima: refused, naming the range, exit 1.
    let over = run_client(&["set-power-budget", &a, "--watts", "900"]);
    assert_eq!(
        over.code,
        Some(1),
        "stdout {} stderr {}",
        over.stdout,
        over.stderr
    );
    assert!(over.stdout.contains("200-700 W"), "{}", over.stdout);

    // --default drops it.
    let drop = run_client(&["set-power-budget", "--json", &a, "--default"]);
    assert_eq!(drop.code, Some(0), "{}", drop.stderr);
    let lines = drop.json_lines();
    assert!(lines[0].get("budget_w").is_none(), "{}", lines[0]);
    assert_eq!(lines[0]["previous_budget_w"].as_f64(), Some(400.0));

    // Neither --watts nor --default is a usage error.
    let usage = run_client(&["set-power-budget", &a]);
    assert_eq!(usage.code, Some(2), "{}", usage.stderr);
}
