//! The NVML backend: real NVIDIA GPUs through nvml-wrapper (being built on
//! its own branch; this placeholder keeps the daemon honest about it).

use std::path::Path;

use super::{Backend, BackendError, GpuDevice, HostFacts};

/// GPUs read through NVML.
#[derive(Debug)]
pub struct NvmlBackend;

impl NvmlBackend {
    /// Loads NVML.
    pub fn new(_library: Option<&Path>) -> Result<Self, BackendError> {
        Err(BackendError::Unavailable(
            "the NVML backend is not available in this build; run on simulated GPUs with `gpuwatch-server --simulate`".into(),
        ))
    }
}

impl Backend for NvmlBackend {
    fn host_facts(&self) -> HostFacts {
        HostFacts {
            backend: "nvml",
            ..HostFacts::default()
        }
    }

    fn device_count(&self) -> Result<u32, BackendError> {
        Err(BackendError::Unavailable("NVML backend not built".into()))
    }

    fn open(&self, _index: u32) -> Result<Box<dyn GpuDevice>, BackendError> {
        Err(BackendError::Unavailable("NVML backend not built".into()))
    }
}
