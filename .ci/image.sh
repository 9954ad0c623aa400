#!/usr/bin/env bash
# CI: build the real Dockerfile with podman and run the image it makes.
#
# No Docker engine runs here and no registry image can be pulled, so the two
# bases the Dockerfile takes as build arguments are made from Debian's
# packages (debootstrap, then `podman import`):
#   - RUST_IMAGE: Debian 12 minbase + gcc, libc6-dev, ca-certificates, and the
#     host's own Rust toolchain copied in (rustc, cargo, std; no docs). Debian
#     12's rustc (1.63) is older than the workspace's rust-version, and rustup
#     cannot download a toolchain here; the host's is the one CI just built
#     and tested the workspace with, so the image is built by the same
#     compiler. Laid out like the official rust image (CARGO_HOME=/usr/local/cargo).
#   - CUDA_BASE_IMAGE: Debian 12 minbase (no CUDA: gpuwatch uses none; NVML
#     comes from the NVIDIA runtime on a GPU host, and --simulate needs none).
# Crates are fetched by cargo inside the build (`--locked`: exactly the
# versions of Cargo.lock), over the host's network (`--network host`).
#
# Then, with the image:
#   - it starts with --simulate and its HEALTHCHECK passes (podman healthcheck run);
#   - gRPC (gpuwatch-client) and HTTP (curl /healthz, /metrics) answer through
#     the published ports;
#   - the daemon runs as the non-root user the image declares;
#   - a hot simulated GPU makes the governor lower its limit; `podman stop`
#     (SIGTERM) stops it within the stop timeout with exit status 0, and the
#     state volume shows the limit given back;
#   - the state volume survives `podman rm`: a new container on it keeps the
#     operator's threshold and the event history;
#   - image size and layer count are printed; the runtime stage adds only the
#     two binaries and the health check (no toolchain) and stays under a bound.
# Everything it makes (images, containers, volumes, podman's storage, the
# base trees) lives under one temporary directory and is removed at the end.
#
# Needs: root, podman, buildah, debootstrap, runc (installed when missing),
# curl, Debian's mirror, crates.io (through cargo), and target/release/
# gpuwatch-client (`cargo build --release`; or GPUWATCH_CLIENT_BIN). Run from the repo root:
#   .ci/image.sh
# Ends with "image: N passed, M failed"; exits 1 when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
start_s=$SECONDS

# The whole run is bounded: the release build inside the image is most of it.
IMAGE_BUILD_TIMEOUT_S="${IMAGE_BUILD_TIMEOUT_S:-2400}"
# What the Dockerfile adds to its runtime base may not exceed this: two
# release binaries (about 120 MB with line tables) and two small files.
MAX_ADDED_MB="${MAX_ADDED_MB:-160}"
# docs/deploy.md asks for a 30 s stop timeout; the daemon needs far less.
STOP_TIMEOUT_S=30
MAX_STOP_S=10
SUITE=bookworm

client="${GPUWATCH_CLIENT_BIN:-target/release/gpuwatch-client}"
if [ ! -x "$client" ]; then
    echo "error: $client not found; run \`cargo build --release\` first (or set GPUWATCH_CLIENT_BIN)" >&2
    exit 1
fi
client="$(pwd)/$client"

apt_install() {
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
missing=()
for tool in podman buildah debootstrap runc curl iptables python3; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    # containernetworking-plugins: the bridge and port mappings of rootful podman.
    apt_install "${missing[@]}" containernetworking-plugins ca-certificates || exit 1
fi

# The Debian mirror apt already uses (deb822 or one-line sources).
mirror="$(sed -n 's/^URIs: *\([^ ]*debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)"
[ -n "$mirror" ] || mirror="$(sed -n 's/^deb \(http[^ ]*debian\/*\) .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n 1)"
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

work="$(mktemp -d /var/tmp/gpuwatch-image.XXXXXX)"
tag="gpuwatch-ci-$$"
image="localhost/$tag:latest"
rust_base="localhost/$tag-rust:${SUITE}"
runtime_base="localhost/$tag-runtime:${SUITE}"
volume="$tag-state"
container="$tag"

# podman as these machines need it: runc (crun refuses hybrid cgroups),
# cgroupfs, no default ulimits (setrlimit is refused), and a storage of its
# own under $work so that cleaning up removes everything.
cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = []
EOF
export CONTAINERS_CONF="$work/containers.conf"
# buildah keeps RUN --mount=type=cache directories and its scratch space in
# $TMPDIR: under $work they go with the rest.
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp"
# Without systemd, podman cannot arm the HEALTHCHECK's timer and says so on
# every run, stop and rm; `podman healthcheck run` works all the same.
pm() {
    podman --runtime runc --cgroup-manager cgroupfs \
        --root "$work/storage" --runroot "$work/run" "$@" \
        2> >(grep -v 'unable to get systemd connection' >&2)
}

# debootstrap mounts /proc (and more) inside the trees it makes; never let
# rm -rf walk into one.
unmount_under_work() {
    local m
    awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null; done
}
cleanup() {
    pm rm -f -t 0 "$container" >/dev/null 2>&1
    pm volume rm -f "$volume" >/dev/null 2>&1
    pm rmi -f "$image" "$rust_base" "$runtime_base" >/dev/null 2>&1
    # The builder stage's image and anything else in this private storage
    # (not `podman system reset`: it also removes the machine's networks).
    pm rm -a -f >/dev/null 2>&1
    pm rmi -a -f >/dev/null 2>&1
    unmount_under_work
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

passed=0
failed=0
step() { # step DESCRIPTION COMMAND...
    local what="$1"
    shift
    printf '== %s (t+%ss)\n' "$what" "$((SECONDS - start_s))"
    if "$@"; then
        passed=$((passed + 1))
        echo "ok: $what"
    else
        failed=$((failed + 1))
        echo "FAIL: $what"
    fi
}
summary() {
    echo "image: wall time $((SECONDS - start_s)) s"
    echo "image: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

# ---- the bases -------------------------------------------------------------
make_bases() {
    local sysroot msrv have
    sysroot="$(rustc --print sysroot)" || return 1
    # The host's toolchain goes into the build base: it must meet the
    # workspace's rust-version (Debian 12's own rustc, 1.63, does not).
    msrv="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
    have="$(rustc --version | cut -d' ' -f2)"
    if [ -z "$msrv" ] || [ "$(printf '%s\n%s\n' "$msrv" "$have" | sort -V | head -n 1)" != "$msrv" ]; then
        echo "the host's rustc $have is older than the workspace's rust-version ${msrv:-(not found)}" >&2
        return 1
    fi
    # Both trees at once: debootstrap mostly waits for the mirror.
    timeout 900 debootstrap --variant=minbase "$SUITE" "$work/runtime" "$mirror" >"$work/debootstrap-runtime.log" 2>&1 &
    local rt=$!
    timeout 900 debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates "$SUITE" \
        "$work/rust" "$mirror" >"$work/debootstrap-rust.log" 2>&1 &
    local rs=$!
    local status=0
    wait "$rt" || { status=1; tail -n 20 "$work/debootstrap-runtime.log" >&2; }
    wait "$rs" || { status=1; tail -n 20 "$work/debootstrap-rust.log" >&2; }
    [ "$status" -eq 0 ] || return 1
    local tree
    unmount_under_work
    for tree in "$work/runtime" "$work/rust"; do
        rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
    done
    # The host's trust store: this machine reaches crates.io through a
    # TLS-inspecting egress proxy whose CA only the host's bundle holds. Only
    # the build stage sees it; the runtime image gets nothing of this base.
    cp /etc/ssl/certs/ca-certificates.crt "$work/rust/etc/ssl/certs/ca-certificates.crt" || return 1
    mkdir -p "$work/rust/usr/local/rust" "$work/rust/usr/local/cargo"
    # rustc, cargo and the standard library: bin/ lib/ libexec/ etc/ of the
    # sysroot; share/ (docs, man pages) stays behind.
    local part
    for part in bin lib libexec etc; do
        [ -e "$sysroot/$part" ] && cp -a "$sysroot/$part" "$work/rust/usr/local/rust/"
    done
    tar -C "$work/runtime" -c . | pm import - "$runtime_base" >/dev/null || return 1
    tar -C "$work/rust" -c . | pm import \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$rust_base" >/dev/null || return 1
    rm -rf "$work/runtime" "$work/rust"
    pm run --rm --network none "$rust_base" sh -c 'rustc --version && cargo --version && cc --version | head -n 1'
}
step "bases from Debian $SUITE packages (debootstrap; the host's Rust $(rustc --version | cut -d' ' -f2))" make_bases
[ "$failed" -eq 0 ] || { summary; exit 1; }

# ---- the build -------------------------------------------------------------
build_image() {
    local t0=$SECONDS
    # --format docker: OCI images have no HEALTHCHECK.
    timeout "$IMAGE_BUILD_TIMEOUT_S" podman --runtime runc --cgroup-manager cgroupfs \
        --root "$work/storage" --runroot "$work/run" build \
        --format docker --network host --pull=never \
        --build-arg "RUST_IMAGE=$rust_base" --build-arg "CUDA_BASE_IMAGE=$runtime_base" \
        -t "$image" -f Dockerfile . >"$work/build.log" 2>&1
    local status=$?
    tail -n 15 "$work/build.log"
    echo "image build: $((SECONDS - t0)) s"
    return "$status"
}
step "podman build the Dockerfile (bases as build arguments)" build_image
[ "$failed" -eq 0 ] || { summary; exit 1; }

image_is_small() {
    local size base layers base_layers added_mb
    size="$(pm image inspect --format '{{.Size}}' "$image")" || return 1
    base="$(pm image inspect --format '{{.Size}}' "$runtime_base")" || return 1
    layers="$(pm image inspect --format '{{len .RootFS.Layers}}' "$image")"
    base_layers="$(pm image inspect --format '{{len .RootFS.Layers}}' "$runtime_base")"
    added_mb=$(((size - base) / 1000000))
    echo "image $image: $((size / 1000000)) MB in $layers layers; the Dockerfile adds ${added_mb} MB in $((layers - base_layers)) layers to its runtime base (bound: $MAX_ADDED_MB MB)"
    pm history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | cut -c1-150
    [ "$added_mb" -le "$MAX_ADDED_MB" ]
}
step "image size and layers (the runtime stage adds at most $MAX_ADDED_MB MB)" image_is_small

runtime_is_minimal() {
    # /usr/local/bin holds the two binaries and the health check; no compiler,
    # cargo or sources come along from the builder.
    local listing
    # shellcheck disable=SC2016 # the inner script is the container's
    listing="$(pm run --rm --network none --entrypoint /bin/sh "$image" -c \
        'ls /usr/local/bin; for t in cargo rustc cc gcc; do command -v "$t"; done; ls -d /src /usr/local/cargo /usr/local/rust 2>/dev/null; true')" || return 1
    echo "$listing"
    [ "$listing" = "$(printf '%s\n' gpuwatch-client gpuwatch-healthcheck gpuwatch-server)" ]
}
step "the runtime stage carries the two binaries and nothing of the toolchain" runtime_is_minimal

# ---- running it ------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
grpc_port="$(free_port)"
http_port="$(free_port)"
token="ci-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
# The daemon (uid 10001 in the image) must be the only reader of its tokens.
mkdir -p "$work/etc"
printf '[[tokens]]\nname = "ci-control"\nrole = "control"\ntoken = "%s"\n' "$token" >"$work/etc/tokens.toml"
chown 10001:10001 "$work/etc/tokens.toml"
chmod 600 "$work/etc/tokens.toml"
printf '%s\n' "$token" >"$work/token"
chmod 600 "$work/token"
# One H100 driven toward threshold + 15 °C at 20x speed: within a few wall
# seconds the governor lowers its power limit (as tests/server/daemon_governor.rs).
cat >"$work/etc/gpuwatch.toml" <<'EOF'
[sampler]
interval = "50ms"

[simulator]
speed = 20.0

[[simulator.gpus]]
preset = "h100-sxm"
ambient_c = 30.0
time_constant = "10s"
thermal_resistance_c_per_w = 0.075
demand = [ { at = "5s", watts = 650 }, { at = "600s", watts = 150 } ]

[controller]
threshold_c = 64
hysteresis_c = 3

[auth]
token_file = "/etc/gpuwatch/tokens.toml"
open_metrics = true
EOF
chmod 0755 "$work/etc"
chmod 0644 "$work/etc/gpuwatch.toml"
gw() { "$client" --token-file "$work/token" --timeout 5s "$@" "127.0.0.1:$grpc_port"; }

run_container() {
    pm run -d --name "$container" --stop-timeout "$STOP_TIMEOUT_S" \
        -p "127.0.0.1:$grpc_port:9450" -p "127.0.0.1:$http_port:9451" \
        -v "$volume:/var/lib/gpuwatch" -v "$work/etc:/etc/gpuwatch:ro" \
        "$image" --simulate --config /etc/gpuwatch/gpuwatch.toml >/dev/null || return 1
    local deadline=$((SECONDS + 60))
    until pm healthcheck run "$container" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ] || [ "$(pm inspect --format '{{.State.Running}}' "$container")" != true ]; then
            echo "the container did not become healthy:" >&2
            pm logs "$container" 2>&1 | tail -n 20 >&2
            return 1
        fi
        sleep 1
    done
}
healthy() {
    run_container || return 1
    local out
    out="$(pm healthcheck run "$container")" || return 1
    echo "podman healthcheck run: ${out:-healthy}"
}
step "the image starts with --simulate and its HEALTHCHECK passes" healthy

http_answers() {
    local body
    body="$(curl -fsS "http://127.0.0.1:$http_port/healthz")" || return 1
    echo "/healthz: $body"
    curl -fsS "http://127.0.0.1:$http_port/metrics" >"$work/metrics" &&
        grep -m 3 -E '^gpuwatch_[a-z_]+\{[^}]*H100[^}]*\} [0-9.]+$' "$work/metrics"
}
step "HTTP answers through the published port (/healthz, /metrics)" http_answers

grpc_answers() {
    gw list && gw list | grep -q 'H100'
}
step "gRPC answers through the published port (gpuwatch-client list)" grpc_answers

non_root() {
    local declared uid pid1
    declared="$(pm image inspect --format '{{.Config.User}}' "$image")"
    uid="$(pm exec "$container" id -u)"
    pid1="$(pm exec "$container" sh -c 'grep -E "^(Uid|Gid):" /proc/1/status' | tr -s '\t ' ' ')"
    echo "declared USER $declared; exec id -u: $uid; the daemon (pid 1): $pid1"
    [ "${declared%%:*}" = 10001 ] && [ "$uid" = 10001 ] &&
        printf '%s\n' "$pid1" | grep -q '^Uid: 10001 10001 10001 10001$'
}
step "it runs as the non-root user it declares (10001)" non_root

governor_lowers() {
    local deadline=$((SECONDS + 60)) limit
    while [ "$SECONDS" -lt "$deadline" ]; do
        # The LIMIT column of `gpuwatch-client list`, in watts.
        limit="$(gw list | awk 'NR == 2 { for (i = 1; i <= NF; i++) if ($i == "W" && $(i + 1) ~ /^[0-9]+$/) { print $(i + 1); exit } }')"
        if [ -n "$limit" ] && [ "$limit" -lt 650 ]; then
            echo "the governor lowered GPU 0 to $limit W (default 700 W)"
            return 0
        fi
        sleep 0.5
    done
    echo "the governor did not lower the limit in 60 s (last: ${limit:-none} W)" >&2
    gw list >&2
    return 1
}
step "a hot simulated GPU: the governor lowers its power limit" governor_lowers

set_threshold() {
    gw set-threshold --gpu 0 --celsius 66
}
step "SetThreshold through the published port (persisted in the volume)" set_threshold

volume_dir() { pm volume inspect --format '{{.Mountpoint}}' "$volume"; }

stops_and_restores() {
    local t0=$SECONDS took code dir
    pm stop -t "$STOP_TIMEOUT_S" "$container" >/dev/null || return 1
    took=$((SECONDS - t0))
    code="$(pm inspect --format '{{.State.ExitCode}}' "$container")"
    echo "podman stop (SIGTERM, stop timeout ${STOP_TIMEOUT_S} s): stopped in ${took} s, exit status $code"
    pm logs "$container" 2>&1 | grep -E 'signal received|restoring|stopped' | tail -n 3
    [ "$code" = 0 ] && [ "$took" -le "$MAX_STOP_S" ] || return 1
    dir="$(volume_dir)" || return 1
    # The last events: the daemon stopping, then the governor's limit given
    # back to the default; state.json says nothing is left lowered.
    grep -q '"kind":"EVENT_KIND_DAEMON_STOPPING"' "$dir/events.log" || return 1
    grep '"actor_kind":"ACTOR_KIND_SHUTDOWN"' "$dir/events.log" |
        grep '"kind":"EVENT_KIND_POWER_LIMIT_CHANGED"' | grep '"after_mw":700000' | cut -c1-260 | grep . || {
        echo "no shutdown restore of the power limit in events.log" >&2
        return 1
    }
    python3 - "$dir/state.json" <<'EOF'
import json, sys
state = json.load(open(sys.argv[1]))
gpus = state["gpus"].values()
lowered = [g for g in gpus if g.get("governor_lowered_limit") or g.get("governor_clock_lock")]
print(f"state.json: {len(state['gpus'])} GPU(s), {len(lowered)} left lowered by the governor")
sys.exit(1 if lowered or not gpus else 0)
EOF
}
step "SIGTERM (podman stop) stops it cleanly within ${MAX_STOP_S} s and restores the lowered limit" \
    stops_and_restores

state_survives() {
    local before after
    before="$(grep -c . "$(volume_dir)/events.log")"
    pm rm "$container" >/dev/null || return 1
    run_container || return 1
    # The operator's threshold (66 °C, set before the restart) is still in
    # force, and the event history continues the old one.
    gw list | tee "$work/list" | cut -c1-220
    grep -q '66 °C ±3 (operator)' "$work/list" || {
        echo "the operator's threshold did not survive the restart" >&2
        return 1
    }
    gw events >"$work/events" || return 1
    after="$(grep -c . "$work/events")"
    echo "events: $before in the volume before the restart; $after listed after it"
    grep -q 'giving back what the governor took' "$work/events" && [ "$after" -gt "$before" ] &&
        ! grep -q 'stale throttle' "$work/events"
}
step "the state volume survives podman rm + run (threshold, event history; no stale throttle)" state_survives

pm stop -t "$STOP_TIMEOUT_S" "$container" >/dev/null 2>&1
summary
