"""Cross-file checks of the deployment files that no single linter can make.

Used by .ci/deploy.sh (needs PyYAML, which kubernetes-validate brings, and
target/release/gpuwatch-server). Each check prints "ok: ..." or "FAIL: ...";
the last line is "deploy_checks: N passed, M failed" and the exit status is 1
when anything failed.

- Dockerfile: every COPY source (not --from a stage) exists in the checkout
  and is sent in the build context (.dockerignore is an allowlist); every
  `cargo build` names its binaries, and each one's source is copied in before
  the build that compiles it; the ENV the image sets is a configuration the
  daemon accepts.
- Kubernetes: the ConfigMap's gpuwatch.toml passes `--check-config`; the
  DaemonSet reads it from where the ConfigMap is mounted; the ports the config
  listens on are the container ports the probes and the Service use; the
  Service selects the DaemonSet's pods; the Prometheus annotations name the
  HTTP port; the state volume is mounted where the config keeps state; the
  kustomization lists every manifest.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
SERVER = Path(os.environ.get("GPUWATCH_SERVER_BIN", REPO / "target/release/gpuwatch-server"))

results = {"passed": 0, "failed": 0}


def check(ok: bool, what: str, detail: str = "") -> None:
    if ok:
        results["passed"] += 1
        print(f"ok: {what}")
    else:
        results["failed"] += 1
        print(f"FAIL: {what}{': ' + detail if detail else ''}")


def dockerfile_instructions() -> list[tuple[str, str]]:
    out, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, line.lstrip("!").strip("/")))
    return patterns


def _segments_match(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_segments_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and _segments_match(
        pattern[1:], path[1:])


def ignored(patterns: list[tuple[bool, str]], rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides."""
    parts = rel.split("/")
    excluded = False
    for negated, pattern in patterns:
        pat = pattern.split("/")
        if any(_segments_match(pat, parts[:n]) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def check_dockerfile() -> None:
    patterns = dockerignore_patterns()
    for keyword, args in dockerfile_instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        for source in paths[:-1]:
            path = REPO / source
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            check(path.exists() and bool(files), f"Dockerfile COPY source {source} exists")
            kept_out = [str(f.relative_to(REPO)) for f in files
                        if ignored(patterns, str(f.relative_to(REPO)))]
            check(not kept_out, f"Dockerfile COPY source {source} is in the build context",
                  f".dockerignore excludes {kept_out[:3]}")
    check_dockerfile_builds()
    env = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    r = subprocess.run([str(SERVER), "--check-config"], env=env, capture_output=True, text=True,
                       timeout=60)
    check(r.returncode == 0, "the image's ENV is a valid gpuwatch configuration", r.stderr.strip())


def check_dockerfile_builds() -> None:
    """The image builds the two shipped packages of the workspace by name
    (`-p`), after copying every member (cargo reads them all to resolve the
    workspace), with the registry and target directory in cache mounts
    instead of placeholder sources; and it ships exactly those packages'
    binaries."""
    root = tomllib.loads((REPO / "Cargo.toml").read_text())
    members = root.get("workspace", {}).get("members", [])
    packages = {}
    for member in members:
        manifest = tomllib.loads((REPO / member / "Cargo.toml").read_text())
        packages[manifest["package"]["name"]] = (member, [b["name"] for b in manifest.get("bin", [])])
    copied: list[str] = []
    builds = 0
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in args:
            copied += [w.rstrip("/") for w in shlex.split(args)[:-1] if not w.startswith("--")]
        if keyword != "RUN" or "cargo build" not in args:
            continue
        builds += 1
        words = shlex.split(args)
        check("--workspace" not in words and "--bins" not in words,
              f"Dockerfile cargo build #{builds} names the packages it ships",
              "building the whole workspace would compile the benchmark harness and test kit")
        named = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-p", "--package")]
        check(sorted(named) == ["gpuwatch-client", "gpuwatch-server"],
              f"Dockerfile cargo build #{builds} builds gpuwatch-server and gpuwatch-client",
              f"packages named: {named}")
        for member in members:
            top = member.split("/")[0] if member != "." else None
            if top:
                check(top in copied, f"Dockerfile copies {top}/ (a workspace member) before building")
        check("type=cache,target=/usr/local/cargo/registry" in args,
              f"Dockerfile cargo build #{builds} keeps the registry in a cache mount")
        shipped = [w.rsplit("/", 1)[-1] for w in words if w.startswith("target/release/")]
        declared = sorted(b for n in named for b in packages.get(n, ("", []))[1])
        check(sorted(shipped) == declared,
              f"Dockerfile cargo build #{builds} ships exactly the binaries of its packages",
              f"shipped {shipped}, declared {declared}")
    check(builds == 1, "Dockerfile builds once, without placeholder sources",
          f"{builds} cargo build steps")


def load_manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc | {"_file": path.name}
    return docs


def listen_port(config_text: str, key: str) -> int | None:
    m = re.search(rf'^\s*{key}\s*=\s*"[^"]*:(\d+)"', config_text, re.MULTILINE)
    return int(m.group(1)) if m else None


def check_kubernetes() -> None:
    docs = load_manifests()
    for kind in ("Namespace", "ConfigMap", "DaemonSet", "Service", "Kustomization"):
        check(kind in docs, f"deploy/kubernetes has a {kind}")
    cm, ds, svc, kust = (docs.get(k, {}) for k in ("ConfigMap", "DaemonSet", "Service",
                                                     "Kustomization"))
    listed = set(kust.get("resources", []))
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    check(listed == manifests, "kustomization.yaml lists every manifest",
          f"lists {sorted(listed)}, directory has {sorted(manifests)}")

    config_text = cm.get("data", {}).get("gpuwatch.toml", "")
    # The token file comes from a Secret on the cluster; stand one in here so
    # --check-config (which reads it) checks the rest of the file.
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f, \
            tempfile.NamedTemporaryFile("w", suffix=".toml") as tokens:
        tokens.write('[[tokens]]\nname = "ops"\nrole = "control"\ntoken = "0123456789abcdef0123"\n')
        tokens.flush()
        f.write(re.sub(r'(?m)^(\s*token_file\s*=\s*)".*"', lambda m: f'{m.group(1)}"{tokens.name}"',
                       config_text))
        f.flush()
        r = subprocess.run([str(SERVER), "--config", f.name, "--check-config"], env={},
                           capture_output=True, text=True, timeout=60)
    check(r.returncode == 0, "the ConfigMap's gpuwatch.toml passes --check-config",
          r.stderr.strip())

    pod = ds.get("spec", {}).get("template", {})
    spec = pod.get("spec", {})
    container = (spec.get("containers") or [{}])[0]
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    args = container.get("args", [])
    config_path = args[args.index("--config") + 1] if "--config" in args else None
    config_volume = next((n for n, v in volumes.items()
                          if v.get("configMap", {}).get("name") == cm.get("metadata", {}).get("name")),
                         None)
    check(config_path is not None and config_volume is not None
          and config_path == f"{mounts.get(config_volume)}/gpuwatch.toml",
          "the DaemonSet reads --config from the mounted ConfigMap",
          f"--config {config_path}, ConfigMap mounted at {mounts.get(config_volume)}")

    state = re.search(r'^\s*state_dir\s*=\s*"([^"]+)"', config_text, re.MULTILINE)
    state_volume = next((n for n, v in volumes.items()
                         if v.get("hostPath", {}).get("path") == (state.group(1) if state else None)),
                        None)
    check(state is not None and mounts.get(state_volume) == state.group(1),
          "the hostPath state volume is mounted at the config's state_dir")
    # Attribution: the host's PIDs and the kubelet's pod-resources socket.
    check(spec.get("hostPID") is True,
          "the DaemonSet runs in the host's PID namespace (attribution reads host PIDs' cgroups)")
    pr = next((n for n, v in volumes.items()
               if v.get("hostPath", {}).get("path") == "/var/lib/kubelet/pod-resources"), None)
    pr_mount = next((m for m in container.get("volumeMounts", []) if m["name"] == pr), {})
    check(pr is not None and pr_mount.get("mountPath") == "/var/lib/kubelet/pod-resources"
          and pr_mount.get("readOnly") is True,
          "the kubelet's pod-resources directory is mounted read-only where the config expects it")

    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    check(ports.get("grpc") == listen_port(config_text, "listen"),
          "container port grpc is the config's server.listen port")
    check(ports.get("http") == listen_port(config_text, "http_listen"),
          "container port http is the config's server.http_listen port")
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(probe_name, {})
        port = (probe.get("httpGet") or probe.get("grpc") or {}).get("port")
        check(port in ports or port in ports.values(),
              f"{probe_name} uses a declared container port", f"port {port}")
    check(container.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
          "the liveness probe asks /healthz")

    labels = pod.get("metadata", {}).get("labels", {})
    selector = svc.get("spec", {}).get("selector", {})
    check(bool(selector) and all(labels.get(k) == v for k, v in selector.items()),
          "the Service selects the DaemonSet's pods")
    for sp in svc.get("spec", {}).get("ports", []):
        check(sp.get("targetPort") in ports, f"Service port {sp.get('name')} targets a named container port")
    for what, meta in (("Service", svc.get("metadata", {})), ("pod", pod.get("metadata", {}))):
        ann = meta.get("annotations", {})
        check(ann.get("prometheus.io/port") == str(ports.get("http"))
              and ann.get("prometheus.io/path") == "/metrics",
              f"the {what}'s Prometheus annotations point at /metrics on the HTTP port")
    sec = container.get("securityContext", {})
    caps = sec.get("capabilities", {})
    check(caps.get("drop") == ["ALL"] and caps.get("add") == ["SYS_ADMIN"]
          and sec.get("allowPrivilegeEscalation") is False and not sec.get("privileged"),
          "the container drops every capability but SYS_ADMIN and is not privileged")
    check(spec.get("runtimeClassName") == "nvidia", "the DaemonSet uses the nvidia RuntimeClass")
    namespaces = {d.get("metadata", {}).get("namespace") for d in (cm, ds, svc)}
    check(namespaces == {docs.get("Namespace", {}).get("metadata", {}).get("name")},
          "every object lives in the manifests' Namespace", f"{namespaces}")


def main() -> int:
    if not SERVER.is_file():
        print(f"error: {SERVER} not found; run `cargo build --release`", file=sys.stderr)
        return 1
    check_dockerfile()
    check_kubernetes()
    print(f"deploy_checks: {results['passed']} passed, {results['failed']} failed")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
