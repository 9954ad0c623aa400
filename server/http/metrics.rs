//! `/metrics`: the hub's latest frame, the devices, the governor's policies,
//! the event counters and the daemon's own cost, in the Prometheus formats.
//!
//! Everything comes from memory: a scrape never calls a device. The text is
//! encoded by the official client (`prometheus-client`, which writes
//! OpenMetrics 1.0) through one [`Collector`] that walks the hub, and is
//! cached per frame: frames change at most once per sampler tick, so any
//! number of scrapers in between get the same bytes for the cost of a lock.
//!
//! Two formats are served, chosen by the `Accept` header: OpenMetrics for
//! scrapers that ask for it (Prometheus does), and the classic Prometheus
//! text format 0.0.4 for everyone else (`curl`, `promtool check metrics`,
//! older agents). The classic text is derived from the OpenMetrics text by
//! [`to_prometheus_text`]; the two differ only in how counters are named in
//! `# HELP`/`# TYPE` and in the `# UNIT`/`# EOF` lines.
//!
//! A field a GPU does not report has no series at all — never a 0 — so a
//! dashboard shows "no data" rather than a false reading. Metric names and
//! the dcgm-exporter equivalents are documented in `docs/metrics.md`.

use crate::api::names;
use std::{
    fmt::{self, Write as _},
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{
    body::Bytes,
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, NoLabelSet, text},
    metrics::MetricType,
    registry::{Registry, Unit},
};

use crate::{
    api::{
        DeviceInfo, EventKind, Frame, GovernorMode, GovernorState, GpuHealth, GpuPolicy, GpuSample,
        TelemetryField,
    },
    config::MetricsProfile,
    events::EventLog,
    http::procstat,
    hub::Hub,
    throttle,
};

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A rendered body is reused for at most this long even when no new frame
/// came (a stalled sampler must not freeze the daemon's own metrics).
const MAX_CACHE_AGE: Duration = Duration::from_secs(1);

/// What a scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    pub hub: Arc<Hub>,
    pub events: Arc<EventLog>,
    pub hostname: Arc<str>,
    /// Dashboard streams open now (the HTTP side's own subscribers).
    pub dashboard_streams: Arc<AtomicUsize>,
    /// The lease book (None: no leases to show).
    pub leases: Option<Arc<crate::leases::Leases>>,
}

/// Which text format a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Prometheus,
}

impl Format {
    /// Picks the format from an `Accept` header: OpenMetrics when the client
    /// ranks it at least as high as plain text, else the classic format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let mut openmetrics_q: f32 = 0.0;
        let mut text_q: f32 = 0.0;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics_q = openmetrics_q.max(q),
                "text/plain" | "text/*" | "*/*" => text_q = text_q.max(q),
                _ => {}
            }
        }
        if openmetrics_q > 0.0 && openmetrics_q >= text_q {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
        }
    }
}

/// One rendering of the metrics, in both formats.
#[derive(Debug)]
struct Rendered {
    /// (latest frame seq, latest event seq) it was rendered from.
    key: (u64, u64),
    at: Instant,
    openmetrics: Bytes,
    /// Derived from `openmetrics` on the first request that wants it.
    prometheus: OnceLock<Bytes>,
}

/// The `/metrics` endpoint: a registry holding the hub collector, and the
/// last rendering.
#[derive(Debug)]
pub struct MetricsEndpoint {
    registry: Registry,
    sources: Sources,
    profile: MetricsProfile,
    /// The driver version, for dcgm-exporter's `DCGM_FI_DRIVER_VERSION` label.
    driver_version: Option<String>,
    cache: Mutex<Option<Arc<Rendered>>>,
    /// Length of the last rendering, so the next one allocates once.
    size_hint: AtomicUsize,
}

impl MetricsEndpoint {
    /// The native profile (the daemon's test suites build endpoints so).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub fn new(sources: Sources) -> Self {
        Self::with_profile(sources, MetricsProfile::Native, None)
    }

    /// `profile`'s families; `driver_version` labels the dcgm-exporter ones.
    pub fn with_profile(
        sources: Sources,
        profile: MetricsProfile,
        driver_version: Option<String>,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(HubCollector {
            sources: sources.clone(),
            units: Units::default(),
        }));
        Self {
            registry,
            sources,
            profile,
            driver_version,
            cache: Mutex::new(None),
            size_hint: AtomicUsize::new(16 * 1024),
        }
    }

    /// The format a scraper asking for `wanted` gets: the dcgm-exporter
    /// families exist in the classic text format only (their counters have
    /// no `_total`), so any profile with them serves that.
    pub fn format_for(&self, wanted: Format) -> Format {
        if self.profile.dcgm() {
            Format::Prometheus
        } else {
            wanted
        }
    }

    /// The dcgm-exporter families (and, for `both`, the native ones before
    /// them) in the classic text format.
    fn render_classic(&self) -> Result<String, fmt::Error> {
        let mut out = if self.profile.native() {
            to_prometheus_text(&self.render_openmetrics()?)
        } else {
            String::with_capacity(self.size_hint.load(Ordering::Relaxed) + 1024)
        };
        let frame = self.sources.hub.latest();
        let samples: &[GpuSample] = frame.as_deref().map_or(&[], |f| f.samples.as_slice());
        super::dcgm::render(
            &mut out,
            &self.sources.hub.devices(),
            samples,
            &self.sources.events.xid_tally(),
            &self.sources.hostname,
            self.driver_version.as_deref(),
        );
        if !self.profile.native() {
            self.size_hint.store(out.len(), Ordering::Relaxed);
        }
        Ok(out)
    }

    /// The metrics text in `format`, from the cache when no new frame or
    /// event came since it was rendered.
    pub fn body(&self, format: Format) -> Result<Bytes, fmt::Error> {
        let key = (
            self.sources.hub.latest().map_or(0, |f| f.seq),
            self.sources.events.latest_seq(),
        );
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let rendered = match cached {
            Some(r) if r.key == key && r.at.elapsed() < MAX_CACHE_AGE => r,
            _ => {
                // With dcgm-exporter's families the one rendering is the
                // classic text, served for either format (see format_for).
                let openmetrics = if self.profile.dcgm() {
                    self.render_classic()?
                } else {
                    self.render_openmetrics()?
                };
                let fresh = Arc::new(Rendered {
                    key,
                    at: Instant::now(),
                    openmetrics: Bytes::from(openmetrics),
                    prometheus: OnceLock::new(),
                });
                *self.cache.lock().unwrap_or_else(PoisonError::into_inner) = Some(fresh.clone());
                fresh
            }
        };
        if self.profile.dcgm() {
            return Ok(rendered.openmetrics.clone());
        }
        Ok(match format {
            Format::OpenMetrics => rendered.openmetrics.clone(),
            Format::Prometheus => rendered
                .prometheus
                .get_or_init(|| {
                    // The encoder writes UTF-8 into a String, so this holds.
                    let text = std::str::from_utf8(&rendered.openmetrics).unwrap_or_default();
                    Bytes::from(to_prometheus_text(text))
                })
                .clone(),
        })
    }

    /// Renders the OpenMetrics text now, bypassing the cache.
    pub fn render_openmetrics(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(self.size_hint.load(Ordering::Relaxed) + 4096);
        text::encode(&mut out, &self.registry)?;
        self.size_hint.store(out.len(), Ordering::Relaxed);
        Ok(out)
    }

    /// The HTTP response for a scrape with these request headers.
    pub fn respond(&self, headers: &HeaderMap) -> Response {
        let format = self.format_for(Format::negotiate(
            headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
        ));
        match self.body(format) {
            Ok(body) => (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(format.content_type()),
                    ),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                ],
                body,
            )
                .into_response(),
            Err(_) => (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "could not encode the metrics\n",
            )
                .into_response(),
        }
    }
}

/// Turns this module's OpenMetrics text into the Prometheus text format
/// 0.0.4: counter families are named with their `_total` suffix in
/// `# HELP`/`# TYPE` (as their samples are), and the `# UNIT` and `# EOF`
/// lines, which that format does not have, are dropped. Samples are
/// identical in both formats.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut held_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Written once the TYPE line says whether the name changes.
            if let Some(help) = held_help.replace(line) {
                out.push_str(help);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" && !name.ends_with("_total") {
                "_total"
            } else {
                ""
            };
            if let Some(help) = held_help.take() {
                let text = help
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.strip_prefix(name))
                    .unwrap_or("");
                let _ = writeln!(out, "# HELP {name}{suffix}{text}");
            }
            let kind = if kind == "unknown" { "untyped" } else { kind };
            let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
            continue;
        }
        if let Some(help) = held_help.take() {
            out.push_str(help);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(help) = held_help {
        out.push_str(help);
        out.push('\n');
    }
    out
}

/// Walks the hub on every encode.
#[derive(Debug)]
struct HubCollector {
    sources: Sources,
    units: Units,
}

/// The labels of every per-GPU series, spelled as dcgm-exporter spells them.
type GpuLabels<'a> = [(&'static str, &'a str); 5];
/// A per-GPU series with one more label.
type GpuLabels1<'a> = (GpuLabels<'a>, [(&'static str, &'static str); 1]);

/// Everything known about one GPU at render time.
struct Gpu<'a> {
    index: String,
    uuid: &'a str,
    model: &'a str,
    pci_bus_id: &'a str,
    device: Option<&'a DeviceInfo>,
    sample: Option<&'a GpuSample>,
    policy: Option<&'a GpuPolicy>,
}

impl<'a> Gpu<'a> {
    fn labels(&'a self, hostname: &'a str) -> GpuLabels<'a> {
        [
            ("gpu", self.index.as_str()),
            ("uuid", self.uuid),
            ("pci_bus_id", self.pci_bus_id),
            ("model_name", self.model),
            ("hostname", hostname),
        ]
    }

    fn supports(&self, field: TelemetryField) -> bool {
        self.device
            .and_then(|d| d.capabilities.as_ref())
            .is_some_and(|c| c.supported_fields.contains(&(field as i32)))
    }
}

fn watts(mw: u32) -> f64 {
    f64::from(mw) / 1000.0
}

fn hertz(mhz: u32) -> f64 {
    f64::from(mhz) * 1e6
}

fn ratio(pct: u32) -> f64 {
    f64::from(pct) / 100.0
}

fn unix_seconds(t: &prost_types::Timestamp) -> f64 {
    t.seconds as f64 + f64::from(t.nanos) / 1e9
}

/// Writes one family of gauges; nothing at all when it has no series.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(L, V)],
) -> fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in rows {
        family.encode_family(labels)?.encode_gauge(value)?;
    }
    Ok(())
}

/// Writes one family of counters; nothing at all when it has no series.
fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(L, f64)],
) -> fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in rows {
        family
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, f64, f64>(value, None)?;
    }
    Ok(())
}

/// A family without labels.
fn single_gauge<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: V,
) -> fmt::Result {
    enc.encode_descriptor(name, help, unit, MetricType::Gauge)?
        .encode_gauge(&value)
}

fn single_counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> fmt::Result {
    enc.encode_descriptor(name, help, unit, MetricType::Counter)?
        .encode_counter::<NoLabelSet, f64, f64>(&value, None)
}

/// Per-GPU rows of a field that may be absent.
fn per_gpu<'a, V>(
    gpus: &'a [Gpu<'a>],
    hostname: &'a str,
    value: impl Fn(&Gpu<'a>) -> Option<V>,
) -> Vec<(GpuLabels<'a>, V)> {
    gpus.iter()
        .filter_map(|g| value(g).map(|v| (g.labels(hostname), v)))
        .collect()
}

/// Per-GPU sample rows of a field that may be absent.
fn sampled<'a, V>(
    gpus: &'a [Gpu<'a>],
    hostname: &'a str,
    value: impl Fn(&GpuSample) -> Option<V>,
) -> Vec<(GpuLabels<'a>, V)> {
    per_gpu(gpus, hostname, |g| g.sample.and_then(&value))
}

const CLOCKS: [&str; 4] = ["graphics", "sm", "memory", "video"];

impl Collector for HubCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let s = &self.sources;
        let frame = s.hub.latest();
        let devices = s.hub.devices();
        let policies = s.hub.policies();
        let hostname: &str = &s.hostname;

        let samples: &[GpuSample] = frame.as_deref().map_or(&[], |f| f.samples.as_slice());
        let mut gpus: Vec<Gpu<'_>> = devices
            .iter()
            .map(|d| Gpu {
                index: d.index.to_string(),
                uuid: &d.uuid,
                model: &d.name,
                pci_bus_id: &d.pci_bus_id,
                device: Some(d),
                sample: samples.iter().find(|x| x.index == d.index),
                policy: policies.iter().find(|p| p.index == d.index),
            })
            .collect();
        // A sample for a GPU the device list does not know (not expected,
        // but never hidden).
        for x in samples {
            if !devices.iter().any(|d| d.index == x.index) {
                gpus.push(Gpu {
                    index: x.index.to_string(),
                    uuid: &x.uuid,
                    model: "",
                    pci_bus_id: "",
                    device: None,
                    sample: Some(x),
                    policy: policies.iter().find(|p| p.index == x.index),
                });
            }
        }
        let view = View {
            gpus: &gpus,
            hostname,
            units: &self.units,
        };
        telemetry(&mut enc, &view)?;
        workloads(&mut enc, &view)?;
        device_facts(&mut enc, &view)?;
        governor(&mut enc, &view)?;
        events(&mut enc, &s.events)?;
        xids(&mut enc, &view, &s.events)?;
        leases(&mut enc, hostname, s.leases.as_deref())?;
        power_budget(&mut enc, hostname, s.hub.power_budget(), &self.units)?;
        daemon(&mut enc, s, frame.as_deref(), &self.units)?;
        process(&mut enc, &s.hub, &self.units)
    }
}

/// What the per-GPU sections write from.
struct View<'a> {
    gpus: &'a [Gpu<'a>],
    hostname: &'a str,
    units: &'a Units,
}

/// The units families are named with (OpenMetrics `# UNIT`, and the name's
/// suffix): base units, as Prometheus asks.
#[derive(Debug)]
struct Units {
    celsius: Unit,
    watts: Unit,
    hertz: Unit,
    ratio: Unit,
    bytes: Unit,
    seconds: Unit,
    joules: Unit,
    bytes_per_second: Unit,
}

impl Default for Units {
    fn default() -> Self {
        Self {
            celsius: Unit::Celsius,
            watts: Unit::Other("watts".into()),
            hertz: Unit::Other("hertz".into()),
            ratio: Unit::Other("ratio".into()),
            bytes: Unit::Bytes,
            seconds: Unit::Seconds,
            joules: Unit::Joules,
            bytes_per_second: Unit::Other("bytes_per_second".into()),
        }
    }
}

/// Readings from the latest frame, per GPU.
fn telemetry(e: &mut DescriptorEncoder<'_>, v: &View<'_>) -> fmt::Result {
    let (gpus, h, u) = (v.gpus, v.hostname, v.units);
    let celsius = Some(&u.celsius);
    let watts_unit = Some(&u.watts);
    let hertz_unit = Some(&u.hertz);
    let ratios = Some(&u.ratio);
    let bytes = Some(&u.bytes);
    let seconds = Some(&u.seconds);
    gauges(
        e,
        "gpuwatch_temperature",
        "GPU core (die) temperature",
        celsius,
        &sampled(gpus, h, |x| x.temperature_c),
    )?;
    gauges(
        e,
        "gpuwatch_memory_temperature",
        "GPU memory (HBM) temperature",
        celsius,
        &sampled(gpus, h, |x| x.memory_temperature_c),
    )?;
    gauges(
        e,
        "gpuwatch_fan_speed",
        "Fan 0 speed as a fraction of its maximum (0-1)",
        ratios,
        &sampled(gpus, h, |x| x.fan_speed_pct.map(ratio)),
    )?;
    gauges(
        e,
        "gpuwatch_power_draw",
        "Board power draw (a one-second average on recent GPUs)",
        watts_unit,
        &sampled(gpus, h, |x| x.power_draw_mw.map(watts)),
    )?;
    gauges(
        e,
        "gpuwatch_power_limit",
        "Power management limit currently set",
        watts_unit,
        &sampled(gpus, h, |x| x.power_limit_mw.map(watts)),
    )?;
    gauges(
        e,
        "gpuwatch_enforced_power_limit",
        "Power limit the GPU actually enforces (the lowest of every active limit)",
        watts_unit,
        &sampled(gpus, h, |x| x.enforced_power_limit_mw.map(watts)),
    )?;
    counters(
        e,
        "gpuwatch_energy",
        "Energy consumed since the driver was last loaded",
        Some(&u.joules),
        &sampled(gpus, h, |x| x.energy_mj.map(|mj| mj as f64 / 1000.0)),
    )?;

    let clock_rows = |current: bool| {
        let mut rows: Vec<(GpuLabels1, f64)> = Vec::new();
        for g in gpus {
            let Some(x) = g.sample else { continue };
            let values = if current {
                [
                    x.graphics_clock_mhz,
                    x.sm_clock_mhz,
                    x.memory_clock_mhz,
                    x.video_clock_mhz,
                ]
            } else {
                [
                    x.max_graphics_clock_mhz,
                    x.max_sm_clock_mhz,
                    x.max_memory_clock_mhz,
                    x.max_video_clock_mhz,
                ]
            };
            for (clock, mhz) in CLOCKS.iter().zip(values) {
                if let Some(mhz) = mhz {
                    rows.push(((g.labels(h), [("clock", *clock)]), hertz(mhz)));
                }
            }
        }
        rows
    };
    gauges(
        e,
        "gpuwatch_clock",
        "Current clock frequency, by clock domain",
        hertz_unit,
        &clock_rows(true),
    )?;
    gauges(
        e,
        "gpuwatch_max_clock",
        "Maximum clock frequency, by clock domain",
        hertz_unit,
        &clock_rows(false),
    )?;

    gauges(
        e,
        "gpuwatch_gpu_utilization",
        "Fraction of the last sample period a kernel was running (0-1)",
        ratios,
        &sampled(gpus, h, |x| x.utilization_gpu_pct.map(ratio)),
    )?;
    gauges(
        e,
        "gpuwatch_memory_utilization",
        "Fraction of the last sample period device memory was read or written (0-1)",
        ratios,
        &sampled(gpus, h, |x| x.utilization_memory_pct.map(ratio)),
    )?;
    gauges(
        e,
        "gpuwatch_graphics_engine_active",
        "Fraction of the last slow period the graphics engine was busy (GPM, Hopper and newer)",
        ratios,
        &sampled(gpus, h, |x| x.graphics_engine_active_ratio),
    )?;
    gauges(
        e,
        "gpuwatch_tensor_active",
        "Fraction of the last slow period any tensor pipe was busy (GPM, Hopper and newer)",
        ratios,
        &sampled(gpus, h, |x| x.tensor_active_ratio),
    )?;
    gauges(
        e,
        "gpuwatch_dram_active",
        "Fraction of the last slow period the device memory interface was busy (GPM, Hopper and newer)",
        ratios,
        &sampled(gpus, h, |x| x.dram_active_ratio),
    )?;
    gauges(
        e,
        "gpuwatch_memory_used",
        "Framebuffer memory in use",
        bytes,
        &sampled(gpus, h, |x| x.memory_used_bytes),
    )?;
    gauges(
        e,
        "gpuwatch_memory_total",
        "Framebuffer memory in total",
        bytes,
        &sampled(gpus, h, |x| x.memory_total_bytes),
    )?;
    gauges(
        e,
        "gpuwatch_performance_state",
        "Performance state: 0 for P0 (maximum performance) to 15 for P15",
        None,
        &sampled(gpus, h, |x| x.performance_state),
    )?;

    let mut reasons: Vec<(GpuLabels1<'_>, u32)> = Vec::new();
    for g in gpus {
        let Some(bits) = g.sample.and_then(|x| x.throttle_reasons_mask) else {
            continue;
        };
        for spec in throttle::REASONS {
            reasons.push((
                (g.labels(h), [("reason", spec.name)]),
                u32::from(bits & spec.bit != 0),
            ));
        }
    }
    gauges(
        e,
        "gpuwatch_throttle_reason",
        "1 while this clocks-event (throttle) reason holds the clocks down, else 0",
        None,
        &reasons,
    )?;
    gauges(
        e,
        "gpuwatch_throttle_reasons_mask",
        "The raw NVML clocks-event-reasons bit mask",
        None,
        &sampled(gpus, h, |x| x.throttle_reasons_mask),
    )?;

    let ecc_rows = |volatile: bool| {
        let mut rows: Vec<(GpuLabels1, f64)> = Vec::new();
        for g in gpus {
            let Some(ecc) = g.sample.and_then(|x| x.ecc.as_ref()) else {
                continue;
            };
            let (corrected, uncorrected) = if volatile {
                (ecc.corrected_volatile, ecc.uncorrected_volatile)
            } else {
                (ecc.corrected_aggregate, ecc.uncorrected_aggregate)
            };
            for (kind, n) in [("corrected", corrected), ("uncorrected", uncorrected)] {
                if let Some(n) = n {
                    rows.push(((g.labels(h), [("error", kind)]), n as f64));
                }
            }
        }
        rows
    };
    counters(
        e,
        "gpuwatch_ecc_errors_volatile",
        "ECC errors since the last driver reload (corrected: single-bit; uncorrected: double-bit)",
        None,
        &ecc_rows(true),
    )?;
    counters(
        e,
        "gpuwatch_ecc_errors_aggregate",
        "ECC errors over the GPU's lifetime",
        None,
        &ecc_rows(false),
    )?;

    let mut pcie: Vec<(GpuLabels1<'_>, f64)> = Vec::new();
    for g in gpus {
        let Some(x) = g.sample else { continue };
        for (direction, kbps) in [("tx", x.pcie_tx_kbps), ("rx", x.pcie_rx_kbps)] {
            if let Some(kbps) = kbps {
                pcie.push((
                    (g.labels(h), [("direction", direction)]),
                    f64::from(kbps) * 1024.0,
                ));
            }
        }
    }
    gauges(
        e,
        "gpuwatch_pcie_throughput",
        "PCIe throughput (NVML's KB/s times 1024), transmitted and received",
        Some(&u.bytes_per_second),
        &pcie,
    )?;
    gauges(
        e,
        "gpuwatch_processes",
        "Compute processes running on the GPU (read on the slow cadence)",
        None,
        &per_gpu(gpus, h, |g| {
            let x = g.sample?;
            (g.supports(TelemetryField::Processes)
                && x.processes_time.is_some()
                && x.health == GpuHealth::Ok as i32)
                .then_some(x.processes.len() as u64)
        }),
    )?;
    gauges(
        e,
        "gpuwatch_reading_timestamp",
        "When the reading behind this GPU's values was taken (Unix time; for a stale GPU its last complete reading, none while lost)",
        seconds,
        &sampled(gpus, h, |x| {
            (x.health != GpuHealth::Lost as i32)
                .then(|| x.time.as_ref().map(unix_seconds))
                .flatten()
        }),
    )?;

    let mut health: Vec<(GpuLabels1<'_>, u32)> = Vec::new();
    for g in gpus {
        let Some(x) = g.sample else { continue };
        for (state, value) in [
            ("ok", GpuHealth::Ok),
            ("lost", GpuHealth::Lost),
            ("stale", GpuHealth::Stale),
            ("error", GpuHealth::Error),
        ] {
            health.push((
                (g.labels(h), [("state", state)]),
                u32::from(x.health == value as i32),
            ));
        }
    }
    gauges(
        e,
        "gpuwatch_gpu_health",
        "1 for the GPU's current health state (ok, lost, stale, error), 0 for the others",
        None,
        &health,
    )?;
    Ok(())
}

/// A per-GPU series with labels of its own (owned: ids and names).
type GpuLabelsN<'a> = (GpuLabels<'a>, Vec<(&'static str, String)>);

/// Who uses each GPU, and its MIG instances: info series to join on
/// (`* on(uuid) group_left(namespace, pod, container)`), never pod labels
/// on every reading, and never per pid. Nothing a caller without a token
/// should not see: no user names, no command lines, no pids.
fn workloads(e: &mut DescriptorEncoder<'_>, v: &View<'_>) -> fmt::Result {
    let (gpus, h, u) = (v.gpus, v.hostname, v.units);
    let mut mig_enabled = Vec::new();
    let mut allocation_info: Vec<(GpuLabelsN<'_>, u32)> = Vec::new();
    let mut allocated_idle: Vec<(GpuLabelsN<'_>, u32)> = Vec::new();
    let mut owner_info: Vec<(GpuLabelsN<'_>, u32)> = Vec::new();
    let mut mig_info: Vec<(GpuLabelsN<'_>, u32)> = Vec::new();
    let mut mig_used = Vec::new();
    let mut mig_total = Vec::new();
    let mut mig_sms = Vec::new();
    let mut mig_util = Vec::new();
    let mut mig_procs = Vec::new();
    for g in gpus {
        let Some(x) = g.sample else { continue };
        let labels = |extra: Vec<(&'static str, String)>| (g.labels(h), extra);
        if let Some(on) = x.mig_enabled {
            mig_enabled.push((g.labels(h), u32::from(on)));
        }
        // The kubelet's allocations: one series per allocated device.
        for a in &x.allocations {
            let Some(pod) = &a.pod else { continue };
            for device in &a.device_ids {
                let who = || {
                    vec![
                        ("device", device.clone()),
                        ("namespace", pod.namespace.clone()),
                        ("pod", pod.pod.clone()),
                        ("container", pod.container.clone()),
                    ]
                };
                let mut with_resource = who();
                with_resource.push(("resource", a.resource_name.clone()));
                allocation_info.push((labels(with_resource), 1));
                allocated_idle.push((labels(who()), u32::from(a.idle)));
            }
        }
        let readable = x.processes_time.is_some() && x.health == GpuHealth::Ok as i32;
        if readable {
            // Owners that are not pods (those are in the allocations), once
            // per device however many processes they run.
            let mut owners = std::collections::BTreeSet::new();
            for p in &x.processes {
                let Some(a) = &p.attribution else { continue };
                if a.pod.is_some() {
                    continue;
                }
                let owner = if let Some(job) = &a.slurm {
                    ("slurm", job.job_id.clone())
                } else if let Some(id) = a.container_id.as_ref().filter(|c| !c.is_empty()) {
                    ("container", id.clone())
                } else if let Some(unit) = a.systemd_unit.as_ref().filter(|c| !c.is_empty()) {
                    ("unit", unit.clone())
                } else {
                    continue;
                };
                let device = p.mig_uuid.clone().unwrap_or_else(|| x.uuid.clone());
                owners.insert((device, owner.0, owner.1));
            }
            for (device, kind, owner) in owners {
                owner_info.push((
                    labels(vec![
                        ("device", device),
                        ("owner_kind", kind.to_owned()),
                        ("owner", owner),
                    ]),
                    1,
                ));
            }
        }
        for m in &x.mig_instances {
            let mig = || vec![("mig_uuid", m.uuid.clone())];
            mig_info.push((
                labels(vec![
                    ("mig_uuid", m.uuid.clone()),
                    ("profile", m.profile.clone()),
                    ("gpu_instance_id", m.gpu_instance_id.to_string()),
                    ("compute_instance_id", m.compute_instance_id.to_string()),
                ]),
                1,
            ));
            if let Some(n) = m.sm_count {
                mig_sms.push((labels(mig()), n));
            }
            if let Some(b) = m.memory_total_bytes {
                mig_total.push((labels(mig()), b));
            }
            if readable {
                if let Some(b) = m.memory_used_bytes {
                    mig_used.push((labels(mig()), b));
                }
                if let Some(pct) = m.utilization_gpu_pct {
                    mig_util.push((labels(mig()), ratio(pct)));
                }
                mig_procs.push((labels(mig()), m.pids.len() as u64));
            }
        }
    }
    gauges(
        e,
        "gpuwatch_gpu_allocation_info",
        "1 per device (GPU or MIG UUID) the kubelet allocated to a container; join on uuid or device for pod labels",
        None,
        &allocation_info,
    )?;
    gauges(
        e,
        "gpuwatch_gpu_allocated_idle",
        "1 while the container allocated this device runs no process on it (allocated but idle), 0 while it does",
        None,
        &allocated_idle,
    )?;
    gauges(
        e,
        "gpuwatch_gpu_process_owner_info",
        "1 per Slurm job, container or systemd unit with processes on the device (pods: gpuwatch_gpu_allocation_info)",
        None,
        &owner_info,
    )?;
    gauges(
        e,
        "gpuwatch_gpu_mig_enabled",
        "1 when the GPU is in MIG mode, 0 when not",
        None,
        &mig_enabled,
    )?;
    gauges(
        e,
        "gpuwatch_mig_instance_info",
        "1 per MIG instance of the GPU; its profile and instance ids",
        None,
        &mig_info,
    )?;
    gauges(
        e,
        "gpuwatch_mig_instance_multiprocessors",
        "Streaming multiprocessors of the MIG instance",
        None,
        &mig_sms,
    )?;
    gauges(
        e,
        "gpuwatch_mig_instance_memory_used",
        "Memory in use in the MIG instance",
        Some(&u.bytes),
        &mig_used,
    )?;
    gauges(
        e,
        "gpuwatch_mig_instance_memory_total",
        "Memory of the MIG instance",
        Some(&u.bytes),
        &mig_total,
    )?;
    gauges(
        e,
        "gpuwatch_mig_instance_utilization",
        "Fraction of the last sample period the MIG instance was busy (0-1), where the driver reports it",
        Some(&u.ratio),
        &mig_util,
    )?;
    gauges(
        e,
        "gpuwatch_mig_instance_processes",
        "Processes running in the MIG instance (read on the slow cadence)",
        None,
        &mig_procs,
    )?;
    Ok(())
}

/// Limits and temperatures the GPU describes itself with.
fn device_facts(e: &mut DescriptorEncoder<'_>, v: &View<'_>) -> fmt::Result {
    let (gpus, h, u) = (v.gpus, v.hostname, v.units);
    let celsius = Some(&u.celsius);
    let watts_unit = Some(&u.watts);
    let limits = |f: fn(&crate::api::PowerLimits) -> Option<u32>| {
        per_gpu(gpus, h, move |g| {
            g.device?.power_limits.as_ref().and_then(f).map(watts)
        })
    };
    gauges(
        e,
        "gpuwatch_power_limit_min",
        "Lowest power limit the driver accepts",
        watts_unit,
        &limits(|p| p.min_mw),
    )?;
    gauges(
        e,
        "gpuwatch_power_limit_max",
        "Highest power limit the driver accepts",
        watts_unit,
        &limits(|p| p.max_mw),
    )?;
    gauges(
        e,
        "gpuwatch_power_limit_default",
        "The power limit the GPU boots with",
        watts_unit,
        &limits(|p| p.default_mw),
    )?;
    gauges(
        e,
        "gpuwatch_slowdown_temperature",
        "Temperature at which the hardware starts slowing itself down",
        celsius,
        &per_gpu(gpus, h, |g| g.device?.slowdown_temperature_c),
    )?;
    gauges(
        e,
        "gpuwatch_shutdown_temperature",
        "Temperature at which the hardware shuts down",
        celsius,
        &per_gpu(gpus, h, |g| g.device?.shutdown_temperature_c),
    )?;
    gauges(
        e,
        "gpuwatch_max_operating_temperature",
        "Maximum operating temperature NVIDIA specifies for the GPU core",
        celsius,
        &per_gpu(gpus, h, |g| g.device?.max_operating_temperature_c),
    )?;
    Ok(())
}

/// The thermal governor's policy and state, per GPU.
fn governor(e: &mut DescriptorEncoder<'_>, v: &View<'_>) -> fmt::Result {
    let (gpus, h, u) = (v.gpus, v.hostname, v.units);
    let celsius = Some(&u.celsius);
    let watts_unit = Some(&u.watts);
    let hertz_unit = Some(&u.hertz);
    let seconds = Some(&u.seconds);
    let mut states: Vec<(GpuLabels1<'_>, u32)> = Vec::new();
    let mut modes: Vec<(GpuLabels1<'_>, u32)> = Vec::new();
    for g in gpus {
        let Some(p) = g.policy else { continue };
        for (name, value) in GOVERNOR_STATES {
            states.push((
                (g.labels(h), [("state", name)]),
                u32::from(p.state == value as i32),
            ));
        }
        for (name, value) in GOVERNOR_MODES {
            modes.push((
                (g.labels(h), [("mode", name)]),
                u32::from(p.mode == value as i32),
            ));
        }
    }
    gauges(
        e,
        "gpuwatch_governor_state",
        "1 for what the thermal governor is doing for this GPU now, 0 for the other states",
        None,
        &states,
    )?;
    gauges(
        e,
        "gpuwatch_governor_mode",
        "1 for how the governor acts on this GPU, 0 for the other modes",
        None,
        &modes,
    )?;
    let policy = |f: fn(&GpuPolicy) -> Option<f64>| per_gpu(gpus, h, move |g| g.policy.and_then(f));
    gauges(
        e,
        "gpuwatch_governor_threshold",
        "Governor target temperature: at or above it the power limit is lowered",
        celsius,
        &policy(|p| Some(f64::from(p.threshold_c))),
    )?;
    gauges(
        e,
        "gpuwatch_governor_hysteresis",
        "Below threshold minus hysteresis the governor raises the limit back",
        celsius,
        &policy(|p| Some(f64::from(p.hysteresis_c))),
    )?;
    gauges(
        e,
        "gpuwatch_governor_power_limit",
        "Power limit currently set on the GPU, as the governor sees it",
        watts_unit,
        &policy(|p| p.current_limit_mw.map(watts)),
    )?;
    gauges(
        e,
        "gpuwatch_governor_floor",
        "Lowest power limit the governor will set",
        watts_unit,
        &policy(|p| p.floor_mw.map(watts)),
    )?;
    gauges(
        e,
        "gpuwatch_governor_ceiling",
        "Highest power limit the governor will restore (operator limit, else device default)",
        watts_unit,
        &policy(|p| p.ceiling_mw.map(watts)),
    )?;
    gauges(
        e,
        "gpuwatch_governor_operator_ceiling",
        "The operator's ceiling set through SetPowerLimit (absent when none)",
        watts_unit,
        &policy(|p| p.operator_ceiling_mw.map(watts)),
    )?;
    gauges(
        e,
        "gpuwatch_governor_budget_share",
        "This GPU's share of the node power budget, an inner limit like the operator's ceiling (absent without a budget)",
        watts_unit,
        &policy(|p| p.budget_share_mw.map(watts)),
    )?;
    gauges(
        e,
        "gpuwatch_governor_budget_counted",
        "What this GPU counts against the node power budget: the highest of its share, its limit and a write under way; its maximum when its limit cannot be set",
        watts_unit,
        &policy(|p| p.budget_counted_mw.map(watts)),
    )?;
    gauges(
        e,
        "gpuwatch_governor_clock_cap",
        "Graphics clock cap the governor holds in clock-lock mode (absent when none)",
        hertz_unit,
        &policy(|p| p.clock_cap_mhz.map(hertz)),
    )?;
    gauges(
        e,
        "gpuwatch_governor_dry_run",
        "1 when the governor decides and records but never writes",
        None,
        &policy(|p| Some(if p.dry_run { 1.0 } else { 0.0 })),
    )?;
    gauges(
        e,
        "gpuwatch_governor_last_action_timestamp",
        "When the governor last acted on this GPU (Unix time)",
        seconds,
        &policy(|p| p.last_action.as_ref()?.time.as_ref().map(unix_seconds)),
    )?;
    Ok(())
}

/// Event counters since the daemon started.
/// The live leases: which GPU is held, by whom, until when.
/// The node power budget, host-wide (absent without one).
fn power_budget(
    e: &mut DescriptorEncoder<'_>,
    hostname: &str,
    budget: Option<crate::api::PowerBudget>,
    u: &Units,
) -> fmt::Result {
    let Some(b) = budget else {
        return Ok(());
    };
    let host = [("hostname", hostname)];
    gauges(
        e,
        "gpuwatch_power_budget",
        "The node power budget (SetPowerBudget): host-wide watts the GPUs' power limits may add up to",
        Some(&u.watts),
        &[(host, b.watts)],
    )?;
    gauges(
        e,
        "gpuwatch_power_budget_counted",
        "The sum of what every GPU counts against the node power budget now",
        Some(&u.watts),
        &[(host, b.counted_mw as f64 / 1000.0)],
    )
}

fn leases(
    e: &mut DescriptorEncoder<'_>,
    hostname: &str,
    book: Option<&crate::leases::Leases>,
) -> fmt::Result {
    let live: Vec<crate::api::Lease> = book
        .map(|b| b.live().into_values().collect())
        .unwrap_or_default();
    let indices: Vec<String> = live.iter().map(|l| l.index.to_string()).collect();
    let rows = |value: &dyn Fn(&crate::api::Lease) -> f64| -> Vec<([(&str, &str); 5], f64)> {
        live.iter()
            .zip(&indices)
            .map(|(l, index)| {
                (
                    [
                        ("hostname", hostname),
                        ("gpu", index.as_str()),
                        ("uuid", l.uuid.as_str()),
                        ("holder", l.holder.as_str()),
                        ("lease", l.id.as_str()),
                    ],
                    value(l),
                )
            })
            .collect()
    };
    single_gauge(
        e,
        "gpuwatch_leases",
        "Live GPU leases on this host (LeaseGpus)",
        None,
        live.len() as i64,
    )?;
    gauges(
        e,
        "gpuwatch_gpu_leased",
        "1 for each GPU held by a live lease, labelled with its holder",
        None,
        &rows(&|_| 1.0),
    )?;
    gauges(
        e,
        "gpuwatch_gpu_lease_expiry_timestamp_seconds",
        "When the lease on this GPU expires unless renewed (Unix time)",
        None,
        &rows(&|l| l.expires.as_ref().map_or(0.0, unix_seconds)),
    )
}

fn events(e: &mut DescriptorEncoder<'_>, log: &EventLog) -> fmt::Result {
    let kinds: Vec<(String, f64)> = (1..)
        .map_while(|n| EventKind::try_from(n).ok())
        .map(|k| (names::name(k), log.count(k) as f64))
        .collect();
    let event_rows: Vec<([(&str, &str); 1], f64)> = kinds
        .iter()
        .map(|(k, n)| ([("kind", k.as_str())], *n))
        .collect();
    counters(
        e,
        "gpuwatch_events",
        "Events recorded since the daemon started, by kind",
        None,
        &event_rows,
    )?;
    single_counter(
        e,
        "gpuwatch_event_persist_failures",
        "Events that could not be written to the event log on disk",
        None,
        log.persist_failures() as f64,
    )?;
    persistence(e, log)
}

/// A GPU's labels with an XID's code, class and severity.
type XidLabels<'a> = (GpuLabels<'a>, [(&'static str, String); 3]);

/// XID errors since the daemon started, per GPU, code and class (the action
/// NVIDIA documents for the code; see `xid`).
fn xids(e: &mut DescriptorEncoder<'_>, v: &View<'_>, log: &EventLog) -> fmt::Result {
    let tally = log.xid_tally();
    let mut rows: Vec<(XidLabels<'_>, f64)> = Vec::new();
    for ((_, uuid, code), n) in &tally.counts {
        // Events name a GPU the device list knows (the sampler records them).
        let Some(g) = v.gpus.iter().find(|g| g.uuid == uuid.as_str()) else {
            continue;
        };
        let entry = crate::xid::decode(*code);
        rows.push((
            (
                g.labels(v.hostname),
                [
                    ("xid", code.to_string()),
                    ("action", entry.class()),
                    ("severity", names::name(entry.severity())),
                ],
            ),
            *n as f64,
        ));
    }
    counters(
        e,
        "gpuwatch_xid_errors",
        "XID errors reported by the driver since the daemon started, by code and by the action NVIDIA documents for it (none, restart_app, reset_gpu, reboot_node, contact_support, unknown)",
        None,
        &rows,
    )
}

/// Whether the state directory can be written (faults-state, issue 12 row 3):
/// failed writes per file since start, and whether each fails now.
fn persistence(e: &mut DescriptorEncoder<'_>, log: &EventLog) -> fmt::Result {
    let Some(stats) = log.persist_stats() else {
        return Ok(());
    };
    counters(
        e,
        "gpuwatch_persist_failures",
        "Writes to the state directory that failed since the daemon started, by file",
        None,
        &[
            ([("file", "events.log")], stats.event_failures as f64),
            ([("file", "state.json")], stats.state_failures as f64),
        ],
    )?;
    gauges(
        e,
        "gpuwatch_persist_failing",
        "1 while writing this file of the state directory fails (changes are kept in memory, not answered OK, and retried)",
        None,
        &[
            ([("file", "events.log")], i64::from(stats.events_failing)),
            ([("file", "state.json")], i64::from(stats.state_failing)),
        ],
    )
}

/// The daemon's own cost and state.
fn daemon(
    e: &mut DescriptorEncoder<'_>,
    s: &Sources,
    frame: Option<&Frame>,
    u: &Units,
) -> fmt::Result {
    let seconds = Some(&u.seconds);
    let stats = &s.hub.stats;
    let histogram = stats.sample_duration_histogram();
    e.encode_descriptor(
        "gpuwatch_sample_duration",
        "Time one sampler tick took to read every GPU",
        seconds,
        MetricType::Histogram,
    )?
    .encode_histogram::<NoLabelSet>(
        histogram.sum_s,
        histogram.count,
        &histogram.buckets,
        None,
    )?;
    single_gauge(
        e,
        "gpuwatch_last_sample_duration",
        "Time the last sampler tick took to read every GPU",
        seconds,
        stats.last_sample_duration_us.load(Ordering::Relaxed) as f64 / 1e6,
    )?;
    single_gauge(
        e,
        "gpuwatch_sampler_interval",
        "The sampler's cadence",
        seconds,
        s.hub.sampler_interval().as_secs_f64(),
    )?;
    single_gauge(
        e,
        "gpuwatch_last_frame_timestamp",
        "When the latest frame's tick started (Unix time)",
        seconds,
        frame
            .as_ref()
            .and_then(|f| f.time.as_ref())
            .map_or(0.0, unix_seconds),
    )?;
    single_counter(
        e,
        "gpuwatch_frames_published",
        "Frames (sampler ticks) published",
        None,
        stats.frames_published.load(Ordering::Relaxed) as f64,
    )?;
    single_counter(
        e,
        "gpuwatch_frames_dropped",
        "Frames not delivered to slow Watch subscribers, summed over subscribers",
        None,
        stats.frames_dropped.load(Ordering::Relaxed) as f64,
    )?;
    let subscribers = [
        (
            [("stream", "watch")],
            stats.watch_subscribers.load(Ordering::Relaxed) as u64,
        ),
        (
            [("stream", "watch_events")],
            stats.event_subscribers.load(Ordering::Relaxed) as u64,
        ),
        (
            [("stream", "dashboard")],
            s.dashboard_streams.load(Ordering::Relaxed) as u64,
        ),
    ];
    gauges(
        e,
        "gpuwatch_subscribers",
        "Streams open now: gRPC Watch, gRPC WatchEvents, and dashboard (server-sent events)",
        None,
        &subscribers,
    )?;
    gauges(
        e,
        "gpuwatch_build_info",
        "Always 1; the labels say which gpuwatch is running",
        None,
        &[([("version", env!("CARGO_PKG_VERSION"))], 1u32)],
    )?;
    Ok(())
}

/// The standard `process_*` metrics.
fn process(e: &mut DescriptorEncoder<'_>, hub: &Hub, u: &Units) -> fmt::Result {
    let seconds = Some(&u.seconds);
    let bytes = Some(&u.bytes);
    let started = hub
        .started()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    single_gauge(
        e,
        "process_start_time",
        "Start time of the process since the Unix epoch",
        seconds,
        started,
    )?;
    let process = procstat::read();
    if let Some(cpu) = process.cpu_seconds {
        single_counter(
            e,
            "process_cpu",
            "Total user and system CPU time spent",
            seconds,
            cpu,
        )?;
    }
    if let Some(rss) = process.resident_memory_bytes {
        single_gauge(
            e,
            "process_resident_memory",
            "Resident memory size",
            bytes,
            rss,
        )?;
    }
    if let Some(vsz) = process.virtual_memory_bytes {
        single_gauge(
            e,
            "process_virtual_memory",
            "Virtual memory size",
            bytes,
            vsz,
        )?;
    }
    if let Some(n) = process.open_fds {
        single_gauge(e, "process_open_fds", "Open file descriptors", None, n)?;
    }
    if let Some(n) = process.max_fds {
        single_gauge(
            e,
            "process_max_fds",
            "Maximum number of open file descriptors",
            None,
            n,
        )?;
    }
    if let Some(n) = process.threads {
        single_gauge(
            e,
            "process_threads",
            "Operating system threads in the process",
            None,
            n,
        )?;
    }
    Ok(())
}

const GOVERNOR_STATES: [(&str, GovernorState); 6] = [
    ("disabled", GovernorState::Disabled),
    ("idle", GovernorState::Idle),
    ("throttling", GovernorState::Throttling),
    ("recovering", GovernorState::Recovering),
    ("observe_only", GovernorState::ObserveOnly),
    ("suspended", GovernorState::Suspended),
];

const GOVERNOR_MODES: [(&str, GovernorMode); 4] = [
    ("power_limit", GovernorMode::PowerLimit),
    ("clock_lock", GovernorMode::ClockLock),
    ("observe_only", GovernorMode::ObserveOnly),
    ("disabled", GovernorMode::Disabled),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_and_gets_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
    }

    #[test]
    fn curl_and_clients_without_accept_get_the_classic_text_format() {
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some(
                "text/plain;version=0.0.4,application/openmetrics-text;q=0.3"
            )),
            Format::Prometheus,
            "a client that prefers plain text gets it"
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Prometheus
        );
    }

    #[test]
    fn classic_text_names_counters_with_total_and_drops_unit_and_eof() {
        let om = "# HELP a_joules Energy.\n# TYPE a_joules counter\n# UNIT a_joules joules\na_joules_total{gpu=\"0\"} 1.5\n# HELP b_celsius Temp.\n# TYPE b_celsius gauge\n# UNIT b_celsius celsius\nb_celsius 40\n# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_sum 1.0\nh_seconds_count 1\nh_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";
        let classic = to_prometheus_text(om);
        assert_eq!(
            classic,
            "# HELP a_joules_total Energy.\n# TYPE a_joules_total counter\na_joules_total{gpu=\"0\"} 1.5\n# HELP b_celsius Temp.\n# TYPE b_celsius gauge\nb_celsius 40\n# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_sum 1.0\nh_seconds_count 1\nh_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }
}
