// The stream contracts of gpuwatch.v1, checked message by message.
//
// Watch promises (proto/gpuwatch/v1/gpuwatch.proto): the first message is
// `start`; consecutive frames differ in seq by exactly the stream's stride
// unless a `gap` between them names the ticks that were not delivered.
// WatchEvents promises rising event seqs and one `caught_up` after the replay.
// A scheduler that silently lost frames would compute wrong averages, so a
// broken promise is an error here. The checkers are pure so contract_test.go
// can drive them with hand-made messages.

package main

import (
	"fmt"

	pb "gpuwatch/clients/go/gpuwatchv1"
)

// watchContract checks one Watch stream.
type watchContract struct {
	resumeAfter *uint64 // the request's resume_after_seq
	stride      uint64  // from start; 0 until start arrived
	lastSeq     *uint64 // last frame delivered (or start.current)
	expectSeq   *uint64 // after a gap: the seq the next frame must carry
	frames      int
	gaps        int
	missed      uint64
}

func u64(v uint64) *uint64 { return &v }

// observe checks msg and returns its kind: "start", "frame" or "gap".
func (c *watchContract) observe(msg *pb.WatchResponse) (string, error) {
	switch m := msg.Message.(type) {
	case *pb.WatchResponse_Start:
		if c.stride != 0 {
			return "", fmt.Errorf("a second 'start' message arrived")
		}
		return "start", c.start(m.Start)
	case *pb.WatchResponse_Frame:
		if c.stride == 0 {
			return "", fmt.Errorf("the first Watch message is 'frame', not 'start'")
		}
		return "frame", c.frame(m.Frame)
	case *pb.WatchResponse_Gap:
		if c.stride == 0 {
			return "", fmt.Errorf("the first Watch message is 'gap', not 'start'")
		}
		return "gap", c.gap(m.Gap)
	case *pb.WatchResponse_History:
		// A resume older than the ring: the store's points for the missed
		// range, sent before that range's gap (no frames, no seqs).
		if c.stride == 0 {
			return "", fmt.Errorf("the first Watch message is 'history', not 'start'")
		}
		return "history", nil
	default:
		return "", fmt.Errorf("unknown Watch message %T", msg.Message)
	}
}

func (c *watchContract) start(st *pb.WatchStart) error {
	if st.Stride < 1 {
		return fmt.Errorf("start.stride is %d; it must be at least 1", st.Stride)
	}
	if st.IntervalMs != st.Stride*st.SamplerIntervalMs {
		return fmt.Errorf("start.interval_ms %d is not stride %d x sampler interval %d ms",
			st.IntervalMs, st.Stride, st.SamplerIntervalMs)
	}
	c.stride = uint64(st.Stride)
	resumed := c.resumeAfter != nil && *c.resumeAfter <= st.LatestSeq
	if st.Current != nil {
		if resumed {
			return fmt.Errorf("a resumed stream's start carries a current frame")
		}
		if err := samplesMatch(st.Current); err != nil {
			return err
		}
		c.lastSeq = u64(st.Current.Seq)
	} else if resumed {
		c.lastSeq = u64(*c.resumeAfter)
	}
	return nil
}

func (c *watchContract) gap(g *pb.Gap) error {
	if g.FirstSeq > g.LastSeq {
		return fmt.Errorf("gap %d..%d is empty", g.FirstSeq, g.LastSeq)
	}
	// Ticks up to here were delivered or named by an earlier gap.
	var accounted *uint64
	if c.expectSeq != nil {
		accounted = u64(*c.expectSeq - 1)
	} else {
		accounted = c.lastSeq
	}
	if accounted != nil && g.FirstSeq <= *accounted {
		return fmt.Errorf("gap %d..%d starts at or before seq %d, which was already accounted for",
			g.FirstSeq, g.LastSeq, *accounted)
	}
	c.gaps++
	c.missed += g.Missed
	c.expectSeq = u64(g.LastSeq + 1)
	return nil
}

func (c *watchContract) frame(f *pb.Frame) error {
	if c.expectSeq != nil {
		if f.Seq != *c.expectSeq {
			return fmt.Errorf("frame seq %d after a gap ending at %d; expected %d",
				f.Seq, *c.expectSeq-1, *c.expectSeq)
		}
	} else if c.lastSeq != nil && f.Seq != *c.lastSeq+c.stride {
		return fmt.Errorf("frame seq jumped from %d to %d (stride %d) without a gap",
			*c.lastSeq, f.Seq, c.stride)
	}
	if err := samplesMatch(f); err != nil {
		return err
	}
	c.lastSeq = u64(f.Seq)
	c.expectSeq = nil
	c.frames++
	return nil
}

func samplesMatch(f *pb.Frame) error {
	for _, s := range f.Samples {
		if s.Seq != f.Seq {
			return fmt.Errorf("GPU %d's sample has seq %d inside frame %d", s.Index, s.Seq, f.Seq)
		}
	}
	return nil
}

// eventsContract checks one WatchEvents stream.
type eventsContract struct {
	sinceSeq *uint64
	lastSeq  *uint64
	caughtUp *uint64
	replayed int
	live     int
}

// observe checks msg and returns its kind: "event", "caught_up" or "gap".
func (c *eventsContract) observe(msg *pb.WatchEventsResponse) (string, error) {
	switch m := msg.Message.(type) {
	case *pb.WatchEventsResponse_Event:
		seq := m.Event.Seq
		if c.sinceSeq != nil && c.caughtUp == nil && seq <= *c.sinceSeq {
			return "", fmt.Errorf("replayed event seq %d is not after since_seq %d", seq, *c.sinceSeq)
		}
		if c.lastSeq != nil && seq <= *c.lastSeq {
			return "", fmt.Errorf("event seq %d does not rise after %d", seq, *c.lastSeq)
		}
		c.lastSeq = u64(seq)
		if c.caughtUp == nil {
			c.replayed++
		} else {
			c.live++
		}
		return "event", nil
	case *pb.WatchEventsResponse_CaughtUp:
		if c.caughtUp != nil {
			return "", fmt.Errorf("a second 'caught_up' message arrived")
		}
		latest := m.CaughtUp.LatestSeq
		if c.lastSeq != nil && latest < *c.lastSeq {
			return "", fmt.Errorf("caught_up.latest_seq %d is below the last replayed seq %d", latest, *c.lastSeq)
		}
		c.caughtUp = u64(latest)
		c.lastSeq = u64(latest)
		return "caught_up", nil
	case *pb.WatchEventsResponse_Gap:
		g := m.Gap
		if g.FirstSeq > g.LastSeq {
			return "", fmt.Errorf("gap %d..%d is empty", g.FirstSeq, g.LastSeq)
		}
		if c.lastSeq != nil && g.FirstSeq <= *c.lastSeq {
			return "", fmt.Errorf("gap %d..%d overlaps events already seen (up to %d)", g.FirstSeq, g.LastSeq, *c.lastSeq)
		}
		c.lastSeq = u64(g.LastSeq)
		return "gap", nil
	default:
		return "", fmt.Errorf("unknown WatchEvents message %T", msg.Message)
	}
}
