//! gpuwatch-testkit: the one way tests and the benchmark harness start a
//! gpuwatch daemon, and find the binaries a build produced.
//!
//! Why it exists: every black-box suite (the daemon's, the CLI's) and every
//! benchmark figure needs the same thing — the real `gpuwatch-server` on
//! loopback port 0, in its own state directory, with known tokens, stopped
//! without leaving a process behind — and four copies of that drifted apart
//! (two token constants, three ways of setting the log level, log-scraping
//! for the bound address). What it owns: [`Launch`] (how to start a daemon),
//! [`Daemon`] (a running one, killed on drop), the test tokens, the location
//! of built binaries, and a gRPC client that sends a token.
//!
//! Readiness is machine-readable: the daemon is started with
//! `--ready-file`, and the kit waits for that JSON file (bound gRPC and HTTP
//! addresses, pid) instead of parsing human log text.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, PoisonError, mpsc},
    thread,
    time::{Duration, Instant},
};

use gpuwatch_api::gpu_watch_client::GpuWatchClient;
use tempfile::TempDir;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

/// The control token every kit daemon accepts; its name, the actor in audit
/// events, is [`CONTROL_TOKEN_NAME`].
pub const CONTROL_TOKEN: &str = "test-control-token-0123456789";
/// The name of [`CONTROL_TOKEN`].
pub const CONTROL_TOKEN_NAME: &str = "tester";
/// A read-only token; its name is [`READ_TOKEN_NAME`].
pub const READ_TOKEN: &str = "test-read-token-0123456789";
/// The name of [`READ_TOKEN`].
pub const READ_TOKEN_NAME: &str = "reader";
/// A token with the lease role (a scheduler); its name is
/// [`LEASE_TOKEN_NAME`].
pub const LEASE_TOKEN: &str = "test-lease-token-0123456789";
/// The name of [`LEASE_TOKEN`].
pub const LEASE_TOKEN_NAME: &str = "scheduler";
/// A second scheduler's lease token; its name is [`LEASE_TOKEN_B_NAME`].
pub const LEASE_TOKEN_B: &str = "test-lease-token-b-0123456789";
/// The name of [`LEASE_TOKEN_B`].
pub const LEASE_TOKEN_B_NAME: &str = "scheduler-b";

/// How long a daemon may take to become ready: long enough for a debug
/// build on a busy 2-core machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository's root directory (for deploy files, fixtures, docs).
pub fn repo_root() -> PathBuf {
    let kit = Path::new(env!("CARGO_MANIFEST_DIR"));
    kit.parent()
        .and_then(Path::parent)
        .map_or_else(|| kit.to_path_buf(), Path::to_path_buf)
}

/// A binary built into the same target directory as the running test
/// (`target/<profile>/NAME`), or the path in `$ENV_VAR` when set.
///
/// `cargo test --workspace` builds every member's binaries before any test
/// runs; a suite run alone with `-p` may find a missing or older one, and
/// says so.
pub fn built_binary(name: &str, env_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test's own path: {e}"));
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not inside a target directory", exe.display()));
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (or build it with \
         `cargo build -p {name}`), or point {env_var} at a binary",
        path.display()
    );
    path
}

/// `gpuwatch-server` from this build (`$GPUWATCH_SERVER_BIN` overrides).
pub fn server_bin() -> PathBuf {
    built_binary("gpuwatch-server", "GPUWATCH_SERVER_BIN")
}

/// `gpuwatch-client` from this build (`$GPUWATCH_CLIENT_BIN` overrides).
pub fn client_bin() -> PathBuf {
    built_binary("gpuwatch-client", "GPUWATCH_CLIENT_BIN")
}

/// Where the daemon's GPUs come from.
#[derive(Debug, Clone, Default)]
pub enum Gpus {
    /// `--simulate`: the config's `[simulator]`, or the demo fleet.
    #[default]
    Simulated,
    /// NVML, through this libnvidia-ml.so (None: the loader's path).
    Nvml(Option<PathBuf>),
}

/// How to start a daemon. Every field has a default that suits a test: a
/// simulated demo fleet, gRPC on `127.0.0.1:0`, no HTTP, the kit's tokens,
/// log level `info`, a fresh temporary state directory.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The binary (default: [`server_bin`]).
    pub bin: Option<PathBuf>,
    /// TOML written to a file and passed with `--config`.
    pub config: Option<String>,
    /// More flags, after the kit's own.
    pub args: Vec<String>,
    /// Environment variables for the daemon.
    pub env: Vec<(String, String)>,
    /// The gRPC listen address (port 0: any free port).
    pub listen: SocketAddr,
    /// Serve HTTP (/metrics, dashboard, /healthz) on a free loopback port.
    pub http: bool,
    /// Simulated GPUs or NVML.
    pub gpus: Gpus,
    /// Start with the kit's tokens ([`CONTROL_TOKEN`], [`READ_TOKEN`]);
    /// false keeps the daemon's default security posture.
    pub tokens: bool,
    /// `--log-level`.
    pub log_level: String,
    /// The state directory; None: a fresh temporary one, removed with the
    /// daemon.
    pub state_dir: Option<PathBuf>,
    /// How long to wait for the ready file.
    pub start_timeout: Duration,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            bin: None,
            config: None,
            args: Vec::new(),
            env: Vec::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: false,
            gpus: Gpus::Simulated,
            tokens: true,
            log_level: "info".to_owned(),
            state_dir: None,
            start_timeout: START_TIMEOUT,
        }
    }
}

/// Why a daemon could not be started.
#[derive(Debug)]
pub struct LaunchError(pub String);

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LaunchError {}

impl Launch {
    /// The defaults, with this TOML configuration.
    pub fn with_config(config: impl Into<String>) -> Self {
        Self {
            config: Some(config.into()),
            ..Self::default()
        }
    }

    /// Starts the daemon and waits until it is ready; panics (with the
    /// daemon's log) when it is not.
    pub fn start(&self) -> Daemon {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the daemon and waits until it is ready.
    pub fn try_start(&self) -> Result<Daemon, LaunchError> {
        let timeout = self.start_timeout;
        self.spawn()?.wait_ready(timeout)
    }

    /// Starts the process without waiting for it (for measuring startup).
    pub fn spawn(&self) -> Result<Spawned, LaunchError> {
        let files = tempfile::Builder::new()
            .prefix("gpuwatch-test-")
            .tempdir()
            .map_err(|e| LaunchError(format!("cannot create a temporary directory: {e}")))?;
        let state_dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| files.path().join("state"));
        let ready_file = files.path().join("ready.json");
        let bin = self.bin.clone().unwrap_or_else(server_bin);
        let mut cmd = Command::new(&bin);
        match &self.gpus {
            Gpus::Simulated => {
                cmd.arg("--simulate");
            }
            Gpus::Nvml(Some(library)) => {
                cmd.env("GPUWATCH_BACKEND__NVML_LIBRARY", library);
            }
            Gpus::Nvml(None) => {}
        }
        cmd.arg("--listen")
            .arg(self.listen.to_string())
            .arg("--http-listen")
            .arg(if self.http { "127.0.0.1:0" } else { "off" })
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--log-level")
            .arg(&self.log_level)
            .arg("--ready-file")
            .arg(&ready_file)
            .env_remove("GPUWATCH_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if self.tokens {
            let tokens = files.path().join("tokens.toml");
            write_private(
                &tokens,
                &format!(
                    "[[tokens]]\nname = \"{CONTROL_TOKEN_NAME}\"\nrole = \"control\"\ntoken = \"{CONTROL_TOKEN}\"\n\n\
                     [[tokens]]\nname = \"{READ_TOKEN_NAME}\"\nrole = \"read\"\ntoken = \"{READ_TOKEN}\"\n\n\
                     [[tokens]]\nname = \"{LEASE_TOKEN_NAME}\"\nrole = \"lease\"\ntoken = \"{LEASE_TOKEN}\"\n\n\
                     [[tokens]]\nname = \"{LEASE_TOKEN_B_NAME}\"\nrole = \"lease\"\ntoken = \"{LEASE_TOKEN_B}\"\n"
                ),
            )?;
            cmd.env("GPUWATCH_AUTH__TOKEN_FILE", &tokens);
        }
        if let Some(config) = &self.config {
            let path = files.path().join("gpuwatch.toml");
            write(&path, config)?;
            cmd.arg("--config").arg(path);
        }
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| LaunchError(format!("cannot start {}: {e}", bin.display())))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            let sink = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    sink.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(line.clone());
                    // Nobody reading is fine: keep draining so the daemon
                    // never blocks on a full pipe.
                    let _ = tx.send(line);
                }
            });
        }
        Ok(Spawned {
            child: Some(child),
            spawned,
            ready_file,
            state_dir,
            files: Some(files),
            log,
            lines: Some(lines),
            launch: self.clone(),
        })
    }
}

fn write(path: &Path, text: &str) -> Result<(), LaunchError> {
    std::fs::write(path, text)
        .map_err(|e| LaunchError(format!("cannot write {}: {e}", path.display())))
}

/// Writes a file only its owner can read (mode 0600): the daemon refuses a
/// token file that others can.
fn write_private(path: &Path, text: &str) -> Result<(), LaunchError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| LaunchError(format!("cannot write {}: {e}", path.display())))
}

/// A daemon process started but not yet known to be ready.
#[derive(Debug)]
pub struct Spawned {
    child: Option<Child>,
    spawned: Instant,
    ready_file: PathBuf,
    state_dir: PathBuf,
    files: Option<TempDir>,
    log: Arc<Mutex<Vec<String>>>,
    lines: Option<mpsc::Receiver<String>>,
    launch: Launch,
}

/// What the daemon writes to its `--ready-file`.
struct Ready {
    grpc: SocketAddr,
    http: Option<SocketAddr>,
}

fn read_ready(path: &Path) -> Option<Ready> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let grpc = json.get("grpc")?.as_str()?.parse().ok()?;
    let http = json
        .get("http")
        .and_then(serde_json::Value::as_str)
        .and_then(|a| a.parse().ok());
    Some(Ready { grpc, http })
}

impl Spawned {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log_text(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the daemon has written its ready file.
    pub fn wait_ready(mut self, within: Duration) -> Result<Daemon, LaunchError> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(ready) = read_ready(&self.ready_file) {
                let ready_after = self.spawned.elapsed();
                let pid = self.pid();
                return Ok(Daemon {
                    child: self.child.take(),
                    pid,
                    grpc: ready.grpc,
                    http: ready.http,
                    state_dir: self.state_dir.clone(),
                    files: self.files.take().into_iter().collect(),
                    log: self.log.clone(),
                    lines: self.lines.take(),
                    spawned: self.spawned,
                    ready_after,
                    launch: self.launch.clone(),
                });
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                // Give the log thread a moment to collect the last lines.
                thread::sleep(Duration::from_millis(50));
                return Err(LaunchError(format!(
                    "gpuwatch-server exited ({status}) before it was ready; its log:\n{}",
                    self.log_text()
                )));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(LaunchError(format!(
                    "gpuwatch-server was not ready within {within:?}; its log:\n{}",
                    self.log_text()
                )));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running daemon; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pid: u32,
    /// The gRPC address it bound.
    pub grpc: SocketAddr,
    /// The HTTP address it bound, when started with HTTP.
    pub http: Option<SocketAddr>,
    /// Its state directory.
    pub state_dir: PathBuf,
    files: Vec<TempDir>,
    log: Arc<Mutex<Vec<String>>>,
    lines: Option<mpsc::Receiver<String>>,
    /// When the process was spawned.
    pub spawned: Instant,
    /// From spawn to the ready file.
    pub ready_after: Duration,
    launch: Launch,
}

impl Daemon {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `http://ADDR` of the gRPC listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `ADDR` of the gRPC listener, as a CLI `HOST` argument.
    pub fn host(&self) -> String {
        self.grpc.to_string()
    }

    /// `http://ADDR/path` on the HTTP listener.
    pub fn http_url(&self, path: &str) -> String {
        let http = self
            .http
            .unwrap_or_else(|| panic!("this daemon was started without HTTP"));
        format!("http://{http}{path}")
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n")
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log[log.len().saturating_sub(lines)..].join("\n")
    }

    /// The daemon's log lines one by one, from its start (each line once).
    pub fn log_lines(&mut self) -> &mpsc::Receiver<String> {
        self.lines.get_or_insert_with(|| mpsc::channel().1)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends a signal by name (TERM, INT, KILL, STOP, CONT).
    pub fn signal(&self, name: &str) {
        if self.child.is_some() {
            signal(self.pid, name);
        }
    }

    /// Waits for the process to exit, up to `limit`; None if it did not.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }

    /// Sends a signal and waits (bounded) for the exit code; panics if the
    /// daemon does not exit in time (after killing it).
    pub fn signal_and_wait(&mut self, name: &str, within: Duration) -> Option<i32> {
        self.child.as_ref()?;
        self.signal(name);
        match self.wait_exit(within) {
            Some(status) => status.code(),
            None => {
                self.kill();
                panic!("daemon did not exit within {within:?} after SIG{name}");
            }
        }
    }

    /// SIGTERM, then wait up to 15 s for a clean exit.
    pub fn stop(&mut self) -> Result<(), LaunchError> {
        if self.child.is_none() {
            return Ok(());
        }
        self.signal("TERM");
        match self.wait_exit(Duration::from_secs(15)) {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(LaunchError(format!(
                "the daemon exited with {status} on SIGTERM; its log ends:\n{}",
                self.log_tail(20)
            ))),
            None => {
                self.kill();
                Err(LaunchError(
                    "the daemon did not stop within 15 s of SIGTERM; killed it".to_owned(),
                ))
            }
        }
    }

    /// SIGKILL, and reap the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Fails when the daemon has exited.
    pub fn check_alive(&mut self) -> Result<(), LaunchError> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(LaunchError(format!(
                "the daemon exited ({status}); its log ends:\n{}",
                self.log_tail(20)
            )));
        }
        Ok(())
    }

    /// Starts the same daemon again — same gRPC port, same state directory,
    /// same configuration — after killing this process if it still runs.
    /// Retries briefly while the just-freed port is taken.
    pub fn restart(&mut self) {
        self.kill();
        let mut launch = self.launch.clone();
        launch.listen = self.grpc;
        launch.state_dir = Some(self.state_dir.clone());
        let deadline = Instant::now() + START_TIMEOUT;
        let next = loop {
            match launch.try_start() {
                Ok(d) => break d,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart on {} failed ({e}); retrying", self.grpc);
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("cannot restart the daemon on {}: {e}", self.grpc),
            }
        };
        // The first run's temporary directory may hold the state directory:
        // it lives as long as the daemon value does.
        let mut next = next;
        next.files.append(&mut self.files);
        *self = next;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends a signal (by name: TERM, INT, STOP, CONT, KILL) to one process.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Debug, Clone)]
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

/// A gRPC client that sends a token.
pub type Client = GpuWatchClient<InterceptedService<Channel, AddToken>>;

/// Connects with an optional token, retrying until a 10 s deadline.
pub async fn connect_with(url: &str, token: Option<&str>) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    let value = token.map(|t| {
        format!("Bearer {t}")
            .parse()
            .unwrap_or_else(|e| panic!("token is not ASCII: {e}"))
    });
    loop {
        let endpoint =
            Channel::from_shared(url.to_owned()).unwrap_or_else(|e| panic!("bad url {url}: {e}"));
        match endpoint.connect().await {
            Ok(channel) => return GpuWatchClient::with_interceptor(channel, AddToken(value)),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }
}

impl Daemon {
    /// A gRPC client with the control token.
    pub async fn client(&self) -> Client {
        connect_with(&self.url(), Some(CONTROL_TOKEN)).await
    }

    /// A gRPC client with `token` (or none).
    pub async fn client_with(&self, token: Option<&str>) -> Client {
        connect_with(&self.url(), token).await
    }
}
