"""Python client for gpuwatch, the NVIDIA GPU telemetry and control daemon.

Talks to a daemon's gRPC API (``gpuwatch.v1``) with stubs generated from the
repository's protos at build time (``gpuwatch_client.v1``), and checks the
stream contracts the proto promises (:mod:`gpuwatch_client.contract`).

    from gpuwatch_client import GpuWatchClient

    with GpuWatchClient("127.0.0.1:9450") as gw:
        for d in gw.list_devices().devices:
            print(d.index, d.name)

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

from .client import DEFAULT_TARGET, EVENT_KINDS, GpuWatchClient, GpuWatchError, selector
from .contract import ContractViolation, EventsContract, WatchContract

__all__ = [
    "DEFAULT_TARGET",
    "EVENT_KINDS",
    "ContractViolation",
    "EventsContract",
    "GpuWatchClient",
    "GpuWatchError",
    "WatchContract",
    "selector",
]
__version__ = "0.1.0"
