//! Generates the gRPC contract (`gpuwatch::api`) from `proto/gpuwatch/v1/*.proto`.
//!
//! Uses the protoc binary shipped in the `protoc-bin-vendored` crate, so a
//! fresh machine needs nothing but the Rust toolchain. The encoded file
//! descriptor set is written next to the generated code; the daemon serves
//! it through gRPC reflection so grpcurl and dynamic clients need no .proto.

use std::{env, error::Error, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/gpuwatch/v1/common.proto",
    "proto/gpuwatch/v1/leases.proto",
    "proto/gpuwatch/v1/telemetry.proto",
    "proto/gpuwatch/v1/control.proto",
    "proto/gpuwatch/v1/events.proto",
    "proto/gpuwatch/v1/history.proto",
    "proto/gpuwatch/v1/gpuwatch.proto",
    "proto/gpuwatch/v1/recording.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Encodes through a contiguous buffer: see server/codec.rs.
        .codec_path("crate::codec::ProstCodec")
        .file_descriptor_set_path(out.join("gpuwatch_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;
    Ok(())
}
