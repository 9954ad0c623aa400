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

    def __init__(self, state_dir: Path, extra_args: tuple = ()):
        self.log: list[str] = []
        self._ready = threading.Event()
        self.target: str | None = None
        self.proc = subprocess.Popen(
            [str(server_binary()), "--simulate", "--listen", "127.0.0.1:0",
             "--http-listen", "off", "--state-dir", str(state_dir), *extra_args],
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
