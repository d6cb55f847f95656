"""The diff rows' columns of one candidate's scored group: its output kind's diffs onto the columns
every kind shares (streams/records.py), plus what the rows take from the requests themselves.

The judge and the estimand do not change per kind (scorers/kinds/base.py), so the gated columns
keep their wire names and every kind fills them:

* ``label_flip`` <- ``KindDiffs.disagree``: the judge's ``label_flip_rate`` is the kind's
  disagreement rate (classification: the top class changes; regression: beyond the tolerance ...).
* ``confidence_delta``: classification keeps its signed delta (the kind's ``confidence_delta``
  metric), every other kind writes its ``severity`` (in [0, 1], never negative). The judge gates
  the mean of ``|confidence_delta|`` (``abs_confidence_delta``): for classification that is the
  mean |confidence delta| as always, for another kind the mean severity, with no change to the
  judge, the clusters or the noise-floor subtraction.
* ``baseline_confidence`` / ``candidate_confidence`` <- the kind's summaries (classification: the
  top-class probability; regression: the first output; ...). Only summaries in [0, 1] feed the
  window's confidence histograms (streams/judge/core.py, ``SUMMARIES_IN_UNIT``).
* ``baseline_label`` / ``candidate_label`` <- the kind's labels (-1: none).
* ``l1`` / ``linf`` / ``hellinger`` / ``topk_overlap``: a kind metric of that name when the kind has
  one (classification), else NaN (no meaning for that kind).

The kind's other metrics travel in ``DiffBatch.metrics`` (the ``metrics`` map of the diff rows).
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from scorers.kinds.base import KindDiffs
from streams.judge.recent_ids import id_hashes

# Columns a kind metric of the same name fills (classification's probability-vector distances).
METRIC_COLUMNS = ("confidence_delta", "l1", "linf", "hellinger", "topk_overlap")


def fill_kind_columns(cols: dict[str, np.ndarray], diffs: KindDiffs, failure: str = "") -> dict[str, np.ndarray]:
    """Write the kind's diffs into ``cols`` (see module doc); returns the metrics that have no
    column of their own (``DiffBatch.metrics``). ``failure``: the candidate raised on these rows,
    so every row is an error with that reason and its numbers are NaN."""
    if failure:
        diffs.error[:] = failure  # the exception replaces the scorer's generic reason
    cols["baseline_label"][:] = diffs.baseline_label
    cols["candidate_label"][:] = diffs.candidate_label
    cols["label_flip"][:] = diffs.disagree
    for name in METRIC_COLUMNS:
        cols[name][:] = diffs.metrics[name] if name in diffs.metrics else np.nan
    if "confidence_delta" not in diffs.metrics:
        cols["confidence_delta"][:] = diffs.severity
    b_sum, c_sum = diffs.baseline_summary, diffs.candidate_summary
    if "confidence_delta" in diffs.metrics:  # classification: 0 where a row is unusable, as ever
        b_sum, c_sum = np.nan_to_num(b_sum, nan=0.0), np.nan_to_num(c_sum, nan=0.0)
    cols["baseline_confidence"][:] = b_sum
    cols["candidate_confidence"][:] = c_sum
    return {name: np.asarray(v, dtype=np.float64) for name, v in diffs.metrics.items() if name not in METRIC_COLUMNS}


_REQUEST_FIELDS = attrgetter("sent_ms", "baseline_latency_ms", "label", "request_id", "baseline_version", "attributes")
_SOURCE = attrgetter("partition", "offset")


def request_columns(group) -> dict:
    """What the diff rows of every candidate take from the requests themselves: one attribute read
    per request (``attrgetter`` over the group, in C), then whole columns."""
    events, msgs = zip(*group)
    sent, latency, label, request_id, version, attributes = zip(*map(_REQUEST_FIELDS, events))
    partition, offset = zip(*map(_SOURCE, msgs))
    request_id = list(request_id)
    return {
        "sent_ms": np.array(sent, dtype=np.int64),
        "baseline_latency_ms": np.array(latency, dtype=np.float64),
        "label": _labels(label),
        "source_partition": np.array(partition, dtype=np.int64),
        "source_offset": np.array(offset, dtype=np.int64),
        "request_id": request_id,
        "id_hash": id_hashes(request_id),
        "baseline_version": list(version),
        "attributes": list(attributes),
    }  # fmt: skip


def _labels(labels: tuple) -> np.ndarray:
    """Labels as float64, NaN where a request has none (None)."""
    if None not in labels:
        return np.array(labels, dtype=np.float64)
    return np.array([np.nan if x is None else float(x) for x in labels], dtype=np.float64)


def pair_reference_latency(model_batches) -> None:
    """Give every candidate's rows the replayed baseline's latency on the same request (same
    micro-batch, same machine): the paired latency comparison of scorers.latency."""
    ref = next((b for c, b in model_batches if c.config.noise_reference), None)
    if ref is None or not len(ref):
        return
    ref_latency, lat = ref.columns["candidate_latency_ms"], None
    for _, batch in model_batches:
        if batch is not ref and len(batch):
            if batch.request_id == ref.request_id:  # the same rows in the same order (the usual batch): as is
                batch.columns["reference_latency_ms"] = np.array(ref_latency, dtype=np.float64)
                continue
            lat = lat or dict(zip(ref.request_id, ref_latency.tolist(), strict=True))
            batch.columns["reference_latency_ms"] = np.array([lat.get(r, np.nan) for r in batch.request_id],
                                                             dtype=np.float64)
