"""Python client for gpuwatch, the NVIDIA GPU telemetry and control daemon.

Talks to a daemon's gRPC API (``gpuwatch.v1``) with stubs generated from the
repository's protos at build time (``gpuwatch_client.v1``), and checks the
stream contracts the proto promises (:mod:`gpuwatch_client.contract`).

    from gpuwatch_client import GpuWatchClient

    with GpuWatchClient("127.0.0.1:9450") as gw:
        for d in gw.list_devices().devices:
            print(d.index, d.name)

Also: :class:`AsyncGpuWatchClient` (asyncio), :class:`Fleet` (many hosts,
partial failure reported), :func:`expand` (a name with many addresses means
all of them), and picking/leasing GPUs (``pick``, ``lease``, ``release``).

The command line (``gpuwatch-py`` or ``python -m gpuwatch_client``) lists
devices, watches frames and reads events; see ``--help``.
"""

try:
    from .v1 import gpuwatch_pb2 as _probe  # noqa: F401
except ImportError as e:  # pragma: no cover - only without generated stubs
    raise ImportError(
        "gpuwatch_client's gRPC stubs are missing: install the package with "
        "`pip install ./clients/python` from a gpuwatch checkout, or run "
        "`python clients/python/codegen.py` (needs grpcio-tools)"
    ) from e

from .aio import AsyncGpuWatchClient
from .client import (
    DEFAULT_TARGET,
    EVENT_KINDS,
    GpuWatchClient,
    GpuWatchError,
    pick_criteria,
    selector,
)
from .contract import ContractViolation, EventsContract, WatchContract
from .fleet import Fleet, FleetPick, FleetResult, expand

__all__ = [
    "AsyncGpuWatchClient",
    "DEFAULT_TARGET",
    "Fleet",
    "FleetPick",
    "FleetResult",
    "expand",
    "pick_criteria",
    "EVENT_KINDS",
    "ContractViolation",
    "EventsContract",
    "GpuWatchClient",
    "GpuWatchError",
    "WatchContract",
    "selector",
]
__version__ = "0.1.0"
