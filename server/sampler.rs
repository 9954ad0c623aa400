//! The sampler: reads every GPU on a fixed cadence and publishes one frame
//! per tick to the hub.
//!
//! Each tick asks every GPU's [`DeviceActor`] for a reading and waits until a
//! deadline (a fraction of the interval). A GPU that has not answered by then
//! is published with its last good reading marked STALE (the reading's age
//! says how old), and is not asked again until its call returns — so one hung
//! driver call never costs the other GPUs their cadence. A GPU that reports
//! GpuLost is published as LOST, probed about once a second, and announced
//! with events when it goes and when it comes back. Hardware slowdown
//! transitions and XID errors also become events here, since this is where
//! consecutive readings meet.
//!
//! Each tick also tells the control plane what it saw of every GPU
//! ([`Observed`]): a fresh reading, the GPU lost, or the GPU back with its
//! facts read afresh. The sampler owns the device facts; the control plane
//! borrows them through [`Sampler::facts`] and writes through the queues
//! of [`Sampler::write_queues`], never through the slots.
//!
//! Ticks are numbered from the daemon's start time in Unix milliseconds, so
//! sequence numbers keep rising across restarts (at up to 1 kHz).

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::{sync::oneshot, time::MissedTickBehavior};

use crate::{
    actor::{DeviceActor, ReadOutcome, SharedReader, Ticket, WriteQueue},
    api::{EventKind, Frame, GovernorState, GpuHealth, Severity},
    attribution::tracker::{GpuInput, GpuView, Tracker},
    backend::{
        BackendError, DeviceEvent, DeviceFacts, MigReading, ReadScope, Reading, SlowReading,
    },
    config::SamplerConfig,
    events::{Actor, EventLog, NewEvent},
    hub::Hub,
    throttle::{self, mask},
    tick::{SlowPart, TickFrame},
    wire,
};

/// Health of one GPU as the sampler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Ok,
    /// The last read failed (not GpuLost).
    Error(String),
    Lost(String),
}

/// What one tick saw of one GPU, for the control plane.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// Nothing new: the read is late or failed, or the GPU is still lost
    /// (or back, with its facts still being read).
    Nothing,
    /// A fresh reading.
    Reading(Reading),
    /// The GPU stopped answering (reported once, when it goes).
    Lost,
    /// The GPU answers again and its facts have been read afresh; with
    /// this tick's reading, if it is fresh.
    Recovered(Option<Reading>),
}

/// The sampler's view of one GPU.
#[derive(Debug)]
pub struct GpuSlot {
    actor: DeviceActor,
    facts: DeviceFacts,
    health: Health,
    /// The control plane was told this GPU is lost and not yet told it is
    /// back.
    reported_lost: bool,
    /// A read that has not answered yet.
    pending: Option<oneshot::Receiver<ReadOutcome>>,
    /// The ticket of the pending read while it is the shared reader's.
    pending_shared: Option<Ticket>,
    /// When the pending read was asked for.
    pending_since: SystemTime,
    /// Refreshed facts requested after a recovery.
    pending_describe: Option<oneshot::Receiver<Result<DeviceFacts, BackendError>>>,
    /// True while `pending` has outlived a tick deadline.
    stale: bool,
    last: Option<(Reading, SystemTime)>,
    last_slow: Option<(SlowReading, SystemTime)>,
    last_probe: Option<Instant>,
    hw_slowdown: bool,
    /// The published slow part, with the slow reading and attribution view
    /// it was made from: rebuilt only when either changes.
    slow_part: Option<SlowCache>,
}

/// A GPU's published slow part and what it was made from.
#[derive(Debug)]
struct SlowCache {
    at: SystemTime,
    users: Option<Arc<GpuView>>,
    part: Arc<SlowPart>,
}

impl GpuSlot {
    /// A slot for a GPU whose facts are known.
    pub fn new(actor: DeviceActor, facts: DeviceFacts) -> Self {
        Self {
            actor,
            facts,
            health: Health::Ok,
            reported_lost: false,
            pending: None,
            pending_shared: None,
            pending_since: SystemTime::UNIX_EPOCH,
            pending_describe: None,
            stale: false,
            last: None,
            last_slow: None,
            last_probe: None,
            hw_slowdown: false,
            slow_part: None,
        }
    }

    /// A slot for a GPU that could not be described at startup (lost).
    pub fn lost(actor: DeviceActor, index: u32, why: String) -> Self {
        let mut slot = Self::new(
            actor,
            DeviceFacts {
                index,
                ..DeviceFacts::default()
            },
        );
        slot.health = Health::Lost(why);
        slot
    }

    pub fn index(&self) -> u32 {
        self.facts.index
    }

    pub fn is_lost(&self) -> bool {
        matches!(self.health, Health::Lost(_))
    }

    /// The latest good reading, if any.
    pub fn last_reading(&self) -> Option<&Reading> {
        self.last.as_ref().map(|(r, _)| r)
    }

    /// Takes refreshed facts if they have arrived; true when a refresh
    /// finished (whether or not it succeeded).
    fn poll_describe(&mut self) -> bool {
        let Some(rx) = self.pending_describe.as_mut() else {
            return false;
        };
        match rx.try_recv() {
            Ok(result) => {
                self.pending_describe = None;
                match result {
                    Ok(facts) => self.facts = facts,
                    // Never described (lost at start): without its facts
                    // the control plane could only observe it, so ask
                    // again rather than report it back half-known.
                    Err(e) if self.facts.uuid.is_empty() => {
                        tracing::warn!(gpu = self.index(), error = %e, "GPU answers but did not describe itself; asking again");
                        self.pending_describe = Some(self.actor.describe());
                        return false;
                    }
                    Err(_) => {}
                }
                true
            }
            Err(oneshot::error::TryRecvError::Empty) => false,
            Err(oneshot::error::TryRecvError::Closed) => {
                self.pending_describe = None;
                true
            }
        }
    }

    /// What the control plane is told of this tick, and what it has now
    /// been told.
    fn observe(&mut self, fresh: bool, described: bool) -> Observed {
        let lost = self.is_lost();
        let reading = if fresh {
            self.last_reading().cloned()
        } else {
            None
        };
        if lost {
            if self.reported_lost {
                return Observed::Nothing;
            }
            self.reported_lost = true;
            return Observed::Lost;
        }
        if described {
            self.reported_lost = false;
            return Observed::Recovered(reading);
        }
        if self.reported_lost || self.pending_describe.is_some() {
            return Observed::Nothing;
        }
        reading.map_or(Observed::Nothing, Observed::Reading)
    }

    fn wire_health(&self) -> GpuHealth {
        match &self.health {
            Health::Lost(_) => GpuHealth::Lost,
            Health::Error(_) => GpuHealth::Error,
            Health::Ok if self.stale => GpuHealth::Stale,
            Health::Ok => GpuHealth::Ok,
        }
    }

    fn error_text(&self) -> Option<String> {
        match &self.health {
            Health::Lost(why) | Health::Error(why) => Some(why.clone()),
            Health::Ok if self.stale => Some("read did not finish before the tick deadline".into()),
            Health::Ok => None,
        }
    }
}

/// The sampler.
#[derive(Debug)]
pub struct Sampler {
    slots: Vec<GpuSlot>,
    hub: Arc<Hub>,
    events: Arc<EventLog>,
    config: SamplerConfig,
    next_seq: u64,
    last_slow: Option<Instant>,
    /// Who uses each GPU: handed every slow reading, read at publish.
    tracker: Option<Tracker>,
    /// Reads the healthy GPUs in one batch per tick (None when its thread
    /// could not be started or has gone: every GPU is then read by its own).
    reader: Option<SharedReader>,
}

impl Sampler {
    pub fn new(
        slots: Vec<GpuSlot>,
        hub: Arc<Hub>,
        events: Arc<EventLog>,
        config: SamplerConfig,
    ) -> Self {
        let start_ms = hub.first_seq();
        Self {
            slots,
            hub,
            events,
            config,
            next_seq: start_ms,
            last_slow: None,
            tracker: None,
            reader: SharedReader::spawn()
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "no shared reader thread; each GPU is read by its own")
                })
                .ok(),
        }
    }

    /// Joins attribution: every slow reading goes to `tracker`, and the
    /// published samples carry its latest view.
    pub fn with_attribution(mut self, tracker: Tracker) -> Self {
        self.tracker = Some(tracker);
        self
    }

    /// Hands the slow readings of every GPU that answers to the tracker.
    fn submit_slow(&self) {
        let Some(tracker) = &self.tracker else {
            return;
        };
        let input = self
            .slots
            .iter()
            .filter(|s| !s.is_lost())
            .filter_map(|s| {
                let (slow, at) = s.last_slow.as_ref()?;
                Some(GpuInput {
                    index: s.index(),
                    uuid: s.facts.uuid.clone(),
                    at: *at,
                    processes: slow.processes.clone().unwrap_or_default(),
                    mig: slow.mig.clone(),
                })
            })
            .collect();
        tracker.submit(input);
    }

    /// How many GPUs the sampler reads.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The facts of the GPU at position `pos` (`0..len()`).
    ///
    /// # Panics
    /// When `pos` is out of range (a programming error).
    pub fn facts(&self, pos: usize) -> &DeviceFacts {
        &self.slots[pos].facts
    }

    /// The facts of every GPU, by position.
    pub fn all_facts(&self) -> Vec<&DeviceFacts> {
        self.slots.iter().map(|s| &s.facts).collect()
    }

    /// Handles that queue writes to each GPU's device thread, by position:
    /// the control plane's way to write, without reaching into the slots.
    pub fn write_queues(&self) -> Vec<WriteQueue> {
        self.slots.iter().map(|s| s.actor.write_queue()).collect()
    }

    /// A ticker at the sampler's interval that skips missed ticks.
    pub fn ticker(&self) -> tokio::time::Interval {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        ticker
    }

    /// Publishes device identities to the hub.
    pub fn publish_devices(&self) {
        let devices = self
            .slots
            .iter()
            .map(|s| {
                let mig = s.last_slow.as_ref().and_then(|(slow, _)| slow.mig.as_ref());
                wire::device_info(&s.facts, s.wire_health(), s.last_reading(), mig)
            })
            .collect();
        self.hub.set_devices(devices);
    }

    /// Runs one tick: read, detect transitions, publish. Returns what the
    /// tick saw of each GPU, by position, for the control plane; `governor`
    /// gives each GPU's governor state for the published samples.
    pub async fn tick(&mut self, governor: impl Fn(u32) -> GovernorState) -> Vec<Observed> {
        let started = Instant::now();
        let tick_wall = SystemTime::now();
        let slow_fields = self
            .last_slow
            .is_none_or(|t| started.duration_since(t) >= self.config.slow_interval);
        if slow_fields {
            self.last_slow = Some(started);
        }
        let scope = ReadScope { slow_fields };
        // The shared reader takes this tick's batch unless it is still
        // inside a late call from an earlier one.
        let reader_free = self.reader.is_some()
            && !self
                .slots
                .iter()
                .any(|s| s.pending.is_some() && s.pending_shared.is_some());
        let mut batch = Vec::new();
        for slot in &mut self.slots {
            if slot.pending.is_some() {
                continue;
            }
            if slot.is_lost() {
                let due = slot
                    .last_probe
                    .is_none_or(|t| started.duration_since(t) >= self.config.lost_probe_interval);
                if !due {
                    continue;
                }
                slot.last_probe = Some(started);
            }
            // The shared reader takes fast reads of healthy GPUs. Slow
            // reads run in parallel on the GPUs' own threads (on NVML one
            // takes tens of milliseconds: eight in a row would miss the
            // deadline); so does a GPU that is lost or failing (its calls
            // may be slow) or being described again (the refresh of its
            // facts must answer before the read that follows it).
            if reader_free
                && !slow_fields
                && slot.health == Health::Ok
                && slot.pending_describe.is_none()
            {
                let (job, read) = slot.actor.read_job(scope);
                batch.push(job);
                slot.pending = Some(read.reply);
                slot.pending_shared = Some(read.ticket);
            } else {
                slot.pending = Some(slot.actor.read(scope));
                slot.pending_shared = None;
            }
            slot.pending_since = tick_wall;
        }
        if !batch.is_empty() && !self.reader.as_ref().is_some_and(|r| r.submit(batch)) {
            tracing::warn!("the shared reader thread has stopped; each GPU is read by its own");
            self.reader = None;
            Self::take_back_shared_reads(&mut self.slots, scope);
        }

        let read_timeout = self.config.effective_read_timeout();
        let deadline = tokio::time::Instant::from_std(started + read_timeout);
        // By half the read timeout a batch that is not done is stuck in
        // one GPU's call: the reads it has not started go to their GPUs'
        // own threads, which have the other half.
        let take_back_at = tokio::time::Instant::from_std(started + read_timeout / 2);
        let mut taken_back = false;
        let mut observed = Vec::with_capacity(self.slots.len());
        let mut devices_changed = false;
        for pos in 0..self.slots.len() {
            let slot = &mut self.slots[pos];
            let mut described = slot.poll_describe();
            let mut fresh = false;
            let Some(rx) = slot.pending.as_mut() else {
                devices_changed |= described;
                observed.push(slot.observe(fresh, described));
                continue;
            };
            let shared = slot.pending_shared.is_some() && !taken_back;
            let mut answer =
                tokio::time::timeout_at(if shared { take_back_at } else { deadline }, rx).await;
            if answer.is_err() && shared {
                taken_back = true;
                Self::take_back_shared_reads(&mut self.slots[pos..], scope);
                if let Some(rx) = self.slots[pos].pending.as_mut() {
                    answer = tokio::time::timeout_at(deadline, rx).await;
                }
            }
            let slot = &mut self.slots[pos];
            match answer {
                Ok(Ok(outcome)) => {
                    slot.pending = None;
                    slot.pending_shared = None;
                    slot.stale = false;
                    fresh = Self::absorb(slot, outcome, &self.events, &mut devices_changed);
                    // A GPU's own thread answers in order, and one being
                    // described is read there: facts asked for before
                    // this read are in by now.
                    described |= slot.poll_describe();
                }
                Ok(Err(_)) => {
                    // The device thread is gone, or the device panicked
                    // in a call: treat as an error.
                    slot.pending = None;
                    slot.pending_shared = None;
                    slot.health = Health::Error("device thread stopped".into());
                }
                Err(_) => {
                    if !slot.stale {
                        tracing::warn!(
                            gpu = slot.index(),
                            "GPU read is late; publishing last reading as stale"
                        );
                    }
                    slot.stale = true;
                }
            }
            devices_changed |= described;
            observed.push(slot.observe(fresh, described));
        }
        self.hub.stats.record_sample_duration(started.elapsed());
        if slow_fields {
            self.submit_slow();
        }

        if devices_changed {
            self.publish_devices();
        }
        self.publish(tick_wall, governor);
        observed
    }

    /// Takes back from the shared reader every read of `slots` it has not
    /// started, and asks each of those GPUs' own threads instead.
    fn take_back_shared_reads(slots: &mut [GpuSlot], scope: ReadScope) {
        for slot in slots {
            if slot.pending.is_some() && slot.pending_shared.as_ref().is_some_and(Ticket::cancel) {
                slot.pending = Some(slot.actor.read(scope));
                slot.pending_shared = None;
            }
        }
    }

    /// Takes a finished read into the slot. Returns true for a fresh reading.
    fn absorb(
        slot: &mut GpuSlot,
        outcome: ReadOutcome,
        events: &EventLog,
        devices_changed: &mut bool,
    ) -> bool {
        let index = slot.index();
        for event in outcome.events {
            match event {
                DeviceEvent::Xid(code) => {
                    let xid = crate::xid::decode(code);
                    events.record(
                        NewEvent::new(
                            EventKind::XidError,
                            Actor::device(),
                            format!(
                                "XID {code} reported by the driver: {} (action: {})",
                                xid.meaning, xid.action_text
                            ),
                        )
                        .gpu(index, &slot.facts.uuid)
                        .severity(xid.severity())
                        .xid(code),
                    );
                }
            }
        }
        match outcome.result {
            Ok(mut reading) => {
                if let Health::Lost(_) = slot.health {
                    events.record(
                        NewEvent::new(
                            EventKind::GpuRecovered,
                            Actor::device(),
                            "GPU answers again",
                        )
                        .gpu(index, &slot.facts.uuid),
                    );
                    slot.pending_describe = Some(slot.actor.describe());
                    *devices_changed = true;
                } else if let Health::Error(_) = slot.health {
                    *devices_changed = true;
                }
                slot.health = Health::Ok;
                let hw_now = reading
                    .throttle_mask
                    .is_some_and(|m| m & mask::ANY_HW_SLOWDOWN != 0);
                if hw_now != slot.hw_slowdown {
                    slot.hw_slowdown = hw_now;
                    let (kind, severity, reason) = if hw_now {
                        let names: Vec<_> = throttle::decode(
                            reading.throttle_mask.unwrap_or(0) & mask::ANY_HW_SLOWDOWN,
                        )
                        .map(|s| s.summary)
                        .collect();
                        let temp = reading
                            .temperature_c
                            .map_or(String::new(), |t| format!(" at {t} °C"));
                        (
                            EventKind::HwSlowdownEntered,
                            Severity::Warning,
                            format!("hardware slowdown ({}){temp}", names.join(", ")),
                        )
                    } else {
                        (
                            EventKind::HwSlowdownLeft,
                            Severity::Info,
                            "hardware slowdown ended".to_owned(),
                        )
                    };
                    events.record(
                        NewEvent::new(kind, Actor::device(), reason)
                            .gpu(index, &slot.facts.uuid)
                            .severity(severity),
                    );
                }
                if let Some(mut slow) = reading.slow.take() {
                    slow.bound_process_shares(
                        reading.utilization_gpu_pct,
                        reading.utilization_memory_pct,
                    );
                    let before = slot.last_slow.as_ref().map(|(s, _)| s.mig.as_ref());
                    if let Some(before) = before
                        && let Some(reason) = mig_change(before, slow.mig.as_ref())
                    {
                        events.record(
                            NewEvent::new(EventKind::MigChanged, Actor::device(), reason)
                                .gpu(index, &slot.facts.uuid),
                        );
                        *devices_changed = true;
                    } else if before.is_none() && slow.mig.as_ref().is_some_and(|m| m.enabled) {
                        // The first reading: the instances join ListDevices.
                        *devices_changed = true;
                    }
                    slot.last_slow = Some((slow, outcome.at));
                }
                slot.last = Some((reading, outcome.at));
                true
            }
            Err(BackendError::GpuLost(why)) => {
                if !slot.is_lost() {
                    tracing::error!(gpu = index, %why, "GPU lost");
                    events.record(
                        NewEvent::new(
                            EventKind::GpuLost,
                            Actor::device(),
                            format!("GPU lost: {why}"),
                        )
                        .gpu(index, &slot.facts.uuid)
                        .severity(Severity::Error),
                    );
                    slot.hw_slowdown = false;
                    *devices_changed = true;
                }
                slot.health = Health::Lost(why);
                slot.last_probe = Some(Instant::now());
                false
            }
            Err(e) => {
                let text = e.to_string();
                if slot.health != Health::Error(text.clone()) {
                    tracing::warn!(gpu = index, error = %text, "GPU read failed");
                    *devices_changed = true;
                }
                slot.health = Health::Error(text);
                false
            }
        }
    }

    fn publish(&mut self, tick_wall: SystemTime, governor: impl Fn(u32) -> GovernorState) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let view = self.tracker.as_ref().map(Tracker::view);
        let mut slow_parts = Vec::with_capacity(self.slots.len());
        let samples = self
            .slots
            .iter_mut()
            .map(|slot| {
                let error = slot.error_text();
                let lost = slot.is_lost();
                let read_at = slot.last.as_ref().map(|(_, at)| *at).filter(|_| !lost);
                // A GPU that has never answered is as old as the read it is
                // stuck in.
                let never_read = slot.stale && read_at.is_none();
                let time = read_at.unwrap_or(if never_read {
                    slot.pending_since
                } else {
                    tick_wall
                });
                let users = view.as_ref().and_then(|v| v.gpu_arc(&slot.facts.uuid));
                let meta = wire::SampleMeta {
                    facts: &slot.facts,
                    seq,
                    time,
                    age_ms: wire::age_ms(time, tick_wall),
                    health: slot.wire_health(),
                    error: error.as_deref(),
                    governor_state: governor(slot.index()),
                };
                let reading = if lost { None } else { slot.last_reading() };
                let sample = wire::sample(meta, reading, slot.last_slow.as_ref());
                let readable = reading.is_some();
                slow_parts.push(if readable {
                    slot.slow_part(users)
                } else {
                    None
                });
                sample
            })
            .collect();
        self.hub.publish_tick(TickFrame::new(
            Frame {
                seq,
                time: Some(tick_wall.into()),
                samples,
            },
            slow_parts,
        ));
    }
}

impl GpuSlot {
    /// The slow part for this tick: the one already made from the same
    /// slow reading and attribution view, or a new one.
    fn slow_part(&mut self, users: Option<&Arc<GpuView>>) -> Option<Arc<SlowPart>> {
        let (slow, at) = self.last_slow.as_ref()?;
        let same_users = |cached: &Option<Arc<GpuView>>| match (cached, users) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if let Some(c) = &self.slow_part
            && c.at == *at
            && same_users(&c.users)
        {
            return Some(c.part.clone());
        }
        let part = Arc::new(wire::slow_part(slow, *at, users.map(|u| &**u)));
        self.slow_part = Some(SlowCache {
            at: *at,
            users: users.cloned(),
            part: part.clone(),
        });
        Some(part)
    }
}

/// What changed between two MIG readings of one GPU, in words; `None`
/// when nothing did.
fn mig_change(before: Option<&MigReading>, after: Option<&MigReading>) -> Option<String> {
    let enabled = |m: Option<&MigReading>| m.is_some_and(|m| m.enabled);
    let uuids = |m: Option<&MigReading>| -> Vec<(String, String)> {
        m.iter()
            .flat_map(|m| &m.instances)
            .map(|i| (i.uuid.clone(), i.profile.clone()))
            .collect()
    };
    let (b, a) = (uuids(before), uuids(after));
    let mut parts = Vec::new();
    if enabled(before) != enabled(after) {
        parts.push(if enabled(after) {
            "MIG mode enabled".to_owned()
        } else {
            "MIG mode disabled".to_owned()
        });
    }
    let created: Vec<String> = a
        .iter()
        .filter(|x| !b.contains(x))
        .map(|(u, p)| format!("{p} {u}"))
        .collect();
    let destroyed: Vec<String> = b
        .iter()
        .filter(|x| !a.contains(x))
        .map(|(u, p)| format!("{p} {u}"))
        .collect();
    if !created.is_empty() {
        parts.push(format!("created {}", created.join(", ")));
    }
    if !destroyed.is_empty() {
        parts.push(format!("destroyed {}", destroyed.join(", ")));
    }
    (!parts.is_empty()).then(|| format!("MIG configuration changed: {}", parts.join("; ")))
}

/// How long startup waits for one GPU to describe itself.
pub const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

// The test build's global allocator counts allocations: the one unsafe
// impl outside the NVML bindings, test-only, forwarding to `System`.
#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    //! The fast tick's cost must not grow with the processes on a GPU: a
    //! tick between two slow readings refers to the slow part already made.
    //! Allocations are counted per thread, so other tests running at the
    //! same time do not disturb the count.

    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
    };

    use super::*;
    use crate::{backend::sim::SimBackend, config::SimulatorConfig, daemon::open_devices};

    struct Counting;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    // SAFETY: every call is passed to the system allocator unchanged; the
    // counter is a const-initialised thread-local that never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.with(|c| c.set(c.get() + 1));
            // SAFETY: the caller's contract is the system allocator's.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: as above.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATIONS.with(|c| c.set(c.get() + 1));
            // SAFETY: as above.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    fn allocations() -> u64 {
        ALLOCATIONS.with(Cell::get)
    }

    /// A sampler over one simulated H100 running `processes` processes of
    /// one pod, its slow readings an hour apart (so only the first tick
    /// takes one).
    async fn sampler(processes: u32) -> Sampler {
        let list: Vec<String> = (0..processes)
            .map(|i| {
                format!(
                    "{{ pid = {}, name = \"worker-{i}\", memory_mib = 512, namespace = \"ml\", pod = \"trainer-{}\", container = \"main\" }}",
                    5000 + i,
                    i % 4
                )
            })
            .collect();
        let toml = format!(
            "[[gpus]]\npreset = \"h100-sxm\"\nprocesses = [{}]\n",
            list.join(", ")
        );
        let config: SimulatorConfig = toml::from_str(&toml).expect("simulator config");
        let backend = SimBackend::new(&config);
        let slots = open_devices(&backend, &tokio_util::sync::CancellationToken::new())
            .await
            .expect("the simulated GPU opens");
        let config = SamplerConfig {
            slow_interval: Duration::from_secs(3600),
            ..SamplerConfig::default()
        };
        let hub = Arc::new(Hub::new(config.interval, config.slow_interval, 600));
        let (events, _) = EventLog::open(None, 100);
        Sampler::new(slots, hub, Arc::new(events), config)
    }

    /// Allocations made by one publish, after a first tick that read the
    /// slow fields and a first publish that made the slow part.
    async fn allocations_per_publish(processes: u32) -> (u64, Arc<Hub>) {
        let mut s = sampler(processes).await;
        s.tick(|_| GovernorState::Idle).await;
        let before = allocations();
        s.publish(SystemTime::now(), |_| GovernorState::Idle);
        let after = allocations();
        (after - before, s.hub.clone())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_tick_between_slow_readings_allocates_nothing_per_process() {
        let (none, _) = allocations_per_publish(0).await;
        let (many, hub) = allocations_per_publish(64).await;
        assert_eq!(
            many, none,
            "a publish with 64 processes allocates as much as one with none"
        );
        // And every tick of that slow reading carries the processes, from
        // the one shared part.
        let sub = hub.subscribe(Some(0));
        assert_eq!(sub.replay.len(), 2);
        let parts: Vec<_> = sub
            .replay
            .iter()
            .map(|t| t.slow(0).expect("a slow part").clone())
            .collect();
        assert!(Arc::ptr_eq(&parts[0], &parts[1]));
        assert_eq!(parts[0].sample().processes.len(), 64);
        let whole = hub.latest().expect("a frame");
        assert_eq!(whole.samples[0].processes.len(), 64);
    }
}

#[cfg(test)]
mod hung_reads {
    //! A read that hangs on the shared reader must cost the GPUs after it
    //! in the batch nothing: the sampler takes their reads back and asks
    //! their own threads, in the same tick, and keeps using their threads
    //! until the hung call returns. Slow reads never go to the shared
    //! reader.

    use std::{
        sync::{Condvar, Mutex},
        thread,
    };

    use super::*;
    use crate::backend::GpuDevice;

    /// Closed: reads of the GPU that waits on it block until it opens.
    #[derive(Default)]
    struct Gate {
        closed: Mutex<bool>,
        opened: Condvar,
    }

    impl Gate {
        fn set(&self, closed: bool) {
            *self.closed.lock().expect("gate") = closed;
            self.opened.notify_all();
        }

        fn pass(&self) {
            let mut closed = self.closed.lock().expect("gate");
            while *closed {
                closed = self.opened.wait(closed).expect("gate");
            }
        }
    }

    /// A GPU that records which thread read it, and waits on `gate`.
    struct Recorded {
        index: u32,
        gate: Option<Arc<Gate>>,
        reads: Arc<Mutex<Vec<(u32, String)>>>,
    }

    impl GpuDevice for Recorded {
        fn describe(&mut self) -> Result<DeviceFacts, BackendError> {
            Ok(DeviceFacts {
                index: self.index,
                ..DeviceFacts::default()
            })
        }
        fn read(&mut self, _: ReadScope) -> Result<Reading, BackendError> {
            if let Some(gate) = &self.gate {
                gate.pass();
            }
            let name = thread::current().name().unwrap_or("?").to_owned();
            self.reads.lock().expect("reads").push((self.index, name));
            Ok(Reading::default())
        }
        fn set_power_limit(&mut self, _: u32) -> Result<(), BackendError> {
            Ok(())
        }
        crate::backend::accept_clock_writes!();
    }

    /// Which GPUs a tick read fresh, and which thread read each.
    async fn tick(
        s: &mut Sampler,
        reads: &Mutex<Vec<(u32, String)>>,
    ) -> (Vec<bool>, Vec<(u32, String)>) {
        let observed = s.tick(|_| GovernorState::Idle).await;
        let fresh = observed
            .iter()
            .map(|o| matches!(o, Observed::Reading(_)))
            .collect();
        let mut who = std::mem::take(&mut *reads.lock().expect("reads"));
        who.sort();
        (fresh, who)
    }

    fn on(thread: &str, gpus: &[u32]) -> Vec<(u32, String)> {
        gpus.iter().map(|&g| (g, thread.to_owned())).collect()
    }

    fn own(gpus: &[u32]) -> Vec<(u32, String)> {
        gpus.iter().map(|&g| (g, format!("gpu{g}"))).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_read_on_the_shared_reader_costs_the_gpus_after_it_nothing() {
        let gate = Arc::new(Gate::default());
        let reads = Arc::new(Mutex::new(Vec::new()));
        let slots = (0..3)
            .map(|index| {
                let device = Recorded {
                    index,
                    gate: (index == 0).then(|| gate.clone()),
                    reads: reads.clone(),
                };
                let actor = DeviceActor::spawn(index, Box::new(device)).expect("thread");
                GpuSlot::new(
                    actor,
                    DeviceFacts {
                        index,
                        ..DeviceFacts::default()
                    },
                )
            })
            .collect();
        let config = SamplerConfig {
            slow_interval: Duration::from_secs(3600),
            read_timeout: Some(Duration::from_secs(2)),
            ..SamplerConfig::default()
        };
        let hub = Arc::new(Hub::new(config.interval, config.slow_interval, 600));
        let (events, _) = EventLog::open(None, 100);
        let mut s = Sampler::new(slots, hub, Arc::new(events), config);

        // The first tick reads the slow fields: each GPU on its own thread,
        // in parallel.
        let (fresh, who) = tick(&mut s, &reads).await;
        assert_eq!(fresh, [true, true, true]);
        assert_eq!(who, own(&[0, 1, 2]));

        // Fast reads of healthy GPUs: one batch on the shared reader.
        let (fresh, who) = tick(&mut s, &reads).await;
        assert_eq!(fresh, [true, true, true]);
        assert_eq!(who, on("gpu-reader", &[0, 1, 2]));

        // GPU 0, first in the batch, hangs: the reads behind it are taken
        // back and answered by their own threads in the same tick.
        gate.set(true);
        let (fresh, who) = tick(&mut s, &reads).await;
        assert_eq!(fresh, [false, true, true]);
        assert_eq!(who, own(&[1, 2]));
        // While the call hangs the shared reader is not given more.
        let (fresh, who) = tick(&mut s, &reads).await;
        assert_eq!(fresh, [false, true, true]);
        assert_eq!(who, own(&[1, 2]));

        // The call returns: its late answer is taken, then the batch
        // goes back to the shared reader.
        gate.set(false);
        let (fresh, who) = tick(&mut s, &reads).await;
        assert_eq!(fresh, [true, true, true]);
        let mut expected = on("gpu-reader", &[0]);
        expected.extend(own(&[1, 2]));
        assert_eq!(who, expected);
        let (fresh, who) = tick(&mut s, &reads).await;
        assert_eq!(fresh, [true, true, true]);
        assert_eq!(who, on("gpu-reader", &[0, 1, 2]));
    }
}
