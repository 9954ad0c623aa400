//! gpuwatch-client: the fleet CLI as a library, so its logic is testable and
//! `main.rs` stays a two-line shell.
//!
//! It depends on the wire contract (`gpuwatch-api`) and nothing of the
//! daemon: no NVML, no HTTP server, no Prometheus. The parts, in the order a
//! command runs through them: [`cli`] (what the user typed) → `app` (hosts,
//! security, exit codes) → `hosts` and `connect` (names → endpoints → gRPC
//! channels, TLS, tokens) → `commands` and `watch` (one module per command,
//! each talking to every host at once through `fleet`) → `output` and
//! `record` (tables and NDJSON).

mod app;
mod backoff;
pub mod cli;
mod commands;
mod connect;
mod fleet;
mod hosts;
mod output;
mod owner;
mod record;
mod recording;
mod units;
mod watch;

pub use app::run;
