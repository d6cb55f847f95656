"""The replay pipeline: decode -> dedup -> adapt -> replay -> diff -> window -> judge -> ClickHouse.

The faust worker (streams/app.py) and the embedded demo (streams/demo.py) both drive this one
class; they differ only in where messages come from and where state lives (faust changelog
tables vs plain dicts: both are MutableMappings).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import defaultdict
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from pydantic import ValidationError
from scipy.special import softmax

from schemas import DeadLetter, MirroredRequest, RequestDiff, Verdict, WindowStats, describe_validation_error
from scorers import divergence
from scorers.diffs import classification_diffs
from scorers.judge import judge
from streams.adapter import AdapterError, InputAdapter
from streams.config import CandidateConfig, Settings
from streams.runner import InputShapeError, OnnxRunner
from streams.sink import ClickHouseSink
from streams.windows import PairWindows, datetime_to_ms, ms_to_datetime, pair_key

log = logging.getLogger("shadowlens.pipeline")


@dataclass
class Candidate:
    config: CandidateConfig
    adapter: InputAdapter
    runner: OnnxRunner

    @classmethod
    def load(cls, config: CandidateConfig, providers: Sequence[str] | None) -> Candidate:
        runner = OnnxRunner(str(config.path), providers=providers or None)
        if config.output not in runner.output_names:
            raise ValueError(
                f"candidates.{config.name}.output: {config.output!r} is not an output of {config.path} "
                f"(it has {runner.output_names})"
            )
        return cls(config, InputAdapter(config.adapter), runner)


@dataclass
class BatchResult:
    scored: int = 0  # requests replayed (each against every candidate of its model)
    duplicates: int = 0  # (request, candidate) pairs dropped: another message had the same request id
    redelivered: int = 0  # (request, candidate) pairs skipped: this very message is already in the state
    diff_rows: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        sink: ClickHouseSink,
        pair_state: MutableMapping[str, dict] | None = None,
    ):
        self.settings = settings
        self.sink = sink
        self.pair_state = pair_state if pair_state is not None else {}
        providers = settings.replay.providers
        self.candidates: dict[str, list[Candidate]] = defaultdict(list)
        for cfg in settings.candidates:
            self.candidates[cfg.model].append(Candidate.load(cfg, providers))
        self._pairs: dict[str, PairWindows] = {}  # deserialised cache of pair_state
        self.size_ms = int(settings.windows.size_s * 1000)
        self.grace_ms = int(settings.windows.grace_s * 1000)

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, raw: bytes, topic: str = "", partition: int = -1, offset: int = -1) -> MirroredRequest | DeadLetter:
        """A validated event, or the dead letter that says why not (never raises)."""
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _dead(raw, "invalid_json", f"not valid JSON: {exc}", topic, partition, offset)
        try:
            return MirroredRequest.model_validate(payload)
        except ValidationError as exc:
            reason = describe_validation_error(exc)
            kind = "invalid_tensor" if any(_is_tensor_error(e["loc"]) for e in exc.errors()) else "invalid_schema"
            return _dead(raw, kind, reason, topic, partition, offset)

    # -- scoring ----------------------------------------------------------------------------
    def process(
        self, events: Sequence[MirroredRequest], positions: Sequence[tuple[int, int]] | None = None
    ) -> BatchResult:
        """Replay a micro-batch against every candidate of each event's model.

        ``positions`` are the events' Kafka (partition, offset). They make the window counts
        exact across crashes: each pair's state records the highest offset per partition it has
        applied, atomically with the counts (one changelog value), so a redelivered message the
        state already holds is skipped, and one whose diff row was written but whose state update
        was lost is counted again. A *different* message with a request id that already has a
        diff row (a producer retry, a replayed backfill) is a duplicate: counted as dropped in its
        window, never scored twice. Diff rows themselves are idempotent (ReplacingMergeTree key).
        """
        result = BatchResult()
        positions = list(positions) if positions is not None else [(-1, -1)] * len(events)
        by_model: dict[str, list[tuple[MirroredRequest, tuple[int, int]]]] = defaultdict(list)
        batch_ids: set[str] = set()
        for ev, pos in zip(events, positions, strict=True):
            if ev.model not in self.candidates:
                result.dead_letters.append(
                    _dead(ev.model_dump_json().encode(), "other",
                          f"model: no candidate is configured for {ev.model!r}; add one under [[candidates]]")
                )  # fmt: skip
                continue
            by_model[ev.model].append((ev, pos))

        diffs: list[RequestDiff] = []
        touched: set[str] = set()
        for model, items in by_model.items():
            names = [c.config.name for c in self.candidates[model]]
            prior = self.sink.scored_positions(model, names, [ev.request_id for ev, _ in items])
            for cand in self.candidates[model]:
                pw = self._pair(model, cand.config.name)
                seen_here: set[str] = set()
                fresh: list[tuple[MirroredRequest, tuple[int, int]]] = []
                for ev, (partition, offset) in items:
                    if 0 <= offset <= pw.applied_offsets.get(partition, -1):
                        result.redelivered += 1  # and already in this pair's state
                        continue
                    earlier = prior.get(cand.config.name, {}).get(ev.request_id)
                    if ev.request_id in seen_here or (earlier is not None and (offset < 0 or earlier != (partition, offset))):
                        result.duplicates += 1
                        self._count_duplicate(pw, ev)
                        continue
                    seen_here.add(ev.request_id)
                    fresh.append((ev, (partition, offset)))
                if fresh:
                    diffs.extend(self._replay(cand, fresh, result))
                for _, (partition, offset) in items:
                    if offset >= 0:
                        pw.applied_offsets[partition] = max(offset, pw.applied_offsets.get(partition, -1))
                touched.add(pair_key(model, cand.config.name))
            result.scored += len(items)
        # Rows first, then state: after a crash in between, the redelivered message is counted
        # again (its row exists with the same position), never lost and never twice.
        self.sink.insert_diffs(diffs)
        for key in touched:
            self.pair_state[key] = self._pairs[key].to_dict()
        result.diff_rows = len(diffs)
        return result

    def _count_duplicate(self, pw: PairWindows, ev: MirroredRequest) -> None:
        start = self._window_start(ev.sent_at)
        if start < pw.closed_upto_ms:
            pw.late_duplicates += 1  # its window row is already written
        else:
            pw.duplicates[start] = pw.duplicates.get(start, 0) + 1

    def _replay(
        self, cand: Candidate, items: list[tuple[MirroredRequest, tuple[int, int]]], result: BatchResult
    ) -> list[RequestDiff]:
        cfg = cand.config
        events = [ev for ev, _ in items]
        position = {ev.request_id: pos for ev, pos in items}
        pw = self._pair(cfg.model, cfg.name)
        pw.received += len(events)
        pw.last_event_wall = time.time()
        rows, kept = [], []
        for ev in events:
            try:
                row = cand.adapter({k: t.to_array() for k, t in ev.inputs.items()})
                cand.runner.check_row(row)
            except (AdapterError, InputShapeError) as exc:
                result.dead_letters.append(
                    _dead(ev.model_dump_json().encode(), "invalid_tensor", f"candidate {cfg.name}: {exc}")
                )
                continue
            rows.append(row)
            kept.append(ev)
        if not kept:
            return []
        outputs, latencies = cand.runner.run(rows, cfg.output, self.settings.replay.timing)
        baseline = [ev.baseline_output.get(cfg.baseline_output) for ev in kept]
        diffs, confidences = _paired_diffs(baseline, outputs, cfg)
        now = datetime.now(UTC)
        out: list[RequestDiff] = []
        per_window: dict[int, list[int]] = defaultdict(list)
        for i, ev in enumerate(kept):
            err = diffs.error[i]
            out.append(
                RequestDiff(
                    model=cfg.model, candidate=cfg.name, request_id=ev.request_id,
                    baseline_version=ev.baseline_version, sent_at=ev.sent_at, scored_at=now,
                    baseline_label=int(diffs.baseline_label[i]), candidate_label=int(diffs.candidate_label[i]),
                    label_flip=bool(diffs.label_flip[i]), confidence_delta=_finite(diffs.confidence_delta[i]),
                    l1_distance=_finite(diffs.l1[i]), baseline_confidence=confidences[0][i],
                    candidate_confidence=confidences[1][i], baseline_latency_ms=ev.baseline_latency_ms,
                    candidate_latency_ms=float(latencies[i]), error=str(err or ""),
                    label=None if ev.label is None else float(ev.label), attributes=dict(ev.attributes),
                    source_partition=position[ev.request_id][0], source_offset=position[ev.request_id][1],
                    metrics={"linf": _finite(diffs.linf[i]), "hellinger": _finite(diffs.hellinger[i]),
                             "topk_overlap": _finite(diffs.topk_overlap[i])},
                )
            )  # fmt: skip
            per_window[self._window_start(ev.sent_at)].append(i)
            pw.observe(position[ev.request_id][0], datetime_to_ms(ev.sent_at))
        base_lat = np.array([ev.baseline_latency_ms for ev in kept])
        labels = np.array([np.nan if ev.label is None else float(ev.label) for ev in kept])
        ids = [ev.request_id for ev in kept]
        attrs = [ev.attributes for ev in kept]
        for start, idx in per_window.items():
            sel = np.asarray(idx)
            part = diffs.take(sel)
            kwargs = dict(
                baseline_latency_ms=base_lat[sel], candidate_latency_ms=latencies[sel],
                request_ids=[ids[i] for i in idx], attributes=[attrs[i] for i in idx], labels=labels[sel],
            )  # fmt: skip
            pw.cumulative.update(part, **kwargs)
            window = pw.window_for(start)
            if window is None:
                pw.late_events += len(idx)
            else:
                window.update(part, **kwargs)
        return out

    # -- windows and verdicts -----------------------------------------------------------------
    def close_due(self, now_wall: float | None = None, force: bool = False, drained: bool = True) -> list[Verdict]:
        """Close windows that are due (or all, with force); write window rows and verdicts.

        ``drained``: the caller has read its source to the end, so idle pairs may close.
        """
        now_wall = time.time() if now_wall is None else now_wall
        windows: list[WindowStats] = []
        verdicts: list[Verdict] = []
        for key in list(self.pair_state.keys()):
            pw = self._pair_from_key(key)
            if force:
                due = sorted(pw.open_windows)
            else:
                due = pw.due(self.size_ms, self.grace_ms, now_wall, self.settings.windows.idle_close_s, drained)
            if not due:
                continue
            for start in due:
                acc, dups = pw.pop(start, self.size_ms)
                windows.append(self._window_row(pw, start, acc, dups))
            verdicts.append(self._verdict(pw, due[-1]))
            self.pair_state[key] = pw.to_dict()
        self.sink.insert_windows(windows)
        self.sink.insert_verdicts(verdicts)
        return verdicts

    def _window_row(self, pw: PairWindows, start: int, acc, duplicates: int) -> WindowStats:
        s = acc.summary()
        return WindowStats(
            divergence=self._window_divergence(pw, start),
            model=pw.model, candidate=pw.candidate, window_start=ms_to_datetime(start),
            window_end=ms_to_datetime(start + self.size_ms), duplicates_dropped=duplicates,
            state=json.dumps(acc.to_dict()), updated_at=datetime.now(UTC),
            **{k: s[k] for k in WINDOW_SUMMARY_FIELDS},
        )  # fmt: skip

    def _window_divergence(self, pw: PairWindows, start: int) -> dict[str, float]:
        """Distribution statistics of the window's predictions, read back from its diff rows
        (exact after restarts, no raw values kept in state). Reported for analysts, not gating:
        the judge uses the paired diffs, which are far more sensitive."""
        cols = self.sink.window_predictions(
            pw.model, pw.candidate, ms_to_datetime(start), ms_to_datetime(start + self.size_ms)
        )
        if len(cols["baseline_confidence"]) < 2:
            return {}
        stats = divergence.describe(cols["baseline_confidence"], cols["candidate_confidence"])
        stats["chi2_labels_pvalue"] = divergence.chi2_labels(cols["baseline_label"], cols["candidate_label"]).pvalue
        paired = divergence.stuart_maxwell(cols["baseline_label"], cols["candidate_label"])
        stats["stuart_maxwell_pvalue"] = paired.pvalue
        return {k: float(v) for k, v in stats.items() if v is not None and np.isfinite(v)}

    def _verdict(self, pw: PairWindows, last_start: int) -> Verdict:
        cfg = next(c.config for c in self.candidates[pw.model] if c.config.name == pw.candidate)
        noise = None
        if not cfg.noise_reference:
            ref = next((c.config.name for c in self.candidates[pw.model] if c.config.noise_reference), None)
            if ref is not None and pair_key(pw.model, ref) in self.pair_state:
                noise = self._pair(pw.model, ref).cumulative
        j = judge(pw.cumulative, cfg.judge_policy(), noise=noise, expected_requests=pw.received)
        return Verdict(
            model=pw.model, candidate=pw.candidate, verdict=j.verdict, reasons=j.reasons, metrics=j.metrics,
            samples=j.samples, window_start=ms_to_datetime(last_start),
            window_end=ms_to_datetime(last_start + self.size_ms), updated_at=datetime.now(UTC),
            requests_needed=j.requests_needed, worst_slices=j.worst_slices,
            example_request_ids=j.example_request_ids,
        )  # fmt: skip

    # -- state ------------------------------------------------------------------------------
    def _pair(self, model: str, candidate: str) -> PairWindows:
        key = pair_key(model, candidate)
        pw = self._pairs.get(key)
        if pw is None:
            stored = self.pair_state.get(key)
            pw = PairWindows.from_dict(stored) if stored else PairWindows(model, candidate)
            self._pairs[key] = pw
        return pw

    def _pair_from_key(self, key: str) -> PairWindows:
        model, _, candidate = key.partition("/")
        return self._pair(model, candidate)

    def _window_start(self, sent_at: datetime) -> int:
        ms = datetime_to_ms(sent_at)
        return ms - ms % self.size_ms


WINDOW_SUMMARY_FIELDS = (
    "requests", "errors", "label_flips", "flip_rate", "mean_abs_confidence_delta",
    "baseline_latency_p50_ms", "baseline_latency_p95_ms", "baseline_latency_p99_ms",
    "candidate_latency_p50_ms", "candidate_latency_p95_ms", "candidate_latency_p99_ms",
)  # fmt: skip


def _paired_diffs(baseline: list, outputs: list[np.ndarray], cfg: CandidateConfig):
    """Stack rows for the vectorised scorer; a missing or mis-shaped baseline is a row error."""
    n = len(outputs)
    width = outputs[0].shape[-1] if outputs and outputs[0].ndim else 1
    cand = np.full((n, width), np.nan)
    base = np.full((n, width), np.nan)
    problems: dict[int, str] = {}
    for i, (b, c) in enumerate(zip(baseline, outputs, strict=True)):
        c = np.asarray(c, dtype=np.float64).reshape(-1)
        if c.shape[0] != width:
            problems[i] = f"shape mismatch: candidate answered {c.shape[0]} values, others {width}"
            continue
        cand[i] = c
        if b is None:
            problems[i] = f"baseline_output.{cfg.baseline_output}: missing in the request"
            continue
        barr = np.asarray(b.to_array(), dtype=np.float64).reshape(-1)
        if barr.shape[0] != width:
            problems[i] = f"shape mismatch: baseline ({barr.shape[0]},) candidate ({width},)"
            continue
        base[i] = barr
    # NaN rows make the scorer count a candidate error; the specific reason replaces its generic one.
    diffs = classification_diffs(base, cand, from_logits=cfg.from_logits)
    for i, reason in problems.items():
        diffs.error[i] = reason
    return diffs, (_top_confidence(base, cfg.from_logits), _top_confidence(cand, cfg.from_logits))


def _top_confidence(rows: np.ndarray, from_logits: bool) -> list[float]:
    """Each row's probability of its own top class (0 where the row is unusable)."""
    probs = softmax(rows, axis=1) if from_logits else rows
    with np.errstate(invalid="ignore"):
        top = np.max(probs, axis=1) if probs.shape[1] else np.zeros(len(probs))
    return np.nan_to_num(top, nan=0.0, posinf=0.0, neginf=0.0).tolist()


def _finite(x: float) -> float:
    x = float(x)
    return x if np.isfinite(x) else 0.0


def _is_tensor_error(loc: tuple) -> bool:
    return len(loc) >= 2 and loc[0] in ("inputs", "baseline_output")  # inside a named tensor


def _dead(raw: bytes, kind: str, reason: str, topic: str = "", partition: int = -1, offset: int = -1) -> DeadLetter:
    try:
        payload, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return DeadLetter(
        reason=reason, error_type=kind, topic=topic, partition=partition, offset=offset, payload=payload,
        payload_encoding=encoding, failed_at=datetime.now(UTC),
    )  # fmt: skip
