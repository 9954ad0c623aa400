//! gpuwatch: the daemon as a library.
//!
//! `gpuwatch-server` is a thin `main` over [`daemon::start`]. The parts, in
//! the order data flows through them: [`backend`] (NVML or the simulator)
//! → [`actor`] (one thread per GPU) → [`sampler`] (one tick, every GPU) →
//! [`hub`] (latest frame, history, fan-out) → [`service`] (gRPC). The
//! [`control`] plane runs the [`governor`] and operator requests on the
//! sampler's loop; [`events`] is the audit trail; [`state`] the desired state
//! that outlives a restart; [`persist`] the one writer that puts both on disk,
//! off the sampling loop. [`api`] is the wire contract, the only part the
//! client uses (it lives in its own crate, `gpuwatch-api`).

/// The wire contract (the `gpuwatch-api` crate), under the name the daemon's
/// modules use for it.
pub use gpuwatch_api as api;

pub mod actor;
pub mod auth;
pub mod authz;
pub mod backend;
pub mod config;
pub mod control;
pub mod control_status;
pub mod daemon;
pub mod events;
pub mod governor;
pub mod grpc_listen;
pub mod http;
pub mod hub;
pub mod limits;
pub mod persist;
pub mod sampler;
#[cfg(feature = "testing")]
pub mod scenario;
pub mod selector;
pub mod service;
pub mod state;
pub mod throttle;
pub mod tls;
pub mod watch_frames;
pub mod watch_wire;
pub mod wire;
