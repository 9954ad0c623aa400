//! `libfakenvml.so`: a stand-in for NVIDIA's `libnvidia-ml.so`, so gpuwatch's
//! NVML backend can be tested (and the daemon demonstrated) on machines
//! without a GPU.
//!
//! It exports the C symbols nvml-wrapper calls for what gpuwatch reads and
//! writes, behind a small but honest model of GPUs with state: power drawn is
//! demand capped by the power limit, temperature follows power, clocks drop
//! under a power cap or a clock lock, a power limit that is set reads back,
//! out-of-range values are refused with `NVML_ERROR_INVALID_ARGUMENT`, and
//! unsupported features answer `NVML_ERROR_NOT_SUPPORTED`. Load it through
//! nvml-wrapper's `Nvml::builder().lib_path(..)` (gpuwatch:
//! `backend.nvml_library`).
//!
//! # Configuration
//!
//! The config is a JSON file, taken from the first of:
//! 1. `fakenvml.json` in the directory the library was loaded from (so each
//!    copy of the library can carry its own config: tests copy the library
//!    into a temporary directory to get an independent instance);
//! 2. the file named by the environment variable `FAKENVML_CONFIG`;
//! 3. the built-in default: two datacenter GPUs at 60 % and 20 % load.
//!
//! The file is checked on every call and re-read when its modification time
//! (or size, or inode) changes, so faults can be flipped while a program
//! runs. Replace it atomically (write a temporary file, then rename) so a
//! half-written file is never read; one that does not parse is reported on
//! stderr and ignored. A config that cannot be read at `nvmlInit_v2` makes
//! init fail with `NVML_ERROR_UNKNOWN`.
//!
//! ```json
//! {
//!   "driver_version": "580.95.05",     // nvmlSystemGetDriverVersion
//!   "nvml_version": "13.580.95.05",    // nvmlSystemGetNVMLVersion
//!   "driver_loaded": true,             // false: init fails, DRIVER_NOT_LOADED
//!   "trace_file": null,                // path: log "gpuN symbol code" per call
//!   "gpus": [                          // index order
//!     {
//!       "model": "datacenter",         // "datacenter" | "consumer" | "laptop"
//!       "count": 1,                    // this entry stands for N GPUs
//!       "uuid": null,                  // default GPU-fa4e0000-0000-4000-8000-<index>
//!       "name": null,                  // default from the model
//!       "load_pct": 50,                // workload 0-100
//!       "ambient_c": 30,
//!       "temperature_c": null,         // pin the temperature
//!       "processes": [{"pid": 4100, "used_memory_mib": 4096, "sm_pct": 30},
//!                     {"pid": 4101, "used_memory_mib": null}],
//!       "graphics_processes": [{"pid": 4200, "used_memory_mib": 64}],
//!       "mig": null,                   // MIG off; datacenter only, e.g.
//!       // {"enabled": true, "pending": null, "instances": [{"profile":
//!       //  "3g.40gb", "gpu_instance_id": null, "processes": [...]}]}
//!       // (in MIG mode processes live in instances, not above)
//!       "ecc_errors": {"corrected": 0, "uncorrected": 0},
//!       "unsupported": ["fan_speed"],  // extra NOT_SUPPORTED features
//!       "lost": false,                 // every call fails with lost_error
//!       "lost_error": "gpu_is_lost",   // or "unknown" (NVML_ERROR_UNKNOWN)
//!       "failing": ["power_usage"],    // these features: NVML_ERROR_UNKNOWN
//!       "no_permission_on_write": false, // writes: NO_PERMISSION
//!       "hang_ms": 0,                  // every query sleeps this long first
//!       "xid": [79]                    // XIDs logged, each delivered once
//!     }
//!   ]
//! }
//! ```
//! (Comments for illustration only; JSON has none.) Every key is optional;
//! unknown keys are errors. Models: `datacenter` (an H100-like SXM board,
//! everything supported), `consumer` (a GeForce-like board without memory
//! temperature, fan reading, ECC, PCIe counters or application clocks), and
//! `laptop` (a Turing board: as consumer, and without power management,
//! energy counter or memory clock locking). Feature names for `unsupported`:
//! `temperature`, `thresholds`, `memory_temperature`, `fan_speed`,
//! `power_usage`, `power_management`, `energy`, `clocks`, `max_clocks`,
//! `utilization`, `memory_info`, `performance_state`, `throttle_reasons`,
//! `pcie_throughput`, `ecc`, `processes`, `architecture`,
//! `gpu_locked_clocks`, `memory_locked_clocks`, `applications_clocks`,
//! `events`, `graphics_processes`, `process_utilization`, `mig` (the same
//! names serve `failing`). Per-process utilisation (`sm_pct`, `memory_pct`,
//! `encoder_pct`, `decoder_pct`) is returned as timestamped samples; a config
//! whose processes' SM shares exceed the GPU's utilisation, or whose MIG
//! instances overfill the GPU, is refused. MIG instances are child devices
//! with their own handles (see README.md and `model.rs`).
//!
//! A GPU entry that keeps its model and uuid across a re-read keeps its state
//! (power limit, clock locks, energy counter, delivered XIDs); one whose
//! model or uuid changed is a new board with default state.
//!
//! # Scope
//!
//! The state is per loaded instance of the library (`dlopen` of one path
//! gives one instance per process). Only what gpuwatch uses is exported; any
//! other NVML function is missing, which nvml-wrapper reports as
//! `FailedToLoadSymbol` when it is called.

pub mod abi;
pub mod config;
pub mod model;
mod state;
