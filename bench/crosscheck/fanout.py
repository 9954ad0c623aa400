"""Independent cross-check of gpuwatch-bench's fan-out figure: Watch
subscribers written with grpcio's asyncio API (Google's gRPC core, not
tonic/h2), counting delivery and sample->client latency the same way.

Usage (run by bench/crosscheck.sh, which generates the stubs):
    python fanout.py --target 127.0.0.1:PORT --stubs DIR --subscribers 1000 \
        --connections 4 --interval-ms 100 --warmup 5 --window 30 [--processes 2]

Prints one JSON object: delivered/owed frames, gaps, out-of-contract jumps,
latency p50/p99/max (ms) over every sample of every frame received in the
window, and this checker's own CPU (it shares the cores with the daemon).
Subscribers are split over --processes worker processes (Python runs one
core per process); each process opens its own --connections channels.
"""

import argparse
import array
import asyncio
import json
import multiprocessing
import os
import resource
import sys
import time


def load_stubs(stubs):
    sys.path.insert(0, stubs)
    import grpc  # noqa: F401
    from gpuwatch.v1 import gpuwatch_pb2, gpuwatch_pb2_grpc, telemetry_pb2  # noqa: F401

    return gpuwatch_pb2, gpuwatch_pb2_grpc


async def subscriber(stub, pb, interval_ms, clock, tally):
    stream = stub.Watch(pb.WatchRequest(interval_ms=interval_ms))
    stride = 1
    last = None
    after_gap = False
    try:
        async for msg in stream:
            kind = msg.WhichOneof("message")
            now = time.time()
            if kind == "start":
                stride = max(1, msg.start.stride)
                tally["stride"] = stride
                if msg.start.HasField("current"):
                    last = msg.start.current.seq
                    tally["seqs"].append(last)
                tally["started"] += 1
            elif kind == "gap":
                tally["gaps"] += 1
                tally["missed"] += msg.gap.missed
                after_gap = True
            elif kind == "frame":
                f = msg.frame
                if last is not None and not after_gap and f.seq != last + stride:
                    tally["violations"] += 1
                after_gap = False
                last = f.seq
                tally["seqs"].append(f.seq)
                if clock["recording"]:
                    lat = tally["lat"]
                    for s in f.samples:
                        lat.append(now - (s.time.seconds + s.time.nanos * 1e-9))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a stream error is a finding, not a crash
        tally["errors"] += 1
        tally["first_error"] = tally["first_error"] or str(e)[:200]


async def latest_seq(channel, pb, pb_grpc):
    stub = pb_grpc.GpuWatchStub(channel)
    snap = await stub.GetSnapshot(pb.GetSnapshotRequest())
    return snap.seq


async def worker_main(args, count, conn, out):
    import grpc

    pb, pb_grpc = load_stubs(args.stubs)
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.connections)
    ]
    clock = {"recording": False}
    tallies = []
    tasks = []
    for i in range(count):
        t = {"seqs": [], "lat": array.array("f"), "gaps": 0, "missed": 0, "violations": 0, "errors": 0,
             "first_error": None, "started": 0, "stride": 1}
        tallies.append(t)
        stub = pb_grpc.GpuWatchStub(channels[i % len(channels)])
        tasks.append(asyncio.create_task(subscriber(stub, pb, args.interval_ms, clock, t)))
    deadline = time.time() + 60
    while sum(t["started"] for t in tallies) < count and time.time() < deadline:
        await asyncio.sleep(0.05)
    conn.send("started")
    # The parent says when the window opens and closes.
    loop = asyncio.get_running_loop()
    msg = await loop.run_in_executor(None, conn.recv)
    assert msg == "open"
    clock["recording"] = True
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    msg = await loop.run_in_executor(None, conn.recv)
    assert msg == "close"
    clock["recording"] = False
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(2)  # owed frames arrive
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    out.put({"tallies": [{k: v for k, v in t.items()} for t in tallies], "cpu": cpu})


def worker(args, count, conn, out):
    asyncio.run(worker_main(args, count, conn, out))
    # Hand the tally over, then leave without running interpreter shutdown
    # hooks: grpcio's can hang at exit, which would keep the parent waiting.
    out.close()
    out.join_thread()
    os._exit(0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--stubs", required=True)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--window", type=float, default=30)
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args()

    import grpc

    pb, pb_grpc = load_stubs(args.stubs)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    pipes, procs = [], []
    per = [args.subscribers // args.processes + (1 if i < args.subscribers % args.processes else 0)
           for i in range(args.processes)]
    for n in per:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(args, n, child, out), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        if not pipe.poll(90) or pipe.recv() != "started":
            sys.exit("subscribers did not start within 90 s")
    time.sleep(args.warmup)

    async def seq():
        async with grpc.aio.insecure_channel(args.target) as ch:
            return await latest_seq(ch, pb, pb_grpc)

    lo = asyncio.run(seq())
    t0 = time.time()
    for pipe in pipes:
        pipe.send("open")
    time.sleep(args.window)
    for pipe in pipes:
        pipe.send("close")
    wall = time.time() - t0
    hi = asyncio.run(seq())
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)

    delivered = owed = gaps = violations = errors = 0
    first_error = None
    lat = array.array("f")
    cpu = 0.0
    for r in results:
        cpu += r["cpu"]
        for t in r["tallies"]:
            seqs = t["seqs"]
            stride = t["stride"]
            got = sum(1 for s in seqs if lo < s <= hi)
            anchor = max((s for s in seqs if s <= lo), default=None)
            due = (hi - anchor) // stride if anchor is not None and t["gaps"] == 0 else got + t["missed"]
            delivered += got
            owed += max(due, got)
            gaps += t["gaps"]
            violations += t["violations"]
            errors += t["errors"]
            first_error = first_error or t["first_error"]
            lat.extend(t["lat"])
    lat = sorted(lat)

    def q(x):
        return round(lat[min(len(lat) - 1, int(x * (len(lat) - 1)))] * 1000, 3) if lat else None

    print(json.dumps({
        "subscribers": args.subscribers, "connections_per_process": args.connections,
        "processes": args.processes, "window_s": round(wall, 2),
        "delivered": delivered, "owed": owed,
        "delivered_pct": round(100.0 * delivered / owed, 3) if owed else None,
        "gaps": gaps, "violations": violations, "errors": errors, "first_error": first_error,
        "latency_samples": len(lat), "latency_p50_ms": q(0.5), "latency_p99_ms": q(0.99),
        "latency_max_ms": round(lat[-1] * 1000, 3) if lat else None,
        "checker_cpu_pct_of_core": round(100.0 * cpu / wall, 1),
    }))


if __name__ == "__main__":
    main()
