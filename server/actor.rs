//! Device actors: one OS thread per GPU that owns its [`GpuDevice`].
//!
//! Device calls block, sometimes for a long time (a sick GPU can hang an
//! NVML call for seconds). Giving each GPU its own thread means a hung call
//! stalls only that GPU: the sampler keeps its cadence for the others and
//! reports the stuck one as stale. Reads and writes for one GPU go through the
//! same thread, in order, so they never race. Nothing else touches a device.

use std::{io, sync::mpsc, thread, time::SystemTime};

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
    },
}

/// Handle to one GPU's thread. Dropping it lets the thread finish its
/// current call and exit; a thread stuck in the driver is left detached.
#[derive(Debug)]
pub struct DeviceActor {
    tx: mpsc::Sender<Command>,
}

impl DeviceActor {
    /// Starts the thread that owns `device`.
    pub fn spawn(index: u32, mut device: Box<dyn GpuDevice>) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Command>();
        // The thread's handle is not kept: dropping the actor lets the
        // thread finish its call and exit, and a thread stuck in the driver
        // is left detached.
        thread::Builder::new()
            .name(format!("gpu{index}"))
            .spawn(move || {
                while let Ok(command) = rx.recv() {
                    match command {
                        Command::Read { scope, reply } => {
                            let result = device.read(scope);
                            let events = device.drain_events();
                            let _ = reply.send(ReadOutcome {
                                result,
                                events,
                                at: SystemTime::now(),
                            });
                        }
                        Command::Describe { reply } => {
                            let _ = reply.send(device.describe());
                        }
                        Command::Write { op, reply } => {
                            let _ = reply.send(apply(device.as_mut(), op));
                        }
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Asks for a reading. If the thread is gone, the receiver reports an
    /// error when awaited.
    pub fn read(&self, scope: ReadScope) -> oneshot::Receiver<ReadOutcome> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Read { scope, reply });
        rx
    }

    /// Asks for the GPU's static facts.
    pub fn describe(&self) -> oneshot::Receiver<Result<DeviceFacts, BackendError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Describe { reply });
        rx
    }

    /// A handle that queues writes to this GPU from elsewhere (for a write
    /// that must wait for something else first).
    pub fn write_queue(&self) -> WriteQueue {
        WriteQueue {
            tx: self.tx.clone(),
        }
    }
}

/// Queues writes to one GPU's thread; see [`DeviceActor::write_queue`].
#[derive(Debug, Clone)]
pub struct WriteQueue {
    tx: mpsc::Sender<Command>,
}

impl WriteQueue {
    /// Queues a write behind any call in progress.
    pub fn write(&self, op: WriteOp) -> oneshot::Receiver<Result<(), BackendError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Write { op, reply });
        rx
    }
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
