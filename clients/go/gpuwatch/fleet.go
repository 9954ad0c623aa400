package gpuwatch

import (
	"context"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
	pb "gpuwatch/clients/go/gpuwatchv1"
)

// DefaultPort is the daemon's gRPC port.
const DefaultPort = 9450

func split(target string) (string, string) {
	if host, port, err := net.SplitHostPort(target); err == nil {
		return host, port
	}
	return strings.Trim(target, "[]"), strconv.Itoa(DefaultPort)
}

// Expand returns every address each HOST[:PORT] resolves to, as ADDR:PORT
// targets (a Kubernetes headless Service or round-robin DNS name stands
// for all its pods). IP addresses stay; a name that does not resolve stays
// as written, so its failure is reported. Duplicates are dropped.
func Expand(ctx context.Context, targets []string) []string {
	var out []string
	seen := map[string]bool{}
	add := func(t string) {
		if !seen[t] {
			seen[t] = true
			out = append(out, t)
		}
	}
	for _, t := range targets {
		host, port := split(t)
		if net.ParseIP(host) != nil {
			add(net.JoinHostPort(host, port))
			continue
		}
		addrs, err := net.DefaultResolver.LookupHost(ctx, host)
		if err != nil || len(addrs) == 0 {
			add(t)
			continue
		}
		for _, a := range addrs {
			add(net.JoinHostPort(a, port))
		}
	}
	return out
}

// Fleet is a Client per daemon.
type Fleet struct {
	Targets []string
	Clients map[string]*Client
}

// NewFleet dials every target (after Expand when discover is true).
func NewFleet(ctx context.Context, targets []string, discover bool, opts Options) (*Fleet, error) {
	if discover {
		targets = Expand(ctx, targets)
	}
	f := &Fleet{Targets: targets, Clients: map[string]*Client{}}
	for _, t := range targets {
		c, err := Dial(t, opts)
		if err != nil {
			f.Close()
			return nil, err
		}
		f.Clients[t] = c
	}
	return f, nil
}

// Close closes every connection.
func (f *Fleet) Close() {
	for _, c := range f.Clients {
		_ = c.Close()
	}
}

// Result is one host's answer or error.
type Result struct {
	Target string
	Value  interface{}
	Err    error
}

// Call runs fn on every host at once; partial failure is reported per host,
// in target order.
func (f *Fleet) Call(ctx context.Context, fn func(context.Context, *Client) (interface{}, error)) []Result {
	out := make([]Result, len(f.Targets))
	var wg sync.WaitGroup
	for i, t := range f.Targets {
		wg.Add(1)
		go func(i int, t string) {
			defer wg.Done()
			v, err := fn(ctx, f.Clients[t])
			out[i] = Result{Target: t, Value: v, Err: err}
		}(i, t)
	}
	wg.Wait()
	return out
}

// FleetPick is the best GPUs over the fleet.
type FleetPick struct {
	Satisfied bool
	// Target -> comma-separated GPU UUIDs, for CUDA_VISIBLE_DEVICES.
	CudaVisibleDevices map[string]string
	// Target -> leases granted there (with a TTL).
	Leases map[string][]*pb.Lease
	// Target -> why GPUs were ruled out (when not satisfied).
	Shortfall map[string]string
	// Target -> error, for hosts that did not answer.
	Failed map[string]error
}

// Pick chooses the best count fitting GPUs over all hosts (ties: target
// order, index); with ttl > 0 each chosen host leases exactly the chosen
// GPUs, all or nothing over the fleet.
func (f *Fleet) Pick(ctx context.Context, count int, criteria *pb.PickCriteria, ttl time.Duration, purpose string) FleetPick {
	res := FleetPick{CudaVisibleDevices: map[string]string{}, Leases: map[string][]*pb.Lease{}, Shortfall: map[string]string{}, Failed: map[string]error{}}
	one := proto.Clone(criteria).(*pb.PickCriteria)
	one.Count = 1
	ranked := f.Call(ctx, func(ctx context.Context, c *Client) (interface{}, error) { return c.Pick(ctx, one) })
	type cand struct {
		score float64
		order int
		index uint32
		uuid  string
	}
	var fitting []cand
	for order, r := range ranked {
		if r.Err != nil {
			res.Failed[r.Target] = r.Err
			continue
		}
		resp := r.Value.(*pb.PickGpusResponse)
		var out []string
		for _, c := range resp.Candidates {
			if c.Fits {
				fitting = append(fitting, cand{c.Score, order, c.Index, c.Uuid})
				continue
			}
			var why []string
			for _, reason := range c.Reasons {
				if !reason.Ok {
					why = append(why, reason.Criterion+": "+reason.Detail)
				}
			}
			out = append(out, "GPU "+strconv.Itoa(int(c.Index))+" ("+strings.Join(why, "; ")+")")
		}
		if len(out) > 0 {
			res.Shortfall[r.Target] = strings.Join(out, ", ")
		}
	}
	sort.Slice(fitting, func(i, j int) bool {
		a, b := fitting[i], fitting[j]
		if a.score != b.score {
			return a.score > b.score
		}
		if a.order != b.order {
			return a.order < b.order
		}
		return a.index < b.index
	})
	if len(fitting) < count {
		return res
	}
	chosen := map[string][]string{}
	for _, c := range fitting[:count] {
		t := f.Targets[c.order]
		chosen[t] = append(chosen[t], c.uuid)
	}
	if ttl <= 0 {
		for t, u := range chosen {
			res.CudaVisibleDevices[t] = strings.Join(u, ",")
		}
		res.Satisfied, res.Shortfall = true, map[string]string{}
		return res
	}
	ok := true
	for t, uuids := range chosen {
		c := proto.Clone(criteria).(*pb.PickCriteria)
		c.Count = uint32(len(uuids))
		c.Gpus = nil
		for _, u := range uuids {
			c.Gpus = append(c.Gpus, UUID(u))
		}
		r, err := f.Clients[t].Lease(ctx, c, ttl, purpose)
		switch {
		case err != nil:
			res.Failed[t], ok = err, false
		case !r.Satisfied:
			res.Shortfall[t], ok = r.Shortfall, false
		default:
			res.Leases[t] = r.Leases
		}
	}
	if !ok {
		for t, ls := range res.Leases {
			var ids []string
			for _, l := range ls {
				ids = append(ids, l.Id)
			}
			_, _ = f.Clients[t].Release(ctx, ids...)
		}
		res.Leases = map[string][]*pb.Lease{}
		return res
	}
	for t, u := range chosen {
		res.CudaVisibleDevices[t] = strings.Join(u, ",")
	}
	res.Satisfied, res.Shortfall = true, map[string]string{}
	return res
}
