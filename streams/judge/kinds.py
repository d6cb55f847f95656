"""What the judge stage does per output kind (scorers/kinds): the accumulator's inputs from a diff
batch, and the words of a verdict. The judge, the clusters and the estimand are the same for every
kind (streams/replay/columns.py says how each kind fills the gated columns).

* Confidence histograms (the window's psi, kl, js, ks, wasserstein ...) bin values in [0, 1]: they
  are fed the kind's summaries only where those are in [0, 1] by definition (``SUMMARIES_IN_UNIT``:
  classification's top-class probability, multi-label's share of labels on). A regression's first
  output, a ranking's top score or an embedding's norm have no fixed scale, so for those kinds the
  histogram statistics are absent from the window (``PairAccumulator.divergence``: exact or absent),
  and the distribution of predictions is in the diff rows (``baseline_confidence`` /
  ``candidate_confidence`` hold the summaries) and in the window's means of the kind's metrics.
* Label tables (``chi2_labels_pvalue``, ``stuart_maxwell_pvalue``) compare the kinds' labels:
  classification's class, multi-label's number of labels on, ranking's top-1 item. Regression and
  embeddings have none (-1 throughout), so the window leaves those statistics out
  (``window_divergence``).
* Ground-truth labels are compared with the predicted classes (accuracy, McNemar) for
  classification only.
* The accumulator's largest-diff examples rank by ``l1`` (classification); another kind's rows
  have no l1, so its severity takes that place.
* Verdict words: ``label_flip_rate`` and ``abs_confidence_delta`` keep their names (the judge and
  the policy's margins are the same), and for another kind every reason and metric detail that
  names them says what they mean for it (the kind's ``disagree_doc`` / ``severity_doc``), e.g.
  "label_flip_rate (regression: share of requests where some output differs ... by more than
  abs_tolerance + rel_tolerance * |baseline|)".
"""

from __future__ import annotations

import numpy as np

from scorers.diffs import ClassificationDiffs
from streams.records import DiffBatch

SUMMARIES_IN_UNIT = ("classification", "multilabel")
WITHOUT_LABELS = ("regression", "embedding")
LABEL_STATISTICS = ("chi2_labels_pvalue", "stuart_maxwell_pvalue")
FLIP, ABS_DELTA = "label_flip_rate", "abs_confidence_delta"


def accumulator_inputs(rows: DiffBatch) -> tuple[ClassificationDiffs, dict]:
    c = rows.columns
    classification = rows.kind == "classification"
    l1 = c["l1"] if classification else np.abs(c["confidence_delta"])  # the examples' ranking (module doc)
    zero_if_other = (lambda v: v) if classification else np.zeros_like  # no meaning there
    diffs = ClassificationDiffs(
        baseline_label=c["baseline_label"].astype(np.int64), candidate_label=c["candidate_label"].astype(np.int64),
        label_flip=c["label_flip"].astype(bool), confidence_delta=c["confidence_delta"], l1=l1,
        linf=zero_if_other(c["linf"]), hellinger=zero_if_other(c["hellinger"]),
        topk_overlap=zero_if_other(c["topk_overlap"]), error=np.array(rows.error, dtype=object), top_k=rows.top_k,
    )  # fmt: skip
    lat = c["candidate_latency_ms"]
    # Sampled timing (streams/replay/core.py): a scored row the replay did not time alone carries NaN by
    # design: not measured, not missing. A candidate error's NaN still counts as missing.
    untimed = np.isnan(lat) & diffs.ok
    unit = rows.kind in SUMMARIES_IN_UNIT
    kwargs = dict(
        baseline_latency_ms=c["baseline_latency_ms"], candidate_latency_ms=lat[~untimed] if untimed.any() else lat,
        request_ids=rows.request_id, attributes=rows.attributes, labels=c["label"] if classification else None,
        baseline_confidence=c["baseline_confidence"] if unit else None,
        candidate_confidence=c["candidate_confidence"] if unit else None,
        sent_ms=c["sent_ms"], clustered=True, metrics=rows.metrics or None,
    )  # fmt: skip
    return diffs, kwargs


def window_divergence(acc, kind: str) -> dict[str, float]:
    """The window's distribution statistics (``PairAccumulator.divergence``) that mean something for ``kind``."""
    out = acc.divergence()
    if kind in WITHOUT_LABELS:
        out = {k: v for k, v in out.items() if k not in LABEL_STATISTICS}
    return out


def kind_words(kind) -> dict[str, str]:
    """Metric name -> what it means for this output kind; {} for classification (the names say it)."""
    if kind.name == "classification":
        return {}
    return {FLIP: f"{kind.name}: share of requests where {kind.disagree_doc}",
            ABS_DELTA: f"{kind.name}: mean of {kind.severity_doc}"}


def explain(reasons: list[str], metrics: list, kind) -> list[str]:
    """The verdict's reasons with the gated metrics' meaning for ``kind`` (module doc); the metric
    judgements' ``detail`` gets it too (changed in place). Classification: unchanged."""
    words = kind_words(kind)
    if not words:
        return reasons
    for m in metrics:
        if m.name in words:
            m.detail = f"{words[m.name]}; {m.detail}" if m.detail else words[m.name]
    out = []
    for reason in reasons:
        for name, meaning in words.items():
            reason = reason.replace(name, f"{name} ({meaning})", 1)
        out.append(reason)
    return out
