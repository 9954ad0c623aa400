# syntax=docker/dockerfile:1
#
# gpuwatch container image: gpuwatch-server (and the gpuwatch-client CLI) on an
# nvidia/cuda base, so the NVIDIA Container Toolkit injects the host driver's
# libnvidia-ml.so.1 and /dev/nvidia* at run time. Nothing CUDA is used.
#
# Build:
#   docker build -t gpuwatch .
#   podman build --format docker -t gpuwatch .   # (OCI format drops HEALTHCHECK)
#
# Run on a GPU host, telemetry and governor writes (power limits need
# CAP_SYS_ADMIN, which only root can use here):
#   docker run -d --name gpuwatch --restart unless-stopped --gpus all \
#     --user root --cap-add SYS_ADMIN --stop-timeout 30 \
#     -p 127.0.0.1:9450:9450 -p 127.0.0.1:9451:9451 \
#     -v gpuwatch-state:/var/lib/gpuwatch gpuwatch
#
# Read-only monitoring (default non-root user, no capability; the governor
# only records what it would do):
#   docker run -d --gpus all -p 127.0.0.1:9450:9450 -p 127.0.0.1:9451:9451 \
#     -v gpuwatch-state:/var/lib/gpuwatch gpuwatch --dry-run
#
# Simulated GPUs, no GPU or driver needed:
#   docker run --rm -p 127.0.0.1:9450:9450 -p 127.0.0.1:9451:9451 gpuwatch --simulate
#
# The ports are published on the host's loopback above on purpose: until
# tokens/TLS are configured, anyone who reaches port 9450 can change power
# limits. See docs/deploy.md.

# The bases are build arguments so that a build machine without registry
# access can supply its own (CI builds this file with bases it makes from
# Debian packages: .ci/image.sh); the defaults are the real images.
#
# The toolchain the project is built and tested with (rust-version in
# Cargo.toml is the minimum). The builder must be Debian 12 or older: its
# glibc is the newest the binaries may need.
ARG RUST_VERSION=1.95
ARG RUST_IMAGE=rust:${RUST_VERSION}-bookworm
# Ubuntu 24.04 (glibc 2.39) runs binaries built on Debian 12 (glibc 2.36).
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04

FROM ${RUST_IMAGE} AS builder
WORKDIR /src

# The workspace as it is (every member's manifest and sources: cargo reads
# them all to resolve the workspace), then a build of the two shipped
# packages only. No placeholder sources: the registry and target directory
# live in BuildKit cache mounts, so a source edit recompiles only the
# workspace crates, and adding a member needs no change here.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY server server
COPY client client
COPY bench bench
COPY tests tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gpuwatch-server -p gpuwatch-client \
    && install -D -m 0755 -t /out target/release/gpuwatch-server target/release/gpuwatch-client

FROM ${CUDA_BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="gpuwatch" \
      org.opencontainers.image.description="Watches and governs NVIDIA GPUs: gRPC telemetry and control, thermal governor, Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/deploy.md in the source repository"

# NVML needs only the driver's "utility" capability (libnvidia-ml, no CUDA).
# NVIDIA_DISABLE_REQUIRE: the base image asks the runtime for a CUDA-capable
# driver of its own CUDA version; gpuwatch uses no CUDA and must run on any
# driver, including hosts older than the base image.
# gpuwatch listens on every interface inside the container (the defaults
# outside a container are loopback only); STATE_DIRECTORY is where desired
# state and the event log live, unless a config file sets state_dir.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility \
    NVIDIA_DISABLE_REQUIRE=true \
    GPUWATCH_SERVER__LISTEN=0.0.0.0:9450 \
    GPUWATCH_SERVER__HTTP_LISTEN=0.0.0.0:9451 \
    STATE_DIRECTORY=/var/lib/gpuwatch

RUN groupadd --system --gid 10001 gpuwatch \
    && useradd --system --uid 10001 --gid gpuwatch --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gpuwatch \
    && install -d -o gpuwatch -g gpuwatch -m 0750 /var/lib/gpuwatch /etc/gpuwatch

COPY --from=builder /out/gpuwatch-server /out/gpuwatch-client /usr/local/bin/
COPY deploy/container/healthcheck.sh /usr/local/bin/gpuwatch-healthcheck
COPY deploy/gpuwatch.toml /usr/share/doc/gpuwatch/gpuwatch.toml.example

VOLUME ["/var/lib/gpuwatch"]
EXPOSE 9450/tcp 9451/tcp

# Runs as the unprivileged user gpuwatch (10001): reading GPUs needs no
# privilege. For power
# limit writes run with `--user root --cap-add SYS_ADMIN` (see above).
USER 10001:10001

# GET /healthz on the HTTP port with bash alone (no curl in the image); falls
# back to a TCP check of the gRPC port when HTTP is off.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/gpuwatch-healthcheck"]

# SIGTERM stops the daemon gracefully: it restores every power limit the
# governor lowered before exiting; allow it time (docker run --stop-timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gpuwatch-server"]
CMD []
