"""Ranking / top-k (recommenders, retrieval): each answer is a score per item over the *same* item set,
an (n, items) array, higher is better (issue #22).

* each model's list is its ``k`` best items by score (all of them when there are fewer than k: then
  overlap@k is 1 by definition); equal scores rank the lower item index first; a tie *at* the k-th
  place is broken by numpy's partition, the same way for equal rows;
* ``overlap_at_k``: |baseline's top k  ∩  candidate's top k| / k; ``disagree`` when it is below
  ``min_overlap`` (default 0.8: with k = 10, three or more of production's ten items replaced);
  ``severity`` = 1 - overlap@k;
* ``kendall_tau_at_k``: Kendall's tau between the baseline's order of its own top k and the
  candidate's scores of those same items: +1 when the candidate orders production's list the same
  way, -1 reversed; ties in the candidate's scores count as neither concordant nor discordant; 1
  when k is 1. It measures order, overlap@k membership;
* ``ndcg_at_k``: NDCG of the candidate's list, with the baseline's list as graded relevance (its
  first item k, its second k - 1, ..., its k-th 1, every other item 0; linear gain, log2 discount),
  normalised by the baseline's own list: 1 when the lists are equal;
* labels: the top-1 item index of each model; summaries: the top-1 score.

The cost is O(n k log(n k)) plus O(n items) for the partition; Kendall's O(k^2) pairs run in row
chunks so memory stays bounded for large k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from scorers.kinds.base import KindDiffs
from scorers.kinds.common import PairedKind, check_params, integer, number

PAIR_CELLS_PER_CHUNK = 4_000_000  # rows x item pairs held at once by Kendall's tau


def gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(x, idx, axis=1)`` for 2-D arrays, as one flat take (several times faster)."""
    rows = np.arange(x.shape[0], dtype=np.intp)[:, None] * x.shape[1]
    return np.ascontiguousarray(x).ravel().take(rows + idx)


def top_k_items(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) item indices, best first; equal scores: the lower index first."""
    width = x.shape[1]
    if k < width:  # partition the raw scores (no negated copy): the best k sit in the last k columns
        idx = np.argpartition(x, width - k, axis=1)[:, width - k:]
        idx.sort(axis=1)  # ascending index, so the stable sort below ranks equal scores by index
    else:
        idx = np.broadcast_to(np.arange(width), x.shape).copy()
    order = np.argsort(-gather(x, idx), axis=1, kind="stable")
    return gather(idx, order)


def kendall_tau_rows(scores: np.ndarray) -> np.ndarray:
    """Per row, Kendall's tau of ``scores`` (n, k) against the order 0 > 1 > ... > k-1 (1 when k < 2)."""
    n, k = scores.shape
    if k < 2:
        return np.ones(n)
    i, j = np.triu_indices(k, 1)
    out = np.empty(n)
    step = max(1, PAIR_CELLS_PER_CHUNK // len(i))
    for start in range(0, n, step):
        part = scores[start:start + step]
        out[start:start + step] = np.sign(part[:, i] - part[:, j]).sum(axis=1) / len(i)
    return out


def list_agreement(tb: np.ndarray, tc: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlap@k and NDCG@k of the candidate's lists ``tc`` against the baseline's ``tb`` (both (n, k),
    best first). Membership by one sorted search over row-offset item ids: no (n, k, k) tensor."""
    n, k = tb.shape
    rows = np.arange(n, dtype=np.int64)[:, None] * width
    order = np.argsort(tb, axis=1)  # sorting within rows sorts the row-offset ids globally
    sorted_ids = (rows + gather(tb, order)).ravel()
    cand_ids = (rows + tc).ravel()
    pos = np.minimum(np.searchsorted(sorted_ids, cand_ids), sorted_ids.shape[0] - 1)
    found = (sorted_ids[pos] == cand_ids).reshape(n, k)
    base_rank = order.ravel()[pos].reshape(n, k)  # where the candidate's item sits in the baseline's list
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    gain = np.where(found, k - base_rank, 0).astype(np.float64)
    ideal = (k - np.arange(k)) @ discount
    return found.sum(axis=1) / k, (gain @ discount) / ideal


@dataclass(frozen=True)
class RankingKind(PairedKind):
    name: ClassVar[str] = "ranking"
    disagree_doc: ClassVar[str] = "overlap of the two top-k lists is below min_overlap"
    severity_doc: ClassVar[str] = "1 - overlap@k: the share of the baseline's top k the candidate left out"
    metric_docs: ClassVar[dict[str, str]] = {
        "overlap_at_k": "share of the baseline's top k items also in the candidate's top k",
        "kendall_tau_at_k": "Kendall's tau of the candidate's scores over the baseline's top k, in its order",
        "ndcg_at_k": "NDCG@k of the candidate's list, the baseline's list as graded relevance (k ... 1)",
    }

    k: int = 10
    min_overlap: float = 0.8

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> RankingKind:
        p = check_params(cls.name, params, {"k": 10, "min_overlap": 0.8})
        return cls(integer(cls.name, "k", p["k"], 1),
                   number(cls.name, "min_overlap", p["min_overlap"], 0.0, 1.0, lo_open=True))

    def _baseline_side(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return b.max(axis=1), top_k_items(b, 1)[:, 0].astype(np.int64)

    def _score(self, b: np.ndarray, c: np.ndarray) -> KindDiffs:
        n, width = b.shape
        k = min(self.k, width)
        tb, tc = top_k_items(b, k), top_k_items(c, k)
        overlap, ndcg = list_agreement(tb, tc, width)
        tau = kendall_tau_rows(gather(c, tb))
        return KindDiffs(
            # counts, not shares: 8/10 vs 0.8 must not hinge on rounding
            disagree=np.rint(overlap * k) < self.min_overlap * k - 1e-9, severity=1.0 - overlap,
            baseline_summary=gather(b, tb[:, :1])[:, 0], candidate_summary=gather(c, tc[:, :1])[:, 0],
            baseline_label=tb[:, 0].astype(np.int64), candidate_label=tc[:, 0].astype(np.int64),
            error=np.full(n, "", dtype=object),
            metrics={"overlap_at_k": overlap, "kendall_tau_at_k": tau, "ndcg_at_k": ndcg},
        )
