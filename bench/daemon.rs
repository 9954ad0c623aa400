//! The daemon under test: the real `gpuwatch-server` binary, started by the
//! test kit's launcher with a config written for the figure, its addresses
//! read from its ready file (port 0 everywhere, so runs never collide), and
//! stopped with SIGTERM like an operator would. A daemon that is dropped
//! without `stop` is killed.
//!
//! Every daemon gets its own state directory (a temporary directory removed
//! afterwards) so no run sees another's event log or simulated boards.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::anyhow;
use gpuwatch_testkit::{Gpus, Launch};

/// What to run.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// Simulated H100s.
    pub gpus: u32,
    /// The sampler's cadence.
    pub sampler_interval: Duration,
    /// Serve HTTP (/metrics, dashboard) too.
    pub http: bool,
    /// More TOML appended to the config (e.g. a `[limits]` section).
    pub extra_toml: String,
    /// Read real (or stand-in) GPUs through this libnvidia-ml.so instead of
    /// simulating; `Some(None)`: NVML from the loader's path.
    pub nvml: Option<Option<PathBuf>>,
    /// Log filter.
    pub log_level: &'static str,
    /// A `[simulator]` section to use instead of the moving-load H100s.
    pub simulator_toml: Option<String>,
    /// The state directory (None: a fresh temporary one).
    pub state_dir: Option<PathBuf>,
}

impl DaemonSpec {
    /// `gpus` simulated H100s read every `sampler_interval`, with HTTP.
    pub fn fleet(gpus: u32, sampler_interval: Duration) -> Self {
        Self {
            gpus,
            sampler_interval,
            http: true,
            extra_toml: String::new(),
            nvml: None,
            log_level: "info",
            simulator_toml: None,
            state_dir: None,
        }
    }

    /// The config file this daemon is started with.
    pub fn toml(&self) -> String {
        let interval_ms = self.sampler_interval.as_millis();
        let mut toml = format!("[sampler]\ninterval = \"{interval_ms}ms\"\n");
        if let Some(sim) = self.simulator_toml.as_ref().filter(|_| self.nvml.is_none()) {
            toml.push('\n');
            toml.push_str(sim);
            toml.push('\n');
        } else if self.nvml.is_none() {
            // A load that moves: every GPU ramps between 350 W and 650 W on a
            // 90 s cycle, so temperatures, clocks and power change every
            // tick and the governor has work near the top of the cycle.
            toml.push_str(&format!(
                "\n[simulator]\nspeed = 1.0\n\n[[simulator.gpus]]\npreset = \"h100-sxm\"\ncount = {}\n\
                 demand = [ {{ at = \"0s\", watts = 350.0 }}, {{ at = \"30s\", watts = 650.0, ramp = true }}, \
                 {{ at = \"60s\", watts = 350.0, ramp = true }} ]\nrepeat = \"90s\"\n",
                self.gpus
            ));
        }
        if !self.extra_toml.is_empty() {
            toml.push('\n');
            toml.push_str(&self.extra_toml);
            toml.push('\n');
        }
        toml
    }
}

impl DaemonSpec {
    /// How the test kit starts this daemon.
    fn launch(&self, server: &Path) -> Launch {
        Launch {
            bin: Some(server.to_path_buf()),
            config: Some(self.toml()),
            http: self.http,
            gpus: match &self.nvml {
                None => Gpus::Simulated,
                Some(library) => Gpus::Nvml(library.clone()),
            },
            // The harness calls reads only, like most clients.
            tokens: false,
            log_level: self.log_level.to_owned(),
            state_dir: self.state_dir.clone(),
            ..Launch::default()
        }
    }
}

/// A running daemon (started by the test kit's launcher, the same one the
/// tests use), with the figures the harness reads off it.
#[derive(Debug)]
pub struct Daemon {
    inner: gpuwatch_testkit::Daemon,
    pub pid: u32,
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
    /// From spawn to ready (the daemon's ready file: listening and serving).
    pub listening_after: Duration,
    /// When the process was spawned.
    pub spawned: Instant,
}

/// A daemon spawned but not yet known to listen.
#[derive(Debug)]
pub struct Spawned(gpuwatch_testkit::Spawned);

impl Daemon {
    /// Starts a daemon and waits (up to 30 s) until it listens.
    pub fn start(server: &Path, spec: &DaemonSpec) -> anyhow::Result<Self> {
        Self::spawn(server, spec)?.wait_ready(Duration::from_secs(30))
    }

    /// Starts the process without waiting for it.
    pub fn spawn(server: &Path, spec: &DaemonSpec) -> anyhow::Result<Spawned> {
        Ok(Spawned(spec.launch(server).spawn()?))
    }

    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// The daemon's HTTP address; an error when it was started without one.
    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        self.http
            .ok_or_else(|| anyhow!("this daemon was started without HTTP"))
    }

    /// Fails when the daemon has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        Ok(self.inner.check_alive()?)
    }

    /// SIGTERM, then wait up to 15 s for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        Ok(self.inner.stop()?)
    }
}

impl Spawned {
    /// Waits until the daemon is ready.
    pub fn wait_ready(self, within: Duration) -> anyhow::Result<Daemon> {
        let inner = self.0.wait_ready(within)?;
        Ok(Daemon {
            pid: inner.pid(),
            grpc: inner.grpc,
            http: inner.http,
            listening_after: inner.ready_after,
            spawned: inner.spawned,
            inner,
        })
    }
}

pub use gpuwatch_testkit::signal;
