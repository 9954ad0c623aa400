"""The client against a live gpuwatch-server on simulated GPUs."""

import json
from concurrent import futures

import grpc
import pytest

from gpuwatch_client import EVENT_KINDS, GpuWatchClient, GpuWatchError, WatchContract
from gpuwatch_client.v1 import events_pb2, gpuwatch_pb2, gpuwatch_pb2_grpc

from .conftest import run_cli

# The demo fleet `--simulate` starts without a [simulator] section.
DEMO_FLEET_GPUS = 4


def test_list_devices_names_every_simulated_gpu(client):
    resp = client.list_devices()
    assert resp.host.backend == "simulator"
    assert resp.host.sampler_interval_ms > 0
    assert len(resp.devices) == DEMO_FLEET_GPUS
    assert [d.index for d in resp.devices] == list(range(DEMO_FLEET_GPUS))
    uuids = {d.uuid for d in resp.devices}
    assert len(uuids) == DEMO_FLEET_GPUS and all(u.startswith("GPU-") for u in uuids)
    for d in resp.devices:
        assert d.name
        assert d.power_limits.min_mw < d.power_limits.max_mw


def test_selecting_one_gpu_by_uuid_returns_only_it(client):
    target = client.list_devices().devices[2]
    resp = client.list_devices([target.uuid])
    assert [d.uuid for d in resp.devices] == [target.uuid]


def test_watch_frames_advance_by_the_stride(client):
    sampler_ms = client.list_devices().host.sampler_interval_ms
    contract = WatchContract()
    kinds = []
    for msg in client.watch(interval_ms=2 * sampler_ms, deadline=60, contract=contract):
        kinds.append(msg.WhichOneof("message"))
        if contract.frames >= 8:
            break
    assert kinds[0] == "start"
    assert contract.stride == 2
    # The contract checker passed every message; on a busy machine a gap is
    # allowed, but it must have been announced and counted.
    assert contract.frames == 8
    assert kinds.count("gap") == len(contract.gaps)


def test_resume_replays_frames_after_the_given_seq(client):
    contract = WatchContract()
    for _ in client.watch(deadline=60, contract=contract):
        if contract.frames >= 3:
            break
    resume_at = contract.last_seq
    resumed = WatchContract(resume_after_seq=resume_at)
    first = None
    for msg in client.watch(resume_after_seq=resume_at, deadline=60, contract=resumed):
        kind = msg.WhichOneof("message")
        if kind == "start":
            assert not msg.start.HasField("current")
        elif kind == "frame" and first is None:
            first = msg.frame.seq
        if resumed.frames >= 2:
            break
    # Frames right after the resume point are still in the history ring.
    assert first == resume_at + 1
    assert resumed.gaps == []


def test_an_interval_below_the_sampler_is_refused_naming_the_minimum(client):
    with pytest.raises(GpuWatchError) as err:
        next(client.watch(interval_ms=1, deadline=10))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "minimum" in err.value.details


def test_events_replay_ends_with_caught_up(client):
    messages = list(client.events(since_seq=0, until_caught_up=True))
    assert messages[-1].WhichOneof("message") == "caught_up"
    events = [m.event for m in messages if m.WhichOneof("message") == "event"]
    assert events, "a fresh daemon has at least its own start event"
    # The attribution thread may record who uses the GPUs before the start
    # event is written, so the start is among the events, not always first.
    assert events_pb2.EVENT_KIND_DAEMON_STARTED in [e.kind for e in events]
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    assert messages[-1].caught_up.latest_seq >= seqs[-1]


def test_events_filtered_by_kind_hold_only_that_kind(client):
    messages = list(client.events(
        since_seq=0, kinds=[EVENT_KINDS["daemon_started"]], until_caught_up=True))
    kinds = {m.event.kind for m in messages if m.WhichOneof("message") == "event"}
    assert kinds == {events_pb2.EVENT_KIND_DAEMON_STARTED}


def test_an_unreachable_daemon_is_an_error_naming_the_call():
    # Port 9 (discard) on loopback: nothing listens there in a test sandbox.
    with GpuWatchClient("127.0.0.1:9", timeout=2) as gw:
        with pytest.raises(GpuWatchError) as err:
            gw.list_devices()
    assert err.value.call == "ListDevices"
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _RecordingServicer(gpuwatch_pb2_grpc.GpuWatchServicer):
    def __init__(self):
        self.metadata = None

    def ListDevices(self, request, context):
        self.metadata = dict(context.invocation_metadata())
        return gpuwatch_pb2.ListDevicesResponse()


def test_the_token_is_sent_as_a_bearer_authorization_header():
    servicer = _RecordingServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gpuwatch_pb2_grpc.add_GpuWatchServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GpuWatchClient(f"127.0.0.1:{port}", token="s3cret", timeout=10) as gw:
            gw.list_devices()
    finally:
        server.stop(grace=None)
    assert servicer.metadata["authorization"] == "Bearer s3cret"


def test_cli_watch_reports_the_contract_held(daemon):
    r = run_cli("--target", daemon.target, "watch", "--frames", "5", "--interval-ms", "200")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("watch: stride 2")
    assert sum(line.startswith("frame ") for line in lines) == 5
    assert "seq contract held (stride 2" in lines[-1]


def test_cli_devices_json_is_one_parsable_object(daemon):
    r = run_cli("--target", daemon.target, "--json", "devices")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["devices"]) == DEMO_FLEET_GPUS
    assert doc["host"]["backend"] == "simulator"


def test_cli_events_stop_at_caught_up(daemon):
    r = run_cli("--target", daemon.target, "events", "--since-seq", "0")
    assert r.returncode == 0, r.stderr
    assert "daemon_started" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("caught up at seq ")


def test_cli_bad_gpu_selector_is_a_usage_error(daemon):
    r = run_cli("--target", daemon.target, "devices", "--gpu", "first")
    assert r.returncode == 2
    assert "index" in r.stderr and "UUID" in r.stderr


def test_cli_refused_request_exits_1_with_the_daemons_reason(daemon):
    r = run_cli("--target", daemon.target, "watch", "--interval-ms", "1")
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr and "minimum" in r.stderr
