//! Write coalescing for gRPC connections: many HTTP/2 frames, one `write`.
//!
//! Why it exists: h2 writes every DATA frame of 256 bytes or more with a
//! `writev` of its own and flushes after it (its encoder holds one such
//! frame at a time). A Watch frame of 8 GPUs is about 2 KB, so a tick sent to
//! 250 subscribers on one connection was 250 system calls, 250 TCP segments
//! and 250 wake-ups of the reader — about half of the daemon's CPU in the
//! 1,000-subscriber fan-out (perf: `writev` and the loopback path under it
//! at 49 % of samples). The frames of one tick are ready within one pass of
//! the scheduler, so they can share a few large writes.
//!
//! What it owns: [`Coalesce`], an `AsyncRead + AsyncWrite` wrapper around a
//! connection's socket. Writes go to a buffer; the buffer goes to the socket
//! when it reaches [`WRITE_AT`] bytes, when a flush finds half that or more,
//! on shutdown, or when the connection's task next reads after a flush. A
//! flush that finds less is *deferred*: it wakes the task (so the task is
//! polled again after the other tasks that are queued, the ones producing
//! this tick's frames) and reports done; the task's next read writes the
//! buffer first. Everything that runs on this socket reads on every poll
//! (h2 polls the socket for reading on every pass; a TLS handshake reads
//! the peer's answer after writing), so deferred bytes wait for at most one
//! pass of the scheduler; nothing waits for a timer or for more traffic.
//! Writes of [`WRITE_AT`] bytes or more with nothing buffered go to the
//! socket as they are (no copy for large answers such as history).
//!
//! Only the connection's own task polls its socket (hyper's stream tasks
//! hand frames to h2's shared state, not to the socket), so the waker a
//! deferred flush wakes is that task's.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes that go to the socket without waiting for a flush.
pub const WRITE_AT: usize = 64 * 1024;

/// A buffer this large or larger is freed once written (most connections
/// carry small answers; a burst does not pin its peak for the connection's
/// life).
const KEEP_CAPACITY: usize = 16 * 1024;

/// A socket whose writes are coalesced (see the module documentation).
#[derive(Debug)]
pub struct Coalesce<T> {
    io: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    written: usize,
    /// A flush was deferred: the next read writes the buffer first.
    flush_wanted: bool,
}

impl<T> Coalesce<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: Vec::new(),
            written: 0,
            flush_wanted: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Bytes written by the caller and not yet to the socket.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes the buffer to the socket.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        self.flush_wanted = false;
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Appends `bytes` (which fit under [`WRITE_AT`] with what is buffered).
    fn append(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.flush_wanted {
            // A full socket leaves the rest for later: its waker is this
            // task's, and reading must not wait for writing.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buffered() + bytes.len() > WRITE_AT {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.is_empty() && bytes.len() >= WRITE_AT {
            return Pin::new(&mut this.io).poll_write(cx, bytes);
        }
        this.append(bytes);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.buffered() + total > WRITE_AT {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.is_empty() && total >= WRITE_AT {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.append(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buffered() > 0 && this.buffered() < WRITE_AT / 2 {
            // Deferred: the task comes back after the tasks queued behind
            // it, and its next read writes first.
            this.flush_wanted = true;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Wake,
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A socket that records every write and can refuse to take bytes.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        /// Bytes it accepts per write (0: all).
        chunk: usize,
        blocked: bool,
        flushes: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.blocked {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = if self.chunk == 0 {
                buf.len()
            } else {
                buf.len().min(self.chunk)
            };
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn written(c: &Coalesce<Recorder>) -> Vec<u8> {
        c.io.writes.concat()
    }

    /// One poll of a connection as h2 makes it: read (pending), then write
    /// frames with a flush after each, then a last flush.
    fn connection_poll(c: &mut Coalesce<Recorder>, cx: &mut Context<'_>, frames: &[Vec<u8>]) {
        let mut scratch = [0u8; 16];
        let _ = Pin::new(&mut *c).poll_read(cx, &mut ReadBuf::new(&mut scratch));
        for f in frames {
            let mut off = 0;
            while off < f.len() {
                match Pin::new(&mut *c).poll_write(cx, &f[off..]) {
                    Poll::Ready(Ok(n)) => off += n,
                    other => panic!("write: {other:?}"),
                }
            }
            assert!(Pin::new(&mut *c).poll_flush(cx).is_ready());
        }
        assert!(Pin::new(&mut *c).poll_flush(cx).is_ready());
    }

    #[test]
    fn frames_of_one_pass_share_a_write_and_the_next_pass_sends_them() {
        let waker = Arc::new(CountingWaker::default());
        let w = std::task::Waker::from(waker.clone());
        let mut cx = Context::from_waker(&w);
        let mut c = Coalesce::new(Recorder::default());
        // Ten 2 KB frames: under the half of WRITE_AT a flush writes at.
        let frames: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 2_000]).collect();
        connection_poll(&mut c, &mut cx, &frames);
        // Nothing written yet, all buffered, and the task asked to come back.
        assert!(c.io.writes.is_empty());
        assert_eq!(c.buffered(), 20_000);
        assert!(waker.0.load(Ordering::SeqCst) >= 1);
        // The next pass writes it all in one write, in order, when it reads.
        connection_poll(&mut c, &mut cx, &[]);
        assert_eq!(c.io.writes.len(), 1);
        assert_eq!(written(&c), frames.concat());
        assert_eq!(c.buffered(), 0);
    }

    #[test]
    fn a_full_buffer_is_written_without_waiting_for_a_pass() {
        let waker = Arc::new(CountingWaker::default());
        let w = std::task::Waker::from(waker.clone());
        let mut cx = Context::from_waker(&w);
        let mut c = Coalesce::new(Recorder::default());
        let frames: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 2_000]).collect();
        connection_poll(&mut c, &mut cx, &frames);
        // 200 KB in one pass: written in buffers of at most WRITE_AT.
        assert!(c.io.writes.len() >= 3, "{}", c.io.writes.len());
        assert!(c.io.writes.iter().all(|w| w.len() <= WRITE_AT));
        connection_poll(&mut c, &mut cx, &[]);
        assert_eq!(written(&c), frames.concat());
    }

    #[test]
    fn large_writes_pass_through_and_partial_writes_resume() {
        let waker = Arc::new(CountingWaker::default());
        let w = std::task::Waker::from(waker);
        let mut cx = Context::from_waker(&w);
        let mut c = Coalesce::new(Recorder {
            chunk: 1_000,
            ..Recorder::default()
        });
        let big = vec![7u8; WRITE_AT + 10];
        let small = vec![9u8; 3_000];
        let mut expect = Vec::new();
        for f in [&small, &big, &small] {
            expect.extend_from_slice(f);
        }
        connection_poll(
            &mut c,
            &mut cx,
            &[small.clone(), big.clone(), small.clone()],
        );
        connection_poll(&mut c, &mut cx, &[]);
        assert_eq!(written(&c), expect);
        assert!(c.io.writes.iter().all(|w| w.len() <= 1_000));
    }

    #[test]
    fn a_blocked_socket_makes_writes_wait_and_loses_nothing() {
        let waker = Arc::new(CountingWaker::default());
        let w = std::task::Waker::from(waker);
        let mut cx = Context::from_waker(&w);
        let mut c = Coalesce::new(Recorder::default());
        let first = vec![1u8; WRITE_AT - 100];
        assert!(matches!(
            Pin::new(&mut c).poll_write(&mut cx, &first),
            Poll::Ready(Ok(n)) if n == first.len()
        ));
        c.io.blocked = true;
        let second = vec![2u8; 1_000];
        assert!(Pin::new(&mut c).poll_write(&mut cx, &second).is_pending());
        assert!(Pin::new(&mut c).poll_shutdown(&mut cx).is_pending());
        c.io.blocked = false;
        assert!(matches!(
            Pin::new(&mut c).poll_write(&mut cx, &second),
            Poll::Ready(Ok(1_000))
        ));
        assert!(Pin::new(&mut c).poll_shutdown(&mut cx).is_ready());
        assert_eq!(written(&c), [first, second].concat());
    }

    #[test]
    fn a_deferred_flush_is_written_by_the_next_read() {
        let waker = Arc::new(CountingWaker::default());
        let w = std::task::Waker::from(waker.clone());
        let mut cx = Context::from_waker(&w);
        let mut c = Coalesce::new(Recorder::default());
        // Written but never flushed: stays (the caller did not ask).
        assert!(Pin::new(&mut c).poll_write(&mut cx, b"hello").is_ready());
        let mut scratch = [0u8; 4];
        let _ = Pin::new(&mut c).poll_read(&mut cx, &mut ReadBuf::new(&mut scratch));
        assert!(c.io.writes.is_empty());
        // A handshake's pattern: write, flush, then wait for the answer.
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert_eq!(waker.0.load(Ordering::SeqCst), 1, "the task comes back");
        let _ = Pin::new(&mut c).poll_read(&mut cx, &mut ReadBuf::new(&mut scratch));
        assert_eq!(written(&c), b"hello");
    }

    #[tokio::test]
    async fn a_handshake_over_a_real_pipe_does_not_wait_for_more_traffic() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut c = Coalesce::new(a);
        let peer = tokio::spawn(async move {
            let mut hello = [0u8; 5];
            b.read_exact(&mut hello).await.expect("hello");
            b.write_all(b"world").await.expect("answer");
            hello
        });
        c.write_all(b"hello").await.expect("write");
        c.flush().await.expect("flush");
        let mut answer = [0u8; 5];
        tokio::time::timeout(std::time::Duration::from_secs(5), c.read_exact(&mut answer))
            .await
            .expect("the hello reached the peer without more writes")
            .expect("read");
        assert_eq!(&answer, b"world");
        assert_eq!(&peer.await.expect("peer"), b"hello");
    }

    #[tokio::test]
    async fn over_a_real_pipe_every_byte_arrives_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut c = Coalesce::new(a);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            b.read_to_end(&mut all).await.expect("read");
            all
        });
        let mut expect = Vec::new();
        for i in 0..500u32 {
            let frame = vec![(i % 251) as u8; 100 + (i as usize * 37) % 5_000];
            c.write_all(&frame).await.expect("write");
            c.flush().await.expect("flush");
            expect.extend_from_slice(&frame);
        }
        c.shutdown().await.expect("shutdown");
        drop(c);
        assert_eq!(reader.await.expect("reader"), expect);
    }
}
