//! Shared fixture for the `client_*` suites: real `gpuwatch-server` daemons
//! on loopback ports and the real `gpuwatch-client` binary.
//!
//! Every process is owned by a guard that kills it on drop, so a failing
//! assertion never leaves a daemon behind. Nothing waits on a fixed sleep:
//! daemons (started through the test kit) are ready when they write their
//! ready file, client output is read line by line with a deadline.

#![allow(dead_code)] // each suite uses a different part

use std::{
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use gpuwatch_testkit::Launch;
use serde_json::Value;

pub use gpuwatch_testkit::{CONTROL_TOKEN, Daemon, START_TIMEOUT};

/// Bound for a one-shot client command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

pub fn client_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gpuwatch-client"))
}

/// Two GPUs that lack fields a datacenter board has: a laptop GPU (no power
/// limit readings or control, no memory temperature, no fan) and a consumer
/// card (fan, no memory temperature, no ECC).
pub const CONSUMER_FLEET: &str = r#"
[simulator]
gpus = [{ preset = "laptop" }, { preset = "rtx-4090" }]
"#;

/// One datacenter GPU.
pub const ONE_H100: &str = r#"
[simulator]
gpus = [{ preset = "h100-sxm" }]
"#;

/// A `gpuwatch-server --simulate` on a free loopback port (the demo fleet
/// when `config` is None), through the test kit; killed on drop.
pub fn start(config: Option<&str>) -> Daemon {
    Launch {
        config: config.map(str::to_owned),
        ..Launch::default()
    }
    .start()
}

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr.to_string()
}

/// A finished client run.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Every stdout line parsed as JSON (panics, naming the line, if one is not).
    pub fn json_lines(&self) -> Vec<Value> {
        parse_ndjson(&self.stdout)
    }
}

pub fn parse_ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

fn client_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(client_bin());
    cmd.args(args)
        // The environment of whoever runs the tests must not leak in.
        .env_remove("GPUWATCH_HOSTS_FILE")
        .env_remove("GPUWATCH_TOKEN")
        .env_remove("GPUWATCH_TOKEN_FILE")
        .env_remove("GPUWATCH_TLS_CA")
        .env_remove("GPUWATCH_TLS_CERT")
        .env_remove("GPUWATCH_TLS_KEY")
        .env_remove("GPUWATCH_TLS_SERVER_NAME")
        .env_remove("GPUWATCH_TIMEOUT")
        .env("GPUWATCH_TOKEN", CONTROL_TOKEN)
        .stdin(Stdio::null());
    cmd
}

/// Runs the client to completion (killed and failed after COMMAND_TIMEOUT).
pub fn run_client(args: &[&str]) -> Run {
    run_client_env(args, &[])
}

/// Runs the client with extra environment; an empty value removes the
/// variable (e.g. `("GPUWATCH_TOKEN", "")` for a run without a token).
pub fn run_client_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = client_command(args);
    for (k, v) in env {
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gpuwatch-client");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_thread = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_thread = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_with_deadline(&mut child, COMMAND_TIMEOUT).unwrap_or_else(|| {
        panic!("gpuwatch-client {args:?} did not finish in {COMMAND_TIMEOUT:?}")
    });
    Run {
        code: status.code(),
        stdout: out_thread.join().expect("stdout reader"),
        stderr: err_thread.join().expect("stderr reader"),
    }
}

/// Waits for `child`, killing it after `timeout` (None then).
pub fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// A long-running client (watch, events --follow) whose stdout lines are
/// read as they come. Killed on drop.
pub struct Streaming {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    stderr: Option<thread::JoinHandle<String>>,
    /// Every line received so far.
    pub seen: Vec<String>,
}

impl Streaming {
    pub fn start(args: &[&str]) -> Self {
        let mut child = client_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gpuwatch-client");
        let stdout: ChildStdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Self {
            child: Some(child),
            lines: rx,
            stderr: Some(stderr),
            seen: Vec::new(),
        }
    }

    /// Reads JSON lines until `pred` holds for one (returned), or panics
    /// after `timeout` showing what was seen.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let value: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
                    self.seen.push(line);
                    if pred(&value) {
                        return value;
                    }
                }
                Err(_) => {
                    let tail: Vec<_> = self.seen.iter().rev().take(30).rev().collect();
                    panic!("timed out waiting for {what}; last lines:\n{tail:#?}");
                }
            }
        }
    }

    /// Like [`Self::wait_for`], but a line already seen also counts.
    pub fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let old = self
            .seen
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| pred(v));
        match old {
            Some(v) => v,
            None => self.wait_for(what, timeout, pred),
        }
    }

    /// Every line seen so far, parsed.
    pub fn seen_json(&self) -> Vec<Value> {
        self.seen
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect()
    }

    /// Sends SIGTERM (or SIGINT) and waits for the exit status.
    pub fn signal_and_wait(&mut self, signal: &str) -> (Option<i32>, String) {
        let mut child = self.child.take().expect("still running");
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status();
        let status = wait_with_deadline(&mut child, COMMAND_TIMEOUT)
            .unwrap_or_else(|| panic!("client did not exit after SIG{signal}"));
        // Whatever was still buffered is part of the output.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status.code(), stderr)
    }

    /// Closes our end of the pipe (like `| head` exiting) and waits.
    pub fn close_stdout_and_wait(&mut self) -> (Option<i32>, String) {
        let mut child = self.child.take().expect("still running");
        // Dropping the receiver ends the reader thread, which drops the pipe.
        let (_tx, rx) = mpsc::channel();
        drop(std::mem::replace(&mut self.lines, rx));
        let status = wait_with_deadline(&mut child, COMMAND_TIMEOUT)
            .unwrap_or_else(|| panic!("client did not exit after its stdout closed"));
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status.code(), stderr)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Rows (objects with an `index`) of one host.
pub fn is_sample_of(v: &Value, host: &str) -> bool {
    v["host"] == host && v.get("index").is_some() && v.get("seq").is_some()
}

pub fn is_event_of(v: &Value, host: &str, event: &str) -> bool {
    v["host"] == host && v["event"] == event
}

pub fn temp_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// A private tmux server, killed on drop.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn available() -> bool {
        Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// A 200x50 terminal running an interactive shell with prompt `READY>`.
    pub fn start(name: &str) -> Self {
        let shell = if std::path::Path::new("/bin/bash").exists() {
            "env PS1='READY> ' /bin/bash --norc --noprofile -i"
        } else {
            "env PS1='READY> ' /bin/sh -i"
        };
        let tmux = Self::start_command(name, shell);
        tmux.wait_screen("the shell prompt", |s| s.contains("READY>"));
        tmux
    }

    /// A 200x50 terminal running `command` (through `sh -c`).
    pub fn start_command(name: &str, command: &str) -> Self {
        let socket = format!("gpuwatch-{name}-{}", std::process::id());
        let tmux = Tmux { socket };
        let ok = Command::new("tmux")
            .args([
                "-L",
                &tmux.socket,
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                "200",
                "-y",
                "50",
                command,
            ])
            .env("TERM", "xterm-256color")
            .status()
            .expect("run tmux")
            .success();
        assert!(ok, "tmux new-session failed");
        tmux
    }

    pub fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p"])
    }

    pub fn format(&self, format: &str) -> String {
        self.tmux(&["display-message", "-p", format])
            .trim()
            .to_owned()
    }

    pub fn type_line(&self, text: &str) {
        self.tmux(&["send-keys", "-l", text]);
        self.tmux(&["send-keys", "Enter"]);
    }

    pub fn wait_screen(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let screen = self.screen();
            if pred(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{screen}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}
