"""Embeddings: each answer is a d-dimensional vector, compared by direction (issue #22).

* ``cosine_similarity`` of the two vectors, in [-1, 1]; bit-identical rows are exactly 1 (round-off
  would otherwise put them at 1 ± 1e-16); ``disagree`` when it is below ``min_similarity`` (default
  0.99); ``severity`` = (1 - cosine) / 2, the cosine distance scaled into [0, 1];
* ``norm_ratio`` = |candidate| / |baseline|: a re-scaled model has cosine 1 and a ratio far from 1,
  which matters to a consumer that uses dot products rather than cosines;
* a zero vector has no direction: a baseline of zeros is a baseline problem, a candidate of zeros a
  candidate error;
* summaries: the vectors' Euclidean norms; labels: -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from scorers.kinds.base import KindDiffs
from scorers.kinds.common import PairedKind, check_params, nonfinite_problems, number


def row_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x))


@dataclass(frozen=True)
class EmbeddingKind(PairedKind):
    name: ClassVar[str] = "embedding"
    disagree_doc: ClassVar[str] = "cosine similarity of the two vectors is below min_similarity"
    severity_doc: ClassVar[str] = "cosine distance / 2, (1 - cosine similarity) / 2, in [0, 1]"
    metric_docs: ClassVar[dict[str, str]] = {
        "cosine_similarity": "cosine of the angle between the candidate's and the baseline's vectors",
        "norm_ratio": "candidate's norm / baseline's norm",
    }

    min_similarity: float = 0.99

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> EmbeddingKind:
        p = check_params(cls.name, params, {"min_similarity": 0.99})
        return cls(number(cls.name, "min_similarity", p["min_similarity"], -1.0, 1.0, lo_open=True))

    def _problems(self, x: np.ndarray, who: str) -> np.ndarray:
        out = nonfinite_problems(x, who)
        if x.shape[1]:
            out[(out == "") & ~x.any(axis=1)] = f"{who} embedding is the zero vector (it has no direction)"
        return out

    def _baseline_side(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return row_norms(b), np.full(b.shape[0], -1, np.int64)

    def _score(self, b: np.ndarray, c: np.ndarray) -> KindDiffs:
        n = b.shape[0]
        nb, nc = row_norms(b), row_norms(c)
        # unit vectors first: the dot product of raw vectors overflows sooner
        cos = np.einsum("ij,ij->i", b / nb[:, None], c / nc[:, None])
        cos = np.clip(cos, -1.0, 1.0)
        cos[(b == c).all(axis=1)] = 1.0
        return KindDiffs(
            disagree=cos < self.min_similarity, severity=(1.0 - cos) / 2.0, baseline_summary=nb,
            candidate_summary=nc, baseline_label=np.full(n, -1, np.int64), candidate_label=np.full(n, -1, np.int64),
            error=np.full(n, "", dtype=object), metrics={"cosine_similarity": cos, "norm_ratio": nc / nb},
        )
