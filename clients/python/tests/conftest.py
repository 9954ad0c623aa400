"""Fixtures: a real gpuwatch-server on simulated GPUs, on a free loopback port.

The daemon binary is ``$GPUWATCH_SERVER_BIN`` when set (CI sets it to
``target/release/gpuwatch-server``), else the newer of the repository's release
and debug builds. It is started with ``--listen 127.0.0.1:0`` and the address it
logs ("gRPC listening on ADDR") is read back, so tests never pick a port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
LISTENING = re.compile(r"gRPC listening on (\S+)")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def server_binary() -> Path:
    env = os.environ.get("GPUWATCH_SERVER_BIN")
    if env:
        path = Path(env)
        if not path.is_file():
            pytest.fail(f"GPUWATCH_SERVER_BIN={env} is not a file")
        return path
    builds = [REPO / "target" / kind / "gpuwatch-server" for kind in ("release", "debug")]
    builds = [b for b in builds if b.is_file()]
    if not builds:
        pytest.fail("no gpuwatch-server build; run `cargo build --release` or set GPUWATCH_SERVER_BIN")
    return max(builds, key=lambda b: b.stat().st_mtime)


class Daemon:
    """A running gpuwatch-server; ``target`` is its gRPC address."""

    def __init__(self, state_dir: Path, extra_args: tuple = (), env: dict | None = None,
                 listen: str = "127.0.0.1:0"):
        self.state_dir = state_dir
        self.extra_args = extra_args
        self.env = env
        self.log: list[str] = []
        self._ready = threading.Event()
        self.target: str | None = None
        self.proc = subprocess.Popen(
            [str(server_binary()), "--simulate", "--listen", listen,
             "--http-listen", "off", "--state-dir", str(state_dir), *extra_args],
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Drain stderr for the daemon's whole life so it never blocks on a full pipe.
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT_S) or self.target is None:
            self.stop()
            pytest.fail("gpuwatch-server did not report its address:\n" + "".join(self.log))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            m = LISTENING.search(line)
            if m and self.target is None:
                self.target = m.group(1)
                self._ready.set()
        self._ready.set()  # exited before listening: wake the waiter

    def kill(self) -> None:
        """SIGKILL: nothing gets a chance to be saved."""
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT_S)
        self._reader.join(STOP_TIMEOUT_S)

    def restart(self) -> "Daemon":
        """The same daemon again: same port, state directory and settings."""
        if self.proc.poll() is None:
            self.kill()
        deadline = time.monotonic() + 20
        while True:
            try:
                return Daemon(self.state_dir, self.extra_args, self.env, listen=self.target or "")
            except BaseException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self._reader.join(STOP_TIMEOUT_S)
        return self.proc.returncode


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("state"))
    yield d
    code = d.stop()
    assert code == 0, f"gpuwatch-server exited with {code} on SIGTERM:\n" + "".join(d.log)


@pytest.fixture()
def client(daemon):
    from gpuwatch_client import GpuWatchClient

    with GpuWatchClient(daemon.target, timeout=20.0) as gw:
        yield gw


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Runs ``python -m gpuwatch_client ARGS`` with a deadline."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gpuwatch_client", *args],
        capture_output=True, text=True, timeout=timeout,
    )
    result.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
    return result


#: Tokens of the scheduler daemons (names are the actors in audit events).
CONTROL_TOKEN = "py-control-token-0123456789"
LEASE_TOKEN = "py-lease-token-0123456789"
LEASE_TOKEN_B = "py-lease-token-b-0123456789"
READ_TOKEN = "py-read-token-0123456789"

#: Four idle simulated H100s, sampled every 100 ms.
FOUR_GPUS = """
[sampler]
interval = "100ms"
[simulator]
gpus = [{ preset = "h100-sxm" }, { preset = "h100-sxm" }, { preset = "h100-sxm" }, { preset = "h100-sxm" }]
"""


def sched_daemon(tmp: Path) -> Daemon:
    """A daemon with 4 GPUs and read, lease (two schedulers) and control tokens."""
    tmp.mkdir(parents=True, exist_ok=True)
    tokens = tmp / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nname = "ops"\nrole = "control"\ntoken = "{CONTROL_TOKEN}"\n'
        f'[[tokens]]\nname = "sched-a"\nrole = "lease"\ntoken = "{LEASE_TOKEN}"\n'
        f'[[tokens]]\nname = "sched-b"\nrole = "lease"\ntoken = "{LEASE_TOKEN_B}"\n'
        f'[[tokens]]\nname = "reader"\nrole = "read"\ntoken = "{READ_TOKEN}"\n'
    )
    tokens.chmod(0o600)
    config = tmp / "gpuwatch.toml"
    config.write_text(FOUR_GPUS)
    state = tmp / "state"
    return Daemon(state, ("--config", str(config)), {"GPUWATCH_AUTH__TOKEN_FILE": str(tokens)})


@pytest.fixture()
def sched(tmp_path):
    d = sched_daemon(tmp_path / "sched")
    yield d
    d.stop()
