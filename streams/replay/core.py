"""Replay core: a micro-batch of mirrored messages in, one columnar diff batch per pair out.

No Kafka, no database, no per-pair state: the replay stage (streams/replay/stage.py) wraps this with a
consumer and a producer, the embedded pipeline (streams/pipeline.py) calls it directly, and it can
run on a GPU machine that reaches nothing but Kafka.

Poison is isolated per message. Decoding never raises (``schemas.decode_request``). Who is to blame
decides where a request ends up, by the rules of streams/replay/blame.py: what the producer sent wrong for
a candidate (its adapter, input shapes or dtypes, the baseline output) is a dead letter *for that
candidate*, counted in the pair's ``unscorable``, while the other candidates still score it; an
exception in a candidate's batched run is retried message by message, and the message that still
raises alone is a diff row carrying the exception (a candidate error). Nothing a single message
carries can stop the batch. Dead letters reach the log as a summary a minute (``LetterLog``).

Columnar hot path: requests whose inputs share names, dtypes and shapes are stacked once, adapted
once (rename / cast / scale / shift are element-wise), checked once and replayed in one batched
call per candidate. Timing (``[replay] timing``, streams/replay/runner.py): ``"sampled"`` (the default)
also runs a sample of the requests alone and times them (``timed_rows``: by request id hash, at
least ``timing_min_per_window`` per window of each group), the others' latency NaN;
``"per_request"`` runs every row alone (latency for all, one call per row); ``"batched"`` gives
each row the batch time divided by its rows. Variable shapes are never padded: requests of
another per-row shape are another group (streams/replay/stacking.py), so another batched call.

Candidates run on onnxruntime (``OnnxRunner``) or torch (``streams.replay.runner_torch.TorchRunner``),
``candidates.<name>.runtime``, from the file's suffix by default (``load_runner``).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter

import numpy as np

from schemas import DeadLetter
from streams.replay.adapter import InputAdapter
from streams.replay.blame import (
    UNSCORABLE, CandidateRefused, baseline_check_key, baseline_invalid_reason, baseline_problems, conform_inputs,
    refusal,
)  # fmt: skip
from streams.config import CandidateConfig, Settings
from streams.replay.evidence_keys import evidence_keys
from streams.replay.letter_log import LetterLog
from streams.records import DiffBatch, empty_columns
from streams.replay.columns import fill_kind_columns, pair_reference_latency, request_columns
from streams.replay.routing import covers, in_range, route
from streams.replay.runner import Runner, load_runner, timed_rows
from streams.replay.runner_torch import TorchModelError
from streams.replay.stacking import baseline_rows, groups_by_signature, stack

log = logging.getLogger("shadowlens.replay")
_EVENT, _INPUTS = itemgetter(0), attrgetter("inputs")
# UNSCORABLE (streams/replay/blame.py, which states the blame rules): dead letters that are the payload's
# or the config's fault, counted per pair so the verdict can say why it cannot decide, never as
# candidate errors.
__all__ = ["UNSCORABLE", "Candidate", "Inbound", "LetterLog", "ReplayCore", "ReplayOutput"]


@dataclass
class Inbound:
    """One message of the mirror topic as the replay core reads it. The replay stage passes
    aiokafka's ``ConsumerRecord`` as it is (same attributes): no object per message."""

    value: bytes | None
    partition: int = 0
    offset: int = -1
    topic: str = ""
    key: bytes | None = None


@dataclass
class Candidate:
    config: CandidateConfig
    adapter: InputAdapter
    runner: Runner
    # The mirror offsets it is scored over (streams/registry/store.py): from start (a partition absent: 0)
    # up to stop (None: no stop; a partition absent: 0). The TOML's candidates: every offset.
    start: dict[int, int] = field(default_factory=dict)
    stop: dict[int, int] | None = None

    def scores(self, partition: int, offset: int) -> bool:
        if offset < self.start.get(partition, 0):
            return False
        return self.stop is None or offset < self.stop.get(partition, 0)

    @classmethod
    def load(cls, config: CandidateConfig, providers: Sequence[str] | None) -> Candidate:
        """The candidate, ready to replay; ``CandidateRefused`` (a ``ConfigError``, one line naming the
        field and the fix) when it cannot be judged as configured (streams/replay/blame.py, rule 4). A file
        onnxruntime cannot load raises onnxruntime's own exception (streams/doctor/checks.py words it); a
        torch candidate without torch installed, or a file torch does not load, is refused."""
        try:
            runner = load_runner(config.path, config.runtime, providers or None)
        except (ImportError, TorchModelError) as exc:  # no torch; a file torch does not load (one line each)
            raise CandidateRefused(f"candidates.{config.name}.path: {exc}") from exc
        problem = refusal(config, runner)
        if problem is not None:
            raise CandidateRefused(problem)
        return cls(config, InputAdapter(config.adapter), runner)


@dataclass
class ReplayOutput:
    batches: list[DiffBatch] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    max_sent_ms: dict[int, int] = field(default_factory=dict)  # mirror partition -> latest sent_at seen
    requests: int = 0  # valid requests in the micro-batch


class ReplayCore:
    """Candidates by model; ``replay(messages)`` scores one micro-batch. Stateless between calls."""

    def __init__(self, settings: Settings, candidates: dict[str, list[Candidate]] | None = None):
        self.settings = settings
        if candidates is None:
            candidates = defaultdict(list)
            for cfg in settings.candidates:
                candidates[cfg.model].append(Candidate.load(cfg, settings.replay.providers))
        self.candidates = candidates
        self.letter_log = LetterLog()
        self._groups: set[int] = set()  # ids of this micro-batch's groups (_per_group)
        self._shared: dict[tuple, object] = {}

    def swap(self, candidates: dict[str, list[Candidate]]) -> None:
        """Replace the candidate table as a whole (hot reload, streams/registry/reload.py): called on
        the core's thread between micro-batches, so a batch is replayed with one table."""
        self.candidates = candidates

    def replay(self, messages: Sequence[Inbound]) -> ReplayOutput:
        out = ReplayOutput()
        self._groups, self._shared = set(), {}  # see _per_group
        by_model, letters, out.max_sent_ms = route(messages, self.candidates.__contains__, _letter)
        out.dead_letters.extend(letters)
        scored_ms = int(time.time() * 1000)
        for model, items in by_model.items():
            groups, model_letters = [], []
            for group in groups_by_signature(items):
                try:
                    stacked, group, letters = _stack_finite(group)
                    # Evidence keys once per request, before any candidate's adapter: (n, 2) uint64.
                    keys = evidence_keys(group, stacked) if group else None
                except Exception as exc:  # noqa: BLE001 - never expected (same signature); never fatal
                    stacked, letters = {}, [_letter(msg, "other", f"inputs: {_describe(exc)}") for _, msg in group]
                    group = []
                model_letters.extend(letters)
                if group:
                    groups.append((group, stacked, keys))
                    self._groups.add(id(group))
            out.dead_letters.extend(model_letters)
            # The producer's bad inputs (NaN, several rows) are unscorable for every candidate of the model.
            unscorable = [letter for letter in model_letters if letter.error_type in UNSCORABLE]
            sent = {(msg.partition, msg.offset): ev.sent_ms for ev, msg in items} if unscorable else {}
            out.requests += sum(len(group) for group, _, _ in groups)
            model_covers = covers(items)  # every message of the model, dead letters included
            model_batches = []
            for cand in self.candidates[model]:
                c_groups, c_unscorable, c_covers = groups, unscorable, model_covers
                if cand.start or cand.stop is not None:  # a registry candidate: only its offsets
                    c_groups, c_items, c_unscorable = in_range(cand, groups, items, unscorable)
                    if not c_items:
                        continue
                    c_covers = covers(c_items)
                batch, letters = self._replay_candidate(cand, c_groups, scored_ms)
                batch.routed = sum(len(g) for g, _, _ in c_groups) + len(c_unscorable)
                batch.covers = dict(c_covers)
                _count_unscorable(batch, c_unscorable, sent)
                model_batches.append((cand, batch))
                out.dead_letters.extend(letters)
            pair_reference_latency(model_batches)
            out.batches.extend(b for _, b in model_batches)
        self._log_letters(out.dead_letters, by_model)
        return out

    def _log_letters(self, letters: list[DeadLetter], by_model) -> None:
        """Dead letters into the log's per-minute summary (``LetterLog``), never a line per message."""
        if letters:
            known = {(msg.partition, msg.offset): (model, ev.request_id)
                     for model, items in by_model.items() for ev, msg in items}  # fmt: skip
            for letter in letters:
                model, request_id = known.get((letter.partition, letter.offset), (None, None))
                example = (f"request {request_id}" if request_id is not None
                           else f"message {letter.topic}/{letter.partition}@{letter.offset}")  # fmt: skip
                self.letter_log.add((model, letter.candidate, letter.error_type), example, letter.reason)
        self.letter_log.flush()

    # -- one candidate --------------------------------------------------------------------------
    def _replay_candidate(self, cand: Candidate, groups, scored_ms: int) -> tuple[DiffBatch, list[DeadLetter]]:
        """Who is to blame decides where a request ends up (streams/replay/blame.py): a request the producer
        sent wrong for this candidate (adapter, input dtype, baseline output) is a dead letter and
        counts as *unscorable*; an exception in the candidate's own run, or an answer that is no
        probability vector, is a diff row with the error (a *candidate error*, judged by error_rate)."""
        letters: list[DeadLetter] = []
        parts: list[DiffBatch] = []
        cast: dict[str, int] = {}
        for group, stacked, keys in groups:
            group, feeds, keys, refused, what = self._prepare(cand, group, stacked, keys)
            letters.extend(refused)
            if not group:
                continue
            scored, more = self._run(cand, group, feeds, keys, scored_ms)
            parts.extend(scored)
            letters.extend(more)
            rows = sum(len(p) for p in scored)
            if what and rows:
                cast[what] = cast.get(what, 0) + rows
        batch = _concat(cand.config, scored_ms, [p for p in parts if len(p)])
        batch.cast = cast
        unscorable = [letter for letter in letters if letter.error_type in UNSCORABLE]
        if unscorable:  # their sent times, so that their windows still close
            sent = {(msg.partition, msg.offset): ev.sent_ms for group, _, _ in groups for ev, msg in group}
            _count_unscorable(batch, unscorable, sent)
        return batch, letters

    def _prepare(self, cand: Candidate, group, stacked: dict[str, np.ndarray], keys: np.ndarray):
        """The group's inputs as the model takes them: adapter, declared shapes, cast policy.
        Returns (group, feeds, keys, letters, what was cast): requests the producer sent wrong for
        this candidate leave the group as dead letters. A group's requests share input names, dtypes
        and per-row shapes, so the adapter, the shape check and the dtype check hold for all or none."""
        cfg = cand.config
        try:
            feeds = cand.adapter(stacked)
            cand.runner.check_row(feeds)
        except (ValueError, TypeError) as exc:  # AdapterError, InputShapeError: the request does not fit
            reason = f"candidate {cfg.name}: {_describe(exc)}"
            return [], {}, keys[:0], [_letter(msg, "adapter", reason, candidate=cand) for _, msg in group], ""
        fit = conform_inputs(feeds, cfg, cand.runner.input_dtypes)
        if fit.refused:
            return [], {}, keys[:0], [_letter(msg, "input_dtype", fit.refused, candidate=cand) for _, msg in group], ""
        if not fit.bad_rows:
            return group, fit.feeds, keys, [], fit.cast
        letters = [_letter(group[i][1], "input_dtype", reason, candidate=cand) for i, reason in fit.bad_rows.items()]
        keep = [i for i in range(len(group)) if i not in fit.bad_rows]
        feeds = {name: array[keep] for name, array in fit.feeds.items()}
        return [group[i] for i in keep], feeds, keys[keep], letters, fit.cast

    def _run(self, cand: Candidate, group, feeds, keys, scored_ms: int) -> tuple[list[DiffBatch], list[DeadLetter]]:
        """Score a prepared group; when the candidate raises, retry its requests one by one so only
        the request that makes it raise fails (a diff row carrying the exception: a candidate error)."""
        try:
            batch, letters = self._score(cand, group, feeds, keys, scored_ms)
            return [batch], letters
        except Exception as exc:  # noqa: BLE001 - isolate the message that causes it
            if len(group) == 1:
                failed, letter = self._failed(cand, group, keys, scored_ms, f"candidate {cand.config.name}: "
                                              f"{_describe(exc)}")  # fmt: skip
                return ([failed] if failed is not None else []), ([letter] if letter is not None else [])
        parts, letters = [], []
        for i in range(len(group)):
            one = {name: array[i : i + 1] for name, array in feeds.items()}
            more_parts, more = self._run(cand, [group[i]], one, keys[i : i + 1], scored_ms)
            parts.extend(more_parts)
            letters.extend(more)
        return parts, letters

    def _failed(self, cand: Candidate, group, keys: np.ndarray, scored_ms: int, reason: str):
        """The candidate raised on this one request: (a diff row carrying the error, None), or
        (None, a baseline_mismatch / baseline_invalid letter) when the baseline is unusable too: then
        the request could not have been compared anyway, and it is not counted against the candidate."""
        cfg = cand.config
        events = [ev for ev, _ in group]
        base_rows, problems = baseline_rows(events, cfg, None)
        if problems:
            return None, _letter(group[0][1], "baseline_mismatch", f"{problems[0]}; the producer must send it, or fix "
                                 f"candidates.{cfg.name}.baseline_output", candidate=cand)  # fmt: skip
        invalid = baseline_problems(base_rows, cfg)
        if invalid:
            reason = baseline_invalid_reason(invalid[0], cfg)
            return None, _letter(group[0][1], "baseline_invalid", reason, candidate=cand)
        cand_rows = np.full(base_rows.shape, np.nan)
        batch = self._columns(cand, group, keys, scored_ms, base_rows, cand_rows, np.full(len(events), np.nan), reason)
        return batch, None

    def _score(self, cand: Candidate, group, feeds: dict[str, np.ndarray], keys: np.ndarray, scored_ms: int):
        cfg = cand.config
        outputs, latencies = self._run_timed(cand, group, feeds)
        cand_rows = np.asarray(outputs, dtype=np.float64).reshape(len(group), -1)
        width = cand_rows.shape[1]
        base_rows, problems = self._per_group(group, ("baseline", cfg.baseline_output, width),
                                              lambda: baseline_rows([ev for ev, _ in group], cfg, width))  # fmt: skip
        invalid = self._per_group(group, ("valid", cfg.baseline_output, width, *baseline_check_key(cfg)), lambda: (
            baseline_problems(base_rows, cfg, problems)))  # fmt: skip
        letters = [_letter(group[i][1], "baseline_mismatch", f"{reason}; the producer must send it, or fix "
                           f"candidates.{cfg.name}.baseline_output", candidate=cand)
                   for i, reason in problems.items()]  # fmt: skip
        letters += [_letter(group[i][1], "baseline_invalid", baseline_invalid_reason(reason, cfg), candidate=cand)
                    for i, reason in invalid.items()]  # fmt: skip
        if letters:
            keep = [i for i in range(len(group)) if i not in problems and i not in invalid]
            group, base_rows, cand_rows, keys = [group[i] for i in keep], base_rows[keep], cand_rows[keep], keys[keep]
            latencies = np.asarray(latencies, dtype=np.float64)[keep]
        return self._columns(cand, group, keys, scored_ms, base_rows, cand_rows, latencies), letters

    def _run_timed(self, cand: Candidate, group, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The candidate's outputs and latencies (ms) for a prepared group, in the configured timing.
        Sampled: the batched call, then the sampled rows (``timed_rows``) each run alone and timed;
        the other rows' latency is NaN (not measured)."""
        replay, cfg, n = self.settings.replay, cand.config, len(group)
        if replay.timing != "sampled":
            return cand.runner.run_stacked(feeds, n, cfg.output, replay.timing)
        outputs, latencies = cand.runner.run_stacked(feeds, n, cfg.output, "sampled")
        req = self._per_group(group, ("requests",), lambda: request_columns(group))
        rows = self._per_group(group, ("timed",), lambda: timed_rows(
            req["id_hash"], replay.timing_sample, req["sent_ms"], int(self.settings.windows.size_s * 1000),
            replay.timing_min_per_window))  # fmt: skip
        if rows.size:
            latencies = np.array(latencies, dtype=np.float64)
            latencies[rows] = cand.runner.time_alone(feeds, cfg.output, rows)
        return outputs, latencies

    def _per_group(self, group, what: tuple, make):
        """``make()`` once per group of the micro-batch for all candidates of its model: what
        every candidate reads from the same requests. The groups stay alive for the call, so
        their ids key it; a group filtered for one candidate is a temporary list whose id may be
        reused, so it is never cached."""
        if id(group) not in self._groups:
            return make()
        key = (id(group), *what)
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def _columns(self, cand: Candidate, group, keys, scored_ms, base_rows, cand_rows, latencies, failure: str = ""):
        cfg = cand.config
        req = self._per_group(group, ("requests",), lambda: request_columns(group))
        kind = cfg.output_kind()  # the candidate's output kind computes the diffs (streams/replay/columns.py)
        diffs = kind.diffs(base_rows, cand_rows)
        cols = empty_columns(len(group))
        for name in ("sent_ms", "baseline_latency_ms", "label", "source_partition", "source_offset", "id_hash"):
            cols[name][:] = req[name]
        metrics = fill_kind_columns(cols, diffs, failure)
        cols["candidate_latency_ms"][:] = latencies
        cols["input_hash"][:] = keys[:, 0]
        cols["sample_hash"][:] = keys[:, 1]
        # Lists shared by the candidates' batches: nothing downstream mutates them (the judge
        # takes subsets into new lists; attribute maps are only read).
        return DiffBatch(
            cfg.model, cfg.name, scored_ms, cols, req["request_id"], req["baseline_version"],
            list(map(str, diffs.error.tolist())), req["attributes"], getattr(kind, "top_k", 3),
            kind=kind.name, metrics=metrics,
        )  # fmt: skip


def _count_unscorable(batch: DiffBatch, letters: list[DeadLetter], sent: dict[tuple[int, int], int]) -> None:
    """Count the pair's unscorable letters on its batch, with their sent times (their windows still close)."""
    for letter in letters:
        batch.unscorable[letter.error_type] = batch.unscorable.get(letter.error_type, 0) + 1
        batch.unscorable_ms.append(sent.get((letter.partition, letter.offset), 0))


def _stack_finite(group):
    """Stack a group's inputs along axis 0 (one row per request); requests with NaN/infinite
    float inputs become dead letters and leave the group. Returns (stacked, kept, letters)."""
    events = list(map(_EVENT, group))
    # in C (maps of itemgetters): no Python per request
    stacked = {name: stack(list(map(itemgetter(name), map(_INPUTS, events)))) for name in events[0].inputs}
    letters, bad = [], np.zeros(len(events), dtype=bool)
    for name, array in stacked.items():
        if array.shape[0] != len(events):  # a request carrying several rows: its own group, refused
            return stacked, [], [_letter(msg, "invalid_tensor", f"inputs.{name}: shape {list(ev.inputs[name].shape)} "
                                 "holds several rows; a mirrored request carries one") for ev, msg in group]  # fmt: skip
        if array.dtype.kind in "fc":
            rows_bad = ~np.isfinite(array.reshape(len(events), -1)).all(axis=1)
            for i in np.flatnonzero(rows_bad & ~bad).tolist():
                n_bad = int(array[i].size - np.count_nonzero(np.isfinite(array[i])))
                letters.append(_letter(group[i][1], "non_finite_input", f"inputs.{name}: {n_bad} of {array[i].size} "
                                       "values are NaN or infinite; the producer must send finite inputs"))  # fmt: skip
            bad |= rows_bad
    if bad.any():
        keep = np.flatnonzero(~bad)
        return {name: array[keep] for name, array in stacked.items()}, [group[i] for i in keep.tolist()], letters
    return stacked, group, letters


def _concat(cfg: CandidateConfig, scored_ms: int, parts: list[DiffBatch]) -> DiffBatch:
    if parts:
        return DiffBatch.concat(parts)
    return DiffBatch(cfg.model, cfg.name, scored_ms, empty_columns(0), [], [], [], [], kind=cfg.kind)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _letter(msg: Inbound, kind: str, reason: str, candidate: Candidate | None = None) -> DeadLetter:
    return DeadLetter.for_payload(
        msg.value, error_type=kind, reason=reason, topic=msg.topic, partition=msg.partition, offset=msg.offset,
        key=msg.key, candidate=candidate.config.name if candidate else None,
    )  # fmt: skip
