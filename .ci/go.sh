#!/usr/bin/env bash
# CI: the Go client (clients/go: the generated gpuwatchv1 package, the
# gpuwatch client package, the example programs) built with grpc-go and run
# against live gpuwatch-servers; a program outside the repo imports it.
#
# Needs (installed by this script with apt-get when missing; Debian 12):
#   golang-go (Go 1.19), golang-google-grpc-dev (grpc-go 1.33.3),
#   golang-google-protobuf-dev (protobuf-go 1.28.1),
#   golang-github-golang-protobuf-1-5-dev (NOT the 1-3 package apt picks by
#   default for grpc-dev: grpc-go 1.33 with golang/protobuf 1.3 panics on the
#   first message, "protobuf tag not enough fields"),
#   protobuf-compiler + libprotobuf-dev (protoc, timestamp.proto),
#   protoc-gen-go, protoc-gen-go-grpc;
# and target/release/gpuwatch-server (`cargo build --release`).
# No Go module is downloaded: the build runs in GOPATH mode against Debian's
# sources in /usr/share/gocode with GOPROXY=off.
#
# When the packages cannot be installed, this prints why and exits 0 (the
# example then stays documentation only, see docs/clients.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/daemon.sh

srv_bin="$(server_bin)"

packages=(golang-go golang-google-grpc-dev golang-google-protobuf-dev
    golang-github-golang-protobuf-1-5-dev protobuf-compiler libprotobuf-dev
    protoc-gen-go protoc-gen-go-grpc)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends "${packages[@]}"; }; then
        echo "SKIP: the Go toolchain and grpc-go could not be installed from Debian's packages" \
            "(apt-get install ${packages[*]} failed); the Go client stays documentation only."
        exit 0
    fi
fi

work="$(mktemp -d)"
trap 'stop_daemon || true; rm -rf "$work"' EXIT
# GOPATH mode: the example's import path gpuwatch/clients/go maps to this
# checkout through a link; everything else comes from Debian's gocode.
mkdir -p "$work/gopath/src/gpuwatch/clients"
ln -s "$PWD/clients/go" "$work/gopath/src/gpuwatch/clients/go"
export GO111MODULE=off GOPROXY=off GOFLAGS='' GOTOOLCHAIN=local \
    GOPATH="$work/gopath:/usr/share/gocode" GOCACHE="$work/gocache"
go version

clients/go/generate.sh
cd "$work/gopath/src/gpuwatch/clients/go"
unformatted="$(gofmt -l ./*.go)"
[ -z "$unformatted" ] || { echo "FAIL: gofmt would change: $unformatted" >&2; exit 1; }
go vet .
go build -o "$work/gpuwatch-go-example" .
cd - >/dev/null

start_daemon
"$work/gpuwatch-go-example" -target "$DAEMON_ADDR" -frames 20 -interval-ms 200 -timeout 20s \
    | tee "$work/example.out"
for want in '^host .*\(simulator, .*\): 4 GPUs' '^watch: stride 2 ' \
    '^watched 20 frames, .*seq contract held \(stride 2\)' 'EVENT_KIND_DAEMON_STARTED' \
    '^caught up at seq [0-9]+'; do
    grep -Eq "$want" "$work/example.out" || { echo "FAIL: no line matching $want" >&2; exit 1; }
done
status=0
"$work/gpuwatch-go-example" -target "$DAEMON_ADDR" -frames 1 -interval-ms 1 >/dev/null 2>"$work/refused.err" \
    || status=$?
if [ "$status" -ne 1 ] || ! grep -q 'InvalidArgument.*minimum' "$work/refused.err"; then
    echo "FAIL: a too-short interval exited $status:" >&2
    cat "$work/refused.err" >&2
    exit 1
fi
echo "example client: devices, watch, events and a refused request behaved as documented"

cd "$work/gopath/src/gpuwatch/clients/go"
GPUWATCH_TARGET="$DAEMON_ADDR" timeout 600 go test -count=1 -v .
# The client package: every RPC, retries, resume across a restart, the fleet
# helper, 50 concurrent leases on a 4-GPU daemon; its tests start their own
# daemons (with lease tokens) from this binary.
GPUWATCH_SERVER_BIN="$srv_bin" timeout 600 go test -count=1 -v ./gpuwatch/
go build -o "$work/gpuwatch-go-scheduler" ./examples/scheduler
cd - >/dev/null

# A program outside the repository imports the package, as a user's would.
mkdir -p "$work/outside/src/outsider"
cat >"$work/outside/src/outsider/main.go" <<'GO'
package main

import (
	"context"
	"fmt"
	"os"

	"gpuwatch/clients/go/gpuwatch"
	pb "gpuwatch/clients/go/gpuwatchv1"
)

func main() {
	c, err := gpuwatch.Dial(os.Args[1], gpuwatch.Options{})
	if err != nil {
		panic(err)
	}
	defer c.Close()
	ctx := context.Background()
	p, err := c.Pick(ctx, &pb.PickCriteria{Count: 1, AllowBusy: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("picked CUDA_VISIBLE_DEVICES=%s satisfied=%v\n", p.CudaVisibleDevices, p.Satisfied)
}
GO
(cd "$work/outside/src/outsider" && GOPATH="$work/outside:$GOPATH" go build -o "$work/outsider" .)
"$work/outsider" "$DAEMON_ADDR" | tee "$work/outsider.out"
grep -q '^picked CUDA_VISIBLE_DEVICES=GPU-.* satisfied=true' "$work/outsider.out" \
    || { echo "FAIL: the outside program could not pick a GPU" >&2; exit 1; }
stop_daemon
