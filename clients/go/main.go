// Command gpuwatch-go-example is the Go example client of gpuwatch: it lists a
// daemon's GPUs, watches N telemetry frames while checking the seq/stride/gap
// contract, and replays the event log until it has caught up. CI builds it
// against Debian's grpc-go and runs it against a live daemon (.ci/go.sh).
//
//	./generate.sh            # stubs from ../../proto into ./gpuwatchv1
//	go run . -target 127.0.0.1:9450 -frames 20 -interval-ms 200
//
// Exit status: 0 success, 1 the daemon refused or could not be reached, 2 bad
// flags, 3 the daemon broke the stream contract.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "gpuwatch/clients/go/gpuwatchv1"
)

const (
	exitRPC      = 1
	exitUsage    = 2
	exitContract = 3
)

// contractError marks a broken stream promise (exit 3).
type contractError struct{ err error }

func (e contractError) Error() string { return "contract violated: " + e.err.Error() }

// bearer sends "authorization: Bearer TOKEN" on every call.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(ctx context.Context, uri ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false so a token also works on a plaintext
// loopback connection; main warns before sending one in clear elsewhere.
func (b bearer) RequireTransportSecurity() bool { return b.secure }

type options struct {
	target, token, ca, cert, key, serverName string
	frames, intervalMs                       uint
	sinceSeq                                 uint64
	timeout                                  time.Duration
}

func dial(ctx context.Context, o options) (*grpc.ClientConn, error) {
	var dialOpts []grpc.DialOption
	secure := o.ca != "" || o.cert != ""
	if secure {
		cfg := &tls.Config{ServerName: o.serverName, MinVersion: tls.VersionTLS12}
		if o.ca != "" {
			pem, err := os.ReadFile(o.ca)
			if err != nil {
				return nil, fmt.Errorf("read CA certificate: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("%s holds no PEM certificate", o.ca)
			}
			cfg.RootCAs = pool
		}
		if o.cert != "" {
			pair, err := tls.LoadX509KeyPair(o.cert, o.key)
			if err != nil {
				return nil, fmt.Errorf("load client certificate: %w", err)
			}
			cfg.Certificates = []tls.Certificate{pair}
		}
		dialOpts = append(dialOpts, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	} else {
		// grpc.WithInsecure: the plaintext option that exists in every grpc-go
		// release, Debian 12's 1.33 included.
		dialOpts = append(dialOpts, grpc.WithInsecure())
	}
	if o.token != "" {
		host := o.target[:strings.LastIndex(o.target, ":")+1]
		if !secure && !strings.HasPrefix(host, "127.") && host != "localhost:" && host != "[::1]:" {
			fmt.Fprintf(os.Stderr, "warning: sending a bearer token to %s without TLS\n", o.target)
		}
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(bearer{token: o.token, secure: secure}))
	}
	return grpc.DialContext(ctx, o.target, dialOpts...)
}

func listDevices(ctx context.Context, c pb.GpuWatchClient, o options) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	resp, err := c.ListDevices(ctx, &pb.ListDevicesRequest{})
	if err != nil {
		return 0, fmt.Errorf("ListDevices: %w", err)
	}
	h := resp.GetHost()
	fmt.Printf("host %s (%s, gpuwatch %s): %d GPUs, sampler %d ms\n",
		h.GetHostname(), h.GetBackend(), h.GetDaemonVersion(), len(resp.Devices), h.GetSamplerIntervalMs())
	for _, d := range resp.Devices {
		pl := d.GetPowerLimits()
		fmt.Printf("  gpu%d %s %s power limit %d-%d W, threshold %d C\n", d.Index, d.Uuid, d.Name,
			pl.GetMinMw()/1000, pl.GetMaxMw()/1000, d.GetPolicy().GetThresholdC())
	}
	return len(resp.Devices), nil
}

func sampleLine(s *pb.GpuSample) string {
	temp := "-"
	if s.TemperatureC != nil {
		temp = fmt.Sprint(*s.TemperatureC)
	}
	power := "-"
	if s.PowerDrawMw != nil {
		power = fmt.Sprint(*s.PowerDrawMw / 1000)
	}
	return fmt.Sprintf("gpu%d %sC %sW", s.Index, temp, power)
}

func watch(ctx context.Context, c pb.GpuWatchClient, o options) error {
	// Bounded: generous for the frames asked for, never forever.
	limit := 30*time.Second + time.Duration(o.frames)*time.Duration(o.intervalMs+100)*2*time.Millisecond
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel() // also ends the stream when we stop reading
	stream, err := c.Watch(ctx, &pb.WatchRequest{IntervalMs: uint32(o.intervalMs)})
	if err != nil {
		return fmt.Errorf("Watch: %w", err)
	}
	check := &watchContract{}
	for check.frames < int(o.frames) {
		msg, err := stream.Recv()
		if err == io.EOF {
			return fmt.Errorf("Watch: the daemon ended the stream after %d frames", check.frames)
		}
		if err != nil {
			return fmt.Errorf("Watch: %w", err)
		}
		kind, err := check.observe(msg)
		if err != nil {
			return contractError{err}
		}
		switch kind {
		case "start":
			st := msg.GetStart()
			fmt.Printf("watch: stride %d (%d ms; sampler %d ms), %d GPUs\n",
				st.Stride, st.IntervalMs, st.SamplerIntervalMs, len(st.Devices))
		case "frame":
			f := msg.GetFrame()
			parts := make([]string, 0, len(f.Samples))
			for _, s := range f.Samples {
				parts = append(parts, sampleLine(s))
			}
			fmt.Printf("frame %d: %s\n", f.Seq, strings.Join(parts, " | "))
		case "gap":
			g := msg.GetGap()
			fmt.Printf("gap %d..%d (%s, %d missed)\n", g.FirstSeq, g.LastSeq, g.Reason, g.Missed)
		}
	}
	fmt.Printf("watched %d frames, %d gaps, %d missed; seq contract held (stride %d)\n",
		check.frames, check.gaps, check.missed, check.stride)
	return nil
}

func events(ctx context.Context, c pb.GpuWatchClient, o options) error {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	since := o.sinceSeq
	stream, err := c.WatchEvents(ctx, &pb.WatchEventsRequest{SinceSeq: &since})
	if err != nil {
		return fmt.Errorf("WatchEvents: %w", err)
	}
	check := &eventsContract{sinceSeq: u64(since)}
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			return fmt.Errorf("WatchEvents: the stream ended before caught_up")
		}
		if err != nil {
			return fmt.Errorf("WatchEvents: %w", err)
		}
		kind, err := check.observe(msg)
		if err != nil {
			return contractError{err}
		}
		switch kind {
		case "event":
			e := msg.GetEvent()
			fmt.Printf("#%d %s %s %s: %s\n", e.Seq, e.GetTime().AsTime().UTC().Format(time.RFC3339),
				e.Kind, e.GetActor().GetName(), e.Reason)
		case "gap":
			g := msg.GetGap()
			fmt.Printf("gap %d..%d: %d events no longer retained\n", g.FirstSeq, g.LastSeq, g.Missed)
		case "caught_up":
			fmt.Printf("caught up at seq %d: %d events replayed\n", msg.GetCaughtUp().LatestSeq, check.replayed)
			return nil
		}
	}
}

func run(o options) error {
	ctx := context.Background()
	dialCtx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	conn, err := dial(dialCtx, o)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := pb.NewGpuWatchClient(conn)
	if _, err := listDevices(ctx, client, o); err != nil {
		return err
	}
	if o.frames > 0 {
		if err := watch(ctx, client, o); err != nil {
			return err
		}
	}
	return events(ctx, client, o)
}

func main() {
	var o options
	flag.StringVar(&o.target, "target", envOr("GPUWATCH_TARGET", "127.0.0.1:9450"), "daemon address HOST:PORT (env GPUWATCH_TARGET)")
	flag.StringVar(&o.token, "token", os.Getenv("GPUWATCH_TOKEN"), "bearer token (env GPUWATCH_TOKEN)")
	flag.StringVar(&o.ca, "ca", "", "CA certificate (PEM) to verify the daemon; enables TLS")
	flag.StringVar(&o.cert, "cert", "", "client certificate (PEM) for mutual TLS; enables TLS")
	flag.StringVar(&o.key, "key", "", "client private key (PEM) for mutual TLS")
	flag.StringVar(&o.serverName, "server-name", "", "name expected in the daemon's certificate")
	flag.UintVar(&o.frames, "frames", 10, "Watch frames to read (0 skips Watch)")
	flag.UintVar(&o.intervalMs, "interval-ms", 0, "frame interval; 0 = the sampler's")
	flag.Uint64Var(&o.sinceSeq, "since-seq", 0, "replay events after this seq (0 = all retained)")
	flag.DurationVar(&o.timeout, "timeout", 10*time.Second, "deadline of each call and of the event replay")
	flag.Parse()
	if flag.NArg() > 0 || !strings.Contains(o.target, ":") || o.timeout <= 0 || (o.cert == "") != (o.key == "") {
		fmt.Fprintln(os.Stderr, "usage: gpuwatch-go-example [-target HOST:PORT] [-frames N] [-interval-ms MS] [-since-seq SEQ] [-token T] [-ca FILE [-cert FILE -key FILE]]")
		os.Exit(exitUsage)
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "gpuwatch-go-example: %s: %v\n", o.target, err)
		var ce contractError
		if errors.As(err, &ce) {
			os.Exit(exitContract)
		}
		os.Exit(exitRPC)
	}
}

func envOr(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}
