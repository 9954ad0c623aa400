//! The gRPC listener's connections, bounded like the HTTP listener's: a
//! flood of TCP connections to the gRPC port (idle, or never sending the
//! HTTP/2 preface) must not use up the file descriptors the HTTP side (and
//! `/healthz`) needs, and the reverse (see `crate::http::conn`).
//!
//! - **A connection cap** (`limits.grpc_max_connections`, clamped at start
//!   so that it and the HTTP cap fit in the process's open-files limit). At
//!   the cap, a new connection takes the place of the oldest one with no
//!   request in flight (silent, still opening, or an idle HTTP/2
//!   connection: a client that comes back reconnects); when every
//!   connection is serving a request or stream, the new one is closed at
//!   once.
//! - **An opening timeout** ([`FIRST_BYTE_TIMEOUT`]): a connection that does
//!   not send its first [`OPENING_BYTES`] bytes in time (the HTTP/2 preface
//!   is 24 bytes, a TLS ClientHello more) is closed — silent ones and ones
//!   that trickle a byte at a time alike.
//!
//! Each accepted socket is wrapped in a [`CappedStream`], which tonic serves
//! like the `TcpStream` inside it (its writes coalesced, see
//! [`crate::coalesce`]); its connect info is a
//! [`GrpcConnectInfo`] (`crate::auth::remote_addr` reads the peer from it).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{Stream, StreamExt, future::ready};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Sleep,
};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::{
    coalesce::Coalesce,
    http::conn::{Place, Registry},
};

/// How long a new gRPC connection may stay silent before it is closed.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many bytes a connection must send before it counts as opened: the
/// length of the HTTP/2 client preface.
pub const OPENING_BYTES: usize = 24;

/// File descriptors kept out of both caps: state files, NVML, the
/// listeners, logging.
pub const FD_RESERVE: usize = 128;

/// What tonic attaches to every request of a [`CappedStream`]: the TCP
/// addresses, and the connection's count of requests in flight (the
/// authorization layer counts each request there until its response body is
/// done, so a connection with nothing in flight can make room at the cap).
#[derive(Debug, Clone)]
pub struct GrpcConnectInfo {
    pub tcp: TcpConnectInfo,
    in_flight: Arc<AtomicUsize>,
}

impl GrpcConnectInfo {
    /// The peer's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }

    /// Counts one request in flight until the guard is dropped.
    pub fn enter(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }
}

/// One request in flight on a gRPC connection.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted gRPC connection holding its place under the cap.
pub struct CappedStream {
    io: Coalesce<TcpStream>,
    place: Place,
    evicted: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Armed until the opening bytes have arrived.
    first_byte: Option<Pin<Box<Sleep>>>,
    received: usize,
}

impl std::fmt::Debug for CappedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CappedStream")
            .field("io", &self.io)
            .field("place", &self.place)
            .finish_non_exhaustive()
    }
}

impl CappedStream {
    fn new(io: TcpStream, place: Place, first_byte_timeout: Duration) -> Self {
        let evicted = Box::pin(place.evict.clone().cancelled_owned());
        Self {
            io: Coalesce::new(io),
            place,
            evicted,
            first_byte: Some(Box::pin(tokio::time::sleep(first_byte_timeout))),
            received: 0,
        }
    }
}

impl Connected for CappedStream {
    type ConnectInfo = GrpcConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        GrpcConnectInfo {
            tcp: self.io.get_ref().connect_info(),
            in_flight: self.place.busy.clone(),
        }
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.evicted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room (limits.grpc_max_connections): it had no request in flight",
            )));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        match &poll {
            Poll::Ready(Ok(())) if self.first_byte.is_some() => {
                self.received += buf.filled().len() - before;
                if self.received >= OPENING_BYTES {
                    self.first_byte = None;
                }
            }
            Poll::Pending => {
                if let Some(timer) = self.first_byte.as_mut()
                    && timer.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "sent {} of its first {OPENING_BYTES} bytes in {} after connecting",
                            self.received,
                            humantime::format_duration(FIRST_BYTE_TIMEOUT)
                        ),
                    )));
                }
            }
            Poll::Ready(_) => {}
        }
        poll
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// `incoming` under a cap of `max` connections: connections beyond it (when
/// none can be evicted) are closed as they are accepted.
pub fn capped<S>(
    incoming: S,
    max: usize,
    first_byte_timeout: Duration,
) -> impl Stream<Item = io::Result<CappedStream>>
where
    S: Stream<Item = io::Result<TcpStream>>,
{
    let registry = Registry::new(max);
    let mut refused: u64 = 0;
    incoming.filter_map(move |accepted| {
        let item = match accepted {
            Ok(stream) => match registry.admit() {
                Some(place) => Some(Ok(CappedStream::new(stream, place, first_byte_timeout))),
                None => {
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            refused,
                            "gRPC connection refused: all {max} connections (limits.grpc_max_connections) are in use"
                        );
                    }
                    None
                }
            },
            Err(e) => Some(Err(e)),
        };
        ready(item)
    })
}

/// The process's soft limit on open files, from /proc (None: unknown).
pub fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The connection caps that fit in `nofile` open files: the HTTP cap first
/// (at most half of what is left after [`FD_RESERVE`]), then gRPC gets the
/// rest. Returns (http, grpc).
pub fn fit_caps(http: usize, grpc: usize, nofile: Option<usize>) -> (usize, usize) {
    let Some(nofile) = nofile else {
        return (http, grpc);
    };
    let usable = nofile.saturating_sub(FD_RESERVE).max(32);
    let http = http.min(usable / 2).max(1);
    let grpc = grpc.min(usable - http).max(1);
    (http, grpc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caps_fit_in_the_open_files_limit() {
        assert_eq!(fit_caps(512, 8192, None), (512, 8192));
        assert_eq!(fit_caps(512, 8192, Some(65_536)), (512, 8192));
        // The default soft limit of many shells: both shrink to fit.
        let (http, grpc) = fit_caps(512, 8192, Some(1024));
        assert!(http + grpc + FD_RESERVE <= 1024, "{http} + {grpc}");
        assert!(http >= 256 && grpc >= 256, "{http} {grpc}");
        let (http, grpc) = fit_caps(512, 8192, Some(10));
        assert!(http >= 1 && grpc >= 1);
    }

    #[test]
    fn the_open_files_limit_is_read() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
