//! The governor's promised behaviour, checked on simulated GPUs through the
//! scenario runner (the same physics the simulator serves): under a demand
//! that would take a GPU to threshold + 15 °C, with thermal time constants of
//! 2, 10 and 60 s, a lagging sensor, two sampling rates, and GPUs whose
//! cooling differs from what the governor assumes.

use std::time::Duration;

use gpuwatch_server::scenario::{Policy, Scenario, metrics, run};

/// Every combination the issue names, plus cooling the governor's prior gets
/// wrong by -30 % / +40 % at different ambients.
fn scenarios() -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    for tau in [2.0, 10.0, 60.0] {
        for period in [0.1, 1.0] {
            for (r_scale, ambient) in [(1.0, 30.0), (0.7, 40.0), (1.4, 20.0)] {
                let s = Scenario::cooled(
                    Duration::from_secs_f64(tau),
                    Duration::from_secs_f64(period),
                    r_scale,
                    ambient,
                );
                out.push((
                    format!(
                        "tau {tau} s, sampled every {period} s, R x{r_scale}, ambient {ambient} °C"
                    ),
                    s,
                ));
            }
        }
    }
    out
}

#[test]
fn without_a_governor_the_demand_overshoots_by_about_fifteen_degrees() {
    for (name, s) in scenarios() {
        let m = metrics(&s, &run(&s, Policy::None));
        assert!(
            m.peak_c >= s.threshold_c + 13.0,
            "{name}: peak {}",
            m.peak_c
        );
    }
}

#[test]
fn peak_stays_within_two_degrees_of_the_threshold() {
    for (name, s) in scenarios() {
        let m = metrics(&s, &run(&s, Policy::Governor));
        assert!(
            m.peak_c <= s.threshold_c + 2.0,
            "{name}: peak {} for threshold {}",
            m.peak_c,
            s.threshold_c
        );
    }
}

#[test]
fn settles_within_a_degree_of_the_threshold_or_below() {
    for (name, s) in scenarios() {
        let m = metrics(&s, &run(&s, Policy::Governor));
        assert!(
            m.band_c.1 <= s.threshold_c + 1.0,
            "{name}: settled band {:?}",
            m.band_c
        );
        // Not needlessly far below either: by the end of the hot phase the
        // GPU runs within the hysteresis band plus a few degrees.
        let drop = s.drop.as_secs_f64();
        let late = (drop - s.start.as_secs_f64()) / 4.0;
        let trace = run(&s, Policy::Governor);
        let coolest = trace
            .points
            .iter()
            .filter(|p| p.t_s >= drop - late && p.t_s < drop)
            .map(|p| p.temperature_c)
            .fold(f64::MAX, f64::min);
        assert!(
            coolest >= s.threshold_c - s.hysteresis_c - 4.0,
            "{name}: {coolest} °C at the end of the hot phase wastes power (band {:?})",
            m.band_c
        );
    }
}

#[test]
fn writes_are_rate_limited_and_rare_once_settled() {
    for (name, s) in scenarios() {
        let m = metrics(&s, &run(&s, Policy::Governor));
        assert!(
            m.max_writes_per_s <= 1,
            "{name}: {} writes in one second",
            m.max_writes_per_s
        );
        assert!(
            m.steady_writes <= 10,
            "{name}: {} writes while settled",
            m.steady_writes
        );
    }
}

#[test]
fn limit_returns_to_the_ceiling_within_three_time_constants_after_demand_drops() {
    for (name, s) in scenarios() {
        let m = metrics(&s, &run(&s, Policy::Governor));
        let allowed =
            3.0 * s.time_constant.as_secs_f64() + 2.0 * s.sample_period.as_secs_f64() + 1.0;
        let recovery = m.recovery_s.unwrap_or(f64::INFINITY);
        assert!(
            recovery <= allowed,
            "{name}: recovered after {recovery} s, allowed {allowed} s"
        );
    }
}

#[test]
fn governor_never_raises_above_the_ceiling_and_never_below_the_floor() {
    for (_, s) in scenarios() {
        let trace = run(&s, Policy::Governor);
        for p in &trace.points {
            assert!(
                p.level <= trace.ceiling + 1e-9 && p.level >= trace.floor - 1e-9,
                "limit {} at {}",
                p.level,
                p.t_s
            );
        }
    }
}

#[test]
fn naive_rule_oscillates_where_the_governor_does_not() {
    let s = Scenario::standard(Duration::from_secs(10));
    let naive = metrics(&s, &run(&s, Policy::Naive));
    let governed = metrics(&s, &run(&s, Policy::Governor));
    assert!(
        naive.steady_writes > 3 * governed.steady_writes.max(1),
        "naive {naive:?} governor {governed:?}"
    );
    assert!(naive.band_c.1 - naive.band_c.0 > governed.band_c.1 - governed.band_c.0);
}

/// The laptop preset cannot set its power limit: the governor caps the
/// graphics clock instead, with the same promises.
fn laptop_scenarios() -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    for tau in [2.0, 10.0, 60.0] {
        for period in [0.1, 1.0] {
            let mut s = Scenario::standard(Duration::from_secs_f64(tau));
            s.preset = gpuwatch_server::config::PresetKey::Laptop;
            s.high_w = 110.0;
            s.low_w = 20.0;
            s.ambient_c = 35.0;
            let r = 0.42;
            s.thermal_resistance_c_per_w = Some(r);
            s.threshold_c = (s.ambient_c + s.high_w * r - 15.0).round();
            s.sample_period = Duration::from_secs_f64(period);
            out.push((format!("laptop, tau {tau} s, sampled every {period} s"), s));
        }
    }
    out
}

#[test]
fn clock_cap_governs_a_gpu_without_power_limit_control() {
    for (name, s) in laptop_scenarios() {
        let trace = run(&s, Policy::Governor);
        assert_eq!(
            trace.actuator,
            gpuwatch_server::governor::Actuator::ClockCap
        );
        let m = metrics(&s, &trace);
        let unlimited = metrics(&s, &run(&s, Policy::None));
        assert!(
            unlimited.peak_c >= s.threshold_c + 13.0,
            "{name}: {unlimited:?}"
        );
        assert!(m.peak_c <= s.threshold_c + 2.0, "{name}: {m:?}");
        assert!(m.band_c.1 <= s.threshold_c + 1.0, "{name}: {m:?}");
        assert!(m.max_writes_per_s <= 1, "{name}: {m:?}");
        let allowed =
            3.0 * s.time_constant.as_secs_f64() + 2.0 * s.sample_period.as_secs_f64() + 1.0;
        assert!(m.recovery_s.is_some_and(|r| r <= allowed), "{name}: {m:?}");
    }
}

proptest::proptest! {
    /// Whatever the readings (noisy, jumping, absent power, time going
    /// backwards), the governor never asks for a level outside [floor,
    /// ceiling], never panics, and never writes twice within its interval.
    #[test]
    fn governor_stays_in_bounds_for_arbitrary_readings(
        readings in proptest::collection::vec(
            (0u64..3_000, 0.0f64..130.0, proptest::option::of(0.0f64..900.0), proptest::option::of(100.0f64..800.0)),
            1..300,
        )
    ) {
        use gpuwatch_server::governor::{Actuator, Decision, Governor, GovernorParams, Observation};
        let params = GovernorParams {
            threshold_c: 80.0,
            hysteresis_c: 3.0,
            floor: 200.0,
            ceiling: 700.0,
            min_write_interval: Duration::from_secs(1),
            min_step: 5.0,
            ambient_guess_c: 30.0,
            actuator: Actuator::PowerLimit,
            thermal_prior: gpuwatch_server::governor::ThermalPrior::ResistanceCPerW(0.077),
        };
        let mut g = Governor::new(params, 700.0);
        let mut t = Duration::ZERO;
        let mut last_write: Option<Duration> = None;
        for (step_ms, temperature_c, power_w, level) in readings {
            t += Duration::from_millis(step_ms);
            let obs = Observation { time: t, temperature_c, power_w, level, clock_mhz: None };
            if let Decision::Set { level, reason } = g.step(&obs) {
                proptest::prop_assert!((200.0..=700.0).contains(&level), "level {level}");
                proptest::prop_assert!(!reason.is_empty());
                if let Some(w) = last_write {
                    proptest::prop_assert!(t - w >= Duration::from_secs(1), "two writes within a second");
                }
                last_write = Some(t);
            }
        }
    }
}

/// Loads other than a single step: ramps, square waves, a second step up,
/// on every preset the governor can act on.
#[test]
fn other_loads_on_every_preset_stay_near_the_threshold_with_few_writes() {
    // The same scenarios `governor_report --other` prints.
    for (label, s, repeat) in gpuwatch_server::scenario::other_load_scenarios() {
        let threshold = s.threshold_c;
        let period = s.sample_period.as_secs_f64();
        let trace = run(&s, Policy::Governor);
        let peak = trace
            .points
            .iter()
            .map(|p| p.temperature_c)
            .fold(f64::MIN, f64::max);
        assert!(peak <= threshold + 2.0, "{label}: peak {peak}");
        let over: f64 = trace
            .points
            .iter()
            .filter(|p| p.temperature_c > threshold + 1.0)
            .count() as f64
            * period;
        assert!(over <= 5.0, "{label}: {over} s above threshold + 1");
        // Square waves make the governor act every cycle; steady loads
        // need only a handful of writes.
        let budget = repeat.map_or(15, |period| 9 * (400 / period as usize + 1));
        assert!(
            trace.writes_s.len() <= budget,
            "{label}: {} writes",
            trace.writes_s.len()
        );
        let m = metrics(&s, &trace);
        assert!(m.max_writes_per_s <= 1, "{label}: {m:?}");
        // A load that does not come and go is caught, trimmed and
        // held: a few reversals while the model learns, never a
        // swing across the level that holds the threshold (the
        // rounding of the readings once made it swing a dozen times
        // on a ramp).
        if repeat.is_none() {
            assert!(m.reversals <= 4, "{label}: {} reversals", m.reversals);
        }
    }
}

/// The "hold the threshold" criteria, side by side with the
/// previous governor: where the GPU's time constant is long enough for the
/// governor to see its curve (10 and 60 s), it settles at the threshold
/// rather than under it; across all the scenarios it meets every criterion
/// in most of them (the previous governor in few). At 2 s the hot phase of
/// the standard scenario (16 s) is short next to the first cut's caution and
/// the sensor's lag: half the variants meet every criterion there (a
/// provisional response fit gives power back a reading or two after the
/// cut); the misses are printed by `governor_report --matrix` and stated in
/// the README.
#[test]
fn holds_the_threshold_rather_than_hiding_under_it() {
    use gpuwatch_server::scenario::{criteria_scenarios, hold_criteria_failures};
    let mut given_up_now = 0.0;
    let mut given_up_before = 0.0;
    let (mut all_met_now, mut all_met_before, mut scenarios) = (0, 0, 0);
    let (mut fast_met, mut fast) = (0, 0);
    for (name, s) in criteria_scenarios() {
        let previous = metrics(&s, &run(&s, Policy::GovernorV1));
        let m = metrics(&s, &run(&s, Policy::Governor));
        given_up_now += m.power_given_up_w.max(0.0);
        given_up_before += previous.power_given_up_w.max(0.0);
        scenarios += 1;
        let fast_gpu = s.time_constant <= Duration::from_secs(2);
        fast += usize::from(fast_gpu);
        if hold_criteria_failures(&s, &m, &previous).is_empty() {
            all_met_now += 1;
            fast_met += usize::from(fast_gpu);
        }
        if hold_criteria_failures(&s, &previous, &previous).is_empty() {
            all_met_before += 1;
        }
        let t = s.threshold_c;
        // Safety holds everywhere.
        assert!(m.peak_c <= t + 2.0, "{name}: {m:?}");
        assert!(m.max_writes_per_s <= 1, "{name}: {m:?}");
        if s.time_constant >= Duration::from_secs(60) {
            // Mean within [T - 1, T] and no reading over T + 1 once
            // settled.
            assert!(
                m.settled_mean_c >= t - 1.0 && m.settled_mean_c <= t,
                "{name}: {m:?}"
            );
            assert!(
                m.band_c.1 <= t + 1.0 && m.band_c.1 - m.band_c.0 <= 2.0,
                "{name}: {m:?}"
            );
            let failed = hold_criteria_failures(&s, &m, &previous);
            assert!(
                failed.iter().all(|f| *f == "writes" || *f == "mean"),
                "{name}: {failed:?}"
            );
        }
    }
    // What the operator pays, summed over every scenario: under half what
    // the previous governor gave away.
    assert!(
        given_up_now < 0.5 * given_up_before,
        "power given up: {given_up_now:.0} W now, {given_up_before:.0} W before"
    );
    // Every criterion met in at least two thirds of the scenarios, and in at
    // least twice as many as the previous governor manages; at a time
    // constant of 2 s, where the first cut's caution costs most, in at least
    // half.
    assert!(
        3 * all_met_now >= 2 * scenarios && all_met_now >= 2 * all_met_before,
        "every criterion met in {all_met_now} of {scenarios} scenarios (previous governor: {all_met_before})"
    );
    assert!(
        2 * fast_met >= fast,
        "every criterion met in {fast_met} of the {fast} scenarios at a time constant of 2 s"
    );
}

/// No limit cycle under a square-wave load whose period is the time
/// constant: the governor cuts as the load comes and gives back as it
/// goes — at most two reversals per period (and a few to settle) — never
/// more.
#[test]
fn a_square_wave_near_the_time_constant_does_not_make_it_cycle() {
    for tau in [2.0, 10.0, 60.0] {
        for period in [0.1, 1.0] {
            let s = Scenario::square_wave(
                Duration::from_secs_f64(tau),
                Duration::from_secs_f64(period),
            );
            let m = metrics(&s, &run(&s, Policy::Governor));
            let cycles = (s.duration.as_secs_f64() / tau).ceil() as usize;
            assert!(
                m.reversals <= 2 * cycles + 4,
                "tau {tau} s, sampled every {period} s: {} reversals in {cycles} periods",
                m.reversals
            );
            assert!(m.max_writes_per_s <= 1, "tau {tau}: {m:?}");
            assert!(m.peak_c <= s.threshold_c + 2.0, "tau {tau}: {m:?}");
        }
    }
}

/// The node power budget: eight simulated H100s under 4,000 W with demand
/// moving between them.
#[test]
fn a_node_budget_is_never_exceeded_and_delivers_what_an_oracle_would() {
    let s = gpuwatch_server::scenario::BudgetScenario::eight_h100s();
    let m = gpuwatch_server::scenario::run_budget(&s);
    assert!(
        m.max_enforced_sum_w <= s.budget_w + 1e-6,
        "sum of limits reached {} W",
        m.max_enforced_sum_w
    );
    assert!(
        m.delivered_j >= 0.95 * m.oracle_j,
        "delivered {} J of the oracle's {} J",
        m.delivered_j,
        m.oracle_j
    );
    assert!(
        m.max_writes_per_s <= 1,
        "{} writes in one second",
        m.max_writes_per_s
    );
    assert!(m.under_budget_samples > 0);
    assert_eq!(
        m.under_budget_all_unconstrained, m.under_budget_samples,
        "with demand under the budget, some GPU stayed limited below its demand"
    );
}

/// Each write of a trace: (time, reading then, level before, level after).
fn writes(trace: &gpuwatch_server::scenario::Trace) -> Vec<(f64, f64, f64, f64)> {
    trace
        .writes_s
        .iter()
        .filter_map(|w| {
            let i = trace.points.iter().position(|p| (p.t_s - w).abs() < 1e-6)?;
            let after = trace.points.get(i + 1)?;
            let at = &trace.points[i];
            Some((at.t_s, at.temperature_c, at.level, after.level))
        })
        .collect()
}

/// A slow GPU's whole-degree reading ticks over once every many seconds as
/// it settles onto the threshold; a tick at the end of the short slope
/// window once read as a rise of 0.5 °C/s, so a GPU held at the threshold
/// was cut for heat it did not have and trimmed back, every few minutes
/// (τ = 60 s, cooling 40 % worse: 503.8 → 488.7 → 505.3 → 490.2 W). A cut
/// made with the reading at or under the threshold must be one the GPU
/// needed: no later raise in the same hot phase gives back what it took.
#[test]
fn a_slow_gpu_settling_onto_the_threshold_is_not_cut_for_a_tick_of_its_reading() {
    for tau in [30.0, 60.0, 90.0] {
        for period in [0.1, 1.0] {
            for (r_scale, ambient) in [(1.0, 30.0), (0.7, 40.0), (1.4, 20.0), (1.2, 25.0)] {
                let s = Scenario::cooled(
                    Duration::from_secs_f64(tau),
                    Duration::from_secs_f64(period),
                    r_scale,
                    ambient,
                );
                let drop = s.drop.as_secs_f64();
                let trace = run(&s, Policy::Governor);
                let hot: Vec<_> = writes(&trace)
                    .into_iter()
                    .filter(|(at, ..)| *at < drop)
                    .collect();
                for (i, (at, reading, before, after)) in hot.iter().enumerate() {
                    if after >= before || *reading > s.threshold_c {
                        continue;
                    }
                    let undone = hot[i + 1..].iter().find(|w| w.3 >= before - 5.0);
                    assert!(
                        undone.is_none(),
                        "tau {tau} s, every {period} s, R x{r_scale}: cut at {at} s from \
                         {before:.1} to {after:.1} W with the reading {reading} (threshold {}), \
                         given back at {undone:?}",
                        s.threshold_c
                    );
                }
            }
        }
    }
}

/// A cut takes the sensor's lag to show. With the reading over the line but
/// no hotter than at the last cut, another cut waits for that lag (once a
/// response fit has seen it) on top of a quarter of the time constant: a
/// second cut 3 s after the first at τ = 10 s behind a 2.4 s lag, sampled
/// every second, left the GPU at −2..+1 °C with 17 W given up. Behind a
/// sensor lagging 1.5 or 2.4 s the settled readings stay within the ±1 °C
/// band (a 3 s lag at τ = 10 s sampled every second still reads −3..+1: a
/// trim's overshoot is cut 78 W deep, stated in the README).
#[test]
fn a_cut_is_given_the_sensors_lag_to_show_before_another() {
    for tau in [10.0, 20.0] {
        for period in [0.1, 1.0] {
            for lag in [1.5, 2.4] {
                let mut s = Scenario::standard(Duration::from_secs_f64(tau));
                s.sample_period = Duration::from_secs_f64(period);
                s.sensor_lag = Duration::from_secs_f64(lag);
                let m = metrics(&s, &run(&s, Policy::Governor));
                let t = s.threshold_c;
                assert!(
                    m.band_c.0 >= t - 1.0 && m.band_c.1 <= t + 1.0,
                    "tau {tau} s, every {period} s, lag {lag} s: {m:?}"
                );
            }
        }
    }
}

/// A fast GPU's reading, still rising after the first cut, bends towards
/// where the cut settles it: the slope over the whole recent window still
/// carries the steep start of the rise, and read as evidence it cut a GPU
/// that the first cut already held under the threshold (τ = 2 s, cooling
/// 40 % worse, sampled every second: a second cut 3 s after the first, the
/// settled window starting 3 °C under, mean −1.25 °C). The bound the
/// governor learns from a rise of degrees is taken over its newest readings.
#[test]
fn a_rise_bending_towards_where_it_settles_is_not_cut_again() {
    let tau = 2.0;
    let r_scale = 1.4;
    for period in [0.1, 1.0] {
        for ambient in [20.0, 30.0] {
            let s = Scenario::cooled(
                Duration::from_secs_f64(tau),
                Duration::from_secs_f64(period),
                r_scale,
                ambient,
            );
            let m = metrics(&s, &run(&s, Policy::Governor));
            let t = s.threshold_c;
            assert!(
                (t - 1.0..=t).contains(&m.settled_mean_c)
                    && m.band_c.0 >= t - 2.0
                    && m.peak_c <= t + 2.0,
                "tau {tau} s, every {period} s, cooling x{r_scale}, ambient {ambient}: {m:?}"
            );
        }
    }
}
