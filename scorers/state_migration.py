"""Pair state written before clusters existed (v2, v3), read into today's closed-cluster statistics.

v3 state was judged on the *first-seen* requests (a request counted only when its input and sample
key were new; issue #21 replaced that rule); v2 on every request. Either way those requests become
single clusters: what the old verdict rested on, no more.
"""

from __future__ import annotations

from scorers.clusters import ClusterStats

_FIRST_SEEN = ("requests", "errors", "scored", "label_flips", "abs_confidence_delta")  # v3's "evidence" list


def clusters_from_first_seen(d: dict) -> ClusterStats:
    """The closed-cluster statistics of a v2/v3 ``PairAccumulator.to_dict()``."""
    if "evidence" in d:
        ev = dict(zip(_FIRST_SEEN, d["evidence"], strict=True))
    else:
        ev = {"requests": d["requests"], "errors": d["errors"], "scored": d["scored"],
              "label_flips": d["label_flips"], "abs_confidence_delta": float(d["sums"].get("abs_confidence_delta", 0.0))}
    c = ClusterStats()
    c.errors.add_singletons(ev["requests"], ev["errors"])
    c.flips.add_singletons(ev["scored"], ev["label_flips"])
    c.abs_delta.add_singletons(ev["scored"], ev["abs_confidence_delta"])
    for key, table in d["slices"].items():
        for value, st in table.items():  # [requests, errors, scored, flips, |delta|, first-seen scored, flips]
            scored, flips = (st[5], st[6]) if len(st) == 7 else (st[2], st[3])
            c._slice(key, value).add_singletons(scored, flips)
    return c
