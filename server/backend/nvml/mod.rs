//! The NVML backend: real NVIDIA GPUs through nvml-wrapper.
//!
//! [`NvmlBackend`] owns the one NVML instance of the process (initialised
//! once and kept for the life of the process, so device handles can be cached
//! and moved to the sampler's threads) and the XID event thread. Each GPU it
//! opens is an `NvmlDevice` (`device.rs`) that probes once which reads and
//! controls the GPU supports, never calls what it knows is unsupported,
//! reports a GPU that fell off the bus as [`BackendError::GpuLost`] and
//! re-acquires it when it returns. [`map_error`] is the single translation
//! from NVML's errors to the daemon's.
//!
//! Tested without a GPU against the stand-in library in `tests/fakenvml`.

mod device;
mod events;
mod processes;
mod raw;

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::Instant,
};

use nvml_wrapper::{Nvml, error::NvmlError};

use super::{Backend, BackendError, GpuDevice, HostFacts};
use device::NvmlDevice;
use events::EventWatcher;

/// The library nvml-wrapper loads when none is configured.
const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// GPUs read and governed through NVML.
pub struct NvmlBackend {
    nvml: &'static Nvml,
    started: Instant,
    events: EventWatcher,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend").finish_non_exhaustive()
    }
}

/// NVML instances initialised so far, by library path. NVML is initialised
/// once per library and never shut down: the instance is leaked so that
/// `Device<'static>` handles can be cached. A second `NvmlBackend` on the
/// same library reuses the instance; one on another library (another copy
/// of a stand-in, in tests) gets its own.
static INSTANCES: Mutex<Vec<(Option<PathBuf>, &'static Nvml)>> = Mutex::new(Vec::new());

impl NvmlBackend {
    /// Initialises NVML from `library` (default: `libnvidia-ml.so.1` on the
    /// loader's search path) and starts the XID event thread.
    ///
    /// Fails with [`BackendError::Unavailable`] when the library cannot be
    /// loaded or the driver is not running; the message says how to run
    /// without a GPU.
    pub fn new(library: Option<&Path>) -> Result<Self, BackendError> {
        let nvml = nvml_instance(library)?;
        Ok(Self {
            nvml,
            started: Instant::now(),
            events: EventWatcher::start(),
        })
    }
}

fn nvml_instance(library: Option<&Path>) -> Result<&'static Nvml, BackendError> {
    let mut instances = INSTANCES.lock().unwrap_or_else(PoisonError::into_inner);
    let key = library.map(Path::to_path_buf);
    if let Some((_, nvml)) = instances.iter().find(|(path, _)| *path == key) {
        return Ok(nvml);
    }
    let mut builder = Nvml::builder();
    if let Some(path) = library {
        builder.lib_path(path.as_os_str());
    } else {
        builder.lib_path(OsStr::new(DEFAULT_LIBRARY));
    }
    let nvml: &'static Nvml = Box::leak(Box::new(
        builder.init().map_err(|e| init_failed(library, &e))?,
    ));
    instances.push((key, nvml));
    Ok(nvml)
}

/// The error for an NVML that cannot be started, with the way out.
fn init_failed(library: Option<&Path>, e: &NvmlError) -> BackendError {
    let what = match library {
        Some(path) => format!("NVML library {}", path.display()),
        None => format!("NVML library {DEFAULT_LIBRARY} (loader search path)"),
    };
    let why = match e {
        NvmlError::LibloadingError(_) => "the library could not be loaded",
        NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded",
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver",
        _ => "NVML failed to initialise",
    };
    BackendError::Unavailable(format!(
        "cannot start {what}: {why} ({e}). To run without a GPU, start \
         `gpuwatch-server --simulate`. If NVML is installed elsewhere, point \
         `backend.nvml_library` (environment: GPUWATCH_BACKEND__NVML_LIBRARY) \
         at its libnvidia-ml.so.1"
    ))
}

impl Backend for NvmlBackend {
    fn host_facts(&self) -> HostFacts {
        HostFacts {
            backend: "nvml",
            driver_version: self.nvml.sys_driver_version().ok(),
            nvml_version: self.nvml.sys_nvml_version().ok(),
        }
    }

    fn device_count(&self) -> Result<u32, BackendError> {
        self.nvml
            .device_count()
            .map_err(|e| context("counting GPUs", map_error(e)))
    }

    fn open(&self, index: u32) -> Result<Box<dyn GpuDevice>, BackendError> {
        let device = NvmlDevice::open(self.nvml, index, self.started, &self.events)?;
        Ok(Box::new(device))
    }
}

/// Translates an NVML error into the daemon's terms; the message is NVML's.
pub fn map_error(e: NvmlError) -> BackendError {
    let message = e.to_string();
    match e {
        NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_) => {
            BackendError::NotSupported(message)
        }
        NvmlError::NoPermission => BackendError::NoPermission(message),
        NvmlError::GpuLost => BackendError::GpuLost(message),
        NvmlError::InvalidArg => BackendError::InvalidArgument(message),
        NvmlError::Timeout => BackendError::Timeout(message),
        NvmlError::DriverNotLoaded | NvmlError::LibloadingError(_) => {
            BackendError::Unavailable(message)
        }
        NvmlError::InUse => BackendError::InUse(message),
        _ => BackendError::Other(message),
    }
}

/// Prefixes the error's message with what was being done.
fn context(what: impl std::fmt::Display, e: BackendError) -> BackendError {
    use BackendError as E;
    let wrap = |m: String| format!("{what}: {m}");
    match e {
        E::NotSupported(m) => E::NotSupported(wrap(m)),
        E::NoPermission(m) => E::NoPermission(wrap(m)),
        E::GpuLost(m) => E::GpuLost(wrap(m)),
        E::InvalidArgument(m) => E::InvalidArgument(wrap(m)),
        E::Timeout(m) => E::Timeout(wrap(m)),
        E::Unavailable(m) => E::Unavailable(wrap(m)),
        E::InUse(m) => E::InUse(wrap(m)),
        E::Other(m) => E::Other(wrap(m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variant's name, to compare kinds regardless of message.
    fn kind(e: &BackendError) -> &'static str {
        match e {
            BackendError::NotSupported(_) => "NotSupported",
            BackendError::NoPermission(_) => "NoPermission",
            BackendError::GpuLost(_) => "GpuLost",
            BackendError::InvalidArgument(_) => "InvalidArgument",
            BackendError::Timeout(_) => "Timeout",
            BackendError::Unavailable(_) => "Unavailable",
            BackendError::InUse(_) => "InUse",
            BackendError::Other(_) => "Other",
        }
    }

    #[test]
    fn map_error_follows_the_documented_table() {
        let cases = [
            (NvmlError::NotSupported, "NotSupported"),
            (
                NvmlError::FailedToLoadSymbol("nvmlX".into()),
                "NotSupported",
            ),
            (NvmlError::NoPermission, "NoPermission"),
            (NvmlError::GpuLost, "GpuLost"),
            (NvmlError::InvalidArg, "InvalidArgument"),
            (NvmlError::Timeout, "Timeout"),
            (NvmlError::DriverNotLoaded, "Unavailable"),
            (NvmlError::InUse, "InUse"),
            (NvmlError::Unknown, "Other"),
            (NvmlError::NotFound, "Other"),
            (NvmlError::ResetRequired, "Other"),
            (NvmlError::UnexpectedVariant(25), "Other"),
        ];
        for (nvml, expected) in cases {
            let text = nvml.to_string();
            let mapped = map_error(nvml);
            assert_eq!(kind(&mapped), expected, "{text}");
            assert!(
                mapped.to_string().contains(&text),
                "{mapped} keeps NVML's words"
            );
        }
    }

    #[test]
    fn a_library_that_fails_to_load_maps_to_unavailable() {
        let e = libloading_error();
        let text = e.to_string();
        let mapped = map_error(e);
        assert_eq!(kind(&mapped), "Unavailable", "{text}");
    }

    /// A real `LibloadingError`, from loading a file that is no library.
    fn libloading_error() -> NvmlError {
        match Nvml::builder().lib_path(OsStr::new("/")).init() {
            Err(e @ NvmlError::LibloadingError(_)) => e,
            other => panic!("expected a libloading error, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_library_maps_to_unavailable() {
        let e = NvmlBackend::new(Some(Path::new("/nonexistent/libnvidia-ml.so.1")))
            .expect_err("no such library");
        let BackendError::Unavailable(message) = e else {
            panic!("expected Unavailable, got {e:?}");
        };
        assert!(message.contains("--simulate"), "{message}");
        assert!(message.contains("backend.nvml_library"), "{message}");
        assert!(
            message.contains("GPUWATCH_BACKEND__NVML_LIBRARY"),
            "{message}"
        );
    }

    #[test]
    fn context_keeps_the_kind() {
        let e = context(
            "setting the power limit",
            BackendError::NoPermission("x".into()),
        );
        assert_eq!(
            e,
            BackendError::NoPermission("setting the power limit: x".into())
        );
    }
}
