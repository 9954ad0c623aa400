"""The stream contracts of gpuwatch.v1, checked message by message.

Why this exists: ``Watch`` and ``WatchEvents`` make promises in
``proto/gpuwatch/v1/gpuwatch.proto`` that a scheduler relies on: a Watch stream
opens with ``start``; consecutive frames differ in ``seq`` by exactly the
stream's ``stride`` unless a ``gap`` between them names the ticks that were not
delivered; a WatchEvents replay ends with ``caught_up``; event sequence numbers
only rise. A client that silently lost frames would compute wrong energy or
wrong averages, so the checkers here turn a broken promise into an exception.

They are pure (no network, no clock) so they can be tested with hand-made
messages, and :class:`gpuwatch_client.client.GpuWatchClient` runs every stream
through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .v1 import gpuwatch_pb2, telemetry_pb2


class ContractViolation(Exception):
    """The daemon broke a promise of the gpuwatch.v1 contract."""


@dataclass
class WatchContract:
    """Checks one Watch stream.

    ``resume_after_seq`` is what the request asked for (``None`` for a fresh
    subscription). Feed every message to :meth:`observe` in order.
    """

    resume_after_seq: Optional[int] = None
    #: From ``start``: frames advance by this many sampler ticks.
    stride: Optional[int] = None
    #: The seq of the last frame delivered (or of ``start.current``).
    last_seq: Optional[int] = None
    #: After a gap, the seq the next frame must carry.
    expect_seq: Optional[int] = None
    frames: int = 0
    gaps: list = field(default_factory=list)
    #: Frames the daemon said this subscriber missed (sum of ``gap.missed``).
    missed: int = 0

    def observe(self, msg: gpuwatch_pb2.WatchResponse) -> str:
        """Checks ``msg``; returns its kind ("start", "frame", "gap" or "history")."""
        kind = msg.WhichOneof("message")
        if self.stride is None:
            if kind != "start":
                raise ContractViolation(f"the first Watch message is {kind!r}, not 'start'")
            self._start(msg.start)
            return kind
        if kind == "start":
            raise ContractViolation("a second 'start' message arrived")
        if kind == "gap":
            self._gap(msg.gap)
        elif kind == "frame":
            self._frame(msg.frame)
        elif kind == "history":
            # A resume older than the ring: the store's points for the
            # missed range, before that range's gap (no frames, no seqs).
            pass
        else:
            raise ContractViolation(f"unknown Watch message kind {kind!r}")
        return kind

    def _start(self, start: gpuwatch_pb2.WatchStart) -> None:
        if start.stride < 1:
            raise ContractViolation(f"start.stride is {start.stride}; it must be at least 1")
        if start.interval_ms != start.stride * start.sampler_interval_ms:
            raise ContractViolation(
                f"start.interval_ms {start.interval_ms} is not stride {start.stride} x "
                f"sampler interval {start.sampler_interval_ms} ms"
            )
        self.stride = start.stride
        resumed = self.resume_after_seq is not None and self.resume_after_seq <= start.latest_seq
        if start.HasField("current"):
            if resumed:
                raise ContractViolation("a resumed stream's start carries a current frame")
            self._samples_match(start.current)
            self.last_seq = start.current.seq
        elif resumed:
            self.last_seq = self.resume_after_seq

    def _gap(self, gap: gpuwatch_pb2.Gap) -> None:
        if gap.first_seq > gap.last_seq:
            raise ContractViolation(f"gap {gap.first_seq}..{gap.last_seq} is empty")
        # Ticks up to here were delivered or named by an earlier gap.
        accounted = self.expect_seq - 1 if self.expect_seq is not None else self.last_seq
        if accounted is not None and gap.first_seq <= accounted:
            raise ContractViolation(
                f"gap {gap.first_seq}..{gap.last_seq} starts at or before seq {accounted}, "
                "which was already accounted for"
            )
        self.gaps.append(gap)
        self.missed += gap.missed
        self.expect_seq = gap.last_seq + 1

    def _frame(self, frame: telemetry_pb2.Frame) -> None:
        if self.expect_seq is not None:
            if frame.seq != self.expect_seq:
                raise ContractViolation(
                    f"frame seq {frame.seq} after a gap ending at {self.expect_seq - 1}; "
                    f"expected {self.expect_seq}"
                )
        elif (
            self.last_seq is not None
            and self.stride is not None
            and frame.seq != self.last_seq + self.stride
        ):
            raise ContractViolation(
                f"frame seq jumped from {self.last_seq} to {frame.seq} (stride {self.stride}) "
                "without a gap"
            )
        self._samples_match(frame)
        self.last_seq = frame.seq
        self.expect_seq = None
        self.frames += 1

    @staticmethod
    def _samples_match(frame: telemetry_pb2.Frame) -> None:
        for s in frame.samples:
            if s.seq != frame.seq:
                raise ContractViolation(
                    f"GPU {s.index}'s sample has seq {s.seq} inside frame {frame.seq}"
                )


@dataclass
class EventsContract:
    """Checks one WatchEvents stream: rising seqs, one ``caught_up``."""

    since_seq: Optional[int] = None
    last_seq: Optional[int] = None
    caught_up: Optional[int] = None
    replayed: int = 0
    live: int = 0
    gaps: list = field(default_factory=list)

    def observe(self, msg: gpuwatch_pb2.WatchEventsResponse) -> str:
        """Checks ``msg``; returns its kind ("event", "caught_up" or "gap")."""
        kind = msg.WhichOneof("message")
        if kind == "event":
            seq = msg.event.seq
            if self.since_seq is not None and self.caught_up is None and seq <= self.since_seq:
                raise ContractViolation(
                    f"replayed event seq {seq} is not after since_seq {self.since_seq}"
                )
            if self.last_seq is not None and seq <= self.last_seq:
                raise ContractViolation(f"event seq {seq} does not rise after {self.last_seq}")
            self.last_seq = seq
            if self.caught_up is None:
                self.replayed += 1
            else:
                self.live += 1
        elif kind == "caught_up":
            if self.caught_up is not None:
                raise ContractViolation("a second 'caught_up' message arrived")
            latest = msg.caught_up.latest_seq
            if self.last_seq is not None and latest < self.last_seq:
                raise ContractViolation(
                    f"caught_up.latest_seq {latest} is below the last replayed seq {self.last_seq}"
                )
            self.caught_up = latest
            self.last_seq = max(self.last_seq or 0, latest)
        elif kind == "gap":
            gap = msg.gap
            if gap.first_seq > gap.last_seq:
                raise ContractViolation(f"gap {gap.first_seq}..{gap.last_seq} is empty")
            if self.last_seq is not None and gap.first_seq <= self.last_seq:
                raise ContractViolation(
                    f"gap {gap.first_seq}..{gap.last_seq} overlaps events already seen "
                    f"(up to {self.last_seq})"
                )
            self.gaps.append(gap)
            self.last_seq = gap.last_seq
        else:
            raise ContractViolation(f"unknown WatchEvents message kind {kind!r}")
        return kind
