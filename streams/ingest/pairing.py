"""Joining a call's two halves, as they come off the halves topic (keyed by the call's id, so both
halves of a call are in one partition, in the order they arrived).

State is what the topic holds past the committed offset: a half waiting for its partner keeps the
partition's commit at its offset (``commit_offsets``), so a restarted process reads it again and
waits again; nothing is held only in memory. The price: calls paired after a waiting half are paired
again after a restart and written to the mirror topic twice, with the same request ids, which the
judge's dedup drops (README, "Zero-code ingest").

A half expires when its partition's clock passes its time by ``timeout_ms``: the clock is the
newest arrival time read in that partition, or the wall clock once the partition is read to its
end, so a backlog read after a restart pairs by arrival order, not by how late it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.ingest.kserve import Half


@dataclass
class Waiting:
    half: Half
    offset: int
    arrived_ms: int


@dataclass
class PartitionPairing:
    timeout_ms: int
    waiting: dict[tuple[str, str], Waiting] = field(default_factory=dict)  # (service, id) -> the first half
    clock_ms: int = 0
    next_offset: int = -1  # one past the last half read

    def add(self, half: Half, offset: int, arrived_ms: int) -> tuple[Half, Half] | None:
        """The (request, response) pair this half completes, or None: it waits (a second half of the kind
        already waiting, a repeat, is dropped: the first one keeps its place)."""
        self.next_offset = max(self.next_offset, offset + 1)
        self.clock_ms = max(self.clock_ms, arrived_ms)
        key = (half.service, half.id)
        first = self.waiting.get(key)
        if first is None or first.half.kind == half.kind:
            if first is None:
                self.waiting[key] = Waiting(half, offset, arrived_ms)
            return None
        del self.waiting[key]
        return (first.half, half) if first.half.kind == "request" else (half, first.half)

    def expire(self, now_ms: int | None = None) -> list[Waiting]:
        """Halves whose partner did not come within the timeout; ``now_ms``: the wall clock, when the
        partition has been read to its end."""
        if now_ms is not None:
            self.clock_ms = max(self.clock_ms, now_ms)
        gone = [w for w in self.waiting.values() if w.arrived_ms + self.timeout_ms <= self.clock_ms]
        for w in gone:
            del self.waiting[(w.half.service, w.half.id)]
        return gone

    def commit_offset(self) -> int:
        """Where a restarted reader must start: the oldest waiting half, else past everything read."""
        return min((w.offset for w in self.waiting.values()), default=self.next_offset)
