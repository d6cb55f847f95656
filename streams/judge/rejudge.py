"""Re-judge stored traffic: ``shadowlens rejudge`` (README, "Verdict history and re-judging").

Reads a pair's stored diff rows from ClickHouse (no model is called), replays them through the
judge's own code (``streams.judge.core.JudgeCore``: ``apply``, ``close_due``, the policy's ``judge``)
under the recorded policy or another one, at the very looks where the worker judged, and prints
the two verdict timelines side by side.

Why it lands on the recorded verdicts under the recorded policy: a verdict depends on the rows
counted before it (the mirror offset per partition the judge had applied: recorded with every
verdict, streams/judge/history.py), on when its clusters ended (the close's event-time clock: recorded),
on counts that are no rows (requests routed, unscorable, cast: recorded), on the judge's memory of
its earlier looks (replayed in order) and, for a candidate with a noise reference, on that pair's
evidence at the same look (replayed beside it, up to its recorded offsets). The rows carry what the
judge reads of them, cluster keys and the replayed baseline's latency included
(schemas/clickhouse.py ``REJUDGE_DIFF_COLUMNS``). Each close goes through ``close_due`` with a
progress view that gives back the recorded clock (``_view``), so the windows due, the clusters
ended and the judging are the judge's code, not a copy. Under another policy the looks stay where
they were: when the judge looks depends on the traffic's progress, never on the policy.

Known limits (said in the output when they apply): verdicts without an evidence record (stored
before it existed, or an operator's retirement) are not replayed; rows stored before the
cluster-key columns existed have no keys (each request is then a cluster of its own); between two
looks the rows go in one call, so a pair with more open clusters than ``cluster_max_open`` may
evict other clusters than the live judge did; after a judge crash between a verdict's write and
its state's save the judge judged that look again, and the replay may differ from there on.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from schemas import Verdict
from scorers.judge import JudgePolicy
from streams.judge.history import policy_hash
from streams.judge.core import JudgeCore
from streams.records import DiffBatch, PartitionProgress, empty_columns
from streams.judge.windows import SourceView, datetime_to_ms, pair_key

CLASSIFICATION_MAP = ("linf", "hellinger", "topk_overlap")  # classification's distances, kept in the metrics map
NOT_COMPARED = {"updated_at", "age_s"}  # when it was written, not what it says
FAR_S = 10**7  # replayed closes happen "this long after" the rows: every pair idle long enough
ROW_SQL = """SELECT request_id, baseline_version, toUnixTimestamp64Milli(sent_at), toUnixTimestamp64Milli(scored_at),
    baseline_label, candidate_label, label_flip, confidence_delta, l1_distance, baseline_confidence,
    candidate_confidence, baseline_latency_ms, candidate_latency_ms, error, label, attributes, metrics,
    source_partition, source_offset, {extra}
FROM {db}.request_diffs WHERE model = %(m)s AND candidate = %(c)s
ORDER BY scored_at, source_partition, source_offset LIMIT 1 BY source_partition, source_offset"""
# Optional columns (older tables lack them) and what a row without them holds.
EXTRA = {"kind": "'classification'", "input_hash": "toUInt64(0)", "sample_hash": "toUInt64(0)",
         "reference_latency_ms": "nan"}  # fmt: skip


class RejudgeFailed(RuntimeError):
    """One line naming the cause and the fix (the CLI exits 2)."""


@dataclass
class Look:
    number: int  # the pair's n-th stored verdict (verdict_changes.look)
    recorded: Verdict
    received: int  # requests routed to the candidate by then
    replayed: Verdict | None = None
    differs: list[str] = field(default_factory=list)  # fields of the verdict that differ


@dataclass
class Report:
    model: str
    candidate: str
    recorded_policies: list[str]
    policy: str  # the hash replayed
    policy_source: str
    rows: int
    looks: list[Look]
    caveats: list[str]

    @property
    def same_policy(self) -> bool:
        return self.recorded_policies == [self.policy]

    @property
    def reproduced(self) -> bool:
        return all(look.replayed is not None and not look.differs for look in self.looks)


class _Discard:
    """Where the replaying judge writes: nowhere (the stored history stays as it is). Nothing it
    reads back is needed: producer retries were dropped before the rows were stored."""

    def insert_diff_batches(self, batches) -> None: ...
    def insert_windows(self, windows) -> None: ...
    def insert_verdicts(self, verdicts, provenance=None) -> None: ...
    def scored_positions(self, pairs, request_ids, since_ms, until_ms) -> dict:
        return {}

    def stored_id_hashes(self, model, candidate, since_ms):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)


def load_policy(path: Path) -> dict[str, Any]:
    """JudgePolicy fields from a TOML file, at its top level or under ``[policy]``."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RejudgeFailed(f"--policy {path}: no such file; pass a TOML file of JudgePolicy fields "
                            "(e.g. label_flip_rate_margin = 0.05), at its top level or under [policy]") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RejudgeFailed(f"--policy {path}: not a readable TOML file ({exc}); fix it and run again") from None
    table = data["policy"] if isinstance(data.get("policy"), dict) else data
    try:
        JudgePolicy.from_dict(table)
    except (TypeError, ValueError) as exc:
        raise RejudgeFailed(f"--policy {path}: {exc}; the fields are scorers.judge.JudgePolicy's (README, "
                            "config reference)") from None
    return table


def rejudge(settings, sink, model: str, candidate: str, overrides: dict[str, Any] | None = None,
            source: str = "the config's") -> Report:  # fmt: skip
    """Replay the pair's stored rows look by look; ``overrides``: policy fields replacing the pair's
    configured ones (None: the configured policy)."""
    cfg = next((c for c in settings.candidates if c.model == model and c.name == candidate), None)
    if cfg is None:
        raise RejudgeFailed(f"{model}/{candidate} is not a [[candidates]] entry of the config: rejudge needs the "
                            "pair's block (its kind, policy and noise reference); pass the worker's config with "
                            "--config")  # fmt: skip
    cand = cfg.model_copy(update={"policy": {**cfg.policy, **(overrides or {})}})
    replay_settings = settings.model_copy(update={"candidates": [cand if c is cfg else c for c in settings.candidates]})
    db, caveats = settings.clickhouse.database, []
    recorded = _recorded(sink, db, model, candidate)
    if not recorded:
        raise RejudgeFailed(f"no verdict is stored for {model}/{candidate} in {settings.clickhouse.dsn}: check "
                            "--model and --candidate (GET /v1/verdicts?all=true lists every pair) and the config's "
                            "[clickhouse] dsn")  # fmt: skip
    replayable = [(n, v, h, ev) for n, (v, h, ev) in enumerate(recorded, 1) if ev is not None]
    if not replayable:
        raise RejudgeFailed(f"none of the {len(recorded)} stored verdicts of {model}/{candidate} has an evidence "
                            "record (written before shadowlens kept one, or by an operator): nothing to replay")
    if len(replayable) < len(recorded):
        caveats.append(f"{len(recorded) - len(replayable)} stored verdict(s) without an evidence record (an "
                       "operator's retirement, or written before evidence was kept) are not replayed")
    size_ms = int(settings.windows.size_s * 1000)
    if any(datetime_to_ms(v.window_end) - datetime_to_ms(v.window_start) != size_ms for _, v, _, _ in replayable):
        raise RejudgeFailed(f"the config's [windows] size_s = {settings.windows.size_s:g} is not the one these "
                            "verdicts were judged with; pass the config the worker ran with")  # fmt: skip
    key = pair_key(model, candidate)
    looks = {key: [(n, v, ev) for n, v, _, ev in replayable]}
    noise = sorted({ev["noise"]["candidate"] for _, _, _, ev in replayable if ev.get("noise")})
    ref_key = pair_key(model, noise[0]) if noise else None
    if noise and not any(c.model == model and c.name == noise[0] and c.noise_reference for c in settings.candidates):
        caveats.append(f"the noise reference {noise[0]} is not in the config: judged without its noise floor")
        ref_key = None
    if ref_key is not None:
        looks[ref_key] = [(n, v, ev) for n, (v, _, ev) in enumerate(_recorded(sink, db, model, noise[0]), 1)
                          if ev is not None]  # fmt: skip
    feeds = {k: _Feed(sink, db, model, k.partition("/")[2], replay_settings, caveats) for k in looks}
    out = _replay(replay_settings, looks, feeds, key, ref_key)
    hashes = list(dict.fromkeys(h for _, _, h, _ in replayable))
    return Report(model, candidate, hashes, policy_hash(cand.judge_policy()), source, feeds[key].n, out, caveats)


def _recorded(sink, db: str, model: str, candidate: str) -> list[tuple[Verdict, str, dict | None]]:
    columns = {name for (name,) in sink.query(
        "SELECT name FROM system.columns WHERE database = %(d)s AND table = 'verdicts'", {"d": db})}  # fmt: skip
    extra = "policy_hash, evidence" if {"policy_hash", "evidence"} <= columns else "'', ''"
    rows = sink.query(f"SELECT body, {extra} FROM {db}.verdicts WHERE model = %(m)s AND candidate = %(c)s "
                      "ORDER BY updated_at", {"m": model, "c": candidate})  # fmt: skip
    return [(Verdict.model_validate_json(b), h, json.loads(e) if e else None) for b, h, e in rows]


class _Feed:
    """One pair's stored rows in the order the judge applied them (micro-batch by micro-batch:
    ``scored_at``, then mirror partition and offset), handed out up to a look's applied offsets."""

    def __init__(self, sink, db: str, model: str, candidate: str, settings, caveats: list[str]):
        self.model, self.candidate = model, candidate
        cfg = next((c for c in settings.candidates if c.model == model and c.name == candidate), None)
        kind = cfg.output_kind() if cfg is not None else None
        self.top_k = int(getattr(kind, "top_k", 3))
        have = {name for (name,) in sink.query(
            "SELECT name FROM system.columns WHERE database = %(d)s AND table = 'request_diffs'", {"d": db})}
        missing = [c for c in EXTRA if c not in have]
        if {"input_hash", "sample_hash"} & set(missing):
            caveats.append(f"the stored rows of {model}/{candidate} have no cluster keys (a table from before "
                           "rejudge): each request is judged as a cluster of its own, which the live judge did not")
        extra = ", ".join(EXTRA[c] if c in missing else c for c in EXTRA)
        rows = sink.query(ROW_SQL.format(extra=extra, db=db), {"m": model, "c": candidate})
        self.n = len(rows)
        cols = list(zip(*rows, strict=True)) if rows else [[] for _ in range(19 + len(EXTRA))]
        (self.request_id, self.baseline_version, sent, scored, bl, cl, flip, delta, l1, bconf, cconf, blat, clat,
         self.error, label, self.attributes, self.metrics, part, off, self.kind, ih, sh, ref) = cols  # fmt: skip
        f8 = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
        self.num = {"sent_ms": np.asarray(sent, np.int64), "baseline_label": np.asarray(bl, np.int32),
                    "candidate_label": np.asarray(cl, np.int32), "label_flip": np.asarray(flip, np.uint8),
                    "confidence_delta": f8(delta), "l1": f8(l1), "baseline_confidence": f8(bconf),
                    "candidate_confidence": f8(cconf), "baseline_latency_ms": f8(blat),
                    "candidate_latency_ms": f8(clat),
                    "label": f8([np.nan if x is None else x for x in label]), "reference_latency_ms": f8(ref),
                    "source_partition": np.asarray(part, np.int32), "source_offset": np.asarray(off, np.int64),
                    "input_hash": np.asarray(ih, np.uint64), "sample_hash": np.asarray(sh, np.uint64)}  # fmt: skip
        self.scored = np.asarray(scored, np.int64)
        self.fed = np.zeros(self.n, dtype=bool)

    def upto(self, applied: dict[str, int]) -> list[DiffBatch]:
        """The rows not handed out yet whose offset the look had applied, as one batch per micro-batch."""
        limit = np.array([applied.get(str(p), -1) for p in range(int(self.num["source_partition"].max(initial=-1)) + 1)]
                         + [-1], dtype=np.int64)  # fmt: skip
        part = self.num["source_partition"]
        take = np.flatnonzero(~self.fed & (self.num["source_offset"] <= limit[np.where(part >= 0, part, -1)]))
        self.fed[take] = True
        if not take.size:
            return []
        # Rows are in scored_at order, so each micro-batch's rows are adjacent.
        return [self._batch(chunk) for chunk in np.split(take, np.flatnonzero(np.diff(self.scored[take])) + 1)]

    def _batch(self, idx: np.ndarray) -> DiffBatch:
        n, pick = len(idx), idx.tolist()
        columns = empty_columns(n)
        for name, values in self.num.items():
            columns[name] = values[idx]
        kind = str(self.kind[pick[0]])
        maps = [self.metrics[i] for i in pick]
        names = sorted({k for m in maps for k in m} - (set(CLASSIFICATION_MAP) if kind == "classification" else set()))
        if kind == "classification":
            for name in CLASSIFICATION_MAP:
                columns[name] = np.array([m.get(name, 0.0) for m in maps], dtype=np.float64)
        parts = columns["source_partition"]
        covers = {int(p): int(columns["source_offset"][parts == p].max()) for p in np.unique(parts).tolist()}
        return DiffBatch(
            self.model, self.candidate, int(self.scored[pick[0]]), columns, [self.request_id[i] for i in pick],
            [self.baseline_version[i] for i in pick], [self.error[i] for i in pick],
            [dict(self.attributes[i]) for i in pick], self.top_k, n, covers, kind=kind,
            metrics={k: np.array([m.get(k, np.nan) for m in maps], dtype=np.float64) for k in names},
        )  # fmt: skip


def _view(clock: int | None, now: float) -> SourceView | None:
    """A progress view on which the judge's own rules (streams/judge/windows.py) find the recorded clock:
    ``None`` (every cluster ended: the traffic had stopped) is a source read to its end, an event
    time is a watermark, -1 (no watermark yet) is no view."""
    if clock == -1:
        return None
    view = SourceView()
    view.mirror_partitions = 1
    view.partitions[0] = PartitionProgress(1, 1, 0, 0.0) if clock is None else PartitionProgress(0, 1, int(clock), now)
    view.reported_wall[0] = now
    return view


def _replay(settings, looks: dict, feeds: dict, key: str, ref_key: str | None) -> list[Look]:
    core = JudgeCore(settings, _Discard())
    groups: dict[float, list[tuple[str, int, Verdict, dict]]] = {}
    for pk, items in looks.items():
        for n, v, ev in items:
            groups.setdefault(float(ev["look"]), []).append((pk, n, v, ev))
    out: list[Look] = []
    judge_log = logging.getLogger("shadowlens.judge")
    level, judge_log.level = judge_log.level, logging.ERROR  # the live judge already said its rollbacks
    try:
        for look in sorted(groups):
            group = groups[look]
            targets: dict[str, dict[str, int]] = {}
            for pk, _, _, ev in group:
                _raise(targets.setdefault(pk, {}), ev["applied"])
                if ev.get("noise") and ref_key is not None:
                    _raise(targets.setdefault(ref_key, {}), ev["noise"]["applied"])
            batches = [b for pk, t in targets.items() for b in feeds[pk].upto(t)]
            if batches:
                core.apply(batches)
            clocks = {}
            for pk, _, v, ev in group:
                pw = core._pair(pk)  # noqa: SLF001 - the counts that are no rows, as the judge had them
                pw.received, pw.unscorable, pw.cast = int(ev["received"]), dict(ev["unscorable"]), dict(ev["cast"])
                start = datetime_to_ms(v.window_start)
                if start >= pw.closed_upto_ms:  # its window held only unscorable requests: no row opened it
                    pw.window_for(start)
                clocks[pk] = ev["clock"]
            now = time.time() + FAR_S
            verdicts, _ = core.close_due(lambda k, c=clocks, t=now: _view(c[k], t) if k in c else None, now_wall=now)
            got = {pair_key(v.model, v.candidate): v for v in verdicts}
            for pk, n, v, ev in group:
                if pk == key:
                    mine = got.get(pk)
                    out.append(Look(n, v, int(ev["received"]), mine, _differs(v, mine)))
    finally:
        judge_log.setLevel(level)
    return sorted(out, key=lambda lk: lk.number)


def _raise(target: dict[str, int], applied: dict[str, int]) -> None:
    for p, o in applied.items():
        target[p] = max(int(o), target.get(p, -1))


def _differs(recorded: Verdict, replayed: Verdict | None) -> list[str]:
    if replayed is None:
        return ["(no verdict at this look)"]
    a, b = (x.model_dump(mode="json", exclude=NOT_COMPARED) for x in (recorded, replayed))
    return [k for k in a if a[k] != b.get(k)]


def run(settings, model: str, candidate: str, policy_file: Path | None, as_json: bool = False) -> tuple[str, int]:
    """The CLI's rejudge: (what to print, exit status: 1 when the recorded policy did not reproduce
    the recorded verdicts, else 0). Raises ``RejudgeFailed``."""
    from streams.sink import ClickHouseSink, SinkUnavailable

    overrides = load_policy(policy_file) if policy_file is not None else None
    try:
        sink = ClickHouseSink(settings.clickhouse.dsn, settings.clickhouse.database, create=False)
    except SinkUnavailable as exc:
        raise RejudgeFailed(str(exc)) from None
    try:
        report = rejudge(settings, sink, model, candidate, overrides,
                         "the config's" if policy_file is None else f"the config's with {policy_file}")
    finally:
        sink.close()
    code = 1 if report.same_policy and not report.reproduced else 0
    return (json.dumps(as_dict(report), indent=1) if as_json else as_text(report)), code


def as_dict(report: Report) -> dict[str, Any]:
    return {
        "model": report.model, "candidate": report.candidate, "rows": report.rows,
        "recorded_policies": report.recorded_policies, "policy": report.policy, "policy_source": report.policy_source,
        "same_policy": report.same_policy, "reproduced": report.reproduced if report.same_policy else None,
        "recorded": _decisions(report, lambda lk: lk.recorded), "rejudged": _decisions(report, lambda lk: lk.replayed),
        "looks": [{"look": lk.number, "window_end": lk.recorded.window_end.isoformat(), "received": lk.received,
                   "recorded": lk.recorded.verdict, "recorded_samples": lk.recorded.samples,
                   "rejudged": lk.replayed.verdict if lk.replayed else None,
                   "rejudged_samples": lk.replayed.samples if lk.replayed else None,
                   "rejudged_reason": lk.replayed.reasons[0] if lk.replayed and lk.replayed.reasons else None,
                   "differs": lk.differs} for lk in report.looks],
        "caveats": report.caveats,
    }  # fmt: skip


def _decisions(report: Report, pick) -> dict[str, dict | None]:
    """The first look at which the timeline promotes, and the first at which it rolls back."""
    out: dict[str, dict | None] = {"promote": None, "rollback": None}
    for lk in report.looks:
        v = pick(lk)
        if v is not None and v.verdict in out and out[v.verdict] is None:
            out[v.verdict] = {"look": lk.number, "samples": v.samples, "received": lk.received,
                              "window_end": v.window_end.isoformat()}  # fmt: skip
    return out


def as_text(report: Report) -> str:
    src = report.policy_source
    lines = [f"rejudge {report.model}/{report.candidate}: {len(report.looks)} looks replayed from {report.rows} stored "
             f"diff rows (no model calls)",
             f"policy: recorded {', '.join(report.recorded_policies)}; replayed {report.policy} ({src})",
             f"{'look':>5}  {'window end (UTC)':<19}  {'scored':>7}  {'routed':>7}  {'recorded':<8}  rejudged"]
    before: tuple | None = None
    for i, lk in enumerate(report.looks):
        now = (lk.recorded.verdict, lk.replayed.verdict if lk.replayed else None)
        if now != before or i == len(report.looks) - 1:  # where either timeline moves, and the last look
            mark = "  *" if lk.differs and report.same_policy else ""
            lines.append(f"{lk.number:>5}  {lk.recorded.window_end:%Y-%m-%d %H:%M:%S}  {lk.recorded.samples:>7}  "
                         f"{lk.received:>7}  {now[0]:<8}  {now[1] or '-'}{mark}")  # fmt: skip
        before = now
    for name, pick in (("recorded", lambda lk: lk.recorded), ("rejudged", lambda lk: lk.replayed)):
        said = []
        for decision, at in _decisions(report, pick).items():
            verb = {"promote": "promotes", "rollback": "rolls back"}[decision]
            said.append(f"never {verb}" if at is None else
                        f"{verb} at look {at['look']} after {at['samples']} scored requests ({at['received']} routed)")
        lines.append(f"{name}: {'; '.join(said)}")
    if report.same_policy:
        bad = [lk for lk in report.looks if lk.replayed is None or lk.differs]
        lines.append(f"reproduced: all {len(report.looks)} looks identical to the recorded verdicts" if not bad else
                     f"NOT reproduced: {len(bad)} of {len(report.looks)} looks differ (first: look {bad[0].number}, "
                     f"{', '.join(bad[0].differs)})")  # fmt: skip
    lines.extend(f"note: {c}" for c in report.caveats)
    return "\n".join(lines)
