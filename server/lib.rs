//! gpuwatch: the daemon as a library.
//!
//! `gpuwatch-server` is a thin `main` over [`daemon::start`]. The parts, in
//! the order data flows through them: [`backend`] (NVML or the simulator)
//! → `actor` (one thread per GPU) → `sampler` (one tick, every GPU) →
//! `hub` (latest frame, history, fan-out) → `service` (gRPC, behind
//! `authz`) and `http`. The `control` plane runs the `governor` and
//! operator requests on the sampler's loop; `events` is the audit trail;
//! `state` the desired state that outlives a restart; `persist` the one
//! writer that puts both on disk, off the sampling loop; `history` the
//! tiered store of past telemetry and its own writer thread; `statedir` claims
//! the state directory for one daemon. [`api`] is the wire
//! contract (its own crate, `gpuwatch-api`, the only part the CLI uses).
//!
//! The library's interface is [`daemon`], [`config`], [`backend`] and
//! [`tls`]; everything else is private (the `testing` feature opens a few
//! modules to the daemon's own test suites).

/// The wire contract (the `gpuwatch-api` crate), under the name the daemon's
/// modules use for it.
pub use gpuwatch_api as api;

// The interface: what `main.rs`, the benchmark harness and the probes use.
pub mod backend;
pub mod config;
pub mod daemon;
pub mod history;
pub mod memory;
pub mod tls;

// The engine: private to the daemon.
mod actor;
mod coalesce;
mod control;
mod control_status;
mod grpc_listen;
mod limits;
mod sampler;
mod selector;
mod service;
mod state;
mod statedir;
mod throttle;
mod watch_frames;
mod watch_wire;
mod wire;
mod xid;

/// Declares modules that are private to the daemon, except with the
/// `testing` feature, where the daemon's own test suites drive them directly
/// (the governor without a runtime, the metrics encoder on a hand-made
/// frame, the authorization table against the descriptor). A shipped build
/// has no `testing`, so none of this is part of the library's interface.
macro_rules! test_visible {
    ($($module:ident),* $(,)?) => {
        $(
            #[cfg(feature = "testing")]
            pub mod $module;
            #[cfg(not(feature = "testing"))]
            mod $module;
        )*
    };
}

test_visible!(
    attribution,
    auth,
    authz,
    events,
    governor,
    http,
    hub,
    leases,
    persist,
    tick
);

/// The governor scenario runner: the governor against the simulator's
/// physics in a loop, for the scenario tests and `examples/governor_report`.
#[cfg(feature = "testing")]
pub mod scenario;

/// The node power budget's allocator: the control plane's split of a
/// host-wide budget (and the scenario runner's).
pub mod budget;

/// The previous governor, for side-by-side comparison only.
#[cfg(feature = "testing")]
pub mod governor_v1;
