//! The HTTP listener, connection by connection, with bounds on what a
//! client can hold: `axum::serve` has none (a slow-header client kept a
//! connection and its buffer forever; a thousand idle ones used up the
//! process's file descriptors, and gRPC with them).
//!
//! - **A connection cap** (`limits.http_max_connections`). At the cap, a
//!   new connection takes the place of the oldest one that has no request
//!   in flight (idle, or still sending its request head: those cost the
//!   daemon nothing to drop and are exactly what a flood is made of); when
//!   every connection is serving a request, the new one is closed at once.
//!   So a flood never holds more than the cap in file descriptors, and a
//!   probe's fresh connection (`/healthz`) still gets in.
//! - **A header read timeout** (`limits.http_header_timeout`): a request
//!   head (hyper starts the clock when it begins waiting for one, so an idle
//!   keep-alive connection is also closed after it) must arrive in full
//!   within it, and a TLS handshake too.
//! - **Bounded header memory** (`limits.http_max_header_bytes`): a larger
//!   request head is refused (431) and its buffer never grows beyond that.
//! - **A write timeout** (`limits.http_write_timeout`): a response — the
//!   SSE stream included — that cannot write a byte for that long (a
//!   stalled reader) ends its connection; each connection's kernel send
//!   buffer is bounded, so a stalled reader is noticed after kilobytes, not
//!   after megabytes of autotuned buffer.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body};
use http_body_util::BodyExt;
use hyper::{Request, body::Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    time::Sleep,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How the listener bounds its clients (from `[limits]`).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub write_timeout: Duration,
}

/// hyper's smallest read buffer.
const MIN_BUFFER: usize = 8192;
/// The kernel's send buffer per connection (Linux doubles it).
const SEND_BUFFER: usize = 128 * 1024;
/// Most headers one request may have.
const MAX_HEADERS: usize = 64;

/// One connection's place in the [`Registry`].
#[derive(Debug)]
struct Entry {
    /// Cancelled to drop the connection (it was evicted).
    evict: CancellationToken,
    /// Requests in flight on it (a response body still being written
    /// counts until it ends).
    busy: Arc<AtomicUsize>,
}

/// The open connections, oldest first (also used by `crate::grpc_listen`).
#[derive(Debug)]
pub(crate) struct Registry {
    max: usize,
    open: Mutex<(u64, BTreeMap<u64, Entry>)>,
}

/// A connection's registration; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Place {
    registry: Arc<Registry>,
    id: u64,
    /// Cancelled when the connection was evicted to make room.
    pub(crate) evict: CancellationToken,
    /// Nonzero: not evictable (requests in flight, or a gRPC connection
    /// that has spoken).
    pub(crate) busy: Arc<AtomicUsize>,
}

impl Registry {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            open: Mutex::new((0, BTreeMap::new())),
        })
    }

    /// A place for a new connection: evicts the oldest connection with no
    /// request in flight when at the cap; None when every one is busy.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Place> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.1.len() >= self.max {
            let idle = open
                .1
                .iter()
                .find(|(_, e)| e.busy.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)?;
            if let Some(entry) = open.1.remove(&idle) {
                entry.evict.cancel();
            }
        }
        open.0 += 1;
        let id = open.0;
        let evict = CancellationToken::new();
        let busy = Arc::new(AtomicUsize::new(0));
        open.1.insert(
            id,
            Entry {
                evict: evict.clone(),
                busy: busy.clone(),
            },
        );
        Some(Place {
            registry: self.clone(),
            id,
            evict,
            busy,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .len()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.registry
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .remove(&self.id);
    }
}

/// Counts a request in flight until its response body is dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket whose writes fail with `TimedOut` after making no progress for
/// `timeout` (a client that stopped reading).
struct WriteDeadline<T> {
    io: T,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(io: T, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            stalled: None,
        }
    }

    /// After the inner write returned `poll`: clears the deadline on
    /// progress, arms it on Pending, and fails once it has passed.
    fn check<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match poll {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the client read nothing for {} (limits.http_write_timeout)",
                            humantime::format_duration(timeout)
                        ),
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, poll)
    }
}

/// Serves `router` on `listener` within `limits` (over TLS with `tls`)
/// until `shutdown`; then lets each connection finish its request.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let registry = Registry::new(limits.max_connections);
    let limits = Arc::new(limits);
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: wait instead of spinning; the cap
                // keeps this listener from being the cause.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(place) = registry.admit() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    %peer,
                    refused,
                    "HTTP connection refused: all {} connections (limits.http_max_connections) are serving requests",
                    limits.max_connections
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // A bounded kernel send buffer: a reader that stops reading stalls
        // the writes after this much (the write timeout then drops it)
        // instead of after megabytes of autotuned buffer per connection.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let router = router.clone();
        let limits = limits.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let io = WriteDeadline::new(stream, limits.write_timeout);
            match tls {
                None => serve_connection(io, router, &limits, place, shutdown).await,
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        () = place.evict.cancelled() => return,
                        r = tokio::time::timeout(limits.header_timeout, acceptor.accept(io)) => r,
                    };
                    match handshake {
                        Ok(Ok(tls)) => {
                            serve_connection(tls, router, &limits, place, shutdown).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    Ok(())
}

/// Serves one connection until it ends, is evicted, or the daemon stops.
async fn serve_connection<I>(
    io: I,
    router: Router,
    limits: &ConnLimits,
    place: Place,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let busy = place.busy.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let busy = Busy::new(&busy);
        let router = router.clone();
        async move {
            let response = router.oneshot(request.map(Body::new)).await?;
            // In flight until the body (an SSE stream, say) is done.
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _busy = &busy;
                    frame
                }))
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(MIN_BUFFER))
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = place.evict.cancelled() => {}
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    }
    drop(place);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room_and_busy_ones_stay() {
        let registry = Registry::new(2);
        let a = registry.admit().expect("a");
        let b = registry.admit().expect("b");
        let _busy_a = Busy::new(&a.busy);
        // a is serving, b is idle: c takes b's place.
        let c = registry.admit().expect("c");
        assert!(b.evict.is_cancelled() && !a.evict.is_cancelled());
        assert_eq!(registry.len(), 2);
        drop(b);
        assert_eq!(registry.len(), 2, "an evicted place is already gone");
        let _busy_c = Busy::new(&c.busy);
        assert!(registry.admit().is_none(), "every connection is busy");
        drop(c);
        assert!(registry.admit().is_some());
    }
}
