//! Writes under way and the replies waiting for them.
//!
//! A planned write is sent to its GPU's device thread — at once, or once
//! the desired state it depends on is durable — and completes here,
//! asynchronously, with a timeout, so neither a slow write nor a slow disk
//! stalls the control loop. An operator request that wrote something waits
//! in [`PendingReplies`] until all its writes have finished, and is answered
//! (with every failure named) only once what it changed is durable.

use std::{collections::HashMap, future::Future, pin::Pin, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};

use crate::{
    actor::{QueuedWrite, WriteQueue},
    api::{ClockResetResult, PowerLimitResult, ResetClocksResponse, SetPowerLimitResponse},
    backend::BackendError,
    persist::{Ack, AckSet},
};

use super::{
    Reply,
    error::ControlError,
    plan::{Part, Write},
    requests::Awaiting,
};

/// How long one device write may take before it counts as failed.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write waits for the desired state it depends on to be durable
/// before it goes ahead anyway: a hung disk must not stop the governor from
/// cooling a GPU (the failure is logged and counted by the writer).
const PERSIST_WAIT: Duration = Duration::from_secs(10);

/// How a write ended, as far as the control loop is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// It finished (or failed) within [`WRITE_TIMEOUT`].
    InTime,
    /// It did not start within [`WRITE_TIMEOUT`] (the device thread was
    /// stuck in another call) and was cancelled: never applied.
    Cancelled,
    /// It started but did not finish within [`WRITE_TIMEOUT`]: it is still
    /// running on the device and will be reported again, as [`Finish::Late`],
    /// when it completes.
    StillRunning,
    /// A write reported as [`Finish::StillRunning`] completed.
    Late,
}

/// A write that finished, timed out, or landed late.
#[derive(Debug)]
pub(crate) struct WriteDone {
    /// The GPU's position.
    pub gpu: usize,
    pub write: Write,
    pub result: Result<(), BackendError>,
    pub finish: Finish,
}

/// What a write's future yields: how it ended, and for a write still
/// running on the device, the future that waits for it to land.
struct WriteStep {
    done: WriteDone,
    late: Option<WriteFuture>,
}
type WriteFuture = Pin<Box<dyn Future<Output = WriteStep> + Send>>;

/// Writes sent to device threads and not yet finished.
#[derive(Default)]
pub(crate) struct Writes {
    futures: FuturesUnordered<WriteFuture>,
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes")
            .field("in_flight", &self.futures.len())
            .finish()
    }
}

impl Writes {
    /// Sends `write` to GPU `gpu` through `queue` — at once when `gate` is
    /// empty, else once the gate's acknowledgements are in (bounded) — and
    /// waits (bounded) for the answer. A write that times out is cancelled
    /// if it has not started; one that has is followed until it lands, so
    /// that its late completion is recorded, not lost.
    pub(crate) fn send(&mut self, gpu: usize, write: Write, queue: &WriteQueue, gate: AckSet) {
        let sent = gate.is_empty().then(|| queue.write_cancellable(write.op));
        let queue = queue.clone();
        self.futures.push(Box::pin(async move {
            let queued = match sent {
                Some(queued) => queued,
                None => {
                    match tokio::time::timeout(PERSIST_WAIT, gate.wait()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(
                            gpu,
                            error = %e,
                            "writing although the desired state is not durable"
                        ),
                        Err(_) => tracing::error!(
                            gpu,
                            "the desired state was not durable within {}s; writing anyway",
                            PERSIST_WAIT.as_secs()
                        ),
                    }
                    queue.write_cancellable(write.op)
                }
            };
            let QueuedWrite { mut reply, ticket } = queued;
            let (result, finish) = match tokio::time::timeout(WRITE_TIMEOUT, &mut reply).await {
                Ok(answer) => (answered(answer), Finish::InTime),
                Err(_) if ticket.cancel() => (
                    Err(BackendError::Timeout(format!(
                        "the GPU did not take the write within {}s (busy with another call); cancelled, never applied",
                        WRITE_TIMEOUT.as_secs()
                    ))),
                    Finish::Cancelled,
                ),
                Err(_) => (
                    Err(BackendError::Timeout(format!(
                        "the write did not finish within {}s; it is still under way on the GPU and is recorded when it completes",
                        WRITE_TIMEOUT.as_secs()
                    ))),
                    Finish::StillRunning,
                ),
            };
            let late: Option<WriteFuture> = (finish == Finish::StillRunning).then(|| {
                let write = write.clone();
                Box::pin(async move {
                    let done = WriteDone {
                        gpu,
                        write,
                        result: answered(reply.await),
                        finish: Finish::Late,
                    };
                    WriteStep { done, late: None }
                }) as WriteFuture
            });
            let done = WriteDone {
                gpu,
                write,
                result,
                finish,
            };
            WriteStep { done, late }
        }));
    }

    /// The next write to finish (or time out); `None` when none is under
    /// way. A write still running after its timeout stays under way.
    pub(crate) async fn next(&mut self) -> Option<WriteDone> {
        let WriteStep { done, late } = self.futures.next().await?;
        if let Some(late) = late {
            self.futures.push(late);
        }
        Some(done)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.futures.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.futures.len()
    }
}

/// The device thread's answer to a write, or why there is none.
fn answered(
    answer: Result<Result<(), BackendError>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), BackendError> {
    answer.unwrap_or_else(|_| Err(BackendError::Other("device thread stopped".into())))
}

/// A reply waiting for writes, with where to send it.
enum Pending {
    PowerLimit(Awaiting<PowerLimitResult>, Reply<SetPowerLimitResponse>),
    Clocks(Awaiting<ClockResetResult>, Reply<ResetClocksResponse>),
}

/// A reply waiting for writes and for what its request changed to be
/// durable.
struct Waiting {
    pending: Pending,
    durable: AckSet,
}

/// Replies waiting for their writes, by id.
#[derive(Default)]
pub(crate) struct PendingReplies {
    waiting: HashMap<u64, Waiting>,
    last_id: u64,
}

impl std::fmt::Debug for PendingReplies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingReplies")
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl PendingReplies {
    /// An id for the next request's writes to name.
    pub(crate) fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// Answers once the writes have finished (at once if there are none)
    /// and `durable` is in.
    pub(crate) fn power_limit(
        &mut self,
        id: u64,
        reply: Awaiting<PowerLimitResult>,
        tx: Reply<SetPowerLimitResponse>,
        durable: AckSet,
    ) {
        let pending = Pending::PowerLimit(reply, tx);
        self.waiting.insert(id, Waiting { pending, durable });
        self.finish_if_done(id);
    }

    /// Answers once the writes have finished (at once if there are none)
    /// and `durable` is in.
    pub(crate) fn clocks(
        &mut self,
        id: u64,
        reply: Awaiting<ClockResetResult>,
        tx: Reply<ResetClocksResponse>,
        durable: AckSet,
    ) {
        let pending = Pending::Clocks(reply, tx);
        self.waiting.insert(id, Waiting { pending, durable });
        self.finish_if_done(id);
    }

    /// One write of request `id` finished; `durable` acknowledges what its
    /// completion recorded.
    pub(crate) fn write_done(
        &mut self,
        id: u64,
        slot: usize,
        part: Part,
        index: u32,
        result: &Result<(), BackendError>,
        durable: Vec<Ack>,
    ) {
        let Some(waiting) = self.waiting.get_mut(&id) else {
            return;
        };
        for ack in durable {
            waiting.durable.push(ack);
        }
        match &mut waiting.pending {
            Pending::PowerLimit(reply, _) => reply.absorb(slot, part, index, result),
            Pending::Clocks(reply, _) => reply.absorb(slot, part, index, result),
        }
        self.finish_if_done(id);
    }

    fn finish_if_done(&mut self, id: u64) {
        let done = self.waiting.get(&id).is_some_and(|w| match &w.pending {
            Pending::PowerLimit(reply, _) => reply.is_complete(),
            Pending::Clocks(reply, _) => reply.is_complete(),
        });
        if !done {
            return;
        }
        let Some(Waiting { pending, durable }) = self.waiting.remove(&id) else {
            return;
        };
        match pending {
            Pending::PowerLimit(reply, tx) => reply_when_durable(
                tx,
                reply
                    .finish()
                    .map(|results| SetPowerLimitResponse { results }),
                durable,
            ),
            Pending::Clocks(reply, tx) => reply_when_durable(
                tx,
                reply
                    .finish()
                    .map(|results| ResetClocksResponse { results }),
                durable,
            ),
        }
    }
}

/// Answers a request once what it changed is durable, without holding up
/// the control loop: a change that could not be made durable is not an OK.
pub(crate) fn reply_when_durable<T: Send + 'static>(
    tx: Reply<T>,
    result: Result<T, ControlError>,
    durable: AckSet,
) {
    if durable.is_empty() {
        let _ = tx.send(result);
        return;
    }
    tokio::spawn(async move {
        let result = match (result, durable.wait().await) {
            (Ok(_), Err(e)) => Err(ControlError::NotDurable {
                reason: e.to_string(),
            }),
            (result, _) => result,
        };
        let _ = tx.send(result);
    });
}
