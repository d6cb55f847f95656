"""Judge core: columnar diff batches in; diff rows, windows, verdicts and pair state out.

No Kafka here (streams/judge/stage.py wraps it with a consumer and the changelog; the embedded
pipeline calls it directly). Every step is *write first, then change state*, and a failed write
leaves the state untouched, so the caller can retry the same call until the database answers:

1. ``apply(batches)``: drop redeliveries (rows at or below the pair's applied mirror offset) and
   producer retries (a request id already scored from another message, looked up in ClickHouse
   within the dedup horizon only), insert the fresh rows in one columnar insert, then add them to
   the pair's open window and cumulative evidence and advance the applied offsets.
2. ``close_due(...)``: windows that are final (streams/judge/windows.py), or beyond the state bounds, are
   written with their distribution statistics (from the accumulator's counts, no raw rows read
   back), the pair is judged on its cumulative evidence and the verdict written; then the windows
   leave the state. Before it is judged, the pair's clusters whose session is over (scorers.clusters:
   idle for longer than the gap before the watermark) join its cumulative evidence.

After a crash between a write and the state change, the rows are written again (idempotent keys)
and counted once, because the state that would have counted them was never saved.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from schemas import Verdict, WindowStats
from scorers.accumulate import PairAccumulator
from scorers.clusters import request_keys, tracker_for
from scorers.judge import JudgeMemory, judge
from streams.api.board import VerdictBoard
from streams.config import CandidateConfig, Settings
from streams.judge.history import provenance
from streams.judge.kinds import accumulator_inputs, explain, window_divergence
from streams.judge.dedup import RetryFilter
from streams.records import DiffBatch
from streams.sink import ClickHouseSink
from streams.judge.windows import PairWindows, SourceView, ms_to_datetime, pair_key

log = logging.getLogger("shadowlens.judge")

WINDOW_SUMMARY_FIELDS = (
    "requests", "errors", "label_flips", "flip_rate", "mean_abs_confidence_delta",
    "baseline_latency_p50_ms", "baseline_latency_p95_ms", "baseline_latency_p99_ms",
    "candidate_latency_p50_ms", "candidate_latency_p95_ms", "candidate_latency_p99_ms",
)  # fmt: skip
# A pair's state is kept well below the changelog topic's max.message.bytes (streams/judge/stage.py
# sets 8 MiB): past this budget the oldest open windows close early.
STATE_BUDGET_BYTES = 1 << 20


@dataclass
class ApplyResult:
    rows: int = 0  # diff rows written
    redelivered: int = 0  # rows skipped: this very message is already in the pair's state
    duplicates: int = 0  # rows dropped: another message already scored this request id
    touched: set[str] = field(default_factory=set)


class JudgeCore:
    def __init__(self, settings: Settings, sink: ClickHouseSink):
        self.settings = settings
        self.sink = sink
        self.configs: dict[str, CandidateConfig] = {pair_key(c.model, c.name): c for c in settings.candidates}
        self._pairs: dict[str, PairWindows] = {}  # the live state, by pair key
        self.final: set[str] = set()  # pairs retired in the registry: their verdict stays the retirement
        self._sizes: dict[str, int] = {}  # bytes of each pair's state when last serialised
        # What counts as independent is a *cluster* (scorers.clusters): each pair's open clusters are
        # in its state (PairWindows.clusters, on the changelog), the closed ones in its cumulative.
        # Producer retries (streams/judge/dedup.py): the ids each pair stored lately, so that
        # ClickHouse is asked only about the few ids that may be retries.
        self.windows_closed = 0  # window rows written (metrics)
        # What the API serves: current as soon as a verdict is written, no database read.
        self.board = VerdictBoard.from_settings(settings)
        w = settings.windows
        self.size_ms, self.grace_ms = int(w.size_s * 1000), int(w.grace_s * 1000)
        self.horizon_ms = int(w.dedup_horizon_s * 1000)
        self.retries = RetryFilter(sink, self.horizon_ms)

    # -- rows ---------------------------------------------------------------------------------
    def apply(self, batches: Sequence[DiffBatch]) -> ApplyResult:
        """Write the fresh rows of these batches, then count them. Raises (state untouched) when
        the insert fails; call again with the same batches."""
        result = ApplyResult()
        kept: list[tuple[PairWindows, DiffBatch, int]] = []  # (pair, rows not redelivered, routed)
        pending: dict[str, dict[int, int]] = {}  # applied offsets including earlier batches of this call
        unscorable: list[tuple[PairWindows, DiffBatch]] = []
        for batch in batches:
            key = pair_key(batch.model, batch.candidate)
            if key not in self.configs:
                log.warning("diff batch for unconfigured pair %s (%d rows) ignored", key, len(batch))
                continue
            pw = self._pair(key)
            applied = pending.setdefault(key, dict(pw.applied_offsets))
            if batch.covers and all(off <= applied.get(p, -1) for p, off in batch.covers.items()):
                result.redelivered += len(batch)
                continue
            limit = np.array([applied.get(int(p), -1) for p in batch.columns["source_partition"]], dtype=np.int64)
            keep = batch.columns["source_offset"] > limit
            skipped = int((~keep).sum())
            result.redelivered += skipped
            for p, off in batch.covers.items():
                applied[p] = max(off, applied.get(p, -1))
            kept.append((pw, batch if not skipped else batch.take(np.flatnonzero(keep)), batch.routed - skipped))
            unscorable.append((pw, batch))
        fresh = self.retries.drop(kept)
        self.sink.insert_diff_batches([rows for _, rows, _, _, _ in fresh if len(rows)])
        # Written: now (and only now) count them, once per pair for all of this call's batches
        # (an accumulator update and two merges have a cost per call, not only per row).
        now = time.time()
        to_count: dict[str, tuple[PairWindows, list[DiffBatch], list[int]]] = {}
        for pw, rows, routed, dups, hashes in fresh:
            key = pair_key(pw.model, pw.candidate)
            if len(rows):
                self.retries.remember(key, hashes, rows.columns["sent_ms"])
            _, parts, pair_dups = to_count.setdefault(key, (pw, [], []))
            parts.extend([rows] if len(rows) else [])
            pair_dups.extend(dups)
            # Requests routed to the candidate that are new to it, dead-lettered ones included.
            pw.received += max(0, routed - len(dups))
            pw.applied_offsets = pending[key]
            pw.last_event_wall = now
            result.rows += len(rows)
            result.duplicates += len(dups)
            result.touched.add(key)
        for pw, parts, dups in to_count.values():
            self._count(pw, DiffBatch.concat(parts) if parts else None, dups)
        self.board.mark_scoring((pw.model, pw.candidate) for pw, _, _, _, _ in fresh)
        for pw, batch in unscorable:  # counted per batch (a batch partly redelivered counts again: rare)
            for kind, n in batch.unscorable.items():
                pw.unscorable[kind] = pw.unscorable.get(kind, 0) + n
            for what, n in batch.cast.items():  # inputs cast by the candidate's cast policy (streams/replay/blame.py)
                pw.cast[what] = pw.cast.get(what, 0) + n
            for sent_ms in batch.unscorable_ms:  # their windows exist, so the pair is judged when they close
                pw.window_for(sent_ms - sent_ms % self.size_ms)
            if batch.unscorable_ms:
                pw.last_event_wall = now
        return result

    def _count(self, pw: PairWindows, rows: DiffBatch | None, dups: list[int]) -> None:
        for sent_ms in dups:
            start = sent_ms - sent_ms % self.size_ms
            if start < pw.closed_upto_ms:
                pw.late_duplicates += 1  # its window row is already written
            else:
                pw.duplicates[start] = pw.duplicates.get(start, 0) + 1
        if rows is None or not len(rows):
            return
        c = rows.columns
        # Clusters (scorers.clusters): keyed by the configured attribute, else the record's explicit
        # sample_key (the replay stage's sample_hash), else the input fingerprint; never the Kafka key.
        policy = self.configs[pair_key(pw.model, pw.candidate)].judge_policy()
        if pw.clusters is None:
            pw.clusters = tracker_for(policy)
        keys = request_keys(c["input_hash"], c["sample_hash"], rows.attributes, policy.cluster_key_attribute)
        pw.cumulative.add_clusters(pw.clusters.update(
            keys, c["sent_ms"], ok=np.asarray(rows.error, dtype=object) == "", flips=c["label_flip"].astype(bool),
            abs_delta=c["confidence_delta"], attributes=rows.attributes))
        ref = c["reference_latency_ms"]
        both = np.isfinite(ref) & (ref > 0) & np.isfinite(c["candidate_latency_ms"])
        if both.any():
            pw.reference_latency.update(ref[both], c["candidate_latency_ms"][both])
        starts = c["sent_ms"] - c["sent_ms"] % self.size_ms
        for start in np.unique(starts).tolist():
            idx = np.flatnonzero(starts == start)
            part = rows.take(idx) if len(idx) != len(rows) else rows
            diffs, kwargs = accumulator_inputs(part)
            window = pw.window_for(int(start))
            if window is None:
                pw.late_events += len(idx)
                pw.cumulative.update(diffs, **kwargs)
                pw.rejudge = True  # no window closes for them: the verdict is refreshed by itself
                continue
            # One pass over the rows, then two merges (cost of the state's size, not the rows'):
            # exact, because accumulators merge exactly (scorers/accumulate.py).
            delta = PairAccumulator()
            delta.update(diffs, **kwargs)
            window.merge(delta)
            pw.cumulative.merge(delta)

    # -- windows and verdicts ---------------------------------------------------------------------
    def close_due(
        self, view_for: Callable[[str], SourceView | None], now_wall: float | None = None, force: bool = False
    ) -> tuple[list[Verdict], set[str]]:
        """Write the windows that are due and a verdict per pair that closed one; then drop them
        from the state. Raises (state untouched) when a write fails."""
        now_wall = time.time() if now_wall is None else now_wall
        w = self.settings.windows
        plan: list[tuple[str, PairWindows, list[int]]] = []
        clocks: dict[str, int | None] = {}  # event time up to which a pair's sessions are over (None: all)
        for key, pw in list(self._pairs.items()):
            if not pw.open_windows:
                continue
            if force:
                due = sorted(pw.open_windows)
                clocks[key] = None
            else:
                view = view_for(key)
                watermark = view.watermark_ms(now_wall, w.partition_idle_s) if view else None
                idle = bool(view) and view.drained(now_wall, w.progress_fresh_s, w.partition_idle_s) and (
                    now_wall - pw.last_event_wall >= w.idle_close_s)  # fmt: skip
                due = pw.due(self.size_ms, self.grace_ms, watermark, idle, w.max_open_windows)
                due = self._over_budget(pw, due)
                clocks[key] = None if idle else (watermark if watermark is not None else -1)
                if not idle:
                    early = [s for s in due if watermark is None or s + self.size_ms + self.grace_ms > watermark]
                    if early:
                        log.warning("%s: closing %d window(s) before they are final (max_open_windows = %d); "
                                    "a mirror partition holds the watermark back", key, len(early),
                                    w.max_open_windows)  # fmt: skip
                        pw.early_closes += len(early)
            if due:
                plan.append((key, pw, due))
        # Clusters whose session is over (idle for longer than the gap before the watermark; every one
        # when the traffic stopped or at a forced close) join the judged statistics. Moving them is the
        # same whether or not the writes below succeed, so a retry judges the same clusters.
        planned = {key for key, _, _ in plan}
        for key, pw in self._pairs.items():
            if pw.clusters is not None and (key in planned or pw.rejudge):
                clock = clocks.get(key, -1)
                closed = (pw.clusters.close_all() if clock is None
                          else pw.clusters.close_idle(None if clock < 0 else clock))
                pw.cumulative.add_clusters(closed)
        windows, verdicts, judged = [], [], []
        for _key, pw, due in plan:
            for start in due:
                windows.append(self._window_row(pw, start))
            judged.append(self._verdict(pw, due[-1]))
        # Late events only (a backfill of old requests, all their windows closed): judge again on
        # the cumulative evidence, without a window row, so the verdict does not wait for live traffic.
        rejudged = [(key, pw) for key, pw in self._pairs.items()
                    if pw.rejudge and key not in planned and not pw.open_windows and pw.closed_upto_ms > 0]
        for _key, pw in rejudged:
            judged.append(self._verdict(pw, pw.closed_upto_ms - self.size_ms))
        judged = [j for j in judged if pair_key(j[0].model, j[0].candidate) not in self.final]  # windows still written
        verdicts = [v for _, v, _, _ in judged]
        self.sink.insert_windows(windows)
        # With each verdict, its policy's hash and what it rested on besides the rows (streams/judge/history.py):
        # the verdict history names the policy, and `shadowlens rejudge` replays this very look.
        self.sink.insert_verdicts(verdicts, [provenance(self, pw, clocks.get(pair_key(pw.model, pw.candidate), -1),
                                                        now_wall) for pw, _, _, _ in judged])
        for _key, pw in rejudged:
            pw.rejudge = False
        for _key, pw, _due in plan:
            pw.rejudge = False
        self.windows_closed += len(windows)
        self.board.publish(verdicts)
        # Written and published: now the judges' memories change, and a pair that has just turned to
        # rollback is told once (its memory remembers the rollback, across restarts too).
        for pw, v, memory, started in judged:
            pw.judge_memory = memory
            if started:
                log.warning("verdict %s/%s: rollback (%d scored requests): %s", v.model, v.candidate, v.samples,
                            v.reasons[0] if v.reasons else "no reason given")
        for key, pw, due in plan:  # written: now drop them from the state
            for start in due:
                pw.pop(start, self.size_ms)
        return verdicts, planned | {key for key, _ in rejudged}

    def _over_budget(self, pw: PairWindows, due: list[int]) -> list[int]:
        """Add the oldest open windows to ``due`` while the pair's state is over its byte budget."""
        key = pair_key(pw.model, pw.candidate)
        size = self._sizes.get(key, 0)
        if size <= STATE_BUDGET_BYTES:
            return due
        size = len(json.dumps(pw.to_dict())) - sum(len(json.dumps(pw.open_windows[s].to_dict())) for s in due)
        rest = sorted(s for s in pw.open_windows if s not in due)
        extra = []
        while rest and size > STATE_BUDGET_BYTES:
            start = rest.pop(0)
            size -= len(json.dumps(pw.open_windows[start].to_dict()))
            extra.append(start)
        if extra:
            log.warning("%s: state over %d bytes, closing the %d oldest windows early",
                        key, STATE_BUDGET_BYTES, len(extra))  # fmt: skip
        return sorted(due + extra)

    def _window_row(self, pw: PairWindows, start: int) -> WindowStats:
        acc = pw.open_windows[start]
        s = acc.summary()
        kind = self.configs[pair_key(pw.model, pw.candidate)].kind
        divergence = window_divergence(acc, kind)  # from the window's histograms and label tables
        return WindowStats(
            kind=kind, metrics=acc.metric_means(), divergence=divergence, model=pw.model, candidate=pw.candidate, window_start=ms_to_datetime(start),
            window_end=ms_to_datetime(start + self.size_ms), duplicates_dropped=pw.duplicates.get(start, 0),
            state=json.dumps(acc.to_dict()), updated_at=datetime.now(UTC),
            **{k: s[k] for k in WINDOW_SUMMARY_FIELDS},
        )  # fmt: skip

    def _verdict(self, pw: PairWindows, last_start: int) -> tuple[PairWindows, Verdict, dict, bool]:
        """(pair, verdict, the judge's memory after it, whether it starts a rollback). The memory is
        stored by the caller once the verdict is written, so a failed write judges again from the
        same memory (and a rollback is still told when it is finally written)."""
        cfg = self.configs[pair_key(pw.model, pw.candidate)]
        noise = paired = None
        if not cfg.noise_reference:
            ref = next((c for c in self.configs.values() if c.model == pw.model and c.noise_reference), None)
            if ref is not None and pair_key(pw.model, ref.name) in self._pairs:
                noise = self._pair(pair_key(pw.model, ref.name)).cumulative
                # Paired latency needs the replayed baseline's sketch too. Both pairs get rows from the
                # same micro-batches, so this holds from the first verdict on, unless another judge
                # process owns the reference pair: then latency is judged unpaired against production
                # (and no noise floor is subtracted), as documented.
                paired = pw.reference_latency
        j = judge(pw.cumulative, cfg.judge_policy(), noise=noise, expected_requests=pw.received,
                  unscorable=pw.unscorable, memory=JudgeMemory.from_dict(pw.judge_memory), paired_latency=paired)
        reasons = explain(j.reasons, j.metrics, cfg.output_kind())  # what the gated metrics mean for its kind
        return pw, Verdict(
            model=pw.model, candidate=pw.candidate, kind=cfg.kind, verdict=j.verdict, reasons=reasons,
            metrics=j.metrics,
            samples=j.samples, window_start=ms_to_datetime(last_start),
            window_end=ms_to_datetime(last_start + self.size_ms), updated_at=datetime.now(UTC),
            requests_needed=j.requests_needed, worst_slices=j.worst_slices,
            example_request_ids=j.example_request_ids, blocking_metric=j.blocking_metric,
            failed_slices=j.failed_slices, unscorable=sum(pw.unscorable.values()), cast=dict(pw.cast),
        ), j.memory.to_dict(), j.rollback_started  # fmt: skip

    # -- state --------------------------------------------------------------------------------
    def serialized(self, key: str) -> bytes | None:
        """The pair's state as stored in the changelog (compact JSON); None for a pair this judge
        no longer owns (forgotten at a rebalance while a write was under way)."""
        pw = self._pairs.get(key)
        if pw is None:
            return None
        raw = json.dumps(pw.to_dict(), separators=(",", ":")).encode()
        self._sizes[key] = len(raw)
        return raw

    def restore(self, key: str, raw: bytes | None) -> None:
        """Replace a pair's state with a stored one (changelog recovery); None forgets it."""
        self.retries.forget(key)  # rows written since the stored state: ask ClickHouse again
        if raw is None:
            self._pairs.pop(key, None)
        else:
            self._pairs[key] = PairWindows.from_dict(json.loads(raw))

    def forget(self, keys: set[str]) -> None:
        """Drop pairs this judge no longer owns (their partition moved to another judge)."""
        for key in keys:
            self._pairs.pop(key, None)
            self._sizes.pop(key, None)
            self.retries.forget(key)

    @property
    def lookups(self) -> int:
        return self.retries.lookups

    def pairs(self) -> dict[str, PairWindows]:
        return dict(self._pairs)

    def _pair(self, key: str) -> PairWindows:
        pw = self._pairs.get(key)
        if pw is None:
            model, _, candidate = key.partition("/")
            pw = self._pairs[key] = PairWindows(model, candidate)
        return pw
