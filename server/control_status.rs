//! The control plane's edge to gRPC: request targets from the wire into
//! domain terms, and [`ControlError`] onto `tonic::Status`. This is the one
//! place that mapping lives; the service calls it, the control plane never
//! sees `tonic`.

use tonic::{Code, Status};

use crate::{
    api::{set_power_budget_request, set_power_limit_request, set_threshold_request},
    backend::BackendError,
    control::{BudgetTarget, ControlError, PowerTarget, ThresholdTarget},
};

/// The gRPC status for a control error: the code its kind calls for, the
/// error's own text as the message.
pub fn status(error: &ControlError) -> Status {
    Status::new(code(error), error.to_string())
}

fn code(error: &ControlError) -> Code {
    match error {
        ControlError::UnknownGpu { .. } => Code::NotFound,
        ControlError::RestoreDefaultNotTrue
        | ControlError::WattsNotANumber { .. }
        | ControlError::WattsOutOfRange { .. }
        | ControlError::BudgetOutOfRange { .. }
        | ControlError::HysteresisOutOfRange { .. }
        | ControlError::ThresholdTooLow { .. }
        | ControlError::ThresholdNotBelowSlowdown { .. }
        | ControlError::ThresholdTooHigh { .. }
        | ControlError::BandTooNarrow { .. } => Code::InvalidArgument,
        ControlError::GpuLost { .. }
        | ControlError::NotDurable { .. }
        | ControlError::ShuttingDown => Code::Unavailable,
        ControlError::PowerLimitUnsupported { .. } => Code::FailedPrecondition,
        ControlError::TimedOut => Code::DeadlineExceeded,
        ControlError::Device { error, .. } => device_code(error),
        ControlError::Several(errors) => errors.first().map_or(Code::Internal, code),
    }
}

fn device_code(error: &BackendError) -> Code {
    match error {
        BackendError::NoPermission(_) => Code::PermissionDenied,
        BackendError::NotSupported(_) | BackendError::InUse(_) => Code::FailedPrecondition,
        BackendError::GpuLost(_) | BackendError::Unavailable(_) => Code::Unavailable,
        BackendError::InvalidArgument(_) => Code::InvalidArgument,
        BackendError::Timeout(_) => Code::DeadlineExceeded,
        BackendError::Other(_) => Code::Internal,
    }
}

impl TryFrom<set_power_limit_request::Target> for PowerTarget {
    type Error = ControlError;

    fn try_from(target: set_power_limit_request::Target) -> Result<Self, ControlError> {
        match target {
            set_power_limit_request::Target::Watts(w) => Ok(PowerTarget::Watts(w)),
            set_power_limit_request::Target::RestoreDefault(true) => {
                Ok(PowerTarget::RestoreDefault)
            }
            set_power_limit_request::Target::RestoreDefault(false) => {
                Err(ControlError::RestoreDefaultNotTrue)
            }
        }
    }
}

impl TryFrom<set_power_budget_request::Target> for BudgetTarget {
    type Error = ControlError;

    fn try_from(target: set_power_budget_request::Target) -> Result<Self, ControlError> {
        match target {
            set_power_budget_request::Target::Watts(w) => Ok(BudgetTarget::Watts(w)),
            set_power_budget_request::Target::RestoreDefault(true) => Ok(BudgetTarget::Drop),
            set_power_budget_request::Target::RestoreDefault(false) => {
                Err(ControlError::RestoreDefaultNotTrue)
            }
        }
    }
}

impl TryFrom<set_threshold_request::Target> for ThresholdTarget {
    type Error = ControlError;

    fn try_from(target: set_threshold_request::Target) -> Result<Self, ControlError> {
        match target {
            set_threshold_request::Target::Celsius(c) => Ok(ThresholdTarget::Celsius(c)),
            set_threshold_request::Target::RestoreDefault(true) => {
                Ok(ThresholdTarget::RestoreDefault)
            }
            set_threshold_request::Target::RestoreDefault(false) => {
                Err(ControlError::RestoreDefaultNotTrue)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_kind_of_refusal() {
        assert_eq!(code(&ControlError::UnknownGpu { index: 3 }), Code::NotFound);
        assert_eq!(code(&ControlError::GpuLost { index: 0 }), Code::Unavailable);
        assert_eq!(
            code(&ControlError::Device {
                index: 0,
                error: BackendError::NoPermission("x".into())
            }),
            Code::PermissionDenied
        );
        assert_eq!(code(&ControlError::TimedOut), Code::DeadlineExceeded);
    }

    #[test]
    fn several_failures_take_the_first_ones_code_and_name_all() {
        let e = ControlError::Several(vec![
            ControlError::Device {
                index: 0,
                error: BackendError::NoPermission("a".into()),
            },
            ControlError::Device {
                index: 1,
                error: BackendError::Other("b".into()),
            },
        ]);
        let s = status(&e);
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(
            s.message().contains("GPU 0: no permission"),
            "{}",
            s.message()
        );
        assert!(s.message().contains("; GPU 1: "), "{}", s.message());
    }

    #[test]
    fn restore_default_false_is_refused_at_the_edge() {
        let e = PowerTarget::try_from(set_power_limit_request::Target::RestoreDefault(false))
            .expect_err("refused");
        let s = status(&e);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "restore_default: must be true when set");
        assert_eq!(
            ThresholdTarget::try_from(set_threshold_request::Target::Celsius(70)),
            Ok(ThresholdTarget::Celsius(70))
        );
    }
}
