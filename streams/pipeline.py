"""The embedded pipeline: both stages in one call, no Kafka (the demo, notebooks' data, tests).

``Pipeline.process(messages)`` runs the replay core on a micro-batch and hands its diff batches
straight to the judge core, exactly what the two Kafka stages do with the diffs topic between
them (streams/replay/stage.py, streams/judge/stage.py). The in-process source is one partition whose offsets count the messages
given so far (or the positions the caller passes), and it is always read to its end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas import DeadLetter, Verdict
from streams.config import Settings
from streams.judge.core import JudgeCore
from streams.records import PartitionProgress, Progress
from streams.replay.core import Inbound, ReplayCore
from streams.sink import ClickHouseSink
from streams.judge.windows import PairWindows, SourceView, pair_key


# How many requests an embedded source (the demo, a file) hands ``Pipeline.process`` at once.
# Each call writes its diff rows in one insert, and chDB commits a part per insert at a cost of
# about 10 ms whatever its size (bench/bench_stages.py --only pipeline shows both sizes): 256 at
# a time would spend most of the time on commits. The Kafka judge stage batches the same way,
# taking up to 64 diff batches per insert.
EMBEDDED_CHUNK = 4096


@dataclass
class BatchResult:
    requests: int = 0  # valid requests in the micro-batch
    diff_rows: int = 0
    redelivered: int = 0
    duplicates: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Requests whose inputs the cast policy cast, per pair: {(model, candidate): {"pixels float64->float32": n}}
    cast: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)


class Pipeline:
    def __init__(self, settings: Settings, sink: ClickHouseSink, replay: ReplayCore | None = None):
        self.settings = settings
        self.sink = sink
        self.replay = replay or ReplayCore(settings)
        self.judge = JudgeCore(settings, sink)
        self.view = SourceView()
        self._next_offset = 0
        self._max_sent_ms: dict[int, int] = {}

    def process(self, messages: Sequence[bytes | None | Inbound]) -> BatchResult:
        """Replay and judge one micro-batch. Raw values get the next offsets of partition 0."""
        inbound = []
        for m in messages:
            if not isinstance(m, Inbound):
                m = Inbound(m, 0, self._next_offset, topic="embedded")
            self._next_offset = max(self._next_offset, m.offset + 1)
            inbound.append(m)
        out = self.replay.replay(inbound)
        applied = self.judge.apply(out.batches)
        for p, ms in out.max_sent_ms.items():
            self._max_sent_ms[p] = max(ms, self._max_sent_ms.get(p, 0))
        self._report(inbound, time.time())
        cast = {(b.model, b.candidate): dict(b.cast) for b in out.batches if b.cast}
        return BatchResult(out.requests, applied.rows, applied.redelivered, applied.duplicates, out.dead_letters, cast)

    def _report(self, inbound: Sequence[Inbound], now: float) -> None:
        """What a replay process would report: here every partition is read to its end."""
        parts = {m.partition for m in inbound} | set(self.view.partitions)
        progress = Progress("embedded", len(parts), now)
        for p in parts:
            last = max((m.offset for m in inbound if m.partition == p), default=-1)
            old = self.view.partitions.get(p)
            position = max(last + 1, old.position if old else 0)
            moved = old is None or position > old.position
            advanced = now if moved else old.advanced_wall
            progress.partitions[p] = PartitionProgress(position, position, self._max_sent_ms.get(p, 0), advanced)
        self.view.update(progress)

    def close_due(self, force: bool = False, now_wall: float | None = None) -> list[Verdict]:
        now_wall = time.time() if now_wall is None else now_wall
        self._report([], now_wall)  # the embedded source is always read to its end, as of now
        verdicts, _ = self.judge.close_due(lambda _key: self.view, now_wall=now_wall, force=force)
        return verdicts

    @property
    def board(self):
        """The latest verdicts as the API serves them (streams/api/board.py)."""
        return self.judge.board

    def pair(self, model: str, candidate: str) -> PairWindows:
        return self.judge.pairs()[pair_key(model, candidate)]
