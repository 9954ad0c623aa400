//! Misbehaving HTTP clients for the flood suites (http_hardening, fault
//! injection): slow headers, idle connections, and a fresh-connection GET
//! that says how long it took; plus the daemon's open file descriptors.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// The number of file descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// GET `path` on a fresh connection; the status and how long it took.
pub async fn fresh_get(addr: SocketAddr, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.ok()?;
        let text = String::from_utf8_lossy(&reply);
        text.split_whitespace().nth(1)?.parse().ok()
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(0);
    (status, started.elapsed())
}

/// A client that sends a request head one byte at a time, forever; returns
/// how long the server kept it open (None: still open at `give_up`).
pub async fn slowloris(addr: SocketAddr, give_up: Duration) -> Option<Duration> {
    let started = Instant::now();
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Some(Duration::ZERO);
    };
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await;
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            read = s.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(started.elapsed()),
                // A 408/431 reply, then the close.
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_millis(300)) => {
                if started.elapsed() > give_up {
                    return None;
                }
                if s.write_all(b"a").await.is_err() {
                    return Some(started.elapsed());
                }
            }
        }
    }
}

/// A connection that sends nothing; how long the server kept it open.
pub async fn idle(addr: SocketAddr, give_up: Duration) -> Option<Duration> {
    let started = Instant::now();
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Some(Duration::ZERO);
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(give_up, s.read(&mut buf)).await {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    }
}

/// Opens the dashboard's event stream (`/api/v1/stream`, with a read token
/// when given) on a socket with a tiny receive buffer, and never reads it.
pub async fn stalled_sse_reader(
    addr: SocketAddr,
    token: Option<&str>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stalled = socket.connect(addr).await?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    stalled
        .write_all(
            format!(
                "GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{auth}\r\n"
            )
            .as_bytes(),
        )
        .await?;
    Ok(stalled)
}

/// Trickles 23 bytes of the 24-byte HTTP/2 preface to a gRPC port, a byte
/// every 400 ms, then waits; how long the server kept the connection (None:
/// still open after 30 s).
pub async fn preface_trickle(addr: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Some(Duration::ZERO);
    };
    let mut buf = [0u8; 1024];
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r".iter();
    loop {
        tokio::select! {
            read = s.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) {
                return Some(started.elapsed());
            },
            () = tokio::time::sleep(Duration::from_millis(400)) => {
                if started.elapsed() > Duration::from_secs(30) {
                    return None;
                }
                if let Some(byte) = preface.next()
                    && s.write_all(&[*byte]).await.is_err()
                {
                    return Some(started.elapsed());
                }
            }
        }
    }
}
