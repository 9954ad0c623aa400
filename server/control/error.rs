//! Why the control plane refused or failed a request, in domain terms.
//!
//! Each refusal carries what it is about (the GPU's index, the value asked
//! for, the range allowed) in fields; the text an operator reads is the
//! `Display` of the variant. The service edge maps these onto gRPC status
//! codes in one place (`crate::control_status`); nothing in the control plane
//! knows about `tonic`.

use thiserror::Error;

use crate::{
    backend::BackendError,
    config::{HYSTERESIS_MAX_C, HYSTERESIS_MIN_C, THRESHOLD_MAX_C, THRESHOLD_MIN_C},
};

/// A control request that was refused, or a write that failed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ControlError {
    /// The request names a GPU the daemon does not have.
    #[error("no GPU with index {index}")]
    UnknownGpu { index: u32 },
    /// `restore_default` was sent as `false`.
    #[error("restore_default: must be true when set")]
    RestoreDefaultNotTrue,
    /// The GPU is lost (fell off the bus); nothing can be changed on it.
    #[error("GPU {index} is lost; try again when it returns")]
    GpuLost { index: u32 },
    /// The GPU's power limit cannot be set.
    #[error("GPU {index} ({name}) does not support power limit control")]
    PowerLimitUnsupported { index: u32, name: String },
    /// The watts asked for are NaN or infinite.
    #[error("watts: {watts} is not a number; GPU {index} allows {}", watt_range(*min_mw, *max_mw))]
    WattsNotANumber {
        index: u32,
        watts: f64,
        min_mw: u32,
        max_mw: u32,
    },
    /// The watts asked for are outside the GPU's range.
    #[error("watts: {watts} W is outside GPU {index}'s allowed range {}", watt_range(*min_mw, *max_mw))]
    WattsOutOfRange {
        index: u32,
        watts: f64,
        min_mw: u32,
        max_mw: u32,
    },
    /// The node power budget asked for is not a positive number within the
    /// sums of the GPUs' minimum and maximum power limits.
    #[error(
        "watts: {watts} W is not a valid node power budget; this host allows {} (the sums of its GPUs' minimum and maximum power limits)",
        budget_range(*min_mw, *max_mw)
    )]
    BudgetOutOfRange {
        watts: f64,
        min_mw: u64,
        max_mw: u64,
    },
    /// The hysteresis asked for is outside what the daemon allows.
    #[error(
        "hysteresis_c: {hysteresis_c} °C is out of range; allowed: {HYSTERESIS_MIN_C} to {HYSTERESIS_MAX_C} °C"
    )]
    HysteresisOutOfRange { hysteresis_c: u32 },
    /// The threshold asked for is below the daemon's minimum.
    #[error("celsius: {threshold_c} °C is below the minimum of {THRESHOLD_MIN_C} °C")]
    ThresholdTooLow { threshold_c: u32 },
    /// The threshold is at or above the GPU's own slowdown temperature.
    #[error(
        "celsius: {threshold_c} °C must be below GPU {index}'s slowdown temperature of {slowdown_c} °C (allowed: {THRESHOLD_MIN_C} to {} °C)",
        slowdown_c.saturating_sub(1)
    )]
    ThresholdNotBelowSlowdown {
        index: u32,
        threshold_c: u32,
        slowdown_c: u32,
    },
    /// The threshold is above the daemon's maximum (GPUs that do not report
    /// a slowdown temperature).
    #[error("celsius: {threshold_c} °C is above the maximum of {THRESHOLD_MAX_C} °C")]
    ThresholdTooHigh { threshold_c: u32 },
    /// Threshold and hysteresis leave too little room to cool.
    #[error(
        "hysteresis_c: {hysteresis_c} °C leaves GPU {index} only {} °C to cool to; the threshold must be at least 20 °C above the hysteresis",
        threshold_c.saturating_sub(*hysteresis_c)
    )]
    BandTooNarrow {
        index: u32,
        threshold_c: u32,
        hysteresis_c: u32,
    },
    /// A write to the GPU failed.
    #[error("GPU {index}: {error}{}", permission_hint(error))]
    Device { index: u32, error: BackendError },
    /// Several GPUs' writes failed (the first one's kind decides the code).
    #[error("{}", join(.0))]
    Several(Vec<ControlError>),
    /// The change was made but its record (event or desired state) could
    /// not be made durable.
    #[error(
        "the change was made but could not be saved, so it would not survive a restart: {reason}"
    )]
    NotDurable { reason: String },
    /// The daemon is stopping; the request was not carried out.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The control plane did not answer within the request timeout.
    #[error("the GPU did not answer in time")]
    TimedOut,
}

impl ControlError {
    /// One error for a request whose writes failed: none, the only one, or
    /// all of them together.
    pub(crate) fn combine(mut errors: Vec<ControlError>) -> Option<ControlError> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ControlError::Several(errors)),
        }
    }
}

/// How a range of power limits is spelled to operators: "200-700 W".
fn watt_range(min_mw: u32, max_mw: u32) -> String {
    format!(
        "{}-{} W",
        f64::from(min_mw) / 1000.0,
        f64::from(max_mw) / 1000.0
    )
}

fn budget_range(min_mw: u64, max_mw: u64) -> String {
    format!("{}-{} W", min_mw as f64 / 1000.0, max_mw as f64 / 1000.0)
}

fn permission_hint(error: &BackendError) -> &'static str {
    match error {
        BackendError::NoPermission(_) => {
            "; changing GPU settings needs root or CAP_SYS_ADMIN for gpuwatch-server"
        }
        _ => "",
    }
}

fn join(errors: &[ControlError]) -> String {
    let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
    all.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_gpu_and_the_allowed_range() {
        let e = ControlError::WattsOutOfRange {
            index: 0,
            watts: 750.0,
            min_mw: 200_000,
            max_mw: 700_000,
        };
        assert_eq!(
            e.to_string(),
            "watts: 750 W is outside GPU 0's allowed range 200-700 W"
        );
        let e = ControlError::ThresholdNotBelowSlowdown {
            index: 1,
            threshold_c: 95,
            slowdown_c: 90,
        };
        assert!(e.to_string().ends_with("(allowed: 30 to 89 °C)"), "{e}");
    }

    #[test]
    fn a_permission_failure_says_how_to_grant_it() {
        let e = ControlError::Device {
            index: 2,
            error: BackendError::NoPermission("set power limit".into()),
        };
        assert!(e.to_string().starts_with("GPU 2: no permission"), "{e}");
        assert!(e.to_string().contains("CAP_SYS_ADMIN"), "{e}");
    }

    #[test]
    fn several_failures_are_named_together_in_order() {
        let one = ControlError::Device {
            index: 0,
            error: BackendError::Other("a".into()),
        };
        let two = ControlError::GpuLost { index: 1 };
        assert_eq!(ControlError::combine(vec![]), None);
        assert_eq!(ControlError::combine(vec![one.clone()]), Some(one.clone()));
        let both = ControlError::combine(vec![one.clone(), two.clone()]).expect("some");
        assert_eq!(both.to_string(), format!("{one}; {two}"));
    }
}
