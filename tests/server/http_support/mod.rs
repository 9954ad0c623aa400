//! Shared by the http_* suites: a real `gpuwatch-server` on simulated GPUs
//! and loopback ports (through the test kit), and a small HTTP client for it.

#![allow(dead_code)]

pub mod flood;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::ExitStatus,
    time::{Duration, Instant},
};

use gpuwatch_testkit::Launch;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// A running daemon with HTTP on, started through the test kit; killed when
/// dropped.
pub struct Daemon {
    inner: gpuwatch_testkit::Daemon,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

impl Daemon {
    /// Starts `gpuwatch-server --simulate` with `config` (TOML) if given.
    pub fn start(config: Option<&str>) -> Daemon {
        Self::start_with(config, &[])
    }

    /// As [`Daemon::start`], with extra flags.
    pub fn start_with(config: Option<&str>, extra: &[&str]) -> Daemon {
        let inner = Launch {
            config: config.map(str::to_owned),
            args: extra.iter().map(|&a| a.to_owned()).collect(),
            http: true,
            tokens: false,
            ..Launch::default()
        }
        .start();
        Daemon {
            http: inner.http.expect("the daemon serves HTTP"),
            grpc: inner.grpc,
            inner,
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.inner.http_url(path)
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&self) {
        self.inner.signal("TERM");
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.inner.wait_exit(limit)
    }
}

/// A plain HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A finished response.
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// GET `url` with an optional Accept header.
pub async fn get(url: &str, accept: Option<&str>) -> Reply {
    get_with(&client(), url, accept).await
}

pub async fn get_with(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    accept: Option<&str>,
) -> Reply {
    get_headers(client, url, accept, None).await
}

/// GET with `Authorization: Bearer <token>` (the HTTP side's read paths need
/// one once the daemon has tokens).
pub async fn get_bearer(url: &str, token: &str) -> Reply {
    get_headers(&client(), url, None, Some(token)).await
}

async fn get_headers(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    accept: Option<&str>,
    token: Option<&str>,
) -> Reply {
    let mut req = hyper::Request::get(url);
    if let Some(accept) = accept {
        req = req.header("accept", accept);
    }
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(Empty::new()).expect("a request");
    let res = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .unwrap_or_else(|_| panic!("GET {url} timed out"))
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(30), res.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("body of {url} timed out"))
        .unwrap_or_else(|e| panic!("body of {url}: {e}"))
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).expect("a UTF-8 body"),
    }
}

/// Retries `probe` every 100 ms until it returns Some, up to `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One sample line of the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the sample lines of the Prometheus/OpenMetrics text format
/// (label values here never hold `,` or `"` escapes, which keeps this small;
/// the CI's promtool and Prometheus checks parse it for real).
pub fn parse_samples(text: &str) -> Vec<Series> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').expect("a sample line has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match head.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("label k=\"v\"");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
            None => (head.to_owned(), BTreeMap::new()),
        };
        out.push(Series {
            name,
            labels,
            value,
        });
    }
    out
}

/// The series named `name` whose labels include every pair in `with`.
pub fn find<'a>(all: &'a [Series], name: &str, with: &[(&str, &str)]) -> Vec<&'a Series> {
    all.iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Reads server-sent events from a streaming body.
pub struct SseReader {
    body: hyper::body::Incoming,
    buffer: String,
}

impl SseReader {
    /// Opens `url` as an event stream; panics unless it answers 200.
    pub async fn open(url: &str) -> SseReader {
        let req = hyper::Request::get(url)
            .header("accept", "text/event-stream")
            .body(Empty::<Bytes>::new())
            .expect("a request");
        let res = tokio::time::timeout(Duration::from_secs(30), client().request(req))
            .await
            .expect("stream request timed out")
            .expect("stream request failed");
        assert_eq!(res.status().as_u16(), 200, "GET {url}");
        let content_type = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            content_type.starts_with("text/event-stream"),
            "content type {content_type}"
        );
        SseReader {
            body: res.into_body(),
            buffer: String::new(),
        }
    }

    /// The next event (comments and keep-alives skipped), or None when the
    /// stream ended. Panics if nothing comes within `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Sse {
                    event: "message".to_owned(),
                    id: None,
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if has_data {
                            event.data.push('\n');
                        }
                        event.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        has_data = true;
                    }
                }
                if has_data {
                    return Some(event);
                }
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("no server-sent event in time");
            match frame {
                None => return None,
                Some(Err(e)) => panic!("stream failed: {e}"),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.push_str(&String::from_utf8_lossy(&data));
                        self.buffer = self.buffer.replace("\r\n", "\n");
                    }
                }
            }
        }
    }
}
