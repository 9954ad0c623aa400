package gpuwatch

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	pb "gpuwatch/clients/go/gpuwatchv1"
)

const (
	leaseToken  = "go-lease-token-0123456789"
	leaseTokenB = "go-lease-token-b-0123456789"
	readToken   = "go-read-token-0123456789"
)

const fourGPUs = `
[sampler]
interval = "100ms"
[simulator]
gpus = [{ preset = "h100-sxm" }, { preset = "h100-sxm" }, { preset = "h100-sxm" }, { preset = "h100-sxm" }]
`

// daemon is a gpuwatch-server on simulated GPUs ($GPUWATCH_SERVER_BIN).
type daemon struct {
	t      *testing.T
	dir    string
	listen string
	Target string
	cmd    *exec.Cmd
}

func startDaemon(t *testing.T, dir, listen string) *daemon {
	t.Helper()
	bin := os.Getenv("GPUWATCH_SERVER_BIN")
	if bin == "" {
		t.Skip("GPUWATCH_SERVER_BIN is not set (.ci/go.sh sets it)")
	}
	tokens := filepath.Join(dir, "tokens.toml")
	body := `[[tokens]]
name = "sched-a"
role = "lease"
token = "` + leaseToken + `"
[[tokens]]
name = "sched-b"
role = "lease"
token = "` + leaseTokenB + `"
[[tokens]]
name = "reader"
role = "read"
token = "` + readToken + `"
`
	if err := os.WriteFile(tokens, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "gpuwatch.toml")
	if err := os.WriteFile(config, []byte(fourGPUs), 0o644); err != nil {
		t.Fatal(err)
	}
	ready := filepath.Join(dir, "ready.json")
	_ = os.Remove(ready)
	cmd := exec.Command(bin, "--simulate", "--config", config, "--listen", listen,
		"--http-listen", "off", "--state-dir", filepath.Join(dir, "state"), "--ready-file", ready)
	cmd.Env = append(os.Environ(), "GPUWATCH_AUTH__TOKEN_FILE="+tokens)
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, dir: dir, listen: listen, cmd: cmd}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		data, err := os.ReadFile(ready)
		var r struct{ Grpc string }
		if err == nil && json.Unmarshal(data, &r) == nil && r.Grpc != "" {
			d.Target = r.Grpc
			return d
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.kill()
	t.Fatalf("gpuwatch-server did not become ready")
	return nil
}

func (d *daemon) kill() {
	if d.cmd.Process != nil {
		_ = d.cmd.Process.Kill()
		_, _ = d.cmd.Process.Wait()
	}
}

func (d *daemon) restart() *daemon {
	d.kill()
	var next *daemon
	for i := 0; i < 30 && next == nil; i++ {
		func() {
			defer func() { _ = recover() }()
			next = startDaemon(d.t, d.dir, d.Target)
		}()
		if next == nil {
			time.Sleep(300 * time.Millisecond)
		}
	}
	if next == nil {
		d.t.Fatal("cannot restart the daemon")
	}
	return next
}

func dial(t *testing.T, target, token string) *Client {
	t.Helper()
	c, err := Dial(target, Options{Token: token, Timeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestFiftyConcurrentLeasesHandOutEachGPUAtMostOnce(t *testing.T) {
	d := startDaemon(t, t.TempDir(), "127.0.0.1:0")
	defer d.kill()
	ctx := context.Background()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var granted []*pb.Lease
	refused := 0
	start := make(chan struct{})
	for i := 0; i < 50; i++ {
		token := leaseToken
		if i%2 == 1 {
			token = leaseTokenB
		}
		c := dial(t, d.Target, token)
		defer c.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			r, err := c.Lease(ctx, &pb.PickCriteria{Count: 1, AllowBusy: true}, 10*time.Minute, "go test")
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				t.Errorf("lease: %v", err)
				return
			}
			if r.Satisfied {
				granted = append(granted, r.Leases...)
			} else {
				refused++
			}
		}()
	}
	close(start)
	wg.Wait()
	seen := map[string]bool{}
	for _, l := range granted {
		if seen[l.Uuid] {
			t.Fatalf("GPU %s leased twice", l.Uuid)
		}
		seen[l.Uuid] = true
	}
	if len(granted) != 4 || refused != 46 {
		t.Fatalf("granted %d, refused %d; want 4 and 46", len(granted), refused)
	}
}

func TestExpiryRestartAndRoles(t *testing.T) {
	d := startDaemon(t, t.TempDir(), "127.0.0.1:0")
	defer func() { d.kill() }()
	ctx := context.Background()
	c := dial(t, d.Target, leaseToken)
	short, err := c.Lease(ctx, &pb.PickCriteria{Count: 1, AllowBusy: true}, 2*time.Second, "")
	if err != nil || !short.Satisfied {
		t.Fatalf("short lease: %v %v", short, err)
	}
	long, err := c.Lease(ctx, &pb.PickCriteria{Count: 2, AllowBusy: true}, time.Hour, "")
	if err != nil || !long.Satisfied {
		t.Fatalf("long lease: %v %v", long, err)
	}
	c.Close()
	d = d.restart()
	r := dial(t, d.Target, readToken)
	defer r.Close()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ls, err := r.Leases(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(ls.Leases) == 2 {
			for _, l := range ls.Leases {
				if l.Id != long.Leases[0].Id && l.Id != long.Leases[1].Id {
					t.Fatalf("unexpected lease %v", l)
				}
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("leases after restart and TTL: %v", ls.Leases)
		}
		time.Sleep(300 * time.Millisecond)
	}
	_, err = r.Lease(ctx, &pb.PickCriteria{Count: 1, AllowBusy: true}, time.Minute, "")
	var e *Error
	if !errors.As(err, &e) || e.Code != codes.PermissionDenied || !strings.Contains(e.Message, "lease") {
		t.Fatalf("a read token leasing: %v", err)
	}
	p, err := r.Pick(ctx, &pb.PickCriteria{Count: 1, MinFreeMemoryBytes: u64(1 << 50), AllowBusy: true})
	if err != nil || p.Satisfied || !strings.Contains(p.Shortfall, "free_memory") {
		t.Fatalf("an impossible pick: %v %v", p, err)
	}
}

func u64(v uint64) *uint64 { return &v }

func TestWatchResumesAcrossARestart(t *testing.T) {
	d := startDaemon(t, t.TempDir(), "127.0.0.1:0")
	defer func() { d.kill() }()
	c, err := Dial(d.Target, Options{Token: readToken, Backoff: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var frames []uint64
	starts := 0
	err = c.Watch(ctx, &pb.WatchRequest{}, true, func(m *pb.WatchResponse) error {
		switch msg := m.Message.(type) {
		case *pb.WatchResponse_Start:
			starts++
		case *pb.WatchResponse_Frame:
			frames = append(frames, msg.Frame.Seq)
			if len(frames) == 5 {
				d = d.restart()
			}
			if len(frames) == 10 {
				return io.EOF
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if starts != 2 || len(frames) != 10 {
		t.Fatalf("starts %d frames %v", starts, frames)
	}
	for i := 1; i < len(frames); i++ {
		if frames[i] <= frames[i-1] {
			t.Fatalf("seq went back: %v", frames)
		}
	}
	n := 0
	zero := uint64(0)
	err = c.Events(ctx, &zero, true, func(m *pb.WatchEventsResponse) error {
		if _, ok := m.Message.(*pb.WatchEventsResponse_CaughtUp); ok {
			return io.EOF
		}
		n++
		return nil
	})
	if err != nil || n == 0 {
		t.Fatalf("events: %d %v", n, err)
	}
}

func TestFleetReportsADeadHostAndPicksAcrossTheOthers(t *testing.T) {
	a := startDaemon(t, t.TempDir(), "127.0.0.1:0")
	defer a.kill()
	b := startDaemon(t, t.TempDir(), "127.0.0.1:0")
	defer b.kill()
	ctx := context.Background()
	f, err := NewFleet(ctx, []string{a.Target, b.Target, "127.0.0.1:1"}, true,
		Options{Token: leaseToken, Timeout: 3 * time.Second, Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	results := f.Call(ctx, func(ctx context.Context, c *Client) (interface{}, error) { return c.ListDevices(ctx) })
	if results[0].Err != nil || results[1].Err != nil || results[2].Err == nil {
		t.Fatalf("results: %+v", results)
	}
	p := f.Pick(ctx, 6, &pb.PickCriteria{AllowBusy: true}, time.Minute, "fleet")
	if !p.Satisfied || len(p.Leases[a.Target])+len(p.Leases[b.Target]) != 6 {
		t.Fatalf("fleet pick: %+v", p)
	}
	if again := f.Pick(ctx, 3, &pb.PickCriteria{AllowBusy: true}, time.Minute, ""); again.Satisfied {
		t.Fatalf("only 2 GPUs are left: %+v", again)
	}
}

func TestExpandKeepsAddressesAndResolvesNames(t *testing.T) {
	got := Expand(context.Background(), []string{"10.0.0.1", "[::1]:9451", "localhost:9450", "10.0.0.1:9450"})
	if got[0] != "10.0.0.1:9450" || got[1] != "[::1]:9451" {
		t.Fatalf("%v", got)
	}
	found := false
	for _, g := range got {
		if g == "127.0.0.1:9450" {
			found = true
		}
	}
	if !found {
		t.Fatalf("localhost did not expand to 127.0.0.1: %v", got)
	}
}
