"""Clusters: the units the verdict counts as independent, and their closed-cluster statistics.

**What a cluster is.** Requests that share a *cluster key* and arrive within the session gap
``gap_ms`` of the previous request of that key, at most ``cap`` requests: a user's session (the
record's explicit ``sample_key``, or a configured attribute), else the repeats of one input (its
fingerprint) in a burst. A request with neither key is a cluster of its own. A key that recurs after
a pause longer than the gap starts a new cluster: draws from a popularity distribution are
independent, so a popular input asked again later is new evidence, and a user's sessions are
independent given the user's own rate (which is part of the request-weighted rate, not a
dependence). The key also carries the request's attribute signature, so a cluster lies in one slice
of every attribute.

**Cap and split.** A cluster that reaches ``cap`` requests is closed and the key's next request
starts a new one. Inside a cluster any dependence is covered (a deterministic model flips a repeated
input every time; a user's requests may share quirks); *between* the pieces of a split cluster it is
not. A key that never pauses (a constant key, a hot input asked every second) is cut into pieces of
``cap`` requests: the verdict then rests on requests / cap pieces, and says so.

**Bounded state.** ``ClusterTracker`` (scorers/cluster_tracker.py; the keys are made in
scorers/cluster_keys.py) keeps at most ``max_open`` open clusters; past that the least
recently active ones are closed early (eviction = closing, counted in ``evicted``): with more
concurrently active keys than that, the effective session gap shrinks to what the map can hold.
Packed, an open cluster takes 48 bytes (base64 in the JSON state): 2,048 of them ~ 130 KB.

**Statistics** (``ClusterStats``, in ``PairAccumulator.clusters``): per metric a
``scorers.ratio_cs.RatioTable`` of the closed clusters (errors per request, label flips and
|confidence delta| per scored request), the same table of label flips per slice value, and the
keys with the most requests (Misra-Gries, ``TOP_KEYS`` counters). Mergeable and JSON-serialisable.
Clusters close in event time: the verdict counts only closed clusters, so the last ``gap`` of
traffic waits (its requests are reported as pending).
"""

from __future__ import annotations

import numpy as np

from scorers.cluster_keys import attribute_key, cluster_keys, request_keys, signature_hash  # noqa: F401
from scorers.cluster_tracker import (  # noqa: F401 - the cluster API is imported from here too
    DEFAULT_CAP, DEFAULT_GAP_MS, DEFAULT_MAX_OPEN, MAX_SIGNATURES, Closed, ClusterTracker, singletons, tracker_for,
)  # fmt: skip
from scorers.ratio_cs import RatioTable

TOP_KEYS = 8
MAX_SLICE_ATTRIBUTES = 16
MAX_SLICE_VALUES = 64
OTHER = "__other__"


def capped_slot(slices: dict, key: str, value: str, make):
    """``slices[key][value]`` (made by ``make`` when new), at most ``MAX_SLICE_ATTRIBUTES`` keys and
    ``MAX_SLICE_VALUES`` values per key: later ones go to ``OTHER``, so a pair's state stays bounded."""
    if key not in slices:
        if len(slices) >= MAX_SLICE_ATTRIBUTES:
            key = OTHER
        slices.setdefault(key, {})
    table = slices[key]
    if value not in table and len(table) >= MAX_SLICE_VALUES:
        value = OTHER
    return table.setdefault(value, make())


class ClusterStats:
    """Closed-cluster tables of one pair: what the verdict judges (``scorers.ratio_cs``)."""

    def __init__(self) -> None:
        self.errors = RatioTable()  # n = requests, y = errors
        self.flips = RatioTable()  # n = scored requests, y = label flips
        self.abs_delta = RatioTable()  # n = scored requests, y = sum |confidence delta|
        self.slices: dict[str, dict[str, RatioTable]] = {}  # label flips per slice value
        self.top_keys: dict[str, float] = {}  # Misra-Gries: key (hex) -> requests (a lower bound)
        self.keyed_requests = 0.0  # requests in clusters with a key

    def add(self, c: Closed) -> None:
        if not len(c):
            return
        self.errors.add(c.requests, c.errors)
        self.flips.add(c.scored, c.flips)
        self.abs_delta.add(c.scored, c.abs_delta)
        if (c.sig >= 0).any():
            for s in np.unique(c.sig[c.sig >= 0]).tolist():
                items = c.signatures.get(int(s))
                if not items:
                    continue
                sel = c.sig == s
                for k, v in items:
                    self._slice(k, v).add(c.scored[sel], c.flips[sel])
        keyed = c.key != 0
        if keyed.any():
            self.keyed_requests += float(c.requests[keyed].sum())
            keys, inv = np.unique(c.key[keyed], return_inverse=True)
            counts = np.bincount(inv, weights=c.requests[keyed])
            for k, w in zip(keys.tolist(), counts.tolist(), strict=True):
                self._count_key(f"{k:016x}", w)

    def _count_key(self, key: str, w: float) -> None:
        top = self.top_keys
        if key in top or len(top) < TOP_KEYS:
            top[key] = top.get(key, 0.0) + w
            return
        low = min(min(top.values()), w)
        for k in list(top):
            top[k] -= low
            if top[k] <= 0:
                del top[k]
        if w > low:
            top[key] = w - low

    def _slice(self, key: str, value: str) -> RatioTable:
        return capped_slot(self.slices, key, value, RatioTable)

    def merge(self, other: ClusterStats) -> None:
        self.errors.merge(other.errors)
        self.flips.merge(other.flips)
        self.abs_delta.merge(other.abs_delta)
        for k, table in other.slices.items():
            for v, t in table.items():
                self._slice(k, v).merge(t)
        for k, w in other.top_keys.items():
            self._count_key(k, w)
        self.keyed_requests += other.keyed_requests

    def busiest_key(self) -> tuple[str, float] | None:
        """(key, share of all requests in closed clusters) of the key seen most, a lower bound."""
        total = self.errors.requests
        if not self.top_keys or total <= 0:
            return None
        k = max(self.top_keys, key=self.top_keys.get)
        return k, self.top_keys[k] / total

    def to_dict(self) -> dict:
        return {"v": 1, "errors": self.errors.to_list(), "flips": self.flips.to_list(),
                "abs_delta": self.abs_delta.to_list(),
                "slices": {k: {v: t.to_list() for v, t in tab.items()} for k, tab in self.slices.items()},
                "top_keys": {k: round(w, 6) for k, w in self.top_keys.items()}, "keyed": self.keyed_requests}

    @classmethod
    def from_dict(cls, d: dict) -> ClusterStats:
        s = cls()
        s.errors, s.flips, s.abs_delta = (RatioTable.from_list(d[k]) for k in ("errors", "flips", "abs_delta"))
        s.slices = {k: {v: RatioTable.from_list(t) for v, t in tab.items()} for k, tab in d.get("slices", {}).items()}
        s.top_keys = {k: float(w) for k, w in d.get("top_keys", {}).items()}
        s.keyed_requests = float(d.get("keyed", 0.0))
        return s

    def empty(self) -> bool:
        return self.errors.clusters == 0
