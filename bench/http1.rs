//! A keep-alive HTTP/1.1 client connection (hyper's low-level client), for
//! the figures that poll over HTTP: `/metrics` scrapes, the dashboard JSON
//! and the Flask baseline. One connection carries one request at a time,
//! like a scraper or a polling script; a figure opens as many as it needs.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One open HTTP/1.1 connection, reopened when the server closes it (as
/// Gunicorn's sync workers do after every response).
#[derive(Debug)]
pub struct Http1 {
    sender: SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    host: String,
    /// The server said `connection: close`: reconnect before the next request.
    closing: bool,
    /// Connections opened after the first.
    pub reconnects: u64,
}

impl Http1 {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            sender: Self::open(addr).await?,
            addr,
            host: addr.to_string(),
            closing: false,
            reconnects: 0,
        })
    }

    async fn open(addr: SocketAddr) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to http://{addr}"))?;
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .with_context(|| format!("HTTP/1.1 handshake with {addr}"))?;
        tokio::spawn(async move {
            // Ends when the peer closes or the sender is dropped.
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// GET `path`; the whole body, or an error for a non-2xx status.
    pub async fn get(&mut self, path: &str, accept: Option<&str>) -> anyhow::Result<Bytes> {
        if self.closing || self.sender.is_closed() {
            self.sender = Self::open(self.addr).await?;
            self.closing = false;
            self.reconnects += 1;
        }
        self.sender
            .ready()
            .await
            .with_context(|| format!("connection to {} closed", self.host))?;
        let mut request = Request::get(path).header("host", &self.host);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .with_context(|| format!("bad request path {path}"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .with_context(|| format!("GET http://{}{path}", self.host))?;
        let status = response.status();
        self.closing = response
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the body of http://{}{path}", self.host))?
            .to_bytes();
        if !status.is_success() {
            bail!(
                "GET http://{}{path}: {status}: {}",
                self.host,
                String::from_utf8_lossy(&body[..body.len().min(200)])
            );
        }
        Ok(body)
    }
}

/// The value of an unlabelled sample `name` in a Prometheus text scrape.
pub fn metric_value(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_are_found_by_exact_name() {
        let scrape =
            "# TYPE a counter\na_total 12\na_total_more 3\nb{x=\"1\"} 4\nc 2.5 1700000000\n";
        assert_eq!(metric_value(scrape, "a_total"), Some(12.0));
        assert_eq!(metric_value(scrape, "c"), Some(2.5));
        assert_eq!(metric_value(scrape, "b"), None);
        assert_eq!(metric_value(scrape, "missing"), None);
    }
}
