//! The control plane: the only place a GPU's settings are changed.
//!
//! One task runs the [`Sampler`] and, on the same loop, everything that
//! writes to a GPU: the thermal governor (one [`Governor`] per GPU, fed every
//! fresh reading), operator requests from the control RPCs, startup repairs
//! (a stale throttle a previous run left, an operator ceiling a driver reset
//! forgot), drift correction, and the restore on shutdown. Because all of it
//! happens on one loop, policy and writes never race; because the writes
//! themselves run on the GPUs' own threads and complete asynchronously, a
//! slow write never stalls sampling.
//!
//! Every change is an event (who, why, before/after) and every piece of
//! desired state (operator ceilings and thresholds, whether the governor
//! holds a GPU lowered) is persisted before it matters, so a restart — even
//! after SIGKILL — comes back to what the operator asked for and releases
//! any throttle the governor left behind.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    actor::WriteOp,
    api::{
        ClockLockChange, ClockResetResult, EventKind, GovernorAction, GovernorMode, GovernorState,
        GpuPolicy, PowerLimitChange, PowerLimitResult, ResetClocksResponse, ResetOutcome,
        SetPowerLimitResponse, SetThresholdResponse, Severity, ThresholdChange, ThresholdResult,
        ThresholdSource, event::Change, set_power_limit_request, set_threshold_request,
    },
    auth::Caller,
    backend::{BackendError, DeviceFacts, Reading},
    config::{ControllerConfig, HYSTERESIS_MAX_C, HYSTERESIS_MIN_C, THRESHOLD_MIN_C},
    events::{Actor, EventLog, NewEvent},
    governor::{Actuator, Decision, Governor, GovernorParams, Observation, ThermalPrior},
    hub::Hub,
    persist::{Ack, AckSet, PersistError},
    sampler::Sampler,
    state::{GpuState, StateStore},
};

/// How long a control RPC waits for the control plane.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one device write may take before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write waits for the desired state it depends on to be durable
/// before it goes ahead anyway: a hung disk must not stop the governor from
/// cooling a GPU (the failure is logged and counted by the writer).
const PERSIST_WAIT: Duration = Duration::from_secs(10);
/// How long shutdown waits for restores.
const SHUTDOWN_RESTORE_TIMEOUT: Duration = Duration::from_secs(10);
/// Smallest limit difference treated as a real change (mW).
const LIMIT_TOLERANCE_MW: u32 = 1_000;
/// Dry-run decisions are recorded at most this often per GPU, unless the
/// decision changes.
const DRY_RUN_EVENT_INTERVAL: Duration = Duration::from_secs(30);
/// Governor floor in clock mode, as a fraction of the maximum clock.
const CLOCK_FLOOR_FRACTION: f64 = 0.3;
/// Assumed coolant/air temperature before the governor has seen the GPU.
const AMBIENT_GUESS_C: f64 = 30.0;

/// A control request from the gRPC service.
#[derive(Debug)]
pub enum ControlRequest {
    SetPowerLimit {
        gpus: Vec<u32>,
        target: set_power_limit_request::Target,
        caller: Caller,
        reply: oneshot::Sender<Result<SetPowerLimitResponse, Status>>,
    },
    ResetClocks {
        gpus: Vec<u32>,
        caller: Caller,
        reply: oneshot::Sender<Result<ResetClocksResponse, Status>>,
    },
    SetThreshold {
        gpus: Vec<u32>,
        target: set_threshold_request::Target,
        hysteresis_c: Option<u32>,
        caller: Caller,
        reply: oneshot::Sender<Result<SetThresholdResponse, Status>>,
    },
}

/// The service's handle to the control plane.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<ControlRequest>,
}

impl ControlHandle {
    /// A handle and the receiving end for the control loop.
    pub fn channel() -> (Self, mpsc::Receiver<ControlRequest>) {
        let (tx, rx) = mpsc::channel(64);
        (Self { tx }, rx)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Status>>) -> ControlRequest,
    ) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Status::unavailable("the daemon is shutting down"))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Status::unavailable("the daemon is shutting down")),
            Err(_) => Err(Status::deadline_exceeded("the GPU did not answer in time")),
        }
    }

    pub async fn set_power_limit(
        &self,
        gpus: Vec<u32>,
        target: set_power_limit_request::Target,
        caller: Caller,
    ) -> Result<SetPowerLimitResponse, Status> {
        self.call(|reply| ControlRequest::SetPowerLimit {
            gpus,
            target,
            caller,
            reply,
        })
        .await
    }

    pub async fn reset_clocks(
        &self,
        gpus: Vec<u32>,
        caller: Caller,
    ) -> Result<ResetClocksResponse, Status> {
        self.call(|reply| ControlRequest::ResetClocks {
            gpus,
            caller,
            reply,
        })
        .await
    }

    pub async fn set_threshold(
        &self,
        gpus: Vec<u32>,
        target: set_threshold_request::Target,
        hysteresis_c: Option<u32>,
        caller: Caller,
    ) -> Result<SetThresholdResponse, Status> {
        self.call(|reply| ControlRequest::SetThreshold {
            gpus,
            target,
            hysteresis_c,
            caller,
            reply,
        })
        .await
    }
}

/// The gRPC status for a device error, with a hint where one helps.
pub fn status_for(index: u32, e: &BackendError) -> Status {
    let text = format!("GPU {index}: {e}");
    match e {
        BackendError::NoPermission(_) => Status::permission_denied(format!(
            "{text}; changing GPU settings needs root or CAP_SYS_ADMIN for gpuwatch-server"
        )),
        BackendError::NotSupported(_) => Status::failed_precondition(text),
        BackendError::GpuLost(_) | BackendError::Unavailable(_) => Status::unavailable(text),
        BackendError::InvalidArgument(_) => Status::invalid_argument(text),
        BackendError::Timeout(_) => Status::deadline_exceeded(text),
        BackendError::InUse(_) => Status::failed_precondition(text),
        BackendError::Other(_) => Status::internal(text),
    }
}

/// Why a write is made, and who to tell when it completes.
#[derive(Debug, Clone)]
enum Origin {
    Governor {
        reason: String,
    },
    Operator {
        name: String,
        reply: u64,
        slot: usize,
        part: Part,
    },
    Startup {
        reason: String,
    },
    Drift {
        reason: String,
    },
    Shutdown,
}

/// Which part of a multi-write request a write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    PowerLimit,
    ApplicationClocks,
    LockedGpuClocks,
    LockedMemoryClocks,
}

impl Origin {
    fn actor(&self) -> Actor {
        match self {
            Origin::Governor { .. } => Actor::governor(),
            Origin::Operator { name, .. } => Actor::operator(name),
            Origin::Startup { .. } => Actor::startup(),
            Origin::Drift { .. } => Actor::daemon(),
            Origin::Shutdown => Actor::shutdown(),
        }
    }

    fn reason(&self) -> String {
        match self {
            Origin::Governor { reason } | Origin::Startup { reason } | Origin::Drift { reason } => {
                reason.clone()
            }
            Origin::Operator { name, .. } => format!("requested by {name}"),
            Origin::Shutdown => "daemon stopping: giving back what the governor took".to_owned(),
        }
    }
}

struct WriteDone {
    gpu: usize,
    op: WriteOp,
    origin: Origin,
    /// The limit / clock cap before the write, for the event.
    before: Option<u32>,
    result: Result<(), BackendError>,
}

type WriteFuture = Pin<Box<dyn Future<Output = WriteDone> + Send>>;

/// A control RPC waiting for its writes, and for what it changed (events,
/// desired state) to be durable.
enum PendingReply {
    PowerLimit {
        results: Vec<PowerLimitResult>,
        errors: Vec<Status>,
        remaining: usize,
        durable: AckSet,
        reply: oneshot::Sender<Result<SetPowerLimitResponse, Status>>,
    },
    Clocks {
        results: Vec<ClockResetResult>,
        errors: Vec<Status>,
        remaining: usize,
        durable: AckSet,
        reply: oneshot::Sender<Result<ResetClocksResponse, Status>>,
    },
}

/// The control state of one GPU.
#[derive(Debug)]
struct GpuControl {
    facts: DeviceFacts,
    mode: GovernorMode,
    mode_reason: String,
    enabled: bool,
    dry_run: bool,
    threshold_c: u32,
    threshold_source: ThresholdSource,
    hysteresis_c: u32,
    config_threshold: Option<(u32, ThresholdSource)>,
    config_hysteresis_c: u32,
    floor_w: Option<f64>,
    operator_ceiling_mw: Option<u32>,
    governor: Option<Governor>,
    /// Writes to this GPU not yet completed.
    in_flight: usize,
    last_action: Option<GovernorAction>,
    /// The power limit gpuwatch last wrote (drift reference).
    expected_limit_mw: Option<u32>,
    /// The graphics clock cap the governor holds.
    clock_cap_mhz: Option<u32>,
    last_dry_run: Option<(f64, SystemTime)>,
    /// The startup repair has run.
    started: bool,
    lost: bool,
}

impl GpuControl {
    fn index(&self) -> u32 {
        self.facts.index
    }

    fn uuid(&self) -> &str {
        &self.facts.uuid
    }

    fn default_mw(&self) -> Option<u32> {
        self.facts.power_default_mw
    }

    /// The ceiling in force: the operator's, else the device default.
    fn ceiling_mw(&self) -> Option<u32> {
        self.operator_ceiling_mw.or(self.default_mw())
    }

    fn floor_mw(&self) -> Option<u32> {
        let min = self.facts.power_min_mw?;
        let floor = self.floor_w.map_or(min, |w| (w * 1000.0) as u32).max(min);
        Some(floor.min(self.ceiling_mw().unwrap_or(floor)))
    }

    fn clock_floor_mhz(&self) -> u32 {
        let max = self.facts.max_graphics_clock_mhz.unwrap_or(0);
        (f64::from(max) * CLOCK_FLOOR_FRACTION) as u32
    }

    fn governor_state(&self) -> GovernorState {
        if !self.enabled {
            GovernorState::Disabled
        } else if self.lost {
            GovernorState::Suspended
        } else if self.dry_run || self.mode == GovernorMode::ObserveOnly {
            GovernorState::ObserveOnly
        } else {
            self.governor
                .as_ref()
                .map_or(GovernorState::Idle, Governor::state)
        }
    }

    /// Thermal resistance prior: a board at its default limit is designed to
    /// run a few degrees under slowdown.
    fn thermal_prior(&self) -> ThermalPrior {
        let headroom = f64::from(self.facts.slowdown_c.unwrap_or(85)) - 5.0 - AMBIENT_GUESS_C;
        match self.facts.power_default_mw {
            Some(mw) => ThermalPrior::ResistanceCPerW(
                headroom.max(5.0) / (f64::from(mw) / 1000.0).max(10.0),
            ),
            None => ThermalPrior::HeadroomC(headroom.max(5.0)),
        }
    }

    fn governor_params(
        &self,
        min_write_interval: Duration,
        min_step_w: f64,
    ) -> Option<GovernorParams> {
        let (floor, ceiling, actuator, min_step) = match self.mode {
            GovernorMode::PowerLimit => (
                f64::from(self.floor_mw()?) / 1000.0,
                f64::from(self.ceiling_mw()?) / 1000.0,
                Actuator::PowerLimit,
                min_step_w,
            ),
            GovernorMode::ClockLock => (
                f64::from(self.clock_floor_mhz()),
                f64::from(self.facts.max_graphics_clock_mhz?),
                Actuator::ClockCap,
                15.0,
            ),
            _ => return None,
        };
        Some(GovernorParams {
            threshold_c: f64::from(self.threshold_c),
            hysteresis_c: f64::from(self.hysteresis_c),
            floor,
            ceiling,
            min_write_interval,
            min_step,
            ambient_guess_c: AMBIENT_GUESS_C,
            actuator,
            thermal_prior: self.thermal_prior(),
        })
    }

    fn policy(&self) -> GpuPolicy {
        GpuPolicy {
            index: self.index(),
            uuid: self.uuid().to_owned(),
            mode: self.mode as i32,
            state: self.governor_state() as i32,
            dry_run: self.dry_run,
            threshold_c: self.threshold_c,
            threshold_source: self.threshold_source as i32,
            hysteresis_c: self.hysteresis_c,
            floor_mw: self.floor_mw(),
            ceiling_mw: self.ceiling_mw(),
            operator_ceiling_mw: self.operator_ceiling_mw,
            current_limit_mw: self.expected_limit_mw,
            clock_cap_mhz: self.clock_cap_mhz,
            last_action: self.last_action.clone(),
            mode_reason: self.mode_reason.clone(),
        }
    }
}

/// The control loop: sampler, governors, operator requests.
pub struct Controller {
    sampler: Sampler,
    gpus: Vec<GpuControl>,
    hub: Arc<Hub>,
    events: Arc<EventLog>,
    store: StateStore,
    config: ControllerConfig,
    writes: FuturesUnordered<WriteFuture>,
    replies: HashMap<u64, PendingReply>,
    next_reply: u64,
    last_policies: Vec<GpuPolicy>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("gpus", &self.gpus.len())
            .field("writes_in_flight", &self.writes.len())
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Builds the control state of every GPU from config, persisted state
    /// and device facts.
    pub fn new(
        sampler: Sampler,
        hub: Arc<Hub>,
        events: Arc<EventLog>,
        store: StateStore,
        config: ControllerConfig,
    ) -> Self {
        let gpus = sampler
            .slots
            .iter()
            .map(|slot| {
                Self::gpu_control(&slot.facts, &config, &store.get(&slot.facts.uuid), &events)
            })
            .collect();
        let mut controller = Self {
            sampler,
            gpus,
            hub,
            events,
            store,
            config,
            writes: FuturesUnordered::new(),
            replies: HashMap::new(),
            next_reply: 1,
            last_policies: Vec::new(),
        };
        controller.publish_policies();
        controller
    }

    fn gpu_control(
        facts: &DeviceFacts,
        config: &ControllerConfig,
        saved: &GpuState,
        events: &EventLog,
    ) -> GpuControl {
        let over = config.gpus.iter().find(|o| {
            o.index == Some(facts.index)
                || o.uuid
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(&facts.uuid))
        });
        let enabled = over.and_then(|o| o.enabled).unwrap_or(config.enabled);
        let dry_run = over.and_then(|o| o.dry_run).unwrap_or(config.dry_run);
        let config_threshold = over
            .and_then(|o| o.threshold_c)
            .or(config.threshold_c)
            .map(|t| (t, ThresholdSource::Config));
        let config_hysteresis_c = over
            .and_then(|o| o.hysteresis_c)
            .unwrap_or(config.hysteresis_c);
        let derived = facts.slowdown_c.map(|s| {
            s.saturating_sub(config.threshold_margin_c)
                .max(THRESHOLD_MIN_C)
        });
        let (mut threshold_c, mut threshold_source) =
            match (saved.threshold_c, config_threshold, derived) {
                (Some(t), _, _) => (t, ThresholdSource::Operator),
                (None, Some(c), _) => c,
                (None, None, Some(d)) => (d, ThresholdSource::Derived),
                (None, None, None) => (83, ThresholdSource::Derived),
            };
        if let Some(slowdown) = facts.slowdown_c
            && threshold_c >= slowdown
        {
            let safe = slowdown.saturating_sub(1).max(THRESHOLD_MIN_C);
            events.record(
                NewEvent::new(
                    EventKind::ThresholdChanged,
                    Actor::startup(),
                    format!(
                        "threshold {threshold_c} °C is not below GPU {}'s slowdown temperature {slowdown} °C; using {safe} °C",
                        facts.index
                    ),
                )
                .gpu(facts.index, &facts.uuid)
                .severity(Severity::Warning)
                .change(Change::Threshold(ThresholdChange {
                    before_c: Some(threshold_c),
                    after_c: Some(safe),
                    ..ThresholdChange::default()
                })),
            );
            threshold_c = safe;
            if threshold_source == ThresholdSource::Operator {
                threshold_source = ThresholdSource::Config;
            }
        }
        let c = &facts.controls;
        let (mode, mode_reason) = if !enabled {
            (
                GovernorMode::Disabled,
                "governor disabled in the configuration".to_owned(),
            )
        } else if c.power_limit_settable
            && facts.power_min_mw.is_some()
            && facts.power_default_mw.is_some()
        {
            (
                GovernorMode::PowerLimit,
                "lowers and raises the power limit".to_owned(),
            )
        } else if c.gpu_clocks_lockable && facts.max_graphics_clock_mhz.is_some() {
            (
                GovernorMode::ClockLock,
                "power limit control is not supported on this GPU; locks graphics clocks instead"
                    .to_owned(),
            )
        } else {
            (
                GovernorMode::ObserveOnly,
                "neither the power limit nor the clocks can be set on this GPU; observing only"
                    .to_owned(),
            )
        };
        GpuControl {
            facts: facts.clone(),
            mode,
            mode_reason,
            enabled,
            dry_run,
            threshold_c,
            threshold_source,
            hysteresis_c: saved.hysteresis_c.unwrap_or(config_hysteresis_c),
            config_threshold,
            config_hysteresis_c,
            floor_w: over.and_then(|o| o.floor_watts).or(config.floor_watts),
            operator_ceiling_mw: saved.operator_ceiling_mw,
            governor: None,
            in_flight: 0,
            last_action: None,
            expected_limit_mw: None,
            clock_cap_mhz: None,
            last_dry_run: None,
            started: false,
            lost: false,
        }
    }

    fn publish_policies(&mut self) {
        let policies: Vec<GpuPolicy> = self.gpus.iter().map(GpuControl::policy).collect();
        if policies != self.last_policies {
            self.hub.set_policies(policies.clone());
            self.last_policies = policies;
        }
    }

    /// Runs until `shutdown`, then gives back every GPU the governor lowered.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<ControlRequest>,
        shutdown: CancellationToken,
    ) {
        for gpu in &self.gpus {
            if gpu.mode == GovernorMode::ObserveOnly || gpu.mode == GovernorMode::ClockLock {
                self.events.record(
                    NewEvent::new(
                        EventKind::GovernorModeChanged,
                        Actor::startup(),
                        gpu.mode_reason.clone(),
                    )
                    .gpu(gpu.index(), gpu.uuid())
                    .severity(if gpu.mode == GovernorMode::ObserveOnly {
                        Severity::Warning
                    } else {
                        Severity::Info
                    }),
                );
            }
        }
        let mut ticker = self.sampler.ticker();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = self.writes.next(), if !self.writes.is_empty() => self.on_write_done(done),
                Some(request) = requests.recv() => self.on_request(request),
                _ = ticker.tick() => self.tick().await,
            }
        }
        requests.close();
        while let Ok(request) = requests.try_recv() {
            refuse(request, Status::unavailable("the daemon is shutting down"));
        }
        self.shutdown_restore().await;
    }

    /// The first tick, before the daemon serves: reads every GPU, clears
    /// what a previous run left behind and re-applies the operator's
    /// ceilings, and waits (bounded) for those writes, so that by the time
    /// clients connect the GPUs are in their intended state and the repairs
    /// are in the event log.
    pub async fn start(&mut self) {
        self.tick().await;
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            while let Some(done) = self.writes.next().await {
                self.on_write_done(done);
            }
        })
        .await;
    }

    /// One sampler tick, then the governors.
    pub async fn tick(&mut self) {
        let states: Vec<(u32, GovernorState)> = self
            .gpus
            .iter()
            .map(|g| (g.index(), g.governor_state()))
            .collect();
        let fresh = self
            .sampler
            .tick(|index| {
                states
                    .iter()
                    .find(|(i, _)| *i == index)
                    .map_or(GovernorState::Unspecified, |(_, s)| *s)
            })
            .await;
        self.after_tick(&fresh);
    }

    fn after_tick(&mut self, fresh: &[bool]) {
        for pos in 0..self.gpus.len() {
            let slot = &self.sampler.slots[pos];
            let lost = slot.is_lost();
            if lost != self.gpus[pos].lost {
                self.gpus[pos].lost = lost;
                if !lost {
                    // A returning GPU may have new facts and default limits.
                    self.gpus[pos].facts = slot.facts.clone();
                    self.gpus[pos].governor = None;
                }
            }
            if self.gpus[pos].facts.uuid.is_empty() && !slot.facts.uuid.is_empty() {
                self.gpus[pos].facts = slot.facts.clone();
            }
            if !fresh.get(pos).copied().unwrap_or(false) {
                continue;
            }
            let Some(reading) = slot.last_reading().cloned() else {
                continue;
            };
            if self.gpus[pos].in_flight > 0 {
                continue;
            }
            if !self.gpus[pos].started {
                self.start_gpu(pos, &reading);
                continue;
            }
            self.check_drift(pos, &reading);
            if self.gpus[pos].in_flight == 0 {
                self.govern(pos, &reading);
            }
        }
        self.publish_policies();
    }

    /// First reading of a GPU: clear what a previous run left, re-apply the
    /// operator's ceiling, start the governor.
    fn start_gpu(&mut self, pos: usize, reading: &Reading) {
        let gpu = &mut self.gpus[pos];
        gpu.started = true;
        let saved = self.store.get(gpu.uuid());
        let current = reading.power_limit_mw;
        gpu.expected_limit_mw = current;
        gpu.clock_cap_mhz = reading.locked_gpu_clock_max_mhz;
        let writes_allowed = !gpu.dry_run;
        let mut ops = Vec::new();
        if saved.governor_clock_lock && gpu.facts.controls.gpu_clocks_lockable {
            ops.push((
                WriteOp::ResetGpuLockedClocks,
                "clearing a clock lock a previous run of the governor left behind".to_owned(),
            ));
        }
        if let (Some(ceiling), Some(now)) = (gpu.ceiling_mw(), current)
            && gpu.facts.controls.power_limit_settable
            && now.abs_diff(ceiling) > LIMIT_TOLERANCE_MW
        {
            if saved.governor_lowered_limit {
                ops.push((
                    WriteOp::SetPowerLimit { limit_mw: ceiling },
                    format!(
                        "clearing a stale throttle a previous run left behind: {} W -> {} W",
                        now / 1000,
                        ceiling / 1000
                    ),
                ));
            } else if gpu.operator_ceiling_mw.is_some() {
                ops.push((
                    WriteOp::SetPowerLimit { limit_mw: ceiling },
                    format!("re-applying the operator's ceiling of {} W", ceiling / 1000),
                ));
            }
        }
        if !writes_allowed {
            for (_, reason) in &ops {
                self.events.record(
                    NewEvent::new(
                        EventKind::DryRunDecision,
                        Actor::startup(),
                        format!("dry run: would be {reason}"),
                    )
                    .gpu(self.gpus[pos].index(), self.gpus[pos].uuid()),
                );
            }
            ops.clear();
        }
        let gpu = &mut self.gpus[pos];
        if let Some(params) =
            gpu.governor_params(self.config.min_write_interval, self.config.min_step_watts)
        {
            let level = match gpu.mode {
                GovernorMode::ClockLock => f64::from(
                    reading
                        .locked_gpu_clock_max_mhz
                        .unwrap_or(params.ceiling as u32),
                ),
                _ => current.map_or(params.ceiling, |mw| f64::from(mw) / 1000.0),
            };
            let restored = !ops.is_empty();
            gpu.governor = Some(Governor::new(
                params.clone(),
                if restored { params.ceiling } else { level },
            ));
        }
        for (op, reason) in ops {
            self.dispatch(pos, op, Origin::Startup { reason });
        }
    }

    /// Re-applies the limit gpuwatch set when something else changed it.
    fn check_drift(&mut self, pos: usize, reading: &Reading) {
        let gpu = &mut self.gpus[pos];
        let (Some(expected), Some(actual)) = (gpu.expected_limit_mw, reading.power_limit_mw) else {
            return;
        };
        if expected.abs_diff(actual) <= LIMIT_TOLERANCE_MW {
            return;
        }
        let index = gpu.index();
        let uuid = gpu.uuid().to_owned();
        let reason = format!(
            "power limit changed behind gpuwatch's back: {} W where {} W was set",
            actual / 1000,
            expected / 1000
        );
        let reapply = !gpu.dry_run && gpu.facts.controls.power_limit_settable;
        self.events.record(
            NewEvent::new(
                EventKind::LimitDrift,
                Actor::device(),
                if reapply {
                    format!("{reason}; re-applying")
                } else {
                    format!("{reason}; dry run, not re-applied")
                },
            )
            .gpu(index, &uuid)
            .severity(Severity::Warning)
            .change(Change::PowerLimit(PowerLimitChange {
                before_mw: Some(expected),
                after_mw: Some(actual),
            })),
        );
        if !reapply {
            self.gpus[pos].expected_limit_mw = Some(actual);
            return;
        }
        tracing::warn!(gpu = index, "{reason}; re-applying");
        self.dispatch(
            pos,
            WriteOp::SetPowerLimit { limit_mw: expected },
            Origin::Drift {
                reason: format!("re-applying the {} W gpuwatch had set", expected / 1000),
            },
        );
        // The event is recorded when the write completes; the "before" is
        // what the device had.
        self.gpus[pos].expected_limit_mw = Some(actual);
    }

    fn govern(&mut self, pos: usize, reading: &Reading) {
        let gpu = &mut self.gpus[pos];
        if !gpu.enabled || gpu.mode == GovernorMode::ObserveOnly {
            return;
        }
        let Some(temperature) = reading.temperature_c else {
            return;
        };
        let Some(governor) = gpu.governor.as_mut() else {
            return;
        };
        let level = match gpu.mode {
            GovernorMode::ClockLock => Some(f64::from(
                reading
                    .locked_gpu_clock_max_mhz
                    .unwrap_or(governor.params().ceiling as u32),
            )),
            _ => reading.power_limit_mw.map(|mw| f64::from(mw) / 1000.0),
        };
        let obs = Observation {
            time: reading.device_time,
            temperature_c: f64::from(temperature),
            power_w: reading.power_draw_mw.map(|mw| f64::from(mw) / 1000.0),
            level: if gpu.dry_run { None } else { level },
            clock_mhz: reading.graphics_clock_mhz.map(f64::from),
        };
        let Decision::Set { level, reason } = governor.step(&obs) else {
            return;
        };
        let ceiling = governor.params().ceiling;
        let op = match gpu.mode {
            GovernorMode::ClockLock if level >= ceiling - 0.5 => WriteOp::ResetGpuLockedClocks,
            GovernorMode::ClockLock => WriteOp::LockGpuClocks {
                min_mhz: gpu.clock_floor_mhz().min(level as u32),
                max_mhz: level.round() as u32,
            },
            _ => WriteOp::SetPowerLimit {
                limit_mw: (level * 1000.0).round() as u32,
            },
        };
        if gpu.dry_run {
            let now = SystemTime::now();
            let repeat = gpu.last_dry_run.is_some_and(|(last, at)| {
                (last - level).abs() < 5.0
                    && now.duration_since(at).unwrap_or_default() < DRY_RUN_EVENT_INTERVAL
            });
            if !repeat {
                gpu.last_dry_run = Some((level, now));
                let unit = if gpu.mode == GovernorMode::ClockLock {
                    "MHz"
                } else {
                    "W"
                };
                self.events.record(
                    NewEvent::new(
                        EventKind::DryRunDecision,
                        Actor::governor(),
                        format!("dry run: would set {level:.0} {unit}: {reason}"),
                    )
                    .gpu(gpu.index(), gpu.uuid()),
                );
            }
            return;
        }
        let lowering = level < ceiling - 0.5;
        let uuid = gpu.uuid().to_owned();
        let clock_mode = gpu.mode == GovernorMode::ClockLock;
        // Persist first, and write only once that is acknowledged: a crash
        // right after the write must still know the governor left this GPU
        // lowered. The wait happens in the write's future, not on the loop.
        let durable = lowering.then(|| {
            self.persist(&uuid, |s| {
                if clock_mode {
                    s.governor_clock_lock = true;
                } else {
                    s.governor_lowered_limit = true;
                }
            })
        });
        self.dispatch_after(pos, op, Origin::Governor { reason }, durable);
    }

    /// Changes the desired state at once and queues its save; the ack says
    /// when it is durable (failures are logged and counted by the writer).
    fn persist(&mut self, uuid: &str, change: impl FnOnce(&mut GpuState)) -> Ack {
        self.store.update(uuid, change)
    }

    /// Sends a write to the GPU's thread.
    fn dispatch(&mut self, pos: usize, op: WriteOp, origin: Origin) {
        self.dispatch_after(pos, op, origin, None);
    }

    /// Sends a write to the GPU's thread once `durable` (the desired state
    /// the write depends on) is acknowledged, or at once without one.
    fn dispatch_after(&mut self, pos: usize, op: WriteOp, origin: Origin, durable: Option<Ack>) {
        let gpu = &mut self.gpus[pos];
        gpu.in_flight += 1;
        let before = match op {
            WriteOp::SetPowerLimit { .. } => gpu.expected_limit_mw,
            WriteOp::LockGpuClocks { .. } | WriteOp::ResetGpuLockedClocks => gpu.clock_cap_mhz,
            _ => None,
        };
        let actor = &self.sampler.slots[pos].actor;
        let queue = actor.write_queue();
        let sent = durable.is_none().then(|| actor.write(op));
        let index = gpu.index();
        self.writes.push(Box::pin(async move {
            let rx = match sent {
                Some(rx) => rx,
                None => {
                    if let Some(ack) = durable {
                        match tokio::time::timeout(PERSIST_WAIT, ack).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::error!(
                                gpu = index,
                                error = %e,
                                "writing although the desired state is not durable"
                            ),
                            Err(_) => tracing::error!(
                                gpu = index,
                                "the desired state was not durable within {}s; writing anyway",
                                PERSIST_WAIT.as_secs()
                            ),
                        }
                    }
                    queue.write(op)
                }
            };
            let result = match tokio::time::timeout(WRITE_TIMEOUT, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(BackendError::Other("device thread stopped".into())),
                Err(_) => Err(BackendError::Timeout(format!(
                    "the write did not finish within {}s",
                    WRITE_TIMEOUT.as_secs()
                ))),
            };
            WriteDone {
                gpu: pos,
                op,
                origin,
                before,
                result,
            }
        }));
    }

    fn on_write_done(&mut self, done: WriteDone) {
        let pos = done.gpu;
        let actor = done.origin.actor();
        let reason = done.origin.reason();
        let gpu = &mut self.gpus[pos];
        gpu.in_flight = gpu.in_flight.saturating_sub(1);
        let index = gpu.index();
        let uuid = gpu.uuid().to_owned();
        let durable;
        match &done.result {
            Ok(()) => {
                let (kind, change) = match done.op {
                    WriteOp::SetPowerLimit { limit_mw } => {
                        gpu.expected_limit_mw = Some(limit_mw);
                        (
                            EventKind::PowerLimitChanged,
                            Some(Change::PowerLimit(PowerLimitChange {
                                before_mw: done.before,
                                after_mw: Some(limit_mw),
                            })),
                        )
                    }
                    WriteOp::LockGpuClocks { max_mhz, .. } => {
                        gpu.clock_cap_mhz = Some(max_mhz);
                        (
                            EventKind::ClocksLocked,
                            Some(Change::ClockLock(ClockLockChange {
                                before_max_mhz: done.before,
                                after_max_mhz: Some(max_mhz),
                            })),
                        )
                    }
                    WriteOp::ResetGpuLockedClocks => {
                        gpu.clock_cap_mhz = None;
                        (
                            EventKind::ClocksReset,
                            Some(Change::ClockLock(ClockLockChange {
                                before_max_mhz: done.before,
                                after_max_mhz: None,
                            })),
                        )
                    }
                    WriteOp::ResetMemoryLockedClocks | WriteOp::ResetApplicationClocks => {
                        (EventKind::ClocksReset, None)
                    }
                };
                let what = match done.op {
                    WriteOp::ResetApplicationClocks => "application clocks reset; ",
                    WriteOp::ResetMemoryLockedClocks => "memory clock lock released; ",
                    WriteOp::ResetGpuLockedClocks => "graphics clock lock released; ",
                    _ => "",
                };
                let mut event =
                    NewEvent::new(kind, actor, format!("{what}{reason}")).gpu(index, &uuid);
                if let Some(change) = change {
                    event = event.change(change);
                }
                let recorded = self.events.record(event);
                let event = recorded.event().clone();
                durable = Some(recorded.durable());
                let description = describe_change(&event);
                if matches!(done.origin, Origin::Governor { .. }) {
                    self.gpus[pos].last_action = Some(GovernorAction {
                        time: event.time,
                        description,
                        event_seq: event.seq,
                    });
                }
                self.after_successful_write(pos, &done);
            }
            Err(e) => {
                let recorded = self.events.record(
                    NewEvent::new(
                        EventKind::ControlFailed,
                        actor,
                        format!("{:?} failed: {e} ({reason})", done.op),
                    )
                    .gpu(index, &uuid)
                    .severity(Severity::Error),
                );
                durable = Some(recorded.durable());
                tracing::warn!(gpu = index, error = %e, op = ?done.op, "write failed");
                if matches!(done.origin, Origin::Governor { .. }) {
                    self.governor_write_failed(pos, e);
                }
            }
        }
        if let Origin::Operator {
            reply, slot, part, ..
        } = done.origin
        {
            self.operator_write_done(reply, slot, part, index, &done.result, durable);
        }
        self.publish_policies();
    }

    /// Keeps the persisted "governor lowered" flags and the governor's
    /// belief in step with a write that succeeded.
    fn after_successful_write(&mut self, pos: usize, done: &WriteDone) {
        let gpu = &mut self.gpus[pos];
        let uuid = gpu.uuid().to_owned();
        let ceiling = gpu.ceiling_mw();
        match done.op {
            WriteOp::SetPowerLimit { limit_mw } => {
                let at_ceiling = ceiling.is_none_or(|c| limit_mw + LIMIT_TOLERANCE_MW >= c);
                if let Some(g) = gpu.governor.as_mut()
                    && gpu.mode == GovernorMode::PowerLimit
                    && !matches!(done.origin, Origin::Governor { .. })
                {
                    g.note_written(f64::from(limit_mw) / 1000.0, Duration::ZERO);
                }
                if at_ceiling {
                    self.persist(&uuid, |s| s.governor_lowered_limit = false);
                }
            }
            WriteOp::ResetGpuLockedClocks => {
                if let Some(g) = gpu.governor.as_mut()
                    && gpu.mode == GovernorMode::ClockLock
                {
                    let ceiling = g.params().ceiling;
                    g.note_written(ceiling, Duration::ZERO);
                }
                self.persist(&uuid, |s| s.governor_clock_lock = false);
            }
            _ => {}
        }
    }

    /// A governor write failed: fall back to clocks, or to observing.
    fn governor_write_failed(&mut self, pos: usize, e: &BackendError) {
        let gpu = &mut self.gpus[pos];
        let (mode, reason) = match (e, gpu.mode) {
            (BackendError::NotSupported(_), GovernorMode::PowerLimit)
                if gpu.facts.controls.gpu_clocks_lockable && gpu.facts.max_graphics_clock_mhz.is_some() =>
            {
                (
                    GovernorMode::ClockLock,
                    "setting the power limit is not supported; locking graphics clocks instead".to_owned(),
                )
            }
            (BackendError::NotSupported(_), _) => (
                GovernorMode::ObserveOnly,
                "the GPU refused the governor's write as not supported; observing only".to_owned(),
            ),
            (BackendError::NoPermission(_), _) => (
                GovernorMode::ObserveOnly,
                "no permission to change GPU settings (run gpuwatch-server as root or with CAP_SYS_ADMIN); observing only"
                    .to_owned(),
            ),
            _ => return,
        };
        gpu.mode = mode;
        gpu.mode_reason = reason.clone();
        gpu.governor = gpu
            .governor_params(self.config.min_write_interval, self.config.min_step_watts)
            .map(|p| {
                let ceiling = p.ceiling;
                Governor::new(p, ceiling)
            });
        let (index, uuid) = (gpu.index(), gpu.uuid().to_owned());
        self.events.record(
            NewEvent::new(EventKind::GovernorModeChanged, Actor::governor(), reason)
                .gpu(index, &uuid)
                .severity(Severity::Warning),
        );
    }

    fn on_request(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::SetPowerLimit {
                gpus,
                target,
                caller,
                reply,
            } => self.set_power_limit(&gpus, target, &caller, reply),
            ControlRequest::ResetClocks {
                gpus,
                caller,
                reply,
            } => self.reset_clocks(&gpus, &caller, reply),
            ControlRequest::SetThreshold {
                gpus,
                target,
                hysteresis_c,
                caller,
                reply,
            } => match self.set_threshold(&gpus, target, hysteresis_c, &caller) {
                Ok((response, durable)) => reply_when_durable(reply, Ok(response), durable),
                Err(status) => {
                    let _ = reply.send(Err(status));
                }
            },
        }
        self.publish_policies();
    }

    fn positions(&self, indices: &[u32]) -> Result<Vec<usize>, Status> {
        indices
            .iter()
            .map(|i| {
                self.gpus
                    .iter()
                    .position(|g| g.index() == *i)
                    .ok_or_else(|| Status::not_found(format!("no GPU with index {i}")))
            })
            .collect()
    }

    fn set_power_limit(
        &mut self,
        indices: &[u32],
        target: set_power_limit_request::Target,
        caller: &Caller,
        reply: oneshot::Sender<Result<SetPowerLimitResponse, Status>>,
    ) {
        let positions = match self.validate_power_limit(indices, target) {
            Ok(p) => p,
            Err(status) => {
                let _ = reply.send(Err(status));
                return;
            }
        };
        let id = self.next_reply;
        self.next_reply += 1;
        let mut results = Vec::new();
        let mut writes = Vec::new();
        let mut durable = AckSet::default();
        for (slot, &pos) in positions.iter().enumerate() {
            let gpu = &mut self.gpus[pos];
            let previous = gpu.operator_ceiling_mw;
            let new_ceiling = match target {
                set_power_limit_request::Target::Watts(w) => Some((w * 1000.0).round() as u32),
                set_power_limit_request::Target::RestoreDefault(_) => None,
            };
            gpu.operator_ceiling_mw = new_ceiling;
            let ceiling = gpu.ceiling_mw().unwrap_or(0);
            let (index, uuid) = (gpu.index(), gpu.uuid().to_owned());
            let params = gpu
                .governor_params(self.config.min_write_interval, self.config.min_step_watts)
                .filter(|_| gpu.mode == GovernorMode::PowerLimit);
            if let (Some(g), Some(params)) = (gpu.governor.as_mut(), params) {
                g.set_params(params);
            }
            let governor_level_mw = gpu
                .governor
                .as_ref()
                .filter(|g| gpu.mode == GovernorMode::PowerLimit && g.is_lowered() && !gpu.dry_run)
                .map(|g| (g.level() * 1000.0).round() as u32);
            let current = gpu.expected_limit_mw;
            let (apply, note) = match governor_level_mw {
                Some(level) if level < ceiling => (
                    None,
                    format!(
                        "the governor holds the GPU at {} W while it is hot; the new ceiling applies when it cools",
                        level / 1000
                    ),
                ),
                _ => (Some(ceiling), String::new()),
            };
            let apply = apply.filter(|c| current.is_none_or(|cur| cur.abs_diff(*c) > 0));
            let recorded = self.events.record(
                NewEvent::new(
                    EventKind::CeilingChanged,
                    Actor::operator(&caller.name),
                    match new_ceiling {
                        Some(mw) => format!("operator ceiling set to {} W", f64::from(mw) / 1000.0),
                        None => format!(
                            "operator ceiling removed; back to the default {} W",
                            ceiling / 1000
                        ),
                    },
                )
                .gpu(index, &uuid)
                .change(Change::PowerLimit(PowerLimitChange {
                    before_mw: previous,
                    after_mw: new_ceiling,
                })),
            );
            durable.push(recorded.durable());
            durable.push(self.persist(&uuid, |s| s.operator_ceiling_mw = new_ceiling));
            results.push(PowerLimitResult {
                index,
                uuid,
                previous_ceiling_mw: previous,
                ceiling_mw: ceiling,
                applied_limit_mw: apply.or(governor_level_mw).or(current).unwrap_or(ceiling),
                written: apply.is_some(),
                note,
            });
            if let Some(limit_mw) = apply {
                writes.push((pos, slot, limit_mw));
            }
        }
        let remaining = writes.len();
        self.replies.insert(
            id,
            PendingReply::PowerLimit {
                results,
                errors: Vec::new(),
                remaining,
                durable,
                reply,
            },
        );
        for (pos, slot, limit_mw) in writes {
            self.dispatch(
                pos,
                WriteOp::SetPowerLimit { limit_mw },
                Origin::Operator {
                    name: caller.name.clone(),
                    reply: id,
                    slot,
                    part: Part::PowerLimit,
                },
            );
        }
        self.finish_reply_if_done(id);
    }

    fn validate_power_limit(
        &self,
        indices: &[u32],
        target: set_power_limit_request::Target,
    ) -> Result<Vec<usize>, Status> {
        let positions = self.positions(indices)?;
        if let set_power_limit_request::Target::RestoreDefault(false) = target {
            return Err(Status::invalid_argument(
                "restore_default: must be true when set",
            ));
        }
        for &pos in &positions {
            let gpu = &self.gpus[pos];
            let i = gpu.index();
            if gpu.lost {
                return Err(Status::unavailable(format!(
                    "GPU {i} is lost; try again when it returns"
                )));
            }
            if !gpu.facts.controls.power_limit_settable || gpu.facts.power_default_mw.is_none() {
                return Err(Status::failed_precondition(format!(
                    "GPU {i} ({}) does not support power limit control",
                    gpu.facts.name
                )));
            }
            if let set_power_limit_request::Target::Watts(w) = target {
                let (min, max) = (
                    gpu.facts.power_min_mw.unwrap_or(0),
                    gpu.facts.power_max_mw.unwrap_or(u32::MAX),
                );
                let range = format!("{}-{} W", f64::from(min) / 1000.0, f64::from(max) / 1000.0);
                if !w.is_finite() {
                    return Err(Status::invalid_argument(format!(
                        "watts: {w} is not a number; GPU {i} allows {range}"
                    )));
                }
                let mw = w * 1000.0;
                if mw < f64::from(min) || mw > f64::from(max) {
                    return Err(Status::invalid_argument(format!(
                        "watts: {w} W is outside GPU {i}'s allowed range {range}"
                    )));
                }
            }
        }
        Ok(positions)
    }

    fn reset_clocks(
        &mut self,
        indices: &[u32],
        caller: &Caller,
        reply: oneshot::Sender<Result<ResetClocksResponse, Status>>,
    ) {
        let positions = match self.positions(indices) {
            Ok(p) => p,
            Err(status) => {
                let _ = reply.send(Err(status));
                return;
            }
        };
        if let Some(&pos) = positions.iter().find(|&&p| self.gpus[p].lost) {
            let _ = reply.send(Err(Status::unavailable(format!(
                "GPU {} is lost; try again when it returns",
                self.gpus[pos].index()
            ))));
            return;
        }
        let id = self.next_reply;
        self.next_reply += 1;
        let mut results = Vec::new();
        let mut writes = Vec::new();
        for (slot, &pos) in positions.iter().enumerate() {
            let gpu = &self.gpus[pos];
            let c = &gpu.facts.controls;
            let mut result = ClockResetResult {
                index: gpu.index(),
                uuid: gpu.uuid().to_owned(),
                application_clocks: ResetOutcome::NotSupported as i32,
                locked_gpu_clocks: ResetOutcome::NotSupported as i32,
                locked_memory_clocks: ResetOutcome::NotSupported as i32,
                error: None,
            };
            for (supported, op, part) in [
                (
                    c.application_clocks_resettable,
                    WriteOp::ResetApplicationClocks,
                    Part::ApplicationClocks,
                ),
                (
                    c.gpu_clocks_lockable,
                    WriteOp::ResetGpuLockedClocks,
                    Part::LockedGpuClocks,
                ),
                (
                    c.memory_clocks_lockable,
                    WriteOp::ResetMemoryLockedClocks,
                    Part::LockedMemoryClocks,
                ),
            ] {
                if supported {
                    set_part(&mut result, part, ResetOutcome::Unspecified);
                    writes.push((pos, slot, op, part));
                }
            }
            results.push(result);
        }
        self.replies.insert(
            id,
            PendingReply::Clocks {
                results,
                errors: Vec::new(),
                remaining: writes.len(),
                durable: AckSet::default(),
                reply,
            },
        );
        for (pos, slot, op, part) in writes {
            self.dispatch(
                pos,
                op,
                Origin::Operator {
                    name: caller.name.clone(),
                    reply: id,
                    slot,
                    part,
                },
            );
        }
        self.finish_reply_if_done(id);
    }

    fn set_threshold(
        &mut self,
        indices: &[u32],
        target: set_threshold_request::Target,
        hysteresis_c: Option<u32>,
        caller: &Caller,
    ) -> Result<(SetThresholdResponse, AckSet), Status> {
        let positions = self.positions(indices)?;
        if let set_threshold_request::Target::RestoreDefault(false) = target {
            return Err(Status::invalid_argument(
                "restore_default: must be true when set",
            ));
        }
        if let Some(h) = hysteresis_c
            && !(HYSTERESIS_MIN_C..=HYSTERESIS_MAX_C).contains(&h)
        {
            return Err(Status::invalid_argument(format!(
                "hysteresis_c: {h} °C is out of range; allowed: {HYSTERESIS_MIN_C} to {HYSTERESIS_MAX_C} °C"
            )));
        }
        let mut planned = Vec::new();
        for &pos in &positions {
            let gpu = &self.gpus[pos];
            let i = gpu.index();
            let (threshold, source) = match target {
                set_threshold_request::Target::Celsius(c) => (c, ThresholdSource::Operator),
                set_threshold_request::Target::RestoreDefault(_) => {
                    gpu.config_threshold.unwrap_or((
                        gpu.facts.slowdown_c.map_or(83, |s| {
                            s.saturating_sub(self.config.threshold_margin_c)
                                .max(THRESHOLD_MIN_C)
                        }),
                        ThresholdSource::Derived,
                    ))
                }
            };
            let hysteresis = match (hysteresis_c, target) {
                (Some(h), _) => h,
                (None, set_threshold_request::Target::RestoreDefault(_)) => gpu.config_hysteresis_c,
                (None, _) => gpu.hysteresis_c,
            };
            if threshold < THRESHOLD_MIN_C {
                return Err(Status::invalid_argument(format!(
                    "celsius: {threshold} °C is below the minimum of {THRESHOLD_MIN_C} °C"
                )));
            }
            match gpu.facts.slowdown_c {
                Some(slowdown) if threshold >= slowdown => {
                    return Err(Status::invalid_argument(format!(
                        "celsius: {threshold} °C must be below GPU {i}'s slowdown temperature of {slowdown} °C (allowed: {THRESHOLD_MIN_C} to {} °C)",
                        slowdown - 1
                    )));
                }
                None if threshold > crate::config::THRESHOLD_MAX_C => {
                    return Err(Status::invalid_argument(format!(
                        "celsius: {threshold} °C is above the maximum of {} °C",
                        crate::config::THRESHOLD_MAX_C
                    )));
                }
                _ => {}
            }
            if threshold < hysteresis + 20 {
                return Err(Status::invalid_argument(format!(
                    "hysteresis_c: {hysteresis} °C leaves GPU {i} only {} °C to cool to; the threshold must be at least 20 °C above the hysteresis",
                    threshold.saturating_sub(hysteresis)
                )));
            }
            planned.push((pos, threshold, source, hysteresis));
        }
        let mut results = Vec::new();
        let mut durable = AckSet::default();
        for (pos, threshold, source, hysteresis) in planned {
            let gpu = &mut self.gpus[pos];
            let (before_c, before_h) = (gpu.threshold_c, gpu.hysteresis_c);
            gpu.threshold_c = threshold;
            gpu.threshold_source = source;
            gpu.hysteresis_c = hysteresis;
            let params =
                gpu.governor_params(self.config.min_write_interval, self.config.min_step_watts);
            if let (Some(params), Some(g)) = (params, gpu.governor.as_mut()) {
                g.set_params(params);
            }
            let (index, uuid) = (gpu.index(), gpu.uuid().to_owned());
            let operator_value = (source == ThresholdSource::Operator).then_some(threshold);
            let operator_h = hysteresis_c.filter(|_| source == ThresholdSource::Operator);
            durable.push(self.persist(&uuid, |s| {
                s.threshold_c = operator_value;
                s.hysteresis_c = operator_h;
            }));
            let recorded = self.events.record(
                NewEvent::new(
                    EventKind::ThresholdChanged,
                    Actor::operator(&caller.name),
                    format!("threshold {before_c} °C -> {threshold} °C, hysteresis {before_h} °C -> {hysteresis} °C"),
                )
                .gpu(index, &uuid)
                .change(Change::Threshold(ThresholdChange {
                    before_c: Some(before_c),
                    after_c: Some(threshold),
                    before_hysteresis_c: Some(before_h),
                    after_hysteresis_c: Some(hysteresis),
                })),
            );
            durable.push(recorded.durable());
            results.push(ThresholdResult {
                index,
                uuid,
                previous_threshold_c: before_c,
                threshold_c: threshold,
                hysteresis_c: hysteresis,
                threshold_source: source as i32,
            });
        }
        Ok((SetThresholdResponse { results }, durable))
    }

    fn operator_write_done(
        &mut self,
        id: u64,
        slot: usize,
        part: Part,
        index: u32,
        result: &Result<(), BackendError>,
        event: Option<Ack>,
    ) {
        let Some(pending) = self.replies.get_mut(&id) else {
            return;
        };
        if let (
            Some(ack),
            PendingReply::PowerLimit { durable, .. } | PendingReply::Clocks { durable, .. },
        ) = (event, &mut *pending)
        {
            durable.push(ack);
        }
        match pending {
            PendingReply::PowerLimit {
                results,
                errors,
                remaining,
                ..
            } => {
                *remaining = remaining.saturating_sub(1);
                if let Err(e) = result {
                    errors.push(status_for(index, e));
                    if let Some(r) = results.get_mut(slot) {
                        r.written = false;
                        r.note = format!("write failed: {e}");
                    }
                }
            }
            PendingReply::Clocks {
                results,
                errors,
                remaining,
                ..
            } => {
                *remaining = remaining.saturating_sub(1);
                if let Some(r) = results.get_mut(slot) {
                    let outcome = match result {
                        Ok(()) => ResetOutcome::Reset,
                        Err(BackendError::NotSupported(_)) => ResetOutcome::NotSupported,
                        Err(_) => ResetOutcome::Failed,
                    };
                    set_part(r, part, outcome);
                    if let Err(e) = result
                        && !matches!(e, BackendError::NotSupported(_))
                    {
                        r.error = Some(e.to_string());
                        errors.push(status_for(index, e));
                    }
                }
            }
        }
        self.finish_reply_if_done(id);
    }

    fn finish_reply_if_done(&mut self, id: u64) {
        let done = match self.replies.get(&id) {
            Some(
                PendingReply::PowerLimit { remaining, .. } | PendingReply::Clocks { remaining, .. },
            ) => *remaining == 0,
            None => false,
        };
        if !done {
            return;
        }
        match self.replies.remove(&id) {
            Some(PendingReply::PowerLimit {
                results,
                errors,
                durable,
                reply,
                ..
            }) => {
                reply_when_durable(
                    reply,
                    combine(errors, SetPowerLimitResponse { results }),
                    durable,
                );
            }
            Some(PendingReply::Clocks {
                results,
                errors,
                durable,
                reply,
                ..
            }) => {
                reply_when_durable(
                    reply,
                    combine(errors, ResetClocksResponse { results }),
                    durable,
                );
            }
            None => {}
        }
    }

    /// Gives back every GPU the governor lowered, and records it.
    async fn shutdown_restore(mut self) {
        self.events.record(NewEvent::new(
            EventKind::DaemonStopping,
            Actor::shutdown(),
            "daemon stopping",
        ));
        // Let writes already under way finish first.
        let _ = tokio::time::timeout(SHUTDOWN_RESTORE_TIMEOUT, async {
            while let Some(done) = self.writes.next().await {
                self.on_write_done(done);
            }
        })
        .await;
        for pos in 0..self.gpus.len() {
            let gpu = &self.gpus[pos];
            if gpu.dry_run || gpu.lost {
                continue;
            }
            let saved = self.store.get(gpu.uuid());
            let lowered = gpu.governor.as_ref().is_some_and(Governor::is_lowered)
                || saved.governor_lowered_limit;
            match gpu.mode {
                GovernorMode::PowerLimit if lowered => {
                    if let Some(ceiling) = gpu.ceiling_mw() {
                        self.dispatch(
                            pos,
                            WriteOp::SetPowerLimit { limit_mw: ceiling },
                            Origin::Shutdown,
                        );
                    }
                }
                GovernorMode::ClockLock
                    if lowered || saved.governor_clock_lock || gpu.clock_cap_mhz.is_some() =>
                {
                    self.dispatch(pos, WriteOp::ResetGpuLockedClocks, Origin::Shutdown);
                }
                _ => {}
            }
        }
        let restoring = self.writes.len();
        if restoring > 0 {
            tracing::info!(gpus = restoring, "restoring GPUs the governor lowered");
        }
        let finished = tokio::time::timeout(SHUTDOWN_RESTORE_TIMEOUT, async {
            while let Some(done) = self.writes.next().await {
                self.on_write_done(done);
            }
        })
        .await;
        if finished.is_err() {
            tracing::error!(
                "some GPUs did not answer the restore in time; the next start will clear their throttle"
            );
        }
    }
}

fn set_part(r: &mut ClockResetResult, part: Part, outcome: ResetOutcome) {
    let value = outcome as i32;
    match part {
        Part::ApplicationClocks => r.application_clocks = value,
        Part::LockedGpuClocks => r.locked_gpu_clocks = value,
        Part::LockedMemoryClocks => r.locked_memory_clocks = value,
        Part::PowerLimit => {}
    }
}

/// Ok when nothing failed; otherwise the first failure's code with every
/// failure named.
fn combine<T>(errors: Vec<Status>, ok: T) -> Result<T, Status> {
    match errors.as_slice() {
        [] => Ok(ok),
        [only] => Err(only.clone()),
        [first, ..] => {
            let all: Vec<_> = errors.iter().map(|e| e.message().to_owned()).collect();
            Err(Status::new(first.code(), all.join("; ")))
        }
    }
}

/// Answers an RPC once what it changed is durable, without holding up the
/// control loop: a change that could not be made durable is not an OK.
fn reply_when_durable<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, Status>>,
    result: Result<T, Status>,
    durable: AckSet,
) {
    if durable.is_empty() {
        let _ = reply.send(result);
        return;
    }
    tokio::spawn(async move {
        let result = match (result, durable.wait().await) {
            (Ok(_), Err(e)) => Err(not_durable(&e)),
            (result, _) => result,
        };
        let _ = reply.send(result);
    });
}

/// The gRPC status for a change that was made but is not on disk.
fn not_durable(e: &PersistError) -> Status {
    Status::unavailable(format!(
        "the change was made but could not be saved, so it would not survive a restart: {e}"
    ))
}

fn refuse(request: ControlRequest, status: Status) {
    match request {
        ControlRequest::SetPowerLimit { reply, .. } => {
            let _ = reply.send(Err(status));
        }
        ControlRequest::ResetClocks { reply, .. } => {
            let _ = reply.send(Err(status));
        }
        ControlRequest::SetThreshold { reply, .. } => {
            let _ = reply.send(Err(status));
        }
    }
}

/// One line for a policy's "last action".
fn describe_change(event: &crate::api::Event) -> String {
    match &event.change {
        Some(Change::PowerLimit(p)) => format!(
            "power limit {} -> {}: {}",
            p.before_mw
                .map_or("?".to_owned(), |mw| format!("{} W", mw / 1000)),
            p.after_mw
                .map_or("?".to_owned(), |mw| format!("{} W", mw / 1000)),
            event.reason
        ),
        Some(Change::ClockLock(c)) => format!(
            "graphics clock cap {} -> {}: {}",
            c.before_max_mhz
                .map_or("none".to_owned(), |m| format!("{m} MHz")),
            c.after_max_mhz
                .map_or("none".to_owned(), |m| format!("{m} MHz")),
            event.reason
        ),
        _ => event.reason.clone(),
    }
}
