//! gpuwatch: the daemon as a library.

/// The wire contract, generated from `proto/gpuwatch/v1/`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod api {
    tonic::include_proto!("gpuwatch.v1");

    /// Encoded file descriptor set of the contract, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("gpuwatch_descriptor");
}

pub mod backend;
pub mod config;
pub mod throttle;
