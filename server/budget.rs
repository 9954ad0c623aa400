//! The node power budget: one host-wide number of watts divided among the
//! host's GPUs by need, and the order in which the new split is written so
//! that the sum of the limits in force never exceeds the budget — not even
//! between two writes.
//!
//! Pure, like the governor: [`allocate`] is a function of what each GPU can
//! take and seems to want; [`Sequencer`] turns a split into writes, lowering
//! before it raises and counting a write under way at the higher of its old
//! and new value until it is confirmed. The caller (the scenario runner in
//! tests; the controller once the daemon carries budgets out) feeds it
//! readings and confirmations and carries the writes out.
//!
//! # Need
//!
//! A GPU drawing less than its limit shows what it needs: its draw plus a
//! margin. A GPU pressing against its limit needs more than it has, by an
//! unknown amount: it asks for half as much again, so a GPU whose work grew
//! takes what it needs in a few seconds while others give back. The split
//! is water-filling: first every GPU its floor (the device minimum), then
//! the budget is poured up to each GPU's want at a common level, and what is
//! left after every want is met is poured on up to each GPU's cap. The cap is
//! the inner limit — the operator's ceiling, and lower while the thermal
//! governor holds the GPU down — so the budget never raises a GPU past
//! either.
//!
//! # What is counted
//!
//! A GPU that is lost, or whose last call has not returned, keeps its last
//! known limit counted against the budget ([`Standing::Counted`]); one whose
//! power limit cannot be set counts at its maximum draw. Only the rest share
//! what is left.

use std::time::Duration;

/// How a GPU takes part in the budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Standing {
    /// Its limit can be set: it gets a share.
    Allocatable,
    /// It cannot be given a share (lost, hung, or no settable limit): it
    /// counts at these watts and gets nothing.
    Counted(f64),
}

/// One GPU as the budget sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetGpu {
    /// The lowest limit the device accepts (W).
    pub min_w: f64,
    /// The inner limit (W): the operator's ceiling, or lower while the
    /// thermal governor holds the GPU down. The budget never gives more.
    pub cap_w: f64,
    /// The limit in force, last confirmed (W).
    pub enforced_w: f64,
    /// Power drawn (W).
    pub draw_w: f64,
    /// The GPU reports that its power limit holds its clocks down (NVML's
    /// SW power cap throttle reason): it would draw more if allowed.
    pub capped: bool,
    pub standing: Standing,
}

/// Watts of headroom a GPU that is not pressing gets over its draw: enough
/// that its draw sits clearly under its limit (so pressing is told apart
/// from using it all), little enough that six GPUs' margins do not starve
/// the two that press (every watt of margin is a watt another GPU lacks).
const WANT_MARGIN_W: f64 = 10.0;
/// Fraction over its draw a GPU that is not pressing gets.
const WANT_MARGIN_FRACTION: f64 = 0.015;
/// A draw within this many watts (or this fraction) of the limit is
/// pressing against it: a GPU the limit holds draws it to a watt or two.
const PRESS_WITHIN_W: f64 = 5.0;
const PRESS_WITHIN_FRACTION: f64 = 0.02;
/// A GPU pressing against its limit asks for this much more (fraction of
/// the limit)...
const PRESS_GROWTH_FRACTION: f64 = 0.5;
/// ...and at least this many watts more.
const PRESS_GROWTH_W: f64 = 50.0;

impl BudgetGpu {
    /// True when the GPU draws (nearly) all its limit allows.
    pub fn pressing(&self) -> bool {
        self.capped
            || self.draw_w
                >= self.enforced_w - (PRESS_WITHIN_FRACTION * self.enforced_w).max(PRESS_WITHIN_W)
    }

    /// What the GPU seems to need (W), within `[min_w, cap_w]`.
    pub fn want_w(&self) -> f64 {
        let want = if self.pressing() {
            self.enforced_w + (PRESS_GROWTH_FRACTION * self.enforced_w).max(PRESS_GROWTH_W)
        } else {
            self.draw_w * (1.0 + WANT_MARGIN_FRACTION) + WANT_MARGIN_W
        };
        want.clamp(self.min_w, self.cap_w.max(self.min_w))
    }

    /// What this GPU counts against the budget now.
    fn counted_w(&self) -> f64 {
        match self.standing {
            Standing::Allocatable => self.enforced_w,
            Standing::Counted(w) => w,
        }
    }
}

/// Water-fills `available_w` over GPUs with the given `(floor, top)`:
/// each gets `clamp(level, floor, top)` for the one level that spends it
/// (or its top, when even that does not). Returns the shares.
fn pour(available_w: f64, bounds: &[(f64, f64)]) -> Vec<f64> {
    let at = |level: f64| -> f64 {
        bounds
            .iter()
            .map(|&(lo, hi)| level.clamp(lo, hi.max(lo)))
            .sum()
    };
    let top = bounds.iter().map(|b| b.1.max(b.0)).fold(0.0, f64::max);
    if at(top) <= available_w {
        return bounds.iter().map(|&(lo, hi)| hi.max(lo)).collect();
    }
    let (mut lo, mut hi) = (0.0, top);
    for _ in 0..64 {
        let mid = 0.5 * (lo + hi);
        if at(mid) <= available_w {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    bounds
        .iter()
        .map(|&(floor, top)| lo.clamp(floor, top.max(floor)))
        .collect()
}

/// Divides `budget_w` among `gpus` by need. Returns each allocatable GPU's
/// share in whole watts (`None` for a counted one). The shares plus what
/// the counted GPUs count never exceed the budget, unless even every floor
/// does not fit (then every allocatable GPU gets its floor).
pub fn allocate(budget_w: f64, gpus: &[BudgetGpu]) -> Vec<Option<f64>> {
    let counted: f64 = gpus
        .iter()
        .filter_map(|g| match g.standing {
            Standing::Counted(w) => Some(w),
            Standing::Allocatable => None,
        })
        .sum();
    let allocatable: Vec<&BudgetGpu> = gpus
        .iter()
        .filter(|g| g.standing == Standing::Allocatable)
        .collect();
    let available = budget_w - counted;
    let wants: Vec<(f64, f64)> = allocatable.iter().map(|g| (g.min_w, g.want_w())).collect();
    let want_total: f64 = wants.iter().map(|w| w.1).sum();
    let shares = if want_total >= available {
        pour(available, &wants)
    } else {
        // Every want met: pour the rest up to each cap, from the wants.
        let caps: Vec<(f64, f64)> = allocatable
            .iter()
            .zip(&wants)
            .map(|(g, w)| (w.1, g.cap_w.max(w.1)))
            .collect();
        pour(available, &caps)
    };
    let mut shares = shares.into_iter().map(|w| w.floor());
    gpus.iter()
        .map(|g| match g.standing {
            Standing::Allocatable => shares.next(),
            Standing::Counted(_) => None,
        })
        .collect()
}

/// The sum of limits that may be in force now: confirmed limits, counted
/// GPUs at what they count, and a write under way at the higher of its old
/// and new value (it may land at any moment).
pub fn accounted_w(gpus: &[BudgetGpu], in_flight: &[Option<f64>]) -> f64 {
    gpus.iter()
        .zip(in_flight)
        .map(|(g, pending)| match (g.standing, pending) {
            (Standing::Allocatable, Some(to)) => g.enforced_w.max(*to),
            _ => g.counted_w(),
        })
        .sum()
}

/// Turns splits into writes, in an order that keeps the sum of limits in
/// force within the budget.
#[derive(Debug, Clone)]
pub struct Sequencer {
    min_write_interval: Duration,
    min_step_w: f64,
    last_write: Vec<Option<Duration>>,
    in_flight: Vec<Option<f64>>,
}

impl Sequencer {
    /// A sequencer for `gpus` GPUs writing each at most once per
    /// `min_write_interval` and only changes of at least `min_step_w`.
    pub fn new(gpus: usize, min_write_interval: Duration, min_step_w: f64) -> Self {
        Self {
            min_write_interval,
            min_step_w,
            last_write: vec![None; gpus],
            in_flight: vec![None; gpus],
        }
    }

    /// Writes under way, per GPU.
    pub fn in_flight(&self) -> &[Option<f64>] {
        &self.in_flight
    }

    /// A write to GPU `index` landed (or failed, leaving `enforced`): it no
    /// longer counts at its new value unless the caller's `enforced_w` says
    /// so.
    pub fn settled(&mut self, index: usize) {
        if let Some(slot) = self.in_flight.get_mut(index) {
            *slot = None;
        }
    }

    /// The writes to make now, towards `targets` (from [`allocate`]): every
    /// lower that is due, then the raises that fit within `budget_w` with
    /// every write under way counted at its higher value. A GPU with a
    /// write under way, or written within the interval, waits.
    pub fn plan(
        &mut self,
        now: Duration,
        budget_w: f64,
        gpus: &[BudgetGpu],
        targets: &[Option<f64>],
    ) -> Vec<(usize, f64)> {
        let mut writes = Vec::new();
        let due = |i: usize, last: &[Option<Duration>]| {
            last[i].is_none_or(|w| now.saturating_sub(w) >= self.min_write_interval)
        };
        // When the raises wanted do not fit, even a small lower is worth a
        // write: it is what makes room.
        let wanted_up: f64 = gpus
            .iter()
            .zip(targets)
            .filter_map(|(g, t)| t.map(|t| (t - g.enforced_w).max(0.0)))
            .sum();
        let short_of_room = wanted_up > budget_w - accounted_w(gpus, &self.in_flight) + 0.5;
        let lower_step = if short_of_room { 0.5 } else { self.min_step_w };
        for (i, (g, target)) in gpus.iter().zip(targets).enumerate() {
            let Some(target) = *target else { continue };
            if self.in_flight[i].is_some() || !due(i, &self.last_write) {
                continue;
            }
            if g.enforced_w - target >= lower_step.min(g.enforced_w - g.min_w).max(0.5) {
                self.in_flight[i] = Some(target);
                self.last_write[i] = Some(now);
                writes.push((i, target));
            }
        }
        // Raises, the largest shortfall first, each only if it fits.
        let mut raises: Vec<(usize, f64)> = gpus
            .iter()
            .zip(targets)
            .enumerate()
            .filter_map(|(i, (g, t))| t.map(|t| (i, t - g.enforced_w)))
            .filter(|&(i, up)| {
                up >= self
                    .min_step_w
                    .min(gpus[i].cap_w - gpus[i].enforced_w)
                    .max(0.5)
                    && self.in_flight[i].is_none()
            })
            .collect();
        raises.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (i, up) in raises {
            if !due(i, &self.last_write) {
                continue;
            }
            let total = accounted_w(gpus, &self.in_flight);
            let room = budget_w - total;
            if room < 0.5 {
                break;
            }
            let to = (gpus[i].enforced_w + up.min(room)).floor();
            if to - gpus[i].enforced_w < self.min_step_w.min(up).max(0.5) {
                continue;
            }
            self.in_flight[i] = Some(to);
            self.last_write[i] = Some(now);
            writes.push((i, to));
        }
        writes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(enforced_w: f64, draw_w: f64) -> BudgetGpu {
        BudgetGpu {
            min_w: 200.0,
            cap_w: 700.0,
            enforced_w,
            draw_w,
            capped: false,
            standing: Standing::Allocatable,
        }
    }

    #[test]
    fn a_gpu_that_does_not_use_its_share_gives_it_to_those_pressing() {
        // Two pressing at 500 W, two drawing 250 W of 500 W.
        let gpus = [
            gpu(500.0, 500.0),
            gpu(500.0, 499.0),
            gpu(500.0, 250.0),
            gpu(500.0, 250.0),
        ];
        let shares = allocate(2000.0, &gpus);
        let s: Vec<f64> = shares.iter().map(|s| s.unwrap_or(f64::NAN)).collect();
        assert!(s.iter().sum::<f64>() <= 2000.0);
        assert!(s[2] < 320.0 && s[3] < 320.0, "{s:?}");
        assert!(s[0] >= 690.0 && s[1] >= 690.0, "{s:?}");
    }

    #[test]
    fn when_every_want_fits_the_rest_goes_up_to_each_cap() {
        let gpus = [gpu(300.0, 100.0), gpu(300.0, 100.0)];
        let s = allocate(1400.0, &gpus);
        assert_eq!(s, vec![Some(700.0), Some(700.0)]);
    }

    #[test]
    fn the_budget_never_raises_a_gpu_past_its_inner_limit() {
        let mut held = gpu(400.0, 400.0);
        held.cap_w = 420.0; // the governor holds it at 420 W
        let s = allocate(5000.0, &[held, gpu(500.0, 500.0)]);
        assert_eq!(s[0], Some(420.0));
    }

    #[test]
    fn lost_and_unsettable_gpus_count_and_get_nothing() {
        let mut lost = gpu(600.0, 0.0);
        lost.standing = Standing::Counted(600.0);
        let mut fixed = gpu(300.0, 300.0);
        fixed.standing = Standing::Counted(450.0);
        let gpus = [lost, fixed, gpu(500.0, 500.0), gpu(500.0, 500.0)];
        let s = allocate(2000.0, &gpus);
        assert_eq!(s[0], None);
        assert_eq!(s[1], None);
        let shared = s[2].unwrap_or(f64::INFINITY) + s[3].unwrap_or(f64::INFINITY);
        assert!(shared <= 950.0, "{s:?}");
    }

    #[test]
    fn raises_wait_for_the_lowers_that_make_room() {
        let gpus = [gpu(600.0, 600.0), gpu(400.0, 150.0)];
        // Budget 1000 W, GPU 1 should give 200 W to GPU 0.
        let targets = [Some(800.0), Some(200.0)];
        let mut seq = Sequencer::new(2, Duration::from_secs(1), 5.0);
        let writes = seq.plan(Duration::ZERO, 1000.0, &gpus, &targets);
        assert_eq!(writes, vec![(1, 200.0)], "only the lower goes first");
        assert!(accounted_w(&gpus, seq.in_flight()) <= 1000.0);
        // The lower lands.
        seq.settled(1);
        let gpus = [gpu(600.0, 600.0), gpu(200.0, 150.0)];
        let writes = seq.plan(Duration::from_millis(100), 1000.0, &gpus, &targets);
        assert_eq!(writes, vec![(0, 800.0)]);
    }

    proptest::proptest! {
        /// Whatever the readings, the targets and the order in which writes
        /// land, the limits that may be in force never sum above the budget
        /// once they started within it.
        #[test]
        fn the_sum_in_force_never_exceeds_the_budget(
            steps in proptest::collection::vec(
                (proptest::collection::vec((0.0f64..800.0, 0u8..4), 4), 0u8..16, 0.0f64..1.0),
                1..120,
            )
        ) {
            let budget = 2000.0;
            let mut enforced = [500.0f64; 4];
            let mut seq = Sequencer::new(4, Duration::from_millis(300), 5.0);
            let mut t = Duration::ZERO;
            for (readings, landing, cap_scale) in steps {
                t += Duration::from_millis(100);
                let gpus: Vec<BudgetGpu> = (0..4)
                    .map(|i| BudgetGpu {
                        min_w: 200.0,
                        cap_w: 200.0 + 500.0 * cap_scale,
                        enforced_w: enforced[i],
                        draw_w: readings[i].0.min(enforced[i]),
                        capped: readings[i].1 == 3,
                        standing: Standing::Allocatable,
                    })
                    .collect();
                let targets = allocate(budget, &gpus);
                let total: f64 = targets.iter().flatten().sum();
                proptest::prop_assert!(total <= budget + 1e-6, "split {targets:?}");
                for (i, to) in seq.plan(t, budget, &gpus, &targets) {
                    proptest::prop_assert!(to >= 200.0 - 1e-9);
                    let _ = (i, to);
                }
                proptest::prop_assert!(accounted_w(&gpus, seq.in_flight()) <= budget + 1e-6);
                // Some writes land (in any order), some fail.
                for i in 0..4 {
                    if landing & (1 << i) != 0
                        && let Some(to) = seq.in_flight()[i]
                    {
                        // Category 0 stands for a write that failed.
                        if readings[i].1 != 0 {
                            enforced[i] = to;
                        }
                        seq.settled(i);
                    }
                }
                proptest::prop_assert!(enforced.iter().sum::<f64>() <= budget + 1e-6);
            }
        }
    }
}
