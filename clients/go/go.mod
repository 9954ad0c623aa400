module gpuwatch/clients/go

go 1.19

// The versions Debian 12 packages (golang-google-grpc-dev,
// golang-google-protobuf-dev), which CI builds against offline; newer ones
// work too. Outside CI: `go mod tidy` fills go.sum.
require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
