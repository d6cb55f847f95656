"""Regression: scalar or vector outputs, the candidate's error against the baseline (issue #22).

Per request with outputs b_j (baseline) and c_j (candidate), j = 1..m:

* the *tolerance* of output j is ``abs_tolerance + rel_tolerance * |b_j|`` (numpy.isclose's rule,
  with the baseline as the reference); ``disagree`` when any output is beyond it. Defaults:
  ``abs_tolerance = 0`` and ``rel_tolerance = 0.01`` (1 % of the baseline's value). With the default
  a baseline of exactly 0 tolerates no change at all: set ``abs_tolerance`` for outputs near 0;
* the *relative error* of output j is ``|c_j - b_j| / max(|b_j|, floor)``, where ``floor`` is
  ``abs_tolerance / rel_tolerance`` (the magnitude below which the absolute tolerance dominates),
  or ``abs_tolerance`` when ``rel_tolerance = 0``, and never below 1e-12. Measured this way (with
  ``rel_tolerance > 0`` and |b_j| above 1e-12), a request whose relative error is at most
  ``rel_tolerance`` never disagrees, and one above twice ``rel_tolerance`` always does;
* ``severity`` is the worst output's relative error, capped at 1 (a change of 100 % or more of the
  baseline's value counts fully);
* summaries are the first output (the window divergences compare the distributions of predictions),
  labels are -1 (a regression has no class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from scorers.kinds.base import KindDiffs
from scorers.kinds.common import PairedKind, check_params, number

REL_FLOOR = 1e-12  # keeps the relative error of a change from exactly 0 finite (and large)


@dataclass(frozen=True)
class RegressionKind(PairedKind):
    name: ClassVar[str] = "regression"
    disagree_doc: ClassVar[str] = ("some output differs from the baseline's by more than abs_tolerance + "
                                   "rel_tolerance * |baseline|")
    severity_doc: ClassVar[str] = "the worst output's relative error |candidate - baseline| / |baseline|, capped at 1"
    metric_docs: ClassVar[dict[str, str]] = {
        "abs_error": "largest |candidate - baseline| over the outputs",
        "rel_error": "largest relative error over the outputs (uncapped; the floor is in the module doc)",
        "signed_error": "mean over the outputs of candidate - baseline (its mean over requests is the paired mean "
                        "difference)",
        "baseline_value": "the baseline's first output",
        "candidate_value": "the candidate's first output",
    }

    abs_tolerance: float = 0.0
    rel_tolerance: float = 0.01

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> RegressionKind:
        p = check_params(cls.name, params, {"abs_tolerance": 0.0, "rel_tolerance": 0.01})
        a = number(cls.name, "abs_tolerance", p["abs_tolerance"], 0.0, float("inf"), hi_open=True)
        r = number(cls.name, "rel_tolerance", p["rel_tolerance"], 0.0, float("inf"), hi_open=True)
        if a == 0.0 and r == 0.0:
            raise ValueError(f"{cls.name} kind_params: abs_tolerance and rel_tolerance are both 0, so every "
                             "difference disagrees; set one of them above 0")
        return cls(a, r)

    @property
    def floor(self) -> float:
        """The magnitude the relative error is never measured against less than (module doc)."""
        f = self.abs_tolerance / self.rel_tolerance if self.rel_tolerance > 0 else self.abs_tolerance
        return max(f, REL_FLOOR)

    def _baseline_side(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return b[:, 0].copy(), np.full(b.shape[0], -1, np.int64)

    def _score(self, b: np.ndarray, c: np.ndarray) -> KindDiffs:
        n = b.shape[0]
        signed = c - b
        err = np.abs(signed)
        mag = np.abs(b)
        disagree = (err > self.abs_tolerance + self.rel_tolerance * mag).any(axis=1)
        rel = (err / np.maximum(mag, self.floor)).max(axis=1)
        return KindDiffs(
            disagree=disagree, severity=np.minimum(rel, 1.0), baseline_summary=b[:, 0].copy(),
            candidate_summary=c[:, 0].copy(), baseline_label=np.full(n, -1, np.int64),
            candidate_label=np.full(n, -1, np.int64), error=np.full(n, "", dtype=object),
            metrics={"abs_error": err.max(axis=1), "rel_error": rel, "signed_error": signed.mean(axis=1),
                     "baseline_value": b[:, 0].copy(), "candidate_value": c[:, 0].copy()},
        )
