"""Per (model, candidate) state: tumbling event-time windows plus the cumulative evidence.

Windows are tumbling on ``sent_at`` (event time). When a window is final (README, "Delivery
guarantees"):

- **watermark**: the minimum over *all* mirror partitions of the latest ``sent_at`` handed over,
  whichever replay process read them (streams/records.py ``Progress``), has passed the window's end
  plus ``grace_s``. A partition that is read to its end and has not moved for ``partition_idle_s``
  does not hold the watermark back (a quiet partition must not keep every window open);
- **idle**: every mirror partition is read to its end, as reported within the last few seconds,
  and the pair has had no new rows for ``idle_close_s``. A broker outage, a dead or lagging replay
  process, or a lagging judge all make the reports stale or show lag, so no window closes early
  because the traffic only *seemed* to stop;
- **bounds**: more than ``max_open_windows`` open windows, or a state over its byte budget, close
  the oldest early (logged): state never outgrows the changelog's message size.

An event whose window already closed joins the cumulative evidence, not a window row
(``late_events``). The whole state is one JSON-able dict, kept in the judge's changelog topic by the
worker and in a plain dict by the embedded pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from scorers.accumulate import PairAccumulator
from scorers.clusters import ClusterTracker
from scorers.latency import PairedLatency
from streams.records import PartitionProgress, Progress


def pair_key(model: str, candidate: str) -> str:
    return f"{model}/{candidate}"


@dataclass
class PairWindows:
    model: str
    candidate: str
    open_windows: dict[int, PairAccumulator] = field(default_factory=dict)  # window start (ms) -> stats
    duplicates: dict[int, int] = field(default_factory=dict)  # window start (ms) -> redelivered dropped
    cumulative: PairAccumulator = field(default_factory=PairAccumulator)
    received: int = 0  # requests routed to this candidate, scored or not (sample-ratio check)
    late_events: int = 0  # arrived after their window closed: in the cumulative, not in a window row
    late_duplicates: int = 0  # redelivered after their window closed
    applied_offsets: dict[int, int] = field(default_factory=dict)  # mirror partition -> highest offset in state
    closed_upto_ms: int = 0  # every window starting before this has been emitted
    last_event_wall: float = 0.0
    early_closes: int = 0  # windows closed before they were final (open-window cap, state budget)
    unscorable: dict[str, int] = field(default_factory=dict)  # not comparable, by dead-letter type
    cast: dict[str, int] = field(default_factory=dict)  # requests cast by the cast policy, by "input from->to"
    judge_memory: dict = field(default_factory=dict)  # scorers.judge.JudgeMemory: standing promote, slice flags
    rejudge: bool = False  # late events (e.g. a backfill) joined the evidence since the last verdict
    # (replayed baseline, candidate) latency of the same requests: the paired latency metric
    reference_latency: PairedLatency = field(default_factory=PairedLatency)
    # Open clusters (scorers.clusters): sessions of one key not yet over; closed ones are in cumulative.
    clusters: ClusterTracker | None = None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "candidate": self.candidate,
            "open_windows": {str(k): v.to_dict() for k, v in self.open_windows.items()},
            "duplicates": {str(k): v for k, v in self.duplicates.items()},
            "cumulative": self.cumulative.to_dict(),
            "received": self.received,
            "late_events": self.late_events,
            "late_duplicates": self.late_duplicates,
            "applied_offsets": {str(k): v for k, v in self.applied_offsets.items()},
            "closed_upto_ms": self.closed_upto_ms,
            "last_event_wall": self.last_event_wall,
            "early_closes": self.early_closes,
            "unscorable": self.unscorable,
            "cast": self.cast,
            "judge_memory": self.judge_memory,
            "rejudge": self.rejudge,
            "reference_latency": self.reference_latency.to_dict(),
            **({} if self.clusters is None else {"clusters": self.clusters.to_dict()}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> PairWindows:
        return cls(
            model=data["model"],
            candidate=data["candidate"],
            open_windows={int(k): PairAccumulator.from_dict(v) for k, v in data["open_windows"].items()},
            duplicates={int(k): int(v) for k, v in data.get("duplicates", {}).items()},
            cumulative=PairAccumulator.from_dict(data["cumulative"]),
            received=int(data.get("received", 0)),
            late_events=int(data.get("late_events", 0)),
            late_duplicates=int(data.get("late_duplicates", 0)),
            applied_offsets={int(k): int(v) for k, v in data.get("applied_offsets", {}).items()},
            closed_upto_ms=int(data["closed_upto_ms"]),
            last_event_wall=float(data["last_event_wall"]),
            early_closes=int(data.get("early_closes", 0)),
            unscorable={str(k): int(v) for k, v in data.get("unscorable", {}).items()},
            cast={str(k): int(v) for k, v in data.get("cast", {}).items()},
            judge_memory=dict(data.get("judge_memory", {})),
            rejudge=bool(data.get("rejudge", False)),
            reference_latency=PairedLatency.from_dict(data["reference_latency"]) if "reference_latency" in data
            else PairedLatency(),
            clusters=ClusterTracker.from_dict(data["clusters"]) if "clusters" in data else None,
        )

    def window_for(self, window_start_ms: int) -> PairAccumulator | None:
        """The open window's accumulator, or None when that window already closed (late event)."""
        if window_start_ms < self.closed_upto_ms:
            return None
        return self.open_windows.setdefault(window_start_ms, PairAccumulator())

    def due(self, size_ms: int, grace_ms: int, watermark_ms: int | None, idle: bool, max_open: int) -> list[int]:
        """Starts of the open windows to close now, oldest first (see the module docstring)."""
        starts = sorted(self.open_windows)
        if idle:
            return starts
        final = [s for s in starts if watermark_ms is not None and s + size_ms + grace_ms <= watermark_ms]
        over = max(0, len(starts) - len(final) - max_open)
        return starts[: len(final) + over]

    def pop(self, start_ms: int, size_ms: int) -> tuple[PairAccumulator, int]:
        acc = self.open_windows.pop(start_ms)
        self.closed_upto_ms = max(self.closed_upto_ms, start_ms + size_ms)
        return acc, self.duplicates.pop(start_ms, 0)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def datetime_to_ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


class SourceView:
    """What a judge knows of the mirror partitions' progress, from the replay stage's reports.

    One view per diffs partition the judge reads: a report on that partition comes after every diff
    batch it covers on that partition (streams/records.py), so the view never runs ahead of the rows.
    """

    def __init__(self) -> None:
        self.partitions: dict[int, PartitionProgress] = {}
        self.mirror_partitions: int | None = None
        self.reported_wall: dict[int, float] = {}  # mirror partition -> when its latest report was made
        self.reachable_since = 0.0  # latest broker recovery any replay process reported

    def update(self, progress: Progress) -> None:
        self.mirror_partitions = progress.mirror_partitions
        self.reachable_since = max(self.reachable_since, progress.reachable_since)
        for p, new in progress.partitions.items():
            old = self.partitions.get(p)
            # After a rebalance two replay processes may report one partition; the furthest wins
            # (the old owner handed over everything below its position before it reported it).
            if old is None or new.position >= old.position:
                if old is not None and old.max_sent_ms > new.max_sent_ms:
                    # A restarted replay process has not seen this partition's latest event time yet.
                    new = PartitionProgress(new.position, new.highwater, old.max_sent_ms, new.advanced_wall)
                self.partitions[p] = new
                self.reported_wall[p] = progress.wall

    def complete(self) -> bool:
        return self.mirror_partitions is not None and len(self.partitions) >= self.mirror_partitions

    def watermark_ms(self, now_wall: float, partition_idle_s: float) -> int | None:
        """Minimum latest ``sent_at`` over the partitions that hold it back; None until all reported."""
        if not self.complete():
            return None
        active = [
            v.max_sent_ms for v in self.partitions.values()
            if not (v.caught_up and now_wall - max(v.advanced_wall, self.reachable_since) >= partition_idle_s)
        ]  # fmt: skip
        if not active:  # every partition is quiet: the furthest event time stands for all
            return max(v.max_sent_ms for v in self.partitions.values())
        return min(active)

    def drained(self, now_wall: float, fresh_s: float, settle_s: float = 0.0) -> bool:
        """Every mirror partition read to its end, as reported within ``fresh_s`` seconds, and the
        broker reachable for ``settle_s`` since a replay process last recovered from an outage (the
        producers' buffered requests land after the broker returns, not before)."""
        return self.complete() and now_wall - self.reachable_since >= settle_s and all(
            v.caught_up and now_wall - self.reported_wall[p] <= fresh_s for p, v in self.partitions.items()
        )

    def describe(self, now_wall: float) -> str:
        if not self.complete():
            return f"{len(self.partitions)} of {self.mirror_partitions or '?'} mirror partitions reported"
        lag = {p: max(0, v.highwater - v.position) for p, v in sorted(self.partitions.items())}
        age = max((now_wall - w for w in self.reported_wall.values()), default=0.0)
        return f"lag per mirror partition {lag}, oldest report {age:.1f} s ago"
