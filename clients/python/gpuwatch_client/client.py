"""A thin, typed Python client for one gpuwatch daemon.

Why this exists: Python schedulers and notebooks talk to gpuwatch over gRPC.
The generated stubs (``gpuwatch_client.v1``) are enough to make calls, but each
caller would otherwise re-implement the same things: the channel with TLS and
a bearer token, GPU selectors, deadlines, turning ``grpc.RpcError`` into an
error that says which call failed and why, and checking the stream contracts
(:mod:`gpuwatch_client.contract`). This module owns those, and nothing else:
every message it returns is the generated protobuf type, unchanged.
"""

from __future__ import annotations

import ipaddress
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import grpc

from .contract import EventsContract, WatchContract
from .v1 import common_pb2, control_pb2, events_pb2, gpuwatch_pb2, gpuwatch_pb2_grpc

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
    ):
        if timeout <= 0:
            raise ValueError(f"timeout {timeout} s must be positive")
        if (cert_file is None) != (key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        self.target = target
        self.timeout = timeout
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

    def _unary(self, name: str, request):
        try:
            return getattr(self._stub, name)(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise GpuWatchError(name, e.code(), e.details() or "") from None

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
    ) -> Iterator[gpuwatch_pb2.WatchResponse]:
        """Streams telemetry: ``start``, then ``frame`` (and ``gap``) messages.

        Every message is checked against the Watch contract first (pass your
        own ``contract`` to read its counters); a broken promise raises
        :class:`~gpuwatch_client.contract.ContractViolation`. ``deadline``
        (seconds) bounds the whole stream; without it the stream runs until
        the caller stops iterating or the daemon shuts down. Stop early by
        closing the generator (``break`` out of a ``for`` loop).
        """
        if interval_ms < 0:
            raise ValueError(f"interval_ms {interval_ms} must not be negative")
        request = gpuwatch_pb2.WatchRequest(interval_ms=interval_ms, gpus=_selectors(gpus))
        if resume_after_seq is not None:
            request.resume_after_seq = resume_after_seq
        check = contract or WatchContract(resume_after_seq=resume_after_seq)
        call = self._stub.Watch(request, timeout=deadline, metadata=self._metadata)
        yield from _checked_stream("Watch", call, check.observe)

    def events(
        self,
        *,
        since_seq: Optional[int] = None,
        gpus: Sequence[Selector] = (),
        kinds: Sequence[int] = (),
        until_caught_up: bool = False,
        deadline: Optional[float] = None,
        contract: Optional[EventsContract] = None,
    ) -> Iterator[gpuwatch_pb2.WatchEventsResponse]:
        """Streams events: the replay after ``since_seq``, ``caught_up``, then live ones.

        With ``until_caught_up`` the stream ends after the ``caught_up``
        message (bounded by ``deadline``, else the client's timeout). ``kinds``
        are ``events_pb2.EventKind`` values.
        """
        request = gpuwatch_pb2.WatchEventsRequest(gpus=_selectors(gpus), kinds=list(kinds))
        if since_seq is not None:
            request.since_seq = since_seq
        check = contract or EventsContract(since_seq=since_seq)
        if until_caught_up and deadline is None:
            deadline = self.timeout
        call = self._stub.WatchEvents(request, timeout=deadline, metadata=self._metadata)
        for msg in _checked_stream("WatchEvents", call, check.observe):
            yield msg
            if until_caught_up and msg.WhichOneof("message") == "caught_up":
                return


def _checked_stream(name: str, call, observe) -> Iterator:
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
