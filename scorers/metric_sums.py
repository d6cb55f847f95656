"""Sums of an output kind's own per-request metrics (scorers/kinds: regression's ``abs_error``,
ranking's ``overlap_at_k`` ...), per name: what a window reports as their means.

Finite values of scored rows only; at most ``MAX_KIND_METRICS`` names (later names are dropped: a
kind has a handful). Merging adds sums and counts, so it is exact up to float rounding and
order-free like the accumulator it lives in (scorers/accumulate.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MAX_KIND_METRICS = 48  # multi-label: 3 + 32 per-label flips


class MetricSums:
    def __init__(self) -> None:
        self.sums: dict[str, list] = {}  # name -> [sum, count]

    def __bool__(self) -> bool:
        return bool(self.sums)

    def update(self, metrics: Mapping[str, np.ndarray], ok: np.ndarray) -> None:
        n = ok.size
        for name, values in metrics.items():
            v = np.asarray(values, dtype=np.float64).reshape(-1)
            if v.size != n:
                raise ValueError(f"{v.size} values of metric {name!r} for {n} diffs")
            v = v[ok & np.isfinite(v)]
            self._add(name, float(v.sum()), int(v.size))

    def merge(self, other: MetricSums) -> None:
        for name, (total, count) in other.sums.items():
            self._add(name, total, count)

    def _add(self, name: str, total: float, count: int) -> None:
        entry = self.sums.get(name)
        if entry is None:
            if len(self.sums) >= MAX_KIND_METRICS:
                return
            entry = self.sums[name] = [0.0, 0]
        entry[0] += total
        entry[1] += count

    def means(self) -> dict[str, float]:
        return {name: total / count for name, (total, count) in self.sums.items() if count}

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in self.sums.items()}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> MetricSums:
        out = cls()
        out.sums = {str(k): [float(t), int(c)] for k, (t, c) in (d or {}).items()}
        return out
