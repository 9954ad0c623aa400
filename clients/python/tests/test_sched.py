"""Picking and leasing GPUs, control, retries, resuming streams, the asyncio
client and the fleet helper, against live simulated daemons."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from gpuwatch_client import (
    AsyncGpuWatchClient,
    Fleet,
    GpuWatchClient,
    GpuWatchError,
    expand,
)

from .conftest import CONTROL_TOKEN, LEASE_TOKEN, LEASE_TOKEN_B, READ_TOKEN, sched_daemon


def test_fifty_concurrent_leases_hand_out_each_gpu_at_most_once(sched):
    def one(i: int):
        token = LEASE_TOKEN if i % 2 else LEASE_TOKEN_B
        with GpuWatchClient(sched.target, token=token, timeout=30) as c:
            return c.lease(count=1, ttl_s=600, allow_busy=True, purpose=f"job {i}")

    barrier = threading.Barrier(50)

    def synced(i: int):
        barrier.wait()
        return one(i)

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(synced, range(50)))
    granted = [r.leases[0] for r in replies if r.satisfied]
    assert len(granted) == 4
    assert len({l.uuid for l in granted}) == 4, "a GPU was leased twice"
    refused = [r for r in replies if not r.satisfied]
    assert len(refused) == 46 and all("lease" in r.shortfall for r in refused)
    with GpuWatchClient(sched.target, token=READ_TOKEN) as c:
        assert len(c.leases().leases) == 4
        assert all(d.HasField("lease") for d in c.list_devices().devices)


def test_a_killed_holders_gpus_come_back_after_the_ttl_and_restart_keeps_live_leases(tmp_path):
    d = sched_daemon(tmp_path / "d")
    try:
        with GpuWatchClient(d.target, token=LEASE_TOKEN) as c:
            short = c.lease(count=1, ttl_s=2, allow_busy=True)
            long = c.lease(count=2, ttl_s=3600, allow_busy=True)
        assert short.satisfied and long.satisfied
        # The holder goes away without releasing; the daemon is killed too.
        d.kill()
        d = d.restart()
        with GpuWatchClient(d.target, token=READ_TOKEN, timeout=20) as c:
            ids = {l.id for l in c.leases().leases}
            assert {l.id for l in long.leases} <= ids
            deadline = time.monotonic() + 15
            while short.leases[0].id in ids and time.monotonic() < deadline:
                time.sleep(0.3)
                ids = {l.id for l in c.leases().leases}
            assert short.leases[0].id not in ids, "the short lease expired"
            assert ids == {l.id for l in long.leases}
            kinds = [
                m.event.kind
                for m in c.events(since_seq=0, until_caught_up=True)
                if m.WhichOneof("message") == "event"
            ]
            from gpuwatch_client.v1 import events_pb2

            assert events_pb2.EVENT_KIND_LEASE_EXPIRED in kinds
            assert kinds.count(events_pb2.EVENT_KIND_LEASE_GRANTED) == 3
    except AssertionError as e:
        raise AssertionError(f"{e}\ndaemon log:\n{''.join(d.log)}") from None
    finally:
        d.stop()


def test_errors_carry_status_and_message_and_roles_are_enforced(sched):
    with GpuWatchClient(sched.target, token=READ_TOKEN) as reader:
        pick = reader.pick(count=2, min_free_bytes=1 << 50, allow_busy=True)
        assert not pick.satisfied and "free_memory" in pick.shortfall
        with pytest.raises(GpuWatchError) as e:
            reader.lease(count=1, allow_busy=True)
        assert e.value.status == grpc.StatusCode.PERMISSION_DENIED
        assert "lease" in e.value.details
        with pytest.raises(GpuWatchError) as e:
            reader.set_threshold([0], 75)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    with GpuWatchClient(sched.target, token=LEASE_TOKEN) as a, GpuWatchClient(
        sched.target, token=LEASE_TOKEN_B
    ) as b:
        got = a.lease(count=1, ttl_s=60, allow_busy=True)
        with pytest.raises(GpuWatchError) as e:
            b.release([got.leases[0].id])
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert a.renew([got.leases[0].id], ttl_s=120).leases[0].ttl_s == 120
        assert [l.id for l in a.release([got.leases[0].id]).released] == [got.leases[0].id]


def test_control_calls(sched):
    with GpuWatchClient(sched.target, token=CONTROL_TOKEN) as ops:
        r = ops.set_threshold([0], 75, hysteresis_c=4)
        assert r.results[0].threshold_c == 75
        ops.set_threshold([0], restore_default=True)
        p = ops.set_power_limit([1], 500.0)
        assert p.results[0].ceiling_mw == 500_000
        ops.set_power_limit([1], restore_default=True)
        assert len(ops.reset_clocks(["all"]).results) == 4
        with pytest.raises(ValueError):
            ops.set_power_limit([0])


def test_unavailable_is_retried_with_backoff_then_raised():
    c = GpuWatchClient("127.0.0.1:1", timeout=1, retries=2, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(GpuWatchError) as e:
        c.list_devices()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10
    c.close()


def test_watch_and_events_resume_after_a_restart(tmp_path):
    d = sched_daemon(tmp_path / "r")
    try:
        with GpuWatchClient(d.target, token=READ_TOKEN, backoff=0.1) as c:
            frames = []
            kinds = []
            restarted = threading.Event()
            for msg in c.watch(reconnect=True):
                kind = msg.WhichOneof("message")
                kinds.append(kind)
                if kind == "frame":
                    frames.append(msg.frame.seq)
                if len(frames) == 5 and not restarted.is_set():
                    restarted.set()
                    d = d.restart()
                if len(frames) >= 10:
                    break
            assert kinds.count("start") == 2, "reconnected once"
            assert frames == sorted(frames), "seq keeps rising across the restart"
            events = []
            for msg in c.events(since_seq=0, reconnect=True):
                if msg.WhichOneof("message") == "event":
                    events.append(msg.event.seq)
                if msg.WhichOneof("message") == "caught_up":
                    break
            assert events == sorted(set(events))
    finally:
        d.stop()


def test_async_client(sched):
    async def main():
        async with AsyncGpuWatchClient(sched.target, token=LEASE_TOKEN) as c:
            devices = await c.list_devices()
            assert len(devices.devices) == 4
            replies = await asyncio.gather(
                *(c.lease(count=1, ttl_s=60, allow_busy=True) for _ in range(10))
            )
            granted = [r.leases[0].uuid for r in replies if r.satisfied]
            assert len(granted) == 4 and len(set(granted)) == 4
            await c.release([l.id for r in replies for l in r.leases])
            assert (await c.leases()).leases == []
            n = 0
            async for msg in c.watch():
                if msg.WhichOneof("message") == "frame":
                    n += 1
                    if n == 3:
                        break
            caught = [m async for m in c.events(since_seq=0, until_caught_up=True)]
            assert caught[-1].WhichOneof("message") == "caught_up"
            with pytest.raises(GpuWatchError) as e:
                await c.set_threshold([0], 75)
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(main())


def test_fleet_reports_partial_failure_and_picks_across_hosts(sched, tmp_path):
    other = sched_daemon(tmp_path / "other")
    try:
        with Fleet(
            [sched.target, other.target, "127.0.0.1:1"], token=LEASE_TOKEN, timeout=3, retries=0
        ) as fleet:
            listed = fleet.call(lambda c: c.list_devices())
            assert set(listed.ok) == {sched.target, other.target}
            assert list(listed.failed) == ["127.0.0.1:1"]
            pick = fleet.pick(6, lease_ttl_s=60, allow_busy=True)
            assert pick.satisfied
            assert sum(len(v.split(",")) for v in pick.cuda_visible_devices.values()) == 6
            assert sum(len(v) for v in pick.leases.values()) == 6
            rest = fleet.pick(3, lease_ttl_s=60, allow_busy=True)
            assert not rest.satisfied
    finally:
        other.stop()


def test_a_name_with_several_addresses_expands_to_all(monkeypatch):
    import socket

    def fake(host, port, *args, **kwargs):
        assert host == "gpuwatch.gpus.svc"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.3", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert expand(["gpuwatch.gpus.svc:9450", "10.0.0.1"]) == [
        "127.0.0.2:9450",
        "127.0.0.3:9450",
        "10.0.0.1:9450",
    ]
