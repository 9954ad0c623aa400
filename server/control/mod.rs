//! The control plane: the only place a GPU's settings are changed.
//!
//! Everything that writes to a GPU — the thermal governor, operator
//! requests, startup repairs, drift correction, the restore on shutdown —
//! is *planned* by pure functions of one GPU's control state and one input
//! ([`lifecycle`] for readings and lifecycle steps, [`requests`] for
//! operator requests), which return a plan (writes, desired-state changes,
//! events) or a typed [`ControlError`]. The [`Controller`] carries plans
//! out: it runs on the sampler's loop, sends writes to the GPUs' device
//! threads ([`dispatch`]), records events, persists desired state and
//! answers the caller. Because planning is pure, every promise is tested
//! without a runtime, a clock or a device (see the property tests).
//!
//! This module is the plane's interface: the [`ControlHandle`] the gRPC
//! service holds, and the requests it sends.

mod controller;
mod dispatch;
mod error;
mod gpu;
mod lifecycle;
mod node_budget;
mod plan;
mod requests;
mod wire;

#[cfg(test)]
mod tests;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::{
    api::{
        ResetClocksResponse, SetPowerBudgetResponse, SetPowerLimitResponse, SetThresholdResponse,
    },
    auth::Caller,
};

pub use controller::Controller;
pub use error::ControlError;
pub use requests::{PowerTarget, ThresholdTarget};

/// What SetPowerBudget asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BudgetTarget {
    /// A host-wide budget, in watts.
    Watts(f64),
    /// No budget.
    Drop,
}

/// How long a control RPC waits for the control plane.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the control plane sends its answer to one request.
type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// A control request from the gRPC service.
#[derive(Debug)]
pub enum ControlRequest {
    SetPowerLimit {
        gpus: Vec<u32>,
        target: PowerTarget,
        caller: Caller,
        reply: Reply<SetPowerLimitResponse>,
    },
    ResetClocks {
        gpus: Vec<u32>,
        caller: Caller,
        reply: Reply<ResetClocksResponse>,
    },
    SetThreshold {
        gpus: Vec<u32>,
        target: ThresholdTarget,
        hysteresis_c: Option<u32>,
        caller: Caller,
        reply: Reply<SetThresholdResponse>,
    },
    SetPowerBudget {
        target: BudgetTarget,
        caller: Caller,
        reply: Reply<SetPowerBudgetResponse>,
    },
}

impl ControlRequest {
    /// Answers the request with `error` without carrying it out.
    fn refuse(self, error: ControlError) {
        match self {
            ControlRequest::SetPowerLimit { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            ControlRequest::ResetClocks { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            ControlRequest::SetThreshold { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            ControlRequest::SetPowerBudget { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// The service's handle to the control plane.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<ControlRequest>,
}

impl ControlHandle {
    /// A handle and the receiving end for the control loop.
    pub fn channel() -> (Self, mpsc::Receiver<ControlRequest>) {
        let (tx, rx) = mpsc::channel(64);
        (Self { tx }, rx)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> ControlRequest,
    ) -> Result<T, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| ControlError::ShuttingDown)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ControlError::ShuttingDown),
            Err(_) => Err(ControlError::TimedOut),
        }
    }

    pub async fn set_power_limit(
        &self,
        gpus: Vec<u32>,
        target: PowerTarget,
        caller: Caller,
    ) -> Result<SetPowerLimitResponse, ControlError> {
        self.call(|reply| ControlRequest::SetPowerLimit {
            gpus,
            target,
            caller,
            reply,
        })
        .await
    }

    pub async fn reset_clocks(
        &self,
        gpus: Vec<u32>,
        caller: Caller,
    ) -> Result<ResetClocksResponse, ControlError> {
        self.call(|reply| ControlRequest::ResetClocks {
            gpus,
            caller,
            reply,
        })
        .await
    }

    pub async fn set_threshold(
        &self,
        gpus: Vec<u32>,
        target: ThresholdTarget,
        hysteresis_c: Option<u32>,
        caller: Caller,
    ) -> Result<SetThresholdResponse, ControlError> {
        self.call(|reply| ControlRequest::SetThreshold {
            gpus,
            target,
            hysteresis_c,
            caller,
            reply,
        })
        .await
    }

    pub async fn set_power_budget(
        &self,
        target: BudgetTarget,
        caller: Caller,
    ) -> Result<SetPowerBudgetResponse, ControlError> {
        self.call(|reply| ControlRequest::SetPowerBudget {
            target,
            caller,
            reply,
        })
        .await
    }
}
