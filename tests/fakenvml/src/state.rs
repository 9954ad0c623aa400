//! The fake's process-wide state behind the C entry points.
//!
//! Owns the one `Mutex` every exported function goes through: the init
//! reference count, the GPUs, the event sets, and the link to the config
//! file, which is checked (a `stat`) on every call and re-applied when it
//! changed. Everything here is plain safe Rust; the pointer work lives in
//! `abi.rs`.

use std::{
    collections::HashMap,
    fs::OpenOptions,
    io::Write,
    path::PathBuf,
    sync::{Mutex, MutexGuard},
};

use nvml_wrapper_sys::bindings::*;

use crate::{
    config::{self, Config, FileStamp},
    model::Gpu,
};

/// Result of a fake NVML operation: the value, or the NVML error code.
pub type NvmlResult<T> = Result<T, nvmlReturn_t>;

/// One device registered in an event set.
#[derive(Debug)]
struct Registration {
    gpu: u32,
    /// How many entries of the GPU's XID log this set has been given.
    cursor: usize,
}

/// The whole fake installation.
#[derive(Debug)]
pub struct Fake {
    refcount: u32,
    source: Option<PathBuf>,
    stamp: Option<FileStamp>,
    pub config: Config,
    pub gpus: Vec<Gpu>,
    event_sets: HashMap<usize, Vec<Registration>>,
    next_event_set: usize,
}

static FAKE: Mutex<Option<Fake>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<Fake>> {
    // A panic cannot unwind out of an `extern "C"` function (it aborts), so a
    // poisoned lock only means a test thread died; the data is still sound.
    FAKE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `nvmlInit_v2`: loads the config on first use and counts the init.
pub fn init() -> nvmlReturn_t {
    let mut guard = lock();
    if guard.is_none() {
        let library = config::own_library_path();
        let source = config::locate(library.as_deref());
        let (config, stamp) = match &source {
            Some(path) => match config::load(path) {
                Ok(c) => (c, FileStamp::of(path)),
                Err(e) => {
                    eprintln!("fakenvml: cannot use config {e}");
                    return nvmlReturn_enum_NVML_ERROR_UNKNOWN;
                }
            },
            None => (Config::default(), None),
        };
        let mut fake = Fake {
            refcount: 0,
            source,
            stamp,
            config: Config::default(),
            gpus: Vec::new(),
            event_sets: HashMap::new(),
            next_event_set: 1,
        };
        fake.apply(config);
        *guard = Some(fake);
    }
    let Some(fake) = guard.as_mut() else {
        return nvmlReturn_enum_NVML_ERROR_UNKNOWN;
    };
    fake.refresh();
    if !fake.config.driver_loaded {
        return nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
    }
    fake.refcount += 1;
    nvmlReturn_enum_NVML_SUCCESS
}

/// `nvmlShutdown`: drops one init.
pub fn shutdown() -> nvmlReturn_t {
    match lock().as_mut() {
        Some(fake) if fake.refcount > 0 => {
            fake.refcount -= 1;
            nvmlReturn_enum_NVML_SUCCESS
        }
        _ => nvmlReturn_enum_NVML_ERROR_UNINITIALIZED,
    }
}

/// Runs `f` on the state of an initialised fake, after picking up config
/// changes.
pub fn with<T>(f: impl FnOnce(&mut Fake) -> NvmlResult<T>) -> NvmlResult<T> {
    let mut guard = lock();
    match guard.as_mut() {
        Some(fake) if fake.refcount > 0 => {
            fake.refresh();
            f(fake)
        }
        _ => Err(nvmlReturn_enum_NVML_ERROR_UNINITIALIZED),
    }
}

impl Fake {
    /// Re-reads the config file when it changed. A file that does not parse
    /// (for instance one caught half-written) is reported and skipped; the
    /// previous config stays in force until the file changes again.
    fn refresh(&mut self) {
        let Some(path) = &self.source else {
            return;
        };
        let stamp = FileStamp::of(path);
        if stamp == self.stamp {
            return;
        }
        self.stamp = stamp;
        if stamp.is_none() {
            return;
        }
        match config::load(path) {
            Ok(config) => self.apply(config),
            Err(e) => eprintln!("fakenvml: ignoring config change, {e}"),
        }
    }

    /// Makes `config` current: GPUs of the same board keep their state
    /// (limits, locks, energy, delivered XIDs); new or changed boards start
    /// fresh.
    fn apply(&mut self, config: Config) {
        let wanted = config.expanded_gpus();
        let mut old: Vec<Option<Gpu>> = std::mem::take(&mut self.gpus)
            .into_iter()
            .map(Some)
            .collect();
        self.gpus = wanted
            .into_iter()
            .enumerate()
            .map(|(i, gpu_config)| {
                let index = i as u32;
                match old.get_mut(i).and_then(Option::take) {
                    Some(mut gpu) if gpu.is_same_board(&gpu_config) => {
                        gpu.reconfigure(gpu_config);
                        gpu
                    }
                    _ => Gpu::new(index, gpu_config),
                }
            })
            .collect();
        for registrations in self.event_sets.values_mut() {
            for r in registrations.iter_mut() {
                if let Some(gpu) = self.gpus.get(r.gpu as usize) {
                    r.cursor = r.cursor.min(gpu.config.xid.len());
                }
            }
        }
        self.config = config;
    }

    pub fn gpu(&mut self, index: u32) -> NvmlResult<&mut Gpu> {
        self.gpus
            .get_mut(index as usize)
            .ok_or(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT)
    }

    /// Appends one line to the trace file, when one is configured.
    pub fn trace(&self, gpu: u32, symbol: &str, code: nvmlReturn_t) {
        let Some(path) = &self.config.trace_file else {
            return;
        };
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "gpu{gpu} {symbol} {code}"));
        if let Err(e) = written {
            eprintln!("fakenvml: cannot write trace {}: {e}", path.display());
        }
    }

    pub fn create_event_set(&mut self) -> usize {
        let id = self.next_event_set;
        self.next_event_set += 1;
        self.event_sets.insert(id, Vec::new());
        id
    }

    pub fn free_event_set(&mut self, id: usize) -> NvmlResult<()> {
        self.event_sets
            .remove(&id)
            .map(drop)
            .ok_or(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT)
    }

    /// Registers GPU `gpu` in event set `set`. XIDs the GPU logged that no
    /// set has been given yet are pending for this one.
    pub fn register_events(&mut self, set: usize, gpu: u32) -> NvmlResult<()> {
        let cursor = self.gpu(gpu)?.xids_delivered;
        let registrations = self
            .event_sets
            .get_mut(&set)
            .ok_or(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT)?;
        if !registrations.iter().any(|r| r.gpu == gpu) {
            registrations.push(Registration { gpu, cursor });
        }
        Ok(())
    }

    /// The next XID for event set `set`: `(gpu, xid)`, or `None` when
    /// nothing is pending. A lost GPU in the set makes the wait fail, after
    /// anything it logged before going has been delivered.
    pub fn next_event(&mut self, set: usize) -> NvmlResult<Option<(u32, u64)>> {
        let registrations = self
            .event_sets
            .get_mut(&set)
            .ok_or(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT)?;
        let mut lost = false;
        for r in registrations.iter_mut() {
            let Some(gpu) = self.gpus.get_mut(r.gpu as usize) else {
                continue;
            };
            if let Some(&xid) = gpu.config.xid.get(r.cursor) {
                r.cursor += 1;
                gpu.xids_delivered = gpu.xids_delivered.max(r.cursor);
                return Ok(Some((r.gpu, xid)));
            }
            lost |= gpu.config.lost;
        }
        if lost {
            Err(nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST)
        } else {
            Ok(None)
        }
    }
}
