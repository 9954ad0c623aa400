"""The contract checkers on hand-made messages: each broken promise is caught."""

import pytest

from gpuwatch_client import ContractViolation, EventsContract, WatchContract
from gpuwatch_client.v1 import gpuwatch_pb2, telemetry_pb2


def start(stride=2, sampler_ms=100, current_seq=None, latest_seq=1000):
    st = gpuwatch_pb2.WatchStart(
        stride=stride, sampler_interval_ms=sampler_ms, interval_ms=stride * sampler_ms,
        oldest_seq=900, latest_seq=latest_seq,
    )
    if current_seq is not None:
        st.current.CopyFrom(frame_msg(current_seq))
    return gpuwatch_pb2.WatchResponse(start=st)


def frame_msg(seq, sample_seq=None):
    return telemetry_pb2.Frame(
        seq=seq, samples=[telemetry_pb2.GpuSample(index=0, uuid="GPU-0", seq=sample_seq or seq)]
    )


def frame(seq, sample_seq=None):
    return gpuwatch_pb2.WatchResponse(frame=frame_msg(seq, sample_seq))


def gap(first, last, missed=1):
    return gpuwatch_pb2.WatchResponse(
        gap=gpuwatch_pb2.Gap(first_seq=first, last_seq=last, missed=missed,
                             reason=gpuwatch_pb2.GAP_REASON_SLOW_SUBSCRIBER)
    )


def test_frames_advancing_by_the_stride_pass():
    c = WatchContract()
    for msg in [start(stride=2, current_seq=1000), frame(1002), frame(1004), frame(1006)]:
        c.observe(msg)
    assert (c.frames, c.last_seq, c.stride) == (3, 1006, 2)


def test_a_jump_without_a_gap_is_a_violation():
    c = WatchContract()
    c.observe(start(stride=2, current_seq=1000))
    c.observe(frame(1002))
    with pytest.raises(ContractViolation, match="jumped from 1002 to 1008"):
        c.observe(frame(1008))


def test_a_gap_accounts_for_the_skipped_ticks():
    c = WatchContract()
    for msg in [start(stride=2, current_seq=1000), frame(1002), gap(1003, 1010, missed=4),
                frame(1011), frame(1013)]:
        c.observe(msg)
    assert (c.frames, len(c.gaps), c.missed) == (3, 1, 4)


def test_the_frame_after_a_gap_must_follow_it():
    c = WatchContract()
    c.observe(start(stride=1, current_seq=1000))
    c.observe(gap(1001, 1005))
    with pytest.raises(ContractViolation, match="expected 1006"):
        c.observe(frame(1007))


def test_a_gap_overlapping_delivered_frames_is_a_violation():
    c = WatchContract()
    c.observe(start(stride=1, current_seq=1000))
    c.observe(frame(1001))
    with pytest.raises(ContractViolation, match="already accounted for"):
        c.observe(gap(1001, 1004))


def test_the_stream_must_open_with_start():
    with pytest.raises(ContractViolation, match="not 'start'"):
        WatchContract().observe(frame(1))


def test_start_interval_must_be_stride_times_sampler():
    bad = start(stride=2)
    bad.start.interval_ms = 150
    with pytest.raises(ContractViolation, match="not stride 2"):
        WatchContract().observe(bad)


def test_a_sample_from_another_tick_is_a_violation():
    c = WatchContract()
    c.observe(start(stride=1, current_seq=1000))
    with pytest.raises(ContractViolation, match="seq 999 inside frame 1001"):
        c.observe(frame(1001, sample_seq=999))


def test_a_resume_continues_after_the_requested_seq():
    c = WatchContract(resume_after_seq=950)
    c.observe(start(stride=2, latest_seq=1000))
    c.observe(frame(952))
    with pytest.raises(ContractViolation):
        c.observe(frame(955))


def test_a_resumed_start_must_not_carry_a_current_frame():
    with pytest.raises(ContractViolation, match="resumed"):
        WatchContract(resume_after_seq=950).observe(start(current_seq=1000))


def ev(seq):
    m = gpuwatch_pb2.WatchEventsResponse()
    m.event.seq = seq
    return m


def caught_up(latest):
    m = gpuwatch_pb2.WatchEventsResponse()
    m.caught_up.latest_seq = latest
    return m


def test_events_replay_then_live_pass():
    c = EventsContract(since_seq=0)
    for msg in [ev(1), ev(2), caught_up(3), ev(4)]:
        c.observe(msg)
    assert (c.replayed, c.caught_up, c.live) == (2, 3, 1)


def test_event_seqs_must_rise():
    c = EventsContract()
    c.observe(ev(5))
    with pytest.raises(ContractViolation, match="does not rise"):
        c.observe(ev(5))


def test_replayed_events_must_come_after_since_seq():
    with pytest.raises(ContractViolation, match="not after since_seq 10"):
        EventsContract(since_seq=10).observe(ev(10))


def test_caught_up_must_not_go_back():
    c = EventsContract(since_seq=0)
    c.observe(ev(7))
    with pytest.raises(ContractViolation, match="below the last replayed"):
        c.observe(caught_up(6))
