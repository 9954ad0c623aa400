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
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    thread::{self, JoinHandle},
    time::Duration,
};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::api;

/// Requests the writer may be behind by. A request is one event or one
/// state snapshot; at a few hundred bytes each this bounds the queue to a
/// few MB even when the disk stalls.
pub const QUEUE_CAPACITY: usize = 4096;
/// Test-only: an environment variable that makes the writer sleep this long
/// (humantime, e.g. `2s`) before committing each batch, to show that nothing
/// but the requests' own acknowledgements waits for the disk. Not a setting.
#[doc(hidden)]
pub const TEST_DELAY_ENV: &str = "GPUWATCH_TEST_WRITER_DELAY";

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
}

/// A line-per-record log with one rotated generation: `current` holds up to
/// `retain` lines, then becomes `rotated` (replacing the older one).
#[derive(Debug)]
pub(crate) struct AppendLog {
    pub(crate) dir: PathBuf,
    pub(crate) current: &'static str,
    pub(crate) rotated: &'static str,
    /// `current`, open for appending, positioned at its end.
    pub(crate) file: File,
    /// Lines already in `current`.
    pub(crate) lines_in_file: usize,
    pub(crate) retain: usize,
}

/// A file replaced atomically on every save, keeping the previous version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplacedFile {
    pub current: &'static str,
    pub previous: &'static str,
    pub temporary: &'static str,
}

/// Hands events to subscribers once they are committed (called by the
/// writer, in sequence order).
pub(crate) type Publish = Box<dyn Fn(Vec<Arc<api::Event>>) + Send>;

enum Request {
    /// The event log to append to, and who to publish to.
    AttachLog { log: AppendLog, publish: Publish },
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
            unsaved: None,
            last_save: Ok(()),
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
    pub(crate) fn attach_log(&self, log: AppendLog, publish: Publish) -> bool {
        self.try_send(Request::AttachLog { log, publish }, false)
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
    log: Option<(AppendLog, Publish)>,
    /// The newest version of the replaced file not yet saved.
    unsaved: Option<(ReplacedFile, Vec<u8>)>,
    /// How the newest save went.
    last_save: Result<(), PersistError>,
}

/// One event waiting for the disk.
struct Pending {
    event: Arc<api::Event>,
    line: String,
    durable: bool,
    ack: oneshot::Sender<Result<(), PersistError>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < QUEUE_CAPACITY
                && let Ok(more) = rx.try_recv()
            {
                batch.push(more);
            }
            if let Some(delay) = self.delay {
                thread::sleep(delay);
            }
            self.commit(batch);
        }
    }

    /// Group commit: all event lines with one fsync, the latest snapshot
    /// once, then publish, then acknowledge.
    fn commit(&mut self, batch: Vec<Request>) {
        let mut events = Vec::new();
        let mut state_acks = Vec::new();
        let mut flushes = Vec::new();
        for request in batch {
            match request {
                Request::AttachLog { log, publish } => {
                    self.commit_events(std::mem::take(&mut events));
                    self.log = Some((log, publish));
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
                    ack,
                }),
                Request::Replace { file, bytes, ack } => {
                    if let Some(bytes) = bytes {
                        self.unsaved = Some((file, bytes));
                    }
                    state_acks.push(ack);
                }
                Request::Flush { ack } => flushes.push(ack),
            }
        }
        self.commit_events(events);
        if !state_acks.is_empty()
            && let Some((file, bytes)) = self.unsaved.take()
        {
            self.last_save = save_replaced(&self.dir, file, &bytes);
            match &self.last_save {
                Ok(()) => {
                    self.stats.state_saves.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.state_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "could not save the desired state; it will not survive a restart until a save succeeds");
                    self.unsaved = Some((file, bytes));
                }
            }
        }
        for ack in state_acks {
            let _ = ack.send(self.last_save.clone());
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        for ack in flushes {
            let _ = ack.send(Ok(()));
        }
    }

    fn commit_events(&mut self, events: Vec<Pending>) {
        if events.is_empty() {
            return;
        }
        let result = match &mut self.log {
            Some((log, _)) => {
                let durable = events.iter().any(|p| p.durable);
                let lines: Vec<&str> = events.iter().map(|p| p.line.as_str()).collect();
                log.append(&lines, durable, &self.stats)
            }
            None => Err(PersistError::Stopped),
        };
        if let Err(e) = &result {
            self.stats
                .event_failures
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            tracing::error!(error = %e, events = events.len(), "could not persist events; kept in memory only");
        }
        // Published even when the write failed: the trail in memory is
        // better than none, and whoever waits on the ack is told.
        if let Some((_, publish)) = &self.log {
            publish(events.iter().map(|p| p.event.clone()).collect());
        }
        for pending in events {
            let _ = pending.ack.send(result.clone());
        }
    }
}

impl AppendLog {
    /// Appends `lines` (each ending in a newline), rotating as needed;
    /// `durable`: fsync once at the end. A failed append is cut back to where
    /// the batch started, so the next one starts on a clean line.
    fn append(&mut self, lines: &[&str], durable: bool, stats: &Stats) -> Result<(), PersistError> {
        let path = self.dir.join(self.current);
        let start = self.file.metadata().map(|m| m.len()).ok();
        let lines_before = self.lines_in_file;
        let mut rotated = false;
        let mut result = Ok(());
        for line in lines {
            if self.lines_in_file >= self.retain {
                if let Err(e) = self.rotate(stats) {
                    result = Err(e);
                    break;
                }
                rotated = true;
            }
            if let Err(e) = self.file.write_all(line.as_bytes()) {
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
        if result.is_err()
            && !rotated
            && let Some(start) = start
            && self.file.set_len(start).is_ok()
        {
            self.lines_in_file = lines_before;
        }
        result
    }

    fn rotate(&mut self, stats: &Stats) -> Result<(), PersistError> {
        let current = self.dir.join(self.current);
        let rotated = self.dir.join(self.rotated);
        // Lines of this batch already in the old file must be durable
        // before it stops being the one that is synced.
        self.file
            .sync_data()
            .map_err(|e| PersistError::io("fsync", &current, e))?;
        stats.event_fsyncs.fetch_add(1, Ordering::Relaxed);
        fs::rename(&current, &rotated).map_err(|e| PersistError::io("rename", &current, e))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current)
            .map_err(|e| PersistError::io("open", &current, e))?;
        sync_dir(&self.dir);
        self.lines_in_file = 0;
        Ok(())
    }
}

/// Write the temporary file, fsync, keep the previous version, rename,
/// fsync the directory.
fn save_replaced(dir: &Path, file: ReplacedFile, bytes: &[u8]) -> Result<(), PersistError> {
    fs::create_dir_all(dir).map_err(|e| PersistError::io("create", dir, e))?;
    let tmp = dir.join(file.temporary);
    {
        let mut f = File::create(&tmp).map_err(|e| PersistError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| PersistError::io("write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| PersistError::io("fsync", &tmp, e))?;
    }
    let current = dir.join(file.current);
    if current.exists() {
        fs::rename(&current, dir.join(file.previous))
            .map_err(|e| PersistError::io("rename", &current, e))?;
    }
    fs::rename(&tmp, &current).map_err(|e| PersistError::io("rename", &tmp, e))?;
    sync_dir(dir);
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
        let log = AppendLog {
            dir: dir.path().to_path_buf(),
            current: "events.log",
            rotated: "events.log.1",
            file: full,
            lines_in_file: 0,
            retain: 100,
        };
        assert!(writer.attach_log(
            log,
            Box::new(move |events| sink.lock().expect("sink").extend(events))
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
            1,
            "still handed to subscribers, from memory"
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
}
