//! The NVML backend: real NVIDIA GPUs through nvml-wrapper (work in progress).

use super::{Backend, BackendError, GpuDevice, HostFacts};

/// GPUs read through NVML.
#[derive(Debug)]
pub struct NvmlBackend;

impl Backend for NvmlBackend {
    fn host_facts(&self) -> HostFacts {
        HostFacts {
            backend: "nvml",
            ..HostFacts::default()
        }
    }

    fn device_count(&self) -> Result<u32, BackendError> {
        Err(BackendError::Unavailable(
            "NVML backend not built yet".into(),
        ))
    }

    fn open(&self, _index: u32) -> Result<Box<dyn GpuDevice>, BackendError> {
        Err(BackendError::Unavailable(
            "NVML backend not built yet".into(),
        ))
    }
}
