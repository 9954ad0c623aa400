// Package gpuwatch is a small client for gpuwatch daemons on top of the
// generated gpuwatch.v1 stubs (package gpuwatch/clients/go/gpuwatchv1).
//
// It owns what every Go scheduler would otherwise rewrite: the connection
// with a bearer token (and TLS), retries with jittered exponential backoff
// on UNAVAILABLE (never for LeaseGpus, whose lost answer would lease twice),
// errors that carry the gRPC code and the daemon's message, Watch and
// WatchEvents streams that reconnect and resume after the last seq they
// delivered, picking and leasing GPUs, and a Fleet of many daemons where a
// dead host is reported, not fatal. Names that resolve to several
// addresses (a Kubernetes headless Service) expand to all of them
// (Expand). Every call takes a context.
package gpuwatch

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	pb "gpuwatch/clients/go/gpuwatchv1"
)

// Error is a failed call: the RPC, the gRPC code and the daemon's message.
type Error struct {
	Call    string
	Code    codes.Code
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s failed: %s: %s", e.Call, e.Code, e.Message)
}

// Options configure a Client. The zero value is a plaintext connection
// without a token, 10 s per call, 3 retries from 200 ms.
type Options struct {
	// Token is sent as "authorization: Bearer TOKEN" on every call.
	Token string
	// CAFile turns TLS on, verifying the daemon with this CA (PEM).
	CAFile string
	// Timeout bounds every unary call (default 10 s).
	Timeout time.Duration
	// Retries on UNAVAILABLE (default 3; negative: none).
	Retries int
	// Backoff is the first retry's delay ceiling (default 200 ms).
	Backoff time.Duration
}

// Client talks to one daemon.
type Client struct {
	Target string
	RPC    pb.GpuWatchClient
	conn   *grpc.ClientConn
	opts   Options
}

type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(ctx context.Context, uri ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.secure }

// Dial connects to target (HOST:PORT) lazily: the first call connects.
func Dial(target string, opts Options) (*Client, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Second
	}
	if opts.Retries == 0 {
		opts.Retries = 3
	}
	if opts.Backoff <= 0 {
		opts.Backoff = 200 * time.Millisecond
	}
	dial := []grpc.DialOption{}
	secure := opts.CAFile != ""
	if secure {
		pem, err := os.ReadFile(opts.CAFile)
		if err != nil {
			return nil, fmt.Errorf("cannot read the CA certificate %s: %w", opts.CAFile, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", opts.CAFile)
		}
		dial = append(dial, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool})))
	} else {
		dial = append(dial, grpc.WithInsecure())
	}
	if opts.Token != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer{token: opts.Token, secure: secure}))
	}
	conn, err := grpc.Dial(target, dial...)
	if err != nil {
		return nil, err
	}
	return &Client{Target: target, RPC: pb.NewGpuWatchClient(conn), conn: conn, opts: opts}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// delay is the n-th (0-based) backoff delay: full jitter under an
// exponentially growing ceiling, capped at 5 s.
func delay(base time.Duration, n int) time.Duration {
	ceiling := base << uint(n)
	if ceiling <= 0 || ceiling > 5*time.Second {
		ceiling = 5 * time.Second
	}
	return time.Duration(rand.Int63n(int64(ceiling) + 1))
}

// unary runs call with the client's timeout, retrying UNAVAILABLE.
func (c *Client) unary(ctx context.Context, name string, retry bool, call func(context.Context) error) error {
	for attempt := 0; ; attempt++ {
		cctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
		err := call(cctx)
		cancel()
		if err == nil {
			return nil
		}
		st, _ := status.FromError(err)
		if retry && st.Code() == codes.Unavailable && attempt < c.opts.Retries {
			select {
			case <-ctx.Done():
				return &Error{Call: name, Code: codes.Canceled, Message: ctx.Err().Error()}
			case <-time.After(delay(c.opts.Backoff, attempt)):
			}
			continue
		}
		return &Error{Call: name, Code: st.Code(), Message: st.Message()}
	}
}

// ListDevices: identity, limits and policy of the selected GPUs (all when none).
func (c *Client) ListDevices(ctx context.Context, gpus ...*pb.GpuSelector) (r *pb.ListDevicesResponse, err error) {
	err = c.unary(ctx, "ListDevices", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.ListDevices(ctx, &pb.ListDevicesRequest{Gpus: gpus})
		return
	})
	return
}

// Snapshot: the latest sample of each selected GPU.
func (c *Client) Snapshot(ctx context.Context, gpus ...*pb.GpuSelector) (r *pb.GetSnapshotResponse, err error) {
	err = c.unary(ctx, "GetSnapshot", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.GetSnapshot(ctx, &pb.GetSnapshotRequest{Gpus: gpus})
		return
	})
	return
}

// Policy: the governor's policy for the selected GPUs.
func (c *Client) Policy(ctx context.Context, gpus ...*pb.GpuSelector) (r *pb.GetPolicyResponse, err error) {
	err = c.unary(ctx, "GetPolicy", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.GetPolicy(ctx, &pb.GetPolicyRequest{Gpus: gpus})
		return
	})
	return
}

// SetPowerLimit sets the operator's ceiling in watts (needs control).
func (c *Client) SetPowerLimit(ctx context.Context, watts float64, gpus ...*pb.GpuSelector) (r *pb.SetPowerLimitResponse, err error) {
	req := &pb.SetPowerLimitRequest{Gpus: gpus, Target: &pb.SetPowerLimitRequest_Watts{Watts: watts}}
	err = c.unary(ctx, "SetPowerLimit", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.SetPowerLimit(ctx, req)
		return
	})
	return
}

// RestorePowerLimit goes back to the device default limit (needs control).
func (c *Client) RestorePowerLimit(ctx context.Context, gpus ...*pb.GpuSelector) (r *pb.SetPowerLimitResponse, err error) {
	req := &pb.SetPowerLimitRequest{Gpus: gpus, Target: &pb.SetPowerLimitRequest_RestoreDefault{RestoreDefault: true}}
	err = c.unary(ctx, "SetPowerLimit", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.SetPowerLimit(ctx, req)
		return
	})
	return
}

// SetPowerBudget sets the node power budget in watts: host-wide, divided
// among the GPUs by need (needs control).
func (c *Client) SetPowerBudget(ctx context.Context, watts float64) (r *pb.SetPowerBudgetResponse, err error) {
	req := &pb.SetPowerBudgetRequest{Target: &pb.SetPowerBudgetRequest_Watts{Watts: watts}}
	err = c.unary(ctx, "SetPowerBudget", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.SetPowerBudget(ctx, req)
		return
	})
	return
}

// DropPowerBudget drops the node power budget (needs control).
func (c *Client) DropPowerBudget(ctx context.Context) (r *pb.SetPowerBudgetResponse, err error) {
	req := &pb.SetPowerBudgetRequest{Target: &pb.SetPowerBudgetRequest_RestoreDefault{RestoreDefault: true}}
	err = c.unary(ctx, "SetPowerBudget", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.SetPowerBudget(ctx, req)
		return
	})
	return
}

// ResetClocks resets application and locked clocks (needs control).
func (c *Client) ResetClocks(ctx context.Context, gpus ...*pb.GpuSelector) (r *pb.ResetClocksResponse, err error) {
	err = c.unary(ctx, "ResetClocks", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.ResetClocks(ctx, &pb.ResetClocksRequest{Gpus: gpus})
		return
	})
	return
}

// SetThreshold sets the governor's target temperature in °C (needs control).
func (c *Client) SetThreshold(ctx context.Context, celsius uint32, gpus ...*pb.GpuSelector) (r *pb.SetThresholdResponse, err error) {
	req := &pb.SetThresholdRequest{Gpus: gpus, Target: &pb.SetThresholdRequest_Celsius{Celsius: celsius}}
	err = c.unary(ctx, "SetThreshold", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.SetThreshold(ctx, req)
		return
	})
	return
}

// Pick ranks the GPUs against criteria; grants nothing (read role).
func (c *Client) Pick(ctx context.Context, criteria *pb.PickCriteria) (r *pb.PickGpusResponse, err error) {
	err = c.unary(ctx, "PickGpus", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.PickGpus(ctx, &pb.PickGpusRequest{Criteria: criteria})
		return
	})
	return
}

// Lease picks and leases GPUs for ttl (lease role). All or nothing: when
// fewer than the count fit, r.Satisfied is false and r.Shortfall says why.
// Never retried.
func (c *Client) Lease(ctx context.Context, criteria *pb.PickCriteria, ttl time.Duration, purpose string) (r *pb.PickGpusResponse, err error) {
	req := &pb.LeaseGpusRequest{Criteria: criteria, TtlS: uint32(ttl / time.Second), Purpose: purpose}
	err = c.unary(ctx, "LeaseGpus", false, func(ctx context.Context) (e error) {
		r, e = c.RPC.LeaseGpus(ctx, req)
		return
	})
	return
}

// Renew extends leases the caller holds (ttl 0 keeps each lease's TTL).
func (c *Client) Renew(ctx context.Context, ttl time.Duration, ids ...string) (r *pb.RenewLeaseResponse, err error) {
	req := &pb.RenewLeaseRequest{LeaseIds: ids, TtlS: uint32(ttl / time.Second)}
	err = c.unary(ctx, "RenewLease", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.RenewLease(ctx, req)
		return
	})
	return
}

// Release ends leases the caller holds.
func (c *Client) Release(ctx context.Context, ids ...string) (r *pb.ReleaseLeaseResponse, err error) {
	err = c.unary(ctx, "ReleaseLease", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.ReleaseLease(ctx, &pb.ReleaseLeaseRequest{LeaseIds: ids})
		return
	})
	return
}

// Leases lists the live leases.
func (c *Client) Leases(ctx context.Context) (r *pb.ListLeasesResponse, err error) {
	err = c.unary(ctx, "ListLeases", true, func(ctx context.Context) (e error) {
		r, e = c.RPC.ListLeases(ctx, &pb.ListLeasesRequest{})
		return
	})
	return
}

// Watch streams telemetry to fn until ctx ends, fn returns an error, or
// (without reconnect) the stream ends. With reconnect, a lost connection
// or a daemon restart is retried with backoff and the stream resumes after
// the last frame delivered: fn sees the new start, then a gap for what the
// daemon could not replay. fn returning io.EOF stops without an error.
func (c *Client) Watch(ctx context.Context, req *pb.WatchRequest, reconnect bool, fn func(*pb.WatchResponse) error) error {
	var last *uint64
	if req.ResumeAfterSeq != nil {
		v := *req.ResumeAfterSeq
		last = &v
	}
	for failures := 0; ; {
		r := proto.Clone(req).(*pb.WatchRequest)
		r.ResumeAfterSeq = last
		stream, err := c.RPC.Watch(ctx, r)
		if err == nil {
			for {
				var msg *pb.WatchResponse
				msg, err = stream.Recv()
				if err != nil {
					break
				}
				switch m := msg.Message.(type) {
				case *pb.WatchResponse_Frame:
					seq := m.Frame.Seq
					last, failures = &seq, 0
				case *pb.WatchResponse_Start:
					if m.Start.Current != nil {
						seq := m.Start.Current.Seq
						last = &seq
					}
				}
				if ferr := fn(msg); ferr != nil {
					if errors.Is(ferr, io.EOF) {
						return nil
					}
					return ferr
				}
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		st, _ := status.FromError(err)
		if err != io.EOF && st.Code() != codes.Unavailable {
			return &Error{Call: "Watch", Code: st.Code(), Message: st.Message()}
		}
		if !reconnect {
			return nil
		}
		failures++
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay(c.opts.Backoff, failures)):
		}
	}
}

// Events streams the event log to fn: the replay after sinceSeq (nil: new
// events only), caught_up, then live events; with reconnect it resumes
// after the last event seen. fn returning io.EOF stops without an error.
func (c *Client) Events(ctx context.Context, sinceSeq *uint64, reconnect bool, fn func(*pb.WatchEventsResponse) error) error {
	last := sinceSeq
	for failures := 0; ; {
		stream, err := c.RPC.WatchEvents(ctx, &pb.WatchEventsRequest{SinceSeq: last})
		if err == nil {
			for {
				var msg *pb.WatchEventsResponse
				msg, err = stream.Recv()
				if err != nil {
					break
				}
				switch m := msg.Message.(type) {
				case *pb.WatchEventsResponse_Event:
					seq := m.Event.Seq
					last, failures = &seq, 0
				case *pb.WatchEventsResponse_CaughtUp:
					if last == nil {
						seq := m.CaughtUp.LatestSeq
						last = &seq
					}
				}
				if ferr := fn(msg); ferr != nil {
					if errors.Is(ferr, io.EOF) {
						return nil
					}
					return ferr
				}
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		st, _ := status.FromError(err)
		if err != io.EOF && st.Code() != codes.Unavailable {
			return &Error{Call: "WatchEvents", Code: st.Code(), Message: st.Message()}
		}
		if !reconnect {
			return nil
		}
		failures++
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay(c.opts.Backoff, failures)):
		}
	}
}

// Index selects a GPU by index; UUID by UUID; All every GPU.
func Index(i uint32) *pb.GpuSelector {
	return &pb.GpuSelector{Selector: &pb.GpuSelector_Index{Index: i}}
}

// UUID selects a GPU (or MIG instance) by UUID.
func UUID(u string) *pb.GpuSelector {
	return &pb.GpuSelector{Selector: &pb.GpuSelector_Uuid{Uuid: u}}
}

// All selects every GPU.
func All() *pb.GpuSelector {
	return &pb.GpuSelector{Selector: &pb.GpuSelector_All{All: true}}
}
