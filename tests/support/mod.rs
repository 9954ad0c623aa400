//! Shared helpers for black-box tests: start the real `gpuwatch-server`
//! binary on a loopback port, learn the address it bound from its log, talk
//! to it with the generated client, and always clean up.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use gpuwatch::api::{self, GpuSelector, gpu_selector::Selector, gpu_watch_client::GpuWatchClient};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

/// The control token every test daemon accepts (name "tester").
pub const CONTROL_TOKEN: &str = "test-control-token-0123456789";
/// A read-only token (name "reader").
pub const READ_TOKEN: &str = "test-read-token-0123456789";

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct AddToken(pub Option<MetadataValue<Ascii>>);

impl Interceptor for AddToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client that sends a token.
pub type Client = GpuWatchClient<InterceptedService<Channel, AddToken>>;

/// A running daemon, killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub http: Option<SocketAddr>,
    pub state_dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

/// How to start a daemon.
#[derive(Clone, Default)]
pub struct Options {
    /// TOML written to a config file and passed with --config.
    pub config: Option<String>,
    /// Extra flags.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Listen on this port instead of 0 (for restarts on the same address).
    pub port: Option<u16>,
    /// Serve HTTP too.
    pub http: bool,
    /// Start without the test tokens (the default security posture).
    pub no_tokens: bool,
    /// Listen on this IP instead of 127.0.0.1.
    pub listen_ip: Option<String>,
    /// Run on NVML through this library instead of simulated GPUs.
    pub nvml_library: Option<PathBuf>,
}

impl Options {
    /// A daemon started with this TOML configuration, everything else as default.
    pub fn with_config(config: impl Into<String>) -> Options {
        Options {
            config: Some(config.into()),
            ..Options::default()
        }
    }
}

impl Daemon {
    /// Starts a daemon on simulated GPUs with its own state directory.
    pub fn start(state_dir: &Path, options: Options) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuwatch-server"));
        match &options.nvml_library {
            Some(library) => {
                cmd.env("GPUWATCH_BACKEND__NVML_LIBRARY", library);
            }
            None => {
                cmd.arg("--simulate");
            }
        }
        cmd.arg("--listen")
            .arg(format!(
                "{}:{}",
                options.listen_ip.as_deref().unwrap_or("127.0.0.1"),
                options.port.unwrap_or(0)
            ))
            .arg("--http-listen")
            .arg(if options.http { "127.0.0.1:0" } else { "off" })
            .arg("--state-dir")
            .arg(state_dir)
            .args(&options.args)
            .env("GPUWATCH_LOG__LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        let mut toml = options.config.clone().unwrap_or_default();
        if !options.no_tokens {
            let tokens = state_dir.with_extension("tokens.toml");
            std::fs::write(
                &tokens,
                format!(
                    "[[tokens]]\nname = \"tester\"\nrole = \"control\"\ntoken = \"{CONTROL_TOKEN}\"\n\n\
                     [[tokens]]\nname = \"reader\"\nrole = \"read\"\ntoken = \"{READ_TOKEN}\"\n"
                ),
            )
            .expect("write tokens");
            cmd.env("GPUWATCH_AUTH__TOKEN_FILE", &tokens);
        }
        if !toml.is_empty() {
            let path = state_dir.with_extension("toml");
            std::fs::write(&path, std::mem::take(&mut toml)).expect("write config");
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd.spawn().expect("start gpuwatch-server");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let addr = addr.split_whitespace().next().unwrap_or("").to_owned();
                    let kind = if line.contains("gRPC") {
                        "grpc"
                    } else {
                        "http"
                    };
                    let _ = tx.send((kind, addr));
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut grpc, mut http) = (None, None);
        while grpc.is_none() || (options.http && http.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("grpc", addr)) => grpc = addr.parse().ok(),
                Ok((_, addr)) => http = addr.parse().ok(),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "daemon did not report its address; log:\n{}",
                        log.lock().expect("log").join("\n")
                    );
                }
            }
        }
        Daemon {
            child: Some(child),
            addr: grpc.expect("grpc address"),
            http,
            state_dir: state_dir.to_path_buf(),
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with the control token.
    pub async fn client(&self) -> Client {
        connect_with(&self.url(), Some(CONTROL_TOKEN)).await
    }

    /// A client with `token` (or none).
    pub async fn client_with(&self, token: Option<&str>) -> Client {
        connect_with(&self.url(), token).await
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal and waits (bounded) for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str, within: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + within;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("daemon did not exit within {within:?} after SIG{signal}");
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Connects with an optional token, retrying until the deadline.
pub async fn connect_with(url: &str, token: Option<&str>) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    let value = token.map(|t| format!("Bearer {t}").parse().expect("ascii token"));
    loop {
        match Channel::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
        {
            Ok(channel) => return GpuWatchClient::with_interceptor(channel, AddToken(value)),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }
}

pub fn index(i: u32) -> GpuSelector {
    GpuSelector {
        selector: Some(Selector::Index(i)),
    }
}

pub fn all() -> GpuSelector {
    GpuSelector {
        selector: Some(Selector::All(true)),
    }
}

/// Reads events (replay from `since`) until caught up.
pub async fn events_since(client: &mut Client, since: u64) -> Vec<api::Event> {
    let mut stream = client
        .watch_events(api::WatchEventsRequest {
            since_seq: Some(since),
            ..Default::default()
        })
        .await
        .expect("watch events")
        .into_inner();
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("events in time")
            .expect("event stream")
            .expect("stream open");
        match msg.message {
            Some(api::watch_events_response::Message::Event(e)) => out.push(e),
            Some(api::watch_events_response::Message::CaughtUp(_)) => return out,
            _ => {}
        }
    }
}

/// Polls `f` until it returns Some or the deadline passes.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A simulator config with one GPU entry per line of `gpus` (TOML tables).
pub fn sim_config(speed: f64, extra: &str, gpus: &[&str]) -> String {
    let mut toml = format!("[simulator]\nspeed = {speed}\n");
    for g in gpus {
        toml.push_str("\n[[simulator.gpus]]\n");
        toml.push_str(g);
        toml.push('\n');
    }
    toml.push('\n');
    toml.push_str(extra);
    toml
}

/// Opens a Watch stream.
pub async fn watch(
    client: &mut Client,
    request: api::WatchRequest,
) -> tonic::Streaming<api::WatchResponse> {
    client.watch(request).await.expect("watch").into_inner()
}

/// The next Watch message (bounded wait).
pub async fn next_message(
    stream: &mut tonic::Streaming<api::WatchResponse>,
) -> api::watch_response::Message {
    tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("message in time")
        .expect("stream ok")
        .expect("stream open")
        .message
        .expect("message set")
}

/// A process's resident memory (KiB), from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A process's thread count, from /proc.
pub fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count)
}
