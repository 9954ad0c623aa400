//! Bounds on what clients may hold open: streams server-wide and per
//! connection. Beyond them a new stream is RESOURCE_EXHAUSTED with the limit
//! named, so one client cannot starve the others or the daemon's memory.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use tonic::Status;

/// Counts open streams.
#[derive(Debug)]
pub struct StreamLimiter {
    max_total: usize,
    max_per_connection: usize,
    open: Mutex<(usize, HashMap<SocketAddr, usize>)>,
}

/// An open stream's place; dropping it frees the place.
#[derive(Debug)]
pub struct StreamPermit {
    limiter: Arc<StreamLimiter>,
    peer: Option<SocketAddr>,
}

impl StreamLimiter {
    pub fn new(max_total: usize, max_per_connection: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_connection,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes a place for a stream from `peer` (one TCP connection).
    #[allow(clippy::result_large_err)]
    pub fn acquire(self: &Arc<Self>, peer: Option<SocketAddr>) -> Result<StreamPermit, Status> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.0 >= self.max_total {
            return Err(Status::resource_exhausted(format!(
                "the daemon already serves {} streams, its limit (limits.max_streams); try again later",
                self.max_total
            )));
        }
        if let Some(peer) = peer {
            let here = open.1.get(&peer).copied().unwrap_or(0);
            if here >= self.max_per_connection {
                return Err(Status::resource_exhausted(format!(
                    "this connection already has {} streams open, the limit per connection \
                     (limits.max_streams_per_connection); open another connection or close some",
                    self.max_per_connection
                )));
            }
            open.1.insert(peer, here + 1);
        }
        open.0 += 1;
        Ok(StreamPermit {
            limiter: self.clone(),
            peer,
        })
    }

    /// Streams open now.
    #[cfg(test)]
    pub fn open_streams(&self) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).0
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self
            .limiter
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.0 = open.0.saturating_sub(1);
        if let Some(peer) = self.peer
            && let Some(n) = open.1.get_mut(&peer)
        {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn limits_are_enforced_and_released() {
        let limiter = StreamLimiter::new(3, 2);
        let a: SocketAddr = "127.0.0.1:1000".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:1001".parse().expect("addr");
        let p1 = limiter.acquire(Some(a)).expect("first");
        let _p2 = limiter.acquire(Some(a)).expect("second");
        let err = limiter.acquire(Some(a)).expect_err("per connection");
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.message().contains("max_streams_per_connection"));
        let _p3 = limiter.acquire(Some(b)).expect("other connection");
        let err = limiter.acquire(Some(b)).expect_err("server-wide");
        assert!(err.message().contains("limits.max_streams"));
        drop(p1);
        assert_eq!(limiter.open_streams(), 2);
        limiter.acquire(Some(a)).expect("freed");
    }
}
