"""``gpuwatch-py``: a small command line over :class:`GpuWatchClient`.

Why this exists: it is the runnable example of the Python client (CI runs it
against a live daemon) and a handy probe for operators on hosts that have
Python but not the Rust CLI. It lists devices, takes a snapshot, watches N
frames while checking the sequence-number contract, and reads events until the
replay has caught up. ``--json`` prints one JSON object per message (protobuf
field names) for scripts.

Exit status: 0 success, 1 the daemon refused or could not be reached, 2 bad
command line, 3 the daemon broke the stream contract.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timezone
from typing import Optional

from google.protobuf import json_format

from .client import DEFAULT_TARGET, EVENT_KINDS, GpuWatchClient, GpuWatchError, selector
from .contract import ContractViolation, EventsContract, WatchContract
from .v1 import common_pb2, control_pb2, events_pb2, gpuwatch_pb2

EXIT_RPC = 1
EXIT_USAGE = 2
EXIT_CONTRACT = 3


def _enum_name(enum, value: int, prefix: str) -> str:
    try:
        return enum.Name(value)[len(prefix):].lower()
    except ValueError:
        return str(value)


def _watts(mw: Optional[int]) -> str:
    return "-" if mw is None else f"{mw / 1000:.0f}"


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def _json(msg) -> str:
    return json.dumps(
        json_format.MessageToDict(msg, preserving_proto_field_name=True), sort_keys=True
    )


def _print(text: str) -> None:
    print(text, flush=True)


def cmd_devices(gw: GpuWatchClient, args) -> int:
    resp = gw.list_devices(args.gpu)
    if args.json:
        _print(_json(resp))
        return 0
    h = resp.host
    _print(
        f"host {h.hostname} ({h.backend}, gpuwatch {h.daemon_version}): "
        f"{len(resp.devices)} GPUs, sampler {h.sampler_interval_ms} ms, "
        f"history {h.history_frames} frames"
    )
    _print(f"{'IDX':<4} {'UUID':<42} {'NAME':<26} {'LIMIT W (min-max)':<18} {'HEALTH':<7} GOVERNOR")
    for d in resp.devices:
        pl = d.power_limits
        p = d.policy
        current = _opt(pl, "current_mw") or _opt(p, "current_limit_mw") or _opt(pl, "default_mw")
        limits = f"{_watts(current)} ({_watts(_opt(pl, 'min_mw'))}-{_watts(_opt(pl, 'max_mw'))})"
        governor = (
            f"{_enum_name(control_pb2.GovernorMode, p.mode, 'GOVERNOR_MODE_')}/"
            f"{_enum_name(common_pb2.GovernorState, p.state, 'GOVERNOR_STATE_')}, "
            f"threshold {p.threshold_c} C"
        )
        health = _enum_name(common_pb2.GpuHealth, d.health, "GPU_HEALTH_")
        _print(f"{d.index:<4} {d.uuid:<42} {d.name[:26]:<26} {limits:<18} {health:<7} {governor}")
    return 0


def _sample_line(s) -> str:
    temp = f"{s.temperature_c}C" if s.HasField("temperature_c") else "-C"
    power = f"{_watts(_opt(s, 'power_draw_mw'))}/{_watts(_opt(s, 'power_limit_mw'))}W"
    util = f"{s.utilization_gpu_pct}%" if s.HasField("utilization_gpu_pct") else "-%"
    health = "" if s.health == common_pb2.GPU_HEALTH_OK else (
        " " + _enum_name(common_pb2.GpuHealth, s.health, "GPU_HEALTH_")
    )
    return f"gpu{s.index} {temp} {power} {util}{health}"


def cmd_snapshot(gw: GpuWatchClient, args) -> int:
    resp = gw.snapshot(args.gpu)
    if args.json:
        _print(_json(resp))
        return 0
    _print(f"seq {resp.seq}: " + " | ".join(_sample_line(s) for s in resp.samples))
    return 0


def cmd_watch(gw: GpuWatchClient, args) -> int:
    contract = WatchContract(resume_after_seq=args.resume_after)
    deadline = args.deadline
    if deadline is None and args.frames:
        deadline = 30.0 + args.frames * max(args.interval_ms, 100) * 2 / 1000
    stream = gw.watch(
        interval_ms=args.interval_ms,
        gpus=args.gpu,
        resume_after_seq=args.resume_after,
        deadline=deadline,
        contract=contract,
    )
    try:
        for msg in stream:
            kind = msg.WhichOneof("message")
            if args.json:
                _print(_json(msg))
            elif kind == "start":
                st = msg.start
                _print(
                    f"watch: stride {st.stride} ({st.interval_ms} ms; sampler "
                    f"{st.sampler_interval_ms} ms), {len(st.devices)} GPUs, history "
                    f"{st.oldest_seq}..{st.latest_seq}"
                )
                if st.HasField("current"):
                    _print(f"current {st.current.seq}: " + " | ".join(
                        _sample_line(s) for s in st.current.samples))
            elif kind == "frame":
                f = msg.frame
                _print(f"frame {f.seq}: " + " | ".join(_sample_line(s) for s in f.samples))
            else:
                g = msg.gap
                reason = _enum_name(gpuwatch_pb2.GapReason, g.reason, "GAP_REASON_")
                _print(f"gap {g.first_seq}..{g.last_seq} ({reason}, {g.missed} missed"
                       f"{', daemon restarted' if g.restarted else ''})")
            if args.frames and contract.frames >= args.frames:
                break
    finally:
        stream.close()
    summary = (
        f"watched {contract.frames} frames, {len(contract.gaps)} gaps, {contract.missed} missed; "
        f"seq contract held (stride {contract.stride}, last seq {contract.last_seq})"
    )
    print(summary, file=sys.stderr if args.json else sys.stdout, flush=True)
    return 0


def _event_line(e) -> str:
    when = e.time.ToDatetime(tzinfo=timezone.utc).isoformat(timespec="seconds")
    kind = _enum_name(events_pb2.EventKind, e.kind, "EVENT_KIND_")
    severity = _enum_name(events_pb2.Severity, e.severity, "SEVERITY_")
    gpu = f"gpu{e.gpu_index}" if e.HasField("gpu_index") else "-"
    return f"#{e.seq} {when} {kind} {gpu} {e.actor.name or '-'} {severity}: {e.reason}"


def cmd_events(gw: GpuWatchClient, args) -> int:
    kinds = []
    for k in args.kind:
        if k not in EVENT_KINDS:
            print(f"gpuwatch-py: unknown event kind {k!r}; allowed: {', '.join(sorted(EVENT_KINDS))}",
                  file=sys.stderr)
            return EXIT_USAGE
        kinds.append(EVENT_KINDS[k])
    contract = EventsContract(since_seq=args.since_seq)
    stream = gw.events(
        since_seq=args.since_seq,
        gpus=args.gpu,
        kinds=kinds,
        until_caught_up=not args.follow,
        deadline=args.deadline,
        contract=contract,
    )
    seen = 0
    try:
        for msg in stream:
            kind = msg.WhichOneof("message")
            if args.json:
                _print(_json(msg))
            elif kind == "event":
                _print(_event_line(msg.event))
            elif kind == "caught_up":
                _print(f"caught up at seq {msg.caught_up.latest_seq}: "
                       f"{contract.replayed} events replayed")
            else:
                g = msg.gap
                _print(f"gap {g.first_seq}..{g.last_seq}: {g.missed} events no longer retained")
            if kind == "event":
                seen += 1
                if args.max and seen >= args.max:
                    break
    finally:
        stream.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="gpuwatch-py",
        description="List GPUs, watch telemetry and read events from a gpuwatch daemon.",
        epilog="Examples:\n"
        "  gpuwatch-py devices\n"
        "  gpuwatch-py --target node1:9450 watch --frames 50 --interval-ms 500\n"
        "  gpuwatch-py events --since-seq 0\n"
        "  gpuwatch-py --ca ca.pem --token $TOKEN devices --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--target", default=os.environ.get("GPUWATCH_TARGET", DEFAULT_TARGET),
                    help="daemon address HOST:PORT (env GPUWATCH_TARGET; default %(default)s)")
    ap.add_argument("--token", default=os.environ.get("GPUWATCH_TOKEN"),
                    help="bearer token sent as 'authorization: Bearer TOKEN' (env GPUWATCH_TOKEN)")
    ap.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    ap.add_argument("--ca", metavar="FILE", help="CA certificate (PEM) to verify the daemon; implies TLS")
    ap.add_argument("--cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    ap.add_argument("--key", metavar="FILE", help="client private key (PEM) for mutual TLS")
    ap.add_argument("--server-name", metavar="NAME",
                    help="name expected in the daemon's certificate, when it differs from HOST")
    ap.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                    help="deadline of each call (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="one JSON object per message")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def gpu_arg(p):
        p.add_argument("--gpu", action="append", default=[], type=_gpu, metavar="GPU",
                       help="an index, a UUID or 'all' (repeatable; default every GPU)")

    p = sub.add_parser("devices", help="identity, limits and governor policy of each GPU")
    gpu_arg(p)
    p.set_defaults(run=cmd_devices)

    p = sub.add_parser("snapshot", help="the latest sample of each GPU")
    gpu_arg(p)
    p.set_defaults(run=cmd_snapshot)

    p = sub.add_parser("watch", help="stream frames, checking the seq/stride/gap contract")
    gpu_arg(p)
    p.add_argument("--frames", type=_count, default=10,
                   help="stop after this many frames; 0 = until interrupted (default %(default)s)")
    p.add_argument("--interval-ms", type=_count, default=0,
                   help="frame interval; 0 = the sampler's (default %(default)s)")
    p.add_argument("--resume-after", type=_count, metavar="SEQ",
                   help="replay frames after this seq from the daemon's history")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="give up after this long (default: generous for --frames)")
    p.set_defaults(run=cmd_watch)

    p = sub.add_parser("events", help="replay retained events, then stop (or --follow)")
    gpu_arg(p)
    p.add_argument("--since-seq", type=_count, default=0, metavar="SEQ",
                   help="replay events after this seq (default 0: all retained)")
    p.add_argument("--kind", action="append", default=[], metavar="KIND",
                   help="only this kind, e.g. gpu_lost, power_limit_changed (repeatable)")
    p.add_argument("--follow", action="store_true", help="keep printing live events")
    p.add_argument("--max", type=_count, default=0, help="stop after this many events")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="give up after this long (default: --timeout without --follow)")
    p.set_defaults(run=cmd_events)
    return ap


def _gpu(text: str):
    try:
        return selector(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative; use 0 or more")
    return n


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with GpuWatchClient(
            args.target,
            token=args.token,
            tls=args.tls,
            ca_file=args.ca,
            cert_file=args.cert,
            key_file=args.key,
            server_name=args.server_name,
            timeout=args.timeout,
        ) as gw:
            return args.run(gw, args)
    except ValueError as e:
        print(f"gpuwatch-py: {e}", file=sys.stderr)
        return EXIT_USAGE
    except GpuWatchError as e:
        print(f"gpuwatch-py: {args.target}: {e}", file=sys.stderr)
        return EXIT_RPC
    except ContractViolation as e:
        print(f"gpuwatch-py: {args.target}: contract violated: {e}", file=sys.stderr)
        return EXIT_CONTRACT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `gpuwatch-py watch | head`: the reader left; not an error.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
