//! Reconnect delays: capped, jittered exponential backoff.
//!
//! A fleet of clients that lost the same daemon must not come back in
//! lockstep, and a host that stays down must not be hammered nor forgotten:
//! each failure doubles the delay up to a cap, and each delay is drawn at
//! random from its upper half ("equal jitter"), so it is never below half the
//! nominal value and never above the cap.

use std::time::Duration;

/// Backoff parameters that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackoffError {
    #[error("the first reconnect delay must be at least 1ms (got {0:?})")]
    InitialTooShort(Duration),
    #[error(
        "the longest reconnect delay ({max:?}) must not be shorter than the first ({initial:?})"
    )]
    MaxBelowInitial { initial: Duration, max: Duration },
    #[error("the longest reconnect delay must be at most 1h (got {0:?})")]
    MaxTooLong(Duration),
}

/// Validated backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    initial: Duration,
    max: Duration,
}

impl BackoffPolicy {
    /// Default first delay.
    pub const DEFAULT_INITIAL: Duration = Duration::from_millis(250);
    /// Default cap.
    pub const DEFAULT_MAX: Duration = Duration::from_secs(10);

    pub fn new(initial: Duration, max: Duration) -> Result<Self, BackoffError> {
        if initial < Duration::from_millis(1) {
            return Err(BackoffError::InitialTooShort(initial));
        }
        if max < initial {
            return Err(BackoffError::MaxBelowInitial { initial, max });
        }
        if max > Duration::from_secs(3600) {
            return Err(BackoffError::MaxTooLong(max));
        }
        Ok(Self { initial, max })
    }
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Self::DEFAULT_INITIAL,
            max: Self::DEFAULT_MAX,
        }
    }
}

/// The delay state of one host's reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// The nominal (unjittered) delay after the current number of failures.
    fn nominal(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(30));
        self.policy
            .initial
            .saturating_mul(factor)
            .min(self.policy.max)
    }

    /// The delay before the next attempt, drawn with `unit` in [0, 1): half
    /// the nominal delay plus up to half again. Records one more failure.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let nominal = self.nominal();
        self.failures = self.failures.saturating_add(1);
        let half = nominal / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// [`Self::next_with`] with a random draw.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(fastrand::f64())
    }

    /// After a connection that worked: start from the first delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The longest delay this backoff will ever return.
    pub fn cap(&self) -> Duration {
        self.policy.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_until_the_cap_and_stays_there() {
        let mut b = Backoff::new(BackoffPolicy::new(ms(100), ms(1000)).expect("valid"));
        let top: Vec<_> = (0..7).map(|_| b.next_with(1.0)).collect();
        assert_eq!(
            top,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000),
                ms(1000)
            ]
        );
    }

    #[test]
    fn jitter_stays_within_upper_half() {
        let mut low = Backoff::new(BackoffPolicy::default());
        let mut high = Backoff::new(BackoffPolicy::default());
        for _ in 0..10 {
            // The smallest draw is exactly half of the largest one.
            let (l, h) = (low.next_with(0.0), high.next_with(1.0));
            assert_eq!(l * 2, h);
            assert!(h <= BackoffPolicy::DEFAULT_MAX);
        }
        let mut random = Backoff::new(BackoffPolicy::default());
        for _ in 0..100 {
            let d = random.next_delay();
            assert!(d >= BackoffPolicy::DEFAULT_INITIAL / 2 && d <= BackoffPolicy::DEFAULT_MAX);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(BackoffPolicy::default());
        for _ in 0..5 {
            b.next_with(1.0);
        }
        b.reset();
        assert_eq!(b.next_with(1.0), BackoffPolicy::DEFAULT_INITIAL);
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(matches!(
            BackoffPolicy::new(Duration::ZERO, ms(10)),
            Err(BackoffError::InitialTooShort(_))
        ));
        assert!(matches!(
            BackoffPolicy::new(ms(100), ms(10)),
            Err(BackoffError::MaxBelowInitial { .. })
        ));
        assert!(matches!(
            BackoffPolicy::new(ms(100), Duration::from_secs(7200)),
            Err(BackoffError::MaxTooLong(_))
        ));
    }
}
