//! Generates the daemon's client of the kubelet's pod-resources API
//! (`proto/k8s/podresources/v1/api.proto`, Kubernetes' published
//! interface) for `attribution::podresources`.
//!
//! Why here and not in `gpuwatch-api`: the contract crate is gpuwatch's own
//! wire; this is someone else's, used only by the daemon. Same toolchain as
//! the root `build.rs`: the protoc binary from `protoc-bin-vendored`, so a
//! fresh machine needs nothing but Rust. The server stubs are generated too:
//! the module's tests serve the same API from an in-test kubelet.

use std::{error::Error, path::PathBuf};

const PROTO: &str = "proto/k8s/podresources/v1/api.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let includes = [PathBuf::from("proto/k8s/podresources")];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &[PathBuf::from(PROTO)], &includes)?;
    Ok(())
}
