#!/usr/bin/env python3
"""Keeps the PrometheusRule manifest generated from the plain rules file.

deploy/prometheus/gpuwatch-rules.yml is the one source of gpuwatch's alert
rules; deploy/prometheus/gpuwatch-prometheusrule.yaml carries the same
groups as a monitoring.coreos.com/v1 PrometheusRule for the Prometheus
Operator. `--write` regenerates the manifest; `--check` (CI) fails, naming
the first difference, when the manifest's groups are not the rules file's.

Needs PyYAML (Debian: python3-yaml).
"""
import argparse
import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/gpuwatch-rules.yml"
MANIFEST = ROOT / "deploy/prometheus/gpuwatch-prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/gpuwatch-rules.yml by
# `.ci/rules_sync.py --write`; do not edit by hand (CI checks they match).
# gpuwatch's alert rules as a PrometheusRule for the Prometheus Operator.
# Its `release` label (or whatever your Prometheus's ruleSelector matches)
# may need changing.
"""


class Literal(str):
    """A string written as a YAML block scalar."""


def literal(dumper, value):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


def as_block(node):
    if isinstance(node, dict):
        return {k: as_block(v) for k, v in node.items()}
    if isinstance(node, list):
        return [as_block(v) for v in node]
    if isinstance(node, str) and "\n" in node:
        return Literal(node)
    return node


def manifest(groups):
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "gpuwatch",
            "labels": {
                "app.kubernetes.io/name": "gpuwatch",
                "app.kubernetes.io/component": "alert-rules",
                "release": "prometheus",
            },
        },
        "spec": {"groups": groups},
    }


def first_difference(a, b, path="groups"):
    if type(a) is not type(b):
        return f"{path}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'the manifest' if k in b else 'the rules file'}"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} entries in the rules file, {len(b)} in the manifest"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the manifest")
    mode.add_argument("--check", action="store_true", help="fail when the manifest differs")
    args = parser.parse_args()
    groups = yaml.safe_load(RULES.read_text())["groups"]
    if args.write:
        yaml.add_representer(Literal, literal)
        text = yaml.dump(as_block(manifest(groups)), sort_keys=False, allow_unicode=True, width=1000)
        MANIFEST.write_text(HEADER + text)
        print(f"wrote {MANIFEST.relative_to(ROOT)}")
        return 0
    doc = yaml.safe_load(MANIFEST.read_text())
    if doc.get("kind") != "PrometheusRule" or doc.get("apiVersion") != "monitoring.coreos.com/v1":
        print(f"{MANIFEST.relative_to(ROOT)}: not a monitoring.coreos.com/v1 PrometheusRule", file=sys.stderr)
        return 1
    diff = first_difference(groups, doc.get("spec", {}).get("groups"))
    if diff:
        print(
            f"{MANIFEST.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)} at {diff}; "
            "run .ci/rules_sync.py --write",
            file=sys.stderr,
        )
        return 1
    print(f"{MANIFEST.relative_to(ROOT)} holds the same {sum(len(g['rules']) for g in groups)} rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
