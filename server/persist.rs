//! The one writer: every byte gpuwatch puts in its state directory goes
//! through here, off the sampling loop.
//!
//! Recording an event or changing desired state must never make the sampler
//! (or any async task) wait for a disk. So callers only *submit*: an event
//! line to append to the event log, or a new snapshot of the desired state.
//! Submissions go through one bounded channel to one OS thread (the work is
//! blocking file I/O), which does group commit: it takes everything queued,
//! appends all event lines with one fsync, saves the latest state snapshot
//! once (write a temporary file, fsync, keep the previous version, rename,
//! fsync the directory), then publishes the committed events to subscribers
//! in sequence order and acknowledges every request of the batch.
//!
//! An [`Ack`] is how a caller learns that what it submitted is durable. It
//! resolves to `Ok` only after the bytes reached the disk, and to a
//! [`PersistError`] naming the file and the OS error otherwise; a failure is
//! also logged and counted ([`Persister::failures`]). Callers that only need
//! the ordering (the sampler) drop the ack: fire and forget. Without a state
//! directory every ack is ready at once.
//!
//! A failure is never forgotten: a state snapshot that could not be saved
//! stays pending and is retried every [`RETRY_INTERVAL`] until it is durable
//! (so a `lowered` flag is never lost while the daemon runs); so do event
//! lines the disk refused (up to [`BACKLOG_CAPACITY`] of them), in order,
//! and they are published only once written, so no client ever sees an
//! event the log does not have, nor a seq that a restart could hand out
//! again. A line torn by a full disk is cut back, and the writer records a
//! `PERSIST_FAILED` event of its own (numbered after everything queued, at
//! most once per [`REPORT_INTERVAL`] per file; while the event log itself
//! refuses writes it waits with the rest, and the metric and the log line
//! say so at once) and a `PERSIST_RECOVERED` one when writing works again.
//!
//! This module knows files, not formats: the event log's line format,
//! rotation names and load/recovery live in `events.rs`, the desired state's
//! JSON in `state.rs`.

use std::{
    fs::{self, File, OpenOptions},
    future::Future,
    io::{self, Write},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::api;

/// Requests the writer may be behind by. A request is one event or one
/// state snapshot; at a few hundred bytes each this bounds the queue to a
/// few MB even when the disk stalls.
pub const QUEUE_CAPACITY: usize = 4096;
/// Audit-trail events the disk refused that are kept, in memory, to be
/// written (and only then published) once it takes them; beyond this the
/// newest are dropped, unpublished, with an error.
pub const BACKLOG_CAPACITY: usize = QUEUE_CAPACITY;
/// Test-only: an environment variable that makes the writer sleep this long
/// (humantime, e.g. `2s`) before committing each batch, to show that nothing
/// but the requests' own acknowledgements waits for the disk. Not a setting.
#[doc(hidden)]
pub const TEST_DELAY_ENV: &str = "GPUWATCH_TEST_WRITER_DELAY";
/// How often a save that failed is tried again while nothing else wakes the
/// writer: a `lowered` flag (or an operator's setting) that could not be
/// made durable keeps being retried until it is.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// While a file keeps failing, how often it is announced again (an event
/// and a log line); its first failure and its recovery are announced at
/// once.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Why something could not be made durable.
#[derive(Debug, Clone, Error)]
pub enum PersistError {
    /// A file operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done: "write", "fsync", "rename", ...
        action: &'static str,
        /// The file (or directory) it was done to.
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// The writer is `capacity` requests behind (the disk has stalled); the
    /// request was refused rather than making its caller wait.
    #[error("the state directory's writer is {capacity} requests behind; not recorded")]
    QueueFull { capacity: usize },
    /// The writer thread is gone.
    #[error("the state directory's writer has stopped")]
    Stopped,
}

impl PersistError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

/// Resolves once what was submitted is durable (or could not be made so).
/// Dropping it does not cancel anything.
#[derive(Debug)]
pub struct Ack(AckState);

#[derive(Debug)]
enum AckState {
    Ready(Option<Result<(), PersistError>>),
    Waiting(oneshot::Receiver<Result<(), PersistError>>),
}

impl Ack {
    /// An acknowledgement that is already decided.
    pub fn ready(result: Result<(), PersistError>) -> Self {
        Self(AckState::Ready(Some(result)))
    }

    fn waiting(rx: oneshot::Receiver<Result<(), PersistError>>) -> Self {
        Self(AckState::Waiting(rx))
    }
}

impl Future for Ack {
    type Output = Result<(), PersistError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            AckState::Ready(result) => Poll::Ready(result.take().unwrap_or(Ok(()))),
            AckState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(PersistError::Stopped))),
        }
    }
}

/// Several acknowledgements awaited as one (an RPC that changed state and
/// recorded events).
#[derive(Debug, Default)]
pub struct AckSet(Vec<Ack>);

impl AckSet {
    pub fn push(&mut self, ack: Ack) {
        self.0.push(ack);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Waits for all of them: `Ok` when every one is durable, else the
    /// first error.
    pub async fn wait(self) -> Result<(), PersistError> {
        let mut first_error = None;
        for ack in self.0 {
            if let Err(e) = ack.await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// What the writer has done since it started.
#[derive(Debug, Default)]
struct Stats {
    commits: AtomicU64,
    event_fsyncs: AtomicU64,
    state_saves: AtomicU64,
    event_failures: AtomicU64,
    state_failures: AtomicU64,
    events_failing: AtomicBool,
    state_failing: AtomicBool,
}

/// A snapshot of the writer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PersistStats {
    /// Batches committed (one per wake-up of the writer).
    pub commits: u64,
    /// fsyncs of the event log.
    pub event_fsyncs: u64,
    /// State snapshots saved.
    pub state_saves: u64,
    /// Events that could not be written (including those refused because
    /// the queue was full).
    pub event_failures: u64,
    /// State saves that failed.
    pub state_failures: u64,
    /// The last write to the event log failed (and none has worked since).
    pub events_failing: bool,
    /// The newest desired state is not durable: its save failed and is
    /// being retried.
    pub state_failing: bool,
}

/// A line-per-record log with one rotated generation: `current` holds up to
/// `retain` lines, then becomes `rotated` (replacing the older one).
#[derive(Debug)]
pub(crate) struct AppendLog {
    dir: PathBuf,
    current: &'static str,
    rotated: &'static str,
    /// `current`, open for appending, positioned at its end.
    file: File,
    /// Lines already in `current`.
    lines_in_file: usize,
    retain: usize,
    /// A rotation renamed `current` away but could not open a new one:
    /// `file` is the rotated file, and nothing is appended until the new
    /// one is open.
    reopen_pending: bool,
    /// A failed write could not be cut back: the length to cut `file` to
    /// before anything else is appended.
    cut_pending: Option<u64>,
    /// How many lines of the last failed append stayed in the log (those
    /// a rotation inside it had already made durable in the rotated file).
    kept: usize,
    /// Test hook: bytes the disk has left (then every write fails with
    /// ENOSPC, after writing what fits).
    #[cfg(test)]
    space_left: Option<u64>,
}

impl AppendLog {
    pub(crate) fn new(
        dir: PathBuf,
        current: &'static str,
        rotated: &'static str,
        file: File,
        lines_in_file: usize,
        retain: usize,
    ) -> Self {
        Self {
            dir,
            current,
            rotated,
            file,
            lines_in_file,
            retain: retain.max(1),
            reopen_pending: false,
            cut_pending: None,
            kept: 0,
            #[cfg(test)]
            space_left: None,
        }
    }
}

/// The event log's files: the audit trail, and the refused requests that
/// anyone can cause in bulk, each rotated on its own so that no amount of
/// the second can push the first out.
#[derive(Debug)]
pub(crate) struct EventFiles {
    pub(crate) main: AppendLog,
    pub(crate) bulk: AppendLog,
}

/// What the writer tells the event log about the disk, to record as an
/// event of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DiskReport {
    /// Writing `file` fails (`failures` times since it last worked).
    Failing {
        file: String,
        error: String,
        failures: u64,
    },
    /// Writing `file` works again, after `failures` failures.
    Recovered { file: String, failures: u64 },
}

/// How the writer numbers and encodes an event of its own (a
/// [`DiskReport`]), in the event log's sequence.
pub(crate) struct Reporter {
    /// The event log's next seq, held while events are numbered and queued.
    pub(crate) next_seq: Arc<Mutex<u64>>,
    /// The event numbered `seq` for a report, and its line.
    pub(crate) make: MakeReport,
}

/// Builds the event numbered `seq` for a report, with its line.
pub(crate) type MakeReport =
    Box<dyn Fn(u64, &DiskReport) -> Option<(Arc<api::Event>, String)> + Send>;

/// A file replaced atomically on every save, keeping the previous version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplacedFile {
    pub current: &'static str,
    pub previous: &'static str,
    pub temporary: &'static str,
}

/// Hands events to subscribers once they are committed (called by the
/// writer, in sequence order), each with whether it is a bulk event.
pub(crate) type Publish = Box<dyn Fn(Vec<(Arc<api::Event>, bool)>) + Send>;

enum Request {
    /// The event log to append to, who to publish to, and how to record
    /// the writer's own reports.
    AttachLog {
        files: EventFiles,
        publish: Publish,
        reporter: Option<Reporter>,
    },
    /// One event line. `durable`: fsync before acknowledging.
    Append {
        event: Arc<api::Event>,
        line: String,
        durable: bool,
        ack: oneshot::Sender<Result<(), PersistError>>,
    },
    /// A new version of `file` (`None`: unchanged; acknowledge whether the
    /// latest version is durable, retrying a failed save).
    Replace {
        file: ReplacedFile,
        bytes: Option<Vec<u8>>,
        ack: oneshot::Sender<Result<(), PersistError>>,
    },
    /// Acknowledged once everything queued before it was committed.
    Flush {
        ack: oneshot::Sender<Result<(), PersistError>>,
    },
}

/// Handle to the writer; cheap to clone. The writer thread commits what is
/// queued and exits when the last handle is dropped (the drop waits for it).
#[derive(Debug, Clone)]
pub struct Persister {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: Option<PathBuf>,
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer drain what is queued and exit.
        self.tx.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the state directory's writer panicked");
        }
    }
}

impl Persister {
    /// A writer for `dir`; `None` keeps everything in memory (every ack is
    /// ready at once). The test-only delay is read from [`TEST_DELAY_ENV`].
    pub fn start(dir: Option<&Path>) -> io::Result<Self> {
        let delay = std::env::var(TEST_DELAY_ENV)
            .ok()
            .and_then(|v| humantime::parse_duration(v.trim()).ok());
        Self::start_with_delay(dir, delay)
    }

    /// Like [`start`](Self::start), with an explicit delay before each commit
    /// (tests).
    #[doc(hidden)]
    pub fn start_with_delay(dir: Option<&Path>, delay: Option<Duration>) -> io::Result<Self> {
        let stats = Arc::new(Stats::default());
        let Some(dir) = dir else {
            return Ok(Self::memory());
        };
        if let Some(delay) = delay {
            tracing::warn!(
                ?delay,
                "test hook: the state writer waits before every commit"
            );
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer = Writer {
            dir: dir.to_path_buf(),
            delay,
            stats: stats.clone(),
            log: None,
            reporter: None,
            unsaved: Vec::new(),
            last_save: Vec::new(),
            events_health: Health::default(),
            state_health: Health::default(),
            backlog: Vec::new(),
        };
        let thread = thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: Some(dir.to_path_buf()),
                tx: Some(tx),
                thread: Some(thread),
                stats,
            }),
        })
    }

    /// A writer with nowhere to write: everything stays in memory.
    pub fn memory() -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: None,
                tx: None,
                thread: None,
                stats: Arc::default(),
            }),
        }
    }

    /// The state directory (None: memory only).
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// True when nothing is written to disk.
    pub fn is_memory(&self) -> bool {
        self.inner.tx.is_none()
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> PersistStats {
        let s = &self.inner.stats;
        PersistStats {
            commits: s.commits.load(Ordering::Relaxed),
            event_fsyncs: s.event_fsyncs.load(Ordering::Relaxed),
            state_saves: s.state_saves.load(Ordering::Relaxed),
            event_failures: s.event_failures.load(Ordering::Relaxed),
            state_failures: s.state_failures.load(Ordering::Relaxed),
            events_failing: s.events_failing.load(Ordering::Relaxed),
            state_failing: s.state_failing.load(Ordering::Relaxed),
        }
    }

    /// Writes that failed since start (events not written plus failed state
    /// saves).
    pub fn failures(&self) -> u64 {
        let s = self.stats();
        s.event_failures + s.state_failures
    }

    /// Resolves once everything submitted before this call is committed.
    pub fn flush(&self) -> Ack {
        let (ack, rx) = oneshot::channel();
        match self.try_send(Request::Flush { ack }, false) {
            Ok(()) => Ack::waiting(rx),
            Err(e) => Ack::ready(if self.is_memory() { Ok(()) } else { Err(e) }),
        }
    }

    /// Hands the event log to the writer. False when it cannot (memory only,
    /// or the writer is gone): the caller keeps events in memory.
    pub(crate) fn attach_log(
        &self,
        files: EventFiles,
        publish: Publish,
        reporter: Option<Reporter>,
    ) -> bool {
        self.try_send(
            Request::AttachLog {
                files,
                publish,
                reporter,
            },
            false,
        )
        .is_ok()
    }

    /// Queues one event line. Never waits: when the queue is full (or, for
    /// `bulk` events, half full) the event is handed back with the reason.
    pub(crate) fn append(
        &self,
        event: Arc<api::Event>,
        line: String,
        durable: bool,
        bulk: bool,
    ) -> Result<Ack, (Arc<api::Event>, PersistError)> {
        let (ack, rx) = oneshot::channel();
        let kept = event.clone();
        let request = Request::Append {
            event,
            line,
            durable,
            ack,
        };
        match self.try_send(request, bulk) {
            Ok(()) => Ok(Ack::waiting(rx)),
            Err(e) => {
                self.inner
                    .stats
                    .event_failures
                    .fetch_add(1, Ordering::Relaxed);
                Err((kept, e))
            }
        }
    }

    /// Queues a new version of `file` (`None`: unchanged). Never waits.
    pub(crate) fn replace(&self, file: ReplacedFile, bytes: Option<Vec<u8>>) -> Ack {
        if self.is_memory() {
            return Ack::ready(Ok(()));
        }
        let (ack, rx) = oneshot::channel();
        match self.try_send(Request::Replace { file, bytes, ack }, false) {
            Ok(()) => Ack::waiting(rx),
            Err(e) => {
                self.inner
                    .stats
                    .state_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, file = file.current, "could not queue a save of the desired state");
                Ack::ready(Err(e))
            }
        }
    }

    /// Queues `request` without waiting.
    fn try_send(&self, request: Request, bulk: bool) -> Result<(), PersistError> {
        let Some(tx) = &self.inner.tx else {
            return Err(PersistError::Stopped);
        };
        // Bulk requests (anyone can cause them) may only use half the queue,
        // so a flood of them cannot crowd out the governor's and operators'.
        if bulk && tx.capacity() < tx.max_capacity() / 2 {
            return Err(PersistError::QueueFull {
                capacity: tx.max_capacity() / 2,
            });
        }
        tx.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PersistError::QueueFull {
                capacity: tx.max_capacity(),
            },
            mpsc::error::TrySendError::Closed(_) => PersistError::Stopped,
        })
    }
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    delay: Option<Duration>,
    stats: Arc<Stats>,
    log: Option<(EventFiles, Publish)>,
    reporter: Option<Reporter>,
    /// The newest version of each replaced file not yet saved (at most one
    /// per file: `state.json`, `leases.json`), in the order first queued.
    unsaved: Vec<(ReplacedFile, Vec<u8>)>,
    /// How the newest save of each replaced file went (absent: none yet).
    last_save: Vec<(&'static str, Result<(), PersistError>)>,
    events_health: Health,
    state_health: Health,
    /// Audit-trail events the disk refused, oldest first, written before
    /// anything newer (their acks were answered with the failure).
    backlog: Vec<Pending>,
}

/// Whether writing one kind of file works, and what has been said about it.
#[derive(Debug, Default)]
struct Health {
    /// Failures since it last worked, the last error, and when the failing
    /// was last announced.
    failing: Option<Failing>,
    /// It works again after `n` failures; not announced yet.
    recovered: Option<u64>,
}

#[derive(Debug)]
struct Failing {
    file: String,
    error: String,
    failures: u64,
    announced: Option<Instant>,
}

impl Health {
    fn failed(&mut self, e: &PersistError) {
        let (file, error) = match e {
            PersistError::Io { path, .. } => (path.display().to_string(), e.to_string()),
            e => (String::new(), e.to_string()),
        };
        self.recovered = None;
        match &mut self.failing {
            Some(f) => {
                f.failures += 1;
                f.error = error;
                f.file = file;
            }
            None => {
                self.failing = Some(Failing {
                    file,
                    error,
                    failures: 1,
                    announced: None,
                });
            }
        }
    }

    fn worked(&mut self, file: &Path) {
        if let Some(f) = self.failing.take() {
            // Announce a recovery only of a failure that was announced.
            if f.announced.is_some() {
                self.recovered = Some(f.failures);
            }
            tracing::info!(file = %file.display(), failures = f.failures, "writing to the state directory works again");
        }
    }

    /// What is due to be announced now (at most one report per file per
    /// [`REPORT_INTERVAL`] while it fails).
    fn due(&mut self, file: &Path, now: Instant) -> Option<DiskReport> {
        if let Some(failures) = self.recovered.take() {
            return Some(DiskReport::Recovered {
                file: file.display().to_string(),
                failures,
            });
        }
        let f = self.failing.as_mut()?;
        if f.announced
            .is_some_and(|at| now.duration_since(at) < REPORT_INTERVAL)
        {
            return None;
        }
        f.announced = Some(now);
        Some(DiskReport::Failing {
            file: if f.file.is_empty() {
                file.display().to_string()
            } else {
                f.file.clone()
            },
            error: f.error.clone(),
            failures: f.failures,
        })
    }
}

/// Acknowledgements to send once a commit (and what it reports) is done.
type Replies = Vec<(
    oneshot::Sender<Result<(), PersistError>>,
    Result<(), PersistError>,
)>;

/// One event waiting for the disk.
struct Pending {
    event: Arc<api::Event>,
    line: String,
    durable: bool,
    /// None for the writer's own reports.
    ack: Option<oneshot::Sender<Result<(), PersistError>>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        // A timer for retrying a failed save while nothing else arrives.
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build();
        loop {
            let retrying =
                !self.unsaved.is_empty() || !self.backlog.is_empty() || self.reports_waiting();
            let first = match (&timer, retrying) {
                (Ok(rt), true) => {
                    // The timer is made inside the runtime, which drives it.
                    let next = rt
                        .block_on(async { tokio::time::timeout(RETRY_INTERVAL, rx.recv()).await });
                    match next {
                        Ok(Some(request)) => Some(request),
                        Ok(None) => break,
                        Err(_) => None,
                    }
                }
                _ => match rx.blocking_recv() {
                    Some(request) => Some(request),
                    None => break,
                },
            };
            let mut batch: Vec<Request> = first.into_iter().collect();
            while batch.len() < QUEUE_CAPACITY
                && let Ok(more) = rx.try_recv()
            {
                batch.push(more);
            }
            if let Some(delay) = self.delay {
                thread::sleep(delay);
            }
            self.commit_and_answer(batch, &mut rx);
        }
        // The channel is closed: a last try for what is still pending.
        if !self.unsaved.is_empty() || !self.backlog.is_empty() {
            self.commit_and_answer(Vec::new(), &mut rx);
        }
    }

    /// Commits `batch`, records what is due about the disk, then answers:
    /// whoever is told a write failed can already see the event saying so.
    fn commit_and_answer(&mut self, batch: Vec<Request>, rx: &mut mpsc::Receiver<Request>) {
        let mut replies = self.commit_with(batch, Vec::new());
        replies.extend(self.report(rx));
        for (ack, result) in replies {
            let _ = ack.send(result);
        }
    }

    fn reports_waiting(&self) -> bool {
        let waiting = |h: &Health| h.failing.is_some() || h.recovered.is_some();
        self.reporter.is_some() && (waiting(&self.events_health) || waiting(&self.state_health))
    }

    /// Records the disk reports that are due as events of the log's own,
    /// numbered after everything already queued (so subscribers still see
    /// seqs in order) and committed like any other.
    fn report(&mut self, rx: &mut mpsc::Receiver<Request>) -> Replies {
        if self.reporter.is_none() {
            return Replies::new();
        }
        let now = Instant::now();
        let events_file = self.dir.join(
            self.log
                .as_ref()
                .map_or("events.log", |(files, _)| files.main.current),
        );
        let state_file = self.dir.join(
            self.unsaved
                .first()
                .map_or("state.json", |(file, _)| file.current),
        );
        let due: Vec<DiskReport> = [
            self.events_health.due(&events_file, now),
            self.state_health.due(&state_file, now),
        ]
        .into_iter()
        .flatten()
        .collect();
        if due.is_empty() {
            return Replies::new();
        }
        let Some(reporter) = &self.reporter else {
            return Replies::new();
        };
        let mut batch = Vec::new();
        let mut own = Vec::new();
        {
            let mut next_seq = reporter
                .next_seq
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Everything queued so far has a lower seq.
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            for report in &due {
                if let Some((event, line)) = (reporter.make)(*next_seq, report) {
                    *next_seq += 1;
                    own.push(Pending {
                        event,
                        line,
                        durable: true,
                        ack: None,
                    });
                }
            }
        }
        for report in &due {
            match report {
                DiskReport::Failing {
                    file,
                    error,
                    failures,
                } => tracing::error!(
                    file,
                    failures,
                    error,
                    "the state directory cannot be written"
                ),
                DiskReport::Recovered { file, failures } => {
                    tracing::info!(file, failures, "the state directory can be written again");
                }
            }
        }
        self.commit_with(batch, own)
    }

    /// Group commit: all event lines with one fsync, the latest snapshot
    /// once, then publish; with the writer's own events after the batch's.
    /// Returns the acknowledgements to send.
    fn commit_with(&mut self, batch: Vec<Request>, own: Vec<Pending>) -> Replies {
        let mut replies = Replies::new();
        let mut events = Vec::new();
        let mut state_acks = Vec::new();
        let mut flushes = Vec::new();
        for request in batch {
            match request {
                Request::AttachLog {
                    files,
                    publish,
                    reporter,
                } => {
                    replies.extend(self.commit_events(std::mem::take(&mut events)));
                    self.log = Some((files, publish));
                    self.reporter = reporter;
                }
                Request::Append {
                    event,
                    line,
                    durable,
                    ack,
                } => events.push(Pending {
                    event,
                    line,
                    durable,
                    ack: Some(ack),
                }),
                Request::Replace { file, bytes, ack } => {
                    if let Some(bytes) = bytes {
                        match self.unsaved.iter_mut().find(|(f, _)| *f == file) {
                            Some(pending) => pending.1 = bytes,
                            None => self.unsaved.push((file, bytes)),
                        }
                    }
                    state_acks.push((file.current, ack));
                }
                Request::Flush { ack } => flushes.push(ack),
            }
        }
        events.extend(own);
        replies.extend(self.commit_events(events));
        // A save still pending (a new version, or one that failed before)
        // is tried on every wake-up until it works.
        for (file, bytes) in std::mem::take(&mut self.unsaved) {
            let result = save_replaced(&self.dir, file, &bytes);
            match &result {
                Ok(()) => {
                    self.stats.state_saves.fetch_add(1, Ordering::Relaxed);
                    self.stats.state_failing.store(false, Ordering::Relaxed);
                    self.state_health.worked(&self.dir.join(file.current));
                }
                Err(e) => {
                    self.stats.state_failures.fetch_add(1, Ordering::Relaxed);
                    self.stats.state_failing.store(true, Ordering::Relaxed);
                    self.state_health.failed(e);
                    tracing::debug!(error = %e, "could not save the desired state; retrying");
                    self.unsaved.push((file, bytes));
                }
            }
            match self.last_save.iter_mut().find(|(f, _)| *f == file.current) {
                Some(last) => last.1 = result,
                None => self.last_save.push((file.current, result)),
            }
        }
        for (file, ack) in state_acks {
            let last = self
                .last_save
                .iter()
                .find(|(f, _)| *f == file)
                .map_or(Ok(()), |(_, r)| r.clone());
            replies.push((ack, last));
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        for ack in flushes {
            replies.push((ack, Ok(())));
        }
        replies
    }

    /// Appends and publishes `events`; returns their acknowledgements.
    fn commit_events(&mut self, mut events: Vec<Pending>) -> Replies {
        let mut replies = Replies::new();
        // What the disk refused before goes first: it has the lower seqs.
        if !self.backlog.is_empty() {
            let mut older = std::mem::take(&mut self.backlog);
            older.append(&mut events);
            events = older;
        }
        if events.is_empty() {
            return replies;
        }
        // Bulk events (not durable) go to their own file.
        let (results, failed) = match &mut self.log {
            Some((files, _)) => {
                let main: Vec<&str> = events
                    .iter()
                    .filter(|p| p.durable)
                    .map(|p| p.line.as_str())
                    .collect();
                let bulk: Vec<&str> = events
                    .iter()
                    .filter(|p| !p.durable)
                    .map(|p| p.line.as_str())
                    .collect();
                let main_result = if main.is_empty() {
                    Ok(())
                } else {
                    files.main.append(&main, true, &self.stats)
                };
                let kept = if main_result.is_ok() {
                    main.len()
                } else {
                    files.main.kept
                };
                let bulk_result = if bulk.is_empty() {
                    Ok(())
                } else {
                    files.bulk.append(&bulk, false, &self.stats)
                };
                let failed = [&main_result, &bulk_result]
                    .into_iter()
                    .find_map(|r| r.as_ref().err().cloned());
                ((main_result, bulk_result, kept), failed)
            }
            None => (
                (Err(PersistError::Stopped), Err(PersistError::Stopped), 0),
                Some(PersistError::Stopped),
            ),
        };
        let (main_result, bulk_result, kept) = results;
        let failures = events
            .iter()
            .filter(|p| {
                if p.durable {
                    main_result.is_err()
                } else {
                    bulk_result.is_err()
                }
            })
            .count();
        match &failed {
            Some(e) => {
                self.stats
                    .event_failures
                    .fetch_add(failures as u64, Ordering::Relaxed);
                self.stats.events_failing.store(true, Ordering::Relaxed);
                self.events_health.failed(e);
                tracing::debug!(error = %e, events = failures, "could not persist events; kept to retry, not published until written");
            }
            None => {
                self.stats.events_failing.store(false, Ordering::Relaxed);
                if let Some((files, _)) = &self.log {
                    self.events_health
                        .worked(&files.main.dir.join(files.main.current));
                }
            }
        }
        // Only what is on disk is published: a client never sees an event
        // that the log does not have (and that a restart would number
        // again). Audit-trail events the disk refused wait for it, in
        // order; refused requests' records are dropped.
        let mut written = Vec::new();
        let mut main_seen = 0;
        for mut pending in events {
            let result = if pending.durable {
                main_seen += 1;
                if main_seen <= kept {
                    Ok(())
                } else {
                    main_result.clone()
                }
            } else {
                bulk_result.clone()
            };
            if let Some(ack) = pending.ack.take() {
                replies.push((ack, result.clone()));
            }
            if result.is_ok() {
                written.push((pending.event.clone(), !pending.durable));
            } else if pending.durable && self.log.is_some() {
                if self.backlog.len() < BACKLOG_CAPACITY {
                    self.backlog.push(pending);
                } else {
                    tracing::error!(
                        seq = pending.event.seq,
                        "the disk has refused {BACKLOG_CAPACITY} events; dropping this one"
                    );
                }
            }
        }
        if let Some((_, publish)) = &self.log
            && !written.is_empty()
        {
            publish(written);
        }
        replies
    }
}

impl AppendLog {
    /// Appends `lines` (each ending in a newline), rotating as needed;
    /// `durable`: fsync once at the end. A failed append is cut back to where
    /// the batch started in the file it was writing (also right after a
    /// rotation), so the next one starts on a clean line and nothing after
    /// it is lost; where even the cut fails, it is retried before the next
    /// append, and the next line starts on a line of its own.
    fn append(&mut self, lines: &[&str], durable: bool, stats: &Stats) -> Result<(), PersistError> {
        let path = self.dir.join(self.current);
        self.repair_tail(&path)?;
        let mut start = self
            .file
            .metadata()
            .map_err(|e| PersistError::io("stat", &path, e))?
            .len();
        let mut lines_before = self.lines_in_file;
        let mut result = Ok(());
        self.kept = 0;
        for (i, line) in lines.iter().enumerate() {
            if self.lines_in_file >= self.retain || self.reopen_pending {
                if let Err(e) = self.rotate(stats) {
                    result = Err(e);
                    break;
                }
                // The new file starts empty; what went before is durable
                // in the rotated one.
                start = 0;
                lines_before = 0;
                self.kept = i;
            }
            if let Err(e) = self.write_line(line) {
                result = Err(PersistError::io("write", &path, e));
                break;
            }
            self.lines_in_file += 1;
        }
        if result.is_ok() && durable {
            result = self
                .file
                .sync_data()
                .map_err(|e| PersistError::io("fsync", &path, e));
            stats.event_fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        if result.is_err() {
            self.lines_in_file = lines_before;
            if self.file.set_len(start).is_err() {
                self.cut_pending = Some(start);
            }
        }
        result
    }

    /// Cuts back what an earlier failed append could not; failing that,
    /// ends the torn line so the next one is whole.
    fn repair_tail(&mut self, path: &Path) -> Result<(), PersistError> {
        let Some(len) = self.cut_pending else {
            return Ok(());
        };
        if self.file.set_len(len).is_ok() || self.file.write_all(b"\n").is_ok() {
            self.cut_pending = None;
            return Ok(());
        }
        Err(PersistError::io(
            "repair",
            path,
            io::Error::other("a torn line could not be cut back"),
        ))
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        #[cfg(test)]
        if let Some(left) = self.space_left {
            let fits = usize::try_from(left).unwrap_or(usize::MAX).min(line.len());
            self.file.write_all(&line.as_bytes()[..fits])?;
            self.space_left = Some(left - fits as u64);
            if fits < line.len() {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            return Ok(());
        }
        self.file.write_all(line.as_bytes())
    }

    fn rotate(&mut self, stats: &Stats) -> Result<(), PersistError> {
        let current = self.dir.join(self.current);
        let rotated = self.dir.join(self.rotated);
        if !self.reopen_pending {
            // Lines of this batch already in the old file must be durable
            // before it stops being the one that is synced.
            self.file
                .sync_data()
                .map_err(|e| PersistError::io("fsync", &current, e))?;
            stats.event_fsyncs.fetch_add(1, Ordering::Relaxed);
            fs::rename(&current, &rotated).map_err(|e| PersistError::io("rename", &current, e))?;
            self.reopen_pending = true;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current)
            .map_err(|e| PersistError::io("open", &current, e))?;
        self.reopen_pending = false;
        sync_dir(&self.dir);
        self.lines_in_file = 0;
        Ok(())
    }
}

/// The steps of a save, in order. A crash can stop a save after any of
/// them; at every point `state.json` (or, before the first save ever
/// completed, the fsynced temporary file) holds a complete version, which
/// is what `state.rs` loads: the current file is never removed or renamed
/// away, only replaced by an atomic rename of a file already on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SaveStep {
    /// Create the temporary file and write the new version into it.
    WriteTemporary,
    /// fsync it: the new version is complete on disk.
    SyncTemporary,
    /// Remove the old previous version (the current one is untouched).
    DropPrevious,
    /// Hard-link (or, where links are refused, copy) the current version
    /// as the previous one.
    KeepPrevious,
    /// Rename the temporary file over the current one (atomic).
    Replace,
    /// fsync the directory, so the rename survives a power loss.
    SyncDirectory,
}

impl SaveStep {
    pub(crate) const ALL: [SaveStep; 6] = [
        SaveStep::WriteTemporary,
        SaveStep::SyncTemporary,
        SaveStep::DropPrevious,
        SaveStep::KeepPrevious,
        SaveStep::Replace,
        SaveStep::SyncDirectory,
    ];
}

/// Saves `bytes` as `file`, keeping the previous version: every step of
/// [`SaveStep::ALL`].
fn save_replaced(dir: &Path, file: ReplacedFile, bytes: &[u8]) -> Result<(), PersistError> {
    fs::create_dir_all(dir).map_err(|e| PersistError::io("create", dir, e))?;
    let mut tmp = None;
    for step in SaveStep::ALL {
        save_step(dir, file, bytes, step, &mut tmp)?;
    }
    Ok(())
}

/// Runs the save steps before `stop` and no others, as a crash right there
/// would leave the directory (tests).
#[cfg(test)]
pub(crate) fn save_interrupted_before(
    dir: &Path,
    file: ReplacedFile,
    bytes: &[u8],
    stop: Option<SaveStep>,
) -> Result<(), PersistError> {
    let mut tmp = None;
    for step in SaveStep::ALL {
        if Some(step) == stop {
            break;
        }
        save_step(dir, file, bytes, step, &mut tmp)?;
    }
    Ok(())
}

fn save_step(
    dir: &Path,
    file: ReplacedFile,
    bytes: &[u8],
    step: SaveStep,
    tmp_file: &mut Option<File>,
) -> Result<(), PersistError> {
    let tmp = dir.join(file.temporary);
    let current = dir.join(file.current);
    let previous = dir.join(file.previous);
    match step {
        SaveStep::WriteTemporary => {
            let mut f = File::create(&tmp).map_err(|e| PersistError::io("create", &tmp, e))?;
            f.write_all(bytes)
                .map_err(|e| PersistError::io("write", &tmp, e))?;
            *tmp_file = Some(f);
        }
        SaveStep::SyncTemporary => {
            if let Some(f) = tmp_file.take() {
                f.sync_all()
                    .map_err(|e| PersistError::io("fsync", &tmp, e))?;
            }
        }
        SaveStep::DropPrevious => match fs::remove_file(&previous) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(PersistError::io("remove", &previous, e)),
        },
        SaveStep::KeepPrevious => {
            if current.exists() && fs::hard_link(&current, &previous).is_err() {
                // Some filesystems refuse hard links: a copy, made durable.
                fs::copy(&current, &previous)
                    .and_then(|_| File::open(&previous)?.sync_all())
                    .map_err(|e| PersistError::io("copy", &current, e))?;
            }
        }
        SaveStep::Replace => {
            fs::rename(&tmp, &current).map_err(|e| PersistError::io("rename", &tmp, e))?;
        }
        SaveStep::SyncDirectory => sync_dir(dir),
    }
    Ok(())
}

/// Makes a rename durable; best effort (some filesystems refuse).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;
    use crate::{
        api::EventKind,
        events::{Actor, EventLog, NewEvent},
        state::StateStore,
    };

    fn event(i: u32) -> NewEvent {
        NewEvent::new(
            EventKind::PowerLimitChanged,
            Actor::governor(),
            format!("step {i}"),
        )
        .gpu(0, "GPU-x")
    }

    /// The seqs in `events.log` right now.
    fn seqs_on_disk(dir: &Path) -> Vec<u64> {
        fs::read_to_string(dir.join("events.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let json = l.split_once(' ')?.1;
                serde_json::from_str::<serde_json::Value>(json)
                    .ok()?
                    .get("seq")?
                    .as_u64()
            })
            .collect()
    }

    #[tokio::test]
    async fn events_queued_together_share_one_fsync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer =
            Persister::start_with_delay(Some(dir.path()), Some(Duration::from_millis(300)))
                .expect("writer");
        let (log, _) = EventLog::with_writer(&writer, 1000);
        let acks: Vec<_> = (0..50).map(|i| log.record(event(i))).collect();
        for recorded in acks {
            recorded.ack().await.expect("durable");
        }
        let stats = writer.stats();
        assert_eq!(seqs_on_disk(dir.path()), (1..=50).collect::<Vec<_>>());
        assert!(
            stats.event_fsyncs <= 10,
            "50 events queued behind a slow disk took {} fsyncs",
            stats.event_fsyncs
        );
        assert!(stats.commits <= 10, "{stats:?}");
    }

    #[tokio::test]
    async fn an_event_is_on_disk_before_a_subscriber_or_its_ack_sees_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = Persister::start_with_delay(Some(dir.path()), Some(Duration::from_millis(20)))
            .expect("writer");
        let (log, _) = EventLog::with_writer(&writer, 1000);
        let mut sub = log.subscribe(Some(0));
        let mut recorded = Vec::new();
        for i in 0..20 {
            recorded.push(log.record(event(i)));
        }
        assert_eq!(
            recorded.iter().map(|r| r.seq()).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>(),
            "numbered in submit order"
        );
        for expected in 1..=20 {
            let published = tokio::time::timeout(Duration::from_secs(10), sub.live.recv())
                .await
                .expect("published in time")
                .expect("live feed");
            assert_eq!(published.seq, expected, "published in seq order");
            assert!(
                seqs_on_disk(dir.path()).contains(&expected),
                "event {expected} was published before it was written"
            );
        }
        for r in recorded {
            let seq = r.seq();
            let event = r.ack().await.expect("durable");
            assert_eq!(event.seq, seq);
        }
        assert_eq!(log.latest_seq(), 20);
    }

    #[tokio::test]
    async fn acknowledged_events_survive_the_writer_going_away() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = Persister::start(Some(dir.path())).expect("writer");
        let (log, _) = EventLog::with_writer(&writer, 1000);
        let mut acked = Vec::new();
        for i in 0..10 {
            acked.push(log.record(event(i)).ack().await.expect("durable").seq);
            assert!(seqs_on_disk(dir.path()).contains(acked.last().expect("one")));
        }
        drop(log);
        drop(writer);
        let (log, report) = EventLog::open(Some(dir.path()), 1000);
        assert!(!report.damaged(), "{report:?}");
        let replay: Vec<_> = log
            .subscribe(Some(0))
            .replay
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(replay, acked);
    }

    #[tokio::test]
    async fn flush_waits_for_everything_queued_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer =
            Persister::start_with_delay(Some(dir.path()), Some(Duration::from_millis(100)))
                .expect("writer");
        let (log, _) = EventLog::with_writer(&writer, 1000);
        for i in 0..10 {
            log.record(event(i)); // fire and forget
        }
        writer.flush().await.expect("flushed");
        assert_eq!(seqs_on_disk(dir.path()).len(), 10);
        assert_eq!(log.recent(100).len(), 10, "and published");
    }

    #[tokio::test]
    async fn two_replaced_files_queued_in_one_batch_are_both_saved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer =
            Persister::start_with_delay(Some(dir.path()), Some(Duration::from_millis(100)))
                .expect("writer");
        let other = ReplacedFile {
            current: "other.json",
            previous: "other.json.prev",
            temporary: "other.json.tmp",
        };
        // Queued together: one commit sees both (the delay batches them).
        let a = writer.replace(crate::state::STATE_FILE, Some(b"{\"a\":1}\n".to_vec()));
        let b = writer.replace(other, Some(b"{\"b\":1}\n".to_vec()));
        let c = writer.replace(crate::state::STATE_FILE, Some(b"{\"a\":2}\n".to_vec()));
        a.await.expect("state saved");
        b.await.expect("other saved");
        c.await.expect("state saved again");
        assert_eq!(
            fs::read_to_string(dir.path().join("state.json")).expect("state"),
            "{\"a\":2}\n"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("other.json")).expect("other"),
            "{\"b\":1}\n"
        );
    }

    #[tokio::test]
    async fn a_failed_state_save_is_an_error_naming_the_file_until_a_save_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("state.json.tmp");
        fs::create_dir(&blocker).expect("a directory where the temporary file goes");
        let writer = Persister::start(Some(dir.path())).expect("writer");
        let (mut store, _) = StateStore::with_writer(&writer);

        let err = store
            .update("GPU-a", |s| s.operator_ceiling_mw = Some(400_000))
            .await
            .expect_err("a save that failed is not an OK");
        assert!(
            err.to_string().contains("state.json.tmp"),
            "the error names the file: {err}"
        );
        assert!(matches!(err, PersistError::Io { .. }));
        assert_eq!(store.get("GPU-a").operator_ceiling_mw, Some(400_000));
        assert!(writer.failures() >= 1);
        assert!(
            store
                .update("GPU-a", |s| s.operator_ceiling_mw = Some(400_000))
                .await
                .is_err(),
            "an unchanged value that is not on disk is not an OK either"
        );

        fs::remove_dir(&blocker).expect("unblock");
        store
            .update("GPU-a", |s| s.operator_ceiling_mw = Some(400_000))
            .await
            .expect("the pending save is retried");
        drop(store);
        drop(writer);
        let (store, report) = StateStore::open(Some(dir.path()));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(store.get("GPU-a").operator_ceiling_mw, Some(400_000));
    }

    #[tokio::test]
    async fn a_flood_of_bulk_events_cannot_crowd_the_audit_trail_out_of_the_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer =
            Persister::start_with_delay(Some(dir.path()), Some(Duration::from_millis(1500)))
                .expect("writer");
        let (log, _) = EventLog::with_writer(&writer, 10_000);
        let refused_request = || {
            NewEvent::new(
                EventKind::ControlRefused,
                Actor::operator("anyone"),
                "refused",
            )
            .not_durable()
        };
        let flood: Vec<_> = (0..QUEUE_CAPACITY)
            .map(|_| log.record(refused_request()))
            .collect();
        let governor = log.record(event(1));
        assert_ne!(governor.seq(), 0, "the governor's event was queued");

        let (mut queued, mut refused) = (Vec::new(), 0);
        for recorded in flood {
            if recorded.seq() == 0 {
                refused += 1;
                assert!(matches!(
                    recorded.ack().await,
                    Err(PersistError::QueueFull { .. })
                ));
            } else {
                queued.push(recorded.seq());
                recorded
                    .ack()
                    .await
                    .expect("a queued bulk event is written");
            }
        }
        assert!(refused > 0, "the flood was bounded");
        assert!(
            queued.len() >= QUEUE_CAPACITY / 2,
            "half the queue was theirs"
        );
        let expected: Vec<u64> = (1..=queued.len() as u64).collect();
        assert_eq!(queued, expected, "refused events take no seq: no holes");
        let event = governor
            .ack()
            .await
            .expect("the governor's event is durable");
        assert_eq!(event.seq, queued.len() as u64 + 1);
        assert!(log.persist_failures() >= refused);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_failed_event_write_is_an_error_naming_the_log_and_is_counted() {
        // /dev/full answers every write with ENOSPC: a full disk.
        let full = OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .expect("/dev/full");
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = Persister::start(Some(dir.path())).expect("writer");
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = published.clone();
        let bulk = OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .expect("/dev/full");
        let files = EventFiles {
            main: AppendLog::new(
                dir.path().to_path_buf(),
                "events.log",
                "events.log.1",
                full,
                0,
                100,
            ),
            bulk: AppendLog::new(
                dir.path().to_path_buf(),
                "events.refused.log",
                "events.refused.log.1",
                bulk,
                0,
                100,
            ),
        };
        assert!(writer.attach_log(
            files,
            Box::new(move |events| sink.lock().expect("sink").extend(events)),
            None,
        ));
        let event = Arc::new(api::Event {
            seq: 1,
            ..api::Event::default()
        });
        let ack = writer
            .append(event, "00000000 {}\n".to_owned(), true, false)
            .map_err(|(_, e)| e)
            .expect("queued");
        let err = ack.await.expect_err("a write that failed is not an OK");
        assert!(
            err.to_string().contains("events.log"),
            "the error names the file: {err}"
        );
        assert_eq!(writer.stats().event_failures, 1);
        assert_eq!(
            published.lock().expect("published").len(),
            0,
            "not handed to subscribers: they see only what the log has"
        );
    }

    #[tokio::test]
    async fn an_event_the_disk_refused_is_written_once_it_takes_it_and_only_then_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = Persister::start(Some(dir.path())).expect("writer");
        // The log must be reopened, and a directory is in its way: every
        // append fails until it is gone.
        fs::create_dir(dir.path().join("events.log")).expect("a blocker");
        let old = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("events.log.1"))
            .expect("open");
        let mut main = AppendLog::new(
            dir.path().to_path_buf(),
            "events.log",
            "events.log.1",
            old,
            0,
            100,
        );
        main.reopen_pending = true;
        let bulk = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("events.refused.log"))
            .expect("open");
        let files = EventFiles {
            main,
            bulk: AppendLog::new(
                dir.path().to_path_buf(),
                "events.refused.log",
                "events.refused.log.1",
                bulk,
                0,
                100,
            ),
        };
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = published.clone();
        assert!(writer.attach_log(
            files,
            Box::new(move |events| sink.lock().expect("sink").extend(events)),
            None,
        ));
        for seq in [1, 2] {
            let event = Arc::new(api::Event {
                seq,
                ..api::Event::default()
            });
            let ack = writer
                .append(event, format!("0000000{seq} line {seq}\n"), true, false)
                .map_err(|(_, e)| e)
                .expect("queued");
            ack.await.expect_err("the disk refused it: not an OK");
        }
        assert!(
            published.lock().expect("published").is_empty(),
            "nothing the log does not have is published"
        );
        fs::remove_dir(dir.path().join("events.log")).expect("the disk takes writes again");
        let deadline = Instant::now() + Duration::from_secs(10);
        while published.lock().expect("published").len() < 2 {
            assert!(Instant::now() < deadline, "the refused events were never written");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seqs: Vec<u64> = published
            .lock()
            .expect("published")
            .iter()
            .map(|(e, _)| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2], "published once written, in order");
        assert_eq!(
            read(dir.path(), "events.log"),
            "00000001 line 1\n00000002 line 2\n",
            "written in order, once"
        );
    }

    #[test]
    fn without_a_state_directory_acks_are_ready_at_once() {
        let writer = Persister::memory();
        let (log, _) = EventLog::with_writer(&writer, 10);
        let (mut store, _) = StateStore::with_writer(&writer);
        let recorded = log.record(event(1));
        assert_eq!(recorded.seq(), 1);
        assert!(matches!(recorded.ack().now_or_never(), Some(Ok(_))));
        assert!(matches!(
            store
                .update("GPU-a", |s| s.threshold_c = Some(70))
                .now_or_never(),
            Some(Ok(()))
        ));
        assert!(matches!(writer.flush().now_or_never(), Some(Ok(()))));
        assert_eq!(log.recent(10).len(), 1);
    }

    fn append_log(dir: &Path, retain: usize) -> AppendLog {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("events.log"))
            .expect("open");
        AppendLog::new(
            dir.to_path_buf(),
            "events.log",
            "events.log.1",
            file,
            0,
            retain,
        )
    }

    fn read(dir: &Path, name: &str) -> String {
        fs::read_to_string(dir.join(name)).unwrap_or_default()
    }

    #[test]
    fn a_line_torn_by_a_full_disk_is_cut_back_and_the_next_line_survives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Stats::default();
        let mut log = append_log(dir.path(), 100);
        log.append(&["one\n", "two\n"], true, &stats).expect("room");
        // The disk fills up in the middle of the second line of a batch.
        log.space_left = Some(6);
        let err = log
            .append(&["three\n", "four\n"], true, &stats)
            .expect_err("the disk is full");
        assert!(err.to_string().contains("events.log"), "{err}");
        assert_eq!(
            read(dir.path(), "events.log"),
            "one\ntwo\n",
            "cut back to before the batch"
        );
        log.space_left = None;
        log.append(&["five\n"], true, &stats).expect("room again");
        assert_eq!(read(dir.path(), "events.log"), "one\ntwo\nfive\n");
        assert_eq!(log.lines_in_file, 3);
    }

    #[test]
    fn a_line_torn_by_a_full_disk_right_after_a_rotation_is_cut_back_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Stats::default();
        let mut log = append_log(dir.path(), 2);
        log.append(&["one\n", "two\n"], true, &stats).expect("room");
        // The batch rotates first, then the disk fills mid-line in the new
        // file.
        log.space_left = Some(3);
        log.append(&["three\n"], true, &stats)
            .expect_err("the disk is full");
        assert_eq!(read(dir.path(), "events.log.1"), "one\ntwo\n");
        assert_eq!(
            read(dir.path(), "events.log"),
            "",
            "the torn line is cut from the new file"
        );
        log.space_left = None;
        log.append(&["four\n"], true, &stats).expect("room again");
        assert_eq!(read(dir.path(), "events.log"), "four\n");
        assert_eq!(read(dir.path(), "events.log.1"), "one\ntwo\n");
    }

    #[test]
    fn a_rotation_that_could_not_reopen_the_log_is_finished_by_the_next_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Stats::default();
        let mut log = append_log(dir.path(), 1);
        log.append(&["one\n"], true, &stats).expect("room");
        // As if the rename of a rotation worked and the open did not.
        fs::rename(
            dir.path().join("events.log"),
            dir.path().join("events.log.1"),
        )
        .expect("rename");
        log.reopen_pending = true;
        log.append(&["two\n"], true, &stats).expect("reopened");
        assert_eq!(read(dir.path(), "events.log"), "two\n");
        assert_eq!(read(dir.path(), "events.log.1"), "one\n");
    }

    #[tokio::test]
    async fn a_failed_save_is_retried_until_durable_without_another_update() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("state.json.tmp");
        fs::create_dir(&blocker).expect("a directory where the temporary file goes");
        let writer = Persister::start(Some(dir.path())).expect("writer");
        let (mut store, _) = StateStore::with_writer(&writer);
        store
            .update("GPU-a", |s| s.governor_lowered_limit = true)
            .await
            .expect_err("not durable yet");
        assert!(writer.stats().state_failing);
        fs::remove_dir(&blocker).expect("the disk recovers");
        // No further update: the writer retries on its own, and says so
        // (the flag clears just after the file lands: waited for, not
        // raced).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !read(dir.path(), "state.json").contains("\"governor_lowered_limit\": true")
            || writer.stats().state_failing
        {
            assert!(
                Instant::now() < deadline,
                "the lowered flag was never saved, or the writer still says it is failing"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(store);
        drop(writer);
        let (store, _) = StateStore::open(Some(dir.path()));
        assert!(store.get("GPU-a").governor_lowered_limit);
    }

    #[tokio::test]
    async fn a_failing_disk_is_announced_once_then_again_when_it_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("state.json.tmp");
        fs::create_dir(&blocker).expect("a directory where the temporary file goes");
        let writer = Persister::start(Some(dir.path())).expect("writer");
        let (log, _) = EventLog::with_writer(&writer, 1000);
        let (mut store, _) = StateStore::with_writer(&writer);
        let mut sub = log.subscribe(Some(0));
        for ceiling in [400_000, 410_000, 420_000] {
            store
                .update("GPU-a", |s| s.operator_ceiling_mw = Some(ceiling))
                .await
                .expect_err("the disk refuses");
            assert_eq!(
                log.count(api::EventKind::PersistFailed),
                1,
                "published by the time the failure is answered, and only once"
            );
        }
        let failed = tokio::time::timeout(Duration::from_secs(10), sub.live.recv())
            .await
            .expect("announced in time")
            .expect("live");
        assert_eq!(failed.kind(), api::EventKind::PersistFailed);
        assert!(
            failed.reason.contains("state.json.tmp"),
            "{}",
            failed.reason
        );
        writer.flush().await.expect("flushed");
        assert_eq!(
            log.count(api::EventKind::PersistFailed),
            1,
            "announced once, not once per failure"
        );
        fs::remove_dir(&blocker).expect("the disk recovers");
        let recovered = tokio::time::timeout(Duration::from_secs(10), sub.live.recv())
            .await
            .expect("announced in time")
            .expect("live");
        assert_eq!(recovered.kind(), api::EventKind::PersistRecovered);
        assert!(recovered.seq > failed.seq);
        let stats = writer.stats();
        assert!(
            stats.state_failures >= 3 && !stats.state_failing,
            "{stats:?}"
        );
    }
}
