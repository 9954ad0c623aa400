#!/bin/sh
# Generates the Go stubs of gpuwatch.v1 into clients/go/gpuwatchv1 from the
# repository's protos (proto/gpuwatch/v1), so the example can never drift from
# the daemon's contract. Needs protoc, protoc-gen-go and protoc-gen-go-grpc on
# PATH (Debian: protobuf-compiler libprotobuf-dev protoc-gen-go
# protoc-gen-go-grpc; elsewhere: `go install` both plugins).
# The protos carry no go_package option; the M flags below map each file to
# the package gpuwatch/clients/go/gpuwatchv1 instead.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
module="gpuwatch/clients/go"
pkg="$module/gpuwatchv1"
# Well-known types (google/protobuf/timestamp.proto): protoc's own include
# directory, /usr/include on Debian.
include="${PROTOC_INCLUDE:-/usr/include}"

set --
for proto in "$root"/proto/gpuwatch/v1/*.proto; do
    name="gpuwatch/v1/$(basename "$proto")"
    set -- "$@" "--go_opt=M$name=$pkg" "--go-grpc_opt=M$name=$pkg"
done
rm -rf "$here/gpuwatchv1"
protoc -I "$root/proto" -I "$include" \
    --go_out="$here" --go_opt=module="$module" \
    --go-grpc_out="$here" --go-grpc_opt=module="$module" \
    "$@" "$root"/proto/gpuwatch/v1/*.proto
echo "generated the gpuwatch.v1 stubs in $here/gpuwatchv1"
