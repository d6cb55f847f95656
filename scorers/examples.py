"""The requests worth looking at first: a pair's top examples (errors, then label flips, then the
largest L1 distance), kept mergeable: any order of updates and merges keeps the same set.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from scorers.diffs import ClassificationDiffs

TOP_EXAMPLES = 10
Example = tuple[float, str, str]  # (score, request_id, error reason)


def example_score(d: ClassificationDiffs) -> np.ndarray:
    # Errors first, then label flips, then by L1 distance: what an analyst wants to pull first.
    score = np.where(d.label_flip, 2.0, 0.0) + np.nan_to_num(d.l1, nan=0.0)
    return np.where(d.ok, score, 5.0)


def select_examples(scores: np.ndarray, request_ids: Sequence[str], errors: np.ndarray) -> list[Example]:
    """The candidates among a batch's rows. Pre-selected with the same total order the merge uses,
    (score desc, id asc), so merging never keeps a different set than one update on the
    concatenation would. Rows with no diff at all (score 0) are never examples: nothing to look at."""
    live = np.flatnonzero(scores > 0)
    if live.size == 0:
        return []
    if live.size > TOP_EXAMPLES:
        thr = np.partition(scores[live], live.size - TOP_EXAMPLES)[live.size - TOP_EXAMPLES]
        above = live[scores[live] > thr]
        tied = live[scores[live] == thr]
        keep = TOP_EXAMPLES - above.size
        tied = heapq.nsmallest(keep, tied.tolist(), key=lambda i: str(request_ids[i]))
        live = np.concatenate([above, np.asarray(tied, dtype=np.int64)])
    return [(float(scores[i]), str(request_ids[i]), str(errors[i])) for i in live]


def merge_examples(kept: list[Example], more: list[Example]) -> list[Example]:
    """The top ``TOP_EXAMPLES`` of both, in a deterministic order (score desc, id asc), so the merge
    order never changes the kept set; a request id appears once, with its highest score."""
    if not more:
        return kept
    merged = {rid: (s, rid, e) for s, rid, e in kept}
    for s, rid, e in more:
        if rid not in merged or merged[rid][0] < s:
            merged[rid] = (s, rid, e)
    return sorted(merged.values(), key=lambda t: (-t[0], t[1]))[:TOP_EXAMPLES]
