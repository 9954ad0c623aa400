//! The fake's configuration: what GPUs exist and which faults they show.
//!
//! Owns the JSON schema (documented in the crate docs and README.md), the
//! built-in default fleet, and finding and watching the config file: the
//! file is re-read whenever its modification time, size or inode changes, so
//! a test (or a daemon running against the fake) can flip faults mid-run.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Deserialize;

/// Name of the per-library config file looked up next to the loaded library.
pub const SIDECAR_NAME: &str = "fakenvml.json";
/// Environment variable naming the config file.
pub const ENV_VAR: &str = "FAKENVML_CONFIG";

/// The whole fake NVML installation.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// What `nvmlSystemGetDriverVersion` answers.
    pub driver_version: String,
    /// What `nvmlSystemGetNVMLVersion` answers.
    pub nvml_version: String,
    /// `false` makes `nvmlInit_v2` fail with `NVML_ERROR_DRIVER_NOT_LOADED`.
    pub driver_loaded: bool,
    /// When set, every device call appends `gpu<N> <symbol> <return code>`
    /// to this file (to check which calls a client makes).
    pub trace_file: Option<PathBuf>,
    /// The GPUs, in index order (each entry may stand for `count` GPUs).
    pub gpus: Vec<GpuConfig>,
}

impl Default for Config {
    /// Two datacenter GPUs under different loads, one process each.
    fn default() -> Self {
        let gpu = |load_pct, pid| GpuConfig {
            load_pct,
            processes: vec![ProcessConfig {
                pid,
                used_memory_mib: Some(4096),
                ..ProcessConfig::default()
            }],
            ..GpuConfig::default()
        };
        Self {
            driver_version: "580.95.05".into(),
            nvml_version: "13.580.95.05".into(),
            driver_loaded: true,
            trace_file: None,
            gpus: vec![gpu(60.0, 4100), gpu(20.0, 4101)],
        }
    }
}

/// The board models the fake knows (see `model.rs` for their numbers).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// An H100-like SXM board: everything supported.
    #[default]
    Datacenter,
    /// A GeForce-like board: no memory temperature, ECC, fan reading, PCIe
    /// counters or application clocks.
    Consumer,
    /// A Turing laptop GPU: like consumer, and power management is not
    /// exposed (no power limits, no energy counter), nor memory clock locks.
    Laptop,
}

/// NVML features that can be switched off per GPU (`unsupported`). Each
/// makes the matching calls answer `NVML_ERROR_NOT_SUPPORTED`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    Temperature,
    Thresholds,
    MemoryTemperature,
    FanSpeed,
    PowerUsage,
    /// Power limit, default, constraints, enforced limit, and setting it.
    PowerManagement,
    Energy,
    Clocks,
    MaxClocks,
    Utilization,
    MemoryInfo,
    PerformanceState,
    ThrottleReasons,
    PcieThroughput,
    Ecc,
    Processes,
    Architecture,
    GpuLockedClocks,
    MemoryLockedClocks,
    ApplicationsClocks,
    Events,
    /// `nvmlDeviceGetGraphicsRunningProcesses_v3`.
    GraphicsProcesses,
    /// `nvmlDeviceGetProcessUtilization`.
    ProcessUtilization,
    /// MIG mode and MIG devices (only the datacenter model has it).
    Mig,
}

/// One GPU (or `count` identical GPUs).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    pub model: ModelKind,
    /// How many GPUs this entry stands for.
    pub count: u32,
    /// UUID; default derived from the index.
    pub uuid: Option<String>,
    /// Product name; default from the model.
    pub name: Option<String>,
    /// Workload, 0–100 %: drives power, clocks, temperature, utilisation.
    pub load_pct: f64,
    /// Inlet temperature.
    pub ambient_c: f64,
    /// Pins the GPU temperature (e.g. to push it past slowdown).
    pub temperature_c: Option<u32>,
    /// Running compute processes. `used_memory_mib: null` is reported as
    /// NVML_VALUE_NOT_AVAILABLE, as drivers do without permission.
    pub processes: Vec<ProcessConfig>,
    /// Running graphics processes (same shape as `processes`). A pid in
    /// both lists is a process with both kinds of context.
    pub graphics_processes: Vec<ProcessConfig>,
    /// MIG mode and instances; `None` is MIG off (on a board that has it).
    pub mig: Option<MigConfig>,
    /// Volatile ECC error counts (aggregate counts equal them: the fake's
    /// GPUs are new). Only readable where ECC is supported.
    pub ecc_errors: EccConfig,
    /// Features that answer NOT_SUPPORTED on top of the model's own.
    pub unsupported: Vec<Feature>,
    /// Fault: every call on this GPU fails with `lost_error`.
    pub lost: bool,
    /// What a lost GPU answers: `NVML_ERROR_GPU_IS_LOST` (default) or, as
    /// some drivers do for a GPU that fell off the bus, `NVML_ERROR_UNKNOWN`.
    pub lost_error: LostError,
    /// Fault: calls for these features answer `NVML_ERROR_UNKNOWN` while
    /// the GPU itself stays healthy (a transient driver error).
    pub failing: Vec<Feature>,
    /// Fault: writes answer `NVML_ERROR_NO_PERMISSION`.
    pub no_permission_on_write: bool,
    /// Fault: every query on this GPU sleeps this long before answering.
    pub hang_ms: u64,
    /// Fault: the slowdown temperature threshold reported instead of the
    /// board's (some boards answer 0).
    pub slowdown_c: Option<u32>,
    /// XID errors that occurred on this GPU, oldest first. An append-only
    /// log: each entry is delivered once, to the event sets registered for
    /// this GPU (or, when none is registered yet, to the first that is).
    pub xid: Vec<u64>,
    /// Fault: how many times the board was reset behind its clients' backs
    /// (a driver reload, `nvidia-smi -r`). A re-read that changes it puts
    /// the board back to its defaults (power limit, clock locks) without
    /// the GPU being lost.
    pub resets: u64,
    /// GPU Performance Monitoring (Hopper and newer): off by default. When
    /// on, GPM samples report the graphics engine busy at `load_pct`, the
    /// tensor pipes at half of it and the memory interface at the memory
    /// utilisation.
    pub gpm: bool,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            model: ModelKind::default(),
            count: 1,
            uuid: None,
            name: None,
            load_pct: 50.0,
            ambient_c: 30.0,
            temperature_c: None,
            processes: Vec::new(),
            graphics_processes: Vec::new(),
            mig: None,
            ecc_errors: EccConfig::default(),
            unsupported: Vec::new(),
            lost: false,
            lost_error: LostError::default(),
            failing: Vec::new(),
            no_permission_on_write: false,
            hang_ms: 0,
            slowdown_c: None,
            xid: Vec::new(),
            resets: 0,
            gpm: false,
        }
    }
}

/// The error a lost GPU answers with.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LostError {
    #[default]
    GpuIsLost,
    Unknown,
}

/// A process on a GPU (or in a MIG instance).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    pub pid: u32,
    /// `None` (JSON null) means the driver does not say.
    pub used_memory_mib: Option<u64>,
    /// The process's share of the SMs, 0–100, in its utilisation samples.
    /// A process with none of the four `*_pct` set (or all 0) has no
    /// samples, as NVML only samples processes that used the GPU.
    #[serde(default)]
    pub sm_pct: Option<u32>,
    #[serde(default)]
    pub memory_pct: Option<u32>,
    #[serde(default)]
    pub encoder_pct: Option<u32>,
    #[serde(default)]
    pub decoder_pct: Option<u32>,
}

impl ProcessConfig {
    /// True when the process has utilisation samples.
    pub fn sampled(&self) -> bool {
        [
            self.sm_pct,
            self.memory_pct,
            self.encoder_pct,
            self.decoder_pct,
        ]
        .iter()
        .any(|v| v.is_some_and(|pct| pct > 0))
    }
}

/// MIG mode and the instances of a GPU.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MigConfig {
    /// The current mode.
    pub enabled: bool,
    /// The mode after the next GPU reset; default: the current one.
    pub pending: Option<bool>,
    /// GPU instances (each with one compute instance spanning it). Only
    /// allowed while `enabled`.
    pub instances: Vec<MigInstanceConfig>,
}

/// One MIG instance: a GPU instance of `profile` with one compute instance.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MigInstanceConfig {
    /// An H100 80GB profile name: `1g.10gb`, `1g.20gb`, `2g.20gb`,
    /// `3g.40gb`, `4g.40gb`, `7g.80gb`.
    pub profile: String,
    /// The GPU instance id; default: the lowest id from 1 up that no
    /// other instance has (give it to keep ids when the list changes).
    pub gpu_instance_id: Option<u32>,
    /// Compute processes running in the instance.
    pub processes: Vec<ProcessConfig>,
}

/// Volatile ECC counts.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EccConfig {
    pub corrected: u64,
    pub uncorrected: u64,
}

impl Config {
    /// Parses a config document.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for (entry, gpu) in config.gpus.iter().enumerate() {
            if !(0.0..=100.0).contains(&gpu.load_pct) {
                return Err(format!("load_pct {} is outside 0-100", gpu.load_pct));
            }
            crate::model::check_gpu(gpu).map_err(|e| format!("gpus[{entry}]: {e}"))?;
        }
        Ok(config)
    }

    /// The GPUs, one entry per GPU (`count` expanded).
    pub fn expanded_gpus(&self) -> Vec<GpuConfig> {
        self.gpus
            .iter()
            .flat_map(|g| std::iter::repeat_n(g, g.count as usize))
            .cloned()
            .collect()
    }
}

/// Identifies one version of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    /// The file's current stamp, or `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path).ok()?;
        Some(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        })
    }
}

/// Where the config comes from: a sidecar `fakenvml.json` beside the loaded
/// library wins (so every copy of the library can have its own), then
/// `$FAKENVML_CONFIG`, then the built-in default.
pub fn locate(library: Option<&Path>) -> Option<PathBuf> {
    if let Some(sidecar) = library
        .and_then(Path::parent)
        .map(|dir| dir.join(SIDECAR_NAME))
        .filter(|p| p.is_file())
    {
        return Some(sidecar);
    }
    std::env::var_os(ENV_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Reads and parses the config at `path`.
pub fn load(path: &Path) -> Result<Config, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The path of the shared object this code was loaded from, found by
/// looking up one of our own functions in `/proc/self/maps`.
pub fn own_library_path() -> Option<PathBuf> {
    let address = own_library_path as fn() -> Option<PathBuf> as usize;
    let maps = fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let range = parts.next()?;
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        if !(start..end).contains(&address) {
            return None;
        }
        // perms, offset, dev, inode, then the path (which may hold spaces).
        let path = parts.skip(4).collect::<Vec<_>>().join(" ");
        path.starts_with('/').then(|| PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_is_the_default() {
        assert_eq!(Config::parse("{}").expect("parse"), Config::default());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::parse(r#"{"gpus": [{"modle": "consumer"}]}"#).is_err());
    }

    #[test]
    fn count_expands() {
        let c =
            Config::parse(r#"{"gpus": [{"model": "consumer", "count": 3}, {}]}"#).expect("parse");
        let gpus = c.expanded_gpus();
        assert_eq!(gpus.len(), 4);
        assert_eq!(gpus[2].model, ModelKind::Consumer);
        assert_eq!(gpus[3].model, ModelKind::Datacenter);
    }
}
