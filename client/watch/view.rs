//! What the live terminal view shows, kept apart from the terminal: every
//! host with its connection state and every GPU with its last sample and a
//! short temperature history, and the lines that draw them.
//!
//! Pure data in, styled lines out, so it is tested without a terminal; the
//! `tui` module only owns the screen and the keyboard.

use gpuwatch_api::names;
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use gpuwatch_api::{DeviceInfo, GovernorState, GpuHealth, GpuSample};
use ratatui::{
    style::{Color, Modifier, Style},
    text::{Line, Span},
};

use crate::{hosts::HostSpec, owner, record::GapRecord, units, watch::session::Update};

/// Temperatures kept per GPU for the sparkline.
const HISTORY: usize = 16;
/// Sparkline width in cells.
const SPARK_WIDTH: usize = 12;

/// A host's connection, as shown.
#[derive(Debug, Clone, PartialEq)]
pub enum HostStatus {
    Connecting,
    Connected,
    /// Down; the next attempt is at `retry_at`.
    Reconnecting {
        error: String,
        retry_at: Instant,
        ever_connected: bool,
    },
}

#[derive(Debug, Clone)]
pub struct GpuView {
    pub index: u32,
    pub name: String,
    pub threshold_c: Option<u32>,
    pub slowdown_c: Option<u32>,
    pub sample: Option<GpuSample>,
    pub temps: VecDeque<u32>,
}

#[derive(Debug, Clone)]
pub struct HostView {
    pub label: String,
    pub status: HostStatus,
    pub interval_ms: u32,
    pub gpus: Vec<GpuView>,
    /// Gaps seen and samples they cost.
    pub gaps: u64,
    pub missed: u64,
    pub last_gap: Option<GapRecord>,
}

impl GpuView {
    /// Body lines this GPU takes: its row, and its users' line if any.
    fn rows(&self) -> usize {
        1 + usize::from(self.sample.as_ref().is_some_and(has_users))
    }
}

/// Whether a GPU's users' line has anything to say.
fn has_users(s: &GpuSample) -> bool {
    !s.processes.is_empty() || !s.mig_instances.is_empty() || s.allocations.iter().any(|a| a.idle)
}

impl HostView {
    fn gpu_mut(&mut self, index: u32) -> &mut GpuView {
        let pos = match self.gpus.binary_search_by_key(&index, |g| g.index) {
            Ok(pos) => pos,
            Err(pos) => {
                self.gpus.insert(
                    pos,
                    GpuView {
                        index,
                        name: String::new(),
                        threshold_c: None,
                        slowdown_c: None,
                        sample: None,
                        temps: VecDeque::with_capacity(HISTORY),
                    },
                );
                pos
            }
        };
        &mut self.gpus[pos]
    }

    fn learn(&mut self, d: &DeviceInfo) {
        let gpu = self.gpu_mut(d.index);
        gpu.name = d.name.clone();
        gpu.slowdown_c = d.slowdown_temperature_c;
        gpu.threshold_c = d.policy.as_ref().map(|p| p.threshold_c).filter(|t| *t > 0);
    }
}

/// Everything on screen.
#[derive(Debug, Clone)]
pub struct FleetView {
    pub hosts: Vec<HostView>,
    pub interval: Duration,
}

impl FleetView {
    pub fn new(hosts: &[HostSpec], interval: Duration) -> Self {
        Self {
            hosts: hosts
                .iter()
                .map(|h| HostView {
                    label: h.label.clone(),
                    status: HostStatus::Connecting,
                    interval_ms: 0,
                    gpus: Vec::new(),
                    gaps: 0,
                    missed: 0,
                    last_gap: None,
                })
                .collect(),
            interval,
        }
    }

    pub fn apply(&mut self, update: Update, now: Instant) {
        match update {
            Update::Connected {
                host,
                devices,
                interval_ms,
                ..
            } => {
                if let Some(h) = self.hosts.get_mut(host) {
                    h.status = HostStatus::Connected;
                    h.interval_ms = interval_ms;
                    for d in &devices {
                        h.learn(d);
                    }
                }
            }
            Update::Frame { host, frame } => {
                if let Some(h) = self.hosts.get_mut(host) {
                    for sample in frame.samples {
                        let gpu = h.gpu_mut(sample.index);
                        if let Some(t) = sample.temperature_c {
                            if gpu.temps.len() == HISTORY {
                                gpu.temps.pop_front();
                            }
                            gpu.temps.push_back(t);
                        }
                        gpu.sample = Some(sample);
                    }
                }
            }
            Update::Gap { host, gap } => {
                if let Some(h) = self.hosts.get_mut(host) {
                    h.gaps += 1;
                    h.missed += gap.missed;
                    h.last_gap = Some(gap);
                }
            }
            Update::Disconnected { host, error } => {
                if let Some(h) = self.hosts.get_mut(host) {
                    let ever = !matches!(h.status, HostStatus::Connecting);
                    h.status = HostStatus::Reconnecting {
                        error,
                        retry_at: now,
                        ever_connected: ever,
                    };
                }
            }
            Update::Reconnecting {
                host,
                error,
                retry_in,
            } => {
                if let Some(h) = self.hosts.get_mut(host) {
                    let ever = match &h.status {
                        HostStatus::Connecting => false,
                        HostStatus::Connected => true,
                        HostStatus::Reconnecting { ever_connected, .. } => *ever_connected,
                    };
                    h.status = HostStatus::Reconnecting {
                        error,
                        retry_at: now + retry_in,
                        ever_connected: ever,
                    };
                }
            }
        }
    }

    /// True while a countdown is on screen (it needs a redraw each second).
    pub fn counting_down(&self) -> bool {
        self.hosts
            .iter()
            .any(|h| matches!(h.status, HostStatus::Reconnecting { .. }))
    }

    pub fn gpu_count(&self) -> usize {
        self.hosts.iter().map(|h| h.gpus.len()).sum()
    }

    pub fn hosts_up(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| h.status == HostStatus::Connected)
            .count()
    }

    /// The title line.
    pub fn title(&self, now_text: &str) -> Line<'static> {
        let up = self.hosts_up();
        let total = self.hosts.len();
        let up_style = if up == total {
            Style::new().fg(Color::Green)
        } else {
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)
        };
        Line::from(vec![
            Span::styled("gpuwatch", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!(" · {total} hosts (")),
            Span::styled(format!("{up} up"), up_style),
            Span::raw(format!(
                ") · {} GPUs · every {} · {now_text}",
                self.gpu_count(),
                humantime::format_duration(self.interval)
            )),
            Span::styled(
                "   q quit · ↑↓ PgUp PgDn scroll",
                Style::new().fg(Color::DarkGray),
            ),
        ])
    }

    /// The column header line.
    pub fn header(cols: Columns) -> Line<'static> {
        let mut cells = vec![
            ("HOST / GPU", cols.gpu),
            ("TEMP", COL_TEMP),
            ("POWER / LIMIT", COL_POWER),
        ];
        if cols.clock {
            cells.push(("SM / MEM CLOCK", COL_CLOCK));
        }
        cells.push(("UTIL", COL_UTIL));
        if cols.memory {
            cells.push(("MEMORY", COL_MEM));
        }
        if cols.throttle {
            cells.push(("THROTTLE", COL_THROTTLE));
        }
        cells.push(("GOVERNOR", 0));
        Line::from(
            cells
                .iter()
                .map(|(t, w)| Span::styled(pad(t, *w), Style::new().add_modifier(Modifier::BOLD)))
                .collect::<Vec<_>>(),
        )
        .style(Style::new().add_modifier(Modifier::REVERSED))
    }

    /// Number of body lines: per host a status line, then its GPUs, each
    /// followed by its users' line when anyone is on it.
    pub fn body_len(&self) -> usize {
        self.hosts
            .iter()
            .map(|h| 1 + h.gpus.iter().map(GpuView::rows).sum::<usize>())
            .sum()
    }

    /// Every body line.
    #[cfg(test)]
    pub fn body(&self, now: Instant) -> Vec<Line<'static>> {
        self.body_window(now, 0, usize::MAX, Columns::FULL)
    }

    /// Body lines `skip..skip + take`; only those are built, so a large
    /// fleet costs what fits on the screen.
    pub fn body_window(
        &self,
        now: Instant,
        skip: usize,
        take: usize,
        cols: Columns,
    ) -> Vec<Line<'static>> {
        let mut lines = Vec::with_capacity(take.min(self.body_len()));
        let mut row = 0usize;
        for host in &self.hosts {
            if lines.len() >= take {
                break;
            }
            let rows = 1 + host.gpus.iter().map(GpuView::rows).sum::<usize>();
            if row + rows <= skip {
                row += rows;
                continue;
            }
            if row >= skip {
                lines.push(host_line(host, now));
            }
            row += 1;
            let live = host.status == HostStatus::Connected;
            for gpu in &host.gpus {
                if lines.len() >= take {
                    break;
                }
                if row >= skip {
                    lines.push(gpu_line(gpu, live, cols));
                }
                row += 1;
                if let Some(users) = users_line(gpu, live) {
                    if lines.len() >= take {
                        break;
                    }
                    if row >= skip {
                        lines.push(users);
                    }
                    row += 1;
                }
            }
        }
        lines
    }
}

/// Which columns fit the terminal: the temperature (with its sparkline),
/// power, utilisation and governor always show; clocks, memory and throttle
/// reasons give way, in that order, on narrow terminals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns {
    gpu: usize,
    clock: bool,
    memory: bool,
    throttle: bool,
}

impl Columns {
    pub const FULL: Columns = Columns {
        gpu: COL_GPU,
        clock: true,
        memory: true,
        throttle: true,
    };

    /// Cells a GPU row needs.
    fn width(&self) -> usize {
        let on = |b: bool, w: usize| if b { w + 1 } else { 0 };
        self.gpu
            + 1
            + COL_TEMP
            + 1
            + COL_POWER
            + 1
            + on(self.clock, COL_CLOCK)
            + COL_UTIL
            + 1
            + on(self.memory, COL_MEM)
            + on(self.throttle, COL_THROTTLE)
            + COL_GOVERNOR
    }

    /// The richest set of columns that fits `width` cells.
    pub fn for_width(width: u16) -> Self {
        let width = usize::from(width);
        let mut cols = Self::FULL;
        let steps: [fn(&mut Columns); 4] = [
            |c| c.clock = false,
            |c| c.memory = false,
            |c| c.throttle = false,
            |c| c.gpu = COL_GPU_NARROW,
        ];
        for step in steps {
            if cols.width() <= width {
                break;
            }
            step(&mut cols);
        }
        cols
    }
}

const COL_GPU: usize = 34;
const COL_GPU_NARROW: usize = 20;
/// Room kept for the last column ("observe_only [stale]" is longer; it
/// is clipped at the edge of a narrow terminal).
const COL_GOVERNOR: usize = 12;
const COL_TEMP: usize = 20;
const COL_POWER: usize = 15;
const COL_CLOCK: usize = 18;
const COL_UTIL: usize = 7;
const COL_MEM: usize = 18;
const COL_THROTTLE: usize = 26;

/// `text` cut or padded to `width` cells (0: as is), plus one space.
fn pad(text: &str, width: usize) -> String {
    if width == 0 {
        return text.to_owned();
    }
    let count = text.chars().count();
    if count >= width {
        let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut.push(' ');
        cut
    } else {
        let mut s = String::with_capacity(width + 1);
        s.push_str(text);
        s.extend(std::iter::repeat_n(' ', width - count + 1));
        s
    }
}

fn host_line(host: &HostView, now: Instant) -> Line<'static> {
    let mut spans = vec![Span::styled(
        format!("▸ {}  ", host.label),
        Style::new().add_modifier(Modifier::BOLD),
    )];
    match &host.status {
        HostStatus::Connecting => {
            spans.push(Span::styled("◌ connecting", Style::new().fg(Color::Yellow)));
        }
        HostStatus::Connected => {
            spans.push(Span::styled("● connected", Style::new().fg(Color::Green)));
            spans.push(Span::raw(format!(" · {} GPUs", host.gpus.len())));
        }
        HostStatus::Reconnecting {
            error,
            retry_at,
            ever_connected,
        } => {
            let wait = retry_at.saturating_duration_since(now);
            let when = if wait.is_zero() {
                "reconnecting now".to_owned()
            } else {
                format!("reconnecting in {}", units::short_duration(wait))
            };
            // Never reached: an error; lost after working: reconnecting.
            let (mark, style) = if *ever_connected {
                (
                    "◌ ",
                    Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
                )
            } else {
                (
                    "✖ error · ",
                    Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                )
            };
            spans.push(Span::styled(format!("{mark}{when}"), style));
            spans.push(Span::styled(
                format!(" · {error}"),
                Style::new().fg(Color::Red),
            ));
        }
    }
    if let Some(gap) = &host.last_gap {
        let what = if gap.restarted {
            "daemon restarted"
        } else {
            gap.reason.as_str()
        };
        spans.push(Span::styled(
            format!(
                " · gaps: {} ({} samples missed; last: seq {}..{}, {what})",
                host.gaps, host.missed, gap.first_seq, gap.last_seq
            ),
            Style::new().fg(Color::Magenta),
        ));
    }
    Line::from(spans)
}

fn temp_style(gpu: &GpuView, t: u32) -> Style {
    let hot = gpu
        .threshold_c
        .or(gpu.slowdown_c.map(|s| s.saturating_sub(6)));
    match hot {
        Some(h) if t >= h => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Some(h) if t + 5 >= h => Style::new().fg(Color::Yellow),
        _ => Style::new().fg(Color::Green),
    }
}

fn gpu_line(gpu: &GpuView, live: bool, cols: Columns) -> Line<'static> {
    // Every board is an NVIDIA one; the column is better spent on the model.
    let name = gpu.name.strip_prefix("NVIDIA ").unwrap_or(&gpu.name);
    let label = format!("  {} {name}", gpu.index);
    let Some(s) = &gpu.sample else {
        return Line::from(vec![
            Span::raw(pad(&label, cols.gpu)),
            Span::styled(
                "waiting for the first sample",
                Style::new().fg(Color::DarkGray),
            ),
        ]);
    };
    let mut spans = vec![Span::raw(pad(&label, cols.gpu))];
    let health = GpuHealth::try_from(s.health).unwrap_or(GpuHealth::Unspecified);
    if matches!(health, GpuHealth::Lost) {
        spans.push(Span::styled(
            format!(
                "GPU lost{}",
                s.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
        return dim_unless(Line::from(spans), live);
    }
    let temp = match s.temperature_c {
        Some(t) => {
            let spark = units::sparkline(gpu.temps.iter().copied(), SPARK_WIDTH, 10);
            Span::styled(
                pad(&format!("{t:>3} °C {spark}"), COL_TEMP),
                temp_style(gpu, t),
            )
        }
        None => Span::raw(pad(units::ABSENT, COL_TEMP)),
    };
    spans.push(temp);
    // Drawing (nearly) all the limit allows: the cap is what holds it back.
    let at_limit = match (s.power_draw_mw, s.power_limit_mw) {
        (Some(d), Some(l)) => u64::from(d) * 100 >= u64::from(l) * 97,
        _ => false,
    };
    let power_style = if at_limit {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new()
    };
    spans.push(Span::styled(
        pad(
            &units::power_vs_limit(s.power_draw_mw, s.power_limit_mw),
            COL_POWER,
        ),
        power_style,
    ));
    if cols.clock {
        spans.push(Span::raw(pad(
            &units::clocks(s.sm_clock_mhz, s.memory_clock_mhz),
            COL_CLOCK,
        )));
    }
    spans.push(Span::raw(pad(
        &units::percent(s.utilization_gpu_pct),
        COL_UTIL,
    )));
    if cols.memory {
        spans.push(Span::raw(pad(
            &units::memory(s.memory_used_bytes, s.memory_total_bytes),
            COL_MEM,
        )));
    }
    if cols.throttle {
        let (throttle, hardware) = throttle_text(s);
        spans.push(Span::styled(
            pad(&throttle, COL_THROTTLE),
            if hardware {
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
            } else {
                Style::new()
            },
        ));
    }
    let governor = GovernorState::try_from(s.governor_state).unwrap_or(GovernorState::Unspecified);
    let gov_style = match governor {
        GovernorState::Throttling => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        GovernorState::Recovering => Style::new().fg(Color::Cyan),
        GovernorState::Suspended => Style::new().fg(Color::Red),
        _ => Style::new(),
    };
    let mut gov_text = match governor {
        GovernorState::Unspecified => units::ABSENT.to_owned(),
        _ => names::name_of::<gpuwatch_api::GovernorState>(s.governor_state),
    };
    if !matches!(health, GpuHealth::Ok) {
        gov_text.push_str(&format!(
            " [{}]",
            names::name_of::<gpuwatch_api::GpuHealth>(s.health)
        ));
    }
    spans.push(Span::styled(gov_text, gov_style));
    dim_unless(Line::from(spans), live)
}

/// The line under a GPU's row naming who is on it: `↳ 3 MIG · owner ·
/// owner · idle: ns/pod` (the same owners `ps` shows). None when nobody is
/// and the GPU is not in MIG mode.
fn users_line(gpu: &GpuView, live: bool) -> Option<Line<'static>> {
    let s = gpu.sample.as_ref().filter(|s| has_users(s))?;
    let mut spans = vec![Span::styled("      ↳ ", Style::new().fg(Color::DarkGray))];
    let mut first = true;
    let mut sep = |spans: &mut Vec<Span<'static>>| {
        if !first {
            spans.push(Span::styled(" · ", Style::new().fg(Color::DarkGray)));
        }
        first = false;
    };
    if !s.mig_instances.is_empty() {
        sep(&mut spans);
        spans.push(Span::styled(
            format!("{} MIG", s.mig_instances.len()),
            Style::new().fg(Color::Cyan),
        ));
    }
    for user in owner::users(s) {
        sep(&mut spans);
        let style = if user.starts_with("idle: ") {
            Style::new().fg(Color::Yellow)
        } else {
            Style::new()
        };
        spans.push(Span::styled(user, style));
    }
    Some(dim_unless(Line::from(spans), live))
}

fn dim_unless(line: Line<'static>, live: bool) -> Line<'static> {
    if live {
        line
    } else {
        line.style(Style::new().fg(Color::DarkGray))
    }
}

/// Active throttle reasons, and whether the hardware itself slowed down.
fn throttle_text(s: &GpuSample) -> (String, bool) {
    if s.throttle_reasons_mask.is_none() {
        return (units::ABSENT.to_owned(), false);
    }
    if s.throttle_reasons.is_empty() {
        return ("none".to_owned(), false);
    }
    let hardware = s.throttle_reasons.iter().any(|r| {
        matches!(
            gpuwatch_api::ThrottleReason::try_from(*r),
            Ok(gpuwatch_api::ThrottleReason::HwSlowdown
                | gpuwatch_api::ThrottleReason::HwThermalSlowdown
                | gpuwatch_api::ThrottleReason::HwPowerBrakeSlowdown)
        )
    });
    let names: Vec<String> = s
        .throttle_reasons
        .iter()
        .map(|r| names::name_of::<gpuwatch_api::ThrottleReason>(*r))
        .collect();
    (names.join(","), hardware)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuwatch_api::{Frame, GpuPolicy, ThrottleReason};

    fn text(line: &Line<'_>) -> String {
        line.spans.iter().map(|s| s.content.as_ref()).collect()
    }

    fn hosts() -> Vec<HostSpec> {
        vec![
            crate::hosts::parse_host("node1:1").expect("host"),
            crate::hosts::parse_host("node2:2").expect("host"),
        ]
    }

    fn device(index: u32) -> DeviceInfo {
        DeviceInfo {
            index,
            name: "NVIDIA H100 80GB HBM3".into(),
            slowdown_temperature_c: Some(89),
            policy: Some(GpuPolicy {
                threshold_c: 83,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sample(index: u32, temp: u32) -> GpuSample {
        GpuSample {
            index,
            health: GpuHealth::Ok as i32,
            temperature_c: Some(temp),
            power_draw_mw: Some(312_400),
            power_limit_mw: Some(700_000),
            sm_clock_mhz: Some(1755),
            memory_clock_mhz: Some(2619),
            utilization_gpu_pct: Some(97),
            memory_used_bytes: Some(12 << 30),
            memory_total_bytes: Some(80 << 30),
            throttle_reasons_mask: Some(4),
            throttle_reasons: vec![ThrottleReason::SwPowerCap as i32],
            governor_state: GovernorState::Throttling as i32,
            ..Default::default()
        }
    }

    #[test]
    fn rows_show_every_gpu_with_units_grouped_by_host() {
        let now = Instant::now();
        let mut view = FleetView::new(&hosts(), Duration::from_secs(1));
        view.apply(
            Update::Connected {
                host: 0,
                devices: vec![device(0), device(1)],
                server_started: None,
                interval_ms: 1000,
                resumed_after_seq: None,
            },
            now,
        );
        for t in [60, 70, 84] {
            view.apply(
                Update::Frame {
                    host: 0,
                    frame: Frame {
                        seq: u64::from(t),
                        time: None,
                        samples: vec![sample(0, t), sample(1, 50)],
                    },
                },
                now,
            );
        }
        let lines: Vec<String> = view.body(now).iter().map(text).collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].contains("node1:1") && lines[0].contains("connected"));
        let gpu0 = &lines[1];
        for needle in [
            "0 H100 80GB",
            "84 °C",
            "312 / 700 W",
            "1755 / 2619 MHz",
            "97 %",
            "12.0 / 80.0 GiB",
            "sw_power_cap",
            "throttling",
        ] {
            assert!(gpu0.contains(needle), "{needle:?} missing in {gpu0:?}");
        }
        // The sparkline ends at the top for a rising temperature.
        assert!(gpu0.contains('█'), "{gpu0}");
        assert!(lines[3].contains("node2:2") && lines[3].contains("connecting"));
    }

    #[test]
    fn host_states_and_gaps_are_visible() {
        let now = Instant::now();
        let mut view = FleetView::new(&hosts(), Duration::from_secs(1));
        view.apply(
            Update::Reconnecting {
                host: 1,
                error: "cannot connect: connection refused".into(),
                retry_in: Duration::from_millis(2500),
            },
            now,
        );
        view.apply(
            Update::Connected {
                host: 0,
                devices: vec![device(0)],
                server_started: None,
                interval_ms: 1000,
                resumed_after_seq: None,
            },
            now,
        );
        view.apply(
            Update::Disconnected {
                host: 0,
                error: "UNAVAILABLE: gone".into(),
            },
            now,
        );
        view.apply(
            Update::Reconnecting {
                host: 0,
                error: "UNAVAILABLE: gone".into(),
                retry_in: Duration::from_secs(4),
            },
            now,
        );
        view.apply(
            Update::Gap {
                host: 0,
                gap: GapRecord {
                    first_seq: 10,
                    last_seq: 20,
                    reason: "not_in_history".into(),
                    missed: 11,
                    restarted: true,
                },
            },
            now,
        );
        let lines: Vec<String> = view.body(now).iter().map(text).collect();
        let host0 = &lines[0];
        assert!(host0.contains("reconnecting in 4s"), "{host0}");
        assert!(host0.contains("UNAVAILABLE: gone"), "{host0}");
        assert!(
            host0.contains("11 samples missed") && host0.contains("daemon restarted"),
            "{host0}"
        );
        let host1 = lines
            .iter()
            .find(|l| l.contains("node2:2"))
            .expect("host 2 line");
        assert!(
            host1.contains("error") && host1.contains("connection refused"),
            "{host1}"
        );
        assert!(view.counting_down());
        assert_eq!(view.hosts_up(), 0);
    }

    #[test]
    fn each_gpu_names_who_is_on_it_under_its_row() {
        use gpuwatch_api::{Attribution, GpuAllocation, GpuProcess, MigInstance, PodRef};
        let now = Instant::now();
        let mut view = FleetView::new(&hosts()[..1], Duration::from_secs(1));
        let pod = |ns: &str, name: &str, c: &str| PodRef {
            namespace: ns.into(),
            pod: name.into(),
            container: c.into(),
        };
        let mut busy = sample(0, 60);
        busy.processes = vec![GpuProcess {
            pid: 41000,
            name: Some("python3".into()),
            attribution: Some(Attribution {
                pod: Some(pod("ml", "trainer-0", "main")),
                ..Default::default()
            }),
            ..Default::default()
        }];
        let mut mig = sample(1, 50);
        mig.mig_instances = vec![MigInstance::default(), MigInstance::default()];
        mig.allocations = vec![GpuAllocation {
            pod: Some(pod("research", "notebook-5", "jupyter")),
            idle: true,
            ..Default::default()
        }];
        let nobody = sample(2, 40);
        view.apply(
            Update::Frame {
                host: 0,
                frame: Frame {
                    seq: 1,
                    time: None,
                    samples: vec![busy, mig, nobody],
                },
            },
            now,
        );
        let lines: Vec<String> = view.body(now).iter().map(text).collect();
        // host, GPU 0 + its users, GPU 1 + its users, GPU 2 alone.
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert_eq!(view.body_len(), 6);
        assert!(lines[2].contains("↳ ml/trainer-0/main"), "{lines:#?}");
        assert!(
            lines[4].contains("2 MIG") && lines[4].contains("idle: research/notebook-5"),
            "{lines:#?}"
        );
        assert!(
            lines[5].starts_with("  2 ") && !lines[5].contains('↳'),
            "{lines:#?}"
        );
        // Scrolling by one line lands on users' lines as on any other.
        for (skip, line) in lines.iter().enumerate() {
            let one = view.body_window(now, skip, 1, Columns::FULL);
            assert_eq!(&text(&one[0]), line, "line {skip}");
        }
    }

    #[test]
    fn absent_metrics_show_a_dash() {
        let now = Instant::now();
        let mut view = FleetView::new(&hosts()[..1], Duration::from_secs(1));
        let bare = GpuSample {
            index: 0,
            health: GpuHealth::Ok as i32,
            temperature_c: Some(40),
            ..Default::default()
        };
        view.apply(
            Update::Frame {
                host: 0,
                frame: Frame {
                    seq: 1,
                    time: None,
                    samples: vec![bare],
                },
            },
            now,
        );
        let line = text(&view.body(now)[1]);
        assert!(line.contains("40 °C"), "{line}");
        assert!(!line.contains(" 0 W") && !line.contains("0 MHz"), "{line}");
        assert!(line.matches(" - ").count() >= 3, "{line}");
    }

    #[test]
    fn window_builds_only_the_visible_lines() {
        let now = Instant::now();
        let mut view = FleetView::new(&hosts(), Duration::from_secs(1));
        for host in 0..2 {
            view.apply(
                Update::Connected {
                    host,
                    devices: vec![device(0), device(1), device(2)],
                    server_started: None,
                    interval_ms: 1000,
                    resumed_after_seq: None,
                },
                now,
            );
        }
        let all: Vec<String> = view.body(now).iter().map(text).collect();
        assert_eq!(all.len(), view.body_len());
        for skip in 0..=all.len() {
            for take in 0..=all.len() {
                let window: Vec<String> = view
                    .body_window(now, skip, take, Columns::FULL)
                    .iter()
                    .map(text)
                    .collect();
                let expected: Vec<String> = all.iter().skip(skip).take(take).cloned().collect();
                assert_eq!(window, expected, "skip {skip} take {take}");
            }
        }
    }

    #[test]
    fn narrow_terminals_keep_the_essential_columns() {
        let now = Instant::now();
        let mut view = FleetView::new(&hosts()[..1], Duration::from_secs(1));
        view.apply(
            Update::Frame {
                host: 0,
                frame: Frame {
                    seq: 1,
                    time: None,
                    samples: vec![sample(0, 70)],
                },
            },
            now,
        );
        assert_eq!(Columns::for_width(300), Columns::FULL);
        for width in [80u16, 100, 120, 140, 160] {
            let cols = Columns::for_width(width);
            let header = text(&FleetView::header(cols));
            let row = text(&view.body_window(now, 1, 1, cols)[0]);
            assert!(
                header.chars().count() <= usize::from(width),
                "{width}: {header}"
            );
            assert!(
                row.chars().count() <= usize::from(width),
                "{width}: {} cells: {row}",
                row.chars().count()
            );
            for needle in ["70 °C", "312 / 700 W", "97 %", "throttling"] {
                assert!(row.contains(needle), "{width}: {needle} missing in {row}");
            }
        }
        let narrow = text(&view.body_window(now, 1, 1, Columns::for_width(80))[0]);
        assert!(
            !narrow.contains("MHz") && !narrow.contains("GiB"),
            "{narrow}"
        );
    }

    #[test]
    fn pad_cuts_long_text() {
        assert_eq!(pad("abcdef", 4), "abc… ");
        assert_eq!(pad("ab", 4), "ab   ");
    }
}
