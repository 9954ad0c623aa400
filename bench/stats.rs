//! Numbers about numbers: the median and spread of a figure over runs, and
//! latency distributions within a run.
//!
//! Latencies go into an HDR histogram (3 significant digits, 1 µs to 10
//! minutes), so millions of samples cost a few hundred KiB and percentiles
//! are exact to 0.1 %. Each load-generator task keeps its own and they are
//! merged at the end, so recording never takes a lock.

use hdrhistogram::Histogram;

/// Median and spread of one figure over several runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// None for no values; NaNs are ignored.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// A latency distribution in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

/// Largest latency recorded (longer ones are clamped to it): 10 minutes.
const MAX_US: u64 = 600_000_000;

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        // Constant bounds and precision that hdrhistogram accepts (the tests
        // below build one), so this cannot fail at run time.
        let histogram = Histogram::new_with_bounds(1, MAX_US, 3)
            .expect("1 us to 10 min at 3 significant digits is a valid histogram");
        Self { histogram }
    }

    /// Records one latency in microseconds (clamped to 1 µs..10 min).
    pub fn record_us(&mut self, us: u64) {
        self.histogram.saturating_record(us.clamp(1, MAX_US));
    }

    /// Records one latency given in (possibly negative) seconds; negative
    /// values (clocks read on different cores a hair apart) count as 1 µs.
    pub fn record_secs(&mut self, secs: f64) {
        let us = (secs * 1e6).max(1.0);
        self.record_us(us as u64);
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail; saturate anyway.
        let _ = self.histogram.add(&other.histogram);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The q-quantile (0..=1) in milliseconds; NaN when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.histogram.is_empty() {
            return f64::NAN;
        }
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        if self.histogram.is_empty() {
            return f64::NAN;
        }
        self.histogram.max() as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_and_even_runs() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
    }

    #[test]
    fn latency_quantiles_and_merge() {
        let mut a = Latency::new();
        for us in 1..=1000 {
            a.record_us(us);
        }
        let mut b = Latency::new();
        b.record_secs(2.0);
        b.record_secs(-0.001);
        a.merge(&b);
        assert_eq!(a.count(), 1002);
        let median = a.quantile_ms(0.5);
        assert!((0.49..=0.51).contains(&median), "{median}");
        assert!((a.max_ms() - 2000.0).abs() < 2.0, "{}", a.max_ms());
        assert!(Latency::new().quantile_ms(0.5).is_nan());
    }
}
