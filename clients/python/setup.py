"""Build hook: generate the gpuwatch.v1 stubs from the repository's protos.

Everything about the package is declared in pyproject.toml; this file only runs
codegen.py before setuptools looks at the packages, so every build (pip
install, wheel, editable install) ships stubs that match the protos it was
built from. ``grpcio-tools`` comes from ``[build-system] requires``.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def generate_stubs() -> None:
    spec = importlib.util.spec_from_file_location("gpuwatch_codegen", HERE / "codegen.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"gpuwatch-client: cannot load {HERE / 'codegen.py'}")
    codegen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codegen)
    try:
        files = codegen.generate()
    except codegen.CodegenError as e:
        raise SystemExit(f"gpuwatch-client: {e}") from e
    print(f"gpuwatch-client: generated {len(files)} stub files from {codegen.proto_root()}")


generate_stubs()
setup()
