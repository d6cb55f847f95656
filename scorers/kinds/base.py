"""One small interface every output kind implements (issue #22): a kind turns the baseline's and the
candidate's answers to the same requests into per-request paired diffs.

The judge and the estimand (scorers/judge.py, scorers/clusters.py) do not change per kind: every kind
maps its answers onto the same two gated per-request quantities, and adds its own named metrics for
analysts and the verdict's explanation.

* ``disagree`` (bool): the kind's per-request *disagreement event*, gated as a request-weighted rate
  (the judge's ``label_flip_rate``): classification, the top class changes; regression, the error is
  beyond the tolerance; multi-label, any label flips; ranking, overlap@k below its threshold;
  embeddings, cosine similarity below its threshold.
* ``severity`` (float in [0, 1], NaN on error): the kind's per-request *size* of the difference,
  gated as a mean (the judge's ``abs_confidence_delta``): classification, |confidence delta|;
  regression, the relative error capped at 1; multi-label, the Hamming distance as a share of
  labels; ranking, 1 - overlap@k; embeddings, cosine distance / 2.
* ``baseline_summary`` / ``candidate_summary`` (float): one number per answer whose distribution
  the window divergences compare (classification: top-class confidence; regression: the first
  output; multi-label: share of labels on; ranking: top-1 score; embeddings: the vector's norm).
* ``baseline_label`` / ``candidate_label`` (int64, -1 where it has no meaning or on error): the
  classification's class; other kinds say in their docs what they put there, or -1.
* ``metrics``: the kind's own per-request numbers (float64, NaN on error), stored in the diff rows'
  typed ``metrics`` map under these names and reported in the window's details.
* ``error``: "" when the row was scored, else why the candidate's answer could not be compared (a
  *candidate error*). A row whose *baseline* answer is unusable is never a candidate error: it is
  refused before scoring (``baseline_problems``) and becomes a ``baseline_invalid`` dead letter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np


@dataclass(eq=False)
class KindDiffs:
    disagree: np.ndarray  # (n,) bool, False on error
    severity: np.ndarray  # (n,) float64 in [0, 1], NaN on error
    baseline_summary: np.ndarray  # (n,) float64
    candidate_summary: np.ndarray  # (n,) float64, NaN on error
    baseline_label: np.ndarray  # (n,) int64, -1: none
    candidate_label: np.ndarray  # (n,) int64, -1: none or error
    error: np.ndarray  # (n,) object array of str, "" when scored
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,) float64, NaN on error

    @property
    def ok(self) -> np.ndarray:
        return self.error == ""

    def __len__(self) -> int:
        return int(self.disagree.shape[0])


class OutputKind(Protocol):
    """What a kind module exports (one instance per candidate, built from its config)."""

    name: ClassVar[str]  # "classification", "regression", "multilabel", "ranking", "embedding"
    disagree_doc: ClassVar[str]  # what ``disagree`` means, one line, for the verdict and the README
    severity_doc: ClassVar[str]  # what ``severity`` means, one line
    metric_docs: ClassVar[dict[str, str]]  # each name in ``metrics``: what it is, one line

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> OutputKind:
        """The kind with the candidate's ``[candidates.kind_params]`` (tolerance, k, thresholds ...);
        raises ValueError naming the bad parameter and the fix."""
        ...

    def baseline_problems(self, baseline: np.ndarray) -> dict[int, str]:
        """Rows of the baseline's answers (n, width) that cannot be compared at all, with the reason."""
        ...

    def diffs(self, baseline: np.ndarray, candidate: np.ndarray) -> KindDiffs:
        """Paired diffs of (n, width) float64 answers, row i of each to the same request."""
        ...
