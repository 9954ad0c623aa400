//! gpuwatch-api: the `gpuwatch.v1` wire contract, shared by the daemon, the
//! fleet CLI, the benchmark harness and the tests.
//!
//! Why it is its own crate: the contract is the one thing every side of
//! gpuwatch agrees on, and the only thing the CLI needs from the daemon's
//! world; keeping it apart keeps NVML, axum and Prometheus out of the CLI's
//! build and lets a third-party Rust scheduler depend on the contract alone.
//!
//! What it owns: the generated messages and client/server stubs (from
//! `proto/gpuwatch/v1/*.proto`, compiled by `build.rs` with a vendored
//! protoc), the encoded file descriptor set (for reflection and for tests
//! that enumerate the service's methods), the [`codec`] every generated
//! method encodes through, and [`names`]: the one spelling of every enum
//! value used in logs, JSON, metrics labels and the event log.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    tonic::include_proto!("gpuwatch.v1");
}

pub use generated::*;

pub mod codec;
pub mod history_columns;
pub mod names;

/// Encoded file descriptor set of the contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gpuwatch_descriptor");
