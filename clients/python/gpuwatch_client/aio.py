"""The asyncio client: :class:`AsyncGpuWatchClient`, the same calls as
:class:`gpuwatch_client.GpuWatchClient` on ``grpc.aio``.

Why it exists: an asyncio scheduler must not block its event loop on a
daemon's answer. Requests are built by the same helpers as the sync client
(:func:`~gpuwatch_client.client.pick_criteria` and friends), errors are the
same :class:`~gpuwatch_client.GpuWatchError`, retries the same backoff on
``UNAVAILABLE`` (never for ``LeaseGpus``), and ``watch``/``events`` with
``reconnect=True`` resume after the last seq they delivered.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Optional, Sequence

import grpc
import grpc.aio

from .client import (
    DEFAULT_TARGET,
    NOT_RETRIED,
    GpuWatchError,
    Selector,
    _selectors,
    backoff_delays,
    pick_criteria,
    power_budget_request,
    power_limit_request,
    threshold_request,
)
from .contract import EventsContract, WatchContract
from .v1 import control_pb2, gpuwatch_pb2, gpuwatch_pb2_grpc, leases_pb2


class AsyncGpuWatchClient:
    """A connection to one daemon, for asyncio.

    ``target``, ``token``, ``timeout``, ``retries`` and ``backoff`` mean what
    they mean for :class:`gpuwatch_client.GpuWatchClient`; ``ca_file`` turns
    TLS on. Use ``async with``, or await :meth:`close`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: Optional[str] = None,
        ca_file: Optional[str] = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout {timeout} s must be positive")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._metadata: tuple = ()
        if token is not None:
            if not token or any(c in token for c in "\r\n"):
                raise ValueError("the token must be non-empty and on one line")
            self._metadata = (("authorization", f"Bearer {token}"),)
        if ca_file is not None:
            with open(ca_file, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            self._channel = grpc.aio.secure_channel(target, creds)
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = gpuwatch_pb2_grpc.GpuWatchStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncGpuWatchClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _unary(self, name: str, request: Any) -> Any:
        delays = backoff_delays(0 if name in NOT_RETRIED else self.retries, self.backoff)
        while True:
            try:
                return await getattr(self._stub, name)(
                    request, timeout=self.timeout, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    delay = next(delays, None)
                    if delay is not None:
                        await asyncio.sleep(delay)
                        continue
                raise GpuWatchError(name, code, e.details() or "") from None

    # Reads.

    async def list_devices(self, gpus: Sequence[Selector] = ()) -> gpuwatch_pb2.ListDevicesResponse:
        return await self._unary(
            "ListDevices", gpuwatch_pb2.ListDevicesRequest(gpus=_selectors(gpus))
        )

    async def snapshot(self, gpus: Sequence[Selector] = ()) -> gpuwatch_pb2.GetSnapshotResponse:
        return await self._unary(
            "GetSnapshot", gpuwatch_pb2.GetSnapshotRequest(gpus=_selectors(gpus))
        )

    async def policy(self, gpus: Sequence[Selector] = ()) -> control_pb2.GetPolicyResponse:
        return await self._unary("GetPolicy", control_pb2.GetPolicyRequest(gpus=_selectors(gpus)))

    # Control.

    async def set_power_limit(
        self,
        gpus: Sequence[Selector],
        watts: Optional[float] = None,
        *,
        restore_default: bool = False,
    ) -> control_pb2.SetPowerLimitResponse:
        return await self._unary(
            "SetPowerLimit", power_limit_request(gpus, watts, restore_default)
        )

    async def set_power_budget(
        self, watts: Optional[float] = None, *, restore_default: bool = False
    ) -> control_pb2.SetPowerBudgetResponse:
        return await self._unary("SetPowerBudget", power_budget_request(watts, restore_default))

    async def reset_clocks(self, gpus: Sequence[Selector]) -> control_pb2.ResetClocksResponse:
        return await self._unary(
            "ResetClocks", control_pb2.ResetClocksRequest(gpus=_selectors(gpus))
        )

    async def set_threshold(
        self,
        gpus: Sequence[Selector],
        celsius: Optional[int] = None,
        *,
        restore_default: bool = False,
        hysteresis_c: Optional[int] = None,
    ) -> control_pb2.SetThresholdResponse:
        return await self._unary(
            "SetThreshold", threshold_request(gpus, celsius, restore_default, hysteresis_c)
        )

    # Picking and leases.

    async def pick(self, **criteria: Any) -> leases_pb2.PickGpusResponse:
        return await self._unary(
            "PickGpus", leases_pb2.PickGpusRequest(criteria=pick_criteria(**criteria))
        )

    async def lease(
        self, *, ttl_s: int = 0, purpose: str = "", **criteria: Any
    ) -> leases_pb2.PickGpusResponse:
        return await self._unary(
            "LeaseGpus",
            leases_pb2.LeaseGpusRequest(
                criteria=pick_criteria(**criteria), ttl_s=ttl_s, purpose=purpose
            ),
        )

    async def renew(
        self, lease_ids: Sequence[str], ttl_s: int = 0
    ) -> leases_pb2.RenewLeaseResponse:
        return await self._unary(
            "RenewLease", leases_pb2.RenewLeaseRequest(lease_ids=list(lease_ids), ttl_s=ttl_s)
        )

    async def release(self, lease_ids: Sequence[str]) -> leases_pb2.ReleaseLeaseResponse:
        return await self._unary(
            "ReleaseLease", leases_pb2.ReleaseLeaseRequest(lease_ids=list(lease_ids))
        )

    async def leases(self) -> leases_pb2.ListLeasesResponse:
        return await self._unary("ListLeases", leases_pb2.ListLeasesRequest())

    # Streams.

    async def watch(
        self,
        *,
        interval_ms: int = 0,
        gpus: Sequence[Selector] = (),
        resume_after_seq: Optional[int] = None,
        reconnect: bool = False,
    ) -> AsyncIterator[gpuwatch_pb2.WatchResponse]:
        """Telemetry frames, checked against the Watch contract; see the sync client."""
        last = resume_after_seq
        failures = 0
        while True:
            request = gpuwatch_pb2.WatchRequest(interval_ms=interval_ms, gpus=_selectors(gpus))
            if last is not None:
                request.resume_after_seq = last
            check = WatchContract(resume_after_seq=last)
            call = self._stub.Watch(request, metadata=self._metadata)
            try:
                async for msg in call:
                    check.observe(msg)
                    kind = msg.WhichOneof("message")
                    if kind == "frame":
                        last = msg.frame.seq
                        failures = 0
                    elif kind == "start" and msg.start.HasField("current"):
                        last = msg.start.current.seq
                    yield msg
            except grpc.aio.AioRpcError as e:
                if not reconnect or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise GpuWatchError("Watch", e.code(), e.details() or "") from None
            finally:
                call.cancel()
            if not reconnect:
                return
            failures += 1
            await asyncio.sleep(next(backoff_delays(1, self.backoff * (2 ** min(failures, 5)))))

    async def events(
        self,
        *,
        since_seq: Optional[int] = None,
        until_caught_up: bool = False,
        reconnect: bool = False,
    ) -> AsyncIterator[gpuwatch_pb2.WatchEventsResponse]:
        """Events after ``since_seq``, ``caught_up``, then live; see the sync client."""
        last = since_seq
        failures = 0
        while True:
            request = gpuwatch_pb2.WatchEventsRequest()
            if last is not None:
                request.since_seq = last
            check = EventsContract(since_seq=last)
            call = self._stub.WatchEvents(
                request,
                metadata=self._metadata,
                timeout=self.timeout if until_caught_up else None,
            )
            try:
                async for msg in call:
                    check.observe(msg)
                    kind = msg.WhichOneof("message")
                    if kind == "event":
                        last = msg.event.seq
                        failures = 0
                    elif kind == "caught_up" and last is None:
                        last = msg.caught_up.latest_seq
                    yield msg
                    if until_caught_up and kind == "caught_up":
                        return
            except grpc.aio.AioRpcError as e:
                if not reconnect or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise GpuWatchError("WatchEvents", e.code(), e.details() or "") from None
            finally:
                call.cancel()
            if not reconnect:
                return
            failures += 1
            await asyncio.sleep(next(backoff_delays(1, self.backoff * (2 ** min(failures, 5)))))
