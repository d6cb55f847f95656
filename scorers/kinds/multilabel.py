"""Multi-label classification: L independent labels per request, each a probability (or a logit with
``from_logits``, read through the sigmoid), switched on at ``threshold`` (issue #22).

* a label is *on* when its probability is >= ``threshold`` (default 0.5; with logits the comparison
  is made on the logit, ``z >= log(t / (1 - t))``, so no precision is lost in the sigmoid);
* ``disagree``: any label is on for one model and off for the other; ``severity``: the Hamming
  distance as a share of the L labels;
* probabilities must lie in [0, 1] (within 1e-6); otherwise the row is an error (candidate) or a
  baseline problem, since a value outside is a logit sent without ``from_logits``;
* labels: the *number of labels on* (baseline_label / candidate_label), so an analyst can see "the
  candidate tags fewer labels" at a glance; summaries: the share of labels on;
* per-label flips: ``flip_label_<j>`` (1.0 when label j flipped) for the first 32 labels only
  (``PER_LABEL_CAP``): the diff rows' metrics map stays small for models with thousands of tags;
  the judge gates the request-level rates above, not the per-label ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from scorers.kinds.base import KindDiffs
from scorers.kinds.common import PairedKind, check_params, flag, nonfinite_problems, number

PER_LABEL_CAP = 32
PROB_TOLERANCE = 1e-6


@dataclass(frozen=True)
class MultilabelKind(PairedKind):
    name: ClassVar[str] = "multilabel"
    disagree_doc: ClassVar[str] = "some label is on (probability >= threshold) for one model and off for the other"
    severity_doc: ClassVar[str] = "Hamming distance between the two label sets, as a share of the labels"
    metric_docs: ClassVar[dict[str, str]] = {
        "hamming": "number of labels that flipped",
        "flipped_share": "share of the labels that flipped (the severity)",
        "mean_abs_delta": "mean over the labels of |candidate probability - baseline probability|",
        **{f"flip_label_{j}": f"1 when label {j} flipped, else 0 (first {PER_LABEL_CAP} labels only)"
           for j in range(PER_LABEL_CAP)},
    }

    threshold: float = 0.5
    from_logits: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> MultilabelKind:
        p = check_params(cls.name, params, {"threshold": 0.5, "from_logits": False})
        t = number(cls.name, "threshold", p["threshold"], 0.0, 1.0, lo_open=True, hi_open=True)
        return cls(t, flag(cls.name, "from_logits", p["from_logits"]))

    def metric_names(self, width: int) -> list[str]:
        return ["hamming", "flipped_share", "mean_abs_delta"] + [
            f"flip_label_{j}" for j in range(min(width, PER_LABEL_CAP))]

    def _problems(self, x: np.ndarray, who: str) -> np.ndarray:
        out = nonfinite_problems(x, who)
        if self.from_logits or not x.shape[1]:
            return out
        with np.errstate(invalid="ignore"):
            wrong = ((x < -PROB_TOLERANCE) | (x > 1 + PROB_TOLERANCE)).any(axis=1) & (out == "")
        for i in np.flatnonzero(wrong).tolist():  # only the bad rows are formatted
            out[i] = (f"{who} label probabilities outside [0, 1] (from {x[i].min():.4g} to {x[i].max():.4g}): "
                      "logits need from_logits = true")
        return out

    def _on(self, x: np.ndarray) -> np.ndarray:
        if self.from_logits:
            return x >= math.log(self.threshold / (1.0 - self.threshold))
        return x >= self.threshold

    def _probs(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-x)) if self.from_logits else x

    def _baseline_side(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        on = self._on(b)
        return on.mean(axis=1), on.sum(axis=1).astype(np.int64)

    def _score(self, b: np.ndarray, c: np.ndarray) -> KindDiffs:
        n, width = b.shape
        on_b, on_c = self._on(b), self._on(c)
        flips = on_b != on_c
        hamming = flips.sum(axis=1)
        metrics = {"hamming": hamming.astype(np.float64), "flipped_share": hamming / width,
                   "mean_abs_delta": np.abs(self._probs(c) - self._probs(b)).mean(axis=1)}
        for j in range(min(width, PER_LABEL_CAP)):
            metrics[f"flip_label_{j}"] = flips[:, j].astype(np.float64)
        return KindDiffs(
            disagree=hamming > 0, severity=hamming / width, baseline_summary=on_b.mean(axis=1),
            candidate_summary=on_c.mean(axis=1), baseline_label=on_b.sum(axis=1).astype(np.int64),
            candidate_label=on_c.sum(axis=1).astype(np.int64), error=np.full(n, "", dtype=object),
            metrics=metrics,
        )
