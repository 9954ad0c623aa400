//! The daemon under test: the real `gpuwatch-server` binary, started with a
//! config written for the figure, its addresses learnt from its log (port 0
//! everywhere, so runs never collide), and stopped with SIGTERM like an
//! operator would. A daemon that is dropped without `stop` is killed.
//!
//! Every daemon gets its own state directory (a temporary directory removed
//! afterwards) so no run sees another's event log or simulated boards.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use tempfile::TempDir;

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
        }
    }

    /// The config file this daemon is started with.
    pub fn toml(&self) -> String {
        let interval_ms = self.sampler_interval.as_millis();
        let mut toml = format!("[sampler]\ninterval = \"{interval_ms}ms\"\n");
        if self.nvml.is_none() {
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

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
    /// From spawn to the "gRPC listening on" line.
    pub listening_after: Duration,
    /// When the process was spawned.
    pub spawned: Instant,
    log: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

/// A daemon spawned but not yet known to listen.
#[derive(Debug)]
pub struct Spawned {
    /// Taken by `wait_ready`; killed on drop while still here.
    child: Option<Child>,
    pid: u32,
    spawned: Instant,
    spec_http: bool,
    lines: mpsc::Receiver<(Instant, String)>,
    log: Arc<Mutex<Vec<String>>>,
    dir: Option<TempDir>,
}

impl Daemon {
    /// Starts a daemon and waits (up to 30 s) until it listens.
    pub fn start(server: &Path, spec: &DaemonSpec) -> anyhow::Result<Self> {
        Self::spawn(server, spec)?.wait_ready(Duration::from_secs(30))
    }

    /// Starts the process without waiting for it.
    pub fn spawn(server: &Path, spec: &DaemonSpec) -> anyhow::Result<Spawned> {
        let dir = tempfile::Builder::new()
            .prefix("gpuwatch-bench-")
            .tempdir()
            .context("cannot create a state directory for the daemon")?;
        let config = dir.path().join("gpuwatch.toml");
        std::fs::write(&config, spec.toml())
            .with_context(|| format!("cannot write {}", config.display()))?;
        let mut cmd = Command::new(server);
        if spec.nvml.is_none() {
            cmd.arg("--simulate");
        }
        if let Some(Some(library)) = &spec.nvml {
            cmd.env("GPUWATCH_BACKEND__NVML_LIBRARY", library);
        }
        cmd.arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--http-listen")
            .arg(if spec.http { "127.0.0.1:0" } else { "off" })
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--log-level")
            .arg(spec.log_level)
            .env_remove("GPUWATCH_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", server.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("the daemon's stderr was not captured"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let at = Instant::now();
                if line.contains("listening on ") {
                    let _ = tx.send((at, line.clone()));
                }
                let mut log = sink.lock().unwrap_or_else(PoisonError::into_inner);
                // Keep the start and a bounded tail.
                if log.len() >= 400 {
                    log.drain(100..200);
                }
                log.push(line);
            }
        });
        Ok(Spawned {
            pid: child.id(),
            child: Some(child),
            spawned,
            spec_http: spec.http,
            lines,
            log,
            dir: Some(dir),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The daemon's HTTP address; an error when it was started without one.
    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        self.http
            .ok_or_else(|| anyhow!("this daemon was started without HTTP"))
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let start = log.len().saturating_sub(lines);
        log[start..].join("\n")
    }

    /// Fails when the daemon has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!(
                "the daemon exited ({status}) during the measurement; its log ends:\n{}",
                self.log_tail(20)
            );
        }
        Ok(())
    }

    /// SIGTERM, then wait up to 15 s for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => bail!(
                    "the daemon exited with {status} on SIGTERM; its log ends:\n{}",
                    self.log_tail(20)
                ),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the daemon did not stop within 15 s of SIGTERM; killed it");
                }
            }
        }
    }
}

impl Spawned {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the daemon logs its gRPC (and, if asked for, HTTP)
    /// address.
    pub fn wait_ready(mut self, within: Duration) -> anyhow::Result<Daemon> {
        let deadline = Instant::now() + within;
        let (mut grpc, mut http, mut listening_after) = (None, None, Duration::ZERO);
        while grpc.is_none() || (self.spec_http && http.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok((at, line)) => {
                    let addr = line
                        .split("listening on ")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok());
                    if line.contains("gRPC listening on") {
                        grpc = addr;
                        listening_after = at.duration_since(self.spawned);
                    } else if line.contains("HTTP") {
                        http = addr;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = self.exited() {
                        bail!(
                            "the daemon exited ({status}) at startup; its log:\n{}",
                            self.log()
                        );
                    }
                    if Instant::now() >= deadline {
                        self.kill();
                        bail!(
                            "the daemon did not report its address within {within:?}; its log:\n{}",
                            self.log()
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.kill();
                    bail!(
                        "the daemon closed its log before listening; its log:\n{}",
                        self.log()
                    );
                }
            }
        }
        let grpc = grpc.ok_or_else(|| anyhow!("no gRPC address in the daemon's log"))?;
        let dir = self
            .dir
            .take()
            .ok_or_else(|| anyhow!("the daemon's state directory is gone"))?;
        Ok(Daemon {
            pid: self.pid,
            child: self.child.take(),
            grpc,
            http,
            listening_after,
            spawned: self.spawned,
            log: self.log.clone(),
            _dir: dir,
        })
    }

    fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
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

/// Sends a signal (by name: TERM, STOP, CONT, KILL) to one process.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
