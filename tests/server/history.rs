//! History through the real daemon: GetHistory agrees with statistics the
//! test computes itself from a Watch stream (at several steps and tiers),
//! a SIGKILL mid-run shows as a DAEMON_DOWN gap with at most a few seconds
//! lost, a clean stop loses nothing, a damaged store is moved aside and
//! reported while the daemon still starts, a tier change keeps the data,
//! oversized requests are refused naming the limit, and history needs the
//! read role on gRPC and HTTP alike.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use gpuwatch_api::{self as api, EventKind, HistoryGapReason, WatchRequest, watch_response};
use tonic::Code;

use crate::support::{Client, Daemon, Options, READ_TOKEN, connect_with, events_since, sim_config};

/// Two GPUs whose demand keeps changing (so temperatures and power move),
/// simulated 60 times faster than the wall clock.
fn fleet(extra: &str) -> String {
    fleet_at(60.0, extra)
}

/// [`fleet`] at simulator speed `speed`.
fn fleet_at(speed: f64, extra: &str) -> String {
    let demand = "demand = [ { at = \"0s\", watts = 250 }, { at = \"20s\", watts = 650 }, \
                  { at = \"40s\", watts = 400 }, { at = \"60s\", watts = 700 } ]\nrepeat = \"80s\"";
    sim_config(
        speed,
        &format!("[sampler]\ninterval = \"100ms\"\n{extra}"),
        &[
            &format!("preset = \"h100-sxm\"\n{demand}"),
            &format!("preset = \"h100-sxm\"\n{demand}\nambient_c = 30.0"),
        ],
    )
}

const FAST_FLUSH: &str = "[history]\nflush_interval = \"200ms\"\n";

fn ms_of(t: Option<prost_types::Timestamp>) -> u64 {
    let t = t.expect("time set");
    u64::try_from(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000).expect("after 1970")
}

fn ts(ms: u64) -> prost_types::Timestamp {
    (SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).into()
}

/// One reading of one GPU as Watch delivered it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    t_ms: u64,
    temp_c: u32,
    power_mw: u32,
}

/// Every frame Watch delivers for `run`, per GPU index; the stream's end
/// (the daemon stopping) ends the collection early.
async fn watch_for(c: &mut Client, run: Duration) -> BTreeMap<u32, Vec<Seen>> {
    let mut stream = c
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut out: BTreeMap<u32, Vec<Seen>> = BTreeMap::new();
    let deadline = Instant::now() + run;
    let add = |f: &api::Frame, out: &mut BTreeMap<u32, Vec<Seen>>| {
        let t_ms = ms_of(f.time);
        for s in &f.samples {
            if s.health == api::GpuHealth::Ok as i32
                && let (Some(temp_c), Some(power_mw)) = (s.temperature_c, s.power_draw_mw)
            {
                out.entry(s.index).or_default().push(Seen {
                    t_ms,
                    temp_c,
                    power_mw,
                });
            }
        }
    };
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(msg) = tokio::time::timeout(left, stream.message()).await else {
            break;
        };
        match msg {
            Ok(Some(m)) => match m.message {
                Some(watch_response::Message::Start(s)) => {
                    if let Some(f) = &s.current {
                        add(f, &mut out);
                    }
                }
                Some(watch_response::Message::Frame(f)) => add(&f, &mut out),
                Some(watch_response::Message::Gap(g)) => {
                    panic!("the test must see every frame; got a gap {g:?}")
                }
                Some(watch_response::Message::History(_)) => {}
                None => {}
            },
            Ok(None) | Err(_) => break,
        }
    }
    out
}

async fn history(
    c: &mut Client,
    since_ms: u64,
    until_ms: u64,
    step_ms: u32,
    fields: &[&str],
) -> api::GetHistoryResponse {
    c.get_history(api::GetHistoryRequest {
        gpus: Vec::new(),
        fields: fields.iter().map(|&f| f.to_owned()).collect(),
        since: Some(ts(since_ms)),
        until: Some(ts(until_ms)),
        step_ms,
        columnar: false,
    })
    .await
    .expect("GetHistory")
    .into_inner()
}

fn field(a: &api::GetHistoryResponse, name: &str) -> usize {
    a.fields
        .iter()
        .position(|f| f == name)
        .unwrap_or_else(|| panic!("{name} in {:?}", a.fields))
}

/// Compares every point whose whole range Watch saw with what the test
/// computes from the Watch readings in that range.
fn assert_points_match(a: &api::GetHistoryResponse, seen: &BTreeMap<u32, Vec<Seen>>) -> usize {
    let (ti, pi) = (field(a, "temperature_c"), field(a, "power_draw_mw"));
    let step = u64::from(a.step_ms);
    let mut compared = 0;
    for g in &a.gpus {
        let readings = &seen[&g.index];
        let (first, last) = (readings[0].t_ms, readings[readings.len() - 1].t_ms);
        for p in &g.points {
            let start = u64::try_from(p.time_unix_ms).expect("positive");
            // Only ranges Watch covered from end to end.
            if start < first || start + step > last {
                continue;
            }
            let inside: Vec<&Seen> = readings
                .iter()
                .filter(|s| s.t_ms >= start && s.t_ms < start + step)
                .collect();
            assert_eq!(
                p.samples as usize,
                inside.len(),
                "GPU {} point at {start} (step {step}): readings",
                g.index
            );
            let temps: Vec<f64> = inside.iter().map(|s| f64::from(s.temp_c)).collect();
            let powers: Vec<f64> = inside.iter().map(|s| f64::from(s.power_mw)).collect();
            let check = |v: &api::FieldStats, xs: &[f64], tolerance: f64, what: &str| {
                let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
                let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mean = xs.iter().sum::<f64>() / xs.len() as f64;
                assert_eq!(v.min, Some(min), "{what} min at {start}");
                assert_eq!(v.max, Some(max), "{what} max at {start}");
                assert_eq!(v.last, xs.last().copied(), "{what} last at {start}");
                let got = v.mean.expect("mean");
                assert!(
                    (got - mean).abs() <= tolerance,
                    "{what} mean at {start}: {got} vs {mean}"
                );
            };
            check(&p.values[ti], &temps, 0.5, "temperature_c");
            check(&p.values[pi], &powers, 5000.0, "power_draw_mw");
            compared += 1;
        }
    }
    compared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_history_agrees_with_what_watch_delivered_at_every_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(fleet(FAST_FLUSH)));
    let mut c = d.client().await;
    let seen = watch_for(&mut c, Duration::from_secs(14)).await;
    assert_eq!(seen.len(), 2, "both GPUs read");
    // Temperatures moved: a flat line would prove little.
    let temps: Vec<u32> = seen[&0].iter().map(|s| s.temp_c).collect();
    assert!(
        temps.iter().max() > temps.iter().min(),
        "the demand profile moves the temperature"
    );
    // Everything Watch saw has been committed after a flush or two.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let first = seen[&0][0].t_ms;
    let last = seen[&0].last().expect("readings").t_ms;
    for (step, tier) in [(100, 100), (1000, 1000), (3000, 1000), (60_000, 60_000)] {
        // The raw ring (a minute) serves a window it reaches back to.
        let since = if step < 1000 { first } else { first - 2000 };
        let a = history(&mut c, since, last + 1, step, &[]).await;
        assert_eq!(
            a.tier_step_ms, tier,
            "step {step} is served by the {tier} ms tier"
        );
        assert_eq!(a.gpus.len(), 2);
        for g in &a.gpus {
            assert!(
                g.points.iter().all(|p| p.tier_step_ms == tier),
                "every point says its tier"
            );
            assert!(
                g.gaps
                    .iter()
                    .all(|gap| gap.reason() != HistoryGapReason::DaemonDown),
                "no downtime in one run: {:?}",
                g.gaps
            );
        }
        let compared = assert_points_match(&a, &seen);
        if step < 60_000 {
            assert!(compared >= 4, "step {step}: compared {compared} points");
        }
    }
    // One minute bucket holds the whole run: its extremes are the run's.
    let a = history(&mut c, first, last + 1, 60_000, &["temperature_c"]).await;
    for g in &a.gpus {
        let max = seen[&g.index].iter().map(|s| s.temp_c).max().expect("some");
        let got = g
            .points
            .iter()
            .filter_map(|p| p.values[0].max)
            .fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(got, f64::from(max), "GPU {} hottest reading", g.index);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_say_exactly_what_points_say() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(fleet(FAST_FLUSH)));
    let mut c = d.client().await;
    let started = crate::support::now_ms();
    tokio::time::sleep(Duration::from_secs(7)).await;
    // A settled window (committed, no open bucket at its end) reaching
    // back before the daemon started (a NOT_RETAINED gap at its start).
    let until = crate::support::now_ms() - 2_500;
    let since = started - 5_000;
    for (step, fields) in [
        (100, vec![]),
        (1000, vec![]),
        (3000, vec!["power_draw_mw", "temperature_c"]),
        (60_000, vec!["memory_used_bytes"]),
    ] {
        let ask = |columnar| api::GetHistoryRequest {
            fields: fields.iter().map(|&f| f.to_owned()).collect(),
            since: Some(ts(since)),
            until: Some(ts(until)),
            step_ms: step,
            columnar,
            ..Default::default()
        };
        let points = c
            .get_history(ask(false))
            .await
            .expect("points")
            .into_inner();
        let mut columns = c
            .get_history(ask(true))
            .await
            .expect("columns")
            .into_inner();
        assert!(
            !points.columnar && columns.columnar,
            "step {step}: the forms asked for"
        );
        assert!(
            columns
                .gpus
                .iter()
                .all(|g| g.points.is_empty() && g.columns.is_some()),
            "step {step}: a columnar answer carries no points"
        );
        columns.expand_columns().expect("well-formed columns");
        assert_eq!(columns.step_ms, points.step_ms);
        assert_eq!(columns.tier_step_ms, points.tier_step_ms);
        assert_eq!(columns.fields, points.fields);
        let mut compared = 0;
        for (gc, gp) in columns.gpus.iter().zip(&points.gpus) {
            assert_eq!(gc.gaps, gp.gaps, "step {step}: the same gaps");
            assert_eq!(gc.points.len(), gp.points.len(), "step {step}: points");
            assert!(!gp.points.is_empty(), "step {step}: some points");
            for (pc, pp) in gc.points.iter().zip(&gp.points) {
                assert_eq!(
                    (pc.time_unix_ms, pc.tier_step_ms, pc.samples),
                    (pp.time_unix_ms, pp.tier_step_ms, pp.samples)
                );
                assert_eq!(pc.throttle_reasons_mask, pp.throttle_reasons_mask);
                assert_eq!(pc.governor_state, pp.governor_state);
                for (vc, vp) in pc.values.iter().zip(&pp.values) {
                    assert_eq!((vc.min, vc.max, vc.last), (vp.min, vp.max, vp.last));
                    match (vc.mean, vp.mean) {
                        (Some(a), Some(b)) => assert!(
                            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                            "step {step}: mean {a} vs {b}"
                        ),
                        (a, b) => assert_eq!(a, b, "step {step}: absent in both"),
                    }
                    compared += 1;
                }
            }
        }
        assert!(compared > 0);
    }
}

fn gaps_of(a: &api::GetHistoryResponse, reason: HistoryGapReason) -> Vec<(u64, u64)> {
    a.gpus[0]
        .gaps
        .iter()
        .filter(|g| g.reason() == reason)
        .map(|g| {
            (
                u64::try_from(g.start_unix_ms).expect("positive"),
                u64::try_from(g.end_unix_ms).expect("positive"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_run_is_a_downtime_gap_and_loses_at_most_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The default flush interval (1 s): what a real daemon would lose.
    let mut d = crate::support::start(dir.path(), Options::with_config(fleet("")));
    let mut c = d.client().await;
    let before = watch_for(&mut c, Duration::from_secs(5)).await;
    let last_seen = before[&0].last().expect("readings").t_ms;
    d.kill();
    let killed = crate::support::now_ms();
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.restart();
    let mut c = d.client().await;
    let after = watch_for(&mut c, Duration::from_secs(4)).await;
    let back = after[&0][0].t_ms;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let since = before[&0][0].t_ms;
    let a = history(
        &mut c,
        since,
        crate::support::now_ms(),
        1000,
        &["temperature_c"],
    )
    .await;
    let down = gaps_of(&a, HistoryGapReason::DaemonDown);
    assert_eq!(down.len(), 1, "one downtime: {:?}", a.gpus[0].gaps);
    let (start, end) = down[0];
    assert!(start <= killed, "the gap starts before the kill");
    assert!(
        start + 3000 >= last_seen,
        "at most a few seconds before the kill are lost: the gap starts {} ms before the last reading Watch saw",
        last_seen.saturating_sub(start)
    );
    assert!(
        end <= back && end + 5000 >= back,
        "the gap ends when the new run started"
    );
    // Nothing invented inside the downtime.
    for p in &a.gpus[0].points {
        let t = u64::try_from(p.time_unix_ms).expect("positive");
        assert!(
            !(t >= start && t + 1000 <= end),
            "a point at {t} inside the downtime {start}..{end}"
        );
        assert!(p.samples > 0);
    }
    // Data on both sides of it.
    assert!(
        a.gpus[0]
            .points
            .iter()
            .any(|p| (p.time_unix_ms as u64) < start)
    );
    assert!(
        a.gpus[0]
            .points
            .iter()
            .any(|p| (p.time_unix_ms as u64) >= end)
    );
    // Points that ended before the last commit (the gap's start) still
    // match what Watch saw then; the readings after it are the loss.
    let committed: BTreeMap<u32, Vec<Seen>> = before
        .iter()
        .map(|(&i, v)| (i, v.iter().copied().filter(|s| s.t_ms < start).collect()))
        .collect();
    let a1 = history(&mut c, since, start - start % 1000, 1000, &[]).await;
    assert!(assert_points_match(&a1, &committed) >= 2);
    // The minute bucket the kill fell in holds both runs' readings.
    let a60 = history(
        &mut c,
        since,
        crate::support::now_ms(),
        60_000,
        &["temperature_c"],
    )
    .await;
    let total: u32 = a60.gpus[0].points.iter().map(|p| p.samples).sum();
    let one_s: u32 = a.gpus[0].points.iter().map(|p| p.samples).sum();
    assert!(
        total + 20 >= one_s,
        "the coarse tier kept both runs: {total} vs {one_s} readings at 1 s"
    );
}

/// The judged check, bounded: a fleet simulated 600 times faster
/// than the wall clock (three simulated hours in about 20 s), SIGKILLed and
/// restarted half way; GetHistory at several steps against statistics
/// computed here from Watch: every point Watch saw from end to end has
/// Watch's reading count, exact extremes and last, means within 0.5 °C and
/// 5 W; the downtime is one DAEMON_DOWN gap and no point lies in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_simulated_run_killed_half_way_matches_watch_at_every_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = crate::support::start(dir.path(), Options::with_config(fleet_at(600.0, "")));
    let mut c = d.client().await;
    let before = watch_for(&mut c, Duration::from_secs(10)).await;
    d.kill();
    let killed = crate::support::now_ms();
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.restart();
    let mut c = d.client().await;
    let after = watch_for(&mut c, Duration::from_secs(10)).await;
    // Everything after the restart is committed after a flush or two.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let since = before[&0][0].t_ms;
    let until = after[&0].last().expect("readings").t_ms + 1;
    let a = history(&mut c, since, until, 1000, &["temperature_c"]).await;
    let down = gaps_of(&a, HistoryGapReason::DaemonDown);
    assert_eq!(down.len(), 1, "one downtime: {:?}", a.gpus[0].gaps);
    let (start, end) = down[0];
    assert!(
        start <= killed && end > killed,
        "the downtime holds the kill"
    );
    let back = after[&0][0].t_ms;
    assert!(
        end <= back,
        "the downtime ends before the new run's first reading"
    );
    // Readings up to the last commit before the kill, and after the restart.
    let committed: BTreeMap<u32, Vec<Seen>> = before
        .iter()
        .map(|(&i, v)| (i, v.iter().copied().filter(|s| s.t_ms < start).collect()))
        .collect();
    for (step, want) in [(1000u32, 5usize), (2000, 2), (4000, 1)] {
        let a = history(&mut c, since, until, step, &[]).await;
        for g in &a.gpus {
            for p in &g.points {
                let t = u64::try_from(p.time_unix_ms).expect("positive");
                assert!(
                    !(t >= start && t + u64::from(step) <= end),
                    "step {step}: a point at {t} inside the downtime {start}..{end}"
                );
                assert!(p.samples > 0, "step {step}: an empty point at {t}");
            }
            assert!(
                g.gaps
                    .iter()
                    .any(|gap| gap.reason() == HistoryGapReason::DaemonDown),
                "step {step}: GPU {} shows the downtime",
                g.index
            );
        }
        let old = assert_points_match(&a, &committed);
        let new = assert_points_match(&a, &after);
        assert!(
            old >= want && new >= want,
            "step {step}: compared {old} points before the kill and {new} after"
        );
    }
    // Extremes over the whole window are exact (the hottest reading).
    let a = history(&mut c, since, until, 60_000, &["temperature_c"]).await;
    for g in &a.gpus {
        let seen_max = committed[&g.index]
            .iter()
            .chain(&after[&g.index])
            .map(|s| s.temp_c)
            .max()
            .expect("readings");
        let got = g
            .points
            .iter()
            .filter_map(|p| p.values[0].max)
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(
            got >= f64::from(seen_max),
            "GPU {}: history's hottest {got} vs Watch's {seen_max}",
            g.index
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = crate::support::start(dir.path(), Options::with_config(fleet("")));
    let mut c = d.client().await;
    let watcher = {
        let mut c = c.clone();
        tokio::spawn(async move { watch_for(&mut c, Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    d.stop().expect("clean stop");
    let seen = watcher.await.expect("watcher");
    d.restart();
    c = d.client().await;
    let readings = &seen[&0];
    let (first, last) = (readings[0].t_ms, readings[readings.len() - 1].t_ms);
    let a = history(&mut c, first, last + 1, 1000, &["temperature_c"]).await;
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for s in readings {
        *per_second.entry(s.t_ms - s.t_ms % 1000).or_default() += 1;
    }
    let first_bucket = first - first % 1000;
    for (&start, &n) in &per_second {
        let p = a.gpus[0]
            .points
            .iter()
            .find(|p| p.time_unix_ms as u64 == start)
            .unwrap_or_else(|| panic!("the second at {start} is in history"));
        if start == first_bucket {
            assert!(p.samples as usize >= n);
        } else {
            // Every reading, up to the last one before the stop.
            assert!(
                p.samples as usize >= n,
                "second {start}: {} readings kept, Watch saw {n}",
                p.samples
            );
        }
    }
    let last_bucket = last - last % 1000;
    let kept = a.gpus[0]
        .points
        .iter()
        .find(|p| p.time_unix_ms as u64 == last_bucket)
        .map(|p| p.samples);
    assert!(kept.is_some(), "the last second before the stop is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_moved_aside_reported_and_the_daemon_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("history.redb"),
        b"this is not a redb database, it is a few bytes of garbage".repeat(200),
    )
    .expect("write");
    let d = crate::support::start(dir.path(), Options::with_config(fleet(FAST_FLUSH)));
    let mut c = d.client().await;
    let events = events_since(&mut c, 0).await;
    let damaged = events
        .iter()
        .find(|e| e.kind() == EventKind::StateDamaged && e.reason.contains("history"))
        .unwrap_or_else(|| panic!("a STATE_DAMAGED event about history: {events:?}"));
    assert!(damaged.reason.contains("moved aside"), "{}", damaged.reason);
    let aside = moved_aside(dir.path());
    assert_eq!(aside.len(), 1, "the damaged file is kept for inspection");
    assert!(d.log().contains("history store"), "and logged");
    // The new store works.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = crate::support::now_ms();
    let a = history(&mut c, now - 10_000, now, 1000, &["temperature_c"]).await;
    assert!(a.gpus[0].points.len() >= 2, "{:?}", a.gpus[0]);
}

fn moved_aside(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("history.redb.damaged-"))
        .collect()
}

fn tiers(fine: &str, coarse: &str) -> String {
    format!(
        "{FAST_FLUSH}\n[[history.tiers]]\nstep = \"{fine}\"\nretain = \"1h\"\n\n[[history.tiers]]\nstep = \"{coarse}\"\nretain = \"2h\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_tiers_keeps_what_still_fits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = crate::support::start(dir.path(), Options::with_config(fleet(&tiers("1s", "10s"))));
    let mut c = d.client().await;
    let seen = watch_for(&mut c, Duration::from_secs(5)).await;
    let (first, last) = (seen[&0][0].t_ms, seen[&0].last().expect("some").t_ms);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = history(&mut c, first, last + 1, 1000, &["temperature_c"]).await;
    let kept: u32 = before.gpus[0].points.iter().map(|p| p.samples).sum();
    assert!(kept > 0);
    d.stop().expect("clean stop");
    drop(d);

    // Now 2 s and 1 min: the 1 s tier folds into both.
    let d = crate::support::start(dir.path(), Options::with_config(fleet(&tiers("2s", "1m"))));
    let mut c = d.client().await;
    let after = history(
        &mut c,
        first - first % 2000,
        last + 1,
        2000,
        &["temperature_c"],
    )
    .await;
    assert_eq!(after.tier_step_ms, 2000);
    let at_2s: u32 = after.gpus[0].points.iter().map(|p| p.samples).sum();
    assert!(
        at_2s >= kept,
        "the 2 s tier holds every reading the 1 s tier had: {at_2s} vs {kept}"
    );
    // Extremes survive the fold.
    let max_before = before.gpus[0]
        .points
        .iter()
        .filter_map(|p| p.values[0].max)
        .fold(f64::NEG_INFINITY, f64::max);
    let max_after = after.gpus[0]
        .points
        .iter()
        .filter(|p| (p.time_unix_ms as u64) < last + 1)
        .filter_map(|p| p.values[0].max)
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(max_after >= max_before);
    let coarse = history(
        &mut c,
        first - 120_000,
        last + 1,
        60_000,
        &["temperature_c"],
    )
    .await;
    assert_eq!(coarse.tier_step_ms, 60_000);
    assert!(
        !coarse.gpus[0].points.is_empty(),
        "the minute tier was filled from the old tiers"
    );
    assert!(
        d.log().contains("no longer configured"),
        "the change is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = "[history]\nmax_points_per_request = 1000\nmax_bytes_per_request = 65536\n";
    let d = crate::support::start(dir.path(), Options::with_config(fleet(limits)));
    let mut c = d.client().await;
    let now = crate::support::now_ms();
    let e = c
        .get_history(api::GetHistoryRequest {
            since: Some(ts(now - 3_600_000)),
            step_ms: 1000,
            ..Default::default()
        })
        .await
        .expect_err("2 x 3600 points is over 1000");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("max_points_per_request = 1000"),
        "{}",
        e.message()
    );
    let e = c
        .get_history(api::GetHistoryRequest {
            since: Some(ts(now - 400_000)),
            step_ms: 1000,
            ..Default::default()
        })
        .await
        .expect_err("800 points of every field is over 64 KiB");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("max_bytes_per_request = 65536"),
        "{}",
        e.message()
    );
    // Fewer fields fit.
    c.get_history(api::GetHistoryRequest {
        since: Some(ts(now - 100_000)),
        step_ms: 1000,
        fields: vec!["temperature_c".into()],
        gpus: vec![crate::support::index(0)],
        ..Default::default()
    })
    .await
    .expect("one field of one GPU fits");
    let e = c
        .get_history(api::GetHistoryRequest {
            fields: vec!["temperature_f".into()],
            ..Default::default()
        })
        .await
        .expect_err("unknown field");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("temperature_c"),
        "names the allowed fields: {}",
        e.message()
    );
    let e = c
        .get_history(api::GetHistoryRequest {
            since: Some(ts(now)),
            until: Some(ts(now - 1000)),
            ..Default::default()
        })
        .await
        .expect_err("backwards window");
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_needs_the_read_role_on_grpc_and_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d: Daemon = crate::support::start(
        dir.path(),
        Options {
            http: true,
            ..Options::with_config(fleet(FAST_FLUSH))
        },
    );
    // (On loopback, reads without a token are open by design; a wrong
    // token is refused, and the authorization table's READ row is checked
    // for every method by daemon_security.)
    let mut stranger = d.client_with(Some("not-a-token-anyone-configured")).await;
    let e = stranger
        .get_history(api::GetHistoryRequest::default())
        .await
        .expect_err("unknown token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut reader = connect_with(&d.url(), Some(READ_TOKEN)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = reader
        .get_history(api::GetHistoryRequest::default())
        .await
        .expect("a read token may")
        .into_inner();
    assert_eq!(a.gpus.len(), 2);
    assert!(
        a.tiers.iter().any(|t| t.raw),
        "the raw ring is listed as a tier"
    );

    let url = d.http_url("/api/v1/history?since=15m");
    let r = crate::http_support::get(&url, None).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = crate::http_support::get_bearer(&url, READ_TOKEN).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let json: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(json["gpus"].as_array().map(Vec::len), Some(2));
    assert!(
        json["gpus"][0]["points"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "{json}"
    );
    let r = crate::http_support::get_bearer(
        &d.http_url("/api/v1/history?since=7d&step=1s"),
        READ_TOKEN,
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("max_points_per_request"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_opens_with_the_last_minutes_even_right_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d: Daemon = crate::support::start(
        dir.path(),
        Options {
            http: true,
            ..Options::with_config(fleet(FAST_FLUSH))
        },
    );
    let page = crate::http_support::get_bearer(&d.http_url("/"), READ_TOKEN).await;
    for hook in [
        "api/v1/history",
        "\"3600000\"",
        "\"86400000\"",
        "\"604800000\"",
    ] {
        assert!(page.body.contains(hook), "the page lacks {hook}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.stop().expect("clean stop");
    let stopped = crate::support::now_ms();
    d.restart();
    let r =
        crate::http_support::get_bearer(&d.http_url("/api/v1/history?since=15m"), READ_TOKEN).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let json: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let points = json["gpus"][0]["points"].as_array().expect("points");
    let before = points
        .iter()
        .filter(|p| p[0].as_u64().is_some_and(|t| t < stopped))
        .count();
    assert!(before >= 2, "the run before the restart is drawn: {json}");
    let gaps = json["gpus"][0]["gaps"].as_array().expect("gaps");
    assert!(
        gaps.iter().any(|g| g["reason"] == "daemon_down"),
        "the restart is marked: {gaps:?}"
    );
    let events = json["events"].as_array().expect("events");
    assert!(
        events
            .iter()
            .filter(|e| e["kind"] == "daemon_started")
            .count()
            >= 2,
        "both starts are on the time axis: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resume_older_than_the_ring_continues_from_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A ring of 20 frames: 2 s at 100 ms.
    let config = fleet("history = 20\n[history]\nflush_interval = \"200ms\"\n");
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let mut c = d.client().await;
    let mut stream = crate::support::watch(&mut c, WatchRequest::default()).await;
    let (seq, t0) = loop {
        if let watch_response::Message::Frame(f) = crate::support::next_message(&mut stream).await {
            break (f.seq, ms_of(f.time));
        }
    };
    drop(stream);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut stream = crate::support::watch(
        &mut c,
        WatchRequest {
            resume_after_seq: Some(seq),
            ..WatchRequest::default()
        },
    )
    .await;
    let watch_response::Message::Start(start) = crate::support::next_message(&mut stream).await
    else {
        panic!("Watch starts with a start message");
    };
    let watch_response::Message::History(h) = crate::support::next_message(&mut stream).await
    else {
        panic!("a resume older than the ring continues from history first");
    };
    let watch_response::Message::Gap(gap) = crate::support::next_message(&mut stream).await else {
        panic!("then the gap, as precise as without history");
    };
    assert_eq!(gap.first_seq, seq + 1);
    assert_eq!(
        gap.last_seq + 1,
        start.oldest_seq,
        "the gap ends where the ring starts"
    );
    assert_eq!(gap.reason(), api::GapReason::NotInHistory);
    assert_eq!(h.gpus.len(), 2);
    for g in &h.gpus {
        let first = g.points.first().expect("points from history");
        let last = g.points.last().expect("points");
        let first_t = u64::try_from(first.time_unix_ms).expect("positive");
        assert!(
            first_t + 1500 >= t0 && first_t <= t0 + 1500,
            "history starts at the resume point: {first_t} vs {t0}"
        );
        assert!(
            g.points.len() >= 3,
            "about 3 s of 1 s points: {}",
            g.points.len()
        );
        assert!(
            u64::try_from(last.time_unix_ms).expect("positive") <= crate::support::now_ms(),
            "nothing from the future"
        );
        assert!(
            g.points
                .iter()
                .all(|p| p.tier_step_ms == 1000 && p.samples > 0)
        );
    }
    // Then live frames as usual.
    loop {
        if let watch_response::Message::Frame(f) = crate::support::next_message(&mut stream).await {
            assert!(f.seq > gap.last_seq);
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resume_from_before_a_restart_continues_from_history_with_the_downtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fleet("history = 20\n[history]\nflush_interval = \"200ms\"\n");
    let mut d = crate::support::start(dir.path(), Options::with_config(config));
    let mut c = d.client().await;
    let mut stream = crate::support::watch(&mut c, WatchRequest::default()).await;
    let (seq, t0) = loop {
        if let watch_response::Message::Frame(f) = crate::support::next_message(&mut stream).await {
            break (f.seq, ms_of(f.time));
        }
    };
    drop(stream);
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.stop().expect("clean stop");
    d.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut c = d.client().await;
    let mut stream = crate::support::watch(
        &mut c,
        WatchRequest {
            resume_after_seq: Some(seq),
            ..WatchRequest::default()
        },
    )
    .await;
    let _start = crate::support::next_message(&mut stream).await;
    let watch_response::Message::History(h) = crate::support::next_message(&mut stream).await
    else {
        panic!("history first");
    };
    let watch_response::Message::Gap(gap) = crate::support::next_message(&mut stream).await else {
        panic!("then the gap");
    };
    assert!(gap.restarted, "the gap says it spans a restart");
    let g = &h.gpus[0];
    let first_t = u64::try_from(g.points[0].time_unix_ms).expect("positive");
    assert!(
        first_t + 1500 >= t0 && first_t <= t0 + 1500,
        "history starts at the resume point of the earlier run: {first_t} vs {t0}"
    );
    assert!(
        g.gaps
            .iter()
            .any(|x| x.reason() == HistoryGapReason::DaemonDown),
        "the downtime is marked: {:?}",
        g.gaps
    );
}
