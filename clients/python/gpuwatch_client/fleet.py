"""Many daemons at once: :class:`Fleet`, and :func:`expand` (discovery).

Why it exists: a scheduler asks a whole fleet, and one dead host must not
fail the question. :meth:`Fleet.call` runs one call on every host in
parallel and returns a :class:`FleetResult`: the answers, and per host the
error (a :class:`~gpuwatch_client.GpuWatchError`) instead of raising it.
:meth:`Fleet.pick` picks the best GPUs over all hosts and can lease them.

Discovery: a name that resolves to several addresses (a Kubernetes headless
Service, round-robin DNS) stands for every one of them: :func:`expand` turns
``NAME:PORT`` into one ``ADDR:PORT`` target per address.
"""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, Tuple, TypeVar

from .client import GpuWatchClient, GpuWatchError
from .v1 import leases_pb2

T = TypeVar("T")

DEFAULT_PORT = 9450


def _split(target: str) -> Tuple[str, int]:
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else DEFAULT_PORT
    if target.count(":") == 1:
        host, port = target.split(":")
        return host, int(port)
    return target, DEFAULT_PORT


def expand(targets: Sequence[str]) -> List[str]:
    """Every address each ``HOST[:PORT]`` resolves to, as ``ADDR:PORT`` targets.

    IP addresses stay as they are; a name that does not resolve stays as
    written (so its failure is reported, not hidden). Duplicates are dropped,
    order is kept.
    """
    out: List[str] = []
    for target in targets:
        host, port = _split(target)
        try:
            ipaddress.ip_address(host)
            addrs = [host]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                addrs = []
                for info in infos:
                    addr = str(info[4][0])
                    if addr not in addrs:
                        addrs.append(addr)
            except OSError:
                addrs = []
            if not addrs:
                if target not in out:
                    out.append(target)
                continue
        for addr in addrs:
            t = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
            if t not in out:
                out.append(t)
    return out


@dataclass
class FleetResult(Generic[T]):
    """Per host: the answer, or the error. Partial failure is reported, not raised."""

    ok: Dict[str, T] = field(default_factory=dict)
    failed: Dict[str, GpuWatchError] = field(default_factory=dict)


@dataclass
class FleetPick:
    """The best GPUs over the fleet: per host, the CUDA_VISIBLE_DEVICES value."""

    satisfied: bool
    #: Host -> comma-separated GPU UUIDs.
    cuda_visible_devices: Dict[str, str]
    #: Host -> leases granted there (with ``lease_ttl_s``).
    leases: Dict[str, List[leases_pb2.Lease]]
    #: Why not, when not satisfied: per host, the daemon's shortfall.
    shortfall: Dict[str, str]
    failed: Dict[str, GpuWatchError]


class Fleet:
    """Clients for many daemons; ``discover`` expands names to all their addresses."""

    def __init__(self, targets: Sequence[str], *, discover: bool = True, **client_kwargs: Any):
        self.targets = expand(targets) if discover else list(targets)
        self.clients = {t: GpuWatchClient(t, **client_kwargs) for t in self.targets}

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def call(self, fn: Callable[[GpuWatchClient], T]) -> FleetResult[T]:
        """Runs ``fn(client)`` on every host at once."""
        result: FleetResult[T] = FleetResult()
        with ThreadPoolExecutor(max_workers=min(32, max(1, len(self.clients)))) as pool:
            futures = {t: pool.submit(fn, c) for t, c in self.clients.items()}
            for t, f in futures.items():
                try:
                    result.ok[t] = f.result()
                except GpuWatchError as e:
                    result.failed[t] = e
        return result

    def pick(
        self, count: int = 1, *, lease_ttl_s: Optional[int] = None, purpose: str = "", **criteria: Any
    ) -> FleetPick:
        """The best ``count`` fitting GPUs over all hosts (ties: host order, index).

        With ``lease_ttl_s``, each chosen host leases exactly the chosen GPUs
        (the daemon re-checks them under its lock); if any host cannot, what
        was leased is released and ``satisfied`` is false.
        """
        ranked = self.call(lambda c: c.pick(count=1, **criteria))
        fitting = []
        for order, t in enumerate(self.targets):
            r = ranked.ok.get(t)
            if r is None:
                continue
            for cand in r.candidates:
                if cand.fits:
                    fitting.append((-cand.score, order, cand.index, t, cand.uuid))
        fitting.sort()
        shortfall = {
            t: "; ".join(
                f"GPU {c.index} ("
                + ", ".join(f"{x.criterion}: {x.detail}" for x in c.reasons if not x.ok)
                + ")"
                for c in r.candidates
                if not c.fits
            )
            for t, r in ranked.ok.items()
        }
        if len(fitting) < count:
            return FleetPick(False, {}, {}, shortfall, ranked.failed)
        chosen: Dict[str, List[str]] = {}
        for _, _, _, t, uuid in fitting[:count]:
            chosen.setdefault(t, []).append(uuid)
        cuda = {t: ",".join(u) for t, u in chosen.items()}
        if lease_ttl_s is None:
            return FleetPick(True, cuda, {}, {}, ranked.failed)
        leases: Dict[str, List[leases_pb2.Lease]] = {}
        problems: Dict[str, str] = {}
        failed = dict(ranked.failed)
        for t, uuids in chosen.items():
            crit = dict(criteria)
            crit["gpus"] = uuids
            try:
                r = self.clients[t].lease(
                    ttl_s=lease_ttl_s, purpose=purpose, **dict(crit, count=len(uuids))
                )
            except GpuWatchError as e:
                failed[t] = e
                continue
            if r.satisfied:
                leases[t] = list(r.leases)
            else:
                problems[t] = r.shortfall
        if problems or len(failed) > len(ranked.failed):
            for t, ls in leases.items():
                try:
                    self.clients[t].release([x.id for x in ls])
                except GpuWatchError:
                    pass
            return FleetPick(False, {}, {}, problems, failed)
        return FleetPick(True, cuda, leases, {}, failed)
