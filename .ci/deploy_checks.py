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
  kustomization lists every manifest; the NetworkPolicy selects the
  DaemonSet's pods, lets in both ports and nothing else, and allows no egress;
  the token file (and, in the TLS variant, the certificate and key) come from
  the Secrets mounted where the config points; the probes use HTTP(S)
  /healthz where TLS is on (the kubelet's gRPC probe speaks no TLS), with the
  scheme the HTTP listener speaks; the memory request and limit are set.
- The TLS variant (deploy/kubernetes-tls, a kustomize overlay): the same
  checks on its rendering (`kubectl kustomize`, passed in as
  GPUWATCH_TLS_RENDERED), plus its own.
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


def load_manifests(paths: list[Path]) -> dict[str, dict]:
    docs = {}
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc | {"_file": path.name}
    return docs


def toml_path(config_text: str, key: str) -> str | None:
    m = re.search(rf'^\s*{key}\s*=\s*"([^"]+)"', config_text, re.MULTILINE)
    return m.group(1) if m else None


def stand_in_files(config_text: str, tmp: Path) -> str:
    """The config with its Secret-mounted files (tokens, certificate, key)
    replaced by stand-ins, so that --check-config (which reads them) checks
    the rest."""
    tokens = tmp / "tokens.toml"
    tokens.write_text('[[tokens]]\nname = "ops"\nrole = "control"\ntoken = "0123456789abcdef0123"\n')
    tokens.chmod(0o600)
    replacements = {"token_file": tokens}
    if toml_path(config_text, "cert_file"):
        cert, key = tmp / "tls.crt", tmp / "tls.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                        "/CN=gpuwatch", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=60)
        key.chmod(0o600)
        replacements |= {"cert_file": cert, "key_file": key}
    for name, path in replacements.items():
        config_text = re.sub(rf'(?m)^(\s*{name}\s*=\s*)".*"',
                             lambda m, p=path: f'{m.group(1)}"{p}"', config_text)
    return config_text


def memory_mib(quantity: str | None) -> float | None:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity or "")
    return int(m.group(1)) * units[m.group(2)] if m else None


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", {})
    return not selector.get("matchExpressions") and all(labels.get(k) == v for k, v in match.items())


def listen_port(config_text: str, key: str) -> int | None:
    m = re.search(rf'^\s*{key}\s*=\s*"[^"]*:(\d+)"', config_text, re.MULTILINE)
    return int(m.group(1)) if m else None


def check_kubernetes(docs: dict[str, dict], variant: str) -> None:
    """The checks every variant must pass; `variant` prefixes each line."""
    def check(ok: bool, what: str, detail: str = "") -> None:
        globals()["check"](ok, f"[{variant}] {what}", detail)

    for kind in ("Namespace", "ConfigMap", "DaemonSet", "Service", "NetworkPolicy"):
        check(kind in docs, f"{variant} has a {kind}")
    cm, ds, svc = (docs.get(k, {}) for k in ("ConfigMap", "DaemonSet", "Service"))

    config_text = cm.get("data", {}).get("gpuwatch.toml", "")
    # The token file and certificates come from Secrets on the cluster;
    # stand-ins let --check-config (which reads them) check the rest.
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gpuwatch.toml"
        config.write_text(stand_in_files(config_text, Path(tmp)))
        r = subprocess.run([str(SERVER), "--config", str(config), "--check-config"], env={},
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
    grpc_tls = toml_path(config_text, "cert_file") is not None
    http_tls = grpc_tls and re.search(r"(?m)^\s*http\s*=\s*true", config_text) is not None
    scheme = "HTTPS" if http_tls else "HTTP"
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(probe_name, {})
        port = (probe.get("httpGet") or probe.get("grpc") or {}).get("port")
        check(port in ports or port in ports.values(),
              f"{probe_name} uses a declared container port", f"port {port}")
        if "httpGet" in probe:
            got = probe["httpGet"].get("scheme", "HTTP")
            check(got == scheme and probe["httpGet"].get("port") in ("http", ports.get("http")),
                  f"{probe_name} speaks {scheme} to the HTTP port, as the HTTP listener does",
                  f"scheme {got}, port {probe['httpGet'].get('port')}")
        if grpc_tls:
            check("grpc" not in probe and probe.get("httpGet", {}).get("path") == "/healthz",
                  f"{probe_name} asks /healthz (gRPC is TLS: the kubelet's gRPC probe speaks none)")
    check(container.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
          "the liveness probe asks /healthz")

    # Files from Secrets: mounted read-only where the config points.
    secrets = {n: v["secret"] for n, v in volumes.items() if "secret" in v}
    wanted = {"token_file": ("gpuwatch-tokens", "tokens.toml")}
    if grpc_tls:
        wanted |= {"cert_file": ("gpuwatch-tls", "tls.crt"), "key_file": ("gpuwatch-tls", "tls.key")}
    for key, (secret_name, file_name) in wanted.items():
        path = toml_path(config_text, key) or ""
        volume = next((n for n, v in secrets.items() if v.get("secretName") == secret_name), None)
        mount = next((m for m in container.get("volumeMounts", []) if m["name"] == volume), {})
        check(volume is not None and path == f"{mount.get('mountPath')}/{file_name}"
              and mount.get("readOnly") is True
              and secrets[volume].get("defaultMode", 0o644) & 0o077 == 0,
              f"{key} is {file_name} of the Secret {secret_name}, mounted read-only (owner-only) there",
              f"{key} = {path!r}, Secret mounted at {mount.get('mountPath')}")

    resources = container.get("resources", {})
    request = memory_mib(resources.get("requests", {}).get("memory"))
    limit = memory_mib(resources.get("limits", {}).get("memory"))
    # BENCHMARKS.md: 117 MiB with 512 attributed processes, 123 MiB with
    # 10,000 streams (docs/deploy.md).
    check(request is not None and limit is not None and request >= 123 and limit >= 2 * request,
          "the memory request covers the largest RSS measured and the limit leaves room",
          f"request {request} MiB, limit {limit} MiB")
    check("cpu" not in resources.get("limits", {}) and "cpu" in resources.get("requests", {}),
          "a CPU request and no CPU limit (throttling would delay the governor)")

    netpol = docs.get("NetworkPolicy", {}).get("spec", {})
    pod_labels = pod.get("metadata", {}).get("labels", {})
    check(selects(netpol.get("podSelector", {}), pod_labels) and bool(netpol.get("podSelector")),
          "the NetworkPolicy selects the DaemonSet's pods")
    allowed = set()
    for rule in netpol.get("ingress", []):
        check(bool(rule.get("from")), "every NetworkPolicy ingress rule names who may connect",
              f"rule {rule}")
        for p in rule.get("ports", []):
            port = p.get("port")
            allowed.add(ports.get(port, port))
    check(allowed == set(ports.values()),
          "the NetworkPolicy lets in exactly the container ports (gRPC and HTTP)",
          f"allows {sorted(allowed, key=str)}, container ports {sorted(ports.values())}")
    check(set(netpol.get("policyTypes", [])) == {"Ingress", "Egress"} and netpol.get("egress") == [],
          "the NetworkPolicy allows no egress (gpuwatch connects to nothing)")

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
    base = sorted(K8S.glob("*.yaml"))
    kust = load_manifests([K8S / "kustomization.yaml"]).get("Kustomization", {})
    listed = set(kust.get("resources", []))
    manifests = {p.name for p in base} - {"kustomization.yaml"}
    check(listed == manifests, "kustomization.yaml lists every manifest",
          f"lists {sorted(listed)}, directory has {sorted(manifests)}")
    check_kubernetes(load_manifests(base), "deploy/kubernetes")
    rendered = os.environ.get("GPUWATCH_TLS_RENDERED")
    check(bool(rendered), "the TLS variant's rendering is given (GPUWATCH_TLS_RENDERED)")
    if rendered:
        check_kubernetes(load_manifests([Path(rendered)]), "deploy/kubernetes-tls")
    print(f"deploy_checks: {results['passed']} passed, {results['failed']} failed")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
