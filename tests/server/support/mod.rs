//! Shared helpers for the daemon's gRPC suites: start the real
//! `gpuwatch-server` through the test kit, talk to it with the generated
//! client, read its streams with deadlines.

#![allow(dead_code)]

pub mod streams;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use gpuwatch_api::{self as api, GpuSelector, gpu_selector::Selector};
use gpuwatch_testkit::{Gpus, Launch, LaunchError};

pub use gpuwatch_testkit::{
    CONTROL_TOKEN, Client, Daemon, LEASE_TOKEN, LEASE_TOKEN_B, READ_TOKEN, connect_with,
};

/// How a suite starts a daemon: the few knobs these suites turn, mapped
/// onto the test kit's [`Launch`] (the one launcher).
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

    fn launch(self, state_dir: &Path) -> Launch {
        let ip: IpAddr = self
            .listen_ip
            .as_deref()
            .unwrap_or("127.0.0.1")
            .parse()
            .expect("listen_ip is an IP address");
        Launch {
            config: self.config,
            args: self.args,
            env: self.env,
            listen: SocketAddr::new(ip, self.port.unwrap_or(0)),
            http: self.http,
            gpus: self
                .nvml_library
                .map_or(Gpus::Simulated, |l| Gpus::Nvml(Some(l))),
            tokens: !self.no_tokens,
            state_dir: Some(state_dir.to_path_buf()),
            ..Launch::default()
        }
    }
}

/// Starts a daemon (simulated GPUs unless `options` names an NVML library)
/// with `state_dir` as its state directory, and waits until it is ready.
pub fn start(state_dir: &Path, options: Options) -> Daemon {
    options.launch(state_dir).start()
}

/// Like [`start`], but says why the daemon did not become ready instead of
/// panicking.
pub fn try_start(state_dir: &Path, options: Options) -> Result<Daemon, LaunchError> {
    options.launch(state_dir).try_start()
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

/// Watches every frame until `until_sim_s` simulated seconds after the
/// daemon started (at `speed` times the wall clock, giving up `slack` of
/// wall time after it should have been reached): `on_frame` gets each
/// frame (the `WatchStart`'s current one too) with its simulated time.
pub async fn frames_until(
    client: &mut Client,
    speed: f64,
    until_sim_s: f64,
    slack: Duration,
    mut on_frame: impl FnMut(f64, &api::Frame),
) {
    use api::watch_response::Message;
    use std::time::SystemTime;
    let mut stream = watch(client, api::WatchRequest::default()).await;
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs_f64(until_sim_s / speed) + slack;
    while Instant::now() < deadline {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("frame in time")
            .expect("stream")
            .expect("open");
        let frame = match msg.message {
            Some(Message::Start(s)) => {
                started = s.server_started.and_then(|t| SystemTime::try_from(t).ok());
                match s.current {
                    Some(f) => f,
                    None => continue,
                }
            }
            Some(Message::Frame(f)) => f,
            _ => continue,
        };
        let (Some(t0), Some(t)) = (
            started,
            frame.time.and_then(|t| SystemTime::try_from(t).ok()),
        ) else {
            continue;
        };
        let sim_s = t.duration_since(t0).unwrap_or_default().as_secs_f64() * speed;
        on_frame(sim_s, &frame);
        if sim_s >= until_sim_s {
            break;
        }
    }
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

/// The wall clock in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
