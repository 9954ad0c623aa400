//! The node power budget through the real daemon over gRPC: eight simulated
//! H100s under 4,000 W with demand that moves between them. Every sample's
//! sum of power limits stays within the budget from the moment
//! SetPowerBudget answers; the power the GPUs draw is at least 95 % of what
//! the best split of the same demand (water-filling on the true demand)
//! would let them draw; no GPU is written more than once a simulated
//! second; when the total demand falls under the budget every GPU's limit
//! covers its demand. Plus: bad budgets are INVALID_ARGUMENT naming the
//! host's range, the budget survives a restart, and dropping it gives the
//! GPUs their ceilings back.
//!
//! Simulated time runs 5x the wall clock; the sampler reads every 100 ms
//! (every half simulated second).

use std::time::{Duration, SystemTime};

use crate::support::{Options, events_since};
use gpuwatch_api::{self as api, ActorKind, EventKind, event::Change};

const SPEED: f64 = 5.0;
const BUDGET_W: f64 = 4000.0;
const GPUS: usize = 8;
const MIN_W: f64 = 200.0;
const MAX_W: f64 = 700.0;

/// Demand steps of GPU `i`: (simulated second, watts). Half busy (3,000 W
/// asked), all busy (5,200 W), the other half busy and harder (3,200 W),
/// two flat out and the rest at 450 W (4,100 W), a hot spot moving every
/// 4 s (2,800 W), six flat out (4,500 W), then everyone light (2,400 W).
fn demand_steps(i: usize) -> Vec<(f64, f64)> {
    let mut steps = vec![
        (0.0, 100.0),
        (15.0, if i < 4 { 650.0 } else { 100.0 }),
        (40.0, 650.0),
        (65.0, if i < 4 { 100.0 } else { 700.0 }),
        (90.0, if i < 2 { 700.0 } else { 450.0 }),
    ];
    for slot in 0..8 {
        steps.push((
            115.0 + 4.0 * slot as f64,
            if slot == i { 700.0 } else { 300.0 },
        ));
    }
    steps.push((147.0, if i < 6 { 700.0 } else { 150.0 }));
    steps.push((172.0, 300.0));
    steps
}

const END_S: f64 = 195.0;

fn demand_at(i: usize, sim_s: f64) -> f64 {
    demand_steps(i)
        .iter()
        .rev()
        .find(|(at, _)| *at <= sim_s)
        .map_or(100.0, |s| s.1)
}

fn config() -> String {
    let mut toml = format!(
        "[sampler]\ninterval = \"100ms\"\n\n[simulator]\nspeed = {SPEED}\n\n[controller]\nthreshold_c = 80\n"
    );
    for i in 0..GPUS {
        let points: Vec<String> = demand_steps(i)
            .iter()
            .map(|(at, w)| format!("{{ at = \"{at}s\", watts = {w} }}"))
            .collect();
        toml.push_str(&format!(
            "\n[[simulator.gpus]]\npreset = \"h100-sxm\"\nambient_c = 30.0\nthermal_resistance_c_per_w = 0.05\ntime_constant = \"5s\"\ndemand = [ {} ]\n",
            points.join(", ")
        ));
    }
    toml
}

/// The best split of the true demand: water-filling, each GPU between the
/// device minimum and what it asks for (up to its maximum). Returns the
/// power that split lets the GPUs draw.
fn oracle_w(demand: &[f64]) -> f64 {
    let caps: Vec<f64> = demand.iter().map(|d| d.clamp(MIN_W, MAX_W)).collect();
    let at = |level: f64| caps.iter().map(|c| level.clamp(MIN_W, *c)).sum::<f64>();
    let (mut lo, mut hi) = (MIN_W, MAX_W);
    if at(hi) > BUDGET_W {
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if at(mid) <= BUDGET_W {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    } else {
        lo = hi;
    }
    demand
        .iter()
        .zip(&caps)
        .map(|(d, c)| d.min(lo.clamp(MIN_W, *c)))
        .sum()
}

struct Sample {
    sim_s: f64,
    limits_mw: Vec<u32>,
    draws_mw: Vec<u32>,
}

/// Every frame from now until `until_sim_s`, the eight GPUs' limits and draws.
async fn record(
    client: &mut crate::support::Client,
    since: SystemTime,
    until_sim_s: f64,
) -> Vec<Sample> {
    let mut out = Vec::new();
    crate::support::frames_until(
        client,
        SPEED,
        until_sim_s,
        Duration::from_secs(30),
        |sim_s, frame| {
            let Some(t) = frame.time.and_then(|t| SystemTime::try_from(t).ok()) else {
                return;
            };
            if t < since {
                // A frame read before the budget was set.
                return;
            }
            let mut samples = frame.samples.clone();
            samples.sort_by_key(|s| s.index);
            if samples.len() == GPUS {
                out.push(Sample {
                    sim_s,
                    limits_mw: samples
                        .iter()
                        .map(|s| s.power_limit_mw.unwrap_or(u32::MAX / 16))
                        .collect(),
                    draws_mw: samples
                        .iter()
                        .map(|s| s.power_draw_mw.unwrap_or(0))
                        .collect(),
                });
            }
        },
    )
    .await;
    out
}

async fn set_budget(
    c: &mut crate::support::Client,
    target: api::set_power_budget_request::Target,
) -> Result<api::SetPowerBudgetResponse, tonic::Status> {
    c.set_power_budget(api::SetPowerBudgetRequest {
        target: Some(target),
    })
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_h100s_share_a_4000_w_budget_by_need() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(config()));
    let mut c = d.client().await;
    let reply = set_budget(
        &mut c,
        api::set_power_budget_request::Target::Watts(BUDGET_W),
    )
    .await
    .expect("budget set");
    assert_eq!(reply.power_budget.as_ref().map(|b| b.watts), Some(BUDGET_W));
    assert_eq!(reply.shares.len(), GPUS);
    let samples = record(&mut c, SystemTime::now(), END_S).await;
    assert!(samples.len() > 200, "{} samples", samples.len());

    // The invariant, at every sample from the reply on.
    let worst = samples
        .iter()
        .map(|s| s.limits_mw.iter().map(|&l| u64::from(l)).sum::<u64>())
        .max()
        .expect("samples");
    assert!(
        worst <= (BUDGET_W * 1000.0) as u64,
        "sum of limits reached {} W over a {BUDGET_W} W budget",
        worst / 1000
    );
    // Delivered power against the oracle, from when the first phase began.
    let (mut delivered, mut oracle) = (0.0, 0.0);
    for s in samples.iter().filter(|s| s.sim_s >= 15.0) {
        let demand: Vec<f64> = (0..GPUS).map(|i| demand_at(i, s.sim_s)).collect();
        let got = s
            .draws_mw
            .iter()
            .map(|&d| f64::from(d) / 1000.0)
            .sum::<f64>();
        delivered += got;
        oracle += oracle_w(&demand);
    }
    let ratio = delivered / oracle;
    eprintln!(
        "budget: delivered {:.1} % of the oracle, max sum of limits {} W",
        100.0 * ratio,
        worst / 1000
    );
    assert!(
        ratio >= 0.95,
        "delivered {:.1} % of the oracle",
        100.0 * ratio
    );
    // The last phase asks 2,400 W: settled, every GPU's limit covers it.
    let light: Vec<&Sample> = samples.iter().filter(|s| s.sim_s >= 182.0).collect();
    assert!(!light.is_empty());
    for s in &light {
        for (i, &limit) in s.limits_mw.iter().enumerate() {
            assert!(
                f64::from(limit) / 1000.0 >= demand_at(i, s.sim_s) - 1.0,
                "at {:.0} s GPU {i} is held at {} W under a demand of {} W",
                s.sim_s,
                limit / 1000,
                demand_at(i, s.sim_s)
            );
        }
    }

    // At most one write a simulated second per GPU, whoever wrote.
    let events = events_since(&mut c, 0).await;
    for gpu in 0..GPUS as u32 {
        let writes: Vec<(f64, &api::Event)> = events
            .iter()
            .filter(|e| e.kind() == EventKind::PowerLimitChanged && e.gpu_index == Some(gpu))
            .filter_map(|e| {
                let t = SystemTime::try_from(e.time?).ok()?;
                let s = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64() * SPEED;
                Some((s, e))
            })
            .collect();
        for pair in writes.windows(2) {
            // The daemon spaces writes a simulated second apart when it
            // plans them; their events are stamped when they complete, on
            // the wall clock of a loaded test machine: 60 ms of jitter
            // allowed.
            assert!(
                pair[1].0 - pair[0].0 >= 0.7,
                "GPU {gpu} written twice within {:.2} simulated s: {} / {}",
                pair[1].0 - pair[0].0,
                pair[0].1.reason,
                pair[1].1.reason
            );
        }
    }
    // Audited: who set it, and the redistributions with before/after.
    let set = events
        .iter()
        .find(|e| e.kind() == EventKind::PowerBudgetChanged)
        .expect("the budget change is recorded");
    assert_eq!(
        set.actor.as_ref().map(|a| a.kind()),
        Some(ActorKind::Operator)
    );
    let redistributions: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::PowerBudgetRedistributed)
        .collect();
    assert!(!redistributions.is_empty());
    assert!(
        redistributions.len() as f64 <= END_S / SPEED / 10.0 + 2.0,
        "{} redistribution events: not rate-limited",
        redistributions.len()
    );
    for e in &redistributions {
        let Some(Change::Budget(b)) = &e.change else {
            panic!("a redistribution records the shares: {e:?}");
        };
        assert!(!b.shares.is_empty());
    }
    // GetPolicy shows the budget and the shares.
    let policy = c
        .get_policy(api::GetPolicyRequest::default())
        .await
        .expect("policy")
        .into_inner();
    let budget = policy.power_budget.expect("budget shown");
    assert_eq!(budget.watts, BUDGET_W);
    assert!(budget.counted_mw <= 4_000_000, "{budget:?}");
    assert_eq!((budget.min_mw, budget.max_mw), (1_600_000, 5_600_000));
    assert!(policy.policies.iter().all(|p| p.budget_share_mw.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_outside_the_hosts_range_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(config()));
    let mut c = d.client().await;
    use api::set_power_budget_request::Target;
    for watts in [f64::NAN, 0.0, -100.0, 1000.0, 6000.0, f64::INFINITY] {
        let err = set_budget(&mut c, Target::Watts(watts))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{watts}: {err:?}");
        assert!(
            err.message().contains("1600-5600 W"),
            "{watts}: {}",
            err.message()
        );
    }
    let err = set_budget(&mut c, Target::RestoreDefault(false))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = c
        .set_power_budget(api::SetPowerBudgetRequest { target: None })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Nothing was set.
    let policy = c
        .get_policy(api::GetPolicyRequest::default())
        .await
        .expect("policy")
        .into_inner();
    assert!(policy.power_budget.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_survives_a_restart_and_dropping_it_gives_the_ceilings_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = crate::support::sim_config(
        SPEED,
        "",
        &["preset = \"h100-sxm\"\ncount = 2\ndemand = [ { at = \"0s\", watts = 650 } ]"],
    );
    {
        let d = crate::support::start(dir.path(), Options::with_config(toml.clone()));
        let mut c = d.client().await;
        set_budget(&mut c, api::set_power_budget_request::Target::Watts(900.0))
            .await
            .expect("budget set");
        crate::support::eventually(Duration::from_secs(20), "limits within 900 W", || {
            let mut c = c.clone();
            async move {
                let snap = c
                    .get_snapshot(api::GetSnapshotRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                let sum: u32 = snap
                    .samples
                    .iter()
                    .map(|s| s.power_limit_mw.unwrap_or(u32::MAX / 4))
                    .sum();
                (sum <= 900_000).then_some(())
            }
        })
        .await;
    }
    let d = crate::support::start(dir.path(), Options::with_config(toml));
    let mut c = d.client().await;
    let policy = c
        .get_policy(api::GetPolicyRequest::default())
        .await
        .expect("policy")
        .into_inner();
    let budget = policy.power_budget.expect("the budget was persisted");
    assert_eq!(budget.watts, 900.0);
    assert!(!budget.set_by.is_empty());
    let reply = set_budget(
        &mut c,
        api::set_power_budget_request::Target::RestoreDefault(true),
    )
    .await
    .expect("dropped");
    assert!(reply.power_budget.is_none());
    assert_eq!(reply.previous.map(|b| b.watts), Some(900.0));
    crate::support::eventually(Duration::from_secs(20), "both GPUs back at 700 W", || {
        let mut c = c.clone();
        async move {
            let snap = c
                .get_snapshot(api::GetSnapshotRequest::default())
                .await
                .ok()?
                .into_inner();
            (snap.samples.len() == 2
                && snap
                    .samples
                    .iter()
                    .all(|s| s.power_limit_mw == Some(700_000)))
            .then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_and_each_gpus_share_are_on_metrics_and_the_dashboard() {
    use crate::http_support::{find, get_bearer, parse_samples};
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = crate::support::sim_config(
        SPEED,
        "",
        &["preset = \"h100-sxm\"\ncount = 2\ndemand = [ { at = \"0s\", watts = 650 } ]"],
    );
    let d = crate::support::start(
        dir.path(),
        Options {
            http: true,
            ..Options::with_config(toml)
        },
    );
    let mut c = d.client().await;
    let metrics = || async {
        parse_samples(
            &get_bearer(&d.http_url("/metrics"), crate::support::READ_TOKEN)
                .await
                .body,
        )
    };
    let all = metrics().await;
    assert!(
        find(&all, "gpuwatch_power_budget_watts", &[]).is_empty(),
        "no budget yet"
    );
    set_budget(&mut c, api::set_power_budget_request::Target::Watts(1000.0))
        .await
        .expect("budget set");
    let all = crate::support::eventually(Duration::from_secs(20), "shares on /metrics", || async {
        let all = metrics().await;
        (find(&all, "gpuwatch_governor_budget_share_watts", &[]).len() == 2).then_some(all)
    })
    .await;
    let one = |name: &str| {
        let found = find(&all, name, &[]);
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        found[0].value
    };
    assert_eq!(one("gpuwatch_power_budget_watts"), 1000.0);
    assert!(one("gpuwatch_power_budget_counted_watts") <= 1000.0);
    let shares: f64 = find(&all, "gpuwatch_governor_budget_share_watts", &[])
        .iter()
        .map(|s| s.value)
        .sum();
    assert!(shares <= 1000.0, "shares {shares} W");
    assert_eq!(
        find(&all, "gpuwatch_governor_budget_counted_watts", &[]).len(),
        2
    );
    // The dashboard's starting point carries the budget and each share.
    let r = get_bearer(&d.http_url("/api/v1/dashboard"), crate::support::READ_TOKEN).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(v["power_budget_w"].as_f64(), Some(1000.0));
    for gpu in v["gpus"].as_array().expect("gpus") {
        assert!(gpu["policy"]["budget_share_w"].as_f64().is_some(), "{gpu}");
    }
}
