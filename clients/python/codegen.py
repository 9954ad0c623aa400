"""Generates the Python gRPC stubs of gpuwatch.v1 from the repository's protos.

Why this exists: the wire contract lives in ``proto/gpuwatch/v1/*.proto`` and
nowhere else. The stubs are never committed; they are generated from those
files every time the package is built (``pip install clients/python`` runs this
through ``setup.py``) or by hand (``python clients/python/codegen.py``), so the
Python client cannot drift from the daemon.

What it owns: ``gpuwatch_client/v1/`` (generated, git-ignored). protoc names
modules after the proto path (``from gpuwatch.v1 import common_pb2``); the
imports are rewritten to relative ones so the stubs live inside the
``gpuwatch_client`` package instead of claiming a top-level ``gpuwatch`` one.

Only the standard library is imported at module level; ``grpc_tools`` (the
``grpcio-tools`` package) is needed when :func:`generate` runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The repository's proto root (``<repo>/proto``); ``GPUWATCH_PROTO_DIR`` overrides it.
DEFAULT_PROTO_ROOT = HERE.parent.parent / "proto"
#: Where the stubs go.
DEFAULT_OUT = HERE / "gpuwatch_client" / "v1"
#: The proto package's directory under the proto root.
PROTO_SUBDIR = Path("gpuwatch") / "v1"

_ABSOLUTE_IMPORT = re.compile(r"^from gpuwatch\.v1 import ", re.MULTILINE)


class CodegenError(Exception):
    """The stubs could not be generated; the message says why and what to do."""


def proto_root() -> Path:
    """The proto root to generate from."""
    env = os.environ.get("GPUWATCH_PROTO_DIR")
    return Path(env).resolve() if env else DEFAULT_PROTO_ROOT


def generate(root: Path | None = None, out: Path = DEFAULT_OUT) -> list[Path]:
    """Generates ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` into ``out``.

    Returns the files written. Raises :class:`CodegenError` when the protos or
    ``grpcio-tools`` are missing, or protoc rejects the protos.
    """
    root = root or proto_root()
    protos = sorted((root / PROTO_SUBDIR).glob("*.proto"))
    if not protos:
        raise CodegenError(
            f"no .proto files under {root / PROTO_SUBDIR}; build the Python client from a "
            "gpuwatch checkout (pip install ./clients/python) or point GPUWATCH_PROTO_DIR "
            "at the repository's proto/ directory"
        )
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError as e:
        raise CodegenError(
            "grpcio-tools is not installed; `pip install grpcio-tools` (pip install "
            "./clients/python installs it in the build environment by itself)"
        ) from e

    # protoc's bundled well-known types (google/protobuf/timestamp.proto).
    import grpc_tools

    wkt = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="gpuwatch-codegen-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{wkt}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p) for p in protos),
        ]
        status = protoc.main(args)
        if status != 0:
            raise CodegenError(f"protoc failed with status {status} on {root / PROTO_SUBDIR}")
        generated = Path(tmp) / PROTO_SUBDIR
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        written = []
        for src in sorted(generated.iterdir()):
            text = _ABSOLUTE_IMPORT.sub("from . import ", src.read_text(encoding="utf-8"))
            dst = out / src.name
            dst.write_text(text, encoding="utf-8")
            written.append(dst)
        init = out / "__init__.py"
        init.write_text(
            '"""gpuwatch.v1 stubs, generated from proto/gpuwatch/v1 by clients/python/codegen.py.'
            ' Do not edit."""\n',
            encoding="utf-8",
        )
        written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proto-root", type=Path, help=f"proto root (default: {DEFAULT_PROTO_ROOT})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output package directory")
    args = ap.parse_args(argv)
    try:
        files = generate(args.proto_root, args.out)
    except CodegenError as e:
        print(f"codegen: {e}", file=sys.stderr)
        return 1
    print(f"codegen: wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
