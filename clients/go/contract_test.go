// Unit tests of the contract checkers on hand-made messages, and (when
// GPUWATCH_TARGET names a live daemon, as .ci/go.sh arranges) the example's
// calls against it.
package main

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	pb "gpuwatch/clients/go/gpuwatchv1"
)

func startMsg(stride uint32, current *uint64) *pb.WatchResponse {
	st := &pb.WatchStart{Stride: stride, SamplerIntervalMs: 100, IntervalMs: stride * 100, LatestSeq: 1000}
	if current != nil {
		st.Current = frameOf(*current)
	}
	return &pb.WatchResponse{Message: &pb.WatchResponse_Start{Start: st}}
}

func frameOf(seq uint64) *pb.Frame {
	return &pb.Frame{Seq: seq, Samples: []*pb.GpuSample{{Index: 0, Seq: seq}}}
}

func frameMsg(seq uint64) *pb.WatchResponse {
	return &pb.WatchResponse{Message: &pb.WatchResponse_Frame{Frame: frameOf(seq)}}
}

func gapMsg(first, last uint64) *pb.WatchResponse {
	return &pb.WatchResponse{Message: &pb.WatchResponse_Gap{Gap: &pb.Gap{FirstSeq: first, LastSeq: last, Missed: 1}}}
}

func feed(t *testing.T, c *watchContract, msgs ...*pb.WatchResponse) error {
	t.Helper()
	for _, m := range msgs {
		if _, err := c.observe(m); err != nil {
			return err
		}
	}
	return nil
}

func TestFramesAdvancingByTheStridePass(t *testing.T) {
	c := &watchContract{}
	if err := feed(t, c, startMsg(2, u64(1000)), frameMsg(1002), frameMsg(1004)); err != nil {
		t.Fatal(err)
	}
	if c.frames != 2 || *c.lastSeq != 1004 {
		t.Fatalf("frames %d last %d", c.frames, *c.lastSeq)
	}
}

func TestAJumpWithoutAGapIsAViolation(t *testing.T) {
	err := feed(t, &watchContract{}, startMsg(2, u64(1000)), frameMsg(1002), frameMsg(1008))
	if err == nil || !strings.Contains(err.Error(), "jumped from 1002 to 1008") {
		t.Fatalf("got %v", err)
	}
}

func TestAGapAccountsForTheSkippedTicks(t *testing.T) {
	c := &watchContract{}
	if err := feed(t, c, startMsg(2, u64(1000)), gapMsg(1001, 1010), frameMsg(1011), frameMsg(1013)); err != nil {
		t.Fatal(err)
	}
	if c.gaps != 1 || c.frames != 2 {
		t.Fatalf("gaps %d frames %d", c.gaps, c.frames)
	}
}

func TestTheFrameAfterAGapMustFollowIt(t *testing.T) {
	err := feed(t, &watchContract{}, startMsg(1, u64(1000)), gapMsg(1001, 1005), frameMsg(1007))
	if err == nil || !strings.Contains(err.Error(), "expected 1006") {
		t.Fatalf("got %v", err)
	}
}

func TestTheStreamMustOpenWithStart(t *testing.T) {
	if err := feed(t, &watchContract{}, frameMsg(1)); err == nil {
		t.Fatal("a frame before start was accepted")
	}
}

func TestEventSeqsMustRise(t *testing.T) {
	c := &eventsContract{sinceSeq: u64(0)}
	ev := func(seq uint64) *pb.WatchEventsResponse {
		return &pb.WatchEventsResponse{Message: &pb.WatchEventsResponse_Event{Event: &pb.Event{Seq: seq}}}
	}
	if _, err := c.observe(ev(3)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.observe(ev(3)); err == nil {
		t.Fatal("a repeated event seq was accepted")
	}
}

// TestLiveDaemon runs the example's three calls against GPUWATCH_TARGET.
func TestLiveDaemon(t *testing.T) {
	target := os.Getenv("GPUWATCH_TARGET")
	if target == "" {
		t.Skip("GPUWATCH_TARGET is not set; .ci/go.sh starts a daemon and sets it")
	}
	o := options{target: target, frames: 5, intervalMs: 200, timeout: 20 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := dial(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := pb.NewGpuWatchClient(conn)
	n, err := listDevices(ctx, client, o)
	if err != nil || n == 0 {
		t.Fatalf("ListDevices: %d GPUs, %v", n, err)
	}
	if err := watch(ctx, client, o); err != nil {
		t.Fatal(err)
	}
	if err := events(ctx, client, o); err != nil {
		t.Fatal(err)
	}
	stream, err := client.Watch(ctx, &pb.WatchRequest{IntervalMs: 1})
	if err == nil {
		// On a server stream the status arrives with the first Recv.
		_, err = stream.Recv()
	}
	if err == nil || !strings.Contains(err.Error(), "minimum") {
		t.Fatalf("an interval below the sampler's: %v", err)
	}
}
