"""Sufficient statistics of one (model, candidate) pair over any span: a window or the whole run.

Everything the judge needs is a sum, a count, a sketch or a small bounded table, so two accumulators
merge exactly (``a.merge(b)`` equals updating one accumulator with both batches, up to float rounding),
whatever the order, worker or window they came from. ``to_dict`` is compact JSON (it is written to a
Kafka changelog every batch and into ClickHouse): no per-request lists beyond ``TOP_EXAMPLES`` request
ids of the largest diffs.

Bounded tables (documented limits): at most ``MAX_SLICE_ATTRIBUTES`` attributes and
``MAX_SLICE_VALUES`` values per attribute (later values go to ``OTHER``), ``MAX_ERROR_REASONS`` distinct
error reasons (later ones count under "other"), ``MAX_CLASSES`` predicted-label counters. Within these
limits merging is exact; past them the overflow bucket depends on arrival order.

Closed clusters (``scorers.clusters.ClusterStats``, ``clusters``): what the judge's bounds are computed on;
without a cluster tracker (``update(..., clustered=False)``) every request is a cluster of its own.

Window divergences come from counts, not from raw rows (``divergence()``): top-class confidence of
each model in ``CONFIDENCE_BINS`` = 50 fixed bins of [0, 1] with fixed-point moments, and the joint
(baseline, candidate) label table of scored rows, bounded to ``MAX_LABELS`` = 64 distinct labels (later
pairs count in its ``overflow``); see ``scorers.histograms`` and, for what is exact and what approximate,
``scorers.divergence``. Serialised state from before these tables (no ``confidence`` / ``label_pairs``
keys) loads with them empty.

An output kind's own per-request metrics (scorers/kinds: regression's ``abs_error``, ranking's
``overlap_at_k`` ...) are summed per name (``metrics`` of ``update``; scorers/metric_sums.py):
``metric_means()`` is the span's mean of each. State without them (no ``metric_sums`` key, as for
classification) loads with none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scorers import divergence as dv
from scorers.clusters import MAX_SLICE_ATTRIBUTES, MAX_SLICE_VALUES, OTHER, Closed, ClusterStats, capped_slot, singletons
from scorers.diffs import ClassificationDiffs
from scorers.examples import TOP_EXAMPLES, example_score, merge_examples, select_examples  # noqa: F401 - TOP_EXAMPLES re-exported
from scorers.histograms import ConfidenceHistogram, LabelPairTable
from scorers.metric_sums import MetricSums
from scorers.sketch import LatencySketch
from scorers.state_migration import clusters_from_first_seen

MAX_ERROR_REASONS = 32
MAX_CLASSES = 1024
_SUMS = ("abs_confidence_delta", "confidence_delta", "sq_confidence_delta", "l1", "linf", "hellinger",
         "topk_overlap")


@dataclass
class SliceStats:
    """Per attribute value: the counts the slice judgement needs."""

    requests: int = 0
    errors: int = 0
    scored: int = 0
    label_flips: int = 0
    sum_abs_confidence_delta: float = 0.0

    def add(self, other: SliceStats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.scored += other.scored
        self.label_flips += other.label_flips
        self.sum_abs_confidence_delta += other.sum_abs_confidence_delta

    def to_list(self) -> list:
        return [self.requests, self.errors, self.scored, self.label_flips, self.sum_abs_confidence_delta]

    @classmethod
    def from_list(cls, v: list) -> SliceStats:
        return cls(*v[:5])  # v3 state had two more: its first-seen counts (see from_dict)


class PairAccumulator:
    """update / merge / summary / to_dict / from_dict for one (model, candidate) span."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.scored = 0
        self.label_flips = 0
        self.sums = dict.fromkeys(_SUMS, 0.0)
        self.error_reasons: dict[str, int] = {}
        self.baseline_label_counts: dict[int, int] = {}
        self.candidate_label_counts: dict[int, int] = {}
        self.baseline_latency = LatencySketch()
        self.candidate_latency = LatencySketch()
        # paired accuracy on labelled, scored requests (McNemar's table)
        self.labelled = 0
        self.both_right = 0
        self.baseline_right_candidate_wrong = 0
        self.baseline_wrong_candidate_right = 0
        self.slices: dict[str, dict[str, SliceStats]] = {}
        self.top_examples: list[tuple[float, str, str]] = []  # (score, request_id, error reason)
        # window divergences from counts: scored rows only
        self.baseline_confidence = ConfidenceHistogram()
        self.candidate_confidence = ConfidenceHistogram()
        self.label_pairs = LabelPairTable()
        # Closed clusters (scorers.clusters): what the judge's bounds are computed on (scorers.ratio_cs).
        # Without a cluster tracker (``update(..., clustered=False)``) every request is its own cluster.
        self.clusters = ClusterStats()
        # Event-time span covered (sent_at, ms): the judge's minimum observation span.
        self.first_sent_ms: int | None = None
        self.last_sent_ms: int | None = None
        self.metric_sums = MetricSums()  # the output kind's own metrics (scorers.kinds), scored rows

    # -- updating -------------------------------------------------------------------------
    def update(self, diffs: ClassificationDiffs, *, baseline_latency_ms, candidate_latency_ms,
               request_ids: Sequence[str], attributes: Sequence[dict[str, str]] | None = None,
               labels=None, baseline_confidence=None, candidate_confidence=None, sent_ms=None, clustered: bool = False, metrics=None) -> None:
        """``baseline_confidence`` / ``candidate_confidence``: each model's top-class probability per row
        (1-D, same length as ``diffs``); rows that are not scored (``diffs.ok`` False) are left out.
        ``sent_ms``: the
        rows' event times, for the observed span. ``clustered``: the caller tracks clusters
        (``scorers.clusters.ClusterTracker``) and adds them when they close (``add_clusters``); else
        every row is a closed cluster of its own (independent requests). ``metrics``: the output
        kind's own per-row metrics, name -> (n,) floats (``metric_means``)."""
        n = len(diffs)
        if len(request_ids) != n:
            raise ValueError(f"{len(request_ids)} request ids for {n} diffs")
        conf = [None if v is None else np.asarray(v, dtype=np.float64).reshape(-1)
                for v in (baseline_confidence, candidate_confidence)]
        for v in conf:
            if v is not None and v.size != n:
                raise ValueError(f"{v.size} confidences for {n} diffs")
        ok = diffs.ok
        if sent_ms is not None and n:
            t = np.asarray(sent_ms, dtype=np.int64)
            self._span(int(t.min()), int(t.max()))
        self.requests += n
        self.errors += int(n - ok.sum())
        self.scored += int(ok.sum())
        self.label_flips += int(diffs.label_flip[ok].sum())
        cd = diffs.confidence_delta[ok]
        add = {"abs_confidence_delta": np.abs(cd).sum(), "confidence_delta": cd.sum(),
               "sq_confidence_delta": (cd * cd).sum(), "l1": diffs.l1[ok].sum(), "linf": diffs.linf[ok].sum(),
               "hellinger": diffs.hellinger[ok].sum(), "topk_overlap": diffs.topk_overlap[ok].sum()}
        for k, v in add.items():
            self.sums[k] += float(v)
        if not ok.all():
            reasons, counts = np.unique(diffs.error[~ok].astype(str), return_counts=True)
            self._count_reasons(dict(zip(reasons.tolist(), counts.tolist(), strict=True)))
        self._count_labels(self.baseline_label_counts, diffs.baseline_label[ok])
        self._count_labels(self.candidate_label_counts, diffs.candidate_label[ok])
        self.label_pairs.update(diffs.baseline_label[ok], diffs.candidate_label[ok])
        for hist, v in zip((self.baseline_confidence, self.candidate_confidence), conf, strict=True):
            if v is not None:
                hist.update(v[ok])
        self.baseline_latency.update(np.asarray(baseline_latency_ms, dtype=np.float64))
        self.candidate_latency.update(np.asarray(candidate_latency_ms, dtype=np.float64))
        if labels is not None:
            self._update_labels(diffs, np.asarray(labels, dtype=np.float64).reshape(-1))
        if attributes is not None:
            self._update_slices(diffs, attributes)
        batch_examples = select_examples(example_score(diffs), request_ids, diffs.error)
        self.top_examples = merge_examples(self.top_examples, batch_examples)
        if not clustered:
            self.clusters.add(singletons(ok, diffs.label_flip, diffs.confidence_delta, attributes))
        if metrics:
            self.metric_sums.update(metrics, ok)

    def metric_means(self) -> dict[str, float]:
        """The mean of each of the output kind's own metrics over the span's scored rows."""
        return self.metric_sums.means()

    def add_clusters(self, closed: Closed) -> None:
        """Closed clusters join the judged statistics (their requests were counted by ``update``)."""
        self.clusters.add(closed)

    def _span(self, first: int | None, last: int | None) -> None:
        if first is not None:
            self.first_sent_ms = first if self.first_sent_ms is None else min(self.first_sent_ms, first)
        if last is not None:
            self.last_sent_ms = last if self.last_sent_ms is None else max(self.last_sent_ms, last)

    @property
    def span_s(self) -> float:
        """Seconds of event time covered (0 without event times)."""
        if self.first_sent_ms is None or self.last_sent_ms is None:
            return 0.0
        return (self.last_sent_ms - self.first_sent_ms) / 1000

    def _count_reasons(self, reasons: dict[str, int]) -> None:
        for r, c in reasons.items():
            if r not in self.error_reasons and len(self.error_reasons) >= MAX_ERROR_REASONS:
                r = "other"
            self.error_reasons[r] = self.error_reasons.get(r, 0) + int(c)

    @staticmethod
    def _count_labels(table: dict[int, int], labels: np.ndarray) -> None:
        if labels.size == 0:
            return
        vals, counts = np.unique(labels, return_counts=True)
        for v, c in zip(vals.tolist(), counts.tolist(), strict=True):
            if v in table or len(table) < MAX_CLASSES:
                table[v] = table.get(v, 0) + c

    def _update_labels(self, diffs: ClassificationDiffs, labels: np.ndarray) -> None:
        known = np.isfinite(labels) & diffs.ok
        if not known.any():
            return
        y = labels[known]
        b_right = diffs.baseline_label[known] == y
        c_right = diffs.candidate_label[known] == y
        self.labelled += int(known.sum())
        self.both_right += int((b_right & c_right).sum())
        self.baseline_right_candidate_wrong += int((b_right & ~c_right).sum())
        self.baseline_wrong_candidate_right += int((~b_right & c_right).sum())

    def _update_slices(self, diffs: ClassificationDiffs, attributes: Sequence[dict[str, str]]) -> None:
        ok = diffs.ok
        flips = diffs.label_flip & ok
        absd = np.where(ok, np.abs(np.nan_to_num(diffs.confidence_delta)), 0.0)
        keys = sorted({k for a in attributes if a for k in a})
        for key in keys:
            values = np.array([str(a.get(key, "")) if a else "" for a in attributes], dtype=object)
            present = values != ""
            if not present.any():
                continue
            uniq, inv = np.unique(values[present].astype(str), return_inverse=True)
            counts = np.bincount(inv, minlength=uniq.size)
            errs = np.bincount(inv, weights=~ok[present], minlength=uniq.size)
            scored = np.bincount(inv, weights=ok[present], minlength=uniq.size)
            fl = np.bincount(inv, weights=flips[present], minlength=uniq.size)
            sa = np.bincount(inv, weights=absd[present], minlength=uniq.size)
            for j, value in enumerate(uniq.tolist()):
                self._slice(key, value).add(SliceStats(int(counts[j]), int(errs[j]), int(scored[j]),
                                                       int(fl[j]), float(sa[j])))

    def _slice(self, key: str, value: str) -> SliceStats:
        return capped_slot(self.slices, key, value, SliceStats)

    # -- merging --------------------------------------------------------------------------
    def merge(self, other: PairAccumulator) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.scored += other.scored
        self.label_flips += other.label_flips
        for k in _SUMS:
            self.sums[k] += other.sums[k]
        self._count_reasons(other.error_reasons)
        for mine, theirs in ((self.baseline_label_counts, other.baseline_label_counts),
                             (self.candidate_label_counts, other.candidate_label_counts)):
            for v, c in theirs.items():
                if v in mine or len(mine) < MAX_CLASSES:
                    mine[v] = mine.get(v, 0) + c
        self.baseline_latency.merge(other.baseline_latency)
        self.candidate_latency.merge(other.candidate_latency)
        self.labelled += other.labelled
        self.both_right += other.both_right
        self.baseline_right_candidate_wrong += other.baseline_right_candidate_wrong
        self.baseline_wrong_candidate_right += other.baseline_wrong_candidate_right
        for key, table in other.slices.items():
            for value, st in table.items():
                self._slice(key, value).add(st)
        self.top_examples = merge_examples(self.top_examples, other.top_examples)
        self.baseline_confidence.merge(other.baseline_confidence)
        self.candidate_confidence.merge(other.candidate_confidence)
        self.label_pairs.merge(other.label_pairs)
        self.clusters.merge(other.clusters)
        self._span(other.first_sent_ms, other.last_sent_ms)
        self.metric_sums.merge(other.metric_sums)

    def copy(self) -> PairAccumulator:
        return PairAccumulator.from_dict(self.to_dict())

    # -- reading --------------------------------------------------------------------------
    @property
    def flip_rate(self) -> float | None:
        return self.label_flips / self.scored if self.scored else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def mean(self, name: str) -> float | None:
        return self.sums[name] / self.scored if self.scored else None

    @property
    def example_request_ids(self) -> list[str]:
        return [rid for _, rid, _ in self.top_examples]

    def summary(self) -> dict:
        b, c = self.baseline_latency, self.candidate_latency
        return {
            "requests": self.requests, "errors": self.errors, "label_flips": self.label_flips,
            "flip_rate": self.flip_rate, "mean_abs_confidence_delta": self.mean("abs_confidence_delta"),
            "baseline_latency_p50_ms": b.quantile(0.5), "baseline_latency_p95_ms": b.quantile(0.95),
            "baseline_latency_p99_ms": b.quantile(0.99),
            "candidate_latency_p50_ms": c.quantile(0.5), "candidate_latency_p95_ms": c.quantile(0.95),
            "candidate_latency_p99_ms": c.quantile(0.99),
        }

    def divergence(self) -> dict[str, float]:
        """Distribution statistics of the span from its counts (``divergence.from_counts``): psi, kl,
        js_distance, hellinger, wasserstein, wasserstein_normalised, ks, chi2_labels_pvalue,
        stuart_maxwell_pvalue. {} with fewer than 2 scored rows. Exact or absent: a part is left out
        when its table does not cover every scored row (confidences never passed to ``update``, state
        from before these tables, more than ``MAX_LABELS`` / ``MAX_CLASSES`` labels)."""
        if self.scored < 2:
            return {}
        kw: dict = {}
        b, c = self.baseline_confidence, self.candidate_confidence
        if all(h.total + h.missing == self.scored for h in (b, c)):
            kw.update(baseline_bins=b.counts, candidate_bins=c.counts, baseline_std=b.std())
        bl, cl = self.baseline_label_counts, self.candidate_label_counts
        if sum(bl.values()) == self.scored and sum(cl.values()) == self.scored:
            classes = sorted(set(bl) | set(cl))
            kw["label_counts"] = [[bl.get(k, 0) for k in classes], [cl.get(k, 0) for k in classes]]
        if self.label_pairs.total == self.scored:
            kw["label_pairs"] = self.label_pairs.table()[1]
        return dv.from_counts(**kw)

    def details(self) -> dict:
        """Further per-span means for dashboards (RequestDiff.metrics-style names)."""
        return {
            "scored": self.scored, "error_rate": self.error_rate, "error_reasons": dict(self.error_reasons),
            "mean_confidence_delta": self.mean("confidence_delta"), "mean_l1": self.mean("l1"),
            "mean_linf": self.mean("linf"), "mean_hellinger": self.mean("hellinger"),
            "mean_topk_overlap": self.mean("topk_overlap"), "labelled": self.labelled,
            "baseline_accuracy": (self.both_right + self.baseline_right_candidate_wrong) / self.labelled
            if self.labelled else None,
            "candidate_accuracy": (self.both_right + self.baseline_wrong_candidate_right) / self.labelled
            if self.labelled else None,
            "baseline_latency_p999_ms": self.baseline_latency.quantile(0.999),
            "candidate_latency_p999_ms": self.candidate_latency.quantile(0.999),
        }

    # -- serialising ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {
            "v": 5, "requests": self.requests, "errors": self.errors, "scored": self.scored,
            "label_flips": self.label_flips, "sums": dict(self.sums), "error_reasons": dict(self.error_reasons),
            "baseline_label_counts": {str(k): v for k, v in self.baseline_label_counts.items()},
            "candidate_label_counts": {str(k): v for k, v in self.candidate_label_counts.items()},
            "baseline_latency": self.baseline_latency.to_dict(),
            "candidate_latency": self.candidate_latency.to_dict(),
            "labels": [self.labelled, self.both_right, self.baseline_right_candidate_wrong,
                       self.baseline_wrong_candidate_right],
            "slices": {k: {v: st.to_list() for v, st in t.items()} for k, t in self.slices.items()},
            "top_examples": [list(t) for t in self.top_examples],
            "confidence": [self.baseline_confidence.to_dict(), self.candidate_confidence.to_dict()],
            "label_pairs": self.label_pairs.to_dict(),
            "span": [self.first_sent_ms, self.last_sent_ms],
            "clusters": self.clusters.to_dict(),
        }
        if self.metric_sums:  # only an output kind with metrics of its own has them
            out["metric_sums"] = self.metric_sums.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> PairAccumulator:
        a = cls()
        a.requests, a.errors, a.scored, a.label_flips = d["requests"], d["errors"], d["scored"], d["label_flips"]
        a.sums = {k: float(d["sums"].get(k, 0.0)) for k in _SUMS}
        a.error_reasons = dict(d["error_reasons"])
        a.baseline_label_counts = {int(k): v for k, v in d["baseline_label_counts"].items()}
        a.candidate_label_counts = {int(k): v for k, v in d["candidate_label_counts"].items()}
        a.baseline_latency = LatencySketch.from_dict(d["baseline_latency"])
        a.candidate_latency = LatencySketch.from_dict(d["candidate_latency"])
        (a.labelled, a.both_right, a.baseline_right_candidate_wrong,
         a.baseline_wrong_candidate_right) = d["labels"]
        a.slices = {k: {v: SliceStats.from_list(st) for v, st in t.items()} for k, t in d["slices"].items()}
        a.top_examples = [(float(s), str(r), str(e)) for s, r, e in d["top_examples"]]
        if "confidence" in d:  # absent in v1 state: tables start empty
            a.baseline_confidence, a.candidate_confidence = map(ConfidenceHistogram.from_dict, d["confidence"])
        if "label_pairs" in d:
            a.label_pairs = LabelPairTable.from_dict(d["label_pairs"])
        a.first_sent_ms, a.last_sent_ms = d.get("span", [None, None])
        a.metric_sums = MetricSums.from_dict(d.get("metric_sums"))
        if "clusters" in d:
            a.clusters = ClusterStats.from_dict(d["clusters"])
        else:  # state from before clusters (v2/v3)
            a.clusters = clusters_from_first_seen(d)
        return a

    def __repr__(self) -> str:
        return f"PairAccumulator(requests={self.requests}, errors={self.errors}, flip_rate={self.flip_rate})"
