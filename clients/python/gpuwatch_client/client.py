"""A thin, typed Python client for one gpuwatch daemon.

Why this exists: Python schedulers and notebooks talk to gpuwatch over gRPC.
The generated stubs (``gpuwatch_client.v1``) are enough to make calls, but each
caller would otherwise re-implement the same things: the channel with TLS and
a bearer token, GPU selectors, deadlines, turning ``grpc.RpcError`` into an
error that says which call failed and why, and checking the stream contracts
(:mod:`gpuwatch_client.contract`). This module owns those, and nothing else:
every message it returns is the generated protobuf type, unchanged.

Unary calls that are safe to repeat are retried on ``UNAVAILABLE`` with capped,
jittered exponential backoff (``retries``, ``backoff``); ``LeaseGpus`` is never
retried (a grant whose answer was lost would be granted twice). ``watch`` and
``events`` with ``reconnect=True`` reconnect the same way and resume after the
last seq they delivered; what the daemon could not replay arrives as a ``gap``.
"""

from __future__ import annotations

import ipaddress
import random
import time
import warnings
from pathlib import Path
from typing import Any, Generator, Iterable, Iterator, Optional, Sequence, Union

import grpc

from .contract import EventsContract, WatchContract
from .v1 import (
    common_pb2,
    control_pb2,
    events_pb2,
    gpuwatch_pb2,
    gpuwatch_pb2_grpc,
    leases_pb2,
)

#: Calls never retried: repeating them is not harmless.
NOT_RETRIED = frozenset({"LeaseGpus"})

#: The daemon's default gRPC address.
DEFAULT_TARGET = "127.0.0.1:9450"

Selector = Union[int, str, common_pb2.GpuSelector]


class GpuWatchError(Exception):
    """A call to the daemon failed.

    ``code`` is the gRPC status code (``grpc.StatusCode``) and ``details`` the
    daemon's message, which names what was wrong and what is allowed.
    """

    def __init__(self, call: str, code: grpc.StatusCode, details: str):
        self.call = call
        self.code = code
        self.details = details
        super().__init__(f"{call} failed: {code.name}: {details}")

    @property
    def status(self) -> grpc.StatusCode:
        """The gRPC status code (same as ``code``)."""
        return self.code


def backoff_delays(retries: int, base: float, cap: float = 5.0) -> Iterator[float]:
    """``retries`` delays: exponential from ``base`` seconds, capped, with full jitter."""
    for attempt in range(retries):
        yield random.uniform(0, min(cap, base * (2**attempt)))


def pick_criteria(
    *,
    count: int = 1,
    min_free_bytes: Optional[int] = None,
    max_utilization_pct: Optional[int] = None,
    min_headroom_c: Optional[int] = None,
    allow_mig: bool = False,
    allow_busy: bool = False,
    gpus: Sequence["Selector"] = (),
    window_ms: int = 0,
) -> leases_pb2.PickCriteria:
    """The criteria of a pick, with units in the names (bytes, percent, degrees C)."""
    if count < 1:
        raise ValueError(f"count {count} must be at least 1")
    c = leases_pb2.PickCriteria(
        count=count,
        allow_mig=allow_mig,
        allow_busy=allow_busy,
        utilization_window_ms=window_ms,
        gpus=_selectors(gpus),
    )
    if min_free_bytes is not None:
        c.min_free_memory_bytes = min_free_bytes
    if max_utilization_pct is not None:
        c.max_utilization_pct = max_utilization_pct
    if min_headroom_c is not None:
        c.min_headroom_c = min_headroom_c
    return c


def power_limit_request(
    gpus: Sequence["Selector"], watts: Optional[float], restore_default: bool
) -> control_pb2.SetPowerLimitRequest:
    if (watts is None) == (not restore_default):
        raise ValueError("give either watts or restore_default=True")
    req = control_pb2.SetPowerLimitRequest(gpus=_selectors(gpus))
    if watts is not None:
        req.watts = watts
    else:
        req.restore_default = True
    return req


def power_budget_request(
    watts: Optional[float], restore_default: bool
) -> control_pb2.SetPowerBudgetRequest:
    if (watts is None) == (not restore_default):
        raise ValueError("give either watts or restore_default=True")
    req = control_pb2.SetPowerBudgetRequest()
    if watts is not None:
        req.watts = watts
    else:
        req.restore_default = True
    return req


def threshold_request(
    gpus: Sequence["Selector"],
    celsius: Optional[int],
    restore_default: bool,
    hysteresis_c: Optional[int],
) -> control_pb2.SetThresholdRequest:
    if (celsius is None) == (not restore_default):
        raise ValueError("give either celsius or restore_default=True")
    req = control_pb2.SetThresholdRequest(gpus=_selectors(gpus))
    if celsius is not None:
        req.celsius = celsius
    else:
        req.restore_default = True
    if hysteresis_c is not None:
        req.hysteresis_c = hysteresis_c
    return req


def selector(spec: Selector) -> common_pb2.GpuSelector:
    """A GPU selector from an index (``0``, ``"0"``), a UUID, or ``"all"``."""
    if isinstance(spec, common_pb2.GpuSelector):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"{spec!r} is not a GPU; use an index, a UUID or 'all'")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"GPU index {spec} is negative; indices start at 0")
        return common_pb2.GpuSelector(index=spec)
    text = str(spec).strip()
    if text.lower() == "all":
        return common_pb2.GpuSelector(all=True)
    if text.isdigit():
        return common_pb2.GpuSelector(index=int(text))
    if text.upper().startswith(("GPU-", "MIG-")):
        return common_pb2.GpuSelector(uuid=text)
    raise ValueError(
        f"{spec!r} is not a GPU; use an index (0, 1, ...), a UUID (GPU-...) or 'all'"
    )


def _selectors(gpus: Iterable[Selector]) -> list:
    return [selector(g) for g in gpus]


def _is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GpuWatchClient:
    """A connection to one daemon.

    ``target`` is ``HOST:PORT``. With ``ca_file`` (or ``tls=True`` for the
    system's roots) the channel uses TLS; ``cert_file``/``key_file`` add a
    client certificate (mutual TLS). ``token`` is sent on every call as
    ``authorization: Bearer <token>``. ``timeout`` (seconds) bounds every
    unary call and the replay part of streams.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: Optional[str] = None,
        tls: bool = False,
        ca_file: Optional[Union[str, Path]] = None,
        cert_file: Optional[Union[str, Path]] = None,
        key_file: Optional[Union[str, Path]] = None,
        server_name: Optional[str] = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout {timeout} s must be positive")
        if (cert_file is None) != (key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._metadata: tuple = ()
        if token is not None:
            if not token or any(c in token for c in "\r\n"):
                raise ValueError("the token must be non-empty and on one line")
            self._metadata = (("authorization", f"Bearer {token}"),)
        secure = tls or ca_file is not None or cert_file is not None
        options = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if secure:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_file, "CA certificate"),
                private_key=_read(key_file, "client key"),
                certificate_chain=_read(cert_file, "client certificate"),
            )
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            if token is not None and not _is_loopback(target):
                warnings.warn(
                    f"sending a bearer token to {target} without TLS; anyone on the path can "
                    "read it (use --ca/ca_file)",
                    stacklevel=2,
                )
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = gpuwatch_pb2_grpc.GpuWatchStub(self._channel)

    def close(self) -> None:
        """Closes the channel; open streams end."""
        self._channel.close()

    def __enter__(self) -> "GpuWatchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, name: str, request: Any) -> Any:
        delays = backoff_delays(0 if name in NOT_RETRIED else self.retries, self.backoff)
        while True:
            try:
                return getattr(self._stub, name)(
                    request, timeout=self.timeout, metadata=self._metadata
                )
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    delay = next(delays, None)
                    if delay is not None:
                        time.sleep(delay)
                        continue
                raise GpuWatchError(name, code, e.details() or "") from None

    # Control (needs a control token).

    def set_power_limit(
        self,
        gpus: Sequence[Selector],
        watts: Optional[float] = None,
        *,
        restore_default: bool = False,
    ) -> control_pb2.SetPowerLimitResponse:
        """Sets the operator's power ceiling in watts (or goes back to the default)."""
        return self._unary("SetPowerLimit", power_limit_request(gpus, watts, restore_default))

    def set_power_budget(
        self, watts: Optional[float] = None, *, restore_default: bool = False
    ) -> control_pb2.SetPowerBudgetResponse:
        """Sets the node power budget in watts (or drops it with restore_default)."""
        return self._unary("SetPowerBudget", power_budget_request(watts, restore_default))

    def reset_clocks(self, gpus: Sequence[Selector]) -> control_pb2.ResetClocksResponse:
        """Resets application and locked clocks of the selected GPUs."""
        return self._unary("ResetClocks", control_pb2.ResetClocksRequest(gpus=_selectors(gpus)))

    def set_threshold(
        self,
        gpus: Sequence[Selector],
        celsius: Optional[int] = None,
        *,
        restore_default: bool = False,
        hysteresis_c: Optional[int] = None,
    ) -> control_pb2.SetThresholdResponse:
        """Sets the governor's target temperature in degrees C (and hysteresis)."""
        return self._unary(
            "SetThreshold", threshold_request(gpus, celsius, restore_default, hysteresis_c)
        )

    # Picking and leases.

    def pick(self, **criteria: Any) -> leases_pb2.PickGpusResponse:
        """Ranks the GPUs against the criteria (see :func:`pick_criteria`); grants nothing."""
        return self._unary(
            "PickGpus", leases_pb2.PickGpusRequest(criteria=pick_criteria(**criteria))
        )

    def lease(
        self, *, ttl_s: int = 0, purpose: str = "", **criteria: Any
    ) -> leases_pb2.PickGpusResponse:
        """Picks and leases the GPUs to this caller for ``ttl_s`` seconds (needs a lease token).

        All or nothing: when fewer than ``count`` GPUs fit, ``satisfied`` is
        false, nothing is leased and ``shortfall`` says why. Never retried.
        """
        return self._unary(
            "LeaseGpus",
            leases_pb2.LeaseGpusRequest(
                criteria=pick_criteria(**criteria), ttl_s=ttl_s, purpose=purpose
            ),
        )

    def renew(self, lease_ids: Sequence[str], ttl_s: int = 0) -> leases_pb2.RenewLeaseResponse:
        """Extends leases this caller holds (``ttl_s`` 0 keeps each lease's TTL)."""
        return self._unary(
            "RenewLease", leases_pb2.RenewLeaseRequest(lease_ids=list(lease_ids), ttl_s=ttl_s)
        )

    def release(self, lease_ids: Sequence[str]) -> leases_pb2.ReleaseLeaseResponse:
        """Ends leases this caller holds."""
        return self._unary(
            "ReleaseLease", leases_pb2.ReleaseLeaseRequest(lease_ids=list(lease_ids))
        )

    def leases(self) -> leases_pb2.ListLeasesResponse:
        """The live leases on this host."""
        return self._unary("ListLeases", leases_pb2.ListLeasesRequest())

    # Reads.

    def list_devices(self, gpus: Sequence[Selector] = ()) -> gpuwatch_pb2.ListDevicesResponse:
        """Identity, limits, capabilities and policy of the selected GPUs (all by default)."""
        return self._unary("ListDevices", gpuwatch_pb2.ListDevicesRequest(gpus=_selectors(gpus)))

    def snapshot(self, gpus: Sequence[Selector] = ()) -> gpuwatch_pb2.GetSnapshotResponse:
        """The latest sample of each selected GPU."""
        return self._unary("GetSnapshot", gpuwatch_pb2.GetSnapshotRequest(gpus=_selectors(gpus)))

    def policy(self, gpus: Sequence[Selector] = ()) -> control_pb2.GetPolicyResponse:
        """The thermal governor's policy and state for the selected GPUs."""
        return self._unary("GetPolicy", control_pb2.GetPolicyRequest(gpus=_selectors(gpus)))

    def watch(
        self,
        *,
        interval_ms: int = 0,
        gpus: Sequence[Selector] = (),
        resume_after_seq: Optional[int] = None,
        deadline: Optional[float] = None,
        contract: Optional[WatchContract] = None,
        reconnect: bool = False,
    ) -> Generator[gpuwatch_pb2.WatchResponse, None, None]:
        """Streams telemetry: ``start``, then ``frame`` (and ``gap``) messages.

        Every message is checked against the Watch contract first (pass your
        own ``contract`` to read its counters); a broken promise raises
        :class:`~gpuwatch_client.contract.ContractViolation`. With
        ``reconnect``, a lost connection (or a daemon restart) is retried with
        backoff and the stream resumes after the last frame delivered: the
        new stream's ``start`` is yielded, then a ``gap`` for what the daemon
        could not replay, then frames; ``deadline`` then bounds each
        connection, not the whole. ``deadline``
        (seconds) bounds the whole stream; without it the stream runs until
        the caller stops iterating or the daemon shuts down. Stop early by
        closing the generator (``break`` out of a ``for`` loop).
        """
        if interval_ms < 0:
            raise ValueError(f"interval_ms {interval_ms} must not be negative")
        last = resume_after_seq
        failures = 0
        while True:
            request = gpuwatch_pb2.WatchRequest(interval_ms=interval_ms, gpus=_selectors(gpus))
            if last is not None:
                request.resume_after_seq = last
            check = contract if (contract is not None and failures == 0) else None
            check = check or WatchContract(resume_after_seq=last)
            call = self._stub.Watch(request, timeout=deadline, metadata=self._metadata)
            try:
                for msg in _checked_stream("Watch", call, check.observe):
                    kind = msg.WhichOneof("message")
                    if kind == "frame":
                        last = msg.frame.seq
                        failures = 0
                    elif kind == "start" and msg.start.HasField("current"):
                        last = msg.start.current.seq
                    yield msg
            except GpuWatchError as e:
                if not reconnect or e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
            if not reconnect:
                return
            failures += 1
            time.sleep(next(backoff_delays(1, self.backoff * (2 ** min(failures, 5)))))

    def events(
        self,
        *,
        since_seq: Optional[int] = None,
        gpus: Sequence[Selector] = (),
        kinds: Sequence[int] = (),
        until_caught_up: bool = False,
        deadline: Optional[float] = None,
        contract: Optional[EventsContract] = None,
        reconnect: bool = False,
    ) -> Generator[gpuwatch_pb2.WatchEventsResponse, None, None]:
        """Streams events: the replay after ``since_seq``, ``caught_up``, then live ones.

        With ``until_caught_up`` the stream ends after the ``caught_up``
        message (bounded by ``deadline``, else the client's timeout). ``kinds``
        are ``events_pb2.EventKind`` values. With ``reconnect``, a lost
        connection is retried with backoff and the stream resumes after the
        last event seen (``since_seq``), so no retained event is missed; the
        daemon's ``gap`` says what it no longer holds.
        """
        if until_caught_up and deadline is None:
            deadline = self.timeout
        last = since_seq
        failures = 0
        while True:
            request = gpuwatch_pb2.WatchEventsRequest(
                gpus=_selectors(gpus), kinds=[int(k) for k in kinds]  # type: ignore[misc]
            )
            if last is not None:
                request.since_seq = last
            check = contract if (contract is not None and failures == 0) else None
            check = check or EventsContract(since_seq=last)
            call = self._stub.WatchEvents(request, timeout=deadline, metadata=self._metadata)
            try:
                for msg in _checked_stream("WatchEvents", call, check.observe):
                    kind = msg.WhichOneof("message")
                    if kind == "event":
                        last = msg.event.seq
                        failures = 0
                    elif kind == "caught_up" and last is None:
                        last = msg.caught_up.latest_seq
                    yield msg
                    if until_caught_up and kind == "caught_up":
                        return
            except GpuWatchError as e:
                if not reconnect or e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
            if not reconnect:
                return
            failures += 1
            time.sleep(next(backoff_delays(1, self.backoff * (2 ** min(failures, 5)))))


def _checked_stream(name: str, call: Any, observe: Any) -> Iterator[Any]:
    try:
        for msg in call:
            observe(msg)
            yield msg
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED and call.done():
            return
        raise GpuWatchError(name, e.code(), e.details() or "") from None
    finally:
        call.cancel()


def _read(path: Optional[Union[str, Path]], what: str) -> Optional[bytes]:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror}") from None


#: Event kind names without the ``EVENT_KIND_`` prefix, lower-case (``gpu_lost``).
EVENT_KINDS = {
    name[len("EVENT_KIND_"):].lower(): value
    for name, value in events_pb2.EventKind.items()
    if value != events_pb2.EVENT_KIND_UNSPECIFIED
}
