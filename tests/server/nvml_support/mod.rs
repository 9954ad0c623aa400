//! Shared fixture for the `nvml_*` suites: a private copy of the stand-in
//! NVML library (`tests/fakenvml`) with its own config file.
//!
//! `dlopen` of one path gives one shared instance per process, so every test
//! copies the library into its own temporary directory, next to its own
//! `fakenvml.json`: tests then run in parallel without sharing GPUs, state or
//! faults. The config is replaced atomically (write, then rename), which the
//! fake notices on its next call.

#![allow(dead_code)] // each suite uses a different part

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use gpuwatch_server::backend::{GpuDevice, ReadScope, nvml::NvmlBackend};
use serde_json::Value;
use tempfile::TempDir;

pub const FAST: ReadScope = ReadScope { slow_fields: false };
pub const SLOW: ReadScope = ReadScope { slow_fields: true };

/// The stand-in library cargo built for this test run (it is a
/// dev-dependency, so `target/<profile>/deps/libfakenvml.so` exists).
pub fn built_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("executable directory");
    [deps.to_path_buf(), deps.join("..")]
        .into_iter()
        .map(|dir| dir.join("libfakenvml.so"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("libfakenvml.so not found next to {}", exe.display()))
}

/// One private instance of the fake NVML.
pub struct FakeNvml {
    dir: TempDir,
    library: PathBuf,
}

impl FakeNvml {
    /// A fresh copy of the library, configured with `config`.
    pub fn new(config: &Value) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let library = dir.path().join("libnvidia-ml.so.1");
        // A copy, not a link: the loader recognises a file it already loaded
        // by inode and would hand back the shared instance.
        fs::copy(built_library(), &library).expect("copy the fake library");
        let fake = Self { dir, library };
        fake.set_config(config);
        fake
    }

    /// A copy of the library without a config file of its own.
    pub fn without_config() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let library = dir.path().join("libnvidia-ml.so.1");
        fs::copy(built_library(), &library).expect("copy the fake library");
        Self { dir, library }
    }

    pub fn library(&self) -> &Path {
        &self.library
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the config; the fake picks it up on its next call.
    pub fn set_config(&self, config: &Value) {
        let tmp = self.dir.path().join("fakenvml.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(config).expect("json")).expect("write config");
        fs::rename(&tmp, self.dir.path().join("fakenvml.json")).expect("install config");
    }

    pub fn backend(&self) -> NvmlBackend {
        NvmlBackend::new(Some(&self.library)).expect("NVML over the fake library")
    }
}

/// Polls `device` for events until `want` of them arrived or `patience`
/// ran out; returns what arrived.
pub fn collect_events(
    device: &mut dyn GpuDevice,
    want: usize,
    patience: Duration,
) -> Vec<gpuwatch_server::backend::DeviceEvent> {
    let deadline = Instant::now() + patience;
    let mut events = Vec::new();
    while events.len() < want && Instant::now() < deadline {
        events.extend(device.drain_events());
        thread::sleep(Duration::from_millis(10));
    }
    events
}
