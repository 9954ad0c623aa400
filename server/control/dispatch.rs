//! Writes under way and the replies waiting for them.
//!
//! A planned write is sent to its GPU's device thread and completes here,
//! asynchronously, with a timeout, so a slow write never stalls the
//! control loop. An operator request that wrote something waits in
//! [`PendingReplies`] until all its writes have finished, then is answered
//! with every failure named.

use std::{collections::HashMap, future::Future, pin::Pin, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::sync::oneshot;

use crate::{
    api::{ClockResetResult, PowerLimitResult, ResetClocksResponse, SetPowerLimitResponse},
    backend::BackendError,
};

use super::{
    Reply,
    plan::{Part, Write},
    requests::Awaiting,
};

/// How long one device write may take before it counts as failed.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A write that finished (or timed out).
#[derive(Debug)]
pub(crate) struct WriteDone {
    /// The GPU's position.
    pub gpu: usize,
    pub write: Write,
    pub result: Result<(), BackendError>,
}

type WriteFuture = Pin<Box<dyn Future<Output = WriteDone> + Send>>;

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
    /// Waits (bounded) for the answer `rx` to `write` on GPU `gpu`.
    pub(crate) fn track(
        &mut self,
        gpu: usize,
        write: Write,
        rx: oneshot::Receiver<Result<(), BackendError>>,
    ) {
        self.futures.push(Box::pin(async move {
            let result = match tokio::time::timeout(WRITE_TIMEOUT, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(BackendError::Other("device thread stopped".into())),
                Err(_) => Err(BackendError::Timeout(format!(
                    "the write did not finish within {}s",
                    WRITE_TIMEOUT.as_secs()
                ))),
            };
            WriteDone { gpu, write, result }
        }));
    }

    /// The next write to finish; `None` when none is under way.
    pub(crate) async fn next(&mut self) -> Option<WriteDone> {
        self.futures.next().await
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.futures.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.futures.len()
    }
}

/// A reply waiting for writes, with where to send it.
enum Pending {
    PowerLimit(Awaiting<PowerLimitResult>, Reply<SetPowerLimitResponse>),
    Clocks(Awaiting<ClockResetResult>, Reply<ResetClocksResponse>),
}

/// Replies waiting for their writes, by id.
#[derive(Default)]
pub(crate) struct PendingReplies {
    pending: HashMap<u64, Pending>,
    last_id: u64,
}

impl std::fmt::Debug for PendingReplies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingReplies")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl PendingReplies {
    /// An id for the next request's writes to name.
    pub(crate) fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// Answers now if nothing is to be written, else when the writes finish.
    pub(crate) fn power_limit(
        &mut self,
        id: u64,
        reply: Awaiting<PowerLimitResult>,
        tx: Reply<SetPowerLimitResponse>,
    ) {
        self.pending.insert(id, Pending::PowerLimit(reply, tx));
        self.finish_if_done(id);
    }

    /// Answers now if nothing is to be written, else when the writes finish.
    pub(crate) fn clocks(
        &mut self,
        id: u64,
        reply: Awaiting<ClockResetResult>,
        tx: Reply<ResetClocksResponse>,
    ) {
        self.pending.insert(id, Pending::Clocks(reply, tx));
        self.finish_if_done(id);
    }

    /// One write of request `id` finished.
    pub(crate) fn write_done(
        &mut self,
        id: u64,
        slot: usize,
        part: Part,
        index: u32,
        result: &Result<(), BackendError>,
    ) {
        match self.pending.get_mut(&id) {
            Some(Pending::PowerLimit(reply, _)) => reply.absorb(slot, part, index, result),
            Some(Pending::Clocks(reply, _)) => reply.absorb(slot, part, index, result),
            None => return,
        }
        self.finish_if_done(id);
    }

    fn finish_if_done(&mut self, id: u64) {
        let done = match self.pending.get(&id) {
            Some(Pending::PowerLimit(reply, _)) => reply.is_complete(),
            Some(Pending::Clocks(reply, _)) => reply.is_complete(),
            None => false,
        };
        if !done {
            return;
        }
        match self.pending.remove(&id) {
            Some(Pending::PowerLimit(reply, tx)) => {
                let _ = tx.send(
                    reply
                        .finish()
                        .map(|results| SetPowerLimitResponse { results }),
                );
            }
            Some(Pending::Clocks(reply, tx)) => {
                let _ = tx.send(
                    reply
                        .finish()
                        .map(|results| ResetClocksResponse { results }),
                );
            }
            None => {}
        }
    }
}
