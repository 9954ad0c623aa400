//! Device actors: one OS thread per GPU that owns its [`GpuDevice`], and
//! one shared reader thread that reads every GPU in turn while none hangs.
//!
//! Device calls block, sometimes for a long time (a sick GPU can hang an
//! NVML call for seconds). Giving each GPU its own thread means a hung call
//! stalls only that GPU: the sampler keeps its cadence for the others and
//! reports the stuck one as stale. Writes and fact reads for one GPU go
//! through its thread, in order.
//!
//! Waking eight threads every tick costs more than the reads themselves
//! when reads are cheap (a context switch is several microseconds on a
//! VM): so each tick's fast readings go to the [`SharedReader`] as one batch,
//! which reads the GPUs one after another on a single thread. Every read
//! carries a [`Ticket`]; when the batch is late (a call hangs), the sampler
//! takes back the reads the shared reader has not started and sends them
//! to the GPUs' own threads, so a hung GPU still costs the others nothing
//! but a hand-off. Each device sits behind its own lock, so the shared
//! reader and the GPU's thread never call it at once, and a call's answer
//! is sent before the lock is released, so answers leave in the order the
//! calls ran.
//!
//! A write carries a [`Ticket`] too: whoever queued it may cancel it while
//! it still waits behind a hung call (the thread then drops it unapplied),
//! and once the thread has started it, cancelling fails and the caller knows
//! the write will land, late, and must be recorded when it does.

use std::{
    io,
    panic::{self, AssertUnwindSafe},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
        mpsc,
    },
    thread,
    time::SystemTime,
};

use tokio::sync::oneshot;

use crate::backend::{BackendError, DeviceEvent, DeviceFacts, GpuDevice, ReadScope, Reading};

/// A change to make to a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp {
    SetPowerLimit { limit_mw: u32 },
    LockGpuClocks { min_mhz: u32, max_mhz: u32 },
    ResetGpuLockedClocks,
    ResetMemoryLockedClocks,
    ResetApplicationClocks,
}

/// The result of one read, stamped when the device answered.
#[derive(Debug)]
pub struct ReadOutcome {
    pub result: Result<Reading, BackendError>,
    /// Events the device reported (XID errors).
    pub events: Vec<DeviceEvent>,
    /// Wall time when the read finished.
    pub at: SystemTime,
}

/// A device shared by its own thread and the shared reader.
type SharedDevice = Arc<Mutex<Box<dyn GpuDevice>>>;

enum Command {
    Read {
        scope: ReadScope,
        reply: oneshot::Sender<ReadOutcome>,
    },
    Describe {
        reply: oneshot::Sender<Result<DeviceFacts, BackendError>>,
    },
    Write {
        op: WriteOp,
        reply: oneshot::Sender<Result<(), BackendError>>,
        ticket: Ticket,
    },
}

/// Where one queued call stands: waiting, started on the device, or
/// cancelled before it started. Shared by the queue's caller and the
/// thread that runs it; exactly one of "started" and "cancelled" wins.
#[derive(Debug, Clone, Default)]
pub struct Ticket(Arc<AtomicU8>);

const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const CANCELLED: u8 = 2;

impl Ticket {
    /// Cancels the call if no thread has started it; true when it will
    /// never run, false when it is (or was) under way.
    pub fn cancel(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// A thread takes the call; false when it was cancelled.
    fn start(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A queued call: the answer to wait for, and the ticket that cancels the
/// call (takes it back) while no thread has started it.
#[derive(Debug)]
pub struct Queued<T> {
    pub reply: oneshot::Receiver<T>,
    pub ticket: Ticket,
}

/// A write queued to a device thread.
pub type QueuedWrite = Queued<Result<(), BackendError>>;

/// A read handed to the shared reader.
pub type SharedRead = Queued<ReadOutcome>;

/// A read queued for the [`SharedReader`]: see [`DeviceActor::read_job`].
pub struct ReadJob {
    device: SharedDevice,
    scope: ReadScope,
    reply: oneshot::Sender<ReadOutcome>,
    ticket: Ticket,
}

/// Handle to one GPU's thread. Dropping it lets the thread finish its
/// current call and exit; a thread stuck in the driver is left detached.
pub struct DeviceActor {
    tx: mpsc::Sender<Command>,
    device: SharedDevice,
}

impl std::fmt::Debug for DeviceActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceActor").finish_non_exhaustive()
    }
}

/// Runs `call` on the device under its lock; None when an earlier call
/// panicked on it (the GPU is then answered as if its thread had stopped:
/// the reply is dropped, and its receiver reports an error).
fn with_device<T>(device: &SharedDevice, call: impl FnOnce(&mut dyn GpuDevice) -> T) -> Option<T> {
    let mut guard = device.lock().ok()?;
    Some(call(guard.as_mut()))
}

/// One read and the events it drained, stamped when it finished.
fn read_outcome(device: &mut dyn GpuDevice, scope: ReadScope) -> ReadOutcome {
    let result = device.read(scope);
    let events = device.drain_events();
    ReadOutcome {
        result,
        events,
        at: SystemTime::now(),
    }
}

impl DeviceActor {
    /// Starts the thread that owns `device`.
    pub fn spawn(index: u32, device: Box<dyn GpuDevice>) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Command>();
        let device: SharedDevice = Arc::new(Mutex::new(device));
        let own = device.clone();
        // The thread's handle is not kept: dropping the actor lets the
        // thread finish its call and exit, and a thread stuck in the driver
        // is left detached.
        thread::Builder::new()
            .name(format!("gpu{index}"))
            .spawn(move || {
                while let Ok(command) = rx.recv() {
                    // Each answer is sent under the lock: see the module.
                    match command {
                        Command::Read { scope, reply } => {
                            with_device(&own, |d| {
                                let _ = reply.send(read_outcome(d, scope));
                            });
                        }
                        Command::Describe { reply } => {
                            with_device(&own, |d| {
                                let _ = reply.send(d.describe().map(|f| checked(index, f)));
                            });
                        }
                        Command::Write { op, reply, ticket } => {
                            // The lock is taken first: a write waiting behind
                            // a hung read on the shared reader stays
                            // cancellable. Cancelled while it waited: never
                            // applied, and the caller already knows.
                            with_device(&own, |d| {
                                if ticket.start() {
                                    let _ = reply.send(apply(d, op));
                                }
                            });
                        }
                    }
                }
            })?;
        Ok(Self { tx, device })
    }

    /// Asks this GPU's own thread for a reading. If the thread is gone, the
    /// receiver reports an error when awaited.
    pub fn read(&self, scope: ReadScope) -> oneshot::Receiver<ReadOutcome> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Read { scope, reply });
        rx
    }

    /// A reading for the [`SharedReader`] to take, and what the caller keeps.
    pub fn read_job(&self, scope: ReadScope) -> (ReadJob, SharedRead) {
        let (reply, rx) = oneshot::channel();
        let ticket = Ticket::default();
        let job = ReadJob {
            device: self.device.clone(),
            scope,
            reply,
            ticket: ticket.clone(),
        };
        (job, SharedRead { reply: rx, ticket })
    }

    /// Asks for the GPU's static facts.
    pub fn describe(&self) -> oneshot::Receiver<Result<DeviceFacts, BackendError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Describe { reply });
        rx
    }

    /// Queues a write behind any call in progress (tests; the control
    /// plane queues through [`WriteQueue::write_cancellable`]).
    #[cfg(test)]
    pub fn write(&self, op: WriteOp) -> oneshot::Receiver<Result<(), BackendError>> {
        self.write_queue().write(op)
    }

    /// A handle that queues writes to this GPU from elsewhere (for a write
    /// that must wait for something else first).
    pub fn write_queue(&self) -> WriteQueue {
        WriteQueue {
            tx: self.tx.clone(),
        }
    }
}

/// One thread that runs batches of reads, one GPU after another, in the
/// order given. A read whose ticket was taken back before its turn is
/// skipped. A device that panics in a read loses that read (its receiver
/// reports an error) and the reader goes on with the next.
#[derive(Debug)]
pub struct SharedReader {
    tx: mpsc::Sender<Vec<ReadJob>>,
}

impl SharedReader {
    /// Starts the thread.
    pub fn spawn() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Vec<ReadJob>>();
        thread::Builder::new()
            .name("gpu-reader".into())
            .spawn(move || {
                while let Ok(jobs) = rx.recv() {
                    for job in jobs {
                        if !job.ticket.start() {
                            continue;
                        }
                        let ReadJob {
                            device,
                            scope,
                            reply,
                            ..
                        } = job;
                        let _ = panic::catch_unwind(AssertUnwindSafe(|| {
                            with_device(&device, |d| {
                                let _ = reply.send(read_outcome(d, scope));
                            })
                        }));
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Queues a batch; false when the thread is gone (the jobs are
    /// dropped unstarted, and their tickets can still be taken back).
    pub fn submit(&self, jobs: Vec<ReadJob>) -> bool {
        self.tx.send(jobs).is_ok()
    }
}

/// Queues writes to one GPU's thread; see [`DeviceActor::write_queue`].
#[derive(Debug, Clone)]
pub struct WriteQueue {
    tx: mpsc::Sender<Command>,
}

impl WriteQueue {
    /// Queues a write behind any call in progress.
    #[cfg(test)]
    pub fn write(&self, op: WriteOp) -> oneshot::Receiver<Result<(), BackendError>> {
        self.write_cancellable(op).reply
    }

    /// Queues a write behind any call in progress, with the ticket that
    /// cancels it while it has not started.
    pub fn write_cancellable(&self, op: WriteOp) -> QueuedWrite {
        let (reply, rx) = oneshot::channel();
        let ticket = Ticket::default();
        let _ = self.tx.send(Command::Write {
            op,
            reply,
            ticket: ticket.clone(),
        });
        QueuedWrite { reply: rx, ticket }
    }
}

/// The facts a device described, with what no real GPU reports (a
/// slowdown temperature of 0, a default limit of 0, a minimum above the
/// maximum) treated as unknown, and a warning for each.
fn checked(index: u32, mut facts: DeviceFacts) -> DeviceFacts {
    for problem in facts.sanitize() {
        tracing::warn!(
            gpu = index,
            "ignoring an implausible device fact: {problem}"
        );
    }
    facts
}

fn apply(device: &mut dyn GpuDevice, op: WriteOp) -> Result<(), BackendError> {
    match op {
        WriteOp::SetPowerLimit { limit_mw } => device.set_power_limit(limit_mw),
        WriteOp::LockGpuClocks { min_mhz, max_mhz } => device.lock_gpu_clocks(min_mhz, max_mhz),
        WriteOp::ResetGpuLockedClocks => device.reset_gpu_locked_clocks(),
        WriteOp::ResetMemoryLockedClocks => device.reset_memory_locked_clocks(),
        WriteOp::ResetApplicationClocks => device.reset_application_clocks(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::Mutex, time::Duration};

    /// A device whose reads block until `release` is sent, and which counts
    /// the power limits written to it.
    struct Blocking {
        release: Arc<Mutex<mpsc::Receiver<()>>>,
        written: Arc<Mutex<Vec<u32>>>,
    }

    impl GpuDevice for Blocking {
        fn describe(&mut self) -> Result<DeviceFacts, BackendError> {
            Ok(DeviceFacts {
                slowdown_c: Some(0),
                power_default_mw: Some(0),
                ..DeviceFacts::default()
            })
        }
        fn read(&mut self, _: ReadScope) -> Result<Reading, BackendError> {
            let release = self
                .release
                .lock()
                .map_err(|_| BackendError::Other("poisoned".into()))?;
            let _ = release.recv();
            Ok(Reading::default())
        }
        fn set_power_limit(&mut self, limit_mw: u32) -> Result<(), BackendError> {
            self.written
                .lock()
                .map_err(|_| BackendError::Other("poisoned".into()))?
                .push(limit_mw);
            Ok(())
        }
        crate::backend::accept_clock_writes!();
    }

    fn blocking() -> (DeviceActor, mpsc::Sender<()>, Arc<Mutex<Vec<u32>>>) {
        let (release_tx, release_rx) = mpsc::channel();
        let written = Arc::new(Mutex::new(Vec::new()));
        let device = Blocking {
            release: Arc::new(Mutex::new(release_rx)),
            written: written.clone(),
        };
        let actor = DeviceActor::spawn(0, Box::new(device)).expect("thread");
        (actor, release_tx, written)
    }

    #[tokio::test]
    async fn a_write_cancelled_while_queued_behind_a_hung_call_is_never_applied() {
        let (actor, release, written) = blocking();
        let read = actor.read(ReadScope { slow_fields: false });
        let queued = actor
            .write_queue()
            .write_cancellable(WriteOp::SetPowerLimit { limit_mw: 500_000 });
        assert!(queued.ticket.cancel(), "not started: cancellable");
        release.send(()).expect("release");
        read.await.expect("the read answers");
        // A later write goes through: the cancelled one was dropped, not run.
        let later = actor.write(WriteOp::SetPowerLimit { limit_mw: 600_000 });
        later.await.expect("answer").expect("written");
        assert_eq!(*written.lock().expect("lock"), vec![600_000]);
        assert!(
            queued.reply.await.is_err(),
            "no answer for a cancelled write"
        );
    }

    #[tokio::test]
    async fn a_write_already_started_cannot_be_cancelled() {
        let (actor, _release, written) = blocking();
        let queued = actor
            .write_queue()
            .write_cancellable(WriteOp::SetPowerLimit { limit_mw: 500_000 });
        tokio::time::timeout(Duration::from_secs(10), queued.reply)
            .await
            .expect("in time")
            .expect("answer")
            .expect("written");
        assert!(!queued.ticket.cancel(), "already applied");
        assert_eq!(*written.lock().expect("lock"), vec![500_000]);
    }

    #[tokio::test]
    async fn the_shared_reader_skips_reads_taken_back_and_keeps_writes_behind_it_cancellable() {
        let (hung, release, written) = blocking();
        let (other, _release_other, _) = blocking();
        let reader = SharedReader::spawn().expect("thread");
        let scope = ReadScope { slow_fields: false };
        let (first, hung_read) = hung.read_job(scope);
        let (second, other_read) = other.read_job(scope);
        assert!(reader.submit(vec![first, second]));
        // The first read is under way (it blocks); wait until it started.
        tokio::time::timeout(Duration::from_secs(10), async {
            while hung_read.ticket.0.load(Ordering::Acquire) != STARTED {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the shared reader takes the first read");
        assert!(!hung_read.ticket.cancel(), "started: not taken back");
        assert!(other_read.ticket.cancel(), "not reached: taken back");
        // A write to the hung GPU waits for the device's lock on its own
        // thread, still cancellable.
        let queued = hung
            .write_queue()
            .write_cancellable(WriteOp::SetPowerLimit { limit_mw: 500_000 });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(queued.ticket.cancel(), "waiting behind the hung read");
        release.send(()).expect("release");
        hung_read.reply.await.expect("the hung read answers");
        assert!(
            other_read.reply.await.is_err(),
            "a read taken back is never answered"
        );
        assert!(
            queued.reply.await.is_err(),
            "the cancelled write is dropped"
        );
        assert!(written.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn implausible_facts_are_treated_as_unknown_where_they_enter() {
        let (actor, _release, _) = blocking();
        let facts = actor.describe().await.expect("answer").expect("facts");
        assert_eq!(facts.slowdown_c, None);
        assert_eq!(facts.power_default_mw, None);
    }
}
