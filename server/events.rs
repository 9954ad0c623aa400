//! The event log: every change to a GPU and everything that happened to one,
//! numbered, persisted, and streamed.
//!
//! Events are the audit trail: who (governor, an operator, startup, shutdown,
//! the device itself) did what to which GPU, why, and what changed.
//! [`EventLog::record`] numbers an event and queues it for the state
//! directory's one writer (`persist.rs`) without waiting for the disk; the
//! writer appends it to `events.log` and only then hands it to subscribers,
//! so a client never sees an event that a crash (even SIGKILL) could lose.
//! Whoever must know it is durable awaits the [`Recorded`] acknowledgement.
//! Sequence numbers are persisted with the events and keep rising across
//! restarts, so `WatchEvents(since_seq)` works across them.
//!
//! The log is bounded: when the current file holds `retain` events it is
//! rotated to `events.log.1` (replacing the older one). Refused requests —
//! the events anyone can cause in bulk — are kept apart, in
//! `events.refused.log` (and `.1`) and their own part of the replay ring,
//! bounded on their own (at most 1,000), so no amount of them can push an
//! operator's, the governor's or a lifecycle event out; a replay merges both
//! in seq order (old refused events may be gone without a gap being
//! reported for them). Each line is
//! `CRC32 JSON`; at startup, lines that fail their checksum (a torn write,
//! power loss) are skipped and reported, and a partial last line is cut off,
//! so a damaged log never stops the daemon — it keeps what is valid.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Seek},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{
    api::{
        self, ActorKind, ClockLockChange, EventKind, PowerLimitChange, Severity, ThresholdChange,
        event::Change,
    },
    persist::{
        Ack, AppendLog, DiskReport, EventFiles, PersistError, PersistStats, Persister, Reporter,
    },
};

/// Who caused an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub kind: ActorKind,
    pub name: String,
}

impl Actor {
    fn fixed(kind: ActorKind, name: &str) -> Self {
        Self {
            kind,
            name: name.to_owned(),
        }
    }
    pub fn governor() -> Self {
        Self::fixed(ActorKind::Governor, "governor")
    }
    pub fn startup() -> Self {
        Self::fixed(ActorKind::Startup, "startup")
    }
    pub fn shutdown() -> Self {
        Self::fixed(ActorKind::Shutdown, "shutdown")
    }
    pub fn device() -> Self {
        Self::fixed(ActorKind::Device, "device")
    }
    pub fn daemon() -> Self {
        Self::fixed(ActorKind::Daemon, "daemon")
    }
    /// The daemon dividing the node power budget.
    pub fn budget() -> Self {
        Self::fixed(ActorKind::Daemon, "budget")
    }
    pub fn operator(name: &str) -> Self {
        Self::fixed(ActorKind::Operator, name)
    }
}

/// An event before the log numbers and stamps it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub severity: Severity,
    pub gpu: Option<(u32, String)>,
    pub actor: Actor,
    pub reason: String,
    pub change: Option<Change>,
    pub xid: Option<u64>,
    /// Who started or stopped using a GPU, for ATTRIBUTION_CHANGED.
    pub attribution: Option<api::AttributionChange>,
    /// The lease, for LEASE_GRANTED / LEASE_RELEASED / LEASE_EXPIRED (live
    /// subscribers get it; the log on disk keeps the reason's words).
    pub lease: Option<api::Lease>,
    /// fsync the log after this event (default). Events that anyone could
    /// cause in bulk (refused requests) are written but not fsynced, so a
    /// flood of them cannot turn into a flood of disk flushes, and they may
    /// only use half of the writer's queue.
    pub durable: bool,
}

impl NewEvent {
    pub fn new(kind: EventKind, actor: Actor, reason: impl Into<String>) -> Self {
        Self {
            kind,
            severity: Severity::Info,
            gpu: None,
            actor,
            reason: reason.into(),
            change: None,
            xid: None,
            attribution: None,
            lease: None,
            durable: true,
        }
    }

    pub fn not_durable(mut self) -> Self {
        self.durable = false;
        self
    }

    pub fn lease(mut self, lease: api::Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    pub fn gpu(mut self, index: u32, uuid: &str) -> Self {
        self.gpu = Some((index, uuid.to_owned()));
        self
    }

    pub fn severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    pub fn change(mut self, change: Change) -> Self {
        self.change = Some(change);
        self
    }

    pub fn xid(mut self, xid: u64) -> Self {
        self.xid = Some(xid);
        self
    }

    pub fn attribution(mut self, change: api::AttributionChange) -> Self {
        self.attribution = Some(change);
        self
    }
}

/// A replay plus a live feed, for one WatchEvents subscriber.
#[derive(Debug)]
pub struct EventSubscription {
    /// Retained events after the requested seq, oldest first.
    pub replay: Vec<Arc<api::Event>>,
    /// Events after the requested seq that are no longer retained.
    pub missing: Option<(u64, u64)>,
    /// The newest seq at subscription time (0 when the log is empty).
    pub latest_seq: u64,
    pub live: broadcast::Receiver<Arc<api::Event>>,
}

/// What loading the log found wrong.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Events loaded.
    pub loaded: usize,
    /// Lines skipped because their checksum or JSON was bad.
    pub corrupt_lines: usize,
    /// Bytes of a partial last line that were cut off.
    pub truncated_bytes: u64,
    /// A file could not be read or written at all.
    pub io_error: Option<String>,
}

impl LoadReport {
    /// True when something was wrong.
    pub fn damaged(&self) -> bool {
        self.corrupt_lines > 0 || self.truncated_bytes > 0 || self.io_error.is_some()
    }

    /// One sentence for logs and the STATE_DAMAGED event.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.corrupt_lines > 0 {
            parts.push(format!("skipped {} damaged line(s)", self.corrupt_lines));
        }
        if self.truncated_bytes > 0 {
            parts.push(format!(
                "cut off a partial last line ({} bytes)",
                self.truncated_bytes
            ));
        }
        if let Some(e) = &self.io_error {
            parts.push(format!("I/O error: {e}"));
        }
        format!(
            "event log: {}; kept {} valid event(s)",
            parts.join(", "),
            self.loaded
        )
    }
}

const LOG_FILE: &str = "events.log";
const ROTATED_FILE: &str = "events.log.1";
/// Refused requests (the events anyone can cause in bulk) are kept apart:
/// their own files, rotated on their own, and their own part of the replay
/// ring, so that no amount of them pushes the audit trail out.
const BULK_LOG_FILE: &str = "events.refused.log";
const BULK_ROTATED_FILE: &str = "events.refused.log.1";
/// Most bulk events kept (in memory and per file), whatever `retain` is.
const BULK_RETAIN_MAX: usize = 1000;
/// Events a live subscriber may fall behind by before it loses some.
const SUBSCRIBER_BUFFER_EVENTS: usize = 1024;

/// An event as the log numbered it, and the acknowledgement that it is on
/// disk. Dropping it is fire-and-forget: the event is still written and
/// published, in order.
#[derive(Debug)]
pub struct Recorded {
    event: Arc<api::Event>,
    ack: Ack,
}

impl Recorded {
    /// The event as numbered and stamped. Its `seq` is 0 when it could not
    /// even be queued (the writer is far behind; the ack says why).
    pub fn event(&self) -> &Arc<api::Event> {
        &self.event
    }

    pub fn seq(&self) -> u64 {
        self.event.seq
    }

    /// Just the acknowledgement (to await together with others).
    pub fn durable(self) -> Ack {
        self.ack
    }

    /// Resolves once the event is durable and published to subscribers.
    pub async fn ack(self) -> Result<Arc<api::Event>, PersistError> {
        self.ack.await.map(|()| self.event)
    }
}

/// What subscribers can see: committed events only.
#[derive(Debug)]
struct Published {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Arc<api::Event>>,
    retain: usize,
    /// Bulk events kept (their own bound).
    bulk_retain: usize,
    /// Events published since start, by kind (index = EventKind as usize).
    counts: Vec<AtomicU64>,
    /// XID events published since start, per GPU and code.
    xids: Mutex<XidTally>,
}

/// XID events since the daemon started: how many per (GPU index, UUID,
/// code), and the last code per GPU.
#[derive(Debug, Default, Clone)]
pub struct XidTally {
    pub counts: std::collections::BTreeMap<(u32, String, u64), u64>,
    pub last: std::collections::BTreeMap<(u32, String), u64>,
}

#[derive(Debug)]
struct Ring {
    /// The audit trail: everything but bulk events, oldest first.
    events: VecDeque<Arc<api::Event>>,
    /// Bulk events (refused requests), oldest first, bounded on their own.
    bulk: VecDeque<Arc<api::Event>>,
    /// The newest seq of the audit trail that is no longer kept (0: none):
    /// a replay from before it starts after it and reports the gap, rather
    /// than filling it with bulk events as if nothing were missing.
    main_floor: u64,
    /// The newest published seq (0: none yet).
    last_seq: u64,
}

impl Ring {
    /// Both parts after `after`, merged in seq order.
    fn after(&self, after: u64) -> Vec<Arc<api::Event>> {
        let main = self
            .events
            .range(self.events.partition_point(|e| e.seq <= after)..);
        let from = after.max(self.main_floor);
        let bulk = self
            .bulk
            .range(self.bulk.partition_point(|e| e.seq <= from)..);
        merge(main, bulk)
    }
}

/// Two seq-ordered runs merged into one.
fn merge<'a>(
    a: impl Iterator<Item = &'a Arc<api::Event>>,
    b: impl Iterator<Item = &'a Arc<api::Event>>,
) -> Vec<Arc<api::Event>> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    let mut out = Vec::new();
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.seq <= y.seq => a.next(),
            (Some(_), Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => return out,
        };
        out.extend(next.cloned());
    }
}

impl Published {
    /// Hands committed events to the ring and to live subscribers, in order;
    /// each with whether it is a bulk event.
    fn publish(&self, events: Vec<(Arc<api::Event>, bool)>) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        for (event, bulk) in events {
            if bulk {
                if ring.bulk.len() >= self.bulk_retain {
                    ring.bulk.pop_front();
                }
                ring.bulk.push_back(event.clone());
            } else {
                if ring.events.len() >= self.retain
                    && let Some(gone) = ring.events.pop_front()
                {
                    ring.main_floor = ring.main_floor.max(gone.seq);
                }
                ring.events.push_back(event.clone());
            }
            ring.last_seq = ring.last_seq.max(event.seq);
            if let Some(count) = self.counts.get(event.kind as usize) {
                count.fetch_add(1, Ordering::Relaxed);
            }
            if event.kind == EventKind::XidError as i32
                && let (Some(index), Some(uuid), Some(code)) =
                    (event.gpu_index, event.gpu_uuid.as_ref(), event.xid)
            {
                let mut xids = self.xids.lock().unwrap_or_else(PoisonError::into_inner);
                *xids.counts.entry((index, uuid.clone(), code)).or_default() += 1;
                xids.last.insert((index, uuid.clone()), code);
            }
            // Sent under the lock so subscribe() sees a consistent cut.
            let _ = self.tx.send(event);
        }
    }
}

/// The event log. Shared by everything that records or streams events.
#[derive(Debug)]
pub struct EventLog {
    /// The next seq to hand out; held while an event is numbered and queued,
    /// so the writer receives events in seq order (the writer takes it too,
    /// to number its own reports of a failing disk).
    next_seq: Arc<Mutex<u64>>,
    published: Arc<Published>,
    /// Where events go to disk; None: memory only.
    writer: Option<Persister>,
}

impl EventLog {
    /// Opens (or creates) the log in `dir` with a writer of its own; `None`
    /// keeps events in memory only. Never fails: damage and I/O errors are
    /// reported, not fatal.
    pub fn open(dir: Option<&Path>, retain: usize) -> (Self, LoadReport) {
        match Persister::start(dir) {
            Ok(writer) => Self::with_writer(&writer, retain),
            Err(e) => {
                let (log, mut report) = Self::with_writer(&Persister::memory(), retain);
                report.io_error = Some(format!("cannot start the event log's writer: {e}"));
                (log, report)
            }
        }
    }

    /// Opens the log in `writer`'s state directory; events are written by
    /// that writer (shared with the desired state).
    pub fn with_writer(writer: &Persister, retain: usize) -> (Self, LoadReport) {
        let retain = retain.max(1);
        let bulk_retain = retain.min(BULK_RETAIN_MAX);
        let mut report = LoadReport::default();
        let mut ring = (VecDeque::new(), VecDeque::new());
        let mut main_floor = 0;
        let mut loaded = None;
        if let Some(dir) = writer.dir() {
            match load_dir(dir, retain, bulk_retain, &mut report) {
                Ok(Loaded {
                    events,
                    bulk,
                    main_floor: floor,
                    files,
                }) => {
                    ring = (events, bulk);
                    main_floor = floor;
                    loaded = Some(files);
                }
                Err(e) => report.io_error = Some(format!("{}: {e}", dir.display())),
            }
        }
        report.loaded = ring.0.len() + ring.1.len();
        let last_seq = ring
            .0
            .back()
            .into_iter()
            .chain(ring.1.back())
            .map(|e: &Arc<api::Event>| e.seq)
            .max()
            .unwrap_or(0);
        let (tx, _) = broadcast::channel(SUBSCRIBER_BUFFER_EVENTS);
        let kinds = EventKind::DryRunDecision as usize + 8;
        let published = Arc::new(Published {
            ring: Mutex::new(Ring {
                events: ring.0,
                bulk: ring.1,
                main_floor,
                last_seq,
            }),
            tx,
            retain,
            bulk_retain,
            counts: (0..kinds).map(|_| AtomicU64::new(0)).collect(),
            xids: Mutex::default(),
        });
        let next_seq = Arc::new(Mutex::new(last_seq + 1));
        let mut attached = None;
        if let Some(files) = loaded {
            let sink = published.clone();
            let reporter = Reporter {
                next_seq: next_seq.clone(),
                make: Box::new(disk_event),
            };
            if writer.attach_log(
                files,
                Box::new(move |events| sink.publish(events)),
                Some(reporter),
            ) {
                attached = Some(writer.clone());
            } else {
                report.io_error = Some("the state directory's writer has stopped".to_owned());
            }
        }
        let log = Self {
            next_seq,
            published,
            writer: attached,
        };
        (log, report)
    }

    /// Numbers and stamps an event and queues it for the disk; it is
    /// published to subscribers once the writer has committed it. Never
    /// waits for the disk. Events that are not `durable` (the ones anyone
    /// can cause in bulk) are refused when the writer is half a queue
    /// behind, so they cannot crowd out the rest; any event is refused
    /// (seq 0, an error ack, a tracing error) when the queue is full.
    pub fn record(&self, new: NewEvent) -> Recorded {
        let mut next_seq = self.next_seq.lock().unwrap_or_else(PoisonError::into_inner);
        let (kind, durable) = (new.kind, new.durable);
        let event = Arc::new(api::Event {
            seq: *next_seq,
            time: Some(SystemTime::now().into()),
            kind: new.kind as i32,
            severity: new.severity as i32,
            gpu_index: new.gpu.as_ref().map(|g| g.0),
            gpu_uuid: new.gpu.map(|g| g.1),
            actor: Some(api::Actor {
                kind: new.actor.kind as i32,
                name: new.actor.name,
            }),
            reason: new.reason,
            change: new.change,
            xid_info: xid_info(new.kind as i32, new.xid),
            xid: new.xid,
            attribution: new.attribution,
            lease: new.lease,
        });
        let Some(writer) = &self.writer else {
            *next_seq += 1;
            self.published.publish(vec![(event.clone(), !durable)]);
            return Recorded {
                event,
                ack: Ack::ready(Ok(())),
            };
        };
        let line = match encode_line(&event) {
            Ok(line) => line,
            Err(e) => {
                let e = PersistError::Io {
                    action: "encode an event for",
                    path: PathBuf::from(LOG_FILE),
                    source: Arc::new(e),
                };
                tracing::error!(error = %e, ?kind, "event not recorded");
                return refused(&event, e);
            }
        };
        match writer.append(event.clone(), line, durable, !durable) {
            Ok(ack) => {
                *next_seq += 1;
                Recorded { event, ack }
            }
            Err((event, PersistError::Stopped)) => {
                *next_seq += 1;
                tracing::error!(
                    seq = event.seq,
                    "the event writer has stopped; event kept in memory only"
                );
                self.published.publish(vec![(event.clone(), !durable)]);
                Recorded {
                    event,
                    ack: Ack::ready(Err(PersistError::Stopped)),
                }
            }
            Err((event, e)) => {
                if durable {
                    tracing::error!(error = %e, ?kind, reason = %event.reason, "event not recorded");
                } else {
                    tracing::debug!(error = %e, ?kind, "bulk event not recorded");
                }
                refused(&event, e)
            }
        }
    }

    /// Resolves once every event recorded before the call is committed.
    pub fn flush(&self) -> Ack {
        self.writer
            .as_ref()
            .map_or(Ack::ready(Ok(())), Persister::flush)
    }

    /// Events that could not be written to disk since start.
    pub fn persist_failures(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.stats().event_failures)
    }

    /// The state directory writer's counters (failures per file, whether
    /// each is failing now); `None` when nothing is written to disk.
    pub fn persist_stats(&self) -> Option<PersistStats> {
        self.writer.as_ref().map(Persister::stats)
    }

    /// Subscribes; with `since`, returns the retained events after it.
    pub fn subscribe(&self, since: Option<u64>) -> EventSubscription {
        let ring = self
            .published
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let live = self.published.tx.subscribe();
        let latest_seq = ring.last_seq;
        let next_seq = latest_seq + 1;
        let (replay, missing) = match since {
            Some(after) => {
                let replay = ring.after(after);
                let first_kept = replay.first().map_or(next_seq, |e| e.seq);
                let missing = (after + 1 < first_kept).then(|| (after + 1, first_kept - 1));
                (replay, missing)
            }
            None => (Vec::new(), None),
        };
        EventSubscription {
            replay,
            missing,
            latest_seq,
            live,
        }
    }

    /// The newest published seq (0 when empty).
    pub fn latest_seq(&self) -> u64 {
        self.published
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_seq
    }

    /// Retained events, oldest first (for tests and the dashboard).
    pub fn recent(&self, max: usize) -> Vec<Arc<api::Event>> {
        let ring = self
            .published
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let main = ring
            .events
            .iter()
            .skip(ring.events.len().saturating_sub(max));
        let bulk = ring.bulk.iter().skip(ring.bulk.len().saturating_sub(max));
        let merged = merge(main, bulk);
        let skip = merged.len().saturating_sub(max);
        merged.into_iter().skip(skip).collect()
    }

    /// Events published since start, per kind.
    /// XID events since the daemon started, per GPU and code.
    pub fn xid_tally(&self) -> XidTally {
        self.published
            .xids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn count(&self, kind: EventKind) -> u64 {
        self.published
            .counts
            .get(kind as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// An event that was not queued: not numbered, not published.
fn refused(event: &api::Event, e: PersistError) -> Recorded {
    Recorded {
        event: Arc::new(api::Event {
            seq: 0,
            ..event.clone()
        }),
        ack: Ack::ready(Err(e)),
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// What [`load_dir`] found: both parts of the ring, and the files to
/// append to.
struct Loaded {
    events: VecDeque<Arc<api::Event>>,
    bulk: VecDeque<Arc<api::Event>>,
    /// The newest audit-trail seq known to be gone (rotated away or beyond
    /// `retain`).
    main_floor: u64,
    files: EventFiles,
}

/// Loads the audit trail (`events.log.1`, `events.log`) and the refused
/// requests (`events.refused.log.1`, `events.refused.log`), repairing
/// partial tails. A refused request in the audit trail's files (where
/// releases before 0.2 wrote them) counts as a bulk event.
fn load_dir(
    dir: &Path,
    retain: usize,
    bulk_retain: usize,
    report: &mut LoadReport,
) -> io::Result<Loaded> {
    fs::create_dir_all(dir)?;
    let mut main = VecDeque::new();
    let (main_file, main_lines) = load_pair(dir, ROTATED_FILE, LOG_FILE, &mut main, report)?;
    let mut bulk = VecDeque::new();
    let (bulk_file, bulk_lines) =
        load_pair(dir, BULK_ROTATED_FILE, BULK_LOG_FILE, &mut bulk, report)?;
    let (refused, kept): (Vec<_>, Vec<_>) = main
        .into_iter()
        .partition(|e| e.kind() == EventKind::ControlRefused);
    let (events, skipped) = ordered(kept, retain);
    let (bulk, _) = ordered(bulk.into_iter().chain(refused).collect(), bulk_retain);
    // Once the audit trail has rotated, what came before its oldest kept
    // event is gone.
    let rotated_away = if dir.join(ROTATED_FILE).exists() {
        events.front().map_or(0, |e| e.seq.saturating_sub(1))
    } else {
        0
    };
    Ok(Loaded {
        events,
        bulk,
        main_floor: skipped.max(rotated_away),
        files: EventFiles {
            main: AppendLog::new(
                dir.to_path_buf(),
                LOG_FILE,
                ROTATED_FILE,
                main_file,
                main_lines,
                retain,
            ),
            bulk: AppendLog::new(
                dir.to_path_buf(),
                BULK_LOG_FILE,
                BULK_ROTATED_FILE,
                bulk_file,
                bulk_lines,
                bulk_retain,
            ),
        },
    })
}

/// Seqs strictly increasing (even if a damaged file repeated some), the
/// newest `keep`; with the newest seq left out (0: none).
fn ordered(mut events: Vec<Arc<api::Event>>, keep: usize) -> (VecDeque<Arc<api::Event>>, u64) {
    events.sort_by_key(|e| e.seq);
    events.dedup_by_key(|e| e.seq);
    let skip = events.len().saturating_sub(keep);
    let skipped = skip
        .checked_sub(1)
        .and_then(|i| events.get(i))
        .map_or(0, |e| e.seq);
    (events.into_iter().skip(skip).collect(), skipped)
}

/// Loads `rotated` then `current` into `events`, cuts a partial last line
/// off `current`, and opens it for appending; with its line count.
fn load_pair(
    dir: &Path,
    rotated: &str,
    current: &str,
    events: &mut VecDeque<Arc<api::Event>>,
    report: &mut LoadReport,
) -> io::Result<(File, usize)> {
    let rotated = dir.join(rotated);
    if rotated.exists() {
        read_lines(&rotated, events, report)?;
    }
    let current = dir.join(current);
    let mut current_lines = 0;
    if current.exists() {
        let before = events.len();
        let good_len = read_lines(&current, events, report)?;
        current_lines = events.len() - before;
        let actual = fs::metadata(&current)?.len();
        if good_len < actual {
            report.truncated_bytes += actual - good_len;
            let f = OpenOptions::new().write(true).open(&current)?;
            f.set_len(good_len)?;
            f.sync_all()?;
        }
    }
    let mut file = open_append(&current)?;
    file.seek(io::SeekFrom::End(0))?;
    Ok((file, current_lines))
}

/// The event the writer records about the disk: numbered `seq`, with its
/// line (`None` when it cannot be encoded).
fn disk_event(seq: u64, report: &DiskReport) -> Option<(Arc<api::Event>, String)> {
    let (kind, severity, reason) = match report {
        DiskReport::Failing {
            file,
            error,
            failures,
        } => (
            EventKind::PersistFailed,
            Severity::Error,
            format!(
                "persistence is failing: {error} ({failures} failed write(s) of {file} so far); \
                 changes are kept in memory and not answered OK until they are durable"
            ),
        ),
        DiskReport::Recovered { file, failures } => (
            EventKind::PersistRecovered,
            Severity::Info,
            format!("{file} can be written again after {failures} failed write(s)"),
        ),
    };
    let event = Arc::new(api::Event {
        seq,
        time: Some(SystemTime::now().into()),
        kind: kind as i32,
        severity: severity as i32,
        actor: Some(api::Actor {
            kind: ActorKind::Daemon as i32,
            name: "daemon".to_owned(),
        }),
        reason,
        ..api::Event::default()
    });
    let line = encode_line(&event).ok()?;
    Some((event, line))
}

/// Reads the valid lines of one file into `out`; returns the byte length
/// up to the end of the last complete line.
fn read_lines(
    path: &Path,
    out: &mut VecDeque<Arc<api::Event>>,
    report: &mut LoadReport,
) -> io::Result<u64> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut complete_len = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            // A partial last line: the write was torn. The caller cuts it.
            break;
        }
        complete_len += n as u64;
        match decode_line(&buf[..buf.len() - 1]) {
            Some(event) => out.push_back(Arc::new(event)),
            None => report.corrupt_lines += 1,
        }
    }
    Ok(complete_len)
}

/// The on-disk form of an event: readable JSON, independent of the wire.
#[derive(Debug, Serialize, Deserialize)]
struct EventRecord {
    seq: u64,
    time: String,
    kind: String,
    severity: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu_uuid: Option<String>,
    actor_kind: String,
    actor: String,
    reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    change: Option<ChangeRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    xid: Option<u64>,
    /// Added after 0.1.0; 0.1.0 ignores fields it does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attribution: Option<AttributionRecord>,
}

/// The on-disk form of an `AttributionChange`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct AttributionRecord {
    started: bool,
    device_id: String,
    via: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    container: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slurm_job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slurm_step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slurm_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    systemd_unit: Option<String>,
}

impl AttributionRecord {
    fn from_wire(a: &api::AttributionChange) -> Self {
        Self {
            started: a.started,
            device_id: a.device_id.clone(),
            via: a.via.clone(),
            namespace: a.pod.as_ref().map(|p| p.namespace.clone()),
            pod: a.pod.as_ref().map(|p| p.pod.clone()),
            container: a.pod.as_ref().map(|p| p.container.clone()),
            slurm_job: a.slurm.as_ref().map(|s| s.job_id.clone()),
            slurm_step: a.slurm.as_ref().and_then(|s| s.step.clone()),
            slurm_uid: a.slurm.as_ref().and_then(|s| s.uid),
            container_id: a.container_id.clone(),
            systemd_unit: a.systemd_unit.clone(),
        }
    }

    fn into_wire(self) -> api::AttributionChange {
        let pod = match (self.namespace, self.pod, self.container) {
            (Some(namespace), Some(pod), Some(container)) => Some(api::PodRef {
                namespace,
                pod,
                container,
            }),
            _ => None,
        };
        api::AttributionChange {
            started: self.started,
            pod,
            slurm: self.slurm_job.map(|job_id| api::SlurmJob {
                job_id,
                step: self.slurm_step,
                uid: self.slurm_uid,
            }),
            container_id: self.container_id,
            systemd_unit: self.systemd_unit,
            device_id: self.device_id,
            via: self.via,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ChangeRecord {
    PowerLimit {
        before_mw: Option<u32>,
        after_mw: Option<u32>,
    },
    ClockLock {
        before_max_mhz: Option<u32>,
        after_max_mhz: Option<u32>,
    },
    Threshold {
        before_c: Option<u32>,
        after_c: Option<u32>,
        before_hysteresis_c: Option<u32>,
        after_hysteresis_c: Option<u32>,
    },
    Budget {
        before_watts: Option<f64>,
        after_watts: Option<f64>,
        #[serde(default)]
        shares: Vec<ShareRecord>,
    },
}

/// One GPU's budget share in the log: (index, uuid, before mW, after mW).
#[derive(Debug, Serialize, Deserialize)]
struct ShareRecord {
    index: u32,
    uuid: String,
    before_mw: Option<u32>,
    after_mw: Option<u32>,
}

fn encode_line(e: &api::Event) -> io::Result<String> {
    let time = e
        .time
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let record = EventRecord {
        seq: e.seq,
        time: humantime::format_rfc3339_nanos(time).to_string(),
        kind: e.kind().as_str_name().to_owned(),
        severity: e.severity().as_str_name().to_owned(),
        gpu_index: e.gpu_index,
        gpu_uuid: e.gpu_uuid.clone(),
        actor_kind: e
            .actor
            .as_ref()
            .map_or(ActorKind::Unspecified, |a| a.kind())
            .as_str_name()
            .to_owned(),
        actor: e.actor.as_ref().map(|a| a.name.clone()).unwrap_or_default(),
        reason: e.reason.clone(),
        change: e.change.as_ref().map(|c| match c {
            Change::PowerLimit(p) => ChangeRecord::PowerLimit {
                before_mw: p.before_mw,
                after_mw: p.after_mw,
            },
            Change::ClockLock(c) => ChangeRecord::ClockLock {
                before_max_mhz: c.before_max_mhz,
                after_max_mhz: c.after_max_mhz,
            },
            Change::Threshold(t) => ChangeRecord::Threshold {
                before_c: t.before_c,
                after_c: t.after_c,
                before_hysteresis_c: t.before_hysteresis_c,
                after_hysteresis_c: t.after_hysteresis_c,
            },
            Change::Budget(b) => ChangeRecord::Budget {
                before_watts: b.before_watts,
                after_watts: b.after_watts,
                shares: b
                    .shares
                    .iter()
                    .map(|s| ShareRecord {
                        index: s.index,
                        uuid: s.uuid.clone(),
                        before_mw: s.before_mw,
                        after_mw: s.after_mw,
                    })
                    .collect(),
            },
        }),
        attribution: e.attribution.as_ref().map(AttributionRecord::from_wire),
        xid: e.xid,
    };
    let json = serde_json::to_string(&record).map_err(io::Error::other)?;
    Ok(format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes())))
}

fn decode_line(line: &[u8]) -> Option<api::Event> {
    let line = std::str::from_utf8(line).ok()?;
    let (crc, json) = line.split_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(json.as_bytes()) {
        return None;
    }
    let r: EventRecord = serde_json::from_str(json).ok()?;
    let time = humantime::parse_rfc3339(&r.time).ok()?;
    Some(api::Event {
        seq: r.seq,
        time: Some(time.into()),
        kind: EventKind::from_str_name(&r.kind)? as i32,
        severity: Severity::from_str_name(&r.severity)? as i32,
        gpu_index: r.gpu_index,
        gpu_uuid: r.gpu_uuid,
        actor: Some(api::Actor {
            kind: ActorKind::from_str_name(&r.actor_kind)? as i32,
            name: r.actor,
        }),
        reason: r.reason,
        change: r.change.map(|c| match c {
            ChangeRecord::PowerLimit {
                before_mw,
                after_mw,
            } => Change::PowerLimit(PowerLimitChange {
                before_mw,
                after_mw,
            }),
            ChangeRecord::ClockLock {
                before_max_mhz,
                after_max_mhz,
            } => Change::ClockLock(ClockLockChange {
                before_max_mhz,
                after_max_mhz,
            }),
            ChangeRecord::Threshold {
                before_c,
                after_c,
                before_hysteresis_c,
                after_hysteresis_c,
            } => Change::Threshold(ThresholdChange {
                before_c,
                after_c,
                before_hysteresis_c,
                after_hysteresis_c,
            }),
            ChangeRecord::Budget {
                before_watts,
                after_watts,
                shares,
            } => Change::Budget(api::BudgetChange {
                before_watts,
                after_watts,
                shares: shares
                    .into_iter()
                    .map(|s| api::BudgetShare {
                        index: s.index,
                        uuid: s.uuid,
                        before_mw: s.before_mw,
                        after_mw: s.after_mw,
                    })
                    .collect(),
            }),
        }),
        xid_info: xid_info(EventKind::from_str_name(&r.kind)? as i32, r.xid),
        xid: r.xid,
        attribution: r.attribution.map(AttributionRecord::into_wire),
        lease: None,
    })
}

/// The decoded XID for an XID event (decoded, not stored, so events logged
/// by an older release get it too).
fn xid_info(kind: i32, xid: Option<u64>) -> Option<api::XidInfo> {
    (kind == EventKind::XidError as i32)
        .then(|| xid.map(|code| crate::xid::decode(code).to_wire()))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit_event(before: u32, after: u32) -> NewEvent {
        NewEvent::new(
            EventKind::PowerLimitChanged,
            Actor::governor(),
            "temperature 86 C >= threshold 83 C",
        )
        .gpu(0, "GPU-x")
        .change(Change::PowerLimit(PowerLimitChange {
            before_mw: Some(before),
            after_mw: Some(after),
        }))
    }

    #[test]
    fn events_survive_a_restart_with_their_sequence_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, report) = EventLog::open(Some(dir.path()), 100);
        assert!(!report.damaged());
        log.record(limit_event(700_000, 650_000));
        let second = log.record(limit_event(650_000, 600_000));
        drop(log);

        let (log, report) = EventLog::open(Some(dir.path()), 100);
        assert_eq!(report.loaded, 2);
        let replayed = log.subscribe(Some(0)).replay;
        assert_eq!(replayed.len(), 2);
        assert_eq!(
            *replayed[1],
            **second.event(),
            "an event reads back exactly as recorded"
        );
        let third = log.record(NewEvent::new(
            EventKind::DaemonStarted,
            Actor::daemon(),
            "up",
        ));
        assert_eq!(third.seq(), 3, "numbering continues after a restart");
    }

    #[test]
    fn torn_last_line_is_cut_and_damaged_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = EventLog::open(Some(dir.path()), 100);
        for i in 0..3 {
            log.record(limit_event(700_000 - i, 600_000));
        }
        drop(log);
        let path = dir.path().join(LOG_FILE);
        let text = fs::read_to_string(&path).expect("read");
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        // Flip a character inside the second line's JSON, and tear a fourth.
        lines[1] = lines[1].replacen("governor", "g0vernor", 1);
        let damaged = format!(
            "{}\n{}\n{}\n00000000 {{\"seq\":4,",
            lines[0], lines[1], lines[2]
        );
        fs::write(&path, damaged).expect("write");

        let (log, report) = EventLog::open(Some(dir.path()), 100);
        assert_eq!(report.corrupt_lines, 1);
        assert!(report.truncated_bytes > 0);
        assert_eq!(report.loaded, 2);
        let seqs: Vec<_> = log
            .subscribe(Some(0))
            .replay
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 3]);
        // Appending after a repair produces a clean line.
        log.record(limit_event(1, 2));
        drop(log);
        let (_, report) = EventLog::open(Some(dir.path()), 100);
        assert_eq!(
            report.corrupt_lines, 1,
            "only the old damaged line remains bad"
        );
        assert_eq!(report.truncated_bytes, 0);
    }

    #[test]
    fn log_rotates_and_stays_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = EventLog::open(Some(dir.path()), 100);
        for i in 0..350 {
            log.record(limit_event(i, i + 1));
        }
        drop(log);
        assert!(dir.path().join(ROTATED_FILE).exists());
        let lines = |name: &str| {
            fs::read_to_string(dir.path().join(name))
                .expect("read")
                .lines()
                .count()
        };
        assert!(lines(LOG_FILE) <= 100 && lines(ROTATED_FILE) <= 100);
        let (log, _) = EventLog::open(Some(dir.path()), 100);
        let replay = log.subscribe(Some(0));
        assert_eq!(replay.replay.len(), 100);
        assert_eq!(replay.replay.last().map(|e| e.seq), Some(350));
        assert_eq!(replay.missing, Some((1, 250)));
        assert_eq!(log.record(limit_event(0, 1)).seq(), 351);
    }

    #[test]
    fn subscriber_gets_replay_then_live_without_loss_or_duplicates() {
        let (log, _) = EventLog::open(None, 100);
        log.record(limit_event(1, 2));
        let mut sub = log.subscribe(Some(0));
        log.record(limit_event(2, 3));
        assert_eq!(sub.replay.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(sub.latest_seq, 1);
        assert_eq!(sub.live.try_recv().map(|e| e.seq).ok(), Some(2));
        assert!(sub.live.try_recv().is_err());
    }

    #[test]
    fn unwritable_directory_is_reported_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file_in_the_way = dir.path().join("state");
        fs::write(&file_in_the_way, "not a directory").expect("write");
        let (log, report) = EventLog::open(Some(&file_in_the_way), 100);
        assert!(report.io_error.is_some());
        let e = log.record(limit_event(1, 2));
        assert_eq!(e.seq(), 1, "events still flow, in memory");
    }

    fn refused_event(i: u32) -> NewEvent {
        NewEvent::new(
            EventKind::ControlRefused,
            Actor::operator("anonymous"),
            format!("SetPowerLimit from 127.0.0.1:{i} refused"),
        )
        .not_durable()
    }

    fn audit_seqs(events: &[Arc<api::Event>]) -> Vec<u64> {
        events
            .iter()
            .filter(|e| e.kind() != EventKind::ControlRefused)
            .map(|e| e.seq)
            .collect()
    }

    #[test]
    fn refused_events_cannot_push_the_audit_trail_out_of_the_log_or_the_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = EventLog::open(Some(dir.path()), 100);
        let mut audit = Vec::new();
        for i in 0..250 {
            if i % 25 == 0 {
                audit.push(log.record(limit_event(i, i + 1)).seq());
            }
            log.record(refused_event(i));
        }
        audit.push(log.record(limit_event(1, 2)).seq());
        assert!(log.flush().now_or_never_ok(), "committed");
        let replay = log.subscribe(Some(0));
        assert_eq!(
            audit_seqs(&replay.replay),
            audit,
            "the replay keeps every audit event"
        );
        let refused = replay.replay.len() - audit.len();
        assert!(refused <= 100, "refused events are bounded: {refused}");
        assert!(
            replay.replay.windows(2).all(|w| w[0].seq < w[1].seq),
            "in seq order"
        );
        assert_eq!(audit_seqs(&log.recent(1000)), audit);
        drop(log);

        let (log, report) = EventLog::open(Some(dir.path()), 100);
        assert!(!report.damaged(), "{report:?}");
        let replay = log.subscribe(Some(0)).replay;
        assert_eq!(
            audit_seqs(&replay),
            audit,
            "nor the log on disk, across a restart"
        );
        let lines = |name: &str| {
            fs::read_to_string(dir.path().join(name))
                .unwrap_or_default()
                .lines()
                .count()
        };
        assert_eq!(lines(LOG_FILE), audit.len(), "the audit trail's own file");
        assert!(lines(BULK_LOG_FILE) <= 100 && lines(BULK_ROTATED_FILE) <= 100);
        let next = log.record(limit_event(3, 4)).seq();
        assert_eq!(next, 251 + audit.len() as u64, "numbering continues");
    }

    #[test]
    fn old_refused_events_do_not_hide_a_gap_in_the_audit_trail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = EventLog::open(Some(dir.path()), 100);
        assert_eq!(log.record(refused_event(0)).seq(), 1);
        for i in 0..150 {
            log.record(limit_event(i, i + 1));
        }
        assert!(log.flush().now_or_never_ok());
        let check = |log: &EventLog, when: &str| {
            let sub = log.subscribe(Some(0));
            assert_eq!(
                sub.replay.first().map(|e| e.seq),
                Some(52),
                "{when}: the replay starts at the oldest audit event kept"
            );
            assert_eq!(
                sub.missing,
                Some((1, 51)),
                "{when}: the audit events no longer kept are reported missing"
            );
        };
        check(&log, "live");
        drop(log);
        let (log, _) = EventLog::open(Some(dir.path()), 100);
        check(&log, "after a restart");
    }

    trait NowOrNeverOk {
        fn now_or_never_ok(self) -> bool;
    }

    impl NowOrNeverOk for Ack {
        /// Waits for the ack on a runtime of its own (these tests are sync).
        fn now_or_never_ok(self) -> bool {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .map(|rt| rt.block_on(self).is_ok())
                .unwrap_or(false)
        }
    }
}
