//! The daemon's configuration: schema, defaults, layering and validation.
//!
//! Layers, later wins: built-in defaults < TOML file (`--config`) <
//! environment (`GPUWATCH_SECTION__KEY`, e.g. `GPUWATCH_SAMPLER__INTERVAL=250ms`)
//! < command-line flags. Unknown keys and invalid values are errors that name
//! the key and what is allowed; `main` turns them into exit code 64.
//!
//! This module owns the whole schema, so `deploy/gpuwatch.toml` (every key,
//! commented) can be checked against it in one place.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use thiserror::Error;

/// The daemon's default gRPC port.
pub const DEFAULT_GRPC_PORT: u16 = 9450;
/// The daemon's default HTTP (metrics, dashboard) port.
pub const DEFAULT_HTTP_PORT: u16 = 9451;

/// Environment variable prefix.
pub const ENV_PREFIX: &str = "GPUWATCH";

/// A configuration problem, naming the key and what is allowed.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file or environment could not be read or parsed.
    #[error("{0}")]
    Load(String),
    /// A value is out of range or inconsistent.
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// A config enum spelled as a string, whose parse error lists what is allowed.
macro_rules! string_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value.
            pub const ALL: &[$name] = &[$($name::$variant,)+];

            /// The spelling used in config files.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == text)
                    .ok_or_else(|| {
                        let allowed: Vec<_> = $name::ALL.iter().map(|v| v.as_str()).collect();
                        serde::de::Error::custom(format!(
                            "unknown value \"{text}\"; allowed: {}",
                            allowed.join(", ")
                        ))
                    })
            }
        }
    };
}

/// A socket address whose parse error shows the expected form.
fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "\"{text}\" is not an address; expected IP:PORT, e.g. \"127.0.0.1:{DEFAULT_GRPC_PORT}\" or \"[::]:{DEFAULT_GRPC_PORT}\""
        ))
    })
}

/// config-rs writes list keys as `a.b[0]c`; make them `a.b[0].c`.
fn tidy_key_paths(message: String) -> String {
    let mut out = String::with_capacity(message.len() + 4);
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']'
            && chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_')
        {
            out.push('.');
        }
    }
    out
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub sampler: SamplerConfig,
    pub backend: BackendConfig,
    /// Simulated GPUs; `None` with the simulator backend gives the default
    /// demo fleet.
    pub simulator: Option<SimulatorConfig>,
    pub controller: ControllerConfig,
    pub events: EventsConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    /// Who uses each GPU: see `attribution`.
    pub attribution: crate::attribution::AttributionConfig,
    /// Past telemetry in tiers: see `history`.
    pub history: crate::history::HistoryConfig,
    /// GPU leases (LeaseGpus): see `leases`.
    pub leases: LeasesConfig,
    /// What `/metrics` serves.
    pub metrics: MetricsConfig,
}

string_enum! {
    /// The metric names `/metrics` serves: gpuwatch's own (`native`),
    /// dcgm-exporter's default counters under dcgm-exporter's names, labels
    /// and units (`dcgm-exporter`), or both in one scrape (`both`, for a
    /// migration: existing dcgm dashboards and gpuwatch's rules at once).
    #[derive(Default)]
    pub enum MetricsProfile {
        #[default]
        Native = "native",
        DcgmExporter = "dcgm-exporter",
        Both = "both",
    }
}

impl MetricsProfile {
    /// Parses a command-line or config spelling; the error lists what is
    /// allowed.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|v| v.as_str() == text)
            .ok_or_else(|| {
                let allowed: Vec<_> = Self::ALL.iter().map(|v| v.as_str()).collect();
                format!(
                    "unknown metrics profile \"{text}\"; allowed: {}",
                    allowed.join(", ")
                )
            })
    }

    /// True when gpuwatch's own families are served.
    pub fn native(self) -> bool {
        matches!(self, Self::Native | Self::Both)
    }

    /// True when dcgm-exporter's families are served.
    pub fn dcgm(self) -> bool {
        matches!(self, Self::DcgmExporter | Self::Both)
    }
}

/// `/metrics`: which names it serves.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub profile: MetricsProfile,
}

/// GPU leases: how long they last and how many one caller may hold.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeasesConfig {
    /// Leases one caller (token name, certificate subject) may hold at once.
    pub max_per_caller: usize,
    /// The TTL of a lease whose request names none.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// The longest TTL a request may ask for.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
}

impl Default for LeasesConfig {
    fn default() -> Self {
        Self {
            max_per_caller: 16,
            default_ttl: Duration::from_secs(600),
            max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Listeners and server-wide limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen address.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// HTTP listen address for /metrics, the dashboard and /healthz;
    /// "off" disables the HTTP listener.
    #[serde(deserialize_with = "optional_socket_addr")]
    pub http_listen: Option<SocketAddr>,
    /// How long shutdown waits for connections to drain.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_GRPC_PORT)),
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT))),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Parses "off" (or "") as no listener, else an IP:PORT.
pub fn parse_optional_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim() {
        "" | "off" | "none" => Ok(None),
        t => t.parse().map(Some).map_err(|_| {
            format!("\"{t}\" is not an address; expected IP:PORT (e.g. \"127.0.0.1:{DEFAULT_HTTP_PORT}\") or \"off\"")
        }),
    }
}

fn optional_socket_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    parse_optional_addr(&text).map_err(serde::de::Error::custom)
}

/// The sampler's cadence and memory.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    /// How often every GPU is read; also the shortest Watch interval.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How often the slower fields are read: process lists, ECC counters,
    /// PCIe throughput (NVML samples the link for ~20 ms) and energy.
    #[serde(with = "humantime_serde")]
    pub slow_interval: Duration,
    /// Frames kept for Watch resumes.
    pub history: usize,
    /// How long a tick waits for a GPU's read before publishing its last
    /// reading as stale. Default: 80 % of `interval`.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Option<Duration>,
    /// How often a lost GPU is probed for its return.
    #[serde(with = "humantime_serde")]
    pub lost_probe_interval: Duration,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            slow_interval: Duration::from_secs(1),
            history: 600,
            read_timeout: None,
            lost_probe_interval: Duration::from_secs(1),
        }
    }
}

impl SamplerConfig {
    /// The effective per-tick read deadline.
    pub fn effective_read_timeout(&self) -> Duration {
        self.read_timeout.unwrap_or(self.interval.mul_f64(0.8))
    }
}

string_enum! {
    /// Which GPU stack to use: NVIDIA's NVML (real GPUs), or simulated GPUs.
    #[derive(Default)]
    pub enum BackendKind {
        #[default]
        Nvml = "nvml",
        Simulator = "simulator",
    }
}

/// The GPU stack.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// "nvml" (default) or "simulator" (`--simulate`).
    pub kind: BackendKind,
    /// Path of libnvidia-ml.so.1 when it is not on the loader's path.
    pub nvml_library: Option<PathBuf>,
}

string_enum! {
    /// Simulated GPU models.
    pub enum PresetKey {
        H100Sxm = "h100-sxm",
        A100Sxm = "a100-sxm",
        Rtx4090 = "rtx-4090",
        Laptop = "laptop",
    }
}

/// The simulator.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorConfig {
    /// Simulated seconds per wall-clock second.
    pub speed: f64,
    /// The simulated GPUs, in index order.
    pub gpus: Vec<SimGpuConfig>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            speed: 1.0,
            gpus: Vec::new(),
        }
    }
}

/// One step of a demand profile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DemandPoint {
    /// Simulated time at which the demand reaches `watts`.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// Board power the workload would draw with no limit in the way.
    pub watts: f64,
    /// Ramp linearly from the previous point instead of stepping at `at`.
    #[serde(default)]
    pub ramp: bool,
}

/// An XID error the simulator raises.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimXid {
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    pub code: u64,
}

string_enum! {
    /// Error a simulated GPU returns on every write.
    pub enum SimWriteError {
        NoPermission = "no_permission",
        NotSupported = "not_supported",
        Unknown = "unknown",
    }
}

/// One simulated GPU (or `count` identical ones).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimGpuConfig {
    /// "h100-sxm", "a100-sxm", "rtx-4090" or "laptop".
    pub preset: PresetKey,
    /// How many GPUs this entry stands for.
    #[serde(default = "one")]
    pub count: u32,
    /// Air (or coolant) temperature the GPU cools towards.
    #[serde(default)]
    pub ambient_c: Option<f64>,
    /// Thermal time constant (the preset's when absent).
    #[serde(default, with = "humantime_serde")]
    pub time_constant: Option<Duration>,
    /// Temperature sensor lag (time constant).
    #[serde(default, with = "humantime_serde")]
    pub sensor_lag: Option<Duration>,
    /// Steady-state temperature rise per watt (the preset's when absent).
    #[serde(default)]
    pub thermal_resistance_c_per_w: Option<f64>,
    /// Demand over simulated time; empty: idle.
    #[serde(default)]
    pub demand: Vec<DemandPoint>,
    /// Repeat the demand profile with this period.
    #[serde(default, with = "humantime_serde")]
    pub repeat: Option<Duration>,
    /// The GPU falls off the bus at this simulated time.
    #[serde(default, with = "humantime_serde")]
    pub lost_at: Option<Duration>,
    /// ... and comes back at this one.
    #[serde(default, with = "humantime_serde")]
    pub recover_at: Option<Duration>,
    /// The lost window (`lost_at` to `recover_at`) repeats with this period:
    /// a GPU that falls off the bus again and again.
    #[serde(default, with = "humantime_serde")]
    pub lost_every: Option<Duration>,
    /// When it comes back (`recover_at`), the GPU reports this default power
    /// limit (W) instead of its preset's, as a board reset into another
    /// power profile would; clamped to the preset's range.
    #[serde(default)]
    pub recover_power_default_watts: Option<f64>,
    /// The driver resets the power limit to default at this time (as a driver
    /// reload would).
    #[serde(default, with = "humantime_serde")]
    pub limit_reset_at: Option<Duration>,
    /// Reads hang from `read_hang_at` for `read_hang_for` (simulated time).
    #[serde(default, with = "humantime_serde")]
    pub read_hang_at: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub read_hang_for: Option<Duration>,
    /// Writes started from `write_hang_at` for `write_hang_for` (simulated
    /// time) hang until that window ends, then take effect: a write that
    /// outlives gpuwatch's write timeout and lands late.
    #[serde(default, with = "humantime_serde")]
    pub write_hang_at: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub write_hang_for: Option<Duration>,
    /// Every write fails with this error.
    #[serde(default)]
    pub write_error: Option<SimWriteError>,
    /// XID errors to raise.
    #[serde(default)]
    pub xid: Vec<SimXid>,
    /// Override the preset: can the power limit be set?
    #[serde(default)]
    pub power_limit_settable: Option<bool>,
    /// Override the preset: can graphics clocks be locked?
    #[serde(default)]
    pub clocks_lockable: Option<bool>,
    /// Processes on the GPU, with who owns them (the simulator's stand-in
    /// for `/proc` and the cgroup tree). Without any, a busy GPU shows one
    /// anonymous process, as before.
    #[serde(default)]
    pub processes: Vec<SimProcess>,
    /// Kubernetes allocations of this GPU (or its MIG instances) beyond the
    /// ones its pod processes imply: a pod allocated a GPU it does not use
    /// yet is "allocated but idle".
    #[serde(default)]
    pub allocations: Vec<SimAllocation>,
    /// MIG mode and instances (H100 and A100 presets only).
    #[serde(default)]
    pub mig: Option<SimMig>,
}

string_enum! {
    /// What a simulated process uses the GPU for.
    #[derive(Default)]
    pub enum SimProcessKind {
        #[default]
        Compute = "compute",
        Graphics = "graphics",
        ComputeAndGraphics = "compute_and_graphics",
    }
}

string_enum! {
    /// The container runtime a simulated container runs under.
    pub enum SimRuntime {
        Containerd = "containerd",
        CriO = "cri-o",
        Docker = "docker",
        Podman = "podman",
    }
}

/// One simulated process and who owns it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimProcess {
    pub pid: u32,
    /// `comm`; "python3" when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// The command line (shown only as `[attribution] command_lines` says).
    #[serde(default)]
    pub command_line: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    /// GPU memory it holds; absent: the driver does not say.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Its weight in the GPU's busy time: the GPU's utilisation is shared
    /// among its processes in proportion (1 when absent).
    #[serde(default)]
    pub sm_share: Option<f64>,
    /// Encoder and decoder use, percent.
    #[serde(default)]
    pub encoder_pct: Option<u32>,
    #[serde(default)]
    pub decoder_pct: Option<u32>,
    #[serde(default)]
    pub kind: SimProcessKind,
    /// Runs from this simulated time (from the start when absent) ...
    #[serde(default, with = "humantime_serde")]
    pub from: Option<Duration>,
    /// ... until this one (for ever when absent).
    #[serde(default, with = "humantime_serde")]
    pub until: Option<Duration>,
    /// The MIG instance it runs in: an index into `mig.instances`.
    #[serde(default)]
    pub mig_instance: Option<usize>,
    /// A container id (hex, made up from the pod when absent and a pod is
    /// given).
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(default)]
    pub runtime: Option<SimRuntime>,
    /// Kubernetes names: all three or none.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub pod: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
    /// A Slurm job id and step.
    #[serde(default)]
    pub slurm_job: Option<String>,
    #[serde(default)]
    pub slurm_step: Option<String>,
    /// A systemd unit.
    #[serde(default)]
    pub unit: Option<String>,
}

/// A simulated kubelet allocation.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimAllocation {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The MIG instance allocated (an index into `mig.instances`); the whole
    /// GPU when absent.
    #[serde(default)]
    pub mig_instance: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub from: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub until: Option<Duration>,
}

/// A simulated GPU's MIG configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimMig {
    /// MIG mode at start.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Instance profiles at start, e.g. `["3g.40gb", "2g.20gb", "1g.10gb"]`.
    #[serde(default)]
    pub instances: Vec<String>,
    /// Reconfigurations while running.
    #[serde(default)]
    pub changes: Vec<SimMigChange>,
}

/// A MIG reconfiguration at a simulated time.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimMigChange {
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// The mode from then on (unchanged when absent).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The instances from then on.
    #[serde(default)]
    pub instances: Vec<String>,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// The thermal governor.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Run the governor at all.
    pub enabled: bool,
    /// Target temperature for every GPU. Default: each GPU's slowdown
    /// temperature minus `threshold_margin_c`.
    pub threshold_c: Option<u32>,
    /// Margin below the slowdown temperature for the derived threshold.
    pub threshold_margin_c: u32,
    /// Below threshold - hysteresis the governor gives power back.
    pub hysteresis_c: u32,
    /// Decide and record, never write.
    pub dry_run: bool,
    /// Where desired state and the event log live. Default:
    /// `$STATE_DIRECTORY` (systemd), else /var/lib/gpuwatch; with the
    /// simulator, a per-user directory.
    pub state_dir: Option<PathBuf>,
    /// Lowest power limit the governor sets, in watts. Default: each GPU's
    /// minimum power limit. Raised to that minimum when set below it.
    pub floor_watts: Option<f64>,
    /// Minimum time between two limit writes to one GPU.
    #[serde(with = "humantime_serde")]
    pub min_write_interval: Duration,
    /// Smallest limit change worth a write.
    pub min_step_watts: f64,
    /// Per-GPU overrides.
    pub gpus: Vec<GpuOverride>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold_c: None,
            threshold_margin_c: 6,
            hysteresis_c: 3,
            dry_run: false,
            state_dir: None,
            floor_watts: None,
            min_write_interval: Duration::from_secs(1),
            min_step_watts: 5.0,
            gpus: Vec::new(),
        }
    }
}

/// Governor settings for one GPU, chosen by index or UUID.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuOverride {
    pub index: Option<u32>,
    pub uuid: Option<String>,
    pub enabled: Option<bool>,
    pub threshold_c: Option<u32>,
    pub hysteresis_c: Option<u32>,
    pub dry_run: Option<bool>,
    pub floor_watts: Option<f64>,
}

/// The event log.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events kept (in memory and on disk) for WatchEvents replays.
    pub retain: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self { retain: 10_000 }
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: "info", "debug", "gpuwatch=debug,tonic=info", ...
    pub level: String,
    /// "text" or "json".
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

string_enum! {
    /// Log line format.
    #[derive(Default)]
    pub enum LogFormat {
        #[default]
        Text = "text",
        Json = "json",
    }
}

/// Values from command-line flags; `None` leaves the lower layers alone.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    /// `Some(None)` turns the HTTP listener off.
    pub http_listen: Option<Option<SocketAddr>>,
    pub simulate: bool,
    pub state_dir: Option<PathBuf>,
    pub sampler_interval: Option<Duration>,
    pub dry_run: bool,
    pub log_level: Option<String>,
    pub metrics_profile: Option<MetricsProfile>,
}

string_enum! {
    /// What a caller may do: `read` (ListDevices, GetSnapshot, Watch,
    /// WatchEvents, GetPolicy, PickGpus, ListLeases), `lease` (also
    /// LeaseGpus, RenewLease, ReleaseLease) or `control` (everything, also
    /// SetPowerLimit, ResetClocks, SetThreshold).
    pub enum RoleName {
        Read = "read",
        Lease = "lease",
        Control = "control",
    }
}

/// A named bearer token. The name is the actor in audit events.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub role: RoleName,
    /// The secret (at least 16 characters).
    pub token: String,
}

/// Who may call what.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Named tokens. Prefer `token_file`, readable only by the daemon, so
    /// secrets stay out of the main config.
    pub tokens: Vec<TokenConfig>,
    /// A TOML file of `[[tokens]]` tables (name, role, token).
    pub token_file: Option<PathBuf>,
    /// Allow reads without a token on a listener that is not loopback.
    /// Without this (and without tokens) reads are open only on loopback.
    pub allow_unauthenticated_reads: bool,
    /// Role of a client that presents a certificate signed by
    /// `tls.client_ca_file` but no token; the certificate's subject is the
    /// actor. Absent: a certificate identifies but grants `read` only.
    pub mtls_role: Option<RoleName>,
    /// Serve `/metrics` without a token even when the HTTP data paths need
    /// one (a scraper on a trusted network). Default: `/metrics` is a read
    /// like `/api/*` (Prometheus sends `authorization: Bearer`).
    pub open_metrics: bool,
}

/// TLS for the gRPC listener (rustls, ring provider).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Server certificate chain (PEM). With `key_file`, the listener speaks
    /// TLS only.
    pub cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// CA (PEM) that signs client certificates: enables mutual TLS.
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: refuse clients without a certificate (default)
    /// or let them in to authenticate with a token instead.
    pub require_client_cert: Option<bool>,
    /// Serve the HTTP listener (/metrics, dashboard, /api, /healthz) over
    /// TLS too, with the same `cert_file` and `key_file` (no client
    /// certificates on HTTP: tokens authenticate there).
    pub http: bool,
}

/// Bounds on what clients may ask for.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Watch and WatchEvents streams open at once, server-wide.
    pub max_streams: usize,
    /// Streams open at once on one connection.
    pub max_streams_per_connection: usize,
    /// Largest request message accepted, in bytes.
    pub max_request_bytes: usize,
    /// HTTP connections open at once; at the cap a new one replaces the
    /// oldest idle one, or is closed when all are serving.
    pub http_max_connections: usize,
    /// How long an HTTP client may take to send a request's headers (and
    /// an idle keep-alive connection may stay open).
    #[serde(with = "humantime_serde")]
    pub http_header_timeout: Duration,
    /// Largest HTTP request head accepted, in bytes (its buffer's bound).
    pub http_max_header_bytes: usize,
    /// How long an HTTP response (the SSE stream included) may make no
    /// progress writing to a client before the connection is dropped.
    #[serde(with = "humantime_serde")]
    pub http_write_timeout: Duration,
    /// gRPC connections open at once; at the cap a new one replaces the
    /// oldest one with no request in flight, or is closed.
    pub grpc_max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_streams: 20_000,
            max_streams_per_connection: 4_096,
            max_request_bytes: 64 * 1024,
            http_max_connections: 512,
            http_header_timeout: Duration::from_secs(10),
            http_max_header_bytes: 16 * 1024,
            http_write_timeout: Duration::from_secs(15),
            grpc_max_connections: 8192,
        }
    }
}

/// Top-level sections; environment variables are only read for these, so an
/// unrelated `GPUWATCH_TOKEN` (a client setting) does not upset the daemon.
pub const SECTIONS: &[&str] = &[
    "server",
    "sampler",
    "backend",
    "simulator",
    "controller",
    "events",
    "log",
    "auth",
    "tls",
    "limits",
    "attribution",
    "history",
    "metrics",
];

/// Loads the configuration: defaults < `file` < `env` < `overrides`, then
/// validates it.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::Load(format!(
                "config file {} does not exist or is not a file",
                path.display()
            )));
        }
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    let env_prefix = format!("{ENV_PREFIX}_");
    let env: HashMap<String, String> = env
        .into_iter()
        .filter(|(key, _)| {
            key.strip_prefix(&env_prefix)
                .and_then(|rest| rest.split_once("__"))
                .is_some_and(|(section, _)| SECTIONS.contains(&section.to_lowercase().as_str()))
        })
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(env)),
    );
    let mut cfg: Config = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::Load(tidy_key_paths(e.to_string())))?;
    apply(&mut cfg, overrides);
    validate(&cfg)?;
    Ok(cfg)
}

fn apply(cfg: &mut Config, o: &Overrides) {
    if let Some(listen) = o.listen {
        cfg.server.listen = listen;
    }
    if let Some(http) = o.http_listen {
        cfg.server.http_listen = http;
    }
    if o.simulate {
        cfg.backend.kind = BackendKind::Simulator;
    }
    if let Some(dir) = &o.state_dir {
        cfg.controller.state_dir = Some(dir.clone());
    }
    if let Some(interval) = o.sampler_interval {
        cfg.sampler.interval = interval;
    }
    if o.dry_run {
        cfg.controller.dry_run = true;
    }
    if let Some(level) = &o.log_level {
        cfg.log.level = level.clone();
    }
    if let Some(profile) = o.metrics_profile {
        cfg.metrics.profile = profile;
    }
}

const MIN_INTERVAL: Duration = Duration::from_millis(10);
const MAX_INTERVAL: Duration = Duration::from_secs(60);

fn check_range<T: PartialOrd + std::fmt::Debug>(
    key: &str,
    value: T,
    min: T,
    max: T,
    show: impl Fn(&T) -> String,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!(
                "{} is out of range; allowed: {} to {}",
                show(&value),
                show(&min),
                show(&max)
            ),
        ));
    }
    Ok(())
}

fn dur(d: &Duration) -> String {
    humantime::format_duration(*d).to_string()
}

/// Checks ranges and cross-field rules the types cannot express.
pub fn validate(cfg: &Config) -> Result<(), ConfigError> {
    let s = &cfg.sampler;
    check_range(
        "sampler.interval",
        s.interval,
        MIN_INTERVAL,
        MAX_INTERVAL,
        dur,
    )?;
    check_range(
        "sampler.slow_interval",
        s.slow_interval,
        s.interval,
        Duration::from_secs(3600),
        dur,
    )?;
    check_range("sampler.history", s.history, 1, 1_000_000, |v| {
        v.to_string()
    })?;
    if let Some(t) = s.read_timeout {
        check_range(
            "sampler.read_timeout",
            t,
            Duration::from_millis(1),
            s.interval,
            dur,
        )?;
    }
    check_range(
        "sampler.lost_probe_interval",
        s.lost_probe_interval,
        s.interval,
        Duration::from_secs(600),
        dur,
    )?;
    check_range(
        "server.shutdown_grace",
        cfg.server.shutdown_grace,
        Duration::ZERO,
        Duration::from_secs(300),
        dur,
    )?;
    check_range("events.retain", cfg.events.retain, 100, 10_000_000, |v| {
        v.to_string()
    })?;
    crate::history::validate(&cfg.history).map_err(|(key, message)| invalid(key, message))?;
    validate_controller(&cfg.controller)?;
    if let Some(sim) = &cfg.simulator {
        validate_simulator(sim)?;
    }
    validate_auth(&cfg.auth)?;
    validate_tls(&cfg.tls)?;
    let a = &cfg.attribution;
    check_range(
        "attribution.command_line_max_bytes",
        a.command_line_max_bytes,
        16,
        65_536,
        |v| v.to_string(),
    )?;
    check_range(
        "attribution.pod_resources_timeout",
        a.pod_resources_timeout,
        Duration::from_millis(10),
        Duration::from_secs(60),
        dur,
    )?;
    let leases = &cfg.leases;
    check_range(
        "leases.max_per_caller",
        leases.max_per_caller,
        1,
        4096,
        |v| v.to_string(),
    )?;
    check_range(
        "leases.max_ttl",
        leases.max_ttl,
        Duration::from_secs(1),
        Duration::from_secs(7 * 24 * 3600),
        dur,
    )?;
    check_range(
        "leases.default_ttl",
        leases.default_ttl,
        Duration::from_secs(1),
        leases.max_ttl,
        dur,
    )?;
    let l = &cfg.limits;
    check_range("limits.max_streams", l.max_streams, 1, 1_000_000, |v| {
        v.to_string()
    })?;
    check_range(
        "limits.max_streams_per_connection",
        l.max_streams_per_connection,
        1,
        100_000,
        |v| v.to_string(),
    )?;
    check_range(
        "limits.max_request_bytes",
        l.max_request_bytes,
        1024,
        16 * 1024 * 1024,
        |v| v.to_string(),
    )?;
    check_range(
        "limits.http_max_connections",
        l.http_max_connections,
        1,
        65_536,
        |v| v.to_string(),
    )?;
    check_range(
        "limits.http_header_timeout",
        l.http_header_timeout,
        Duration::from_millis(100),
        Duration::from_secs(300),
        dur,
    )?;
    check_range(
        "limits.http_max_header_bytes",
        l.http_max_header_bytes,
        8 * 1024,
        1024 * 1024,
        |v| v.to_string(),
    )?;
    check_range(
        "limits.http_write_timeout",
        l.http_write_timeout,
        Duration::from_millis(100),
        Duration::from_secs(600),
        dur,
    )?;
    check_range(
        "limits.grpc_max_connections",
        l.grpc_max_connections,
        16,
        1_000_000,
        |v| v.to_string(),
    )?;
    if cfg.tls.http && cfg.server.http_listen.is_none() {
        return Err(invalid(
            "tls.http",
            "needs the HTTP listener (server.http_listen is \"off\")",
        ));
    }
    if cfg.log.level.trim().is_empty() {
        return Err(invalid(
            "log.level",
            "must not be empty; e.g. \"info\" or \"gpuwatch=debug\"",
        ));
    }
    Ok(())
}

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

fn validate_auth(a: &AuthConfig) -> Result<(), ConfigError> {
    // The token file itself is read (and checked) when the daemon starts and
    // by --check-config: see `tokens`.
    check_tokens("auth.tokens", &a.tokens)
}

/// Every configured token: `[auth] tokens` plus the token file's, checked
/// together (names and secrets unique).
pub fn tokens(a: &AuthConfig) -> Result<Vec<TokenConfig>, ConfigError> {
    let mut all = a.tokens.clone();
    if let Some(path) = &a.token_file {
        let from_file = load_token_file(path)?;
        check_tokens(&format!("auth.token_file ({})", path.display()), &from_file)?;
        all.extend(from_file);
    }
    check_tokens("auth", &all)?;
    Ok(all)
}

fn check_tokens(key: &str, tokens: &[TokenConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    let mut secrets = std::collections::HashSet::new();
    for (i, t) in tokens.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let name_ok = !t.name.is_empty()
            && t.name.len() <= 64
            && t.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
        if !name_ok {
            return Err(invalid(
                format!("{at}.name"),
                format!(
                    "\"{}\" is not a valid name; use 1-64 letters, digits, '.', '_', '-' or '@'",
                    t.name
                ),
            ));
        }
        if !names.insert(t.name.clone()) {
            return Err(invalid(
                format!("{at}.name"),
                format!("\"{}\" is used twice", t.name),
            ));
        }
        if t.token.chars().count() < MIN_TOKEN_LEN
            || t.token.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                format!("{at}.token"),
                format!(
                    "must be at least {MIN_TOKEN_LEN} characters without spaces (e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        if !secrets.insert(t.token.clone()) {
            return Err(invalid(
                format!("{at}.token"),
                "the same secret is used by two tokens",
            ));
        }
    }
    Ok(())
}

/// Refuses a token file that anyone but its owner may read or write (like
/// ssh with a private key): its secrets grant control of the GPUs.
#[cfg(unix)]
fn check_token_file_mode(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        invalid(
            "auth.token_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(invalid(
            "auth.token_file",
            format!(
                "{} has mode {mode:04o}: its tokens are open to other users; \
                 make it readable by the daemon only (chmod 600 {})",
                path.display(),
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_token_file_mode(_path: &Path) -> Result<(), ConfigError> {
    Ok(())
}

/// Reads a token file: `[[tokens]]` tables with name, role and token. The
/// file must be readable by its owner only (mode 0600 or 0400).
pub fn load_token_file(path: &Path) -> Result<Vec<TokenConfig>, ConfigError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TokenFile {
        #[serde(default)]
        tokens: Vec<TokenConfig>,
    }
    check_token_file_mode(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            "auth.token_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let file: TokenFile = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| {
            invalid(
                "auth.token_file",
                format!("{}: {}", path.display(), tidy_key_paths(e.to_string())),
            )
        })?;
    Ok(file.tokens)
}

fn validate_tls(t: &TlsConfig) -> Result<(), ConfigError> {
    match (&t.cert_file, &t.key_file) {
        (Some(_), None) => return Err(invalid("tls.key_file", "is required with tls.cert_file")),
        (None, Some(_)) => return Err(invalid("tls.cert_file", "is required with tls.key_file")),
        _ => {}
    }
    if t.client_ca_file.is_some() && t.cert_file.is_none() {
        return Err(invalid(
            "tls.client_ca_file",
            "mutual TLS needs the server's own tls.cert_file and tls.key_file",
        ));
    }
    if t.require_client_cert.is_some() && t.client_ca_file.is_none() {
        return Err(invalid(
            "tls.require_client_cert",
            "needs tls.client_ca_file",
        ));
    }
    if t.http && t.cert_file.is_none() {
        return Err(invalid(
            "tls.http",
            "TLS on the HTTP listener needs tls.cert_file and tls.key_file",
        ));
    }
    Ok(())
}

/// Absolute bounds for governor thresholds; per-GPU bounds (below the
/// slowdown temperature) are checked once the GPUs are known.
pub const THRESHOLD_MIN_C: u32 = 30;
pub const THRESHOLD_MAX_C: u32 = 120;
pub const HYSTERESIS_MIN_C: u32 = 1;
pub const HYSTERESIS_MAX_C: u32 = 20;

fn validate_controller(c: &ControllerConfig) -> Result<(), ConfigError> {
    let num = |v: &u32| v.to_string();
    if let Some(t) = c.threshold_c {
        check_range(
            "controller.threshold_c",
            t,
            THRESHOLD_MIN_C,
            THRESHOLD_MAX_C,
            num,
        )?;
    }
    check_range(
        "controller.threshold_margin_c",
        c.threshold_margin_c,
        1,
        30,
        num,
    )?;
    check_range(
        "controller.hysteresis_c",
        c.hysteresis_c,
        HYSTERESIS_MIN_C,
        HYSTERESIS_MAX_C,
        num,
    )?;
    check_range(
        "controller.min_write_interval",
        c.min_write_interval,
        Duration::from_millis(100),
        Duration::from_secs(60),
        dur,
    )?;
    if !(c.min_step_watts.is_finite() && (1.0..=100.0).contains(&c.min_step_watts)) {
        return Err(invalid(
            "controller.min_step_watts",
            format!("{} is out of range; allowed: 1 to 100", c.min_step_watts),
        ));
    }
    if let Some(f) = c.floor_watts {
        check_floor("controller.floor_watts", f)?;
    }
    for (i, o) in c.gpus.iter().enumerate() {
        let key = |k: &str| format!("controller.gpus[{i}].{k}");
        match (&o.index, &o.uuid) {
            (None, None) => {
                return Err(invalid(
                    format!("controller.gpus[{i}]"),
                    "names no GPU; set `index` or `uuid`",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("controller.gpus[{i}]"),
                    "sets both `index` and `uuid`; set one",
                ));
            }
            _ => {}
        }
        if let Some(t) = o.threshold_c {
            check_range(
                &key("threshold_c"),
                t,
                THRESHOLD_MIN_C,
                THRESHOLD_MAX_C,
                num,
            )?;
        }
        if let Some(h) = o.hysteresis_c {
            check_range(
                &key("hysteresis_c"),
                h,
                HYSTERESIS_MIN_C,
                HYSTERESIS_MAX_C,
                num,
            )?;
        }
        if let Some(f) = o.floor_watts {
            check_floor(&key("floor_watts"), f)?;
        }
    }
    Ok(())
}

fn check_floor(key: &str, watts: f64) -> Result<(), ConfigError> {
    if !(watts.is_finite() && (1.0..=10_000.0).contains(&watts)) {
        return Err(invalid(
            key,
            format!(
                "{watts} is out of range; allowed: 1 to 10000 W (and at least the GPU's minimum limit)"
            ),
        ));
    }
    Ok(())
}

/// Most simulated GPUs one daemon accepts.
pub const MAX_SIM_GPUS: u32 = 64;

fn validate_simulator(sim: &SimulatorConfig) -> Result<(), ConfigError> {
    if !(sim.speed.is_finite() && (0.01..=1000.0).contains(&sim.speed)) {
        return Err(invalid(
            "simulator.speed",
            format!("{} is out of range; allowed: 0.01 to 1000", sim.speed),
        ));
    }
    let total: u32 = sim.gpus.iter().map(|g| g.count).sum();
    if total > MAX_SIM_GPUS {
        return Err(invalid(
            "simulator.gpus",
            format!("{total} GPUs in all; allowed: at most {MAX_SIM_GPUS}"),
        ));
    }
    for (i, g) in sim.gpus.iter().enumerate() {
        let key = |k: &str| format!("simulator.gpus[{i}].{k}");
        if g.count == 0 {
            return Err(invalid(key("count"), "must be at least 1"));
        }
        if let Some(a) = g.ambient_c
            && !(a.is_finite() && (-20.0..=60.0).contains(&a))
        {
            return Err(invalid(
                key("ambient_c"),
                format!("{a} is out of range; allowed: -20 to 60"),
            ));
        }
        if let Some(t) = g.time_constant {
            check_range(
                &key("time_constant"),
                t,
                Duration::from_millis(100),
                Duration::from_secs(3600),
                dur,
            )?;
        }
        if let Some(t) = g.sensor_lag {
            check_range(
                &key("sensor_lag"),
                t,
                Duration::ZERO,
                Duration::from_secs(60),
                dur,
            )?;
        }
        if let Some(r) = g.thermal_resistance_c_per_w
            && !(r.is_finite() && (0.001..=2.0).contains(&r))
        {
            return Err(invalid(
                key("thermal_resistance_c_per_w"),
                format!("{r} is out of range; allowed: 0.001 to 2"),
            ));
        }
        let mut last = None;
        for (j, p) in g.demand.iter().enumerate() {
            if !(p.watts.is_finite() && (0.0..=5000.0).contains(&p.watts)) {
                return Err(invalid(
                    format!("simulator.gpus[{i}].demand[{j}].watts"),
                    format!("{} is out of range; allowed: 0 to 5000", p.watts),
                ));
            }
            if last.is_some_and(|l| p.at <= l) {
                return Err(invalid(
                    format!("simulator.gpus[{i}].demand[{j}].at"),
                    "demand points must be in increasing time order",
                ));
            }
            last = Some(p.at);
        }
        if let Some(r) = g.repeat {
            if r.is_zero() {
                return Err(invalid(key("repeat"), "must be longer than zero"));
            }
            if last.is_some_and(|l| l >= r) {
                return Err(invalid(
                    key("repeat"),
                    "must be longer than the last demand point's `at`",
                ));
            }
        }
        if let (Some(lost), Some(back)) = (g.lost_at, g.recover_at)
            && back <= lost
        {
            return Err(invalid(key("recover_at"), "must be after `lost_at`"));
        }
        if g.recover_at.is_some() && g.lost_at.is_none() {
            return Err(invalid(key("recover_at"), "needs `lost_at`"));
        }
        if let Some(every) = g.lost_every {
            match (g.lost_at, g.recover_at) {
                (Some(lost), Some(back)) if every > back - lost => {}
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        key("lost_every"),
                        "must be longer than the lost window (`recover_at` - `lost_at`)",
                    ));
                }
                _ => {
                    return Err(invalid(
                        key("lost_every"),
                        "needs `lost_at` and `recover_at`",
                    ));
                }
            }
        }
        if let Some(w) = g.recover_power_default_watts {
            if g.recover_at.is_none() {
                return Err(invalid(
                    key("recover_power_default_watts"),
                    "needs `recover_at`",
                ));
            }
            if !w.is_finite() || w <= 0.0 {
                return Err(invalid(
                    key("recover_power_default_watts"),
                    "must be a positive number of watts",
                ));
            }
        }
        if g.read_hang_at.is_some() != g.read_hang_for.is_some() {
            return Err(invalid(
                key("read_hang_at"),
                "`read_hang_at` and `read_hang_for` go together",
            ));
        }
        if g.write_hang_at.is_some() != g.write_hang_for.is_some() {
            return Err(invalid(
                key("write_hang_at"),
                "`write_hang_at` and `write_hang_for` go together",
            ));
        }
        if g.write_hang_for.is_some_and(|d| d.is_zero()) {
            return Err(invalid(key("write_hang_for"), "must be longer than zero"));
        }
        crate::backend::sim::workload::check(i, g).map_err(|(k, m)| invalid(k, m))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(toml.as_bytes()).expect("write");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        load(Some(f.path()), env, &Overrides::default())
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = load(None, Vec::new(), &Overrides::default()).expect("defaults");
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.server.listen.port(), DEFAULT_GRPC_PORT);
        assert!(cfg.server.listen.ip().is_loopback());
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_open_to_other_users_is_refused_naming_the_file_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.toml");
        std::fs::write(
            &path,
            "[[tokens]]\nname = \"ops\"\nrole = \"control\"\ntoken = \"0123456789abcdef0123\"\n",
        )
        .expect("write");
        let auth = AuthConfig {
            token_file: Some(path.clone()),
            ..AuthConfig::default()
        };
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = tokens(&auth).expect_err("a token file others can read is refused");
            let text = err.to_string();
            assert!(text.contains("tokens.toml"), "names the file: {text}");
            assert!(
                text.contains(&format!("{mode:04o}")),
                "names the mode: {text}"
            );
            assert!(text.contains("auth.token_file"), "{text}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            assert_eq!(tokens(&auth).expect("owner-only is fine").len(), 1);
        }
    }

    #[test]
    fn file_then_env_then_flags() {
        let cfg = load_str(
            "[sampler]\ninterval = \"200ms\"\nhistory = 50\n",
            &[("GPUWATCH_SAMPLER__INTERVAL", "250ms")],
        )
        .expect("valid");
        assert_eq!(cfg.sampler.interval, Duration::from_millis(250));
        assert_eq!(cfg.sampler.history, 50);

        let mut f = tempfile::NamedTempFile::new().expect("temp");
        f.write_all(b"[sampler]\ninterval = \"200ms\"\n")
            .expect("write");
        let o = Overrides {
            sampler_interval: Some(Duration::from_millis(300)),
            ..Overrides::default()
        };
        let env = vec![("GPUWATCH_SAMPLER__INTERVAL".to_owned(), "250ms".to_owned())];
        let cfg = load(Some(f.path()), env, &o).expect("valid");
        assert_eq!(cfg.sampler.interval, Duration::from_millis(300));
    }

    #[test]
    fn metrics_profile_defaults_to_native_and_a_bad_one_names_the_allowed() {
        assert_eq!(
            load_str("", &[]).expect("defaults").metrics.profile,
            MetricsProfile::Native
        );
        let cfg = load_str("[metrics]\nprofile = \"dcgm-exporter\"\n", &[]).expect("valid");
        assert_eq!(cfg.metrics.profile, MetricsProfile::DcgmExporter);
        let cfg = load_str("", &[("GPUWATCH_METRICS__PROFILE", "both")]).expect("env");
        assert_eq!(cfg.metrics.profile, MetricsProfile::Both);
        let msg = load_str("[metrics]\nprofile = \"dcgm\"\n", &[])
            .expect_err("bad profile")
            .to_string();
        assert!(
            msg.contains("\"dcgm\"") && msg.contains("native, dcgm-exporter, both"),
            "{msg}"
        );
        let msg = MetricsProfile::parse("prom").expect_err("bad flag");
        assert!(msg.contains("native, dcgm-exporter, both"), "{msg}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_str("[sampler]\nintervall = \"1s\"\n", &[]).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("intervall"), "{msg}");
        assert!(msg.contains("interval"), "{msg}");
    }

    #[test]
    fn unknown_section_is_named() {
        let msg = load_str("[smapler]\ninterval = \"1s\"\n", &[])
            .expect_err("unknown section")
            .to_string();
        assert!(msg.contains("smapler"), "{msg}");
    }

    #[test]
    fn bad_duration_names_key() {
        let msg = load_str("[sampler]\ninterval = \"fast\"\n", &[])
            .expect_err("bad duration")
            .to_string();
        assert!(msg.contains("sampler.interval"), "{msg}");
    }

    #[test]
    fn out_of_range_interval_names_range() {
        let msg = load_str("[sampler]\ninterval = \"1ms\"\n", &[])
            .expect_err("too fast")
            .to_string();
        assert!(
            msg.contains("sampler.interval") && msg.contains("10ms"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let msg = load_str("[[simulator.gpus]]\npreset = \"h200\"\n", &[])
            .expect_err("bad preset")
            .to_string();
        assert!(
            msg.contains("h200") && msg.contains("h100-sxm") && msg.contains("laptop"),
            "{msg}"
        );
    }

    #[test]
    fn simulator_section_from_the_issue_parses() {
        let cfg = load_str(
            r#"
[simulator]
speed = 10.0
[[simulator.gpus]]
preset = "h100-sxm"
ambient_c = 30.0
time_constant = "10s"
demand = [ { at = "0s", watts = 650 }, { at = "120s", watts = 150 } ]
lost_at = "300s"
"#,
            &[],
        )
        .expect("valid");
        let sim = cfg.simulator.expect("simulator section");
        assert_eq!(sim.speed, 10.0);
        assert_eq!(sim.gpus[0].preset, PresetKey::H100Sxm);
        assert_eq!(sim.gpus[0].demand[1].at, Duration::from_secs(120));
        assert_eq!(sim.gpus[0].lost_at, Some(Duration::from_secs(300)));
    }

    #[test]
    fn simulated_write_hangs_repeated_losses_and_new_defaults_are_checked() {
        let gpu = |keys: &str| {
            format!("[simulator]\n[[simulator.gpus]]\npreset = \"h100-sxm\"\n{keys}\n")
        };
        let ok = load_str(
            &gpu("write_hang_at = \"5s\"\nwrite_hang_for = \"20s\"\nlost_at = \"30s\"\nrecover_at = \"40s\"\nlost_every = \"60s\"\nrecover_power_default_watts = 600"),
            &[],
        )
        .expect("valid");
        let g = &ok.simulator.expect("simulator").gpus[0];
        assert_eq!(g.write_hang_for, Some(Duration::from_secs(20)));
        assert_eq!(g.lost_every, Some(Duration::from_secs(60)));
        for (keys, names) in [
            ("write_hang_at = \"5s\"", "write_hang_at"),
            (
                "write_hang_at = \"5s\"\nwrite_hang_for = \"0s\"",
                "write_hang_for",
            ),
            ("lost_every = \"60s\"", "lost_every"),
            (
                "lost_at = \"30s\"\nrecover_at = \"40s\"\nlost_every = \"5s\"",
                "lost_every",
            ),
            (
                "recover_power_default_watts = 600",
                "recover_power_default_watts",
            ),
            (
                "lost_at = \"30s\"\nrecover_at = \"40s\"\nrecover_power_default_watts = -1",
                "recover_power_default_watts",
            ),
        ] {
            let msg = load_str(&gpu(keys), &[]).expect_err(keys).to_string();
            assert!(msg.contains(names), "{keys}: {msg}");
        }
    }

    #[test]
    fn unrelated_env_vars_are_ignored_but_typos_in_sections_are_not() {
        load_str(
            "",
            &[("GPUWATCH_TOKEN", "x"), ("GPUWATCH_HOSTS_FILE", "/h")],
        )
        .expect("ignored");
        let msg = load_str("", &[("GPUWATCH_SAMPLER__INTERVL", "1s")])
            .expect_err("typo")
            .to_string();
        assert!(msg.contains("intervl"), "{msg}");
    }

    #[test]
    fn override_needs_exactly_one_gpu_name() {
        let msg = load_str("[[controller.gpus]]\nthreshold_c = 70\n", &[])
            .expect_err("no gpu")
            .to_string();
        assert!(msg.contains("controller.gpus[0]"), "{msg}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = load(
            Some(Path::new("/nonexistent/gpuwatch.toml")),
            Vec::new(),
            &Overrides::default(),
        )
        .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/gpuwatch.toml"));
    }
}
