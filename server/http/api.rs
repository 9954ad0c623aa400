//! The dashboard's data: a JSON snapshot (`/api/v1/dashboard`) and a live
//! server-sent-events stream (`/api/v1/stream`) that starts with the same
//! snapshot and continues with frames, events and policy changes.
//!
//! The shapes here are made for drawing, not for automation (the gRPC API
//! is the contract for programs): units live in the names (`_c`, `_w`,
//! `_ms`), enums are snake_case words, and a field a GPU does not report is
//! absent (or `null` inside the history columns), never 0. Everything comes
//! from the hub and the event log; the stream subscribes to both under
//! their locks, so the snapshot and the live messages after it have no gap
//! and no overlap.

use crate::api::names;
use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    Json,
    extract::{Query, State},
    http::StatusCode,
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    api::{
        self, DeviceInfo, EventKind, GovernorMode, GovernorState, GpuHealth, GpuPolicy, GpuSample,
        Severity, ThresholdSource, event::Change,
    },
    http::App,
    throttle,
    tick::TickFrame,
};

/// Dashboard streams allowed open at once; more get 503.
pub const MAX_STREAMS: usize = 64;
/// Recent events a snapshot carries.
pub const SNAPSHOT_EVENTS: u64 = 200;
/// Longest stream interval accepted.
pub const MAX_INTERVAL_MS: u64 = 60_000;
/// Messages buffered for a stream client before the stream waits for it
/// (and, if it stays slow, loses frames, reported with a `gap` message).
const STREAM_BUFFER: usize = 64;

/// The dashboard's starting point: identity, policies, history, events.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub hostname: String,
    pub version: &'static str,
    /// The daemon's clock when this was made (Unix ms), so a page can
    /// measure the age of readings without trusting the browser's clock.
    pub server_time_ms: u64,
    pub started_ms: u64,
    pub sampler_interval_ms: u64,
    /// The interval the stream delivers frames at.
    pub stream_interval_ms: u64,
    /// How many frames the hub's history holds (the chart's initial window).
    pub history_frames: usize,
    /// Seq of the newest frame in `history` (0 before the first tick).
    pub latest_seq: u64,
    pub gpus: Vec<GpuView>,
    /// The node power budget (W) and what the GPUs count against it now,
    /// when one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_budget_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_budget_counted_w: Option<f64>,
    /// Per GPU, columns over the history window, oldest first.
    pub history: Vec<SeriesView>,
    /// The newest frame.
    pub latest: Option<FrameView>,
    /// Recent events, oldest first.
    pub events: Vec<EventView>,
}

/// One GPU's identity, limits and governor policy.
#[derive(Debug, Serialize)]
pub struct GpuView {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_min_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_max_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_default_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slowdown_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_operating_c: Option<u32>,
    pub power_limit_settable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyView>,
}

/// The governor's policy and state for one GPU.
#[derive(Debug, Serialize)]
pub struct PolicyView {
    pub mode: String,
    pub state: String,
    pub dry_run: bool,
    pub threshold_c: u32,
    pub threshold_source: String,
    pub hysteresis_c: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_ceiling_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_limit_w: Option<f64>,
    /// This GPU's share of the node power budget, when one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_share_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_cap_mhz: Option<u32>,
    pub mode_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_action: Option<String>,
}

/// One GPU's history as columns (one entry per frame).
#[derive(Debug, Serialize, Default)]
pub struct SeriesView {
    pub index: u32,
    pub t_ms: Vec<u64>,
    pub temperature_c: Vec<Option<u32>>,
    pub power_draw_w: Vec<Option<f64>>,
    pub power_limit_w: Vec<Option<f64>>,
}

/// One sampler tick, for the charts and the live numbers.
#[derive(Debug, Serialize)]
pub struct FrameView {
    pub seq: u64,
    pub t_ms: u64,
    pub gpus: Vec<PointView>,
}

/// One GPU's reading in a frame.
#[derive(Debug, Serialize)]
pub struct PointView {
    pub index: u32,
    pub health: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub age_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_draw_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_limit_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforced_power_limit_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_gpu_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fan_speed_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graphics_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    pub governor_state: String,
    /// Active throttle reasons by name (empty when none, or not reported).
    pub throttle_reasons: Vec<&'static str>,
    /// Who is on the GPU; absent until its processes were first read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<UsersView>,
}

/// Who is on one GPU, for its card: owners of its processes (those
/// outside any MIG instance), its MIG instances with theirs, and the
/// containers allocated it (or an instance) that run nothing. No command
/// lines: the card has no room for them and they carry secrets.
#[derive(Debug, Serialize, PartialEq)]
pub struct UsersView {
    /// Processes on the GPU, MIG instances included.
    pub processes: usize,
    pub owners: Vec<OwnerView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mig: Vec<MigView>,
    /// Allocated to a container that runs nothing on it: `ns/pod/container`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub idle: Vec<String>,
}

/// One owner's processes on a device.
#[derive(Debug, Serialize, PartialEq)]
pub struct OwnerView {
    /// `ns/pod/container`, `slurm:JOB.STEP`, a container's short id, a
    /// systemd unit, or (unattributed) `user: name` / the process name.
    pub owner: String,
    /// `pod`, `slurm`, `container`, `unit` or `process`.
    pub kind: &'static str,
    pub processes: usize,
    /// Distinct process names.
    pub names: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// One MIG instance and who is on it.
#[derive(Debug, Serialize, PartialEq)]
pub struct MigView {
    pub uuid: String,
    pub profile: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    pub owners: Vec<OwnerView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub idle: Vec<String>,
}

/// One event, in words.
#[derive(Debug, Serialize)]
pub struct EventView {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: String,
    pub severity: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_uuid: Option<String>,
    pub actor_kind: String,
    pub actor: String,
    pub reason: String,
    /// What changed, e.g. "700 W -> 640 W".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xid: Option<u64>,
}

/// A message the stream could not deliver.
#[derive(Debug, Serialize)]
pub struct GapView {
    /// "frames" or "events".
    pub what: &'static str,
    pub missed: u64,
}

fn watts(mw: u32) -> f64 {
    f64::from(mw) / 1000.0
}

fn unix_ms(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map_or(0, |t| {
        let ms = t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000);
        u64::try_from(ms).unwrap_or(0)
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

fn health_word(health: i32) -> String {
    names::name_of::<GpuHealth>(health)
}

fn state_word(state: i32) -> String {
    names::name_of::<GovernorState>(state)
}

pub fn policy_view(p: &GpuPolicy) -> PolicyView {
    PolicyView {
        mode: names::name_of::<GovernorMode>(p.mode),
        state: state_word(p.state),
        dry_run: p.dry_run,
        threshold_c: p.threshold_c,
        threshold_source: names::name_of::<ThresholdSource>(p.threshold_source),
        hysteresis_c: p.hysteresis_c,
        floor_w: p.floor_mw.map(watts),
        ceiling_w: p.ceiling_mw.map(watts),
        operator_ceiling_w: p.operator_ceiling_mw.map(watts),
        current_limit_w: p.current_limit_mw.map(watts),
        budget_share_w: p.budget_share_mw.map(watts),
        clock_cap_mhz: p.clock_cap_mhz,
        mode_reason: p.mode_reason.clone(),
        last_action: p.last_action.as_ref().map(|a| a.description.clone()),
    }
}

pub fn gpu_views(devices: &[DeviceInfo], policies: &[GpuPolicy]) -> Vec<GpuView> {
    devices
        .iter()
        .map(|d| {
            let limits = d.power_limits.as_ref();
            GpuView {
                index: d.index,
                uuid: d.uuid.clone(),
                name: d.name.clone(),
                pci_bus_id: d.pci_bus_id.clone(),
                power_min_w: limits.and_then(|l| l.min_mw).map(watts),
                power_max_w: limits.and_then(|l| l.max_mw).map(watts),
                power_default_w: limits.and_then(|l| l.default_mw).map(watts),
                slowdown_c: d.slowdown_temperature_c,
                shutdown_c: d.shutdown_temperature_c,
                max_operating_c: d.max_operating_temperature_c,
                power_limit_settable: d
                    .capabilities
                    .as_ref()
                    .is_some_and(|c| c.power_limit_settable),
                policy: policies
                    .iter()
                    .find(|p| p.index == d.index)
                    .map(policy_view),
            }
        })
        .collect()
}

/// How many hex digits of a container id the card shows.
const SHORT_CONTAINER_ID: usize = 12;

/// A process's owner in words, and its kind.
fn owner_words(p: &api::GpuProcess) -> (String, &'static str) {
    let a = p.attribution.as_ref();
    if let Some(pod) = a.and_then(|a| a.pod.as_ref()) {
        return (pod_words(pod), "pod");
    }
    if let Some(job) = a.and_then(|a| a.slurm.as_ref()) {
        let text = match &job.step {
            Some(step) => format!("slurm:{}.{step}", job.job_id),
            None => format!("slurm:{}", job.job_id),
        };
        return (text, "slurm");
    }
    if let Some(id) = a.and_then(|a| a.container_id.as_deref()).filter(|c| !c.is_empty()) {
        return (id.chars().take(SHORT_CONTAINER_ID).collect(), "container");
    }
    if let Some(unit) = a.and_then(|a| a.systemd_unit.as_deref()).filter(|u| !u.is_empty()) {
        return (unit.to_owned(), "unit");
    }
    let text = match (&p.user, &p.name) {
        (Some(u), Some(n)) => format!("{u}: {n}"),
        (None, Some(n)) => n.clone(),
        (Some(u), None) => format!("{u}: pid {}", p.pid),
        (None, None) => format!("pid {}", p.pid),
    };
    (text, "process")
}

fn pod_words(p: &api::PodRef) -> String {
    format!("{}/{}/{}", p.namespace, p.pod, p.container)
}

/// The owners of `processes`, in order of first appearance.
fn owners<'a>(processes: impl Iterator<Item = &'a api::GpuProcess>) -> Vec<OwnerView> {
    let mut out: Vec<OwnerView> = Vec::new();
    for p in processes {
        let (owner, kind) = owner_words(p);
        let i = match out.iter().position(|o| o.owner == owner) {
            Some(i) => i,
            None => {
                out.push(OwnerView {
                    owner,
                    kind,
                    processes: 0,
                    names: Vec::new(),
                    memory_bytes: None,
                });
                out.len() - 1
            }
        };
        let o = &mut out[i];
        o.processes += 1;
        if let Some(name) = &p.name
            && !o.names.contains(name)
        {
            o.names.push(name.clone());
        }
        if let Some(b) = p.used_memory_bytes {
            o.memory_bytes = Some(o.memory_bytes.unwrap_or(0) + b);
        }
    }
    out
}

/// Who is on the GPU, from the slow reading the sample carries.
pub fn users_view(x: &GpuSample) -> Option<UsersView> {
    x.processes_time?;
    let on = |device: &str, p: &&api::GpuProcess| {
        p.mig_uuid
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(device))
    };
    let idle_on = |device: &str| -> Vec<String> {
        x.allocations
            .iter()
            .filter(|a| a.idle && a.device_ids.iter().any(|d| d.eq_ignore_ascii_case(device)))
            .filter_map(|a| a.pod.as_ref().map(pod_words))
            .collect()
    };
    let mig = x
        .mig_instances
        .iter()
        .map(|m| MigView {
            uuid: m.uuid.clone(),
            profile: m.profile.clone(),
            memory_used_bytes: m.memory_used_bytes,
            memory_total_bytes: m.memory_total_bytes,
            owners: owners(x.processes.iter().filter(|p| on(&m.uuid, p))),
            idle: idle_on(&m.uuid),
        })
        .collect();
    let in_mig = |p: &&api::GpuProcess| x.mig_instances.iter().any(|m| on(&m.uuid, p));
    Some(UsersView {
        processes: x.processes.len(),
        owners: owners(x.processes.iter().filter(|p| !in_mig(p))),
        mig,
        idle: idle_on(&x.uuid),
    })
}

pub fn point_view(x: &GpuSample) -> PointView {
    PointView {
        index: x.index,
        health: health_word(x.health),
        error: x.error.clone(),
        age_ms: x.age_ms,
        temperature_c: x.temperature_c,
        memory_temperature_c: x.memory_temperature_c,
        power_draw_w: x.power_draw_mw.map(watts),
        power_limit_w: x.power_limit_mw.map(watts),
        enforced_power_limit_w: x.enforced_power_limit_mw.map(watts),
        utilization_gpu_pct: x.utilization_gpu_pct,
        fan_speed_pct: x.fan_speed_pct,
        graphics_clock_mhz: x.graphics_clock_mhz,
        memory_used_bytes: x.memory_used_bytes,
        memory_total_bytes: x.memory_total_bytes,
        governor_state: state_word(x.governor_state),
        throttle_reasons: x
            .throttle_reasons_mask
            .map(|bits| throttle::decode(bits).map(|s| s.name).collect())
            .unwrap_or_default(),
        users: users_view(x),
    }
}

pub fn frame_view(frame: &api::Frame) -> FrameView {
    FrameView {
        seq: frame.seq,
        t_ms: unix_ms(frame.time.as_ref()),
        gpus: frame.samples.iter().map(point_view).collect(),
    }
}

/// Columns per GPU over `frames` (oldest first), for the GPUs in `devices`.
pub fn series<'a>(
    devices: &[DeviceInfo],
    frames: impl IntoIterator<Item = &'a api::Frame>,
) -> Vec<SeriesView> {
    let mut out: Vec<SeriesView> = devices
        .iter()
        .map(|d| SeriesView {
            index: d.index,
            ..SeriesView::default()
        })
        .collect();
    for frame in frames {
        let t_ms = unix_ms(frame.time.as_ref());
        for s in &mut out {
            let sample = frame.samples.iter().find(|x| x.index == s.index);
            s.t_ms.push(t_ms);
            s.temperature_c.push(sample.and_then(|x| x.temperature_c));
            s.power_draw_w
                .push(sample.and_then(|x| x.power_draw_mw).map(watts));
            s.power_limit_w
                .push(sample.and_then(|x| x.power_limit_mw).map(watts));
        }
    }
    out
}

fn change_words(change: &Change) -> Option<String> {
    let w = |mw: Option<u32>| mw.map_or("-".to_owned(), |mw| format!("{} W", mw / 1000));
    let mhz = |v: Option<u32>| v.map_or("unlocked".to_owned(), |v| format!("{v} MHz"));
    let c = |v: Option<u32>| v.map_or("-".to_owned(), |v| format!("{v} °C"));
    Some(match change {
        Change::PowerLimit(p) => format!("{} -> {}", w(p.before_mw), w(p.after_mw)),
        Change::ClockLock(l) => format!("{} -> {}", mhz(l.before_max_mhz), mhz(l.after_max_mhz)),
        Change::Threshold(t) => format!("{} -> {}", c(t.before_c), c(t.after_c)),
        Change::Budget(b) => {
            let budget = |v: Option<f64>| v.map_or("none".to_owned(), |v| format!("{v:.0} W"));
            if b.before_watts == b.after_watts {
                b.shares
                    .iter()
                    .map(|s| format!("GPU {} {} -> {}", s.index, w(s.before_mw), w(s.after_mw)))
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                format!("budget {} -> {}", budget(b.before_watts), budget(b.after_watts))
            }
        }
    })
}

pub fn event_view(e: &api::Event) -> EventView {
    let actor = e.actor.as_ref();
    EventView {
        seq: e.seq,
        time_ms: unix_ms(e.time.as_ref()),
        kind: names::name_of::<EventKind>(e.kind),
        severity: names::name_of::<Severity>(e.severity),
        gpu_index: e.gpu_index,
        gpu_uuid: e.gpu_uuid.clone(),
        actor_kind: actor.map_or_else(
            || "unspecified".to_owned(),
            |a| names::name_of::<api::ActorKind>(a.kind),
        ),
        actor: actor.map(|a| a.name.clone()).unwrap_or_default(),
        reason: e.reason.clone(),
        change: e.change.as_ref().and_then(change_words),
        xid: e.xid,
    }
}

/// The snapshot, from a hub subscription's replay and an event replay.
fn snapshot(
    app: &App,
    history: &[Arc<TickFrame>],
    events: &[Arc<api::Event>],
    stream_interval: Duration,
) -> Snapshot {
    let hub = &app.state.hub;
    let devices = hub.devices();
    let policies = hub.policies();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Snapshot {
        hostname: app.state.hostname.clone(),
        version: env!("CARGO_PKG_VERSION"),
        server_time_ms: now_ms(),
        started_ms: hub
            .started()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
        sampler_interval_ms: ms(hub.sampler_interval()),
        stream_interval_ms: ms(stream_interval),
        history_frames: hub.history_capacity(),
        latest_seq: history.last().map_or(0, |f| f.seq()),
        gpus: gpu_views(&devices, &policies),
        power_budget_w: hub.power_budget().map(|b| b.watts),
        power_budget_counted_w: hub.power_budget().map(|b| b.counted_mw as f64 / 1000.0),
        history: series(&devices, history.iter().map(|t| &**t.fast())),
        latest: history.last().map(|f| frame_view(&hub.whole(f))),
        events: events.iter().map(|e| event_view(e)).collect(),
    }
}

/// `GET /api/v1/dashboard`: the snapshot as JSON.
pub(crate) async fn dashboard_json(State(app): State<App>) -> Json<Snapshot> {
    let frames = app.state.hub.subscribe(Some(0)).replay;
    let since = app
        .state
        .events
        .latest_seq()
        .saturating_sub(SNAPSHOT_EVENTS);
    let events = app.state.events.subscribe(Some(since)).replay;
    let interval = app.state.hub.sampler_interval();
    Json(snapshot(&app, &frames, &events, interval))
}

/// Query of `/api/v1/stream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// How often to send a frame; 0 or absent: every sampler tick.
    pub interval_ms: Option<u64>,
}

/// Holds one of the [`MAX_STREAMS`] stream slots while a stream is open.
struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `GET /api/v1/stream`: server-sent events.
///
/// Messages (the SSE `event:` names): `snapshot` first (a [`Snapshot`]),
/// then `frame` ([`FrameView`], one per interval, SSE id = seq), `event`
/// ([`EventView`]), `gpus` (`[GpuView]`, when identities or policies
/// change) and `gap` ([`GapView`], when this client fell behind). The
/// stream ends when the daemon stops; a browser's EventSource reconnects
/// and gets a fresh snapshot.
pub(crate) async fn stream(State(app): State<App>, Query(query): Query<StreamQuery>) -> Response {
    let sampler = app
        .state
        .hub
        .sampler_interval()
        .max(Duration::from_millis(1));
    let sampler_ms = u64::try_from(sampler.as_millis()).unwrap_or(1).max(1);
    let requested = query.interval_ms.unwrap_or(0);
    if requested != 0 && !(sampler_ms..=MAX_INTERVAL_MS).contains(&requested) {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "interval_ms must be 0 (every sampler tick) or between {sampler_ms} and {MAX_INTERVAL_MS}; got {requested}\n"
            ),
        )
            .into_response();
    }
    let stride = (requested.max(sampler_ms) + sampler_ms / 2) / sampler_ms;
    let stride = stride.max(1);
    let Some(slot) = StreamSlot::take(&app.stream_count) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many dashboard streams open (at most {MAX_STREAMS}); try again later\n"),
        )
            .into_response();
    };

    let mut frames = app.state.hub.subscribe(Some(0));
    let since = app
        .state
        .events
        .latest_seq()
        .saturating_sub(SNAPSHOT_EVENTS);
    let mut events = app.state.events.subscribe(Some(since));
    let first = snapshot(
        &app,
        &frames.replay,
        &events.replay,
        sampler * u32::try_from(stride).unwrap_or(1),
    );
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(STREAM_BUFFER);
    let shutdown = app.shutdown.clone();
    let hub = app.state.hub.clone();
    let write_timeout = app.state.write_timeout;
    tokio::spawn(async move {
        let _slot = slot;
        let Ok(first) = SseEvent::default()
            .event("snapshot")
            .retry(Duration::from_secs(2))
            .json_data(&first)
        else {
            return;
        };
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        let mut next_due = frames.replay.last().map_or(0, |f| f.seq() + stride);
        let mut devices = hub.devices();
        let mut policies = hub.policies();
        loop {
            let message = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = tx.closed() => break,
                frame = frames.live.recv() => match frame {
                    Ok(frame) => {
                        let (d, p) = (hub.devices(), hub.policies());
                        if !Arc::ptr_eq(&d, &devices) || !Arc::ptr_eq(&p, &policies) {
                            devices = d;
                            policies = p;
                            let gpus = SseEvent::default()
                                .event("gpus")
                                .json_data(gpu_views(&devices, &policies));
                            if let Ok(gpus) = gpus
                                && tx.send(Ok(gpus)).await.is_err()
                            {
                                break;
                            }
                        }
                        if frame.seq() < next_due {
                            continue;
                        }
                        next_due = frame.seq() + stride;
                        SseEvent::default()
                            .event("frame")
                            .id(frame.seq().to_string())
                            .json_data(frame_view(&hub.whole(&frame)))
                    }
                    Err(RecvError::Lagged(missed)) => SseEvent::default()
                        .event("gap")
                        .json_data(GapView { what: "frames", missed }),
                    Err(RecvError::Closed) => break,
                },
                event = events.live.recv() => match event {
                    Ok(event) => SseEvent::default().event("event").json_data(event_view(&event)),
                    Err(RecvError::Lagged(missed)) => SseEvent::default()
                        .event("gap")
                        .json_data(GapView { what: "events", missed }),
                    Err(RecvError::Closed) => break,
                },
            };
            let Ok(message) = message else { continue };
            // A reader that takes nothing for the write timeout is gone:
            // drop its stream (and its slot) rather than hold them forever.
            match tokio::time::timeout(write_timeout, tx.send(Ok(message))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
    });
    (
        // Reverse proxies (nginx) must not buffer a live stream.
        [("x-accel-buffering", "no")],
        Sse::new(ReceiverStream::new(rx))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PowerLimitChange, ThresholdChange};

    #[test]
    fn stream_slots_are_bounded_and_given_back() {
        let count = Arc::new(AtomicUsize::new(0));
        let slots: Vec<_> = (0..MAX_STREAMS)
            .map(|_| StreamSlot::take(&count).expect("a free slot"))
            .collect();
        assert!(StreamSlot::take(&count).is_none(), "one too many");
        drop(slots);
        assert_eq!(count.load(Ordering::Acquire), 0);
        assert!(StreamSlot::take(&count).is_some());
    }

    #[test]
    fn changes_read_as_before_and_after() {
        let limit = Change::PowerLimit(PowerLimitChange {
            before_mw: Some(700_000),
            after_mw: Some(640_000),
        });
        assert_eq!(change_words(&limit).as_deref(), Some("700 W -> 640 W"));
        let threshold = Change::Threshold(ThresholdChange {
            before_c: None,
            after_c: Some(80),
            ..ThresholdChange::default()
        });
        assert_eq!(change_words(&threshold).as_deref(), Some("- -> 80 °C"));
    }

    #[test]
    fn users_are_grouped_by_owner_and_absent_before_the_first_read() {
        let process = |pid: u32, name: &str, attribution: Option<api::Attribution>| api::GpuProcess {
            pid,
            name: Some(name.into()),
            user: Some("alice".into()),
            used_memory_bytes: Some(1 << 30),
            attribution,
            ..api::GpuProcess::default()
        };
        let unit = api::Attribution {
            systemd_unit: Some("render.service".into()),
            ..api::Attribution::default()
        };
        let docker = api::Attribution {
            container_id: Some("abcdef0123456789abcdef".into()),
            ..api::Attribution::default()
        };
        let mut sample = GpuSample {
            uuid: "GPU-1".into(),
            processes: vec![
                process(1, "blender", Some(unit.clone())),
                process(2, "blender-worker", Some(unit)),
                process(3, "ffmpeg", Some(docker)),
                process(4, "python3", None),
            ],
            allocations: vec![api::GpuAllocation {
                pod: Some(api::PodRef {
                    namespace: "ml".into(),
                    pod: "idle-0".into(),
                    container: "c".into(),
                }),
                device_ids: vec!["gpu-1".into()],
                idle: true,
                ..api::GpuAllocation::default()
            }],
            ..GpuSample::default()
        };
        assert_eq!(users_view(&sample), None, "not read yet: nothing to say");
        sample.processes_time = Some(SystemTime::now().into());
        let users = users_view(&sample).expect("read");
        assert_eq!(users.processes, 4);
        let owners: Vec<(&str, &str, usize)> = users
            .owners
            .iter()
            .map(|o| (o.owner.as_str(), o.kind, o.processes))
            .collect();
        assert_eq!(
            owners,
            [
                ("render.service", "unit", 2),
                ("abcdef012345", "container", 1),
                ("alice: python3", "process", 1)
            ]
        );
        assert_eq!(users.owners[0].names, ["blender", "blender-worker"]);
        assert_eq!(users.owners[0].memory_bytes, Some(2 << 30));
        assert_eq!(users.idle, ["ml/idle-0/c"], "device ids match in any case");
        assert!(users.mig.is_empty());
    }

    #[test]
    fn absent_fields_stay_absent_in_points_and_history() {
        let sample = GpuSample {
            index: 3,
            health: GpuHealth::Lost as i32,
            governor_state: GovernorState::Suspended as i32,
            ..GpuSample::default()
        };
        let point = point_view(&sample);
        let json = serde_json::to_value(&point).expect("a point serializes");
        assert_eq!(json["health"], "lost");
        assert_eq!(json["governor_state"], "suspended");
        assert!(json.get("temperature_c").is_none(), "{json}");
        assert!(json.get("power_limit_w").is_none(), "{json}");

        let device = DeviceInfo {
            index: 3,
            ..DeviceInfo::default()
        };
        let frame = Arc::new(api::Frame {
            seq: 9,
            time: None,
            samples: vec![sample],
        });
        let columns = series(&[device], [&*frame]);
        assert_eq!(columns[0].temperature_c, vec![None]);
        let json = serde_json::to_value(&columns[0]).expect("a series serializes");
        assert!(json["temperature_c"][0].is_null());
    }
}
