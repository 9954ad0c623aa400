//! The command line: every command, flag, environment variable and example.
//!
//! Parsing only; what each command does lives in `commands/`. Values are
//! checked here as far as they can be without a daemon (durations, GPU
//! selectors, event kinds), so a typo is a usage error (exit 2) naming what
//! is allowed.

use gpuwatch_api::names;
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use gpuwatch_api::{EventKind, GpuSelector, gpu_selector::Selector};

const HOSTS_HELP: &str = "Daemons to contact: NAME, NAME:PORT, [IPV6]:PORT, http://NAME:PORT or https://NAME:PORT (TLS). The port defaults to 9450.";

/// Watch and act on gpuwatch daemons on many hosts at once.
#[derive(Debug, Parser)]
#[command(
    name = "gpuwatch-client",
    version,
    propagate_version = true,
    after_help = "Examples:\n  \
gpuwatch-client watch node1 node2:9450           # live view of every GPU\n  \
gpuwatch-client snapshot --hosts-file fleet.txt --json | jq .temperature_c\n  \
gpuwatch-client set-power-limit node1 --gpu 0 --watts 550\n  \
gpuwatch-client events node1 --follow\n\n\
Exit status: 0 when every host answered and every action succeeded, 1 when any \
host or action failed (the rest is still printed), 2 for usage errors."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Read more hosts from FILE: one per line, `#` starts a comment.
    #[arg(long, global = true, value_name = "FILE", env = "GPUWATCH_HOSTS_FILE")]
    pub hosts_file: Option<PathBuf>,
    /// How long one host may take to connect and answer (e.g. 2s, 500ms).
    #[arg(
        long,
        global = true,
        value_name = "DURATION",
        default_value = "5s",
        env = "GPUWATCH_TIMEOUT",
        value_parser = parse_timeout
    )]
    pub timeout: Duration,
    /// Bearer token sent with every request.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "GPUWATCH_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Read the bearer token from the first line of FILE (wins over --token).
    #[arg(long, global = true, value_name = "FILE", env = "GPUWATCH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify daemons with; turns TLS on for every host.
    #[arg(long, global = true, value_name = "FILE", env = "GPUWATCH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --tls-key.
    #[arg(long, global = true, value_name = "FILE", env = "GPUWATCH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, global = true, value_name = "FILE", env = "GPUWATCH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Expect this name in the daemons' certificates instead of the host name.
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        env = "GPUWATCH_TLS_SERVER_NAME"
    )]
    pub tls_server_name: Option<String>,
    /// Every gpuwatch pod behind a Kubernetes headless Service: NAME.NAMESPACE[:PORT]
    /// stands for NAME.NAMESPACE.svc.cluster.local, expanded to all its addresses
    /// (repeat for several).
    #[arg(long, global = true, value_name = "NAME.NAMESPACE")]
    pub k8s_service: Vec<String>,
    /// Print NDJSON (one JSON object per line) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Live view of every GPU on every host.
    ///
    /// On a terminal: a table that refreshes in place, grouped by host, with
    /// each host's connection state; q or Ctrl-C quits. Otherwise (or with
    /// --json): NDJSON, one object per GPU sample, plus host state changes
    /// (connected, disconnected, reconnecting) and gaps. A host that goes
    /// down is retried with capped, jittered backoff and resumes where it
    /// stopped; samples the daemon could not replay are reported as a gap.
    #[command(after_help = "Examples:\n  \
gpuwatch-client watch node1 node2 node3\n  \
gpuwatch-client watch --hosts-file fleet.txt --interval 2s --gpu 0\n  \
gpuwatch-client watch node1 --json | jq -c 'select(.temperature_c > 80)'\n  \
gpuwatch-client watch node1 --json --duration 1m > samples.ndjson")]
    Watch(WatchArgs),
    /// One reading of every GPU on every host, all hosts at once.
    #[command(after_help = "Examples:\n  \
gpuwatch-client snapshot node1 node2\n  \
gpuwatch-client snapshot --hosts-file fleet.txt --json > now.ndjson\n  \
gpuwatch-client snapshot node1 --gpu GPU-8f7e1a2b-0000-0000-0000-000000000000")]
    Snapshot(ReadArgs),
    /// Who is using each GPU: one row per process on every host's GPUs and
    /// MIG instances (pid, user, name, owner, memory, SM %), plus one per
    /// Kubernetes container allocated a GPU it runs nothing on (<idle>).
    ///
    /// OWNER is the most specific owner the daemon's records give: the pod
    /// (namespace/pod/container), the Slurm job (slurm:JOB.STEP), the
    /// container's short id, or the systemd unit. --gpu takes MIG UUIDs
    /// too (only that instance's rows). With --json: one object per row,
    /// every attribution field typed.
    #[command(after_help = "Examples:\n  \
gpuwatch-client ps node1 node2\n  \
gpuwatch-client ps --hosts-file fleet.txt --json | jq -c 'select(.namespace == \"ml\")'\n  \
gpuwatch-client ps node1 --gpu MIG-4d2a0c1e-0000-0000-0000-000000000000\n  \
gpuwatch-client ps node1 --json | jq -c 'select(.idle)'     # allocated but idle")]
    Ps(ReadArgs),
    /// Devices, power limits, capabilities and governor policy.
    #[command(after_help = "Examples:\n  \
gpuwatch-client list node1\n  \
gpuwatch-client list --hosts-file fleet.txt --json | jq '{host, index, power_max_w}'")]
    List(ReadArgs),
    /// The event and audit log: governor and operator actions, GPU lost or
    /// recovered, hardware slowdowns, XID errors.
    ///
    /// Without --follow: every retained event (or those after --since), then
    /// exit. With --follow: keep streaming (new events only, unless --since
    /// is given), reconnecting when a host goes down.
    #[command(after_help = "Examples:\n  \
gpuwatch-client events node1\n  \
gpuwatch-client events node1 node2 --follow\n  \
gpuwatch-client events node1 --since 1200 --kind power_limit_changed --json")]
    Events(EventsArgs),
    /// Set the operator's power limit (the governor never goes above it), or
    /// go back to the device default with --default.
    #[command(after_help = "Examples:\n  \
gpuwatch-client set-power-limit node1 node2 --gpu 0 --watts 550\n  \
gpuwatch-client set-power-limit node1 --gpu all --default")]
    SetPowerLimit(SetPowerLimitArgs),
    /// Set the node power budget (host-wide watts the daemon divides among
    /// its GPUs by need), or drop it with --default.
    #[command(after_help = "Examples:\n  \
gpuwatch-client set-power-budget node1 --watts 4000\n  \
gpuwatch-client set-power-budget node1 node2 --default --json")]
    SetPowerBudget(SetPowerBudgetArgs),
    /// Reset application clocks and locked clocks (including a lock the
    /// governor holds).
    #[command(after_help = "Examples:\n  \
gpuwatch-client reset-clocks node1 --gpu all\n  \
gpuwatch-client reset-clocks node1 node2 --gpu 0,1")]
    ResetClocks(ResetClocksArgs),
    /// Set the governor's target temperature (and hysteresis), or go back to
    /// the configured one with --default.
    #[command(after_help = "Examples:\n  \
gpuwatch-client set-threshold node1 --gpu all --celsius 80\n  \
gpuwatch-client set-threshold node1 --gpu 0 --celsius 78 --hysteresis 4\n  \
gpuwatch-client set-threshold node1 --gpu 0 --default")]
    SetThreshold(SetThresholdArgs),
    /// What GPUs did over a past window, from each daemon's history store.
    ///
    /// On a terminal: per host, GPU and field the window's min, mean, max and
    /// last value and a sparkline (blank where there is no data: the daemon
    /// was down or the GPU lost). With --json: NDJSON `point`, `gap` and
    /// `event` objects.
    #[command(after_help = "Examples:\n  \
gpuwatch-client history node1 --since 1h\n  \
gpuwatch-client history node1 node2 --gpu 0 --since 24h --step 1m --field temperature_c\n  \
gpuwatch-client history node1 --since 15m --step 10s --json | jq -c 'select(.event == \"gap\")'")]
    History(HistoryArgs),
    /// Record every host's telemetry stream to a file, for `watch --replay`.
    ///
    /// The file is gzip-compressed and self-describing (it carries the
    /// contract's protobuf descriptors); it is flushed every second, so an
    /// interrupted recording still plays back.
    #[command(after_help = "Examples:\n  \
gpuwatch-client record node1 node2 --out incident.gwrec\n  \
gpuwatch-client record --hosts-file fleet.txt --interval 100ms --duration 10m -o run.gwrec\n  \
gpuwatch-client watch --replay incident.gwrec --speed 10")]
    Record(RecordArgs),
    /// Pick the best GPUs across the hosts for new work (and optionally
    /// lease them, so other schedulers' picks skip them).
    ///
    /// Every host ranks its GPUs against the criteria; the best fitting
    /// GPUs over all hosts win. Prints one `HOST CUDA_VISIBLE_DEVICES=…`
    /// line per host with picked GPUs (with --lease, followed by
    /// `GPUWATCH_LEASES=…`, the ids `release` takes), or NDJSON. Exit
    /// status 1 when fewer than --count GPUs fit, saying which criteria
    /// ruled the rest out. A lease is advisory: CUDA does not enforce it.
    #[command(after_help = "Examples:\n  \
gpuwatch-client pick node1 node2 --count 2 --min-free 20GiB\n  \
gpuwatch-client pick node1 --count 1 --max-util 10 --min-headroom 10 --lease 10m\n  \
gpuwatch-client pick --hosts-file fleet.txt --count 4 --lease 1h --json")]
    Pick(PickArgs),
    /// End leases taken with `pick --lease` (or LeaseGpus).
    #[command(after_help = "Examples:\n  \
gpuwatch-client release node1 --lease 18c2f3a9d10-1-0\n  \
gpuwatch-client release node1 node2 --lease ID1,ID2")]
    Release(ReleaseArgs),
}

#[derive(Debug, Clone, Args)]
pub struct PickArgs {
    #[command(flatten)]
    pub hosts: HostArgs,
    /// How many GPUs, over all hosts.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub count: u32,
    /// Free memory each GPU must have, e.g. 20GiB, 512MiB, 80GB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub min_free: Option<u64>,
    /// Highest GPU utilisation (%) over the window.
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_util: Option<u32>,
    /// Least thermal headroom (governor threshold - temperature), in °C.
    #[arg(long, value_name = "C", allow_hyphen_values = true)]
    pub min_headroom: Option<i32>,
    /// The window utilisation is averaged over.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub window: Duration,
    /// GPUs in MIG mode may be picked.
    #[arg(long)]
    pub allow_mig: bool,
    /// GPUs with processes (or a kubelet allocation) may be picked.
    #[arg(long)]
    pub allow_busy: bool,
    /// Only consider these GPUs (index, UUID or all; repeat or separate with commas).
    #[arg(long, value_name = "SEL", value_delimiter = ',', value_parser = parse_gpu)]
    pub gpu: Vec<GpuSel>,
    /// Lease the picked GPUs for this long (needs a token with the lease role).
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub lease: Option<Duration>,
    /// Recorded with the lease (a job id, a command).
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub purpose: String,
}

#[derive(Debug, Clone, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub hosts: HostArgs,
    /// Lease ids to end (repeat or separate with commas).
    #[arg(
        long = "lease",
        value_name = "ID",
        value_delimiter = ',',
        required = true
    )]
    pub leases: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct HostArgs {
    #[arg(value_name = "HOST", help = HOSTS_HELP)]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub hosts: HostArgs,
    /// How often each host sends a sample (at least the daemon's sampler
    /// interval, 100ms by default).
    #[arg(long, short = 'n', value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// GPUs to show: an index, a GPU or MIG UUID, or all (repeat or separate with commas).
    #[arg(long, value_name = "SEL", value_delimiter = ',', value_parser = parse_gpu)]
    pub gpu: Vec<GpuSel>,
    /// Stop after this long (default: until q, Ctrl-C or SIGTERM).
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub duration: Option<Duration>,
    /// Longest wait between reconnect attempts.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub reconnect_max: Duration,
    /// Play back a file written by `gpuwatch-client record` instead of
    /// contacting hosts (no HOST arguments then).
    #[arg(long, value_name = "FILE", conflicts_with = "hosts")]
    pub replay: Option<PathBuf>,
    /// Replay speed: 2 plays twice as fast, 0.5 at half speed (0.01 to 10000).
    #[arg(long, value_name = "N", default_value = "1", requires = "replay", value_parser = parse_speed)]
    pub speed: f64,
}

fn parse_speed(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("\"{text}\" is not a number"))?;
    if !(v.is_finite() && (0.01..=10_000.0).contains(&v)) {
        return Err(format!("{text} is out of range (0.01 to 10000)"));
    }
    Ok(v)
}

#[derive(Debug, Clone, Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub hosts: HostArgs,
    /// The file to write (gzip-compressed, self-describing; see
    /// docs/client.md).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
    /// How often each host sends a sample.
    #[arg(long, short = 'n', value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// GPUs to record: an index, a UUID, or all.
    #[arg(long, value_name = "SEL", value_delimiter = ',', value_parser = parse_gpu)]
    pub gpu: Vec<GpuSel>,
    /// Stop after this long (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub duration: Option<Duration>,
    /// Longest wait between reconnect attempts.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub hosts: HostArgs,
    /// GPUs to show: indices, UUIDs or all (default all).
    #[arg(long, value_name = "SEL", value_delimiter = ',', value_parser = parse_gpu)]
    pub gpu: Vec<GpuSel>,
    /// How far back (e.g. 15m, 1h, 24h, 7d).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_window)]
    pub since: Duration,
    /// Width of one point (e.g. 1s, 10s, 1m); default: about 1000 points.
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    pub step: Option<Duration>,
    /// Fields to show, as GpuSample names (temperature_c, power_draw_mw, ...).
    #[arg(long, value_name = "FIELD", value_delimiter = ',')]
    pub field: Vec<String>,
}

/// A history window or step: 100ms to 400 days.
fn parse_window(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("\"{text}\" is not a duration ({e}); e.g. 10s, 1h, 7d"))?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(400 * 86_400) {
        return Err(format!("\"{text}\" is out of range (100ms to 400d)"));
    }
    Ok(d)
}

#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub hosts: HostArgs,
    /// GPUs to show: an index, a GPU or MIG UUID, or all (repeat or separate with commas).
    #[arg(long, value_name = "SEL", value_delimiter = ',', value_parser = parse_gpu)]
    pub gpu: Vec<GpuSel>,
}

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub hosts: HostArgs,
    /// Keep streaming new events until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events with a larger sequence number (default: all retained;
    /// with --follow: new events only).
    #[arg(long, value_name = "SEQ")]
    pub since: Option<u64>,
    /// Only events about these GPUs (daemon-wide events always show).
    #[arg(long, value_name = "SEL", value_delimiter = ',', value_parser = parse_gpu)]
    pub gpu: Vec<GpuSel>,
    /// Only these kinds, e.g. power_limit_changed, gpu_lost (repeat or
    /// separate with commas).
    #[arg(long, value_name = "KIND", value_delimiter = ',', value_parser = parse_event_kind)]
    pub kind: Vec<EventKind>,
    /// With --follow: longest wait between reconnect attempts.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ControlTarget {
    #[command(flatten)]
    pub hosts: HostArgs,
    /// GPUs to change: an index, a UUID, or all (required; repeat or
    /// separate with commas).
    #[arg(long, value_name = "SEL", required = true, value_delimiter = ',', value_parser = parse_gpu)]
    pub gpu: Vec<GpuSel>,
}

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("limit").required(true).args(["watts", "default"])))]
pub struct SetPowerLimitArgs {
    #[command(flatten)]
    pub target: ControlTarget,
    /// New power limit in watts; must lie within each GPU's [min, max].
    #[arg(long, value_name = "W", value_parser = parse_watts)]
    pub watts: Option<f64>,
    /// Forget the operator's limit; back to the device default.
    #[arg(long)]
    pub default: bool,
}

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("budget").required(true).args(["watts", "default"])))]
pub struct SetPowerBudgetArgs {
    #[command(flatten)]
    pub hosts: HostArgs,
    /// The host-wide budget in watts; must lie within the sums of the
    /// host's GPUs' minimum and maximum power limits (the daemon checks).
    #[arg(long, value_name = "W", value_parser = parse_budget_watts)]
    pub watts: Option<f64>,
    /// Drop the budget: every GPU back to its own ceiling.
    #[arg(long)]
    pub default: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ResetClocksArgs {
    #[command(flatten)]
    pub target: ControlTarget,
}

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("threshold").required(true).args(["celsius", "default"])))]
pub struct SetThresholdArgs {
    #[command(flatten)]
    pub target: ControlTarget,
    /// New target temperature in °C (at least 30, below the GPU's slowdown
    /// temperature).
    #[arg(long, value_name = "C")]
    pub celsius: Option<u32>,
    /// Forget the operator's threshold; back to the configured or derived one.
    #[arg(long)]
    pub default: bool,
    /// New hysteresis band in °C (1-20); unchanged when absent.
    #[arg(long, value_name = "C", value_parser = clap::value_parser!(u32).range(1..=20))]
    pub hysteresis: Option<u32>,
}

/// A GPU selector as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSel {
    All,
    Index(u32),
    Uuid(String),
}

impl GpuSel {
    pub fn to_api(&self) -> GpuSelector {
        let selector = match self {
            GpuSel::All => Selector::All(true),
            GpuSel::Index(i) => Selector::Index(*i),
            GpuSel::Uuid(u) => Selector::Uuid(u.clone()),
        };
        GpuSelector {
            selector: Some(selector),
        }
    }
}

/// Selectors for a request; `all` alone stands for every GPU.
pub fn selectors(sels: &[GpuSel]) -> Vec<GpuSelector> {
    sels.iter().map(GpuSel::to_api).collect()
}

/// Read requests take "no selector" for every GPU.
pub fn read_selectors(sels: &[GpuSel]) -> Vec<GpuSelector> {
    if sels.contains(&GpuSel::All) {
        Vec::new()
    } else {
        selectors(sels)
    }
}

pub fn parse_gpu(text: &str) -> Result<GpuSel, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("all") {
        return Ok(GpuSel::All);
    }
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse()
            .map(GpuSel::Index)
            .map_err(|_| format!("GPU index {t} is too large"));
    }
    let upper = t.to_ascii_uppercase();
    if (upper.starts_with("GPU-") || upper.starts_with("MIG-")) && t.len() > 4 {
        return Ok(GpuSel::Uuid(t.to_owned()));
    }
    Err(format!(
        "\"{text}\" is not a GPU; expected an index (0, 1, ...), a UUID (GPU-... or MIG-...) or all"
    ))
}

/// A duration: "500ms", "2s", "1m", or a plain number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() && (0.0..=86_400.0).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("\"{text}\" is out of range (0 to 86400 seconds)"));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("\"{text}\" is not a duration ({e}); e.g. 500ms, 2s, 1m"))
}

/// A size in bytes: "20GiB", "512MiB", "80GB", "1.5TiB", or a plain number.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" is not a size; e.g. 20GiB, 512MiB, 80GB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "\"{text}\": unknown unit \"{other}\"; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            ));
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes > 1e18 {
        return Err(format!("\"{text}\" is too large"));
    }
    Ok(bytes as u64)
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(24 * 3600) {
        return Err(format!("\"{text}\" must be between 1ms and 24h"));
    }
    Ok(d)
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(3600) {
        return Err(format!(
            "\"{text}\" must be between 1ms and 1h (the daemon also refuses anything below its sampler interval)"
        ));
    }
    Ok(d)
}

fn parse_watts(text: &str) -> Result<f64, String> {
    let w: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("\"{text}\" is not a number of watts"))?;
    if !w.is_finite() || w <= 0.0 || w > 100_000.0 {
        return Err(format!(
            "{text} W is not a power limit; give a positive number of watts (the daemon checks each GPU's range)"
        ));
    }
    Ok(w)
}

fn parse_budget_watts(text: &str) -> Result<f64, String> {
    let w: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("\"{text}\" is not a number of watts"))?;
    if !w.is_finite() || w <= 0.0 {
        return Err(format!(
            "{text} W is not a power budget; give a positive number of watts (the daemon checks its GPUs' range)"
        ));
    }
    Ok(w)
}

fn parse_event_kind(text: &str) -> Result<EventKind, String> {
    let wanted = format!("EVENT_KIND_{}", text.trim().to_ascii_uppercase());
    match EventKind::from_str_name(&wanted) {
        Some(EventKind::Unspecified) | None => {
            let allowed: Vec<String> = (1..=64)
                .filter_map(|n| EventKind::try_from(n).ok())
                .map(|k| names::name_of::<gpuwatch_api::EventKind>(k as i32))
                .collect();
            Err(format!(
                "\"{text}\" is not an event kind; allowed: {}",
                allowed.join(", ")
            ))
        }
        Some(kind) => Ok(kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn gpu_selectors() {
        assert_eq!(parse_gpu("all"), Ok(GpuSel::All));
        assert_eq!(parse_gpu("3"), Ok(GpuSel::Index(3)));
        assert_eq!(parse_gpu("GPU-abc"), Ok(GpuSel::Uuid("GPU-abc".to_owned())));
        assert_eq!(
            parse_gpu("MIG-4d2a0c1e-0000"),
            Ok(GpuSel::Uuid("MIG-4d2a0c1e-0000".to_owned()))
        );
        let err = parse_gpu("first").expect_err("not a selector");
        assert!(err.contains("expected an index"), "{err}");
        assert!(read_selectors(&[GpuSel::Index(1), GpuSel::All]).is_empty());
    }

    #[test]
    fn durations_accept_units_and_plain_seconds() {
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert!(parse_interval("0").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn event_kinds_by_name() {
        assert_eq!(
            parse_event_kind("power_limit_changed"),
            Ok(EventKind::PowerLimitChanged)
        );
        let err = parse_event_kind("nope").expect_err("unknown kind");
        assert!(err.contains("gpu_lost"), "{err}");
    }

    #[test]
    fn control_commands_require_gpu_and_a_target() {
        assert!(Cli::try_parse_from(["c", "reset-clocks", "h"]).is_err());
        assert!(Cli::try_parse_from(["c", "set-power-limit", "h", "--gpu", "0"]).is_err());
        assert!(
            Cli::try_parse_from([
                "c",
                "set-power-limit",
                "h",
                "--gpu",
                "0",
                "--watts",
                "300",
                "--default"
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from(["c", "set-power-limit", "h", "--gpu", "0", "--watts", "-5"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["c", "set-power-limit", "h", "--gpu", "0", "--watts", "300"])
                .is_ok()
        );
        assert!(
            Cli::try_parse_from([
                "c",
                "set-threshold",
                "h",
                "--gpu",
                "0",
                "--hysteresis",
                "30",
                "--celsius",
                "80"
            ])
            .is_err()
        );
    }
}
