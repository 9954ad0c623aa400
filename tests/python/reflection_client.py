"""A client that knows nothing but the server address.

Discovers gpuwatch.v1.GpuWatch through gRPC server reflection, then lists
devices, takes a snapshot and watches a stream, checking the contract's
promises: the first Watch message is the full state, sequence numbers rise by
the stream's stride unless a gap says otherwise, and the interval is honoured.

Usage: python3 reflection_client.py HOST:PORT [--interval-ms N] [--frames N]
Exits non-zero with a message on the first broken promise.
"""

import argparse
import sys
import time

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "gpuwatch.v1.GpuWatch"


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("--interval-ms", type=int, default=0)
    ap.add_argument("--frames", type=int, default=20)
    args = ap.parse_args()

    channel = grpc.insecure_channel(args.addr)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    if SERVICE not in services:
        fail(f"{SERVICE} not advertised by reflection: {services}")
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName(SERVICE)

    def method(name):
        m = svc.FindMethodByName(name)
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        path = f"/{SERVICE}/{name}"
        if m.server_streaming:
            call = channel.unary_stream(path, request_serializer=req.SerializeToString,
                                        response_deserializer=resp.FromString)
        else:
            call = channel.unary_unary(path, request_serializer=req.SerializeToString,
                                       response_deserializer=resp.FromString)
        return req, call

    req, list_devices = method("ListDevices")
    devices = list_devices(req(), timeout=5)
    n = len(devices.devices)
    if n == 0:
        fail("no devices listed")
    for d in devices.devices:
        if not d.uuid or not d.name:
            fail(f"device without identity: {d}")
    print(f"devices: {n} on {devices.host.hostname or '?'} ({devices.host.backend}), "
          f"sampler {devices.host.sampler_interval_ms} ms")

    req, get_snapshot = method("GetSnapshot")
    snap = get_snapshot(req(), timeout=5)
    if len(snap.samples) != n:
        fail(f"snapshot has {len(snap.samples)} samples for {n} devices")
    for s in snap.samples:
        if not s.HasField("time"):
            fail("sample without time")
    print("snapshot:", json_format.MessageToDict(snap.samples[0])["uuid"], "seq", snap.seq)

    req, watch = method("Watch")
    stream = watch(req(interval_ms=args.interval_ms), timeout=60)
    first = next(stream)
    if first.WhichOneof("message") != "start":
        fail(f"first Watch message is {first.WhichOneof('message')}, not start")
    start = first.start
    if not start.HasField("current") or len(start.current.samples) != n:
        fail("start does not carry the full current state")
    stride = start.stride
    want_ms = args.interval_ms or devices.host.sampler_interval_ms
    print(f"watch: stride {stride}, interval {start.interval_ms} ms (asked {want_ms})")
    last = start.current.seq
    times = []
    frames = 0
    for msg in stream:
        kind = msg.WhichOneof("message")
        if kind == "gap":
            print("gap:", json_format.MessageToDict(msg.gap))
            last = msg.gap.last_seq + 1 - stride
            continue
        if kind != "frame":
            fail(f"unexpected message {kind}")
        f = msg.frame
        if f.seq != last + stride:
            fail(f"seq jumped from {last} to {f.seq} (stride {stride}) without a gap")
        for s in f.samples:
            if s.seq != f.seq:
                fail("sample seq differs from its frame's")
        last = f.seq
        times.append(time.monotonic())
        frames += 1
        if frames >= args.frames:
            break
    stream.cancel()
    if len(times) > 2:
        mean_ms = (times[-1] - times[0]) / (len(times) - 1) * 1000
        print(f"frames: {frames}, mean interval {mean_ms:.0f} ms")
        if abs(mean_ms - start.interval_ms) > max(0.25 * start.interval_ms, 30):
            fail(f"mean interval {mean_ms:.0f} ms, promised {start.interval_ms} ms")

    try:
        list(watch(req(interval_ms=1), timeout=5))
        fail("an interval below the sampler's was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT or "minimum" not in e.details():
            fail(f"too-short interval: {e.code()} {e.details()}")
        print("too-short interval refused:", e.details())

    req, health_check = None, None
    print("OK")


if __name__ == "__main__":
    main()
