//! The NVML calls gpuwatch needs that nvml-wrapper 0.13 does not wrap.
//!
//! A MIG device's GPU instance id and compute instance id
//! (`nvmlDeviceGetGpuInstanceId`, `nvmlDeviceGetComputeInstanceId`) have no
//! safe method in the wrapper, and nothing else tells an instance's ids
//! when no process runs in it. Both are called through the wrapper's own
//! loaded library (`Nvml::lib()`) and device handle, so a driver without the
//! symbol answers `FailedToLoadSymbol` like any wrapped call. This is the
//! only module of the daemon allowed `unsafe` code; keep it to calls of
//! this shape (a handle and one out-parameter).
#![allow(unsafe_code)]

use std::ffi::c_uint;

use nvml_wrapper::{
    Device, Nvml,
    error::{NvmlError, nvml_try},
};

/// The GPU instance id of a MIG device.
pub(super) fn gpu_instance_id(nvml: &Nvml, device: &Device<'_>) -> Result<u32, NvmlError> {
    let call = nvml
        .lib()
        .nvmlDeviceGetGpuInstanceId
        .as_ref()
        .map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let mut id: c_uint = 0;
    // SAFETY: `call` is NVML's `nvmlReturn_t (nvmlDevice_t, unsigned int *)`
    // resolved from the library `nvml` loaded and keeps loaded; the handle
    // comes from that same instance, and `id` outlives the call.
    nvml_try(unsafe { call(device.handle(), &mut id) })?;
    Ok(id)
}

/// The compute instance id of a MIG device.
pub(super) fn compute_instance_id(nvml: &Nvml, device: &Device<'_>) -> Result<u32, NvmlError> {
    let call = nvml
        .lib()
        .nvmlDeviceGetComputeInstanceId
        .as_ref()
        .map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let mut id: c_uint = 0;
    // SAFETY: as in `gpu_instance_id`: same signature, same library, a
    // handle of that library, and a live out-parameter.
    nvml_try(unsafe { call(device.handle(), &mut id) })?;
    Ok(id)
}
